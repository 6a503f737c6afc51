"""Is a change faster? Step the same remote envs with two source trees of ws_gym, interleaved.

Figures on a shared machine move by 10-30 % from one minute to the next, so a
change is judged against the code before it measured in the same minutes:
each round runs every case once with each tree, in alternating order, every
run in a fresh process (its local workers import the same tree), and the
script prints the medians and their ratio::

    git worktree add /tmp/ws_gym_base HEAD~1        # the code before the change
    python benchmarks/compare_trees.py --base /tmp/ws_gym_base
    python benchmarks/compare_trees.py --base /tmp/ws_gym_base --case CartPole-v1 --repeats 10

Cases: an env id (``--num-envs`` envs over ``--workers`` local workers; 8 over
2 by default), or ``single`` (one remote CartPole-v1, reset at each episode's end).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent

CHILD = r'''
import sys, time, gymnasium as gym, ws_gym
case, steps, warmup, tree, num_envs, workers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5]), int(sys.argv[6])
if not ws_gym.__file__.startswith(tree):
    sys.exit(f"ws_gym was imported from {ws_gym.__file__}, not from {tree}")
if case == "single":
    env, n = gym.make("ws_gym/Remote-v0", env_id="CartPole-v1", port=0, local_workers=1), 1
else:
    env, n = gym.make_vec("ws_gym/Remote-v0", num_envs=num_envs, env_id=case, port=0, local_workers=workers), num_envs
try:
    env.reset(seed=0)
    actions = [env.action_space.sample() for _ in range(256)]
    def go(k):
        for i in range(k):
            r = env.step(actions[i % 256])
            if n == 1 and (r[2] or r[3]):
                env.reset()
    go(warmup)
    t = time.perf_counter()
    go(steps)
    print(n * steps / (time.perf_counter() - t))
finally:
    env.close()
'''


def run(tree: Path, case: str, args: argparse.Namespace) -> float:
    env = dict(os.environ, PYTHONPATH=str(tree))
    out = subprocess.run([sys.executable, "-c", CHILD, case, str(args.steps), str(args.warmup), str(tree),
                          str(args.num_envs), str(args.workers)],
                         cwd=tree, env=env, capture_output=True, text=True, timeout=args.timeout)
    if out.returncode:
        raise SystemExit(f"{case} with {tree} failed:\n{out.stderr[-3000:]}")
    return float(out.stdout.split()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, type=Path, help="the other source tree (e.g. a git worktree)")
    p.add_argument("--work", default=HERE, type=Path, help="the tree under test (default: this one)")
    p.add_argument("--case", action="append", help="an env id, or 'single' (repeatable; default CartPole-v1 "
                   "and ws_gym/StaticImage-v0)")
    p.add_argument("--num-envs", type=int, default=8, help="envs of a vector case (default 8)")
    p.add_argument("--workers", type=int, default=2, help="local workers of a vector case (default 2)")
    p.add_argument("--steps", type=int, default=3000, help="timed steps per run (default 3000)")
    p.add_argument("--warmup", type=int, default=300, help="untimed steps first (default 300)")
    p.add_argument("--repeats", type=int, default=6, help="rounds (default 6)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds one run may take (default 300)")
    p.add_argument("--quick", action="store_true", help="a smoke test: 200 steps, 1 round")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.repeats = 200, 20, 1
    trees = {"base": args.base.resolve(), "work": args.work.resolve()}
    for name, tree in trees.items():
        if not (tree / "ws_gym" / "__init__.py").is_file():
            p.error(f"--{name} {tree} is not a ws_gym source tree")
    cases = args.case or ["CartPole-v1", "ws_gym/StaticImage-v0"]
    results: dict[tuple[str, str], list[float]] = {}
    for rnd in range(args.repeats):
        order = list(trees.items()) if rnd % 2 == 0 else list(reversed(trees.items()))
        for case in cases:
            for name, tree in order:
                results.setdefault((case, name), []).append(run(tree, case, args))
        print(f"  round {rnd + 1}/{args.repeats} done", flush=True)
    print(f"\nbase {trees['base']}\nwork {trees['work']}\n{args.steps} timed steps per run, {args.repeats} rounds, "
          f"vector cases: {args.num_envs} envs over {args.workers} local workers\n")
    print(f"{'case':24s} {'base':>10s} {'work':>10s}  work/base  runs (env-steps/s)")
    for case in cases:
        base, work = results[(case, "base")], results[(case, "work")]
        mb, mw = statistics.median(base), statistics.median(work)
        print(f"{case:24s} {mb:10,.0f} {mw:10,.0f}  {mw / mb:8.3f}x  "
              f"base {', '.join(f'{x:,.0f}' for x in base)}; work {', '.join(f'{x:,.0f}' for x in work)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
