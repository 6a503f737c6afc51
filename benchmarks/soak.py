"""Soak test of ``on_worker_lost="wait"``: many steps while workers die at random.

A ``RemoteVectorEnv`` of ``tests.envs:Counter-v0`` envs (obs = [steps in this
episode, steps of this env object], episodes of 9 steps) runs in wait mode over
local workers (``local_workers``, restarted by the trainer) and worker processes
this script starts itself from the CLI, all on 127.0.0.1 (ports from the OS).
While it steps, a seeded schedule of chaos events hits the workers:

``kill-cli``      SIGKILL a serving CLI worker (a replacement starts a few steps later)
``kill-local``    SIGKILL a local worker (the trainer starts it again)
``crash``         action 1: the env kills its own worker process mid-step (exit 17)
``stall``         action 3: the env takes 3 s, longer than ``step_timeout``: cut off
``sleep``         SIGSTOP a worker while stepping (a sleeping PC), SIGCONT 0.3-3 s later
``reset``         the training loop calls ``reset()`` (half the time with a random
                  ``reset_mask``) in the middle of all this
``sleep-pause``   SIGSTOP a worker while the training loop pauses (a long update): the
                  heartbeat must notice; a new CLI worker takes the envs over before
                  the loop steps again; then SIGCONT (the woken worker finds its envs
                  taken: a local worker must wait, not fail the run)
``link-cut``      (``--link-cuts``) the link of a worker PC dies for a seeded 1-4 s: every
                  packet dropped (nftables) or its interface down, while the loop steps
                  or while it pauses; then the link returns (see below)

Link cuts (``--link-cuts``, Linux, root, ``ip`` and ``nft``) need a second network
stack: a killed or stopped process is not a dead link (its kernel still sends
FIN or ACKs). The soak then builds the network namespaces of tests/netns.py (T,
the trainer; A and B, PCs; H, a hub whose bridge joins them; addresses
10.213.0.x, which exist only inside them) and runs itself inside T (``ip netns
exec``), with the trainer on T's bridge address and a token. Local and CLI
workers run in T as usual; ``--pc-workers`` CLI workers run in A
(``ip netns exec A python -m ws_gym.worker``), and are started before the trainer
listens, so that they serve envs from the start. Those are the targets of link
cuts and of nothing else. Each cut is checked: the trainer drops A's
connections within 1.5 heartbeats + slack of the cut (detection), whether a
call is in flight or the loop pauses; A's envs are truncated with
``worker_lost`` meanwhile (the counter checks below); A's worker processes never
exit: they notice the dead trainer (within a heartbeat + slack), dial in again
and serve again within ``cut_recovery_bound`` s of the link's return (recovery),
or, where another worker took their envs meanwhile (free envs go to the next
worker: a local worker the trainer restarts, a worker waiting for room), they
dialed in again and were refused "not needed": they wait for room. During a cut
the soak starts no worker (top-ups and replacements wait) and only ``reset``,
``stall`` and ``sleep`` events may overlap it. When a worker dialed in and
what it was told come from A's worker logs (``--log-level DEBUG``).
The namespaces and everything in them are deleted at the end, also on failure
or Ctrl-C. Where they cannot be made (not root, no ``ip`` or ``nft``, not
Linux) link cuts are reported as skipped, with the reason, and the rest of the
soak runs as usual.

Checks (each failure is listed and the exit status is 1):

* no hang: every ``step()`` returns within ``step_timeout`` + slack (max and
  median latency are printed); a watchdog dumps all stacks if a call hangs;
* no exception escapes ``step()``;
* every step is a full batch, and every env's result is what its counter says:
  a real step advances the env object's own step counter by exactly one (no
  step lost or doubled), a lost env repeats its last observation, truncated,
  reward 0, ``worker_lost``; a takeover starts a new env object at [0, 0];
* the counts add up, per env slot: the real steps the trainer returned equal the
  sum, over the env objects that served the slot, of each object's own step
  counter (the last value the trainer received from it); terminated episodes
  equal what those counters imply: (steps - steps of episodes cut short by a
  reset or a loss) / 9; lost truncations are counted apart;
* no env slot lost for good: after the chaos stops, every slot is served again
  within ``--recovery-timeout`` and then steps cleanly;
* no leaked process: after ``close()`` every worker process this run started
  (CLI workers, local workers and their restarts) has ended by itself and been
  reaped, and no process carrying this run's tag in its environment (a worker's
  child, say) is left (Linux: /proc);
* every worker exited with an expected code (0 closed, 2 not needed, 4 gave up,
  17 crashed on purpose, -9 killed on purpose); a worker in A never exits before
  ``close()`` (unless refused at its start, before it served) and exits 0 after;
* link cuts: detection and recovery within their bounds, and the cut was real (a
  probe from A to T fails while the link is cut).

The schedule (kinds of events and the steps they happen at) is fixed by
``--seed``; which worker an event hits depends on who serves what at that
moment, which depends on timing. Targets are chosen from ws_gym internals (the
trainer's slot table); the checks use only what ``step()`` returns plus the
processes' exit codes.

    python benchmarks/soak.py                  # 20,000 steps per autoreset mode, a few minutes
    python benchmarks/soak.py --quick          # < 25 s
    python benchmarks/soak.py --duration 600   # chaos for 10 minutes
    python benchmarks/soak.py --link-cuts --duration 60   # as root: link cuts too, in namespaces
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import os
import random
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # ws_gym from this checkout, tests.envs for the Counter env

import ws_gym  # noqa: E402
import tests.envs  # noqa: E402,F401  (registers Counter-v0 here too: the trainer probes its spaces)
from gymnasium.vector import AutoresetMode  # noqa: E402

COUNTER = "tests.envs:Counter-v0"
LENGTH = 9  # CounterEnv's episode length
TAG_VAR = "WS_GYM_SOAK_TAG"  # every process this run starts inherits it
POSIX = hasattr(signal, "SIGSTOP")
REPORT = sys.__stderr__  # where a hang's stacks go (main() points it at the real stderr)
KINDS = ("kill-cli", "kill-local", "crash", "stall", "sleep", "sleep-pause", "reset")
LINK_CUT = "link-cut"  # only with link cuts (namespaces): not in KINDS
ALL_KINDS = KINDS + (LINK_CUT,)
CUT_OVERLAP = ("reset", "stall", "sleep")  # the kinds that may happen while a link is cut
PC = "a"  # the namespace (tests/netns.py role) of the worker PC whose link is cut
EXPECTED_EXITS = {0: "closed", 2: "not needed", 4: "gave up", 17: "crashed (action 1)", -9: "SIGKILL"}


@dataclass
class Config:
    steps: int = 20_000  # chaos-phase vector steps
    duration: float | None = None  # or: chaos for this many seconds (whichever first)
    seed: int = 0
    num_envs: int = 16
    local_workers: int = 2
    cli_workers: int = 4  # started at once, racing the local workers for the envs
    cli_envs: tuple = (2, 3, 4)  # --num-envs of each CLI worker: a seeded choice
    autoreset: str = "NextStep"
    step_timeout: float = 1.0
    heartbeat: float = 1.0
    gap: tuple = (40, 160)  # vector steps between chaos events (seeded)
    kinds: tuple = KINDS
    require_all_kinds: bool = False  # go on (at most extra_time s) until every kind happened
    extra_time: float = 20.0
    latency_slack: float = 1.5  # a step may take step_timeout + this (loaded 2-core machines)
    heartbeat_slack: float = 1.5  # detection within 1.5 heartbeats + this
    recovery_timeout: float = 30.0
    clean_steps: int = 50  # steps without any lost env required at the end
    topup_after: float = 2.0  # envs without a worker this long: start one more CLI worker
    close_timeout: float = 20.0
    keep_logs: bool = False  # keep the timeline and worker logs of a run that passed
    min_events: dict = field(default_factory=dict)  # kind -> go on (at most extra_time s) until this many
    # link cuts (run_with_link_cuts sets topology: the soak then runs inside namespace T)
    topology: dict | None = None  # tests.netns.Topology.to_dict()
    pc_workers: int = 1  # CLI workers in namespace A, the targets of link cuts
    cut_secs: tuple = (1.0, 4.0)  # how long a link stays cut (seeded)
    cut_recovery_bound: float = 8.0  # A's envs served again within this of the link's return
    pc_retry_timeout: float = 10.0  # A's workers: --retry-timeout (longer than a cut and the redial after it)


@dataclass
class WProc:
    popen: subprocess.Popen
    kind: str  # "cli" or "local"
    name: str
    log: Path | None = None
    stopped: bool = False
    cont_at: float | None = None  # SIGCONT at this time (plain sleep)
    cont_after: "WProc | None" = None  # SIGCONT once this replacement serves (sleep-pause)
    cont_deadline: float = 0.0
    doomed: str | None = None  # why we expect it to die: "sigkill", "crash"
    code: int | None = None
    served: bool = False  # it served envs at some point (tracked for workers in A)
    serving_at_close: bool = True  # (workers in A) it served envs when close() began
    exited_in_run: bool = False  # it ended before close() began


class Hang(BaseException):
    """Raised in the main thread by the watchdog when a call does not return."""


class Tracker:
    """Checks every env's result against its counter; keeps the counts."""

    def __init__(self, n: int, same_step: bool) -> None:
        self.n, self.same = n, same_step
        self.prev = np.zeros((n, 2))
        self.last = np.zeros(n, np.int64)  # current env object's step counter (last seen)
        self.has = np.ones(n, bool)  # the slot has a current env object (not lost)
        self.ended = np.zeros(n, bool)  # the last step ended the episode (NEXT_STEP)
        self.was_lost = np.zeros(n, bool)
        self.real = np.zeros(n, np.int64)  # real env steps returned by the trainer
        self.terms = np.zeros(n, np.int64)
        self.obj_sum = np.zeros(n, np.int64)  # counters of finished env objects
        self.cut = np.zeros(n, np.int64)  # steps of episodes that did not terminate (reset, lost)
        self.term_prev = np.zeros(n, bool)  # the last result terminated (NEXT_STEP: obs is the final one)
        self.objects = np.zeros(n, np.int64)
        self.takeovers = np.zeros(n, np.int64)
        self.lost_steps = np.zeros(n, np.int64)
        self.outages = np.zeros(n, np.int64)
        self.lost_since: list = [None] * n  # (step, time) the outage began
        self.outage_steps: list[int] = []
        self.outage_secs: list[float] = []
        self.steps_with_lost = 0
        self.violations: list[str] = []
        self.n_violations = 0

    def bad(self, k: int, slots: np.ndarray, what: str, obs=None) -> None:
        for i in np.flatnonzero(slots):
            self.n_violations += 1
            if len(self.violations) < 20:
                got = "" if obs is None else f" (obs {self.prev[i].tolist()} -> {obs[i].tolist()})"
                self.violations.append(f"step {k}, env {i}: {what}{got}")

    def on_reset(self, obs: np.ndarray, infos: dict) -> None:
        self.bad(0, ~np.all(obs == 0, axis=1), "first reset: expected [0, 0]", obs)
        self.bad(0, _mask(infos, "worker_lost", self.n), "first reset: flagged lost")
        self.prev = obs.copy()
        self.objects += 1

    def _partial(self) -> np.ndarray:
        """Steps of each env's current episode (by its own counter) if it did not terminate."""
        return np.where(self.term_prev, 0, self.prev[:, 0]).astype(np.int64)

    def _finish(self, slots: np.ndarray) -> None:
        """The current env objects of ``slots`` are gone: bank their counters."""
        self.obj_sum[slots] += self.last[slots]
        self.cut[slots] += self._partial()[slots]  # their last episode ended without terminating
        self.has[slots] = False

    def _begin(self, k: int, now: float, slots: np.ndarray) -> None:
        self._finish(slots & self.has)
        self.has[slots] = True
        self.last[slots] = 0
        self.objects += slots
        self.takeovers += slots
        for i in np.flatnonzero(slots):
            if self.lost_since[i] is not None:
                k0, t0 = self.lost_since[i]
                self.outage_steps.append(k - k0)
                self.outage_secs.append(now - t0)
                self.lost_since[i] = None

    def on_step(self, k: int, now: float, obs, rew, term, trunc, infos) -> None:
        n = self.n
        if not (obs.shape == (n, 2) and rew.shape == term.shape == trunc.shape == (n,)):
            self.bad(k, np.ones(n, bool), f"not a full batch: {obs.shape} {rew.shape}")
            return
        lost = _mask(infos, "worker_lost", n)
        if lost.any():
            self.steps_with_lost += 1
            bad_flag = lost & ~_values(infos, "worker_lost", n)
            self.bad(k, bad_flag, "worker_lost present but not True")
        held = np.all(obs == self.prev, axis=1)
        self.bad(k, lost & ~(trunc & ~term & (rew == 0) & held),
                 "lost env: expected its last obs, truncated, reward 0", obs)
        exp = self.prev + 1  # a real step: both counters advance by one
        exp[:, 1] = self.last + 1
        if self.same:
            final_lost = _mask(infos.get("final_info", {}), "worker_lost", n)
            fmask = _mask(infos, "final_obs", n)
            take = ~lost & final_lost
            real = ~lost & ~take
            fobs = infos.get("final_obs")
            fin_prev = np.zeros(n, bool)  # final_obs equals the previous obs
            fin_exp = np.zeros(n, bool)  # final_obs equals the expected step result
            for i in np.flatnonzero(fmask):
                fin_prev[i] = np.array_equal(fobs[i], self.prev[i])
                fin_exp[i] = np.array_equal(fobs[i], exp[i])
            self.bad(k, lost & ~(fmask & fin_prev & final_lost), "lost env: final_obs/final_info", obs)
            self.bad(k, take & ~(np.all(obs == 0, axis=1) & (rew == 0) & ~term & trunc & fmask & fin_prev),
                     "takeover (SAME_STEP): expected [0, 0], truncated, final_obs = last obs", obs)
            done = term | trunc
            cont = real & ~done
            self.bad(k, cont & ~(np.all(obs == exp, axis=1) & (rew == 1) & (exp[:, 0] < LENGTH) & ~fmask),
                     "real step: counters must advance by one", obs)
            reset_obs = np.all(obs == np.stack([np.zeros(n), exp[:, 1]], axis=1), axis=1)
            self.bad(k, real & done & ~(term & ~trunc & (exp[:, 0] == LENGTH) & fmask & fin_exp & reset_obs
                                        & (rew == 1)),
                     "real step ending an episode: final_obs / reset obs / terminated", obs)
            self.real += real
            self.terms += real & term
            self.last[real] = exp[real, 1]
            new = take
        else:
            real = ~lost & ~self.ended
            step_ok = np.all(obs == exp, axis=1) & (rew == 1) & ~trunc & (term == (exp[:, 0] >= LENGTH))
            self.bad(k, real & ~step_ok, "real step: counters must advance by one", obs)
            self.real += real
            self.terms += real & term
            self.last[real] = obs[real, 1]
            reset = ~lost & self.ended  # the step after an episode's end: a reset
            new = reset & (obs[:, 1] == 0) & (~self.has | (self.last != 0))
            reset_ok = (obs[:, 0] == 0) & (rew == 0) & ~term & ~trunc & (new | (self.has & (obs[:, 1] == self.last)))
            self.bad(k, reset & ~reset_ok, "reset step: expected [0, same counter] or a takeover [0, 0]", obs)
            self.ended = term | trunc
        # outages: an env object ends when its env is flagged lost
        start = lost & ~self.was_lost
        self.outages += start
        for i in np.flatnonzero(start):
            self.lost_since[i] = (k, now)
        self._finish(lost & self.has)
        if self.same:  # a takeover with no lost step before it (worker replaced between steps)
            direct = new & ~self.was_lost
            self.outages += direct
            for i in np.flatnonzero(direct):
                self.lost_since[i] = (k, now)
        self._begin(k, now, new)
        self.lost_steps += lost
        self.was_lost = lost
        self.term_prev = term & ~lost if not self.same else np.zeros(n, bool)
        self.prev = obs.copy()

    def on_midreset(self, k: int, now: float, obs, infos, mask) -> None:
        """``reset()`` in the middle of the run (wait mode: envs without a worker are flagged)."""
        n = self.n
        asked = np.ones(n, bool) if mask is None else np.asarray(mask, bool)
        if obs.shape != (n, 2):
            self.bad(k, np.ones(n, bool), f"reset: not a full batch: {obs.shape}")
            return
        lost = _mask(infos, "worker_lost", n)
        held = np.all(obs == self.prev, axis=1)
        same_obj = self.has & (obs[:, 0] == 0) & (obs[:, 1] == self.last)
        new = ~lost & np.all(obs == 0, axis=1) & ~same_obj  # a new worker's envs, reset
        self.bad(k, lost & ~asked, "reset: an env not asked to reset is flagged lost")
        self.bad(k, lost & ~held, "reset: a lost env must keep its last obs", obs)
        self.bad(k, asked & ~lost & ~(same_obj | new), "reset: expected [0, same counter] or a new env [0, 0]", obs)
        self.bad(k, ~asked & ~held, "reset: an env not asked to reset must keep its obs", obs)
        reset_same = asked & ~lost & same_obj
        self.cut[reset_same] += self._partial()[reset_same]  # episodes cut short by the reset
        start = lost & ~self.was_lost
        self.outages += start
        for i in np.flatnonzero(start):
            self.lost_since[i] = (k, now)
        self._finish(lost & self.has)
        direct = new & ~self.was_lost  # replaced between two calls, seen at this reset
        self.outages += direct
        for i in np.flatnonzero(direct):
            self.lost_since[i] = (k, now)
        self._begin(k, now, new)
        self.lost_steps += lost
        self.was_lost = np.where(asked, lost, self.was_lost)
        self.ended = np.where(asked | new, False, self.ended)  # reset envs begin an episode
        self.term_prev = np.where(asked | new, False, self.term_prev)
        self.prev = obs.copy()

    def totals(self) -> dict:
        counters = self.obj_sum + np.where(self.has, self.last, 0)
        cut = self.cut + np.where(self.has, self._partial(), 0)
        whole = counters - cut  # steps of terminated episodes, by the envs' own counters
        return {
            "real": self.real, "counters": counters, "terms": int(self.terms.sum()),
            "implied_terms": int((whole // LENGTH).sum()),
            "ragged": np.flatnonzero(whole % LENGTH),  # not whole episodes: a step lost or doubled
            "slot_terms_ok": bool(np.all(whole // LENGTH == self.terms)),
        }


def _mask(infos: dict, key: str, n: int) -> np.ndarray:
    m = infos.get("_" + key)
    return np.zeros(n, bool) if m is None else np.asarray(m, bool)


def _values(infos: dict, key: str, n: int) -> np.ndarray:
    v = infos.get(key)
    return np.zeros(n, bool) if v is None else np.asarray(v == True, bool)  # noqa: E712


@dataclass
class Result:
    mode: str
    figures: dict = field(default_factory=dict)
    failures: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def log_events(path: Path, offset: int = 0) -> list[tuple[float, str]]:
    """(wall time, "logger LEVEL message") of the lines a CLI worker logged past ``offset``."""
    out = []
    with open(path, errors="replace") as fh:
        fh.seek(offset)
        for line in fh:
            try:
                t = time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S")) + int(line[20:23]) / 1000
            except ValueError:
                continue
            out.append((t, line[24:].strip()))
    return out


class LinkCut(threading.Thread):
    """One link-cut event, in its own thread (the loop may be blocked in a step).

    Cuts A's link (``silent``: nftables drops every frame at the bridge;
    ``link-down``: A's interface down), keeps it cut for ``hold`` s and restores
    it. Meanwhile it reads the trainer's slot table every 10 ms: ``t_detect``
    when none of A's connections at the cut serves any more (the trainer
    noticed), ``back[name]`` when one of A's workers serves again on a new
    connection, ``t_back`` when all do. A worker of A that dialed in again but
    was refused for want of envs (others took them) is ``waiting``. It ends when
    each of A's workers is back or waiting, or ``cut_recovery_bound`` s after the
    restore. A probe from A to T during the cut checks that the cut is real.
    """

    def __init__(self, soak: "Soak", seq: int, kind: str, during: str, hold: float,
                 names: set, cids: set, slots: list) -> None:
        super().__init__(daemon=True, name=f"link-cut-{seq}")
        self.topo, self.trainer = soak.topo, soak.envs._trainer
        self.seq, self.kind, self.during, self.hold = seq, kind, during, hold
        self.names, self.cids, self.slots = set(names), set(cids), list(slots)
        self.wait_after = soak.cfg.cut_recovery_bound + 0.5
        self.back: dict[str, float] = {}  # A's worker -> when it served again (new connection)
        self.waiting: set[str] = set()  # A's workers refused since the restore: "not needed"
        self.env = soak._env()
        self.t_cut = self.t_detect = self.t_restore = self.t_back = None
        self.wall_cut = self.wall_restore = None  # the same moments on the wall clock (A's logs)
        self.competitors: str | None = None  # what could take A's envs meanwhile (None: a quiet moment)
        self.logs: dict = {}  # A's worker name -> (log path, its size at the cut)
        self.slots_by_worker: dict = {}  # A's worker name -> its envs at the cut
        self.probe: str | None = None
        self.error: str | None = None
        self.detected = threading.Event()
        self.finished = threading.Event()
        self.abort = threading.Event()  # interrupted: restore the link now, stop watching

    def _poll(self) -> None:
        try:
            layout = self.trainer.layout()
        except Exception:  # noqa: BLE001 - the trainer is closing
            return
        now = time.monotonic()
        cids = {w.cid for _, _, w in layout if w is not None}
        if self.t_detect is None and not cids & self.cids:
            self.t_detect = now
            self.detected.set()
        if self.t_detect is None or self.t_restore is None:
            return
        for w in {w for _, _, w in layout if w is not None and w.cid not in self.cids and w.name in self.names}:
            self.back.setdefault(w.name, now)
        if self.t_back is None and self.names <= set(self.back):
            self.t_back = now

    def _check_waiting(self) -> None:
        for name in self.names - set(self.back) - self.waiting:
            path, offset = self.logs[name]
            if any(t >= self.wall_restore and "refused for now (not needed" in m for t, m in log_events(path, offset)):
                self.waiting.add(name)

    def settled(self) -> bool:
        return self.t_detect is not None and self.names <= set(self.back) | self.waiting

    def run(self) -> None:
        from tests import netns

        probe = None
        try:
            try:
                self.topo.cut(self.kind, PC)
            finally:
                self.t_cut, self.wall_cut = time.monotonic(), time.time()
            probe = subprocess.Popen(  # A -> T must fail now (a refusal would prove a path)
                self.topo.exec_argv(PC, [sys.executable, "-I", "-c", netns._PROBE, self.topo.addr("t"),
                                         str(netns.PROBE_PORT), "0.5"]),
                env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                text=True)
            while time.monotonic() < self.t_cut + self.hold and not self.abort.is_set():
                self._poll()
                time.sleep(0.01)
        except Exception:  # noqa: BLE001 - reported as a failure of the run
            self.error = traceback.format_exc(limit=4)
        finally:
            try:
                self.topo.restore(self.kind, PC)
            except Exception:  # noqa: BLE001
                self.error = (self.error or "") + traceback.format_exc(limit=4)
            self.t_restore, self.wall_restore = time.monotonic(), time.time()
            try:
                deadline = self.t_restore + self.wait_after
                polls = 0
                while time.monotonic() < deadline and not self.settled() and not self.abort.is_set():
                    self._poll()
                    polls += 1
                    if polls % 20 == 0:  # A's logs, every 0.2 s
                        self._check_waiting()
                    time.sleep(0.01)
                self._check_waiting()
                if probe is not None:
                    try:
                        self.probe = probe.communicate(timeout=15)[0].strip() or "no answer"
                    except subprocess.TimeoutExpired:
                        probe.kill()
                        self.probe = "probe hung: " + (probe.communicate()[0] or "").strip()
            finally:
                self.detected.set()
                self.finished.set()

    def record(self) -> dict:
        def since(t, t0):
            return None if t is None or t0 is None else round(t - t0, 3)

        return {"seq": self.seq, "kind": self.kind, "during": self.during, "hold": round(self.hold, 2),
                "workers": sorted(self.names), "slots": self.slots,
                "detect_s": since(self.t_detect, self.t_cut), "back_s": since(self.t_back, self.t_restore),
                "back": {n: since(t, self.t_restore) for n, t in sorted(self.back.items())},
                "waiting": sorted(self.waiting - set(self.back)), "slots_by_worker": self.slots_by_worker,
                "detected_after_restore": self.t_detect is not None and self.t_restore is not None
                and self.t_detect > self.t_restore,
                "probe": self.probe, "error": self.error}


class Soak:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.mode = AutoresetMode(cfg.autoreset)
        self.sched = random.Random(cfg.seed)  # kinds and gaps: fully reproducible
        self.pick = random.Random(cfg.seed + 1_000_003)  # targets: depend on timing too
        self.topo = None
        if cfg.topology is not None:
            from tests.netns import Topology

            self.topo = Topology.from_dict(cfg.topology)
        self.kinds = [k for k in cfg.kinds if (POSIX or not k.startswith("sleep"))
                      and (k != LINK_CUT or self.topo is not None)]
        self.token: str | None = None  # the trainer's (link cuts: it listens on T's bridge address)
        self.url: str | None = None
        self.pcs: list[WProc] = []  # the workers in namespace A
        self.cut: LinkCut | None = None  # the link cut in progress
        self.cuts: list[dict] = []  # the link cuts done
        self.cut_rng = random.Random(cfg.seed + 2_000_003)  # each cut's kind, hold, when: seeded
        self.cut_plan: list[tuple[str, str, float]] = []
        self.closing = False
        self.queue: list[str] = []
        self.tag = uuid.uuid4().hex
        self.tmp = Path(tempfile.mkdtemp(prefix="ws_gym_soak_"))
        self.procs: list[WProc] = []
        self.cli_seq = 0
        self.last_cli_start = float("-inf")
        self.replacements: list[int] = []  # steps at which to start a CLI worker
        self.holes_since: float | None = None
        self.failures: list[str] = []
        self.events: dict[str, int] = {k: 0 for k in ALL_KINDS}
        self.started = {"cli": 0, "cli-replacement": 0, "cli-topup": 0, "local": 0, "local-restart": 0,
                        "pc": 0, "pc-restart": 0}
        self.latencies: list[float] = []
        self.detect: list[float] = []  # heartbeat detection times (sleep-pause)
        self.cids: set[int] = set()
        self.k = 0  # vector steps so far
        self.busy_since: float | None = None
        self.hung = False
        self.envs = None
        self.t0 = time.monotonic()
        self.prev_done: float | None = None
        self.pauses = self.resets = 0
        self.time_all = self.time_served = 0.0
        self.timeline: list[str] = []
        self.last_holes: list = []

    def note(self, text: str) -> None:
        self.timeline.append(f"{time.monotonic() - self.t0:8.3f} s  step {self.k:6d}  {text}")

    # -- processes ------------------------------------------------------------

    def _env(self) -> dict:
        env = dict(os.environ, PYTHONPATH=str(ROOT), **{TAG_VAR: self.tag})
        if self.token:
            env["WS_GYM_TOKEN"] = self.token  # in the environment, out of ps
        return env

    def start_cli(self, why: str, num_envs: int | None = None) -> WProc:
        n = num_envs or self.pick.choice(self.cfg.cli_envs)
        name = f"cli-{self.cli_seq}"
        self.cli_seq += 1
        log = self.tmp / f"{name}.log"
        with open(log, "w") as fh:
            popen = subprocess.Popen(
                [sys.executable, "-m", "ws_gym.worker", "--url", self.url, "--env", COUNTER,
                 "--num-envs", str(n), "--name", name, "--retry-timeout", "2", "--log-level", "INFO"],
                cwd=ROOT, env=self._env(), stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        p = WProc(popen, "cli", name, log)
        self.procs.append(p)
        self.started[why] += 1
        self.note(f"start {name} (pid {popen.pid}, {n} envs): {why}")
        self.last_cli_start = time.monotonic()
        return p

    def start_pc(self, why: str) -> WProc:
        """A CLI worker on PC A (its own network namespace), dialing T's bridge address."""
        n = self.pick.choice(self.cfg.cli_envs)
        name = f"pc{PC.upper()}-{len(self.pcs)}"
        log = self.tmp / f"{name}.log"
        with open(log, "w") as fh:
            popen = subprocess.Popen(
                self.topo.exec_argv(PC, [
                    sys.executable, "-m", "ws_gym.worker", "--url", self.url, "--env", COUNTER,
                    "--num-envs", str(n), "--name", name, "--retry-timeout", f"{self.cfg.pc_retry_timeout:g}",
                    "--log-level", "DEBUG"]),  # a refusal repeated with the same reason is logged at DEBUG
                cwd=ROOT, env=self._env(), stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        p = WProc(popen, "pc", name, log)
        self.procs.append(p)
        self.pcs.append(p)
        self.started[why] += 1
        self.note(f"start {name} in namespace {self.topo.ns(PC)} (pid {popen.pid}, {n} envs): {why}")
        return p

    def _listen_in_t(self) -> tuple[str, int]:
        """T's bridge address and a free port on it: nothing else runs in T, so the
        port stays free until the trainer binds it (the workers in A dial it first)."""
        host = self.topo.addr("t")
        with socket.socket() as s:
            try:
                s.bind((host, 0))
            except OSError as exc:
                raise RuntimeError(f"{host} is not an address of this namespace ({exc}): the soak with link "
                                   f"cuts runs inside namespace {self.topo.ns('t')} (run_with_link_cuts)")
            return host, s.getsockname()[1]

    def _prestart_pcs(self, timeout: float = 20.0) -> None:
        """Start A's workers before the trainer listens and wait until each is
        retrying: a waiting PC dials in within ~0.1 s of the trainer's start,
        before the local workers have imported ws_gym, so A serves from the start."""
        for _ in range(self.cfg.pc_workers):
            self.start_pc("pc")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(p.popen.poll() is not None or "waiting for the trainer" in p.log.read_text(errors="replace")
                   for p in self.pcs):
                return
            time.sleep(0.01)

    def _watch_locals(self) -> None:
        local = self.envs._trainer.local
        if local is None:
            return
        for i, popen in enumerate(local.procs):
            self.procs.append(WProc(popen, "local", f"local-{i}"))
            self.started["local"] += 1
        spawn = local._spawn

        def recorded(cmd):  # the trainer restarts a crashed local worker
            popen = spawn(cmd)
            self.procs.append(WProc(popen, "local", cmd[cmd.index("--name") + 1]))
            self.started["local-restart"] += 1
            self.note(f"trainer restarts {self.procs[-1].name} (pid {popen.pid})")
            return popen

        local._spawn = recorded

    def reap(self) -> None:
        for p in self.procs:
            if p.code is None and p.popen.poll() is not None:
                p.code = p.popen.returncode
                p.exited_in_run = not self.closing
                self.note(f"{p.name} (pid {p.popen.pid}) exited with {p.code}")

    def alive(self, p: WProc) -> bool:
        return p.code is None and p.popen.poll() is None

    def serving(self) -> tuple[list, dict]:
        """The trainer's slot layout and, per worker name, its env slots."""
        layout = self.envs._trainer.layout()
        holes = [(a, b) for a, b, w in layout if w is None]
        if holes != self.last_holes:
            self.last_holes = holes
            self.note("slots " + " ".join(f"{a}..{b - 1}:{w.name if w else '-'}" for a, b, w in layout))
        names: dict[str, list] = {}
        for a, b, w in layout:
            if w is not None:
                names.setdefault(w.name, []).extend(range(a, b))
                self.cids.add(w.cid)
        for p in self.pcs:
            if p.name in names:
                p.served = True
        return layout, names

    def current(self, name: str) -> WProc | None:
        """The live process behind a worker name (local names are reused by restarts)."""
        for p in reversed(self.procs):
            if p.name == name:
                return p if self.alive(p) else None
        return None

    # -- the run --------------------------------------------------------------

    def run(self) -> Result:
        cfg = self.cfg
        os.environ[TAG_VAR] = self.tag  # local workers inherit the trainer's environment
        watchdog = threading.Thread(target=self._watchdog, daemon=True)
        old_handler = None
        if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGUSR1"):
            old_handler = signal.signal(signal.SIGUSR1, self._on_hang)
        self.main_ident = threading.get_ident()
        t_start = time.monotonic()
        figures: dict = {"mode": self.mode.value, "seed": cfg.seed, "num_envs": cfg.num_envs}
        tracker = Tracker(cfg.num_envs, self.mode is AutoresetMode.SAME_STEP)
        self.tracker = tracker
        trainer_log = logging.FileHandler(self.tmp / "trainer.log")
        trainer_log.setFormatter(logging.Formatter("%(relativeCreated)9.0f ms %(levelname)s %(message)s"))
        ws_log = logging.getLogger("ws_gym")
        old_level = ws_log.level
        ws_log.addHandler(trainer_log)
        if ws_log.getEffectiveLevel() > logging.INFO:
            ws_log.setLevel(logging.INFO)
        try:
            where: dict = {"port": 0}
            if self.topo is not None:  # the trainer on T's bridge address, with a token, as on a LAN
                host, port = self._listen_in_t()
                self.token = secrets.token_urlsafe(16)
                self.url = f"ws://{host}:{port}/ws"
                where = {"host": host, "port": port, "token": self.token}
                self._prestart_pcs()
                for _ in range(cfg.cli_workers):  # they import while the trainer starts: they race
                    self.start_cli("cli")        # the local workers as they do on loopback
            self.envs = ws_gym.RemoteVectorEnv(
                cfg.num_envs, env_id=COUNTER, local_workers=cfg.local_workers,
                on_worker_lost="wait", step_timeout=cfg.step_timeout, heartbeat=cfg.heartbeat,
                autoreset_mode=self.mode, connect_timeout=60, **where,
            )
            self.url = self.envs.url
            self._watch_locals()
            if self.topo is not None:
                if self.envs.url != f"ws://{host}:{port}/ws":
                    raise RuntimeError(f"the trainer listens on {self.envs.url}, "
                                       f"A's workers dial ws://{host}:{port}/ws")
                t_wait = time.monotonic()
                while time.monotonic() - t_wait < 10 and not all(
                        p.name in self.serving()[1] or not self.alive(p) for p in self.pcs):
                    time.sleep(0.01)
                self.reap()
                _, names = self.serving()
                self.note("A's workers at the start: " + ", ".join(
                    f"{p.name} " + ("serving" if p.name in names else
                                    f"exited {p.code}" if p.code is not None else "not serving")
                    for p in self.pcs))
            else:
                for _ in range(cfg.cli_workers):
                    self.start_cli("cli")
            watchdog.start()
            obs, infos = self._call(lambda: self.envs.reset(seed=cfg.seed))
            tracker.on_reset(obs, infos)
            figures["setup_secs"] = time.monotonic() - t_start
            self.note("first reset done")
            self.serving()
            self.initial_cids = len(self.cids)
            t_chaos = time.monotonic()
            self.chaos(t_chaos)
            figures["chaos_steps"] = self.k
            figures["chaos_secs"] = time.monotonic() - t_chaos
            figures["recovery_secs"] = self.recover()
            figures["clean_steps"] = cfg.clean_steps
            figures["total_steps"] = self.k
            figures["step_secs"] = time.monotonic() - t_chaos
        except Hang:
            self.failures.append("hang: a call did not return (stacks dumped on stderr)")
        except KeyboardInterrupt:
            if self.cut is not None:
                self.cut.abort.set()
            raise
        except Exception as exc:  # noqa: BLE001 - any escape is a failure of the run
            self.failures.append(f"exception at step {self.k}: {type(exc).__name__}: {exc}\n"
                                 + "".join(traceback.format_exc(limit=8)))
        finally:
            try:
                figures.update(self.shutdown())
            except Hang:
                self.failures.append("hang while closing (stacks dumped on stderr)")
            self.busy_since = None
            self.done = True
            if old_handler is not None:
                signal.signal(signal.SIGUSR1, old_handler)
            os.environ.pop(TAG_VAR, None)
            ws_log.removeHandler(trainer_log)
            ws_log.setLevel(old_level)
            trainer_log.close()
        figures["wall_secs"] = time.monotonic() - t_start
        self.check(figures)
        timeline = self.tmp / "timeline.txt"
        timeline.write_text("\n".join(self.timeline) + "\n")
        figures["timeline"] = str(timeline)
        if not self.failures and not cfg.keep_logs:
            shutil.rmtree(self.tmp, ignore_errors=True)
            figures["timeline"] = None
        return Result(self.mode.value, figures, self.failures)

    def _call(self, fn):
        """Run one trainer call under the watchdog."""
        self.busy_since = time.monotonic()
        try:
            return fn()
        finally:
            self.busy_since = None

    def _watchdog(self) -> None:
        limit = self.cfg.step_timeout + 30.0
        while not getattr(self, "done", False):
            time.sleep(0.5)
            t = self.busy_since
            if t is not None and time.monotonic() - t > limit and not self.hung:
                self.hung = True
                print(f"soak: a call has not returned for {limit:.0f} s; all stacks:", file=REPORT, flush=True)
                faulthandler.dump_traceback(file=REPORT, all_threads=True)
                if hasattr(signal, "pthread_kill"):
                    signal.pthread_kill(self.main_ident, signal.SIGUSR1)

    def _on_hang(self, signum, frame) -> None:
        raise Hang()

    def step(self, actions: np.ndarray) -> None:
        t0 = time.monotonic()
        self.busy_since = t0
        try:
            obs, rew, term, trunc, infos = self.envs.step(actions)
        finally:
            self.busy_since = None
        now = time.monotonic()
        self.latencies.append(now - t0)
        self.k += 1
        self.tracker.on_step(self.k, now, obs, rew, term, trunc, infos)
        if self.prev_done is not None:  # env-time served, weighted by wall time
            dt = now - self.prev_done
            self.time_all += dt
            self.time_served += dt * (1.0 - self.tracker.was_lost.mean())
        self.prev_done = now
        if self.tracker.was_lost.any():
            time.sleep(0.001)  # a training loop's own work: no busy spin while envs are missing

    def chaos(self, t0: float) -> None:
        cfg = self.cfg
        next_event = self.sched.randint(*cfg.gap)
        seen_all_at = None
        need = {k: 1 for k in self.kinds} if cfg.require_all_kinds else {}
        for k, n in cfg.min_events.items():
            if k in self.kinds:
                need[k] = max(need.get(k, 0), n)
        while True:
            elapsed = time.monotonic() - t0
            if self.k >= cfg.steps or (cfg.duration is not None and elapsed >= cfg.duration):
                missing = [k for k, n in need.items() if self.events[k] < n]
                if not missing:
                    break
                if seen_all_at is None:
                    seen_all_at = time.monotonic()
                if time.monotonic() - seen_all_at > cfg.extra_time:
                    self.failures.append("chaos kinds applied fewer times than required: " + ", ".join(
                        f"{k} {self.events[k]} of {need[k]}" for k in missing))
                    break
            actions = np.zeros(cfg.num_envs, dtype=np.int64)
            self.tend()
            if self.k >= next_event:
                if self.event(actions):
                    next_event = self.k + self.sched.randint(*cfg.gap)
            self.step(actions)

    def tend(self) -> None:
        """Between steps: reap, wake sleepers, start replacements, top up missing envs."""
        self.reap()
        if self.cut is not None and self.cut.finished.is_set():
            self.end_cut()
        now = time.monotonic()
        layout, names = self.serving()
        for p in self.procs:
            if not p.stopped:
                continue
            wake = p.cont_at is not None and now >= p.cont_at
            if p.cont_after is not None:
                r = p.cont_after
                wake = r.name in names or now >= p.cont_deadline or not self.alive(r)
            if wake:
                self._cont(p)
        if self.cut is not None:  # A's envs are kept free for A: no new worker until it is back
            self.holes_since = None
            return
        if self.topo is not None and self.pcs and not any(self.alive(p) for p in self.pcs) and any(
                w is None for _, _, w in layout) and now - self.last_cli_start > self.cfg.topup_after:
            # A's worker was refused at the start (all envs taken): start it again where there is room
            self.start_pc("pc-restart")
            self.last_cli_start = now
        due = [s for s in self.replacements if s <= self.k]
        if due:
            self.replacements = [s for s in self.replacements if s > self.k]
            for _ in due:
                self.start_cli("cli-replacement")
        if any(w is None for _, _, w in layout):
            if self.holes_since is None:
                self.holes_since = now
            elif (now - self.holes_since > self.cfg.topup_after and now - self.last_cli_start > self.cfg.topup_after
                  and sum(self.alive(p) for p in self.procs if p.kind == "cli") < self.cfg.num_envs):
                self.start_cli("cli-topup")
        else:
            self.holes_since = None

    def _cont(self, p: WProc) -> None:
        if p.stopped:
            self.note(f"SIGCONT {p.name} (pid {p.popen.pid})")
            try:
                os.kill(p.popen.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
            p.stopped, p.cont_at, p.cont_after = False, None, None

    def event(self, actions: np.ndarray) -> bool:
        """Apply the first applicable chaos event of the queue; False if none applies now."""
        while len(self.queue) < len(self.kinds):
            cycle = list(self.kinds)
            self.sched.shuffle(cycle)
            self.queue.extend(cycle)
        layout, names = self.serving()
        serving = {}
        for name in sorted(names):
            p = self.current(name)
            if p is not None and not p.stopped and p.kind != "pc":  # A's workers: link cuts only
                serving[name] = p
        if 4 * sum(b - a for a, b, w in layout if w is None) > self.cfg.num_envs:
            return False  # a quarter of the envs are out already: wait (failures still overlap)
        for idx, kind in enumerate(self.queue):
            if self.cut is not None and kind not in CUT_OVERLAP:
                continue  # nothing that starts a worker while A's link is cut
            if self.apply(kind, actions, layout, serving):
                del self.queue[idx]
                self.events[kind] += 1
                return True
        return False

    def apply(self, kind: str, actions: np.ndarray, layout: list, serving: dict) -> bool:
        pick = self.pick
        if kind == LINK_CUT:
            return self.link_cut(layout)
        if kind in ("kill-cli", "kill-local"):
            want = kind[5:]
            victims = [p for p in serving.values() if p.kind == want]
            if not victims:
                return False
            p = pick.choice(victims)
            p.doomed = "sigkill"
            p.popen.kill()
            self.note(f"{kind}: SIGKILL {p.name} (pid {p.popen.pid})")
            if p.kind == "cli":
                self.replacements.append(self.k + pick.randint(0, 100))
            return True
        if kind in ("crash", "stall"):
            t = self.tracker
            slots = []
            for a, b, w in layout:
                if w is None or w.fresh or w.name not in serving:
                    continue
                slots += [i for i in range(a, b) if not t.was_lost[i] and (t.same or not t.ended[i])]
            if not slots:
                return False
            i = pick.choice(slots)
            actions[i] = 1 if kind == "crash" else 3
            owner = next(w for a, b, w in layout if w is not None and a <= i < b)
            self.note(f"{kind}: action {actions[i]} to env {i} of {owner.name}")
            if kind == "crash":
                p = serving[owner.name]
                p.doomed = "crash"
                if p.kind == "cli":
                    self.replacements.append(self.k + pick.randint(0, 100))
            return True
        if kind == "reset":
            mask = None
            if self.pick.random() < 0.5:
                mask = np.array([self.pick.random() < 0.5 for _ in range(self.cfg.num_envs)])
                mask[self.pick.randrange(self.cfg.num_envs)] = True
            self.reset(mask)
            return True
        if kind == "sleep":
            if not serving:
                return False
            p = serving[pick.choice(sorted(serving))]
            os.kill(p.popen.pid, signal.SIGSTOP)
            p.stopped, p.cont_at = True, time.monotonic() + pick.uniform(0.3, 3.0)
            self.note(f"sleep: SIGSTOP {p.name} (pid {p.popen.pid}) for {p.cont_at - time.monotonic():.2f} s")
            return True
        if kind == "sleep-pause":
            locals_ = sorted(n for n, p in serving.items() if p.kind == "local")
            if not serving:
                return False
            name = pick.choice(locals_) if locals_ and pick.random() < 0.75 else pick.choice(sorted(serving))
            p = serving[name]
            os.kill(p.popen.pid, signal.SIGSTOP)
            p.stopped = True
            self.note(f"sleep-pause: SIGSTOP {p.name} (pid {p.popen.pid}); the loop pauses")
            # the training loop pauses (an update, a checkpoint): only the heartbeat can notice
            bound = 1.5 * self.cfg.heartbeat + self.cfg.heartbeat_slack
            t0 = time.monotonic()
            while True:
                _, names = self.serving()
                took = time.monotonic() - t0
                if name not in names:
                    break
                if took > bound + 5:
                    break
                time.sleep(0.02)
            self.detect.append(took)
            self.note(f"sleep-pause: heartbeat noticed {name} after {took:.2f} s")
            if took > bound:
                self.failures.append(f"heartbeat: {name} (SIGSTOP) noticed after {took:.2f} s > {bound:.2f} s")
            # still paused, another PC takes the envs over: the loop resumes to find its
            # envs served by a new worker (their old episodes must still end, truncated)
            r = self.start_cli("cli-replacement", num_envs=max(self.cfg.cli_envs))
            t1 = time.monotonic()
            while r.name not in self.serving()[1] and self.alive(r) and time.monotonic() - t1 < 15.0:
                time.sleep(0.02)
            _, names = self.serving()
            self.note(f"sleep-pause: the loop resumes ({r.name} serving: {r.name in names})")
            p.cont_after, p.cont_deadline = r, time.monotonic() + 15.0
            self.pauses += 1
            if self.pauses % 2 == 1 and r.name in names:
                # resume with reset(reset_mask) that leaves out one env of the new worker:
                # reset() must not touch it (the worker takes over at a later step)
                n = self.cfg.num_envs
                left_out = self.pick.choice(names[r.name])
                mask = np.array([self.pick.random() < 0.5 for _ in range(n)])
                mask[left_out] = False
                if not mask.any():
                    mask[self.pick.choice([i for i in range(n) if i != left_out])] = True
                self.reset(mask)
            return True
        raise ValueError(kind)

    # -- link cuts -------------------------------------------------------------

    def link_cut(self, layout: list) -> bool:
        """Cut A's link (in a thread: the loop steps on, or pauses until the trainer
        notices), when all of A's workers serve. The cut's record notes whether the
        moment was quiet (see _cut_blocked): a worker starting or waiting for envs
        may take A's envs while A's link is down, which is allowed (A then dials in
        again and waits for room)."""
        if self.topo is None or self.cut is not None:
            return False
        _, names = self.serving()
        pcs = [p for p in self.pcs if self.alive(p)]
        if not pcs or any(p.name not in names for p in pcs):
            return False
        why = self._cut_blocked(layout, names)
        if not self.cut_plan:  # seeded; every two cuts: one of each kind, one stepping, one paused
            kinds, whens = ["silent", "link-down"], ["stepping", "paused"]
            self.cut_rng.shuffle(kinds)
            self.cut_rng.shuffle(whens)
            self.cut_plan = [(k, w, self.cut_rng.uniform(*self.cfg.cut_secs)) for k, w in zip(kinds, whens)]
        kind, during, hold = self.cut_plan.pop(0)
        pc_names = {p.name for p in pcs}
        cids = {w.cid for _, _, w in layout if w is not None and w.name in pc_names}
        slots = sorted(i for n in pc_names for i in names[n])
        seq = len(self.cuts) + 1
        self.cut = LinkCut(self, seq, kind, during, hold, pc_names, cids, slots)
        self.cut.competitors = why
        self.cut.slots_by_worker = {n: names[n] for n in sorted(pc_names)}
        self.cut.logs = {p.name: (p.log, p.log.stat().st_size) for p in pcs}
        self.note(f"link-cut {seq}: {kind} cut of {self.topo.ns(PC)} ({', '.join(sorted(pc_names))}: envs "
                  f"{slots}) for {hold:.2f} s, the loop {'steps on' if during == 'stepping' else 'pauses'}"
                  + (f" (not quiet: {why})" if why else ""))
        self.cut.start()
        if during == "paused":  # a long update: only the heartbeat can notice
            self.cut.detected.wait(1.5 * self.cfg.heartbeat + self.cfg.heartbeat_slack + 5)
            self.note(f"link-cut {seq}: the loop resumes")
        return True

    def _cut_blocked(self, layout: list, names: dict) -> str | None:
        """What could take A's envs while its link is down (None: nothing: a quiet moment)."""
        if self.replacements:
            return "a replacement due"
        if any(w is None for _, _, w in layout):
            return "envs without a worker"
        if any(p.stopped for p in self.procs):
            return "a stopped worker"
        if any(self.alive(p) and p.name not in names for p in self.procs):
            return "a worker starting or waiting for envs"
        local = self.envs._trainer.local
        if local is not None and any(proc.poll() is not None for proc in local.procs):
            return "a refused local worker"
        return None

    def end_cut(self) -> None:
        """A link cut is over (A back, or given up on): judge and record it.

        From the trainer's slot table (the LinkCut thread): when A's connections
        were dropped (detection) and when A's workers served again (recovery).
        From A's worker logs: when each noticed the dead trainer, when it dialed
        in again, and whether it was refused for want of envs (taken over)."""
        cut, cfg = self.cut, self.cfg
        cut.join(5)
        self.cut = None
        r = cut.record()
        r["quiet"] = cut.competitors is None
        self.cuts.append(r)
        what = f"link-cut {r['seq']} ({r['kind']}, loop {r['during']}, {r['hold']:.2f} s)"
        noticed, redial = [], []
        for name, (path, offset) in cut.logs.items():
            events = log_events(path, offset)
            lost = [t for t, m in events if m.startswith("ws_gym.worker WARNING connection lost")]
            conn = [t for t, m in events if cut.wall_restore and t >= cut.wall_restore and "connected to" in m]
            noticed.append(None if not lost else round(lost[0] - cut.wall_cut, 3))
            redial.append(None if not conn else round(conn[0] - cut.wall_restore, 3))
        r["worker_noticed_s"] = None if None in noticed else max(noticed, default=None)
        r["redial_s"] = None if None in redial else max(redial, default=None)
        self.note(f"link-cut {r['seq']}: trainer noticed after {r['detect_s']} s, A's workers after "
                  f"{r['worker_noticed_s']} s; link restored after {r['hold']} s; A dialed in again "
                  f"{r['redial_s']} s and served again {r['back_s']} s after that; probe A -> T during the cut: "
                  f"{r['probe']}")
        if r["error"]:
            self.failures.append(f"{what}: cutting or restoring the link failed (harness):\n{r['error']}")
        from tests.netns import Topology

        if r["probe"] is None or Topology.reached(r["probe"]):
            self.failures.append(f"{what}: A reached T during the cut (harness): probe {r['probe']}")
        if r["detect_s"] is None and r["back_s"] is None and r["hold"] < 1.5 * cfg.heartbeat + 0.2:
            # about as short as the trainer's limit: A's connections may have lived through it
            r["ridden_out"] = True
            self.note(f"link-cut {r['seq']}: ridden out (cut about as short as 1.5 heartbeats)")
            return
        bound = 1.5 * cfg.heartbeat + cfg.heartbeat_slack
        if r["detect_s"] is None:
            self.failures.append(f"{what}: the trainer never dropped A's connections")
        elif r["detect_s"] > bound:
            self.failures.append(f"{what}: the trainer noticed after {r['detect_s']:.2f} s > "
                                 f"1.5 x heartbeat + {cfg.heartbeat_slack:g} s = {bound:.2f} s")
        wbound = cfg.heartbeat + cfg.heartbeat_slack
        if r["worker_noticed_s"] is not None and r["worker_noticed_s"] > wbound:
            self.failures.append(f"{what}: A's worker noticed the dead trainer after {r['worker_noticed_s']:.2f} s "
                                 f"> heartbeat + {cfg.heartbeat_slack:g} s = {wbound:.2f} s")
        if r["redial_s"] is None or r["redial_s"] > cfg.cut_recovery_bound:
            self.failures.append(f"{what}: A's workers did not all dial in again within {cfg.cut_recovery_bound:g} s "
                                 f"of the link's return (after {redial} s)")
        if r["back_s"] is not None:
            if r["back_s"] > cfg.cut_recovery_bound:
                self.failures.append(f"{what}: A's envs served again by A {r['back_s']:.2f} s after the link's "
                                     f"return > {cfg.cut_recovery_bound:g} s")
            return
        # some of A's workers are not back: allowed only for one that dialed in again and was
        # refused "not needed" because other workers took its envs (free envs go to the next
        # worker), and that still runs, waiting for room
        layout, names = self.serving()
        owners = {i: w.name for a, b, w in layout if w is not None for i in range(a, b)}
        late = {n: t for n, t in r["back"].items() if t > cfg.cut_recovery_bound}
        stranded = []
        taken = {}
        for name in sorted(set(r["workers"]) - set(r["back"])):
            p = self.current(name)
            held = {owners.get(i) for i in r["slots_by_worker"].get(name, [])} - {None} - set(r["workers"])
            if name in r["waiting"] and p is not None:  # refused when every env was served: it waits
                taken[name] = sorted(held) or ["nobody now: freed again"]
            else:
                now_by = sorted({owners.get(i) or "-" for i in r["slots_by_worker"].get(name, [])})
                stranded.append(f"{name}: {'alive' if p is not None else 'exited'}, "
                                f"{'refused (not needed)' if name in r['waiting'] else 'not refused'}, "
                                f"its envs now {now_by}")
        if taken:
            r["taken_over"] = sorted({o for v in taken.values() for o in v})
            self.note(f"link-cut {r['seq']}: envs of {sorted(taken)} taken over by {r['taken_over']}; they dialed "
                      f"in again and wait for envs (refused: not needed)")
        if late:
            self.failures.append(f"{what}: A's workers served again later than {cfg.cut_recovery_bound:g} s after "
                                 f"the link's return: {late}")
        if stranded:
            self.failures.append(f"{what}: A's workers not served again within {cfg.cut_recovery_bound:g} s of "
                                 f"the link's return, nor waiting for envs others took: " + "; ".join(stranded))

    def reset(self, mask) -> None:
        """The training loop calls reset() (with a reset_mask or not) mid-run."""
        self.note(f"reset: reset(seed=..., mask={None if mask is None else mask.astype(int).tolist()})")
        seed = self.pick.randrange(1 << 30)
        options = None if mask is None else {"reset_mask": mask}
        t0 = time.monotonic()
        obs, infos = self._call(lambda: self.envs.reset(seed=seed, options=options))
        now = time.monotonic()
        self.latencies.append(now - t0)
        self.resets += 1
        self.tracker.on_midreset(self.k, now, obs, infos, mask)

    def recover(self) -> float:
        """Chaos over: wake everyone, step until every env is served and steps cleanly."""
        cfg = self.cfg
        for p in self.procs:
            self._cont(p)
        t0 = time.monotonic()
        clean = 0
        zeros = np.zeros(cfg.num_envs, dtype=np.int64)
        recovered_at = None
        while clean < cfg.clean_steps:
            if time.monotonic() - t0 > cfg.recovery_timeout:
                layout, _ = self.serving()
                holes = [f"{a}..{b - 1}" for a, b, w in layout if w is None]
                self.failures.append(
                    f"env slots not served again {cfg.recovery_timeout:g} s after the chaos stopped: "
                    f"{holes or 'all have a worker, but steps still flag lost envs'}")
                return time.monotonic() - t0
            self.tend()
            self.step(zeros)
            if self.tracker.was_lost.any():
                clean, recovered_at = 0, None
            else:
                if recovered_at is None:
                    recovered_at = time.monotonic() - t0
                clean += 1
        return recovered_at or 0.0

    def shutdown(self) -> dict:
        cfg = self.cfg
        out: dict = {}
        if self.cut is not None:  # never close with A's link cut: A would not hear the close
            self.cut.finished.wait(max(cfg.cut_secs) + cfg.cut_recovery_bound + 15)
            self.end_cut()
        self.reap()
        self.closing = True
        if self.envs is not None:
            try:
                _, names = self.serving()
                for p in self.pcs:
                    p.serving_at_close = p.name in names
            except Exception:  # noqa: BLE001 - no trainer to ask
                pass
        for p in self.procs:
            self._cont(p)
        t0 = time.monotonic()
        if self.envs is not None:
            self._call(self.envs.close)
        out["close_secs"] = time.monotonic() - t0
        # every process must end by itself: closed by the trainer, refused, or gave up waiting
        self.note(f"close() returned after {out['close_secs']:.2f} s")
        deadline = time.monotonic() + cfg.close_timeout
        while any(p.popen.poll() is None for p in self.procs) and time.monotonic() < deadline:
            time.sleep(0.05)
        out["exit_wait_secs"] = time.monotonic() - t0 - out["close_secs"]
        self.reap()
        stragglers = [p for p in self.procs if p.popen.poll() is None]
        for p in stragglers:
            p.popen.kill()
            p.popen.wait(10)
        self.reap()
        out["stragglers"] = [f"{p.name} (pid {p.popen.pid})" for p in stragglers]
        out["tagged"] = tagged_processes(self.tag)
        out["unreaped"] = [p.name for p in self.procs if p.popen.returncode is None]
        return out

    # -- verdict --------------------------------------------------------------

    def check(self, f: dict) -> None:
        cfg, t = self.cfg, self.tracker
        lat = self.latencies or [0.0]
        f["steps"] = self.k
        f["env_steps"] = int(t.real.sum())
        f["latency_max"] = max(lat)
        f["latency_median"] = statistics.median(lat)
        f["latency_p99"] = float(np.percentile(lat, 99))
        f["latency_bound"] = cfg.step_timeout + cfg.latency_slack
        f["slow_steps"] = sum(x > cfg.step_timeout for x in lat)
        f["events"] = dict(self.events)
        f["resets"] = self.resets
        f["started"] = dict(self.started)
        codes: dict[str, int] = {}
        unexpected = []
        for p in self.procs:
            code = p.popen.returncode
            key = f"{p.kind} {code} ({EXPECTED_EXITS.get(code, 'UNEXPECTED')})"
            codes[key] = codes.get(key, 0) + 1
            if code not in EXPECTED_EXITS or (code == -9 and p.doomed != "sigkill" and p.name not in
                                               [s.split()[0] for s in f.get("stragglers", [])]):
                unexpected.append(p)
        f["exit_codes"] = dict(sorted(codes.items()))
        # A's workers: the targets of link cuts never end before close() (but one refused at its
        # start, before it served), and end with 0 after it
        f["pc_workers"] = [{"name": p.name, "pid": p.popen.pid, "code": p.popen.returncode, "served": p.served,
                            "exited_in_run": p.exited_in_run, "serving_at_close": p.serving_at_close}
                           for p in self.pcs]
        # after close(): 0, or 4 (gave up) for one that was waiting for envs (others held them)
        pc_bad = [p for p in self.pcs if (p.exited_in_run and not (p.code == 2 and not p.served))
                  or (not p.exited_in_run and p.popen.returncode != 0
                      and not (p.popen.returncode == 4 and not p.serving_at_close))]
        f["pc_unexpected_exits"] = [f"{p.name} (pid {p.popen.pid}) exited with {p.popen.returncode} "
                                    f"{'before close()' if p.exited_in_run else 'after close()'}" for p in pc_bad]
        f["link_cuts"] = list(self.cuts)
        f["link_cuts_on"] = self.topo is not None
        unexpected = [p for p in unexpected if p not in pc_bad]  # reported below, as A's
        f["crashed"] = sum(p.popen.returncode == 17 for p in self.procs)
        f["connections"] = len(self.cids)
        f["reconnections"] = len(self.cids) - getattr(self, "initial_cids", len(self.cids))
        f["outages"] = int(t.outages.sum())
        f["takeovers"] = int(t.takeovers.sum())
        f["env_objects"] = int(t.objects.sum())
        f["lost_env_steps"] = int(t.lost_steps.sum())
        f["steps_with_lost"] = t.steps_with_lost
        f["served_share"] = self.time_served / self.time_all if self.time_all else 1.0
        f["outage_max_steps"] = max(t.outage_steps, default=0)
        f["outage_max_secs"] = max(t.outage_secs, default=0.0)
        f["heartbeat_detect_max"] = max(self.detect, default=float("nan"))
        f["violations"] = t.n_violations
        tot = t.totals()
        mismatch = np.flatnonzero(tot["real"] != tot["counters"])
        f["counter_sum"] = int(tot["counters"].sum())
        f["terminated"] = tot["terms"]
        f["terminated_implied"] = tot["implied_terms"]
        f["slots_mismatched"] = len(mismatch)
        f["slots_out_at_end"] = int(t.was_lost.sum())
        fail = self.failures
        if t.n_violations:
            fail.append(f"{t.n_violations} results disagree with the env counters; first ones:\n  "
                        + "\n  ".join(t.violations))
        if len(mismatch):
            fail.append("steps returned != env counters for slots " + ", ".join(
                f"{i}: {tot['real'][i]} vs {tot['counters'][i]}" for i in mismatch[:8]))
        if tot["terms"] != tot["implied_terms"] or not tot["slot_terms_ok"]:
            fail.append(f"terminated episodes {tot['terms']} != {tot['implied_terms']} implied by the counters")
        if len(tot["ragged"]):
            fail.append(f"env slots whose counters do not add up to whole episodes: {tot['ragged'].tolist()}")
        if self.latencies and f["latency_max"] > f["latency_bound"]:
            fail.append(f"a step took {f['latency_max']:.2f} s > step_timeout + slack = {f['latency_bound']:.2f} s")
        if f.get("stragglers"):
            fail.append(f"worker processes still running {cfg.close_timeout:g} s after close(): {f['stragglers']}")
        if f.get("tagged"):
            fail.append(f"leaked processes (this run's tag in their environment): {f['tagged']}")
        if f.get("unreaped"):
            fail.append(f"processes not reaped: {f['unreaped']}")
        if unexpected:
            lines = []
            for p in unexpected[:4]:
                tail = p.log.read_text(errors="replace").strip().splitlines()[-6:] if p.log else []
                lines.append(f"{p.name} (pid {p.popen.pid}) exited with {p.popen.returncode}"
                             + "".join(f"\n    | {x}" for x in tail))
            fail.append("workers with an unexpected exit code:\n  " + "\n  ".join(lines))
        for p in pc_bad[:4]:
            tail = p.log.read_text(errors="replace").strip().splitlines()[-8:] if p.log else []
            fail.append(f"worker in A {p.name} (pid {p.popen.pid}) exited with {p.popen.returncode} "
                        f"{'before close()' if p.exited_in_run else 'after close()'}"
                        + "".join(f"\n    | {x}" for x in tail))


def tagged_processes(tag: str) -> list[str]:
    """Processes (other than this one) whose environment carries this run's tag (Linux)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    needle = f"{TAG_VAR}={tag}".encode()
    found = []
    for d in proc.iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if needle in (d / "environ").read_bytes().split(b"\0"):
                state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:120]
                found.append(f"pid {d.name} state {state}: {cmd}")
        except OSError:
            continue
    return found


def run_soak(cfg: Config) -> Result:
    return Soak(cfg).run()


def _spread(xs: list) -> str:
    return f"median {statistics.median(xs):.2f} s, max {max(xs):.2f} s" if xs else "none measured"


def _n(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def link_cut_lines(f: dict, cfg: Config) -> list[str]:
    """The summary's lines on link cuts: how many, detection, recovery, A's workers."""
    cuts = f.get("link_cuts", [])
    out = []
    count = {k: sum(c[key] == k for c in cuts) for key in ("kind", "during") for k in
             (("silent", "link-down") if key == "kind" else ("stepping", "paused"))}
    holds = [c["hold"] for c in cuts]
    ridden = sum(bool(c.get("ridden_out")) for c in cuts)
    out.append(f"   link cuts          {_n(len(cuts), 'cut')} of A's link ({count['silent']} silent, "
               f"{count['link-down']} link-down; {count['stepping']} while the loop stepped, {count['paused']} while "
               f"it paused)" + (f", cut for {min(holds):.1f}-{max(holds):.1f} s" if len(holds) > 1 else
                                f", cut for {holds[0]:.1f} s" if holds else "")
               + (f"; {ridden} ridden out" if ridden else ""))

    def col(key, during=None):
        return [c[key] for c in cuts if c.get(key) is not None and during in (None, c["during"])]

    def mx(xs):
        return f"{max(xs):.2f} s" if xs else "-"

    out.append(f"   cut noticed        by the trainer (A's envs lost) {_spread(col('detect_s'))} after the cut "
               f"(loop stepping: max {mx(col('detect_s', 'stepping'))}, paused: max {mx(col('detect_s', 'paused'))}; "
               f"bound {1.5 * cfg.heartbeat + cfg.heartbeat_slack:.2f} s); "
               f"by A's workers {_spread(col('worker_noticed_s'))}")
    backs = [t for c in cuts for t in c.get("back", {}).values()]
    out.append(f"   link back          A's workers dialed in again {_spread(col('redial_s'))} and served envs again "
               f"{_spread(backs)} after the link returned ({_n(len(backs), 'return')}; bound "
               f"{cfg.cut_recovery_bound:g} s)")
    taken = [c for c in cuts if c.get("taken_over")]
    if taken:
        waited = sum(len(c.get("waiting", [])) for c in taken)
        out.append(f"   taken over         in {_n(len(taken), 'cut')} other workers took A's envs while its link was "
                   f"down (" + "; ".join(f"cut {c['seq']}: {', '.join(c['taken_over'])}" for c in taken)
                   + f"): {_n(waited, 'worker')} of A dialed in again and waited for room (refused: not needed)")
    pcs = f.get("pc_workers", [])
    bad = f.get("pc_unexpected_exits", [])
    out.append("   workers in A       " + ("; ".join(bad) if bad else ", ".join(
        f"{p['name']} (pid {p['pid']}) exited {p['code']} after close()"
        + ("" if p["served"] else ", never served")
        + ("" if p.get("serving_at_close", True) else " (it was waiting for envs)")
        for p in pcs) + "; none exited before"))
    return out


def summary(results: list[Result], cfg: Config, link_note: str | None = None) -> str:
    out = []
    w = out.append
    for r in results:
        f = r.figures
        pcs = len(f.get("pc_workers", [])) if f.get("link_cuts_on") else 0
        w(f"== {r.mode} (seed {f.get('seed')}, {f.get('num_envs')} envs, {cfg.local_workers} local + "
          f"{cfg.cli_workers} CLI workers at start" + (f" in T + {pcs} in A" if pcs else "")
          + f", step_timeout {cfg.step_timeout:g} s, heartbeat {cfg.heartbeat:g} s)")
        if "steps" not in f:
            w("   (no figures)")
            for msg in r.failures:
                w("   FAIL: " + msg)
            continue
        w(f"   steps run          {f['steps']:,} vector steps ({f.get('chaos_steps', 0):,} under chaos), "
          f"{f['env_steps']:,} env-steps executed, in {f.get('step_secs', 0):.1f} s "
          f"(wall {f['wall_secs']:.1f} s)")
        ev = f["events"]
        w("   chaos events       " + ", ".join(f"{k} {ev.get(k, 0)}" for k in (ALL_KINDS if f.get("link_cuts_on")
                                                                           else KINDS))
          + f" ({f['resets']} reset() calls in all)")
        st = f["started"]
        w(f"   processes started  {st['local']} local + {st['local-restart']} local restarts, "
          f"{st['cli']} CLI + {st['cli-replacement']} replacements + {st['cli-topup']} top-ups"
          + (f", {st['pc']} in A + {st['pc-restart']} restarts" if f.get("link_cuts_on") else ""))
        w("   exit codes         " + ", ".join(f"{k}: {v}" for k, v in f["exit_codes"].items()))
        w(f"   recovered          {f['outages']} env outages, {f['takeovers']} takeovers by "
          f"{f['reconnections']} new worker connections; longest outage {f['outage_max_steps']} steps / "
          f"{f['outage_max_secs']:.1f} s")
        w(f"   out of service     {f['steps_with_lost']:,} steps had lost envs ({f['lost_env_steps']:,} lost "
          f"env-steps, truncated, flagged worker_lost); envs had a worker {100 * f['served_share']:.0f} % "
          f"of the stepping time")
        w(f"   step latency       max {f['latency_max']:.3f} s (bound {f['latency_bound']:.1f} s), "
          f"p99 {f['latency_p99'] * 1e3:.1f} ms, median {f['latency_median'] * 1e3:.2f} ms; "
          f"{f['slow_steps']} steps > step_timeout")
        if f["heartbeat_detect_max"] == f["heartbeat_detect_max"]:
            w(f"   heartbeat          SIGSTOPped worker noticed within {f['heartbeat_detect_max']:.2f} s (max)")
        if f.get("link_cuts_on"):
            out.extend(link_cut_lines(f, cfg))
        elif link_note:
            w(f"   link cuts          {link_note}")
        w(f"   end of chaos       all envs served again after {f.get('recovery_secs', float('nan')):.2f} s, "
          f"then {f.get('clean_steps', 0)} clean steps; close() {f.get('close_secs', float('nan')):.2f} s, "
          f"all workers ended {f.get('exit_wait_secs', float('nan')):.2f} s later")
        w(f"   counts             {f['env_steps']:,} real steps returned = {f['counter_sum']:,} summed over "
          f"{f['env_objects']} env objects' own counters; {f['terminated']:,} episodes terminated = "
          f"{f['terminated_implied']:,} implied")
        w(f"   lost               {f['violations']} wrong results, {f['slots_mismatched']} slots with "
          f"mismatched counts, {f['slots_out_at_end']} slots out of service at the end, "
          f"{len(f.get('stragglers', []))} stragglers, {len(f.get('tagged', []))} leaked processes")
        logs = f" (timeline and worker logs: {f['timeline']})" if f.get("timeline") else ""
        w(f"   verdict            {'OK' if r.ok else 'FAILED'}{logs}")
        for msg in r.failures:
            w("   FAIL: " + msg)
    return "\n".join(out)


# -- link cuts: the soak inside network namespaces ------------------------------


def link_cut_unavailable() -> str | None:
    """Why link cuts cannot be made here (None when they can): tests/netns.py decides."""
    try:
        from tests import netns
    except Exception as exc:  # noqa: BLE001
        return f"tests/netns.py cannot be imported: {exc}"
    return netns.unavailable()


def _config_to_json(cfg: Config) -> dict:
    return {f.name: getattr(cfg, f.name) for f in fields(Config)}


def _config_from_json(d: dict) -> Config:
    defaults = Config()
    return Config(**{k: tuple(v) if isinstance(getattr(defaults, k), tuple) else v for k, v in d.items()})


def _write_results(path: Path, results: list[Result]) -> None:
    def plain(o):
        return o.item() if hasattr(o, "item") else str(o)

    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps([{"mode": r.mode, "figures": r.figures, "failures": r.failures} for r in results],
                              default=plain))
    tmp.replace(path)


def run_with_link_cuts(cfgs: list[Config], verbose: bool = False) -> tuple[list[Result], str | None]:
    """Run one soak per config inside the namespaces of tests/netns.py, with link cuts.

    Builds the namespaces (T, A, B, H), runs this script inside T (``ip netns
    exec``, the configs as JSON) and deletes the namespaces and everything in
    them at the end, also on failure, Ctrl-C or SIGTERM. Returns the results,
    and None; or no results and the reason when namespaces cannot be made here.
    """
    reason = link_cut_unavailable()
    if reason:
        return [], reason
    from tests.netns import Topology

    topo = Topology.for_this_process("s")
    work = Path(tempfile.mkdtemp(prefix="ws_gym_soak_netns_"))
    spec_path, results_path = work / "spec.json", work / "results.json"
    old_term = None
    if threading.current_thread() is threading.main_thread():
        def on_term(signum, frame):
            raise SystemExit(128 + signum)

        old_term = signal.signal(signal.SIGTERM, on_term)
    try:
        try:
            topo.create()
        except Exception as exc:  # noqa: BLE001
            return [], f"could not build the network namespaces: {exc}"
        report_fd = None
        if REPORT is not None and REPORT is not sys.__stderr__ and not REPORT.closed:
            report_fd = REPORT.fileno()  # where a hang's stacks go: the real stderr
        cfgs = [Config(**{**c.__dict__, "topology": topo.to_dict()}) for c in cfgs]
        spec_path.write_text(json.dumps({"configs": [_config_to_json(c) for c in cfgs], "results": str(results_path),
                                         "report_fd": report_fd, "verbose": verbose}))
        # its own session: a Ctrl-C reaches this process only, which passes it on once
        proc = subprocess.Popen(
            topo.exec_argv("t", [sys.executable, str(Path(__file__).resolve()), "--inside", str(spec_path)]),
            cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdin=subprocess.DEVNULL,
            pass_fds=(report_fd,) if report_fd is not None else (), start_new_session=True,
        )
        try:
            code = proc.wait()
        except BaseException:
            proc.send_signal(signal.SIGINT)  # it closes the trainer; its workers end
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            raise
        results = []
        if results_path.exists():
            results = [Result(d["mode"], d["figures"], d["failures"]) for d in json.loads(results_path.read_text())]
        if code not in (0, 1) or len(results) < len(cfgs):
            results.append(Result(cfgs[len(results)].autoreset if len(results) < len(cfgs) else "?", {}, [
                f"the soak inside namespace {topo.ns('t')} ended with code {code} after {len(results)} of "
                f"{len(cfgs)} runs (its output is above)"]))
        return results, None
    finally:
        topo.destroy()  # kills whatever still runs inside, deletes links, bridge and nftables table
        shutil.rmtree(work, ignore_errors=True)
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)


def inside_main(spec_path: str) -> int:
    """The soak inside namespace T (see run_with_link_cuts)."""
    from tests.netns import Topology

    global REPORT
    spec = json.loads(Path(spec_path).read_text())
    if spec.get("report_fd") is not None:
        REPORT = os.fdopen(spec["report_fd"], "w")
    if not spec.get("verbose"):
        logging.getLogger("ws_gym").addHandler(logging.NullHandler())
    cfgs = [_config_from_json(d) for d in spec["configs"]]
    topo = Topology.from_dict(cfgs[0].topology)
    with socket.socket() as s:  # the trainer may listen, and A's workers dial, only inside our namespaces
        try:
            s.bind((topo.addr("t"), 0))
        except OSError:
            print(f"soak: refusing to run: {topo.addr('t')} is not an address of this namespace "
                  f"(run inside {topo.ns('t')})", file=sys.stderr)
            return 2
    def interrupted(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupted)  # whatever was inherited (a background job ignores SIGINT)
    signal.signal(signal.SIGTERM, interrupted)
    results: list[Result] = []
    path = Path(spec["results"])
    try:
        for c in cfgs:
            announce(c)
            results.append(run_soak(c))
            _write_results(path, results)
            topo.heal()
    except KeyboardInterrupt:
        results.append(Result(cfgs[len(results)].autoreset, {}, ["interrupted (Ctrl-C or SIGTERM)"]))
        _write_results(path, results)
        return 130
    return 0 if all(r.ok for r in results) else 1


def announce(c: Config) -> None:
    print(f"soak: {c.autoreset}, {c.num_envs} envs, chaos for "
          + (f"{c.duration:g} s" if c.duration and c.steps >= 10**12 else f"{c.steps:,} steps")
          + (f" (at most {c.duration:g} s)" if c.duration and c.steps < 10**12 else "")
          + (f", link cuts in namespaces ({c.pc_workers} worker{'s' if c.pc_workers != 1 else ''} in A)"
             if c.topology else "")
          + " ...", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=None, help="vector steps under chaos per mode (default 20000)")
    ap.add_argument("--duration", type=float, default=None, help="or: seconds of chaos per mode")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--envs", type=int, default=16)
    ap.add_argument("--local-workers", type=int, default=2)
    ap.add_argument("--cli-workers", type=int, default=4)
    ap.add_argument("--autoreset", choices=["NextStep", "SameStep", "both"], default="both")
    ap.add_argument("--step-timeout", type=float, default=1.0)
    ap.add_argument("--heartbeat", type=float, default=1.0)
    ap.add_argument("--quick", action="store_true", help="a short run (< 25 s)")
    ap.add_argument("--verbose", action="store_true", help="worker and trainer logs on stderr")
    ap.add_argument("--keep-logs", action="store_true", help="keep the timeline and logs of a run that passed")
    ap.add_argument("--link-cuts", action="store_true",
                    help="also cut the link of a worker PC, in network namespaces (Linux, root, ip and nft; "
                         "skipped with the reason where they cannot be made)")
    ap.add_argument("--pc-workers", type=int, default=None,
                    help="with --link-cuts: CLI workers in the PC namespace A (default 2; --quick: 1)")
    ap.add_argument("--inside", help=argparse.SUPPRESS)  # run_with_link_cuts: the soak inside namespace T
    args = ap.parse_args(argv)
    if args.inside:
        return inside_main(args.inside)
    modes = ["NextStep", "SameStep"] if args.autoreset == "both" else [args.autoreset]
    cfg = Config(seed=args.seed, num_envs=args.envs, local_workers=args.local_workers,
                 cli_workers=args.cli_workers, step_timeout=args.step_timeout, heartbeat=args.heartbeat,
                 keep_logs=args.keep_logs)
    if args.quick:
        cfg.num_envs, cfg.cli_workers, cfg.gap = min(args.envs, 8), min(args.cli_workers, 2), (30, 90)
        cfg.steps, cfg.duration, cfg.require_all_kinds, cfg.extra_time = 1_000, 7.0, True, 6.0
        cfg.recovery_timeout, cfg.clean_steps = 15.0, 20
        if args.autoreset == "both":
            modes = [modes[args.seed % 2]]  # one mode per quick run, alternating with the seed
    if args.steps is not None:
        cfg.steps = args.steps
    if args.duration is not None:
        cfg.duration, cfg.steps = args.duration, args.steps or 10**12
    if args.link_cuts:
        cfg.kinds = KINDS + (LINK_CUT,)
        cfg.pc_workers = args.pc_workers or (1 if args.quick else 2)
    global REPORT
    saved_err = None
    if not args.verbose:  # trainer and local-worker logs go to a file, the summary to stdout
        logging.getLogger("ws_gym").addHandler(logging.NullHandler())
        log_dir = Path(tempfile.mkdtemp(prefix="ws_gym_soak_"))
        log_path = log_dir / "stderr.log"
        saved_err = os.dup(2)
        REPORT = os.fdopen(os.dup(saved_err), "w")
        with open(log_path, "w") as fh:
            os.dup2(fh.fileno(), 2)
        print(f"soak: worker and trainer logs in {log_path}, kept if a check fails (--verbose: on stderr)",
              flush=True)
    configs = [Config(**{**cfg.__dict__, "autoreset": mode, "seed": cfg.seed + i}) for i, mode in enumerate(modes)]
    results: list[Result] = []
    link_note = None
    interrupted = False
    try:
        if args.link_cuts:
            results, reason = run_with_link_cuts(configs, verbose=args.verbose)
            if reason:
                link_note = f"skipped: {reason}"
                print(f"soak: link cuts skipped: {reason}", flush=True)
                for c in configs:
                    c.kinds = KINDS
        if not results:
            for c in configs:
                announce(c)
                results.append(run_soak(c))
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if saved_err is not None:
            sys.stderr.flush()
            os.dup2(saved_err, 2)
    if interrupted:
        print("soak: interrupted; workers closed" + (", namespaces deleted" if args.link_cuts else "")
              + (f"; logs in {log_dir}" if saved_err is not None else ""))
        return 130
    print(summary(results, cfg, link_note))
    if saved_err is not None and all(r.ok for r in results) and not args.keep_logs:
        shutil.rmtree(log_dir, ignore_errors=True)
    total = sum(r.figures.get("steps", 0) for r in results)
    killed = sum(r.figures["events"][k] for r in results for k in ("kill-cli", "kill-local", "crash")
                 ) if all("events" in r.figures for r in results) else 0
    cuts = sum(len(r.figures.get("link_cuts", [])) for r in results)
    lost = sum(r.figures.get("violations", 0) + r.figures.get("slots_mismatched", 0) for r in results)
    links = ""
    if args.link_cuts:
        links = f"link cuts skipped ({link_note[9:]}), " if link_note else f"{_n(cuts, 'link cut')}, "
    print(f"soak: {'PASSED' if all(r.ok for r in results) else 'FAILED'}: {total:,} steps, "
          f"{killed} workers killed, {links}{lost} lost")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
