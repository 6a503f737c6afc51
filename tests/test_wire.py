"""The frame layer on real sockets: FrameConnection over a socket pair, and big
messages through a trainer and its workers (writes the socket cannot take at
once, payloads that arrive in many reads)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
import threading

import gymnasium as gym
import numpy as np
import pytest

import ws_gym  # noqa: F401  (registers ws_gym/Remote-v0)
from ws_gym.config import Transport
from ws_gym import frames as F
from ws_gym import loops
from ws_gym.wire import FrameConnection, FrameState

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="direct writes are POSIX only")


class _Sink(asyncio.Protocol):
    """A placeholder protocol: FrameConnection.take_over replaces it."""


def _read_frames(sock: socket.socket, parser: F.FrameParser, want: int, timeout: float = 20.0) -> list:
    sock.settimeout(timeout)
    got: list = []
    while len(got) < want:
        data = sock.recv(1 << 20)
        if not data:
            break
        got += [(op, bytes(p)) for op, p in parser.feed(data)]
    return got


@contextlib.contextmanager
def _small_buffered_direct_connection(*, client: bool, mask_key: bytes | None = None):
    """A FrameConnection with direct writes on a socket pair whose buffers hold
    8 KB, on a loop in its own thread: yields (loop, conn, peer, flushes), where
    ``flushes`` counts the loop's writes of what the socket could not take at once."""
    loop = loops.new_event_loop()
    ours, peer = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)  # fill it quickly
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        async def setup():
            transport, _ = await loop.connect_accepted_socket(_Sink, ours)
            conn, _ = FrameConnection.take_over(transport, client=client, max_size=1 << 30,
                                                on_message=lambda data: None, loop=loop)
            conn.mask_key = mask_key
            assert conn.enable_direct()
            return conn

        conn = asyncio.run_coroutine_threadsafe(setup(), loop).result(10)
        flushes: list = []
        flush = conn._flush_queued
        conn._flush_queued = lambda: (flushes.append(1), flush())
        yield loop, conn, peer, flushes
        asyncio.run_coroutine_threadsafe(_call(conn.abort), loop).result(10)  # the loop owns the transport
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        peer.close()


@posix_only
def test_writes_from_a_thread_and_from_the_loop_keep_their_order():
    """send_from_thread (caller's thread) and the loop's own writes (pings) share
    one socket: every frame must arrive whole, in the order each side wrote it,
    also when the socket buffer fills and the overflow goes through the loop."""
    with _small_buffered_direct_connection(client=False) as (loop, conn, peer, flushes):
        sizes = [10, 70_000, 5, 300_000, 126, 65_536, 1] * 6
        payloads = [bytes([i % 251]) * n for i, n in enumerate(sizes)]

        def pings():
            for i in range(40):
                conn.ping(str(i).encode())

        rounds = len(range(0, len(payloads), 7))
        results: list = []
        reader = threading.Thread(target=lambda: results.extend(
            _read_frames(peer, F.FrameParser(max_size=1 << 30, masked=False), len(payloads) + 40 * rounds)))
        reader.start()
        for i, payload in enumerate(payloads):
            conn.send_from_thread(payload)
            if i % 7 == 0:
                loop.call_soon_threadsafe(pings)
        reader.join(30)
        assert not reader.is_alive()
        binary = [p for op, p in results if op == F.OP_BINARY]
        pinged = [p for op, p in results if op == F.OP_PING]
        assert flushes, "the socket took everything at once: the overflow path was not tried"
        assert binary == payloads  # whole and in order, big ones included
        assert pinged == [str(i).encode() for _ in range(rounds) for i in range(40)]  # whole, in order
        asyncio.run_coroutine_threadsafe(asyncio.sleep(0), loop).result(5)


async def _server_side(loop, ours: socket.socket) -> FrameConnection:
    """A trainer-side FrameConnection on our end of a socket pair."""
    transport, _ = await loop.connect_accepted_socket(_Sink, ours)
    conn, _ = FrameConnection.take_over(transport, client=False, max_size=1000,
                                        on_message=lambda data: None, loop=loop)
    return conn


def _read_to_end(peer: socket.socket) -> bytes:
    """What the peer receives until the stream ends (bounded by its timeout)."""
    peer.settimeout(5)
    data = b""
    while chunk := peer.recv(4096):
        data += chunk
    return data


def test_a_closed_connection_refuses_writes_and_the_peer_sees_the_end():
    loop = loops.new_event_loop()
    ours, peer = socket.socketpair()
    try:
        async def run():
            conn = await _server_side(loop, ours)
            conn.enable_direct()
            assert conn.state is FrameState.OPEN and not conn.close_sent and not conn.ended
            conn.close(F.CLOSE_GOING_AWAY, "bye")
            assert conn.state is FrameState.CLOSE_SENT and conn.close_sent and not conn.ended
            with pytest.raises(ConnectionResetError):
                conn.send(b"late")
            with pytest.raises(ConnectionResetError):
                conn.send_from_thread(b"late")
            await asyncio.wait_for(asyncio.wait([conn.done]), 5)
            return conn

        loop.run_until_complete(run())
        data = _read_to_end(peer)  # the close frame, then the end of the stream: no descriptor left open
        (op, payload), = F.FrameParser(max_size=1000, masked=False).feed(data)
        assert op == F.OP_CLOSE and F.parse_close(payload) == (1001, "bye")
    finally:
        loop.close()
        peer.close()


@pytest.mark.parametrize("payload, code", [
    ((1005).to_bytes(2, "big"), F.CLOSE_PROTOCOL_ERROR),  # a code for local use only: not echoed
    (b"\x03", F.CLOSE_PROTOCOL_ERROR),  # one byte
    ((1000).to_bytes(2, "big") + b"\xff", F.CLOSE_INVALID_DATA),  # a reason that is not UTF-8
    ((4001).to_bytes(2, "big") + b"ok", 4001),  # a valid code is echoed
])
def test_a_peers_close_frame_is_checked_before_it_is_answered(payload, code):
    loop = loops.new_event_loop()
    ours, peer = socket.socketpair()
    try:
        async def run():
            conn = await _server_side(loop, ours)
            peer.sendall(b"".join(F.frame(F.OP_CLOSE, payload, masked=True)))
            await asyncio.wait_for(asyncio.wait([conn.done]), 5)
            return conn

        conn = loop.run_until_complete(run())
        data = _read_to_end(peer)
        (op, answer), = F.FrameParser(max_size=1000, masked=False).feed(data)
        assert op == F.OP_CLOSE and F.parse_close(answer)[0] == code
        if code == 4001:  # the peer's half ended, and ours answered it
            assert conn.state is FrameState.CLOSED and conn.ended and conn.close_sent
            assert conn.done.result() == (4001, "ok")
        else:
            assert isinstance(conn.done.exception(), F.FrameError)
    finally:
        loop.close()
        peer.close()


def test_big_messages_both_ways_through_workers():
    """Megabytes in a request and in the reply: writes the socket cannot take at
    once (direct writes overflow into the loop) and payloads spread over many
    reads (the parser fills, then unmasks, one buffer)."""
    envs = gym.make_vec("ws_gym/Remote-v0", num_envs=4, env_id="tests.envs:Fancy-v0", port=0, local_workers=2)
    try:
        envs.reset(seed=0)
        rng = np.random.default_rng(0)
        blobs = [rng.integers(0, 255, size=3_000_000 + i, dtype=np.uint8) for i in range(4)]
        envs.set_attr("blob", blobs)
        back = envs.get_attr("blob")
        assert len(back) == 4
        for got, sent in zip(back, blobs):
            np.testing.assert_array_equal(got, sent)
        obs, *_ = envs.step(envs.action_space.sample())  # and stepping goes on
        assert envs.observation_space.contains(obs)
    finally:
        envs.close()


@posix_only
def test_a_message_in_pieces_arrives_as_it_was_when_sent():
    """send() of a tuple (a big compact reply's pieces, one of them a view of an
    array the env will overwrite): what the socket does not take at once is
    queued as a copy, so changing the array afterwards changes nothing sent."""
    with _small_buffered_direct_connection(client=True, mask_key=F.ZERO_KEY) as (loop, conn, peer, flushes):
        frames = np.arange(3 * 300_000, dtype=np.uint32).reshape(3, -1)  # the "env's" buffer
        sent = []
        for i in range(3):
            pieces = (b"head%d" % i, memoryview(frames[i]).cast("B"), b"tail")
            sent.append(b"".join(bytes(p) for p in pieces))
            asyncio.run_coroutine_threadsafe(_call(conn.send, pieces), loop).result(10)  # on the loop, as a worker does
            frames[i] = 7  # the next step overwrites the buffer at once
        got = _read_frames(peer, F.FrameParser(max_size=1 << 30, masked=True), 3)
        assert flushes, "the socket took everything at once: the overflow path was not tried"
        assert [p for _, p in got] == sent


async def _call(fn, *args):
    return fn(*args)


def test_big_compact_frames_through_workers_equal_sync_vector_env(monkeypatch):
    """Observations of 36 KB per worker and step go compact, the workers sending
    them in pieces; each step's frames differ, so a stale or torn buffer shows."""
    from .conftest import assert_same

    ref = gym.make_vec("tests.envs:Frames-v0", 6, vectorization_mode="sync", shape=(64, 64, 3))
    envs = gym.make_vec("ws_gym/Remote-v0", num_envs=6, env_id="tests.envs:Frames-v0", port=0,
                        local_workers=2, env_kwargs={"shape": [64, 64, 3]}, transport=Transport())
    try:
        assert_same(envs.reset(seed=2), ref.reset(seed=2))
        conns = envs.unwrapped._trainer.serving()
        assert all(c.codec.layout is not None and c.codec.layout.big for c in conns)
        copied = []
        for conn in conns:
            real = conn.codec.layout.copy_reply
            conn.codec.layout.copy_reply = lambda *a, real=real: copied.append(1) or real(*a)
        rng = np.random.default_rng(3)
        for _ in range(40):
            actions = rng.integers(0, 256, 6)
            assert_same(envs.step(actions), ref.step(actions))
        assert len(copied) >= 2 * 30  # compact, straight into the batch (episode ends carry no infos here)
    finally:
        envs.close()
        ref.close()
