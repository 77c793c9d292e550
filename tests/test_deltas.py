"""The delta paths (peer updates, per-peer re-render, state-file tracking) equal a full re-parse."""

from __future__ import annotations

import copy

import pytest
from factories import peer, state, wg_key
from hypothesis import given, settings
from hypothesis import strategies as st

from veilnet_agent.app.statefile import StateFileTracker
from veilnet_agent.core.encryption import WireGuardHost
from veilnet_agent.core.errors import ValidationError
from veilnet_agent.core.model import parse_node_state, update_peers
from veilnet_agent.core.render import NodeContext, render_all, render_peer_changes

CTX = NodeContext(encryption=WireGuardHost(public_key="A" * 43 + "=", listen_port=51820), underlay_mtu=1500,
                  underlay_family=4)


def test_update_peers_equals_full_parse() -> None:
    raw = state(peers=6)
    base = parse_node_state(raw)
    changed = peer(3)
    changed["keepalive"] = 25
    new_raw = copy.deepcopy(raw)
    new_raw["peers"][3] = changed
    del new_raw["peers"][1]
    new_raw["peers"].append(peer(9))
    derived = update_peers(base, [("peers[3]", changed), ("peers[6]", peer(9))], ["peer-1"])
    full = parse_node_state(new_raw)
    assert sorted(derived.peers, key=lambda p: p.name) == sorted(full.peers, key=lambda p: p.name)
    assert derived.claims.holder.keys() == full.claims.holder.keys()
    assert len(base.peers) == 6, "the old state is untouched"


@pytest.mark.parametrize(
    ("mutate", "field", "message"),
    [
        (lambda p: p.update(public_key=wg_key("peer-0")), "peers[9].public_key", "duplicate public key"),
        (lambda p: p.update(transport_address="fd00:7::2"), "peers[9].transport_address", "duplicate transport"),
        (lambda p: p["endpoints"][0].update(mac="02:00:00:0a:00:01"), "peers[9].endpoints[0].mac", "already used"),
        (lambda p: p["endpoints"][0].update(ips=["fd00:b1::a"]), "peers[9].endpoints[0].ips[0]", "already used"),
        (lambda p: p.update(name="host-a"), "peers[9].name", "duplicate node name"),
        (lambda p: p["endpoints"][0].update(segment="red"), "peers[9].endpoints[0].segment", "names no segment"),
    ],
)
def test_bad_peer_delta_is_rejected_and_changes_nothing(mutate, field: str, message: str) -> None:  # type: ignore[no-untyped-def]
    base = parse_node_state(state(peers=3))
    holders = dict(base.claims.holder)
    bad = peer(9)
    mutate(bad)
    with pytest.raises(ValidationError) as info:
        update_peers(base, [("peers[9]", bad)], [])
    assert info.value.field == field
    assert message in str(info.value)
    assert base.claims.holder == holders and len(base.peers) == 3


def test_removing_unknown_peer_is_an_error() -> None:
    with pytest.raises(ValidationError, match="names no peer"):
        update_peers(parse_node_state(state(peers=2)), [], ["nobody"])


def test_released_claims_can_be_reused() -> None:
    base = parse_node_state(state(peers=2))
    moved = peer(5)
    moved["public_key"] = wg_key("peer-1")  # peer-1's key, taken over by a new peer in the same delta
    derived = update_peers(base, [("peers[1]", moved)], ["peer-1"])
    assert {p.name for p in derived.peers} == {"peer-0", "peer-5"}


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(0, 11), unique=True, max_size=12),
    st.lists(st.integers(0, 11), unique=True, max_size=12),
    st.sampled_from(["vxlan", "geneve"]),
    st.booleans(),
)
def test_render_peer_changes_equals_full_render(a: list[int], b: list[int], encap: str, v6_peer: bool) -> None:
    raw_a = state(peers=0)
    raw_a["segments"][0]["encapsulation"] = encap
    raw_a["peers"] = [peer(i) for i in a]
    raw_b = copy.deepcopy(raw_a)
    raw_b["peers"] = [peer(i) for i in b]
    if v6_peer and raw_b["peers"]:
        raw_b["peers"][0]["underlay_address"] = "2001:db8::99"
    before, after = parse_node_state(raw_a), parse_node_state(raw_b)
    changed = {f"peer-{i}" for i in set(a) ^ set(b)} | ({raw_b["peers"][0]["name"]} if v6_peer and b else set())
    patched = render_peer_changes(render_all(before, CTX), after, CTX, changed)
    assert patched.target == render_all(after, CTX).target


def test_tracker_turns_peer_only_changes_into_deltas() -> None:
    tracker = StateFileTracker()
    raw = state(peers=4)
    first = tracker.prepare(copy.deepcopy(raw))
    assert first is not None and first.changed_peers is None
    tracker.commit(first)
    assert tracker.prepare(copy.deepcopy(raw)) is None, "same contents: nothing to do"

    raw["peers"][2]["keepalive"] = 10
    raw["peers"].append(peer(7))
    delta = tracker.prepare(copy.deepcopy(raw))
    assert delta is not None and delta.changed_peers == {"peer-2", "peer-7"}
    tracker.commit(delta)

    raw["segments"][1]["vni"] = 201
    full = tracker.prepare(copy.deepcopy(raw))
    assert full is not None and full.changed_peers is None


def test_tracker_rejected_change_keeps_last_good() -> None:
    tracker = StateFileTracker()
    raw = state(peers=2)
    first = tracker.prepare(raw)
    assert first is not None
    tracker.commit(first)
    bad = copy.deepcopy(raw)
    bad["peers"][1]["public_key"] = bad["peers"][0]["public_key"]
    with pytest.raises(ValidationError, match="duplicate public key"):
        tracker.prepare(bad)
    assert tracker.state is first.state
    good = copy.deepcopy(raw)
    good["peers"][1]["keepalive"] = 5
    delta = tracker.prepare(good)
    assert delta is not None and delta.changed_peers == {"peer-1"}
