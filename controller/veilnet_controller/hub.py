"""The distribution hub: one compiled state per node, one session per connected agent.

Everything runs on the controller's asyncio loop. A change (new spec
revision, a node's new WireGuard key, endpoints attached on a node, a
revocation) marks the compiled states stale; one recompile, coalesced over a
short window, produces every node's new state. Each session then holds a
*target*: its sender computes the delta from what it last sent to the latest
target only when the stream is ready for it, so a slow agent receives one
coalesced delta instead of a backlog (Felix-style: record, then apply).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog

from veilnet.v1 import controller_pb2 as cpb
from veilnet_agent import wire
from veilnet_agent.errors import ValidationError

from .compile import compile_nodes
from .spec import EndpointSpec, NetworkSpec, parse_spec_text, validate_attached_endpoints
from .store import Store

RECOMPILE_DELAY = 0.05  # seconds: coalesce bursts (1,000 agents saying hello) into one compile


def now_utc() -> datetime:
    return datetime.now(UTC)


@dataclass
class NodeRuntime:
    """What the controller knows about a node's agent right now (memory only)."""

    connected: bool = False
    applied_sequence: int = 0
    applied_spec_revision: int = 0
    last_error: str = ""
    rejected_spec_revision: int = 0
    last_seen: datetime | None = None
    capabilities: tuple[str, ...] = ()
    kernel_operations: int = 0
    peers_with_recent_handshake: int = 0
    drift_repairs: int = 0


class KeyConflict(Exception):
    """A node presented a WireGuard public key another node already holds."""


class Session:
    """One agent's Sync stream."""

    def __init__(self, node: str, serial: str) -> None:
        self.node = node
        self.serial = serial
        self.sequence = 0
        self.sent_state: dict[str, Any] | None = None
        self.sent_revision = 0
        self.target: dict[str, Any] | None = None
        self.target_revision = 0
        self.commands: deque[cpb.Command] = deque()
        self.memo: wire.Memo | None = None  # protos of the shared parts of the target's compile
        self.wake = asyncio.Event()
        self.closed_reason: str | None = None

    def close(self, reason: str) -> None:
        self.closed_reason = reason
        self.wake.set()

    def set_target(self, state: dict[str, Any] | None, revision: int, memo: wire.Memo | None = None) -> None:
        self.target = state
        self.target_revision = revision
        self.memo = memo
        self.wake.set()

    def next_message(self) -> cpb.ControllerMessage | None:
        """The next message to send, or None if there is nothing new."""
        if self.commands:
            return cpb.ControllerMessage(command=self.commands.popleft())
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
        self.attached: dict[str, tuple[EndpointSpec, ...]] = {}
        self.revoked_nodes: set[str] = set()
        self.revoked_serials: set[str] = set()
        self._recompile_task: asyncio.Task[None] | None = None
        self.compile_seconds = 0.0
        self._compiled: dict[str, Any] = {}  # the last compile's shared parts, reused when unchanged
        self.proto_memo: wire.Memo = {}
        self.compiles = 0  # how many recompiles ran (coalescing shows here)

    # ------------------------------------------------------------------ loading

    def load(self) -> None:
        """Rebuild everything from the store (controller start)."""
        record = self.store.revision()
        if record is not None:
            self.spec = parse_spec_text(record.spec_text)
            self.spec_revision = record.number
        for node in self.store.nodes():
            if node.wireguard_public_key:
                self.public_keys[node.name] = node.wireguard_public_key
            if node.revoked_at is not None:
                self.revoked_nodes.add(node.name)
            self.runtime.setdefault(node.name, NodeRuntime()).capabilities = node.capabilities
        self.revoked_serials = set(self.store.revoked_serials())
        if self.spec is not None:
            for node_name, raws in self.store.attached_endpoints().items():
                self._set_attached(node_name, raws, log_errors=True)
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
        self.log.info("compiled", revision=self.spec_revision, nodes=len(self.states),
                      seconds=round(self.compile_seconds, 4))

    def _state_of(self, node: str) -> dict[str, Any] | None:
        state = self.states.get(node)
        if state is not None:
            return state
        session = self.sessions.get(node)
        if session is not None and session.sent_state is not None:
            # The node left the spec: it keeps its address and loses everything else.
            return {"node": node, "transport_address": session.sent_state["transport_address"],
                    "segments": [], "endpoints": [], "peers": [], "policies": []}
        return None

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
        stored = self.store.attached_endpoints()
        self.attached = {}
        for node, raws in stored.items():
            self._set_attached(node, raws, log_errors=True)
        self.recompile_now()

    # ------------------------------------------------------------------ sessions

    def key_holder(self, key: str) -> str | None:
        return next((n for n, k in self.public_keys.items() if k == key), None)

    def _check_key(self, node: str, key: str) -> None:
        holder = self.key_holder(key)
        if holder is not None and holder != node:
            # Accepting it would make two peers share a key everywhere (and let a node impersonate another).
            raise KeyConflict(f"WireGuard public key already registered to node {holder!r}")

    def connect(self, node: str, serial: str, hello: cpb.Hello) -> Session:
        if hello.wireguard_public_key:
            self._check_key(node, hello.wireguard_public_key)
        old = self.sessions.get(node)
        if old is not None:
            old.close("replaced by a newer stream from the same node")
        session = Session(node, serial)
        self.sessions[node] = session
        rt = self.runtime.setdefault(node, NodeRuntime())
        rt.connected = True
        rt.last_seen = now_utc()
        rt.applied_spec_revision = hello.applied_spec_revision
        rt.capabilities = tuple(hello.capabilities)
        changed = False
        key = hello.wireguard_public_key
        if key and self.public_keys.get(node) != key:
            self.public_keys[node] = key
            self.store.set_wireguard_key(node, key, list(hello.capabilities))
            changed = True
        if self.spec is not None and hello.attached_endpoints:
            raws = [wire.endpoint_from_proto(e) for e in hello.attached_endpoints]
            changed |= self._store_attached(node, raws)
        session.set_target(self._state_of(node), self.spec_revision, self.proto_memo)
        if changed:
            self.request_recompile()
        self.log.info("agent_connected", node=node, capabilities=list(hello.capabilities))
        return session

    def disconnect(self, session: Session) -> None:
        if self.sessions.get(session.node) is session:
            del self.sessions[session.node]
            rt = self.runtime.setdefault(session.node, NodeRuntime())
            rt.connected = False
            rt.last_seen = now_utc()
            self.log.info("agent_disconnected", node=session.node, reason=session.closed_reason or "stream ended")

    def acknowledge(self, session: Session, ack: cpb.Ack) -> None:
        rt = self.runtime.setdefault(session.node, NodeRuntime())
        rt.last_seen = now_utc()
        rt.applied_sequence = ack.sequence
        rt.kernel_operations = ack.kernel_operations
        if ack.ok:
            rt.applied_spec_revision = ack.spec_revision
            rt.last_error = ""
            rt.rejected_spec_revision = 0
        else:
            rt.last_error = f"{ack.error_field}: {ack.error_reason} (got {ack.error_value})"
            rt.rejected_spec_revision = ack.spec_revision
            self.log.warning("agent_rejected_state", node=session.node, sequence=ack.sequence,
                             field=ack.error_field, value=ack.error_value, reason=ack.error_reason)

    def status_reported(self, session: Session, status: cpb.AgentStatus) -> None:
        rt = self.runtime.setdefault(session.node, NodeRuntime())
        rt.last_seen = now_utc()
        rt.peers_with_recent_handshake = status.peers_with_recent_handshake
        if status.drift_repairs > rt.drift_repairs:
            self.log.warning("agent_repaired_drift", node=session.node, drift_repairs=status.drift_repairs)
        rt.drift_repairs = status.drift_repairs

    def key_update(self, session: Session, key: str) -> None:
        self._check_key(session.node, key)
        if self.public_keys.get(session.node) != key:
            self.public_keys[session.node] = key
            self.store.set_wireguard_key(session.node, key, list(self.runtime[session.node].capabilities))
            self.log.info("wireguard_key_rotated", node=session.node)
            self.request_recompile()

    def endpoints_reported(self, session: Session, raws: list[dict[str, Any]]) -> None:
        if self._store_attached(session.node, raws):
            self.request_recompile()

    def _store_attached(self, node: str, raws: list[dict[str, Any]]) -> bool:
        before = self.attached.get(node, ())
        self._set_attached(node, raws, log_errors=True)
        if self.attached.get(node, ()) != before:
            self.store.set_attached_endpoints(node, raws)
            return True
        return False

    def _set_attached(self, node: str, raws: list[dict[str, Any]], *, log_errors: bool) -> None:
        if self.spec is None or node not in {n.name for n in self.spec.nodes}:
            self.attached.pop(node, None)
            return
        others: Mapping[str, tuple[EndpointSpec, ...]] = {n: e for n, e in self.attached.items() if n != node}
        try:
            self.attached[node] = validate_attached_endpoints(self.spec, node, raws, others)
        except ValidationError as exc:
            self.attached.pop(node, None)
            if log_errors:
                self.log.warning("attached_endpoints_rejected", node=node, field=exc.field, reason=exc.reason,
                                 value=str(exc.value))

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
        session = self.sessions.get(node)
        if session is not None:
            session.close("certificate revoked")
        self.recompile_now()
        return session is not None

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
