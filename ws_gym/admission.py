"""Who may serve which envs: the trainer's handshake decisions (no I/O).

A worker's hello is checked against what the trainer expects (env id,
later its spaces), a contiguous run of free env slots is reserved for it, and
its welcome is written. A worker that dials in again presents the id its
welcome gave it: it gets the envs it served back where they are free, and the
connection it left behind (dead, but not noticed yet) is named so that the
server can drop it. The welcome also says whether the worker's observations
travel compressed on this connection (:func:`ws_gym.compression.choose`).
"""

from __future__ import annotations

import itertools
import secrets
from dataclasses import dataclass

from . import compression as Z
from . import protocol as P
from .compact import StepCodec, ZStepCodec, layout_for
from .config import DEFAULT_MAX_MSG_SIZE
from .connection import WorkerConn
from .errors import HandshakeError, ProtocolError
from .liveness import TrainerLiveness
from .slots import SlotTable
from .spaces import schema_to_space


@dataclass
class Expectation:
    """What the trainer expects of every worker (env id and spaces may be learnt)."""

    env_id: str | None
    env_kwargs: dict
    mode: str
    autoreset_mode: str
    max_episode_steps: int | None
    record_episode_statistics: bool = False
    ready: P.Ready | None = None  # spaces etc., from a local probe or the first worker


class Admission:
    """The handshake's decisions, on the loop thread; the table is shared with callers."""

    def __init__(self, table: SlotTable, expect: Expectation, *, heartbeat: float | None,
                 compact: bool, compression: str = "auto", max_msg_size: int = DEFAULT_MAX_MSG_SIZE) -> None:
        self.table = table
        self.expect = expect
        self.heartbeat = heartbeat
        self.compact = compact  # offer compact step frames to workers that take them
        Z.require(compression)  # an explicit codec that is not installed: a clear error now
        self.compression = compression  # "auto", "none", "lz4" or "zstd" (see ws_gym.compression)
        self.max_msg_size = max_msg_size  # also what compressed observations may decompress to
        self._by_id: dict[str, WorkerConn] = {}  # worker_id -> its live connection
        self._served: dict[str, tuple[int, int]] = {}  # worker_id -> the envs it served last
        self._ids = itertools.count(1)

    def stale(self, hello: P.Hello) -> WorkerConn | None:
        """The connection a returning worker left behind, if it is still here."""
        return None if hello.worker_id is None else self._by_id.get(hello.worker_id)

    def admit(self, hello: P.Hello, peer: str, local: bool = False) -> WorkerConn:
        """Reserve a run of free slots for the worker, or raise HandshakeError.
        ``local``: it is on this machine (loopback or Unix socket)."""
        table = self.table
        prefer = None if hello.worker_id is None else self._served.get(hello.worker_id)
        with table.cond:
            expect = self.expect
            if hello.env_id is not None and expect.env_id is not None and hello.env_id != expect.env_id:
                raise HandshakeError(
                    f"env mismatch: the trainer runs {expect.env_id!r}, "
                    f"worker {hello.name} hosts {hello.env_id!r}"
                )
            if hello.env_id is None and expect.env_id is None:
                raise HandshakeError(
                    "no env id: pass env_id= to the trainer or --env to the worker"
                )
            start, run = table.free_run(prefer)
            if run == 0:
                if table.starting():
                    # held by a worker still starting (or one that never finishes): may free up
                    raise HandshakeError("busy: the free envs are held by a worker still starting; "
                                         "retry later", retry=True)
                # a worker that served before may be needed again soon (its envs may be
                # held by a connection not yet found dead): it retries, never strands
                raise HandshakeError(
                    f"not needed: all {table.num_envs} envs are served already",
                    retry=hello.worker_id is not None,
                )
            if expect.env_id is None:
                expect.env_id = hello.env_id  # the first worker names the env
            conn = WorkerConn(next(self._ids), hello.name, peer, start, min(run, hello.num_envs))
            conn.worker_id = hello.worker_id or secrets.token_hex(16)
            if self.heartbeat:
                conn.live = TrainerLiveness(self.heartbeat)
            name, auto = Z.choose(self.compression, list(hello.compression), local)
            conn.compression, conn.compress_auto = name or "none", auto
            table.take(conn)
        self._by_id[conn.worker_id] = conn
        self._served.pop(conn.worker_id, None)  # re-inserted last: the bound below drops the oldest
        self._served[conn.worker_id] = (conn.start, conn.stop)
        while len(self._served) > 4 * table.num_envs + 64:  # bounded: the oldest go first
            del self._served[next(iter(self._served))]
        return conn

    def welcome(self, conn: WorkerConn) -> P.Welcome:
        expect = self.expect
        assert expect.env_id is not None  # admit() set it (the first worker names the env) or refused
        return P.Welcome(
            env_id=expect.env_id,
            env_kwargs=expect.env_kwargs,
            num_envs=conn.count,
            first_index=conn.start,
            mode=expect.mode,
            autoreset_mode=expect.autoreset_mode,
            max_episode_steps=expect.max_episode_steps,
            record_episode_statistics=expect.record_episode_statistics,
            heartbeat=self.heartbeat,
            worker_id=conn.worker_id,
            compression=None if conn.compression == "none" else conn.compression,
            compress="auto" if conn.compress_auto else "always",
        )

    def ready(self, ready: P.Ready, conn: WorkerConn) -> None:
        """The worker's envs are up: adopt their spaces (the first worker's) or
        check them against the known ones, and choose its step codec."""
        cond = self.table.cond  # wait_spaces waits on it
        with cond:
            known = self.expect.ready
            if known is None:
                schema_to_space(ready.observation_space)  # validate before adopting
                schema_to_space(ready.action_space)
                self.expect.ready = known = ready
                cond.notify_all()
            else:
                self._check_spaces(ready, known, conn)
        layout = None
        if ready.compact and self.compact:
            layout = layout_for(known.observation_space, known.action_space, conn.count,
                                self.expect.mode == P.MODE_SINGLE)
        if conn.compression != "none":
            conn.codec = ZStepCodec(layout, Z.Decompressor(conn.compression, self.max_msg_size))
        elif layout is not None:
            conn.codec = StepCodec(layout)

    @staticmethod
    def _check_spaces(ready: P.Ready, known: P.Ready, conn: WorkerConn) -> None:
        for what, theirs, ours in (
            ("observation space", ready.observation_space, known.observation_space),
            ("action space", ready.action_space, known.action_space),
        ):
            if theirs != ours:
                try:
                    theirs_text = str(schema_to_space(theirs))
                except ProtocolError:
                    theirs_text = "an invalid schema"
                raise HandshakeError(
                    f"space mismatch: {conn.origin} has {what} {theirs_text}, "
                    f"the trainer expects {schema_to_space(ours)}"
                )

    def release(self, conn: WorkerConn) -> None:
        """``conn``'s slots are free again (it failed its handshake, or it is lost)."""
        self.table.release(conn)
        if self._by_id.get(conn.worker_id) is conn:
            del self._by_id[conn.worker_id]
