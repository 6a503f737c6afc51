"""RemoteEnv: a single ``gymnasium.Env`` served by one env in a remote worker."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
from gymnasium.error import ClosedEnvironmentError
from gymnasium.vector import AutoresetMode

from . import protocol as P
from .errors import ProtocolError, WorkerLostError
from .calls import LOST
from .config import RemoteConfig
from .connection import WorkerConn
from .trainer import Trainer
from .batching import own
from .wait_mode import LOST_KEY
from .stats_view import StatsView

__all__ = ["RemoteEnv"]


def _check(reply: Any, keys: tuple[str, ...], origin: str) -> None:
    """Validate the shape of a single-env reply before using it."""
    if type(reply) is not dict or not all(k in reply for k in keys) or type(reply["info"]) is not dict:
        raise ProtocolError(f"{origin} sent a malformed reply (expected keys {keys})")


class RemoteEnv(StatsView, gym.Env):
    """One remote env: ``reset``/``step``/``render`` run in a worker.

    The worker runs the plain env made by ``gym.make(env_id)`` (no autoreset),
    so results equal those of ``gym.make(env_id)`` in process.
    """

    def __init__(self, env_id: str | None = None, env_kwargs: dict | None = None, **options: Any) -> None:
        """Start the trainer's server (and a local worker); no worker is waited for yet.

        Args:
            env_id: the Gymnasium id the worker makes (``None``: the first worker's).
            env_kwargs: keyword arguments for ``gym.make`` in the worker.
            **options: the options of :class:`ws_gym.config.RemoteConfig`, as for
                ``RemoteVectorEnv`` (``autoreset_mode`` and ``worker_vectorization``
                are accepted and change nothing: a single env never autoresets, and
                its worker runs it in its own process).

        Raises:
            TypeError: an option that does not exist, or of the wrong type.
            ValueError: an option out of range.
            OSError: the port cannot be listened on.
        """
        config = RemoteConfig.from_options({"env_id": env_id, "env_kwargs": env_kwargs, **options},
                                           type(self).__name__)
        config.autoreset_mode = AutoresetMode.NEXT_STEP
        if config.batch_size is not None:
            raise ValueError("batch_size is for the vector env (gym.make_vec): a single env has no batches")
        self._trainer = Trainer(config, num_envs=1, mode=P.MODE_SINGLE)
        self.url: str = self._trainer.url
        self.token: str | None = self._trainer.token  # what workers must present (maybe generated)
        self._render_mode = config.render_mode
        self._closed = False
        self._loaded = False
        self._last_obs: Any = None  # as received; kept for on_worker_lost="wait"
        if self._trainer.spaces_known or config.local_workers:
            try:
                self._load()
            except BaseException:
                self._trainer.close()
                raise

    def _load(self) -> None:
        obs, act, ready = self._trainer.spaces()
        self._obs_space, self._act_space = obs, act
        self._metadata = dict(ready.metadata)
        self._render_mode = ready.render_mode
        self._loaded = True

    def _get(self, name: str) -> Any:
        if not self._loaded:
            self._check_open()
            self._load()
        return getattr(self, name)

    # A property on the class also tells gym.make not to validate render modes
    # against metadata the class cannot know before a worker connects.
    metadata = property(lambda self: self._get("_metadata"))  # type: ignore[assignment]
    observation_space = property(lambda self: self._get("_obs_space"))  # type: ignore[assignment]
    action_space = property(lambda self: self._get("_act_space"))  # type: ignore[assignment]

    @property
    def render_mode(self) -> str | None:  # type: ignore[override]
        return self._render_mode

    def _check_open(self) -> None:
        """Every call on a closed env raises at once (not after ``connect_timeout``)."""
        if self._closed:
            raise ClosedEnvironmentError(f"Trying to operate on `{type(self).__name__}`, after a call to `close()`.")

    def _worker(self) -> WorkerConn:
        self._check_open()
        self._trainer.wait_workers()
        return self._trainer.serving()[0]

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict]:
        """Reset the remote env; the first reset waits for a worker.

        Args:
            seed: seeds the env's random generator, as ``gym.Env.reset``.
            options: passed to the env's ``reset``.

        Returns:
            The observation and the info the env returned.

        Raises:
            ClosedEnvironmentError: the env was closed.
            ConnectTimeoutError: no worker connected within ``connect_timeout``.
            WorkerLostError: the worker was lost during the reset (``on_worker_lost="raise"``).
            StepTimeoutError: the worker did not answer within ``step_timeout``.
            RemoteEnvError: the env raised; its type and traceback come with it.
        """
        self._check_open()
        super().reset(seed=seed)
        trainer = self._trainer
        worker = self._worker()
        if not self._loaded:
            self._load()
        body = {"seeds": seed, "options": options}
        if trainer.wait_mode:  # a worker lost during the reset: wait for the next one and reset it
            while True:
                (reply,) = trainer.wait(trainer.submit([(worker, P.RESET, body)], tolerant=True))
                if reply is not LOST:
                    break
                worker = self._worker()
        else:
            (reply,) = trainer.request([(worker, P.RESET, body)])
        _check(reply, ("o", "info"), worker.origin)
        worker.fresh = False
        self._last_obs = reply["o"]
        trainer.run_stats.reset()  # statistics (ws_gym.stats)
        return own(reply["o"]), own(reply["info"])

    def step(self, action: Any) -> tuple[Any, Any, bool, bool, dict]:
        """Step the remote env.

        Returns:
            ``(observation, reward, terminated, truncated, info)`` as the env returned them.

        Raises:
            ClosedEnvironmentError: the env was closed.
            WorkerLostError: the worker was lost, or a new one serves the env since
                the last reset (``on_worker_lost="raise"``): call ``reset()``.
            StepTimeoutError: the worker did not answer within ``step_timeout``.
            RemoteEnvError: the env raised; its type and traceback come with it.
        """
        self._check_open()
        trainer = self._trainer
        if trainer.wait_mode:  # a lost worker ends the episode as truncated; reset() waits for a new one
            worker = trainer.layout()[0][2]
            if worker is None or worker.fresh or self._last_obs is None:
                return self._lost()
            (reply,) = trainer.wait(trainer.submit([(worker, P.STEP, {"a": action})], tolerant=True))
            if reply is LOST:
                return self._lost()
        else:
            worker = trainer.serving()[0]
            if worker.fresh and self._last_obs is not None:  # envs a new worker brings are not reset
                raise WorkerLostError(f"the env lost its worker since the last reset(); {worker.origin} "
                                      "serves it now with a new env: call reset()")
            (reply,) = trainer.request([(worker, P.STEP, {"a": action})])
        _check(reply, ("o", "r", "t", "u", "info"), worker.origin)
        self._last_obs = reply["o"]
        trainer.run_stats.step_one(reply["r"], reply["t"] or reply["u"])  # statistics (ws_gym.stats)
        return own(reply["o"]), reply["r"], reply["t"], reply["u"], own(reply["info"])

    def _lost(self) -> tuple[Any, float, bool, bool, dict]:
        if self._last_obs is None:
            raise WorkerLostError("the worker was lost before the first reset completed")
        self._trainer.run_stats.step_one(0.0, True, lost=True)  # statistics (ws_gym.stats)
        return own(self._last_obs), 0.0, False, True, {LOST_KEY: True}

    def render(self) -> Any:
        (frame,) = self._trainer.request([(self._worker(), P.RENDER, {})])
        return own(frame)

    def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Call (or read) ``name`` on the remote env.

        Returns:
            The result (an attribute's value when ``name`` is not callable).

        Raises:
            RemoteEnvError: the call raised in the env.
        """
        body = {"name": name, "args": list(args), "kwargs": kwargs}
        (result,) = self._trainer.request([(self._worker(), P.CALL, body)])
        return own(result)

    def set_remote_attr(self, name: str, value: Any) -> None:
        """Set ``name`` on the remote env."""
        self._trainer.request([(self._worker(), P.SET_ATTR, {"name": name, "values": [value]})])

    def close(self) -> None:
        """Close the env in its worker, stop the server and end local workers.
        Calling it again does nothing; any other call then raises ``ClosedEnvironmentError``."""
        if not self._closed:
            self._closed = True
            self._trainer.close()

    def __repr__(self) -> str:
        return f"RemoteEnv(url={self.url!r})"

    def __del__(self) -> None:
        if not getattr(self, "_closed", True) and hasattr(self, "_trainer"):
            try:
                self.close()
            except Exception:
                pass
