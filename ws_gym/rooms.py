"""The relay's rooms and rules, with no I/O (:mod:`ws_gym.relay` does the I/O).

A room is one trainer and the workers that came for it. Both sides dial out to
the relay: the trainer holds a control connection for its room, and each
worker that arrives waits until the trainer opens a data connection for it.
This module decides, from the room table, a clock and the limits alone, who
may open or reclaim a room, which worker may wait in which room, which data
connection takes which worker, and when a room whose trainer left is
forgotten. A refusal is a :class:`Refused` carrying the HTTP status to answer.

The relay keeps no data: after a restart it knows no room, so a trainer that
reclaims a room the relay has forgotten simply opens it again with its id and
key. While the room's trainer is away (``room_grace`` seconds) only the key
reopens it, so nobody else can take over the workers that keep dialing it.

Also here: which route a request's path is (:func:`route`) and the head a
worker's request is forwarded with (:func:`rewrite_head`).
"""

from __future__ import annotations

import hmac
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

# Room ids and keys: URL-safe, long enough not to be guessed, short enough to log
ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{16,128}")

# routes by the path's end: a reverse proxy may keep its prefix (B = wss://proxy/gym)
_ROUTES = (("trainer", re.compile(r".*/trainer")), ("worker", re.compile(r".*/room/([^/]+)/ws")),
           ("accept", re.compile(r".*/room/([^/]+)/accept/([^/]+)")), ("page", re.compile(r".*/")))

NO_TRAINER = "no trainer in this room (yet)"
NOT_TAKEN = "the trainer did not take the connection"


def valid_id(text: Any) -> bool:
    """Whether ``text`` may be a room id, a room key or a connection id."""
    return isinstance(text, str) and ID_PATTERN.fullmatch(text) is not None


def same_secret(given: str, expected: str) -> bool:
    """Constant-time comparison, so a secret's prefix cannot be found by timing."""
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode("utf-8", "surrogateescape"))


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def route(path: str) -> tuple[str, tuple[str, ...]]:
    """The route of a request's raw path (no query): ``trainer``, ``worker``
    (room), ``accept`` (room, connection id), ``page`` (ends in ``/``), else ``""``."""
    for name, pattern in _ROUTES:
        match = pattern.fullmatch(path)
        if match:
            return name, match.groups()
    return "", ()


def rewrite_head(raw_path: str, raw_headers: Sequence[tuple[bytes, bytes]], remote: str | None) -> bytes:
    """A worker's request head as the trainer's server is to read it: ``GET /ws``
    with the worker's query, its headers as received, and the worker's address
    appended to ``X-Forwarded-For``, as a proxy does."""
    _, mark, query = raw_path.partition("?")
    lines = [b"GET /ws" + (mark + query).encode("utf-8", "surrogateescape") + b" HTTP/1.1"]
    forwarded = [value for name, value in raw_headers if name.lower() == b"x-forwarded-for"]
    lines += [name + b": " + value for name, value in raw_headers if name.lower() != b"x-forwarded-for"]
    forwarded.append((remote or "unknown").encode("latin-1", "replace"))
    return b"\r\n".join([*lines, b"X-Forwarded-For: " + b", ".join(forwarded)]) + b"\r\n\r\n"


class Refused(Exception):
    """A request the relay turns down: the HTTP ``status`` to answer, a
    ``reason`` for the peer, and the ``kind`` its warnings are throttled by."""

    def __init__(self, status: int, reason: str, kind: str) -> None:
        super().__init__(reason)
        self.status, self.reason, self.kind = status, reason, kind


@dataclass(frozen=True)
class Limits:
    """What one relay allows; every limit is enforced so that a hostile client
    cannot take more than its share."""

    max_rooms: int = 64
    max_room_connections: int = 256  # a room's workers, waiting and paired
    max_connections: int = 4096  # every open TCP connection of the relay
    room_grace: float = 60.0  # seconds a room stays reserved for its key after its trainer left

    def __post_init__(self) -> None:
        if min(self.max_rooms, self.max_room_connections, self.max_connections) < 1 or self.room_grace < 0:
            raise ValueError(f"limits must be positive: {self}")


@dataclass(eq=False)
class Room:
    """One trainer's room. ``trainer`` is the I/O layer's handle of the control
    connection (None while no trainer is connected); ``told`` once the trainer
    has been sent its room (no worker may be announced before). The handles in
    ``waiting`` (workers the trainer has not taken yet) and ``paired`` (taken
    by a data connection) are the I/O layer's too, by connection id."""

    id: str
    key: str
    trainer: Any = None
    told: bool = False
    forget_at: float | None = None  # set while no trainer is connected
    waiting: dict[str, Any] = field(default_factory=dict)
    paired: dict[str, Any] = field(default_factory=dict)

    @property
    def connections(self) -> int:
        return len(self.waiting) + len(self.paired)


class Rooms:
    """The room table and its decisions. Times are the caller's clock (seconds)."""

    def __init__(self, limits: Limits | None = None, *,
                 new_secret: Callable[[int], str] = secrets.token_urlsafe) -> None:
        self.limits = limits or Limits()
        self._new_secret = new_secret  # injectable for deterministic tests
        self.rooms: dict[str, Room] = {}

    # -- trainers --------------------------------------------------------------

    def open(self, trainer: Any, now: float, room_id: str | None = None,
             key: str | None = None) -> tuple[Room, bool]:
        """A trainer's control connection arrived: its room, and whether it
        reclaimed one (True) or got a new one (False). Raises :class:`Refused`."""
        if (room_id is None) != (key is None):
            raise Refused(400, "X-WS-Gym-Room and X-WS-Gym-Room-Key go together", "room")
        self.expire(now)
        if room_id is not None and key is not None:
            if not valid_id(room_id) or not valid_id(key):
                raise Refused(400, "room ids and keys are 16 to 128 of A-Z a-z 0-9 _ -", "room")
            room = self.rooms.get(room_id)
            if room is not None:
                if not same_secret(key, room.key):
                    raise Refused(409, "wrong key for this room", "room")
                if room.trainer is not None:
                    raise Refused(409, "this room's trainer is still connected", "room")
                room.trainer, room.forget_at, room.told = trainer, None, False
                return room, True
            self._check_room_space()
            room = self.rooms[room_id] = Room(room_id, key, trainer)  # the relay forgot it (restart, grace)
            return room, True
        self._check_room_space()
        room_id = self._new_secret(16)
        while room_id in self.rooms:
            room_id = self._new_secret(16)
        room = self.rooms[room_id] = Room(room_id, self._new_secret(32), trainer)
        return room, False

    def _check_room_space(self) -> None:
        if len(self.rooms) >= self.limits.max_rooms:
            raise Refused(503, f"too many rooms (max {self.limits.max_rooms})", "busy")

    def trainer_left(self, room: Room, trainer: Any, now: float) -> list[Any]:
        """The room's control connection ended: the handles of all its workers'
        connections, for the caller to close (the workers notice and dial
        again). The room stays reserved for its key for ``room_grace`` seconds."""
        if room.trainer is not trainer or self.rooms.get(room.id) is not room:
            return []
        handles = [*room.waiting.values(), *room.paired.values()]
        room.waiting.clear()
        room.paired.clear()
        room.trainer, room.forget_at, room.told = None, now + self.limits.room_grace, False
        return handles

    def expire(self, now: float) -> list[Room]:
        """Forget the rooms whose grace has passed; returns them."""
        gone = [room for room in self.rooms.values() if room.forget_at is not None and now >= room.forget_at]
        for room in gone:
            del self.rooms[room.id]
        return gone

    # -- workers ---------------------------------------------------------------

    def arrive(self, room_id: str, worker: Any, now: float, open_connections: int) -> tuple[Room, str]:
        """A worker asks for ``room_id``: its room and a fresh connection id
        (the worker now waits in ``room.waiting``). ``open_connections``: the
        relay's open TCP connections, the worker's own included; its data
        connection will need one more. Raises :class:`Refused`."""
        self.expire(now)
        room = self.rooms.get(room_id)
        if room is None or room.trainer is None or not room.told:
            raise Refused(503, NO_TRAINER, "no trainer")
        if room.connections >= self.limits.max_room_connections:
            raise Refused(503, f"too many connections in this room (max {self.limits.max_room_connections})",
                          "busy")
        if open_connections + 1 > self.limits.max_connections:
            raise Refused(503, f"too many connections (max {self.limits.max_connections})", "busy")
        conn_id = self._new_secret(12)
        while conn_id in room.waiting or conn_id in room.paired:
            conn_id = self._new_secret(12)
        room.waiting[conn_id] = worker
        return room, conn_id

    def take(self, room_id: str, conn_id: str, key: str) -> tuple[Room, Any]:
        """The trainer's data connection for ``conn_id``: the waiting worker's
        handle, now paired. Raises :class:`Refused` (403 wrong key, 404 unknown)."""
        room = self.rooms.get(room_id)
        if room is None:
            raise Refused(404, "no such room", "unknown")
        if not same_secret(key, room.key):
            raise Refused(403, "wrong room key", "key")
        worker = room.waiting.pop(conn_id, None)
        if worker is None:
            raise Refused(404, "no such connection (expired or taken)", "unknown")
        room.paired[conn_id] = worker
        return room, worker

    def leave(self, room: Room, conn_id: str) -> bool:
        """A worker's connection ended (or gave up waiting); True if it was still
        the room's (not already closed by its trainer leaving)."""
        return room.waiting.pop(conn_id, None) is not None or room.paired.pop(conn_id, None) is not None

    # -- counts ----------------------------------------------------------------

    def counts(self) -> tuple[int, int]:
        """(rooms, worker connections): for the status page, no ids in them."""
        return len(self.rooms), sum(room.connections for room in self.rooms.values())


class Throttle:
    """Warnings of one kind at most once per ``interval`` seconds: a flood of
    refused connections must not become a flood of log lines."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def allow(self, kind: str, now: float) -> int | None:
        """None if this line is to be dropped; else how many of its kind were
        dropped since the last one shown."""
        last = self._last.get(kind)
        if last is not None and now - last < self.interval:
            self._held[kind] = self._held.get(kind, 0) + 1
            return None
        self._last[kind] = now
        return self._held.pop(kind, 0)
