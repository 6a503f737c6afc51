"""Who a proxied connection comes from: the ``Forwarded`` (RFC 7239) and
``X-Forwarded-For`` headers a reverse proxy adds, read with no I/O.

Behind a proxy on the trainer's machine every connection's socket peer is the
proxy; these headers name the client, for the logs and for the rule that a
proxied connection is never taken for a local one. They are untrusted text,
so only a bounded prefix is read and only an address-shaped value is kept.
"""

from __future__ import annotations

from typing import Mapping

# What a proxy says about the client is untrusted text: read a bounded prefix,
# keep an address only if it is short and made of address characters.
MAX_FORWARDED_HEADER = 4096
MAX_FORWARDED_ADDRESS = 64
_ADDRESS_CHARS = frozenset("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.:-_%")


def forwarded_client(headers: Mapping[str, str]) -> str | None:
    """The client address a proxy forwarded, or None when the request carries
    neither a ``Forwarded`` nor an ``X-Forwarded-For`` header.

    The first ``for=`` of ``Forwarded`` (RFC 7239), else the first entry of
    ``X-Forwarded-For``, without quotes, brackets or port; ``"unknown"`` when
    the headers name none, or nothing that looks like an address.
    """
    getall = getattr(headers, "getall", None)  # several headers of one name: aiohttp's CIMultiDict
    forwarded = getall("Forwarded", None) if getall else headers.get("Forwarded")
    xff = getall("X-Forwarded-For", None) if getall else headers.get("X-Forwarded-For")
    if forwarded is None and xff is None:
        return None
    if isinstance(forwarded, str):
        forwarded = [forwarded]
    if isinstance(xff, str):
        xff = [xff]
    value = _first_for(",".join(forwarded)[:MAX_FORWARDED_HEADER]) if forwarded else None
    if value is None and xff:
        value = xff[0][:MAX_FORWARDED_HEADER].split(",", 1)[0]
    return _forwarded_address(value)


def _first_for(text: str) -> str | None:
    """The value of the first ``for`` parameter in a ``Forwarded`` header's
    elements (``a=b;c=d, e=f``), quoted strings unquoted."""
    i, n = 0, len(text)
    while i < n:
        j = i
        while j < n and text[j] not in "=;,":
            j += 1
        name = text[i:j].strip().lower()
        if j < n and text[j] == "=":
            j += 1
            while j < n and text[j] in " \t":
                j += 1
            if j < n and text[j] == '"':  # quoted-string: may hold ; and , (and \-escapes)
                j += 1
                chars = []
                while j < n and text[j] != '"':
                    if text[j] == "\\" and j + 1 < n:
                        j += 1
                    chars.append(text[j])
                    j += 1
                value = "".join(chars)
                j += 1
            else:
                k = j
                while k < n and text[k] not in ";,":
                    k += 1
                value, j = text[j:k].strip(), k
            if name == "for":
                return value
        while j < n and text[j] not in ";,":
            j += 1
        i = j + 1
    return None


def _forwarded_address(value: str | None) -> str:
    """An address from a forwarding header, shown in logs: brackets and port
    taken off; ``"unknown"`` for anything else."""
    if value is None:
        return "unknown"
    value = value.strip().strip('"').strip()
    if value.startswith("["):  # "[2001:db8::1]" or "[2001:db8::1]:4711"
        end = value.find("]")
        value = value[1:end] if end > 0 else ""
    elif value.count(":") == 1:  # "192.0.2.7:4711"; more colons: a bare IPv6 address, no port
        value = value.partition(":")[0]
    if not value or len(value) > MAX_FORWARDED_ADDRESS or not _ADDRESS_CHARS.issuperset(value):
        return "unknown"
    return value
