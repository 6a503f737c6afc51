"""Partial batches (``batch_size``, ``async_reset``/``send``/``recv``), with real workers.

Each env's trajectory through ``send``/``recv`` must equal that env's
trajectory in a ``SyncVectorEnv`` given the same per-env actions, whatever
order the envs come back in and however the batch cuts across workers.
"""

from __future__ import annotations

import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.error import AlreadyPendingCallError, ResetNeeded
from gymnasium.vector import AutoresetMode
from gymnasium.vector.utils import concatenate, create_empty_array

import ws_gym  # noqa: F401
import tests.envs  # noqa: F401  (registers Fancy-v0 & co.)
from ws_gym.batching import item
from ws_gym.errors import WorkerLostError

from .conftest import assert_same

MODES = [AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP]


def env_info(infos: dict, j: int) -> dict:
    """Env ``j``'s own info out of a batch of infos (gymnasium's ``_key`` masks),
    keys sorted: a batch's key order depends on which envs are in it."""
    out = {}
    for key, value in sorted(infos.items()):
        if key.startswith("_"):
            continue
        mask = infos.get(f"_{key}")
        if mask is None or not mask[j]:
            continue
        out[key] = env_info(value, j) if isinstance(value, dict) else value[j]
    return out


def per_env_actions(space: gym.Space, num_envs: int, length: int) -> list[list]:
    out = []
    for i in range(num_envs):
        space.seed(100 + i)
        out.append([space.sample() for _ in range(length)])
    return out


def reference(env_id, num_envs, mode, actions, steps, seed, **kwargs):
    """Each env's (obs, reward, terminated, truncated, info) records, through a SyncVectorEnv."""
    ref = gym.make_vec(env_id, num_envs, vectorization_mode="sync", vector_kwargs={"autoreset_mode": mode}, **kwargs)
    try:
        obs, infos = ref.reset(seed=seed)
        space = ref.single_observation_space
        records = [[(item(space, obs, i), 0.0, False, False, env_info(infos, i))] for i in range(num_envs)]
        act_space = ref.single_action_space
        for k in range(steps):
            batch = concatenate(act_space, [actions[i][k] for i in range(num_envs)],
                                create_empty_array(act_space, num_envs))
            obs, r, t, u, infos = ref.step(batch)
            for i in range(num_envs):
                records[i].append((item(space, obs, i), float(r[i]), bool(t[i]), bool(u[i]), env_info(infos, i)))
        return records
    finally:
        ref.close()


def through_send_recv(envs, actions, steps, seed):
    """Each env's records through async_reset/recv/send, until every env has ``steps`` steps."""
    envs.async_reset(seed=seed)
    space = envs.single_observation_space
    records = [[] for _ in range(envs.num_envs)]
    while min(len(r) for r in records) < steps + 1:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # Fancy-v0's info with no wire form
            obs, r, t, u, infos, ids = envs.recv()
        assert len(ids) == envs.batch_size
        assert r.dtype == np.float64 and t.dtype == np.bool_ and u.dtype == np.bool_
        for j, env in enumerate(ids.tolist()):
            records[env].append((item(space, obs, j), float(r[j]), bool(t[j]), bool(u[j]), env_info(infos, j)))
        batch = [actions[env][len(records[env]) - 1] for env in ids.tolist()]
        act_space = envs.single_action_space
        envs.send(concatenate(act_space, batch, create_empty_array(act_space, len(ids))), ids)
    return records


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
@pytest.mark.parametrize("env_id, num_envs, workers, batch_size, steps", [
    ("CartPole-v1", 8, 2, 4, 60),  # each batch: one worker's 4 envs
    ("tests.envs:Fancy-v0", 8, 3, 5, 40),  # workers of 3, 3 and 2 envs; batches that cut across them
    ("tests.envs:Fancy-v0", 6, 2, 1, 30),  # one env at a time
])
def test_each_env_trajectory_equals_the_sync_path(mode, env_id, num_envs, workers, batch_size, steps):
    kwargs = {"max_episode_steps": 15} if env_id == "CartPole-v1" else {}
    envs = gym.make_vec("ws_gym/Remote-v0", num_envs=num_envs, env_id=env_id, local_workers=workers, port=0,
                        autoreset_mode=mode, batch_size=batch_size, connect_timeout=60, **kwargs)
    try:
        actions = per_env_actions(envs.single_action_space, num_envs, steps + 200)
        got = through_send_recv(envs, actions, steps, seed=11)
    finally:
        envs.close()
    want = reference(env_id, num_envs, mode, actions, steps, seed=11, **kwargs)
    ends = 0
    for i in range(num_envs):
        for k in range(steps + 1):
            assert_same(got[i][k], want[i][k], f"env {i} record {k}", opaque_ok=True)
            ends += want[i][k][2] or want[i][k][3]
    assert ends > 0, "the test must cross episode ends"


def test_a_slow_worker_holds_up_its_own_envs_only():
    """Counter-v0's action 3 takes 3 s: while worker 0 serves it, worker 1's
    envs come back again and again."""
    envs = gym.make_vec("ws_gym/Remote-v0", num_envs=4, env_id="tests.envs:Counter-v0", local_workers=2, port=0,
                        batch_size=2, connect_timeout=60)
    try:
        envs.async_reset(seed=0)
        _, _, _, _, _, ids = envs.recv()
        assert ids.tolist() == [0, 1]  # after a reset: env order
        envs.send(np.array([3, 0]), ids)  # worker 0 (envs 0, 1) steps for 3 s
        fast = 0
        while True:
            obs, r, _, _, _, ids = envs.recv()
            if 0 in ids:
                break
            assert ids.tolist() == [2, 3]
            fast += 1
            envs.send(np.zeros(2, np.int64), ids)
        assert obs[:, 1].tolist() == [1.0, 1.0] and r.tolist() == [1.0, 1.0]  # one step each, as sent
        assert fast > 10, f"worker 1's envs came back only {fast} times while worker 0 was busy"
        # the first [2, 3] came from the reset; every later one, and [0, 1] now, from a step
        assert envs.stats()["run"]["env_steps"] == 2 * (fast - 1) + 2
    finally:
        envs.close()


def test_misuse_gets_clear_errors():
    envs = gym.make_vec("ws_gym/Remote-v0", num_envs=4, env_id="CartPole-v1", local_workers=2, port=0,
                        batch_size=2, connect_timeout=60)
    try:
        with pytest.raises(ResetNeeded):
            envs.recv()
        envs.async_reset(seed=3)
        with pytest.raises(ValueError, match="do not await an action"):
            envs.send(np.zeros(2, np.int64), [0, 1])  # not returned by recv() yet
        _, _, _, _, _, ids = envs.recv()
        with pytest.raises(ValueError, match="expected 2 actions"):
            envs.send(np.zeros(3, np.int64), ids)
        with pytest.raises(ValueError, match="twice"):
            envs.send(np.zeros(2, np.int64), [0, 0])
        with pytest.raises(ValueError, match="must be in"):
            envs.send(np.zeros(1, np.int64), [7])
        with pytest.raises(AlreadyPendingCallError, match="send"):
            envs.step(np.zeros(4, np.int64))
        envs.send(np.zeros(2, np.int64))  # default: the last recv()'s envs
        envs.recv()  # envs 2, 3 (ready since the reset)
        envs.recv()  # envs 0, 1 again
        with pytest.raises(ValueError, match="await send"):
            envs.recv()  # every env awaits an action: nothing can come back
        obs, _ = envs.reset(seed=3)  # ends send()/recv(): step() works again
        assert envs.step(np.zeros(4, np.int64))[0].shape == (4, 4)
    finally:
        envs.close()


@pytest.mark.parametrize("options, match", [
    ({"batch_size": 5}, "at most num_envs"),
    ({"batch_size": 0}, "positive integer"),
])
def test_batch_size_is_checked(options, match):
    with pytest.raises(ValueError, match=match):
        gym.make_vec("ws_gym/Remote-v0", num_envs=4, env_id="CartPole-v1", port=0, **options)


@pytest.mark.parametrize("options, match", [
    ({"on_worker_lost": "wait"}, "raise"),
    ({"autoreset_mode": AutoresetMode.DISABLED}, "DISABLED"),
])
def test_send_recv_need_autoreset_and_raise_mode(options, match):
    envs = gym.make_vec("ws_gym/Remote-v0", num_envs=2, env_id="CartPole-v1", local_workers=1, port=0,
                        batch_size=1, connect_timeout=60, **options)
    try:
        with pytest.raises(ValueError, match=match):
            envs.async_reset()
    finally:
        envs.close()


def test_a_lost_worker_is_raised_by_recv_and_async_reset_starts_again():
    """Counter-v0's action 1 ends its worker's process."""
    envs = gym.make_vec("ws_gym/Remote-v0", num_envs=4, env_id="tests.envs:Counter-v0", local_workers=2, port=0,
                        batch_size=2, connect_timeout=60)
    try:
        envs.async_reset(seed=0)
        _, _, _, _, _, ids = envs.recv()
        envs.send(np.array([1, 0]), ids)  # worker 0 dies
        _, _, _, _, _, ids = envs.recv()  # envs 2, 3: ready since the reset
        envs.send(np.zeros(2, np.int64), ids)
        with pytest.raises(WorkerLostError):
            for _ in range(1000):  # worker 1's envs may come back a few times before the loss is seen
                _, _, _, _, _, ids = envs.recv()
                envs.send(np.zeros(2, np.int64), ids)
        envs.async_reset(seed=1)  # the local worker is restarted; every env starts again
        got = sorted(envs.recv()[5].tolist() + envs.recv()[5].tolist())
        assert got == [0, 1, 2, 3]
    finally:
        envs.close()


def test_a_single_env_takes_no_batch_size():
    with pytest.raises(ValueError, match="vector env"):
        gym.make("ws_gym/Remote-v0", env_id="CartPole-v1", port=0, batch_size=1)
