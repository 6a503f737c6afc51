"""The worker's status line: now and then, what it serves, for whom and how fast.

While a session is served, :class:`StatusReport` logs one INFO line on the
worker's logger every ``--status-interval`` seconds (the CLI's default 30;
``--quiet`` or 0: none), so that the person at the PC sees the worker at work::

    serving 4 envs of CartPole-v1 for ws://trainer:8765/ws as worker pc:4242 (envs 0..3): 1,234
    env-steps/s over the last 30 s, 52,345 env-steps in all, RTT 0.41 ms

(one line; "worker pc:4242 (envs 0..3)" is how the trainer's log names this
worker), and one more when the session ends::

    served 4 envs of CartPole-v1 for ws://trainer:8765/ws as worker pc:4242 (envs 0..3):
    52,348 env-steps in all (13,087 step requests x 4 envs) in 61.2 s

Env-steps are the step requests answered (a link counts them: one integer
increment per request) times the envs this worker serves, which each step
request steps. The round trip time is measured once per line, just before it:
the worker sends a WebSocket ping of its own and times the pong, which the
trainer's frame layer sends at once (never a step's work). No pong within a
moment: ``RTT n/a``, as before the first one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, Callable, Protocol

if TYPE_CHECKING:
    from .client import Worker
    from .protocol import Welcome

log = logging.getLogger("ws_gym.worker")

RTT_WAIT = 5.0  # seconds a status line waits for its pong, at most (never more than the interval)


class StatusLink(Protocol):
    """What a session link offers the status line (:mod:`ws_gym.worker_links`)."""

    steps: int  # step requests answered
    on_pong: Callable[[bytes], None] | None  # called with each pong's payload

    async def ping(self, payload: bytes) -> None: ...


class StatusReport:
    """The status lines of one session: a task on the worker's loop from
    ``with`` to its end (cancelled there), then the session's last line."""

    def __init__(self, worker: Worker, link: StatusLink, welcome: Welcome) -> None:
        self.link = link
        self.interval = worker.status_interval
        self.envs = welcome.num_envs
        last = welcome.first_index + welcome.num_envs - 1
        self.what = (f"{welcome.num_envs} env{'s' if welcome.num_envs != 1 else ''} of {welcome.env_id} for "
                     f"{worker._shown_url} as worker {worker.name} (envs {welcome.first_index}..{last})")
        self._task: asyncio.Future | None = None
        self._started = 0.0  # loop time the session's first line counts from
        self._pings = 0
        self._waiting: tuple[bytes, asyncio.Future] | None = None  # the ping whose pong is awaited

    @property
    def on(self) -> bool:
        """Lines are wanted and would be shown (a worker logging warnings only
        gets no task, no pings)."""
        return self.interval > 0 and log.isEnabledFor(logging.INFO)

    def __enter__(self) -> StatusReport:
        if self.on:
            self._started = asyncio.get_running_loop().time()
            self._task = asyncio.ensure_future(self._run())
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self._task is None:
            return
        self._task.cancel()
        self._task = None
        self.link.on_pong = None
        steps = self.link.steps
        log.info("served %s: %s env-steps in all (%s step requests x %d env%s) in %.1f s", self.what,
                 f"{steps * self.envs:,}", f"{steps:,}", self.envs, "s" if self.envs != 1 else "",
                 asyncio.get_running_loop().time() - self._started)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        since, before = loop.time(), self.link.steps
        while True:
            await asyncio.sleep(self.interval)
            rtt = await self.rtt(min(self.interval, RTT_WAIT))
            now, steps = loop.time(), self.link.steps
            rate = (steps - before) * self.envs / max(now - since, 1e-9)
            log.info("serving %s: %s env-steps/s over the last %s s, %s env-steps in all, RTT %s",
                     self.what, f"{rate:,.0f}" if rate >= 10 else f"{rate:.1f}", f"{now - since:.3g}",
                     f"{steps * self.envs:,}", "n/a" if rtt is None else _ms(rtt))
            since, before = now, steps

    async def rtt(self, timeout: float) -> float | None:
        """Seconds from our ping to the trainer's pong (None: no pong within ``timeout``)."""
        self._pings += 1
        payload = b"ws_gym status %d" % self._pings
        answered = asyncio.get_running_loop().create_future()
        self._waiting = (payload, answered)
        self.link.on_pong = self._pong
        sent = time.perf_counter()
        try:
            await self.link.ping(payload)
            return await asyncio.wait_for(answered, timeout) - sent
        except (asyncio.TimeoutError, ConnectionError, RuntimeError):
            return None
        finally:
            self._waiting = None

    def _pong(self, payload: bytes) -> None:
        waiting = self._waiting
        if waiting is not None and payload == waiting[0] and not waiting[1].done():
            waiting[1].set_result(time.perf_counter())


def _ms(seconds: float) -> str:
    ms = seconds * 1000
    return f"{ms:.2f} ms" if ms < 10 else f"{ms:.0f} ms"
