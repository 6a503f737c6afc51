"""Drop-in gaps found by Gymnasium's and Stable-Baselines3's own test suites.

Each case runs real local worker processes (``local_workers=2, port=0``) next to
``gym.make_vec(..., vectorization_mode="sync")`` or SB3's ``DummyVecEnv`` (or,
for closed envs, gymnasium's ``AsyncVectorEnv``, whose closed-env error this is).
Workers import this module for ``tests.test_drop_in:DropInActions-v0``, so it
imports nothing heavy at the top (SB3 and torch only inside the SB3 tests).
"""

from __future__ import annotations

import time
import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces
from gymnasium.envs.registration import EnvSpec
from gymnasium.error import ClosedEnvironmentError
from gymnasium.vector import AutoresetMode

import ws_gym
import tests.envs  # noqa: F401  (registers Fancy-v0 here too)
from ws_gym.batching import batch_shape, env_spec_from_repr

from .conftest import assert_same

SAME_STEP = AutoresetMode.SAME_STEP
ACTIONS_ID = "tests.test_drop_in:DropInActions-v0"


class ActionsEnv(gym.Env):
    """Flat Box observations and Dict or Tuple actions: what DummyVecEnv takes
    (it refuses nested observation spaces)."""

    def __init__(self, kind: str = "dict") -> None:
        move, force = spaces.Discrete(3), spaces.Box(-1, 1, (2,), np.float32)
        self.kind = kind
        self.action_space = (spaces.Dict({"move": move, "force": force}) if kind == "dict"
                             else spaces.Tuple((move, force)))
        self.observation_space = spaces.Box(-np.inf, np.inf, (3,), np.float64)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.state = self.np_random.uniform(-1, 1, 3)
        return self.state.copy(), {"start": float(self.state[0])}

    def step(self, action):
        move, force = (action["move"], action["force"]) if self.kind == "dict" else action
        push = np.array([int(move) - 1, float(force[0]), float(force[1])])
        self.state = self.state + 0.5 * push + self.np_random.normal(0, 0.01, 3)
        terminated = bool(np.abs(self.state).max() > 2.5)
        return self.state.copy(), float(-np.abs(self.state).sum()), terminated, False, {"move": int(move)}


if "DropInActions-v0" not in gym.registry:
    gym.register("DropInActions-v0", entry_point=ActionsEnv, max_episode_steps=12)


def remote(env_id, n, workers=2, **kwargs):
    return gym.make_vec("ws_gym/Remote-v0", num_envs=n, env_id=env_id, port=0, local_workers=workers,
                        connect_timeout=60, **kwargs)


def sync(env_id, n, **kwargs):
    return gym.make_vec(env_id, n, vectorization_mode="sync", **kwargs)


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return fn(*args, **kwargs)


# -- 1. np_random_seed ---------------------------------------------------------


def test_np_random_seed_is_a_tuple_of_the_envs_seeds():
    """SyncVectorEnv.np_random_seed is ``get_attr("np_random_seed")``: a tuple of
    each env's seed; before any seeded reset each env's own random int."""
    n = 3
    ours, ref = remote("CartPole-v1", n), sync("CartPole-v1", n)
    try:
        for venv in (ours, ref):  # before any reset: one random (128-bit) int per env
            seeds = venv.np_random_seed
            assert type(seeds) is tuple and len(seeds) == n
            assert all(type(s) is int and s >= 0 for s in seeds) and len(set(seeds)) == n
        assert ours.np_random_seed == ours.np_random_seed  # stable until reseeded
        assert_same(ours.reset(seed=42), ref.reset(seed=42), "reset")
        assert ours.np_random_seed == ref.np_random_seed == (42, 43, 44)
        assert_same(ours.reset(), ref.reset(), "unseeded reset")  # an unseeded reset keeps them
        assert ours.np_random_seed == ref.np_random_seed == (42, 43, 44)
        ours.reset(seed=[7, None, 9]), ref.reset(seed=[7, None, 9])
        assert ours.np_random_seed == ref.np_random_seed == (7, 43, 9)
        for _ in range(40):  # autoresets do not reseed
            a = ref.action_space.sample()
            assert_same(ours.step(a), ref.step(a), "step")
        assert ours.np_random_seed == ref.np_random_seed == (7, 43, 9)
        # vector wrappers forward it
        assert gym.wrappers.vector.RecordEpisodeStatistics(ours).np_random_seed == (7, 43, 9)
    finally:
        ours.close()
        ref.close()


def test_np_random_seed_after_an_unseeded_first_reset():
    n = 2
    ours, ref = remote("CartPole-v1", n), sync("CartPole-v1", n)
    try:
        before = ours.np_random_seed
        ours.reset(), ref.reset()
        for venv in (ours, ref):
            seeds = venv.np_random_seed
            assert type(seeds) is tuple and len(seeds) == n and all(type(s) is int for s in seeds)
        assert ours.np_random_seed == before  # env.reset(seed=None) keeps the env's seed
    finally:
        ours.close()
        ref.close()


# -- 2. bad action batches -----------------------------------------------------


def _raised(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the type is what is compared
        return exc
    return None


def _dict_batch(n, **changes):
    batch = {"move": np.zeros(n, np.int64), "force": np.zeros((n, 2), np.float32)}
    batch.update(changes)
    return {k: v for k, v in batch.items() if v is not None}


BAD_BATCHES = {
    "CartPole-v1": {  # Discrete: an array of shape (n,)
        "scalar": lambda n: 0,
        "numpy scalar": lambda n: np.int64(1),
        "None": lambda n: None,
        "float": lambda n: 0.5,
        "too few": lambda n: np.zeros(n - 1, np.int64),
        "too many": lambda n: np.zeros(n + 1, np.int64),
        "list too many": lambda n: [0] * (n + 1),
    },
    "Pendulum-v1": {  # Box (1,): an array of shape (n, 1)
        "scalar": lambda n: 0.0,
        "too few": lambda n: np.zeros((n - 1, 1), np.float32),
        "too many": lambda n: np.zeros((n + 1, 1), np.float32),
    },
    "tests.envs:Fancy-v0": {  # Tuple(Discrete(3), Box(2,))
        "scalar": lambda n: 0,
        "one part": lambda n: (np.zeros(n, np.int64),),
        "a dict": lambda n: {"a": 1},
        "part too short": lambda n: (np.zeros(n - 1, np.int64), np.zeros((n - 1, 2), np.float32)),
        "part too long": lambda n: (np.zeros(n + 1, np.int64), np.zeros((n + 1, 2), np.float32)),
        "scalar part": lambda n: (0, np.zeros((n, 2), np.float32)),
    },
    ACTIONS_ID: {  # Dict(move=Discrete(3), force=Box(2,))
        "scalar": lambda n: 0,
        "a list": lambda n: [0] * n,
        "missing key": lambda n: _dict_batch(n, force=None),
        "part too long": lambda n: _dict_batch(n, move=np.zeros(n + 1, np.int64)),
        "part too short": lambda n: _dict_batch(n, force=np.zeros((n - 1, 2), np.float32)),
        "scalar part": lambda n: _dict_batch(n, move=1),
    },
}


@pytest.mark.parametrize("env_id", list(BAD_BATCHES))
def test_bad_action_batches_raise_as_sync_vector_env(env_id):
    """The exception type of SyncVectorEnv.step (gymnasium's ``iterate`` and a
    strict ``zip``): TypeError for what cannot be iterated or indexed, KeyError /
    IndexError for a missing part, ValueError for a wrong count. Ours also names
    the expected batch, sends nothing, and the envs step on."""
    n = 3
    ours, ref = remote(env_id, n), sync(env_id, n)
    try:
        ours.reset(seed=0)
        for name, make in BAD_BATCHES[env_id].items():
            ref.reset(seed=0)
            want = _raised(lambda: ref.step(make(n)))
            got = _raised(lambda: ours.step(make(n)))
            assert want is not None and got is not None, (name, want, got)
            assert type(got) is type(want), (name, got, want)
            assert f"expected a batch of {n} actions (" in str(got), (name, str(got))
        assert batch_shape(ours.single_action_space, n) in str(_raised(lambda: ours.step(0)))
        ref.reset(seed=0), ours.reset(seed=0)
        ref.action_space.seed(1)
        for t in range(5):  # nothing was sent: the envs step as before
            a = ref.action_space.sample()
            assert_same(quiet(ours.step, a), ref.step(a), f"step {t}", opaque_ok=True)
    finally:
        ours.close()
        ref.close()


def test_scalar_action_message_names_the_shape():
    ours = remote("Pendulum-v1", 2, workers=1)
    try:
        ours.reset(seed=0)
        with pytest.raises(TypeError, match=r"expected a batch of 2 actions \(an array of shape \(2, 1\)\)"):
            ours.step(0.0)
        with pytest.raises(ValueError, match=r"batch of 2 actions \(an array of shape \(2, 1\)\), got an array "
                                             r"of shape \(3, 1\)"):
            ours.step_async(np.zeros((3, 1), np.float32))
        ours.step(np.zeros((2, 1), np.float32))  # nothing pending
    finally:
        ours.close()


# -- 3. closed envs ------------------------------------------------------------


def _calls_on_a_vector_env(venv, n):
    return {
        "reset": lambda: venv.reset(seed=0),
        "step": lambda: venv.step(np.zeros(n, np.int64)),
        "step_async": lambda: venv.step_async(np.zeros(n, np.int64)),
        "step_wait": lambda: venv.step_wait(),
        "render": lambda: venv.render(),
        "call": lambda: venv.call("get_wrapper_attr", "gravity"),
        "get_attr": lambda: venv.get_attr("gravity"),
        "set_attr": lambda: venv.set_attr("gravity", 1.0),
        "np_random_seed": lambda: venv.np_random_seed,
    }


def test_closed_remote_vector_env_raises_closed_environment_error_at_once():
    """As gymnasium's AsyncVectorEnv: every call on a closed env raises
    ClosedEnvironmentError (not a RuntimeError), at once; close() may repeat."""
    n = 2
    ours = remote("CartPole-v1", n, step_timeout=30)
    ref = gym.make_vec("CartPole-v1", n, vectorization_mode="async")
    try:
        ours.reset(seed=0), ref.reset(seed=0)
        ours.step(np.zeros(n, np.int64))
        ours.step_async(np.zeros(n, np.int64))  # closed with a step in flight
    finally:
        ours.close()
        ref.close()
    ours.close()  # idempotent
    ref.close()
    assert ours.closed and ref.closed
    assert not issubclass(ClosedEnvironmentError, RuntimeError)
    want = {name: _raised(fn) for name, fn in _calls_on_a_vector_env(ref, n).items() if name != "np_random_seed"}
    assert all(type(exc) is ClosedEnvironmentError for exc in want.values()), want
    calls = _calls_on_a_vector_env(ours, n)
    calls["call_at"] = lambda: ours.call_at([1], "gravity")
    calls["set_attr_at"] = lambda: ours.set_attr_at([1], "gravity", [1.0])
    for name, fn in calls.items():
        start = time.monotonic()
        exc = _raised(fn)
        assert type(exc) is ClosedEnvironmentError, (name, exc)
        assert "RemoteVectorEnv" in str(exc) and "close()" in str(exc)
        assert time.monotonic() - start < 1, name
    assert ours.observation_space.shape == (n, 4)  # spaces stay readable, as gymnasium's


def test_closed_before_any_worker_connected():
    """Spaces not known yet (no worker ever came): reading them after close()
    raises at once instead of waiting connect_timeout for a worker."""
    ours = ws_gym.RemoteVectorEnv(2, env_id=None, port=0, connect_timeout=60)
    ours.close()
    start = time.monotonic()
    for fn in (lambda: ours.observation_space, lambda: ours.single_action_space, lambda: ours.reset(seed=0)):
        with pytest.raises(ClosedEnvironmentError):
            fn()
    assert time.monotonic() - start < 1


def test_closed_remote_env_raises_closed_environment_error_at_once():
    """A single RemoteEnv (through gym.make) after close(): no ConnectTimeoutError
    after connect_timeout, but ClosedEnvironmentError at once, for every call."""
    env = gym.make("ws_gym/Remote-v0", env_id="CartPole-v1", port=0, local_workers=1, connect_timeout=60)
    env.reset(seed=0)
    env.step(0)
    env.close()
    env.close()  # idempotent
    inner = env.unwrapped
    calls = {
        "reset": lambda: env.reset(seed=1),
        "step": lambda: inner.step(0),
        "render": lambda: inner.render(),
        "call": lambda: inner.call("gravity"),
        "set_remote_attr": lambda: inner.set_remote_attr("gravity", 1.0),
    }
    for name, fn in calls.items():
        start = time.monotonic()
        exc = _raised(fn)
        assert type(exc) is ClosedEnvironmentError, (name, exc)
        assert "RemoteEnv" in str(exc)
        assert time.monotonic() - start < 1, name
    never = ws_gym.RemoteEnv(env_id=None, port=0, connect_timeout=60)  # spaces never known
    never.close()
    with pytest.raises(ClosedEnvironmentError):
        never.observation_space
    with pytest.raises(ClosedEnvironmentError):
        never.reset()


# -- 5. spec -------------------------------------------------------------------


SPEC_CASES = {
    "time limit": ("CartPole-v1", {"max_episode_steps": 20}, {"max_episode_steps": 20}),
    "env kwargs": ("Pendulum-v1", {"g": 9.81}, {"env_kwargs": {"g": 9.81}}),
    "episode statistics": ("CartPole-v1", {"wrappers": [gym.wrappers.RecordEpisodeStatistics]},
                           {"record_episode_statistics": True}),
}


@pytest.mark.parametrize("case", list(SPEC_CASES))
def test_get_attr_spec_gives_the_envs_env_spec(case):
    env_id, ref_kwargs, our_kwargs = SPEC_CASES[case]
    ours, ref = remote(env_id, 3, **our_kwargs), sync(env_id, 3, **ref_kwargs)
    try:
        got, want = ours.get_attr("spec"), ref.get_attr("spec")
        assert type(got) is tuple and all(type(s) is EnvSpec for s in got)
        assert got == want
        assert got[0].to_json() == want[0].to_json()
        assert ours.call("get_wrapper_attr", "spec") == want
        assert ours.call_at([2, 0], "spec") == (want[2], want[0])
        assert EnvSpec.from_json(got[0].to_json()) == want[0]
    finally:
        ours.close()
        ref.close()


def test_single_remote_env_call_spec():
    env = gym.make("ws_gym/Remote-v0", env_id="Pendulum-v1", port=0, local_workers=1, env_kwargs={"g": 9.0})
    try:
        assert env.unwrapped.call("spec") == gym.make("Pendulum-v1", g=9.0).spec
    finally:
        env.close()


def test_vector_env_spec_recreates_it_as_sync_vector_envs_does():
    """``envs.spec`` of gym.make_vec is the recipe to make the same vector env
    again: SyncVectorEnv's names CartPole-v1 with ``num_envs`` and
    ``vectorization_mode="sync"``; ours names ws_gym/Remote-v0 with its keyword
    arguments and ``vectorization_mode="vector_entry_point"``. Made directly,
    neither has one."""
    ours, ref = remote("CartPole-v1", 3), sync("CartPole-v1", 3)
    again = again_ref = None
    try:
        assert ref.spec.id == "CartPole-v1"
        assert ref.spec.kwargs == {"num_envs": 3, "vectorization_mode": "sync"}
        assert ours.spec.id == "ws_gym/Remote-v0"
        assert ours.spec.kwargs == {"env_id": "CartPole-v1", "port": 0, "local_workers": 2, "connect_timeout": 60,
                                    "num_envs": 3, "vectorization_mode": "vector_entry_point"}
        again, again_ref = gym.make_vec(ours.spec), gym.make_vec(ref.spec)
        assert type(again) is ws_gym.RemoteVectorEnv and again.num_envs == 3
        assert type(again_ref) is gym.vector.SyncVectorEnv and again_ref.num_envs == 3
        assert again.spec == ours.spec and again_ref.spec == ref.spec
        assert_same(again.reset(seed=4), again_ref.reset(seed=4), "reset of the remade envs")
    finally:
        for venv in (ours, ref, again, again_ref):
            if venv is not None:
                venv.close()
    direct = ws_gym.RemoteVectorEnv(2, env_id="CartPole-v1", port=0)
    direct_ref = gym.vector.SyncVectorEnv([lambda: gym.make("CartPole-v1")] * 2)
    assert direct.spec is None and direct_ref.spec is None
    direct.close()
    direct_ref.close()


def test_spec_repr_parses_back_only_from_literals():
    """Nothing received is evaluated: a spec repr with a non-literal field (a
    callable entry point, a numpy value) stays its repr string, with a warning."""
    spec = gym.spec("CartPole-v1")
    assert env_spec_from_repr(repr(spec)) == spec
    wrapped = gym.make("CartPole-v1", max_episode_steps=5)
    wrapped = gym.wrappers.RecordEpisodeStatistics(wrapped)
    assert env_spec_from_repr(repr(wrapped.spec)) == wrapped.spec
    odd = EnvSpec("Odd-v0", entry_point=ActionsEnv)
    assert env_spec_from_repr(repr(odd)) is None
    assert env_spec_from_repr("EnvSpec(id=__import__('os').getpid())") is None
    assert env_spec_from_repr("EnvSpec(id='A-v0', kwargs={'x': np.float64(1.0)})") is None
    assert env_spec_from_repr(repr(spec)[:-5] + "...") is None  # cut at the codec's limit
    assert env_spec_from_repr("Other(id='A-v0')") is None


def test_spec_with_a_callable_entry_point_stays_a_string():
    ours = remote(ACTIONS_ID, 2, workers=1)
    try:
        with pytest.warns(RuntimeWarning, match="EnvSpec has no wire form"):
            got = ours.get_attr("spec")
        want = sync(ACTIONS_ID, 2).get_attr("spec")
        assert type(want[0]) is EnvSpec
        assert got == tuple(repr(s) for s in want) and all(type(s) is str for s in got)
    finally:
        ours.close()


# -- 4 and 5 with Stable-Baselines3 --------------------------------------------


@pytest.fixture
def sb3():
    pytest.importorskip("stable_baselines3", reason="needs the sb3 extra: pip install '.[sb3]'")
    from stable_baselines3.common.vec_env import DummyVecEnv

    from ws_gym.sb3 import SB3VecEnv

    return DummyVecEnv, SB3VecEnv


def test_sb3_negative_indices_as_dummy_vec_env(sb3):
    DummyVecEnv, SB3VecEnv = sb3
    n = 4
    a = SB3VecEnv(remote("CartPole-v1", n, autoreset_mode=SAME_STEP, max_episode_steps=30))
    b = DummyVecEnv([lambda: gym.make("CartPole-v1", max_episode_steps=30)] * n)
    try:
        a.seed(0), b.seed(0)
        a.reset(), b.reset()
        for venv in (a, b):
            venv.set_attr("gravity", 1.5, indices=[-1])
            venv.set_attr("length", 0.75, indices=[0, -3])
            venv.set_attr("tau", 0.03, indices=-2)
        for indices in ([-1], [0, -1], -1, [-4, 3, -1], range(-n, 0), [-2, -2]):
            for name in ("gravity", "length", "tau", "np_random_seed"):
                assert a.get_attr(name, indices) == b.get_attr(name, indices), (name, indices)
                assert a.env_method("get_wrapper_attr", name, indices=indices) == b.env_method(
                    "get_wrapper_attr", name, indices=indices), (name, indices)
            for cls in (gym.wrappers.TimeLimit, gym.wrappers.RecordEpisodeStatistics):
                assert a.env_is_wrapped(cls, indices) == b.env_is_wrapped(cls, indices), (cls, indices)
        assert a.get_attr("gravity") == [9.8, 9.8, 9.8, 1.5]
        assert_same(a.env_method("reset", indices=[-1], seed=3), b.env_method("reset", indices=[-1], seed=3),
                    "reset of the last env")
        for bad in ([n], [-n - 1], n, -n - 1, [0, n]):
            for call in (lambda v: v.get_attr("gravity", bad), lambda v: v.set_attr("gravity", 2.0, bad),
                         lambda v: v.env_method("get_wrapper_attr", "gravity", indices=bad),
                         lambda v: v.env_is_wrapped(gym.wrappers.TimeLimit, bad)):
                assert type(_raised(lambda: call(b))) is IndexError, bad
                exc = _raised(lambda: call(a))
                assert type(exc) is IndexError and "out of range" in str(exc), (bad, exc)
        assert a.get_attr("gravity") == b.get_attr("gravity") == [9.8, 9.8, 9.8, 1.5]  # nothing was set
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("kind", ["dict", "tuple"])
def test_sb3_per_env_dict_and_tuple_actions_as_dummy_vec_env(sb3, kind):
    """A list of per-env Dict or Tuple actions, as DummyVecEnv takes them: equal
    results, episode ends included; gymnasium's batched form works too."""
    DummyVecEnv, SB3VecEnv = sb3
    n = 3
    a = SB3VecEnv(remote(ACTIONS_ID, n, autoreset_mode=SAME_STEP, env_kwargs={"kind": kind}))
    b = DummyVecEnv([lambda: gym.make(ACTIONS_ID, kind=kind)] * n)
    try:
        assert a.action_space == b.action_space
        a.seed(11), b.seed(11)
        assert_same(a.reset(), b.reset(), "reset")
        b.action_space.seed(2)
        ends = 0
        for t in range(60):
            actions = [b.action_space.sample() for _ in range(n)]
            if t % 2:  # a tuple of them works as a list does
                actions = tuple(actions)
            got, want = a.step(actions), b.step(actions)
            assert_same(got, want, f"step {t}")
            assert_same(a.reset_infos, b.reset_infos, f"reset infos {t}")
            ends += int(want[2].sum())
        assert ends > 0, "the test must cross episode ends"
        batched = a.venv.action_space.sample()  # gymnasium's batch: still accepted
        a.step(batched)
        per_env = [b.action_space.sample() for _ in range(n + 1)]
        with pytest.raises(ValueError, match=rf"expected {n} actions, one per env \(or a "):
            a.step(per_env)
        with pytest.raises(ValueError, match=rf"expected {n} actions, one per env"):
            a.step(per_env[:-2])
        a.step(per_env[:-1])  # nothing was sent: the envs step on
    finally:
        a.close()
        b.close()


def test_sb3_extra_rows_are_refused_with_the_expected_shape(sb3):
    """DummyVecEnv ignores rows beyond its envs; SB3VecEnv refuses them, over any
    VectorEnv, saying what shape it expected."""
    DummyVecEnv, SB3VecEnv = sb3
    n = 2
    for venv in (remote("Pendulum-v1", n, autoreset_mode=SAME_STEP),
                 sync("Pendulum-v1", n, vector_kwargs={"autoreset_mode": SAME_STEP})):
        a = SB3VecEnv(venv)
        try:
            a.reset()
            with pytest.raises(ValueError, match=r"expected a batch of 2 actions \(an array of shape \(2, 1\)\), "
                                                 r"got an array of shape \(3, 1\)"):
                a.step(np.zeros((n + 1, 1), np.float32))
            a.step(np.zeros((n, 1), np.float32))  # nothing was sent
        finally:
            a.close()


def test_sb3_get_attr_spec_as_dummy_vec_env(sb3):
    DummyVecEnv, SB3VecEnv = sb3
    n = 3
    a = SB3VecEnv(remote("CartPole-v1", n, autoreset_mode=SAME_STEP, max_episode_steps=25))
    b = DummyVecEnv([lambda: gym.make("CartPole-v1", max_episode_steps=25)] * n)
    try:
        for indices in (None, [-1], [2, 0]):
            got = a.get_attr("spec", indices)
            assert got == b.get_attr("spec", indices) and all(type(s) is EnvSpec for s in got)
        assert a.env_method("get_wrapper_attr", "spec", indices=[1]) == b.env_method(
            "get_wrapper_attr", "spec", indices=[1])
    finally:
        a.close()
        b.close()
