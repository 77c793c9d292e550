"""Operations the planner emits and the drivers apply, in the order given.

Each op names one kernel change. ``cost`` is the number of kernel requests it
takes (netlink messages, or peers in a WireGuard batch), used by benchmarks
and logs to show that a small change does small work.
"""

from __future__ import annotations

from dataclasses import dataclass

from .objects import FdbEntry, Link, NeighEntry, PolicyKey, SaKey, WgInterface, WgPeer, XfrmPolicy, XfrmSa


@dataclass(frozen=True)
class EnsureWgInterface:
    """Create the WireGuard interface, or bring its settings to ``target``."""

    target: WgInterface
    create: bool
    reason: str


@dataclass(frozen=True)
class SyncWgPeers:
    """Add or replace ``upserts`` and remove ``removes`` (public keys) in one batch."""

    upserts: tuple[WgPeer, ...]
    removes: tuple[str, ...]
    reason: str


@dataclass(frozen=True)
class CreateLink:
    link: Link
    reason: str


@dataclass(frozen=True)
class DeleteLink:
    name: str
    kind: str
    reason: str


@dataclass(frozen=True)
class UpdateLink:
    """Change mutable attributes in place; None means unchanged."""

    name: str
    mtu: int | None
    master: str | None
    mac: str | None
    add_addresses: frozenset[str]
    remove_addresses: frozenset[str]
    reason: str
    learning: bool | None = None  # bridge port flags
    neigh_suppress: bool | None = None
    isolated: bool | None = None
    ipv6: bool | None = None  # IPv6 on the device (net.ipv6.conf.<name>.disable_ipv6)


@dataclass(frozen=True)
class AddFdb:
    entry: FdbEntry
    reason: str


@dataclass(frozen=True)
class DelFdb:
    entry: FdbEntry
    reason: str


@dataclass(frozen=True)
class SetNeigh:
    """Add or replace a permanent neighbour entry."""

    entry: NeighEntry
    reason: str


@dataclass(frozen=True)
class DelNeigh:
    entry: NeighEntry
    reason: str


@dataclass(frozen=True)
class SyncXfrm:
    """One batch of XFRM changes, applied in this order: SAs added, policies set, policies deleted,
    SAs deleted (a policy never points at nothing, and nothing is ever sent in the clear)."""

    add_sas: tuple[XfrmSa, ...] = ()
    set_policies: tuple[XfrmPolicy, ...] = ()
    delete_policies: tuple[PolicyKey, ...] = ()
    delete_sas: tuple[SaKey, ...] = ()
    reason: str = ""

    def __bool__(self) -> bool:
        return bool(self.add_sas or self.set_policies or self.delete_policies or self.delete_sas)


WgOp = EnsureWgInterface | SyncWgPeers
XfrmOp = SyncXfrm
LinkOp = CreateLink | DeleteLink | UpdateLink
EntryOp = AddFdb | DelFdb | SetNeigh | DelNeigh
Op = WgOp | XfrmOp | LinkOp | EntryOp


def cost(op: Op) -> int:
    """Kernel requests an op takes."""
    if isinstance(op, SyncWgPeers):
        return len(op.upserts) + len(op.removes)
    if isinstance(op, SyncXfrm):  # one netlink message each, sent in one batch
        return len(op.add_sas) + len(op.set_policies) + len(op.delete_policies) + len(op.delete_sas)
    if isinstance(op, UpdateLink):
        return (
            int(op.mtu is not None)
            + int(op.master is not None)
            + int(op.mac is not None)
            + len(op.add_addresses)
            + len(op.remove_addresses)
            + int(op.learning is not None or op.neigh_suppress is not None or op.isolated is not None)  # one brport
            + int(op.ipv6 is not None)
        )
    return 1
