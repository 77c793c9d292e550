"""Policy validation and the pure nftables compiler."""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import pytest
from factories import v4_state
from hypothesis import given, settings
from hypothesis import strategies as st

from veilnet_agent.core.errors import ValidationError
from veilnet_agent.core.firewall_compiler import FINGERPRINT_PREFIX, allow_map_names, compile_firewall
from veilnet_agent.core.model import parse_node_state

IDENT = re.compile(r"^[a-z0-9_]+$")


def labelled_state() -> dict[str, Any]:
    raw = v4_state()
    raw["segments"][0]["mode"] = "default-deny"
    raw["endpoints"][0]["labels"] = {"app": "web"}          # a-web 203.0.113.10 blue (local)
    raw["endpoints"][1]["labels"] = {"app": "db"}           # a-db 203.0.113.70 green (local)
    peer_eps = raw["peers"][0]["endpoints"]
    peer_eps[0]["labels"] = {"app": "web", "tier": "front"}  # b-web 203.0.113.20 blue (remote)
    peer_eps[1]["labels"] = {"app": "db"}                   # b-db 203.0.113.80 green (remote)
    raw["policies"] = [
        {"name": "web-to-db", "source": {"segment": "blue", "match_labels": {"app": "web"}},
         "destination": {"segment": "green", "match_labels": {"app": "db"}}, "protocol": "tcp", "ports": [5432]},
    ]
    return raw


def compiled(raw: dict[str, Any]) -> Any:
    return compile_firewall(parse_node_state(raw))


def all_elements(fw: Any) -> dict[str, set[Any]]:
    """The allow maps' non-empty contents (the anti-spoofing sets are tested in test_firewall_guard)."""
    return {name: set(elems) for name, elems in fw.elements.items() if elems and name.startswith("allow")}


def test_tuples_touching_this_host_only() -> None:
    fw = compiled(labelled_state())
    assert all_elements(fw) == {
        "allow4_ports": {
            (("203.0.113.10", "203.0.113.70", 6, 5432), "p_web_to_db"),  # local -> local
            (("203.0.113.10", "203.0.113.80", 6, 5432), "p_web_to_db"),  # local -> remote
            (("203.0.113.20", "203.0.113.70", 6, 5432), "p_web_to_db"),  # remote -> local
            # remote b-web -> remote b-db never crosses this host: not compiled
        }
    }


def test_ports_ranges_protocols_and_cidrs_pick_the_right_maps() -> None:
    raw = labelled_state()
    raw["policies"] = [
        {"name": "narrow", "source": {"match_labels": {"app": "web"}}, "destination": {"match_labels": {"app": "db"}},
         "protocol": "udp", "ports": ["53-54"]},
        {"name": "wide", "source": {"match_labels": {"app": "web"}}, "destination": {"match_labels": {"app": "db"}},
         "protocol": "tcp", "ports": ["1024-65535"]},
        {"name": "admin", "source": {"cidr": "198.51.100.0/24"}, "destination": {"segment": "blue"},
         "protocol": "any"},
        {"name": "ping", "source": {"segment": "blue"}, "destination": {"segment": "blue"}, "protocol": "icmp"},
        {"name": "ping6", "source": {"segment": "blue"}, "destination": {"segment": "blue"}, "protocol": "icmpv6"},
        {"name": "all-tcp", "source": {"segment": "blue"}, "destination": {"segment": "green"}, "protocol": "tcp"},
    ]
    els = all_elements(compiled(raw))
    assert (("203.0.113.10", "203.0.113.70", 17, 53), "p_narrow") in els["allow4_ports"]
    assert (("203.0.113.10", "203.0.113.70", 17, 54), "p_narrow") in els["allow4_ports"]
    assert (("203.0.113.10", "203.0.113.70", 6, "1024-65535"), "p_wide") in els["allow4_ports_iv"]
    assert els["allow4_any_iv"] == {(("198.51.100.0/24", "203.0.113.10"), "p_admin")}
    assert (("203.0.113.20", "203.0.113.10", 1), "p_ping") in els["allow4_proto"]
    assert (("fd00:b1::14", "fd00:b1::a", 58), "p_ping6") in els["allow6_proto"]
    assert not any(k[2] == 1 for k, _ in els["allow6_proto"]), "icmp is IPv4 only"
    assert (("203.0.113.10", "203.0.113.70", 6), "p_all_tcp") in els["allow4_proto"]


def test_host_cidrs_are_exact_addresses() -> None:
    raw = labelled_state()
    raw["policies"] = [{"name": "one", "source": {"cidr": "198.51.100.7/32"}, "destination": {"segment": "blue"}}]
    els = all_elements(compiled(raw))
    assert els == {"allow4_any": {(("198.51.100.7", "203.0.113.10"), "p_one")}}


def test_first_policy_wins_a_shared_tuple() -> None:
    raw = labelled_state()
    raw["policies"].append({**raw["policies"][0], "name": "again"})
    els = all_elements(compiled(raw))
    assert {chain for _, chain in els["allow4_ports"]} == {"p_web_to_db"}


def test_label_change_changes_elements_not_structure() -> None:
    before = compiled(labelled_state())
    raw = labelled_state()
    raw["peers"][0]["endpoints"][0]["labels"] = {"app": "api"}
    after = compiled(raw)
    assert after.fingerprint == before.fingerprint
    assert after.structure == before.structure
    assert all_elements(after)["allow4_ports"] == all_elements(before)["allow4_ports"] - {
        (("203.0.113.20", "203.0.113.70", 6, 5432), "p_web_to_db")
    }


def test_structural_changes_change_the_fingerprint() -> None:
    base = compiled(labelled_state()).fingerprint
    raw = labelled_state()
    raw["segments"][1]["mode"] = "default-deny"
    assert compiled(raw).fingerprint != base
    raw = labelled_state()
    raw["policies"].append({"name": "more", "source": {"segment": "blue"}, "destination": {"segment": "blue"}})
    assert compiled(raw).fingerprint != base
    raw = labelled_state()
    raw["segments"][0]["rate_limit"] = {"new_connections_per_second": 10}
    assert compiled(raw).fingerprint != base


def _names(structure: Any) -> list[str]:
    names = []
    for cmd in structure:
        (kind, body), = cmd["add"].items()
        if kind != "table":
            names.append(body.get("name") or body["chain"])
    return names


def test_structure_is_self_consistent_and_carries_the_fingerprint() -> None:
    raw = labelled_state()
    raw["segments"][0]["rate_limit"] = {"new_connections_per_second": 10, "burst": 20, "icmp_per_second": 3}
    fw = compiled(raw)
    text = json.dumps(fw.structure)
    def objects(kind: str) -> set[tuple[str, str]]:
        return {(c["add"][kind]["family"], c["add"][kind]["name"]) for c in fw.structure if kind in c["add"]}

    chains, counters = objects("chain"), objects("counter")
    assert {("inet", c) for c in ("forward", "segments", "input", "to_host", "rate_drop_blue", "guard_drop",
                                  "from_peer", "peer_spoof")} <= chains
    assert {("bridge", c) for c in ("prerouting", "from_endpoint", "spoof")} <= chains
    assert {("inet", c) for c in ("p_web_to_db", "default_drop", "invalid", "cleartext_guard", "to_host_drop",
                                  "rate_blue", "peer_spoof_drop")} | {("bridge", "spoof_drop")} <= counters
    for cmd in fw.structure:
        rule = cmd["add"].get("rule")
        if rule:
            assert (rule["family"], rule["chain"]) in chains
            for expr in rule["expr"]:
                for verb in ("jump", "goto"):
                    if verb in expr:
                        assert (rule["family"], expr[verb]["target"]) in chains
                if "counter" in expr and isinstance(expr["counter"], str):
                    assert (rule["family"], expr["counter"]) in counters
    assert all(("inet", counter) in counters for els in all_elements(fw).values() for _, counter in els)
    assert f'"{FINGERPRINT_PREFIX}{fw.fingerprint}"' in text
    assert all(IDENT.match(n) for n in _names(fw.structure))
    assert set(allow_map_names()) <= set(_names(fw.structure))
    assert '"offset": 96' in text and "[100, 200]" in text, "cleartext guard scoped to our VNIs"


@pytest.mark.parametrize(
    ("path", "value", "field", "message"),
    [
        ("name", "x; flush ruleset", "policies[0].name", "lowercase"),
        ("name", 'web"; drop', "policies[0].name", "lowercase"),
        ("protocol", "gre", "policies[0].protocol", "tcp, udp"),
        ("ports", ["9000-8000"], "policies[0].ports[0]", "starts after"),
        ("ports", [0], "policies[0].ports[0]", "1..65535"),
        ("ports", ["80-x"], "policies[0].ports[0]", "range like"),
        ("ports", [70000], "policies[0].ports[0]", "1..65535"),
        ("source", {"cidr": "198.51.100.1/24"}, "policies[0].source.cidr", "no host bits"),
        ("source", {"cidr": "198.51.100.0/24", "segment": "blue"}, "policies[0].source.segment", "cannot be combined"),
        ("source", {"segment": "red"}, "policies[0].source.segment", "names no segment"),
        ("source", {}, "policies[0].source", "needs a segment"),
        ("source", {"match_labels": {"app": "web; drop"}}, "policies[0].source.match_labels.app", "letters"),
        ("source", {"match_expressions": [{"key": "app", "operator": "like", "values": ["x"]}]},
         "policies[0].source.match_expressions[0].operator", "in, notin"),
        ("source", {"match_expressions": [{"key": "app", "operator": "in", "values": []}]},
         "policies[0].source.match_expressions[0].values", "at least one"),
        ("destination", {"cidr": "fd00::/8"}, "policies[0].destination.cidr", "another address family"),
    ],
)
def test_bad_policies_are_rejected_naming_the_field(path: str, value: Any, field: str, message: str) -> None:
    raw = labelled_state()
    if path == "destination":
        raw["policies"][0]["source"] = {"cidr": "198.51.100.0/24"}
    raw["policies"][0][path] = value
    with pytest.raises(ValidationError) as info:
        parse_node_state(raw)
    assert info.value.field == field, info.value
    assert message in str(info.value)


def test_other_bad_inputs() -> None:
    raw = labelled_state()
    raw["policies"][0]["protocol"] = "icmp"
    with pytest.raises(ValidationError, match="ports need protocol tcp or udp"):
        parse_node_state(raw)
    raw = labelled_state()
    raw["policies"].append(copy.deepcopy(raw["policies"][0]))
    with pytest.raises(ValidationError, match="duplicate policy name"):
        parse_node_state(raw)
    raw = labelled_state()
    raw["segments"][0]["mode"] = "open"
    with pytest.raises(ValidationError, match="isolated, default-deny"):
        parse_node_state(raw)
    raw = labelled_state()
    raw["segments"][0]["rate_limit"] = {"new_connections_per_second": 0}
    with pytest.raises(ValidationError) as info:
        parse_node_state(raw)
    assert info.value.field == "segments[0].rate_limit.new_connections_per_second"
    raw = labelled_state()
    raw["endpoints"][0]["labels"] = {"bad key": "x"}
    with pytest.raises(ValidationError, match="letters"):
        parse_node_state(raw)


LABELS = st.dictionaries(st.sampled_from(["app", "tier", "env"]), st.sampled_from(["web", "db", "api", "prod"]),
                         max_size=3)


@settings(max_examples=60, deadline=None)
@given(st.lists(LABELS, min_size=4, max_size=4), LABELS, LABELS, st.sampled_from(["in", "notin"]),
       st.sampled_from(["web", "db"]))
def test_compiled_tuples_equal_a_brute_force_evaluation(
    labels: list[dict[str, str]], src: dict[str, str], dst: dict[str, str], op: str, value: str
) -> None:
    raw = labelled_state()
    raw["endpoints"][0]["labels"], raw["endpoints"][1]["labels"] = labels[0], labels[1]
    peer_eps = raw["peers"][0]["endpoints"]
    peer_eps[0]["labels"], peer_eps[1]["labels"] = labels[2], labels[3]
    raw["policies"] = [{
        "name": "p", "protocol": "tcp", "ports": [443],
        "source": {"match_labels": src} if src else {"segment": "blue"},
        "destination": {"match_labels": dst, "match_expressions": [{"key": "app", "operator": op, "values": [value]}]},
    }]
    # Reference: every (endpoint, labels, local) in the state, evaluated directly.
    members = [
        ("blue", labels[0], ["203.0.113.10", "fd00:b1::a"], True),
        ("green", labels[1], ["203.0.113.70"], True),
        ("blue", labels[2], ["203.0.113.20", "fd00:b1::14"], False),
        ("green", labels[3], ["203.0.113.80"], False),
    ]

    def src_ok(seg: str, lab: dict[str, str]) -> bool:
        return all(lab.get(k) == v for k, v in src.items()) if src else seg == "blue"

    def dst_ok(lab: dict[str, str]) -> bool:
        inside = lab.get("app") == value
        return all(lab.get(k) == v for k, v in dst.items()) and (inside if op == "in" else not inside)

    expected = set()
    for s_seg, s_lab, s_ips, s_local in members:
        for _, d_lab, d_ips, d_local in members:
            if src_ok(s_seg, s_lab) and dst_ok(d_lab) and (s_local or d_local):
                for s in s_ips:
                    for d in d_ips:
                        if (":" in s) == (":" in d):
                            expected.add(((s, d, 6, 443), "p_p"))
    fw = compiled(raw)
    got = set(fw.elements["allow4_ports"]) | set(fw.elements["allow6_ports"])
    assert got == expected
    assert set(all_elements(fw)) <= {"allow4_ports", "allow6_ports"}


def test_shape_sees_a_missing_rule_or_object() -> None:
    from veilnet_agent.core.firewall_compiler import structure_shape

    fw = compiled(labelled_state())
    structure = list(fw.structure)
    guard = next(i for i, c in enumerate(structure) if c["add"].get("rule", {}).get("chain") == "input")
    without_rule = structure[:guard] + structure[guard + 1:]
    assert structure_shape(without_rule) != fw.shape
    counter = next(i for i, c in enumerate(structure) if "counter" in c["add"])
    assert structure_shape(structure[:counter] + structure[counter + 1:]) != fw.shape
    listed = [c["add"] for c in structure]  # what `nft -j list table` returns has no "add" wrapper
    assert structure_shape(listed) == fw.shape


def test_icmp_echo_is_limited_before_established_is_accepted() -> None:
    raw = labelled_state()
    raw["segments"][0]["rate_limit"] = {"new_connections_per_second": 10, "icmp_per_second": 3}
    rules = [c["add"]["rule"] for c in compiled(raw).structure if "rule" in c["add"]]
    segment_rules = [json.dumps(r["expr"]) for r in rules if r["chain"] == "segments"]
    echo_limit = next(i for i, r in enumerate(segment_rules) if "echo-request" in r and "rl_icmp4_blue" in r)
    established = next(i for i, r in enumerate(segment_rules) if "established" in r)
    new_conn_limit = next(i for i, r in enumerate(segment_rules) if "rl_conn4_blue" in r)
    assert echo_limit < established < new_conn_limit


MUTATIONS = st.lists(
    st.tuples(
        st.sampled_from(["label", "ip", "remove", "add", "policy"]),
        st.integers(0, 3),
        LABELS,
    ),
    min_size=1,
    max_size=4,
)


def _mutate(raw: dict[str, Any], kind: str, which: int, labels: dict[str, str]) -> None:
    eps = [raw["endpoints"][0], raw["endpoints"][1], *raw["peers"][0]["endpoints"]] if raw["endpoints"] else []
    if kind == "label" and which < len(eps):
        eps[which]["labels"] = labels
    elif kind == "ip" and which < len(eps) and "ipv4" in eps[which]:
        eps[which]["ipv4"] = "203.0.113.11" if eps[which]["segment"] == "blue" else "203.0.113.71"
    elif kind == "ip" and which < len(eps) and "ips" in eps[which]:
        eps[which]["ips"] = ["203.0.113.21" if eps[which]["segment"] == "blue" else "203.0.113.81"]
    elif kind == "remove" and raw["peers"][0]["endpoints"]:
        raw["peers"][0]["endpoints"].pop()
    elif kind == "add" and len(raw["peers"][0]["endpoints"]) < 4:
        n = len(raw["peers"][0]["endpoints"])
        raw["peers"][0]["endpoints"].append({"segment": "blue", "mac": f"02:00:00:0b:00:1{n}",
                                             "ips": [f"203.0.113.4{n}"], "labels": labels})
    elif kind == "policy":
        raw["policies"][0]["ports"] = [5432, 6432]


@settings(max_examples=80, deadline=None)
@given(st.lists(LABELS, min_size=4, max_size=4), MUTATIONS)
def test_incremental_allow_elements_equal_a_full_compile(labels: list[dict[str, str]], mutations: Any) -> None:
    from veilnet_agent.core.firewall_compiler import AllowElements

    raw = labelled_state()
    raw["endpoints"][0]["labels"], raw["endpoints"][1]["labels"] = labels[0], labels[1]
    raw["peers"][0]["endpoints"][0]["labels"], raw["peers"][0]["endpoints"][1]["labels"] = labels[2], labels[3]
    raw["policies"] = [
        {"name": "web-to-db", "source": {"match_labels": {"app": "web"}}, "destination": {"segment": "green"},
         "protocol": "tcp", "ports": [5432]},
        {"name": "same", "source": {"segment": "blue"}, "destination": {"match_labels": {"app": "db"}}},
        {"name": "ops", "source": {"cidr": "198.51.100.0/24"}, "destination": {"match_labels": {"tier": "prod"}}},
    ]
    before = parse_node_state(raw)
    allow = AllowElements(before)
    old = allow.frozen()
    for kind, which, new_labels in mutations:
        _mutate(raw, kind, which, new_labels)
    after = parse_node_state(raw)
    adds, deletes = allow.update(after)
    want = AllowElements(after).frozen()
    assert allow.frozen() == want
    assert {n: e for n, e in adds.items() if e} == {n: set(want[n] - old[n]) for n in want if want[n] - old[n]}
    assert {n: e for n, e in deletes.items() if e} == {n: set(old[n] - want[n]) for n in old if old[n] - want[n]}
