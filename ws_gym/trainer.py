"""What RemoteVectorEnv and RemoteEnv share: the server, local workers, waiting.

A :class:`Trainer` owns one :class:`~ws_gym.pool.WorkerPool` and, with
``local_workers``, the worker processes it started. It learns the env's spaces
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

from . import codec, loops
from . import protocol as P
from .config import Transport, CALLER_POLL, WORKER_POLL, busy_poll_wanted, usable_cpus  # noqa: F401
from .addresses import certificate_fingerprint, format_url, is_loopback, loopback_for, plain_host
from .errors import WsGymError
from .host import check_vectorization
from .local import LocalWorkers, split_envs
from .pool import Expectation, WorkerPool
from .spaces import schema_to_space, space_to_schema

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


def check_public_url(url: str | None) -> str | None:
    """``public_url`` as given, once it is a ``ws://`` or ``wss://`` URL with a host."""
    if url is None:
        return None
    if not isinstance(url, str):
        raise TypeError(f"public_url must be a string or None, got {type(url).__name__}")
    hint = ("public_url must be the ws:// or wss:// URL the PCs dial, with a host, e.g. "
            f"wss://trainer.example/ws-gym/ws; got {url!r}")
    if not url.isascii() or not url.isprintable() or any(c.isspace() for c in url):
        raise ValueError(hint)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number in range
    except ValueError:
        raise ValueError(hint) from None
    if parts.scheme.lower() not in ("ws", "wss") or not parts.hostname:
        raise ValueError(hint)
    return url


def autoreset_value(mode: AutoresetMode | str) -> AutoresetMode:
    try:
        return mode if isinstance(mode, AutoresetMode) else AutoresetMode(mode)
    except ValueError:
        raise ValueError(
            f"autoreset_mode must be an AutoresetMode or one of "
            f"{[m.value for m in AutoresetMode]}, got {mode!r}"
        ) from None


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
        from .host import _jsonable_metadata

        return P.Ready(
            space_to_schema(env.observation_space),
            space_to_schema(env.action_space),
            env.render_mode,
            _jsonable_metadata(env.metadata),
        )
    finally:
        env.close()


class Trainer:
    """Server + local workers + the spaces every worker must match."""

    def __init__(
        self,
        *,
        num_envs: int,
        mode: str,
        env_id: str | None,
        env_kwargs: dict | None,
        host: str,
        port: int,
        token: str | None,
        local_workers: int,
        autoreset_mode: AutoresetMode,
        connect_timeout: float,
        step_timeout: float | None,
        max_episode_steps: int | None,
        max_msg_size: int,
        record_episode_statistics: bool = False,
        ssl_context: ssl.SSLContext | None = None,
        certfile: str | None = None,
        keyfile: str | None = None,
        max_pending_handshakes: int = 64,
        handshake_timeout: float = 10.0,
        worker_vectorization: str = "sync",
        heartbeat: float | None = 10.0,
        on_worker_lost: str = "raise",
        busy_poll: bool | None = None,
        public_url: str | None = None,
    ) -> None:
        public_url = check_public_url(public_url)
        host = plain_host(host)  # an IPv6 address may come written as in URLs ("[::1]")
        if env_id is not None and not isinstance(env_id, str):
            raise TypeError(f"env_id must be a string or None, got {type(env_id).__name__}")
        if env_kwargs is not None and not isinstance(env_kwargs, dict):
            raise TypeError("env_kwargs must be a dict")
        if local_workers and env_id is None:
            raise ValueError("local_workers needs env_id: the local workers host the env the trainer names")
        if local_workers < 0:
            raise ValueError("local_workers must be >= 0")
        check_vectorization(worker_vectorization)
        if on_worker_lost not in ("raise", "wait"):
            raise ValueError(f'on_worker_lost must be "raise" or "wait", got {on_worker_lost!r}')
        if heartbeat is not None and not heartbeat > 0:
            raise ValueError(f"heartbeat must be a positive number of seconds or None, got {heartbeat!r}")
        self.wait_mode = on_worker_lost == "wait"
        for name, value in (("max_msg_size", max_msg_size), ("max_pending_handshakes", max_pending_handshakes)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not handshake_timeout > 0:
            raise ValueError(f"handshake_timeout must be positive, got {handshake_timeout!r}")
        if token is not None and not isinstance(token, str):
            raise TypeError(f"token must be a string or None, got {type(token).__name__}")
        server_ssl = server_ssl_context(ssl_context, certfile, keyfile)
        self.token_generated = False
        tokens_off = token == ""  # no token on purpose: proxied connections are let in too
        if token is None and (not is_loopback(host) or public_url is not None):
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
        counts = split_envs(num_envs, local_workers) if local_workers else []
        self.num_envs = num_envs
        self.env_id = env_id
        self.connect_timeout = float(connect_timeout)
        self.step_timeout = None if step_timeout is None else float(step_timeout)
        env_kwargs = dict(env_kwargs or {})
        try:  # they travel in the welcome message: fail here, not in a handshake
            codec.encode(P.WELCOME, 0, env_kwargs, strict=True)
        except codec.EncodeError as exc:
            raise TypeError(f"env_kwargs cannot be sent to workers: {exc}") from None
        expect = Expectation(
            env_id=env_id,
            env_kwargs=env_kwargs,
            mode=mode,
            autoreset_mode=autoreset_mode.value,
            max_episode_steps=max_episode_steps,
            record_episode_statistics=bool(record_episode_statistics),
            ready=probe(env_id, env_kwargs, max_episode_steps),
        )
        unix_path = self._unix_path(counts, server_ssl)
        forced = Transport.from_environment().busy_poll
        self.busy_poll = busy_poll_wanted(busy_poll if forced is None else forced, local_workers,
                                          worker_vectorization, tls=server_ssl is not None)
        try:
            self.pool = WorkerPool(
                num_envs=num_envs, expect=expect, host=host, port=port, token="" if tokens_off else token,
                max_msg_size=max_msg_size, ready_timeout=max(self.connect_timeout, 10.0),
                handshake_timeout=float(handshake_timeout), max_pending_handshakes=max_pending_handshakes,
                ssl_context=server_ssl, heartbeat=heartbeat, on_worker_lost=on_worker_lost,
                unix_path=unix_path, busy_poll=CALLER_POLL if self.busy_poll else 0.0,
            )
        except BaseException:
            if self._unix_dir is not None:
                shutil.rmtree(self._unix_dir, ignore_errors=True)
            raise
        self.public_url = public_url
        listening = self.pool.url
        self.url = public_url or listening  # what workers dial (local workers: pool.local_url)
        if public_url is not None:  # the pool's messages name it too ("workers connect to ...")
            self.pool.url = public_url
        self.local: LocalWorkers | None = None
        self._next_local_check = 0.0
        self._waited = False
        try:
            if self.token_generated:
                where = listening if public_url is None else f"{listening} (workers dial {public_url})"
                _say(f"listening on {where} with a generated token (no token= was given); "
                     f"on each PC run: {self.worker_command()} (K: the envs that PC hosts; "
                     f"{self.num_envs} in all)")
            if counts:
                self.local = LocalWorkers(self.pool.local_url, counts, token=token, unix_socket=self.pool.unix_path,
                                          cert_fingerprint=self._own_fingerprint(),
                                          vectorization=worker_vectorization,
                                          busy_poll=WORKER_POLL if self.busy_poll else 0.0)
                if self.wait_mode:  # keep replacing crashed local workers: training goes on
                    self.local.max_restarts = None
        except BaseException:
            self.pool.close()
            raise
        self._spaces: tuple | None = None
        _open.add(self)

    def worker_command(self, num_envs: int | None = None) -> str:
        """The command a user runs on a PC to serve envs to this trainer.

        ``num_envs``: the envs still missing (``K``, to fill in, when not given).
        A token ws_gym generated is shown in full (it is printed nowhere else);
        one the user chose is shown as a placeholder, to keep it out of logs.
        """
        url = self.url  # public_url as given, when there is one
        if self.public_url is None and self.pool.host in ("0.0.0.0", "::", ""):  # everywhere: name this machine
            url = format_url(socket.gethostname(), self.pool.port, self.pool.ssl_context is not None)
        env = f" --env {self.env_id}" if self.env_id else " --env ENV_ID"
        secret = ""
        if self.token is not None:
            secret = f"{P.TOKEN_ENV}={self.token if self.token_generated else '<your token>'} "
        count = "K" if num_envs is None else str(num_envs)
        return f"{secret}python -m ws_gym.worker --url {url}{env} --num-envs {count}"

    def _own_fingerprint(self) -> str | None:
        """SHA-256 of our own TLS certificate, which local workers pin (None without TLS).

        Local workers dial loopback, where the certificate's host name would not
        match and a private CA would need a file we may not have (a bare
        ``ssl_context``); pinning the exact certificate needs neither.
        """
        if self.pool.ssl_context is None:
            return None
        try:
            return certificate_fingerprint(loopback_for(self.pool.host), self.pool.port)
        except (OSError, ssl.SSLError) as exc:
            raise WsGymError(f"could not read this trainer's own TLS certificate for its local workers: {exc}") from exc

    def check_local(self) -> None:
        """Restart crashed local workers (at most every half second: in wait mode it
        is called on every step, and in the waits for workers)."""
        if self.local is not None:
            now = time.monotonic()
            if now >= self._next_local_check:
                self._next_local_check = now + 0.5
                self.local.check(free=self.pool.covered() < self.num_envs)

    def spaces(self) -> tuple[gym.Space, gym.Space, P.Ready]:
        """(observation space, action space, ready info): waits for a worker if needed."""
        if self._spaces is None:
            ready = self.pool.expect.ready
            if ready is None:
                _say(f"waiting for a worker at {self.url} to learn the env's spaces; run: {self.worker_command()}")
                ready = self.pool.wait_spaces(self.connect_timeout, check=self.check_local)
            self._spaces = (schema_to_space(ready.observation_space), schema_to_space(ready.action_space), ready)
        return self._spaces

    def wait_workers(self) -> None:
        """Block until workers cover every env (logging progress), or raise."""
        if self.pool.covered() == self.num_envs:
            return
        local = self.local is not None

        def progress(have: int) -> None:
            if local:
                if not self._waited:
                    n = len(self.local.procs)
                    _say(f"starting {n} local worker{'s' if n > 1 else ''} for {self.num_envs} envs")
            else:
                _say(
                    f"waiting for workers: {have}/{self.num_envs} envs connected to {self.url}; "
                    f"start workers with: {self.worker_command(self.num_envs - have)}"
                )
            self._waited = True

        self.pool.wait_covered(self.connect_timeout, progress=progress, check=self.check_local)

    def request(self, items: list[tuple[Any, str, Any]], timeout: float | None = -1) -> list[Any]:
        return self.pool.request(items, self.step_timeout if timeout == -1 else timeout)

    def submit(self, items: list[tuple[Any, str, Any]], tolerant: bool = False, sink: Any = None) -> Any:
        return self.pool.submit(items, tolerant, sink)

    def wait(self, call: Any, timeout: float | None = -1) -> list[Any]:
        return self.pool.wait(call, self.step_timeout if timeout == -1 else timeout)

    def _unix_path(self, counts: list[int], server_ssl: ssl.SSLContext | None) -> str | None:
        """A private Unix socket for local workers (POSIX, plain ws): quicker than loopback TCP.

        ``WS_GYM_UNIX=0`` turns it off; Windows and TLS use loopback TCP.
        """
        self._unix_dir = None
        if not counts or server_ssl is not None or not hasattr(socket, "AF_UNIX") or sys.platform == "win32":
            return None
        if loops.switched_off("WS_GYM_UNIX"):
            return None
        self._unix_dir = tempfile.mkdtemp(prefix="ws_gym-")  # mode 0700
        return os.path.join(self._unix_dir, "trainer.sock")

    def close(self) -> None:
        _open.discard(self)
        try:
            self.pool.close()
        finally:
            try:
                if self.local is not None:
                    self.local.close()
            finally:
                if self._unix_dir is not None:
                    shutil.rmtree(self._unix_dir, ignore_errors=True)
