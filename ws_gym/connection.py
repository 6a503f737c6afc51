"""A worker's connection as the trainer sees it: its envs, its state, its I/O.

Who writes what: the loop thread admits, activates and drops a connection
(``state``) and owns its I/O handles and heartbeat clock; ``state`` and
``pending`` are shared with the caller's thread under the call book's lock
(see :mod:`ws_gym.calls`). ``fresh`` belongs to the caller's thread: it is
cleared there once the connection's envs have been reset.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass, field
from typing import Any

from .compact import StepCodec
from .liveness import TrainerLiveness
from .wire import FrameConnection


class WorkerState(enum.Enum):
    """Where a worker's connection is in its life (``JOINING -> ACTIVE -> LOST``)."""

    JOINING = "joining"  # admitted: holds its envs' slots, its handshake not finished
    ACTIVE = "active"  # serves its envs
    LOST = "lost"  # ended: what it owed has failed (or is LOST), its slots are free


@dataclass(eq=False)
class WorkerConn:
    """One worker connection and the contiguous run of envs it serves."""

    cid: int
    name: str
    peer: str
    start: int
    count: int
    ws: Any = None  # aiohttp's WebSocketResponse, for the handshake and a close before take-over
    state: WorkerState = WorkerState.JOINING
    fresh: bool = True  # its envs not reset since it joined (the caller's thread)
    pending: dict = field(default_factory=dict)  # request id -> (call, index) owed (see calls.py)
    codec: StepCodec = field(default_factory=StepCodec)  # how its requests and replies are framed
    compression: str = "none"  # the codec its observations may travel in (ws_gym.compression)
    compress_auto: bool = False  # ... only while the worker finds it pays ("auto")
    transport: Any = None  # to cut a silent worker off at once
    wire: FrameConnection | None = None  # the connection's frames, once admitted
    aiohttp_protocol: Any = None  # aiohttp's protocol for the transport, handed back at the end
    last_rx: float = 0.0  # loop time of the last frame received (heartbeats)
    worker_id: str = ""  # names the worker across reconnects (see the handshake)
    live: TrainerLiveness | None = None  # its heartbeat clock, with heartbeats on
    unknown: int = 0  # replies to unknown requests not logged yet (logged at most once a second)
    unknown_logged_at: float = float("-inf")
    # statistics (ws_gym.stats): written where requests are sent and replies read, no lock
    step_requests: int = 0  # step requests sent to it (each steps its `count` envs)
    replies: int = 0  # replies read
    rtt_total: float = 0.0  # seconds from sending a call to reading this worker's reply, summed
    last_error: str = ""  # the last error an env of it raised
    since: float = 0.0  # Unix time it began to serve (0: not yet)

    @property
    def stop(self) -> int:
        return self.start + self.count

    @property
    def active(self) -> bool:
        return self.state is WorkerState.ACTIVE

    @property
    def alive(self) -> bool:
        return self.state is not WorkerState.LOST

    @functools.cached_property  # read on every reply check; start and count never change
    def origin(self) -> str:
        return f"worker {self.name} ({self.peer}, envs {self.start}..{self.stop - 1})"
