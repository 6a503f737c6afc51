"""A trainer behind NAT too: trainer and workers both dial a relay.

Real processes on 127.0.0.1: ``python -m ws_gym.relay``, a trainer made with
``relay=``, ``python -m ws_gym.worker`` processes dialing the room's URL.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import subprocess
import sys
import threading
import time

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.vector import AutoresetMode

import ws_gym
from ws_gym.client import EXIT_UNAUTHORIZED

from .conftest import ROOT, free_port
from .test_equivalence import MODES, step_side_by_side

TOKEN = "trainer-token-for-tests-0123456789"
LISTENING = re.compile(r"ws_gym relay: listening on (wss?)://([^:\s]+):(\d+)")


class RelayProcess:
    """``python -m ws_gym.relay`` on 127.0.0.1; killed at teardown.

    A thread reads its output all along (into ``lines``), so that a chatty relay
    never blocks on a full pipe and the wait for its listening line is bounded.
    """

    def __init__(self, port: int = 0, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ws_gym.relay", "--host", "127.0.0.1", "--port", str(port),
             "--trainer-token", TOKEN, *args],
            cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        said: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, args=(said,), daemon=True)
        self._reader.start()
        deadline = time.monotonic() + 30
        while True:
            try:
                line = said.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.stop()
                raise RuntimeError(
                    f"the relay did not say where it listens within 30 s: {''.join(self.lines)}") from None
            if not line:
                raise RuntimeError(f"the relay ended before listening: {''.join(self.lines)}")
            match = LISTENING.search(line)
            if match:
                scheme, self.host, port_text = match.groups()
                self.port = int(port_text)
                self.url = f"{scheme}://{self.host}:{self.port}"
                return

    def _read(self, said: queue.Queue[str]) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            said.put(line)
        said.put("")  # the end

    def output(self) -> str:
        return "".join(self.lines)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._reader.join(10)


@pytest.fixture
def relay():
    r = RelayProcess()
    yield r
    r.stop()


def through_relay(relay: RelayProcess, num_envs: int, **options) -> ws_gym.RemoteVectorEnv:
    options.setdefault("env_id", "CartPole-v1")
    options.setdefault("connect_timeout", 60)
    return gym.make_vec("ws_gym/Remote-v0", num_envs=num_envs, relay=relay.url, relay_token=TOKEN, **options)


def start_workers(cli_workers, envs, counts, *extra: str):
    token = {"WS_GYM_TOKEN": envs.unwrapped.token}
    return [cli_workers.start("--url", envs.unwrapped.url, "--num-envs", str(n), *extra, env=token) for n in counts]


def listening_sockets_of_this_process() -> set[tuple[str, int]]:
    """(address, port) of this process's sockets in the LISTEN state (Linux /proc)."""
    ours = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            ours.add(int(target[8:-1]))
    listening = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "0A" and int(fields[9]) in ours:  # 0A: LISTEN
                address, port = fields[1].split(":")
                if table.endswith("6"):
                    listening.add((address, int(port, 16)))
                else:  # 127.0.0.1 is 0100007F: the bytes in host (little-endian) order
                    listening.add((".".join(str(b) for b in bytes.fromhex(address)[::-1]), int(port, 16)))
    return listening


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
def test_through_a_relay_equals_sync_vector_env(relay, cli_workers, mode):
    envs = through_relay(relay, 4, autoreset_mode=mode, max_episode_steps=30)
    ref = gym.make_vec("CartPole-v1", 4, vectorization_mode="sync", vector_kwargs={"autoreset_mode": mode},
                       max_episode_steps=30)
    try:
        url = envs.unwrapped.url
        assert url.startswith(relay.url + "/room/") and url.endswith("/ws")
        start_workers(cli_workers, envs, [1, 3])
        step_side_by_side(envs, ref, mode, 4, 80)
    finally:
        envs.close()
        ref.close()


@pytest.mark.skipif(not os.path.exists("/proc/self/fd"), reason="reads Linux's /proc to list listening sockets")
def test_a_trainer_with_a_relay_listens_on_no_socket(relay, cli_workers):
    """Nothing a worker could dial: the one new listening socket is the dashboard's, on loopback."""
    before = listening_sockets_of_this_process()
    envs = through_relay(relay, 2)
    try:
        dashboard = ("127.0.0.1", envs.unwrapped._trainer.server.dashboard_port)
        assert listening_sockets_of_this_process() - before == {dashboard}
        assert envs.unwrapped._trainer.server.port is None
        start_workers(cli_workers, envs, [2])
        envs.reset(seed=1)
        envs.step(np.array([0, 1]))
        assert listening_sockets_of_this_process() - before == {dashboard}
    finally:
        envs.close()


def test_two_trainers_on_one_relay_stay_apart(relay, cli_workers):
    a = through_relay(relay, 2, env_id="CartPole-v1")
    b = through_relay(relay, 3, env_id="Pendulum-v1")
    try:
        assert a.unwrapped.url != b.unwrapped.url
        start_workers(cli_workers, a, [2])
        start_workers(cli_workers, b, [1, 2])
        obs_a, _ = a.reset(seed=5)
        obs_b, _ = b.reset(seed=5)
        ref_a = gym.make_vec("CartPole-v1", 2, vectorization_mode="sync")
        ref_b = gym.make_vec("Pendulum-v1", 3, vectorization_mode="sync")
        try:
            np.testing.assert_array_equal(obs_a, ref_a.reset(seed=5)[0])
            np.testing.assert_array_equal(obs_b, ref_b.reset(seed=5)[0])
            for _ in range(20):
                act_a, act_b = ref_a.action_space.sample(), ref_b.action_space.sample()
                np.testing.assert_array_equal(a.step(act_a)[0], ref_a.step(act_a)[0])
                np.testing.assert_array_equal(b.step(act_b)[0], ref_b.step(act_b)[0])
        finally:
            ref_a.close()
            ref_b.close()
        assert a.unwrapped._trainer.table.covered() == 2 and b.unwrapped._trainer.table.covered() == 3
    finally:
        a.close()
        b.close()


def test_a_wrong_trainer_token_is_refused_at_once(relay):
    started = time.monotonic()
    with pytest.raises(ws_gym.RelayError, match="401.*token"):
        gym.make_vec("ws_gym/Remote-v0", num_envs=1, env_id="CartPole-v1", relay=relay.url,
                     relay_token="not-the-token")
    assert time.monotonic() - started < 10


def test_a_relay_option_needs_a_relay_token(monkeypatch):
    monkeypatch.delenv("WS_GYM_RELAY_TOKEN", raising=False)
    with pytest.raises(ValueError, match="relay_token"):
        ws_gym.RemoteVectorEnv(1, env_id="CartPole-v1", relay="ws://127.0.0.1:1")
    with pytest.raises(ValueError, match="relay"):
        ws_gym.RemoteVectorEnv(1, env_id="CartPole-v1", relay="http://127.0.0.1:1", relay_token="x")
    with pytest.raises(ValueError, match="not both"):
        ws_gym.RemoteVectorEnv(1, env_id="CartPole-v1", relay="ws://127.0.0.1:1", relay_token="x",
                               public_url="ws://example.org/ws")


def test_a_wrong_worker_token_is_refused_by_the_trainer(relay, cli_workers):
    envs = through_relay(relay, 1)
    try:
        proc = cli_workers.start("--url", envs.unwrapped.url, "--num-envs", "1", env={"WS_GYM_TOKEN": "wrong"})
        code, out = cli_workers.finish(proc, timeout=60)
        assert code == EXIT_UNAUTHORIZED, out
        assert "token" in out
        assert envs.unwrapped._trainer.table.covered() == 0
    finally:
        envs.close()


def test_local_workers_keep_dialing_the_trainer_directly(relay):
    envs = through_relay(relay, 2, local_workers=1)
    try:
        trainer = envs.unwrapped._trainer
        assert trainer.url.startswith(relay.url)  # what PCs would dial
        envs.reset(seed=3)
        envs.step(np.array([1, 0]))
        assert trainer.server.relay.accepted == 0  # none came through the relay
        assert trainer.server.port is not None  # a loopback port (or Unix socket) for them
    finally:
        envs.close()


def test_a_single_env_through_a_relay(relay, cli_workers):
    env = gym.make("ws_gym/Remote-v0", env_id="CartPole-v1", relay=relay.url, relay_token=TOKEN,
                   connect_timeout=60)
    ref = gym.make("CartPole-v1")
    try:
        start_workers(cli_workers, env, [1])
        np.testing.assert_array_equal(env.reset(seed=9)[0], ref.reset(seed=9)[0])
        for action in [0, 1, 1, 0, 1]:
            obs, reward, terminated, truncated, _ = env.step(action)
            want = ref.step(action)
            np.testing.assert_array_equal(obs, want[0])
            assert (reward, terminated, truncated) == tuple(want[1:4])
    finally:
        env.close()
        ref.close()


def test_relay_restarted_mid_run_trainer_and_workers_come_back(cli_workers):
    port = free_port()
    first = RelayProcess(port)
    envs = through_relay(first, 2, on_worker_lost="wait")
    try:
        room = envs.unwrapped.url
        start_workers(cli_workers, envs, [1, 1])
        envs.reset(seed=1)
        for _ in range(5):
            envs.step(np.array([0, 1]))
        first.stop()  # the relay goes away: both sides lose it
        second = RelayProcess(port)
        try:
            trainer = envs.unwrapped._trainer
            deadline = time.monotonic() + 60
            stepped = 0
            while time.monotonic() < deadline:  # wait mode: it keeps stepping meanwhile
                envs.step(np.array([0, 1]))
                stepped += 1
                if trainer.server.relay.reconnects and trainer.table.covered() == 2:
                    break
            assert trainer.server.relay.reconnects >= 1, "the trainer did not dial the new relay"
            assert trainer.table.covered() == 2, trainer.table.last_event()
            assert envs.unwrapped.url == room  # the same room: the workers' URL stays valid
            envs.reset(seed=2)
            obs, *_ = envs.step(np.array([1, 1]))
            assert obs.shape == (2, 4) and stepped > 0
        finally:
            second.stop()
    finally:
        envs.close()
        first.stop()


def test_relay_restarted_reset_serves_again_in_raise_mode(cli_workers):
    port = free_port()
    first = RelayProcess(port)
    envs = through_relay(first, 2)
    try:
        start_workers(cli_workers, envs, [2])
        envs.reset(seed=1)
        envs.step(np.array([0, 1]))
        first.stop()
        second = RelayProcess(port)
        try:
            deadline = time.monotonic() + 60
            while True:  # a step may fail while the worker is gone; reset waits for it
                try:
                    obs, _ = envs.reset(seed=4)
                    envs.step(np.array([1, 0]))
                    break
                except ws_gym.WorkerLostError:
                    assert time.monotonic() < deadline
            ref = gym.make_vec("CartPole-v1", 2, vectorization_mode="sync")
            np.testing.assert_array_equal(obs, ref.reset(seed=4)[0])
            ref.close()
        finally:
            second.stop()
    finally:
        envs.close()
        first.stop()


def test_workers_retry_while_the_room_has_no_trainer(relay, cli_workers):
    envs = through_relay(relay, 1)
    url, token = envs.unwrapped.url, envs.unwrapped.token
    envs.close()  # the room ends with its trainer
    proc = cli_workers.start("--url", url, "--num-envs", "1", "--retry-timeout", "2", env={"WS_GYM_TOKEN": token})
    code, out = cli_workers.finish(proc, timeout=60)
    assert code != 0 and "503" in out and "no trainer" in out, out


def test_sb3_make_vec_env_through_a_relay(relay, cli_workers, caplog):
    sb3 = pytest.importorskip("ws_gym.sb3")
    caplog.set_level(logging.INFO, logger="ws_gym")
    made: list = []
    # make_vec_env waits for its workers, whose URL (the room) it prints while it waits
    thread = threading.Thread(target=lambda: made.append(sb3.make_vec_env(
        "CartPole-v1", n_envs=2, relay=relay.url, relay_token=TOKEN, connect_timeout=60)), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    command = None
    while command is None:
        assert time.monotonic() < deadline, "no worker command was printed"
        for record in list(caplog.records):
            match = re.search(r"(WS_GYM_TOKEN=\S+) python -m ws_gym.worker --url (\S+)", record.getMessage())
            if match:
                command = match.groups()
        thread.join(0.05)
    token, url = command[0].split("=", 1)[1], command[1]
    assert url.startswith(relay.url + "/room/")
    cli_workers.start("--url", url, "--num-envs", "2", env={"WS_GYM_TOKEN": token})
    thread.join(60)
    venv, = made
    try:
        obs = venv.reset()
        assert obs.shape == (2, 4)
        venv.step(np.array([0, 1]))
    finally:
        venv.close()


def test_autoreset_modes_cover_every_mode():
    assert set(MODES) == set(AutoresetMode)
