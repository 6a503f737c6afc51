"""Call, the batched call a caller waits on: no sockets, no loop."""

from __future__ import annotations

import threading

from ws_gym.calls import LOST, Call


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
