"""RemoteVectorEnv: a gymnasium VectorEnv whose envs live in remote workers.

Each call is split into one request per worker (a contiguous run of envs),
sent concurrently, and the replies are joined into one batch. Infos are
rebuilt with gymnasium's own ``_add_info`` from the per-env log each worker
sends, so results equal those of one ``SyncVectorEnv`` over all envs.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from typing import Any, Sequence, cast

import gymnasium as gym
import numpy as np
from gymnasium.error import AlreadyPendingCallError, ClosedEnvironmentError, NoAsyncCallError
from gymnasium.vector import AutoresetMode
from gymnasium.vector.utils import batch_space

from . import protocol as P
from .batching import (
    ARRAY_SPACES, StepBatch, batch_shape, check_actions, check_list, check_mask, check_reply, cut, join, own,
)
from .calls import LOST, Call
from .config import RemoteConfig
from .errors import WorkerLostError
from .partial import Flight, PartialBatches
from .slots import env_ranges
from .stats_view import StatsView
from .trainer import Trainer
from .wait_mode import LOST_KEY, AroundHoles

__all__ = ["RemoteVectorEnv", "LOST_KEY"]


class VectorState(enum.Enum):
    """What the vector env waits for, as gymnasium's ``AsyncState``."""

    DEFAULT = "default"
    WAITING_STEP = "step"  # a step_async awaits its step_wait


@dataclass
class PendingStep:
    """A ``step_async`` whose results ``step_wait`` collects."""

    call: Call
    workers: list  # the workers asked, in env order (the plain path)
    plan: list | None = None  # wait mode: (start, stop, worker, what) for every run of envs
    batch: StepBatch | None = None  # the arrays the replies fill as they come (array observations)


class RemoteVectorEnv(AroundHoles, PartialBatches, StatsView):
    """A ``VectorEnv`` of ``num_envs`` envs hosted by workers that dial in.

    Workers connect to :attr:`url` (``python -m ws_gym.worker --url ...``), or
    the trainer starts ``local_workers`` of them itself on loopback. The first
    :meth:`reset` waits until workers cover every env.
    """

    def __init__(self, num_envs: int = 1, env_id: str | None = None, env_kwargs: dict | None = None,
                 **options: Any) -> None:
        """Start the trainer's server (and local workers); no worker is waited for yet.

        Args:
            num_envs: how many envs, over all workers.
            env_id: the Gymnasium id every worker makes (``None``: the first worker's).
            env_kwargs: keyword arguments for ``gym.make`` in the workers.
            **options: the options of :class:`ws_gym.config.RemoteConfig` (``port``,
                ``token``, ``local_workers``, ``autoreset_mode``, ``step_timeout``, ...).

        Raises:
            TypeError: an option that does not exist, or of the wrong type.
            ValueError: an option out of range.
            OSError: the port cannot be listened on.
        """
        if not isinstance(num_envs, (int, np.integer)) or num_envs < 1:
            raise ValueError(f"num_envs must be a positive integer, got {num_envs!r}")
        self.num_envs = int(num_envs)
        config = RemoteConfig.from_options({"env_id": env_id, "env_kwargs": env_kwargs, **options},
                                           type(self).__name__)
        self.batch_size: int = self.num_envs if config.batch_size is None else config.batch_size
        if self.batch_size > self.num_envs:
            raise ValueError(f"batch_size must be at most num_envs={self.num_envs}, got {self.batch_size}")
        self._flight: Flight | None = None  # send()/recv() since async_reset() (ws_gym.partial)
        assert isinstance(config.autoreset_mode, AutoresetMode)  # RemoteConfig converted it
        self.autoreset_mode: AutoresetMode = config.autoreset_mode
        self.metadata = {"autoreset_mode": self.autoreset_mode}
        self._trainer = Trainer(config, num_envs=self.num_envs, mode=P.MODE_VECTOR)
        self.url: str = self._trainer.url
        self.token: str | None = self._trainer.token  # what workers must present (maybe generated)
        self._last: list[tuple[int, int, Any]] = []  # (start, stop, obs batch): the latest observations
        self._raw_infos: list[tuple[int, list]] = []  # (first env, info log): the latest, unmerged
        self._ended: np.ndarray | None = None  # wait mode: which envs' last result ended their episode
        self._state = VectorState.DEFAULT
        self._step: PendingStep | None = None  # the step_async awaiting step_wait
        self._reset_tried = False  # reset() was called: envs a new worker brings are lost ones
        self._single_obs: gym.Space | None = None
        self._single_act: gym.Space | None = None
        self._obs: gym.Space | None = None
        self._act: gym.Space | None = None
        self._batched_obs = False
        self._render_mode = config.render_mode
        self.closed = False
        if self._trainer.spaces_known or config.local_workers:
            try:
                self._load_spaces()
            except BaseException:
                self._trainer.close()
                raise

    # -- spaces: known at once when the env is registered here, else from the first worker

    def _load_spaces(self) -> None:
        obs, act, ready = self._trainer.spaces()
        self._single_obs, self._single_act = obs, act
        self._batched_obs = isinstance(obs, ARRAY_SPACES)  # steps fill a StepBatch
        self._obs = batch_space(obs, self.num_envs)
        self._act = batch_space(act, self.num_envs)
        self.metadata = {**ready.metadata, "autoreset_mode": self.autoreset_mode}
        self._render_mode = ready.render_mode

    def _space(self, which: str) -> gym.Space:
        if self._single_obs is None:
            self._check_open()
            self._load_spaces()
        return getattr(self, which)

    single_observation_space = property(lambda self: self._space("_single_obs"))
    single_action_space = property(lambda self: self._space("_single_act"))
    observation_space = property(lambda self: self._space("_obs"))
    action_space = property(lambda self: self._space("_act"))

    @property
    def render_mode(self) -> str | None:  # type: ignore[override]
        return self._render_mode

    @property
    def np_random_seed(self) -> tuple[int, ...]:  # type: ignore[override]
        """The envs' ``np_random_seed``, one per env, as ``SyncVectorEnv``'s: ``(42, 43, ...)``
        after ``reset(seed=42)``; each env's own random seed where it was never seeded."""
        return self.get_attr("np_random_seed")

    # -- the VectorEnv API ---------------------------------------------------

    def reset(
        self,
        *,
        seed: int | Sequence[int | None] | None = None,
        options: dict[str, Any] | None = None,
    ) -> tuple[Any, dict[str, Any]]:
        """Reset the envs; the first reset waits for workers to cover every env.

        Args:
            seed: ``None``; an int (env ``i`` gets ``seed + i``); or one seed per env.
            options: passed to every env's ``reset``; ``options["reset_mask"]``
                (a bool array of ``num_envs``) resets only the envs it marks.

        Returns:
            The batched observations and the infos, as ``SyncVectorEnv`` gives them.

        Raises:
            ConnectTimeoutError: workers did not cover every env within ``connect_timeout``.
            WorkerLostError: a worker was lost during the reset (``on_worker_lost="raise"``).
            StepTimeoutError: a worker did not answer within ``step_timeout``.
            RemoteEnvError: an env raised; its type and traceback come with it.
        """
        self._check_idle()
        self._flight = None  # ends send()/recv(): replies still due are left to their calls
        trainer = self._trainer
        around_holes = trainer.wait_mode and bool(self._last)  # wait mode: only the first reset waits
        if not around_holes:
            trainer.wait_workers()
        if self._single_obs is None:
            self._load_spaces()
        assert self._single_obs is not None  # loaded
        n = self.num_envs
        if seed is None:
            seeds: list = [None] * n
        elif isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
            seeds = [int(seed) + i for i in range(n)]
        else:
            seeds = [None if s is None else int(s) for s in cast("Sequence[int | None]", seed)]
        if len(seeds) != n:
            raise ValueError(
                f"If seeds are passed as a list the length must match num_envs={n} but got length={len(seeds)}."
            )
        options = dict(options) if options is not None else None
        mask = None
        if options is not None and "reset_mask" in options:
            mask = options.pop("reset_mask")
            check_mask(mask, n)
        trainer.run_stats.reset(mask)  # statistics (ws_gym.stats): these envs begin an episode
        if around_holes:
            return self._reset_around_holes(seeds, options, mask)
        self._reset_tried = True
        deadline = time.monotonic() + trainer.connect_timeout
        while True:
            try:
                workers = trainer.serving()
            except WorkerLostError:  # lost after wait_workers() returned
                if not trainer.wait_mode or time.monotonic() > deadline:
                    raise
                trainer.wait_workers()
                continue
            items, asked = [], []
            for w in workers:
                body: dict[str, Any] = {"seeds": seeds[w.start : w.stop], "options": options}
                if mask is not None and not w.fresh:
                    part = mask[w.start : w.stop]
                    if not part.any():
                        continue
                    body["mask"] = part.tolist()
                items.append((w, P.RESET, body))
                asked.append(w)
            if not trainer.wait_mode:
                replies = trainer.request(items)
                break
            # wait mode, first reset: there is no last observation to hold for a lost
            # env, so a worker lost now is waited for, and the reset done again
            replies = trainer.wait(trainer.submit(items, tolerant=True))
            if not any(r is LOST for r in replies):
                break
            if time.monotonic() > deadline:
                raise WorkerLostError(f"workers kept being lost during the first reset() for "
                                      f"{trainer.connect_timeout:g} s (connect_timeout)")
            trainer.wait_workers()
        infos: dict[str, Any] = {}
        for w, reply in zip(asked, replies):
            check_reply(reply, w.count, self._single_obs, w.origin, step=False)
        fresh = dict(zip(asked, replies))
        for w, reply in fresh.items():
            w.fresh = False
            for i, info in reply["f"]:
                infos = self._merge(infos, own(info), w.start + i, w.origin)
        self._last = [(w.start, w.stop, fresh[w]["o"] if w in fresh else self._held(w.start, w.stop))
                      for w in workers]
        self._raw_infos = [(w.start, r["f"]) for w, r in fresh.items()]
        return join(self._single_obs, [part for _, _, part in self._last]), infos

    def step(self, actions: Any) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """Step every env: one request per worker, sent concurrently.

        Args:
            actions: a batch of ``num_envs`` actions of ``single_action_space``.

        Returns:
            ``(observations, rewards, terminations, truncations, infos)``, batched
            as ``SyncVectorEnv`` batches them, in ``autoreset_mode``.

        Raises:
            TypeError, ValueError: the actions are not a batch of ``num_envs``
                (the errors ``SyncVectorEnv`` raises).
            WorkerLostError: a worker was lost (``on_worker_lost="raise"``); call ``reset()``.
            StepTimeoutError: a worker did not answer within ``step_timeout``.
            RemoteEnvError: an env raised; its type and traceback come with it.
        """
        self.step_async(actions)
        return self.step_wait()

    def step_async(self, actions: Any) -> None:
        """Send the actions and return at once; :meth:`step_wait` collects the results.

        The trainer can do its own work in between while the envs step.
        """
        self._check_idle()
        if self._flight is not None:
            raise AlreadyPendingCallError("send()/recv() are in use since async_reset(): call reset() "
                                          "before step()", "step")
        trainer = self._trainer
        array_actions = isinstance(self._single_act, ARRAY_SPACES)
        if array_actions:
            actions = np.asarray(actions)
            if actions.shape[:1] != (self.num_envs,):  # as SyncVectorEnv: TypeError for a scalar
                raise (TypeError if actions.ndim == 0 else ValueError)(
                    f"expected a batch of {self.num_envs} actions "
                    f"({batch_shape(cast('gym.Space', self._single_act), self.num_envs)}), "
                    f"got an array of shape {actions.shape}"
                )
        elif self._single_act is not None:
            check_actions(self._single_act, actions, self.num_envs)
        if trainer.wait_mode:
            call, plan = self._step_around_holes(actions)
            self._step = PendingStep(call, [], plan)
            self._state = VectorState.WAITING_STEP
            return
        workers = trainer.serving()
        if self._reset_tried and any(w.fresh for w in workers):
            self._refuse_fresh(workers)
        if len(workers) == 1:
            items = [(workers[0], P.STEP, {"a": actions})]
        elif array_actions:  # as cut() slices an array space's batch
            items = [(w, P.STEP, {"a": actions[w.start:w.stop]}) for w in workers]
        else:
            space = cast("gym.Space", self._single_act)  # loaded by now (at the first reset, if not before)
            items = [(w, P.STEP, {"a": cut(space, actions, w.start, w.stop)}) for w in workers]
        batch = StepBatch(cast("gym.Space", self._single_obs), self.num_envs, workers) if self._batched_obs else None
        call = trainer.submit(items, sink=batch.fill if batch is not None else None)
        self._step = PendingStep(call, workers, None, batch)
        self._state = VectorState.WAITING_STEP

    def _refuse_fresh(self, workers: list) -> None:
        """Raise mode: envs that a new (or returning) worker took over since the
        last reset have new episodes, not reset yet: they were lost, as the
        caller would have been told had the loss been seen before the return."""
        fresh = [w for w in workers if w.fresh]
        envs = env_ranges([i for w in fresh for i in range(w.start, w.stop)])
        raise WorkerLostError(
            f"envs {envs} lost their worker since the last reset(); "
            f"{', '.join(w.origin for w in fresh)} serves them now with new envs: call reset()"
        )

    def step_wait(
        self, timeout: float | None = None
    ) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """The results of the last :meth:`step_async`; waits at most ``timeout``
        seconds (default: the env's ``step_timeout``)."""
        results = self._step_results(timeout)
        self._trainer.run_stats.step(*results[1:])  # statistics (ws_gym.stats): a few numpy operations
        return results

    def _step_results(self, timeout: float | None) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray, dict]:
        pending = self._step
        if self._state is not VectorState.WAITING_STEP or pending is None:
            self._check_open()
            raise NoAsyncCallError("calling `step_wait` without any prior call to `step_async`.", "step")
        self._state, self._step = VectorState.DEFAULT, None
        workers, plan, batch = pending.workers, pending.plan, pending.batch
        replies = self._trainer.wait(pending.call, -1 if timeout is None else timeout)
        if plan is not None:
            return self._join_around_holes(plan, replies)
        infos: dict[str, Any] = {}
        space = cast("gym.Space", self._single_obs)  # loaded by now (at the first reset, if not before)
        if batch is None:
            for w, reply in zip(workers, replies):
                check_reply(reply, w.count, space, w.origin, step=True)
        for w, reply in zip(workers, replies):
            if reply["f"]:
                for i, info in reply["f"]:
                    infos = self._merge(infos, own(info), w.start + i, w.origin)
        self._raw_infos = [(w.start, r["f"]) for w, r in zip(workers, replies)]
        if batch is not None:  # filled as the replies came in, checked by its sink
            self._last = [(0, self.num_envs, batch.obs)]
            return batch.obs, batch.r, batch.t, batch.u, infos
        self._last = [(w.start, w.stop, r["o"]) for w, r in zip(workers, replies)]
        if len(replies) == 1:
            r = replies[0]
            return join(space, [r["o"]]), r["r"].copy(), r["t"].copy(), r["u"].copy(), infos
        return (
            join(space, [r["o"] for r in replies]),
            np.concatenate([r["r"] for r in replies]),
            np.concatenate([r["t"] for r in replies]),
            np.concatenate([r["u"] for r in replies]),
            infos,
        )

    def _workers(self) -> list:
        """The workers for render/call/get_attr/set_attr; before the first reset
        they are waited for, so these answer at once as gymnasium's vector envs do."""
        self._check_idle()
        if not self._last:
            self._trainer.wait_workers()
        return self._trainer.serving()

    def render(self) -> tuple[Any, ...] | None:
        """Render every env, as ``SyncVectorEnv.render``.

        Returns:
            A tuple with one frame per env (``None`` entries where an env renders nothing).
        """
        workers = self._workers()
        replies = self._trainer.request([(w, P.RENDER, {}) for w in workers])
        return tuple(own(x) for w, r in zip(workers, replies) for x in check_list(r, w.count, w.origin))

    def call(self, name: str, /, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
        """Call (or read) ``name`` on every env.

        Args:
            name: a method or attribute of the envs (a public name, or ``__str__``/``__repr__``).
            *args, **kwargs: the method's arguments (values with a wire form).

        Returns:
            A tuple with one result per env, in env order.

        Raises:
            RemoteEnvError: the call raised in an env (e.g. ``AttributeError``).
            TypeError: an argument has no wire form (``codec.EncodeError``).
        """
        workers = self._workers()
        body = {"name": name, "args": list(args), "kwargs": kwargs}
        replies = self._trainer.request([(w, P.CALL, body) for w in workers])
        return tuple(own(x) for w, r in zip(workers, replies) for x in check_list(r, w.count, w.origin))

    def call_at(self, indices: Sequence[int], name: str, /, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
        """Call (or read) ``name`` on the envs ``indices`` only; results in that order.

        For callers that address single envs (SB3's ``env_method(indices=...)``).
        """
        groups = self._group(indices)
        items = [(w, P.CALL, {"name": name, "args": list(args), "kwargs": kwargs,
                              "indices": [i - w.start for i in idx]}) for w, idx in groups]
        replies = self._trainer.request(items)
        found: dict[int, Any] = {}
        for (w, idx), r in zip(groups, replies):
            found.update(zip(idx, check_list(r, len(idx), w.origin)))
        return tuple(own(found[i]) for i in indices)

    def set_attr_at(self, indices: Sequence[int], name: str, values: Sequence[Any]) -> None:
        """Set ``name`` on the envs ``indices`` only, one value each."""
        self._check_idle()
        if len(values) != len(indices):
            raise ValueError(f"expected {len(indices)} values, got {len(values)}")
        value_of = dict(zip(indices, values))
        groups = self._group(indices)
        self._trainer.request([(w, P.SET_ATTR, {"name": name, "values": [value_of[i] for i in idx],
                                                "indices": [i - w.start for i in idx]}) for w, idx in groups])

    def _group(self, indices: Sequence[int]) -> list[tuple[Any, list[int]]]:
        """``indices`` grouped by the worker that hosts them (each index once)."""
        self._check_idle()
        wanted = sorted({int(i) for i in indices})
        if wanted and not 0 <= wanted[0] <= wanted[-1] < self.num_envs:
            raise IndexError(f"env indices must be in 0..{self.num_envs - 1}, got {list(indices)}")
        return [(w, [i for i in wanted if w.start <= i < w.stop]) for w in self._workers()
                if any(w.start <= i < w.stop for i in wanted)]

    def env_infos(self) -> list[dict[str, Any]]:
        """The last reset's or step's infos, one dict per env as each env returned
        it (before gymnasium batches them, which may change a value's type)."""
        out: list[dict[str, Any]] = [{} for _ in range(self.num_envs)]
        for start, log in self._raw_infos:
            for i, info in log:  # SAME_STEP logs an ended env twice: final_obs/final_info, then the reset's
                out[start + i].update(own(info))
        return out

    def get_attr(self, name: str) -> tuple[Any, ...]:
        """The attribute ``name`` of every env.

        Returns:
            A tuple with one value per env; ``spec`` comes back as each env's ``EnvSpec``.

        Raises:
            RemoteEnvError: an env has no such attribute (``AttributeError`` in it).
        """
        return self.call(name)

    def set_attr(self, name: str, values: list[Any] | tuple[Any, ...] | Any) -> None:
        """Set ``name`` on every env.

        Args:
            name: the attribute.
            values: one value for all envs, or a list or tuple of one value per env.

        Raises:
            ValueError: a list or tuple whose length is not ``num_envs``.
            RemoteEnvError: setting it raised in an env.
        """
        self._check_idle()
        if not isinstance(values, (list, tuple)):
            values = [values for _ in range(self.num_envs)]
        if len(values) != self.num_envs:
            raise ValueError(
                "Values must be a list or tuple with length equal to the number of environments. "
                f"Got `{len(values)}` values for {self.num_envs} environments."
            )
        workers = self._workers()
        self._trainer.request(
            [(w, P.SET_ATTR, {"name": name, "values": list(values[w.start : w.stop])}) for w in workers]
        )

    def close_extras(self, **kwargs: Any) -> None:
        """Tell the workers to close their envs, stop the server, end local workers."""
        self._state, self._step = VectorState.DEFAULT, None  # its replies arrive before the close replies
        self._flight = None
        self._trainer.close()

    def _check_open(self) -> None:
        """Every call on a closed env raises at once, as in gymnasium's AsyncVectorEnv."""
        if self.closed:
            raise ClosedEnvironmentError(f"Trying to operate on `{type(self).__name__}`, after a call to `close()`.")

    def _check_idle(self) -> None:
        """No call may start while a ``step_async`` awaits its ``step_wait``."""
        self._check_open()
        if self._state is not VectorState.DEFAULT:
            raise AlreadyPendingCallError(
                "calling a method while waiting for a pending call to `step_wait`", "step"
            )

    def __repr__(self) -> str:
        return f"RemoteVectorEnv(num_envs={self.num_envs}, url={self.url!r})"

    def __del__(self) -> None:
        if not getattr(self, "closed", True) and hasattr(self, "_trainer"):
            try:
                self.close()
            except Exception:
                pass
