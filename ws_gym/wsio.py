"""The one piece of aiohttp I/O both sides share: read the next protocol frame."""

from __future__ import annotations

import aiohttp

from . import codec
from .errors import ProtocolError

_CLOSING = (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED)


async def receive_message(ws, timeout: float | None, during: str) -> codec.Message:
    """The next binary frame of ``ws`` (client or server side), decoded.

    A close becomes ``ConnectionResetError``; any other non-binary message is a
    ``ProtocolError`` (during a handshake nothing else is expected).
    """
    msg = await ws.receive(timeout=timeout)
    while msg.type == aiohttp.WSMsgType.PING or msg.type == aiohttp.WSMsgType.PONG:
        if msg.type == aiohttp.WSMsgType.PING:  # a side that answers pings itself
            await ws.pong(msg.data)
        msg = await ws.receive(timeout=timeout)
    if msg.type == aiohttp.WSMsgType.BINARY:
        return codec.decode(msg.data)
    if msg.type in _CLOSING:
        raise ConnectionResetError(f"the peer closed the connection {during}")
    if msg.type == aiohttp.WSMsgType.ERROR:
        raise ConnectionResetError(f"connection error {during}: {ws.exception()!r}")
    raise ProtocolError(f"expected a binary frame {during}, got a {msg.type.name} message")
