"""Busy polling: the caller's thread reads its replies itself and local workers
read on for a moment after each reply (ws_gym/wire.py). Results must equal the
loop's reading, and losses, timeouts, heartbeats and late replies must behave
as they do without it."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import threading
import time

import gymnasium as gym
import numpy as np
import pytest

import ws_gym
from ws_gym import frames as F
from ws_gym import loops
from ws_gym.calls import CallBook
from ws_gym.config import busy_poll_wanted
from ws_gym.config import Transport
from ws_gym.polling import SpinPolicy
from ws_gym.wire import FrameConnection

from .conftest import assert_same
from .test_lost_workers import COUNTER, holes, wait_until
from .test_transport import run_and_compare

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="busy polling is POSIX only")


# ----------------------------------------------------------- when it is on (pure)


def test_busy_poll_is_chosen_with_local_workers_whatever_the_cores():
    """The spin adapts (ws_gym.polling.SpinPolicy): the default counts no
    cores, as it stops spinning by itself where a core is not spare."""
    on_posix = os.name == "posix"
    assert busy_poll_wanted(None, 1, "sync", tls=False) is on_posix
    assert busy_poll_wanted(None, 3, "sync", tls=False) is on_posix  # more workers than spare cores too
    assert busy_poll_wanted(None, 4, "sync", tls=False) is on_posix
    assert busy_poll_wanted(None, 0, "sync", tls=False) is False  # remote workers only: ask for it
    assert busy_poll_wanted(None, 1, "async", tls=False) is False  # the envs' subprocesses need the cores
    assert busy_poll_wanted(None, 1, "sync", tls=True) is False  # TLS: the loop decrypts
    assert busy_poll_wanted(True, 0, "sync", tls=False) is on_posix
    assert busy_poll_wanted(False, 1, "sync", tls=False) is False
    assert busy_poll_wanted(True, 1, "sync", tls=True) is False
    with pytest.raises(TypeError, match="busy_poll"):
        busy_poll_wanted("yes", 1, "sync", tls=False)


def test_the_busy_poll_switch_forces_it_either_way():
    assert Transport.from_environment({"WS_GYM_BUSY_POLL": "0"}).busy_poll is False
    assert Transport.from_environment({"WS_GYM_BUSY_POLL": "1"}).busy_poll is True
    assert Transport.from_environment({}).busy_poll is None
    forced = Transport(busy_poll=True).resolve(tls=False, local_workers=0, busy_poll=False)
    assert forced.busy_poll is (os.name == "posix")
    assert Transport(busy_poll=False).resolve(tls=False, local_workers=1, busy_poll=True).busy_poll is False


# ------------------------------------------------------ a polled FrameConnection


class _Sink(asyncio.Protocol):
    """A placeholder protocol: FrameConnection.take_over replaces it."""


@posix_only
def test_a_polled_connection_is_read_by_the_polling_thread():
    """After claim_reading the loop reads nothing: poll_read, from another
    thread, handles binary messages there and hands pings and the close to the
    loop, which answers them."""
    loop = loops.new_event_loop()
    ours, peer = socket.socketpair()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    seen: list = []
    try:
        async def setup():
            transport, _ = await loop.connect_accepted_socket(_Sink, ours)
            conn, _ = FrameConnection.take_over(
                transport, client=False, max_size=1 << 20, loop=loop,
                on_message=lambda data: seen.append((threading.current_thread().name, bytes(data))))
            assert conn.enable_direct() and conn.claim_reading()
            return conn

        conn = asyncio.run_coroutine_threadsafe(setup(), loop).result(10)
        for payload in (b"one", b"x" * 70_000):
            peer.sendall(b"".join(F.frame(F.OP_BINARY, payload, masked=True)))
        peer.sendall(b"".join(F.frame(F.OP_PING, b"hi", masked=True)))
        # the loop reads nothing by itself now: the data waits for poll_read
        assert not asyncio.run_coroutine_threadsafe(_is_reading(conn), loop).result(10)
        me = threading.current_thread().name
        deadline = time.monotonic() + 10
        while len(seen) < 2 and time.monotonic() < deadline:
            with conn.rlock:
                conn.poll_read()
        assert seen == [(me, b"one"), (me, b"x" * 70_000)]
        parser = F.FrameParser(max_size=1 << 20, masked=False)
        peer.settimeout(10)
        assert parser.feed(peer.recv(100)) == [(F.OP_PONG, b"hi")]  # answered by the loop
        peer.sendall(b"".join(F.frame(F.OP_CLOSE, F.close_payload(1000, "bye"), masked=True)))
        while not conn.ended and time.monotonic() < deadline:
            with conn.rlock:
                conn.poll_read()
        assert conn.ended and conn.poll_read() is None
        assert asyncio.run_coroutine_threadsafe(asyncio.wait_for(asyncio.shield(conn.done), 10), loop).result(15) \
            == (1000, "bye")
        got = []
        while True:  # our close frame, then the end of the stream
            data = peer.recv(100)
            if not data:
                break
            got += parser.feed(data)
        assert got == [(F.OP_CLOSE, F.close_payload(1000))]
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        peer.close()


async def _is_reading(conn: FrameConnection) -> bool:
    return conn.transport.is_reading()


@posix_only
def test_a_worker_stops_spinning_after_replies_when_requests_come_slowly():
    """A worker's read-on after each message (poll_after) is adaptive: when
    the next message never comes within the spin, the connection's SpinPolicy
    does not spin (its probe of spinning loses), and every message is still
    handled."""
    loop = loops.new_event_loop()
    ours, peer = socket.socketpair()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    seen: list = []
    try:
        async def setup():
            transport, _ = await loop.connect_accepted_socket(_Sink, ours)
            conn, _ = FrameConnection.take_over(transport, client=False, max_size=1 << 20, loop=loop,
                                                on_message=lambda data: seen.append(bytes(data)))
            assert conn.enable_direct()
            conn.poll_after = 0.0005
            return conn

        conn = asyncio.run_coroutine_threadsafe(setup(), loop).result(10)
        count = 3 * SpinPolicy.BLOCK  # a block spinning (missed), then off, and on
        for i in range(count):
            peer.sendall(b"".join(F.frame(F.OP_BINARY, b"%d" % i, masked=True)))
            time.sleep(0.003)  # long past the spin
        wait_until(lambda: len(seen) == count, 10, "the messages to be handled")
        policy = conn._spin
        assert policy is not None and policy.limit == 0.0005
        assert policy.switches == 1, policy  # it spun first, every spin missed: off after one block
        assert policy.spin == 0.0 or policy._probing, policy  # it spins at most in a probe
        assert seen == [b"%d" % i for i in range(count)]
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        peer.close()


# ------------------------------------------------------------------ end to end


@pytest.fixture
def reply_threads(monkeypatch):
    """The names of the threads that handled the trainer's replies."""
    names: list[str] = []
    original = CallBook.on_reply

    def on_reply(self, conn, data):
        names.append(threading.current_thread().name)
        return original(self, conn, data)

    monkeypatch.setattr(CallBook, "on_reply", on_reply)
    return names


@posix_only
@pytest.mark.parametrize("busy_poll", [True, False])
def test_polled_steps_equal_sync_vector_env(monkeypatch, reply_threads, busy_poll):
    monkeypatch.delenv("WS_GYM_BUSY_POLL", raising=False)
    envs = gym.make_vec("ws_gym/Remote-v0", num_envs=4, env_id="CartPole-v1", port=0, local_workers=2,
                        busy_poll=busy_poll)
    try:
        trainer = envs.unwrapped._trainer
        assert trainer.busy_poll is busy_poll
        assert all(("--busy-poll" in cmd) is busy_poll for cmd in trainer.local._cmds)
        run_and_compare(envs)
        conns = trainer.table.ordered_all()
        assert len(conns) == 2
        for conn in conns:
            assert conn.wire.polled is busy_poll
            assert conn.transport.is_reading() is not busy_poll  # a polled socket: the loop reads nothing
        steps = [name for name in reply_threads[-120:]]  # the 60 steps' replies, two workers each
        assert set(steps) == ({"MainThread"} if busy_poll else {"ws_gym-trainer-loop"}), set(steps)
    finally:
        envs.close()


@posix_only
def test_a_single_polled_env_equals_the_env_in_process():
    env = gym.make("ws_gym/Remote-v0", env_id="CartPole-v1", port=0, local_workers=1, busy_poll=True)
    ref = gym.make("CartPole-v1")
    try:
        assert env.unwrapped._trainer.busy_poll
        assert_same(env.reset(seed=3), ref.reset(seed=3), "reset")
        rng = np.random.default_rng(1)
        for t in range(300):
            a = int(rng.integers(0, 2))
            got, want = env.step(a), ref.step(a)
            assert_same(got, want, f"step {t}")
            if want[2] or want[3]:
                assert_same(env.reset(), ref.reset(), f"reset after step {t}")
    finally:
        env.close()
        ref.close()


@posix_only
def test_polled_calls_wait_out_a_slow_step_and_time_out(cli_workers):
    """A step slower than the spin waits in poll(); one slower than the timeout
    raises StepTimeoutError, and its late reply, read between calls, is dropped."""
    envs = ws_gym.RemoteVectorEnv(2, env_id=COUNTER, port=0, busy_poll=True, step_timeout=20,
                                  connect_timeout=60)
    try:
        for _ in range(2):
            cli_workers.start("--url", envs.url, "--env", COUNTER, "--busy-poll", "300")
        envs.reset(seed=0)
        conns = envs._trainer.table.ordered_all()
        assert len(conns) == 2 and all(c.wire.polled for c in conns)
        t0 = time.monotonic()
        obs, *_ = envs.step(np.array([3, 0]))  # 3 s: long past the spin
        assert 2.5 < time.monotonic() - t0 < 15
        assert obs.tolist() == [[1, 1], [1, 1]]
        envs.step_async(np.array([0, 3]))
        with pytest.raises(ws_gym.StepTimeoutError):
            envs.step_wait(timeout=0.5)
        wait_until(lambda: not any(c.pending for c in conns), 10, "the timed-out call to be abandoned")
        obs, *_ = envs.step(np.array([0, 0]))  # waits behind the slow step; the late reply is ignored
        assert obs.tolist() == [[3, 3], [3, 3]]
    finally:
        envs.close()


@posix_only
def test_a_worker_lost_during_a_polled_call_fails_it_at_once(cli_workers):
    envs = ws_gym.RemoteVectorEnv(2, env_id=COUNTER, port=0, busy_poll=True, step_timeout=30,
                                  connect_timeout=60)
    try:
        for _ in range(2):
            cli_workers.start("--url", envs.url, "--env", COUNTER)
        envs.reset(seed=0)
        t0 = time.monotonic()
        with pytest.raises(ws_gym.WorkerLostError, match="during a call"):
            envs.step(np.array([1, 3]))  # worker 0 exits mid-step; worker 1 is still busy for 3 s
        assert time.monotonic() - t0 < 2.5
        with pytest.raises(ws_gym.WorkerLostError, match="no worker"):
            envs.step(np.array([0, 0]))
    finally:
        envs.close()


@posix_only
def test_a_polled_worker_that_goes_away_between_calls_is_noticed(cli_workers):
    envs = ws_gym.RemoteVectorEnv(2, env_id=COUNTER, port=0, busy_poll=True, heartbeat=None,
                                  connect_timeout=60)
    try:
        proc = cli_workers.start("--url", envs.url, "--env", COUNTER, "--num-envs", "2")
        envs.reset(seed=0)
        envs.step(np.zeros(2, dtype=np.int64))
        proc.kill()
        took = wait_until(lambda: holes(envs), 10, "the idle reads to see the end of the stream")
        assert took < 5
        with pytest.raises(ws_gym.WorkerLostError, match="no worker"):
            envs.step(np.zeros(2, dtype=np.int64))
    finally:
        envs.close()


@posix_only
def test_heartbeats_are_answered_while_a_polled_trainer_is_idle(cli_workers):
    """Between calls nobody waits on the socket: the loop's idle reads must
    still take the workers' pongs, or the heartbeat would cut them off."""
    envs = ws_gym.RemoteVectorEnv(2, env_id=COUNTER, port=0, busy_poll=True, heartbeat=0.3,
                                  connect_timeout=60)
    try:
        cli_workers.start("--url", envs.url, "--env", COUNTER, "--num-envs", "2")
        envs.reset(seed=0)
        envs.step(np.zeros(2, dtype=np.int64))
        pinged = envs._trainer.table.ordered_all()[0]
        time.sleep(2.0)  # idle: several heartbeat rounds (the subject of the test, not a wait for it)
        assert pinged.alive and not holes(envs)
        assert envs.step(np.zeros(2, dtype=np.int64))[0].tolist() == [[2, 2], [2, 2]]
    finally:
        envs.close()


@posix_only
def test_a_flooding_worker_cannot_hold_a_polled_trainer(caplog):
    """A worker that sends replies nobody asked for, without pause: the caller's
    call still times out on time, the loop (which reads the connection between
    calls) stays responsive, and the log gets one line a second, not one a frame."""
    import logging

    import aiohttp

    from ws_gym import codec
    from ws_gym import protocol as P
    from ws_gym.host import EnvHost

    caplog.set_level(logging.WARNING, logger="ws_gym")
    envs = ws_gym.RemoteVectorEnv(1, env_id="CartPole-v1", port=0, busy_poll=True, step_timeout=1.0,
                                  connect_timeout=30)
    loop = loops.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    sent = [0]
    joined = threading.Event()

    async def flood():
        async with aiohttp.ClientSession() as session, session.ws_connect(envs.url) as ws:
            await ws.send_bytes(codec.encode(P.HELLO, 0, P.make_hello("CartPole-v1", 1, "flood")))
            welcome = codec.decode((await ws.receive(timeout=10)).data)
            host = EnvHost(P.parse_welcome(codec.writable(welcome.body)))
            await ws.send_bytes(codec.encode(P.READY, 0, host.ready_body()))
            assert codec.decode((await ws.receive(timeout=10)).data).kind == P.ACCEPT
            joined.set()
            junk = codec.encode(P.OK, 10**9, {"o": np.zeros((1, 4), np.float32)})
            while True:
                await ws.send_bytes(junk)
                sent[0] += 1

    started = time.monotonic()
    task = asyncio.run_coroutine_threadsafe(flood(), loop)
    try:
        assert joined.wait(20)
        t0 = time.monotonic()
        with pytest.raises(ws_gym.StepTimeoutError):
            envs.reset(seed=0)
        assert time.monotonic() - t0 < 5
        before = sent[0]
        pool_loop = envs._trainer.server._loop
        for _ in range(5):  # between calls the loop reads the flood, a bounded amount per round
            t0 = time.monotonic()
            asyncio.run_coroutine_threadsafe(asyncio.sleep(0), pool_loop).result(5)
            assert time.monotonic() - t0 < 2
        wait_until(lambda: sent[0] > before + 100, 10, "the flood to go on")  # it is being read
        took = time.monotonic() - started
        lines = [r for r in caplog.records if "answered unknown request" in r.getMessage()]
        assert sent[0] > 1000 and 1 <= len(lines) <= took + 2, (sent[0], len(lines), took)  # one a second
    finally:
        task.cancel()
        envs.close()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


@pytest.mark.parametrize("value", ["-5", "nan"])
def test_a_worker_refuses_a_bad_busy_poll(cli_workers, value):
    """Checked before the worker dials (port 9: nothing listens there)."""
    worker = cli_workers.start("--url", "ws://127.0.0.1:9/ws", "--busy-poll", value)
    code, out = cli_workers.finish(worker)
    assert code == 1 and "--busy-poll must be" in out, out
    with pytest.raises(TypeError, match="busy_poll"):
        ws_gym.RemoteVectorEnv(1, env_id="CartPole-v1", port=0, busy_poll="on")
