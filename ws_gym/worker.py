"""The worker's command line: ``python -m ws_gym.worker`` (and ``ws-gym-worker``).

Run it on the PC that has the env::

    python -m ws_gym.worker --url ws://TRAINER:8765/ws --env CartPole-v1 --num-envs 4

It needs no open port: it connects out, retries with backoff until the trainer
is up, hosts the envs the trainer asks for, and exits when the trainer closes.
While it serves it logs a status line every ``--status-interval`` seconds
(:mod:`ws_gym.worker_status`; ``--quiet``: none).
This module parses the options and runs a :class:`~ws_gym.client.Worker`
(dialing and serving); env logic is in :mod:`ws_gym.host`.

Behind an HTTP proxy (office and campus networks) give the trainer's
``wss://`` URL and the proxy::

    python -m ws_gym.worker --url wss://TRAINER:8765/ws --proxy http://USER:PASSWORD@PROXY:3128 ...

The proxy tunnels the connection with CONNECT; TLS stays end to end, so the
trainer's certificate is checked as without a proxy (``--cafile``,
``--cert-fingerprint``, ``--insecure``). Without ``--proxy`` the worker takes
``HTTPS_PROXY`` (for ``wss://``) or ``HTTP_PROXY`` (for ``ws://``) from the
environment, unless ``NO_PROXY`` names the trainer's host; a trainer on
loopback (localhost, 127.0.0.0/8, ::1) is always dialed directly, except through
an explicit ``--proxy``. A plain ``ws://`` URL is not tunnelled: aiohttp sends
its upgrade to the proxy as ``GET ws://HOST:PORT/PATH``, which most proxies
refuse or do not pass on as a WebSocket. Through a proxy, use ``wss://``. The
rule that picks the proxy is :func:`ws_gym.proxies.proxy_for`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from typing import Any, Sequence

import orjson

from . import loops
from .client import DEFAULT_MAX_MSG, TOKEN_ENV, Worker, backoff_delays, client_ssl, env_allowed
from .proxies import proxy_for
from .errors import WsGymError
from .config import VECTORIZATIONS

__all__ = ["main", "build_parser", "Worker", "backoff_delays", "env_allowed", "client_ssl", "proxy_for"]

log = logging.getLogger("ws_gym.worker")


def _exit_with_parent() -> None:
    """Exit when the process that started us dies (its end of stdin closes).

    Portable (Windows too): the trainer holds the write end of our stdin pipe,
    and the OS closes it whatever way the trainer ends.
    """

    fd = sys.stdin.fileno()

    def watch() -> None:
        try:
            while os.read(fd, 4096):  # raw fd: no buffer lock held at shutdown
                pass
        except OSError:
            pass
        os._exit(0)

    threading.Thread(target=watch, name="ws_gym-parent-watch", daemon=True).start()


class _ArgumentParser(argparse.ArgumentParser):
    """Bad arguments exit with code 1, as the README says: argparse's own 2 is
    the worker's "refused by the trainer" (``--help`` still exits 0)."""

    def error(self, message: str):  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(1, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _ArgumentParser(
        prog="python -m ws_gym.worker",
        description=(
            "Host Gymnasium envs for a remote ws_gym trainer. The worker dials out to the "
            "trainer's WebSocket URL (no open port needed on this machine), retries until the "
            "trainer is up, and exits when the trainer closes."
        ),
        epilog="example: python -m ws_gym.worker --url ws://trainer:8765/ws --env CartPole-v1 --num-envs 4; "
               "behind an HTTP proxy: python -m ws_gym.worker --url wss://trainer:8765/ws "
               "--proxy http://proxy.example:3128 --env CartPole-v1",
    )
    p.add_argument("--url", required=True, help="the trainer's URL, e.g. ws://trainer:8765/ws (printed by the trainer)")
    p.add_argument("--env", dest="env_id", default=None,
                   help="the env id to host; without it the worker hosts the id the trainer announces")
    p.add_argument("--num-envs", type=int, default=1, help="how many envs to host (default 1)")
    p.add_argument("--vectorization", choices=VECTORIZATIONS, default="sync",
                   help="sync (default): step the envs one after another in this process; async: one "
                        "subprocess per env (gymnasium's AsyncVectorEnv), for CPU-heavy envs on a multi-core PC")
    p.add_argument("--env-kwargs", default=None,
                   help='JSON object of keyword arguments for gym.make, e.g. \'{"render_mode": "rgb_array"}\'')
    p.add_argument("--token", default=None, help=f"shared secret the trainer expects (or set {TOKEN_ENV})")
    tls = p.add_mutually_exclusive_group()
    tls.add_argument("--cafile", default=None,
                     help="wss:// only: trust this CA or self-signed certificate (PEM) instead of the system's CAs")
    tls.add_argument("--insecure", action="store_true",
                     help="wss:// only: do NOT verify the trainer's certificate (anyone on the path can pose as it)")
    tls.add_argument("--cert-fingerprint", default=None, metavar="SHA256",
                     help="wss:// only: accept exactly the certificate with this SHA-256 (hex), "
                          "no CA or host name check")
    p.add_argument("--proxy", default=None, metavar="URL",
                   help="dial the trainer through this HTTP proxy, http://[USER:PASSWORD@]HOST:PORT. The user "
                        "and password become proxy authentication and are never logged (but a password on the "
                        "command line is visible to other users of this PC: HTTPS_PROXY keeps it out). Used "
                        "for every trainer URL, loopback too. Without it the worker takes HTTPS_PROXY (wss:// "
                        "URLs) or HTTP_PROXY (ws:// URLs) from the environment (lowercase spellings win), "
                        "except for hosts that NO_PROXY names and for a trainer on loopback (localhost, "
                        "127.0.0.0/8, ::1), which is always dialed directly. Through a proxy use a wss:// URL: "
                        "the proxy tunnels it with CONNECT and TLS stays end to end (--cafile, "
                        "--cert-fingerprint and --insecure apply to the trainer's certificate); a ws:// URL is "
                        "not tunnelled but sent to the proxy as GET ws://HOST:PORT/PATH, which most proxies "
                        "refuse")
    p.add_argument("--allow-import", action="store_true",
                   help="let the trainer name 'module:EnvId' ids, which import that module here")
    p.add_argument("--retry-timeout", type=float, default=None,
                   help="give up after this many seconds without a trainer (default: retry forever)")
    p.add_argument("--max-msg-size", type=int, default=DEFAULT_MAX_MSG, help="largest message accepted, in bytes")
    p.add_argument("--compression", choices=("auto", "none", "lz4", "zstd"), default="auto",
                   help="the codecs offered for compressing observations; the trainer chooses (auto: all "
                        "installed; lz4 and zstd need pip install ws_gym[compress]; default auto)")
    p.add_argument("--name", default=None, help="name shown in the trainer's logs (default host:pid)")
    p.add_argument("--unix-socket", default=None, help=argparse.SUPPRESS)  # local workers (POSIX)
    p.add_argument("--busy-poll", type=float, default=0.0, metavar="US",
                   help="after each reply keep reading the socket for up to this many microseconds "
                        "before sleeping, while measurement shows it pays: lower latency when the "
                        "trainer answers fast (POSIX, plain ws://; default 0: off)")
    p.add_argument("--status-interval", type=float, default=30.0, metavar="S",
                   help="while serving, log a status line every S seconds: the envs, the trainer, "
                        "env-steps per second and in all, the round trip time (default 30; 0: none)")
    p.add_argument("--quiet", action="store_true", help="no status lines (other messages as --log-level says)")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    p.add_argument("--exit-with-parent", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s ws_gym.worker %(levelname)s %(message)s")
    if args.exit_with_parent:
        _exit_with_parent()
    if args.num_envs < 1:
        print("--num-envs must be at least 1", file=sys.stderr)
        return 1
    if not args.busy_poll >= 0:  # also NaN
        print("--busy-poll must be a number of microseconds >= 0", file=sys.stderr)
        return 1
    if not 0 <= args.status_interval < float("inf"):  # also NaN
        print("--status-interval must be a number of seconds >= 0", file=sys.stderr)
        return 1
    env_kwargs: dict[str, Any] | None = None
    if args.env_kwargs:
        try:
            env_kwargs = orjson.loads(args.env_kwargs)
        except orjson.JSONDecodeError as exc:
            print(f"--env-kwargs is not valid JSON: {exc}", file=sys.stderr)
            return 1
        if not isinstance(env_kwargs, dict):
            print("--env-kwargs must be a JSON object", file=sys.stderr)
            return 1
    import ws_gym  # noqa: F401  (registers ws_gym's own envs)

    try:
        worker = Worker(
            args.url,
            env_id=args.env_id,
            num_envs=args.num_envs,
            env_kwargs=env_kwargs,
            token=args.token or os.environ.get(TOKEN_ENV) or None,
            environ=os.environ,  # HTTPS_PROXY & co.
            allow_import=args.allow_import,
            retry_timeout=args.retry_timeout,
            max_msg_size=args.max_msg_size,
            unix_socket=args.unix_socket,
            name=args.name,
            cafile=args.cafile,
            insecure=args.insecure,
            cert_fingerprint=args.cert_fingerprint,
            vectorization=args.vectorization,
            busy_poll=args.busy_poll / 1e6,
            proxy=args.proxy,
            status_interval=0.0 if args.quiet else args.status_interval,
            compression=args.compression,
        )
    except (ValueError, OSError, ImportError) as exc:  # TLS options, --cafile, a proxy URL, a codec not installed
        print(f"ws_gym.worker: {exc}", file=sys.stderr)
        return 1
    try:
        return loops.run(worker.run())
    except KeyboardInterrupt:
        log.info("interrupted; exiting")
        return 130
    except WsGymError as exc:
        log.error("%s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
