"""The optional speed-ups and their portable fallbacks: uvloop, a Unix socket
for local workers. Each path must give the same results."""

from __future__ import annotations

import os
import stat
import sys

import gymnasium as gym
import numpy as np
import pytest

import ws_gym
from ws_gym import frames as F
from ws_gym import loops

from .conftest import assert_same


def run_and_compare(envs) -> None:
    ref = gym.make_vec("CartPole-v1", 4, vectorization_mode="sync")
    try:
        assert_same(envs.reset(seed=11), ref.reset(seed=11), "reset")
        rng = np.random.default_rng(0)
        for t in range(60):
            a = rng.integers(0, 2, 4)
            assert_same(envs.step(a), ref.step(a), f"step {t}")
    finally:
        ref.close()


@pytest.mark.parametrize("uvloop", ["1", "0"])
def test_event_loop_choice(monkeypatch, uvloop):
    if uvloop == "1" and loops.uvloop_module() is None:
        pytest.skip("uvloop is not installed (pip install ws_gym[fast])")
    monkeypatch.setenv("WS_GYM_UVLOOP", uvloop)  # the local workers inherit it
    envs = gym.make_vec("ws_gym/Remote-v0", num_envs=4, env_id="CartPole-v1", port=0, local_workers=2)
    try:
        assert loops.loop_name(envs._trainer.pool._loop) == ("uvloop" if uvloop == "1" else "asyncio")
        run_and_compare(envs)
    finally:
        envs.close()


@pytest.mark.skipif(sys.platform == "win32", reason="Unix sockets are POSIX only; Windows uses TCP")
@pytest.mark.parametrize("unix", ["1", "0"])
def test_local_workers_use_a_private_unix_socket(monkeypatch, unix):
    monkeypatch.setenv("WS_GYM_UNIX", unix)
    envs = gym.make_vec("ws_gym/Remote-v0", num_envs=4, env_id="CartPole-v1", port=0, local_workers=2)
    try:
        # Frames from workers on the private socket are masked with the zero key, which the
        # trainer's parser does not XOR (frames.ZERO_KEY); over TCP each has a random key.
        unmasked = []
        real_mask = F.mask
        monkeypatch.setattr(F, "mask", lambda data, key, **kw: unmasked.append(key) or real_mask(data, key, **kw))
        run_and_compare(envs)
        path = envs._trainer.pool.unix_path
        socknames = [c.transport.get_extra_info("sockname") for c in envs._trainer.pool._conns]
        if unix == "1":
            assert unmasked == []
            assert socknames == [path, path]
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
        else:
            assert path is None
            assert all(isinstance(s, tuple) and s[0] == "127.0.0.1" for s in socknames)
            assert len(unmasked) >= 2 * 61 and F.ZERO_KEY not in unmasked  # a reset and 60 steps, 2 workers
        envs.close()
        if path is not None:
            assert not os.path.exists(os.path.dirname(path))
    finally:
        envs.close()


# The frame layer (ws_gym/wire.py) takes each connection over from aiohttp after
# the upgrade; a worker whose aiohttp hides the transport stays on aiohttp's own
# message API (WS_GYM_WIRE=0 forces that), and the trainer's caller thread writes
# requests itself unless WS_GYM_DIRECT=0. Every mix must give the same results.
@pytest.mark.parametrize("worker_wire, direct", [("1", "1"), ("0", "1"), ("1", "0"), ("0", "0")])
def test_frame_layer_and_its_fallbacks(monkeypatch, cli_workers, worker_wire, direct):
    monkeypatch.setenv("WS_GYM_DIRECT", direct)
    envs = gym.make_vec("ws_gym/Remote-v0", num_envs=4, env_id="CartPole-v1", port=0)
    try:
        procs = [cli_workers.start("--url", envs.url, "--num-envs", "2", "--log-level", "DEBUG",
                                   env={"WS_GYM_WIRE": worker_wire}) for _ in range(2)]
        run_and_compare(envs)
        conns = envs._trainer.pool._ordered_all()
        assert len(conns) == 2
        for conn in conns:  # the trainer's side is always on the frame layer
            assert type(conn.transport.get_protocol()).__name__ == "FrameConnection"
            assert conn.wire.direct == (direct == "1" and sys.platform != "win32")
        envs.close()
        for proc in procs:
            code, out = cli_workers.finish(proc)
            assert code == 0, out
            # Fails loudly if aiohttp stops showing the connection's transport:
            # the worker would then fall back to aiohttp's slower message API.
            assert ("serving on the frame layer" in out) == (worker_wire == "1"), out
    finally:
        envs.close()
