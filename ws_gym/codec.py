"""Binary frame codec: Python values <-> bytes, with no I/O.

A frame is::

    u32 little-endian header length | orjson header (space padded) | array buffers

The header is ``{"k": kind, "i": request id, "b": [[dtype, shape], ...], "d": body}``.
Every numpy array in ``body`` is replaced by a reference to one entry of ``"b"``
and its bytes follow the header, each buffer starting on an 8-byte boundary, so
decoding is ``numpy.frombuffer`` on the received bytes: no per-element Python
work and no copy. Decoded arrays are read-only views of the frame.

Body values are JSON values plus a few tagged objects (a dict whose only key,
or first key, starts with ``$``):

==============  =====================================================
``{"$a": n}``   numpy array, buffer ``n``
``{"$s": n}``   numpy scalar (``np.float32(1.5)``), 0-d buffer ``n``
``{"$y": n}``   ``bytes``, buffer ``n`` (dtype ``|u1``)
``{"$t": [..]}``  tuple
``{"$d": [[k, v], ..]}``  dict whose keys are not all plain strings
``{"$f": "nan"}``  non-finite float (``nan``, ``inf``, ``-inf``)
``{"$i": "123"}``  integer outside 64 bits
``{"$O": shape, "v": [..]}``  numpy object array (flat items)
``{"$r": "repr", "t": "type"}``  a value with no wire form, sent as its repr
==============  =====================================================

Where a connection negotiated compression (:mod:`ws_gym.compression`), a big
buffer may travel compressed: its spec is then ``[dtype, shape, n]``, ``n``
being its compressed size; it decompresses to exactly ``dtype`` x ``shape``
bytes (bounded before anything is allocated) and is read as any other.

Nothing is ever unpickled or evaluated; a malformed frame raises
:class:`~ws_gym.errors.ProtocolError` and nothing else.
"""

from __future__ import annotations

import math
import re
import struct
from typing import Any, Callable, NamedTuple

import numpy as np
import orjson

from .errors import ProtocolError

__all__ = ["Message", "encode", "decode", "array_bytes", "EncodeError", "Unencodable", "MAX_DEPTH"]

_LEN = struct.Struct("<I")
_ALIGN = 8
MAX_DEPTH = 64
MAX_BUFFERS = 4096
MAX_DIMS = 32
MAX_KIND = 64  # message kinds are short words; a longer one would be echoed in errors and logs
# dtype strings we accept from the wire: byte order, kind, item size. No objects,
# no structured or sub-array dtypes, so np.dtype() never sees anything exotic.
_DTYPE_RE = re.compile(r"^[<>|=][biufc][1-9][0-9]?$|^[<>|=][US][0-9]{1,6}$")
_SEND_KINDS = frozenset("biufcUS")
_INT_MIN = -(2**63)
_INT_MAX = 2**64 - 1


class EncodeError(TypeError):
    """A value has no wire form and ``strict`` encoding was asked for."""


class Unencodable(str):
    """A decoded ``{"$r": ...}`` value: the repr of something with no wire form.

    It is a plain ``str`` to the user; ``type_name`` says what the value was.
    """

    type_name: str

    def __new__(cls, text: str, type_name: str) -> "Unencodable":
        obj = super().__new__(cls, text)
        obj.type_name = type_name
        return obj


class Message(NamedTuple):
    """One decoded frame."""

    kind: str
    id: int
    body: Any


# --------------------------------------------------------------------- encode


def encode(kind: str, req_id: int, body: Any = None, *, strict: bool = False, pack: Any = None) -> bytes:
    """Encode one message into a single frame.

    With ``strict=False`` a value that has no wire form is sent as its repr
    (tag ``$r``); with ``strict=True`` it raises :class:`EncodeError`.
    ``pack``: the connection's compressor, where one was negotiated
    (:class:`ws_gym.compression.Compressor`): it may compress big buffers.
    """
    arrays: list[Any] = []
    tree = _pack(body, arrays, strict, 0)
    specs: list[list] = [[a.dtype.str, a.shape] for a in arrays]
    if pack is not None:
        arrays = [_compressed(a, spec, pack) for a, spec in zip(arrays, specs)]
    header = orjson.dumps({"k": kind, "i": req_id, "b": specs, "d": tree})
    pad = -(_LEN.size + len(header)) % _ALIGN
    parts: list[Any] = [_LEN.pack(len(header) + pad), header, _PADS[pad]]
    for arr in arrays:
        if type(arr) is bytes:  # compressed (its spec says so)
            nbytes = len(arr)
            parts.append(arr)
        else:
            nbytes = arr.nbytes
            if not nbytes:
                continue
            parts.append(array_bytes(arr))
        tail = -nbytes % _ALIGN
        if tail:
            parts.append(_ZEROS[tail])
    return b"".join(parts)


def _compressed(arr: np.ndarray, spec: list, pack: Any) -> Any:
    """A buffer as ``pack`` compresses it (its spec then gets the size), or as it is."""
    if arr.nbytes < pack.min_size:
        return arr
    packed = pack.pack(array_bytes(arr))
    if packed is None:
        return arr
    spec.append(len(packed))
    return packed


def array_bytes(arr: np.ndarray) -> memoryview:
    """An array's bytes in C order, for joining into a frame: a view of its
    memory, no copy, where it is C-contiguous (else of a contiguous copy)."""
    if not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)
    try:
        return arr.data.cast("B")
    except (TypeError, ValueError):  # 0-d, or a format memoryview cannot cast
        return arr.reshape(-1).view(np.uint8).data  # = memoryview(...) of it, as numpy types it


_PADS = [b" " * n for n in range(_ALIGN)]
_ZEROS = [b"\0" * n for n in range(_ALIGN)]


def _pack(obj: Any, arrays: list, strict: bool, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise EncodeError(f"value nested deeper than {MAX_DEPTH} levels")
    t = type(obj)
    if t is np.ndarray:  # the common case first: observations, rewards, actions
        kind = obj.dtype.kind
        if kind in _SEND_KINDS and obj.dtype.fields is None:
            arrays.append(obj)
            return {"$a": len(arrays) - 1}
        if kind == "O":
            items = [_pack(x, arrays, strict, depth + 1) for x in obj.ravel()]
            return {"$O": list(obj.shape), "v": items}
        return _no_wire_form(obj, strict, f"a value of type {t.__qualname__}")
    if t is dict:
        for k in obj:
            if type(k) is not str or k[:1] == "$" or not (k.isascii() or _utf8(k)):
                break
        else:
            return {k: _pack(v, arrays, strict, depth + 1) for k, v in obj.items()}
        return {
            "$d": [
                [_pack(k, arrays, strict, depth + 1), _pack(v, arrays, strict, depth + 1)]
                for k, v in obj.items()
            ]
        }
    if obj is None or t is bool:
        return obj
    if t is str:
        if _utf8(obj):
            return obj
        return _no_wire_form(obj, strict, "a str with lone surrogates (not UTF-8)")
    if t is int:
        if _INT_MIN <= obj <= _INT_MAX:
            return obj
        return {"$i": str(obj)}
    if t is float:
        if math.isfinite(obj):
            return obj
        return {"$f": "nan" if obj != obj else ("inf" if obj > 0 else "-inf")}
    if isinstance(obj, np.generic):
        arr = np.asarray(obj)
        if arr.dtype.kind in _SEND_KINDS:
            arrays.append(arr)
            return {"$s": len(arrays) - 1}
    elif t is list:
        return [_pack(x, arrays, strict, depth + 1) for x in obj]
    elif t is tuple:
        return {"$t": [_pack(x, arrays, strict, depth + 1) for x in obj]}
    elif t is dict or isinstance(obj, dict):
        if all(type(k) is str and not k.startswith("$") and _utf8(k) for k in obj):
            return {k: _pack(v, arrays, strict, depth + 1) for k, v in obj.items()}
        return {
            "$d": [
                [_pack(k, arrays, strict, depth + 1), _pack(v, arrays, strict, depth + 1)]
                for k, v in obj.items()
            ]
        }
    elif t is bytes:
        arrays.append(np.frombuffer(obj, dtype=np.uint8))
        return {"$y": len(arrays) - 1}
    return _no_wire_form(obj, strict, f"a value of type {t.__qualname__}")


def _utf8(text: str) -> bool:
    """True when ``text`` can go into JSON (UTF-8): no lone surrogates."""
    if text.isascii():  # O(1) in CPython
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _no_wire_form(obj: Any, strict: bool, what: str) -> Any:
    if strict:
        raise EncodeError(f"{what} cannot be sent")
    return {"$r": _safe_repr(obj), "t": type(obj).__qualname__}


def _safe_repr(obj: Any, limit: int = 1000) -> str:
    try:
        text = repr(obj)
    except Exception as exc:  # a broken __repr__ must not break the step
        text = f"<{type(obj).__qualname__} with failing repr: {exc!r}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------- decode


def decode(frame: bytes | bytearray | memoryview, *, max_size: int | None = None, unzip: Any = None) -> Message:
    """Decode one frame. Raises :class:`ProtocolError` on anything malformed.

    ``unzip``: the connection's :class:`ws_gym.compression.Decompressor`, where
    one was negotiated; without it a compressed buffer is malformed."""
    if not isinstance(frame, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"expected a binary frame, got {type(frame).__name__}")
    size = len(frame)
    if max_size is not None and size > max_size:
        raise ProtocolError(f"frame of {size} bytes is over the limit of {max_size}")
    if size < _LEN.size:
        raise ProtocolError(f"frame of {size} bytes is too short for a header")
    (hlen,) = _LEN.unpack_from(frame, 0)
    start = _LEN.size
    if hlen > size - start:
        raise ProtocolError(f"header length {hlen} exceeds the frame ({size} bytes)")
    try:
        header = orjson.loads(memoryview(frame)[start : start + hlen])
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError("header must be a JSON object")
    kind = header.get("k")
    req_id = header.get("i")
    specs = header.get("b", [])
    if not isinstance(kind, str) or not kind or len(kind) > MAX_KIND:
        raise ProtocolError(f"header field 'k' (message kind) must be a non-empty string of at most {MAX_KIND} chars")
    if type(req_id) is not int or req_id < 0:
        raise ProtocolError("header field 'i' (request id) must be a non-negative integer")
    if not isinstance(specs, list) or len(specs) > MAX_BUFFERS:
        raise ProtocolError("header field 'b' must be a list of at most %d buffers" % MAX_BUFFERS)
    arrays = _views(frame, start + hlen, specs, unzip)
    body = _unpack(header.get("d"), arrays, 0)
    return Message(kind, req_id, body)


_dtypes: dict[str, np.dtype] = {}  # dtype strings seen and allowed (bounded: see _dtype)


def _dtype(dstr: Any, n: int) -> np.dtype:
    """The numpy dtype of an allowed dtype string (cached: decode runs per step)."""
    dtype = _dtypes.get(dstr) if type(dstr) is str else None
    if dtype is not None:
        return dtype
    if not isinstance(dstr, str) or not _DTYPE_RE.match(dstr):
        raise ProtocolError(f"buffer {n}: dtype {_safe_repr(dstr, 100)} is not allowed")
    try:
        dtype = np.dtype(dstr)
    except TypeError:
        raise ProtocolError(f"buffer {n}: dtype {dstr!r} is not allowed") from None
    if dtype.itemsize == 0:
        raise ProtocolError(f"buffer {n}: dtype {dstr!r} has no size")
    if len(_dtypes) < 256:
        _dtypes[dstr] = dtype
    return dtype


def _nbytes(shape: Any, dtype: np.dtype, n: int) -> int:
    """The bytes of buffer ``n``, once its shape is a list of at most MAX_DIMS sizes."""
    if type(shape) is not list or len(shape) > MAX_DIMS:
        raise ProtocolError(f"buffer {n}: shape must be a list of at most {MAX_DIMS} sizes")
    count = 1
    for dim in shape:
        if type(dim) is not int or dim < 0:
            raise ProtocolError(f"buffer {n}: shape {_safe_repr(shape, 200)} has a bad size")
        count *= dim
    return count * dtype.itemsize


def _views(frame: Any, offset: int, specs: list, unzip: Any = None) -> list[np.ndarray]:
    size = len(frame)
    views: list[np.ndarray] = []
    unpacked = 0  # bytes decompressed so far: at most unzip.limit in all
    for n, spec in enumerate(specs):
        if not (type(spec) is list and len(spec) == 2):
            if unzip is not None and type(spec) is list and len(spec) == 3:
                unpacked = _unpacked(frame, offset, spec, n, unzip, unpacked, views)
                offset += spec[2] + (-spec[2] % _ALIGN)
                continue
            raise ProtocolError(f"buffer {n}: spec must be [dtype, shape]")
        dstr, shape = spec
        dtype = _dtype(dstr, n)
        nbytes = _nbytes(shape, dtype, n)
        if nbytes > size - offset:
            raise ProtocolError(
                f"buffer {n}: {shape!r} x {dstr} needs {nbytes} bytes, "
                f"the frame has {max(size - offset, 0)} left"
            )
        try:
            arr = np.ndarray(tuple(shape), dtype, frame, offset)  # a view: no copy
        except (ValueError, TypeError):  # no data, but a dimension numpy cannot hold: [0, 2**63]
            raise ProtocolError(f"buffer {n}: shape {shape!r} is too big") from None
        if arr.flags.writeable:  # a bytearray frame: views stay read-only all the same
            arr.flags.writeable = False
        views.append(arr)
        offset += nbytes + (-nbytes % _ALIGN)
    if offset < size:
        raise ProtocolError(f"{size - offset} unexpected bytes after the last buffer")
    if offset > size:
        raise ProtocolError("the frame ends inside the padding of its last buffer")
    return views


def _unpacked(frame: Any, offset: int, spec: list, n: int, unzip: Any, unpacked: int, views: list) -> int:
    """A compressed buffer, decompressed (bounded) and viewed; the bytes decompressed so far."""
    dstr, shape, packed = spec
    dtype = _dtype(dstr, n)
    if type(packed) is not int or packed < 0:
        raise ProtocolError(f"buffer {n}: a compressed spec must be [dtype, shape, size]")
    nbytes = _nbytes(shape, dtype, n)
    unpacked += nbytes
    if unpacked > unzip.limit:  # before anything is allocated
        raise ProtocolError(f"buffer {n}: compressed buffers claiming {unpacked} bytes, "
                            f"over the limit of {unzip.limit}")
    if packed > len(frame) - offset:
        raise ProtocolError(f"buffer {n}: {packed} compressed bytes, the frame has {max(len(frame) - offset, 0)} left")
    raw = unzip.unpack(memoryview(frame)[offset : offset + packed], nbytes)
    try:
        arr = np.ndarray(tuple(shape), dtype, raw)  # read-only: a view of the decompressed bytes
    except (ValueError, TypeError):
        raise ProtocolError(f"buffer {n}: shape {shape!r} is too big") from None
    views.append(arr)
    return unpacked


def _buffer(node: dict, tag: str, arrays: list) -> np.ndarray:
    idx = node[tag]
    if type(idx) is not int or not 0 <= idx < len(arrays):
        raise ProtocolError(f"{tag} refers to buffer {_safe_repr(idx, 100)}, which does not exist")
    return arrays[idx]


def _unpack(node: Any, arrays: list, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise ProtocolError(f"body nested deeper than {MAX_DEPTH} levels")
    t = type(node)
    if t is list:
        return [_unpack(x, arrays, depth + 1) for x in node]
    if t is not dict:
        return node  # str, int, float, bool, None: already plain values
    if not node:
        return {}
    first = next(iter(node))
    if not first.startswith("$"):
        out = {}
        n = len(arrays)
        for k, v in node.items():
            if type(v) is dict and len(v) == 1:  # the common {"$a": n}, without a call per value
                idx = v.get("$a")
                if type(idx) is int and 0 <= idx < n:
                    out[k] = arrays[idx]
                    continue
            out[k] = _unpack(v, arrays, depth + 1)
        return out
    try:
        return _unpack_tagged(first, node, arrays, depth)
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        if isinstance(exc, ProtocolError):
            raise
        raise ProtocolError(f"malformed {_safe_repr(first, 100)} value: {_safe_repr(exc, 200)}") from None


def _unpack_tagged(tag: str, node: dict, arrays: list, depth: int) -> Any:
    if tag == "$a":
        return _buffer(node, tag, arrays)
    if tag == "$s":
        arr = _buffer(node, tag, arrays)
        if arr.ndim != 0:
            raise ProtocolError("$s must refer to a 0-d buffer")
        return arr[()]
    if tag == "$y":
        arr = _buffer(node, tag, arrays)
        if arr.dtype != np.uint8 or arr.ndim != 1:
            raise ProtocolError("$y must refer to a 1-d uint8 buffer")
        return arr.tobytes()
    if tag == "$t":
        items = node[tag]
        if type(items) is not list:
            raise ProtocolError("$t must hold a list")
        return tuple(_unpack(x, arrays, depth + 1) for x in items)
    if tag == "$d":
        pairs = node[tag]
        if type(pairs) is not list:
            raise ProtocolError("$d must hold a list of pairs")
        out = {}
        for pair in pairs:
            if type(pair) is not list or len(pair) != 2:
                raise ProtocolError("$d must hold a list of [key, value] pairs")
            key = _unpack(pair[0], arrays, depth + 1)
            try:
                hash(key)
            except TypeError:
                raise ProtocolError(f"$d key of type {type(key).__name__} is not hashable") from None
            out[key] = _unpack(pair[1], arrays, depth + 1)
        return out
    if tag == "$f":
        text = node[tag]
        if text not in ("nan", "inf", "-inf"):
            raise ProtocolError(f"$f must be nan, inf or -inf, got {_safe_repr(text, 100)}")
        return float(text)
    if tag == "$i":
        text = node[tag]
        if type(text) is not str or not re.fullmatch(r"-?[0-9]{1,400}", text):
            raise ProtocolError("$i must hold a decimal integer string")
        return int(text)
    if tag == "$O":
        shape, items = node[tag], node["v"]
        if type(shape) is not list or type(items) is not list or len(shape) > MAX_DIMS:
            raise ProtocolError("$O must hold a shape and a list of items")
        count = 1
        for dim in shape:
            if type(dim) is not int or dim < 0:
                raise ProtocolError("$O shape has a bad size")
            count *= dim
        if count != len(items):
            raise ProtocolError(f"$O shape {shape} does not match {len(items)} items")
        objs = np.empty(len(items), dtype=object)
        for n, x in enumerate(items):
            objs[n] = _unpack(x, arrays, depth + 1)
        return objs.reshape(shape)
    if tag == "$r":
        text, type_name = node[tag], node.get("t", "?")
        if type(text) is not str or type(type_name) is not str:
            raise ProtocolError("$r must hold a repr string and a type name")
        return Unencodable(text, type_name)
    raise ProtocolError(f"unknown tag {_safe_repr(tag, 100)}")


def writable(value: Any, leaf: Callable[[Any], Any] | None = None) -> Any:
    """Return ``value`` with every numpy array in it replaced by a writable copy.

    ``leaf``, when given, maps every other non-container value (the trainer uses
    it to turn ``Unencodable`` reprs into plain strings, with a warning).
    """
    t = type(value)
    if t is np.ndarray:
        if value.dtype.kind == "O":  # its items may be read-only views too
            out = np.empty(value.shape, dtype=object)
            flat = out.reshape(-1)
            for n, x in enumerate(value.flat):
                flat[n] = writable(x, leaf)
            return out
        return value.copy() if not value.flags.writeable else value
    if t is list:
        return [writable(x, leaf) for x in value]
    if t is tuple:
        return tuple(writable(x, leaf) for x in value)
    if t is dict:
        return {k: writable(v, leaf) for k, v in value.items()}
    return value if leaf is None else leaf(value)
