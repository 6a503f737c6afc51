"""The worker's envs in subprocesses (``--vectorization async``), for CPU-heavy envs.

gymnasium's ``AsyncVectorEnv`` runs them, with its subprocess loop replaced by
:func:`_env_subprocess` so that every result equals ``SyncVectorEnv``'s (see
its docstring for the cases gymnasium's own loop differs in). The parent merges
infos with the same ``_add_info(infos, info, i)`` calls as ``SyncVectorEnv``, so
recording them gives the same info log as the sync worker
(:class:`RecordingAsyncVectorEnv`; :mod:`ws_gym.host` has the sync one).
"""

from __future__ import annotations

import copy
import pickle
import queue
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from multiprocessing import Queue
from multiprocessing.connection import Connection
from typing import Any, SupportsFloat

import gymnasium as gym
import numpy as np
from gymnasium.vector import AsyncVectorEnv, AutoresetMode
from gymnasium.vector.async_vector_env import AsyncState
from gymnasium.vector.utils import write_to_shared_memory

from .spaces import space_to_schema

__all__ = ["RecordingAsyncVectorEnv", "make_recording_async", "shared_memory_works", "terminate"]


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


def _env_subprocess(
    index: int,
    env_fn: Callable[[], gym.Env],
    pipe: Connection,
    parent_pipe: Connection,
    shared_memory: Any,
    error_queue: Queue,
    autoreset_mode: AutoresetMode,
    *_unused: Any,
) -> None:
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
    observation: Any = None
    reward: SupportsFloat
    info: dict[str, Any] | _TwoInfos
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


def shared_memory_works(space: gym.Space) -> bool:
    """Whether AsyncVectorEnv's shared memory gives live observations of ``space``
    (gymnasium reads Text ones from it only once, at construction)."""
    if isinstance(space, gym.spaces.Dict):
        return all(shared_memory_works(s) for s in space.spaces.values())
    if isinstance(space, gym.spaces.Tuple):
        return all(shared_memory_works(s) for s in space.spaces)
    return isinstance(space, (gym.spaces.Box, gym.spaces.Discrete, gym.spaces.MultiDiscrete, gym.spaces.MultiBinary))


class RecordingAsyncVectorEnv(AsyncVectorEnv):
    """An AsyncVectorEnv whose info log equals the sync worker's (``ws_gym.host._RecordingSyncVectorEnv``).

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

    def __init__(self, env_fns: Sequence[Callable[[], gym.Env]], **kwargs: Any) -> None:
        # gymnasium's annotation of `worker` omits arguments it passes to it
        # (the autoreset mode, and a semaphore in 1.4)
        super().__init__(env_fns, worker=_env_subprocess, **kwargs)  # type: ignore[arg-type]
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


def make_recording_async(
    thunk: Callable[[], gym.Env], num_envs: int, autoreset_mode: AutoresetMode
) -> RecordingAsyncVectorEnv:
    """``num_envs`` envs made by ``thunk``, each in its subprocess."""

    def make(shared_memory: bool) -> RecordingAsyncVectorEnv:
        return RecordingAsyncVectorEnv(
            [thunk] * num_envs,
            shared_memory=shared_memory,
            copy=False,  # the observations are encoded before the next call
            context=None,  # the platform's default: fork on Linux, spawn on macOS and Windows
            daemon=True,  # ended with the worker if it exits without closing them
            autoreset_mode=autoreset_mode,
        )

    try:
        # Shared memory spares a pickled copy of every observation, but the
        # space is known only once the envs exist: a Text observation (not
        # live in shared memory) costs a second start, without it.
        venv = make(True)
        if not shared_memory_works(venv.single_observation_space):
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


def terminate(venv: AsyncVectorEnv, timeout: float = 5.0) -> None:
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
