"""benchmarks/netlink.py's Link with real sockets on 127.0.0.1: an echo server
behind it, bytes intact and in order both ways, its delay and its rate."""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_netlink():
    spec = importlib.util.spec_from_file_location("ws_gym_netlink", ROOT / "benchmarks" / "netlink.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


Link = load_netlink().Link
TIMEOUT = 10.0  # every wait on a socket is bounded by this


class EchoServer:
    """Echoes everything on each connection, in a thread per connection."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        conn.settimeout(TIMEOUT)
        try:
            while data := conn.recv(65536):
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()
        for conn in self.conns:
            conn.close()


@pytest.fixture
def echo():
    server = EchoServer()
    yield server
    server.close()


def dial(link) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", link.port), timeout=TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        part = sock.recv(min(65536, n - got))
        if not part:
            raise AssertionError(f"connection closed after {got} of {n} bytes")
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def test_bytes_intact_and_in_order_both_ways(echo):
    payload = os.urandom(1 << 20)
    with Link(echo.port, delay_ms=1) as link:
        sock = dial(link)
        with sock:
            received: list[bytes] = []
            reader = threading.Thread(target=lambda: received.append(recv_exactly(sock, len(payload))))
            reader.start()
            for i in range(0, len(payload), 10_000):  # many small writes, read back while sending
                sock.sendall(payload[i:i + 10_000])
            reader.join(TIMEOUT)
            assert not reader.is_alive()
            assert received and received[0] == payload
            sock.shutdown(socket.SHUT_WR)  # the EOF passes through, and the server's back
            assert sock.recv(1) == b""


def test_delay_gives_the_round_trip(echo):
    with Link(echo.port, delay_ms=20) as link:
        with dial(link) as sock:
            sock.sendall(b"warm")
            assert recv_exactly(sock, 4) == b"warm"
            rtts = []
            for i in range(5):
                message = f"ping {i}".encode()
                t0 = time.perf_counter()
                sock.sendall(message)
                assert recv_exactly(sock, len(message)) == message
                rtts.append(time.perf_counter() - t0)
        assert min(rtts) >= 0.040, rtts
        assert max(rtts) < 0.040 + 0.150, rtts
        count, mean, _ = link.lateness()
        assert count >= 12 and mean < 0.010


def test_delay_is_a_pipeline_not_per_chunk(echo):
    # 50 separate messages sent 1 ms apart through a 20 ms link: serialising the
    # delay per chunk would take 50 x 40 ms; a pipeline about 40 ms + 50 ms
    with Link(echo.port, delay_ms=20) as link:
        with dial(link) as sock:
            t0 = time.perf_counter()
            for _ in range(50):
                sock.sendall(b"x" * 100)
                time.sleep(0.001)  # pacing the sender, not synchronisation
            recv_exactly(sock, 5000)
            elapsed = time.perf_counter() - t0
    assert 0.040 <= elapsed < 0.5, elapsed


def test_rate_limits_throughput(echo):
    size = 200_000
    with Link(echo.port, delay_ms=0, rate_mbit=8) as link:  # 8 Mbit/s: 1 MB/s
        with dial(link) as sock:
            t0 = time.perf_counter()
            received: list[bytes] = []
            reader = threading.Thread(target=lambda: received.append(recv_exactly(sock, size)))
            reader.start()
            sock.sendall(b"y" * size)
            reader.join(TIMEOUT)
            elapsed = time.perf_counter() - t0
            assert not reader.is_alive()
    assert received[0] == b"y" * size
    # both directions serialise 200 KB at 1 MB/s, overlapped: at least 0.2 s
    assert 0.18 <= elapsed < 3.0, elapsed


def test_close_cuts_tunnels_and_ends_the_thread(echo):
    link = Link(echo.port, delay_ms=5).start()
    sock = dial(link)
    with sock:
        sock.sendall(b"abc")
        assert recv_exactly(sock, 3) == b"abc"
        t0 = time.perf_counter()
        link.close()
        assert time.perf_counter() - t0 < 5.0
        assert not link._thread.is_alive()
        try:
            assert sock.recv(1) == b""  # cut: EOF or reset, not a hang
        except ConnectionResetError:
            pass
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", link.port), timeout=2).close()


def test_target_down_closes_the_client():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused
        with Link(port, delay_ms=0) as link:
            with dial(link) as sock:
                try:
                    assert sock.recv(1) == b""
                except ConnectionResetError:
                    pass
