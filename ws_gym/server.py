"""The trainer's WebSocket server: workers dial in, pass the handshake, and
from then on their frames are read and written by a
:class:`~ws_gym.wire.FrameConnection`, not aiohttp's message API.

An aiohttp server runs on its own event loop in a background thread: the
token, the limit on pending handshakes, the handshake itself (its decisions
are :mod:`ws_gym.admission`'s), heartbeats (rules in :mod:`ws_gym.liveness`)
and shutdown. Each parsed reply goes down to the call book
(:mod:`ws_gym.calls`), and each ended connection to the call book and the slot
table (:meth:`Server.drop`); nothing below reaches back up but through the
call book's ``on_lost``.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import hmac
import logging
import os
import socket
import ssl
import threading
import time
from typing import Any

import aiohttp
from aiohttp import web

from . import codec, loops
from . import frames as F
from . import protocol as P
from .addresses import WS_PATH, format_url, is_loopback, loopback_for
from .admission import Admission, Expectation
from .calls import CallBook
from .config import DEFAULT_MAX_MSG_SIZE, Transport
from .connection import WorkerConn, WorkerState
from .dashboard import Dashboard
from .errors import HandshakeError, ProtocolError, WorkerLostError, WsGymError
from .forwarded import forwarded_client
from .liveness import check_interval, give_up_unacked, unacked_limit
from .polling import poll_idle
from .relay_link import RelayLink, RelaySettings
from .slots import SlotTable
from .stats import RunCounters, Stats
from .wire import FrameConnection, hand_back
from .wsio import receive_message

log = logging.getLogger("ws_gym")


class Server:
    """The aiohttp server, its loop thread, and the workers' connections on it."""

    def __init__(
        self,
        *,
        num_envs: int,
        expect: Expectation,
        transport: Transport,
        host: str = "127.0.0.1",
        port: int = 8765,
        token: str | None = None,
        max_msg_size: int = DEFAULT_MAX_MSG_SIZE,
        handshake_timeout: float = 10.0,
        ready_timeout: float = 300.0,
        max_pending_handshakes: int = 64,
        ssl_context: ssl.SSLContext | None = None,
        heartbeat: float | None = 10.0,
        wait_mode: bool = False,
        unix_path: str | None = None,
        busy_poll: float = 0.0,
        relay: RelaySettings | None = None,
        listen: bool = True,
        stats: Stats | None = None,
        dashboard_port: int | None = None,
        compression: str = "auto",
    ) -> None:
        self.num_envs = num_envs
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
        self.ssl_context = ssl_context
        self._pending_handshakes = 0  # connections upgraded but not yet admitted or refused
        self._busy_rejected = 0  # 503s not logged yet (logged at most once a second)
        self._busy_logged_at = float("-inf")
        self.table = SlotTable(num_envs)  # which worker serves which envs
        self.admission = Admission(self.table, expect, heartbeat=heartbeat, compact=transport.compact,
                                   compression=compression, max_msg_size=max_msg_size)
        self._direct = transport.direct  # caller-thread writes (see wire.py)
        self._loop = loops.new_event_loop(transport.uvloop)
        # seconds a waiting caller reads its replies itself before it sleeps (0: the loop reads)
        self.busy_poll = busy_poll if self._direct else 0.0
        self.calls = CallBook(self._loop, direct=self._direct, wait_mode=wait_mode, busy_poll=self.busy_poll,
                              on_lost=functools.partial(self.drop, cut_off=True))
        self._tasks: list[asyncio.Future] = []  # heartbeats, idle polling
        # GET /, /status, /metrics (ws_gym.dashboard): on this port; with a relay on dashboard_port
        self.dashboard = Dashboard(stats or Stats(RunCounters(num_envs)), lambda: self.table.conns, self._loop,
                                   token=self.token, refuse_proxied=self.refuse_proxied, tls=ssl_context is not None)
        self._dashboard_port = dashboard_port
        self.dashboard_port: int | None = None  # where the dashboard listens, if not on `port`
        self._closing = False
        self._closed = False
        self._runner: web.AppRunner | None = None
        self.relay: RelayLink | None = None
        self._thread = threading.Thread(target=self._run_loop, name="ws_gym-trainer-loop", daemon=True)
        self._thread.start()
        try:
            fut = asyncio.run_coroutine_threadsafe(self._start(host, port, listen, relay), self._loop)
            self.port: int | None = fut.result(timeout=30 if relay is None else 45 + handshake_timeout)
        except BaseException:
            self._stop_loop()
            raise
        tls = ssl_context is not None
        # local workers dial the listening socket (or the Unix socket); remote ones `url`
        self.local_url = format_url(loopback_for(host), self.port or 0, tls)
        self.url = self.relay.worker_url if self.relay is not None else format_url(host, self.port or 0, tls)

    @property
    def expect(self) -> Expectation:
        return self.admission.expect

    # ------------------------------------------------------------ loop thread

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self.calls.loop_thread = threading.get_ident()
        self._loop.run_forever()

    async def _start(self, host: str, port: int, listen: bool, relay: RelaySettings | None) -> int | None:
        app = web.Application()
        app.router.add_get(WS_PATH, self._handle)
        if relay is None:  # a relay's workers reach this app: the dashboard gets its own then
            self.dashboard.add_routes(app)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        bound = await self._listen(host, port) if listen else None
        try:
            self.dashboard_port = await self.dashboard.start(None if relay is None else self._dashboard_port or 0)
        except BaseException:
            await self._runner.cleanup()
            raise
        if relay is not None:  # remote workers come through the relay's room
            runner_server = self._runner.server
            assert runner_server is not None
            self.relay = RelayLink(relay, runner_server, heartbeat=self.heartbeat,
                                   timeout=self.handshake_timeout)
            try:
                await self.relay.open(30.0)
            except BaseException:
                await self.relay.close()
                await self.dashboard.close()
                await self._runner.cleanup()
                raise
            self._tasks.append(asyncio.ensure_future(self.relay.run()))
        if self.heartbeat:
            self._tasks.append(asyncio.ensure_future(self._watch(self.heartbeat)))
        if self.busy_poll:
            self._tasks.append(asyncio.ensure_future(poll_idle(lambda: self.table.conns)))
        return bound

    async def _listen(self, host: str, port: int) -> int:
        assert self._runner is not None
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
        # autoping off: the frame layer answers pings itself and sees pongs (heartbeats)
        ws = web.WebSocketResponse(max_msg_size=self.max_msg_size, compress=False, autoping=False)
        conn = None
        try:
            await ws.prepare(request)
            try:
                local = client is None and _on_this_machine(request.transport)
                conn = await self._handshake(ws, peer, request.transport, local)
                if conn is not None:
                    conn.last_rx = self._loop.time()
            finally:
                self._pending_handshakes -= 1
                pending = False
            if conn is not None:
                await self._serve(conn)  # returns once the transport is closed or closing
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
                self.drop(conn)
            if taken_over:  # aiohttp cleans up as after any disconnect
                assert conn is not None
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

    async def _handshake(self, ws: web.WebSocketResponse, peer: str, transport: Any,
                         local: bool = False) -> WorkerConn | None:
        msg = await receive_message(ws, self.handshake_timeout, "during the handshake")
        if msg.kind != P.HELLO:
            raise ProtocolError(f"the first message must be hello, got {msg.kind!r}")
        hello = P.parse_hello(msg.body)
        stale = self.admission.stale(hello)
        if stale is not None:  # its link died and we have not noticed yet: the worker knows better
            self.drop(stale, "dialed in again: its old connection was dead", cut_off=True)
        conn = self.admission.admit(hello, peer, local)
        conn.ws, conn.transport = ws, transport
        try:
            welcome = self.admission.welcome(conn)
            await ws.send_bytes(codec.encode(P.WELCOME, 0, P.make_welcome(welcome), strict=True))
            msg = await receive_message(ws, self.ready_timeout, "during the handshake")
            if msg.kind == P.ERROR:
                err = P.parse_error(msg.body, conn.origin)
                text = f"{conn.origin} could not start its envs: {err.remote_type}: {err.remote_message}"
                log.error("%s", text)
                self.table.note(text)
                self.admission.release(conn)
                return None
            if msg.kind != P.READY:
                raise ProtocolError(f"expected ready, got {msg.kind!r}")
            self.admission.ready(P.parse_ready(msg.body), conn)
        except BaseException:
            self.admission.release(conn)
            raise
        # From here on this connection's frames bypass aiohttp's message API. The
        # worker sends nothing between its ready and our accept, so no byte of it
        # can be left behind in aiohttp's parser.
        conn.wire, conn.aiohttp_protocol = FrameConnection.take_over(
            transport, client=False, max_size=self.max_msg_size, loop=self._loop,
            on_message=functools.partial(self._on_message, conn),
            on_control=functools.partial(self._on_control, conn),
        )
        if self._direct and conn.wire.enable_direct() and self.busy_poll:
            conn.wire.claim_reading()  # the worker sends nothing before our accept
        if self.heartbeat:  # a dead link ends a busy connection too (see ws_gym.liveness)
            give_up_unacked(transport.get_extra_info("socket"), unacked_limit(self.heartbeat))
        conn.wire.send(codec.encode(P.ACCEPT, 0, {}))
        self.dashboard.stats.joined(conn)
        self.table.activate(conn)
        log.info("%s joined (%d envs%s)", conn.origin, conn.count, "" if conn.compression == "none" else
                 f"; observations compressed with {conn.compression}{' while it pays' if conn.compress_auto else ''}")
        return conn

    def drop(self, conn: WorkerConn, why: str = "disconnected", *, cut_off: bool = False) -> None:
        """The connection ended: free its slots and fail what it still owes.

        With ``on_worker_lost="wait"`` a step or reset does not fail: the lost
        worker's part of it becomes :data:`~ws_gym.calls.LOST` and the caller fills it in.
        """
        lost = self.calls.lose(conn)  # no request is registered for it after this
        if lost is None:
            return
        before, owed = lost
        self.table.changed()
        self.admission.release(conn)
        if owed:
            self.calls.settle(owed, WorkerLostError(f"{conn.origin} {why} during a call"))
        if cut_off and conn.transport is not None:
            # nothing more is read from or sent to it (the frame layer's abort also
            # closes its duplicate socket at once, so the worker sees the cut now)
            (conn.wire or conn.transport).abort()
        if before is WorkerState.ACTIVE and not self._closing:
            text = f"{conn.origin} {why}"
            log.warning("%s", text)
            self.table.note(text)
            self.dashboard.stats.lost(conn, text)

    async def _serve(self, conn: WorkerConn) -> None:
        """Wait until the connection ends (replies go to the call book as they are parsed)."""
        wire = conn.wire
        assert wire is not None  # taken over from aiohttp before serving
        try:
            code, reason = await wire.done
            log.debug("%s closed its connection (%s %s)", conn.origin, code, reason)
        except F.FrameError as exc:
            if exc.code == F.CLOSE_TOO_BIG:
                log.warning("closed the connection from %s: a message exceeded max_msg_size (%d bytes)",
                            conn.peer, self.max_msg_size)
            else:
                log.warning("closed the connection from %s: %s", conn.origin, exc)
        except (ConnectionError, OSError) as exc:
            log.debug("connection from %s ended: %r", conn.peer, exc)
            if self.heartbeat and (isinstance(exc, TimeoutError) or getattr(exc, "errno", None) == errno.ETIMEDOUT):
                # the kernel gave up on unacknowledged bytes (see ws_gym.liveness)
                self.drop(conn, f"acknowledged nothing for {unacked_limit(self.heartbeat):g} s: "
                                "link dead (heartbeat)")

    def _on_control(self, conn: WorkerConn) -> None:
        conn.last_rx = self._loop.time()

    def _on_message(self, conn: WorkerConn, data: Any) -> None:
        """One binary message from a worker, on the thread that read it."""
        conn.last_rx = self._loop.time()
        self.calls.on_reply(conn, data)

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
                    self.drop(conn, f"sent nothing for {now - conn.last_rx:.1f} s (heartbeat)", cut_off=True)
                elif live.ping_due(now, conn.last_rx):
                    try:
                        conn.wire.ping()
                    except (ConnectionError, RuntimeError):
                        self.drop(conn, cut_off=True)

    # ---------------------------------------------------------- caller thread

    def close(self, timeout: float = 5.0) -> None:
        """Tell workers to close their envs, then stop the server and the loop."""
        if self._closed:
            return
        self._closing = True
        try:
            with self.table.cond:
                conns = [c for c in self.table.ordered_all() if c.active]
            if conns and self._loop.is_running():
                try:
                    self.calls.request([(c, P.CLOSE, {}) for c in conns], timeout)
                except WsGymError as exc:
                    log.debug("while closing workers: %s", exc)
        finally:
            self._closed = self.calls.closed = True
            if self._loop.is_running():
                try:
                    asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout)
                except Exception as exc:  # noqa: BLE001 - shutting down regardless
                    log.debug("server shutdown: %r", exc)
            self._stop_loop()

    async def _shutdown(self) -> None:
        for task in self._tasks:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)  # let it end before the loop stops
        if self.relay is not None:  # the relay closes the room's connections too
            await self.relay.close()
        await self.dashboard.close()
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


def _on_this_machine(transport: Any) -> bool:
    """Whether a connection comes from this machine: a Unix socket or a loopback peer."""
    if transport is None:
        return False
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family == getattr(socket, "AF_UNIX", None):
        return True
    peer = transport.get_extra_info("peername")
    host = str(peer[0]) if isinstance(peer, tuple) and peer else ""
    return is_loopback(host.removeprefix("::ffff:"))
