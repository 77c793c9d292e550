r"""Small typed readers for untrusted mappings: each error names the field path.

Every reader returns the value in one canonical form (a lower-case MAC, an
``ipaddress`` object without scope, a WireGuard key in the one base64 encoding
of its 32 bytes) or refuses it, so that two accepted values are equal exactly
when the kernel, ``wg`` and the filesystem read them as the same thing:
uniqueness checks compare what is returned, never the raw text. Patterns are
matched against the whole text (``fullmatch``, or ``match`` of a pattern ending
in ``\Z``; ``$`` would also match before a trailing newline).
"""

from __future__ import annotations

import binascii
import ipaddress
import re
from collections.abc import Mapping, Sequence
from typing import Any

from . import addr
from .errors import CUT, ValidationError, shown

# Matched whole: fullmatch, or match with \Z on the hot paths (a little cheaper). Never "$", which also
# matches before a trailing newline.
_NAME_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")
_MAC_RE = re.compile(r"[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}\Z")
_WG_KEY_RE = re.compile(r"[A-Za-z0-9+/]{43}=")
# The canonical encodings: the last character before '=' carries 4 key bits and 2 unused (zero) ones.
_CANONICAL_WG_KEY_RE = re.compile(r"[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=\Z")
_NETNS_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_IFNAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,15}")
_DOT_NAMES = frozenset({".", ".."})  # a directory, not a namespace file; the kernel refuses them as ifnames

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


_PLAIN_KEY_RE = re.compile(r"[A-Za-z0-9_.-]{1,100}")


def key_path(path: str, key: object) -> str:
    """The path of a mapping entry whose key may be anything a loader produces (not only a string).

    A key of letters, digits, ``_``, ``.`` and ``-`` is written as it is; any other is quoted, cut
    and escaped (``nodes[0].'bad\\nkey'``), so a path never carries a newline or a megabyte."""
    if type(key) is str and _PLAIN_KEY_RE.fullmatch(key):
        return join(path, key)
    return join(path, shown(key, 60)[0])


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
    if type(value) is not str or value not in options:
        raise ValidationError(path, value, f"must be one of {', '.join(options)}")
    return value


def sequence(value: object, path: str) -> Sequence[Any]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValidationError(path, value, "must be a list")
    return value


def ip_address(value: object, path: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An IPv4 (dotted quad, no leading zeros) or IPv6 address, without scope; IPv4-mapped IPv6 is refused."""
    text = string(value, path)
    try:
        return addr.parse(text)
    except addr.MappedAddressError as exc:
        raise ValidationError(path, value, _mapped_reason(exc.ipv4)) from None
    except ValueError:
        raise ValidationError(path, value, "must be an IPv4 or IPv6 address") from None


def _mapped_reason(v4: ipaddress.IPv4Address) -> str:
    return f"is an IPv4-mapped IPv6 address: the kernel reads it as the IPv4 address {v4}, write that"


def ip_network(value: object, path: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    text = string(value, path)
    try:
        if "%" in text:
            raise ValueError("scope")  # ipaddress keeps a scope ID that the kernel has no place for
        return ipaddress.ip_network(text, strict=True)
    except ValueError:
        raise ValidationError(path, value, "must be a network in CIDR form with no host bits set") from None


def ip_interface(value: object, path: str) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    text = string(value, path)
    if "/" not in text:
        raise ValidationError(path, value, "must be an address with prefix length, e.g. 198.51.100.1/24")
    try:
        if "%" in text:
            raise ValueError("scope")
        interface = ipaddress.ip_interface(text)
    except ValueError:
        raise ValidationError(path, value, "must be an address with prefix length") from None
    if isinstance(interface, ipaddress.IPv6Interface) and interface.ip.ipv4_mapped is not None:
        raise ValidationError(path, value, _mapped_reason(interface.ip.ipv4_mapped))
    return interface


def unicast_mac(value: object, path: str) -> str:
    """Six colon-separated pairs of hex digits, any case; returned lower-case (as the kernel writes it)."""
    text = string(value, path)
    if not _MAC_RE.match(text):
        raise ValidationError(path, value, "must be a MAC address like 02:00:00:00:00:01")
    text = text.lower()
    first = int(text[:2], 16)
    if first & 1:
        raise ValidationError(path, value, "must be a unicast MAC (multicast bit set)")
    if text == "00:00:00:00:00:00":
        raise ValidationError(path, value, "must not be all zeros")
    return text


def wg_public_key(value: object, path: str) -> str:
    """A WireGuard public key: 32 bytes in base64, in the one encoding ``wg`` accepts (its unused bits zero)."""
    text = string(value, path)
    if _CANONICAL_WG_KEY_RE.match(text):
        return text  # exactly the texts that are b2a_base64(a2b_base64(text)) (tests check it): no decoding needed
    if not _WG_KEY_RE.fullmatch(text):
        raise ValidationError(path, value, "must be a base64 WireGuard public key (44 characters ending in '=')")
    # Bits past the 256th are set: lenient base64 decoders ignore them, wg refuses the key.
    canonical = binascii.b2a_base64(binascii.a2b_base64(text), newline=False).decode("ascii")
    raise ValidationError(path, value, f"is not canonical base64, which wg requires (canonical: {canonical})")


def netns_name(value: object, path: str) -> str:
    text = string(value, path)
    if not _NETNS_RE.fullmatch(text) or text in _DOT_NAMES:
        raise ValidationError(path, value, "must be a network namespace name (letters, digits, '_', '.', '-')")
    return text


def ifname(value: object, path: str) -> str:
    text = string(value, path)
    if not _IFNAME_RE.fullmatch(text) or text in _DOT_NAMES:
        raise ValidationError(path, value, "must be an interface name of at most 15 characters")
    return text
