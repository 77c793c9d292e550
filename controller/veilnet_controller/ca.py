"""The controller's certificate authority: one self-signed P-256 CA per trust domain.

The CA decides every identity it signs. A node CSR only proves possession of a
key; its subject and SANs are discarded and replaced with the node name the
controller authorized, so a compromised host cannot ask for someone else's
SPIFFE ID. Certificates are shaped for gRPC (BoringSSL) mutual TLS: SHA-256
signatures, non-critical SAN, SKI/AKI, explicit EKU.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from veilnet_agent.control import pki
from veilnet_agent.control.pki import PkiError

KEY_FILE = "ca.key"
CERT_FILE = "ca.crt"
TRUST_DOMAIN_FILE = "trust_domain"
CLOCK_SKEW = timedelta(seconds=60)
# The longest certificate the CA issues of each kind, whatever the caller asks: a leaked key is good for at
# most this long even if nobody revokes it. Node certificates renew themselves at two thirds of their life.
MAX_NODE_LIFETIME = timedelta(days=30)
MAX_OPERATOR_LIFETIME = timedelta(days=90)
MAX_SERVER_LIFETIME = timedelta(days=825)
_EC_CURVES = (ec.SECP256R1, ec.SECP384R1)
_MIN_RSA_BITS = 2048
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_RE = re.compile(rf"(\*\.)?({_LABEL}\.)*{_LABEL}")


def certificate_pem(cert: x509.Certificate) -> bytes:
    """PEM encoding of ``cert``."""
    return cert.public_bytes(serialization.Encoding.PEM)


def _check_public_key(key: CertificatePublicKeyTypes) -> None:
    """Accept only keys every peer can handle and that are strong enough today."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        if isinstance(key.curve, _EC_CURVES):
            return
        raise PkiError(f"key type EC {key.curve.name} not accepted: use P-256 or P-384")
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size >= _MIN_RSA_BITS:
            return
        raise PkiError(f"key type RSA-{key.key_size} not accepted: RSA keys need at least {_MIN_RSA_BITS} bits")
    raise PkiError(f"key type {type(key).__name__} not accepted: use EC P-256/P-384 or RSA >= {_MIN_RSA_BITS}")


def _key_usage(key: CertificatePublicKeyTypes) -> x509.KeyUsage:
    """digitalSignature for (EC)DHE-signed TLS; keyAgreement for EC, keyEncipherment for RSA."""
    is_ec = isinstance(key, ec.EllipticCurvePublicKey)
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=not is_ec,
        data_encipherment=False,
        key_agreement=is_ec,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def _check_lifetime(lifetime: timedelta, maximum: timedelta | None = None, what: str = "certificate") -> None:
    if lifetime <= timedelta(0):
        raise PkiError(f"{what} lifetime must be positive, got {lifetime}")
    if maximum is not None and lifetime > maximum:
        raise PkiError(f"{what} lifetime {lifetime} is longer than the {maximum} this CA issues")


class CertificateAuthority:
    """A loaded CA: its certificate, its signing key and the trust domain it vouches for."""

    def __init__(self, trust_domain: str, key: ec.EllipticCurvePrivateKey, certificate: x509.Certificate) -> None:
        self.trust_domain = pki.check_trust_domain(trust_domain)
        self._key = key
        self.certificate = certificate
        self.certificate_pem = certificate_pem(certificate)
        self.ca_hash = pki.ca_hash(self.certificate_pem)

    @classmethod
    def create(
        cls, directory: Path, trust_domain: str, *, lifetime: timedelta = timedelta(days=3650)
    ) -> CertificateAuthority:
        """Make a new CA in ``directory``; never overwrites an existing key (that would orphan every host)."""
        pki.check_trust_domain(trust_domain)
        _check_lifetime(lifetime)
        key_path = directory / KEY_FILE
        if key_path.exists():
            raise PkiError(f"{key_path} already exists: refusing to overwrite an existing CA key")
        key = pki.generate_private_key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"Veilnet CA {trust_domain}")])
        now = datetime.now(UTC)
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + lifetime)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
            .sign(key, hashes.SHA256())
        )
        # Key first: if we crash before ca.crt exists, a retry refuses instead of silently re-keying.
        pki.write_private_key(key_path, key)
        pki.write_public_file(directory / CERT_FILE, certificate_pem(cert))
        pki.write_public_file(directory / TRUST_DOMAIN_FILE, f"{trust_domain}\n".encode())
        return cls(trust_domain, key, cert)

    @classmethod
    def load(cls, directory: Path) -> CertificateAuthority:
        """Load a CA written by ``create``, checking the key belongs to the certificate."""
        key = pki.load_private_key(directory / KEY_FILE)
        try:
            cert = pki.load_certificate((directory / CERT_FILE).read_bytes())
            trust_domain = (directory / TRUST_DOMAIN_FILE).read_text().strip()
        except OSError as exc:
            raise PkiError(f"{directory}: incomplete CA: {exc}") from exc
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        if key.public_key().public_bytes(serialization.Encoding.DER, spki) != cert.public_key().public_bytes(
            serialization.Encoding.DER, spki
        ):
            raise PkiError(f"{directory}: {KEY_FILE} does not match {CERT_FILE}")
        return cls(trust_domain, key, cert)

    def _sign(
        self,
        public_key: CertificatePublicKeyTypes,
        subject: x509.Name,
        san: list[x509.GeneralName],
        eku: x509.ObjectIdentifier,
        not_before: datetime,
        not_after: datetime,
    ) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())  # 159 random bits
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(public_key), critical=True)
            .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False)
        )
        return builder.sign(self._key, hashes.SHA256())

    def _window(
        self,
        lifetime: timedelta,
        not_before: datetime | None,
        not_after: datetime | None,
        maximum: timedelta,
        what: str,
    ) -> tuple[datetime, datetime]:
        _check_lifetime(lifetime, maximum, what)
        now = datetime.now(UTC)
        # Backdated for clock skew, but never by more than a tenth of the lifetime (short-lived test certificates).
        start = not_before if not_before is not None else now - min(CLOCK_SKEW, lifetime / 10)
        end = not_after if not_after is not None else now + lifetime
        if end <= start:
            raise PkiError(f"{what} would expire ({end}) before it is valid ({start})")
        if end - start > maximum + CLOCK_SKEW:
            raise PkiError(f"{what} validity {start} .. {end} is longer than the {maximum} this CA issues")
        ca_end = self.certificate.not_valid_after_utc
        if end > ca_end:
            raise PkiError(f"{what} would expire at {end}, after the CA itself ({ca_end}): "
                           f"a certificate cannot outlive its issuer")
        return start, end

    def sign_node_csr(self, csr_pem: bytes, node: str, lifetime: timedelta) -> x509.Certificate:
        """Sign a node's key as ``node``; the CSR's own subject and SANs are ignored by design."""
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as exc:
            raise PkiError(f"not a PEM certificate signing request: {exc}") from exc
        if not csr.is_signature_valid:
            raise PkiError("CSR signature is invalid: the requester does not hold the key")
        public_key = csr.public_key()
        _check_public_key(public_key)
        return self._node_cert(public_key, node, *self._window(lifetime, None, None, MAX_NODE_LIFETIME,
                                                               "node certificate"))

    def _node_cert(
        self, public_key: CertificatePublicKeyTypes, node: str, not_before: datetime, not_after: datetime
    ) -> x509.Certificate:
        uri = pki.node_spiffe_id(self.trust_domain, node)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node)])
        san: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri)]
        return self._sign(public_key, subject, san, ExtendedKeyUsageOID.CLIENT_AUTH, not_before, not_after)

    def issue_node(
        self,
        name: str,
        lifetime: timedelta,
        *,
        not_before: datetime | None = None,
        not_after: datetime | None = None,
    ) -> tuple[bytes, bytes]:
        """Key and node certificate in one step, for tests and benchmarks: (key PEM, cert PEM)."""
        start, end = self._window(lifetime, not_before, not_after, MAX_NODE_LIFETIME, "node certificate")
        key = pki.generate_private_key()
        cert = self._node_cert(key.public_key(), name, start, end)
        return pki.private_key_pem(key), certificate_pem(cert)

    def issue_operator(
        self,
        name: str,
        role: str,
        lifetime: timedelta,
        *,
        not_before: datetime | None = None,
        not_after: datetime | None = None,
    ) -> tuple[bytes, bytes]:
        """An operator client certificate with its role in O: (key PEM, cert PEM)."""
        if role not in pki.ROLES_OPERATOR:
            raise PkiError(f"unknown operator role {role!r}: want one of {pki.ROLES_OPERATOR}")
        uri = pki.operator_spiffe_id(self.trust_domain, name)
        start, end = self._window(lifetime, not_before, not_after, MAX_OPERATOR_LIFETIME, "operator certificate")
        key = pki.generate_private_key()
        subject = x509.Name(
            [x509.NameAttribute(NameOID.COMMON_NAME, name), x509.NameAttribute(NameOID.ORGANIZATION_NAME, role)]
        )
        san: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri)]
        cert = self._sign(key.public_key(), subject, san, ExtendedKeyUsageOID.CLIENT_AUTH, start, end)
        return pki.private_key_pem(key), certificate_pem(cert)

    def issue_server(self, hosts: Sequence[str], lifetime: timedelta) -> tuple[bytes, bytes]:
        """The controller's TLS server certificate; clients check their target against these SANs."""
        if not hosts:
            raise PkiError("a server certificate needs at least one host name or IP address")
        san: list[x509.GeneralName] = []
        for host in hosts:
            try:
                san.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                if not _DNS_RE.fullmatch(host) or len(host) > 253:
                    raise PkiError(f"invalid server host {host!r}: not an IP address or DNS name") from None
                san.append(x509.DNSName(host.lower()))
        if len(hosts[0]) > 64:
            raise PkiError(f"first server host {hosts[0]!r} is the CN and must be at most 64 characters")
        start, end = self._window(lifetime, None, None, MAX_SERVER_LIFETIME, "server certificate")
        key = pki.generate_private_key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
        cert = self._sign(key.public_key(), subject, san, ExtendedKeyUsageOID.SERVER_AUTH, start, end)
        return pki.private_key_pem(key), certificate_pem(cert)
