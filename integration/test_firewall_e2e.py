"""End to end: the firewall (``table inet veilnet``) with real agents and real traffic, no mocks.

Topology (``firewall_topology``): host-a/b/c on the underlay 192.0.2.11-13, WireGuard
transport 198.51.100.11-13/24, and three segments:

- blue (VNI 100, ``default-deny``): a-web, b-web (app=web), a-api, c-api (app=api), c-job (app=batch)
- green (VNI 200, ``isolated``): a-db, b-db (app=db)
- red (VNI 300, ``isolated``, rate limited 5 new connections/s, burst 5, 5 ICMP/s): a-rl, b-rl

Policies: web -> db tcp 5432 and 8000-8080 (across segments), web -> api tcp 8080 (inside
blue), icmp web -> web. Every endpoint runs a small TCP server on the ports listed in
``SERVER_PORTS``, so a connection that times out was dropped by the firewall (an unfiltered
one would be answered or refused).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from lab import (
    EndpointSpec,
    Host,
    HostSpec,
    Lab,
    LabError,
    SegmentSpec,
    Topology,
    capture,
    find_agent_bin,
    read_pcap,
    sh,
    wait_pcap,
    wait_until,
)

pytestmark = pytest.mark.root

PREFIX = os.environ.get("VEILNET_FW_PREFIX", "vnfw")
RESYNC = 1.0
# Deadline for a state-file change to show on the wire. It covers the probe itself (a client process that
# starts in ~0.3 s and waits up to 0.5 s for an answer), so a loaded machine cannot fail it; how long a flip
# really takes is printed, not asserted (the label test shows it is one element transaction).
FLIP_WITHIN = 10.0
PY = sys.executable  # the venv's python: also runs the helper scripts inside endpoint namespaces
DENIED = "timeout"  # what a dropped SYN looks like to a client
ATTACKER_IP = "192.0.2.99"
VXLAN_PORT = 4789
UNUSED_VNI = 999

RATE_LIMIT = {"new_connections_per_second": 5, "burst": 5, "icmp_per_second": 5}

POLICIES: tuple[dict[str, Any], ...] = (
    {
        "name": "web-to-db",
        "source": {"segment": "blue", "match_labels": {"app": "web"}},
        "destination": {"segment": "green",
                        "match_expressions": [{"key": "app", "operator": "in", "values": ["db"]}]},
        "protocol": "tcp",
        "ports": [5432, "8000-8080"],  # the range is wider than 64 ports: it lives in an interval map
    },
    {
        "name": "web-to-api",
        "source": {"segment": "blue", "match_labels": {"app": "web"}},
        "destination": {"segment": "blue", "match_labels": {"app": "api"}},
        "protocol": "tcp",
        "ports": [8080],
    },
    {
        "name": "web-icmp",
        "source": {"segment": "blue", "match_labels": {"app": "web"}},
        "destination": {"segment": "blue", "match_labels": {"app": "web"}},
        "protocol": "icmp",
    },
)

SERVER_PORTS: dict[str, tuple[int, ...]] = {
    "a-web": (5432, 8080), "b-web": (5432, 8080),
    "a-api": (8080, 8081), "c-api": (8080, 8081), "c-job": (8080,),
    "a-db": (5432, 5433, 8050, 9000), "b-db": (5432, 5433, 8050, 9000),
    "b-rl": (7000,),
}


def firewall_topology() -> Topology:
    hosts = tuple(
        HostSpec(f"host-{c}", f"192.0.2.{11 + i}", f"198.51.100.{11 + i}/24") for i, c in enumerate("abc")
    )
    blue = SegmentSpec("blue", 100, "203.0.113.0/26", "203.0.113.1", mode="default-deny")
    green = SegmentSpec("green", 200, "203.0.113.64/26", "203.0.113.65", mode="isolated")
    red = SegmentSpec("red", 300, "203.0.113.128/26", "203.0.113.129", rate_limit=RATE_LIMIT)
    e = EndpointSpec
    endpoints = (
        e("a-web", "host-a", "blue", "02:00:00:0a:01:01", "203.0.113.10", labels={"app": "web", "tier": "front"}),
        e("a-api", "host-a", "blue", "02:00:00:0a:01:02", "203.0.113.11", labels={"app": "api"}),
        e("b-web", "host-b", "blue", "02:00:00:0b:01:01", "203.0.113.20", labels={"app": "web"}),
        e("c-api", "host-c", "blue", "02:00:00:0c:01:01", "203.0.113.30", labels={"app": "api"}),
        e("c-job", "host-c", "blue", "02:00:00:0c:01:02", "203.0.113.31", labels={"app": "batch"}),
        e("a-db", "host-a", "green", "02:00:00:0a:02:01", "203.0.113.74", labels={"app": "db"}),
        e("b-db", "host-b", "green", "02:00:00:0b:02:01", "203.0.113.84", labels={"app": "db"}),
        e("a-rl", "host-a", "red", "02:00:00:0a:03:01", "203.0.113.140"),
        e("a-rl2", "host-a", "red", "02:00:00:0a:03:02", "203.0.113.141"),
        e("b-rl", "host-b", "red", "02:00:00:0b:03:01", "203.0.113.150"),
    )
    return Topology(hosts, (blue, green, red), endpoints, POLICIES)


# --------------------------------------------------------------------------- scripts run in namespaces

# Listens on the given TCP ports; greets every connection with b"veilnet\n" and closes it.
SERVER = r"""
import selectors, socket, sys
sel = selectors.DefaultSelector()
for port in sys.argv[1:]:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(port)))
    s.listen(256)
    s.setblocking(False)
    sel.register(s, selectors.EVENT_READ)
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        try:
            conn, _ = key.fileobj.accept()
        except OSError:
            continue
        with conn:
            try:
                conn.sendall(b"veilnet\n")
            except OSError:
                pass
"""

# argv: timeout spacing host:port...  Connects to each target (in parallel threads started
# ``spacing`` seconds apart); prints a JSON list of ok | timeout | refused | <error>.
CLIENT = r"""
import json, socket, sys, threading, time
timeout, spacing, targets = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3:]
results = [None] * len(targets)
def one(i, target):
    host, port = target.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as s:
            results[i] = "ok" if s.recv(16) == b"veilnet\n" else "bad-greeting"
    except socket.timeout:
        results[i] = "timeout"
    except ConnectionRefusedError:
        results[i] = "refused"
    except OSError as e:
        results[i] = f"{type(e).__name__}:{e.errno}"
threads = []
for i, target in enumerate(targets):
    t = threading.Thread(target=one, args=(i, target))
    t.start()
    threads.append(t)
    if spacing:
        time.sleep(spacing)
for t in threads:
    t.join()
print(json.dumps(results))
"""

# argv: dst count gap.  ICMP echo requests, each with its own identifier (so each one is a
# new conntrack flow); prints {"sent": n, "answered": m}.
ICMP_FLOWS = r"""
import json, select, socket, struct, sys, time
dst, count, gap = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
def csum(b):
    b += b"\0" * (len(b) % 2)
    s = sum(struct.unpack(f"!{len(b) // 2}H", b))
    s = (s >> 16) + (s & 0xFFFF)
    return ~(s + (s >> 16)) & 0xFFFF
sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
ids = set()
for i in range(count):
    ident = 0x4000 + i
    msg = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + b"veilnet-icmp-flows"
    sock.sendto(msg[:2] + struct.pack("!H", csum(msg)) + msg[4:], (dst, 0))
    ids.add(ident)
    time.sleep(gap)
answered, end = set(), time.monotonic() + 1.0
while (left := end - time.monotonic()) > 0 and select.select([sock], [], [], left)[0]:
    data = sock.recv(2048)
    ihl = (data[0] & 0x0F) * 4
    kind, _, _, ident, _ = struct.unpack("!BBHHH", data[ihl:ihl + 8])
    if kind == 0 and ident in ids:
        answered.add(ident)
print(json.dumps({"sent": count, "answered": len(answered)}))
"""

# argv: target port vni inner_dst_mac inner_src_mac inner_src_ip inner_dst_ip icmp_id count.
# A cleartext VXLAN packet (flags 0x08, the VNI) carrying Ethernet + IPv4 + ICMP echo request,
# checksums computed here; the outer UDP/IP headers come from an ordinary UDP socket.
# Prints {"sport": <source port>}.
VXLAN_PROBE = r"""
import json, socket, struct, sys
target, port, vni, dmac, smac, sip, dip, ident, count = sys.argv[1:10]
def csum(b):
    b += b"\0" * (len(b) % 2)
    s = sum(struct.unpack(f"!{len(b) // 2}H", b))
    s = (s >> 16) + (s & 0xFFFF)
    return ~(s + (s >> 16)) & 0xFFFF
icmp = struct.pack("!BBHHH", 8, 0, 0, int(ident), 1) + b"veilnet-cleartext-probe"
icmp = icmp[:2] + struct.pack("!H", csum(icmp)) + icmp[4:]
ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), int(ident), 0, 64, 1, 0,
                 socket.inet_aton(sip), socket.inet_aton(dip))
ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
frame = bytes.fromhex(dmac.replace(":", "")) + bytes.fromhex(smac.replace(":", "")) + b"\x08\x00" + ip + icmp
vxlan = struct.pack("!B3sI", 0x08, b"\0\0\0", int(vni) << 8)
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(int(count)):
    sock.sendto(vxlan + frame, (target, int(port)))
print(json.dumps({"sport": sock.getsockname()[1]}))
"""


# argv: src dst dport flags count.  TCP segments with the given flags (e.g. "syn,fin") from a raw socket,
# checksum computed here, one source port; prints {"sport": n}.
RAW_TCP = r"""
import json, random, socket, struct, sys
src, dst, dport, flags, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
bits = {"fin": 1, "syn": 2, "rst": 4, "psh": 8, "ack": 16}
flag = sum(bits[f] for f in flags.split(","))
sport = random.randint(40000, 60000)
def csum(b):
    b += b"\0" * (len(b) % 2)
    s = sum(struct.unpack(f"!{len(b) // 2}H", b))
    s = (s >> 16) + (s & 0xFFFF)
    return ~(s + (s >> 16)) & 0xFFFF
sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
for i in range(count):
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 1000 + i, 0, 5 << 4, flag, 64240, 0, 0)
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 6, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", csum(pseudo + tcp)) + tcp[18:]
    sock.sendto(tcp, (dst, 0))
print(json.dumps({"sport": sport}))
"""


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def fw() -> Iterator[Lab]:
    try:
        find_agent_bin()
    except LabError as e:
        pytest.fail(str(e))
    with Lab(PREFIX) as lab:
        servers: list[subprocess.Popen[str]] = []
        try:
            lab.build(firewall_topology(), resync_interval=RESYNC)
            for name, ports in SERVER_PORTS.items():
                servers.append(start_server(lab, name, ports))
            for src, dst in [("a-db", "b-db"), ("a-rl", "b-rl"), ("a-web", "b-web"), ("b-web", "a-web")]:
                if not lab.endpoint(src).wait_ping(ip_of(lab, dst), 30):
                    raise LabError(f"{src} cannot reach {dst}")
            wait_until(lambda: connect(lab, "b-web", [("c-api", 8080)], 0.5) == ["ok"], 30, 0.2,
                       "b-web -> c-api:8080 (host-c reachable)")
        except BaseException:
            print(lab.logs())
            raise
        try:
            yield lab
        finally:
            for proc in servers:
                stop_process(proc)


@pytest.fixture
def attacker(fw: Lab) -> Iterator[Callable[[Sequence[str]], list[str]]]:
    """A namespace on the underlay switch with 192.0.2.99, outside the overlay: returns its ``cmd``."""
    ns = f"{fw.prefix}-atk"
    sh(["ip", "netns", "add", ns])
    try:
        sh(["ip", "-n", ns, "link", "set", "lo", "up"])
        fw.run_ul(["ip", "link", "add", "ulatk", "type", "veth", "peer", "name", "ul0", "netns", ns])
        fw.run_ul(["ip", "link", "set", "ulatk", "master", "br0", "up"])
        sh(["ip", "-n", ns, "addr", "add", f"{ATTACKER_IP}/24", "dev", "ul0"])
        sh(["ip", "-n", ns, "link", "set", "ul0", "up"])

        def cmd(argv: Sequence[str]) -> list[str]:
            return ["nsenter", f"--net=/run/netns/{ns}", "--", *argv]

        sh(cmd(["ping", "-n", "-c", "1", "-W", "2", fw.host("host-a").ipv4]))
        yield cmd
    finally:
        # Delete the veth pair first: a namespace's interfaces go away asynchronously after
        # ``ip netns delete``, and the next test's fixture would find ulatk still there.
        fw.run_ul(["ip", "link", "del", "ulatk"], check=False)
        sh(["ip", "netns", "delete", ns], check=False)


# --------------------------------------------------------------------------- helpers


def ip_of(lab: Lab, endpoint: str) -> str:
    assert lab.topology is not None
    return lab.topology.endpoint(endpoint).ipv4


def start_server(lab: Lab, endpoint: str, ports: Sequence[int]) -> subprocess.Popen[str]:
    proc = lab.endpoint(endpoint).popen([PY, "-c", SERVER, *map(str, ports)], stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "ready":
        stop_process(proc)
        raise LabError(f"server in {endpoint} did not start: {line}")
    return proc


def stop_process(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def connect(
    lab: Lab, src: str, targets: Sequence[tuple[str, int]], timeout: float = 1.0, spacing: float = 0.0
) -> list[str]:
    """Open TCP connections from ``src`` to (endpoint name or IP, port); ok | timeout | refused | error."""
    args = [f"{ip_of(lab, dst) if not dst[0].isdigit() else dst}:{port}" for dst, port in targets]
    res = lab.endpoint(src).run([PY, "-c", CLIENT, str(timeout), str(spacing), *args],
                                timeout=timeout + spacing * len(targets) + 30)
    return list(json.loads(res.stdout))


def expect_connects(lab: Lab, src: str, expected: Mapping[tuple[str, int], str]) -> None:
    got = connect(lab, src, list(expected))
    wrong = {f"{src} -> {d}:{p}": (want, have)
             for ((d, p), want), have in zip(expected.items(), got, strict=True) if want != have}
    assert not wrong, "connections not as the policy says, (wanted, got): " + json.dumps(wrong, indent=1)


def ping_ok(lab: Lab, src: str, dst_ip: str, count: int = 3) -> None:
    res = lab.endpoint(src).ping(dst_ip, count=count, wait=1, args=("-i", "0.2"))
    assert res.returncode == 0, f"{src} -> {dst_ip} failed:\n{res.stdout}{res.stderr}"


def pings(lab: Lab, src: str, dst_ip: str) -> bool:
    """One echo request from ``src`` answered within a second (for polling until a flip)."""
    return lab.endpoint(src).ping(dst_ip, count=1, wait=1).returncode == 0


def ping_fails(lab: Lab, src: str, dst_ip: str) -> None:
    res = lab.endpoint(src).ping(dst_ip, count=2, wait=1, args=("-i", "0.3"))
    assert res.returncode != 0, f"{src} -> {dst_ip} unexpectedly answered:\n{res.stdout}"


def counter(host: Host, name: str) -> int:
    out = host.run(["nft", "-j", "list", "counter", "inet", "veilnet", name]).stdout
    return next(int(o["counter"]["packets"]) for o in json.loads(out)["nftables"] if "counter" in o)


def counters(hosts: Mapping[str, Host], names: Sequence[str]) -> dict[tuple[str, str], int]:
    return {(h, n): counter(hosts[h], n) for h in hosts for n in names}


def security_events(host: Host, since: int, **want: Any) -> list[dict[str, Any]]:
    return [e for e in host.log_events(since)
            if e.get("event") == "security_event" and all(e.get(k) == v for k, v in want.items())]


def wait_security_event(host: Host, since: int, timeout: float = 5, **want: Any) -> dict[str, Any]:
    found = wait_until(lambda: security_events(host, since, **want), timeout, 0.2,
                       f"{host.name}: security_event {want}")
    return dict(found[0])


def probe_drop_logged(lab: Lab, host: str, src: str, dst: str, port: int) -> dict[str, Any]:
    """A dropped connection ``src -> dst:port`` shows up as a ``security_event`` on ``host``.

    The log statement (10/s, burst 5) and the sink (per source 5/s, burst 10) are rate
    limited, so earlier bursts of drops may have used up the budget: a calm probe, retried.
    """
    h = lab.host(host)
    want = {"kind": "drop", "src": ip_of(lab, src), "dst": ip_of(lab, dst), "protocol": 6, "dport": port}
    for _ in range(3):
        time.sleep(1.0)
        mark = h.log_offset()
        assert connect(lab, src, [(dst, port)], 0.5) == [DENIED]
        with contextlib.suppress(TimeoutError):
            return wait_security_event(h, mark, 2, **want)
    raise AssertionError(f"{host}: no security_event for the drop {want}")


def firewall_events(host: Host, since: int) -> list[dict[str, Any]]:
    return [e for e in host.log_events(since) if e.get("event") in ("firewall_applied", "firewall_drift")]


def wait_firewall_applied(lab: Lab, marks: Mapping[str, int], action: str, timeout: float = FLIP_WITHIN + 2) -> None:
    for name, host in lab.hosts.items():
        host.wait_for_log("firewall_applied", lambda e: e.get("action") == action, timeout=timeout,
                          since=marks[name])


def log_marks(lab: Lab) -> dict[str, int]:
    return {n: h.log_offset() for n, h in lab.hosts.items()}


def table_snapshot(host: Host, family: str = "inet", table: str = "veilnet") -> list[Any]:
    """``nft -j list table`` without what changes by itself: counter values, dynamic set members."""
    objs = json.loads(host.run(["nft", "-j", "list", "table", family, table]).stdout)["nftables"]
    out = []
    for obj in objs:
        if "metainfo" in obj:
            continue
        if "counter" in obj:
            obj = {"counter": {k: v for k, v in obj["counter"].items() if k not in ("packets", "bytes")}}
        if "set" in obj and {"timeout", "dynamic"} & set(obj["set"].get("flags", [])):
            obj = {"set": {k: v for k, v in obj["set"].items() if k != "elem"}}
        out.append(obj)
    return out


def guard_rule_handles(host: Host, target: str = "guard_drop") -> list[int]:
    """Handles of the rule(s) in our input chain jumping to ``target``; [] if the table is missing.

    ``guard_drop``: the cleartext guard; ``from_peer``: the check of what a peer may send (anti-spoofing).
    """
    res = host.run(["nft", "-j", "-a", "list", "chain", "inet", "veilnet", "input"], check=False)
    if res.returncode != 0:
        return []
    out = res.stdout
    return [o["rule"]["handle"] for o in json.loads(out)["nftables"]
            if "rule" in o and f'"target": "{target}"' in json.dumps(o["rule"]["expr"])]


def listening(lab: Lab, endpoint: str, port: int) -> bool:
    out = lab.endpoint(endpoint).run(["ss", "-Hltn", f"sport = :{port}"], check=False).stdout
    return bool(out.strip())


@dataclass
class IperfRun:
    client: subprocess.Popen[str]
    server: subprocess.Popen[str]
    seconds: int
    rate_bps: float
    what: str

    def running(self) -> bool:
        return self.client.poll() is None

    def check(self) -> dict[str, Any]:
        """Wait for the end; it completed, and no 0.5 s interval went (nearly) silent."""
        out, err = self.client.communicate(timeout=self.seconds + 20)
        assert self.client.returncode == 0, f"{self.what}: iperf3 exit {self.client.returncode}: {out[-2000:]}{err}"
        result = json.loads(out)
        assert not result.get("error"), f"{self.what}: {result['error']}"
        intervals = [i["sum"] for i in result["intervals"]]
        assert len(intervals) >= self.seconds * 2 - 1, f"{self.what}: only {len(intervals)} intervals"
        rates = [round(i["bits_per_second"] / 1e6, 1) for i in intervals]
        silent = [i for i, s in enumerate(intervals) if s["bytes"] == 0]
        assert not silent, f"{self.what}: zero-throughput intervals {silent}; Mbit/s per interval: {rates}"
        # A stall of most of an interval would still move some bytes: demand a quarter of the rate.
        slow = [i for i, s in enumerate(intervals) if s["bits_per_second"] < self.rate_bps / 4]
        assert not slow, f"{self.what}: intervals {slow} under a quarter of the rate; Mbit/s: {rates}"
        assert result["end"]["sum_received"]["bytes"] > 0
        return dict(result)


@contextlib.contextmanager
def iperf(lab: Lab, client: str, server: str, port: int, seconds: int = 10, mbit: int = 20) -> Iterator[IperfRun]:
    srv = lab.endpoint(server).popen(["iperf3", "-s", "-1", "-p", str(port)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, text=True)
    cli: subprocess.Popen[str] | None = None
    try:
        wait_until(lambda: listening(lab, server, port), 5, 0.05, f"iperf3 server in {server} on {port}")
        cli = lab.endpoint(client).popen(
            ["iperf3", "-c", ip_of(lab, server), "-p", str(port), "-t", str(seconds), "-i", "0.5",
             "-b", f"{mbit}M", "-J"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        run = IperfRun(cli, srv, seconds, mbit * 1e6, f"iperf3 {client} -> {server}:{port}")
        wait_until(lambda: not run.running() or len(lab.endpoint(server).run(
            ["ss", "-Htn", "state", "established", f"sport = :{port}"]).stdout.splitlines()) >= 2,
            5, 0.05, "iperf3 connections established")
        assert run.running(), f"{run.what} ended early: {cli.communicate()}"
        time.sleep(1.0)  # a couple of intervals before anything changes
        yield run
    finally:
        for proc in (cli, srv):
            if proc is not None:
                stop_process(proc)


# --------------------------------------------------------------------------- 1. allow and deny


@pytest.mark.vm  # also in the real-kernel suite (integration/vm): kernel WireGuard
def test_policy_allows_listed_flows_and_drops_the_rest(fw: Lab) -> None:
    lab = fw
    hosts = lab.hosts
    names = ["default_drop", "to_host_drop", "p_web_to_db", "p_web_to_api", "p_web_icmp"]
    before = counters(hosts, names)
    marks = log_marks(lab)

    # Allowed: across segments (cross-host, same host, port range), inside blue (both ways across hosts).
    expect_connects(lab, "a-web", {
        ("b-db", 5432): "ok", ("a-db", 5432): "ok", ("b-db", 8050): "ok",
        ("a-api", 8080): "ok", ("c-api", 8080): "ok",
        # Not allowed: other ports (the servers listen there: a timeout is the firewall), the host itself.
        ("b-db", 5433): DENIED, ("b-db", 9000): DENIED, ("c-api", 8081): DENIED,
        ("203.0.113.1", 5432): DENIED,
    })
    expect_connects(lab, "b-web", {("c-api", 8080): "ok", ("a-db", 8050): "ok", ("a-web", 8080): DENIED})
    # Reverse directions and unlabelled sources.
    expect_connects(lab, "b-db", {("a-web", 5432): DENIED, ("b-web", 8080): DENIED})
    expect_connects(lab, "a-db", {("a-web", 5432): DENIED})
    expect_connects(lab, "c-api", {("b-web", 8080): DENIED, ("a-web", 8080): DENIED})
    expect_connects(lab, "a-api", {("a-web", 8080): DENIED})
    expect_connects(lab, "c-job", {("c-api", 8080): DENIED, ("a-db", 5432): DENIED})
    # Inside green (isolated) everything is free, and green talks to nobody in blue by itself.
    expect_connects(lab, "a-db", {("b-db", 9000): "ok"})

    ping_ok(lab, "a-web", ip_of(lab, "b-web"))  # icmp web -> web, across hosts
    ping_ok(lab, "b-web", ip_of(lab, "a-web"))
    ping_ok(lab, "a-db", ip_of(lab, "b-db"))  # isolated segment: free inside
    ping_ok(lab, "b-db", ip_of(lab, "a-db"))
    ping_ok(lab, "a-web", "203.0.113.1")  # its gateway: ICMP to the host is allowed
    ping_fails(lab, "a-web", ip_of(lab, "b-db"))  # across segments, no icmp policy
    ping_fails(lab, "a-db", ip_of(lab, "a-web"))
    ping_fails(lab, "a-web", ip_of(lab, "c-api"))  # inside default-deny blue, icmp only web -> web
    ping_fails(lab, "c-api", ip_of(lab, "c-job"))

    after = counters(hosts, names)
    delta = {k: after[k] - before[k] for k in before}
    shown = json.dumps({f"{h}/{n}": d for (h, n), d in delta.items()})
    for h, n in [("host-a", "p_web_to_db"), ("host-b", "p_web_to_db"),  # both ends of a-web -> b-db
                 ("host-a", "p_web_to_api"), ("host-b", "p_web_to_api"), ("host-c", "p_web_to_api"),
                 ("host-a", "p_web_icmp"), ("host-b", "p_web_icmp"),
                 ("host-a", "default_drop"), ("host-b", "default_drop"), ("host-c", "default_drop"),
                 ("host-a", "to_host_drop")]:
        assert delta[(h, n)] > 0, f"{h}: counter {n} did not increase: {shown}"
    # host-c has neither web nor db endpoints: web-to-db tuples do not exist there.
    assert delta[("host-c", "p_web_to_db")] == 0, shown
    assert delta[("host-c", "p_web_icmp")] == 0, shown

    # Each drop is logged by the host that dropped it, with its addresses and ports.
    ev = wait_security_event(hosts["host-a"], marks["host-a"], kind="to_host", dst="203.0.113.1", dport=5432)
    assert ev["src"] == ip_of(lab, "a-web"), ev
    probe_drop_logged(lab, "host-a", "a-web", "b-db", 5433)  # dropped where it enters: host-a
    probe_drop_logged(lab, "host-b", "b-db", "a-web", 5432)
    probe_drop_logged(lab, "host-c", "c-api", "b-web", 8080)


# --------------------------------------------------------------------------- 2. labels: elements only


def test_label_change_flips_access_with_element_updates_only(fw: Lab) -> None:
    lab = fw
    orig = lab.topology
    assert orig is not None
    assert connect(lab, "c-job", [("c-api", 8080), ("a-db", 5432)]) == [DENIED, DENIED], "precondition"
    with iperf(lab, "a-web", "b-db", 8001) as stream:  # web -> db 8000-8080 through host-a and host-b
        try:
            marks = log_marks(lab)
            t0 = time.monotonic()
            lab.apply_topology(orig.with_labels("c-job", {"app": "web"}))
            wait_until(lambda: connect(lab, "c-job", [("c-api", 8080)], 0.5) == ["ok"], FLIP_WITHIN, 0.05,
                       "c-job -> c-api:8080 granted")
            granted = time.monotonic() - t0
            wait_until(lambda: connect(lab, "c-job", [("a-db", 5432)], 0.5) == ["ok"], FLIP_WITHIN, 0.05,
                       "c-job -> a-db:5432 (host-a's elements) granted")
            # And icmp web -> web, via host-b's elements. Each agent reads its new state on its own
            # schedule, so host-b may flip after host-a: wait for it too, never assume an order.
            wait_until(lambda: pings(lab, "c-job", ip_of(lab, "b-web")), FLIP_WITHIN, 0.05,
                       "c-job -> b-web icmp (host-b's elements) granted")
            wait_firewall_applied(lab, marks, "elements")

            marks2 = log_marks(lab)
            t1 = time.monotonic()
            lab.apply_topology(orig)
            wait_until(lambda: connect(lab, "c-job", [("c-api", 8080)], 0.5) == [DENIED], FLIP_WITHIN, 0.05,
                       "c-job -> c-api:8080 revoked")
            revoked = time.monotonic() - t1
            wait_until(lambda: connect(lab, "c-job", [("a-db", 5432)], 0.5) == [DENIED], FLIP_WITHIN, 0.05,
                       "c-job -> a-db:5432 revoked")
            wait_firewall_applied(lab, marks2, "elements")
            assert stream.running(), "the label flips outlasted the iperf3 run: test inconclusive"
        finally:
            lab.apply_topology(orig)
        stream.check()
    for name, host in lab.hosts.items():
        evs = firewall_events(host, marks[name])
        actions = [e.get("action") for e in evs]
        assert "elements" in actions and "replace" not in actions, f"{name}: {actions}\n{evs}"
        assert all(e.get("event") == "firewall_applied" for e in evs), evs
    # Other flows are as before.
    expect_connects(lab, "a-web", {("b-db", 5432): "ok", ("b-db", 5433): DENIED})
    print(f"label grant seen after {granted:.2f}s, revoke after {revoked:.2f}s (including the probes)")


# --------------------------------------------------------------------------- 3. structure: replace


def test_structural_change_replaces_table_established_flows_survive(fw: Lab) -> None:
    lab = fw
    orig = lab.topology
    assert orig is not None
    old_fp = {n: firewall_events(h, 0)[-1]["fingerprint"] for n, h in lab.hosts.items()}
    db_to_web = {"name": "db-to-web-icmp", "source": {"segment": "green"},
                 "destination": {"segment": "blue", "match_labels": {"app": "web"}}, "protocol": "icmp"}
    ping_fails(lab, "b-db", ip_of(lab, "a-web"))  # precondition
    with iperf(lab, "a-web", "b-db", 8001) as allowed_stream, iperf(lab, "a-db", "b-db", 8003) as green_stream:
        try:
            # A new policy: structure changes, the table is replaced in one transaction.
            marks = log_marks(lab)
            with_policy = orig.with_policies([*orig.policies, db_to_web])
            lab.apply_topology(with_policy)
            wait_firewall_applied(lab, marks, "replace")
            assert lab.endpoint("b-db").wait_ping(ip_of(lab, "a-web"), FLIP_WITHIN), "new policy not in effect"
            # green becomes default-deny: new flows inside it are dropped, the running one is established.
            marks2 = log_marks(lab)
            lab.apply_topology(with_policy.with_segment("green", mode="default-deny"))
            wait_firewall_applied(lab, marks2, "replace")
            wait_until(lambda: connect(lab, "a-db", [("b-db", 5432)], 0.5) == [DENIED], FLIP_WITHIN, 0.05,
                       "green default-deny: a-db -> b-db:5432 dropped")
            ping_fails(lab, "a-db", ip_of(lab, "b-db"))
            assert allowed_stream.running() and green_stream.running(), "changes outlasted iperf3: inconclusive"
        finally:
            restore = log_marks(lab)
            lab.apply_topology(orig)
        allowed_stream.check()
        green_stream.check()
    wait_firewall_applied(lab, restore, "replace")
    for name, host in lab.hosts.items():
        evs = firewall_events(host, marks[name])
        assert {e.get("action") for e in evs} == {"replace"}, f"{name}: {evs}"
        assert all("structure changed" in e.get("reasons", []) for e in evs), evs
        assert len({e["fingerprint"] for e in evs} | {old_fp[name]}) == 3, "fingerprints: " + json.dumps(evs)
        assert evs[-1]["fingerprint"] == old_fp[name], "restoring the topology restores the structure"
    ping_ok(lab, "a-db", ip_of(lab, "b-db"))
    ping_fails(lab, "b-db", ip_of(lab, "a-web"))


# --------------------------------------------------------------------------- 4. cleartext guard


def send_vxlan(lab: Lab, attacker: Callable[[Sequence[str]], list[str]], vni: int, ident: int,
               count: int = 3) -> int:
    """Cleartext VXLAN from the underlay to host-a: an echo request 'from b-web' to a-web. Returns the sport."""
    topo = lab.topology
    assert topo is not None
    a_web = topo.endpoint("a-web")
    out = sh(attacker([PY, "-c", VXLAN_PROBE, lab.host("host-a").ipv4, str(VXLAN_PORT), str(vni), a_web.mac,
                       "02:66:00:00:00:01", ip_of(lab, "b-web"), a_web.ipv4, str(ident), str(count)])).stdout
    return int(json.loads(out)["sport"])


def test_cleartext_vxlan_from_the_underlay_is_dropped(
    fw: Lab, attacker: Callable[[Sequence[str]], list[str]], tmp_path: Path
) -> None:
    lab = fw
    a = lab.host("host-a")
    blue = lab.topology.segment("blue")  # type: ignore[union-attr]
    before = counter(a, "cleartext_guard")
    mark = a.log_offset()
    probe_id, control_id, last_id = 0x5601, 0x5602, 0x5605
    with capture(a.cmd, "ul0", tmp_path / "ul0.pcap", f"udp port {VXLAN_PORT}") as ul0, capture(
        lab.endpoint("a-web").cmd, "eth0", tmp_path / "a-web.pcap", "icmp"
    ) as inside:
        sport = send_vxlan(lab, attacker, blue.vni, probe_id)
        wait_until(lambda: counter(a, "cleartext_guard") - before >= 3, 10, 0.05, "cleartext_guard counted the probes")
        middle = counter(a, "cleartext_guard")
        control_sport = send_vxlan(lab, attacker, UNUSED_VNI, control_id)
        # One more guarded packet after the unused-VNI ones, on the same socket path: once it is counted, the
        # three before it have been through the same hook.
        last_sport = send_vxlan(lab, attacker, blue.vni, last_id, count=1)
        wait_until(lambda: counter(a, "cleartext_guard") - middle >= 1, 10, 0.05, "the last probe counted")
        after = counter(a, "cleartext_guard")
        # Positive control for the capture inside a-web: an allowed echo request from b-web is seen.
        ping_ok(lab, "b-web", ip_of(lab, "a-web"))
        wait_pcap(inside, lambda lines: any(f"{ip_of(lab, 'b-web')} > {ip_of(lab, 'a-web')}: ICMP echo request" in ln
                                            for ln in lines), what="control echo request from b-web")
        wait_pcap(ul0, lambda lines: sum(f"vni {UNUSED_VNI}" in ln for ln in lines) == 3, what="unused-VNI probes")
    wire = read_pcap(ul0)
    # The packets did reach host-a, well-formed: tcpdump decodes VXLAN and the inner echo request.
    assert sum(f"vni {blue.vni}" in line for line in wire) == 4, "\n".join(wire)
    assert sum(f"vni {UNUSED_VNI}" in line for line in wire) == 3, "\n".join(wire)
    assert sum(f"ICMP echo request, id {probe_id}," in line for line in wire) == 3, "\n".join(wire)
    seen = read_pcap(inside)
    assert [line for line in seen if "ICMP echo request" in line], "the capture inside a-web saw nothing"
    assert not [line for line in seen if f"id {probe_id}," in line or f"id {control_id}," in line
                or f"id {last_id}," in line], (
        "a cleartext VXLAN packet from the underlay reached a-web:\n" + "\n".join(seen))
    assert middle - before == 3, f"cleartext_guard counted {middle - before} of 3 packets with VNI {blue.vni}"
    assert after - middle == 1, f"cleartext_guard counted {after - middle - 1} packets of the unused VNI {UNUSED_VNI}"
    ev = wait_security_event(a, mark, kind="cleartext_guard", sport=sport)
    assert (ev["src"], ev["dst"], ev["protocol"], ev["dport"]) == (ATTACKER_IP, a.ipv4, 17, VXLAN_PORT), ev
    wait_security_event(a, mark, kind="cleartext_guard", sport=last_sport)  # logged after the unused-VNI ones
    assert not security_events(a, mark, kind="cleartext_guard", sport=control_sport)
    ping_ok(lab, "a-web", ip_of(lab, "b-web"))  # encapsulated traffic through WireGuard is untouched


def test_cleartext_guard_is_what_stops_it_and_drift_puts_it_back(
    fw: Lab, attacker: Callable[[Sequence[str]], list[str]], tmp_path: Path
) -> None:
    """Positive control for the guard test, then repair of the guard rule itself.

    With the agent stopped and the guard rule deleted by hand, the packet is still dropped, by the
    second layer: its outer source is no peer, so the check of what a peer may send refuses it
    (``peer_spoof_drop``). With that rule deleted too, the same packet IS bridged into a-web (the
    bypass is real and the probe is valid). A restarted agent must notice the missing rules when it
    adopts the table; a running one must put the guard back on resync (drift).
    """
    lab = fw
    a = lab.host("host-a")
    blue = lab.topology.segment("blue")  # type: ignore[union-attr]
    handles, peer_check = guard_rule_handles(a), guard_rule_handles(a, "from_peer")
    assert len(handles) == 1 and len(peer_check) == 1, (handles, peer_check)
    a.stop_agent(signal.SIGTERM)  # nobody repairs the table while the bypass is demonstrated
    try:
        a.run(["nft", "delete", "rule", "inet", "veilnet", "input", "handle", str(handles[0])])
        before = counter(a, "peer_spoof_drop")
        layered = 0x5604
        with capture(lab.endpoint("a-web").cmd, "eth0", tmp_path / "layered.pcap", "icmp") as inside:
            send_vxlan(lab, attacker, blue.vni, layered, count=1)
            wait_until(lambda: counter(a, "peer_spoof_drop") > before, 5, 0.1, "peer_spoof_drop counted the probe")
            ping_ok(lab, "b-web", ip_of(lab, "a-web"))  # positive control: the capture sees what arrives
            wait_pcap(inside, lambda lines: any("ICMP echo request" in ln and f"{ip_of(lab, 'b-web')} >" in ln
                                                for ln in lines), what="control echo request")
        assert not [line for line in read_pcap(inside) if f"id {layered}," in line], "reached a-web"

        a.run(["nft", "delete", "rule", "inet", "veilnet", "input", "handle", str(peer_check[0])])
        ident = 0x5603
        with capture(lab.endpoint("a-web").cmd, "eth0", tmp_path / "a-web.pcap", "icmp") as inside:
            send_vxlan(lab, attacker, blue.vni, ident, count=1)
            # Without the guard the probe must reach a-web (the bypass is real and the probe is valid).
            wait_pcap(inside, lambda lines: any(f"ICMP echo request, id {ident}," in ln for ln in lines),
                      what="positive control: without the guard the probe reaches a-web")
    finally:
        a.start_agent()
    wait_until(lambda: guard_rule_handles(a) and guard_rule_handles(a, "from_peer"), 5 * RESYNC + 2, 0.2,
               "guard and peer-check rules restored by the restarted agent")

    mark = a.log_offset()
    handles = guard_rule_handles(a)
    a.run(["nft", "delete", "rule", "inet", "veilnet", "input", "handle", str(handles[0])])
    wait_until(lambda: guard_rule_handles(a), 5 * RESYNC + 1, 0.2, "guard rule restored on resync")
    drift = [e for e in firewall_events(a, mark) if e.get("event") == "firewall_drift"]
    assert drift, "the guard came back without a firewall_drift event"
    assert any("input" in json.dumps(e.get("reasons")) for e in drift), drift


# --------------------------------------------------------------------------- 5. rate limits


def test_new_connection_rate_limit(fw: Lab) -> None:
    lab = fw
    a, b = lab.host("host-a"), lab.host("host-b")
    before = counter(a, "rate_red") + counter(b, "rate_red")
    mark = a.log_offset()
    results = connect(lab, "a-rl", [("b-rl", 7000)] * 60, timeout=1.0, spacing=1 / 60)
    ok, dropped = results.count("ok"), results.count(DENIED)
    assert ok + dropped == 60, results
    # 5/s with a burst of 5 over ~1 s: about a dozen get through, the rest are dropped.
    assert 3 <= ok <= 25 and dropped >= 30, f"{ok} connected, {dropped} dropped: {results}"
    # Both hosts enforce the red segment's limit (the SYN enters a red bridge on each), so every
    # dropped connection is counted on the source host or on the destination host.
    counted = counter(a, "rate_red") + counter(b, "rate_red") - before
    assert counted >= dropped, f"rate_red counted {counted} drops for {dropped} dropped connections"
    ev = wait_security_event(a, mark, kind="rate_limit", src=ip_of(lab, "a-rl"), dport=7000)
    assert ev["segment"] == "red" and ev["dst"] == ip_of(lab, "b-rl"), ev
    # The bucket refills (5/s): a calm connection passes again.
    wait_until(lambda: connect(lab, "a-rl", [("b-rl", 7000)]) == ["ok"], 10, 0.5, "a calm connection after the burst")


def test_icmp_rate_limit_on_new_echo_flows(fw: Lab) -> None:
    """40 echo requests at 100/s, each with its own identifier (a new conntrack flow each)."""
    lab = fw
    a = lab.host("host-a")
    time.sleep(1.0)
    before = counter(a, "icmp_rate_red")
    mark = a.log_offset()
    out = lab.endpoint("a-rl").run([PY, "-c", ICMP_FLOWS, ip_of(lab, "b-rl"), "40", "0.01"]).stdout
    res = json.loads(out)
    assert 1 <= res["answered"] <= 20, res  # 5/s, burst 5 over 0.4 s
    assert counter(a, "icmp_rate_red") - before >= 40 - 20, "icmp_rate_red did not count the drops"
    ev = wait_security_event(a, mark, kind="icmp_rate_limit", src=ip_of(lab, "a-rl"))
    assert ev["segment"] == "red" and ev["icmp_type"] == 8, ev


def test_icmp_flood_from_one_ping_is_rate_limited(fw: Lab) -> None:
    """``ping -i 0.01 -c 200`` (one identifier, 100/s) against icmp_per_second 5 must lose packets."""
    lab = fw
    a = lab.host("host-a")
    time.sleep(1.0)
    before = counter(a, "icmp_rate_red")
    res = lab.endpoint("a-rl").ping(ip_of(lab, "b-rl"), count=200, wait=1, args=("-i", "0.01"))
    m = re.search(r"(\d+) packets transmitted, (\d+) received", res.stdout)
    assert m, res.stdout + res.stderr
    sent, received = int(m.group(1)), int(m.group(2))
    counted = counter(a, "icmp_rate_red") - before
    assert received < sent / 2 and counted > 0, (
        f"an ICMP flood at 100/s against icmp_per_second={RATE_LIMIT['icmp_per_second']} was not limited: "
        f"{received}/{sent} answered, icmp_rate_red +{counted}. The compiled rule only limits "
        "'ct state new' ICMP; every echo request after the first of one ping process (same ICMP id) is "
        "'established' and bypasses the limit."
    )


def test_rate_limits_are_per_source(fw: Lab) -> None:
    """While a-rl floods b-rl with new connections (and is limited), a-rl2 on the same host and segment
    connects calmly to the same server and is never limited: the buckets are keyed by source address."""
    lab = fw
    a = lab.host("host-a")
    wait_until(lambda: connect(lab, "a-rl2", [("b-rl", 7000)]) == ["ok"], 10, 0.5, "precondition: a-rl2 connects")
    before = counter(a, "rate_red")
    flood = lab.endpoint("a-rl").popen(
        [PY, "-c", CLIENT, "1.0", str(1 / 60), *[f"{ip_of(lab, 'b-rl')}:7000"] * 90],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: counter(a, "rate_red") > before, 10, 0.05, "the flood is being limited")
        calm = []
        while flood.poll() is None and len(calm) < 4:  # one connection every 0.3 s: under 5/s, inside the flood
            calm += connect(lab, "a-rl2", [("b-rl", 7000)], timeout=1.0)
        assert flood.poll() is None, "the flood ended before the calm source was measured: test inconclusive"
    finally:
        out, _ = flood.communicate(timeout=60)
    flooded = json.loads(out.strip().splitlines()[-1])
    assert flooded.count(DENIED) >= 30, f"the flood was not limited: {flooded}"
    assert calm == ["ok"] * len(calm) and len(calm) >= 2, f"a-rl2 was limited by a-rl's flood: {calm}"


def test_ct_state_invalid_packets_are_dropped_and_counted(fw: Lab, tmp_path: Path) -> None:
    """TCP segments with SYN and FIN set, on an allowed flow (a-web -> b-db:5432): conntrack marks them
    invalid, our ``ct state invalid`` rule counts and drops them on host-a; a normal SYN to the same port,
    sent last, is seen arriving at b-db."""
    lab = fw
    a = lab.host("host-a")
    before = counter(a, "invalid")
    with capture(lab.endpoint("b-db").cmd, "eth0", tmp_path / "b-db.pcap", "tcp dst port 5432") as pcap:
        out = lab.endpoint("a-web").run([PY, "-c", RAW_TCP, ip_of(lab, "a-web"), ip_of(lab, "b-db"), "5432",
                                         "syn,fin", "3"]).stdout
        sport = int(json.loads(out)["sport"])
        wait_until(lambda: counter(a, "invalid") - before >= 3, 10, 0.05, "host-a counted the invalid segments")
        assert connect(lab, "a-web", [("b-db", 5432)]) == ["ok"]  # positive control: the flow is allowed
        wait_pcap(pcap, lambda lines: any("Flags [S]" in ln for ln in lines), what="the control SYN at b-db")
    seen = read_pcap(pcap)
    assert not [ln for ln in seen if f".{sport} >" in ln], "SYN+FIN segments reached b-db:\n" + "\n".join(seen)
    assert counter(a, "invalid") - before == 3


def _allow4_keys(host: Host) -> list[str]:
    out = host.run(["nft", "-j", "list", "map", "inet", "veilnet", "allow4_ports"]).stdout
    elems = next(o["map"] for o in json.loads(out)["nftables"] if "map" in o).get("elem", [])
    return [json.dumps(e[0]) for e in elems]


def test_a_deleted_allow_element_and_a_deleted_table_are_repaired_on_resync(fw: Lab) -> None:
    lab = fw
    a = lab.host("host-a")
    src, dst = ip_of(lab, "a-web"), ip_of(lab, "b-db")
    wanted = [k for k in _allow4_keys(a) if src in k and dst in k and "5432" in k]
    assert len(wanted) == 1, wanted
    mark = a.log_offset()
    a.run(["nft", "delete", "element", "inet", "veilnet", "allow4_ports", f"{{ {src} . {dst} . tcp . 5432 }}"])
    assert not [k for k in _allow4_keys(a) if k == wanted[0]], "the element was not deleted"
    drift = a.wait_for_log("firewall_drift", timeout=6 * RESYNC + 10, since=mark)
    assert wanted[0] in _allow4_keys(a), f"the element did not come back: {drift}"
    assert connect(lab, "a-web", [("b-db", 5432)]) == ["ok"]

    mark = a.log_offset()
    a.run(["nft", "delete", "table", "inet", "veilnet"])
    assert a.run(["nft", "list", "table", "inet", "veilnet"], check=False).returncode != 0
    a.wait_for_log("firewall_drift", timeout=6 * RESYNC + 10, since=mark)
    wait_until(lambda: guard_rule_handles(a), 10, 0.2, "table inet veilnet back with its guard")
    expect_connects(lab, "a-web", {("b-db", 5432): "ok", ("b-db", 5433): DENIED, ("a-db", 9000): DENIED})
    ping_fails(lab, "a-web", ip_of(lab, "a-db"))


# --------------------------------------------------------------------------- 6. foreign tables


FOREIGN_TABLES = """
table inet other {
    chain forward {
        type filter hook forward priority 10; policy drop;
        iifname "vnbr*" accept
        oifname "vnbr*" accept
    }
}
table ip dockerish {
    set blocked {
        type ipv4_addr
        elements = { 10.9.9.9, 10.9.9.10 }
    }
    chain prerouting {
        type filter hook prerouting priority -150; policy accept;
        ip saddr @blocked drop
    }
}
"""


def test_foreign_tables_untouched(fw: Lab) -> None:
    lab = fw
    orig = lab.topology
    assert orig is not None
    a = lab.host("host-a")
    a.run(["nft", "-f", "-"], input=FOREIGN_TABLES)
    api_to_db = {"name": "api-to-db", "source": {"segment": "blue", "match_labels": {"app": "api"}},
                 "destination": {"segment": "green"}, "protocol": "tcp", "ports": [5432]}
    try:
        other = a.run(["nft", "-j", "list", "table", "inet", "other"]).stdout
        dockerish = a.run(["nft", "-j", "list", "table", "ip", "dockerish"]).stdout
        assert '"policy": "drop"' in other and "10.9.9.10" in dockerish, (other, dockerish)
        expect_connects(lab, "a-web", {("b-db", 5432): "ok"})  # the operator's table lets overlay traffic by

        marks = log_marks(lab)
        with_policy = orig.with_policies([*orig.policies, api_to_db])
        lab.apply_topology(with_policy)  # structure
        a.wait_for_log("firewall_applied", lambda e: e.get("action") == "replace", timeout=5, since=marks["host-a"])
        wait_until(lambda: connect(lab, "a-api", [("a-db", 5432)], 0.5) == ["ok"], FLIP_WITHIN, 0.05,
                   "api-to-db in effect")
        marks = log_marks(lab)
        lab.apply_topology(with_policy.with_labels("c-job", {"app": "api"}))  # elements
        a.wait_for_log("firewall_applied", lambda e: e.get("action") == "elements", timeout=5,
                       since=marks["host-a"])
        wait_until(lambda: connect(lab, "c-job", [("a-db", 5432)], 0.5) == ["ok"], FLIP_WITHIN, 0.05,
                   "c-job as api reaches a-db")
        marks = log_marks(lab)
        lab.apply_topology(orig)
        a.wait_for_log("firewall_applied", lambda e: e.get("action") == "replace", timeout=5, since=marks["host-a"])

        assert a.run(["nft", "-j", "list", "table", "inet", "other"]).stdout == other
        assert a.run(["nft", "-j", "list", "table", "ip", "dockerish"]).stdout == dockerish
        # Across an agent restart (SIGTERM, adopt on start, resyncs) too.
        a.stop_agent(signal.SIGTERM)
        a.start_agent()
        a.wait_resyncs(a.agent_starts[-1], count=2)
        assert a.run(["nft", "-j", "list", "table", "inet", "other"]).stdout == other, "the restart changed it"
        assert a.run(["nft", "-j", "list", "table", "ip", "dockerish"]).stdout == dockerish, "the restart changed it"
        # Overlay traffic still flows, and the policy still drops what it should.
        expect_connects(lab, "a-web", {("b-db", 5432): "ok", ("a-db", 8050): "ok", ("b-db", 5433): DENIED})
        expect_connects(lab, "a-api", {("a-db", 5432): DENIED})
        ping_ok(lab, "a-web", ip_of(lab, "b-web"))
        ping_ok(lab, "a-db", ip_of(lab, "b-db"))
    finally:
        lab.apply_topology(orig)
        a.run(["nft", "delete", "table", "inet", "other"], check=False)
        a.run(["nft", "delete", "table", "ip", "dockerish"], check=False)


# --------------------------------------------------------------------------- 7. bad input


def _bad(**changes: Any) -> dict[str, Any]:
    policy: dict[str, Any] = {"name": "bad", "source": {"segment": "blue", "match_labels": {"app": "web"}},
                              "destination": {"segment": "green"}, "protocol": "tcp", "ports": [5432]}
    policy.update(changes)
    return {k: v for k, v in policy.items() if v is not None}


@pytest.mark.parametrize(
    ("policy", "field"),
    [
        (_bad(source={"cidr": "198.51.100.0/33"}), "policies[0].source.cidr"),
        (_bad(ports=["9000-8000"]), "policies[0].ports[0]"),
        (_bad(protocol="gre", ports=None), "policies[0].protocol"),
        (_bad(protocol="icmp", ports=[80]), "policies[0].ports"),
        (_bad(name="x; flush ruleset"), "policies[0].name"),
        (_bad(name='web"; drop'), "policies[0].name"),
        (_bad(source={"segment": "blue", "match_labels": {"app": 'web"; drop'}}),
         "policies[0].source.match_labels.app"),
    ],
    ids=["cidr", "port-range", "gre", "icmp-ports", "name-flush", "name-quote", "label-quote"],
)
def test_invalid_policy_rejected_whole(fw: Lab, tmp_path: Path, policy: dict[str, Any], field: str) -> None:
    lab = fw
    a = lab.host("host-a")
    good = a.state_path.read_text()
    bad = json.loads(good)
    # The bad policy first, and a valid new one after it: nothing of this file may be applied.
    extra = {"name": "would-be-applied", "source": {"segment": "green"}, "destination": {"segment": "blue"},
             "protocol": "any"}
    bad["policies"] = [policy, *bad["policies"], extra]
    res = a.check(a.write_state(bad, tmp_path / "bad.json"))
    msg = res.stdout + res.stderr
    assert res.returncode == 2, f"check exit {res.returncode}: {msg}"
    assert f"error: {field}:" in msg, msg
    assert a.check().returncode == 0

    before = table_snapshot(a)
    mark = a.log_offset()
    a.write_state(bad)
    try:
        ev = a.wait_for_log("state_rejected", timeout=5, since=mark)
        assert ev.get("field") == field, ev
        a.wait_resyncs(a.log_offset(), count=2)  # a whole resync ran with the last good state
        assert table_snapshot(a) == before, "table inet veilnet changed after a rejected state file"
        assert not firewall_events(a, mark), firewall_events(a, mark)
        assert a.agent_running(), "agent exited on an invalid state file"
        expect_connects(lab, "a-db", {("a-web", 5432): DENIED, ("b-db", 5432): "ok"})
    finally:
        a.write_state(good)
    expect_connects(lab, "a-web", {("b-db", 5432): "ok", ("b-db", 5433): DENIED})

