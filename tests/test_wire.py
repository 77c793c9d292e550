"""wire.py: node states and deltas survive the trip through protobuf exactly, and validate the same."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from factories import wg_key
from hypothesis import given, settings
from hypothesis import strategies as st

from veilnet.v1 import state_pb2
from veilnet_agent.app.statefile import read_state_file
from veilnet_agent.control import wire
from veilnet_agent.core.model import parse_node_state

EXAMPLE: dict[str, Any] = dict(read_state_file(Path(__file__).parents[1] / "examples" / "state.yaml"))  # type: ignore[call-overload]


def roundtrip(state: dict[str, Any]) -> dict[str, Any]:
    data = wire.state_to_proto(state).SerializeToString()
    return wire.state_from_proto(state_pb2.NodeState.FromString(data))


def test_example_state_roundtrips_and_parses_to_the_same_model() -> None:
    back = roundtrip(EXAMPLE)
    assert parse_node_state(back) == parse_node_state(EXAMPLE)
    # port ranges and keepalive come back in the schema's own forms
    state = copy.deepcopy(EXAMPLE)
    state["policies"][0]["ports"] = [8080, "9000-9100"]
    assert roundtrip(state)["policies"][0]["ports"] == [8080, "9000-9100"]
    assert roundtrip(state)["peers"][0]["keepalive"] == 25


def test_absent_optional_fields_stay_absent_so_agent_defaults_apply() -> None:
    minimal = {"node": "host-a", "transport_address": "198.51.100.11/24",
               "segments": [{"name": "blue", "vni": 100, "ipv4_subnet": "203.0.113.0/26",
                             "ipv4_gateway": "203.0.113.1"}],
               "endpoints": [], "peers": [], "policies": []}
    back = roundtrip(minimal)
    assert back == minimal
    assert "rate_limit" not in back["segments"][0] and "mode" not in back["segments"][0]


def peer(i: int, port: int = 51820) -> dict[str, Any]:
    return {"name": f"peer-{i}", "underlay_address": f"192.0.2.{i}", "underlay_port": port,
            "public_key": wg_key(str(i)), "transport_address": f"198.51.100.{i}",
            "endpoints": [{"segment": "blue", "mac": f"02:00:00:00:00:{i:02x}", "ips": [f"203.0.113.{i}"]}]}


def test_delta_roundtrip_keeps_section_presence() -> None:
    delta = wire.Delta(policies=[], peer_upserts=[peer(5)], peer_removes=["peer-7"])
    back = wire.delta_from_proto(state_pb2.StateDelta.FromString(wire.delta_to_proto(delta).SerializeToString()))
    assert back == delta
    assert back.policies == [] and back.segments is None  # "replace with nothing" differs from "unchanged"
    assert not back.peers_only  # policies changed too
    assert wire.Delta(peer_removes=["x"]).peers_only


@settings(max_examples=100, deadline=None)
@given(st.sets(st.integers(1, 60), max_size=20), st.sets(st.integers(1, 60), max_size=20),
       st.sets(st.integers(1, 60), max_size=10), st.booleans())
def test_diff_then_apply_through_protobuf_reproduces_the_new_state(
    old_ids: set[int], new_ids: set[int], changed: set[int], policy_change: bool
) -> None:
    old = {"node": "n", "transport_address": "198.51.100.100/24", "segments": [], "endpoints": [],
           "peers": [peer(i) for i in sorted(old_ids)], "policies": []}
    new = dict(old, peers=[peer(i, 51821 if i in changed else 51820) for i in sorted(new_ids)],
               policies=[{"name": "p", "source": {"cidr": "192.0.2.0/24"}, "destination": {"cidr": "10.0.0.0/8"}}]
               if policy_change else [])
    delta = wire.diff_states(old, new)
    wire_delta = wire.delta_from_proto(state_pb2.StateDelta.FromString(wire.delta_to_proto(delta).SerializeToString()))
    got = wire.apply_delta(old, wire_delta)
    assert {p["name"]: p for p in got["peers"]} == {p["name"]: p for p in new["peers"]}
    assert got["policies"] == new["policies"]
    unchanged = old_ids & new_ids - changed
    assert not {p["name"] for p in delta.peer_upserts} & {f"peer-{i}" for i in unchanged}


def test_node_labels_reach_attached_endpoints_and_travel_in_deltas() -> None:
    state = copy.deepcopy(EXAMPLE)
    state["node_labels"] = {"node.zone": "a"}
    parsed = parse_node_state(roundtrip(state))
    assert all(("node.zone", "a") in e.labels for e in parsed.endpoints)
    delta = wire.diff_states(EXAMPLE, state)
    assert delta.node_labels == {"node.zone": "a"} and not delta.peers_only
    back = wire.delta_from_proto(state_pb2.StateDelta.FromString(wire.delta_to_proto(delta).SerializeToString()))
    assert wire.apply_delta(EXAMPLE, back)["node_labels"] == {"node.zone": "a"}
    removed = wire.diff_states(state, EXAMPLE)
    assert removed.node_labels == {} and "node_labels" not in wire.apply_delta(state, removed)


def test_an_own_label_contradicting_the_nodes_is_refused() -> None:
    import pytest

    from veilnet_agent.core.errors import ValidationError

    state = copy.deepcopy(EXAMPLE)
    state["node_labels"] = {"app": "db"}  # a-web says app=web
    with pytest.raises(ValidationError) as e:
        parse_node_state(state)
    assert e.value.field == "endpoints[0].labels.app"
