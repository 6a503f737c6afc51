"""Network namespaces for link-cut tests: a trainer and two worker "PCs" on one bridge.

Why namespaces: on loopback a link cannot die silently. Killing or stopping a
process is not the same thing either: the kernel's TCP of a killed process
sends FIN or RST, and a stopped one still ACKs. Here each side has its own
network stack, as two machines would, and a cut drops frames in between, so
neither TCP hears anything: a Wi-Fi that died, a pulled cable.

Topology (the names carry the creating process's id, and a suffix for a second
topology of one process, so concurrent runs and the leftovers of a killed run
never clash)::

    T  trainer  eth0 10.213.0.1/24 --- vt -+
    A  worker   eth0 10.213.0.2/24 --- va -+- br0   (bridge in the hub namespace H,
    B  worker   eth0 10.213.0.3/24 --- vb -+         which has no address itself)

The 10.213.0.0/24 addresses exist only inside these namespaces: nothing
outside them is ever a target.

Two cuts of a namespace's link (``cut``/``restore``):

- ``silent``: an nftables table in H (bridge family, forward hook) drops every
  frame that enters or leaves that namespace's bridge port. No FIN, no RST, no
  ICMP, no carrier change on either end. Restoring deletes the table.
- ``link-down``: the namespace's own interface goes down (its PC's interface
  went down). The address stays; the connected route goes and comes back with
  ``up``, which ``restore`` checks.

``impair`` puts delay, loss and a rate limit on a link: with ``tc netem``
where the kernel has it, otherwise with a delay line in user space (``python
-m tests.netns relay``, below), so the test runs on kernels without sch_netem
too.

The worker roles are ``a`` and ``b`` unless a topology is made with others
(``workers=("w0", "w1", ...)``, benchmarks/netns_link.py): the n-th worker
gets the address ``10.213.0.<n + 2>``.
"""

from __future__ import annotations

import collections
import errno
import functools
import json
import os
import random
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SUBNET = "10.213.0"
WORKER_ROLE = re.compile(r"[ab]|w\d{1,3}")  # short: the veth names add one letter (at most 15 characters)
STALE = re.compile(r"wsg(\d+)[sn]?(?:[thabpq]|w\d+)")  # our namespaces' names; the digits: the creator's pid
SUFFIXES = ("", "s", "n")  # topologies of one process: tests, the soak (s), benchmarks/netns_link.py (n)
NETEM_LIMIT = 1000  # packets: netem's default queue
RELAY_LIMIT = NETEM_LIMIT * 1514  # bytes: the delay line's queue under a rate, as netem's of full frames
CUT_TABLE = "wsg_linkcut"
KINDS = ("silent", "link-down")
PROBE_PORT = 9  # nobody listens there: a refusal proves the path works, without a server
NO_INBOUND_TABLE = "wsg_noinbound"  # refuse_inbound: no connection from outside
EGRESS_TABLE = "wsg_egress"  # only_outbound_to: one destination allowed out

_PROBE = r"""
import errno, socket, sys
s = socket.socket()
s.settimeout(float(sys.argv[3]))
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    print("open")
except ConnectionRefusedError:
    print("refused")
except socket.timeout:
    print("timeout")
except OSError as e:
    print("oserror:" + errno.errorcode.get(e.errno, str(e.errno)))
"""


def run(argv: list[str], *, input: str | None = None, timeout: float = 10, check: bool = True) -> str:
    """Run a command, bounded; on failure raise with its stderr (the useful part)."""
    proc = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def unavailable() -> str | None:
    """Why namespace tests cannot run here, or None when they can."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "needs root (network namespaces, nftables)"
    for tool, package in (("ip", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            return f"no `{tool}` program (install {package})"
    probe = f"wsg{os.getpid()}p"
    try:
        run(["ip", "netns", "add", probe])
    except Exception as exc:
        return f"`ip netns add` fails: {exc}"
    try:
        run(["ip", "netns", "exec", probe, "nft", "add", "table", "bridge", CUT_TABLE])
    except Exception as exc:
        return f"nftables has no bridge family here: {exc}"
    finally:
        run(["ip", "netns", "del", probe], check=False)
    return None


@functools.lru_cache(maxsize=None)
def netem_available() -> bool:
    """Whether ``tc`` exists and the kernel has sch_netem (tried in a throwaway namespace)."""
    if shutil.which("tc") is None:
        return False
    probe = f"wsg{os.getpid()}q"
    try:
        run(["ip", "netns", "add", probe])
        run(["ip", "netns", "exec", probe, "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"])
        return True
    except Exception:
        return False
    finally:
        run(["ip", "netns", "del", probe], check=False)


def skip_or_fail(reason: str) -> None:
    """Skip where the tools are missing; in CI (CI=true), which must run these tests, fail."""
    import pytest

    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but the link-cut tests cannot run: {reason}", pytrace=False)
    pytest.skip(reason)


def _pid_alive(pid: int) -> bool:
    """Running, not a zombie: a killed orphan stays a zombie until init reaps it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


class Topology:
    """The namespaces T, A, B (or other workers) and the hub H; see the module docstring."""

    def __init__(self, prefix: str, workers: tuple[str, ...] | list[str] = ("a", "b")) -> None:
        workers = tuple(workers)
        if not workers or len(set(workers)) != len(workers) or len(workers) > 250 \
                or not all(WORKER_ROLE.fullmatch(w) for w in workers):
            raise ValueError(f"workers must be 1-250 distinct roles 'a', 'b' or 'w<number>', got {workers!r}")
        self.prefix = prefix
        self.workers = workers
        self.roles = ("t", *workers)  # the namespaces with an address (all but the hub)
        self.octets = {"t": 1, **{w: i + 2 for i, w in enumerate(workers)}}
        self.names = {role: f"{prefix}{role}" for role in (*self.roles, "h")}
        self.relays: dict[str, tuple[subprocess.Popen, Path]] = {}  # role -> user-space delay line, its log
        self.netem: dict[str, bool] = {}  # role -> impaired with tc netem

    @classmethod
    def for_this_process(cls, suffix: str = "", workers: tuple[str, ...] | list[str] = ("a", "b")) -> "Topology":
        """``suffix`` "s" names a second topology of the same process (the soak's,
        benchmarks/soak.py), "n" a third (benchmarks/netns_link.py), so they
        never clash with the link-cut tests' one."""
        if suffix not in SUFFIXES:
            raise ValueError(f"suffix must be one of {SUFFIXES}, got {suffix!r}")
        return cls(f"wsg{os.getpid()}{suffix}", workers)

    def to_dict(self) -> dict:
        return {"prefix": self.prefix, "workers": list(self.workers)}

    @classmethod
    def from_dict(cls, d: dict) -> "Topology":
        return cls(d["prefix"], d.get("workers", ("a", "b")))

    # ------------------------------------------------------------ names

    def ns(self, role: str) -> str:
        return self.names[role]

    def addr(self, role: str) -> str:
        return f"{SUBNET}.{self.octets[role]}"

    @staticmethod
    def port(role: str) -> str:
        """The hub-side veth of a namespace: its bridge port."""
        return f"v{role}"

    def exec_argv(self, role: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns(role), *argv]

    # ------------------------------------------------------------ life cycle

    @staticmethod
    def remove_stale() -> list[str]:
        """Delete the namespaces of earlier runs whose process is gone (a killed
        pytest leaves them behind); returns their names."""
        removed = []
        for line in run(["ip", "netns", "list"]).splitlines():
            name = line.split()[0] if line.split() else ""
            m = STALE.fullmatch(name)
            if m and not _pid_alive(int(m.group(1))):
                _kill_namespace_pids(name)
                run(["ip", "netns", "del", name], check=False)
                removed.append(name)
        return removed

    def create(self) -> None:
        self.remove_stale()
        h = self.ns("h")
        for role in ("h", *self.roles):
            run(["ip", "netns", "add", self.ns(role)])
            run(["ip", "-n", self.ns(role), "link", "set", "lo", "up"])
        run(["ip", "-n", h, "link", "add", "br0", "type", "bridge"])
        run(["ip", "-n", h, "link", "set", "br0", "up"])
        for role in self.roles:
            port = self.port(role)
            run(["ip", "-n", h, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", self.ns(role)])
            run(["ip", "-n", h, "link", "set", port, "master", "br0", "up"])
            run(["ip", "-n", self.ns(role), "addr", "add", f"{self.addr(role)}/24", "dev", "eth0"])
            run(["ip", "-n", self.ns(role), "link", "set", "eth0", "up"])

    def destroy(self) -> None:
        """Kill what runs inside and delete every namespace (so every link, the
        bridge and the nftables table); never raises."""
        for role in list(self.relays):
            try:
                self._stop_relay(role)
            except Exception:
                pass
        for name in self.names.values():
            _kill_namespace_pids(name)
        for name in self.names.values():
            try:
                run(["ip", "netns", "del", name], check=False)
            except Exception:
                pass

    def kill_processes(self) -> list[int]:
        """Kill every process left in T, A and B (a scenario's workers when the
        scenario itself was killed); returns their pids."""
        killed = []
        for role in self.roles:
            killed += _kill_namespace_pids(self.ns(role))
        return killed

    def heal(self) -> None:
        """Undo any cut or impairment, whatever state a failed test left."""
        h = self.ns("h")
        run(["ip", "netns", "exec", h, "nft", "delete", "table", "bridge", CUT_TABLE], check=False)
        for role in (*self.workers, "t"):
            self.unimpair(role)
            run(["ip", "-n", self.ns(role), "link", "set", "eth0", "up"], check=False)
            # an impairment that failed half-way may have left its veth, or the port off the bridge
            run(["ip", "-n", h, "link", "del", f"q{role}"], check=False)  # fails when there is none
            run(["ip", "-n", h, "link", "set", self.port(role), "promisc", "off", "master", "br0", "up"], check=False)

    # ------------------------------------------------------------ cuts

    def cut(self, kind: str, role: str = "a") -> None:
        if kind == "silent":
            port = self.port(role)
            ruleset = (
                f"table bridge {CUT_TABLE} {{\n"
                "  chain linkcut {\n"
                "    type filter hook forward priority 0; policy accept;\n"
                f'    iifname "{port}" drop\n'
                f'    oifname "{port}" drop\n'
                "  }\n"
                "}\n"
            )
            run(["ip", "netns", "exec", self.ns("h"), "nft", "-f", "-"], input=ruleset)
        elif kind == "link-down":
            run(["ip", "-n", self.ns(role), "link", "set", "eth0", "down"])
        else:
            raise ValueError(f"unknown cut {kind!r}; one of {KINDS}")

    def restore(self, kind: str, role: str = "a") -> None:
        if kind == "silent":
            run(["ip", "netns", "exec", self.ns("h"), "nft", "delete", "table", "bridge", CUT_TABLE])
        elif kind == "link-down":
            run(["ip", "-n", self.ns(role), "link", "set", "eth0", "up"])
            self.check_addressed(role)
        else:
            raise ValueError(f"unknown cut {kind!r}; one of {KINDS}")

    def check_addressed(self, role: str) -> None:
        """The interface is up with its address and connected route (after ``up``)."""
        ns, want = self.ns(role), f"{SUBNET}.0/24"
        deadline = time.monotonic() + 3
        while True:
            addrs = run(["ip", "-n", ns, "-4", "addr", "show", "dev", "eth0"])
            routes = run(["ip", "-n", ns, "-4", "route", "show", "dev", "eth0"])
            if f"{self.addr(role)}/24" in addrs and want in routes:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{ns} eth0 after up: address or route missing:\n{addrs}\n{routes}")
            time.sleep(0.02)

    # ------------------------------------------------------------ probes

    def probe(self, src: str, dst: str, timeout: float = 0.5) -> str:
        """A TCP connect from namespace ``src`` to ``dst``'s address, port 9:
        ``refused`` (or ``open``) means the path works both ways; ``timeout``
        or an ``oserror:...`` means it does not."""
        argv = self.exec_argv(src, [sys.executable, "-I", "-c", _PROBE, self.addr(dst), str(PROBE_PORT), str(timeout)])
        try:
            return run(argv, timeout=timeout + 10).strip() or "no answer"
        except Exception as exc:
            return f"probe failed: {exc}"

    @staticmethod
    def reached(result: str) -> bool:
        return result in ("refused", "open")

    def wait_reachable(self, src: str, dst: str, timeout: float) -> tuple[bool, float, str]:
        """Probe until the path works or ``timeout`` passes: (reached, seconds, last result)."""
        t0 = time.monotonic()
        while True:
            result = self.probe(src, dst)
            if self.reached(result):
                return True, time.monotonic() - t0, result
            if time.monotonic() - t0 > timeout:
                return False, time.monotonic() - t0, result
            time.sleep(0.05)

    def probe_to(self, src: str, address: str, port: int, timeout: float = 0.5) -> str:
        """A TCP connect from namespace ``src`` to ``address:port`` (one of this
        topology's addresses), as ``probe`` reports it: ``open``, ``refused``,
        ``timeout`` or ``oserror:...``."""
        argv = self.exec_argv(src, [sys.executable, "-I", "-c", _PROBE, address, str(port), str(timeout)])
        try:
            return run(argv, timeout=timeout + 10).strip() or "no answer"
        except Exception as exc:
            return f"probe failed: {exc}"

    def wait_open(self, src: str, address: str, port: int, timeout: float) -> tuple[bool, str]:
        """Probe ``address:port`` from ``src`` until a connection is accepted or
        ``timeout`` passes: (opened, last result)."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.probe_to(src, address, port)
            if result == "open" or time.monotonic() > deadline:
                return result == "open", result
            time.sleep(0.05)

    # ------------------------------------------------------------ firewalls in a namespace

    def refuse_inbound(self, role: str) -> None:
        """An nftables table in ``role``'s namespace (inet family, input hook)
        that accepts loopback and the replies of connections this namespace
        opened (established, related) and drops everything else: no connection
        from outside can be made to it, as behind NAT. Counters: ``new-tcp``
        (SYNs from outside, dropped) and ``other`` (anything else dropped)."""
        ruleset = (
            f"table inet {NO_INBOUND_TABLE} {{\n"
            "  chain input {\n"
            "    type filter hook input priority filter; policy drop;\n"
            '    iif "lo" accept\n'
            "    ct state established,related accept\n"
            '    tcp flags & (fin|syn|rst|ack) == syn counter drop comment "new-tcp"\n'
            '    counter drop comment "other"\n'
            "  }\n"
            "}\n"
        )
        run(self.exec_argv(role, ["nft", "-f", "-"]), input=ruleset)

    def only_outbound_to(self, role: str, address: str, port: int) -> None:
        """An nftables table in ``role``'s namespace (inet family, output hook)
        that lets it open TCP connections to ``address:port`` only (and on
        loopback); packets of connections already made pass. Anything else is
        dropped on the way out (a ``connect`` elsewhere times out).
        Counters: ``allowed`` (new connections let out) and ``other`` (dropped)."""
        ruleset = (
            f"table inet {EGRESS_TABLE} {{\n"
            "  chain output {\n"
            "    type filter hook output priority filter; policy drop;\n"
            '    oif "lo" accept\n'
            "    ct state established,related accept\n"
            f'    ip daddr {address} tcp dport {int(port)} ct state new counter accept comment "allowed"\n'
            '    counter drop comment "other"\n'
            "  }\n"
            "}\n"
        )
        run(self.exec_argv(role, ["nft", "-f", "-"]), input=ruleset)

    def remove_firewalls(self, role: str) -> None:
        """Delete the tables of ``refuse_inbound`` and ``only_outbound_to``, if any; never raises."""
        for table in (NO_INBOUND_TABLE, EGRESS_TABLE):
            try:
                run(self.exec_argv(role, ["nft", "delete", "table", "inet", table]), check=False)
            except Exception:
                pass

    def firewall_tables(self, role: str) -> list[str]:
        """The nftables tables in ``role``'s namespace, as ``family name``."""
        out = run(self.exec_argv(role, ["nft", "list", "tables"]))
        return [line.removeprefix("table ").strip() for line in out.splitlines() if line.startswith("table ")]

    def counters(self, role: str, table: str) -> dict[str, int]:
        """The packet counters of the commented rules of an inet table in ``role``'s namespace."""
        listing = json.loads(run(self.exec_argv(role, ["nft", "-j", "list", "table", "inet", table])))
        found = {}
        for item in listing.get("nftables", []):
            rule = item.get("rule")
            if not rule or "comment" not in rule:
                continue
            for expr in rule.get("expr", []):
                if isinstance(expr, dict) and isinstance(expr.get("counter"), dict):
                    found[rule["comment"]] = int(expr["counter"].get("packets", 0))
        return found

    def tcp_sockets(self, role: str) -> list[tuple[str, str, str]]:
        """The TCP sockets of ``role``'s namespace: (state, local address:port, peer address:port)."""
        out = run(self.exec_argv(role, ["ss", "-Htan"]))
        sockets = []
        for line in out.splitlines():
            fields = line.split()
            if len(fields) >= 5:
                sockets.append((fields[0], fields[3], fields[4]))
        return sockets

    # ------------------------------------------------------------ delay, loss, rate

    def impair(self, role: str, delay_ms: float, loss_pct: float, logdir: Path, rate_mbit: float | None = None,
               method: str = "auto") -> str:
        """Delay (one way: each direction gets it), loss and optionally a rate
        limit (Mbit/s, each direction) on ``role``'s link; returns how
        (``"netem"`` or ``"relay"``). ``method`` "auto" takes netem where the
        kernel has it; "relay" forces the delay line, "netem" fails without it.
        A delay line forwards once this returns."""
        if method not in ("auto", "netem", "relay"):
            raise ValueError(f"method must be 'auto', 'netem' or 'relay', got {method!r}")
        if rate_mbit is not None and rate_mbit <= 0:
            raise ValueError(f"rate_mbit must be > 0 or None, got {rate_mbit!r}")
        if method == "netem" or (method == "auto" and netem_available()):
            spec = ["delay", f"{delay_ms}ms", "loss", f"{loss_pct}%"]
            if rate_mbit:
                spec += ["rate", f"{rate_mbit}mbit", "limit", str(NETEM_LIMIT)]
            self.netem[role] = True  # before: unimpair removes a half-made one too
            for ns, dev in ((self.ns("h"), self.port(role)), (self.ns(role), "eth0")):
                run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "netem", *spec])
            return "netem"
        # The user-space delay line sits between the namespace's veth (taken out of
        # the bridge) and a second veth pair whose other end takes its bridge port.
        h, port, inner, outer = self.ns("h"), self.port(role), f"q{role}", f"w{role}"
        run(["ip", "-n", h, "link", "set", port, "nomaster"])
        run(["ip", "-n", h, "link", "add", inner, "type", "veth", "peer", "name", outer])
        run(["ip", "-n", h, "link", "set", outer, "master", "br0", "up"])
        for dev in (port, inner):
            run(["ip", "-n", h, "link", "set", dev, "promisc", "on", "up"])
        log_path = Path(logdir) / f"relay-{role}.log"
        argv = [sys.executable, "-m", "tests.netns", "relay", port, inner, str(delay_ms / 1000), str(loss_pct / 100)]
        if rate_mbit:
            argv.append(str(rate_mbit))
        with open(log_path, "w") as log:
            proc = subprocess.Popen(self.exec_argv("h", argv), cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                                    stdout=log, stderr=subprocess.STDOUT)
        self.relays[role] = (proc, log_path)
        self._wait_relay_line(role, lambda line: line == RELAY_READY, "start")
        return "relay"

    def relay_stats(self, role: str, timeout: float = 5) -> dict | None:
        """The counters of ``role``'s running delay line (None without one): it
        prints them on SIGUSR1."""
        if role not in self.relays:
            return None
        proc, log_path = self.relays[role]
        before = len(log_path.read_text().splitlines())
        proc.send_signal(signal.SIGUSR1)
        line = self._wait_relay_line(role, lambda line: line.startswith("{"), "report", skip=before, timeout=timeout)
        return json.loads(line)

    def _wait_relay_line(self, role: str, wanted, what: str, skip: int = 0, timeout: float = 10) -> str:
        """Wait (bounded) for the delay line to write a wanted line to its log."""
        proc, log_path = self.relays[role]
        deadline = time.monotonic() + timeout
        while True:
            text = log_path.read_text()
            complete = text.splitlines()[skip:] if text.endswith("\n") else text.splitlines()[skip:-1]
            found = [line for line in complete if wanted(line)]
            if found:
                return found[0]
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the delay line of {role} did not {what} (exit code {proc.poll()}): {text[-2000:]}")
            time.sleep(0.005)

    def unimpair(self, role: str) -> dict | None:
        """Undo ``impair``; returns the delay line's counters, when one ran."""
        stats = None
        if self.netem.pop(role, False):
            for ns, dev in ((self.ns("h"), self.port(role)), (self.ns(role), "eth0")):
                run(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root"], check=False)
        if role in self.relays:
            stats = self._stop_relay(role)
            h = self.ns("h")
            run(["ip", "-n", h, "link", "del", f"q{role}"], check=False)  # its peer goes with it
            run(["ip", "-n", h, "link", "set", self.port(role), "promisc", "off"], check=False)
            run(["ip", "-n", h, "link", "set", self.port(role), "master", "br0", "up"], check=False)
        return stats

    def _stop_relay(self, role: str) -> dict | None:
        """Stop a delay line; its counters are the JSON line it prints on SIGTERM."""
        proc, log_path = self.relays.pop(role)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        lines = log_path.read_text().strip().splitlines() if log_path.exists() else []
        lines = [line for line in lines if line != RELAY_READY]
        try:
            return json.loads(lines[-1]) if lines else None
        except ValueError:
            return {"log": lines[-5:]}


def _kill_namespace_pids(ns: str) -> list[int]:
    """Kill (by pid) the processes inside one of our namespaces and reap them."""
    try:
        out = run(["ip", "netns", "pids", ns], check=False)
    except Exception:
        return []
    pids = [int(p) for p in out.split() if p.isdigit() and int(p) != os.getpid()]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 5
    for pid in pids:
        while _pid_alive(pid) and time.monotonic() < deadline:
            try:  # reaps our own children; others are reaped by their parents
                if os.waitpid(pid, os.WNOHANG)[0]:
                    break
            except ChildProcessError:
                pass
            time.sleep(0.01)
    return pids


# ---------------------------------------------------------------- delay line

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_IGNORE_OUTGOING = 23
PACKET_VNET_HDR = 15
PACKET_OUTGOING = 4
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33  # beyond net.core.*mem_max, as root (socket has them from 3.12)
VNET_HDR_LEN = 10  # struct virtio_net_hdr, before each frame
RELAY_BUFFER = 16 << 20  # socket buffers: a burst of frames waits there, not dropped, while a batch is handled
RELAY_BATCH = 256  # frames read from one side at most before the due ones are sent
RELAY_READY = "ready"  # its first line: the sockets are bound, frames are forwarded


class _Direction:
    """One direction of the delay line: frames due in order, and the rate's clock."""

    def __init__(self, out: socket.socket) -> None:
        self.out = out
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.free_at = 0.0  # when the rate model has sent the last queued bit


def _wire_bytes(frame: bytes) -> int:
    """The bytes a frame read with its virtio-net header takes on a wire: a
    segment larger than the MTU (GSO) goes out as several packets, each with
    the headers, as netem's rate counts it."""
    size = len(frame) - VNET_HDR_LEN
    gso_type, gso_size = frame[1], int.from_bytes(frame[4:6], sys.byteorder)
    if not gso_type or not gso_size:
        return size
    try:
        eth = VNET_HDR_LEN
        version = frame[eth + 14] >> 4
        l4 = eth + 14 + ((frame[eth + 14] & 0x0F) * 4 if version == 4 else 40)
        headers = l4 + (frame[l4 + 12] >> 4) * 4 - eth if gso_type in (1, 4) else l4 + 8 - eth  # TCP or UDP
    except IndexError:
        return size
    segments = max(1, -(-(size - headers) // gso_size))
    return size + (segments - 1) * headers


def _relay_socket(ifname: str) -> socket.socket:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    try:  # our own sends are not read back (Linux >= 4.20); else they are skipped as PACKET_OUTGOING
        s.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
    except OSError:
        pass
    for force, plain in ((SO_RCVBUFFORCE, socket.SO_RCVBUF), (SO_SNDBUFFORCE, socket.SO_SNDBUF)):
        try:
            s.setsockopt(socket.SOL_SOCKET, force, RELAY_BUFFER)
        except OSError:
            s.setsockopt(socket.SOL_SOCKET, plain, RELAY_BUFFER)
    s.bind((ifname, ETH_P_ALL))
    s.setblocking(False)
    return s


def _on_time() -> None:
    """Wake at the deadline asked for, before the load the link carries: the default
    timer slack lets the kernel wake us 50 us late, and a busy machine's
    scheduler more (a real-time priority, where allowed; the loop blocks in
    select, so it takes little)."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(29, 1, 0, 0, 0)  # PR_SET_TIMERSLACK, 1 ns
    except (OSError, AttributeError):
        pass
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    except (OSError, AttributeError):
        pass


def relay(if1: str, if2: str, delay: float, loss: float, seed: int = 0, rate_mbit: float | None = None,
          limit: int = RELAY_LIMIT) -> None:
    """Forward every frame between two interfaces after ``delay`` seconds,
    dropping each with probability ``loss``: netem in user space.

    With ``rate_mbit`` each direction also serialises its frames at that rate:
    a frame of n bytes occupies the link n * 8 / rate seconds after the one
    before it and arrives ``delay`` after its last bit, as netem's ``rate``;
    frames that would find more than ``limit`` bytes queued before them are
    dropped (a router's full queue).

    Frames are read and written with their virtio-net header (PACKET_VNET_HDR):
    a veth hands over TCP segments whose checksum is left to the hardware and,
    at times, segments larger than the MTU; the header carries both facts
    across, so the kernel completes the checksum and splits the segments on
    the far side as it would have. Prints ``ready`` once bound, its counters
    (a JSON line) on SIGUSR1, and again when it stops on SIGTERM.
    """
    a, b = _relay_socket(if1), _relay_socket(if2)
    directions = {a: _Direction(b), b: _Direction(a)}  # frames read on a go out of b
    rng = random.Random(seed)
    rate_bytes = rate_mbit * 1e6 / 8 if rate_mbit else 0.0
    stats: dict = {"forwarded": 0, "dropped": 0, "overflow": 0, "send_errors": 0, "bytes": 0}
    late = [0, 0.0, 0.0, 0]  # deliveries, seconds after their deadline in all, the most, how many over 1 ms
    flags: list[str] = []
    signal.signal(signal.SIGTERM, lambda *_: flags.append("stop"))
    signal.signal(signal.SIGUSR1, lambda *_: flags.append("report"))
    _on_time()
    print(RELAY_READY, flush=True)

    def report() -> None:
        n, total, most, over = late
        print(json.dumps({**stats, "late_n": n, "late_mean_ms": round(1000 * total / n, 4) if n else 0.0,
                          "late_max_ms": round(1000 * most, 4), "late_over_1ms": over}), flush=True)

    socks = [a, b]
    clock = time.monotonic
    while "stop" not in flags:
        if "report" in flags:
            flags.remove("report")
            report()
        heads = [d.queue[0][0] for d in directions.values() if d.queue]
        wait = min(0.05, max(0.0, min(heads) - clock())) if heads else 0.05
        try:
            ready, _, _ = select.select(socks, [], [], wait)
        except InterruptedError:
            continue
        for s in ready:
            d = directions[s]
            for _ in range(RELAY_BATCH):
                try:
                    data, addr = s.recvfrom(1 << 18)
                except (BlockingIOError, InterruptedError):
                    break
                if addr[2] == PACKET_OUTGOING:
                    continue
                if loss and rng.random() < loss:
                    stats["dropped"] += 1
                    continue
                now = clock()
                if rate_bytes:
                    size = _wire_bytes(data)
                    start = max(now, d.free_at)
                    if (start - now) * rate_bytes + size > limit:
                        stats["overflow"] += 1
                        continue
                    d.free_at = start + size / rate_bytes
                    d.queue.append((d.free_at + delay, data))
                else:
                    d.queue.append((now + delay, data))
        for d in directions.values():
            queue, out = d.queue, d.out
            while queue:
                now = clock()
                if queue[0][0] > now:
                    break
                deadline, data = queue.popleft()
                try:
                    out.send(data)
                except OSError as exc:
                    stats["send_errors"] += 1
                    stats["last_error"] = errno.errorcode.get(exc.errno or 0, str(exc))
                    continue
                stats["forwarded"] += 1
                stats["bytes"] += len(data) - VNET_HDR_LEN
                lateness = now - deadline
                late[0] += 1
                late[1] += lateness
                late[2] = max(late[2], lateness)
                late[3] += lateness > 0.001
    report()


if __name__ == "__main__":
    if len(sys.argv) in (6, 7) and sys.argv[1] == "relay":
        relay(sys.argv[2], sys.argv[3], float(sys.argv[4]), float(sys.argv[5]),
              rate_mbit=float(sys.argv[6]) if len(sys.argv) == 7 else None)
    else:
        sys.exit("usage: python -m tests.netns relay IF1 IF2 DELAY_S LOSS_FRACTION [RATE_MBIT]")
