"""ws_gym: Gymnasium envs in remote workers that dial out over a WebSocket.

``import ws_gym`` registers ``ws_gym/Remote-v0``::

    envs = gym.make_vec("ws_gym/Remote-v0", num_envs=8, env_id="CartPole-v1", local_workers=2)
    env = gym.make("ws_gym/Remote-v0", env_id="CartPole-v1", local_workers=1)
"""

from __future__ import annotations

import gymnasium as gym

from .env import RemoteEnv
from .envs import register_envs
from .errors import (
    ConnectTimeoutError,
    HandshakeError,
    ProtocolError,
    RelayError,
    RemoteEnvError,
    StepTimeoutError,
    UnsupportedSpaceError,
    WorkerLostError,
    WsGymError,
)
from .protocol import PROTOCOL_VERSION
from .vector import RemoteVectorEnv

__version__ = "0.1.0"

__all__ = [
    "RemoteVectorEnv",
    "RemoteEnv",
    "WsGymError",
    "ProtocolError",
    "UnsupportedSpaceError",
    "HandshakeError",
    "RemoteEnvError",
    "WorkerLostError",
    "ConnectTimeoutError",
    "StepTimeoutError",
    "RelayError",
    "PROTOCOL_VERSION",
]

if "ws_gym/Remote-v0" not in gym.registry:
    gym.register(
        "ws_gym/Remote-v0",
        entry_point="ws_gym:RemoteEnv",
        vector_entry_point="ws_gym:RemoteVectorEnv",
        disable_env_checker=True,
    )
register_envs()
