"""The fast paths and their portable fallbacks (a :class:`ws_gym.config.Transport`
each): uvloop, a Unix socket for local workers, caller-thread writes, compact
frames, the frame layer, busy polling, TLS. Each path must give the same results."""

from __future__ import annotations

import os
import stat
import sys

import gymnasium as gym
import numpy as np
import pytest

from ws_gym import frames as F
from ws_gym import loops
from ws_gym.config import SWITCHES, Transport

from .conftest import assert_same
from .test_security import make_cert


@pytest.fixture(scope="module")
def tls_cert(tmp_path_factory):
    return make_cert(tmp_path_factory.mktemp("tls"), "trainer")


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


# The paths users can get: each fast path on its own off, TLS, and busy polling
# either way. Every one must give SyncVectorEnv's results, and take the path it names.
MATRIX = {
    "defaults": Transport(),
    "tls": Transport(),
    "no uvloop": Transport(uvloop=False),
    "no unix socket": Transport(unix=False),
    "busy polling on": Transport(busy_poll=True),
    "busy polling off": Transport(busy_poll=False),
    "codec-only frames": Transport(compact=False),
    "no caller-thread writes": Transport(direct=False),
    "workers on aiohttp's messages": Transport(wire=False),
}


@pytest.mark.parametrize("name", list(MATRIX))
def test_transport_matrix(name, tls_cert):
    chosen = MATRIX[name]
    tls = {"certfile": tls_cert[0], "keyfile": tls_cert[1]} if name == "tls" else {}
    envs = gym.make_vec("ws_gym/Remote-v0", num_envs=4, env_id="CartPole-v1", port=0, local_workers=2,
                        transport=chosen, **tls)
    try:
        trainer = envs.unwrapped._trainer
        used = trainer.transport
        posix = os.name == "posix"
        assert used.uvloop == (chosen.uvloop and loops.uvloop_module(True) is not None)
        assert loops.loop_name(trainer.server._loop) == ("uvloop" if used.uvloop else "asyncio")
        assert used.unix == (chosen.unix and posix and not tls)
        assert used.direct == (chosen.direct and posix and not tls)
        if chosen.busy_poll is not None:
            assert used.busy_poll == (chosen.busy_poll and posix and chosen.direct)
        assert trainer.local._env["WS_GYM_WIRE"] == ("1" if chosen.wire else "0")  # the workers' side
        assert trainer.local._env["WS_GYM_UVLOOP"] == ("1" if used.uvloop else "0")
        run_and_compare(envs)
        conns = trainer.table.ordered_all()
        assert len(conns) == 2
        for conn in conns:
            assert (conn.codec.layout is not None) == chosen.compact
            assert conn.wire.direct == used.direct
            assert conn.wire.polled == bool(used.busy_poll)
            sockname = conn.transport.get_extra_info("sockname")
            assert isinstance(sockname, str) == used.unix  # a Unix socket's name is its path
            assert (conn.transport.get_extra_info("sslcontext") is not None) == bool(tls)
    finally:
        envs.close()


def test_the_switches_are_read_into_a_transport():
    assert Transport.from_environment({}) == Transport()
    off = {variable: "0" for variable in SWITCHES}
    assert Transport.from_environment(off) == Transport(uvloop=False, unix=False, direct=False, compact=False,
                                                        wire=False, busy_poll=False)
    assert Transport.from_environment({"WS_GYM_COMPACT": " Off "}).compact is False
    assert Transport.from_environment({"WS_GYM_UNIX": "yes"}).unix is True
    with pytest.raises(TypeError, match="transport"):
        gym.make_vec("ws_gym/Remote-v0", num_envs=1, env_id="CartPole-v1", port=0, transport="fast")


@pytest.mark.skipif(sys.platform == "win32", reason="Unix sockets are POSIX only; Windows uses TCP")
@pytest.mark.parametrize("unix", [True, False])
def test_local_workers_use_a_private_unix_socket(monkeypatch, unix):
    envs = gym.make_vec("ws_gym/Remote-v0", num_envs=4, env_id="CartPole-v1", port=0, local_workers=2,
                        transport=Transport(unix=unix))
    try:
        # Frames from workers on the private socket are masked with the zero key, which the
        # trainer's parser does not XOR (frames.ZERO_KEY); over TCP each has a random key.
        unmasked = []
        real_mask = F.mask
        monkeypatch.setattr(F, "mask", lambda data, key, **kw: unmasked.append(key) or real_mask(data, key, **kw))
        run_and_compare(envs)
        path = envs._trainer.server.unix_path
        socknames = [c.transport.get_extra_info("sockname") for c in envs._trainer.table.conns]
        if unix:
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
# requests itself unless its Transport says direct=False. Every mix must give the same results.
@pytest.mark.parametrize("worker_wire, direct", [("1", "1"), ("0", "1"), ("1", "0"), ("0", "0")])
def test_frame_layer_and_its_fallbacks(cli_workers, worker_wire, direct):
    envs = gym.make_vec("ws_gym/Remote-v0", num_envs=4, env_id="CartPole-v1", port=0,
                        transport=Transport(direct=direct == "1"))
    try:
        procs = [cli_workers.start("--url", envs.url, "--num-envs", "2", "--log-level", "DEBUG",
                                   env={"WS_GYM_WIRE": worker_wire}) for _ in range(2)]
        run_and_compare(envs)
        conns = envs._trainer.table.ordered_all()
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
