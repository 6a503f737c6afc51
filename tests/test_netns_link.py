"""benchmarks/netns_link.py in real network namespaces: the delay and rate of each
worker's link, CartPole through it, and nothing left afterwards.

Needs root, ``ip`` and ``nft`` (tests/netns.py decides); skipped without them,
failed instead under CI=true. The link is netem where the kernel has it, else
the user-space delay line of tests/netns.py: both are held to the same bounds.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from benchmarks import netns_link as nl  # benchmarks/ is a namespace package
from tests import netns

MARGIN_MS = 15  # what a round trip may take beyond the configured RTT (Python at both ends, a busy machine)


@pytest.fixture
def net():
    """Fresh namespaces for each test; after it, checked gone with every delay line."""
    reason = netns.unavailable()
    if reason:
        netns.skip_or_fail(reason)
    links = nl.NetnsLinks(workers=2)
    try:
        links.create()
    except Exception as exc:
        links.close()
        netns.skip_or_fail(f"could not build the namespaces: {exc}")
    try:
        yield links
    finally:
        relay_pids = [proc.pid for proc, _ in links.topo.relays.values()]
        links.close()
    assert not links.leftovers(), f"namespaces left: {links.leftovers()}"
    assert not [pid for pid in relay_pids if netns._pid_alive(pid)], "a delay line still runs"


def test_round_trip_is_twice_each_links_delay(net):
    """Each worker's link has its own delay: a TCP round trip between T and a
    worker takes its RTT (>= 2 x delay, within a margin); a datagram's one-way
    time is the delay, barely late."""
    delays = {0: 20.0, 1: 5.0}
    for i, delay in delays.items():
        net.set_link(i, delay)
    for i, delay in delays.items():
        rtt = nl.round_trips(net, i, count=10)
        assert rtt["min_ms"] >= 2 * delay, (i, delay, rtt)
        assert rtt["p50_ms"] < 2 * delay + MARGIN_MS, (i, delay, rtt)
        for upstream in (True, False):
            one = nl.one_way(net, i, messages=300, interval=0.001, upstream=upstream)
            assert one["lost"] == 0, one
            assert one["min_ms"] >= delay, (i, delay, upstream, one)
            assert one["p50_ms"] < delay + 2, (i, delay, upstream, one)  # lateness: typically 0.1 ms
    print(f"\nlinks via {sorted(set(net.how.values()))}: RTTs and one-way times within bounds")


def test_rate_is_enforced_each_way(net):
    """20 Mbit/s on worker 0's link: 3 MiB take about size / rate each way,
    never less; worker 1's plain link is much faster."""
    rate, nbytes = 20.0, 3 << 20
    net.set_link(0, 10, rate_mbit=rate)
    ideal = nbytes * 8 / (rate * 1e6)
    for upstream in (True, False):
        r = nl.bulk(net, 0, nbytes=nbytes, upstream=upstream)
        print(f"\n{'up' if upstream else 'down'} at {rate:g} Mbit/s via {net.how['w0']}: {r}")
        assert r["seconds"] >= ideal, r  # the payload alone needs this at the rate
        assert r["seconds"] < 1.5 * ideal + 1.0, r
    free = nl.bulk(net, 1, nbytes=nbytes)
    assert free["seconds"] < ideal / 3, free
    stats = net.relay_stats(0)
    if stats is not None:  # the delay line: it sent everything, each frame barely late
        assert stats["send_errors"] == 0, stats
        assert stats["late_mean_ms"] < 2, stats


def test_cartpole_through_a_link(net):
    """A trainer in T (listening on T's address, with a generated token) and a
    real ``python -m ws_gym.worker`` in a worker namespace step CartPole; each
    step is one round trip through the link."""
    net.set_link(0, 10)
    r = nl.step_cartpole(net, 0, steps=5, timeout=60)
    assert r["url"].startswith(f"ws://{net.trainer_host}:"), r
    assert r["token"], "a non-loopback trainer generates a token"
    assert r["worker_exit"] == 0, r
    assert all(20 <= ms < 20 + 10 * MARGIN_MS for ms in r["step_ms"]), r


def test_stale_namespaces_go_and_any_number_of_workers(tmp_path):
    """A killed run's namespaces (its pid gone) are deleted by the next
    ``create``; five workers get five namespaces with addresses in order."""
    reason = netns.unavailable()
    if reason:
        netns.skip_or_fail(reason)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=30)
    stale = f"wsg{dead.pid}nw3"
    netns.run(["ip", "netns", "add", stale])
    links = nl.NetnsLinks(workers=5)
    try:
        links.create()
        listed = netns.run(["ip", "netns", "list"])
        assert stale not in listed.split(), listed
        assert [links.worker_host(i) for i in range(5)] == [f"10.213.0.{i}" for i in range(2, 7)]
        links.set_link(4, 3)
        rtt = nl.round_trips(links, 4, count=3)
        assert 6 <= rtt["min_ms"] < 6 + MARGIN_MS, rtt
        assert nl.round_trips(links, 0, count=3)["min_ms"] < 6, "worker 0's link has no delay"
        assert links.exec_argv(2, ["true"])[:4] == ["ip", "netns", "exec", links.ns(2)]
        subprocess.run(links.worker_argv(2, ["true"]), check=True, timeout=30)
    finally:
        netns.run(["ip", "netns", "del", stale], check=False)
        links.close()
    assert not links.leftovers(), f"namespaces left: {links.leftovers()}"
