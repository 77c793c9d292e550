"""Read a desired-state file (JSON or YAML) and turn successive versions into validated states.

``StateFileTracker`` remembers the last accepted file contents: when only
peers changed, the new state is derived from the old one with
``model.update_peers`` (validating just those peers), so a one-peer change
in a 5,000-peer file does not re-validate and re-render 5,000 peers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core import loading
from ..core.model import NodeState, parse_node_state, update_peers

MAX_STATE_FILE_BYTES = 64 * 1024 * 1024
MAX_DEPTH = 64  # the deepest a valid state goes is 7; libyaml's loader overflows the C stack at ~100,000
# YAML aliases may make a small text expand to a huge structure that validation walks in full.
MAX_EXPANDED_VALUES = 8_000_000


def read_state_file(path: Path) -> object:
    """The file's parsed contents, not yet validated: JSON if its name ends in ``.json``, else YAML.

    Read through ``loading`` like the controller's spec: UTF-8, plain JSON-like values only (no YAML
    tags; dates are strings), no duplicate keys, YAML nesting at most MAX_DEPTH deep and aliases
    expanding to at most MAX_EXPANDED_VALUES values; integer literals too long to be valid anywhere
    load as ``OversizedInteger`` (refused by the validators naming their field). Every failure is a
    ValidationError on ``state-file`` whose value is the path and whose reason names line and column.
    """
    data = loading.read_bytes(path, "state-file", MAX_STATE_FILE_BYTES)
    return parse_state_text(data, str(path), "json" if path.suffix == ".json" else "yaml")


def parse_state_text(data: bytes | str, source: str, fmt: str) -> object:
    """State-file contents (``fmt`` "json" or "yaml") to plain values, not yet validated; ``source`` names
    the file in errors."""
    text = loading.decode_utf8(data, "state-file", source) if isinstance(data, bytes) else data
    if fmt == "json":
        return loading.load_json_text(text, "state-file", source)
    return loading.load_yaml_text(text, "state-file", source, max_depth=MAX_DEPTH, max_values=MAX_EXPANDED_VALUES)


def load_state_file(path: Path) -> NodeState:
    return parse_node_state(read_state_file(path))


@dataclass(frozen=True)
class PendingState:
    """A validated new state, not yet accepted. ``changed_peers`` None means everything may have changed."""

    state: NodeState
    changed_peers: frozenset[str] | None
    raw_rest: Mapping[str, Any]
    raw_peers: Mapping[str, Any]


class StateFileTracker:
    def __init__(self) -> None:
        self.state: NodeState | None = None
        self._raw_rest: Mapping[str, Any] | None = None
        self._raw_peers: Mapping[str, Any] = {}

    def prepare(self, raw: object) -> PendingState | None:
        """Validate ``raw`` against the last committed state; None if nothing changed. Raises ValidationError."""
        by_name = _peers_by_name(raw)
        if self.state is None or by_name is None or not isinstance(raw, Mapping):
            return self._full(raw)
        rest = {k: v for k, v in raw.items() if k != "peers"}
        if rest != self._raw_rest:
            return self._full(raw)
        upserts = [(path, peer) for name, (path, peer) in by_name.items() if self._raw_peers.get(name) != peer]
        removes = [name for name in self._raw_peers if name not in by_name]
        order = list(by_name)  # the file's order, which a full parse of it would give
        if not upserts and not removes:
            if order == [p.name for p in self.state.peers]:
                return None
            # Only reordered: the same peers in the file's order (nothing to render or apply).
            state = update_peers(self.state, [], [], order)
            return PendingState(state, frozenset(), rest, {n: p for n, (_, p) in by_name.items()})
        state = update_peers(self.state, upserts, removes, order)
        changed = frozenset(removes) | frozenset(peer["name"] for _, peer in upserts)
        return PendingState(state, changed, rest, {n: p for n, (_, p) in by_name.items()})

    def _full(self, raw: object) -> PendingState:
        state = parse_node_state(raw)
        assert isinstance(raw, Mapping)
        by_name = _peers_by_name(raw) or {}
        rest = {k: v for k, v in raw.items() if k != "peers"}
        return PendingState(state, None, rest, {n: p for n, (_, p) in by_name.items()})

    def commit(self, pending: PendingState) -> None:
        self.state = pending.state
        self._raw_rest = pending.raw_rest
        self._raw_peers = pending.raw_peers


def _peers_by_name(raw: object) -> dict[str, tuple[str, Any]] | None:
    """Raw peers by name with their field path, or None if they are not well-formed enough to diff."""
    if not isinstance(raw, Mapping):
        return None
    peers = raw.get("peers", [])
    if not isinstance(peers, list):
        return None
    by_name: dict[str, tuple[str, Any]] = {}
    for i, peer in enumerate(peers):
        if not isinstance(peer, Mapping) or not isinstance(peer.get("name"), str) or peer["name"] in by_name:
            return None
        by_name[peer["name"]] = (f"peers[{i}]", peer)
    return by_name
