"""IPsec key agreement with forward secrecy: signed ephemeral X25519 halves, per-pair directional keys.

Groundwork for the IPsec encryption mode (issue 10); nothing uses it yet. Pure (``cryptography`` only).

Each agent makes an ephemeral X25519 key pair per *epoch* and publishes the public half signed with its
node certificate's key, over what the signature covers::

    "veilnet-ipsec-epoch-v1" 0x00 | node name 0x00 | epoch (u64) | created (u64 s) | expires (u64 s) | public (32)

A receiver accepts a half only if the signature verifies under the public key of the sender's *current*
certificate (checked against our CA by the caller), the name is the certificate's node, the epoch is newer
than the last one it accepted from that node, and it has not expired. The pair's keys then come from
HKDF-SHA256 over the X25519 secret, with both node names (in a fixed order), both epochs and the direction
in the ``info``: each direction gets its own 256-bit AES-GCM key, 32-bit salt and SPI, so the two SAs of a
pair never share a key or nonce space, and a stolen long-term key does not recover any epoch's traffic.
"""

from __future__ import annotations

import hmac
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SIGNED_CONTEXT = b"veilnet-ipsec-epoch-v1\0"
KDF_CONTEXT = b"veilnet-ipsec-sa-v1"
KEY_BYTES = 32  # AES-256
SALT_BYTES = 4  # rfc4106 salt
SPI_MIN = 0x100  # 1..255 are reserved by IANA for future use (RFC 4303)
MAX_NAME_BYTES = 253


class KeyRefused(ValueError):
    """A published epoch key the receiver must not use; ``reason`` says why (for a security event)."""

    def __init__(self, node: str, epoch: int, reason: str) -> None:
        super().__init__(f"epoch key of {node!r} (epoch {epoch}) refused: {reason}")
        self.node = node
        self.epoch = epoch
        self.reason = reason


@dataclass(frozen=True)
class PublishedKey:
    """The public half of one node's epoch key, as it travels (controller relays it unchanged)."""

    node: str
    epoch: int
    created: int  # Unix seconds
    expires: int  # Unix seconds
    public: bytes  # X25519, 32 bytes
    signature: bytes  # ECDSA-SHA256 (DER) over signed_bytes()

    def signed_bytes(self) -> bytes:
        return signed_bytes(self.node, self.epoch, self.created, self.expires, self.public)


def signed_bytes(node: str, epoch: int, created: int, expires: int, public: bytes) -> bytes:
    name = node.encode()
    if not name or len(name) > MAX_NAME_BYTES or b"\0" in name:
        raise ValueError(f"node name {node!r} cannot be signed")
    if len(public) != 32:
        raise ValueError(f"an X25519 public key has 32 bytes, got {len(public)}")
    return SIGNED_CONTEXT + name + b"\0" + struct.pack(">QQQ", epoch, created, expires) + public


@dataclass
class EpochKey:
    """Our ephemeral key for one epoch. Lives in memory only; ``retire()`` drops the private half."""

    node: str
    epoch: int
    created: int
    expires: int
    _private: x25519.X25519PrivateKey | None

    @classmethod
    def generate(cls, node: str, epoch: int, created: int, lifetime: int) -> EpochKey:
        if epoch < 1 or lifetime < 1:
            raise ValueError("epochs start at 1 and live at least a second")
        return cls(node, epoch, created, created + lifetime, x25519.X25519PrivateKey.generate())

    def public(self) -> bytes:
        return self._key().public_key().public_bytes_raw()

    def publish(self, signer: ec.EllipticCurvePrivateKey) -> PublishedKey:
        public = self.public()
        payload = signed_bytes(self.node, self.epoch, self.created, self.expires, public)
        return PublishedKey(self.node, self.epoch, self.created, self.expires, public,
                            signer.sign(payload, ec.ECDSA(hashes.SHA256())))

    def exchange(self, peer_public: bytes) -> bytes:
        secret = self._key().exchange(x25519.X25519PublicKey.from_public_bytes(peer_public))
        if not any(secret):  # a low-order point: the "secret" would be known to everyone
            raise ValueError("the peer's public key gives an all-zero shared secret")
        return secret

    def retire(self) -> None:
        """Forget the private half (the object cannot be wiped in place; dropping the last reference
        lets OpenSSL free and clear it)."""
        self._private = None

    @property
    def retired(self) -> bool:
        return self._private is None

    def _key(self) -> x25519.X25519PrivateKey:
        if self._private is None:
            raise ValueError(f"epoch {self.epoch} is retired: its private key is gone")
        return self._private


def verify(published: PublishedKey, signer_public: ec.EllipticCurvePublicKey, certificate_node: str,
           last_accepted_epoch: int, now: int) -> None:
    """Raise KeyRefused unless ``published`` may be used (see the module docstring)."""
    node, epoch = published.node, published.epoch
    if node != certificate_node:
        raise KeyRefused(node, epoch, f"signed by {certificate_node!r}'s certificate, not its own")
    try:
        payload = published.signed_bytes()
    except ValueError as exc:
        raise KeyRefused(node, epoch, str(exc)) from None
    try:
        signer_public.verify(published.signature, payload, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise KeyRefused(node, epoch, "the signature does not verify under its current certificate") from None
    if epoch <= last_accepted_epoch:
        raise KeyRefused(node, epoch, f"stale or replayed: epoch {last_accepted_epoch} was already accepted")
    if published.expires <= now:
        raise KeyRefused(node, epoch, "expired")
    if published.created > now + 300:
        raise KeyRefused(node, epoch, "created in the future (clock skew over 5 minutes)")


@dataclass(frozen=True)
class DirectionKeys:
    """One SA's secrets: ``src`` sends with them, ``dst`` receives."""

    src: str
    dst: str
    key: bytes  # 32 bytes, rfc4106(gcm(aes)) key
    salt: bytes  # 4 bytes
    spi: int  # SPI_MIN..2**32-1

    def __repr__(self) -> str:  # never print key material
        return f"DirectionKeys({self.src}->{self.dst}, spi=0x{self.spi:08x})"


def derive(ours: EpochKey, theirs: PublishedKey) -> tuple[DirectionKeys, DirectionKeys]:
    """(outbound, inbound) keys of the pair ``ours.node`` <-> ``theirs.node`` for these two epochs."""
    if ours.node == theirs.node:
        raise ValueError("a node does not pair with itself")
    secret = ours.exchange(theirs.public)
    # Fixed order, so both ends compute the same info for each direction.
    (low, low_epoch), (high, high_epoch) = sorted(((ours.node, ours.epoch), (theirs.node, theirs.epoch)))
    common = KDF_CONTEXT + b"\0" + low.encode() + b"\0" + high.encode() + b"\0" + struct.pack(
        ">QQ", low_epoch, high_epoch)
    outbound = _direction(secret, common, ours.node, theirs.node)
    inbound = _direction(secret, common, theirs.node, ours.node)
    return outbound, inbound


def _direction(secret: bytes, common: bytes, src: str, dst: str) -> DirectionKeys:
    info = common + b"\0" + src.encode() + b">" + dst.encode()
    material = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES + SALT_BYTES + 4, salt=None, info=info).derive(secret)
    spi = SPI_MIN + int.from_bytes(material[KEY_BYTES + SALT_BYTES:], "big") % (2**32 - SPI_MIN)
    return DirectionKeys(src, dst, material[:KEY_BYTES], material[KEY_BYTES:KEY_BYTES + SALT_BYTES], spi)


def same_keys(a: DirectionKeys, b: DirectionKeys) -> bool:
    """Constant-time comparison of two SAs' secrets (for tests and adoption checks)."""
    return a.spi == b.spi and hmac.compare_digest(a.key + a.salt, b.key + b.salt)
