"""Target vs observed kernel state -> the minimal ordered list of operations (pure).

Order respects dependencies: the encryption's objects first (the WireGuard
interface and its peers, IPsec SAs and policies, see ``core/encryption``);
stale entries, then stale links (ports before bridges); new bridges, then
their ports and in-place updates; then FDB and neighbour entries; last, what
the encryption removes only once no tunnel uses it. Entries on links that
are deleted or recreated go with the link and are not deleted one by one;
entries on recreated links are added again.
"""

from __future__ import annotations

from collections.abc import Iterable

from .encryption import ENCRYPTIONS
from .objects import FdbEntry, KernelState, Link, NeighEntry, diff_fields
from .ops import (
    AddFdb,
    CreateLink,
    DeleteLink,
    DelFdb,
    DelNeigh,
    Op,
    SetNeigh,
    UpdateLink,
)

_DELETE_ORDER = {"veth": 0, "geneve": 1, "vxlan": 1, "bridge": 2}
_CREATE_ORDER = {"bridge": 0, "vxlan": 1, "geneve": 1, "veth": 2}


def plan(target: KernelState, observed: KernelState) -> list[Op]:
    ops: list[Op] = []
    for encryption in ENCRYPTIONS:  # each plans its own part of the kernel state
        ops.extend(encryption.plan(target, observed))
    doomed = _doomed_links(target, observed)
    # Bridges that are (re)created lose their ports' master entries and neighbours.
    reset_bridges = {n for n in doomed if observed.links[n].kind == "bridge"}
    reset_bridges |= {n for n, link in target.links.items() if link.kind == "bridge" and n not in observed.links}
    reset_ports = set(doomed) | {
        n for n, link in observed.links.items() if link.master in reset_bridges and n not in doomed
    }
    gone = set(doomed) | (set(target.links) - set(observed.links))

    def survives_fdb(entry: FdbEntry) -> bool:
        return entry.ifname not in gone and not (entry.dst is None and entry.ifname in reset_ports)

    def survives_neigh(entry: NeighEntry) -> bool:
        return entry.ifname not in gone and entry.ifname not in reset_bridges

    # Only the differences are materialised and sorted: a one-peer change costs O(changes) beyond set arithmetic.
    live_fdb = observed.fdb if not gone else frozenset(e for e in observed.fdb if survives_fdb(e))
    live_neigh = observed.neigh if not gone else frozenset(e for e in observed.neigh if survives_neigh(e))
    stale_neigh = live_neigh - target.neigh
    missing_neigh = target.neigh - live_neigh
    replaced = {(e.ifname, e.ip) for e in missing_neigh}

    ops.extend(DelFdb(e, "not desired") for e in sorted(live_fdb - target.fdb, key=_fdb_key))
    ops.extend(DelNeigh(e, "not desired") for e in sorted(stale_neigh) if (e.ifname, e.ip) not in replaced)
    ops.extend(_delete_links(doomed, observed, target))
    ops.extend(_create_and_update_links(target, observed, doomed, reset_bridges))
    ops.extend(AddFdb(e, "missing") for e in sorted(target.fdb - live_fdb, key=_fdb_key))
    current_mac = {(e.ifname, e.ip): e.mac for e in stale_neigh}
    for entry in sorted(missing_neigh):
        old_mac = current_mac.get((entry.ifname, entry.ip))
        ops.append(SetNeigh(entry, "missing" if old_mac is None else f"lladdr {old_mac} -> {entry.mac}"))
    for encryption in ENCRYPTIONS:  # what the tunnels no longer use (IPsec policies: never before them)
        ops.extend(encryption.plan_after(target, observed))
    return ops


def _fdb_key(entry: FdbEntry) -> tuple[str, str, str]:
    return (entry.ifname, entry.mac, entry.dst or "")


def _doomed_links(target: KernelState, observed: KernelState) -> list[str]:
    """Observed links to delete: not desired, or desired with other creation-time attributes."""
    doomed = []
    for name, link in observed.links.items():
        wanted = target.links.get(name)
        if wanted is None or wanted.kind != link.kind or wanted.alias != link.alias:
            doomed.append(name)
    return doomed


def _delete_links(doomed: list[str], observed: KernelState, target: KernelState) -> Iterable[Op]:
    for name in sorted(doomed, key=lambda n: (_DELETE_ORDER[observed.links[n].kind], n)):
        link = observed.links[name]
        reason = "not desired" if name not in target.links else f"recreate: {diff_fields(link, target.links[name])}"
        yield DeleteLink(name, link.kind, reason)


def _create_and_update_links(
    target: KernelState, observed: KernelState, doomed: list[str], reset_bridges: set[str]
) -> Iterable[Op]:
    for name in sorted(target.links, key=lambda n: (_CREATE_ORDER[target.links[n].kind], n)):
        wanted = target.links[name]
        current = observed.links.get(name)
        if current is None or name in doomed:
            yield CreateLink(wanted, "missing" if current is None else "recreate")
            continue
        update = _update(current, wanted, master_reset=current.master in reset_bridges)
        if update is not None:
            yield update


def _port_flag(current: bool | None, wanted: bool | None, moved: bool) -> bool | None:
    """The value to set a managed bridge-port flag to, or None to leave it."""
    return wanted if wanted is not None and (current != wanted or moved) else None


def _update(current: Link, wanted: Link, master_reset: bool) -> UpdateLink | None:
    mtu = wanted.mtu if current.mtu != wanted.mtu else None
    master = wanted.master if (current.master != wanted.master or master_reset) and wanted.master else None
    mac = wanted.mac if wanted.mac is not None and current.mac != wanted.mac else None
    add = wanted.addresses - current.addresses
    remove = current.addresses - wanted.addresses
    # A port that changes bridge gets its flags set again: they are per port, and a new master resets them.
    moved = master is not None
    learning = _port_flag(current.learning, wanted.learning, moved)
    suppress = _port_flag(current.neigh_suppress, wanted.neigh_suppress, moved)
    isolated = _port_flag(current.isolated, wanted.isolated, moved)
    # Only a device that has IPv6 can have it turned off (a kernel without IPv6 reports None).
    ipv6 = wanted.ipv6 if wanted.ipv6 is not None and current.ipv6 is not None and current.ipv6 != wanted.ipv6 \
        else None
    if mtu is None and master is None and mac is None and not add and not remove and learning is None \
            and suppress is None and isolated is None and ipv6 is None:
        return None
    return UpdateLink(
        name=wanted.name,
        mtu=mtu,
        master=master,
        mac=mac,
        add_addresses=frozenset(add),
        remove_addresses=frozenset(remove),
        reason=diff_fields(current, wanted),
        learning=learning,
        neigh_suppress=suppress,
        isolated=isolated,
        ipv6=ipv6,
    )
