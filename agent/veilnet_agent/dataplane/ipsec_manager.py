"""IPsec keys and rotation for every peer: epochs, verified peer keys, derived SAs, make before break.

The agent's one holder of IPsec key material (in memory only). It owns:

- our current epoch key (``ipsec_keys.EpochKey``): a fresh one at start, then by time, by volume and on
  demand; the previous one's private half is dropped as soon as a new one exists (forward secrecy);
- each peer's latest verified epoch key (signature under the peer's current certificate from our CA,
  node name, newer epoch): anything else is refused and reported as a ``security_event``;
- per peer a ``PeerRotation`` (``ipsec_epochs``) and the SAs derived for each generation.

The dataplane asks it for every peer's SAs now (:meth:`IpsecManager.sas`) and renders them; after each
pass it says which inbound SAs the kernel holds (:meth:`installed`), which yields the confirmations to
send; a peer's confirmation (:meth:`peer_ready`) switches our outbound. Every method returns a
:class:`Changes`: the peers whose SAs changed (to render and apply), confirmations and epoch keys to
send. Kernel SAs found at start are *adopted* (generation (0, 0), in and out) and kept until the first
new generation replaces them: a restart neither recreates an SA nor drops a packet.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from ..core import addr
from ..core.encryption import ipsec_epochs as epochs
from ..core.encryption import ipsec_keys as keys
from ..core.model import NodeState
from ..core.objects import SaCounters, SaKey, XfrmSa

ADOPTED: epochs.Generation = (0, 0)
KEY_SLACK_S = 300  # a published key stays acceptable this long past two rotation periods

# (certificate PEM) -> (node name, public key) or raise ValueError: checked against our CA, dates, trust domain
CertificateCheck = Callable[[bytes], tuple[str, ec.EllipticCurvePublicKey]]


@dataclass
class Changes:
    """What the caller must do after a call: render and apply ``peers``; send the rest."""

    peers: set[str] = field(default_factory=set)
    confirmations: list[tuple[str, epochs.Generation]] = field(default_factory=list)  # (peer, generation)
    publish: keys.PublishedKey | None = None

    def merge(self, other: Changes) -> None:
        self.peers |= other.peers
        self.confirmations += other.confirmations
        self.publish = other.publish or self.publish

    def __bool__(self) -> bool:
        return bool(self.peers or self.confirmations or self.publish)


@dataclass
class _PeerKeys:
    rotation: epochs.PeerRotation
    derived: dict[epochs.Generation, tuple[XfrmSa, XfrmSa]] = field(default_factory=dict)  # (out, in)
    adopted: tuple[XfrmSa, ...] = ()
    since: dict[epochs.Generation, float] = field(default_factory=dict)  # when we switched outbound to it


class IpsecManager:
    def __init__(self, node: str, signer: ec.EllipticCurvePrivateKey, check_certificate: CertificateCheck,
                 log: Any, *, clock: Callable[[], float] = time.time,
                 grace_s: float = epochs.DEFAULT_GRACE_S,
                 confirm_timeout_s: float = epochs.DEFAULT_CONFIRM_TIMEOUT_S) -> None:
        self.node = node
        self.signer = signer
        self.check_certificate = check_certificate
        self.log = log
        self.clock = clock
        self.grace_s = grace_s
        self.confirm_timeout_s = confirm_timeout_s
        self.local: str | None = None  # our underlay address (text)
        self.replay_window = 4096
        self.rotation_seconds = epochs.DEFAULT_LIFETIME_S
        self.epoch: keys.EpochKey | None = None
        self.epoch_started = 0.0
        self.published: keys.PublishedKey | None = None
        self.peer_keys: dict[str, keys.PublishedKey] = {}  # latest accepted, by node
        self.accepted_epoch: dict[str, int] = {}
        self.peers: dict[str, _PeerKeys] = {}
        self.addresses: dict[str, str] = {}  # peer -> underlay address text
        self.adopted_from: dict[SaKey, XfrmSa] | None = None  # kernel SAs at start, until taken by peers
        self.refused = 0
        self.rotations = 0

    # -- configuration --------------------------------------------------------
    @property
    def started(self) -> bool:
        return self.epoch is not None

    def adopt(self, kernel_sas: Mapping[SaKey, XfrmSa]) -> None:
        """The SAs the kernel holds at start: each peer keeps its own until a new generation replaces them."""
        self.adopted_from = dict(kernel_sas)

    def configure(self, state: NodeState, local: str) -> Changes:
        """A new desired state: peers come and go (a removed peer's keys and SAs are forgotten at once)."""
        self.local = local
        self.replay_window = state.ipsec.replay_window
        self.rotation_seconds = state.ipsec.rotation_seconds
        changes = Changes()
        if self.epoch is None:
            changes.merge(self.new_epoch("start"))
        wanted = {p.name: p for p in state.peers}
        for name in [n for n in self.peers if n not in wanted]:
            del self.peers[name]
            self.addresses.pop(name, None)
            changes.peers.add(name)
        for name, peer in wanted.items():
            address = addr.text(peer.underlay_address)
            if name in self.peers and self.addresses.get(name) == address:
                continue
            self.addresses[name] = address
            self.peers[name] = self._fresh(name, address)
            changes.peers.add(name)
            published = self.peer_keys.get(name)
            if published is not None:
                changes.merge(self._derive(name, published))
        return changes

    def _fresh(self, name: str, address: str) -> _PeerKeys:
        entry = _PeerKeys(epochs.PeerRotation(grace_s=self.grace_s, confirm_timeout_s=self.confirm_timeout_s))
        if self.adopted_from and self.local is not None:
            mine = tuple(sa for sa in self.adopted_from.values()
                         if (sa.src, sa.dst) in ((self.local, address), (address, self.local)))
            if mine:
                entry.adopted = mine
                now = self.clock()
                entry.rotation.outbound = ADOPTED
                entry.rotation.inbound[ADOPTED] = now
                entry.since[ADOPTED] = now
                self.log.info("ipsec_sas_adopted", peer=name, sas=len(mine))
        return entry

    # -- epochs ----------------------------------------------------------------
    def new_epoch(self, reason: str) -> Changes:
        """Start a new epoch of ours: publish it, and derive a new generation with every peer's key."""
        now = self.clock()
        previous = self.epoch
        number = max(previous.epoch + 1 if previous else 1, time.time_ns() // 1000)
        lifetime = int(2 * self.rotation_seconds + KEY_SLACK_S)
        self.epoch = keys.EpochKey.generate(self.node, number, int(now), lifetime)
        if previous is not None:
            previous.retire()  # forward secrecy: nothing can derive that epoch's keys again
            self.rotations += 1
        self.epoch_started = now
        self.published = self.epoch.publish(self.signer)
        self.log.info("ipsec_epoch_started", epoch=number, reason=reason)
        changes = Changes(publish=self.published)
        for name in self.peers:
            published = self.peer_keys.get(name)
            if published is not None:
                changes.merge(self._derive(name, published))
        return changes

    def rotation_due(self, counters: Mapping[SaKey, SaCounters]) -> str | None:
        """Whether our epoch is due for replacement, by time or by the packets any current SA carried."""
        packets = 0
        for entry in self.peers.values():
            current = entry.derived.get(entry.rotation.outbound or ADOPTED)
            for sa in current or ():
                packets = max(packets, counters.get(sa.ident, SaCounters()).packets)
        return epochs.rotation_due(self.epoch_started, self.clock(), packets, lifetime_s=self.rotation_seconds)

    # -- peers' keys and confirmations -------------------------------------------
    def receive_key(self, published: keys.PublishedKey, certificate_pem: bytes) -> Changes:
        """A peer's epoch key as relayed: verified, or refused (KeyRefused, for a security event)."""
        node, epoch = published.node, published.epoch
        if node == self.node:
            raise keys.KeyRefused(node, epoch, "it names this node")
        if node not in self.peers:
            raise keys.KeyRefused(node, epoch, "not a peer: it shares no segment with this node")
        if self.peer_keys.get(node) == published:
            return Changes()  # the one already accepted, relayed again (a reconnect): nothing new
        try:
            certificate_node, public_key = self.check_certificate(certificate_pem)
        except ValueError as exc:
            raise keys.KeyRefused(node, epoch, f"its certificate is not accepted: {exc}") from None
        keys.verify(published, public_key, certificate_node, self.accepted_epoch.get(node, 0), int(self.clock()))
        self.accepted_epoch[node] = epoch
        self.peer_keys[node] = published
        self.log.info("ipsec_peer_key_accepted", peer=node, epoch=epoch)
        return self._derive(node, published)

    def _derive(self, name: str, published: keys.PublishedKey) -> Changes:
        if self.epoch is None or self.local is None:
            return Changes()
        entry = self.peers[name]
        generation = (self.epoch.epoch, published.epoch)
        if generation in entry.derived:
            return Changes()
        out_keys, in_keys = keys.derive(self.epoch, published)
        peer_address = self.addresses[name]
        window = self.replay_window
        entry.derived[generation] = (
            XfrmSa(self.local, peer_address, out_keys.spi, out_keys.key + out_keys.salt, window),
            XfrmSa(peer_address, self.local, in_keys.spi, in_keys.key + in_keys.salt, window),
        )
        return self._act(name, entry.rotation.keys_available(generation, self.clock()))

    def peer_ready(self, peer: str, sender_epoch: int, receiver_epoch: int) -> Changes:
        """``peer`` says its inbound SAs for (its epoch, ours) are installed."""
        entry = self.peers.get(peer)
        if entry is None:
            return Changes()
        return self._act(peer, entry.rotation.peer_confirmed((receiver_epoch, sender_epoch), self.clock()))

    def installed(self, kernel: Iterable[SaKey]) -> Changes:
        """After a pass: pending inbound SAs that the kernel now holds are confirmed to their peers."""
        held = set(kernel)
        changes = Changes()
        now = self.clock()
        for name, entry in self.peers.items():
            for generation in sorted(entry.rotation.pending):
                pair = entry.derived.get(generation)
                if pair is not None and pair[1].ident in held:
                    changes.merge(self._act(name, entry.rotation.inbound_installed(generation, now)))
        return changes

    def confirmations_to_resend(self, counters: Mapping[SaKey, SaCounters]) -> list[tuple[str, epochs.Generation]]:
        """Each peer's newest installed inbound generation while nothing arrived on it: the peer may have
        missed our confirmation (a reconnect), so it is sent again; the peer ignores repeats."""
        out = []
        for name, entry in self.peers.items():
            installed = [g for g in entry.rotation.inbound if g != ADOPTED and g not in entry.rotation.retiring]
            if not installed:
                continue
            newest = max(installed)
            pair = entry.derived.get(newest)
            if pair is not None and counters.get(pair[1].ident, SaCounters()).packets == 0:
                out.append((name, newest))
        return out

    def tick(self) -> Changes:
        changes = Changes()
        now = self.clock()
        for name, entry in self.peers.items():
            changes.merge(self._act(name, entry.rotation.tick(now)))
        return changes

    def _act(self, name: str, actions: list[epochs.Action]) -> Changes:
        changes = Changes()
        entry = self.peers[name]
        for action in actions:
            if isinstance(action, epochs.InstallInbound):
                changes.peers.add(name)
            elif isinstance(action, epochs.SendConfirmation):
                changes.confirmations.append((name, action.generation))
            elif isinstance(action, epochs.SwitchOutbound):
                entry.since[action.generation] = self.clock()
                changes.peers.add(name)
                self.log.info("ipsec_outbound_switched", peer=name, generation=list(action.generation),
                              previous=list(action.previous) if action.previous else None)
            elif isinstance(action, epochs.RemoveGeneration):
                if action.generation == ADOPTED:
                    entry.adopted = ()
                entry.derived.pop(action.generation, None)
                entry.since.pop(action.generation, None)
                changes.peers.add(name)
            elif isinstance(action, epochs.Unconfirmed):
                self.log.warning("ipsec_peer_unconfirmed", peer=name, generation=list(action.generation),
                                 waited_seconds=round(action.waited, 1),
                                 sending_with=list(action.outbound) if action.outbound else None,
                                 note="the peer keeps the generation that works; nothing is sent in the clear")
        return changes

    # -- what the kernel should hold --------------------------------------------------
    def sas(self) -> dict[str, tuple[XfrmSa, ...]]:
        return {name: self.sas_of(name) for name in self.peers}

    def sas_of(self, name: str) -> tuple[XfrmSa, ...]:
        """Inbound SAs of every generation installed or being installed; outbound of the current one and of
        those still in their grace period (the kernel sends with the newest added)."""
        entry = self.peers.get(name)
        if entry is None:
            return ()
        rotation = entry.rotation
        out: list[XfrmSa] = list(entry.adopted)
        for generation, (outbound, inbound) in sorted(entry.derived.items()):
            if generation in rotation.inbound or generation in rotation.pending:
                out.append(inbound)
            if generation == rotation.outbound or (generation in rotation.retiring and generation in entry.since):
                out.append(outbound)
        return tuple(out)

    def peer_status(self, name: str) -> dict[str, Any]:
        entry = self.peers.get(name)
        if entry is None:
            return {}
        rotation = entry.rotation
        current = rotation.outbound
        if current is None:
            state = "waiting for keys"
        elif rotation.reported - {current}:
            state = "unconfirmed"
        elif rotation.pending or any(g > current for g in rotation.inbound):
            state = "rotating"
        else:
            state = "established"
        pair = entry.derived.get(current) if current else None
        sas = (pair if pair else ()) if current != ADOPTED else entry.adopted
        return {"state": state, "generation": current, "since": entry.since.get(current) if current else None,
                "sas": tuple(sas)}
