"""A relay that a trainer and its workers both dial out to: ``python -m ws_gym.relay``.

When the trainer is behind NAT too, both sides can still reach a relay on a
public machine. The trainer holds a control WebSocket (``B/trainer``) and is
told of each worker that arrives (``B/room/<room>/ws``); it opens a data
connection for it (``B/room/<room>/accept/<id>``), and from then on the relay
copies bytes between the two without reading them: the worker's handshake,
token and frames reach the trainer's own server unchanged. The rules (rooms,
limits, routes, the forwarded head) are :mod:`ws_gym.rooms`'s.

aiohttp parses each request; a paired connection's transport is then taken
over with ``transport.set_protocol`` (as :mod:`ws_gym.server` does) and given
back, closed, with :func:`ws_gym.wire.hand_back`, so that aiohttp's cleanup
runs. The handler keeps running until then (returning earlier would let
aiohttp write a response into the spliced stream); afterwards aiohttp has no
transport, so what the handler returns is never written.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import secrets
import signal
import socket
import ssl
import sys
import time
from typing import Any, Sequence

import aiohttp
from aiohttp import http_exceptions, web

from . import loops
from .rooms import (NO_TRAINER, NOT_TAKEN, Limits, Refused, Rooms, Throttle, bearer_token, rewrite_head, route,
                    same_secret)
from .wire import hand_back

log = logging.getLogger("ws_gym.relay")

TOKEN_ENV = "WS_GYM_RELAY_TOKEN"
ROOM_HEADER = "X-WS-Gym-Room"
KEY_HEADER = "X-WS-Gym-Room-Key"
GO = b"go"  # on a data connection: the trainer has taken its end over, the relay may send the head
MAX_CONTROL_MESSAGE = 64 * 1024
LISTENING = "ws_gym relay: listening on {url}"
CLOSING = "the relay is closing"
NOT_UPGRADE = "expected a WebSocket upgrade"
BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nConnection: close\r\n"
        b"Content-Length: 35\r\n\r\nws_gym relay: too many connections\n")
_now = time.monotonic  # the rooms' clock


class _End(asyncio.Protocol):
    """One transport of a splice: what it receives is written to its peer's.

    While this transport's write buffer is above its high-water mark its peer
    is not read. When either side ends, the other is closed once its buffer
    is flushed, or aborted if it is not read within ``linger`` seconds."""

    peer: _End

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop, linger: float) -> None:
        self.transport = transport
        self.previous = transport.get_protocol()  # aiohttp's, to hand back
        self.lost: asyncio.Future = loop.create_future()
        self._loop, self._linger = loop, linger
        self._abort: asyncio.TimerHandle | None = None

    def data_received(self, data: bytes) -> None:
        if not self.peer.transport.is_closing():  # else nobody is left to take it
            self.peer.transport.write(data)

    def eof_received(self) -> bool:
        self.peer.close()
        self._arm()
        return False  # the transport closes itself once its buffer is flushed

    def connection_lost(self, exc: Exception | None) -> None:
        if self._abort is not None:
            self._abort.cancel()
        if not self.lost.done():
            self.lost.set_result(exc)
        self.peer.close()

    def pause_writing(self) -> None:
        self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        self.peer.transport.resume_reading()

    def close(self) -> None:
        if not self.lost.done():
            self.transport.close()
            self._arm()

    def _arm(self) -> None:
        if self._abort is None and not self.lost.done():
            self._abort = self._loop.call_later(self._linger, self.transport.abort)

    def give_back(self) -> None:
        """Hand the transport back to aiohttp, closed (ended now if it is not yet)."""
        if not self.lost.done():  # the handler was cancelled (shutdown)
            self.transport.abort()
        hand_back(self.transport, self.previous)


class Splice:
    """A worker's connection and the trainer's data connection for it, joined."""

    def __init__(self, worker: asyncio.Transport, trainer: asyncio.Transport, head: bytes,
                 loop: asyncio.AbstractEventLoop, linger: float) -> None:
        self.worker, self.trainer = _End(worker, loop, linger), _End(trainer, loop, linger)
        self.worker.peer, self.trainer.peer = self.trainer, self.worker
        # Bytes sent behind an upgrade request wait in aiohttp's protocol; a
        # ws_gym worker sends none before its 101, but forward any.
        tail = getattr(self.worker.previous, "_message_tail", b"")
        # No await in between: no byte can reach the wrong protocol.
        worker.set_protocol(self.worker)
        trainer.set_protocol(self.trainer)
        trainer.write(head + tail if isinstance(tail, bytes) else head)
        for end in (self.worker, self.trainer):
            if not end.transport.is_reading():  # aiohttp may have paused it
                end.transport.resume_reading()

    def close(self) -> None:
        self.worker.close()
        self.trainer.close()


class _Worker:
    """A worker's held request: ``outcome`` becomes its :class:`Splice`, or the
    reason (text) it is turned away for."""

    def __init__(self, request: web.Request, loop: asyncio.AbstractEventLoop) -> None:
        self.request = request
        self.outcome: asyncio.Future = loop.create_future()

    def turn_away(self, reason: str) -> None:
        if not self.outcome.done():  # else paired, or turned away already
            self.outcome.set_result(reason)

    def drop(self, reason: str) -> None:
        """Turn it away, or close its splice."""
        self.turn_away(reason)
        if isinstance(self.outcome.result(), Splice):
            self.outcome.result().close()


_HTTP_LOG = logging.getLogger("ws_gym.relay.http")  # aiohttp's server log, for the relay
_HTTP_THROTTLE = Throttle()


def _tame(record: logging.LogRecord) -> bool:
    """aiohttp logs each malformed request as an error with a traceback; from a
    hostile client's flood that becomes one short warning a second."""
    exc = record.exc_info[1] if record.exc_info else None
    if record.levelno < logging.WARNING or not isinstance(exc, (http_exceptions.HttpProcessingError, ConnectionError)):
        return True
    held = _HTTP_THROTTLE.allow("bad request", time.monotonic())
    if held is None:
        return False
    record.msg, record.args = "%s: %s%s", (record.getMessage(), str(exc)[:200], f" (and {held} more)" * bool(held))
    record.exc_info, record.exc_text, record.levelno, record.levelname = None, None, logging.WARNING, "WARNING"
    return True


_HTTP_LOG.addFilter(_tame)


class _Gate(asyncio.Protocol):
    """Every accepted connection, once connected (after TLS): counted against
    ``max_connections`` exactly there, then handed to aiohttp, or answered 503."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    def connection_made(self, transport: Any) -> None:  # uvloop's transports are not asyncio.Transport
        relay = self.relay
        server = relay._runner.server if relay._runner is not None and not relay._closing else None
        if server is None or len(server.connections) >= relay.rooms.limits.max_connections:
            if server is not None:
                relay._warn("busy", "refused a connection: %d open (--max-connections)", len(server.connections))
            transport.write(BUSY)
            transport.close()
            return
        handler = server()
        transport.set_protocol(handler)
        handler.connection_made(transport)


class Relay:
    """The relay's server on the running event loop: ``await start()`` (returns
    the bound port, also :attr:`port`), ``await close()``."""

    def __init__(self, token: str, *, host: str = "127.0.0.1", port: int = 0, limits: Limits | None = None,
                 handshake_timeout: float = 10.0, heartbeat: float | None = 10.0,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        if not token or handshake_timeout <= 0 or (heartbeat or 0) < 0:
            raise ValueError("the relay needs a trainer token, a positive handshake timeout and no negative heartbeat")
        self.token, self.host, self.port = token, host, port
        self.rooms = Rooms(limits)
        self.handshake_timeout = handshake_timeout
        self.heartbeat = heartbeat or None
        self.ssl_context = ssl_context
        self.throttle = Throttle()
        self._closing = False
        self._runner: web.AppRunner | None = None
        self._server: asyncio.AbstractServer | None = None

    @property
    def url(self) -> str:
        """The base URL B of the routes, as bound (``ws://host:port``)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'wss' if self.ssl_context else 'ws'}://{host}:{self.port}"

    def open_connections(self) -> int:
        """Every connection aiohttp has (those spliced too, until handed back)."""
        server = self._runner.server if self._runner is not None else None
        return len(server.connections) if server is not None else 0

    async def start(self) -> int:
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._route)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2.0,
                                     keepalive_timeout=self.handshake_timeout, logger=_HTTP_LOG)
        await self._runner.setup()
        family, _, _, _, addr = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            if os.name == "posix":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            self._server = await asyncio.get_running_loop().create_server(
                lambda: _Gate(self), sock=sock, backlog=1024, ssl=self.ssl_context,
                ssl_handshake_timeout=self.handshake_timeout if self.ssl_context else None)
        except BaseException:
            sock.close()
            await self._runner.cleanup()
            raise
        self.port = sock.getsockname()[1]
        return self.port

    async def close(self) -> None:
        """Close every connection (workers see it and dial again) and stop."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        controls = []
        for room in list(self.rooms.rooms.values()):
            trainer, told = room.trainer, room.told
            for handle in self.rooms.trainer_left(room, trainer, _now()):
                handle.drop(CLOSING)
            if told:
                controls.append(trainer.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=CLOSING.encode()))
        try:  # each waits for the trainer's close frame, up to the response's timeout
            await asyncio.wait_for(asyncio.gather(*controls, return_exceptions=True), 3.0)
        except asyncio.TimeoutError:
            pass
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()  # waits for the handlers (they hand their transports back)

    # -- requests ----------------------------------------------------------------

    async def _route(self, request: web.Request) -> web.StreamResponse:
        name, args = route(request.raw_path.partition("?")[0])
        try:
            if request.method != "GET":
                raise Refused(405, "GET only", "bad request")
            if name == "trainer":
                return await self._trainer(request)
            if name == "worker":
                return await self._worker(request, *args)
            if name == "accept":
                return await self._accept(request, *args)
        except Refused as refused:
            who = {"trainer": "a trainer", "worker": "a worker", "accept": "a data connection"}.get(name, "a request")
            self._warn(refused.kind, "refused %s from %s: %d %s", who, request.remote, refused.status, refused.reason)
            headers = {"WWW-Authenticate": 'Bearer realm="ws_gym relay"'} if refused.status == 401 else None
            response = web.Response(status=refused.status, reason=refused.reason, headers=headers,
                                    text=f"ws_gym relay: {refused.reason}\n")
            response.force_close()
            return response
        if name == "page":
            self._expire()
            rooms, conns = self.rooms.counts()
            return web.Response(text=f"ws_gym relay: {rooms} rooms, {conns} connections\n")
        return web.Response(status=404, text="ws_gym relay: not found\n")

    def _warn(self, kind: str, msg: str, *args: Any) -> None:
        """At most one warning a second per kind (see :class:`ws_gym.rooms.Throttle`)."""
        held = self.throttle.allow(kind, _now())
        if held is not None:
            log.warning(msg + (f" (and {held} more like it)" if held else ""), *args)

    def _expire(self) -> None:
        for room in self.rooms.expire(_now()):
            log.info("room %s… forgotten: its trainer did not come back", room.id[:6])

    async def _trainer(self, request: web.Request) -> web.StreamResponse:
        """A trainer's control connection: its room, then an ``open`` per worker."""
        given = bearer_token(request.headers.get("Authorization"))
        if given is None or not same_secret(given, self.token):
            raise Refused(401, "wrong or missing trainer token", "token")
        ws = web.WebSocketResponse(heartbeat=self.heartbeat, max_msg_size=MAX_CONTROL_MESSAGE, compress=False,
                                   timeout=2.0)
        if not ws.can_prepare(request).ok:
            raise Refused(400, NOT_UPGRADE, "bad request")
        if self._closing:
            raise Refused(503, CLOSING, "busy")
        self._expire()
        room, reclaimed = self.rooms.open(ws, _now(), request.headers.get(ROOM_HEADER), request.headers.get(KEY_HEADER))
        try:
            await ws.prepare(request)
            await ws.send_str(json.dumps({"type": "room", "room": room.id, "key": room.key}))
            room.told = True
            log.info("room %s… %s by a trainer at %s", room.id[:6], "reclaimed" if reclaimed else "opened",
                     request.remote)
            async for msg in ws:  # text is ignored; pongs are aiohttp's
                if msg.type is aiohttp.WSMsgType.BINARY:
                    self._warn("control", "closed a trainer's control connection: it sent a binary message")
                    await ws.close(code=aiohttp.WSCloseCode.UNSUPPORTED_DATA, message=b"text only")
                elif msg.type is aiohttp.WSMsgType.ERROR:  # too big, or no pong in time
                    self._warn("control", "closed a trainer's control connection: %r", ws.exception())
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    break
        except (ConnectionError, aiohttp.ClientError, asyncio.TimeoutError) as exc:
            log.debug("a trainer's control connection ended: %r", exc)
        finally:
            told, dropped = room.told and room.trainer is ws, self.rooms.trainer_left(room, ws, _now())
            for handle in dropped:
                handle.drop(NO_TRAINER)
            if told:
                log.info("room %s… closed: its trainer left (%d worker connections closed); kept for its key "
                         "for %g s", room.id[:6], len(dropped), self.rooms.limits.room_grace)
            if ws.prepared and not ws.closed:
                await ws.close()
        return ws

    async def _worker(self, request: web.Request, room_id: str) -> web.StreamResponse:
        """A worker's request, held until the trainer takes it, then spliced."""
        connection = {t.strip().lower() for t in request.headers.get("Connection", "").split(",")}
        if (request.headers.get("Upgrade", "").lower() != "websocket" or "upgrade" not in connection
                or request.content_length or "Transfer-Encoding" in request.headers):
            raise Refused(400, NOT_UPGRADE, "bad request")
        loop = asyncio.get_running_loop()
        worker = _Worker(request, loop)
        self._expire()
        room, conn_id = self.rooms.arrive(room_id, worker, _now(), self.open_connections())
        splice = None
        try:
            deadline = loop.time() + self.handshake_timeout
            try:
                await asyncio.wait_for(room.trainer.send_str(json.dumps({"type": "open", "id": conn_id})),
                                       self.handshake_timeout)
            except (ConnectionError, RuntimeError, asyncio.TimeoutError):
                worker.turn_away(NO_TRAINER)
            await asyncio.wait([worker.outcome], timeout=max(0.0, deadline - loop.time()))
            worker.turn_away(NOT_TAKEN)
            if not isinstance(worker.outcome.result(), Splice):
                raise Refused(503, worker.outcome.result(), "not taken")
            splice = worker.outcome.result()
            log.info("worker at %s paired in room %s…", request.remote, room.id[:6])
            await splice.worker.lost
            log.info("worker at %s in room %s… ended", request.remote, room.id[:6])
        finally:
            self.rooms.leave(room, conn_id)
            if splice is not None:
                splice.worker.give_back()
        return web.Response()  # never written: aiohttp has no transport any more

    async def _accept(self, request: web.Request, room_id: str, conn_id: str) -> web.StreamResponse:
        """The trainer's data connection for a waiting worker: ``go``, then spliced."""
        # no heartbeat, no compression: aiohttp must write nothing once the splice has the transport
        ws = web.WebSocketResponse(max_msg_size=1024, compress=False, timeout=2.0)
        if not ws.can_prepare(request).ok:
            raise Refused(400, NOT_UPGRADE, "bad request")
        room, worker = self.rooms.take(room_id, conn_id, request.headers.get(KEY_HEADER, ""))
        splice = None
        try:
            await ws.prepare(request)
            problem = await self._wait_go(ws, worker)
            theirs, ours = worker.request.transport, request.transport
            if problem is not None or theirs is None or theirs.is_closing() or ours is None:
                self._warn("not taken", "a data connection for room %s… failed: %s", room.id[:6],
                           problem or "a connection closed")
            else:
                head = rewrite_head(worker.request.raw_path, worker.request.raw_headers, worker.request.remote)
                splice = Splice(theirs, ours, head, asyncio.get_running_loop(), self.handshake_timeout)
                worker.outcome.set_result(splice)
                await splice.trainer.lost
        except (ConnectionError, aiohttp.ClientError) as exc:
            log.debug("a data connection ended: %r", exc)
        finally:
            if splice is not None:
                splice.trainer.give_back()
            else:
                worker.turn_away(NOT_TAKEN)
                if ws.prepared and not ws.closed:
                    await ws.close()
        return ws

    async def _wait_go(self, ws: web.WebSocketResponse, worker: _Worker) -> str | None:
        """Wait for the trainer's ``go``; None once it came, else what went wrong."""
        receive = asyncio.ensure_future(ws.receive())
        try:
            await asyncio.wait([receive, worker.outcome], timeout=self.handshake_timeout,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not receive.done():
                receive.cancel()
                await asyncio.gather(receive, return_exceptions=True)
        if worker.outcome.done() or receive.cancelled():
            return "the worker's wait ended" if worker.outcome.done() else "no go message in time"
        msg = receive.result()
        return None if msg.type is aiohttp.WSMsgType.BINARY and msg.data == GO else f"expected go, got {msg.type.name}"


# -- command line ----------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ws-gym-relay", description="A relay that a ws_gym trainer and its workers "
                                "both dial out to, for a trainer behind NAT.")
    add = p.add_argument
    add("--host", default="0.0.0.0", help="address to listen on (default: all interfaces)")
    add("--port", type=int, default=8080, help="port (0: any free one; default 8080)")
    add("--certfile", help="TLS certificate (PEM): serve wss:// and https://")
    add("--keyfile", help="its private key (PEM), unless in --certfile")
    add("--trainer-token", help=f"the token trainers present (default: ${TOKEN_ENV}, else a generated one)")
    add("--max-rooms", type=int, default=64)
    add("--max-room-connections", type=int, default=256, help="per room: waiting and paired workers")
    add("--max-connections", type=int, default=4096, help="open connections of every kind")
    add("--handshake-timeout", type=float, default=10.0, help="seconds for each step of a pairing")
    add("--room-grace", type=float, default=60.0, help="seconds a room is kept for its trainer's return")
    add("--heartbeat", type=float, default=10.0, help="seconds between pings of a trainer (0: none)")
    add("--log-level", default="INFO", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


async def _serve(relay: Relay) -> None:
    """Run until SIGINT or SIGTERM, then close everything."""
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # removed when the loop closes
        try:
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError, ValueError):  # Windows: Ctrl+C raises KeyboardInterrupt
            pass
    try:
        await relay.start()
        print(LISTENING.format(url=relay.url), file=sys.stderr, flush=True)
        await stop.wait()
        log.info("stopping")
    finally:
        await relay.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.keyfile and not args.certfile:
        parser.error("--keyfile needs --certfile")
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    token = args.trainer_token or os.environ.get(TOKEN_ENV)
    if not token:
        token = secrets.token_urlsafe(32)
        print(f"ws_gym relay: no --trainer-token or {TOKEN_ENV} given; generated trainer token: {token}\n"
              f"ws_gym relay: trainers pass it as relay_token={token!r}", file=sys.stderr, flush=True)
    try:
        ctx = None
        if args.certfile:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(args.certfile, args.keyfile)
        limits = Limits(args.max_rooms, args.max_room_connections, args.max_connections, args.room_grace)
        relay = Relay(token, host=args.host, port=args.port, limits=limits, handshake_timeout=args.handshake_timeout,
                      heartbeat=args.heartbeat, ssl_context=ctx)
    except (OSError, ValueError) as exc:  # a certificate that does not load, a limit that is not positive
        print(f"ws_gym relay: {exc}", file=sys.stderr, flush=True)
        return 1
    try:
        loops.run(_serve(relay))
    except KeyboardInterrupt:
        pass
    except OSError as exc:  # the port is taken, the host is not ours
        print(f"ws_gym relay: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
