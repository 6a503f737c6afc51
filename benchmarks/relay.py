"""Throughput through a relay next to the same run direct: the cost of one extra hop.

With ``relay=`` the trainer and its workers both dial a relay
(``python -m ws_gym.relay``), which pairs each worker's connection with a data
connection of the trainer and from then on copies bytes between them without
decoding a frame. This script measures what that hop costs, side by side in
one run, on this machine (everything on 127.0.0.1):

* ``direct``: ``gym.make_vec("ws_gym/Remote-v0", num_envs=8,
  env_id="CartPole-v1", port=0)``, 2 worker processes
  (``python -m ws_gym.worker --url URL --num-envs 4``, the token in
  ``WS_GYM_TOKEN`` where there is one) dialing the trainer's TCP port;
* ``relay``: the same with ``relay=URL, relay_token=...``, the same 2 worker
  processes dialing ``envs.url`` (the room's URL on the relay); one relay
  process serves the whole run.

Both use command-line workers (not ``local_workers=``, which take the
trainer's Unix socket and busy-poll), so only the hop differs. Each case is
built, its first reset waits for the workers, it is warmed up (untimed), then
a fixed number of vector steps is timed with pre-sampled actions, and it is
closed again (the workers exit with it). The two cases alternate, one round of
both per repetition (which goes first alternates too), so drift in the
machine's load hits both alike; the table shows medians, and the ratio relay /
direct is the median of the repetitions' ratios.

Besides env-steps/s (a vector step counts 8) it reports, per vector step: the
trainer's wall time, the CPU time of the trainer, of the two workers and of
the relay (``/proc/<pid>/stat`` on Linux, else psutil if installed, else
"n/a"), read before and after the timed steps. A vector step makes the relay
forward 4 messages (2 requests to the workers, 2 replies), so its CPU is also
given per message, and as its share of one core (CPU seconds / wall seconds).
The goal: at least 0.6x of direct throughput with the extra hop.

The relay, the trainer and the workers run uvloop where it is installed
(``pip install "ws_gym[fast]"``; ``WS_GYM_UVLOOP=0`` turns it off), else
asyncio's loop; the run's first lines say which.

    python benchmarks/relay.py                 # default: 5 repetitions, 1-2 minutes on 2 cores
    python benchmarks/relay.py --quick         # smoke test: well under 30 s
    python benchmarks/relay.py --repeats 9 --json relay.json
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import logging
import os
import platform
import re
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import IO, Any

import gymnasium as gym
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
for path in (ROOT, HERE):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))  # ws_gym from this checkout (the relay and workers import it too)

import ws_gym  # noqa: E402  (registers ws_gym/Remote-v0)
from processes import Children, child_env  # noqa: E402
from ws_gym import loops  # noqa: E402

ENV_ID = "CartPole-v1"
NUM_ENVS = 8
WORKERS = 2  # NUM_ENVS / WORKERS envs each
CASES = ("direct", "relay")
MESSAGES_PER_STEP = 2 * WORKERS  # the relay forwards a request to each worker and each one's reply
GOAL = 0.6  # relay / direct throughput
ACTION_POOL = 256  # distinct pre-sampled actions, cycled through
CONNECT_TIMEOUT = 60.0  # seconds the first reset waits for the workers
LISTENING = re.compile(r"ws_gym relay: listening on (wss?://\S+)")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20_000,
                   help="timed vector steps per case and repetition (default 20000, several seconds: the "
                        "relay's CPU time is read in clock ticks of 10 ms); one counts 8 env-steps")
    p.add_argument("--warmup", type=int, default=300, help="untimed vector steps after the first reset (default 300)")
    p.add_argument("--repeats", type=int, default=5,
                   help="rounds of both cases; medians are reported (default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed for reset() and the pre-sampled actions (default 0)")
    p.add_argument("--json", metavar="PATH", default=None, help="also write the results to PATH as JSON")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 500 timed steps after 50 warm-up steps, 1 repetition")
    args = p.parse_args()
    if args.quick:
        args.steps, args.warmup, args.repeats = 500, 50, 1
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1:
        p.error("--steps and --repeats must be >= 1, --warmup >= 0")
    return args


# ---------------------------------------------------------------------------- CPU time of other processes

try:
    _TICKS = os.sysconf("SC_CLK_TCK")
except (AttributeError, ValueError, OSError):
    _TICKS = 0


def _proc_cpu(pid: int) -> float | None:
    """utime + stime of ``pid`` (all its threads) in seconds, from Linux's /proc."""
    if not _TICKS:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rpartition(b")")[2].split()  # the name in brackets may hold spaces
        return (int(fields[11]) + int(fields[12])) / _TICKS  # fields 14 and 15: utime, stime
    except (OSError, ValueError, IndexError):
        return None


def _psutil_cpu(pid: int) -> float | None:
    try:
        import psutil
        times = psutil.Process(pid).cpu_times()
        return times.user + times.system
    except Exception:  # not installed, or the process is gone
        return None


def cpu_source() -> str:
    """How other processes' CPU time is read here: "/proc", "psutil" or "n/a"."""
    if _proc_cpu(os.getpid()) is not None:
        return "/proc"
    if _psutil_cpu(os.getpid()) is not None:
        return "psutil"
    return "n/a"


CPU_SOURCE = cpu_source()


def machine_busy() -> float | None:
    """CPU seconds every process on this machine has used (Linux's /proc/stat), None elsewhere."""
    if not _TICKS:
        return None
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    except (OSError, ValueError):
        return None
    return (sum(fields) - fields[3] - fields[4]) / _TICKS


def cpu_seconds(pids: list[int]) -> float | None:
    """The CPU seconds (user + system) ``pids`` have used in all, None if unknown."""
    read = {"/proc": _proc_cpu, "psutil": _psutil_cpu}.get(CPU_SOURCE)
    if read is None:
        return None
    total = 0.0
    for pid in pids:
        seconds = read(pid)
        if seconds is None:
            return None
        total += seconds
    return total


class Relay:
    """``python -m ws_gym.relay`` on 127.0.0.1, a free port; its output is read
    by a thread (the last lines kept, to show if something goes wrong)."""

    def __init__(self, children: Children) -> None:
        self.token = secrets.token_urlsafe(24)
        self.lines: collections.deque[str] = collections.deque(maxlen=50)
        self.proc = children.start(
            [sys.executable, "-m", "ws_gym.relay", "--host", "127.0.0.1", "--port", "0", "--log-level", "WARNING"],
            child_env(WS_GYM_RELAY_TOKEN=self.token), subprocess.PIPE)
        assert self.proc.stdout is not None
        listening: list[str] = []
        found = threading.Event()

        def read() -> None:
            for raw in self.proc.stdout:  # type: ignore[union-attr]
                line = raw.decode("utf-8", "replace").rstrip()
                self.lines.append(line)
                match = LISTENING.search(line)
                if match and not found.is_set():
                    listening.append(match.group(1))
                    found.set()
            found.set()  # it ended

        threading.Thread(target=read, daemon=True, name="relay output").start()
        if not found.wait(30) or not listening:
            raise RuntimeError("the relay did not say where it listens:\n" + "\n".join(self.lines))
        self.url = listening[0]
        self.pid = self.proc.pid

    def check(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"the relay ended (exit code {self.proc.returncode}):\n" + "\n".join(self.lines))


# ---------------------------------------------------------------------------- one measurement

@dataclass
class Run:
    """One case in one repetition; times per vector step in microseconds."""

    env_steps_per_s: float
    wall_us: float
    trainer_cpu_us: float
    workers_cpu_us: float | None
    relay_cpu_us: float | None  # relay only
    relay_cpu_share: float | None  # relay CPU seconds / wall seconds while stepping
    others_cores: float | None  # CPU of every other process on the machine while stepping, in cores
    setup_s: float  # construction + first reset (the workers start and connect)


@dataclass
class Case:
    name: str
    runs: list[Run] = field(default_factory=list)

    def median(self, what: str) -> float | None:
        values = [getattr(r, what) for r in self.runs]
        return None if any(v is None for v in values) else statistics.median(values)


def make_envs(case: str, relay: Relay) -> Any:
    if case == "relay":
        return gym.make_vec("ws_gym/Remote-v0", num_envs=NUM_ENVS, env_id=ENV_ID, relay=relay.url,
                            relay_token=relay.token, connect_timeout=CONNECT_TIMEOUT)
    return gym.make_vec("ws_gym/Remote-v0", num_envs=NUM_ENVS, env_id=ENV_ID, port=0,
                        connect_timeout=CONNECT_TIMEOUT)


def measure(case: str, relay: Relay, children: Children, args: argparse.Namespace) -> Run:
    """Build, start the workers, reset, warm up, time ``args.steps`` steps, close (always)."""
    relay.check()
    t0 = time.perf_counter()
    envs = make_envs(case, relay)
    workers: list[tuple[subprocess.Popen, IO[bytes]]] = []
    try:
        url, token = envs.unwrapped.url, envs.unwrapped.token
        if case == "direct":
            assert url.startswith("ws://127.0.0.1:"), url  # the trainer's own TCP port
        else:
            assert url.startswith(relay.url + "/room/"), url
        env = child_env(WS_GYM_TOKEN=token) if token else child_env()
        for _ in range(WORKERS):
            log = tempfile.TemporaryFile()
            workers.append((children.start([sys.executable, "-m", "ws_gym.worker", "--url", url, "--num-envs",
                                            str(NUM_ENVS // WORKERS)], env, log), log))
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
        for i in range(args.warmup):
            envs.step(actions[i % ACTION_POOL])

        pids = [proc.pid for proc, _ in workers]
        workers_before = cpu_seconds(pids)
        relay_before = cpu_seconds([relay.pid])  # in the direct case too: it is not one of "the others"
        busy_before = machine_busy()
        cpu_before = time.process_time()
        start = time.perf_counter()
        for i in range(args.steps):
            envs.step(actions[i % ACTION_POOL])
        elapsed = time.perf_counter() - start
        trainer_cpu = time.process_time() - cpu_before
        busy_after = machine_busy()
        relay_after = cpu_seconds([relay.pid])
        workers_after = cpu_seconds(pids)
    finally:
        envs.close()  # the workers exit when their trainer closes
        for proc, log in workers:
            children.stop(proc)
            log.close()

    per_step = 1e6 / args.steps
    relay_cpu = None if relay_before is None or relay_after is None else relay_after - relay_before
    workers_cpu = None if workers_before is None or workers_after is None else workers_after - workers_before
    others = None
    if None not in (busy_before, busy_after, relay_cpu, workers_cpu):
        others = max(0.0, (busy_after - busy_before - trainer_cpu - relay_cpu - workers_cpu) / elapsed)
    if case == "direct":
        relay_cpu = None  # idle: nothing passes through it
    return Run(
        env_steps_per_s=args.steps * NUM_ENVS / elapsed,
        wall_us=elapsed * per_step,
        trainer_cpu_us=trainer_cpu * per_step,
        workers_cpu_us=None if workers_cpu is None else workers_cpu * per_step,
        relay_cpu_us=None if relay_cpu is None else relay_cpu * per_step,
        relay_cpu_share=None if relay_cpu is None else relay_cpu / elapsed,
        others_cores=others,
        setup_s=setup,
    )


# ---------------------------------------------------------------------------- reporting

def machine_info() -> dict[str, Any]:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()

    def ver(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return {
        "python": f"{platform.python_version()} ({platform.python_implementation()})",
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "load_average": loadavg(),
        "gymnasium": gym.__version__,
        "numpy": np.__version__,
        "aiohttp": ver("aiohttp"),
        "orjson": ver("orjson"),
        "ws_gym": ws_gym.__version__,
        # the relay and the workers run in this environment, so they decide alike
        "event_loop": "uvloop" if loops.uvloop_module() is not None else "asyncio",
        "uvloop": ver("uvloop"),
        "cpu_time_source": CPU_SOURCE,
    }


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def format_table(cases: dict[str, Case]) -> str:
    header = (f"{'case':<6}  {'env-steps/s':>11}  {'wall us':>7}  {'trainer CPU':>11}  {'workers CPU':>11}  "
              f"{'relay CPU':>9}  {'relay us/msg':>12}  {'relay share':>11}  {'others':>6}  {'setup s':>7}  "
              "repetitions (env-steps/s)")
    lines = [header, "-" * len(header)]
    for case in cases.values():
        if case.name == "relay":
            relay_us, share = case.median("relay_cpu_us"), case.median("relay_cpu_share")
            relay_cols = (fmt(relay_us, ".1f"), fmt(None if relay_us is None else relay_us / MESSAGES_PER_STEP, ".1f"),
                          "n/a" if share is None else f"{100 * share:.0f} %")
        else:
            relay_cols = ("-", "-", "-")
        reps = ", ".join(f"{r.env_steps_per_s:,.0f}" for r in case.runs)
        lines.append(
            f"{case.name:<6}  {case.median('env_steps_per_s'):>11,.0f}  {case.median('wall_us'):>7.1f}  "
            f"{case.median('trainer_cpu_us'):>11.1f}  {fmt(case.median('workers_cpu_us'), '.1f'):>11}  "
            f"{relay_cols[0]:>9}  {relay_cols[1]:>12}  {relay_cols[2]:>11}  "
            f"{fmt(case.median('others_cores'), '.2f'):>6}  {case.median('setup_s'):>7.2f}  {reps}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- main

def _interrupt(signum: int, frame: Any) -> None:
    """A SIGTERM ends the run as Ctrl-C does: through the blocks that end the processes."""
    raise KeyboardInterrupt


def main() -> int:
    args = parse_args()
    # ws_gym logs the worker command at INFO on each first reset; let INFO through the
    # logger but drop it at the handler, so only warnings and errors are shown.
    handler = logging.StreamHandler()
    handler.setLevel(logging.WARNING)
    logging.basicConfig(handlers=[handler], format="%(name)s %(levelname)s: %(message)s")
    logging.getLogger("ws_gym").setLevel(logging.INFO)
    signal.signal(signal.SIGTERM, _interrupt)

    info = machine_info()
    print(f"python {info['python']} on {info['platform']}")
    print(f"gymnasium {info['gymnasium']}, numpy {info['numpy']}, aiohttp {info['aiohttp']}, "
          f"orjson {info['orjson']}, ws_gym {info['ws_gym']}")
    print(f"cpus: {info['cpu_count']} (usable {info['cpus_usable']}), load average {info['load_average']}")
    loop_note = ("uvloop" if info["event_loop"] == "uvloop" else
                 "asyncio's (uvloop " + ("not installed; pip install \"ws_gym[fast]\" adds it)"
                                         if info["uvloop"] == "not installed" else "turned off by WS_GYM_UVLOOP=0)"))
    print(f"event loop of the relay, trainer and workers: {loop_note}; "
          f"other processes' CPU time from {CPU_SOURCE}")
    print(f"{args.steps} timed vector steps after {args.warmup} warm-up steps, {args.repeats} repetition(s); "
          f"{NUM_ENVS} x {ENV_ID} over {WORKERS} worker processes (python -m ws_gym.worker), all on 127.0.0.1; "
          f"relay: one python -m ws_gym.relay for the whole run\n", flush=True)

    children = Children()
    cases = {name: Case(name) for name in CASES}
    started = time.perf_counter()
    try:
        relay = Relay(children)
        for rep in range(args.repeats):
            order = CASES if rep % 2 == 0 else CASES[::-1]
            for name in order:
                run = measure(name, relay, children, args)
                cases[name].runs.append(run)
                extra = (f"  relay CPU {fmt(run.relay_cpu_us, '.1f')} us/step" if name == "relay" else "")
                print(f"  round {rep + 1}/{args.repeats}  {name:<6} {run.env_steps_per_s:>9,.0f} env-steps/s  "
                      f"{run.wall_us:6.1f} us/step  others {fmt(run.others_cores, '.2f')} cores{extra}", flush=True)
        relay.check()
    finally:
        children.stop_all()
    total = time.perf_counter() - started

    direct, relayed = cases["direct"], cases["relay"]
    ratios = [r.env_steps_per_s / d.env_steps_per_s for r, d in zip(relayed.runs, direct.runs)]
    ratio = statistics.median(ratios)
    relay_us = relayed.median("relay_cpu_us")
    share = relayed.median("relay_cpu_share")
    extra_wall = relayed.median("wall_us") - direct.median("wall_us")

    print()
    print("per vector step (8 env-steps), medians: wall us = the trainer's step() time; CPU in us "
          "(trainer: this process; workers: both); others: the CPU of every other process on the machine "
          "while stepping, in cores")
    print(format_table(cases))
    print()
    print(f"relay / direct: {ratio:.2f}x (median of the repetitions' ratios: "
          f"{', '.join(f'{r:.2f}' for r in ratios)})")
    print(f"the extra hop: {extra_wall:+.1f} us of wall time per vector step; the relay's CPU "
          f"{fmt(relay_us, '.1f')} us per vector step, "
          f"{fmt(None if relay_us is None else relay_us / MESSAGES_PER_STEP, '.1f')} us per forwarded message "
          f"({MESSAGES_PER_STEP} a step: {WORKERS} requests + {WORKERS} replies), "
          f"{fmt(None if share is None else 100 * share, '.0f')} % of a core while stepping")
    met = ratio >= GOAL
    print(f"verdict: goal {'met' if met else 'NOT met'}: relay / direct {ratio:.2f}x "
          f"(goal >= {GOAL}x with one extra hop)")
    print(f"measured in {total:.0f} s, load average now {loadavg()}")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({
                "date": datetime.datetime.now().isoformat(timespec="seconds"),
                "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
                "machine": info,
                "config": {"steps": args.steps, "warmup": args.warmup, "repeats": args.repeats, "seed": args.seed,
                           "num_envs": NUM_ENVS, "workers": WORKERS, "env_id": ENV_ID},
                "cases": {name: {"runs": [asdict(r) for r in case.runs],
                                 "median": {k: case.median(k) for k in asdict(case.runs[0])}}
                          for name, case in cases.items()},
                "ratio_relay_direct": ratio,
                "ratios": ratios,
                "relay_cpu_us_per_step": relay_us,
                "relay_cpu_us_per_message": None if relay_us is None else relay_us / MESSAGES_PER_STEP,
                "relay_cpu_share": share,
                "goal": GOAL,
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
