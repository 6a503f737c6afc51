"""An env's ``metadata`` as the handshake carries it: its JSON-safe part only.

Both sides need it: a worker reports its first env's metadata in its ready
(:mod:`ws_gym.host`), and the trainer builds the same ready itself when it can
make the env locally, to know the spaces before any worker arrives.
"""

from __future__ import annotations

from typing import Any

__all__ = ["jsonable_metadata"]


def jsonable_metadata(metadata: dict) -> dict[str, Any]:
    """The entries of ``metadata`` that JSON carries as they are: plain scalars,
    and ``render_modes`` keeping only its strings. Anything else is dropped."""
    out: dict[str, Any] = {}
    for key, value in metadata.items():
        if key == "render_modes" and isinstance(value, (list, tuple)):
            out[key] = [v for v in value if isinstance(v, str)]
        elif isinstance(value, (str, int, float, bool)) or value is None:
            out[key] = value
    return out
