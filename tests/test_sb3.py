"""ws_gym.sb3: SB3's VecEnv contract over real worker processes, equal to DummyVecEnv.

Each equivalence case steps ``SB3VecEnv`` next to SB3's own
``DummyVecEnv([lambda: gym.make(env_id)] * n)`` with the same seeds, options
and actions, and compares everything exactly (values, types, dtypes, key order).
"""

from __future__ import annotations

import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.vector import AutoresetMode

pytest.importorskip("stable_baselines3", reason="needs the sb3 extra: pip install '.[sb3]'")

import torch  # noqa: E402
from stable_baselines3 import PPO, SAC  # noqa: E402
from stable_baselines3.common.evaluation import evaluate_policy  # noqa: E402
from stable_baselines3.common.monitor import Monitor  # noqa: E402
from stable_baselines3.common.vec_env import DummyVecEnv, VecMonitor  # noqa: E402

import ws_gym  # noqa: E402,F401
import tests.envs  # noqa: E402,F401  (registers Fancy-v0 here too)
from ws_gym.sb3 import SB3VecEnv, make_vec_env, wrapper_names  # noqa: E402

from .conftest import assert_same  # noqa: E402

SAME_STEP = AutoresetMode.SAME_STEP


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Small networks: one thread is fastest and leaves the cores to the workers."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def remote(env_id, n, workers=2, **kwargs):
    return gym.make_vec("ws_gym/Remote-v0", num_envs=n, env_id=env_id, port=0, local_workers=workers,
                        autoreset_mode=SAME_STEP, connect_timeout=60, **kwargs)


def gym_vec(env_id, n, mode, **kwargs):
    return gym.make_vec(env_id, n, vectorization_mode=mode, vector_kwargs={"autoreset_mode": SAME_STEP}, **kwargs)


def dummy(env_id, n, **kwargs):
    return DummyVecEnv([lambda: gym.make(env_id, **kwargs)] * n)


# env id, num envs, max_episode_steps, reset options per env (None: options unused by the env)
CASES = {
    "CartPole-v1": (4, 16, [{"low": -0.01, "high": 0.01}, {}, {"low": -0.2, "high": 0.2}, {}]),
    "Pendulum-v1": (3, 25, [{"x_init": 0.1, "y_init": 0.2}, {"x_init": 0.1, "y_init": 0.2}, {}]),
    "Taxi-v4": (3, 15, None),  # reset and step infos: a python float and an int8 array
}


def run_side_by_side(a, b, n, options, steps=150):
    """Step SB3VecEnv ``a`` next to DummyVecEnv ``b``; return (terminations, truncations)."""
    assert a.num_envs == b.num_envs == n
    assert a.observation_space == b.observation_space
    assert a.action_space == b.action_space
    assert a.render_mode == b.render_mode
    assert a.seed(5) == b.seed(5)
    assert_same(a.reset(), b.reset(), "reset")
    assert_same(a.reset_infos, b.reset_infos, "reset infos")
    b.action_space.seed(1)
    ends = truncs = 0
    for t in range(steps):
        actions = np.stack([b.action_space.sample() for _ in range(n)])
        got, want = a.step(actions), b.step(actions)
        assert got[1].dtype == np.float32 and got[2].dtype == np.bool_
        assert_same(got, want, f"step {t}")
        assert_same(a.reset_infos, b.reset_infos, f"reset infos after step {t}")
        for done, info in zip(want[2], want[3]):
            ends += bool(done and not info["TimeLimit.truncated"])
            truncs += bool(info["TimeLimit.truncated"])
        if t == steps // 2:  # seed and options count at the next reset only
            assert a.seed(100) == b.seed(100)
            a.set_options(options)
            b.set_options(options)
            assert_same(a.reset(), b.reset(), f"reset {t}")
            assert_same(a.reset_infos, b.reset_infos, f"reset infos {t}")
            assert_same(a.reset(), b.reset(), f"unseeded reset {t}")
    return ends, truncs


@pytest.mark.parametrize("env_id", list(CASES))
def test_remote_equals_dummy_vec_env(env_id):
    n, max_steps, options = CASES[env_id]
    a = SB3VecEnv(remote(env_id, n, max_episode_steps=max_steps))
    b = dummy(env_id, n, max_episode_steps=max_steps)
    try:
        ends, truncs = run_side_by_side(a, b, n, options)
    finally:
        a.close()
        b.close()
    assert truncs > 0, "the test must cross truncations"
    if env_id == "CartPole-v1":  # some terminate in the step that truncates them
        assert ends > 0, "the test must cross terminations"


def test_frozen_lake_infos_exact():
    """Each env's infos as it returned them: FrozenLake's ``prob`` is an int 1 in a
    reset info and a float in a step info. Gymnasium batches a key into one array
    typed by the first env that sets it, so an env's 0.333 next to another's reset
    1 would become 0; SB3VecEnv over a RemoteVectorEnv reads each env's own."""
    n, steps = 4, 300
    kwargs = {"is_slippery": True, "max_episode_steps": 12}
    a = SB3VecEnv(remote("FrozenLake-v1", n, env_kwargs={"is_slippery": True}, max_episode_steps=12))
    b = dummy("FrozenLake-v1", n, **kwargs)
    try:
        assert a.seed(3) == b.seed(3)
        assert_same(a.reset(), b.reset(), "reset")
        assert_same(a.reset_infos, b.reset_infos, "reset infos")
        assert type(b.reset_infos[0]["prob"]) is int
        rng = np.random.default_rng(0)
        ends = truncs = mixed = 0
        for t in range(steps):
            actions = rng.integers(0, 4, n)
            got, want = a.step(actions), b.step(actions)
            assert_same(got, want, f"step {t}")
            assert_same(a.reset_infos, b.reset_infos, f"reset infos after step {t}")
            dones = want[2]
            for info in want[3]:
                truncs += info["TimeLimit.truncated"]
            ends += int(dones.sum())
            # a done env before a running one: batching would give the running
            # env's float prob the int type of the done env's reset prob
            first = np.flatnonzero(dones)
            mixed += bool(first.size and (~dones[first[0]:]).any())
        assert ends >= 50 and truncs >= 5 and mixed >= 10, (ends, truncs, mixed)
    finally:
        a.close()
        b.close()


def test_remote_env_infos_of_an_env_that_ended():
    """What SB3VecEnv reads from RemoteVectorEnv.env_infos() after a SAME_STEP
    episode end: ``final_obs`` and ``final_info`` (the ended step's info) plus the
    reset info's own keys, as the env_info SyncVectorEnv merges for that env."""
    v = remote("FrozenLake-v1", 2, workers=1, env_kwargs={"is_slippery": True}, max_episode_steps=3)
    try:
        v.reset(seed=0)
        for _ in range(3):
            _, _, term, trunc, _ = v.step(np.array([0, 0]))
        assert (term | trunc).all()  # no earlier end: a hole is 3 steps away at least
        infos = v.unwrapped.env_infos()
        for i in np.flatnonzero(term | trunc):
            assert set(infos[i]) == {"final_obs", "final_info", "prob"}, infos[i]
            assert type(infos[i]["prob"]) is int and type(infos[i]["final_info"]["prob"]) is float
            assert type(infos[i]["final_obs"]) is int
    finally:
        v.close()


def test_wrapped_remote_env_equals_dummy_vec_env():
    """Inside a gymnasium vector wrapper the batched infos are split per env (the
    wrapper may change them); single envs are still reached by index."""
    n, max_steps, options = CASES["Taxi-v4"]
    a = SB3VecEnv(gym.vector.VectorWrapper(remote("Taxi-v4", n, max_episode_steps=max_steps)))
    b = dummy("Taxi-v4", n, max_episode_steps=max_steps)
    try:
        _, truncs = run_side_by_side(a, b, n, options, steps=40)
        assert truncs > 0
        a.set_attr("lastaction", 3, indices=[2])
        assert a.get_attr("lastaction", [2, 0])[0] == 3
        assert a.env_method("get_wrapper_attr", "lastaction", indices=[2]) == [3]
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_gymnasium_vector_envs_equal_dummy_vec_env(mode):
    n, max_steps, options = CASES["CartPole-v1"]
    a = SB3VecEnv(gym_vec("CartPole-v1", n, mode, max_episode_steps=max_steps))
    b = dummy("CartPole-v1", n, max_episode_steps=max_steps)
    try:
        ends, truncs = run_side_by_side(a, b, n, options, steps=100)
    finally:
        a.close()
        b.close()
    assert ends > 0 and truncs > 0


def test_options_reach_each_env():
    """Different options per env: each env is reset with its own."""
    a = SB3VecEnv(remote("CartPole-v1", 3, max_episode_steps=30))
    try:
        a.set_options([{"low": 0.3, "high": 0.3}, {}, {"low": -0.3, "high": -0.3}])
        obs = a.reset()
        assert np.all(obs[0] == np.float32(0.3)) and np.all(obs[2] == np.float32(-0.3))
        assert np.all(np.abs(obs[1]) <= 0.05)
        obs = a.reset()  # options are used once
        assert np.all(np.abs(obs) <= 0.05)
    finally:
        a.close()


@pytest.mark.parametrize("mode", [AutoresetMode.NEXT_STEP, AutoresetMode.DISABLED])
def test_other_autoreset_modes_refused(mode):
    venvs = [
        gym.make_vec("CartPole-v1", 2, vectorization_mode="sync", vector_kwargs={"autoreset_mode": mode}),
        gym.make_vec("ws_gym/Remote-v0", num_envs=2, env_id="CartPole-v1", port=0, autoreset_mode=mode),
    ]
    try:
        for venv in venvs:
            with pytest.raises(ValueError, match=rf"SAME_STEP.*{mode.name} mode.*autoreset_mode="):
                SB3VecEnv(venv)
    finally:
        for venv in venvs:
            venv.close()


def test_attributes_methods_and_wrappers():
    n = 4
    a = SB3VecEnv(remote("CartPole-v1", n, max_episode_steps=30))
    b = dummy("CartPole-v1", n, max_episode_steps=30)
    try:
        a.seed(0), b.seed(0)
        a.reset(), b.reset()
        for indices in (None, 2, [3, 1], range(n)):
            assert a.get_attr("gravity", indices) == b.get_attr("gravity", indices)
            assert a.get_attr("np_random_seed", indices) == b.get_attr("np_random_seed", indices)
        for indices in (None, [3, 2, 1, 0]):  # every env, in any order
            assert a.env_method("get_wrapper_attr", "length", indices=indices) == b.env_method(
                "get_wrapper_attr", "length", indices=indices)
        for venv in (a, b):
            venv.set_attr("length", 0.75)
            assert venv.get_attr("length") == [0.75] * n
            venv.set_attr("length", 0.25, indices=[3, 2, 1, 0])  # every env
            assert venv.get_attr("length", [0, 3]) == [0.25, 0.25]
            assert venv.has_attr("length") and not venv.has_attr("no_such_attribute")
        with pytest.raises(AttributeError, match="no_such_attribute"):
            a.get_attr("no_such_attribute")
        with pytest.raises(AttributeError, match="no_such_method"):
            a.env_method("no_such_method", indices=[1])
        with pytest.raises(AttributeError, match="no_such_attribute"):
            a.get_attr("no_such_attribute", indices=[3])
        wrappers = [gym.wrappers.TimeLimit, gym.wrappers.OrderEnforcing, gym.wrappers.PassiveEnvChecker,
                    gym.Wrapper, gym.wrappers.RecordEpisodeStatistics, Monitor, VecMonitor]
        for cls in wrappers:
            for indices in (None, [2, 0]):
                assert a.env_is_wrapped(cls, indices) == b.env_is_wrapped(cls, indices), cls
        assert a.env_is_wrapped(gym.wrappers.TimeLimit) == [True] * n
        assert a.env_is_wrapped(Monitor) == [False] * n
    finally:
        a.close()
        b.close()


def test_single_envs_of_remote_workers():
    """Subsets of envs (indices) over 2 workers: only the chosen envs are reached,
    results in ``indices`` order, as DummyVecEnv (SB3's HER calls
    ``env_method("compute_reward", ..., indices=[0])``)."""
    n = 4
    a = SB3VecEnv(remote("CartPole-v1", n, max_episode_steps=30))
    b = dummy("CartPole-v1", n, max_episode_steps=30)
    try:
        a.seed(0), b.seed(0)
        a.reset(), b.reset()
        for venv in (a, b):
            venv.set_attr("length", 0.9, indices=[2, 0])  # one env of each worker
            assert venv.get_attr("length") == [0.9, 0.5, 0.9, 0.5]
            venv.set_attr("gravity", 1.5, indices=3)
            assert venv.get_attr("gravity") == [9.8, 9.8, 9.8, 1.5]
        for indices in ([2, 0], [3], 1, [1, 2], [0, 0, 3]):
            for name in ("length", "gravity", "np_random_seed"):
                got = a.env_method("get_wrapper_attr", name, indices=indices)
                assert got == b.env_method("get_wrapper_attr", name, indices=indices), (name, indices)
                assert a.get_attr(name, indices) == b.get_attr(name, indices), (name, indices)
        # a method that changes the env: a seeded reset of envs 2 and 0 only
        got = a.env_method("reset", indices=[2, 0], seed=11)
        want = b.env_method("reset", indices=[2, 0], seed=11)
        assert_same(got, want, "env_method reset")
        assert a.get_attr("np_random_seed") == b.get_attr("np_random_seed") == [11, 1, 11, 3]
        assert_same(a.env_method("get_wrapper_attr", "state", indices=[0, 1, 2, 3]),
                    b.env_method("get_wrapper_attr", "state", indices=[0, 1, 2, 3]), "states")
        # arguments reach the method
        assert a.env_method("get_wrapper_attr", "tau", indices=[1]) == [0.02]
    finally:
        a.close()
        b.close()


def test_single_envs_need_a_vector_env_that_has_them():
    """AsyncVectorEnv addresses all envs at once only: a subset is refused, except
    for get_attr (read from all)."""
    a = SB3VecEnv(gym_vec("CartPole-v1", 2, "async"))
    try:
        with pytest.raises(NotImplementedError, match="indices=None"):
            a.set_attr("length", 1.0, indices=[1])
        with pytest.raises(NotImplementedError, match="indices=None"):
            a.env_method("reset", indices=1)
        a.set_attr("length", 0.7)
        assert a.get_attr("length", [1]) == [0.7]
        assert a.env_method("get_wrapper_attr", "length", indices=[1, 0]) == [0.7, 0.7]
    finally:
        a.close()


def test_env_is_wrapped_with_episode_statistics():
    a = SB3VecEnv(remote("CartPole-v1", 2, workers=1, record_episode_statistics=True))
    try:  # asked before any reset, as VecMonitor does
        assert a.env_is_wrapped(gym.wrappers.RecordEpisodeStatistics) == [True, True]
        assert a.env_is_wrapped(gym.wrappers.TimeLimit, indices=[1]) == [True]
        assert a.env_is_wrapped(Monitor) == [False, False]
    finally:
        a.close()


def test_vec_monitor_and_attributes_before_any_reset():
    """SB3 asks the envs before resetting them; the remote envs answer at once
    (their workers are waited for), as gymnasium's vector envs do."""
    venv = VecMonitor(SB3VecEnv(remote("CartPole-v1", 3, max_episode_steps=20)))
    try:
        assert venv.get_attr("length") == [0.5] * 3
        venv.set_attr("length", 0.8, indices=[1])
        venv.set_attr("gravity", 2.0)
        assert venv.env_method("get_wrapper_attr", "length", indices=[1, 2]) == [0.8, 0.5]
        assert venv.env_is_wrapped(gym.wrappers.TimeLimit) == [True] * 3
        venv.seed(0)
        obs = venv.reset()
        assert obs.shape == (3, 4)
        assert venv.get_attr("gravity") == [2.0] * 3
    finally:
        venv.close()


def test_single_envs_of_a_sync_vector_env():
    """Subsets of envs (indices) work where the VectorEnv holds its envs."""
    a = SB3VecEnv(gym_vec("CartPole-v1", 3, "sync"))
    b = dummy("CartPole-v1", 3)
    try:
        for venv in (a, b):
            venv.set_attr("length", 0.9, indices=[2])
            assert venv.get_attr("length") == [0.5, 0.5, 0.9]
            assert venv.env_method("get_wrapper_attr", "length", indices=[2, 0]) == [0.9, 0.5]
        for cls in (gym.wrappers.TimeLimit, Monitor, gym.Wrapper):
            assert a.env_is_wrapped(cls, [1]) == b.env_is_wrapped(cls, [1])
    finally:
        a.close()
        b.close()


def test_wrapper_names():
    assert wrapper_names(str(gym.make("CartPole-v1"))) == ["TimeLimit", "OrderEnforcing", "PassiveEnvChecker"]
    bare = gym.make("Pendulum-v1").unwrapped
    bare.spec = None
    assert wrapper_names(str(gym.wrappers.TimeLimit(bare, 5))) == ["TimeLimit"]
    assert wrapper_names(str(gym.make("ws_gym/NoOp-v0").unwrapped)) == []


def test_render_and_method_arguments():
    """get_images/render and env_method with arguments, against an in-process vector env."""
    a = SB3VecEnv(remote("tests.envs:Fancy-v0", 3, render_mode="rgb_array"))
    b = SB3VecEnv(gym_vec("tests.envs:Fancy-v0", 3, "sync", render_mode="rgb_array"))
    try:
        assert a.render_mode == b.render_mode == "rgb_array"
        a.seed(3), b.seed(3)
        a.reset(), b.reset()
        actions = b.venv.action_space.sample()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            for _ in range(3):
                a.step(actions), b.step(actions)
        assert_same(a.get_images(), b.get_images(), "images")
        assert a.get_images()[0].shape == (4, 6, 3)
        assert_same(a.render(), b.render(), "tiled")
        assert a.render().shape == (8, 12, 3)  # 3 frames tiled 2 x 2
        got = a.env_method("shout", "hey", times=2)
        assert got == b.env_method("shout", "hey", times=2)
        assert got[0][0] == "HEYHEY"
        got = a.env_method("shout", "ho", indices=[2, 0], times=3)
        assert got == b.env_method("shout", "ho", indices=[2, 0], times=3)
        assert got[0][0] == "HOHOHO"
    finally:
        a.close()
        b.close()
    plain = SB3VecEnv(gym_vec("CartPole-v1", 2, "sync"))
    with pytest.warns(UserWarning, match="render mode is None"):
        assert plain.get_images() == [None, None]
    plain.close()


def test_make_vec_env_seed_and_episode_statistics():
    env = make_vec_env("CartPole-v1", 2, seed=7, local_workers=1, port=0, max_episode_steps=5)
    ref = VecMonitor(dummy("CartPole-v1", 2, max_episode_steps=5))
    ref.seed(7)
    try:
        assert_same(env.reset(), ref.reset(), "reset")
        for _ in range(5):
            got, want = env.step(np.array([0, 1])), ref.step(np.array([0, 1]))
        assert [info["episode"]["l"] for info in got[3]] == [5, 5]
        for info in got[3] + want[3]:
            info["episode"].pop("t")  # wall time
        assert_same(got, want, "last step")
    finally:
        env.close()
        ref.close()


def test_ppo_learns_on_make_vec_env():
    torch.manual_seed(0)
    env = make_vec_env("CartPole-v1", 8, local_workers=2, port=0)
    try:
        assert isinstance(env, VecMonitor) and isinstance(env.venv, SB3VecEnv)
        model = PPO("MlpPolicy", env, n_steps=32, batch_size=256, gae_lambda=0.8, gamma=0.98, n_epochs=20,
                    learning_rate=1e-3, seed=0, device="cpu")
        model.learn(8_000)
        returns = [ep["r"] for ep in model.ep_info_buffer]
        assert len(returns) > 20
        mean, _ = evaluate_policy(model, env, n_eval_episodes=8, deterministic=True)
    finally:
        env.close()
    assert np.mean(returns[-20:]) > 60, returns  # a random policy averages ~22
    assert mean > 100  # deterministic evaluation


def test_sac_uses_terminal_observation_on_truncation():
    """SAC over remote envs fills the same replay buffer as over DummyVecEnv,
    truncations (timeouts, bootstrapped from terminal_observation) included."""
    buffers = []
    for make in (lambda: SB3VecEnv(remote("Pendulum-v1", 2, max_episode_steps=40)),
                 lambda: dummy("Pendulum-v1", 2, max_episode_steps=40)):
        env = make()
        try:
            torch.manual_seed(0)
            model = SAC("MlpPolicy", env, learning_starts=40, batch_size=32, buffer_size=1000, seed=0, device="cpu",
                        policy_kwargs={"net_arch": [32, 32]})
            model.learn(200)
        finally:
            env.close()
        buffers.append(model.replay_buffer)
    got, want = buffers
    assert got.pos == want.pos == 100
    for name in ("observations", "next_observations", "actions", "rewards", "dones", "timeouts"):
        assert_same(getattr(got, name), getattr(want, name), name)
    ends = np.flatnonzero(want.timeouts[:100, 0])
    assert list(ends) == [39, 79]  # env 0 truncated twice
    assert np.array_equal(want.dones, want.timeouts)  # Pendulum never terminates
    for t in ends:  # bootstrapped from the last observation, not the next episode's first
        assert not np.array_equal(want.next_observations[t], want.observations[t + 1])
