"""What the fuzz targets found beyond the crashers of issue #14, each kept as a deterministic test.

(The crashers of the issue itself: ``tests/test_loading.py``; the guards: ``tests/test_rpc_guard.py``
and ``tests/test_agent_guard.py``.)
"""

from __future__ import annotations

import copy

from factories import peer, state

from veilnet_agent.app.statefile import StateFileTracker
from veilnet_agent.core.model import parse_node_state, update_peers


def _tracked(raw: dict[str, object]) -> StateFileTracker:
    tracker = StateFileTracker()
    first = tracker.prepare(copy.deepcopy(raw))
    assert first is not None
    tracker.commit(first)
    return tracker


def test_an_incremental_peer_update_keeps_the_files_peer_order() -> None:
    """test_fuzz_incremental_peers: a changed peer moved to the end of the state (and a new one went last
    wherever the file had it), so the state differed from a full parse of the same file."""
    raw = state(peers=4)
    tracker = _tracked(raw)
    raw["peers"][1]["keepalive"] = 25  # changed in place
    raw["peers"].insert(0, peer(9))  # new, first in the file
    pending = tracker.prepare(copy.deepcopy(raw))
    assert pending is not None and pending.changed_peers == {"peer-1", "peer-9"}
    assert pending.state == parse_node_state(raw)
    assert [p.name for p in pending.state.peers] == ["peer-9", "peer-0", "peer-1", "peer-2", "peer-3"]


def test_peers_only_reordered_take_the_files_order_and_touch_nothing() -> None:
    raw = state(peers=3)
    tracker = _tracked(raw)
    raw["peers"].reverse()
    pending = tracker.prepare(copy.deepcopy(raw))
    assert pending is not None and pending.changed_peers == frozenset()
    assert pending.state == parse_node_state(raw)


def test_update_peers_without_an_order_keeps_replaced_peers_in_place() -> None:
    base = parse_node_state(state(peers=3))
    changed = peer(1)
    changed["keepalive"] = 5
    derived = update_peers(base, [("peers[1]", changed), ("peers[3]", peer(7))], [])
    assert [p.name for p in derived.peers] == ["peer-0", "peer-1", "peer-2", "peer-7"]
