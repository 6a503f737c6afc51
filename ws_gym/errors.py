"""Exceptions raised by ws_gym.

All of them derive from :class:`WsGymError`; where a built-in exception fits,
they inherit it too, so ``except TimeoutError`` keeps working::

    WsGymError
    +-- ProtocolError          a peer sent bytes that break the wire protocol
    +-- UnsupportedSpaceError  a space has no wire schema (also TypeError)
    +-- HandshakeError         a worker was refused, or refused us
    +-- RemoteEnvError         an env raised inside a worker
    +-- WorkerLostError        a worker vanished while we waited for it (also ConnectionError)
    +-- ConnectTimeoutError    not enough workers connected in time (also TimeoutError)
    +-- StepTimeoutError       a worker did not answer in time (also TimeoutError)
"""

from __future__ import annotations


class WsGymError(Exception):
    """Base class of every error raised by ws_gym.

    Catch it to handle any ws_gym failure at once; the subclasses say what went wrong.
    """


class ProtocolError(WsGymError, ValueError):
    """Raised when a peer sends a message that breaks the ws_gym wire protocol.

    A call raises it for a malformed reply; in the handshake the connection is
    dropped. The usual causes are a peer of another ws_gym version (run the same
    version on trainer and workers) or something else than a ws_gym peer on the port.
    """


class UnsupportedSpaceError(WsGymError, TypeError):
    """Raised when an env's observation or action space has no wire form.

    The message names the space. Supported are Box (any numeric dtype but long
    double), Discrete, MultiDiscrete, MultiBinary, Text, and Dict (with string keys) and
    Tuple of those: wrap the env so that its spaces are among them.
    """


class HandshakeError(WsGymError):
    """Raised in a worker when the trainer refuses it, or it refuses the trainer.

    Refusals name the cause: another env id, different spaces, no envs left to
    serve, or an env the worker may not (or cannot) create. Fix what ``reason``
    names; where ``retry`` is true (the trainer is busy) the worker tries again.

    Args:
        reason: why the connection was refused.
        retry: whether the worker may try again later.
    """

    def __init__(self, reason: str, retry: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry = retry  # the worker may try again later (the trainer is busy)


class RemoteEnvError(WsGymError):
    """Raised by a call when an env (or its wrappers) raised inside a worker.

    The remote exception is not rebuilt locally: only its type name, message and
    traceback text travel, so nothing received is ever evaluated. Read
    ``remote_type`` and ``remote_traceback`` to find the bug in the env, as if
    it had raised locally.

    Args:
        remote_type: the remote exception's type name, e.g. ``"ValueError"``.
        remote_message: its message.
        remote_traceback: its formatted traceback, as text.
        origin: which worker and envs it came from.
    """

    def __init__(
        self,
        remote_type: str,
        remote_message: str,
        remote_traceback: str = "",
        origin: str = "",
    ) -> None:
        super().__init__(remote_type, remote_message, remote_traceback, origin)
        self.remote_type = remote_type
        self.remote_message = remote_message
        self.remote_traceback = remote_traceback
        self.origin = origin

    def __str__(self) -> str:
        where = f" in {self.origin}" if self.origin else ""
        text = f"{self.remote_type}{where}: {self.remote_message}"
        if self.remote_traceback:
            text += "\n--- remote traceback ---\n" + self.remote_traceback.rstrip()
        return text


class WorkerLostError(WsGymError, ConnectionError):
    """Raised by a call when a worker disconnects during it, or is missing for it.

    The call fails at once, and later calls fail too until ``reset()``, which
    waits for a worker to serve the envs again. To keep training through lost
    workers instead, make the env with ``on_worker_lost="wait"``.
    """


class ConnectTimeoutError(WsGymError, TimeoutError):
    """Raised when workers for all ``num_envs`` envs did not connect within ``connect_timeout``.

    The message says how many envs are missing and the URL workers must dial:
    start more workers (or check that they reach that URL, with the right
    token), or raise ``connect_timeout``.
    """


class StepTimeoutError(WsGymError, TimeoutError):
    """Raised when a worker does not answer a call within ``step_timeout``.

    The message names the slow workers. Their envs may still take the step, and
    its late result is dropped: call ``reset()`` before stepping again. For envs
    that are just slow, raise ``step_timeout`` (``None`` waits for ever).
    """


class RelayError(WsGymError, ConnectionError):
    """Raised when a trainer with ``relay=`` cannot get its room from the relay.

    Examples: the relay refused the trainer token (401), it has no room left
    (503), it cannot be reached within the time allowed. Once the room is
    open, a lost relay is dialed again in the background (the error is logged).
    """
