"""The adaptive spin of busy polling (ws_gym.polling.SpinPolicy), without I/O:
sequences of measured waits go in, the spin it chooses is checked. Plus
poll_replies driven by fake connections (no sockets)."""

from __future__ import annotations

import os
import random
import threading

import pytest

from ws_gym import polling
from ws_gym.polling import SpinPolicy, poll_replies

LIMIT = 0.001


@pytest.fixture(autouse=True)
def seeded(request, monkeypatch):
    """The probes' jitter from a seeded generator: the same sequence every run."""
    monkeypatch.setattr(polling, "random", random.Random(int(os.environ.get("SPIN_SEED", "0"))))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def run(policy: SpinPolicy, clock: Clock, seconds: float, *, on: float, off: float,
        caught: bool = True, preempted: bool = False) -> list[bool]:
    """Feed ``seconds`` of waits: ``on`` seconds each while it spins, ``off``
    while it does not. Returns whether it spun, wait by wait."""
    spun = []
    end = clock.now + seconds
    while clock.now < end:
        spinning = policy.spin > 0
        assert policy.spin in (0.0, policy.limit)
        spun.append(spinning)
        cycle = on if spinning else off
        clock.now += cycle
        policy.record(cycle, caught, preempted)
    return spun


def share(spun: list[bool]) -> float:
    return sum(spun) / len(spun)


def test_it_spins_where_spinning_is_faster_and_probes_ever_less_often():
    clock = Clock()
    policy = SpinPolicy(LIMIT, clock=clock)
    assert policy.spin == LIMIT  # on until measured otherwise: an idle machine gains at once
    spun = run(policy, clock, 10.0, on=50e-6, off=200e-6)  # the idle machine: ~4x
    block = int(SpinPolicy.BLOCK_TIME / 50e-6)  # one block on (BLOCK_TIME: 400 cycles of 50 us) ...
    assert all(spun[:block - 1])
    probe = spun.index(False)  # ... then a probe of not spinning, which loses
    off = int(SpinPolicy.BLOCK_TIME / 200e-6)  # the probe's block: 100 cycles of 200 us
    assert block - 2 <= probe <= block + 2 and not any(spun[probe:probe + off - 1])
    assert all(spun[probe + off + 2:probe + off + 2 * block])  # back to spinning
    assert policy.spinning and policy.switches == 0  # spinning never stopped but for probes
    assert share(spun) > 0.99
    # probes double their distance up to MAX_PERIOD: a few in the first second, ~1/s after
    assert 8 <= policy.probes <= 10 / (0.75 * SpinPolicy.MAX_PERIOD) + 8, policy.probes


@pytest.mark.parametrize("why", ["preempted", "missed"])
def test_it_stops_spinning_at_once_when_starved_or_when_spins_miss(why):
    """Spins that lose the CPU (starvation) or do not catch the reply stop
    spinning after one block, even where they look faster."""
    clock = Clock()
    policy = SpinPolicy(LIMIT, clock=clock)
    run(policy, clock, 1.0, on=50e-6, off=200e-6)
    assert policy.spinning
    bad = {"preempted": True} if why == "preempted" else {"caught": False}
    run(policy, clock, 0.08, on=50e-6, off=200e-6, **bad)  # within a block or two
    assert not policy.spinning
    spun = run(policy, clock, 3.0, on=50e-6, off=200e-6, **bad)
    assert sum(spun) * 50e-6 < 0.02 * 3.0  # spinning < 2% of the time: short probes
    assert not policy.spinning
    # once the spins catch their replies on the CPU again, it spins again within about MAX_PERIOD
    run(policy, clock, 1.5 * SpinPolicy.MAX_PERIOD, on=50e-6, off=200e-6)
    assert policy.spinning


def test_a_few_starved_spins_do_not_stop_it():
    clock = Clock()
    policy = SpinPolicy(LIMIT, clock=clock)
    spun = []
    for i in range(20_000):
        spinning = policy.spin > 0
        spun.append(spinning)
        cycle = 50e-6 if spinning else 200e-6
        clock.now += cycle
        policy.record(cycle, caught=i % 4 != 0, preempted=i % 5 == 0)  # 1 miss in 4, 1 preemption in 5
    assert share(spun) > 0.95 and policy.spinning  # the rest: probes of not spinning


def test_it_stops_spinning_where_sleeping_is_faster_and_the_probes_cost_little():
    """A busy machine: spinning slows the round trip 6x though nothing shows
    it but the times. A probe of spinning stops as soon as it cannot win."""
    clock = Clock()
    policy = SpinPolicy(LIMIT, clock=clock)
    spun = run(policy, clock, 10.0, on=1.2e-3, off=0.2e-3)
    assert not policy.spinning
    time_spinning = sum(spun) * 1.2e-3
    assert time_spinning < 0.02 * 10.0, time_spinning  # under 2% of the time, learning included
    late = run(policy, clock, 5.0, on=1.2e-3, off=0.2e-3)
    assert sum(late) * 1.2e-3 < 0.01 * 5.0  # in the long run: under 1%
    assert policy.probes >= 5  # it does keep looking


def test_ties_go_to_sleeping_and_spinning_must_win_clearly():
    clock = Clock()
    policy = SpinPolicy(LIMIT, clock=clock)
    run(policy, clock, 5.0, on=100e-6, off=100e-6)
    assert not policy.spinning
    run(policy, clock, 5.0, on=95e-6, off=100e-6)  # 5% is within the noise: stay off
    assert not policy.spinning
    run(policy, clock, 2.0 * SpinPolicy.MAX_PERIOD, on=50e-6, off=100e-6)
    assert policy.spinning


def test_it_follows_a_load_that_comes_and_goes():
    clock = Clock()
    policy = SpinPolicy(LIMIT, clock=clock)
    for _ in range(3):
        spun = run(policy, clock, 2 * SpinPolicy.MAX_PERIOD + 1.0, on=50e-6, off=200e-6)  # idle
        assert policy.spinning and share(spun) > 0.6
        spun = run(policy, clock, 3.0, on=2e-3, off=0.3e-3, preempted=True)  # loaded
        assert not policy.spinning and share(spun) < 0.05


def test_a_rare_slow_cycle_decides_nothing():
    """A slow cycle now and then (a reset, the learner's update) changes nothing."""
    clock = Clock()
    policy = SpinPolicy(LIMIT, clock=clock)
    i = 0
    spun = []
    while clock.now < 1005.0:
        i += 1
        spinning = policy.spin > 0
        spun.append(spinning)
        cycle = (50e-6 if spinning else 200e-6) * (40 if i % 50 == 0 else 1)
        clock.now += cycle
        policy.record(cycle)
    assert policy.spinning and share(spun) > 0.95


def test_a_zero_limit_never_spins():
    policy = SpinPolicy(0.0)
    for _ in range(100):
        policy.record(1e-4, True, False)
    assert policy.spin == 0.0 and policy.probes == 0 and not policy.spinning


def test_record_is_cheap():
    import time

    policy = SpinPolicy(LIMIT)
    n = 100_000
    t0 = time.perf_counter()
    for _ in range(n):
        policy.record(5e-5, True, False)
    per = (time.perf_counter() - t0) / n
    assert per < 5e-6, per  # a few hundred ns where nothing else runs; loose for busy CI machines


# ------------------------------------------------------- poll_replies, no sockets


class FakeWire:
    """A polled connection whose reply is there after ``reads`` reads."""

    def __init__(self, call: "FakeCall", reads: int) -> None:
        self.call, self.reads = call, reads
        self.polled, self.ended = True, False
        self.rlock = threading.RLock()

    def poll_read(self) -> bool:
        self.reads -= 1
        if self.reads <= 0:
            self.call.done = True
            self.conn.pending.clear()
            return True
        return False


class FakeConn:
    def __init__(self, wire: FakeWire) -> None:
        self.wire = wire
        self.pending = {1: None}
        wire.conn = self


class FakeCall:
    def __init__(self, reads: int) -> None:
        self.done = False
        self.batch = [(FakeConn(FakeWire(self, reads)), 1, b"")]


def test_poll_replies_spins_as_the_policy_says_and_reports(monkeypatch):
    sleeps = []
    monkeypatch.setattr(polling, "wait_readable", lambda wires, timeout: sleeps.append(timeout))
    records = []
    original = SpinPolicy.record
    monkeypatch.setattr(SpinPolicy, "record", lambda self, *a: (records.append(a), original(self, *a))[1])
    policy = SpinPolicy(LIMIT)
    policy.spin = LIMIT  # spinning (as after a probe that paid)

    assert poll_replies(FakeCall(reads=3), 5.0, policy) > 4.0  # caught by the spin: no sleep
    assert sleeps == [] and records == []  # a cycle runs from one call's end to the next's: none yet
    assert poll_replies(FakeCall(reads=3), 5.0, policy) > 4.0
    assert sleeps == [] and len(records) == 1 and records[0][1] is True  # caught
    assert 0 < records[0][0] < 1.0

    policy.spin = 0.0  # sleeping at once: one read, then poll()
    assert poll_replies(FakeCall(reads=3), None, policy) is None
    assert len(sleeps) == 2 and len(records) == 2 and records[1][1] is False


def test_poll_replies_reports_nothing_for_a_timeout(monkeypatch):
    monkeypatch.setattr(polling, "wait_readable", lambda wires, timeout: None)
    policy = SpinPolicy(LIMIT)
    assert poll_replies(FakeCall(reads=10**9), 0.01, policy) == 0.0
    assert policy._n == 0 and policy.mark == 0.0  # and the next call starts no cycle
