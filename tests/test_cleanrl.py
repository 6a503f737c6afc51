"""examples/cleanrl_ppo.py runs end to end (briefly) and logs true episode returns.

The script reads returns from ``infos["final_info"]["episode"]`` masked by
``infos["final_info"]["_episode"]``; on CartPole a return equals its episode's
length, which catches a wrong mask (returns of envs that did not end).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from .conftest import ROOT

pytest.importorskip("torch", reason="needs torch, from the sb3 extra: pip install '.[sb3]'")

STEPS = 2048


def test_cleanrl_ppo_example_runs_and_logs_episodes():
    proc = subprocess.run(
        [sys.executable, "examples/cleanrl_ppo.py", "--total-timesteps", str(STEPS), "--num-envs", "4",
         "--local-workers", "2", "--seed", "3"],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    episodes = [
        (int(step), float(ret), int(length))
        for step, ret, length in re.findall(
            r"global_step=(\d+), episodic_return=([\d.]+), episodic_length=(\d+)", proc.stdout)
    ]
    assert len(episodes) >= 40, proc.stdout[-2000:]
    for step, ret, length in episodes:
        assert ret == length and 8 <= length <= 500 and length <= step, (step, ret, length)
    assert sum(length for _, _, length in episodes) <= STEPS
    assert re.search(rf"done: {STEPS} steps in [\d.]+ s; mean episodic return over the last 20 episodes: [\d.]+",
                     proc.stdout), proc.stdout[-500:]
