"""Lost workers: heartbeats, and on_worker_lost="wait" keeping training going.

Real worker processes on 127.0.0.1 are killed, stopped (SIGSTOP, a sleeping
PC) or stalled; the trainer must notice in bounded time and, in wait mode,
keep returning full batches and hand the envs to the next worker that dials in.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import numpy as np
import pytest
from gymnasium.vector import AutoresetMode

import ws_gym
import tests.envs  # noqa: F401

COUNTER = "tests.envs:Counter-v0"


def wait_until(pred, timeout: float, what: str) -> float:
    """Bounded wait for something another process does; returns the time taken."""
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
    return time.monotonic() - t0


def holes(envs) -> list[tuple[int, int]]:
    return [(a, b) for a, b, w in envs._trainer.layout() if w is None]


def step_until(envs, actions, pred, timeout: float, what: str):
    """Step (each step bounded by step_timeout) until ``pred(result)``; return that result."""
    deadline = time.monotonic() + timeout
    while True:
        result = envs.step(actions)
        if pred(result):
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize("mode", [AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP], ids=lambda m: m.value)
def test_wait_mode_truncates_lost_envs_and_a_new_worker_takes_over(cli_workers, mode):
    envs = ws_gym.RemoteVectorEnv(4, env_id=COUNTER, port=0, on_worker_lost="wait", step_timeout=10,
                                  autoreset_mode=mode, connect_timeout=60)
    try:
        workers = [cli_workers.start("--url", envs.url, "--env", COUNTER, "--num-envs", "2") for _ in range(2)]
        envs.reset(seed=0)
        zeros = np.zeros(4, dtype=np.int64)
        for _ in range(3):
            obs, *_ = envs.step(zeros)
        assert obs[:, 0].tolist() == [3, 3, 3, 3]
        # which worker serves envs 2..3?
        victim = next(p for p in workers if envs._trainer.table.slots[2].name.endswith(f":{p.pid}"))
        victim.kill()
        victim.wait(timeout=10)
        for k in range(3):  # full batches; the lost envs end (again) as truncated, last obs kept
            t0 = time.monotonic()
            obs, rew, term, trunc, infos = envs.step(zeros)
            assert time.monotonic() - t0 < 10
            assert obs.shape == (4, 2) and rew.shape == term.shape == trunc.shape == (4,)
            assert obs[:2, 0].tolist() == [4 + k, 4 + k]  # the other worker goes on
            assert obs[2:].tolist() == [[3, 3], [3, 3]]  # last observation kept
            assert rew[2:].tolist() == [0, 0] and term[2:].tolist() == [False, False]
            assert trunc.tolist() == [False, False, True, True]
            assert infos["_worker_lost"].tolist() == [False, False, True, True]
            assert infos["worker_lost"][2:].tolist() == [True, True]
            if mode is AutoresetMode.SAME_STEP:
                assert infos["_final_obs"].tolist() == [False, False, True, True]
                assert infos["final_obs"][2].tolist() == [3, 3]
                assert infos["final_info"]["worker_lost"][2]
        # a new PC dials in: it takes over envs 2..3 with a fresh episode
        cli_workers.start("--url", envs.url, "--env", COUNTER, "--num-envs", "2")
        obs, rew, term, trunc, infos = step_until(
            envs, zeros, lambda r: "worker_lost" not in r[4] or not r[4]["_worker_lost"].any(), 30, "the takeover")
        assert obs[2:].tolist() == [[0, 0], [0, 0]]  # the new envs' first observation
        assert rew[2:].tolist() == [0, 0]
        if mode is AutoresetMode.SAME_STEP:  # this step ends the lost episode and brings the reset
            assert trunc[2:].tolist() == [True, True] and infos["final_obs"][3].tolist() == [3, 3]
        else:  # NEXT_STEP: the step after a truncation is the reset step
            assert trunc[2:].tolist() == [False, False]
        obs, *_ = envs.step(zeros)
        assert obs[2:].tolist() == [[1, 1], [1, 1]]
        assert not holes(envs)
    finally:
        envs.close()


def test_wait_mode_step_timeout_cuts_off_a_stalled_worker(cli_workers):
    envs = ws_gym.RemoteVectorEnv(2, env_id=COUNTER, port=0, on_worker_lost="wait", step_timeout=0.5,
                                  connect_timeout=60)
    try:
        for _ in range(2):
            cli_workers.start("--url", envs.url, "--env", COUNTER)
        envs.reset(seed=0)
        t0 = time.monotonic()
        obs, rew, term, trunc, infos = envs.step(np.array([3, 0]))  # env 0 stalls for 3 s
        took = time.monotonic() - t0
        assert took < 2.5, f"step took {took:.1f} s; step_timeout is 0.5 s"
        assert trunc.tolist() == [True, False] and infos["_worker_lost"].tolist() == [True, False]
        assert obs[1].tolist() == [1, 1]
        # the stalled worker finds its connection gone and dials in again by itself
        obs, *_ = step_until(envs, np.zeros(2, dtype=np.int64),
                             lambda r: "worker_lost" not in r[4], 30, "the stalled worker to rejoin")
        assert obs[0].tolist() == [0, 0]
    finally:
        envs.close()


@pytest.mark.skipif(sys.platform == "win32", reason="SIGSTOP is POSIX")
def test_heartbeat_notices_a_silent_worker(cli_workers):
    """A worker that stops answering (SIGSTOP: a sleeping PC, a pulled cable) is
    cut off within 1.5 heartbeats, without any call in flight."""
    envs = ws_gym.RemoteVectorEnv(2, env_id=COUNTER, port=0, heartbeat=0.5, connect_timeout=60)
    proc = cli_workers.start("--url", envs.url, "--env", COUNTER, "--num-envs", "2")
    try:
        envs.reset(seed=0)
        envs.step(np.zeros(2, dtype=np.int64))
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            took = wait_until(lambda: holes(envs), 10, "the heartbeat to notice")
            assert took < 0.5 * 1.5 + 1.0
            with pytest.raises(ws_gym.WorkerLostError, match="no worker"):
                envs.step(np.zeros(2, dtype=np.int64))
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        # awake again, the worker finds its connection cut and dials in afresh
        obs, _ = envs.reset(seed=1)
        assert obs.tolist() == [[0, 0], [0, 0]]
        assert proc.poll() is None
    finally:
        envs.close()


def test_heartbeat_leaves_a_busy_worker_alone(cli_workers):
    """A step longer than the heartbeat is not mistaken for a dead worker."""
    envs = ws_gym.RemoteVectorEnv(1, env_id=COUNTER, port=0, heartbeat=0.4, step_timeout=20, connect_timeout=60)
    try:
        cli_workers.start("--url", envs.url, "--env", COUNTER)
        envs.reset(seed=0)
        obs, *_ = envs.step(np.array([3]))  # 3 s, many heartbeats long
        assert obs.tolist() == [[1, 1]]
        assert envs.step(np.array([0]))[0].tolist() == [[2, 2]]
    finally:
        envs.close()


def test_wait_mode_restarts_crashed_local_workers_while_stepping():
    envs = ws_gym.RemoteVectorEnv(4, env_id=COUNTER, port=0, local_workers=2, on_worker_lost="wait",
                                  step_timeout=10)
    try:
        envs.reset(seed=0)
        for _ in range(5):  # more crashes than the 3 restarts allowed in "raise" mode
            envs.step(np.array([1, 0, 0, 0]))  # env 0's worker dies
            step_until(envs, np.zeros(4, dtype=np.int64),
                       lambda r: "worker_lost" not in r[4], 60, "the local worker's restart")
        assert not holes(envs)
    finally:
        envs.close()


def test_single_env_wait_mode(cli_workers):
    env = ws_gym.RemoteEnv(COUNTER, port=0, on_worker_lost="wait", step_timeout=10, connect_timeout=60)
    try:
        first = cli_workers.start("--url", env.url, "--env", COUNTER)
        env.reset(seed=0)
        obs, *_ = env.step(0)
        assert obs.tolist() == [1, 1]
        first.kill()
        first.wait(timeout=10)
        obs, rew, term, trunc, info = env.step(0)
        assert (obs.tolist(), rew, term, trunc, info) == ([1, 1], 0.0, False, True, {"worker_lost": True})
        cli_workers.start("--url", env.url, "--env", COUNTER)
        obs, _ = env.reset()  # waits for the new worker
        assert obs.tolist() == [0, 0]
        assert env.step(0)[0].tolist() == [1, 1]
    finally:
        env.close()


def test_a_worker_refused_as_busy_retries(cli_workers):
    """While a client that never finishes its handshake holds the free env, a real
    worker is told "busy" (not "not needed"), retries, and gets in once it is freed."""
    import asyncio
    import threading

    import aiohttp

    from ws_gym import codec
    from ws_gym import protocol as P

    envs = ws_gym.RemoteVectorEnv(1, env_id=COUNTER, port=0, connect_timeout=60)
    envs._trainer.server.ready_timeout = 2.0  # how long a welcomed client may hold its slots
    welcomed, release = threading.Event(), threading.Event()

    async def stuck() -> None:
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(envs.url) as ws:
                await ws.send_bytes(codec.encode(P.HELLO, 0, P.make_hello(None, 1, "stuck")))
                assert codec.decode((await ws.receive(timeout=10)).data).kind == P.WELCOME
                welcomed.set()
                while not release.is_set() and not ws.closed:  # never sends ready
                    await asyncio.sleep(0.05)

    thread = threading.Thread(target=lambda: asyncio.run(stuck()), daemon=True)
    thread.start()
    try:
        assert welcomed.wait(10)
        proc = cli_workers.start("--url", envs.url, "--env", COUNTER)
        obs, _ = envs.reset(seed=0)  # the worker got in after the stuck client was dropped
        assert obs.tolist() == [[0, 0]]
        assert proc.poll() is None
    finally:
        release.set()
        thread.join(10)
        envs.close()
    code, out = cli_workers.finish(proc)
    assert code == 0 and "busy" in out, out


def test_a_worker_notices_a_silent_trainer(cli_workers):
    """A trainer that goes silent (no requests, no heartbeat pings: a dead PC) is
    given up after one heartbeat (a live one sends something every half
    heartbeat), well within 1.5; the worker dials in again and serves again."""
    import asyncio
    import threading

    from aiohttp import web

    from ws_gym import codec
    from ws_gym import protocol as P
    from ws_gym.host import EnvHost

    connections, done = [], threading.Event()
    heartbeat = 0.5

    async def handler(request):
        ws = web.WebSocketResponse(autoping=False)
        await ws.prepare(request)
        connections.append(asyncio.get_running_loop().time())
        hello = codec.decode((await ws.receive(timeout=10)).data)
        assert hello.kind == P.HELLO
        welcome = P.Welcome(env_id=COUNTER, env_kwargs={}, num_envs=1, first_index=0, mode=P.MODE_VECTOR,
                            autoreset_mode="NextStep", max_episode_steps=None, heartbeat=heartbeat)
        await ws.send_bytes(codec.encode(P.WELCOME, 0, P.make_welcome(welcome)))
        assert codec.decode((await ws.receive(timeout=30)).data).kind == P.READY
        await ws.send_bytes(codec.encode(P.ACCEPT, 0, {}))
        if len(connections) >= 2:
            done.set()
        await ws.receive(timeout=30)  # now silent: no request, no ping, until the worker gives up
        return ws

    loop = asyncio.new_event_loop()
    runner_box = {}

    async def start():
        app = web.Application()
        app.router.add_get("/ws", handler)
        runner = web.AppRunner(app, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runner_box["runner"] = runner
        return site._server.sockets[0].getsockname()[1]

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        port = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
        proc = cli_workers.start("--url", f"ws://127.0.0.1:{port}/ws", "--env", COUNTER)
        assert done.wait(30), "the worker did not dial in again"
        gap = connections[1] - connections[0]
        assert heartbeat <= gap < 1.5 * heartbeat + 1.0, gap  # + back-off and a new handshake
        proc.kill()
        code, out = cli_workers.finish(proc)
        assert "sent nothing for 0.5 s" in out, out
    finally:
        if "runner" in runner_box:
            asyncio.run_coroutine_threadsafe(runner_box["runner"].cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


class _HandRolledWorker:
    """A worker's handshake by hand, on a real socket: hello (with a worker id or
    not), welcome, ready, accept; it then answers nothing (a link gone silent)."""

    def __init__(self, url: str) -> None:
        import asyncio
        import threading

        self._asyncio = asyncio
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.url = url
        self.session = None

    def run(self, coro, timeout: float = 20):
        return self._asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def join(self, worker_id=None, num_envs=2):
        """Connect and pass the handshake; returns (ws, welcome or refusal body)."""
        import aiohttp

        from ws_gym import codec
        from ws_gym import protocol as P
        from ws_gym.spaces import space_to_schema
        from tests.envs import CounterEnv

        if self.session is None:
            self.session = aiohttp.ClientSession()
        ws = await self.session.ws_connect(self.url, autoping=False)
        await ws.send_bytes(codec.encode(P.HELLO, 0, P.make_hello(COUNTER, num_envs, "hand", worker_id)))
        msg = codec.decode((await ws.receive(timeout=10)).data)
        if msg.kind == P.REFUSE:
            return ws, msg.body
        welcome = P.parse_welcome(msg.body)
        env = CounterEnv()
        await ws.send_bytes(codec.encode(P.READY, 0, {
            "observation_space": space_to_schema(env.observation_space),
            "action_space": space_to_schema(env.action_space), "render_mode": None, "metadata": {}}))
        assert codec.decode((await ws.receive(timeout=10)).data).kind == P.ACCEPT
        return ws, welcome

    def close(self):
        if self.session is not None:
            self.run(self.session.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def test_a_returning_worker_replaces_its_stale_connection_at_once():
    """A worker dials in again (its link died) before the trainer noticed: the
    trainer cuts the stale connection off, fails what it owed as a lost worker,
    and gives the worker its envs back; never "not needed"."""
    envs = ws_gym.RemoteVectorEnv(4, env_id=COUNTER, port=0, heartbeat=None, step_timeout=30,
                                  connect_timeout=30)
    hand = _HandRolledWorker(envs.url)
    try:
        first, welcome = hand.run(hand.join(num_envs=2))
        other, _ = hand.run(hand.join(num_envs=2))
        assert welcome.worker_id and welcome.first_index in (0, 2)
        trainer = envs._trainer
        wait_until(lambda: trainer.table.covered() == 4, 10, "both connections")
        stale = trainer.table.slots[welcome.first_index]
        call = trainer.submit([(stale, "call", {"name": "spec", "args": [], "kwargs": {}})])  # never answered
        # a newcomer without the id is "not needed", and told so for good
        _, refusal = hand.run(hand.join(num_envs=2))
        assert "not needed" in refusal["reason"] and refusal["retry"] is False
        # the same worker again, presenting its id: admitted to the same envs at once
        t0 = time.monotonic()
        again, rewelcome = hand.run(hand.join(worker_id=welcome.worker_id, num_envs=2))
        assert time.monotonic() - t0 < 5
        assert (rewelcome.worker_id, rewelcome.first_index) == (welcome.worker_id, welcome.first_index)
        with pytest.raises(ws_gym.WorkerLostError, match="dialed in again"):
            trainer.wait(call, 5)  # what the stale connection owed fails at once
        assert not stale.alive and trainer.table.slots[welcome.first_index] is not stale
        # the accept goes out just before the trainer counts the connection in
        wait_until(lambda: trainer.table.covered() == 4, 10, "the returning worker")
        # with every env served, a returning worker is refused for now, not for good
        _, refusal = hand.run(hand.join(worker_id="f" * 32, num_envs=2))
        assert "not needed" in refusal["reason"] and refusal["retry"] is True
    finally:
        envs.close()
        hand.close()


@pytest.mark.parametrize("single", [False, True], ids=["vector", "single"])
def test_raise_mode_a_new_worker_after_a_loss_means_worker_lost_not_reset_needed(cli_workers, single):
    """Envs a new worker brings are fresh: the next step raises WorkerLostError
    (which says to call reset()), as if the loss had been seen in time."""
    if single:
        envs = ws_gym.RemoteEnv(COUNTER, port=0, connect_timeout=60)
    else:
        envs = ws_gym.RemoteVectorEnv(2, env_id=COUNTER, port=0, connect_timeout=60)
    action = 0 if single else np.zeros(2, dtype=np.int64)
    try:
        first = cli_workers.start("--url", envs.url, "--env", COUNTER, "--num-envs", "2")
        envs.reset(seed=0)
        envs.step(action)
        first.kill()
        first.wait(timeout=10)
        trainer = envs._trainer
        wait_until(lambda: trainer.table.covered() == 0, 10, "the loss")
        cli_workers.start("--url", envs.url, "--env", COUNTER, "--num-envs", "2")
        wait_until(lambda: trainer.table.covered() == (1 if single else 2), 30, "the new worker")
        for _ in range(2):  # until reset(), as any lost worker
            with pytest.raises(ws_gym.WorkerLostError, match="call reset"):
                envs.step(action)
        obs, _ = envs.reset(seed=5)
        assert np.asarray(obs).tolist() == ([0, 0] if single else [[0, 0], [0, 0]])
        assert np.asarray(envs.step(action)[0]).tolist() == ([1, 1] if single else [[1, 1], [1, 1]])
    finally:
        envs.close()


def test_step_timeout_names_only_the_workers_that_did_not_answer(cli_workers):
    envs = ws_gym.RemoteVectorEnv(2, env_id=COUNTER, port=0, step_timeout=0.5, connect_timeout=60)
    try:
        for name in ("slowpc", "quickpc"):
            cli_workers.start("--url", envs.url, "--env", COUNTER, "--name", name)
        envs.reset(seed=0)
        slow = envs._trainer.table.slots[0].name
        with pytest.raises(ws_gym.StepTimeoutError) as info:
            envs.step(np.array([3, 0]))  # env 0 takes 3 s
        assert f"worker {slow} " in str(info.value)
        assert str(info.value).count("worker ") == 1, str(info.value)
    finally:
        envs.close()


@pytest.mark.skipif(sys.platform == "win32", reason="SIGSTOP is POSIX")
def test_wait_mode_first_reset_waits_for_a_replacement_of_a_worker_lost_during_it(cli_workers):
    """No last observation exists to hold for a lost env before the first reset:
    the reset waits for a new worker, resets again, and the steps that follow
    are whole batches (no ValueError from joining nothing)."""
    import threading

    envs = ws_gym.RemoteVectorEnv(4, env_id=COUNTER, port=0, on_worker_lost="wait", step_timeout=30,
                                  connect_timeout=60)
    try:
        procs = [cli_workers.start("--url", envs.url, "--env", COUNTER, "--num-envs", "2") for _ in range(2)]
        trainer = envs._trainer
        wait_until(lambda: trainer.table.covered() == 4, 30, "both workers")
        victim = next(p for p in procs if trainer.table.slots[0].name.endswith(f":{p.pid}"))
        os.kill(victim.pid, signal.SIGSTOP)  # its reset stays in flight
        result = {}
        thread = threading.Thread(target=lambda: result.update(r=envs.reset(seed=3)), daemon=True)
        thread.start()
        wait_until(lambda: trainer.table.slots[0] is not None and trainer.table.slots[0].pending, 10, "the reset in flight")
        victim.kill()
        victim.wait(timeout=10)
        cli_workers.start("--url", envs.url, "--env", COUNTER, "--num-envs", "2")
        thread.join(60)
        assert not thread.is_alive() and "r" in result
        obs, infos = result["r"]
        assert obs.tolist() == [[0, 0]] * 4 and "worker_lost" not in infos
        obs, rew, term, trunc, infos = envs.step(np.zeros(4, dtype=np.int64))
        assert obs.tolist() == [[1, 1]] * 4 and not trunc.any() and "worker_lost" not in infos
    finally:
        envs.close()
