"""The batched call a caller waits on: one request to each of several workers.

Threads and locks:

* The caller's thread makes a :class:`Call` (:meth:`CallBook.submit`), which
  holds its ``lock`` from the start, and waits by acquiring ``lock`` again
  (:meth:`CallBook.wait`); it never holds another lock while it waits.
* ``answer``, ``fail`` and ``finish`` are called on the loop thread (replies
  parsed in the transport's ``data_received``, a lost worker, a failed send,
  ``step_timeout`` in wait mode) and, with busy polling, on the caller's
  thread too, when it reads its replies itself. Whichever thread completes
  the call releases ``lock``: exactly once, however many answers or errors
  come after.
* ``_COUNT`` guards the counting (``results``, ``remaining``, ``error``,
  ``done``) of every call. It is one lock for all calls, so a call costs no
  second lock per step, and it is held for a few instructions only: no
  callback, no send and no other lock is taken under it.
* ``sink`` is called outside ``_COUNT``, on the thread that read the reply.
* ``CallBook.plock`` guards ``conn.state`` and ``conn.pending`` between the
  caller's thread, which registers a call's requests before it sends them,
  and the loop thread, which takes what a lost worker still owes
  (:meth:`CallBook.lose`): no request is registered on a connection already
  lost. Replies are popped from ``conn.pending`` without it: a request id is
  popped once, by the thread that read its reply (the loop, or the caller
  while it polls, under the connection's read lock). ``plock`` is released
  before owed calls are answered or failed, so ``plock`` and ``_COUNT`` are
  never held together.
* Methods marked "loop thread" assert that they run there; :meth:`CallBook.wait`
  asserts that it does not (it would wait for itself).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from types import MappingProxyType
from typing import Any, Callable, Collection, Mapping

from . import protocol as P
from .errors import ProtocolError, StepTimeoutError, WorkerLostError, WsGymError
from .polling import SpinPolicy, poll_replies

from .connection import WorkerConn, WorkerState

log = logging.getLogger("ws_gym")


class _Lost:
    """The reply of a worker lost during a call (``on_worker_lost="wait"``)."""

    def __repr__(self) -> str:
        return "LOST"


LOST = _Lost()

# The reply of a worker whose compact step reply went straight into a sink's
# arrays (see CallBook.submit): nothing is left of it but its (empty) info log.
FILLED: Mapping[str, Any] = MappingProxyType({"f": ()})


class Call:
    """One batched call across several workers; the caller blocks on ``lock``.

    Replies may be handled on the loop thread and, with busy polling, on the
    caller's thread too: the counting is done under one small lock.
    """

    __slots__ = ("lock", "results", "remaining", "error", "done", "batch", "tolerant", "sink", "sent", "notify")

    def __init__(self, n: int) -> None:
        self.lock = threading.Lock()
        self.lock.acquire()
        self.results: list[Any] = [None] * n
        self.remaining = n
        self.error: BaseException | None = None
        self.done = False
        self.batch: list = []
        self.tolerant = False  # on_worker_lost="wait": a lost worker's part becomes LOST
        # sink(idx, body, compact): takes each ok body on the thread that read it (see submit)
        self.sink: Callable[[int, Any, bool], None] | None = None
        self.sent = time.perf_counter()  # made just before its requests go out (round trips, ws_gym.stats)
        self.notify: Arrivals | None = None  # gets the call once it is complete (waits on several calls)

    def answer(self, idx: int, value: Any) -> None:
        """Request ``idx`` is answered (a reply body, or :data:`LOST`)."""
        with _COUNT:
            self.results[idx] = value
            self.remaining -= 1
            if self.remaining or self.done:
                return
            self.done = True
        self.lock.release()
        if self.notify is not None:
            self.notify.put(self)

    def finish(self) -> None:
        with _COUNT:
            if self.done:
                return
            self.done = True
        self.lock.release()
        if self.notify is not None:
            self.notify.put(self)

    def fail(self, exc: BaseException) -> None:
        with _COUNT:
            if self.error is None:
                self.error = exc
        self.finish()


_COUNT = threading.Lock()  # guards Call's counting; held for a few instructions only


class Arrivals:
    """Calls that completed, in that order, for a caller waiting on several
    (``submit(..., notify=arrivals)``); ``put`` comes from whichever thread
    completed the call, after its lock is released."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._done: list[Call] = []
        self._forgotten: set[Call] = set()  # collected without take(): their put() is dropped

    def put(self, call: Call) -> None:
        with self._cond:
            if call in self._forgotten:
                self._forgotten.discard(call)
                return
            self._done.append(call)
            self._cond.notify()

    def take(self, timeout: float | None) -> Call | None:
        """The earliest completed call not taken yet; None after ``timeout`` (0: at once)."""
        with self._cond:
            if not self._done and timeout != 0:
                self._cond.wait(timeout)
            return self._done.pop(0) if self._done else None

    def forget(self, call: Call) -> None:
        """``call`` was collected with :meth:`CallBook.wait` directly: drop its entry, now or when it comes."""
        with self._cond:
            if call in self._done:
                self._done.remove(call)
            else:
                self._forgotten.add(call)


class _AnyOf:
    """Several calls polled as one (:func:`ws_gym.polling.poll_replies`): done once any is."""

    def __init__(self, calls: Collection[Call]) -> None:
        self.calls = calls
        self.batch = [b for c in calls for b in c.batch]

    @property
    def done(self) -> bool:
        return any(c.done for c in self.calls)


class CallBook:
    """The requests in flight on every worker connection, and their replies.

    Sends a call's requests (from the caller's thread where the socket takes
    them at once, else through the loop), matches each reply to its request by
    id as it is parsed, and completes or fails the call. It never ends a
    connection itself: where a worker must be given up (a failed send in wait
    mode, ``step_timeout`` in wait mode) it says so through ``on_lost``.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, *, direct: bool, wait_mode: bool,
                 busy_poll: float, on_lost: Callable[[WorkerConn, str], None]) -> None:
        self.loop = loop
        self.loop_thread: int | None = None  # set by the server once its loop runs
        self.direct = direct  # the caller's thread writes requests itself (see wire.py)
        self.wait_mode = wait_mode
        self.busy_poll = busy_poll  # the longest a waiting caller spins on its replies (0: the loop reads)
        self.spin_policy = SpinPolicy(busy_poll)  # how long it spins, as measured (see polling.py)
        self.on_lost = on_lost  # (conn, why): give a worker up; it calls lose() for us
        self.plock = threading.Lock()  # conn.state and conn.pending, between caller and loop
        self.closed = False
        self._submit_lock = threading.Lock()
        self._req_ids = itertools.count(1)

    def _on_loop(self) -> bool:
        return self.loop_thread is None or threading.get_ident() == self.loop_thread

    # ---------------------------------------------------------- caller thread

    def request(self, items: list[tuple[WorkerConn, str, Any]], timeout: float | None) -> list[Any]:
        """Send one request to each (worker, kind, body) and wait for every reply.

        Encoding is strict: an argument with no wire form raises
        ``codec.EncodeError`` (a TypeError) here rather than reach the env as a repr.
        """
        return self.wait(self.submit(items), timeout)

    def submit(self, items: list[tuple[WorkerConn, str, Any]], tolerant: bool = False,
               sink: Callable[[int, Any, bool], None] | None = None, notify: "Arrivals | None" = None) -> Call:
        """Encode and send the requests without waiting; :meth:`wait` collects the replies.

        ``tolerant`` (wait mode only): a worker lost meanwhile gives :data:`LOST`
        as its reply instead of failing the call. ``sink(idx, body, compact)`` is
        given each ``ok`` body as soon as it is read, on the thread that read it;
        ``compact``: the body is the worker's compact reply frame, checked
        already, to copy with ``conn.codec.copy_reply`` (its reply is then
        :data:`FILLED`). An error the sink raises fails the call (as a
        ProtocolError), not the connection. ``notify``: an :class:`Arrivals`
        that is given the call once it is complete, for a caller waiting on
        several calls (``recv``); it then collects it with :meth:`wait`.
        """
        if self.closed:
            raise WsGymError("the trainer is closed")
        with self._submit_lock:
            batch = []
            for conn, kind, body in items:
                rid = next(self._req_ids)
                batch.append((conn, rid, conn.codec.encode(kind, rid, body)))
                if kind == P.STEP:  # statistics (ws_gym.stats): no lock, one writer
                    conn.step_requests += 1
            call = Call(len(batch))
            call.batch = batch
            call.tolerant = tolerant and self.wait_mode
            call.sink = sink
            call.notify = notify
            if not batch:
                call.finish()
            elif self.direct:
                rest = self._send_direct(call, batch)
                if rest:
                    self.loop.call_soon_threadsafe(self._dispatch, call, rest)
            else:
                self.loop.call_soon_threadsafe(self._dispatch, call, [(i, *b) for i, b in enumerate(batch)])
            return call

    def wait(self, call: Call, timeout: float | None) -> list[Any]:
        """The replies to a submitted call, in request order; raise its error or a timeout."""
        assert threading.get_ident() != self.loop_thread, "wait() on the loop thread would wait for itself"
        left = timeout
        if self.busy_poll and not call.done:  # returns at once when no polled worker owes the call
            left = poll_replies(call, timeout, self.spin_policy)
        if not call.lock.acquire(timeout=-1 if left is None else left):
            if call.tolerant:  # wait mode: the slow workers are lost, the call completes
                self.loop.call_soon_threadsafe(self._cut_off, call)
                if call.lock.acquire(timeout=10):
                    if call.error is not None:
                        raise call.error
                    return call.results
            batch = call.batch
            slow = [c.origin for c, rid, _ in batch if rid in c.pending] or [c.origin for c, _, _ in batch]
            self.loop.call_soon_threadsafe(self._abandon, call)
            raise StepTimeoutError(f"no complete answer within {timeout:g} s from {', '.join(slow)}")
        if call.error is not None:
            raise call.error
        return call.results

    def first_done(self, calls: Collection[Call], arrivals: "Arrivals", timeout: float | None) -> Call | None:
        """The first of ``calls`` (each submitted with ``notify=arrivals``) to
        be complete, or None after ``timeout``; collect it with :meth:`wait`.
        Reads polled connections itself meanwhile, as :meth:`wait` does."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            call = arrivals.take(0.0)
            if call is None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                if self.busy_poll:  # returns once one is done, or no polled worker owes them
                    left = poll_replies(_AnyOf(calls), left, self.spin_policy)
                call = arrivals.take(left)
                if call is None:
                    return None
            if call in calls:  # else one collected otherwise since (see Arrivals.forget)
                return call

    def _send_direct(self, call: Call, batch: list) -> list:
        """Write the requests to workers whose socket takes them at once;
        returns ``(index, conn, id, frame)`` of the others, for :meth:`_dispatch`
        on the loop thread. A failed write is handed to :meth:`_send_failed` there.
        """
        rest, ready = [], []
        lost = WorkerState.LOST
        with self.plock:  # all registered before the first is sent: replies may come at once
            for idx, (conn, rid, frame) in enumerate(batch):
                wire = conn.wire
                if wire is None or not wire.direct or conn.state is lost:  # _dispatch says LOST or fails
                    rest.append((idx, conn, rid, frame))
                    continue
                conn.pending[rid] = (call, idx)
                ready.append((idx, conn, rid, frame, wire))
        for idx, conn, rid, frame, wire in ready:
            try:
                wire.send_from_thread(frame)
            except ConnectionError as exc:
                self.loop.call_soon_threadsafe(self._send_failed, call, idx, conn, rid, str(exc))
        return rest

    # ------------------------------------------------------------ loop thread

    def _send_failed(self, call: Call, idx: int, conn: WorkerConn, rid: int, why: str) -> None:
        assert self._on_loop()
        if conn.pending.pop(rid, None) is None:  # answered already: the worker was lost
            return
        if call.tolerant:  # wait mode: the worker is lost, its part becomes LOST
            call.answer(idx, LOST)
            self.on_lost(conn, why)
        else:
            call.fail(WorkerLostError(f"{conn.origin}: {why}"))

    def _dispatch(self, call: Call, items: list) -> None:
        """Register the requests and write their frames."""
        assert self._on_loop()
        for idx, conn, rid, _ in items:
            if not conn.alive:
                if call.tolerant:  # wait mode: lost after the caller's layout(), before this
                    call.answer(idx, LOST)
                    continue
                call.fail(WorkerLostError(f"{conn.origin} is gone"))
                return
            conn.pending[rid] = (call, idx)
        if call.done:  # every worker was lost already
            return
        for _, conn, rid, frame in items:
            if rid not in conn.pending:  # lost meanwhile (wait mode: its part is LOST already)
                continue
            try:
                conn.wire.send(frame)
            except (ConnectionError, RuntimeError) as exc:
                if call.tolerant:  # wait mode: the worker is lost, its part becomes LOST
                    self.on_lost(conn, f"send failed: {exc}")
                    continue
                conn.pending.pop(rid, None)
                call.fail(WorkerLostError(f"{conn.origin}: send failed: {exc}"))
                return

    def _cut_off(self, call: Call) -> None:
        """Wait mode, after step_timeout: workers that still owe a reply are lost."""
        assert self._on_loop()
        for conn, rid, _ in call.batch:
            if rid in conn.pending:
                self.on_lost(conn, "did not answer within step_timeout")
        if not call.done:  # e.g. a reply raced the timeout: nothing owed any more
            call.finish()

    def _abandon(self, call: Call) -> None:
        assert self._on_loop()
        for conn, rid, _ in call.batch:
            conn.pending.pop(rid, None)

    def lose(self, conn: WorkerConn) -> tuple[Any, list] | None:
        """Mark ``conn`` lost: ``(its state before, what it owed)``, or None if it
        was lost already. No request is registered on it after this; the caller
        (the server) frees its slots, then settles the owed calls with :meth:`settle`."""
        assert self._on_loop()
        with self.plock:
            before = conn.state
            if before is WorkerState.LOST:
                return None
            conn.state = WorkerState.LOST
            owed = list(conn.pending.values())
            conn.pending.clear()
        return before, owed

    @staticmethod
    def settle(owed: list, exc: BaseException) -> None:
        """A lost worker's owed calls: LOST for a tolerant one, else ``exc``."""
        for call, idx in owed:
            if call.tolerant:
                call.answer(idx, LOST)
            else:
                call.fail(exc)

    # --------------------------------------- the thread that read the reply

    def on_reply(self, conn: WorkerConn, data: Any) -> None:
        """One binary message from a worker: match it to its request (inside the
        transport's ``data_received``, or the polling caller's read)."""
        pending = conn.pending
        try:
            rid, kind, body, compact = conn.codec.decode(data)
        except ProtocolError as exc:
            # Which request it answers is unknown: fail what this worker owes now
            # (a clear error at once, not a StepTimeoutError later); replies still
            # on their way for those ids are ignored as unknown.
            err = self._malformed(conn, exc)
            with self.plock:
                owed = list(pending.values())
                pending.clear()
            for call, _ in owed:
                call.fail(err)
            return
        entry = pending.pop(rid, None)
        if entry is None:
            self._log_unknown(conn, rid)
            return
        call, idx = entry
        conn.replies += 1  # statistics (ws_gym.stats): the thread that read the reply, no lock
        conn.rtt_total += time.perf_counter() - call.sent
        if kind == P.OK:
            try:
                if call.sink is not None:
                    call.sink(idx, body, compact)
                    if compact:  # all of it is in the sink's arrays now; a compact reply has no infos
                        body = FILLED
                elif compact:  # checked by decode above (compressed observations: as they decompress)
                    body = conn.codec.reply_body(body)
            except Exception as exc:  # noqa: BLE001 - fails this call, never the connection
                call.fail(self._unusable(conn, exc, compact))
                return
            call.answer(idx, body)
        elif kind == P.ERROR:
            remote = P.parse_error(body, conn.origin)
            conn.last_error = f"{remote.remote_type}: {remote.remote_message}"[:500]
            call.fail(remote)
        else:
            call.fail(ProtocolError(f"{conn.origin} answered with kind {kind!r}"))

    @staticmethod
    def _unusable(conn: WorkerConn, exc: Exception, compact: bool) -> ProtocolError:
        """The error for a reply that could not be read into its result."""
        if not isinstance(exc, ProtocolError):
            return ProtocolError(f"{conn.origin}: a reply that cannot be used: {exc!r}")
        if compact:  # its compressed observations are bad
            return CallBook._malformed(conn, exc)
        return exc

    @staticmethod
    def _malformed(conn: WorkerConn, exc: ProtocolError) -> ProtocolError:
        """Log a malformed frame from a worker; the error for the calls it fails."""
        log.warning("%s sent a malformed frame: %s", conn.origin, exc)
        return ProtocolError(f"{conn.origin} sent a malformed reply: {exc}")

    @staticmethod
    def _log_unknown(conn: WorkerConn, rid: int) -> None:
        """A reply to a request that is not pending (late after a timeout, or a
        bad peer's): at most one line a second per worker, so a flood of them
        cannot flood the log."""
        conn.unknown += 1
        now = time.monotonic()
        if now - conn.unknown_logged_at >= 1.0:
            more = f" (and {conn.unknown - 1} more since the last such line)" if conn.unknown > 1 else ""
            log.warning("%s answered unknown request %d; ignored%s", conn.origin, rid, more)
            conn.unknown = 0
            conn.unknown_logged_at = now
