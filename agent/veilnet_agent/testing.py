"""A fake kernel for root-free tests of the orchestration (reconciler, daemons), like wgengine's fakes.

``FakeKernel`` implements the three ports the reconciler drives (links, WireGuard,
firewall) over an in-memory model with the kernel's side effects that matter to
the planner (entries die with their link, ports leave a deleted bridge), and
lets a test inject the failures real kernels produce: a missing endpoint
namespace, a missing underlay interface, a firewall transaction refused, a
read-back that fails. It proves the orchestration's logic only; what the kernel
really does is proven by the root tests in ``integration/``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .core.errors import DriverError
from .core.firewall_compiler import CompiledFirewall, Element
from .core.objects import (
    ABSENT,
    ApplyResult,
    FdbEntry,
    KernelState,
    Link,
    LinksObservation,
    NeighEntry,
    ObservedFirewall,
    VethSpec,
    WgInterface,
    WgObservation,
    WgPeer,
)
from .core.ops import (
    AddFdb,
    CreateLink,
    DeleteLink,
    DelFdb,
    DelNeigh,
    EnsureWgInterface,
    EntryOp,
    LinkOp,
    Op,
    SetNeigh,
    WgOp,
)

FAKE_PUBLIC_KEY = "F" * 43 + "="


@dataclass
class FakeKernel:
    """One host's kernel objects; ``links``, ``wireguard`` and ``firewall`` are the reconciler's ports."""

    links_by_name: dict[str, Link] = field(default_factory=dict)
    fdb: set[FdbEntry] = field(default_factory=set)
    neigh: dict[tuple[str, str], NeighEntry] = field(default_factory=dict)
    wg: WgInterface | None = None
    wg_peers: dict[str, WgPeer] = field(default_factory=dict)
    # what exists outside the agent's objects
    interfaces: dict[str, int] = field(default_factory=lambda: {"ul0": 1500})  # name -> MTU
    namespaces: set[str] | None = None  # None: every endpoint namespace exists
    # failures to inject
    firewall_refuses: str | None = None  # the reason every firewall transaction is rejected with
    observe_error: Exception | None = None
    applied: list[Op] = field(default_factory=list)  # every op that took effect, in order

    def __post_init__(self) -> None:
        self.links = FakeLinks(self)
        self.wireguard = FakeWireGuard(self)
        self.firewall = FakeFirewall(self)
        self.xfrm = FakeXfrm(self)

    def state(self) -> KernelState:
        return KernelState(dict(self.links_by_name), frozenset(self.fdb), frozenset(self.neigh.values()),
                           self.wg, dict(self.wg_peers))

    def _check_readable(self) -> None:
        if self.observe_error is not None:
            raise self.observe_error

    # -- the kernel's effects of each op; a failure is a string (the kernel's reason) --

    def link_op(self, op: LinkOp) -> str | None:
        links = self.links_by_name
        if isinstance(op, CreateLink):
            link = op.link
            if link.name in links:
                return f"create {link.kind} {link.name}: File exists (EEXIST)"
            if link.master is not None and link.master not in links:
                return f"create {link.kind} {link.name}: master {link.master} does not exist"
            spec = link.spec
            if isinstance(spec, VethSpec) and self.namespaces is not None and spec.netns not in self.namespaces:
                return f"create veth {link.name}: endpoint namespace {spec.netns} does not exist"
            links[link.name] = link
        elif isinstance(op, DeleteLink):
            if op.name not in links:
                return f"delete {op.kind} {op.name}: link {op.name} does not exist"
            ports = {n for n, link in links.items() if link.master == op.name}
            links.update({n: replace(links[n], master=None) for n in ports})
            del links[op.name]
            self.fdb = {e for e in self.fdb if e.ifname != op.name and not (e.dst is None and e.ifname in ports)}
            self.neigh = {k: n for k, n in self.neigh.items() if n.ifname != op.name}
        else:
            if op.name not in links:
                return f"update link {op.name}: link {op.name} does not exist"
            link = links[op.name]
            links[op.name] = replace(
                link,
                mtu=op.mtu if op.mtu is not None else link.mtu,
                master=op.master if op.master is not None else link.master,
                mac=op.mac if op.mac is not None else link.mac,
                addresses=(link.addresses | op.add_addresses) - op.remove_addresses,
                learning=op.learning if op.learning is not None else link.learning,
                neigh_suppress=op.neigh_suppress if op.neigh_suppress is not None else link.neigh_suppress,
                isolated=op.isolated if op.isolated is not None else link.isolated,
                ipv6=op.ipv6 if op.ipv6 is not None else link.ipv6,
            )
        return None

    def entry_op(self, op: EntryOp) -> str | None:
        entry = op.entry
        if entry.ifname not in self.links_by_name:
            return f"{type(op).__name__} on {entry.ifname}: No such device (ENODEV)"
        if isinstance(op, AddFdb):
            self.fdb.add(op.entry)
        elif isinstance(op, DelFdb):
            self.fdb.discard(op.entry)
        elif isinstance(op, SetNeigh):
            self.neigh[(op.entry.ifname, op.entry.ip)] = op.entry
        elif isinstance(op, DelNeigh):
            self.neigh.pop((op.entry.ifname, op.entry.ip), None)
        return None

    def wg_op(self, op: WgOp) -> str | None:
        if isinstance(op, EnsureWgInterface):
            self.wg = op.target
            return None
        if self.wg is None:
            return "wg: Unable to access interface: No such device"
        for key in op.removes:
            self.wg_peers.pop(key, None)
        self.wg_peers.update({p.public_key: p for p in op.upserts})
        return None


def _apply(kernel: FakeKernel, ops: Sequence[Any], effect: Any) -> ApplyResult[Any]:
    result: ApplyResult[Any] = ApplyResult()
    for op in ops:
        reason = effect(op)
        if reason is None:
            result.applied.append(op)
            kernel.applied.append(op)
            result.requests += 1
        else:
            result.failed.append((op, reason))
    return result


class FakeLinks:
    def __init__(self, kernel: FakeKernel) -> None:
        self.kernel = kernel

    def observe(self) -> LinksObservation:
        self.kernel._check_readable()
        k = self.kernel
        return LinksObservation(dict(k.links_by_name), frozenset(k.fdb), frozenset(k.neigh.values()))

    def apply(self, ops: Sequence[LinkOp | EntryOp]) -> ApplyResult[Any]:
        k = self.kernel
        return _apply(k, ops, lambda op: k.entry_op(op) if isinstance(op, (AddFdb, DelFdb, SetNeigh, DelNeigh))
                      else k.link_op(op))

    def geneve_supported(self) -> bool:
        return False

    def interface_mtu(self, ifname: str) -> int:
        try:
            return self.kernel.interfaces[ifname]
        except KeyError:
            raise DriverError(f"interface {ifname}: No such device (ENODEV)") from None


class FakeWireGuard:
    def __init__(self, kernel: FakeKernel) -> None:
        self.kernel = kernel
        self.public_key = FAKE_PUBLIC_KEY

    def observe(self) -> WgObservation:
        self.kernel._check_readable()
        return WgObservation(interface=self.kernel.wg, peers=dict(self.kernel.wg_peers), backend="userspace")

    def apply(self, ops: Sequence[WgOp]) -> ApplyResult[Any]:
        return _apply(self.kernel, ops, self.kernel.wg_op)

    def ensure_private_key(self) -> str:
        return self.public_key

    def rotate_private_key(self) -> str:
        self.public_key = "R" + self.public_key[1:]
        return self.public_key


class FakeFirewall:
    """The ``inet veilnet`` table: whole replacements and element changes, all or nothing, like nftables."""

    def __init__(self, kernel: FakeKernel) -> None:
        self.kernel = kernel
        self.table: ObservedFirewall = ABSENT
        self.transactions = 0

    def observe(self) -> ObservedFirewall:
        return self.table

    def _refuse(self, what: str) -> None:
        if self.kernel.firewall_refuses is not None:
            raise DriverError(f"firewall {what} rejected: {self.kernel.firewall_refuses}")

    def apply_full(self, compiled: CompiledFirewall) -> int:
        self._refuse("full load")
        self.table = ObservedFirewall(present=True, fingerprint=compiled.fingerprint,
                                      elements=dict(compiled.elements), shape=compiled.shape)
        self.transactions += 1
        return len(compiled.structure)

    def apply_elements(self, add: Mapping[str, frozenset[Element]], delete: Mapping[str, frozenset[Element]]) -> int:
        self._refuse("element update")
        if not self.table.present:
            raise DriverError("firewall element update rejected: Error: No such file or directory")
        elements = {name: set(items) for name, items in self.table.elements.items()}
        for name, items in delete.items():
            if not items <= elements.get(name, set()):
                raise DriverError("firewall element update rejected: Error: No such file or directory")
            elements[name] -= items
        for name, items in add.items():
            elements.setdefault(name, set()).update(items)
        self.table = replace(self.table, elements={n: frozenset(e) for n, e in elements.items()})
        self.transactions += 1
        return sum(map(len, add.values())) + sum(map(len, delete.values()))


class FakeXfrm:
    """The agent's SAs and policies, changed in the order ``SyncXfrm`` states; ``unsupported_reason`` as a
    kernel without ESP would say it. ``protected(src, dst)`` answers "would UDP 4789 leave protected?"."""

    def __init__(self, kernel: FakeKernel) -> None:
        self.kernel = kernel
        self.sas: dict[Any, Any] = {}
        self.policies: dict[Any, Any] = {}
        self.unsupported_reason: str | None = None
        self.refuse_adds: str | None = None

    def observe(self) -> Any:
        from .core.objects import XfrmObservation

        self.kernel._check_readable()
        return XfrmObservation(sas=dict(self.sas), policies=dict(self.policies))

    def apply(self, ops: Sequence[Any]) -> ApplyResult[Any]:
        result: ApplyResult[Any] = ApplyResult()
        for op in ops:
            if self.refuse_adds is not None and (op.add_sas or op.set_policies):
                result.failed.append((op, self.refuse_adds))
                continue
            for ident in op.delete_sas:
                if ident in {sa.ident for sa in op.add_sas}:
                    self.sas.pop(ident, None)
            self.sas.update({sa.ident: sa for sa in op.add_sas})
            self.policies.update({p.ident: p for p in op.set_policies})
            for key in op.delete_policies:
                self.policies.pop(key, None)
            for ident in op.delete_sas:
                if ident not in {sa.ident for sa in op.add_sas}:
                    self.sas.pop(ident, None)
            result.applied.append(op)
            self.kernel.applied.append(op)
            result.requests += len(op.add_sas) + len(op.set_policies) + len(op.delete_policies) + len(op.delete_sas)
        return result

    def unsupported(self) -> str | None:
        return self.unsupported_reason
