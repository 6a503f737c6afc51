"""Throughput over an emulated network link, without root: env-steps/s beside num_envs / RTT.

A remote env's vector step is one round trip to its workers, so over a link
with round-trip time RTT a trainer that steps and waits can make at most
1 / RTT vector steps a second: ``num_envs / RTT`` env-steps/s. This script
measures how close ws_gym comes to that bound:

* ``gym.make_vec("ws_gym/Remote-v0", num_envs=N, env_id="CartPole-v1",
  port=0)``, N = 8 and 64, served by 2 worker processes
  (``python -m ws_gym.worker --num-envs N/2``, the token in ``WS_GYM_TOKEN``);
* each worker dials the trainer through its own ``benchmarks/netlink.py``
  ``Link``: a userspace TCP relay on 127.0.0.1 that delays every chunk by
  RTT / 2 in each direction (a pipeline, as a real link: the delay does not
  limit the throughput), so no root, ``tc`` or namespaces are needed;
* RTT 0 (the link adds no delay: the figure alone, no bound), 10, 40 and
  100 ms.

Each case is built (fresh links and workers), its first reset waits for the
workers, it is stepped for ``--warmup`` seconds untimed, then for ``--seconds``
of wall time with pre-sampled actions, counting vector steps, and closed. The
cases alternate, one round of all per repetition, so drift in the machine's
load hits all alike; the table shows medians and the ratio of the median to
the bound. The goal: CartPole at 40 ms RTT at least 0.95x of num_envs / RTT
for 8 and 64 envs.

The link's own timer wakes up to about 1 ms after a chunk's deadline (epoll
waits in whole milliseconds); the run prints how late its deliveries were, as
that lateness adds to every round trip (twice, once per direction).

    python benchmarks/network.py                 # default: 3 repetitions, about 2-3 minutes
    python benchmarks/network.py --quick         # smoke test: 8 envs at 0 and 10 ms, a few seconds
    python benchmarks/network.py --rtt 40 --envs 64 --json network.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import gymnasium as gym
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
for path in (ROOT, HERE):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))  # ws_gym from this checkout, and netlink beside this file

import ws_gym  # noqa: E402  (registers ws_gym/Remote-v0)
from netlink import Link  # noqa: E402
from processes import Children, child_env  # noqa: E402

ENV_ID = "CartPole-v1"
WORKERS = 2
ENVS = (8, 64)
RTTS_MS = (0, 10, 40, 100)
GOAL_RTT_MS = 40
GOAL = 0.95  # env-steps/s / (num_envs / RTT) at GOAL_RTT_MS
ACTION_POOL = 256
CONNECT_TIMEOUT = 60.0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=3.0, help="timed wall time per case and repetition (default 3)")
    p.add_argument("--warmup", type=float, default=0.5, help="untimed stepping after the first reset, s (default 0.5)")
    p.add_argument("--repeats", type=int, default=3, help="rounds of all cases; medians are reported (default 3)")
    p.add_argument("--envs", type=int, nargs="+", default=list(ENVS), help="num_envs values (default 8 64)")
    p.add_argument("--rtt", type=float, nargs="+", default=list(RTTS_MS), help="RTTs in ms (default 0 10 40 100)")
    p.add_argument("--seed", type=int, default=0, help="seed for reset() and the pre-sampled actions (default 0)")
    p.add_argument("--json", metavar="PATH", default=None, help="also write the results to PATH as JSON")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 8 envs at RTT 0 and 10 ms, 1 s timed, 1 repetition")
    args = p.parse_args()
    if args.quick:
        args.envs, args.rtt, args.seconds, args.warmup, args.repeats = [8], [0, 10], 1.0, 0.2, 1
    if args.seconds <= 0 or args.warmup < 0 or args.repeats < 1 or min(args.rtt) < 0:
        p.error("--seconds must be > 0, --warmup and --rtt >= 0, --repeats >= 1")
    if any(n < WORKERS or n % WORKERS for n in args.envs):
        p.error(f"--envs must be multiples of {WORKERS}")
    return args


# ---------------------------------------------------------------------------- one measurement

@dataclass
class Run:
    env_steps_per_s: float
    vector_steps: int
    seconds: float
    setup_s: float
    late_mean_ms: float  # the links' deliveries after their deadline
    late_max_ms: float


@dataclass
class Case:
    num_envs: int
    rtt_ms: float
    runs: list[Run] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.num_envs} envs, RTT {self.rtt_ms:g} ms"

    @property
    def bound(self) -> float | None:
        return self.num_envs / (self.rtt_ms / 1000) if self.rtt_ms > 0 else None

    def median(self, what: str) -> float:
        return statistics.median(getattr(r, what) for r in self.runs)

    def ratio(self) -> float | None:
        return None if self.bound is None else self.median("env_steps_per_s") / self.bound


def measure(case: Case, children: Children, args: argparse.Namespace) -> Run:
    """Build, start links and workers, reset, warm up, step ``args.seconds``, close (always)."""
    t0 = time.perf_counter()
    envs = gym.make_vec("ws_gym/Remote-v0", num_envs=case.num_envs, env_id=ENV_ID, port=0,
                        connect_timeout=CONNECT_TIMEOUT)
    links: list[Link] = []
    workers: list[tuple[subprocess.Popen, IO[bytes]]] = []
    try:
        url, token = envs.unwrapped.url, envs.unwrapped.token
        prefix = "ws://127.0.0.1:"
        assert url.startswith(prefix), url
        port_text, _, path = url[len(prefix):].partition("/")
        env = child_env(WS_GYM_TOKEN=token) if token else child_env()
        for _ in range(WORKERS):
            link = Link(int(port_text), delay_ms=case.rtt_ms / 2)
            links.append(link)
            link.start()
            log = tempfile.TemporaryFile()
            cmd = [sys.executable, "-m", "ws_gym.worker", "--url", f"{prefix}{link.port}/{path}",
                   "--env", ENV_ID, "--num-envs", str(case.num_envs // WORKERS)]
            workers.append((children.start(cmd, env, log), log))
        try:
            envs.reset(seed=args.seed)  # waits for the workers
        except BaseException:
            for proc, log in workers:
                log.seek(0)
                tail = log.read().decode("utf-8", "replace")[-2000:]
                print(f"worker {proc.pid} (exit code {proc.poll()}):\n{tail}", file=sys.stderr)
            raise
        setup = time.perf_counter() - t0
        envs.action_space.seed(args.seed)
        actions = [envs.action_space.sample() for _ in range(ACTION_POOL)]
        i = 0
        end = time.perf_counter() + args.warmup
        while time.perf_counter() < end:
            envs.step(actions[i % ACTION_POOL])
            i += 1
        late_before = [link.lateness() for link in links]
        steps = 0
        start = time.perf_counter()
        end = start + args.seconds
        now = start
        while now < end:
            envs.step(actions[(i + steps) % ACTION_POOL])
            steps += 1
            now = time.perf_counter()
        elapsed = now - start
        late_after = [link.lateness() for link in links]
    finally:
        envs.close()  # the workers exit when their trainer closes
        for proc, log in workers:
            children.stop(proc)
            log.close()
        for link in links:
            link.close()

    # the links' lateness over the timed steps only: from the running (count, mean, max)
    count = sum(a[0] - b[0] for a, b in zip(late_after, late_before))
    total = sum(a[0] * a[1] - b[0] * b[1] for a, b in zip(late_after, late_before))
    return Run(
        env_steps_per_s=steps * case.num_envs / elapsed,
        vector_steps=steps,
        seconds=elapsed,
        setup_s=setup,
        late_mean_ms=1000 * total / count if count else 0.0,
        late_max_ms=1000 * max(a[2] for a in late_after),
    )


# ---------------------------------------------------------------------------- reporting

def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def cpus_usable() -> int | None:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count()


def format_table(cases: list[Case]) -> str:
    header = (f"{'envs':>4}  {'RTT ms':>6}  {'env-steps/s':>11}  {'bound':>7}  {'ratio':>6}  {'link late ms':>12}  "
              f"{'setup s':>7}  repetitions (env-steps/s)")
    lines = [header, "-" * len(header)]
    for case in cases:
        bound, ratio = case.bound, case.ratio()
        reps = ", ".join(f"{r.env_steps_per_s:,.0f}" for r in case.runs)
        lines.append(
            f"{case.num_envs:>4}  {case.rtt_ms:>6g}  {case.median('env_steps_per_s'):>11,.0f}  "
            f"{'-' if bound is None else f'{bound:,.0f}':>7}  {'-' if ratio is None else f'{ratio:.3f}x':>6}  "
            f"{case.median('late_mean_ms'):>12.2f}  {case.median('setup_s'):>7.2f}  {reps}")
    return "\n".join(lines)


def verdict(cases: list[Case]) -> tuple[bool | None, str]:
    goal_cases = [c for c in cases if c.rtt_ms == GOAL_RTT_MS and c.num_envs in ENVS]
    goal_text = f"goal: CartPole at {GOAL_RTT_MS} ms RTT >= {GOAL}x of num_envs/RTT for 8 and 64 envs"
    if {c.num_envs for c in goal_cases} != set(ENVS):
        return None, f"verdict: not measured in this run ({goal_text})"
    ratios = ", ".join(f"{c.num_envs} envs {c.ratio():.3f}x" for c in goal_cases)
    met = all(c.ratio() >= GOAL for c in goal_cases)
    return met, f"verdict: goal {'met' if met else 'NOT met'}: {ratios} ({goal_text})"


# ---------------------------------------------------------------------------- main

def _interrupt(signum: int, frame: Any) -> None:
    """A SIGTERM ends the run as Ctrl-C does: through the blocks that end the processes."""
    raise KeyboardInterrupt


def main() -> int:
    args = parse_args()
    handler = logging.StreamHandler()
    handler.setLevel(logging.WARNING)
    logging.basicConfig(handlers=[handler], format="%(name)s %(levelname)s: %(message)s")
    logging.getLogger("ws_gym").setLevel(logging.INFO)
    signal.signal(signal.SIGTERM, _interrupt)

    print(f"python {platform.python_version()}, gymnasium {gym.__version__}, numpy {np.__version__}, "
          f"ws_gym {ws_gym.__version__}; cpus: {os.cpu_count()} (usable {cpus_usable()}), "
          f"load average {loadavg()}")
    print(f"{ENV_ID} over {WORKERS} worker processes (python -m ws_gym.worker), each dialing the trainer through "
          f"its own userspace link on 127.0.0.1 (benchmarks/netlink.py, one-way delay RTT/2 each way); "
          f"{args.seconds:g} s timed per case after {args.warmup:g} s warm-up, {args.repeats} repetition(s), "
          f"interleaved; bound = num_envs / RTT\n", flush=True)

    children = Children()
    cases = [Case(n, float(rtt)) for n in args.envs for rtt in args.rtt]
    started = time.perf_counter()
    try:
        for rep in range(args.repeats):
            order = cases if rep % 2 == 0 else cases[::-1]
            for case in order:
                run = measure(case, children, args)
                case.runs.append(run)
                bound = case.bound
                note = "" if bound is None else f"  {run.env_steps_per_s / bound:.3f}x of {bound:,.0f}"
                print(f"  round {rep + 1}/{args.repeats}  {case.name:<22} {run.env_steps_per_s:>9,.0f} env-steps/s"
                      f"{note}  link late {run.late_mean_ms:.2f} ms (max {run.late_max_ms:.2f})", flush=True)
    finally:
        children.stop_all()
    total = time.perf_counter() - started

    print()
    print("medians; ratio = env-steps/s / bound; link late = the mean time the links delivered a chunk after "
          "its deadline (adds twice to each round trip)")
    print(format_table(cases))
    print()
    met, line = verdict(cases)
    print(line)
    print(f"measured in {total:.0f} s, load average now {loadavg()}")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({
                "date": datetime.datetime.now().isoformat(timespec="seconds"),
                "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
                "machine": {"python": platform.python_version(), "platform": platform.platform(),
                            "cpu_count": os.cpu_count(), "cpus_usable": cpus_usable(),
                            "load_average": loadavg(), "gymnasium": gym.__version__,
                            "ws_gym": ws_gym.__version__},
                "config": {"seconds": args.seconds, "warmup": args.warmup, "repeats": args.repeats,
                           "seed": args.seed, "workers": WORKERS, "env_id": ENV_ID},
                "cases": [{"num_envs": c.num_envs, "rtt_ms": c.rtt_ms, "bound": c.bound, "ratio": c.ratio(),
                           "median_env_steps_per_s": c.median("env_steps_per_s"),
                           "runs": [asdict(r) for r in c.runs]} for c in cases],
                "goal": GOAL,
                "goal_rtt_ms": GOAL_RTT_MS,
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
