"""Where the trainer listens and what workers dial: URLs, hosts, the TLS pin.

Pure functions of a host string, except :func:`certificate_fingerprint`,
which asks the trainer's own port.
"""

from __future__ import annotations

import hashlib
import ipaddress
import socket
import ssl

WS_PATH = "/ws"


def format_url(host: str, port: int, tls: bool = False) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"{'wss' if tls else 'ws'}://{shown}:{port}{WS_PATH}"


def plain_host(host: str) -> str:
    """``host`` without the brackets of an IPv6 address written as in URLs ("[::1]")."""
    if isinstance(host, str) and len(host) > 2 and host[0] == "[" and host[-1] == "]":
        return host[1:-1]
    return host


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach a server bound to ``host``."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # "" (every interface) or a name: assume others can reach it


def loopback_for(host: str) -> str:
    """The address a local worker should dial for a server bound to ``host``."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def certificate_fingerprint(host: str, port: int, timeout: float = 10.0) -> str:
    """SHA-256 (hex) of the certificate a TLS server on this machine presents.

    The trainer asks its own port, on loopback, so that its local workers can
    pin exactly that certificate (``--cert-fingerprint``): no CA or host name is
    involved, which also covers a bare ``ssl_context`` whose files we never see.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # we only read the certificate, to pin it
    with socket.create_connection((host, port), timeout=timeout) as raw:
        with ctx.wrap_socket(raw) as tls:
            der = tls.getpeercert(binary_form=True)
    if not der:
        raise ssl.SSLError(f"the server at {host}:{port} presented no certificate")
    return hashlib.sha256(der).hexdigest()
