"""Agent configuration: a TOML file, every key checked, errors name the key."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from . import loading
from . import validate as v
from .errors import ValidationError

DEFAULT_CONFIG_PATH = Path("/etc/veilnet/agent.toml")

WgBackend = Literal["auto", "kernel", "userspace"]
LogFormat = Literal["json", "console"]


@dataclass(frozen=True)
class UnderlayConfig:
    interface: str
    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    mtu: int | None  # None: read from the interface

    @property
    def family(self) -> Literal[4, 6]:
        return 4 if self.address.version == 4 else 6


@dataclass(frozen=True)
class WireGuardConfig:
    backend: WgBackend
    listen_port: int


@dataclass(frozen=True)
class FirewallConfig:
    nflog_group: int
    log_per_second: int


@dataclass(frozen=True)
class ControlConfig:
    local_socket: Path          # the local API (status, endpoint attach), mode 0660
    socket_group: str | None    # group owning the socket; None: root's group
    reconnect_max_seconds: float


DEFAULT_CONTROL = ControlConfig(local_socket=Path("/run/veilnet/agent.sock"), socket_group=None,
                                reconnect_max_seconds=30.0)


@dataclass(frozen=True)
class AgentConfig:
    node_name: str
    state_dir: Path
    resync_interval: float
    log_format: LogFormat
    log_level: str
    underlay: UnderlayConfig
    wireguard: WireGuardConfig
    firewall: FirewallConfig = FirewallConfig(nflog_group=7410, log_per_second=10)
    control: ControlConfig = DEFAULT_CONTROL

    @property
    def identity_dir(self) -> Path:
        """Where ``join`` keeps the host's TLS key, certificate, CA bundle and controller address."""
        return self.state_dir / "identity"


_TOP = {
    "node_name", "state_dir", "resync_interval", "log_format", "log_level", "underlay", "wireguard", "firewall",
    "controller",
}
_CONTROL = {"local_socket", "socket_group", "reconnect_max_seconds"}
_FIREWALL = {"nflog_group", "log_per_second"}
_UNDERLAY = {"interface", "address", "mtu"}
_WIREGUARD = {"backend", "listen_port"}
_LOG_LEVELS = ("debug", "info", "warning", "error")


def parse_config(data: dict[str, Any]) -> AgentConfig:
    v.no_unknown_keys(data, _TOP, "")
    node_name = v.name(v.required(data, "node_name", ""), "node_name")
    state_dir_text = v.string(data.get("state_dir", "/var/lib/veilnet"), "state_dir")
    if not state_dir_text.startswith("/"):
        raise ValidationError("state_dir", state_dir_text, "must be an absolute path")
    resync = v.number(data.get("resync_interval", 30.0), "resync_interval", 0.2, 86400.0)
    log_format = v.choice(data.get("log_format", "json"), "log_format", ("json", "console"))
    log_level = v.choice(data.get("log_level", "info"), "log_level", _LOG_LEVELS)

    underlay_raw = v.mapping(v.required(data, "underlay", ""), "underlay")
    v.no_unknown_keys(underlay_raw, _UNDERLAY, "underlay")
    mtu_raw = underlay_raw.get("mtu")
    underlay = UnderlayConfig(
        interface=v.ifname(v.required(underlay_raw, "interface", "underlay"), "underlay.interface"),
        address=v.ip_address(v.required(underlay_raw, "address", "underlay"), "underlay.address"),
        mtu=None if mtu_raw is None else v.integer(mtu_raw, "underlay.mtu", 1280, 65535),
    )

    wg_raw = v.mapping(data.get("wireguard", {}), "wireguard")
    v.no_unknown_keys(wg_raw, _WIREGUARD, "wireguard")
    backend = v.choice(wg_raw.get("backend", "auto"), "wireguard.backend", ("auto", "kernel", "userspace"))
    wireguard = WireGuardConfig(
        backend="auto" if backend == "auto" else "kernel" if backend == "kernel" else "userspace",
        listen_port=v.integer(wg_raw.get("listen_port", 51820), "wireguard.listen_port", 1, 65535),
    )
    fw_raw = v.mapping(data.get("firewall", {}), "firewall")
    v.no_unknown_keys(fw_raw, _FIREWALL, "firewall")
    firewall = FirewallConfig(
        nflog_group=v.integer(fw_raw.get("nflog_group", 7410), "firewall.nflog_group", 1, 65535),
        log_per_second=v.integer(fw_raw.get("log_per_second", 10), "firewall.log_per_second", 1, 10_000),
    )
    ctl_raw = v.mapping(data.get("controller", {}), "controller")
    v.no_unknown_keys(ctl_raw, _CONTROL, "controller")
    socket_text = v.string(ctl_raw.get("local_socket", str(DEFAULT_CONTROL.local_socket)), "controller.local_socket")
    if not socket_text.startswith("/"):
        raise ValidationError("controller.local_socket", socket_text, "must be an absolute path")
    group = ctl_raw.get("socket_group")
    control = ControlConfig(
        local_socket=Path(socket_text),
        socket_group=None if group is None else _group_name(group),
        reconnect_max_seconds=v.number(ctl_raw.get("reconnect_max_seconds", 30.0),
                                       "controller.reconnect_max_seconds", 0.5, 3600.0),
    )
    return AgentConfig(
        control=control,
        firewall=firewall,
        node_name=node_name,
        state_dir=Path(state_dir_text),
        resync_interval=resync,
        log_format="json" if log_format == "json" else "console",
        log_level=log_level,
        underlay=underlay,
        wireguard=wireguard,
    )


_GROUP_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}")


def _group_name(raw: object) -> str:
    text = v.string(raw, "controller.socket_group")
    if not _GROUP_RE.fullmatch(text):
        raise ValidationError("controller.socket_group", text, "must be a group name (letters, digits, _ . -)")
    return text


MAX_CONFIG_BYTES = 1024 * 1024


def load_config(path: Path) -> AgentConfig:
    """Read, decode (UTF-8), parse (TOML, integer literals bounded) and validate the configuration file."""
    data = loading.read_bytes(path, "config", MAX_CONFIG_BYTES)
    return parse_config_text(data, str(path))


def parse_config_text(data: bytes | str, source: str) -> AgentConfig:
    """The configuration in ``data`` (TOML text or its bytes); errors name the key, or ``config`` and the
    line and column of a decoding error."""
    text = loading.decode_utf8(data, "config", source) if isinstance(data, bytes) else data
    return parse_config(loading.load_toml_text(text, "config", source))
