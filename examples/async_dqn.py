"""DQN on CartPole with partial batches: the learner never waits for the slowest PC.

Read it top to bottom: arguments, the Q-network, then one loop. The envs are
``gym.make_vec("ws_gym/Remote-v0", ..., batch_size=B)``: ``envs.recv()``
returns the first ``B`` envs whose step is done (with their ids), and
``envs.send(actions, env_ids)`` sends those envs their next actions. Envs on
a slow PC are simply not in the batch until their results come, so one slow
link does not hold every step back, as EnvPool's asynchronous mode does on one
machine. Each env's transitions are kept apart by its id.

With ``local_workers=2`` the envs run in two worker processes here; with
``--local-workers 0 --host 0.0.0.0 --port 8765`` on any PC that starts
``python -m ws_gym.worker --url ws://THIS_HOST:8765/ws --env CartPole-v1 --num-envs 4``.

    pip install "ws_gym[sb3]"     # torch (SB3 itself is not used here)
    python examples/async_dqn.py
"""

from __future__ import annotations

import argparse
import random
import time
from collections import deque

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import ws_gym  # noqa: F401  (registers ws_gym/Remote-v0)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--env-id", default="CartPole-v1")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--total-timesteps", type=int, default=100_000)
    p.add_argument("--num-envs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4, help="envs per recv() (a worker's envs come together)")
    p.add_argument("--learning-rate", type=float, default=2.5e-4)
    p.add_argument("--buffer-size", type=int, default=10_000)
    p.add_argument("--gamma", type=float, default=0.99)
    p.add_argument("--target-network-frequency", type=int, default=500, help="env steps between target updates")
    p.add_argument("--train-batch", type=int, default=128)
    p.add_argument("--start-e", type=float, default=1.0)
    p.add_argument("--end-e", type=float, default=0.05)
    p.add_argument("--exploration-fraction", type=float, default=0.5)
    p.add_argument("--learning-starts", type=int, default=2_000)
    p.add_argument("--train-frequency", type=int, default=8, help="env steps per gradient step")
    # where the envs run
    p.add_argument("--local-workers", type=int, default=2, help="worker processes started here (0: remote PCs only)")
    p.add_argument("--host", default="127.0.0.1", help='address to listen on ("0.0.0.0" for other PCs)')
    p.add_argument("--port", type=int, default=0, help="port to listen on (0: any free one)")
    return p.parse_args()


class QNetwork(nn.Module):
    def __init__(self, obs_size: int, n_actions: int) -> None:
        super().__init__()
        self.network = nn.Sequential(nn.Linear(obs_size, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
                                     nn.Linear(84, n_actions))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)


def linear_schedule(start_e: float, end_e: float, duration: float, t: int) -> float:
    return max(end_e, start_e + (end_e - start_e) * t / duration)


def main() -> None:
    args = parse_args()
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)

    # The env line. SAME_STEP: an ended env's last observation is in infos["final_obs"]
    # and the observation returned is its next episode's first. Episode statistics are
    # recorded in the workers and arrive in infos["final_info"]["episode"].
    envs = gym.make_vec(
        "ws_gym/Remote-v0", num_envs=args.num_envs, batch_size=args.batch_size, env_id=args.env_id,
        local_workers=args.local_workers, host=args.host, port=args.port,
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP, record_episode_statistics=True,
    )
    assert isinstance(envs.single_action_space, gym.spaces.Discrete), "only discrete actions are supported"
    obs_size, n_actions = int(np.prod(envs.single_observation_space.shape)), int(envs.single_action_space.n)

    q_network = QNetwork(obs_size, n_actions)
    target_network = QNetwork(obs_size, n_actions)
    target_network.load_state_dict(q_network.state_dict())
    optimizer = torch.optim.Adam(q_network.parameters(), lr=args.learning_rate)

    # the replay buffer: one row per transition, from whichever env it came
    rb_obs = np.zeros((args.buffer_size, obs_size), np.float32)
    rb_next = np.zeros((args.buffer_size, obs_size), np.float32)
    rb_action = np.zeros(args.buffer_size, np.int64)
    rb_reward = np.zeros(args.buffer_size, np.float32)
    rb_done = np.zeros(args.buffer_size, np.float32)
    rb_size = rb_pos = 0

    # each env's last observation and action, by env id: a transition is completed
    # when that env comes back from recv(), whenever that is
    last_obs = np.zeros((args.num_envs, obs_size), np.float32)
    last_action = np.zeros(args.num_envs, np.int64)
    acted = np.zeros(args.num_envs, bool)

    global_step = trained_at = 0
    recent_returns: deque[float] = deque(maxlen=20)
    start_time = time.time()
    envs.async_reset(seed=args.seed)
    try:
        while global_step < args.total_timesteps:
            obs, rewards, terminations, truncations, infos, env_ids = envs.recv()
            obs = obs.reshape(len(env_ids), -1).astype(np.float32)

            # store the transitions these envs completed (the first recv() holds reset observations)
            real_next = obs.copy()
            if "final_obs" in infos:
                for j in np.flatnonzero(infos["_final_obs"]):
                    real_next[j] = np.asarray(infos["final_obs"][j], np.float32).reshape(-1)
            for j, env in enumerate(env_ids):
                if not acted[env]:
                    continue
                rb_obs[rb_pos], rb_next[rb_pos] = last_obs[env], real_next[j]
                rb_action[rb_pos], rb_reward[rb_pos] = last_action[env], rewards[j]
                rb_done[rb_pos] = terminations[j]  # a truncated episode still bootstraps
                rb_pos, rb_size = (rb_pos + 1) % args.buffer_size, min(rb_size + 1, args.buffer_size)
                global_step += 1
            if "final_info" in infos and "episode" in infos["final_info"]:
                episode, ended = infos["final_info"]["episode"], infos["final_info"]["_episode"]
                for r, length in zip(episode["r"][ended], episode["l"][ended]):
                    recent_returns.append(float(r))
                    print(f"global_step={global_step}, episodic_return={r:g}, episodic_length={length}")

            # epsilon-greedy actions for these envs only, and off they go
            epsilon = linear_schedule(args.start_e, args.end_e, args.exploration_fraction * args.total_timesteps,
                                      global_step)
            with torch.no_grad():
                greedy = q_network(torch.from_numpy(obs)).argmax(dim=1).numpy()
            explore = np.random.random(len(env_ids)) < epsilon
            actions = np.where(explore, np.random.randint(n_actions, size=len(env_ids)), greedy)
            envs.send(actions, env_ids)
            last_obs[env_ids], last_action[env_ids], acted[env_ids] = obs, actions, True

            # learn while the envs step: one gradient step per train_frequency env steps
            if global_step <= args.learning_starts:
                trained_at = global_step
            while global_step - trained_at >= args.train_frequency:
                trained_at += args.train_frequency
                idx = np.random.randint(rb_size, size=args.train_batch)
                with torch.no_grad():
                    target_max = target_network(torch.from_numpy(rb_next[idx])).max(dim=1).values
                    td_target = torch.from_numpy(rb_reward[idx]) + args.gamma * target_max * (
                        1 - torch.from_numpy(rb_done[idx]))
                old_val = q_network(torch.from_numpy(rb_obs[idx])).gather(
                    1, torch.from_numpy(rb_action[idx]).view(-1, 1)).squeeze(1)
                loss = F.mse_loss(td_target, old_val)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                if trained_at % args.target_network_frequency < args.train_frequency:
                    target_network.load_state_dict(q_network.state_dict())
    finally:
        envs.close()

    mean = float(np.mean(recent_returns)) if recent_returns else float("nan")
    print(f"done: {global_step} steps in {time.time() - start_time:.1f} s; "
          f"mean episodic return over the last 20 episodes: {mean:.1f}")


if __name__ == "__main__":
    main()
