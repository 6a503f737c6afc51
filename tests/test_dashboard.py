"""The trainer's dashboard: ``/status``, ``/metrics``, ``envs.stats()`` and who may read them.

The statistics core (ws_gym.stats, ws_gym.metrics) is tested first without
sockets, against gymnasium's own RecordEpisodeStatistics; then real trainers
and real worker processes on 127.0.0.1: the numbers ``/status`` gives equal
what the test did and what the reference ``SyncVectorEnv`` finished with the
same seeds and actions; ``/metrics`` parses with ``prometheus_client``;
tokens are enforced off loopback (which, on 127.0.0.1, is a request with a
proxy's ``X-Forwarded-For`` header: the trainer must not take it for a local
one).
"""

from __future__ import annotations

import functools
import http.client
import json
import logging
import re
import socket
import ssl
import threading
import time
from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.vector import AutoresetMode
from gymnasium.wrappers import RecordEpisodeStatistics
from prometheus_client.parser import text_string_to_metric_families

import ws_gym
from ws_gym import metrics
from ws_gym.compact import StepCodec
from ws_gym.connection import WorkerState
from ws_gym.stats import RunCounters, Stats

from .test_security import make_cert

ENV = "CartPole-v1"
TOKEN = "dashboard-token-for-tests-0123456789"
# /status's fields, as the README documents them: a schema keeps them
RUN_FIELDS = {
    "env_id", "num_envs", "autoreset_mode", "mode", "url", "worker_command", "dashboard_url", "started_at",
    "uptime_s", "steps", "env_steps", "env_steps_per_s", "env_steps_per_s_mean", "resets", "episodes",
    "episode_return_mean", "episode_length_mean", "episode_window", "lost_env_steps", "envs_served",
    "workers_connected", "workers_lost", "reconnects",
}
WORKER_FIELDS = {
    "id", "name", "address", "envs", "first_env", "num_envs", "state", "connected_since", "connected_s",
    "rtt_ms", "env_steps_per_s", "env_steps", "replies", "last_error", "slow", "compression",
    "compressed_ratio",
}

TIMED_RUN = {"uptime_s", "env_steps_per_s", "env_steps_per_s_mean"}
TIMED_WORKER = {"connected_s", "env_steps_per_s", "rtt_ms", "slow"}


# ----------------------------------------------------------------- helpers

def untimed(fields: dict, timed: set) -> dict:
    return {k: v for k, v in fields.items() if k not in timed}


def fetch(url: str, path: str = "status", headers: dict | None = None,
          context: ssl.SSLContext | None = None) -> tuple[int, http.client.HTTPResponse, bytes]:
    """One GET, redirects not followed: (status, response, body)."""
    match = re.match(r"(https?)://([^/:]+):(\d+)(/.*)$", url)
    assert match, url
    scheme, host, port, base = match.groups()
    host = "127.0.0.1" if host not in ("127.0.0.1", "localhost") else host  # only ever 127.0.0.1
    if scheme == "https":
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(host, int(port), timeout=10, context=context)
    else:
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", base + path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response, response.read()
    finally:
        conn.close()


def status(envs, headers: dict | None = None) -> dict:
    code, _, body = fetch(envs.unwrapped.dashboard_url, "status", headers)
    assert code == 200, body
    return json.loads(body)


def scrape(envs) -> dict[str, list]:
    """``/metrics`` parsed by prometheus_client: {name: [(labels, value)]}."""
    code, response, body = fetch(envs.unwrapped.dashboard_url, "metrics")
    assert code == 200 and response.getheader("Content-Type").startswith("text/plain; version=0.0.4")
    found: dict[str, list] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((sample.labels, sample.value))
    return found


def wait_until(check, timeout: float = 30.0, what: str = "a condition"):
    """Poll ``check()`` until it returns something true; bounded."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        time.sleep(0.05)


def fake_conn(cid: int, start: int, count: int, **fields) -> SimpleNamespace:
    conn = SimpleNamespace(cid=cid, name=f"w{cid}", peer="192.0.2.1", start=start, count=count,
                           state=WorkerState.ACTIVE, step_requests=0, replies=0, rtt_total=0.0, last_error="",
                           since=0.0, worker_id=f"id{cid}", compression="none", codec=StepCodec())
    conn.__dict__.update(fields)
    return conn


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# ------------------------------------------------------ the core, no sockets

def reference_episodes(mode: AutoresetMode, steps: int, seed: int = 3, num_envs: int = 4):
    """SyncVectorEnv with RecordEpisodeStatistics in every env, and our counters
    fed its results: (counters, the reference's episode returns and lengths)."""
    ref = gym.make_vec(ENV, num_envs, vectorization_mode="sync", vector_kwargs={"autoreset_mode": mode},
                       wrappers=[RecordEpisodeStatistics])
    counters = RunCounters(num_envs, mode.value, window=50)
    returns, lengths = [], []
    try:
        ref.reset(seed=seed)
        counters.reset()
        ref.action_space.seed(seed)
        for t in range(steps):
            _, r, term, trunc, infos = ref.step(ref.action_space.sample())
            counters.step(r, term, trunc, infos)
            info = infos["final_info"] if mode is AutoresetMode.SAME_STEP and "final_info" in infos else infos
            if "episode" in info:
                ended = info["_episode"]
                returns += list(info["episode"]["r"][ended])
                lengths += list(info["episode"]["l"][ended])
            done = term | trunc
            if mode is AutoresetMode.DISABLED and done.any():
                ref.reset(options={"reset_mask": done})
                counters.reset(done)
    finally:
        ref.close()
    return counters, returns, lengths


@pytest.mark.parametrize("mode", list(AutoresetMode), ids=lambda m: m.value)
def test_counters_equal_record_episode_statistics(mode):
    counters, returns, lengths = reference_episodes(mode, 400)
    assert counters.steps == 400 and counters.env_steps == 1600
    assert counters.episodes == len(returns) > 50  # more than the window: the ring wrapped
    mean_return, mean_length, window = counters.means()
    assert window == 50
    assert mean_return == pytest.approx(np.mean(returns[-50:]))
    assert mean_length == pytest.approx(np.mean(lengths[-50:]))


def test_lost_envs_end_no_episode():
    """Wait mode: an env without a worker returns truncated=True with
    ``worker_lost`` on every step; that is no episode, and its steps count apart."""
    c = RunCounters(3, "NextStep")
    c.reset()
    one, no, yes = np.ones(3), np.zeros(3, bool), np.ones(3, bool)
    c.step(one, no, no, {})
    lost = np.array([False, True, False])
    c.step(one, no, lost, {"worker_lost": lost, "_worker_lost": lost})  # env 1's worker is gone
    c.step(one, no, lost, {"worker_lost": lost, "_worker_lost": lost})
    c.step(one, no, yes, {"worker_lost": lost, "_worker_lost": lost})  # envs 0 and 2 end after 4 steps
    assert (c.episodes, c.lost_env_steps) == (2, 3)
    assert c.means() == (4.0, 4.0, 2)


def test_single_env_counters():
    c = RunCounters(1)
    c.reset()
    for _ in range(3):
        c.step_one(1.5, False)
    c.step_one(1.5, True)
    c.step_one(0.0, True, lost=True)  # a lost worker's truncation: no episode
    c.reset()
    c.step_one(2.0, True)
    assert (c.steps, c.env_steps, c.episodes, c.lost_env_steps) == (6, 6, 2, 1)
    assert c.means() == (4.0, 2.5, 2)


def test_sampler_rates_round_trips_and_departures():
    clock, run = FakeClock(), RunCounters(4)
    stats = Stats(run, clock=clock, wall=lambda: 1_000_000.0 + clock.now, history=5)
    a, b = fake_conn(1, 0, 2), fake_conn(2, 2, 2, worker_id="id-b")
    for conn in (a, b):
        stats.joined(conn)
    stats.sample([a, b])
    for _ in range(10):  # a second of 100 steps: a answers in 1 ms, b in 4 ms
        clock.now += 1.0
        run.env_steps += 400
        for conn, rtt in ((a, 0.001), (b, 0.004)):
            conn.step_requests += 100
            conn.replies += 100
            conn.rtt_total += 100 * rtt
        stats.sample([a, b])
    snap = stats.snapshot([b, a])
    assert snap["run"]["env_steps_per_s"] == 400.0 and snap["run"]["env_steps_per_s_mean"] == 400.0
    assert [w["name"] for w in snap["workers"]] == ["w1", "w2"]  # in env order
    wa, wb = snap["workers"]
    assert (wa["rtt_ms"], wb["rtt_ms"]) == (1.0, 4.0)
    assert (wa["env_steps_per_s"], wa["env_steps"], wa["envs"]) == (200.0, 2000, "0..1")
    assert (wa["slow"], wb["slow"]) == (False, True)  # twice the others' round trip
    assert len(snap["history"]["t"]) == 5  # bounded: the newest kept
    assert snap["history"]["env_steps_per_s"][-1] == 400.0
    # b's link dies; it dials in again with the id it was given
    b.state = WorkerState.LOST
    stats.lost(b, "worker w2 disconnected")
    again = fake_conn(3, 2, 2, worker_id="id-b")
    stats.joined(again)
    snap = stats.snapshot([a, again])
    assert (snap["run"]["workers_lost"], snap["run"]["reconnects"]) == (1, 1)
    assert [(d["name"], d["state"], d["last_error"]) for d in snap["departed"]] == [
        ("w2", "lost", "worker w2 disconnected")]
    assert set(snap["workers"][0]) == WORKER_FIELDS and RUN_FIELDS <= set(snap["run"])
    json.dumps(snap, allow_nan=False)  # plain JSON


def test_metrics_parse_and_escape_hostile_names():
    run = RunCounters(2)
    stats = Stats(run, describe=lambda: {"env_id": 'odd"env\\', "autoreset_mode": "NextStep"})
    hostile = 'evil" } 1\nws_gym_fake 9 \\ <script>'
    conns = [fake_conn(1, 0, 1, name=hostile, step_requests=7, replies=8, rtt_total=0.008),
             fake_conn(2, 1, 1, state=WorkerState.JOINING)]  # not active yet: no series
    run.steps, run.env_steps = 7, 14
    text = metrics.render(stats.snapshot(conns))
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert "ws_gym_fake" not in families
    assert families["ws_gym_env_steps"].type == "counter"
    assert families["ws_gym_env_steps"].samples[0].value == 14
    assert families["ws_gym_info"].samples[0].labels["env_id"] == 'odd"env\\'
    assert np.isnan(families["ws_gym_episode_return_mean"].samples[0].value)  # no episode yet
    (sample,) = families["ws_gym_worker_env_steps"].samples
    assert sample.labels == {"worker": hostile, "conn": "1"} and sample.value == 7
    assert families["ws_gym_worker_rtt_seconds"].samples[0].value == pytest.approx(0.001)


# ------------------------------------------------- real trainers and workers

@pytest.mark.parametrize("mode", [AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP], ids=lambda m: m.value)
def test_status_numbers_equal_what_the_test_did(mode):
    steps, n = 300, 8
    envs = gym.make_vec("ws_gym/Remote-v0", num_envs=n, env_id=ENV, local_workers=2, port=0,
                        autoreset_mode=mode, connect_timeout=60)
    ref = gym.make_vec(ENV, n, vectorization_mode="sync", vector_kwargs={"autoreset_mode": mode},
                       wrappers=[RecordEpisodeStatistics])
    try:
        assert status(envs)["run"]["steps"] == 0
        envs.reset(seed=11)
        ref.reset(seed=11)
        ref.action_space.seed(11)
        returns, lengths = [], []
        for _ in range(steps):
            actions = ref.action_space.sample()
            envs.step(actions)
            _, _, _, _, infos = ref.step(actions)
            info = infos.get("final_info", {}) if mode is AutoresetMode.SAME_STEP else infos
            if "episode" in info:
                returns += list(info["episode"]["r"][info["_episode"]])
                lengths += list(info["episode"]["l"][info["_episode"]])
        got = status(envs)
        run = got["run"]
        assert got["schema"] == 1 and RUN_FIELDS <= set(run)
        assert (run["env_id"], run["num_envs"], run["autoreset_mode"], run["mode"]) == (ENV, n, mode.value, "vector")
        assert (run["steps"], run["env_steps"], run["resets"]) == (steps, steps * n, 1)
        assert run["episodes"] == len(returns) > 0
        assert run["episode_window"] == min(100, len(returns))
        assert run["episode_return_mean"] == pytest.approx(np.mean(returns[-100:]), abs=1e-3)
        assert run["episode_length_mean"] == pytest.approx(np.mean(lengths[-100:]), abs=1e-3)
        assert (run["workers_connected"], run["envs_served"], run["workers_lost"], run["lost_env_steps"]) == (
            2, n, 0, 0)
        assert run["url"] == envs.unwrapped.url and "--env CartPole-v1" in run["worker_command"]
        workers = got["workers"]
        assert sorted(w["name"] for w in workers) == ["local-0", "local-1"]
        assert [(w["envs"], w["state"], w["env_steps"], w["replies"]) for w in workers] == [
            ("0..3", "active", steps * 4, steps + 1), ("4..7", "active", steps * 4, steps + 1)]
        assert all(w["rtt_ms"] > 0 and w["connected_s"] >= 0 and set(w) == WORKER_FIELDS for w in workers)
        # envs.stats() is the same snapshot (but for what the clock and the sampler change)
        mine = envs.unwrapped.stats()
        assert untimed(mine["run"], TIMED_RUN) == untimed(run, TIMED_RUN)
        assert [untimed(w, TIMED_WORKER) for w in mine["workers"]] == [untimed(w, TIMED_WORKER) for w in workers]
        # /metrics: the same numbers, parsed by prometheus_client
        found = scrape(envs)
        assert found["ws_gym_env_steps_total"] == [({}, steps * n)]
        assert found["ws_gym_episodes_total"] == [({}, len(returns))]
        assert found["ws_gym_steps_total"] == [({}, steps)]
        assert sorted((labels["worker"], value) for labels, value in found["ws_gym_worker_env_steps_total"]) == [
            ("local-0", steps * 4), ("local-1", steps * 4)]
        # Jupyter's table names the workers
        page = envs.unwrapped._repr_html_()
        assert "local-0" in page and "local-1" in page and f"{steps * n:,} env-steps" in page
    finally:
        envs.close()
        ref.close()
    with pytest.raises(gym.error.ClosedEnvironmentError):
        envs.unwrapped.stats()
    assert "closed" in envs.unwrapped._repr_html_()


def test_single_remote_env_counts_its_episodes():
    env = gym.make("ws_gym/Remote-v0", env_id=ENV, local_workers=1, port=0, connect_timeout=60)
    ref = gym.make(ENV)
    try:
        env.reset(seed=4)
        ref.reset(seed=4)
        lengths, length = [], 0
        while len(lengths) < 3:
            action = len(lengths) % 2
            env.step(action)
            _, _, term, trunc, _ = ref.step(action)
            length += 1
            if term or trunc:
                lengths.append(length)
                length = 0
                env.reset()
                ref.reset()
        run = env.unwrapped.stats()["run"]
        assert (run["mode"], run["steps"], run["episodes"], run["resets"]) == ("single", sum(lengths), 3, 4)
        assert run["episode_length_mean"] == pytest.approx(np.mean(lengths), abs=1e-3)
        assert run["episode_return_mean"] == run["episode_length_mean"]  # CartPole: 1 per step
    finally:
        env.close()
        ref.close()


def test_tokens_are_enforced_off_loopback():
    envs = ws_gym.RemoteVectorEnv(2, env_id=ENV, port=0, token=TOKEN)
    url = envs.dashboard_url
    proxied = {"X-Forwarded-For": "203.0.113.7"}  # a proxy on this machine: not a local client
    try:
        assert url.startswith("http://127.0.0.1:") and url.endswith("/")
        for path in ("", "status", "metrics"):
            assert fetch(url, path)[0] == 200  # loopback: open
            code, response, body = fetch(url, path, proxied)
            assert code == 401 and b"CartPole" not in body and b"ws_gym_" not in body
            assert response.getheader("WWW-Authenticate") == 'Bearer realm="ws_gym"'
            assert fetch(url, path, {**proxied, "Forwarded": "for=198.51.100.1"})[0] == 401
            assert fetch(url, path, {**proxied, "X-WS-Gym-Token": "wrong"})[0] == 401
            assert fetch(url, path, {**proxied, "X-WS-Gym-Token": TOKEN})[0] == 200
            assert fetch(url, path, {**proxied, "Authorization": f"Bearer {TOKEN}"})[0] == 200
            assert fetch(url, path, {**proxied, "Authorization": "Bearer wrong"})[0] == 401
        # ?token= once: a cookie that stands for it, and the same URL without the token
        assert fetch(url, "status?token=wrong", proxied)[0] == 401
        code, response, _ = fetch(url, f"status?token={TOKEN}&x=1", proxied)
        assert code == 303 and response.getheader("Location") == "status?x=1"
        assert fetch(url, f"?token={TOKEN}", proxied)[1].getheader("Location") == "./"
        cookie = response.getheader("Set-Cookie")
        assert re.fullmatch(r"ws_gym_dashboard=[0-9a-f]{64}; HttpOnly; SameSite=Strict", cookie), cookie
        assert TOKEN not in cookie
        jar = {"Cookie": cookie.split(";")[0]}
        assert fetch(url, "status", {**proxied, **jar})[0] == 200
        assert fetch(url, "metrics", {**proxied, **jar})[0] == 200
        assert fetch(url, "status", {**proxied, "Cookie": "ws_gym_dashboard=" + "0" * 64})[0] == 401
        # behind a TLS-terminating proxy the cookie is Secure
        _, response, _ = fetch(url, f"?token={TOKEN}", {**proxied, "X-Forwarded-Proto": "https"})
        assert response.getheader("Set-Cookie").endswith("; Secure")
    finally:
        envs.close()


def test_a_generated_token_shows_only_to_who_presented_it():
    envs = ws_gym.RemoteVectorEnv(2, env_id=ENV, host="0.0.0.0", port=0)  # connections go to 127.0.0.1
    try:
        token = envs.token
        assert envs._trainer.token_generated and token
        local = status(envs)["run"]["worker_command"]
        assert token not in local and "WS_GYM_TOKEN=<envs.token> python -m ws_gym.worker" in local
        full = status(envs, {"X-WS-Gym-Token": token})["run"]["worker_command"]
        assert full == envs._trainer.worker_command() and f"WS_GYM_TOKEN={token} " in full
        assert envs.stats()["run"]["worker_command"] == full
    finally:
        envs.close()


def test_a_trainer_without_a_token():
    envs = ws_gym.RemoteVectorEnv(2, env_id=ENV, port=0)  # loopback, no token
    off = ws_gym.RemoteVectorEnv(2, env_id=ENV, port=0, token="")  # tokens off on purpose
    proxied = {"X-Forwarded-For": "203.0.113.7"}
    try:
        assert envs.token is None
        assert fetch(envs.dashboard_url, "status")[0] == 200
        code, _, body = fetch(envs.dashboard_url, "status", proxied)
        assert code == 403 and b"CartPole" not in body  # as for workers: a proxy needs a token
        assert fetch(off.dashboard_url, "status", proxied)[0] == 200
    finally:
        envs.close()
        off.close()


def test_over_tls_the_cookie_is_secure(tmp_path):
    certfile, keyfile, _ = make_cert(tmp_path, "trainer")
    envs = ws_gym.RemoteVectorEnv(2, env_id=ENV, port=0, certfile=certfile, keyfile=keyfile, token=TOKEN)
    context = ssl.create_default_context(cafile=certfile)
    try:
        url = envs.dashboard_url
        assert url.startswith("https://127.0.0.1:")
        code, response, _ = fetch(url, f"status?token={TOKEN}", {"X-Forwarded-For": "203.0.113.7"}, context)
        assert code == 303 and response.getheader("Set-Cookie").endswith("; HttpOnly; SameSite=Strict; Secure")
        assert fetch(url, "status", context=context)[0] == 200
    finally:
        envs.close()


def test_lost_workers_reconnects_and_errors_show(cli_workers):
    envs = ws_gym.RemoteVectorEnv(3, env_id="tests.envs:Crash-v0", port=0, on_worker_lost="wait",
                                  connect_timeout=60, step_timeout=30)
    try:
        for name in ("pc-a", "pc-b", "pc-c"):
            cli_workers.start("--url", envs.url, "--env", "tests.envs:Crash-v0", "--num-envs", "1", "--name", name)
        envs.reset(seed=0)
        names = {w["name"]: w for w in envs.stats()["workers"]}
        assert set(names) == {"pc-a", "pc-b", "pc-c"}
        # an env raises: its worker's last error
        a = names["pc-a"]["first_env"]
        actions = np.zeros(3, dtype=np.int64)
        actions[a] = 2
        with pytest.raises(ws_gym.RemoteEnvError):
            envs.step(actions)
        assert {w["name"]: w["last_error"] for w in envs.stats()["workers"]}["pc-a"] == (
            "ValueError: action 2 is not allowed here")
        envs.reset(seed=1)
        # pc-b's process dies mid-step: lost, its env truncated with worker_lost from then on
        b = names["pc-b"]["first_env"]
        actions = np.zeros(3, dtype=np.int64)
        actions[b] = 1
        envs.step(actions)
        for _ in range(3):
            envs.step(np.zeros(3, dtype=np.int64))
        run = envs.stats()["run"]
        assert (run["workers_lost"], run["workers_connected"], run["envs_served"]) == (1, 2, 2)
        assert run["lost_env_steps"] == 4 and run["episodes"] == 0  # its truncations end no episode
        (gone,) = envs.stats()["departed"]
        assert gone["name"] == "pc-b" and gone["state"] == "lost" and "pc-b" in gone["last_error"]
        # pc-a's link is cut: its process lives, dials in again with its id: a reconnect
        trainer = envs._trainer
        conn = next(c for c in trainer.table.conns if c.name == "pc-a")
        cut = functools.partial(trainer.server.drop, conn, "cut by the test", cut_off=True)
        trainer.server._loop.call_soon_threadsafe(cut)
        wait_until(lambda: envs.stats()["run"]["reconnects"] == 1, what="pc-a dialing in again")
        snap = wait_until(lambda: (s := envs.stats())["run"]["envs_served"] == 2 and s, what="pc-a serving")
        assert snap["run"]["workers_lost"] == 2
        assert [d["name"] for d in snap["departed"]] == ["pc-b", "pc-a"]
    finally:
        envs.close()


def test_hostile_worker_names_stay_text(cli_workers):
    name = 'pc "x" \\ <img src=x onerror=alert(1)>\nws_gym_fake 1'
    envs = ws_gym.RemoteVectorEnv(1, env_id=ENV, port=0, connect_timeout=60)
    try:
        cli_workers.start("--url", envs.url, "--env", ENV, "--num-envs", "1", "--name", name)
        envs.reset(seed=0)
        envs.step(np.zeros(1, dtype=np.int64))
        (worker,) = status(envs)["workers"]
        assert worker["name"] == name
        found = scrape(envs)
        assert "ws_gym_fake" not in found
        assert found["ws_gym_worker_replies_total"] == [({"worker": name, "conn": str(worker["id"])}, 2.0)]
        page = envs._repr_html_()
        assert "<img" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    finally:
        envs.close()


def test_slow_and_silent_clients_do_not_stall_stepping():
    """Clients that send half a request, or ask and never read, cost the
    stepping nothing it waits for: the loop never blocks on them."""
    envs = gym.make_vec("ws_gym/Remote-v0", num_envs=4, env_id=ENV, local_workers=2, port=0,
                        connect_timeout=60, step_timeout=10)
    port = int(envs.unwrapped.dashboard_url.rsplit(":", 1)[1].strip("/"))
    hangers: list[socket.socket] = []
    stop = threading.Event()
    polled = [0]

    def hammer() -> None:  # as fast as it can, from another thread
        while not stop.is_set():
            assert fetch(envs.unwrapped.dashboard_url, "status")[0] == 200
            polled[0] += 1

    try:
        envs.reset(seed=0)
        for i in range(40):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
            s.connect(("127.0.0.1", port))
            # half a request, or whole ones (pipelined) whose answers are never read
            s.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\n" if i % 2 else b"GET /status HTTP/1.1\r\n\r\n" * 50)
            hangers.append(s)
        thread = threading.Thread(target=hammer, daemon=True)
        thread.start()
        start = time.monotonic()
        for _ in range(500):
            envs.step(envs.action_space.sample())
        took = time.monotonic() - start
        stop.set()
        thread.join(timeout=20)
        assert polled[0] > 0 and took < 30, (polled[0], took)
        assert status(envs)["run"]["env_steps"] == 500 * 4
    finally:
        stop.set()
        for s in hangers:
            s.close()
        envs.close()


def test_with_a_relay_the_dashboard_has_a_loopback_port_of_its_own(cli_workers, caplog, capsys):
    from .test_relay import TOKEN as RELAY_TOKEN, RelayProcess

    caplog.set_level(logging.INFO, logger="ws_gym")
    relay = RelayProcess()
    opened = []
    try:
        envs = gym.make_vec("ws_gym/Remote-v0", num_envs=3, env_id=ENV, relay=relay.url, relay_token=RELAY_TOKEN,
                            connect_timeout=60)
        opened.append(envs)
        url = envs.unwrapped.dashboard_url
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/", url)
        printed = caplog.text + capsys.readouterr().err  # through logging when it is set up, else stderr
        assert printed.count(f"dashboard: {url}") == 1, printed
        for name, count in (("via-relay-a", 1), ("via-relay-b", 2)):
            cli_workers.start("--url", envs.unwrapped.url, "--env", ENV, "--num-envs", str(count), "--name", name,
                              env={"WS_GYM_TOKEN": envs.unwrapped.token})
        envs.reset(seed=0)
        envs.step(np.zeros(3, dtype=np.int64))
        got = status(envs)
        assert sorted(w["name"] for w in got["workers"]) == ["via-relay-a", "via-relay-b"]
        assert all(w["address"].endswith("via proxy 127.0.0.1") for w in got["workers"])  # the relay forwarded them
        assert got["run"]["url"] == envs.unwrapped.url and "<envs.token>" in got["run"]["worker_command"]
        proxied = {"X-Forwarded-For": "203.0.113.7"}
        assert fetch(url, "status", proxied)[0] == 401
        assert fetch(url, "status", {**proxied, "X-WS-Gym-Token": envs.unwrapped.token})[0] == 200
        # the server the relay's connections reach (here local workers dial it) serves no dashboard
        local = gym.make_vec("ws_gym/Remote-v0", num_envs=1, env_id=ENV, relay=relay.url, relay_token=RELAY_TOKEN,
                             local_workers=1, connect_timeout=60)
        opened.append(local)
        port = local.unwrapped._trainer.server.port
        assert port is not None and f":{port}/" not in local.unwrapped.dashboard_url
        assert fetch(f"http://127.0.0.1:{port}/", "status")[0] == 404
        assert fetch(f"http://127.0.0.1:{port}/", "")[0] == 404
        assert fetch(local.unwrapped.dashboard_url, "status")[0] == 200
    finally:
        for envs in opened:
            envs.close()
        relay.stop()


def test_dashboard_port_is_for_relays_only():
    with pytest.raises(ValueError, match="dashboard_port"):
        ws_gym.RemoteVectorEnv(1, env_id=ENV, port=0, dashboard_port=0)
    for bad in (-1, 70000, "8080", True):
        with pytest.raises(ValueError, match="dashboard_port"):
            ws_gym.RemoteVectorEnv(1, env_id=ENV, relay="ws://127.0.0.1:9", relay_token="t", dashboard_port=bad)
