"""What a dashboard reader costs the stepping: env-steps/s with and without a
client polling ``/status`` every 100 ms.

The trainer keeps its statistics with a few integer and numpy operations per
step on the caller's thread (always, reader or not) and answers ``/status``
from its event loop thread; this measures what a reader adds, against the
goal: at least 0.97x of the throughput without one.

8 CartPole-v1 over 2 local workers
(``gym.make_vec("ws_gym/Remote-v0", num_envs=8, env_id="CartPole-v1", local_workers=2, port=0)``),
one env per repetition (fresh workers each), reset and warmed up (untimed),
then stepped in turns of a quarter second: ``without`` (nobody reads) and
``with`` (a reader process fetches ``envs.dashboard_url + "status"`` with
urllib once per ``--interval`` seconds of the ``with`` turns), until each has
stepped for ``--seconds``; which goes first alternates. Both share the same
processes and the same minutes, so the machine's drift and where the
scheduler put the workers hit both alike. The reader is a process of its own,
as a browser is, but on the same 2 cores: its CPU counts against ``with``
too. It prints each repetition, the medians, the median of the repetitions'
ratios with / without, and a verdict.

    python benchmarks/dashboard.py            # default: about a minute on 2 cores
    python benchmarks/dashboard.py --quick    # smoke test: a few seconds
    python benchmarks/dashboard.py --repeats 9 --json out.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
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
CASES = ("without", "with")
GOAL = 0.97  # with / without
CHUNK = 0.25  # seconds one case steps before the other takes over


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=5.0, help="timed seconds per case and repetition (default 5)")
    p.add_argument("--warmup", type=float, default=1.0, help="untimed seconds of stepping after reset (default 1)")
    p.add_argument("--repeats", type=int, default=7, help="repetitions, each with fresh workers; medians (default 7)")
    p.add_argument("--interval", type=float, default=0.1, help="seconds between the reader's requests (default 0.1)")
    p.add_argument("--json", metavar="PATH", default=None, help="also write the results to PATH as JSON")
    p.add_argument("--quick", action="store_true", help="smoke test: 0.5 s timed after 0.2 s warm-up, 1 repetition")
    args = p.parse_args()
    if args.quick:
        args.seconds, args.warmup, args.repeats = 0.5, 0.2, 1
    if args.repeats < 1 or args.seconds <= 0 or args.warmup < 0 or args.interval <= 0:
        p.error("--repeats must be >= 1, --seconds and --interval > 0, --warmup >= 0")
    return args


# The reader, in a process of its own as a browser would be: reads '1' (read on),
# '0' (off) and 'q' (quit: print the counts) on stdin; while on, fetches the URL
# once per `interval` seconds of on-time.
READER = r"""
import json, os, select, sys, time, urllib.request
url, interval = sys.argv[1], float(sys.argv[2])
on, on_time, next_read, last = False, 0.0, 0.0, time.monotonic()
reads, spent, failures = 0, 0.0, []
while True:
    now = time.monotonic()
    on_time += now - last if on else 0.0
    last = now
    if on and on_time >= next_read:
        start = time.monotonic()
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                response.read()
                if response.status != 200:
                    failures.append(f"HTTP {response.status}")
        except OSError as exc:
            failures.append(repr(exc))
        spent += time.monotonic() - start
        reads += 1
        next_read += interval
        continue
    ready, _, _ = select.select([0], [], [], max(0.0, next_read - on_time) if on else None)
    if not ready:
        continue
    data = os.read(0, 64).decode()
    if not data or "q" in data:
        print(json.dumps({"reads": reads, "seconds": spent, "failures": failures[:3]}), flush=True)
        break
    now = time.monotonic()  # on-time counted up to the switch
    on_time += now - last if on else 0.0
    last = now
    on = data[-1] == "1"
"""


class Reader:
    """A dashboard client in another process: ``GET /status`` every ``interval``
    seconds while it is on."""

    def __init__(self, url: str, interval: float) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", READER, url, str(interval)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def switch(self, on: bool) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("1" if on else "0")
        self.proc.stdin.flush()

    def close(self) -> dict[str, Any]:
        """Its counts: ``reads``, ``seconds`` (waiting for answers, summed), ``failures``."""
        try:
            out, _ = self.proc.communicate("q", timeout=15)
            return json.loads(out)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.communicate(timeout=10)


def step_for(envs: Any, actions: list, seconds: float) -> int:
    """Step for about ``seconds``; returns the env-steps made."""
    clock = time.perf_counter
    end = clock() + seconds
    calls = 0
    while True:
        for _ in range(32):
            envs.step(actions[calls % len(actions)])
            calls += 1
        if clock() >= end:
            return calls * envs.num_envs


def measure(args: argparse.Namespace, first: int) -> tuple[dict[str, float], int, float]:
    """One repetition: ({case: env-steps/s}, the reader's reads, its mean answer time in ms)."""
    envs = gym.make_vec("ws_gym/Remote-v0", num_envs=8, env_id=ENV_ID, local_workers=2, port=0)
    reader = None
    try:
        envs.reset(seed=0)
        envs.action_space.seed(0)
        actions = [envs.action_space.sample() for _ in range(256)]
        reader = Reader(envs.unwrapped.dashboard_url + "status", args.interval)
        if args.warmup:
            step_for(envs, actions, args.warmup)
        order = CASES if first == 0 else CASES[::-1]
        steps = dict.fromkeys(CASES, 0)
        spent = dict.fromkeys(CASES, 0.0)
        chunk = min(CHUNK, args.seconds)
        while min(spent.values()) < args.seconds:
            for case in order:
                reader.switch(case == "with")
                start = time.perf_counter()
                steps[case] += step_for(envs, actions, chunk)
                spent[case] += time.perf_counter() - start
        reader.switch(False)
        counts, reader = reader.close(), None
        if counts["failures"]:
            raise RuntimeError(f"the reader's requests failed: {counts['failures']}")
        rates = {case: steps[case] / spent[case] for case in CASES}
        return rates, counts["reads"], 1000 * counts["seconds"] / max(1, counts["reads"])
    finally:
        if reader is not None:
            reader.close()
        envs.close()


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def main() -> int:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s: %(message)s")
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count()
    print(f"python {sys.version.split()[0]}, gymnasium {gym.__version__}, ws_gym {ws_gym.__version__}, "
          f"cpus usable {cpus}, load average {loadavg()}")
    print(f"8 {ENV_ID} over 2 local workers; {args.seconds:g} s timed per case after {args.warmup:g} s warm-up, "
          f"{args.repeats} repetition(s); with = a reader fetching /status every {args.interval * 1000:g} ms\n",
          flush=True)

    rates: dict[str, list[float]] = {case: [] for case in CASES}
    ratios, polls, answer_ms = [], 0, []
    started = time.perf_counter()
    for rep in range(args.repeats):
        pair, n, ms = measure(args, rep % 2)
        for case in CASES:
            rates[case].append(pair[case])
        ratios.append(pair["with"] / pair["without"])
        polls += n
        answer_ms.append(ms)
        print(f"  round {rep + 1}/{args.repeats}  without {pair['without']:>9,.0f}  with {pair['with']:>9,.0f} "
              f"env-steps/s  ({pair['with'] / pair['without']:.3f}x; {n} reads, {ms:.2f} ms each)", flush=True)
    total = time.perf_counter() - started

    print()
    header = f"{'case':<8}  {'env-steps/s':>11}  repetitions (env-steps/s)"
    print(header)
    print("-" * len(header))
    for case in CASES:
        print(f"{case:<8}  {statistics.median(rates[case]):>11,.0f}  {', '.join(f'{r:,.0f}' for r in rates[case])}")
    ratio = statistics.median(ratios)
    print(f"\nwith / without: {ratio:.3f}x (median of the repetitions' ratios: "
          f"{', '.join(f'{r:.3f}' for r in ratios)}); {polls} reads of /status, "
          f"{statistics.median(answer_ms):.2f} ms each (median)")
    met = ratio >= GOAL
    print(f"verdict: {'goal met' if met else 'goal NOT met'} (with / without {ratio:.3f}x, goal >= {GOAL}x)")
    print(f"measured in {total:.0f} s, load average now {loadavg()}")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({
                "date": datetime.datetime.now().isoformat(timespec="seconds"),
                "cpus_usable": cpus,
                "config": {k: getattr(args, k) for k in ("seconds", "warmup", "repeats", "interval")},
                "env_steps_per_s": rates,
                "ratios": ratios,
                "ratio": ratio,
                "reads": polls,
                "goal_met": met,
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
