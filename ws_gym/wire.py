"""A WebSocket's data plane once aiohttp has upgraded the connection.

aiohttp's message API costs a task wake-up, a queue and several layers of
checks per frame; at thousands of steps a second that is most of a step's CPU.
So after the upgrade (and, on the worker, the first handshake message) each
side moves the connection's transport to a :class:`FrameConnection` with
``transport.set_protocol`` (public asyncio API, uvloop too): frames are parsed
by :class:`ws_gym.frames.FrameParser` inside ``data_received`` and each message
is handled there and then; replies are written straight to the transport.

What goes over the wire is unchanged: peers on aiohttp's own API (or any
RFC 6455 implementation) talk to it as before.

:meth:`FrameConnection.send_from_thread` lets the trainer's caller thread write
a request itself, on a duplicate of the socket, so a step does not wait for the
event loop thread to wake up; writes from both threads are ordered by one lock,
and whatever the socket does not take at once goes through the loop as usual.

Busy polling (:meth:`FrameConnection.claim_reading`): where a spare core makes
it pay, the loop stops reading a connection and whoever waits for it reads the
socket itself with :meth:`FrameConnection.poll_read`, under ``rlock``: the
trainer's caller thread during a call, the loop now and then in between, and a
worker for a short while after each reply. A round trip then wakes no thread
that has gone to sleep. Binary messages are handled by the reading thread;
everything else (control frames, the end of the stream, errors) is handed to
the loop, which alone touches the transport.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import select
import socket
import threading
import time
from typing import Any, Callable

from . import frames as F

log = logging.getLogger("ws_gym")


class FrameState(enum.Enum):
    """Where a connection's two halves are, as websockets' ``State``.

    The halves end apart: ours once our close frame is out (nothing more is
    written), the peer's once its close frame, the end of the stream or a
    broken frame came (nothing more is read). Different threads end them (the
    loop writes the close; a busy-polling caller may read the end), so a
    change goes through :meth:`FrameConnection._end_half` under a lock; reads
    need none.
    """

    OPEN = "open"
    CLOSE_SENT = "close sent"  # our half ended; the peer's may still send
    ENDED = "ended"  # the peer's half ended; the loop is finishing the connection
    CLOSED = "closed"  # both


class FrameConnection(asyncio.Protocol):
    """Reads and writes WebSocket frames on a transport taken over from aiohttp.

    ``on_message(payload)`` is called for every binary message, inside
    ``data_received``. Pings are answered, text messages are ignored, a close
    frame is answered and ends the connection. :attr:`done` resolves when the
    connection ends: ``(code, reason)`` of the peer's close frame, or the
    exception that ended it (a framing error, a lost connection, or an
    exception raised by ``on_message``).
    """

    def __init__(
        self,
        transport: asyncio.Transport,
        *,
        client: bool,
        max_size: int,
        on_message: Callable[[Any], None],
        loop: asyncio.AbstractEventLoop,
        on_control: Callable[[], None] | None = None,
        on_pong: Callable[[bytes], None] | None = None,
    ) -> None:
        self.transport = transport
        self.client = client  # a client masks what it sends; a server expects masked frames
        self.parser = F.FrameParser(max_size=max_size, masked=not client)
        self.on_message = on_message
        self.on_control = on_control  # any frame at all arrived (heartbeats)
        self.on_pong = on_pong  # a pong's payload (a worker times its own pings)
        self.done: asyncio.Future = loop.create_future()
        self.state = FrameState.OPEN
        self._slock = threading.Lock()  # state changes (see FrameState)
        self._write = transport.write
        self._writelines = transport.writelines
        self._loop = loop
        self._wlock = threading.Lock()  # orders writes from the loop and from send_from_thread
        self._direct: socket.socket | None = None  # a duplicate of the socket (see enable_direct)
        self._queued: list = []  # bytes for the loop to write, in order (send_from_thread's overflow)
        self._loop_thread = threading.get_ident()  # made on the loop's thread
        self.polled = False  # the transport no longer reads: poll_read does (claim_reading)
        self.rlock = threading.RLock()  # polled: one reader at a time (the loop may re-enter)
        self.poll_after = 0.0  # seconds to keep reading after a message was handled (a worker's busy poll)
        self.mask_key: bytes | None = None  # a client's fixed masking key (F.ZERO_KEY on a private Unix socket)

    @property
    def close_sent(self) -> bool:
        """Our half has ended: nothing more is written."""
        state = self.state
        return state is FrameState.CLOSE_SENT or state is FrameState.CLOSED

    @property
    def ended(self) -> bool:
        """The peer's half has ended: nothing more is read."""
        state = self.state
        return state is FrameState.ENDED or state is FrameState.CLOSED

    def _end_half(self, half: FrameState) -> None:
        """End one half (:attr:`FrameState.CLOSE_SENT` or :attr:`FrameState.ENDED`)."""
        with self._slock:
            state = self.state
            if state is not half and state is not FrameState.CLOSED:
                self.state = half if state is FrameState.OPEN else FrameState.CLOSED

    @classmethod
    def take_over(cls, transport: asyncio.Transport, **kwargs: Any) -> tuple["FrameConnection", Any]:
        """Install a FrameConnection on ``transport``; returns it and aiohttp's protocol."""
        previous = transport.get_protocol()
        conn = cls(transport, **kwargs)
        transport.set_protocol(conn)
        return conn, previous

    # -- asyncio.Protocol ------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._handle(data) and self.poll_after and self._direct is not None:
            self._poll_on()

    def _handle(self, data: bytes) -> bool:
        """Parse received bytes and handle the messages; False once the connection is ending.

        Binary messages go to ``on_message`` in the calling thread; control
        frames and the ending are done by the loop (at once when this is the loop).
        """
        try:
            messages = self.parser.feed(data)
        except F.FrameError as exc:
            self._end(exc)
            return False
        for op, payload in messages:
            if op == F.OP_BINARY:
                try:
                    self.on_message(payload)
                except BaseException as exc:  # noqa: BLE001 - handed to whoever awaits `done`
                    self._end(exc)
                    return False
            else:
                if op == F.OP_CLOSE:
                    self._end_half(FrameState.ENDED)  # the loop answers it and ends the connection
                self._on_loop(self._control, op, payload)
            if self.ended or self.done.done():
                return False
        return True

    def _control(self, op: int, payload: bytes) -> bool:
        """Handle a control (or text) frame on the loop; False once the connection is closing."""
        if self.done.done():
            return False
        if op == F.OP_PING:
            if not self.close_sent:
                self._send(F.OP_PONG, payload)
        elif op == F.OP_CLOSE:
            try:
                code, reason = F.parse_close(payload)
            except F.FrameError as exc:  # answered with the error's own code, not echoed
                self._fail(exc, exc.code, exc.reason)
                return False
            if not self.close_sent:
                self._send(F.OP_CLOSE, F.close_payload(code if code != 1005 else F.CLOSE_NORMAL))
                self._end_half(FrameState.CLOSE_SENT)
            self.transport.close()
            self._resolve((code, reason))
            return False
        elif op == F.OP_PONG and self.on_pong is not None:
            self.on_pong(bytes(payload))
        # pongs and text messages need nothing more; any frame at all counts as life
        if self.on_control is not None:
            self.on_control()
        return True

    _spin: Any = None  # the busy poll's SpinPolicy (ws_gym.polling), made by _poll_on
    _spin_preempted = False  # the last spin lost the CPU (told to the policy with the next cycle)

    def _poll_on(self) -> None:
        """A worker's busy poll: read the socket for a moment more, so that the
        next request is taken without a wake-up of the loop.

        How long is up to this connection's :class:`ws_gym.polling.SpinPolicy`
        (at most ``poll_after`` seconds; 0 where spinning does not pay), which
        is told of every cycle: from one message handled to the next, whether
        the spin caught it, whether the thread lost the CPU while spinning."""
        clock = time.perf_counter
        now = clock()
        policy = self._spin
        if policy is None or policy.limit != self.poll_after:
            from .polling import SpinPolicy

            policy = self._spin = SpinPolicy(self.poll_after)
        elif now - policy.mark < 1.0:  # the message came through the loop: no spin caught it
            policy.record(now - policy.mark, False, self._spin_preempted)
        policy.mark = last = now
        preempted = False
        stalled = policy.PREEMPTED
        end, limit = now + policy.spin, now + 0.05  # back to the loop at least every 50 ms
        while now < end:
            got = self.poll_read()
            if got is None:
                return  # ended
            now = clock()
            if got:
                policy.record(now - policy.mark, True, preempted)
                policy.mark = now
                preempted = False
                end = min(now + policy.spin, limit)
            elif now - last > stalled:  # read nothing, yet took long: this thread was not running
                preempted = True
            last = now
        self._spin_preempted = preempted

    # -- polled reading ----------------------------------------------------------

    def claim_reading(self) -> bool:
        """On the loop: stop the transport's reads; from now on :meth:`poll_read`
        reads (needs :meth:`enable_direct`). Call it while the peer has nothing in flight."""
        if self._direct is None or self.done.done():
            return False
        self.transport.pause_reading()
        self.polled = True
        return True

    def poll_read(self) -> bool | None:
        """Read what the socket holds, without blocking, and handle it: True if
        anything came, False if nothing did, None once the stream has ended.

        Any thread; the caller holds :attr:`rlock` (or runs on the loop, in a
        worker). Binary messages go to ``on_message`` in this thread.
        """
        sock = self._direct
        if sock is None or self.ended:
            return None
        try:
            data = sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            self._end(ConnectionResetError(f"connection error: {exc}"))
            return None
        if not data:
            self._end(ConnectionResetError("the peer closed the connection"))
            return None
        return True if self._handle(data) else None

    def _on_loop(self, fn: Callable[..., Any], *args: Any) -> None:
        if threading.get_ident() == self._loop_thread:
            fn(*args)
        else:
            try:
                self._loop.call_soon_threadsafe(fn, *args)
            except RuntimeError:  # the loop is closed: nothing left to finish
                pass

    def _end(self, exc: BaseException) -> None:
        """Reading met the end of the stream (or it broke): the loop ends the connection."""
        self._end_half(FrameState.ENDED)
        if isinstance(exc, F.FrameError):
            self._on_loop(self._fail, exc, exc.code, exc.reason)
        else:
            self._on_loop(self._fail, exc)

    def eof_received(self) -> bool:
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._drop_direct()
        self._resolve(exc if exc is not None else ConnectionResetError("the peer closed the connection"))

    # -- sending ---------------------------------------------------------------

    @property
    def direct(self) -> bool:
        """Whether :meth:`send_from_thread` may be used."""
        return self._direct is not None

    def enable_direct(self) -> bool:
        """Allow :meth:`send_from_thread` (plain sockets only: TLS encrypts in the loop)."""
        if self.transport.get_extra_info("sslcontext") is not None or os.name != "posix":
            return False
        sock = self.transport.get_extra_info("socket")
        try:
            self._direct = socket.socket(fileno=os.dup(sock.fileno()))  # shares O_NONBLOCK
        except (AttributeError, OSError, ValueError) as exc:
            log.debug("no direct writes on this connection: %r", exc)
            return False
        return True

    def send_from_thread(self, payload: bytes | bytearray | memoryview | tuple) -> None:
        """Write one binary message from any thread (raises ConnectionResetError once closed).

        A tuple is the message's pieces, in order (see :func:`ws_gym.frames.frame_pieces`):
        they are written as they are, and what the socket does not take at once
        is copied, so the pieces' memory may change as soon as this returns."""
        if isinstance(payload, tuple):
            pieces = F.frame_pieces(F.OP_BINARY, payload, masked=self.client, key=self.mask_key)
        else:
            head, body = F.frame(F.OP_BINARY, payload, masked=self.client, key=self.mask_key)
            pieces = (head + body,) if len(body) < 65536 else (head, body)  # big bodies: no join
        with self._wlock:
            sock = self._direct
            if sock is None or self.close_sent:
                raise ConnectionResetError("the connection is closed")
            sent = 0
            if not self._queued and not self.transport.get_write_buffer_size():
                try:
                    sent = sock.send(pieces[0]) if len(pieces) == 1 else sock.sendmsg(pieces)
                except BlockingIOError:
                    pass
                except OSError as exc:
                    raise ConnectionResetError(f"send failed: {exc}") from None
                if sent == sum(len(p) for p in pieces):
                    return
            self._queued.append(b"".join(pieces)[sent:])  # a copy: the pieces may change now
            if len(self._queued) == 1:
                self._loop.call_soon_threadsafe(self._flush_queued)

    def _flush_queued(self) -> None:
        with self._wlock:
            if self.transport.is_closing():
                self._queued = []
            else:
                self._flush_queued_locked()

    def send(self, payload: bytes | bytearray | memoryview | tuple) -> None:
        """Write one binary message (raises ConnectionResetError once closed).

        A tuple is the message's pieces, in order: written as they are where
        :meth:`send_from_thread` may be used, else joined."""
        if self.close_sent or self.transport.is_closing():
            raise ConnectionResetError("the connection is closed")
        if isinstance(payload, tuple):
            if self._direct is not None:
                self.send_from_thread(payload)
                return
            payload = b"".join(payload)
        self._send(F.OP_BINARY, payload)

    def ping(self, payload: bytes = b"") -> None:
        if self.close_sent or self.transport.is_closing():
            raise ConnectionResetError("the connection is closed")
        self._send(F.OP_PING, payload)

    def _send(self, op: int, payload: bytes | bytearray | memoryview) -> None:
        head, body = F.frame(op, payload, masked=self.client, key=self.mask_key)
        if self._direct is not None:  # keep the order with send_from_thread's writes
            with self._wlock:
                if self._queued:
                    self._flush_queued_locked()
                self._write_frame(head, body)
            return
        self._write_frame(head, body)

    def _write_frame(self, head: bytes, body: bytes | bytearray | memoryview) -> None:
        if len(body) < 4096:  # one small buffer: the transport's quickest write
            self._write(head + body)
        else:
            self._writelines((head, body))

    def _flush_queued_locked(self) -> None:
        queued, self._queued = self._queued, []
        self._writelines(queued)

    def close(self, code: int = F.CLOSE_NORMAL, reason: str = "") -> None:
        """Send a close frame and close the transport once it is written."""
        if not self.close_sent and not self.transport.is_closing():
            self._send(F.OP_CLOSE, F.close_payload(code, reason))
        with self._wlock:  # a caller thread's send sees it under this lock
            self._end_half(FrameState.CLOSE_SENT)
        self.transport.close()

    def abort(self) -> None:
        self.transport.abort()
        self._drop_direct()

    def _drop_direct(self) -> None:
        """Close the duplicate socket: the peer sees the connection end only
        once every descriptor of the socket is closed."""
        with self._wlock:
            sock, self._direct = self._direct, None
        if sock is not None:
            with self.rlock:  # no reader is inside recv() on it
                sock.close()

    # -- ending ----------------------------------------------------------------

    def _fail(self, exc: BaseException, code: int | None = None, reason: str = "") -> None:
        if code is not None:
            self.close(code, reason[:120])
        else:
            self.transport.close()
        self._resolve(exc)

    def _resolve(self, value: Any) -> None:
        if self.done.done():
            return
        if isinstance(value, BaseException):
            self.done.set_exception(value)
            self.done.exception()  # retrieved: no "exception was never retrieved" if nobody waits
        else:
            self.done.set_result(value)


def wait_readable(wires: list[FrameConnection], timeout: float) -> None:
    """Sleep until one of the polled connections' sockets has something to read
    (or ``timeout`` seconds pass). A socket closed meanwhile ends the wait:
    :meth:`FrameConnection.poll_read` then sees why."""
    try:
        poller = select.poll()
        for wire in wires:
            sock = wire._direct
            if sock is None:  # closed meanwhile: the caller's read sees it at once
                return
            poller.register(sock, select.POLLIN)
        poller.poll(timeout * 1000)
    except (OSError, ValueError, TypeError):
        pass


def hand_back(transport: asyncio.Transport, previous: Any, exc: Exception | None = None) -> None:
    """Give the ended connection back to aiohttp's protocol, as closed, so that
    aiohttp cleans up as after any disconnect."""
    try:
        transport.set_protocol(previous)
    except Exception:  # noqa: BLE001 - a transport that is gone already
        pass
    try:
        previous.connection_lost(exc)
    except Exception as err:  # noqa: BLE001 - aiohttp's own cleanup; log, never raise
        log.debug("aiohttp cleanup after a taken-over connection: %r", err)
