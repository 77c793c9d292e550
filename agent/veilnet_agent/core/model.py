"""The desired state of one node: typed, immutable, validated whole.

``parse_node_state`` either returns a complete ``NodeState`` or raises one
``ValidationError`` naming the field path and value; nothing partial escapes.
The same structure comes from a local state file today and from the
controller later.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from . import naming
from . import validate as v
from .errors import ValidationError
from .policy import (
    MAX_LABELS,
    Labels,
    Policy,
    RateLimit,
    SegmentMode,
    parse_labels,
    parse_mode,
    parse_policies,
    parse_rate_limit,
)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
Encapsulation = Literal["vxlan", "geneve"]
EncryptionMode = Literal["wireguard", "ipsec"]

VNI_MAX = 16_777_215
REPLAY_WINDOW_MAX = 4096  # packets: the kernel refuses an ESN replay bitmap over 128 32-bit words


@dataclass(frozen=True)
class IpsecSettings:
    replay_window: int = 4096  # packets; 0 would turn anti-replay off, so at least 32
    rotation_seconds: int = 3600  # a new epoch after this long (also by volume, and on demand)


@dataclass(frozen=True)
class Segment:
    name: str
    vni: int
    encapsulation: Encapsulation
    ipv4_subnet: ipaddress.IPv4Network | None
    ipv4_gateway: ipaddress.IPv4Address | None
    ipv6_subnet: ipaddress.IPv6Network | None
    ipv6_gateway: ipaddress.IPv6Address | None
    gateway_mac: str
    mode: SegmentMode = "isolated"
    rate_limit: RateLimit | None = None

    def subnet_for(self, address: IPAddress) -> IPNetwork | None:
        return self.ipv4_subnet if address.version == 4 else self.ipv6_subnet


@dataclass(frozen=True)
class LocalEndpoint:
    name: str
    segment: str
    mac: str
    ipv4: ipaddress.IPv4Address | None
    ipv6: ipaddress.IPv6Address | None
    netns: str
    ifname: str
    labels: Labels = ()

    @property
    def ips(self) -> tuple[IPAddress, ...]:
        return tuple(ip for ip in (self.ipv4, self.ipv6) if ip is not None)


@dataclass(frozen=True)
class RemoteEndpoint:
    segment: str
    mac: str
    ips: tuple[IPAddress, ...]
    labels: Labels = ()


@dataclass(frozen=True)
class Peer:
    name: str
    underlay_address: IPAddress
    underlay_port: int
    public_key: str
    transport_address: IPAddress
    keepalive: int
    endpoints: tuple[RemoteEndpoint, ...]
    # The segments this node shares with the peer: it may send frames only for these VNIs.
    # Every endpoint's segment is among them; without the field, the endpoints' segments.
    segments: tuple[str, ...] = ()


@dataclass(frozen=True)
class NodeState:
    node: str
    transport_address: IPInterface
    segments: tuple[Segment, ...]
    endpoints: tuple[LocalEndpoint, ...]
    peers: tuple[Peer, ...]
    policies: tuple[Policy, ...] = ()
    # Labels every local endpoint carries besides its own (the controller sends the node's as node.<key>).
    node_labels: Labels = ()
    # Uniqueness claims of every name, key, address and MAC, so that a peer delta is
    # validated against the rest without re-validating everything (see update_peers).
    claims: Claims = field(default_factory=lambda: Claims(), compare=False, repr=False)
    # How the transport between hosts is encrypted: WireGuard between transport addresses, or ESP in
    # transport mode on the encapsulation between underlay addresses (see core/encryption).
    encryption: EncryptionMode = "wireguard"
    ipsec: IpsecSettings = IpsecSettings()

    def tunnel_address(self, peer: Peer) -> IPAddress:
        """The address this node's tunnels reach ``peer`` at (and its encapsulated packets come from)."""
        return peer.underlay_address if self.encryption == "ipsec" else peer.transport_address

    @property
    def tunnel_family(self) -> Literal[4, 6]:
        """The IP version of the tunnels' outer headers."""
        if self.encryption == "ipsec":
            return 6 if self.peers and self.peers[0].underlay_address.version == 6 else 4
        return 4 if self.transport_address.version == 4 else 6

    def segment(self, name: str) -> Segment:
        for segment in self.segments:
            if segment.name == name:
                return segment
        raise KeyError(name)


def empty_state(node: str, transport_address: IPInterface) -> NodeState:
    return NodeState(node, transport_address, (), (), ())


class Claims:
    """Who holds each unique value (names, keys, addresses, MACs per segment).

    Claims made while parsing a peer are recorded under the peer's name so a
    later delta can release them. Owned by one NodeState; copied, never shared,
    when a delta derives a new state.
    """

    def __init__(self) -> None:
        self.holder: dict[tuple[object, ...], str] = {}
        self.by_peer: dict[str, list[tuple[object, ...]]] = {}
        self.peer: str | None = None  # the peer whose claims are being recorded

    def copy(self) -> Claims:
        other = Claims()
        other.holder = dict(self.holder)
        other.by_peer = dict(self.by_peer)
        return other

    def claim(self, key: tuple[object, ...], path: str, value: object, message: str) -> None:
        """Record ``key`` as held by ``path``; ``message`` may use {holder}."""
        if key in self.holder:
            shown = value if isinstance(value, (str, int)) else str(value)  # addresses: text only on error
            raise ValidationError(path, shown, message.format(holder=self.holder[key]))
        self.holder[key] = path
        if self.peer is not None:
            # Lists may be shared with the state this one was copied from: never mutate them.
            self.by_peer[self.peer] = [*self.by_peer.get(self.peer, ()), key]

    def release_peer(self, name: str) -> None:
        for key in self.by_peer.pop(name, []):
            del self.holder[key]


_STATE_KEYS = {"node", "transport_address", "segments", "endpoints", "peers", "policies", "node_labels",
               "encryption", "ipsec"}
_IPSEC_KEYS = {"replay_window", "rotation_seconds"}
_SEGMENT_KEYS = {
    "name", "vni", "encapsulation", "ipv4_subnet", "ipv4_gateway",
    "ipv6_subnet", "ipv6_gateway", "gateway_mac", "mode", "rate_limit",
}
_ENDPOINT_KEYS = {"name", "segment", "mac", "ipv4", "ipv6", "netns", "ifname", "labels"}
_PEER_KEYS = {
    "name", "underlay_address", "underlay_port", "public_key",
    "transport_address", "keepalive", "endpoints", "segments",
}
_REMOTE_ENDPOINT_KEYS = {"segment", "mac", "ips", "labels"}


def _host_in(address: IPAddress, subnet: IPNetwork, path: str) -> None:
    if address not in subnet:
        raise ValidationError(path, str(address), f"is outside the subnet {subnet}")
    if subnet.num_addresses > 2 and address in (subnet.network_address, subnet.broadcast_address):
        raise ValidationError(path, str(address), f"is the network or broadcast address of {subnet}")


def _parse_segment(raw: object, path: str) -> Segment:
    data = v.mapping(raw, path)
    v.no_unknown_keys(data, _SEGMENT_KEYS, path)
    name = v.name(v.required(data, "name", path), v.join(path, "name"))
    vni = v.integer(v.required(data, "vni", path), v.join(path, "vni"), 1, VNI_MAX)
    encap = v.choice(data.get("encapsulation", "vxlan"), v.join(path, "encapsulation"), ("vxlan", "geneve"))

    def family_pair(version: int) -> tuple[IPNetwork | None, IPAddress | None]:
        subnet_key, gateway_key = f"ipv{version}_subnet", f"ipv{version}_gateway"
        if data.get(subnet_key) is None:
            if data.get(gateway_key) is not None:
                raise ValidationError(v.join(path, gateway_key), data[gateway_key], f"given without {subnet_key}")
            return None, None
        subnet = v.ip_network(data[subnet_key], v.join(path, subnet_key))
        if subnet.version != version:
            raise ValidationError(v.join(path, subnet_key), data[subnet_key], f"must be an IPv{version} network")
        gateway = v.ip_address(v.required(data, gateway_key, path), v.join(path, gateway_key))
        _host_in(gateway, subnet, v.join(path, gateway_key))
        return subnet, gateway

    v4_subnet, v4_gateway = family_pair(4)
    v6_subnet, v6_gateway = family_pair(6)
    if v4_subnet is None and v6_subnet is None:
        raise ValidationError(v.join(path, "ipv4_subnet"), None, "a segment needs an IPv4 or IPv6 subnet")
    mac_raw = data.get("gateway_mac")
    gateway_mac = naming.gateway_mac(vni) if mac_raw is None else v.unicast_mac(mac_raw, v.join(path, "gateway_mac"))
    assert v4_subnet is None or isinstance(v4_subnet, ipaddress.IPv4Network)
    assert v4_gateway is None or isinstance(v4_gateway, ipaddress.IPv4Address)
    assert v6_subnet is None or isinstance(v6_subnet, ipaddress.IPv6Network)
    assert v6_gateway is None or isinstance(v6_gateway, ipaddress.IPv6Address)
    return Segment(
        name=name,
        vni=vni,
        encapsulation="vxlan" if encap == "vxlan" else "geneve",
        ipv4_subnet=v4_subnet,
        ipv4_gateway=v4_gateway,
        ipv6_subnet=v6_subnet,
        ipv6_gateway=v6_gateway,
        gateway_mac=gateway_mac,
        mode=parse_mode(data.get("mode"), v.join(path, "mode")),
        rate_limit=parse_rate_limit(data.get("rate_limit"), v.join(path, "rate_limit")),
    )


class _SegmentIndex:
    """Per-segment uniqueness of MACs and IPs across local and remote endpoints."""

    def __init__(self, segments: tuple[Segment, ...], claims: Claims) -> None:
        self.by_name = {s.name: s for s in segments}
        self.claims = claims

    def reserve_gateways(self) -> None:
        for s in self.by_name.values():
            holder = f"the gateway of segment {s.name}"
            self.claims.holder[("mac", s.name, s.gateway_mac)] = holder
            for gw in (s.ipv4_gateway, s.ipv6_gateway):
                if gw is not None:
                    self.claims.holder[("ip", s.name, gw)] = holder

    def segment(self, raw: object, path: str) -> Segment:
        name = v.name(raw, path)
        if name not in self.by_name:
            raise ValidationError(path, raw, "names no segment of this node")
        return self.by_name[name]

    def claim_mac(self, segment: Segment, mac: str, path: str) -> None:
        self.claims.claim(("mac", segment.name, mac), path, mac, "is already used by {holder}")

    def claim_ip(self, segment: Segment, ip: IPAddress, path: str) -> None:
        subnet = segment.subnet_for(ip)
        if subnet is None:
            raise ValidationError(path, str(ip), f"segment {segment.name} has no IPv{ip.version} subnet")
        _host_in(ip, subnet, path)
        self.claims.claim(("ip", segment.name, ip), path, ip, "is already used by {holder}")


def _parse_endpoint(raw: object, path: str, index: _SegmentIndex) -> LocalEndpoint:
    data = v.mapping(raw, path)
    v.no_unknown_keys(data, _ENDPOINT_KEYS, path)
    name = v.name(v.required(data, "name", path), v.join(path, "name"))
    segment = index.segment(v.required(data, "segment", path), v.join(path, "segment"))
    mac = v.unicast_mac(v.required(data, "mac", path), v.join(path, "mac"))
    index.claim_mac(segment, mac, v.join(path, "mac"))
    ips: dict[int, IPAddress] = {}
    for version in (4, 6):
        key = f"ipv{version}"
        if data.get(key) is None:
            continue
        ip = v.ip_address(data[key], v.join(path, key))
        if ip.version != version:
            raise ValidationError(v.join(path, key), data[key], f"must be an IPv{version} address")
        index.claim_ip(segment, ip, v.join(path, key))
        ips[version] = ip
    if not ips:
        raise ValidationError(v.join(path, "ipv4"), None, "an endpoint needs an IPv4 or IPv6 address")
    ipv4, ipv6 = ips.get(4), ips.get(6)
    assert ipv4 is None or isinstance(ipv4, ipaddress.IPv4Address)
    assert ipv6 is None or isinstance(ipv6, ipaddress.IPv6Address)
    return LocalEndpoint(
        name=name,
        segment=segment.name,
        mac=mac,
        ipv4=ipv4,
        ipv6=ipv6,
        netns=v.netns_name(v.required(data, "netns", path), v.join(path, "netns")),
        ifname=v.ifname(data.get("ifname", "eth0"), v.join(path, "ifname")),
        labels=parse_labels(data.get("labels"), v.join(path, "labels")),
    )


# The two parsers below run once per peer (thousands of times per state): field
# paths are plain f-strings rather than v.join calls.
def _parse_remote_endpoint(raw: object, path: str, index: _SegmentIndex) -> RemoteEndpoint:
    data = v.mapping(raw, path)
    v.no_unknown_keys(data, _REMOTE_ENDPOINT_KEYS, path)
    segment = index.segment(v.required(data, "segment", path), f"{path}.segment")
    mac_path = f"{path}.mac"
    mac = v.unicast_mac(v.required(data, "mac", path), mac_path)
    index.claim_mac(segment, mac, mac_path)
    ips_raw = v.sequence(v.required(data, "ips", path), f"{path}.ips")
    if not ips_raw:
        raise ValidationError(f"{path}.ips", [], "needs at least one address")
    ips: list[IPAddress] = []
    for i, item in enumerate(ips_raw):
        ip_path = f"{path}.ips[{i}]"
        ip = v.ip_address(item, ip_path)
        index.claim_ip(segment, ip, ip_path)
        ips.append(ip)
    labels = parse_labels(data.get("labels"), f"{path}.labels")
    return RemoteEndpoint(segment=segment.name, mac=mac, ips=tuple(ips), labels=labels)


def _parse_peer(raw: object, path: str, index: _SegmentIndex, transport: IPInterface) -> Peer:
    data = v.mapping(raw, path)
    v.no_unknown_keys(data, _PEER_KEYS, path)
    name_path = f"{path}.name"
    name = v.name(v.required(data, "name", path), name_path)
    transport_path = f"{path}.transport_address"
    transport_address = v.ip_address(v.required(data, "transport_address", path), transport_path)
    if transport_address not in transport.network or transport_address == transport.ip:
        raise ValidationError(
            transport_path, str(transport_address),
            f"must be another address in this node's transport network {transport.network}",
        )
    claims = index.claims
    claims.peer = name
    try:
        claims.claim(("node", name), name_path, name, "duplicate node name, also at {holder}")
        key_path = f"{path}.public_key"
        public_key = v.wg_public_key(v.required(data, "public_key", path), key_path)
        claims.claim(("key", public_key), key_path, public_key, "duplicate public key, also at {holder}")
        claims.claim(("transport", transport_address), transport_path, transport_address,
                     "duplicate transport address, also at {holder}")
        underlay_path = f"{path}.underlay_address"
        underlay_address = v.ip_address(v.required(data, "underlay_address", path), underlay_path)
        underlay_port = v.integer(data.get("underlay_port", 51820), f"{path}.underlay_port", 1, 65535)
        claims.claim(("underlay", underlay_address, underlay_port), underlay_path,
                     underlay_address, "duplicate underlay address and port, also at {holder}")
        endpoints_raw = v.sequence(data.get("endpoints", []), f"{path}.endpoints")
        endpoints = tuple(
            _parse_remote_endpoint(item, f"{path}.endpoints[{i}]", index) for i, item in enumerate(endpoints_raw)
        )
        segments = _peer_segments(data.get("segments"), endpoints, path, index)
    finally:
        claims.peer = None
    return Peer(
        name=name,
        underlay_address=underlay_address,
        underlay_port=underlay_port,
        public_key=public_key,
        transport_address=transport_address,
        keepalive=v.integer(data.get("keepalive", 0), f"{path}.keepalive", 0, 65535),
        endpoints=endpoints,
        segments=segments,
    )


def _peer_segments(raw: object, endpoints: tuple[RemoteEndpoint, ...], peer_path: str,
                   index: _SegmentIndex) -> tuple[str, ...]:
    """The segments shared with a peer: given, or those of its endpoints; every endpoint's among them."""
    if raw is None:
        return tuple(dict.fromkeys(e.segment for e in endpoints))
    path = f"{peer_path}.segments"
    names = [index.segment(item, f"{path}[{i}]").name for i, item in enumerate(v.sequence(raw, path))]
    _unique([(n, f"{path}[{i}]") for i, n in enumerate(names)], "segment")
    for i, endpoint in enumerate(endpoints):
        if endpoint.segment not in names:
            raise ValidationError(f"{peer_path}.endpoints[{i}].segment", endpoint.segment,
                                  "is not among the segments shared with this peer")
    return tuple(names)


def _unique(items: Sequence[tuple[object, str]], what: str) -> None:
    seen: dict[object, str] = {}
    for key, path in items:
        if key in seen:
            raise ValidationError(path, key if isinstance(key, (int, str)) else str(key),
                                  f"duplicate {what}, also at {seen[key]}")
        seen[key] = path


def parse_node_state(raw: object) -> NodeState:
    data = v.mapping(raw, "")
    v.no_unknown_keys(data, _STATE_KEYS, "")
    node = v.name(v.required(data, "node", ""), "node")
    transport = v.ip_interface(v.required(data, "transport_address", ""), "transport_address")

    segments_raw = v.sequence(data.get("segments", []), "segments")
    segments = tuple(_parse_segment(item, f"segments[{i}]") for i, item in enumerate(segments_raw))
    _unique([(s.name, f"segments[{i}].name") for i, s in enumerate(segments)], "segment name")
    _unique([(s.vni, f"segments[{i}].vni") for i, s in enumerate(segments)], "VNI")
    _check_subnets_disjoint(segments, transport)

    claims = Claims()
    claims.holder[("node", node)] = "node"
    index = _SegmentIndex(segments, claims)
    index.reserve_gateways()
    endpoints_raw = v.sequence(data.get("endpoints", []), "endpoints")
    endpoints = tuple(
        _parse_endpoint(item, f"endpoints[{i}]", index) for i, item in enumerate(endpoints_raw)
    )
    _unique([(e.name, f"endpoints[{i}].name") for i, e in enumerate(endpoints)], "endpoint name")
    _unique([(e.netns + "/" + e.ifname, f"endpoints[{i}].netns") for i, e in enumerate(endpoints)],
            "namespace and interface name")

    peers_raw = v.sequence(data.get("peers", []), "peers")
    peers = tuple(
        _parse_peer(item, f"peers[{i}]", index, transport) for i, item in enumerate(peers_raw)
    )
    node_labels = parse_labels(data.get("node_labels"), "node_labels")
    if node_labels:
        endpoints = tuple(_with_node_labels(e, node_labels, f"endpoints[{i}]") for i, e in enumerate(endpoints))
    policies = parse_policies(data.get("policies"), {s.name for s in segments})
    mode, ipsec = _parse_encryption(data)
    if mode == "ipsec":
        _one_underlay_family(peers)
    return NodeState(node=node, transport_address=transport, segments=segments, endpoints=endpoints, peers=peers,
                     policies=policies, node_labels=node_labels, claims=claims, encryption=mode, ipsec=ipsec)


def _parse_encryption(data: Mapping[str, object]) -> tuple[EncryptionMode, IpsecSettings]:
    mode = v.choice(data.get("encryption", "wireguard"), "encryption", ("wireguard", "ipsec"))
    raw = data.get("ipsec")
    if raw is None:
        return ("ipsec" if mode == "ipsec" else "wireguard"), IpsecSettings()
    if mode != "ipsec":
        raise ValidationError("ipsec", "(settings)", "given, but encryption is not ipsec")
    settings = v.mapping(raw, "ipsec")
    v.no_unknown_keys(settings, _IPSEC_KEYS, "ipsec")
    return "ipsec", IpsecSettings(
        replay_window=v.integer(settings.get("replay_window", 4096), "ipsec.replay_window", 32, REPLAY_WINDOW_MAX),
        rotation_seconds=v.integer(settings.get("rotation_seconds", 3600), "ipsec.rotation_seconds", 60, 86400),
    )


def _one_underlay_family(peers: Sequence[Peer], start: int = 0) -> None:
    """IPsec tunnels run between underlay addresses, over one family: the first peer's."""
    if not peers:
        return
    family = peers[0].underlay_address.version
    for i, peer in enumerate(peers):
        if peer.underlay_address.version != family:
            raise ValidationError(f"peers[{start + i}].underlay_address", str(peer.underlay_address),
                                  f"is IPv{peer.underlay_address.version}; with encryption ipsec every peer's "
                                  f"underlay must be IPv{family}, like peers[0]'s")


def _with_node_labels(endpoint: LocalEndpoint, node_labels: Labels, path: str) -> LocalEndpoint:
    """The endpoint with the node's labels added; an own label may not contradict one of them."""
    own = dict(endpoint.labels)
    for key, value in node_labels:
        if own.get(key, value) != value:
            raise ValidationError(f"{path}.labels.{key}", own[key], f"contradicts the node's label {key}={value}")
    if len(set(own) | {k for k, _ in node_labels}) > MAX_LABELS:
        raise ValidationError(f"{path}.labels", len(own), f"with the node's labels more than {MAX_LABELS} labels")
    return replace(endpoint, labels=tuple(sorted({**own, **dict(node_labels)}.items())))


def update_peers(state: NodeState, upserts: Sequence[tuple[str, object]], removes: Sequence[str],
                 order: Sequence[str] | None = None) -> NodeState:
    """A new state with peers added or replaced and others removed, validated against the rest.

    ``upserts`` are (field path, raw peer mapping); ``removes`` are peer names. The peers come out in
    ``order`` (every resulting peer's name once: the order of the file, so that the state equals a full
    parse of it), or else replaced ones where they were and new ones last.
    Costs O(changed peers) validation plus O(N) pointer copies; ``state`` is unchanged
    and nothing is returned unless every change is valid.
    """
    claims = state.claims.copy()
    current = {p.name: p for p in state.peers}
    for name in removes:
        if name not in current:
            raise ValidationError("peers", name, "names no peer of this node")
        claims.release_peer(name)
    for path, raw in upserts:
        upsert_name = v.mapping(raw, path).get("name")
        if isinstance(upsert_name, str) and upsert_name in current and upsert_name not in removes:
            claims.release_peer(upsert_name)
    index = _SegmentIndex(state.segments, claims)
    parsed = [_parse_peer(raw, path, index, state.transport_address) for path, raw in upserts]
    removed = set(removes)
    new_by_name = {p.name: p for p in parsed}
    kept = {p.name: p for p in state.peers if p.name not in removed}
    if order is not None:
        everything = {**kept, **new_by_name}
        if len(order) != len(everything) or any(name not in everything for name in order):
            raise ValueError("update_peers: order must name every resulting peer once")
        peers = tuple(everything[name] for name in order)
    else:
        peers = tuple(new_by_name.pop(name, peer) for name, peer in kept.items()) + tuple(new_by_name.values())
    if state.encryption == "ipsec":
        _one_underlay_family(peers)
    return replace(state, peers=peers, claims=claims)


def parse_segment(raw: object, path: str) -> Segment:
    """One segment, validated alone (the controller validates its network spec with this)."""
    return _parse_segment(raw, path)


def _check_subnets_disjoint(segments: tuple[Segment, ...], transport: IPInterface) -> None:
    claimed: list[tuple[IPNetwork, str]] = [(transport.network, "transport_address")]
    for i, segment in enumerate(segments):
        for key, subnet in (("ipv4_subnet", segment.ipv4_subnet), ("ipv6_subnet", segment.ipv6_subnet)):
            if subnet is None:
                continue
            path = f"segments[{i}].{key}"
            for other, other_path in claimed:
                if other.version == subnet.version and subnet.overlaps(other):
                    raise ValidationError(path, str(subnet), f"overlaps {other} at {other_path}")
            claimed.append((subnet, path))


