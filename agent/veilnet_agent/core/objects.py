"""Kernel objects as plain values: what the planner wants and what drivers read back.

FDB and neighbour entries are NamedTuples: there are tens of thousands of
them and set arithmetic on them must hash at C speed.

The renderer turns the desired node state into a ``KernelState`` (the target);
drivers read the same shape back from the kernel (the observed state); the
planner diffs the two. Observed values carry only what can be read back:
creation-only parameters (``LinkSpec``) are encoded in the link's alias
fingerprint, so a change to them shows up as an alias mismatch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

LinkKind = Literal["bridge", "vxlan", "geneve", "veth"]


@dataclass(frozen=True)
class VxlanSpec:
    vni: int
    local: str  # our WireGuard transport address
    port: int = 4789


@dataclass(frozen=True)
class GeneveSpec:
    vni: int
    remote: str  # the peer's WireGuard transport address
    port: int = 6081


@dataclass(frozen=True)
class VethSpec:
    """A local endpoint: host end stays here, the other end goes into ``netns``."""

    netns: str
    ifname: str  # name inside the endpoint's namespace
    mac: str
    addresses: tuple[str, ...]  # "ip/prefix"
    gateways: tuple[str, ...]  # default route next hops (one per family)


LinkSpec = VxlanSpec | GeneveSpec | VethSpec | None


@dataclass(frozen=True)
class Link:
    """A link the agent owns. ``alias`` starts with naming.OWNER_MARK."""

    name: str
    kind: LinkKind
    alias: str
    mtu: int
    master: str | None = None
    mac: str | None = None  # enforced for bridges (gateway MAC); None = not managed
    addresses: frozenset[str] = frozenset()  # "ip/prefix" on this link (bridges: gateways)
    # Bridge port flags; None = not managed. Every port the agent makes has learning off: its FDB is static.
    learning: bool | None = None
    neigh_suppress: bool | None = None  # tunnel ports: ARP/ND for remote endpoints answered locally
    # Per-peer tunnel ports (Geneve): isolated from each other, the split horizon of a full mesh. Without it a
    # broadcast from one peer is flooded on to every other peer, and around the mesh forever.
    isolated: bool | None = None
    # IPv6 on the device itself. Ports are layer 2 only: with IPv6 a VXLAN device would send its own
    # neighbour discovery and MLD (from a random MAC) to every peer. None = not managed / no IPv6 here.
    ipv6: bool | None = None
    spec: LinkSpec = field(default=None, compare=False)


class FdbEntry(NamedTuple):
    """A static forwarding entry.

    ``dst`` set: a tunnel device's own entry (``bridge fdb ... self dst``), the
    remote VTEP for ``mac`` (00:00:00:00:00:00 = head-end replication of BUM).
    ``dst`` None: the bridge's entry (``master static``) pinning ``mac`` to port ``ifname``.
    """

    ifname: str
    mac: str
    dst: str | None = None


class NeighEntry(NamedTuple):
    """A permanent ARP/ND entry for a remote endpoint, on its segment's bridge."""

    ifname: str
    ip: str
    mac: str


@dataclass(frozen=True)
class WgInterface:
    name: str
    listen_port: int
    public_key: str
    mtu: int
    addresses: frozenset[str]  # "ip/prefix" transport addresses


@dataclass(frozen=True)
class WgPeer:
    public_key: str
    endpoint: str  # "192.0.2.2:51820" or "[2001:db8::2]:51820"
    allowed_ips: frozenset[str]  # "ip/prefix", normalised
    keepalive: int = 0  # seconds, 0 = off


@dataclass(frozen=True)
class KernelState:
    links: Mapping[str, Link] = field(default_factory=dict)
    fdb: frozenset[FdbEntry] = frozenset()
    neigh: frozenset[NeighEntry] = frozenset()
    wg: WgInterface | None = None
    wg_peers: Mapping[str, WgPeer] = field(default_factory=dict)  # by public key
