"""Small typed readers for untrusted mappings: each error names the field path."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from typing import Any

from . import addr
from .errors import CUT, ValidationError, shown

_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_WG_KEY_RE = re.compile(r"^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw480]=$")
_NETNS_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")


# Longest integer literal the JSON and YAML loaders convert (no field takes more than 8 digits): a
# longer one becomes an OversizedInteger that every reader refuses naming its field. Python cannot
# convert decimal literals beyond 4,300 digits, and YAML's base-60 literals (1:2:3) cost quadratic time.
MAX_INTEGER_TEXT = 100


class OversizedInteger:
    """An integer literal too long to convert, kept as its text (see MAX_INTEGER_TEXT)."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"{self.text[:20]}{CUT} ({len(self.text)} characters)"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, OversizedInteger) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)


def join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def key_path(path: str, key: object) -> str:
    """The path of a mapping entry whose key may be anything a loader produces (not only a string)."""
    return join(path, key if type(key) is str else shown(key, 60)[0])


def mapping(value: object, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValidationError(path or "<root>", value, "must be a mapping")
    return value


def no_unknown_keys(data: Mapping[str, Any], allowed: set[str], path: str) -> None:
    for key in data:
        if key not in allowed:
            raise ValidationError(key_path(path, key), data[key],
                                  f"unknown key (allowed: {', '.join(sorted(allowed))})")


def required(data: Mapping[str, Any], key: str, path: str) -> Any:
    if key not in data or data[key] is None:
        raise ValidationError(join(path, key), None, "is required")
    return data[key]


def string(value: object, path: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValidationError(path, value, "must be a non-empty string")
    return value


def name(value: object, path: str) -> str:
    text = string(value, path)
    if not _NAME_RE.match(text):
        raise ValidationError(
            path, value, "must be 1-63 lowercase letters, digits or '-', not starting or ending with '-'"
        )
    return text


def integer(value: object, path: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, OversizedInteger):
            raise ValidationError(path, value, f"must be in {low}..{high}")
        raise ValidationError(path, value, "must be an integer")
    if not low <= value <= high:
        raise ValidationError(path, value, f"must be in {low}..{high}")
    return value


def number(value: object, path: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if isinstance(value, OversizedInteger):
            raise ValidationError(path, value, f"must be in {low}..{high}")
        raise ValidationError(path, value, "must be a number")
    # Compared as given: Python compares int and float exactly, and float() of a huge int overflows.
    if not low <= value <= high:
        raise ValidationError(path, value, f"must be in {low}..{high}")
    return float(value)


def choice(value: object, path: str, options: Sequence[str]) -> str:
    if value not in options:
        raise ValidationError(path, value, f"must be one of {', '.join(options)}")
    assert isinstance(value, str)
    return value


def sequence(value: object, path: str) -> Sequence[Any]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValidationError(path, value, "must be a list")
    return value


def ip_address(value: object, path: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    text = string(value, path)
    try:
        return addr.parse(text)
    except ValueError:
        raise ValidationError(path, value, "must be an IPv4 or IPv6 address") from None


def ip_network(value: object, path: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    text = string(value, path)
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError:
        raise ValidationError(path, value, "must be a network in CIDR form with no host bits set") from None


def ip_interface(value: object, path: str) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    text = string(value, path)
    if "/" not in text:
        raise ValidationError(path, value, "must be an address with prefix length, e.g. 198.51.100.1/24")
    try:
        return ipaddress.ip_interface(text)
    except ValueError:
        raise ValidationError(path, value, "must be an address with prefix length") from None


def unicast_mac(value: object, path: str) -> str:
    text = string(value, path).lower()
    if not _MAC_RE.match(text):
        raise ValidationError(path, value, "must be a MAC address like 02:00:00:00:00:01")
    first = int(text[:2], 16)
    if first & 1:
        raise ValidationError(path, value, "must be a unicast MAC (multicast bit set)")
    if text == "00:00:00:00:00:00":
        raise ValidationError(path, value, "must not be all zeros")
    return text


def wg_public_key(value: object, path: str) -> str:
    text = string(value, path)
    if not _WG_KEY_RE.match(text):
        raise ValidationError(path, value, "must be a base64 WireGuard public key (44 characters ending in '=')")
    return text


def netns_name(value: object, path: str) -> str:
    text = string(value, path)
    if not _NETNS_RE.match(text) or text in {".", ".."}:
        raise ValidationError(path, value, "must be a network namespace name (letters, digits, '_', '.', '-')")
    return text


def ifname(value: object, path: str) -> str:
    text = string(value, path)
    if not _IFNAME_RE.match(text):
        raise ValidationError(path, value, "must be an interface name of at most 15 characters")
    return text
