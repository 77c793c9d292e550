"""Compiling a network spec into agent states, and the per-node deltas between states."""

from __future__ import annotations

import copy
import ipaddress
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from factories import wg_key
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from veilnet_agent.control.wire import Delta, apply_delta, diff_states
from veilnet_agent.core.errors import ValidationError
from veilnet_agent.core.model import parse_node_state
from veilnet_controller.compile import compile_nodes
from veilnet_controller.spec import EndpointSpec, NetworkSpec, load_spec_text, parse_spec, parse_spec_text

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "network.yaml"
EXAMPLE_RAW: dict[str, Any] = load_spec_text(EXAMPLE.read_text())  # type: ignore[assignment]


def keys_for(spec: NetworkSpec, *, without: Sequence[str] = ()) -> dict[str, str]:
    return {n.name: wg_key(n.name) for n in spec.nodes if n.name not in without}


def example(**changes: Any) -> NetworkSpec:
    raw = copy.deepcopy(EXAMPLE_RAW)
    raw.update(changes)
    return parse_spec(raw)


def build_spec(
    memberships: Sequence[Sequence[int]],
    segments: int,
    endpoints_per_node: int,
    *,
    keepalive: Sequence[int] = (),
    policy_variant: int = 0,
    node_labels: bool = True,
) -> dict[str, Any]:
    """A raw spec: node i carries segments memberships[i] and has endpoints_per_node endpoints in them."""
    raw_segments: list[dict[str, Any]] = []
    for k in range(segments):
        seg: dict[str, Any] = {"name": f"seg-{k}", "vni": 1000 + k,
                               "ipv4_subnet": f"10.{k}.0.0/16", "ipv4_gateway": f"10.{k}.0.1"}
        if k % 2 == 0:
            seg.update(ipv6_subnet=f"fd00:{k:x}::/64", ipv6_gateway=f"fd00:{k:x}::1")
        if k % 3 == 1:
            seg["mode"] = "default-deny"
        raw_segments.append(seg)
    nodes: list[dict[str, Any]] = []
    endpoints: list[dict[str, Any]] = []
    used = [0] * segments
    for i, carried in enumerate(memberships):
        node: dict[str, Any] = {
            "name": f"node-{i:04d}",
            "underlay_address": f"172.16.{i // 250}.{i % 250 + 1}",
            "transport_address": f"100.64.{i // 250}.{i % 250 + 1}/16",
            "segments": [f"seg-{k}" for k in carried],
        }
        if keepalive and keepalive[i % len(keepalive)]:
            node["keepalive"] = keepalive[i % len(keepalive)]
        if node_labels:
            node["labels"] = {"rack": f"r{i % 4}"}
        nodes.append(node)
        for j in range(endpoints_per_node if carried else 0):
            k = carried[j % len(carried)]
            c = used[k] = used[k] + 1
            n = len(endpoints)
            endpoint: dict[str, Any] = {
                "name": f"ep-{i}-{j}", "node": node["name"], "segment": f"seg-{k}",
                "mac": f"02:10:{(n >> 16) & 255:02x}:{(n >> 8) & 255:02x}:{n & 255:02x}:01",
                "ipv4": f"10.{k}.{c // 250 + 1}.{c % 250 + 1}", "netns": f"ep-{i}-{j}",
                "labels": {"app": ("web", "db", "api")[n % 3]},
            }
            if k % 2 == 0:
                endpoint["ipv6"] = f"fd00:{k:x}::{c + 1:x}"
            endpoints.append(endpoint)
    policies: list[dict[str, Any]] = [
        {"name": f"web-db-{k}", "source": {"segment": f"seg-{k}", "match_labels": {"app": "web"}},
         "destination": {"segment": f"seg-{k}", "match_labels": {"app": "db"}}, "protocol": "tcp",
         "ports": [5432 + policy_variant]}
        for k in range(segments)
    ]
    policies.append({"name": "any-api", "source": {"match_labels": {"app": "web"}},
                     "destination": {"match_labels": {"app": "api"}}, "protocol": "tcp", "ports": [8080]})
    policies.append({"name": "ops", "source": {"cidr": "192.168.0.0/24"}, "destination": {"segment": "seg-0"},
                     "protocol": "icmp"})
    if segments > 1:
        policies.append({"name": "cross", "source": {"segment": "seg-0"}, "destination": {"segment": "seg-1"}})
    return {"segments": raw_segments, "nodes": nodes, "endpoints": endpoints, "policies": policies}


def big_spec(nodes: int = 1000, segments: int = 10, endpoints_per_node: int = 10) -> dict[str, Any]:
    """nodes/segments nodes per segment, each node in one segment."""
    per = nodes // segments
    return build_spec([[i // per] for i in range(nodes)], segments, endpoints_per_node, node_labels=False)


def assert_valid(states: dict[str, dict[str, Any]]) -> None:
    for name, state in states.items():
        parsed = parse_node_state(json.loads(json.dumps(state)))  # plain JSON, as delivered
        assert parsed.node == name


# --------------------------------------------------------------------------- the example


def test_example_compiles_to_valid_states() -> None:
    spec = parse_spec_text(EXAMPLE.read_text())
    states = compile_nodes(spec, keys_for(spec), {})
    assert set(states) == {"host-a", "host-b", "host-c"}
    assert_valid(states)
    a = parse_node_state(states["host-a"])
    assert [s.name for s in a.segments] == ["blue", "green"]
    assert [e.name for e in a.endpoints] == ["a-web", "a-db"]
    assert [p.name for p in a.peers] == ["host-b", "host-c"]
    assert [len(p.endpoints) for p in a.peers] == [2, 1]
    assert [p.name for p in a.policies] == ["web-to-api", "blue-icmp", "blue-icmpv6"]
    assert str(a.transport_address) == "198.51.100.11/24"
    assert str(a.peers[0].transport_address) == "198.51.100.12"
    assert states["host-a"]["segments"][0] is spec.raw["segments"][0], "segments are emitted verbatim"
    c = parse_node_state(states["host-c"])
    assert [s.name for s in c.segments] == ["blue"]
    assert [(p.name, [e.mac for e in p.endpoints]) for p in c.peers] == [
        ("host-a", ["02:00:00:0a:00:01"]), ("host-b", ["02:00:00:0b:00:01"])]


def test_state_shape() -> None:
    spec = example()
    state = compile_nodes(spec, keys_for(spec), {})["host-b"]
    assert list(state) == ["node", "transport_address", "segments", "endpoints", "peers", "policies", "node_labels"]
    assert state["node_labels"] == {"node.zone": "b"}  # so endpoints the agent attaches itself get them too
    assert state["endpoints"][1] == {
        "name": "b-db", "segment": "green", "mac": "02:00:00:0b:00:02", "ipv4": "203.0.113.84",
        "netns": "b-db", "ifname": "eth0", "labels": {"app": "db", "node.zone": "b"},
    }
    assert state["peers"][0] == {
        "name": "host-a", "underlay_address": "192.0.2.11", "underlay_port": 51820, "public_key": wg_key("host-a"),
        "transport_address": "198.51.100.11",
        "endpoints": [
            {"segment": "blue", "mac": "02:00:00:0a:00:01", "ips": ["203.0.113.10", "fd00:b1::10"],
             "labels": {"app": "web", "node.zone": "a"}},
            {"segment": "green", "mac": "02:00:00:0a:00:02", "ips": ["203.0.113.74"],
             "labels": {"app": "db", "node.zone": "a"}},
        ],
        "segments": ["blue", "green"],  # shared with host-b: the VNIs host-a may send it frames for
    }


def test_peers_carry_the_shared_segments_even_without_endpoints_there() -> None:
    """A peer that routes into a segment it carries sends frames there without having endpoints in it."""
    raw = copy.deepcopy(EXAMPLE_RAW)
    raw["endpoints"] = [e for e in raw["endpoints"] if not (e["node"] == "host-a" and e["segment"] == "green")]
    spec = parse_spec(raw)
    b = parse_node_state(compile_nodes(spec, keys_for(spec), {})["host-b"])
    host_a = next(p for p in b.peers if p.name == "host-a")
    assert {e.segment for e in host_a.endpoints} == {"blue"}
    assert host_a.segments == ("blue", "green")
    c = parse_node_state(compile_nodes(spec, keys_for(spec), {})["host-c"])
    assert all(p.segments == ("blue",) for p in c.peers), "host-c carries only blue: it learns of no other"


def test_keepalive_and_labels_are_omitted_when_empty_or_zero() -> None:
    raw = copy.deepcopy(EXAMPLE_RAW)
    raw["nodes"][0]["keepalive"] = 25
    del raw["nodes"][0]["labels"]
    del raw["endpoints"][0]["labels"]
    spec = parse_spec(raw)
    states = compile_nodes(spec, keys_for(spec), {})
    assert_valid(states)
    host_a = states["host-b"]["peers"][0]
    assert host_a["keepalive"] == 25 and "keepalive" not in states["host-a"]["peers"][0]
    assert "labels" not in host_a["endpoints"][0] and "labels" not in states["host-a"]["endpoints"][0]
    assert host_a["endpoints"][1]["labels"] == {"app": "db"}


def test_node_labels_reach_endpoints_and_policies_can_select_them() -> None:
    raw = copy.deepcopy(EXAMPLE_RAW)
    raw["policies"].append({"name": "from-zone-a", "source": {"match_labels": {"node.zone": "a"}},
                            "destination": {"segment": "blue", "match_labels": {"app": "api"}},
                            "protocol": "tcp", "ports": [22]})
    spec = parse_spec(raw)
    states = compile_nodes(spec, keys_for(spec), {})
    c = parse_node_state(states["host-c"])
    assert dict(c.endpoints[0].labels) == {"app": "api", "node.zone": "c"}
    assert {dict(e.labels)["node.zone"] for p in c.peers for e in p.endpoints} == {"a", "b"}
    assert "from-zone-a" in [p.name for p in c.policies]
    source = next(p for p in c.policies if p.name == "from-zone-a").source
    web_on_a = c.peers[0].endpoints[0]
    assert source.matches(web_on_a.segment, dict(web_on_a.labels))
    assert not source.matches(c.peers[1].endpoints[0].segment, dict(c.peers[1].endpoints[0].labels))


# --------------------------------------------------------------------------- isolation


def isolation_spec() -> NetworkSpec:
    """The example plus host-d carrying green only, and policies of every kind."""
    raw = copy.deepcopy(EXAMPLE_RAW)
    raw["nodes"].append({"name": "host-d", "underlay_address": "192.0.2.14", "transport_address": "198.51.100.14/24",
                         "segments": ["green"]})
    raw["endpoints"].append({"name": "d-db", "node": "host-d", "segment": "green", "mac": "02:00:00:0d:00:02",
                             "ipv4": "203.0.113.94", "netns": "d-db", "labels": {"app": "db"}})
    raw["policies"] += [
        {"name": "green-db", "source": {"segment": "green"},
         "destination": {"segment": "green", "match_labels": {"app": "db"}}, "protocol": "tcp", "ports": [5432]},
        {"name": "blue-to-green", "source": {"segment": "blue"}, "destination": {"segment": "green"}},
        {"name": "labels-only", "source": {"match_labels": {"app": "web"}},
         "destination": {"match_labels": {"app": "db"}}},
        {"name": "ops", "source": {"cidr": "192.168.7.0/24"}, "destination": {"match_labels": {"app": "db"}}},
    ]
    return parse_spec(raw)


BLUE_FACTS = ["blue", '"vni": 100', "203.0.113.0/26", "203.0.113.1\"", "fd00:b1", "02:56:4e:00:00:64",
              "02:00:00:0a:00:01", "02:00:00:0b:00:01", "02:00:00:0c:00:01", "203.0.113.10\"", "203.0.113.20\"",
              "203.0.113.30\"", "a-web", "b-web", "c-web", "web-to-api", "blue-to-green", "host-c"]
GREEN_FACTS = ["green", '"vni": 200', "203.0.113.64/26", "203.0.113.65", "02:00:00:0a:00:02", "02:00:00:0b:00:02",
               "02:00:00:0d:00:02", "203.0.113.74", "203.0.113.84", "203.0.113.94", "a-db", "b-db", "d-db",
               "green-db", "blue-to-green", "host-d"]


def test_a_node_learns_nothing_of_segments_it_does_not_carry() -> None:
    spec = isolation_spec()
    states = compile_nodes(spec, keys_for(spec), {})
    assert_valid(states)
    d_text = json.dumps(states["host-d"])
    for fact in BLUE_FACTS:
        assert fact not in d_text, f"host-d (green only) learned {fact!r}"
    c_text = json.dumps(states["host-c"])
    for fact in GREEN_FACTS:
        assert fact not in c_text, f"host-c (blue only) learned {fact!r}"
    assert [p["name"] for p in states["host-d"]["policies"]] == ["green-db", "labels-only", "ops"]
    assert [p["name"] for p in states["host-c"]["policies"]] == [
        "web-to-api", "blue-icmp", "blue-icmpv6", "labels-only", "ops"]
    assert [p["name"] for p in states["host-a"]["policies"]] == [p.name for p in spec.policies]
    assert [p["name"] for p in states["host-d"]["peers"]] == ["host-a", "host-b"]
    assert [e["segment"] for p in states["host-d"]["peers"] for e in p["endpoints"]] == ["green", "green"]


def test_node_without_key_is_no_peer_but_gets_its_state() -> None:
    spec = isolation_spec()
    states = compile_nodes(spec, keys_for(spec, without=["host-b"]), {})
    assert_valid(states)
    assert set(states) == {"host-a", "host-b", "host-c", "host-d"}
    for name, state in states.items():
        assert "host-b" not in [p["name"] for p in state["peers"]], name
        assert "02:00:00:0b:00:01" not in json.dumps(state["peers"])
    assert [p["name"] for p in states["host-b"]["peers"]] == ["host-a", "host-c", "host-d"]
    assert [e["name"] for e in states["host-b"]["endpoints"]] == ["b-web", "b-db"]


def test_excluded_node_is_absent_everywhere() -> None:
    spec = isolation_spec()
    states = compile_nodes(spec, keys_for(spec), {}, excluded={"host-a"})
    assert_valid(states)
    assert set(states) == {"host-b", "host-c", "host-d"}
    text = json.dumps(states)
    for fact in ("host-a", "192.0.2.11", "198.51.100.11", wg_key("host-a"), "02:00:00:0a:00:01", "02:00:00:0a:00:02"):
        assert fact not in text


def test_attached_endpoints_reach_peers_sharing_the_segment() -> None:
    spec = isolation_spec()
    attached = {
        "host-c": [EndpointSpec("c-new", "host-c", "blue", "02:00:00:0c:00:09", ipaddress.IPv4Address("203.0.113.39"),
                                None, "c-new", labels=(("app", "web"),))],
        "host-d": [EndpointSpec("d-new", "host-d", "green", "02:00:00:0d:00:09",
                                ipaddress.IPv4Address("203.0.113.99"), None, "d-new")],
        "host-z": [EndpointSpec("z", "host-z", "blue", "02:00:00:0f:00:09", None, None, "z")],  # unknown node
    }
    states = compile_nodes(spec, keys_for(spec), attached)
    assert_valid(states)
    # not echoed back to host-c: its agent holds its own attachments and merges them itself
    assert [e["name"] for e in states["host-c"]["endpoints"]] == ["c-web"]
    for viewer in ("host-a", "host-b"):
        peer_c = next(p for p in states[viewer]["peers"] if p["name"] == "host-c")
        assert [e["mac"] for e in peer_c["endpoints"]] == ["02:00:00:0c:00:01", "02:00:00:0c:00:09"]
        assert peer_c["endpoints"][1]["labels"] == {"app": "web", "node.zone": "c"}
        peer_d = next(p for p in states[viewer]["peers"] if p["name"] == "host-d")
        assert [e["mac"] for e in peer_d["endpoints"]] == ["02:00:00:0d:00:02", "02:00:00:0d:00:09"]
    assert "02:00:00:0d:00:09" not in json.dumps(states["host-c"])
    assert "02:00:00:0c:00:09" not in json.dumps(states["host-d"])


def test_stale_attachment_in_a_segment_no_longer_carried_is_left_out() -> None:
    spec = example()
    attached = {"host-c": [EndpointSpec("c-old", "host-c", "green", "02:00:00:0c:00:09",
                                        ipaddress.IPv4Address("203.0.113.99"), None, "c-old")]}
    states = compile_nodes(spec, keys_for(spec), attached)
    assert_valid(states)
    assert "02:00:00:0c:00:09" not in json.dumps(states)


def test_bad_or_shared_public_keys_are_rejected() -> None:
    spec = example()
    with pytest.raises(ValidationError) as info:
        compile_nodes(spec, {**keys_for(spec), "host-b": "nope"}, {})
    assert info.value.field == "public_keys.host-b"
    with pytest.raises(ValidationError) as info:
        compile_nodes(spec, {**keys_for(spec), "host-c": wg_key("host-a")}, {})
    assert info.value.field == "public_keys.host-c" and "of node host-a too" in info.value.reason
    # an excluded node's key is not looked at
    states = compile_nodes(spec, {**keys_for(spec), "host-c": "nope"}, {}, excluded=["host-c"])
    assert set(states) == {"host-a", "host-b"}


def test_generated_spec_compiles_to_valid_states() -> None:
    memberships = [[i % 5, (i // 5) % 5] if i % 5 != (i // 5) % 5 else [i % 5] for i in range(50)]
    spec = parse_spec(build_spec(memberships, 5, 3, keepalive=[0, 25]))
    states = compile_nodes(spec, keys_for(spec, without=["node-0007"]), {}, excluded=["node-0011"])
    assert len(states) == 49
    assert_valid(states)
    for name, state in states.items():
        mine = set(spec.node(name).segments)
        assert {s["name"] for s in state["segments"]} == mine
        for p in state["peers"]:
            assert p["name"] not in ("node-0007", "node-0011", name)
            assert set(spec.node(p["name"]).segments) & mine
            assert {e["segment"] for e in p["endpoints"]} <= mine
        expected = {n.name for n in spec.nodes if n.name not in ("node-0007", "node-0011", name)
                    and set(n.segments) & mine}
        assert {p["name"] for p in state["peers"]} == expected
        assert [p["name"] for p in state["peers"]] == sorted(expected)


def test_peer_views_are_shared_between_viewers() -> None:
    spec = parse_spec(big_spec(nodes=20, segments=2, endpoints_per_node=2))
    states = compile_nodes(spec, keys_for(spec), {})
    view_of_1_from_2 = next(p for p in states["node-0002"]["peers"] if p["name"] == "node-0001")
    view_of_1_from_3 = next(p for p in states["node-0003"]["peers"] if p["name"] == "node-0001")
    assert view_of_1_from_2 is view_of_1_from_3
    assert states["node-0002"]["segments"] is states["node-0003"]["segments"]
    assert states["node-0002"]["policies"] is states["node-0003"]["policies"]


def test_empty_spec_and_nodes_without_segments() -> None:
    assert compile_nodes(parse_spec({}), {}, {}) == {}
    raw = build_spec([[0], []], 1, 1)
    spec = parse_spec(raw)
    states = compile_nodes(spec, keys_for(spec), {})
    assert_valid(states)
    assert states["node-0001"]["segments"] == [] and states["node-0001"]["peers"] == []
    assert [p["name"] for p in states["node-0001"]["policies"]] == ["any-api"]


# --------------------------------------------------------------------------- deltas


def example_states(spec: NetworkSpec | None = None, **kwargs: Any) -> dict[str, dict[str, Any]]:
    spec = spec or example()
    return compile_nodes(spec, kwargs.pop("keys", keys_for(spec)), kwargs.pop("attached", {}), **kwargs)


def test_no_change_no_delta() -> None:
    old, new = example_states(), example_states()
    for name in old:
        assert diff_states(old[name], new[name]).is_empty()
        assert apply_delta(old[name], Delta()) == old[name]


def test_one_policy_change_touches_only_policies() -> None:
    old = example_states()
    raw = copy.deepcopy(EXAMPLE_RAW)
    raw["policies"][0]["ports"] = [8080, 8443]
    new = example_states(parse_spec(raw))
    for name in old:
        delta = diff_states(old[name], new[name])
        assert delta.policies == new[name]["policies"]
        assert delta == Delta(policies=new[name]["policies"]), name
        assert apply_delta(old[name], delta) == new[name]


def test_policy_of_a_segment_only_reaches_its_nodes() -> None:
    spec = isolation_spec()
    old = example_states(spec)
    raw = copy.deepcopy(dict(spec.raw))
    next(p for p in raw["policies"] if p["name"] == "green-db")["ports"] = [5433]
    new = example_states(parse_spec(raw))
    assert diff_states(old["host-c"], new["host-c"]).is_empty()
    assert diff_states(old["host-d"], new["host-d"]) == Delta(policies=new["host-d"]["policies"])


def test_new_node_key_is_one_peer_upsert_on_each_node_sharing_a_segment() -> None:
    spec = isolation_spec()
    old = example_states(spec, keys=keys_for(spec, without=["host-c"]))
    new = example_states(spec)
    for name in ("host-a", "host-b"):
        delta = diff_states(old[name], new[name])
        assert delta == Delta(peer_upserts=[next(p for p in new[name]["peers"] if p["name"] == "host-c")])
        assert apply_delta(old[name], delta) == new[name]
    assert diff_states(old["host-c"], new["host-c"]).is_empty()
    assert diff_states(old["host-d"], new["host-d"]).is_empty(), "host-d shares no segment with host-c"


def test_removed_node_is_a_peer_remove() -> None:
    spec = isolation_spec()
    old = example_states(spec)
    new = example_states(spec, excluded=["host-b"])
    for name in ("host-a", "host-c", "host-d"):
        delta = diff_states(old[name], new[name])
        assert delta == Delta(peer_removes=["host-b"])
        assert apply_delta(old[name], delta) == new[name]


def test_endpoint_change_is_endpoints_here_and_peer_upserts_there() -> None:
    spec = example()
    old = example_states(spec)
    raw = copy.deepcopy(EXAMPLE_RAW)
    raw["endpoints"][4]["labels"] = {"app": "web"}  # c-web
    new = example_states(parse_spec(raw))
    assert diff_states(old["host-c"], new["host-c"]) == Delta(endpoints=new["host-c"]["endpoints"])
    for name in ("host-a", "host-b"):
        delta = diff_states(old[name], new[name])
        assert [p["name"] for p in delta.peer_upserts] == ["host-c"]
        assert (delta.segments, delta.endpoints, delta.policies, delta.peer_removes) == (None, None, None, [])


def test_apply_delta_leaves_the_old_state_alone() -> None:
    old = example_states()
    new = example_states(excluded=["host-c"])
    before = copy.deepcopy(old["host-a"])
    apply_delta(old["host-a"], diff_states(old["host-a"], new["host-a"]))
    assert old["host-a"] == before


@st.composite
def spec_params(draw: st.DrawFn) -> dict[str, Any]:
    segments = draw(st.integers(1, 3))
    n = draw(st.integers(1, 6))
    memberships = [draw(st.lists(st.integers(0, segments - 1), max_size=segments, unique=True)) for _ in range(n)]
    return {
        "memberships": memberships,
        "segments": segments,
        "endpoints_per_node": draw(st.integers(0, 3)),
        "keepalive": draw(st.lists(st.sampled_from([0, 10, 25]), min_size=1, max_size=3)),
        "policy_variant": draw(st.integers(0, 2)),
        "node_labels": draw(st.booleans()),
        "keyless": draw(st.sets(st.integers(0, n - 1))),
        "excluded": draw(st.sets(st.integers(0, n - 1))),
        "transport_prefix": draw(st.sampled_from([16, 20])),
    }


def compile_params(params: dict[str, Any]) -> dict[str, dict[str, Any]]:
    p = dict(params)
    keyless, excluded, prefix = p.pop("keyless"), p.pop("excluded"), p.pop("transport_prefix")
    raw = build_spec(**p)
    for node in raw["nodes"]:
        node["transport_address"] = node["transport_address"].replace("/16", f"/{prefix}")
    spec = parse_spec(raw)
    names = [f"node-{i:04d}" for i in range(len(p["memberships"]))]
    return compile_nodes(spec, keys_for(spec, without=[names[i] for i in keyless]), {},
                         excluded=[names[i] for i in excluded])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec_params(), spec_params())
def test_apply_delta_inverts_diff(one: dict[str, Any], two: dict[str, Any]) -> None:
    old, new = compile_params(one), compile_params(two)
    for name in old.keys() & new.keys():
        delta = diff_states(old[name], new[name])
        assert apply_delta(old[name], delta) == new[name]
        assert delta.is_empty() == (old[name] == new[name])
        assert diff_states(new[name], new[name]).is_empty()
    # Even between states of two different nodes (all but the node name carries over).
    for a in list(old.values())[:2]:
        for b in list(new.values())[:2]:
            assert apply_delta(a, diff_states(a, b)) == {**b, "node": a["node"]}


# --------------------------------------------------------------------------- performance


def test_large_spec_compiles_completely() -> None:
    """1,000 nodes, 10 segments of 100, 10,000 endpoints: every node gets its 99 peers; recompiling changes nothing.

    (How long this takes is measured by integration/bench/bench_controller.py, not asserted here.)
    """
    raw = big_spec()
    spec = parse_spec(raw)
    states = compile_nodes(spec, keys_for(spec), {})
    assert len(states) == 1000 and all(len(s["peers"]) == 99 for s in states.values())
    again = compile_nodes(spec, keys_for(spec), {})
    assert all(diff_states(states[n], again[n]).is_empty() for n in states)
    assert_valid({n: states[n] for n in ("node-0000", "node-0999")})
