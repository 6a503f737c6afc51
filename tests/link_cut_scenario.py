"""One link-cut scenario, run inside the trainer's network namespace.

tests/test_link_cuts.py runs it as::

    ip netns exec <T> python tests/link_cut_scenario.py --json-args '{...}'

It runs a ``RemoteVectorEnv`` of 8 Counter envs on T's address, with worker A
(4 envs) in namespace A and worker B (4 envs) in namespace B, cuts A's link
(see tests/netns.py), keeps it cut for a fixed time, restores it and measures
what the trainer did. It only measures and reports: one JSON line on stdout,
which the pytest test checks against the bounds. It runs as a separate
process because the trainer must live in T's namespace, and pytest does not.

Figures are seconds: ``noticed_s`` and the blocking times count from the cut,
``served_again_s`` from the restore; ``events`` and ``slow_calls`` are on one
timeline whose zero is the cut.

Arguments (JSON): ``topology`` (Topology.to_dict), ``logdir``, ``scenario``
(``cut`` or ``lossy``), and for ``cut``: ``kind`` (silent, link-down), ``mode``
(raise, wait), ``when`` (mid-step, between, idle, first-reset), ``heartbeat``,
``cut_s``, ``serve_wait_s``; for ``lossy``: ``steps``, ``delay_ms``, ``loss_pct``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402

import tests.envs  # noqa: E402,F401
import ws_gym  # noqa: E402
from tests.netns import Topology  # noqa: E402

COUNTER = "tests.envs:Counter-v0"
N = 8
PER_WORKER = 4


class Clock:
    """Monotonic seconds since the scenario started, and a timeline of events."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.events: list[tuple[float, str]] = []

    def now(self) -> float:
        return time.monotonic() - self.t0

    def event(self, text: str) -> None:
        self.events.append((round(self.now(), 3), text))


class Calls:
    """Every step()/reset() made, with its start, end and outcome."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.records: list[dict] = []

    def __call__(self, name: str, fn, *args, **kwargs):
        """Call ``fn``; return (result, exception). Every exception is recorded,
        none escapes: the test decides which ones were allowed."""
        rec = {"call": name, "start": self.clock.now()}
        try:
            result, exc = fn(*args, **kwargs), None
        except Exception as e:  # recorded and judged by the test
            result, exc = None, e
        rec["end"] = self.clock.now()
        if exc is not None:
            rec["error"] = {"type": type(exc).__name__, "message": str(exc)[:500]}
        self.records.append(rec)
        return result, exc


class LinkCut(threading.Thread):
    """Cuts A's link ``offset`` seconds after it starts, keeps it cut for
    ``hold`` seconds and restores it, whatever the main thread is doing (it may
    be blocked in a call). The fixed timing is the subject of the test."""

    def __init__(self, topo: Topology, kind: str, clock: Clock, offset: float, hold: float) -> None:
        super().__init__(daemon=True)
        self.topo, self.kind, self.clock, self.offset, self.hold = topo, kind, clock, offset, hold
        self.cut_done, self.restored = threading.Event(), threading.Event()
        self.t_cut: float | None = None
        self.t_restore: float | None = None
        self.report: dict = {}

    def run(self) -> None:
        try:
            if self.offset:
                time.sleep(self.offset)
            t = time.monotonic()
            self.topo.cut(self.kind, "a")
            self.t_cut = self.clock.now()
            self.report["cut_cmd_s"] = round(time.monotonic() - t, 4)
            self.clock.event(f"{self.kind} cut of A")
            self.cut_done.set()
            # the cut really cuts A, and only A (probes take ~0.5 s, well inside the hold)
            self.report["probe_a_cut"] = self.topo.probe("a", "t")
            self.report["probe_b_cut"] = self.topo.probe("b", "t")
            remaining = self.t_cut + self.hold - self.clock.now()
            if remaining > 0:
                time.sleep(remaining)
        except Exception:
            self.report["error"] = traceback.format_exc()
        finally:
            self.cut_done.set()
            try:
                self.topo.restore(self.kind, "a")
                self.t_restore = self.clock.now()
                self.clock.event("A's link restored")
                ok, took, last = self.topo.wait_reachable("a", "t", 3)
                self.report["probe_a_restored"] = last
                self.report["path_back_s"] = round(took, 3)
            except Exception:
                self.report["restore_error"] = traceback.format_exc()
            self.restored.set()


class HoleWatch(threading.Thread):
    """Polls the trainer's slot table every 10 ms: when A's envs became holes
    (the trainer noticed), when they were served again, and whether any of B's
    envs ever became one."""

    def __init__(self, envs, a_slots: list[int], clock: Clock) -> None:
        super().__init__(daemon=True)
        self.envs, self.a_slots, self.clock = envs, set(a_slots), clock
        self.first_hole: float | None = None
        self.refilled: float | None = None
        self.b_holes: list[int] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.01):
            try:
                holes = set()
                for a, b, w in self.envs._trainer.layout():
                    if w is None:
                        holes.update(range(a, b))
            except Exception:
                continue  # the trainer is closing
            now = self.clock.now()
            if self.first_hole is None and self.a_slots <= holes:
                self.first_hole = now
                self.clock.event("A's envs are holes")
            elif self.first_hole is not None and self.refilled is None and not (holes & self.a_slots):
                self.refilled = now
                self.clock.event("A's envs served again")
            if holes - self.a_slots and not self.b_holes:
                self.b_holes = sorted(holes - self.a_slots)
                self.clock.event(f"other envs became holes: {self.b_holes}")


def wait_for(pred, timeout: float, poll: float = 0.02) -> float | None:
    """Bounded polling wait: seconds taken, or None on timeout."""
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            return None
        time.sleep(poll)
    return time.monotonic() - t0


def start_worker(topo: Topology, role: str, url: str, token: str, logdir: Path) -> subprocess.Popen:
    name = role.upper()
    with open(logdir / f"worker-{name}.log", "w") as log:
        return subprocess.Popen(
            topo.exec_argv(role, [sys.executable, "-m", "ws_gym.worker", "--url", url, "--env", COUNTER,
                                  "--num-envs", str(PER_WORKER), "--name", name]),
            cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT), WS_GYM_TOKEN=token),
            stdout=log, stderr=subprocess.STDOUT,
        )


def compare(got: tuple, want: tuple, what: str, base: np.ndarray | None, ref_base: np.ndarray | None) -> None:
    """Exact comparison of a reset or step result against SyncVectorEnv's.

    Column 1 of Counter's observation counts every step the env object ever
    took, so the remote envs (stepped before the cut) count from elsewhere:
    that column is compared as the change since the reset, everything else
    as it is."""
    for k, (g, w) in enumerate(zip(got, want)):
        if isinstance(w, dict):
            if k == 1 and what.startswith("reset"):
                continue  # reset infos hold that same lifetime count ("total")
            if list(g) != list(w):
                raise AssertionError(f"{what}: info keys {sorted(g)} vs {sorted(w)}")
            continue
        g, w = np.asarray(g), np.asarray(w)
        if g.dtype != w.dtype or g.shape != w.shape:
            raise AssertionError(f"{what}[{k}]: {g.dtype}{g.shape} vs {w.dtype}{w.shape}")
        if k == 0:
            g, w = g.copy(), w.copy()
            g[:, 1] -= base[:, 1]
            w[:, 1] -= ref_base[:, 1]
        if not np.array_equal(g, w):
            raise AssertionError(f"{what}[{k}]: {g.tolist()} vs {w.tolist()}")


def equivalence(envs, calls: Calls, seed: int, steps: int) -> str:
    """reset(seed) and ``steps`` zero-action steps against gymnasium's SyncVectorEnv."""
    ref = gym.make_vec(COUNTER, N, vectorization_mode="sync")
    try:
        got, exc = calls("reset(equivalence)", envs.reset, seed=seed)
        if exc is not None:
            return f"reset(seed={seed}) raised {type(exc).__name__}: {exc}"
        want = ref.reset(seed=seed)
        compare(got, want, "reset", got[0], want[0])
        base, ref_base = got[0], want[0]
        zeros = np.zeros(N, dtype=np.int64)
        for i in range(steps):
            g, exc = calls("step(equivalence)", envs.step, zeros)
            if exc is not None:
                return f"step {i} raised {type(exc).__name__}: {exc}"
            compare(g, ref.step(zeros), f"step {i}", base, ref_base)
        return "ok"
    except AssertionError as e:
        return f"differs from SyncVectorEnv: {e}"
    finally:
        ref.close()


def lost_flags(infos: dict) -> set[int]:
    mask = infos.get("_worker_lost")
    return set() if mask is None else {int(i) for i in np.flatnonzero(mask)}


def shows_loss(first: tuple, when: str, a_slots: list[int]) -> bool:
    """Whether the first call after the cut reported A's loss: by raising, or
    (wait mode) by flagging all of A's envs ``worker_lost``."""
    result, exc = first
    if exc is not None:
        return True
    infos = result[1] if when == "first-reset" else result[4]
    return set(a_slots) <= lost_flags(infos)


def check_wait_result(result, a_slots: list[int], problems: list[str], what: str) -> set[int]:
    """A wait-mode result: a full batch; flagged envs are A's only, truncated with reward 0."""
    obs, rew, term, trunc, infos = result
    if obs.shape != (N, 2) or rew.shape != (N,) or term.shape != (N,) or trunc.shape != (N,):
        problems.append(f"{what}: not a full batch: {obs.shape}")
    flagged = lost_flags(infos)
    if flagged - set(a_slots):
        problems.append(f"{what}: envs {sorted(flagged - set(a_slots))} flagged worker_lost, not A's")
    for i in flagged:
        if rew[i] != 0 or not trunc[i] or term[i]:
            problems.append(f"{what}: lost env {i} got reward {rew[i]}, terminated {term[i]}, truncated {trunc[i]}")
    return flagged


def cut_scenario(args: dict, topo: Topology, out: dict, clock: Clock, calls: Calls, keep: dict) -> None:
    kind, mode, when = args["kind"], args["mode"], args["when"]
    hb, hold, serve_wait = args["heartbeat"], args["cut_s"], args["serve_wait_s"]
    logdir = Path(args["logdir"])
    token = secrets.token_urlsafe(16)
    envs = keep["envs"] = ws_gym.RemoteVectorEnv(
        N, env_id=COUNTER, host=topo.addr("t"), port=0, token=token, heartbeat=hb,
        on_worker_lost=mode, step_timeout=30, connect_timeout=60)
    trainer = envs._trainer
    workers = keep["workers"] = {r: start_worker(topo, r, envs.url, token, logdir) for r in ("a", "b")}
    clock.event(f"trainer on {envs.url}; workers started")
    took = wait_for(lambda: trainer.table.covered() == N or any(p.poll() is not None for p in workers.values()), 30)
    if trainer.table.covered() != N:
        raise RuntimeError(f"workers did not connect within 30 s (covered {trainer.table.covered()}/{N}, "
                           f"exit codes A={workers['a'].poll()} B={workers['b'].poll()})")
    out["connect_s"] = round(took, 3)
    a_slots = [i for i, c in enumerate(trainer.table.slots) if c is not None and c.name == "A"]
    out["a_slots"] = a_slots
    peers = {c.peer for i, c in enumerate(trainer.table.slots) if i in a_slots}
    if len(a_slots) != PER_WORKER or not all(str(p).startswith(topo.addr("a")) for p in peers):
        raise RuntimeError(f"A's slots {a_slots} from peers {peers}: expected {PER_WORKER} from {topo.addr('a')}")
    zeros = np.zeros(N, dtype=np.int64)
    if when != "first-reset":
        for name, fn in [("reset", lambda: envs.reset(seed=0))] + [("step", lambda: envs.step(zeros))] * 3:
            _, exc = calls(name, fn)
            if exc is not None:
                raise RuntimeError(f"{name} before the cut raised {type(exc).__name__}: {exc}")
    n_before = len(calls.records)
    problems: list[str] = []  # wait-mode results that break the README's promises

    watch = HoleWatch(envs, a_slots, clock)
    watch.start()
    keep["watch"] = watch
    cutter = LinkCut(topo, kind, clock, offset=0.5 if when == "mid-step" else 0.0, hold=hold)
    keep["cutter"] = cutter
    cutter.start()
    if when == "mid-step":
        slow = zeros.copy()
        slow[a_slots[0]] = 3  # a 3 s step at A; the cut comes 0.5 s into it
        first = calls("step(in flight at the cut)", envs.step, slow)
    else:
        if not cutter.cut_done.wait(10):
            raise RuntimeError("the cut did not happen within 10 s")
        if when == "between":
            first = calls("step(right after the cut)", envs.step, zeros)
        elif when == "idle":
            wait_for(lambda: watch.first_hole is not None, 1.5 * hb + 1 + 5, poll=0.01)
            first = calls("step(after the trainer noticed)", envs.step, zeros)
        else:
            first = calls("reset(first, right after the cut)", envs.reset, seed=0)
    if mode == "wait" and first[1] is None:
        if when == "first-reset":  # it waits for every env to have a worker: a whole first batch
            flagged = lost_flags(first[0][1])
            if flagged:
                problems.append(f"first reset: envs {sorted(flagged)} flagged worker_lost")
        else:
            check_wait_result(first[0], a_slots, problems, calls.records[-1]["call"])

    # while the link stays cut: wait mode keeps training, raise mode waits
    if mode == "wait":
        while not cutter.restored.is_set():
            result, exc = calls("step(during the cut)", envs.step, zeros)
            if exc is None:
                check_wait_result(result, a_slots, problems, "step during the cut")
            time.sleep(0.02)  # pace: a training loop with some work of its own
    if not cutter.restored.wait(hold + 15):
        raise RuntimeError("the link was not restored in time")
    n_cut = len(calls.records)

    # after the restore: A must be served again
    t_restore = cutter.t_restore if cutter.t_restore is not None else clock.now()
    served_at = None
    deadline = time.monotonic() + serve_wait
    while time.monotonic() < deadline and workers["a"].poll() is None:
        if mode == "wait":
            result, exc = calls("step(after the restore)", envs.step, zeros)
            if exc is None:
                flagged = check_wait_result(result, a_slots, problems, "step after the restore")
                if not flagged and trainer.table.covered() == N:
                    served_at = clock.now()
                    break
            time.sleep(0.02)
        else:
            if trainer.table.covered() == N:
                served_at = clock.now()
                break
            time.sleep(0.02)
    watch.stop.set()
    out["served_again_s"] = None if served_at is None else round(served_at - t_restore, 3)

    # what the calls did, relative to the cut
    t_cut = cutter.t_cut
    out["t_cut"] = t_cut
    if t_cut is not None:
        first_rec = calls.records[n_before]
        call_noticed = shows_loss(first, when, a_slots)
        candidates = [t for t in (watch.first_hole, first_rec["end"] if call_noticed else None)
                      if t is not None and t >= t_cut]
        noticed_at = min(candidates) if candidates else None
        out["noticed_s"] = None if noticed_at is None else round(noticed_at - t_cut, 3)
        out["noticed_by"] = (None if noticed_at is None else
                             "holes" if noticed_at == watch.first_hole else "call")
        out["holes_s"] = None if watch.first_hole is None else round(watch.first_hole - t_cut, 3)
        out["max_block_cut_s"] = round(max(
            [r["end"] - max(r["start"], t_cut) for r in calls.records[n_before:n_cut]] or [0]), 3)
        out["max_block_after_s"] = round(max(
            [r["end"] - r["start"] for r in calls.records[n_cut:]] or [0]), 3)
        out["first_call"] = {"call": first_rec["call"], "ended_s": round(first_rec["end"] - t_cut, 3),
                             "error": first_rec.get("error")}
    out["cut_calls"] = len(calls.records) - n_before
    out["b_holes"] = watch.b_holes
    out["wait_problems"] = problems[:10]
    out["link"] = cutter.report
    out["exceptions"] = [dict(r["error"], call=r["call"]) for r in calls.records if "error" in r]

    out["a_returncode"] = workers["a"].poll()
    out["b_returncode"] = workers["b"].poll()
    if served_at is not None:
        out["equivalence"] = equivalence(envs, calls, seed=123, steps=12)
        out["exceptions"] = [dict(r["error"], call=r["call"]) for r in calls.records if "error" in r]
    else:
        out["equivalence"] = "not run: A's envs were not served again"
    out["a_returncode"] = workers["a"].poll()  # again: it must outlive the equivalence run too
    out["b_returncode"] = workers["b"].poll()


def lossy_scenario(args: dict, topo: Topology, out: dict, clock: Clock, calls: Calls, keep: dict) -> None:
    """300 steps over a lossy, slow link to A: every step equal to SyncVectorEnv's,
    no exception, no worker lost; step latencies reported."""
    logdir = Path(args["logdir"])
    token = secrets.token_urlsafe(16)
    envs = keep["envs"] = ws_gym.RemoteVectorEnv(
        N, env_id=COUNTER, host=topo.addr("t"), port=0, token=token, heartbeat=args["heartbeat"],
        on_worker_lost="raise", step_timeout=30, connect_timeout=60)
    trainer = envs._trainer
    workers = keep["workers"] = {r: start_worker(topo, r, envs.url, token, logdir) for r in ("a", "b")}
    took = wait_for(lambda: trainer.table.covered() == N or any(p.poll() is not None for p in workers.values()), 30)
    if trainer.table.covered() != N:
        raise RuntimeError(f"workers did not connect within 30 s (covered {trainer.table.covered()}/{N})")
    out["connect_s"] = round(took, 3)
    a_slots = [i for i, c in enumerate(trainer.table.slots) if c is not None and c.name == "A"]
    watch = keep["watch"] = HoleWatch(envs, a_slots, clock)
    watch.start()
    ref = gym.make_vec(COUNTER, N, vectorization_mode="sync")
    zeros = np.zeros(N, dtype=np.int64)
    latencies, mismatch = [], None
    try:
        got, exc = calls("reset", envs.reset, seed=0)
        if exc is None:
            want = ref.reset(seed=0)
            if not np.array_equal(got[0], want[0]):
                mismatch = f"reset obs {got[0].tolist()} vs {want[0].tolist()}"
            for i in range(args["steps"]):
                got, exc = calls("step", envs.step, zeros)
                if exc is not None:
                    break
                latencies.append(calls.records[-1]["end"] - calls.records[-1]["start"])
                want = ref.step(zeros)
                if mismatch is None and lost_flags(got[4]):
                    mismatch = f"step {i}: worker_lost flagged for {sorted(lost_flags(got[4]))}"
                for k in range(4):
                    g, w = np.asarray(got[k]), np.asarray(want[k])
                    if mismatch is None and (g.dtype != w.dtype or not np.array_equal(g, w)):
                        mismatch = f"step {i} item {k}: {g.tolist()} vs {w.tolist()}"
    finally:
        ref.close()
        watch.stop.set()
    lat = np.array(latencies) if latencies else np.array([np.nan])
    out.update(
        steps_done=len(latencies),
        median_ms=round(float(np.median(lat)) * 1000, 1),
        p99_ms=round(float(np.percentile(lat, 99)) * 1000, 1),
        max_ms=round(float(np.max(lat)) * 1000, 1),
        equivalence=mismatch or "ok",
        holes_seen=watch.first_hole is not None or bool(watch.b_holes),
        exceptions=[dict(r["error"], call=r["call"]) for r in calls.records if "error" in r],
        a_returncode=workers["a"].poll(),
        b_returncode=workers["b"].poll(),
    )


def inside(topo: Topology) -> bool:
    """Whether T's address is local here: the trainer may only listen, and the
    workers only dial, inside the test's own namespaces."""
    import socket

    with socket.socket() as s:
        try:
            s.bind((topo.addr("t"), 0))
            return True
        except OSError:
            return False


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json-args", required=True)
    args = json.loads(p.parse_args().json_args)
    topo = Topology.from_dict(args["topology"])
    if not inside(topo):
        sys.exit(f"refusing to run: {topo.addr('t')} is not an address of this namespace; "
                 f"run me with ip netns exec {topo.ns('t')}")
    logdir = Path(args["logdir"])
    logging.basicConfig(filename=logdir / "trainer.log", level=logging.INFO,
                        format="%(relativeCreated)8.0f ms %(name)s %(levelname)s %(message)s")
    clock, out, keep = Clock(), {"error": None}, {}
    calls = Calls(clock)
    try:
        scenario = cut_scenario if args.get("scenario", "cut") == "cut" else lossy_scenario
        scenario(args, topo, out, clock, calls, keep)
    except Exception:
        out["error"] = traceback.format_exc()
    finally:
        if "watch" in keep:
            keep["watch"].stop.set()
        if "cutter" in keep:  # never leave the link cut
            keep["cutter"].restored.wait(args.get("cut_s", 0) + 15)
        if "envs" in keep:
            try:
                keep["envs"].close()
            except Exception:
                out.setdefault("close_error", traceback.format_exc())
        for role, proc in keep.get("workers", {}).items():
            out.setdefault(f"{role}_returncode", proc.poll())
            if proc.poll() is None:
                proc.kill()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        zero = out.get("t_cut") or 0.0  # one timeline, from the cut
        out["events"] = [(round(t - zero, 3), text) for t, text in clock.events]
        out["slow_calls"] = [
            dict(r, start=round(r["start"] - zero, 3), end=round(r["end"] - zero, 3))
            for r in calls.records if r["end"] - r["start"] > 0.2 or "error" in r
        ][:20]
        print(json.dumps(out, default=str), flush=True)


if __name__ == "__main__":
    main()
