"""A small HTTP CONNECT proxy for tests (asyncio, standard library only).

It answers ``CONNECT host:port`` with ``200 Connection established`` and
splices bytes both ways, like an office proxy in front of a ``wss://`` trainer.
A test proxy must never reach the outside: it connects only to targets on its
allow-list (127.0.0.1 and localhost, plus the addresses given), and a name on
the list only to loopback or listed addresses; any other target gets 403.
With ``auth`` (``user:password``) a CONNECT without those Basic credentials
gets 407 and ``Proxy-Authenticate``. Anything but CONNECT gets 405; a target
that does not answer, 502. Request heads are bounded, and every wait has a
timeout.

In a test::

    proxy = ConnectProxy(auth="user:secret").start()   # its own thread and loop
    ... proxy.port, proxy.tunnels, proxy.refused ...
    proxy.close()

As a process (a network namespace's test runs it there)::

    python -m tests.connect_proxy --host 127.0.0.1 --port 0 [--auth user:pass] [--allow 10.0.0.2]

prints ``connect-proxy listening on HOST:PORT`` (flushed) and serves until
SIGTERM or SIGINT, one line per request on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hmac
import ipaddress
import signal
import socket
import sys
import threading
from typing import Callable, Iterable

DEFAULT_ALLOW = ("127.0.0.1", "localhost")
MAX_HEAD = 16 * 1024  # bytes of request line and headers
HEAD_TIMEOUT = 10.0  # seconds for a client to send its request head
CONNECT_TIMEOUT = 5.0  # seconds to resolve and reach a target
IDLE_TIMEOUT = 600.0  # seconds a tunnel may carry nothing either way
REASONS = {200: "Connection established", 400: "Bad Request", 403: "Forbidden", 405: "Method Not Allowed",
           407: "Proxy Authentication Required", 431: "Request Header Fields Too Large", 502: "Bad Gateway"}


class ConnectProxy:
    """An HTTP CONNECT proxy on ``host:port`` (port 0: any free one, see ``.port``).

    ``allow``: targets allowed besides 127.0.0.1 and localhost. ``sock``: a
    socket bound already (listening or not), served instead of binding ``host``
    and ``port``: a test can hold a port, refusing connections, then start the
    proxy on it. Counters, read from any thread: ``tunnels`` (CONNECTs answered
    200), ``refused`` (requests answered otherwise), ``statuses`` (each refusal's
    status) and ``requests`` (each request line, in order).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, auth: str | None = None,
                 allow: Iterable[str] = (), sock: socket.socket | None = None,
                 idle_timeout: float = IDLE_TIMEOUT, log: Callable[[str], None] | None = None) -> None:
        self.host, self.port = host, port
        self.allow = {_bare(a) for a in (*DEFAULT_ALLOW, *allow)}
        if auth is not None and ":" not in auth:
            raise ValueError("auth must be user:password")
        self._expected = None if auth is None else "Basic " + base64.b64encode(auth.encode()).decode()
        self._sock = sock
        self.idle_timeout = idle_timeout
        self._log = log
        self.tunnels = 0
        self.refused = 0
        self.statuses: list[int] = []
        self.requests: list[str] = []
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ in a thread

    def start(self, timeout: float = 10.0) -> ConnectProxy:
        """Serve on a thread with its own event loop; return once listening."""
        ready = threading.Event()
        failed: list[BaseException] = []

        def run() -> None:
            loop = self._loop = asyncio.new_event_loop()
            try:
                loop.run_until_complete(self.listen())
            except BaseException as exc:
                failed.append(exc)
                loop.close()
                ready.set()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self.aclose())
                loop.close()

        self._thread = threading.Thread(target=run, name="connect-proxy", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise TimeoutError(f"the CONNECT proxy did not start within {timeout} s")
        if failed:
            raise failed[0]
        return self

    def close(self, timeout: float = 10.0) -> None:
        """Stop serving and cut every tunnel (from the thread that called start)."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)

    def __enter__(self) -> ConnectProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------ in a loop

    async def listen(self) -> None:
        """Start listening in the running loop; ``.port`` is then the real port."""
        if self._sock is not None:
            self._server = await asyncio.start_server(self._handle, sock=self._sock, limit=MAX_HEAD)
        else:
            self._server = await asyncio.start_server(self._handle, self.host, self.port, limit=MAX_HEAD)
        self.port = self._server.sockets[0].getsockname()[1]

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        if self._server is not None:
            try:
                await asyncio.wait_for(self._server.wait_closed(), 5)
            except asyncio.TimeoutError:
                pass
        await asyncio.sleep(0)  # let the closed transports finish before the loop goes

    # ------------------------------------------------------------ one client

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        upstream: asyncio.StreamWriter | None = None
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
            except asyncio.LimitOverrunError:
                await self._answer(writer, 431, "-")
                return
            except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
                return
            lines = head.decode("latin-1").split("\r\n")
            request = lines[0]
            self.requests.append(request)
            parts = request.split(" ")
            if len(parts) != 3 or not parts[2].startswith("HTTP/"):
                await self._answer(writer, 400, request)
                return
            method, target, _ = parts
            if method != "CONNECT":
                await self._answer(writer, 405, request, ["Allow: CONNECT"])
                return
            headers = {}
            for line in lines[1:]:
                name, sep, value = line.partition(":")
                if sep:
                    headers[name.strip().lower()] = value.strip()
            if self._expected is not None and not hmac.compare_digest(
                    headers.get("proxy-authorization", "").encode(), self._expected.encode()):
                await self._answer(writer, 407, request, ['Proxy-Authenticate: Basic realm="connect-proxy"'])
                return
            host, _, port_text = target.rpartition(":")
            host = _bare(host)
            if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
                await self._answer(writer, 400, request)
                return
            if host not in self.allow:
                await self._answer(writer, 403, request)
                return
            try:
                up_reader, up_writer = await asyncio.wait_for(self._dial(host, int(port_text)), CONNECT_TIMEOUT)
            except (OSError, asyncio.TimeoutError):
                await self._answer(writer, 502, request)
                return
            upstream = up_writer
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            self.tunnels += 1
            self._say(f"{request} -> 200")
            await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))
        except (ConnectionError, asyncio.TimeoutError):
            pass
        except asyncio.CancelledError:  # closing: end quietly (Python 3.11's streams log a cancelled handler)
            pass
        finally:
            for w in (writer, upstream):
                if w is not None:
                    w.close()
            self._tasks.discard(task)

    async def _dial(self, host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Connect to an allowed target: a listed name only to loopback or listed addresses."""
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        error: OSError = OSError(f"{host} resolves to no allowed address")
        for *_, sockaddr in infos:
            address = str(sockaddr[0])
            ip = ipaddress.ip_address(address.partition("%")[0])
            if not (ip.is_loopback or address in self.allow):
                continue
            try:
                return await asyncio.open_connection(address, port)
            except OSError as exc:
                error = exc
        raise error

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await asyncio.wait_for(src.read(65536), self.idle_timeout)
                if not data:
                    break
                dst.write(data)
                await asyncio.wait_for(dst.drain(), self.idle_timeout)
            if dst.can_write_eof():
                dst.write_eof()  # half close: the other direction may still carry the end
        except (ConnectionError, asyncio.TimeoutError, OSError):
            dst.close()

    async def _answer(self, writer: asyncio.StreamWriter, status: int, request: str,
                      headers: Iterable[str] = ()) -> None:
        self.refused += 1
        self.statuses.append(status)
        self._say(f"{request} -> {status}")
        head = [f"HTTP/1.1 {status} {REASONS[status]}", *headers, "Content-Length: 0", "Connection: close", "", ""]
        writer.write("\r\n".join(head).encode("latin-1"))
        try:
            await asyncio.wait_for(writer.drain(), HEAD_TIMEOUT)
        except (ConnectionError, asyncio.TimeoutError):
            pass

    def _say(self, line: str) -> None:
        if self._log is not None:
            self._log(line)


def _bare(host: str) -> str:
    """A host as the allow-list holds it: lowercase, no IPv6 brackets."""
    return host.strip().strip("[]").lower()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.connect_proxy", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (default 0: any free one)")
    parser.add_argument("--auth", default=None, metavar="USER:PASS", help="require these Basic credentials (407)")
    parser.add_argument("--allow", action="append", default=[], metavar="ADDRESS",
                        help="also allow CONNECTs to this host (127.0.0.1 and localhost always are); repeatable")
    parser.add_argument("--idle-timeout", type=float, default=IDLE_TIMEOUT, help="seconds a silent tunnel lives")
    args = parser.parse_args(argv)

    async def serve() -> None:
        proxy = ConnectProxy(args.host, args.port, auth=args.auth, allow=args.allow, idle_timeout=args.idle_timeout,
                             log=lambda line: print(f"connect-proxy: {line}", file=sys.stderr, flush=True))
        await proxy.listen()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError):  # Windows: Ctrl+C raises KeyboardInterrupt
                pass
        host = f"[{args.host}]" if ":" in args.host else args.host
        print(f"connect-proxy listening on {host}:{proxy.port}", flush=True)
        try:
            await stop.wait()
        finally:
            await proxy.aclose()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
