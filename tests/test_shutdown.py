"""Shutdown and restarts: Ctrl-C on either side, and a trainer that restarts.

A normal shutdown leaves no process behind and prints no traceback of ours; a
worker whose trainer vanishes dials in again and serves the next trainer.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import ws_gym

from .conftest import ROOT, free_port
from .test_workers import pid_gone, wait_until

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="sends POSIX signals")


@pytest.fixture(autouse=True)
def ctrl_c_reaches_children():
    """A shell that starts the suite in the background (``cmd &``, nohup) ignores
    SIGINT, and every child inherits that: Python would then install no Ctrl-C
    handler in them. A handler here is reset to the default in each child."""
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_on_a_worker_exits_cleanly(cli_workers):
    envs = ws_gym.RemoteVectorEnv(2, env_id="CartPole-v1", port=0, connect_timeout=60)
    try:
        proc = cli_workers.start("--url", envs.url, "--env", "CartPole-v1", "--num-envs", "2")
        envs.reset(seed=0)
        envs.step(np.zeros(2, dtype=np.int64))
        proc.send_signal(signal.SIGINT)
        code, out = cli_workers.finish(proc)
        assert code == 130, out
        assert "Traceback" not in out, out
        assert "interrupted" in out
        with pytest.raises(ws_gym.WorkerLostError):
            wait_until(lambda: envs._trainer.table.covered() < 2, 10, "the trainer to see the worker go")
            envs.step(np.zeros(2, dtype=np.int64))
    finally:
        envs.close()


@pytest.mark.parametrize("to", ["trainer", "group"])  # group: Ctrl-C in a terminal reaches the workers too
def test_ctrl_c_on_a_trainer_ends_its_workers_without_our_tracebacks(to):
    script = textwrap.dedent("""
        import numpy as np, ws_gym
        envs = ws_gym.RemoteVectorEnv(4, env_id="CartPole-v1", port=0, local_workers=2)
        envs.reset(seed=0)
        print(" ".join(str(p.pid) for p in envs._trainer.local.procs), flush=True)
        while True:  # a training loop, until Ctrl-C
            envs.step(np.zeros(4, dtype=np.int64))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT, start_new_session=True)
    try:
        pids = [int(x) for x in proc.stdout.readline().split()]
        assert len(pids) == 2
        if to == "group":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        wait_until(lambda: all(pid_gone(p) for p in pids), 15, "local workers to exit")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    # Python's own report of the KeyboardInterrupt in the user's loop, and nothing else
    assert err.count("Traceback") <= 1, err
    assert "KeyboardInterrupt" in err
    for noise in ("Exception in thread", "Task was destroyed", "Error handling request", "Unclosed"):
        assert noise not in err, err


def test_worker_dials_in_again_after_the_trainer_restarts(cli_workers):
    """The trainer process dies (SIGKILL: no goodbye); the worker keeps trying with
    back-off and serves the next trainer on the same address."""
    port = free_port()
    script = textwrap.dedent(f"""
        import ws_gym
        envs = ws_gym.RemoteVectorEnv(2, env_id="CartPole-v1", port={port})
        envs.reset(seed=0)
        print("ready", flush=True)
        input()
    """)
    first = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    worker = cli_workers.start("--url", f"ws://127.0.0.1:{port}/ws", "--env", "CartPole-v1", "--num-envs", "2")
    try:
        assert first.stdout.readline().strip() == "ready"
        first.kill()
        first.communicate(timeout=10)
        envs = ws_gym.RemoteVectorEnv(2, env_id="CartPole-v1", port=port, connect_timeout=60)
        try:
            obs, _ = envs.reset(seed=0)  # the same worker process, dialing in again
            assert obs.shape == (2, 4)
            assert worker.poll() is None
            envs.step(np.zeros(2, dtype=np.int64))
        finally:
            envs.close()
        code, out = cli_workers.finish(worker)
        assert code == 0, out
        assert out.count("connected to") >= 2, out
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate(timeout=10)
