"""Property: two spellings of one kernel object are never two different accepted values.

For each kind of value the agent hands to the kernel, ``wg`` or the
filesystem, hypothesis draws an object (MAC bytes, an IPv4/IPv6 address, a
network, a WireGuard key, a name) and many ways of writing it that some
consumer reads as that object: letter case, zero padding, ``::`` anywhere,
dotted IPv4 tails, IPv4-mapped forms, the forms ``inet_aton`` takes (``127.1``,
``0x7f.1``, octal), netmasks for prefixes, base64 with unused bits set or the
URL-safe alphabet, and surrounding whitespace or newlines. The validator must
either refuse a spelling or return exactly the object's canonical value; so
any two accepted spellings are equal and uniqueness checks cannot be bypassed.
The last tests check the same end to end, through the spec and the agent state.
"""

from __future__ import annotations

import base64
import copy
import ipaddress
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from factories import state
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from veilnet_agent.core import validate as v
from veilnet_agent.core.errors import ValidationError
from veilnet_agent.core.model import parse_node_state
from veilnet_agent.core.policy import parse_policy
from veilnet_controller.spec import AttachedClaims, load_spec_text, parse_attached_endpoint, parse_spec

EXAMPLE: dict[str, Any] = load_spec_text(  # type: ignore[assignment]
    (Path(__file__).resolve().parents[1] / "examples" / "network.yaml").read_text()
)
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# What may surround a value that a line-oriented consumer (wg setconf, a shell, a file name) trims or splits on.
# A newline is the likeliest (a value read with its line ending), so it is drawn most often.
JUNK = st.sampled_from(["\n", "\n", "\n", "\r\n", " ", "\t", "\x00", "\x0b", "\x0c", "\u00a0", "\u2028"])


def accepted(read: Callable[[object, str], Any], text: str) -> Any | None:
    try:
        return read(text, "f")
    except ValidationError as exc:
        assert exc.field == "f"
        return None


def padded(draw: st.DrawFn, text: str) -> str:
    """``text`` as it is, or with junk after it (the likeliest: a line read with its newline), before it or both."""
    where = draw(st.sampled_from(["none", "after", "after", "before", "both"]))
    return (draw(JUNK) if where in ("before", "both") else "") + text + (
        draw(JUNK) if where in ("after", "both") else "")


def cased(draw: st.DrawFn, text: str) -> str:
    return "".join(c.upper() if draw(st.booleans()) else c for c in text)


# --------------------------------------------------------------------------- MACs


@st.composite
def mac_spelling(draw: st.DrawFn, raw: bytes) -> str:
    octets = [f"{b:02x}" for b in raw]
    form = draw(st.sampled_from(["colon", "colon", "colon", "dash", "dot", "bare", "short"]))
    if form == "colon":
        text = ":".join(octets)
    elif form == "dash":
        text = "-".join(octets)
    elif form == "dot":  # Cisco style
        text = ".".join("".join(octets[i:i + 2]) for i in range(0, 6, 2))
    elif form == "bare":
        text = "".join(octets)
    else:  # what `ip link` also reads: leading zeros dropped
        text = ":".join(f"{b:x}" for b in raw)
    return padded(draw, cased(draw, text))


UNICAST = st.binary(min_size=6, max_size=6).map(lambda b: bytes([b[0] & 0xFE]) + b[1:])


@SETTINGS
@given(st.data(), st.one_of(UNICAST, st.binary(min_size=6, max_size=6)))
def test_mac_spellings_map_to_one_value(data: st.DataObject, raw: bytes) -> None:
    canonical = ":".join(f"{b:02x}" for b in raw)
    got = accepted(v.unicast_mac, data.draw(mac_spelling(raw)))
    assert got is None or got == canonical
    if not raw[0] & 1 and any(raw):
        assert v.unicast_mac(canonical.upper(), "f") == canonical


# --------------------------------------------------------------------------- IPv4


IPV4_FORMS = ("dotted", "dotted", "zeros", "hex", "octal", "short3", "short2", "int", "trailing-dot")


@st.composite
def ipv4_spelling(draw: st.DrawFn, value: int, mapped: bool = True) -> str:
    """Texts some consumer reads as IPv4 address ``value`` (with ``mapped``, also as IPv6 socket addresses)."""
    octets = list(value.to_bytes(4, "big"))
    form = draw(st.sampled_from(IPV4_FORMS + (("mapped", "mapped-hex") if mapped else ())))
    if form == "dotted":
        text = ".".join(map(str, octets))
    elif form == "zeros":
        text = ".".join(str(o).zfill(draw(st.integers(1, 4))) for o in octets)
    elif form == "hex":
        text = ".".join(hex(o) if draw(st.booleans()) else str(o) for o in octets)
    elif form == "octal":
        text = ".".join(f"0{o:o}" if draw(st.booleans()) else str(o) for o in octets)
    elif form == "short3":  # inet_aton: a.b.c with a 16-bit c
        text = f"{octets[0]}.{octets[1]}.{value & 0xFFFF}"
    elif form == "short2":
        text = f"{octets[0]}.{value & 0xFFFFFF}"
    elif form == "int":
        text = str(value) if draw(st.booleans()) else hex(value)
    elif form == "trailing-dot":
        text = ".".join(map(str, octets)) + "."
    elif form == "mapped":  # the same socket address to a dual-stack socket
        text = "::ffff:" + ".".join(map(str, octets))
    else:
        text = f"0:0:0:0:0:ffff:{value >> 16:x}:{value & 0xFFFF:x}"
    return padded(draw, cased(draw, text))


@SETTINGS
@given(st.data(), st.integers(0, 2**32 - 1))
def test_ipv4_spellings_map_to_one_value(data: st.DataObject, value: int) -> None:
    text = data.draw(ipv4_spelling(value))
    got = accepted(v.ip_address, text)
    assert got is None or got == ipaddress.IPv4Address(value), text
    assert v.ip_address(str(ipaddress.IPv4Address(value)), "f") == ipaddress.IPv4Address(value)


def test_ipv4_forms_inet_aton_takes_are_refused() -> None:
    for text in ("127.1", "0x7f.0.0.1", "0177.0.0.1", "2130706433", "127.000.0.1", "127.0.0.1 junk", "127.0.0.1\n"):
        assert socket.inet_aton(text) == socket.inet_aton("127.0.0.1")  # what other tools would read
        assert accepted(v.ip_address, text) is None, text


# --------------------------------------------------------------------------- IPv6


@st.composite
def ipv6_spelling(draw: st.DrawFn, value: int) -> str:
    groups = [(value >> (16 * (7 - i))) & 0xFFFF for i in range(8)]
    parts = [f"{g:x}".zfill(draw(st.integers(1, 4))) for g in groups]
    tail: list[str] = []
    if draw(st.booleans()):  # x:x:x:x:x:x:d.d.d.d
        tail = [".".join(map(str, (value & 0xFFFFFFFF).to_bytes(4, "big")))]
        parts = parts[:6]
    zero_runs = [(i, j) for i in range(len(parts)) for j in range(i + 1, len(parts) + 1)
                 if all(groups[k] == 0 for k in range(i, j))]
    compress: bool = draw(st.booleans())
    if zero_runs and compress:
        start, end = draw(st.sampled_from(zero_runs))
        text = ":".join(parts[:start]) + "::" + ":".join(parts[end:] + tail)
    else:
        text = ":".join(parts + tail)
    if draw(st.integers(0, 9)) == 0:
        text += draw(st.sampled_from(["%eth0", "%1", "%"]))
    return padded(draw, cased(draw, text))


ADDRESSES_V6 = st.one_of(
    st.integers(0, 2**128 - 1),
    st.integers(0, 2**16 - 1).map(lambda low: 0xFD00 << 112 | low),  # mostly zeros: many :: placements
    st.integers(0, 2**32 - 1).map(lambda v4: 0xFFFF << 32 | v4),  # IPv4-mapped
    st.integers(0, 2**32 - 1),  # ::/96, IPv4-compatible
)


@SETTINGS
@given(st.data(), ADDRESSES_V6)
def test_ipv6_spellings_map_to_one_value(data: st.DataObject, value: int) -> None:
    text = data.draw(ipv6_spelling(value))
    got = accepted(v.ip_address, text)
    ip = ipaddress.IPv6Address(value)
    if ip.ipv4_mapped is not None:
        assert got is None, f"{text!r} is {ip.ipv4_mapped} to a dual-stack socket: refused, not a second address"
    else:
        assert got is None or got == ip, text
        assert v.ip_address(str(ip), "f") == ip
    assert got is None or got.scope_id is None


# --------------------------------------------------------------------------- networks


Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Interface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


@st.composite
def prefixed_spelling(draw: st.DrawFn, host_bits: bool) -> tuple[Network | Interface, str]:
    """A network (or, with ``host_bits``, an interface address) and a spelling of it with its prefix or mask."""
    if draw(st.booleans()):
        prefix = draw(st.integers(0, 32))
        value = draw(st.integers(0, 2**32 - 1))
        if not host_bits:
            value = value >> (32 - prefix) << (32 - prefix)
        made: Network | Interface = (ipaddress.IPv4Interface((value, prefix)) if host_bits
                                     else ipaddress.IPv4Network((value, prefix)))
        address = draw(ipv4_spelling(value, mapped=False))
        netmask = ipaddress.IPv4Network((0, prefix)).netmask
        masks = [str(prefix), str(prefix).zfill(3), str(netmask)]
        if 0 < prefix < 32:  # a host mask (0.0.0.255); all-ones and all-zeros read as netmasks
            masks.append(str(ipaddress.IPv4Address(int(netmask) ^ 0xFFFFFFFF)))
        mask = draw(st.sampled_from(masks))
    else:
        prefix = draw(st.integers(0, 128))
        value = draw(ADDRESSES_V6)
        if not host_bits:
            value = value >> (128 - prefix) << (128 - prefix)
        made = ipaddress.IPv6Interface((value, prefix)) if host_bits else ipaddress.IPv6Network((value, prefix))
        address = draw(ipv6_spelling(value))
        mask = str(prefix).zfill(draw(st.integers(1, 4)))
    return made, padded(draw, address.strip() + "/" + mask)


@SETTINGS
@given(prefixed_spelling(host_bits=False))
def test_network_spellings_map_to_one_value(case: tuple[Network | Interface, str]) -> None:
    net, text = case
    got = accepted(v.ip_network, text)
    assert got is None or (got == net and str(got) == str(net)), text
    assert v.ip_network(str(net), "f") == net


@SETTINGS
@given(prefixed_spelling(host_bits=True))
def test_interface_spellings_map_to_one_value(case: tuple[Network | Interface, str]) -> None:
    interface, text = case
    got = accepted(v.ip_interface, text)
    assert got is None or (got == interface and str(got) == str(interface)), text
    if not (isinstance(interface, ipaddress.IPv6Interface) and interface.ip.ipv4_mapped is not None):
        assert v.ip_interface(str(interface), "f") == interface


# --------------------------------------------------------------------------- WireGuard keys


@st.composite
def key_spelling(draw: st.DrawFn, raw: bytes) -> str:
    text = base64.b64encode(raw).decode()
    form = draw(st.sampled_from(["std", "std", "unused-bits", "urlsafe", "unpadded", "double-pad", "split"]))
    if form == "unused-bits":  # same 32 bytes to lenient decoders; wg refuses it
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
        text = text[:42] + alphabet[alphabet.index(text[42]) | draw(st.integers(1, 3))] + "="
    elif form == "urlsafe":
        text = base64.urlsafe_b64encode(raw).decode()
    elif form == "unpadded":
        text = text.rstrip("=")
    elif form == "double-pad":
        text += "="
    elif form == "split":
        cut = draw(st.integers(1, 43))
        text = text[:cut] + draw(st.sampled_from(["\n", " ", "\r\n"])) + text[cut:]
    return padded(draw, text)


@SETTINGS
@given(st.data(), st.binary(min_size=32, max_size=32))
def test_key_spellings_map_to_one_value(data: st.DataObject, raw: bytes) -> None:
    canonical = base64.b64encode(raw).decode()
    text = data.draw(key_spelling(raw))
    got = accepted(v.wg_public_key, text)
    assert got is None or got == canonical, text
    if got is not None:
        assert base64.b64decode(got, validate=True) == raw
    assert v.wg_public_key(canonical, "f") == canonical


# --------------------------------------------------------------------------- names, namespaces, interfaces, labels


NAMES: list[tuple[Callable[[object, str], Any], str, bool]] = [
    # reader, the pattern its values follow, whether other-case spellings are other objects (case-sensitive)
    (v.name, r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", False),  # node names go into certificates (DNS labels)
    (v.netns_name, r"[A-Za-z0-9_.-]{1,64}", True),
    (v.ifname, r"[A-Za-z0-9_.-]{1,15}", True),
    (lambda value, path: parse_label(value), r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?", True),
]


def parse_label(value: object) -> str:
    from veilnet_agent.core.policy import label_text

    return label_text(value, "f")


@SETTINGS
@given(st.data(), st.sampled_from(range(len(NAMES))))
def test_name_spellings_are_the_exact_text_or_refused(data: st.DataObject, which: int) -> None:
    read, pattern, case_sensitive = NAMES[which]
    text = data.draw(st.from_regex(pattern, fullmatch=True))
    assume(text not in {".", ".."})
    assert read(text, "f") == text
    variant = data.draw(st.one_of(
        st.builds(lambda a, b: a + text + b, st.one_of(st.just(""), JUNK), JUNK),
        st.just(text.upper()),
        st.integers(0, len(text)).flatmap(lambda i: JUNK.map(lambda j: text[:i] + j + text[i:])),
    ))
    got = accepted(read, variant)
    if got is not None:
        assert got == variant, "a reader returns the text it accepted, unchanged"
        assert variant == text or (case_sensitive and variant == text.upper()), repr(variant)


@SETTINGS
@given(st.integers(1, 65535), st.integers(0, 65535), st.integers(0, 3), st.integers(0, 3), st.one_of(st.just(""), JUNK))
def test_port_range_spellings_map_to_one_value(first: int, width: int, zeros_a: int, zeros_b: int, junk: str) -> None:
    last = min(first + width, 65535)
    text = "0" * zeros_a + str(first) + "-" + "0" * zeros_b + str(last) + junk
    raw = {"name": "p", "source": {"cidr": "10.0.0.0/8"}, "destination": {"cidr": "10.0.0.0/8"},
           "protocol": "tcp", "ports": [text]}
    try:
        ports = parse_policy(raw, "p", set()).ports
    except ValidationError:
        assert junk != ""
        return
    assert (ports[0].first, ports[0].last) == (first, last)


# --------------------------------------------------------------------------- end to end


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_spec_never_holds_one_mac_twice_in_a_segment(data: st.DataObject) -> None:
    raw = copy.deepcopy(EXAMPLE)
    mac = bytes.fromhex("02000000ff01")
    first, second = data.draw(mac_spelling(mac)), data.draw(mac_spelling(mac))
    raw["endpoints"].append({"name": "a-x", "node": "host-a", "segment": "blue", "mac": first,
                             "ipv4": "203.0.113.50", "netns": "a-x"})
    raw["endpoints"].append({"name": "b-x", "node": "host-b", "segment": "blue", "mac": second,
                             "ipv4": "203.0.113.51", "netns": "b-x"})
    try:
        spec = parse_spec(raw)
    except ValidationError as exc:
        assert exc.field in ("endpoints[5].mac", "endpoints[6].mac"), str(exc)
        return
    raise AssertionError(f"two endpoints hold {spec.endpoints[5].mac}")


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_attached_endpoint_never_takes_a_spec_address(data: st.DataObject) -> None:
    table = AttachedClaims(parse_spec(EXAMPLE))
    taken = data.draw(st.sampled_from([("ipv6", 0xFD00_00B1 << 96 | 0x10), ("ipv6", 0xFD00_00B1 << 96 | 0x20),
                                       ("ipv4", int(ipaddress.IPv4Address("203.0.113.30")))]))
    family, value = taken
    text = data.draw(ipv6_spelling(value) if family == "ipv6" else ipv4_spelling(value))
    raw = {"name": "c-x", "segment": "blue", "mac": "02:00:00:ff:00:09", "netns": "c-x", family: text}
    try:
        table.check(parse_attached_endpoint("host-c", raw, "endpoints[0]"), "endpoints[0]")
    except ValidationError as exc:
        assert exc.field == f"endpoints[0].{family}", str(exc)
        return
    raise AssertionError(f"{text!r} was taken as a new address")


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_state_never_holds_one_key_twice(data: st.DataObject) -> None:
    raw = state(peers=2)
    key = base64.b64decode(raw["peers"][0]["public_key"])
    raw["peers"][0]["public_key"] = data.draw(key_spelling(key))
    raw["peers"][1]["public_key"] = data.draw(key_spelling(key))
    try:
        parse_node_state(raw)
    except ValidationError as exc:
        assert exc.field in ("peers[0].public_key", "peers[1].public_key"), str(exc)
        return
    raise AssertionError("two peers hold one key")
