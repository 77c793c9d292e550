"""The distribution hub: one compiled state per node, one session per connected agent.

Everything runs on the controller's asyncio loop. A change (new spec
revision, a node's new WireGuard key, endpoints attached on a node, a
revocation) marks the compiled states stale; one recompile, coalesced over a
short window, produces every node's new state. Each session then holds a
*target*: its sender computes the delta from what it last sent to the latest
target only when the stream is ready for it, so a slow agent receives one
coalesced delta instead of a backlog (Felix-style: record, then apply).

Attached endpoints: the list a node reports (hello, then on every change) is
authoritative and persisted as it is. Each endpoint in it is accepted or
refused on its own (``attached_endpoint_rejected`` names node, endpoint,
field and reason); an accepted endpoint keeps its name, MAC, addresses and
slot against any later claimant. The claims of accepted endpoints live in one
table (``spec.AttachedClaims``), updated incrementally when one node's report
changes and rebuilt in one pass, earliest accepted first, when the spec
changes.

IPsec epoch keys (docs/control-plane.md, "IPsec epoch keys"): a node's signed
public half of its newest epoch key is checked for form (the signature is the
receivers' to verify), kept in memory with the node's current certificate and
relayed, unchanged, to every connected node that has it as a compiled peer;
SA confirmations go to the one peer they name. Relays wait in their own queue
behind a session's state update, so a node never hears of a key before the
state that made its signer its peer. The controller never holds a session key.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog

from veilnet.v1 import controller_pb2 as cpb
from veilnet_agent.control import wire
from veilnet_agent.core import validate
from veilnet_agent.core.errors import ValidationError

from .compile import compile_nodes
from .spec import AttachedClaims, EndpointSpec, NetworkSpec, parse_attached_endpoint, parse_spec_text
from .store import Store
from .trust import CertificateTrust

RECOMPILE_DELAY = 0.05  # seconds: coalesce bursts (1,000 agents saying hello) into one compile
EPOCH_PUBLIC_KEY_BYTES = 32  # X25519
MAX_EPOCH_SIGNATURE_BYTES = 200  # a DER ECDSA signature: 72 bytes for P-256, 139 for P-521
MAX_PENDING_RELAYS = 10_000  # per session; keys are coalesced per signer, confirmations beyond this dropped
MAX_STATUS_PEERS = 10_000  # per-peer encryption entries kept from one status report (MAX_NODES)


def now_utc() -> datetime:
    return datetime.now(UTC)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


@dataclass
class NodeRuntime:
    """What the controller knows about a node's agent right now (memory only)."""

    applied_spec_revision: int = 0
    last_error: str = ""
    rejected_spec_revision: int = 0
    last_seen: datetime | None = None
    capabilities: tuple[str, ...] = ()
    peers_with_recent_handshake: int = 0
    drift_repairs: int = 0
    # Per-peer encryption from the last status report (IPsec mode), as reported, strings bounded.
    encryption: tuple[dict[str, Any], ...] = ()


_PEER_ENCRYPTION_TEXT = ("peer", "mode", "state")
_PEER_ENCRYPTION_NUMBERS = ("epoch", "peer_epoch", "epoch_age_seconds", "bytes_out", "packets_out", "bytes_in",
                            "packets_in", "replay_failures", "integrity_failures")


def peer_encryption(entry: cpb.PeerEncryption) -> dict[str, Any]:
    """One PeerEncryption of an agent's status as a plain dict (the agent's strings cut to 100 characters)."""
    out: dict[str, Any] = {k: _cut(getattr(entry, k), 100) for k in _PEER_ENCRYPTION_TEXT}
    out.update({k: getattr(entry, k) for k in _PEER_ENCRYPTION_NUMBERS})
    return out


@dataclass
class AttachedReport:
    """The endpoints a node last reported as attached, and what became of each (by position in ``raws``)."""

    raws: list[dict[str, Any]]
    parsed: list[EndpointSpec | ValidationError]  # the spec-independent checks, done once per report
    accepted: dict[int, EndpointSpec] = field(default_factory=dict)
    rejected: dict[int, tuple[str, str]] = field(default_factory=dict)  # (field, reason) of the last refusal

    @classmethod
    def parse(cls, node: str, raws: list[dict[str, Any]]) -> AttachedReport:
        parsed: list[EndpointSpec | ValidationError] = []
        for i, raw in enumerate(raws):
            try:
                parsed.append(parse_attached_endpoint(node, raw, f"endpoints[{i}]"))
            except ValidationError as exc:
                parsed.append(exc)
        return cls(raws, parsed)

    def name_at(self, position: int) -> str:
        name = self.raws[position].get("name") if isinstance(self.raws[position], dict) else None
        return name if isinstance(name, str) else ""


MAX_AUDITED_ATTACHMENTS = 1000  # per report; "count" says how many there were


def _attachment_summary(raw: dict[str, Any]) -> dict[str, Any]:
    """The parts of an attached endpoint other hosts will trust (not its local netns and interface names)."""
    if not isinstance(raw, dict):
        return {"invalid": str(raw)[:200]}
    return {k: raw[k] for k in ("name", "segment", "mac", "ipv4", "ipv6", "labels") if k in raw}


def empty_state(node: str) -> dict[str, Any]:
    """The target of a node with a session but no compiled state: in no network, keeps only its address."""
    return {"node": node, "transport_address": "", "segments": [], "endpoints": [], "peers": [], "policies": []}


def _is_empty_state(state: dict[str, Any] | None) -> bool:
    return (state is not None and state["transport_address"] == "" and not state["segments"]
            and not state["endpoints"] and not state["peers"] and not state["policies"])


class KeyConflict(Exception):
    """A node presented a WireGuard public key another node already holds."""


class InvalidKey(Exception):
    """A WireGuard public key that is not the canonical base64 spelling of 32 bytes."""


def canonical_wireguard_key(key: str) -> str:
    """``key`` if it is exactly the standard base64 of 32 bytes (no whitespace, no newline), else InvalidKey.

    The uniqueness check compares strings, so two spellings of one key (a trailing newline, say) must never
    both get in: the server passes the validator's canonical value, and the hub refuses anything else.
    """
    try:
        raw = base64.b64decode(key.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise InvalidKey(f"not base64 (got {key!r})") from None
    if len(raw) != 32 or base64.b64encode(raw).decode("ascii") != key:
        raise InvalidKey(f"not the canonical base64 of a 32-byte key (got {key!r})")
    return key


class Session:
    """One agent's Sync stream."""

    def __init__(self, node: str, serial: str, certificate_pem: bytes = b"") -> None:
        self.node = node
        self.serial = serial
        self.certificate_pem = certificate_pem  # the client certificate the stream was opened with
        self.sequence = 0
        self.sent_state: dict[str, Any] | None = None
        self.sent_revision = 0
        self.target: dict[str, Any] | None = None
        self.target_revision = 0
        self.commands: deque[cpb.Command] = deque()
        self.memo: wire.Memo | None = None  # protos of the shared parts of the target's compile
        self.wake = asyncio.Event()
        self.closed_reason: str | None = None
        self.unauthenticated = False  # closed because its certificate is no longer acceptable
        self.expiry: asyncio.TimerHandle | None = None  # fires when the certificate stops being acceptable
        self.rearm: Callable[[], None] | None = None  # recomputes ``expiry`` (a renewal retired the serial)
        # Relayed IPsec messages (epoch keys, SA confirmations), sent after any state update.
        self.relays: deque[cpb.ControllerMessage] = deque()
        self._pending_keys: dict[str, cpb.ControllerMessage] = {}  # signer -> its key waiting in ``relays``
        self.relayed: set[tuple[str, int]] = set()  # (signer, epoch) of keys sent on this stream
        self.known_peers: frozenset[str] = frozenset()  # the target's peers when relays were last queued
        self.refusals_audited: set[str] = set()  # kinds of refused IPsec messages audited for this stream
        self._sent_peers: tuple[object, frozenset[str]] = (None, frozenset())

    def close(self, reason: str, *, unauthenticated: bool = False) -> None:
        if self.closed_reason is None:
            self.closed_reason = reason
            self.unauthenticated = unauthenticated
        self.cancel_expiry()
        self.wake.set()

    def cancel_expiry(self) -> None:
        if self.expiry is not None:
            self.expiry.cancel()
            self.expiry = None

    def set_target(self, state: dict[str, Any] | None, revision: int, memo: wire.Memo | None = None) -> None:
        self.target = state
        self.target_revision = revision
        self.memo = memo
        self.wake.set()

    def next_message(self) -> cpb.ControllerMessage | None:
        """The next message to send, or None if there is nothing new: commands, then the state update, then
        relays (so a key never arrives before the state that made its signer this node's peer)."""
        if self.commands:
            return cpb.ControllerMessage(command=self.commands.popleft())
        update = self._next_update()
        return update if update is not None else self._next_relay()

    def queue_key(self, message: cpb.ControllerMessage) -> None:
        """Queue a relayed epoch key: once per (signer, epoch) per stream; a newer key of the same signer
        still waiting replaces the older one in its place."""
        key = message.epoch_key
        if (key.node, key.epoch) in self.relayed:
            return
        pending = self._pending_keys.get(key.node)
        if pending is not None:
            if pending.epoch_key.epoch < key.epoch:
                pending.CopyFrom(message)
            return
        self._pending_keys[key.node] = message  # at most one per signer: not bounded further
        self.relays.append(message)
        self.wake.set()

    def queue_confirmation(self, message: cpb.ControllerMessage) -> bool:
        if len(self.relays) >= MAX_PENDING_RELAYS:
            return False
        self.relays.append(message)
        self.wake.set()
        return True

    def sent_peers(self) -> frozenset[str]:
        """Names of the peers in the state last sent (cached per state)."""
        state = self.sent_state
        if self._sent_peers[0] is not state:
            self._sent_peers = (state, frozenset(p["name"] for p in state["peers"]) if state else frozenset())
        return self._sent_peers[1]

    def _next_relay(self) -> cpb.ControllerMessage | None:
        while self.relays:
            message = self.relays.popleft()
            if message.WhichOneof("kind") == "epoch_key":
                key = message.epoch_key
                self._pending_keys.pop(key.node, None)
                source = key.node
            else:
                source = message.sa_ready.peer
            # The state this node holds must have the source as a peer (it may have been removed meanwhile;
            # a recompile that makes it a peer again queues its key again).
            if source not in self.sent_peers():
                continue
            if message.WhichOneof("kind") == "epoch_key":
                if (key.node, key.epoch) in self.relayed:
                    continue
                self.relayed.add((key.node, key.epoch))
            return message
        return None

    def _next_update(self) -> cpb.ControllerMessage | None:
        if self.target is None or self.target is self.sent_state:
            return None
        update = cpb.NodeUpdate(spec_revision=self.target_revision, base_sequence=self.sequence)
        if self.sent_state is None:
            update.snapshot.CopyFrom(wire.state_to_proto(self.target, self.memo))
        else:
            delta = wire.diff_states(self.sent_state, self.target)
            if delta.is_empty() and self.target_revision == self.sent_revision:
                self.sent_state = self.target
                return None
            update.delta.CopyFrom(wire.delta_to_proto(delta, self.memo))
        self.sequence += 1
        update.sequence = self.sequence
        self.sent_state = self.target
        self.sent_revision = self.target_revision
        return cpb.ControllerMessage(update=update)


class Hub:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.log = structlog.get_logger("veilnet.controller.hub")
        self.spec: NetworkSpec | None = None
        self.spec_revision = 0
        self.states: dict[str, dict[str, Any]] = {}
        self.sessions: dict[str, Session] = {}
        self.runtime: dict[str, NodeRuntime] = {}
        self.public_keys: dict[str, str] = {}
        self.reports: dict[str, AttachedReport] = {}  # as persisted: nodes that reported none are absent
        self.attached: dict[str, tuple[EndpointSpec, ...]] = {}  # the accepted ones, in report order
        self._claims: AttachedClaims | None = None  # of the accepted attachments, for self.spec
        self._acceptance: dict[tuple[str, str], int] = {}  # (node, endpoint name) -> when it was accepted
        self._acceptances = 0
        self._with_rejections: set[str] = set()  # nodes with refused endpoints (retried when claims are freed)
        self.trust = CertificateTrust()
        self._recompile_task: asyncio.Task[None] | None = None
        self.compile_seconds = 0.0
        self._compiled: dict[str, Any] = {}  # the last compile's shared parts, reused when unchanged
        self.proto_memo: wire.Memo = {}
        self.compiles = 0  # how many recompiles ran (coalescing shows here)
        # IPsec: each node's newest epoch key (public half, as it sent it; memory only, never persisted) and
        # the certificate of its newest stream, relayed with it.
        self.epoch_keys: dict[str, cpb.EpochKey] = {}
        self.certificates: dict[str, bytes] = {}
        self._peer_sets: dict[str, tuple[object, frozenset[str]]] = {}  # node -> (its state, its peers' names)

    @property
    def revoked_nodes(self) -> set[str]:
        return self.trust.revoked_nodes

    @property
    def revoked_serials(self) -> set[str]:
        return self.trust.revoked

    # ------------------------------------------------------------------ loading

    def load(self) -> None:
        """Rebuild everything from the store (controller start)."""
        record = self.store.revision()
        if record is not None:
            self.spec_revision = record.number
            try:
                self.spec = parse_spec_text(record.spec_text)
            except ValidationError as exc:
                # Stored by an older version that accepted what is refused now. Start anyway, with nothing to
                # say: agents keep enforcing their last state until an operator applies a corrected spec.
                self.log.error("stored_spec_refused", revision=record.number, field=exc.field,
                               reason=exc.reason, value=str(exc.value),
                               note="agents keep their last state; apply a corrected spec")
        for node in self.store.nodes():
            if node.wireguard_public_key:
                try:
                    self.public_keys[node.name] = validate.wg_public_key(node.wireguard_public_key,
                                                                         f"stored key of {node.name}")
                except ValidationError as exc:  # as above: the node registers its key again on its next hello
                    self.log.error("stored_key_refused", node=node.name, reason=exc.reason,
                                   note="the node is no peer until it reconnects")
            if node.revoked_at is not None:
                self.revoked_nodes.add(node.name)
            self.runtime.setdefault(node.name, NodeRuntime()).capabilities = node.capabilities
        self.trust.revoked.update(self.store.revoked_serials())
        self.trust.retiring.update(self.store.retiring_certificates())
        # Acceptance order is not persisted: after a restart, earlier node names win a conflict.
        self.reports = {node: AttachedReport.parse(node, raws)
                        for node, raws in self.store.attached_endpoints().items()}
        self.revalidate_attached()
        self.recompile_now()

    # ------------------------------------------------------------------ compiling

    def recompile_now(self) -> None:
        self.compiles += 1
        started = time.perf_counter()
        if self.spec is None:
            self.states = {}
        else:
            try:
                self.states = compile_nodes(self.spec, self.public_keys, self.attached, excluded=self.revoked_nodes,
                                            previous=self._compiled)
            except ValidationError as exc:  # keys are checked on arrival; this is a last line of defence
                self.log.error("compile_failed", field=exc.field, reason=exc.reason, note="previous states kept")
                return
        self.compile_seconds = time.perf_counter() - started
        self.proto_memo = {}
        for node, session in self.sessions.items():
            session.set_target(self._state_of(node), self.spec_revision, self.proto_memo)
            self._queue_peer_keys(session)
        self.log.info("compiled", revision=self.spec_revision, nodes=len(self.states),
                      seconds=round(self.compile_seconds, 4))

    def _state_of(self, node: str) -> dict[str, Any] | None:
        state = self.states.get(node)
        if state is not None:
            return state
        session = self.sessions.get(node)
        if session is None or self.spec is None:
            return None  # no spec yet: the controller has nothing to say
        # Not in the spec (or revoked): in no network. The same object once sent, so nothing more goes out.
        return session.target if _is_empty_state(session.target) else empty_state(node)

    def request_recompile(self) -> None:
        if self._recompile_task is None or self._recompile_task.done():
            self._recompile_task = asyncio.get_running_loop().create_task(self._delayed_recompile())

    async def _delayed_recompile(self) -> None:
        # Coalesce for longer when compiling is expensive: a hello storm of new keys then costs a few
        # recompiles (each followed by a delta to every session) instead of one every RECOMPILE_DELAY.
        await asyncio.sleep(max(RECOMPILE_DELAY, 4 * self.compile_seconds))
        self.recompile_now()

    def set_spec(self, spec: NetworkSpec, revision: int) -> None:
        self.spec = spec
        self.spec_revision = revision
        # Attached endpoints that no longer fit the spec (segment removed, address now taken) are dropped.
        self.revalidate_attached()
        self.recompile_now()

    # ------------------------------------------------------------------ attached endpoints

    def revalidate_attached(self) -> None:
        """Accept or refuse every reported endpoint against the current spec, in one pass over one fresh table.

        Endpoints accepted before go first, in the order they were accepted, so they keep their claims;
        then the others by node name and position.
        """
        previous = {node: report.rejected for node, report in self.reports.items()}
        self.attached = {}
        self._with_rejections = set()
        spec = self.spec
        if spec is None:
            self._claims = None
            self._acceptance = {}
            for report in self.reports.values():
                report.accepted, report.rejected = {}, {}
            return
        table = self._claims = AttachedClaims(spec)
        earlier: list[tuple[int, str, int]] = []  # (acceptance, node, position)
        later: list[tuple[str, int]] = []
        for node, report in self.reports.items():
            was = report.accepted
            report.accepted, report.rejected = {}, {}
            if not table.knows(node):
                continue
            for position in range(len(report.parsed)):
                e = was.get(position)
                order = None if e is None else self._acceptance.get((node, e.name))
                if order is None:
                    later.append((node, position))
                else:
                    earlier.append((order, node, position))
        earlier.sort()
        later.sort()
        acceptance: dict[tuple[str, str], int] = {}
        for order, node, position in earlier:
            e = self._try(table, node, position)
            if e is not None:
                acceptance[(node, e.name)] = order
        for node, position in later:
            e = self._try(table, node, position)
            if e is not None:
                self._acceptances += 1
                acceptance[(node, e.name)] = self._acceptances
        self._acceptance = acceptance
        for node, report in self.reports.items():
            if report.accepted:
                self.attached[node] = self._in_report_order(report)
            if report.rejected:
                self._with_rejections.add(node)
                self._log_rejections(node, report, previous.get(node, {}))

    def _try(self, table: AttachedClaims, node: str, position: int) -> EndpointSpec | None:
        """Accept (claim) or refuse the endpoint at ``position`` of ``node``'s report; recorded in the report."""
        report = self.reports[node]
        e = report.parsed[position]
        if not isinstance(e, ValidationError):
            try:
                table.check(e, f"endpoints[{position}]")
            except ValidationError as exc:
                e = exc
            else:
                table.claim(e, f"endpoint {e.name} attached on {node}")
                report.accepted[position] = e
                report.rejected.pop(position, None)
                return e
        report.rejected[position] = (e.field, e.reason)
        return None

    @staticmethod
    def _in_report_order(report: AttachedReport) -> tuple[EndpointSpec, ...]:
        return tuple(report.accepted[p] for p in sorted(report.accepted))

    def _log_rejections(self, node: str, report: AttachedReport, before: dict[int, tuple[str, str]]) -> None:
        """Log the refusals that are new (or have a new reason) since ``before``."""
        for position, (field_path, reason) in sorted(report.rejected.items()):
            if before.get(position) != (field_path, reason):
                self.log.warning("attached_endpoint_rejected", node=node, endpoint=report.name_at(position),
                                 field=field_path, reason=reason)

    def _report_attached(self, session: Session, raws: list[dict[str, Any]]) -> bool:
        """Record the session's node's reported attachments (persisted even when empty or without a spec).

        Only that node's endpoints are re-validated: its old claims are released, its new endpoints checked
        against the table; then refused endpoints of other nodes are retried if claims were freed.
        True if an accepted set changed (a recompile is due).
        """
        node = session.node
        current = self.reports.get(node)
        if (current.raws if current is not None else []) == raws:
            return False
        self.store.set_attached_endpoints(node, raws)
        # What a node claims for its containers (addresses, labels that policies trust) is on the record.
        self.store.append_audit(node, "node", "node.attach", node, None,
                                {"endpoints": [_attachment_summary(r) for r in raws[:MAX_AUDITED_ATTACHMENTS]],
                                 "count": len(raws)}, actor_serial=session.serial)
        report = AttachedReport.parse(node, raws) if raws else None
        if report is None:
            self.reports.pop(node, None)
        else:
            self.reports[node] = report
        if self.spec is None:
            return False  # set_spec validates it
        table = self._claims
        if table is None or table.spec is not self.spec:  # the spec was set without set_spec: rebuild all
            self.revalidate_attached()
            return True
        old = current.accepted if current is not None else {}
        for e in old.values():
            table.release(e)
        self._with_rejections.discard(node)
        if report is not None and table.knows(node):
            for position in range(len(report.parsed)):
                self._try(table, node, position)
        accepted = report.accepted if report is not None else {}
        names = {e.name for e in accepted.values()}
        for e in old.values():
            if e.name not in names:
                self._acceptance.pop((node, e.name), None)
        for name in names:
            if (node, name) not in self._acceptance:
                self._acceptances += 1
                self._acceptance[(node, name)] = self._acceptances
        before = self.attached.get(node, ())
        if accepted:
            assert report is not None
            self.attached[node] = self._in_report_order(report)
        else:
            self.attached.pop(node, None)
        if report is not None and report.rejected:
            self._with_rejections.add(node)
            self._log_rejections(node, report, {})
        changed = self.attached.get(node, ()) != before
        if old:
            changed |= self._retry_rejected(table, node)
        return changed

    def _retry_rejected(self, table: AttachedClaims, reporter: str) -> bool:
        """Try other nodes' refused endpoints again (``reporter`` freed claims); True if any is accepted now."""
        changed = False
        for node in sorted(self._with_rejections - {reporter}):
            report = self.reports[node]
            previous = dict(report.rejected)
            accepted = False
            for position in sorted(previous):
                if not isinstance(report.parsed[position], ValidationError):
                    e = self._try(table, node, position)
                    if e is not None:
                        accepted = True
                        self._acceptances += 1
                        self._acceptance[(node, e.name)] = self._acceptances
            if accepted:
                changed = True
                self.attached[node] = self._in_report_order(report)
                self.log.info("attached_endpoints_accepted", node=node,
                              endpoints=[report.name_at(p) for p in previous if p in report.accepted])
            if not report.rejected:
                self._with_rejections.discard(node)
            self._log_rejections(node, report, previous)
        return changed

    # ------------------------------------------------------------------ sessions

    def key_holder(self, key: str) -> str | None:
        return next((n for n, k in self.public_keys.items() if k == key), None)

    def _check_key(self, node: str, key: str) -> None:
        canonical_wireguard_key(key)
        holder = self.key_holder(key)
        if holder is not None and holder != node:
            # Accepting it would make two peers share a key everywhere (and let a node impersonate another).
            raise KeyConflict(f"WireGuard public key already registered to node {holder!r}")

    def connect(self, node: str, serial: str, hello: cpb.Hello, public_key: str | None = None,
                certificate_pem: bytes = b"") -> Session:
        """Open ``node``'s session. ``public_key``: the hello's key as the server validated it (canonical);
        None takes it from the hello. Either way a key that is not canonical or is another node's is refused.
        ``certificate_pem``: the stream's client certificate, relayed with the node's IPsec epoch keys."""
        key = hello.wireguard_public_key if public_key is None else public_key
        if key:
            self._check_key(node, key)
        old = self.sessions.get(node)
        if old is not None:
            old.close("replaced by a newer stream from the same node")
        session = Session(node, serial, certificate_pem)
        self.sessions[node] = session
        if certificate_pem:
            self.certificates[node] = certificate_pem  # a renewed certificate replaces the earlier one
        rt = self.runtime.setdefault(node, NodeRuntime())
        rt.last_seen = now_utc()
        rt.applied_spec_revision = hello.applied_spec_revision
        rt.capabilities = tuple(hello.capabilities)
        changed = False
        if key and self.public_keys.get(node) != key:
            self._register_key(session, key, list(hello.capabilities), "hello")
            changed = True
        # The hello's list is authoritative: an empty one clears what the node attached before.
        changed |= self._report_attached(session, [wire.endpoint_from_proto(e) for e in hello.attached_endpoints])
        session.set_target(self._state_of(node), self.spec_revision, self.proto_memo)
        self._queue_peer_keys(session)  # sent after the snapshot
        if changed:
            self.request_recompile()
        self.log.info("agent_connected", node=node, capabilities=list(hello.capabilities))
        return session

    def disconnect(self, session: Session) -> None:
        if self.sessions.get(session.node) is session:
            del self.sessions[session.node]
            self.runtime.setdefault(session.node, NodeRuntime()).last_seen = now_utc()
            self.log.info("agent_disconnected", node=session.node, reason=session.closed_reason or "stream ended")

    def acknowledge(self, session: Session, ack: cpb.Ack) -> None:
        rt = self.runtime.setdefault(session.node, NodeRuntime())
        rt.last_seen = now_utc()
        if ack.ok:
            rt.applied_spec_revision = ack.spec_revision
            rt.last_error = ""
            rt.rejected_spec_revision = 0
        else:
            # The agent's words, bounded: they go to the log and to every ListNodes answer.
            field, value, reason = (_cut(ack.error_field, 300), _cut(ack.error_value, 300),
                                    _cut(ack.error_reason, 1000))
            rt.last_error = f"{field}: {reason} (got {value})"
            rt.rejected_spec_revision = ack.spec_revision
            self.log.warning("agent_rejected_state", node=session.node, sequence=ack.sequence,
                             field=field, value=value, reason=reason)

    def status_reported(self, session: Session, status: cpb.AgentStatus) -> None:
        rt = self.runtime.setdefault(session.node, NodeRuntime())
        rt.last_seen = now_utc()
        rt.peers_with_recent_handshake = status.peers_with_recent_handshake
        rt.encryption = tuple(peer_encryption(e) for e in status.encryption[:MAX_STATUS_PEERS])
        if status.drift_repairs > rt.drift_repairs:
            self.log.warning("agent_repaired_drift", node=session.node, drift_repairs=status.drift_repairs)
        rt.drift_repairs = status.drift_repairs

    def key_update(self, session: Session, key: str) -> None:
        self._check_key(session.node, key)
        if self.public_keys.get(session.node) != key:
            self._register_key(session, key, list(self.runtime[session.node].capabilities), "key_update")
            self.log.info("wireguard_key_rotated", node=session.node)
            self.request_recompile()

    def _register_key(self, session: Session, key: str, capabilities: list[str], via: str) -> None:
        """A node's WireGuard key is what every peer will trust for it: stored, and audited with the
        certificate that presented it."""
        previous = self.public_keys.get(session.node)
        self.public_keys[session.node] = key
        self.store.set_wireguard_key(session.node, key, capabilities)
        action = "node.key-register" if previous is None else "node.key-change"
        self.store.append_audit(session.node, "node", action, session.node, None,
                                {"public_key": key, "previous": previous or "", "via": via},
                                actor_serial=session.serial)

    def endpoints_reported(self, session: Session, raws: list[dict[str, Any]]) -> None:
        if self._report_attached(session, raws):
            self.request_recompile()

    # ------------------------------------------------------------------ IPsec relay

    def peers_of(self, node: str) -> frozenset[str]:
        """The names of ``node``'s compiled peers (the nodes it shares a segment with), cached per state."""
        state = self.states.get(node)
        cached = self._peer_sets.get(node)
        if cached is None or cached[0] is not state:
            cached = (state, frozenset(p["name"] for p in state["peers"]) if state else frozenset())
            self._peer_sets[node] = cached
        return cached[1]

    def _forget_epoch_key(self, node: str) -> None:
        self.epoch_keys.pop(node, None)
        self.certificates.pop(node, None)

    def _relayed_key(self, key: cpb.EpochKey) -> cpb.ControllerMessage:
        relayed = cpb.EpochKey()
        relayed.CopyFrom(key)
        relayed.certificate_pem = self.certificates.get(key.node, b"")
        return cpb.ControllerMessage(epoch_key=relayed)

    def _queue_peer_keys(self, session: Session) -> None:
        """Queue to ``session`` the stored key of every compiled peer it had not been queued keys of yet."""
        peers = self.peers_of(session.node) if session.target is self.states.get(session.node) else frozenset()
        new = peers - session.known_peers
        session.known_peers = peers
        if not self.epoch_keys:
            return
        for peer in sorted(new):
            key = self.epoch_keys.get(peer)
            if key is not None:
                session.queue_key(self._relayed_key(key))

    def _refuse_ipsec(self, session: Session, event: str, kind: str, reason: str, **detail: Any) -> None:
        """Log every refused IPsec message; audit the first of each kind per stream (a looping agent would
        otherwise fill the log). The stream stays open."""
        self.log.warning(event, node=session.node, kind=kind, reason=reason, **detail)
        if kind in session.refusals_audited:
            return
        session.refusals_audited.add(kind)
        self.store.append_audit(session.node, "node", f"node.{event.replace('_', '-')}", session.node, None,
                                {"kind": kind, "reason": reason, **detail}, actor_serial=session.serial)

    def epoch_key_reported(self, session: Session, key: cpb.EpochKey) -> bool:
        """``session``'s node published a new IPsec epoch key: checked for form, stored, relayed to every
        connected node that has it as a peer. False if refused (logged and audited, nothing relayed)."""
        node = session.node
        last = self.epoch_keys.get(node)
        problem: tuple[str, str] | None = None
        if key.node != node:
            problem = ("wrong-node", f"names node {_cut(key.node, 100)!r}, not the stream's node {node!r}")
        elif len(key.public_key) != EPOCH_PUBLIC_KEY_BYTES:
            problem = ("public-key-length",
                       f"public_key is {len(key.public_key)} bytes, not {EPOCH_PUBLIC_KEY_BYTES}")
        elif not key.signature or len(key.signature) > MAX_EPOCH_SIGNATURE_BYTES:
            problem = ("signature-length",
                       f"signature is {len(key.signature)} bytes (1..{MAX_EPOCH_SIGNATURE_BYTES})")
        elif key.certificate_pem:
            problem = ("certificate-set", "certificate_pem is the controller's to fill in, not the agent's")
        elif last is not None and key.epoch == last.epoch and key.SerializeToString(deterministic=True) == \
                last.SerializeToString(deterministic=True):
            return True  # the stored key again (an agent publishes its current one after every reconnect)
        elif last is not None and key.epoch <= last.epoch:
            problem = ("stale-epoch", f"epoch {key.epoch} is not newer than epoch {last.epoch}")
        if problem is not None:
            self._refuse_ipsec(session, "epoch_key_refused", problem[0], problem[1], epoch=key.epoch)
            return False
        stored = cpb.EpochKey()
        stored.CopyFrom(key)
        self.epoch_keys[node] = stored
        if session.certificate_pem:
            self.certificates[node] = session.certificate_pem
        relayed = 0
        for other, target in self.sessions.items():
            if other != node and target.closed_reason is None and node in self.peers_of(other):
                target.queue_key(self._relayed_key(stored))
                relayed += 1
        self.log.info("epoch_key_relayed", node=node, epoch=key.epoch, to=relayed)
        return True

    def sa_ready_reported(self, session: Session, ready: cpb.SaReady) -> bool:
        """``session``'s node installed its inbound SAs for ``ready.peer``: tell that peer (if connected and
        sharing a segment), as coming from this node. False if refused or dropped."""
        node = session.node
        if ready.peer == node:
            self._refuse_ipsec(session, "sa_ready_refused", "own-name", "names the sending node itself")
            return False
        target = self.sessions.get(ready.peer)
        if target is None or target.closed_reason is not None or node not in self.peers_of(ready.peer):
            self.log.debug("sa_ready_dropped", node=node, peer=_cut(ready.peer, 100),
                           reason="not connected" if target is None else "not a peer")
            return False
        message = cpb.ControllerMessage(sa_ready=cpb.SaReady(peer=node, sender_epoch=ready.sender_epoch,
                                                             receiver_epoch=ready.receiver_epoch))
        if not target.queue_confirmation(message):
            self.log.warning("sa_ready_dropped", node=node, peer=ready.peer, reason="the peer's queue is full")
            return False
        return True

    def command(self, node: str, kind: int) -> bool:
        session = self.sessions.get(node)
        if session is None:
            return False
        session.commands.append(cpb.Command(kind=kind))  # type: ignore[arg-type]
        session.wake.set()
        return True

    # ------------------------------------------------------------------ revocation

    def revoke(self, node: str, serials: list[str]) -> bool:
        """Refuse the node's certificates from now on, disconnect it, drop it from every peer."""
        self.revoked_serials.update(serials)
        self.revoked_nodes.add(node)
        self._forget_epoch_key(node)
        session = self.sessions.get(node)
        if session is not None:
            session.close("certificate revoked", unauthenticated=True)
        self.recompile_now()
        return session is not None

    def retire(self, serials: dict[str, datetime]) -> None:
        """Certificates replaced by a renewal: accepted until the given time, then refused (streams end then)."""
        self.trust.retiring.update(serials)
        for session in self.sessions.values():
            if session.serial in serials and session.rearm is not None:
                session.rearm()

    def node_rejoined(self, node: str, old_serials: list[str]) -> None:
        """``node`` joined again (a replaced or cloned host): its earlier certificates stop working.

        The node stays in every compile (its new host connects under the same name); only the stream of the
        earlier host, if one is open, is closed.
        """
        self.revoked_serials.update(old_serials)
        self._forget_epoch_key(node)  # the new host has its own key and starts its own epochs
        session = self.sessions.get(node)
        if session is not None:
            session.close("replaced by a newer join")

    def readmit(self, node: str, serial: str) -> None:
        if node in self.revoked_nodes:
            self.revoked_nodes.discard(node)
            self.request_recompile()

    async def close_all(self) -> None:
        for session in list(self.sessions.values()):
            session.close("controller stopping")
        if self._recompile_task is not None:
            self._recompile_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._recompile_task
