"""WireGuard, the first encryption: its MTU overhead, guard match, kernel objects and plan (pure).

The tunnels run between transport addresses on the WireGuard interface
(``vnwg0``); each peer is one WireGuard peer whose allowed IP is its
transport address, so everything the overlay sends is encrypted on the
underlay and a packet that comes out of the interface was sent by that peer.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .. import addr, naming
from ..model import IPAddress, NodeState, Peer
from ..mtu import IP_HEADER, UDP_HEADER, Family
from ..objects import KernelState, WgInterface, WgPeer, diff_fields
from ..ops import EnsureWgInterface, Op, SyncWgPeers

DATA_OVERHEAD = 32  # type+reserved (4), receiver (4), counter (8), poly1305 tag (16)


@dataclass(frozen=True)
class WireGuardHost:
    """This host's WireGuard facts the desired state does not carry."""

    public_key: str
    listen_port: int


def endpoint(address: IPAddress, port: int) -> str:
    return f"[{addr.text(address)}]:{port}" if address.version == 6 else f"{addr.text(address)}:{port}"


def host_prefix(address: IPAddress) -> str:
    return f"{addr.text(address)}/{address.max_prefixlen}"


@dataclass(frozen=True)
class WireGuard:
    """The :class:`~veilnet_agent.core.encryption.Encryption` that WireGuard is."""

    ifname: str = naming.WG_IFNAME

    @property
    def name(self) -> str:
        return "wireguard"

    # WireGuard pads to 16 bytes but never beyond its own interface MTU, so the
    # padding costs nothing at the MTU computed here.
    def overhead(self, underlay_family: Family) -> int:
        return IP_HEADER[underlay_family] + UDP_HEADER + DATA_OVERHEAD

    def interface_mtu(self, underlay_mtu: int, underlay_family: Family) -> int:
        return underlay_mtu - self.overhead(underlay_family)

    def tunnel_address(self, state: NodeState, peer: Peer) -> IPAddress:
        return peer.transport_address

    def not_decrypted(self) -> dict[str, Any]:
        return {"match": {"op": "!=", "left": {"meta": {"key": "iifname"}}, "right": self.ifname}}

    def plan_after(self, target: KernelState, observed: KernelState) -> Iterable[Op]:
        return ()  # a removed WireGuard peer takes its allowed IP with it: nothing to leave for later

    def interface(
        self, state: NodeState, host: WireGuardHost, underlay_mtu: int, underlay_family: Family
    ) -> WgInterface:
        return WgInterface(
            name=self.ifname,
            listen_port=host.listen_port,
            public_key=host.public_key,
            mtu=self.interface_mtu(underlay_mtu, underlay_family),
            addresses=frozenset({str(state.transport_address)}),
        )

    def peer(self, peer: Peer) -> WgPeer:
        return WgPeer(
            public_key=peer.public_key,
            endpoint=endpoint(peer.underlay_address, peer.underlay_port),
            allowed_ips=frozenset({host_prefix(peer.transport_address)}),
            keepalive=peer.keepalive,
        )

    def plan(self, target: KernelState, observed: KernelState) -> Iterable[Op]:
        if target.wg is not None:
            if observed.wg is None:
                yield EnsureWgInterface(target.wg, create=True, reason="missing")
            elif observed.wg != target.wg:
                yield EnsureWgInterface(target.wg, create=False, reason=diff_fields(observed.wg, target.wg))
        upserts = tuple(
            sorted(
                (peer for key, peer in target.wg_peers.items() if observed.wg_peers.get(key) != peer),
                key=lambda p: p.public_key,
            )
        )
        removes = tuple(sorted(k for k in observed.wg_peers if k not in target.wg_peers))
        if upserts or removes:
            reason = f"{len(upserts)} to add or change, {len(removes)} to remove"
            yield SyncWgPeers(upserts, removes, reason)


WIREGUARD = WireGuard()
