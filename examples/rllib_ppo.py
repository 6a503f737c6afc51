"""RLlib's PPO on CartPole, 2 EnvRunners x 4 envs, every env in a ws_gym worker.

Read it top to bottom: arguments, the RLlib config a user has today, the one
line that moves its envs into ws_gym workers, then the training loop that
prints the learning curve. Each EnvRunner starts its own trainer (a
``RemoteVectorEnv``); with ``--local-workers 1`` each starts one worker
process on this machine. To serve the envs from other PCs instead::

    python examples/rllib_ppo.py --local-workers 0 --host 0.0.0.0 --port 8765
    # on each PC (the command is printed, token included):
    WS_GYM_TOKEN=... python -m ws_gym.worker --url ws://THIS_HOST:8765/ws --env CartPole-v1 --num-envs 4

The run's URL (port 8765) sends each worker to an EnvRunner that still needs
envs (EnvRunner i listens on 8765 + i).

    pip install "ws_gym[rllib]"
    python examples/rllib_ppo.py
"""

from __future__ import annotations

import argparse
import time

import ray
from ray.rllib.algorithms.ppo import PPOConfig

import ws_gym.rllib


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--env-id", default="CartPole-v1")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--total-timesteps", type=int, default=40_000)
    p.add_argument("--target-return", type=float, default=450.0, help="stop once the mean return reaches it")
    p.add_argument("--num-env-runners", type=int, default=2)
    p.add_argument("--num-envs-per-env-runner", type=int, default=4)
    p.add_argument("--train-batch-size", type=int, default=2000, help="env steps per training iteration")
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs Ray may use here")
    # where the envs run
    p.add_argument("--local-workers", type=int, default=1,
                   help="worker processes each EnvRunner starts here (0: workers on other PCs only)")
    p.add_argument("--host", default="127.0.0.1", help='address to listen on ("0.0.0.0" for other PCs)')
    p.add_argument("--port", type=int, default=0,
                   help="the run's port; EnvRunner i listens on port + i (0: free ports, local workers only)")
    return p.parse_args(argv)


def make_config(args: argparse.Namespace) -> PPOConfig:
    # the RLlib config a user has today: envs in the EnvRunner processes
    config = (
        PPOConfig()
        .environment(args.env_id)
        .env_runners(num_env_runners=args.num_env_runners, num_envs_per_env_runner=args.num_envs_per_env_runner)
        .training(lr=3e-4, gamma=0.99, lambda_=0.95, num_epochs=6, minibatch_size=250, vf_loss_coeff=0.01,
                  train_batch_size_per_learner=args.train_batch_size)
        .debugging(seed=args.seed)
    )
    # the line that changes: every env in a ws_gym worker, each EnvRunner on its own port
    return ws_gym.rllib.remote_envs(config, port=args.port, host=args.host, local_workers=args.local_workers)


def main(argv: list[str] | None = None) -> float:
    args = parse_args(argv)
    ray.init(num_cpus=args.num_cpus, include_dashboard=False)
    config = make_config(args)
    run_url = None
    if args.port:  # one URL for every PC of the run; it sends each worker on to an EnvRunner
        run_url = ws_gym.rllib.RunURL(config)
        print("on each PC run:", run_url.worker_command(args.env_id, args.num_envs_per_env_runner), flush=True)
    algo = config.build_algo()
    start = time.perf_counter()
    steps, mean_return = 0, float("nan")
    try:
        while steps < args.total_timesteps:
            result = algo.train()
            runners = result["env_runners"]
            steps = int(runners["num_env_steps_sampled_lifetime"])
            mean_return = float(runners.get("episode_return_mean", float("nan")))
            print(f"iteration={result['training_iteration']}, env_steps={steps}, "
                  f"episode_return_mean={mean_return:.1f}, seconds={time.perf_counter() - start:.1f}", flush=True)
            if mean_return >= args.target_return:
                break
    finally:
        algo.stop()
        if run_url is not None:
            run_url.close()
        ray.shutdown()
    print(f"done: {steps} env steps in {time.perf_counter() - start:.1f} s; "
          f"mean episode return {mean_return:.1f}", flush=True)
    return mean_return


if __name__ == "__main__":
    main()
