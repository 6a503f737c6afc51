"""step_async / step_wait: the trainer overlaps its own work with the envs'."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.error import AlreadyPendingCallError, NoAsyncCallError

import ws_gym
import tests.envs  # noqa: F401

from .conftest import assert_same


@pytest.fixture(scope="module")
def pair():
    remote = gym.make_vec("ws_gym/Remote-v0", num_envs=4, env_id="CartPole-v1", port=0, local_workers=2,
                          max_episode_steps=25)
    ref = gym.make_vec("CartPole-v1", 4, vectorization_mode="sync", max_episode_steps=25)
    yield remote, ref
    remote.close()
    ref.close()


def test_step_async_then_wait_equals_step(pair):
    remote, ref = pair
    assert_same(remote.reset(seed=3), ref.reset(seed=3), "reset")
    rng = np.random.default_rng(0)
    for t in range(80):
        actions = rng.integers(0, 2, 4)
        remote.step_async(actions)
        want = ref.step(actions)  # the trainer's own work, while the workers step
        assert_same(remote.step_wait(), want, f"step {t}")


def test_one_call_at_a_time(pair):
    remote, _ = pair
    remote.reset(seed=0)
    with pytest.raises(NoAsyncCallError):
        remote.step_wait()
    remote.step_async(np.zeros(4, dtype=np.int64))
    for attempt in (
        lambda: remote.step_async(np.zeros(4, dtype=np.int64)),
        lambda: remote.reset(),
        lambda: remote.get_attr("spec"),
        lambda: remote.set_attr("foo", 1),
        lambda: remote.render(),
    ):
        with pytest.raises(AlreadyPendingCallError):
            attempt()
    obs, rewards, *_ = remote.step_wait()  # the pending step is still delivered
    assert obs.shape == (4, 4) and rewards.shape == (4,)
    with pytest.raises(NoAsyncCallError):
        remote.step_wait()
    assert remote.step(np.ones(4, dtype=np.int64))[0].shape == (4, 4)


def test_step_wait_timeout():
    """A slow env: step_wait(timeout) raises StepTimeoutError instead of blocking."""
    envs = gym.make_vec("ws_gym/Remote-v0", num_envs=2, env_id="tests.envs:Crash-v0", port=0, local_workers=1)
    try:
        envs.reset(seed=0)
        envs.step_async(np.array([3, 0]))  # action 3 sleeps 3 s in the worker
        with pytest.raises(ws_gym.StepTimeoutError, match="within 0.3 s"):
            envs.step_wait(timeout=0.3)
        with pytest.raises(NoAsyncCallError):  # the timed-out call is over
            envs.step_wait()
    finally:
        envs.close()


def test_close_with_a_pending_step():
    envs = gym.make_vec("ws_gym/Remote-v0", num_envs=2, env_id="CartPole-v1", port=0, local_workers=1)
    envs.reset(seed=0)
    envs.step_async(np.zeros(2, dtype=np.int64))
    envs.close()
    assert envs.closed
    procs = envs._trainer.local.procs
    assert all(p.poll() is not None for p in procs)


def test_call_at_set_attr_at_and_env_infos(pair):
    """Single envs by index (SB3's env_method/set_attr with indices), and the
    per-env infos exactly as each env returned them."""
    remote, ref = pair
    remote.reset(seed=0)
    remote.set_attr_at([3, 0], "gravity", [1.5, 2.5])
    assert remote.get_attr("gravity") == (2.5, 9.8, 9.8, 1.5)
    assert remote.call_at([2, 1, 3], "__str__")[2].startswith("<TimeLimit")
    assert remote.call_at([3], "get_wrapper_attr", "gravity") == (1.5,)
    with pytest.raises(IndexError):
        remote.call_at([4], "gravity")
    remote.set_attr("gravity", 9.8)


def test_env_infos_are_each_envs_own():
    envs = gym.make_vec("ws_gym/Remote-v0", num_envs=4, env_id="CartPole-v1", port=0, local_workers=2,
                        autoreset_mode="SameStep", max_episode_steps=15)
    ref = gym.make_vec("CartPole-v1", 4, vectorization_mode="sync", max_episode_steps=15,
                       vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP})
    try:
        envs.reset(seed=0)
        ref.reset(seed=0)
        rng = np.random.default_rng(1)
        ends = 0
        for _ in range(60):
            a = rng.integers(0, 2, 4)
            _, _, term, trunc, infos = envs.step(a)
            want = ref.step(a)[4]
            per_env = envs.env_infos()
            assert len(per_env) == 4
            for i in range(4):
                done = bool(term[i] or trunc[i])
                assert done == ("final_obs" in per_env[i])
                if done:
                    assert_same(per_env[i]["final_obs"], want["final_obs"][i], "final_obs")
                    assert per_env[i]["final_info"] == {}
            ends += int((term | trunc).sum())
        assert ends > 0
    finally:
        envs.close()
        ref.close()
