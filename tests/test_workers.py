"""Workers over real sockets: the CLI, the handshake, errors, losses and cleanup."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import aiohttp
import gymnasium as gym
import numpy as np
import pytest

import ws_gym
from ws_gym import codec
from ws_gym import protocol as P

from .conftest import ROOT, assert_same, free_port


def pid_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(line.startswith("State:") and "Z" in line.split()[1] for line in f)
    except FileNotFoundError:
        return True


def wait_until(pred, timeout: float, what: str) -> None:
    """Bounded wait for something another process does (not a sync sleep)."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# ----------------------------------------------------------------- the CLI


def test_worker_help_and_console_script():
    out = subprocess.run([sys.executable, "-m", "ws_gym.worker", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0
    for flag in ("--url", "--env", "--num-envs", "--env-kwargs", "--token"):
        assert flag in out.stdout
    script = os.path.join(os.path.dirname(sys.executable), "ws-gym-worker")
    if os.path.exists(script):
        out2 = subprocess.run([script, "--help"], capture_output=True, text=True)
        assert out2.returncode == 0 and "--url" in out2.stdout


def test_cli_workers_started_before_the_trainer(cli_workers):
    """Workers retry until the trainer is up; env kwargs travel; the split is 3 + 1."""
    port = free_port()
    url = f"ws://127.0.0.1:{port}/ws"
    w1 = cli_workers.start("--url", url, "--env", "CartPole-v1", "--num-envs", "3")
    w2 = cli_workers.start("--url", url, "--num-envs", "1")  # hosts what the trainer names
    # let both workers fail at least once to connect: they must be retrying
    wait_until(lambda: w1.poll() is None and w2.poll() is None, 1, "workers alive")
    envs = ws_gym.RemoteVectorEnv(4, env_id="CartPole-v1", port=port, connect_timeout=60,
                                  max_episode_steps=20)
    ref = gym.make_vec("CartPole-v1", 4, vectorization_mode="sync", max_episode_steps=20)
    try:
        assert envs.url == url
        assert_same(envs.reset(seed=1), ref.reset(seed=1))
        for t in range(60):
            a = ref.action_space.sample()
            assert_same(envs.step(a), ref.step(a), f"step {t}")
    finally:
        envs.close()
        ref.close()
    assert cli_workers.finish(w1)[0] == 0
    assert cli_workers.finish(w2)[0] == 0


def test_spaces_come_from_the_worker_when_the_trainer_lacks_the_env(cli_workers):
    envs = ws_gym.RemoteVectorEnv(2, env_id=None, port=0, connect_timeout=60)
    try:
        w = cli_workers.start("--url", envs.url, "--env", "Pendulum-v1", "--num-envs", "2")
        assert envs.single_action_space == gym.make("Pendulum-v1").action_space
        obs, _ = envs.reset(seed=0)
        assert obs.shape == (2, 3)
    finally:
        envs.close()
    assert cli_workers.finish(w)[0] == 0


def test_env_mismatch_is_refused_on_both_sides(cli_workers, caplog):
    envs = ws_gym.RemoteVectorEnv(1, env_id="CartPole-v1", port=0, connect_timeout=2)
    try:
        with caplog.at_level(logging.WARNING, logger="ws_gym"):
            w = cli_workers.start("--url", envs.url, "--env", "Pendulum-v1")
            code, out = cli_workers.finish(w)
        assert code == P_EXIT_REFUSED
        assert "env mismatch" in out and "CartPole-v1" in out and "Pendulum-v1" in out
        assert any("env mismatch" in r.getMessage() for r in caplog.records)
        with pytest.raises(ws_gym.ConnectTimeoutError) as err:
            envs.reset()
        assert isinstance(err.value, TimeoutError)
        assert "1 missing" in str(err.value) and envs.url in str(err.value)
    finally:
        envs.close()


P_EXIT_REFUSED = 2


def test_extra_worker_is_told_it_is_not_needed(cli_workers):
    envs = ws_gym.RemoteVectorEnv(2, env_id="CartPole-v1", port=0, local_workers=1)
    try:
        envs.reset(seed=0)
        w = cli_workers.start("--url", envs.url)
        code, out = cli_workers.finish(w)
        assert code == P_EXIT_REFUSED and "not needed" in out
        envs.step(np.array([0, 1]))  # the real workers still serve
        with pytest.raises(ValueError, match="batch of 2 actions"):
            envs.step(np.array([0, 1, 1]))
    finally:
        envs.close()


def test_worker_whose_spaces_differ_is_refused(cli_workers):
    envs = ws_gym.RemoteVectorEnv(1, env_id="tests.envs:Fancy-v0", port=0, connect_timeout=2)
    try:
        # same id, but a different horizon changes nothing in the spaces: accepted
        w = cli_workers.start("--url", envs.url, "--env", "tests.envs:Fancy-v0", "--env-kwargs", '{"horizon": 3}')
        envs.reset(seed=0)
    finally:
        envs.close()
    assert cli_workers.finish(w)[0] == 0
    envs = ws_gym.RemoteVectorEnv(1, env_id="CartPole-v1", port=0, connect_timeout=2,
                                  env_kwargs={"sutton_barto_reward": True})
    try:
        # the trainer expects CartPole's spaces; a hand-made hello/ready with other spaces is refused
        reason = asyncio.run(_raw_handshake(envs.url, ready_obs=gym.spaces.Box(0, 1, (3,))))
        assert "space mismatch" in reason and "observation space" in reason
    finally:
        envs.close()


def test_unsupported_space_is_refused_naming_it():
    with pytest.raises(ws_gym.UnsupportedSpaceError, match="Graph"):
        ws_gym.RemoteVectorEnv(1, env_id="tests.envs:GraphObs-v0", port=0)


def test_env_that_fails_to_build_is_reported():
    with pytest.raises(ws_gym.WsGymError) as err:
        envs = ws_gym.RemoteVectorEnv(1, env_id="tests.envs:BadInit-v0", port=0, local_workers=1, connect_timeout=20)
        envs.close()
    assert "exited" in str(err.value) or "cannot be built" in str(err.value)


async def _raw_handshake(url, *, protocol=P.PROTOCOL_VERSION, ready_obs=None):
    """Talk to the trainer by hand; return the refusal reason (or 'accepted')."""
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(url) as ws:
            await ws.send_bytes(codec.encode(P.HELLO, 0, {"protocol": protocol, "env_id": None, "num_envs": 1, "name": "raw"}))
            msg = codec.decode((await ws.receive(timeout=10)).data)
            if msg.kind == P.REFUSE:
                return msg.body["reason"]
            from ws_gym.spaces import space_to_schema
            body = {"observation_space": space_to_schema(ready_obs), "action_space": space_to_schema(gym.spaces.Discrete(2)),
                    "render_mode": None, "metadata": {}}
            await ws.send_bytes(codec.encode(P.READY, 0, body))
            msg = codec.decode((await ws.receive(timeout=10)).data)
            return msg.body["reason"] if msg.kind == P.REFUSE else "accepted"


def test_protocol_version_mismatch_names_both_versions():
    envs = ws_gym.RemoteVectorEnv(1, env_id="CartPole-v1", port=0)
    try:
        reason = asyncio.run(_raw_handshake(envs.url, protocol=999))
        assert "version" in reason and "999" in reason and str(P.PROTOCOL_VERSION) in reason
    finally:
        envs.close()


def test_url_is_listening_right_after_construction():
    envs = ws_gym.RemoteVectorEnv(1, env_id="CartPole-v1", port=0)
    try:
        host, port = envs.url[len("ws://"):].split("/")[0].rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5):
            pass
    finally:
        envs.close()
        envs.close()  # idempotent


def test_token_is_checked(cli_workers):
    envs = ws_gym.RemoteVectorEnv(1, env_id="CartPole-v1", port=0, token="s3cret", connect_timeout=30)
    try:
        bad = cli_workers.start("--url", envs.url, "--token", "wrong")
        code, out = cli_workers.finish(bad)
        assert code == 3 and "token" in out
        good = cli_workers.start("--url", envs.url, env={"WS_GYM_TOKEN": "s3cret"})
        envs.reset(seed=0)
        envs.step(np.array([1]))
    finally:
        envs.close()
    assert cli_workers.finish(good)[0] == 0


# ------------------------------------------------------------ calls & errors


def test_render_call_get_set_attr():
    envs = gym.make_vec("ws_gym/Remote-v0", num_envs=3, env_id="tests.envs:Fancy-v0", port=0,
                        local_workers=2, render_mode="rgb_array")
    ref = gym.make_vec("tests.envs:Fancy-v0", 3, vectorization_mode="sync", render_mode="rgb_array")
    try:
        assert envs.render_mode == "rgb_array"
        envs.reset(seed=0)
        ref.reset(seed=0)
        a = ref.action_space.sample()
        envs.step(a)
        ref.step(a)
        assert_same(envs.render(), ref.render())
        assert envs.get_attr("greeting") == ("hi", "hi", "hi")
        envs.set_attr("greeting", ["a", "b", "c"])
        assert envs.get_attr("greeting") == ("a", "b", "c")
        envs.set_attr("greeting", "same")
        assert envs.get_attr("greeting") == ("same",) * 3
        assert envs.call("shout", "yo", times=2) == (("YOYO", 1),) * 3
        with pytest.raises(ValueError):
            envs.set_attr("greeting", ["too", "few"])
        with pytest.raises(TypeError, match="cannot be sent"):
            envs.call("shout", object())  # arguments must cross the wire exactly
        assert envs.call("shout", "ok") == (("OK", 1),) * 3  # and nothing was sent
    finally:
        envs.close()
        ref.close()


def test_remote_exception_carries_type_message_and_traceback():
    envs = ws_gym.RemoteVectorEnv(2, env_id="tests.envs:Crash-v0", port=0, local_workers=2)
    try:
        envs.reset(seed=0)
        with pytest.raises(ws_gym.RemoteEnvError) as err:
            envs.step(np.array([0, 2]))
        e = err.value
        assert e.remote_type == "ValueError"
        assert "action 2 is not allowed" in e.remote_message
        assert "def step" in e.remote_traceback or "in step" in e.remote_traceback
        assert "envs 1..1" in str(e)
        envs.reset(seed=1)  # the trainer is still usable
        envs.step(np.array([0, 0]))
    finally:
        envs.close()


def test_worker_lost_mid_call_raises_promptly_and_reset_takes_a_new_worker(cli_workers):
    envs = ws_gym.RemoteVectorEnv(2, env_id="tests.envs:Crash-v0", port=0, step_timeout=120, connect_timeout=60)
    try:
        for _ in range(2):
            cli_workers.start("--url", envs.url, "--env", "tests.envs:Crash-v0")
        envs.reset(seed=0)
        t0 = time.monotonic()
        with pytest.raises(ws_gym.WorkerLostError):
            envs.step(np.array([1, 0]))  # env 0's worker dies inside step
        assert time.monotonic() - t0 < 30, "must not wait for step_timeout"
        with pytest.raises(ws_gym.WorkerLostError, match="no worker"):
            envs.step(np.array([0, 0]))
        # a new worker takes the free env; reset() waits for it, then all is well
        cli_workers.start("--url", envs.url, "--env", "tests.envs:Crash-v0")
        obs, _ = envs.reset(seed=0)
        assert obs.shape == (2, 2)
        envs.step(np.array([0, 0]))
    finally:
        envs.close()


def test_a_crashed_local_worker_is_restarted_at_reset():
    envs = ws_gym.RemoteVectorEnv(2, env_id="tests.envs:Crash-v0", port=0, local_workers=2, connect_timeout=60)
    try:
        envs.reset(seed=0)
        with pytest.raises(ws_gym.WorkerLostError):
            envs.step(np.array([0, 1]))
        envs.reset(seed=0)
        envs.step(np.array([0, 0]))
        pids = [p.pid for p in envs._trainer.local.procs]
    finally:
        envs.close()
    assert all(pid_gone(p) for p in pids)  # the restarted one too


def test_step_timeout_bounds_a_call():
    envs = ws_gym.RemoteVectorEnv(1, env_id="tests.envs:Crash-v0", port=0, local_workers=1, step_timeout=0.5)
    try:
        envs.reset(seed=0)
        t0 = time.monotonic()
        with pytest.raises(ws_gym.StepTimeoutError) as err:
            envs.step(np.array([3]))  # this env takes 3 s
        assert isinstance(err.value, TimeoutError)
        assert time.monotonic() - t0 < 2.5
    finally:
        envs.close()


def test_unencodable_info_arrives_as_repr_with_one_warning():
    envs = ws_gym.RemoteVectorEnv(1, env_id="tests.envs:Fancy-v0", port=0, local_workers=1)
    ws_gym.batching._warned_types.discard("Opaque")
    try:
        envs.reset(seed=0)
        seen = []
        with pytest.warns(RuntimeWarning, match="Opaque") as record:
            for _ in range(30):
                _, _, _, _, info = envs.step(envs.action_space.sample())
                if "odd" in info:
                    seen.append(info["odd"][0])
        assert seen and all(s.startswith("Opaque(") for s in seen)
        assert len([w for w in record if "Opaque" in str(w.message)]) == 1
    finally:
        envs.close()


# ------------------------------------------------------------------ cleanup


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except FileNotFoundError:
        return []


def test_local_workers_end_on_close():
    envs = ws_gym.RemoteVectorEnv(4, env_id="CartPole-v1", port=0, local_workers=2)
    pids = [p.pid for p in envs._trainer.local.procs]
    envs.reset(seed=0)
    envs.close()
    assert all(pid_gone(p) for p in pids)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("how", ["sigkill", "exception"])
def test_local_workers_end_when_the_trainer_dies(how):
    script = textwrap.dedent(f"""
        import sys, ws_gym
        envs = ws_gym.RemoteVectorEnv(4, env_id="CartPole-v1", port=0, local_workers=2)
        envs.reset(seed=0)
        print(" ".join(str(p.pid) for p in envs._trainer.local.procs), flush=True)
        if {how!r} == "exception":
            raise SystemExit("boom")
        sys.stdin.read()
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        pids = [int(x) for x in proc.stdout.readline().split()]
        assert len(pids) == 2
        if how == "sigkill":
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        wait_until(lambda: all(pid_gone(p) for p in pids), 15, "local workers to exit")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def test_malformed_replies_raise_protocol_error_not_a_crash():
    """A buggy or hostile worker gets a clear ProtocolError, never a KeyError."""
    import threading

    from ws_gym.spaces import space_to_schema

    ref = gym.make("CartPole-v1")
    ready = {"observation_space": space_to_schema(ref.observation_space),
             "action_space": space_to_schema(ref.action_space), "render_mode": None, "metadata": {}}
    bad_replies = [
        {"o": np.zeros((1, 3), np.float32), "f": []},           # wrong shape
        {"o": np.zeros((1, 4), np.float64), "f": []},           # wrong dtype
        {"o": np.zeros((1, 4), np.float32), "f": [[5, {}]]},    # info for an env it does not host
        "not an object",
    ]
    envs = ws_gym.RemoteVectorEnv(1, env_id="CartPole-v1", port=0, connect_timeout=30, step_timeout=10)

    async def rogue():
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(envs.url) as ws:
                await ws.send_bytes(codec.encode(P.HELLO, 0, P.make_hello("CartPole-v1", 1, "rogue")))
                assert codec.decode((await ws.receive(timeout=10)).data).kind == P.WELCOME
                await ws.send_bytes(codec.encode(P.READY, 0, ready))
                assert codec.decode((await ws.receive(timeout=10)).data).kind == P.ACCEPT
                for body in bad_replies:
                    req = codec.decode((await ws.receive(timeout=20)).data)
                    await ws.send_bytes(codec.encode(P.OK, req.id + 1000, {}))  # unknown id: ignored
                    await ws.send_bytes(codec.encode(P.OK, req.id, body))

    thread = threading.Thread(target=lambda: asyncio.run(rogue()))
    thread.start()
    try:
        for _ in bad_replies:
            with pytest.raises(ws_gym.ProtocolError):
                envs.reset(seed=0)
    finally:
        thread.join(timeout=30)
        envs.close()


def test_waiting_logs_progress_and_the_worker_command(caplog):
    envs = ws_gym.RemoteVectorEnv(3, env_id="CartPole-v1", port=0, connect_timeout=0.5)
    try:
        with caplog.at_level(logging.INFO, logger="ws_gym"):
            with pytest.raises(ws_gym.ConnectTimeoutError, match="3 missing"):
                envs.reset()
        text = "\n".join(r.getMessage() for r in caplog.records)
        assert "0/3 envs connected" in text
        assert f"python -m ws_gym.worker --url {envs.url} --env CartPole-v1 --num-envs 3" in text  # all missing
    finally:
        envs.close()


def test_exit_without_close_is_prompt_and_polite():
    """An env the user forgot to close is closed at exit: no hang, no orphans."""
    script = textwrap.dedent("""
        import gymnasium as gym, ws_gym
        envs = gym.make_vec("ws_gym/Remote-v0", num_envs=4, env_id="CartPole-v1", port=0, local_workers=2)
        envs.reset(seed=0)
        print(" ".join(str(p.pid) for p in envs._trainer.local.procs), flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT)
    try:
        pids = [int(x) for x in proc.stdout.readline().split()]
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=30)
        assert time.monotonic() - t0 < 3, "exit waited on a timeout"
        assert proc.returncode == 0
        assert "disconnected" not in err and "Traceback" not in err, err
        wait_until(lambda: all(pid_gone(p) for p in pids), 10, "local workers to exit")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_call_and_set_attr_reach_only_public_attributes():
    envs = ws_gym.RemoteVectorEnv(2, env_id="CartPole-v1", port=0, local_workers=1)
    try:
        envs.reset(seed=0)
        for name in ("__class__", "__init__", "_np_random", "__dict__"):
            with pytest.raises(ws_gym.RemoteEnvError, match="private attribute") as err:
                envs.call(name)
            assert err.value.remote_type == "PermissionError"
        with pytest.raises(ws_gym.RemoteEnvError, match="private attribute"):
            envs.set_attr("_elapsed_steps", 0)
        assert envs.call("__str__")[0].startswith("<TimeLimit")  # harmless dunders stay
        assert envs.get_attr("gravity") == (9.8, 9.8)
        envs.step(np.zeros(2, dtype=np.int64))  # and the worker keeps serving
    finally:
        envs.close()
