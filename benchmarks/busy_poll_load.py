"""Busy polling under load: the default (adaptive) next to ``busy_poll=False``.

Busy polling (the caller's thread and the local workers read their sockets
themselves instead of sleeping until a message comes) is quick on an idle
machine and, spinning without measure, slow on a busy one: the spinning thread
takes the CPU the other side needs to answer. ws_gym's default adapts (see
``ws_gym.polling.SpinPolicy``); this script checks the goal it must meet:
at least 0.9x of ``busy_poll=False`` under any load, and at least 3x of it
for a single env on an idle machine.

For 0, 1, 2, 3 and 4 CPU-bound processes beside it (``python -c "while True:
pass"``, ended at the end of their load level, also on Ctrl-C or an error) it
measures env-steps per second of

* ``single``: one remote CartPole-v1
  (``gym.make("ws_gym/Remote-v0", env_id="CartPole-v1", local_workers=1, port=0, busy_poll=X)``),
* ``vec8``: 8 CartPole-v1 over 2 local workers
  (``gym.make_vec("ws_gym/Remote-v0", num_envs=8, env_id="CartPole-v1", local_workers=2, port=0, busy_poll=X)``),

with ``X = None`` (the default) and ``X = False`` as a pair: both envs built at
once (fresh workers each), reset and warmed up (untimed), then stepped in
turns of a quarter second until each has stepped for ``--seconds``, and closed
again; which goes first alternates. On a loaded machine single runs vary 2x
with where the scheduler puts the processes; a pair shares that luck. It
prints the medians over the repetitions and, per load level, the median of the
pairs' ratios default / False, then a verdict against the goals.

    python benchmarks/busy_poll_load.py            # default: about 8 minutes on 2 cores
    python benchmarks/busy_poll_load.py --quick    # smoke test: well under a minute
    python benchmarks/busy_poll_load.py --loads 0 3 --repeats 5 --json out.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import gymnasium as gym

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # ws_gym from this checkout (its local workers import it too)

import ws_gym  # noqa: E402  (registers ws_gym/Remote-v0)

ENV_ID = "CartPole-v1"
CASES = ("single", "vec8")
SETTINGS = (None, False)  # busy_poll=: the default, and off
RATIO_GOAL = 0.9  # default / False under every load
IDLE_GOAL = 3.0  # default / False for the single env with no load


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loads", type=int, nargs="+", default=[0, 1, 2, 3, 4],
                   help="numbers of CPU-bound processes to run beside it (default 0 1 2 3 4)")
    p.add_argument("--seconds", type=float, default=3.0, help="timed seconds per measurement (default 3)")
    p.add_argument("--warmup", type=float, default=1.0, help="untimed seconds of stepping after reset (default 1)")
    p.add_argument("--repeats", type=int, default=5,
                   help="repetitions; the median is reported (default 5: under load single runs vary 2x)")
    p.add_argument("--json", metavar="PATH", default=None, help="also write the results to PATH as JSON")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: loads 0 and 2, 0.3 s timed after 0.2 s warm-up, 1 repetition")
    args = p.parse_args()
    if args.quick:
        args.loads, args.seconds, args.warmup, args.repeats = [0, 2], 0.3, 0.2, 1
    if args.repeats < 1 or args.seconds <= 0 or args.warmup < 0 or min(args.loads) < 0:
        p.error("--repeats must be >= 1, --seconds > 0, --warmup and --loads >= 0")
    return args


# ---------------------------------------------------------------------------- load

class Hogs:
    """``n`` CPU-bound processes, ended (always) when the block is left."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> "Hogs":
        try:
            for _ in range(self.n):
                self.procs.append(subprocess.Popen([sys.executable, "-c", "while True: pass"],
                                                   stdin=subprocess.DEVNULL))
        except BaseException:
            self.stop()
            raise
        if self.n:
            time.sleep(0.5)  # let them get going (and the scheduler see them)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self.procs = []


# ---------------------------------------------------------------------------- timing

def make(case: str, busy_poll: bool | None) -> Any:
    if case == "single":
        return gym.make("ws_gym/Remote-v0", env_id=ENV_ID, local_workers=1, port=0, busy_poll=busy_poll)
    return gym.make_vec("ws_gym/Remote-v0", num_envs=8, env_id=ENV_ID, local_workers=2, port=0,
                        busy_poll=busy_poll)


def step_for(env: Any, actions: list, seconds: float, vector: bool) -> int:
    """Step for about ``seconds``; returns the env-steps made."""
    clock = time.perf_counter
    end = clock() + seconds
    calls = 0
    while True:
        for _ in range(32):
            if vector:
                env.step(actions[calls % len(actions)])
            else:
                _, _, terminated, truncated, _ = env.step(actions[calls % len(actions)])
                if terminated or truncated:
                    env.reset()
            calls += 1
        if clock() >= end:
            return calls * (8 if vector else 1)


CHUNK = 0.25  # seconds one setting steps before the other takes over (a paired measurement)


def measure_pair(case: str, args: argparse.Namespace, first: int) -> dict[bool | None, float]:
    """Env-steps/s of both settings, as a pair: both envs built at once (fresh
    workers each) and stepped in turns of :data:`CHUNK` seconds, so that the
    load's ups and downs and where the scheduler put the processes hit both
    alike. ``first``: which setting starts (alternated between repetitions)."""
    envs: dict[bool | None, Any] = {}
    try:
        for busy_poll in SETTINGS:
            envs[busy_poll] = make(case, busy_poll)
        actions = {}
        for busy_poll, env in envs.items():
            env.reset(seed=0)  # waits for the local workers
            env.action_space.seed(0)
            actions[busy_poll] = [env.action_space.sample() for _ in range(256)]
        vector = case == "vec8"
        order = SETTINGS if first == 0 else SETTINGS[::-1]
        chunk = min(CHUNK, args.seconds)
        if args.warmup:
            for busy_poll in order:
                step_for(envs[busy_poll], actions[busy_poll], args.warmup, vector)
        steps = dict.fromkeys(SETTINGS, 0)
        spent = dict.fromkeys(SETTINGS, 0.0)
        while min(spent.values()) < args.seconds:
            for busy_poll in order:
                start = time.perf_counter()
                steps[busy_poll] += step_for(envs[busy_poll], actions[busy_poll], chunk, vector)
                spent[busy_poll] += time.perf_counter() - start
        return {busy_poll: steps[busy_poll] / spent[busy_poll] for busy_poll in SETTINGS}
    finally:
        for env in envs.values():
            env.close()


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def label(busy_poll: bool | None) -> str:
    return "default" if busy_poll is None else "False"


# ---------------------------------------------------------------------------- main

def _interrupt(signum: int, frame: Any) -> None:
    """A SIGTERM ends the run as Ctrl-C does: through the blocks that end the processes."""
    raise KeyboardInterrupt

def main() -> int:
    args = parse_args()
    handler = logging.StreamHandler()
    handler.setLevel(logging.WARNING)
    logging.basicConfig(handlers=[handler], format="%(name)s %(levelname)s: %(message)s")
    logging.getLogger("ws_gym").setLevel(logging.INFO)  # INFO through the logger, not shown (as throughput.py)
    signal.signal(signal.SIGTERM, _interrupt)

    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count()
    print(f"python {sys.version.split()[0]}, ws_gym {ws_gym.__version__}, cpus usable {cpus}, "
          f"load average {loadavg()}")
    print(f"loads {args.loads} CPU-bound processes; {args.seconds:g} s timed after {args.warmup:g} s warm-up, "
          f"{args.repeats} repetition(s); single = 1 remote {ENV_ID}, 1 local worker; "
          f"vec8 = 8 {ENV_ID} over 2 local workers\n", flush=True)

    results: dict[int, dict[tuple[str, str], list[float]]] = {}
    started = time.perf_counter()
    for load in args.loads:
        rates: dict[tuple[str, str], list[float]] = {(c, label(s)): [] for c in CASES for s in SETTINGS}
        results[load] = rates
        with Hogs(load):
            for rep in range(args.repeats):
                for case in CASES:
                    pair = measure_pair(case, args, (rep + CASES.index(case)) % 2)
                    for busy_poll, rate in pair.items():
                        rates[case, label(busy_poll)].append(rate)
                    print(f"  load {load}  round {rep + 1}/{args.repeats}  {case:<6} "
                          f"default {pair[None]:>9,.0f}  False {pair[False]:>9,.0f} env-steps/s", flush=True)
            print(f"  load {load}: load average {loadavg()}", flush=True)
    total = time.perf_counter() - started

    print()
    header = (f"{'load':>4}  {'case':<6}  {'default':>9}  {'False':>9}  {'ratio':>6}  "
              "repetitions default | False (env-steps/s); ratio: the median of the pairs' ratios")
    print(header)
    print("-" * len(header))
    ratios: dict[int, dict[str, float]] = {}
    for load, rates in results.items():
        ratios[load] = {}
        for case in CASES:
            on, off = rates[case, "default"], rates[case, "False"]
            ratio = statistics.median(a / b for a, b in zip(on, off))  # the pairs' ratios
            ratios[load][case] = ratio
            reps = ", ".join(f"{r:,.0f}" for r in on) + " | " + ", ".join(f"{r:,.0f}" for r in off)
            print(f"{load:>4}  {case:<6}  {statistics.median(on):>9,.0f}  {statistics.median(off):>9,.0f}  "
                  f"{ratio:>5.2f}x  {reps}")

    failures = [f"load {load} {case} {r:.2f}x < {RATIO_GOAL}x"
                for load, by_case in ratios.items() for case, r in by_case.items() if r < RATIO_GOAL]
    if 0 in ratios and ratios[0]["single"] < IDLE_GOAL:
        failures.append(f"idle single {ratios[0]['single']:.2f}x < {IDLE_GOAL}x")
    worst = min(r for by_case in ratios.values() for r in by_case.values())
    idle = f", idle single {ratios[0]['single']:.2f}x (goal >= {IDLE_GOAL}x)" if 0 in ratios else ""
    print(f"\nverdict: {'goals met' if not failures else 'goals NOT met: ' + '; '.join(failures)} "
          f"(worst default/False {worst:.2f}x, goal >= {RATIO_GOAL}x under every load{idle})")
    print(f"measured in {total:.0f} s, load average now {loadavg()}")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({
                "date": datetime.datetime.now().isoformat(timespec="seconds"),
                "cpus_usable": cpus,
                "config": {k: getattr(args, k) for k in ("loads", "seconds", "warmup", "repeats")},
                "env_steps_per_s": {str(load): {f"{c} {s}": v for (c, s), v in rates.items()}
                                    for load, rates in results.items()},
                "ratios": {str(load): r for load, r in ratios.items()},
                "goals_met": not failures,
                "seconds": total,
            }, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
