"""Integers of thousands of digits anywhere in a spec or state file are validation errors naming the field.

Python refuses to convert a decimal literal of more than 4,300 digits (a
ValueError no loader caught: the controller's callers got UNKNOWN) and to write
one back (which broke building the ValidationError itself); YAML's hex, octal,
binary and base-60 literals make such integers without the decimal limit, the
base-60 ones in quadratic time. Each case below goes through the real loader
(JSON or YAML text) and must come out as one ValidationError on the exact field.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from factories import state

from veilnet_agent.app.statefile import load_state_file, read_state_file
from veilnet_agent.core import validate as v
from veilnet_agent.core.config import parse_config
from veilnet_agent.core.errors import MAX_FIELD, MAX_SHOWN, ValidationError
from veilnet_controller.spec import load_spec_text, parse_spec_text

EXAMPLE_SPEC: dict[str, Any] = load_spec_text(  # type: ignore[assignment]
    (Path(__file__).resolve().parents[1] / "examples" / "network.yaml").read_text()
)
MARK = "HUGE-NUMBER-GOES-HERE"

# Literals for an integer far beyond Python's 4,300-digit limit, as each format can write one.
JSON_LITERALS = {"decimal": "9" * 5000, "negative": "-" + "7" * 5000}
YAML_LITERALS = {
    **JSON_LITERALS,
    "hex": "0x" + "f" * 5000,
    "octal": "0" + "7" * 5000,  # YAML 1.1 octal
    "binary": "0b" + "1" * 20000,
    "base-60": "1" + ":59" * 5000,
}


def _set(data: Any, path: str, value: object) -> None:
    keys: list[str | int] = [int(p) if p.isdigit() else p for p in path.replace("]", "").replace("[", ".").split(".")]
    for key in keys[:-1]:
        data = data[key]
    data[keys[-1]] = value


def _spec() -> dict[str, Any]:
    raw = copy.deepcopy(EXAMPLE_SPEC)
    raw["segments"][0]["rate_limit"] = {"new_connections_per_second": 10, "burst": 20, "icmp_per_second": 5}
    raw["nodes"][0]["keepalive"] = 25
    raw["policies"][0]["ports"] = [8080, "9000-9100"]
    return raw


def _state() -> dict[str, Any]:
    raw = state(peers=2)
    raw["segments"][0]["rate_limit"] = {"new_connections_per_second": 10, "burst": 20, "icmp_per_second": 5}
    raw["peers"][0]["keepalive"] = 25
    raw["policies"] = [{"name": "web", "source": {"segment": "blue"}, "destination": {"segment": "blue"},
                        "protocol": "tcp", "ports": [8080, "9000-9100"]}]
    return raw


def _text(raw: dict[str, Any], path: str, literal: str, fmt: str) -> str:
    _set(raw, path, MARK)
    text = json.dumps(raw) if fmt == "json" else yaml.safe_dump(raw, width=1 << 30)
    assert text.count(MARK) == 1
    return text.replace(f'"{MARK}"' if fmt == "json" else MARK, literal)


# Every numeric field of the spec, and fields of other types that might be given a number.
SPEC_FIELDS = [
    ("segments[0].vni", "must be in 1..16777215"),
    ("segments[0].rate_limit.new_connections_per_second", "must be in 1..1000000"),
    ("segments[0].rate_limit.burst", "must be in 1..10000000"),
    ("segments[0].rate_limit.icmp_per_second", "must be in 1..1000000"),
    ("nodes[0].underlay_port", "must be in 1..65535"),
    ("nodes[0].keepalive", "must be in 0..65535"),
    ("policies[0].ports[0]", "must be in 1..65535"),
    ("nodes[0].name", "must be a non-empty string"),
    ("endpoints[0].mac", "must be a non-empty string"),
    ("endpoints[0].labels.app", "must be 1-63 letters"),
]
STATE_FIELDS = [
    ("segments[0].vni", "must be in 1..16777215"),
    ("segments[0].rate_limit.burst", "must be in 1..10000000"),
    ("peers[0].underlay_port", "must be in 1..65535"),
    ("peers[0].keepalive", "must be in 0..65535"),
    ("policies[0].ports[0]", "must be in 1..65535"),
    ("peers[1].public_key", "must be a non-empty string"),
]


def _check(exc: ValidationError, field: str, reason: str) -> None:
    assert exc.field == field, str(exc)
    assert reason in exc.reason, str(exc)
    assert len(str(exc)) <= MAX_FIELD + len(exc.reason) + MAX_SHOWN + 10
    assert f"{exc.field}: {exc.reason} (got {exc.value!r})" == str(exc)  # the controller's own rendering


@pytest.mark.parametrize(("field", "reason"), SPEC_FIELDS)
@pytest.mark.parametrize(("fmt", "kind"), [("json", k) for k in JSON_LITERALS] + [("yaml", k) for k in YAML_LITERALS])
def test_spec_huge_integer_names_the_field(field: str, reason: str, fmt: str, kind: str) -> None:
    literal = (JSON_LITERALS if fmt == "json" else YAML_LITERALS)[kind]
    text = _text(_spec(), field, literal, fmt)
    with pytest.raises(ValidationError) as info:
        parse_spec_text(text)
    _check(info.value, field, reason)


@pytest.mark.parametrize(("field", "reason"), STATE_FIELDS)
@pytest.mark.parametrize(("fmt", "kind"), [("json", k) for k in JSON_LITERALS] + [("yaml", k) for k in YAML_LITERALS])
def test_state_file_huge_integer_names_the_field(
    tmp_path: Path, field: str, reason: str, fmt: str, kind: str
) -> None:
    literal = (JSON_LITERALS if fmt == "json" else YAML_LITERALS)[kind]
    path = tmp_path / f"state.{fmt}"
    path.write_text(_text(_state(), field, literal, fmt))
    with pytest.raises(ValidationError) as info:
        load_state_file(path)
    _check(info.value, field, reason)


@pytest.mark.parametrize("fmt", ["json", "yaml"])
def test_huge_digits_in_a_port_range_string(fmt: str) -> None:
    raw = _spec()
    raw["policies"][0]["ports"][1] = "1" * 5000 + "-2"
    text = json.dumps(raw) if fmt == "json" else yaml.safe_dump(raw)
    with pytest.raises(ValidationError) as info:
        parse_spec_text(text)
    _check(info.value, "policies[0].ports[1]", "must be in 1..65535")


def test_port_range_digits_are_ascii() -> None:
    raw = _spec()
    for bad in ("\u00b2-\u00b3", "\u0668\u0660-\u0669\u0660", " 80-90", "80-90\n"):
        raw["policies"][0]["ports"][1] = bad
        with pytest.raises(ValidationError) as info:  # '²' crashed int() before; other digits were taken
            parse_spec_text(json.dumps(raw))
        _check(info.value, "policies[0].ports[1]", "must be a port or a range")
    raw["policies"][0]["ports"][1] = "0009000-09100"
    assert parse_spec_text(json.dumps(raw)).policies[0].ports[1].first == 9000


def test_huge_integer_as_a_mapping_key_names_the_path() -> None:
    text = "nodes:\n- name: host-a\n  ? 0x" + "f" * 5000 + "\n  : 1\n"  # an explicit key: plain ones are short
    with pytest.raises(ValidationError) as info:
        parse_spec_text(text)
    assert info.value.field.startswith("nodes[0].0xfffff") and "unknown key" in info.value.reason
    assert len(str(info.value)) < 1000


def test_base60_bomb_is_refused_quickly() -> None:
    # 2 MB of "1:1:1:..." used to take minutes of quadratic big-integer arithmetic before any check ran.
    text = _text(_spec(), "segments[0].vni", "1" + ":1" * 1_000_000, "yaml")
    started = time.monotonic()
    with pytest.raises(ValidationError) as info:
        parse_spec_text(text)
    assert time.monotonic() - started < 10
    _check(info.value, "segments[0].vni", "must be in 1..16777215")


def test_long_but_convertible_integers_still_load() -> None:
    assert load_spec_text('{"x": ' + "1" * 100 + "}") == {"x": int("1" * 100)}
    assert load_spec_text("x: 0x" + "f" * 98) == {"x": int("f" * 98, 16)}


def test_number_of_a_huge_integer_is_a_validation_error() -> None:
    with pytest.raises(ValidationError) as info:  # float() of it overflowed
        v.number(10**400, "resync_interval", 0.2, 86400.0)
    _check(info.value, "resync_interval", "must be in 0.2..86400.0")
    config = {"node_name": "host-a", "underlay": {"interface": "eth0", "address": "192.0.2.1"},
              "resync_interval": 10**400}
    with pytest.raises(ValidationError) as info:
        parse_config(config)
    _check(info.value, "resync_interval", "must be in 0.2..86400.0")


def test_state_file_nesting_is_refused_not_crashed(tmp_path: Path) -> None:
    deep_json = tmp_path / "deep.json"
    deep_json.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValidationError, match="nested too deeply"):
        read_state_file(deep_json)
    deep_yaml = tmp_path / "deep.yaml"  # libyaml's loader overflows the C stack on this (SIGSEGV)
    deep_yaml.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValidationError, match="nested deeper than 64 levels"):
        read_state_file(deep_yaml)


def test_state_file_alias_bomb_is_refused(tmp_path: Path) -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValidationError, match="expand to more than"):
        read_state_file(path)
