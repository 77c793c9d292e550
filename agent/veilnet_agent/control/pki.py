"""Host identity: keys, CSRs and the SPIFFE-style X.509 identities Veilnet trusts.

Every agent and operator proves who it is with a certificate issued by the
controller's CA. The identity lives in exactly one URI SAN,
``spiffe://<trust-domain>/node/<name>`` or ``spiffe://<trust-domain>/operator/<name>``,
so authorization never depends on free-form subject text a CSR could smuggle in.
Operators additionally carry their role in the subject Organization (O).

Private keys are written atomically with mode 0600 from the first byte: a crash
or a concurrent reader never sees a half-written or world-readable key.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import NameOID

from ..core.errors import VeilnetError
from .files import atomic_write

ROLES_OPERATOR = ("admin", "network-admin", "viewer")

# Same rule as node names in the network spec (validate._NAME_RE): a DNS label.
_NAME_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
# SPIFFE trust domains: lowercase letters, digits, '.', '-', '_'.
_TRUST_DOMAIN_RE = re.compile(r"[a-z0-9]([a-z0-9._-]{0,253}[a-z0-9])?")
_SPIFFE_RE = re.compile(r"spiffe://([^/]+)/(node|operator)/([^/]+)")


class PkiError(VeilnetError):
    """A key, CSR or certificate is unusable or does not carry a valid Veilnet identity."""


def check_trust_domain(trust_domain: str) -> str:
    """Return ``trust_domain`` if it is a valid SPIFFE trust domain, else raise PkiError.

    Checked up front so a typo cannot mint a CA whose identities nobody will match.
    """
    if not _TRUST_DOMAIN_RE.fullmatch(trust_domain):
        raise PkiError(f"invalid trust domain {trust_domain!r}: want lowercase letters, digits, '.', '-', '_'")
    return trust_domain


def _check_name(name: str, what: str) -> str:
    if not _NAME_RE.fullmatch(name):
        raise PkiError(f"invalid {what} name {name!r}: want 1-63 of [a-z0-9-], not starting/ending with '-'")
    return name


def generate_private_key() -> ec.EllipticCurvePrivateKey:
    """A fresh P-256 key: small, fast, and accepted by every TLS stack gRPC uses."""
    return ec.generate_private_key(ec.SECP256R1())


def private_key_pem(key: CertificateIssuerPrivateKeyTypes) -> bytes:
    """PKCS#8 PEM, unencrypted: file permissions, not a passphrase, protect host keys."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def write_private_key(path: Path, key: CertificateIssuerPrivateKeyTypes) -> None:
    """Atomically store ``key`` as PKCS#8 PEM with mode 0600 (parent created 0700)."""
    atomic_write(path, private_key_pem(key), 0o600)


def write_public_file(path: Path, data: bytes) -> None:
    """Atomically store public material (certificates, CA bundles) with mode 0644."""
    atomic_write(path, data, 0o644)


def load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Read an unencrypted EC private key; PkiError names the path on any problem."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PkiError(f"{path}: cannot read private key: {exc.strerror or exc}") from exc
    try:
        return load_private_key_pem(data)
    except PkiError as exc:
        raise PkiError(f"{path}: {exc}") from exc


def load_private_key_pem(data: bytes) -> ec.EllipticCurvePrivateKey:
    """Parse an unencrypted PEM EC private key (e.g. one returned by the CA's ``issue_*``)."""
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise PkiError("not an unencrypted PEM private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"expected an EC private key, got {type(key).__name__}")
    return key


def make_csr(key: CertificateIssuerPrivateKeyTypes, common_name: str) -> bytes:
    """A PEM CSR with CN=``common_name``; it only proves key possession, the CA picks the identity."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def node_spiffe_id(trust_domain: str, node: str) -> str:
    """``spiffe://<td>/node/<node>``, the only identity an agent certificate carries."""
    return f"spiffe://{check_trust_domain(trust_domain)}/node/{_check_name(node, 'node')}"


def operator_spiffe_id(trust_domain: str, name: str) -> str:
    """``spiffe://<td>/operator/<name>``, the identity of a human or automation client."""
    return f"spiffe://{check_trust_domain(trust_domain)}/operator/{_check_name(name, 'operator')}"


def ca_hash(ca_cert_pem: bytes) -> str:
    """``sha256:<hex>`` of the CA's SubjectPublicKeyInfo, like kubeadm's discovery hash.

    Pinning the key (not the certificate) lets a bootstrap token survive CA re-issuance
    with the same key, and is short enough to paste on a command line.
    """
    cert = load_certificate(ca_cert_pem)
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "sha256:" + hashlib.sha256(spki).hexdigest()


def load_certificate(pem: bytes) -> x509.Certificate:
    """Parse one PEM certificate (the first, if several); PkiError on anything else."""
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise PkiError(f"not a PEM certificate: {exc}") from exc


def load_certificates(pem: bytes) -> list[x509.Certificate]:
    """Parse a PEM bundle (e.g. a CA bundle); an empty or garbled bundle is a PkiError."""
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise PkiError(f"not a PEM certificate bundle: {exc}") from exc
    if not certs:  # pragma: no cover - cryptography already raises on an empty bundle
        raise PkiError("certificate bundle is empty")
    return certs


@dataclass(frozen=True)
class Identity:
    """Who a verified peer certificate says it is."""

    kind: Literal["node", "operator"]
    name: str
    role: str
    trust_domain: str
    spiffe_id: str
    serial: str
    not_before: datetime
    not_after: datetime


def _parse_any(cert: x509.Certificate | bytes) -> x509.Certificate:
    if isinstance(cert, x509.Certificate):
        return cert
    if b"-----BEGIN" in cert:
        return load_certificate(cert)
    try:
        return x509.load_der_x509_certificate(cert)
    except ValueError as exc:
        raise PkiError(f"not a PEM or DER certificate: {exc}") from exc


def identity_from_certificate(cert: x509.Certificate | bytes, trust_domain: str | None = None) -> Identity:
    """Extract the Veilnet identity; reject anything ambiguous rather than guess.

    Does not check the signature or validity period: the TLS layer (or
    ``verify_issued_by``) does that. Raises PkiError with a message naming the problem.
    """
    c = _parse_any(cert)
    try:
        san = c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise PkiError("certificate has no subjectAltName: expected one spiffe:// URI") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise PkiError(f"certificate must carry exactly one URI SAN, found {len(uris)}: {uris}")
    uri = uris[0]
    m = _SPIFFE_RE.fullmatch(uri)
    if m is None:
        raise PkiError(f"URI SAN {uri!r} is not spiffe://<trust-domain>/node|operator/<name>")
    td, kind, name = m.group(1), m.group(2), m.group(3)
    if not _TRUST_DOMAIN_RE.fullmatch(td):
        raise PkiError(f"URI SAN {uri!r} has an invalid trust domain {td!r}")
    if trust_domain is not None and td != trust_domain:
        raise PkiError(f"certificate trust domain {td!r} does not match expected {trust_domain!r}")
    _check_name(name, kind)
    if kind == "node":
        role = "node"
    else:
        orgs = [str(a.value) for a in c.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)]
        if len(orgs) != 1 or orgs[0] not in ROLES_OPERATOR:
            raise PkiError(f"operator certificate must carry one Organization in {ROLES_OPERATOR}, found {orgs}")
        role = orgs[0]
    return Identity(
        kind="node" if kind == "node" else "operator",
        name=name,
        role=role,
        trust_domain=td,
        spiffe_id=uri,
        serial=format(c.serial_number, "x"),
        not_before=c.not_valid_before_utc,
        not_after=c.not_valid_after_utc,
    )


def renewal_time(cert: x509.Certificate) -> datetime:
    """When to renew: two thirds into the lifetime, leaving a third to retry through outages."""
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    return start + (end - start) * 2 / 3


def verify_issued_by(cert: x509.Certificate, ca: x509.Certificate) -> None:
    """Check ``cert`` was signed by ``ca``'s key (signature and issuer name only, no dates)."""
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise PkiError(
            f"certificate {cert.subject.rfc4514_string()!r} was not issued by {ca.subject.rfc4514_string()!r}"
        ) from exc
