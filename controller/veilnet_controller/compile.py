"""Compile a network spec into per-node agent states, and diff/patch those states.

``compile_nodes`` is pure: spec + public keys + attached endpoints in, one
plain JSON-compatible dict per node out, each exactly what
``veilnet_agent.core.model.parse_node_state`` accepts. A node learns only about the
segments it carries: their definitions, endpoints, peers' endpoints in them
and the policies that reference only them.

Returned dicts share structure: a peer's view (per peer and set of shared
segments), segment and policy lists (per set of carried segments) and
endpoint entries are built once and reused by every node that sees them.
Treat every returned dict and list as immutable.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

from veilnet_agent.core import addr
from veilnet_agent.core import validate as v
from veilnet_agent.core.errors import ValidationError

from .spec import NODE_LABEL_PREFIX, EndpointSpec, NetworkSpec

_SECTIONS = ("segments", "endpoints", "policies")


def compile_nodes(
    spec: NetworkSpec,
    public_keys: Mapping[str, str],
    attached: Mapping[str, Sequence[EndpointSpec]],
    excluded: Collection[str] = (),
    previous: dict[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """The agent state of every spec node not in ``excluded``, by node name.

    Peers are the other non-excluded nodes that have a key in ``public_keys``
    and share at least one segment. ``attached`` holds endpoints nodes attached
    through their local API (validated by ``validate_attached_endpoints``);
    ones in a segment their node no longer carries are left out.
    Raises ValidationError if a public key used is malformed or used twice.
    """
    excluded_set = set(excluded)
    nodes = [n for n in spec.nodes if n.name not in excluded_set]
    order = {s.name: i for i, s in enumerate(spec.segments)}
    raw_segments = {s.name: raw for s, raw in zip(spec.segments, spec.raw.get("segments") or [], strict=True)}
    raw_policies: Sequence[Mapping[str, Any]] = spec.raw.get("policies") or []
    policy_segments = [
        frozenset(s for s in (p.source.segment, p.destination.segment) if s is not None) for p in spec.policies
    ]
    keys = _checked_keys(nodes, public_keys)

    carried = {n.name: tuple(sorted(n.segments, key=order.__getitem__)) for n in nodes}
    carried_sets = {name: frozenset(segments) for name, segments in carried.items()}
    node_labels = {n.name: {NODE_LABEL_PREFIX + k: val for k, val in n.labels} for n in nodes}
    local: dict[str, list[dict[str, Any]]] = {n.name: [] for n in nodes}
    remote: dict[str, dict[str, list[dict[str, Any]]]] = {n.name: {} for n in nodes}

    def add_endpoint(e: EndpointSpec, node: str, *, echo: bool = True) -> None:
        if e.segment not in carried_sets[node]:
            return  # stale attachment: the node no longer carries the segment
        labels = {**dict(e.labels), **node_labels[node]}
        ips = [addr.text(ip) for ip in (e.ipv4, e.ipv6) if ip is not None]
        entry: dict[str, Any] = {"name": e.name, "segment": e.segment, "mac": e.mac}
        if e.ipv4 is not None:
            entry["ipv4"] = ips[0]
        if e.ipv6 is not None:
            entry["ipv6"] = ips[-1]
        entry["netns"] = e.netns
        entry["ifname"] = e.ifname
        remote_entry: dict[str, Any] = {"segment": e.segment, "mac": e.mac, "ips": ips}
        if labels:
            entry["labels"] = labels
            remote_entry["labels"] = labels
        if echo:
            local[node].append(entry)
        remote[node].setdefault(e.segment, []).append(remote_entry)

    for e in spec.endpoints:
        if e.node in local:
            add_endpoint(e, e.node)
    for node_name, endpoints in attached.items():
        if node_name in local:
            for e in endpoints:
                # Not echoed back: the attaching agent holds its own attachments (local API) and merges them.
                add_endpoint(e, node_name, echo=False)

    # Members of each segment that can be peers (have a key), in name order.
    members: dict[str, list[str]] = {s.name: [] for s in spec.segments}
    for n in sorted(nodes, key=lambda n: n.name):
        if n.name in keys:
            for s in n.segments:
                members[s].append(n.name)

    by_name = {n.name: n for n in nodes}
    views: dict[tuple[str, tuple[str, ...]], dict[str, Any]] = {}
    old_views: dict[tuple[str, tuple[str, ...]], dict[str, Any]] = (previous or {}).get("views", {})
    old_sets: dict[tuple[str, ...], tuple[list[Any], list[Any]]] = (previous or {}).get("sets", {})

    def view(peer: str, shared: tuple[str, ...]) -> dict[str, Any]:
        found = views.get((peer, shared))
        if found is not None:
            return found
        n = by_name[peer]
        endpoints: list[dict[str, Any]] = []
        for s in shared:
            endpoints.extend(remote[peer].get(s, ()))
        made: dict[str, Any] = {
            "name": peer,
            "underlay_address": addr.text(n.underlay_address),
            "underlay_port": n.underlay_port,
            "public_key": keys[peer],
            "transport_address": addr.text(n.transport_address.ip),
        }
        if n.keepalive:
            made["keepalive"] = n.keepalive
        made["endpoints"] = endpoints
        made["segments"] = list(shared)  # the VNIs this peer may send us frames for (anti-spoofing)
        before = old_views.get((peer, shared))
        if before is not None and before == made:
            made = before  # unchanged since the last compile: the same object, so diffs compare by identity
        views[(peer, shared)] = made
        return made

    # IPsec: every node's state says so (and carries the settings given, one shared dict); WireGuard, the
    # default, adds nothing, so its states stay what they were before IPsec existed.
    encryption: dict[str, Any] = {}
    if spec.encryption != "wireguard":
        encryption["encryption"] = spec.encryption
        if spec.ipsec:
            encryption["ipsec"] = dict(spec.ipsec)
    per_set: dict[tuple[str, ...], tuple[list[Any], list[Any]]] = {}
    states: dict[str, dict[str, Any]] = {}
    for n in nodes:
        mine = carried[n.name]
        sections = per_set.get(mine)
        if sections is None:
            mine_set = frozenset(mine)
            sections = (
                [raw_segments[s] for s in mine],
                [raw for raw, refs in zip(raw_policies, policy_segments, strict=True) if refs <= mine_set],
            )
            before_sets = old_sets.get(mine)
            if before_sets is not None:
                sections = (before_sets[0] if before_sets[0] == sections[0] else sections[0],
                            before_sets[1] if before_sets[1] == sections[1] else sections[1])
            per_set[mine] = sections
        shared: dict[str, list[str]] = {}
        for s in mine:  # spec order, so each shared list comes out in spec order
            for peer in members[s]:
                if peer != n.name:
                    got = shared.get(peer)
                    if got is None:
                        shared[peer] = [s]
                    else:
                        got.append(s)
        peers = [view(peer, tuple(shared[peer])) for peer in sorted(shared)]
        states[n.name] = {
            "node": n.name,
            "transport_address": str(n.transport_address),
            "segments": sections[0],
            "endpoints": local[n.name],
            "peers": peers,
            "policies": sections[1],
        }
        if node_labels[n.name]:
            # also for endpoints the agent attaches itself (the spec's own carry them already)
            states[n.name]["node_labels"] = node_labels[n.name]
        if encryption:
            states[n.name].update(encryption)
    if previous is not None:
        previous["views"] = views
        previous["sets"] = per_set
    return states


def _checked_keys(nodes: Sequence[Any], public_keys: Mapping[str, str]) -> dict[str, str]:
    keys: dict[str, str] = {}
    holders: dict[str, str] = {}
    for n in nodes:
        key = public_keys.get(n.name)
        if key is None:
            continue
        path = f"public_keys.{n.name}"
        key = v.wg_public_key(key, path)  # the canonical form: a variant of another node's key is that key
        if key in holders:
            raise ValidationError(path, key, f"the public key of node {holders[key]} too")
        holders[key] = n.name
        keys[n.name] = key
    return keys
