"""Protobuf at the edge: node states, deltas and endpoints between messages and the state-file schema.

The agent validates one schema, the state-file dicts of ``model.parse_node_state``
(docs/config-reference.md). Messages from the controller are converted to
exactly those dicts, so a state arriving over gRPC and one read from a file go
through the same validation. Proto3 scalars have no presence: an empty string
or zero means "not given" and the key is left out, so the agent's defaults apply.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from veilnet.v1 import state_pb2 as pb

Raw = dict[str, Any]

_SEGMENT_TEXT = ("name", "encapsulation", "ipv4_subnet", "ipv4_gateway", "ipv6_subnet", "ipv6_gateway",
                 "gateway_mac", "mode")
_ENDPOINT_TEXT = ("name", "segment", "mac", "ipv4", "ipv6", "netns", "ifname")
_RATE_FIELDS = ("new_connections_per_second", "burst", "icmp_per_second")


def _text(raw: Mapping[str, Any], key: str) -> str:
    value = raw.get(key)
    return "" if value is None else str(value)


def _put_text(out: Raw, message: Any, keys: Iterable[str]) -> None:
    for key in keys:
        value = getattr(message, key)
        if value:
            out[key] = value


# --------------------------------------------------------------------------- segments


def segment_to_proto(raw: Mapping[str, Any]) -> pb.Segment:
    msg = pb.Segment(vni=int(raw["vni"]))
    for key in _SEGMENT_TEXT:
        setattr(msg, key, _text(raw, key))
    rate = raw.get("rate_limit")
    if rate is not None:
        msg.rate_limit.CopyFrom(pb.RateLimit(**{k: int(rate[k]) for k in _RATE_FIELDS if rate.get(k) is not None}))
    return msg


def segment_from_proto(msg: pb.Segment) -> Raw:
    out: Raw = {"name": msg.name, "vni": msg.vni}
    _put_text(out, msg, _SEGMENT_TEXT[1:])
    if msg.HasField("rate_limit"):
        out["rate_limit"] = {k: getattr(msg.rate_limit, k) for k in _RATE_FIELDS if getattr(msg.rate_limit, k)}
    return out


# --------------------------------------------------------------------------- endpoints


def endpoint_to_proto(raw: Mapping[str, Any]) -> pb.LocalEndpoint:
    msg = pb.LocalEndpoint(labels=dict(raw.get("labels") or {}))
    for key in _ENDPOINT_TEXT:
        setattr(msg, key, _text(raw, key))
    return msg


def endpoint_from_proto(msg: pb.LocalEndpoint) -> Raw:
    out: Raw = {}
    _put_text(out, msg, _ENDPOINT_TEXT)
    if msg.labels:
        out["labels"] = dict(msg.labels)
    return out


def _remote_endpoint_to_proto(raw: Mapping[str, Any]) -> pb.RemoteEndpoint:
    return pb.RemoteEndpoint(segment=_text(raw, "segment"), mac=_text(raw, "mac"),
                             ips=[str(ip) for ip in raw.get("ips") or ()], labels=dict(raw.get("labels") or {}))


def _remote_endpoint_from_proto(msg: pb.RemoteEndpoint) -> Raw:
    out: Raw = {"segment": msg.segment, "mac": msg.mac, "ips": list(msg.ips)}
    if msg.labels:
        out["labels"] = dict(msg.labels)
    return out


# --------------------------------------------------------------------------- peers


def peer_to_proto(raw: Mapping[str, Any]) -> pb.Peer:
    return pb.Peer(
        name=_text(raw, "name"),
        underlay_address=_text(raw, "underlay_address"),
        underlay_port=int(raw.get("underlay_port") or 0),
        public_key=_text(raw, "public_key"),
        transport_address=_text(raw, "transport_address"),
        keepalive=int(raw.get("keepalive") or 0),
        endpoints=[_remote_endpoint_to_proto(e) for e in raw.get("endpoints") or ()],
        segments=[str(s) for s in raw.get("segments") or ()],
    )


def peer_from_proto(msg: pb.Peer) -> Raw:
    out: Raw = {"name": msg.name, "underlay_address": msg.underlay_address, "public_key": msg.public_key,
                "transport_address": msg.transport_address}
    if msg.underlay_port:
        out["underlay_port"] = msg.underlay_port
    if msg.keepalive:
        out["keepalive"] = msg.keepalive
    if msg.endpoints:
        out["endpoints"] = [_remote_endpoint_from_proto(e) for e in msg.endpoints]
    if msg.segments:
        out["segments"] = list(msg.segments)
    return out


# --------------------------------------------------------------------------- policies


def _port_to_proto(item: object) -> pb.PortRange:
    if isinstance(item, str) and "-" in item:
        first, _, last = item.partition("-")
        return pb.PortRange(first=int(first), last=int(last))
    port = int(item)  # type: ignore[call-overload]
    return pb.PortRange(first=port, last=port)


def _port_from_proto(msg: pb.PortRange) -> int | str:
    if msg.last in (0, msg.first):
        return msg.first
    return f"{msg.first}-{msg.last}"


def _selector_to_proto(raw: Mapping[str, Any]) -> pb.Selector:
    return pb.Selector(
        segment=_text(raw, "segment"),
        cidr=_text(raw, "cidr"),
        match_labels=dict(raw.get("match_labels") or {}),
        match_expressions=[
            pb.Expression(key=e["key"], operator=e["operator"], values=[str(x) for x in e["values"]])
            for e in raw.get("match_expressions") or ()
        ],
    )


def _selector_from_proto(msg: pb.Selector) -> Raw:
    out: Raw = {}
    _put_text(out, msg, ("segment", "cidr"))
    if msg.match_labels:
        out["match_labels"] = dict(msg.match_labels)
    if msg.match_expressions:
        out["match_expressions"] = [
            {"key": e.key, "operator": e.operator, "values": list(e.values)} for e in msg.match_expressions
        ]
    return out


def policy_to_proto(raw: Mapping[str, Any]) -> pb.Policy:
    return pb.Policy(
        name=_text(raw, "name"),
        source=_selector_to_proto(raw.get("source") or {}),
        destination=_selector_to_proto(raw.get("destination") or {}),
        protocol=_text(raw, "protocol"),
        ports=[_port_to_proto(p) for p in raw.get("ports") or ()],
    )


def policy_from_proto(msg: pb.Policy) -> Raw:
    out: Raw = {"name": msg.name, "source": _selector_from_proto(msg.source),
                "destination": _selector_from_proto(msg.destination)}
    if msg.protocol:
        out["protocol"] = msg.protocol
    if msg.ports:
        out["ports"] = [_port_from_proto(p) for p in msg.ports]
    return out


# --------------------------------------------------------------------------- whole states and deltas


Memo = dict[int, tuple[object, Any]]


def _memo(memo: Memo | None, item: Any, convert: Any) -> Any:
    """``convert(item)``, once per object while ``memo`` lives (the memo keeps ``item`` alive: ids stay unique)."""
    if memo is None:
        return convert(item)
    found = memo.get(id(item))
    if found is not None and found[0] is item:
        return found[1]
    made = convert(item)
    memo[id(item)] = (item, made)
    return made


def _items(memo: Memo | None, items: Any, convert: Any) -> list[Any]:
    return _memo(memo, items, lambda xs: [convert(x) for x in xs or ()]) if items else []


# --------------------------------------------------------------------------- encryption
# In the state file: ``encryption`` ("wireguard", the default, or "ipsec") and ``ipsec`` (its settings);
# on the wire one EncryptionSettings, unset for the default.
_IPSEC_FIELDS = ("replay_window", "rotation_seconds")


def encryption_of(raw: Mapping[str, Any]) -> Raw:
    """The state's encryption keys (``encryption``, ``ipsec``), only those given."""
    return {k: raw[k] for k in ("encryption", "ipsec") if raw.get(k) is not None}


def encryption_to_proto(raw: Mapping[str, Any]) -> pb.EncryptionSettings | None:
    given = encryption_of(raw)
    if not given:
        return None
    msg = pb.EncryptionSettings(mode=_text(given, "encryption"))
    ipsec = given.get("ipsec")
    if isinstance(ipsec, Mapping):
        msg.ipsec.CopyFrom(pb.IpsecSettings(**{k: int(ipsec[k]) for k in _IPSEC_FIELDS if ipsec.get(k)}))
    return msg


def encryption_from_proto(msg: pb.EncryptionSettings) -> Raw:
    out: Raw = {}
    if msg.mode:
        out["encryption"] = msg.mode
    if msg.HasField("ipsec"):
        out["ipsec"] = {k: getattr(msg.ipsec, k) for k in _IPSEC_FIELDS if getattr(msg.ipsec, k)}
    return out


def state_to_proto(raw: Mapping[str, Any], memo: Memo | None = None) -> pb.NodeState:
    return pb.NodeState(
        encryption=encryption_to_proto(raw),
        node=_text(raw, "node"),
        transport_address=_text(raw, "transport_address"),
        segments=_items(memo, raw.get("segments"), segment_to_proto),
        endpoints=[endpoint_to_proto(e) for e in raw.get("endpoints") or ()],
        peers=[_memo(memo, p, peer_to_proto) for p in raw.get("peers") or ()],
        policies=_items(memo, raw.get("policies"), policy_to_proto),
        node_labels=dict(raw.get("node_labels") or {}),
    )


def state_from_proto(msg: pb.NodeState) -> Raw:
    """The state-file dict of a snapshot (always with every section, possibly empty)."""
    return {
        "node": msg.node,
        "transport_address": msg.transport_address,
        "segments": [segment_from_proto(s) for s in msg.segments],
        "endpoints": [endpoint_from_proto(e) for e in msg.endpoints],
        "peers": [peer_from_proto(p) for p in msg.peers],
        "policies": [policy_from_proto(p) for p in msg.policies],
        **({"node_labels": dict(msg.node_labels)} if msg.node_labels else {}),
        **(encryption_from_proto(msg.encryption) if msg.HasField("encryption") else {}),
    }


_SECTIONS = ("segments", "endpoints", "policies")


@dataclass(frozen=True)
class Delta:
    """What changed in one node's state: whole sections (None: unchanged) and peers by name."""

    transport_address: str | None = None
    segments: list[dict[str, Any]] | None = None
    endpoints: list[dict[str, Any]] | None = None
    policies: list[dict[str, Any]] | None = None
    peer_upserts: list[dict[str, Any]] = field(default_factory=list)
    peer_removes: list[str] = field(default_factory=list)
    node_labels: dict[str, str] | None = None
    encryption: dict[str, Any] | None = None  # the state's encryption keys, replaced whole ({}: the default)

    @property
    def peers_only(self) -> bool:
        return (self.transport_address is None and self.segments is None and self.endpoints is None
                and self.policies is None and self.node_labels is None and self.encryption is None)

    def is_empty(self) -> bool:
        return self.peers_only and not self.peer_upserts and not self.peer_removes


def _changed(old: object, new: object) -> bool:
    return old is not new and old != new


def diff_states(old: Mapping[str, Any], new: Mapping[str, Any]) -> Delta:
    """The delta that turns ``old`` into ``new`` (two states of one node). O(peers) comparisons."""
    sections: dict[str, list[dict[str, Any]] | None] = {}
    for key in _SECTIONS:
        new_value = new.get(key, [])
        sections[key] = new_value if _changed(old.get(key, []), new_value) else None
    transport = new.get("transport_address")
    new_labels = new.get("node_labels") or {}
    labels_changed = _changed(old.get("node_labels") or {}, new_labels)
    old_peers = {p["name"]: p for p in old.get("peers", [])}
    new_names: set[str] = set()
    upserts: list[dict[str, Any]] = []
    for p in new.get("peers", []):
        name = p["name"]
        new_names.add(name)
        before = old_peers.get(name)
        if before is None or _changed(before, p):
            upserts.append(p)
    removes = sorted(name for name in old_peers if name not in new_names)
    new_encryption = encryption_of(new)
    return Delta(
        encryption=new_encryption if _changed(encryption_of(old), new_encryption) else None,
        transport_address=transport if _changed(old.get("transport_address"), transport) else None,
        segments=sections["segments"],
        endpoints=sections["endpoints"],
        policies=sections["policies"],
        peer_upserts=upserts,
        peer_removes=removes,
        node_labels=dict(new_labels) if labels_changed else None,
    )


def apply_delta(state: Mapping[str, Any], delta: Delta) -> dict[str, Any]:
    """``state`` with ``delta`` applied (a new dict; ``state`` is unchanged). Peers end sorted by name."""
    result = dict(state)
    if delta.transport_address is not None:
        result["transport_address"] = delta.transport_address
    for key in _SECTIONS:
        value = getattr(delta, key)
        if value is not None:
            result[key] = value
    if delta.node_labels is not None:
        if delta.node_labels:
            result["node_labels"] = dict(delta.node_labels)
        else:
            result.pop("node_labels", None)
    if delta.encryption is not None:
        result.pop("encryption", None)
        result.pop("ipsec", None)
        result.update(delta.encryption)
    if delta.peer_upserts or delta.peer_removes or "peers" not in result:
        peers = {p["name"]: p for p in state.get("peers", [])}
        for name in delta.peer_removes:
            peers.pop(name, None)
        for p in delta.peer_upserts:
            peers[p["name"]] = p
        result["peers"] = [peers[name] for name in sorted(peers)]
    return result


def delta_to_proto(delta: Delta, memo: Memo | None = None) -> pb.StateDelta:
    msg = pb.StateDelta(
        transport_address=delta.transport_address or "",
        peer_upserts=[_memo(memo, p, peer_to_proto) for p in delta.peer_upserts],
        peer_removes=list(delta.peer_removes),
    )
    if delta.segments is not None:
        msg.segments.SetInParent()
        msg.segments.items.extend(_items(memo, delta.segments, segment_to_proto))
    if delta.endpoints is not None:
        msg.endpoints.SetInParent()
        msg.endpoints.items.extend(endpoint_to_proto(e) for e in delta.endpoints)
    if delta.policies is not None:
        msg.policies.SetInParent()
        msg.policies.items.extend(_items(memo, delta.policies, policy_to_proto))
    if delta.node_labels is not None:
        msg.node_labels.SetInParent()
        msg.node_labels.items.update(delta.node_labels)
    if delta.encryption is not None:
        msg.encryption.CopyFrom(encryption_to_proto(delta.encryption) or pb.EncryptionSettings())
    return msg


def delta_from_proto(msg: pb.StateDelta) -> Delta:
    return Delta(
        transport_address=msg.transport_address or None,
        segments=[segment_from_proto(s) for s in msg.segments.items] if msg.HasField("segments") else None,
        endpoints=[endpoint_from_proto(e) for e in msg.endpoints.items] if msg.HasField("endpoints") else None,
        policies=[policy_from_proto(p) for p in msg.policies.items] if msg.HasField("policies") else None,
        peer_upserts=[peer_from_proto(p) for p in msg.peer_upserts],
        peer_removes=list(msg.peer_removes),
        node_labels=dict(msg.node_labels.items) if msg.HasField("node_labels") else None,
        encryption=encryption_from_proto(msg.encryption) if msg.HasField("encryption") else None,
    )


def endpoints_to_proto(raws: Sequence[Mapping[str, Any]]) -> list[pb.LocalEndpoint]:
    return [endpoint_to_proto(r) for r in raws]
