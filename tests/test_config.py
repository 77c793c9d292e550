from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from veilnet_agent.core.config import load_config, parse_config
from veilnet_agent.core.errors import ValidationError

GOOD = """
node_name = "host-a"
state_dir = "/var/lib/veilnet"
resync_interval = 15
log_format = "console"
[underlay]
interface = "eth0"
address = "192.0.2.11"
[wireguard]
backend = "userspace"
listen_port = 51821
"""


def test_full_config_is_parsed(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(GOOD)
    config = load_config(path)
    assert config.node_name == "host-a"
    assert config.resync_interval == 15.0
    assert config.log_format == "console"
    assert config.underlay.address == ipaddress.ip_address("192.0.2.11")
    assert config.underlay.family == 4
    assert config.underlay.mtu is None
    assert config.wireguard.backend == "userspace"
    assert config.wireguard.listen_port == 51821


def test_defaults() -> None:
    config = parse_config({"node_name": "h", "underlay": {"interface": "eth0", "address": "2001:db8::1"}})
    assert config.wireguard.backend == "auto"
    assert config.wireguard.listen_port == 51820
    assert config.log_format == "json"
    assert str(config.state_dir) == "/var/lib/veilnet"
    assert config.underlay.family == 6


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"colour": "blue"}, "colour"),
        ({"underlay": {"interface": "eth0", "address": "192.0.2.1", "speed": 1}}, "underlay.speed"),
        ({"wireguard": {"backend": "magic"}}, "wireguard.backend"),
        ({"wireguard": {"listen_port": 70000}}, "wireguard.listen_port"),
        ({"wireguard": {"listen_port": "51820"}}, "wireguard.listen_port"),
        ({"resync_interval": 0}, "resync_interval"),
        ({"log_format": "xml"}, "log_format"),
        ({"node_name": "Host_A"}, "node_name"),
        ({"state_dir": "relative/dir"}, "state_dir"),
        ({"underlay": {"interface": "an-interface-name-too-long", "address": "192.0.2.1"}}, "underlay.interface"),
        ({"underlay": {"interface": "eth0", "address": "192.0.2.300"}}, "underlay.address"),
        ({"underlay": {"interface": "eth0", "address": "192.0.2.1", "mtu": 500}}, "underlay.mtu"),
    ],
)
def test_bad_values_name_the_key(patch: dict[str, object], field: str) -> None:
    data: dict[str, object] = {"node_name": "host-a", "underlay": {"interface": "eth0", "address": "192.0.2.1"}}
    data.update(patch)
    with pytest.raises(ValidationError) as info:
        parse_config(data)
    assert info.value.field == field
    assert field in str(info.value)


def test_missing_required_key() -> None:
    with pytest.raises(ValidationError) as info:
        parse_config({"node_name": "host-a"})
    assert info.value.field == "underlay"


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="cannot read"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("node_name = \n")
    with pytest.raises(ValidationError, match="not valid TOML"):
        load_config(bad)


def test_socket_group_with_a_trailing_newline_is_refused() -> None:
    """`re.match` with `$` accepted "veilnet\\n", and grp.getgrnam then raised KeyError at start."""
    import pytest as _pytest

    from veilnet_agent.core.config import parse_config
    from veilnet_agent.core.errors import ValidationError

    with _pytest.raises(ValidationError) as info:
        parse_config({"node_name": "host-a", "underlay": {"interface": "ul0", "address": "192.0.2.1"},
                      "controller": {"socket_group": "veilnet\n"}})
    assert info.value.field == "controller.socket_group"
