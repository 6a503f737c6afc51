"""``on_worker_lost="wait"``: steps and resets planned around envs without a worker.

A lost worker's envs end their episode as truncated (``infos["worker_lost"]``)
and hold their last observation until a new worker takes them over; the new
worker's envs are reset when their previous episode has ended. These methods
make the plan (which runs of envs step, reset or hold) and join the replies
into one full batch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv

from . import protocol as P
from .batching import check_reply, cut, item, join, own
from .calls import LOST, Call
from .errors import ProtocolError

LOST_KEY = "worker_lost"  # info flag of envs whose worker is lost (on_worker_lost="wait")


class AroundHoles(VectorEnv):
    """The wait-mode part of :class:`~ws_gym.vector.RemoteVectorEnv`, and what
    both parts use: the last observations held, infos merged as gymnasium does."""

    _trainer: Any
    _single_obs: Any
    _single_act: Any
    _last: list
    _raw_infos: list
    _ended: np.ndarray | None
    num_envs: int
    autoreset_mode: AutoresetMode

    def _reset_around_holes(self, seeds: list, options: dict | None, mask: np.ndarray | None) -> tuple[Any, dict]:
        """Wait mode: reset the envs that have a worker; envs without one keep
        their last observation and say so in ``infos["worker_lost"]``."""
        plan: list[tuple[int, int, Any, str]] = []  # (start, stop, worker or None, what)
        items = []
        for a, b, w in self._trainer.layout():
            if w is not None and w.fresh and mask is not None and not mask[a:b].all():
                # A new worker resets all its envs, but some were not asked to: reset()
                # leaves those alone, so the worker takes them over at a later step.
                w = None
            if w is not None:
                body: dict[str, Any] = {"seeds": seeds[a:b], "options": options}
                if mask is not None and not w.fresh:
                    part = mask[a:b]
                    if not part.any():
                        plan.append((a, b, None, "keep"))
                        continue
                    body["mask"] = part.tolist()
                items.append((w, P.RESET, body))
            plan.append((a, b, w, "reset" if w is not None else "lost"))
        replies = iter(self._trainer.wait(self._trainer.submit(items, tolerant=True)))
        infos: dict[str, Any] = {}
        last, raw = [], []
        # reset envs (and lost ones asked to reset) have not ended; the others keep their state
        prev_ended = self._ended
        if mask is None or prev_ended is None:
            ended = np.zeros(self.num_envs, dtype=np.bool_)
        else:
            ended = prev_ended & ~mask
        for a, b, w, what in plan:
            reply: Any = next(replies) if w is not None else LOST  # a reply body, or LOST
            if what == "keep":
                last.append((a, b, self._held(a, b)))
                continue
            if reply is not LOST and w.fresh:  # a new worker resets all its envs
                ended[a:b] = False
            if reply is LOST:
                held = self._held(a, b)
                for i in range(a, b):
                    if mask is None or mask[i]:
                        infos = self._add_info(infos, {LOST_KEY: True}, i)
                        raw.append((i, [[0, {LOST_KEY: True}]]))
                last.append((a, b, held))
                continue
            check_reply(reply, b - a, self._single_obs, w.origin, step=False)
            w.fresh = False
            for i, info in reply["f"]:
                infos = self._merge(infos, own(info), a + i, w.origin)
            raw.append((a, reply["f"]))
            last.append((a, b, reply["o"]))
        self._last = last
        self._raw_infos = raw
        self._ended = ended
        return join(self._single_obs, [part for _, _, part in last]), infos

    def _step_around_holes(self, actions: Any) -> tuple[Call, list]:
        """Wait mode: step the envs that have a worker. A worker that joined since
        the last step takes over its envs with a reset instead."""
        self._trainer.check_local()  # restart crashed local workers now, not at the next reset
        plan, items = [], []
        space = self._single_act
        # Which envs' last step ended their episode: only those may be taken over by a
        # reset at once. Without SAME_STEP's final_obs an episode not ended yet (its
        # worker was lost between two steps) must first end as truncated (worker_lost),
        # else its last obs and the new worker's first obs would look like one transition.
        ended = self._ended
        wait_end = self.autoreset_mode is not AutoresetMode.SAME_STEP
        for a, b, w in self._trainer.layout():
            if w is None or (w.fresh and wait_end and (ended is None or not ended[a:b].all())):
                plan.append((a, b, None, "lost"))
            elif w.fresh:
                items.append((w, P.RESET, {"seeds": [None] * (b - a), "options": None}))
                plan.append((a, b, w, "reset"))
            else:
                items.append((w, P.STEP, {"a": cut(space, actions, a, b)}))
                plan.append((a, b, w, "step"))
        return self._trainer.submit(items, tolerant=True), plan

    def _join_around_holes(self, plan: list, replies: list) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray, dict]:
        """Wait mode: one full batch. Envs without a worker end (again) as truncated
        with their last observation, reward 0 and ``infos["worker_lost"]``."""
        space = self._single_obs
        same_step = self.autoreset_mode is AutoresetMode.SAME_STEP
        pending = iter(replies)
        infos: dict[str, Any] = {}
        obs, rew, term, trunc, last, raw = [], [], [], [], [], []
        for a, b, w, what in plan:
            n = b - a
            reply: Any = next(pending) if w is not None else LOST  # a reply body, or LOST
            if reply is not LOST:
                check_reply(reply, n, space, w.origin, step=what == "step")
            if what == "step" and reply is not LOST:
                o, r, t, u = reply["o"], reply["r"], reply["t"], reply["u"]
                for i, info in reply["f"]:
                    infos = self._merge(infos, own(info), a + i, w.origin)
                raw.append((a, reply["f"]))
            else:
                held = self._held(a, b)
                r, t = np.zeros(n), np.zeros(n, dtype=np.bool_)
                if reply is LOST:  # out of service: the episode ends here, again
                    o, u = held, np.ones(n, dtype=np.bool_)
                    for i in range(n):
                        info = {LOST_KEY: True}
                        if same_step:
                            info.update(final_obs=item(space, held, i), final_info={LOST_KEY: True})
                        infos = self._add_info(infos, info, a + i)
                        raw.append((a + i, [[0, info]]))
                else:  # a new worker took these envs over: their first observation
                    w.fresh = False
                    o, u = reply["o"], np.full(n, same_step)
                    reset_infos = dict(reply["f"])
                    for i in range(n):
                        info = own(reset_infos.get(i, {}))
                        if same_step:  # the step that ends the lost episode brings the reset
                            info.update(final_obs=item(space, held, i), final_info={LOST_KEY: True})
                        if info:
                            infos = self._merge(infos, info, a + i, w.origin)
                            raw.append((a + i, [[0, info]]))
            obs.append(o)
            rew.append(r)
            term.append(t)
            trunc.append(u)
            last.append((a, b, o))
        self._last = last
        self._raw_infos = raw
        terminated, truncated = np.concatenate(term), np.concatenate(trunc)
        self._ended = terminated | truncated
        return join(space, obs), np.concatenate(rew), terminated, truncated, infos

    def _merge(self, infos: dict, info: dict, i: int, origin: str) -> dict:
        """gymnasium's ``_add_info``; a worker's info it cannot merge is a ProtocolError."""
        try:
            return self._add_info(infos, info, i)
        except Exception as exc:  # e.g. a key that is a number for one env, a dict for another
            raise ProtocolError(
                f"{origin}: the info of env {i} cannot be merged with the others "
                f"({type(exc).__name__}: {str(exc)[:200]})"
            ) from None

    def _held(self, a: int, b: int) -> Any:
        """The last observations of envs ``a:b`` (a batch), from the previous results."""
        space = self._single_obs
        pieces = [cut(space, part, max(a, s) - s, min(b, e) - s) for s, e, part in self._last if s < b and a < e]
        return pieces[0] if len(pieces) == 1 else join(space, pieces)
