"""examples/async_dqn.py runs end to end (briefly) over send()/recv() and logs true episodes.

Its transitions are completed by env id as envs come back from ``recv()``; on
CartPole an episode's return equals its length, which a mix-up of envs or a
wrong ``_episode`` mask would break.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from .conftest import ROOT

pytest.importorskip("torch", reason="needs torch, from the sb3 extra: pip install '.[sb3]'")

STEPS = 3000


def test_async_dqn_example_runs_and_logs_episodes():
    proc = subprocess.run(
        [sys.executable, "examples/async_dqn.py", "--total-timesteps", str(STEPS), "--num-envs", "6",
         "--batch-size", "3", "--local-workers", "2", "--learning-starts", "500", "--seed", "3"],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    episodes = [(int(step), float(ret), int(length)) for step, ret, length in re.findall(
        r"global_step=(\d+), episodic_return=([\d.]+), episodic_length=(\d+)", proc.stdout)]
    assert len(episodes) >= 40, proc.stdout[-2000:]
    for step, ret, length in episodes:
        assert ret == length and 8 <= length <= 500, (step, ret, length)
    # every transition stored belongs to one env's episode: their lengths add up to at most the steps
    assert sum(length for _, _, length in episodes) <= STEPS + 6
    assert re.search(r"done: \d+ steps in [\d.]+ s; mean episodic return over the last 20 episodes: [\d.]+",
                     proc.stdout), proc.stdout[-500:]
