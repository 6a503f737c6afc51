"""Unit tests of ws_gym.spaces: lossless space <-> schema round trips, refusals."""

from __future__ import annotations

from collections import OrderedDict

import gymnasium as gym
import numpy as np
import orjson
import pytest
from gymnasium import spaces
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ws_gym.errors import ProtocolError, UnsupportedSpaceError
from ws_gym.spaces import MAX_DEPTH, MAX_ELEMENTS, SUPPORTED, schema_to_space, space_to_schema

FUZZ = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning", "ignore::RuntimeWarning", "ignore::DeprecationWarning"
)


# ------------------------------------------------------------------ helpers


def over_the_wire(space: gym.Space) -> gym.Space:
    schema = space_to_schema(space)
    wire = orjson.loads(orjson.dumps(schema))  # strict JSON: no nan, no numpy
    assert wire == schema
    return schema_to_space(wire)


def _same_bits(a: np.ndarray, b: np.ndarray, what: str) -> None:
    assert type(a) is np.ndarray and type(b) is np.ndarray, what
    assert a.dtype == b.dtype and a.dtype.str == b.dtype.str, f"{what}: {a.dtype} vs {b.dtype}"
    assert a.shape == b.shape, f"{what}: {a.shape} vs {b.shape}"
    assert a.tobytes() == b.tobytes(), f"{what}: {a!r} vs {b!r}"


def assert_same_space(a: gym.Space, b: gym.Space, path: str = "space") -> None:
    assert type(a) is type(b), f"{path}: {type(a).__name__} vs {type(b).__name__}"
    assert a == b and b == a, f"{path}: {a} != {b}"
    assert str(a) == str(b) and repr(a) == repr(b), path
    assert a.shape == b.shape, path
    assert a.dtype == b.dtype, path
    if isinstance(a, spaces.Box):
        _same_bits(a.low, b.low, f"{path}.low")
        _same_bits(a.high, b.high, f"{path}.high")
        assert (a.bounded_below == b.bounded_below).all() and (a.bounded_above == b.bounded_above).all()
    elif isinstance(a, spaces.Discrete):
        assert type(b.n) is type(a.n) and type(b.start) is type(a.start), path
        assert a.n == b.n and a.start == b.start, path
    elif isinstance(a, spaces.MultiDiscrete):
        _same_bits(a.nvec, b.nvec, f"{path}.nvec")
        _same_bits(a.start, b.start, f"{path}.start")
    elif isinstance(a, spaces.MultiBinary):
        assert type(a.n) is type(b.n) or (isinstance(a.n, (int, np.integer)) and isinstance(b.n, (int, np.integer)))
        assert np.array_equal(a.n, b.n), path
    elif isinstance(a, spaces.Text):
        assert (a.min_length, a.max_length) == (b.min_length, b.max_length), path
        assert a.characters == b.characters and a.character_list == b.character_list, path
    elif isinstance(a, spaces.Dict):
        assert list(a.keys()) == list(b.keys()), f"{path}: key order {list(a)} vs {list(b)}"
        for k in a.keys():
            assert_same_space(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, spaces.Tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_space(x, y, f"{path}[{i}]")
    else:  # pragma: no cover
        raise AssertionError(f"unexpected space {a!r}")


def check(space: gym.Space, *, sample: bool = True) -> gym.Space:
    out = over_the_wire(space)
    assert_same_space(space, out)
    if sample:  # samples of the original are in the rebuilt space and vice versa
        space.seed(0)
        out.seed(0)
        assert out.contains(space.sample()) and space.contains(out.sample())
    return out


# --------------------------------------------------------------------- Box

INT_DTYPES = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64]
FLOAT_DTYPES = [np.float16, np.float32, np.float64]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(), (1,), (3,), (2, 3), (0,), (2, 0, 2)], ids=str)
def test_box_float(dtype, shape):
    check(spaces.Box(-1.5, 2.25, shape, dtype))
    check(spaces.Box(-np.inf, np.inf, shape, dtype))
    check(spaces.Box(0.0, np.inf, shape, dtype))
    check(spaces.Box(-np.inf, -0.0, shape, dtype))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_box_float_per_element_bounds(dtype):
    low = np.array([[-np.inf, -1.0, 0.1], [-0.0, 0.0, -65504.0]], dtype=dtype)
    high = np.array([[np.inf, 1e-3, 0.2], [0.0, np.inf, 65504.0]], dtype=dtype)
    out = check(spaces.Box(low, high, dtype=dtype))
    assert np.signbit(out.low[1, 0]) and not np.signbit(out.low[1, 1])  # -0.0 and 0.0 both kept


def test_box_float_extremes():
    # (no sampling: numpy cannot sample ranges as wide as these)
    f64 = np.finfo(np.float64)
    low, high = np.array([f64.min, -f64.tiny, 5e-324]), np.array([f64.max, f64.tiny, 1e-300])
    check(spaces.Box(low, high, dtype=np.float64), sample=False)
    f32 = np.finfo(np.float32)
    check(spaces.Box(np.float32(f32.min), np.float32(f32.max), (4,), np.float32), sample=False)
    check(spaces.Box(np.float32(0.1), np.float32(0.1), (2,), np.float32))  # low == high
    f16 = np.finfo(np.float16)
    check(spaces.Box(np.float16(f16.smallest_subnormal), np.float16(f16.max), (2,), np.float16), sample=False)
    check(spaces.Box(np.array([-0.0, 0.0], np.float32), np.array([0.0, -0.0], np.float32)), sample=False)


@pytest.mark.parametrize("dtype", INT_DTYPES, ids=lambda d: np.dtype(d).name)
def test_box_int_extreme_bounds(dtype):
    info = np.iinfo(dtype)
    sample = info.bits < 64  # gymnasium cannot sample the whole 64-bit range
    check(spaces.Box(info.min, info.max, (3,), dtype), sample=sample)
    check(spaces.Box(info.min, info.max, (), dtype), sample=sample)
    low = np.array([info.min, 0, info.max - 1], dtype=dtype)
    high = np.array([info.max, 1, info.max], dtype=dtype)
    check(spaces.Box(low, high, dtype=dtype), sample=sample)


@pytest.mark.parametrize("dtype", INT_DTYPES[:4], ids=lambda d: np.dtype(d).name)
def test_box_int_from_infinite_bounds(dtype):
    # a signed int Box built from +-inf is unbounded there (it samples
    # differently): that must survive, not just the dtype's min and max it stores
    cases = [spaces.Box(-np.inf, np.inf, (2,), dtype), spaces.Box(-np.inf, 5, (2, 2), dtype), spaces.Box(0, np.inf, (), dtype)]
    if dtype is not np.int64:  # gymnasium casts an int64 inf in a float array to -2**63
        cases.append(spaces.Box(np.array([-np.inf, 1, -np.inf]), np.array([np.inf, 7, 3]), dtype=dtype))
    for space in cases:
        out = check(space, sample=False)
        assert out.is_bounded("below") == space.is_bounded("below")
        assert out.is_bounded("above") == space.is_bounded("above")


def test_box_bool():
    check(spaces.Box(0, 1, (3, 2), np.bool_))
    check(spaces.Box(np.array([False, True]), np.array([True, True]), dtype=np.bool_))


def test_box_image():
    check(spaces.Box(0, 255, (84, 84, 4), np.uint8))


def test_box_big_but_allowed():
    check(spaces.Box(0.0, 1.0, (1000, 1000), np.float32))


def test_box_long_double_is_unsupported():
    # JSON numbers are doubles: a long double bound could not cross losslessly
    if np.dtype(np.longdouble) == np.dtype(np.float64):
        pytest.skip("long double is double here")
    space = spaces.Dict({"x": spaces.Box(np.longdouble(-1.5), np.longdouble(1) / 3, (2,), np.longdouble)})
    with pytest.raises(UnsupportedSpaceError, match=r"space\['x'\].*" + np.dtype(np.longdouble).name):
        space_to_schema(space)
    with pytest.raises(ProtocolError):
        schema_to_space(_box(dtype=np.dtype(np.longdouble).str))


def test_box_schema_is_compact():
    schema = space_to_schema(spaces.Box(0, 255, (84, 84, 4), np.uint8))
    assert schema == {"type": "Box", "dtype": "|u1", "shape": [84, 84, 4], "low": 0, "high": 255}
    schema = space_to_schema(spaces.Box(-np.inf, np.inf, (2,), np.float32))
    assert schema["low"] == "-inf" and schema["high"] == "inf"


_box_dtypes = st.sampled_from(FLOAT_DTYPES)
_bounds = st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.1, 1e-8, 6e-8, 65504.0, -65504.0, 3e38, -3e38, 1e300, np.inf, -np.inf])


@settings(FUZZ, max_examples=150)
@given(
    dtype=_box_dtypes,
    shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=3),
    data=st.data(),
)
def test_property_box_round_trip(dtype, shape, data):
    size = int(np.prod(shape))
    values = st.lists(st.one_of(_bounds, st.floats(allow_nan=False)), min_size=size, max_size=size)
    with np.errstate(over="ignore"):  # 1e300 as float16 is inf: fine
        a = np.array(data.draw(values), dtype=dtype).reshape(shape)
        b = np.array(data.draw(values), dtype=dtype).reshape(shape)
    low, high = np.minimum(a, b), np.maximum(a, b)
    try:
        space = spaces.Box(low, high, dtype=dtype)
    except ValueError:  # e.g. low == high == inf
        assume(False)
    check(space, sample=False)


@settings(FUZZ, max_examples=100)
@given(
    dtype=st.sampled_from(INT_DTYPES),
    shape=hnp.array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=3),
    data=st.data(),
)
def test_property_int_box_round_trip(dtype, shape, data):
    a = data.draw(hnp.arrays(dtype, shape))
    b = data.draw(hnp.arrays(dtype, shape))
    check(spaces.Box(np.minimum(a, b), np.maximum(a, b), dtype=dtype), sample=False)


# -------------------------------------------------------- Discrete and co


@pytest.mark.parametrize(
    "space",
    [
        spaces.Discrete(1),
        spaces.Discrete(5),
        spaces.Discrete(3, start=-7),
        spaces.Discrete(4, dtype=np.int32),
        spaces.Discrete(6, start=-3, dtype=np.int32),
        spaces.Discrete(200, start=10, dtype=np.uint8),
        spaces.Discrete(2**40, start=-(2**40)),
        spaces.Discrete(2**63 - 1),
        spaces.Discrete(3, dtype=np.int8),
    ],
    ids=repr,
)
def test_discrete(space):
    out = check(space)
    assert out.dtype == space.dtype


@pytest.mark.parametrize(
    "space",
    [
        spaces.MultiDiscrete([2, 3, 4]),
        spaces.MultiDiscrete([2, 3, 4], start=[-1, 0, 5]),
        spaces.MultiDiscrete(np.array([[2, 3], [4, 5]])),
        spaces.MultiDiscrete(np.array([[2, 3], [4, 5]]), start=np.array([[1, -1], [0, 2]])),
        spaces.MultiDiscrete([3, 3], dtype=np.int32),
        spaces.MultiDiscrete([5, 6], dtype=np.uint8, start=[1, 2]),
        spaces.MultiDiscrete(np.array(3)),
        spaces.MultiDiscrete([2**62, 7], start=[-(2**62), 2**62]),
    ],
    ids=repr,
)
def test_multi_discrete(space):
    check(space, sample=space.shape != ())  # a 0-d MultiDiscrete samples a scalar it refuses


@pytest.mark.parametrize(
    "space",
    [spaces.MultiBinary(1), spaces.MultiBinary(5), spaces.MultiBinary([2, 3]), spaces.MultiBinary((4,))],
    ids=repr,
)
def test_multi_binary(space):
    out = check(space)
    assert str(out) == str(space)


@pytest.mark.parametrize(
    "space",
    [
        spaces.Text(10),
        spaces.Text(5, min_length=2, charset="abc"),
        spaces.Text(5, min_length=5, charset="cba"),  # the charset order is kept
        spaces.Text(3, charset="☃é\x00 z\U0001f600\"\\"),
        spaces.Text(0, min_length=0),
        spaces.Text(2**40, min_length=1, charset="01"),
    ],
    ids=repr,
)
def test_text(space):
    check(space, sample=space.max_length < 1000)


def test_dict_and_tuple_nested():
    space = spaces.Dict(
        {
            "obs": spaces.Box(-1, 1, (3,), np.float32),
            "inner": spaces.Dict(
                {
                    "pair": spaces.Tuple((spaces.Discrete(2, start=1), spaces.Text(3, charset="xy"))),
                    "bits": spaces.MultiBinary([2, 2]),
                }
            ),
            "many": spaces.Tuple([spaces.MultiDiscrete([2, 3]), spaces.Tuple([]), spaces.Dict({})]),
            "$odd key": spaces.Discrete(3),
            "": spaces.Discrete(4),
        }
    )
    check(space)
    check(spaces.Tuple([space, spaces.Tuple([space])]))


@pytest.mark.parametrize(
    "space",
    [
        spaces.Dict([("b", spaces.Discrete(2)), ("a", spaces.Discrete(3))]),
        spaces.Dict(OrderedDict([("z", spaces.Discrete(2)), ("a", spaces.Box(0, 1))])),
        spaces.Dict({"z": spaces.Discrete(2), "a": spaces.Discrete(3)}, sort_keys=False),
        spaces.Dict(z=spaces.Discrete(2), a=spaces.Discrete(3)),
        spaces.Dict({"z": spaces.Discrete(2), "a": spaces.Discrete(3)}),  # sorted by gymnasium
    ],
    ids=["pairs", "ordereddict", "unsorted", "kwargs", "sorted"],
)
def test_dict_key_order_is_kept(space):
    out = check(space)
    assert list(out.keys()) == list(space.keys())


def test_nesting_up_to_the_limit():
    space: gym.Space = spaces.Discrete(2)
    for _ in range(MAX_DEPTH):
        space = spaces.Tuple([space])
    check(space)


# ------------------------------------------------------------ unsupported


class CustomSpace(gym.Space):
    def __init__(self):
        super().__init__((), None)

    def sample(self, mask=None, probability=None):
        return 0

    def contains(self, x):
        return x == 0


class BoxSubclass(spaces.Box):
    pass


UNSUPPORTED = [
    (spaces.Graph(spaces.Box(0, 1, (2,)), spaces.Discrete(3)), "Graph"),
    (spaces.Sequence(spaces.Discrete(2)), "Sequence"),
    (spaces.OneOf([spaces.Discrete(2), spaces.Box(0, 1)]), "OneOf"),
    (CustomSpace(), "CustomSpace"),
    (BoxSubclass(0, 1, (2,)), "BoxSubclass"),
]


@pytest.mark.parametrize("space,name", UNSUPPORTED, ids=[n for _, n in UNSUPPORTED])
def test_unsupported_spaces_are_named(space, name):
    with pytest.raises(UnsupportedSpaceError) as info:
        space_to_schema(space)
    text = str(info.value)
    assert name in text and text.startswith("space is ")
    assert isinstance(info.value, TypeError)
    for supported in SUPPORTED:
        assert supported in text


@pytest.mark.parametrize("space,name", UNSUPPORTED, ids=[n for _, n in UNSUPPORTED])
def test_unsupported_spaces_nested_give_their_path(space, name):
    cases = [
        (spaces.Dict({"key": space}), "space['key']"),
        (spaces.Tuple([spaces.Discrete(2), space]), "space[1]"),
        (spaces.Dict({"a": spaces.Discrete(2), "b": spaces.Tuple([spaces.Dict({"deep": space})])}), "space['b'][0]['deep']"),
    ]
    for outer, path in cases:
        with pytest.raises(UnsupportedSpaceError) as info:
            space_to_schema(outer)
        text = str(info.value)
        assert text.startswith(path + " is ") and name in text, text


def test_dict_with_non_str_keys_is_unsupported():
    for space, path in [
        (spaces.Dict({1: spaces.Discrete(2)}), "space"),
        (spaces.Tuple([spaces.Dict({("a", 1): spaces.Discrete(2)})]), "space[0]"),
    ]:
        with pytest.raises(UnsupportedSpaceError) as info:
            space_to_schema(space)
        assert str(info.value).startswith(path) and "key" in str(info.value)


# --------------------------------------------------------- malformed schemas


def _box(**kw):
    return {"type": "Box", "dtype": "<f4", "shape": [2], "low": 0, "high": 1, **kw}


def _without(schema, key):
    return {k: v for k, v in schema.items() if k != key}


def _nested(levels):
    schema = {"type": "Discrete", "n": 2, "start": 0, "dtype": "<i8"}
    for _ in range(levels):
        schema = {"type": "Tuple", "spaces": [schema]}
    return schema


_DISCRETE = {"type": "Discrete", "n": 3, "start": 0, "dtype": "<i8"}
_MD = {"type": "MultiDiscrete", "nvec": 3, "start": 0, "shape": [2], "dtype": "<i8"}
_TEXT = {"type": "Text", "min_length": 0, "max_length": 5, "charset": "ab"}

MALFORMED = {
    "none": None,
    "list": [],
    "str": "Box",
    "int": 5,
    "no-type": {"n": 3},
    "type-not-str": {"type": 1},
    "unknown-type": {"type": "Graph"},
    "lowercase-type": {"type": "box"},
    "box-no-dtype": _without(_box(), "dtype"),
    "box-no-shape": _without(_box(), "shape"),
    "box-no-low": _without(_box(), "low"),
    "box-no-high": _without(_box(), "high"),
    "box-shape-int": _box(shape=2),
    "box-shape-negative": _box(shape=[-2]),
    "box-shape-negatives": _box(shape=[-2, -2]),
    "box-shape-float": _box(shape=[2.0]),
    "box-shape-bool": _box(shape=[True]),
    "box-shape-str": _box(shape=["2"]),
    "box-shape-33-dims": _box(shape=[1] * 33),
    "box-too-many-elements": _box(shape=[MAX_ELEMENTS + 1]),
    "box-too-many-elements-2d": _box(shape=[2**13, 2**13, 2]),
    "box-huge-dim": _box(shape=[2**40]),
    "box-max-dim": _box(shape=[2**64 - 1]),
    "box-huge-dims-with-zero": _box(shape=[2**63, 0], low={"list": []}, high={"list": []}),
    "box-dtype-O": _box(dtype="O"),
    "box-dtype-|O8": _box(dtype="|O8"),
    "box-dtype-V8": _box(dtype="V8"),
    "box-dtype-struct": _box(dtype="<f8,<i4"),
    "box-dtype-f8,": _box(dtype="f8,"),
    "box-dtype-comma": _box(dtype=","),
    "box-dtype-parens": _box(dtype="(,)"),
    "box-dtype-subarray": _box(dtype="(2,)f8"),
    "box-dtype-subarray-long": _box(dtype="(1000000000,)f8"),
    "box-dtype-complex": _box(dtype="<c16"),
    "box-dtype-datetime": _box(dtype="<M8"),
    "box-dtype-str": _box(dtype="<U3"),
    "box-dtype-bytes": _box(dtype="|S3"),
    "box-dtype-void": _box(dtype="V"),
    "box-dtype-a": _box(dtype="a"),
    "box-dtype-empty": _box(dtype=""),
    "box-dtype-nonsense": _box(dtype="zz"),
    "box-dtype-int": _box(dtype=8),
    "box-dtype-list": _box(dtype=["<f4"]),
    "box-low-str": _box(low="abc"),
    "box-low-NaN-word": _box(low="NaN"),
    "box-low-nan": _box(low="nan"),
    "box-low-list": _box(low=[0, 0]),
    "box-low-none": _box(low=None),
    "box-low-bool": _box(low=False),
    "box-low-dict-no-list": _box(low={"values": [0, 0]}),
    "box-low-list-too-short": _box(low={"list": [0]}),
    "box-low-list-too-long": _box(low={"list": [0, 0, 0]}),
    "box-low-list-bad-item": _box(low={"list": [0, "x"]}),
    "box-low-list-nested": _box(low={"list": [[0], [0]]}),
    "box-low-above-high": _box(low=2, high=1),
    "box-high-nan": _box(high="nan"),
    "box-int-float-low": _box(dtype="<i8", low=1.5, high=3),
    "box-int-float-huge": _box(dtype="<i8", low=-1e30, high=3),
    "box-uint-inf": _box(dtype="<u8", low=0, high="inf"),
    "box-uint-inf-list": _box(dtype="|u1", low=0, high={"list": [1, "inf"]}),
    "box-int-out-of-range": _box(dtype="|u1", low=0, high=256),
    "box-int-negative-uint": _box(dtype="<u8", low=-1, high=3),
    "box-int-too-big": _box(dtype="<i8", low=0, high=2**63),
    "box-int-way-too-big": _box(dtype="<i8", low=0, high=2**70),
    "box-uint-minus-inf": _box(dtype="<u4", low="-inf", high=3),
    "box-int-low-plus-inf": _box(dtype="<i4", low="inf", high="inf"),
    "box-int-high-minus-inf": _box(dtype="<i4", low="-inf", high="-inf"),
    "box-int-nan": _box(dtype="<i4", low="nan", high=3),
    "box-int-list-bad-inf": _box(dtype="<i2", low={"list": [0, "inf"]}, high=3),
    "box-bool-inf": _box(dtype="|b1", low=False, high="inf"),
    "box-bool-int": _box(dtype="|b1", low=0, high=2),
    "box-bool-float": _box(dtype="|b1", low=0.0, high=1.0),
    "discrete-no-n": _without(_DISCRETE, "n"),
    "discrete-no-start": _without(_DISCRETE, "start"),
    "discrete-no-dtype": _without(_DISCRETE, "dtype"),
    "discrete-n-str": {**_DISCRETE, "n": "3"},
    "discrete-n-float": {**_DISCRETE, "n": 3.0},
    "discrete-n-bool": {**_DISCRETE, "n": True},
    "discrete-n-zero": {**_DISCRETE, "n": 0},
    "discrete-n-negative": {**_DISCRETE, "n": -1},
    "discrete-n-huge": {**_DISCRETE, "n": 2**64},
    "discrete-n-overflow": {**_DISCRETE, "n": 2**63},
    "discrete-start-float": {**_DISCRETE, "start": 0.5},
    "discrete-dtype-float": {**_DISCRETE, "dtype": "<f8"},
    "discrete-dtype-bool": {**_DISCRETE, "dtype": "|b1"},
    "discrete-dtype-overflow": {**_DISCRETE, "n": 1000, "dtype": "|u1"},
    "discrete-dtype-negative-start": {**_DISCRETE, "start": -1, "dtype": "<u4"},
    "md-no-nvec": _without(_MD, "nvec"),
    "md-no-shape": _without(_MD, "shape"),
    "md-nvec-zero": {**_MD, "nvec": 0},
    "md-nvec-negative": {**_MD, "nvec": {"list": [2, -1]}},
    "md-nvec-float": {**_MD, "nvec": 2.5},
    "md-nvec-wrong-length": {**_MD, "nvec": {"list": [2, 3, 4]}},
    "md-start-float": {**_MD, "start": 0.5},
    "md-nvec-inf": {**_MD, "nvec": "inf"},
    "md-start-minus-inf": {**_MD, "start": "-inf"},
    "md-dtype-float": {**_MD, "dtype": "<f8"},
    "md-too-big": {**_MD, "shape": [MAX_ELEMENTS + 1]},
    "mb-no-n": {"type": "MultiBinary"},
    "mb-n-str": {"type": "MultiBinary", "n": "3"},
    "mb-n-float": {"type": "MultiBinary", "n": 3.0},
    "mb-n-zero": {"type": "MultiBinary", "n": 0},
    "mb-n-negative": {"type": "MultiBinary", "n": -1},
    "mb-n-list-negative": {"type": "MultiBinary", "n": [2, -1]},
    "mb-n-list-zero": {"type": "MultiBinary", "n": [2, 0]},
    "mb-n-list-str": {"type": "MultiBinary", "n": ["2"]},
    "mb-n-huge": {"type": "MultiBinary", "n": 2**40},
    "mb-n-too-many": {"type": "MultiBinary", "n": MAX_ELEMENTS + 1},
    "mb-n-list-huge": {"type": "MultiBinary", "n": [2**20, 2**20]},
    "text-no-charset": _without(_TEXT, "charset"),
    "text-empty-charset": {**_TEXT, "charset": ""},
    "text-charset-list": {**_TEXT, "charset": ["a", "b"]},
    "text-no-max": _without(_TEXT, "max_length"),
    "text-no-min": _without(_TEXT, "min_length"),
    "text-max-negative": {**_TEXT, "max_length": -1},
    "text-min-above-max": {**_TEXT, "min_length": 6},
    "text-min-negative": {**_TEXT, "min_length": -1},
    "text-max-float": {**_TEXT, "max_length": 5.0},
    "dict-no-spaces": {"type": "Dict"},
    "dict-spaces-object": {"type": "Dict", "spaces": {"a": _DISCRETE}},
    "dict-pair-too-short": {"type": "Dict", "spaces": [["a"]]},
    "dict-pair-too-long": {"type": "Dict", "spaces": [["a", _DISCRETE, 1]]},
    "dict-key-not-str": {"type": "Dict", "spaces": [[1, _DISCRETE]]},
    "dict-bad-child": {"type": "Dict", "spaces": [["a", {"type": "Discrete", "n": 0}]]},
    "dict-child-none": {"type": "Dict", "spaces": [["a", None]]},
    "tuple-no-spaces": {"type": "Tuple"},
    "tuple-spaces-object": {"type": "Tuple", "spaces": {"0": _DISCRETE}},
    "tuple-bad-child": {"type": "Tuple", "spaces": [_DISCRETE, {"type": "Box"}]},
    "tuple-child-str": {"type": "Tuple", "spaces": ["Discrete"]},
    "too-deep": _nested(MAX_DEPTH + 1),
    "much-too-deep": _nested(500),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_schemas_raise_protocol_error(name):
    with pytest.raises(ProtocolError):
        schema_to_space(MALFORMED[name])


def test_protocol_error_messages_say_what_is_wrong():
    with pytest.raises(ProtocolError, match="'Graph' is not supported"):
        schema_to_space({"type": "Graph"})
    with pytest.raises(ProtocolError, match="more than"):
        schema_to_space(_box(shape=[MAX_ELEMENTS + 1]))
    with pytest.raises(ProtocolError, match="nested deeper"):
        schema_to_space(_nested(MAX_DEPTH + 1))
    with pytest.raises(ProtocolError, match="Discrete"):
        schema_to_space({**_DISCRETE, "n": 0})


def test_valid_hand_written_schemas():
    assert schema_to_space(_box()) == spaces.Box(0, 1, (2,), np.float32)
    assert schema_to_space(_DISCRETE) == spaces.Discrete(3)
    assert schema_to_space(_MD) == spaces.MultiDiscrete([3, 3])
    assert schema_to_space(_TEXT) == spaces.Text(5, min_length=0, charset="ab")
    assert schema_to_space(_box(dtype="<i8", low="-inf", high=3)).is_bounded("below") is False
    assert schema_to_space({"type": "MultiBinary", "n": MAX_ELEMENTS}) == spaces.MultiBinary(MAX_ELEMENTS)
    assert schema_to_space({"type": "Dict", "spaces": []}) == spaces.Dict({})


# -------------------------------------------------------------------- fuzzing

_VALID = [
    space_to_schema(s)
    for s in [
        spaces.Box(-1, 1, (2, 3), np.float32),
        spaces.Box(np.array([0, -np.inf]), np.array([1, np.inf]), dtype=np.float64),
        spaces.Box(0, 255, (4,), np.uint8),
        spaces.Discrete(3, start=1),
        spaces.MultiDiscrete([[2, 3], [4, 5]]),
        spaces.MultiBinary([2, 2]),
        spaces.Text(4, charset="ab"),
        spaces.Dict({"a": spaces.Discrete(2), "b": spaces.Tuple([spaces.Box(0, 1)])}),
    ]
]
# small ints only, plus a few huge ones: a valid Box of 2**26 elements would be
# allowed, and slow to build
_ints = st.one_of(st.integers(-3, 12), st.sampled_from([2**26 + 1, 2**40, 2**63, 2**64 - 1, -(2**63)]))
_leaf = st.one_of(
    st.none(),
    st.booleans(),
    _ints,
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(["nan", "inf", "-inf", "NaN", "", "<f8", "|u1", "<i4", "|b1", "O", "V8", ",", "(,)"]),
    st.text(max_size=4),
    st.sampled_from(SUPPORTED + ("Graph", "Sequence")),
)
_json = st.recursive(
    _leaf,
    lambda c: st.one_of(
        st.lists(c, max_size=4),
        st.dictionaries(st.sampled_from(["type", "dtype", "shape", "low", "high", "n", "start", "nvec",
                                         "min_length", "max_length", "charset", "spaces", "list"]) | st.text(max_size=3),
                        c, max_size=5),
    ),
    max_leaves=16,
)
_schemas = st.builds(
    lambda kind, fields: {"type": kind, **fields},
    st.sampled_from(SUPPORTED + ("Graph",)),
    st.dictionaries(
        st.sampled_from(["dtype", "shape", "low", "high", "n", "start", "nvec", "min_length", "max_length", "charset", "spaces"]),
        _json,
        max_size=6,
    ),
)


def _accept_or_protocol_error(schema):
    try:
        space = schema_to_space(schema)
    except ProtocolError:
        return None
    assert isinstance(space, gym.Space)
    return space


@FUZZ
@given(value=_json)
def test_fuzz_random_json(value):
    _accept_or_protocol_error(value)


@FUZZ
@given(schema=_schemas)
def test_fuzz_random_schemas(schema):
    _accept_or_protocol_error(schema)


@FUZZ
@given(base=st.sampled_from(_VALID), key=st.sampled_from(["type", "dtype", "shape", "low", "high", "n", "start", "nvec",
                                                          "min_length", "max_length", "charset", "spaces", "other"]),
       value=_json, drop=st.booleans())
def test_fuzz_mutated_schemas(base, key, value, drop):
    schema = dict(base)
    if drop:
        schema.pop(key, None)
    else:
        schema[key] = value
    space = _accept_or_protocol_error(schema)
    if space is not None:
        # whatever is accepted must itself go round the wire unchanged
        assert_same_space(space, over_the_wire(space))
