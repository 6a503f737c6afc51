"""The slot table: which worker connection serves which envs.

Every env index is a slot, held by at most one connection; a connection holds
one contiguous run (``start``, ``count``) from its admission until it is
released, and serves it once ``active``. The table reads only ``start``,
``count`` and ``active`` of a connection and sets its ``state`` once, so it is
tested without sockets.

Threads: the loop thread admits, activates and releases connections; the
caller's thread reads the table (:meth:`SlotTable.serving` on every step,
:meth:`SlotTable.layout`, the waits). Changes are made under ``cond``, which
waiters sleep on; ``version`` is bumped on every change, so that
:meth:`SlotTable.serving` answers from its cache, without the lock, while
nothing changed.
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any, Callable

from .connection import WorkerState
from .errors import ConnectTimeoutError, WorkerLostError


def env_ranges(indices: list[int]) -> str:
    """``[0, 1, 2, 5]`` as ``"0..2, 5"``, for messages."""
    parts = []
    for _, group in itertools.groupby(enumerate(indices), lambda p: p[1] - p[0]):
        g = [i for _, i in group]
        parts.append(str(g[0]) if len(g) == 1 else f"{g[0]}..{g[-1]}")
    return ", ".join(parts)


class SlotTable:
    """The env slots, the connections holding them, and recent events for errors."""

    def __init__(self, num_envs: int) -> None:
        self.num_envs = num_envs
        self.cond = threading.Condition()
        self.slots: list[Any] = [None] * num_envs
        self.conns: set = set()  # every connection holding slots, active or still starting
        self.version = 0  # bumped whenever a slot or a worker's state changes
        self._serving: tuple[int, list] = (-1, [])
        self._events: list[str] = []  # recent refusals and losses, for error messages

    # ------------------------------------------------------------ loop thread

    def free_run(self, prefer: tuple[int, int] | None = None) -> tuple[int, int]:
        """``(start, length)`` of the slots to offer a new worker (under ``cond``):
        ``prefer`` if all of it is free, else the first free run; length 0 if none."""
        if prefer is not None and all(self.slots[i] is None for i in range(*prefer)):
            return prefer[0], prefer[1] - prefer[0]
        start = None
        for i, owner in enumerate(self.slots):
            if owner is None and start is None:
                start = i
            elif owner is not None and start is not None:
                return start, i - start
        return (start, self.num_envs - start) if start is not None else (0, 0)

    def starting(self) -> bool:
        """Whether a worker still starting holds slots (under ``cond``): they may free up."""
        return any(c is not None and not c.active for c in self.slots)

    def take(self, conn: Any) -> None:
        """``conn`` holds its run from now on (under ``cond``)."""
        for i in range(conn.start, conn.start + conn.count):
            self.slots[i] = conn
        self.version += 1
        self.conns.add(conn)

    def activate(self, conn: Any) -> None:
        """``conn`` serves its run from now on; waiters are woken."""
        with self.cond:
            conn.state = WorkerState.ACTIVE
            self.version += 1
            self.cond.notify_all()

    def changed(self) -> None:
        """A connection's state changed (e.g. it went inactive): :meth:`serving` looks again."""
        self.version += 1

    def release(self, conn: Any) -> None:
        """``conn``'s slots are free again; waiters are woken."""
        with self.cond:
            for i in range(conn.start, conn.start + conn.count):
                if self.slots[i] is conn:
                    self.slots[i] = None
            self.version += 1
            self.conns.discard(conn)
            self.cond.notify_all()

    def note(self, text: str) -> None:
        """Keep a refusal or a loss for the next error message (the last five)."""
        with self.cond:
            self._events.append(text)
            del self._events[:-5]

    def last_event(self) -> str:
        return self._events[-1] if self._events else "none connected yet"

    # ---------------------------------------------------------- caller thread

    def serving(self) -> list[Any]:
        """The active workers, in env order, if they cover every env; else raise."""
        cached = self._serving
        if cached[0] == self.version:  # per step: no scan of the slots unless they changed
            return cached[1]
        with self.cond:
            version = self.version
            missing = [i for i, c in enumerate(self.slots) if c is None or not c.active]
            if missing:
                raise WorkerLostError(
                    f"envs {env_ranges(missing)} have no worker ({self.last_event()}); "
                    "call reset() to wait for a replacement"
                )
            workers = self._ordered()
            self._serving = (version, workers)
            return workers

    def layout(self) -> list[tuple[int, int, Any]]:
        """``(start, stop, worker)`` runs covering every env in order; ``None``
        where no active worker serves the envs (wait mode)."""
        out: list[tuple[int, int, Any]] = []
        with self.cond:
            for i, c in enumerate(self.slots):
                owner = c if c is not None and c.active else None
                if out and out[-1][2] is owner:
                    out[-1] = (out[-1][0], i + 1, owner)
                else:
                    out.append((i, i + 1, owner))
        return out

    def _ordered(self) -> list[Any]:
        out: list[Any] = []
        for c in self.slots:
            if not out or out[-1] is not c:
                out.append(c)
        return out

    def ordered_all(self) -> list[Any]:
        """Every connection holding slots, active or not, in env order."""
        return sorted(self.conns, key=lambda c: c.start)

    def covered(self) -> int:
        with self.cond:
            return sum(1 for c in self.slots if c is not None and c.active)

    def wait_covered(
        self,
        timeout: float,
        url: str,
        *,
        progress: Callable[[int], None] | None = None,
        check: Callable[[], None] | None = None,
        interval: float = 5.0,
    ) -> None:
        """Block until active workers cover every env, or raise ConnectTimeoutError
        (naming ``url``, where workers connect)."""
        deadline = time.monotonic() + timeout
        next_report = time.monotonic()
        with self.cond:
            while True:
                have = sum(1 for c in self.slots if c is not None and c.active)
                if have == self.num_envs:
                    return
                now = time.monotonic()
                if progress is not None and now >= next_report:
                    progress(have)
                    next_report = now + interval
                if check is not None:
                    check()
                if now >= deadline:
                    raise ConnectTimeoutError(
                        f"only {have} of {self.num_envs} envs have a worker after {timeout:g} s: "
                        f"{self.num_envs - have} missing; workers connect to {url} "
                        f"(last event: {self.last_event()})"
                    )
                self.cond.wait(min(deadline - now, max(next_report - now, 0.05), 0.5))
