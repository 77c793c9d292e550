"""IPsec rotation as a small state machine: make before break, per peer. Pure; no clock, no kernel.

Groundwork for the IPsec mode (issue 10); nothing uses it yet. A pair's SAs are identified by their
*generation*, the pair of epochs ``(ours, theirs)`` their keys were derived from (``ipsec_keys.derive``).
For one peer, the machine decides, from events, what the data plane must do, in an order that never
loses a packet and never sends in the clear:

1. keys for a new generation exist (either side published a new epoch): **install its inbound SA**;
2. once installed, **tell the peer** (a confirmation over the control channel);
3. only when the peer confirms that *its* inbound SA for that generation is installed, **switch our
   outbound** to it: the peer can already decrypt whatever we send with it;
4. the previous generations' SAs are **removed after a grace period** (packets in flight, and the
   peer's own switch, which happens when our confirmation reaches it);
5. a peer that does not confirm within ``confirm_timeout`` is **reported** (``Unconfirmed``) and keeps
   the generation that works; nothing falls back to cleartext (the XFRM policies stay ``required``).

Rotation itself (a new local epoch) is due by time, by volume (before the packet count of an SA reaches
a safe fraction of what one GCM key may protect) or on demand: :func:`rotation_due`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# (our epoch, their epoch), always from this host's side: a peer's confirmation names (its, ours), which the
# caller swaps. Both parts only grow, so tuple order is age order.
Generation = tuple[int, int]

DEFAULT_LIFETIME_S = 3600
DEFAULT_GRACE_S = 30
DEFAULT_CONFIRM_TIMEOUT_S = 60
# One AES-GCM key: NIST SP 800-38D's random-nonce bound does not apply (ESP nonces are the sequence number),
# but rotating well before 2**32 packets keeps every SA far from any sequence or counter limit.
PACKET_LIMIT = 2**32
SAFE_FRACTION = 0.5


@dataclass(frozen=True)
class InstallInbound:
    generation: Generation


@dataclass(frozen=True)
class SendConfirmation:
    generation: Generation


@dataclass(frozen=True)
class SwitchOutbound:
    generation: Generation
    previous: Generation | None


@dataclass(frozen=True)
class RemoveGeneration:
    """Delete both SAs of ``generation`` (inbound and outbound)."""

    generation: Generation


@dataclass(frozen=True)
class Unconfirmed:
    """The peer has not confirmed ``generation`` for ``waited`` seconds; we keep sending with ``outbound``."""

    generation: Generation
    waited: float
    outbound: Generation | None


Action = InstallInbound | SendConfirmation | SwitchOutbound | RemoveGeneration | Unconfirmed


@dataclass
class PeerRotation:
    """The rotation state of one peer. Feed it events; do what it returns, in order."""

    grace_s: float = DEFAULT_GRACE_S
    confirm_timeout_s: float = DEFAULT_CONFIRM_TIMEOUT_S
    outbound: Generation | None = None
    inbound: dict[Generation, float] = field(default_factory=dict)  # installed -> when
    confirmed_by_peer: set[Generation] = field(default_factory=set)
    pending: dict[Generation, float] = field(default_factory=dict)  # keys known, inbound not yet installed
    retiring: dict[Generation, float] = field(default_factory=dict)  # -> remove at
    reported: set[Generation] = field(default_factory=set)

    def keys_available(self, generation: Generation, now: float) -> list[Action]:
        if generation in self.inbound or generation in self.pending or self._older_than_outbound(generation):
            return []
        self.pending[generation] = now
        return [InstallInbound(generation)]

    def inbound_installed(self, generation: Generation, now: float) -> list[Action]:
        if self.pending.pop(generation, None) is None:
            return []
        self.inbound[generation] = now
        actions: list[Action] = [SendConfirmation(generation)]
        return actions + self._maybe_switch(now)

    def peer_confirmed(self, generation: Generation, now: float) -> list[Action]:
        if self._older_than_outbound(generation):
            return []
        self.confirmed_by_peer.add(generation)
        return self._maybe_switch(now)

    def tick(self, now: float) -> list[Action]:
        actions: list[Action] = []
        for generation, at in sorted(self.retiring.items()):
            if at <= now:
                del self.retiring[generation]
                self.inbound.pop(generation, None)
                self.confirmed_by_peer.discard(generation)
                actions.append(RemoveGeneration(generation))
        for generation, since in sorted(self.inbound.items()):
            waiting = (generation != self.outbound and generation not in self.confirmed_by_peer
                       and generation not in self.retiring and not self._older_than_outbound(generation))
            if waiting and now - since >= self.confirm_timeout_s and generation not in self.reported:
                self.reported.add(generation)
                actions.append(Unconfirmed(generation, now - since, self.outbound))
        return actions

    def _maybe_switch(self, now: float) -> list[Action]:
        ready = [g for g in self.inbound if g in self.confirmed_by_peer and not self._older_than_outbound(g)
                 and g != self.outbound]
        if not ready:
            return []
        newest = max(ready)
        previous = self.outbound
        self.outbound = newest
        actions: list[Action] = [SwitchOutbound(newest, previous)]
        for generation in list(self.inbound):  # everything older stays only for the grace period
            if generation < newest and generation not in self.retiring:
                self.retiring[generation] = now + self.grace_s
        for generation in [g for g in self.pending if g < newest]:
            del self.pending[generation]
        return actions

    def _older_than_outbound(self, generation: Generation) -> bool:
        return self.outbound is not None and generation < self.outbound


def rotation_due(epoch_started: float, now: float, packets: int, *, lifetime_s: float = DEFAULT_LIFETIME_S,
                 packet_limit: int = PACKET_LIMIT, safe_fraction: float = SAFE_FRACTION,
                 requested: bool = False) -> str | None:
    """Why a new local epoch is due now (``"time"``, ``"volume"``, ``"requested"``), or None."""
    if requested:
        return "requested"
    if packets >= packet_limit * safe_fraction:
        return "volume"
    if now - epoch_started >= lifetime_s:
        return "time"
    return None
