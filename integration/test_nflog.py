"""NflogReader and SecurityEventSink against the real kernel's nfnetlink_log.

Two throw-away namespaces ``vnt-nflog-<pid>-<n>-{a,b}`` joined by a veth
(a0 192.0.2.1 / 2001:db8::1, b0 192.0.2.2 / 2001:db8::2), deleted by a
fixture finaliser pass or fail. Namespace b holds a test table, made with
``nft``, that logs chosen packets to an nflog group with the firewall's
prefixes and drops them; the reader listens in namespace b. Packets are
real: UDP/TCP sockets opened inside namespace a (or b), and ``ping``.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from veilnet_agent.core.objects import LoggedPacket
from veilnet_agent.dataplane.security_events import SecurityEventSink, run_reader_thread
from veilnet_agent.drivers.netlink import netns_entered
from veilnet_agent.drivers.nflog import NflogReader

pytestmark = pytest.mark.root

GROUP = 7410
A4, B4 = "192.0.2.1", "192.0.2.2"
A6, B6 = "2001:db8::1", "2001:db8::2"
_counter = itertools.count()

RULESET = f"""
table inet vnt_nflog_test {{
    chain input {{
        type filter hook input priority filter; policy accept;
        udp dport 9999 log group {GROUP} prefix "veilnet drop " drop
        tcp dport 7777 log group {GROUP} prefix "veilnet rate web-1 " drop
        icmp type echo-request log group {GROUP} prefix "veilnet drop " drop
        icmpv6 type echo-request log group {GROUP} prefix "veilnet icmp-rate web-1 " drop
    }}
    chain output {{
        type filter hook output priority filter; policy accept;
        udp dport 9998 log group {GROUP} prefix "veilnet guard " drop
    }}
}}
"""


def sh(*argv: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=60, check=False)
    if check and done.returncode:
        raise AssertionError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr}")
    return done


@dataclass(frozen=True)
class Pair:
    a: str  # sender
    b: str  # receiver: test table and reader
    b0: int  # ifindex of b's veth end, in b
    a0_mac: str  # the sender's MAC: the kernel reports it for packets that came in on b0

    def udp(self, src: str, sport: int, dst: str, dport: int, count: int = 1, netns: str | None = None) -> None:
        family = socket.AF_INET6 if ":" in src else socket.AF_INET
        with netns_entered(netns or self.a):
            sock = socket.socket(family, socket.SOCK_DGRAM)
        with sock:
            sock.bind((src, sport))
            for _ in range(count):
                sock.sendto(b"veilnet-test", (dst, dport))

    def tcp_syn(self, src: str, sport: int, dst: str, dport: int) -> None:
        """One SYN (the socket is closed before any retransmission)."""
        with netns_entered(self.a):
            sock = socket.socket(socket.AF_INET6 if ":" in src else socket.AF_INET, socket.SOCK_STREAM)
        with sock:
            sock.bind((src, sport))
            sock.setblocking(False)
            assert sock.connect_ex((dst, dport)) == errno.EINPROGRESS
            time.sleep(0.05)

    def ping(self, dst: str) -> None:
        done = sh("ip", "netns", "exec", self.a, "ping", "-n", "-c", "1", "-W", "1", dst, check=False)
        assert done.returncode == 1, f"echo to {dst} should go unanswered: {done.stdout}{done.stderr}"


@pytest.fixture
def pair() -> Iterator[Pair]:
    base = f"vnt-nflog-{os.getpid()}-{next(_counter)}"
    a, b = f"{base}-a", f"{base}-b"
    created: list[str] = []
    try:
        for name in (a, b):
            sh("ip", "netns", "add", name)
            created.append(name)
        sh("ip", "-n", a, "link", "add", "a0", "type", "veth", "peer", "name", "b0", "netns", b)
        for ns, dev, v4, v6 in ((a, "a0", A4, A6), (b, "b0", B4, B6)):
            sh("ip", "-n", ns, "addr", "add", f"{v4}/24", "dev", dev)
            sh("ip", "-n", ns, "addr", "add", f"{v6}/64", "dev", dev, "nodad")
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "netns", "exec", b, "nft", "-f", "-", stdin=RULESET)
        link = json.loads(sh("ip", "-n", b, "-j", "link", "show", "b0").stdout)
        sender = json.loads(sh("ip", "-n", a, "-j", "link", "show", "a0").stdout)
        yield Pair(a=a, b=b, b0=int(link[0]["ifindex"]), a0_mac=sender[0]["address"])
    finally:
        for name in reversed(created):
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


def collect(reader: NflogReader, count: int, timeout: float = 5.0) -> list[LoggedPacket]:
    """Read until ``count`` packets arrived (or ``timeout``), then a little longer to catch extras."""
    got: list[LoggedPacket] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        got.extend(reader.read(timeout=max(0.0, deadline - time.monotonic())))
    got.extend(reader.read(timeout=0.3))
    return got


def logged(prefix: str, src: str, dst: str, protocol: int, **kw: Any) -> LoggedPacket:
    fields: dict[str, Any] = {"sport": None, "dport": None, "icmp_type": None, "indev": None, "outdev": None}
    fields.update(kw)
    return LoggedPacket(prefix=prefix, family=6 if ":" in src else 4, src=src, dst=dst, protocol=protocol, **fields)


# --- the reader ----------------------------------------------------------------------


def test_ipv4_udp_tcp_and_icmp_are_logged(pair: Pair) -> None:
    with NflogReader(GROUP, netns=pair.b) as reader:
        pair.udp(A4, 40001, B4, 9999)
        pair.tcp_syn(A4, 40002, B4, 7777)
        pair.ping(B4)
        got = collect(reader, 3)
        assert reader.dropped == 0
        assert reader.unparsed == 0
    assert got == [
        logged("veilnet drop ", A4, B4, 17, sport=40001, dport=9999, indev=pair.b0, src_mac=pair.a0_mac),
        logged("veilnet rate web-1 ", A4, B4, 6, sport=40002, dport=7777, indev=pair.b0, src_mac=pair.a0_mac),
        logged("veilnet drop ", A4, B4, 1, icmp_type=8, icmp_code=0, indev=pair.b0, src_mac=pair.a0_mac),
    ]


def test_ipv6_udp_and_icmpv6_are_logged(pair: Pair) -> None:
    with NflogReader(GROUP, netns=pair.b) as reader:
        pair.udp(A6, 40003, B6, 9999)
        pair.ping(B6)
        got = collect(reader, 2)
    assert got == [
        logged("veilnet drop ", A6, B6, 17, sport=40003, dport=9999, indev=pair.b0, src_mac=pair.a0_mac),
        logged("veilnet icmp-rate web-1 ", A6, B6, 58, icmp_type=128, icmp_code=0, indev=pair.b0,
               src_mac=pair.a0_mac),
    ]


def test_output_hook_reports_the_out_device(pair: Pair) -> None:
    with NflogReader(GROUP, netns=pair.b) as reader:
        with pytest.raises(PermissionError):  # a local sender learns of an output-hook drop
            pair.udp(B4, 40004, A4, 9998, netns=pair.b)
        got = collect(reader, 1)
    assert got == [logged("veilnet guard ", B4, A4, 17, sport=40004, dport=9998, outdev=pair.b0)]


def test_reader_sees_only_its_namespace_and_group(pair: Pair) -> None:
    with (
        NflogReader(GROUP, netns=pair.b) as reader,
        NflogReader(GROUP + 1, netns=pair.b) as other_group,
        NflogReader(GROUP, netns=pair.a) as other_ns,
    ):
        pair.udp(A4, 40005, B4, 9999)
        assert [p.sport for p in collect(reader, 1)] == [40005]
        assert other_group.read(timeout=0.1) == []
        assert other_ns.read(timeout=0.1) == []


def test_a_group_has_one_reader_until_it_closes(pair: Pair) -> None:
    first = NflogReader(GROUP, netns=pair.b)
    with pytest.raises(OSError) as refused:
        NflogReader(GROUP, netns=pair.b)
    assert refused.value.errno == errno.EPERM
    first.close()
    first.close()  # idempotent
    with NflogReader(GROUP, netns=pair.b) as second:
        pair.udp(A4, 40006, B4, 9999)
        assert [p.sport for p in collect(second, 1)] == [40006]


def test_receive_buffer_overflow_is_counted_and_reading_goes_on(pair: Pair) -> None:
    # one message per datagram and a tiny receive buffer: most of a burst cannot be queued
    with NflogReader(GROUP, netns=pair.b, qthresh=1, rcvbuf=4096) as reader:
        pair.udp(A4, 40007, B4, 9999, count=300)
        time.sleep(0.3)
        first = reader.read(timeout=1.0)
        assert reader.dropped >= 1
        assert 0 < len(first) < 300
        assert {(p.sport, p.dport) for p in first} == {(40007, 9999)}
        pair.udp(A4, 40008, B4, 9999)
        assert [p.sport for p in collect(reader, 1)] == [40008]


# --- reader + sink -----------------------------------------------------------------


def test_reader_thread_turns_real_packets_into_security_events(pair: Pair) -> None:
    frozen_clock = 1000.0
    stop = threading.Event()
    with capture_logs() as logs, NflogReader(GROUP, netns=pair.b) as reader:
        sink = SecurityEventSink(structlog.get_logger(), per_source_rate=5.0, burst=10, clock=lambda: frozen_clock)
        thread = run_reader_thread(reader, sink, stop)
        try:
            pair.udp(A4, 40009, B4, 9999, count=15)
            pair.ping(B6)
            deadline = time.monotonic() + 5
            while sum(e["event"] == "security_event" for e in logs) < 11 and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.3)
        finally:
            stop.set()
            thread.join(5)
        assert not thread.is_alive()
    udp_event = {
        "event": "security_event",
        "log_level": "warning",
        "kind": "drop",
        "segment": None,
        "src": A4,
        "dst": B4,
        "protocol": 17,
        "sport": 40009,
        "dport": 9999,
        "icmp_type": None,
        "src_mac": pair.a0_mac,
    }
    icmp_event = {
        "event": "security_event",
        "log_level": "warning",
        "kind": "icmp_rate_limit",
        "segment": "web-1",
        "src": A6,
        "dst": B6,
        "protocol": 58,
        "sport": None,
        "dport": None,
        "icmp_type": 128,
        "src_mac": pair.a0_mac,
    }
    suppressed = {"event": "security_events_suppressed", "log_level": "warning", "counts": {"drop": 5}, "total": 5}
    assert logs == [udp_event] * 10 + [icmp_event, suppressed]
