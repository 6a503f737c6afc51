"""The trainer's dashboard over HTTP: ``GET /`` (the page), ``GET /status``
(the snapshot as JSON) and ``GET /metrics`` (Prometheus text).

The routes only check access and move bytes: the numbers are
:mod:`ws_gym.stats`' (sampled once a second by a task here, on the server's
loop), the Prometheus text :mod:`ws_gym.metrics`', the page a static file
(``dashboard.html``: inline CSS and JS, no build, nothing fetched from
elsewhere) that polls ``status`` every second. Nothing here touches the step
path: a reader costs the loop one snapshot, whatever it reads.

They are served on the trainer's own port (same host, same TLS); with a
relay, whose forwarded connections reach the trainer's server, on a port of
their own on 127.0.0.1 instead (``dashboard_port``).

Access: a request from loopback (its socket's peer, with no ``Forwarded`` or
``X-Forwarded-For`` header: a proxy on this machine makes everyone look
local) is served. Any other needs the workers' token: in the
``X-WS-Gym-Token`` header, as ``Authorization: Bearer``, or once as
``?token=``, which sets an HttpOnly, SameSite=Strict cookie (Secure over
TLS) and redirects to the same URL without it. Otherwise: 401, no data. A
trainer without a token (loopback only) serves everyone but requests through
a proxy (403), as it does for workers; with ``token=""`` everyone.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import socket
import threading
from importlib import resources
from typing import Any, Callable, Iterable
from urllib.parse import urlencode

import orjson
from aiohttp import web

from . import metrics
from .forwarded import forwarded_client
from .protocol import TOKEN_HEADER
from .stats import Stats

log = logging.getLogger("ws_gym")

COOKIE = "ws_gym_dashboard"
PLACEHOLDER = "<envs.token>"  # the token in the worker command, for readers who did not present it
NO_STORE = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
PAGE_HEADERS = {
    **NO_STORE,
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                               "connect-src 'self'; img-src 'self' data:; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
}
SAMPLE_INTERVAL = 1.0  # seconds between samples (the charts' resolution)


def loopback_peer(remote: str | None) -> bool:
    """Whether a socket's peer address is this machine's loopback (IPv4-mapped too)."""
    try:
        address = ipaddress.ip_address((remote or "").split("%", 1)[0])
    except ValueError:
        return False  # a Unix socket, or no peer
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


class Dashboard:
    """The dashboard's routes, its sampler, and (with a relay) its own port.

    Args:
        stats: the run's statistics (the loop thread samples and snapshots them).
        conns: the workers' connections now (the slot table's, read on the loop).
        loop: the server's event loop.
        token: the workers' token (``None``: none).
        refuse_proxied: refuse requests through a proxy (a trainer with no token).
        tls: the trainer's port serves TLS (the cookie is then ``Secure``).
    """

    def __init__(self, stats: Stats, conns: Callable[[], Iterable[Any]], loop: asyncio.AbstractEventLoop, *,
                 token: str | None, refuse_proxied: bool, tls: bool) -> None:
        self.stats = stats
        self.conns = conns
        self.loop = loop
        self.token = token
        self.refuse_proxied = refuse_proxied
        self.tls = tls
        self._cookie = None if token is None else hmac.new(
            token.encode(), b"ws_gym dashboard", hashlib.sha256).hexdigest()  # not the token itself
        self._page: bytes | None = None
        self._runner: web.AppRunner | None = None
        self._sampler: asyncio.Task | None = None
        self._loop_thread: int | None = None

    # ------------------------------------------------------------ loop thread

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/", self._page_route)
        app.router.add_get("/status", self._status_route)
        app.router.add_get("/metrics", self._metrics_route)

    async def start(self, port: int | None) -> int | None:
        """Start sampling; with ``port`` (a relay) also serve on 127.0.0.1:``port``
        (0: a free one), and return the port."""
        self._loop_thread = threading.get_ident()
        bound = None
        if port is not None:
            app = web.Application()
            self.add_routes(app)
            self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
            await self._runner.setup()
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                if hasattr(socket, "SO_REUSEADDR") and not hasattr(socket, "SO_EXCLUSIVEADDRUSE"):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(("127.0.0.1", port))
                await web.SockSite(self._runner, sock).start()
            except OSError as exc:
                sock.close()
                await self.close()
                raise OSError(exc.errno, f"cannot serve the dashboard on 127.0.0.1:{port}: {exc.strerror}; "
                              "leave dashboard_port out for a free port") from None
            bound = sock.getsockname()[1]
        self._sampler = asyncio.ensure_future(self._sample())
        return bound

    async def close(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            await asyncio.gather(self._sampler, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _sample(self) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            try:
                self.stats.sample(self.conns())
            except Exception:  # noqa: BLE001 - the statistics must never end the server
                log.exception("ws_gym: sampling the run's statistics failed")
            due = max(due + SAMPLE_INTERVAL, loop.time())
            await asyncio.sleep(due - loop.time())

    def snapshot(self) -> dict[str, Any]:
        """The snapshot ``/status`` serves; on the loop thread, or once it stopped."""
        return self.stats.snapshot(self.conns())

    # ---------------------------------------------------------- other threads

    def snapshot_now(self, timeout: float = 10.0) -> dict[str, Any]:
        """:meth:`snapshot`, made on the loop thread while it runs."""
        if not self.loop.is_running() or self._loop_thread == threading.get_ident():
            return self.snapshot()

        async def make() -> dict[str, Any]:
            return self.snapshot()

        return asyncio.run_coroutine_threadsafe(make(), self.loop).result(timeout)

    # ----------------------------------------------------------------- routes

    def _access(self, request: web.Request) -> tuple[web.Response | None, bool]:
        """(a refusal or redirect to answer instead, whether the token was presented)."""
        proxied = forwarded_client(request.headers) is not None
        if self.token is None:
            if proxied and self.refuse_proxied:
                return web.Response(status=403, text="ws_gym: requests through a proxy need a token; start "
                                    "the trainer with token=... or public_url=...\n", headers=NO_STORE), False
            return None, False
        given = request.query.get("token")
        if given is not None:
            if not self._is_token(given):
                return self._unauthorized(), False
            return self._redirect(request), True
        header = request.headers.get(TOKEN_HEADER)
        bearer = request.headers.get("Authorization", "")
        if header is None and bearer[:7].lower() == "bearer ":
            header = bearer[7:].strip()
        if header is not None and self._is_token(header):
            return None, True
        cookie = request.cookies.get(COOKIE)
        assert self._cookie is not None  # there is a token
        if cookie is not None and hmac.compare_digest(cookie.encode("utf-8", "surrogateescape"),
                                                      self._cookie.encode()):
            return None, True
        if not proxied and loopback_peer(request.remote):
            return None, False
        return self._unauthorized(), False

    def _is_token(self, given: str) -> bool:
        assert self.token is not None
        return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), self.token.encode())

    @staticmethod
    def _unauthorized() -> web.Response:
        return web.Response(
            status=401, headers={**NO_STORE, "WWW-Authenticate": 'Bearer realm="ws_gym"'},
            text="ws_gym: this dashboard needs the trainer's token (envs.token): open it once with "
                 "?token=..., or send it in the X-WS-Gym-Token header or as Authorization: Bearer ...\n")

    def _redirect(self, request: web.Request) -> web.Response:
        """To the same URL without ``token``, relative (it works under a proxy's path
        prefix), with the cookie that stands for the token from now on."""
        rest = [(k, v) for k, v in request.query.items() if k != "token"]
        location = (request.path.rsplit("/", 1)[-1] or "./") + ("?" + urlencode(rest) if rest else "")
        secure = self.tls or request.headers.get("X-Forwarded-Proto", "").lower() == "https"
        cookie = f"{COOKIE}={self._cookie}; HttpOnly; SameSite=Strict" + ("; Secure" if secure else "")
        return web.Response(status=303, headers={**NO_STORE, "Location": location, "Set-Cookie": cookie})

    async def _page_route(self, request: web.Request) -> web.StreamResponse:
        refused, _ = self._access(request)
        if refused is not None:
            return refused
        if self._page is None:
            self._page = resources.files("ws_gym").joinpath("dashboard.html").read_bytes()
        return web.Response(body=self._page, content_type="text/html", charset="utf-8", headers=PAGE_HEADERS)

    async def _status_route(self, request: web.Request) -> web.StreamResponse:
        refused, presented = self._access(request)
        if refused is not None:
            return refused
        snapshot = self.snapshot()
        run = snapshot["run"]
        if self.token is not None and not presented and run.get("worker_command"):
            run["worker_command"] = run["worker_command"].replace(self.token, PLACEHOLDER)
        return web.Response(body=orjson.dumps(snapshot), content_type="application/json", headers=NO_STORE)

    async def _metrics_route(self, request: web.Request) -> web.StreamResponse:
        refused, _ = self._access(request)
        if refused is not None:
            return refused
        return web.Response(body=metrics.render(self.snapshot()).encode(),
                            headers={**NO_STORE, "Content-Type": metrics.CONTENT_TYPE})
