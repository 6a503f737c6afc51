"""Workers behind an HTTP proxy: ``--proxy``, ``HTTPS_PROXY``/``NO_PROXY``, proxy auth and refusals.

The rule that picks a proxy (:func:`ws_gym.proxies.proxy_for`) is a pure
function of the URL, ``--proxy`` and an environment mapping, tested first.
Then real worker processes dial a real ``wss://`` trainer on 127.0.0.1 through
a real CONNECT proxy (``tests/connect_proxy.py``) on 127.0.0.1. An explicit
``--proxy`` is used for every URL, loopback too, so these tests can route a
loopback trainer through it; a proxy from the environment never carries a
loopback trainer, which the environment tests show.
"""

from __future__ import annotations

import os
import queue
import re
import socket
import subprocess
import sys
import threading
import time
from urllib.parse import urlsplit

import pytest

import ws_gym
from ws_gym.client import Worker
from ws_gym.proxies import check_proxy_url, is_loopback_host, proxy_for, without_credentials
from ws_gym.protocol import EXIT_GAVE_UP, EXIT_OK, EXIT_UNAUTHORIZED
from ws_gym.worker import main as worker_main

from .conftest import ROOT
from .connect_proxy import ConnectProxy
from .test_security import check_steps, make_cert

ENV = "CartPole-v1"
PROXY_VARS = ("http_proxy", "https_proxy", "no_proxy", "all_proxy", "ws_proxy", "wss_proxy")


# ----------------------------------------------------------------- the rule


@pytest.mark.parametrize("url, explicit, environ, expected", [
    # no proxy anywhere: direct
    ("wss://trainer.example/ws", None, {}, None),
    # wss:// takes HTTPS_PROXY, ws:// HTTP_PROXY; a value without scheme is http://
    ("wss://trainer.example/ws", None, {"HTTPS_PROXY": "http://p:3128", "HTTP_PROXY": "http://q:8080"},
     "http://p:3128"),
    ("ws://trainer.example/ws", None, {"HTTPS_PROXY": "http://p:3128", "HTTP_PROXY": "http://q:8080"},
     "http://q:8080"),
    ("wss://trainer.example/ws", None, {"HTTP_PROXY": "http://q:8080"}, None),
    ("wss://trainer.example/ws", None, {"HTTPS_PROXY": "p.example:3128"}, "http://p.example:3128"),
    # lowercase wins; an empty lowercase one switches the variable off
    ("wss://trainer.example/ws", None, {"https_proxy": "http://low:1", "HTTPS_PROXY": "http://up:2"}, "http://low:1"),
    ("wss://trainer.example/ws", None, {"https_proxy": "", "HTTPS_PROXY": "http://up:2"}, None),
    ("ws://trainer.example/ws", None, {"http_proxy": "http://low:1"}, "http://low:1"),
    # a CGI request's HTTP_PROXY is a header, not a setting
    ("ws://trainer.example/ws", None, {"HTTP_PROXY": "http://q:8080", "REQUEST_METHOD": "GET"}, None),
    # credentials stay in the URL the worker dials with
    ("wss://trainer.example/ws", None, {"HTTPS_PROXY": "http://u:pw@p:3128"}, "http://u:pw@p:3128"),
    # loopback is always direct for the environment's proxy, NO_PROXY or not
    *[(f"wss://{host}/ws", None, {"HTTPS_PROXY": "http://p:3128"}, None)
      for host in ("localhost", "LOCALHOST", "a.localhost", "127.0.0.1", "127.1.2.3:8765", "[::1]:8765",
                   "[::ffff:127.0.0.1]")],
    ("ws://127.0.0.1:8765/ws", None, {"HTTP_PROXY": "http://p:3128"}, None),
    # but not what only looks local
    ("wss://128.0.0.1/ws", None, {"HTTPS_PROXY": "http://p:3128"}, "http://p:3128"),
    ("wss://localhost.example/ws", None, {"HTTPS_PROXY": "http://p:3128"}, "http://p:3128"),
    ("wss://[::2]/ws", None, {"HTTPS_PROXY": "http://p:3128"}, "http://p:3128"),
    # an explicit proxy wins over the environment, for every URL (loopback too)
    ("wss://trainer.example/ws", "http://x:1", {"HTTPS_PROXY": "http://p:3128"}, "http://x:1"),
    ("wss://127.0.0.1:8765/ws", "http://x:1", {}, "http://x:1"),
    ("wss://trainer.example/ws", "x:1", {"NO_PROXY": "*"}, "http://x:1"),
])
def test_proxy_for(url, explicit, environ, expected):
    assert proxy_for(url, explicit, environ) == expected


@pytest.mark.parametrize("no_proxy, url, exempt", [
    ("*", "wss://trainer.example/ws", True),
    ("a.example, *", "wss://trainer.example/ws", True),
    ("trainer.example", "wss://trainer.example/ws", True),
    ("TRAINER.Example", "wss://trainer.example:8765/ws", True),
    ("example", "wss://trainer.example/ws", True),  # a suffix at a dot
    (".example", "wss://trainer.example/ws", True),
    ("*.example", "wss://trainer.example/ws", True),
    (".trainer.example", "wss://trainer.example/ws", True),  # the name itself too, as curl and urllib
    ("ample", "wss://trainer.example/ws", False),  # not at a dot
    ("other.example", "wss://trainer.example/ws", False),
    ("trainer.example:8765", "wss://trainer.example:8765/ws", True),
    ("trainer.example:8766", "wss://trainer.example:8765/ws", False),
    ("trainer.example:443", "wss://trainer.example/ws", True),  # the scheme's port
    ("trainer.example:80", "ws://trainer.example/ws", True),
    ("trainer.example:443", "ws://trainer.example/ws", False),
    ("10.1.2.3", "wss://10.1.2.3:8765/ws", True),
    ("10.1.2.4", "wss://10.1.2.3:8765/ws", False),
    ("10.0.0.0/8", "wss://10.1.2.3:8765/ws", True),
    ("10.0.0.0/8", "wss://11.1.2.3:8765/ws", False),
    ("10.1.2.3:8765", "wss://10.1.2.3:8765/ws", True),
    ("2001:db8::/32", "wss://[2001:db8::7]:8765/ws", True),
    ("[2001:db8::7]:8765", "wss://[2001:db8::7]:8765/ws", True),
    ("[2001:db8::7]:1", "wss://[2001:db8::7]:8765/ws", False),
    ("10.0.0.0/8", "wss://ten.example/ws", False),  # no name is resolved
    ("", "wss://trainer.example/ws", False),
    (" , ,", "wss://trainer.example/ws", False),
])
@pytest.mark.parametrize("variable", ["NO_PROXY", "no_proxy"])
def test_no_proxy_exempts_hosts(no_proxy, url, exempt, variable):
    scheme_var = "HTTPS_PROXY" if url.startswith("wss") else "HTTP_PROXY"
    environ = {scheme_var: "http://p:3128", variable: no_proxy}
    assert proxy_for(url, None, environ) == (None if exempt else "http://p:3128")


def test_lowercase_no_proxy_wins():
    environ = {"HTTPS_PROXY": "http://p:3128", "no_proxy": "other.example", "NO_PROXY": "trainer.example"}
    assert proxy_for("wss://trainer.example/ws", None, environ) == "http://p:3128"


@pytest.mark.parametrize("host, loopback", [
    ("localhost", True), ("localhost.", True), ("x.localhost", True), ("127.0.0.1", True), ("127.255.0.9", True),
    ("::1", True), ("[::1]", True), ("::ffff:127.0.0.1", True),
    ("10.0.0.1", False), ("::", False), ("0.0.0.0", False), ("trainer", False), ("mylocalhost", False),
])
def test_loopback_hosts(host, loopback):
    assert is_loopback_host(host) is loopback


@pytest.mark.parametrize("url, shown", [
    ("http://alice:s3cret@proxy:3128", "http://proxy:3128"),
    ("http://alice@proxy:3128/", "http://proxy:3128/"),
    ("http://proxy:3128", "http://proxy:3128"),
    ("wss://u:p@trainer.example:8765/ws?x=a@b", "wss://trainer.example:8765/ws?x=a@b"),
    ("alice:s3cret@proxy:3128", "proxy:3128"),
    ("http://a:p@ss@proxy:3128", "http://proxy:3128"),
])
def test_credentials_are_never_shown(url, shown):
    assert without_credentials(url) == shown


@pytest.mark.parametrize("proxy, why", [
    ("https://alice:s3cret@proxy:3128", "only http://"),
    ("socks5://alice:s3cret@proxy:1080", "only http://"),
    ("http://alice:s3cret@proxy:99999", "port"),
    ("http://alice:s3cret@proxy:port", "port"),
    ("http://alice:s3cret@proxy:3128/path", "HOST:PORT"),
    ("http://alice:s3cret@:3128", "HOST:PORT"),
])
def test_unusable_proxy_urls_are_refused_without_the_password(proxy, why):
    with pytest.raises(ValueError) as err:
        check_proxy_url(proxy, "--proxy")
    assert why in str(err.value) and "--proxy" in str(err.value) and "s3cret" not in str(err.value)


def test_an_unusable_proxy_from_the_environment_names_the_variable():
    with pytest.raises(ValueError, match="https_proxy .*only http://"):
        proxy_for("wss://trainer.example/ws", None, {"https_proxy": "https://p:3128"})
    # ...but only when it would be used
    assert proxy_for("wss://127.0.0.1/ws", None, {"https_proxy": "https://p:3128"}) is None


def test_worker_takes_the_environment_it_is_given():
    """The CLI gives it the process's environment (os.environ)."""
    environ = {"HTTPS_PROXY": "http://alice:s3cret@proxy.example:3128"}
    assert Worker("wss://trainer.example/ws", environ=environ).proxy == "http://alice:s3cret@proxy.example:3128"
    assert Worker("wss://127.0.0.1:8765/ws", environ=environ).proxy is None
    assert Worker("wss://trainer.example/ws", proxy="http://other:1", environ=environ).proxy == "http://other:1"
    # a Unix socket is this machine's: never through a proxy, not even an explicit one
    assert Worker("ws://trainer.example/ws", unix_socket="/tmp/x.sock", proxy="http://other:1").proxy is None
    assert Worker("wss://trainer.example/ws", environ=dict(environ, NO_PROXY=".example")).proxy is None
    assert Worker("wss://trainer.example/ws").proxy is None  # no environment given: explicit proxies only


def test_cli_refuses_an_unusable_proxy(capsys):
    code = worker_main(["--url", "wss://trainer.example/ws", "--proxy", "https://alice:s3cret@proxy:3128"])
    err = capsys.readouterr().err
    assert code == 1 and "only http://" in err and "https://proxy:3128" in err and "s3cret" not in err, err


# ---------------------------------------------------------------- processes


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without any proxy setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in PROXY_VARS}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


class Proc:
    """A process whose output (stdout and stderr) is read as it comes, line by line."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.popen = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, text=True)
        self.lines: list[str] = []
        self._new: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        with self.popen.stdout:
            for line in self.popen.stdout:
                self.lines.append(line)
                self._new.put(line)
        self._new.put(None)

    def wait_for(self, pattern: str, timeout: float = 30) -> re.Match:
        """The first line (from now on) that matches ``pattern``; fails at EOF or after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._new.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"no line matching {pattern!r} within {timeout} s:\n{self.output}")
            if line is None:
                pytest.fail(f"the process ended without a line matching {pattern!r}:\n{self.output}")
            found = re.search(pattern, line)
            if found:
                return found

    def finish(self, timeout: float = 30) -> tuple[int, str]:
        code = self.popen.wait(timeout)
        self._reader.join(timeout)
        return code, self.output

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(10)
        self._reader.join(10)


@pytest.fixture
def procs():
    """Start processes with ``procs(args, env)``; every one is killed at teardown."""
    started: list[Proc] = []

    def start(args: list[str], env: dict[str, str] | None = None) -> Proc:
        proc = Proc(args, clean_env() if env is None else env)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()


def worker(procs, *args: str, env: dict[str, str] | None = None) -> Proc:
    return procs([sys.executable, "-m", "ws_gym.worker", *args], env)


@pytest.fixture
def proxies():
    """Start CONNECT proxies with ``proxies(**kwargs)``; all are closed at teardown."""
    started: list[ConnectProxy] = []

    def start(**kwargs) -> ConnectProxy:
        proxy = ConnectProxy(**kwargs).start()
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.close()


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    return make_cert(tmp_path_factory.mktemp("tls"), "trainer")


@pytest.fixture
def trainer(cert):
    """A wss:// trainer on 127.0.0.1 for one env; closed at teardown."""
    envs = ws_gym.RemoteVectorEnv(1, env_id=ENV, port=0, certfile=cert[0], keyfile=cert[1], connect_timeout=30)
    yield envs
    envs.close()


def port_of(envs) -> int:
    port = urlsplit(envs.url).port
    assert port is not None
    return port


def dead_port() -> socket.socket:
    """A socket bound on 127.0.0.1 but not listening: its port refuses connections
    until a server listens on this very socket (so no one else can take the port)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


def test_wss_through_an_explicit_proxy(trainer, cert, procs, proxies):
    proxy = proxies()
    unused = dead_port()  # HTTPS_PROXY names it: --proxy must win, or nothing connects
    try:
        env = clean_env(HTTPS_PROXY=f"http://127.0.0.1:{unused.getsockname()[1]}")
        url = f"wss://localhost:{port_of(trainer)}/ws"
        w = worker(procs, "--url", url, "--cafile", cert[0], "--proxy", f"http://127.0.0.1:{proxy.port}", env=env)
        check_steps(trainer, 1)
        trainer.close()
        code, out = w.finish()
    finally:
        unused.close()
    assert code == EXIT_OK, out
    assert f"connecting to {url} through proxy http://127.0.0.1:{proxy.port}" in out, out
    assert proxy.tunnels == 1 and proxy.refused == 0
    assert proxy.requests == [f"CONNECT localhost:{port_of(trainer)} HTTP/1.1"]


def test_environment_proxy_never_carries_a_loopback_trainer(trainer, cert, procs, proxies):
    proxy = proxies()  # a working proxy: only the loopback rule keeps the worker off it
    env = clean_env(HTTPS_PROXY=f"http://127.0.0.1:{proxy.port}", https_proxy=f"http://127.0.0.1:{proxy.port}")
    w = worker(procs, "--url", f"wss://localhost:{port_of(trainer)}/ws", "--cafile", cert[0], env=env)
    check_steps(trainer, 1)
    trainer.close()
    code, out = w.finish()
    assert code == EXIT_OK, out
    assert proxy.requests == [] and "through proxy" not in out, out


def test_proxy_credentials_from_the_url(trainer, cert, procs, proxies):
    proxy = proxies(auth="alice:s3cret-pw")
    w = worker(procs, "--url", f"wss://localhost:{port_of(trainer)}/ws", "--cafile", cert[0],
               "--proxy", f"http://alice:s3cret-pw@127.0.0.1:{proxy.port}")
    check_steps(trainer, 1)
    trainer.close()
    code, out = w.finish()
    assert code == EXIT_OK, out
    assert proxy.tunnels == 1 and proxy.refused == 0
    assert f"through proxy http://127.0.0.1:{proxy.port}" in out and "s3cret" not in out, out


@pytest.mark.parametrize("userinfo, said", [
    ("alice:wrong-pw@", "rejected this worker's credentials (407 Proxy Authentication Required)"),
    ("", "requires authentication (407 Proxy Authentication Required)"),
])
def test_proxy_refusing_the_credentials_ends_the_worker(procs, proxies, userinfo, said):
    proxy = proxies(auth="alice:s3cret-pw")
    # No --retry-timeout: retrying cannot fix credentials. (The target is never dialed.)
    w = worker(procs, "--url", "wss://localhost:9/ws", "--proxy", f"http://{userinfo}127.0.0.1:{proxy.port}")
    code, out = w.finish()
    assert code == EXIT_UNAUTHORIZED, out
    assert f"the proxy at http://127.0.0.1:{proxy.port} {said}" in out, out
    assert "wrong-pw" not in out and "s3cret" not in out, out
    assert proxy.statuses == [407] and proxy.tunnels == 0


def test_proxy_down_at_first_then_up(trainer, cert, procs):
    held = dead_port()
    port = held.getsockname()[1]
    w = worker(procs, "--url", f"wss://localhost:{port_of(trainer)}/ws", "--cafile", cert[0],
               "--proxy", f"http://alice:s3cret-pw@127.0.0.1:{port}")
    w.wait_for(rf"waiting for the proxy at http://127\.0\.0\.1:{port} \(")
    proxy = ConnectProxy(auth="alice:s3cret-pw", sock=held).start()  # listens on the held socket
    try:
        check_steps(trainer, 1)
        trainer.close()
        code, out = w.finish()
    finally:
        proxy.close()
    assert code == EXIT_OK, out
    assert proxy.tunnels == 1 and "s3cret" not in out, out


def test_proxy_refusing_the_target_is_retried(procs, proxies):
    proxy = proxies()  # allows 127.0.0.1 and localhost only
    w = worker(procs, "--url", "wss://127.0.0.2:8765/ws", "--proxy", f"http://127.0.0.1:{proxy.port}",
               "--retry-timeout", "1")
    code, out = w.finish()
    assert code == EXIT_GAVE_UP, out
    assert (f"the proxy at http://127.0.0.1:{proxy.port} refused to connect to 127.0.0.2:8765 (403 Forbidden); "
            "retrying") in out, out
    assert out.count("refused to connect") == 1, out  # said once, not at every attempt
    assert f"no trainer at wss://127.0.0.2:8765/ws through proxy http://127.0.0.1:{proxy.port}" in out, out
    assert len(proxy.statuses) >= 2 and set(proxy.statuses) == {403} and proxy.tunnels == 0


def test_proxy_that_cannot_reach_the_trainer_is_waited_on(procs, proxies):
    proxy = proxies()
    held = dead_port()  # no trainer there: the proxy answers 502
    try:
        port = held.getsockname()[1]
        w = worker(procs, "--url", f"wss://127.0.0.1:{port}/ws", "--proxy", f"http://127.0.0.1:{proxy.port}",
                   "--retry-timeout", "0.5")
        code, out = w.finish()
    finally:
        held.close()
    assert code == EXIT_GAVE_UP, out
    assert (f"waiting for the trainer at wss://127.0.0.1:{port}/ws: the proxy at http://127.0.0.1:{proxy.port} "
            "cannot reach it (502 Bad Gateway)") in out, out
    assert set(proxy.statuses) == {502} and proxy.tunnels == 0


def test_ws_url_through_a_proxy_says_to_use_wss(procs, proxies):
    proxy = proxies()
    w = worker(procs, "--url", "ws://127.0.0.1:9/ws", "--proxy", f"http://127.0.0.1:{proxy.port}",
               "--retry-timeout", "0.5")
    code, out = w.finish()
    assert code == EXIT_GAVE_UP, out
    assert "failed: 405" in out and out.count("use the trainer's wss:// URL") == 1, out
    # aiohttp sends a ws:// upgrade to the proxy in absolute form, scheme ws:// and all; no CONNECT
    assert proxy.requests[0] == "GET ws://127.0.0.1:9/ws HTTP/1.1", proxy.requests
    assert proxy.tunnels == 0


# ------------------------------------------------------- the proxy as a process


def http_exchange(port: int, request: bytes, then: bytes = b"") -> tuple[bytes, socket.socket]:
    """Send ``request`` to the proxy; its response head and the open socket."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(request)
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            break
        head += chunk
    return head, sock


def test_connect_proxy_as_a_process(procs):
    echo = socket.socket()
    echo.bind(("127.0.0.2", 0))  # on loopback, but only allowed with --allow
    echo.listen()
    echo.settimeout(10)
    proxy = procs([sys.executable, "-m", "tests.connect_proxy", "--host", "127.0.0.1", "--port", "0",
                   "--auth", "u:p", "--allow", "127.0.0.2"])
    port = int(proxy.wait_for(r"^connect-proxy listening on 127\.0\.0\.1:(\d+)$").group(1))
    target = f"127.0.0.2:{echo.getsockname()[1]}".encode()
    auth = b"Proxy-Authorization: Basic dTpw\r\n"  # u:p
    try:
        head, s = http_exchange(port, b"CONNECT " + target + b" HTTP/1.1\r\n\r\n")
        s.close()
        assert head.startswith(b"HTTP/1.1 407 ") and b"Proxy-Authenticate: Basic" in head, head
        head, s = http_exchange(port, b"GET http://127.0.0.1/ HTTP/1.1\r\n" + auth + b"\r\n")
        s.close()
        assert head.startswith(b"HTTP/1.1 405 "), head
        head, s = http_exchange(port, b"CONNECT 192.0.2.1:443 HTTP/1.1\r\n" + auth + b"\r\n")
        s.close()
        assert head.startswith(b"HTTP/1.1 403 "), head
        head, s = http_exchange(port, b"CONNECT " + target + b" HTTP/1.1\r\nX-Big: " + b"x" * 20000)
        s.close()
        assert head.startswith(b"HTTP/1.1 431 "), head
        head, s = http_exchange(port, b"CONNECT " + target + b" HTTP/1.1\r\n" + auth + b"\r\n")
        with s:
            assert head == b"HTTP/1.1 200 Connection established\r\n\r\n", head
            conn, _ = echo.accept()
            with conn:
                s.sendall(b"ping")
                assert conn.recv(4) == b"ping"
                conn.sendall(b"pong")
                assert s.recv(4) == b"pong"
    finally:
        echo.close()
    proxy.popen.terminate()
    code, out = proxy.finish()
    assert code == 0, out
    assert f"CONNECT {target.decode()} HTTP/1.1 -> 200" in out and "CONNECT 192.0.2.1:443 HTTP/1.1 -> 403" in out
