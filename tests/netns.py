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

``impair`` puts delay and loss on a link: with ``tc netem`` where the kernel
has it, otherwise with a delay line in user space (``python -m tests.netns
relay``, below), so the test runs on kernels without sch_netem too.
"""

from __future__ import annotations

import errno
import heapq
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
ROLES = {"t": 1, "a": 2, "b": 3}  # namespace role -> last octet of its address
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
    """The namespaces T, A, B and the hub H; see the module docstring."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.names = {role: f"{prefix}{role}" for role in ("t", "a", "b", "h")}
        self.relays: dict[str, tuple[subprocess.Popen, Path]] = {}  # role -> user-space delay line, its log
        self.netem: dict[str, bool] = {}  # role -> impaired with tc netem

    @classmethod
    def for_this_process(cls, suffix: str = "") -> "Topology":
        """``suffix`` "s" names a second topology of the same process (the soak's,
        benchmarks/soak.py), so it never clashes with the link-cut tests' one."""
        if suffix not in ("", "s"):
            raise ValueError(f"suffix must be '' or 's', got {suffix!r}")
        return cls(f"wsg{os.getpid()}{suffix}")

    def to_dict(self) -> dict:
        return {"prefix": self.prefix}

    @classmethod
    def from_dict(cls, d: dict) -> "Topology":
        return cls(d["prefix"])

    # ------------------------------------------------------------ names

    def ns(self, role: str) -> str:
        return self.names[role]

    def addr(self, role: str) -> str:
        return f"{SUBNET}.{ROLES[role]}"

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
            m = re.fullmatch(r"wsg(\d+)s?[thabpq]", name)
            if m and not _pid_alive(int(m.group(1))):
                _kill_namespace_pids(name)
                run(["ip", "netns", "del", name], check=False)
                removed.append(name)
        return removed

    def create(self) -> None:
        self.remove_stale()
        h = self.ns("h")
        for role in ("h", "t", "a", "b"):
            run(["ip", "netns", "add", self.ns(role)])
            run(["ip", "-n", self.ns(role), "link", "set", "lo", "up"])
        run(["ip", "-n", h, "link", "add", "br0", "type", "bridge"])
        run(["ip", "-n", h, "link", "set", "br0", "up"])
        for role in ("t", "a", "b"):
            port = self.port(role)
            run(["ip", "-n", h, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", self.ns(role)])
            run(["ip", "-n", h, "link", "set", port, "master", "br0", "up"])
            run(["ip", "-n", self.ns(role), "addr", "add", f"{self.addr(role)}/24", "dev", "eth0"])
            run(["ip", "-n", self.ns(role), "link", "set", "eth0", "up"])

    def destroy(self) -> None:
        """Kill what runs inside and delete every namespace (so every link, the
        bridge and the nftables table); never raises."""
        for role in list(self.relays):
            self._stop_relay(role)
        for role in ("t", "a", "b", "h"):
            _kill_namespace_pids(self.ns(role))
        for role in ("t", "a", "b", "h"):
            run(["ip", "netns", "del", self.ns(role)], check=False)

    def kill_processes(self) -> list[int]:
        """Kill every process left in T, A and B (a scenario's workers when the
        scenario itself was killed); returns their pids."""
        killed = []
        for role in ("t", "a", "b"):
            killed += _kill_namespace_pids(self.ns(role))
        return killed

    def heal(self) -> None:
        """Undo any cut or impairment, whatever state a failed test left."""
        h = self.ns("h")
        run(["ip", "netns", "exec", h, "nft", "delete", "table", "bridge", CUT_TABLE], check=False)
        for role in ("a", "b", "t"):
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

    # ------------------------------------------------------------ delay and loss

    def impair(self, role: str, delay_ms: float, loss_pct: float, logdir: Path) -> str:
        """Delay and loss on both directions of ``role``'s link; returns how
        (``"netem"`` or ``"relay"``)."""
        if netem_available():
            spec = ["delay", f"{delay_ms}ms", "loss", f"{loss_pct}%"]
            run(["ip", "netns", "exec", self.ns("h"), "tc", "qdisc", "add", "dev", self.port(role), "root", "netem", *spec])
            run(["ip", "netns", "exec", self.ns(role), "tc", "qdisc", "add", "dev", "eth0", "root", "netem", *spec])
            self.netem[role] = True
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
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                self.exec_argv("h", [sys.executable, "-m", "tests.netns", "relay", port, inner,
                                     str(delay_ms / 1000), str(loss_pct / 100)]),
                cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=log, stderr=subprocess.STDOUT,
            )
        self.relays[role] = (proc, log_path)
        return "relay"

    def unimpair(self, role: str) -> dict | None:
        """Undo ``impair``; returns the delay line's counters, when one ran."""
        stats = None
        if self.netem.pop(role, False):
            run(["ip", "netns", "exec", self.ns("h"), "tc", "qdisc", "del", "dev", self.port(role), "root"], check=False)
            run(["ip", "netns", "exec", self.ns(role), "tc", "qdisc", "del", "dev", "eth0", "root"], check=False)
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
PACKET_VNET_HDR = 15
PACKET_OUTGOING = 4


def relay(if1: str, if2: str, delay: float, loss: float, seed: int = 0) -> None:
    """Forward every frame between two interfaces after ``delay`` seconds,
    dropping each with probability ``loss``: netem in user space.

    Frames are read and written with their virtio-net header (PACKET_VNET_HDR):
    a veth hands over TCP segments whose checksum is left to the hardware and,
    at times, segments larger than the MTU; the header carries both facts
    across, so the kernel completes the checksum and splits the segments on
    the far side as it would have. Stops on SIGTERM and prints its counters.
    """
    socks: dict[socket.socket, socket.socket] = {}
    a, b = (socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL)) for _ in range(2))
    for s, ifname in ((a, if1), (b, if2)):
        s.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
        s.bind((ifname, ETH_P_ALL))
        s.setblocking(False)
    socks[a], socks[b] = b, a
    rng = random.Random(seed)
    queue: list[tuple[float, int, socket.socket, bytes]] = []
    stats = {"forwarded": 0, "dropped": 0, "send_errors": 0}
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    seq = 0
    while not stopping:
        now = time.monotonic()
        wait = min(0.2, max(0.0, queue[0][0] - now)) if queue else 0.2
        try:
            ready, _, _ = select.select(list(socks), [], [], wait)
        except InterruptedError:
            continue
        now = time.monotonic()
        for s in ready:
            while True:
                try:
                    data, addr = s.recvfrom(1 << 18)
                except (BlockingIOError, InterruptedError):
                    break
                if addr[2] == PACKET_OUTGOING:
                    continue
                if rng.random() < loss:
                    stats["dropped"] += 1
                    continue
                seq += 1
                heapq.heappush(queue, (now + delay, seq, socks[s], data))
        while queue and queue[0][0] <= time.monotonic():
            _, _, out, data = heapq.heappop(queue)
            try:
                out.send(data)
                stats["forwarded"] += 1
            except OSError as exc:
                stats["send_errors"] += 1
                stats["last_error"] = errno.errorcode.get(exc.errno, str(exc))
    print(json.dumps(stats), flush=True)


if __name__ == "__main__":
    if len(sys.argv) >= 6 and sys.argv[1] == "relay":
        relay(sys.argv[2], sys.argv[3], float(sys.argv[4]), float(sys.argv[5]))
    else:
        sys.exit("usage: python -m tests.netns relay IF1 IF2 DELAY_S LOSS_FRACTION")
