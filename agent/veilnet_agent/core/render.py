"""Desired node state -> the kernel objects that realise it (pure).

Per segment: a bridge holding the distributed gateway (same IP and MAC on
every host), a VXLAN device (or one Geneve device per peer, Geneve having no
FDB), static FDB entries (head-end replication to every peer in the segment
plus one entry per remote endpoint MAC) and permanent neighbour entries for
remote endpoints, so ARP/ND is answered locally (neigh_suppress) and never
floods the overlay. Local endpoints are veth pairs into their namespaces, with a
static FDB entry for their MAC on their port; no port learns (an endpoint
cannot move another's MAC onto its port).
Tunnels run where the encryption puts them, so everything the overlay sends is
encrypted on the underlay: WireGuard, between transport addresses on its
interface (it contributes the interface and one WireGuard peer per peer);
IPsec, between underlay addresses (it contributes per peer four policies and
the SAs the key manager holds for it, passed in as ``sas``). See
``core/encryption``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from . import addr, naming
from . import mtu as mtu_math
from .encryption import WIREGUARD, IpsecHost, WireGuardHost, encryption_of
from .encryption.ipsec import PeerSas, peer_objects
from .model import IPAddress, LocalEndpoint, NodeState, Peer, Segment
from .objects import (
    FdbEntry,
    GeneveSpec,
    KernelState,
    Link,
    NeighEntry,
    PolicyKey,
    SaKey,
    VethSpec,
    VxlanSpec,
    WgPeer,
    XfrmPolicy,
    XfrmSa,
)

BUM_MAC = "00:00:00:00:00:00"


@dataclass(frozen=True)
class NodeContext:
    """Host facts the desired state does not carry."""

    # the encryption's host facts (WireGuard: public key and listen port; IPsec: the underlay address)
    encryption: WireGuardHost | IpsecHost
    underlay_mtu: int
    underlay_family: mtu_math.Family


def _local_tunnel_address(state: NodeState, ctx: NodeContext) -> IPAddress:
    if state.encryption == "ipsec":
        if not isinstance(ctx.encryption, IpsecHost):
            raise ValueError("an IPsec state needs the IPsec host context")
        return ctx.encryption.underlay_address
    return state.transport_address.ip


def underlay_family(state: NodeState, ctx: NodeContext) -> mtu_math.Family:
    """The largest outer header in use: IPv6 if this node or any peer speaks it."""
    if ctx.underlay_family == 6 or any(p.underlay_address.version == 6 for p in state.peers):
        return 6
    return 4


def segment_mtus(state: NodeState, ctx: NodeContext, family: mtu_math.Family) -> dict[str, int]:
    encryption = encryption_of(state)
    # IPsec (transport mode): the tunnels' outer header is the underlay's; WireGuard: the transport's.
    tunnel: mtu_math.Family = family if state.encryption == "ipsec" else state.tunnel_family
    return {
        s.name: mtu_math.segment_mtu(ctx.underlay_mtu, family, s.encapsulation, tunnel, encryption)
        for s in state.segments
    }


@dataclass(frozen=True)
class PeerParts:
    """Everything one peer contributes to the target; disjoint from every other peer's."""

    wg_peer: WgPeer | None
    links: Mapping[str, Link]
    fdb: frozenset[FdbEntry]
    neigh: frozenset[NeighEntry]
    sas: Mapping[SaKey, XfrmSa] = field(default_factory=dict)
    policies: Mapping[PolicyKey, XfrmPolicy] = field(default_factory=dict)


@dataclass(frozen=True)
class Rendered:
    """The target plus what each peer contributed to it, so peer changes can be patched in."""

    target: KernelState
    peers: Mapping[str, PeerParts]
    family: mtu_math.Family  # the underlay family the MTUs were computed for
    ctx: NodeContext


def render(state: NodeState, ctx: NodeContext, sas: PeerSas | None = None) -> KernelState:
    return render_all(state, ctx, sas).target


def render_all(state: NodeState, ctx: NodeContext, sas: PeerSas | None = None) -> Rendered:
    """``sas``: IPsec only, each peer's SAs now (from the key manager); a peer without any has its
    policies alone, which let nothing through to or from it."""
    family = underlay_family(state, ctx)
    mtus = segment_mtus(state, ctx, family)
    local = _local_tunnel_address(state, ctx)
    links: dict[str, Link] = {}
    for segment in state.segments:
        bridge = _bridge(segment, mtus[segment.name])
        links[bridge.name] = bridge
        if segment.encapsulation == "vxlan":
            vxlan = _vxlan(local, segment, mtus[segment.name])
            links[vxlan.name] = vxlan
    fdb: set[FdbEntry] = set()
    for endpoint in state.endpoints:
        segment = state.segment(endpoint.segment)
        link = _endpoint_link(endpoint, segment, mtus[segment.name])
        links[link.name] = link
        fdb.add(FdbEntry(link.name, endpoint.mac, None))
    segments = {s.name: s for s in state.segments}
    parts = {p.name: _peer_parts(state, segments, mtus, p, local, sas) for p in state.peers}
    neigh: set[NeighEntry] = set()
    xfrm_sas: dict[SaKey, XfrmSa] = {}
    xfrm_policies: dict[PolicyKey, XfrmPolicy] = {}
    for part in parts.values():
        links.update(part.links)
        fdb.update(part.fdb)
        neigh.update(part.neigh)
        xfrm_sas.update(part.sas)
        xfrm_policies.update(part.policies)
    wireguard = state.encryption == "wireguard"
    if wireguard and not isinstance(ctx.encryption, WireGuardHost):
        raise ValueError("a WireGuard state needs the WireGuard host context")
    target = KernelState(
        links=links,
        fdb=frozenset(fdb),
        neigh=frozenset(neigh),
        wg=WIREGUARD.interface(state, ctx.encryption, ctx.underlay_mtu, family)
        if isinstance(ctx.encryption, WireGuardHost) and wireguard else None,
        wg_peers={part.wg_peer.public_key: part.wg_peer for part in parts.values() if part.wg_peer is not None},
        xfrm_sas=xfrm_sas,
        xfrm_policies=xfrm_policies,
    )
    return Rendered(target, parts, family, ctx)


def render_peer_changes(previous: Rendered, state: NodeState, ctx: NodeContext, changed: Iterable[str],
                        sas: PeerSas | None = None) -> Rendered:
    """``previous`` with the named peers' parts replaced by those of ``state`` (absent there = removed).

    Valid when only peers (or their SAs, ``sas`` for at least the named peers) changed between the two
    states. If the host context or the underlay family (and so every MTU) changed, everything is rendered
    again (then ``sas`` must name every peer's).
    """
    if ctx != previous.ctx or underlay_family(state, ctx) != previous.family:
        return render_all(state, ctx, sas)
    names = set(changed)
    segments = {s.name: s for s in state.segments}
    mtus = segment_mtus(state, ctx, previous.family)
    local = _local_tunnel_address(state, ctx)
    new_parts = {p.name: _peer_parts(state, segments, mtus, p, local, sas) for p in state.peers if p.name in names}
    old_parts = [previous.peers[n] for n in names if n in previous.peers]
    old = previous.target
    links = dict(old.links)
    wg_peers = dict(old.wg_peers)
    xfrm_sas = dict(old.xfrm_sas)
    xfrm_policies = dict(old.xfrm_policies)
    old_fdb: set[FdbEntry] = set()
    old_neigh: set[NeighEntry] = set()
    for part in old_parts:
        for name in part.links:
            del links[name]
        if part.wg_peer is not None:
            del wg_peers[part.wg_peer.public_key]
        for key in part.sas:
            del xfrm_sas[key]
        for pkey in part.policies:
            del xfrm_policies[pkey]
        old_fdb.update(part.fdb)
        old_neigh.update(part.neigh)
    new_fdb: set[FdbEntry] = set()
    new_neigh: set[NeighEntry] = set()
    for part in new_parts.values():
        links.update(part.links)
        if part.wg_peer is not None:
            wg_peers[part.wg_peer.public_key] = part.wg_peer
        xfrm_sas.update(part.sas)
        xfrm_policies.update(part.policies)
        new_fdb.update(part.fdb)
        new_neigh.update(part.neigh)
    peers = {n: p for n, p in previous.peers.items() if n not in names}
    peers.update(new_parts)
    target = KernelState(
        links=links,
        fdb=(old.fdb - old_fdb) | new_fdb,
        neigh=(old.neigh - old_neigh) | new_neigh,
        wg=old.wg,
        wg_peers=wg_peers,
        xfrm_sas=xfrm_sas,
        xfrm_policies=xfrm_policies,
    )
    return Rendered(target, peers, previous.family, ctx)


def _peer_parts(state: NodeState, segments: Mapping[str, Segment], mtus: Mapping[str, int], peer: Peer,
                local: IPAddress, sas: PeerSas | None) -> PeerParts:
    links: dict[str, Link] = {}
    fdb: set[FdbEntry] = set()
    neigh: set[NeighEntry] = set()
    tunnel_peer = state.tunnel_address(peer)
    remote = addr.text(tunnel_peer)
    for segment_name in dict.fromkeys(e.segment for e in peer.endpoints):
        segment = segments[segment_name]
        bridge = naming.bridge_name(segment.vni)
        if segment.encapsulation == "vxlan":
            port = naming.vxlan_name(segment.vni)
            fdb.add(FdbEntry(port, BUM_MAC, remote))
        else:
            geneve = _geneve(segment, mtus[segment_name], peer.name, remote)
            links[geneve.name] = geneve
            port = geneve.name
        for endpoint in peer.endpoints:
            if endpoint.segment != segment_name:
                continue
            if segment.encapsulation == "vxlan":
                fdb.add(FdbEntry(port, endpoint.mac, remote))
            fdb.add(FdbEntry(port, endpoint.mac, None))
            neigh.update(NeighEntry(bridge, addr.text(ip), endpoint.mac) for ip in endpoint.ips)
    if state.encryption == "ipsec":
        peer_sas, policies = peer_objects(local, peer, (sas or {}).get(peer.name, ()))
        return PeerParts(None, links, frozenset(fdb), frozenset(neigh), peer_sas, policies)
    return PeerParts(WIREGUARD.peer(peer), links, frozenset(fdb), frozenset(neigh))


def _bridge(segment: Segment, seg_mtu: int) -> Link:
    addresses = set()
    if segment.ipv4_subnet is not None and segment.ipv4_gateway is not None:
        addresses.add(str(ipaddress.ip_interface(f"{segment.ipv4_gateway}/{segment.ipv4_subnet.prefixlen}")))
    if segment.ipv6_subnet is not None and segment.ipv6_gateway is not None:
        addresses.add(str(ipaddress.ip_interface(f"{segment.ipv6_gateway}/{segment.ipv6_subnet.prefixlen}")))
    name = naming.bridge_name(segment.vni)
    return Link(
        name=name,
        kind="bridge",
        # "filtered": created with nf_call_ip(6)tables and routing between segments (see drivers/links.py).
        alias=naming.alias("segment", segment.name, naming.fingerprint("bridge", segment.vni, "filtered")),
        mtu=seg_mtu,
        mac=segment.gateway_mac,
        addresses=frozenset(addresses),
    )


def _vxlan(local: IPAddress, segment: Segment, seg_mtu: int) -> Link:
    spec = VxlanSpec(vni=segment.vni, local=str(local))
    return Link(
        name=naming.vxlan_name(segment.vni),
        kind="vxlan",
        alias=naming.alias("vxlan", segment.name, naming.fingerprint("vxlan", spec.vni, spec.local, spec.port)),
        mtu=seg_mtu,
        master=naming.bridge_name(segment.vni),
        learning=False,
        neigh_suppress=True,
        ipv6=False,
        spec=spec,
    )


def _geneve(segment: Segment, seg_mtu: int, peer: str, remote: str) -> Link:
    """One Geneve device per (segment, peer): Geneve has no FDB to pick a remote per MAC."""
    spec = GeneveSpec(vni=segment.vni, remote=remote)
    return Link(
        name=naming.geneve_name(segment.vni, peer),
        kind="geneve",
        alias=naming.alias(
            "geneve", f"{segment.name}/{peer}", naming.fingerprint("geneve", spec.vni, spec.remote, spec.port)
        ),
        mtu=seg_mtu,
        master=naming.bridge_name(segment.vni),
        learning=False,
        neigh_suppress=True,
        isolated=True,  # split horizon: what comes from one peer is never flooded on to another
        ipv6=False,
        spec=spec,
    )


def _endpoint_link(endpoint: LocalEndpoint, segment: Segment, seg_mtu: int) -> Link:
    addresses: list[str] = []
    gateways: list[str] = []
    if endpoint.ipv4 is not None and segment.ipv4_subnet is not None:
        addresses.append(f"{endpoint.ipv4}/{segment.ipv4_subnet.prefixlen}")
        if segment.ipv4_gateway is not None:
            gateways.append(str(segment.ipv4_gateway))
    if endpoint.ipv6 is not None and segment.ipv6_subnet is not None:
        addresses.append(f"{endpoint.ipv6}/{segment.ipv6_subnet.prefixlen}")
        if segment.ipv6_gateway is not None:
            gateways.append(str(segment.ipv6_gateway))
    spec = VethSpec(
        netns=endpoint.netns,
        ifname=endpoint.ifname,
        mac=endpoint.mac,
        addresses=tuple(addresses),
        gateways=tuple(gateways),
    )
    return Link(
        name=naming.endpoint_host_name(endpoint.name),
        kind="veth",
        alias=naming.alias(
            "endpoint",
            endpoint.name,
            naming.fingerprint(spec.netns, spec.ifname, spec.mac, spec.addresses, spec.gateways, seg_mtu),
        ),
        mtu=seg_mtu,
        master=naming.bridge_name(segment.vni),
        learning=False,
        ipv6=False,  # the host's end: the endpoint's IPv6 lives in its namespace
        spec=spec,
    )
