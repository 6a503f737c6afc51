"""The processes a benchmark script starts, and their environment.

:class:`Children` ends every process it started: at the end, on Ctrl-C or
SIGTERM, on an error, and at exit as a last resort. Shared by the scripts
that start worker (and relay) processes themselves.
"""

from __future__ import annotations

import atexit
import os
import subprocess
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parent.parent


class Children:
    """Every process this script starts; :meth:`stop_all` ends those still running
    (at the end, on Ctrl-C or SIGTERM, on an error, and at exit as a last resort)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        atexit.register(self.stop_all)

    def start(self, cmd: list[str], env: dict[str, str], out: IO[bytes] | int) -> subprocess.Popen:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen, grace: float = 10.0) -> int | None:
        """Wait up to ``grace`` seconds for it to end, then SIGTERM, then SIGKILL."""
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if proc in self.procs:
            self.procs.remove(proc)
        return proc.returncode

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self.procs = []


def child_env(**extra: str) -> dict[str, str]:
    """This environment, with this checkout first on the path."""
    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=str(ROOT) + (os.pathsep + path if path else ""), **extra)
