"""A short soak of on_worker_lost="wait": workers killed, crashed, stalled and put
to sleep at random while the trainer steps; nothing may hang, leak or be lost.

The long run is ``python benchmarks/soak.py`` (same code, same checks, more
steps); this one runs every kind of chaos at least once per autoreset mode.
The schedule is seeded; the checks hold whatever the timing (see the script's
docstring for what is checked).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_soak():
    spec = importlib.util.spec_from_file_location("ws_gym_soak", ROOT / "benchmarks" / "soak.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


soak = load_soak()


@pytest.mark.parametrize("mode", ["NextStep", "SameStep"])
def test_soak_kill_restart_stall_sleep(mode):
    cfg = soak.Config(
        seed=7 if mode == "NextStep" else 8,
        autoreset=mode,
        num_envs=8,
        local_workers=2,
        cli_workers=2,
        steps=400,
        duration=4.0,
        gap=(20, 60),
        require_all_kinds=True,  # then go on until every kind of chaos happened once
        extra_time=12.0,
        step_timeout=1.0,
        heartbeat=1.0,
        recovery_timeout=15.0,
        clean_steps=20,
        close_timeout=10.0,
    )
    result = soak.run_soak(cfg)
    text = soak.summary([result], cfg)
    print(text)
    assert result.ok, text
    f = result.figures
    kinds = [k for k in soak.KINDS if soak.POSIX or not k.startswith("sleep")]
    assert all(f["events"][k] >= 1 for k in kinds), text
    # the chaos did hit: envs went out of service, were taken over, and stepped on
    assert f["outages"] >= 3 and f["takeovers"] >= 3 and f["reconnections"] >= 2, text
    assert f["env_steps"] > 0 and f["terminated"] > 0 and f["lost_env_steps"] > 0, text
    assert f["slow_steps"] >= 1, text  # a stall or a sleep ran into step_timeout
