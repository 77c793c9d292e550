"""``run`` in controller mode: desired state from the controller's stream, endpoints from the local API.

One thread (this loop) owns the desired state and the kernel; the control
client and the local API only post events to its inbox. The desired state is

    the controller's intended state for this node (snapshot, then deltas)
    + the endpoints attached on this host through the local API

validated whole each time, exactly like a state file. What was last applied
is persisted (``state_dir/controller/applied.json``) so a restart without a
controller restores the same data plane, and attached endpoints are
persisted (``attached.json``) and reported to the controller so peers learn them.

Acknowledgements tell the truth: an update is acked ok only once the kernel
holds it (``Reconciler.failure`` is None). An update that validated but could
not be applied (a refused firewall, an operation the kernel refused) is acked
failed with the failed operation as ``error_field`` (its subsystem),
``error_value`` (what) and ``error_reason`` (why); it is still the state the
agent works towards (and persists: a restart must not bring back, say, a
revoked peer), and failed passes are retried with backoff. When a retry
succeeds, the update is acked ok after all and the status says so.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import secrets
import signal
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import grpc

from veilnet.v1 import agent_pb2 as lpb
from veilnet.v1 import controller_pb2 as cpb

from .. import __version__
from ..control import pki, wire
from ..control.client import ControlClient, StreamEvent
from ..control.enrollment import IdentityFiles
from ..control.files import atomic_write
from ..control.local_api import LocalApiError, LocalApiServer, LocalRequest
from ..core import loading, naming
from ..core import validate as v
from ..core.config import AgentConfig
from ..core.describe import op_subject
from ..core.encryption import ipsec_keys
from ..core.errors import DriverError, ValidationError, VeilnetError
from ..core.model import parse_node_state
from ..core.objects import SaCounters
from ..core.ops import CreateLink, DeleteLink, Op, UpdateLink
from ..dataplane.ipsec_manager import Changes, IpsecManager
from ..dataplane.reconciler import Failure, Outcome, Reconciler
from ..logs import get_logger
from ..sdnotify import Readiness
from .daemon import gc_paused, settle_heap
from .retry import RetrySchedule
from .statefile import StateFileTracker

POLL_SECONDS = 0.5
MAX_OWN_FILE_BYTES = 256 * 1024 * 1024  # applied.json of a very large state
RENEW_RETRY_SECONDS = 30.0
HANDSHAKE_RECENT_SECONDS = 180  # WireGuard re-handshakes every 2 minutes while traffic flows
CONFIRM_RESEND_SECONDS = 5.0  # an IPsec confirmation nothing has been sent with yet is sent again this often

Event = StreamEvent | LocalRequest


def _error_id() -> str:
    """A correlation id for an unexpected error: in the log with the traceback, and in what the caller is told."""
    return secrets.token_hex(8)


def _atomic_json(path: Path, data: object) -> None:
    atomic_write(path, json.dumps(data, separators=(",", ":")).encode(), 0o600)


_ATTACHMENT_TEXT = ("name", "segment", "mac", "ipv4", "ipv6", "netns", "ifname")


def _attachment_shape(entry: object) -> bool:
    """Whether a restored attachment has the form of one (text fields, text labels): everything the hello
    and the state merge rely on. Its values are validated with the state it joins."""
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        return False
    if any(k not in (*_ATTACHMENT_TEXT, "labels") for k in entry):
        return False
    if any(k in entry and not isinstance(entry[k], str) for k in _ATTACHMENT_TEXT):
        return False
    labels = entry.get("labels", {})
    return isinstance(labels, dict) and all(isinstance(k, str) and isinstance(x, str) for k, x in labels.items())


def _touches(op: Op, ifname: str) -> bool:
    if isinstance(op, CreateLink):
        return op.link.name == ifname
    if isinstance(op, (DeleteLink, UpdateLink)):
        return op.name == ifname
    entry = getattr(op, "entry", None)
    return entry is not None and entry.ifname == ifname


def endpoint_not_applied(outcome: Outcome | None, endpoint: str) -> str | None:
    """Why ``endpoint``'s own interface did not get where it should in ``outcome`` (None: it did)."""
    if outcome is None:
        return None
    ifname = naming.endpoint_host_name(endpoint)
    for op, reason in outcome.failed:
        if _touches(op, ifname):
            return f"{op_subject(op)}: {reason}"
    for op in outcome.held:
        if _touches(op, ifname):
            return f"{op_subject(op)}: held back: {outcome.failure}"
    return None


class ControlledDaemon:
    def __init__(self, config: AgentConfig, reconciler: Reconciler, capabilities: list[str]) -> None:
        self.config = config
        self.reconciler = reconciler
        self.capabilities = capabilities
        self.log = get_logger(node=config.node_name)
        self.files = IdentityFiles(config.identity_dir)
        self.dir = config.state_dir / "controller"
        self.inbox: queue.Queue[Event] = queue.Queue()
        self._stop = False
        self._resync_now = False
        self.tracker = StateFileTracker()
        # the controller's intended state for us, as of ``received_sequence`` on the current stream
        self.received: dict[str, Any] | None = None
        self.received_sequence = 0
        self.received_revision = 0
        self.attached: dict[str, dict[str, Any]] = {}
        self.applied_revision = 0  # the last controller update the kernel is known to hold
        self.applied_sequence = 0
        self.target_revision = 0  # the controller update whose state the agent is bringing the kernel to
        self.target_sequence = 0
        self.rejection = ""  # why the last controller update was refused ("" once one is accepted)
        self.accept_failure: Failure | None = None  # a valid state that could not be taken on (retried)
        self.retry = RetrySchedule(maximum=config.resync_interval)
        self._unacked: tuple[int, int] | None = None  # (sequence, revision) acked failed, to ack ok once applied
        self._reported_error = ""
        self.next_renewal: datetime | None = None
        self._renewing: threading.Thread | None = None
        self.client = ControlClient(self.files, self._hello, self.inbox.put, config.node_name,
                                    config.control.reconnect_max_seconds)
        self.local_api = LocalApiServer(config.control.local_socket, config.control.socket_group, self.inbox.put,
                                        node=config.node_name)
        self.ipsec: IpsecManager | None = None  # made in run(), once the identity is known to exist
        self._next_confirm_resend = 0.0
        self._sa_failures: dict[tuple[str, str, int], tuple[int, int]] = {}  # SA -> (replay, integrity) seen
        self.readiness = Readiness()

    # ------------------------------------------------------------------ health

    @property
    def failure(self) -> Failure | None:
        """Why the kernel is not at the desired state (None: it is)."""
        return self.accept_failure or self.reconciler.failure

    @property
    def last_error(self) -> str:
        failure = self.failure
        return str(failure) if failure is not None else self.rejection

    # ------------------------------------------------------------------ persistence

    def _restore(self) -> None:
        attached = self._read_own("attached.json")
        if isinstance(attached, list):
            self.attached = {e["name"]: e for e in attached if _attachment_shape(e)}
            if len(self.attached) != len(attached):
                self.log.error("attached_endpoints_unreadable", kept=len(self.attached), found=len(attached),
                               note="entries that are no endpoint were left out")
        applied = self._read_own("applied.json")
        if isinstance(applied, dict) and isinstance(applied.get("state"), dict):
            self.received = applied["state"]
            revision = applied.get("spec_revision", 0)
            if type(revision) is not int or not 0 <= revision < 2**63:
                revision = 0
            try:
                self._apply("restore", drop_unfit=True)
                self.target_revision = revision  # applied (and reported) once the kernel holds it
                self.log.info("restored_last_applied_state", spec_revision=revision,
                              note="enforced until the controller says otherwise")
            except ValidationError as exc:
                self.log.error("restored_state_rejected", field=exc.field, reason=exc.reason)

    def _read_own(self, name: str) -> object:
        """One of the agent's own files (JSON), through the shared loader; None if absent or unreadable (logged)."""
        path = self.dir / name
        if not path.exists():
            return None
        try:
            return loading.load_json_text(loading.decode_utf8(
                loading.read_bytes(path, name, MAX_OWN_FILE_BYTES), name, str(path)), name, str(path))
        except ValidationError as exc:
            self.log.error("state_file_unreadable", file=str(path), reason=exc.reason, note="not restored")
            return None

    def _persist_applied(self) -> None:
        """The controller's last accepted state, applied or still being retried (restored on start)."""
        _atomic_json(self.dir / "applied.json", {"spec_revision": self.received_revision or self.target_revision,
                                                 "state": self.received})

    def _persist_attached(self) -> None:
        _atomic_json(self.dir / "attached.json", list(self.attached.values()))

    # ------------------------------------------------------------------ desired state

    def _desired_raw(self, attached: Mapping[str, dict[str, Any]] | None = None) -> dict[str, Any] | None:
        """The controller's state plus the attached endpoints (``self.attached`` unless given)."""
        attached = self.attached if attached is None else attached
        if self.received is None or not self.received.get("transport_address"):
            return None  # nothing from the controller yet, or this node is in no network
        if not attached:
            return self.received
        merged = dict(self.received)
        merged["endpoints"] = list(self.received.get("endpoints") or ()) + list(attached.values())
        return merged

    def _drop_unfit_attachments(self) -> None:
        """The controller's state alone decides: attachments that no longer fit it are detached and reported.

        (A segment was taken off this node, or the spec now gives an attachment's address to someone
        else.) Without this, one stale attachment would make the node refuse every later update,
        including the removal of a revoked peer. Raises the controller state's own error if it is bad.
        """
        parse_node_state(self.received)
        kept: dict[str, dict[str, Any]] = {}
        for name, endpoint in self.attached.items():
            try:
                parse_node_state(self._desired_raw({**kept, name: endpoint}))
            except ValidationError as exc:
                self.log.error("attached_endpoint_dropped", endpoint=name, field=exc.field, reason=exc.reason,
                               value=str(exc.value), note="no longer fits the controller's state; attach it again")
                continue
            kept[name] = endpoint
        self.attached = kept
        self._persist_attached()
        self._report_attached()

    def _apply(self, why: str, *, attached: dict[str, dict[str, Any]] | None = None,
               drop_unfit: bool = False) -> Outcome | None:
        """Validate and apply the desired state; ValidationError leaves everything as it was.

        ``attached``: a candidate set of attachments (the local API), committed only if it applies.
        ``drop_unfit``: a state from the controller wins over attachments that no longer fit it.
        """
        raw = self._desired_raw(attached)
        if raw is None:
            return None
        try:
            return self._apply_raw(raw, why)
        except ValidationError:
            if not drop_unfit or not self.attached:
                raise
        self._drop_unfit_attachments()
        raw = self._desired_raw()
        return None if raw is None else self._apply_raw(raw, why)

    def _apply_raw(self, raw: dict[str, Any], why: str) -> Outcome:
        with gc_paused():
            pending = self.tracker.prepare(raw)
            if pending is not None:
                try:
                    self.reconciler.accept(pending.state, pending.changed_peers)
                except ValidationError:
                    raise
                except Exception as exc:  # valid, but it cannot be rendered now (e.g. the underlay): retried
                    subsystem = "kernel" if isinstance(exc, (DriverError, OSError)) else "agent"
                    self.accept_failure = Failure(subsystem, f"desired state ({why})", f"{type(exc).__name__}: {exc}")
                    self.log.error("state_not_applied", source=why, reason=str(self.accept_failure))
                    return Outcome(failure=self.accept_failure)
        self.accept_failure = None
        if pending is None:
            # Nothing new; if the kernel is short of the state, this is one more try (the ack depends on it).
            return self.reconciler.retry() if self.reconciler.failure is not None else Outcome()
        self.tracker.commit(pending)
        if pending.changed_peers is None:
            settle_heap()
        outcome = self.reconciler.reconcile(full=False)
        self.log.info("state_accepted", source=why, segments=len(pending.state.segments),
                      endpoints=len(pending.state.endpoints), peers=len(pending.state.peers),
                      policies=len(pending.state.policies))
        return outcome

    @staticmethod
    def _kernel_operations(outcome: Outcome | None) -> int:
        if outcome is None:
            return 0
        fw = outcome.firewall
        fw_ops = 0 if fw is None else (1 if fw.action == "replace" else fw.added + fw.deleted)
        return len(outcome.ops) + fw_ops

    # ------------------------------------------------------------------ controller messages

    def _hello(self) -> cpb.Hello:
        return cpb.Hello(
            agent_version=__version__,
            capabilities=[*self.capabilities, f"wireguard-{self.reconciler.wireguard_backend or 'unknown'}"],
            wireguard_public_key=self.reconciler.public_key,
            applied_sequence=self.applied_sequence,
            applied_spec_revision=self.applied_revision,
            attached_endpoints=wire.endpoints_to_proto(list(self.attached.values())),
        )

    def _on_stream(self, event: StreamEvent) -> None:
        if event.kind in ("renewed", "renew_failed"):
            self._on_renewal(event)
            return
        if event.kind == "connected":
            self.received_sequence = 0
            self._publish_epoch()
        message = event.message
        if event.kind != "message" or message is None:
            return  # connected, disconnected, or a wake-up (signal, renewal finished)
        which = message.WhichOneof("kind")
        if which == "update":
            self._on_update(message.update)
        elif which == "command":
            self._on_command(message.command)
        elif which == "epoch_key":
            self._on_epoch_key(message.epoch_key)
        elif which == "sa_ready":
            self._on_sa_ready(message.sa_ready)

    def _on_update(self, update: cpb.NodeUpdate) -> None:
        body = update.WhichOneof("body")
        if body == "snapshot":
            new = wire.state_from_proto(update.snapshot)
        elif body == "delta" and self.received is not None and update.base_sequence == self.received_sequence:
            new = wire.apply_delta(self.received, wire.delta_from_proto(update.delta))
        else:
            self.log.error("update_out_of_order", sequence=update.sequence, base=update.base_sequence,
                           have=self.received_sequence, note="reconnecting for a fresh snapshot")
            self.client.reconnect("update out of order", misbehaved=True)
            return
        if not new.get("transport_address"):
            # "You are in no network" (not, or no longer, in the spec): keep the address, drop the rest.
            new["transport_address"] = (self.received or {}).get("transport_address", "")
        self.received = new
        self.received_sequence = update.sequence
        self.received_revision = update.spec_revision
        ack = cpb.Ack(sequence=update.sequence, spec_revision=update.spec_revision)
        started = time.perf_counter()
        try:
            outcome = self._apply(f"controller revision {update.spec_revision}", drop_unfit=True)
        except ValidationError as exc:
            # Keep the kernel as it was; keep ``received`` too: later deltas apply to the controller's view.
            self.rejection = str(exc)
            self.accept_failure = None  # the kernel is to keep the previous state, which is what is retried
            self._unacked = None  # an older update's late success is no news after this refusal
            ack.ok = False
            ack.error_field, ack.error_value, ack.error_reason = exc.field, str(exc.value), exc.reason
            self.log.error("state_rejected", source="controller", spec_revision=update.spec_revision,
                           field=exc.field, value=str(exc.value), reason=exc.reason)
            self.client.send(cpb.AgentMessage(ack=ack))
            return
        except Exception as exc:
            # A message that makes the agent fail unexpectedly: said so (never acked ok), logged with an id,
            # and the loop goes on. The kernel keeps what it had; the next update or resync tries again.
            error_id = _error_id()
            self.rejection = f"agent: update: internal error {error_id}"
            self._unacked = None
            ack.ok = False
            ack.error_field, ack.error_value = "agent", f"update {update.sequence}"
            ack.error_reason = f"internal error {error_id}: the agent logged the details under this id"
            self.log.error("update_failed", sequence=update.sequence, spec_revision=update.spec_revision,
                           error_id=error_id, exc_info=exc)
            self.client.send(cpb.AgentMessage(ack=ack))
            return
        self.rejection = ""
        self.target_sequence, self.target_revision = update.sequence, update.spec_revision
        ack.kernel_operations = self._kernel_operations(outcome)
        failure = self.failure
        if failure is None:
            ack.ok = True
            self._unacked = None
            self._mark_applied()
            self.log.info("update_applied", sequence=update.sequence, spec_revision=update.spec_revision,
                          kind=body, kernel_operations=ack.kernel_operations, after_retry=False,
                          seconds=round(time.perf_counter() - started, 4))
        else:
            # Valid, but the kernel does not hold it: say so, name what failed, and keep trying.
            ack.ok = False
            ack.error_field, ack.error_value = failure.subsystem, failure.subject
            ack.error_reason = str(failure).removeprefix(f"{failure.subsystem}: {failure.subject}: ")
            self._unacked = (update.sequence, update.spec_revision)
            self.log.error("update_not_applied", sequence=update.sequence, spec_revision=update.spec_revision,
                           kind=body, field=ack.error_field, value=ack.error_value, reason=ack.error_reason,
                           note="acknowledged as failed; retrying")
        self.client.send(cpb.AgentMessage(ack=ack))
        self._send_status()
        # After the ack: the controller learns of the new state without waiting for the disk
        # (~10 ms for 5,000 peers); a crash in between restores the previous state, then resyncs.
        self._persist_applied()

    def _mark_applied(self) -> None:
        self.applied_sequence, self.applied_revision = self.target_sequence, self.target_revision

    def _after_pass(self, *, retry: bool) -> None:
        """After anything that may have touched the kernel: schedule a retry, or report the recovery."""
        if self.ipsec is not None:
            self._ipsec_handle(self.reconciler.take_ipsec_changes())
        failure = self.failure
        if failure is None:
            self.retry.succeeded()
            self._mark_applied()
            if self._unacked is not None:
                sequence, revision = self._unacked
                self._unacked = None
                self.client.send(cpb.AgentMessage(ack=cpb.Ack(sequence=sequence, spec_revision=revision, ok=True)))
                self.log.info("update_applied", sequence=sequence, spec_revision=revision, after_retry=True)
        elif retry or self.retry.due_at is None:
            attempt = self.retry.failures + 1
            delay = self.retry.failed(time.monotonic())
            emit = self.log.warning if retry else self.log.info
            emit("retry_failed" if retry else "retry_scheduled", failure=str(failure), attempt=attempt,
                 retry_in_seconds=round(delay, 2))
        if self.last_error != self._reported_error:
            self._send_status()
        self._report_readiness()

    def _report_readiness(self) -> None:
        """READY once the kernel holds a controller state: the restored one (adopted on restart) or the first update."""
        failure = self.failure
        state = self.tracker.state
        peers = len(state.peers) if state is not None else 0
        if failure is not None:
            self.readiness.report(False, f"revision {self.target_revision} not applied, retrying: {failure}"[:200])
        elif self.applied_revision == 0:
            self.readiness.report(False, "waiting for the first state from the controller")
        else:
            self.readiness.report(True, f"revision {self.applied_revision} applied, {peers} peers")

    def _retry(self) -> None:
        """Another attempt at what failed: the desired state if it could not be taken on, else the kernel."""
        if self.accept_failure is not None:
            self._apply("retry", drop_unfit=True)
        else:
            self.reconciler.retry()

    def _send_status(self) -> None:
        state = self.tracker.state
        recent = time.time() - HANDSHAKE_RECENT_SECONDS
        peer_keys = {p.public_key for p in state.peers} if state is not None else set()
        status = cpb.AgentStatus(
            applied_spec_revision=self.applied_revision,
            peers_with_recent_handshake=sum(1 for k, t in self.reconciler.handshakes.items()
                                            if k in peer_keys and t >= recent),
            drift_repairs=self.reconciler.drift_repairs,
            last_error=self.last_error,
            encryption=self._peer_encryption(),
        )
        self._reported_error = self.last_error
        if state is not None:
            status.segments, status.endpoints = len(state.segments), len(state.endpoints)
            status.peers, status.policies = len(state.peers), len(state.policies)
        with contextlib.suppress(OSError, VeilnetError):
            status.certificate_expires = self.files.certificate().not_after.isoformat()
        self.client.send(cpb.AgentMessage(status=status))

    def _on_command(self, command: cpb.Command) -> None:
        if command.kind == cpb.Command.RESYNC:
            self.log.info("command", kind="resync")
            self._resync_now = True
        elif command.kind == cpb.Command.ROTATE_KEYS and self._ipsec_active():
            assert self.ipsec is not None
            self.log.info("command", kind="rotate-keys", encryption="ipsec")
            self._ipsec_handle(self.ipsec.new_epoch("requested"))
        elif command.kind == cpb.Command.ROTATE_KEYS:
            key = self.reconciler.rotate_wireguard_key()
            self.log.info("command", kind="rotate-keys", public_key=key)
            self.client.send(cpb.AgentMessage(key_update=cpb.KeyUpdate(wireguard_public_key=key)))
        elif command.kind == cpb.Command.RENEW_CERTIFICATE:
            self.log.info("command", kind="renew-certificate")
            self.next_renewal = datetime.now(UTC)
        else:
            self.log.warning("command_unknown", kind=int(command.kind), note="ignored (a newer controller?)")

    # ------------------------------------------------------------------ IPsec keys

    def _ipsec_active(self) -> bool:
        state = self.tracker.state
        return self.ipsec is not None and state is not None and state.encryption == "ipsec"

    def _make_ipsec(self) -> IpsecManager:
        key_pem, _cert = self.files.read_pair()
        return IpsecManager(self.config.node_name, pki.load_private_key_pem(key_pem), self._check_peer_certificate,
                            self.log)

    def _check_peer_certificate(self, pem: bytes) -> tuple[str, Any]:
        """(node name, public key) of a peer's certificate, if our CA issued it and it is valid now."""
        try:
            cert = pki.load_certificate(pem)
            cas = pki.load_certificates(self.files.ca_bundle())
            issued = False
            for ca in cas:
                try:
                    pki.verify_issued_by(cert, ca)
                except pki.PkiError:
                    continue
                issued = True
                break
            if not issued:
                raise ValueError("not issued by this network's CA")
            now = datetime.now(UTC)
            if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
                raise ValueError("outside its validity period")
            identity = pki.identity_from_certificate(cert, self.files.certificate().trust_domain)
        except (VeilnetError, OSError) as exc:
            raise ValueError(str(exc)) from None
        if identity.kind != "node":
            raise ValueError(f"a {identity.kind} certificate, not a node's")
        return identity.name, cert.public_key()

    def _publish_epoch(self) -> None:
        if self.ipsec is not None and self.ipsec.published is not None and self._ipsec_active():
            self.client.send(cpb.AgentMessage(epoch_key=_epoch_key_to_proto(self.ipsec.published)))
            self._next_confirm_resend = 0.0  # and resend what the peers may have missed

    def _on_epoch_key(self, msg: cpb.EpochKey) -> None:
        if self.ipsec is None or not self._ipsec_active():
            self.log.info("ipsec_key_ignored", peer=msg.node, note="this node is not in IPsec mode")
            return
        published = ipsec_keys.PublishedKey(msg.node, msg.epoch, msg.created, msg.expires, bytes(msg.public_key),
                                            bytes(msg.signature))
        try:
            changes = self.ipsec.receive_key(published, bytes(msg.certificate_pem))
        except ipsec_keys.KeyRefused as exc:
            self.ipsec.refused += 1
            self.log.warning("security_event", kind="ipsec_key_refused", peer=exc.node, epoch=exc.epoch,
                             reason=exc.reason)
            return
        self._ipsec_handle(changes)

    def _on_sa_ready(self, msg: cpb.SaReady) -> None:
        if self.ipsec is not None and self._ipsec_active():
            self._ipsec_handle(self.ipsec.peer_ready(msg.peer, msg.sender_epoch, msg.receiver_epoch))

    def _ipsec_handle(self, changes: Changes) -> None:
        """Apply what the key manager asked for, until it asks for nothing more (a switch follows an install)."""
        assert self.ipsec is not None
        for _ in range(8):
            if changes.publish is not None:
                self.client.send(cpb.AgentMessage(epoch_key=_epoch_key_to_proto(changes.publish)))
            for peer, (ours, theirs) in changes.confirmations:
                self.client.send(cpb.AgentMessage(sa_ready=cpb.SaReady(peer=peer, sender_epoch=ours,
                                                                      receiver_epoch=theirs)))
                self.log.info("ipsec_inbound_ready", peer=peer, generation=[ours, theirs])
            if not changes.peers:
                return
            self.reconciler.ipsec_changed(changes.peers)
            self.reconciler.reconcile(full=False)
            changes = self.reconciler.take_ipsec_changes()
            changes.merge(self.ipsec.installed(self.reconciler.installed_sas()))

    def _ipsec_tick(self) -> None:
        if self.ipsec is None or not self._ipsec_active():
            return
        changes = self.ipsec.tick()
        due = self.ipsec.rotation_due(self.reconciler.sa_counters)
        if due is not None:
            changes.merge(self.ipsec.new_epoch(due))
        now = time.monotonic()
        if now >= self._next_confirm_resend and self.client.connected:
            self._next_confirm_resend = now + CONFIRM_RESEND_SECONDS
            for peer, (ours, theirs) in self.ipsec.confirmations_to_resend(self.reconciler.sa_counters):
                self.client.send(cpb.AgentMessage(sa_ready=cpb.SaReady(peer=peer, sender_epoch=ours,
                                                                      receiver_epoch=theirs)))
        if changes:
            self._ipsec_handle(changes)

    def _ipsec_failures(self) -> None:
        """Replayed and forged ESP the kernel dropped since the last read-back, as security events."""
        if self.ipsec is None or not self._ipsec_active():
            return
        peer_of = {address: name for name, address in self.ipsec.addresses.items()}
        seen: dict[tuple[str, str, int], tuple[int, int]] = {}
        for ident, c in self.reconciler.sa_counters.items():
            replay, integrity = c.replay + c.replay_window, c.integrity_failed
            seen[ident] = (replay, integrity)
            old_replay, old_integrity = self._sa_failures.get(ident, (0, 0))
            src, dst, spi = ident
            for kind, now_count, before in (("ipsec_replay", replay, old_replay),
                                            ("ipsec_integrity", integrity, old_integrity)):
                if now_count > before:
                    self.log.warning("security_event", kind=kind, peer=peer_of.get(src), src=src, dst=dst,
                                     spi=f"0x{spi:08x}", packets=now_count - before, total=now_count)
        self._sa_failures = seen

    def _peer_encryption(self) -> list[cpb.PeerEncryption]:
        state = self.tracker.state
        if state is None or self.ipsec is None or state.encryption != "ipsec":
            return []
        out = []
        counters = self.reconciler.sa_counters
        now = time.time()
        for peer in state.peers:
            status = self.ipsec.peer_status(peer.name)
            generation = status.get("generation") or (0, 0)
            msg = cpb.PeerEncryption(peer=peer.name, mode="ipsec", state=status.get("state", "waiting for keys"),
                                     epoch=generation[0], peer_epoch=generation[1])
            since = status.get("since")
            if since:
                msg.epoch_age_seconds = int(max(0, now - since))
            for sa in self.ipsec.sas_of(peer.name):
                c = counters.get(sa.ident, SaCounters())
                msg.replay_failures += c.replay + c.replay_window
                msg.integrity_failures += c.integrity_failed
                if sa in status.get("sas", ()):
                    if sa.src == self.ipsec.local:
                        msg.bytes_out, msg.packets_out = c.bytes, c.packets
                    else:
                        msg.bytes_in, msg.packets_in = c.bytes, c.packets
            out.append(msg)
        return out

    # ------------------------------------------------------------------ local API

    def _on_local(self, request: LocalRequest) -> None:
        if not request.reply.set_running_or_notify_cancel():
            return  # the caller gave up (timed out) before we got to it: do nothing
        try:
            if request.kind == "status":
                request.reply.set_result(self._status())
            elif request.kind == "attach":
                self._attach(wire.endpoint_from_proto(request.payload))
                request.reply.set_result(None)
            elif request.kind == "detach":
                self._detach(str(request.payload))
                request.reply.set_result(None)
        except LocalApiError as exc:
            request.reply.set_exception(exc)
        except ValidationError as exc:
            request.reply.set_exception(LocalApiError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)))
        except Exception as exc:  # answer the caller whatever happens (never with the exception); the loop goes on
            error_id = _error_id()
            self.log.error("local_api_failed", kind=request.kind, error_id=error_id, exc_info=exc)
            request.reply.set_exception(LocalApiError(
                grpc.StatusCode.INTERNAL, f"internal error {error_id}: the agent logged the details under this id"))

    def _attach(self, endpoint: Mapping[str, Any]) -> None:
        name = endpoint.get("name")
        if not isinstance(name, str) or not name:
            raise LocalApiError(grpc.StatusCode.INVALID_ARGUMENT, "endpoint.name: required")
        name = v.name(name, "endpoint.name")  # before it is quoted in any answer
        if self.received is None:
            raise LocalApiError(grpc.StatusCode.FAILED_PRECONDITION,
                                "no state from the controller yet: this node's segments are unknown")
        labels = endpoint.get("labels") or {}
        reserved = [k for k in labels if k.startswith("node.")]
        if reserved:
            raise ValidationError(v.key_path("endpoint.labels", reserved[0]), labels[reserved[0]],
                                  "the prefix node. is reserved for the node's labels")
        if name in self.attached or any(e.get("name") == name for e in self.received.get("endpoints") or ()):
            raise LocalApiError(grpc.StatusCode.ALREADY_EXISTS, f"endpoint {name!r} already exists")
        before = self.attached
        outcome = self._apply(f"attach {name}", attached={**before, name: dict(endpoint)})  # invalid: raises
        problem = str(self.accept_failure) if self.accept_failure is not None else endpoint_not_applied(outcome, name)
        if problem is not None:
            # Attach is all or nothing for the caller: take back whatever of it was created.
            self._apply(f"undo attach {name}", attached=before)
            self.log.error("attach_not_applied", endpoint=name, reason=problem, note="nothing attached")
            raise LocalApiError(grpc.StatusCode.UNAVAILABLE, f"endpoint {name!r} not attached: {problem}")
        self._commit_attached({**before, name: dict(endpoint)})

    def _detach(self, name: str) -> None:
        name = v.name(name, "name")  # before it is quoted in any answer
        if name not in self.attached:
            raise LocalApiError(grpc.StatusCode.NOT_FOUND, f"no endpoint {name!r} was attached through this API")
        remaining = {k: e for k, e in self.attached.items() if k != name}
        outcome = self._apply(f"detach {name}", attached=remaining)  # raises, and changes nothing, if invalid
        self._commit_attached(remaining)
        problem = str(self.accept_failure) if self.accept_failure is not None else endpoint_not_applied(outcome, name)
        if problem is not None:  # it is no longer wanted; the retries go on removing it
            raise LocalApiError(grpc.StatusCode.UNAVAILABLE,
                                f"endpoint {name!r} detached, but not yet removed from the kernel: {problem}; retrying")

    def _commit_attached(self, attached: dict[str, dict[str, Any]]) -> None:
        self.attached = attached
        self._persist_attached()
        self._report_attached()

    def _report_attached(self) -> None:
        self.client.send(cpb.AgentMessage(endpoints=cpb.EndpointReport(
            endpoints=wire.endpoints_to_proto(list(self.attached.values())))))

    def _status(self) -> lpb.StatusResponse:
        state = self.tracker.state
        response = lpb.StatusResponse(
            node=self.config.node_name, mode="controller", controller_connected=self.client.connected,
            controller=self.client.endpoint, applied_sequence=self.applied_sequence,
            applied_spec_revision=self.applied_revision, last_error=self.last_error,
            wireguard_public_key=self.reconciler.public_key,
        )
        if state is not None:
            response.segments, response.endpoints = len(state.segments), len(state.endpoints)
            response.peers, response.policies = len(state.peers), len(state.policies)
            response.encryption = state.encryption
            response.peer_encryption.extend(self._peer_encryption())
        try:
            cert = self.files.certificate()
            response.certificate_expires = cert.not_after.isoformat()
            response.certificate_renews = self.files.renewal_time().isoformat()
        except (OSError, VeilnetError):
            pass
        return response

    # ------------------------------------------------------------------ certificates

    def _maybe_renew(self) -> None:
        """Start a renewal when it is due, on its own thread: the RPC may take seconds, the loop must not wait."""
        if self._renewing is not None:
            return
        if self.next_renewal is None:
            self.next_renewal = self.files.renewal_time()
        if datetime.now(UTC) < self.next_renewal:
            return
        self._renewing = threading.Thread(target=self._renew, name="renew", daemon=True)
        self._renewing.start()

    def _renew(self) -> None:
        try:
            serial = self.client.renew_certificate()
        except Exception as exc:  # reported to the loop, which schedules the retry
            self.inbox.put(StreamEvent("renew_failed", reason=str(exc)))
        else:
            self.inbox.put(StreamEvent("renewed", reason=serial))

    def _on_renewal(self, event: StreamEvent) -> None:
        self._renewing = None
        if event.kind == "renewed":
            self.next_renewal = self.files.renewal_time()
            if self.ipsec is not None:  # peers check our epoch keys against the new certificate's key
                self.ipsec.signer = self._make_ipsec().signer
                if self._ipsec_active():
                    self._ipsec_handle(self.ipsec.new_epoch("certificate renewed"))
            self.log.info("certificate_renewed", serial=event.reason, next_renewal=self.next_renewal.isoformat())
            return
        # Retry well before the certificate runs out: an expired one can only be replaced by joining again.
        left = (self.files.certificate().not_after - datetime.now(UTC)).total_seconds()
        retry = max(1.0, min(RENEW_RETRY_SECONDS, left / 4))
        if left <= 0:
            self.log.error("certificate_expired", note="join again with a new token: veilnet-agent join")
            retry = RENEW_RETRY_SECONDS
        else:
            self.log.error("certificate_renewal_failed", error=event.reason, retry_seconds=round(retry, 1),
                           expires_in_seconds=round(left, 1))
        self.next_renewal = datetime.fromtimestamp(time.time() + retry, UTC)

    # ------------------------------------------------------------------ the loop

    def _guarded(self, handler: Callable[..., object], *args: Any, **kwargs: Any) -> None:
        """One event's failure (a disk error persisting state, wg genkey failing) must not stop the agent:
        the data plane keeps running and the next event or resync tries again."""
        try:
            handler(*args, **kwargs)
        except Exception as exc:
            self.log.error("event_failed", handler=getattr(handler, "__name__", str(handler)), error_id=_error_id(),
                           exc_info=exc)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self._resync_now = True
        else:
            self._stop = True
        self.inbox.put(StreamEvent("wake"))

    def run(self) -> int:
        if not self.files.exists():
            raise VeilnetError(f"not joined: {self.files.directory} has no identity; run veilnet-agent join first")
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        self.local_api.check_directory()  # before anything is touched: refuse an unsafe socket directory
        if self.reconciler.xfrm is not None:
            self.ipsec = self._make_ipsec()
            self.reconciler.ipsec = self.ipsec
        self.log.info("starting", pid=os.getpid(), mode="controller", controller=self.files.control_endpoint(),
                      resync_interval=self.config.resync_interval)
        self._guarded(self._restore)
        self._guarded(self.reconciler.reconcile, full=True)
        self._after_pass(retry=False)
        self.local_api.start()
        self.client.start()
        self.log.info("ready", public_key=self.reconciler.public_key, local_api=str(self.config.control.local_socket))
        next_resync = time.monotonic() + self.config.resync_interval
        try:
            while not self._stop:
                self.readiness.alive()
                now = time.monotonic()
                retry_in = self.retry.seconds_until_due(now)
                timeout = max(0.0, min(POLL_SECONDS, next_resync - now, POLL_SECONDS if retry_in is None else retry_in))
                try:
                    event: Event | None = self.inbox.get(timeout=timeout)
                except queue.Empty:
                    event = None
                while event is not None and not self._stop:
                    self._guarded(self._on_local if isinstance(event, LocalRequest) else self._on_stream, event)
                    self._guarded(self._after_pass, retry=False)
                    try:
                        event = self.inbox.get_nowait()
                    except queue.Empty:
                        event = None
                self._guarded(self._maybe_renew)
                self._guarded(self._ipsec_tick)
                if self.retry.due(time.monotonic()):
                    self._guarded(self._retry)
                    self._guarded(self._after_pass, retry=True)
                if self._resync_now or time.monotonic() >= next_resync:
                    self._resync_now = False
                    self._guarded(self.reconciler.reconcile, full=True)
                    self._guarded(self._after_pass, retry=False)
                    self._guarded(self._ipsec_failures)
                    self._guarded(self._send_status)
                    next_resync = time.monotonic() + self.config.resync_interval
        finally:
            self.readiness.stopping("stopping; the data plane stays in place")
            self.log.info("stopping", note="data plane left in place; a restart adopts it")
            self.client.stop()
            self.local_api.stop()
            self.reconciler.close()
        return 0



def _epoch_key_to_proto(published: ipsec_keys.PublishedKey) -> cpb.EpochKey:
    return cpb.EpochKey(node=published.node, epoch=published.epoch, created=published.created,
                        expires=published.expires, public_key=published.public, signature=published.signature)
