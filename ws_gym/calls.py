"""The batched call a caller waits on: one request to each of several workers.

Threads and locks:

* The caller's thread makes a :class:`Call` (``WorkerPool.submit``), which
  holds its ``lock`` from the start, and waits by acquiring ``lock`` again
  (``WorkerPool.wait``); it never holds another lock while it waits.
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
* ``WorkerPool._plock`` (in :mod:`ws_gym.pool`) guards ``conn.alive`` and
  ``conn.pending`` between the caller's thread, which registers a call's
  requests before it sends them, and the loop thread, which drops a worker and
  takes what it still owes: no request is registered on a connection already
  dropped. It is released before the owed calls are answered or failed, so
  ``_plock`` and ``_COUNT`` are never held together.
"""

from __future__ import annotations

import threading
from types import MappingProxyType
from typing import Any, Callable, Mapping


class _Lost:
    """The reply of a worker lost during a call (``on_worker_lost="wait"``)."""

    def __repr__(self) -> str:
        return "LOST"


LOST = _Lost()

# The reply of a worker whose compact step reply went straight into a sink's
# arrays (see WorkerPool.submit): nothing is left of it but its (empty) info log.
FILLED: Mapping[str, Any] = MappingProxyType({"f": ()})


class Call:
    """One batched call across several workers; the caller blocks on ``lock``.

    Replies may be handled on the loop thread and, with busy polling, on the
    caller's thread too: the counting is done under one small lock.
    """

    __slots__ = ("lock", "results", "remaining", "error", "done", "batch", "tolerant", "sink")

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

    def answer(self, idx: int, value: Any) -> None:
        """Request ``idx`` is answered (a reply body, or :data:`LOST`)."""
        with _COUNT:
            self.results[idx] = value
            self.remaining -= 1
            if self.remaining or self.done:
                return
            self.done = True
        self.lock.release()

    def finish(self) -> None:
        with _COUNT:
            if self.done:
                return
            self.done = True
        self.lock.release()

    def fail(self, exc: BaseException) -> None:
        with _COUNT:
            if self.error is None:
                self.error = exc
        self.finish()


_COUNT = threading.Lock()  # guards Call's counting; held for a few instructions only
