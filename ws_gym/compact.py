"""Compact step frames: the hot messages without a JSON header (no I/O).

A ``step`` request and its ``ok`` reply are most of the traffic, and their
shape never changes: one action batch out, observations, rewards and flags
back. Both sides know that shape from the handshake's space schemas, so these
two messages can skip the general codec (JSON header, body tree). A frame is::

    magic (4 bytes) | layout tag u32 | request id u64 | raw array bytes

``REQUEST`` carries the action batch. ``REPLY`` carries the observations,
padded to 8 bytes, then the rewards (float64), terminated and truncated (one
byte each, 0 or 1): batches of ``count`` in vector mode, one value each for a
single env. The tag is a checksum of the layout, so a frame laid out for other
spaces is refused instead of misread. Decoding is ``numpy.frombuffer`` on the
frame: read-only views, no copy.

Only exact matches take this path: the action or observation array must have
the layout's dtype and shape, rewards must be float64 (``float`` for a single
env), the flags bool, and there must be no infos. Anything else (an info, a
reward of another type, a ragged observation) is sent by :mod:`ws_gym.codec`
as before, so results are the same value for value, type for type. A worker
says in its ``ready`` that it understands these frames; the trainer sends them
only then, and a worker answers in kind only to a compact request.

The magics cannot begin a general frame: read as its header length, each is
over 4 GB, far above any message size limit.

Where the handshake chose a compression codec (:mod:`ws_gym.compression`), a
reply whose observations the worker compressed is a ``ZREPLY``: the same head,
then the rewards and flags, then the compressed observations to the end of
the frame. Their size once decompressed is the layout's, so nothing larger is
ever allocated or written: the trainer checks the frame's head as it decodes
it, then decompresses the observations straight into the step's batch rows,
the decompressor's output being the only copy (:meth:`StepLayout.copy_zreply`;
a bad one fails that step as a malformed reply). Such a connection's codec is a
:class:`ZStepCodec`; all others keep the plain :class:`StepCodec`, unchanged.
"""

from __future__ import annotations

import struct
import zlib
from typing import Any

import numpy as np
from gymnasium.vector.utils import batch_space

from . import codec
from . import protocol as P
from .codec import array_bytes
from .errors import ProtocolError
from .spaces import ARRAY_SPACES, schema_to_space

__all__ = ["REQUEST", "REPLY", "ZREPLY", "StepCodec", "ZStepCodec", "StepLayout", "layout_for"]

REQUEST = b"WSs\xf7"
REPLY = b"WSr\xf7"
ZREPLY = b"WSz\xf7"  # a reply with compressed observations (negotiated per connection)
_HEAD = struct.Struct("<4sIQ")  # magic, layout tag, request id
_SCALARS = struct.Struct("<d??")  # a single env's reward, terminated, truncated
_F8 = np.dtype("<f8")  # little-endian on the wire, whatever the machine (big-endian ones use the codec)
_B1 = np.dtype(np.bool_)


def layout_for(observation_schema: dict, action_schema: dict, count: int, single: bool) -> "StepLayout | None":
    """The compact layout for a worker's envs, or None where their spaces are
    not plain arrays (Dict, Tuple, Text, ...: those steps use the codec)."""
    try:
        obs_space = schema_to_space(observation_schema)
        act_space = schema_to_space(action_schema)
    except ProtocolError:
        return None
    if not (isinstance(obs_space, ARRAY_SPACES) and isinstance(act_space, ARRAY_SPACES)):
        return None
    if not single:
        obs_space, act_space = batch_space(obs_space, count), batch_space(act_space, count)
    obs_dtype, act_dtype = np.dtype(obs_space.dtype), np.dtype(act_space.dtype)
    if obs_dtype.kind not in "biuf" or act_dtype.kind not in "biuf":
        return None
    # array spaces' shapes are never None (gymnasium types Space.shape as Optional)
    assert act_space.shape is not None and obs_space.shape is not None
    # plain ints: the tag is computed from the shapes' text, the same on every numpy
    act_shape, obs_shape = tuple(int(d) for d in act_space.shape), tuple(int(d) for d in obs_space.shape)
    return StepLayout(act_dtype, act_shape, obs_dtype, obs_shape, count, single)


class StepLayout:
    """Where each part of a compact step frame sits, for one worker's envs."""

    def __init__(self, act_dtype: np.dtype, act_shape: tuple, obs_dtype: np.dtype, obs_shape: tuple,
                 count: int, single: bool) -> None:
        self.act_dtype, self.act_shape = act_dtype, act_shape
        self.obs_dtype, self.obs_shape = obs_dtype, obs_shape
        self.single = single
        self.count = count
        head = _HEAD.size
        self.act_count = int(np.prod(act_shape, dtype=np.int64))
        self.request_size = head + self.act_count * act_dtype.itemsize
        self.obs_count = int(np.prod(obs_shape, dtype=np.int64))
        obs_bytes = self.obs_count * obs_dtype.itemsize
        self.rew_at = head + obs_bytes + (-obs_bytes % 8)
        n = 1 if single else count
        self.flags_at = self.rew_at + 8 * n
        self.reply_size = self.flags_at + 2 * n
        self.obs_bytes = obs_bytes
        self.zflags_at = head + 8 * n  # ZREPLY: rewards, flags, then the compressed observations
        self.z_at = self.zflags_at + 2 * n
        self._pad = b"\0" * (-obs_bytes % 8)
        self.big = obs_bytes >= 16384  # worth sending in pieces rather than joined (encode_reply)
        text = f"{act_dtype.str}{act_shape}|{obs_dtype.str}{obs_shape}|{count}|{'single' if single else 'vector'}"
        self.tag = zlib.crc32(text.encode())
        self._scalar_action = single and act_shape == ()

    def __repr__(self) -> str:
        return (f"StepLayout(actions {self.act_dtype.str}{list(self.act_shape)}, "
                f"observations {self.obs_dtype.str}{list(self.obs_shape)}, tag {self.tag:#010x})")

    # -- trainer -> worker ----------------------------------------------------

    def encode_request(self, req_id: int, actions: Any) -> bytes | None:
        """A compact ``step`` request, or None when ``actions`` is not exactly
        of the layout (the caller then uses the codec)."""
        t = type(actions)
        if t is np.ndarray:
            if actions.dtype != self.act_dtype or actions.shape != self.act_shape:
                return None
            if self._scalar_action:  # a 0-d array stays one on the generic path
                return None
        elif self._scalar_action and isinstance(actions, np.generic):  # Discrete.sample(): np.int64
            if actions.dtype != self.act_dtype:
                return None
            actions = np.asarray(actions)
        else:
            return None
        if not actions.flags.c_contiguous:
            actions = np.ascontiguousarray(actions)
        return _HEAD.pack(REQUEST, self.tag, req_id) + actions.tobytes()

    def decode_request(self, frame: bytes | bytearray | memoryview) -> tuple[int, Any]:
        """The request id and the actions (a read-only view) of a compact request."""
        req_id = self._check(frame, REQUEST, self.request_size)
        actions = _view(frame, self.act_dtype, self.act_count, _HEAD.size)
        if self._scalar_action:
            return req_id, actions[0]
        return req_id, actions.reshape(self.act_shape)

    # -- worker -> trainer ----------------------------------------------------

    def encode_reply(self, req_id: int, result: Any, *, parts: bool = False,
                     pack: Any = None) -> bytes | tuple | None:
        """A compact ``ok`` reply to a step, or None when the result does not
        fit the layout exactly (the caller then uses the codec).

        ``parts``: the frame's pieces in order, not joined (the observations
        as a view of the result's array), for a writer that sends them as they
        are: big observations are then not copied once more to be joined.
        ``pack``: the connection's compressor (:class:`ws_gym.compression.Compressor`)
        where one was negotiated: a ``ZREPLY`` when it compresses the observations."""
        if type(result) is not dict:
            return None
        obs = result.get("o")
        if type(obs) is not np.ndarray or obs.dtype != self.obs_dtype or obs.shape != self.obs_shape:
            return None
        r: Any
        t: Any
        u: Any
        r, t, u = result.get("r"), result.get("t"), result.get("u")
        if self.single:
            if len(result) != 5 or type(r) is not float or type(t) is not bool or type(u) is not bool:
                return None
            info = result.get("info")
            if type(info) is not dict or info:
                return None
            tail = _SCALARS.pack(r, t, u)
        else:
            log = result.get("f")
            if len(result) != 5 or type(log) is not list or log:
                return None
            n = (self.count,)
            for arr, dtype in ((r, _F8), (t, _B1), (u, _B1)):
                if type(arr) is not np.ndarray or arr.dtype != dtype or arr.shape != n:
                    return None
            tail = b"".join((array_bytes(r), array_bytes(t), array_bytes(u)))
        if pack is not None:
            packed = pack.pack(array_bytes(obs))
            if packed is not None:
                return b"".join((_HEAD.pack(ZREPLY, self.tag, req_id), tail, packed))
        pieces = (_HEAD.pack(REPLY, self.tag, req_id), array_bytes(obs), self._pad, tail)
        return pieces if parts else b"".join(pieces)

    def reply_id(self, frame: bytes | bytearray | memoryview) -> int:
        """The request id of a compact reply, once all of it is checked: size,
        kind, layout and flag bytes (ProtocolError for anything else)."""
        req_id = self._check(frame, REPLY, self.reply_size)
        if bytes(frame[self.flags_at:]).translate(None, b"\0\1"):  # cheaper than numpy for a few bytes
            raise ProtocolError("a compact step reply has a flag byte other than 0 or 1")
        return req_id

    def decode_reply(self, frame: bytes | bytearray | memoryview) -> tuple[int, dict]:
        """The request id and the body of a compact reply, as the codec would
        give it: read-only array views, and ``[]`` / ``{}`` for the infos."""
        return self.reply_id(frame), self.reply_body(frame)

    def reply_body(self, frame: bytes | bytearray | memoryview) -> dict:
        """The body of a compact reply that :meth:`reply_id` accepted (it is
        not checked again), as :meth:`decode_reply` gives it."""
        return self._body(frame, _HEAD.size, frame, self.rew_at, self.flags_at)

    def _body(self, obs_src: Any, obs_at: int, frame: Any, rew_at: int, flags_at: int) -> dict:
        """A reply's body: the observations at ``obs_at`` of ``obs_src``, the rest in ``frame``."""
        obs = _view(obs_src, self.obs_dtype, self.obs_count, obs_at).reshape(self.obs_shape)
        if self.single:
            r, t, u = _SCALARS.unpack_from(frame, rew_at)
            return {"o": obs, "r": r, "t": t, "u": u, "info": {}}
        n = self.count
        r = _view(frame, _F8, n, rew_at)
        flags = _view(frame, _B1, 2 * n, flags_at)
        return {"o": obs, "r": r, "t": flags[:n], "u": flags[n:], "f": []}

    def byte_views(self, obs: np.ndarray, rewards: np.ndarray, terminated: np.ndarray,
                   truncated: np.ndarray) -> tuple[memoryview, ...]:
        """Flat byte views of a step's batch arrays, for :meth:`copy_reply`
        (raises ValueError unless they are C-contiguous, with this layout's dtypes)."""
        if (obs.dtype != self.obs_dtype or rewards.dtype != _F8 or terminated.dtype != _B1
                or truncated.dtype != _B1 or self.single):
            raise ValueError("copy_reply: the batch arrays do not have this layout's dtypes")
        return _bytes(obs), _bytes(rewards), _bytes(terminated), _bytes(truncated)

    def copy_reply(self, frame: bytes | bytearray | memoryview, views: tuple[memoryview, ...], row: int) -> None:
        """Copy a vector reply (checked by :meth:`reply_id`) into rows
        ``row:row + count`` of a step's batch, given as its :meth:`byte_views`:
        byte for byte, one copy, no arrays made."""
        obs, rewards, terminated, truncated = views
        src = memoryview(frame)
        n, head, size = self.count, _HEAD.size, self.obs_count * self.obs_dtype.itemsize
        o = row * (size // n)
        obs[o : o + size] = src[head : head + size]
        rewards[8 * row : 8 * (row + n)] = src[self.rew_at : self.flags_at]
        f = self.flags_at
        terminated[row : row + n] = src[f : f + n]
        truncated[row : row + n] = src[f + n : f + 2 * n]

    # -- compressed replies (ZREPLY) -------------------------------------------

    def zreply_id(self, frame: bytes | bytearray | memoryview) -> int:
        """The request id of a ``ZREPLY``, once its head, rewards and flags are
        checked; its observations are checked as they are decompressed
        (:meth:`zreply_body`, :meth:`copy_zreply`)."""
        size = len(frame)
        if size <= self.z_at:
            raise ProtocolError(f"a compressed step reply of {size} bytes; this layout needs over {self.z_at}")
        got, tag, req_id = _HEAD.unpack_from(frame, 0)
        if got != ZREPLY or tag != self.tag:
            raise ProtocolError(f"a compressed step reply for another layout (tag {tag:#010x}, "
                                f"expected {self.tag:#010x})")
        if bytes(frame[self.zflags_at : self.z_at]).translate(None, b"\0\1"):
            raise ProtocolError("a compact step reply has a flag byte other than 0 or 1")
        return req_id

    def zreply_body(self, frame: Any, unzip: Any) -> dict:
        """A ``ZREPLY``'s body, as :meth:`reply_body` gives a plain one's: its
        observations are views over the decompressor's output (exactly the
        layout's size, bounded by ``unzip``; ProtocolError for any other)."""
        raw = unzip.unpack(memoryview(frame)[self.z_at :], self.obs_bytes)
        return self._body(raw, 0, frame, _HEAD.size, self.zflags_at)

    def copy_zreply(self, frame: Any, views: tuple[memoryview, ...], row: int, unzip: Any) -> None:
        """:meth:`copy_reply` for a ``ZREPLY``: the observations are
        decompressed straight into the batch's rows (no other copy), the rest
        copied as a plain reply's. ProtocolError where they do not fill those
        rows exactly (the rows are then undefined; the step fails)."""
        obs, rewards, terminated, truncated = views
        src = memoryview(frame)
        n, size = self.count, self.obs_bytes
        o = row * (size // n)
        unzip.unpack_into(src[self.z_at :], obs[o : o + size])
        rewards[8 * row : 8 * (row + n)] = src[_HEAD.size : self.zflags_at]
        f = self.zflags_at
        terminated[row : row + n] = src[f : f + n]
        truncated[row : row + n] = src[f + n : f + 2 * n]

    def _check(self, frame: Any, magic: bytes, size: int) -> int:
        """The request id of a frame of this layout; ProtocolError for any other."""
        if len(frame) != size:
            raise ProtocolError(f"a compact step frame of {len(frame)} bytes; this layout has {size}")
        got, tag, req_id = _HEAD.unpack_from(frame, 0)
        if got != magic:
            raise ProtocolError("not a compact step frame of the expected kind")
        if tag != self.tag:
            raise ProtocolError(f"a compact step frame for another layout (tag {tag:#010x}, expected {self.tag:#010x})")
        return req_id


class StepCodec:
    """One worker connection's messages on the trainer's side: ``step``
    requests and their replies in the compact layout where the handshake
    agreed on one (and a message fits it exactly), everything else by the codec.

    The rest of the trainer never sees a compact frame: :meth:`decode` says
    whether a reply is one, and :meth:`reply_body` / :meth:`copy_reply` read it.
    """

    __slots__ = ("layout",)

    def __init__(self, layout: "StepLayout | None" = None) -> None:
        self.layout = layout

    def encode(self, kind: str, req_id: int, body: Any) -> bytes:
        """A request frame; strict: an argument with no wire form raises ``codec.EncodeError``."""
        layout = self.layout
        if layout is not None and kind == P.STEP:
            frame = layout.encode_request(req_id, body["a"])
            if frame is not None:
                return frame
        return codec.encode(kind, req_id, body, strict=True)

    def decode(self, data: Any) -> tuple[int, str, Any, bool]:
        """``(request id, kind, body, compact)`` of a reply; ProtocolError for a
        malformed one. A compact reply (checked whole) comes as its frame:
        :meth:`reply_body` or :meth:`copy_reply` read it."""
        layout = self.layout
        if layout is not None and data[:4] == REPLY:
            return layout.reply_id(data), P.OK, data, True
        reply = codec.decode(data)
        return reply.id, reply.kind, reply.body, False

    def reply_body(self, frame: Any) -> dict:
        """A compact reply's body, as the codec would give it (read-only views)."""
        assert self.layout is not None
        return self.layout.reply_body(frame)

    def byte_views(self, obs: np.ndarray, rewards: np.ndarray, terminated: np.ndarray,
                   truncated: np.ndarray) -> tuple[memoryview, ...]:
        """A step batch's arrays as flat bytes, for :meth:`copy_reply`."""
        assert self.layout is not None
        return self.layout.byte_views(obs, rewards, terminated, truncated)

    def copy_reply(self, frame: Any, views: tuple[memoryview, ...], row: int) -> None:
        """Copy a compact vector reply into rows ``row:`` of a step batch (see
        :meth:`StepLayout.copy_reply`)."""
        assert self.layout is not None
        self.layout.copy_reply(frame, views, row)


class ZStepCodec(StepCodec):
    """A :class:`StepCodec` for a connection that negotiated compression: it
    also reads ``ZREPLY`` frames and compressed buffers of general frames,
    with ``unzip`` (a :class:`ws_gym.compression.Decompressor`) and its bounds.
    A ``ZREPLY``'s head is checked as it is decoded; its observations are
    decompressed where they go: into the step's batch (:meth:`copy_reply`), or
    for a body (:meth:`reply_body`). Either raises ProtocolError for a bad one."""

    __slots__ = ("unzip",)

    def __init__(self, layout: "StepLayout | None", unzip: Any) -> None:
        super().__init__(layout)
        self.unzip = unzip

    def decode(self, data: Any) -> tuple[int, str, Any, bool]:
        layout = self.layout
        if layout is not None:
            magic = data[:4]
            if magic == REPLY:
                return layout.reply_id(data), P.OK, data, True
            if magic == ZREPLY:
                return layout.zreply_id(data), P.OK, data, True
        reply = codec.decode(data, unzip=self.unzip)
        return reply.id, reply.kind, reply.body, False

    def reply_body(self, frame: Any) -> dict:
        assert self.layout is not None
        if frame[:4] == ZREPLY:
            return self.layout.zreply_body(frame, self.unzip)
        return self.layout.reply_body(frame)

    def copy_reply(self, frame: Any, views: tuple[memoryview, ...], row: int) -> None:
        assert self.layout is not None
        if frame[:4] == ZREPLY:
            self.layout.copy_zreply(frame, views, row, self.unzip)
        else:
            self.layout.copy_reply(frame, views, row)


def _bytes(arr: np.ndarray) -> memoryview:
    """A C-contiguous array's memory as flat bytes (raises for any other)."""
    if not arr.flags.c_contiguous:
        raise ValueError("copy_reply: a batch array is not C-contiguous")
    return (arr if arr.dtype.isnative else arr.view(np.uint8)).data.cast("B")


def _view(frame: Any, dtype: np.dtype, count: int, offset: int) -> np.ndarray:
    """Read-only, as the codec's views, whatever buffer the frame is."""
    arr = np.frombuffer(frame, dtype, count, offset)
    if arr.flags.writeable:
        arr.flags.writeable = False
    return arr
