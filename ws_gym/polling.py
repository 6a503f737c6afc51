"""Busy polling: a thread reads its replies itself instead of sleeping until they come.

Where it pays (see :mod:`ws_gym.config`), the loop stops reading a worker's
connection (:meth:`ws_gym.wire.FrameConnection.claim_reading`) and whoever
waits for it reads the socket: the caller's thread during a call
(:func:`poll_replies`), the loop now and then in between (:func:`poll_idle`).
A local worker reads on for a moment after each reply
(:meth:`ws_gym.wire.FrameConnection._poll_on`). A round trip then wakes no
thread that has gone to sleep.

Spinning only pays while a core is spare. On a busy machine (a learner
training beside the envs, other processes) the spinning thread takes the CPU
the other side needs to answer, and a round trip can get several times
slower than sleeping. So how long to spin is not fixed: a :class:`SpinPolicy`
(one per caller, one per worker connection) decides it from what it measures,
without any I/O of its own (see its docstring for the rule).
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any, Callable, Iterable

from .wire import wait_readable

# A spin iteration that read nothing yet took this long was not running: the
# thread was preempted (or waited for the GIL). A normal one takes a few us.
PREEMPTED = 0.0002


class SpinPolicy:
    """How long to spin before sleeping, learnt from measurement (sans I/O).

    The owner reads :attr:`spin` (seconds; 0: sleep at once) before each wait
    and, once the awaited message came, reports the cycle with :meth:`record`:
    its time (for a caller, from the end of its previous call to the end of
    this one; for a worker, from one message handled to the next: the whole
    period, since a spinning thread also slows what it does between waits,
    once the scheduler holds its CPU time against it), whether the spin caught
    the message, and whether the spinning thread was preempted during it (an
    iteration that read nothing yet took longer than :data:`PREEMPTED`).

    The rule: the policy runs one "arm" (spin for ``limit``, or spin 0; at
    first ``limit``: on an idle machine it pays at once, and on a busy one the
    first block's spins are missed or preempted, which ends them) and
    measures it in blocks of at least :attr:`BLOCK` cycles and
    :attr:`BLOCK_TIME` seconds. Now and then it runs one block of the other
    arm (a probe) and compares the probe's mean cycle with the block's just
    before it, so load that drifts hits both
    alike. Means, as throughput goes with the mean, and spinning on a busy
    machine costs rare stalls of a whole time slice more than it changes the
    typical cycle; each block's slowest cycle is left out, so one pause of the
    caller decides nothing. Off wins ties (it costs no CPU); spinning must be
    faster by :attr:`ON_MARGIN`.

    A block of spinning also loses at once (after :attr:`BLOCK` cycles, whatever
    its times) when most spins missed (``>= 3/4``: spinning bought
    nothing and took CPU from the learner) or were preempted (``>= 1/2``:
    this thread is being starved, so its spinning steals the CPU the other
    side needs). A spinning probe stops as soon as it is plainly losing (50%
    slower than the baseline so far, give or take two cycles), so a probe
    under load costs a few cycles.

    After a probe that confirms the arm, the time to the next probe doubles
    (from :attr:`MIN_PERIOD` to :attr:`MAX_PERIOD`, with some jitter so that
    the policies of a caller and its workers do not probe in step); after a
    switch it starts again from :attr:`MIN_PERIOD`. So it spins again within
    about ``MAX_PERIOD`` once the load goes away, and under a lasting load
    spends about one short probe every ``MAX_PERIOD`` on finding that out.

    ``record`` costs about 100 ns (a few additions and comparisons).
    """

    BLOCK = 32  # cycles per measurement, at least ...
    BLOCK_TIME = 0.02  # ... and seconds: a few of the scheduler's time slices, whose luck evens out
    PREEMPTED = PREEMPTED
    ON_MARGIN = 0.9  # a spinning probe wins if its mean is below this times the baseline's
    MIN_PERIOD = 0.05  # seconds between probes after a switch
    MAX_PERIOD = 2.0  # ... and at most, once the arm has been confirmed a few times
    __slots__ = ("limit", "spin", "_n", "_sum", "_max", "_missed", "_preempted", "_probing", "_base",
                 "_period", "_probe_at", "_clock", "switches", "probes", "mark")

    def __init__(self, limit: float, clock: Callable[[], float] = time.perf_counter) -> None:
        self.limit = max(0.0, float(limit))  # the longest spin (seconds)
        self.spin = self.limit  # the spin for the next wait: limit or 0.0 (on until measured otherwise)
        self._clock = clock
        self._n = 0  # this block's cycles: how many, their sum, the slowest
        self._sum = 0.0
        self._max = 0.0
        self._missed = 0  # spins of this block that did not catch the message
        self._preempted = 0  # spins of this block during which the thread lost the CPU
        self._probing = False  # this block is a probe of the other arm
        self._base = 0.0  # the mean cycle of the last block of the running arm
        self._period = self.MIN_PERIOD
        self._probe_at = 0.0  # the first block (spinning) is followed by a probe of not spinning at once
        self.mark = 0.0  # the owner's: when the last cycle ended (0: none yet)
        self.switches = 0  # statistics, for tests and benchmarks
        self.probes = 0

    @property
    def spinning(self) -> bool:
        """Whether the arm it runs spins (not counting a probe of the other one)."""
        return (self.spin > 0.0) is not self._probing

    def record(self, cycle: float, caught: bool = True, preempted: bool = False) -> None:
        """One wait's outcome (``caught`` and ``preempted`` count only while spinning)."""
        if not self.limit:
            return
        n = self._n = self._n + 1
        total = self._sum = self._sum + cycle
        if cycle > self._max:
            self._max = cycle
        if self.spin:
            if not caught:
                self._missed += 1
            if preempted:
                self._preempted += 1
            # stop a probe that is plainly losing: 50% slower than the baseline, give or take two cycles
            if self._probing and total > (1.5 * n + 2.0) * self._base:
                self._end_probe(False)
                return
        if n >= self.BLOCK and (total >= self.BLOCK_TIME or self.spin and self._lost(n)):
            self._end_block()

    def _lost(self, n: int) -> bool:
        """Spinning lost, whatever the times: most spins missed, or were preempted."""
        return 4 * self._missed >= 3 * n or 2 * self._preempted >= n

    def _end_block(self) -> None:
        n = self._n
        mean = (self._sum - self._max) / (n - 1)  # without the slowest: a rare pause of the caller's
        spun = self.spin > 0.0
        lost = spun and self._lost(n)
        self._clear()
        if self._probing:
            if spun:
                self._end_probe(not lost and mean < self._base * self.ON_MARGIN)
            else:
                self._end_probe(mean <= self._base)
            return
        if lost:  # spinning does not pay here: stop now, and probe it again soon
            self._switch(0.0)
            return
        self._base = mean
        if self._clock() >= self._probe_at:  # try the other arm for one block
            self._probing = True
            self.probes += 1
            self.spin = 0.0 if spun else self.limit

    def _end_probe(self, won: bool) -> None:
        self._clear()
        self._probing = False
        if won:  # the probe's arm runs from now on
            self._switch(self.spin)
        else:  # back to the arm that ran; probe less often
            self.spin = 0.0 if self.spin else self.limit
            self._period = min(2 * self._period, self.MAX_PERIOD)
            self._schedule()

    def _switch(self, spin: float) -> None:
        self.spin = spin
        self.switches += 1
        self._period = self.MIN_PERIOD
        self._schedule()

    def _schedule(self) -> None:
        self._probe_at = self._clock() + self._period * (0.75 + 0.5 * random.random())

    def _clear(self) -> None:
        self._n = self._missed = self._preempted = 0
        self._sum = self._max = 0.0

    def __repr__(self) -> str:
        return (f"SpinPolicy(limit={self.limit:g}, spin={self.spin:g}, probing={self._probing}, "
                f"switches={self.switches}, probes={self.probes})")


def poll_replies(call: Any, timeout: float | None, policy: SpinPolicy) -> float | None:
    """Read the call's replies on this thread, spinning for as long as
    ``policy`` says, then sleeping in ``poll`` until one comes; tell the policy
    how it went.

    Returns what is left of ``timeout``. Stops once no polled connection
    owes the call anything (the loop completes or fails the rest).
    """
    clock = time.perf_counter
    last = now = clock()
    deadline = None if timeout is None else now + timeout
    spin_end = now + policy.spin
    slept = preempted = polled = False
    batch = call.batch
    while not call.done:
        owing = [c.wire for c, rid, _ in batch
                 if rid in c.pending and c.wire is not None and c.wire.polled and not c.wire.ended]
        if not owing:
            break
        polled = True
        got = False
        for wire in owing:
            if wire.rlock.acquire(blocking=False):  # else the loop is reading it just now
                try:
                    if wire.poll_read():
                        got = True
                finally:
                    wire.rlock.release()
        if call.done:
            break
        now = clock()
        if deadline is not None and now >= deadline:
            break
        if now >= spin_end:  # a slow reply: sleep until a socket has something
            slept = True
            wait_readable(owing, 0.05 if deadline is None else min(0.05, deadline - now))
        elif not got and now - last > PREEMPTED:
            preempted = True
        last = now
    if polled and call.done:  # the cycle: from the previous call's end to this one's
        end = clock()
        cycle, policy.mark = end - policy.mark, end
        if cycle < 1.0:  # else the first call, or the caller did something else for a while
            policy.record(cycle, not slept, preempted)
    else:
        policy.mark = 0.0
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
