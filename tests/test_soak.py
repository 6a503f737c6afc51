"""A short soak of on_worker_lost="wait": workers killed, crashed, stalled and put
to sleep at random while the trainer steps; nothing may hang, leak or be lost.

The long run is ``python benchmarks/soak.py`` (same code, same checks, more
steps); this one runs every kind of chaos at least once per autoreset mode.
The schedule is seeded; the checks hold whatever the timing (see the script's
docstring for what is checked).

``test_soak_link_cuts`` runs the soak inside network namespaces (tests/netns.py)
with a worker on a PC whose link is cut: silently (nftables) and by taking its
interface down. It skips where namespaces cannot be made (not root, no ``ip`` or
``nft``), and fails instead with CI=true, like tests/test_link_cuts.py.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from tests import netns

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


HEARTBEAT = 1.0
NOTICE_BOUND = 1.5 * HEARTBEAT + 1.0  # from the cut until the trainer has dropped A's connection


@pytest.mark.timeout(180)
def test_soak_link_cuts():
    """Link cuts amid other chaos, in wait mode: the trainer notices each cut within
    1.5 heartbeats + 1 s, truncates A's envs and steps on; A's worker never exits,
    dials in again and serves again; the soak's own checks all hold."""
    reason = netns.unavailable()
    if reason:
        netns.skip_or_fail(reason)
    hb = HEARTBEAT
    cfg = soak.Config(
        seed=3,
        autoreset="SameStep",
        num_envs=8,
        local_workers=1,
        cli_workers=1,
        cli_envs=(2, 3),  # A's and the CLI worker's: the local worker keeps envs, so none waits for room
        pc_workers=1,
        kinds=("kill-cli", "kill-local", "crash", "stall", "sleep", "reset", soak.LINK_CUT),
        min_events={soak.LINK_CUT: 2},  # two cuts: one silent, one link-down (every two cuts have both)
        steps=10**12,
        duration=5.0,
        extra_time=30.0,
        gap=(20, 60),
        step_timeout=1.0,
        heartbeat=hb,
        heartbeat_slack=1.0,  # the soak fails a cut noticed later than 1.5 heartbeats + 1 s too
        recovery_timeout=15.0,
        clean_steps=20,
        close_timeout=15.0,
    )
    results, skipped = soak.run_with_link_cuts([cfg])
    if skipped:
        netns.skip_or_fail(skipped)
    assert len(results) == 1, results
    result = results[0]
    text = soak.summary([result], cfg)
    print(text)
    assert result.ok, text
    f = result.figures
    cuts = f["link_cuts"]
    assert f["events"][soak.LINK_CUT] >= 2 and len(cuts) >= 2, text
    assert {c["kind"] for c in cuts} == {"silent", "link-down"}, text
    for c in cuts:
        assert c["probe"] and not netns.Topology.reached(c["probe"]), f"the cut did not cut: {c}\n{text}"
        if c.get("ridden_out"):
            continue
        assert c["detect_s"] is not None and c["detect_s"] <= NOTICE_BOUND, f"{c}\n{text}"
        assert c["redial_s"] is not None, f"A did not dial in again: {c}\n{text}"
        assert c["back_s"] is not None or c.get("taken_over"), f"A's envs: {c}\n{text}"
    assert sum(not c.get("ridden_out") for c in cuts) >= 1, text
    # A's worker: served, never ended before close(), then ended with 0 (or 4 had it waited for envs)
    pcs = f["pc_workers"]
    assert pcs and all(p["served"] for p in pcs), text
    assert not f["pc_unexpected_exits"], text
    assert not any(p["exited_in_run"] for p in pcs), text
    # wait mode carried on: A's envs were truncated with worker_lost, and nothing was lost
    assert f["lost_env_steps"] > 0 and f["violations"] == 0 and f["slots_mismatched"] == 0, text
