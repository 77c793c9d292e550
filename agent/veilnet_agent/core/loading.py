"""Untrusted bytes and text to plain values: one loading path per format, with the limits the validators rely on.

Everything that reads YAML, JSON or TOML from outside (the controller's spec,
the agent's state file and configuration, the agent's own files on disk)
comes through here, and every failure is one ``ValidationError`` on the
field the caller names (``spec``, ``state-file``, ``config``), with the line
and column where the text went wrong. Nothing else escapes:

* bytes must be UTF-8 (a leading byte-order mark is dropped); the first bad
  byte is reported with its line and column;
* YAML is read as the plain JSON-like types only: mappings, lists, strings,
  integers, floats, booleans and null. Explicit tags (``!!int``, ``!!binary``,
  ``!!set``, ``!foo``, ``!``) are refused, and implicit dates are read as
  strings (the typed validators then refuse them where they do not belong).
  Duplicate keys (also ``1`` and ``0x1``, which are one integer), nesting
  deeper than a limit (libyaml's loader overflows the C stack),
  aliases expanding to too many values, and aliases to a collection that
  contains them are refused before anything is built. A scalar that YAML's
  rules make a number but that is none (``0x_``) is an error at its position;
* JSON object keys are unique;
* TOML integer literals are bounded like JSON and YAML ones.

Integer literals longer than ``validate.MAX_INTEGER_TEXT`` characters are not
converted (Python refuses decimal literals of more than 4,300 digits with a
ValueError that no caller expects, and YAML's base-60 literals like
``1:2:3`` cost quadratic time): they load as ``validate.OversizedInteger``,
which every reader refuses naming its field.
"""

from __future__ import annotations

import collections.abc
import json
import re
import secrets
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, Node, ScalarNode

from .errors import ValidationError, shown
from .validate import MAX_INTEGER_TEXT, OversizedInteger

_BASE_LOADER: type[Any] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_MAX_PROBLEM = 300  # characters of a parser's own description of a problem quoted in an error


# --------------------------------------------------------------------------- bytes


def read_bytes(path: Path, what: str, max_bytes: int) -> bytes:
    """The file's bytes; ValidationError on ``what`` if it cannot be read or is larger than ``max_bytes``."""
    try:
        with path.open("rb") as file:
            data = file.read(max_bytes + 1)
    except OSError as exc:
        raise ValidationError(what, str(path), f"cannot read: {exc.strerror or exc}") from None
    if len(data) > max_bytes:
        raise ValidationError(what, str(path), f"is larger than {max_bytes} bytes")
    return data


def decode_utf8(data: bytes, what: str, source: object) -> str:
    """``data`` as UTF-8 text (without a leading byte-order mark); the first invalid byte is reported by position."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ValidationError(what, source, f"not valid UTF-8: byte 0x{data[exc.start]:02x} at line {line}, "
                                            f"column {column} (offset {exc.start})") from None
    return text.removeprefix("\ufeff")


def _problem(text: str) -> str:
    return text if len(text) <= _MAX_PROBLEM else text[:_MAX_PROBLEM] + "..."


# --------------------------------------------------------------------------- JSON


class DuplicateKeyError(ValueError):
    """A JSON object names one key twice."""


def _json_int(text: str) -> int | OversizedInteger:
    return OversizedInteger(text) if len(text) > MAX_INTEGER_TEXT else int(text)


def unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` that refuses an object naming one key twice (``json`` keeps the last silently)."""
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise DuplicateKeyError(f"duplicate key {shown(key, 80)[0]}")
            seen.add(key)
    return result


def load_json(text: str, object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = unique_object) -> object:
    """``json.loads(text)`` with unique keys, except that over-long integer literals load as OversizedInteger.

    Raises json.JSONDecodeError, DuplicateKeyError, RecursionError, or what ``object_pairs_hook`` raises.
    """
    try:
        return json.loads(text, object_pairs_hook=object_pairs_hook)
    except (json.JSONDecodeError, DuplicateKeyError):
        raise
    except ValueError:
        # Python's digit limit for int(), or the hook's own error (which the second pass raises again).
        # Only then pay for a Python call per integer.
        return json.loads(text, object_pairs_hook=object_pairs_hook, parse_int=_json_int)


def load_json_text(text: str, what: str, source: object) -> object:
    """JSON text to plain values; every failure is a ValidationError on ``what`` (its value: ``source``)."""
    try:
        return load_json(text)
    except json.JSONDecodeError as exc:
        raise ValidationError(what, source, f"not valid JSON at line {exc.lineno}, column {exc.colno}: "
                                            f"{_problem(exc.msg)}") from None
    except DuplicateKeyError as exc:
        raise ValidationError(what, source, f"not valid JSON: {exc}") from None
    except RecursionError:
        raise ValidationError(what, source, "not valid JSON: nested too deeply") from None


# --------------------------------------------------------------------------- YAML

_YAML = "tag:yaml.org,2002:"


class SafeLoader(_BASE_LOADER):  # type: ignore[misc]
    """PyYAML's safe loader (libyaml's parser when available) reduced to the plain JSON-like types.

    Implicit timestamps are not resolved (``2023-02-30`` is a string, not a crash in ``datetime``), the
    constructors of binary, set, ordered-map, pairs and timestamp values are gone, integers longer than
    MAX_INTEGER_TEXT load as OversizedInteger, mappings refuse duplicate keys, and a scalar that cannot be
    the number its form says is a ConstructorError at its position. ``scan_yaml`` refuses explicit tags
    before this loader runs; this class does not depend on that.
    """

    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != f"{_YAML}timestamp"]
        for first, resolvers in _BASE_LOADER.yaml_implicit_resolvers.items()
    }

    def construct_yaml_int(self, node: ScalarNode) -> int | OversizedInteger:
        if isinstance(node.value, str) and len(node.value) > MAX_INTEGER_TEXT:
            return OversizedInteger(node.value)
        try:
            value: int = super().construct_yaml_int(node)
        except (ValueError, IndexError, TypeError):  # "0x_", "0b_", "": the form of a number without digits
            raise ConstructorError(None, None, f"{shown(node.value, 60)[0]} is not an integer",
                                   node.start_mark) from None
        return value

    def construct_yaml_float(self, node: ScalarNode) -> float:
        try:
            value: float = super().construct_yaml_float(node)
        except (ValueError, IndexError, TypeError):
            raise ConstructorError(None, None, f"{shown(node.value, 60)[0]} is not a number",
                                   node.start_mark) from None
        return value

    def construct_yaml_bool(self, node: ScalarNode) -> bool:
        try:
            value: bool = super().construct_yaml_bool(node)
        except (KeyError, AttributeError, TypeError):
            raise ConstructorError(None, None, f"{shown(node.value, 60)[0]} is not a boolean",
                                   node.start_mark) from None
        return value

    def construct_refused(self, node: Node) -> object:
        raise ConstructorError(None, None, f"the YAML type {shown(node.tag, 60)[0]} is not accepted "
                                           "(only mappings, lists, strings, numbers, booleans and null)",
                               node.start_mark)

    def construct_mapping(self, node: Node, deep: bool = False) -> dict[Any, Any]:
        if not isinstance(node, MappingNode):
            found = getattr(node, "id", "node")
            raise ConstructorError(None, None, f"expected a mapping, but found a {found}", node.start_mark)
        own = sum(1 for key_node, _ in node.value if key_node.tag != f"{_YAML}merge")
        self.flatten_mapping(node)  # merged pairs first, then the mapping's own ones (which override them)
        merged = len(node.value) - own
        mapping: dict[Any, Any] = {}
        own_keys: set[Any] = set()
        for position, (key_node, value_node) in enumerate(node.value):
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, collections.abc.Hashable):
                raise ConstructorError("while constructing a mapping", node.start_mark,
                                       "found unhashable key", key_node.start_mark)
            if position >= merged:
                if key in own_keys:
                    raise ConstructorError("while constructing a mapping", node.start_mark,
                                           f"found duplicate key {shown(key, 80)[0]}", key_node.start_mark)
                own_keys.add(key)
            mapping[key] = self.construct_object(value_node, deep=deep)
        return mapping


SafeLoader.add_constructor(f"{_YAML}int", SafeLoader.construct_yaml_int)
SafeLoader.add_constructor(f"{_YAML}float", SafeLoader.construct_yaml_float)
SafeLoader.add_constructor(f"{_YAML}bool", SafeLoader.construct_yaml_bool)
for _tag in ("timestamp", "binary", "set", "omap", "pairs"):
    SafeLoader.add_constructor(f"{_YAML}{_tag}", SafeLoader.construct_refused)
SafeLoader.add_constructor(None, SafeLoader.construct_refused)


def _where(mark: Any) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}"


def scan_yaml(text: str, what: str, source: object, max_depth: int, max_values: int) -> None:
    """Refuse explicit tags, nesting deeper than ``max_depth``, aliases that expand to more than ``max_values``
    values and aliases to a collection that contains them (a recursive structure).

    One pass over the parser's events (no recursion, nothing built); errors are ValidationError on field
    ``what`` with value ``source``. Raises yaml.YAMLError for bad syntax.
    """
    sizes: dict[str, int] = {}  # anchor -> number of values its node expands to
    stack: list[list[Any]] = [[0, None]]  # [values so far, anchor] per open collection
    open_anchors: set[str] = set()
    for event in yaml.parse(text, Loader=SafeLoader):
        kind = type(event)
        anchor: str | None = getattr(event, "anchor", None)
        top = stack[-1]
        if kind is yaml.ScalarEvent or kind is yaml.MappingStartEvent or kind is yaml.SequenceStartEvent:
            tag: str | None = getattr(event, "tag", None)
            if tag is not None:
                written = "!!" + tag.removeprefix(_YAML) if tag.startswith(_YAML) else tag
                raise ValidationError(what, source, f"YAML tag {shown(written, 60)[0]} at {_where(event.start_mark)}"
                                                    ": tags are not accepted; write the plain value (quoted, for a "
                                                    "string)")
        if kind is yaml.ScalarEvent:
            top[0] += 1
            if anchor is not None:
                sizes[anchor] = 1
        elif kind is yaml.MappingStartEvent or kind is yaml.SequenceStartEvent:
            stack.append([1, anchor])
            if anchor is not None:
                open_anchors.add(anchor)
            if len(stack) > max_depth + 1:
                raise ValidationError(what, source, f"nested deeper than {max_depth} levels "
                                                    f"(at {_where(event.start_mark)})")
        elif kind is yaml.MappingEndEvent or kind is yaml.SequenceEndEvent:
            count, own_anchor = stack.pop()
            if own_anchor is not None:
                sizes[own_anchor] = count
                open_anchors.discard(own_anchor)
            stack[-1][0] += count
        elif kind is yaml.AliasEvent and anchor is not None:
            if anchor in open_anchors:
                raise ValidationError(what, source, f"YAML alias {shown('*' + anchor, 60)[0]} at "
                                                    f"{_where(event.start_mark)} is inside the collection it "
                                                    "names (a recursive structure)")
            top[0] += sizes.get(anchor, 1)
        if stack[-1][0] > max_values:
            raise ValidationError(what, source, f"YAML aliases expand to more than {max_values} values")


def check_yaml_events(text: str, what: str, max_depth: int, max_values: int) -> None:
    """``scan_yaml`` with no source to name (the error's value is None)."""
    scan_yaml(text, what, None, max_depth, max_values)


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A bounded one-line description of a YAML error, with its line and column."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark if exc.problem_mark is not None else exc.context_mark
        problem = exc.problem or exc.context or "invalid"
        context = f" ({exc.context})" if exc.context and exc.problem else ""
        where = f" at {_where(mark)}" if mark is not None else ""
        return f"not valid YAML{where}: {_problem(problem + context)}"
    return f"not valid YAML: {_problem(str(exc))}"


def load_yaml_text(text: str, what: str, source: object, *, max_depth: int, max_values: int) -> object:
    """YAML text (one document) to plain values; every failure is a ValidationError on ``what``."""
    try:
        scan_yaml(text, what, source, max_depth, max_values)
        return yaml.load(text, Loader=SafeLoader)  # the safe loader above, narrowed further
    except yaml.YAMLError as exc:
        raise ValidationError(what, source, yaml_problem(exc)) from None


# --------------------------------------------------------------------------- TOML

# A bare token outside strings and comments (keys, numbers, booleans, dates), and an integer literal of TOML.
_TOML_TOKEN = re.compile(r"[A-Za-z0-9_+\-.:]+")
_TOML_INTEGER = re.compile(r"[+-]?(?:0|[1-9](?:_?[0-9])*)|0x[0-9A-Fa-f](?:_?[0-9A-Fa-f])*|0o[0-7](?:_?[0-7])*"
                           r"|0b[01](?:_?[01])*")  # TOML's grammar exactly: what else it refuses stays refused


def _toml_long_integers(text: str) -> list[tuple[int, int]]:
    """Spans of bare integer literals longer than MAX_INTEGER_TEXT, outside strings and comments.

    A small scanner of TOML's strings (basic and literal, one-line and multi-line) and comments; what
    it takes for an integer in a key position is restored as the key's text after parsing.
    """
    spans: list[tuple[int, int]] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "#":
            end = text.find("\n", i)
            i = n if end < 0 else end
        elif c in "\"'":
            triple = c * 3
            if text.startswith(triple, i):
                j = i + 3
                while j < n and not text.startswith(triple, j):
                    j += 2 if c == '"' and text[j] == "\\" else 1
                j += 3
                for _ in range(2):  # up to two more quotes are the content's last characters
                    if j < n and text[j] == c:
                        j += 1
            else:
                j = i + 1
                while j < n and text[j] != c and text[j] != "\n":
                    j += 2 if c == '"' and text[j] == "\\" else 1
                j += 1
            i = j
        else:
            match = _TOML_TOKEN.match(text, i)
            if match is None:
                i += 1
                continue
            if match.end() - i > MAX_INTEGER_TEXT and _TOML_INTEGER.fullmatch(match.group()):
                spans.append((i, match.end()))
            i = match.end()
    return spans


def _restore_toml(value: object, marks: dict[str, str]) -> object:
    if isinstance(value, dict):
        return {marks.get(k, k): _restore_toml(item, marks) for k, item in value.items()}
    if isinstance(value, list):
        return [_restore_toml(item, marks) for item in value]
    if isinstance(value, str) and value in marks:
        return OversizedInteger(marks[value])
    return value


def load_toml_text(text: str, what: str, source: object) -> dict[str, Any]:
    """TOML text to plain values (over-long integers as OversizedInteger); failures are ValidationError."""
    marks: dict[str, str] = {}
    spans = _toml_long_integers(text)
    if spans:
        nonce = secrets.token_hex(8)
        pieces: list[str] = []
        last = 0
        for k, (start, end) in enumerate(spans):
            mark = f"veilnet-oversized-{nonce}-{k}"
            marks[mark] = text[start:end]
            pieces += [text[last:start], f'"{mark}"']
            last = end
        pieces.append(text[last:])
        text = "".join(pieces)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValidationError(what, source, f"not valid TOML: {_problem(str(exc))}") from None
    except RecursionError:
        raise ValidationError(what, source, "not valid TOML: nested too deeply") from None
    except ValueError:  # a number tomllib cannot convert that the scanner missed
        raise ValidationError(what, source, "not valid TOML: a number too long to read") from None
    if not marks:
        return data
    restored = _restore_toml(data, marks)
    assert isinstance(restored, dict)
    return restored
