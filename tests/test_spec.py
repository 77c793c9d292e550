"""The controller's network spec: every validation rule names its field, plus diffs and attached endpoints."""

from __future__ import annotations

import copy
import ipaddress
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from veilnet_agent.core.errors import ValidationError
from veilnet_controller import spec as spec_module
from veilnet_controller.spec import (
    AttachedClaims,
    EndpointSpec,
    NetworkSpec,
    canonical_text,
    load_spec_text,
    parse_attached_endpoint,
    parse_spec,
    parse_spec_text,
    summarize_changes,
    unified_diff,
    validate_attached_endpoints,
)

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "network.yaml"
EXAMPLE_TEXT = EXAMPLE.read_text()
BASE: dict[str, Any] = load_spec_text(EXAMPLE_TEXT)  # type: ignore[assignment]


def base() -> dict[str, Any]:
    return copy.deepcopy(BASE)


def ep(name: str, node: str = "host-a", segment: str = "blue", **fields: Any) -> dict[str, Any]:
    """A valid extra endpoint (blue, an address no example endpoint uses) with fields overridden."""
    raw: dict[str, Any] = {
        "name": name, "node": node, "segment": segment, "mac": "02:00:00:ff:00:01",
        "ipv4": "203.0.113.50", "netns": name,
    }
    if segment == "green":
        raw["ipv4"] = "203.0.113.100"
    raw.update(fields)
    return {k: val for k, val in raw.items() if val is not None}


def rejects(raw: object, field: str, reason: str) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        parse_spec(raw)
    assert info.value.field == field, str(info.value)
    assert reason in info.value.reason, str(info.value)
    return info.value


# --------------------------------------------------------------------------- the example


def test_example_parses() -> None:
    spec = parse_spec_text(EXAMPLE_TEXT)
    assert spec.encryption == "wireguard"
    assert [s.name for s in spec.segments] == ["blue", "green"]
    assert [n.name for n in spec.nodes] == ["host-a", "host-b", "host-c"]
    assert spec.nodes[2].segments == ("blue",)
    assert spec.nodes[0].underlay_port == 51820 and spec.nodes[1].keepalive == 0
    assert spec.nodes[0].labels == (("zone", "a"),)
    assert [e.name for e in spec.endpoints] == ["a-web", "a-db", "b-web", "b-db", "c-web"]
    a_web = spec.endpoints[0]
    assert (a_web.node, a_web.netns, a_web.ifname, a_web.labels) == ("host-a", "a-web", "eth0", (("app", "web"),))
    assert str(a_web.ipv4) == "203.0.113.10" and str(a_web.ipv6) == "fd00:b1::10"
    assert spec.endpoints[1].ipv6 is None
    assert [p.name for p in spec.policies] == ["web-to-api", "blue-icmp", "blue-icmpv6"]
    assert spec.raw == BASE and spec.raw is not BASE
    assert spec.node("host-b").name == "host-b" and spec.segment("green").vni == 200


def test_defaults_and_optional_sections() -> None:
    raw = base()
    del raw["encryption"]
    node = raw["nodes"][1]
    del node["underlay_port"]
    node.pop("keepalive", None)
    del node["labels"]
    raw["endpoints"][0].pop("ifname")
    spec = parse_spec(raw)
    assert spec.encryption == "wireguard"
    assert (spec.nodes[1].underlay_port, spec.nodes[1].keepalive, spec.nodes[1].labels) == (51820, 0, ())
    assert spec.endpoints[0].ifname == "eth0"
    empty = parse_spec({})
    assert (empty.segments, empty.nodes, empty.endpoints, empty.policies) == ((), (), (), ())
    assert parse_spec({"segments": None, "nodes": [], "endpoints": None, "policies": None}).nodes == ()


def test_same_underlay_address_on_another_port_is_fine() -> None:
    raw = base()
    raw["nodes"][1]["underlay_address"] = "192.0.2.11"
    raw["nodes"][1]["underlay_port"] = 51821
    assert parse_spec(raw).nodes[1].underlay_port == 51821


def test_same_mac_in_another_segment_and_same_netns_elsewhere_are_fine() -> None:
    raw = base()
    raw["endpoints"].append(ep("x1", segment="green", mac="02:00:00:0a:00:01"))  # a-web's MAC, but in green
    raw["endpoints"].append(ep("x2", node="host-b", netns="a-web"))  # a-web's netns, but on host-b
    raw["endpoints"].append(ep("x3", netns="a-web", ifname="eth1", mac="02:00:00:ff:00:03", ipv4="203.0.113.51"))
    assert len(parse_spec(raw).endpoints) == 8


# --------------------------------------------------------------------------- every rule

Mutation = Callable[[dict[str, Any]], object]

CASES: list[tuple[str, Mutation, str, str]] = [
    # top level
    ("unknown top-level key", lambda r: r.update(hosts=[]), "hosts", "unknown key"),
    ("unknown encryption", lambda r: r.update(encryption="none"), "encryption", "must be one of wireguard, ipsec"),
    ("segments not a list", lambda r: r.update(segments={"blue": 1}), "segments", "must be a list"),
    # segments (the agent's schema)
    ("segment unknown key", lambda r: r["segments"][0].update(color="x"), "segments[0].color", "unknown key"),
    ("segment bad vni", lambda r: r["segments"][1].update(vni=0), "segments[1].vni", "must be in 1..16777215"),
    ("segment gateway outside", lambda r: r["segments"][1].update(ipv4_gateway="203.0.113.1"),
     "segments[1].ipv4_gateway", "outside the subnet"),
    ("duplicate segment name", lambda r: r["segments"][1].update(name="blue"), "segments[1].name",
     "duplicate segment name, also at segments[0].name"),
    ("duplicate VNI", lambda r: r["segments"][1].update(vni=100), "segments[1].vni", "duplicate VNI"),
    ("overlapping subnets", lambda r: r["segments"][1].update(ipv4_subnet="203.0.113.0/25",
                                                              ipv4_gateway="203.0.113.100"),
     "segments[1].ipv4_subnet", "overlaps 203.0.113.0/26 at segments[0].ipv4_subnet"),
    ("overlapping ipv6 subnets", lambda r: r["segments"][1].update(ipv6_subnet="fd00:b1::/48",
                                                                   ipv6_gateway="fd00:b1:0:1::1"),
     "segments[1].ipv6_subnet", "overlaps fd00:b1::/64 at segments[0].ipv6_subnet"),
    ("subnet overlaps transport", lambda r: r["segments"][1].update(ipv4_subnet="198.51.100.64/26",
                                                                    ipv4_gateway="198.51.100.65"),
     "segments[1].ipv4_subnet", "overlaps 198.51.100.0/24 at nodes[0].transport_address"),
    # nodes
    ("node unknown key", lambda r: r["nodes"][0].update(color="x"), "nodes[0].color", "unknown key"),
    ("node missing underlay", lambda r: r["nodes"][0].pop("underlay_address"), "nodes[0].underlay_address",
     "is required"),
    ("node bad name", lambda r: r["nodes"][0].update(name="Host_A"), "nodes[0].name", "lowercase"),
    ("node bad port", lambda r: r["nodes"][0].update(underlay_port=0), "nodes[0].underlay_port", "1..65535"),
    ("node bad keepalive", lambda r: r["nodes"][0].update(keepalive=-1), "nodes[0].keepalive", "0..65535"),
    ("transport without prefix", lambda r: r["nodes"][0].update(transport_address="198.51.100.11"),
     "nodes[0].transport_address", "prefix length"),
    ("duplicate node name", lambda r: r["nodes"][2].update(name="host-a"), "nodes[2].name",
     "duplicate node name, also at nodes[0].name"),
    ("duplicate underlay", lambda r: r["nodes"][1].update(underlay_address="192.0.2.11"),
     "nodes[1].underlay_address", "duplicate underlay address and port 51820, also at nodes[0]"),
    ("duplicate transport", lambda r: r["nodes"][2].update(transport_address="198.51.100.12/24"),
     "nodes[2].transport_address", "duplicate transport address, also at nodes[1]"),
    ("transport in another network", lambda r: r["nodes"][1].update(transport_address="198.51.101.12/24"),
     "nodes[1].transport_address", "must be in the transport network 198.51.100.0/24 of nodes[0]"),
    ("transport with another prefix", lambda r: r["nodes"][1].update(transport_address="198.51.100.12/25"),
     "nodes[1].transport_address", "same prefix length"),
    ("transport is the broadcast", lambda r: r["nodes"][1].update(transport_address="198.51.100.255/24"),
     "nodes[1].transport_address", "network or broadcast"),
    ("node names unknown segment", lambda r: r["nodes"][0].update(segments=["blue", "red"]),
     "nodes[0].segments[1]", "names no segment of the spec"),
    ("node lists a segment twice", lambda r: r["nodes"][2].update(segments=["blue", "blue"]),
     "nodes[2].segments[1]", "listed twice, also at nodes[2].segments[0]"),
    ("node segments not a list", lambda r: r["nodes"][2].update(segments="blue"), "nodes[2].segments",
     "must be a list"),
    ("node bad label", lambda r: r["nodes"][0].update(labels={"zone": "a b"}), "nodes[0].labels.zone",
     "must be 1-63"),
    ("node label key too long", lambda r: r["nodes"][0].update(labels={"k" * 59: "x"}),
     f"nodes[0].labels.{'k' * 59}", "node label keys are at most 58 characters"),
    # endpoints
    ("endpoint unknown key", lambda r: r["endpoints"][0].update(vlan=3), "endpoints[0].vlan", "unknown key"),
    ("endpoint missing node", lambda r: r["endpoints"][0].pop("node"), "endpoints[0].node", "is required"),
    ("endpoint unknown node", lambda r: r["endpoints"][0].update(node="host-z"), "endpoints[0].node",
     "names no node of the spec"),
    ("endpoint unknown segment", lambda r: r["endpoints"][0].update(segment="red"), "endpoints[0].segment",
     "names no segment of the spec"),
    ("endpoint segment not carried", lambda r: r["endpoints"].append(ep("x", node="host-c", segment="green")),
     "endpoints[5].segment", "node host-c does not carry this segment"),
    ("endpoint bad mac", lambda r: r["endpoints"][0].update(mac="01:00:00:00:00:01"), "endpoints[0].mac",
     "unicast"),
    ("endpoint ipv4 outside", lambda r: r["endpoints"][0].update(ipv4="203.0.113.70"), "endpoints[0].ipv4",
     "is outside the subnet 203.0.113.0/26"),
    ("endpoint ipv6 outside", lambda r: r["endpoints"][0].update(ipv6="fd00:b2::10"), "endpoints[0].ipv6",
     "is outside the subnet fd00:b1::/64"),
    ("endpoint ipv4 is the network", lambda r: r["endpoints"][0].update(ipv4="203.0.113.0"), "endpoints[0].ipv4",
     "network or broadcast address of 203.0.113.0/26"),
    ("endpoint ipv4 is the broadcast", lambda r: r["endpoints"][1].update(ipv4="203.0.113.127"),
     "endpoints[1].ipv4", "network or broadcast"),
    ("endpoint ipv4 is the gateway", lambda r: r["endpoints"][0].update(ipv4="203.0.113.1"), "endpoints[0].ipv4",
     "is already used by the gateway of segment blue"),
    ("endpoint ipv6 is the gateway", lambda r: r["endpoints"][0].update(ipv6="fd00:b1::1"), "endpoints[0].ipv6",
     "is already used by the gateway of segment blue"),
    ("endpoint mac is the gateway's", lambda r: r["endpoints"][1].update(mac="02:56:4e:00:00:c8"),
     "endpoints[1].mac", "is already used by the gateway of segment green"),
    ("ipv6 in an IPv4-only segment", lambda r: r["endpoints"][1].update(ipv6="fd00:b1::99"), "endpoints[1].ipv6",
     "segment green has no IPv6 subnet"),
    ("ipv4 key with an IPv6 address", lambda r: r["endpoints"][0].update(ipv4="fd00:b1::99"), "endpoints[0].ipv4",
     "must be an IPv4 address"),
    ("endpoint without addresses", lambda r: r["endpoints"].append(ep("x", ipv4=None)), "endpoints[5].ipv4",
     "needs an IPv4 or IPv6 address"),
    ("duplicate endpoint name", lambda r: r["endpoints"].append(ep("b-db")), "endpoints[5].name",
     "duplicate endpoint name, also at endpoints[3].name"),
    ("duplicate mac in a segment", lambda r: r["endpoints"].append(ep("x", node="host-c", mac="02:00:00:0a:00:01")),
     "endpoints[5].mac", "is already used by endpoints[0].mac"),
    ("duplicate mac, other case", lambda r: r["endpoints"].append(ep("x", mac="02:00:00:0A:00:01")),
     "endpoints[5].mac", "is already used by endpoints[0].mac"),
    ("duplicate ipv4 in a segment", lambda r: r["endpoints"].append(ep("x", node="host-b", ipv4="203.0.113.30")),
     "endpoints[5].ipv4", "is already used by endpoints[4].ipv4"),
    ("duplicate ipv6 in a segment", lambda r: r["endpoints"].append(ep("x", ipv6="fd00:b1:0::20")),
     "endpoints[5].ipv6", "is already used by endpoints[2].ipv6"),
    ("duplicate netns and ifname on a node", lambda r: r["endpoints"].append(ep("x", netns="a-db")),
     "endpoints[5].netns", "namespace a-db and interface eth0 on node host-a also at endpoints[1].netns"),
    ("endpoint bad netns", lambda r: r["endpoints"][0].update(netns="a/b"), "endpoints[0].netns", "namespace"),
    ("endpoint bad ifname", lambda r: r["endpoints"][0].update(ifname="x" * 16), "endpoints[0].ifname",
     "at most 15"),
    ("endpoint reserved label", lambda r: r["endpoints"][0].update(labels={"app": "web", "node.zone": "b"}),
     "endpoints[0].labels.node.zone", "reserved for the labels of the endpoint's node"),
    ("endpoint too many labels with the node's",
     lambda r: r["endpoints"][0].update(labels={f"k{i}": "v" for i in range(64)}),
     "endpoints[0].labels", "with the 1 labels of node host-a (as node.<key>) more than 64 labels"),
    # policies (the agent's schema)
    ("policy unknown segment", lambda r: r["policies"][0]["source"].update(segment="red"),
     "policies[0].source.segment", "names no segment"),
    ("policy ports without tcp", lambda r: r["policies"][1].update(ports=[80]), "policies[1].ports",
     "ports need protocol tcp or udp"),
    ("duplicate policy name", lambda r: r["policies"][1].update(name="web-to-api"), "policies[1].name",
     "duplicate policy name, also at policies[0]"),
]


@pytest.mark.parametrize(("mutate", "field", "reason"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_rule(mutate: Mutation, field: str, reason: str) -> None:
    raw = base()
    mutate(raw)
    rejects(raw, field, reason)


def test_root_must_be_a_mapping() -> None:
    rejects([1, 2], "<root>", "must be a mapping")


def test_policies_may_select_node_labels() -> None:
    raw = base()
    raw["policies"].append({"name": "zone-a", "source": {"match_labels": {"node.zone": "a"}},
                            "destination": {"segment": "blue"}, "protocol": "icmp"})
    assert parse_spec(raw).policies[-1].source.match_labels == (("node.zone", "a"),)


@pytest.mark.parametrize(("key", "limit"), [("nodes", 10_000), ("endpoints", 100_000), ("policies", 10_000),
                                            ("segments", 10_000)])
def test_limits(key: str, limit: int) -> None:
    raw = base()
    raw[key] = [{}] * (limit + 1)  # counted before any item is read
    rejects(raw, key, f"at most {limit} {key}")


# --------------------------------------------------------------------------- loading text


def test_invalid_yaml() -> None:
    with pytest.raises(ValidationError) as info:
        load_spec_text("nodes: [\n")
    assert info.value.field == "spec" and "not valid YAML" in info.value.reason


def test_duplicate_yaml_keys_are_rejected() -> None:
    with pytest.raises(ValidationError) as info:
        load_spec_text("nodes: []\nnodes: []\n")
    assert info.value.field == "spec" and "duplicate key 'nodes'" in info.value.reason
    assert load_spec_text("base: &b {x: 1}\nother:\n  <<: *b\n  y: 2\n") == {"base": {"x": 1},
                                                                                "other": {"x": 1, "y": 2}}


def test_size_limit() -> None:
    with pytest.raises(ValidationError) as info:
        load_spec_text("#" * (spec_module.MAX_SPEC_BYTES + 1))
    assert info.value.field == "spec" and "larger than" in info.value.reason
    with pytest.raises(ValidationError):
        load_spec_text("# " + "é" * (spec_module.MAX_SPEC_BYTES // 2))  # counted in bytes


def test_alias_bomb_is_refused() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    with pytest.raises(ValidationError) as info:
        load_spec_text("\n".join(lines))
    assert info.value.field == "spec" and "aliases expand" in info.value.reason


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, "- " * 100_000 + "x", "a:\n" + "- " * 70 + "x"])
def test_deep_nesting_is_refused(text: str) -> None:
    with pytest.raises(ValidationError) as info:
        load_spec_text(text)
    assert info.value.field == "spec" and "nested deeper than 64 levels" in info.value.reason


def test_json_text() -> None:
    spec = parse_spec(BASE)
    assert parse_spec_text(json.dumps(BASE)) == spec
    assert load_spec_text('{a: 1, "b": [x]}') == {"a": 1, "b": ["x"]}, "YAML flow style is not JSON"
    with pytest.raises(ValidationError) as info:
        load_spec_text('{"nodes": [], "nodes": []}')
    assert info.value.field == "spec" and "duplicate key 'nodes'" in info.value.reason
    with pytest.raises(ValidationError) as info:
        load_spec_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert info.value.field == "spec" and "nested too deeply" in info.value.reason


def test_yaml_errors_surface_through_parse_spec_text() -> None:
    with pytest.raises(ValidationError) as info:
        parse_spec_text("encryption: aes\n")
    assert info.value.field == "encryption"


# --------------------------------------------------------------------------- diffs and summaries


def test_canonical_text_ignores_comments_order_and_style() -> None:
    reformatted = "# another comment\n" + canonical_text(BASE).replace("\n", "  # note\n")
    assert canonical_text(load_spec_text(reformatted)) == canonical_text(load_spec_text(EXAMPLE_TEXT))
    reordered = dict(reversed(list(BASE.items())))
    assert canonical_text(reordered) == canonical_text(BASE)
    assert canonical_text(parse_spec(BASE).raw) == canonical_text(BASE)
    assert load_spec_text(canonical_text(BASE)) == BASE, "canonical text loads back to the same spec"


def test_unified_diff() -> None:
    old = canonical_text(BASE)
    assert unified_diff(old, old, "current", "new") == ""
    raw = base()
    raw["nodes"][0]["keepalive"] = 25
    diff = unified_diff(old, canonical_text(raw), "current", "new")
    assert diff.startswith("--- current\n+++ new\n")
    assert "\n-- keepalive: 0\n+- keepalive: 25\n" in diff
    assert unified_diff("a", "b", "x", "y").endswith("+b\n")


def test_summarize_changes() -> None:
    old = parse_spec(BASE)
    assert summarize_changes(old, parse_spec(base())) == {}
    assert summarize_changes(None, old)["nodes"] == {"added": ["host-a", "host-b", "host-c"]}
    raw = base()
    raw["segments"][1]["mode"] = "default-deny"
    raw["nodes"][0]["keepalive"] = 25
    raw["endpoints"] = [e for e in raw["endpoints"] if e["name"] != "b-db"]
    raw["endpoints"].append(ep("a-new"))
    raw["policies"][0]["ports"] = [8080, 8443]
    raw["policies"].append({"name": "new-one", "source": {"segment": "green"}, "destination": {"segment": "green"}})
    del raw["policies"][1]
    assert summarize_changes(old, parse_spec(raw)) == {
        "segments": {"changed": ["green"]},
        "nodes": {"changed": ["host-a"]},
        "endpoints": {"added": ["a-new"], "removed": ["b-db"]},
        "policies": {"added": ["new-one"], "removed": ["blue-icmp"], "changed": ["web-to-api"]},
    }


def test_spec_equality_and_index_on_demand() -> None:
    one, two = parse_spec(BASE), parse_spec(base())
    assert one == two
    bare = NetworkSpec(one.encryption, one.segments, one.nodes, one.endpoints, one.policies, raw=one.raw)
    assert bare.node("host-c").segments == ("blue",)


# --------------------------------------------------------------------------- attached endpoints


def attached(name: str, segment: str = "blue", **fields: Any) -> dict[str, Any]:
    raw = ep(name, segment=segment, **fields)
    del raw["node"]
    return raw


def attach_rejects(node: str, raw: list[object], field: str, reason: str,
                   elsewhere: dict[str, list[EndpointSpec]] | None = None) -> None:
    with pytest.raises(ValidationError) as info:
        validate_attached_endpoints(parse_spec(BASE), node, raw, elsewhere or {})
    assert info.value.field == field, str(info.value)
    assert reason in info.value.reason, str(info.value)


def test_attached_endpoints_valid() -> None:
    spec = parse_spec(BASE)
    got = validate_attached_endpoints(
        spec, "host-c",
        [attached("c-new", labels={"app": "web"}),
         attached("c-new6", ipv4=None, ipv6="fd00:b1::99", mac="02:00:00:ff:00:02", ifname="eth1", netns="c-new")],
        {},
    )
    assert [(e.name, e.node, e.segment) for e in got] == [("c-new", "host-c", "blue"), ("c-new6", "host-c", "blue")]
    assert got[0].labels == (("app", "web"),) and str(got[1].ipv6) == "fd00:b1::99"
    # Its own earlier attachments (listed under its name in attached_elsewhere) are replaced, not conflicts.
    assert validate_attached_endpoints(spec, "host-c", [attached("c-new", labels={"app": "web"})],
                                       {"host-c": list(got)}) == got[:1]


ELSEWHERE = {"host-b": [EndpointSpec("b-new", "host-b", "blue", "02:00:00:ee:00:01",
                                     ipaddress.IPv4Address("203.0.113.60"), None, "b-new")]}


@pytest.mark.parametrize(
    ("node", "raw", "field", "reason"),
    [
        ("host-z", [attached("x")], "node", "names no node of the spec"),
        ("host-c", [attached("x", segment="green")], "endpoints[0].segment", "node host-c does not carry"),
        ("host-c", [attached("x", segment="red")], "endpoints[0].segment", "names no segment"),
        ("host-c", [{**attached("x"), "node": "host-c"}], "endpoints[0].node", "unknown key"),
        ("host-c", [attached("a-web")], "endpoints[0].name",
         "duplicate endpoint name, also at the spec's endpoints[0]"),
        ("host-c", [attached("b-new")], "endpoints[0].name", "also at endpoint b-new attached on host-b"),
        ("host-c", [attached("x"), attached("x", mac="02:00:00:ff:00:09", ipv4="203.0.113.51")],
         "endpoints[1].name", "duplicate endpoint name, also at endpoints[0].name"),
        ("host-c", [attached("x", mac="02:00:00:0b:00:01")], "endpoints[0].mac",
         "is already used by the spec's endpoints[2].mac"),
        ("host-c", [attached("x", mac="02:00:00:ee:00:01")], "endpoints[0].mac",
         "is already used by endpoint b-new attached on host-b"),
        ("host-c", [attached("x", ipv4="203.0.113.60")], "endpoints[0].ipv4",
         "is already used by endpoint b-new attached on host-b"),
        ("host-c", [attached("x", ipv4="203.0.113.20")], "endpoints[0].ipv4", "the spec's endpoints[2].ipv4"),
        ("host-c", [attached("x", ipv4="203.0.113.1")], "endpoints[0].ipv4", "the gateway of segment blue"),
        ("host-c", [attached("x", ipv4="203.0.113.63")], "endpoints[0].ipv4", "network or broadcast"),
        ("host-c", [attached("x", ipv4="203.0.113.64")], "endpoints[0].ipv4", "outside the subnet"),
        ("host-c", [attached("x", ipv4=None)], "endpoints[0].ipv4", "needs an IPv4 or IPv6 address"),
        ("host-c", [attached("x", netns="c-web")], "endpoints[0].netns", "also at the spec's endpoints[4].netns"),
        ("host-c", [attached("x"), attached("y", mac="02:00:00:ff:00:09", ipv4="203.0.113.51", netns="x")],
         "endpoints[1].netns", "also at endpoints[0].netns"),
        ("host-c", [attached("x", labels={"node.zone": "a"})], "endpoints[0].labels.node.zone", "reserved"),
        ("host-c", [{"name": "x"}], "endpoints[0].segment", "is required"),
        ("host-c", ["x"], "endpoints[0]", "must be a mapping"),
    ],
)
def test_attached_endpoint_rules(node: str, raw: list[object], field: str, reason: str) -> None:
    attach_rejects(node, raw, field, reason, ELSEWHERE)


def test_attached_endpoint_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spec_module, "MAX_ENDPOINTS", 6)
    attach_rejects("host-c", [attached("x"), attached("y")], "endpoints", "at most 6 endpoints in all")


def test_attached_claims_are_taken_and_given_back_one_endpoint_at_a_time() -> None:
    spec = parse_spec(BASE)
    index = spec.index
    assert index is not None
    spec_claims = dict(index.claims)
    table = AttachedClaims(spec)
    x = parse_attached_endpoint("host-c", attached("x", ipv6="fd00:b1::50"), "endpoints[0]")
    table.check(x, "endpoints[0]")
    table.claim(x, "endpoint x attached on host-c")
    assert table.count == 1 and index.claims == spec_claims  # the spec's own tables are not touched
    clashes = [
        (attached("x", mac="02:00:00:ff:00:09", ipv4="203.0.113.51", netns="other"), "endpoints[3].name",
         "duplicate endpoint name, also at endpoint x attached on host-c"),
        (attached("y", ipv4="203.0.113.51", netns="other"), "endpoints[3].mac",
         "is already used by endpoint x attached on host-c"),
        (attached("y", mac="02:00:00:ff:00:09", ipv4="203.0.113.51", ipv6="fd00:b1::50"), "endpoints[3].ipv6",
         "is already used by endpoint x attached on host-c"),
        (attached("y", mac="02:00:00:ff:00:09", ipv4="203.0.113.10"), "endpoints[3].ipv4",
         "is already used by the spec's endpoints[0].ipv4"),
        (attached("y", mac="02:00:00:ff:00:09", ipv4="203.0.113.51", netns="x"), "endpoints[3].netns",
         "also at endpoint x attached on host-c"),
    ]
    for raw, field, reason in clashes:
        other = parse_attached_endpoint("host-c", raw, "endpoints[3]")
        with pytest.raises(ValidationError) as info:
            table.check(other, "endpoints[3]")
        assert info.value.field == field and info.value.reason.endswith(reason), str(info.value)
    # the same namespace on another node is another slot
    table.check(parse_attached_endpoint("host-a", attached("y", mac="02:00:00:ff:00:09", ipv4="203.0.113.51",
                                                           netns="x"), "endpoints[0]"), "endpoints[0]")
    table.release(x)
    assert table.count == 0 and table.claims == spec_claims and table.names == index.endpoint_names
    for raw, _, _ in clashes[:3] + clashes[4:]:
        table.check(parse_attached_endpoint("host-c", raw, "endpoints[3]"), "endpoints[3]")
    assert table.knows("host-c") and not table.knows("host-z")


@pytest.mark.parametrize(
    ("raw", "field", "reason"),
    [
        (attached("x", labels={"node.zone": "a"}), "endpoints[0].labels.node.zone", "is reserved"),
        (attached("x", ipv4="fd00:b1::5"), "endpoints[0].ipv4", "must be an IPv4 address"),
        (attached("x", ipv4=None), "endpoints[0].ipv4", "needs an IPv4 or IPv6 address"),
        ({**attached("x"), "node": "host-c"}, "endpoints[0].node", "unknown key"),
    ],
)
def test_attached_endpoint_checks_that_need_no_spec(raw: dict[str, Any], field: str, reason: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse_attached_endpoint("host-c", raw, "endpoints[0]")
    assert info.value.field == field and reason in info.value.reason, str(info.value)


def test_attached_endpoint_checks_that_need_the_spec() -> None:
    table = AttachedClaims(parse_spec(BASE))
    cases = [
        (attached("x", segment="red"), "endpoints[0].segment", "names no segment of the spec"),
        (attached("x", ipv4="203.0.113.0"), "endpoints[0].ipv4", "is the network or broadcast address of"),
        (attached("x", ipv4="203.0.113.64"), "endpoints[0].ipv4", "is outside the subnet 203.0.113.0/26"),
        (attached("x", ipv4="203.0.113.65", segment="green"), "endpoints[0].segment", "does not carry"),
        (attached("x", ipv6="fd00:b1::1", ipv4=None), "endpoints[0].ipv6", "the gateway of segment blue"),
    ]
    for raw, field, reason in cases:
        e = parse_attached_endpoint("host-c", raw, "endpoints[0]")  # the format is fine
        with pytest.raises(ValidationError) as info:
            table.check(e, "endpoints[0]")
        assert info.value.field == field and reason in info.value.reason, str(info.value)
    green = AttachedClaims(parse_spec(BASE))
    e = parse_attached_endpoint("host-a", attached("x", segment="green", ipv6="fd00:b1::9"), "endpoints[0]")
    with pytest.raises(ValidationError, match="segment green has no IPv6 subnet"):
        green.check(e, "endpoints[0]")


@pytest.mark.parametrize(
    ("first", "second", "field", "reason"),
    [
        ("10.0.0.0/24", "10.0.0.0/16", "segments[1].ipv4_subnet", "overlaps 10.0.0.0/24 at segments[0].ipv4_subnet"),
        ("10.0.5.0/24", "10.0.0.0/16", "segments[1].ipv4_subnet", "overlaps 10.0.5.0/24 at segments[0].ipv4_subnet"),
        ("10.0.0.0/16", "10.0.5.0/24", "segments[1].ipv4_subnet", "overlaps 10.0.0.0/16 at segments[0].ipv4_subnet"),
    ],
)
def test_overlaps_without_nodes(first: str, second: str, field: str, reason: str) -> None:
    segments = [{"name": f"s{i}", "vni": i + 1, "ipv4_subnet": net,
                 "ipv4_gateway": str(ipaddress.ip_network(net).network_address + 1)}
                for i, net in enumerate((first, second))]
    rejects({"segments": segments}, field, reason)
    segments.append({"name": "s2", "vni": 3, "ipv4_subnet": "10.1.0.0/16", "ipv4_gateway": "10.1.0.1"})
    assert len(parse_spec({"segments": segments[1:]}).segments) == 2
