"""When does ``--vectorization async`` pay off? Sync vs async workers on a CPU-heavy env.

A worker hosting several envs steps them one after another in its own process
(``--vectorization sync``, the default) or, with ``--vectorization async``,
runs each in a subprocess (gymnasium's ``AsyncVectorEnv``), so they step in
parallel on a multi-core PC, at the price of a pipe round trip per env and
step. This script finds the env cost at which that price is worth paying.

The env (``WsGymBench/Burn-v0``, registered here) burns a fixed amount of CPU
per step: it spins until its thread's CPU clock has advanced ``cost_us``
microseconds (CPU time, not wall time, so a descheduled env still does the
full work). For each cost, one worker hosting ``--envs`` envs is stepped
through ``RemoteVectorEnv`` (a local worker on loopback) in both modes, side
by side, and the table shows env-steps/s, the ratio async/sync and the
CPU-bound limits: ``envs x 1e6 / cost`` on one core for sync, times
``min(envs, cores)`` for async.

    python benchmarks/vectorization.py            # about 1-2 minutes
    python benchmarks/vectorization.py --quick    # smoke test, < 20 s
    python benchmarks/vectorization.py --costs 0 100 1000 --envs 8 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import gymnasium as gym
import numpy as np
from gymnasium import spaces

MODULE = os.path.splitext(os.path.basename(__file__))[0]  # workers import this file by this name
ENV_ID = f"{MODULE}:WsGymBench/Burn-v0"


class BurnEnv(gym.Env):
    """Each step costs ``cost_us`` microseconds of CPU; episodes last 200 steps."""

    metadata = {"render_modes": []}

    def __init__(self, cost_us: float = 0.0) -> None:
        self.observation_space = spaces.Box(-1.0, 1.0, (4,), np.float32)
        self.action_space = spaces.Discrete(2)
        self.cost_us = cost_us
        self._obs = np.zeros(4, np.float32)
        self._t = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._t = 0
        return self._obs, {}

    def step(self, action):
        if self.cost_us > 0:
            end = time.thread_time() + self.cost_us * 1e-6
            while time.thread_time() < end:
                pass
        self._t += 1
        return self._obs, 1.0, False, self._t >= 200, {}


if "WsGymBench/Burn-v0" not in gym.registry:
    gym.register("WsGymBench/Burn-v0", entry_point=f"{MODULE}:BurnEnv", disable_env_checker=True)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--costs", type=float, nargs="+", default=[0, 20, 50, 100, 200, 500, 1000, 2000],
                   help="CPU microseconds per env step to try (default 0 20 50 100 200 500 1000 2000)")
    p.add_argument("--envs", type=int, default=4, help="envs in the one worker (default 4)")
    p.add_argument("--seconds", type=float, default=1.0,
                   help="timed seconds per case and repetition (default 1.0)")
    p.add_argument("--repeats", type=int, default=3, help="rounds over all cases; the median is reported (default 3)")
    p.add_argument("--quick", action="store_true", help="smoke test: costs 0 and 1000, 0.3 s, 1 repetition")
    args = p.parse_args()
    if args.quick:
        args.costs, args.seconds, args.repeats = [0, 1000], 0.3, 1
    if args.envs < 1 or args.repeats < 1 or args.seconds <= 0 or min(args.costs) < 0:
        p.error("--envs and --repeats must be >= 1, --seconds > 0, --costs >= 0")
    return args


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def timed_rate(envs, actions, seconds: float) -> float:
    """env-steps/s over at least ``seconds`` of step() calls (at least 10 calls)."""
    for i in range(5):  # warm-up
        envs.step(actions[i % len(actions)])
    n, start = 0, time.perf_counter()
    while True:
        envs.step(actions[n % len(actions)])
        n += 1
        elapsed = time.perf_counter() - start
        if n >= 10 and elapsed >= seconds:
            return n * envs.num_envs / elapsed


def main() -> int:
    args = parse_args()
    import logging

    import ws_gym

    logging.basicConfig(level=logging.WARNING)  # keeps ws_gym's "starting local workers" quiet
    cpus = usable_cpus()
    print(f"python {sys.version.split()[0]}, gymnasium {gym.__version__}, ws_gym {ws_gym.__version__}; "
          f"{cpus} usable cpus; load average {[round(x, 2) for x in os.getloadavg()] if hasattr(os, 'getloadavg') else '?'}")
    print(f"1 local worker x {args.envs} envs of {ENV_ID}; {args.seconds:g} s timed per case, "
          f"{args.repeats} repetition(s), interleaved; env-steps/s medians\n", flush=True)

    modes = ("sync", "async")
    vecs = {}
    started = time.perf_counter()
    try:
        for mode in modes:  # both stay up; the idle one blocks in its event loop
            vecs[mode] = ws_gym.RemoteVectorEnv(
                args.envs, env_id=ENV_ID, port=0, local_workers=1, worker_vectorization=mode,
                connect_timeout=120, step_timeout=120,
            )
            vecs[mode].reset(seed=0)
        rng = np.random.default_rng(0)
        actions = [rng.integers(0, 2, args.envs) for _ in range(64)]
        rates: dict[tuple[float, str], list[float]] = {}
        for rep in range(args.repeats):
            for cost in args.costs:
                order = modes if rep % 2 == 0 else modes[::-1]
                for mode in order:
                    vecs[mode].set_attr("cost_us", cost)
                    rate = timed_rate(vecs[mode], actions, args.seconds)
                    rates.setdefault((cost, mode), []).append(rate)
                    print(f"  round {rep + 1}/{args.repeats}  cost {cost:>7g} us  {mode:<5} {rate:>10,.0f} env-steps/s",
                          flush=True)
    finally:
        for envs in vecs.values():
            envs.close()

    print()
    head = (f"{'cost us':>8}  {'sync':>10}  {'async':>10}  {'async/sync':>10}  "
            f"{'sync limit':>10}  {'async limit':>11}  repetitions sync | async")
    print(head)
    print("-" * len(head))
    ratios = []
    for cost in args.costs:
        s, a = (statistics.median(rates[cost, m]) for m in modes)
        ratios.append((cost, a / s))
        if cost > 0:
            lim_s = f"{1e6 / cost:>10,.0f}"  # one core: one env-step per `cost`
            lim_a = f"{min(args.envs, cpus) * 1e6 / cost:>11,.0f}"
        else:
            lim_s, lim_a = f"{'-':>10}", f"{'-':>11}"
        reps = ", ".join(f"{r:,.0f}" for r in rates[cost, "sync"]) + " | " + \
            ", ".join(f"{r:,.0f}" for r in rates[cost, "async"])
        print(f"{cost:>8g}  {s:>10,.0f}  {a:>10,.0f}  {a / s:>9.2f}x  {lim_s}  {lim_a}  {reps}")
    print()
    ratios.sort()
    # the crossover: the lowest cost from which async wins at every higher cost tried
    wins_from = next((i for i in range(len(ratios)) if all(r > 1.0 for _, r in ratios[i:])), None)
    where = f"{args.envs} envs in one worker, {cpus} cpus"
    if wins_from is None:
        print(f"async did not beat sync at the highest cost tried ({ratios[-1][0]:g} us per env step; {where})")
    elif wins_from == 0:
        print(f"async beat sync at every cost tried, from {ratios[0][0]:g} us per env step ({where})")
    else:
        print(f"crossover: async beats sync from between {ratios[wins_from - 1][0]:g} and "
              f"{ratios[wins_from][0]:g} us of CPU per env step ({where})")
        mixed = [f"{c:g}" for c, r in ratios[:wins_from] if r > 1.0]
        if mixed:
            print(f"  (async also won at {', '.join(mixed)} us, below that: noise around the crossover)")
    print(f"measured in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
