"""ws_gym.rllib on a local Ray instance: RLlib's PPO with every env in a ws_gym worker.

The example's config learns CartPole with its envs in local worker
processes, an evaluation EnvRunner included; a run served by command-line
workers (``python -m ws_gym.worker``) dialing the run's one URL keeps
training when one of them is killed and started again, and when RLlib
restarts an EnvRunner whose process died, that EnvRunner gets its worker
back; through a relay each EnvRunner has a room of its own. Without Ray
running: the ports, the run's URL sending workers on, the wait for lost envs.

Needs the rllib extra (``pip install '.[rllib]'``). Without Ray the module is
skipped, unless ``WS_GYM_REQUIRE_RLLIB=1`` says it must run (CI, after
installing the extra): then it fails.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import signal
import socket
import time

import numpy as np
import pytest

from .conftest import ROOT, CliWorkers

if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.rllib") is None:
    if os.environ.get("WS_GYM_REQUIRE_RLLIB") == "1":
        pytest.fail("WS_GYM_REQUIRE_RLLIB=1 but Ray RLlib is not installed: pip install '.[rllib]'", pytrace=False)
    pytest.skip("needs the rllib extra: pip install '.[rllib]' (WS_GYM_REQUIRE_RLLIB=1 makes this a failure)",
                allow_module_level=True)

import ray  # noqa: E402
from ray.rllib.algorithms.ppo import PPOConfig  # noqa: E402

import ws_gym.rllib  # noqa: E402
from ws_gym import RemoteVectorEnv  # noqa: E402
from ws_gym.rllib import (  # noqa: E402
    PauseForLostEnvs, RemoteEnvRunner, RunURL, envrunner_urls, remote_envs, runner_port, runner_urls,
)

from .test_relay import TOKEN as RELAY_TOKEN  # noqa: E402
from .test_relay import RelayProcess  # noqa: E402

ENV_ID = "CartPole-v1"
TARGET = 150.0  # mean episode return the example's config must reach
BUDGET = 60_000  # env steps it may take
WAIT = 120.0  # seconds any bounded wait in these tests may take


def load_example():
    spec = importlib.util.spec_from_file_location("rllib_ppo_example", ROOT / "examples" / "rllib_ppo.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port_range(count: int, tries: int = 50) -> int:
    """A port ``p`` with ``p .. p + count - 1`` all free now (bound and released)."""
    for _ in range(tries):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + count > 65535:
            continue
        socks = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError(f"no {count} consecutive free ports found")


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance for the module (logical CPUs for 2 EnvRunners and an evaluation one)."""
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def runner_envs(algo) -> list[dict]:
    """What each remote training EnvRunner's env is, and its trainer's run stats."""
    def describe(runner):
        env = runner.env.unwrapped
        run = env.stats()["run"] if isinstance(env, RemoteVectorEnv) else {}
        workers = env.stats()["workers"] if isinstance(env, RemoteVectorEnv) else []
        return {"index": runner.worker_index, "pid": os.getpid(), "type": type(env).__name__,
                "url": getattr(env, "url", None), "num_envs": env.num_envs, "run": run,
                "worker_names": [w["name"] for w in workers]}
    return sorted(algo.env_runner_group.foreach_env_runner(describe, local_env_runner=False),
                  key=lambda d: d["index"])


# ---------------------------------------------------------------------------- no Ray instance needed

def test_ports_follow_the_envrunners():
    assert [runner_port(9000, i, num_env_runners=2) for i in (1, 2)] == [9001, 9002]
    # evaluation EnvRunners after the training ones and the run's URL (9000)
    assert [runner_port(9000, i, evaluation=True, num_env_runners=2) for i in (0, 1, 2)] == [9003, 9004, 9005]
    assert runner_port(0, 3, evaluation=True, num_env_runners=2) == 0


def test_a_relay_room_is_the_same_for_an_envrunner_and_its_restarts_only():
    room, key = ws_gym.rllib.relay_room("secret", 1, False)
    assert (room, key) == ws_gym.rllib.relay_room("secret", 1, False)
    others = {ws_gym.rllib.relay_room("secret", 2, False), ws_gym.rllib.relay_room("secret", 1, True),
              ws_gym.rllib.relay_room("other secret", 1, False)}
    assert len(others) == 3 and (room, key) not in others and room != key
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{32}", text) for text in (room, key))


def test_remote_envs_rewrites_a_copy_and_refuses_what_it_cannot_serve():
    base = (PPOConfig().environment(ENV_ID, env_config={"max_episode_steps": 100})
            .env_runners(num_env_runners=2, num_envs_per_env_runner=4)
            .evaluation(evaluation_interval=1, evaluation_num_env_runners=1))
    config = remote_envs(base, port=9000, host="0.0.0.0")
    assert base.env == ENV_ID and base.env_runner_cls is None  # the user's config is left as it was
    assert config.env_runner_cls is RemoteEnvRunner and config.env == ws_gym.rllib.ENV_NAME
    settings = config.env_config[ws_gym.rllib.KEY]
    assert settings["env_id"] == ENV_ID and settings["env_kwargs"] == {"max_episode_steps": 100}
    token = settings["options"]["token"]
    assert token and len(token) >= 24  # off loopback: one generated token for the whole run
    assert runner_urls(config, public_host="gpu.example") == {
        "env_runner 1": "ws://gpu.example:9001/ws", "env_runner 2": "ws://gpu.example:9002/ws",
        "evaluation 1": "ws://gpu.example:9004/ws"}
    with pytest.raises(TypeError, match="gymnasium id"):
        remote_envs(PPOConfig().environment(env=None))
    with pytest.raises(ValueError, match="EnvRunner class"):
        remote_envs(PPOConfig().environment(ENV_ID).env_runners(env_runner_cls=object))
    with pytest.raises(TypeError, match="unexpected keyword"):
        remote_envs(PPOConfig().environment(ENV_ID), no_such_option=1)
    with pytest.raises(ValueError, match="relay"):
        runner_urls(remote_envs(base, port=0))
    with pytest.raises(ValueError, match="already"):
        remote_envs(config)
    with pytest.raises(ValueError, match="num_env_runners=0"):
        RunURL(remote_envs(PPOConfig().environment(ENV_ID).env_runners(num_env_runners=0), port=9000))


def test_the_step_after_lost_envs_waits_for_their_new_worker(cli_workers):
    """Without the pause RLlib would get a one-step truncated episode of return 0
    every other step until a new worker comes."""
    envs = PauseForLostEnvs(RemoteVectorEnv(num_envs=4, env_id=ENV_ID, port=0, on_worker_lost="wait",
                                            connect_timeout=WAIT), timeout=WAIT)
    try:
        url = envs.unwrapped.url
        command = ["--url", url, "--env", ENV_ID, "--num-envs", "2", "--status-interval", "0"]
        victim = cli_workers.start(*command)
        cli_workers.start(*command)
        envs.reset(seed=0)
        actions = np.zeros(4, dtype=np.int64)
        envs.step(actions)
        victim.kill()
        victim.wait(timeout=30)
        for _ in range(1000):  # the trainer sees the disconnect at once: within a step or two
            _, _, _, truncated, infos = envs.step(actions)
            lost = np.asarray(infos.get("_worker_lost", np.zeros(4, bool)))
            if lost.any():
                break
        assert lost.sum() == 2 and truncated[lost].all()
        cli_workers.start(*command)
        _, rewards, terminated, truncated, infos = envs.step(actions)  # waits for the new worker
        assert not np.asarray(infos.get("_worker_lost", np.zeros(4, bool))).any()
        # NEXT_STEP: the new worker's first observation, as the step after any episode end
        assert not truncated[lost].any() and not terminated[lost].any() and (rewards[lost] == 0).all()
        assert envs.unwrapped.stats()["run"]["envs_served"] == 4
    finally:
        envs.close()


def test_the_run_url_sends_each_worker_with_its_token_to_an_envrunner_that_lacks_envs(cli_workers):
    """Two EnvRunners' trainers off loopback (so with the run's token), one URL for both."""
    port = free_port_range(3)
    config = remote_envs(PPOConfig().environment(ENV_ID).env_runners(num_env_runners=2), port=port, host="0.0.0.0")
    token = config.env_config[ws_gym.rllib.KEY]["options"]["token"]
    trainers = [RemoteVectorEnv(num_envs=2, env_id=ENV_ID, host="0.0.0.0", port=runner_port(port, i, num_env_runners=2),
                                token=token, connect_timeout=WAIT) for i in (1, 2)]
    try:
        with RunURL(config, public_host="127.0.0.1") as run:
            assert run.worker_command(ENV_ID, 2) == (f"WS_GYM_TOKEN={token} python -m ws_gym.worker --url "
                                                     f"ws://127.0.0.1:{port}/ws --env {ENV_ID} --num-envs 2")
            workers = [cli_workers.start("--url", run.url, "--env", ENV_ID, "--num-envs", "2", "--status-interval",
                                         "0", env={"WS_GYM_TOKEN": token}) for _ in range(2)]
            for envs in trainers:  # waits for a worker: each trainer gets one of the two
                envs.reset(seed=0)
                assert envs.stats()["run"]["envs_served"] == 2
            served_by = sorted(name.rsplit(":", 1)[1] for envs in trainers for name in
                               (w["name"] for w in envs.stats()["workers"]))
            assert served_by == sorted(str(w.pid) for w in workers)
    finally:
        for envs in trainers:
            envs.close()


def test_lost_envs_are_waited_for_once_then_stepped_without(cli_workers):
    envs = PauseForLostEnvs(RemoteVectorEnv(num_envs=2, env_id=ENV_ID, port=0, on_worker_lost="wait",
                                            connect_timeout=WAIT), timeout=1.0)
    try:
        command = ["--url", envs.unwrapped.url, "--env", ENV_ID, "--num-envs", "1", "--status-interval", "0"]
        victim = cli_workers.start(*command)
        cli_workers.start(*command)
        envs.reset(seed=0)
        victim.kill()
        victim.wait(timeout=30)
        actions = np.zeros(2, dtype=np.int64)
        for _ in range(1000):
            _, _, _, truncated, infos = envs.step(actions)
            if np.asarray(infos.get("_worker_lost", [False])).any():
                break
        start = time.monotonic()
        for _ in range(10):  # one wait of 1 s in vain, then no more: each step truncates the lost env
            _, _, _, truncated, infos = envs.step(actions)
            assert np.asarray(infos["_worker_lost"]).sum() == 1 and truncated.sum() == 1
        assert 1.0 <= time.monotonic() - start < 5.0
    finally:
        envs.close()


def test_the_run_url_on_a_taken_port_raises_in_the_caller():
    with HeldPort() as port:
        with pytest.raises(OSError):
            RunURL(remote_envs(PPOConfig().environment(ENV_ID).env_runners(num_env_runners=1), port=port))


class HeldPort:
    """A port held by a listening socket, for the duration of a ``with``."""

    def __enter__(self) -> int:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        return self.sock.getsockname()[1]

    def __exit__(self, *exc) -> None:
        self.sock.close()


# ---------------------------------------------------------------------------- training on Ray

def test_the_examples_config_learns_cartpole_with_every_env_in_a_worker(local_ray):
    example = load_example()
    args = example.parse_args(["--port", "0", "--local-workers", "1", "--seed", "3"])
    config = example.make_config(args).evaluation(
        evaluation_interval=1, evaluation_num_env_runners=0, evaluation_duration=4,
        evaluation_duration_unit="episodes")
    algo = config.build_algo()
    try:
        steps, mean_return, evaluated = 0, -math.inf, None
        while steps < BUDGET and mean_return < TARGET:
            result = algo.train()
            steps = int(result["env_runners"]["num_env_steps_sampled_lifetime"])
            mean_return = float(result["env_runners"].get("episode_return_mean", -math.inf))
            evaluated = result.get("evaluation", {}).get("env_runners", {}).get("episode_return_mean", evaluated)
        assert mean_return >= TARGET, f"mean return {mean_return} after {steps} env steps"

        runners = runner_envs(algo)
        assert [r["index"] for r in runners] == [1, 2]
        assert len({r["pid"] for r in runners}) == 2  # two EnvRunner processes
        for r in runners:  # each EnvRunner's 4 envs are in its own ws_gym worker process
            assert r["type"] == "RemoteVectorEnv" and r["num_envs"] == 4
            assert r["run"]["envs_served"] == 4 and r["run"]["workers_connected"] == 1
            assert not any(name.endswith(f":{r['pid']}") for name in r["worker_names"])
        # every env step RLlib sampled went through the workers
        assert sum(r["run"]["env_steps"] for r in runners) >= steps
        # the evaluation EnvRunner (the local one here) has its envs in a worker too
        assert evaluated is not None
        eval_env = algo.eval_env_runner.env.unwrapped
        assert isinstance(eval_env, RemoteVectorEnv) and eval_env.stats()["run"]["envs_served"] == 4
    finally:
        algo.stop()


def test_workers_of_the_run_url_survive_a_killed_worker_and_a_restarted_envrunner(local_ray):
    port = free_port_range(5)  # the run's URL, EnvRunners 1 and 2, (the local evaluation one), evaluation 1
    config = (PPOConfig().environment(ENV_ID)
              .env_runners(num_env_runners=2, num_envs_per_env_runner=4)
              .training(train_batch_size_per_learner=1000, minibatch_size=250, num_epochs=2)
              .evaluation(evaluation_interval=1, evaluation_num_env_runners=1, evaluation_duration=2,
                          evaluation_duration_unit="episodes")
              .fault_tolerance(restart_failed_env_runners=True, delay_between_env_runner_restarts_s=0.0))
    config = remote_envs(config, port=port, connect_timeout=WAIT, lost_timeout=WAIT)
    assert sorted(runner_urls(config).values()) == [f"ws://127.0.0.1:{port + i}/ws" for i in (1, 2, 4)]
    workers = CliWorkers()
    algo = None
    with RunURL(config) as run:
        assert run.url == f"ws://127.0.0.1:{port}/ws"
        try:
            command = ["--url", run.url, "--env", ENV_ID, "--num-envs", "4", "--status-interval", "0"]
            first = [workers.start(*command) for _ in range(3)]
            evaluator = first.pop()  # which of the three ends up evaluating is the run URL's choice
            algo = config.build_algo()
            result = algo.train()
            steps = int(result["env_runners"]["num_env_steps_sampled_lifetime"])
            assert result["evaluation"]["env_runners"]["num_episodes"] >= 2
            urls = envrunner_urls(algo)
            assert sorted(urls) == ["env_runner 1", "env_runner 2", "evaluation 1"]
            assert urls["evaluation 1"] == f"ws://127.0.0.1:{port + 4}/ws"
            evaluation = algo.eval_env_runner_group.foreach_env_runner(
                lambda r: r.env.unwrapped.stats(), local_env_runner=False)[0]
            assert evaluation["run"]["envs_served"] == 4
            evaluating = int(evaluation["workers"][0]["name"].rsplit(":", 1)[1])
            if evaluating != evaluator.pid:  # the first two serve the training EnvRunners, whichever they are
                first = [evaluator if p.pid == evaluating else p for p in first]
            runners = runner_envs(algo)
            assert [r["run"]["envs_served"] for r in runners] == [4, 4]  # one worker each, sent by the run URL
            names = {p.pid: next(r["index"] for r in runners if any(n.endswith(f":{p.pid}") for n in r["worker_names"]))
                     for p in first}
            assert sorted(names.values()) == [1, 2]

            # a PC's worker dies mid-training; the same command starts it again
            victim = first[0]
            victim.kill()
            victim.wait(timeout=30)
            again = workers.start(*command)
            for _ in range(2):
                now = int(algo.train()["env_runners"]["num_env_steps_sampled_lifetime"])
                assert now > steps
                steps = now
            runners = runner_envs(algo)
            hit = next(r for r in runners if r["index"] == names[victim.pid])
            assert hit["run"]["workers_lost"] >= 1 and hit["run"]["envs_served"] == 4
            assert any(n.endswith(f":{again.pid}") for n in hit["worker_names"])
            assert again.poll() is None and first[1].poll() is None

            # an EnvRunner's process dies: RLlib starts it again, on the same port, and the
            # worker it had comes back through the run's URL
            survivor = first[1]
            index = names[survivor.pid]
            pid = next(r["pid"] for r in runners if r["index"] == index)
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + WAIT
            while True:
                assert time.monotonic() < deadline, "the restarted EnvRunner did not get its worker back"
                algo.train()
                if algo.env_runner_group.num_healthy_remote_workers() == 2:
                    runners = runner_envs(algo)
                    back = next(r for r in runners if r["index"] == index)
                    if back["pid"] != pid and back["run"]["envs_served"] == 4:
                        break
            assert any(n.endswith(f":{survivor.pid}") for n in back["worker_names"])  # the same worker process
            assert algo.env_runner_group.num_remote_worker_restarts() >= 1
            assert survivor.poll() is None and again.poll() is None
            now = int(algo.train()["env_runners"]["num_env_steps_sampled_lifetime"])
            assert now > steps
        finally:
            if algo is not None:
                algo.stop()
            workers.close()


def test_through_a_relay_each_envrunner_has_a_room_of_its_own(local_ray, cli_workers):
    relay = RelayProcess()
    algo = None
    try:
        config = (PPOConfig().environment(ENV_ID)
                  .env_runners(num_env_runners=2, num_envs_per_env_runner=4)
                  .training(train_batch_size_per_learner=500, minibatch_size=250, num_epochs=1))
        config = remote_envs(config, relay=relay.url, relay_token=RELAY_TOKEN, connect_timeout=WAIT)
        token = config.env_config[ws_gym.rllib.KEY]["options"]["token"]
        assert token  # one generated token for every room of the run
        algo = config.build_algo()
        urls = envrunner_urls(algo)
        assert sorted(urls) == ["env_runner 1", "env_runner 2"]
        assert len(set(urls.values())) == 2
        assert all(url.startswith(relay.url + "/room/") for url in urls.values())
        for url in urls.values():
            cli_workers.start("--url", url, "--env", ENV_ID, "--num-envs", "4", "--status-interval", "0",
                              env={"WS_GYM_TOKEN": token})
        result = algo.train()
        assert result["env_runners"]["num_env_steps_sampled_lifetime"] >= 500
        runners = runner_envs(algo)
        assert [(r["run"]["envs_served"], r["run"]["workers_connected"]) for r in runners] == [(4, 1), (4, 1)]
        assert {r["url"] for r in runners} == set(urls.values())
    finally:
        if algo is not None:
            algo.stop()
        relay.stop()


def test_through_a_relay_a_restarted_envrunner_gets_its_room_and_worker_back(local_ray, cli_workers):
    relay = RelayProcess()
    algo = None
    try:
        config = (PPOConfig().environment(ENV_ID)
                  .env_runners(num_env_runners=2, num_envs_per_env_runner=4)
                  .training(train_batch_size_per_learner=500, minibatch_size=250, num_epochs=1)
                  .fault_tolerance(restart_failed_env_runners=True, delay_between_env_runner_restarts_s=0.0))
        config = remote_envs(config, relay=relay.url, relay_token=RELAY_TOKEN, connect_timeout=WAIT)
        token = config.env_config[ws_gym.rllib.KEY]["options"]["token"]
        algo = config.build_algo()
        urls = envrunner_urls(algo)
        workers = {name: cli_workers.start("--url", url, "--env", ENV_ID, "--num-envs", "4", "--status-interval",
                                           "0", env={"WS_GYM_TOKEN": token}) for name, url in urls.items()}
        algo.train()
        pid = next(r["pid"] for r in runner_envs(algo) if r["index"] == 1)
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + WAIT
        while True:
            assert time.monotonic() < deadline, "the restarted EnvRunner did not get its worker back"
            algo.train()
            if algo.env_runner_group.num_healthy_remote_workers() == 2:
                back = next(r for r in runner_envs(algo) if r["index"] == 1)
                if back["pid"] != pid and back["run"]["envs_served"] == 4:
                    break
        assert back["url"] == urls["env_runner 1"]  # the same room
        assert any(n.endswith(f":{workers['env_runner 1'].pid}") for n in back["worker_names"])
        assert all(proc.poll() is None for proc in workers.values())
    finally:
        if algo is not None:
            algo.stop()
        relay.stop()
