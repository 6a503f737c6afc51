"""The trainer's side of a relay: it dials out, holds a room, and takes each worker's connection.

Where the trainer cannot accept connections (a notebook in the cloud, a
cluster node, a laptop behind NAT), it dials a relay (:mod:`ws_gym.relay`)
that its workers dial too. A control WebSocket holds the trainer's room; for
each worker that dials the room's URL the relay says ``open``, and the trainer
dials one data connection for it. From then on the relay forwards that
connection's bytes as they are, and the trainer feeds them to its own aiohttp
server (its ``AppRunner``'s protocol factory) as if the worker had connected
directly: the token, the handshake, heartbeats and the frame layer work
unchanged, and the trainer listens on no socket for remote workers.

When the control connection ends (the relay restarted, the link dropped), the
relay closes the room's connections, so the workers dial again; the trainer
dials the relay again and asks for the same room with its key, and the
workers' URL stays valid.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import ssl
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import urlsplit

import aiohttp

from . import frames as F
from .errors import RelayError
from .wire import hand_back

log = logging.getLogger("ws_gym")

ROOM_HEADER = "X-WS-Gym-Room"  # the room a trainer asks for again, with its key
ROOM_KEY_HEADER = "X-WS-Gym-Room-Key"
GO = b"go"  # the trainer's last WebSocket message on a data connection: raw bytes from here on
_ID = re.compile(r"^[A-Za-z0-9_-]{16,128}$")  # room ids and keys
_CONN_ID = re.compile(r"^[A-Za-z0-9_-]{8,128}$")  # the relay's ids for waiting workers
MAX_CONTROL_MESSAGE = 64 * 1024
# what a refusal at the relay means for a trainer asking for its room
_REFUSALS = {
    400: "it found the request malformed",
    401: "the trainer token is wrong or missing (relay_token=, or WS_GYM_RELAY_TOKEN; the relay's "
         "--trainer-token)",
    409: "the room is held by another trainer",
    503: "it has no room left (its --max-rooms)",
}


def check_relay_url(url: Any) -> str:
    """``relay=`` as given, once it is a ``ws://`` or ``wss://`` URL with a host (any path prefix)."""
    hint = f"relay must be the relay's ws:// or wss:// URL, e.g. wss://relay.example:8080; got {url!r}"
    if not isinstance(url, str) or not url.isascii() or any(c.isspace() for c in url):
        raise ValueError(hint)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number in range
    except ValueError:
        raise ValueError(hint) from None
    if parts.scheme.lower() not in ("ws", "wss") or not parts.hostname or parts.query or parts.fragment:
        raise ValueError(hint)
    return url


@dataclass(frozen=True)
class RelaySettings:
    """Where the relay is and how to reach it.

    Attributes:
        url: the relay's base URL (``ws://`` or ``wss://``, any path prefix).
        token: the relay's trainer token.
        cafile: CA bundle (or the relay's own certificate) to verify it with;
            ``None``: the system's CAs.
        proxy: the HTTP proxy to dial it through, if any (chosen by
            :meth:`ws_gym.config.RemoteConfig.relay_route`).
    """

    url: str
    token: str
    cafile: str | None = None
    proxy: str | None = None
    room: tuple[str, str] | None = None  # (id, key): the room to ask for from the first dial on

    def endpoint(self, *parts: str) -> str:
        return "/".join((self.url.rstrip("/"),) + parts)

    def ssl_context(self) -> ssl.SSLContext | bool:
        if urlsplit(self.url).scheme.lower() != "wss":
            return True  # aiohttp's default; unused on ws://
        return ssl.create_default_context(cafile=self.cafile)


class _Refused(Exception):
    def __init__(self, status: int, why: str) -> None:
        super().__init__(f"{status}: {why}")
        self.status = status


class RelayLink:
    """The control connection to a relay and the data connections it asks for.

    Runs on the server's event loop. ``serve`` makes the server-side protocol
    (aiohttp's request handler) a data connection is handed to.
    """

    def __init__(self, settings: RelaySettings, serve: Callable[[], asyncio.BaseProtocol], *,
                 heartbeat: float | None, timeout: float = 10.0) -> None:
        self.settings = settings
        self.serve = serve
        self.heartbeat = heartbeat
        self.timeout = timeout  # seconds for one dial (and the relay's first message)
        self.room: str | None = settings.room[0] if settings.room else None
        self.key: str | None = settings.room[1] if settings.room else None
        self.accepted = 0  # data connections handed to the server (statistics)
        self.reconnects = 0
        self._ssl = settings.ssl_context()
        self._proxy = settings.proxy
        self._session: aiohttp.ClientSession | None = None
        self._control: aiohttp.ClientWebSocketResponse | None = None
        self._tunnels: list[tuple[Any, asyncio.BaseTransport, asyncio.BaseProtocol]] = []
        self._accepts: set[asyncio.Task] = set()
        self._closing = False

    @property
    def worker_url(self) -> str:
        """The URL the room's workers dial."""
        assert self.room is not None
        return self.settings.endpoint("room", self.room, "ws")

    # ------------------------------------------------------------- control

    async def open(self, timeout: float) -> str:
        """Dial the relay until it gives a room; return the workers' URL.

        Raises:
            RelayError: the relay refused (wrong token, no room left), or
                could not be reached within ``timeout`` seconds.
        """
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, connect=self.timeout, sock_connect=min(5.0, self.timeout)))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        delay = 0.1
        while True:
            try:
                await self._dial()
                return self.worker_url
            except _Refused as exc:
                if exc.status != 409 or loop.time() + delay > deadline:
                    raise RelayError(f"the relay at {self.settings.url} refused this trainer: {exc}") from None
            except aiohttp.ClientConnectorCertificateError as exc:  # retrying cannot fix a certificate
                raise RelayError(f"could not open a room on the relay at {self.settings.url}: "
                                 f"{_describe(exc, self.settings.cafile)}") from None
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError) as exc:
                if loop.time() + delay > deadline:
                    raise RelayError(f"could not open a room on the relay at {self.settings.url} within "
                                     f"{timeout:g} s: {_describe(exc)}") from None
                log.debug("dialing the relay at %s: %r; again in %.1f s", self.settings.url, exc, delay)
            await asyncio.sleep(delay)
            delay = min(2 * delay, 2.0)

    async def _dial(self) -> None:
        assert self._session is not None
        headers = {"Authorization": f"Bearer {self.settings.token}"}
        if self.room is not None and self.key is not None:
            headers[ROOM_HEADER], headers[ROOM_KEY_HEADER] = self.room, self.key
        try:
            ws = await self._session.ws_connect(
                self.settings.endpoint("trainer"), headers=headers, heartbeat=self.heartbeat,
                ssl=self._ssl, proxy=self._proxy, max_msg_size=MAX_CONTROL_MESSAGE,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=self.timeout), compress=0)
        except aiohttp.WSServerHandshakeError as exc:
            raise _Refused(exc.status, _REFUSALS.get(exc.status, exc.message)) from None
        try:
            msg = await ws.receive(timeout=self.timeout)
            if msg.type != aiohttp.WSMsgType.TEXT:
                raise ValueError(f"the relay's first message was not its room ({msg.type.name})")
            room = json.loads(msg.data)
            if (not isinstance(room, dict) or room.get("type") != "room"
                    or not all(isinstance(room.get(k), str) and _ID.match(room[k]) for k in ("room", "key"))):
                raise ValueError("the relay's first message was not a valid room")
            if self.room is not None and room["room"] != self.room:
                raise ValueError("the relay gave another room than the one asked for")
        except BaseException:
            await ws.close()
            raise
        self.room, self.key = room["room"], room["key"]
        self._control = ws

    async def run(self) -> None:
        """Take the workers the relay announces; dial the relay again when it goes."""
        while not self._closing:
            ws = self._control
            assert ws is not None
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    self._on_control(msg.data)
            if self._closing:
                return
            self._control = None
            log.warning("lost the relay at %s (%s); dialing it again for room %s",
                        self.settings.url, _describe(ws.exception()) if ws.exception() else "closed",
                        self.room)
            await self._redial()

    async def _redial(self) -> None:
        delay, said = 0.1, None
        while not self._closing:
            try:
                await self._dial()
                self.reconnects += 1
                log.warning("room %s is open again on the relay at %s", self.room, self.settings.url)
                return
            except _Refused as exc:
                if exc.status == 409 and self.key is not None:
                    why = "the relay still holds the room for its old connection"
                else:
                    why = str(exc)
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError) as exc:
                why = _describe(exc)
            if why != said:  # once per reason
                log.warning("the relay at %s: %s; retrying", self.settings.url, why)
                said = why
            await asyncio.sleep(delay)
            delay = min(2 * delay, 5.0)

    def _on_control(self, text: str) -> None:
        try:
            message = json.loads(text)
        except ValueError:
            log.debug("ignored a control message from the relay that is not JSON")
            return
        cid = message.get("id") if isinstance(message, dict) and message.get("type") == "open" else None
        if not isinstance(cid, str) or not _CONN_ID.match(cid):
            log.debug("ignored a control message from the relay: %.80r", text)
            return
        task = asyncio.ensure_future(self._accept(cid))
        self._accepts.add(task)
        task.add_done_callback(self._accepts.discard)

    # ---------------------------------------------------------------- data

    async def _accept(self, cid: str) -> None:
        """Dial the data connection for a waiting worker and hand it to the server."""
        assert self._session is not None and self.room is not None and self.key is not None
        self._sweep()
        try:
            ws = await self._session.ws_connect(
                self.settings.endpoint("room", self.room, "accept", cid), headers={ROOM_KEY_HEADER: self.key},
                ssl=self._ssl, proxy=self._proxy, autoping=False, autoclose=False, heartbeat=None,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=self.timeout), compress=0)
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            log.info("could not take a worker's connection from the relay: %s", _describe(exc))
            return
        conn = getattr(ws, "_conn", None)  # aiohttp's connection: private, as in ws_gym.worker_links
        transport = getattr(conn, "transport", None)
        if transport is None or self._closing:
            await ws.close()
            return
        # From here on the connection carries the worker's bytes: the server's
        # protocol reads them. It is installed before the relay is told to go,
        # so no byte can reach aiohttp's client parser.
        previous = transport.get_protocol()
        server_side = self.serve()
        transport.set_protocol(server_side)
        server_side.connection_made(transport)
        head, body = F.frame(F.OP_BINARY, GO, masked=True)
        transport.write(head + body)
        self._tunnels.append((ws, transport, previous))
        self.accepted += 1

    def _sweep(self) -> None:
        """Let aiohttp's client forget the data connections that have ended."""
        live = []
        for ws, transport, previous in self._tunnels:
            if transport.is_closing():
                _release(ws, transport, previous)
            else:
                live.append((ws, transport, previous))
        self._tunnels = live

    async def close(self) -> None:
        """Leave the room (the relay closes its connections) and close every connection."""
        self._closing = True
        for task in list(self._accepts):
            task.cancel()
        await asyncio.gather(*self._accepts, return_exceptions=True)
        if self._control is not None:
            await self._control.close()
        for ws, transport, previous in self._tunnels:
            transport.close()
            _release(ws, transport, previous)
        self._tunnels = []
        if self._session is not None:
            await self._session.close()


def _release(ws: Any, transport: asyncio.BaseTransport, previous: Any) -> None:
    """Give an ended data connection back to aiohttp's client, closed."""
    hand_back(transport, previous)  # type: ignore[arg-type]
    conn = getattr(ws, "_conn", None)
    if conn is not None:
        conn.close()


def _describe(exc: BaseException | None, cafile: str | None = None) -> str:
    if isinstance(exc, aiohttp.ClientProxyConnectionError):
        return f"cannot reach the proxy ({exc})"
    if isinstance(exc, aiohttp.ClientHttpProxyError):
        return f"the proxy refused: {exc.status} {exc.message}"
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        if cafile:
            return (f"its TLS certificate failed verification ({exc.certificate_error}): "
                    f"relay_cafile={cafile!r} does not verify it")
        return (f"its TLS certificate failed verification ({exc.certificate_error}); pass relay_cafile= "
                f"(the CA file that signed the relay's certificate)")
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return "timed out"
    return f"{type(exc).__name__}: {exc}" if exc is not None else "closed"
