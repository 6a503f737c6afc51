"""A one-command demo: train CartPole through remote workers on loopback.

    python -m ws_gym.demo

The trainer starts two local worker processes that dial in over a WebSocket,
exactly as workers on another PC would, then searches for a linear policy by
random search (numpy only, no deep-learning framework needed), printing
progress, and ends with the measured throughput.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import cast

import gymnasium as gym
import numpy as np

import ws_gym  # noqa: F401  (registers ws_gym/Remote-v0)
from ws_gym.vector import RemoteVectorEnv


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ws_gym.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--env", default="CartPole-v1", help="env id (default CartPole-v1)")
    p.add_argument("--num-envs", type=int, default=8, help="envs stepped in parallel (default 8)")
    p.add_argument("--workers", type=int, default=2, help="local worker processes (default 2)")
    p.add_argument("--tries", type=int, default=150, help="random policies tried at most (default 150)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def run_episodes(envs, weights: np.ndarray, seed: int) -> tuple[np.ndarray, int]:
    """One episode per env, env i acting with linear policy weights[i]; returns (returns, steps)."""
    n = envs.num_envs
    obs, _ = envs.reset(seed=seed)
    returns = np.zeros(n)
    running = np.ones(n, dtype=bool)
    steps = 0
    while running.any():
        logits = np.einsum("ij,ij->i", obs, weights[:, :-1]) + weights[:, -1]
        actions = (logits > 0).astype(np.int64)
        obs, reward, terminated, truncated, _ = envs.step(actions)
        steps += 1
        returns += reward * running
        running &= ~(terminated | truncated)
    return returns, steps


def bar(fraction: float, width: int = 24) -> str:
    full = int(round(max(0.0, min(1.0, fraction)) * width))
    return "#" * full + "." * (width - full)


def main(argv=None) -> int:
    args = parse_args(argv)
    rng = np.random.default_rng(args.seed)
    print(f"ws_gym demo: {args.num_envs} x {args.env} in {args.workers} local workers over WebSocket")
    envs = cast(RemoteVectorEnv, gym.make_vec(  # ws_gym/Remote-v0's vector_entry_point
        "ws_gym/Remote-v0", num_envs=args.num_envs, env_id=args.env,
        port=0, local_workers=args.workers,
    ))
    try:
        print(f"trainer listening at {envs.url}")
        obs_shape = envs.single_observation_space.shape
        if obs_shape is None:
            print("this demo's policy needs an env with array observations", file=sys.stderr)
            return 1
        dim = int(np.prod(obs_shape)) + 1
        if not hasattr(envs.single_action_space, "n") or envs.single_action_space.n != 2:
            print("this demo's policy needs an env with two discrete actions", file=sys.stderr)
            return 1
        max_return = envs.spec.max_episode_steps if envs.spec and envs.spec.max_episode_steps else 500
        envs.reset(seed=args.seed)  # waits for the workers to connect
        # Random search: each candidate linear policy plays one episode in every
        # env at once, so its score is a mean over num_envs episodes.
        best_w, best_score = np.zeros(dim), -np.inf
        total_steps, t0 = 0, time.perf_counter()
        for k in range(1, args.tries + 1):
            w = rng.uniform(-1, 1, dim)
            w[-1] = 0.0  # no bias
            returns, steps = run_episodes(envs, np.tile(w, (args.num_envs, 1)), seed=args.seed + k)
            total_steps += steps * args.num_envs
            improved = returns.mean() > best_score
            if improved:
                best_w, best_score = w, returns.mean()
            if improved or k % 10 == 0:
                rate = total_steps / (time.perf_counter() - t0)
                print(
                    f"try {k:3d}  [{bar(best_score / max_return)}]  best mean return {best_score:6.1f}  "
                    f"env-steps {total_steps:8,d}  {rate:8,.0f} env-steps/s",
                    flush=True,
                )
            if best_score >= 0.95 * max_return:
                break
        returns, steps = run_episodes(envs, np.tile(best_w, (args.num_envs, 1)), seed=args.seed + 10_000)
        total_steps += steps * args.num_envs
        print(f"best policy on {args.num_envs} fresh episodes: mean return {returns.mean():.1f}")
        elapsed = time.perf_counter() - t0
        print(
            f"throughput: {total_steps / elapsed:,.0f} env-steps/s "
            f"({total_steps:,d} env-steps in {elapsed:.1f} s, {args.num_envs} envs, {args.workers} workers)"
        )
    finally:
        envs.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
