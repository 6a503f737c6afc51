"""Gymnasium spaces <-> a JSON schema of our own, with no I/O.

Spaces cross the wire in the handshake. Pickling them would let a peer run
code in our process, and ``Space.to_jsonable`` only serialises samples, so the
schema is ours. It is lossless: ``schema_to_space(space_to_schema(s)) == s``,
with the same dtype, per-element bounds (including +-inf) and start values.

Supported: Box, Discrete, MultiDiscrete, MultiBinary, Text, and Dict and Tuple
of those. Anything else raises :class:`~ws_gym.errors.UnsupportedSpaceError`
naming the space.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from gymnasium import spaces

from .errors import ProtocolError, UnsupportedSpaceError

__all__ = ["space_to_schema", "schema_to_space", "SUPPORTED", "ARRAY_SPACES"]

# The spaces whose values (and batches) are one numpy array each.
ARRAY_SPACES = (spaces.Box, spaces.Discrete, spaces.MultiDiscrete, spaces.MultiBinary)

SUPPORTED = ("Box", "Discrete", "MultiDiscrete", "MultiBinary", "Text", "Dict", "Tuple")
MAX_ELEMENTS = 1 << 26  # a Box bigger than this is not a sensible observation
MAX_DEPTH = 16
_NUMERIC_KINDS = "biuf"


# ------------------------------------------------------------------ to schema


def space_to_schema(space: spaces.Space, _path: str = "space") -> dict[str, Any]:
    """Describe ``space`` as a JSON-ready dict."""
    if type(space) is spaces.Box:
        if space.dtype.kind == "f" and space.dtype.itemsize > 8:
            raise UnsupportedSpaceError(
                f"{_path} is {space!r}: its dtype {space.dtype.name} has no lossless JSON form; "
                f"use float64 or smaller"
            )
        return {
            "type": "Box",
            "dtype": space.dtype.str,
            "shape": list(space.shape),
            "low": _bounds(space.low, space.bounded_below, "-inf"),
            "high": _bounds(space.high, space.bounded_above, "inf"),
        }
    if type(space) is spaces.Discrete:
        return {
            "type": "Discrete",
            "n": int(space.n),
            "start": int(space.start),
            "dtype": space.dtype.str,
        }
    if type(space) is spaces.MultiDiscrete:
        return {
            "type": "MultiDiscrete",
            "nvec": _values(space.nvec),
            "start": _values(space.start),
            "shape": list(space.shape),
            "dtype": space.dtype.str,
        }
    if type(space) is spaces.MultiBinary:
        n = space.n
        return {"type": "MultiBinary", "n": [int(x) for x in n] if not isinstance(n, (int, np.integer)) else int(n)}
    if type(space) is spaces.Text:
        return {
            "type": "Text",
            "min_length": int(space.min_length),
            "max_length": int(space.max_length),
            "charset": "".join(space.character_list),
        }
    if type(space) is spaces.Dict:
        for k in space.spaces:
            if type(k) is not str:
                raise UnsupportedSpaceError(
                    f"{_path} is a Dict with the key {k!r} ({type(k).__name__}); ws_gym can only "
                    f"send Dict spaces whose keys are strings"
                )
        return {
            "type": "Dict",
            "spaces": [[k, space_to_schema(s, f"{_path}[{k!r}]")] for k, s in space.spaces.items()],
        }
    if type(space) is spaces.Tuple:
        return {
            "type": "Tuple",
            "spaces": [space_to_schema(s, f"{_path}[{i}]") for i, s in enumerate(space.spaces)],
        }
    t = type(space)
    raise UnsupportedSpaceError(
        f"{_path} is {space!r} ({t.__module__}.{t.__qualname__}), which ws_gym cannot send; "
        f"supported spaces: {', '.join(SUPPORTED)}"
    )


def _scalar(x: Any) -> Any:
    if isinstance(x, float):
        if math.isfinite(x):
            return x
        return "nan" if x != x else ("inf" if x > 0 else "-inf")
    return x


def _values(arr: np.ndarray) -> Any:
    """An array as one scalar (when all elements are equal) or a flat list.

    ``tolist`` gives Python floats that hold float16/32/64 values exactly;
    non-finite values become strings because JSON has no nan or inf.
    """
    flat = np.asarray(arr).reshape(-1)
    if flat.size:
        first = flat[0]
        same = flat == first
        if flat.dtype.kind == "f":  # -0.0 == 0.0, but they are different bounds
            same &= np.signbit(flat) == np.signbit(first)
        if same.all() or (flat.dtype.kind == "f" and np.isnan(flat).all()):
            return _scalar(first.item())
    return {"list": [_scalar(x) for x in flat.tolist()]}


def _bounds(arr: np.ndarray, bounded: np.ndarray, inf: str) -> Any:
    """Box bounds. An int Box built from +-inf stores the dtype's min or max but is
    unbounded there (and samples differently), so those elements are sent as inf."""
    if arr.dtype.kind not in "iu" or bounded.all():
        return _values(arr)
    if not bounded.any():
        return inf
    return {"list": [x if b else inf for x, b in zip(arr.reshape(-1).tolist(), bounded.reshape(-1).tolist())]}


# ---------------------------------------------------------------- from schema


def schema_to_space(schema: Any, _depth: int = 0) -> spaces.Space:
    """Build the space a schema describes; a malformed schema raises ProtocolError."""
    if _depth > MAX_DEPTH:
        raise ProtocolError(f"space schema nested deeper than {MAX_DEPTH} levels")
    if not isinstance(schema, dict) or not isinstance(schema.get("type"), str):
        raise ProtocolError(f"space schema must be an object with a 'type', got {_short(schema)}")
    kind = schema["type"]
    try:
        if kind == "Box":
            dtype = _dtype(schema.get("dtype"), _NUMERIC_KINDS)
            shape = _shape(schema.get("shape"))
            low, low_inf = _array(schema.get("low"), shape, dtype, "-inf")
            high, high_inf = _array(schema.get("high"), shape, dtype, "inf")
            if low_inf is None or high_inf is None:  # a float or bool Box
                return spaces.Box(low=low, high=high, shape=shape, dtype=dtype)
            if dtype.kind == "u" and (low_inf.any() or high_inf.any()):
                raise ProtocolError("an unsigned int Box cannot have infinite bounds")
            box = spaces.Box(low=low, high=high, shape=shape, dtype=dtype)
            box.bounded_below = ~low_inf  # int Box: unbounded where the schema says inf
            box.bounded_above = ~high_inf
            return box
        if kind == "Discrete":
            return spaces.Discrete(
                _int(schema.get("n")), start=_int(schema.get("start")),
                dtype=_dtype(schema.get("dtype"), "iu"),
            )
        if kind == "MultiDiscrete":
            dtype = _dtype(schema.get("dtype"), "iu")
            shape = _shape(schema.get("shape"))
            nvec, _ = _array(schema.get("nvec"), shape, dtype)
            start, _ = _array(schema.get("start"), shape, dtype)
            return spaces.MultiDiscrete(nvec, dtype=dtype, start=start)
        if kind == "MultiBinary":
            n = schema.get("n")
            if isinstance(n, list):
                return spaces.MultiBinary(list(_shape(n)))
            return spaces.MultiBinary(_shape([_int(n)])[0])
        if kind == "Text":
            charset = schema.get("charset")
            if not isinstance(charset, str) or not charset:
                raise ProtocolError("Text charset must be a non-empty string")
            return spaces.Text(
                _int(schema.get("max_length")), min_length=_int(schema.get("min_length")), charset=charset
            )
        if kind == "Dict":
            items = schema.get("spaces")
            if not isinstance(items, list):
                raise ProtocolError("Dict schema needs a list of [key, schema] pairs")
            out = {}
            for pair in items:
                if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)):
                    raise ProtocolError("Dict schema needs a list of [key, schema] pairs")
                out[pair[0]] = schema_to_space(pair[1], _depth + 1)
            return spaces.Dict(list(out.items()))  # pairs: keep the order, do not sort
        if kind == "Tuple":
            items = schema.get("spaces")
            if not isinstance(items, list):
                raise ProtocolError("Tuple schema needs a list of schemas")
            return spaces.Tuple([schema_to_space(s, _depth + 1) for s in items])
    except ProtocolError:
        raise
    except (TypeError, ValueError, AssertionError, OverflowError) as exc:
        raise ProtocolError(f"invalid {kind} space schema: {exc}") from None
    raise ProtocolError(
        f"space type {kind!r} is not supported (supported: {', '.join(SUPPORTED)})"
    )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) < 80 else text[:77] + "..."


def _int(value: Any) -> int:
    if type(value) is not int or abs(value) >= 2**64:
        raise ProtocolError(f"expected an integer, got {_short(value)}")
    return value


def _dtype(value: Any, kinds: str) -> np.dtype:
    if not isinstance(value, str) or len(value) > 4:
        raise ProtocolError(f"bad dtype {_short(value)}")
    try:
        dtype = np.dtype(value)
    except Exception:  # TypeError, but also SyntaxError for "," or ValueError
        raise ProtocolError(f"bad dtype {_short(value)}") from None
    if dtype.kind not in kinds or dtype.fields is not None or dtype.subdtype is not None:
        raise ProtocolError(f"dtype {value!r} is not allowed here")
    if dtype.kind == "f" and dtype.itemsize > 8:
        raise ProtocolError(f"dtype {value!r} (long double) is not allowed")
    return dtype


def _shape(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > 32:
        raise ProtocolError(f"bad shape {_short(value)}")
    count = 1
    for dim in value:
        if type(dim) is not int or dim < 0:
            raise ProtocolError(f"bad shape {_short(value)}")
        count *= dim
    if count > MAX_ELEMENTS:
        raise ProtocolError(f"shape {value} has more than {MAX_ELEMENTS} elements")
    return tuple(value)


def _number(x: Any, dtype: np.dtype, inf: str | None) -> Any:
    """One value for ``dtype``: a bool for bool, an int for ints (or ``inf``, the
    one infinity an int Box bound may have), a number or nan/inf/-inf for floats."""
    kind, t = dtype.kind, type(x)
    if kind == "f":
        if t is int or t is float:
            return x
        if t is str and x in ("nan", "inf", "-inf"):
            return float(x)
    elif kind == "b":
        if t is bool:
            return x
    elif t is int or (t is str and x == inf):
        return x
    raise ProtocolError(f"bad {dtype.name} value {_short(x)}")


def _int_limit(dtype: np.dtype, inf: str | None) -> int:
    """The value gymnasium stores for an infinite bound of an int Box."""
    info = np.iinfo(dtype)
    return int(info.min) if inf == "-inf" else int(info.max)


def _array(
    value: Any, shape: tuple[int, ...], dtype: np.dtype, inf: str | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """The array a schema value describes, and for int dtypes, where it is infinite."""
    if isinstance(value, dict):
        items = value.get("list")
        if not isinstance(items, list) or len(items) != math.prod(shape):
            raise ProtocolError(f"value list does not match shape {shape}")
        values = [_number(x, dtype, inf) for x in items]
        if dtype.kind not in "iu":
            return np.array(values, dtype=dtype).reshape(shape), None
        infinite = [type(x) is str for x in values]
        if any(infinite):
            limit = _int_limit(dtype, inf)
            values = [limit if i else x for x, i in zip(values, infinite)]
        return np.array(values, dtype=dtype).reshape(shape), np.array(infinite, bool).reshape(shape)
    value = _number(value, dtype, inf)
    if dtype.kind not in "iu":
        return np.full(shape, value, dtype=dtype), None
    is_inf = type(value) is str
    if is_inf:
        value = _int_limit(dtype, inf)
    return np.full(shape, value, dtype=dtype), np.full(shape, is_inf, bool)
