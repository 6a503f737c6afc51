"""Small envs that ship with ws_gym, for benchmarks and for checking a link.

- ``ws_gym/StaticImage-v0``: 84x84x4 uint8 observations (an Atari-sized frame
  stack) that cost nothing to produce, so a benchmark measures the transport.
- ``ws_gym/NoOp-v0``: a one-float observation and nothing else.
- ``ws_gym/CartPolePixels-v0``: CartPole drawn with numpy into 84x84
  grayscale frames, the last 4 stacked (84x84x4 uint8): a flat background, a
  ground line, a cart and a pole, so the frames compress as real renders do
  (for the compression benchmark; no pygame needed).
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


class CartPolePixelsEnv(gym.Env):
    """CartPole (gymnasium's, same dynamics, rewards and ends) seen as pixels:
    each step draws the state into an 84x84 grayscale frame; the observation
    is the last 4 frames, stacked on the last axis (84x84x4 uint8)."""

    metadata = {"render_modes": []}
    SIZE, STACK = 84, 4
    GROUND, CART_W, CART_H, POLE = 62, 12, 6, 26  # pixels

    def __init__(self) -> None:
        from gymnasium.envs.classic_control.cartpole import CartPoleEnv

        self._inner = CartPoleEnv()
        n = self.SIZE
        self.observation_space = spaces.Box(0, 255, (n, n, self.STACK), np.uint8)
        self.action_space = self._inner.action_space
        self._bg = np.full((n, n), 200, np.uint8)  # a flat background with a ground line
        self._bg[self.GROUND + self.CART_H // 2 :, :] = 120
        self._stack = np.zeros(self.observation_space.shape, np.uint8)
        self._t = np.linspace(0.0, 1.0, 2 * self.POLE)  # points along the pole

    def _draw(self, state: Any) -> np.ndarray:
        x, _, theta, _ = (float(v) for v in state)
        n, frame = self.SIZE, self._bg.copy()
        cx = int(round((x / 2.4 + 1.0) * 0.5 * (n - 1 - self.CART_W))) + self.CART_W // 2
        cx = min(max(cx, self.CART_W // 2), n - 1 - self.CART_W // 2)
        top = self.GROUND - self.CART_H // 2
        frame[top : top + self.CART_H, cx - self.CART_W // 2 : cx + self.CART_W // 2] = 30
        rows = np.rint(top - self._t * self.POLE * np.cos(theta)).astype(np.intp)
        cols = np.rint(cx + self._t * self.POLE * np.sin(theta)).astype(np.intp)
        keep = (rows >= 0) & (rows < n) & (cols >= 0) & (cols < n - 1)
        rows, cols = rows[keep], cols[keep]
        frame[rows, cols] = frame[rows, cols + 1] = 90  # two pixels wide
        return frame

    def _push(self, state: Any) -> np.ndarray:
        stack = self._stack
        stack[..., :-1] = stack[..., 1:]
        stack[..., -1] = self._draw(state)
        return stack.copy()

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        state, info = self._inner.reset(seed=seed, options=options)
        self._stack[...] = self._draw(state)[..., None]
        return self._stack.copy(), info

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        state, reward, terminated, truncated, info = self._inner.step(action)
        return self._push(state), float(reward), terminated, truncated, info


def register_envs() -> None:
    if "ws_gym/StaticImage-v0" not in gym.registry:
        gym.register("ws_gym/StaticImage-v0", entry_point="ws_gym.envs:StaticImageEnv",
                     disable_env_checker=True)
    if "ws_gym/NoOp-v0" not in gym.registry:
        gym.register("ws_gym/NoOp-v0", entry_point="ws_gym.envs:NoOpEnv", disable_env_checker=True)
    if "ws_gym/CartPolePixels-v0" not in gym.registry:
        gym.register("ws_gym/CartPolePixels-v0", entry_point="ws_gym.envs:CartPolePixelsEnv",
                     max_episode_steps=500, disable_env_checker=True)
