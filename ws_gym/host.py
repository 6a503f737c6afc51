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
import logging
import pickle
import queue
import signal
import sys
import traceback
from functools import partial
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AsyncVectorEnv, AutoresetMode, SyncVectorEnv
from gymnasium.vector.async_vector_env import AsyncState
from gymnasium.vector.utils import write_to_shared_memory

from . import compact
from . import protocol as P
from .errors import ProtocolError
from .spaces import space_to_schema


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
        envs, env_obs = self.envs, self._env_obs
        rewards, terms, truncs, autoreset = self._rewards, self._terminations, self._truncations, self._autoreset_envs
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
                    add_info(None, {"final_obs": env_obs[i], "final_info": env_info}, i)
                    env_obs[i], env_info = env.reset()
            if env_info:
                add_info(None, env_info, i)
        np.stack(env_obs, axis=0, out=self._observations)  # concatenate() of these spaces
        self._autoreset_envs = np.logical_or(terms, truncs)
        obs = copy.deepcopy(self._observations) if self.copy else self._observations
        return obs, rewards.copy(), terms.copy(), truncs.copy(), {}

    def _add_info(self, vector_infos: dict, env_info: dict, env_num: int) -> dict:
        if "final_obs" in env_info:  # the env may reuse its obs buffer on reset
            env_info = dict(env_info, final_obs=copy.deepcopy(env_info["final_obs"]))
        if env_info:
            self.info_log.append([env_num, env_info])
        return vector_infos


_ITER_SPACES = (gym.spaces.Box, gym.spaces.MultiDiscrete, gym.spaces.MultiBinary)  # batched action spaces
_STACK_SPACES = (gym.spaces.Box, gym.spaces.Discrete, gym.spaces.MultiDiscrete, gym.spaces.MultiBinary)


class _TwoInfos(tuple):
    """SameStep episode end in a subprocess: the two infos SyncVectorEnv adds one by one."""


class _SubprocessTraceback(Exception):
    """Carries an env subprocess's traceback text as the cause of its re-raised error."""

    def __str__(self) -> str:
        return self.args[0]


def _picklable(exc: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__qualname__}: {exc}")


def _die_with_parent() -> None:
    """Linux: have the kernel end this process when the worker that forked it dies,
    even mid-step (elsewhere the end of the pipe tells us, at the next command)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort
        pass


def _env_subprocess(index, env_fn, pipe, parent_pipe, shared_memory, error_queue, autoreset_mode, *_unused):
    """One env in a subprocess of an async worker: gymnasium's ``_async_worker``
    (same commands and replies, gymnasium 1.1 to 1.4), changed so that results
    equal SyncVectorEnv's in every case:

    - an explicit reset clears the pending NextStep autoreset with or without
      shared memory (gymnasium 1.4 clears it only with shared memory);
    - an env's exception is reported and the env goes on, as in SyncVectorEnv
      (gymnasium's subprocess ends at the first one);
    - a SameStep episode end sends the two infos SyncVectorEnv adds, the final
      observation copied before the reset (an env may reuse its buffer);
    - ``call`` reaches every attribute, ``reset`` and ``step`` too, as SyncVectorEnv's.

    Ctrl-C is ignored here: the worker handles it and closes its envs.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    env = env_fn()
    observation_space, action_space = env.observation_space, env.action_space
    autoreset = False
    observation = None
    parent_pipe.close()
    try:
        while True:
            try:
                command, data = pipe.recv()
            except (EOFError, OSError):  # the worker is gone
                break
            try:
                if command == "step":
                    if autoreset_mode == AutoresetMode.NEXT_STEP:
                        if autoreset:
                            observation, info = env.reset()
                            reward, terminated, truncated = 0.0, False, False
                        else:
                            observation, reward, terminated, truncated, info = env.step(data)
                        autoreset = terminated or truncated
                    elif autoreset_mode == AutoresetMode.SAME_STEP:
                        observation, reward, terminated, truncated, info = env.step(data)
                        if terminated or truncated:
                            final = {"final_obs": copy.deepcopy(observation), "final_info": info}
                            observation, info = env.reset()
                            info = _TwoInfos((final, info))
                    else:  # Disabled: the parent refuses to step an ended env
                        observation, reward, terminated, truncated, info = env.step(data)
                    if shared_memory:
                        write_to_shared_memory(observation_space, index, observation, shared_memory)
                    sent = None if shared_memory else observation
                    pipe.send(((sent, reward, terminated, truncated, info), True))
                elif command == "reset":
                    observation, info = env.reset(**data)
                    autoreset = False
                    if shared_memory:
                        write_to_shared_memory(observation_space, index, observation, shared_memory)
                    pipe.send(((None if shared_memory else observation, info), True))
                elif command == "reset-noop":
                    pipe.send(((None if shared_memory else observation, {}), True))
                elif command == "_call":
                    name, args, kwargs = data
                    attr = env.get_wrapper_attr(name)
                    pipe.send((attr(*args, **kwargs) if callable(attr) else attr, True))
                elif command == "_setattr":
                    name, value = data
                    env.set_wrapper_attr(name, value)
                    pipe.send((None, True))
                elif command == "_check_spaces":
                    _, single_observation_space, single_action_space = data
                    pipe.send(((single_observation_space == observation_space,
                                single_action_space == action_space), True))
                elif command == "close":
                    pipe.send((None, True))
                    break
                else:
                    raise RuntimeError(f"unknown command {command!r}")
            except Exception as exc:
                error_queue.put((index, _picklable(exc), traceback.format_exc()))
                pipe.send((None, False))
    finally:
        env.close()


def _shared_memory_works(space: gym.Space) -> bool:
    """Whether AsyncVectorEnv's shared memory gives live observations of ``space``
    (gymnasium reads Text ones from it only once, at construction)."""
    if isinstance(space, gym.spaces.Dict):
        return all(_shared_memory_works(s) for s in space.spaces.values())
    if isinstance(space, gym.spaces.Tuple):
        return all(_shared_memory_works(s) for s in space.spaces)
    return isinstance(space, (gym.spaces.Box, gym.spaces.Discrete, gym.spaces.MultiDiscrete, gym.spaces.MultiBinary))


class _RecordingAsyncVectorEnv(AsyncVectorEnv):
    """An AsyncVectorEnv whose info log equals ``_RecordingSyncVectorEnv``'s.

    AsyncVectorEnv calls ``_add_info(infos, info, i)`` here in the parent, in
    env order, as SyncVectorEnv does, so recording those calls gives the same
    log, given the subprocesses of :func:`_env_subprocess`. Also:

    - Disabled: SyncVectorEnv asserts that no ended env is stepped before it is
      reset; that is checked here (before any env steps, where SyncVectorEnv
      would have stepped the envs before the first ended one).
    - ``reset-noop`` (envs outside a ``reset_mask``) logs ``{}``, which is
      dropped like every empty info.
    - An env's error is raised as itself (with its subprocess's traceback as
      the cause), the lowest env's first as in SyncVectorEnv, and the envs go on.
    """

    info_log: list

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, worker=_env_subprocess, **kwargs)
        self.info_log = []
        self._ended = np.zeros(self.num_envs, dtype=np.bool_)  # Disabled mode only

    def _add_info(self, vector_infos: dict, env_info: dict, env_num: int) -> dict:
        if type(env_info) is _TwoInfos:
            for part in env_info:
                if part:
                    self.info_log.append([env_num, part])
        elif env_info:
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
        if self.autoreset_mode == AutoresetMode.DISABLED:
            self._ended = np.logical_or(result[2], result[3])
        return result

    def _raise_if_errors(self, successes: Any) -> None:
        if all(successes):
            return
        self._state = AsyncState.DEFAULT  # every reply was read: the envs can go on
        errors = []
        for _ in range(len(successes) - sum(successes)):
            try:
                errors.append(self.error_queue.get(timeout=60))
            except queue.Empty:
                raise RuntimeError("an env subprocess failed without saying why") from None
        index, exc, trace = min(errors, key=lambda e: e[0])
        raise exc from _SubprocessTraceback(f"in env subprocess {index}:\n{trace}")

    def healthy(self) -> bool:
        """Every subprocess alive and no reply outstanding."""
        return (
            self._state == AsyncState.DEFAULT
            and all(pipe is not None and not pipe.closed for pipe in self.parent_pipes)
            and all(proc.is_alive() for proc in self.processes)
        )


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


PUBLIC_DUNDERS = frozenset({"__str__", "__repr__"})  # what `call` may name despite the underscore


class EnvHost:
    """Creates the envs a welcome asks for and answers requests for them."""

    compact: compact.StepLayout | None = None  # the compact step frames' layout, where the spaces allow

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
            self.compact = compact.layout_for(self._ready["observation_space"], self._ready["action_space"],
                                              welcome.num_envs, self.single)
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

    def _make_async(self, thunk: Any) -> AsyncVectorEnv:
        welcome = self.welcome

        def make(shared_memory: bool) -> _RecordingAsyncVectorEnv:
            return _RecordingAsyncVectorEnv(
                [thunk] * welcome.num_envs,
                shared_memory=shared_memory,
                copy=False,  # the observations are encoded before the next call
                context=None,  # the platform's default: fork on Linux, spawn on macOS and Windows
                daemon=True,  # ended with the worker if it exits without closing them
                autoreset_mode=AutoresetMode(welcome.autoreset_mode),
            )

        try:
            # Shared memory spares a pickled copy of every observation, but the
            # space is known only once the envs exist: a Text observation (not
            # live in shared memory) costs a second start, without it.
            venv = make(True)
            if not _shared_memory_works(venv.single_observation_space):
                venv.close()
                venv = make(False)
        except (ValueError, TypeError):
            # A space with no shared-memory form is one ws_gym cannot send either:
            # raise the error the sync path gives (UnsupportedSpaceError, naming it).
            env = thunk()
            try:
                space_to_schema(env.observation_space)
                space_to_schema(env.action_space)
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
        try:
            return handler(body)
        except Exception:
            # An env's own error leaves its subprocess serving (like SyncVectorEnv); a
            # subprocess that died (the env killed it, or a signal) cannot be replaced
            # with the same state: end the worker, as a sync worker ends when its env
            # kills it, so the trainer sees a lost worker (and restarts a local one).
            if not self.venv.healthy():
                self._subprocess_died()
            raise

    def _subprocess_died(self) -> None:
        codes = [proc.exitcode for proc in self.venv.processes]
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
        return list(self.venv.render())

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

    def _indices(self, body: dict) -> list[int] | None:
        """Optional ``indices``: some of this worker's envs only (gymnasium's vector
        envs reach all of them at once; SB3 asks for single envs)."""
        indices = body.get("indices")
        if indices is None:
            return None
        n = self.venv.num_envs
        if not (isinstance(indices, list) and all(type(i) is int and 0 <= i < n for i in indices)):
            raise ProtocolError(f"indices must be a list of env indices below {n}")
        if not hasattr(self.venv, "envs"):
            raise NotImplementedError("indices need --vectorization sync: the envs are in subprocesses")
        return indices

    def _call(self, body: dict) -> Any:
        name, args, kwargs = self._name_args(body)
        if self.single:
            attr = self.env.get_wrapper_attr(name)
            return attr(*args, **kwargs) if callable(attr) else attr
        indices = self._indices(body)
        if indices is None:
            return list(self.venv.call(name, *args, **kwargs))
        results = []
        for i in indices:  # as SyncVectorEnv.call, for the chosen envs
            attr = self.venv.envs[i].get_wrapper_attr(name)
            results.append(attr(*args, **kwargs) if callable(attr) else attr)
        return results

    def _set_attr(self, body: dict) -> None:
        name, values, _ = self._name_args({"name": body.get("name"), "args": body.get("values")})
        if self.single:
            if len(values) != 1:
                raise ProtocolError("set_attr: expected one value")
            self.env.set_wrapper_attr(name, values[0])
            return None
        indices = self._indices(body)
        want = self.venv.num_envs if indices is None else len(indices)
        if len(values) != want:
            raise ProtocolError(f"set_attr: expected {want} values")
        if indices is None:
            self.venv.set_attr(name, values)
        else:
            for i, value in zip(indices, values):
                self.venv.envs[i].set_wrapper_attr(name, value)
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
        elif self.vectorization == "async" and not self.venv.healthy():
            _terminate(self.venv)
        else:
            try:
                self.venv.close()
            except Exception:
                if self.vectorization != "async":
                    raise
                _terminate(self.venv)
