"""Kernel IPsec, the second encryption: ESP in transport mode on the encapsulation (pure).

The tunnels (VXLAN, Geneve) run between the hosts' underlay addresses, and their UDP is ESP-protected
in transport mode: ``rfc4106(gcm(aes))``, 256-bit key and 32-bit salt, extended sequence numbers, a
replay window, one SA per pair and direction (``XfrmSa``). Per peer, four policies with ``level
required`` (``XfrmPolicy``): out and in, for the VXLAN and the Geneve port. An ``out`` policy without a
usable SA drops the packet (the kernel never sends it in the clear); an ``in`` policy drops a cleartext
packet from the peer. What is not from a peer at all is dropped by the cleartext guard, which matches
``meta secpath missing`` (the nft JSON key is ``ipsec``) on our VNIs.

Keys come from ``ipsec_keys`` (per-pair, forward secret) and rotate by ``ipsec_epochs``; the renderer
gets each peer's current SAs from the dataplane (``dataplane/ipsec_manager.py``) and this module plans
them: additions (SAs, then policies) before any tunnel is touched, removals (policies, then SAs) after
the tunnels that used them are gone, so a packet to a removed peer is never left with a tunnel and no
policy.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .. import addr
from ..model import IPAddress, NodeState, Peer
from ..mtu import Family
from ..objects import KernelState, PolicyKey, SaKey, XfrmPolicy, XfrmSa
from ..ops import Op, SyncXfrm

ESP_HEADER = 8  # SPI (4) + sequence number (4; the ESN's high half is not sent)
GCM_IV = 8
GCM_ICV = 16
ESP_TRAILER = 2  # pad length + next header
ESP_ALIGN_PAD = 3  # the payload is padded to 4 bytes: at most 3 bytes
ESP_OVERHEAD = ESP_HEADER + GCM_IV + GCM_ICV + ESP_TRAILER + ESP_ALIGN_PAD  # 37: the worst case
ENCAP_PORTS = (4789, 6081)  # VXLAN, Geneve: the UDP the policies cover (never anything else between the hosts)


@dataclass(frozen=True)
class IpsecHost:
    """This host's IPsec facts the desired state does not carry."""

    underlay_address: IPAddress


def policies_for(local: IPAddress, peer: IPAddress) -> list[XfrmPolicy]:
    me, them = addr.text(local), addr.text(peer)
    out = [XfrmPolicy("out", me, them, port) for port in ENCAP_PORTS]
    return out + [XfrmPolicy("in", them, me, port) for port in ENCAP_PORTS]


@dataclass(frozen=True)
class Ipsec:
    """The :class:`~veilnet_agent.core.encryption.Encryption` that kernel IPsec (ESP, transport mode) is."""

    @property
    def name(self) -> str:
        return "ipsec"

    # Transport mode adds no IP header: the tunnel's own outer header is the underlay's.
    def overhead(self, underlay_family: Family) -> int:
        return ESP_OVERHEAD

    def tunnel_address(self, state: NodeState, peer: Peer) -> IPAddress:
        return peer.underlay_address

    def not_decrypted(self) -> dict[str, Any]:
        return {"match": {"op": "==", "left": {"meta": {"key": "ipsec"}}, "right": False}}

    def plan(self, target: KernelState, observed: KernelState) -> Iterable[Op]:
        """Before the tunnels: SAs to add (or replace: same SPI, other key) and policies to set."""
        add = tuple(sa for key, sa in sorted(target.xfrm_sas.items()) if observed.xfrm_sas.get(key) != sa)
        replaced = tuple(sa.ident for sa in add if sa.ident in observed.xfrm_sas)
        policies = tuple(p for key, p in sorted(target.xfrm_policies.items()) if key not in observed.xfrm_policies)
        if add or policies:
            reason = f"{len(add)} SAs to add ({len(replaced)} replaced), {len(policies)} policies to set"
            yield SyncXfrm(add_sas=add, set_policies=policies, delete_sas=replaced, reason=reason)

    def plan_after(self, target: KernelState, observed: KernelState) -> Iterable[Op]:
        """After the tunnels: policies, then SAs, that are no longer wanted."""
        policies: tuple[PolicyKey, ...] = tuple(sorted(k for k in observed.xfrm_policies
                                                       if k not in target.xfrm_policies))
        sas: tuple[SaKey, ...] = tuple(sorted(k for k in observed.xfrm_sas if k not in target.xfrm_sas))
        if policies or sas:
            yield SyncXfrm(delete_policies=policies, delete_sas=sas,
                           reason=f"{len(policies)} policies and {len(sas)} SAs no longer wanted")


def peer_objects(local: IPAddress, peer: Peer, sas: Sequence[XfrmSa]) -> tuple[dict[SaKey, XfrmSa],
                                                                               dict[PolicyKey, XfrmPolicy]]:
    """One peer's part of the target: its policies (always: no SA yet means nothing gets through) and SAs."""
    return ({sa.ident: sa for sa in sas},
            {p.ident: p for p in policies_for(local, peer.underlay_address)})


PeerSas = Mapping[str, Sequence[XfrmSa]]  # peer name -> the SAs it should have now (from the key manager)

IPSEC = Ipsec()
