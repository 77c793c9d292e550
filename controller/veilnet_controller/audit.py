"""The signed audit log: the controller's Ed25519 audit key, signed heads, and verification.

The hash chain in ``store`` makes edits visible only to someone who cannot recompute it, and anyone who can
write the database can: drop a row, re-chain the rest, and an unkeyed verifier agrees. So every entry's hash
is also signed with a key that is *not* in the database::

    data_dir/audit.key        Ed25519 private key (0600), never in SQLite, never sent anywhere
    data_dir/audit.pub        its public key (0644): what auditors verify with; keep a copy elsewhere
    data_dir/audit-head.json  the newest signed head {sequence, hash, signature, key_id, time} (0644)

and every append writes the signed head to the journal (the ``audit_appended`` log line). A verifier with
the public key detects any entry edited, inserted, dropped or re-chained; with a head shipped elsewhere (the
file or the journal) it also detects entries removed from the end, which nothing inside the database can.

Entries written before signing existed are unsigned (format 1). They are accepted only *before* a signed
entry, whose signed hash covers them through the chain; the first controller that signs appends an
``audit.signing-enabled`` entry at once for that purpose. An unsigned entry after a signed one, or an
unsigned newest entry, fails verification: stripping signatures is tampering too.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import hashlib
import json
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import structlog
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from veilnet_agent.control.files import atomic_write
from veilnet_agent.core.errors import VeilnetError

from .store import GENESIS_HASH, AuditRecord, SQLiteStore, entry_hash, format_time, parse_time

KEY_FILE = "audit.key"
PUBLIC_KEY_FILE = "audit.pub"
HEAD_FILE = "audit-head.json"
_HEAD_LOCK = ".audit-head.lock"
SIGNATURE_CONTEXT = b"veilnet-audit-v2\n"
HEAD_FLUSH_DELAY = 0.1  # seconds: on the event loop, a burst of appends rewrites the head file once


class AuditError(VeilnetError):
    """The audit key, public key or a head file is missing, unreadable or inconsistent."""


def signed_message(sequence: int, digest: str) -> bytes:
    """What is signed for an entry (and for a head): its sequence and its chained hash, with a context label."""
    return SIGNATURE_CONTEXT + f"{sequence}\n{digest}".encode()


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _public_pem(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except OSError as exc:
        raise AuditError(f"{path}: cannot read the audit public key: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise AuditError(f"{path}: not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise AuditError(f"{path}: not an Ed25519 public key ({type(key).__name__})")
    return key


def verify_signature(public_key: Ed25519PublicKey, sequence: int, digest: str, signature: str) -> bool:
    try:
        public_key.verify(base64.b64decode(signature, validate=True), signed_message(sequence, digest))
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclass(frozen=True)
class SignedHead:
    """The newest entry's sequence and hash, signed: proof of how long the log was."""

    sequence: int
    hash: str
    signature: str
    key_id: str
    time: str

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, indent=2).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes, where: str) -> SignedHead:
        try:
            raw = json.loads(data)
            head = cls(int(raw["sequence"]), str(raw["hash"]), str(raw["signature"]), str(raw["key_id"]),
                       str(raw["time"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise AuditError(f"{where}: not a signed audit head ({exc})") from None
        if head.sequence < 1:
            raise AuditError(f"{where}: not a signed audit head (sequence {head.sequence})")
        return head

    def check(self, public_key: Ed25519PublicKey, where: str) -> None:
        if not verify_signature(public_key, self.sequence, self.hash, self.signature):
            raise AuditError(f"{where}: the signature of the head (entry {self.sequence}) does not verify "
                             f"with audit key {key_id(public_key)}")


def read_head(path: Path) -> SignedHead | None:
    """The head in ``path``; None if there is none yet."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise AuditError(f"{path}: cannot read the audit head: {exc.strerror or exc}") from None
    return SignedHead.from_json(data, str(path))


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def write_head(path: Path, head: SignedHead) -> bool:
    """Make ``head`` the file's head unless it already records a later entry (another process appended
    meanwhile: the controller and an offline operator-cert share the log). True if written."""
    with _locked(path.with_name(_HEAD_LOCK)):
        try:
            current = read_head(path)
        except AuditError:
            current = None  # unreadable (a crash mid-write is excluded by the atomic write): replace it
        if current is not None and current.key_id == head.key_id and current.sequence >= head.sequence:
            return False
        atomic_write(path, head.to_json(), 0o644)
        return True


class AuditSigner:
    """Signs entries for ``SQLiteStore`` and publishes each new head (journal line, head file)."""

    def __init__(self, private_key: Ed25519PrivateKey, head_path: Path | None) -> None:
        self._key = private_key
        self.public_key = private_key.public_key()
        self.key_id = key_id(self.public_key)
        self.head_path = head_path
        self.head: SignedHead | None = None  # the newest this process appended (the file may lag 100 ms)
        self._lock = threading.Lock()
        self._pending: SignedHead | None = None
        self._flush_handle: asyncio.TimerHandle | None = None
        self.log = structlog.get_logger("veilnet.controller.audit")

    # -- keys -------------------------------------------------------------------------------------------

    @classmethod
    def create(cls, data_dir: Path) -> AuditSigner:
        """A new key in ``data_dir`` (audit.key 0600, audit.pub 0644); never overwrites one."""
        key_path = data_dir / KEY_FILE
        if key_path.exists():
            raise AuditError(f"{key_path} already exists: refusing to replace the audit key")
        key = Ed25519PrivateKey.generate()
        atomic_write(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()), 0o600)
        atomic_write(data_dir / PUBLIC_KEY_FILE, _public_pem(key.public_key()), 0o644)
        return cls(key, data_dir / HEAD_FILE)

    @classmethod
    def load(cls, data_dir: Path) -> AuditSigner:
        """The key in ``data_dir``, checked against audit.pub (a replaced public key would mislead auditors)."""
        key_path = data_dir / KEY_FILE
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except OSError as exc:
            raise AuditError(f"{key_path}: cannot read the audit key: {exc.strerror or exc}") from None
        except (ValueError, TypeError) as exc:
            raise AuditError(f"{key_path}: not an unencrypted PEM private key: {exc}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise AuditError(f"{key_path}: not an Ed25519 key ({type(key).__name__})")
        public = load_public_key(data_dir / PUBLIC_KEY_FILE)
        if _public_pem(public) != _public_pem(key.public_key()):
            raise AuditError(f"{data_dir / PUBLIC_KEY_FILE} does not belong to {key_path}: "
                             "auditors would verify with the wrong key")
        return cls(key, data_dir / HEAD_FILE)

    # -- what SQLiteStore calls -------------------------------------------------------------------------

    def sign(self, sequence: int, digest: str) -> str:
        return base64.b64encode(self._key.sign(signed_message(sequence, digest))).decode("ascii")

    def published(self, record: AuditRecord) -> None:
        """After the entry is committed: the signed head to the journal now, to the head file soon."""
        head = SignedHead(record.sequence, record.hash, record.signature, self.key_id, format_time(record.time))
        self.log.info("audit_appended", sequence=record.sequence, action=record.action, actor=record.actor,
                      actor_serial=record.actor_serial, target=record.target, hash=record.hash,
                      signature=record.signature, key_id=self.key_id)
        with self._lock:
            if self.head is None or head.sequence > self.head.sequence:
                self.head = head
            self._pending = self.head
        if self.head_path is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()  # a command-line tool: write it now
            return
        if self._flush_handle is None:
            self._flush_handle = loop.call_later(HEAD_FLUSH_DELAY, self.flush)

    def flush(self) -> None:
        """Write the newest head to the head file (the controller calls it when stopping, too)."""
        with self._lock:
            head, self._pending = self._pending, None
            self._flush_handle = None
        if head is not None and self.head_path is not None:
            try:
                write_head(self.head_path, head)
            except (OSError, VeilnetError) as exc:  # the journal line has it; the next append tries again
                self.log.error("audit_head_not_written", path=str(self.head_path), sequence=head.sequence,
                               error=str(exc))


# ---------------------------------------------------------------------------------------------------------
# Verification (shared by the controller, veilctl audit --verify and veilnet-controller audit-verify).

_ROW_COLUMNS = ("SELECT sequence, time, actor, role, action, target, revision, detail, hash, previous_hash,"
                " actor_serial, signature FROM audit ORDER BY sequence")


def _computed_hash(row: Sequence[Any], signed: bool) -> str:
    detail = json.loads(str(row[7]))
    if not isinstance(detail, dict):
        raise ValueError("detail is not a JSON object")
    return entry_hash(str(row[9]), int(row[0]), parse_time(str(row[1])), str(row[2]), str(row[3]), str(row[4]),
                      str(row[5]), None if row[6] is None else int(row[6]), detail,
                      actor_serial=str(row[10]) if signed else None)


def verify_rows(rows: Iterable[Sequence[Any]], public_key: Ed25519PublicKey | None,
                head: SignedHead | None = None, head_source: str = "the signed head") -> tuple[bool, str]:
    """Check every entry in sequence order; ``(True, summary)`` or ``(False, "entry S: what is wrong")``.

    In order, per entry: no gap in the sequence (a dropped row), ``previous_hash`` is the preceding entry's
    hash (a row replaced with a re-hashed one), the stored hash is the recomputed one (an edited field), and
    the signature verifies with ``public_key`` (a re-chained log: the chain alone cannot show it). Then the
    newest entry must be signed, and with ``head``, the log must reach the head's entry with its hash (entries
    removed from the end). Without a public key nothing can be trusted, and the answer says so.
    """
    if public_key is None:
        return False, "no audit public key: signatures cannot be checked (pass the controller's audit.pub)"
    kid = key_id(public_key)
    expected, previous, count = 1, GENESIS_HASH, 0
    first_signed: int | None = None
    hashes: dict[int, str] = {}
    last_unsigned: int | None = None
    for row in rows:
        sequence = int(row[0])
        if sequence != expected:
            return False, f"entry {sequence}: gap in sequence (expected {expected}, found {sequence})"
        stored_hash, stored_previous, signature = str(row[8]), str(row[9]), str(row[11])
        if stored_previous != previous:
            return False, (f"entry {sequence}: broken link to previous (previous_hash {stored_previous}, "
                           f"but entry {sequence - 1} has hash {previous})")
        signed = signature != ""
        if not signed and first_signed is not None:
            return False, (f"entry {sequence}: not signed, but entry {first_signed} before it is "
                           "(a signature was removed, or the entry was added without the audit key)")
        if not signed and str(row[10]):
            return False, f"entry {sequence}: unsigned, yet it has an actor serial (only signed entries do)"
        try:
            computed = _computed_hash(row, signed)
        except (ValueError, TypeError) as exc:
            return False, f"entry {sequence}: unreadable entry ({exc})"
        if computed != stored_hash:
            return False, f"entry {sequence}: hash mismatch (stored {stored_hash}, computed {computed})"
        if signed:
            if not verify_signature(public_key, sequence, stored_hash, signature):
                return False, (f"entry {sequence}: signature does not verify with audit key {kid} "
                               "(the entry or its chain was rewritten)")
            first_signed = sequence if first_signed is None else first_signed
        else:
            last_unsigned = sequence
        hashes[sequence] = stored_hash
        previous = stored_hash
        expected += 1
        count += 1
    if count and first_signed is None:
        return False, f"entry {count}: not signed (no entry of this log is signed)"
    if last_unsigned is not None and last_unsigned == count:
        return False, f"entry {count}: not signed (the newest entry must be)"
    if head is not None:
        if head.key_id != kid:
            return False, f"{head_source} is signed by audit key {head.key_id}, not {kid}"
        if not verify_signature(public_key, head.sequence, head.hash, head.signature):
            return False, f"{head_source}: its signature (entry {head.sequence}) does not verify with {kid}"
        if head.sequence > count:
            return False, (f"entry {head.sequence}: missing: the log ends at entry {count}, but {head_source} "
                           f"records entry {head.sequence} (hash {head.hash}): entries were removed from the end")
        if hashes[head.sequence] != head.hash:
            return False, (f"entry {head.sequence}: differs from {head_source} (log hash {hashes[head.sequence]}, "
                           f"head hash {head.hash})")
    summary = f"{count} entries, head {previous}, signed by audit key {kid}"
    if first_signed is not None and first_signed > 1:
        summary += f" (entries 1-{first_signed - 1} predate signing; entry {first_signed}'s signature covers them)"
    if head is not None:
        summary += f"; reaches {head_source} (entry {head.sequence})"
    return True, summary


def verify_connection(conn: sqlite3.Connection, public_key: Ed25519PublicKey | None,
                      head: SignedHead | None = None, head_source: str = "the signed head") -> tuple[bool, str]:
    """``verify_rows`` over one SELECT (one read snapshot: concurrent appends cannot make it look broken)."""
    cursor = conn.execute(_ROW_COLUMNS)
    try:
        return verify_rows(cursor, public_key, head, head_source)
    finally:
        cursor.close()


# ---------------------------------------------------------------------------------------------------------
# Opening the store of a data directory with its audit key.


def open_signed_store(data_dir: Path) -> tuple[SQLiteStore, AuditSigner]:
    """The data directory's store, signing with its audit key, checked against the signed head.

    Without a key one is made, but only for a log with no signed entry (``init``, or a controller upgraded
    from before signing, whose unsigned entries are then sealed). A signed log without its key, or a log that
    no longer reaches its signed head, refuses to open: appending would bury the evidence.
    """
    db = data_dir / "controller.db"
    if not (data_dir / KEY_FILE).exists():
        if _has_signed_entries(db):
            raise AuditError(f"{data_dir / KEY_FILE} is missing, but the audit log in {db} is signed: restore the "
                             "key (a new one would make every earlier signature unverifiable)")
        signer = AuditSigner.create(data_dir)
        structlog.get_logger("veilnet.controller.audit").warning(
            "audit_key_created", path=str(data_dir / KEY_FILE), key_id=signer.key_id,
            note=f"copy {PUBLIC_KEY_FILE} somewhere safe: auditors verify with it")
    else:
        signer = AuditSigner.load(data_dir)
    store = SQLiteStore(db, audit=signer)
    try:
        check_reaches_head(store, signer)
        store.seal_unsigned_entries(signer.key_id)
    except BaseException:
        store.close()
        raise
    return store, signer


def _has_signed_entries(db: Path) -> bool:
    if not db.is_file():
        return False
    conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT 1 FROM audit WHERE signature != '' LIMIT 1").fetchone() is not None
    except sqlite3.Error:  # an old schema without signatures: nothing is signed
        return False
    finally:
        conn.close()


def check_reaches_head(store: SQLiteStore, signer: AuditSigner) -> None:
    """Refuse a log that is shorter than, or different from, its signed head file."""
    if signer.head_path is None:
        return
    head = read_head(signer.head_path)
    if head is None:
        return
    where = str(signer.head_path)
    if head.key_id != signer.key_id:
        raise AuditError(f"{where} is signed by audit key {head.key_id}, not this controller's {signer.key_id}")
    head.check(signer.public_key, where)
    found = store.audit_hash(head.sequence)
    if found != head.hash:
        what = "is missing" if found is None else f"has hash {found}, not {head.hash}"
        raise AuditError(
            f"audit log {store.path} does not reach its signed head: entry {head.sequence} {what}. Entries were "
            f"removed or rewritten. Run veilnet-controller audit-verify; restore the database from a backup, or "
            f"move {where} aside to accept the log as it is (the journal keeps the old heads)")
    signer.head = head
