"""Partial batches: EnvPool's asynchronous API (``send``/``recv``) over workers.

``recv()`` returns the first ``batch_size`` envs whose results are in, with
their ids; ``send(actions, env_ids)`` gives those envs their next actions. A
slow PC then holds up its own envs only: the others step on meanwhile.

A worker steps its envs together, in one request, as on the ``step()`` path:
its request goes out once every one of its envs has its action (so a
``batch_size`` that is a multiple of the workers' env counts never waits on a
sibling). Results beyond the batch wait, in the order they came, for the next
``recv()``. Each env's trajectory is the one ``SyncVectorEnv`` gives for the
same actions: the worker's envs step, reset and autoreset as there.
"""

from __future__ import annotations

import bisect
import enum
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from gymnasium.error import ResetNeeded
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import concatenate, create_empty_array

from . import protocol as P
from .batching import ARRAY_SPACES, batch_shape, check_actions, check_reply, item, own
from .calls import Arrivals, Call
from .errors import ProtocolError, StepTimeoutError


class EnvState(enum.IntEnum):
    """Where each env is between ``recv()`` and ``send()``."""

    READY = 0  # its result is in, not returned by recv() yet
    HELD = 1  # recv() returned it: it awaits send()
    COLLECTED = 2  # send() gave its action; its worker's other envs have none yet
    STEPPING = 3  # its worker's request is out


@dataclass
class Ready:
    """One env's result, waiting for ``recv()``."""

    env: int
    obs: Any  # the worker's batch of observations ...
    row: int  # ... and this env's row in it
    reward: float
    terminated: bool
    truncated: bool
    infos: list  # its info dicts, in the order the worker logged them


@dataclass
class Flight:
    """The envs of a run of ``send()``/``recv()`` since ``async_reset()``."""

    batch_size: int
    state: np.ndarray  # EnvState of every env
    ready: deque = field(default_factory=deque)  # Ready entries, in arrival order
    actions: dict = field(default_factory=dict)  # worker start -> {env: action}, collected by send()
    out: dict = field(default_factory=dict)  # Call -> worker, the requests out
    done: Arrivals = field(default_factory=Arrivals)  # calls complete, in that order (see CallBook.submit)
    last_ids: np.ndarray | None = None  # what the last recv() returned


def _empty(space: Any, n: int) -> Any:
    """A batch of ``n`` of ``space`` for gymnasium's ``concatenate`` to fill."""
    return create_empty_array(space, n)


class _BatchInfos(VectorEnv):
    """gymnasium's own ``_add_info`` for a batch of ``n`` envs (``recv``'s, not ``num_envs``)."""

    def __init__(self, n: int) -> None:
        self.num_envs = n


class PartialBatches(VectorEnv):
    """The ``send``/``recv`` part of :class:`~ws_gym.vector.RemoteVectorEnv`."""

    _trainer: Any
    _single_obs: Any
    _single_act: Any
    num_envs: int
    batch_size: int
    autoreset_mode: AutoresetMode
    _flight: Flight | None
    _raw_infos: list
    _check_idle: Any  # RemoteVectorEnv's
    _refuse_fresh: Any

    def async_reset(self, *, seed: int | Sequence[int | None] | None = None,
                    options: dict[str, Any] | None = None) -> None:
        """Reset every env (as :meth:`reset`); the next :meth:`recv` calls return
        their first observations, in env order, with zero rewards."""
        if options is not None and "reset_mask" in options:
            raise ValueError("async_reset() resets every env: it takes no reset_mask")
        obs, _ = self.reset(seed=seed, options=options)  # type: ignore[arg-type]  # ends any flight before
        infos: list[list] = [[] for _ in range(self.num_envs)]
        for start, log in self._raw_infos:
            for i, info in log:
                infos[start + i].append(info)
        flight = Flight(self._batch_size(), np.full(self.num_envs, EnvState.READY, np.int8))
        flight.ready.extend(Ready(i, obs, i, 0.0, False, False, infos[i]) for i in range(self.num_envs))
        self._flight = flight

    def send(self, actions: Any, env_ids: Any = None) -> None:
        """Give the envs ``env_ids`` their next actions (default: the last
        :meth:`recv`'s envs). A worker's request goes out once all its envs have one.

        Raises:
            ResetNeeded: no :meth:`async_reset` came first.
            ValueError: an env id that is not awaiting an action (not returned
                by :meth:`recv` since its last send), or actions that do not match.
            WorkerLostError: a worker was lost; call :meth:`async_reset`.
        """
        flight = self._need_flight()
        ids = self._check_ids(flight, flight.last_ids if env_ids is None else env_ids)
        space = self._single_act
        if isinstance(space, ARRAY_SPACES):
            actions = np.asarray(actions)
            if actions.shape[:1] != (len(ids),):
                raise ValueError(f"expected {len(ids)} actions for {len(ids)} env ids "
                                 f"({batch_shape(space, len(ids))}), got an array of shape {actions.shape}")
        else:
            check_actions(space, actions, len(ids))
        workers = self._trainer.serving()
        if any(w.fresh for w in workers):
            self._refuse_fresh(workers)
        starts = [w.start for w in workers]
        touched = {}
        for j, env in enumerate(ids.tolist()):
            w = workers[bisect.bisect_right(starts, env) - 1]
            flight.actions.setdefault(w.start, {})[env] = item(space, actions, j)
            flight.state[env] = EnvState.COLLECTED
            touched[w.start] = w
        for start, w in touched.items():
            collected = flight.actions[start]
            if len(collected) < w.count:
                continue
            del flight.actions[start]
            batch = concatenate(space, [collected[e] for e in range(w.start, w.stop)], _empty(space, w.count))
            call = self._trainer.submit([(w, P.STEP, {"a": batch})], notify=flight.done)
            flight.out[call] = w
            flight.state[w.start:w.stop] = EnvState.STEPPING

    def recv(self, timeout: float | None = None) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray, dict, np.ndarray]:
        """The first ``batch_size`` envs whose results are in.

        Args:
            timeout: seconds to wait at most (default: the env's ``step_timeout``).

        Returns:
            ``(observations, rewards, terminations, truncations, infos, env_ids)``,
            each batched over the ``batch_size`` envs ``env_ids`` names, in that order.

        Raises:
            ValueError: fewer than ``batch_size`` envs can come back (the others
                await :meth:`send`).
            StepTimeoutError: not enough results within ``timeout``.
            WorkerLostError, RemoteEnvError: as :meth:`step` (call :meth:`async_reset`).
        """
        flight = self._need_flight()
        n = flight.batch_size
        limit = self._trainer.step_timeout if timeout is None else timeout
        deadline = None if limit is None else time.monotonic() + limit
        while len(flight.ready) < n:
            if not flight.out:
                waiting = np.flatnonzero(flight.state != EnvState.READY).tolist()
                raise ValueError(
                    f"recv() needs {n} envs but {len(flight.ready)} can come back: envs {waiting} await send() "
                    f"(a worker steps its envs together: its request goes out once all of them have an action)")
            self._collect(flight, self._next_done(flight, deadline), deadline)
        entries = [flight.ready.popleft() for _ in range(n)]
        ids = np.fromiter((e.env for e in entries), np.int64, n)
        flight.state[ids] = EnvState.HELD
        flight.last_ids = ids
        # views of the rows: concatenate copies them into the new batch, once
        obs = concatenate(self._single_obs, [item(self._single_obs, e.obs, e.row, copy=False) for e in entries],
                          _empty(self._single_obs, n))
        infos: dict[str, Any] = {}
        merger = _BatchInfos(n)
        for j, e in enumerate(entries):
            for info in e.infos:
                try:
                    infos = merger._add_info(infos, own(info), j)
                except Exception as exc:  # as AroundHoles._merge
                    raise ProtocolError(f"env {e.env}: its info cannot be merged with the others "
                                        f"({type(exc).__name__}: {str(exc)[:200]})") from None
        return (obs, np.array([e.reward for e in entries]), np.array([e.terminated for e in entries]),
                np.array([e.truncated for e in entries]), infos, ids)

    # -- the calls out ------------------------------------------------------

    def _next_done(self, flight: Flight, deadline: float | None) -> Call:
        """A complete call of this flight (one out: waited for directly, so busy polling serves it)."""
        if len(flight.out) == 1:
            call = next(iter(flight.out))
            flight.done.forget(call)  # not taken from the arrivals: its entry is dropped
            return call
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        call = self._trainer.first_done(flight.out, flight.done, left)
        if call is None:
            slow = ", ".join(w.origin for w in flight.out.values())
            raise StepTimeoutError(f"no results within the timeout ({left} s) from {slow}")
        return call

    def _collect(self, flight: Flight, call: Call, deadline: float | None) -> None:
        """A complete call's (or the only one's, waited for here) results become ready."""
        w = flight.out[call]
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            reply = self._trainer.wait(call, 0.0 if call.done else left)[0]
        finally:
            del flight.out[call]
        check_reply(reply, w.count, self._single_obs, w.origin, step=True)
        self._trainer.run_stats.step_part(w.start, reply["r"], reply["t"], reply["u"])
        logs: dict[int, list] = {}
        for i, info in reply["f"]:
            logs.setdefault(i, []).append(info)
        r, t, u = reply["r"].tolist(), reply["t"].tolist(), reply["u"].tolist()
        obs = reply["o"]
        flight.ready.extend(Ready(w.start + i, obs, i, r[i], t[i], u[i], logs.get(i, [])) for i in range(w.count))
        flight.state[w.start:w.stop] = EnvState.READY

    # -- checks ---------------------------------------------------------------

    def _batch_size(self) -> int:
        if self._trainer.wait_mode:
            raise ValueError('send()/recv() need on_worker_lost="raise": a lost worker ends the flight '
                             "(call async_reset() again)")
        if self.autoreset_mode is AutoresetMode.DISABLED:
            raise ValueError("send()/recv() need an autoreset mode: with DISABLED an ended env could only "
                             "be reset by reset(), which ends send()/recv()")
        return self.batch_size

    def _need_flight(self) -> Flight:
        self._check_idle()  # open, and no step_async() awaiting its step_wait()
        if self._flight is None:
            raise ResetNeeded("call async_reset() before send() and recv()")
        return self._flight

    def _check_ids(self, flight: Flight, env_ids: Any) -> np.ndarray:
        if env_ids is None:
            raise ValueError("send() needs env_ids: no recv() came before")
        ids = np.asarray(env_ids)
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise ValueError(f"env_ids must be a 1-d array of env indices, got {env_ids!r:.80}")
        if ids.size and not 0 <= ids.min() <= ids.max() < self.num_envs:
            raise ValueError(f"env ids must be in 0..{self.num_envs - 1}, got {ids.tolist()}")
        if len(np.unique(ids)) != len(ids):
            raise ValueError(f"env ids given twice: {ids.tolist()}")
        bad = [int(i) for i in ids if flight.state[i] != EnvState.HELD]
        if bad:
            raise ValueError(f"envs {bad} do not await an action: send() takes the envs recv() returned, once")
        return ids.astype(np.int64)
