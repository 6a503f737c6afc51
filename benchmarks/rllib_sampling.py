"""RLlib's sampling with the envs in ws_gym workers, next to RLlib's default.

RLlib's EnvRunners step their envs in their own processes; with
``ws_gym.rllib.remote_envs`` each EnvRunner is a ws_gym trainer whose envs
live in worker processes. This script measures what that costs RLlib's
sampling, side by side in one run, on this machine:

* ``rllib``: ``PPOConfig().environment("CartPole-v1").env_runners(
  num_env_runners=2, num_envs_per_env_runner=4)``, the default: each
  EnvRunner steps its 4 envs in a ``SyncVectorEnv`` in its own process;
* ``ws_gym``: the same config through ``ws_gym.rllib.remote_envs(config,
  port=0, local_workers=1)``: each EnvRunner's 4 envs in one worker process
  of its own (``local_workers=``, on loopback).

Both algorithms are built once (4 EnvRunners in all; an idle one takes no
CPU) and warmed up. Then, per repetition, each case's EnvRunners sample
``--timesteps`` env steps each, in parallel, with the PPO policy's inference
(``EnvRunner.sample(num_timesteps=..., explore=True)``, what ``train()``
calls); the wall time of that call, seen from the driver, gives env-steps/s.
The cases alternate (which goes first alternates too), so drift in the
machine's load hits both alike; the table shows medians, and the ratio
ws_gym / rllib is the median of the repetitions' ratios. No training step
runs: this is sampling only, the part the envs' placement changes.

Ray runs locally (``ray.init(num_cpus=4)``: logical CPUs for the 4 EnvRunner
actors, whatever the cores). Ray ends with the run, and so do the workers
(they exit with their EnvRunners), also on Ctrl-C or an error.

    python benchmarks/rllib_sampling.py              # default: 5 repetitions, about 1 minute on 2 cores
    python benchmarks/rllib_sampling.py --quick      # smoke test: well under 60 s
    python benchmarks/rllib_sampling.py --repeats 9 --json rllib.json
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
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # ws_gym from this checkout (the EnvRunners and workers import it too)

try:
    import ray
    from ray.rllib.algorithms.ppo import PPOConfig
except ImportError:
    sys.exit("benchmarks/rllib_sampling.py needs Ray RLlib: pip install '.[rllib]'")

import gymnasium as gym  # noqa: E402

import ws_gym  # noqa: E402
import ws_gym.rllib  # noqa: E402
from ws_gym import RemoteVectorEnv  # noqa: E402

ENV_ID = "CartPole-v1"
NUM_ENV_RUNNERS = 2
ENVS_PER_RUNNER = 4
CASES = ("rllib", "ws_gym")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--timesteps", type=int, default=8000,
                   help="env steps each EnvRunner samples per case and repetition (default 8000)")
    p.add_argument("--warmup", type=int, default=1000, help="untimed env steps per EnvRunner first (default 1000)")
    p.add_argument("--repeats", type=int, default=5, help="rounds of both cases; medians are reported (default 5)")
    p.add_argument("--json", metavar="PATH", default=None, help="also write the results to PATH as JSON")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 1000 timed env steps per EnvRunner after 200 warm-up steps, 1 repetition")
    args = p.parse_args()
    if args.quick:
        args.timesteps, args.warmup, args.repeats = 1000, 200, 1
    if args.timesteps < 1 or args.warmup < 0 or args.repeats < 1:
        p.error("--timesteps and --repeats must be >= 1, --warmup >= 0")
    return args


def make_config(case: str) -> Any:
    config = (PPOConfig().environment(ENV_ID)
              .env_runners(num_env_runners=NUM_ENV_RUNNERS, num_envs_per_env_runner=ENVS_PER_RUNNER))
    if case == "ws_gym":
        config = ws_gym.rllib.remote_envs(config, port=0, local_workers=1)
    return config


def placement(algo: Any) -> list[str]:
    """Where each EnvRunner's envs are, as a check that the case is what it says."""
    def where(runner: Any) -> str:
        env = runner.env.unwrapped
        if isinstance(env, RemoteVectorEnv):
            run = env.stats()["run"]
            return f"{type(env).__name__} ({run['envs_served']} envs in {run['workers_connected']} worker(s))"
        return type(env).__name__
    return algo.env_runner_group.foreach_env_runner(where, local_env_runner=False)


def sample(algo: Any, timesteps: int) -> tuple[int, float]:
    """(env steps, seconds) of every EnvRunner sampling ``timesteps`` at once."""
    def run(runner: Any) -> int:
        return sum(len(episode) for episode in runner.sample(num_timesteps=timesteps, explore=True))
    start = time.perf_counter()
    counts = algo.env_runner_group.foreach_env_runner(run, local_env_runner=False)
    return sum(counts), time.perf_counter() - start


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
        "ray": ray.__version__,
        "torch": ver("torch"),
        "gymnasium": gym.__version__,
        "ws_gym": ws_gym.__version__,
        "uvloop": ver("uvloop"),
    }


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def _interrupt(signum: int, frame: Any) -> None:
    """A SIGTERM ends the run as Ctrl-C does: through the blocks that stop Ray."""
    raise KeyboardInterrupt


def main() -> int:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s: %(message)s")
    for name in ("ray", "ray.rllib", "ray.tune"):  # their notes on the API stack and GPU monitoring
        logging.getLogger(name).setLevel(logging.ERROR)
    signal.signal(signal.SIGTERM, _interrupt)
    info = machine_info()
    print(f"python {info['python']} on {info['platform']}")
    print(f"ray {info['ray']}, torch {info['torch']}, gymnasium {info['gymnasium']}, ws_gym {info['ws_gym']}, "
          f"uvloop {info['uvloop']}")
    print(f"cpus: {info['cpu_count']} (usable {info['cpus_usable']}), load average {info['load_average']}")
    print(f"{NUM_ENV_RUNNERS} EnvRunners x {ENVS_PER_RUNNER} {ENV_ID}; {args.timesteps} timed env steps per "
          f"EnvRunner after {args.warmup} warm-up steps, {args.repeats} repetition(s)\n", flush=True)

    started = time.perf_counter()
    rates: dict[str, list[float]] = {name: [] for name in CASES}
    setup: dict[str, float] = {}
    where: dict[str, list[str]] = {}
    ray.init(num_cpus=2 * NUM_ENV_RUNNERS, include_dashboard=False, log_to_driver=False)
    algos: dict[str, Any] = {}
    try:
        for name in CASES:
            t0 = time.perf_counter()
            algos[name] = make_config(name).build_algo()
            if args.warmup:
                sample(algos[name], args.warmup)  # the ws_gym case's first reset waits for its workers here
            setup[name] = time.perf_counter() - t0
            where[name] = placement(algos[name])
            print(f"  {name:<7} envs: {'; '.join(where[name])}  (built and warmed up in {setup[name]:.1f} s)",
                  flush=True)
        for rep in range(args.repeats):
            for name in (CASES if rep % 2 == 0 else CASES[::-1]):
                steps, seconds = sample(algos[name], args.timesteps)
                rates[name].append(steps / seconds)
                print(f"  round {rep + 1}/{args.repeats}  {name:<7} {steps / seconds:>9,.0f} env-steps/s  "
                      f"({steps} env steps in {seconds:.2f} s)", flush=True)
    finally:
        for algo in algos.values():
            algo.stop()
        ray.shutdown()
    total = time.perf_counter() - started

    ratios = [w / r for w, r in zip(rates["ws_gym"], rates["rllib"])]
    ratio = statistics.median(ratios)
    print()
    header = f"{'case':<7}  {'env-steps/s':>11}  {'setup s':>7}  repetitions (env-steps/s)"
    print(header)
    print("-" * len(header))
    for name in CASES:
        reps = ", ".join(f"{r:,.0f}" for r in rates[name])
        print(f"{name:<7}  {statistics.median(rates[name]):>11,.0f}  {setup[name]:>7.1f}  {reps}")
    print()
    print(f"ws_gym / rllib: {ratio:.2f}x (median of the repetitions' ratios: {', '.join(f'{r:.2f}' for r in ratios)})")
    print(f"measured in {total:.0f} s, load average now {loadavg()}")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({
                "date": datetime.datetime.now().isoformat(timespec="seconds"),
                "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
                "machine": info,
                "config": {"timesteps": args.timesteps, "warmup": args.warmup, "repeats": args.repeats,
                           "num_env_runners": NUM_ENV_RUNNERS, "envs_per_runner": ENVS_PER_RUNNER, "env_id": ENV_ID},
                "cases": {name: {"env_steps_per_s": rates[name], "median": statistics.median(rates[name]),
                                 "setup_s": setup[name], "envs": where[name]} for name in CASES},
                "ratio_ws_gym_rllib": ratio,
                "ratios": ratios,
                "seconds": total,
            }, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
