"""The envs a worker hosts, and how it answers each request (no I/O).

In vector mode the envs run inside gymnasium's own ``SyncVectorEnv``, so
autoreset, seeding, ``reset_mask``, ``call`` and ``render`` behave exactly as
gymnasium's. One thing differs: instead of merging infos here, the worker
records every ``_add_info(infos, env_info, i)`` call and sends that log; the
trainer replays it with gymnasium's ``_add_info`` over all ``num_envs``, so the
merged infos (keys, order, dtypes, masks) are those of one ``SyncVectorEnv``
over every env, whatever the split among workers.
"""

from __future__ import annotations

import copy
from functools import partial
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, SyncVectorEnv

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

    def __init__(self, welcome: P.Welcome) -> None:
        self.welcome = welcome
        self.single = welcome.mode == P.MODE_SINGLE
        thunk = partial(
            make_env, welcome.env_id, welcome.env_kwargs, welcome.max_episode_steps,
            welcome.record_episode_statistics,
        )
        if self.single:
            self.env: gym.Env = thunk()
            self.venv = None
            first = self.env
        else:
            self.venv = _RecordingSyncVectorEnv(
                [thunk] * welcome.num_envs,
                copy=False,
                autoreset_mode=AutoresetMode(welcome.autoreset_mode),
            )
            self.venv.info_log = []
            first = self.venv.envs[0]
        self._ready = {
            "observation_space": space_to_schema(first.observation_space),
            "action_space": space_to_schema(first.action_space),
            "render_mode": first.render_mode,
            "metadata": _jsonable_metadata(first.metadata),
        }
        self._handlers = {
            P.RESET: self._reset,
            P.STEP: self._step,
            P.RENDER: self._render,
            P.CALL: self._call,
            P.SET_ATTR: self._set_attr,
            P.CLOSE: self._close,
        }
        self.closed = False

    def ready_body(self) -> dict:
        return self._ready

    def handle(self, kind: str, body: Any) -> Any:
        """Answer one request; exceptions from the env propagate to the caller."""
        handler = self._handlers.get(kind)
        if handler is None:
            raise ProtocolError(f"unknown request kind {kind!r}")
        if not isinstance(body, dict):
            raise ProtocolError(f"{kind}: body must be an object")
        return handler(body)

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
        else:
            self.venv.close()
