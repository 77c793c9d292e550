"""The controller's declarative network spec: typed, immutable, validated whole.

The spec names the segments, the nodes (hosts) and the segments each carries,
the endpoints on them and the policies between them (``docs/network-spec.md``).
``parse_spec`` either returns a complete ``NetworkSpec`` or raises one
``ValidationError`` naming the field path (``endpoints[3].ipv4``); the
compiler (``compile.py``) turns a valid spec into per-node agent states that
the agent accepts as they are.

Segments and policies use exactly the agent's schema and are validated by the
agent's own parsers; every check is O(total size) (hash lookups, plus one sort
of the subnets).
"""

from __future__ import annotations

import difflib
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from veilnet_agent.core import addr, loading
from veilnet_agent.core import validate as v
from veilnet_agent.core.errors import ValidationError
from veilnet_agent.core.model import IPAddress, IPInterface, IPNetwork, Segment, parse_segment
from veilnet_agent.core.policy import MAX_LABELS, Labels, Policy, parse_labels, parse_policies

MAX_SPEC_BYTES = 8 * 1024 * 1024
MAX_SEGMENTS = 10_000
MAX_NODES = 10_000
MAX_ENDPOINTS = 100_000
MAX_POLICIES = 10_000
# YAML aliases may make a small text expand to a huge structure; more values than this is refused.
MAX_EXPANDED_VALUES = 4_000_000
MAX_DEPTH = 64  # the deepest a valid spec goes is 7
DEFAULT_UNDERLAY_PORT = 51820
ENCRYPTIONS = ("wireguard", "ipsec")  # the first is the default
# ``ipsec:`` settings (docs/network-spec.md). The replay window is the kernel's ESN replay bitmap, which
# xfrm_user caps at 128 32-bit words (4096 packets); below 32 the window is smaller than one word.
IPSEC_REPLAY_WINDOW = (32, 4096, 4096)  # low, high, default (packets)
IPSEC_ROTATION_SECONDS = (60, 86400, 3600)  # low, high, default: a new epoch key this often
IPSEC_SETTINGS = {"replay_window": IPSEC_REPLAY_WINDOW, "rotation_seconds": IPSEC_ROTATION_SECONDS}
NODE_LABEL_PREFIX = "node."
# A node label key becomes "node.<key>" on endpoints, which must stay a valid (<= 63 character) label key.
MAX_NODE_LABEL_KEY = 63 - len(NODE_LABEL_PREFIX)

_SPEC_KEYS = {"encryption", "ipsec", "segments", "nodes", "endpoints", "policies"}
_NODE_KEYS = {"name", "underlay_address", "underlay_port", "transport_address", "keepalive", "segments", "labels"}
_ENDPOINT_KEYS = {"name", "node", "segment", "mac", "ipv4", "ipv6", "netns", "ifname", "labels"}
_ATTACHED_KEYS = _ENDPOINT_KEYS - {"node"}


def endpoint_labels(raw: object, path: str) -> tuple[tuple[str, str], ...]:
    """An endpoint's own labels; the ``node.`` prefix is reserved for its node's labels."""
    labels = parse_labels(raw, path)
    for key, _ in labels:
        if key.startswith(NODE_LABEL_PREFIX):
            raise ValidationError(
                f"{path}.{key}", key,
                f"the label prefix {NODE_LABEL_PREFIX!r} is reserved for the labels of the endpoint's node",
            )
    return labels


@dataclass(frozen=True)
class NodeSpec:
    name: str
    underlay_address: IPAddress
    underlay_port: int
    transport_address: IPInterface
    keepalive: int
    segments: tuple[str, ...]
    labels: Labels = ()


@dataclass(frozen=True)
class EndpointSpec:
    name: str
    node: str
    segment: str
    mac: str
    ipv4: ipaddress.IPv4Address | None
    ipv6: ipaddress.IPv6Address | None
    netns: str
    ifname: str = "eth0"
    labels: Labels = ()  # the endpoint's own labels; node.* labels are added by the compiler


@dataclass(frozen=True)
class NetworkSpec:
    encryption: str
    segments: tuple[Segment, ...]
    nodes: tuple[NodeSpec, ...]
    endpoints: tuple[EndpointSpec, ...]
    policies: tuple[Policy, ...]
    # The ``ipsec:`` settings as given (validated; absent keys take the defaults on the agent), or None.
    ipsec: Mapping[str, int] | None = None
    # The validated input as plain dicts and lists (JSON-compatible); segments and
    # policies are emitted from it verbatim. Treat as immutable.
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False, hash=False)
    # Lookup tables built while validating (uniqueness claims, nodes by name); None: built on demand.
    index: _Index | None = field(default=None, compare=False, repr=False, hash=False)

    def node(self, name: str) -> NodeSpec:
        return self._ensure_index().nodes[name]

    def segment(self, name: str) -> Segment:
        return self._ensure_index().segments[name]

    def _ensure_index(self) -> _Index:
        if self.index is None:
            object.__setattr__(self, "index", parse_spec(self.raw).index)
        assert self.index is not None
        return self.index


class _Index:
    """Everything a later check (attached endpoints) needs to validate against the spec."""

    def __init__(self) -> None:
        self.segments: dict[str, Segment] = {}
        self.nodes: dict[str, NodeSpec] = {}
        self.node_segments: dict[str, frozenset[str]] = {}
        self.node_label_count: dict[str, int] = {}
        # ("mac", segment, mac) / ("ip", segment, address) -> holder description
        self.claims: dict[tuple[object, ...], str] = {}
        self.endpoint_names: dict[str, str] = {}  # endpoint name -> path of its name
        self.slots: dict[tuple[str, str, str], str] = {}  # (node, netns, ifname) -> path
        self.endpoint_count = 0


# --------------------------------------------------------------------------- loading


def load_spec_text(text: str) -> object:
    """The text's contents (YAML, or JSON which is tried first when the text starts with "{"), not yet validated.

    Both go through ``veilnet_agent.core.loading``: plain JSON-like values only (no YAML tags, dates are
    strings), no duplicate keys, nesting at most MAX_DEPTH deep (the C loader would overflow the
    stack), aliases expanding to at most MAX_EXPANDED_VALUES values. Integer literals too long to be
    valid anywhere load as ``OversizedInteger``, refused by the validators naming their field. Every
    failure is a ValidationError on ``spec`` naming the line and column.
    """
    size = len(text) if len(text) * 4 <= MAX_SPEC_BYTES else len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_SPEC_BYTES:
        raise ValidationError("spec", size, f"is larger than {MAX_SPEC_BYTES} bytes")
    if text.lstrip()[:1] == "{":
        try:
            return loading.load_json(text)
        except RecursionError:
            raise ValidationError("spec", None, "not valid JSON: nested too deeply") from None
        except loading.DuplicateKeyError as exc:
            raise ValidationError("spec", None, f"not valid JSON: {exc}") from None
        except ValueError:
            pass  # not JSON: maybe YAML flow style
    return loading.load_yaml_text(text, "spec", None, max_depth=MAX_DEPTH, max_values=MAX_EXPANDED_VALUES)


def parse_spec_text(text: str) -> NetworkSpec:
    return parse_spec(load_spec_text(text))


# --------------------------------------------------------------------------- parsing


def parse_spec(raw: object) -> NetworkSpec:
    """Validate a whole spec; the first error found is raised as ValidationError."""
    data = v.mapping(raw, "")
    v.no_unknown_keys(data, _SPEC_KEYS, "")
    encryption = _parse_encryption(data.get("encryption"))
    ipsec = _parse_ipsec(data.get("ipsec"), encryption)
    index = _Index()

    segments_raw = _list(data, "segments", MAX_SEGMENTS)
    segments = tuple(parse_segment(item, f"segments[{i}]") for i, item in enumerate(segments_raw))
    _unique([(s.name, f"segments[{i}].name") for i, s in enumerate(segments)], "segment name")
    _unique([(s.vni, f"segments[{i}].vni") for i, s in enumerate(segments)], "VNI")
    index.segments = {s.name: s for s in segments}

    nodes_raw = _list(data, "nodes", MAX_NODES)
    nodes = tuple(_parse_node(item, f"nodes[{i}]", index) for i, item in enumerate(nodes_raw))
    _check_nodes(nodes)
    _check_subnets_disjoint(segments, nodes[0].transport_address if nodes else None)

    for s in segments:
        holder = f"the gateway of segment {s.name}"
        index.claims[("mac", s.name, s.gateway_mac)] = holder
        for gateway in (s.ipv4_gateway, s.ipv6_gateway):
            if gateway is not None:
                index.claims[("ip", s.name, gateway)] = holder

    endpoints_raw = _list(data, "endpoints", MAX_ENDPOINTS)
    checker = _EndpointChecker(index, index.claims, index.endpoint_names, index.slots, attached=False)
    endpoints = tuple(checker.parse(item, f"endpoints[{i}]", None) for i, item in enumerate(endpoints_raw))
    index.endpoint_count = len(endpoints)

    policies_raw = _list(data, "policies", MAX_POLICIES)
    policies = parse_policies(policies_raw, set(index.segments))

    plain = _plain(data)
    assert isinstance(plain, dict)
    _canonicalize(plain, segments, policies)
    return NetworkSpec(
        encryption=encryption, segments=segments, nodes=nodes, endpoints=endpoints, policies=policies,
        ipsec=ipsec, raw=plain, index=index,
    )


def _parse_encryption(raw: object) -> str:
    if raw is None:
        return ENCRYPTIONS[0]
    return v.choice(raw, "encryption", ENCRYPTIONS)


def _parse_ipsec(raw: object, encryption: str) -> dict[str, int] | None:
    """The ``ipsec:`` settings given (an empty mapping: None, the defaults); only with ``encryption: ipsec``."""
    if raw is None:
        return None
    if encryption != "ipsec":
        raise ValidationError("ipsec", raw, f"ipsec settings need encryption: ipsec (encryption is {encryption})")
    data = v.mapping(raw, "ipsec")
    v.no_unknown_keys(data, set(IPSEC_SETTINGS), "ipsec")
    settings = {key: v.integer(data[key], f"ipsec.{key}", low, high)
                for key, (low, high, _default) in IPSEC_SETTINGS.items() if data.get(key) is not None}
    return settings or None


def _list(data: Mapping[str, Any], key: str, limit: int) -> Sequence[Any]:
    items = v.sequence(data.get(key) if data.get(key) is not None else [], key)
    if len(items) > limit:
        raise ValidationError(key, len(items), f"at most {limit} {key}")
    return items


def _unique(items: Sequence[tuple[object, str]], what: str) -> None:
    seen: dict[object, str] = {}
    for key, path in items:
        if key in seen:
            shown = key if isinstance(key, (int, str)) else str(key)
            raise ValidationError(path, shown, f"duplicate {what}, also at {seen[key]}")
        seen[key] = path


def _parse_node(raw: object, path: str, index: _Index) -> NodeSpec:
    data = v.mapping(raw, path)
    v.no_unknown_keys(data, _NODE_KEYS, path)
    name = v.name(v.required(data, "name", path), f"{path}.name")
    underlay = v.ip_address(v.required(data, "underlay_address", path), f"{path}.underlay_address")
    port = v.integer(data.get("underlay_port", DEFAULT_UNDERLAY_PORT), f"{path}.underlay_port", 1, 65535)
    transport = v.ip_interface(v.required(data, "transport_address", path), f"{path}.transport_address")
    keepalive = v.integer(data.get("keepalive", 0), f"{path}.keepalive", 0, 65535)
    segments_path = f"{path}.segments"
    names_raw = v.sequence(data.get("segments") if data.get("segments") is not None else [], segments_path)
    carried: dict[str, int] = {}
    for j, item in enumerate(names_raw):
        item_path = f"{segments_path}[{j}]"
        segment = v.name(item, item_path)
        if segment not in index.segments:
            raise ValidationError(item_path, segment, "names no segment of the spec")
        if segment in carried:
            raise ValidationError(item_path, segment, f"listed twice, also at {segments_path}[{carried[segment]}]")
        carried[segment] = j
    labels_path = f"{path}.labels"
    labels = parse_labels(data.get("labels"), labels_path)
    for key, _ in labels:
        if len(key) > MAX_NODE_LABEL_KEY:
            raise ValidationError(
                f"{labels_path}.{key}", key,
                f"node label keys are at most {MAX_NODE_LABEL_KEY} characters "
                f"(endpoints get them as {NODE_LABEL_PREFIX}<key>)",
            )
    node = NodeSpec(
        name=name, underlay_address=underlay, underlay_port=port, transport_address=transport,
        keepalive=keepalive, segments=tuple(carried), labels=labels,
    )
    if name not in index.nodes:  # duplicates are reported by _check_nodes, with both paths
        index.nodes[name] = node
        index.node_segments[name] = frozenset(carried)
        index.node_label_count[name] = len(labels)
    return node


def _check_nodes(nodes: tuple[NodeSpec, ...]) -> None:
    _unique([(n.name, f"nodes[{i}].name") for i, n in enumerate(nodes)], "node name")
    underlays: dict[tuple[IPAddress, int], int] = {}
    for i, n in enumerate(nodes):
        key = (n.underlay_address, n.underlay_port)
        if key in underlays:
            raise ValidationError(
                f"nodes[{i}].underlay_address", str(n.underlay_address),
                f"duplicate underlay address and port {n.underlay_port}, also at nodes[{underlays[key]}]",
            )
        underlays[key] = i
    if not nodes:
        return
    network = nodes[0].transport_address.network
    transports: dict[IPAddress, int] = {}
    for i, n in enumerate(nodes):
        path = f"nodes[{i}].transport_address"
        ip = n.transport_address.ip
        if n.transport_address.network != network:
            raise ValidationError(
                path, str(n.transport_address),
                f"must be in the transport network {network} of nodes[0] (with the same prefix length)",
            )
        if network.num_addresses > 2 and ip in (network.network_address, network.broadcast_address):
            raise ValidationError(path, str(n.transport_address), f"is the network or broadcast address of {network}")
        if ip in transports:
            raise ValidationError(path, str(ip), f"duplicate transport address, also at nodes[{transports[ip]}]")
        transports[ip] = i


def _check_subnets_disjoint(segments: tuple[Segment, ...], transport: IPInterface | None) -> None:
    """No two segment subnets, nor a segment subnet and the transport network, overlap.

    Same rule and messages as the agent's ``veilnet_agent.core.model._check_subnets_disjoint``, in
    O(n log n) (sorted sweep) rather than comparing every pair.
    """
    entries: list[tuple[int, int, int, int, IPNetwork, str]] = []  # version, first, last, order, network, path
    if transport is not None:
        net = transport.network
        entries.append((net.version, int(net.network_address), int(net.broadcast_address), 0, net,
                        "nodes[0].transport_address"))
    for i, s in enumerate(segments):
        for key, subnet in (("ipv4_subnet", s.ipv4_subnet), ("ipv6_subnet", s.ipv6_subnet)):
            if subnet is not None:
                entries.append((subnet.version, int(subnet.network_address), int(subnet.broadcast_address),
                                len(entries) + 1, subnet, f"segments[{i}].{key}"))
    entries.sort(key=lambda e: (e[0], e[1], e[3]))
    widest: tuple[int, int, int, int, IPNetwork, str] | None = None
    for entry in entries:
        if widest is not None and widest[0] == entry[0] and entry[1] <= widest[2]:
            later, earlier = (entry, widest) if entry[3] > widest[3] else (widest, entry)
            raise ValidationError(later[5], str(later[4]), f"overlaps {earlier[4]} at {earlier[5]}")
        if widest is None or widest[0] != entry[0] or entry[2] > widest[2]:
            widest = entry


class _EndpointChecker:
    """Validates endpoints one by one against the spec's segments, nodes and claims."""

    def __init__(
        self,
        index: _Index,
        claims: dict[tuple[object, ...], str],
        names: dict[str, str],
        slots: dict[tuple[str, str, str], str],
        *,
        attached: bool,
        base: _Index | None = None,
    ) -> None:
        self.index = index
        self.claims = claims
        self.names = names
        self.slots = slots
        self.attached = attached
        # Read-only tables of the spec checked before the own ones (attached endpoints).
        self.base_claims = base.claims if base is not None else None
        self.base_names = base.endpoint_names if base is not None else None
        self.base_slots = base.slots if base is not None else None

    def _holder(self, base: Mapping[Any, str] | None, table: Mapping[Any, str], key: Any) -> str | None:
        if base is not None:
            found = base.get(key)
            if found is not None:
                return f"the spec's {found}" if found.startswith("endpoints[") else found
        return table.get(key)

    def _claim(self, key: tuple[object, ...], path: str, value: object, holder: str) -> None:
        other = self._holder(self.base_claims, self.claims, key)
        if other is not None:
            raise ValidationError(path, value, f"is already used by {other}")
        self.claims[key] = holder

    def parse(self, raw: object, path: str, node_name: str | None) -> EndpointSpec:
        data = v.mapping(raw, path)
        v.no_unknown_keys(data, _ATTACHED_KEYS if self.attached else _ENDPOINT_KEYS, path)
        name_path = f"{path}.name"
        name = v.name(v.required(data, "name", path), name_path)
        other = self._holder(self.base_names, self.names, name)
        if other is not None:
            raise ValidationError(name_path, name, f"duplicate endpoint name, also at {other}")
        self.names[name] = name_path
        if node_name is None:
            node_name = v.name(v.required(data, "node", path), f"{path}.node")
            if node_name not in self.index.nodes:
                raise ValidationError(f"{path}.node", node_name, "names no node of the spec")
        segment_path = f"{path}.segment"
        segment_name = v.name(v.required(data, "segment", path), segment_path)
        segment = self.index.segments.get(segment_name)
        if segment is None:
            raise ValidationError(segment_path, segment_name, "names no segment of the spec")
        if segment_name not in self.index.node_segments[node_name]:
            raise ValidationError(segment_path, segment_name, f"node {node_name} does not carry this segment")
        mac_path = f"{path}.mac"
        mac = v.unicast_mac(v.required(data, "mac", path), mac_path)
        self._claim(("mac", segment_name, mac), mac_path, mac, mac_path)
        ipv4 = self._ip(data, path, "ipv4", 4, segment)
        ipv6 = self._ip(data, path, "ipv6", 6, segment)
        if ipv4 is None and ipv6 is None:
            raise ValidationError(f"{path}.ipv4", None, "an endpoint needs an IPv4 or IPv6 address")
        assert ipv4 is None or isinstance(ipv4, ipaddress.IPv4Address)
        assert ipv6 is None or isinstance(ipv6, ipaddress.IPv6Address)
        netns_path = f"{path}.netns"
        netns = v.netns_name(v.required(data, "netns", path), netns_path)
        ifname = v.ifname(data.get("ifname", "eth0"), f"{path}.ifname")
        slot = (node_name, netns, ifname)
        other = self._holder(self.base_slots, self.slots, slot)
        if other is not None:
            raise ValidationError(
                netns_path, netns, f"namespace {netns} and interface {ifname} on node {node_name} also at {other}"
            )
        self.slots[slot] = netns_path
        labels_path = f"{path}.labels"
        labels = endpoint_labels(data.get("labels"), labels_path)
        node_labels = self.index.node_label_count[node_name]
        if len(labels) + node_labels > MAX_LABELS:
            raise ValidationError(
                labels_path, len(labels),
                f"with the {node_labels} labels of node {node_name} (as node.<key>) more than {MAX_LABELS} labels",
            )
        return EndpointSpec(
            name=name, node=node_name, segment=segment_name, mac=mac, ipv4=ipv4, ipv6=ipv6,
            netns=netns, ifname=ifname, labels=labels,
        )

    def _ip(self, data: Mapping[str, Any], path: str, key: str, version: int, segment: Segment) -> IPAddress | None:
        value = data.get(key)
        if value is None:
            return None
        ip_path = f"{path}.{key}"
        ip = v.ip_address(value, ip_path)
        if ip.version != version:
            raise ValidationError(ip_path, value, f"must be an IPv{version} address")
        subnet = segment.subnet_for(ip)
        if subnet is None:
            raise ValidationError(ip_path, value, f"segment {segment.name} has no IPv{version} subnet")
        if ip not in subnet:
            raise ValidationError(ip_path, value, f"is outside the subnet {subnet}")
        if subnet.num_addresses > 2 and ip in (subnet.network_address, subnet.broadcast_address):
            raise ValidationError(ip_path, value, f"is the network or broadcast address of {subnet}")
        self._claim(("ip", segment.name, ip), ip_path, value, ip_path)
        return ip


def _canonicalize(plain: dict[str, Any], segments: tuple[Segment, ...], policies: tuple[Policy, ...]) -> None:
    """Write the addresses, MACs and port ranges of the raw segments and policies (which agents receive as
    they are) in the canonical form their validated values have, so the controller stores and sends one
    spelling of each value: ``02:AA:..`` is sent as ``02:aa:..``, ``fd00:B1:0::/64`` as ``fd00:b1::/64``."""
    for raw, segment in zip(plain.get("segments") or (), segments, strict=True):
        for key in ("ipv4_subnet", "ipv6_subnet"):
            subnet = getattr(segment, key)
            if subnet is not None:
                raw[key] = str(subnet)
        for key in ("ipv4_gateway", "ipv6_gateway"):
            gateway = getattr(segment, key)
            if gateway is not None:
                raw[key] = addr.text(gateway)
        if raw.get("gateway_mac") is not None:
            raw["gateway_mac"] = segment.gateway_mac
    for raw, policy in zip(plain.get("policies") or (), policies, strict=True):
        for side, selector in (("source", policy.source), ("destination", policy.destination)):
            if selector.cidr is not None:
                raw[side]["cidr"] = str(selector.cidr)
        ports = raw.get("ports")
        if ports is not None:
            raw["ports"] = [item if isinstance(item, int) else f"{typed.first}-{typed.last}"
                            for item, typed in zip(ports, policy.ports, strict=True)]


def _plain(value: object) -> object:
    """A deep copy as plain dicts and lists (validated input only: its shape is bounded)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(item) for k, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


# --------------------------------------------------------------------------- attached endpoints


def parse_attached_endpoint(node: str, raw: object, path: str) -> EndpointSpec:
    """One endpoint ``node`` attached through its local API, checked for everything the spec does not decide.

    Same fields as a spec endpoint without ``node``: types and formats, an IPv4
    or IPv6 address of the right version, labels (the ``node.`` prefix is
    reserved). ``AttachedClaims.check`` does the rest against a spec.
    """
    data = v.mapping(raw, path)
    v.no_unknown_keys(data, _ATTACHED_KEYS, path)
    name = v.name(v.required(data, "name", path), f"{path}.name")
    segment = v.name(v.required(data, "segment", path), f"{path}.segment")
    mac = v.unicast_mac(v.required(data, "mac", path), f"{path}.mac")
    ips: list[IPAddress | None] = []
    for key, version in (("ipv4", 4), ("ipv6", 6)):
        value = data.get(key)
        ip = None if value is None else v.ip_address(value, f"{path}.{key}")
        if ip is not None and ip.version != version:
            raise ValidationError(f"{path}.{key}", value, f"must be an IPv{version} address")
        ips.append(ip)
    ipv4, ipv6 = ips
    if ipv4 is None and ipv6 is None:
        raise ValidationError(f"{path}.ipv4", None, "an endpoint needs an IPv4 or IPv6 address")
    assert ipv4 is None or isinstance(ipv4, ipaddress.IPv4Address)
    assert ipv6 is None or isinstance(ipv6, ipaddress.IPv6Address)
    netns = v.netns_name(v.required(data, "netns", path), f"{path}.netns")
    ifname = v.ifname(data.get("ifname", "eth0"), f"{path}.ifname")
    labels_path = f"{path}.labels"
    labels = endpoint_labels(data.get("labels"), labels_path)
    return EndpointSpec(
        name=name, node=node, segment=segment, mac=mac, ipv4=ipv4, ipv6=ipv6, netns=netns, ifname=ifname,
        labels=labels,
    )


class AttachedClaims:
    """What the spec and the accepted attached endpoints hold, kept up to date one endpoint at a time.

    Built once per spec: its tables start as copies of the spec's own claims
    (endpoint names, MACs and addresses per segment including the gateways,
    (node, netns, ifname) slots), from the spec's index. ``check`` then
    ``claim`` accept an attached endpoint (``parse_attached_endpoint``'s
    output), ``release`` gives its claims back; each is a few hash lookups.
    An endpoint accepted earlier keeps its claims: a later one that conflicts
    is refused.
    """

    def __init__(self, spec: NetworkSpec) -> None:
        self.spec = spec
        self.index = index = spec._ensure_index()
        # value: who holds it (a path like endpoints[3].mac for the spec's own, else a description)
        self.names: dict[str, str] = dict(index.endpoint_names)
        self.claims: dict[tuple[object, ...], str] = dict(index.claims)  # ("mac"|"ip", segment, value)
        self.slots: dict[tuple[str, str, str], str] = dict(index.slots)
        self.count = 0  # attached endpoints claimed
        self._subnets: dict[str, _Subnets] = {}

    def knows(self, node: str) -> bool:
        """Whether ``node`` is a node of the spec (only those can attach endpoints)."""
        return node in self.index.nodes

    @staticmethod
    def _holder(base: Mapping[Any, str], key: Any, found: str) -> str:
        return f"the spec's {found}" if key in base and found.startswith("endpoints[") else found

    def _segment(self, name: str) -> _Subnets | None:
        found = self._subnets.get(name)
        if found is None:
            segment = self.index.segments.get(name)
            if segment is None:
                return None
            found = self._subnets[name] = (_bounds(segment.ipv4_subnet), _bounds(segment.ipv6_subnet))
        return found

    def check(self, e: EndpointSpec, path: str) -> None:
        """Raise ValidationError (fields under ``path``) if ``e`` does not fit the spec and the claims held."""
        index = self.index
        carried = index.node_segments.get(e.node)
        if carried is None:
            raise ValidationError("node", e.node, "names no node of the spec")
        if index.endpoint_count + self.count >= MAX_ENDPOINTS:
            raise ValidationError(path, e.name, f"at most {MAX_ENDPOINTS} endpoints in all")
        other = self.names.get(e.name)
        if other is not None:
            other = self._holder(index.endpoint_names, e.name, other)
            raise ValidationError(f"{path}.name", e.name, f"duplicate endpoint name, also at {other}")
        segment = self._segment(e.segment)
        if segment is None:
            raise ValidationError(f"{path}.segment", e.segment, "names no segment of the spec")
        if e.segment not in carried:
            raise ValidationError(f"{path}.segment", e.segment, f"node {e.node} does not carry this segment")
        key: tuple[object, ...] = ("mac", e.segment, e.mac)
        other = self.claims.get(key)
        if other is not None:
            raise ValidationError(f"{path}.mac", e.mac, f"is already used by {self._holder(index.claims, key, other)}")
        for field_name, ip, bounds in (("ipv4", e.ipv4, segment[0]), ("ipv6", e.ipv6, segment[1])):
            if ip is None:
                continue
            if bounds is None:
                raise ValidationError(f"{path}.{field_name}", str(ip),
                                      f"segment {e.segment} has no IPv{ip.version} subnet")
            subnet, first, last = bounds  # the usable addresses (integers) of the subnet
            number = int(ip)
            if not first <= number <= last:
                reason = (f"is outside the subnet {subnet}" if ip not in subnet
                          else f"is the network or broadcast address of {subnet}")
                raise ValidationError(f"{path}.{field_name}", str(ip), reason)
            key = ("ip", e.segment, ip)
            other = self.claims.get(key)
            if other is not None:
                raise ValidationError(f"{path}.{field_name}", str(ip),
                                      f"is already used by {self._holder(index.claims, key, other)}")
        slot = (e.node, e.netns, e.ifname)
        other = self.slots.get(slot)
        if other is not None:
            other = self._holder(index.slots, slot, other)
            raise ValidationError(f"{path}.netns", e.netns,
                                  f"namespace {e.netns} and interface {e.ifname} on node {e.node} also at {other}")
        node_labels = index.node_label_count[e.node]
        if len(e.labels) + node_labels > MAX_LABELS:
            raise ValidationError(
                f"{path}.labels", len(e.labels),
                f"with the {node_labels} labels of node {e.node} (as node.<key>) more than {MAX_LABELS} labels",
            )

    def claim(self, e: EndpointSpec, holder: str | None = None, path: str = "") -> None:
        """Record ``e``'s claims (after ``check``), described as ``holder`` or else by their fields under ``path``."""
        self.names[e.name] = holder or f"{path}.name"
        self.claims[("mac", e.segment, e.mac)] = holder or f"{path}.mac"
        if e.ipv4 is not None:
            self.claims[("ip", e.segment, e.ipv4)] = holder or f"{path}.ipv4"
        if e.ipv6 is not None:
            self.claims[("ip", e.segment, e.ipv6)] = holder or f"{path}.ipv6"
        self.slots[(e.node, e.netns, e.ifname)] = holder or f"{path}.netns"
        self.count += 1

    def release(self, e: EndpointSpec) -> None:
        """Give back the claims of ``e``, which ``claim`` recorded."""
        del self.names[e.name]
        del self.claims[("mac", e.segment, e.mac)]
        if e.ipv4 is not None:
            del self.claims[("ip", e.segment, e.ipv4)]
        if e.ipv6 is not None:
            del self.claims[("ip", e.segment, e.ipv6)]
        del self.slots[(e.node, e.netns, e.ifname)]
        self.count -= 1


_Bounds = tuple[IPNetwork, int, int]  # a subnet, its first and last address an endpoint may use
_Subnets = tuple[_Bounds | None, _Bounds | None]  # a segment's IPv4 and IPv6 subnet


def _bounds(subnet: IPNetwork | None) -> _Bounds | None:
    if subnet is None:
        return None
    first, last = int(subnet.network_address), int(subnet.broadcast_address)
    if subnet.num_addresses > 2:
        first, last = first + 1, last - 1
    return subnet, first, last


def validate_attached_endpoints(
    spec: NetworkSpec,
    node: str,
    raw: Sequence[object],
    attached_elsewhere: Mapping[str, Sequence[EndpointSpec]],
) -> tuple[EndpointSpec, ...]:
    """Validate the endpoints ``node`` attached through its local API as a whole (the first error is raised).

    Same fields as a spec endpoint without ``node``. Checked against the spec and
    against ``attached_elsewhere`` (other nodes' attached endpoints; an entry for
    ``node`` itself is ignored): names unique everywhere, MACs and addresses
    unique per segment, the segment carried by ``node``. Errors name
    ``endpoints[i].<field>`` of ``raw``. (The controller's hub accepts or
    refuses each endpoint on its own, with ``AttachedClaims``.)
    """
    table = AttachedClaims(spec)
    if not table.knows(node):
        raise ValidationError("node", node, "names no node of the spec")
    items = v.sequence(raw, "endpoints")
    others = [(n, e) for n, eps in attached_elsewhere.items() if n != node for e in eps]
    total = table.index.endpoint_count + len(others) + len(items)
    if total > MAX_ENDPOINTS:
        raise ValidationError("endpoints", len(items), f"at most {MAX_ENDPOINTS} endpoints in all (would be {total})")
    for owner, e in others:
        holder = f"endpoint {e.name} attached on {owner}"
        table.names.setdefault(e.name, holder)
        table.claims.setdefault(("mac", e.segment, e.mac), holder)
        for ip in (e.ipv4, e.ipv6):
            if ip is not None:
                table.claims.setdefault(("ip", e.segment, ip), holder)
    accepted = []
    for i, item in enumerate(items):
        path = f"endpoints[{i}]"
        e = parse_attached_endpoint(node, item, path)
        table.check(e, path)
        table.claim(e, path=path)
        accepted.append(e)
    return tuple(accepted)


# --------------------------------------------------------------------------- diffs


_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # libyaml's emitter: same text, ~4x faster


def canonical_text(raw: object) -> str:
    """The spec as sorted-key block YAML: comments and formatting do not show in a diff of two of these."""
    text: str = yaml.dump(_plain(raw), Dumper=_DUMPER, sort_keys=True, default_flow_style=False, allow_unicode=True)
    return text


def unified_diff(old_text: str, new_text: str, old_label: str, new_label: str) -> str:
    """A unified diff of two texts (pass ``canonical_text`` outputs); "" if they are equal."""
    if old_text == new_text:
        return ""
    lines = difflib.unified_diff(
        old_text.splitlines(keepends=True), new_text.splitlines(keepends=True), old_label, new_label
    )
    return "".join(line if line.endswith("\n") else line + "\n" for line in lines)


def summarize_changes(old: NetworkSpec | None, new: NetworkSpec) -> dict[str, dict[str, list[str]]]:
    """Names added, removed and changed per section; sections and kinds without change are omitted."""
    summary: dict[str, dict[str, list[str]]] = {}
    for section in ("segments", "nodes", "endpoints", "policies"):
        before = _by_name(old, section) if old is not None else {}
        after = _by_name(new, section)
        kinds = {
            "added": sorted(n for n in after if n not in before),
            "removed": sorted(n for n in before if n not in after),
            "changed": sorted(n for n, item in after.items() if n in before and before[n] != item),
        }
        kinds = {k: names for k, names in kinds.items() if names}
        if kinds:
            summary[section] = kinds
    if old is not None and (old.encryption, old.ipsec) != (new.encryption, new.ipsec):
        # every node's encryption changes with it: on the record as the mode it is now
        summary["encryption"] = {"changed": [new.encryption]}
    return summary


def _by_name(spec: NetworkSpec, section: str) -> dict[str, object]:
    """Items of a section by name: segments and policies as their raw form (what is emitted), others typed."""
    if section in ("segments", "policies"):
        typed: Sequence[Segment | Policy] = spec.segments if section == "segments" else spec.policies
        raw = spec.raw.get(section) or []
        if len(raw) == len(typed):
            return {item.name: (item, raw[i]) for i, item in enumerate(typed)}
        return {item.name: item for item in typed}
    items: Sequence[NodeSpec | EndpointSpec] = spec.nodes if section == "nodes" else spec.endpoints
    return {item.name: item for item in items}
