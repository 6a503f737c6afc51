"""When a link is dead: the heartbeat rules of both sides, with no I/O.

A PC whose Wi-Fi drops sends nothing at all: no FIN, no RST. Each side must
notice by itself, within about 1.5 heartbeats, whether or not a call is in
flight:

- The trainer sends a ping on every connection it has heard nothing from for
  half a heartbeat, also while the worker owes a reply. A worker that is idle
  answers with a pong; one that is inside a long ``step`` cannot, but its
  operating system still acknowledges the ping's bytes. So an idle worker that
  stays silent for :meth:`TrainerLiveness.dead_after` is cut off here, and a
  busy one is cut off by the kernel (:func:`give_up_unacked`): bytes left
  unacknowledged for :func:`unacked_limit` end the connection. A long step is
  never taken for a dead link, because a live PC acknowledges. Both leave room
  for the check's period and for the kernel, which ends a connection a few
  hundred milliseconds after the limit it was given (its retransmission clock).
- A worker hears from a live trainer at least every half heartbeat (requests
  or pings), so hearing nothing for one heartbeat means the trainer or the
  link is gone (:meth:`WorkerLiveness.dead`).

Where the operating system has no such option, a busy worker on a dead link is
noticed at ``step_timeout`` instead; idle ones are noticed as above.
"""

from __future__ import annotations

import logging
import socket
import sys
from typing import Any

log = logging.getLogger("ws_gym")


def check_interval(heartbeat: float) -> float:
    """How often a side looks at its connections' clocks."""
    return min(heartbeat / 10, 0.5)


def unacked_limit(heartbeat: float) -> float:
    """How long sent bytes may stay unacknowledged before the kernel ends the
    connection: with a ping every half heartbeat, a dead link ends a busy
    connection within 1.25 heartbeats (plus the kernel's own lateness)."""
    return 0.75 * heartbeat


class TrainerLiveness:
    """The trainer's view of one worker connection (loop times, in seconds)."""

    __slots__ = ("heartbeat", "pinged_at")

    def __init__(self, heartbeat: float) -> None:
        self.heartbeat = heartbeat
        self.pinged_at = float("-inf")  # when the last ping went out

    @property
    def dead_after(self) -> float:
        """Silence (since the last frame received) that ends an idle connection:
        a ping goes out after half a heartbeat, and has 0.75 of one to be answered."""
        return 1.25 * self.heartbeat

    def ping_due(self, now: float, last_rx: float) -> bool:
        """Whether to send a ping now (and count it as sent)."""
        if now - max(last_rx, self.pinged_at) < self.heartbeat / 2:
            return False
        self.pinged_at = now
        return True

    def dead(self, now: float, last_rx: float, busy: bool) -> bool:
        """Whether an idle connection's silence means the link is gone.

        A busy worker (one that owes a reply) cannot answer pings from inside
        its env's step; the kernel's timeout decides for it."""
        return not busy and self.pinged_at > last_rx and now - last_rx >= self.dead_after


class WorkerLiveness:
    """The worker's view of its trainer (loop times, in seconds)."""

    __slots__ = ("heartbeat",)

    def __init__(self, heartbeat: float) -> None:
        self.heartbeat = heartbeat

    @property
    def silence_limit(self) -> float:
        return self.heartbeat

    def dead(self, now: float, last_rx: float) -> bool:
        return now - last_rx >= self.silence_limit


# macOS: TCP_RXT_CONNDROPTIME (seconds); Windows: TCP_MAXRT (seconds). Python
# names neither on every version, so their values from the systems' headers.
_DARWIN_RXT_CONNDROPTIME = 0x80
_WINDOWS_MAXRT = 5


def give_up_unacked(sock: Any, seconds: float) -> bool:
    """Have the kernel end the connection when bytes it sent stay
    unacknowledged for ``seconds`` (a dead link), instead of retrying for many
    minutes. Linux ``TCP_USER_TIMEOUT``, macOS ``TCP_RXT_CONNDROPTIME``, Windows
    ``TCP_MAXRT``. Returns False where the socket or the OS has no such option
    (a Unix socket, another OS): then only the heartbeat's pongs count."""
    if sock is None:
        return False
    try:
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return False
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, max(1, int(seconds * 1000)))
        elif sys.platform == "darwin":
            sock.setsockopt(socket.IPPROTO_TCP, _DARWIN_RXT_CONNDROPTIME, max(1, round(seconds)))
        elif sys.platform == "win32":
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, "TCP_MAXRT", _WINDOWS_MAXRT),
                            max(1, round(seconds)))
        else:
            return False
    except (OSError, AttributeError, ValueError) as exc:
        log.debug("no kernel timeout for unacknowledged bytes on this socket: %r", exc)
        return False
    return True
