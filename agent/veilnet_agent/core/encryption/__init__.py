"""Encryption of the transport, as a pluggable part of the core.

Every overlay packet travels between transport addresses, and the transport
is encrypted. What an encryption contributes to the core is stated here once,
as :class:`Encryption`; the MTU arithmetic, the renderer, the planner and the
cleartext guard ask it instead of naming WireGuard:

- ``overhead``: the bytes its outer headers and tag cost on the underlay, which
  every segment MTU is reduced by (``core/mtu.py``);
- ``not_decrypted``: the nft match for a packet that did not come out of it,
  which the cleartext guard drops when it carries one of our VNIs
  (``core/firewall_compiler.py``);
- ``plan``: the ops that bring its part of the kernel state to the target
  (``core/planner.py``, first, since the tunnels run over it).

Implementations, each in a module of its own:

- ``wireguard.py``: today's, and the default. Its kernel objects are
  ``KernelState.wg`` / ``wg_peers`` (``WgInterface``, ``WgPeer``), rendered from
  ``NodeContext.encryption`` (a :class:`~.wireguard.WireGuardHost`: this host's
  public key and listen port), applied by ``drivers/wireguard.py`` through
  ``dataplane.ports.WireGuardPort``.
- ``ipsec.py``: kernel IPsec, ESP in transport mode on the tunnels' UDP between
  underlay addresses. Its kernel objects are ``KernelState.xfrm_sas`` /
  ``xfrm_policies``, applied by ``drivers/xfrm.py`` through
  ``dataplane.ports.XfrmPort``; its keys come from ``ipsec_keys.py`` (signed
  ephemeral X25519 halves per epoch, HKDF-SHA256 directional keys, salts and SPIs
  per pair) and rotate by ``ipsec_epochs.py`` (make before break, per peer),
  driven by ``dataplane/ipsec_manager.py``.

A node state names its mode (``NodeState.encryption``); :func:`encryption_of`
gives the implementation. Every implementation plans its part of the kernel in
two phases: ``plan`` before the tunnels change, ``plan_after`` once they have.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

from ..model import IPAddress, NodeState, Peer
from ..mtu import Family
from ..objects import KernelState
from ..ops import Op
from .ipsec import IPSEC, Ipsec, IpsecHost
from .wireguard import WIREGUARD, WireGuard, WireGuardHost


class Encryption(Protocol):
    """What one way of encrypting the transport contributes to the core."""

    @property
    def name(self) -> str: ...

    def overhead(self, underlay_family: Family) -> int:
        """Bytes per packet it adds on the underlay (outer IP and UDP headers included)."""
        ...

    def tunnel_address(self, state: NodeState, peer: Peer) -> IPAddress:
        """Where the tunnels reach ``peer`` (and where its encapsulated packets come from)."""
        ...

    def not_decrypted(self) -> dict[str, Any]:
        """An nft JSON match that is true for a packet that did not come out of this encryption."""
        ...

    def plan(self, target: KernelState, observed: KernelState) -> Iterable[Op]:
        """The ops that bring its part of ``observed`` to ``target``, before the tunnels change."""
        ...

    def plan_after(self, target: KernelState, observed: KernelState) -> Iterable[Op]:
        """What it removes only once the tunnels that used it are gone."""
        ...


ENCRYPTIONS: tuple[Encryption, ...] = (WIREGUARD, IPSEC)  # every implementation the planner asks


def encryption_of(state: NodeState) -> Encryption:
    """The implementation of ``state``'s encryption mode."""
    return IPSEC if state.encryption == "ipsec" else WIREGUARD


__all__ = ["ENCRYPTIONS", "IPSEC", "WIREGUARD", "Encryption", "Ipsec", "IpsecHost", "WireGuard", "WireGuardHost",
           "encryption_of"]
