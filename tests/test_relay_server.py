"""The relay (``ws_gym.relay``) and its room rules (``ws_gym.rooms``).

The rules are tested without I/O. The relay runs for real on 127.0.0.1, on a
loop thread in this process (and once as ``python -m ws_gym.relay``), with a
fake trainer made of aiohttp's client (a control WebSocket; data connections
whose transport is taken over after ``go``, as the trainer's side does) and
fake workers on raw sockets or aiohttp's client. Every test fails on an
unexpected warning or error logged, on an exception nobody retrieved, and on
a task the relay leaves behind.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import gc
import hashlib
import json
import logging
import os
import re
import signal
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import aiohttp
import pytest

from ws_gym import frames as F
from ws_gym import loops
from ws_gym import relay as relay_mod
from ws_gym.relay import Relay
from ws_gym.rooms import (NO_TRAINER, NOT_TAKEN, Limits, Refused, Rooms, Throttle, bearer_token, rewrite_head, route,
                          valid_id)

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "trainer-token-for-tests"
LISTENING = re.compile(r"ws_gym relay: listening on (ws|wss)://(\S+):(\d+)")
GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

pytestmark = [pytest.mark.timeout(60),
              pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")]


# ----------------------------------------------------------------- rooms (no I/O)


def counter_secrets():
    """Deterministic ids and keys: a counter, padded to the id pattern."""
    n = iter(range(1, 10**6))
    return lambda nbytes: f"s{next(n):0{max(16, nbytes)}d}"


def rooms(**limits) -> Rooms:
    return Rooms(Limits(**limits), new_secret=counter_secrets())


def refused(fn, *args) -> tuple[int, str]:
    with pytest.raises(Refused) as info:
        fn(*args)
    return info.value.status, info.value.reason


def test_ids_and_tokens():
    assert valid_id("a" * 16) and valid_id("A-z_9" * 25) and valid_id("x" * 128)
    assert not any(valid_id(t) for t in ("a" * 15, "x" * 129, "a" * 15 + "/", "a" * 16 + "\n", None, 5))
    assert bearer_token("Bearer abc") == "abc" and bearer_token("bearer  abc ") == "abc"
    assert bearer_token("Basic abc") is None and bearer_token("Bearer") is None and bearer_token(None) is None


def test_a_new_room_and_its_reclaim():
    r = rooms(room_grace=60)
    room, reclaimed = r.open("t1", 0.0)
    assert not reclaimed and valid_id(room.id) and valid_id(room.key) and room.trainer == "t1"
    assert refused(r.open, "t2", 1.0, room.id, room.key) == (409, "this room's trainer is still connected")
    assert refused(r.open, "t2", 1.0, room.id, "k" * 20) == (409, "wrong key for this room")
    assert r.trainer_left(room, "someone else", 1.0) == [] and room.trainer == "t1"
    assert r.trainer_left(room, "t1", 2.0) == [] and room.trainer is None
    assert refused(r.open, "t2", 3.0, room.id, "k" * 20)[0] == 409  # reserved for its key
    again, reclaimed = r.open("t2", 61.9, room.id, room.key)
    assert again is room and reclaimed and room.trainer == "t2" and room.forget_at is None


def test_a_forgotten_room_is_opened_again_with_its_id_and_any_key():
    r = rooms(room_grace=5)
    room, _ = r.open("t1", 0.0)
    r.trainer_left(room, "t1", 10.0)
    assert r.expire(14.9) == [] and r.expire(15.0) == [room] and r.rooms == {}
    other, reclaimed = r.open("t2", 16.0, room.id, "another-key-of-16")
    assert reclaimed and other.id == room.id and other.key == "another-key-of-16"


def test_room_headers_are_checked():
    r = rooms()
    assert refused(r.open, "t", 0.0, "a" * 16, None)[0] == 400
    assert refused(r.open, "t", 0.0, None, "a" * 16)[0] == 400
    assert refused(r.open, "t", 0.0, "short", "a" * 16)[0] == 400
    assert refused(r.open, "t", 0.0, "a" * 16, "bad key with spaces")[0] == 400


def test_max_rooms_counts_rooms_in_their_grace():
    r = rooms(max_rooms=2, room_grace=10)
    a, _ = r.open("a", 0.0)
    r.open("b", 0.0)
    assert refused(r.open, "c", 0.0) == (503, "too many rooms (max 2)")
    assert refused(r.open, "c", 0.0, "c" * 16, "c" * 16)[0] == 503  # a reclaim the relay forgot: a new room
    r.trainer_left(a, "a", 1.0)
    assert refused(r.open, "c", 10.9)[0] == 503
    assert r.open("c", 11.0)[0].trainer == "c"  # a's grace is over


def test_workers_wait_are_taken_and_leave():
    r = rooms(max_room_connections=2, max_connections=10)
    room, _ = r.open("t", 0.0)
    assert refused(r.arrive, "x" * 16, "w", 0.0, 1) == (503, NO_TRAINER)
    assert refused(r.arrive, room.id, "w", 0.0, 1) == (503, NO_TRAINER)  # its trainer has no room message yet
    room.told = True
    r1, c1 = r.arrive(room.id, "w1", 0.0, 1)
    r2, c2 = r.arrive(room.id, "w2", 0.0, 2)
    assert r1 is r2 is room and c1 != c2 and valid_id(c1) and room.waiting == {c1: "w1", c2: "w2"}
    assert refused(r.arrive, room.id, "w3", 0.0, 3)[0] == 503  # the room is full
    assert refused(r.take, room.id, c1, "wrong-key-0000000") == (403, "wrong room key")
    assert refused(r.take, "y" * 16, c1, room.key)[0] == 404
    assert r.take(room.id, c1, room.key) == (room, "w1")
    assert refused(r.take, room.id, c1, room.key)[0] == 404  # taken already
    assert room.paired == {c1: "w1"} and room.connections == 2 and r.counts() == (1, 2)
    assert r.leave(room, c1) and not r.leave(room, c1) and room.connections == 1
    assert sorted(r.trainer_left(room, "t", 1.0)) == ["w2"] and room.connections == 0
    assert refused(r.arrive, room.id, "w4", 1.0, 1) == (503, NO_TRAINER)  # in its grace: no trainer
    assert refused(r.take, room.id, c2, room.key)[0] == 404
    assert r.open("t2", 2.0, room.id, room.key)[0] is room and not room.told  # told again once reclaimed


def test_max_connections_keeps_room_for_the_data_connection():
    r = rooms(max_connections=10)
    room, _ = r.open("t", 0.0)
    room.told = True
    r.arrive(room.id, "w", 0.0, 9)
    assert refused(r.arrive, room.id, "w", 0.0, 10) == (503, "too many connections (max 10)")


def test_limits_must_be_positive():
    with pytest.raises(ValueError):
        Limits(max_rooms=0)
    with pytest.raises(ValueError):
        Limits(room_grace=-1)


def test_throttle_one_line_a_second_per_kind():
    t = Throttle()
    assert t.allow("a", 0.0) == 0 and t.allow("b", 0.1) == 0
    assert t.allow("a", 0.5) is None and t.allow("a", 0.9) is None
    assert t.allow("a", 1.0) == 2 and t.allow("a", 1.5) is None and t.allow("b", 1.2) == 0


def test_routes_by_the_end_of_the_path():
    assert route("/trainer") == route("/gym/trainer") == ("trainer", ())
    assert route("/room/abc/ws") == route("/a/b/room/abc/ws") == ("worker", ("abc",))
    assert route("/gym/room/abc/accept/def") == ("accept", ("abc", "def"))
    assert route("/") == route("/gym/") == ("page", ())
    assert route("/gym") == route("/room/a/b/ws") == route("/room//ws") == route("/trainer/x") == ("", ())


def test_the_head_is_rewritten_as_a_proxy_would():
    head = rewrite_head("/gym/room/abc/ws?token=x&a=%20b", [(b"Host", b"relay"), (b"X-Forwarded-For", b"1.2.3.4"),
                                                          (b"Upgrade", b"websocket")], "5.6.7.8")
    assert head == (b"GET /ws?token=x&a=%20b HTTP/1.1\r\nHost: relay\r\nUpgrade: websocket\r\n"
                    b"X-Forwarded-For: 1.2.3.4, 5.6.7.8\r\n\r\n")
    assert rewrite_head("/room/abc/ws", [], "::1") == b"GET /ws HTTP/1.1\r\nX-Forwarded-For: ::1\r\n\r\n"
    assert rewrite_head("/room/abc/ws?", [], None).startswith(b"GET /ws? HTTP/1.1\r\n")


# ----------------------------------------------------------------- the relay, for real


class Watch(logging.Handler):
    """Every record of WARNING and above, from any logger and thread."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def unexpected(self) -> list[str]:
        """Anything but the relay's own refusal warnings."""
        return [f"{r.name} {r.levelname}: {r.getMessage()}" for r in self.records
                if not (r.name.startswith("ws_gym.relay") and r.levelno == logging.WARNING)]

    def relay_warnings(self) -> list[str]:
        return [r.getMessage() for r in self.records if r.name.startswith("ws_gym.relay")]


class Relays:
    """Relays on one loop thread; all closed at teardown, which checks that
    nothing was left running and nothing unexpected was logged."""

    def __init__(self, watch: Watch) -> None:
        self.watch = watch
        self.loop = loops.new_event_loop()  # uvloop's where installed, as the CLI runs
        self.thread = threading.Thread(target=self.loop.run_forever, name="relay-loop", daemon=True)
        self.thread.start()
        self.relays: list[Relay] = []

    def call(self, coro, timeout: float = 20.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self, prefix: str = "", **kwargs) -> tuple[Relay, str]:
        kwargs.setdefault("limits", Limits(room_grace=60))
        relay = Relay(TOKEN, host="127.0.0.1", port=0, **kwargs)
        self.call(relay.start())
        self.relays.append(relay)
        return relay, f"{'https' if relay.ssl_context else 'http'}://127.0.0.1:{relay.port}{prefix}"

    def close(self) -> None:
        try:
            for relay in self.relays:  # every connection ended, aiohttp's cleanup included
                run(until(lambda relay=relay: relay.open_connections() == 0))
                self.call(relay.close())

            async def others():
                await asyncio.sleep(0)
                return [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]

            left = self.call(others())
            assert left == [], f"tasks left running: {left}"
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()
        gc.collect()  # "Task exception was never retrieved" is logged when the task is collected
        assert self.watch.unexpected() == []


@pytest.fixture
def watch():
    handler = Watch()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)


@pytest.fixture
def relays(watch):
    r = Relays(watch)
    try:
        yield r
    finally:
        r.close()


def run(coro, timeout: float = 30.0):
    """Run a client scenario on a fresh loop in this thread, bounded."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def until(condition, timeout: float = 5.0) -> None:
    """Poll a condition on the relay's state (read from this thread), bounded."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


def auth(token: str = TOKEN) -> dict:
    return {"Authorization": f"Bearer {token}"}


class TrainerEnd(asyncio.Protocol):
    """The trainer's end of a data connection, taken over after ``go``: reads
    the worker's head, answers it, then echoes every byte back (with flow
    control, as the trainer's own server would apply)."""

    def __init__(self, answer=None) -> None:
        loop = asyncio.get_running_loop()
        self.head: asyncio.Future = loop.create_future()
        self.lost: asyncio.Future = loop.create_future()
        self.answer = answer or (lambda head: b"HTTP/1.1 101 Switching Protocols\r\nX-Fake: trainer\r\n\r\n")
        self.buffer = b""
        self.received = 0  # bytes after the head
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if not self.head.done():
            self.buffer += data
            if b"\r\n\r\n" not in self.buffer:
                return
            head, _, data = self.buffer.partition(b"\r\n\r\n")
            self.head.set_result(head.decode("latin-1"))
            self.transport.write(self.answer(head))
        if data:
            self.received += len(data)
            self.transport.write(data)

    def pause_writing(self) -> None:
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.transport.resume_reading()

    def connection_lost(self, exc) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


class FakeTrainer:
    """The trainer's side of the contract, with aiohttp's client."""

    def __init__(self, session: aiohttp.ClientSession, base: str, ssl_ctx=None) -> None:
        self.session, self.base, self.ssl = session, base, ssl_ctx
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.room = self.key = ""
        self.ends: list[tuple] = []

    async def connect(self, room: str | None = None, key: str | None = None, token: str = TOKEN,
                      **kwargs) -> FakeTrainer:
        headers = auth(token)
        if room is not None:
            headers["X-WS-Gym-Room"] = room
        if key is not None:
            headers["X-WS-Gym-Room-Key"] = key
        if self.ssl is not None:
            kwargs["ssl"] = self.ssl
        self.ws = await self.session.ws_connect(self.base.replace("http", "ws", 1) + "/trainer", headers=headers,
                                                **kwargs)
        msg = await self.ws.receive(timeout=5)
        hello = json.loads(msg.data)
        assert hello["type"] == "room" and set(hello) == {"type", "room", "key"}
        self.room, self.key = hello["room"], hello["key"]
        return self

    async def next_open(self) -> str:
        msg = await self.ws.receive(timeout=5)
        assert msg.type is aiohttp.WSMsgType.TEXT, msg
        opened = json.loads(msg.data)
        assert opened["type"] == "open" and set(opened) == {"type", "id"}
        return opened["id"]

    async def accept(self, conn_id: str, answer=None, key: str | None = None) -> TrainerEnd:
        ws = await self.session.ws_connect(f"{self.base}/room/{self.room}/accept/{conn_id}",
                                           headers={"X-WS-Gym-Room-Key": key or self.key},
                                           **({"ssl": self.ssl} if self.ssl is not None else {}))
        transport = ws._conn.transport  # as ws_gym/worker_links.py takes a connection over
        end = TrainerEnd(answer)
        previous = transport.get_protocol()
        transport.set_protocol(end)  # before `go`: the head that answers it must reach us
        end.connection_made(transport)
        transport.write(b"".join(F.frame(F.OP_BINARY, b"go", masked=True)))
        self.ends.append((end, transport, previous, ws))  # ws kept: collected, it would close the connection
        return end

    async def close(self) -> None:
        for end, transport, previous, _ in self.ends:
            transport.close()
            await end.lost
            relay_mod.hand_back(transport, previous)  # aiohttp's client cleans up as after a disconnect
        if self.ws is not None:
            await self.ws.close()


async def worker_request(base: str, room: str, *, headers: bytes = b"", query: str = "?token=abc",
                         ssl_ctx=None, wait: bool = True):
    """A worker's upgrade request on a raw socket: (status, head, reader, writer),
    or the task that gets them (``wait=False``: the relay holds the request)."""
    host, port = base.split("//")[1].split("/")[0].split(":")
    prefix = "/" + base.split("//")[1].partition("/")[2] if "/" in base.split("//")[1] else ""

    async def go():
        reader, writer = await asyncio.open_connection(host, int(port), ssl=ssl_ctx)
        writer.write(f"GET {prefix.rstrip('/')}/room/{room}/ws{query} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                     "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                     "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n".encode() + headers + b"\r\n")
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        return int(head.split()[1]), head, reader, writer

    task = asyncio.ensure_future(go())
    return await task if wait else task


async def refused_worker(base: str, room: str) -> tuple[int, str]:
    status, head, _, writer = await worker_request(base, room)
    writer.close()
    return status, head.split("\r\n")[0]


async def pair(trainer: FakeTrainer, **kwargs):
    """A worker paired with the trainer: (trainer end, reader, writer) after the 101."""
    task = await worker_request(trainer.base, trainer.room, wait=False, **kwargs)
    end = await trainer.accept(await trainer.next_open())
    status, head, reader, writer = await task
    assert status == 101 and "X-Fake: trainer" in head
    return end, reader, writer


async def echoed(reader, writer, payload: bytes) -> bytes:
    writer.write(payload)
    got, _ = await asyncio.gather(reader.readexactly(len(payload)), writer.drain())
    return got


def test_pairing_forwards_bytes_exactly_both_ways(relays, monkeypatch):
    pauses = []
    original = relay_mod._End.pause_writing
    monkeypatch.setattr(relay_mod._End, "pause_writing", lambda self: (pauses.append(1), original(self)))
    relay, base = relays.start()

    async def scenario():
        async with aiohttp.ClientSession() as session:
            trainer = await FakeTrainer(session, base).connect()
            end, reader, writer = await pair(trainer, headers=b"X-Forwarded-For: 10.0.0.1\r\nX-Other: 1\r\n")
            head = (await end.head).split("\r\n")
            assert head[0] == "GET /ws?token=abc HTTP/1.1"
            assert "X-Other: 1" in head and head[-1] == "X-Forwarded-For: 10.0.0.1, 127.0.0.1"
            assert f"Host: 127.0.0.1:{relay.port}" in head and "Upgrade: websocket" in head
            assert await echoed(reader, writer, b"small") == b"small"
            big = os.urandom(8 * 1024 * 1024)
            assert await echoed(reader, writer, big) == big
            # the trainer sends more than the sockets' buffers hold while the worker reads
            # nothing: the relay's buffer fills and it stops reading the trainer
            writer.transport.pause_reading()
            huge = os.urandom(24 * 1024 * 1024)
            end.transport.write(huge)
            await until(lambda: pauses)
            writer.transport.resume_reading()
            assert await asyncio.wait_for(reader.readexactly(len(huge)), 20) == huge
            async with session.get(base + "/") as page:
                assert page.status == 200 and await page.text() == "ws_gym relay: 1 rooms, 1 connections\n"
            writer.close()
            assert await asyncio.wait_for(end.lost, 5) is None  # the worker left: the trainer's end closed
            assert end.received == 5 + len(big)  # not a byte more: aiohttp wrote nothing into the splice
            # the other way round: the trainer's end says bye and closes; the worker gets exactly that
            end, reader, writer = await pair(trainer)
            end.transport.write(b"bye")
            end.transport.close()
            assert await asyncio.wait_for(reader.read(), 5) == b"bye"
            writer.close()
            await trainer.close()

    run(scenario())


def test_a_real_websocket_client_through_the_relay_behind_a_prefix(relays):
    """aiohttp's own WebSocket client as the worker: its handshake is answered
    by the trainer's end, through the splice, under a proxy's path prefix."""
    relay, base = relays.start(prefix="/gym")

    def accept(head: bytes) -> bytes:
        key = re.search(rb"Sec-WebSocket-Key: (\S+)", head, re.I).group(1)
        digest = base64.b64encode(hashlib.sha1(key + GUID.encode()).digest())
        return (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Accept: " + digest + b"\r\n\r\n" + b"".join(F.frame(F.OP_BINARY, b"welcome")))

    async def scenario():
        async with aiohttp.ClientSession() as session:
            trainer = await FakeTrainer(session, base).connect()
            url = base.replace("http", "ws", 1) + f"/room/{trainer.room}/ws?x=1"
            connecting = asyncio.ensure_future(session.ws_connect(url, headers={"X-WS-Gym-Token": "t"}))
            end = await trainer.accept(await trainer.next_open(), answer=accept)
            ws = await connecting
            assert (await ws.receive(timeout=5)).data == b"welcome"
            head = await end.head
            assert head.startswith("GET /ws?x=1 HTTP/1.1\r\n") and "X-WS-Gym-Token: t" in head
            await ws.close()  # its close frame is echoed back by the trainer's end: a clean close
            await asyncio.wait_for(end.lost, 5)
            await trainer.close()
            for path in ("/gym/", "/"):
                async with session.get(f"http://127.0.0.1:{relay.port}{path}") as page:
                    assert page.status == 200 and "ws_gym relay:" in await page.text()
            for path in ("/gym", "/gym/nope", "/room/x/ws/extra"):
                async with session.get(f"http://127.0.0.1:{relay.port}{path}") as page:
                    assert page.status == 404

    run(scenario())


def test_trainer_token_and_room_keys(relays, watch):
    relay, base = relays.start()

    async def scenario():
        async with aiohttp.ClientSession() as session:
            for headers in ({}, auth("wrong"), {"Authorization": TOKEN}):
                with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                    await session.ws_connect(base + "/trainer", headers=headers)
                assert info.value.status == 401
            trainer = await FakeTrainer(session, base).connect()
            for room, key, status in ((trainer.room, "x" * 16, 409), (trainer.room, trainer.key, 409),
                                      ("bad id", "x" * 16, 400), (trainer.room, None, 400)):
                with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                    await FakeTrainer(session, base).connect(room, key)
                assert info.value.status == status
            waiting = await worker_request(base, trainer.room, wait=False)
            conn_id = await trainer.next_open()
            for room, key, status in ((trainer.room, "x" * 22, 403), ("r" * 22, trainer.key, 404)):
                with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                    await session.ws_connect(f"{base}/room/{room}/accept/{conn_id}",
                                             headers={"X-WS-Gym-Room-Key": key})
                assert info.value.status == status
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await session.ws_connect(f"{base}/room/{trainer.room}/accept/{'c' * 16}",
                                         headers={"X-WS-Gym-Room-Key": trainer.key})
            assert info.value.status == 404
            await trainer.accept(conn_id)  # the refusals did not spoil the waiting worker
            status, _, reader, writer = await waiting
            assert status == 101 and await echoed(reader, writer, b"still fine") == b"still fine"
            writer.close()
            await trainer.close()

    run(scenario())
    assert any("wrong or missing trainer token" in w for w in watch.relay_warnings())
    assert not any(TOKEN in w for w in watch.relay_warnings())


def test_unknown_room_and_two_rooms_that_never_cross(relays):
    relay, base = relays.start()

    async def scenario():
        async with aiohttp.ClientSession() as session:
            assert await refused_worker(base, "u" * 22) == (503, f"HTTP/1.1 503 {NO_TRAINER}")
            a = await FakeTrainer(session, base).connect()
            b = await FakeTrainer(session, base).connect()
            assert a.room != b.room
            pairs = []
            for trainer in (a, b, a, b):
                end, reader, writer = await pair(trainer)
                pairs.append((trainer, end, reader, writer))
            for i, (trainer, _, reader, writer) in enumerate(pairs):
                message = f"{trainer.room}:{i}".encode() * 1000
                assert await echoed(reader, writer, message) == message
            assert [len(a.ends), len(b.ends)] == [2, 2]
            assert a.ws._reader.is_eof() is False and b.ws._reader.is_eof() is False
            for _, _, _, writer in pairs:
                writer.close()
            await a.close()
            await b.close()

    run(scenario())


def test_a_trainer_leaving_closes_its_workers_and_may_come_back(relays):
    relay, base = relays.start(handshake_timeout=5)

    async def scenario():
        async with aiohttp.ClientSession() as session:
            trainer = await FakeTrainer(session, base).connect()
            other = await FakeTrainer(session, base).connect()
            end, reader, writer = await pair(trainer)
            _, other_reader, other_writer = await pair(other)
            waiting = await worker_request(base, trainer.room, wait=False)
            await trainer.next_open()
            await trainer.ws.close()  # the trainer's control connection ends
            assert await asyncio.wait_for(reader.read(), 5) == b""  # paired: closed
            assert (await waiting)[:2][0] == 503  # waiting: turned away
            assert await refused_worker(base, trainer.room) == (503, f"HTTP/1.1 503 {NO_TRAINER}")
            assert await echoed(other_reader, other_writer, b"other room") == b"other room"
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:  # reserved for the key
                await FakeTrainer(session, base).connect(trainer.room, "z" * 43)
            assert info.value.status == 409
            back = await FakeTrainer(session, base).connect(trainer.room, trainer.key)
            assert (back.room, back.key) == (trainer.room, trainer.key)
            _, reader, writer = await pair(back)
            assert await echoed(reader, writer, b"back") == b"back"
            for w in (writer, other_writer):
                w.close()
            await trainer.close()
            await back.close()
            await other.close()

    run(scenario())


def test_after_the_grace_a_room_may_be_opened_with_another_key(relays):
    relay, base = relays.start(limits=Limits(room_grace=0))

    async def scenario():
        async with aiohttp.ClientSession() as session:
            first = await FakeTrainer(session, base).connect()
            await first.ws.close()
            assert (await first.ws.receive()).type is aiohttp.WSMsgType.CLOSED
            # the relay ends the room when it sees the close; grace 0: forgotten at once
            for _ in range(100):
                try:
                    second = await FakeTrainer(session, base).connect(first.room, "n" * 43)
                    break
                except aiohttp.WSServerHandshakeError as exc:
                    assert exc.status == 409  # the relay has not seen the close yet
                    await asyncio.sleep(0.02)
            assert (second.room, second.key) == (first.room, "n" * 43)
            _, reader, writer = await pair(second)
            assert await echoed(reader, writer, b"new key") == b"new key"
            writer.close()
            await second.close()

    run(scenario())


def test_handshake_timeouts(relays, watch):
    relay, base = relays.start(handshake_timeout=0.3)

    async def scenario():
        async with aiohttp.ClientSession() as session:
            trainer = await FakeTrainer(session, base).connect()
            # the trainer never accepts
            waiting = await worker_request(base, trainer.room, wait=False)
            await trainer.next_open()
            status, head, _, writer = await waiting
            assert status == 503 and head.startswith(f"HTTP/1.1 503 {NOT_TAKEN}")
            writer.close()
            # the trainer accepts but never says go
            waiting = await worker_request(base, trainer.room, wait=False)
            conn_id = await trainer.next_open()
            ws = await session.ws_connect(f"{base}/room/{trainer.room}/accept/{conn_id}",
                                          headers={"X-WS-Gym-Room-Key": trainer.key})
            assert (await waiting)[0] == 503
            assert (await ws.receive(timeout=5)).type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
            await ws.close()
            # the trainer says something else than go
            waiting = await worker_request(base, trainer.room, wait=False)
            conn_id = await trainer.next_open()
            ws = await session.ws_connect(f"{base}/room/{trainer.room}/accept/{conn_id}",
                                          headers={"X-WS-Gym-Room-Key": trainer.key})
            await ws.send_str("go")
            assert (await waiting)[0] == 503
            await ws.close()
            # and then a worker that is taken in time
            _, reader, writer = await pair(trainer)
            assert await echoed(reader, writer, b"in time") == b"in time"
            writer.close()
            await trainer.close()

    run(scenario())


def test_limits(relays):
    relay, base = relays.start(limits=Limits(max_rooms=2, max_room_connections=2, max_connections=12))

    async def scenario():
        async with aiohttp.ClientSession() as session:
            a = await FakeTrainer(session, base).connect()
            b = await FakeTrainer(session, base).connect()
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await FakeTrainer(session, base).connect()
            assert info.value.status == 503
            held = [await worker_request(base, a.room, wait=False) for _ in range(2)]
            ids = [await a.next_open() for _ in held]
            status, head = await refused_worker(base, a.room)
            assert status == 503 and "too many connections in this room" in head
            # relay-wide: 2 control + 2 held + idle sockets up to 12, then 503 at once
            idle = [await asyncio.open_connection("127.0.0.1", relay.port) for _ in range(8)]
            reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
            assert (await reader.read()).startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
            writer.close()
            for _, w in idle:
                w.close()
            await until(lambda: relay.open_connections() <= 4)  # 2 control + 2 held
            for conn_id in ids:
                await a.accept(conn_id)
            for task in held:
                status, _, reader, writer = await task
                assert status == 101 and await echoed(reader, writer, b"ok") == b"ok"
                writer.close()
            await a.close()
            await b.close()

    run(scenario())


def test_hostile_clients_do_not_harm_the_relay(relays, watch):
    relay, base = relays.start(handshake_timeout=2)

    async def raw(data: bytes) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        writer.write(data)
        try:
            return await asyncio.wait_for(reader.read(), 5)
        finally:
            writer.close()

    async def scenario():
        async with aiohttp.ClientSession() as session:
            trainer = await FakeTrainer(session, base).connect()
            assert re.match(rb"HTTP/1.[01] 400 ", await raw(b"\x16\x03\x01\x02\x00garbage\r\n\r\n"))
            assert re.match(rb"HTTP/1.[01] 400 ", await raw(os.urandom(4096)))
            huge = b"GET /trainer HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n"
            assert re.match(rb"HTTP/1.[01] 4(00|31) ", await raw(huge))
            not_upgrade = f"GET /room/{trainer.room}/ws HTTP/1.1\r\nHost: x\r\n\r\n".encode()
            assert re.match(rb"HTTP/1.1 400 ", await raw(not_upgrade))
            post = b"POST /trainer HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
            assert re.match(rb"HTTP/1.1 405 ", await raw(post))
            # a binary control message, and an oversized one, end that trainer's control connection
            for send, code in ((lambda ws: ws.send_bytes(b"x"), aiohttp.WSCloseCode.UNSUPPORTED_DATA),
                               (lambda ws: ws.send_str("x" * 100_000), aiohttp.WSCloseCode.MESSAGE_TOO_BIG)):
                bad = await FakeTrainer(session, base).connect()
                await send(bad.ws)
                msg = await bad.ws.receive(timeout=5)
                assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == code
                assert await refused_worker(base, bad.room) == (503, f"HTTP/1.1 503 {NO_TRAINER}")
                await bad.close()
            await trainer.ws.send_str('{"type": "anything"}')  # text is ignored
            # a flood: 100 silent connections, 100 workers for unknown rooms, all at once
            silent = await asyncio.gather(*(asyncio.open_connection("127.0.0.1", relay.port) for _ in range(100)))
            statuses = await asyncio.gather(*(refused_worker(base, f"{i:022d}") for i in range(100)))
            assert {s for s, _ in statuses} == {503}
            # and through it all the relay still pairs a normal worker
            _, reader, writer = await pair(trainer)
            assert await echoed(reader, writer, b"alive") == b"alive"
            writer.close()
            for _, w in silent:
                w.close()
            await trainer.close()

    run(scenario())
    warnings = watch.relay_warnings()
    assert len(warnings) < 20, warnings  # throttled: no line per refused connection
    assert not any(r.exc_info for r in watch.records)


def test_a_silent_trainer_is_noticed_by_the_heartbeat(relays):
    relay, base = relays.start(heartbeat=0.2)

    async def scenario():
        async with aiohttp.ClientSession() as session:
            trainer = await FakeTrainer(session, base).connect(autoping=False)  # never answers pings
            end, reader, writer = await pair(trainer)
            while (msg := await trainer.ws.receive(timeout=5)).type is aiohttp.WSMsgType.PING:
                pass
            assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
            await trainer.close()

    run(scenario())


def test_closing_the_relay_closes_everything_cleanly(relays):
    relay, base = relays.start()

    async def scenario():
        async with aiohttp.ClientSession() as session:
            trainer = await FakeTrainer(session, base).connect()
            _, reader, writer = await pair(trainer)
            waiting = await worker_request(base, trainer.room, wait=False)
            await trainer.next_open()
            closing = asyncio.ensure_future(asyncio.wrap_future(
                asyncio.run_coroutine_threadsafe(relay.close(), relays.loop)))
            assert await asyncio.wait_for(reader.read(), 5) == b""
            assert (await waiting)[0] == 503
            msg = await trainer.ws.receive(timeout=5)
            assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == aiohttp.WSCloseCode.GOING_AWAY
            await trainer.close()
            await closing
            writer.close()

    run(scenario())


def make_cert(directory: Path) -> tuple[str, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relay")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    certfile, keyfile = directory / "cert.pem", directory / "key.pem"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return str(certfile), str(keyfile)


def test_tls_on_both_sides(relays, tmp_path):
    pytest.importorskip("cryptography")
    certfile, keyfile = make_cert(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(certfile, keyfile)
    client_ctx = ssl.create_default_context()
    client_ctx.check_hostname, client_ctx.verify_mode = False, ssl.CERT_NONE
    relay, base = relays.start(ssl_context=server_ctx)
    assert relay.url.startswith("wss://")

    async def scenario():
        async with aiohttp.ClientSession() as session:
            trainer = await FakeTrainer(session, base, ssl_ctx=client_ctx).connect()
            task = await worker_request(base, trainer.room, wait=False, ssl_ctx=client_ctx)
            end = await trainer.accept(await trainer.next_open())
            status, _, reader, writer = await task
            assert status == 101
            big = os.urandom(3 * 1024 * 1024)
            assert await echoed(reader, writer, big) == big
            writer.close()
            await asyncio.wait_for(end.lost, 5)
            await trainer.close()

    run(scenario())


# ----------------------------------------------------------------- the command line


def start_cli(*args: str, env: dict | None = None) -> subprocess.Popen:
    full_env = {k: v for k, v in os.environ.items() if k != relay_mod.TOKEN_ENV}
    full_env.update(PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.Popen([sys.executable, "-m", "ws_gym.relay", "--host", "127.0.0.1", "--port", "0", *args],
                            cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def listening(proc: subprocess.Popen) -> tuple[str, list[str]]:
    """The base URL from the listening line, and the lines before it."""
    lines = []
    for line in proc.stderr:
        match = LISTENING.search(line)
        if match:
            return f"http://{match.group(2)}:{match.group(3)}", lines
        lines.append(line)
    raise AssertionError(f"no listening line: {lines}")


@pytest.fixture
def cli():
    procs: list[subprocess.Popen] = []
    yield lambda *args, **kw: procs.append(start_cli(*args, **kw)) or procs[-1]
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


@pytest.mark.skipif(os.name != "posix", reason="SIGTERM/SIGINT to a child process")
@pytest.mark.parametrize("how", ["token from the environment", "generated token"])
def test_the_command_line_relay(cli, how):
    env = {relay_mod.TOKEN_ENV: TOKEN} if how == "token from the environment" else {}
    proc = cli("--handshake-timeout", "5", env=env)
    base, before = listening(proc)
    token = TOKEN
    if how == "generated token":
        assert any("relay_token=" in line for line in before)
        token = re.search(r"generated trainer token: (\S+)", "".join(before)).group(1)

    async def scenario():
        async with aiohttp.ClientSession() as session:
            trainer = await FakeTrainer(session, base).connect(token=token)
            _, reader, writer = await pair(trainer)
            assert await echoed(reader, writer, b"over the cli") == b"over the cli"
            writer.close()
            await trainer.close()

    run(scenario())
    if how == "token from the environment":  # a second relay on the same port says why it cannot start
        taken = cli("--port", base.rsplit(":", 1)[1], env=env)
        _, err = taken.communicate(timeout=15)
        assert taken.returncode == 1 and "cannot listen on 127.0.0.1" in err and "Traceback" not in err, err
    proc.send_signal(signal.SIGTERM if how == "generated token" else signal.SIGINT)
    _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and " ERROR " not in err and " WARNING " not in err, err
