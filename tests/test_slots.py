"""SlotTable, which worker serves which envs: no sockets, no loop.

The connections are plain ``WorkerConn`` records, with no socket behind them.
"""

from __future__ import annotations

import threading
import time
import pytest

from ws_gym.connection import WorkerConn, WorkerState
from ws_gym.errors import ConnectTimeoutError, WorkerLostError
from ws_gym.slots import SlotTable, env_ranges

URL = "ws://127.0.0.1:8765/ws"


def Conn(start: int, count: int) -> WorkerConn:
    return WorkerConn(start, f"w{start}", "127.0.0.1", start, count)


def admit(table: SlotTable, wanted: int, prefer: tuple[int, int] | None = None, *, active: bool = True) -> WorkerConn:
    """What the admission does with a hello: take a free run (at most ``wanted`` envs)."""
    with table.cond:
        start, run = table.free_run(prefer)
        assert run, "no free run"
        conn = Conn(start, min(run, wanted))
        table.take(conn)
    if active:
        table.activate(conn)
    return conn


def test_env_ranges():
    assert env_ranges([0, 1, 2, 5, 7, 8]) == "0..2, 5, 7..8"
    assert env_ranges([3]) == "3"
    assert env_ranges([]) == ""


def test_workers_are_given_consecutive_runs_in_admission_order():
    table = SlotTable(6)
    a, b = admit(table, 2), admit(table, 3)
    assert (a.start, a.count, b.start, b.count) == (0, 2, 2, 3)
    c = admit(table, 4)  # only one env is left
    assert (c.start, c.count) == (5, 1)
    assert table.free_run() == (0, 0)
    assert table.serving() == [a, b, c]


def test_a_freed_run_is_offered_first_and_the_preferred_run_when_free():
    table = SlotTable(6)
    a, b, c = admit(table, 2), admit(table, 2), admit(table, 2)
    table.release(a)
    table.release(b)
    assert table.free_run() == (0, 4)
    assert table.free_run((2, 4)) == (2, 2)  # a returning worker gets its envs back
    back = admit(table, 2, prefer=(2, 4))
    assert (back.start, back.count) == (2, 2)
    assert table.free_run((2, 4)) == (0, 2)  # taken now: the first free run instead
    assert table.ordered_all() == [back, c]


def test_a_worker_still_starting_holds_its_slots():
    table = SlotTable(2)
    starting = admit(table, 2, active=False)
    with table.cond:
        assert table.free_run() == (0, 0) and table.starting()
    assert table.covered() == 0
    table.activate(starting)
    assert table.covered() == 2 and not table.starting()


def test_layout_shows_holes_where_no_active_worker_serves():
    table = SlotTable(7)
    a, b, c = admit(table, 2), admit(table, 3), admit(table, 2)
    b.state = WorkerState.LOST  # lost: inactive before its slots are freed
    table.changed()
    assert table.layout() == [(0, 2, a), (2, 5, None), (5, 7, c)]
    table.release(b)
    table.release(c)
    assert table.layout() == [(0, 2, a), (2, 7, None)]
    assert table.covered() == 2


def test_serving_raises_naming_the_envs_without_a_worker_and_the_last_event():
    table = SlotTable(6)
    with pytest.raises(WorkerLostError, match=r"none connected yet"):
        table.serving()
    a, b, c = admit(table, 2), admit(table, 2), admit(table, 2)
    assert table.serving() == [a, b, c]
    b.state = WorkerState.LOST
    table.changed()
    table.release(b)
    table.note("worker B (10.0.0.2, envs 2..3) disconnected")
    with pytest.raises(WorkerLostError) as caught:
        table.serving()
    assert str(caught.value) == (
        "envs 2..3 have no worker (worker B (10.0.0.2, envs 2..3) disconnected); "
        "call reset() to wait for a replacement"
    )
    admit(table, 2)
    assert [w.start for w in table.serving()] == [0, 2, 4]


def test_serving_is_cached_until_the_table_changes():
    table = SlotTable(2)
    a, b = admit(table, 1), admit(table, 1)
    first = table.serving()
    assert table.serving() is first
    table.release(b)
    admit(table, 1)
    assert table.serving() is not first and table.serving()[0] is a


def test_only_the_last_five_events_are_kept():
    table = SlotTable(1)
    assert table.last_event() == "none connected yet"
    for i in range(8):
        table.note(f"event {i}")
    assert table._events == [f"event {i}" for i in range(3, 8)]
    assert table.last_event() == "event 7"


def test_wait_covered_returns_once_every_env_is_served():
    table = SlotTable(4)
    admit(table, 2)
    seen: list[int] = []
    timer = threading.Timer(0.2, admit, args=(table, 2))
    timer.start()
    try:
        t0 = time.monotonic()
        table.wait_covered(10, URL, progress=seen.append)
        assert time.monotonic() - t0 < 5  # woken by the admission, not the timeout
    finally:
        timer.cancel()
    assert seen == [2]
    assert table.covered() == 4


def test_wait_covered_times_out_naming_what_is_missing():
    table = SlotTable(3)
    admit(table, 1)
    table.note("worker at 10.0.0.9 refused: wrong env")
    checks: list[float] = []
    t0 = time.monotonic()
    with pytest.raises(ConnectTimeoutError) as caught:
        table.wait_covered(0.3, URL, check=lambda: checks.append(time.monotonic()))
    assert 0.25 <= time.monotonic() - t0 < 5
    assert str(caught.value) == (
        f"only 1 of 3 envs have a worker after 0.3 s: 2 missing; workers connect to {URL} "
        "(last event: worker at 10.0.0.9 refused: wrong env)"
    )
    assert len(checks) >= 2  # checked while it waits, not only once


def test_wait_covered_raises_what_check_raises():
    table = SlotTable(1)

    def check() -> None:
        raise RuntimeError("a local worker exited")

    with pytest.raises(RuntimeError, match="local worker exited"):
        table.wait_covered(10, URL, check=check)
