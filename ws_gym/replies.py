"""A worker's reply frame to each request (no I/O).

A request is decoded (a compact ``step`` by its layout, anything else by the
codec), handed to the worker's :class:`~ws_gym.host.EnvHost`, and its result
encoded: compact where the step's result fits the layout exactly, else by the
codec; an env's exception becomes an ``error`` reply. Where the handshake
chose a compression codec, the host's compressor (``host.zip``) may compress
the reply's observations, and its auto rule hears when each step request
arrived (:mod:`ws_gym.compression`). The links of :mod:`ws_gym.worker_links`
send the frames.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Literal, overload

from . import codec, compact
from . import protocol as P
from .errors import ProtocolError

if TYPE_CHECKING:
    from .host import EnvHost

log = logging.getLogger("ws_gym.worker")


@overload
def answer(host: EnvHost, data: Any, parts: Literal[False] = False) -> tuple[bytes, bool]: ...


@overload
def answer(host: EnvHost, data: Any, parts: bool) -> tuple[bytes | tuple, bool]: ...


def answer(host: EnvHost, data: Any, parts: bool = False) -> tuple[bytes | tuple, bool]:
    """The reply frame to one request, and whether it was the trainer's close (see :func:`reply`)."""
    frame, kind = reply(host, data, parts)
    return frame, kind == P.CLOSE


@overload
def reply(host: EnvHost, data: Any, parts: Literal[False] = False) -> tuple[bytes, str | None]: ...


@overload
def reply(host: EnvHost, data: Any, parts: bool) -> tuple[bytes | tuple, str | None]: ...


def reply(host: EnvHost, data: Any, parts: bool = False) -> tuple[bytes | tuple, str | None]:
    """The reply frame to one request, and the request's kind (None: malformed).

    ``parts``: a big compact reply may come as its pieces, not joined (see
    :meth:`ws_gym.compact.StepLayout.encode_reply`), for a writer that
    sends them as they are."""
    # a compact step (laid out by the handshake) is answered compact where the result fits
    layout = host.compact if data[:4] == compact.REQUEST else None
    try:
        if layout is not None:
            rid, actions = layout.decode_request(data)
            req = codec.Message(P.STEP, rid, {"a": actions})
        else:
            req = codec.decode(data)
    except ProtocolError as exc:
        log.warning("ignoring a malformed request: %s", exc)
        return codec.encode(P.ERROR, 0, P.error_body(exc)), None
    pack = host.zip
    if pack is not None and pack.rule is not None:  # "auto": the step cycles it measures
        if req.kind == P.STEP:
            pack.rule.step_arrived(time.perf_counter())
        else:
            pack.rule.other_request()
    try:
        body = req.body if req.kind == P.STEP else codec.writable(req.body)
        result = host.handle(req.kind, body)
        frame = None
        if layout is not None:
            frame = layout.encode_reply(req.id, result, parts=parts and layout.big, pack=pack)
        frame = frame or codec.encode(P.OK, req.id, result, pack=pack)
    except Exception as exc:  # the env's error goes back to the trainer
        frame = codec.encode(P.ERROR, req.id, P.error_body(exc))
    return frame, req.kind
