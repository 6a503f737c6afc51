"""The worker's client: dials out to the trainer, handshakes, serves, dials again.

:class:`Worker` keeps one worker process's state across reconnects: it dials
with backoff until the trainer is up, says why it gives up (exit codes in
:mod:`ws_gym.protocol`), checks the env the trainer asks for
(:func:`env_allowed`), makes it (:class:`~ws_gym.host.EnvHost`) and serves the
session over a link (:mod:`ws_gym.worker_links`) until the trainer closes or the
link drops. The command line is :mod:`ws_gym.worker`.

Behind an HTTP proxy, :func:`ws_gym.proxies.proxy_for` decides which proxy
(if any) a worker dials through.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import os
import random
import socket
import ssl
from typing import Any, Mapping
from urllib.parse import urlsplit

import aiohttp

from . import codec, replies
from . import compression as Z
from . import protocol as P
from .errors import HandshakeError, ProtocolError
from .config import DEFAULT_MAX_MSG_SIZE as DEFAULT_MAX_MSG
from .config import check_vectorization
from .host import EnvHost
from .proxies import choose_proxy, without_credentials
from .liveness import WorkerLiveness, check_interval, give_up_unacked, unacked_limit
from .worker_links import AiohttpLink, SessionClosed, WireLink
from .worker_status import StatusReport
from .wsio import receive_message

log = logging.getLogger("ws_gym.worker")

TOKEN_ENV = P.TOKEN_ENV
TOKEN_HEADER = P.TOKEN_HEADER

EXIT_OK, EXIT_REFUSED, EXIT_UNAUTHORIZED, EXIT_GAVE_UP, EXIT_UNTRUSTED = (
    P.EXIT_OK, P.EXIT_REFUSED, P.EXIT_UNAUTHORIZED, P.EXIT_GAVE_UP, P.EXIT_UNTRUSTED
)
EXIT_NOT_FOUND = P.EXIT_NOT_FOUND


# A dead trainer does not answer a close: do not wait long for it. (aiohttp 3.9
# takes seconds, later versions a ClientWSTimeout: the type depends on the version.)
_WS_TIMEOUT: Any = aiohttp.ClientWSTimeout(ws_close=2.0) if hasattr(aiohttp, "ClientWSTimeout") else 2.0


# aiohttp >= 3.11 tells a failed name lookup apart
_DNS_ERRORS: tuple[type[Exception], ...] = tuple(
    e for e in (getattr(aiohttp, "ClientConnectorDNSError", None),) if e is not None)

RETURN_BACKOFF_CAP = 2.0  # seconds between a served worker's attempts to dial in again, at most


def backoff_delays(first: float = 0.1, cap: float = 5.0):
    """Exponential back-off with full jitter: 0.1 s doubling up to ``cap``."""
    delay = first
    while True:
        yield random.uniform(delay / 2, delay)
        delay = min(delay * 2, cap)


def env_allowed(env_id: str, *, fixed: str | None, allow_import: bool) -> str | None:
    """Why this worker will not host ``env_id`` (None when it will).

    A worker never imports a module the trainer names unless told it may.
    """
    if fixed is not None:
        return None if env_id == fixed else (
            f"env mismatch: the trainer wants {env_id!r}, this worker hosts {fixed!r}"
        )
    if ":" in env_id and not allow_import:
        return (
            f"the trainer's env id {env_id!r} imports a module; "
            "start the worker with --allow-import or --env to allow it"
        )
    return None


def client_ssl(
    url: str, *, cafile: str | None = None, insecure: bool = False, cert_fingerprint: str | None = None
) -> ssl.SSLContext | aiohttp.Fingerprint | bool:
    """How the worker checks a ``wss://`` trainer: aiohttp's ``ssl=`` argument.

    By default the system's CAs and the host name; ``cafile``: that CA (or
    self-signed certificate) only; ``cert_fingerprint``: exactly the certificate
    with that SHA-256; ``insecure``: nothing at all.
    """
    chosen = [n for n, v in (("--cafile", cafile), ("--insecure", insecure),
                             ("--cert-fingerprint", cert_fingerprint)) if v]
    if len(chosen) > 1:
        raise ValueError(f"{' and '.join(chosen)} exclude each other")
    if chosen and not url.lower().startswith("wss://"):
        raise ValueError(f"{chosen[0]} needs a wss:// URL (the trainer serves TLS), got {url}")
    if cafile:
        try:
            return ssl.create_default_context(cafile=cafile)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise ValueError(f"--cafile {cafile}: cannot load it ({exc})") from None
    if cert_fingerprint:
        digest = cert_fingerprint.replace(":", "").strip()
        try:
            raw = bytes.fromhex(digest)
        except ValueError:
            raw = b""
        if len(raw) != 32:
            raise ValueError(f"--cert-fingerprint must be a SHA-256 in hex (64 digits), got {cert_fingerprint!r}")
        return aiohttp.Fingerprint(raw)
    return not insecure


class Worker:
    """One worker process's state across reconnects."""

    def __init__(
        self,
        url: str,
        *,
        env_id: str | None = None,
        num_envs: int = 1,
        env_kwargs: dict | None = None,
        token: str | None = None,
        allow_import: bool = False,
        retry_timeout: float | None = None,
        max_msg_size: int = DEFAULT_MAX_MSG,
        name: str | None = None,
        cafile: str | None = None,
        insecure: bool = False,
        cert_fingerprint: str | None = None,
        vectorization: str = "sync",
        unix_socket: str | None = None,
        busy_poll: float = 0.0,
        proxy: str | None = None,
        environ: Mapping[str, str] | None = None,
        status_interval: float = 0.0,
        compression: str = "auto",
    ) -> None:
        self.url = url
        self.offered_codecs = Z.offer(compression)  # what the hello offers (ImportError: not installed)
        self._shown_url = without_credentials(url)  # what the logs say
        if not busy_poll >= 0:
            raise ValueError(f"busy_poll must be >= 0 seconds, got {busy_poll!r}")
        self.busy_poll = busy_poll  # seconds to keep reading after each reply (POSIX, plain ws)
        self.status_interval = status_interval  # seconds between status lines (0: none; ws_gym.worker_status)
        self.unix_socket = unix_socket
        self._last_rx = 0.0  # loop time of the last frame from the trainer (or our last reply)
        self.vectorization = check_vectorization(vectorization)
        self.insecure = insecure
        self.cafile = cafile
        self._ssl = client_ssl(url, cafile=cafile, insecure=insecure, cert_fingerprint=cert_fingerprint)
        # A Unix socket is this machine's: never through a proxy (see proxy_for for the rest).
        chosen = None if unix_socket else choose_proxy(url, proxy, environ or {})
        self.proxy: str | None = chosen[0] if chosen else None  # credentials included: never log it
        self._proxy_source = chosen[1] if chosen else ""  # --proxy or the variable that named it
        self._shown_proxy = without_credentials(self.proxy) if self.proxy else ""
        self.env_id = env_id
        self.num_envs = num_envs
        self.env_kwargs = env_kwargs
        self.token = token
        self.allow_import = allow_import
        self.retry_timeout = retry_timeout
        self.max_msg_size = max_msg_size
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.host: EnvHost | None = None
        self._delays_reset = False
        self.worker_id: str | None = None  # the trainer's name for us, presented again on a reconnect

    async def run(self) -> int:
        """Connect, serve, reconnect after drops; return the process exit code."""
        loop = asyncio.get_running_loop()
        headers = {TOKEN_HEADER: self.token} if self.token else {}
        # a SYN into a link that is still down is retried by the kernel at 1 s and 3 s;
        # past that a fresh attempt finds a returning link sooner
        timeout = aiohttp.ClientTimeout(total=None, connect=10, sock_connect=3)
        delays = backoff_delays()
        waited_since = loop.time()
        announced = proxy_announced = tls_warned = ws_hinted = False
        last_refusal = None
        last_proxy_refusal: int | None = None
        url = self._shown_url
        via = f" through proxy {self._shown_proxy}" if self.proxy else ""
        if self.insecure:
            log.warning(
                "--insecure: the trainer's TLS certificate is NOT verified. Anyone on the network "
                "path can pose as the trainer, read the token and have this worker run envs for "
                "them. Use --cafile with the trainer's certificate or CA instead."
            )
        if self.proxy:
            log.info("connecting to %s through proxy %s", url, self._shown_proxy)
        connector = aiohttp.UnixConnector(path=self.unix_socket) if self.unix_socket else None
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            while True:
                proxy_down = None  # why the proxy could not be reached, at this attempt
                try:
                    async with session.ws_connect(
                        self.url, headers=headers, max_msg_size=self.max_msg_size,
                        compress=0, autoping=False, autoclose=True, ssl=self._ssl,
                        timeout=_WS_TIMEOUT, proxy=self.proxy,
                    ) as ws:
                        log.info("connected to %s%s%s", url, via,
                                 " (certificate NOT verified: --insecure)" if self.insecure else "")
                        try:
                            await self._session(ws)
                        except SessionClosed:
                            log.info("the trainer closed the session; exiting")
                            return EXIT_OK
                        except HandshakeError as exc:
                            if not exc.retry:
                                log.error("refused by the trainer: %s", exc.reason)
                                return EXIT_REFUSED
                            # once per reason, not at every attempt
                            log.log(logging.DEBUG if exc.reason == last_refusal else logging.WARNING,
                                    "refused for now (%s); retrying", exc.reason)
                            last_refusal = exc.reason
                        except ProtocolError as exc:
                            log.error("the trainer broke the protocol: %s", exc)
                            return EXIT_REFUSED
                        except (ConnectionError, asyncio.TimeoutError) as exc:
                            log.warning("connection lost (%s); reconnecting", exc)
                        finally:
                            self._close_envs()
                        waited_since = loop.time()
                except aiohttp.ClientHttpProxyError as exc:  # the proxy answered CONNECT with no tunnel
                    if exc.status == 407:
                        return self._proxy_auth_failed(exc.status, exc.message)
                    if exc.status in (502, 503, 504):  # it cannot reach the trainer: not up yet, maybe
                        if not announced:
                            log.info("waiting for the trainer at %s: the proxy at %s cannot reach it (%s %s)",
                                     url, self._shown_proxy, exc.status, exc.message)
                            announced = True
                    else:  # once per status, not at every attempt
                        log.log(logging.DEBUG if exc.status == last_proxy_refusal else logging.WARNING,
                                "the proxy at %s refused to connect to %s (%s %s); retrying",
                                self._shown_proxy, self._target(), exc.status, exc.message)
                        last_proxy_refusal = exc.status
                except aiohttp.WSServerHandshakeError as exc:
                    if exc.status == 407 and self.proxy:  # ws://: the proxy answers the upgrade itself
                        return self._proxy_auth_failed(exc.status, exc.message)
                    hint = "" if ws_hinted else self._ws_proxy_hint()  # once
                    ws_hinted = ws_hinted or bool(hint)
                    if exc.status == 403:  # not about a token: e.g. a proxied connection to a trainer without one
                        log.error("the trainer at %s refused this worker (403 %s): the trainer's log says why%s%s",
                                  url, exc.message, "" if self.token else
                                  f" (a trainer reached through a proxy needs a token: set {TOKEN_ENV} or --token)",
                                  hint)
                        return EXIT_UNAUTHORIZED
                    if exc.status == 404:  # retrying cannot fix a wrong path
                        log.error("no WebSocket endpoint at %s (404 %s): use the URL the trainer prints (it "
                                  "ends in /ws; a relay's has the room in it, and behind a reverse proxy it "
                                  "includes the proxy's path prefix, e.g. wss://trainer.example/PREFIX/ws). "
                                  "Not retrying%s",
                                  url, exc.message, hint)
                        return EXIT_NOT_FOUND
                    if exc.status == 401 and not self.token:
                        log.error("the trainer requires a token and this worker has none (%s %s): "
                                  "set %s (or --token) to the trainer's token (envs.token on the "
                                  "trainer; a generated one is also in its log)",
                                  exc.status, exc.message, TOKEN_ENV)
                        return EXIT_UNAUTHORIZED
                    if exc.status == 401:
                        log.error("the trainer rejected this worker's token (%s %s): check --token or %s",
                                  exc.status, exc.message, TOKEN_ENV)
                        return EXIT_UNAUTHORIZED
                    if exc.status == 503:
                        log.warning("the trainer at %s is busy or closing (503 %s); retrying", url, exc.message)
                    else:
                        log.warning("handshake with %s failed: %s %s%s", url, exc.status, exc.message, hint)
                except aiohttp.ServerFingerprintMismatch as exc:
                    log.error("the TLS certificate (the trainer's, or its relay's) is not the expected one "
                              "(SHA-256 %s, --cert-fingerprint %s); not connecting", exc.got.hex(), exc.expected.hex())
                    return EXIT_UNTRUSTED
                except aiohttp.ClientConnectorCertificateError as exc:
                    advice = (f"--cafile {self.cafile} does not verify it" if self.cafile else
                              "for a self-signed certificate or a private CA pass --cafile with it")
                    log.error("the TLS certificate at %s (the trainer's, or its relay's) failed verification: "
                              "%s; %s. Not connecting (retrying cannot fix this)", url, exc.certificate_error, advice)
                    return EXIT_UNTRUSTED
                except aiohttp.ClientConnectorSSLError as exc:
                    if not tls_warned:  # e.g. wss:// to a trainer without TLS: it may restart with TLS
                        log.warning("TLS handshake with %s failed (%s); does the trainer serve wss:// "
                                    "(certfile= or ssl_context=)? retrying", url, exc.os_error)
                        tls_warned = True
                except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
                    proxy_down = self._proxy_unreachable(exc)
                    if proxy_down is not None:
                        if not proxy_announced:
                            log.info("waiting for the proxy at %s (%s); retrying", self._shown_proxy, proxy_down)
                            proxy_announced = True
                    elif not announced:
                        log.info("waiting for the trainer at %s%s (%s)", url, via, exc.__class__.__name__)
                        announced = True
                    if (isinstance(exc, aiohttp.ServerDisconnectedError) and not tls_warned
                            and self.url.lower().startswith("ws://")):
                        log.warning("%s hung up at once: if the trainer serves TLS, its URL starts "
                                    "with wss://; retrying%s", url, self._ws_proxy_hint())
                        tls_warned = True
                if self._delays_reset:  # a session was served: start backing off afresh, and
                    # back off less far: the link of a PC that served is likely to return soon
                    delays, self._delays_reset = backoff_delays(cap=RETURN_BACKOFF_CAP), False
                if self.retry_timeout is not None and loop.time() - waited_since > self.retry_timeout:
                    if proxy_down is not None:
                        log.error("the proxy at %s is still unreachable (%s) after %.0f s; giving up",
                                  self._shown_proxy, proxy_down, self.retry_timeout)
                    else:
                        log.error("no trainer at %s%s after %.0f s; giving up", url, via, self.retry_timeout)
                    return EXIT_GAVE_UP
                await asyncio.sleep(next(delays))

    def _target(self) -> str:
        """The trainer's host:port, as a CONNECT names it."""
        parts = urlsplit(self.url)
        try:
            port = parts.port
        except ValueError:
            port = None
        host = parts.hostname or "?"
        host = f"[{host}]" if ":" in host else host
        return f"{host}:{port or (443 if parts.scheme.lower() == 'wss' else 80)}"

    def _proxy_unreachable(self, exc: BaseException) -> str | None:
        """Why the proxy cannot be reached, when that is what ``exc`` says (None otherwise)."""
        if not self.proxy or not isinstance(exc, aiohttp.ClientConnectorError):
            return None
        os_error = exc.os_error
        # through a proxy only the proxy's name is resolved here (the proxy resolves the trainer's)
        if isinstance(exc, _DNS_ERRORS) or isinstance(os_error, socket.gaierror):
            return f"cannot resolve its name: {os_error.strerror or os_error}"
        if not isinstance(exc, aiohttp.ClientProxyConnectionError):
            return None
        if isinstance(os_error, ConnectionRefusedError):
            return "connection refused"
        return os_error.strerror or os_error.__class__.__name__

    def _proxy_auth_failed(self, status: int, message: str) -> int:
        """Log a proxy's 407 (naming the proxy, never its password); the exit code."""
        if urlsplit(self.proxy or "").username is not None:
            log.error("the proxy at %s rejected this worker's credentials (%s %s): check the user and "
                      "password in %s; not retrying", self._shown_proxy, status, message, self._proxy_source)
        else:
            log.error("the proxy at %s requires authentication (%s %s): give its user and password in the "
                      "proxy URL, http://USER:PASSWORD@HOST:PORT (%s); not retrying",
                      self._shown_proxy, status, message, self._proxy_source)
        return EXIT_UNAUTHORIZED

    def _ws_proxy_hint(self) -> str:
        if not (self.proxy and self.url.lower().startswith("ws://")):
            return ""
        return (f". Through a proxy ({self._shown_proxy}) a ws:// URL is not tunnelled: the upgrade goes to "
                "the proxy as GET ws://HOST:PORT/PATH, which most proxies refuse; use the trainer's wss:// "
                "URL, which the proxy tunnels with CONNECT")

    async def _session(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        await ws.send_bytes(codec.encode(
            P.HELLO, 0, P.make_hello(self.env_id, self.num_envs, self.name, self.worker_id, self.offered_codecs)))
        msg = await receive_message(ws, 60, "during the handshake")
        if msg.kind == P.REFUSE:
            raise HandshakeError(P.parse_reason(msg.body), retry=P.parse_retry(msg.body))
        if msg.kind != P.WELCOME:
            raise ProtocolError(f"expected welcome, got {msg.kind!r}")
        welcome = P.parse_welcome(codec.writable(msg.body))
        if welcome.compression is not None and welcome.compression not in self.offered_codecs:
            raise ProtocolError(f"the trainer chose compression {welcome.compression!r}, which this worker "
                                f"did not offer ({', '.join(self.offered_codecs) or 'none'})")
        if welcome.worker_id is not None:
            self.worker_id = welcome.worker_id
        if welcome.heartbeat:  # a reply into a dead link ends the connection (see ws_gym.liveness)
            give_up_unacked(ws.get_extra_info("socket"), unacked_limit(welcome.heartbeat))
        # The trainer now waits for our ready: nothing of its is on the way, so the
        # connection can leave aiohttp's message API without a byte left behind.
        link = WireLink.take_over(ws, self) or AiohttpLink(ws, self)
        try:
            await self._handshake_rest(link, welcome)
        finally:
            link.end()

    async def _handshake_rest(self, link: AiohttpLink | WireLink, welcome: P.Welcome) -> None:
        why = env_allowed(welcome.env_id, fixed=self.env_id, allow_import=self.allow_import)
        if why is None and self.env_kwargs is not None:
            welcome = dataclasses.replace(welcome, env_kwargs={**welcome.env_kwargs, **self.env_kwargs})
        if why is not None:
            await link.send(codec.encode(P.ERROR, 0, {"type": "Refused", "message": why, "traceback": ""}))
            raise HandshakeError(why)
        try:
            host = self.host = EnvHost(welcome, vectorization=self.vectorization)
            if welcome.compression is not None:  # this connection's observations may travel compressed
                host.zip = Z.Compressor(welcome.compression, welcome.compress == "auto")
        except Exception as exc:  # env creation failed: tell the trainer why
            log.exception("could not create %s", welcome.env_id)
            await link.send(codec.encode(P.ERROR, 0, P.error_body(exc)))
            raise HandshakeError(f"could not create env {welcome.env_id!r}: {exc}") from exc
        # What exists now (modules, envs) lives as long as the session: keep the
        # collector from scanning it again and again at every step's garbage.
        gc.freeze()
        await link.send(codec.encode(P.READY, 0, host.ready_body()))
        msg = await link.receive(60)
        if msg.kind == P.REFUSE:
            raise HandshakeError(P.parse_reason(msg.body), retry=P.parse_retry(msg.body))
        if msg.kind != P.ACCEPT:
            raise ProtocolError(f"expected accept, got {msg.kind!r}")
        self._delays_reset = True
        log.info("hosting %d x %s as envs %d..%d%s", welcome.num_envs, welcome.env_id,
                 welcome.first_index, welcome.first_index + welcome.num_envs - 1,
                 "" if welcome.compression is None else
                 f"; observations compressed with {welcome.compression} ({welcome.compress})")
        with StatusReport(self, link, welcome):  # a line now and then, and one at the end
            if not welcome.heartbeat:
                await link.serve(host)
                return
            # A live trainer sends something at least every half heartbeat (requests or
            # pings): hearing nothing for longer means it or the link is gone.
            live = WorkerLiveness(welcome.heartbeat)
            serve = asyncio.ensure_future(link.serve(host))
            silent = asyncio.ensure_future(self._watch_trainer(serve, live))
            try:
                await serve
            except asyncio.CancelledError:
                if silent.done() and not silent.cancelled() and silent.result():
                    link.abort()  # nothing gets through: no close frame, no wait for one
                    raise ConnectionResetError(
                        f"the trainer sent nothing for {live.silence_limit:g} s (heartbeat)") from None
                raise
            finally:
                silent.cancel()
                serve.cancel()

    async def _watch_trainer(self, serve: asyncio.Future, live: WorkerLiveness) -> bool:
        """Cancel ``serve`` when the trainer has been silent too long."""
        loop = asyncio.get_running_loop()
        interval = check_interval(live.heartbeat)
        while not serve.done():
            await asyncio.sleep(interval)
            if live.dead(loop.time(), self._last_rx):
                serve.cancel()
                return True
        return False

    # the reply frame to each request (ws_gym.replies; tests and links call them here)
    answer = staticmethod(replies.answer)
    reply = staticmethod(replies.reply)

    def _close_envs(self) -> None:
        gc.unfreeze()  # the session's objects may be collected again (a reconnect makes new ones)
        if self.host is not None:
            try:
                self.host.close()
            except Exception:
                log.exception("error while closing envs")
            self.host = None
