"""Observe -> plan -> apply, with a cached model of the kernel between resyncs.

Like Felix's dataplane managers, changes to the desired state are planned
against the model of the kernel left by the last successful apply (so a
one-peer change costs O(1) kernel work at any scale); a timer re-reads the
kernel in full, and anything the planner finds to do then, with the desired
state unchanged, is drift: repaired and logged as such.

Nothing fails open. The firewall goes first; if its table cannot be brought to
the compiled policy, only operations that take something away (deleting links,
entries and WireGuard peers) are applied, and everything that would bring a
segment, endpoint or peer up (or change one in place) is held back: an
endpoint is never reachable before its filter exists, while a revoked peer or a
removed endpoint still goes at once. Every pass ends with ``failure``: None when
the kernel is at the target, else the first thing that failed (the firewall,
a kernel operation, the underlay, or the pass itself), for logs, acks and
status. The daemons retry failed passes with backoff (``retry()`` re-reads the
kernel, the firewall table and, if it was unreadable, the underlay MTU).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..core import addr
from ..core.config import AgentConfig
from ..core.describe import op_fields, op_subject
from ..core.encryption import IpsecHost, WireGuardHost
from ..core.errors import DriverError, ValidationError
from ..core.model import NodeState
from ..core.objects import ApplyResult, KernelState, PolicyKey, SaCounters, SaKey, XfrmPolicy, XfrmSa
from ..core.ops import (
    DeleteLink,
    DelFdb,
    DelNeigh,
    EnsureWgInterface,
    EntryOp,
    LinkOp,
    Op,
    SyncWgPeers,
    SyncXfrm,
    WgOp,
    cost,
)
from ..core.planner import plan
from ..core.render import NodeContext, Rendered, render_all, render_peer_changes
from ..logs import get_logger
from .firewall_manager import FirewallManager, FirewallOutcome
from .ipsec_manager import Changes, IpsecManager
from .ports import LinksPort, WireGuardPort, XfrmPort

PER_OP_LOG_LIMIT = 200


def _firewall_view(state: NodeState, peers: Collection[str]) -> dict[str, object]:
    """What of these peers the firewall depends on: policy tuples on their endpoints, anti-spoofing also on
    their transport address and shared segments (not their WireGuard key or underlay endpoint)."""
    wanted = set(peers)
    return {p.name: (p.endpoints, p.transport_address, p.underlay_address, p.segments)
            for p in state.peers if p.name in wanted}


@dataclass(frozen=True)
class Failure:
    """Why the kernel is not (known to be) at the target: the first thing that failed.

    ``subsystem``: ``firewall`` (the table could not be applied), ``kernel`` (an operation the
    kernel refused), ``underlay`` (its MTU could not be read) or ``agent`` (the pass itself failed).
    """

    subsystem: str
    subject: str  # what failed, e.g. "create link/vnep1a2b3c4d5e (endpoint b-late)"
    reason: str  # the kernel's or the driver's words
    failed_ops: int = 0
    held_ops: int = 0  # not attempted: they would have brought something up without its filter

    def __str__(self) -> str:
        text = f"{self.subsystem}: {self.subject}: {self.reason}"
        if self.failed_ops > 1:
            text += f" (and {self.failed_ops - 1} more failed operations)"
        if self.held_ops:
            text += f"; {self.held_ops} operations held back until the firewall applies"
        return text


def split_by_exposure(ops: Sequence[Op]) -> tuple[list[Op], list[Op]]:
    """(ops that only take something away, ops that would bring something up or change it), in plan order.

    Deleting links, FDB and neighbour entries and removing WireGuard peers only reduce what can be
    reached; creating or changing anything may expose it. A peer batch is split into its removals
    (applied) and its upserts (held).
    """
    reducing: list[Op] = []
    held: list[Op] = []
    for op in ops:
        if isinstance(op, (DeleteLink, DelFdb, DelNeigh)):
            reducing.append(op)
        elif isinstance(op, SyncWgPeers) and op.removes:
            reducing.append(SyncWgPeers(upserts=(), removes=op.removes, reason=op.reason))
            if op.upserts:
                held.append(SyncWgPeers(upserts=op.upserts, removes=(), reason=op.reason))
        elif isinstance(op, SyncXfrm) and not op.add_sas and not op.set_policies:
            reducing.append(op)  # policies and SAs of peers whose tunnels went first
        else:
            held.append(op)
    return reducing, held


@dataclass
class Outcome:
    ops: list[Op] = field(default_factory=list)  # attempted
    failed: list[tuple[Op, str]] = field(default_factory=list)
    held: list[Op] = field(default_factory=list)  # planned but not attempted: the firewall is not in place
    requests: int = 0
    drift: bool = False
    seconds: float = 0.0
    observed: bool = False
    full: bool = False  # a resync: the kernel was read back in full
    firewall: FirewallOutcome | None = None
    failure: Failure | None = None  # None: the kernel is at the target

    @property
    def cost(self) -> int:
        return sum(cost(op) for op in self.ops)


class Reconciler:
    def __init__(
        self,
        config: AgentConfig,
        links: LinksPort,
        wireguard: WireGuardPort,
        firewall: FirewallManager | None = None,
        xfrm: XfrmPort | None = None,
    ) -> None:
        self.config = config
        self.links = links
        self.wireguard = wireguard
        self.firewall = firewall
        self.xfrm = xfrm
        self.ipsec: IpsecManager | None = None  # set by the controlled daemon (IPsec needs the controller)
        self.sa_counters: dict[SaKey, SaCounters] = {}  # as of the last read-back
        self.sa_added: dict[SaKey, int] = {}
        self.ipsec_changes = Changes()  # what the key manager asked for while states were accepted (drained)
        self.log = get_logger(node=config.node_name)
        self.public_key = wireguard.ensure_private_key()
        self.desired: NodeState | None = None
        self.rendered: Rendered | None = None
        self._generation = 0  # bumped by every accepted desired state
        self._converged_generation = -1
        self._cache: KernelState | None = None  # the kernel as last applied; None = unknown
        self._geneve: bool | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wg-apply")
        self.handshakes: dict[str, int] = {}  # as of the last read-back
        self.wireguard_backend: str | None = None  # "kernel" or "userspace", once the interface was read back
        self.drift_repairs = 0  # full resyncs that found and repaired drift
        self.resyncs = 0  # full passes completed (each logs a "resynced" event)
        self.failure: Failure | None = None  # as of the last pass: None when the kernel is at the target
        self._failing_since: float | None = None
        self._last_underlay_mtu: int | None = None  # the last MTU read from the underlay interface
        self._underlay_problem: str | None = None  # why the last read failed (the last known MTU is in use)

    # -- desired state -------------------------------------------------
    @property
    def target(self) -> KernelState | None:
        return None if self.rendered is None else self.rendered.target

    def accept(self, state: NodeState, changed_peers: Collection[str] | None = None) -> None:
        """Check ``state`` against this host and make it the target; raise and keep the old one if bad.

        ``changed_peers``: the names of the only peers that differ from the current desired
        state (None: anything may differ). The target is then patched for just those peers.
        """
        if state.encryption == "ipsec":
            self._check_ipsec(state)
        same_mode = self.desired is not None and self.desired.encryption == state.encryption \
            and self.desired.ipsec == state.ipsec
        if changed_peers is not None and self.rendered is not None and self.desired is not None and same_mode:
            sas = self._ipsec_configure(state)
            self.rendered = render_peer_changes(self.rendered, state, self._context(state), changed_peers, sas)
            if _firewall_view(self.desired, changed_peers) != _firewall_view(state, changed_peers):
                self._accept_firewall(state)
            self.desired = state
            self._generation += 1
            return
        if state.node != self.config.node_name:
            expected = self.config.node_name
            raise ValidationError("node", state.node, f"does not match this agent's node_name {expected!r}")
        for i, segment in enumerate(state.segments):
            if segment.encapsulation == "geneve" and not self._geneve_supported():
                raise ValidationError(
                    f"segments[{i}].encapsulation", "geneve",
                    "is not supported by this kernel (no geneve module); use vxlan",
                )
        sas = self._ipsec_configure(state)
        self.rendered = render_all(state, self._context(state), sas)
        self._accept_firewall(state)
        self.desired = state
        self._generation += 1

    def _check_ipsec(self, state: NodeState) -> None:
        """An IPsec state this host cannot carry is refused whole, naming why."""
        if self.xfrm is None or self.ipsec is None:
            raise ValidationError("encryption", "ipsec", "needs the controller (it relays the epoch keys): "
                                  "run the agent with veilnet-agent run after joining")
        reason = self.xfrm.unsupported()
        if reason is not None:
            raise ValidationError("encryption", "ipsec", f"is not supported by this kernel: {reason}")
        family = self.config.underlay.address.version
        for i, peer in enumerate(state.peers):
            if peer.underlay_address.version != family:
                raise ValidationError(f"peers[{i}].underlay_address", str(peer.underlay_address),
                                      f"is IPv{peer.underlay_address.version}, this node's underlay "
                                      f"({self.config.underlay.address}) IPv{family}: IPsec runs over one family")

    def installed_sas(self) -> frozenset[SaKey]:
        """The SAs known to be in the kernel: the target's, if the last pass reached it."""
        if self._cache is None:
            return frozenset()
        return frozenset(self._cache.xfrm_sas)

    def _current_sas(self) -> dict[str, tuple[XfrmSa, ...]] | None:
        """Every peer's SAs as the key manager holds them now (None: not in IPsec mode)."""
        if self.desired is None or self.desired.encryption != "ipsec" or self.ipsec is None:
            return None
        return self.ipsec.sas()

    def take_ipsec_changes(self) -> Changes:
        changes, self.ipsec_changes = self.ipsec_changes, Changes()
        return changes

    def _ipsec_configure(self, state: NodeState) -> dict[str, tuple[XfrmSa, ...]] | None:
        """Tell the key manager about the state's peers; the SAs every peer has now (None: not IPsec)."""
        if state.encryption != "ipsec" or self.ipsec is None or self.xfrm is None:
            return None
        if self.ipsec.adopted_from is None:  # first IPsec state since start: adopt the kernel's SAs
            self.ipsec.adopt(self.xfrm.observe().sas)
        self.ipsec_changes.merge(self.ipsec.configure(state, addr.text(self.config.underlay.address)))
        return self.ipsec.sas()

    def ipsec_changed(self, peers: Collection[str]) -> None:
        """The key manager changed these peers' SAs: patch them into the target (the caller reconciles)."""
        if self.ipsec is None or self.desired is None or self.rendered is None or not peers:
            return
        if self.desired.encryption != "ipsec":
            return
        sas = {name: self.ipsec.sas_of(name) for name in peers}
        self.rendered = render_peer_changes(self.rendered, self.desired, self._context(self.desired),
                                            [p for p in peers if any(x.name == p for x in self.desired.peers)], sas)
        self._generation += 1

    def _accept_firewall(self, state: NodeState) -> None:
        if self.firewall is not None:
            self.firewall.accept(state)

    def _geneve_supported(self) -> bool:
        if self._geneve is None:
            self._geneve = self.links.geneve_supported()
        return self._geneve

    def _context(self, state: NodeState | None = None) -> NodeContext:
        underlay = self.config.underlay
        current = state or self.desired
        ipsec = current is not None and current.encryption == "ipsec"
        return NodeContext(
            encryption=IpsecHost(underlay.address) if ipsec else
            WireGuardHost(public_key=self.public_key, listen_port=self.config.wireguard.listen_port),
            underlay_mtu=underlay.mtu if underlay.mtu is not None else self._underlay_mtu(underlay.interface),
            underlay_family=underlay.family,
        )

    def _underlay_mtu(self, interface: str) -> int:
        """The underlay interface's MTU; while it cannot be read, the last one read (DriverError if none yet).

        An interface that disappears (renamed, unplugged) must not stop the agent from enforcing and
        repairing the data plane it has; the problem is recorded as a failure until a read succeeds.
        """
        try:
            mtu = self.links.interface_mtu(interface)
        except DriverError as exc:
            if self._last_underlay_mtu is None:
                raise
            self._underlay_problem = str(exc)
            self.log.warning("underlay_unreadable", interface=interface, reason=str(exc),
                             using_mtu=self._last_underlay_mtu)
            return self._last_underlay_mtu
        self._underlay_problem = None
        self._last_underlay_mtu = mtu
        return mtu

    def rotate_wireguard_key(self) -> str:
        """A new WireGuard key pair, applied now; peers learn the public key from the controller."""
        self.public_key = self.wireguard.rotate_private_key()
        if self.desired is not None:
            self.rendered = render_all(self.desired, self._context(), self._current_sas())
            self._generation += 1
            self.reconcile(full=False)
        return self.public_key

    # -- kernel state --------------------------------------------------
    def observe(self) -> KernelState:
        links = self.links.observe()
        wg = self.wireguard.observe()
        self.handshakes = dict(getattr(wg, "handshakes", {}))  # public key -> epoch seconds (0: never)
        self.wireguard_backend = getattr(wg, "backend", None) or self.wireguard_backend
        sas: dict[SaKey, XfrmSa] = {}
        policies: dict[PolicyKey, XfrmPolicy] = {}
        if self.xfrm is not None:
            xfrm = self.xfrm.observe()
            sas, policies = xfrm.sas, xfrm.policies
            self.sa_counters, self.sa_added = xfrm.counters, xfrm.added
        return KernelState(links=links.links, fdb=links.fdb, neigh=links.neigh, wg=wg.interface, wg_peers=wg.peers,
                           xfrm_sas=sas, xfrm_policies=policies)

    def reconcile(self, *, full: bool) -> Outcome:
        """Bring the kernel to the target. ``full`` re-reads the kernel first (resync). Never raises:
        whatever fails is in the outcome's ``failure`` (and ``self.failure``) for the caller to retry."""
        return self._pass(full=full, retry=False)

    def retry(self) -> Outcome:
        """Another pass after a failure: re-reads the kernel, the firewall table (the firewall manager
        compares in full after a failure) and the underlay MTU if it could not be read; not counted as drift."""
        return self._pass(full=False, retry=True)

    def _pass(self, *, full: bool, retry: bool) -> Outcome:
        started = time.perf_counter()
        outcome = Outcome(full=full)
        if self.desired is None or self.rendered is None:
            return outcome
        try:
            self._plan_and_apply(outcome, full=full, retry=retry)
        except Exception as exc:  # a read-back or a driver failed as a whole: nothing is known to be applied
            self._cache = None
            subsystem = "kernel" if isinstance(exc, (DriverError, OSError)) else "agent"
            outcome.failure = Failure(subsystem, "reconcile", f"{type(exc).__name__}: {exc}")
            self.log.exception("reconcile_failed", full=full, retry=retry, reason=str(exc))
        else:
            outcome.failure = self._failure_of(outcome)
        outcome.seconds = time.perf_counter() - started
        self._log_outcome(outcome)
        self._record_failure(outcome.failure)
        return outcome

    def _plan_and_apply(self, outcome: Outcome, *, full: bool, retry: bool) -> None:
        assert self.desired is not None and self.rendered is not None
        if full or (retry and self._underlay_problem is not None):
            # The underlay MTU may have changed: render again from the same desired state.
            self.rendered = render_all(self.desired, self._context(), self._current_sas())
        observed = self._cache
        if full or retry or observed is None:
            observed = self.observe()
            outcome.observed = True
        firewall_error: str | None = None
        if self.firewall is not None:
            # Policy first: a new endpoint must never be reachable before its filter exists.
            outcome.firewall = self.firewall.reconcile(full=full)
            firewall_error = outcome.firewall.error
        target = self.rendered.target
        planned = plan(target, observed)
        outcome.ops, outcome.held = split_by_exposure(planned) if firewall_error is not None else (planned, [])
        outcome.drift = full and bool(planned) and self._generation == self._converged_generation
        self.drift_repairs += outcome.drift
        if outcome.ops:
            result = self._apply(outcome.ops)
            outcome.failed = result.failed
            outcome.requests = result.requests
        if outcome.failed or outcome.held or firewall_error is not None:
            self._cache = None  # read the kernel again next time
        else:
            self._cache = target
            self._converged_generation = self._generation

    def _failure_of(self, outcome: Outcome) -> Failure | None:
        firewall = outcome.firewall
        if firewall is not None and firewall.error is not None:
            what = "table inet veilnet" + (f" ({firewall.action})" if firewall.action != "none" else "")
            return Failure("firewall", what, firewall.error,
                           failed_ops=len(outcome.failed), held_ops=len(outcome.held))
        if outcome.failed:
            op, reason = outcome.failed[0]
            return Failure("kernel", op_subject(op), reason, failed_ops=len(outcome.failed))
        if self._underlay_problem is not None:
            return Failure("underlay", f"interface {self.config.underlay.interface}",
                           f"{self._underlay_problem}; using the last MTU read, {self._last_underlay_mtu}")
        return None

    def _record_failure(self, failure: Failure | None) -> None:
        previous, self.failure = self.failure, failure
        now = time.monotonic()
        if failure is not None and self._failing_since is None:
            self._failing_since = now
        elif failure is None and previous is not None:
            since = self._failing_since if self._failing_since is not None else now
            self._failing_since = None
            self.log.info("recovered", was=str(previous), failing_for_seconds=round(now - since, 2))

    def converged(self) -> list[Op]:
        """Re-read the kernel and return what is still left to do (empty when converged)."""
        if self.rendered is None:
            return []
        return plan(self.rendered.target, self.observe())

    def _apply(self, ops: list[Op]) -> ApplyResult[Op]:
        ensure: list[WgOp] = [op for op in ops if isinstance(op, EnsureWgInterface)]
        peers: list[WgOp] = [op for op in ops if isinstance(op, SyncWgPeers)]
        encryption_ops = (EnsureWgInterface, SyncWgPeers, SyncXfrm)
        rest: list[LinkOp | EntryOp] = [op for op in ops if not isinstance(op, encryption_ops)]
        # IPsec: what the planner put before the tunnels goes before them, what it put after goes after.
        first_tunnel_op = next((i for i, op in enumerate(ops) if not isinstance(op, encryption_ops)), len(ops))
        xfrm_before = [op for op in ops[:first_tunnel_op] if isinstance(op, SyncXfrm)]
        xfrm_after = [op for op in ops[first_tunnel_op:] if isinstance(op, SyncXfrm)]
        result: ApplyResult[Op] = ApplyResult()
        if (xfrm_before or xfrm_after) and self.xfrm is None:
            result.failed.extend((op, "no XFRM driver") for op in xfrm_before + xfrm_after)
            xfrm_before, xfrm_after = [], []
        if xfrm_before:
            assert self.xfrm is not None
            before = self.xfrm.apply(xfrm_before)
            result.merge(before)
            if before.failed:  # never bring tunnels up without their protection
                rest = [op for op in rest if isinstance(op, (DeleteLink, DelFdb, DelNeigh))]
        if ensure:
            result.merge(self.wireguard.apply(ensure))
        # WireGuard peers (another process) and netlink entries do not depend on each other: apply both at once.
        pending = self._pool.submit(self.wireguard.apply, peers) if peers else None
        if rest:
            result.merge(self.links.apply(rest))
        if pending is not None:
            result.merge(pending.result())
        if xfrm_after:
            assert self.xfrm is not None
            result.merge(self.xfrm.apply(xfrm_after))
        return result

    # -- logging -------------------------------------------------------
    def _log_outcome(self, outcome: Outcome) -> None:
        failed = {id(op) for op, _ in outcome.failed}
        applied = [op for op in outcome.ops if id(op) not in failed]
        event = "drift" if outcome.drift else "applied"
        emit = self.log.warning if outcome.drift else self.log.info
        emit_detail = emit if len(applied) <= PER_OP_LOG_LIMIT else self.log.debug
        if len(applied) <= PER_OP_LOG_LIMIT or self.log.is_enabled_for(logging.DEBUG):
            for op in applied:
                emit_detail(event, **op_fields(op), reason=op.reason)
        if len(applied) > PER_OP_LOG_LIMIT:
            counts = Counter(type(op).__name__ for op in applied)
            emit(f"{event}_batch", counts=dict(counts), ops=len(applied))
        for op, reason in outcome.failed:
            self.log.error("apply_failed", **op_fields(op), reason=reason)
        for op in outcome.held[:PER_OP_LOG_LIMIT]:
            self.log.warning("apply_held", **op_fields(op), reason="the firewall table could not be applied")
        if outcome.ops or outcome.held:
            self.log.info(
                "reconciled",
                ops=len(outcome.ops),
                failed=len(outcome.failed),
                held=len(outcome.held),
                kernel_requests=outcome.requests,
                observed=outcome.observed,
                seconds=round(outcome.seconds, 4),
            )
        if outcome.full:
            # One line per resync, also when nothing changed: the observable event that a full read-back
            # and repair ran (tests wait for it instead of sleeping through resync intervals).
            self.resyncs += 1
            self.log.info("resynced", n=self.resyncs, ops=len(outcome.ops), drift=outcome.drift,
                          ok=outcome.failure is None, seconds=round(outcome.seconds, 4))

    def close(self) -> None:
        self._pool.shutdown(wait=True)
