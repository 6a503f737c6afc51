"""A relay with TLS, behind HTTP proxies and behind a TLS-terminating reverse proxy.

Real processes on 127.0.0.1 only: ``python -m ws_gym.relay`` (with
``--certfile`` for ``wss://``, or plain behind nginx), a trainer made with
``relay=``, ``python -m ws_gym.worker`` processes, the in-process HTTP CONNECT
proxy of tests/connect_proxy.py and an nginx in the foreground. Certificates
are made fresh (tests/test_security.py's ``make_cert``, for localhost and
127.0.0.1); everyone dials ``localhost``, so host names are checked.

- TLS: the workers' ``--cafile``/``--cert-fingerprint``/``--insecure`` apply to
  the relay's certificate, and a certificate they do not trust ends them
  (exit code 5); the trainer verifies the relay with ``relay_cafile=``.
- HTTP proxies: a worker's ``--proxy`` and the trainer's ``relay_proxy=``
  tunnel to the ``wss://`` relay with CONNECT; ``HTTPS_PROXY`` is never used
  for a loopback relay.
- nginx terminating TLS in front of a plain relay, under a path prefix that it
  strips (``/gym/``) or keeps (``/keep/``): the relay matches routes by their
  end. Where nginx is missing the nginx tests skip; with CI=true they fail.

Every run is compared exactly with ``gym.make_vec(..., vectorization_mode="sync")``.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time

import gymnasium as gym
import pytest
from gymnasium.vector import AutoresetMode

import ws_gym
from ws_gym.config import RemoteConfig
from ws_gym.protocol import EXIT_NOT_FOUND, EXIT_OK, EXIT_UNTRUSTED

from .conftest import ROOT, free_port
from .connect_proxy import ConnectProxy
from .test_equivalence import step_side_by_side
from .test_relay import TOKEN, RelayProcess
from .test_security import make_cert

MODE = AutoresetMode.NEXT_STEP
EPISODE = 15  # max_episode_steps: the runs cross episode ends
STEPS = 35


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """(relay's certificate, another one): each (certfile, keyfile, sha256 hex)."""
    directory = tmp_path_factory.mktemp("relay-tls")
    return make_cert(directory, "relay"), make_cert(directory, "someone-else")


@pytest.fixture(scope="module")
def tls_relay(certs):
    certfile, keyfile, _ = certs[0]
    relay = RelayProcess(0, "--certfile", certfile, "--keyfile", keyfile)
    try:
        assert relay.url.startswith("wss://"), relay.output()
        yield relay
    finally:
        relay.stop()


@pytest.fixture
def proxy():
    p = ConnectProxy().start()
    yield p
    p.close()


def trainer(relay_url: str, num_envs: int, **options) -> ws_gym.RemoteVectorEnv:
    return gym.make_vec("ws_gym/Remote-v0", num_envs=num_envs, env_id="CartPole-v1", relay=relay_url,
                        relay_token=TOKEN, autoreset_mode=MODE, max_episode_steps=EPISODE, connect_timeout=30,
                        **options)


def workers(cli_workers, envs, counts, *extra: str, url: str | None = None):
    token = {"WS_GYM_TOKEN": envs.unwrapped.token}
    return [cli_workers.start("--url", url or envs.unwrapped.url, "--num-envs", str(n), *extra, env=token)
            for n in counts]


def equals_sync_vector_env(envs, num_envs: int, cli_workers, relay: RelayProcess) -> None:
    """Reset and step ``envs`` next to SyncVectorEnv, same seeds and actions: equal exactly.

    When the workers do not all arrive, the error carries what the workers and
    the relay said (the workers are killed for it: the test has failed)."""
    ref = gym.make_vec("CartPole-v1", num_envs, vectorization_mode="sync", vector_kwargs={"autoreset_mode": MODE},
                       max_episode_steps=EPISODE)
    try:
        step_side_by_side(envs, ref, MODE, num_envs, STEPS)
    except ws_gym.ConnectTimeoutError as exc:
        said = []
        for proc in cli_workers.procs:
            if proc.stdout is None or proc.stdout.closed:  # finished and read already
                continue
            if proc.poll() is None:
                proc.kill()
            said.append(f"--- worker {' '.join(proc.args[3:])} ({proc.wait(10)}):\n{proc.communicate(timeout=10)[0]}")
        raise AssertionError("\n".join([str(exc), *said, f"--- relay:\n{relay.output()}"])) from None
    finally:
        ref.close()


def localhost(relay: RelayProcess) -> str:
    """The relay's URL by name (its certificate's DNS name), not by the address it printed."""
    return f"{relay.url.partition('://')[0]}://localhost:{relay.port}"


def ended_ok(cli_workers, procs) -> list[str]:
    """Each worker exited 0 once the trainer closed; their outputs."""
    outs = []
    for proc in procs:
        code, out = cli_workers.finish(proc, timeout=30)
        assert code == EXIT_OK, out
        outs.append(out)
    return outs


# ------------------------------------------------------------------------ TLS


def test_tls_relay_with_cafile_equals_sync_vector_env(tls_relay, certs, cli_workers):
    base = localhost(tls_relay)
    envs = trainer(base, 3, relay_cafile=certs[0][0])
    try:
        room = envs.unwrapped._trainer.server.relay.room
        assert envs.unwrapped.url == f"{base}/room/{room}/ws"
        procs = workers(cli_workers, envs, [1, 2], "--cafile", certs[0][0])
        equals_sync_vector_env(envs, 3, cli_workers, tls_relay)
    finally:
        envs.close()
    ended_ok(cli_workers, procs)


@pytest.mark.parametrize("trust", ["system CAs", "another certificate"])
def test_a_worker_that_does_not_trust_the_relay_exits(tls_relay, certs, cli_workers, trust):
    envs = trainer(localhost(tls_relay), 1, relay_cafile=certs[0][0])
    try:
        extra = [] if trust == "system CAs" else ["--cafile", certs[1][0]]
        # no --retry-timeout: a certificate that failed is not retried
        proc, = workers(cli_workers, envs, [1], *extra)
        code, out = cli_workers.finish(proc, timeout=30)
        assert code == EXIT_UNTRUSTED, out
        assert "certificate" in out and "failed verification" in out and "--cafile" in out, out
        assert envs.unwrapped._trainer.table.covered() == 0
    finally:
        envs.close()


def test_cert_fingerprint_and_insecure_apply_to_the_relay(tls_relay, certs, cli_workers):
    relay_cert, other = certs
    envs = trainer(localhost(tls_relay), 2, relay_cafile=relay_cert[0])
    try:
        wrong, = workers(cli_workers, envs, [1], "--cert-fingerprint", other[2])
        code, out = cli_workers.finish(wrong, timeout=30)
        assert code == EXIT_UNTRUSTED, out
        assert "not the expected one" in out and relay_cert[2] in out, out
        pinned = ":".join(relay_cert[2][i:i + 2] for i in range(0, 64, 2)).upper()  # as openssl prints it
        procs = workers(cli_workers, envs, [1], "--cert-fingerprint", pinned)
        procs += workers(cli_workers, envs, [1], "--insecure")
        equals_sync_vector_env(envs, 2, cli_workers, tls_relay)
    finally:
        envs.close()
    outs = ended_ok(cli_workers, procs)
    assert "WARNING --insecure" in outs[1] and "NOT verified" in outs[1], outs[1]
    assert "NOT verified" not in outs[0], outs[0]


_TRAINER_SCRIPT = """
import json, sys, time
import gymnasium as gym
import ws_gym
print("ready", flush=True)
started = time.monotonic()
try:
    gym.make_vec("ws_gym/Remote-v0", num_envs=1, env_id="CartPole-v1", relay=sys.argv[1],
                 relay_token=sys.argv[2], relay_cafile=sys.argv[3])
    result = {"error": None}
except Exception as exc:
    result = {"error": type(exc).__name__, "message": str(exc)}
result["seconds"] = time.monotonic() - started
print(json.dumps(result), flush=True)
"""
PROMPT = 5.0  # seconds: a worker exits at once on a certificate that fails; retrying cannot fix it


def test_a_trainer_whose_relay_cafile_does_not_match_gets_relay_error_promptly(tls_relay, certs):
    # In a subprocess, so that a trainer still retrying is killed at the bound rather than waited for.
    proc = subprocess.Popen(
        [sys.executable, "-c", _TRAINER_SCRIPT, localhost(tls_relay), TOKEN, certs[1][0]],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    lines: queue.Queue = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put("")  # the end

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    said: list[str] = []

    def next_line(deadline: float, what: str) -> None:
        try:
            said.append(lines.get(timeout=max(0.0, deadline - time.monotonic())))
        except queue.Empty:
            pytest.fail(f"{what}:\n{''.join(said)}")
        if not said[-1]:
            pytest.fail(f"the trainer's process ended early:\n{''.join(said)}")

    try:
        deadline = time.monotonic() + 60  # the interpreter's start and imports, however loaded the machine
        while not said or said[-1] != "ready\n":
            next_line(deadline, "the trainer's process did not start")
        deadline = time.monotonic() + PROMPT + 1  # from here on the trainer dials
        while not said[-1].startswith("{"):
            next_line(deadline, f"no RelayError within {PROMPT + 1:g} s of dialing a relay that relay_cafile= "
                                "does not verify")
    finally:
        proc.kill()
        proc.wait(timeout=10)
        reader.join(10)
    result = json.loads(said[-1])
    assert result["error"] == "RelayError", said
    assert "certificate" in result["message"] and "relay_cafile" in result["message"], result
    assert result["seconds"] < PROMPT, result


# ---------------------------------------------------------------- HTTP proxies


def test_a_worker_reaches_the_tls_relay_through_an_http_proxy(tls_relay, certs, cli_workers, proxy):
    envs = trainer(localhost(tls_relay), 2, relay_cafile=certs[0][0])
    try:
        procs = workers(cli_workers, envs, [2], "--cafile", certs[0][0], "--proxy", f"http://127.0.0.1:{proxy.port}")
        equals_sync_vector_env(envs, 2, cli_workers, tls_relay)
        assert proxy.requests == [f"CONNECT localhost:{tls_relay.port} HTTP/1.1"] and proxy.tunnels == 1
    finally:
        envs.close()
    out, = ended_ok(cli_workers, procs)
    assert f"through proxy http://127.0.0.1:{proxy.port}" in out, out


def test_the_trainer_reaches_the_relay_through_an_http_proxy(tls_relay, certs, cli_workers, proxy):
    envs = trainer(localhost(tls_relay), 3, relay_cafile=certs[0][0], relay_proxy=f"http://127.0.0.1:{proxy.port}")
    try:
        assert proxy.tunnels == 1  # the control connection: the room is open
        procs = workers(cli_workers, envs, [1, 2], "--cafile", certs[0][0])  # they dial directly
        equals_sync_vector_env(envs, 3, cli_workers, tls_relay)
        # the control connection, plus one data connection per worker
        assert proxy.tunnels == 3 and proxy.refused == 0, proxy.requests
        assert proxy.requests == [f"CONNECT localhost:{tls_relay.port} HTTP/1.1"] * 3
        assert envs.unwrapped._trainer.server.relay.accepted == 2
    finally:
        envs.close()
    ended_ok(cli_workers, procs)


def test_https_proxy_is_never_used_for_a_loopback_relay(tls_relay, certs, cli_workers, proxy, monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy.port}")  # the workers inherit it too
    monkeypatch.delenv("https_proxy", raising=False)  # the lowercase spelling would win
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    # the variable is read: a relay elsewhere would be dialed through it; one on loopback never is
    assert RemoteConfig(relay="wss://relay.example", relay_token="x").relay_route() == f"http://127.0.0.1:{proxy.port}"
    for host in ("localhost", "127.0.0.1", "[::1]"):
        assert RemoteConfig(relay=f"wss://{host}:{tls_relay.port}", relay_token="x").relay_route() is None
    envs = trainer(localhost(tls_relay), 2, relay_cafile=certs[0][0])
    try:
        procs = workers(cli_workers, envs, [2], "--cafile", certs[0][0])
        equals_sync_vector_env(envs, 2, cli_workers, tls_relay)
        assert proxy.requests == [] and proxy.tunnels == 0
    finally:
        envs.close()
    ended_ok(cli_workers, procs)


# ------------------------------------------------------------------- nginx

NGINX_CONF = """\
# made by tests/test_relay_tls_proxy.py: a TLS-terminating reverse proxy in front of a relay
daemon off;
master_process off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log info;
events {{
    worker_connections 256;
}}
http {{
    access_log {tmp}/access.log;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen 127.0.0.1:{port} ssl;
        server_name localhost;
        ssl_certificate {certfile};
        ssl_certificate_key {keyfile};
        location /gym/ {{  # the prefix stripped
            proxy_pass http://127.0.0.1:{relay_port}/;
{upgrade}
        }}
        location /keep/ {{  # the prefix kept: the relay matches routes by their end
            proxy_pass http://127.0.0.1:{relay_port};
{upgrade}
        }}
    }}
}}
"""
UPGRADE = """\
proxy_http_version 1.1;
proxy_set_header Upgrade $http_upgrade;
proxy_set_header Connection "upgrade";
proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
proxy_read_timeout 1h;"""


def nginx_missing() -> None:
    """Skip, where nginx is not installed; in CI (CI=true), which must run these tests, fail."""
    reason = "no nginx program (apt-get install nginx-light)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but the nginx relay tests cannot run: {reason}", pytrace=False)
    pytest.skip(reason)


class Nginx:
    """nginx in the foreground, one process, everything in ``tmp``; killed by ``stop``."""

    def __init__(self, program: str, tmp, relay_port: int, certfile: str, keyfile: str) -> None:
        self.tmp = tmp
        for _ in range(3):  # the free port may be taken before nginx binds it
            if self._start(program, relay_port, certfile, keyfile):
                return
        raise RuntimeError(f"nginx found no free port:\n{self.errors()}")

    def _start(self, program: str, relay_port: int, certfile: str, keyfile: str) -> bool:
        """Whether nginx listens (False: its port was taken); RuntimeError on any other failure."""
        tmp = self.tmp
        (tmp / "error.log").unlink(missing_ok=True)  # what it says is about this start
        self.port = free_port()
        upgrade = textwrap.indent(UPGRADE, " " * 12)
        conf = tmp / "nginx.conf"
        conf.write_text(NGINX_CONF.format(tmp=tmp, port=self.port, relay_port=relay_port, certfile=certfile,
                                          keyfile=keyfile, upgrade=upgrade))
        self.proc = subprocess.Popen([program, "-p", str(tmp), "-c", str(conf), "-e", str(tmp / "error.log")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while True:
            said = self.errors()
            if "Address already in use" in said:  # nginx would retry for 2.5 s, then exit
                self.stop()
                return False
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx ended ({self.proc.returncode}) before listening:\n{said}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            except OSError:
                pass
            else:  # nginx logs its event method once its sockets are bound: the connection was its own
                if "event method" in self.errors():
                    return True
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"nginx did not listen on 127.0.0.1:{self.port} within 15 s:\n{self.errors()}")
            try:
                self.proc.wait(timeout=0.05)  # the pause between polls, and an early end noticed
            except subprocess.TimeoutExpired:
                pass

    def errors(self) -> str:
        try:
            return (self.tmp / "error.log").read_text()
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # fast shutdown
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def nginx(certs, tmp_path_factory):
    """(nginx, plain relay): nginx terminates TLS for localhost and passes /gym/ and /keep/ to the relay."""
    program = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None)
    if program is None:
        nginx_missing()
    relay = RelayProcess()
    try:
        assert relay.url.startswith("ws://"), relay.output()
        certfile, keyfile, _ = certs[0]
        server = Nginx(program, tmp_path_factory.mktemp("nginx"), relay.port, certfile, keyfile)
        try:
            yield server, relay
        finally:
            server.stop()
    finally:
        relay.stop()


@pytest.mark.parametrize("prefix", ["gym", "keep"], ids=["prefix-stripped", "prefix-kept"])
def test_behind_nginx_under_a_path_prefix(nginx, certs, cli_workers, prefix):
    server, relay = nginx
    base = f"wss://localhost:{server.port}/{prefix}"
    envs = trainer(base, 3, relay_cafile=certs[0][0])
    try:
        room = envs.unwrapped._trainer.server.relay.room
        assert envs.unwrapped.url == f"{base}/room/{room}/ws"
        procs = workers(cli_workers, envs, [1, 2], "--cafile", certs[0][0])
        if prefix == "gym":  # the URL without the proxy's prefix: nginx has nothing there
            bare, = workers(cli_workers, envs, [1], "--cafile", certs[0][0],
                            url=f"wss://localhost:{server.port}/room/{room}/ws")
            code, out = cli_workers.finish(bare, timeout=30)
            assert code == EXIT_NOT_FOUND and "404" in out and "prefix" in out, out
        equals_sync_vector_env(envs, 3, cli_workers, relay)
        assert envs.unwrapped._trainer.server.relay.accepted == 2, relay.output()
    finally:
        envs.close()
    ended_ok(cli_workers, procs)
    # Through nginx indeed: its access log has the trainer's control connection and both workers'
    # upgrades (101), with the prefix. nginx logs a request when it ends, so the lines may come a moment
    # after the room closed.
    worker_line = f"GET /{prefix}/room/{room}/ws HTTP/1.1\" 101 "
    trainer_line = f"GET /{prefix}/trainer HTTP/1.1\" 101 "
    deadline = time.monotonic() + 10
    while True:
        log = (server.tmp / "access.log").read_text()
        if log.count(worker_line) == 2 and log.count(trainer_line) == 1:
            break
        assert time.monotonic() < deadline, log
        time.sleep(0.05)
