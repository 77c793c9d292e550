"""Host identity: join a controller with a token, pin its CA by hash, renew the certificate over mutual TLS.

Files in ``state_dir/identity`` (directory 0700)::

    gen-<n>/             one complete identity, written once and never modified (0700):
        node.key         the host's TLS private key: generated here, never sent anywhere (0600)
        node.crt         its certificate, spiffe://<trust-domain>/node/<name>, from the controller's CA
        ca.crt           the CA bundle (verified against the pinned hash at join)
        controller.json  {"control_endpoint": ..., "bootstrap_endpoint": ..., "spiffe_id": ...}
    current -> gen-<n>   the live generation
    node.key -> current/node.key, node.crt, ca.crt, controller.json likewise (for tools and tests)
    .lock                serializes writers (join, renew)

Key and certificate must always match, or TLS fails and only a new join token helps. So they
are never replaced one file at a time: ``IdentityFiles.install`` writes and fsyncs a whole new
generation, then swaps ``current`` with one atomic rename. A crash before the swap leaves the
old generation live (the new directory is ignored, then pruned); after it, the new one. Once the
swap is durable every other generation is deleted: the key a renewal (or a new join) replaced is
retired by the controller after a short grace period and has no business staying on disk. Readers
resolve ``current`` once and take every file from that one directory, so a concurrent swap can
never pair an old key with a new certificate (a reader whose directory was just deleted reads
again from the new one).

No trust on first use: before sending anything, ``join`` opens a TLS
connection to the bootstrap listener, takes the chain the server presents,
and continues only if a certificate in it has the pinned SubjectPublicKeyInfo
hash *and* issued the server's certificate. That CA then becomes the only
root for the real, verified gRPC connection that carries the token.
"""

from __future__ import annotations

import fcntl
import getpass
import json
import os
import re
import secrets
import shutil
import socket
import ssl
import stat
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

import grpc
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from veilnet.v1 import controller_pb2 as cpb
from veilnet.v1 import controller_pb2_grpc

from ..core.errors import ValidationError, VeilnetError
from . import pki

JOIN_TIMEOUT = 15.0
MAX_TOKEN_TEXT = 1024  # a token is 50 characters; anything much longer is the wrong file
_CA_HASH_PREFIX = "sha256:"
_KEY = "node.key"
_CERT = "node.crt"
_CA = "ca.crt"
_CONTROLLER = "controller.json"
_FILES = (_KEY, _CERT, _CA, _CONTROLLER)
_CURRENT = "current"
_LOCK = ".lock"
_GENERATION_RE = re.compile(r"gen-([1-9][0-9]*)")
_READ_ATTEMPTS = 8


class EnrollmentError(VeilnetError):
    pass


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _public_key_der(key: CertificateIssuerPrivateKeyTypes | x509.Certificate) -> bytes:
    public = key.public_key()
    return public.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def _check_generation(key: CertificateIssuerPrivateKeyTypes, certificate_pem: bytes, ca_pem: bytes) -> None:
    """Refuse to install anything TLS would reject: the key must own the certificate, a CA in the bundle sign it."""
    cert = pki.load_certificate(certificate_pem)
    if _public_key_der(key) != _public_key_der(cert):
        raise EnrollmentError("refusing to install a certificate that does not belong to the new private key")
    errors: list[str] = []
    for ca in pki.load_certificates(ca_pem):
        try:
            pki.verify_issued_by(cert, ca)
            return
        except pki.PkiError as exc:
            errors.append(str(exc))
    raise EnrollmentError(f"refusing to install a certificate no CA in the bundle issued: {'; '.join(errors)}")


@dataclass(frozen=True)
class IdentityFiles:
    """The identity directory; every read takes all its files from one generation (see the module docstring)."""

    directory: Path

    @property
    def key(self) -> Path:
        return self.directory / _KEY

    @property
    def cert(self) -> Path:
        return self.directory / _CERT

    @property
    def ca(self) -> Path:
        return self.directory / _CA

    @property
    def controller(self) -> Path:
        return self.directory / _CONTROLLER

    # ------------------------------------------------------------------ reading

    def _live(self) -> Path:
        """The live generation directory, or the identity directory itself for the flat pre-generation layout."""
        current = self.directory / _CURRENT
        if os.path.lexists(current):
            return Path(os.path.realpath(current))
        return self.directory

    def _read_live(self, *names: str) -> tuple[bytes, ...]:
        """``names`` read from one generation, never a mix, even while ``install`` swaps and prunes.

        Files in a generation never change once ``current`` can point to it, so reading them all from one
        resolved directory is consistent. The only race is the directory being pruned (two installs later)
        while we read: then ``current`` has moved on, and we read again from the new one.
        """
        for attempt in range(_READ_ATTEMPTS):
            live = self._live()
            try:
                return tuple((live / name).read_bytes() for name in names)
            except FileNotFoundError:
                if attempt == _READ_ATTEMPTS - 1 or self._live() == live:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def read_pair(self) -> tuple[bytes, bytes]:
        """(private key PEM, certificate PEM), always of the same generation: a matching pair."""
        key, cert = self._read_live(_KEY, _CERT)
        return key, cert

    def exists(self) -> bool:
        """True when the live generation holds a complete identity (a crashed, unswapped one does not count)."""
        live = self._live()
        return all((live / name).is_file() for name in _FILES)

    def control_endpoint(self) -> str:
        try:
            (data,) = self._read_live(_CONTROLLER)
            return str(json.loads(data)["control_endpoint"])
        except (OSError, ValueError, KeyError) as exc:
            raise EnrollmentError(f"{self.controller}: not joined or unreadable ({exc}); run veilnet-agent join") \
                from None

    def channel_credentials(self) -> grpc.ChannelCredentials:
        key, cert, ca = self._read_live(_KEY, _CERT, _CA)
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)

    def certificate(self) -> pki.Identity:
        (cert,) = self._read_live(_CERT)
        return pki.identity_from_certificate(cert)

    def ca_bundle(self) -> bytes:
        (ca,) = self._read_live(_CA)
        return ca

    def renewal_time(self) -> datetime:
        (cert,) = self._read_live(_CERT)
        return pki.renewal_time(pki.load_certificate(cert))

    # ------------------------------------------------------------------ writing

    def install(
        self,
        key: CertificateIssuerPrivateKeyTypes,
        certificate_pem: bytes,
        *,
        ca_pem: bytes | None = None,
        controller: bytes | None = None,
    ) -> None:
        """Make (key, certificate) the live identity in one atomic step; crash-safe at every point.

        ``ca_pem`` and ``controller`` (controller.json content) default to the live generation's, which is
        what a renewal wants; ``join`` passes new ones. The pair is checked first (the key owns the
        certificate, a CA in the bundle issued it): a pair TLS would reject is never installed.
        """
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        with self._locked():
            if ca_pem is None or controller is None:
                try:
                    live_ca, live_controller = self._read_live(_CA, _CONTROLLER)
                except OSError as exc:
                    raise EnrollmentError(f"{self.directory}: no identity to renew ({exc}); run veilnet-agent join") \
                        from None
                ca_pem = live_ca if ca_pem is None else ca_pem
                controller = live_controller if controller is None else controller
            _check_generation(key, certificate_pem, ca_pem)
            generation = self._write_generation(key, certificate_pem, ca_pem, controller)
            self._activate(generation)
            self._link_top_level()
            self._prune(keep={generation.name})  # the replaced key goes now, not one renewal later

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """One writer at a time (a join while the daemon renews); readers never take it."""
        fd = os.open(self.directory / _LOCK, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _generations(self) -> dict[str, int]:
        found: dict[str, int] = {}
        for entry in self.directory.iterdir():
            m = _GENERATION_RE.fullmatch(entry.name)
            if m is not None:
                found[entry.name] = int(m.group(1))
        return found

    def _write_generation(
        self, key: CertificateIssuerPrivateKeyTypes, certificate_pem: bytes, ca_pem: bytes, controller: bytes
    ) -> Path:
        """Write a complete new ``gen-<n>`` and make it durable; not live until ``_activate``.

        A crash here or before the swap leaves an unreferenced directory that every reader ignores and the
        next install removes.
        """
        number = max(self._generations().values(), default=0) + 1
        while True:
            generation = self.directory / f"gen-{number}"
            try:
                generation.mkdir(mode=0o700)
                break
            except FileExistsError:
                number += 1
        os.chmod(generation, 0o700)
        pki.write_private_key(generation / _KEY, key)  # 0600 from the first byte, fsynced
        pki.write_public_file(generation / _CERT, certificate_pem)
        pki.write_public_file(generation / _CA, ca_pem)
        pki.write_public_file(generation / _CONTROLLER, controller)
        _fsync_dir(self.directory)  # the new directory's entry is durable before anything points to it
        return generation

    def _replace_symlink(self, path: Path, target: str) -> None:
        """Point ``path`` at ``target`` with one rename: readers see the old link or the new, never none."""
        for _ in range(100):
            tmp = self.directory / f".{path.name}.{secrets.token_hex(8)}.tmp"
            try:
                os.symlink(target, tmp)
            except FileExistsError:  # pragma: no cover - a collision of random names
                continue
            break
        else:  # pragma: no cover
            raise EnrollmentError(f"cannot create a temporary link next to {path}")
        try:
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _activate(self, generation: Path) -> None:
        """The commit point: ``current`` now names ``generation``, durably."""
        self._replace_symlink(self.directory / _CURRENT, generation.name)
        _fsync_dir(self.directory)

    def _link_top_level(self) -> None:
        """``node.key`` -> ``current/node.key`` and so on: the documented paths keep working for tools."""
        changed = False
        for name in _FILES:
            path, target = self.directory / name, f"{_CURRENT}/{name}"
            if path.is_symlink() and os.readlink(path) == target:
                continue
            self._replace_symlink(path, target)  # also replaces the flat files of the pre-generation layout
            changed = True
        if changed:
            _fsync_dir(self.directory)

    def _prune(self, keep: set[str]) -> None:
        """Delete every generation but ``keep`` (the live one), and leftovers of crashed writes.

        The private key is unlinked first: if removing the rest fails (ignored; the next install tries again),
        the key at least is gone.
        """
        for name in self._generations():
            if name not in keep:
                with suppress(FileNotFoundError):
                    (self.directory / name / _KEY).unlink()
                shutil.rmtree(self.directory / name, ignore_errors=True)
        for entry in self.directory.glob(".*.tmp"):
            with suppress(OSError):
                entry.unlink()


def split_endpoint(endpoint: str) -> tuple[str, int]:
    host, sep, port_text = endpoint.rpartition(":")
    # ASCII digits only, and at most 5 of them before int(): str.isdigit() also takes '²', which int() refuses
    if not sep or not host or not (port_text.isascii() and port_text.isdigit() and len(port_text) <= 5) \
            or not 0 < int(port_text) < 65536:
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


def read_join_token(source: str, warn: Callable[[str], None], stdin: TextIO | None = None) -> str:
    """The join token from the file ``source``, or from standard input for ``-`` (prompted without echo on a
    terminal). Secrets belong in files and pipes, never in argv: /proc/<pid>/cmdline is world-readable.

    A regular file that group or others may access is used, with a ``warn``ing: whoever could read it could
    also have joined as this node while the token was unused.
    """
    what = "standard input" if source == "-" else source
    if source == "-":
        stream = sys.stdin if stdin is None else stdin
        if stream.isatty():
            text = getpass.getpass("join token: ", stream=sys.stderr)
        else:
            text = stream.read(MAX_TOKEN_TEXT + 1)
    else:
        try:
            fd = os.open(source, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise ValidationError("--token-file", source, f"cannot be read: {exc.strerror}") from None
        try:
            st = os.fstat(fd)  # the file we read, not whatever the path names a moment later
            if stat.S_ISREG(st.st_mode) and st.st_mode & 0o077:
                warn(f"{source} is accessible by group or others (mode {stat.S_IMODE(st.st_mode):04o}): anyone who "
                     f"read it could have joined as this node; keep join tokens in 0600 files (chmod 600 {source})")
            data = b""
            while len(data) <= MAX_TOKEN_TEXT and (chunk := os.read(fd, MAX_TOKEN_TEXT + 1 - len(data))):
                data += chunk
        finally:
            os.close(fd)
        try:
            text = data.decode("ascii")
        except UnicodeDecodeError:
            raise ValidationError("--token-file", source, "must hold one join token (vnjoin_...), not binary data") \
                from None
    token = text.strip()
    if not token or len(text) > MAX_TOKEN_TEXT or any(c.isspace() for c in token):
        raise ValidationError("--token-file", what, "must hold exactly one join token (vnjoin_...) on one line")
    return token


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
    control = resolve_control_endpoint(response.control_endpoint, endpoint)
    controller = json.dumps({
        "control_endpoint": control,
        "bootstrap_endpoint": endpoint,
        "spiffe_id": identity.spiffe_id,
        "joined_at": datetime.now(UTC).isoformat(),
    }, indent=2).encode() + b"\n"
    # All four files in one new generation: a (re-)join is live completely or not at all.
    files.install(key, response.certificate_pem, ca_pem=response.ca_bundle_pem, controller=controller)
    return identity


def renew(files: IdentityFiles, channel: grpc.Channel) -> pki.Identity:
    """A new key and certificate over the current mutual-TLS identity, installed as one atomic swap."""
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
    # Key and certificate go live together (new generation, then one rename of ``current``): a crash at
    # any point leaves either the old pair or the new one, never a mix. CA bundle and controller.json carry over.
    files.install(key, response.certificate_pem)
    return identity
