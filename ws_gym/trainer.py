"""What RemoteVectorEnv and RemoteEnv share: the server, local workers, waiting.

A :class:`Trainer` owns one :class:`~ws_gym.pool.WorkerPool` and, with
``local_workers``, the worker processes it started. It learns the env's spaces
either by making the env once locally (when its id is registered here) or from
the first worker's handshake.
"""

from __future__ import annotations

import atexit
import importlib
import logging
import socket
import sys
import weakref
from typing import Any

import gymnasium as gym
from gymnasium.vector import AutoresetMode

from . import codec
from . import protocol as P
from .local import LocalWorkers, split_envs
from .pool import Expectation, WorkerPool, format_url
from .spaces import schema_to_space, space_to_schema

log = logging.getLogger("ws_gym")

# Trainers not closed by the user are closed at exit, while the loop thread can
# still run (a __del__ during interpreter shutdown could only wait for it).
_open: "weakref.WeakSet[Trainer]" = weakref.WeakSet()


@atexit.register
def _close_open_trainers() -> None:
    for trainer in list(_open):
        try:
            trainer.close()
        except Exception as exc:  # noqa: BLE001 - exiting regardless
            log.debug("closing a trainer at exit: %r", exc)


def _say(text: str) -> None:
    """Progress for the user: through logging when the application configured
    any (so its levels apply), else on stderr so the first run is never silent."""
    if log.hasHandlers():
        log.info("%s", text)
    else:
        print(f"ws_gym: {text}", file=sys.stderr, flush=True)


def autoreset_value(mode: AutoresetMode | str) -> AutoresetMode:
    try:
        return mode if isinstance(mode, AutoresetMode) else AutoresetMode(mode)
    except ValueError:
        raise ValueError(
            f"autoreset_mode must be an AutoresetMode or one of "
            f"{[m.value for m in AutoresetMode]}, got {mode!r}"
        ) from None


def probe(env_id: str | None, env_kwargs: dict, max_episode_steps: int | None) -> P.Ready | None:
    """Make the env once here to learn its spaces, if its id is registered here."""
    if env_id is None:
        return None
    try:
        module, _, name = env_id.rpartition(":")
        if module:
            importlib.import_module(module)
        gym.spec(name)
    except Exception:  # not registered (or its module not importable) on the trainer
        return None
    kwargs = dict(env_kwargs)
    if max_episode_steps is not None:
        kwargs["max_episode_steps"] = max_episode_steps
    try:
        env = gym.make(env_id, **kwargs)
    except Exception as exc:
        log.debug("could not make %s locally to read its spaces (%r); asking the workers", env_id, exc)
        return None
    try:
        from .host import _jsonable_metadata

        return P.Ready(
            space_to_schema(env.observation_space),
            space_to_schema(env.action_space),
            env.render_mode,
            _jsonable_metadata(env.metadata),
        )
    finally:
        env.close()


class Trainer:
    """Server + local workers + the spaces every worker must match."""

    def __init__(
        self,
        *,
        num_envs: int,
        mode: str,
        env_id: str | None,
        env_kwargs: dict | None,
        host: str,
        port: int,
        token: str | None,
        local_workers: int,
        autoreset_mode: AutoresetMode,
        connect_timeout: float,
        step_timeout: float | None,
        max_episode_steps: int | None,
        max_msg_size: int,
        record_episode_statistics: bool = False,
    ) -> None:
        if env_id is not None and not isinstance(env_id, str):
            raise TypeError(f"env_id must be a string or None, got {type(env_id).__name__}")
        if env_kwargs is not None and not isinstance(env_kwargs, dict):
            raise TypeError("env_kwargs must be a dict")
        if local_workers and env_id is None:
            raise ValueError("local_workers needs env_id: the local workers host the env the trainer names")
        if local_workers < 0:
            raise ValueError("local_workers must be >= 0")
        counts = split_envs(num_envs, local_workers) if local_workers else []
        self.num_envs = num_envs
        self.env_id = env_id
        self.connect_timeout = float(connect_timeout)
        self.step_timeout = None if step_timeout is None else float(step_timeout)
        env_kwargs = dict(env_kwargs or {})
        try:  # they travel in the welcome message: fail here, not in a handshake
            codec.encode(P.WELCOME, 0, env_kwargs, strict=True)
        except codec.EncodeError as exc:
            raise TypeError(f"env_kwargs cannot be sent to workers: {exc}") from None
        expect = Expectation(
            env_id=env_id,
            env_kwargs=env_kwargs,
            mode=mode,
            autoreset_mode=autoreset_mode.value,
            max_episode_steps=max_episode_steps,
            record_episode_statistics=bool(record_episode_statistics),
            ready=probe(env_id, env_kwargs, max_episode_steps),
        )
        self.pool = WorkerPool(
            num_envs=num_envs, expect=expect, host=host, port=port, token=token,
            max_msg_size=max_msg_size, ready_timeout=max(self.connect_timeout, 10.0),
        )
        self.url = self.pool.url
        self.local: LocalWorkers | None = None
        self._waited = False
        try:
            if counts:
                self.local = LocalWorkers(self.pool.local_url, counts, token=token)
        except BaseException:
            self.pool.close()
            raise
        self._spaces: tuple | None = None
        _open.add(self)

    def worker_command(self) -> str:
        """The command a user runs on a PC to serve envs to this trainer."""
        url = self.url
        if self.pool.host in ("0.0.0.0", "::", ""):  # listening everywhere: name this machine
            url = format_url(socket.gethostname(), self.pool.port)
        env = f" --env {self.env_id}" if self.env_id else " --env ENV_ID"
        return f"python -m ws_gym.worker --url {url}{env} --num-envs K"

    def _check_local(self) -> None:
        if self.local is not None:
            self.local.check()

    def spaces(self) -> tuple[gym.Space, gym.Space, P.Ready]:
        """(observation space, action space, ready info): waits for a worker if needed."""
        if self._spaces is None:
            ready = self.pool.expect.ready
            if ready is None:
                _say(f"waiting for a worker at {self.url} to learn the env's spaces; run: {self.worker_command()}")
                ready = self.pool.wait_spaces(self.connect_timeout, check=self._check_local)
            self._spaces = (schema_to_space(ready.observation_space), schema_to_space(ready.action_space), ready)
        return self._spaces

    def wait_workers(self) -> None:
        """Block until workers cover every env (logging progress), or raise."""
        if self.pool.covered() == self.num_envs:
            return
        local = self.local is not None

        def progress(have: int) -> None:
            if local:
                if not self._waited:
                    n = len(self.local.procs)
                    _say(f"starting {n} local worker{'s' if n > 1 else ''} for {self.num_envs} envs")
            else:
                _say(
                    f"waiting for workers: {have}/{self.num_envs} envs connected to {self.url}; "
                    f"start workers with: {self.worker_command()}"
                )
            self._waited = True

        self.pool.wait_covered(self.connect_timeout, progress=progress, check=self._check_local)

    def request(self, items: list[tuple[Any, str, Any]], timeout: float | None = -1) -> list[Any]:
        return self.pool.request(items, self.step_timeout if timeout == -1 else timeout)

    def close(self) -> None:
        _open.discard(self)
        try:
            self.pool.close()
        finally:
            if self.local is not None:
                self.local.close()
