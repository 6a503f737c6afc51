"""WebSocket framing (RFC 6455), sans-I/O: bytes in, messages out.

aiohttp does the HTTP upgrade and the handshake's first messages; after that
both sides read and write frames with this module (see :mod:`ws_gym.wire`),
which costs a fraction of aiohttp's message API per frame. Nothing here owns a
socket: :class:`FrameParser` takes received bytes and returns whole messages,
:func:`frame` turns a payload into the bytes to send.

Only what ws_gym's peers need: no extensions (a frame with a reserved bit set
is refused), fragmented messages are reassembled, control frames may come
between fragments, frames from a client must be masked and frames from a
server must not be.
"""

from __future__ import annotations

import random
import struct
from typing import cast

import numpy as np

from .errors import ProtocolError

__all__ = [
    "FrameError", "FrameParser", "frame", "frame_pieces", "mask", "close_payload", "parse_close",
    "valid_close_code",
    "OP_CONT", "OP_TEXT", "OP_BINARY", "OP_CLOSE", "OP_PING", "OP_PONG",
]

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_DATA_OPS = (OP_TEXT, OP_BINARY)
_CONTROL_OPS = (OP_CLOSE, OP_PING, OP_PONG)

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_INVALID_DATA = 1007
CLOSE_TOO_BIG = 1009

_U16 = struct.Struct("!H")
_U64 = struct.Struct("!Q")
_HEAD16 = struct.Struct("!BBH")
_HEAD64 = struct.Struct("!BBQ")
_SMALL = 2048  # below this, masking with Python ints beats numpy's call overhead
_randbits = random.getrandbits  # masking keys need not be secret; aiohttp uses the same
# Masking protects HTTP intermediaries from bytes a script chose (RFC 6455, 10.3). On
# the trainer's private Unix socket there is none, so local workers mask with this key:
# XOR with zeros, which both sides skip. The frames stay frames any server can read.
ZERO_KEY = b"\0\0\0\0"


class FrameError(ProtocolError):
    """The peer broke RFC 6455 framing; ``code`` is the close code to send."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def mask(payload: bytes | bytearray | memoryview, key: bytes, *, inplace: bool = False) -> bytes | bytearray:
    """``payload`` XOR the 4-byte ``key`` repeated (masking and unmasking alike).

    ``inplace`` (``payload`` a bytearray): overwrite it instead of copying.
    """
    n = len(payload)
    if n < _SMALL:
        if not n:
            return b""
        k = int.from_bytes((key * (n // 4 + 1))[:n], "little")
        result = (int.from_bytes(payload, "little") ^ k).to_bytes(n, "little")
        if inplace:
            buf = cast(bytearray, payload)  # inplace: the caller passes a bytearray
            buf[:] = result
            return buf
        return result
    out = cast(bytearray, payload) if inplace else bytearray(n)
    n8 = n - n % 8
    word = np.frombuffer(key * 2, dtype=np.uint64)[0]
    np.bitwise_xor(np.frombuffer(payload, dtype=np.uint64, count=n8 // 8), word,
                   out=np.frombuffer(out, dtype=np.uint64, count=n8 // 8))
    if n8 < n:  # n8 is a multiple of 4: the key lines up again
        out[n8:] = mask(bytes(memoryview(payload)[n8:]), key)
    return out


def frame(opcode: int, payload: bytes | bytearray | memoryview = b"", *, masked: bool = False,
          key: bytes | None = None) -> list:
    """The bytes of one final frame: ``[header, payload]`` (a client masks its payload,
    with a fresh random key unless ``key`` is given)."""
    head = _header(opcode, len(payload), masked)
    if not masked:
        return [head, payload]
    if key is None:
        key = _randbits(32).to_bytes(4, "little")
    elif key == ZERO_KEY:
        return [head + key, payload]
    return [head + key, mask(payload, key)]


def frame_pieces(opcode: int, pieces: tuple, *, masked: bool = False, key: bytes | None = None) -> tuple:
    """The bytes of one final frame whose payload is ``pieces`` in order, not
    joined: ``(header, *pieces)``. Unmasked or with the zero key only (any
    other key would have to copy them anyway)."""
    if masked and key != ZERO_KEY:
        raise ValueError("frame_pieces: only unmasked frames or the zero key send pieces as they are")
    head = _header(opcode, sum(len(p) for p in pieces), masked)
    return (head + ZERO_KEY if masked else head, *pieces)


def _header(opcode: int, n: int, masked: bool) -> bytes:
    """A final frame's header for a payload of ``n`` bytes (without the key)."""
    mbit = 0x80 if masked else 0
    b0 = 0x80 | opcode
    if n < 126:
        return bytes((b0, mbit | n))
    if n < 65536:
        return _HEAD16.pack(b0, mbit | 126, n)
    return _HEAD64.pack(b0, mbit | 127, n)


def valid_close_code(code: int) -> bool:
    """Whether a close frame may carry ``code`` (RFC 6455 7.4; 1004-1006 and 1015
    are for local use only; 1012-1014 are registered since)."""
    return 1000 <= code <= 1014 and code not in (1004, 1005, 1006) or 3000 <= code <= 4999


def close_payload(code: int, reason: str = "") -> bytes:
    """A close frame's payload: the code and as much of ``reason`` as fits a
    control frame (125 bytes), cut between UTF-8 characters."""
    data = reason.encode("utf-8")
    if len(data) > 123:
        data = data[:123].decode("utf-8", "ignore").encode("utf-8")
    return _U16.pack(code) + data


def parse_close(payload: bytes | bytearray | memoryview) -> tuple[int, str]:
    """(code, reason) of a close frame's payload; 1005 (no code) when empty.

    Raises :class:`FrameError` for a payload of one byte, a code no close frame
    may carry (1002 to send back) and a reason that is not UTF-8 (1007)."""
    if len(payload) == 0:
        return 1005, ""
    if len(payload) == 1:
        raise FrameError(CLOSE_PROTOCOL_ERROR, "a close frame with a 1-byte payload")
    (code,) = _U16.unpack_from(payload, 0)
    if not valid_close_code(code):
        raise FrameError(CLOSE_PROTOCOL_ERROR, f"close code {code} may not be sent")
    try:
        reason = bytes(payload[2:]).decode("utf-8")
    except UnicodeDecodeError:
        raise FrameError(CLOSE_INVALID_DATA, "a close reason that is not UTF-8") from None
    return code, reason


class FrameParser:
    """Turns the bytes of one direction of a WebSocket into whole messages.

    ``feed(data)`` returns a list of ``(opcode, payload)``: data messages
    (fragments joined) and control frames, in order. Anything that breaks the
    framing raises :class:`FrameError`, and the parser takes nothing more.
    ``max_size`` bounds a message before any of its payload is stored.
    """

    def __init__(self, *, max_size: int, masked: bool) -> None:
        self.max_size = max_size
        self.masked = masked  # frames must carry a mask (we are the server)
        self._head = b""  # an incomplete header
        self._body: bytearray | None = None  # the payload being filled
        self._filled = 0
        self._pending: tuple[bool, int, bytes | None] = (True, 0, None)  # fin, opcode, key of _body
        self._parts: list | None = None  # fragments of a data message
        self._parts_op = 0
        self._parts_size = 0
        self.broken: FrameError | None = None

    def feed(self, data: bytes | bytearray | memoryview) -> list[tuple[int, bytes | bytearray | memoryview]]:
        if self.broken is not None:
            return []
        try:
            return self._feed(data)
        except FrameError as exc:
            self.broken = exc
            raise

    def _feed(self, data: bytes | bytearray | memoryview) -> list:
        if self._head or self._body is not None or self._parts is not None:
            return self._feed_general(data)
        # The common case, one read holding exactly one whole final binary frame (a
        # step's request or reply): the same result as the general loop, in fewer steps.
        n = len(data)
        if n < 2 or data[0] != 0x80 | OP_BINARY:
            return self._feed_general(data)
        b1 = data[1]
        if bool(b1 & 0x80) != self.masked:
            return self._feed_general(data)
        length = b1 & 0x7F
        at = 2
        if length == 126:
            if n < 4:
                return self._feed_general(data)
            (length,) = _U16.unpack_from(data, 2)
            at = 4
        elif length == 127:
            if n < 10:
                return self._feed_general(data)
            (length,) = _U64.unpack_from(data, 2)
            at = 10
        if self.masked:
            at += 4
        if at + length != n or length > self.max_size:
            return self._feed_general(data)
        view = memoryview(data)
        if self.masked:
            key = bytes(view[at - 4 : at])
            if key != ZERO_KEY:  # XOR with zeros: the payload as it is
                return [(OP_BINARY, mask(view[at:], key))]
        if length < _SMALL and type(data) is bytes:  # small: as bytes, cheaper to use than a view
            return [(OP_BINARY, data[at:])]
        return [(OP_BINARY, view[at:])]

    def _feed_general(self, data: bytes | bytearray | memoryview) -> list:
        out: list = []
        if self._head:
            data = self._head + data
            self._head = b""
        view = memoryview(data)
        n = len(data)
        pos = 0
        while pos < n:
            body = self._body
            if body is not None:  # a payload that spans several reads
                take = min(n - pos, len(body) - self._filled)
                body[self._filled : self._filled + take] = view[pos : pos + take]
                self._filled += take
                pos += take
                if self._filled == len(body):
                    self._body = None
                    fin, op, key = self._pending
                    self._frame(fin, op, mask(body, key, inplace=True) if key is not None else body, out)
                continue
            if n - pos < 2:
                self._head = bytes(view[pos:])
                break
            b0 = data[pos]
            b1 = data[pos + 1]
            length = b1 & 0x7F
            has_mask = b1 & 0x80
            need = 2 + (2 if length == 126 else 8 if length == 127 else 0) + (4 if has_mask else 0)
            if n - pos < need:
                self._head = bytes(view[pos:])
                break
            if b0 & 0x70:
                raise FrameError(CLOSE_PROTOCOL_ERROR, "a frame has reserved bits set (no extension was negotiated)")
            fin = bool(b0 & 0x80)
            op = b0 & 0x0F
            if bool(has_mask) != self.masked:
                raise FrameError(CLOSE_PROTOCOL_ERROR,
                                 "a client frame is not masked" if self.masked else "a server frame is masked")
            at = pos + 2
            if length == 126:
                (length,) = _U16.unpack_from(data, at)
                at += 2
            elif length == 127:
                (length,) = _U64.unpack_from(data, at)
                at += 8
            key = bytes(view[at : at + 4]) if has_mask else None
            if key == ZERO_KEY:  # XOR with zeros: the payload as it is
                key = None
            at += 4 if has_mask else 0
            if op in _CONTROL_OPS:
                if not fin or length > 125:
                    raise FrameError(CLOSE_PROTOCOL_ERROR, "a control frame is fragmented or over 125 bytes")
            elif op in _DATA_OPS or op == OP_CONT:
                if op == OP_CONT and self._parts is None:
                    raise FrameError(CLOSE_PROTOCOL_ERROR, "a continuation frame without a message to continue")
                if op != OP_CONT and self._parts is not None:
                    raise FrameError(CLOSE_PROTOCOL_ERROR, "a new message began before the last one ended")
                total = length + (self._parts_size if op == OP_CONT else 0)
                if total > self.max_size:
                    raise FrameError(CLOSE_TOO_BIG, f"a message of {total} bytes exceeds the limit of {self.max_size}")
            else:
                raise FrameError(CLOSE_PROTOCOL_ERROR, f"unknown opcode {op:#x}")
            pos = at
            if n - pos >= length:
                payload = view[pos : pos + length]
                pos += length
                self._frame(fin, op, mask(payload, key) if key is not None else payload, out)
            else:
                self._body = bytearray(length)
                self._filled = 0
                self._pending = (fin, op, key)
        return out

    def _frame(self, fin: bool, op: int, payload: bytes | bytearray | memoryview, out: list) -> None:
        if op in _CONTROL_OPS:
            out.append((op, bytes(payload)))
            return
        if op == OP_CONT:
            assert self._parts is not None
            self._parts.append(payload)
            self._parts_size += len(payload)
            if fin:
                out.append((self._parts_op, b"".join(self._parts)))
                self._parts = None
            return
        if fin:
            out.append((op, payload))
        else:
            self._parts = [bytes(payload)]
            self._parts_op = op
            self._parts_size = len(payload)
