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

A second group, ``frames``, measures compressed observations
(``compression=``): ``ws_gym/CartPolePixels-v0`` (CartPole drawn into 84x84
grayscale frames, the last 4 stacked: 84x84x4 uint8, 28 kB an env-step), 32
envs over 2 workers, each worker's link at 40 ms RTT and 20 Mbit/s each way.
Plain frames cannot beat the links' bandwidth: the bound is (2 links x 20
Mbit/s) / (bytes an env-step sends plain); the goal is compression at least
3x none (medians). ``compression="auto"`` never compresses on loopback, and
these links are on 127.0.0.1: here the compressed case names the codec auto
picks on another machine's connection (zstd, else lz4) explicitly. With
``--netns`` (root), the links run between network namespaces, which are not
loopback, and the case is ``"auto"`` itself.

A third group, ``uneven``, measures partial batches: 2 workers of 8
``CartPole-v1`` envs, one at 10 ms RTT and one at 80 ms, stepped with
``step()`` (every step waits for the slower worker: bound 16 / 80 ms) and
with ``send``/``recv`` and ``batch_size=8`` (each worker's envs come back
on their own: bound 8 / 10 ms + 8 / 80 ms). The goal: ``recv`` at least 3x
``step``.

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

    python benchmarks/network.py                 # default: 3 repetitions, about 3-4 minutes
    python benchmarks/network.py --quick         # smoke test: 8 envs at 0 and 10 ms, frames 8 envs, seconds
    python benchmarks/network.py --rtt 40 --envs 64 --json network.json
    python benchmarks/network.py --group frames  # compressed observations only
    python benchmarks/network.py --group uneven  # partial batches only
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
from typing import IO, Any, Callable

import gymnasium as gym
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
for path in (ROOT, HERE):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))  # ws_gym from this checkout, and netlink beside this file

import ws_gym  # noqa: E402  (registers ws_gym/Remote-v0)
from ws_gym.compression import available as available_codecs  # noqa: E402
from netlink import Link  # noqa: E402
from netns_link import NetnsLinks, unavailable as netns_unavailable  # noqa: E402
from processes import Children, child_env  # noqa: E402

ENV_ID = "CartPole-v1"
WORKERS = 2
ENVS = (8, 64)
RTTS_MS = (0, 10, 40, 100)
GOAL_RTT_MS = 40
GOAL = 0.95  # env-steps/s / (num_envs / RTT) at GOAL_RTT_MS
ACTION_POOL = 256
CONNECT_TIMEOUT = 60.0
LOOPBACK = "127.0.0.1"

FRAMES_ENV = "ws_gym/CartPolePixels-v0"
FRAMES_ENVS = 32
FRAMES_RTT_MS = 40
FRAMES_RATE_MBIT = 20.0  # per worker link, each way
FRAMES_GOAL = 3.0  # auto / none, medians
FRAMES_STEP_BYTES = 84 * 84 * 4 + 8 + 2  # an env-step's plain reply: observation, reward, 2 flags
UNEVEN_RTTS_MS = (10.0, 80.0)  # one worker at each
UNEVEN_ENVS_EACH = 8
UNEVEN_GOAL = 3.0  # recv / step, medians
GROUPS = ("cartpole", "frames", "uneven")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=3.0, help="timed wall time per case and repetition (default 3)")
    p.add_argument("--warmup", type=float, default=0.5, help="untimed stepping after the first reset, s (default 0.5)")
    p.add_argument("--repeats", type=int, default=3, help="rounds of all cases; medians are reported (default 3)")
    p.add_argument("--envs", type=int, nargs="+", default=list(ENVS), help="num_envs values (default 8 64)")
    p.add_argument("--rtt", type=float, nargs="+", default=list(RTTS_MS), help="RTTs in ms (default 0 10 40 100)")
    p.add_argument("--seed", type=int, default=0, help="seed for reset() and the pre-sampled actions (default 0)")
    p.add_argument("--json", metavar="PATH", default=None, help="also write the results to PATH as JSON")
    p.add_argument("--group", choices=GROUPS, nargs="+", default=list(GROUPS),
                   help="which cases: cartpole (num_envs / RTT), frames (compression), uneven (partial batches); "
                        "default all")
    p.add_argument("--frames-envs", type=int, default=FRAMES_ENVS, help=f"frames: num_envs (default {FRAMES_ENVS})")
    p.add_argument("--netns", action="store_true",
                   help="links between network namespaces (root; benchmarks/netns_link.py) instead of userspace "
                        "links on 127.0.0.1: not loopback, so compression='auto' itself is measured")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 8 envs at RTT 0 and 10 ms, frames with 8 envs, 1 s timed, 1 repetition")
    args = p.parse_args()
    if args.quick:
        args.envs, args.rtt, args.seconds, args.warmup, args.repeats = [8], [0, 10], 1.0, 0.2, 1
        args.frames_envs = 8
    if args.seconds <= 0 or args.warmup < 0 or args.repeats < 1 or min(args.rtt) < 0:
        p.error("--seconds must be > 0, --warmup and --rtt >= 0, --repeats >= 1")
    if any(n < WORKERS or n % WORKERS for n in [*args.envs, args.frames_envs]):
        p.error(f"--envs and --frames-envs must be multiples of {WORKERS}")
    if args.netns and (why := netns_unavailable()):
        p.error(f"--netns: {why}")
    return args


# ---------------------------------------------------------------------------- the links


class LoopbackLinks:
    """Each worker dials the trainer through a userspace ``Link`` of its own on 127.0.0.1."""

    host = LOOPBACK
    kind = "userspace links on 127.0.0.1 (benchmarks/netlink.py)"

    def __init__(self) -> None:
        self.links: list[Link] = []

    def open(self, trainer_port: int, rtts: tuple[float, ...], rate_mbit: float | None) -> None:
        for rtt in rtts:
            self.links.append(Link(trainer_port, delay_ms=rtt / 2, rate_mbit=rate_mbit))
            self.links[-1].start()

    def worker_url(self, i: int, url: str) -> str:
        head, _, rest = url.partition(f"{LOOPBACK}:")
        return f"{head}{LOOPBACK}:{self.links[i].port}/{rest.partition('/')[2]}"

    def worker_argv(self, i: int, argv: list[str]) -> list[str]:
        return argv

    def lateness(self) -> list[tuple[int, float, float]]:
        return [link.lateness() for link in self.links]

    def close_case(self) -> None:
        for link in self.links:
            link.close()
        self.links = []


class NamespaceLinks:
    """The trainer in a network namespace of its own, each worker in another, a delay
    line (or netem) between: real TCP between separate network stacks, not loopback."""

    kind = "network namespaces (benchmarks/netns_link.py)"

    def __init__(self) -> None:
        self.net = NetnsLinks(workers=WORKERS).create()
        self.net.enter("t")  # this process's sockets from now on are the trainer namespace's
        self.host = self.net.trainer_host

    def open(self, trainer_port: int, rtts: tuple[float, ...], rate_mbit: float | None) -> None:
        for i, rtt in enumerate(rtts):
            self.net.set_link(i, rtt / 2, rate_mbit)

    def worker_url(self, i: int, url: str) -> str:
        return url

    def worker_argv(self, i: int, argv: list[str]) -> list[str]:
        return self.net.worker_argv(i, argv)

    def lateness(self) -> list[tuple[int, float, float]]:
        return [self.net.lateness(i) for i in range(WORKERS)]

    def close_case(self) -> None:
        pass

    def close(self) -> None:
        self.net.close()


# ---------------------------------------------------------------------------- one measurement

@dataclass
class Run:
    env_steps_per_s: float
    vector_steps: int  # step() calls, or recv() calls
    seconds: float
    setup_s: float
    late_mean_ms: float  # the links' deliveries after their deadline
    late_max_ms: float
    compressed: str = "none"  # the codec the trainer chose for its workers' connections
    wire_ratio: float = 0.0  # observation bytes / bytes on the wire, of those sent compressed


@dataclass
class Case:
    """One measured setup; a group of cases shares a table and a verdict (GROUPS)."""

    num_envs: int
    rtt_ms: float
    group: str = "cartpole"
    env_id: str = ENV_ID
    rate_mbit: float | None = None  # per worker link, each way (None: no limit)
    compression: str = "auto"
    worker_rtts: tuple[float, ...] = ()  # one RTT per worker's link (default: rtt_ms for each)
    batch_size: int | None = None  # send()/recv() with this batch_size (None: step())
    runs: list[Run] = field(default_factory=list)

    @property
    def rtts(self) -> tuple[float, ...]:
        return self.worker_rtts or (self.rtt_ms,) * WORKERS

    @property
    def name(self) -> str:
        if self.group == "frames":
            return f"frames {self.num_envs} envs, {self.compression}"
        if self.group == "uneven":
            return f"uneven {self.num_envs} envs, {'recv' if self.batch_size else 'step'}"
        return f"{self.num_envs} envs, RTT {self.rtt_ms:g} ms"

    @property
    def bound(self) -> float | None:
        """The most env-steps/s plain frames can make: num_envs / RTT, and with a
        rate, the links' bandwidth / the bytes an env-step sends plain. Uneven
        links: step() waits for the slowest; recv() takes each worker's envs as
        they come."""
        if self.worker_rtts:
            each = self.num_envs / len(self.worker_rtts)
            if self.batch_size:
                return sum(each / (rtt / 1000) for rtt in self.worker_rtts)
            return self.num_envs / (max(self.worker_rtts) / 1000)
        bounds = []
        if self.rtt_ms > 0:
            bounds.append(self.num_envs / (self.rtt_ms / 1000))
        if self.rate_mbit:
            bounds.append(WORKERS * self.rate_mbit * 1e6 / 8 / FRAMES_STEP_BYTES)
        return min(bounds) if bounds else None

    def median(self, what: str) -> float:
        return statistics.median(getattr(r, what) for r in self.runs)

    def ratio(self) -> float | None:
        return None if self.bound is None else self.median("env_steps_per_s") / self.bound


def measure(case: Case, children: Children, links: Any, args: argparse.Namespace) -> Run:
    """Build, start links and workers, reset, warm up, step ``args.seconds``, close (always)."""
    t0 = time.perf_counter()
    envs = gym.make_vec("ws_gym/Remote-v0", num_envs=case.num_envs, env_id=case.env_id, port=0, host=links.host,
                        connect_timeout=CONNECT_TIMEOUT, compression=case.compression, batch_size=case.batch_size)
    remote = envs.unwrapped
    workers: list[tuple[subprocess.Popen, IO[bytes]]] = []
    try:
        url, token = remote.url, remote.token
        links.open(int(url.rsplit(":", 1)[1].partition("/")[0]), case.rtts, case.rate_mbit)
        env = child_env(WS_GYM_TOKEN=token) if token else child_env()
        for i in range(len(case.rtts)):
            log = tempfile.TemporaryFile()
            cmd = [sys.executable, "-m", "ws_gym.worker", "--url", links.worker_url(i, url),
                   "--env", case.env_id, "--num-envs", str(case.num_envs // len(case.rtts)), "--quiet"]
            workers.append((children.start(links.worker_argv(i, cmd), env, log), log))
        try:
            envs.reset(seed=args.seed)  # waits for the workers
        except BaseException:
            for proc, log in workers:
                log.seek(0)
                tail = log.read().decode("utf-8", "replace")[-2000:]
                print(f"worker {proc.pid} (exit code {proc.poll()}):\n{tail}", file=sys.stderr)
            raise
        setup = time.perf_counter() - t0
        advance = stepper(remote, case, args.seed)
        end = time.perf_counter() + args.warmup
        while time.perf_counter() < end:
            advance()
        late_before = links.lateness()
        steps = env_steps = 0
        start = time.perf_counter()
        end = start + args.seconds
        now = start
        while now < end:
            env_steps += advance()
            steps += 1
            now = time.perf_counter()
        elapsed = now - start
        late_after = links.lateness()
        compressed, wire_ratio = compression_seen(envs)
    finally:
        envs.close()  # the workers exit when their trainer closes
        for proc, log in workers:
            children.stop(proc)
            log.close()
        links.close_case()

    # the links' lateness over the timed steps only: from the running (count, mean, max)
    count = sum(a[0] - b[0] for a, b in zip(late_after, late_before))
    total = sum(a[0] * a[1] - b[0] * b[1] for a, b in zip(late_after, late_before))
    return Run(
        env_steps_per_s=env_steps / elapsed,
        vector_steps=steps,
        seconds=elapsed,
        setup_s=setup,
        late_mean_ms=1000 * total / count if count else 0.0,
        late_max_ms=1000 * max(a[2] for a in late_after),
        compressed=compressed,
        wire_ratio=wire_ratio,
    )


def stepper(remote: Any, case: Case, seed: int) -> Callable[[], int]:
    """One call that steps (``step()``, or ``recv()`` then ``send()``) with pre-sampled
    actions; it returns how many env results it got."""
    n = case.batch_size or case.num_envs
    space = gym.vector.utils.batch_space(remote.single_action_space, n)
    space.seed(seed)
    actions = [space.sample() for _ in range(ACTION_POOL)]
    count = iter(range(1 << 62))
    if case.batch_size is None:
        def step() -> int:
            remote.step(actions[next(count) % ACTION_POOL])
            return n
        return step
    remote.async_reset(seed=seed)

    def recv_send() -> int:
        _, _, _, _, _, env_ids = remote.recv()
        remote.send(actions[next(count) % ACTION_POOL], env_ids)
        return n
    return recv_send


def compression_seen(envs: Any) -> tuple[str, float]:
    """The codec(s) the trainer chose for its workers, and the ratio of what was compressed
    (read from the trainer's connections: a benchmark's look inside)."""
    conns = list(envs.unwrapped._trainer.table.conns)
    names = sorted({c.compression for c in conns}) or ["none"]
    unzips = [u for u in (getattr(c.codec, "unzip", None) for c in conns) if u is not None]
    wire = sum(u.wire_bytes for u in unzips)
    return "+".join(names), (sum(u.raw_bytes for u in unzips) / wire if wire else 0.0)


# ---------------------------------------------------------------------------- the case groups

def cartpole_cases(args: argparse.Namespace) -> list[Case]:
    return [Case(n, float(rtt)) for n in args.envs for rtt in args.rtt]


def frames_cases(args: argparse.Namespace) -> list[Case]:
    """none against auto between namespaces; on loopback links, where auto stays
    off, against the codec auto picks on another machine's connection, named."""
    codecs = available_codecs()
    compressed = ("auto",) if args.netns else codecs[:1]
    return [Case(args.frames_envs, FRAMES_RTT_MS, "frames", FRAMES_ENV, FRAMES_RATE_MBIT, compression)
            for compression in ("none", *compressed)]


def uneven_cases(args: argparse.Namespace) -> list[Case]:
    n = UNEVEN_ENVS_EACH * len(UNEVEN_RTTS_MS)
    return [Case(n, max(UNEVEN_RTTS_MS), "uneven", worker_rtts=UNEVEN_RTTS_MS, batch_size=batch)
            for batch in (None, UNEVEN_ENVS_EACH)]


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


def format_frames(cases: list[Case]) -> str:
    header = (f"{'compression':>11}  {'chosen':>6}  {'env-steps/s':>11}  {'bound':>6}  {'ratio':>6}  "
              f"{'wire ratio':>10}  repetitions (env-steps/s)")
    lines = [header, "-" * len(header)]
    for case in cases:
        bound, ratio = case.bound, case.ratio()
        reps = ", ".join(f"{r.env_steps_per_s:,.0f}" for r in case.runs)
        wire = case.median("wire_ratio")
        lines.append(
            f"{case.compression:>11}  {case.runs[-1].compressed:>6}  {case.median('env_steps_per_s'):>11,.0f}  "
            f"{'-' if bound is None else f'{bound:,.0f}':>6}  {'-' if ratio is None else f'{ratio:.2f}x':>6}  "
            f"{f'{wire:.0f}:1' if wire else '-':>10}  {reps}")
    return "\n".join(lines)


def frames_verdict(cases: list[Case]) -> tuple[bool | None, str]:
    none = [c for c in cases if c.compression == "none"]
    other = [c for c in cases if c.compression != "none"]
    goal_text = f"goal: auto >= {FRAMES_GOAL:g}x none at {FRAMES_RTT_MS} ms RTT, {FRAMES_RATE_MBIT:g} Mbit/s"
    goal_text += f", {FRAMES_ENVS} envs"
    if not none or not other:
        return None, f"verdict: not measured in this run ({goal_text})"
    speedup = other[0].median("env_steps_per_s") / none[0].median("env_steps_per_s")
    what = other[0].compression if other[0].compression == "auto" else f"{other[0].compression} (what auto picks)"
    if other[0].runs[-1].compressed == "none":
        return None, f"verdict: {other[0].compression} compressed nothing ({goal_text})"
    if other[0].num_envs != FRAMES_ENVS:
        return None, f"verdict: not judged with {other[0].num_envs} envs: {what} is {speedup:.2f}x none ({goal_text})"
    met = speedup >= FRAMES_GOAL
    return met, f"verdict: goal {'met' if met else 'NOT met'}: {what} is {speedup:.2f}x none ({goal_text})"


def format_uneven(cases: list[Case]) -> str:
    header = f"{'API':>4}  {'batch':>5}  {'env-steps/s':>11}  {'bound':>6}  {'ratio':>6}  repetitions (env-steps/s)"
    lines = [header, "-" * len(header)]
    for case in cases:
        bound, ratio = case.bound, case.ratio()
        reps = ", ".join(f"{r.env_steps_per_s:,.0f}" for r in case.runs)
        lines.append(
            f"{'recv' if case.batch_size else 'step':>4}  {case.batch_size or case.num_envs:>5}  "
            f"{case.median('env_steps_per_s'):>11,.0f}  {f'{bound:,.0f}' if bound else '-':>6}  "
            f"{f'{ratio:.2f}x' if ratio else '-':>6}  {reps}")
    return "\n".join(lines)


def uneven_verdict(cases: list[Case]) -> tuple[bool | None, str]:
    goal_text = (f"goal: send/recv >= {UNEVEN_GOAL:g}x step() with workers at "
                 f"{' and '.join(f'{r:g}' for r in UNEVEN_RTTS_MS)} ms RTT")
    step = [c for c in cases if not c.batch_size]
    recv = [c for c in cases if c.batch_size]
    if not step or not recv:
        return None, f"verdict: not measured in this run ({goal_text})"
    speedup = recv[0].median("env_steps_per_s") / step[0].median("env_steps_per_s")
    met = speedup >= UNEVEN_GOAL
    return met, f"verdict: goal {'met' if met else 'NOT met'}: send/recv is {speedup:.2f}x step() ({goal_text})"


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
    kind = NamespaceLinks.kind if args.netns else LoopbackLinks.kind
    print(f"{WORKERS} worker processes (python -m ws_gym.worker), each dialing the trainer through "
          f"a link of its own: {kind}, one-way delay RTT/2 each way; "
          f"{args.seconds:g} s timed per case after {args.warmup:g} s warm-up, {args.repeats} repetition(s), "
          f"interleaved", flush=True)
    groups: dict[str, tuple[Callable[[argparse.Namespace], list[Case]], Callable[[list[Case]], str],
                            Callable[[list[Case]], tuple[bool | None, str]], str]] = {
        "cartpole": (cartpole_cases, format_table, verdict,
                     f"{ENV_ID}; bound = num_envs / RTT; link late = the mean time the links "
                     "delivered a chunk after its deadline (adds twice to each round trip)"),
        "frames": (frames_cases, format_frames, frames_verdict,
                   f"{FRAMES_ENV} (84x84x4 uint8), {args.frames_envs} envs, {FRAMES_RTT_MS} ms RTT and "
                   f"{FRAMES_RATE_MBIT:g} Mbit/s per worker link; bound = min(num_envs / RTT, {WORKERS} links' "
                   f"bandwidth / {FRAMES_STEP_BYTES} bytes an env-step sends plain); chosen = the codec the "
                   "trainer chose; wire ratio = observation bytes / compressed bytes"),
        "uneven": (uneven_cases, format_uneven, uneven_verdict,
                   f"{ENV_ID}, 2 workers of {UNEVEN_ENVS_EACH} envs at "
                   f"{' and '.join(f'{r:g}' for r in UNEVEN_RTTS_MS)} ms RTT; bound = num_envs / the slowest RTT "
                   "for step(), the sum of each worker's envs / its RTT for recv()"),
    }
    chosen = {g: groups[g][0](args) for g in args.group}
    if "frames" in chosen and not args.netns:
        compressed = [c.compression for c in chosen["frames"] if c.compression != "none"]
        print("frames: " + (f"compression='auto' never compresses on loopback, and these links are on {LOOPBACK}: "
                            f"the compressed case is {compressed[0]!r}, the codec auto picks on another "
                            "machine's connection, named explicitly" if compressed else
                            "neither lz4 nor zstandard is installed (pip install ws_gym[compress]): only "
                            "compression='none' is measured"))
    print()

    children = Children()
    links = NamespaceLinks() if args.netns else LoopbackLinks()
    cases = [case for group in chosen.values() for case in group]
    started = time.perf_counter()
    try:
        for rep in range(args.repeats):
            order = cases if rep % 2 == 0 else cases[::-1]
            for case in order:
                run = measure(case, children, links, args)
                case.runs.append(run)
                bound = case.bound
                note = "" if bound is None else f"  {run.env_steps_per_s / bound:.3f}x of {bound:,.0f}"
                print(f"  round {rep + 1}/{args.repeats}  {case.name:<22} {run.env_steps_per_s:>9,.0f} env-steps/s"
                      f"{note}  link late {run.late_mean_ms:.2f} ms (max {run.late_max_ms:.2f})", flush=True)
    finally:
        children.stop_all()
        if isinstance(links, NamespaceLinks):
            links.close()
    total = time.perf_counter() - started

    verdicts = {}
    for name, group in chosen.items():
        _, table, judge, legend = groups[name]
        print()
        print(f"{name}: medians; ratio = env-steps/s / bound; {legend}")
        print(table(group))
        met, line = judge(group)
        verdicts[name] = met
        print(line)
    print(f"measured in {total:.0f} s, load average now {loadavg()}")
    met = verdicts.get("cartpole")

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
                "cases": [{"group": c.group, "env_id": c.env_id, "num_envs": c.num_envs, "rtt_ms": c.rtt_ms,
                           "rate_mbit": c.rate_mbit, "compression": c.compression,
                           "worker_rtts_ms": list(c.rtts), "batch_size": c.batch_size,
                           "bound": c.bound, "ratio": c.ratio(),
                           "median_env_steps_per_s": c.median("env_steps_per_s"),
                           "runs": [asdict(r) for r in c.runs]} for c in cases],
                "goal": GOAL,
                "goal_rtt_ms": GOAL_RTT_MS,
                "goal_met": met,
                "frames_goal": FRAMES_GOAL,
                "frames_goal_met": verdicts.get("frames"),
                "uneven_goal": UNEVEN_GOAL,
                "uneven_goal_met": verdicts.get("uneven"),
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
