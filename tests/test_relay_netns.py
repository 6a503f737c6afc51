"""A trainer behind NAT too, in Linux network namespaces: only the relay accepts connections.

The namespaces are tests/netns.py's, made for this module and deleted at its
end (even on failure)::

    T  10.213.0.1  the relay (and, in the second test, an HTTP CONNECT proxy)
    A  10.213.0.2  the trainer: a script run as ``python -m tests.test_relay_netns trainer``
    B  10.213.0.3  the workers: ``python -m ws_gym.worker``

In A and B an nftables table (inet family, input hook) drops every packet
that is neither on loopback nor part of a connection the namespace opened
itself: nothing from outside can connect to them, as behind NAT. Each test
first proves its rules bite (a probe that must fail, next to one that must
pass), then runs: the trainer opens a room on the relay, the workers dial the
room's URL, and the trainer steps 4 CartPole envs, comparing every result
exactly with ``gym.make_vec("CartPole-v1", 4, vectorization_mode="sync")``.
While the run is connected, every TCP socket of A and B outside loopback is
one it dialed to T (none listens); afterwards the rules' counters are read.

The second test also lets B open connections to nothing but the proxy in T
(an output chain): its workers dial a ``wss://`` relay with ``--proxy``, which
tunnels them with CONNECT, and a worker without ``--proxy`` gives up.

Where namespaces cannot be made (not root, no ``ip``, ``ss`` or ``nft``) the
module skips saying why; with CI=true it fails instead, as CI must run it.
Only the 10.213.0.x addresses inside these namespaces are ever dialed.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import pytest

from tests import netns
from tests.test_relay import LISTENING, TOKEN

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable

ENV_ID = "CartPole-v1"
NUM_ENVS = 4
STEPS = 60
WORKERS = 2  # in B, NUM_ENVS // WORKERS envs each
RELAY_PORT = 8080  # ws://
TLS_PORT = 8443  # wss://, for the proxied test
PROXY_PORT = 3128
TRAP_PORT = 7001  # a listener in A and B that T must not reach once the rule is in
CONNECT_TIMEOUT = 30.0  # the trainer's: how long its first reset waits for workers
START_S = 30.0  # for a process to say it is ready (Python imports on a loaded machine)
RUN_S = 60.0  # for the trainer's whole run, from its room to its last step
DROP_PROBE_S = 0.5  # a connect that must NOT get through: its bound (one that may takes < 1 ms here)
PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "ws_proxy", "wss_proxy")

_TRAP = r"""
import select, socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(16)
held = []
print("trap listening", flush=True)
while True:
    ready, _, _ = select.select([s, sys.stdin], [], [])
    if s in ready:
        conn, peer = s.accept()
        held.append(conn)
        print(f"trap accepted {peer[0]}:{peer[1]}", flush=True)
    if sys.stdin in ready:
        if not sys.stdin.readline():
            break
        for conn in held:
            conn.close()
        print(f"trap closed {len(held)}", flush=True)
        held.clear()
"""


def skip_or_fail(reason: str) -> None:
    """As ``netns.skip_or_fail``, in this module's words: skip, or with CI=true fail."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but the relay namespace tests cannot run: {reason}", pytrace=False)
    pytest.skip(reason)


def child_env(**extra: str) -> dict[str, str]:
    """The environment of every process started here: the repo importable, no proxy
    from the caller's environment (the second test names its proxy itself)."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in PROXY_VARS}
    env.update(PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", **extra)
    return env


class Proc:
    """A process in one of the namespaces; its output (stdout and stderr) is
    collected on a thread, so every wait on it is bounded."""

    def __init__(self, topo: netns.Topology, role: str, name: str, argv: list[str], *,
                 env: dict[str, str] | None = None, stdin: bool = False) -> None:
        self.name = name
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._eof = False
        self.popen = subprocess.Popen(
            topo.exec_argv(role, argv), cwd=ROOT, env=env or child_env(),
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        self._reader = threading.Thread(target=self._read, name=f"read-{name}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def wait_line(self, test: Callable[[str], Any], timeout: float, what: str) -> Any:
        """The first truthy ``test(line)`` over the output, waiting up to ``timeout`` s for it."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                while seen < len(self.lines):
                    found = test(self.lines[seen])
                    seen += 1
                    if found:
                        return found
                if self._eof:
                    self.popen.wait(5)
                    raise AssertionError(f"{self.name} ended (exit {self.popen.returncode}) before {what}:\n"
                                         f"{self.tail()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{self.name}: no {what} within {timeout:g} s:\n{self.tail()}")
                self._cond.wait(left)

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        rx = re.compile(pattern)
        return self.wait_line(rx.search, timeout, f"line matching /{pattern}/")

    def wait_exit(self, timeout: float) -> int | None:
        """The exit code, or None if still running after ``timeout`` s."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def send(self, line: str) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(line + "\n")
        self.popen.stdin.flush()

    def output(self) -> str:
        self._reader.join(5)
        with self._cond:
            return "\n".join(self.lines)

    def tail(self, n: int = 25) -> str:
        with self._cond:
            return "\n".join(f"  | {line}" for line in self.lines[-n:])

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        if self.popen.stdin is not None:
            try:
                self.popen.stdin.close()
            except OSError:
                pass
        self._reader.join(5)


class Procs:
    """Every process a test starts; all are stopped at its teardown."""

    def __init__(self, topo: netns.Topology) -> None:
        self.topo = topo
        self.all: list[Proc] = []

    def start(self, role: str, name: str, argv: list[str], **kw: Any) -> Proc:
        proc = Proc(self.topo, role, name, argv, **kw)
        self.all.append(proc)
        return proc

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} (exit {p.popen.poll()})\n{p.tail(15)}" for p in self.all)

    def stop_all(self) -> None:
        """Stop them all, then print their output's ends: pytest shows it when the test failed."""
        for proc in reversed(self.all):
            proc.stop()
        for proc in self.all:
            print(f"--- {proc.name} (exit {proc.popen.returncode})\n{proc.tail(40)}")


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def net():
    """The namespaces, fresh for each test (no socket, conntrack entry or counter
    of another test) and deleted after it even on failure, with every process
    and nftables table in them; checked gone."""
    reason = netns.unavailable()
    if reason is None and shutil.which("ss") is None:
        reason = "no `ss` program (install iproute2)"
    if reason:
        skip_or_fail(reason)
    topology = netns.Topology.for_this_process()
    try:
        topology.create()
        topology.refuse_inbound("a")  # can this kernel filter by connection state?
        topology.only_outbound_to("a", topology.addr("t"), PROXY_PORT)
        topology.remove_firewalls("a")
    except Exception as exc:
        topology.destroy()
        skip_or_fail(f"could not build the namespaces and their nftables rules: {exc}")
    try:
        yield topology
    finally:
        problems = []
        try:
            topology.kill_processes()
            for role in ("a", "b"):
                topology.remove_firewalls(role)
            tables = {role: topology.firewall_tables(role) for role in ("t", "a", "b")}
            if any(tables.values()):
                problems.append(f"nftables tables left after the test: {tables}")
        except Exception as exc:
            problems.append(f"the teardown: {exc}")
        finally:
            topology.destroy()
        left = [line.split()[0] for line in netns.run(["ip", "netns", "list"]).splitlines()
                if line.split() and line.split()[0] in topology.names.values()]
        if left:
            problems.append(f"namespaces left after the teardown: {left}")
        assert not problems, "; ".join(problems)


@pytest.fixture
def procs(net):
    started = Procs(net)
    try:
        yield started
    finally:
        started.stop_all()


# ---------------------------------------------------------------- helpers


def start_relay(procs: Procs, address: str, port: int, *tls: str) -> str:
    """The relay in T; returns its URL once it says it listens."""
    relay = procs.start("t", "relay", [PY, "-m", "ws_gym.relay", "--host", address, "--port", str(port),
                                       "--trainer-token", TOKEN, *tls])
    scheme, host, got_port = relay.wait_for(LISTENING.pattern, START_S).groups()
    assert (host, int(got_port)) == (address, port), relay.tail()
    return f"{scheme}://{address}:{port}"


def start_trainer(procs: Procs, **args: Any) -> Proc:
    """This module's trainer script in A (see ``trainer_main``)."""
    return procs.start("a", "trainer", [PY, "-m", "tests.test_relay_netns", "trainer", json.dumps(args)], stdin=True)


def start_worker(procs: Procs, name: str, url: str, token: str, *extra: str) -> Proc:
    return procs.start("b", name, [PY, "-m", "ws_gym.worker", "--url", url, "--env", ENV_ID,
                                   "--num-envs", str(NUM_ENVS // WORKERS), "--name", name, "--quiet", *extra],
                       env=child_env(WS_GYM_TOKEN=token))


def event(trainer: Proc, name: str, timeout: float) -> dict:
    """Wait for the trainer script's ``name`` event; fail at once on its ``error`` event."""

    def test(line: str) -> dict | None:
        if not line.startswith("@@"):
            return None
        ev = json.loads(line[2:])
        return ev if ev["event"] in (name, "error") else None

    ev = trainer.wait_line(test, timeout, f"its {name!r} event")
    if ev["event"] == "error":
        pytest.fail(f"the trainer failed:\n{ev['error']}\n--- its output\n{trainer.tail(40)}", pytrace=False)
    return ev


def is_loopback(endpoint: str) -> bool:
    host = endpoint.rpartition(":")[0].strip("[]")
    return host.startswith("127.") or host in ("::1", "::ffff:127.0.0.1")


def dialed_out(topo: netns.Topology, role: str, peers: set[str]) -> list[tuple[str, str, str]]:
    """Check that every TCP socket of ``role`` outside loopback is a connection
    it made to one of ``peers`` and that none listens there; returns them."""
    sockets = [s for s in topo.tcp_sockets(role) if not is_loopback(s[1])]
    listening = [s for s in sockets if s[0] == "LISTEN"]
    assert not listening, f"{role.upper()} listens outside loopback: {listening}"
    strangers = [s for s in sockets if s[2] not in peers]
    assert not strangers, f"{role.upper()} has connections with others than {sorted(peers)}: {strangers}"
    established = [s for s in sockets if s[0] == "ESTAB"]
    assert established, f"{role.upper()} has no connection to {sorted(peers)} while serving: {sockets}"
    return sockets


def wait_no_socket_on(topo: netns.Topology, role: str, port: int, timeout: float, *,
                      but_listening: bool = False) -> None:
    """Wait until ``role`` has no TCP socket on local ``port`` (but its listening one)."""
    deadline = time.monotonic() + timeout
    while True:
        left = [s for s in topo.tcp_sockets(role)
                if s[1].endswith(f":{port}") and not (but_listening and s[0] == "LISTEN")]
        if not left:
            return
        assert time.monotonic() < deadline, f"HARNESS: {role.upper()} still has sockets on port {port}: {left}"
        time.sleep(0.05)


def finish_run(procs: Procs, trainer: Proc, workers: list[Proc]) -> dict:
    """The trainer has stepped: close it and check how every process ends."""
    trainer.send("close")
    closed = event(trainer, "closed", 30)
    assert trainer.wait_exit(10) == 0, f"the trainer's exit: {trainer.popen.poll()}\n{trainer.tail()}"
    codes = {w.name: w.wait_exit(20) for w in workers}
    assert all(code == 0 for code in codes.values()), \
        f"workers' exit codes after the trainer closed (None: still running): {codes}\n{procs.logs()}"
    return closed


# ---------------------------------------------------------------- the tests


def test_nobody_but_the_relay_accepts_a_connection(net, procs):
    """Trainer in A, workers in B, neither accepting any inbound connection; the
    relay in T is the only listener reachable. The run steps, exactly."""
    t_addr = net.addr("t")
    timings = {}
    # The rule, proven: a listener in A and in B answers T before it, and not after.
    traps = {role: procs.start(role, f"trap-{role}", [PY, "-I", "-c", _TRAP, str(TRAP_PORT)], stdin=True)
             for role in ("a", "b")}
    accepted = {}
    for role, trap in traps.items():
        trap.wait_for("trap listening", START_S)
        ok, result = net.wait_open("t", net.addr(role), TRAP_PORT, 5)
        assert ok, f"HARNESS: T cannot reach the listener in {role.upper()} even without the rule: {result}"
        trap.wait_for(rf"trap accepted {re.escape(t_addr)}:", 5)
        # Its connections end before the rule comes (a connection older than the
        # rule is unknown to conntrack, so the rule would drop its last ACK).
        trap.send("close")
        trap.wait_for(r"trap closed \d+", 5)
        wait_no_socket_on(net, role, TRAP_PORT, 5, but_listening=True)
        accepted[role] = sum("trap accepted" in line for line in trap.lines)
        net.refuse_inbound(role)
    for role, trap in traps.items():
        started = time.monotonic()
        result = net.probe_to("t", net.addr(role), TRAP_PORT, timeout=DROP_PROBE_S)
        timings[f"probe T->{role.upper()}"] = time.monotonic() - started
        assert result == "timeout", f"T -> {role.upper()}:{TRAP_PORT} with the rule in: {result} (want timeout)"
        result = net.probe(role, "t")
        assert net.reached(result), f"{role.upper()} cannot dial T any more: {result}"
        trap.stop()
        assert sum("trap accepted" in line for line in trap.lines) == accepted[role], trap.output()
        wait_no_socket_on(net, role, TRAP_PORT, 5)

    relay_url = start_relay(procs, t_addr, RELAY_PORT)
    t0 = time.monotonic()
    trainer = start_trainer(procs, relay=relay_url)
    room = event(trainer, "room", START_S)
    timings["trainer start to room"] = time.monotonic() - t0
    assert room["url"].startswith(relay_url + "/room/") and room["url"].endswith("/ws"), room
    assert room["port"] is None, f"the trainer listens on port {room['port']}"
    workers = [start_worker(procs, f"worker-B{i}", room["url"], room["token"]) for i in range(WORKERS)]
    stepped = event(trainer, "stepped", RUN_S)
    timings["trainer start to last step"] = time.monotonic() - t0
    assert (stepped["accepted"], stepped["covered"]) == (WORKERS, NUM_ENVS), stepped
    assert stepped["ends"] > 0, stepped

    relay_peer = f"{t_addr}:{RELAY_PORT}"
    in_a = dialed_out(net, "a", {relay_peer})
    in_b = dialed_out(net, "b", {relay_peer})
    assert len([s for s in in_b if s[0] == "ESTAB"]) == WORKERS, in_b
    t1 = time.monotonic()
    finish_run(procs, trainer, workers)
    timings["close"] = time.monotonic() - t1

    counters = {role: net.counters(role, netns.NO_INBOUND_TABLE) for role in ("a", "b")}
    for role, c in counters.items():  # the probe's SYN and its retransmissions, nothing else
        assert c.get("new-tcp", 0) >= 1, f"{role.upper()}: the rule dropped no SYN, yet T's probe failed: {c}"
    print(f"\n[no inbound] {STEPS} steps x {NUM_ENVS} envs equal SyncVectorEnv's "
          f"({stepped['ends']} episode ends); relay took {stepped['accepted']} workers; "
          f"A's sockets {len(in_a)}, B's {len(in_b)}, all dialed to {relay_peer}; dropped inbound: {counters}; "
          + ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()))


@pytest.mark.parametrize("trainer_too", [False, True], ids=["workers-via-proxy", "trainer-too"])
def test_workers_that_can_reach_only_an_http_proxy(net, procs, tmp_path, trainer_too):
    """As above, and B may open connections to nothing but an HTTP CONNECT proxy
    in T: its workers reach the (wss://) relay through it (``--proxy``); one
    without ``--proxy`` cannot reach the relay and gives up. ``trainer-too``:
    A is held to the proxy as well, and the trainer dials through it (``relay_proxy=``)."""
    from tests.test_security import make_cert
    from ws_gym.protocol import EXIT_GAVE_UP

    t_addr = net.addr("t")
    relay_peer, proxy_peer = f"{t_addr}:{TLS_PORT}", f"{t_addr}:{PROXY_PORT}"
    proxied = ("a", "b") if trainer_too else ("b",)
    certfile, keyfile, _ = make_cert(tmp_path, "relay", ips=(t_addr,))
    for role in ("a", "b"):
        net.refuse_inbound(role)
    for role in proxied:
        net.only_outbound_to(role, t_addr, PROXY_PORT)
    relay_url = start_relay(procs, t_addr, TLS_PORT, "--certfile", certfile, "--keyfile", keyfile)
    assert relay_url == f"wss://{relay_peer}"
    proxy = procs.start("t", "proxy", [PY, "-m", "tests.connect_proxy", "--host", t_addr,
                                       "--port", str(PROXY_PORT), "--allow", t_addr])
    proxy.wait_for(rf"connect-proxy listening on {re.escape(proxy_peer)}$", START_S)

    # The rules, proven: a namespace held to the proxy reaches it but not the
    # relay, A otherwise reaches the relay; T reaches neither A nor B (no
    # answer at all, not even a refusal).
    direct_probe = {}
    for role in ("a", "b"):
        if role in proxied:
            direct_probe[role] = net.probe_to(role, t_addr, TLS_PORT, timeout=DROP_PROBE_S)
            assert not net.reached(direct_probe[role]), f"{role.upper()} reaches the relay directly: {direct_probe}"
            ok, result = net.wait_open(role, t_addr, PROXY_PORT, 5)
            assert ok, f"{role.upper()} cannot reach the proxy: {result}"
        else:
            ok, result = net.wait_open(role, t_addr, TLS_PORT, 5)
            assert ok, f"HARNESS: {role.upper()} cannot reach the relay: {result}"
        result = net.probe_to("t", net.addr(role), netns.PROBE_PORT, timeout=DROP_PROBE_S)
        assert result == "timeout", f"T -> {role.upper()} with the rule in: {result} (want timeout)"

    proxy_url = f"http://{proxy_peer}"
    t0 = time.monotonic()
    trainer = start_trainer(procs, relay=relay_url, cafile=certfile, proxy=proxy_url if trainer_too else None)
    room = event(trainer, "room", START_S)
    assert room["url"].startswith(relay_url + "/room/"), room
    assert room["port"] is None, f"the trainer listens on port {room['port']}"
    direct = None if trainer_too else start_worker(  # once is enough
        procs, "worker-B-direct", room["url"], room["token"], "--cafile", certfile, "--retry-timeout", "2")
    workers = [start_worker(procs, f"worker-B{i}", room["url"], room["token"], "--cafile", certfile,
                            "--proxy", proxy_url) for i in range(WORKERS)]
    stepped = event(trainer, "stepped", RUN_S)
    run_s = time.monotonic() - t0
    assert (stepped["accepted"], stepped["covered"]) == (WORKERS, NUM_ENVS), stepped

    gave_up = "not tried"
    if direct is not None:
        code = direct.wait_exit(20)
        assert code == EXIT_GAVE_UP, f"the worker without --proxy: exit {code}, want {EXIT_GAVE_UP}\n{direct.tail()}"
        gave_up = f"gave up (exit {code}, {time.monotonic() - t0:.2f} s after the trainer started)"
    in_a = dialed_out(net, "a", {proxy_peer if trainer_too else relay_peer})
    in_b = dialed_out(net, "b", {proxy_peer})  # now that the one trying directly is gone
    t1 = time.monotonic()
    finish_run(procs, trainer, workers)
    closed_s = time.monotonic() - t1

    tunnels = [line for line in proxy.lines if f"CONNECT {relay_peer} " in line and line.endswith("-> 200")]
    # each worker's connection; with the trainer too, its control connection and one per worker
    want = WORKERS + (1 + WORKERS if trainer_too else 0)
    assert len(tunnels) >= want, f"the proxy tunnelled {len(tunnels)} connections, want {want}:\n{proxy.tail()}"
    egress = {role: net.counters(role, netns.EGRESS_TABLE) for role in proxied}
    inbound = {role: net.counters(role, netns.NO_INBOUND_TABLE) for role in ("a", "b")}
    assert egress["b"].get("allowed", 0) >= WORKERS and egress["b"].get("other", 0) >= 1, egress
    print(f"\n[proxy only: {','.join(r.upper() for r in proxied)}] {STEPS} steps x {NUM_ENVS} envs equal "
          f"SyncVectorEnv's; the proxy served {len(tunnels)} CONNECTs to {relay_peer}; egress counters {egress}; "
          f"dropped inbound {inbound}; A's sockets {len(in_a)}, B's {len(in_b)}; to the relay directly: "
          f"{direct_probe}; a worker without --proxy: {gave_up}; trainer start to last step {run_s:.2f} s; "
          f"all ended {closed_s:.2f} s after the close")


# ---------------------------------------------------------------- the trainer, in A


def trainer_main(args: dict) -> int:
    """Open a room on the relay, print it, step side by side with SyncVectorEnv,
    print the outcome, and close when told to on stdin. Events are ``@@`` JSON lines."""
    import gymnasium as gym
    from gymnasium.vector import AutoresetMode

    import ws_gym  # noqa: F401  (registers ws_gym/Remote-v0)
    from tests.test_equivalence import step_side_by_side

    def say(name: str, **fields: Any) -> None:
        print("@@" + json.dumps({"event": name, **fields}), flush=True)

    mode = AutoresetMode.NEXT_STEP
    envs = ref = None
    try:
        envs = gym.make_vec("ws_gym/Remote-v0", num_envs=NUM_ENVS, env_id=ENV_ID, relay=args["relay"],
                            relay_token=TOKEN, relay_cafile=args.get("cafile"), relay_proxy=args.get("proxy"),
                            connect_timeout=CONNECT_TIMEOUT,
                            autoreset_mode=mode)
        trainer = envs.unwrapped._trainer
        say("room", url=envs.unwrapped.url, token=envs.unwrapped.token, port=trainer.server.port)
        ref = gym.make_vec(ENV_ID, NUM_ENVS, vectorization_mode="sync", vector_kwargs={"autoreset_mode": mode})
        ends = step_side_by_side(envs, ref, mode, NUM_ENVS, STEPS)
        say("stepped", ends=ends, accepted=trainer.server.relay.accepted, covered=trainer.table.covered(),
            port=trainer.server.port)
        ready, _, _ = select.select([sys.stdin], [], [], 60)
        told = sys.stdin.readline().strip() if ready else "(nothing within 60 s)"
        envs.close()
        envs = None
        say("closed", told=told)
        return 0
    except BaseException:
        say("error", error=traceback.format_exc())
        return 1
    finally:
        for env in (envs, ref):
            if env is not None:
                env.close()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "trainer":
        sys.exit(trainer_main(json.loads(sys.argv[2])))
    sys.exit("usage: python -m tests.test_relay_netns trainer JSON_ARGS")
