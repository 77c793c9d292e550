"""Keeps the ``inet veilnet`` table equal to the compiled policy (like a Felix dataplane manager).

Desired state in, compiled once; the kernel's table is read back on resync
and otherwise modelled by what was last applied. A structural difference
(or a missing or foreign-fingerprinted table) replaces the table in one
transaction; otherwise only allow-map elements are added and deleted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from .config import FirewallConfig
from .drivers.firewall import ObservedFirewall
from .firewall_compiler import CompiledFirewall, Element, FirewallSettings, Shape, compile_firewall
from .logs import get_logger
from .model import NodeState


class FirewallPort(Protocol):
    def observe(self) -> ObservedFirewall: ...
    def apply_full(self, compiled: CompiledFirewall) -> int: ...
    def apply_elements(
        self, add: Mapping[str, frozenset[Element]], delete: Mapping[str, frozenset[Element]]
    ) -> int: ...


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
    missing = sorted(f"{kind} {name}" + (f" ({n} rules)" if kind == "chain" else "") for kind, name, n in want - have)
    extra = sorted(f"{kind} {name}" + (f" ({n} rules)" if kind == "chain" else "") for kind, name, n in have - want)
    return f"table differs: expected {', '.join(missing[:5]) or '-'}; found {', '.join(extra[:5]) or '-'}"


class FirewallManager:
    def __init__(self, driver: FirewallPort, config: FirewallConfig, node: str) -> None:
        self.driver = driver
        self.settings = FirewallSettings(nflog_group=config.nflog_group, log_per_second=config.log_per_second)
        self.log = get_logger(node=node, component="firewall")
        self.compiled: CompiledFirewall | None = None
        self._cache: ObservedFirewall | None = None
        self._generation = 0
        self._converged_generation = -1

    def accept(self, state: NodeState) -> None:
        self.compiled = compile_firewall(state, self.settings)
        self._generation += 1

    def reconcile(self, *, full: bool) -> FirewallOutcome:
        outcome = FirewallOutcome()
        compiled = self.compiled
        if compiled is None:
            return outcome
        observed = self._cache if (self._cache is not None and not full) else self.driver.observe()
        drift = full and self._generation == self._converged_generation
        try:
            shape_drift = full and observed.present and observed.shape != compiled.shape
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
            else:
                add, delete = element_diff(compiled.elements, observed.elements)
                if add or delete:
                    outcome.action = "elements"
                    self.driver.apply_elements(add, delete)
                    outcome.added = sum(len(e) for e in add.values())
                    outcome.deleted = sum(len(e) for e in delete.values())
        except Exception as exc:  # a rejected batch changed nothing; re-read next time
            outcome.error = str(exc)
            self._cache = None
            self.log.error("firewall_apply_failed", action=outcome.action, reason=outcome.error)
            return outcome
        self._cache = ObservedFirewall(
            present=True, fingerprint=compiled.fingerprint, elements=compiled.elements, shape=compiled.shape
        )
        self._converged_generation = self._generation
        outcome.drift = drift and outcome.action != "none"
        if outcome.action != "none":
            emit = self.log.warning if outcome.drift else self.log.info
            emit("firewall_drift" if outcome.drift else "firewall_applied", action=outcome.action,
                 elements_added=outcome.added, elements_deleted=outcome.deleted,
                 fingerprint=compiled.fingerprint, reasons=outcome.reasons)
        return outcome
