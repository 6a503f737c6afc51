"""Proxies in front of the trainer, ``public_url``, IPv6 hosts, and the worker CLI's exit codes.

Everything runs over real sockets on loopback (127.0.0.1, and ::1 where the
machine has it) against real worker processes. A proxy is simulated two ways:
a client that adds the headers a proxy forwards (``X-Forwarded-For``,
``Forwarded``) to its upgrade request, and a small WebSocket relay on
127.0.0.1 (below) that does what nginx does: passes the upgrade on under a
path prefix, adds ``X-Forwarded-For``, and relays frames both ways.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading

import aiohttp
import numpy as np
import pytest
from aiohttp import web

import ws_gym
from ws_gym.config import Transport
from ws_gym import codec
from ws_gym import protocol as P
from ws_gym.errors import ConnectTimeoutError, WsGymError
from ws_gym.host import EnvHost
from ws_gym.local import LocalWorkers
from ws_gym.protocol import EXIT_NOT_FOUND, EXIT_OK, EXIT_UNAUTHORIZED, TOKEN_ENV
from ws_gym.worker import Worker

ENV = "CartPole-v1"
PUBLIC = "wss://trainer.example/ws-gym/ws"


def said(caplog, capsys) -> str:
    """What ws_gym told the user: through logging, or on stderr when none is set up."""
    return caplog.text + capsys.readouterr().err


def in_thread(coro_fn, *args, timeout: float = 60):
    """Run ``coro_fn(*args)`` on a fresh event loop in a thread; returns (start, join)."""
    box: dict = {}

    def target() -> None:
        try:
            box["result"] = asyncio.run(coro_fn(*args))
        except BaseException as exc:  # noqa: BLE001 - re-raised by join()
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)

    def join():
        thread.join(timeout)
        assert not thread.is_alive(), f"{coro_fn.__name__} did not end within {timeout} s"
        if "error" in box:
            raise box["error"]
        return box.get("result")

    return thread.start, join


async def upgrade_status(url: str, headers: dict) -> tuple[int, str]:
    """The HTTP status a WebSocket upgrade with these headers gets, and the
    body the same request gets as a plain GET (a refusal comes before the upgrade)."""
    async with aiohttp.ClientSession() as session:
        try:
            async with session.ws_connect(url, headers=headers) as ws:
                await ws.close()
                status = 101
        except aiohttp.WSServerHandshakeError as exc:
            status = exc.status
        else:
            return status, ""
        async with session.get(url.replace("ws://", "http://", 1), headers=headers) as resp:
            assert resp.status == status
            return status, await resp.text()


async def hand_rolled_worker(url: str, headers: dict, name: str) -> int:
    """A worker that adds proxy headers to its upgrade request (the CLI cannot):
    hello, welcome, ready, accept, then it answers requests as the CLI worker
    does (``Worker.answer``) until the trainer closes. Returns the requests served."""
    served = 0
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(url, headers=headers, max_msg_size=0) as ws:
            await ws.send_bytes(codec.encode(P.HELLO, 0, P.make_hello(ENV, 1, name)))
            msg = codec.decode((await ws.receive(timeout=30)).data)
            assert msg.kind == P.WELCOME, msg
            host = EnvHost(P.parse_welcome(codec.writable(msg.body)))
            try:
                await ws.send_bytes(codec.encode(P.READY, 0, host.ready_body()))
                assert codec.decode((await ws.receive(timeout=30)).data).kind == P.ACCEPT
                while True:
                    msg = await ws.receive(timeout=60)
                    if msg.type != aiohttp.WSMsgType.BINARY:
                        return served
                    frame, closing = Worker.answer(host, msg.data)
                    await ws.send_bytes(frame)
                    served += 1
                    if closing:
                        return served
            finally:
                host.close()


class Relay:
    """A reverse proxy on 127.0.0.1, as nginx with ``location /ws-gym/ {
    proxy_pass http://127.0.0.1:PORT/; ... }``: strips the prefix, adds
    ``X-Forwarded-For``, hands the upstream's refusal (status) back before the
    upgrade, and relays messages, pings and pongs both ways. Any other path: 404."""

    PREFIX = "/ws-gym"

    def __init__(self) -> None:
        self.upstream = ""  # http://127.0.0.1:PORT, set once the trainer listens (it is told our URL)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)
        self.url = f"ws://127.0.0.1:{self.port}{self.PREFIX}/ws"

    async def _start(self) -> int:
        self.session = aiohttp.ClientSession()
        app = web.Application()
        app.router.add_get(self.PREFIX + "/{tail:.*}", self._relay)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return self.runner.addresses[0][1]

    async def _relay(self, request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() == P.TOKEN_HEADER.lower()}
        headers["X-Forwarded-For"] = request.remote
        target = f"{self.upstream}/{request.match_info['tail']}".replace("http://", "ws://", 1)
        try:
            up = await self.session.ws_connect(target, headers=headers, autoping=False, max_msg_size=0)
        except aiohttp.WSServerHandshakeError as exc:
            return web.Response(status=exc.status, text=f"relay: upstream said {exc.status}")
        down = web.WebSocketResponse(autoping=False, max_msg_size=0)
        await down.prepare(request)

        async def pump(src, dst) -> None:
            async for msg in src:
                if msg.type == aiohttp.WSMsgType.BINARY:
                    await dst.send_bytes(msg.data)
                elif msg.type == aiohttp.WSMsgType.TEXT:
                    await dst.send_str(msg.data)
                elif msg.type == aiohttp.WSMsgType.PING:
                    await dst.ping(msg.data)
                elif msg.type == aiohttp.WSMsgType.PONG:
                    await dst.pong(msg.data)

        tasks = [asyncio.ensure_future(pump(up, down)), asyncio.ensure_future(pump(down, up))]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await up.close()
            await down.close()
        return down

    async def _stop(self) -> None:
        await self.runner.cleanup()
        await self.session.close()

    def close(self) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


@pytest.fixture
def relay():
    proxy = Relay()
    yield proxy
    proxy.close()


def behind(relay: Relay, envs):
    relay.upstream = f"http://127.0.0.1:{envs._trainer.server.port}"
    return envs


def check_steps(envs, n_steps: int = 5) -> None:
    obs, _ = envs.reset(seed=3)
    ref = __import__("gymnasium").make_vec(ENV, num_envs=envs.num_envs, vectorization_mode="sync")
    try:
        want, _ = ref.reset(seed=3)
        assert np.array_equal(obs, want)
        for _ in range(n_steps):
            actions = np.ones(envs.num_envs, dtype=np.int64)
            got = envs.step(actions)
            want = ref.step(actions)
            for a, b in zip(got[:4], want[:4]):
                assert np.array_equal(a, b)
    finally:
        ref.close()


# --------------------------------------------------------------------- proxies


def test_a_proxied_connection_to_a_trainer_without_token_gets_403(caplog):
    envs = ws_gym.RemoteVectorEnv(1, env_id=ENV, port=0, connect_timeout=30)
    try:
        assert envs.token is None  # loopback, no token=: only this machine can connect
        cases = [
            ({"X-Forwarded-For": "203.0.113.7, 10.0.0.2"}, "203.0.113.7"),
            ({"Forwarded": 'for="[2001:db8::7]:4711";proto=https, for=10.0.0.2'}, "2001:db8::7"),
            ({"Forwarded": "for=198.51.100.9:5555"}, "198.51.100.9"),
            ({"X-Forwarded-For": "<b>evil</b>" + "x" * 200}, "unknown"),  # untrusted: never logged as is
        ]
        with caplog.at_level(logging.WARNING, logger="ws_gym"):
            for headers, client in cases:
                status, body = asyncio.run(upgrade_status(envs.url, headers))
                assert status == 403, (headers, status)
                assert "connections through a proxy need a token" in body, body
                assert "token=" in body and "public_url=" in body, body
                line = f"refused a connection from {client} via proxy 127.0.0.1"
                assert line in caplog.text, caplog.text
                assert "need a token" in caplog.text
            assert "evil" not in caplog.text
            # the same client without a proxy's headers is let in (loopback, no token)
            status, _ = asyncio.run(upgrade_status(envs.url, {}))
            assert status == 101
        assert envs._trainer.table.covered() == 0
    finally:
        envs.close()


def test_a_proxied_worker_with_a_token_is_admitted_and_shown_by_its_client(caplog):
    envs = ws_gym.RemoteVectorEnv(2, env_id=ENV, port=0, token="s3cret-token", connect_timeout=60)
    clients = [
        ({"X-Forwarded-For": "203.0.113.7, 10.0.0.2"}, "203.0.113.7 via proxy 127.0.0.1"),
        ({"Forwarded": 'proto=https;for="[2001:db8::7]:4711", for=10.0.0.2'}, "2001:db8::7 via proxy 127.0.0.1"),
    ]
    joins = []
    try:
        with caplog.at_level(logging.INFO, logger="ws_gym"):
            for i, (headers, _) in enumerate(clients):
                start, join = in_thread(hand_rolled_worker, envs.url,
                                        {**headers, P.TOKEN_HEADER: envs.token}, f"proxied-{i}")
                start()
                joins.append(join)
            check_steps(envs)
            peers = {conn.peer for conn in envs._trainer.serving()}
            assert peers == {peer for _, peer in clients}, peers
            for conn in envs._trainer.serving():
                assert f"({conn.peer}, envs " in conn.origin
            for _, peer in clients:
                assert f"({peer}, envs " in caplog.text and "joined" in caplog.text, caplog.text
            # a wrong token through the proxy is a 401 that names the forwarded client
            status, _ = asyncio.run(upgrade_status(envs.url, {"X-Forwarded-For": "192.0.2.44",
                                                              P.TOKEN_HEADER: "wrong"}))
            assert status == 401
            assert "rejected a connection from 192.0.2.44 via proxy 127.0.0.1: wrong or missing token" in caplog.text
    finally:
        envs.close()
    for join in joins:
        assert join() >= 7  # reset, 5 steps, close


def test_a_cli_worker_through_a_reverse_proxy(cli_workers, relay, caplog, capsys):
    """public_url names the relay: a real CLI worker dials it with the token the
    trainer generated and printed; results equal gymnasium's."""
    with caplog.at_level(logging.INFO, logger="ws_gym"):
        envs = behind(relay, ws_gym.RemoteVectorEnv(3, env_id=ENV, port=0, connect_timeout=60,
                                                    public_url=relay.url))
    try:
        assert envs.url == relay.url
        assert envs.token and envs._trainer.token_generated
        printed = f"{TOKEN_ENV}={envs.token} python -m ws_gym.worker --url {relay.url} --env {ENV}"
        assert printed in said(caplog, capsys)
        proxied = cli_workers.start("--url", envs.url, "--env", ENV, "--num-envs", "3",
                                    env={TOKEN_ENV: envs.token})
        with caplog.at_level(logging.INFO, logger="ws_gym"):
            check_steps(envs)
        (conn,) = envs._trainer.serving()
        assert conn.peer == "127.0.0.1 via proxy 127.0.0.1"
        assert "worker " in caplog.text and "(127.0.0.1 via proxy 127.0.0.1, envs 0..2) joined" in caplog.text
        # the proxy's path prefix left out: the relay's own 404, and the worker stops at once
        lost = cli_workers.start("--url", f"ws://127.0.0.1:{relay.port}/ws", "--env", ENV,
                                 env={TOKEN_ENV: envs.token})
        code, out = cli_workers.finish(lost)
        assert code == EXIT_NOT_FOUND, out
        assert f"ws://127.0.0.1:{relay.port}/ws" in out and "path prefix" in out, out
    finally:
        envs.close()
    assert cli_workers.finish(proxied)[0] == EXIT_OK


def test_local_workers_dial_the_trainer_itself_with_public_url():
    """The public URL is not reachable here: the steps show the local workers
    dialed the trainer directly, with the generated token."""
    envs = ws_gym.RemoteVectorEnv(2, env_id=ENV, port=0, local_workers=2, public_url=PUBLIC, connect_timeout=60)
    try:
        assert envs.url == PUBLIC and envs.token
        check_steps(envs)
    finally:
        envs.close()


def test_a_cli_worker_through_a_proxy_to_a_trainer_without_token(cli_workers, relay, caplog):
    envs = behind(relay, ws_gym.RemoteVectorEnv(1, env_id=ENV, port=0, connect_timeout=30))
    try:
        with caplog.at_level(logging.WARNING, logger="ws_gym"):
            worker = cli_workers.start("--url", relay.url, "--env", ENV, env={TOKEN_ENV: ""})
            code, out = cli_workers.finish(worker)
        assert code == EXIT_UNAUTHORIZED, out
        assert "refused this worker (403" in out and "the trainer's log says why" in out, out
        assert "rejected this worker's token" not in out and "requires a token" not in out, out
        assert "refused a connection from 127.0.0.1 via proxy 127.0.0.1" in caplog.text
        assert "need a token" in caplog.text
    finally:
        envs.close()


def test_token_off_on_purpose_lets_proxied_connections_in(caplog):
    with caplog.at_level(logging.WARNING, logger="ws_gym"):
        envs = ws_gym.RemoteVectorEnv(1, env_id=ENV, port=0, token="", public_url=PUBLIC, connect_timeout=30)
    try:
        assert envs.token is None and not envs._trainer.token_generated
        assert f"token='' with public_url={PUBLIC}" in caplog.text
        status, _ = asyncio.run(upgrade_status(envs._trainer.server.local_url, {"X-Forwarded-For": "203.0.113.7"}))
        assert status == 101
    finally:
        envs.close()


# ------------------------------------------------------------------ public_url


def test_public_url_is_what_workers_are_told(caplog, capsys):
    with caplog.at_level(logging.INFO, logger="ws_gym"):
        envs = ws_gym.RemoteVectorEnv(1, env_id=ENV, port=0, public_url=PUBLIC, connect_timeout=1)
    try:
        trainer = envs._trainer
        assert envs.url == PUBLIC and envs._trainer.public_url == PUBLIC
        assert trainer.server.local_url == f"ws://127.0.0.1:{trainer.server.port}/ws"
        token = envs.token  # generated even on loopback: PCs come through the proxy
        assert isinstance(token, str) and len(token) >= 40 and envs._trainer.token_generated
        command = envs._trainer.worker_command()
        assert command == f"{TOKEN_ENV}={token} python -m ws_gym.worker --url {PUBLIC} --env {ENV} --num-envs K"
        text = said(caplog, capsys)
        assert f"listening on ws://127.0.0.1:{trainer.server.port}/ws (workers dial {PUBLIC})" in text, text
        assert command in text
        with caplog.at_level(logging.INFO, logger="ws_gym"), pytest.raises(ConnectTimeoutError, match=PUBLIC):
            envs.reset(seed=0)  # nobody dials: connect_timeout=1 passes
        text = said(caplog, capsys)
        assert f"waiting for workers: 0/1 envs connected to {PUBLIC}" in text, text
    finally:
        envs.close()

    envs = ws_gym.RemoteVectorEnv(1, env_id=ENV, host="0.0.0.0", port=0, token="mine", public_url=PUBLIC)
    try:  # a token of the user's own stays out of the command; the public URL, not this host's name
        assert envs.token == "mine" and not envs._trainer.token_generated
        assert envs._trainer.worker_command().startswith(f"{TOKEN_ENV}=<your token> python -m ws_gym.worker "
                                                         f"--url {PUBLIC} ")
    finally:
        envs.close()

    env = ws_gym.RemoteEnv(ENV, port=0, public_url="ws://10.0.0.5:9000/ws")
    try:
        assert env.url == "ws://10.0.0.5:9000/ws" and env.token
    finally:
        env.close()


@pytest.mark.parametrize("bad", ["http://trainer.example/ws", "trainer.example:8765/ws", "ws://", "ws:///ws",
                                 "wss://:443/ws", "ws://trainer.example:99999/ws", "ws://trainer example/ws",
                                 "ws://trainer.example/ws\n", ""])
def test_public_url_is_checked(bad):
    with pytest.raises(ValueError, match=r"public_url must be the ws:// or wss:// URL"):
        ws_gym.RemoteVectorEnv(1, env_id=ENV, port=0, public_url=bad)


def test_public_url_type_is_checked():
    with pytest.raises(TypeError, match="public_url"):
        ws_gym.RemoteEnv(ENV, port=0, public_url=b"ws://x/ws")


def test_sb3_make_vec_env_passes_public_url_on():
    pytest.importorskip("stable_baselines3")
    from ws_gym.sb3 import make_vec_env

    venv = make_vec_env(ENV, 2, port=0, local_workers=1, public_url=PUBLIC, connect_timeout=60)
    try:
        assert venv.venv.venv.url == PUBLIC and venv.venv.venv.token
        assert venv.reset().shape == (2, 4)
    finally:
        venv.close()


# ------------------------------------------------------------------------ IPv6


def _has_ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback on this machine")
@pytest.mark.parametrize("host", ["[::1]", "::1"])
def test_an_ipv6_host_in_brackets(cli_workers, host):
    envs = ws_gym.RemoteVectorEnv(2, env_id=ENV, host=host, port=0, connect_timeout=60)
    try:
        port = envs._trainer.server.port
        assert envs.url == f"ws://[::1]:{port}/ws" and envs.token is None  # loopback: no token
        worker = cli_workers.start("--url", envs.url, "--env", ENV, "--num-envs", "2")
        check_steps(envs)
        assert [c.peer for c in envs._trainer.serving()] == ["::1"]
    finally:
        envs.close()
    assert cli_workers.finish(worker)[0] == EXIT_OK


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_local_workers_on_an_ipv6_host(monkeypatch):
    envs = ws_gym.RemoteVectorEnv(2, env_id=ENV, host="[::1]", port=0, local_workers=1, connect_timeout=60,
                                  transport=Transport(unix=False))  # local workers dial [::1] over TCP
    try:
        assert envs._trainer.server.local_url == f"ws://[::1]:{envs._trainer.server.port}/ws"
        check_steps(envs)
        assert [c.peer for c in envs._trainer.serving()] == ["::1"]
    finally:
        envs.close()


# --------------------------------------------------------------- the worker CLI


def test_a_wrong_path_ends_the_worker_at_once(cli_workers):
    envs = ws_gym.RemoteVectorEnv(1, env_id=ENV, port=0, connect_timeout=30)
    try:
        wrong = f"ws://127.0.0.1:{envs._trainer.server.port}/wrong"
        worker = cli_workers.start("--url", wrong, "--env", ENV)  # no --retry-timeout: it would retry for ever
        code, out = cli_workers.finish(worker, timeout=30)
        assert code == EXIT_NOT_FOUND == 6, out
        assert f"no WebSocket endpoint at {wrong} (404" in out, out
        assert "/ws" in out and "path prefix" in out and "the URL the trainer prints" in out, out
    finally:
        envs.close()


def test_local_workers_do_not_restart_a_worker_that_found_no_endpoint():
    envs = ws_gym.RemoteVectorEnv(1, env_id=ENV, port=0, connect_timeout=30)
    group = LocalWorkers(f"ws://127.0.0.1:{envs._trainer.server.port}/wrong", [1])
    try:
        proc = group.procs[0]
        assert proc.wait(timeout=30) == EXIT_NOT_FOUND
        with pytest.raises(WsGymError, match=f"exited with code {EXIT_NOT_FOUND}"):
            group.check()
        assert group.procs[0] is proc  # not started again
    finally:
        group.close()
        envs.close()


@pytest.mark.parametrize("args, words", [
    (("--url", "ws://127.0.0.1:9/ws", "--no-such-flag"), ("unrecognized arguments: --no-such-flag",)),
    (("--no-such-flag",), ("--url",)),
    ((), ("the following arguments are required: --url",)),
    (("--url", "ws://127.0.0.1:9/ws", "--num-envs", "two"), ("--num-envs", "invalid int value")),
    (("--url", "ws://127.0.0.1:9/ws", "--vectorization", "threads"), ("--vectorization", "invalid choice")),
])
def test_bad_arguments_exit_1(cli_workers, args, words):
    code, out = cli_workers.finish(cli_workers.start(*args))
    assert code == 1, out
    assert out.startswith("usage: python -m ws_gym.worker"), out
    for word in words:
        assert word in out, out


def test_help_exits_0(cli_workers):
    code, out = cli_workers.finish(cli_workers.start("--help"))
    assert code == 0 and "--url" in out and "usage:" in out, out
