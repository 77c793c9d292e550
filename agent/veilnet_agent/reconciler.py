"""Observe -> plan -> apply, with a cached model of the kernel between resyncs.

Like Felix's dataplane managers, changes to the desired state are planned
against the model of the kernel left by the last successful apply (so a
one-peer change costs O(1) kernel work at any scale); a timer re-reads the
kernel in full, and anything the planner finds to do then, with the desired
state unchanged, is drift: repaired and logged as such.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from .config import AgentConfig
from .describe import op_fields
from .drivers.base import ApplyResult
from .drivers.links import LinksObservation
from .drivers.wireguard import WgObservation
from .errors import ValidationError
from .firewall_manager import FirewallManager, FirewallOutcome
from .logs import get_logger
from .model import NodeState
from .objects import KernelState
from .ops import EnsureWgInterface, EntryOp, LinkOp, Op, SyncWgPeers, WgOp, cost
from .planner import plan
from .render import NodeContext, Rendered, render_all, render_peer_changes

PER_OP_LOG_LIMIT = 200


class LinksPort(Protocol):
    def observe(self) -> LinksObservation: ...
    def apply(self, ops: Sequence[LinkOp | EntryOp]) -> ApplyResult[Any]: ...
    def geneve_supported(self) -> bool: ...
    def interface_mtu(self, ifname: str) -> int: ...


class WireGuardPort(Protocol):
    def observe(self) -> WgObservation: ...
    def apply(self, ops: Sequence[WgOp]) -> ApplyResult[Any]: ...
    def ensure_private_key(self) -> str: ...
    def rotate_private_key(self) -> str: ...


def _firewall_view(state: NodeState, peers: Collection[str]) -> dict[str, object]:
    """What of these peers the firewall depends on: policy tuples on their endpoints, anti-spoofing also on
    their transport address and shared segments (not their WireGuard key or underlay endpoint)."""
    wanted = set(peers)
    return {p.name: (p.endpoints, p.transport_address, p.segments) for p in state.peers if p.name in wanted}


@dataclass
class Outcome:
    ops: list[Op] = field(default_factory=list)
    failed: list[tuple[Op, str]] = field(default_factory=list)
    requests: int = 0
    drift: bool = False
    seconds: float = 0.0
    observed: bool = False
    firewall: FirewallOutcome | None = None

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
    ) -> None:
        self.config = config
        self.links = links
        self.wireguard = wireguard
        self.firewall = firewall
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

    # -- desired state -------------------------------------------------
    @property
    def target(self) -> KernelState | None:
        return None if self.rendered is None else self.rendered.target

    def accept(self, state: NodeState, changed_peers: Collection[str] | None = None) -> None:
        """Check ``state`` against this host and make it the target; raise and keep the old one if bad.

        ``changed_peers``: the names of the only peers that differ from the current desired
        state (None: anything may differ). The target is then patched for just those peers.
        """
        if changed_peers is not None and self.rendered is not None and self.desired is not None:
            self.rendered = render_peer_changes(self.rendered, state, self._context(), changed_peers)
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
        self.rendered = render_all(state, self._context())
        self._accept_firewall(state)
        self.desired = state
        self._generation += 1

    def _accept_firewall(self, state: NodeState) -> None:
        if self.firewall is not None:
            self.firewall.accept(state)

    def _geneve_supported(self) -> bool:
        if self._geneve is None:
            self._geneve = self.links.geneve_supported()
        return self._geneve

    def _context(self) -> NodeContext:
        underlay = self.config.underlay
        mtu = underlay.mtu if underlay.mtu is not None else self.links.interface_mtu(underlay.interface)
        return NodeContext(
            public_key=self.public_key,
            listen_port=self.config.wireguard.listen_port,
            underlay_mtu=mtu,
            underlay_family=underlay.family,
        )

    def rotate_wireguard_key(self) -> str:
        """A new WireGuard key pair, applied now; peers learn the public key from the controller."""
        self.public_key = self.wireguard.rotate_private_key()
        if self.desired is not None:
            self.rendered = render_all(self.desired, self._context())
            self._generation += 1
            self.reconcile(full=False)
        return self.public_key

    # -- kernel state --------------------------------------------------
    def observe(self) -> KernelState:
        links = self.links.observe()
        wg = self.wireguard.observe()
        self.handshakes = dict(getattr(wg, "handshakes", {}))  # public key -> epoch seconds (0: never)
        self.wireguard_backend = getattr(wg, "backend", None) or self.wireguard_backend
        return KernelState(links=links.links, fdb=links.fdb, neigh=links.neigh, wg=wg.interface, wg_peers=wg.peers)

    def reconcile(self, *, full: bool) -> Outcome:
        """Bring the kernel to the target. ``full`` re-reads the kernel first (resync)."""
        started = time.perf_counter()
        outcome = Outcome()
        if self.desired is None or self.rendered is None:
            return outcome
        if full:
            # The underlay MTU may have changed: render again from the same desired state.
            self.rendered = render_all(self.desired, self._context())
        observed = self._cache
        if full or observed is None:
            observed = self.observe()
            outcome.observed = True
        if self.firewall is not None:
            # Policy first: a new endpoint must never be reachable before its filter exists.
            outcome.firewall = self.firewall.reconcile(full=full)
        target = self.rendered.target
        outcome.ops = plan(target, observed)
        outcome.drift = full and bool(outcome.ops) and self._generation == self._converged_generation
        self.drift_repairs += outcome.drift
        if outcome.ops:
            result = self._apply(outcome.ops)
            outcome.failed = result.failed
            outcome.requests = result.requests
        if outcome.failed:
            self._cache = None
        else:
            self._cache = target
            self._converged_generation = self._generation
        outcome.seconds = time.perf_counter() - started
        self._log_outcome(outcome)
        return outcome

    def converged(self) -> list[Op]:
        """Re-read the kernel and return what is still left to do (empty when converged)."""
        if self.rendered is None:
            return []
        return plan(self.rendered.target, self.observe())

    def _apply(self, ops: list[Op]) -> ApplyResult[Op]:
        ensure: list[WgOp] = [op for op in ops if isinstance(op, EnsureWgInterface)]
        peers: list[WgOp] = [op for op in ops if isinstance(op, SyncWgPeers)]
        rest: list[LinkOp | EntryOp] = [op for op in ops if not isinstance(op, (EnsureWgInterface, SyncWgPeers))]
        result: ApplyResult[Op] = ApplyResult()
        if ensure:
            result.merge(self.wireguard.apply(ensure))
        # WireGuard peers (another process) and netlink entries do not depend on each other: apply both at once.
        pending = self._pool.submit(self.wireguard.apply, peers) if peers else None
        if rest:
            result.merge(self.links.apply(rest))
        if pending is not None:
            result.merge(pending.result())
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
        if outcome.ops:
            self.log.info(
                "reconciled",
                ops=len(outcome.ops),
                failed=len(outcome.failed),
                kernel_requests=outcome.requests,
                observed=outcome.observed,
                seconds=round(outcome.seconds, 4),
            )

    def close(self) -> None:
        self._pool.shutdown(wait=True)
