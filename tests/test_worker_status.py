"""The worker CLI's status lines (ws_gym.worker_status): a real trainer, real worker processes."""

from __future__ import annotations

import queue
import re
import subprocess
import threading
import time

import numpy as np
import pytest

import ws_gym

SERVING = re.compile(
    r"serving 2 envs of CartPole-v1 for (?P<url>\S+) as worker (?P<name>\S+) \(envs 0\.\.1\): "
    r"(?P<rate>[\d,.]+) env-steps/s over the last (?P<window>[\d.]+) s, (?P<total>[\d,]+) env-steps in all, "
    r"RTT (?:(?P<rtt>[\d.]+) ms|n/a)$"
)
SERVED = re.compile(
    r"served 2 envs of CartPole-v1 for (?P<url>\S+) as worker (?P<name>\S+) \(envs 0\.\.1\): "
    r"(?P<total>[\d,]+) env-steps in all \((?P<requests>[\d,]+) step requests x 2 envs\) in [\d.]+ s$"
)


def number(text: str) -> float:
    return float(text.replace(",", ""))


class Lines:
    """A worker's output, line by line, read by a thread (its stdout is a pipe)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, pattern: re.Pattern, count: int, deadline: float, between=None) -> list[str]:
        """Lines until ``count`` match ``pattern`` (``between()`` runs while none comes)."""
        while sum(1 for line in self.lines if pattern.search(line)) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"no {count} lines like {pattern.pattern!r} in time:\n" + "\n".join(self.lines))
            try:
                line = self._queue.get_nowait() if between is not None else self._queue.get(timeout=0.1)
            except queue.Empty:
                if between is not None:
                    between()
                continue
            if line is None:
                raise AssertionError("the worker ended:\n" + "\n".join(self.lines))
            self.lines.append(line)
        return self.lines

    def rest(self, timeout: float = 30) -> tuple[int, list[str]]:
        """The exit code and all lines, once the worker has ended."""
        code = self.proc.wait(timeout)
        while (line := self._queue.get(timeout=timeout)) is not None:
            self.lines.append(line)
        return code, self.lines


def serve_and_watch(cli_workers, *extra: str, env: dict | None = None):
    """Step a 2-env trainer served by one worker until it printed two status
    lines; the trainer's URL, the steps taken, the exit code and the worker's lines."""
    envs = ws_gym.RemoteVectorEnv(2, env_id="CartPole-v1", port=0, connect_timeout=30)
    steps = 0
    try:
        proc = cli_workers.start("--url", envs.url, "--num-envs", "2", *extra, env=env)
        lines = Lines(proc)
        envs.reset(seed=0)
        actions = np.array([0, 1])

        def step() -> None:
            nonlocal steps
            for _ in range(20):
                envs.step(actions)
                steps += 1

        if "--quiet" in extra:
            deadline = time.monotonic() + 1.5  # three intervals' worth of stepping, no line expected
            while time.monotonic() < deadline:
                step()
        else:
            lines.wait_for(SERVING, 2, time.monotonic() + 20, between=step)
        step()  # at least some steps after the last line
    finally:
        envs.close()
    code, out = lines.rest()
    return envs.url, steps, code, out


def check_lines(url: str, steps: int, code: int, out: list[str]) -> None:
    text = "\n".join(out)
    assert code == 0, text
    serving = [m for m in map(SERVING.search, out) if m]
    assert len(serving) >= 2, text
    for m in serving:
        assert m["url"] == url and m["name"], text
        assert number(m["window"]) > 0, text
    first, second = serving[:2]
    # stepping went on all along before the second line: both saw steps
    assert number(first["rate"]) > 0 and number(second["rate"]) > 0, text
    totals = [int(number(m["total"])) for m in serving]
    assert totals == sorted(totals) and totals[-1] <= 2 * steps and totals[-1] % 2 == 0, text
    # the round trip time, in ms (a pong on loopback comes well within the 0.5 s a line waits)
    assert all(m["rtt"] is None or 0 < float(m["rtt"]) < 500 for m in serving), text
    assert any(m["rtt"] is not None for m in serving), text
    served = [m for m in map(SERVED.search, out) if m]
    assert len(served) == 1 and served[0]["url"] == url, text
    assert int(number(served[0]["total"])) == 2 * steps, text  # exact: env-steps = step requests x 2
    assert int(number(served[0]["requests"])) == steps, text
    # the end line comes before the worker says it exits
    assert text.index("served 2 envs") < text.index("the trainer closed the session; exiting"), text


@pytest.mark.parametrize("wire", ["1", "0"], ids=["frame-layer", "aiohttp"])
def test_status_lines(cli_workers, wire):
    check_lines(*serve_and_watch(cli_workers, "--status-interval", "0.5", env={"WS_GYM_WIRE": wire}))


@pytest.mark.parametrize("wire", ["1", "0"], ids=["frame-layer", "aiohttp"])
def test_quiet_prints_no_status_lines(cli_workers, wire):
    _, steps, code, out = serve_and_watch(cli_workers, "--status-interval", "0.5", "--quiet",
                                       env={"WS_GYM_WIRE": wire})
    text = "\n".join(out)
    assert code == 0 and steps > 0, text
    assert "connected to" in text and "hosting 2 x CartPole-v1" in text, text  # other logging as before
    assert not any(SERVING.search(line) or SERVED.search(line) for line in out), text


def test_status_interval_must_be_a_number_of_seconds(cli_workers):
    for bad in ("-1", "nan", "inf"):
        proc = cli_workers.start("--url", "ws://127.0.0.1:9/ws", "--status-interval", bad)
        code, out = cli_workers.finish(proc)
        assert code == 1 and "--status-interval" in out, out
