"""Shared helpers: worker processes started from the CLI, exact comparisons."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A port the OS says is free now (for workers that start before the trainer)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CliWorkers:
    """``python -m ws_gym.worker`` processes; all are killed at teardown."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, *args: str, env: dict | None = None) -> subprocess.Popen:
        full_env = dict(os.environ, PYTHONPATH=str(ROOT))
        full_env.update(env or {})
        proc = subprocess.Popen(
            [sys.executable, "-m", "ws_gym.worker", *args],
            cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.procs.append(proc)
        return proc

    def finish(self, proc: subprocess.Popen, timeout: float = 30) -> tuple[int, str]:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=10)


@pytest.fixture
def cli_workers():
    workers = CliWorkers()
    yield workers
    workers.close()


def assert_same(a, b, path="value", opaque_ok=False):
    """Exact equality of nested results: types, dtypes, shapes and values.

    With ``opaque_ok``, a value with no wire form on one side may be its repr
    string on the other.
    """
    if isinstance(b, np.ndarray) and b.dtype == object:
        assert isinstance(a, np.ndarray) and a.dtype == object, f"{path}: {type(a)} vs object array"
        assert a.shape == b.shape, f"{path}: shape {a.shape} vs {b.shape}"
        for i, (x, y) in enumerate(zip(a.ravel(), b.ravel())):
            assert_same(x, y, f"{path}[{i}]", opaque_ok)
        return
    if isinstance(b, np.ndarray):
        assert isinstance(a, np.ndarray), f"{path}: {type(a).__name__} vs ndarray"
        assert a.dtype == b.dtype, f"{path}: dtype {a.dtype} vs {b.dtype}"
        assert a.shape == b.shape, f"{path}: shape {a.shape} vs {b.shape}"
        assert np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"), f"{path}: {a} vs {b}"
        return
    if isinstance(b, dict):
        assert isinstance(a, dict), f"{path}: {type(a).__name__} vs dict"
        assert list(a.keys()) == list(b.keys()), f"{path}: keys {list(a)} vs {list(b)}"
        for k in b:
            assert_same(a[k], b[k], f"{path}[{k!r}]", opaque_ok)
        return
    if isinstance(b, (list, tuple)):
        assert type(a) is type(b), f"{path}: {type(a).__name__} vs {type(b).__name__}"
        assert len(a) == len(b), f"{path}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]", opaque_ok)
        return
    if opaque_ok and isinstance(a, str) and type(b).__module__ not in ("builtins", "numpy"):
        assert a == repr(b), f"{path}: {a!r} vs repr {b!r}"
        return
    assert type(a) is type(b), f"{path}: {type(a).__name__} vs {type(b).__name__} ({a!r} vs {b!r})"
    if isinstance(b, float) and b != b:
        assert a != a, f"{path}: {a} vs nan"
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"
