"""Security events: what the firewall logged to nflog, as rate-limited structlog records.

The firewall's ``log`` statements use these prefixes (see docs/firewall.md),
each mapped to an event ``kind`` (``segment`` is ``[a-z0-9-]{1,63}``):

- ``"veilnet drop "`` -> ``drop``
- ``"veilnet rate <segment> "`` -> ``rate_limit``
- ``"veilnet icmp-rate <segment> "`` -> ``icmp_rate_limit``
- ``"veilnet guard "`` -> ``cleartext_guard``
- ``"veilnet to-host "`` -> ``to_host``
- ``"veilnet spoof "`` -> ``spoof`` (a local endpoint claimed a MAC or address not its own)
- ``"veilnet peer-spoof "`` -> ``peer_spoof`` (a peer sent a frame it may not send)
- ``"veilnet peer-unknown "`` -> ``peer_unknown`` (a peer's frame from a MAC or address nobody here knows)

Spoofing events also carry what an ``explain`` callback adds (see
``spoof_events``): the endpoint or peer, what it claimed, what it owns.

Other prefixes are ignored (counted in ``SecurityEventSink.ignored``).

Each packet becomes one ``security_event`` warning, unless a token bucket
says otherwise: one per (kind, source address) and one for everything. The
sources are attacker-chosen, so the per-source table is bounded: buckets
that have refilled are forgotten, and when ``max_sources`` are still busy a
new source's events are suppressed. Suppressed events are counted per kind
and reported as ``security_events_suppressed`` every ``report_interval``
seconds (on the next :meth:`SecurityEventSink.handle`) and on
:meth:`SecurityEventSink.flush_suppressed`.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import structlog

from ..core.objects import LoggedPacket
from .ports import PacketSource

DROP = "drop"
RATE_LIMIT = "rate_limit"
ICMP_RATE_LIMIT = "icmp_rate_limit"
CLEARTEXT_GUARD = "cleartext_guard"
TO_HOST = "to_host"
SPOOF = "spoof"
PEER_SPOOF = "peer_spoof"
PEER_UNKNOWN = "peer_unknown"

_FIXED_KINDS = {"drop": DROP, "guard": CLEARTEXT_GUARD, "to-host": TO_HOST, "spoof": SPOOF, "peer-spoof": PEER_SPOOF,
                "peer-unknown": PEER_UNKNOWN}
_SEGMENT_KINDS = {"rate": RATE_LIMIT, "icmp-rate": ICMP_RATE_LIMIT}
_PREFIX = re.compile(
    r"veilnet (?:(drop|guard|to-host|spoof|peer-spoof|peer-unknown)|(rate|icmp-rate) ([a-z0-9-]{1,63})) ")
Explain = Callable[[str, LoggedPacket], Mapping[str, object]]

READ_TIMEOUT = 0.5  # seconds the reader thread waits for packets before checking ``stop``
ERROR_BACKOFF = 1.0  # seconds the reader thread waits after a failed read


def classify(prefix: str) -> tuple[str, str | None] | None:
    """(kind, segment or None) of a firewall log prefix; None if the prefix is not ours."""
    match = _PREFIX.fullmatch(prefix)
    if match is None:
        return None
    fixed, with_segment, segment = match.groups()
    if fixed is not None:
        return _FIXED_KINDS[fixed], None
    return _SEGMENT_KINDS[with_segment], segment


@dataclass
class _Bucket:
    tokens: float
    stamp: float

    def refill(self, now: float, rate: float, burst: float) -> None:
        self.tokens = min(burst, self.tokens + max(0.0, now - self.stamp) * rate)
        self.stamp = now


class SecurityEventSink:
    """Turns logged packets into ``security_event`` records, rate-limited. Thread-safe."""

    def __init__(
        self,
        log: structlog.typing.FilteringBoundLogger,
        per_source_rate: float = 5.0,
        burst: int = 10,
        global_rate: float = 100.0,
        clock: Callable[[], float] = time.monotonic,
        *,
        global_burst: float | None = None,
        report_interval: float = 10.0,
        max_sources: int = 4096,
        explain: Explain | None = None,
    ) -> None:
        if per_source_rate <= 0 or global_rate <= 0 or burst < 1 or max_sources < 1:
            raise ValueError("rates must be positive, burst and max_sources at least 1")
        self.log = log
        self._rate = per_source_rate
        self._burst = float(burst)
        self._global_rate = global_rate
        self._global_burst = max(1.0, global_rate if global_burst is None else global_burst)
        self._clock = clock
        self._report_interval = report_interval
        self._max_sources = max_sources
        now = clock()
        self._global = _Bucket(self._global_burst, now)
        self._sources: dict[tuple[str, str], _Bucket] = {}
        self._suppressed: Counter[str] = Counter()
        self._last_report = now
        self._pruned_at: float | None = None
        self._lock = threading.Lock()
        self._explain = explain
        self.ignored = 0  # packets whose prefix is not one of ours

    def handle(self, packets: Iterable[LoggedPacket]) -> int:
        """Emit events for ``packets`` (those the buckets allow); returns how many were emitted."""
        with self._lock:
            now = self._clock()
            emitted = 0
            for packet in packets:
                emitted += self._handle_one(packet, now)
            if now - self._last_report >= self._report_interval:
                self._flush(now)
            return emitted

    def flush_suppressed(self) -> None:
        """Report (and reset) the suppressed counts now, if there are any."""
        with self._lock:
            self._flush(self._clock())

    def tracked_sources(self) -> int:
        """Per-source buckets currently held (bounded by ``max_sources``)."""
        return len(self._sources)

    def _handle_one(self, packet: LoggedPacket, now: float) -> int:
        classified = classify(packet.prefix)
        if classified is None:
            self.ignored += 1
            return 0
        kind, segment = classified
        if not self._admit((kind, packet.src or packet.src_mac or ""), now):
            self._suppressed[kind] += 1
            return 0
        fields: dict[str, object] = {
            "kind": kind, "segment": segment, "src": packet.src, "dst": packet.dst, "protocol": packet.protocol,
            "sport": packet.sport, "dport": packet.dport, "icmp_type": packet.icmp_type,
        }
        if packet.src_mac is not None:
            fields["src_mac"] = packet.src_mac
        if packet.ethertype is not None:
            fields["ethertype"] = packet.ethertype
        if self._explain is not None and kind in (SPOOF, PEER_SPOOF, PEER_UNKNOWN):
            try:
                fields.update(self._explain(kind, packet))
            except Exception as exc:  # the event goes out anyway, without the explanation
                fields["explain_error"] = f"{type(exc).__name__}: {exc}"
        self.log.warning("security_event", **fields)
        return 1

    def _admit(self, key: tuple[str, str], now: float) -> bool:
        bucket = self._source_bucket(key, now)
        if bucket is None:
            return False
        bucket.refill(now, self._rate, self._burst)
        self._global.refill(now, self._global_rate, self._global_burst)
        if bucket.tokens < 1 or self._global.tokens < 1:
            return False
        bucket.tokens -= 1
        self._global.tokens -= 1
        return True

    def _source_bucket(self, key: tuple[str, str], now: float) -> _Bucket | None:
        bucket = self._sources.get(key)
        if bucket is not None:
            return bucket
        if len(self._sources) >= self._max_sources:
            if now == self._pruned_at:
                return None  # already pruned at this instant: the table is busy
            self._forget_idle(now)
            if len(self._sources) >= self._max_sources:
                return None
        bucket = self._sources[key] = _Bucket(self._burst, now)
        return bucket

    def _forget_idle(self, now: float) -> None:
        """Drop buckets that have refilled: a new bucket would behave the same."""
        self._pruned_at = now
        idle = [k for k, b in self._sources.items() if b.tokens + (now - b.stamp) * self._rate >= self._burst]
        for key in idle:
            del self._sources[key]

    def _flush(self, now: float) -> None:
        self._last_report = now
        self._forget_idle(now)
        if not self._suppressed:
            return
        counts = dict(sorted(self._suppressed.items()))
        self._suppressed.clear()
        self.log.warning("security_events_suppressed", counts=counts, total=sum(counts.values()))


def run_reader_thread(reader: PacketSource, sink: SecurityEventSink, stop: threading.Event) -> threading.Thread:
    """Start a daemon thread feeding ``reader`` into ``sink`` until ``stop`` is set.

    Join the thread (it notices ``stop`` within ``READ_TIMEOUT``) before
    closing the reader. Receive-buffer overflows are reported as
    ``security_events_lost``; read failures are logged and retried.
    """
    thread = threading.Thread(target=_reader_loop, args=(reader, sink, stop), name="veilnet-nflog", daemon=True)
    thread.start()
    return thread


def _reader_loop(reader: PacketSource, sink: SecurityEventSink, stop: threading.Event) -> None:
    lost = reader.dropped
    while not stop.is_set():
        try:
            sink.handle(reader.read(timeout=READ_TIMEOUT))
        except Exception as exc:
            if stop.is_set():
                break
            sink.log.error("security_events_read_failed", error=f"{type(exc).__name__}: {exc}")
            stop.wait(ERROR_BACKOFF)
            continue
        if reader.dropped != lost:
            sink.log.warning("security_events_lost", overflows=reader.dropped - lost)
            lost = reader.dropped
    sink.flush_suppressed()
