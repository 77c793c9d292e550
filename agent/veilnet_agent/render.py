"""Desired node state -> the kernel objects that realise it (pure).

Per segment: a bridge holding the distributed gateway (same IP and MAC on
every host), a VXLAN device (or one Geneve device per peer, Geneve having no
FDB), static FDB entries (head-end replication to every peer in the segment
plus one entry per remote endpoint MAC) and permanent neighbour entries for
remote endpoints, so ARP/ND is answered locally (neigh_suppress) and never
floods the overlay. Local endpoints are veth pairs into their namespaces.
Tunnels run between WireGuard transport addresses, so everything the
overlay sends is encrypted on the underlay.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from . import mtu as mtu_math
from . import naming
from .model import IPAddress, LocalEndpoint, NodeState, Peer, Segment
from .objects import (
    FdbEntry,
    GeneveSpec,
    KernelState,
    Link,
    NeighEntry,
    VethSpec,
    VxlanSpec,
    WgInterface,
    WgPeer,
)

BUM_MAC = "00:00:00:00:00:00"


@dataclass(frozen=True)
class NodeContext:
    """Host facts the desired state does not carry."""

    public_key: str
    listen_port: int
    underlay_mtu: int
    underlay_family: mtu_math.Family


def wg_endpoint(address: IPAddress, port: int) -> str:
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


def host_prefix(address: IPAddress) -> str:
    return f"{address}/{address.max_prefixlen}"


def underlay_family(state: NodeState, ctx: NodeContext) -> mtu_math.Family:
    """The largest outer header in use: IPv6 if this node or any peer speaks it."""
    if ctx.underlay_family == 6 or any(p.underlay_address.version == 6 for p in state.peers):
        return 6
    return 4


def segment_mtu(state: NodeState, ctx: NodeContext, segment: Segment) -> int:
    transport: mtu_math.Family = 4 if state.transport_address.version == 4 else 6
    return mtu_math.segment_mtu(ctx.underlay_mtu, underlay_family(state, ctx), segment.encapsulation, transport)


def render(state: NodeState, ctx: NodeContext) -> KernelState:
    links: dict[str, Link] = {}
    fdb: set[FdbEntry] = set()
    neigh: set[NeighEntry] = set()
    for segment in state.segments:
        seg_mtu = segment_mtu(state, ctx, segment)
        members = [p for p in state.peers if any(e.segment == segment.name for e in p.endpoints)]
        bridge = _bridge(segment, seg_mtu)
        links[bridge.name] = bridge
        if segment.encapsulation == "vxlan":
            _vxlan_segment(state, segment, seg_mtu, members, links, fdb)
        else:
            _geneve_segment(segment, seg_mtu, members, links, fdb)
        for peer in members:
            for remote in peer.endpoints:
                if remote.segment == segment.name:
                    neigh.update(NeighEntry(bridge.name, str(ip), remote.mac) for ip in remote.ips)
    for local in state.endpoints:
        segment = state.segment(local.segment)
        link = _endpoint_link(local, segment, segment_mtu(state, ctx, segment))
        links[link.name] = link
    return KernelState(
        links=links,
        fdb=frozenset(fdb),
        neigh=frozenset(neigh),
        wg=_wg_interface(state, ctx),
        wg_peers={p.public_key: _wg_peer(p) for p in state.peers},
    )


def _wg_interface(state: NodeState, ctx: NodeContext) -> WgInterface:
    return WgInterface(
        name=naming.WG_IFNAME,
        listen_port=ctx.listen_port,
        public_key=ctx.public_key,
        mtu=mtu_math.wireguard_mtu(ctx.underlay_mtu, underlay_family(state, ctx)),
        addresses=frozenset({str(state.transport_address)}),
    )


def _wg_peer(peer: Peer) -> WgPeer:
    return WgPeer(
        public_key=peer.public_key,
        endpoint=wg_endpoint(peer.underlay_address, peer.underlay_port),
        allowed_ips=frozenset({host_prefix(peer.transport_address)}),
        keepalive=peer.keepalive,
    )


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
        alias=naming.alias("segment", segment.name, naming.fingerprint("bridge", segment.vni)),
        mtu=seg_mtu,
        mac=segment.gateway_mac,
        addresses=frozenset(addresses),
    )


def _vxlan_segment(
    state: NodeState,
    segment: Segment,
    seg_mtu: int,
    members: list[Peer],
    links: dict[str, Link],
    fdb: set[FdbEntry],
) -> None:
    spec = VxlanSpec(vni=segment.vni, local=str(state.transport_address.ip))
    name = naming.vxlan_name(segment.vni)
    links[name] = Link(
        name=name,
        kind="vxlan",
        alias=naming.alias("vxlan", segment.name, naming.fingerprint("vxlan", spec.vni, spec.local, spec.port)),
        mtu=seg_mtu,
        master=naming.bridge_name(segment.vni),
        spec=spec,
    )
    for peer in members:
        remote = str(peer.transport_address)
        fdb.add(FdbEntry(name, BUM_MAC, remote))
        for endpoint in peer.endpoints:
            if endpoint.segment == segment.name:
                fdb.add(FdbEntry(name, endpoint.mac, remote))
                fdb.add(FdbEntry(name, endpoint.mac, None))


def _geneve_segment(
    segment: Segment,
    seg_mtu: int,
    members: list[Peer],
    links: dict[str, Link],
    fdb: set[FdbEntry],
) -> None:
    for peer in members:
        spec = GeneveSpec(vni=segment.vni, remote=str(peer.transport_address))
        name = naming.geneve_name(segment.vni, peer.name)
        links[name] = Link(
            name=name,
            kind="geneve",
            alias=naming.alias(
                "geneve", f"{segment.name}/{peer.name}", naming.fingerprint("geneve", spec.vni, spec.remote, spec.port)
            ),
            mtu=seg_mtu,
            master=naming.bridge_name(segment.vni),
            spec=spec,
        )
        for endpoint in peer.endpoints:
            if endpoint.segment == segment.name:
                fdb.add(FdbEntry(name, endpoint.mac, None))


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
        spec=spec,
    )
