"""The dashboard page in a real browser: headless Chromium loads it while workers step.

Chromium's own ``--headless --dump-dom`` prints the DOM after the page's
scripts ran (``--virtual-time-budget`` lets its one-second polling run a few
times), so no Playwright is needed. The test finds the workers' names in the
table the page's script built from ``/status``, and an env-steps/s figure that
changes between two loads while the workers step.

Without a Chromium the test skips, saying why; with CI=true it fails, as CI
must run it (Debian: ``apt-get install chromium``). As root, Chromium runs with
``--no-sandbox``.

Also a tool: ``python -m tests.test_dashboard_browser --screenshot docs/dashboard.png``
runs workers for a while (a policy that learns a little, a worker lost and one
that reconnects) and takes the README's screenshot.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_browser() -> str | None:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def browser_or_skip() -> str:
    path = find_browser()
    if path is None:
        reason = "no headless Chromium (Debian: apt-get install chromium)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but the browser test cannot run: {reason}", pytrace=False)
        pytest.skip(reason)
    return path


def chromium(browser: str, url: str, *args: str, budget_ms: int = 4000, timeout: float = 90) -> str:
    """Run headless Chromium on ``url`` (bounded) and return what it printed."""
    with tempfile.TemporaryDirectory(prefix="ws_gym-chromium-") as profile:
        argv = [browser, "--headless", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
                "--disable-extensions", "--disable-background-networking", "--disable-dev-shm-usage",
                f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}", *args, url]
        if os.geteuid() == 0:
            argv.insert(1, "--no-sandbox")  # Chromium refuses to run as root with its sandbox
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"chromium failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc.stdout


def text_of(dom: str, element_id: str) -> str:
    match = re.search(rf'id="{element_id}"[^>]*>([^<]*)<', dom)
    assert match, f"no #{element_id} in the page:\n{dom[:3000]}"
    return match.group(1)


def field_texts(dom: str, field: str) -> list[str]:
    return re.findall(rf'<td data-field="{field}"[^>]*>([^<]*)<', dom)


class Stepping:
    """Step ``envs`` in a thread until stopped (the page is read meanwhile)."""

    def __init__(self, envs, policy=None) -> None:
        self.envs, self.policy = envs, policy
        self.steps = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            obs, _ = self.envs.reset(seed=0)
            while not self._stop.is_set():
                actions = self.policy(obs, self.steps) if self.policy else self.envs.action_space.sample()
                obs, *_ = self.envs.step(actions)
                self.steps += 1
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self.error = exc

    def __enter__(self) -> "Stepping":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        if self.error is not None and exc[0] is None:
            raise self.error


def test_the_page_shows_the_workers_and_a_live_throughput():
    browser = browser_or_skip()
    import gymnasium as gym

    import ws_gym  # noqa: F401

    envs = gym.make_vec("ws_gym/Remote-v0", num_envs=8, env_id="CartPole-v1", local_workers=2, port=0,
                        connect_timeout=60)
    try:
        with Stepping(envs) as stepping:
            deadline = time.monotonic() + 60
            while stepping.steps == 0:  # stepping (the first reset done)
                assert time.monotonic() < deadline and stepping.error is None, stepping.error
                time.sleep(0.05)
            reads = []
            while len(reads) < 2 or reads[-1]["rate"] == reads[-2]["rate"]:  # bounded: at most 5 loads
                assert len(reads) < 5, reads
                dom = chromium(browser, envs.unwrapped.dashboard_url, "--dump-dom")
                reads.append({
                    "names": sorted(field_texts(dom, "name")),
                    "states": field_texts(dom, "state"),
                    "rate": int(text_of(dom, "rate").replace(",", "")),
                    "env_steps": int(text_of(dom, "env-steps").replace(",", "")),
                    "live": text_of(dom, "live"),
                    "command": text_of(dom, "command"),
                })
        for read in reads:
            assert read["names"] == ["local-0", "local-1"], read
            assert read["states"] == ["active", "active"] and read["live"] == "live", read
            assert "python -m ws_gym.worker --url ws://127.0.0.1:" in read["command"], read
        assert reads[-1]["rate"] > 0 and reads[-1]["rate"] != reads[-2]["rate"]
        assert reads[-1]["env_steps"] > reads[0]["env_steps"] > 0
    finally:
        envs.close()


# ------------------------------------------------------- the README's screenshot

def screenshot(path: str, seconds: float) -> None:
    """Workers step for ``seconds`` (a policy that gets better, a worker lost,
    one that dials in again), then Chromium takes the page's picture."""
    import gymnasium as gym

    import ws_gym  # noqa: F401
    from tests.conftest import CliWorkers

    browser = find_browser()
    if browser is None:
        raise SystemExit("no headless Chromium (Debian: apt-get install chromium)")
    envs = gym.make_vec("ws_gym/Remote-v0", num_envs=8, env_id="CartPole-v1", port=0, connect_timeout=60,
                        on_worker_lost="wait", autoreset_mode="SameStep")
    workers = CliWorkers()
    rng = np.random.default_rng(0)
    began = time.monotonic()

    def policy(obs, step):  # push toward the pole's lean, with less noise as time goes by
        noise = max(0.02, 0.7 - 0.8 * (time.monotonic() - began) / seconds)
        lean = (obs[:, 2] + 0.5 * obs[:, 3] > 0).astype(np.int64)
        return np.where(rng.random(len(obs)) < noise, rng.integers(0, 2, len(obs)), lean)

    try:
        for name, count in (("gpu-box", 4), ("lab-pc-7", 2), ("laptop-anna", 2)):
            workers.start("--url", envs.url, "--env", "CartPole-v1", "--num-envs", str(count), "--name", name)
        with Stepping(envs, policy):
            time.sleep(seconds * 0.6)
            workers.procs[2].kill()  # a PC that went away: its envs truncate until someone serves them
            time.sleep(seconds * 0.2)
            workers.start("--url", envs.url, "--env", "CartPole-v1", "--num-envs", "2", "--name", "laptop-ben")
            time.sleep(seconds * 0.2)
            chromium(browser, envs.unwrapped.dashboard_url, f"--screenshot={os.path.abspath(path)}",
                     "--window-size=1280,960", "--hide-scrollbars", budget_ms=3000)
    finally:
        envs.close()
        workers.close()
    print(f"wrote {path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="take the dashboard's screenshot for the README")
    parser.add_argument("--screenshot", required=True, metavar="PNG")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long workers step first (default 60)")
    options = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    screenshot(options.screenshot, options.seconds)
