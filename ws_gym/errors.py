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
    """Base class of every error raised by ws_gym."""


class ProtocolError(WsGymError, ValueError):
    """A message does not follow the ws_gym wire protocol."""


class UnsupportedSpaceError(WsGymError, TypeError):
    """A Gymnasium space that ws_gym cannot describe on the wire."""


class HandshakeError(WsGymError):
    """A connection was refused during the handshake; ``reason`` says why."""

    def __init__(self, reason: str, retry: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry = retry  # the worker may try again later (the trainer is busy)


class RemoteEnvError(WsGymError):
    """An exception raised by an env (or its wrappers) inside a worker.

    The remote exception is not rebuilt locally: only its type name, message and
    traceback text travel, so nothing received is ever evaluated.
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
    """A worker disconnected (or was missing) while a call needed it."""


class ConnectTimeoutError(WsGymError, TimeoutError):
    """Workers covering ``num_envs`` did not connect within ``connect_timeout``."""


class StepTimeoutError(WsGymError, TimeoutError):
    """A worker did not answer a call within ``step_timeout``."""
