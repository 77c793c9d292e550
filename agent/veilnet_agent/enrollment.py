"""Host identity: join a controller with a token, pin its CA by hash, renew the certificate over mutual TLS.

Files in ``state_dir/identity`` (directory 0700)::

    node.key         the host's TLS private key: generated here, never sent anywhere (0600)
    node.crt         its certificate, spiffe://<trust-domain>/node/<name>, from the controller's CA
    ca.crt           the CA bundle (verified against the pinned hash at join)
    controller.json  {"control_endpoint": ..., "bootstrap_endpoint": ..., "spiffe_id": ...}

No trust on first use: before sending anything, ``join`` opens a TLS
connection to the bootstrap listener, takes the chain the server presents,
and continues only if a certificate in it has the pinned SubjectPublicKeyInfo
hash *and* issued the server's certificate. That CA then becomes the only
root for the real, verified gRPC connection that carries the token.
"""

from __future__ import annotations

import json
import socket
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import grpc

from veilnet.v1 import controller_pb2 as cpb
from veilnet.v1 import controller_pb2_grpc

from . import pki
from .errors import ValidationError, VeilnetError

JOIN_TIMEOUT = 15.0
_CA_HASH_PREFIX = "sha256:"


class EnrollmentError(VeilnetError):
    pass


@dataclass(frozen=True)
class IdentityFiles:
    directory: Path

    @property
    def key(self) -> Path:
        return self.directory / "node.key"

    @property
    def cert(self) -> Path:
        return self.directory / "node.crt"

    @property
    def ca(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def controller(self) -> Path:
        return self.directory / "controller.json"

    def exists(self) -> bool:
        return all(p.exists() for p in (self.key, self.cert, self.ca, self.controller))

    def control_endpoint(self) -> str:
        try:
            return str(json.loads(self.controller.read_text())["control_endpoint"])
        except (OSError, ValueError, KeyError) as exc:
            raise EnrollmentError(f"{self.controller}: not joined or unreadable ({exc}); run veilnet-agent join") \
                from None

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca.read_bytes(),
            private_key=self.key.read_bytes(),
            certificate_chain=self.cert.read_bytes(),
        )

    def certificate(self) -> pki.Identity:
        return pki.identity_from_certificate(self.cert.read_bytes())

    def renewal_time(self) -> datetime:
        return pki.renewal_time(pki.load_certificate(self.cert.read_bytes()))


def split_endpoint(endpoint: str) -> tuple[str, int]:
    host, sep, port_text = endpoint.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValidationError("--controller", endpoint, "must be HOST:PORT")
    return host.strip("[]"), int(port_text)


def resolve_control_endpoint(advertised: str, bootstrap: str) -> str:
    """Where to dial for Sync: what the controller advertised; a bare ":PORT" means the host we joined through."""
    if not advertised:
        return bootstrap
    if advertised.startswith(":"):
        host, _ = split_endpoint(bootstrap)
        return f"[{host}]{advertised}" if ":" in host else f"{host}{advertised}"
    return advertised


def check_ca_hash(text: str) -> str:
    digest = text[len(_CA_HASH_PREFIX):] if text.startswith(_CA_HASH_PREFIX) else ""
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ValidationError("--ca-hash", text, "must be sha256: followed by 64 lowercase hex digits")
    return text


def fetch_pinned_ca(endpoint: str, ca_hash: str, timeout: float = JOIN_TIMEOUT) -> bytes:
    """The CA certificate (PEM) the server at ``endpoint`` chains to, if its key hash is ``ca_hash``."""
    host, port = split_endpoint(endpoint)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # verified below, against the pin, before anything is sent
    context.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, \
                context.wrap_socket(raw, server_hostname=host) as tls:
            chain_der = [c.public_bytes(ssl._ssl.ENCODING_DER) for c in tls._sslobj.get_unverified_chain()]  # type: ignore[attr-defined]
    except (OSError, ssl.SSLError) as exc:
        raise EnrollmentError(f"cannot reach the controller's bootstrap listener at {endpoint}: {exc}") from None
    if not chain_der:
        raise EnrollmentError(f"{endpoint} presented no certificate")
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    chain = [x509.load_der_x509_certificate(d) for d in chain_der]
    leaf = chain[0]
    for candidate in chain:
        pem = candidate.public_bytes(Encoding.PEM)
        if pki.ca_hash(pem) != ca_hash:
            continue
        try:
            pki.verify_issued_by(leaf, candidate)
        except pki.PkiError:
            continue
        return pem
    raise EnrollmentError(
        f"the controller at {endpoint} does not present a CA with hash {ca_hash}: refusing to send the token "
        "(wrong --ca-hash, or not the controller you meant)"
    )


def _rpc_error(exc: grpc.RpcError, what: str) -> EnrollmentError:
    code = exc.code().name if hasattr(exc, "code") else "UNKNOWN"
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return EnrollmentError(f"{what} refused: {code}: {details}")


def join(files: IdentityFiles, node: str, endpoint: str, token: str, ca_hash: str) -> pki.Identity:
    """Generate the host key, trade token + CSR for a certificate, and store everything in ``files``."""
    check_ca_hash(ca_hash)
    ca_pem = fetch_pinned_ca(endpoint, ca_hash)
    key = pki.generate_private_key()
    csr = pki.make_csr(key, node)
    channel = grpc.secure_channel(endpoint, grpc.ssl_channel_credentials(root_certificates=ca_pem))
    try:
        stub = controller_pb2_grpc.ControllerStub(channel)
        response = stub.Join(cpb.JoinRequest(node_name=node, token=token, csr_pem=csr), timeout=JOIN_TIMEOUT)
    except grpc.RpcError as exc:
        raise _rpc_error(exc, "join") from None
    finally:
        channel.close()
    cert = pki.load_certificate(response.certificate_pem)
    pki.verify_issued_by(cert, pki.load_certificate(ca_pem))
    identity = pki.identity_from_certificate(cert)
    if identity.kind != "node" or identity.name != node:
        raise EnrollmentError(f"the controller issued a certificate for {identity.spiffe_id}, not node {node}")
    if pki.ca_hash(response.ca_bundle_pem) != ca_hash:
        raise EnrollmentError("the CA bundle in the join response does not match the pinned hash")
    pki.write_private_key(files.key, key)
    pki.write_public_file(files.cert, response.certificate_pem)
    pki.write_public_file(files.ca, response.ca_bundle_pem)
    control = resolve_control_endpoint(response.control_endpoint, endpoint)
    pki.write_public_file(files.controller, json.dumps({
        "control_endpoint": control,
        "bootstrap_endpoint": endpoint,
        "spiffe_id": identity.spiffe_id,
        "joined_at": datetime.now(UTC).isoformat(),
    }, indent=2).encode() + b"\n")
    return identity


def renew(files: IdentityFiles, channel: grpc.Channel) -> pki.Identity:
    """A new key and certificate over the current mutual-TLS identity; the files are replaced atomically."""
    current = files.certificate()
    key = pki.generate_private_key()
    stub = controller_pb2_grpc.ControllerStub(channel)
    try:
        response = stub.Renew(cpb.RenewRequest(csr_pem=pki.make_csr(key, current.name)), timeout=JOIN_TIMEOUT)
    except grpc.RpcError as exc:
        raise _rpc_error(exc, "renew") from None
    cert = pki.load_certificate(response.certificate_pem)
    pki.verify_issued_by(cert, pki.load_certificate(files.ca.read_bytes()))
    identity = pki.identity_from_certificate(cert)
    if identity.name != current.name:
        raise EnrollmentError(f"renewal returned a certificate for {identity.spiffe_id}")
    # Key first, then certificate: a crash in between leaves a mismatched pair, which the next
    # start detects (TLS fails) and the operator fixes by joining again; never a key sent anywhere.
    pki.write_private_key(files.key, key)
    pki.write_public_file(files.cert, response.certificate_pem)
    return identity
