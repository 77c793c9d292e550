"""Security events without root: prefix parsing, rate limiting, the reader thread,
and the nfnetlink_log packet decoder on hand-built messages."""

from __future__ import annotations

import socket
import struct
import threading
import time
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from veilnet_agent.core.objects import LoggedPacket
from veilnet_agent.dataplane import security_events
from veilnet_agent.dataplane.security_events import SecurityEventSink, classify, run_reader_thread
from veilnet_agent.drivers import netlink, nflog


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def packet(prefix: str = "veilnet drop ", src: str = "192.0.2.1", **kw: Any) -> LoggedPacket:
    fields: dict[str, Any] = {
        "family": 4,
        "dst": "198.51.100.7",
        "protocol": 17,
        "sport": 40000,
        "dport": 9999,
        "icmp_type": None,
        "indev": 3,
        "outdev": 4,
    }
    fields.update(kw)
    return LoggedPacket(prefix=prefix, src=src, **fields)


def event(kind: str, segment: str | None = None, src: str = "192.0.2.1", **kw: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "kind": kind,
        "segment": segment,
        "src": src,
        "dst": "198.51.100.7",
        "protocol": 17,
        "sport": 40000,
        "dport": 9999,
        "icmp_type": None,
    }
    fields.update(kw)
    return {"event": "security_event", "log_level": "warning", **fields}


def suppressed(counts: dict[str, int]) -> dict[str, Any]:
    return {
        "event": "security_events_suppressed",
        "log_level": "warning",
        "counts": counts,
        "total": sum(counts.values()),
    }


def sink(clock: FakeClock, **kw: Any) -> SecurityEventSink:
    return SecurityEventSink(structlog.get_logger(), clock=clock, **kw)


# --- prefixes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [
        ("veilnet drop ", ("drop", None)),
        ("veilnet rate web-1 ", ("rate_limit", "web-1")),
        ("veilnet icmp-rate db ", ("icmp_rate_limit", "db")),
        ("veilnet guard ", ("cleartext_guard", None)),
        ("veilnet to-host ", ("to_host", None)),
        ("veilnet rate drop ", ("rate_limit", "drop")),
        ("veilnet rate " + "a" * 63 + " ", ("rate_limit", "a" * 63)),
    ],
)
def test_classify_our_prefixes(prefix: str, expected: tuple[str, str | None]) -> None:
    assert classify(prefix) == expected


@pytest.mark.parametrize(
    "prefix",
    [
        "",
        "veilnet drop",  # no trailing space
        "veilnet drop  ",
        "veilnet rate ",  # no segment
        "veilnet rate  ",
        "veilnet rate Web ",  # upper case is not a segment name
        "veilnet rate a b ",
        "veilnet rate " + "a" * 64 + " ",
        "veilnet icmp-rate web_1 ",
        "veilnet guard x ",
        "veilnet to-host",
        "Veilnet drop ",
        "other drop ",
        "IN=eth0 ",
    ],
)
def test_classify_rejects_other_prefixes(prefix: str) -> None:
    assert classify(prefix) is None


def test_each_kind_becomes_one_exact_event() -> None:
    clock = FakeClock()
    packets = [
        packet("veilnet drop "),
        packet("veilnet rate web-1 ", src="192.0.2.2", protocol=6, sport=1234, dport=80),
        packet(
            "veilnet icmp-rate web-1 ",
            src="2001:db8::5",
            dst="2001:db8::9",
            family=6,
            protocol=58,
            sport=None,
            dport=None,
            icmp_type=128,
        ),
        packet("veilnet guard ", src="203.0.113.9", dport=4789),
        packet("veilnet to-host ", src="192.0.2.3", protocol=6, sport=5555, dport=22),
    ]
    with capture_logs() as logs:
        events = sink(clock)
        assert events.handle(packets) == 5
    assert logs == [
        event("drop"),
        event("rate_limit", "web-1", src="192.0.2.2", protocol=6, sport=1234, dport=80),
        event(
            "icmp_rate_limit",
            "web-1",
            src="2001:db8::5",
            dst="2001:db8::9",
            protocol=58,
            sport=None,
            dport=None,
            icmp_type=128,
        ),
        event("cleartext_guard", src="203.0.113.9", dport=4789),
        event("to_host", src="192.0.2.3", protocol=6, sport=5555, dport=22),
    ]


def test_foreign_prefixes_are_ignored_and_counted() -> None:
    clock = FakeClock()
    with capture_logs() as logs:
        events = sink(clock)
        assert events.handle([packet("other "), packet("veilnet drop"), packet("veilnet drop ")]) == 1
        events.flush_suppressed()
    assert logs == [event("drop")]
    assert events.ignored == 2


# --- rate limiting --------------------------------------------------------------------


def test_per_source_bucket_burst_then_rate() -> None:
    clock = FakeClock()
    with capture_logs() as logs:
        events = sink(clock, per_source_rate=5.0, burst=10)
        assert events.handle([packet()] * 15) == 10
        assert events.handle([packet(src="192.0.2.2")] * 3) == 3  # another source has its own bucket
        assert events.handle([packet("veilnet guard ")] * 2) == 2  # and so has another kind
        clock.now += 1.0  # five tokens back
        assert events.handle([packet()] * 7) == 5
        clock.now += 0.1  # half a token: still nothing
        assert events.handle([packet()]) == 0
        clock.now += 0.1
        assert events.handle([packet()]) == 1
        events.flush_suppressed()
    assert logs.count(event("drop")) == 16
    assert logs.count(event("drop", src="192.0.2.2")) == 3
    assert logs.count(event("cleartext_guard")) == 2
    assert logs[-1] == suppressed({"drop": 8})


def test_bucket_never_holds_more_than_burst() -> None:
    clock = FakeClock()
    events = sink(clock, per_source_rate=5.0, burst=10)
    with capture_logs():
        events.handle([packet()])
        clock.now += 3600
        assert events.handle([packet()] * 12) == 10


def test_global_cap_across_sources() -> None:
    clock = FakeClock()
    sources = [f"192.0.2.{i}" for i in range(1, 31)]
    with capture_logs() as logs:
        events = sink(clock, global_rate=20.0)
        assert events.handle([packet(src=s) for s in sources]) == 20
        clock.now += 0.5  # ten global tokens
        # the ten sources refused before kept their own tokens and now get through
        assert events.handle([packet(src=s) for s in sources[20:]]) == 10
        events.flush_suppressed()
    assert [e["src"] for e in logs if e["event"] == "security_event"] == sources
    assert logs[-1] == suppressed({"drop": 10})


def test_global_burst_can_be_set() -> None:
    clock = FakeClock()
    events = sink(clock, global_rate=100.0, global_burst=3)
    with capture_logs():
        assert events.handle([packet(src=f"192.0.2.{i}") for i in range(1, 10)]) == 3


def test_suppressed_counts_reported_per_kind_after_interval() -> None:
    clock = FakeClock()
    with capture_logs() as logs:
        events = sink(clock, burst=1, report_interval=10.0)
        events.handle([packet()] * 3 + [packet("veilnet rate web ")] * 2 + [packet("veilnet to-host ")])
        clock.now += 9.0
        events.handle([])  # nothing yet: the interval has not passed
        assert [e["event"] for e in logs] == ["security_event"] * 3
        clock.now += 1.0
        events.handle([])
        assert logs[-1] == suppressed({"drop": 2, "rate_limit": 1})
        clock.now += 10.0
        events.handle([])  # counts were reset: nothing to report
        events.flush_suppressed()
    assert [e["event"] for e in logs].count("security_events_suppressed") == 1


def test_flush_suppressed_reports_immediately_and_resets() -> None:
    clock = FakeClock()
    with capture_logs() as logs:
        events = sink(clock, burst=2)
        events.handle([packet("veilnet icmp-rate db ", protocol=1, sport=None, dport=None, icmp_type=8)] * 5)
        events.flush_suppressed()
        events.flush_suppressed()
    assert logs[-1] == suppressed({"icmp_rate_limit": 3})
    assert len(logs) == 3


def test_source_table_is_bounded() -> None:
    clock = FakeClock()
    with capture_logs() as logs:
        events = sink(clock, per_source_rate=5.0, burst=10, max_sources=3)
        assert events.handle([packet(src=f"192.0.2.{i}") for i in (1, 2, 3, 4)]) == 3
        assert events.tracked_sources() == 3
        clock.now += 0.1  # buckets 1-3 are not full again yet: the new source is still refused
        assert events.handle([packet(src="192.0.2.5")]) == 0
        clock.now += 0.2  # now they are (9 + 0.3 * 5 >= 10) and are forgotten
        assert events.handle([packet(src="192.0.2.5"), packet(src="192.0.2.6")]) == 2
        assert events.tracked_sources() == 2
        events.flush_suppressed()
    assert logs[-1] == suppressed({"drop": 2})


def test_invalid_limits_are_rejected() -> None:
    with pytest.raises(ValueError):
        SecurityEventSink(structlog.get_logger(), per_source_rate=0)
    with pytest.raises(ValueError):
        SecurityEventSink(structlog.get_logger(), burst=0)


# --- reader thread ------------------------------------------------------------------------


class FakeReader:
    def __init__(self, batches: list[list[LoggedPacket] | Exception]) -> None:
        self.batches = batches
        self.dropped = 0
        self.reads = 0

    def read(self, timeout: float | None = None) -> list[LoggedPacket]:
        self.reads += 1
        if not self.batches:
            time.sleep(0.01)
            return []
        batch = self.batches.pop(0)
        if isinstance(batch, Exception):
            raise batch
        if batch and batch[0].dport == 1:
            self.dropped += 2  # this read "saw" two receive-buffer overflows
        return batch


def test_reader_thread_feeds_sink_reports_losses_and_flushes_on_stop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(security_events, "ERROR_BACKOFF", 0.01)
    clock = FakeClock()
    reader = FakeReader([[packet()] * 3, OSError(105, "No buffer space"), [packet(dport=1)]])
    stop = threading.Event()
    with capture_logs() as logs:
        events = sink(clock, burst=2)
        thread = run_reader_thread(reader, events, stop)
        assert thread.daemon
        deadline = time.monotonic() + 5
        while reader.batches and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)
        stop.set()
        thread.join(5)
        assert not thread.is_alive()
    assert logs == [
        event("drop"),
        event("drop"),
        {"event": "security_events_read_failed", "log_level": "error", "error": "OSError: [Errno 105] No buffer space"},
        {"event": "security_events_lost", "log_level": "warning", "overflows": 2},
        suppressed({"drop": 2}),  # the third packet of the first batch, and the one with dport 1
    ]


# --- the nfnetlink_log decoder (hand-built messages) ---------------------------------------


def nla(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def nflog_message(
    payload: bytes,
    prefix: bytes = b"veilnet drop \0",
    hw_protocol: int = 0x0800,
    indev: int | None = 7,
    outdev: int | None = None,
    family: int = socket.AF_INET,
) -> bytes:
    body = struct.pack("!BBH", family, 0, 7410)
    body += nla(nflog.NFULA_PACKET_HDR, struct.pack("!HBx", hw_protocol, 1))
    if indev is not None:
        body += nla(nflog.NFULA_IFINDEX_INDEV, struct.pack("!I", indev))
    if outdev is not None:
        body += nla(nflog.NFULA_IFINDEX_OUTDEV, struct.pack("!I", outdev))
    body += nla(nflog.NFULA_PREFIX, prefix) + nla(nflog.NFULA_PAYLOAD, payload)
    return body


def ipv4(protocol: int, l4: bytes, frag: int = 0, src: str = "192.0.2.1", dst: str = "198.51.100.2") -> bytes:
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(l4),
        1,
        frag,
        64,
        protocol,
        0,
        socket.inet_pton(socket.AF_INET, src),
        socket.inet_pton(socket.AF_INET, dst),
    )
    return header + l4


def ipv6(nexthdr: int, rest: bytes, src: str = "2001:db8::1", dst: str = "fd00::2") -> bytes:
    return (
        struct.pack(
            "!IHBB16s16s",
            6 << 28,
            len(rest),
            nexthdr,
            64,
            socket.inet_pton(socket.AF_INET6, src),
            socket.inet_pton(socket.AF_INET6, dst),
        )
        + rest
    )


def test_decode_ipv4_udp_with_devices() -> None:
    got = nflog.parse_packet(nflog_message(ipv4(17, struct.pack("!HHHH", 40000, 9999, 8, 0)), outdev=9))
    assert got == LoggedPacket("veilnet drop ", 4, "192.0.2.1", "198.51.100.2", 17, 40000, 9999, None, 7, 9)


def test_decode_ipv4_icmp_and_truncated_and_fragment() -> None:
    icmp = nflog.parse_packet(nflog_message(ipv4(1, bytes([8, 0, 0, 0, 0, 1, 0, 1]))))
    assert icmp is not None
    assert (icmp.protocol, icmp.icmp_type, icmp.icmp_code, icmp.sport, icmp.dport) == (1, 8, 0, None, None)
    truncated = nflog.parse_packet(nflog_message(ipv4(6, b"\x9c")))  # copy range cut the TCP header
    assert truncated is not None
    assert (truncated.protocol, truncated.sport, truncated.dport) == (6, None, None)
    later_fragment = nflog.parse_packet(nflog_message(ipv4(17, struct.pack("!HH", 1, 2), frag=185)))
    assert later_fragment is not None
    assert (later_fragment.sport, later_fragment.dport) == (None, None)


def test_decode_ipv6_through_extension_headers() -> None:
    tcp = struct.pack("!HHII", 5555, 443, 0, 0)
    hop_by_hop = bytes([6, 0]) + b"\0" * 6  # next header tcp, 8 bytes
    got = nflog.parse_packet(nflog_message(ipv6(0, hop_by_hop + tcp), hw_protocol=0x86DD, family=socket.AF_INET6))
    assert got == LoggedPacket("veilnet drop ", 6, "2001:db8::1", "fd00::2", 6, 5555, 443, None, 7, None)
    first_fragment = struct.pack("!BBHI", 58, 0, 0x0001, 42)  # offset 0, more fragments
    got = nflog.parse_packet(nflog_message(ipv6(44, first_fragment + bytes([128, 0, 0, 0])), hw_protocol=0x86DD))
    assert got is not None
    assert (got.protocol, got.icmp_type, got.icmp_code) == (58, 128, 0)
    later_fragment = struct.pack("!BBHI", 17, 0, 0x0008, 42)  # offset 8 bytes
    got = nflog.parse_packet(nflog_message(ipv6(44, later_fragment + b"\0" * 8), hw_protocol=0x86DD))
    assert got is not None
    assert (got.protocol, got.sport, got.dport) == (17, None, None)


def test_decode_skips_non_ip_and_missing_payload() -> None:
    assert nflog.parse_packet(nflog_message(b"\0\1\x08\0" + b"\0" * 24, hw_protocol=0x0806)) is None
    assert nflog.parse_packet(nflog_message(b"")) is None
    assert nflog.parse_packet(nflog_message(b"\x45" + b"\0" * 10)) is None  # shorter than an IPv4 header


def test_iter_messages_splits_a_batch() -> None:
    packet_type = (nflog.NFNL_SUBSYS_ULOG << 8) | nflog.NFULNL_MSG_PACKET
    bodies = [nflog_message(ipv4(17, struct.pack("!HH", p, 9999))) for p in (1000, 1001)]
    data = b"".join(struct.pack("=IHHII", 16 + len(b), packet_type, 2, 0, 0) + b for b in bodies)
    data += struct.pack("=IHHII", 20, netlink.NLMSG_DONE, 2, 0, 0) + b"\0" * 4
    messages = list(nflog.iter_messages(data))
    assert [m[0] for m in messages] == [packet_type, packet_type, netlink.NLMSG_DONE]
    decoded = [nflog.parse_packet(m[2]) for m in messages[:2]]
    assert [p.sport for p in decoded if p is not None] == [1000, 1001]


def test_bind_request_encoding() -> None:
    attrs = nflog.bind_attrs(copy_range=128, nlbufsiz=None, qthresh=16, timeout_cs=10)
    message = nflog.config_message(7410, attrs, seq=5)
    length, msg_type, flags, seq, pid = struct.unpack_from("=IHHII", message)
    assert (length, msg_type, flags, seq, pid) == (len(message), 0x0401, 0x05, 5, 0)
    assert struct.unpack_from("!BBH", message, 16) == (socket.AF_UNSPEC, 0, 7410)
    parsed = nflog.parse_attrs(message, 20)
    assert parsed == {
        nflog.NFULA_CFG_CMD: bytes([1]),
        nflog.NFULA_CFG_MODE: struct.pack("!IBx", 128, 2),
        nflog.NFULA_CFG_QTHRESH: struct.pack("!I", 16),
        nflog.NFULA_CFG_TIMEOUT: struct.pack("!I", 10),
    }
