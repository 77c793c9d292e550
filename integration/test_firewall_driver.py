"""FirewallDriver against the real kernel's nf_tables, in throw-away namespaces.

Every namespace is named ``vnt-fw-<pid>-<n>`` and deleted by a fixture
finaliser, pass or fail. ``nft`` and ``ip`` are used only to build foreign
objects and to cross-check what the driver reads and writes.
"""

from __future__ import annotations

import ipaddress
import json
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import pytest
from lab import TABLE_HOLDER

from veilnet_agent.core.errors import DriverError
from veilnet_agent.core.firewall_compiler import FINGERPRINT_PREFIX, CompiledFirewall, Element, compile_firewall
from veilnet_agent.core.model import parse_node_state
from veilnet_agent.core.objects import ObservedFirewall
from veilnet_agent.drivers import netlink
from veilnet_agent.drivers.firewall import FirewallDriver

pytestmark = pytest.mark.root

BRIDGE = "vnbr100"
ADDR = {4: "ipv4_addr", 6: "ipv6_addr"}
MAP_TAIL = {"ports": ["inet_proto", "inet_service"], "proto": ["inet_proto"], "any": []}
ALL_MAPS = [f"allow{f}_{k}{iv}" for f in (4, 6) for k in MAP_TAIL for iv in ("", "_iv")]


# --- namespaces and commands ----------------------------------------------------


def sh(*cmd: str, stdin: str | None = None, check: bool = True) -> str:
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, input=stdin)
    if check and done.returncode:
        raise AssertionError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr}")
    return done.stdout


def nft(ns: str, *args: str, stdin: str | None = None) -> str:
    return sh("ip", "netns", "exec", ns, "nft", *args, stdin=stdin)


def nft_json(ns: str, *args: str) -> Any:
    return json.loads(nft(ns, "-j", *args))["nftables"]


@pytest.fixture
def host(make_ns: Callable[[], str]) -> str:
    return make_ns()


@pytest.fixture
def driver(host: str) -> Iterator[FirewallDriver]:
    with FirewallDriver(netns=host) as drv:
        yield drv


# --- a CompiledFirewall built by hand, shaped like docs/firewall.md ----------------------


def obj(kind: str, **fields: Any) -> dict[str, Any]:
    return {"add": {kind: {"family": "inet", "table": "veilnet", **fields}}}


def rule(chain: str, *expr: dict[str, Any], comment: str | None = None) -> dict[str, Any]:
    extra = {"comment": comment} if comment else {}
    return obj("rule", chain=chain, expr=list(expr), **extra)


def match(left: Any, right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def meta(key: str) -> dict[str, Any]:
    return {"meta": {"key": key}}


def payload(protocol: str, name: str) -> dict[str, Any]:
    return {"payload": {"protocol": protocol, "field": name}}


ACCEPT: dict[str, Any] = {"accept": None}
DROP: dict[str, Any] = {"drop": None}


def make_compiled(
    elements: Mapping[str, frozenset[Element]],
    fingerprint: str = "fp-one",
    policies: tuple[str, ...] = ("p_web", "p_db", "p_ping"),
    bridges: tuple[str, ...] = (BRIDGE,),
) -> CompiledFirewall:
    """Table, counters, bridge set, the twelve allow maps, policy chains, segments and forward chains."""
    cmds: list[dict[str, Any]] = [{"add": {"table": {"family": "inet", "name": "veilnet"}}}]
    cmds += [obj("counter", name=c) for c in ("invalid", "default_drop", *policies)]
    bridge_set: dict[str, Any] = {"name": "segment_bridges", "type": "ifname"}
    if bridges:
        bridge_set["elem"] = list(bridges)
    cmds.append(obj("set", **bridge_set))
    for family in (4, 6):
        for kind, tail in MAP_TAIL.items():
            for iv in ("", "_iv"):
                fields: dict[str, Any] = {"name": f"allow{family}_{kind}{iv}",
                                          "type": [ADDR[family], ADDR[family], *tail], "map": "verdict"}
                if iv:
                    fields["flags"] = ["interval"]
                cmds.append(obj("map", **fields))
    for chain in policies:
        cmds += [obj("chain", name=chain), rule(chain, {"counter": chain}, ACCEPT)]
    cmds.append(obj("chain", name="segments"))
    ct_state = {"ct": {"key": "state"}}
    cmds.append(rule("segments", match(ct_state, ["established", "related"], "in"), ACCEPT))
    cmds.append(rule("segments", match(ct_state, "invalid", "in"), {"counter": "invalid"}, DROP))
    for family, ip in ((4, "ip"), (6, "ip6")):
        src, dst = payload(ip, "saddr"), payload(ip, "daddr")
        keys = {
            "ports": {"concat": [src, dst, meta("l4proto"), payload("th", "dport")]},
            "proto": {"concat": [src, dst, meta("l4proto")]},
            "any": {"concat": [src, dst]},
        }
        for kind, key in keys.items():
            for iv in ("", "_iv"):
                guard = [match(meta("l4proto"), {"set": ["tcp", "udp"]})] if kind == "ports" else []
                cmds.append(rule("segments", *guard, {"vmap": {"key": key, "data": f"@allow{family}_{kind}{iv}"}}))
    nd = ["nd-neighbor-solicit", "nd-neighbor-advert", "nd-router-solicit", "nd-router-advert"]
    cmds.append(rule("segments", match(payload("icmpv6", "type"), {"set": nd}), ACCEPT))
    cmds.append(rule("segments", {"counter": "default_drop"}, DROP))
    cmds.append(obj("chain", name="forward", type="filter", hook="forward", prio=0, policy="accept"))
    cmds.append(rule("forward", match(meta("iifname"), "@segment_bridges"), {"jump": {"target": "segments"}},
                     comment=FINGERPRINT_PREFIX + fingerprint))
    cmds.append(rule("forward", match(meta("oifname"), "@segment_bridges"), {"jump": {"target": "segments"}}))
    full = {name: frozenset(elements.get(name, frozenset())) for name in ALL_MAPS}
    return CompiledFirewall(structure=tuple(cmds), elements=full, fingerprint=fingerprint)


SAMPLE: dict[str, frozenset[Element]] = {
    "allow4_ports": frozenset({
        (("203.0.113.10", "203.0.113.20", 6, 5432), "p_db"),
        (("203.0.113.10", "203.0.113.20", 17, 53), "p_web"),
        (("198.51.100.7", "203.0.113.20", 6, 443), "p_web"),
    }),
    "allow4_ports_iv": frozenset({
        (("203.0.113.0/24", "203.0.113.20", 6, "8000-8080"), "p_web"),
        (("0.0.0.0/0", "203.0.113.21", 17, 9000), "p_web"),
        (("192.0.2.1", "198.51.100.0/31", 6, "1024-65535"), "p_db"),
    }),
    "allow4_proto": frozenset({(("203.0.113.10", "203.0.113.20", 1), "p_ping")}),
    "allow4_any_iv": frozenset({(("203.0.113.10", "198.51.100.0/25"), "p_web")}),
    "allow6_ports": frozenset({
        (("fd00:b1::10", "fd00:b1::20", 6, 5432), "p_db"),
        (("2001:db8:1:0:1::1", "fd00:b1::20", 17, 4500), "p_web"),
    }),
    "allow6_ports_iv": frozenset({
        (("fd00:b1::/64", "fd00:b1::20", 6, "8000-8080"), "p_web"),
        (("::/0", "2001:db8::1", 6, 22), "p_db"),
    }),
    "allow6_proto": frozenset({(("fd00:b1::10", "fd00:b1::20", 58), "p_ping")}),
    "allow6_proto_iv": frozenset({(("2001:db8:0:8000::/49", "fd00:b1::20", 58), "p_ping")}),
    "allow6_any": frozenset({(("fd00:b1::10", "fd00:b1::30"), "p_web")}),
}


def ruleset(ns: str) -> str:
    return nft(ns, "-j", "list", "ruleset")


def table_json(ns: str, family: str, name: str) -> str:
    return nft(ns, "-j", "list", "table", family, name)


# --- round trips ---------------------------------------------------------------------


def test_apply_full_then_observe_round_trips(host: str, driver: FirewallDriver) -> None:
    assert driver.observe() == ObservedFirewall(present=False, fingerprint=None, elements={})
    compiled = make_compiled(SAMPLE)
    sent = driver.apply_full(compiled)
    non_empty = sum(1 for v in compiled.elements.values() if v)
    assert sent == 4 + len(compiled.structure) + non_empty  # add+delete of both our tables first

    observed = driver.observe()
    assert observed.present
    assert observed.fingerprint == "fp-one"
    assert observed.elements == compiled.elements
    # cross-check with the nft CLI: the policy chain holds its named counter, the hook is there
    chains = {o["chain"]["name"]: o["chain"] for o in nft_json(host, "list", "chains", "inet") if "chain" in o}
    assert chains["forward"]["hook"] == "forward"
    text = nft(host, "list", "map", "inet", "veilnet", "allow6_ports_iv")
    assert "fd00:b1::/64 . fd00:b1::20 . 6 . 8000-8080 : jump p_web" in text.replace("tcp", "6")


def test_apply_full_replaces_the_table_whole(host: str, driver: FirewallDriver) -> None:
    driver.apply_full(make_compiled(SAMPLE))
    second = {"allow4_ports": frozenset({(("192.0.2.5", "192.0.2.6", 6, 80), "p_new")})}
    compiled = make_compiled(second, fingerprint="fp-two", policies=("p_new",))
    driver.apply_full(compiled)

    observed = driver.observe()
    assert observed.fingerprint == "fp-two"
    assert observed.elements == compiled.elements  # nothing of SAMPLE left
    assert set(driver.counters()) == {"invalid", "default_drop", "p_new"}
    assert len([o for o in nft_json(host, "list", "tables") if "table" in o]) == 1


_REAL_STATE: dict[str, Any] = {
    "node": "host-a",
    "transport_address": "fd00:7::1/64",
    "segments": [
        {"name": "blue", "vni": 100, "ipv4_subnet": "203.0.113.0/26", "ipv4_gateway": "203.0.113.1",
         "ipv6_subnet": "fd00:b1::/64", "ipv6_gateway": "fd00:b1::1", "mode": "default-deny",
         "rate_limit": {"new_connections_per_second": 50, "burst": 100, "icmp_per_second": 5}},
        {"name": "green", "vni": 200, "ipv4_subnet": "203.0.113.64/26", "ipv4_gateway": "203.0.113.65"},
    ],
    "endpoints": [
        {"name": "a-web", "segment": "blue", "mac": "02:00:00:0a:00:01", "ipv4": "203.0.113.10",
         "ipv6": "fd00:b1::a", "netns": "ep-a-web", "labels": {"app": "web"}},
        {"name": "a-db", "segment": "green", "mac": "02:00:00:0a:00:02", "ipv4": "203.0.113.70",
         "netns": "ep-a-db", "labels": {"app": "db"}},
    ],
    "peers": [
        {"name": "host-b", "underlay_address": "192.0.2.12",
         "public_key": "Oa0T3n8dSf8cVN9nFn0JOtU4q4Q0ZcLWYt5b3wRCn3Y=", "transport_address": "fd00:7::2",
         "segments": ["blue", "green"],
         "endpoints": [{"segment": "blue", "mac": "02:00:00:0b:00:01", "ips": ["203.0.113.20", "fd00:b1::14"]}]},
    ],
    "policies": [
        {"name": "web-to-db", "source": {"match_labels": {"app": "web"}},
         "destination": {"match_labels": {"app": "db"}}, "protocol": "tcp", "ports": [5432, "6000-6010"]},
        {"name": "wide", "source": {"cidr": "198.51.100.0/24"},
         "destination": {"segment": "blue"}, "protocol": "udp", "ports": ["1000-2000"]},
        {"name": "ping", "source": {"segment": "blue"}, "destination": {"segment": "green"},
         "protocol": "icmp"},
        {"name": "v6-any", "source": {"cidr": "2001:db8::/48"}, "destination": {"segment": "blue"}},
    ],
}


def test_the_listed_ruleset_loads_again(host: str, driver: FirewallDriver, make_ns: Callable[[], str]) -> None:
    """Operators save rulesets with `nft list ruleset > file` and restore them with `nft -f`: with our tables
    in it, that must still work (a raw payload field that nft prints under a name would break it)."""
    driver.apply_full(compile_firewall(parse_node_state(_REAL_STATE)))
    listed = nft(host, "list", "ruleset")
    other = make_ns()
    nft(other, "-f", "-", stdin=listed)
    assert nft(other, "list", "ruleset") == listed


def test_real_compiler_output_loads_and_round_trips(driver: FirewallDriver) -> None:
    state = parse_node_state(_REAL_STATE)
    compiled = compile_firewall(state)
    assert any(compiled.elements.values())
    assert compiled.elements["sg_peer_ip6"] and compiled.elements["sg_ep_mac"], "anti-spoofing sets too"
    driver.apply_full(compiled)
    observed = driver.observe()
    assert observed.fingerprint == compiled.fingerprint
    assert observed.elements == compiled.elements
    assert observed.shape == compiled.shape  # both tables, every chain with its rule count

    # An anti-spoofing element update (128-bit keys travel as hex) lands in the right table.
    ll = ("fd00:7::2", int(ipaddress.ip_address("fe80::ff:fe0b:99")))
    driver.apply_elements({"sg_peer_ip6": frozenset({(ll, "")})}, {"sg_ep_ports": compiled.elements["sg_ep_ports"]})
    after = driver.observe().elements
    assert after["sg_peer_ip6"] == compiled.elements["sg_peer_ip6"] | {(ll, "")}
    assert after["sg_ep_ports"] == frozenset()

    # Elements as read back (plain strings, no Name/Mac types) delete and add again by the sets' declared types:
    # an interface name is never mistaken for a host name.
    driver.apply_elements({}, {"sg_ep_mac": after["sg_ep_mac"], "sg_ep_ip4": after["sg_ep_ip4"]})
    emptied = driver.observe().elements
    assert emptied["sg_ep_mac"] == emptied["sg_ep_ip4"] == frozenset()
    driver.apply_elements({"sg_ep_mac": after["sg_ep_mac"]}, {})
    assert driver.observe().elements["sg_ep_mac"] == compiled.elements["sg_ep_mac"]


def test_the_ipsec_mode_table_loads_on_this_kernel(driver: FirewallDriver, host: str) -> None:
    """IPsec's guard (``meta ipsec missing``: no secpath) and its peer sets keyed by underlay addresses load and
    read back like WireGuard's (the ESP itself needs the VM; nft's secpath match does not)."""
    import copy

    raw = copy.deepcopy(_REAL_STATE)
    raw["encryption"] = "ipsec"
    compiled = compile_firewall(parse_node_state(raw))
    driver.apply_full(compiled)
    observed = driver.observe()
    assert observed.fingerprint == compiled.fingerprint and observed.elements == compiled.elements
    listed = nft(host, "list", "chain", "inet", "veilnet", "input")
    assert "meta ipsec missing" in listed and "vnwg0" not in listed
    peers = {key[0] for key, _ in compiled.elements["sg_peer_vni"]}
    assert peers == {p["underlay_address"] for p in raw["peers"]}


def test_a_node_in_no_segment_gets_its_table(driver: FirewallDriver) -> None:
    """A host taken out of every segment still has peers' sets in its compiled elements (empty) but no overlay
    chains: the table loads (it was refused as 'elements for a set the structure does not declare')."""
    import copy

    for encryption in ("wireguard", "ipsec"):
        raw = copy.deepcopy(_REAL_STATE)
        raw.update(segments=[], endpoints=[], peers=[], policies=[], encryption=encryption)
        compiled = compile_firewall(parse_node_state(raw))
        assert "sg_peer_vni" in compiled.elements and not compiled.elements["sg_peer_vni"]
        driver.apply_full(compiled)
        assert driver.observe().fingerprint == compiled.fingerprint


def test_counter_object_maps_round_trip(driver: FirewallDriver) -> None:
    """The jump-free alternative: ``counter name <key> map @m accept`` with a map of counter objects."""
    base = make_compiled({})
    key = {"concat": [payload("ip", "saddr"), payload("ip", "daddr"), meta("l4proto"), payload("th", "dport")]}
    extra = (
        obj("map", name="allow4_ctr", type=["ipv4_addr", "ipv4_addr", "inet_proto", "inet_service"], map="counter"),
        rule("segments", {"counter": {"map": {"key": key, "data": "@allow4_ctr"}}}, ACCEPT),
    )
    elements = {**base.elements, "allow4_ctr": frozenset({(("203.0.113.10", "203.0.113.20", 6, 5432), "p_db")})}
    driver.apply_full(CompiledFirewall((*base.structure, *extra), elements, base.fingerprint))
    assert driver.observe().elements == elements
    added = (("203.0.113.11", "203.0.113.20", 6, 5432), "p_web")
    driver.apply_elements({"allow4_ctr": frozenset({added})}, {})
    assert driver.observe().elements["allow4_ctr"] == elements["allow4_ctr"] | {added}


FOREIGN_VEILNET = """
table inet veilnet {
    chain p_x { accept; }
    map allow4_ports { type ipv4_addr . ipv4_addr . inet_proto . inet_service : verdict;
        elements = { 203.0.113.10 . 203.0.113.20 . tcp . ssh : jump p_x, 192.0.2.1 . 192.0.2.2 . udp . 53 : accept } }
    map allow6_proto_iv { type ipv6_addr . ipv6_addr . inet_proto : verdict; flags interval;
        elements = { fd00:b1:0:0:0::10 . 2001:db8:0:0::/64 . ipv6-icmp : goto p_x,
                     ::ffff:192.0.2.1 . fd00::1/128 . 17 : jump p_x } }
    set allow_plain { type ipv4_addr . inet_service; flags interval; elements = { 192.0.2.0/24 . 100-200 } }
    map other_map { type ipv4_addr : verdict; elements = { 192.0.2.9 : jump p_x } }
}
"""


def test_observe_normalises_a_table_written_by_nft(host: str, driver: FirewallDriver) -> None:
    nft(host, "-f", "-", stdin=FOREIGN_VEILNET)
    observed = driver.observe()
    assert observed.present and observed.fingerprint is None
    assert observed.elements == {
        "allow4_ports": frozenset({
            (("203.0.113.10", "203.0.113.20", 6, 22), "p_x"),
            (("192.0.2.1", "192.0.2.2", 17, 53), "accept"),
        }),
        "allow6_proto_iv": frozenset({
            (("fd00:b1::10", "2001:db8::/64", 58), "goto:p_x"),
            (("::ffff:c000:201", "fd00::1", 17), "p_x"),
        }),
        "allow_plain": frozenset({(("192.0.2.0/24", "100-200"), "")}),
    }
    # what observe returns can be written back as it is
    driver.apply_elements({}, {"allow6_proto_iv": observed.elements["allow6_proto_iv"]})
    rewritten = {name: observed.elements[name] for name in ("allow4_ports", "allow_plain")}
    driver.apply_elements(observed.elements, rewritten)
    assert driver.observe() == observed


def test_missing_namespace_is_a_driver_error() -> None:
    with pytest.raises(DriverError, match="vnt-fw-does-not-exist"):
        FirewallDriver(netns="vnt-fw-does-not-exist")


# --- element updates -----------------------------------------------------------------


def test_apply_elements_changes_exactly_those(driver: FirewallDriver) -> None:
    compiled = make_compiled(SAMPLE)
    driver.apply_full(compiled)
    add = {
        "allow4_ports": frozenset({(("203.0.113.11", "203.0.113.20", 6, 5432), "p_db")}),
        "allow6_ports_iv": frozenset({(("2001:db8:5::/48", "fd00:b1::20", 17, "5000-5999"), "p_web")}),
        "allow4_any": frozenset({(("192.0.2.9", "192.0.2.10"), "p_web")}),
    }
    delete = {
        "allow4_ports": frozenset({(("203.0.113.10", "203.0.113.20", 6, 5432), "p_db")}),
        "allow4_ports_iv": frozenset({(("0.0.0.0/0", "203.0.113.21", 17, 9000), "p_web")}),
    }
    assert driver.apply_elements(add, delete) == 5

    expected = {name: set(v) for name, v in compiled.elements.items()}
    for name, items in delete.items():
        expected[name] -= items
    for name, items in add.items():
        expected[name] |= items
    assert driver.observe().elements == {name: frozenset(v) for name, v in expected.items()}

    # a verdict change: delete and add the same key in one transaction
    key = ("198.51.100.7", "203.0.113.20", 6, 443)
    driver.apply_elements({"allow4_ports": frozenset({(key, "p_db")})}, {"allow4_ports": frozenset({(key, "p_web")})})
    assert (key, "p_db") in driver.observe().elements["allow4_ports"]
    assert driver.apply_elements({}, {}) == 0


def test_one_element_change_at_100k_touches_only_that_element(driver: FirewallDriver) -> None:
    """At 100,000 elements one add and one delete change exactly those (their time is printed, not asserted:
    integration/bench/bench_firewall.py measures it against the nft -f floor)."""
    count = 100_000
    big = frozenset(
        ((f"198.51.{i >> 8 & 255}.{i & 255}", f"203.0.113.{i >> 16}", 6, 1024 + i % 60000), "p_web")
        for i in range(count)
    )
    assert len(big) == count
    compiled = make_compiled({"allow4_ports": big})
    start = time.perf_counter()
    driver.apply_full(compiled)
    full_s = time.perf_counter() - start

    start = time.perf_counter()
    observed = driver.observe()
    observe_s = time.perf_counter() - start
    assert observed.elements == compiled.elements

    extra = (("192.0.2.1", "192.0.2.2", 6, 22), "p_db")
    victim = next(iter(big))
    start = time.perf_counter()
    driver.apply_elements({"allow4_ports": frozenset({extra})}, {})
    add_ms = (time.perf_counter() - start) * 1000
    start = time.perf_counter()
    driver.apply_elements({}, {"allow4_ports": frozenset({victim})})
    del_ms = (time.perf_counter() - start) * 1000

    elements = driver.observe().elements["allow4_ports"]
    assert extra in elements and victim not in elements and len(elements) == count
    print(f"\n100k hash elements: full load {full_s:.2f} s, observe {observe_s:.2f} s, "
          f"one add {add_ms:.2f} ms, one delete {del_ms:.2f} ms")


# --- rejected batches ---------------------------------------------------------------


def test_rejected_batches_leave_the_ruleset_untouched(host: str, driver: FirewallDriver) -> None:
    driver.apply_full(make_compiled(SAMPLE))
    nft(host, "add", "table", "ip", "bystander")
    before = ruleset(host)

    # an element whose verdict chain does not exist (the add of a valid one in the same batch is undone)
    good = (("192.0.2.1", "192.0.2.2", 6, 80), "p_web")
    bad = (("192.0.2.1", "192.0.2.3", 6, 80), "p_missing")
    with pytest.raises(DriverError) as info:
        driver.apply_elements({"allow4_ports": frozenset({good, bad})}, {})
    assert "No such file or directory" in str(info.value) and "(1 commands)" in str(info.value)
    assert ruleset(host) == before

    # deleting an element that is not there, after a valid delete
    present = (("203.0.113.10", "203.0.113.20", 6, 5432), "p_db")
    absent = (("203.0.113.99", "203.0.113.20", 6, 5432), "p_db")
    with pytest.raises(DriverError, match="No such file or directory"):
        driver.apply_elements({}, {"allow4_ports": frozenset({present, absent})})
    assert ruleset(host) == before

    # a whole new structure with a duplicate `create`: the old table stays as it was
    compiled = make_compiled({}, fingerprint="fp-bad")
    duplicate = obj("chain", name="p_web")
    duplicate = {"create": duplicate["add"]}
    broken = CompiledFirewall((*compiled.structure, duplicate), compiled.elements, compiled.fingerprint)
    with pytest.raises(DriverError, match="File exists") as info:
        driver.apply_full(broken)
    assert f"({len(broken.structure) + 4} commands)" in str(info.value)
    assert ruleset(host) == before

    # a full load whose elements jump to a chain it does not define
    missing = make_compiled({"allow4_ports": frozenset({bad})}, fingerprint="fp-bad")
    with pytest.raises(DriverError, match="No such file or directory"):
        driver.apply_full(missing)
    assert ruleset(host) == before
    assert driver.observe().fingerprint == "fp-one"


def test_bad_values_are_refused_before_nft(host: str, driver: FirewallDriver) -> None:
    driver.apply_full(make_compiled({}))
    before = ruleset(host)
    for part in ("db.example.com", "203.0.113.300", "fd00::/129", "203.0.113.0/xx"):
        with pytest.raises(DriverError, match="bad"):
            driver.apply_elements({"allow4_any": frozenset({((part, "203.0.113.1"), "p_web")})}, {})
    with pytest.raises(DriverError, match="outside"):
        driver.apply_elements({"segment_bridges": frozenset({(("vnbr9",), "")})}, {})
    foreign = make_compiled({})
    other = {"add": {"chain": {"family": "inet", "table": "other", "name": "x"}}}
    with pytest.raises(DriverError, match="outside table"):
        driver.apply_full(CompiledFirewall((*foreign.structure, other), foreign.elements, foreign.fingerprint))
    assert ruleset(host) == before


# --- other tables --------------------------------------------------------------------

OTHER_TABLES = """
table inet other {
    map allow4_ports { type ipv4_addr . ipv4_addr . inet_proto . inet_service : verdict; }
    chain forward { type filter hook forward priority 10; policy drop;
        ct state established accept
        iifname "eth9" counter accept
    }
}
table ip filterish {
    set blocked { type ipv4_addr; flags interval; elements = { 192.0.2.0/28, 198.51.100.9 } }
    chain input { type filter hook input priority 0; policy accept; ip saddr @blocked drop; }
}
"""


def test_other_tables_are_untouched(host: str, driver: FirewallDriver) -> None:
    nft(host, "-f", "-", stdin=OTHER_TABLES)
    others = [("inet", "other"), ("ip", "filterish")]
    before = {t: table_json(host, *t) for t in others}

    driver.apply_full(make_compiled(SAMPLE))
    assert {t: table_json(host, *t) for t in others} == before
    assert "allow4_ports" not in str(driver.counters())
    assert driver.observe().elements["allow4_ports"] == SAMPLE["allow4_ports"]  # ours, not inet other's

    driver.apply_elements({"allow4_ports": frozenset({(("192.0.2.1", "192.0.2.2", 6, 80), "p_web")})},
                          {"allow4_ports": frozenset({(("198.51.100.7", "203.0.113.20", 6, 443), "p_web")})})
    driver.apply_full(make_compiled({}, fingerprint="fp-two"))
    assert {t: table_json(host, *t) for t in others} == before

    driver.remove()
    driver.remove()  # idempotent
    assert driver.observe() == ObservedFirewall(present=False, fingerprint=None, elements={})
    assert driver.counters() == {}
    assert {t: table_json(host, *t) for t in others} == before
    names = {(o["table"]["family"], o["table"]["name"]) for o in nft_json(host, "list", "tables") if "table" in o}
    assert names == set(others)


# --- counters and legacy iptables ------------------------------------------------------


def test_counters_match_nft(host: str, driver: FirewallDriver) -> None:
    assert driver.counters() == {}
    driver.apply_full(make_compiled(SAMPLE))
    counters = driver.counters()
    assert counters == {"invalid": (0, 0), "default_drop": (0, 0), "p_web": (0, 0), "p_db": (0, 0),
                        "p_ping": (0, 0)}
    nft(host, "add", "counter", "inet", "veilnet", "extra", "{", "packets", "7", "bytes", "900", "}")
    listed = {
        o["counter"]["name"]: (o["counter"]["packets"], o["counter"]["bytes"])
        for o in nft_json(host, "list", "counters", "table", "inet", "veilnet") if "counter" in o
    }
    assert driver.counters() == listed
    assert listed["extra"] == (7, 900)


def test_legacy_iptables_rule_count(driver: FirewallDriver) -> None:
    count = driver.legacy_iptables_rule_count()
    assert isinstance(count, int) and count >= 0
    if not any(shutil.which(t) for t in ("iptables-legacy-save", "ip6tables-legacy-save")):
        assert count == 0


# --- real traffic through a br_netfilter bridge ---------------------------------------------

EP1, EP2 = "203.0.113.10", "203.0.113.20"


@contextmanager
def tcp_servers(ns: str, address: str, ports: tuple[int, ...]) -> Iterator[None]:
    """Listening sockets in ``ns`` that accept and close connections, in threads."""
    with netlink.netns_entered(ns):
        socks = [socket.create_server((address, port)) for port in ports]
    stop = threading.Event()

    def serve(sock: socket.socket) -> None:
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.close()

    threads = [threading.Thread(target=serve, args=(s,), daemon=True) for s in socks]
    for t in threads:
        t.start()
    try:
        yield
    finally:
        stop.set()
        for t in threads:
            t.join(2)
        for s in socks:
            s.close()


def tcp_connects(ns: str, address: str, port: int, timeout: float = 1.0) -> bool:
    with netlink.netns_entered(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect((address, port))
        return True
    except OSError:
        return False
    finally:
        sock.close()


def pings(ns: str, address: str) -> bool:
    done = subprocess.run(["ip", "netns", "exec", ns, "ping", "-c", "1", "-W", "1", address],
                          capture_output=True, check=False)
    return done.returncode == 0


@pytest.fixture
def bridged(make_ns: Callable[[], str]) -> tuple[str, str, str]:
    """A host namespace with a br_netfilter bridge and two endpoint namespaces on it.

    IPv6 is off in the endpoints: their MLD reports (76 bytes, flooded by the
    bridge) would otherwise reach default_drop at random moments.
    """
    host, ep1, ep2 = make_ns(), make_ns(), make_ns()
    for ns in (ep1, ep2):
        sh("ip", "netns", "exec", ns, "sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1",
           "net.ipv6.conf.default.disable_ipv6=1")
    sh("ip", "-n", host, "link", "add", BRIDGE, "type", "bridge", "nf_call_iptables", "1", "nf_call_ip6tables", "1")
    sh("ip", "-n", host, "link", "set", BRIDGE, "up")
    for index, (ns, address) in enumerate(((ep1, EP1), (ep2, EP2))):
        port = f"vnfwt{index}"
        sh("ip", "-n", host, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "-n", host, "link", "set", port, "master", BRIDGE, "up")
        sh("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    return host, ep1, ep2


def test_real_traffic_is_filtered(bridged: tuple[str, str, str]) -> None:
    host, ep1, ep2 = bridged
    assert pings(ep1, EP2)  # no firewall yet: the bridge forwards
    elements = {
        "allow4_ports": frozenset({((EP1, EP2, 6, 8080), "p_web")}),
        "allow4_proto": frozenset({((EP1, EP2, 1), "p_ping")}),
    }
    with FirewallDriver(netns=host) as driver, tcp_servers(ep2, EP2, (8080, 8081)):
        driver.apply_full(make_compiled(elements))
        zero = driver.counters()
        assert zero["p_web"] == zero["p_ping"] == zero["default_drop"] == (0, 0)

        assert tcp_connects(ep1, EP2, 8080)
        after_web = driver.counters()
        assert after_web["p_web"][0] >= 1  # the SYN went through the policy chain
        assert after_web["default_drop"] == (0, 0)  # the replies matched ct established

        assert not tcp_connects(ep1, EP2, 8081, timeout=0.5)
        after_drop = driver.counters()
        assert after_drop["default_drop"][0] >= 1
        assert after_drop["p_web"] == after_web["p_web"]

        assert pings(ep1, EP2)
        assert driver.counters()["p_ping"][0] >= 1
        dropped = driver.counters()["default_drop"][0]
        assert not pings(ep2, EP1)  # only ep1 -> ep2 is allowed
        assert driver.counters()["default_drop"][0] > dropped

        # an element update opens 8081 without touching the established state
        driver.apply_elements({"allow4_ports": frozenset({((EP1, EP2, 6, 8081), "p_web")})}, {})
        assert tcp_connects(ep1, EP2, 8081)
        driver.apply_elements({}, {"allow4_ports": frozenset({((EP1, EP2, 6, 8081), "p_web")})})
        assert not tcp_connects(ep1, EP2, 8081, timeout=0.5)

        driver.remove()
        assert tcp_connects(ep1, EP2, 8081)  # table gone: forwarding is open again


# --- tables in states the agent never leaves them in --------------------------------



def test_a_table_held_by_another_process_is_refused_without_listing_it(host: str, driver: FirewallDriver) -> None:
    """nft 1.0.6 prints an ``owner`` table's flags as JSON by reading past an array: garbage, invalid JSON, or a
    heap corruption that killed the agent in a fail-closed test. The driver reads the flags over netlink and
    refuses to list such a table, naming the holder; many observes in a row leave the process alive."""
    taker = subprocess.Popen(["ip", "netns", "exec", host, sys.executable, "-c", TABLE_HOLDER], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert taker.stdout is not None
        assert taker.stdout.readline().strip() == "holding", taker.stderr.read() if taker.stderr else ""
        assert "flags owner" in nft(host, "list", "table", "inet", "veilnet")  # positive control: it is held
        for _ in range(300):
            with pytest.raises(DriverError, match=r"table inet veilnet is held by another process \(flags owner"):
                driver.observe()
        with pytest.raises(DriverError, match="rejected"):  # and it cannot be replaced while held
            driver.apply_full(make_compiled(SAMPLE))
    finally:
        if taker.stdin is not None:
            taker.stdin.close()
        taker.wait(10)
    # the holder is gone, and its table with it: ours loads and reads back
    assert driver.observe() == ObservedFirewall(present=False, fingerprint=None, elements={})
    driver.apply_full(make_compiled(SAMPLE))
    assert driver.observe().fingerprint == "fp-one"


def test_a_dormant_table_is_not_taken_for_ours(host: str, driver: FirewallDriver) -> None:
    """Someone switches our table off (``flags dormant``: it stays, enforcing nothing): observe reports no
    fingerprint, so the manager replaces it whole, and the replacement is active again."""
    driver.apply_full(make_compiled(SAMPLE))
    assert driver.observe().fingerprint == "fp-one"  # positive control
    nft(host, "add", "table", "inet", "veilnet", "{", "flags", "dormant", ";", "}")
    assert "flags dormant" in nft(host, "list", "table", "inet", "veilnet")
    observed = driver.observe()
    assert observed.present and observed.fingerprint is None
    driver.apply_full(make_compiled(SAMPLE))
    assert "dormant" not in nft(host, "list", "table", "inet", "veilnet")
    assert driver.observe().fingerprint == "fp-one"


_WITHOUT_PROTOCOLS = """
import json, sys
from veilnet_agent.core.firewall_compiler import compile_firewall
from veilnet_agent.core.model import parse_node_state
from veilnet_agent.drivers.firewall import FirewallDriver
compiled = compile_firewall(parse_node_state(json.loads(sys.argv[2])))
with FirewallDriver(netns=sys.argv[1]) as driver:
    driver.apply_full(compiled)
    observed = driver.observe()
print(json.dumps([observed.fingerprint == compiled.fingerprint, observed.elements == compiled.elements]))
"""


@pytest.mark.parametrize("encryption", ["wireguard", "ipsec"])
def test_the_table_loads_on_a_system_without_etc_protocols(host: str, encryption: str) -> None:
    """nft resolves protocol *names* through /etc/protocols, which minimal systems and container images lack
    (Debian's netbase): the booted-system install test on a debootstrap minbase found every full load refused
    ("Could not resolve protocol name"). Every protocol the compiler emits is a number, so it loads without it."""
    import copy

    raw = copy.deepcopy(_REAL_STATE)
    raw["encryption"] = encryption
    script = ("mount --bind /dev/null /etc/protocols && getent protocols udp >/dev/null && exit 99; "
              f'exec {shlex.quote(sys.executable)} -c "$0" "$1" "$2"')
    done = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script, _WITHOUT_PROTOCOLS,
                           host, json.dumps(raw)], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, f"exit {done.returncode} (99: /etc/protocols still readable)\n{done.stderr}"
    assert json.loads(done.stdout) == [True, True], done.stdout
