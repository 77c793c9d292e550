"""Every port: what the dataplane needs of a driver, as a Protocol.

The dataplane is written against these, never against a driver module, so it
loads without pyroute2 or nftables and a fake (``veilnet_agent.testing``)
stands in for the kernel in root-free tests. Each driver in
``veilnet_agent.drivers`` satisfies one of them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from ..core.firewall_compiler import CompiledFirewall, Element
from ..core.objects import (
    ApplyResult,
    LinksObservation,
    LoggedPacket,
    ObservedFirewall,
    WgObservation,
    XfrmObservation,
)
from ..core.ops import EntryOp, LinkOp, WgOp, XfrmOp


class LinksPort(Protocol):
    """Bridges, VXLAN/Geneve and veth links with their FDB and neighbour entries (``drivers.links``)."""

    def observe(self) -> LinksObservation: ...
    def apply(self, ops: Sequence[LinkOp | EntryOp]) -> ApplyResult[Any]: ...
    def geneve_supported(self) -> bool: ...
    def interface_mtu(self, ifname: str) -> int: ...


class WireGuardPort(Protocol):
    """The WireGuard interface, its peers and its private key (``drivers.wireguard``)."""

    def observe(self) -> WgObservation: ...
    def apply(self, ops: Sequence[WgOp]) -> ApplyResult[Any]: ...
    def ensure_private_key(self) -> str: ...
    def rotate_private_key(self) -> str: ...


class XfrmPort(Protocol):
    """The agent's ESP SAs and XFRM policies (``drivers.xfrm``), changed in netlink batches."""

    def observe(self) -> XfrmObservation: ...
    def apply(self, ops: Sequence[XfrmOp]) -> ApplyResult[Any]: ...
    def unsupported(self) -> str | None:
        """Why this kernel cannot do ESP with rfc4106(gcm(aes)) and ESN, or None if it can."""
        ...


class FirewallPort(Protocol):
    """The agent's nftables tables (``drivers.firewall``)."""

    def observe(self) -> ObservedFirewall: ...
    def apply_full(self, compiled: CompiledFirewall) -> int: ...
    def apply_elements(
        self, add: Mapping[str, frozenset[Element]], delete: Mapping[str, frozenset[Element]]
    ) -> int: ...


class PacketSource(Protocol):
    """What the reader thread needs of an :class:`~veilnet_agent.drivers.nflog.NflogReader`."""

    dropped: int

    def read(self, timeout: float | None = None) -> list[LoggedPacket]: ...
