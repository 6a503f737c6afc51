"""Busy polling on the trainer: the caller's thread reads its replies itself.

Where it pays (see :mod:`ws_gym.config`), the loop stops reading a worker's
connection (:meth:`ws_gym.wire.FrameConnection.claim_reading`) and whoever
waits for it reads the socket: the caller's thread during a call
(:func:`poll_replies`), the loop now and then in between (:func:`poll_idle`).
A round trip then wakes no thread that has gone to sleep.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable, Iterable

from .wire import wait_readable


def poll_replies(call: Any, timeout: float | None, spin: float) -> float | None:
    """Read the call's replies on this thread, spinning for up to ``spin``
    seconds, then sleeping in ``poll`` until one comes.

    Returns what is left of ``timeout``. Stops once no polled connection
    owes the call anything (the loop completes or fails the rest).
    """
    clock = time.perf_counter
    now = clock()
    deadline = None if timeout is None else now + timeout
    spin_end = now + spin
    batch = call.batch
    while not call.done:
        owing = [c.wire for c, rid, _ in batch
                 if rid in c.pending and c.wire is not None and c.wire.polled and not c.wire.ended]
        if not owing:
            break
        for wire in owing:
            if wire.rlock.acquire(blocking=False):  # else the loop is reading it just now
                try:
                    wire.poll_read()
                finally:
                    wire.rlock.release()
        if call.done:
            break
        now = clock()
        if deadline is not None and now >= deadline:
            break
        if now >= spin_end:  # a slow reply: sleep until a socket has something
            wait_readable(owing, 0.05 if deadline is None else min(0.05, deadline - now))
    if deadline is None:
        return None
    return max(0.0, deadline - clock())


async def poll_idle(conns: Callable[[], Iterable[Any]], interval: float = 0.02) -> None:
    """On the loop: read the polled connections that no caller is reading, so
    that pongs, late replies, close frames and ends of stream between calls are
    seen within ``interval`` seconds."""
    while True:
        await asyncio.sleep(interval)
        for conn in list(conns()):
            wire = conn.wire
            if (wire is None or not wire.polled or wire.ended or conn.pending  # a waiting caller's
                    or not wire.rlock.acquire(blocking=False)):
                continue
            try:
                end = time.perf_counter() + 0.002  # a peer that never stops sending cannot hold the loop
                while wire.poll_read() and time.perf_counter() < end:
                    pass
            finally:
                wire.rlock.release()
