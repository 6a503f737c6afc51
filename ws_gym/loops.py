"""The event loop both sides run: uvloop when it is installed, else asyncio's.

uvloop (``pip install ws_gym[fast]``; Linux and macOS only) cuts the latency of
each round trip; without it everything works the same, only slower.
``WS_GYM_UVLOOP=0`` (read by :class:`ws_gym.config.Transport`) uses asyncio's
loop even when uvloop is installed.
"""

from __future__ import annotations

import asyncio
from typing import Any, Coroutine

from .config import Transport


def uvloop_module(wanted: bool | None = None) -> Any:
    """The uvloop module if it is installed and wanted (``None``: as the
    environment's :class:`~ws_gym.config.Transport` says), else None."""
    if not (Transport.from_environment().uvloop if wanted is None else wanted):
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop


def new_event_loop(uvloop: bool | None = None) -> asyncio.AbstractEventLoop:
    """uvloop's loop where it is installed and wanted, else asyncio's."""
    module = uvloop_module(uvloop)
    return module.new_event_loop() if module is not None else asyncio.new_event_loop()


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def run(coro: Coroutine[Any, Any, Any], uvloop: bool | None = None) -> Any:
    """``asyncio.run`` on :func:`new_event_loop`."""
    if hasattr(asyncio, "Runner"):  # Python 3.11+
        with asyncio.Runner(loop_factory=lambda: new_event_loop(uvloop)) as runner:
            return runner.run(coro)
    loop = new_event_loop(uvloop)  # Python 3.10
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(coro)
    finally:
        try:
            for task in asyncio.all_tasks(loop):
                task.cancel()
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            loop.close()
