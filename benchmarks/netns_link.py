"""Worker links through Linux network namespaces: real kernel TCP, a delay and a rate per worker.

The root-only counterpart of ``netlink.py``'s ``Link``: instead of a TCP relay
on 127.0.0.1, every process has its own network stack, as on separate
machines, and the link in between delays (and optionally rate-limits) the
frames themselves, so nothing goes over loopback. The namespaces are
tests/netns.py's ``Topology`` (hub H with a bridge, trainer T at 10.213.0.1)
with ``workers`` worker namespaces W0, W1, ... at 10.213.0.2, .3, ...; each
worker's link to the bridge gets its own one-way delay (each direction, so the
trainer-worker RTT is twice it) and optional rate (Mbit/s, each direction):
``tc netem`` where the kernel has sch_netem, else the user-space delay line of
tests/netns.py (``python -m tests.netns relay``) between the worker's veth and
the bridge. The 10.213.0.0/24 addresses exist only inside these namespaces.

``NetnsLinks.create()`` first deletes the namespaces of killed runs, and
``close()`` (also at exit) kills what runs inside and deletes every namespace,
veth and delay line; the caller ends a run on SIGTERM as on Ctrl-C (raise
KeyboardInterrupt) so its ``finally`` runs::

    net = NetnsLinks(workers=2).create()
    try:
        net.set_links(delay_ms=20, rate_mbit=20)     # RTT 40 ms, 20 Mbit/s each way
        net.enter("t")                               # this process's sockets are T's from now on
        envs = gym.make_vec("ws_gym/Remote-v0", num_envs=8, env_id="CartPole-v1",
                            host=net.trainer_host, port=0)
        url = envs.unwrapped.url                     # ws://10.213.0.1:PORT/ws
        argv = net.worker_argv(0, [sys.executable, "-m", "ws_gym.worker", "--url", url, ...])
        ... start argv with WS_GYM_TOKEN=envs.unwrapped.token in its environment ...
    finally:
        net.close()

Demo and measurement of the link (delay-line lateness, RTT, throughput)::

    sudo python -m benchmarks.netns_link --selftest             # from the checkout's root
    sudo python benchmarks/netns_link.py --selftest --delays 5 20 40 --rate 20 --method relay
    sudo python benchmarks/netns_link.py --hold --workers 3 --delay 20   # prints the `ip netns exec` prefixes
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # tests.netns (and ws_gym) from this checkout

from tests import netns  # noqa: E402

CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/run/netns")  # where `ip netns add` binds a namespace's handle


def unavailable() -> str | None:
    """Why namespaced links cannot be made here (None when they can)."""
    return netns.unavailable()


def _setns(fd: int) -> None:
    """Move the calling thread into the network namespace of ``fd`` (os.setns is Python >= 3.12)."""
    if hasattr(os, "setns"):
        os.setns(fd, CLONE_NEWNET)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


class NetnsLinks:
    """A trainer namespace T and ``workers`` worker namespaces, each behind its own link.

    Worker ``i`` is role ``w<i>`` of the topology (namespace ``.ns(i)``,
    address ``.worker_host(i)``); ``"t"`` is the trainer. ``method``: "auto"
    (netem where the kernel has it, else the delay line), "relay" or "netem".
    One instance per process at a time (the namespace names carry the pid).
    """

    def __init__(self, workers: int = 2, method: str = "auto") -> None:
        if not 1 <= workers <= 250:
            raise ValueError(f"workers must be 1-250, got {workers}")
        if method not in ("auto", "relay", "netem"):
            raise ValueError(f"method must be 'auto', 'relay' or 'netem', got {method!r}")
        self.topo = netns.Topology.for_this_process("n", [f"w{i}" for i in range(workers)])
        self.method = method
        self.links: dict[str, tuple[float, float | None]] = {}  # role -> (delay_ms, rate_mbit) now impaired
        self.how: dict[str, str] = {}  # role -> "netem" or "relay"
        self.logdir: Path | None = None
        self._home: int | None = None  # fd of the namespace this thread left by enter()
        self._created = False

    # ------------------------------------------------------------------ names and commands

    @property
    def workers(self) -> int:
        return len(self.topo.workers)

    @property
    def trainer_host(self) -> str:
        """T's address: the trainer listens there (``host=``), the workers dial it."""
        return self.topo.addr("t")

    def role(self, who: int | str) -> str:
        """Worker index ``i`` -> its topology role ``w<i>``; ``"t"`` stays."""
        return who if isinstance(who, str) else self.topo.workers[who]

    def ns(self, who: int | str) -> str:
        """The namespace name of worker ``who`` (an index) or of ``"t"``."""
        return self.topo.ns(self.role(who))

    def worker_host(self, i: int) -> str:
        return self.topo.addr(self.role(i))

    def exec_argv(self, who: int | str, argv: list[str]) -> list[str]:
        """``argv`` run inside worker ``who``'s namespace (or ``"t"``): ``ip netns exec NS ...``."""
        return self.topo.exec_argv(self.role(who), argv)

    def worker_argv(self, i: int, argv: list[str]) -> list[str]:
        return self.exec_argv(i, argv)

    def trainer_argv(self, argv: list[str]) -> list[str]:
        return self.exec_argv("t", argv)

    def to_dict(self) -> dict:
        """For a process re-run inside T (``trainer_argv``): its ``from_dict`` names the same namespaces."""
        return {"topology": self.topo.to_dict(), "method": self.method}

    @classmethod
    def from_dict(cls, d: dict) -> NetnsLinks:
        """The namespaces another process made (it creates, impairs and closes them)."""
        net = cls(len(d["topology"]["workers"]), d["method"])
        net.topo = netns.Topology.from_dict(d["topology"])
        return net

    # ------------------------------------------------------------------ life cycle

    def create(self) -> NetnsLinks:
        """Remove stale namespaces of killed runs, build T and the workers; no link impaired yet."""
        if self._created:
            raise RuntimeError("already created")
        reason = unavailable()
        if reason:
            raise RuntimeError(f"network namespaces unavailable: {reason}")
        self._created = True
        atexit.register(self.close)
        self.logdir = Path(tempfile.mkdtemp(prefix="ws_gym_netns_link_"))
        try:
            self.topo.create()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> dict[str, dict | None]:
        """Leave T (if entered), stop the delay lines, kill every process inside and
        delete every namespace, veth and bridge; never raises. Returns the delay
        lines' last counters by role."""
        stats: dict[str, dict | None] = {}
        if not self._created:
            return stats
        self._created = False
        with contextlib.suppress(Exception):
            self.leave()
        for role in list(self.links):
            with contextlib.suppress(Exception):
                stats[role] = self.topo.unimpair(role)
        self.links.clear()
        self.how.clear()
        self.topo.destroy()
        if self.logdir is not None:
            shutil.rmtree(self.logdir, ignore_errors=True)
        atexit.unregister(self.close)
        return stats

    def __enter__(self) -> NetnsLinks:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def leftovers(self) -> list[str]:
        """Namespaces of this instance that still exist (none after ``close``)."""
        out = netns.run(["ip", "netns", "list"])
        return [line.split()[0] for line in out.splitlines()
                if line.split() and line.split()[0] in self.topo.names.values()]

    # ------------------------------------------------------------------ the links

    def set_link(self, i: int, delay_ms: float, rate_mbit: float | None = None) -> dict | None:
        """Worker ``i``'s link: ``delay_ms`` one way (each direction) and an
        optional rate (Mbit/s, each direction); 0 and None: a plain bridge port.
        Replaces the link's previous setting (restarting its delay line, which
        cuts nothing: frames are only held while no connection is expected)
        and returns that delay line's counters, if one ran."""
        if delay_ms < 0 or (rate_mbit is not None and rate_mbit <= 0):
            raise ValueError("delay_ms must be >= 0 and rate_mbit > 0 (or None)")
        role = self.role(i)
        want = (float(delay_ms), rate_mbit)
        if self.links.get(role, (0.0, None)) == want:
            return None
        stats = None
        if role in self.links:
            del self.links[role]
            self.how.pop(role, None)
            stats = self.topo.unimpair(role)
        if delay_ms or rate_mbit:
            assert self.logdir is not None, "create() first"
            self.links[role] = want
            self.how[role] = self.topo.impair(role, delay_ms, 0, self.logdir, rate_mbit=rate_mbit,
                                              method=self.method)
        return stats

    def set_links(self, delay_ms: float, rate_mbit: float | None = None) -> list[dict | None]:
        """``set_link`` for every worker."""
        return [self.set_link(i, delay_ms, rate_mbit) for i in range(self.workers)]

    def lateness(self, i: int) -> tuple[int, float, float]:
        """(frames delivered, mean and max seconds after their due time) of worker
        ``i``'s delay line so far, as ``netlink.Link.lateness``; zeros for
        netem or an unimpaired link (they report none)."""
        stats = self.topo.relay_stats(self.role(i))
        if not stats:
            return 0, 0.0, 0.0
        return stats["late_n"], stats["late_mean_ms"] / 1000, stats["late_max_ms"] / 1000

    def relay_stats(self, i: int) -> dict | None:
        """Worker ``i``'s delay line counters (forwarded, overflow, lateness...), None without one."""
        return self.topo.relay_stats(self.role(i))

    # ------------------------------------------------------------------ this process inside a namespace

    def enter(self, who: int | str = "t") -> None:
        """Move this thread into ``who``'s namespace until ``leave``: sockets made
        meanwhile (and by threads started meanwhile) are that namespace's, and
        stay so. For a trainer, enter "t" before making the env; no re-exec.
        One thread of a process enters at a time (the way back is kept here)."""
        if self._home is not None:
            raise RuntimeError("entered already; leave() first")
        home = os.open(f"/proc/{os.getpid()}/task/{threading.get_native_id()}/ns/net", os.O_RDONLY)
        target = os.open(NETNS_DIR / self.ns(who), os.O_RDONLY)
        try:
            _setns(target)
        except BaseException:
            os.close(home)
            raise
        finally:
            os.close(target)
        self._home = home

    def leave(self) -> None:
        """Back to the namespace ``enter`` left (a no-op when not entered)."""
        if self._home is None:
            return
        home, self._home = self._home, None
        try:
            _setns(home)
        finally:
            os.close(home)

    @contextlib.contextmanager
    def inside(self, who: int | str = "t") -> Iterator[None]:
        """``enter`` for a block; ``leave`` after it."""
        self.enter(who)
        try:
            yield
        finally:
            self.leave()


# ---------------------------------------------------------------------------- measurements

_STAMP = struct.Struct("!dI")  # send time (monotonic; one clock: both ends are this process), sequence


def _pair(net: NetnsLinks, i: int, timeout: float = 10.0) -> tuple[socket.socket, socket.socket]:
    """A TCP connection from worker ``i``'s namespace to T's: (worker end, trainer end)."""
    with net.inside("t"):
        server = socket.create_server((net.trainer_host, 0))
    try:
        port = server.getsockname()[1]
        server.settimeout(timeout)
        with net.inside(i):
            client = socket.create_connection((net.trainer_host, port), timeout=timeout)
        accepted, _ = server.accept()
    finally:
        server.close()
    for s in (client, accepted):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.settimeout(timeout)
    return client, accepted


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed early")
        buf += chunk
    return bytes(buf)


def _summary(ms: list[float]) -> dict[str, float]:
    ms = sorted(ms)
    return {"n": len(ms), "min_ms": ms[0], "p50_ms": statistics.median(ms),
            "p99_ms": ms[min(len(ms) - 1, int(0.99 * len(ms)))], "max_ms": ms[-1]}


def round_trips(net: NetnsLinks, i: int, count: int = 20) -> dict[str, float]:
    """Round trips of one small message between T and worker ``i`` over a TCP
    connection (ping-pong), in ms: about twice the link's one-way delay."""
    client, server = _pair(net, i)
    try:
        rtts = []
        for k in range(count):
            t0 = time.monotonic()
            client.sendall(_STAMP.pack(t0, k))
            server.sendall(_recv_exact(server, _STAMP.size))
            _recv_exact(client, _STAMP.size)
            rtts.append(1000 * (time.monotonic() - t0))
        return _summary(rtts)
    finally:
        client.close()
        server.close()


def one_way(net: NetnsLinks, i: int, messages: int = 2000, interval: float = 0.0005,
            size: int = 100, upstream: bool = True, timeout: float = 5.0) -> dict[str, float]:
    """UDP datagrams of ``size`` bytes, one every ``interval`` s, from worker
    ``i`` to T (``upstream``) or back: each one's one-way time in ms (send to
    receipt, one clock) and how many were lost. Minus the configured delay: how
    late the link delivers many small packets (UDP: no congestion control or
    delayed ACKs of TCP in the figure)."""
    with net.inside("t" if upstream else i):
        receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        receiver.bind((net.trainer_host if upstream else net.worker_host(i), 0))
    with net.inside(i if upstream else "t"):
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    receiver.settimeout(timeout)
    target = receiver.getsockname()
    pad = b"\0" * (size - _STAMP.size)
    failed: list[BaseException] = []

    def send() -> None:
        try:
            start = time.monotonic()
            for k in range(messages):
                pause = start + k * interval - time.monotonic()
                if pause > 0:
                    time.sleep(pause)  # pacing the load, not waiting for anything
                sender.sendto(_STAMP.pack(time.monotonic(), k) + pad, target)
        except BaseException as exc:  # noqa: BLE001 - reported by the receiving side
            failed.append(exc)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    try:
        times = []
        with contextlib.suppress(socket.timeout):  # the rest were lost
            while len(times) < messages:
                sent, _k = _STAMP.unpack(receiver.recv(65536)[:_STAMP.size])
                times.append(1000 * (time.monotonic() - sent))
        thread.join(10)
        if failed:
            raise failed[0]
        if not times:
            raise RuntimeError(f"none of {messages} datagrams arrived")
        return {**_summary(times), "lost": messages - len(times)}
    finally:
        sender.close()
        receiver.close()
        thread.join(10)


def bulk(net: NetnsLinks, i: int, nbytes: int = 4 << 20, upstream: bool = True) -> dict[str, float]:
    """Send ``nbytes`` from worker ``i`` to T (``upstream``) or back as fast as
    TCP goes: seconds from the first byte sent to the last received, and the
    payload rate in Mbit/s (a little under a link rate: the headers)."""
    client, server = _pair(net, i, timeout=60)
    sender, receiver = (client, server) if upstream else (server, client)
    failed: list[BaseException] = []
    block = b"x" * 65536

    def send() -> None:
        try:
            left = nbytes
            while left > 0:
                sender.sendall(block[:min(left, len(block))])
                left -= min(left, len(block))
        except BaseException as exc:  # noqa: BLE001 - reported by the receiving side
            failed.append(exc)

    t0 = time.monotonic()
    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    try:
        got = 0
        first = None
        while got < nbytes:
            chunk = receiver.recv(1 << 20)
            if not chunk:
                raise ConnectionError(f"closed after {got} of {nbytes} bytes")
            first = first or time.monotonic()
            got += len(chunk)
        end = time.monotonic()
        thread.join(10)
        if failed:
            raise failed[0]
        return {"bytes": nbytes, "seconds": end - t0, "mbit_s": nbytes * 8 / (end - t0) / 1e6,
                "first_byte_ms": 1000 * ((first or end) - t0)}
    finally:
        client.close()
        server.close()
        thread.join(10)


def step_cartpole(net: NetnsLinks, i: int = 0, steps: int = 5, num_envs: int = 2,
                  timeout: float = 60.0) -> dict[str, Any]:
    """A trainer in T (this process, entered for the env's life) and a real
    ``python -m ws_gym.worker`` in worker ``i``'s namespace step CartPole
    through the link: the step times in ms and the worker's exit code."""
    import gymnasium as gym

    import ws_gym  # noqa: F401  (registers ws_gym/Remote-v0)

    log = tempfile.TemporaryFile()
    proc = None
    try:
        with net.inside("t"):
            envs = gym.make_vec("ws_gym/Remote-v0", num_envs=num_envs, env_id="CartPole-v1",
                                host=net.trainer_host, port=0, connect_timeout=timeout)
            try:
                url, token = envs.unwrapped.url, envs.unwrapped.token
                env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
                if token:
                    env["WS_GYM_TOKEN"] = token
                cmd = net.worker_argv(i, [sys.executable, "-m", "ws_gym.worker", "--url", url, "--env",
                                          "CartPole-v1", "--num-envs", str(num_envs), "--quiet"])
                proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT)
                envs.reset(seed=0)
                times = []
                for _ in range(steps):
                    t0 = time.monotonic()
                    envs.step(envs.action_space.sample())
                    times.append(1000 * (time.monotonic() - t0))
            finally:
                envs.close()
        code = proc.wait(timeout=30)
        return {"url": url, "token": bool(token), "step_ms": times, "worker_exit": code}
    except BaseException:
        log.seek(0)
        sys.stderr.write(f"worker output:\n{log.read().decode('utf-8', 'replace')[-3000:]}\n")
        raise
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


# ---------------------------------------------------------------------------- command line

def _interrupt(signum: int, frame: Any) -> None:
    """A SIGTERM ends the run as Ctrl-C does: through the ``finally`` that deletes the namespaces."""
    raise KeyboardInterrupt


def selftest(args: argparse.Namespace) -> int:
    net = NetnsLinks(workers=args.workers, method=args.method).create()
    results: dict[str, Any] = {"method": args.method, "cases": []}
    try:
        print(f"namespaces: trainer {net.ns('t')} ({net.trainer_host}), workers "
              + ", ".join(f"{net.ns(i)} ({net.worker_host(i)})" for i in range(net.workers)), flush=True)
        for delay in args.delays:
            net.set_links(delay)
            case: dict[str, Any] = {"delay_ms": delay, "how": net.how.get(net.role(0), "none")}
            case["rtt"] = round_trips(net, 0)
            case["up"] = one_way(net, 0, messages=args.messages, upstream=True)
            case["down"] = one_way(net, 0, messages=args.messages, upstream=False)
            case["relay"] = net.relay_stats(0)
            results["cases"].append(case)
            print(f"one-way {delay:g} ms via {case['how']}: RTT p50 {case['rtt']['p50_ms']:.2f} ms "
                  f"(configured {2 * delay:g}); {args.messages} small messages each way, one-way minus delay: "
                  f"up p50 {case['up']['p50_ms'] - delay:.3f} p99 {case['up']['p99_ms'] - delay:.3f} "
                  f"max {case['up']['max_ms'] - delay:.3f} ms, down p50 {case['down']['p50_ms'] - delay:.3f} "
                  f"p99 {case['down']['p99_ms'] - delay:.3f} max {case['down']['max_ms'] - delay:.3f} ms"
                  + (f"; delay line late mean {case['relay']['late_mean_ms']:.3f} "
                     f"max {case['relay']['late_max_ms']:.3f} ms" if case["relay"] else ""), flush=True)
        if args.rate:
            net.set_links(args.rate_delay, args.rate)
            for upstream in (True, False):
                r = bulk(net, 0, nbytes=int(args.mbytes * (1 << 20)), upstream=upstream)
                r.update(rate_mbit=args.rate, delay_ms=args.rate_delay, upstream=upstream)
                results.setdefault("bulk", []).append(r)
                print(f"bulk {args.mbytes:g} MiB {'up' if upstream else 'down'} at {args.rate:g} Mbit/s, "
                      f"{args.rate_delay:g} ms one-way: {r['seconds']:.2f} s, {r['mbit_s']:.2f} Mbit/s payload "
                      f"({r['mbit_s'] / args.rate:.3f}x the rate)", flush=True)
            results["rate_relay"] = net.relay_stats(0)
            if results["rate_relay"]:
                print(f"  delay line: {results['rate_relay']}")
        if args.cartpole:
            r = step_cartpole(net, 0, steps=10)
            results["cartpole"] = r
            print(f"CartPole through worker 0's link: steps {', '.join(f'{t:.1f}' for t in r['step_ms'])} ms, "
                  f"worker exit {r['worker_exit']}")
    finally:
        net.close()
    left = net.leftovers()
    print(f"namespaces left: {left or 'none'}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 1 if left else 0


def hold(args: argparse.Namespace) -> int:
    net = NetnsLinks(workers=args.workers, method=args.method).create()
    try:
        net.set_links(args.delay, args.rate)
        print(f"trainer: {' '.join(net.trainer_argv(['CMD']))}  (address {net.trainer_host})")
        for i in range(net.workers):
            print(f"worker {i}: {' '.join(net.worker_argv(i, ['CMD']))}  (address {net.worker_host(i)}, "
                  f"{args.delay:g} ms one-way, {args.rate or 'unlimited'} Mbit/s, via {net.how.get(net.role(i))})")
        print("Ctrl-C deletes them", flush=True)
        signal.pause()
    finally:
        net.close()
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--selftest", action="store_true", help="measure delay, lateness and rate, then clean up")
    mode.add_argument("--hold", action="store_true", help="build the namespaces and keep them until Ctrl-C")
    p.add_argument("--workers", type=int, default=2, help="worker namespaces (default 2)")
    p.add_argument("--method", choices=("auto", "relay", "netem"), default="auto",
                   help="netem where the kernel has it (auto, default) or the user-space delay line")
    p.add_argument("--delays", type=float, nargs="+", default=[5, 20, 40], help="--selftest: one-way delays, ms")
    p.add_argument("--messages", type=int, default=2000, help="--selftest: small messages per direction and delay")
    p.add_argument("--rate", type=float, default=None, help="rate per direction, Mbit/s (--selftest default 20)")
    p.add_argument("--rate-delay", type=float, default=20, help="--selftest: one-way delay of the rate test, ms")
    p.add_argument("--mbytes", type=float, default=8, help="--selftest: MiB per bulk transfer (default 8)")
    p.add_argument("--cartpole", action="store_true", help="--selftest: also step CartPole through a link")
    p.add_argument("--delay", type=float, default=20, help="--hold: one-way delay, ms (default 20)")
    p.add_argument("--json", metavar="PATH", help="--selftest: write the figures to PATH")
    args = p.parse_args()
    if args.selftest and args.rate is None:
        args.rate = 20.0
    reason = unavailable()
    if reason:
        print(f"cannot build network namespaces here: {reason}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started with SIGINT ignored
    return selftest(args) if args.selftest else hold(args)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
