"""Compile a node's policies into one nftables table, ``inet veilnet`` (pure).

The output is nft JSON commands for the official bindings, split into the
*structure* (table, chains, rules, set and map declarations) and the
*elements* of the allow maps, so membership changes (labels, endpoints) become
element updates while structural changes replace the table in one
transaction. See docs/firewall.md for the layout and why it hooks where it does.

Allowed flows are expanded to (source, destination, protocol[, port]) tuples in
maps whose values are the allowing policy's named counter: a rule
``counter name <tuple> map @allow... accept`` counts and accepts a hit and
does nothing on a miss. The per-packet cost is a fixed number of lookups
whatever the number of policies. (Verdict maps jumping to per-policy chains
were measured slower to update: every commit re-validates the chain graph
across all jump elements, ~22 ms per element at 100,000.)
Only tuples with a local endpoint on either side (or CIDRs on both) are kept:
other traffic never crosses this host.

No user string reaches nft unchecked: chain, set and counter names are built
from validated identifiers only; every other value is a validated address,
port, protocol number or label that selects addresses and never appears in
the ruleset itself.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import addr, naming
from .encryption import encryption_of
from .firewall_guard import BRIDGE_FAMILY, GuardElements, bridge_table, overlay_chains
from .model import IPAddress, NodeState, Segment
from .policy import PROTOCOL_NUMBERS, Policy, Selector

# ``meta l4proto`` values as numbers: nft resolves a protocol *name* through /etc/protocols (netbase),
# which minimal systems and container images lack ("Could not resolve protocol name"; found by the
# booted-system install test on a debootstrap minbase). Numbers need no file.
L4: dict[str, int] = {**PROTOCOL_NUMBERS, "igmp": 2}

TABLE_FAMILY = "inet"
TABLE_NAME = "veilnet"
FINGERPRINT_PREFIX = "veilnet:fingerprint:"
ENCAP_PORTS = (4789, 6081)  # VXLAN, Geneve: the VNI sits at the same offset in both headers
VNI_FIELD: dict[str, Any] = {"payload": {"base": "th", "offset": 96, "len": 24}}  # UDP header (8) + 4 bytes
EXPAND_PORT_RANGE_LIMIT = 64  # wider ranges go to interval maps as ranges
# IPv6 link-local control every segment needs: MLD (130-132, 143) and neighbour discovery (133-136).
LINK_LOCAL_ICMPV6 = (130, 131, 132, 133, 134, 135, 136, 143)
DYNAMIC_SET_TIMEOUT = 60
DYNAMIC_SET_SIZE = 65535

KeyPart = str | int
Element = tuple[tuple[KeyPart, ...], str]  # (key parts, the policy's counter)

_ADDR_TYPE = {4: "ipv4_addr", 6: "ipv6_addr"}
_IP_PROTO = {4: "ip", 6: "ip6"}
_MAP_KEY_TAIL: dict[str, list[str]] = {"ports": ["inet_proto", "inet_service"], "proto": ["inet_proto"], "any": []}


@dataclass(frozen=True)
class FirewallSettings:
    nflog_group: int = 7410
    log_per_second: int = 10


Shape = frozenset[tuple[str, str, str, int]]  # (family, object kind, name, rules if a chain else 0)


@dataclass(frozen=True)
class CompiledFirewall:
    structure: tuple[dict[str, Any], ...]
    elements: Mapping[str, frozenset[Element]] = field(default_factory=dict)
    fingerprint: str = ""

    @property
    def shape(self) -> Shape:
        return structure_shape(self.structure)


def structure_shape(objects: Iterable[Mapping[str, Any]]) -> Shape:
    """Chains with their rule counts, and the sets, maps and counters of our tables.

    Accepts the compiler's ``{"add": {...}}`` commands or ``nft -j list table`` objects alike, so the
    kernel's tables can be checked against the compiled ones: a hand-deleted rule, chain or set shows up
    here even though the fingerprint rule is intact.
    """
    rules: dict[tuple[str, str], int] = {}
    shape: set[tuple[str, str, str, int]] = set()
    for obj in objects:
        body = obj.get("add", obj)
        for kind in ("chain", "set", "map", "counter"):
            if kind in body:
                family = body[kind]["family"]
                shape.add((family, kind, body[kind]["name"], 0))
                if kind == "chain":
                    rules.setdefault((family, body[kind]["name"]), 0)
        if "rule" in body:
            key = (body["rule"]["family"], body["rule"]["chain"])
            rules[key] = rules.get(key, 0) + 1
    shape = {item for item in shape if item[1] != "chain"}
    shape.update((family, "chain", name, count) for (family, name), count in rules.items())
    return frozenset(shape)


def map_name(family: int, kind: str, interval: bool) -> str:
    return f"allow{family}_{kind}{'_iv' if interval else ''}"


def allow_map_names() -> list[str]:
    return [map_name(f, k, iv) for f in (4, 6) for k in _MAP_KEY_TAIL for iv in (False, True)]


def ident(name: str) -> str:
    """An nft identifier from a validated name ([a-z0-9-]): '-' becomes '_' (injective: names have no '_')."""
    return name.replace("-", "_")


def policy_counter(policy: Policy) -> str:
    return f"p_{ident(policy.name)}"


# --- endpoint resolution -------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Side:
    text: str  # address or CIDR text
    family: int
    prefix: bool
    local: bool


@dataclass(frozen=True)
class _Member:
    segment: str
    labels: Mapping[str, str]
    ips: tuple[str, ...]
    families: tuple[int, ...]
    local: bool


def _member(segment: str, labels: Iterable[tuple[str, str]], ips: Iterable[IPAddress], local: bool) -> _Member:
    ips = tuple(ips)
    return _Member(segment, dict(labels), tuple(addr.text(ip) for ip in ips), tuple(ip.version for ip in ips), local)


def _members(state: NodeState) -> list[_Member]:
    members = [_member(e.segment, e.labels, e.ips, True) for e in state.endpoints]
    for peer in state.peers:
        members.extend(_member(e.segment, e.labels, e.ips, False) for e in peer.endpoints)
    return members


def _resolve(selector: Selector, members: list[_Member]) -> list[_Side]:
    if selector.cidr is not None:
        cidr = selector.cidr
        if cidr.prefixlen == cidr.max_prefixlen:  # a host route is an exact address (the kernel reads it back so)
            return [_Side(addr.text(cidr.network_address), cidr.version, False, False)]
        return [_Side(str(cidr), cidr.version, True, False)]
    sides: list[_Side] = []
    for m in members:
        if selector.matches(m.segment, m.labels):
            sides.extend(_Side(ip, fam, False, m.local) for ip, fam in zip(m.ips, m.families, strict=True))
    return sides


Key = tuple[KeyPart, ...]
ElementDelta = tuple[dict[str, set[Element]], dict[str, set[Element]]]  # (to add, to delete) per map


def _member_index(state: NodeState) -> dict[tuple[str, ...], _Member]:
    """Every endpoint that can appear in a tuple, by a stable identity."""
    index: dict[tuple[str, ...], _Member] = {
        ("local", e.name): _member(e.segment, e.labels, e.ips, True) for e in state.endpoints
    }
    for peer in state.peers:
        for e in peer.endpoints:
            index[("remote", peer.name, e.segment, e.mac)] = _member(e.segment, e.labels, e.ips, False)
    return index


class AllowElements:
    """The allow maps' contents, kept current per changed endpoint.

    A tuple depends only on its two ends, so when endpoints change (labels,
    addresses, appearing, leaving) only the tuples touching their addresses
    change: they are enumerated with the old membership and removed, then
    enumerated with the new one against every policy in order (first policy
    wins) and added. O(changed endpoints x their counterparts), not O(all tuples).
    """

    def __init__(self, state: NodeState) -> None:
        self.maps: dict[str, dict[Key, str]] = {}
        self._rebuild(state)

    def _rebuild(self, state: NodeState) -> None:
        self.maps = {name: {} for name in allow_map_names()}
        self.policies = state.policies
        self.members = _member_index(state) if state.policies else {}
        for name, key, counter in self._tuples(list(self.members.values()), only=None):
            self.maps[name].setdefault(key, counter)

    def frozen(self) -> dict[str, frozenset[Element]]:
        return {name: frozenset(entries.items()) for name, entries in self.maps.items()}

    def update(self, state: NodeState) -> ElementDelta:
        """Bring the maps to ``state``; return what changed."""
        if state.policies != self.policies:  # every tuple may change: recompute, diff whole
            before = self.frozen()
            self._rebuild(state)
            after = self.frozen()
            return ({n: set(after[n] - before[n]) for n in after}, {n: set(before[n] - after[n]) for n in before})
        members = _member_index(state) if state.policies else {}
        changed = [k for k in self.members.keys() | members.keys() if self.members.get(k) != members.get(k)]
        addresses: set[str] = set()
        for identity in changed:
            for member in (self.members.get(identity), members.get(identity)):
                if member is not None:
                    addresses.update(member.ips)
        old_members, self.members = list(self.members.values()), members
        if not addresses:
            return {}, {}
        removed: dict[str, dict[Key, str]] = {name: {} for name in self.maps}
        for name, key, _ in self._tuples(old_members, only=addresses):
            counter = self.maps[name].pop(key, None)
            if counter is not None:
                removed[name][key] = counter
        added: dict[str, dict[Key, str]] = {name: {} for name in self.maps}
        for name, key, counter in self._tuples(list(members.values()), only=addresses):
            if key not in self.maps[name]:
                self.maps[name][key] = added[name][key] = counter
        adds = {n: {(k, c) for k, c in added[n].items() if removed[n].get(k) != c} for n in self.maps}
        deletes = {n: {(k, c) for k, c in removed[n].items() if added[n].get(k) != c} for n in self.maps}
        return adds, deletes

    def _tuples(self, members: list[_Member], only: set[str] | None) -> Iterator[tuple[str, Key, str]]:
        """(map, key, policy counter) of every policy in order; only tuples touching ``only`` if given."""
        for policy in self.policies:
            counter = policy_counter(policy)
            sources = _resolve(policy.source, members)
            destinations = _resolve(policy.destination, members)
            for s, d in _pairs(sources, destinations, only):
                if s.family != d.family or not (s.local or d.local or (s.prefix and d.prefix)):
                    continue
                for kind, key in _tuples(policy, s, d):
                    port_range = kind == "ports" and isinstance(key[3], str)
                    yield map_name(s.family, kind, s.prefix or d.prefix or port_range), key, counter


def _pairs(sources: list[_Side], destinations: list[_Side], only: set[str] | None) -> Iterable[tuple[_Side, _Side]]:
    if only is None:
        for s in sources:
            for d in destinations:
                yield s, d
        return
    touched_sources = [s for s in sources if s.text in only]
    for s in touched_sources:
        for d in destinations:
            yield s, d
    touched_destinations = [d for d in destinations if d.text in only]
    for s in sources:
        if s.text not in only:
            for d in touched_destinations:
                yield s, d


def compile_elements(state: NodeState) -> dict[str, frozenset[Element]]:
    """Allow-map contents: every allowed tuple that can cross this host, first policy wins."""
    return AllowElements(state).frozen()


def _tuples(policy: Policy, s: _Side, d: _Side) -> Iterable[tuple[str, tuple[KeyPart, ...]]]:
    if policy.protocol in ("tcp", "udp"):
        number = PROTOCOL_NUMBERS[policy.protocol]
        if not policy.ports:
            yield "proto", (s.text, d.text, number)
            return
        for ports in policy.ports:
            if ports.width <= EXPAND_PORT_RANGE_LIMIT:
                for port in range(ports.first, ports.last + 1):
                    yield "ports", (s.text, d.text, number, port)
            else:
                yield "ports", (s.text, d.text, number, f"{ports.first}-{ports.last}")
    elif policy.protocol == "icmp":
        if s.family == 4:
            yield "proto", (s.text, d.text, PROTOCOL_NUMBERS["icmp"])
    elif policy.protocol == "icmpv6":
        if s.family == 6:
            yield "proto", (s.text, d.text, PROTOCOL_NUMBERS["icmpv6"])
    else:
        yield "any", (s.text, d.text)


# --- structure -----------------------------------------------------------------------------------------
def _obj(kind: str, **fields: Any) -> dict[str, Any]:
    return {"add": {kind: {"family": TABLE_FAMILY, "table": TABLE_NAME, **fields}}}


def _rule(chain: str, *expr: dict[str, Any], comment: str | None = None) -> dict[str, Any]:
    fields: dict[str, Any] = {"chain": chain, "expr": list(expr)}
    if comment is not None:
        fields["comment"] = comment
    return _obj("rule", **fields)


def _match(left: dict[str, Any], right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def _meta(key: str) -> dict[str, Any]:
    return {"meta": {"key": key}}


def _payload(protocol: str, name: str) -> dict[str, Any]:
    return {"payload": {"protocol": protocol, "field": name}}


ACCEPT: dict[str, Any] = {"accept": None}
DROP: dict[str, Any] = {"drop": None}


def _jump(chain: str) -> dict[str, Any]:
    return {"jump": {"target": chain}}


def _counter(name: str) -> dict[str, Any]:
    return {"counter": name}


def _log(settings: FirewallSettings, prefix: str) -> list[dict[str, Any]]:
    return [
        {"limit": {"rate": settings.log_per_second, "per": "second"}},
        {"log": {"prefix": prefix, "group": settings.nflog_group}},
    ]


def _drop_chain(name: str, counter: str, prefix: str, settings: FirewallSettings) -> list[dict[str, Any]]:
    """A chain that logs (rate-limited, to nflog) and then counts and drops."""
    return [
        _obj("chain", name=name),
        _rule(name, *_log(settings, prefix)),
        _rule(name, _counter(counter), DROP),
    ]


def compile_structure(state: NodeState, settings: FirewallSettings) -> list[dict[str, Any]]:
    bridges = [naming.bridge_name(s.vni) for s in state.segments]
    free = [s for s in state.segments if s.mode == "isolated"]
    cmds: list[dict[str, Any]] = [{"add": {"table": {"family": TABLE_FAMILY, "name": TABLE_NAME}}}]
    counters = ["invalid", "default_drop", "cleartext_guard", "to_host_drop"]
    counters += [policy_counter(p) for p in state.policies]
    for s in state.segments:
        if s.rate_limit is not None:
            counters += [f"rate_{ident(s.name)}", f"icmp_rate_{ident(s.name)}"]
    cmds += [_obj("counter", name=c) for c in counters]

    bridge_set: dict[str, Any] = {"name": "segment_bridges", "type": "ifname"}
    if bridges:
        bridge_set["elem"] = bridges
    cmds.append(_obj("set", **bridge_set))
    free_set: dict[str, Any] = {"name": "free_inside", "type": ["ifname", "ifname"]}
    if free:
        free_set["elem"] = [{"concat": [naming.bridge_name(s.vni)] * 2} for s in free]
    cmds.append(_obj("set", **free_set))
    for family in (4, 6):
        for kind, tail in _MAP_KEY_TAIL.items():
            for interval in (False, True):
                fields: dict[str, Any] = {
                    "name": map_name(family, kind, interval),
                    "type": [_ADDR_TYPE[family], _ADDR_TYPE[family], *tail],
                    "map": "counter",
                }
                if interval:
                    fields["flags"] = ["interval"]
                cmds.append(_obj("map", **fields))
    for s in state.segments:
        if s.rate_limit is not None:
            for family in (4, 6):
                for what in ("conn", "icmp"):
                    cmds.append(_obj("set", name=_rate_set(s, what, family), type=_ADDR_TYPE[family],
                                     flags=["timeout"], timeout=DYNAMIC_SET_TIMEOUT,
                                     size=DYNAMIC_SET_SIZE))

    cmds += _segments_chain(state, settings)
    cmds += _input_chains(state, settings)
    return cmds


def _rate_set(segment: Segment, what: str, family: int) -> str:
    return f"rl_{what}{family}_{ident(segment.name)}"


def _segments_chain(state: NodeState, settings: FirewallSettings) -> list[dict[str, Any]]:
    cmds: list[dict[str, Any]] = [_obj("chain", name="segments")]

    def rule(*expr: dict[str, Any]) -> dict[str, Any]:
        return _rule("segments", *expr)

    ct_state = {"ct": {"key": "state"}}
    for segment in state.segments:
        cmds += _icmp_limit_rules(segment, settings)
    cmds.append(rule(_match(ct_state, ["established", "related"], "in"), ACCEPT))
    cmds.append(rule(_match(ct_state, "invalid", "in"), _counter("invalid"), DROP))
    for segment in state.segments:
        cmds += _connection_limit_rules(segment, settings)
    for family in (4, 6):
        ip = _IP_PROTO[family]
        src, dst = _payload(ip, "saddr"), _payload(ip, "daddr")
        tcp_udp = _match(_meta("l4proto"), {"set": [L4["tcp"], L4["udp"]]})
        port_key = {"concat": [src, dst, _meta("l4proto"), _payload("th", "dport")]}
        proto_key = {"concat": [src, dst, _meta("l4proto")]}
        any_key = {"concat": [src, dst]}
        for interval in (False, True):
            cmds.append(rule(tcp_udp, _count_allowed(port_key, map_name(family, "ports", interval)), ACCEPT))
        for interval in (False, True):
            cmds.append(rule(_count_allowed(proto_key, map_name(family, "proto", interval)), ACCEPT))
        for interval in (False, True):
            cmds.append(rule(_count_allowed(any_key, map_name(family, "any", interval)), ACCEPT))
    cmds.append(rule(_match(_payload("icmpv6", "type"), {"set": list(LINK_LOCAL_ICMPV6)}), ACCEPT))
    cmds.append(rule(_match(_meta("l4proto"), L4["igmp"]), ACCEPT))  # IPv4 multicast group management
    cmds.append(rule(_match({"concat": [_meta("iifname"), _meta("oifname")]}, "@free_inside"), ACCEPT))
    cmds.append(rule(*_log(settings, "veilnet drop ")))
    cmds.append(rule(_counter("default_drop"), DROP))
    return cmds


def _count_allowed(key: dict[str, Any], allow_map: str) -> dict[str, Any]:
    """Count the packet on its policy's counter if the tuple is in ``allow_map``; no match stops the rule."""
    return {"counter": {"map": {"key": key, "data": "@" + allow_map}}}


def _over_limit(set_name: str, saddr: dict[str, Any], rate: int, burst: int) -> dict[str, Any]:
    """True while the source ``saddr`` exceeds ``rate``/s (its token bucket lives in the dynamic set)."""
    limit = {"limit": {"rate": rate, "burst": burst, "per": "second", "inv": True}}
    return {"set": {"op": "update", "elem": saddr, "set": "@" + set_name, "stmt": [limit]}}


def _icmp_limit_rules(segment: Segment, settings: FirewallSettings) -> list[dict[str, Any]]:
    """Echo requests per source, whatever their conntrack state: one ping flood is one 'connection'."""
    limit = segment.rate_limit
    if limit is None:
        return []
    name = ident(segment.name)
    bridge = _match(_meta("iifname"), naming.bridge_name(segment.vni))
    cmds = _drop_chain(f"icmp_rate_drop_{name}", f"icmp_rate_{name}", f"veilnet icmp-rate {segment.name} ", settings)
    for family, proto in ((4, "icmp"), (6, "icmpv6")):
        saddr = _payload(_IP_PROTO[family], "saddr")
        echo = _match(_payload(proto, "type"), "echo-request")
        over = _over_limit(_rate_set(segment, "icmp", family), saddr, limit.icmp_per_second, limit.icmp_per_second)
        cmds.append(_rule("segments", bridge, echo, over, _jump(f"icmp_rate_drop_{name}")))
    return cmds


def _connection_limit_rules(segment: Segment, settings: FirewallSettings) -> list[dict[str, Any]]:
    """New connections (not ICMP) per source."""
    limit = segment.rate_limit
    if limit is None:
        return []
    name = ident(segment.name)
    bridge = _match(_meta("iifname"), naming.bridge_name(segment.vni))
    new = _match({"ct": {"key": "state"}}, "new", "in")
    cmds = _drop_chain(f"rate_drop_{name}", f"rate_{name}", f"veilnet rate {segment.name} ", settings)
    for family, proto in ((4, L4["icmp"]), (6, L4["icmpv6"])):
        saddr = _payload(_IP_PROTO[family], "saddr")
        not_icmp = _match(_meta("l4proto"), proto, "!=")
        over = _over_limit(_rate_set(segment, "conn", family), saddr, limit.new_connections_per_second, limit.burst)
        cmds.append(_rule("segments", bridge, new, not_icmp, over, _jump(f"rate_drop_{name}")))
    return cmds


def _input_chains(state: NodeState, settings: FirewallSettings) -> list[dict[str, Any]]:
    cmds: list[dict[str, Any]] = [
        _obj("chain", name="input", type="filter", hook="input", prio=0, policy="accept"),
    ]
    if state.segments:
        cmds += _drop_chain("guard_drop", "cleartext_guard", "veilnet guard ", settings)
        cmds.append(_rule(
            "input",
            _match(_payload("udp", "dport"), {"set": list(ENCAP_PORTS)}),
            _match(VNI_FIELD, {"set": sorted(s.vni for s in state.segments)}),
            encryption_of(state).not_decrypted(),  # the state's encryption: what did not come out of it
            _jump("guard_drop"),
            comment="encapsulated packets of our VNIs must come through "
            + ("IPsec" if state.encryption == "ipsec" else "WireGuard"),
        ))
        cmds += overlay_chains(state, _obj, _rule, settings.nflog_group, settings.log_per_second)
        cmds.append(_rule(
            "input",
            _match(_payload("udp", "dport"), {"set": list(ENCAP_PORTS)}),
            _match(VNI_FIELD, {"set": sorted(s.vni for s in state.segments)}),
            _jump("from_peer"),
            comment="and carry only what their peer may send",
        ))
    cmds.append(_obj("chain", name="to_host"))
    cmds.append(_rule("to_host", _match({"ct": {"key": "state"}}, ["established", "related"], "in"), ACCEPT))
    cmds.append(_rule("to_host", _match(_meta("l4proto"), {"set": [L4["icmp"], L4["icmpv6"]]}), ACCEPT))
    cmds.append(_rule("to_host", *_log(settings, "veilnet to-host ")))
    cmds.append(_rule("to_host", _counter("to_host_drop"), DROP))
    cmds.append(_rule("input", _match(_meta("iifname"), "@segment_bridges"), _jump("to_host")))
    return cmds


def _forward_chain(fingerprint: str) -> list[dict[str, Any]]:
    return [
        _obj("chain", name="forward", type="filter", hook="forward", prio=0, policy="accept"),
        _rule("forward", _match(_meta("iifname"), "@segment_bridges"), _jump("segments"),
              comment=FINGERPRINT_PREFIX + fingerprint),
        _rule("forward", _match(_meta("oifname"), "@segment_bridges"), _jump("segments")),
    ]


def compile_table(state: NodeState, settings: FirewallSettings) -> tuple[tuple[dict[str, Any], ...], str]:
    """The structure of both tables (without set and map elements) and its fingerprint.

    ``inet veilnet`` holds policy, rate limits, the cleartext guard and the overlay checks;
    ``bridge veilnet`` holds the local endpoints' anti-spoofing (see firewall_guard).
    """
    inet = compile_structure(state, settings)
    bridge = bridge_table(state, settings.nflog_group, settings.log_per_second)
    fingerprint = hashlib.sha256(json.dumps([inet, bridge], sort_keys=True).encode()).hexdigest()[:24]
    # The forward chain goes last: it only jumps into chains that exist by then, and it carries the fingerprint.
    return tuple(inet + _forward_chain(fingerprint) + bridge), fingerprint


def compile_firewall(state: NodeState, settings: FirewallSettings | None = None) -> CompiledFirewall:
    structure, fingerprint = compile_table(state, settings or FirewallSettings())
    elements = {**compile_elements(state), **GuardElements(state).frozen()}
    return CompiledFirewall(structure=structure, elements=elements, fingerprint=fingerprint)


TABLES = ((TABLE_FAMILY, TABLE_NAME), (BRIDGE_FAMILY, TABLE_NAME))


def set_tables(structure: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """Every set and map of the structure -> ``"<family> <table>"`` (names are unique across our tables)."""
    where: dict[str, str] = {}
    for command in structure:
        for kind, body in command.get("add", {}).items():
            if kind in ("set", "map"):
                where[body["name"]] = f"{body['family']} {body['table']}"
    return where
