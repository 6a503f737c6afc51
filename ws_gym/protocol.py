"""The ws_gym conversation: message kinds and handshake checks, with no I/O.

See ``docs/protocol.rst`` for the whole protocol. Every function here takes a
decoded body (plain Python values from :mod:`ws_gym.codec`) and either returns
a typed record or raises :class:`~ws_gym.errors.ProtocolError` saying what is
wrong, so the I/O layers only move bytes.

Handshake (worker dials the trainer)::

    worker  -> hello    {protocol, env_id | null, num_envs, name, worker_id?,
                         compression?}
    trainer -> welcome  {env_id, env_kwargs, num_envs, first_index, mode,
                         autoreset_mode, max_episode_steps,
                         record_episode_statistics, heartbeat,
                         worker_id, compression?, compress?}
                                                     | refuse {reason, retry?}
    worker  -> ready    {observation_space, action_space, render_mode, metadata,
                         compact?}                               | error {...}
    trainer -> accept   {}                                       | refuse {reason}

Then the trainer sends requests (``reset``, ``step``, ``render``, ``call``,
``set_attr``, ``close``), each with a fresh id, and the worker answers each with
exactly one ``ok`` or ``error`` carrying the same id. A worker whose ready
says ``compact: true`` also takes ``step`` requests as compact frames and
answers them in kind where the result fits (see :mod:`ws_gym.compact`).
A hello's ``compression`` lists the codecs the worker offers; the welcome's
names the one the trainer chose for this connection, and ``compress`` when to
use it (``"auto"`` or ``"always"``; see :mod:`ws_gym.compression`).
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from typing import Any

from .errors import ProtocolError, RemoteEnvError

PROTOCOL_VERSION = 1

# Workers present the trainer's token in this HTTP header, before the WebSocket upgrade.
TOKEN_HEADER = "X-WS-Gym-Token"
TOKEN_ENV = "WS_GYM_TOKEN"  # where the worker CLI looks for it (keeps it out of `ps`)

# The worker's exit codes (ws_gym.local reads them to decide whether to restart one).
EXIT_OK = 0
EXIT_REFUSED = 2  # refused in the handshake: version, env, spaces, not needed
EXIT_UNAUTHORIZED = 3  # wrong or missing token
EXIT_GAVE_UP = 4  # no trainer within --retry-timeout
EXIT_UNTRUSTED = 5  # the trainer's TLS certificate failed verification
EXIT_NOT_FOUND = 6  # no WebSocket endpoint at the URL (HTTP 404): a wrong path

HELLO = "hello"
WELCOME = "welcome"
REFUSE = "refuse"
READY = "ready"
ACCEPT = "accept"

RESET = "reset"
STEP = "step"
RENDER = "render"
CALL = "call"
SET_ATTR = "set_attr"
CLOSE = "close"
REQUESTS = frozenset({RESET, STEP, RENDER, CALL, SET_ATTR, CLOSE})

OK = "ok"
ERROR = "error"

MODE_VECTOR = "vector"  # the worker runs a SyncVectorEnv of its envs
MODE_SINGLE = "single"  # the worker runs one plain env (RemoteEnv)
AUTORESET_MODES = ("NextStep", "SameStep", "Disabled")  # gymnasium AutoresetMode values

MAX_NAME = 200
MAX_ENVS_PER_WORKER = 4096
MAX_WORKER_ID = 64
COMPRESS_WHEN = ("auto", "always")  # the welcome's "compress"
MAX_OFFERED = 8  # codec names in a hello (unknown names are ignored)


def _field(body: Any, key: str, types: tuple, what: str, *, optional: bool = False) -> Any:
    if not isinstance(body, dict):
        raise ProtocolError(f"{what}: body must be an object")
    if key not in body:
        if optional:
            return None
        raise ProtocolError(f"{what}: missing field {key!r}")
    value = body[key]
    if value is None and optional:
        return None
    if type(value) not in types:
        raise ProtocolError(f"{what}: field {key!r} has type {type(value).__name__}")
    return value


def _env_id(value: Any, what: str) -> str | None:
    if value is not None and (not value or len(value) > MAX_NAME):
        raise ProtocolError(f"{what}: env_id must be a non-empty string of at most {MAX_NAME} chars")
    return value


def _worker_id(value: Any, what: str) -> str | None:
    if value is not None and not (0 < len(value) <= MAX_WORKER_ID and value.isascii() and value.isalnum()):
        raise ProtocolError(f"{what}: worker_id must be 1 to {MAX_WORKER_ID} ASCII letters or digits")
    return value


@dataclass(frozen=True)
class Hello:
    protocol: int
    env_id: str | None
    num_envs: int
    name: str
    # the id a trainer gave this worker in an earlier welcome: a worker that
    # dials in again after a dropped link presents it, so the trainer can
    # replace the stale connection at once
    worker_id: str | None = None
    compression: tuple[str, ...] = ()  # the codecs it offers (ws_gym.compression); () from an older worker


def make_hello(env_id: str | None, num_envs: int, name: str, worker_id: str | None = None,
               compression: list[str] | None = None) -> dict:
    body: dict[str, Any] = {"protocol": PROTOCOL_VERSION, "env_id": env_id, "num_envs": num_envs, "name": name}
    if worker_id is not None:
        body["worker_id"] = worker_id
    if compression:
        body["compression"] = list(compression)
    return body


def parse_hello(body: Any) -> Hello:
    """Check a worker's hello. The version is read first, so any future hello
    still gets a clear 'version mismatch' answer rather than a field error."""
    version = _field(body, "protocol", (int,), "hello")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version mismatch: the trainer speaks version {PROTOCOL_VERSION}, "
            f"the worker speaks version {version}; install the same ws_gym on both"
        )
    env_id = _env_id(_field(body, "env_id", (str,), "hello", optional=True), "hello")
    num_envs = _field(body, "num_envs", (int,), "hello")
    if not 1 <= num_envs <= MAX_ENVS_PER_WORKER:
        raise ProtocolError(f"hello: num_envs must be between 1 and {MAX_ENVS_PER_WORKER}")
    name = _field(body, "name", (str,), "hello", optional=True) or "?"
    worker_id = _worker_id(_field(body, "worker_id", (str,), "hello", optional=True), "hello")
    offered = _field(body, "compression", (list,), "hello", optional=True) or []
    if len(offered) > MAX_OFFERED or not all(type(c) is str and len(c) <= 16 for c in offered):
        raise ProtocolError(f"hello: compression must list at most {MAX_OFFERED} codec names")
    return Hello(version, env_id, num_envs, name[:MAX_NAME], worker_id, tuple(offered))


@dataclass(frozen=True)
class Welcome:
    env_id: str
    env_kwargs: dict
    num_envs: int
    first_index: int
    mode: str
    autoreset_mode: str
    max_episode_steps: int | None
    record_episode_statistics: bool = False
    heartbeat: float | None = None  # the trainer's heartbeat (see ws_gym.liveness)
    worker_id: str | None = None  # presented again in the hello of a reconnect
    compression: str | None = None  # the codec chosen for this connection's observations (None: plain)
    compress: str = "always"  # with a codec: "auto" (while it pays) or "always"


def make_welcome(w: Welcome) -> dict:
    body: dict[str, Any] = {
        "env_id": w.env_id,
        "env_kwargs": w.env_kwargs,
        "num_envs": w.num_envs,
        "first_index": w.first_index,
        "mode": w.mode,
        "autoreset_mode": w.autoreset_mode,
        "max_episode_steps": w.max_episode_steps,
        "record_episode_statistics": w.record_episode_statistics,
        "heartbeat": w.heartbeat,
        "worker_id": w.worker_id,
    }
    if w.compression is not None:  # absent: plain frames (what an older trainer's welcome means too)
        body["compression"] = w.compression
        body["compress"] = w.compress
    return body


def parse_welcome(body: Any) -> Welcome:
    env_id: str = _field(body, "env_id", (str,), "welcome")  # required: never None
    _env_id(env_id, "welcome")
    env_kwargs = _field(body, "env_kwargs", (dict,), "welcome")
    if not all(isinstance(k, str) for k in env_kwargs):
        raise ProtocolError("welcome: env_kwargs keys must be strings")
    num_envs = _field(body, "num_envs", (int,), "welcome")
    first = _field(body, "first_index", (int,), "welcome")
    mode = _field(body, "mode", (str,), "welcome")
    autoreset = _field(body, "autoreset_mode", (str,), "welcome")
    steps = _field(body, "max_episode_steps", (int,), "welcome", optional=True)
    stats = _field(body, "record_episode_statistics", (bool,), "welcome", optional=True) or False
    heartbeat = _field(body, "heartbeat", (int, float), "welcome", optional=True)
    if heartbeat is not None and not 0 < heartbeat <= 86400:
        raise ProtocolError("welcome: heartbeat must be between 0 and 86400 seconds")
    worker_id = _worker_id(_field(body, "worker_id", (str,), "welcome", optional=True), "welcome")
    if not 1 <= num_envs <= MAX_ENVS_PER_WORKER or first < 0:
        raise ProtocolError("welcome: bad env count or index")
    if mode not in (MODE_VECTOR, MODE_SINGLE):
        raise ProtocolError(f"welcome: unknown mode {mode[:50]!r}")
    if autoreset not in AUTORESET_MODES:
        raise ProtocolError(f"welcome: unknown autoreset_mode {autoreset[:50]!r}")
    if mode == MODE_SINGLE and num_envs != 1:
        raise ProtocolError("welcome: single mode hosts exactly one env")
    compression = _field(body, "compression", (str,), "welcome", optional=True)
    compress = _field(body, "compress", (str,), "welcome", optional=True) or "always"
    if compress not in COMPRESS_WHEN:
        raise ProtocolError(f"welcome: unknown compress {compress[:50]!r}")
    return Welcome(env_id, env_kwargs, num_envs, first, mode, autoreset, steps, stats,
                   None if heartbeat is None else float(heartbeat), worker_id,
                   None if compression is None else compression[:50], compress)


@dataclass(frozen=True)
class Ready:
    observation_space: dict
    action_space: dict
    render_mode: str | None
    metadata: dict
    compact: bool = False  # the worker takes compact step frames (ws_gym.compact)


def _plain_json(value: Any, depth: int = 0) -> bool:
    """True for str/int/float/bool/None, and lists and str-keyed dicts of them."""
    if depth > 64:
        return False
    t = type(value)
    if t in (str, int, float, bool) or value is None:
        return True
    if t is list:
        return all(_plain_json(x, depth + 1) for x in value)
    if t is dict:
        return all(type(k) is str and _plain_json(v, depth + 1) for k, v in value.items())
    return False


def parse_ready(body: Any) -> Ready:
    obs = _field(body, "observation_space", (dict,), "ready")
    act = _field(body, "action_space", (dict,), "ready")
    if not (_plain_json(obs) and _plain_json(act)):  # schemas are JSON: no arrays, tuples, reprs
        raise ProtocolError("ready: a space schema holds a value that is not plain JSON")
    render_mode = _field(body, "render_mode", (str,), "ready", optional=True)
    metadata = _field(body, "metadata", (dict,), "ready", optional=True) or {}
    compact = _field(body, "compact", (bool,), "ready", optional=True) or False
    return Ready(obs, act, render_mode, metadata, compact)


def parse_retry(body: Any) -> bool:
    """Whether a ``refuse`` invites the worker to try again later."""
    return isinstance(body, dict) and body.get("retry") is True


def parse_reason(body: Any) -> str:
    if isinstance(body, dict) and isinstance(body.get("reason"), str):
        return body["reason"][:2000]
    return "no reason given"


def error_body(exc: BaseException) -> dict:
    """The body of an ``error`` reply for an exception raised by an env."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        message = str(exc)
    except Exception:  # a broken __str__ must not stop the error reply
        message = "<exception str() failed>"
    return {"type": type(exc).__qualname__, "message": message[:4000], "traceback": tb[-20000:]}


def parse_error(body: Any, origin: str) -> RemoteEnvError:
    """Turn an ``error`` body into the exception to raise in the trainer."""
    if not isinstance(body, dict):
        return RemoteEnvError("ProtocolError", "malformed error reply", "", origin)

    def get(key: str) -> str:
        value = body.get(key)
        return value if isinstance(value, str) else ""

    # bounded as error_body bounds them: a hostile peer's text goes into logs and messages
    return RemoteEnvError(get("type")[:200] or "Exception", get("message")[:4000], get("traceback")[-20000:], origin)
