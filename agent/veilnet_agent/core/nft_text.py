"""Render the compilers' nft JSON commands as one nft text batch (pure).

Why text at all: nft 1.0.6 (Debian 12) cannot declare a set keyed by raw
payload fields (``typeof iifname . @th,64,128``) in JSON, and the
anti-spoofing checks need such sets (a neighbour advertisement's target, the
inner frame of a VXLAN packet). A full load is therefore sent as text, in one
``cmd()`` call, so it stays one transaction; element updates and every read
stay JSON.

Nothing a user wrote is parsed or echoed here: every string that reaches the
text is checked against a strict pattern first (identifiers, interface names,
addresses, log prefixes), so no value can close a quote or start a new
statement. Anything this module does not know is refused with ValueError.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from .firewall_guard import Mac, Name

Element = tuple[tuple[str | int, ...], str]

_IDENT = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_QUOTABLE = re.compile(r"[A-Za-z0-9 _.:/+,-]{0,127}")
_PORT_RANGE = re.compile(r"(\d{1,5})-(\d{1,5})")
_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
_FAMILIES = frozenset({"inet", "ip", "ip6", "bridge", "netdev", "arp"})
_WORDS = frozenset({"filter", "prerouting", "input", "forward", "output", "postrouting", "ingress",
                    "accept", "drop", "second", "minute"})
ELEMENTS_PER_COMMAND = 10_000
_U64 = 1 << 64


def ident(value: object) -> str:
    if not isinstance(value, str) or not _IDENT.fullmatch(value):
        raise ValueError(f"nft text: not an identifier: {value!r}")
    return value


def quoted(value: object) -> str:
    if not isinstance(value, str) or not _QUOTABLE.fullmatch(value):
        raise ValueError(f"nft text: refusing to quote {value!r}")
    return f'"{value}"'


def _word(value: object) -> str:
    if value not in _WORDS:
        raise ValueError(f"nft text: unexpected keyword {value!r}")
    assert isinstance(value, str)
    return value


def _integer(value: int) -> str:
    if value < 0:
        raise ValueError(f"nft text: negative number {value}")
    return str(value) if value < _U64 else hex(value)


def _address(text: str) -> str | None:
    """The canonical text of an address or prefix; None if ``text`` is neither."""
    try:
        return str(ipaddress.ip_network(text, strict=True)) if "/" in text else str(ipaddress.ip_address(text))
    except ValueError:
        return None


def value(item: Any) -> str:
    """A constant: number, address, port range, ``@set`` reference, anonymous set, or a quoted symbol."""
    if isinstance(item, bool):  # nft's boolean literals (``meta ipsec missing``: no secpath)
        return "exists" if item else "missing"
    if isinstance(item, int):
        return _integer(item)
    if isinstance(item, str):
        if item.startswith("@"):
            return "@" + ident(item[1:])
        match = _PORT_RANGE.fullmatch(item)
        if match:
            return f"{int(match.group(1))}-{int(match.group(2))}"
        address = _address(item)
        return address if address is not None else quoted(item)
    if isinstance(item, list):  # flags of a bitmask (``ct state established,related``)
        return ",".join(value(v) for v in item)
    if isinstance(item, dict) and len(item) == 1:
        ((kind, body),) = item.items()
        if kind == "set":
            return "{ " + ", ".join(value(v) for v in body) + " }"
        if kind == "concat":
            return " . ".join(value(v) for v in body)
        if kind == "prefix":
            return str(ipaddress.ip_network(f"{body['addr']}/{int(body['len'])}", strict=True))
        if kind == "range":
            lo, hi = body
            return f"{value(lo)}-{value(hi)}"
    return expression(item)


def expression(item: Any) -> str:
    """A packet expression: payload field, raw payload, meta or ct key, or a concatenation of them."""
    if not isinstance(item, dict) or len(item) != 1:
        raise ValueError(f"nft text: unexpected expression {item!r}")
    ((kind, body),) = item.items()
    if kind == "payload":
        if "base" in body:
            base = body["base"]
            if base not in ("ll", "nh", "th"):
                raise ValueError(f"nft text: unexpected payload base {base!r}")
            return f"@{base},{int(body['offset'])},{int(body['len'])}"
        field = " ".join(ident(part) for part in str(body["field"]).split(" "))
        return f"{ident(body['protocol'])} {field}"
    if kind == "meta":
        return f"meta {ident(body['key'])}"
    if kind == "ct":
        return f"ct {ident(body['key'])}"
    if kind == "concat":
        return " . ".join(expression(part) for part in body)
    raise ValueError(f"nft text: unexpected expression {item!r}")


def _limit(body: Mapping[str, Any]) -> str:
    text = f"limit rate {'over ' if body.get('inv') else ''}{_integer(int(body['rate']))}/{_word(body['per'])}"
    if "burst" in body:
        text += f" burst {_integer(int(body['burst']))} packets"
    return text


def statement(item: Any) -> str:
    if not isinstance(item, dict) or len(item) != 1:
        raise ValueError(f"nft text: unexpected statement {item!r}")
    ((kind, body),) = item.items()
    if kind == "match":
        op = body["op"]
        if op in ("==", "in"):
            return f"{expression(body['left'])} {value(body['right'])}"
        if op == "!=":
            return f"{expression(body['left'])} != {value(body['right'])}"
        raise ValueError(f"nft text: unexpected operator {op!r}")
    if kind in ("accept", "drop") and body is None:
        return str(kind)
    if kind in ("jump", "goto"):
        return f"{kind} {ident(body['target'])}"
    if kind == "counter":
        if isinstance(body, str):
            return f"counter name {quoted(ident(body))}"
        lookup = body["map"]
        return f"counter name {expression(lookup['key'])} map {value(lookup['data'])}"
    if kind == "log":
        return f"log prefix {quoted(body['prefix'])} group {_integer(int(body['group']))}"
    if kind == "limit":
        return _limit(body)
    if kind == "vmap":
        return f"{expression(body['key'])} vmap {value(body['data'])}"
    if kind == "set":
        if body.get("op") != "update":
            raise ValueError(f"nft text: unexpected set statement {item!r}")
        inner = " ".join(statement(s) for s in body.get("stmt", ()))
        return f"update {value(body['set'])} {{ {expression(body['elem'])} {inner} }}"
    raise ValueError(f"nft text: unexpected statement {item!r}")


def _where(body: Mapping[str, Any]) -> str:
    family = body.get("family")
    if family not in _FAMILIES:
        raise ValueError(f"nft text: unexpected family {family!r}")
    return f"{family} {ident(body['table'])}"


def _set_body(kind: str, body: Mapping[str, Any]) -> str:
    parts: list[str] = []
    if "typeof" in body:
        parts.append(f"typeof {expression(body['typeof'])}")
    else:
        types = body["type"]
        key = " . ".join(ident(t) for t in ([types] if isinstance(types, str) else types))
        if kind == "map":
            key += f" : {ident(body['map'])}"
        parts.append(f"type {key}")
    if body.get("flags"):
        parts.append("flags " + ",".join(ident(f) for f in body["flags"]))
    if "timeout" in body:
        parts.append(f"timeout {_integer(int(body['timeout']))}s")
    if "size" in body:
        parts.append(f"size {_integer(int(body['size']))}")
    if body.get("elem"):
        parts.append("elements = { " + ", ".join(value(e) for e in body["elem"]) + " }")
    return "{ " + "; ".join(parts) + "; }"


def command(cmd: Mapping[str, Any]) -> str:
    """One ``{"add"|"create"|"delete": {kind: body}}`` command as a line of nft text."""
    if len(cmd) != 1:
        raise ValueError(f"nft text: a command has one verb: {cmd!r}")
    ((verb, objects),) = cmd.items()
    if verb not in ("add", "create", "delete") or not isinstance(objects, dict) or len(objects) != 1:
        raise ValueError(f"nft text: unexpected command {cmd!r}")
    ((kind, body),) = objects.items()
    if kind == "table":
        family = body.get("family")
        if family not in _FAMILIES:
            raise ValueError(f"nft text: unexpected family {family!r}")
        return f"{verb} table {family} {ident(body['name'])}"
    if verb == "delete":
        raise ValueError(f"nft text: only tables are deleted whole: {cmd!r}")
    where = _where(body)
    name = ident(body.get("name", body.get("chain")))
    if kind == "counter":
        return f"{verb} counter {where} {name}"
    if kind in ("set", "map"):
        return f"{verb} {kind} {where} {name} {_set_body(kind, body)}"
    if kind == "chain":
        if "hook" not in body:
            return f"{verb} chain {where} {name}"
        prio = int(body["prio"])
        policy = _word(body.get("policy", "accept"))
        return (f"{verb} chain {where} {name} {{ type {_word(body['type'])} hook {_word(body['hook'])} "
                f"priority {prio}; policy {policy}; }}")
    if kind == "rule" and verb == "add":
        text = f"add rule {where} {name} " + " ".join(statement(s) for s in body["expr"])
        if "comment" in body:
            text += f" comment {quoted(body['comment'])}"
        return text
    raise ValueError(f"nft text: unexpected object {kind!r}")


class ElementText:
    """Elements as nft text, with every distinct key part rendered once.

    A key part is a number, an interface name (``Name``), or an address, prefix or
    port range; any other string is refused (nft would resolve it as a host name).
    """

    def __init__(self) -> None:
        self._parts: dict[str | int, str] = {}
        self._data: dict[str, str] = {}

    def part(self, part: str | int) -> str:
        done = self._parts.get(part)
        if done is None:
            if isinstance(part, Name):
                done = quoted(part)
            elif isinstance(part, Mac):
                if not _MAC.fullmatch(part):
                    raise ValueError(f"nft text: not a MAC address: {part!r}")
                done = str(part)
            elif isinstance(part, int) and not isinstance(part, bool):
                done = _integer(part)
            elif isinstance(part, str) and (_address(part) is not None or _PORT_RANGE.fullmatch(part)):
                done = value(part)
            else:
                raise ValueError(f"nft text: element part {part!r} is not a number, name or address")
            self._parts[part] = done
        return done

    def element(self, element: Element, data_kind: str = "") -> str:
        """``key`` for a set, ``key : "counter"`` for a counter map, ``key : jump chain`` for a verdict map."""
        key, data = element
        text = " . ".join(self.part(p) for p in key)
        if data == "":
            return text
        done = self._data.get(data)
        if done is None:
            done = self._data[data] = self._datum(data, data_kind)
        return f"{text} : {done}"

    @staticmethod
    def _datum(data: str, data_kind: str) -> str:
        if data_kind != "verdict":
            return quoted(ident(data))
        if data in ("accept", "drop", "return", "continue"):
            return data
        if data.startswith("goto:"):
            return f"goto {ident(data[5:])}"
        return f"jump {ident(data)}"


def element_commands(
    elements: Mapping[str, Iterable[Element]], where: Mapping[str, str], data_kinds: Mapping[str, str]
) -> Iterator[str]:
    """``add element`` lines per set (at most ELEMENTS_PER_COMMAND elements each).

    ``where``: set -> "family table"; ``data_kinds``: map -> its value type (``counter``, ``verdict``).
    """
    text = ElementText()
    for name in sorted(elements):
        kind = data_kinds.get(name, "")
        rendered = [text.element(e, kind) for e in elements[name]]
        for start in range(0, len(rendered), ELEMENTS_PER_COMMAND):
            chunk = rendered[start : start + ELEMENTS_PER_COMMAND]
            yield f"add element {where[name]} {ident(name)} {{ " + ", ".join(chunk) + " }"


def _stage(cmd: Mapping[str, Any]) -> int:
    """Tables first, then counters, sets and maps, then chains, then rules: a rule may jump to any chain."""
    ((_verb, objects),) = cmd.items()
    kind = next(iter(objects))
    return 0 if kind == "table" else 3 if kind == "rule" else 2 if kind == "chain" else 1


def batch(commands: Iterable[Mapping[str, Any]], elements: Mapping[str, Iterable[Element]],
          where: Mapping[str, str]) -> str:
    """One text batch: the commands (objects before the rules that use them, rules in order), then elements."""
    ordered = sorted(commands, key=_stage)  # stable: rules keep their order
    lines = [command(c) for c in ordered]
    data_kinds = {body["name"]: str(body["map"]) for c in ordered for verb, objects in c.items()
                  for kind, body in objects.items() if kind == "map" and verb in ("add", "create")}
    lines.extend(element_commands(elements, where, data_kinds))
    return "\n".join(lines) + "\n"
