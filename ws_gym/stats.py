"""What the run is doing, for the dashboard, ``/status``, ``/metrics`` and
``envs.stats()``: counters, a once-a-second sampler and snapshots (no I/O).

Who writes what, and no lock anywhere:

* :class:`RunCounters` is written by the caller's thread only, in ``step()``
  and ``reset()``: integer increments and a few numpy operations over
  ``num_envs`` per step. Episodes are counted from ``terminated | truncated``;
  returns and lengths are running sums of the rewards ``step()`` returned,
  per env, so they need no ``RecordEpisodeStatistics`` (with it, they equal
  its ``episode`` infos). With ``NEXT_STEP`` autoreset the step after an
  episode's end is the reset step (reward 0, not done): it counts in no
  episode's length. Envs flagged ``worker_lost`` (``on_worker_lost="wait"``)
  end no episode: their steps count in ``lost_env_steps``.
* Each worker's counters live on its :class:`~ws_gym.connection.WorkerConn`
  (``step_requests``, ``replies``, ``rtt_total``, ``last_error``), written by
  the call book where requests are sent and replies read.
* :class:`Stats` is the loop thread's: :meth:`Stats.joined` and
  :meth:`Stats.lost` as workers come and go, :meth:`Stats.sample` once a
  second (rates from the counters' deltas, into a bounded ring for the
  charts), :meth:`Stats.snapshot` for each reader. A reader sees each number
  as it was when read; a snapshot may be a step behind on some of them.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from typing import Any, Callable, Iterable

import numpy as np

SCHEMA = 1  # /status's version: fields are added, never renamed or removed, within one schema
EPISODE_WINDOW = 100  # the means are over the last this many episodes
HISTORY = 600  # samples kept for the charts (10 minutes at one a second)
DEPARTED = 16  # lost workers kept for the table
NEXT_STEP, SAME_STEP = "NextStep", "SameStep"  # gymnasium's AutoresetMode values
LOST_MASK = "_worker_lost"  # the mask of envs without a worker (ws_gym.wait_mode.LOST_KEY's)


class RunCounters:
    """The run's counters; the caller's thread writes them, anyone reads them."""

    def __init__(self, num_envs: int, autoreset_mode: str = NEXT_STEP, window: int = EPISODE_WINDOW) -> None:
        self.num_envs = num_envs
        self.next_step = autoreset_mode == NEXT_STEP
        self.same_step = autoreset_mode == SAME_STEP
        self.steps = 0  # step() calls
        self.env_steps = 0  # results step() returned: steps x num_envs
        self.resets = 0  # reset() calls
        self.episodes = 0  # episodes that ended (terminated or truncated), lost workers' aside
        self.lost_env_steps = 0  # results of envs without a worker (on_worker_lost="wait")
        self.window = window
        self.returns = np.zeros(window)  # a ring: the last `window` episodes' returns, in no order
        self.lengths = np.zeros(window, dtype=np.int64)
        self._ret = np.zeros(num_envs)  # each env's return so far in its episode
        self._start = np.zeros(num_envs, dtype=np.int64)  # `steps` when its episode began
        self._len = np.zeros(num_envs, dtype=np.int64)  # its steps so far (step_part's count)

    # ---------------------------------------------------------- caller thread

    def reset(self, mask: np.ndarray | None = None) -> None:
        """``reset()``: the envs ``mask`` marks (all without one) begin an episode."""
        self.resets += 1
        if mask is None:
            self._ret[:] = 0.0
            self._start[:] = self.steps
            self._len[:] = 0
        else:
            self._ret[mask] = 0.0
            self._start[mask] = self.steps
            self._len[mask] = 0

    def step(self, rewards: np.ndarray, terminated: np.ndarray, truncated: np.ndarray,
             infos: dict[str, Any]) -> None:
        """One vector ``step()``'s results, as it returns them."""
        self.steps += 1
        self.env_steps += self.num_envs
        self._ret += rewards
        if np.count_nonzero(terminated) or np.count_nonzero(truncated):  # quicker than .any() on small arrays
            self._ended(terminated | truncated, infos)

    def _ended(self, done: np.ndarray, infos: dict[str, Any]) -> None:
        lost = infos.get(LOST_MASK)
        if self.same_step and isinstance(infos.get("final_info"), dict):  # a lost episode's end, again
            again = infos["final_info"].get(LOST_MASK)
            lost = again if lost is None else (lost if again is None else lost | again)
        if lost is not None:
            self.lost_env_steps += int(np.count_nonzero(lost))
        ret, start, steps = self._ret, self._start, self.steps
        begin = steps + self.next_step  # NEXT_STEP: the next step is these envs' reset step, in no episode
        for i in np.flatnonzero(done).tolist():  # a few envs at a time: plain indexing is quickest
            if lost is None or not lost[i]:
                at = self.episodes % self.window
                self.returns[at] = ret[i]
                self.lengths[at] = steps - start[i]
                self.episodes += 1
            ret[i] = 0.0
            start[i] = begin

    def step_part(self, start: int, rewards: np.ndarray, terminated: np.ndarray, truncated: np.ndarray) -> None:
        """One worker's results for envs ``start:start+len(rewards)`` (``recv()``:
        envs step apart, so their episodes' lengths are counted per env)."""
        stop = start + len(rewards)
        self.env_steps += len(rewards)
        self._ret[start:stop] += rewards
        self._len[start:stop] += 1
        done = terminated | truncated
        if np.count_nonzero(done):
            for i in (np.flatnonzero(done) + start).tolist():
                at = self.episodes % self.window
                self.returns[at] = self._ret[i]
                self.lengths[at] = self._len[i]
                self.episodes += 1
                self._ret[i] = 0.0
                self._len[i] = -self.next_step  # NEXT_STEP: its next step is a reset step, in no episode

    def step_one(self, reward: float, ended: bool, lost: bool = False) -> None:
        """One single env's ``step()`` (``RemoteEnv``: no autoreset)."""
        self.steps += 1
        self.env_steps += 1
        if lost:
            self.lost_env_steps += 1
        else:
            self._ret[0] += reward
        if ended:
            if not lost:
                at = self.episodes % self.window
                self.returns[at] = self._ret[0]
                self.lengths[at] = self.steps - self._start[0]
                self.episodes += 1
            self._ret[0] = 0.0
            self._start[0] = self.steps

    # ------------------------------------------------------------- any thread

    def means(self) -> tuple[float | None, float | None, int]:
        """(mean return, mean length, how many episodes) over the last ``window`` episodes."""
        n = min(self.episodes, self.window)
        if n == 0:
            return None, None, 0
        return float(self.returns[:n].mean()), float(self.lengths[:n].mean()), n


def _unzip_ratio(conn: Any) -> float | None:
    """Observation bytes / bytes received, of the arrays that came compressed (None: none did)."""
    unzip = getattr(conn.codec, "unzip", None)
    return unzip.ratio if unzip is not None and unzip.wire_bytes else None


def env_range(start: int, count: int) -> str:
    return str(start) if count == 1 else f"{start}..{start + count - 1}"


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None or value != value else round(value, digits)


class Stats:
    """The loop thread's view: workers as they come and go, samples, snapshots.

    Args:
        run: the run's counters (the caller's thread writes them).
        describe: what the run is (``env_id``, ``url``, ``worker_command``,
            ...): merged into every snapshot's ``run``.
        clock, wall: monotonic seconds and Unix time (tests pass their own).
    """

    def __init__(self, run: RunCounters, *, describe: Callable[[], dict[str, Any]] | None = None,
                 history: int = HISTORY, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.run = run
        self.describe = describe or dict
        self.clock, self.wall = clock, wall
        self.started = wall()
        self._t0 = clock()
        self.workers_lost = 0  # active workers whose connection ended while the trainer ran
        self.reconnects = 0  # workers that dialed in again (the worker id they were given)
        self.history: deque[tuple[float, float, float | None]] = deque(maxlen=history)
        self.departed: deque[dict[str, Any]] = deque(maxlen=DEPARTED)
        self._ids: OrderedDict[str, None] = OrderedDict()  # worker ids seen (bounded)
        self._last: tuple[float, int] | None = None  # (clock, env_steps) at the last sample
        self._first_step: tuple[float, int] | None = None  # when steps were first seen
        self.rate = 0.0  # env-steps/s over the last sample's interval
        self._workers: dict[int, tuple[float, int, int, float, float, float | None]] = {}

    # ------------------------------------------------------------ loop thread

    def joined(self, conn: Any) -> None:
        """A worker serves its envs from now on."""
        conn.since = self.wall()
        if conn.worker_id in self._ids:
            self.reconnects += 1
            self._ids.move_to_end(conn.worker_id)
        else:
            self._ids[conn.worker_id] = None
            while len(self._ids) > 4096:
                self._ids.popitem(last=False)

    def lost(self, conn: Any, why: str) -> None:
        """An active worker's connection ended (not at the trainer's close)."""
        self.workers_lost += 1
        row = self._row(conn, self.clock(), self.wall())
        row.update(state="lost", env_steps_per_s=0.0, lost_at=round(self.wall(), 3), last_error=why)
        self.departed.append(row)

    def sample(self, conns: Iterable[Any]) -> None:
        """Once a second: rates over the last interval, and a point for the charts."""
        now, env_steps = self.clock(), self.run.env_steps
        if self._last is not None and now > self._last[0]:
            self.rate = (env_steps - self._last[1]) / (now - self._last[0])
        self._last = (now, env_steps)
        if self._first_step is None and env_steps:
            self._first_step = (now, env_steps)
        self.history.append((round(now - self._t0, 3), round(self.rate, 1), _round(self.run.means()[0])))
        seen = {}
        for conn in conns:
            done = conn.step_requests * conn.count
            before = self._workers.get(conn.cid)
            rate, rtt = 0.0, None
            if before is not None:
                t, steps, replies, rtt_total, _, rtt = before
                if now > t:
                    rate = (done - steps) / (now - t)
                if conn.replies > replies:
                    rtt = (conn.rtt_total - rtt_total) / (conn.replies - replies)
            seen[conn.cid] = (now, done, conn.replies, conn.rtt_total, rate, rtt)
        self._workers = seen

    def snapshot(self, conns: Iterable[Any]) -> dict[str, Any]:
        """Everything ``/status`` shows, as plain JSON values (schema :data:`SCHEMA`)."""
        now, wall = self.clock(), self.wall()
        run = self.run
        workers = [self._row(c, now, wall) for c in sorted(conns, key=lambda c: c.start)]
        active = [w for w in workers if w["state"] == "active"]
        rtts = sorted(w["rtt_ms"] for w in active if w["rtt_ms"] is not None)
        for w in active:  # slow: a round trip at least twice the workers' (lower) median
            w["slow"] = len(rtts) > 1 and w["rtt_ms"] is not None and w["rtt_ms"] >= 2 * rtts[(len(rtts) - 1) // 2]
        mean_return, mean_length, window = run.means()
        first = self._first_step
        mean_rate = None
        if first is not None and now > first[0]:
            mean_rate = (run.env_steps - first[1]) / (now - first[0])
        info: dict[str, Any] = {
            "env_id": None, "num_envs": run.num_envs, "autoreset_mode": None, "mode": None, "url": None,
            "worker_command": None, "dashboard_url": None,
        }
        info.update(self.describe())
        info.update(
            started_at=round(self.started, 3),
            uptime_s=round(now - self._t0, 3),
            steps=run.steps,
            env_steps=run.env_steps,
            env_steps_per_s=round(self.rate, 1),
            env_steps_per_s_mean=_round(mean_rate, 1),
            resets=run.resets,
            episodes=run.episodes,
            episode_return_mean=_round(mean_return),
            episode_length_mean=_round(mean_length),
            episode_window=window,
            lost_env_steps=run.lost_env_steps,
            envs_served=sum(w["num_envs"] for w in active),
            workers_connected=len(active),
            workers_lost=self.workers_lost,
            reconnects=self.reconnects,
        )
        t, rate, ret = zip(*self.history) if self.history else ((), (), ())
        return {
            "schema": SCHEMA,
            "time": round(wall, 3),
            "run": info,
            "workers": workers,
            "departed": list(self.departed),
            "history": {"interval_s": 1.0, "t": list(t), "env_steps_per_s": list(rate),
                        "episode_return_mean": list(ret)},
        }

    def _row(self, conn: Any, now: float, wall: float) -> dict[str, Any]:
        sampled = self._workers.get(conn.cid)
        rtt = None if sampled is None or sampled[5] is None else sampled[5] * 1000
        if rtt is None and conn.replies:  # not sampled yet: the mean so far
            rtt = conn.rtt_total / conn.replies * 1000
        since = conn.since or None
        return {
            "id": conn.cid,
            "name": conn.name,
            "address": conn.peer,
            "envs": env_range(conn.start, conn.count),
            "first_env": conn.start,
            "num_envs": conn.count,
            "state": conn.state.value,
            "connected_since": None if since is None else round(since, 3),
            "connected_s": None if since is None else round(max(0.0, wall - since), 3),
            "rtt_ms": _round(rtt),
            "env_steps_per_s": 0.0 if sampled is None else round(sampled[4], 1),
            "env_steps": conn.step_requests * conn.count,
            "replies": conn.replies,
            "last_error": conn.last_error or None,
            "slow": False,
            "compression": conn.compression,
            "compressed_ratio": _round(_unzip_ratio(conn), 1),
        }
