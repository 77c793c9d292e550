"""Segmentation policy: typed values and their validation (errors name the policy and field).

A policy allows flows from endpoints selected by ``source`` to endpoints
selected by ``destination`` for one protocol (and optional ports). Selectors
pick endpoints by segment and labels (``match_labels`` and ``in``/``notin``
expressions) or name a CIDR. Everything not allowed is dropped; inside a
segment in mode ``isolated`` traffic is free, in ``default-deny`` it needs a
policy too.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from . import validate as v
from .errors import ValidationError

Protocol = Literal["tcp", "udp", "icmp", "icmpv6", "any"]
SegmentMode = Literal["isolated", "default-deny"]
Operator = Literal["in", "notin"]
Labels = tuple[tuple[str, str], ...]  # sorted (key, value) pairs

PROTOCOL_NUMBERS: dict[str, int] = {"tcp": 6, "udp": 17, "icmp": 1, "icmpv6": 58}
_PROTOCOLS: dict[str, Protocol] = {"tcp": "tcp", "udp": "udp", "icmp": "icmp", "icmpv6": "icmpv6", "any": "any"}
MAX_LABELS = 64
# Kubernetes-style label keys and values (no user string reaches nft unchecked).
_LABEL_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?\Z")  # matched whole: \Z, never $
# A port range in a string: ASCII digits only (str.isdigit() also takes '²' and other scripts' digits).
_PORT_RANGE_RE = re.compile(r"([0-9]+)-([0-9]+)")


@dataclass(frozen=True)
class RateLimit:
    """Per-source limits on new connections and ICMP, in packets per second."""

    new_connections_per_second: int
    burst: int
    icmp_per_second: int


@dataclass(frozen=True)
class Expression:
    key: str
    operator: Operator
    values: frozenset[str]

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = labels.get(self.key)
        inside = present is not None and present in self.values
        return inside if self.operator == "in" else not inside


@dataclass(frozen=True)
class Selector:
    """Endpoints in ``segment`` (None: any segment) whose labels match, or a CIDR."""

    segment: str | None
    match_labels: Labels
    match_expressions: tuple[Expression, ...]
    cidr: ipaddress.IPv4Network | ipaddress.IPv6Network | None

    def matches(self, segment: str, labels: Mapping[str, str]) -> bool:
        if self.cidr is not None:
            return False
        if self.segment is not None and self.segment != segment:
            return False
        if any(labels.get(k) != want for k, want in self.match_labels):
            return False
        return all(e.matches(labels) for e in self.match_expressions)


@dataclass(frozen=True)
class PortRange:
    first: int
    last: int

    @property
    def width(self) -> int:
        return self.last - self.first + 1


@dataclass(frozen=True)
class Policy:
    name: str
    source: Selector
    destination: Selector
    protocol: Protocol
    ports: tuple[PortRange, ...]  # empty: every port (or no ports: icmp, any)


_POLICY_KEYS = {"name", "source", "destination", "protocol", "ports"}
_SELECTOR_KEYS = {"segment", "match_labels", "match_expressions", "cidr"}
_EXPRESSION_KEYS = {"key", "operator", "values"}
_RATE_LIMIT_KEYS = {"new_connections_per_second", "burst", "icmp_per_second"}


def label_text(value: object, path: str) -> str:
    if type(value) is str and _LABEL_RE.match(value):
        return value
    text = v.string(value, path) if not isinstance(value, (int, float, bool, v.OversizedInteger)) else None
    if text is None or not _LABEL_RE.match(text):
        raise ValidationError(
            path, value, "must be 1-63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
        )
    return text


def parse_labels(raw: object, path: str) -> Labels:
    if raw is None:
        return ()
    data = v.mapping(raw, path)
    if len(data) > MAX_LABELS:
        raise ValidationError(path, len(data), f"at most {MAX_LABELS} labels")
    pairs = [(k, label_text(val, f"{path}.{k}")) if type(k) is str and _LABEL_RE.match(k)
             else _refuse_label_key(k, path) for k, val in data.items()]
    return tuple(sorted(pairs))


def _refuse_label_key(key: object, path: str) -> tuple[str, str]:
    """A key that is no label key (a YAML number, a string with a newline): refused, with a path that is
    safe to build and show."""
    label_text(key, v.key_path(path, key))
    raise AssertionError("label_text refuses every key that is not a label key")


def parse_rate_limit(raw: object, path: str) -> RateLimit | None:
    if raw is None:
        return None
    data = v.mapping(raw, path)
    v.no_unknown_keys(data, _RATE_LIMIT_KEYS, path)
    rate = v.integer(v.required(data, "new_connections_per_second", path),
                     f"{path}.new_connections_per_second", 1, 1_000_000)
    burst = v.integer(data.get("burst", rate), f"{path}.burst", 1, 10_000_000)
    icmp = v.integer(data.get("icmp_per_second", 10), f"{path}.icmp_per_second", 1, 1_000_000)
    return RateLimit(new_connections_per_second=rate, burst=burst, icmp_per_second=icmp)


def parse_mode(raw: object, path: str) -> SegmentMode:
    mode = v.choice("isolated" if raw is None else raw, path, ("isolated", "default-deny"))
    return "isolated" if mode == "isolated" else "default-deny"


def _parse_selector(raw: object, path: str, segments: set[str]) -> Selector:
    data = v.mapping(raw, path)
    v.no_unknown_keys(data, _SELECTOR_KEYS, path)
    if data.get("cidr") is not None:
        others = [k for k in ("segment", "match_labels", "match_expressions") if data.get(k) is not None]
        if others:
            raise ValidationError(f"{path}.{others[0]}", data[others[0]], "cannot be combined with cidr")
        return Selector(None, (), (), v.ip_network(data["cidr"], f"{path}.cidr"))
    segment = None
    if data.get("segment") is not None:
        segment = v.name(data["segment"], f"{path}.segment")
        if segment not in segments:
            raise ValidationError(f"{path}.segment", segment, "names no segment of this node")
    labels = parse_labels(data.get("match_labels"), f"{path}.match_labels")
    expressions_raw = v.sequence(data.get("match_expressions", []), f"{path}.match_expressions")
    expressions = tuple(_parse_expression(e, f"{path}.match_expressions[{i}]") for i, e in enumerate(expressions_raw))
    if segment is None and not labels and not expressions:
        raise ValidationError(path, dict(data), "needs a segment, labels, expressions or a cidr")
    return Selector(segment, labels, expressions, None)


def _parse_expression(raw: object, path: str) -> Expression:
    data = v.mapping(raw, path)
    v.no_unknown_keys(data, _EXPRESSION_KEYS, path)
    key = label_text(v.required(data, "key", path), f"{path}.key")
    operator = v.choice(v.required(data, "operator", path), f"{path}.operator", ("in", "notin"))
    values_raw = v.sequence(v.required(data, "values", path), f"{path}.values")
    if not values_raw:
        raise ValidationError(f"{path}.values", [], "needs at least one value")
    values = frozenset(label_text(item, f"{path}.values[{i}]") for i, item in enumerate(values_raw))
    return Expression(key, "in" if operator == "in" else "notin", values)


def _parse_ports(raw: object, path: str) -> tuple[PortRange, ...]:
    items = v.sequence(raw, path)
    ports: list[PortRange] = []
    for i, item in enumerate(items):
        item_path = f"{path}[{i}]"
        if isinstance(item, str) and "-" in item:
            match = _PORT_RANGE_RE.fullmatch(item)
            if match is None:
                raise ValidationError(item_path, item, "must be a port or a range like 8000-8080")
            if max(len(match[1].lstrip("0")), len(match[2].lstrip("0"))) > 5:  # int() of 5,000 digits fails
                raise ValidationError(item_path, item, "must be in 1..65535")
            first, last = int(match[1]), int(match[2])
            v.integer(first, item_path, 1, 65535)
            v.integer(last, item_path, 1, 65535)
            if first > last:
                raise ValidationError(item_path, item, "range starts after it ends")
            ports.append(PortRange(first, last))
        else:
            port = v.integer(item, item_path, 1, 65535)
            ports.append(PortRange(port, port))
    return tuple(ports)


def parse_policy(raw: object, path: str, segments: set[str]) -> Policy:
    data = v.mapping(raw, path)
    v.no_unknown_keys(data, _POLICY_KEYS, path)
    name = v.name(v.required(data, "name", path), f"{path}.name")
    protocol = v.choice(data.get("protocol", "any"), f"{path}.protocol", ("tcp", "udp", "icmp", "icmpv6", "any"))
    source = _parse_selector(v.required(data, "source", path), f"{path}.source", segments)
    destination = _parse_selector(v.required(data, "destination", path), f"{path}.destination", segments)
    ports: tuple[PortRange, ...] = ()
    if data.get("ports") is not None:
        if protocol not in ("tcp", "udp"):
            raise ValidationError(f"{path}.ports", data["ports"], f"ports need protocol tcp or udp, not {protocol}")
        ports = _parse_ports(data["ports"], f"{path}.ports")
    if source.cidr is not None and destination.cidr is not None and source.cidr.version != destination.cidr.version:
        raise ValidationError(
            f"{path}.destination.cidr", str(destination.cidr), "is of another address family than source.cidr"
        )
    icmp_family = {"icmp": 4, "icmpv6": 6}.get(protocol)
    for side, sel in (("source", source), ("destination", destination)):
        if sel.cidr is not None and icmp_family is not None and sel.cidr.version != icmp_family:
            raise ValidationError(
                f"{path}.{side}.cidr", str(sel.cidr), f"an IPv{sel.cidr.version} network cannot carry {protocol}"
            )
    typed_protocol: Protocol = _PROTOCOLS[protocol]
    return Policy(name, source, destination, typed_protocol, ports)


def parse_policies(raw: object, segments: set[str]) -> tuple[Policy, ...]:
    items = v.sequence(raw if raw is not None else [], "policies")
    policies = tuple(parse_policy(item, f"policies[{i}]", segments) for i, item in enumerate(items))
    seen: dict[str, int] = {}
    for i, policy in enumerate(policies):
        if policy.name in seen:
            also = f"duplicate policy name, also at policies[{seen[policy.name]}]"
            raise ValidationError(f"policies[{i}].name", policy.name, also)
        seen[policy.name] = i
    return policies


def as_dict(labels: Labels) -> dict[str, str]:
    return dict(labels)


