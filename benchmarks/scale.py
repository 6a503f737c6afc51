"""Scale: many workers on one trainer (loopback).

For each case the trainer runs in a fresh process of its own (so its peak RSS
is that case's), starts ``workers`` local worker processes hosting
``envs-per-worker`` envs each, resets, warms up, and times ``--steps``
batched ``step()`` calls. It reports:

* env-steps/s (wall clock);
* trainer CPU per batched step (``time.process_time`` of the trainer process:
  the caller's thread and the event-loop thread, which runs in the same
  process; the workers are other processes and not counted), split into the
  caller's thread (``time.thread_time``) and the rest (the loop thread);
* trainer CPU per worker per step: that cost divided by the number of
  workers. Over the worker sweep it must stay flat: growth means work per
  step that grows faster than the number of workers;
* trainer peak RSS (``getrusage`` ``ru_maxrss``; on Windows, psutil's peak
  working set if psutil is installed);
* memory against history: the trainer's current RSS after ``steps`` timed
  steps and again after ``3 x steps`` more (4N in all); a per-step allocation
  kept forever shows up as growth.

Cases: a sweep of 2, 4, 8, 16, 32 workers x 4 ``ws_gym/NoOp-v0`` envs (the
cheapest env, so the trainer's own cost is what is measured), and the scale
targets: 64 envs over 16 workers and 256 envs over 32 workers, for
``ws_gym/NoOp-v0`` and ``CartPole-v1``. Cases run interleaved, one round of
all per repetition; the table shows medians.

On a 2-core machine, 32 worker processes share 2 cores with the trainer, so
wall-clock figures there measure the OS scheduler more than ws_gym; the CPU
columns do not depend on waiting.

    python benchmarks/scale.py            # several minutes on 2 cores
    python benchmarks/scale.py --quick    # smoke test, < 20 s (2 and 8 workers)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CHILD_FLAG = "--one-case"
NOOP, CARTPOLE = "ws_gym/NoOp-v0", "CartPole-v1"


# ---------------------------------------------------------------- memory


def current_rss_kib() -> float | None:
    """This process's resident set size now, in KiB (None where unknown)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1024
    except (OSError, ValueError, AttributeError):
        pass
    try:
        import psutil

        return psutil.Process().memory_info().rss / 1024
    except Exception:  # noqa: BLE001 - not installed, or no such figure here
        return None


def peak_rss_kib() -> float | None:
    """This process's peak resident set size, in KiB (None where unknown)."""
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 1024 if sys.platform == "darwin" else float(peak)  # bytes on macOS, KiB elsewhere
    except ImportError:  # Windows
        try:
            import psutil

            return psutil.Process().memory_info().peak_wset / 1024
        except Exception:  # noqa: BLE001
            return None


# ---------------------------------------------------------------- one case (a child process)


def run_case(env_id: str, workers: int, per_worker: int, steps: int, warmup: int, growth: bool) -> dict:
    import logging

    import ws_gym

    logging.basicConfig(level=logging.WARNING)
    n = workers * per_worker
    t0 = time.perf_counter()
    envs = ws_gym.RemoteVectorEnv(n, env_id=env_id, port=0, local_workers=workers,
                                  connect_timeout=600, step_timeout=600)
    try:
        envs.reset(seed=0)
        setup = time.perf_counter() - t0
        envs.action_space.seed(0)
        actions = [envs.action_space.sample() for _ in range(64)]
        for i in range(warmup):
            envs.step(actions[i % 64])
        rss_before = current_rss_kib()
        c0, m0, w0 = time.process_time(), time.thread_time(), time.perf_counter()
        for i in range(steps):
            envs.step(actions[i % 64])
        wall = time.perf_counter() - w0
        cpu, main_cpu = time.process_time() - c0, time.thread_time() - m0
        rss_n = current_rss_kib()
        rss_4n = None
        if growth:
            for i in range(3 * steps):
                envs.step(actions[i % 64])
            rss_4n = current_rss_kib()
    finally:
        envs.close()
    return {
        "env_steps_per_s": steps * n / wall,
        "cpu_us_per_step": cpu / steps * 1e6,
        "caller_us_per_step": main_cpu / steps * 1e6,
        "cpu_us_per_worker_step": cpu / steps / workers * 1e6,
        "peak_rss_mib": None if peak_rss_kib() is None else peak_rss_kib() / 1024,
        "rss_warm_mib": None if rss_before is None else rss_before / 1024,
        "rss_n_mib": None if rss_n is None else rss_n / 1024,
        "rss_4n_mib": None if rss_4n is None else rss_4n / 1024,
        "setup_s": setup,
    }


# ---------------------------------------------------------------- the driver


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=400, help="timed batched steps per case (default 400)")
    p.add_argument("--warmup", type=int, default=50, help="untimed steps first (default 50)")
    p.add_argument("--repeats", type=int, default=3, help="rounds over all cases; medians reported (default 3)")
    p.add_argument("--sweep", type=int, nargs="+", default=[2, 4, 8, 16, 32],
                   help="worker counts of the sweep (default 2 4 8 16 32)")
    p.add_argument("--envs-per-worker", type=int, default=4, help="envs per worker in the sweep (default 4)")
    p.add_argument("--no-targets", action="store_true", help="only the sweep, not the 64/16 and 256/32 cases")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: sweep 2 and 8 workers, no target cases, 100 steps, 1 repetition")
    args = p.parse_args()
    if args.quick:
        args.sweep, args.no_targets, args.steps, args.warmup, args.repeats = [2, 8], True, 100, 20, 1
    if args.steps < 1 or args.repeats < 1 or args.envs_per_worker < 1 or min(args.sweep) < 1:
        p.error("--steps, --repeats, --envs-per-worker and the sweep must be >= 1")
    return args


def cases(args: argparse.Namespace) -> list[tuple[str, int, int]]:
    out = [(NOOP, w, args.envs_per_worker) for w in args.sweep]
    if not args.no_targets:
        for env_id, w, n in ((NOOP, 16, 64), (NOOP, 32, 256), (CARTPOLE, 16, 64), (CARTPOLE, 32, 256)):
            if (env_id, w, n // w) not in out:
                out.append((env_id, w, n // w))
    return out


def run_child(case: tuple[str, int, int], args: argparse.Namespace) -> dict:
    env_id, workers, per_worker = case
    cmd = [sys.executable, os.path.abspath(__file__), CHILD_FLAG, env_id, str(workers), str(per_worker),
           str(args.steps), str(args.warmup)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"case {case} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def main() -> int:
    args = parse_args()
    import gymnasium as gym

    import ws_gym
    from ws_gym import loops

    print(f"python {sys.version.split()[0]}, gymnasium {gym.__version__}, ws_gym {ws_gym.__version__}, "
          f"event loop {loops.loop_name(loops.new_event_loop())}; {os.cpu_count()} cpus; load average "
          f"{[round(x, 2) for x in os.getloadavg()] if hasattr(os, 'getloadavg') else '?'}")
    print(f"{args.steps} timed batched steps after {args.warmup} warm-up, {args.repeats} repetition(s); "
          "each case in a fresh trainer process\n", flush=True)
    todo = cases(args)
    results: dict[tuple, list[dict]] = {c: [] for c in todo}
    started = time.perf_counter()
    for rep in range(args.repeats):
        for case in todo:
            r = run_child(case, args)
            results[case].append(r)
            env_id, w, k = case
            print(f"  round {rep + 1}/{args.repeats}  {env_id:<15} {w:>2} workers x {k} envs  "
                  f"{r['env_steps_per_s']:>9,.0f} env-steps/s  {r['cpu_us_per_step']:>8,.0f} us CPU/step  "
                  f"(setup {r['setup_s']:.1f} s)", flush=True)

    def med(case, key):
        vals = [r[key] for r in results[case] if r[key] is not None]
        return statistics.median(vals) if vals else None

    print()
    head = (f"{'env':<15} {'workers':>7} {'envs':>5}  {'env-steps/s':>11}  {'CPU us/step':>11}  "
            f"{'caller':>7}  {'loop+rest':>9}  {'CPU us/worker/step':>18}  {'peak RSS MiB':>12}  "
            f"{'RSS N -> 4N MiB':>16}")
    print(head)
    print("-" * len(head))
    for case in todo:
        env_id, w, k = case
        cpu, caller = med(case, "cpu_us_per_step"), med(case, "caller_us_per_step")
        rss_n, rss_4n = med(case, "rss_n_mib"), med(case, "rss_4n_mib")
        growth = "-" if rss_n is None or rss_4n is None else f"{rss_n:.1f} -> {rss_4n:.1f}"
        print(f"{env_id:<15} {w:>7} {w * k:>5}  {med(case, 'env_steps_per_s'):>11,.0f}  {cpu:>11,.0f}  "
              f"{caller:>7,.0f}  {cpu - caller:>9,.0f}  {med(case, 'cpu_us_per_worker_step'):>18,.1f}  "
              f"{fmt(med(case, 'peak_rss_mib'), '12.1f')}  {growth:>16}")

    sweep = [c for c in todo if c[0] == NOOP and c[2] == args.envs_per_worker and c[1] in args.sweep]
    if len(sweep) >= 2:
        lo, hi = sweep[0], sweep[-1]
        a, b = med(lo, "cpu_us_per_worker_step"), med(hi, "cpu_us_per_worker_step")
        print(f"\ntrainer CPU per worker per step, {hi[1]} workers vs {lo[1]}: {b:.1f} / {a:.1f} us = {b / a:.2f}x "
              f"({'does not grow' if b / a < 1.25 else 'GROWS'} with the number of workers; "
              f"O(workers^2) work would give about {hi[1] / lo[1]:.0f}x)")
    grew = [(c, med(c, "rss_4n_mib") - med(c, "rss_n_mib")) for c in todo
            if med(c, "rss_n_mib") is not None and med(c, "rss_4n_mib") is not None]
    if grew:
        worst = max(grew, key=lambda x: x[1])
        print(f"RSS growth from N to 4N steps: at most {worst[1]:+.2f} MiB "
              f"({worst[0][0]}, {worst[0][1]} workers; {3 * args.steps} more steps)")
    print(f"measured in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == CHILD_FLAG:
        env, w, k, s, wu = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
        print(json.dumps(run_case(env, w, k, s, wu, growth=True)))
        sys.exit(0)
    sys.exit(main())
