"""Anti-spoofing: only addresses the network has verified reach policy (pure).

Two sources of frames enter a segment, and each is held to what it may claim:

* **A local endpoint's port** (its veth on the segment bridge): every frame must
  carry the endpoint's MAC and, for IP, one of its addresses (its IPv4, its
  IPv6, its EUI-64 link-local address); ARP must name the endpoint as sender;
  no router advertisements or redirects; neighbour advertisements only for its
  own addresses, and neighbour discovery options only with its own MAC. Any
  other ethertype (VLAN tags included) is dropped. These checks live in a table
  of their own, ``bridge veilnet``, because only the bridge family sees ARP and
  knows which port a frame came in on (``inet`` sees bridged IP with the bridge
  as its interface).
* **The overlay**: an encapsulated packet of one of our VNIs that came through
  WireGuard (the cleartext guard drops the others) was sent by the peer whose
  transport address it carries: WireGuard's allowed IPs prove that. Before the
  kernel decapsulates it (``inet veilnet``, hook input), the inner frame must be
  one that peer may send: a VNI it shares with us, a source MAC of one of its
  endpoints in that segment (or the segment's gateway MAC, for frames it routed),
  a source address of one of its endpoints (or of the distributed gateway, which
  every host is: its ARP and multicast reports), and the same neighbour-discovery
  rules as above. A compromised host can speak only for its own workloads. A frame claiming a
  MAC or address that belongs to someone else this host knows is counted as
  spoofing; one claiming a MAC or address nobody here knows (typically an
  endpoint that just came up, before this host learned of it) is dropped and
  counted apart, as unknown.

Frames from tunnel ports are checked before decapsulation (above). A port the
agent did not make is not filtered here: only root on the host can add one
(the CI kernel has no ``meta ibrname`` to tell which bridge a frame is on).

The inner frame is read at fixed offsets from the outer UDP header (VXLAN and
Geneve headers are both 8 bytes; Geneve options are refused): inner Ethernet at
16, its payload at 30. IPv6 extension headers other than a fragment header are
refused from the overlay, so the ICMPv6 header sits at a fixed offset too
(fragmented neighbour discovery is dropped by every receiver, RFC 6980); the
one exception is a multicast listener report, which carries exactly one
hop-by-hop header (router alert, 8 bytes) and is matched in that exact shape.

Sets are keyed by the port (local) or the peer's transport address (overlay), so
every endpoint's and every peer's elements are disjoint from all others': a
change touches only its own elements (see :class:`GuardElements`).
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from . import addr, naming
from .model import LocalEndpoint, NodeState, Peer, Segment

BRIDGE_FAMILY = "bridge"
TABLE_NAME = "veilnet"
GUARD_PREFIX = "sg_"  # every element-managed set of this module
SPOOF_COUNTER = "spoof_drop"  # frames from local endpoints that claimed what is not theirs
PEER_SPOOF_COUNTER = "peer_spoof_drop"  # frames from peers that claimed what is not theirs
# Frames from peers whose source MAC or address no one here knows: not someone else's identity, but not
# the peer's either. Mostly the first frames of an endpoint its peers have not learned of yet.
PEER_UNKNOWN_COUNTER = "peer_unknown_drop"
SPOOF_LOG_PREFIX = "veilnet spoof "
PEER_SPOOF_LOG_PREFIX = "veilnet peer-spoof "
PEER_UNKNOWN_LOG_PREFIX = "veilnet peer-unknown "

ETHERTYPE_IP4, ETHERTYPE_ARP, ETHERTYPE_IP6 = 0x0800, 0x0806, 0x86DD
ETHERNET_ARP_HEADER = 0x000108000604  # htype 1 (Ethernet), ptype IPv4, hlen 6, plen 4
ND_OPTION_LLADDR = (0x0101, 0x0201)  # source / target link-layer address option, 8 bytes long
ICMPV6_RS, ICMPV6_RA, ICMPV6_NS, ICMPV6_NA, ICMPV6_REDIRECT = 133, 134, 135, 136, 137
GENEVE_PORT = 6081
GENEVE_ETHERNET = 0x6558
# Inner next headers accepted from the overlay: TCP, UDP, ICMPv6, a fragment header, SCTP.
OVERLAY_IP6_NEXT_HEADERS = (6, 17, 58, 44, 132)
ND_NO_OPTIONS_LENGTH = 24  # ICMPv6 header + target: a NS/NA payload without options
MLD_HOP_BY_HOP = 0x3A00050200000100  # next header ICMPv6, length 0, router alert (MLD), PadN: as Linux sends it
MLD_TYPES = (130, 131, 132, 143)  # query, v1 report, done, v2 report


class Name(str):
    """A key part that is a literal name (an interface), not an address: passed to nft verbatim."""

    __slots__ = ()


class Mac(str):
    """A key part that is a MAC address (sets typed ``ether_addr``), lower case."""

    __slots__ = ()


KeyPart = str | int
GuardElement = tuple[tuple[KeyPart, ...], str]


# --- offsets of the inner frame, in bits from the outer UDP header ("th") ----------------------------
def _raw(base: str, offset: int, length: int) -> dict[str, Any]:
    return {"payload": {"base": base, "offset": offset, "len": length}}


INNER = 16 * 8  # UDP (8) + VXLAN/Geneve (8)
VNI = _raw("th", 96, 24)
GENEVE_FLAGS = _raw("th", 64, 16)  # version, option length, O and C bits: all zero for us
GENEVE_PROTOCOL = _raw("th", 80, 16)
INNER_SRC_MAC = _raw("th", INNER + 48, 48)
INNER_ETHERTYPE = _raw("th", INNER + 96, 16)
_L3 = INNER + 112
INNER_IP4_SRC = _raw("th", _L3 + 96, 32)
INNER_ARP_HEADER = _raw("th", _L3, 48)
INNER_ARP_SHA = _raw("th", _L3 + 64, 48)
INNER_ARP_SPA = _raw("th", _L3 + 112, 32)
INNER_IP6_LENGTH = _raw("th", _L3 + 32, 16)
INNER_IP6_NEXT = _raw("th", _L3 + 48, 8)
INNER_IP6_SRC = _raw("th", _L3 + 64, 128)
_ICMP6 = _L3 + 320
INNER_ICMP6_TYPE = _raw("th", _ICMP6, 8)
INNER_HOP_BY_HOP = _raw("th", _ICMP6, 64)  # where ICMPv6 would be without extension headers
INNER_MLD_TYPE = _raw("th", _ICMP6 + 64, 8)  # ICMPv6 type after one 8-byte hop-by-hop header
INNER_ND_TARGET = _raw("th", _ICMP6 + 64, 128)
INNER_ND_OPTION = _raw("th", _ICMP6 + 192, 16)
INNER_ND_OPTION_MAC = _raw("th", _ICMP6 + 208, 48)

# --- the same fields of a frame on a bridge port (bridge family) --------------------------------------
# Typed fields wherever nft has them: `nft list` prints a raw field it can name by its name, and the
# printed ruleset would then no longer load (a raw set key against a typed field); raw only where nft 1.0.6
# has no name (the neighbour discovery target and options).
PORT_ARP_HEADER = _raw("nh", 0, 48)
PORT_ND_TARGET = _raw("th", 64, 128)
PORT_ND_OPTION = _raw("th", 192, 16)
PORT_ND_OPTION_MAC = _raw("th", 208, 48)


# --- values ------------------------------------------------------------------------------------------
def mac_int(mac: str) -> int:
    return int(mac.replace(":", ""), 16)


def link_local(mac: str) -> ipaddress.IPv6Address:
    """The EUI-64 link-local address the kernel gives an interface with this MAC (addr_gen_mode eui64)."""
    octets = bytes.fromhex(mac.replace(":", ""))
    eui = bytes([octets[0] ^ 0x02, *octets[1:3], 0xFF, 0xFE, *octets[3:]])
    return ipaddress.IPv6Address(b"\xfe\x80" + bytes(6) + eui)


def _ip6_values(mac: str, ips: Iterable[ipaddress.IPv4Address | ipaddress.IPv6Address]) -> list[int]:
    values = [int(ip) for ip in ips if ip.version == 6]
    values.append(int(link_local(mac)))
    return values


def peer_vnis(peer: Peer, segments: Mapping[str, Segment]) -> list[int]:
    """The VNIs a peer may send us frames for: those of the segments we share with it."""
    return [segments[name].vni for name in peer.segments]


# --- elements ----------------------------------------------------------------------------------------
def set_names() -> list[str]:
    return [
        "sg_ep_ports", "sg_ep_mac", "sg_ep_ip4", "sg_ep_ip6", "sg_ep_nd_mac", "sg_ep_nd_ip6",
        "sg_peer_vni", "sg_peer_mac", "sg_peer_ip4", "sg_peer_ip6",
        "sg_known_mac", "sg_known_ip4", "sg_known_ip6",
    ]


Contribution = dict[str, frozenset[GuardElement]]


def _known(vni: int, mac: str, ips: Iterable[ipaddress.IPv4Address | ipaddress.IPv6Address]) -> Contribution:
    """An endpoint's identity in a VNI, whoever owns it: tells a stolen identity from an unknown one."""
    ips = list(ips)
    return {
        "sg_known_mac": frozenset({((vni, mac_int(mac)), "")}),
        "sg_known_ip4": frozenset(((vni, int(ip)), "") for ip in ips if ip.version == 4),
        "sg_known_ip6": frozenset(((vni, v), "") for v in _ip6_values(mac, ips)),
    }


def _union(parts: Iterable[Contribution]) -> Contribution:
    out: dict[str, set[GuardElement]] = {}
    for part in parts:
        for name, elements in part.items():
            out.setdefault(name, set()).update(elements)
    return {name: frozenset(elements) for name, elements in out.items()}


def _endpoint_part(endpoint: LocalEndpoint, vni: int) -> Contribution:
    port = Name(naming.endpoint_host_name(endpoint.name))
    return {
        **_known(vni, endpoint.mac, endpoint.ips),
        "sg_ep_ports": frozenset({((port,), "")}),
        "sg_ep_mac": frozenset({((port, Mac(endpoint.mac)), "")}),
        "sg_ep_ip4": frozenset({((port, addr.text(endpoint.ipv4)), "")} if endpoint.ipv4 is not None else ()),
        "sg_ep_ip6": frozenset(((port, addr.text(ipaddress.IPv6Address(v))), "")
                               for v in _ip6_values(endpoint.mac, endpoint.ips)),
        "sg_ep_nd_mac": frozenset({((port, mac_int(endpoint.mac)), "")}),
        "sg_ep_nd_ip6": frozenset(((port, v), "") for v in _ip6_values(endpoint.mac, endpoint.ips)),
    }


def _peer_part(peer: Peer, segments: Mapping[str, Segment], encryption: str) -> Contribution:
    # Where its encapsulated packets come from: its transport address (WireGuard) or underlay address (IPsec).
    source = addr.text(peer.underlay_address if encryption == "ipsec" else peer.transport_address)
    vni_of = {name: s.vni for name, s in segments.items()}
    vnis = peer_vnis(peer, segments)
    # The gateway MAC of every shared segment: the frames the peer routed into it (same MAC on every host).
    macs = {(source, segments[s].vni, mac_int(segments[s].gateway_mac)) for s in peer.segments}
    ip4: set[tuple[KeyPart, ...]] = set()
    ip6: set[tuple[KeyPart, ...]] = set()
    for endpoint in peer.endpoints:
        macs.add((source, vni_of[endpoint.segment], mac_int(endpoint.mac)))
        ip4.update((source, int(ip)) for ip in endpoint.ips if ip.version == 4)
        ip6.update((source, v) for v in _ip6_values(endpoint.mac, endpoint.ips))
    for name in peer.segments:  # the peer's gateway of each shared segment (the same addresses as ours)
        segment = segments[name]
        gateways = [ip for ip in (segment.ipv4_gateway, segment.ipv6_gateway) if ip is not None]
        ip4.update((source, int(ip)) for ip in gateways if ip.version == 4)
        ip6.update((source, v) for v in _ip6_values(segment.gateway_mac, gateways))
    known = _union(_known(vni_of[e.segment], e.mac, e.ips) for e in peer.endpoints)
    return {
        **known,
        "sg_peer_vni": frozenset(((source, vni), "") for vni in vnis),
        "sg_peer_mac": frozenset((key, "") for key in macs),
        "sg_peer_ip4": frozenset((key, "") for key in ip4),
        "sg_peer_ip6": frozenset((key, "") for key in ip6),
    }


GuardDelta = tuple[dict[str, set[GuardElement]], dict[str, set[GuardElement]]]  # (to add, to delete)


@dataclass(frozen=True)
class _Context:
    """What every contribution depends on besides its own endpoint or peer."""

    segments: tuple[Segment, ...]
    encryption: str = "wireguard"

    @property
    def by_name(self) -> dict[str, Segment]:
        return {s.name: s for s in self.segments}


class GuardElements:
    """The anti-spoofing sets' contents, kept current per changed endpoint or peer.

    Each endpoint and peer contributes its own elements; a change recomputes only
    the changed identities' contributions: O(changed), with an identity check per
    unchanged peer. Elements are counted, not assumed disjoint: within one state
    they are (ports, transport addresses, per-segment MACs and addresses are
    unique), but across a change two identities may hold the same one for a
    moment (an address moving from an attached endpoint to a peer's), and it must
    stay in the kernel as long as anyone holds it.
    """

    def __init__(self, state: NodeState) -> None:
        self._counts: dict[str, Counter[GuardElement]] = {}
        self._sources: dict[tuple[str, str], object] = {}
        self._parts: dict[tuple[str, str], Contribution] = {}
        self._context = _Context(state.segments, state.encryption)
        self._segments = self._context.by_name
        self._rebuild(state)

    @staticmethod
    def _sources_of(state: NodeState) -> dict[tuple[str, str], object]:
        sources: dict[tuple[str, str], object] = {("endpoint", e.name): e for e in state.endpoints}
        sources.update((("peer", p.name), p) for p in state.peers)
        return sources

    def _part(self, identity: tuple[str, str], source: object) -> Contribution:
        segments = self._segments
        if isinstance(source, LocalEndpoint):
            return _endpoint_part(source, segments[source.segment].vni)
        assert isinstance(source, Peer), identity
        return _peer_part(source, segments, self._context.encryption)

    def _rebuild(self, state: NodeState) -> None:
        self._context = _Context(state.segments, state.encryption)
        self._segments = self._context.by_name
        self._sources = self._sources_of(state)
        self._parts = {identity: self._part(identity, source) for identity, source in self._sources.items()}
        self._counts = {name: Counter() for name in set_names()}
        for part in self._parts.values():
            for name, elements in part.items():
                self._counts[name].update(elements)

    def frozen(self) -> dict[str, frozenset[GuardElement]]:
        return {name: frozenset(counts) for name, counts in self._counts.items()}

    def update(self, state: NodeState) -> GuardDelta:
        """Bring the sets to ``state``; return what changed."""
        # VNIs, gateway MACs or the encryption (the peers' source addresses) changed: every part may change
        if _Context(state.segments, state.encryption) != self._context:
            old_sets = self.frozen()
            self._rebuild(state)
            new_sets = self.frozen()
            return ({n: set(new_sets[n] - old_sets[n]) for n in new_sets},
                    {n: set(old_sets[n] - new_sets[n]) for n in old_sets})
        sources = self._sources_of(state)
        touched: dict[str, set[GuardElement]] = {}
        was_present: dict[str, dict[GuardElement, bool]] = {}
        for identity in self._sources.keys() | sources.keys():
            old, new = self._sources.get(identity), sources.get(identity)
            if old is new or old == new:
                continue
            old_part = self._parts.pop(identity, {})
            new_part = self._part(identity, new) if new is not None else {}
            if new is not None:
                self._parts[identity] = new_part
            for name in old_part.keys() | new_part.keys():
                counts = self._counts[name]
                seen = was_present.setdefault(name, {})
                for element in old_part.get(name, frozenset()) | new_part.get(name, frozenset()):
                    seen.setdefault(element, counts[element] > 0)
                counts.subtract(old_part.get(name, frozenset()))
                counts.update(new_part.get(name, frozenset()))
                touched.setdefault(name, set()).update(old_part.get(name, ()), new_part.get(name, ()))
        adds: dict[str, set[GuardElement]] = {}
        deletes: dict[str, set[GuardElement]] = {}
        for name, elements in touched.items():
            counts = self._counts[name]
            for element in elements:
                present = counts[element] > 0
                if present and not was_present[name][element]:
                    adds.setdefault(name, set()).add(element)
                elif not present:
                    del counts[element]
                    if was_present[name][element]:
                        deletes.setdefault(name, set()).add(element)
        self._sources = sources
        return adds, deletes


def compile_guard_elements(state: NodeState) -> dict[str, frozenset[GuardElement]]:
    return GuardElements(state).frozen()


# --- structure: the bridge table (local endpoints) -----------------------------------------------------
def _bobj(kind: str, **fields: Any) -> dict[str, Any]:
    return {"add": {kind: {"family": BRIDGE_FAMILY, "table": TABLE_NAME, **fields}}}


def _brule(chain: str, *expr: dict[str, Any]) -> dict[str, Any]:
    return _bobj("rule", chain=chain, expr=list(expr))


def _match(left: dict[str, Any], right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def _meta(key: str) -> dict[str, Any]:
    return {"meta": {"key": key}}


def _payload(protocol: str, name: str) -> dict[str, Any]:
    return {"payload": {"protocol": protocol, "field": name}}


def _concat(*parts: dict[str, Any]) -> dict[str, Any]:
    return {"concat": list(parts)}


def _in(key: dict[str, Any], set_name: str) -> dict[str, Any]:
    return _match(key, "@" + set_name)


def _not_in(key: dict[str, Any], set_name: str) -> dict[str, Any]:
    return _match(key, "@" + set_name, "!=")


def _goto(chain: str) -> dict[str, Any]:
    return {"goto": {"target": chain}}


def _jump(chain: str) -> dict[str, Any]:
    return {"jump": {"target": chain}}


ACCEPT: dict[str, Any] = {"accept": None}
DROP: dict[str, Any] = {"drop": None}


def _log_and_drop(
    counter: str, prefix: str, nflog_group: int, log_per_second: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The two rules of a drop chain: log (rate-limited, to nflog), then count and drop."""
    log = [{"limit": {"rate": log_per_second, "per": "second"}}, {"log": {"prefix": prefix, "group": nflog_group}}]
    return log, [{"counter": counter}, DROP]


def bridge_table(state: NodeState, nflog_group: int, log_per_second: int) -> list[dict[str, Any]]:
    """``table bridge veilnet``: what a local endpoint's port may send (see the module docstring)."""
    port = _meta("iifname")
    cmds: list[dict[str, Any]] = [{"add": {"table": {"family": BRIDGE_FAMILY, "name": TABLE_NAME}}}]
    cmds.append(_bobj("counter", name=SPOOF_COUNTER))
    cmds.append(_bobj("set", name="sg_ep_ports", type="ifname"))
    cmds.append(_bobj("set", name="sg_ep_mac", type=["ifname", "ether_addr"]))
    cmds.append(_bobj("set", name="sg_ep_ip4", type=["ifname", "ipv4_addr"]))
    cmds.append(_bobj("set", name="sg_ep_ip6", type=["ifname", "ipv6_addr"]))
    cmds.append(_bobj("set", name="sg_ep_nd_mac", typeof=_concat(port, PORT_ND_OPTION_MAC)))
    cmds.append(_bobj("set", name="sg_ep_nd_ip6", typeof=_concat(port, PORT_ND_TARGET)))

    log, drop = _log_and_drop(SPOOF_COUNTER, SPOOF_LOG_PREFIX, nflog_group, log_per_second)
    cmds.append(_bobj("chain", name="spoof"))
    cmds.append(_brule("spoof", *log))
    cmds.append(_brule("spoof", *drop))

    cmds.append(_bobj("chain", name="prerouting", type="filter", hook="prerouting", prio=-200, policy="accept"))
    cmds.append(_brule("prerouting", _in(port, "sg_ep_ports"), _jump("from_endpoint")))

    ether_type = _payload("ether", "type")
    cmds.append(_bobj("chain", name="from_endpoint"))
    cmds.append(_brule("from_endpoint", _not_in(_concat(port, _payload("ether", "saddr")), "sg_ep_mac"),
                       _goto("spoof")))
    cmds.append(_brule("from_endpoint", _match(ether_type, "arp"), _goto("endpoint_arp")))
    cmds.append(_brule("from_endpoint", _match(ether_type, "ip"), _goto("endpoint_ip4")))
    cmds.append(_brule("from_endpoint", _match(ether_type, "ip6"), _goto("endpoint_ip6")))
    cmds.append(_brule("from_endpoint", _goto("spoof")))  # other ethertypes, VLAN tags included

    cmds.append(_bobj("chain", name="endpoint_arp"))
    cmds.append(_brule("endpoint_arp", _match(PORT_ARP_HEADER, ETHERNET_ARP_HEADER, "!="), _goto("spoof")))
    cmds.append(_brule("endpoint_arp", _not_in(_concat(port, _payload("arp", "saddr ether")), "sg_ep_mac"),
                       _goto("spoof")))
    cmds.append(_brule("endpoint_arp", _match(_payload("arp", "saddr ip"), "0.0.0.0"), ACCEPT))  # probe
    cmds.append(_brule("endpoint_arp", _in(_concat(port, _payload("arp", "saddr ip")), "sg_ep_ip4"), ACCEPT))
    cmds.append(_brule("endpoint_arp", _goto("spoof")))

    cmds.append(_bobj("chain", name="endpoint_ip4"))
    cmds.append(_brule("endpoint_ip4", _in(_concat(port, _payload("ip", "saddr")), "sg_ep_ip4"), ACCEPT))
    cmds.append(_brule("endpoint_ip4", _goto("spoof")))

    icmp6_type = _payload("icmpv6", "type")
    cmds.append(_bobj("chain", name="endpoint_ip6"))
    cmds.append(_brule("endpoint_ip6", _match(icmp6_type, {"set": [ICMPV6_RA, ICMPV6_REDIRECT]}), _goto("spoof")))
    # Duplicate address detection and early MLD reports come from the unspecified address.
    cmds.append(_brule("endpoint_ip6", _match(_payload("ip6", "saddr"), "::"),
                       _match(icmp6_type, {"set": [ICMPV6_NS, 131, 143]}), ACCEPT))
    cmds.append(_brule("endpoint_ip6", _not_in(_concat(port, _payload("ip6", "saddr")), "sg_ep_ip6"),
                       _goto("spoof")))
    cmds.append(_brule("endpoint_ip6", _match(icmp6_type, ICMPV6_NA),
                       _not_in(_concat(port, PORT_ND_TARGET), "sg_ep_nd_ip6"), _goto("spoof")))
    cmds.append(_brule("endpoint_ip6", _match(icmp6_type, {"set": [ICMPV6_NS, ICMPV6_NA]}), _goto("endpoint_nd")))
    cmds.append(_brule("endpoint_ip6", ACCEPT))

    # NS/NA: no options, or the link-layer address option first, carrying the endpoint's own MAC.
    cmds.append(_bobj("chain", name="endpoint_nd"))
    cmds.append(_brule("endpoint_nd", _match(_payload("ip6", "length"), ND_NO_OPTIONS_LENGTH), ACCEPT))
    cmds.append(_brule("endpoint_nd", _match(PORT_ND_OPTION, {"set": list(ND_OPTION_LLADDR)}),
                       _in(_concat(port, PORT_ND_OPTION_MAC), "sg_ep_nd_mac"), ACCEPT))
    cmds.append(_brule("endpoint_nd", _goto("spoof")))
    return cmds


# --- structure: the overlay checks in ``inet veilnet`` ---------------------------------------------------
Builder = Callable[..., dict[str, Any]]


def overlay_chains(
    state: NodeState, obj: Builder, rule: Builder, nflog_group: int, log_per_second: int
) -> list[dict[str, Any]]:
    """The ``from_peer`` chains of ``inet veilnet`` and their sets; ``obj``/``rule`` build inet commands.

    The caller jumps to ``from_peer`` for encapsulated packets of our VNIs that came through WireGuard.
    """
    outer = _payload("ip" if state.tunnel_family == 4 else "ip6", "saddr")
    cmds: list[dict[str, Any]] = [obj("counter", name=PEER_SPOOF_COUNTER)]
    cmds.append(obj("set", name="sg_peer_vni", typeof=_concat(outer, VNI)))
    cmds.append(obj("set", name="sg_peer_mac", typeof=_concat(outer, VNI, INNER_SRC_MAC)))
    cmds.append(obj("set", name="sg_peer_ip4", typeof=_concat(outer, INNER_IP4_SRC)))
    cmds.append(obj("set", name="sg_peer_ip6", typeof=_concat(outer, INNER_IP6_SRC)))
    cmds.append(obj("set", name="sg_known_mac", typeof=_concat(VNI, INNER_SRC_MAC)))
    cmds.append(obj("set", name="sg_known_ip4", typeof=_concat(VNI, INNER_IP4_SRC)))
    cmds.append(obj("set", name="sg_known_ip6", typeof=_concat(VNI, INNER_IP6_SRC)))
    cmds.append(obj("counter", name=PEER_UNKNOWN_COUNTER))

    for chain, counter, prefix in (("peer_spoof", PEER_SPOOF_COUNTER, PEER_SPOOF_LOG_PREFIX),
                                   ("peer_unknown", PEER_UNKNOWN_COUNTER, PEER_UNKNOWN_LOG_PREFIX)):
        log, drop = _log_and_drop(counter, prefix, nflog_group, log_per_second)
        cmds.append(obj("chain", name=chain))
        cmds.append(rule(chain, *log))
        cmds.append(rule(chain, *drop))
    # A source that is not the peer's: someone else's identity (spoofing), or nobody's we know (unknown).
    for chain, key, known in (("peer_bad_mac", INNER_SRC_MAC, "sg_known_mac"),
                              ("peer_bad_arp", INNER_ARP_SHA, "sg_known_mac"),
                              ("peer_bad_ip4", INNER_IP4_SRC, "sg_known_ip4"),
                              ("peer_bad_spa", INNER_ARP_SPA, "sg_known_ip4"),
                              ("peer_bad_ip6", INNER_IP6_SRC, "sg_known_ip6")):
        cmds.append(obj("chain", name=chain))
        cmds.append(rule(chain, _in(_concat(VNI, key), known), _goto("peer_spoof")))
        cmds.append(rule(chain, _goto("peer_unknown")))

    geneve = _match(_payload("udp", "dport"), GENEVE_PORT)
    spoof = _goto("peer_spoof")
    cmds.append(obj("chain", name="from_peer"))
    cmds.append(rule("from_peer", _not_in(_concat(outer, VNI), "sg_peer_vni"), spoof))
    cmds.append(rule("from_peer", geneve, _match(GENEVE_FLAGS, 0, "!="), spoof))
    cmds.append(rule("from_peer", geneve, _match(GENEVE_PROTOCOL, GENEVE_ETHERNET, "!="), spoof))
    cmds.append(rule("from_peer", _not_in(_concat(outer, VNI, INNER_SRC_MAC), "sg_peer_mac"), _goto("peer_bad_mac")))
    cmds.append(rule("from_peer", _match(INNER_ETHERTYPE, ETHERTYPE_IP4), _goto("peer_ip4")))
    cmds.append(rule("from_peer", _match(INNER_ETHERTYPE, ETHERTYPE_ARP), _goto("peer_arp")))
    cmds.append(rule("from_peer", _match(INNER_ETHERTYPE, ETHERTYPE_IP6), _goto("peer_ip6")))
    cmds.append(rule("from_peer", spoof))

    cmds.append(obj("chain", name="peer_ip4"))
    cmds.append(rule("peer_ip4", _in(_concat(outer, INNER_IP4_SRC), "sg_peer_ip4"), ACCEPT))
    cmds.append(rule("peer_ip4", _goto("peer_bad_ip4")))

    cmds.append(obj("chain", name="peer_arp"))
    cmds.append(rule("peer_arp", _match(INNER_ARP_HEADER, ETHERNET_ARP_HEADER, "!="), spoof))
    cmds.append(rule("peer_arp", _not_in(_concat(outer, VNI, INNER_ARP_SHA), "sg_peer_mac"), _goto("peer_bad_arp")))
    cmds.append(rule("peer_arp", _match(INNER_ARP_SPA, 0), ACCEPT))
    cmds.append(rule("peer_arp", _in(_concat(outer, INNER_ARP_SPA), "sg_peer_ip4"), ACCEPT))
    cmds.append(rule("peer_arp", _goto("peer_bad_spa")))

    cmds.append(obj("chain", name="peer_ip6"))
    mld = (_match(INNER_IP6_NEXT, 0), _match(INNER_HOP_BY_HOP, MLD_HOP_BY_HOP),
           _match(INNER_MLD_TYPE, {"set": list(MLD_TYPES)}))
    cmds.append(rule("peer_ip6", *mld, _match(INNER_IP6_SRC, 0), ACCEPT))  # before the address is configured
    cmds.append(rule("peer_ip6", *mld, _in(_concat(outer, INNER_IP6_SRC), "sg_peer_ip6"), ACCEPT))
    cmds.append(rule("peer_ip6", _match(INNER_IP6_NEXT, {"set": list(OVERLAY_IP6_NEXT_HEADERS)}, "!="), spoof))
    cmds.append(rule("peer_ip6", _match(INNER_IP6_SRC, 0), _match(INNER_IP6_NEXT, 58),
                     _match(INNER_ICMP6_TYPE, ICMPV6_NS), ACCEPT))  # duplicate address detection
    cmds.append(rule("peer_ip6", _not_in(_concat(outer, INNER_IP6_SRC), "sg_peer_ip6"), _goto("peer_bad_ip6")))
    cmds.append(rule("peer_ip6", _match(INNER_IP6_NEXT, 58, "!="), ACCEPT))
    cmds.append(rule("peer_ip6", _match(INNER_ICMP6_TYPE, {"set": [ICMPV6_RA, ICMPV6_REDIRECT]}), spoof))
    cmds.append(rule("peer_ip6", _match(INNER_ICMP6_TYPE, ICMPV6_NA),
                     _not_in(_concat(outer, INNER_ND_TARGET), "sg_peer_ip6"), spoof))
    cmds.append(rule("peer_ip6", _match(INNER_ICMP6_TYPE, {"set": [ICMPV6_NS, ICMPV6_NA]}, "!="), ACCEPT))
    cmds.append(rule("peer_ip6", _match(INNER_IP6_LENGTH, ND_NO_OPTIONS_LENGTH), ACCEPT))
    cmds.append(rule("peer_ip6", _match(INNER_ND_OPTION, {"set": list(ND_OPTION_LLADDR)}),
                     _in(_concat(outer, VNI, INNER_ND_OPTION_MAC), "sg_peer_mac"), ACCEPT))
    cmds.append(rule("peer_ip6", spoof))
    return cmds
