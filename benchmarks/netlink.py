"""A userspace TCP relay on 127.0.0.1 that emulates a network link: no root needed.

``Link(target_port, delay_ms, rate_mbit=None)`` listens on a free port of
127.0.0.1 (``.port``); each connection accepted there is joined to a new
connection to ``127.0.0.1:target_port``, and the bytes are copied both ways
with

* a one-way ``delay_ms``: each chunk read is written ``delay_ms`` after it was
  read, in order. The delay is a pipeline, not a pause per chunk: chunks read
  meanwhile wait beside it, so the throughput does not depend on the delay;
* an optional ``rate_mbit`` per direction: a chunk of n bytes occupies the link
  for ``n * 8 / rate`` seconds, queued after the previous chunk (serialisation
  time), and is delivered ``delay_ms`` after its last bit left.

The link runs its own asyncio event loop in a background thread (standard
library only): ``start()`` returns once it listens, ``close()`` cuts every
tunnel and ends the thread (waits are bounded). Deliveries are scheduled on
the loop's timer at their deadline; the loop's timer wakes within about 1 ms
(epoll rounds the wait up to whole milliseconds), so each chunk arrives 0-1 ms
late. ``lateness()`` reports how late the deliveries were.

    link = Link(trainer_port, delay_ms=20).start()   # RTT 40 ms through it
    ... dial ws://127.0.0.1:{link.port}/ws ...
    link.close()
"""

from __future__ import annotations

import asyncio
import collections
import threading

CHUNK = 65536  # bytes read at most at once
HOST = "127.0.0.1"


class _Pipe:
    """One direction of a tunnel: read chunks, deliver each at its deadline, in order."""

    def __init__(self, link: Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.link = link
        self.reader = reader
        self.writer = writer
        self.queue: collections.deque[tuple[float, bytes | None]] = collections.deque()
        self.wake = asyncio.Event()
        self.free_at = 0.0  # when the link (rate model) has sent the last queued bit

    async def read(self) -> None:
        loop = asyncio.get_running_loop()
        delay = self.link.delay_ms / 1000.0
        rate = self.link.rate_mbit
        while True:
            try:
                data = await self.reader.read(CHUNK)
            except (ConnectionError, OSError):
                data = b""
            now = loop.time()
            if data and rate:
                start = max(now, self.free_at)
                self.free_at = start + len(data) * 8 / (rate * 1e6)
                deadline = self.free_at + delay
            else:
                deadline = max(now, self.free_at) + delay  # an EOF goes after the data before it
            self.queue.append((deadline, data or None))
            self.wake.set()
            if not data:
                return

    async def write(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.queue:
                self.wake.clear()
                await self.wake.wait()
            deadline, data = self.queue.popleft()
            wait = deadline - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)  # a timer at the deadline (loop.call_at)
            self.link._late(loop.time() - deadline)
            if data is None:  # the other side ended its sending: pass the EOF on
                try:
                    if self.writer.can_write_eof():
                        self.writer.write_eof()
                except (ConnectionError, OSError, RuntimeError):
                    pass
                return
            self.writer.write(data)
            await self.writer.drain()


class Link:
    """A TCP relay from ``127.0.0.1:.port`` to ``127.0.0.1:target_port`` with a
    one-way delay and an optional rate (Mbit/s per direction); see the module."""

    def __init__(self, target_port: int, delay_ms: float, rate_mbit: float | None = None) -> None:
        if delay_ms < 0 or (rate_mbit is not None and rate_mbit <= 0):
            raise ValueError("delay_ms must be >= 0 and rate_mbit > 0 (or None)")
        self.target_port = target_port
        self.delay_ms = float(delay_ms)
        self.rate_mbit = rate_mbit
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stop: asyncio.Event | None = None
        self._tasks: set[asyncio.Task] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._stats_lock = threading.Lock()
        self._late_n = 0
        self._late_sum = 0.0
        self._late_max = 0.0

    # ------------------------------------------------------------------ public

    def start(self, timeout: float = 10.0) -> Link:
        """Start the thread and return once the link listens (``.port`` set)."""
        if self._thread is not None:
            raise RuntimeError("already started")
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"netlink->{self.target_port}")
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("the link did not start listening in time")
        if self._error is not None:
            raise RuntimeError("the link failed to start") from self._error
        return self

    def close(self, timeout: float = 5.0) -> None:
        """Cut every tunnel, stop listening and end the thread (at most ``timeout`` s)."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            loop.call_soon_threadsafe(self._stop.set)  # type: ignore[union-attr]
        except RuntimeError:  # the loop is closed already
            pass
        thread.join(timeout)

    def lateness(self) -> tuple[int, float, float]:
        """(deliveries, mean and max seconds after their deadline) so far."""
        with self._stats_lock:
            mean = self._late_sum / self._late_n if self._late_n else 0.0
            return self._late_n, mean, self._late_max

    def __enter__(self) -> Link:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ the loop thread

    def _late(self, seconds: float) -> None:
        seconds = max(0.0, seconds)
        with self._stats_lock:
            self._late_n += 1
            self._late_sum += seconds
            self._late_max = max(self._late_max, seconds)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        except BaseException as exc:  # noqa: BLE001 - reported by start()
            self._error = exc
        finally:
            self._ready.set()
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._accept, HOST, 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            server.close()
            for writer in list(self._writers):
                writer.transport.abort()  # cut: no orderly close, as a dropped link
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=2.0)
            try:
                await asyncio.wait_for(server.wait_closed(), 1.0)
            except (asyncio.TimeoutError, OSError):
                pass

    def _track(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _accept(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        try:
            await self._tunnel(c_reader, c_writer)
        except asyncio.CancelledError:
            pass  # close(): end quietly (asyncio's streams would log a cancelled callback task)

    async def _tunnel(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self._writers.add(c_writer)
        t_writer = None
        try:
            try:
                t_reader, t_writer = await asyncio.wait_for(asyncio.open_connection(HOST, self.target_port), 5.0)
            except (OSError, asyncio.TimeoutError):
                return  # the target is not there: the client sees its connection closed
            self._writers.add(t_writer)
            up, down = _Pipe(self, c_reader, t_writer), _Pipe(self, t_reader, c_writer)
            tasks = [self._track(coro) for coro in (up.read(), up.write(), down.read(), down.write())]
            writers = tasks[1::2]
            # the tunnel ends when both directions have delivered their EOF, or on any error
            pending = set(tasks)
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if any(t.cancelled() or t.exception() is not None for t in done):
                    break
                if all(t.done() for t in writers):
                    break
            for t in tasks:
                t.cancel()
            await asyncio.wait(tasks, timeout=1.0)
        finally:
            for writer in (c_writer, t_writer):
                if writer is not None:
                    self._writers.discard(writer)
                    writer.transport.abort()
