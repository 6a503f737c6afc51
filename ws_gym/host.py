"""The envs a worker hosts, and how it answers each request (no I/O).

In vector mode the envs run inside gymnasium's own ``SyncVectorEnv``, so
autoreset, seeding, ``reset_mask``, ``call`` and ``render`` behave exactly as
gymnasium's. One thing differs: instead of merging infos here, the worker
records every ``_add_info(infos, env_info, i)`` call and sends that log; the
trainer replays it with gymnasium's ``_add_info`` over all ``num_envs``, so the
merged infos (keys, order, dtypes, masks) are those of one ``SyncVectorEnv``
over every env, whatever the split among workers.

With ``vectorization="async"`` (the worker's ``--vectorization async``) the envs
run in subprocesses, in gymnasium's ``AsyncVectorEnv``, for CPU-heavy envs; the
same recording trick gives the same log there (:mod:`ws_gym.host_async`).
"""

from __future__ import annotations

import copy
import logging
from functools import partial
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, SyncVectorEnv

from . import compact
from . import protocol as P
from .config import check_vectorization
from .errors import ProtocolError
from .host_async import RecordingAsyncVectorEnv, make_recording_async, terminate
from .compression import Compressor
from .metadata import jsonable_metadata
from .spaces import ARRAY_SPACES, space_to_schema


class _RecordingSyncVectorEnv(SyncVectorEnv):
    """A SyncVectorEnv that logs ``_add_info`` calls instead of merging them.

    Its ``step`` is SyncVectorEnv's own loop with the per-step generic helpers
    (``iterate``, ``concatenate``: single-dispatch calls) resolved once, for
    array spaces; any other space takes gymnasium's code unchanged. Tests step
    both side by side and compare every output.
    """

    info_log: list

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lean = (
            isinstance(self.action_space, _ITER_SPACES)
            and isinstance(self.single_observation_space, _STACK_SPACES)
            and type(self._observations) is np.ndarray
        )

    def step(self, actions: Any) -> tuple:
        if not self._lean or type(actions) is not np.ndarray or len(actions) != self.num_envs:
            return super().step(actions)  # gymnasium's own code (and its errors)
        mode = self.autoreset_mode
        envs = self.envs
        env_obs: list[Any] = self._env_obs
        rewards, terms, truncs, autoreset = self._rewards, self._terminations, self._truncations, self._autoreset_envs
        infos: dict[str, Any] = {}  # stays empty: _add_info logs instead
        add_info = self._add_info  # logs, as in gymnasium's step
        for i, action in enumerate(actions):  # iterate() of a Box/MultiDiscrete/MultiBinary batch
            env = envs[i]
            if mode is AutoresetMode.NEXT_STEP and autoreset[i]:
                env_obs[i], env_info = env.reset()
                rewards[i] = 0.0
                terms[i] = False
                truncs[i] = False
            else:
                if mode is AutoresetMode.DISABLED:
                    assert not autoreset[i], f"{self._autoreset_envs=}"
                env_obs[i], rewards[i], terms[i], truncs[i], env_info = env.step(action)
                if mode is AutoresetMode.SAME_STEP and (terms[i] or truncs[i]):
                    add_info(infos, {"final_obs": env_obs[i], "final_info": env_info}, i)
                    env_obs[i], env_info = env.reset()
            if env_info:
                add_info(infos, env_info, i)
        np.stack(env_obs, axis=0, out=self._observations)  # concatenate() of these spaces
        self._autoreset_envs = np.logical_or(terms, truncs)
        obs = copy.deepcopy(self._observations) if self.copy else self._observations
        return obs, rewards.copy(), terms.copy(), truncs.copy(), infos

    def _add_info(self, vector_infos: dict, env_info: dict, env_num: int) -> dict:
        if "final_obs" in env_info:  # the env may reuse its obs buffer on reset
            env_info = dict(env_info, final_obs=copy.deepcopy(env_info["final_obs"]))
        if env_info:
            self.info_log.append([env_num, env_info])
        return vector_infos


_ITER_SPACES = (gym.spaces.Box, gym.spaces.MultiDiscrete, gym.spaces.MultiBinary)  # batched action spaces
_STACK_SPACES = ARRAY_SPACES  # batched observation spaces


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


PUBLIC_DUNDERS = frozenset({"__str__", "__repr__"})  # what `call` may name despite the underscore


class EnvHost:
    """Creates the envs a welcome asks for and answers requests for them."""

    compact: compact.StepLayout | None = None  # the compact step frames' layout, where the spaces allow
    zip: Compressor | None = None  # this connection's compression, where the handshake chose one
    env: gym.Env  # single mode: the one env
    venv: _RecordingSyncVectorEnv | RecordingAsyncVectorEnv  # vector mode: the envs

    def __init__(self, welcome: P.Welcome, vectorization: str = "sync") -> None:
        self.welcome = welcome
        self.single = welcome.mode == P.MODE_SINGLE
        # "async" (envs in subprocesses) applies to vector mode; one plain env runs here.
        self.vectorization = "sync" if self.single else check_vectorization(vectorization)
        self.closed = False
        thunk = partial(
            make_env, welcome.env_id, welcome.env_kwargs, welcome.max_episode_steps,
            welcome.record_episode_statistics,
        )
        first: gym.Env | None
        if self.single:
            self.env = thunk()
            first = self.env
        elif self.vectorization == "async":
            self.venv = make_recording_async(thunk, welcome.num_envs, AutoresetMode(welcome.autoreset_mode))
            first = None
        else:
            sync = _RecordingSyncVectorEnv(
                [thunk] * welcome.num_envs,
                copy=False,
                autoreset_mode=AutoresetMode(welcome.autoreset_mode),
            )
            sync.info_log = []
            self.venv = sync
            first = sync.envs[0]
        if first is None:  # async: the parent's copy of what the first env reported
            venv = self.venv
            metadata = {k: v for k, v in venv.metadata.items() if k != "autoreset_mode"}
            first_spaces = (venv.single_observation_space, venv.single_action_space, venv.render_mode, metadata)
        else:
            first_spaces = (first.observation_space, first.action_space, first.render_mode, first.metadata)
        try:
            observation_schema = space_to_schema(first_spaces[0])
            action_schema = space_to_schema(first_spaces[1])
            self._ready: dict[str, Any] = {
                "observation_space": observation_schema,
                "action_space": action_schema,
                "render_mode": first_spaces[2],
                "metadata": jsonable_metadata(first_spaces[3]),
            }
            self.compact = compact.layout_for(observation_schema, action_schema, welcome.num_envs, self.single)
            if self.compact is not None:
                self._ready["compact"] = True
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
        try:
            return handler(body)
        except Exception:
            # An env's own error leaves its subprocess serving (like SyncVectorEnv); a
            # subprocess that died (the env killed it, or a signal) cannot be replaced
            # with the same state: end the worker, as a sync worker ends when its env
            # kills it, so the trainer sees a lost worker (and restarts a local one).
            venv = self.venv
            if isinstance(venv, RecordingAsyncVectorEnv) and not venv.healthy():
                self._subprocess_died(venv)
            raise

    def _subprocess_died(self, venv: RecordingAsyncVectorEnv) -> None:
        codes = [proc.exitcode for proc in venv.processes]
        logging.getLogger("ws_gym.worker").error(
            "an env subprocess of this worker died (exit codes %s); ending the worker", codes
        )
        self.close()
        raise SystemExit(1)

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
        frames = self.venv.render()
        assert frames is not None  # a tuple from both vector envs (None is VectorEnv's own default)
        return list(frames)

    def _name_args(self, body: dict) -> tuple[str, list, dict]:
        name = body.get("name")
        args = body.get("args", [])
        kwargs = body.get("kwargs", {})
        if not isinstance(name, str) or not isinstance(args, list) or not isinstance(kwargs, dict):
            raise ProtocolError("call: needs a name, a list of args and an object of kwargs")
        if not all(isinstance(k, str) for k in kwargs):
            raise ProtocolError("call: kwargs keys must be strings")
        if name.startswith("_") and name not in PUBLIC_DUNDERS:
            # the env's public API only: no __init__, __class__, __dict__ or private state
            raise PermissionError(f"a worker does not give access to private attribute {name[:100]!r}")
        return name, args, kwargs

    def _chosen_envs(self, body: dict) -> list[gym.Env] | None:
        """The envs of the optional ``indices``: some of this worker's envs only
        (gymnasium's vector envs reach all of them at once; SB3 asks for single envs)."""
        indices = body.get("indices")
        if indices is None:
            return None
        venv = self.venv
        n = venv.num_envs
        if not (isinstance(indices, list) and all(type(i) is int and 0 <= i < n for i in indices)):
            raise ProtocolError(f"indices must be a list of env indices below {n}")
        if not isinstance(venv, _RecordingSyncVectorEnv):
            raise NotImplementedError("indices need --vectorization sync: the envs are in subprocesses")
        return [venv.envs[i] for i in indices]

    def _call(self, body: dict) -> Any:
        name, args, kwargs = self._name_args(body)
        if self.single:
            attr = self.env.get_wrapper_attr(name)
            return attr(*args, **kwargs) if callable(attr) else attr
        envs = self._chosen_envs(body)
        if envs is None:
            return list(self.venv.call(name, *args, **kwargs))
        results = []
        for env in envs:  # as SyncVectorEnv.call, for the chosen envs
            attr = env.get_wrapper_attr(name)
            results.append(attr(*args, **kwargs) if callable(attr) else attr)
        return results

    def _set_attr(self, body: dict) -> None:
        name, values, _ = self._name_args({"name": body.get("name"), "args": body.get("values")})
        if self.single:
            if len(values) != 1:
                raise ProtocolError("set_attr: expected one value")
            self.env.set_wrapper_attr(name, values[0])
            return None
        envs = self._chosen_envs(body)
        want = self.venv.num_envs if envs is None else len(envs)
        if len(values) != want:
            raise ProtocolError(f"set_attr: expected {want} values")
        if envs is None:
            self.venv.set_attr(name, values)
        else:
            for env, value in zip(envs, values):
                env.set_wrapper_attr(name, value)
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
            return
        venv = self.venv
        if isinstance(venv, RecordingAsyncVectorEnv) and not venv.healthy():
            terminate(venv)
        else:
            try:
                venv.close()
            except Exception:
                if not isinstance(venv, RecordingAsyncVectorEnv):
                    raise
                terminate(venv)
