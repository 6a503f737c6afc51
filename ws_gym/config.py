"""What a trainer is asked to do, and how it moves its bytes: both decided once.

:class:`RemoteConfig` holds the keyword options of ``RemoteVectorEnv``,
``RemoteEnv`` and ``make_vec_env``, with their defaults and their checks,
written here and nowhere else.

:class:`Transport` holds the fast-path choices (uvloop, the Unix socket for
local workers, caller-thread writes, compact step frames, the frame layer,
busy polling). :meth:`Transport.from_environment` reads the ``WS_GYM_*``
switches, the only place that does; :meth:`Transport.resolve` settles them for
one trainer (OS, TLS, local workers). The result is logged at DEBUG and passed
explicitly, so tests pick a path by passing a ``Transport``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import ssl
import sys
from dataclasses import dataclass, field
from typing import Any, Mapping
from urllib.parse import urlsplit

from gymnasium.vector import AutoresetMode

log = logging.getLogger("ws_gym")

RELAY_TOKEN_ENV = "WS_GYM_RELAY_TOKEN"  # the relay's trainer token (relay_token=, the relay's --trainer-token)
DEFAULT_MAX_MSG_SIZE = 256 * 1024 * 1024  # bytes; the largest message either side accepts
VECTORIZATIONS = ("sync", "async")  # how a worker runs its envs: in its process, or in subprocesses
COMPRESSIONS = ("auto", "none", "lz4", "zstd")  # the compression= choices (ws_gym[compress] for lz4, zstd)

# Busy polling: the longest spins; ws_gym.polling.SpinPolicy spins that long or not at all, as measured.
CALLER_POLL = 0.001  # seconds a caller spins on its replies before it sleeps
WORKER_POLL = 0.0005  # seconds a local worker reads on after each reply

# The switches users may set, each naming the Transport field it turns off (or
# on: WS_GYM_BUSY_POLL=1 forces polling as well).
SWITCHES = {
    "WS_GYM_UVLOOP": "uvloop",
    "WS_GYM_UNIX": "unix",
    "WS_GYM_DIRECT": "direct",
    "WS_GYM_COMPACT": "compact",
    "WS_GYM_WIRE": "wire",
    "WS_GYM_BUSY_POLL": "busy_poll",
}
_OFF = ("0", "false", "no", "off")


@dataclass(frozen=True)
class Transport:
    """The fast paths one process takes. Each only changes speed, never results.

    Attributes:
        uvloop: run uvloop's event loop where it is installed.
        unix: local workers dial a private Unix socket (POSIX, plain ``ws://``).
        direct: the caller's thread writes requests to the socket itself.
        compact: step frames in the compact layout (:mod:`ws_gym.compact`)
            where the worker offers it; else the codec's.
        wire: after the handshake, frames go through ws_gym's frame layer
            (:mod:`ws_gym.wire`) instead of aiohttp's message API (worker side).
        busy_poll: ``True``/``False`` forces busy polling on or off; ``None``
            leaves it to the ``busy_poll=`` option and its default.
    """

    uvloop: bool = True
    unix: bool = True
    direct: bool = True
    compact: bool = True
    wire: bool = True
    busy_poll: bool | None = None

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> "Transport":
        """The choices the ``WS_GYM_*`` variables make (``0``/``false``/``no``/``off``
        turns a path off; ``WS_GYM_BUSY_POLL=1`` forces polling on)."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for variable, name in SWITCHES.items():
            text = env.get(variable, "").strip().lower()
            if not text:
                continue
            off = text in _OFF
            values[name] = not off
        return cls(**values)

    def worker_environment(self) -> dict[str, str]:
        """The variables that give a worker process these choices (local workers)."""
        return {"WS_GYM_UVLOOP": "1" if self.uvloop else "0", "WS_GYM_WIRE": "1" if self.wire else "0"}

    def resolve(self, *, tls: bool, local_workers: int, busy_poll: bool | None,
                vectorization: str = "sync") -> "Transport":
        """These choices settled for one trainer: what its OS and TLS allow,
        and busy polling decided (see :func:`busy_poll_wanted`)."""
        posix = os.name == "posix"
        resolved = dataclasses.replace(
            self,
            uvloop=self.uvloop and uvloop_installed(),
            unix=(self.unix and local_workers > 0 and not tls and hasattr(socket, "AF_UNIX")
                  and sys.platform != "win32"),
            direct=self.direct and posix and not tls,
            busy_poll=busy_poll_wanted(busy_poll if self.busy_poll is None else self.busy_poll,
                                       local_workers, vectorization, tls=tls or not self.direct),
        )
        log.debug("transport: %s", resolved)
        return resolved


def uvloop_installed() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def busy_poll_wanted(busy_poll: bool | None, local_workers: int, vectorization: str, *, tls: bool) -> bool:
    """Whether to busy-poll (see :mod:`ws_gym.polling`): ``None`` means with
    local workers that run their envs in their own process (``"sync"``),
    whatever the number of cores, as each side's
    :class:`ws_gym.polling.SpinPolicy` stops spinning where it does not pay (a
    busy machine, slow replies) and starts again when it does. Not by default
    for remote workers only (their PCs need ``--busy-poll``) nor for
    ``"async"`` (the envs' subprocesses need the cores). Needs POSIX and plain
    ``ws://``."""
    if busy_poll is not None and not isinstance(busy_poll, bool):
        raise TypeError(f"busy_poll must be True, False or None, got {busy_poll!r}")
    if os.name != "posix" or tls:
        return False
    if busy_poll is not None:
        return busy_poll
    return local_workers > 0 and vectorization == "sync"


def check_vectorization(value: Any) -> str:
    if value not in VECTORIZATIONS:
        raise ValueError(f"vectorization must be one of {list(VECTORIZATIONS)}, got {value!r}")
    return value


def autoreset_value(mode: AutoresetMode | str) -> AutoresetMode:
    try:
        return mode if isinstance(mode, AutoresetMode) else AutoresetMode(mode)
    except ValueError:
        raise ValueError(
            f"autoreset_mode must be an AutoresetMode or one of "
            f"{[m.value for m in AutoresetMode]}, got {mode!r}"
        ) from None


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


@dataclass
class RemoteConfig:
    """The options of a remote env (``RemoteVectorEnv``, ``RemoteEnv``,
    ``gym.make(_vec)("ws_gym/Remote-v0", ...)``, ``ws_gym.sb3.make_vec_env``).

    Args:
        env_id: the Gymnasium id the workers make (``"module:Env-v0"`` imports
            ``module`` first). ``None``: whatever the first worker hosts.
        env_kwargs: keyword arguments for ``gym.make`` in every worker.
        host: the address the trainer listens on; ``"0.0.0.0"`` for every
            interface (a token is then generated unless one is given).
        port: the port it listens on; ``0`` picks a free one (see ``url``).
        token: the secret workers must present; ``""`` for none on purpose.
        local_workers: worker processes the trainer starts on this machine.
        autoreset_mode: gymnasium's ``AutoresetMode`` (or its value).
        connect_timeout: seconds the first ``reset`` waits for workers.
        step_timeout: seconds a call waits for its replies (``None``: forever).
        max_episode_steps: passed to ``gym.make`` in the workers.
        render_mode: passed to ``gym.make`` in the workers.
        max_msg_size: the largest message accepted, in bytes.
        record_episode_statistics: wrap each env in gymnasium's
            ``RecordEpisodeStatistics`` inside the worker.
        ssl_context: serve ``wss://`` with this server context, or
        certfile, keyfile: serve ``wss://`` with this certificate.
        max_pending_handshakes: connections allowed in their handshake at once.
        handshake_timeout: seconds a connecting worker has for its hello.
        worker_vectorization: ``"sync"`` or ``"async"`` (envs in subprocesses
            of each local worker).
        heartbeat: seconds of silence after which a link counts as dead (``None``: off).
        on_worker_lost: ``"raise"`` (``WorkerLostError``) or ``"wait"`` (the
            envs end as truncated and a new worker takes them over).
        busy_poll: ``None`` decides where it pays; ``True``/``False`` forces it.
        public_url: the ``ws(s)://`` URL workers dial when it is not the
            listening address (a reverse proxy).
        relay: a relay's ``ws(s)://`` URL (``python -m ws_gym.relay``): the
            trainer dials it and listens on no port; workers dial the room's
            URL it gets (``envs.url``). Local workers still dial the trainer,
            on loopback.
        relay_token: the relay's trainer token (default: the
            ``WS_GYM_RELAY_TOKEN`` variable).
        relay_cafile: a CA bundle (or the relay's certificate) to verify a
            ``wss://`` relay with; default: the system's CAs.
        relay_proxy: an HTTP proxy to reach the relay through; default: the
            ``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY`` variables.
        relay_room: ``(room id, key)`` to ask the relay for from the first
            dial on, so a trainer started again (an RLlib EnvRunner) gets the
            same room and its workers back; ``None``: the relay picks one.
        dashboard_port: with ``relay``, the port on 127.0.0.1 the dashboard
            (``ws_gym.dashboard``) listens on; ``None``: a free one. Without
            a relay the dashboard is on the trainer's own port.
        compression: how large observations travel: ``"auto"`` (compressed
            on a connection where it pays, never on loopback), ``"none"``,
            ``"lz4"`` or ``"zstd"`` (``pip install ws_gym[compress]``).
        batch_size: how many envs ``recv()`` returns (EnvPool's asynchronous
            API, ``send``/``recv``); ``None``: ``num_envs``.

    Raises:
        TypeError, ValueError: an option of the wrong type or out of range.
    """

    env_id: str | None = None
    env_kwargs: dict | None = None
    host: str = "127.0.0.1"
    port: int = 8765
    token: str | None = None
    local_workers: int = 0
    autoreset_mode: AutoresetMode | str = AutoresetMode.NEXT_STEP
    connect_timeout: float = 120.0
    step_timeout: float | None = 60.0
    max_episode_steps: int | None = None
    render_mode: str | None = None
    max_msg_size: int = DEFAULT_MAX_MSG_SIZE
    record_episode_statistics: bool = False
    ssl_context: ssl.SSLContext | None = None
    certfile: str | None = None
    keyfile: str | None = None
    max_pending_handshakes: int = 64
    handshake_timeout: float = 10.0
    worker_vectorization: str = "sync"
    heartbeat: float | None = 10.0
    on_worker_lost: str = "raise"
    busy_poll: bool | None = None
    public_url: str | None = None
    relay: str | None = None
    relay_token: str | None = field(default=None, repr=False)
    relay_cafile: str | None = None
    relay_proxy: str | None = None
    relay_room: tuple[str, str] | None = field(default=None, repr=False)
    dashboard_port: int | None = None
    compression: str = "auto"
    batch_size: int | None = None
    transport: Transport | None = field(default=None, repr=False)  # None: from the environment

    @classmethod
    def from_options(cls, options: Mapping[str, Any], owner: str) -> "RemoteConfig":
        """A config from keyword options, naming ``owner`` for one that does not exist."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"{owner} got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; "
                            f"its options are: {', '.join(sorted(known))}")
        return cls(**options)

    def __post_init__(self) -> None:
        from .addresses import plain_host

        self.public_url = check_public_url(self.public_url)
        self.host = plain_host(self.host)  # an IPv6 address may come written as in URLs ("[::1]")
        if self.env_id is not None and not isinstance(self.env_id, str):
            raise TypeError(f"env_id must be a string or None, got {type(self.env_id).__name__}")
        if self.env_kwargs is not None and not isinstance(self.env_kwargs, dict):
            raise TypeError("env_kwargs must be a dict")
        self.env_kwargs = dict(self.env_kwargs or {})
        if self.render_mode is not None:
            self.env_kwargs["render_mode"] = self.render_mode
        if self.local_workers and self.env_id is None:
            raise ValueError("local_workers needs env_id: the local workers host the env the trainer names")
        if self.local_workers < 0:
            raise ValueError("local_workers must be >= 0")
        self.autoreset_mode = autoreset_value(self.autoreset_mode)
        check_vectorization(self.worker_vectorization)
        if self.on_worker_lost not in ("raise", "wait"):
            raise ValueError(f'on_worker_lost must be "raise" or "wait", got {self.on_worker_lost!r}')
        if self.heartbeat is not None and not self.heartbeat > 0:
            raise ValueError(f"heartbeat must be a positive number of seconds or None, got {self.heartbeat!r}")
        for name in ("max_msg_size", "max_pending_handshakes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.handshake_timeout > 0:
            raise ValueError(f"handshake_timeout must be positive, got {self.handshake_timeout!r}")
        if self.token is not None and not isinstance(self.token, str):
            raise TypeError(f"token must be a string or None, got {type(self.token).__name__}")
        if self.busy_poll is not None and not isinstance(self.busy_poll, bool):
            raise TypeError(f"busy_poll must be True, False or None, got {self.busy_poll!r}")
        if self.transport is not None and not isinstance(self.transport, Transport):
            raise TypeError(f"transport must be a ws_gym.config.Transport, got {type(self.transport).__name__}")
        if self.relay is not None:
            self._check_relay()
        if self.dashboard_port is not None and (
                not isinstance(self.dashboard_port, int) or isinstance(self.dashboard_port, bool)
                or not 0 <= self.dashboard_port <= 65535 or self.relay is None):
            raise ValueError(f"dashboard_port must be a port number (0: a free one), with relay= only: without "
                             f"a relay the dashboard is on the trainer's own port; got {self.dashboard_port!r}")
        if self.compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {list(COMPRESSIONS)}, got {self.compression!r}")
        if self.batch_size is not None and (not isinstance(self.batch_size, int) or isinstance(self.batch_size, bool)
                                            or self.batch_size < 1):
            raise ValueError(f"batch_size must be a positive integer or None, got {self.batch_size!r}")
        self.connect_timeout = float(self.connect_timeout)
        self.step_timeout = None if self.step_timeout is None else float(self.step_timeout)
        self.handshake_timeout = float(self.handshake_timeout)

    def _check_relay(self) -> None:
        from .relay_link import check_relay_url

        self.relay = check_relay_url(self.relay)
        if self.relay_token is None:
            self.relay_token = os.environ.get(RELAY_TOKEN_ENV) or None
        if not isinstance(self.relay_token, str) or not self.relay_token:
            raise ValueError(f"relay= needs relay_token= (the relay's --trainer-token) or {RELAY_TOKEN_ENV}")
        if self.public_url is not None:
            raise ValueError("pass relay= or public_url=, not both: with a relay, workers dial the relay")
        if self.ssl_context is not None or self.certfile is not None:
            raise ValueError("with relay=, TLS is the relay's (its --certfile): the trainer serves no "
                             "certificate itself; drop certfile=/ssl_context=")
        if self.relay_room is not None:
            from .rooms import valid_id

            if (not isinstance(self.relay_room, (tuple, list)) or len(self.relay_room) != 2
                    or not all(valid_id(part) for part in self.relay_room)):
                raise ValueError("relay_room must be (room id, key), each 16 to 128 of A-Z a-z 0-9 _ -")
            self.relay_room = (self.relay_room[0], self.relay_room[1])
        if self.token == "":
            raise ValueError("token='' with relay=: a relay is public, so its workers need a token; "
                             "leave token= out to have one generated")

    def relay_route(self) -> str | None:
        """The proxy the trainer dials its relay through: ``relay_proxy``, else
        the environment's (see :func:`ws_gym.proxies.proxy_for`)."""
        from .proxies import proxy_for

        return None if self.relay is None else proxy_for(self.relay, self.relay_proxy, os.environ)

    @property
    def wait_mode(self) -> bool:
        return self.on_worker_lost == "wait"
