"""IPsec key agreement (core/encryption/ipsec_keys.py): both ends agree, directions and epochs never share
keys, and every published half that must not be used is refused with its reason."""

from __future__ import annotations

import dataclasses

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from veilnet_agent.core.encryption.ipsec_keys import (
    SPI_MIN,
    EpochKey,
    KeyRefused,
    derive,
    same_keys,
    verify,
)

NOW = 1_800_000_000


def node(name: str, epoch: int = 1) -> tuple[EpochKey, ec.EllipticCurvePrivateKey]:
    return EpochKey.generate(name, epoch, NOW, 3600), ec.generate_private_key(ec.SECP256R1())


def test_both_ends_derive_the_same_keys_and_the_two_directions_differ() -> None:
    (a, a_cert), (b, b_cert) = node("host-a"), node("host-b", epoch=7)
    a_pub, b_pub = a.publish(a_cert), b.publish(b_cert)
    a_out, a_in = derive(a, b_pub)
    b_out, b_in = derive(b, a_pub)
    assert same_keys(a_out, b_in) and same_keys(a_in, b_out)
    assert (a_out.src, a_out.dst, a_in.src, a_in.dst) == ("host-a", "host-b", "host-b", "host-a")
    assert a_out.key != a_in.key and a_out.salt != a_in.salt and a_out.spi != a_in.spi
    assert len(a_out.key) == 32 and len(a_out.salt) == 4
    assert "key" not in repr(a_out).lower().replace("directionkeys", "")  # no key material in logs


def test_a_new_epoch_on_either_side_gives_new_keys() -> None:
    (a, _), (b, b_cert) = node("host-a"), node("host-b")
    first = derive(a, b.publish(b_cert))[0]
    b2 = EpochKey.generate("host-b", 2, NOW, 3600)
    second = derive(a, b2.publish(b_cert))[0]
    a2 = EpochKey.generate("host-a", 2, NOW, 3600)
    third = derive(a2, b2.publish(b_cert))[0]
    assert len({first.key, second.key, third.key}) == 3
    assert len({first.spi, second.spi, third.spi}) == 3


def test_spis_stay_out_of_the_reserved_range() -> None:
    a, _ = node("host-a")
    cert = ec.generate_private_key(ec.SECP256R1())
    spis = [spi for i in range(200)
            for spi in (k.spi for k in derive(a, EpochKey.generate(f"h{i}", 1, NOW, 60).publish(cert)))]
    assert min(spis) >= SPI_MIN and max(spis) < 2**32


def test_a_valid_half_is_accepted() -> None:
    b, b_cert = node("host-b", epoch=3)
    verify(b.publish(b_cert), b_cert.public_key(), "host-b", last_accepted_epoch=2, now=NOW)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ("signature", "does not verify"),
        ("public", "does not verify"),
        ("epoch", "does not verify"),
        ("expires", "does not verify"),
        ("other-certificate", "does not verify"),
        ("other-node", "not its own"),
        ("stale", "stale or replayed"),
        ("replayed", "stale or replayed"),
        ("expired", "expired"),
        ("future", "in the future"),
        ("short-key", "32 bytes"),
    ],
)
def test_a_half_that_must_not_be_used_is_refused_with_its_reason(change: str, reason: str) -> None:
    b, b_cert = node("host-b", epoch=5)
    published = b.publish(b_cert)
    signer, name, last, now = b_cert.public_key(), "host-b", 4, NOW
    if change == "signature":
        sig = bytearray(published.signature)
        sig[-1] ^= 1
        published = dataclasses.replace(published, signature=bytes(sig))
    elif change == "public":
        published = dataclasses.replace(published, public=bytes(32 * [9]))
    elif change == "epoch":
        published = dataclasses.replace(published, epoch=6)  # a newer epoch claimed with the old signature
    elif change == "expires":
        published = dataclasses.replace(published, expires=published.expires + 86400)
    elif change == "other-certificate":
        signer = ec.generate_private_key(ec.SECP256R1()).public_key()
    elif change == "other-node":
        name = "host-c"  # host-c's certificate presenting host-b's key
    elif change == "stale":
        last = 9
    elif change == "replayed":
        last = 5
    elif change == "expired":
        now = published.expires
    elif change == "future":
        now = NOW - 3600
    elif change == "short-key":
        published = dataclasses.replace(published, public=b"\x01" * 31)
    with pytest.raises(KeyRefused, match=reason) as refused:
        verify(published, signer, name, last, now)
    assert refused.value.node == "host-b"


def test_a_retired_epoch_cannot_derive_any_more() -> None:
    (a, _), (b, b_cert) = node("host-a"), node("host-b")
    derive(a, b.publish(b_cert))
    a.retire()
    assert a.retired
    with pytest.raises(ValueError, match="retired"):
        derive(a, b.publish(b_cert))


def test_a_low_order_public_key_is_refused() -> None:
    a, _ = node("host-a")
    with pytest.raises(ValueError):
        a.exchange(bytes(32))  # the all-zero point: every "secret" would be zero
