"""Unit tests of ws_gym.codec: round trips, zero-copy decoding, and fuzzing.

Everything here is pure (no sockets, no subprocesses) and deterministic:
hypothesis runs derandomized with a fixed example budget.
"""

from __future__ import annotations

import collections
import math
import struct
import tracemalloc

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ws_gym import codec
from ws_gym.codec import MAX_DEPTH, EncodeError, Message, Unencodable, decode, encode
from ws_gym.errors import ProtocolError

FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PROPERTY = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# ------------------------------------------------------------------ helpers


def rt(value, **kw):
    """Encode then decode ``value``; also check the header fields survive."""
    frame = encode("some-kind", 12345, value, **kw)
    assert isinstance(frame, bytes)
    assert len(frame) % 8 == 0
    msg = decode(frame)
    assert isinstance(msg, Message)
    assert msg.kind == "some-kind" and msg.id == 12345
    return msg.body


def _float_bits(x: float) -> bytes:
    return struct.pack("<d", x)


def _padded_long_double(dtype: np.dtype) -> bool:
    """x87 long doubles hold 10 bytes of value in 12 or 16: the rest is garbage."""
    return dtype.type in (np.longdouble, np.clongdouble) and np.finfo(dtype).nmant == 63


def assert_same(a, b, path="body"):
    """``b`` is an exact copy of ``a``: same types all the way down, same bits.

    Python float NaNs only need to be NaN (the wire form ``{"$f": "nan"}`` does
    not carry a payload); numpy data is compared bit for bit (long doubles by
    value and sign, as their padding bytes are undefined).
    """
    assert type(a) is type(b), f"{path}: {type(a).__name__} became {type(b).__name__}"
    if isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.dtype.str == b.dtype.str, f"{path}: dtype {a.dtype.str} vs {b.dtype.str}"
        assert a.shape == b.shape, f"{path}: shape {a.shape} vs {b.shape}"
        if a.dtype.kind == "O":
            for idx in np.ndindex(a.shape):
                assert_same(a[idx], b[idx], f"{path}{list(idx)}")
        elif _padded_long_double(a.dtype):
            assert np.array_equal(a, b, equal_nan=True), f"{path}: {a!r} vs {b!r}"
            assert np.array_equal(np.signbit(a.real), np.signbit(b.real)), path
        else:
            assert np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes(), f"{path}: data differs"
    elif isinstance(a, np.generic):
        assert np.asarray(a).dtype.str == np.asarray(b).dtype.str, path
        if _padded_long_double(np.asarray(a).dtype):
            return assert_same(np.asarray(a), np.asarray(b), path)
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), f"{path}: {a!r} vs {b!r}"
    elif type(a) is float:
        if math.isnan(a):
            assert math.isnan(b), f"{path}: {a!r} vs {b!r}"
        else:
            assert _float_bits(a) == _float_bits(b), f"{path}: {a!r} vs {b!r}"
    elif type(a) in (list, tuple):
        assert len(a) == len(b), f"{path}: length {len(a)} vs {len(b)}"
        for n, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{n}]")
    elif type(a) is dict:
        ka, kb = list(a), list(b)
        assert len(ka) == len(kb), f"{path}: keys {ka!r} vs {kb!r}"
        for x, y in zip(ka, kb):  # same keys, same order, same key types
            assert_same(x, y, f"{path}.keys()")
            assert_same(a[x], b[y], f"{path}[{x!r}]")
    elif type(a) is Unencodable:
        assert str(a) == str(b) and a.type_name == b.type_name, path
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


def build(header, tail: bytes = b"", *, hlen: int | None = None, pad: bool = True) -> bytes:
    """A frame from a header (a dict, or raw JSON bytes) and buffer bytes."""
    raw = header if isinstance(header, (bytes, bytearray)) else orjson.dumps(header)
    padding = b" " * (-(4 + len(raw)) % 8) if pad else b""
    n = len(raw) + len(padding) if hlen is None else hlen
    return struct.pack("<I", n) + raw + padding + tail


def split(frame: bytes) -> tuple[dict, bytes]:
    """The header dict and the buffer bytes of a frame made by ``encode``."""
    (n,) = struct.unpack_from("<I", frame)
    return orjson.loads(frame[4 : 4 + n]), frame[4 + n :]


def decode_or_reject(frame) -> Message | None:
    """Decode, accepting only success or ProtocolError; anything else fails the
    test, and so does allocating much more memory than the frame's size."""
    tracemalloc.start()
    try:
        return decode(frame)
    except ProtocolError:
        return None
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < 2**20 + 100 * len(frame), f"decoding {len(frame)} bytes allocated {peak} bytes"


def nested_list(levels: int):
    x: list = []
    for _ in range(levels - 1):
        x = [x]
    return x


# ------------------------------------------------------- plain JSON-ish values

SCALARS = [
    None,
    True,
    False,
    0,
    1,
    -1,
    2**31,
    2**63 - 1,
    2**63,
    2**64 - 1,
    2**64,
    -(2**63),
    -(2**63) - 1,
    10**100,
    -(10**100),
    7 * 10**399,
    0.0,
    -0.0,
    1.0,
    -2.5,
    0.1,
    1 / 3,
    1e16,
    1e308,
    -1.7976931348623157e308,
    5e-324,
    2.2250738585072014e-308,
    float("inf"),
    float("-inf"),
    "",
    "plain",
    "héllo ☃ \U0001f600 \x00 \n \"quoted\" \\",
    "$a",
    "$t",
    b"",
    b"\x00",
    bytes(range(256)),
    b"x" * 13,
]


@pytest.mark.parametrize("value", SCALARS, ids=lambda v: repr(v)[:40])
def test_scalar_round_trip(value):
    out = rt(value)
    assert_same(value, out)


def test_nan_round_trips_as_python_float():
    out = rt(float("nan"))
    assert type(out) is float and math.isnan(out)


def test_exact_float_repr():
    for x in [0.1, 0.2 + 0.1, 1 / 3, math.pi, 1e-310, 123456789.123456789, -0.0, 2.0**-1074]:
        out = rt(x)
        assert type(out) is float
        assert repr(out) == repr(x)
        assert _float_bits(out) == _float_bits(x)


def test_exact_python_types():
    out = rt([1, 1.0, True, 0, 0.0, False, None, "1", b"1", (1,), [1]])
    assert [type(x) for x in out] == [int, float, bool, int, float, bool, type(None), str, bytes, tuple, list]
    assert_same(out, [1, 1.0, True, 0, 0.0, False, None, "1", b"1", (1,), [1]])
    assert type(rt(2.0**70)) is float  # an integral float stays a float
    assert type(rt(2**70)) is int  # a big int stays an int


def test_containers():
    value = {
        "list": [1, [2, [3, []]], {}],
        "tuple": (1, (2.5, "x"), ()),
        "dict": {"a": {"b": {"c": None}}},
        "empty": [[], (), {}],
        "bytes": [b"ab", (b"",)],
        "order": {"z": 1, "a": 2, "m": 3},
    }
    out = rt(value)
    assert_same(value, out)
    assert list(out["order"]) == ["z", "a", "m"]


def test_dict_with_non_str_keys():
    value = {
        1: "one",
        -(2**70): "big",
        2.5: "float",
        float("inf"): "inf",
        None: "none",
        False: "false",
        (1, "a", (2,)): "tuple",
        b"raw": "bytes",
        "s": "str",
        np.int64(7): "numpy scalar",
    }
    out = rt(value)
    assert_same(value, out)
    assert type(list(out)[-1]) is np.int64


def test_dict_with_dollar_keys():
    for value in [
        {"$a": 0},
        {"$zz": 1, "x": 2},
        {"x": 2, "$t": [1, 2]},
        {"$": None},
        {"$O": [1], "v": [5]},
        {"$r": "repr", "t": "type"},
    ]:
        assert_same(value, rt(value))


def test_dict_subclass_becomes_dict():
    value = collections.OrderedDict([("b", 1), ("a", np.float32(2))])
    out = rt(value)
    assert type(out) is dict
    assert_same(dict(value), out)


def test_nested_mixture():
    value = {
        "obs": np.arange(12, dtype=np.float32).reshape(3, 4),
        "info": [{"k": (np.int8(-3), b"\x01", {2: [np.array(["a", "bc"])]})}, float("-inf")],
        "deep": ([[[[{"x": (np.bool_(True),)}]]]],),
    }
    assert_same(value, rt(value))


# ------------------------------------------------------------------ numpy arrays

DTYPES = [
    "?",
    "i1", "i2", "i4", "i8",
    "u1", "u2", "u4", "u8",
    "f2", "f4", "f8", np.longdouble,
    "c8", "c16", np.clongdouble,
    "U1", "U7",
    "S1", "S5",
    ">i2", ">i4", ">i8", ">u4", ">u8", ">f2", ">f4", ">f8", ">c16", ">U3",
]
SHAPES = [(), (0,), (1,), (5,), (2, 3), (0, 4), (3, 0, 2), (2, 1, 3, 1)]


def sample_array(dtype, shape) -> np.ndarray:
    dtype = np.dtype(dtype)
    size = math.prod(shape)
    if dtype.kind == "U":
        flat = np.array([("é€x" * 3 + str(i))[-dtype.itemsize // 4 :] for i in range(size)], dtype=dtype)
    elif dtype.kind == "S":
        flat = np.array([(b"\x00ab" + str(i).encode())[-dtype.itemsize :] for i in range(size)], dtype=dtype)
    elif dtype.kind == "b":
        flat = (np.arange(size) % 3 == 0).astype(dtype)
    elif dtype.kind in "iu":
        info = np.iinfo(dtype)
        flat = np.array([info.min, info.max, 0, 1] * size, dtype=dtype)[:size]
    else:
        specials = [np.nan, np.inf, -np.inf, -0.0, 0.1, 1e-3, 65504.0]
        flat = np.array([specials[i % len(specials)] * (1 + 1j * (i % 2) if dtype.kind == "c" else 1) for i in range(size)])
        flat = flat.astype(dtype)
    return flat.reshape(shape)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).str)
def test_array_round_trip(dtype, shape):
    arr = sample_array(dtype, shape)
    assert arr.dtype == np.dtype(dtype) and arr.shape == shape
    out = rt({"a": arr, "also": [arr]})
    assert_same(arr, out["a"])
    assert_same(arr, out["also"][0])
    assert not out["a"].flags.writeable


def test_big_endian_arrays_keep_their_byte_order():
    arr = np.arange(6, dtype=">f8").reshape(2, 3)
    out = rt(arr)
    assert out.dtype.str == ">f8"
    np.testing.assert_array_equal(out, arr)
    assert out.tobytes() == arr.tobytes()


@pytest.mark.parametrize(
    "make",
    [
        lambda: np.arange(20.0)[::2],
        lambda: np.arange(20.0)[::-1],
        lambda: np.arange(24, dtype=np.int16).reshape(4, 6).T,
        lambda: np.asfortranarray(np.arange(24, dtype=np.uint8).reshape(4, 6)),
        lambda: np.arange(60, dtype=np.float32).reshape(3, 4, 5)[:, 1::2, ::-2],
        lambda: np.broadcast_to(np.arange(3, dtype=">i4"), (4, 3)),
        lambda: np.arange(10, dtype="c16")[3:8:2],
        lambda: np.array(["ab", "c", "def"])[::2],
        lambda: np.zeros((4, 0, 3))[:, :, ::2],
    ],
)
def test_non_contiguous_arrays(make):
    arr = make()
    out = rt(arr)
    assert out.flags.c_contiguous
    assert out.dtype.str == arr.dtype.str and out.shape == arr.shape
    assert out.tobytes() == np.ascontiguousarray(arr).tobytes()


def test_array_of_every_buffer_alignment():
    # buffers of odd sizes follow each other; each must land on its own bytes
    arrays = [np.arange(n, dtype=dt) for n, dt in [(1, "u1"), (3, "i2"), (5, "f4"), (7, "u1"), (2, "c16"), (1, "f2")]]
    assert_same(arrays, rt(arrays))


NUMPY_SCALARS = [
    np.bool_(True),
    np.bool_(False),
    np.int8(-128),
    np.int16(-2),
    np.int32(2**31 - 1),
    np.int64(-(2**63)),
    np.uint8(255),
    np.uint16(3),
    np.uint32(2**32 - 1),
    np.uint64(2**64 - 1),
    np.float16(0.1),
    np.float16(-0.0),
    np.float32(1.5),
    np.float32(np.nan),
    np.float64(np.inf),
    np.float64(0.1),
    np.longdouble(1) / 3,
    np.complex64(1 - 2j),
    np.complex128(complex(np.nan, -np.inf)),
    np.clongdouble(1j) / 3,
    np.str_("héllo"),
    np.str_(""),
    np.bytes_(b"\x01bytes"),
]


@pytest.mark.parametrize("value", NUMPY_SCALARS, ids=lambda v: f"{type(v).__name__}({v!r})")
def test_numpy_scalar_keeps_its_type(value):
    out = rt(value)
    assert type(out) is type(value)
    assert_same(value, out)
    out = rt({"x": [value, (value,)]})
    assert type(out["x"][0]) is type(value) and type(out["x"][1][0]) is type(value)


def test_float32_stays_float32():
    out = rt([np.float32(0.1), 0.1])
    assert type(out[0]) is np.float32 and out[0] == np.float32(0.1)
    assert type(out[1]) is float and out[1] == 0.1


def _object_array(items, shape=None) -> np.ndarray:
    arr = np.empty(len(items), dtype=object)
    for n, x in enumerate(items):
        arr[n] = x
    return arr.reshape(shape if shape is not None else (len(items),))


@pytest.mark.parametrize(
    "arr",
    [
        _object_array([1, "a", None, 2.5, b"b", (1, 2), [3, [4]], {"k": np.arange(3)}, np.float32(7), 2**80]),
        _object_array([np.arange(3), np.zeros((2, 2), np.uint8), None, {"final": np.ones(2)}]),
        _object_array(list(range(6)), (2, 3)),
        _object_array([], (0, 3)),
        _object_array(["only"], ()),
        _object_array([_object_array([1, "x"]), _object_array([])]),
        np.arange(12).astype(object).reshape(3, 4).T,  # non-contiguous
    ],
    ids=["mixed", "arrays", "2d", "empty", "0d", "nested", "transposed"],
)
def test_object_arrays(arr):
    out = rt(arr)
    assert_same(arr, out)
    assert_same(arr, rt({"info": {"final_obs": arr}})["info"]["final_obs"])


# -------------------------------------------------------- zero-copy decoding


def _root(arr: np.ndarray):
    base = arr
    while isinstance(base, np.ndarray):
        base = base.base
    return base


def test_decoded_arrays_are_read_only_views_of_the_frame():
    value = {"a": np.arange(1000, dtype=np.float64), "b": [np.ones((3, 4), np.uint8)], "s": np.float32(3)}
    frame = encode("ok", 1, value)
    out = decode(frame).body
    for arr in (out["a"], out["b"][0]):
        assert not arr.flags.writeable
        assert _root(arr) is frame  # a view of the frame's bytes, not a copy
        with pytest.raises(ValueError):
            arr[...] = 0
    view = np.frombuffer(frame, np.uint8)
    assert np.shares_memory(out["a"], view) and np.shares_memory(out["b"][0], view)


def test_decoding_a_memoryview_does_not_copy():
    frame = encode("ok", 1, np.arange(100, dtype=np.int32))
    mv = memoryview(frame)
    out = decode(mv).body
    root = _root(out)
    assert (root.obj if isinstance(root, memoryview) else root) is frame
    assert np.shares_memory(out, np.frombuffer(frame, np.uint8)) and not out.flags.writeable
    np.testing.assert_array_equal(out, np.arange(100, dtype=np.int32))


def test_decoding_a_bytearray_gives_read_only_arrays():
    frame = bytearray(encode("ok", 1, {"a": np.arange(10.0)}))
    out = decode(frame).body["a"]
    assert not out.flags.writeable
    assert np.shares_memory(out, np.frombuffer(frame, np.uint8))


def test_decoding_10_mb_does_not_copy_the_data():
    big = np.arange(10 * 2**20 // 8, dtype=np.float64)
    frame = encode("ok", 1, {"obs": big, "more": [big[:10]]})
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        out = decode(frame).body
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2**20, f"decoding a 10 MB frame allocated {peak} bytes"
    assert _root(out["obs"]) is frame
    assert out["obs"][-1] == big[-1]


def test_writable_copies_read_only_arrays_only():
    out = rt({"a": np.arange(3), "l": [np.zeros(2)], "t": (np.ones(1),), "x": 1})
    assert not out["a"].flags.writeable
    own = codec.writable(out)
    assert own["a"].flags.writeable and own["l"][0].flags.writeable and own["t"][0].flags.writeable
    assert not np.shares_memory(own["a"], out["a"])
    mine = np.zeros(3)
    assert codec.writable(mine) is mine


def test_writable_reaches_into_object_arrays():
    arr = _object_array([np.arange(3), {"k": np.ones(2)}, [np.zeros(1)], 5, None])
    out = rt({"info": arr.reshape(1, 5)})
    inner = out["info"][0, 0]
    assert not inner.flags.writeable
    own = codec.writable(out)["info"]
    assert own.shape == (1, 5) and own.dtype == object
    assert own[0, 0].flags.writeable and own[0, 1]["k"].flags.writeable and own[0, 2][0].flags.writeable
    assert own[0, 3] == 5 and own[0, 4] is None
    assert_same(arr.reshape(1, 5), own)
    own[0, 0][0] = 99  # the frame is untouched
    assert inner[0] == 0


# ------------------------------------------------------------- unencodable


class _Opaque:
    def __repr__(self) -> str:
        return "<opaque thing>"


class _BrokenRepr:
    def __repr__(self) -> str:
        raise RuntimeError("no repr for you")


class _LongRepr:
    def __repr__(self) -> str:
        return "x" * 5000


Point = collections.namedtuple("Point", "x y")

UNENCODABLE = [
    (_Opaque(), "_Opaque", "<opaque thing>"),
    ({1, 2}, "set", "{1, 2}"),
    (frozenset(), "frozenset", "frozenset()"),
    (bytearray(b"ab"), "bytearray", "bytearray(b'ab')"),
    (Point(1, 2), "Point", "Point(x=1, y=2)"),
    (range(3), "range", "range(0, 3)"),
    (np.datetime64("2020-01-01"), "datetime64", None),
    (np.array(["2020-01-01"], dtype="M8[D]"), "ndarray", None),
    (np.zeros(2, dtype=[("a", "<f8"), ("b", "<i4")]), "ndarray", None),
    (np.zeros(2, dtype="V8"), "ndarray", None),
    (np.ma.masked_array([1, 2]), "MaskedArray", None),
    (complex(1, 2), "complex", "(1+2j)"),
    (_BrokenRepr(), "_BrokenRepr", None),
    (_LongRepr(), "_LongRepr", None),
]


@pytest.mark.parametrize("value,type_name,text", UNENCODABLE, ids=[u[1] + str(n) for n, u in enumerate(UNENCODABLE)])
def test_unencodable_values_become_their_repr(value, type_name, text):
    out = rt({"info": [value]})["info"][0]
    assert type(out) is Unencodable and isinstance(out, str)
    assert out.type_name == type_name
    if type_name == "_BrokenRepr":
        assert "failing repr" in out and "no repr for you" in out
    elif type_name == "_LongRepr":
        assert out == "x" * 997 + "..."
    else:
        assert out == (text if text is not None else repr(value))
    with pytest.raises(EncodeError) as info:
        encode("ok", 1, {"info": [value]}, strict=True)
    assert type_name.split(".")[-1] in str(info.value)
    assert isinstance(info.value, TypeError)


def test_unencodable_object_array_items():
    arr = _object_array([1, {3}, _Opaque()])
    out = rt(arr)
    assert out[0] == 1 and type(out[1]) is Unencodable and out[2] == "<opaque thing>"
    with pytest.raises(EncodeError):
        encode("ok", 1, arr, strict=True)


def test_strict_accepts_every_supported_value():
    value = [SCALARS, NUMPY_SCALARS, [sample_array(d, (2, 3)) for d in DTYPES], {1: (2,)}, _object_array([1, "a"])]
    assert_same(value, decode(encode("ok", 3, value, strict=True)).body)


@pytest.mark.parametrize("text", ["\ud800", "a\udcffb", "\udfff" * 3])
def test_lone_surrogates_have_no_wire_form(text):
    # JSON (UTF-8) cannot carry a lone surrogate: it is an unencodable value,
    # not a crash in the JSON encoder.
    out = rt({"s": text, "nested": [text], text: 1})
    assert type(out["s"]) is Unencodable and out["s"] == repr(text) and out["s"].type_name == "str"
    assert out["nested"][0] == repr(text)
    assert [type(k) for k in out] == [str, str, Unencodable]
    with pytest.raises(EncodeError):
        encode("ok", 1, text, strict=True)
    with pytest.raises(EncodeError):
        encode("ok", 1, {text: 1}, strict=True)


# ------------------------------------------------------------------- nesting


def test_nesting_at_the_limit_round_trips():
    value = nested_list(MAX_DEPTH + 1)
    assert_same(value, rt(value))
    tup: object = 0
    for _ in range(MAX_DEPTH):
        tup = (tup,)
    assert_same(tup, rt(tup))
    d: object = 0
    for _ in range(MAX_DEPTH):
        d = {0: d}
    assert_same(d, rt(d))


@pytest.mark.parametrize("strict", [False, True])
def test_deep_nesting_raises(strict):
    with pytest.raises(EncodeError, match="nested deeper"):
        encode("ok", 1, nested_list(MAX_DEPTH + 2), strict=strict)
    deep: object = None
    for _ in range(1000):
        deep = {"k": (deep,)}
    with pytest.raises(EncodeError, match="nested deeper"):
        encode("ok", 1, deep, strict=strict)


def test_self_referencing_value_raises():
    loop: list = []
    loop.append(loop)
    with pytest.raises(EncodeError):
        encode("ok", 1, loop)


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100 + b"]" * 100,
        b"[" * 1000 + b"]" * 1000,  # past orjson's own limit too
        b'{"$t": [' * 100 + b"1" + b"]}" * 100,
        b'{"$d": [[1, ' * 100 + b"1" + b"]]}" * 100,
        b'{"$O": [1], "v": [' * 100 + b"1" + b"]}" * 100,
        b'{"a": ' * 100 + b"1" + b"}" * 100,
    ],
    ids=["lists", "lists-1000", "tuples", "dicts", "objects", "plain-dicts"],
)
def test_decoding_deep_nesting_raises(body):
    with pytest.raises(ProtocolError):
        decode(build(b'{"k":"x","i":0,"b":[],"d":' + body + b"}"))


# ------------------------------------------------------------ header fields


def test_kind_id_and_max_size():
    frame = encode("step", 2**63, {"a": np.zeros(100)})
    msg = decode(frame, max_size=len(frame))
    assert msg.kind == "step" and msg.id == 2**63
    with pytest.raises(ProtocolError, match="over the limit"):
        decode(frame, max_size=len(frame) - 1)
    assert decode(encode("x", 0)).body is None


@pytest.mark.parametrize("bad", ["text", 123, None, [1, 2], np.zeros(8, np.uint8)])
def test_decode_refuses_non_binary_input(bad):
    with pytest.raises(ProtocolError):
        decode(bad)


# --------------------------------------------------------- malformed frames

_OK = {"k": "ok", "i": 1}
_F8 = ["<f8", [2]]
_TAIL16 = bytes(16)


def _hostile_frames():
    frames = {
        "empty": b"",
        "short": b"\x01\x00",
        "length-only": struct.pack("<I", 0),
        "header-length-too-big": build(_OK, hlen=1000),
        "header-length-2**32-1": build(_OK, hlen=2**32 - 1),
        "header-length-cuts-json": build(b'{"k":"ok","i":1}', hlen=5),
        "bad-json": build(b'{"k": "ok", "i": 1,,}'),
        "not-utf8": build(b'{"k": "\xff\xfe", "i": 1}'),
        "json-nan": build(b'{"k": "ok", "i": NaN}'),
        "json-array": build(b"[1, 2, 3]"),
        "json-string": build(b'"hello"'),
        "json-null": build(b"null"),
        "no-kind": build({"i": 1}),
        "empty-kind": build({"k": "", "i": 1}),
        "kind-not-str": build({"k": 5, "i": 1}),
        "no-id": build({"k": "ok"}),
        "negative-id": build({"k": "ok", "i": -1}),
        "bool-id": build({"k": "ok", "i": True}),
        "float-id": build({"k": "ok", "i": 1.0}),
        "specs-not-list": build({**_OK, "b": {"0": _F8}}),
        "too-many-specs": build({**_OK, "b": [["|u1", [0]]] * (codec.MAX_BUFFERS + 1)}),
        "spec-not-pair": build({**_OK, "b": [["<f8"]]}, _TAIL16),
        "spec-triple": build({**_OK, "b": [["<f8", [2], 0]]}, _TAIL16),
        "spec-shape-not-list": build({**_OK, "b": [["<f8", 2]]}, _TAIL16),
        "shape-too-long": build({**_OK, "b": [["<f8", [1] * 33]]}, _TAIL16),
        "negative-dim": build({**_OK, "b": [["<f8", [-2]]]}, _TAIL16),
        "negative-dims-cancel": build({**_OK, "b": [["<f8", [-1, -2]]]}, _TAIL16),
        "float-dim": build({**_OK, "b": [["<f8", [2.0]]]}, _TAIL16),
        "bool-dim": build({**_OK, "b": [["<f8", [True, True]]]}, _TAIL16),
        "huge-dim": build({**_OK, "b": [["<f8", [2**63]]]}, _TAIL16),
        "huge-dims": build({**_OK, "b": [["<f8", [2**62, 2**62, 2**62]]]}, _TAIL16),
        "huge-dim-times-zero": build({**_OK, "b": [["<f8", [0, 2**63]]]}),
        "huge-dims-times-zero": build({**_OK, "b": [["<f8", [2**62, 2**62, 0]]]}),
        "max-dim-times-zero": build({**_OK, "b": [["<f8", [2**64 - 1, 0]]]}),
        "int-too-big-for-json": build(b'{"k":"ok","i":1,"b":[["<f8",[0,1' + b"0" * 30 + b"]]]}"),
        "shape-bigger-than-bytes": build({**_OK, "b": [["<f8", [3]]], "d": {"$a": 0}}, _TAIL16),
        "shape-smaller-than-bytes": build({**_OK, "b": [["<f8", [1]]], "d": {"$a": 0}}, _TAIL16),
        "bytes-but-no-spec": build({**_OK, "d": None}, _TAIL16),
        "spec-but-no-bytes": build({**_OK, "b": [_F8], "d": {"$a": 0}}),
        "missing-padding": build({**_OK, "b": [["|u1", [3]]], "d": {"$y": 0}}, b"abc"),
        "extra-padding": build({**_OK, "b": [["|u1", [3]]], "d": {"$y": 0}}, b"abc" + bytes(13)),
        "second-buffer-short": build({**_OK, "b": [_F8, _F8]}, _TAIL16 + bytes(8)),
    }
    for dtype in [
        "|O8", "O", "|O", "V8", "|V8", "<V8", "<f8,<i4", "(1000000000,)f8", "(2,)f8", "f8", "float64",
        "<M8", "<m8[s]", "<M8[ns]", "<f8\n", " <f8", "<f3", "<i3", "<U0", "|S0", "<U9999999", "<c4",
        "|b2", "<q", "d", "", 8, None, ["<f8"], {"a": 1},
    ]:
        frames[f"dtype-{dtype!r}"] = build({**_OK, "b": [[dtype, [2]]], "d": {"$a": 0}}, _TAIL16)
    for name, body in {
        "unknown-tag": {"$zz": 1},
        "bare-dollar": {"$": 1},
        "a-missing-buffer": {"$a": 3},
        "a-negative": {"$a": -1},
        "a-bool": {"$a": False},
        "a-str": {"$a": "0"},
        "a-float": {"$a": 0.0},
        "s-not-0d": {"$s": 0},
        "s-missing": {"$s": 5},
        "y-not-u1": {"$y": 0},
        "y-missing": {"$y": 1},
        "t-not-list": {"$t": {"a": 1}},
        "t-null": {"$t": None},
        "d-not-list": {"$d": {"a": 1}},
        "d-not-pairs": {"$d": [[1, 2, 3]]},
        "d-pair-not-list": {"$d": ["ab"]},
        "d-list-key": {"$d": [[[1], 2]]},
        "d-dict-key": {"$d": [[{"a": 1}, 2]]},
        "d-array-key": {"$d": [[{"$a": 0}, 2]]},
        "d-tuple-with-list-key": {"$d": [[{"$t": [[1]]}, 2]]},
        "f-word": {"$f": "infinity"},
        "f-number": {"$f": 1.5},
        "f-list": {"$f": ["nan"]},
        "i-float": {"$i": 1.5},
        "i-int": {"$i": 5},
        "i-junk": {"$i": "12a"},
        "i-empty": {"$i": ""},
        "i-plus": {"$i": "+5"},
        "i-too-long": {"$i": "9" * 401},
        "i-unicode-digits": {"$i": "١٢٣"},
        "O-no-items": {"$O": [2]},
        "O-items-not-list": {"$O": [1], "v": 5},
        "O-shape-not-list": {"$O": 2, "v": [1, 2]},
        "O-mismatched-shape": {"$O": [3], "v": [1, 2]},
        "O-mismatched-2d": {"$O": [2, 2], "v": [1, 2, 3]},
        "O-negative-dims": {"$O": [-1, -2], "v": [1, 2]},
        "O-float-dim": {"$O": [2.0], "v": [1, 2]},
        "O-huge-dim": {"$O": [2**63, 0], "v": []},
        "O-huge-dims": {"$O": [2**62, 2**62, 0], "v": []},
        "O-too-many-dims": {"$O": [1] * 33, "v": [1]},
        "O-bad-item": {"$O": [1], "v": [{"$zz": 0}]},
        "r-not-str": {"$r": 5, "t": "x"},
        "r-type-not-str": {"$r": "x", "t": 5},
        "nested-bad-tag": {"a": [1, {"b": ({"$t": [{"$a": 9}]})}]},
    }.items():
        frames[f"body-{name}"] = build({**_OK, "b": [_F8], "d": body}, _TAIL16)
    return frames


HOSTILE = _hostile_frames()


@pytest.mark.parametrize("name", list(HOSTILE))
def test_malformed_frames_raise_protocol_error(name):
    frame = HOSTILE[name]
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError):
            decode(frame)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20, f"{name}: decoding {len(frame)} bytes allocated {peak} bytes"


# ------------------------------------------------------------ property tests

_dtypes = st.one_of(
    hnp.boolean_dtypes(),
    hnp.integer_dtypes(endianness="?"),
    hnp.unsigned_integer_dtypes(endianness="?"),
    hnp.floating_dtypes(endianness="?", sizes=(16, 32, 64)),
    hnp.complex_number_dtypes(endianness="?"),
    hnp.unicode_string_dtypes(endianness="?", min_len=1, max_len=4),
    hnp.byte_string_dtypes(min_len=1, max_len=4),
)
_arrays = _dtypes.flatmap(
    lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=3))
)
_numpy_scalars = _dtypes.flatmap(lambda dt: hnp.arrays(dt, ())).map(lambda a: a[()])
_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(),
    st.floats(),
    st.floats(width=32),
    st.text(max_size=8),
    st.sampled_from(["$a", "$t", "$zz", "$", "$O"]),
    st.binary(max_size=12),
    _arrays,
    _numpy_scalars,
)
_keys = st.one_of(
    st.text(max_size=5),
    st.sampled_from(["$a", "$d", "$", "$zz"]),
    st.integers(),
    st.floats(),
    st.none(),
    st.booleans(),
    st.binary(max_size=3),
    st.tuples(st.integers(), st.text(max_size=2)),
)


def _to_object_array(items_and_2d):
    items, two_d = items_and_2d
    arr = _object_array(items)
    if two_d and len(items) % 2 == 0:
        arr = arr.reshape(2, -1)
    return arr


_values = st.recursive(
    _leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(st.text(max_size=5), children, max_size=4),
        st.dictionaries(_keys, children, max_size=4),
        st.tuples(st.lists(children, max_size=4), st.booleans()).map(_to_object_array),
    ),
    max_leaves=20,
)


@PROPERTY
@given(value=_values)
def test_property_round_trip(value):
    frame = encode("ok", 9, value, strict=True)
    out = decode(frame).body
    assert_same(value, out)
    # decoding is deterministic and re-encoding gives the same frame
    assert encode("ok", 9, out, strict=True) == frame


# -------------------------------------------------------------------- fuzzing

_SAMPLE_VALUES = [
    None,
    {"obs": np.arange(12, dtype=np.float32).reshape(3, 4), "r": np.ones(3), "t": np.array([True, False, True])},
    [1, 2.5, "x", b"bytes!", (None, float("nan")), {3: 4}],
    {"info": _object_array([np.arange(3), None, {"k": np.int8(1)}]), "big": 2**80},
    (np.float32(1.5), np.array(["ab", "c"]), np.zeros((0, 2)), b"", np.uint64(7)),
    np.arange(5, dtype=">c16"),
]
_SAMPLE_FRAMES = [encode("step", n, v) for n, v in enumerate(_SAMPLE_VALUES)]
_frames = st.sampled_from(_SAMPLE_FRAMES)


@FUZZ
@given(data=st.binary(max_size=300))
def test_fuzz_random_bytes(data):
    decode_or_reject(data)
    decode_or_reject(struct.pack("<I", len(data)) + data)
    decode_or_reject(struct.pack("<I", max(len(data) - 7, 0)) + data)


@FUZZ
@given(frame=_frames, data=st.data())
def test_fuzz_truncations_always_raise(frame, data):
    n = data.draw(st.integers(min_value=0, max_value=len(frame) - 1))
    with pytest.raises(ProtocolError):
        decode(frame[:n])
    extra = data.draw(st.binary(min_size=1, max_size=16))
    with pytest.raises(ProtocolError):
        decode(frame + extra)


def test_every_truncation_of_every_sample_raises():
    for frame in _SAMPLE_FRAMES:
        for n in range(len(frame)):
            with pytest.raises(ProtocolError):
                decode(frame[:n])


@FUZZ
@given(frame=_frames, flips=st.lists(st.tuples(st.integers(min_value=0), st.integers(1, 255)), min_size=1, max_size=6))
def test_fuzz_byte_flips(frame, flips):
    buf = bytearray(frame)
    for pos, mask in flips:
        buf[pos % len(buf)] ^= mask
    decode_or_reject(bytes(buf))


@FUZZ
@given(frame=_frames, pos=st.integers(min_value=0), chunk=st.binary(min_size=1, max_size=8), delete=st.integers(0, 8))
def test_fuzz_splices(frame, pos, chunk, delete):
    pos %= len(frame)
    decode_or_reject(frame[:pos] + chunk + frame[pos + delete :])


_json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.integers(-3, 40),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=6),
)
_TAGS = ["$a", "$s", "$y", "$t", "$d", "$f", "$i", "$O", "$r", "$zz", "$"]


def _tagged(children):
    return st.one_of(
        st.builds(lambda t, v: {t: v}, st.sampled_from(_TAGS), children),
        st.builds(lambda s, v: {"$O": s, "v": v}, children, children),
        st.builds(lambda r, t: {"$r": r, "t": t}, children, children),
        st.builds(lambda v: {"$f": v}, st.sampled_from(["nan", "inf", "-inf", "NaN", 1])),
        st.builds(lambda v: {"$i": v}, st.sampled_from(["1", "-99999999999999999999999", "x", ""])),
        st.builds(lambda n: {"$a": n}, st.integers(-1, 4)),
        st.builds(lambda n: {"$s": n}, st.integers(-1, 4)),
        st.builds(lambda n: {"$y": n}, st.integers(-1, 4)),
    )


_json = st.recursive(
    _json_leaf,
    lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(st.text(max_size=4), c, max_size=4), _tagged(c)),
    max_leaves=12,
)
_dtype_strs = st.one_of(
    st.sampled_from(
        ["<f8", ">f4", "|u1", "|b1", "<i2", "<c16", "<U2", "|S3", "<f2", "|O8", "V8", "<f8,<i4",
         "(1000000000,)f8", "<M8", "<U0", "|S0", "<f16", "<c32", "=i4"]
    ),
    st.text(max_size=6),
    _json_leaf,
)
_dims = st.one_of(st.integers(0, 6), st.integers(min_value=-(2**63), max_value=2**64 - 1), _json_leaf)
_specs = st.one_of(
    st.lists(st.tuples(_dtype_strs, st.one_of(st.lists(_dims, max_size=4), _json_leaf)).map(list), max_size=4),
    _json,
)


@FUZZ
@given(
    frame=_frames,
    k=st.one_of(st.just(None), _json_leaf),
    i=st.one_of(st.just(None), _json_leaf),
    b=st.one_of(st.just(None), _specs),
    d=st.one_of(st.just(None), _json),
    hlen_delta=st.one_of(st.just(0), st.integers(-20, 20)),
    tail=st.one_of(st.just(None), st.binary(max_size=64)),
)
def test_fuzz_header_rewrites(frame, k, i, b, d, hlen_delta, tail):
    header, buffers = split(frame)
    for key, new in (("k", k), ("i", i), ("b", b), ("d", d)):
        if new is not None:
            header[key] = new
    raw = orjson.dumps(header)
    padding = b" " * (-(4 + len(raw)) % 8)
    hlen = max(len(raw) + len(padding) + hlen_delta, 0)
    decode_or_reject(struct.pack("<I", hlen) + raw + padding + (buffers if tail is None else tail))


@FUZZ
@given(specs=_specs, d=_json, tail=st.binary(max_size=96))
def test_fuzz_synthetic_headers(specs, d, tail):
    decode_or_reject(build({"k": "ok", "i": 0, "b": specs, "d": d}, tail))
    decode_or_reject(build({"k": "ok", "i": 0, "b": specs, "d": d}, tail, pad=False))


@settings(FUZZ, max_examples=100)
@given(value=_values)
def test_fuzz_mutated_generated_frames(value):
    # a valid frame of a random value, with its buffers shifted by 8 bytes
    frame = encode("ok", 0, value)
    header, buffers = split(frame)
    decode_or_reject(build(header, buffers[8:]))
    decode_or_reject(build(header, bytes(8) + buffers))
