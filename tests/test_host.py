"""Unit tests of ws_gym.host.EnvHost: the worker's env logic, without sockets.

The host's replies, replayed as the trainer does (``reply["f"]`` through
gymnasium's own ``VectorEnv._add_info``), must equal a local SyncVectorEnv
stepped with the same seeds and actions: observations, rewards, flags and the
merged infos, dtypes included.
"""

from __future__ import annotations

import numpy as np
import gymnasium as gym
import pytest
from gymnasium.envs.classic_control.cartpole import CartPoleEnv
from gymnasium.vector import VectorEnv

from ws_gym import codec
from ws_gym import protocol as P
from ws_gym.errors import ProtocolError
from ws_gym.host import EnvHost
from ws_gym.spaces import schema_to_space

MODES = ("NextStep", "SameStep", "Disabled")
STEPS = 300
NUM_ENVS = 3


class InfoCartPole(CartPoleEnv):
    """CartPole with infos of many types, some keys only on some steps."""

    def reset(self, *, seed=None, options=None):
        obs, _ = super().reset(seed=seed, options=options)
        self._t = 0
        return obs, {"seeded": seed is not None, "start": obs.copy(), "opts": dict(options or {})}

    def step(self, action):
        obs, reward, terminated, truncated, _ = super().step(action)
        self._t += 1
        info = {"t": self._t, "x": np.float32(obs[0]), "pos": obs[:2].copy(), "left": bool(obs[0] < 0)}
        if self._t % 3 == 0:
            info["every3"] = {"name": f"step{self._t}", "pair": (self._t, "x"), "u8": np.uint8(self._t % 256)}
        if terminated:
            info["why"] = "fell"
            info["score"] = float(self._t)
        return obs, reward, terminated, truncated, info


if "WsGymTest/InfoCartPole-v0" not in gym.registry:
    gym.register("WsGymTest/InfoCartPole-v0", entry_point=InfoCartPole)

ENV_IDS = ("CartPole-v1", "WsGymTest/InfoCartPole-v0")


# ------------------------------------------------------------------ helpers


class _Merger(VectorEnv):
    """Only for gymnasium's own ``_add_info``, as the trainer uses it."""

    def __init__(self, num_envs: int) -> None:
        self.num_envs = num_envs


def replay(log: list, num_envs: int = NUM_ENVS) -> dict:
    merger = _Merger(num_envs)
    infos: dict = {}
    for i, info in log:
        assert type(i) is int and 0 <= i < num_envs and type(info) is dict and info
        infos = merger._add_info(infos, info, i)
    return infos


def over_the_wire(reply):
    """The reply as the trainer gets it: encoded, decoded, made writable."""
    return codec.writable(codec.decode(codec.encode(P.OK, 7, reply)).body)


def assert_equal(a, b, path="value"):
    """Exact equality of nested dicts/lists/tuples of numpy arrays and scalars:
    same types, same dtypes and shapes, same values (NaN equals NaN)."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, dict):
        assert list(a) == list(b), f"{path}: keys {list(a)} vs {list(b)}"
        for k in a:
            assert_equal(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: length {len(a)} vs {len(b)}"
        for n, (x, y) in enumerate(zip(a, b)):
            assert_equal(x, y, f"{path}[{n}]")
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype, f"{path}: dtype {a.dtype} vs {b.dtype}"
        assert a.shape == b.shape, f"{path}: shape {a.shape} vs {b.shape}"
        if a.dtype == object:
            for idx in np.ndindex(a.shape):
                assert_equal(a[idx], b[idx], f"{path}{list(idx)}")
        elif a.dtype.kind in "fc":
            assert np.array_equal(a, b, equal_nan=True), f"{path}: {a} vs {b}"
        else:
            assert np.array_equal(a, b), f"{path}: {a} vs {b}"
    elif isinstance(a, (float, np.floating)) and a != a:
        assert b != b, f"{path}: {a} vs {b}"
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


def welcome(autoreset_mode="NextStep", env_id="CartPole-v1", max_episode_steps=None, **kw) -> P.Welcome:
    fields = dict(
        env_id=env_id,
        env_kwargs={},
        num_envs=NUM_ENVS,
        first_index=0,
        mode="vector",
        autoreset_mode=autoreset_mode,
        max_episode_steps=max_episode_steps,
    )
    fields.update(kw)
    return P.Welcome(**fields)


@pytest.fixture
def host():
    h = EnvHost(welcome())
    yield h
    h.close()


# ---------------------------------------------------------------- vector mode


@pytest.mark.parametrize("max_episode_steps", [None, 12], ids=["no-limit", "limit-12"])
@pytest.mark.parametrize("env_id", ENV_IDS)
@pytest.mark.parametrize("wire", [False, True], ids=["direct", "wire"])
@pytest.mark.parametrize("mode", MODES)
def test_vector_host_equals_sync_vector_env(mode, wire, env_id, max_episode_steps):
    extra = {} if max_episode_steps is None else {"max_episode_steps": max_episode_steps}
    ref = gym.make_vec(env_id, NUM_ENVS, vectorization_mode="sync", vector_kwargs={"autoreset_mode": mode}, **extra)
    host = EnvHost(welcome(mode, env_id, max_episode_steps))
    send = over_the_wire if wire else (lambda reply: reply)
    rng = np.random.default_rng(1234)
    ends = truncations = 0

    def reset(seeds, mask=None, options=None):
        ref_options = dict(options or {})
        body = {"seeds": seeds, "options": options}
        if mask is not None:
            ref_options["reset_mask"] = mask
            body["mask"] = mask.tolist()
        ref_obs, ref_infos = ref.reset(seed=seeds, options=ref_options or None)
        reply = send(host.handle(P.RESET, body))
        assert set(reply) == {"o", "f"}
        assert_equal(ref_obs, reply["o"], "reset obs")
        assert_equal(ref_infos, replay(reply["f"]), "reset infos")

    try:
        reset([11, 12, 13])
        for t in range(STEPS):
            if t == STEPS // 2:  # a second full reset, with options, half way
                reset([21, None, 23], options={"note": "half"})
            actions = rng.integers(0, 2, NUM_ENVS)
            ref_out = ref.step(actions)
            reply = send(host.handle(P.STEP, {"a": actions}))
            assert set(reply) == {"o", "r", "t", "u", "f"}
            for name, want, got in zip(("obs", "rewards", "terminations", "truncations"), ref_out[:4], (reply["o"], reply["r"], reply["t"], reply["u"])):
                assert_equal(want, got, f"step {t} {name}")
            assert_equal(ref_out[4], replay(reply["f"]), f"step {t} infos")
            done = ref_out[2] | ref_out[3]
            ends += int(done.sum())
            truncations += int(ref_out[3].sum())
            if mode == "Disabled" and done.any():
                reset(None, mask=done)
    finally:
        ref.close()
        host.close()
    assert ends > 20  # the run did cover many autoresets
    if max_episode_steps is not None:
        assert truncations > 5


def test_vector_host_with_an_offset_index():
    # first_index says where this worker's envs sit in the trainer; the log
    # still uses the worker's own indices, which the trainer offsets
    host = EnvHost(welcome("SameStep", first_index=6, max_episode_steps=3))
    try:
        host.handle(P.RESET, {"seeds": [1, 2, 3]})
        logs = [host.handle(P.STEP, {"a": np.zeros(NUM_ENVS, np.int64)})["f"] for _ in range(3)]
        assert [i for i, _ in logs[-1]] == [0, 1, 2]
        assert all(set(info) == {"final_obs", "final_info"} for _, info in logs[-1])
    finally:
        host.close()


def test_final_obs_is_a_copy():
    # the host runs SyncVectorEnv with copy=False: final_obs must not alias a
    # buffer that the next reset or step overwrites
    host = EnvHost(welcome("SameStep", max_episode_steps=2))
    try:
        host.handle(P.RESET, {"seeds": [1, 2, 3]})
        host.handle(P.STEP, {"a": np.zeros(NUM_ENVS, np.int64)})
        reply = host.handle(P.STEP, {"a": np.zeros(NUM_ENVS, np.int64)})
        finals = [info["final_obs"].copy() for _, info in reply["f"]]
        kept = [info["final_obs"] for _, info in reply["f"]]
        for _ in range(3):
            host.handle(P.STEP, {"a": np.ones(NUM_ENVS, np.int64)})
        for a, b in zip(finals, kept):
            np.testing.assert_array_equal(a, b)
    finally:
        host.close()


# ---------------------------------------------------------------- single mode


@pytest.mark.parametrize("max_episode_steps", [None, 12], ids=["no-limit", "limit-12"])
@pytest.mark.parametrize("env_id", ENV_IDS)
@pytest.mark.parametrize("wire", [False, True], ids=["direct", "wire"])
def test_single_host_equals_gym_make(wire, env_id, max_episode_steps):
    extra = {} if max_episode_steps is None else {"max_episode_steps": max_episode_steps}
    ref = gym.make(env_id, **extra)
    host = EnvHost(welcome(env_id=env_id, mode="single", num_envs=1, max_episode_steps=max_episode_steps))
    send = over_the_wire if wire else (lambda reply: reply)
    rng = np.random.default_rng(99)
    episodes = 0

    def reset(seed):
        ref_obs, ref_info = ref.reset(seed=seed)
        reply = send(host.handle(P.RESET, {"seeds": seed}))
        assert set(reply) == {"o", "info"}
        assert_equal(ref_obs, reply["o"], "reset obs")
        assert_equal(ref_info, reply["info"], "reset info")

    try:
        reset(5)
        for t in range(STEPS):
            action = int(rng.integers(0, 2))
            ref_out = ref.step(action)
            reply = send(host.handle(P.STEP, {"a": action}))
            assert set(reply) == {"o", "r", "t", "u", "info"}
            got = (reply["o"], reply["r"], reply["t"], reply["u"], reply["info"])
            for name, want, have in zip(("obs", "reward", "terminated", "truncated", "info"), ref_out, got):
                assert_equal(want, have, f"step {t} {name}")
            if ref_out[2] or ref_out[3]:
                episodes += 1
                reset(None if episodes % 2 else 1000 + episodes)
    finally:
        ref.close()
        host.close()
    assert episodes > 5


# ---------------------------------------------------------------- ready, etc.


@pytest.mark.parametrize("mode", ["vector", "single"])
def test_ready_body(mode):
    host = EnvHost(welcome(mode=mode, num_envs=NUM_ENVS if mode == "vector" else 1))
    try:
        body = host.ready_body()
        ready = P.parse_ready(codec.decode(codec.encode(P.READY, 0, body, strict=True)).body)
        ref = gym.make("CartPole-v1")
        assert schema_to_space(ready.observation_space) == ref.observation_space
        assert schema_to_space(ready.action_space) == ref.action_space
        assert ready.render_mode is None
        assert ready.metadata["render_modes"] == list(ref.metadata["render_modes"])
        assert ready.metadata["render_fps"] == ref.metadata["render_fps"]
        ref.close()
    finally:
        host.close()


def test_call_and_set_attr(host):
    host.handle(P.RESET, {"seeds": [1, 2, 3]})
    assert host.handle(P.SET_ATTR, {"name": "my_attr", "values": [1, "two", 3.0]}) is None
    assert host.handle(P.CALL, {"name": "my_attr"}) == [1, "two", 3.0]
    spec = host.handle(P.CALL, {"name": "spec"})
    assert [s.id for s in spec] == ["CartPole-v1"] * NUM_ENVS
    assert host.handle(P.CALL, {"name": "get_wrapper_attr", "args": ["my_attr"], "kwargs": {}}) == [1, "two", 3.0]


def test_single_call_and_set_attr():
    host = EnvHost(welcome(mode="single", num_envs=1))
    try:
        host.handle(P.RESET, {"seeds": 3})
        assert host.handle(P.SET_ATTR, {"name": "my_attr", "values": [42]}) is None
        assert host.handle(P.CALL, {"name": "my_attr"}) == 42
        assert host.handle(P.CALL, {"name": "get_wrapper_attr", "args": ["my_attr"]}) == 42
    finally:
        host.close()


def test_close_is_idempotent():
    host = EnvHost(welcome())
    assert host.handle(P.CLOSE, {}) is None
    assert host.closed
    host.close()
    host.handle(P.CLOSE, {})


# ------------------------------------------------------------ bad requests

BAD_VECTOR_REQUESTS = [
    ("jump", {}),
    ("", {}),
    ("ok", {}),
    (P.HELLO, {}),
    (P.RESET, None),
    (P.RESET, []),
    (P.RESET, "seeds"),
    (P.RESET, {"seeds": [1, 2]}),
    (P.RESET, {"seeds": [1, 2, 3, 4]}),
    (P.RESET, {"seeds": []}),
    (P.RESET, {"seeds": 5}),
    (P.RESET, {"seeds": [1, 2, "3"]}),
    (P.RESET, {"seeds": [1, 2, 3.0]}),
    (P.RESET, {"seeds": [1, 2, True]}),
    (P.RESET, {"seeds": (1, 2, 3)}),
    (P.RESET, {"seeds": np.array([1, 2, 3])}),
    (P.RESET, {"seeds": None, "mask": [True, False]}),
    (P.RESET, {"seeds": None, "mask": [1, 0, 1]}),
    (P.RESET, {"seeds": None, "mask": [True, False, None]}),
    (P.RESET, {"seeds": None, "mask": np.array([True, False, True])}),
    (P.RESET, {"seeds": None, "mask": "yes"}),
    (P.RESET, {"seeds": None, "mask": True}),
    (P.RESET, {"seeds": None, "options": []}),
    (P.RESET, {"seeds": None, "options": "o"}),
    (P.STEP, {}),
    (P.STEP, {"actions": [0, 1, 0]}),
    (P.STEP, None),
    (P.CALL, {}),
    (P.CALL, {"name": 5}),
    (P.CALL, {"name": "spec", "args": "x"}),
    (P.CALL, {"name": "spec", "args": (1,)}),
    (P.CALL, {"name": "spec", "kwargs": [1]}),
    (P.CALL, {"name": "spec", "kwargs": {1: 2}}),
    (P.SET_ATTR, {"name": "a", "values": [1, 2]}),
    (P.SET_ATTR, {"name": "a", "values": 1}),
    (P.SET_ATTR, {"name": "a"}),
    (P.SET_ATTR, {"values": [1, 2, 3]}),
    (P.RENDER, None),
    (P.CLOSE, []),
]


@pytest.mark.parametrize("kind,body", BAD_VECTOR_REQUESTS, ids=[f"{k}-{b!r}" for k, b in BAD_VECTOR_REQUESTS])
def test_malformed_vector_requests_raise_protocol_error(host, kind, body):
    with pytest.raises(ProtocolError):
        host.handle(kind, body)
    # and the host still works afterwards
    reply = host.handle(P.RESET, {"seeds": [1, 2, 3]})
    assert reply["o"].shape == (NUM_ENVS, 4)


BAD_SINGLE_REQUESTS = [
    ("jump", {}),
    (P.RESET, {"seeds": [1]}),
    (P.RESET, {"seeds": "1"}),
    (P.RESET, {"seeds": 1.0}),
    (P.RESET, {"seeds": True}),
    (P.RESET, {"seeds": 1, "options": [1]}),
    (P.RESET, None),
    (P.STEP, {}),
    (P.SET_ATTR, {"name": "a", "values": [1, 2]}),
    (P.SET_ATTR, {"name": "a", "values": []}),
    (P.CALL, {"name": None}),
]


@pytest.mark.parametrize("kind,body", BAD_SINGLE_REQUESTS, ids=[f"{k}-{b!r}" for k, b in BAD_SINGLE_REQUESTS])
def test_malformed_single_requests_raise_protocol_error(kind, body):
    host = EnvHost(welcome(mode="single", num_envs=1))
    try:
        with pytest.raises(ProtocolError):
            host.handle(kind, body)
        assert host.handle(P.RESET, {"seeds": 1})["o"].shape == (4,)
    finally:
        host.close()


def test_env_errors_are_not_protocol_errors(host):
    # a bad action is the env's error, not a protocol error: it propagates as is
    host.handle(P.RESET, {"seeds": [1, 2, 3]})
    with pytest.raises(Exception) as info:
        host.handle(P.STEP, {"a": np.array([0, 5, 0])})
    assert not isinstance(info.value, ProtocolError)
    with pytest.raises(AttributeError):
        host.handle(P.CALL, {"name": "no_such_attribute"})
