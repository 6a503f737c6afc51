"""Trainer-side overhead of one batched step, next to bare round trips of the same size.

Six round trips between this process (the trainer side) and one other
process on loopback, measured in one run, interleaved, same message sizes:

``ws_gym``
    ``RemoteVectorEnv(1, env_id="ws_gym/NoOp-v0", local_workers=1).step(a)``:
    the whole call, as a training loop sees it (encode, WebSocket frames both
    ways, the worker's decode + env step + encode, decode, checks and batch
    assembly). The env does nothing, so this is ws_gym's per-step cost plus
    the transport. With the defaults, where one local worker leaves a core
    spare, the caller reads its replies itself and the worker busy-polls (see
    the README). A second row measures ``busy_poll=False``: the loop thread
    reads and everyone sleeps while waiting, as in the baselines.
``aiohttp hand-off, client = ws_gym's worker code``
    The topology below, but the client process does what a ws_gym worker
    does with each frame (``Worker.answer``: decode, ``EnvHost.handle`` of a
    NoOp env, encode): against it, ws_gym's ratio isolates the trainer side.
``aiohttp, thread hand-off``
    The same topology with nothing of ws_gym's: an aiohttp WebSocket server
    on an event loop in a background thread of this process; the caller's
    thread hands each send to the loop (``call_soon_threadsafe`` +
    ``create_task(ws.send_bytes(...))``) and blocks on a ``threading.Lock``
    that the loop's reader releases when the reply frame arrives; the client
    is another process (aiohttp ``ws_connect``, same options as the ws_gym
    worker) that answers every frame with a frame of the reply's size. This is
    the fair baseline: ws_gym's own design on documented aiohttp API, minus
    ws_gym.
``aiohttp, in the loop``
    The same server and client, but the round trips are driven by a coroutine
    on the loop thread (``await ws.send_bytes(...)``; ``await ws.receive()``):
    no thread hand-off at all. The classic "bare aiohttp echo".
``raw TCP``
    Blocking sockets (``TCP_NODELAY``), the caller's thread writes the request
    bytes and reads exactly the reply's bytes; the other process echoes with a
    reply of that size. No WebSocket framing, no event loop: the floor.

The request and reply sizes are those of ws_gym's own step frames for this
env (compact frames, ``ws_gym/compact.py``; printed). Event loops are the ones ws_gym uses (uvloop when installed,
``WS_GYM_UVLOOP=0`` for asyncio's), on both sides, for every case.

Columns: wall-clock microseconds per round trip (median over repetitions),
and this process's CPU microseconds per round trip (``time.process_time``:
all its threads, so the loop thread too). The ratio ws_gym / aiohttp with
hand-off is the trainer-side overhead (target: <= 1.3).

    python benchmarks/overhead.py            # 9 rounds of 2000 round trips per case, < 1 min
    python benchmarks/overhead.py --quick    # smoke test, < 20 s
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

CLIENT_FLAG = "--echo-client"


# ---------------------------------------------------------------- the other process


def echo_client(kind: str, address: str, request_size: int, reply_size: int) -> None:
    """Answer every request with ``reply_size`` bytes until the connection ends."""
    reply = bytes(reply_size)
    if kind == "tcp":
        host, port = address.rsplit(":", 1)
        sock = socket.create_connection((host, int(port)))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = bytearray(request_size)
        view = memoryview(buf)
        while True:
            got = 0
            while got < request_size:
                n = sock.recv_into(view[got:])
                if n == 0:
                    return
                got += n
            sock.sendall(reply)
    import aiohttp

    from ws_gym import loops

    answer = None  # None: a fixed reply; else a function of the request
    if kind == "aiohttp-worker":  # do what a ws_gym worker does with each frame
        from ws_gym import codec
        from ws_gym import protocol as P
        from ws_gym.host import EnvHost

        host = EnvHost(P.Welcome(env_id="ws_gym/NoOp-v0", env_kwargs={}, num_envs=1, first_index=0,
                                 mode=P.MODE_VECTOR, autoreset_mode="NextStep", max_episode_steps=None))
        host.handle(P.RESET, {"seeds": [0]})
        from ws_gym.worker import Worker

        def work(data: bytes) -> bytes:  # the worker's own answer: compact frames in and out
            return Worker.answer(host, data)[0]

        answer = work

    async def run() -> None:
        async with aiohttp.ClientSession() as session:
            # the options ws_gym's worker uses
            async with session.ws_connect(address, compress=0, autoping=True, autoclose=True,
                                          max_msg_size=256 * 1024 * 1024) as ws:
                receive, send = ws.receive, ws.send_bytes
                binary = aiohttp.WSMsgType.BINARY
                while True:
                    msg = await receive()
                    if msg.type != binary:
                        return
                    await send(reply if answer is None else answer(msg.data))

    loops.run(run())


def start_client(kind: str, address: str, request_size: int, reply_size: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), CLIENT_FLAG, kind, address,
                             str(request_size), str(reply_size)])


def stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------- this process's sides


class AiohttpServer:
    """An aiohttp WebSocket server on a loop thread; one client process connects."""

    def __init__(self, request: bytes, reply_size: int, client: str = "aiohttp") -> None:
        import asyncio

        from aiohttp import web

        from ws_gym import loops

        self.request = request
        self.reply_size = reply_size
        self.loop = loops.new_event_loop()
        self.loop_name = loops.loop_name(self.loop)
        self.thread = threading.Thread(target=self.loop.run_forever, name="aiohttp-baseline", daemon=True)
        self.thread.start()
        self.lock = threading.Lock()
        self.lock.acquire()
        self.connected = threading.Event()
        self.jobs: asyncio.Queue | None = None
        self.ws = None

        async def handler(request):
            ws = web.WebSocketResponse(compress=False, autoping=True, max_msg_size=256 * 1024 * 1024)
            await ws.prepare(request)
            self.ws = ws
            self.jobs = asyncio.Queue()
            self.connected.set()
            while True:  # the only reader of ws, in every mode
                job, n, done = await self.jobs.get()
                if job == "stop":
                    break
                try:
                    done.set_result(await job(ws, n))
                except BaseException as exc:  # noqa: BLE001 - reported to the caller
                    done.set_exception(exc)
            await ws.close()
            return ws

        async def start():
            app = web.Application()
            app.router.add_get("/ws", handler)
            runner = web.AppRunner(app, access_log=None, handle_signals=False)
            await runner.setup()
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            await web.SockSite(runner, sock).start()
            return runner, sock.getsockname()[1]

        self.runner, port = asyncio.run_coroutine_threadsafe(start(), self.loop).result(30)
        self.url = f"ws://127.0.0.1:{port}/ws"
        self.client = start_client(client, self.url, len(request), reply_size)
        if not self.connected.wait(60):
            raise RuntimeError("the aiohttp echo client did not connect")

    def _submit(self, job, n: int) -> "_FutureHandle":
        """Queue ``job(ws, n)`` for the handler (the only reader of the socket)."""
        import asyncio

        async def submit():
            fut = self.loop.create_future()
            self.jobs.put_nowait((job, n, fut))
            return _FutureHandle(fut)

        return asyncio.run_coroutine_threadsafe(submit(), self.loop).result(30)

    def in_loop(self, n: int) -> tuple[float, float]:
        """n round trips driven by a coroutine on the loop thread: (wall s, cpu s)."""
        request = self.request

        async def job(ws, n):
            send, receive, size = ws.send_bytes, ws.receive, self.reply_size
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(n):
                await send(request)
                msg = await receive()
                if len(msg.data) != size:  # a close or error message, not a reply
                    raise RuntimeError(f"the echo client sent {msg.type.name} {msg.data!r}")
            return time.perf_counter() - t0, time.process_time() - c0

        return self._submit(job, n).result(600)

    def handed_off(self, n: int) -> tuple[float, float]:
        """n round trips from this (caller's) thread, each handed to the loop thread."""
        lock, loop, request = self.lock, self.loop, self.request

        async def reader(ws, n):
            receive, release, size = ws.receive, lock.release, self.reply_size
            for _ in range(n):
                msg = await receive()
                if len(msg.data) != size:
                    raise RuntimeError(f"the echo client sent {msg.type.name} {msg.data!r}")
                release()

        reading = self._submit(reader, n)
        ws = self.ws

        def send():
            loop.create_task(ws.send_bytes(request))

        c0, t0 = time.process_time(), time.perf_counter()
        for _ in range(n):
            loop.call_soon_threadsafe(send)
            lock.acquire()
        result = time.perf_counter() - t0, time.process_time() - c0
        reading.result(30)
        return result

    def close(self) -> None:
        import asyncio

        async def shutdown():
            if self.jobs is not None:
                self.jobs.put_nowait(("stop", 0, None))
            await self.runner.cleanup()

        try:
            asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(10)
        except Exception:  # noqa: BLE001 - shutting down regardless
            pass
        stop(self.client)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class _FutureHandle:
    """Waits, from another thread, for a future of the loop thread."""

    def __init__(self, fut) -> None:
        self._fut = fut
        self._done = threading.Event()
        fut.add_done_callback(lambda _: self._done.set())

    def result(self, timeout: float):
        if not self._done.wait(timeout):
            raise TimeoutError("the aiohttp reader did not finish")
        return self._fut.result()


class TcpServer:
    """A listening socket here; the echo client process connects to it."""

    def __init__(self, request: bytes, reply_size: int) -> None:
        self.request = request
        self.reply_size = reply_size
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(60)
        self.client = start_client("tcp", "127.0.0.1:%d" % listener.getsockname()[1], len(request), reply_size)
        self.sock, _ = listener.accept()
        listener.close()
        self.sock.settimeout(None)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = memoryview(bytearray(reply_size))

    def round_trips(self, n: int) -> tuple[float, float]:
        sock, request, buf, size = self.sock, self.request, self.buf, self.reply_size
        sendall, recv_into = sock.sendall, sock.recv_into
        c0, t0 = time.process_time(), time.perf_counter()
        for _ in range(n):
            sendall(request)
            got = 0
            while got < size:
                n = recv_into(buf[got:])
                if not n:
                    raise ConnectionError("the TCP echo client went away")
                got += n
        return time.perf_counter() - t0, time.process_time() - c0

    def close(self) -> None:
        self.sock.close()
        stop(self.client)


# ---------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2000, help="timed round trips per case and repetition (default 2000)")
    p.add_argument("--warmup", type=int, default=300, help="untimed round trips first (default 300)")
    p.add_argument("--repeats", type=int, default=9, help="interleaved rounds; medians are reported (default 9)")
    p.add_argument("--quick", action="store_true", help="smoke test: 500 round trips, 100 warm-up, 3 repetitions")
    args = p.parse_args()
    if args.quick:
        args.steps, args.warmup, args.repeats = 500, 100, 3
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1:
        p.error("--steps and --repeats must be >= 1, --warmup >= 0")
    return args


def main() -> int:
    args = parse_args()
    import logging

    import gymnasium as gym
    import numpy as np

    import ws_gym
    from ws_gym import loops

    logging.basicConfig(level=logging.WARNING)

    # ws_gym's own step frames for this env (compact frames: ws_gym/compact.py); the
    # baselines send exactly these sizes.
    from ws_gym.compact import layout_for
    from ws_gym.spaces import space_to_schema

    action = np.zeros(1, np.int64)
    probe = gym.make("ws_gym/NoOp-v0")
    layout = layout_for(space_to_schema(probe.observation_space), space_to_schema(probe.action_space), 1, False)
    result = {"o": np.zeros((1, *probe.observation_space.shape), probe.observation_space.dtype),
              "r": np.zeros(1, np.float64), "t": np.zeros(1, np.bool_), "u": np.zeros(1, np.bool_), "f": []}
    probe.close()
    request = layout.encode_request(1_000_000, action)
    reply_size = len(layout.encode_reply(1_000_000, result))

    print(f"python {sys.version.split()[0]}, ws_gym {ws_gym.__version__}, event loop "
          f"{loops.loop_name(loops.new_event_loop())}; load average "
          f"{[round(x, 2) for x in os.getloadavg()] if hasattr(os, 'getloadavg') else '?'}")
    print(f"request {len(request)} B, reply {reply_size} B (ws_gym's compact step frames for 1 x ws_gym/NoOp-v0); "
          f"{args.steps} timed round trips after {args.warmup} warm-up, {args.repeats} interleaved repetitions\n",
          flush=True)

    started = time.perf_counter()
    envs = plain = aio = aio_worker = tcp = None
    try:
        envs = ws_gym.RemoteVectorEnv(1, env_id="ws_gym/NoOp-v0", port=0, local_workers=1, connect_timeout=120)
        envs.reset(seed=0)
        plain = ws_gym.RemoteVectorEnv(1, env_id="ws_gym/NoOp-v0", port=0, local_workers=1, connect_timeout=120,
                                       busy_poll=False)
        plain.reset(seed=0)
        polling = "on" if envs._trainer.busy_poll else "off"
        aio = AiohttpServer(request, reply_size)
        aio_worker = AiohttpServer(request, reply_size, client="aiohttp-worker")
        tcp = TcpServer(request, reply_size)

        def stepping(env):
            def ours(n: int) -> tuple[float, float]:
                step = env.step
                c0, t0 = time.process_time(), time.perf_counter()
                for _ in range(n):
                    step(action)
                return time.perf_counter() - t0, time.process_time() - c0
            return ours

        cases = {
            f"ws_gym RemoteVectorEnv.step (NoOp, busy poll {polling})": stepping(envs),
            "ws_gym, busy_poll=False": stepping(plain),
            "aiohttp hand-off, client = ws_gym's worker code": aio_worker.handed_off,
            "aiohttp, thread hand-off (same topology)": aio.handed_off,
            "aiohttp, in the loop (no hand-off)": aio.in_loop,
            "raw TCP, blocking sockets": tcp.round_trips,
        }
        walls: dict[str, list[float]] = {name: [] for name in cases}
        cpus: dict[str, list[float]] = {name: [] for name in cases}
        for rep in range(args.repeats):
            for name, run in cases.items():
                if args.warmup:
                    run(args.warmup)
                wall, cpu = run(args.steps)
                walls[name].append(wall / args.steps * 1e6)
                cpus[name].append(cpu / args.steps * 1e6)
                print(f"  round {rep + 1}/{args.repeats}  {name:<46} {walls[name][-1]:8.1f} us", flush=True)
    finally:
        for side in (tcp, aio, aio_worker):
            if side is not None:
                side.close()
        for env in (envs, plain):
            if env is not None:
                env.close()

    med = {name: statistics.median(v) for name, v in walls.items()}
    cpu = {name: statistics.median(v) for name, v in cpus.items()}
    width = max(len(n) for n in cases)
    print()
    best = {name: min(v) for name, v in walls.items()}
    print(f"{'round trip':<{width}}  {'us (wall)':>9}  {'best':>6}  {'trainer CPU us':>14}  repetitions (us)")
    print("-" * (width + 70))
    for name in cases:
        print(f"{name:<{width}}  {med[name]:9.1f}  {best[name]:6.1f}  {cpu[name]:14.1f}  "
              + ", ".join(f"{x:.1f}" for x in walls[name]))
    names = list(cases)
    ours_name, no_poll, with_worker, handoff, in_loop, raw = names
    print()
    print("ratios of medians (wall; of the best repetitions in brackets, less sensitive to other load):")
    print(f"  ws_gym / (hand-off + worker code)  {med[ours_name] / med[with_worker]:5.2f}x ({best[ours_name] / best[with_worker]:4.2f}x)   "
          "(the trainer side alone: same worker work on both sides)")
    print(f"    busy_poll=False / (same)         {med[no_poll] / med[with_worker]:5.2f}x ({best[no_poll] / best[with_worker]:4.2f}x)")
    print(f"  ws_gym / aiohttp with hand-off     {med[ours_name] / med[handoff]:5.2f}x ({best[ours_name] / best[handoff]:4.2f}x)   (target <= 1.3)")
    print(f"    busy_poll=False / (same)         {med[no_poll] / med[handoff]:5.2f}x ({best[no_poll] / best[handoff]:4.2f}x)   "
          "(like the baselines, nobody spins)")
    print(f"  ws_gym / aiohttp in the loop       {med[ours_name] / med[in_loop]:5.2f}x ({best[ours_name] / best[in_loop]:4.2f}x)")
    print(f"  ws_gym / raw TCP                   {med[ours_name] / med[raw]:5.2f}x ({best[ours_name] / best[raw]:4.2f}x)")
    print(f"  aiohttp hand-off / in the loop     {med[handoff] / med[in_loop]:5.2f}x ({best[handoff] / best[in_loop]:4.2f}x)   (the cost of the thread hand-off)")
    print(f"ws_gym's own share above the bare hand-off round trip: {med[ours_name] - med[handoff]:.1f} us wall "
          f"({med[with_worker] - med[handoff]:.1f} us of it the worker's decode + step + encode); "
          f"trainer CPU {cpu[ours_name] - cpu[handoff]:.1f} us per step")
    print(f"measured in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == CLIENT_FLAG:
        try:
            echo_client(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
        except (ConnectionError, KeyboardInterrupt):
            pass
        sys.exit(0)
    sys.exit(main())
