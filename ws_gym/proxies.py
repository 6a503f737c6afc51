"""Which HTTP proxy (if any) a connection goes through: a pure decision.

Workers on office and campus networks reach the trainer (or a relay) only
through an HTTP proxy, and a trainer may reach its relay only through one.
:func:`proxy_for` decides for a URL: an explicit proxy always, else
``HTTPS_PROXY`` (``wss://``) or ``HTTP_PROXY`` (``ws://``) from the
environment, except for a loopback host or a host ``NO_PROXY`` names.
aiohttp's own ``trust_env`` is not used: it reads ``WSS_PROXY``/``WS_PROXY``
for WebSocket URLs, not the variables users set, and knows no loopback rule.
"""

from __future__ import annotations

import ipaddress
from typing import Mapping
from urllib.parse import urlsplit


def without_credentials(url: str) -> str:
    """``url`` without its ``user:password@`` part: what may be logged."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority = rest[:end].rpartition("@")[2]
    return f"{scheme}{sep}{authority}{rest[end:]}"


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (a URL's host) names this machine's loopback: localhost,
    127.0.0.0/8, ::1 (also as an IPv4-mapped address)."""
    host = host.strip("[]").rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _no_proxy_matches(host: str, port: int, no_proxy: str) -> bool:
    """Whether a ``NO_PROXY`` list exempts ``host:port``, as curl reads it: ``*``
    (every host), names (``example.org``, ``.example.org`` and ``*.example.org``
    match the name and its subdomains), addresses and CIDR ranges, each with an
    optional ``:port``. No name is resolved."""
    host = host.strip("[]").rstrip(".").lower()
    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    for entry in no_proxy.replace(",", " ").split():
        entry = entry.lower()
        if entry == "*":
            return True
        name, want_port = entry, None
        if entry.startswith("["):  # [v6]:port or [v6]
            name, _, tail = entry[1:].partition("]")
            want_port = tail[1:] if tail.startswith(":") else None
        elif entry.count(":") == 1:  # name:port or v4:port (a bare v6 has several colons)
            name, _, want_port = entry.partition(":")
        if want_port is not None and want_port != str(port):
            continue
        name = name.lstrip("*").lstrip(".").rstrip(".")
        if not name:
            continue
        if ip is not None:
            try:
                if ip in ipaddress.ip_network(name, strict=False):
                    return True
            except ValueError:
                pass
            continue
        if host == name or host.endswith("." + name):
            return True
    return False


def _env_value(environ: Mapping[str, str], name: str) -> tuple[str, str]:
    """A ``*_proxy`` variable's value and the spelling that set it; the lowercase
    one wins, as in curl and urllib (an empty one switches the variable off)."""
    if name in environ:
        return environ[name].strip(), name
    upper = name.upper()
    # HTTP_PROXY in a CGI program's environment may be a request header ("httpoxy")
    if upper in environ and not (upper == "HTTP_PROXY" and "REQUEST_METHOD" in environ):
        return environ[upper].strip(), upper
    return "", upper


def check_proxy_url(proxy: str, source: str = "--proxy") -> str:
    """``proxy`` as an ``http://[user:password@]host:port`` URL, or ValueError
    naming ``source`` (the option or variable that gave it). A value without a
    scheme, as proxy variables often are, means ``http://``."""
    proxy = proxy.strip()
    if "://" not in proxy:
        proxy = "http://" + proxy
    shown = without_credentials(proxy)
    parts = urlsplit(proxy)
    if parts.scheme.lower() != "http":
        raise ValueError(f"{source} {shown}: only http:// proxies are supported (a wss:// trainer URL is still "
                         "encrypted end to end: the proxy tunnels it with CONNECT)")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{source} {shown}: the port is not a number from 1 to 65535") from None
    if not parts.hostname or port == 0 or parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"{source} {shown}: expected http://[USER:PASSWORD@]HOST:PORT")
    return proxy


def choose_proxy(url: str, explicit: str | None, environ: Mapping[str, str]) -> tuple[str, str] | None:
    if explicit:
        return check_proxy_url(explicit, "--proxy"), "--proxy"
    target = urlsplit(url)
    scheme = target.scheme.lower()
    host = target.hostname
    if scheme not in ("ws", "wss") or not host or is_loopback_host(host):
        return None
    value, source = _env_value(environ, "https_proxy" if scheme == "wss" else "http_proxy")
    if not value:
        return None
    try:
        port = target.port or (443 if scheme == "wss" else 80)
    except ValueError:
        return None  # the URL's own error is reported where it is dialed
    if _no_proxy_matches(host, port, _env_value(environ, "no_proxy")[0]):
        return None
    return check_proxy_url(value, source), source


def proxy_for(url: str, explicit: str | None, environ: Mapping[str, str]) -> str | None:
    """The HTTP proxy a worker dials trainer ``url`` through, or None: direct.

    - ``explicit`` (``--proxy``), when given, is used for every URL, loopback too:
      the user asked for it;
    - otherwise the environment's ``https_proxy``/``HTTPS_PROXY`` for ``wss://``
      URLs, ``http_proxy``/``HTTP_PROXY`` for ``ws://`` (lowercase wins), unless
      the trainer is on loopback (localhost, 127.0.0.0/8, ::1), which is always
      dialed directly, or ``no_proxy``/``NO_PROXY`` exempts its host (see
      :func:`_no_proxy_matches`).

    The result is a checked ``http://`` URL, credentials included; ValueError
    names the option or variable of an unusable proxy URL.
    """
    chosen = choose_proxy(url, explicit, environ)
    return None if chosen is None else chosen[0]
