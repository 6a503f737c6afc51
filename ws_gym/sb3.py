"""Stable-Baselines3 on a gymnasium 1.x VectorEnv, ws_gym's remote one included.

SB3 has its own ``VecEnv`` API and refuses gymnasium's ``VectorEnv``.
:class:`SB3VecEnv` adapts one that runs in SAME_STEP autoreset mode, where an
env that ends is reset inside that step, as SB3 expects. The infos become SB3's
per-env info dicts, with ``terminal_observation`` and ``TimeLimit.truncated``
set exactly as ``DummyVecEnv`` sets them: a :class:`~ws_gym.RemoteVectorEnv`
gives each env's infos as that env returned them (``env_infos()``); other
VectorEnvs' batched infos are split per env::

    from ws_gym.sb3 import make_vec_env
    model = PPO("MlpPolicy", make_vec_env("CartPole-v1", 8, local_workers=2))

It needs the ``sb3`` extra (``pip install ws_gym[sb3]``); ``import ws_gym``
does not import this module.
"""

from __future__ import annotations

import contextlib
import operator
import re
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, Protocol, cast

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.vector import AsyncVectorEnv, AutoresetMode, VectorEnv
from gymnasium.vector.utils import concatenate, create_empty_array

try:
    from stable_baselines3.common.env_util import is_wrapped
    from stable_baselines3.common.vec_env import VecEnv, VecMonitor
    from stable_baselines3.common.vec_env.base_vec_env import VecEnvIndices, VecEnvObs, VecEnvStepReturn
except ImportError as exc:  # pragma: no cover - depends on what is installed
    raise ImportError(
        "ws_gym.sb3 needs Stable-Baselines3 and torch: pip install 'ws_gym[sb3]'"
    ) from exc

from .errors import RemoteEnvError
from .vector import RemoteVectorEnv, batch_shape

__all__ = ["SB3VecEnv", "make_vec_env"]

_FINAL_KEYS = ("final_obs", "_final_obs", "final_info", "_final_info")

# VectorEnvs whose own step_async/step_wait send the actions at once (exact types:
# a gymnasium VectorWrapper would forward those calls past its own step)
_ASYNC = (AsyncVectorEnv, RemoteVectorEnv)
_AsyncEnv = AsyncVectorEnv | RemoteVectorEnv
_SENT = object()


class _EnvMethods(Protocol):
    """What SB3VecEnv calls beyond gymnasium's ``VectorEnv`` API (whose ``reset``
    takes an int seed only): SyncVectorEnv, AsyncVectorEnv and RemoteVectorEnv
    all have these."""

    def reset(
        self, *, seed: int | list[int | None] | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Any, dict[str, Any]]: ...

    def call(self, name: str, /, *args: Any, **kwargs: Any) -> tuple[Any, ...]: ...

    def get_attr(self, name: str) -> tuple[Any, ...]: ...

    def set_attr(self, name: str, values: list[Any] | tuple[Any, ...] | Any) -> None: ...

# dtypes that gymnasium's ``_add_info`` gives python bool, int and float values:
# their entries go back to python scalars, as the env returned them.
_PYTHON_SCALARS = {np.dtype(bool), np.dtype(int), np.dtype(float)}


class SB3VecEnv(VecEnv):
    """An SB3 ``VecEnv`` over a gymnasium ``VectorEnv`` in SAME_STEP autoreset mode.

    Results (observations, float32 rewards, dones, per-env infos, reset infos)
    equal those of ``DummyVecEnv`` over the same envs, seeds and actions.

    Args:
        vector_env: a gymnasium 1.x ``VectorEnv`` (ours, ``SyncVectorEnv``,
            ``AsyncVectorEnv``) whose ``metadata["autoreset_mode"]`` is SAME_STEP.

    Raises:
        ValueError: the vector env is in another autoreset mode (the message
            says how to make it in SAME_STEP mode).
    """

    def __init__(self, vector_env: VectorEnv) -> None:
        mode = vector_env.metadata.get("autoreset_mode", AutoresetMode.NEXT_STEP)
        if not isinstance(mode, AutoresetMode):
            mode = AutoresetMode(mode)
        if mode is not AutoresetMode.SAME_STEP:
            raise ValueError(
                f"SB3VecEnv needs a VectorEnv in SAME_STEP autoreset mode, as SB3 resets an env in the "
                f"step that ends it; this one is in {mode.name} mode. Make it with "
                "autoreset_mode=gymnasium.vector.AutoresetMode.SAME_STEP: "
                'gym.make_vec("ws_gym/Remote-v0", ..., autoreset_mode=AutoresetMode.SAME_STEP), or '
                'gym.make_vec(env_id, n, vector_kwargs={"autoreset_mode": AutoresetMode.SAME_STEP})'
            )
        self.venv = vector_env
        self._actions: Any = None
        # SB3 reads render_mode while constructing; the VectorEnv knows it (a remote
        # one without waiting for its workers).
        self._starting = True
        super().__init__(vector_env.num_envs, vector_env.single_observation_space, vector_env.single_action_space)
        self._starting = False
        self.metadata = dict(vector_env.metadata)  # as DummyVecEnv: the envs' metadata
        # Dict and Tuple actions may come as a list of per-env actions, as DummyVecEnv takes them
        act = self.action_space
        self._structured = act if isinstance(act, (spaces.Dict, spaces.Tuple)) else None

    # -- stepping ------------------------------------------------------------

    def reset(self) -> VecEnvObs:
        """Reset every env with the seeds and options set since the last reset."""
        seeds = None if all(s is None for s in self._seeds) else list(self._seeds)
        groups = _group_options(self._options)
        if len(groups) == 1:
            obs, infos = cast(_EnvMethods, self.venv).reset(seed=seeds, options=groups[0][0])
            self.reset_infos = self._per_env(infos)
        else:  # a VectorEnv takes one options dict: one masked reset per distinct options
            for options, mask in groups:
                obs, infos = cast(_EnvMethods, self.venv).reset(
                    seed=seeds, options={**(options or {}), "reset_mask": mask}
                )
                per_env = self._per_env(infos)
                for i in np.flatnonzero(mask):
                    self.reset_infos[i] = per_env[i]
        self._reset_seeds()
        self._reset_options()
        return obs

    def step_async(self, actions: np.ndarray) -> None:
        """Send the actions now where the VectorEnv steps asynchronously (remote, async).

        Dict or Tuple actions may also be a list (or tuple) of one action per env,
        as DummyVecEnv takes them: they are batched here as gymnasium batches them.
        """
        if self._structured is not None and isinstance(actions, (list, tuple)):
            actions = self._batch(self._structured, actions)
        elif type(actions) is np.ndarray and actions.shape[:1] != (self.num_envs,):
            raise (TypeError if actions.ndim == 0 else ValueError)(
                f"expected a batch of {self.num_envs} actions ({batch_shape(self.action_space, self.num_envs)}), "
                f"got an array of shape {actions.shape}"
            )
        if isinstance(self.venv, _ASYNC):
            self.venv.step_async(actions)
            self._actions = _SENT
        else:
            self._actions = actions

    def step_wait(self) -> VecEnvStepReturn:
        """Step every env; an env that ended is reset in this step, as in DummyVecEnv."""
        actions, self._actions = self._actions, None
        if actions is _SENT:
            # _SENT: step_async found the VectorEnv to be one of _ASYNC
            obs, rewards, terminated, truncated, infos = cast(_AsyncEnv, self.venv).step_wait()
        else:
            obs, rewards, terminated, truncated, infos = self.venv.step(actions)
        dones = np.logical_or(terminated, truncated)
        out = []
        for i, (info, final_obs, final_info) in enumerate(self._step_infos(infos, dones)):
            if dones[i]:  # info is the reset's; final_info the one of the step that ended
                self.reset_infos[i] = info
                info = final_info
            info["TimeLimit.truncated"] = bool(truncated[i] and not terminated[i])
            if dones[i]:
                info["terminal_observation"] = final_obs
            out.append(info)
        return obs, np.asarray(rewards, dtype=np.float32), dones, out

    def _batch(self, space: spaces.Dict | spaces.Tuple, actions: list | tuple) -> Any:
        """A list of per-env Dict/Tuple actions as gymnasium's batch of them; anything
        else (a Tuple space's batch is a tuple too) goes on as it is."""
        n = self.num_envs
        if not actions or not all(_single_like(space, a) for a in actions):
            return actions
        if len(actions) != n:
            raise ValueError(
                f"expected {n} actions, one per env (or {batch_shape(space, n)}), got {len(actions)}"
            )
        out = cast("dict[str, Any] | tuple[Any, ...]", create_empty_array(space, n))  # not None for Dict/Tuple
        return concatenate(space, actions, out)

    def _indices(self, indices: VecEnvIndices) -> list[int]:
        """``indices`` as env numbers; a negative one counts from the end, as in a list."""
        n = self.num_envs
        out = []
        for i in self._get_indices(indices):
            j = operator.index(i)
            if not -n <= j < n:
                raise IndexError(f"env index {i} is out of range for {n} envs")
            out.append(j % n)
        return out

    def _remote(self) -> RemoteVectorEnv | None:
        """The RemoteVectorEnv under any vector wrappers, if that is what this adapts."""
        remote = self.venv.unwrapped
        return remote if isinstance(remote, RemoteVectorEnv) else None

    def _per_env(self, infos: dict[str, Any]) -> list[dict[str, Any]]:
        """The last reset's infos, one dict per env."""
        if isinstance(self.venv, RemoteVectorEnv):  # unwrapped: its infos are the envs' own
            return self.venv.env_infos()
        return _unbatch(infos, self.num_envs)

    def _step_infos(self, infos: dict[str, Any], dones: np.ndarray) -> list[tuple[dict[str, Any], Any, Any]]:
        """The last step's ``(info, final_obs, final_info)`` per env; ``info`` is the
        reset's for an env that ended (as SyncVectorEnv's ``env_info``)."""
        n = self.num_envs
        if isinstance(self.venv, RemoteVectorEnv):  # unwrapped: the envs' own infos, types kept
            out = []
            for i, info in enumerate(self.venv.env_infos()):
                if dones[i]:
                    out.append((info, info.pop("final_obs"), info.pop("final_info")))
                else:
                    out.append((info, None, None))
            return out
        final_obs: Any = infos.get("final_obs")  # indexed only for envs that ended: then it is there
        final_infos = _unbatch(infos.get("final_info", {}), n)
        step_infos = _unbatch({k: v for k, v in infos.items() if k not in _FINAL_KEYS}, n)
        return [(step_infos[i], final_obs[i], final_infos[i]) if dones[i] else (step_infos[i], None, None)
                for i in range(n)]

    def close(self) -> None:
        self.venv.close()

    # -- rendering -----------------------------------------------------------

    def get_images(self) -> Sequence[np.ndarray | None]:
        if self.render_mode != "rgb_array":
            warnings.warn(
                f"The render mode is {self.render_mode}, but this method assumes it is `rgb_array` to obtain images.",
                stacklevel=2,
            )
            return [None] * self.num_envs
        # rgb_array: one frame per env
        return list(cast("tuple[np.ndarray, ...]", self.venv.render()))

    # -- attributes and methods of the envs ----------------------------------

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        """``env.get_wrapper_attr(attr_name)`` of the chosen envs, in ``indices`` order."""
        if self._starting and attr_name == "render_mode":
            return [self.venv.render_mode] * self.num_envs
        indices = self._indices(indices)
        remote = self._remote()
        with _attribute_errors():
            if remote is not None and not self._all(indices):
                return list(remote.call_at(indices, attr_name))
            values = cast(_EnvMethods, self.venv).get_attr(attr_name)  # every env, then the chosen ones
        return [values[i] for i in indices]

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        """Set ``attr_name`` to ``value`` on the chosen envs (``env.set_wrapper_attr``)."""
        indices = self._indices(indices)
        if self._all(indices):
            cast(_EnvMethods, self.venv).set_attr(attr_name, [value] * self.num_envs)
            return
        remote = self._remote()
        if remote is not None:
            remote.set_attr_at(indices, attr_name, [value] * len(indices))
            return
        for env in self._envs_at(indices, "set an attribute on"):
            env.set_wrapper_attr(attr_name, value)

    def env_method(
        self, method_name: str, *method_args: Any, indices: VecEnvIndices = None, **method_kwargs: Any
    ) -> list[Any]:
        """Call ``method_name`` on the chosen envs; their results in ``indices`` order."""
        indices = self._indices(indices)
        remote = self._remote()
        with _attribute_errors():
            if self._all(indices):
                results = cast(_EnvMethods, self.venv).call(method_name, *method_args, **method_kwargs)
                return [results[i] for i in indices]
            if remote is not None:
                return list(remote.call_at(indices, method_name, *method_args, **method_kwargs))
        envs = self._envs_at(indices, "call a method of")
        return [env.get_wrapper_attr(method_name)(*method_args, **method_kwargs) for env in envs]

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None) -> list[bool]:
        """Whether each chosen env is wrapped in ``wrapper_class`` (or a subclass).

        Classes do not cross the wire, so remote envs are asked for ``str(env)``,
        which names the wrapper chain (``<TimeLimit<OrderEnforcing<...>>>``), and
        a wrapper matches by class name.
        """
        indices = self._indices(indices)
        envs = getattr(self.venv.unwrapped, "envs", None)
        if envs is not None:  # in this process: check the objects, as DummyVecEnv does
            return [is_wrapped(envs[i], wrapper_class) for i in indices]
        names = _class_names(wrapper_class)
        remote = self._remote()
        if remote is not None:
            texts = list(remote.call_at(indices, "__str__"))
        else:
            every = cast(_EnvMethods, self.venv).call("__str__")
            texts = [every[i] for i in indices]
        return [not names.isdisjoint(wrapper_names(text)) for text in texts]

    def _all(self, indices: list[int]) -> bool:
        return sorted(indices) == list(range(self.num_envs))

    def _envs_at(self, indices: list[int], what: str) -> list[gym.Env]:
        """The chosen envs themselves, where the VectorEnv has them in this process."""
        envs = getattr(self.venv.unwrapped, "envs", None)
        if envs is None:
            raise NotImplementedError(
                f"{type(self.venv.unwrapped).__name__} can only {what} all of its envs at once; "
                f"indices={indices} needs access to single envs, which gymnasium's SyncVectorEnv "
                "and ws_gym's RemoteVectorEnv give. Use indices=None."
            )
        return [envs[i] for i in indices]

    def __repr__(self) -> str:
        return f"SB3VecEnv({self.venv!r})"


def make_vec_env(env_id: str, n_envs: int = 1, seed: int | None = None, **remote_kwargs: Any) -> VecMonitor:
    """Like SB3's ``make_vec_env``, with the envs in ws_gym workers.

    Args:
        env_id: the env the workers host (``gym.make`` id, or ``module:Id``).
        n_envs: how many envs, split among the workers.
        seed: applied at the first ``reset()``: env ``i`` gets ``seed + i``.
        **remote_kwargs: keyword arguments of :class:`~ws_gym.RemoteVectorEnv`
            (``local_workers``, ``host``, ``port``, ``token``, ``env_kwargs``, ...);
            ``autoreset_mode`` defaults to SAME_STEP, which SB3 needs.

    Returns:
        ``VecMonitor(SB3VecEnv(...))``, so SB3 logs episode returns and lengths.

    Raises:
        ValueError, TypeError: bad keyword arguments (as ``RemoteVectorEnv``).
        OSError: the port cannot be listened on.
    """
    remote_kwargs.setdefault("autoreset_mode", AutoresetMode.SAME_STEP)
    remote = RemoteVectorEnv(num_envs=n_envs, env_id=env_id, **remote_kwargs)
    try:
        venv = SB3VecEnv(remote)
    except BaseException:
        remote.close()
        raise
    if seed is not None:
        venv.seed(seed)
    return VecMonitor(venv)


# -- helpers -------------------------------------------------------------------


def _unbatch(infos: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """Gymnasium's batched infos (``k`` with mask ``_k``) as one dict per env.

    Like gymnasium's ``DictInfoToList``, but a key may itself start with ``_``
    (only ``_k`` next to ``k`` is a mask), and python scalars come back as such.
    """
    out: list[dict[str, Any]] = [{} for _ in range(n)]
    for key, values in infos.items():
        if key.startswith("_") and key[1:] in infos:
            continue
        mask = infos.get(f"_{key}")
        chosen = range(n) if mask is None else np.flatnonzero(mask)
        if isinstance(values, dict):
            nested = _unbatch(values, n)
            for i in chosen:
                out[i][key] = nested[i]
        else:
            scalar = isinstance(values, np.ndarray) and values.ndim == 1 and values.dtype in _PYTHON_SCALARS
            for i in chosen:
                out[i][key] = values[i].item() if scalar else values[i]
    return out


def _single_like(space: gym.Space, value: Any) -> bool:
    """Whether ``value`` is shaped as one element of ``space`` (not a batch of them);
    bounds are not checked, as DummyVecEnv passes an action on unchecked."""
    if isinstance(space, spaces.Dict):
        return isinstance(value, dict) and all(k in value and _single_like(sub, value[k])
                                               for k, sub in space.spaces.items())
    if isinstance(space, spaces.Tuple):
        return (isinstance(value, (tuple, list)) and len(value) == len(space.spaces)
                and all(_single_like(sub, v) for sub, v in zip(space.spaces, value)))
    if isinstance(space, spaces.Text):
        return isinstance(value, str)
    try:
        return np.shape(value) == space.shape
    except ValueError:  # ragged
        return False


def _group_options(options: list[dict[str, Any]]) -> list[tuple[dict[str, Any] | None, np.ndarray]]:
    """Envs with equal reset options, as ``(options or None, mask)`` pairs."""
    groups: list[tuple[dict[str, Any] | None, np.ndarray]] = []
    for i, env_options in enumerate(options):
        opts = env_options or None
        for known, mask in groups:
            if _equal(known, opts):
                mask[i] = True
                break
        else:
            mask = np.zeros(len(options), dtype=np.bool_)
            mask[i] = True
            groups.append((opts, mask))
    return groups


def _equal(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # e.g. arrays inside: treat as different (one more reset)
        return a is b


_LEVEL = re.compile(r"<([A-Za-z_]\w*)(?=<)")
_ENV_WITH_ID = re.compile(r"<[\w:./-]+>+")


def wrapper_names(text: str) -> list[str]:
    """The wrapper class names in ``str(env)``, outermost first.

    A wrapper prints ``<Name`` + ``str(inner)`` + ``>``; the env itself prints
    ``<Class<env-id>>`` or ``<Class instance>``, and is not a wrapper.
    """
    names = []
    while (m := _LEVEL.match(text)) is not None:
        rest = text[m.end() :]
        if _ENV_WITH_ID.fullmatch(rest):
            break
        names.append(m.group(1))
        text = rest
    return names


def _class_names(cls: type) -> set[str]:
    """Names of ``cls`` and of its subclasses known here (``isinstance`` by name)."""
    seen: set[type] = set()
    todo = [cls]
    while todo:
        c = todo.pop()
        if c not in seen:
            seen.add(c)
            todo.extend(type.__subclasses__(c) if isinstance(c, type) else ())
    return {c.__name__ for c in seen}


@contextlib.contextmanager
def _attribute_errors() -> Iterator[None]:
    """A remote ``AttributeError`` raised as one, so SB3's ``has_attr`` works."""
    try:
        yield
    except RemoteEnvError as exc:
        if exc.remote_type == "AttributeError":
            raise AttributeError(str(exc)) from exc
        raise
