"""Keeps our nftables tables equal to the compiled policy and anti-spoofing (like a Felix dataplane manager).

Desired state in, compiled once; the kernel's tables are read back on resync
and otherwise modelled by what was last applied. A structural difference
(or a missing or foreign-fingerprinted table) replaces both tables in one
transaction; otherwise only the managed sets' elements (allow maps,
anti-spoofing sets) are added and deleted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..core.config import FirewallConfig
from ..core.firewall_compiler import (
    AllowElements,
    CompiledFirewall,
    Element,
    ElementDelta,
    FirewallSettings,
    Shape,
    compile_table,
)
from ..core.firewall_guard import GuardElements
from ..core.model import NodeState
from ..core.objects import ObservedFirewall
from ..logs import get_logger
from .ports import FirewallPort


@dataclass
class FirewallOutcome:
    action: str = "none"  # none | replace | elements
    added: int = 0
    deleted: int = 0
    error: str | None = None
    drift: bool = False
    reasons: list[str] = field(default_factory=list)


def element_diff(
    want: Mapping[str, frozenset[Element]], have: Mapping[str, frozenset[Element]]
) -> tuple[dict[str, frozenset[Element]], dict[str, frozenset[Element]]]:
    add = {n: want[n] - have.get(n, frozenset()) for n in want}
    delete = {n: have[n] - want.get(n, frozenset()) for n in have}
    return {n: e for n, e in add.items() if e}, {n: e for n, e in delete.items() if e}


def _describe_shape_drift(want: Shape, have: Shape) -> str:
    def describe(items: Shape) -> list[str]:
        return sorted(f"{family} {kind} {name}" + (f" ({n} rules)" if kind == "chain" else "")
                      for family, kind, name, n in items)

    missing, extra = describe(want - have), describe(have - want)
    return f"tables differ: expected {', '.join(missing[:5]) or '-'}; found {', '.join(extra[:5]) or '-'}"


class FirewallManager:
    def __init__(self, driver: FirewallPort, config: FirewallConfig, node: str) -> None:
        self.driver = driver
        self.settings = FirewallSettings(nflog_group=config.nflog_group, log_per_second=config.log_per_second)
        self.log = get_logger(node=node, component="firewall")
        self.allow: AllowElements | None = None
        self.guard: GuardElements | None = None
        self.desired: NodeState | None = None
        self.structure: tuple[dict[str, Any], ...] = ()
        self.fingerprint = ""
        # Net element changes not yet applied, relative to what the kernel holds when in sync;
        # None: the kernel must be compared in full (first state, new structure, or after a failure).
        self._pending: ElementDelta | None = None
        self._in_sync = False
        self._generation = 0
        self._converged_generation = -1

    @property
    def compiled(self) -> CompiledFirewall | None:
        """The whole compiled table (materialises every element: O(tuples))."""
        if self.allow is None or self.guard is None:
            return None
        return CompiledFirewall(self.structure, {**self.allow.frozen(), **self.guard.frozen()}, self.fingerprint)

    def accept(self, state: NodeState) -> None:
        self.desired = state  # read by the security-event thread to explain spoofing drops
        structure, fingerprint = compile_table(state, self.settings)
        self._generation += 1
        if self.allow is not None and self.guard is not None and fingerprint == self.fingerprint:
            adds, deletes = self.allow.update(state)  # O(changed endpoints)
            guard_adds, guard_deletes = self.guard.update(state)  # O(changed endpoints and peers)
            delta: ElementDelta = ({**adds, **guard_adds}, {**deletes, **guard_deletes})  # disjoint set names
            if self._pending is not None:
                self._pending = _merge(self._pending, delta)
            return
        self.allow = AllowElements(state)
        self.guard = GuardElements(state)
        self.structure, self.fingerprint = structure, fingerprint
        self._pending = None

    def reconcile(self, *, full: bool) -> FirewallOutcome:
        outcome = FirewallOutcome()
        if self.allow is None or self.guard is None:
            return outcome
        drift = full and self._generation == self._converged_generation
        try:
            if not full and self._in_sync and self._pending is not None:
                self._apply_pending(outcome)
            else:
                self._compare_and_apply(outcome, observe=full or not self._in_sync)
        except Exception as exc:  # a rejected batch changed nothing; compare in full next time
            outcome.error = str(exc)
            self._in_sync = False
            self._pending = None
            self.log.error("firewall_apply_failed", action=outcome.action, reason=outcome.error)
            return outcome
        self._in_sync = True
        self._pending = ({}, {})
        self._converged_generation = self._generation
        outcome.drift = drift and outcome.action != "none"
        if outcome.action != "none":
            emit = self.log.warning if outcome.drift else self.log.info
            emit("firewall_drift" if outcome.drift else "firewall_applied", action=outcome.action,
                 elements_added=outcome.added, elements_deleted=outcome.deleted,
                 fingerprint=self.fingerprint, reasons=outcome.reasons)
        return outcome

    def _apply_pending(self, outcome: FirewallOutcome) -> None:
        assert self._pending is not None
        adds = {n: frozenset(e) for n, e in self._pending[0].items() if e}
        deletes = {n: frozenset(e) for n, e in self._pending[1].items() if e}
        if adds or deletes:
            outcome.action = "elements"
            self.driver.apply_elements(adds, deletes)
            outcome.added = sum(len(e) for e in adds.values())
            outcome.deleted = sum(len(e) for e in deletes.values())

    def _compare_and_apply(self, outcome: FirewallOutcome, *, observe: bool) -> None:
        compiled = self.compiled
        assert compiled is not None
        # Not observing: the kernel is in sync with an older structure and is replaced, whatever its elements.
        observed = self.driver.observe() if observe else ObservedFirewall(present=True, fingerprint=None, elements={})
        shape_drift = observe and observed.present and observed.shape != compiled.shape
        if not observed.present or observed.fingerprint != compiled.fingerprint or shape_drift:
            outcome.action = "replace"
            if not observed.present:
                outcome.reasons.append("missing")
            elif observed.fingerprint != compiled.fingerprint:
                outcome.reasons.append("structure changed")
            else:
                outcome.reasons.append(_describe_shape_drift(compiled.shape, observed.shape))
            self.driver.apply_full(compiled)
            outcome.added = sum(len(e) for e in compiled.elements.values())
            return
        add, delete = element_diff(compiled.elements, observed.elements)
        if add or delete:
            outcome.action = "elements"
            self.driver.apply_elements(add, delete)
            outcome.added = sum(len(e) for e in add.values())
            outcome.deleted = sum(len(e) for e in delete.values())


def _merge(first: ElementDelta, second: ElementDelta) -> ElementDelta:
    """Two successive element changes as one (an add undone by a delete cancels, and the reverse)."""
    adds = {n: set(e) for n, e in first[0].items()}
    deletes = {n: set(e) for n, e in first[1].items()}
    for name, elements in second[1].items():
        for element in elements:
            if element in adds.get(name, set()):
                adds[name].discard(element)
            else:
                deletes.setdefault(name, set()).add(element)
    for name, elements in second[0].items():
        for element in elements:
            if element in deletes.get(name, set()):
                deletes[name].discard(element)
            else:
                adds.setdefault(name, set()).add(element)
    return adds, deletes
