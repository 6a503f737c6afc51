"""Stable-Baselines3's PPO on CartPole, the envs in ws_gym workers.

The only line that differs from a plain SB3 script is the one that makes the env::

    env = stable_baselines3.common.env_util.make_vec_env("CartPole-v1", n_envs=8)  # SB3
    env = ws_gym.sb3.make_vec_env("CartPole-v1", n_envs=8, local_workers=2)        # ws_gym

With ``local_workers=2`` the envs run in two worker processes on this machine;
with ``--local-workers 0 --host 0.0.0.0 --port 8765`` they run on any PC that
starts ``python -m ws_gym.worker --url ws://THIS_HOST:8765/ws --env CartPole-v1``.

    pip install "ws_gym[sb3]"
    python examples/sb3_ppo.py

Hyperparameters are those of the RL Baselines3 Zoo for CartPole-v1.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.evaluation import evaluate_policy

from ws_gym.sb3 import make_vec_env


def linear(start: float):
    """A schedule from ``start`` down to 0 over training (SB3 passes the remaining fraction)."""
    return lambda remaining: remaining * start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--env-id", default="CartPole-v1")
    p.add_argument("--num-envs", type=int, default=8)
    p.add_argument("--total-timesteps", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--local-workers", type=int, default=2, help="worker processes started here (0: remote PCs only)")
    p.add_argument("--host", default="127.0.0.1", help='address to listen on ("0.0.0.0" for other PCs)')
    p.add_argument("--port", type=int, default=0, help="port to listen on (0: any free one)")
    args = p.parse_args()
    torch.set_num_threads(1)  # small networks: one thread is fastest

    start = time.perf_counter()
    env = make_vec_env(args.env_id, n_envs=args.num_envs, local_workers=args.local_workers,
                       host=args.host, port=args.port)
    try:
        model = PPO(
            "MlpPolicy", env, n_steps=32, batch_size=256, gae_lambda=0.8, gamma=0.98, n_epochs=20,
            ent_coef=0.0, learning_rate=linear(0.001), clip_range=linear(0.2), seed=args.seed, verbose=1,
        )
        model.learn(args.total_timesteps)
        trained = time.perf_counter() - start
        mean, std = evaluate_policy(model, env, n_eval_episodes=20, deterministic=True)
    finally:
        env.close()
    train_mean = np.mean([ep["r"] for ep in model.ep_info_buffer])
    print(f"trained {args.total_timesteps} timesteps in {trained:.1f} s; "
          f"mean episode return: {train_mean:.1f} over the last {len(model.ep_info_buffer)} training episodes, "
          f"{mean:.1f} +- {std:.1f} over 20 deterministic evaluation episodes")


if __name__ == "__main__":
    main()
