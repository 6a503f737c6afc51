"""Worker processes the trainer starts itself on loopback (``local_workers=W``).

No orphans, ever: each child holds the read end of a pipe on its stdin and exits
when it closes, which the OS does however the trainer ends (close, exception,
exit, SIGKILL), on Windows as on Unix. ``close()`` also terminates and then
kills stragglers, and an ``atexit`` hook closes any group still open.
"""

from __future__ import annotations

import atexit
import logging
import os
import subprocess
import sys
import weakref

from .errors import WsGymError
from .protocol import EXIT_NOT_FOUND, EXIT_REFUSED, EXIT_UNAUTHORIZED, EXIT_UNTRUSTED, TOKEN_ENV

log = logging.getLogger("ws_gym")

_live: "weakref.WeakSet[LocalWorkers]" = weakref.WeakSet()
MAX_RESTARTS = 3


def split_envs(num_envs: int, workers: int) -> list[int]:
    """Split ``num_envs`` among ``workers`` as evenly as possible (first ones get more)."""
    if workers < 1 or workers > num_envs:
        raise ValueError(f"local_workers must be between 1 and num_envs={num_envs}, got {workers}")
    base, extra = divmod(num_envs, workers)
    return [base + (1 if i < extra else 0) for i in range(workers)]


class LocalWorkers:
    """A group of ``python -m ws_gym.worker`` processes dialing ``url``."""

    def __init__(
        self, url: str, counts: list[int], *, token: str | None = None, cert_fingerprint: str | None = None,
        vectorization: str = "sync", unix_socket: str | None = None, busy_poll: float = 0.0,
        environment: dict[str, str] | None = None,
    ) -> None:
        # no proxy between the trainer and its own workers (it may listen on a LAN address)
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        env.update(environment or {})  # the trainer's transport choices (see Transport.worker_environment)
        # The children import what the trainer can import (user env modules too).
        paths = [p for p in sys.path if p]
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([os.getcwd(), *paths]))
        if token:
            env[TOKEN_ENV] = token
        else:
            env.pop(TOKEN_ENV, None)
        self.procs: list[subprocess.Popen] = []
        self._env = env
        self._cmds: list[list[str]] = []
        self._restarts = [0] * len(counts)
        self.max_restarts: int | None = MAX_RESTARTS  # None: restart for ever
        try:
            for i, count in enumerate(counts):
                cmd = [
                    sys.executable, "-m", "ws_gym.worker",
                    "--url", url, "--num-envs", str(count),
                    "--allow-import", "--exit-with-parent",
                    "--retry-timeout", "30", "--log-level", "WARNING",
                    "--name", f"local-{i}",
                ]
                if vectorization != "sync":  # envs in subprocesses of each worker
                    cmd += ["--vectorization", vectorization]
                if unix_socket:  # the trainer's private Unix socket instead of loopback TCP
                    cmd += ["--unix-socket", unix_socket]
                if busy_poll:  # a spare core each: poll for the next request after a reply
                    cmd += ["--busy-poll", f"{busy_poll * 1e6:g}"]
                if cert_fingerprint:  # wss://: trust exactly the trainer's own certificate
                    cmd += ["--cert-fingerprint", cert_fingerprint]
                self._cmds.append(cmd)
                self.procs.append(self._spawn(cmd))
        except BaseException:
            self.close()
            raise
        _live.add(self)

    def _spawn(self, cmd: list[str]) -> subprocess.Popen:
        return subprocess.Popen(cmd, stdin=subprocess.PIPE, env=self._env)

    def check(self, free: bool = True) -> None:
        """Restart a worker that crashed; raise if one was refused or keeps dying.

        Called while the trainer waits for workers, so a crashed local worker
        (an env that killed its process, say) is replaced at the next reset.
        Restarting for ever (``max_restarts=None``, on_worker_lost="wait"), a
        worker refused because other workers took its envs is no error: it is
        started again once envs are ``free``.
        """
        for i, proc in enumerate(self.procs):
            code = proc.poll()
            if code is None:
                continue
            if code == EXIT_REFUSED and self.max_restarts is None:
                if not free:
                    continue  # every env has a worker now; start it again when one is lost
            elif code in (EXIT_REFUSED, EXIT_UNAUTHORIZED, EXIT_UNTRUSTED, EXIT_NOT_FOUND) or (
                self.max_restarts is not None and self._restarts[i] >= self.max_restarts
            ):
                raise WsGymError(
                    f"local worker {i} (pid {proc.pid}) exited with code {code}"
                    + (" after %d restarts" % self._restarts[i] if self._restarts[i] else "")
                    + "; its log is above"
                )
            log.warning("local worker %d (pid %d) exited with code %s; restarting it", i, proc.pid, code)
            if proc.stdin is not None:
                proc.stdin.close()
            self._restarts[i] += 1
            self.procs[i] = self._spawn(self._cmds[i])

    def close(self, timeout: float = 5.0) -> None:
        """Close the pipes (workers exit), then terminate and kill what is left."""
        _live.discard(self)
        for proc in self.procs:
            if proc.stdin is not None and not proc.stdin.closed:
                try:
                    proc.stdin.close()
                except OSError:
                    pass
        for proc in self.procs:
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(timeout=2)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs = [p for p in self.procs if p.returncode is None]


@atexit.register
def _close_all() -> None:
    for group in list(_live):
        group.close(timeout=2)
