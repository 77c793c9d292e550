"""docs/config-reference.md and the packaged conffile say what the code does.

The agent-configuration table of the reference is parsed: its keys must be exactly the keys the parser
accepts; each documented default must be what the parser gives when the key is left out; a key documented
as required must be refused, naming it, when missing; both ends of a documented range are accepted and a
value just outside is refused naming the key; every documented choice is accepted and another one refused.
``packaging/conf/agent.toml`` (the .deb's and .rpm's conffile) must list the same keys, commented out, with
the same defaults.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest

from veilnet_agent.core import config as cfg
from veilnet_agent.core.errors import ValidationError

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "docs" / "config-reference.md"
CONFFILE = ROOT / "packaging" / "conf" / "agent.toml"
SECTIONS = {"underlay": cfg._UNDERLAY, "wireguard": cfg._WIREGUARD, "firewall": cfg._FIREWALL,
            "controller": cfg._CONTROL}
MINIMAL: dict[str, Any] = {"node_name": "host-a", "underlay": {"interface": "eth0", "address": "192.0.2.11"}}


def documented_rows() -> dict[str, tuple[str, str]]:
    """key -> (type column, default column) of the "Agent configuration" table."""
    text = REFERENCE.read_text()
    section = text.split("## Agent configuration", 1)[1].split("\n## ", 1)[0]
    rows = {}
    table = section.split("| key |", 1)[1].split("\n\n", 1)[0]  # the first table: keys, not files
    for line in table.splitlines()[2:]:
        cells = re.split(r"(?<!\\)\|", line.strip().strip("|"))  # `\|` inside a cell is an escaped pipe
        key, kind, default = (c.strip() for c in cells[:3])
        rows[key.strip("`")] = (kind, default)
    return rows


def accepted_keys() -> set[str]:
    top = {k for k in cfg._TOP if k not in SECTIONS}
    return top | {f"{section}.{key}" for section, keys in SECTIONS.items() for key in keys}


def with_value(key: str, value: object) -> dict[str, Any]:
    data = copy.deepcopy(MINIMAL)
    if "." in key:
        section, name = key.split(".")
        data.setdefault(section, {})[name] = value
    else:
        data[key] = value
    return data


def without(key: str) -> dict[str, Any]:
    data = copy.deepcopy(MINIMAL)
    section, _, name = key.rpartition(".")
    (data[section] if section else data).pop(name)
    return data


ATTRIBUTE = {"controller": "control"}


def parsed_value(conf: cfg.AgentConfig, key: str) -> object:
    value: object = conf
    for part in key.split("."):
        value = getattr(value, ATTRIBUTE.get(part, part))
    return str(value) if isinstance(value, Path) else value


def literal(text: str) -> object:
    """`30` -> 30, `/var/lib/veilnet` -> "/var/lib/veilnet", `0.5` -> 0.5."""
    inner = text.strip().strip("`")
    for kind in (int, float):
        try:
            return kind(inner)
        except ValueError:
            pass
    return inner


def test_the_reference_documents_exactly_the_keys_the_parser_accepts() -> None:
    assert set(documented_rows()) == accepted_keys()


@pytest.mark.parametrize("key", sorted(accepted_keys()))
def test_each_documented_default_is_the_parsers(key: str) -> None:
    _kind, default = documented_rows()[key]
    if default == "required":
        with pytest.raises(ValidationError) as err:
            cfg.parse_config(without(key))
        assert err.value.field == key
        return
    conf = cfg.parse_config(MINIMAL)
    got = parsed_value(conf, key)
    if default.startswith("`"):
        assert got == literal(default), f"{key}: the reference says {default}, the parser gives {got!r}"
    else:  # "read from the interface", "none (root's)": no value of ours
        assert got is None, f"{key}: the reference says {default!r}, the parser gives {got!r}"


def _range(kind: str) -> tuple[float, float] | None:
    match = re.search(r"(\d+(?:\.\d+)?)\.\.(\d+(?:\.\d+)?)", kind)
    return (float(match.group(1)), float(match.group(2))) if match else None


@pytest.mark.parametrize("key", sorted(k for k, (kind, _) in documented_rows().items() if _range(kind)))
def test_each_documented_range_is_the_parsers(key: str) -> None:
    kind, _ = documented_rows()[key]
    low, high = _range(kind) or (0.0, 0.0)
    integral = low.is_integer() and high.is_integer() and "seconds" not in kind
    step = 1 if integral else 0.01
    edges = (int(low), int(high)) if integral else (low, high)
    for value in edges:
        cfg.parse_config(with_value(key, value))
    for value in (edges[0] - step, edges[1] + step):
        with pytest.raises(ValidationError) as err:
            cfg.parse_config(with_value(key, value))
        assert err.value.field == key, (key, value)


@pytest.mark.parametrize("key", sorted(k for k, (kind, _) in documented_rows().items() if "\\|" in kind))
def test_each_documented_choice_is_the_parsers(key: str) -> None:
    kind, _ = documented_rows()[key]
    choices = re.findall(r"`([^`]+)`", kind)
    assert len(choices) >= 2
    for choice in choices:
        assert parsed_value(cfg.parse_config(with_value(key, choice)), key) == choice
    with pytest.raises(ValidationError) as err:
        cfg.parse_config(with_value(key, "not-a-choice"))
    assert err.value.field == key


def conffile_entries() -> dict[str, str]:
    """key -> the commented value of packaging/conf/agent.toml ("# key = value  # comment")."""
    entries: dict[str, str] = {}
    section = ""
    for line in CONFFILE.read_text().splitlines():
        head = re.fullmatch(r"# \[([a-z_]+)\]", line.strip())
        if head:
            section = head.group(1)
            continue
        entry = re.match(r"# ([a-z_]+) = (\"[^\"]*\"|[^ #]+)", line)
        if entry:
            entries[f"{section}.{entry.group(1)}" if section else entry.group(1)] = entry.group(2)
    return entries


def test_the_conffile_lists_every_key_commented_out() -> None:
    assert set(conffile_entries()) == accepted_keys()
    assert not [line for line in CONFFILE.read_text().splitlines() if line.strip() and not line.startswith("#")]


def test_the_conffiles_values_are_the_defaults_or_examples_of_required_keys() -> None:
    rows = documented_rows()
    for key, value in conffile_entries().items():
        default = rows[key][1]
        shown = value.strip('"')
        if default.startswith("`"):
            assert literal(shown) == literal(default), f"{key}: conffile {value}, reference {default}"
        # required or "none" keys carry an example: it must be one the parser accepts
        conf = cfg.parse_config(with_value(key, literal(shown)))
        assert parsed_value(conf, key) is not None
