"""The envs a worker hosts, and how it answers each request (no I/O).

In vector mode the envs run inside gymnasium's own ``SyncVectorEnv``, so
autoreset, seeding, ``reset_mask``, ``call`` and ``render`` behave exactly as
gymnasium's. One thing differs: instead of merging infos here, the worker
records every ``_add_info(infos, env_info, i)`` call and sends that log; the
trainer replays it with gymnasium's ``_add_info`` over all ``num_envs``, so the
merged infos (keys, order, dtypes, masks) are those of one ``SyncVectorEnv``
over every env, whatever the split among workers.

With ``vectorization="async"`` (the worker's ``--vectorization async``) the envs
run in subprocesses, in gymnasium's ``AsyncVectorEnv``, for CPU-heavy envs. It
merges infos in this process with the same ``_add_info`` calls, so the same
recording trick gives the same log (see :class:`_RecordingAsyncVectorEnv`).
"""

from __future__ import annotations

import copy
from functools import partial
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AsyncVectorEnv, AutoresetMode, SyncVectorEnv

from . import protocol as P
from .errors import ProtocolError
from .spaces import space_to_schema


class _RecordingSyncVectorEnv(SyncVectorEnv):
    """A SyncVectorEnv that logs ``_add_info`` calls instead of merging them."""

    info_log: list

    def _add_info(self, vector_infos: dict, env_info: dict, env_num: int) -> dict:
        if "final_obs" in env_info:  # the env may reuse its obs buffer on reset
            env_info = dict(env_info, final_obs=copy.deepcopy(env_info["final_obs"]))
        if env_info:
            self.info_log.append([env_num, env_info])
        return vector_infos


class _RecordingAsyncVectorEnv(AsyncVectorEnv):
    """An AsyncVectorEnv whose info log equals ``_RecordingSyncVectorEnv``'s.

    AsyncVectorEnv calls ``_add_info(infos, info, i)`` in this (parent)
    process, in env order, as SyncVectorEnv does; the differences are made good
    here:

    - SameStep: at an episode end a subprocess sends one info
      ``{"final_info": ..., "final_obs": ..., **reset_info}``, where
      SyncVectorEnv makes two calls, ``{"final_obs", "final_info"}`` then
      ``reset_info``; the entry is split back into those two.
    - Disabled: SyncVectorEnv asserts that no ended env is stepped before it is
      reset; the subprocesses do not check, so it is checked here (before any
      env steps, where SyncVectorEnv would have stepped the envs before it).
    - ``reset-noop`` (envs outside a ``reset_mask``) logs ``{}``, which is
      dropped like every empty info.

    Always run with ``shared_memory=True``: with ``shared_memory=False``,
    gymnasium 1.x's subprocess does not clear its autoreset flag on an explicit
    reset, so the next step of a NextStep env reset by hand after an episode
    end would reset it again instead of stepping it. Every space ws_gym can
    send has a shared-memory form. ``final_obs`` arrives pickled (a copy of its
    own), so unlike the sync recorder no deep copy is needed.
    """

    info_log: list

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.info_log = []
        self._ended = np.zeros(self.num_envs, dtype=np.bool_)  # Disabled mode only

    def _add_info(self, vector_infos: dict, env_info: dict, env_num: int) -> dict:
        if env_info:
            self.info_log.append([env_num, env_info])
        return vector_infos

    def reset_async(self, seed: Any = None, options: dict | None = None) -> None:
        mask = options.get("reset_mask") if options else None
        super().reset_async(seed=seed, options=options)
        if mask is None:
            self._ended[:] = False
        else:
            self._ended[mask] = False

    def step_async(self, actions: Any) -> None:
        if self.autoreset_mode == AutoresetMode.DISABLED and self._ended.any():
            raise AssertionError(f"self._autoreset_envs={self._ended!r}")
        super().step_async(actions)

    def step_wait(self, timeout: float | None = None) -> tuple:
        result = super().step_wait(timeout)
        ended = np.logical_or(result[2], result[3])
        if self.autoreset_mode == AutoresetMode.DISABLED:
            self._ended = ended
        elif self.autoreset_mode == AutoresetMode.SAME_STEP and ended.any():
            log = []
            for entry in self.info_log:
                i, info = entry
                if ended[i] and "final_obs" in info and "final_info" in info:
                    rest = dict(info)
                    log.append([i, {"final_obs": rest.pop("final_obs"), "final_info": rest.pop("final_info")}])
                    if rest:
                        log.append([i, rest])
                else:
                    log.append(entry)
            self.info_log = log
        return result


VECTORIZATIONS = ("sync", "async")


def check_vectorization(value: Any) -> str:
    if value not in VECTORIZATIONS:
        raise ValueError(f"vectorization must be one of {list(VECTORIZATIONS)}, got {value!r}")
    return value


def _terminate(venv: AsyncVectorEnv, timeout: float = 5.0) -> None:
    """End an AsyncVectorEnv left mid-call by a failed subprocess (its close() would hang or raise)."""
    for proc in venv.processes:
        if proc.is_alive():
            proc.terminate()
    for proc in venv.processes:
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout)
    for pipe in venv.parent_pipes:
        if pipe is not None:
            pipe.close()
    venv.closed = True


def make_env(
    env_id: str, env_kwargs: dict, max_episode_steps: int | None, record_episode_statistics: bool = False
) -> gym.Env:
    kwargs = dict(env_kwargs)
    if max_episode_steps is not None:
        kwargs["max_episode_steps"] = max_episode_steps
    env = gym.make(env_id, **kwargs)
    if record_episode_statistics:  # per env, so "episode" lands in final_info (CleanRL, gymnasium 1.x)
        env = gym.wrappers.RecordEpisodeStatistics(env)
    return env


def _jsonable_metadata(metadata: dict) -> dict:
    out = {}
    for key, value in metadata.items():
        if key == "render_modes" and isinstance(value, (list, tuple)):
            out[key] = [v for v in value if isinstance(v, str)]
        elif isinstance(value, (str, int, float, bool)) or value is None:
            out[key] = value
    return out


class EnvHost:
    """Creates the envs a welcome asks for and answers requests for them."""

    def __init__(self, welcome: P.Welcome, vectorization: str = "sync") -> None:
        self.welcome = welcome
        self.single = welcome.mode == P.MODE_SINGLE
        # "async" (envs in subprocesses) applies to vector mode; one plain env runs here.
        self.vectorization = "sync" if self.single else check_vectorization(vectorization)
        self.broken: str | None = None  # async: why the subprocesses cannot go on
        thunk = partial(
            make_env, welcome.env_id, welcome.env_kwargs, welcome.max_episode_steps,
            welcome.record_episode_statistics,
        )
        if self.single:
            self.env: gym.Env = thunk()
            self.venv = None
            first = self.env
        elif self.vectorization == "async":
            self.venv = self._make_async(thunk)
            first = None
        else:
            self.venv = _RecordingSyncVectorEnv(
                [thunk] * welcome.num_envs,
                copy=False,
                autoreset_mode=AutoresetMode(welcome.autoreset_mode),
            )
            self.venv.info_log = []
            first = self.venv.envs[0]
        if first is None:  # async: the parent's copy of what the first env reported
            venv = self.venv
            metadata = {k: v for k, v in venv.metadata.items() if k != "autoreset_mode"}
            first_spaces = (venv.single_observation_space, venv.single_action_space, venv.render_mode, metadata)
        else:
            first_spaces = (first.observation_space, first.action_space, first.render_mode, first.metadata)
        try:
            self._ready = {
                "observation_space": space_to_schema(first_spaces[0]),
                "action_space": space_to_schema(first_spaces[1]),
                "render_mode": first_spaces[2],
                "metadata": _jsonable_metadata(first_spaces[3]),
            }
        except BaseException:
            self.close()
            raise
        self._handlers = {
            P.RESET: self._reset,
            P.STEP: self._step,
            P.RENDER: self._render,
            P.CALL: self._call,
            P.SET_ATTR: self._set_attr,
            P.CLOSE: self._close,
        }
        self.closed = False

    def _make_async(self, thunk: Any) -> AsyncVectorEnv:
        welcome = self.welcome
        try:
            venv = _RecordingAsyncVectorEnv(
                [thunk] * welcome.num_envs,
                shared_memory=True,  # required for exact results: see _RecordingAsyncVectorEnv
                copy=False,
                context=None,  # the platform's default: fork on Linux, spawn on macOS and Windows
                daemon=True,  # ended with the worker if it exits without closing them
                autoreset_mode=AutoresetMode(welcome.autoreset_mode),
            )
        except ValueError as exc:
            if isinstance(exc.__cause__, gym.error.CustomSpaceError):
                env = thunk()  # a space with no shared-memory form: say which
                try:
                    space_to_schema(env.observation_space)
                finally:
                    env.close()
            raise
        venv.info_log = []
        return venv

    def ready_body(self) -> dict:
        return self._ready

    def handle(self, kind: str, body: Any) -> Any:
        """Answer one request; exceptions from the env propagate to the caller."""
        handler = self._handlers.get(kind)
        if handler is None:
            raise ProtocolError(f"unknown request kind {kind!r}")
        if not isinstance(body, dict):
            raise ProtocolError(f"{kind}: body must be an object")
        if self.vectorization == "sync":
            return handler(body)
        if self.broken is not None and kind != P.CLOSE:
            raise RuntimeError(self.broken)
        try:
            return handler(body)
        except ProtocolError:
            raise
        except BaseException as exc:
            # gymnasium's env subprocess ends at the first exception of its env, and an
            # AsyncVectorEnv cannot recover from that: refuse every later request clearly.
            self.broken = (
                f"this worker's env subprocesses cannot go on after an earlier error "
                f"({type(exc).__name__}: {exc}); restart the worker"
            )
            raise

    # -- requests ---------------------------------------------------------

    def _reset(self, body: dict) -> dict:
        seeds = body.get("seeds")
        options = body.get("options")
        if options is not None and not isinstance(options, dict):
            raise ProtocolError("reset: options must be an object or null")
        if self.single:
            if seeds is not None and type(seeds) is not int:
                raise ProtocolError("reset: seed must be an integer or null")
            obs, info = self.env.reset(seed=seeds, options=options)
            return {"o": obs, "info": info}
        n = self.venv.num_envs
        if seeds is None:
            seeds = [None] * n
        if not (isinstance(seeds, list) and len(seeds) == n and all(s is None or type(s) is int for s in seeds)):
            raise ProtocolError(f"reset: seeds must be a list of {n} integers or nulls")
        mask = body.get("mask")
        if mask is not None:
            if not (isinstance(mask, list) and len(mask) == n and all(type(m) is bool for m in mask)):
                raise ProtocolError(f"reset: mask must be a list of {n} booleans")
            options = dict(options or {}, reset_mask=np.array(mask, dtype=np.bool_))
        self.venv.info_log = []
        obs, _ = self.venv.reset(seed=seeds, options=options)
        return {"o": obs, "f": self.venv.info_log}

    def _step(self, body: dict) -> dict:
        if "a" not in body:
            raise ProtocolError("step: missing actions")
        actions = body["a"]
        if self.single:
            obs, reward, terminated, truncated, info = self.env.step(actions)
            return {"o": obs, "r": reward, "t": terminated, "u": truncated, "info": info}
        venv = self.venv
        venv.info_log = []
        obs, rewards, terms, truncs, _ = venv.step(actions)
        return {"o": obs, "r": rewards, "t": terms, "u": truncs, "f": venv.info_log}

    def _render(self, body: dict) -> Any:
        if self.single:
            return self.env.render()
        return list(self.venv.render())

    def _name_args(self, body: dict) -> tuple[str, list, dict]:
        name = body.get("name")
        args = body.get("args", [])
        kwargs = body.get("kwargs", {})
        if not isinstance(name, str) or not isinstance(args, list) or not isinstance(kwargs, dict):
            raise ProtocolError("call: needs a name, a list of args and an object of kwargs")
        if not all(isinstance(k, str) for k in kwargs):
            raise ProtocolError("call: kwargs keys must be strings")
        return name, args, kwargs

    def _call(self, body: dict) -> Any:
        name, args, kwargs = self._name_args(body)
        if self.single:
            attr = self.env.get_wrapper_attr(name)
            return attr(*args, **kwargs) if callable(attr) else attr
        return list(self.venv.call(name, *args, **kwargs))

    def _set_attr(self, body: dict) -> None:
        name, values, _ = self._name_args({"name": body.get("name"), "args": body.get("values")})
        if self.single:
            if len(values) != 1:
                raise ProtocolError("set_attr: expected one value")
            self.env.set_wrapper_attr(name, values[0])
        else:
            if len(values) != self.venv.num_envs:
                raise ProtocolError(f"set_attr: expected {self.venv.num_envs} values")
            self.venv.set_attr(name, values)
        return None

    def _close(self, body: dict) -> None:
        self.close()
        return None

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.single:
            self.env.close()
        elif self.broken is not None:
            _terminate(self.venv)
        else:
            self.venv.close()
