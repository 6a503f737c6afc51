"""What RemoteVectorEnv and RemoteEnv share: the server, local workers, waiting.

A :class:`Trainer` owns one :class:`~ws_gym.server.Server` (and through it the
slot table and the call book) and, with ``local_workers``, the worker
processes it started. It learns the env's spaces
either by making the env once locally (when its id is registered here) or from
the first worker's handshake.
"""

from __future__ import annotations

import atexit
import importlib
import logging
import os
import secrets
import shutil
import socket
import ssl
import sys
import tempfile
import time
import weakref
from typing import Any
from urllib.parse import urlsplit

import gymnasium as gym
from gymnasium.vector import AutoresetMode

from . import codec
from . import protocol as P
from .addresses import certificate_fingerprint, format_url, is_loopback, loopback_for
from .admission import Expectation
from .calls import Call
from .config import CALLER_POLL, WORKER_POLL, RemoteConfig, Transport
from .connection import WorkerConn
from .errors import ConnectTimeoutError, WsGymError
from .local import LocalWorkers, split_envs
from .relay_link import RelaySettings
from .server import Server
from .metadata import jsonable_metadata
from .spaces import schema_to_space, space_to_schema
from .stats import RunCounters, Stats

log = logging.getLogger("ws_gym")

# Trainers not closed by the user are closed at exit, while the loop thread can
# still run (a __del__ during interpreter shutdown could only wait for it).
_open: "weakref.WeakSet[Trainer]" = weakref.WeakSet()


@atexit.register
def _close_open_trainers() -> None:
    for trainer in list(_open):
        try:
            trainer.close()
        except Exception as exc:  # noqa: BLE001 - exiting regardless
            log.debug("closing a trainer at exit: %r", exc)


def _say(text: str) -> None:
    """Progress for the user: through logging when the application configured
    any (so its levels apply), else on stderr so the first run is never silent."""
    if log.hasHandlers():
        log.info("%s", text)
    else:
        print(f"ws_gym: {text}", file=sys.stderr, flush=True)


def server_ssl_context(
    ssl_context: ssl.SSLContext | None, certfile: str | None, keyfile: str | None
) -> ssl.SSLContext | None:
    """The context the trainer serves ``wss://`` with, or None for plain ``ws://``."""
    if ssl_context is not None:
        if not isinstance(ssl_context, ssl.SSLContext):
            raise TypeError(f"ssl_context must be an ssl.SSLContext, got {type(ssl_context).__name__}")
        if certfile is not None or keyfile is not None:
            raise ValueError("pass either ssl_context= or certfile=/keyfile=, not both")
        return ssl_context
    if certfile is None:
        if keyfile is not None:
            raise ValueError("keyfile= needs certfile=")
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(certfile, keyfile)
    return ctx


def probe(env_id: str | None, env_kwargs: dict, max_episode_steps: int | None) -> P.Ready | None:
    """Make the env once here to learn its spaces, if its id is registered here."""
    if env_id is None:
        return None
    try:
        module, _, name = env_id.rpartition(":")
        if module:
            importlib.import_module(module)
        gym.spec(name)
    except Exception:  # not registered (or its module not importable) on the trainer
        return None
    kwargs = dict(env_kwargs)
    if max_episode_steps is not None:
        kwargs["max_episode_steps"] = max_episode_steps
    try:
        env = gym.make(env_id, **kwargs)
    except Exception as exc:
        log.debug("could not make %s locally to read its spaces (%r); asking the workers", env_id, exc)
        return None
    try:
        return P.Ready(
            space_to_schema(env.observation_space),
            space_to_schema(env.action_space),
            env.render_mode,
            jsonable_metadata(env.metadata),
        )
    finally:
        env.close()


class Trainer:
    """Server + local workers + the spaces every worker must match.

    The remote envs speak to their workers through it only: which workers
    serve which envs (:meth:`serving`, :meth:`layout`), the calls
    (:meth:`request`, :meth:`submit`, :meth:`wait`), the waits for workers
    and spaces.
    """

    def __init__(self, config: RemoteConfig, *, num_envs: int, mode: str) -> None:
        self.config = config
        server_ssl = server_ssl_context(config.ssl_context, config.certfile, config.keyfile)
        token, public_url, host = config.token, config.public_url, config.host
        relay = None
        if config.relay is not None:  # remote workers come through the relay; local ones on loopback
            assert config.relay_token is not None  # RemoteConfig checked it
            relay = RelaySettings(config.relay, config.relay_token, config.relay_cafile, config.relay_route(),
                                  config.relay_room)
            host = "127.0.0.1"
        self.token_generated = False
        tokens_off = token == ""  # no token on purpose: proxied connections are let in too
        if token is None and (not is_loopback(host) or public_url is not None or relay is not None):
            # Reachable from other machines (directly or through a proxy):
            # never without a token unless asked (token="").
            token = secrets.token_urlsafe(32)
            self.token_generated = True
        elif tokens_off:
            if public_url is not None:
                log.warning("token='' with public_url=%s: any machine that reaches that URL may serve envs",
                            public_url)
            elif not is_loopback(host):
                log.warning("token='' on %s: any machine that reaches the port may serve envs", host or "*")
            token = None
        self.token: str | None = token
        counts = split_envs(num_envs, config.local_workers) if config.local_workers else []
        self.num_envs = num_envs
        self.env_id = config.env_id
        self.wait_mode = config.wait_mode
        self.connect_timeout = config.connect_timeout
        self.step_timeout = config.step_timeout
        env_kwargs = dict(config.env_kwargs or {})
        try:  # they travel in the welcome message: fail here, not in a handshake
            codec.encode(P.WELCOME, 0, env_kwargs, strict=True)
        except codec.EncodeError as exc:
            raise TypeError(f"env_kwargs cannot be sent to workers: {exc}") from None
        autoreset = config.autoreset_mode
        assert isinstance(autoreset, AutoresetMode)  # RemoteConfig converted it
        self.run_stats = RunCounters(num_envs, autoreset.value)  # the remote env's step() and reset() count
        expect = Expectation(
            env_id=config.env_id,
            env_kwargs=env_kwargs,
            mode=mode,
            autoreset_mode=autoreset.value,
            max_episode_steps=config.max_episode_steps,
            record_episode_statistics=bool(config.record_episode_statistics),
            ready=probe(config.env_id, env_kwargs, config.max_episode_steps),
        )
        chosen = config.transport if config.transport is not None else Transport.from_environment()
        self.transport = transport = chosen.resolve(
            tls=server_ssl is not None, local_workers=config.local_workers, busy_poll=config.busy_poll,
            vectorization=config.worker_vectorization)
        self.busy_poll = bool(transport.busy_poll)
        self._unix_dir = tempfile.mkdtemp(prefix="ws_gym-") if transport.unix else None  # mode 0700
        try:
            self.server = Server(
                num_envs=num_envs, expect=expect, transport=transport, host=host,
                port=config.port if relay is None else 0, relay=relay,
                listen=relay is None or config.local_workers > 0,
                token="" if tokens_off else token, max_msg_size=config.max_msg_size,
                ready_timeout=max(self.connect_timeout, 10.0), handshake_timeout=config.handshake_timeout,
                max_pending_handshakes=config.max_pending_handshakes, ssl_context=server_ssl,
                heartbeat=config.heartbeat, wait_mode=self.wait_mode,
                unix_path=None if self._unix_dir is None else os.path.join(self._unix_dir, "trainer.sock"),
                busy_poll=CALLER_POLL if self.busy_poll else 0.0,
                stats=Stats(self.run_stats, describe=self._describe), dashboard_port=config.dashboard_port,
                compression=config.compression,
            )
        except BaseException:
            if self._unix_dir is not None:
                shutil.rmtree(self._unix_dir, ignore_errors=True)
            raise
        self.calls = self.server.calls
        self.table = self.server.table
        self.public_url = public_url
        self.relay = config.relay
        listening = self.server.url
        self.url = public_url or listening  # what workers dial (local workers: server.local_url)
        self.dashboard_url = self._dashboard_url()
        self.local: LocalWorkers | None = None
        self._next_local_check = 0.0
        self._waited = False
        try:
            if relay is not None:
                _say(f"room open on the relay at {relay.url}; on each PC run: {self.worker_command()} "
                     f"(K: the envs that PC hosts; {self.num_envs} in all); dashboard: {self.dashboard_url}")
            elif self.token_generated:
                where = listening if public_url is None else f"{listening} (workers dial {public_url})"
                _say(f"listening on {where} with a generated token (no token= was given); "
                     f"on each PC run: {self.worker_command()} (K: the envs that PC hosts; "
                     f"{self.num_envs} in all); dashboard: {self.dashboard_url}?token={token}")
            else:
                log.info("dashboard: %s", self.dashboard_url)
            if counts:
                self.local = LocalWorkers(self.server.local_url, counts, token=token,
                                          unix_socket=self.server.unix_path,
                                          cert_fingerprint=self._own_fingerprint(),
                                          vectorization=config.worker_vectorization,
                                          busy_poll=WORKER_POLL if self.busy_poll else 0.0,
                                          environment=transport.worker_environment())
                if self.wait_mode:  # keep replacing crashed local workers: training goes on
                    self.local.max_restarts = None
        except BaseException:
            self.server.close()
            raise
        self._spaces: tuple | None = None
        _open.add(self)

    # -- what the remote envs ask of their workers

    @property
    def spaces_known(self) -> bool:
        """Whether the env's spaces are known without waiting for a worker."""
        return self.server.expect.ready is not None

    def serving(self) -> list[WorkerConn]:
        """The active workers, in env order, if they cover every env; else raise WorkerLostError."""
        return self.table.serving()

    def layout(self) -> list[tuple[int, int, WorkerConn | None]]:
        """``(start, stop, worker)`` runs covering every env in order; ``None``
        where no active worker serves the envs (wait mode)."""
        return self.table.layout()

    def request(self, items: list[tuple[WorkerConn, str, Any]], timeout: float | None = -1) -> list[Any]:
        """Send one request to each ``(worker, kind, body)`` and wait for every reply
        (``timeout`` -1: ``step_timeout``)."""
        return self.calls.request(items, self.step_timeout if timeout == -1 else timeout)

    def submit(self, items: list[tuple[WorkerConn, str, Any]], tolerant: bool = False, sink: Any = None,
               notify: Any = None) -> Call:
        """Send without waiting (see :meth:`ws_gym.calls.CallBook.submit`)."""
        return self.calls.submit(items, tolerant, sink, notify)

    def first_done(self, calls: Any, done: Any, timeout: float | None) -> Call | None:
        """The first of ``calls`` to be complete (see :meth:`ws_gym.calls.CallBook.first_done`)."""
        return self.calls.first_done(calls, done, timeout)

    def wait(self, call: Call, timeout: float | None = -1) -> list[Any]:
        """The replies of a submitted call (``timeout`` -1: ``step_timeout``)."""
        return self.calls.wait(call, self.step_timeout if timeout == -1 else timeout)

    # -- workers and their command

    def worker_command(self, num_envs: int | None = None) -> str:
        """The command a user runs on a PC to serve envs to this trainer.

        ``num_envs``: the envs still missing (``K``, to fill in, when not given).
        A token ws_gym generated is shown in full (it is printed nowhere else);
        one the user chose is shown as a placeholder, to keep it out of logs.
        """
        url = self.url  # public_url as given, when there is one
        if (self.public_url is None and self.relay is None and self.server.port is not None
                and self.server.host in ("0.0.0.0", "::", "")):  # everywhere: name this machine
            url = format_url(socket.gethostname(), self.server.port, self.server.ssl_context is not None)
        env = f" --env {self.env_id}" if self.env_id else " --env ENV_ID"
        secret = ""
        if self.token is not None:
            secret = f"{P.TOKEN_ENV}={self.token if self.token_generated else '<your token>'} "
        count = "K" if num_envs is None else str(num_envs)
        return f"{secret}python -m ws_gym.worker --url {url}{env} --num-envs {count}"

    # -- the dashboard (ws_gym.dashboard, ws_gym.stats)

    def stats(self) -> dict[str, Any]:
        """The run's snapshot, as ``GET /status`` serves it, made on the server's loop."""
        return self.server.dashboard.snapshot_now()

    def _dashboard_url(self) -> str:
        if self.server.dashboard_port is not None:  # a relay: on a loopback port of its own
            return f"http://127.0.0.1:{self.server.dashboard_port}/"
        if self.public_url is not None:  # behind a reverse proxy: beside the workers' URL
            parts = urlsplit(self.public_url)
            path = parts.path[:-2] if parts.path.endswith("/ws") else parts.path.rstrip("/") + "/"
            return f"{'https' if parts.scheme.lower() == 'wss' else 'http'}://{parts.netloc}{path}"
        host = self.server.host
        if host in ("0.0.0.0", "::", ""):  # everywhere: name this machine, as worker_command()
            host = socket.gethostname()
        url = format_url(host, self.server.port or 0, self.server.ssl_context is not None)
        return "http" + url[2:-len("/ws")] + "/"

    def _describe(self) -> dict[str, Any]:
        """What the dashboard shows of the run besides its numbers (on the loop thread)."""
        if "dashboard_url" not in vars(self):  # still starting
            return {}
        expect = self.server.expect
        return {"env_id": expect.env_id, "autoreset_mode": expect.autoreset_mode, "mode": expect.mode,
                "url": self.url, "worker_command": self.worker_command(), "dashboard_url": self.dashboard_url}

    def _own_fingerprint(self) -> str | None:
        """SHA-256 of our own TLS certificate, which local workers pin (None without TLS).

        Local workers dial loopback, where the certificate's host name would not
        match and a private CA would need a file we may not have (a bare
        ``ssl_context``); pinning the exact certificate needs neither.
        """
        if self.server.ssl_context is None or self.server.port is None:
            return None
        try:
            return certificate_fingerprint(loopback_for(self.server.host), self.server.port)
        except (OSError, ssl.SSLError) as exc:
            raise WsGymError(f"could not read this trainer's own TLS certificate for its local workers: {exc}") from exc

    def check_local(self) -> None:
        """Restart crashed local workers (at most every half second: in wait mode it
        is called on every step, and in the waits for workers)."""
        if self.local is not None:
            now = time.monotonic()
            if now >= self._next_local_check:
                self._next_local_check = now + 0.5
                self.local.check(free=self.table.covered() < self.num_envs)

    def spaces(self) -> tuple[gym.Space, gym.Space, P.Ready]:
        """(observation space, action space, ready info): waits for a worker if needed."""
        if self._spaces is None:
            ready = self.server.expect.ready
            if ready is None:
                _say(f"waiting for a worker at {self.url} to learn the env's spaces; run: {self.worker_command()}")
                ready = self._wait_spaces(self.connect_timeout)
            self._spaces = (schema_to_space(ready.observation_space), schema_to_space(ready.action_space), ready)
        return self._spaces

    def _wait_spaces(self, timeout: float) -> P.Ready:
        deadline = time.monotonic() + timeout
        table = self.table
        with table.cond:
            while self.server.expect.ready is None:
                now = time.monotonic()
                self.check_local()
                if now >= deadline:
                    raise ConnectTimeoutError(
                        f"no worker connected within {timeout:g} s to tell the env's spaces; "
                        f"workers connect to {self.url} (last event: {table.last_event()})"
                    )
                table.cond.wait(min(deadline - now, 0.5))
            return self.server.expect.ready

    def wait_workers(self) -> None:
        """Block until workers cover every env (logging progress), or raise."""
        if self.table.covered() == self.num_envs:
            return
        local = self.local

        def progress(have: int) -> None:
            if local is not None:
                if not self._waited:
                    n = len(local.procs)
                    _say(f"starting {n} local worker{'s' if n > 1 else ''} for {self.num_envs} envs")
            else:
                _say(
                    f"waiting for workers: {have}/{self.num_envs} envs connected to {self.url}; "
                    f"start workers with: {self.worker_command(self.num_envs - have)}"
                )
            self._waited = True

        self.table.wait_covered(self.connect_timeout, self.url, progress=progress, check=self.check_local)

    def close(self) -> None:
        _open.discard(self)
        try:
            self.server.close()
        finally:
            try:
                if self.local is not None:
                    self.local.close()
            finally:
                if self._unix_dir is not None:
                    shutil.rmtree(self._unix_dir, ignore_errors=True)
