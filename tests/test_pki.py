"""Host PKI: key files, CSR signing, identity extraction and real gRPC mutual TLS.

Everything uses real keys and certificates; nothing here needs root.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator
from concurrent import futures
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from veilnet_agent.control import pki
from veilnet_agent.control.pki import Identity, PkiError
from veilnet_controller.ca import (
    MAX_NODE_LIFETIME,
    MAX_OPERATOR_LIFETIME,
    MAX_SERVER_LIFETIME,
    CertificateAuthority,
    certificate_pem,
)

TD = "veilnet.test"
HOUR = timedelta(hours=1)


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("ca") / "pki"
    CertificateAuthority.create(directory, TD)
    return directory


@pytest.fixture(scope="module")
def ca(ca_dir: Path) -> CertificateAuthority:
    return CertificateAuthority.load(ca_dir)


@pytest.fixture(scope="module")
def foreign_ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.create(tmp_path_factory.mktemp("foreign"), TD)


def _custom_cert(ca_dir: Path, subject: x509.Name, san: list[x509.GeneralName] | None) -> x509.Certificate:
    """A certificate the real CA key signs but whose content the CA API would never produce."""
    ca_key = pki.load_private_key(ca_dir / "ca.key")
    ca_cert = pki.load_certificate((ca_dir / "ca.crt").read_bytes())
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(pki.generate_private_key().public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + HOUR)
    )
    if san is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def _cn(name: str, org: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, name)]
    if org is not None:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attrs)


# --- key files -----------------------------------------------------------------------------------


def test_private_key_written_0600_in_new_0700_dir(tmp_path: Path) -> None:
    old_umask = os.umask(0)  # even a permissive umask must not loosen the key file
    try:
        path = tmp_path / "new" / "host.key"
        key = pki.generate_private_key()
        pki.write_private_key(path, key)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8
    loaded = pki.load_private_key(path)
    assert isinstance(loaded.curve, ec.SECP256R1)
    assert pki.private_key_pem(loaded) == pki.private_key_pem(key)
    assert sorted(p.name for p in path.parent.iterdir()) == ["host.key"]  # no temp files left


def test_private_key_replace_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "host.key"
    first = pki.generate_private_key()
    pki.write_private_key(path, first)
    path.chmod(0o644)  # a loosened old file is tightened by the rewrite
    second = pki.generate_private_key()
    pki.write_private_key(path, second)
    assert pki.private_key_pem(pki.load_private_key(path)) == pki.private_key_pem(second)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600

    def fail_fsync(fd: int) -> None:
        raise OSError(5, "simulated I/O error")

    monkeypatch.setattr(os, "fsync", fail_fsync)
    with pytest.raises(OSError, match="simulated"):
        pki.write_private_key(path, pki.generate_private_key())
    monkeypatch.undo()
    assert pki.private_key_pem(pki.load_private_key(path)) == pki.private_key_pem(second)  # old key intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["host.key"]


def test_public_file_mode_0644(tmp_path: Path, ca: CertificateAuthority) -> None:
    path = tmp_path / "ca-bundle.crt"
    pki.write_public_file(path, ca.certificate_pem)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert path.read_bytes() == ca.certificate_pem


def test_load_private_key_errors_name_the_path(tmp_path: Path, ca: CertificateAuthority) -> None:
    missing = tmp_path / "missing.key"
    with pytest.raises(PkiError, match=re.escape(str(missing))):
        pki.load_private_key(missing)
    garbage = tmp_path / "garbage.key"
    garbage.write_bytes(b"not a key")
    with pytest.raises(PkiError, match=r"garbage\.key: not an unencrypted PEM private key"):
        pki.load_private_key(garbage)
    rsa_key = tmp_path / "rsa.key"
    rsa_key.write_bytes(pki.private_key_pem(rsa.generate_private_key(65537, 2048)))
    with pytest.raises(PkiError, match="expected an EC private key"):
        pki.load_private_key(rsa_key)


def test_load_certificate_rejects_garbage(ca: CertificateAuthority) -> None:
    with pytest.raises(PkiError, match="not a PEM certificate"):
        pki.load_certificate(b"garbage")
    with pytest.raises(PkiError, match="bundle"):
        pki.load_certificates(b"garbage")
    _, node_pem = ca.issue_node("n1", HOUR)
    bundle = pki.load_certificates(ca.certificate_pem + node_pem)
    assert [c.subject for c in bundle] == [ca.certificate.subject, pki.load_certificate(node_pem).subject]


# --- CSR signing ---------------------------------------------------------------------------------


def test_signed_node_certificate_shape(ca: CertificateAuthority) -> None:
    key = pki.generate_private_key()
    before = datetime.now(UTC)
    cert = ca.sign_node_csr(pki.make_csr(key, "node-a"), "node-a", timedelta(hours=24))
    after = datetime.now(UTC)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert not san.critical
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [f"spiffe://{TD}/node/node-a"]
    assert san.value.get_values_for_type(x509.DNSName) == []
    assert cert.subject == _cn("node-a")
    assert cert.issuer == ca.certificate.subject
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ca_ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    assert before - timedelta(seconds=61) <= cert.not_valid_before_utc <= after - timedelta(seconds=59)
    assert (
        before + timedelta(hours=24) - timedelta(seconds=1) <= cert.not_valid_after_utc <= after + timedelta(hours=24)
    )
    assert 0 < cert.serial_number < 2**159
    assert cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    pki.verify_issued_by(cert, ca.certificate)


def test_csr_claims_are_ignored(ca: CertificateAuthority) -> None:
    key = pki.generate_private_key()
    greedy = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(_cn("node-victim", "admin"))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"spiffe://{TD}/node/node-victim"), x509.DNSName("controller")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    cert = ca.sign_node_csr(greedy, "node-b", HOUR)
    ident = pki.identity_from_certificate(cert, TD)
    assert (ident.kind, ident.name, ident.spiffe_id) == ("node", "node-b", f"spiffe://{TD}/node/node-b")
    assert cert.subject == _cn("node-b")
    assert (
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
        == []
    )
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False


def test_tampered_csr_rejected(ca: CertificateAuthority) -> None:
    csr = x509.load_pem_x509_csr(pki.make_csr(pki.generate_private_key(), "node-aaaa"))
    der = csr.public_bytes(serialization.Encoding.DER).replace(b"node-aaaa", b"node-bbbb")
    tampered = x509.load_der_x509_csr(der).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(PkiError, match="CSR signature is invalid"):
        ca.sign_node_csr(tampered, "node-a", HOUR)
    with pytest.raises(PkiError, match="not a PEM certificate signing request"):
        ca.sign_node_csr(b"-----BEGIN CERTIFICATE REQUEST-----\ngarbage\n", "node-a", HOUR)


def test_weak_and_odd_keys_rejected(ca: CertificateAuthority) -> None:
    with pytest.raises(PkiError, match="key type RSA-1024 not accepted"):
        ca.sign_node_csr(pki.make_csr(rsa.generate_private_key(65537, 1024), "n"), "node-a", HOUR)
    with pytest.raises(PkiError, match="key type EC secp256k1 not accepted"):
        ca.sign_node_csr(pki.make_csr(ec.generate_private_key(ec.SECP256K1()), "n"), "node-a", HOUR)
    # Acceptable alternatives still sign.
    for key in (ec.generate_private_key(ec.SECP384R1()), rsa.generate_private_key(65537, 2048)):
        cert = ca.sign_node_csr(pki.make_csr(key, "n"), "node-a", HOUR)
        assert pki.identity_from_certificate(cert).name == "node-a"


def test_bad_node_name_and_lifetime_rejected(ca: CertificateAuthority) -> None:
    csr = pki.make_csr(pki.generate_private_key(), "x")
    with pytest.raises(PkiError, match="invalid node name 'Node_A'"):
        ca.sign_node_csr(csr, "Node_A", HOUR)
    with pytest.raises(PkiError, match="lifetime must be positive"):
        ca.sign_node_csr(csr, "node-a", timedelta(0))


def test_lifetimes_are_bounded_per_kind(ca: CertificateAuthority) -> None:
    """Whatever a caller asks for, the CA issues node, operator and server certificates only so long."""
    csr = pki.make_csr(pki.generate_private_key(), "x")
    day = timedelta(days=1)
    at_most = pki.identity_from_certificate(ca.sign_node_csr(csr, "node-a", MAX_NODE_LIFETIME))
    assert at_most.not_after - at_most.not_before <= MAX_NODE_LIFETIME + timedelta(seconds=60)
    with pytest.raises(PkiError, match=r"node certificate lifetime 31 days, 0:00:00 is longer than the 30 days"):
        ca.sign_node_csr(csr, "node-a", MAX_NODE_LIFETIME + day)
    with pytest.raises(PkiError, match=r"node certificate lifetime .* is longer than"):
        ca.issue_node("node-a", MAX_NODE_LIFETIME + day)
    ca.issue_operator("op", "viewer", MAX_OPERATOR_LIFETIME)
    with pytest.raises(PkiError, match=r"operator certificate lifetime .* is longer than the 90 days"):
        ca.issue_operator("op", "viewer", MAX_OPERATOR_LIFETIME + day)
    with pytest.raises(PkiError, match=r"server certificate lifetime .* is longer than"):
        ca.issue_server(["localhost"], MAX_SERVER_LIFETIME + day)
    # An explicit window cannot get around it either.
    now = datetime.now(UTC)
    with pytest.raises(PkiError, match=r"operator certificate validity .* is longer than"):
        ca.issue_operator("op", "admin", HOUR, not_before=now, not_after=now + MAX_OPERATOR_LIFETIME + day)


def test_nothing_outlives_the_ca(tmp_path: Path) -> None:
    short = CertificateAuthority.create(tmp_path / "short-ca", TD, lifetime=timedelta(days=20))
    with pytest.raises(PkiError, match="after the CA itself"):
        short.issue_operator("op", "admin", timedelta(days=30))
    with pytest.raises(PkiError, match="after the CA itself"):
        short.sign_node_csr(pki.make_csr(pki.generate_private_key(), "x"), "node-a", timedelta(days=25))
    short.issue_node("node-a", timedelta(days=19))


# --- identities ----------------------------------------------------------------------------------


def test_identity_of_node_and_operator(ca: CertificateAuthority) -> None:
    _, node_pem = ca.issue_node("node-1", HOUR)
    ident = pki.identity_from_certificate(node_pem, TD)
    node_cert = pki.load_certificate(node_pem)
    assert ident == Identity(
        kind="node",
        name="node-1",
        role="node",
        trust_domain=TD,
        spiffe_id=f"spiffe://{TD}/node/node-1",
        serial=format(node_cert.serial_number, "x"),
        not_before=node_cert.not_valid_before_utc,
        not_after=node_cert.not_valid_after_utc,
    )
    assert ident.not_before.tzinfo is not None
    assert re.fullmatch(r"[0-9a-f]+", ident.serial)
    # DER input works too.
    assert pki.identity_from_certificate(node_cert.public_bytes(serialization.Encoding.DER)) == ident

    for role in pki.ROLES_OPERATOR:
        _, op_pem = ca.issue_operator("alice", role, HOUR)
        op = pki.identity_from_certificate(pki.load_certificate(op_pem), TD)
        assert (op.kind, op.name, op.role, op.spiffe_id) == ("operator", "alice", role, f"spiffe://{TD}/operator/alice")
        eku = pki.load_certificate(op_pem).extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_identity_rejects_wrong_trust_domain(ca: CertificateAuthority) -> None:
    _, node_pem = ca.issue_node("node-1", HOUR)
    with pytest.raises(PkiError, match=r"trust domain 'veilnet\.test' does not match expected 'other\.test'"):
        pki.identity_from_certificate(node_pem, "other.test")


def test_identity_rejects_malformed_certificates(ca_dir: Path, ca: CertificateAuthority) -> None:
    cases: list[tuple[x509.Certificate, str]] = [
        (_custom_cert(ca_dir, _cn("n"), None), "no subjectAltName"),
        (_custom_cert(ca_dir, _cn("n"), [x509.DNSName("n.example")]), "exactly one URI SAN, found 0"),
        (
            _custom_cert(
                ca_dir,
                _cn("n"),
                [
                    x509.UniformResourceIdentifier(f"spiffe://{TD}/node/a"),
                    x509.UniformResourceIdentifier(f"spiffe://{TD}/node/b"),
                ],
            ),
            "exactly one URI SAN, found 2",
        ),
        (
            _custom_cert(ca_dir, _cn("n"), [x509.UniformResourceIdentifier("https://example.com/node/a")]),
            "is not spiffe://",
        ),
        (
            _custom_cert(ca_dir, _cn("n"), [x509.UniformResourceIdentifier(f"spiffe://{TD}/workload/a")]),
            "is not spiffe://",
        ),
        (
            _custom_cert(ca_dir, _cn("n"), [x509.UniformResourceIdentifier(f"spiffe://{TD}/node/Bad_Name")]),
            "invalid node name 'Bad_Name'",
        ),
        (
            _custom_cert(ca_dir, _cn("n"), [x509.UniformResourceIdentifier(f"spiffe://{TD}/node/-x")]),
            "invalid node name '-x'",
        ),
        (
            _custom_cert(ca_dir, _cn("n"), [x509.UniformResourceIdentifier(f"spiffe://{TD}/node/{'a' * 64}")]),
            "invalid node name",
        ),
        (
            _custom_cert(ca_dir, _cn("n"), [x509.UniformResourceIdentifier("spiffe://Bad_TD/node/a")]),
            "invalid trust domain 'Bad_TD'",
        ),
        (
            _custom_cert(ca_dir, _cn("bob", "root"), [x509.UniformResourceIdentifier(f"spiffe://{TD}/operator/bob")]),
            r"operator certificate must carry one Organization in .* found \['root'\]",
        ),
        (
            _custom_cert(ca_dir, _cn("bob"), [x509.UniformResourceIdentifier(f"spiffe://{TD}/operator/bob")]),
            r"found \[\]",
        ),
    ]
    for cert, message in cases:
        with pytest.raises(PkiError, match=message):
            pki.identity_from_certificate(cert)
    # A server certificate is not an identity either.
    _, server_pem = ca.issue_server(["localhost"], HOUR)
    with pytest.raises(PkiError, match="found 0"):
        pki.identity_from_certificate(server_pem)
    with pytest.raises(PkiError, match="not a PEM or DER certificate"):
        pki.identity_from_certificate(b"\x30\x03garbage")


def test_issue_operator_rejects_bad_role_and_name(ca: CertificateAuthority) -> None:
    with pytest.raises(PkiError, match="unknown operator role 'root'"):
        ca.issue_operator("alice", "root", HOUR)
    with pytest.raises(PkiError, match="invalid operator name 'Alice'"):
        ca.issue_operator("Alice", "admin", HOUR)


def test_spiffe_ids() -> None:
    assert pki.node_spiffe_id("example.org", "n-1") == "spiffe://example.org/node/n-1"
    assert pki.operator_spiffe_id("example.org", "ops") == "spiffe://example.org/operator/ops"
    with pytest.raises(PkiError, match="invalid trust domain"):
        pki.node_spiffe_id("Example.org", "n-1")
    with pytest.raises(PkiError, match="invalid node name"):
        pki.node_spiffe_id("example.org", "n/1")


# --- CA material -----------------------------------------------------------------------------------


def test_ca_certificate_shape(ca: CertificateAuthority) -> None:
    cert = ca.certificate
    assert cert.subject == _cn(f"Veilnet CA {TD}")
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign
    pki.verify_issued_by(cert, cert)  # self-signed


def test_ca_hash(ca_dir: Path, ca: CertificateAuthority, foreign_ca: CertificateAuthority) -> None:
    h = pki.ca_hash(ca.certificate_pem)
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", h)
    assert h == ca.ca_hash == pki.ca_hash((ca_dir / "ca.crt").read_bytes()) == CertificateAuthority.load(ca_dir).ca_hash
    assert foreign_ca.ca_hash != h
    # Cross-check against the kubeadm recipe: sha256 over the DER SubjectPublicKeyInfo.
    import hashlib

    spki = ca.certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert h == "sha256:" + hashlib.sha256(spki).hexdigest()


def test_renewal_time_two_thirds(ca: CertificateAuthority) -> None:
    start = datetime(2030, 1, 1, tzinfo=UTC)
    _, pem = ca.issue_node("node-r", HOUR, not_before=start, not_after=start + timedelta(hours=3))
    assert pki.renewal_time(pki.load_certificate(pem)) == start + timedelta(hours=2)


def test_verify_issued_by_foreign_ca(ca: CertificateAuthority, foreign_ca: CertificateAuthority) -> None:
    _, pem = ca.issue_node("node-1", HOUR)
    cert = pki.load_certificate(pem)
    pki.verify_issued_by(cert, ca.certificate)
    # Same subject name (same trust domain) but a different key: the signature check must catch it.
    assert foreign_ca.certificate.subject == ca.certificate.subject
    with pytest.raises(PkiError, match="was not issued by"):
        pki.verify_issued_by(cert, foreign_ca.certificate)


def test_expired_certificate_via_override(ca: CertificateAuthority) -> None:
    now = datetime.now(UTC)
    _, pem = ca.issue_operator("old", "viewer", HOUR, not_before=now - 2 * HOUR, not_after=now - HOUR)
    ident = pki.identity_from_certificate(pem)
    assert ident.not_after < now  # parsing is date-agnostic; TLS rejects it (see the gRPC test)
    with pytest.raises(PkiError, match="expire"):
        ca.issue_node("n", HOUR, not_before=now, not_after=now - HOUR)


def test_load_roundtrip_and_files(ca_dir: Path, ca: CertificateAuthority) -> None:
    assert stat.S_IMODE((ca_dir / "ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((ca_dir / "ca.crt").stat().st_mode) == 0o644
    assert (ca_dir / "trust_domain").read_text().strip() == TD
    loaded = CertificateAuthority.load(ca_dir)
    assert loaded.trust_domain == TD
    assert loaded.certificate == ca.certificate
    assert loaded.certificate_pem == certificate_pem(ca.certificate) == (ca_dir / "ca.crt").read_bytes()
    # The loaded CA signs certificates the original CA certificate verifies.
    _, pem = loaded.issue_node("node-x", HOUR)
    pki.verify_issued_by(pki.load_certificate(pem), ca.certificate)


def test_create_refuses_to_overwrite(ca_dir: Path) -> None:
    before = (ca_dir / "ca.key").read_bytes()
    with pytest.raises(PkiError, match="already exists"):
        CertificateAuthority.create(ca_dir, TD)
    assert (ca_dir / "ca.key").read_bytes() == before


def test_create_rejects_bad_trust_domain(tmp_path: Path) -> None:
    with pytest.raises(PkiError, match="invalid trust domain"):
        CertificateAuthority.create(tmp_path, "Bad Domain")
    assert not (tmp_path / "ca.key").exists()


def test_load_detects_mismatched_key(tmp_path: Path, ca_dir: Path) -> None:
    other = tmp_path / "other"
    CertificateAuthority.create(other, TD)
    (other / "ca.crt").write_bytes((ca_dir / "ca.crt").read_bytes())
    with pytest.raises(PkiError, match=r"ca\.key does not match ca\.crt"):
        CertificateAuthority.load(other)
    with pytest.raises(PkiError, match="cannot read private key"):
        CertificateAuthority.load(tmp_path / "nowhere")


def test_server_certificate_sans(ca: CertificateAuthority) -> None:
    _, pem = ca.issue_server(["localhost", "127.0.0.1", "::1", "ctl.example.org"], HOUR)
    cert = pki.load_certificate(pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert not san.critical
    assert san.value.get_values_for_type(x509.DNSName) == ["localhost", "ctl.example.org"]
    assert [str(ip) for ip in san.value.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    assert cert.subject == _cn("localhost")
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH
    ]
    with pytest.raises(PkiError, match="at least one host"):
        ca.issue_server([], HOUR)
    with pytest.raises(PkiError, match="not an IP address or DNS name"):
        ca.issue_server(["bad host"], HOUR)


# --- real gRPC mutual TLS --------------------------------------------------------------------------


class _TlsServer:
    def __init__(self, ca: CertificateAuthority) -> None:
        self.seen: list[Identity] = []
        self.errors: list[Exception] = []
        self.ca_pem = ca.certificate_pem
        key, cert = ca.issue_server(["localhost", "127.0.0.1"], HOUR)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        handler = grpc.method_handlers_generic_handler("t.T", {"Echo": grpc.unary_unary_rpc_method_handler(self.echo)})
        self.server.add_generic_rpc_handlers((handler,))
        creds = grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=ca.certificate_pem, require_client_auth=True
        )
        self.port = self.server.add_secure_port("127.0.0.1:0", creds)
        self.server.start()

    def echo(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            [peer_pem] = context.auth_context()["x509_pem_cert"]
            self.seen.append(pki.identity_from_certificate(peer_pem, TD))
        except Exception as exc:  # surfaced by the test, not swallowed
            self.errors.append(exc)
        return request

    def call(self, key_pem: bytes, cert_pem: bytes, root_pem: bytes | None = None) -> bytes:
        creds = grpc.ssl_channel_credentials(root_pem or self.ca_pem, key_pem, cert_pem)
        with grpc.secure_channel(f"127.0.0.1:{self.port}", creds) as channel:
            echo = channel.unary_unary("/t.T/Echo")
            response: bytes = echo(b"ping", timeout=5)
            return response


@pytest.fixture(scope="module")
def tls_server(ca: CertificateAuthority) -> Iterator[_TlsServer]:
    server = _TlsServer(ca)
    yield server
    server.server.stop(None)


def test_grpc_mtls_node_certificate_identity(ca: CertificateAuthority, tls_server: _TlsServer) -> None:
    key = pki.generate_private_key()
    cert = ca.sign_node_csr(pki.make_csr(key, "node-a"), "node-a", HOUR)
    assert tls_server.call(pki.private_key_pem(key), certificate_pem(cert)) == b"ping"
    assert not tls_server.errors
    ident = tls_server.seen[-1]
    assert (ident.kind, ident.name, ident.role, ident.trust_domain) == ("node", "node-a", "node", TD)
    assert ident.serial == format(cert.serial_number, "x")


def test_grpc_mtls_operator_certificate(ca: CertificateAuthority, tls_server: _TlsServer) -> None:
    key, cert = ca.issue_operator("alice", "network-admin", HOUR)
    assert tls_server.call(key, cert) == b"ping"
    assert (tls_server.seen[-1].kind, tls_server.seen[-1].role) == ("operator", "network-admin")


def test_grpc_mtls_foreign_ca_client_rejected(foreign_ca: CertificateAuthority, tls_server: _TlsServer) -> None:
    key, cert = foreign_ca.issue_node("node-a", HOUR)
    with pytest.raises(grpc.RpcError) as info:
        tls_server.call(key, cert)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_grpc_mtls_expired_client_rejected(ca: CertificateAuthority, tls_server: _TlsServer) -> None:
    now = datetime.now(UTC)
    key, cert = ca.issue_node("node-a", HOUR, not_before=now - 2 * HOUR, not_after=now - HOUR)
    with pytest.raises(grpc.RpcError) as info:
        tls_server.call(key, cert)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_grpc_mtls_client_rejects_foreign_server(
    ca: CertificateAuthority, foreign_ca: CertificateAuthority, tls_server: _TlsServer
) -> None:
    key, cert = ca.issue_node("node-a", HOUR)
    with pytest.raises(grpc.RpcError) as info:
        tls_server.call(key, cert, root_pem=foreign_ca.certificate_pem)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_load_private_key_pem(ca: CertificateAuthority) -> None:
    key_pem, _ = ca.issue_node("node-k", HOUR)
    assert pki.private_key_pem(pki.load_private_key_pem(key_pem)) == key_pem
    with pytest.raises(PkiError, match="not an unencrypted PEM private key"):
        pki.load_private_key_pem(b"nope")
