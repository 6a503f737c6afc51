"""Small envs that ship with ws_gym, for benchmarks and for checking a link.

- ``ws_gym/StaticImage-v0``: 84x84x4 uint8 observations (an Atari-sized frame
  stack) that cost nothing to produce, so a benchmark measures the transport.
- ``ws_gym/NoOp-v0``: a one-float observation and nothing else.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces


class StaticImageEnv(gym.Env):
    """Returns the same image every step; episodes last ``episode_length`` steps."""

    metadata = {"render_modes": []}

    def __init__(self, shape: tuple[int, ...] = (84, 84, 4), episode_length: int = 1000) -> None:
        self.observation_space = spaces.Box(0, 255, tuple(shape), np.uint8)
        self.action_space = spaces.Discrete(4)
        self.episode_length = episode_length
        self._image = np.zeros(self.observation_space.shape, np.uint8)
        self._t = 0

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self._image = self.np_random.integers(0, 256, self.observation_space.shape, dtype=np.uint8)
        self._t = 0
        return self._image, {}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        self._t += 1
        return self._image, 1.0, False, self._t >= self.episode_length, {}


class NoOpEnv(gym.Env):
    """The cheapest possible env: measures pure per-step overhead."""

    metadata = {"render_modes": []}

    def __init__(self) -> None:
        self.observation_space = spaces.Box(-1.0, 1.0, (1,), np.float32)
        self.action_space = spaces.Discrete(2)
        self._obs = np.zeros(1, np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        return self._obs, {}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        return self._obs, 0.0, False, False, {}


def register_envs() -> None:
    if "ws_gym/StaticImage-v0" not in gym.registry:
        gym.register("ws_gym/StaticImage-v0", entry_point="ws_gym.envs:StaticImageEnv",
                     disable_env_checker=True)
    if "ws_gym/NoOp-v0" not in gym.registry:
        gym.register("ws_gym/NoOp-v0", entry_point="ws_gym.envs:NoOpEnv", disable_env_checker=True)
