"""Envs used by the integration tests (importable by worker processes as ``tests.envs``)."""

from __future__ import annotations

import os
import time

import gymnasium as gym
import numpy as np
from gymnasium import spaces


class FancyEnv(gym.Env):
    """Dict/Tuple/Text observations, Tuple actions, rich infos, random episode ends."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 4}

    def __init__(self, render_mode=None, horizon=12):
        self.render_mode = render_mode
        self.horizon = horizon
        self.observation_space = spaces.Dict(
            {
                "pos": spaces.Box(np.array([-1.0, 0.0]), np.array([1.0, np.inf]), dtype=np.float64),
                "cell": spaces.Discrete(5, start=-2),
                "bits": spaces.MultiBinary([2, 2]),
                "pair": spaces.Tuple((spaces.MultiDiscrete([3, 4]), spaces.Box(0, 255, (2, 3), np.uint8))),
                "word": spaces.Text(6, min_length=1, charset="abcxyz"),
            }
        )
        self.action_space = spaces.Tuple((spaces.Discrete(3), spaces.Box(-1, 1, (2,), np.float32)))
        self.greeting = "hi"

    def _obs(self):
        r = self.np_random
        return {
            "pos": np.array([r.uniform(-1, 1), r.uniform(0, 5)]),
            "cell": np.int64(r.integers(-2, 3)),
            "bits": r.integers(0, 2, (2, 2)).astype(np.int8),
            "pair": (r.integers(0, [3, 4]).astype(np.int64), r.integers(0, 256, (2, 3), dtype=np.uint8)),
            "word": "".join(r.choice(list("abcxyz"), size=int(r.integers(1, 7)))),
        }

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        info = {"start": True, "opt": dict(options or {}), "n": np.int32(7)}
        return self._obs(), info

    def step(self, action):
        self.t += 1
        r = self.np_random
        kind, vec = action
        info = {
            "t": self.t,
            "x": float(vec[0]),
            "flag": bool(kind == 1),
            "name": "step",
            "none": None,
            "lst": [1, 2.5, "a"],
            "nested": {"k": np.arange(3, dtype=np.int16), "v": np.float32(0.5)},
        }
        if self.t % 5 == 0:
            info["sometimes"] = np.array([self.t, -self.t], dtype=np.int64)
        if self.t % 7 == 0:
            info["odd"] = Opaque(self.t)
        terminated = bool(r.random() < 0.08)
        truncated = self.t >= self.horizon
        return self._obs(), float(kind) + float(vec.sum()), terminated, truncated, info

    def render(self):
        if self.render_mode == "rgb_array":
            return np.full((4, 6, 3), self.t % 256, dtype=np.uint8)
        return None

    def shout(self, word, times=1):
        return (word.upper() * times, self.t)


class Opaque:
    def __init__(self, n):
        self.n = n

    def __repr__(self):
        return f"Opaque({self.n})"


class CrashEnv(gym.Env):
    """Action 1 kills the worker process mid-step; 2 raises ValueError; 3 is slow."""

    metadata = {"render_modes": []}

    def __init__(self):
        self.observation_space = spaces.Box(-1, 1, (2,), np.float32)
        self.action_space = spaces.Discrete(4)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(2, np.float32), {}

    def step(self, action):
        if action == 1:
            os._exit(17)
        if action == 2:
            raise ValueError("action 2 is not allowed here")
        if action == 3:
            time.sleep(3)  # a slow env, for step_timeout
        return np.zeros(2, np.float32), 0.0, False, False, {}


class CounterEnv(gym.Env):
    """Counts its own steps, so a test can check that none is lost or doubled.

    obs = [steps in this episode, steps of this env object]; episodes end
    (terminated) after ``length`` steps. Action 1 kills the worker process,
    3 takes 3 s, anything else is an ordinary step with reward 1.
    """

    metadata = {"render_modes": []}

    def __init__(self, length: int = 9):
        self.observation_space = spaces.Box(0, 1e9, (2,), np.float64)
        self.action_space = spaces.Discrete(4)
        self.length = length
        self.t = self.total = 0

    def _obs(self):
        return np.array([self.t, self.total], dtype=np.float64)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self._obs(), {"total": self.total}

    def step(self, action):
        if action == 1:
            os._exit(17)
        if action == 3:
            time.sleep(3)
        self.t += 1
        self.total += 1
        return self._obs(), 1.0, self.t >= self.length, False, {}


class FramesEnv(gym.Env):
    """Image-sized observations that differ at every step (a function of the
    seed, the step and the action), with no infos: for the compact path of big
    frames. Episodes are truncated after ``length`` steps."""

    metadata = {"render_modes": []}

    def __init__(self, shape=(64, 64, 3), length: int = 25):
        self.observation_space = spaces.Box(0, 255, tuple(shape), np.uint8)
        self.action_space = spaces.Discrete(256)
        self.length = length
        self.t = 0
        self._base = np.zeros(tuple(shape), np.uint8)
        self._frame = np.zeros(tuple(shape), np.uint8)  # one buffer, overwritten at every step

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        self._base = self.np_random.integers(0, 256, self._base.shape, dtype=np.uint8)
        self._frame[...] = self._base
        return self._frame, {}

    def step(self, action):
        self.t += 1
        np.add(self._base, (self.t * 7 + int(action)) % 256, out=self._frame, casting="unsafe")
        return self._frame, float(action) / 256, False, self.t >= self.length, {}


class GraphEnv(gym.Env):
    """An observation space ws_gym cannot describe."""

    metadata = {"render_modes": []}

    def __init__(self):
        self.observation_space = spaces.Graph(spaces.Box(0, 1, (2,)), None)
        self.action_space = spaces.Discrete(2)


class BadInitEnv(gym.Env):
    metadata = {"render_modes": []}

    def __init__(self):
        raise RuntimeError("this env cannot be built")


for _id, _cls in [("Fancy-v0", FancyEnv), ("Crash-v0", CrashEnv), ("Counter-v0", CounterEnv), ("Frames-v0", FramesEnv), ("GraphObs-v0", GraphEnv), ("BadInit-v0", BadInitEnv)]:
    if _id not in gym.registry:
        gym.register(_id, entry_point=f"tests.envs:{_cls.__name__}", disable_env_checker=True)
