from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from factories import state, v4_state, wg_key

from veilnet_agent.app.statefile import load_state_file
from veilnet_agent.core.errors import ValidationError
from veilnet_agent.core.model import parse_node_state
from veilnet_agent.core.naming import gateway_mac


def test_valid_state_parses_whole() -> None:
    parsed = parse_node_state(state(peers=3))
    assert parsed.node == "host-a"
    assert [s.vni for s in parsed.segments] == [100, 200]
    assert parsed.segments[0].gateway_mac == gateway_mac(100) == "02:56:4e:00:00:64"
    assert parsed.endpoints[0].ifname == "eth0"
    assert len(parsed.peers) == 3
    assert parsed.peers[0].endpoints[0].segment == "blue"


def test_state_is_immutable() -> None:
    parsed = parse_node_state(state())
    with pytest.raises(AttributeError):
        parsed.node = "other"  # type: ignore[misc]


def _set(data: dict[str, Any], path: str, value: object) -> None:
    keys: list[str | int] = []
    for part in path.replace("]", "").replace("[", ".").split("."):
        keys.append(int(part) if part.isdigit() else part)
    target: Any = data
    for key in keys[:-1]:
        target = target[key]
    target[keys[-1]] = value


BAD = [
    ("segments[1].vni", 100, "duplicate VNI"),
    ("segments[0].vni", 0, "1..16777215"),
    ("segments[0].vni", 16_777_216, "1..16777215"),
    ("segments[0].vni", "100", "integer"),
    ("segments[1].name", "blue", "duplicate segment name"),
    ("segments[0].encapsulation", "gre", "vxlan, geneve"),
    ("segments[0].ipv4_subnet", "203.0.113.1/26", "no host bits"),
    ("segments[0].ipv4_subnet", "fd00:1::/64", "IPv4 network"),
    ("segments[0].ipv4_gateway", "198.51.100.1", "outside the subnet"),
    ("segments[0].ipv4_gateway", "203.0.113.0", "network or broadcast"),
    ("segments[1].ipv4_subnet", "203.0.113.0/25", "overlaps"),
    ("segments[0].gateway_mac", "01:00:5e:00:00:01", "unicast"),
    ("segments[0].name", "Blue Segment", "lowercase"),
    ("segments[0].mtu", 9000, "unknown key"),
    ("endpoints[0].ipv4", "203.0.113.100", "outside the subnet"),
    ("endpoints[0].ipv4", "203.0.113.1", "already used by the gateway"),
    ("endpoints[0].ipv4", "fd00:b1::5", "IPv4 address"),
    ("endpoints[1].ipv4", "203.0.113.10", "outside the subnet"),
    ("endpoints[0].mac", "02:00:00:0a:00:zz", "MAC address"),
    ("endpoints[0].mac", "02:56:4e:00:00:64", "gateway"),
    ("endpoints[0].segment", "red", "names no segment"),
    ("endpoints[0].ifname", "an-interface-name-too-long", "at most 15"),
    ("endpoints[0].netns", "../etc", "namespace name"),
    ("endpoints[1].name", "a-web", "duplicate endpoint name"),
    ("peers[0].public_key", "not-a-key", "WireGuard public key"),
    ("peers[1].public_key", wg_key("peer-0"), "duplicate public key"),
    ("peers[0].transport_address", "fd00:8::1", "transport network"),
    ("peers[0].transport_address", "fd00:7::1", "transport network"),
    ("peers[1].transport_address", "fd00:7::2", "duplicate transport address"),
    ("peers[0].name", "host-a", "duplicate node name"),
    ("peers[0].underlay_port", 0, "1..65535"),
    ("peers[0].endpoints[0].ips[0]", "fd00:b2::1", "outside the subnet"),
    ("peers[0].endpoints[0].mac", "02:00:00:0a:00:01", "already used"),
    ("peers[1].endpoints[0].ips", [], "at least one"),
    ("transport_address", "fd00:7::1", "prefix length"),
    ("node", "", "non-empty"),
]


@pytest.mark.parametrize(("path", "value", "message"), BAD, ids=[f"{p}={v!r}" for p, v, _ in BAD])
def test_bad_value_is_rejected_naming_the_field(path: str, value: object, message: str) -> None:
    data = state(peers=2)
    _set(data, path, value)
    with pytest.raises(ValidationError) as info:
        parse_node_state(data)
    assert message in str(info.value)
    assert info.value.field.startswith(path.split("[")[0])


def test_field_paths_are_exact() -> None:
    data = state(peers=2)
    data["segments"][1]["vni"] = 100
    with pytest.raises(ValidationError) as info:
        parse_node_state(data)
    assert info.value.field == "segments[1].vni"
    assert info.value.value == 100
    data = state(peers=2)
    data["peers"][1]["endpoints"][0]["ips"][0] = "203.0.113.200"
    with pytest.raises(ValidationError) as info:
        parse_node_state(data)
    assert info.value.field == "peers[1].endpoints[0].ips[0]"


def test_transport_overlapping_a_segment_is_rejected() -> None:
    data = v4_state()
    data["transport_address"] = "203.0.113.5/24"
    with pytest.raises(ValidationError, match="overlaps"):
        parse_node_state(data)


def test_not_a_mapping() -> None:
    with pytest.raises(ValidationError, match="mapping"):
        parse_node_state(["node"])
    with pytest.raises(ValidationError, match="must be a list"):
        parse_node_state({"node": "a", "transport_address": "fd00:7::1/64", "segments": "blue"})


def test_state_file_json_and_yaml(tmp_path: Path) -> None:
    as_json = tmp_path / "state.json"
    as_json.write_text(json.dumps(v4_state()))
    as_yaml = tmp_path / "state.yaml"
    import yaml

    as_yaml.write_text(yaml.safe_dump(v4_state()))
    assert load_state_file(as_json) == load_state_file(as_yaml)


def test_state_file_errors(tmp_path: Path) -> None:
    broken = tmp_path / "state.json"
    broken.write_text("{")
    with pytest.raises(ValidationError, match="not valid JSON"):
        load_state_file(broken)
    with pytest.raises(ValidationError, match="cannot read"):
        load_state_file(tmp_path / "absent.yaml")
