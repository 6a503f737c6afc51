"""The trainer's side of the wire: a WebSocket server and the workers on it.

An aiohttp server runs on its own event loop in a background thread. Workers
dial in, pass the handshake and are given a contiguous run of env slots; from
then on the connection's frames are read and written by a
:class:`~ws_gym.wire.FrameConnection`, not aiohttp's message API. The caller's
thread (the training loop) encodes requests and writes them to the workers'
sockets itself (see :meth:`WorkerPool._send_direct`; over TLS, or when a
socket does not take a frame at once, one ``call_soon_threadsafe`` hands them
to the loop), and blocks on a plain ``threading.Lock`` that the loop releases
when the last reply (or the first error) arrives. Replies are matched to requests
by id as they are parsed, inside the transport's ``data_received``; a worker
that disconnects fails its pending requests at once.

Which worker serves which envs is :mod:`ws_gym.slots`; the call a caller
waits on, and the lock rules between the two threads, :mod:`ws_gym.calls`.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import hmac
import itertools
import logging
import os
import secrets
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import aiohttp
from aiohttp import web

from . import codec, loops
from .addresses import WS_PATH, format_url, loopback_for
from .calls import FILLED, LOST, Call
from . import frames as F
from .compact import REPLY as COMPACT_REPLY
from .compact import StepLayout, layout_for
from . import protocol as P
from .forwarded import forwarded_client
from .liveness import TrainerLiveness, check_interval, give_up_unacked, unacked_limit
from .slots import SlotTable
from .errors import (
    ConnectTimeoutError,
    HandshakeError,
    ProtocolError,
    StepTimeoutError,
    WorkerLostError,
    WsGymError,
)
from .polling import poll_idle, poll_replies
from .wire import FrameConnection, hand_back
from .wsio import receive_message

log = logging.getLogger("ws_gym")


@dataclass(eq=False)
class WorkerConn:
    """One worker connection. Mutated only on the loop thread."""

    cid: int
    name: str
    peer: str
    start: int
    count: int
    ws: web.WebSocketResponse
    active: bool = False
    alive: bool = True
    fresh: bool = True  # not reset since it joined
    pending: dict = field(default_factory=dict)
    transport: Any = None  # to cut a silent worker off at once
    wire: FrameConnection | None = None  # the connection's frames, once admitted
    aiohttp_protocol: Any = None  # aiohttp's protocol for the transport, handed back at the end
    last_rx: float = 0.0  # loop time of the last frame received (heartbeats)
    worker_id: str = ""  # names the worker across reconnects (see _handshake)
    live: TrainerLiveness | None = None  # its heartbeat clock, with heartbeats on
    unknown: int = 0  # replies to unknown requests not logged yet (logged at most once a second)
    unknown_logged_at: float = float("-inf")
    compact: StepLayout | None = None  # its step frames' compact layout, when the worker takes them

    @property
    def stop(self) -> int:
        return self.start + self.count

    @functools.cached_property  # read on every reply check; start and count never change
    def origin(self) -> str:
        return f"worker {self.name} ({self.peer}, envs {self.start}..{self.stop - 1})"


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


class WorkerPool:
    """The server plus the table of env slots and the workers serving them."""

    def __init__(
        self,
        *,
        num_envs: int,
        expect: Expectation,
        host: str = "127.0.0.1",
        port: int = 8765,
        token: str | None = None,
        max_msg_size: int = 256 * 1024 * 1024,
        handshake_timeout: float = 10.0,
        ready_timeout: float = 300.0,
        max_pending_handshakes: int = 64,
        ssl_context: ssl.SSLContext | None = None,
        heartbeat: float | None = 10.0,
        on_worker_lost: str = "raise",
        unix_path: str | None = None,
        busy_poll: float = 0.0,
    ) -> None:
        self.num_envs = num_envs
        self.expect = expect
        self.host = host
        self.token = token or None  # "" means no token, as None
        # Without a token, connections through a proxy (Forwarded/X-Forwarded-For)
        # are refused, as they need not come from this machine; token="" (no
        # token on purpose) lets them in too.
        self.refuse_proxied = token is None
        self.max_msg_size = max_msg_size
        self.handshake_timeout = handshake_timeout
        self.ready_timeout = ready_timeout
        self.max_pending_handshakes = max_pending_handshakes
        self.heartbeat = heartbeat
        self.unix_path = unix_path  # also listen here, for local workers (POSIX)
        self.wait_mode = on_worker_lost == "wait"
        self._watchdog: asyncio.Future | None = None
        self.ssl_context = ssl_context
        self._pending_handshakes = 0  # connections upgraded but not yet admitted or refused
        self._busy_rejected = 0  # 503s not logged yet (logged at most once a second)
        self._busy_logged_at = float("-inf")
        self.table = SlotTable(num_envs)  # which worker serves which envs
        self._by_id: dict[str, WorkerConn] = {}  # worker_id -> its live connection (loop thread)
        self._served: dict[str, tuple[int, int]] = {}  # worker_id -> the envs it served last (loop thread)
        self._ids = itertools.count(1)
        self._req_ids = itertools.count(1)
        self._call_lock = threading.Lock()
        self._plock = threading.Lock()  # conn.alive and conn.pending, between caller and loop (see calls.py)
        self._direct = not loops.switched_off("WS_GYM_DIRECT")  # caller-thread writes (see wire.py)
        self._compact = not loops.switched_off("WS_GYM_COMPACT")  # compact step frames (see compact.py)
        # seconds a waiting caller reads its replies itself before it sleeps (0: the loop reads)
        self.busy_poll = busy_poll if self._direct else 0.0
        self._idle_poller: asyncio.Future | None = None
        self._closing = False
        self._closed = False
        self._loop = loops.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._run_loop, name="ws_gym-trainer-loop", daemon=True)
        self._thread.start()
        try:
            fut = asyncio.run_coroutine_threadsafe(self._start(host, port), self._loop)
            self.port = fut.result(timeout=30)
        except BaseException:
            self._stop_loop()
            raise
        self.url = format_url(host, self.port, ssl_context is not None)
        self.local_url = format_url(loopback_for(host), self.port, ssl_context is not None)

    # ------------------------------------------------------------ loop thread

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    async def _start(self, host: str, port: int) -> int:
        app = web.Application()
        app.router.add_get(WS_PATH, self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, _, _, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            if hasattr(socket, "SO_REUSEADDR") and not hasattr(socket, "SO_EXCLUSIVEADDRUSE"):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
        except OSError as exc:
            sock.close()
            await self._runner.cleanup()
            raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}; "
                          "pass port=0 to pick a free port") from None
        site = web.SockSite(self._runner, sock, ssl_context=self.ssl_context)
        await site.start()
        if self.unix_path is not None:  # local workers: a Unix socket is quicker than loopback TCP
            await web.UnixSite(self._runner, self.unix_path).start()
            os.chmod(self.unix_path, 0o600)  # this user only (the token is checked as well)
        if self.heartbeat:
            self._watchdog = asyncio.ensure_future(self._watch(self.heartbeat))
        if self.busy_poll:
            self._idle_poller = asyncio.ensure_future(poll_idle(lambda: self.table.conns))
        return sock.getsockname()[1]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        # Behind a proxy the socket's peer is the proxy: show the client it names.
        client = forwarded_client(request.headers)
        remote = str(request.remote or "unix socket")
        peer = remote if client is None else f"{client} via proxy {remote}"
        if client is not None and self.refuse_proxied:
            # No token because only this machine could connect; a proxy breaks that.
            log.warning("refused a connection from %s: it came through a proxy (Forwarded or "
                        "X-Forwarded-For header) and this trainer has no token; connections through a "
                        "proxy need a token: start the trainer with token=... or public_url=...", peer)
            return web.Response(status=403, text="ws_gym: connections through a proxy need a token; "
                                "start the trainer with token=... or public_url=...")
        if self.token is not None:
            given = request.headers.get(P.TOKEN_HEADER, "")
            if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), self.token.encode()):
                log.warning("rejected a connection from %s: wrong or missing token", peer)
                return web.Response(status=401, text="ws_gym: wrong or missing token")
        if self._closing:
            return web.Response(status=503, text="ws_gym: the trainer is closing")
        if self._pending_handshakes >= self.max_pending_handshakes:
            self._log_busy(peer)
            return web.Response(
                status=503,
                text=f"ws_gym: too many pending handshakes ({self.max_pending_handshakes}); retry later",
            )
        self._pending_handshakes += 1
        pending = True
        # autoping off: _read_replies answers pings itself and sees pongs (heartbeats)
        ws = web.WebSocketResponse(max_msg_size=self.max_msg_size, compress=False, autoping=False)
        conn = None
        try:
            await ws.prepare(request)
            try:
                conn = await self._handshake(ws, peer, request.transport)
                if conn is not None:
                    conn.last_rx = self._loop.time()
            finally:
                self._pending_handshakes -= 1
                pending = False
            if conn is not None:
                await self._read_replies(conn)  # returns once the transport is closed or closing
        except (asyncio.TimeoutError, TimeoutError):
            log.warning("worker at %s did not finish its handshake in time", peer)
        except (ProtocolError, HandshakeError) as exc:
            # a refusal the worker will retry (busy; a returning worker not needed now) is routine
            log.log(logging.INFO if getattr(exc, "retry", False) else logging.WARNING,
                    "worker at %s refused: %s", peer, exc)
            await self._refuse(ws, str(exc), getattr(exc, "retry", False))
        except (ConnectionError, aiohttp.ClientError) as exc:
            log.debug("connection from %s ended: %r", peer, exc)
        finally:
            if pending:  # ws.prepare failed
                self._pending_handshakes -= 1
            taken_over = conn is not None and conn.wire is not None
            if conn is not None:
                self._drop(conn)
            if taken_over:  # aiohttp cleans up as after any disconnect
                hand_back(conn.transport, conn.aiohttp_protocol)
            else:  # still on aiohttp's message API (no return here: it would swallow exceptions)
                too_big = ws.exception()
                if (isinstance(too_big, aiohttp.WebSocketError)
                        and too_big.code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG):
                    log.warning("closed the connection from %s: a message exceeded max_msg_size (%d bytes)",
                                peer, self.max_msg_size)
                if ws.prepared and not ws.closed:
                    await ws.close()
        return ws

    def _log_busy(self, peer: str | None) -> None:
        """Log 503s for too many pending handshakes: at most one line a second."""
        self._busy_rejected += 1
        now = time.monotonic()
        if now - self._busy_logged_at >= 1.0:
            log.warning(
                "rejected %d connection(s) (latest from %s): %d handshakes pending, the "
                "max_pending_handshakes limit", self._busy_rejected, peer, self.max_pending_handshakes,
            )
            self._busy_rejected = 0
            self._busy_logged_at = now

    async def _refuse(self, ws: web.WebSocketResponse, reason: str, retry: bool = False) -> None:
        self.table.note(reason)
        if not ws.closed:
            try:
                await ws.send_bytes(codec.encode(P.REFUSE, 0, {"reason": reason, "retry": retry}))
            except (ConnectionError, RuntimeError):
                pass

    def _admit(self, hello: P.Hello, peer: str, ws: web.WebSocketResponse,
               prefer: tuple[int, int] | None = None) -> WorkerConn:
        """Decide on a hello: reserve a run of free slots, or raise HandshakeError.

        ``prefer``: the envs a returning worker served before, taken again where
        they are free."""
        table = self.table
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
                    f"not needed: all {self.num_envs} envs are served already",
                    retry=hello.worker_id is not None,
                )
            if expect.env_id is None:
                expect.env_id = hello.env_id  # the first worker names the env
            conn = WorkerConn(next(self._ids), hello.name, peer, start, min(run, hello.num_envs), ws)
            conn.worker_id = hello.worker_id or secrets.token_hex(16)
            if self.heartbeat:
                conn.live = TrainerLiveness(self.heartbeat)
            table.take(conn)
            return conn

    async def _handshake(self, ws: web.WebSocketResponse, peer: str, transport: Any) -> WorkerConn | None:
        msg = await receive_message(ws, self.handshake_timeout, "during the handshake")
        if msg.kind != P.HELLO:
            raise ProtocolError(f"the first message must be hello, got {msg.kind!r}")
        hello = P.parse_hello(msg.body)
        prefer = None
        if hello.worker_id is not None:
            stale = self._by_id.get(hello.worker_id)
            if stale is not None:  # its link died and we have not noticed yet: the worker knows better
                self._drop(stale, "dialed in again: its old connection was dead", cut_off=True)
            prefer = self._served.get(hello.worker_id)
        conn = self._admit(hello, peer, ws, prefer)
        self._by_id[conn.worker_id] = conn
        self._served.pop(conn.worker_id, None)  # re-inserted last: the bound below drops the oldest
        self._served[conn.worker_id] = (conn.start, conn.stop)
        while len(self._served) > 4 * self.num_envs + 64:  # bounded: the oldest go first
            del self._served[next(iter(self._served))]
        conn.transport = transport
        try:
            welcome = P.Welcome(
                env_id=self.expect.env_id,
                env_kwargs=self.expect.env_kwargs,
                num_envs=conn.count,
                first_index=conn.start,
                mode=self.expect.mode,
                autoreset_mode=self.expect.autoreset_mode,
                max_episode_steps=self.expect.max_episode_steps,
                record_episode_statistics=self.expect.record_episode_statistics,
                heartbeat=self.heartbeat,
                worker_id=conn.worker_id,
            )
            await ws.send_bytes(codec.encode(P.WELCOME, 0, P.make_welcome(welcome), strict=True))
            msg = await receive_message(ws, self.ready_timeout, "during the handshake")
            if msg.kind == P.ERROR:
                err = P.parse_error(msg.body, conn.origin)
                text = f"{conn.origin} could not start its envs: {err.remote_type}: {err.remote_message}"
                log.error("%s", text)
                self.table.note(text)
                self._release(conn)
                return None
            if msg.kind != P.READY:
                raise ProtocolError(f"expected ready, got {msg.kind!r}")
            ready = P.parse_ready(msg.body)
            self._check_ready(ready, conn)
            if ready.compact and self._compact:
                known = self.expect.ready
                conn.compact = layout_for(known.observation_space, known.action_space, conn.count,
                                          self.expect.mode == P.MODE_SINGLE)
        except BaseException:
            self._release(conn)
            raise
        # From here on this connection's frames bypass aiohttp's message API. The
        # worker sends nothing between its ready and our accept, so no byte of it
        # can be left behind in aiohttp's parser.
        transport = conn.transport
        conn.wire, conn.aiohttp_protocol = FrameConnection.take_over(
            transport, client=False, max_size=self.max_msg_size, loop=self._loop,
            on_message=functools.partial(self._on_reply, conn),
            on_control=functools.partial(self._on_control, conn),
        )
        if self._direct and conn.wire.enable_direct() and self.busy_poll:
            conn.wire.claim_reading()  # the worker sends nothing before our accept
        if self.heartbeat:  # a dead link ends a busy connection too (see ws_gym.liveness)
            give_up_unacked(transport.get_extra_info("socket"), unacked_limit(self.heartbeat))
        conn.wire.send(codec.encode(P.ACCEPT, 0, {}))
        self.table.activate(conn)
        log.info("%s joined (%d envs)", conn.origin, conn.count)
        return conn

    def _check_ready(self, ready: P.Ready, conn: WorkerConn) -> None:
        from .spaces import schema_to_space

        cond = self.table.cond  # wait_spaces waits on it
        with cond:
            known = self.expect.ready
            if known is None:
                schema_to_space(ready.observation_space)  # validate before adopting
                schema_to_space(ready.action_space)
                self.expect.ready = ready
                cond.notify_all()
                return
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

    def _release(self, conn: WorkerConn) -> None:
        self.table.release(conn)
        if self._by_id.get(conn.worker_id) is conn:
            del self._by_id[conn.worker_id]

    def _drop(self, conn: WorkerConn, why: str = "disconnected", *, cut_off: bool = False) -> None:
        """The connection ended: free its slots and fail what it still owes.

        With ``on_worker_lost="wait"`` a step or reset does not fail: the lost
        worker's part of it becomes :data:`LOST` and the caller fills it in.
        """
        with self._plock:  # no request is registered for it after this (see _send_direct)
            if not conn.alive:
                return
            conn.alive = False
            owed = list(conn.pending.values())
            conn.pending.clear()
        was_active = conn.active
        conn.active = False
        self.table.changed()
        self._release(conn)
        if owed:
            exc = WorkerLostError(f"{conn.origin} {why} during a call")
            for call, idx in owed:
                if call.tolerant:
                    call.answer(idx, LOST)
                else:
                    call.fail(exc)
        if cut_off and conn.transport is not None:
            # nothing more is read from or sent to it (the frame layer's abort also
            # closes its duplicate socket at once, so the worker sees the cut now)
            (conn.wire or conn.transport).abort()
        if was_active and not self._closing:
            text = f"{conn.origin} {why}"
            log.warning("%s", text)
            self.table.note(text)

    async def _read_replies(self, conn: WorkerConn) -> None:
        """Wait until the connection ends (replies are handled by :meth:`_on_reply`)."""
        try:
            code, reason = await conn.wire.done
            log.debug("%s closed its connection (%s %s)", conn.origin, code, reason)
        except F.FrameError as exc:
            if exc.code == F.CLOSE_TOO_BIG:
                log.warning("closed the connection from %s: a message exceeded max_msg_size (%d bytes)",
                            conn.peer, self.max_msg_size)
            else:
                log.warning("closed the connection from %s: %s", conn.origin, exc)
        except (ConnectionError, OSError) as exc:
            log.debug("connection from %s ended: %r", conn.peer, exc)
            if isinstance(exc, TimeoutError) or getattr(exc, "errno", None) == errno.ETIMEDOUT:
                # the kernel gave up on unacknowledged bytes (see ws_gym.liveness)
                self._drop(conn, f"acknowledged nothing for {unacked_limit(self.heartbeat):g} s: "
                                 "link dead (heartbeat)")

    def _on_control(self, conn: WorkerConn) -> None:
        conn.last_rx = self._loop.time()

    def _on_reply(self, conn: WorkerConn, data: Any) -> None:
        """One binary message from a worker, inside the transport's data_received."""
        conn.last_rx = self._loop.time()
        pending = conn.pending
        layout = conn.compact
        try:
            if layout is not None and data[:4] == COMPACT_REPLY:
                # checked whole here; a sink copies it as it is, else it is decoded below
                rid, kind, body, compact = layout.reply_id(data), P.OK, data, True
            else:
                reply = codec.decode(data)
                rid, kind, body, compact = reply.id, reply.kind, reply.body, False
        except ProtocolError as exc:
            log.warning("%s sent a malformed frame: %s", conn.origin, exc)
            # Which request it answers is unknown: fail what this worker owes now
            # (a clear error at once, not a StepTimeoutError later); replies still
            # on their way for those ids are ignored as unknown.
            err = ProtocolError(f"{conn.origin} sent a malformed reply: {exc}")
            with self._plock:
                owed = list(pending.values())
                pending.clear()
            for call, _ in owed:
                call.fail(err)
            return
        entry = pending.pop(rid, None)
        if entry is None:
            self._log_unknown(conn, rid)
            return
        call, idx = entry
        if kind == P.OK:
            if call.sink is not None:
                try:
                    call.sink(idx, body, compact)
                except Exception as exc:  # noqa: BLE001 - fails this call, never the connection
                    call.fail(exc if isinstance(exc, ProtocolError)
                              else ProtocolError(f"{conn.origin}: a reply that cannot be used: {exc!r}"))
                    return
                if compact:  # all of it is in the sink's arrays now; a compact reply has no infos
                    body = FILLED
            elif compact:
                body = layout.reply_body(data)  # checked whole by reply_id above
            call.answer(idx, body)
        elif kind == P.ERROR:
            call.fail(P.parse_error(body, conn.origin))
        else:
            call.fail(ProtocolError(f"{conn.origin} answered with kind {kind!r}"))

    @staticmethod
    def _log_unknown(conn: WorkerConn, rid: int) -> None:
        """A reply to a request that is not pending (late after a timeout, or a
        bad peer's): at most one line a second per worker, so a flood of them
        cannot flood the log."""
        conn.unknown += 1
        now = time.monotonic()
        if now - conn.unknown_logged_at >= 1.0:
            more = f" (and {conn.unknown - 1} more since the last such line)" if conn.unknown > 1 else ""
            log.warning("%s answered unknown request %d; ignored%s", conn.origin, rid, more)
            conn.unknown = 0
            conn.unknown_logged_at = now

    def _send_direct(self, call: Call, batch: list) -> list:
        """On the caller's thread: write the requests to workers whose socket
        takes them at once; returns ``(index, conn, id, frame)`` of the others,
        for :meth:`_dispatch` on the loop thread.

        The call's bookkeeping stays on the loop thread: a failure here is
        handed to :meth:`_send_failed` there.
        """
        rest, ready = [], []
        with self._plock:  # all registered before the first is sent: replies may come at once
            for idx, (conn, rid, frame) in enumerate(batch):
                wire = conn.wire
                if wire is None or not wire.direct or not conn.alive:  # _dispatch says LOST or fails the call
                    rest.append((idx, conn, rid, frame))
                    continue
                conn.pending[rid] = (call, idx)
                ready.append((idx, conn, rid, frame, wire))
        for idx, conn, rid, frame, wire in ready:
            try:
                wire.send_from_thread(frame)
            except ConnectionError as exc:
                self._loop.call_soon_threadsafe(self._send_failed, call, idx, conn, rid, str(exc))
        return rest

    def _send_failed(self, call: Call, idx: int, conn: WorkerConn, rid: int, why: str) -> None:
        if conn.pending.pop(rid, None) is None:  # answered already: the worker was dropped
            return
        if call.tolerant:  # wait mode: the worker is lost, its part becomes LOST
            call.answer(idx, LOST)
            self._drop(conn, why, cut_off=True)
        else:
            call.fail(WorkerLostError(f"{conn.origin}: {why}"))

    def _dispatch(self, call: Call, items: list) -> None:
        """On the loop thread: register the requests and write their frames."""
        for idx, conn, rid, _ in items:
            if not conn.alive:
                if call.tolerant:  # wait mode: lost after the caller's layout(), before this
                    call.answer(idx, LOST)
                    continue
                call.fail(WorkerLostError(f"{conn.origin} is gone"))
                return
            conn.pending[rid] = (call, idx)
        if call.done:  # every worker was lost already
            return
        for _, conn, rid, frame in items:
            if rid not in conn.pending:  # lost meanwhile (wait mode: its part is LOST already)
                continue
            try:
                conn.wire.send(frame)
            except (ConnectionError, RuntimeError) as exc:
                if call.tolerant:  # wait mode: the worker is lost, its part becomes LOST
                    self._drop(conn, f"send failed: {exc}", cut_off=True)
                    continue
                conn.pending.pop(rid, None)
                call.fail(WorkerLostError(f"{conn.origin}: send failed: {exc}"))
                return

    async def _watch(self, heartbeat: float) -> None:
        """Heartbeats (rules in :mod:`ws_gym.liveness`): ping every worker heard
        from for half a heartbeat, busy or not, and cut off an idle one silent
        for 1.25 heartbeats. A busy worker on a dead link leaves the
        pings unacknowledged, and the kernel ends its connection."""
        interval = check_interval(heartbeat)
        while True:
            await asyncio.sleep(interval)
            now = self._loop.time()
            for conn in list(self.table.conns):
                live = conn.live
                if not conn.active or live is None:
                    continue
                if live.dead(now, conn.last_rx, bool(conn.pending)):
                    self._drop(conn, f"sent nothing for {now - conn.last_rx:.1f} s (heartbeat)", cut_off=True)
                elif live.ping_due(now, conn.last_rx):
                    try:
                        conn.wire.ping()
                    except (ConnectionError, RuntimeError):
                        self._drop(conn, cut_off=True)

    def _cut_off(self, call: Call) -> None:
        """Wait mode, after step_timeout: workers that still owe a reply are lost."""
        for conn, rid, _ in call.batch:
            if rid in conn.pending:
                self._drop(conn, "did not answer within step_timeout", cut_off=True)
        if not call.done:  # e.g. a reply raced the timeout: nothing owed any more
            call.finish()

    def _abandon(self, call: Call, items: list) -> None:
        for conn, rid, _ in items:
            conn.pending.pop(rid, None)

    # ---------------------------------------------------------- caller thread

    def serving(self) -> list[WorkerConn]:
        """The active workers, in env order, if they cover every env; else raise."""
        return self.table.serving()

    def layout(self) -> list[tuple[int, int, WorkerConn | None]]:
        """``(start, stop, worker)`` runs covering every env in order; ``None``
        where no active worker serves the envs (wait mode)."""
        return self.table.layout()

    def covered(self) -> int:
        return self.table.covered()

    def wait_covered(
        self,
        timeout: float,
        *,
        progress: Callable[[int], None] | None = None,
        check: Callable[[], None] | None = None,
        interval: float = 5.0,
    ) -> None:
        """Block until active workers cover every env, or raise ConnectTimeoutError."""
        self.table.wait_covered(timeout, self.url, progress=progress, check=check, interval=interval)

    # the table's, under the names the tests read
    @property
    def _slots(self) -> list[WorkerConn | None]:
        return self.table.slots

    @property
    def _conns(self) -> set[WorkerConn]:
        return self.table.conns

    def _ordered_all(self) -> list[WorkerConn]:
        return self.table.ordered_all()

    def wait_spaces(self, timeout: float, check: Callable[[], None] | None = None) -> P.Ready:
        deadline = time.monotonic() + timeout
        table = self.table
        with table.cond:
            while self.expect.ready is None:
                now = time.monotonic()
                if check is not None:
                    check()
                if now >= deadline:
                    raise ConnectTimeoutError(
                        f"no worker connected within {timeout:g} s to tell the env's spaces; "
                        f"workers connect to {self.url} (last event: {table.last_event()})"
                    )
                table.cond.wait(min(deadline - now, 0.5))
            return self.expect.ready

    def request(self, items: list[tuple[WorkerConn, str, Any]], timeout: float | None) -> list[Any]:
        """Send one request to each (worker, kind, body) and wait for every reply.

        Encoding is strict: an argument with no wire form raises
        ``codec.EncodeError`` (a TypeError) here rather than reach the env as a repr.
        """
        return self.wait(self.submit(items), timeout)

    def submit(self, items: list[tuple[WorkerConn, str, Any]], tolerant: bool = False,
               sink: Callable[[int, Any, bool], None] | None = None) -> Call:
        """Encode and send the requests without waiting; :meth:`wait` collects the replies.

        ``tolerant`` (wait mode only): a worker lost meanwhile gives :data:`LOST`
        as its reply instead of failing the call. ``sink(idx, body, compact)`` is
        given each ``ok`` body as soon as it is read, on the thread that read it;
        ``compact``: the body is the worker's compact reply frame, checked
        already, to copy with ``conn.compact.copy_reply`` (its reply is then
        :data:`FILLED`). An error the sink raises fails the call (as a
        ProtocolError), not the connection.
        """
        if self._closed:
            raise WsGymError("the trainer is closed")
        with self._call_lock:
            batch = []
            for conn, kind, body in items:
                rid = next(self._req_ids)
                frame = None
                if kind == P.STEP and conn.compact is not None:
                    frame = conn.compact.encode_request(rid, body["a"])
                batch.append((conn, rid, frame or codec.encode(kind, rid, body, strict=True)))
            call = Call(len(batch))
            call.batch = batch
            call.tolerant = tolerant and self.wait_mode
            call.sink = sink
            if not batch:
                call.finish()
            elif self._direct:
                rest = self._send_direct(call, batch)
                if rest:
                    self._loop.call_soon_threadsafe(self._dispatch, call, rest)
            else:
                self._loop.call_soon_threadsafe(self._dispatch, call, [(i, *b) for i, b in enumerate(batch)])
            return call

    def wait(self, call: Call, timeout: float | None) -> list[Any]:
        """The replies to a submitted call, in request order; raise its error or a timeout."""
        left = timeout
        if self.busy_poll and not call.done:  # returns at once when no polled worker owes the call
            left = poll_replies(call, timeout, self.busy_poll)
        if not call.lock.acquire(timeout=-1 if left is None else left):
            if call.tolerant:  # wait mode: the slow workers are lost, the call completes
                self._loop.call_soon_threadsafe(self._cut_off, call)
                if call.lock.acquire(timeout=10):
                    if call.error is not None:
                        raise call.error
                    return call.results
            batch = call.batch
            slow = [c.origin for c, rid, _ in batch if rid in c.pending] or [c.origin for c, _, _ in batch]
            self._loop.call_soon_threadsafe(self._abandon, call, batch)
            raise StepTimeoutError(f"no complete answer within {timeout:g} s from {', '.join(slow)}")
        if call.error is not None:
            raise call.error
        return call.results

    def close(self, timeout: float = 5.0) -> None:
        """Tell workers to close their envs, then stop the server and the loop."""
        if self._closed:
            return
        self._closing = True
        try:
            with self.table.cond:
                conns = [c for c in self.table.ordered_all() if c.active and c.alive]
            if conns and self._loop.is_running():
                try:
                    self.request([(c, P.CLOSE, {}) for c in conns], timeout)
                except WsGymError as exc:
                    log.debug("while closing workers: %s", exc)
        finally:
            self._closing = True
            self._closed = True
            if self._loop.is_running():
                try:
                    asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout)
                except Exception as exc:  # noqa: BLE001 - shutting down regardless
                    log.debug("server shutdown: %r", exc)
            self._stop_loop()

    async def _shutdown(self) -> None:
        for task in (self._watchdog, self._idle_poller):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)  # let it end before the loop stops
        for conn in list(self.table.conns):
            if conn.wire is not None:
                conn.wire.close(F.CLOSE_GOING_AWAY, "trainer closing")
            elif not conn.ws.closed:
                await conn.ws.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=b"trainer closing")
        if self._runner is not None:
            await self._runner.cleanup()

    def _stop_loop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
        if not self._thread.is_alive() and not self._loop.is_closed():
            self._loop.close()

