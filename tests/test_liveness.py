"""The heartbeat rules (ws_gym.liveness): pure clocks, no sockets."""

from __future__ import annotations

import socket

import pytest

from ws_gym.liveness import TrainerLiveness, WorkerLiveness, check_interval, give_up_unacked, unacked_limit


def run_trainer(live: TrainerLiveness, *, rx: list[float], busy: bool, until: float, step: float):
    """Tick the trainer's rules every ``step`` s; returns (ping times, time found dead or None)."""
    pings, t, last_rx, rx = [], 0.0, 0.0, sorted(rx)
    while t <= until:
        while rx and rx[0] <= t:
            last_rx = rx.pop(0)
        if live.dead(t, last_rx, busy):
            return pings, t
        if live.ping_due(t, last_rx):
            pings.append(t)
        t = round(t + step, 9)
    return pings, None


@pytest.mark.parametrize("heartbeat", [0.5, 1.0, 10.0])
def test_an_idle_silent_worker_is_dead_within_one_and_a_half_heartbeats(heartbeat):
    live = TrainerLiveness(heartbeat)
    pings, dead = run_trainer(live, rx=[], busy=False, until=5 * heartbeat, step=check_interval(heartbeat))
    assert pings and pings[0] == pytest.approx(heartbeat / 2, abs=check_interval(heartbeat))
    assert dead is not None and 1.25 * heartbeat <= dead <= 1.25 * heartbeat + check_interval(heartbeat)
    # a busy worker on a dead link: the next ping within half a heartbeat (plus a
    # check), the kernel's limit after it; room is left for the kernel's lateness
    assert 0.5 * heartbeat + check_interval(heartbeat) + unacked_limit(heartbeat) <= 1.35 * heartbeat


def test_a_busy_worker_is_pinged_every_half_heartbeat_and_never_found_dead_here():
    """Busy: the pings keep bytes in flight for the kernel to time out; silence alone is no proof."""
    live = TrainerLiveness(1.0)
    pings, dead = run_trainer(live, rx=[], busy=True, until=6.0, step=0.1)
    assert dead is None
    gaps = [b - a for a, b in zip(pings, pings[1:])]
    assert len(pings) >= 10 and all(0.45 <= g <= 0.65 for g in gaps), pings


def test_an_answering_worker_is_never_dead():
    live = TrainerLiveness(1.0)
    answers = [i * 0.55 + 0.01 for i in range(40)]  # a pong soon after each ping
    pings, dead = run_trainer(live, rx=answers, busy=False, until=20.0, step=0.1)
    assert dead is None and pings


def test_traffic_needs_no_pings():
    live = TrainerLiveness(1.0)
    pings, dead = run_trainer(live, rx=[i * 0.01 for i in range(2000)], busy=False, until=19.0, step=0.1)
    assert pings == [] and dead is None


def test_the_worker_gives_a_silent_trainer_up_after_one_heartbeat():
    live = WorkerLiveness(2.0)
    assert not live.dead(101.9, 100.0)
    assert live.dead(102.0, 100.0)
    assert check_interval(2.0) == pytest.approx(0.2) and check_interval(60) == 0.5


def test_the_kernel_timeout_is_set_on_tcp_sockets_only():
    with socket.socket() as tcp:
        ok = give_up_unacked(tcp, 1.5)
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            assert ok and tcp.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 1500
    if hasattr(socket, "AF_UNIX"):
        with socket.socket(socket.AF_UNIX) as unix:
            assert give_up_unacked(unix, 1.5) is False
    assert give_up_unacked(None, 1.0) is False
