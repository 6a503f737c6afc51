"""The event loop both sides run: uvloop when it is installed, else asyncio's.

uvloop (``pip install ws_gym[fast]``; Linux and macOS only) cuts the latency of
each round trip; without it everything works the same, only slower. Set
``WS_GYM_UVLOOP=0`` to use asyncio's loop even when uvloop is installed.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, Coroutine


def switched_off(variable: str) -> bool:
    """Whether the environment variable turns a speed-up off (0, false, no, off)."""
    return os.environ.get(variable, "1").strip().lower() in ("0", "false", "no", "off")


def uvloop_module() -> Any:
    """The uvloop module if it is installed and not switched off, else None."""
    if switched_off("WS_GYM_UVLOOP"):
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop


def new_event_loop() -> asyncio.AbstractEventLoop:
    uvloop = uvloop_module()
    return uvloop.new_event_loop() if uvloop is not None else asyncio.new_event_loop()


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    """``asyncio.run`` on :func:`new_event_loop`."""
    if hasattr(asyncio, "Runner"):  # Python 3.11+
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            return runner.run(coro)
    loop = new_event_loop()  # Python 3.10
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
