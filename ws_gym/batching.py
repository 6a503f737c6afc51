"""Batches of remote results: joined, cut, checked and made the caller's own (no I/O).

A step's or a reset's results arrive as one batch per worker (a contiguous run
of envs). These functions join them into one batch of every env, cut an action
batch into the workers' runs, and check every received value against its
space before anything of it is used. Errors for bad action batches are those of
gymnasium's ``SyncVectorEnv``.
"""

from __future__ import annotations

import ast
import itertools
import warnings
from typing import Any, cast

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.envs.registration import EnvSpec, WrapperSpec

from . import codec
from .codec import Unencodable
from .errors import ProtocolError
from .spaces import ARRAY_SPACES

# Their ``shape`` is never None, but Discrete inherits ``Space.shape``, typed Optional: hence the casts
_warned_types: set[str] = set()


def _literal_call(node: ast.expr, name: str) -> dict[str, Any]:
    """The keyword arguments of ``name(k=literal, ...)`` parsed from a repr; nothing is evaluated."""
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == name
            and not node.args and all(k.arg is not None for k in node.keywords)):
        raise ValueError(f"not a {name}(...) repr")
    return {cast(str, k.arg): k.value for k in node.keywords}  # checked above: no **kwargs


def env_spec_from_repr(text: str) -> EnvSpec | None:
    """The ``EnvSpec`` whose (dataclass) repr a worker sent for ``spec``, or None
    when it does not parse back: a field that is not a literal (a callable
    entry point, a numpy value in ``kwargs``) or a repr cut at 1000 characters."""
    try:
        fields = _literal_call(ast.parse(text, mode="eval").body, "EnvSpec")
        wrappers = fields.pop("additional_wrappers", None)
        for derived in ("namespace", "name", "version"):  # recomputed from the id
            fields.pop(derived, None)
        spec = EnvSpec(**{k: ast.literal_eval(v) for k, v in fields.items()})
        if wrappers is not None:
            if not isinstance(wrappers, ast.Tuple):
                return None
            spec.additional_wrappers = tuple(
                WrapperSpec(**{k: ast.literal_eval(v) for k, v in _literal_call(w, "WrapperSpec").items()})
                for w in wrappers.elts
            )
        return spec
    except Exception:  # e.g. gymnasium.error.Error for an id it cannot parse
        return None


def _plain(value: Any) -> Any:
    """A received repr (``Unencodable``) becomes a plain str, with one warning per type;
    an ``EnvSpec``'s repr becomes the ``EnvSpec`` again where it parses back."""
    if type(value) is Unencodable:
        if value.type_name == "EnvSpec" and (spec := env_spec_from_repr(value)) is not None:
            return spec
        if value.type_name not in _warned_types:
            _warned_types.add(value.type_name)
            warnings.warn(
                f"ws_gym: a value of type {value.type_name} has no wire form; "
                f"it arrives as its repr string",
                RuntimeWarning,
                stacklevel=4,
            )
        return str(value)
    return value


def own(value: Any) -> Any:
    """A received value made the user's own: writable arrays, reprs flagged once."""
    return codec.writable(value, _plain)


def join(space: gym.Space, parts: list[Any]) -> Any:
    """Join per-worker batches of ``space`` into one batch (one copy)."""
    if isinstance(space, ARRAY_SPACES):
        return parts[0].copy() if len(parts) == 1 else np.concatenate(parts)
    if isinstance(space, spaces.Dict):
        return {k: join(sub, [p[k] for p in parts]) for k, sub in space.spaces.items()}
    if isinstance(space, spaces.Tuple):
        return tuple(join(sub, [p[j] for p in parts]) for j, sub in enumerate(space.spaces))
    return tuple(itertools.chain.from_iterable(parts))


def item(space: gym.Space, batch: Any, i: int, copy: bool = True) -> Any:
    """Element ``i`` of a batch of ``space``, as its own value (``copy=False``:
    its arrays are views into ``batch``, for a caller that copies them anyway)."""
    if isinstance(space, ARRAY_SPACES):
        return batch[i].copy() if copy else batch[i]
    if isinstance(space, spaces.Dict):
        return {k: item(sub, batch[k], i, copy) for k, sub in space.spaces.items()}
    if isinstance(space, spaces.Tuple):
        return tuple(item(sub, batch[j], i, copy) for j, sub in enumerate(space.spaces))
    return batch[i]


def cut(space: gym.Space, batch: Any, a: int, b: int) -> Any:
    """Envs ``a:b`` of a batch of ``space`` (actions for one worker)."""
    if isinstance(space, ARRAY_SPACES):
        return np.asarray(batch)[a:b]
    if isinstance(space, spaces.Dict):
        return {k: cut(sub, batch[k], a, b) for k, sub in space.spaces.items()}
    if isinstance(space, spaces.Tuple):
        return tuple(cut(sub, batch[j], a, b) for j, sub in enumerate(space.spaces))
    return tuple(batch[a:b])


def check_batch(space: gym.Space, value: Any, count: int, what: str) -> None:
    """Raise ProtocolError unless ``value`` is a batch of ``count`` elements of ``space``."""
    if isinstance(space, ARRAY_SPACES):
        shape = (count, *cast("tuple[int, ...]", space.shape))
        if type(value) is not np.ndarray or value.shape != shape or value.dtype != space.dtype:
            got = f"{value.dtype} {value.shape}" if type(value) is np.ndarray else type(value).__name__
            raise ProtocolError(f"{what}: expected {space.dtype} {shape}, got {got}")
    elif isinstance(space, spaces.Dict):
        if type(value) is not dict or value.keys() != space.spaces.keys():
            raise ProtocolError(f"{what}: expected a dict with keys {list(space.spaces)}")
        for k, sub in space.spaces.items():
            check_batch(sub, value[k], count, f"{what}[{k!r}]")
    elif isinstance(space, spaces.Tuple):
        if type(value) is not tuple or len(value) != len(space.spaces):
            raise ProtocolError(f"{what}: expected a tuple of {len(space.spaces)}")
        for j, sub in enumerate(space.spaces):
            check_batch(sub, value[j], count, f"{what}[{j}]")
    elif type(value) is not tuple or len(value) != count or not all(type(x) is str for x in value):
        raise ProtocolError(f"{what}: expected a tuple of {count} strings")


def batch_shape(space: gym.Space, n: int) -> str:
    """What a batch of ``n`` actions of ``space`` looks like, for error messages."""
    if isinstance(space, ARRAY_SPACES):
        shape = (n, *cast("tuple[int, ...]", space.shape))
        return f"an array of shape {shape}"
    if isinstance(space, spaces.Dict):
        return "a dict {" + ", ".join(f"{k!r}: {batch_shape(sub, n)}" for k, sub in space.spaces.items()) + "}"
    if isinstance(space, spaces.Tuple):
        return "a tuple (" + ", ".join(batch_shape(sub, n) for sub in space.spaces) + ")"
    return f"a sequence of {n} values"


def check_actions(space: gym.Space, batch: Any, n: int, path: tuple = ()) -> None:
    """Raise as ``SyncVectorEnv.step`` would (gymnasium's ``iterate``) where ``batch``
    cannot be ``n`` actions of ``space``: TypeError for what cannot be iterated or
    indexed, KeyError/IndexError for a missing part, ValueError for a wrong count.

    Called on every step of a Dict/Tuple action space: messages are made only
    when one is raised. ``path``: the keys leading to ``batch``."""
    if isinstance(space, (spaces.Dict, spaces.Tuple)):
        subs = space.spaces.items() if isinstance(space, spaces.Dict) else enumerate(space.spaces)
        for k, sub in subs:
            try:  # indexed as gymnasium's iterate does: the same error for what has no [k]
                part = batch[k]
            except (TypeError, KeyError, IndexError) as exc:
                raise type(exc)(f"{_expected(space, n, path)}, got {type(batch).__name__} without [{k!r}]") from None
            check_actions(sub, part, n, (*path, k))
    else:
        try:
            count = len(batch)
        except TypeError:  # a scalar, a 0-d array, None
            raise TypeError(f"{_expected(space, n, path)}, got {type(batch).__name__} {batch!r:.80}") from None
        if count != n:
            raise ValueError(f"{_expected(space, n, path)}, got {count}")


def _expected(space: gym.Space, n: int, path: tuple) -> str:
    what = "actions" + "".join(f"[{k!r}]" for k in path)
    return f"{what}: expected a batch of {n} actions ({batch_shape(space, n)})"


def check_reply(reply: Any, count: int, space: gym.Space, origin: str, *, step: bool) -> None:
    """Validate a worker's reset/step reply before anything of it is used."""
    if type(reply) is not dict:
        raise ProtocolError(f"{origin} sent a reply that is not an object")
    check_batch(space, reply.get("o"), count, f"{origin}: observations")
    if step:
        for key, dtype in (("r", np.float64), ("t", np.bool_), ("u", np.bool_)):
            arr = reply.get(key)
            if type(arr) is not np.ndarray or arr.shape != (count,) or arr.dtype != dtype:
                raise ProtocolError(f"{origin}: {key!r} must be a {np.dtype(dtype)} array of {count}")
    log = reply.get("f")
    if type(log) is not list:
        raise ProtocolError(f"{origin}: the info log must be a list")
    for entry in log:
        if not (type(entry) is list and len(entry) == 2 and type(entry[0]) is int
                and 0 <= entry[0] < count and type(entry[1]) is dict):
            raise ProtocolError(f"{origin}: bad info log entry")


def check_list(reply: Any, count: int, origin: str) -> list:
    if type(reply) is not list or len(reply) != count:
        raise ProtocolError(f"{origin}: expected a list of {count} results")
    return reply


class StepBatch:
    """The arrays one step returns, filled by each worker's reply as it is read
    (on the loop's thread, while the other workers still step): the caller then
    joins nothing. For array observation spaces."""

    __slots__ = ("obs", "r", "t", "u", "workers", "space", "_views")

    def __init__(self, space: gym.Space, n: int, workers: list) -> None:
        self.space, self.workers = space, workers
        self.obs = np.empty((n, *cast("tuple[int, ...]", space.shape)), space.dtype)
        self.r = np.empty(n)
        self.t = np.empty(n, np.bool_)
        self.u = np.empty(n, np.bool_)
        self._views: tuple | None = None  # their bytes, for compact replies (made at the first)

    def fill(self, idx: int, reply: Any, compact: bool) -> None:
        w = self.workers[idx]
        a, b = w.start, w.stop
        if compact:  # a whole compact frame, checked against its layout as it was read
            views = self._views
            if views is None:  # two threads may both make them: the same views either way
                views = self._views = w.codec.byte_views(self.obs, self.r, self.t, self.u)
            w.codec.copy_reply(reply, views, a)
            return
        check_reply(reply, w.count, self.space, w.origin, step=True)
        self.obs[a:b] = reply["o"]
        self.r[a:b] = reply["r"]
        self.t[a:b] = reply["t"]
        self.u[a:b] = reply["u"]


def check_mask(mask: Any, n: int) -> None:
    """The same checks, errors and messages as ``SyncVectorEnv.reset``."""
    if not isinstance(mask, np.ndarray):
        raise TypeError(f"`options['reset_mask']` must be a numpy array, got {type(mask)}")
    if mask.shape != (n,):
        raise ValueError(f"`options['reset_mask']` must have shape `({n},)`, got {mask.shape}")
    if mask.dtype != np.bool_:
        raise TypeError(f"`options['reset_mask']` must have `dtype=np.bool_`, got {mask.dtype}")
    if not np.any(mask):
        raise ValueError(
            f"`options['reset_mask']` must contain a boolean array with at least one True value, got reset_mask={mask}"
        )
