"""The host identity directory: key and certificate are swapped as one, crash-safe, and read consistently.

Real keys and certificates from a real CA; no network, no root.
"""

from __future__ import annotations

import json
import os
import stat
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from veilnet_agent.control import pki
from veilnet_agent.control.enrollment import EnrollmentError, IdentityFiles
from veilnet_controller.ca import CertificateAuthority, certificate_pem

TD = "veilnet.test"
NODE = "host-a"
HOUR = timedelta(hours=1)
CONTROLLER = json.dumps({"control_endpoint": "127.0.0.1:7443"}).encode()


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.create(tmp_path_factory.mktemp("ca") / "ca", TD)


@pytest.fixture
def files(tmp_path: Path) -> IdentityFiles:
    return IdentityFiles(tmp_path / "identity")


def ca_pem(ca: CertificateAuthority) -> bytes:
    return certificate_pem(ca.certificate)


def new_pair(ca: CertificateAuthority, name: str = NODE) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    key = pki.generate_private_key()
    return key, certificate_pem(ca.sign_node_csr(pki.make_csr(key, name), name, HOUR))


def spki_of_key(key_pem: bytes) -> bytes:
    return pki.load_private_key_pem(key_pem).public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def spki_of_cert(cert_pem: bytes) -> bytes:
    return pki.load_certificate(cert_pem).public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def assert_matching(key_pem: bytes, cert_pem: bytes) -> None:
    assert spki_of_key(key_pem) == spki_of_cert(cert_pem)


def first_install(files: IdentityFiles, ca: CertificateAuthority) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    key, cert = new_pair(ca)
    files.install(key, cert, ca_pem=ca_pem(ca), controller=CONTROLLER)
    return key, cert


def generations(files: IdentityFiles) -> list[str]:
    return sorted((p.name for p in files.directory.glob("gen-*")), key=lambda n: int(n.split("-")[1]))


def current(files: IdentityFiles) -> str:
    return os.readlink(files.directory / "current")


def test_first_install_writes_generation_one_with_links(files: IdentityFiles, ca: CertificateAuthority) -> None:
    key, cert = first_install(files, ca)
    d = files.directory
    assert current(files) == "gen-1"
    assert generations(files) == ["gen-1"]
    for name in ("node.key", "node.crt", "ca.crt", "controller.json"):
        assert os.readlink(d / name) == f"current/{name}"
        assert (d / name).is_file()  # the documented paths still read through the links
    assert (d / "node.crt").read_bytes() == cert
    assert (d / "ca.crt").read_bytes() == ca_pem(ca)
    assert pki.load_private_key(files.key).private_numbers() == key.private_numbers()
    assert files.control_endpoint() == "127.0.0.1:7443"
    assert files.certificate().name == NODE
    assert files.renewal_time() < files.certificate().not_after
    files.channel_credentials()  # builds from the same generation
    assert_matching(*files.read_pair())


def test_modes(files: IdentityFiles, ca: CertificateAuthority) -> None:
    first_install(files, ca)
    files.install(*new_pair(ca))
    d = files.directory
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert stat.S_IMODE((d / "node.key").stat().st_mode) == 0o600  # follows the links, like the integration tests
    assert stat.S_IMODE((d / "node.crt").stat().st_mode) == 0o644
    for gen in generations(files):
        assert stat.S_IMODE((d / gen).stat().st_mode) == 0o700
        assert stat.S_IMODE((d / gen / "node.key").stat().st_mode) == 0o600


def all_private_keys(files: IdentityFiles) -> list[bytes]:
    """Every private key under the identity directory, whatever its name or generation."""
    return [p.read_bytes() for p in files.directory.rglob("*")
            if p.is_file() and not p.is_symlink() and b"PRIVATE KEY" in p.read_bytes()]


def test_install_swaps_and_removes_the_replaced_key(files: IdentityFiles, ca: CertificateAuthority) -> None:
    key1, _ = first_install(files, ca)
    old_key_file = files.directory / "gen-1" / "node.key"
    assert old_key_file.is_file()
    key2, cert2 = new_pair(ca)
    files.install(key2, cert2)
    assert current(files) == "gen-2"
    assert generations(files) == ["gen-2"]  # the replaced generation is gone...
    assert not old_key_file.exists()
    assert all_private_keys(files) == [pki.private_key_pem(key2)]  # ...and with it the only copy of key1
    assert pki.private_key_pem(key1) not in all_private_keys(files)
    key_pem, cert_pem = files.read_pair()
    assert cert_pem == cert2
    assert_matching(key_pem, cert_pem)
    assert pki.load_private_key(files.key).private_numbers() == key2.private_numbers()
    # CA bundle and controller.json carried over into the new generation.
    assert (files.directory / "gen-2" / "ca.crt").read_bytes() == ca_pem(ca)
    assert (files.directory / "gen-2" / "controller.json").read_bytes() == CONTROLLER

    files.install(*new_pair(ca))
    assert current(files) == "gen-3"
    assert generations(files) == ["gen-3"]
    assert not list(files.directory.glob(".*.tmp"))


def test_crash_before_the_swap_leaves_the_previous_pair_live(files: IdentityFiles, ca: CertificateAuthority) -> None:
    key1, cert1 = first_install(files, ca)
    key2, cert2 = new_pair(ca)
    files._write_generation(key2, cert2, ca_pem(ca), CONTROLLER)  # then "crash": no swap
    assert generations(files) == ["gen-1", "gen-2"]
    assert current(files) == "gen-1"

    # A restarted agent (a fresh IdentityFiles) still has the old, matching identity.
    after = IdentityFiles(files.directory)
    assert after.exists()
    key_pem, cert_pem = after.read_pair()
    assert cert_pem == cert1
    assert_matching(key_pem, cert_pem)
    assert pki.load_private_key(after.key).private_numbers() == key1.private_numbers()
    assert after.certificate().serial == pki.identity_from_certificate(cert1).serial

    # The next install ignores the orphan and removes it along with gen-1, which it replaces.
    key3, cert3 = new_pair(ca)
    after.install(key3, cert3)
    assert current(files) == "gen-3"
    assert generations(files) == ["gen-3"]
    assert after.read_pair()[1] == cert3


def test_crash_in_the_first_join_is_not_an_identity(files: IdentityFiles, ca: CertificateAuthority) -> None:
    assert not files.exists()
    files.directory.mkdir(mode=0o700)
    files._write_generation(*new_pair(ca), ca_pem(ca), CONTROLLER)  # crashed before the swap
    assert not files.exists()
    with pytest.raises(FileNotFoundError):
        files.read_pair()
    with pytest.raises(EnrollmentError, match="not joined"):
        files.control_endpoint()
    first_install(files, ca)
    assert files.exists()
    assert generations(files) == ["gen-2"]


def test_exists_only_when_complete(files: IdentityFiles, ca: CertificateAuthority) -> None:
    assert not files.exists()
    first_install(files, ca)
    assert files.exists()
    (files.directory / "gen-1" / "controller.json").unlink()
    assert not files.exists()


def test_renewal_without_an_identity_is_refused(files: IdentityFiles, ca: CertificateAuthority) -> None:
    with pytest.raises(EnrollmentError, match="no identity to renew"):
        files.install(*new_pair(ca))
    assert not files.exists()


def test_a_mismatched_pair_is_never_installed(files: IdentityFiles, ca: CertificateAuthority) -> None:
    first_install(files, ca)
    key, _ = new_pair(ca)
    _, other_cert = new_pair(ca)
    with pytest.raises(EnrollmentError, match="does not belong to the new private key"):
        files.install(key, other_cert)
    foreign = CertificateAuthority.create(files.directory.parent / "other-ca", TD)
    with pytest.raises(EnrollmentError, match="no CA in the bundle issued"):
        files.install(*new_pair(foreign))
    assert current(files) == "gen-1"
    assert generations(files) == ["gen-1"]
    assert_matching(*files.read_pair())


def test_rejoin_replaces_ca_and_controller_together(files: IdentityFiles, ca: CertificateAuthority) -> None:
    first_install(files, ca)
    other = CertificateAuthority.create(files.directory.parent / "other-ca", TD)
    key, cert = new_pair(other)
    files.install(key, cert, ca_pem=ca_pem(other), controller=b'{"control_endpoint": "10.0.0.1:7443"}')
    assert files.control_endpoint() == "10.0.0.1:7443"
    assert files.ca.read_bytes() == ca_pem(other)
    assert files.read_pair()[1] == cert


def test_flat_layout_is_read_and_migrated(files: IdentityFiles, ca: CertificateAuthority) -> None:
    """An identity written before generations (plain files) still works and becomes links on the next install."""
    key, cert = new_pair(ca)
    pki.write_private_key(files.key, key)
    pki.write_public_file(files.cert, cert)
    pki.write_public_file(files.ca, ca_pem(ca))
    pki.write_public_file(files.controller, CONTROLLER)
    assert files.exists()
    assert files.read_pair()[1] == cert
    key2, cert2 = new_pair(ca)
    files.install(key2, cert2)
    assert current(files) == "gen-1"
    assert files.key.is_symlink() and files.cert.is_symlink()
    assert files.cert.read_bytes() == cert2
    assert files.control_endpoint() == "127.0.0.1:7443"
    assert_matching(*files.read_pair())


def test_concurrent_reads_never_mix_generations(files: IdentityFiles, ca: CertificateAuthority) -> None:
    first_install(files, ca)
    pairs = [new_pair(ca) for _ in range(50)]
    done = threading.Event()
    reads: list[tuple[bytes, bytes]] = []
    failures: list[BaseException] = []

    def reader() -> None:
        try:
            while not done.is_set():
                reads.append(files.read_pair())
        except BaseException as exc:  # surfaced below
            failures.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for key, cert in pairs:
            files.install(key, cert)
    finally:
        done.set()
        thread.join()
    assert not failures, failures
    assert len(reads) > 50
    for key_pem, cert_pem in reads:
        assert_matching(key_pem, cert_pem)
    assert len({cert for _, cert in reads}) > 1  # the reader really did see swaps
    assert files.read_pair()[1] == pairs[-1][1]
    assert current(files) == "gen-51"
    assert generations(files) == ["gen-51"]
