"""Throughput of ws_gym's remote envs next to gymnasium's own vector envs.

Measures env-steps per second, side by side in one run, for:

* 8 x CartPole-v1 and 8 x ws_gym/StaticImage-v0 (84x84x4 uint8 frames that cost
  nothing to make, so only the transport is measured), each in
  ``RemoteVectorEnv`` (2 local workers, on the trainer's private Unix socket
  where there is one), ``SyncVectorEnv`` and
  ``AsyncVectorEnv(shared_memory=True)``;
* the same ``RemoteVectorEnv`` with its local workers on loopback TCP
  (``remote tcp``, as ``WS_GYM_UNIX=0``): the path a remote worker takes, TCP
  and frames masked with a random key, without the network;
* the same 8 envs over 2 processes with no protocol at all (``bare pipes``:
  raw array bytes over ``multiprocessing`` pipes, gymnasium's SyncVectorEnv in
  each process, no checks, no infos): the floor of any design that steps the
  envs in other processes on this machine, so ``remote / bare pipes`` says how
  close ws_gym comes to the wire's limit;
* one remote CartPole-v1 (``gym.make("ws_gym/Remote-v0", ...)``) next to
  ``gym.make("CartPole-v1")`` in process, with the default settings (busy
  polling is on where a core is spare, as here with one local worker) and with
  ``busy_poll=False``.

Every case is built, reset and warmed up (untimed), then a fixed number of
steps is timed with pre-sampled actions, and the env is closed again. The cases
run interleaved, one round of all of them per repetition, so drift in the
machine's load hits every case alike; the table shows the median.

    python benchmarks/throughput.py            # default: about 2-3 minutes on 2 cores
    python benchmarks/throughput.py --quick    # smoke test: a few seconds
    python benchmarks/throughput.py --json results.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Any, Callable

import multiprocessing
import gymnasium as gym
import numpy as np

import ws_gym  # registers ws_gym/Remote-v0, ws_gym/StaticImage-v0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10_000,
                   help="timed step() calls per case and repetition (default 10000); "
                        "one vector step counts num-envs env-steps")
    p.add_argument("--warmup", type=int, default=200, help="untimed step() calls after reset (default 200)")
    p.add_argument("--repeats", type=int, default=3, help="rounds over all cases; the median is reported (default 3)")
    p.add_argument("--num-envs", type=int, default=8, help="envs per vector env (default 8)")
    p.add_argument("--workers", type=int, default=2, help="local workers per RemoteVectorEnv (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed for reset() and the pre-sampled actions (default 0)")
    p.add_argument("--json", metavar="PATH", default=None, help="also write the results to PATH as JSON")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 500 steps, 50 warm-up steps, 1 repetition")
    args = p.parse_args()
    if args.quick:
        args.steps, args.warmup, args.repeats = 500, 50, 1
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1:
        p.error("--steps and --repeats must be >= 1, --warmup >= 0")
    return args


# ---------------------------------------------------------------------------- the cases

CARTPOLE = "CartPole-v1"
IMAGE = "ws_gym/StaticImage-v0"


@dataclass
class Case:
    workload: str  # "CartPole-v1", "StaticImage-v0" or "single CartPole-v1"
    kind: str  # "remote", "remote tcp", "remote no-poll", "sync", "async", "bare pipes" or "in-process"
    make: Callable[[], Any]  # returns a VectorEnv (vector=True) or an Env
    vector: bool
    num_envs: int  # env-steps per step() call
    rates: list[float] = field(default_factory=list)  # env-steps/s, one per repetition
    setups: list[float] = field(default_factory=list)  # seconds to construct + first reset

    @property
    def name(self) -> str:
        return f"{self.workload} {self.kind}"

    @property
    def median(self) -> float:
        return statistics.median(self.rates)


def _bare_worker(conn: Any, env_id: str, num_envs: int) -> None:
    """One process of :class:`BarePipes`: step on each message, answer raw bytes."""
    envs = gym.make_vec(env_id, num_envs, vectorization_mode="sync")
    shape, dtype = envs.action_space.shape, envs.action_space.dtype
    try:
        while True:
            data = conn.recv_bytes()
            if data == b"close":
                return
            if data[:5] == b"reset":
                obs, _ = envs.reset(seed=int(data[5:]))
                conn.send_bytes(obs.tobytes())
                continue
            obs, rew, term, trunc, _ = envs.step(np.frombuffer(data, dtype).reshape(shape))
            conn.send_bytes(b"".join((obs.tobytes(), rew.tobytes(), term.tobytes(), trunc.tobytes())))
    finally:
        envs.close()


class BarePipes:
    """``num_envs`` envs split over ``workers`` processes with no protocol: the floor.

    The least any design can do: one message of raw action bytes to each process,
    one of raw result bytes back, one copy into the batch. No validation, no
    infos, no error handling: a measuring stick, not an env to use.
    """

    def __init__(self, env_id: str, num_envs: int, workers: int) -> None:
        probe = gym.make_vec(env_id, num_envs, vectorization_mode="sync")
        self.action_space = probe.action_space
        self._obs_space = probe.single_observation_space
        probe.close()
        self.num_envs = num_envs
        bounds = [round(i * num_envs / workers) for i in range(workers + 1)]
        self._parts = list(zip(bounds, bounds[1:]))
        self._conns, self._procs = [], []
        for a, b in self._parts:
            parent, child = multiprocessing.Pipe()
            proc = multiprocessing.Process(target=_bare_worker, args=(child, env_id, b - a), daemon=True)
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)

    def reset(self, seed: int = 0) -> tuple[np.ndarray, dict]:
        for i, conn in enumerate(self._conns):
            conn.send_bytes(b"reset%d" % (seed + i * 1000))
        space = self._obs_space
        obs = np.concatenate([np.frombuffer(c.recv_bytes(), space.dtype).reshape(-1, *space.shape)
                              for c in self._conns])
        return obs, {}

    def step(self, actions: np.ndarray) -> tuple:
        actions = np.asarray(actions)
        for (a, b), conn in zip(self._parts, self._conns):
            conn.send_bytes(actions[a:b].tobytes())
        space, n = self._obs_space, self.num_envs
        obs = np.empty((n, *space.shape), space.dtype)
        rew, term, trunc = np.empty(n), np.empty(n, np.bool_), np.empty(n, np.bool_)
        for (a, b), conn in zip(self._parts, self._conns):
            data = conn.recv_bytes()
            k, at = b - a, obs[a:b].nbytes
            obs[a:b] = np.frombuffer(data, space.dtype, obs[a:b].size).reshape(k, *space.shape)
            rew[a:b] = np.frombuffer(data, np.float64, k, at)
            term[a:b] = np.frombuffer(data, np.bool_, k, at + 8 * k)
            trunc[a:b] = np.frombuffer(data, np.bool_, k, at + 9 * k)
        return obs, rew, term, trunc, {}

    def close(self) -> None:
        for conn, proc in zip(self._conns, self._procs):
            try:
                conn.send_bytes(b"close")
            except OSError:
                pass
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
            conn.close()


def make_cases(args: argparse.Namespace) -> list[Case]:
    n, w = args.num_envs, args.workers
    cases = []
    for env_id in (CARTPOLE, IMAGE):
        short = env_id.split("/")[-1]
        # the default argument e=env_id binds the id now, not when the lambda runs
        cases += [
            Case(short, "remote", vector=True, num_envs=n,
                 make=lambda e=env_id: gym.make_vec("ws_gym/Remote-v0", num_envs=n, env_id=e,
                                                    port=0, local_workers=w)),
            Case(short, "remote tcp", vector=True, num_envs=n,
                 make=lambda e=env_id: over_tcp(lambda: gym.make_vec("ws_gym/Remote-v0", num_envs=n, env_id=e,
                                                                     port=0, local_workers=w))),
            Case(short, "sync", vector=True, num_envs=n,
                 make=lambda e=env_id: gym.make_vec(e, n, vectorization_mode="sync")),
            Case(short, "async", vector=True, num_envs=n,
                 make=lambda e=env_id: gym.make_vec(e, n, vectorization_mode="async",
                                                    vector_kwargs={"shared_memory": True})),
            Case(short, "bare pipes", vector=True, num_envs=n, make=lambda e=env_id: BarePipes(e, n, w)),
        ]
    cases += [
        Case(f"single {CARTPOLE}", "remote", vector=False, num_envs=1,
             make=lambda: gym.make("ws_gym/Remote-v0", env_id=CARTPOLE, port=0, local_workers=1)),
        Case(f"single {CARTPOLE}", "remote no-poll", vector=False, num_envs=1,
             make=lambda: gym.make("ws_gym/Remote-v0", env_id=CARTPOLE, port=0, local_workers=1,
                                   busy_poll=False)),
        Case(f"single {CARTPOLE}", "in-process", vector=False, num_envs=1,
             make=lambda: gym.make(CARTPOLE)),
    ]
    return cases


def over_tcp(make: Callable[[], Any]) -> Any:
    """``make()`` with the local workers on loopback TCP instead of the private
    Unix socket: the path remote workers take (TCP, frames masked with a random
    key), minus the network."""
    before = os.environ.get("WS_GYM_UNIX")
    os.environ["WS_GYM_UNIX"] = "0"  # read when the trainer starts
    try:
        return make()
    finally:
        if before is None:
            del os.environ["WS_GYM_UNIX"]
        else:
            os.environ["WS_GYM_UNIX"] = before


def ratio_pairs(cases: list[Case]) -> list[tuple[str, Case, Case]]:
    """(label, case, baseline case) for each ratio line."""
    by_key = {(c.workload, c.kind): c for c in cases}
    pairs = []

    def add(workload: str, kind: str, base: str) -> None:
        pairs.append((f"{workload}: {kind} / {base}", by_key[workload, kind], by_key[workload, base]))

    for workload in ("CartPole-v1", "StaticImage-v0"):
        for base in ("sync", "async", "bare pipes"):
            add(workload, "remote", base)
            if base == "async":
                add(workload, "remote tcp", "async")
                add(workload, "remote tcp", "remote")
        # the floor against the baselines: how far any two-process design gets in this run
        add(workload, "bare pipes", "sync")
        add(workload, "bare pipes", "async")
    single = f"single {CARTPOLE}"
    add(single, "remote", "in-process")
    add(single, "remote no-poll", "in-process")
    add(single, "remote", "remote no-poll")
    return pairs


# The speed targets: (number, workload, baseline, bar). With a baseline the bar
# is a ratio of medians (a line of ratio_pairs); without one, env-steps/s.
TARGETS = (
    (1, "CartPole-v1", "async", 3.0),
    (1, "CartPole-v1", "sync", 0.8),
    (2, "StaticImage-v0", "async", 3.0),
    (3, f"single {CARTPOLE}", None, 6000.0),
)


def target_rows(cases: list[Case], ratios: dict[str, float]) -> list[dict[str, Any]]:
    """Each target with this run's figure, and the same ratio for ``bare pipes``
    (the floor: no protocol) where there is one, so a run shows whether a
    target is within reach of any two-process design on this machine at all."""
    rows = []
    for number, workload, base, bar in TARGETS:
        if base is None:
            label = f"{number}. {workload} remote"
            value = next(c for c in cases if c.name == f"{workload} remote").median
            floor = None
        else:
            label = f"{number}. {workload} remote / {base}"
            value = ratios[f"{workload}: remote / {base}"]
            floor = ratios[f"{workload}: bare pipes / {base}"]
        rows.append({"target": label, "bar": bar, "value": value, "met": value >= bar,
                     "bare_pipes": floor, "bare_pipes_met": None if floor is None else floor >= bar})
    return rows


def format_targets(rows: list[dict[str, Any]]) -> str:
    width = max(len(r["target"]) for r in rows)
    lines = ["speed targets in this run (bare pipes: the same envs and processes, no protocol):"]
    for r in rows:
        if r["bare_pipes"] is None:
            lines.append(f"  {r['target']:<{width}}  >= {r['bar']:,.0f} env-steps/s: {r['value']:,.0f}"
                         f"  {'met' if r['met'] else 'NOT met'}")
        else:
            floor = f"bare pipes {r['bare_pipes']:.2f}x, {'above' if r['bare_pipes_met'] else 'BELOW'} the bar"
            lines.append(f"  {r['target']:<{width}}  >= {r['bar']:.1f}x: {r['value']:.2f}x"
                         f"  {'met' if r['met'] else 'NOT met':<7}  ({floor})")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- timing

ACTION_POOL = 256  # distinct pre-sampled actions, cycled through


def run_steps(env: Any, actions: list, steps: int, vector: bool) -> None:
    """``steps`` step() calls; a single env is reset at episode end (vector envs autoreset)."""
    if vector:
        for i in range(steps):
            env.step(actions[i % ACTION_POOL])
    else:
        for i in range(steps):
            _, _, terminated, truncated, _ = env.step(actions[i % ACTION_POOL])
            if terminated or truncated:
                env.reset()


def measure(case: Case, args: argparse.Namespace) -> None:
    """Construct, reset, warm up, time ``args.steps`` steps, close (always)."""
    t0 = time.perf_counter()
    env = case.make()
    try:
        env.reset(seed=args.seed)  # a remote env waits for its workers here
        case.setups.append(time.perf_counter() - t0)
        # The same actions every repetition, sampled before the clock starts.
        env.action_space.seed(args.seed)
        actions = [env.action_space.sample() for _ in range(ACTION_POOL)]
        run_steps(env, actions, args.warmup, case.vector)
        start = time.perf_counter()
        run_steps(env, actions, args.steps, case.vector)
        elapsed = time.perf_counter() - start
    finally:
        env.close()  # also ends the worker processes of a remote env
    case.rates.append(args.steps * case.num_envs / elapsed)


# ---------------------------------------------------------------------------- reporting

def machine_info() -> dict[str, Any]:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    return {
        "python": f"{platform.python_version()} ({platform.python_implementation()})",
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "gymnasium": gym.__version__,
        "numpy": np.__version__,
        "aiohttp": version("aiohttp"),
        "orjson": version("orjson"),
        "ws_gym": ws_gym.__version__,
    }


def format_table(cases: list[Case], pairs: list[tuple[str, Case, Case]]) -> str:
    width = max(len(c.name) for c in cases)
    lines = [
        f"{'case':<{width}}  {'env-steps/s':>11}  {'us/call':>8}  {'setup s':>7}  repetitions (env-steps/s)",
        "-" * (width + 60),
    ]
    for c in cases:
        calls_per_s = c.median / c.num_envs
        reps = ", ".join(f"{r:,.0f}" for r in c.rates)
        lines.append(f"{c.name:<{width}}  {c.median:>11,.0f}  {1e6 / calls_per_s:>8.1f}  "
                     f"{statistics.median(c.setups):>7.2f}  {reps}")
    lines += ["", "ratios of medians (> 1: the first is faster):"]
    label_width = max(len(label) for label, _, _ in pairs)
    for label, case, base in pairs:
        ratio = case.median / base.median
        lines.append(f"  {label:<{label_width}}  {ratio:6.3f}x   ({base.median / case.median:.1f}x slower)"
                     if ratio < 1 else f"  {label:<{label_width}}  {ratio:6.3f}x")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- main

def main() -> int:
    args = parse_args()
    # ws_gym prints "starting N local workers" to stderr on every remote reset unless its
    # logger is enabled for INFO and has a handler; let INFO through the logger but drop it
    # at the handler, so only ws_gym's warnings and errors are shown.
    handler = logging.StreamHandler()
    handler.setLevel(logging.WARNING)
    logging.basicConfig(handlers=[handler], format="%(name)s %(levelname)s: %(message)s")
    logging.getLogger("ws_gym").setLevel(logging.INFO)

    info = machine_info()
    print(f"python {info['python']} on {info['platform']}")
    print(f"gymnasium {info['gymnasium']}, numpy {info['numpy']}, aiohttp {info['aiohttp']}, "
          f"orjson {info['orjson']}, ws_gym {info['ws_gym']}")
    print(f"cpus: {info['cpu_count']} (usable {info['cpus_usable']}), load average {info['load_average']}")
    print(f"{args.steps} timed steps after {args.warmup} warm-up steps, {args.repeats} repetition(s), "
          f"num_envs={args.num_envs}, remote = RemoteVectorEnv over {args.workers} local workers, "
          "async = AsyncVectorEnv(shared_memory=True)\n", flush=True)

    cases = make_cases(args)
    pairs = ratio_pairs(cases)
    started = time.perf_counter()
    for rep in range(args.repeats):
        for case in cases:
            measure(case, args)
            print(f"  round {rep + 1}/{args.repeats}  {case.name:<32} {case.rates[-1]:>11,.0f} env-steps/s",
                  flush=True)
    total = time.perf_counter() - started

    print()
    print(format_table(cases, pairs))
    ratios = {label: case.median / base.median for label, case, base in pairs}
    targets = target_rows(cases, ratios)
    print()
    print(format_targets(targets))
    print(f"\nmeasured in {total:.0f} s")

    if args.json:
        result = {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
            "machine": info,
            "config": {k: getattr(args, k) for k in ("steps", "warmup", "repeats", "num_envs", "workers", "seed")},
            "cases": [
                {"name": c.name, "num_envs": c.num_envs, "median_env_steps_per_s": c.median,
                 "env_steps_per_s": c.rates, "setup_s": c.setups}
                for c in cases
            ],
            "ratios": ratios,
            "targets": targets,
            "seconds": total,
        }
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
