"""Workers that run their envs in subprocesses (``--vectorization async``).

gymnasium's AsyncVectorEnv inside a worker must give exactly what the default
SyncVectorEnv gives: the same observations, rewards, flags and the same info
log (so the trainer's merged infos are equal too), in every autoreset mode,
across episode ends, autoresets and explicit (masked and full) resets. The
subprocesses must end with the worker however it ends.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces
from gymnasium.vector import AutoresetMode

import ws_gym
import tests.envs  # noqa: F401  (registers Fancy-v0 & co. here too)
from ws_gym import codec
from ws_gym import protocol as P
from ws_gym.errors import UnsupportedSpaceError
from ws_gym.host import EnvHost

from .conftest import assert_same

MODES = [AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP, AutoresetMode.DISABLED]


class PidEnv(gym.Env):
    """Tells which process it runs in."""

    metadata = {"render_modes": []}
    observation_space = spaces.Box(-1.0, 1.0, (1,), np.float32)
    action_space = spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(1, np.float32), {}

    def step(self, action):
        return np.zeros(1, np.float32), 0.0, False, False, {}

    def pid(self):
        return os.getpid()


if "WsGymVecTest/Pid-v0" not in gym.registry:
    gym.register("WsGymVecTest/Pid-v0", entry_point="tests.test_vectorization:PidEnv", disable_env_checker=True)
PID_ENV = "tests.test_vectorization:WsGymVecTest/Pid-v0"  # workers import this module to find it


# ------------------------------------------------------------------ helpers


def drive(step_a, step_b, reset_a, reset_b, sample, num_envs, mode, steps, opaque_ok=False):
    """Step two vector envs (or hosts) side by side and compare every result.

    After an episode end the ended envs are, in turn, left to autoreset (not
    in Disabled mode), reset through ``reset_mask`` (with seeds), or all reset;
    every 37 steps one env that may not have ended is reset through the mask.
    Returns the number of episode ends crossed.
    """
    assert_same(reset_a(seed=123, options=None), reset_b(seed=123, options=None), "reset", opaque_ok)
    ends = 0
    for t in range(steps):
        actions = sample()
        a, b = step_a(actions), step_b(actions)
        assert_same(a, b, f"step {t}", opaque_ok)
        done = np.logical_or(b[2], b[3])
        if done.any():
            ends += 1
            how = ends % 3
            if how == 0 and mode is AutoresetMode.DISABLED:
                how = 1
            if how == 1:  # NextStep: the reset must clear the env's pending autoreset
                seeds = [1000 + t + i for i in range(num_envs)]
                got = reset_a(seed=seeds, options={"reset_mask": done.copy()})
                want = reset_b(seed=seeds, options={"reset_mask": done.copy()})
                assert_same(got, want, f"masked reset after step {t}", opaque_ok)
            elif how == 2:
                assert_same(reset_a(seed=None, options=None), reset_b(seed=None, options=None),
                            f"full reset after step {t}", opaque_ok)
        elif t % 37 == 36:
            mask = np.zeros(num_envs, dtype=np.bool_)
            mask[t % num_envs] = True
            got = reset_a(seed=None, options={"reset_mask": mask.copy()})
            want = reset_b(seed=None, options={"reset_mask": mask.copy()})
            assert_same(got, want, f"partial reset at step {t}", opaque_ok)
    assert ends >= 3, "the test must cross episode ends"
    return ends


def side_by_side(remote, env_id, num_envs, mode, steps, opaque_ok=False, **make_kwargs):
    """``remote`` (a RemoteVectorEnv) against ``gym.make_vec(..., "sync")``."""
    ref = gym.make_vec(env_id, num_envs, vectorization_mode="sync",
                       vector_kwargs={"autoreset_mode": mode}, **make_kwargs)
    try:
        assert remote.single_observation_space == ref.single_observation_space
        assert remote.single_action_space == ref.single_action_space
        ref.action_space.seed(7)

        def quiet(fn):
            def call(*args, **kwargs):
                with warnings.catch_warnings():  # Fancy-v0 sends a value with no wire form
                    warnings.simplefilter("ignore", RuntimeWarning)
                    return fn(*args, **kwargs)
            return call

        return drive(quiet(remote.step), ref.step, quiet(remote.reset), ref.reset, ref.action_space.sample,
                     num_envs, mode, steps, opaque_ok)
    finally:
        ref.close()


def alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting until {what}")
        time.sleep(0.02)


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to see processes")


# ------------------------------------------------------------- the host alone


def welcome(env_id, num_envs, mode, max_episode_steps=None):
    return P.Welcome(env_id=env_id, env_kwargs={}, num_envs=num_envs, first_index=0, mode=P.MODE_VECTOR,
                     autoreset_mode=mode.value, max_episode_steps=max_episode_steps)


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
@pytest.mark.parametrize("env_id, max_steps", [("CartPole-v1", 25), ("tests.envs:Fancy-v0", None)])
def test_async_host_replies_equal_sync_host(env_id, max_steps, mode):
    """The raw replies, info log included, entry by entry (not only once merged)."""
    n = 4
    hosts = [EnvHost(welcome(env_id, n, mode, max_steps), vectorization=v) for v in ("async", "sync")]
    try:
        assert hosts[0].ready_body() == hosts[1].ready_body()
        space = gym.vector.utils.batch_space(gym.make(env_id).action_space, n)
        space.seed(3)

        def wire(reply):  # as the trainer gets it (an opaque info value becomes its repr)
            return codec.writable(codec.decode(codec.encode(P.OK, 1, reply)).body)

        def stepper(host):
            return lambda actions: wire(host.handle(P.STEP, {"a": actions}))

        def resetter(host):
            def reset(seed, options):
                body = {"seeds": [seed + i for i in range(n)] if type(seed) is int else seed, "options": None}
                if options is not None:
                    body["mask"] = options["reset_mask"].tolist()
                return wire(host.handle(P.RESET, body))
            return reset

        def as_tuple(step):  # so drive() finds terminations and truncations at [2] and [3]
            return lambda actions: (lambda r: (r["o"], r["r"], r["t"], r["u"], r["f"]))(step(actions))

        drive(as_tuple(stepper(hosts[0])), as_tuple(stepper(hosts[1])),
              resetter(hosts[0]), resetter(hosts[1]), space.sample, n, mode, 150)
    finally:
        for host in hosts:
            host.close()


def test_async_host_checks_disabled_mode_like_sync():
    """Stepping an ended env before resetting it fails in both (gymnasium's assertion)."""
    errors = []
    for vectorization in ("async", "sync"):
        host = EnvHost(welcome("CartPole-v1", 2, AutoresetMode.DISABLED, 3), vectorization=vectorization)
        try:
            host.handle(P.RESET, {"seeds": [0, 1]})
            for _ in range(3):
                reply = host.handle(P.STEP, {"a": np.zeros(2, np.int64)})
            assert reply["u"].all()
            with pytest.raises(AssertionError) as err:
                host.handle(P.STEP, {"a": np.zeros(2, np.int64)})
            errors.append(str(err.value))
        finally:
            host.close()
    assert errors[0] == errors[1] == "self._autoreset_envs=array([ True,  True])"


def test_async_host_refuses_an_unsupported_space_like_sync():
    for vectorization in ("async", "sync"):
        with pytest.raises(UnsupportedSpaceError):
            EnvHost(welcome("tests.envs:GraphObs-v0", 2, AutoresetMode.NEXT_STEP), vectorization=vectorization)


def test_bad_vectorization_values_are_refused():
    with pytest.raises(ValueError, match="vectorization"):
        EnvHost(welcome("CartPole-v1", 2, AutoresetMode.NEXT_STEP), vectorization="threads")
    with pytest.raises(ValueError, match="vectorization"):
        ws_gym.RemoteVectorEnv(2, env_id="CartPole-v1", port=0, worker_vectorization="threads")
    out = subprocess.run([sys.executable, "-m", "ws_gym.worker", "--url", "ws://127.0.0.1:9/ws",
                          "--vectorization", "threads"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "--vectorization" in out.stderr  # bad arguments: 1 (2 is "refused")


# ------------------------------------------------------- real workers, real sockets


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
def test_local_async_workers_equal_sync_vector_env(mode):
    """``worker_vectorization="async"``: 8 CartPole over 2 local workers, 4 subprocesses each."""
    remote = gym.make_vec("ws_gym/Remote-v0", num_envs=8, env_id="CartPole-v1", port=0, local_workers=2,
                          autoreset_mode=mode, max_episode_steps=30, connect_timeout=60,
                          worker_vectorization="async")
    try:
        for cmd in remote.unwrapped._trainer.local._cmds:
            at = cmd.index("--vectorization")
            assert cmd[at + 1] == "async"
        side_by_side(remote, "CartPole-v1", 8, mode, 150, max_episode_steps=30)
    finally:
        remote.close()


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
def test_cli_async_worker_next_to_a_sync_one(mode, cli_workers):
    """Dict/Tuple/Text spaces and rich infos; 5 envs: 3 in an async CLI worker, 2 in a sync one."""
    remote = ws_gym.RemoteVectorEnv(5, env_id="tests.envs:Fancy-v0", port=0, autoreset_mode=mode,
                                    connect_timeout=60)
    try:
        procs = [cli_workers.start("--url", remote.url, "--env", "tests.envs:Fancy-v0", "--num-envs", "3",
                                   "--vectorization", "async", "--name", "async-worker"),
                 cli_workers.start("--url", remote.url, "--env", "tests.envs:Fancy-v0", "--num-envs", "2",
                                   "--name", "sync-worker")]
        side_by_side(remote, "tests.envs:Fancy-v0", 5, mode, 120, opaque_ok=True)
    finally:
        remote.close()
    for proc in procs:
        code, out = cli_workers.finish(proc)
        assert code == 0, out


# ----------------------------------------------------------- subprocess lifetimes


@linux_only
def test_subprocesses_end_with_the_worker(cli_workers):
    """Closed by the trainer: the worker closes its AsyncVectorEnv, then exits."""
    envs = ws_gym.RemoteVectorEnv(3, env_id=PID_ENV, port=0, connect_timeout=60)
    try:
        proc = cli_workers.start("--url", envs.url, "--env", PID_ENV, "--num-envs", "3", "--vectorization", "async")
        envs.reset(seed=0)
        pids = envs.call("pid")
        assert len(set(pids)) == 3 and proc.pid not in pids and os.getpid() not in pids
        assert all(alive(p) for p in pids)
        envs.step(np.zeros(3, np.int64))
    finally:
        envs.close()
    code, out = cli_workers.finish(proc)
    assert code == 0, out
    assert not any(alive(p) for p in pids)


@linux_only
def test_subprocesses_end_when_the_worker_is_killed(cli_workers):
    """SIGKILL: no cleanup code runs in the worker; its subprocesses must still end,
    and the trainer must see the worker go (forked subprocesses share its socket)."""
    envs = ws_gym.RemoteVectorEnv(3, env_id=PID_ENV, port=0, connect_timeout=60, step_timeout=30)
    try:
        proc = cli_workers.start("--url", envs.url, "--env", PID_ENV, "--num-envs", "3", "--vectorization", "async")
        envs.reset(seed=0)
        pids = envs.call("pid")
        assert all(alive(p) for p in pids)
        proc.kill()
        proc.wait(timeout=10)
        wait_until(lambda: not any(alive(p) for p in pids), 30, "the env subprocesses have ended")
        with pytest.raises(ws_gym.WorkerLostError):
            envs.step(np.zeros(3, np.int64))
    finally:
        envs.close()


def test_env_error_in_a_subprocess_is_reported_and_the_envs_go_on():
    """As with a sync worker: the env's type, message and traceback, and the envs stay usable."""
    envs = ws_gym.RemoteVectorEnv(2, env_id="tests.envs:Crash-v0", port=0, local_workers=1,
                                  connect_timeout=60, worker_vectorization="async")
    try:
        envs.reset(seed=0)
        envs.step(np.array([0, 0]))
        with pytest.raises(ws_gym.RemoteEnvError) as err:
            envs.step(np.array([0, 2]))
        e = err.value
        assert e.remote_type == "ValueError"
        assert e.remote_message == "action 2 is not allowed here"
        assert "in step" in e.remote_traceback and "env subprocess 1" in e.remote_traceback
        envs.step(np.array([0, 0]))
        envs.reset(seed=1)
        envs.step(np.array([0, 0]))
        proc = envs._trainer.local.procs[0]
    finally:
        envs.close()
    assert proc.wait(timeout=30) == 0


def test_a_dead_env_subprocess_ends_its_worker_and_reset_restarts_it():
    """An env that kills its process: in a sync worker the worker dies; in an async one the
    subprocess does, and the worker ends too, so the trainer recovers the same way."""
    envs = ws_gym.RemoteVectorEnv(2, env_id="tests.envs:Crash-v0", port=0, local_workers=1,
                                  connect_timeout=60, step_timeout=60, worker_vectorization="async")
    try:
        envs.reset(seed=0)
        first = envs._trainer.local.procs[0]
        t0 = time.monotonic()
        with pytest.raises(ws_gym.WorkerLostError):
            envs.step(np.array([0, 1]))  # env 1's subprocess calls os._exit(17)
        assert time.monotonic() - t0 < 30, "must not wait for step_timeout"
        assert first.wait(timeout=30) == 1
        envs.reset(seed=0)  # a new local worker
        assert envs._trainer.local.procs[0] is not first
        envs.step(np.array([0, 0]))
    finally:
        envs.close()
