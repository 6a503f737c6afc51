"""Compressed observations, negotiated per connection (no I/O).

A worker's ``hello`` lists the codecs it offers (``"compression": ["zstd",
"lz4"]``, from its ``--compression``); the trainer's ``welcome`` names the one
it chose for this connection and when to use it (:func:`choose`), or nothing:
then every frame is plain, as with a peer that offers nothing. Only the
worker compresses (observations are the big payloads; requests stay plain),
and only arrays of at least :data:`MIN_SIZE` bytes: the observations of a
compact step reply (:mod:`ws_gym.compact`) and the array buffers of general
frames (:mod:`ws_gym.codec`: reset replies, renders, call results).

``compression=`` on the trainer:

- ``"none"``: plain frames on every connection;
- ``"lz4"`` / ``"zstd"``: that codec on every connection whose worker offers
  it, every large array compressed (unless it does not shrink);
- ``"auto"`` (the default): the best codec both sides have (zstd, else lz4),
  never on loopback or a Unix socket (the trainer's machine: copying is
  cheaper than compressing), and elsewhere only while it pays, which the
  worker measures per connection (:class:`AutoRule`). Without a codec
  installed, ``"auto"`` means none.

Bounds: the size a compressed array decompresses to is known before it is
decompressed (the step layout, or the buffer's dtype and shape). A frame
whose compressed buffers claim more than ``max_msg_size`` in all is refused
before anything is decompressed; each array's decompressor gets its expected
size as the most it may allocate and write (zstd's declared content size must
equal it, and its window is capped), and an array that decompresses to any
other size is refused: a decompression bomb is a
:class:`~ws_gym.errors.ProtocolError`, never a large allocation.

A step reply's observations are decompressed straight into the step's batch
rows (:meth:`Decompressor.unpack_into`): the decompressor's output is the
only copy.
"""

from __future__ import annotations

import ctypes
import importlib
import time
from typing import Any, Callable

import numpy as np

from .errors import ProtocolError

__all__ = ["CODECS", "EXTRA", "MIN_SIZE", "available", "require", "offer", "choose", "make_codec",
           "Compressor", "Decompressor", "AutoRule"]

CODECS = ("zstd", "lz4")  # "auto"'s order of preference: zstd's ratio is 2-3x lz4's on renders, at ~40 us
EXTRA = "ws_gym[compress]"
MIN_SIZE = 4096  # smaller arrays always travel plain: too little to save
ZSTD_LEVEL = 1
ZSTD_MAX_WINDOW = 1 << 23  # a frame asking the decompressor for a larger window is refused
_MODULES = {"lz4": "lz4.block", "zstd": "zstandard"}
_PACKAGES = {"lz4": "lz4", "zstd": "zstandard"}


def _module(name: str) -> Any:
    try:
        return importlib.import_module(_MODULES[name])
    except ImportError:
        return None


def available() -> tuple[str, ...]:
    """The codecs installed here, in :data:`CODECS` order."""
    return tuple(n for n in CODECS if _module(n) is not None)


def require(choice: str, option: str = "compression={!r}") -> None:
    """Raise ImportError naming the extra when ``choice`` is a codec not installed
    (``option``: how the message names the choice)."""
    if choice in _MODULES and _module(choice) is None:
        raise ImportError(f"{option.format(choice)} needs the {_PACKAGES[choice]!r} package, "
                          f"which is not installed: pip install {EXTRA}")


def offer(choice: str) -> list[str]:
    """What a worker's hello offers for its ``--compression`` (auto: what is installed)."""
    if choice == "none":
        return []
    if choice == "auto":
        return list(available())
    if choice not in _MODULES:
        raise ValueError(f"--compression must be auto, none, lz4 or zstd, got {choice!r}")
    require(choice, "--compression {}")
    return [choice]


def choose(choice: str, offered: list[str], local: bool) -> tuple[str | None, bool]:
    """The trainer's decision for one connection: ``(codec or None, auto)``.

    ``local``: the worker is on this machine (loopback or Unix socket), where
    ``"auto"`` never compresses."""
    if choice == "none":
        return None, False
    if choice in _MODULES:
        return (choice if choice in offered else None), False
    if local:
        return None, False
    for name in available():
        if name in offered:
            return name, True
    return None, False


# ----------------------------------------------------------------------------- codecs


class _Lz4:
    name = "lz4"

    def __init__(self) -> None:
        self._block = _module("lz4")
        self._into = _lz4_into(self._block)

    def compress(self, data: Any) -> bytes:
        return self._block.compress(data, store_size=False)

    def decompress(self, data: Any, size: int) -> bytes:
        # uncompressed_size is the buffer lz4 allocates and may not exceed
        return self._block.decompress(data, uncompressed_size=size)

    def decompress_into(self, data: Any, out: memoryview) -> int:
        into = self._into
        if into is None:  # the binding has no output buffer: its output is copied once
            raw = self.decompress(data, len(out))
            out[: len(raw)] = raw
            return len(raw)
        src = np.frombuffer(data, np.uint8)
        dst = np.frombuffer(out, np.uint8)
        n = into(src.ctypes.data, dst.ctypes.data, len(src), len(dst))  # never writes past len(dst)
        if n < 0:
            raise ProtocolError(f"malformed lz4 data (error {n})")
        return n


def _lz4_into(block: Any) -> Any:
    """liblz4's ``LZ4_decompress_safe``, from the lz4 package's own module,
    where that exports it (as its Linux wheels do): it writes into a given
    buffer, which the Python binding cannot. None elsewhere (then one copy is made)."""
    try:
        lib = ctypes.CDLL(block._block.__file__)
        fn = lib.LZ4_decompress_safe
    except (AttributeError, OSError):
        return None
    fn.restype = ctypes.c_int
    fn.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int)
    return fn


class _Zstd:
    name = "zstd"

    def __init__(self) -> None:
        zstd = self._zstd = _module("zstd")
        self._c = zstd.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True)
        self._d = zstd.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)

    def compress(self, data: Any) -> bytes:
        return self._c.compress(data)

    def decompress(self, data: Any, size: int) -> bytes:
        self._check_declared(data, size)
        return self._d.decompress(data, max_output_size=size)

    def decompress_into(self, data: Any, out: memoryview) -> int:
        size = len(out)
        self._check_declared(data, size)
        reader = self._d.stream_reader(data, read_across_frames=False)
        n = 0
        while n < size:
            got = reader.readinto(out[n:])
            if not got:
                break
            n += got
        if n == size and reader.read(1):
            raise ProtocolError(f"a zstd frame holds more than the {size} bytes it declares")
        return n

    def _check_declared(self, data: Any, size: int) -> None:
        # the frame declares its size: it must be the expected one (else its
        # header would choose the allocation); the output may not exceed it
        declared = self._zstd.frame_content_size(data)
        if declared != size:
            raise ProtocolError(f"a zstd frame declares {declared} bytes, {size} were expected")


def make_codec(name: str) -> Any:
    require(name)
    return _Lz4() if name == "lz4" else _Zstd()


# ----------------------------------------------------------------------------- trainer side


class Decompressor:
    """One connection's decompression on the trainer: bounded, counted."""

    __slots__ = ("codec", "name", "limit", "frames", "raw_bytes", "wire_bytes")

    def __init__(self, name: str, limit: int) -> None:
        self.codec = make_codec(name)
        self.name = name
        self.limit = limit  # no frame decompresses to more than this (max_msg_size)
        self.frames = 0  # statistics: arrays decompressed, their size and what they took on the wire
        self.raw_bytes = 0
        self.wire_bytes = 0

    def unpack(self, data: Any, size: int) -> bytes:
        """Exactly ``size`` bytes from ``data``, or ProtocolError (never more is allocated)."""
        self._check(size)
        try:
            out = self.codec.decompress(data, size)
        except Exception as exc:  # noqa: BLE001 - the libraries' own errors
            raise self._error(exc, size) from None
        self._count(data, len(out), size)
        return out

    def unpack_into(self, data: Any, out: memoryview) -> None:
        """Decompress ``data`` into ``out`` (flat bytes: rows of a step's batch),
        which it must fill exactly; ProtocolError otherwise (nothing is written
        past ``out``, which is left undefined)."""
        size = len(out)
        self._check(size)
        try:
            n = self.codec.decompress_into(data, out)
        except Exception as exc:  # noqa: BLE001 - the libraries' own errors
            raise self._error(exc, size) from None
        self._count(data, n, size)

    def _check(self, size: int) -> None:
        if size > self.limit:
            raise ProtocolError(f"a compressed array claims {size} bytes, over the limit of {self.limit}")

    def _error(self, exc: Exception, size: int) -> ProtocolError:
        if isinstance(exc, ProtocolError):
            return exc
        return ProtocolError(f"a {self.name} array does not decompress to {size} bytes: {exc}")

    def _count(self, data: Any, got: int, size: int) -> None:
        if got != size:
            raise ProtocolError(f"a {self.name} array decompressed to {got} bytes, {size} were expected")
        self.frames += 1
        self.raw_bytes += size
        self.wire_bytes += len(data)

    @property
    def ratio(self) -> float:
        """Bytes before / after compression so far (0: nothing yet)."""
        return self.raw_bytes / self.wire_bytes if self.wire_bytes else 0.0


# ----------------------------------------------------------------------------- worker side


class AutoRule:
    """When ``"auto"`` compresses on one connection (worker side; no I/O).

    Compression pays when a step's round trip gets shorter: the time to
    compress and decompress is less than the time the saved bytes took on the
    link. The link's throughput is not known, and its own estimate would be
    noisy, so the rule measures the outcome itself, as the busy-poll policy
    does (:class:`ws_gym.polling.SpinPolicy`):

    1. The ratio, sampled: while it compresses, every payload; while not, one
       in :attr:`SAMPLE_EVERY`. Saving less than :attr:`MIN_SAVING` of the
       bytes never pays enough: compression stays off, without any timing.
    2. The step cycle: the time from one step request's arrival to the next's
       (this worker's reply, the link both ways, the trainer's wait for the
       other workers and its own work). The rule runs one arm (compress, at
       first: off loopback it nearly always pays) in blocks of at least
       :attr:`BLOCK` cycles and :attr:`BLOCK_TIME` seconds, and now and then
       a block of the other arm (a probe), comparing their mean cycles (each
       block's slowest left out). Compressing must be faster by
       :attr:`ON_MARGIN`: it costs CPU, so off wins ties. A probe that is
       plainly losing (50% slower, give or take one cycle) ends at once, so
       on a slow link a probe of "off" costs about one cycle. Probes come
       :attr:`MIN_PERIOD` to :attr:`MAX_PERIOD` seconds apart, the period
       doubling while the arm keeps winning.
    """

    SAMPLE_EVERY = 64
    MIN_SAVING = 0.2  # compressed must be at most 80% of the raw size
    BLOCK = 8
    BLOCK_TIME = 0.1
    ON_MARGIN = 0.95
    MIN_PERIOD = 1.0
    MAX_PERIOD = 60.0

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self.arm_on = True  # the arm it runs (a probe runs the other)
        self._probing = False
        self._n = 0
        self._sum = 0.0
        self._max = 0.0
        self._base = 0.0
        self._period = self.MIN_PERIOD
        self._probe_at = 0.0  # set at the first cycle
        self._skip = self.SAMPLE_EVERY - 1  # payloads until the next sample while not compressing
        self.raw = 0  # sampled bytes before and after compression
        self.packed = 0
        self.seconds = 0.0  # spent compressing samples
        self.samples = 0
        self.mark = 0.0  # the arrival of the last step request (0: none, or another request since)
        self.switches = 0  # statistics
        self.probes = 0

    @property
    def pays_in_size(self) -> bool:
        return not self.raw or self.packed <= (1.0 - self.MIN_SAVING) * self.raw

    @property
    def on(self) -> bool:
        """Whether the next large payload is compressed."""
        return (self.arm_on is not self._probing) and self.pays_in_size

    def sample_due(self) -> bool:
        """While not compressing: whether to compress this payload anyway, for the ratio."""
        if self._skip:
            self._skip -= 1
            return False
        self._skip = self.SAMPLE_EVERY - 1
        return True

    def sampled(self, raw: int, packed: int, seconds: float) -> None:
        if self.samples >= 256:  # a moving window: halve the old weight now and then
            self.raw, self.packed, self.seconds, self.samples = self.raw // 2, self.packed // 2, self.seconds / 2, 128
        self.raw += raw
        self.packed += packed
        self.seconds += seconds
        self.samples += 1

    def step_arrived(self, now: float) -> None:
        """A step request arrived: the cycle since the last one ends."""
        mark, self.mark = self.mark, now
        if not mark:
            self._probe_at = now + self.MIN_PERIOD
            return
        if not self.pays_in_size:
            return
        cycle = now - mark
        n = self._n = self._n + 1
        total = self._sum = self._sum + cycle
        if cycle > self._max:
            self._max = cycle
        if self._probing and total > (1.5 * n + 1.0) * self._base:
            self._end_probe(False, now)
        elif n >= self.BLOCK and total >= self.BLOCK_TIME:
            self._end_block(now)

    def other_request(self) -> None:
        """Another request came between steps: that cycle is not a step's."""
        self.mark = 0.0

    def _clear(self) -> None:
        self._n, self._sum, self._max = 0, 0.0, 0.0

    def _end_block(self, now: float) -> None:
        mean = (self._sum - self._max) / (self._n - 1)
        self._clear()
        if self._probing:
            probe_on = not self.arm_on
            won = mean < self._base * self.ON_MARGIN if probe_on else mean * self.ON_MARGIN <= self._base
            self._end_probe(won, now)
            return
        self._base = mean
        if now >= self._probe_at:
            self._probing = True
            self.probes += 1

    def _end_probe(self, won: bool, now: float) -> None:
        self._clear()
        self._probing = False
        if won:
            self.arm_on = not self.arm_on
            self.switches += 1
            self._period = self.MIN_PERIOD
        else:
            self._period = min(2 * self._period, self.MAX_PERIOD)
        self._probe_at = now + self._period


class Compressor:
    """One connection's compression on the worker: the codec, and the auto rule or always."""

    __slots__ = ("codec", "name", "rule", "min_size", "_clock", "arrays", "raw_bytes", "wire_bytes")

    def __init__(self, name: str, auto: bool, *, min_size: int = MIN_SIZE,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.codec = make_codec(name)
        self.name = name
        self.rule = AutoRule(clock) if auto else None
        self.min_size = min_size
        self._clock = clock
        self.arrays = 0  # statistics: arrays sent compressed, their raw and compressed bytes
        self.raw_bytes = 0
        self.wire_bytes = 0

    def pack(self, data: memoryview) -> bytes | None:
        """``data`` compressed, or None: send it plain (small, not paying, or not shrinking)."""
        size = len(data)
        if size < self.min_size:
            return None
        rule = self.rule
        if rule is None:
            packed = self.codec.compress(data)
        else:
            if not rule.on and not rule.sample_due():
                return None
            t0 = self._clock()
            packed = self.codec.compress(data)
            rule.sampled(size, len(packed), self._clock() - t0)
        if len(packed) >= size:
            return None
        self.arrays += 1
        self.raw_bytes += size
        self.wire_bytes += len(packed)
        return packed
