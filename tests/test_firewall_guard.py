"""Anti-spoofing: the sets' contents, incremental updates, peers' shared segments, the nft text renderer,
and how a logged drop is explained (no root: the kernel side is in integration/test_antispoof_e2e.py)."""

from __future__ import annotations

import copy
import ipaddress
import socket
import struct
from typing import Any

import pytest
from factories import v4_state, wg_key
from hypothesis import given, settings
from hypothesis import strategies as st

from veilnet_agent.core import naming, nft_text
from veilnet_agent.core.errors import ValidationError
from veilnet_agent.core.firewall_compiler import compile_firewall, set_tables
from veilnet_agent.core.firewall_guard import GuardElements, Name, link_local, mac_int
from veilnet_agent.core.model import parse_node_state, update_peers
from veilnet_agent.core.objects import LoggedPacket
from veilnet_agent.dataplane.spoof_events import SpoofExplainer
from veilnet_agent.drivers import nflog

A_WEB = naming.endpoint_host_name("a-web")


def guard(raw: dict[str, Any]) -> dict[str, frozenset[Any]]:
    return {n: e for n, e in compile_firewall(parse_node_state(raw)).elements.items() if n.startswith("sg_")}


def keys(elements: frozenset[Any]) -> set[tuple[Any, ...]]:
    return {key for key, _ in elements}


def test_link_local_is_the_kernels_eui64() -> None:
    assert str(link_local("02:00:00:0a:00:01")) == "fe80::ff:fe0a:1"  # what `ip addr` shows for that MAC
    assert str(link_local("52:54:00:12:34:56")) == "fe80::5054:ff:fe12:3456"


def test_local_endpoints_own_their_port_mac_and_addresses() -> None:
    sets = guard(v4_state())
    assert (Name(A_WEB),) in keys(sets["sg_ep_ports"])
    assert (A_WEB, "02:00:00:0a:00:01") in keys(sets["sg_ep_mac"])
    assert (A_WEB, mac_int("02:00:00:0a:00:01")) in keys(sets["sg_ep_nd_mac"])  # raw: ND options
    assert (A_WEB, "203.0.113.10") in keys(sets["sg_ep_ip4"])
    assert {v for port, v in keys(sets["sg_ep_ip6"]) if port == A_WEB} == {"fe80::ff:fe0a:1", "fd00:b1::a"}
    own6 = {v for port, v in keys(sets["sg_ep_nd_ip6"]) if port == A_WEB}  # raw: advertised targets
    assert own6 == {int(link_local("02:00:00:0a:00:01")), 0xFD0000B100000000000000000000000A}


def test_peers_own_their_endpoints_their_shared_vnis_and_the_gateways() -> None:
    sets = guard(v4_state())
    peer = "198.51.100.12"
    assert keys(sets["sg_peer_vni"]) == {(peer, 100), (peer, 200)}
    assert (peer, 100, mac_int("02:00:00:0b:00:01")) in keys(sets["sg_peer_mac"])
    assert (peer, 100, mac_int(naming.gateway_mac(100))) in keys(sets["sg_peer_mac"]), "routed frames"
    assert (peer, 200, mac_int("02:00:00:0b:00:01")) not in keys(sets["sg_peer_mac"]), "MACs are per VNI"
    ip4 = {v for p, v in keys(sets["sg_peer_ip4"]) if p == peer}
    assert {0xCB007114, 0xCB007150} <= ip4  # 203.0.113.20 and .80: its endpoints
    assert 0xCB007101 in ip4, "the gateway's address (its ARP and reports)"
    assert (100, mac_int("02:00:00:0a:00:01")) in keys(sets["sg_known_mac"]), "local endpoints are known too"


def test_a_peer_carries_only_the_segments_it_shares() -> None:
    raw = v4_state()
    raw["peers"][0]["segments"] = ["blue", "green"]
    raw["peers"][0]["endpoints"] = raw["peers"][0]["endpoints"][:1]  # no endpoint in green, yet it shares it
    assert keys(guard(raw)["sg_peer_vni"]) == {("198.51.100.12", 100), ("198.51.100.12", 200)}
    raw["peers"][0]["segments"] = ["blue"]
    assert keys(guard(raw)["sg_peer_vni"]) == {("198.51.100.12", 100)}


@pytest.mark.parametrize(("segments", "field", "reason"), [
    (["blue", "red"], "peers[0].segments[1]", "names no segment"),
    (["blue", "blue"], "peers[0].segments[1]", "duplicate segment"),
    (["green"], "peers[0].endpoints[0].segment", "not among the segments shared"),
    ("blue", "peers[0].segments", "must be a list"),
])
def test_bad_shared_segments_are_refused_naming_the_field(segments: Any, field: str, reason: str) -> None:
    raw = v4_state()
    raw["peers"][0]["segments"] = segments
    with pytest.raises(ValidationError) as info:
        parse_node_state(raw)
    assert info.value.field == field and reason in info.value.reason


def _variants() -> Any:
    return st.lists(st.sampled_from(["mac", "ip", "add", "remove", "segments", "local-ip", "peer"]),
                    min_size=1, max_size=5)


def _mutate(raw: dict[str, Any], kind: str, n: int) -> None:
    peer = raw["peers"][0]
    if kind == "mac" and peer["endpoints"]:
        peer["endpoints"][0]["mac"] = f"02:00:00:0b:01:{n:02x}"
    elif kind == "ip" and peer["endpoints"]:
        peer["endpoints"][0]["ips"] = [f"203.0.113.{30 + n}"]
    elif kind == "add" and len(peer["endpoints"]) < 5:
        peer["endpoints"].append({"segment": "blue", "mac": f"02:00:00:0b:02:{n:02x}", "ips": [f"203.0.113.{40 + n}"]})
    elif kind == "remove" and peer["endpoints"]:
        peer["endpoints"].pop()
        peer.pop("segments", None)
    elif kind == "segments":
        peer["segments"] = sorted({"blue", "green"} | {e["segment"] for e in peer["endpoints"]})
    elif kind == "local-ip":
        raw["endpoints"][0]["ipv4"] = f"203.0.113.{10 + n}"
    elif kind == "peer" and len(raw["peers"]) < 3:
        raw["peers"].append({"name": f"host-{n}", "underlay_address": f"192.0.2.{100 + n}",
                             "public_key": wg_key(f"extra-{n}"), "transport_address": f"198.51.100.{100 + n}",
                             "endpoints": [{"segment": "green", "mac": f"02:00:00:0c:00:{n:02x}",
                                            "ips": [f"203.0.113.{100 + n}"]}]})


@settings(max_examples=60, deadline=None)
@given(_variants())
def test_incremental_guard_elements_equal_a_full_compile(mutations: list[str]) -> None:
    raw = v4_state()
    state = parse_node_state(raw)
    elements = GuardElements(state)
    applied: dict[str, set[Any]] = {n: set(e) for n, e in elements.frozen().items()}
    for n, kind in enumerate(mutations):
        _mutate(raw, kind, n)
        changed = parse_node_state(copy.deepcopy(raw))
        adds, deletes = elements.update(changed)
        for name in deletes:
            assert deletes[name] <= applied[name], "deleting what was never added"
            applied[name] -= deletes[name]
        for name in adds:
            assert not adds[name] & applied[name], "adding what is there"
            applied[name] |= adds[name]
        full = GuardElements(changed).frozen()
        assert {n: frozenset(e) for n, e in applied.items()} == full
        assert elements.frozen() == full


def test_a_one_peer_change_touches_only_that_peers_elements() -> None:
    raw = v4_state()
    raw["peers"] += [
        {"name": f"p{i}", "underlay_address": f"192.0.2.{50 + i}", "public_key": wg_key(f"p{i}"),
         "transport_address": f"198.51.100.{50 + i}",
         "endpoints": [{"segment": "blue", "mac": f"02:00:00:0d:00:{i:02x}", "ips": [f"203.0.113.{50 - i}"]}]}
        for i in range(1, 20)
    ]
    state = parse_node_state(raw)
    elements = GuardElements(state)
    peer = copy.deepcopy(raw["peers"][5])
    peer["endpoints"][0]["ips"] = ["203.0.113.60"]
    after = update_peers(state, [("peers[5]", peer)], [])
    adds, deletes = elements.update(after)
    touched = {key for part in (adds, deletes) for elems in part.values() for key, _ in elems}
    old_ip, new_ip = int(ipaddress.ip_address("203.0.113.45")), int(ipaddress.ip_address("203.0.113.60"))
    assert touched == {("198.51.100.55", old_ip), ("198.51.100.55", new_ip), (100, old_ip), (100, new_ip)}


# --- the nft text renderer ------------------------------------------------------------------------


def test_the_full_load_renders_every_structure_and_element() -> None:
    fw = compile_firewall(parse_node_state(v4_state()))
    text = nft_text.batch(fw.structure, fw.elements, set_tables(fw.structure))
    assert "add table bridge veilnet" in text and "add table inet veilnet" in text
    assert "add set bridge veilnet sg_ep_nd_mac { typeof meta iifname . @th,208,48; }" in text
    assert f'"{A_WEB}" . {mac_int("02:00:00:0a:00:01")}' in text
    assert f'"{A_WEB}" . 02:00:00:0a:00:01' in text
    lines = text.splitlines()
    first_rule = next(i for i, line in enumerate(lines) if line.startswith("add rule"))
    assert all(not line.startswith(("add chain", "add set", "add map")) for line in lines[first_rule:]), \
        "every object is declared before the rules that use it"


@pytest.mark.parametrize("bad", [
    {"add": {"rule": {"family": "inet", "table": "veilnet", "chain": "input",
                      "expr": [{"log": {"prefix": 'x" ; flush ruleset ; "', "group": 1}}]}}},
    {"add": {"rule": {"family": "inet", "table": "veilnet", "chain": "input; flush ruleset", "expr": []}}},
    {"add": {"set": {"family": "inet", "table": "veilnet", "name": "s", "type": "ifname",
                     "elem": ["a\nflush ruleset"]}}},
    {"add": {"table": {"family": "netdev2", "name": "veilnet"}}},
    {"delete": {"rule": {"family": "inet", "table": "veilnet", "chain": "c", "handle": 1}}},
])
def test_the_renderer_refuses_what_it_cannot_prove_harmless(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="nft text"):
        nft_text.command(bad)


def test_element_parts_that_are_not_numbers_names_or_addresses_are_refused() -> None:
    text = nft_text.ElementText()
    assert text.part(Name("vnep1")) == '"vnep1"'
    assert text.part("2001:db8::1") == "2001:db8::1"
    assert text.part(1 << 100) == hex(1 << 100)
    for bad in ("example.com", "vnep1", '1.2.3.4"'):
        with pytest.raises(ValueError):
            nft_text.ElementText().part(bad)


# --- explaining a logged drop -----------------------------------------------------------------------


def _packet(prefix: str, payload: bytes, *, family: int = 7, hw_protocol: int = 0x0800,
            mac: str | None = None, physindev: int | None = None) -> LoggedPacket:
    def attr(kind: int, value: bytes) -> bytes:
        length = 4 + len(value)
        return struct.pack("=HH", length, kind) + value + b"\0" * (-length % 4)

    body = struct.pack("!BBH", family, 0, 7410)
    body += attr(nflog.NFULA_PACKET_HDR, struct.pack("!HBB", hw_protocol, 0, 0))
    body += attr(nflog.NFULA_PREFIX, prefix.encode() + b"\0")
    body += attr(nflog.NFULA_IFINDEX_INDEV, struct.pack("!I", 3))
    if physindev is not None:
        body += attr(nflog.NFULA_IFINDEX_PHYSINDEV, struct.pack("!I", physindev))
    if mac is not None:
        body += attr(nflog.NFULA_HWADDR, struct.pack("!HH", 6, 0) + bytes.fromhex(mac.replace(":", "")) + b"\0\0")
    body += attr(nflog.NFULA_PAYLOAD, payload)
    packet = nflog.parse_packet(body)
    assert packet is not None
    return packet


def _ipv4(src: str, dst: str, proto: int = 17, rest: bytes = b"\0" * 8) -> bytes:
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(rest), 0, 0, 64, proto, 0, socket.inet_aton(src),
                       socket.inet_aton(dst)) + rest


def test_a_local_spoof_names_the_endpoint_the_claim_and_the_owner() -> None:
    state = parse_node_state(v4_state())
    explain = SpoofExplainer(lambda: state, ifname_of=lambda i: {9: A_WEB}.get(i)).explain
    packet = _packet("veilnet spoof ", _ipv4("203.0.113.70", "203.0.113.20"), mac="02:00:00:0a:00:01", physindev=9)
    assert (packet.physindev, packet.ethertype, packet.src_mac) == (9, 0x0800, "02:00:00:0a:00:01")
    fields = explain("spoof", packet)
    assert fields["endpoint"] == "a-web" and fields["claimed_ip"] == "203.0.113.70"
    assert fields["owner"] == "endpoint a-db" and fields["check"] == "source address"
    assert "203.0.113.10" in fields["real_ips"]  # type: ignore[operator]
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 2, bytes.fromhex("02000000aa01"),
                      socket.inet_aton("203.0.113.10"), b"\0" * 6, socket.inet_aton("203.0.113.10"))
    forged = _packet("veilnet spoof ", arp, hw_protocol=0x0806, mac="02:00:00:0a:00:01", physindev=9)
    assert (forged.arp_sha, forged.src, forged.family) == ("02:00:00:00:aa:01", "203.0.113.10", 4)
    assert explain("spoof", forged)["check"] == "arp sender mac"


def test_a_peer_spoof_names_the_peer_the_vni_and_who_owns_the_claim() -> None:
    raw = v4_state()
    raw["peers"].append({"name": "host-c", "underlay_address": "192.0.2.13", "public_key": wg_key("host-c"),
                         "transport_address": "198.51.100.13", "segments": ["blue"],
                         "endpoints": [{"segment": "blue", "mac": "02:00:00:0c:00:01", "ips": ["203.0.113.30"]}]})
    state = parse_node_state(raw)
    explain = SpoofExplainer(lambda: state).explain

    def encapsulated(vni: int, src_mac: str, src: str) -> LoggedPacket:
        inner = bytes.fromhex("02000000 0a01".replace(" ", "")) + bytes.fromhex(src_mac.replace(":", ""))
        inner += b"\x08\x00" + _ipv4(src, "203.0.113.10")
        udp = struct.pack("!HHHH", 40000, 4789, 8 + 8 + len(inner), 0) + struct.pack("!II", 0x08000000, vni << 8)
        return _packet("veilnet peer-spoof ", _ipv4("198.51.100.13", "198.51.100.11", 17, udp + inner), family=2)

    stolen = explain("peer_spoof", encapsulated(100, "02:00:00:0b:00:01", "203.0.113.20"))
    assert stolen["peer"] == "host-c" and stolen["vni"] == 100 and stolen["check"] == "source mac"
    assert stolen["mac_owner"] == "peer host-b" and stolen["owner"] == "peer host-b"
    foreign = explain("peer_spoof", encapsulated(200, "02:00:00:0c:00:01", "203.0.113.30"))
    assert foreign["check"] == "segment not shared with the peer" and foreign["segment"] == "green"
    address = explain("peer_spoof", encapsulated(100, "02:00:00:0c:00:01", "203.0.113.20"))
    assert address["check"] == "source address" and address["owner"] == "peer host-b"


def test_an_address_moving_from_a_local_endpoint_to_a_peer_stays_known() -> None:
    """Within one state per-segment addresses are unique, but across a change two identities can hold the same
    one: here a-web's address moves to a new endpoint of host-b. The element must stay in the kernel (an
    earlier version deleted it when the old holder went after the new one came: the kernel then refused a
    later delete of it, and the agent looped)."""
    raw = v4_state()
    state = parse_node_state(raw)
    elements = GuardElements(state)
    applied = {n: set(e) for n, e in elements.frozen().items()}
    moved = copy.deepcopy(raw)
    moved["endpoints"] = [e for e in moved["endpoints"] if e["name"] != "a-web"]
    moved["peers"][0]["endpoints"].append({"segment": "blue", "mac": "02:00:00:0b:00:09", "ips": ["203.0.113.10"]})
    for _ in range(2):  # and back, in both orders of processing
        after = parse_node_state(moved)
        adds, deletes = elements.update(after)
        for name in deletes:
            assert deletes[name] <= applied[name]
            applied[name] -= deletes[name]
        for name in adds:
            assert not adds[name] & applied[name]
            applied[name] |= adds[name]
        assert {n: frozenset(e) for n, e in applied.items()} == GuardElements(after).frozen()
        assert ((100, int(ipaddress.ip_address("203.0.113.10"))), "") in applied["sg_known_ip4"]
        moved = raw
