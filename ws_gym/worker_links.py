"""How a worker's frames move once the handshake's welcome is in: its session links.

A link finishes the handshake (ready, accept) and then answers the trainer's
requests until the session ends. :class:`WireLink` takes the connection's
transport over from aiohttp and answers each request inside ``data_received``
(:class:`~ws_gym.wire.FrameConnection`), the fast path; :class:`AiohttpLink`
stays on aiohttp's message API, where the transport is not reachable. The
replies themselves come from :func:`ws_gym.replies.reply`; a link counts
the step requests it answers (``steps``) and passes on the pongs to its own
pings (``ping``, ``on_pong``) for :mod:`ws_gym.worker_status`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, Callable

import aiohttp

from . import codec, replies
from . import frames as F
from . import protocol as P
from .config import Transport
from .errors import ProtocolError
from .wire import FrameConnection, hand_back
from .wsio import receive_message

if TYPE_CHECKING:
    from .client import Worker
    from .host import EnvHost

log = logging.getLogger("ws_gym.worker")


class SessionClosed(Exception):
    """The trainer closed the session politely."""


class AiohttpLink:
    """The rest of a session on aiohttp's own message API: the portable fallback."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, worker: Worker) -> None:
        self.ws, self.worker = ws, worker
        self.steps = 0  # step requests answered (for ws_gym.worker_status)
        self.on_pong: Callable[[bytes], None] | None = None  # the status line's RTT

    async def ping(self, payload: bytes) -> None:
        await self.ws.ping(payload)

    async def send(self, frame: bytes) -> None:
        await self.ws.send_bytes(frame)

    async def receive(self, timeout: float) -> codec.Message:
        return await receive_message(self.ws, timeout, "during the handshake")

    async def serve(self, host: EnvHost) -> None:
        """Answer requests with aiohttp's message API (when the transport cannot be taken over)."""
        ws, worker = self.ws, self.worker
        receive, send, reply = ws.receive, ws.send_bytes, worker.reply
        BINARY, PING = aiohttp.WSMsgType.BINARY, aiohttp.WSMsgType.PING
        STEP, CLOSE = P.STEP, P.CLOSE
        now = asyncio.get_running_loop().time
        worker._last_rx = now()
        while True:
            msg = await receive()
            worker._last_rx = now()
            if msg.type != BINARY:
                if msg.type == PING:  # the trainer's heartbeat
                    await ws.pong(msg.data)
                    continue
                if msg.type == aiohttp.WSMsgType.PONG:  # to the status line's ping
                    if self.on_pong is not None:
                        self.on_pong(msg.data)
                    continue
                if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
                    raise ConnectionResetError("the trainer closed the connection")
                if msg.type == aiohttp.WSMsgType.ERROR:
                    raise ConnectionResetError(f"connection error: {ws.exception()!r}")
                continue  # text frames are not part of the protocol: ignore them
            frame, kind = reply(host, msg.data)
            await send(frame)
            worker._last_rx = now()  # a long step is not silence
            if kind == STEP:
                self.steps += 1
            elif kind == CLOSE:
                raise SessionClosed()

    def abort(self) -> None:
        transport = getattr(getattr(self.ws, "_conn", None), "transport", None)  # as WireLink.take_over
        if transport is not None:
            transport.abort()

    def end(self) -> None:
        pass  # aiohttp closes its own connection


class WireLink:
    """The rest of a session on a :class:`~ws_gym.wire.FrameConnection`: each
    request is answered inside the transport's ``data_received``."""

    _host: EnvHost  # set by serve(), before the first request is answered

    def __init__(self, worker: Worker, transport: asyncio.Transport) -> None:
        self.worker = worker
        self.transport = transport
        self.loop = asyncio.get_running_loop()
        self._inbox: list = []  # handshake messages not yet received
        self._waiter: asyncio.Future | None = None
        self._serving = False
        self.steps = 0  # step requests answered (for ws_gym.worker_status)
        self.on_pong: Callable[[bytes], None] | None = None  # the status line's RTT
        self.wire, self._aiohttp = FrameConnection.take_over(
            transport, client=True, max_size=worker.max_msg_size, loop=self.loop,
            on_message=self._on_message, on_control=self._heard, on_pong=self._pong,
        )
        if worker.unix_socket:  # the trainer's private socket: no intermediary to protect (frames.py)
            self.wire.mask_key = F.ZERO_KEY
        # Unmasked (zero key), a big reply's pieces are written as they are, by
        # our own sendmsg (the transport would keep views of them): no join.
        self._parts = self.wire.mask_key == F.ZERO_KEY and self.wire.enable_direct()

    @classmethod
    def take_over(cls, ws: aiohttp.ClientWebSocketResponse, worker: Worker) -> WireLink | None:
        """A link on the connection's transport, or None where aiohttp does not
        show it (its ``_conn`` is private): then the session stays on aiohttp's API."""
        if not Transport.from_environment().wire:
            return None
        conn = getattr(ws, "_conn", None)
        transport = getattr(conn, "transport", None)
        if transport is None or not all(
            hasattr(transport, m) for m in ("set_protocol", "get_protocol", "write", "writelines")
        ):
            log.debug("aiohttp's connection transport is not reachable; using its message API")
            return None
        try:
            link = cls(worker, transport)
        except (NotImplementedError, RuntimeError) as exc:  # a transport that cannot switch protocols
            log.debug("cannot take the connection over (%r); using aiohttp's message API", exc)
            return None
        log.debug("serving on the frame layer (%s)", type(transport).__name__)
        return link

    def _heard(self) -> None:
        self.worker._last_rx = self.loop.time()

    def _pong(self, payload: bytes) -> None:
        if self.on_pong is not None:
            self.on_pong(payload)

    async def ping(self, payload: bytes) -> None:
        self.wire.ping(payload)

    def _on_message(self, data: Any) -> None:
        worker = self.worker
        worker._last_rx = self.loop.time()
        if not self._serving:  # still in the handshake: for receive()
            self._inbox.append(data)
            if self._waiter is not None and not self._waiter.done():
                self._waiter.set_result(None)
            return
        frame, kind = replies.reply(self._host, data, self._parts)
        self.wire.send(frame)
        worker._last_rx = self.loop.time()  # a long step is not silence
        if kind == P.STEP:
            self.steps += 1
        elif kind == P.CLOSE:
            raise SessionClosed()  # ends the connection: `done` raises it in serve()

    async def send(self, frame: bytes) -> None:
        self.wire.send(frame)

    async def receive(self, timeout: float) -> codec.Message:
        if not self._inbox:
            self._waiter = self.loop.create_future()
            try:
                await asyncio.wait_for(asyncio.wait([self._waiter, self.wire.done],
                                                    return_when=asyncio.FIRST_COMPLETED), timeout)
            finally:
                self._waiter = None
            if not self._inbox:
                self._outcome()  # raises why the connection ended
        return codec.decode(self._inbox.pop(0))

    def _outcome(self) -> None:
        try:
            self.wire.done.result()
        except SessionClosed:
            raise
        except (ConnectionError, OSError, ProtocolError) as exc:  # a FrameError is a ProtocolError
            raise ConnectionResetError(f"connection error: {exc!r}") from None
        raise ConnectionResetError("the trainer closed the connection")

    async def serve(self, host: EnvHost) -> None:
        self._host = host
        self._serving = True
        if self.worker.busy_poll and (self.wire.direct or self.wire.enable_direct()):
            self.wire.poll_after = self.worker.busy_poll
        for data in self._inbox:  # requests that came with the accept
            self._on_message(data)
        self._inbox.clear()
        await asyncio.wait([self.wire.done])
        self._outcome()

    def abort(self) -> None:
        """Drop the connection at once (the link is dead: a close frame would not arrive)."""
        self.wire.abort()

    def end(self) -> None:
        """Close the connection and hand it back to aiohttp, closed, for its cleanup."""
        if not self.wire.done.done() and not self.transport.is_closing():
            self.wire.close(1000)
        hand_back(self.transport, self._aiohttp)
