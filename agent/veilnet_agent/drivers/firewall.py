"""Firewall driver: the agent's own nftables tables, ``inet veilnet`` and ``bridge veilnet``.

The driver talks to libnftables through the official Python bindings
(Debian's ``python3-nftables``), always in JSON built as data: nothing is
parsed from nft's text output, and nothing outside our two tables is read or
written. The ruleset is never flushed.

Transactions: every write is ONE libnftables call, which it sends as one
netlink batch; the kernel applies all of it or none of it, so a rejected
batch leaves the previous ruleset exactly as it was.

- :meth:`FirewallDriver.apply_full` replaces both tables whole:
  ``add table; delete table; <structure>; add element ...`` (``flush table``
  would keep set elements and named counters). This one is sent as nft text
  rendered by :mod:`veilnet_agent.core.nft_text` from the compiled JSON, because
  nft 1.0.6 cannot declare the anti-spoofing sets (``typeof`` with raw payload
  fields) in JSON; every string in it is checked against a strict pattern.
- :meth:`FirewallDriver.apply_elements` changes the managed sets' elements only
  (allow maps, anti-spoofing sets), in JSON: ``delete element ...; add element ...``.

Element encoding (the compiler's): a key is a tuple of strings and ints;
addresses are canonical text (``ipaddress``), CIDRs ``"a/len"`` (interval
maps only), protocols ints, ports ints or ``"lo-hi"`` (interval maps only).
A one-part key is written as a bare value, a longer one as a ``concat``. The
value is the verdict chain (``jump``); ``"goto:<chain>"``, ``"accept"``,
``"drop"``, ``"return"`` and ``"continue"`` are understood too, and ``""``
stands for a plain set element (no value). Reading back undoes nft's
renderings: protocol names (``"tcp"``, ``"ipv6-icmp"``) become numbers, a
full-length prefix becomes a plain address, ``lo == hi`` ranges a plain port.

Fingerprint: nft 1.0.6 silently ignores a table's ``comment`` in JSON input
and leaves it out of JSON output (chains and sets likewise); rule and named
counter comments do round-trip. The compiler therefore puts the fingerprint
in a rule comment (``veilnet:fingerprint:<fp>``); :meth:`observe` takes the
table's comment if nft reports one (newer versions), else that rule comment.

Cost at 100k elements with nft 1.0.6: every ``list`` command (even
``list tables`` or ``list counters``) fetches every set element into
libnftables' cache (~1.5-2 s). Hence: reads go through a second context so
the writer's cache never holds the elements (one-element writes stay
sub-millisecond), and :meth:`counters` dumps counter objects with one raw
nfnetlink request instead (independent of the number of elements).

Namespaces: an ``Nftables()`` context (and a netlink socket) stays bound to
the network namespace it was created in, so the driver creates them with this
thread switched into ``/run/netns/NAME`` (``setns`` there and back).
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import nftables

from ..core import nft_text
from ..core.errors import DriverError
from ..core.firewall_compiler import (
    FINGERPRINT_PREFIX,
    TABLE_FAMILY,
    TABLE_NAME,
    TABLES,
    CompiledFirewall,
    Element,
    set_tables,
    structure_shape,
)
from ..core.firewall_guard import GUARD_PREFIX, Mac, Name
from ..core.objects import ABSENT, ObservedFirewall
from . import netlink
from .netlink import netns_entered

ALLOW_PREFIX = "allow"
MANAGED_PREFIXES = (ALLOW_PREFIX, GUARD_PREFIX)  # sets and maps whose elements the agent manages
_INT64_MAX = (1 << 63) - 1  # larger key parts travel as hex strings (libnftables' JSON integers are 64-bit)
LEGACY_SAVE_TOOLS = ("iptables-legacy-save", "ip6tables-legacy-save")
LEGACY_TIMEOUT_S = 30.0
NETNS_DIR = "/run/netns"
TRIM_AFTER_ELEMENTS = 10_000  # give freed malloc memory back after operations this large

_OBJ = {"family": TABLE_FAMILY, "table": TABLE_NAME}
_FAMILIES = frozenset(family for family, _ in TABLES)
_IFNAME = re.compile(r"\A[A-Za-z0-9_.-]{1,15}\Z")
_MAC = re.compile(r"\A[0-9a-f]{2}(:[0-9a-f]{2}){5}\Z")
_WRITE_OPS = frozenset({"add", "create", "insert", "replace"})
_PORT_RANGE = re.compile(r"\A(\d{1,5})-(\d{1,5})\Z")
_VERDICT_KEYWORDS = frozenset({"accept", "drop", "return", "continue"})
_ERROR_LOCATION = re.compile(r"^internal:\d+:\d+-\d+:\s*")
_FULL_LEN = {"ipv4_addr": 32, "ipv6_addr": 128}

KeyPart = str | int




# --- encoding: Element -> nft JSON -------------------------------------------------


def _address_json(text: str) -> Any:
    """An address, CIDR or address range as nft JSON; anything else is refused.

    nft resolves a string that is not an address as a host name (DNS), so
    every address is checked here, with ``inet_pton`` (fast, strict).
    """
    addr, slash, length = text.partition("/")
    if not slash and "-" in text:
        lo, _, hi = text.partition("-")
        return {"range": [_checked_address(lo, text), _checked_address(hi, text)]}
    _checked_address(addr, text)
    if not slash:
        return text
    limit = 32 if ":" not in addr else 128
    if not length.isdigit() or int(length) > limit:
        raise DriverError(f"firewall element: bad prefix length in {text!r}")
    return {"prefix": {"addr": addr, "len": int(length)}}


def _checked_address(text: str, whole: str) -> str:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in text else socket.AF_INET, text)
    except (OSError, ValueError):
        raise DriverError(f"firewall element: bad address {whole!r}") from None
    return text


class _Encoder:
    """Element -> JSON with the parts and verdicts of one call memoised."""

    def __init__(self) -> None:
        self._parts: dict[KeyPart, Any] = {}
        self._verdicts: dict[str, Any] = {}

    def part(self, part: KeyPart) -> Any:
        if type(part) is int:
            return part if 0 <= part <= _INT64_MAX else hex(part)
        done = self._parts.get(part)
        if done is None:
            if isinstance(part, Name | Mac):
                if not (_IFNAME if isinstance(part, Name) else _MAC).match(part):
                    raise DriverError(f"firewall element: bad interface name or MAC {part!r}")
                self._parts[part] = str(part)
                return str(part)
            if not isinstance(part, str):
                raise DriverError(f"firewall element: bad key part {part!r}")
            match = _PORT_RANGE.match(part)
            done = {"range": [int(match.group(1)), int(match.group(2))]} if match else _address_json(part)
            self._parts[part] = done
        return done

    def key(self, key: tuple[KeyPart, ...], verbatim: frozenset[int] = frozenset()) -> Any:
        """``verbatim``: positions whose set type is a name (ifname) or MAC, passed as text after a check.

        The set's declared type decides, not the part's Python type: elements read back from the kernel
        are plain strings, and an interface name must never be taken for a host name to resolve.
        """
        if verbatim:
            parts = [self._verbatim(p) if i in verbatim else self.part(p) for i, p in enumerate(key)]
            return parts[0] if len(parts) == 1 else {"concat": parts}
        if len(key) == 1:
            return self.part(key[0])
        part = self.part
        return {"concat": [part(p) for p in key]}

    @staticmethod
    def _verbatim(part: KeyPart) -> str:
        if not isinstance(part, str) or not (_IFNAME.match(part) or _MAC.match(part)):
            raise DriverError(f"firewall element: bad interface name or MAC {part!r}")
        return str(part)

    def verdict(self, verdict: str) -> Any:
        done = self._verdicts.get(verdict)
        if done is None:
            if verdict in _VERDICT_KEYWORDS:
                done = {verdict: None}
            elif verdict.startswith("goto:"):
                done = {"goto": {"target": verdict[5:]}}
            else:
                done = {"jump": {"target": verdict}}
            self._verdicts[verdict] = done
        return done

    def element(self, element: Element, verbatim: frozenset[int] = frozenset()) -> Any:
        key, verdict = element
        if verdict == "":
            return self.key(key, verbatim)
        return [self.key(key, verbatim), self.verdict(verdict)]

    def object_element(self, element: Element, verbatim: frozenset[int] = frozenset()) -> Any:
        key, value = element
        return [self.key(key, verbatim), value]


_VERBATIM_TYPES = frozenset({"ifname", "ether_addr"})


def verbatim_positions(types: Sequence[str]) -> frozenset[int]:
    return frozenset(i for i, t in enumerate(types) if t in _VERBATIM_TYPES)


def element_commands(
    op: str,
    elements: Mapping[str, Iterable[Element]],
    keys_only: bool = False,
    value_kinds: Mapping[str, str] | None = None,
    families: Mapping[str, str] | None = None,
    key_types: Mapping[str, Sequence[str]] | None = None,
) -> list[Any]:
    """``{op: {"element": ...}}`` commands, one per non-empty map, in name order.

    ``value_kinds`` gives a map's value type (``"verdict"``, ``"counter"``,
    ...); the value of a map not named there is a verdict, ``""`` a set element.
    An object map's value (``"counter"``: ``counter name <key> map @m``) is the
    object's name. ``families`` gives the table family of each set (default ``inet``), ``key_types`` the
    types of its key's parts (names and MACs are passed verbatim, after a check).
    """
    enc = _Encoder()
    kinds = value_kinds or {}
    commands: list[Any] = []
    for name in sorted(elements):
        items = elements[name]
        verbatim = verbatim_positions((key_types or {}).get(name, ()))
        if keys_only:
            elem = [enc.key(k, verbatim) for k, _ in items]
        elif kinds.get(name, "verdict") not in ("verdict", ""):
            elem = [enc.object_element(e, verbatim) for e in items]
        else:
            elem = [enc.element(e, verbatim) for e in items]
        if elem:
            family = (families or {}).get(name, TABLE_FAMILY)
            commands.append({op: {"element": {"family": family, "table": TABLE_NAME, "name": name, "elem": elem}}})
    return commands


def _types_of(declared: Any) -> tuple[str, ...]:
    return (declared,) if isinstance(declared, str) else tuple(str(t) for t in declared)


_EXPRESSION_TYPES = {("meta", "iifname"): "ifname", ("meta", "oifname"): "ifname",
                     ("ip", "saddr"): "ipv4_addr", ("ip", "daddr"): "ipv4_addr", ("ip6", "saddr"): "ipv6_addr",
                     ("ip6", "daddr"): "ipv6_addr", ("ether", "saddr"): "ether_addr",
                     ("arp", "saddr ether"): "ether_addr", ("arp", "saddr ip"): "ipv4_addr"}


def declared_key_types(body: Mapping[str, Any]) -> tuple[str, ...]:
    """The part types of a set's key, from ``type`` or from the expressions of ``typeof``."""
    if "typeof" not in body:
        return _types_of(body.get("type", ()))
    expr = body["typeof"]
    parts = expr.get("concat", [expr])
    types = []
    for part in parts:
        if "meta" in part:
            types.append(_EXPRESSION_TYPES.get(("meta", part["meta"]["key"]), "integer"))
        elif "payload" in part and "base" in part["payload"]:
            types.append("integer")
        else:
            payload = part.get("payload", {})
            types.append(_EXPRESSION_TYPES.get((payload.get("protocol"), payload.get("field")), "integer"))
    return tuple(types)


# --- decoding: nft JSON -> Element -------------------------------------------------


def _canon_address(text: str) -> str:
    """Python's canonical text of an address nft printed with ``inet_ntop``.

    The two agree (RFC 5952) except for IPv6 with an embedded IPv4 part
    (``::ffff:192.0.2.1``), which Python writes in hex.
    """
    if ":" in text and "." in text:
        try:
            return str(ipaddress.ip_address(text))
        except ValueError:
            return text
    return text


def _proto_number(name: str) -> KeyPart:
    if name.isdigit():
        return int(name)
    try:
        return socket.getprotobyname(name)
    except OSError:
        return name  # kept as text: never equal to a desired element, so it is replaced


def _service_number(name: str) -> KeyPart:
    if name.isdigit():
        return int(name)
    try:
        return socket.getservbyname(name)
    except OSError:
        return name


def _decode_part(value: Any, kind: str) -> KeyPart:
    """One key part as nft printed it, in the compiler's encoding."""
    if type(value) is int:
        return value
    if type(value) is str:
        if kind in _FULL_LEN:
            return _canon_address(value)
        if kind == "integer" and value.startswith("0x"):  # a raw payload key part wider than 64 bits
            return int(value, 16)
        if kind == "inet_proto":
            return _proto_number(value)
        if kind == "inet_service":
            return _service_number(value)
        return value
    if type(value) is dict:
        if "prefix" in value:
            prefix = value["prefix"]
            addr = _canon_address(prefix["addr"])
            length = int(prefix["len"])
            return addr if length == _FULL_LEN.get(kind, -1) else f"{addr}/{length}"
        if "range" in value:
            lo_raw, hi_raw = value["range"]
            lo, hi = _decode_part(lo_raw, kind), _decode_part(hi_raw, kind)
            return lo if lo == hi else f"{lo}-{hi}"
        if "elem" in value:  # an element with attributes of its own (timeout, counter)
            return _decode_part(value["elem"]["val"], kind)
    raise DriverError(f"unexpected element part {value!r} ({kind}) in table {TABLE_NAME}")


def _part_decoder(kind: str) -> Callable[[Any], KeyPart]:
    """A fast decoder of one key position, memoising strings."""
    memo: dict[str, KeyPart] = {}

    def decode(value: Any) -> KeyPart:
        if type(value) is int:
            return value
        if type(value) is str:
            done = memo.get(value)
            if done is None:
                done = memo[value] = _decode_part(value, kind)
            return done
        return _decode_part(value, kind)

    return decode


def _decode_verdict(value: Any) -> str:
    if type(value) is dict and len(value) == 1:
        ((verb, arg),) = value.items()
        if verb == "jump" and type(arg) is dict:
            return str(arg["target"])
        if verb == "goto" and type(arg) is dict:
            return f"goto:{arg['target']}"
        if verb in _VERDICT_KEYWORDS:
            return str(verb)
    raise DriverError(f"unexpected map value {value!r} in table {TABLE_NAME}")


def decode_set(obj: Mapping[str, Any]) -> frozenset[Element]:
    """Elements of one ``set``/``map`` object of ``nft -j list`` output, normalised."""
    kind = obj.get("type", [])
    kinds = [kind] if isinstance(kind, str) else list(kind)
    decoders = [_part_decoder(k) for k in kinds] or [_part_decoder("")]
    first = decoders[0]
    width = len(decoders)

    def key_of(raw: Any) -> tuple[KeyPart, ...]:
        if type(raw) is dict:
            parts = raw.get("concat")
            if parts is not None:
                if len(parts) != width:
                    raise DriverError(f"element {raw!r} does not match the type {kinds} in table {TABLE_NAME}")
                return tuple([d(p) for d, p in zip(decoders, parts)])  # noqa: B905 - lengths checked
            if "elem" in raw:
                return key_of(raw["elem"]["val"])
        return (first(raw),)

    out: list[Element] = []
    if obj.get("map") == "verdict":
        for raw_key, value in obj.get("elem", ()):
            jump = value.get("jump") if type(value) is dict else None
            out.append((key_of(raw_key), jump["target"] if jump is not None else _decode_verdict(value)))
    elif "map" in obj:  # an object map (counter, quota...): the value is the object's name
        out.extend((key_of(raw_key), str(value)) for raw_key, value in obj.get("elem", ()))
    else:
        out.extend((key_of(raw), "") for raw in obj.get("elem", ()))
    return frozenset(out)


# --- errors and checks ----------------------------------------------------------------


def _clean_error(text: str) -> str:
    """nft's error text without location prefixes, carets and repeats; each error names the input it refused.

    nft prints ``<where>: Error: <what>``, then the offending input line, then carets under the part at
    fault: that becomes ``Error: <what> (at "<the part>" in: <the line>)``, the line cut to 160 characters.
    """
    raw = text.splitlines()
    lines: list[str] = []
    i = 0
    while i < len(raw):
        line = _ERROR_LOCATION.sub("", raw[i]).strip()
        i += 1
        if not line or set(line) <= {"^", "~", " "}:
            continue
        if line.startswith("Error:") and i + 1 < len(raw) and raw[i + 1].strip() and set(raw[i + 1]) <= {"^", "~", " "}:
            echoed, marks = raw[i], raw[i + 1]
            start = len(marks) - len(marks.lstrip())
            part = echoed[start:len(marks.rstrip())].strip()
            shown = echoed.strip()
            line += f' (at "{part}" in: {shown[:160]}{"..." if len(shown) > 160 else ""})'
            i += 2
        if line not in lines:
            lines.append(line)
    errors = [line for line in lines if line.startswith("Error:")]
    return "; ".join(errors or lines) or "nft failed without a message"


def _check_command(command: Mapping[str, Any]) -> None:
    """Refuse a structure command that would act outside our tables."""
    if len(command) != 1:
        raise DriverError(f"firewall structure command must have one verb: {command!r}")
    ((verb, body),) = command.items()
    if verb not in _WRITE_OPS or not isinstance(body, dict) or len(body) != 1:
        raise DriverError(f"firewall structure command not allowed: {command!r}")
    ((kind, obj),) = body.items()
    if not isinstance(obj, dict) or obj.get("family") not in _FAMILIES:
        raise DriverError(f"firewall structure command outside families {sorted(_FAMILIES)}: {command!r}")
    table = obj.get("name") if kind == "table" else obj.get("table")
    if table != TABLE_NAME:
        raise DriverError(f"firewall structure command outside table {TABLE_NAME}: {command!r}")


def _is_missing(err: str) -> bool:
    return os.strerror(errno.ENOENT) in err  # "No such file or directory": no such table


def count_legacy_rules(save_output: str) -> int:
    """Rules (``-A``) plus built-in chains with a non-ACCEPT policy in ``iptables-save`` output."""
    count = 0
    for line in save_output.splitlines():
        if line.startswith("-A "):
            count += 1
        elif line.startswith(":"):
            fields = line[1:].split()
            if len(fields) >= 2 and fields[1] not in ("ACCEPT", "-"):
                count += 1
    return count


# --- memory -------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def _malloc_trim() -> None:
    trim = getattr(_libc, "malloc_trim", None)
    if trim is not None:
        trim(0)


# --- counters over nfnetlink --------------------------------------------------------

NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWOBJ = 18
NFT_MSG_GETOBJ = 19
NFPROTO_UNSPEC = 0
NFT_MSG_NEWTABLE = 0
NFT_MSG_GETTABLE = 1
NFTA_TABLE_NAME = 1
NFTA_TABLE_FLAGS = 2
NFTA_TABLE_OWNER = 10
NFT_TABLE_F_DORMANT = 0x1
NFT_TABLE_F_OWNER = 0x2
NFPROTO_NUMBERS = {"inet": 1, "bridge": 7}  # the families of our tables
NFTA_OBJ_TABLE = 1
NFTA_OBJ_NAME = 2
NFTA_OBJ_TYPE = 3
NFTA_OBJ_DATA = 4
NFT_OBJECT_COUNTER = 1
NFTA_COUNTER_BYTES = 1
NFTA_COUNTER_PACKETS = 2
_BE64 = struct.Struct(">Q")
_DUMP_RETRIES = 5


def _attrs(data: memoryview) -> Iterator[tuple[int, memoryview]]:
    for kind, start, end in netlink.iter_attrs(data, 0, len(data)):
        yield kind, data[start:end]


def _messages(data: memoryview, what: str) -> Iterator[tuple[int, int, int, memoryview]]:
    """(type, flags, seq, payload) of each message of a reply; DriverError if it cannot be framed."""
    try:
        for kind, flags, seq, start, end in netlink.iter_messages(data, len(data)):
            yield kind, flags, seq, data[start:end]
    except netlink.FramingError:
        raise DriverError(f"{what}: malformed netlink reply") from None


class _CounterSocket:
    """A NETLINK_NETFILTER socket that dumps the counter objects of our table."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, netlink.NETLINK_NETFILTER)
        self._sock.bind((0, 0))
        self._sock.settimeout(10.0)
        self._seq = 0
        self._request_tail = (
            netlink.NFGENMSG.pack(NFPROTO_UNSPEC, 0, 0)  # every family: our counters live in both tables
            + netlink.attr(NFTA_OBJ_TABLE, TABLE_NAME.encode() + b"\0")
            + netlink.attr(NFTA_OBJ_TYPE, struct.pack(">I", NFT_OBJECT_COUNTER))
        )

    def close(self) -> None:
        self._sock.close()

    def table_flags(self, family: str) -> tuple[int, int | None] | None:
        """(flags, owner netlink port or None) of our table in ``family``; None if it does not exist.

        Read over netlink, not libnftables: nft 1.0.6 prints an ``owner`` table's flags as JSON by
        indexing past its flag-name array (garbage, invalid JSON, or a heap corruption that kills the
        process), so a table someone else holds must never be listed as JSON.
        """
        self._seq = (self._seq + 1) & 0x7FFFFFFF or 1
        seq = self._seq
        name = netlink.attr(NFTA_TABLE_NAME, TABLE_NAME.encode() + b"\0")
        tail = netlink.NFGENMSG.pack(NFPROTO_NUMBERS[family], 0, 0) + name
        msg_type = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETTABLE
        self._sock.send(netlink.message(msg_type, netlink.NLM_F_REQUEST, seq, tail))
        while True:
            data = memoryview(self._sock.recv(1 << 16))
            for kind, _flags, msg_seq, body in _messages(data, "firewall"):
                if msg_seq != seq:
                    continue
                if kind == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWTABLE:
                    flags, owner = 0, None
                    for attr, value in _attrs(body[netlink.NFGENMSG.size :]):
                        if attr == NFTA_TABLE_FLAGS:
                            (flags,) = struct.unpack(">I", value)
                        elif attr == NFTA_TABLE_OWNER:
                            (owner,) = struct.unpack(">I", value)
                    return flags, owner  # a non-dump GET answers with the object alone
                if kind == netlink.NLMSG_ERROR:
                    code = netlink.error_code(body, 0)
                    if code in (0, errno.ENOENT):
                        return None
                    raise DriverError(f"firewall: reading table {family} {TABLE_NAME}: {os.strerror(code)}")
                if kind == netlink.NLMSG_DONE:
                    return None

    def dump(self) -> dict[str, tuple[int, int]]:
        for _ in range(_DUMP_RETRIES):
            result, interrupted = self._dump_once()
            if not interrupted:
                return result
        raise DriverError("firewall counters: the dump kept being interrupted by ruleset changes")

    def _dump_once(self) -> tuple[dict[str, tuple[int, int]], bool]:
        self._seq = (self._seq + 1) & 0x7FFFFFFF or 1
        seq = self._seq
        msg_type = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETOBJ
        self._sock.send(netlink.message(msg_type, netlink.NLM_F_REQUEST | netlink.NLM_F_DUMP, seq, self._request_tail))
        result: dict[str, tuple[int, int]] = {}
        interrupted = False
        while True:
            data = memoryview(self._sock.recv(1 << 20))
            for kind, flags, msg_seq, body in _messages(data, "firewall counters"):
                if msg_seq != seq:
                    continue
                interrupted = interrupted or bool(flags & netlink.NLM_F_DUMP_INTR)
                if kind == netlink.NLMSG_DONE:
                    return result, interrupted
                if kind == netlink.NLMSG_ERROR:
                    code = netlink.error_code(body, 0)
                    if code == 0:
                        return result, interrupted
                    if code == errno.ENOENT:
                        return {}, False
                    raise DriverError(f"firewall counters: {os.strerror(code)}")
                if kind == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWOBJ:
                    self._parse_object(body[netlink.NFGENMSG.size :], result)

    @staticmethod
    def _parse_object(body: memoryview, result: dict[str, tuple[int, int]]) -> None:
        name: str | None = None
        table: str | None = None
        packets = byte_count = 0
        for kind, value in _attrs(body):
            if kind == NFTA_OBJ_NAME:
                name = bytes(value).rstrip(b"\0").decode()
            elif kind == NFTA_OBJ_TABLE:
                table = bytes(value).rstrip(b"\0").decode()
            elif kind == NFTA_OBJ_DATA:
                for inner, data in _attrs(value):
                    if inner == NFTA_COUNTER_PACKETS:
                        (packets,) = _BE64.unpack(data)
                    elif inner == NFTA_COUNTER_BYTES:
                        (byte_count,) = _BE64.unpack(data)
        if name is not None and table == TABLE_NAME:
            result[name] = (packets, byte_count)


# --- the driver ----------------------------------------------------------------


class FirewallDriver:
    """Observe and replace ``table inet veilnet`` in one network namespace.

    Thread-safe (one lock); not meant to be shared between processes.
    """

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        try:
            with netns_entered(netns):
                self._nft = self._context()  # writes: its cache never holds set elements
                self._reader = self._context()  # list commands
                self._counter_socket = _CounterSocket()
        except OSError as exc:
            raise DriverError(f"firewall: cannot open nftables in namespace {netns}: {exc}") from exc
        self._lock = threading.Lock()
        self._value_kinds: dict[str, str] = {}  # managed map -> value type, from the last load or observe
        self._families: dict[str, str] = {}  # managed set -> table family, from the last load or observe
        self._key_types: dict[str, tuple[str, ...]] = {}  # managed set -> its key's part types
        self.last_duration_s = 0.0  # of the last kernel call, for logs and benchmarks

    @staticmethod
    def _context() -> nftables.Nftables:
        nft = nftables.Nftables()
        nft.set_json_output(True)
        nft.set_numeric_proto_output(True)
        nft.set_handle_output(False)
        return nft

    def close(self) -> None:
        self._counter_socket.close()

    def __enter__(self) -> FirewallDriver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- low level

    def _run_json(self, commands: list[Any], what: str) -> int:
        if not commands:
            return 0
        start = time.perf_counter()
        with self._lock:
            rc, _out, err = self._nft.json_cmd({"nftables": commands})
        self.last_duration_s = time.perf_counter() - start
        if rc != 0:
            raise DriverError(f"firewall {what} rejected ({len(commands)} commands): {_clean_error(err)}")
        return len(commands)

    def _list(self, command: str) -> tuple[list[dict[str, Any]] | None, str]:
        """Objects a ``list`` command prints; None and the error text on failure."""
        with self._lock:
            rc, out, err = self._reader.cmd(command)
        if rc != 0:
            return None, err
        try:
            objects: list[dict[str, Any]] = json.loads(out)["nftables"] if out else []
        except (ValueError, KeyError, TypeError) as exc:
            # e.g. nft 1.0.6 prints invalid JSON for a table with a flag it cannot print (owner)
            raise DriverError(f"firewall: nft's output for '{command}' could not be parsed ({exc})") from exc
        return objects, ""

    def _run_text(self, text: str, what: str, commands: int) -> int:
        start = time.perf_counter()
        with self._lock:
            rc, _out, err = self._nft.cmd(text)
        self.last_duration_s = time.perf_counter() - start
        if rc != 0:
            raise DriverError(f"firewall {what} rejected ({commands} commands): {_clean_error(err)}")
        return commands

    # -- reading

    def observe(self) -> ObservedFirewall:
        """Presence, fingerprint and managed-set elements of our tables.

        ``inet veilnet`` missing means absent; ``bridge veilnet`` missing shows up in the shape.
        """
        start = time.perf_counter()
        objects: list[dict[str, Any]] = []
        dormant = False
        for family, table in TABLES:
            with self._lock:
                flags = self._counter_socket.table_flags(family)
            if flags is not None and flags[0] & NFT_TABLE_F_OWNER:
                raise DriverError(
                    f"firewall: table {family} {table} is held by another process (flags owner, netlink port "
                    f"{flags[1]}): the agent never takes ownership, so it is not ours to list or change")
            if flags is not None and flags[0] & NFT_TABLE_F_DORMANT:
                dormant = True  # switched off by someone: the next full load replaces it, active
            found, err = self._list(f"list table {family} {table}")
            if found is None:
                if not _is_missing(err):
                    raise DriverError(f"firewall observe failed: {_clean_error(err)}")
                if family == TABLE_FAMILY:
                    return ABSENT
                continue
            objects.extend(found)
        table_comment: str | None = None
        rule_fingerprint: str | None = None
        elements: dict[str, frozenset[Element]] = {}
        kinds: dict[str, str] = {}
        families: dict[str, str] = {}
        key_types: dict[str, tuple[str, ...]] = {}
        total = 0
        for obj in objects:
            if "table" in obj:
                if obj["table"].get("family") == TABLE_FAMILY:
                    table_comment = obj["table"].get("comment")
            elif "rule" in obj:
                comment = obj["rule"].get("comment")
                if rule_fingerprint is None and isinstance(comment, str) and comment.startswith(FINGERPRINT_PREFIX):
                    rule_fingerprint = comment[len(FINGERPRINT_PREFIX) :]
            else:
                body = obj.get("map") or obj.get("set")
                if body is not None and str(body.get("name", "")).startswith(MANAGED_PREFIXES):
                    elements[body["name"]] = decode_set(body)
                    kinds[body["name"]] = str(body.get("map", ""))
                    families[body["name"]] = str(body.get("family", TABLE_FAMILY))
                    key_types[body["name"]] = _types_of(body.get("type", ()))
                    total += len(elements[body["name"]])
        shape = structure_shape(objects)
        del objects
        if total >= TRIM_AFTER_ELEMENTS:
            _malloc_trim()
        self.last_duration_s = time.perf_counter() - start
        fingerprint = table_comment if table_comment is not None else rule_fingerprint
        if dormant:
            fingerprint = None  # not the table we loaded: a dormant table enforces nothing
        self._value_kinds = kinds
        self._families = families
        self._key_types = key_types
        return ObservedFirewall(present=True, fingerprint=fingerprint, elements=elements, shape=shape)

    def counters(self) -> dict[str, tuple[int, int]]:
        """Named counter objects of our tables: name -> (packets, bytes); {} without them.

        One nfnetlink dump of the tables' counter objects: libnftables'
        ``list counters`` would fetch every set element first.
        """
        with self._lock:
            try:
                return self._counter_socket.dump()
            except OSError as exc:
                raise DriverError(f"firewall counters: {exc}") from exc

    def legacy_iptables_rule_count(self) -> int:
        """Rules in iptables-legacy/ip6tables-legacy that could shadow our table.

        Counts ``-A`` rules in every legacy table, plus each built-in chain
        whose policy is not ACCEPT (a DROP policy shadows us as a rule would).
        0 when the legacy tools are not installed.
        """
        total = 0
        for tool in LEGACY_SAVE_TOOLS:
            path = shutil.which(tool)
            if path is None:
                continue
            argv = [path] if self.netns is None else ["nsenter", f"--net={NETNS_DIR}/{self.netns}", path]
            try:
                done = subprocess.run(argv, capture_output=True, text=True, timeout=LEGACY_TIMEOUT_S, check=False)
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise DriverError(f"{tool}: {exc}") from exc
            if done.returncode != 0:
                raise DriverError(f"{tool} failed ({done.returncode}): {done.stderr.strip()[:200]}")
            total += count_legacy_rules(done.stdout)
        return total

    # -- writing

    def apply_full(self, compiled: CompiledFirewall) -> int:
        """Replace both our tables whole in one transaction; returns the number of commands sent."""
        structure = list(compiled.structure)
        if not structure or "table" not in structure[0].get("add", {}):
            raise DriverError("firewall structure must start with {'add': {'table': ...}}")
        kinds: dict[str, str] = {}
        key_types: dict[str, tuple[str, ...]] = {}
        for command in structure:
            _check_command(command)
            for kind, body in command.get("add", command.get("create", {})).items():
                if kind in ("map", "set") and str(body.get("name", "")).startswith(MANAGED_PREFIXES):
                    kinds[body["name"]] = str(body.get("map", ""))
                    key_types[body["name"]] = declared_key_types(body)
        where = set_tables(structure)
        for name, items in compiled.elements.items():
            # An empty set the structure leaves out (a node without segments has no overlay sets) carries
            # nothing; elements for an undeclared set would be lost, so they are refused.
            if (name not in where or not name.startswith(MANAGED_PREFIXES)) and items:
                raise DriverError(f"firewall elements for a set the structure does not declare: {name!r}")
        declared = {name: items for name, items in compiled.elements.items() if name in where}
        replace = [{verb: {"table": {"family": family, "name": table}}}
                   for family, table in TABLES for verb in ("add", "delete")]
        try:
            text = nft_text.batch([*replace, *structure], declared, where)
        except ValueError as exc:
            raise DriverError(f"firewall full load refused before nft: {exc}") from exc
        commands = len(replace) + len(structure) + sum(1 for e in compiled.elements.values() if e)
        try:
            sent = self._run_text(text, "full load", commands)
            self._value_kinds = kinds
            self._key_types = key_types
            self._families = {name: w.split(" ", 1)[0] for name, w in where.items()}
            return sent
        finally:
            if sum(len(v) for v in compiled.elements.values()) >= TRIM_AFTER_ELEMENTS:
                del text
                _malloc_trim()

    def apply_elements(
        self, add: Mapping[str, frozenset[Element]], delete: Mapping[str, frozenset[Element]]
    ) -> int:
        """Delete then add managed-set elements in one transaction; returns the elements changed."""
        for name in (*add, *delete):
            if not name.startswith(MANAGED_PREFIXES):
                raise DriverError(f"firewall element update outside the managed sets: {name!r}")
        commands = element_commands(
            "delete", delete, keys_only=True, families=self._families, key_types=self._key_types
        ) + element_commands("add", add, value_kinds=self._value_kinds, families=self._families,
                             key_types=self._key_types)
        self._run_json(commands, "element update")
        return sum(len(v) for v in add.values()) + sum(len(v) for v in delete.values())

    def remove(self) -> None:
        """Delete our tables (teardown); nothing to do if they are absent."""
        self._run_json([{verb: {"table": {"family": family, "name": table}}}
                        for family, table in TABLES for verb in ("add", "delete")], "removal")
