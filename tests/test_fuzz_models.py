"""Fuzz targets over parsed structures: specs, node states, deltas, attached endpoints.

Inputs are documents valid by construction (values in the spellings the validators accept), then
mutated the way a careless operator or a hostile peer would. Properties, besides "accepted or a bounded
ValidationError":

* spec -> canonical text -> spec is the same spec; the controller compiles it into states every agent
  accepts, and they survive protobuf;
* state -> protobuf -> state is the same state;
* a delta through protobuf applied to the old state gives the new one;
* the incremental peer path accepts exactly what a full parse accepts, and gives the same state,
  peer order included;
* attached endpoints that the controller accepts compile into states the agents accept.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from factories import wg_key
from fuzzing import (
    JSON_VALUES,
    check_refusal,
    count,
    delta_messages,
    fuzz_settings,
    mutated,
    outcome,
    peer_of,
    valid_spec,
    valid_state,
)
from hypothesis import given
from hypothesis import strategies as st

from veilnet.v1 import controller_pb2 as cpb
from veilnet.v1 import state_pb2 as spb
from veilnet_agent.app.statefile import StateFileTracker
from veilnet_agent.control import wire
from veilnet_agent.core.errors import ValidationError
from veilnet_agent.core.model import parse_node_state
from veilnet_controller.compile import compile_nodes
from veilnet_controller.spec import (
    AttachedClaims,
    canonical_text,
    parse_attached_endpoint,
    parse_spec,
    parse_spec_text,
    validate_attached_endpoints,
)


def through_proto(raw: dict[str, Any]) -> dict[str, Any]:
    return wire.state_from_proto(spb.NodeState.FromString(wire.state_to_proto(raw).SerializeToString()))


def check_compiled(states: dict[str, dict[str, Any]]) -> None:
    """What the controller sends is what every agent accepts, as sent and after protobuf."""
    for node, raw in states.items():
        plain = json.loads(json.dumps(raw))
        parsed = parse_node_state(plain)
        assert parsed.node == node
        assert parse_node_state(through_proto(plain)) == parsed


# --------------------------------------------------------------------------- specs

@fuzz_settings(ci_examples=600, campaign_examples=3000)
@given(valid_spec().flatmap(lambda spec: mutated(spec, 3)), st.booleans())
def test_fuzz_spec_structure(raw: dict[str, Any], keys: bool) -> None:
    count("spec-structure")
    accepted, spec = outcome(lambda: parse_spec(raw), ValidationError)
    if not accepted:
        check_refusal(spec)
        return
    again = parse_spec_text(canonical_text(spec.raw))
    assert again == spec and again.raw == spec.raw
    public_keys = {n.name: wg_key(n.name) for n in spec.nodes} if keys else {}
    check_compiled(compile_nodes(spec, public_keys, {}))


# --------------------------------------------------------------------------- node states

@fuzz_settings(ci_examples=800, campaign_examples=3000)
@given(valid_state().flatmap(lambda raw: mutated(raw, 3)))
def test_fuzz_state_structure(raw: dict[str, Any]) -> None:
    count("state-structure")
    accepted, state = outcome(lambda: parse_node_state(raw), ValidationError)
    if not accepted:
        check_refusal(state)
        return
    assert parse_node_state(through_proto(raw)) == state


@st.composite
def state_pair(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, Any]]:
    """Two states of one node: the second with peers added, removed, changed (maybe invalidly), reordered."""
    old = draw(valid_state())
    new = copy.deepcopy(old)
    peers = new["peers"]
    for _ in range(draw(st.integers(0, 4))):
        action = draw(st.sampled_from(["add", "remove", "change", "break", "swap", "section"]))
        if action == "add":
            i = draw(st.integers(0, 40))
            peers.insert(draw(st.integers(0, len(peers))), peer_of(i, draw(st.integers(0, 1))))
        elif action == "remove" and peers:
            del peers[draw(st.integers(0, len(peers) - 1))]
        elif action == "change" and peers:
            at = draw(st.integers(0, len(peers) - 1))
            name = peers[at].get("name") if isinstance(peers[at], dict) else None
            number = name.removeprefix("peer-") if isinstance(name, str) else ""
            peers[at] = peer_of(int(number) if number.isascii() and number.isdigit() else 0, 1)
        elif action == "break" and peers:
            at = draw(st.integers(0, len(peers) - 1))
            peers[at] = draw(mutated(peers[at], 2))
        elif action == "swap" and len(peers) > 1:
            i, j = draw(st.integers(0, len(peers) - 1)), draw(st.integers(0, len(peers) - 1))
            peers[i], peers[j] = peers[j], peers[i]
        elif action == "section":
            new = draw(mutated(new, 1))
            peers = new.get("peers") if isinstance(new.get("peers"), list) else []
    return old, new


@fuzz_settings(ci_examples=700, campaign_examples=3000)
@given(state_pair())
def test_fuzz_incremental_peers(pair: tuple[dict[str, Any], dict[str, Any]]) -> None:
    """The state-file tracker's peers-only path (update_peers) against a full parse of the same file."""
    count("incremental-peers")
    old, new = pair
    tracker = StateFileTracker()
    first = tracker.prepare(copy.deepcopy(old))
    assert first is not None
    tracker.commit(first)
    full_ok, full = outcome(lambda: parse_node_state(copy.deepcopy(new)), ValidationError)
    inc_ok, pending = outcome(lambda: tracker.prepare(copy.deepcopy(new)), ValidationError)
    assert inc_ok == full_ok, f"full parse {'accepts' if full_ok else 'refuses'} it: {full if not full_ok else ''}" \
                              f" but the incremental path {pending if not inc_ok else 'accepts it'}"
    if not full_ok:
        check_refusal(full)
        check_refusal(pending)
        return
    derived = first.state if pending is None else pending.state
    assert derived == full, "same peers in the same order, same everything"


@fuzz_settings(ci_examples=500, campaign_examples=3000)
@given(valid_state(), valid_state())
def test_fuzz_delta_roundtrip(old: dict[str, Any], new: dict[str, Any]) -> None:
    count("delta-roundtrip")
    old["peers"].sort(key=lambda p: p["name"])  # the controller's states list peers by name
    new["peers"].sort(key=lambda p: p["name"])
    delta = wire.diff_states(old, new)
    got = wire.apply_delta(old, wire.delta_from_proto(
        spb.StateDelta.FromString(wire.delta_to_proto(delta).SerializeToString())))
    assert [p["name"] for p in got["peers"]] == [p["name"] for p in new["peers"]]
    # the same state; port ranges come back in their canonical spelling ("0080-90" as "80-90")
    assert parse_node_state(got) == parse_node_state(new)


@fuzz_settings(ci_examples=500, campaign_examples=3000)
@given(valid_state(peer_ids=[0, 1, 2]), delta_messages())
def test_fuzz_delta_apply(old: dict[str, Any], msg: spb.StateDelta) -> None:
    """Any StateDelta a controller may send, applied to the agent's state, validates or is refused."""
    count("delta-apply")
    new = wire.apply_delta(old, wire.delta_from_proto(msg))
    accepted, result = outcome(lambda: parse_node_state(new), ValidationError)
    if not accepted:
        check_refusal(result)


# --------------------------------------------------------------------------- attached endpoints

@st.composite
def attachments(draw: st.DrawFn) -> tuple[dict[str, Any], str, list[Any], dict[str, list[Any]]]:
    spec = draw(valid_spec())
    node = draw(st.sampled_from([n["name"] for n in spec["nodes"]] + ["host-z"]))
    def endpoint(k: int) -> dict[str, Any]:
        segment = draw(st.sampled_from([s["name"] for s in spec["segments"]]))
        index = [s["name"] for s in spec["segments"]].index(segment)
        raw: dict[str, Any] = {"name": f"att-{k}", "segment": segment, "mac": f"02:aa:00:00:00:{k:02x}",
                               "netns": f"att-{k}"}
        raw["ipv4" if "ipv4_subnet" in spec["segments"][index] else "ipv6"] = (
            f"10.{index}.0.{200 + k}" if "ipv4_subnet" in spec["segments"][index] else f"fd00:{index + 1}::{200 + k:x}")
        if draw(st.booleans()):
            raw["labels"] = {"app": "web"}
        return raw
    raws = [draw(mutated(endpoint(k), 2)) for k in range(draw(st.integers(0, 3)))]
    if draw(st.integers(0, 4)) == 0:
        raws.append(draw(JSON_VALUES))
    elsewhere_raw = [endpoint(10 + k) for k in range(draw(st.integers(0, 2)))]
    return spec, node, raws, {"host-b": elsewhere_raw}


@fuzz_settings(ci_examples=500, campaign_examples=3000)
@given(attachments())
def test_fuzz_attached_endpoints(case: tuple[dict[str, Any], str, list[Any], dict[str, list[Any]]]) -> None:
    """Endpoints an agent reports as attached: accepted as a whole or one ValidationError; accepted ones (and
    each one the hub's claims table accepts on its own) compile into states every agent accepts."""
    count("attached-endpoints")
    raw_spec, node, raws, elsewhere_raw = case
    spec = parse_spec(raw_spec)
    elsewhere: dict[str, list[Any]] = {}
    if "host-b" in {n.name for n in spec.nodes} and node != "host-b":
        table = AttachedClaims(spec)
        for i, item in enumerate(elsewhere_raw["host-b"]):
            ok, e = outcome(lambda: parse_attached_endpoint("host-b", item, f"e[{i}]"), ValidationError)  # noqa: B023
            if ok and outcome(lambda: table.check(e, "e"), ValidationError)[0]:  # noqa: B023
                table.claim(e, path="e")
                elsewhere.setdefault("host-b", []).append(e)
    accepted, result = outcome(lambda: validate_attached_endpoints(spec, node, raws, elsewhere), ValidationError)
    if not accepted:
        check_refusal(result)
        return
    keys = {n.name: wg_key(n.name) for n in spec.nodes}
    check_compiled(compile_nodes(spec, keys, {**elsewhere, node: list(result)}))


@fuzz_settings(ci_examples=600, campaign_examples=3000)
@given(valid_spec(), st.lists(st.binary(max_size=80), max_size=3))
def test_fuzz_attached_endpoint_messages(raw_spec: dict[str, Any], blobs: list[bytes]) -> None:
    """Endpoint reports as protobuf bytes (the Sync stream's EndpointReport), through the wire conversion."""
    count("attached-endpoint-messages")
    spec = parse_spec(raw_spec)
    raws = []
    for blob in blobs:
        try:
            raws.append(wire.endpoint_from_proto(spb.LocalEndpoint.FromString(blob)))
        except Exception:  # not a message: the stream's decoder refuses it before any handler
            continue
    report = cpb.EndpointReport(endpoints=[wire.endpoint_to_proto(r) for r in raws])
    assert [wire.endpoint_from_proto(e) for e in report.endpoints] == raws
    accepted, result = outcome(lambda: validate_attached_endpoints(spec, spec.nodes[0].name, raws, {}),
                               ValidationError)
    if not accepted:
        check_refusal(result)
