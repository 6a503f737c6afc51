"""Call, the batched call a caller waits on, and CallBook, which sends calls and
matches replies: no sockets, no loop."""

from __future__ import annotations

import logging
import threading

import pytest

from ws_gym import codec
from ws_gym import protocol as P
from ws_gym.calls import LOST, Call, CallBook
from ws_gym.connection import WorkerConn, WorkerState
from ws_gym.errors import ProtocolError, RemoteEnvError, StepTimeoutError, WorkerLostError, WsGymError


def released(call: Call) -> bool:
    """Whether the caller's wait would return now (and take the lock, as wait does)."""
    return call.lock.acquire(blocking=False)


def test_the_lock_is_held_until_the_last_answer():
    call = Call(3)
    call.answer(0, "a")
    call.answer(2, "c")
    assert not call.done and not released(call)
    call.answer(1, "b")
    assert call.done and call.error is None
    assert released(call)


def test_results_keep_request_order_whatever_the_answer_order():
    call = Call(4)
    for idx in (3, 1, 0, 2):
        call.answer(idx, f"reply {idx}")
    assert call.results == ["reply 0", "reply 1", "reply 2", "reply 3"]


def test_fail_completes_at_once_and_keeps_the_first_error():
    call = Call(3)
    first, second = RuntimeError("first"), RuntimeError("second")
    call.fail(first)
    assert call.done and released(call)
    call.fail(second)
    assert call.error is first


def test_a_fail_after_answers_is_the_error_the_caller_sees():
    call = Call(3)
    call.answer(0, "a")
    call.answer(1, "b")
    exc = ConnectionError("worker gone")
    call.fail(exc)
    assert call.done and call.error is exc and released(call)


def test_answers_after_done_release_nothing_more():
    call = Call(2)
    call.fail(RuntimeError("lost"))
    assert released(call)
    call.answer(0, "late")
    call.answer(1, "later")
    call.finish()
    assert call.done and isinstance(call.error, RuntimeError)
    assert not released(call)  # still held by the caller: released exactly once


def test_finish_completes_an_empty_call_once():
    call = Call(0)
    call.finish()
    call.finish()
    assert call.done and call.results == [] and released(call)
    assert not released(call)


def test_lost_is_an_answer_in_tolerant_mode():
    call = Call(3)
    call.tolerant = True
    call.answer(0, "a")
    call.answer(1, LOST)
    call.answer(2, "c")
    assert call.error is None and call.results == ["a", LOST, "c"] and released(call)
    assert repr(LOST) == "LOST"


def test_answers_from_two_threads_are_all_counted():
    n = 20_000
    call = Call(n)
    start = threading.Barrier(2)

    def answer(indices: range) -> None:
        start.wait()
        for idx in indices:
            call.answer(idx, idx)

    threads = [threading.Thread(target=answer, args=(range(k, n, 2),)) for k in (0, 1)]
    for t in threads:
        t.start()
    assert call.lock.acquire(timeout=30)  # as the caller's wait does
    for t in threads:
        t.join()
    assert call.done and call.remaining == 0 and call.results == list(range(n))
    assert not released(call)


def test_an_answer_racing_a_fail_releases_the_lock_once():
    errors: list[BaseException] = []
    for _ in range(300):
        call = Call(1)
        go = threading.Barrier(2)

        def run(complete) -> None:
            go.wait()
            try:
                complete()
            except BaseException as exc:  # a second release raises RuntimeError
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(f,))
                   for f in (lambda: call.answer(0, "ok"), lambda: call.fail(RuntimeError("lost")))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert call.done and released(call) and not released(call)
    assert errors == []


# ------------------------------------------------ CallBook, with no socket behind it
#
# Each worker's wire is a stand-in that records frames or fails to send; the
# "loop" runs what is handed to it at once, on the caller's thread. The book's
# on_lost does what the server does with a lost worker: take what it owed and
# settle it.


class Loop:
    """Runs what the book hands to the loop thread at once (it has no thread)."""

    def call_soon_threadsafe(self, fn, *args):
        fn(*args)


class Wire:
    def __init__(self, *, direct: bool = True, fail: bool = False) -> None:
        self.direct, self.fail, self.sent = direct, fail, []

    def send_from_thread(self, frame):
        if self.fail:
            raise ConnectionResetError("the peer reset the connection")
        self.sent.append(frame)

    def send(self, frame):
        if self.fail:
            raise ConnectionResetError("the peer reset the connection")
        self.sent.append(frame)


def worker(cid: int, *, start: int = 0, **wire) -> WorkerConn:
    conn = WorkerConn(cid, f"w{cid}", "127.0.0.1", start, 1)
    conn.state = WorkerState.ACTIVE
    conn.wire = Wire(**wire)
    return conn


def book(*, direct: bool = True, wait_mode: bool = False) -> tuple[CallBook, list]:
    lost: list = []

    def on_lost(conn, why):
        lost.append((conn.name, why))
        taken = calls.lose(conn)
        if taken is not None:
            calls.settle(taken[1], WorkerLostError(f"{conn.origin} {why} during a call"))

    calls = CallBook(Loop(), direct=direct, wait_mode=wait_mode, busy_poll=0.0, on_lost=on_lost)
    return calls, lost


def reply(kind: str, rid: int, body) -> bytes:
    return codec.encode(kind, rid, body)


def rid_of(conn: WorkerConn) -> int:
    (rid,) = conn.pending
    return rid


@pytest.mark.parametrize("direct", [True, False])
def test_a_failed_send_fails_the_call_and_names_the_worker(direct):
    calls, lost = book(direct=direct)
    good, bad = worker(1), worker(2, start=1, fail=True)
    call = calls.submit([(good, P.CALL, {"name": "x"}), (bad, P.CALL, {"name": "x"})])
    with pytest.raises(WorkerLostError, match="worker w2 .*send failed|worker w2 .*reset"):
        calls.wait(call, 1)
    assert bad.pending == {} and lost == []  # raise mode: the caller decides, nothing is cut off
    assert len(good.wire.sent) == 1


@pytest.mark.parametrize("direct", [True, False])
def test_a_failed_send_in_wait_mode_makes_the_worker_lost(direct):
    calls, lost = book(direct=direct, wait_mode=True)
    good, bad = worker(1), worker(2, start=1, fail=True)
    call = calls.submit([(good, P.STEP, {"a": [0]}), (bad, P.STEP, {"a": [1]})], tolerant=True)
    calls.on_reply(good, reply(P.OK, rid_of(good), {"o": 1}))
    assert calls.wait(call, 1) == [{"o": 1}, LOST]
    assert [name for name, _ in lost] == ["w2"] and bad.state is WorkerState.LOST


@pytest.mark.parametrize("wait_mode", [False, True])
def test_a_worker_lost_before_the_loop_sends_is_gone_or_lost(wait_mode):
    calls, _ = book(direct=False, wait_mode=wait_mode)
    gone = worker(1)
    gone.state = WorkerState.LOST
    call = calls.submit([(gone, P.STEP, {"a": [0]})], tolerant=wait_mode)
    if wait_mode:
        assert calls.wait(call, 1) == [LOST]
    else:
        with pytest.raises(WorkerLostError, match="is gone"):
            calls.wait(call, 1)
    assert gone.pending == {} and gone.wire.sent == []


def test_replies_are_matched_by_id_whatever_their_order():
    calls, _ = book()
    a, b = worker(1), worker(2, start=1)
    call = calls.submit([(a, P.CALL, {}), (b, P.CALL, {})])
    calls.on_reply(b, reply(P.OK, rid_of(b), "from b"))
    calls.on_reply(a, reply(P.OK, rid_of(a), "from a"))
    assert calls.wait(call, 1) == ["from a", "from b"]


def test_a_malformed_reply_fails_what_the_worker_owes(caplog):
    calls, _ = book()
    a = worker(1)
    call = calls.submit([(a, P.CALL, {})])
    with caplog.at_level(logging.WARNING, logger="ws_gym"):
        calls.on_reply(a, b"\xff\xff garbage")
    with pytest.raises(ProtocolError, match="malformed reply"):
        calls.wait(call, 1)
    assert a.pending == {} and "sent a malformed frame" in caplog.text


def test_an_unknown_reply_is_ignored_and_logged_once_a_second(caplog):
    calls, _ = book()
    a = worker(1)
    call = calls.submit([(a, P.CALL, {})])
    with caplog.at_level(logging.WARNING, logger="ws_gym"):
        for bogus in (999, 1000, 1001):
            calls.on_reply(a, reply(P.OK, bogus, "late"))
    assert caplog.text.count("answered unknown request") == 1 and a.unknown == 2
    calls.on_reply(a, reply(P.OK, rid_of(a), "ok"))
    assert calls.wait(call, 1) == ["ok"]


def test_an_error_reply_raises_the_remote_error_and_another_kind_is_a_protocol_error():
    calls, _ = book()
    a, b = worker(1), worker(2)
    call = calls.submit([(a, P.CALL, {})])
    calls.on_reply(a, reply(P.ERROR, rid_of(a), {"type": "KeyError", "message": "'x'", "traceback": ""}))
    with pytest.raises(RemoteEnvError, match="KeyError"):
        calls.wait(call, 1)
    call = calls.submit([(b, P.CALL, {})])
    calls.on_reply(b, reply(P.WELCOME, rid_of(b), {}))
    with pytest.raises(ProtocolError, match="answered with kind 'welcome'"):
        calls.wait(call, 1)


def test_a_sink_that_raises_fails_the_call_not_the_worker():
    calls, lost = book()
    a = worker(1)

    def sink(idx, body, compact):
        raise ValueError("does not fit")

    call = calls.submit([(a, P.STEP, {"a": [0]})], sink=sink)
    calls.on_reply(a, reply(P.OK, rid_of(a), {"o": 1}))
    with pytest.raises(ProtocolError, match="cannot be used: ValueError"):
        calls.wait(call, 1)
    assert a.state is WorkerState.ACTIVE and lost == []


def test_a_timeout_names_only_the_workers_that_owe_a_reply():
    calls, lost = book()
    quick, slow = worker(1), worker(2, start=1)
    call = calls.submit([(quick, P.CALL, {}), (slow, P.CALL, {})])
    calls.on_reply(quick, reply(P.OK, rid_of(quick), "done"))
    with pytest.raises(StepTimeoutError, match="from worker w2") as err:
        calls.wait(call, 0.05)
    assert "w1" not in str(err.value)
    assert slow.pending == {} and lost == []  # abandoned: a late reply is then unknown


def test_a_timeout_in_wait_mode_cuts_the_slow_worker_off():
    calls, lost = book(wait_mode=True)
    quick, slow = worker(1), worker(2, start=1)
    call = calls.submit([(quick, P.STEP, {"a": [0]}), (slow, P.STEP, {"a": [1]})], tolerant=True)
    calls.on_reply(quick, reply(P.OK, rid_of(quick), "done"))
    assert calls.wait(call, 0.05) == ["done", LOST]
    assert lost == [("w2", "did not answer within step_timeout")] and slow.state is WorkerState.LOST


def test_losing_a_worker_twice_takes_nothing_the_second_time_and_a_closed_book_refuses():
    calls, _ = book()
    a = worker(1)
    call = calls.submit([(a, P.CALL, {})])
    before, owed = calls.lose(a)
    assert before is WorkerState.ACTIVE and owed == [(call, 0)] and calls.lose(a) is None
    calls.closed = True
    with pytest.raises(WsGymError, match="closed"):
        calls.submit([(a, P.CALL, {})])


def test_wait_refuses_to_run_on_the_loop_thread():
    calls, _ = book()
    calls.loop_thread = threading.get_ident()
    call = Call(1)
    with pytest.raises(AssertionError, match="wait for itself"):
        calls.wait(call, 0.01)
