"""Remote results equal gymnasium's own, for every autoreset mode and any split.

Each case steps a RemoteVectorEnv (real worker processes on 127.0.0.1) next to
``gym.make_vec(env_id, n, vectorization_mode="sync")`` with the same seeds and
actions, and compares every output exactly: values, dtypes, info keys and masks.
"""

from __future__ import annotations

import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.vector import AutoresetMode

import ws_gym  # noqa: F401
import tests.envs  # noqa: F401  (registers Fancy-v0 & co. here too)

from .conftest import assert_same

MODES = [AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP, AutoresetMode.DISABLED]


def run_side_by_side(env_id, num_envs, local_workers, mode, steps, env_kwargs=None, max_episode_steps=None, opaque_ok=False):
    kwargs = dict(env_kwargs or {})
    if max_episode_steps is not None:
        kwargs["max_episode_steps"] = max_episode_steps
    ref = gym.make_vec(env_id, num_envs, vectorization_mode="sync", vector_kwargs={"autoreset_mode": mode}, **kwargs)
    remote = gym.make_vec(
        "ws_gym/Remote-v0", num_envs=num_envs, env_id=env_id, env_kwargs=env_kwargs, port=0,
        local_workers=local_workers, autoreset_mode=mode, max_episode_steps=max_episode_steps,
        connect_timeout=60,
    )
    try:
        return step_side_by_side(remote, ref, mode, num_envs, steps, opaque_ok)
    finally:
        remote.close()
        ref.close()


def step_side_by_side(remote, ref, mode, num_envs, steps, opaque_ok=False):
    """Reset, step (with masked resets) and compare ``remote`` with ``ref``
    exactly; returns how many episodes ended (the caller closes both)."""
    assert remote.metadata["autoreset_mode"] is mode
    assert remote.single_observation_space == ref.single_observation_space
    assert remote.single_action_space == ref.single_action_space
    assert remote.observation_space == ref.observation_space
    assert remote.action_space == ref.action_space
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        got = remote.reset(seed=123)
    want = ref.reset(seed=123)
    assert_same(got, want, "reset", opaque_ok)
    ref.action_space.seed(7)
    ends = 0
    for t in range(steps):
        actions = ref.action_space.sample()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            got = remote.step(actions)
        want = ref.step(actions)
        assert_same(got, want, f"step {t}", opaque_ok)
        done = np.logical_or(want[2], want[3])
        ends += int(done.sum())
        if mode is AutoresetMode.DISABLED and done.any():
            options = {"reset_mask": done}
            got = remote.reset(seed=1000 + t, options=dict(options))
            want = ref.reset(seed=1000 + t, options=dict(options))
            assert_same(got, want, f"masked reset {t}", opaque_ok)
        elif t % 37 == 36:  # an explicit partial reset in the other modes too
            mask = np.zeros(num_envs, dtype=np.bool_)
            mask[t % num_envs] = True
            got = remote.reset(options={"reset_mask": mask})
            want = ref.reset(options={"reset_mask": mask.copy()})
            assert_same(got[1], want[1], f"masked reset infos {t}", opaque_ok)
            assert_same(got[0], want[0], f"masked reset obs {t}", opaque_ok)
    assert ends > 0, "the test must cross episode ends"
    return ends


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
def test_cartpole_two_workers(mode):
    run_side_by_side("CartPole-v1", 8, 2, mode, 150, max_episode_steps=40)


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
def test_fancy_spaces_uneven_split(mode):
    """Dict/Tuple/Text spaces and rich infos, 5 envs over 3 workers (2+2+1)."""
    run_side_by_side("tests.envs:Fancy-v0", 5, 3, mode, 120, opaque_ok=True)


@pytest.mark.parametrize("mode", [AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP], ids=lambda m: m.value)
def test_pendulum_continuous_one_worker(mode):
    run_side_by_side("Pendulum-v1", 3, 1, mode, 130, max_episode_steps=50)


def test_autoreset_mode_as_string():
    envs = gym.make_vec("ws_gym/Remote-v0", num_envs=2, env_id="CartPole-v1", port=0,
                        local_workers=1, autoreset_mode="SameStep")
    try:
        assert envs.metadata["autoreset_mode"] is AutoresetMode.SAME_STEP
        # gymnasium's vector wrappers insist on the enum; this one must accept us
        wrapped = gym.wrappers.vector.RecordEpisodeStatistics(envs)
        wrapped.reset(seed=0)
        for _ in range(60):
            wrapped.step(wrapped.action_space.sample())
    finally:
        envs.close()


@pytest.mark.parametrize("env_id", ["CartPole-v1", "tests.envs:Fancy-v0"])
def test_single_remote_env_equals_gym_make(env_id):
    ref = gym.make(env_id)
    env = gym.make("ws_gym/Remote-v0", env_id=env_id, port=0, local_workers=1)
    try:
        assert env.observation_space == ref.observation_space
        assert env.action_space == ref.action_space
        assert_same(env.reset(seed=5), ref.reset(seed=5), "reset", opaque_ok=True)
        ref.action_space.seed(3)
        episodes = 0
        for t in range(200):
            a = ref.action_space.sample()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                got = env.step(a)
            want = ref.step(a)
            assert_same(got, want, f"step {t}", opaque_ok=True)
            if want[2] or want[3]:
                episodes += 1
                assert_same(env.reset(seed=t), ref.reset(seed=t), f"reset {t}", opaque_ok=True)
        assert episodes > 0
    finally:
        env.close()
        ref.close()


def test_record_episode_statistics_in_workers():
    """Episode statistics recorded inside each worker env land where CleanRL's
    gymnasium-1.x scripts read them: ``infos["final_info"]["episode"]``."""
    n, mode = 4, AutoresetMode.SAME_STEP
    ref = gym.make_vec("CartPole-v1", n, vectorization_mode="sync", vector_kwargs={"autoreset_mode": mode},
                       wrappers=[gym.wrappers.RecordEpisodeStatistics], max_episode_steps=30)
    remote = gym.make_vec("ws_gym/Remote-v0", num_envs=n, env_id="CartPole-v1", port=0, local_workers=2,
                          autoreset_mode=mode, max_episode_steps=30, record_episode_statistics=True)
    try:
        remote.reset(seed=9)
        ref.reset(seed=9)
        ref.action_space.seed(1)
        episodes = 0
        for t in range(120):
            actions = ref.action_space.sample()
            _, _, _, _, got = remote.step(actions)
            _, _, term, trunc, want = ref.step(actions)
            if not (term | trunc).any():
                assert "final_info" not in got
                continue
            fi_got, fi_want = got["final_info"], want["final_info"]
            assert_same(fi_got["_episode"], fi_want["_episode"], f"step {t} mask")
            ep_got, ep_want = fi_got["episode"], fi_want["episode"]
            assert list(ep_got) == list(ep_want)
            assert {"r", "l", "t"} <= set(ep_got)
            for k in ("r", "l", "_r", "_l", "_t"):  # "t" is wall-clock time
                assert_same(ep_got[k], ep_want[k], f"step {t} episode[{k!r}]")
            assert ep_got["t"].dtype == ep_want["t"].dtype
            episodes += int(fi_want["_episode"].sum())
        assert episodes >= n
    finally:
        remote.close()
        ref.close()
