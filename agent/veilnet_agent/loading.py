"""Untrusted JSON and YAML text to plain values, with the limits the validators rely on.

Integer literals longer than ``validate.MAX_INTEGER_TEXT`` characters are not
converted (Python refuses decimal literals of more than 4,300 digits with a
ValueError that no caller expects, and YAML's base-60 literals like
``1:2:3`` cost quadratic time): they load as ``validate.OversizedInteger``,
which every reader refuses naming its field. ``check_yaml_events`` refuses
nesting deeper than a limit (libyaml's loader would overflow the C stack) and
aliases expanding to too many values, before anything is built.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import yaml

from .errors import ValidationError
from .validate import MAX_INTEGER_TEXT, OversizedInteger

_BASE_LOADER: type[Any] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _json_int(text: str) -> int | OversizedInteger:
    return OversizedInteger(text) if len(text) > MAX_INTEGER_TEXT else int(text)


def load_json(text: str, object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None) -> object:
    """``json.loads(text)``, except that over-long integer literals load as OversizedInteger.

    Raises json.JSONDecodeError, RecursionError, or what ``object_pairs_hook`` raises.
    """
    try:
        return json.loads(text, object_pairs_hook=object_pairs_hook)
    except json.JSONDecodeError:
        raise
    except ValueError:
        # Python's digit limit for int(), or the hook's own error (which the second pass raises again).
        # Only then pay for a Python call per integer.
        return json.loads(text, object_pairs_hook=object_pairs_hook, parse_int=_json_int)


class SafeLoader(_BASE_LOADER):  # type: ignore[misc]
    """PyYAML's safe loader (libyaml's when available) with over-long integers loading as OversizedInteger."""

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int | OversizedInteger:
        if isinstance(node.value, str) and len(node.value) > MAX_INTEGER_TEXT:
            return OversizedInteger(node.value)
        value: int = super().construct_yaml_int(node)
        return value


SafeLoader.add_constructor("tag:yaml.org,2002:int", SafeLoader.construct_yaml_int)


def check_yaml_events(text: str, what: str, max_depth: int, max_values: int) -> None:
    """Refuse nesting deeper than ``max_depth`` and aliases that expand to more than ``max_values`` values.

    One pass over the parser's events (no recursion, nothing built); errors are
    ValidationError on field ``what`` ("spec", "state-file"). Raises yaml.YAMLError for bad syntax.
    """
    sizes: dict[str, int] = {}  # anchor -> number of values its node expands to
    stack: list[list[Any]] = [[0, None]]  # [values so far, anchor] per open collection
    for event in yaml.parse(text, Loader=SafeLoader):
        kind = type(event)
        anchor: str | None = getattr(event, "anchor", None)
        top = stack[-1]
        if kind is yaml.ScalarEvent:
            top[0] += 1
            if anchor is not None:
                sizes[anchor] = 1
        elif kind is yaml.MappingStartEvent or kind is yaml.SequenceStartEvent:
            stack.append([1, anchor])
            if len(stack) > max_depth + 1:
                raise ValidationError(what, None, f"nested deeper than {max_depth} levels")
        elif kind is yaml.MappingEndEvent or kind is yaml.SequenceEndEvent:
            count, own_anchor = stack.pop()
            if own_anchor is not None:
                sizes[own_anchor] = count
            stack[-1][0] += count
        elif kind is yaml.AliasEvent and anchor is not None:
            top[0] += sizes.get(anchor, 1)
        if stack[-1][0] > max_values:
            raise ValidationError(what, stack[-1][0], f"YAML aliases expand to more than {max_values} values")
