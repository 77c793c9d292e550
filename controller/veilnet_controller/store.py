"""The controller's durable state: spec revisions, join tokens, nodes and their certificates, the audit log.

Everything the controller must remember across restarts goes through the small ``Store`` protocol so that
a replicated store can replace the embedded one later without touching callers. ``SQLiteStore`` is the
implementation used today: one SQLite file in WAL mode, one connection guarded by a lock, so the gRPC
server's asyncio loop and worker threads can share it.

Two security properties are enforced here rather than by callers, because they must hold whoever calls:

* Join tokens are bearer secrets. Only their SHA-256 is ever written, so a copied database file (or a
  backup) cannot be used to join a node, and consuming a token is a single write transaction so that two
  concurrent joins with the same token cannot both succeed.
* The audit log is append-only and tamper-evident: every entry carries the SHA-256 of its predecessor's
  hash and its own canonical contents, SQL triggers refuse UPDATE and DELETE, and with an audit signer (the
  controller's Ed25519 key, kept outside this database: see ``audit``) every entry's hash is signed. Someone
  with write access to the file can drop the triggers and even re-chain the hashes, but cannot sign: the
  verifier (``audit.verify_rows``) names the first entry that is wrong. Entries removed from the end are
  detected against a signed head kept elsewhere (``audit-head.json``, the journal).
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import json
import os
import secrets
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from veilnet_agent.core.errors import VeilnetError

SCHEMA_VERSION = 2
GENESIS_HASH = "0" * 64
"""``previous_hash`` of the first audit entry: there is nothing before it to link to."""

TOKEN_BYTES = 32
TOKEN_PREFIX = "vnjoin_"
BUSY_TIMEOUT_MS = 5000


class StoreError(VeilnetError):
    """The store could not do what was asked (unknown node, duplicate serial, database failure...)."""


class ConflictError(StoreError):
    """Optimistic-concurrency failure: the current revision is not the one the caller based its change on."""


class TokenResult(enum.Enum):
    """Outcome of presenting a join token; only ``OK`` consumes it."""

    OK = "ok"
    UNKNOWN = "unknown"
    USED = "used"
    EXPIRED = "expired"
    WRONG_NODE = "wrong_node"


@dataclass(frozen=True)
class RevisionRecord:
    """One accepted version of the network spec. ``rolled_back_from`` is set when it was made by a rollback."""

    number: int
    spec_text: str
    author: str
    created_at: datetime
    message: str
    rolled_back_from: int | None


@dataclass(frozen=True)
class NodeRecord:
    """A node the controller knows. ``certificate_*`` describe the most recently issued certificate."""

    name: str
    joined_at: datetime | None
    wireguard_public_key: str | None
    capabilities: tuple[str, ...]
    certificate_serial: str | None
    certificate_not_after: datetime | None
    revoked_at: datetime | None
    revoke_reason: str


@dataclass(frozen=True)
class OperatorCertificateRecord:
    """An operator certificate the controller issued (or imported): only recorded ones are accepted."""

    serial: str
    name: str
    role: str
    not_after: datetime
    issued_at: datetime
    issued_by: str
    revoked_at: datetime | None
    revoke_reason: str


@dataclass(frozen=True)
class AuditRecord:
    """One audit-log entry. ``hash`` = ``entry_hash(previous_hash, ...)`` over the other fields;
    ``signature``: the audit key's signature of (sequence, hash), empty for an unsigned (format 1) entry."""

    sequence: int
    time: datetime
    actor: str
    role: str
    action: str
    target: str
    revision: int | None
    detail: Mapping[str, Any]
    hash: str
    previous_hash: str
    actor_serial: str = ""
    signature: str = ""


class AuditSigning(Protocol):
    """What the store needs from the audit key holder (``audit.AuditSigner``)."""

    def sign(self, sequence: int, digest: str) -> str: ...

    def published(self, record: AuditRecord) -> None: ...


# ---------------------------------------------------------------------------------------------------------
# Time and hashing helpers (shared with audit_verify, which must not re-implement the hash).


def format_time(value: datetime) -> str:
    """RFC 3339 UTC with microseconds (``2024-05-01T12:00:00.000000Z``).

    A fixed width and a fixed zone make stored times compare correctly as text and make the audit hash
    independent of how the caller's datetime happened to be expressed.
    """
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"naive datetime {value!r}: store times must be timezone-aware")
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> datetime:
    """Inverse of ``format_time``; a naive stored value (never written by this module) is read as UTC."""
    value = datetime.fromisoformat(text)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def canonical_json(value: object) -> str:
    """The single JSON spelling used for hashing: sorted keys, no spaces, ASCII only, no NaN/Infinity."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def entry_hash(
    previous_hash: str,
    sequence: int,
    time: datetime,
    actor: str,
    role: str,
    action: str,
    target: str,
    revision: int | None,
    detail: Mapping[str, Any],
    *,
    actor_serial: str | None = None,
) -> str:
    """SHA-256 hex of ``previous_hash + "\\n" + canonical JSON of the entry``.

    Chaining in the previous hash is what makes deleting or reordering entries detectable, not just editing.
    ``actor_serial`` None: format 1 (unsigned entries, as written before signing existed); a string: format 2,
    which also covers the serial of the certificate that acted.
    """
    body: dict[str, Any] = {
        "sequence": sequence,
        "time": format_time(time),
        "actor": actor,
        "role": role,
        "action": action,
        "target": target,
        "revision": revision,
        "detail": dict(detail),
    }
    if actor_serial is not None:
        body["actor_serial"] = actor_serial
        body["format"] = 2
    return hashlib.sha256(f"{previous_hash}\n{canonical_json(body)}".encode()).hexdigest()


def token_hash(token: str) -> str:
    """What is stored for a join token; the token itself never reaches the database."""
    return hashlib.sha256(token.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------------
# The interface.


@runtime_checkable
class Store(Protocol):
    """What the controller needs from durable storage; see ``SQLiteStore`` for the semantics."""

    def add_revision(
        self,
        spec_text: str,
        author: str,
        message: str,
        *,
        rolled_back_from: int | None = None,
        expected_current: int | None = None,
    ) -> RevisionRecord: ...

    def revision(self, number: int | None = None) -> RevisionRecord | None: ...

    def revisions(self, limit: int = 50) -> list[RevisionRecord]: ...

    def create_token(self, node: str, ttl: timedelta, created_by: str) -> tuple[str, datetime]: ...

    def consume_token(self, token: str, node: str, now: datetime | None = None) -> TokenResult: ...

    def node(self, name: str) -> NodeRecord | None: ...

    def nodes(self) -> list[NodeRecord]: ...

    def record_certificate(self, node: str, serial: str, not_after: datetime) -> None: ...

    def set_wireguard_key(self, node: str, public_key: str, capabilities: Sequence[str]) -> None: ...

    def revoke_node(self, node: str, reason: str, now: datetime | None = None) -> list[str]: ...

    def retire_certificates(self, node: str, keep: str, at: datetime) -> dict[str, datetime]: ...

    def retiring_certificates(self) -> dict[str, datetime]: ...

    def is_serial_revoked(self, serial: str, now: datetime | None = None) -> bool: ...

    def revoked_serials(self) -> frozenset[str]: ...

    def record_operator_certificate(
        self, name: str, role: str, serial: str, not_after: datetime, issued_by: str
    ) -> bool: ...

    def operator_certificate(self, serial: str) -> OperatorCertificateRecord | None: ...

    def operator_certificates(self, name: str | None = None) -> list[OperatorCertificateRecord]: ...

    def revoke_operator(self, name: str, reason: str, now: datetime | None = None) -> list[str]: ...

    def set_attached_endpoints(self, node: str, endpoints: Sequence[Mapping[str, Any]]) -> None: ...

    def attached_endpoints(self) -> dict[str, list[dict[str, Any]]]: ...

    def append_audit(
        self,
        actor: str,
        role: str,
        action: str,
        target: str,
        revision: int | None,
        detail: Mapping[str, Any],
        *,
        actor_serial: str = "",
    ) -> AuditRecord: ...

    def audit(self, limit: int = 100) -> tuple[list[AuditRecord], int]: ...

    def audit_hash(self, sequence: int) -> str | None: ...

    def verify_audit(self, public_key: Ed25519PublicKey | None = None, head: SignedHead | None = None,
                     head_source: str = "the signed head") -> tuple[bool, str]: ...

    def close(self) -> None: ...


# ---------------------------------------------------------------------------------------------------------
# SQLite implementation.

_SCHEMA: tuple[str, ...] = (
    """CREATE TABLE IF NOT EXISTS schema_version (
        version INTEGER NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS revisions (
        number INTEGER PRIMARY KEY,
        spec_text TEXT NOT NULL,
        author TEXT NOT NULL,
        created_at TEXT NOT NULL,
        message TEXT NOT NULL,
        rolled_back_from INTEGER REFERENCES revisions(number)
    )""",
    """CREATE TABLE IF NOT EXISTS tokens (
        token_hash TEXT PRIMARY KEY,
        node TEXT NOT NULL,
        created_by TEXT NOT NULL,
        created_at TEXT NOT NULL,
        expires_at TEXT NOT NULL,
        used_at TEXT
    )""",
    """CREATE TABLE IF NOT EXISTS nodes (
        name TEXT PRIMARY KEY,
        joined_at TEXT,
        wireguard_public_key TEXT,
        capabilities TEXT NOT NULL DEFAULT '[]',
        certificate_serial TEXT,
        certificate_not_after TEXT,
        revoked_at TEXT,
        revoke_reason TEXT NOT NULL DEFAULT ''
    )""",
    """CREATE TABLE IF NOT EXISTS certificates (
        serial TEXT PRIMARY KEY,
        node TEXT NOT NULL REFERENCES nodes(name),
        not_after TEXT NOT NULL,
        issued_at TEXT NOT NULL,
        revoked_at TEXT,
        retire_at TEXT
    )""",
    "CREATE INDEX IF NOT EXISTS certificates_node ON certificates(node)",
    """CREATE TABLE IF NOT EXISTS operator_certificates (
        serial TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        role TEXT NOT NULL,
        not_after TEXT NOT NULL,
        issued_at TEXT NOT NULL,
        issued_by TEXT NOT NULL,
        revoked_at TEXT,
        revoke_reason TEXT NOT NULL DEFAULT ''
    )""",
    "CREATE INDEX IF NOT EXISTS operator_certificates_name ON operator_certificates(name)",
    """CREATE TABLE IF NOT EXISTS attached_endpoints (
        node TEXT PRIMARY KEY,
        endpoints TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS audit (
        sequence INTEGER PRIMARY KEY,
        time TEXT NOT NULL,
        actor TEXT NOT NULL,
        role TEXT NOT NULL,
        action TEXT NOT NULL,
        target TEXT NOT NULL,
        revision INTEGER,
        detail TEXT NOT NULL,
        hash TEXT NOT NULL,
        previous_hash TEXT NOT NULL,
        actor_serial TEXT NOT NULL DEFAULT '',
        signature TEXT NOT NULL DEFAULT ''
    )""",
    # Created on every open with IF NOT EXISTS, so a dropped trigger comes back at the next start.
    """CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
    BEGIN
        SELECT RAISE(ABORT, 'audit log is append-only: UPDATE refused');
    END""",
    """CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
    BEGIN
        SELECT RAISE(ABORT, 'audit log is append-only: DELETE refused');
    END""",
)

# Schema version 1 -> 2, run after _SCHEMA (whose CREATE ... IF NOT EXISTS made the new tables): the new
# columns of tables that already existed.
_MIGRATE_1_TO_2: tuple[str, ...] = (
    "ALTER TABLE certificates ADD COLUMN retire_at TEXT",
    "ALTER TABLE audit ADD COLUMN actor_serial TEXT NOT NULL DEFAULT ''",
    "ALTER TABLE audit ADD COLUMN signature TEXT NOT NULL DEFAULT ''",
)

_OPERATOR_COLUMNS = "serial, name, role, not_after, issued_at, issued_by, revoked_at, revoke_reason"
_NODE_COLUMNS = (
    "name, joined_at, wireguard_public_key, capabilities, certificate_serial, certificate_not_after,"
    " revoked_at, revoke_reason"
)
_REVISION_COLUMNS = "number, spec_text, author, created_at, message, rolled_back_from"
_AUDIT_COLUMNS = (
    "sequence, time, actor, role, action, target, revision, detail, hash, previous_hash, actor_serial, signature"
)


def _now(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    format_time(now)  # rejects naive datetimes early, with a clear message
    return now.astimezone(UTC)


def _opt_time(value: object) -> datetime | None:
    return None if value is None else parse_time(str(value))


def _opt_int(value: object) -> int | None:
    return None if value is None else int(str(value))


def _revision_from_row(row: Sequence[Any]) -> RevisionRecord:
    return RevisionRecord(
        number=int(row[0]),
        spec_text=str(row[1]),
        author=str(row[2]),
        created_at=parse_time(str(row[3])),
        message=str(row[4]),
        rolled_back_from=_opt_int(row[5]),
    )


def _node_from_row(row: Sequence[Any]) -> NodeRecord:
    capabilities = json.loads(str(row[3]))
    return NodeRecord(
        name=str(row[0]),
        joined_at=_opt_time(row[1]),
        wireguard_public_key=None if row[2] is None else str(row[2]),
        capabilities=tuple(str(c) for c in capabilities),
        certificate_serial=None if row[4] is None else str(row[4]),
        certificate_not_after=_opt_time(row[5]),
        revoked_at=_opt_time(row[6]),
        revoke_reason=str(row[7]),
    )


def _operator_from_row(row: Sequence[Any]) -> OperatorCertificateRecord:
    return OperatorCertificateRecord(
        serial=str(row[0]),
        name=str(row[1]),
        role=str(row[2]),
        not_after=parse_time(str(row[3])),
        issued_at=parse_time(str(row[4])),
        issued_by=str(row[5]),
        revoked_at=_opt_time(row[6]),
        revoke_reason=str(row[7]),
    )


def _audit_from_row(row: Sequence[Any]) -> AuditRecord:
    return AuditRecord(
        sequence=int(row[0]),
        time=parse_time(str(row[1])),
        actor=str(row[2]),
        role=str(row[3]),
        action=str(row[4]),
        target=str(row[5]),
        revision=_opt_int(row[6]),
        detail=MappingProxyType(json.loads(str(row[7]))),
        hash=str(row[8]),
        previous_hash=str(row[9]),
        actor_serial=str(row[10]),
        signature=str(row[11]),
    )


def _create_private_file(path: Path) -> None:
    """Create the database file as 0600 before SQLite opens it.

    It holds token hashes and the audit log; creating it with the right mode (rather than chmod after)
    leaves no window in which another local user could open it. SQLite gives the -wal and -shm files the
    database file's mode.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        pass
    else:
        os.close(fd)
    os.chmod(path, 0o600)  # also tightens a pre-existing file


class SQLiteStore:
    """``Store`` on one SQLite file.

    One connection, ``check_same_thread=False``, serialised by a ``threading.Lock``: SQLite connections are
    not safe for concurrent use, and the controller calls in from an asyncio loop and from threads. Write
    methods run in ``BEGIN IMMEDIATE`` transactions, which take the database write lock up front, so
    read-then-write sequences (next revision number, token consumption, audit append) are atomic even against
    another process that has the same file open.
    """

    def __init__(self, path: Path, audit: AuditSigning | None = None) -> None:
        """``audit``: signs every audit entry. Without it entries are unsigned, which verification accepts only
        before a signed entry (and a log that is already signed refuses unsigned appends)."""
        self.path = path
        self._audit = audit
        self._lock = threading.Lock()
        _create_private_file(path)
        try:
            conn = sqlite3.connect(
                str(path), timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open store {path}: {exc}") from exc
        self._conn: sqlite3.Connection | None = conn
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
            self._create_schema()
        except BaseException:
            conn.close()
            self._conn = None
            raise

    def _create_schema(self) -> None:
        with self._write() as conn:
            for statement in _SCHEMA:
                conn.execute(statement)
            row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
            if row[0] is None:
                conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            elif int(row[0]) == 1:  # same transaction: migrated completely or not at all
                for statement in _MIGRATE_1_TO_2:
                    conn.execute(statement)
                conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
            elif int(row[0]) != SCHEMA_VERSION:
                raise StoreError(
                    f"store {self.path} has schema version {row[0]}; this controller supports {SCHEMA_VERSION}"
                )

    # -- transactions ---------------------------------------------------------------------------------------

    def _require_open(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"store {self.path} is closed")
        return self._conn

    @contextlib.contextmanager
    def _transaction(self, begin: str) -> Iterator[sqlite3.Connection]:
        """Hold the lock for one transaction; roll back on any error and report SQLite errors as StoreError."""
        with self._lock:
            conn = self._require_open()
            try:
                conn.execute(begin)
            except sqlite3.Error as exc:
                raise StoreError(f"store {self.path}: {exc}") from exc
            try:
                yield conn
            except BaseException as exc:
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise StoreError(f"store {self.path}: {exc}") from exc
                raise
            try:
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                raise StoreError(f"store {self.path}: {exc}") from exc

    def _write(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return self._transaction("BEGIN IMMEDIATE")

    def _read(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """A read transaction, so multi-statement reads (entries plus count) see one snapshot."""
        return self._transaction("BEGIN DEFERRED")

    # -- revisions ------------------------------------------------------------------------------------------

    def add_revision(
        self,
        spec_text: str,
        author: str,
        message: str,
        *,
        rolled_back_from: int | None = None,
        expected_current: int | None = None,
    ) -> RevisionRecord:
        """Append revision current+1. ``expected_current`` (0 = none yet) turns a lost update into ConflictError."""
        created_at = datetime.now(UTC)
        with self._write() as conn:
            row = conn.execute("SELECT max(number) FROM revisions").fetchone()
            current = 0 if row[0] is None else int(row[0])
            if expected_current is not None and expected_current != current:
                raise ConflictError(
                    f"revision conflict: change was based on revision {expected_current}, "
                    f"but the current revision is {current}"
                )
            if rolled_back_from is not None and not 1 <= rolled_back_from <= current:
                raise StoreError(f"rolled_back_from: revision {rolled_back_from} does not exist")
            record = RevisionRecord(current + 1, spec_text, author, created_at, message, rolled_back_from)
            conn.execute(
                f"INSERT INTO revisions ({_REVISION_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
                (record.number, spec_text, author, format_time(created_at), message, rolled_back_from),
            )
        return record

    def revision(self, number: int | None = None) -> RevisionRecord | None:
        """Revision ``number``, or the latest when None; None if there is no such revision."""
        with self._read() as conn:
            if number is None:
                row = conn.execute(f"SELECT {_REVISION_COLUMNS} FROM revisions ORDER BY number DESC LIMIT 1").fetchone()
            else:
                row = conn.execute(f"SELECT {_REVISION_COLUMNS} FROM revisions WHERE number = ?", (number,)).fetchone()
        return None if row is None else _revision_from_row(row)

    def revisions(self, limit: int = 50) -> list[RevisionRecord]:
        """Newest first, at most ``limit``."""
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT {_REVISION_COLUMNS} FROM revisions ORDER BY number DESC LIMIT ?", (max(limit, 0),)
            ).fetchall()
        return [_revision_from_row(r) for r in rows]

    # -- join tokens ----------------------------------------------------------------------------------------

    def create_token(self, node: str, ttl: timedelta, created_by: str) -> tuple[str, datetime]:
        """A new single-use join token for ``node``; returns the token (shown once) and its expiry."""
        if not node:
            raise StoreError("token node name must not be empty")
        if ttl <= timedelta(0):
            raise StoreError(f"token ttl must be positive (got {ttl})")
        # A recognisable prefix (secret scanners, logs) that also keeps the token from starting with "-".
        token = TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)
        created_at = datetime.now(UTC)
        expires_at = created_at + ttl
        with self._write() as conn:
            conn.execute(
                "INSERT INTO tokens (token_hash, node, created_by, created_at, expires_at, used_at)"
                " VALUES (?, ?, ?, ?, ?, NULL)",
                (token_hash(token), node, created_by, format_time(created_at), format_time(expires_at)),
            )
        return token, expires_at

    def consume_token(self, token: str, node: str, now: datetime | None = None) -> TokenResult:
        """Check and, only if OK, use up a join token, atomically.

        Checks run UNKNOWN, WRONG_NODE, USED, EXPIRED, so a token for another node reveals nothing about its
        state to the presenter. The ``used_at IS NULL`` guard plus rowcount check keeps the single-use
        guarantee even if a future store drops the write lock taken by ``BEGIN IMMEDIATE``.
        """
        moment = _now(now)
        digest = token_hash(token)
        with self._write() as conn:
            row = conn.execute(
                "SELECT node, expires_at, used_at FROM tokens WHERE token_hash = ?", (digest,)
            ).fetchone()
            if row is None:
                return TokenResult.UNKNOWN
            if str(row[0]) != node:
                return TokenResult.WRONG_NODE
            if row[2] is not None:
                return TokenResult.USED
            if moment >= parse_time(str(row[1])):
                return TokenResult.EXPIRED
            cursor = conn.execute(
                "UPDATE tokens SET used_at = ? WHERE token_hash = ? AND used_at IS NULL",
                (format_time(moment), digest),
            )
            if cursor.rowcount != 1:
                return TokenResult.USED
        return TokenResult.OK

    # -- nodes and certificates -----------------------------------------------------------------------------

    def node(self, name: str) -> NodeRecord | None:
        with self._read() as conn:
            row = conn.execute(f"SELECT {_NODE_COLUMNS} FROM nodes WHERE name = ?", (name,)).fetchone()
        return None if row is None else _node_from_row(row)

    def nodes(self) -> list[NodeRecord]:
        """All known nodes, sorted by name (SQLite's binary collation matches Python's str ordering)."""
        with self._read() as conn:
            rows = conn.execute(f"SELECT {_NODE_COLUMNS} FROM nodes ORDER BY name").fetchall()
        return [_node_from_row(r) for r in rows]

    def record_certificate(self, node: str, serial: str, not_after: datetime) -> None:
        """Remember a certificate issued to ``node`` at join or renewal.

        Creates the node on its first certificate (``joined_at`` = now). A node that was revoked and has
        joined again (with a new token) is readmitted: its revocation is cleared, but its old serials stay
        in the revoked set, so its old certificates remain useless. A serial seen before is an error.
        """
        if not node:
            raise StoreError("node name must not be empty")
        if not serial:
            raise StoreError("certificate serial must not be empty")
        issued_at = format_time(datetime.now(UTC))
        not_after_text = format_time(not_after)
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM certificates WHERE serial = ?", (serial,)).fetchone() is not None:
                raise StoreError(f"certificate serial {serial} is already recorded")
            conn.execute("INSERT OR IGNORE INTO nodes (name) VALUES (?)", (node,))
            conn.execute(
                "UPDATE nodes SET joined_at = coalesce(joined_at, ?), certificate_serial = ?,"
                " certificate_not_after = ?, revoked_at = NULL, revoke_reason = '' WHERE name = ?",
                (issued_at, serial, not_after_text, node),
            )
            conn.execute(
                "INSERT INTO certificates (serial, node, not_after, issued_at, revoked_at) VALUES (?, ?, ?, ?, NULL)",
                (serial, node, not_after_text, issued_at),
            )

    def set_wireguard_key(self, node: str, public_key: str, capabilities: Sequence[str]) -> None:
        """Record the node's WireGuard public key and capabilities (creating the node row if needed).

        Creating rather than refusing keeps the join flow order-independent; ``joined_at`` is still only
        set by ``record_certificate``.
        """
        if not node:
            raise StoreError("node name must not be empty")
        if isinstance(capabilities, str):
            raise StoreError("capabilities must be a sequence of strings, not a string")
        caps = json.dumps([str(c) for c in capabilities])
        with self._write() as conn:
            conn.execute("INSERT OR IGNORE INTO nodes (name) VALUES (?)", (node,))
            conn.execute(
                "UPDATE nodes SET wireguard_public_key = ?, capabilities = ? WHERE name = ?", (public_key, caps, node)
            )

    def revoke_node(self, node: str, reason: str, now: datetime | None = None) -> list[str]:
        """Mark ``node`` revoked and revoke every certificate of it not already revoked; returns those serials.

        Revoking an already revoked node updates the time and reason and returns only newly revoked serials.
        """
        moment = format_time(_now(now))
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM nodes WHERE name = ?", (node,)).fetchone() is None:
                raise StoreError(f"unknown node {node!r}")
            rows = conn.execute(
                "SELECT serial FROM certificates WHERE node = ? AND revoked_at IS NULL ORDER BY issued_at, rowid",
                (node,),
            ).fetchall()
            serials = [str(r[0]) for r in rows]
            conn.execute("UPDATE nodes SET revoked_at = ?, revoke_reason = ? WHERE name = ?", (moment, reason, node))
            conn.execute("UPDATE certificates SET revoked_at = ? WHERE node = ? AND revoked_at IS NULL", (moment, node))
        return serials

    def retire_certificates(self, node: str, keep: str, at: datetime) -> dict[str, datetime]:
        """After a renewal: every other unrevoked certificate of ``node`` stops being accepted at ``at``.

        A certificate already retiring keeps its earlier time (renewing twice never extends a grace period).
        Returns each retiring serial with its effective time.
        """
        when = format_time(at)
        with self._write() as conn:
            conn.execute(
                "UPDATE certificates SET retire_at = CASE WHEN retire_at IS NULL OR retire_at > ? THEN ?"
                " ELSE retire_at END WHERE node = ? AND serial != ? AND revoked_at IS NULL",
                (when, when, node, keep),
            )
            rows = conn.execute(
                "SELECT serial, retire_at FROM certificates WHERE node = ? AND serial != ? AND revoked_at IS NULL",
                (node, keep),
            ).fetchall()
        return {str(r[0]): parse_time(str(r[1])) for r in rows}

    def retiring_certificates(self) -> dict[str, datetime]:
        """Serials replaced by a renewal and not revoked otherwise, with the time they stop being accepted."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT serial, retire_at FROM certificates WHERE retire_at IS NOT NULL AND revoked_at IS NULL"
            ).fetchall()
        return {str(r[0]): parse_time(str(r[1])) for r in rows}

    def is_serial_revoked(self, serial: str, now: datetime | None = None) -> bool:
        """True for a recorded serial that is revoked or retired by ``now`` (unknown serials are not ours to judge)."""
        moment = format_time(_now(now))
        with self._read() as conn:
            row = conn.execute(
                "SELECT 1 FROM certificates WHERE serial = ? AND (revoked_at IS NOT NULL OR retire_at <= ?)"
                " UNION ALL SELECT 1 FROM operator_certificates WHERE serial = ? AND revoked_at IS NOT NULL",
                (serial, moment, serial),
            ).fetchone()
        return row is not None

    def revoked_serials(self) -> frozenset[str]:
        """Every revoked serial, node and operator (retiring ones: ``retiring_certificates``)."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT serial FROM certificates WHERE revoked_at IS NOT NULL"
                " UNION SELECT serial FROM operator_certificates WHERE revoked_at IS NOT NULL"
            ).fetchall()
        return frozenset(str(r[0]) for r in rows)

    # -- operator certificates ------------------------------------------------------------------------------

    def record_operator_certificate(
        self, name: str, role: str, serial: str, not_after: datetime, issued_by: str
    ) -> bool:
        """Remember an operator certificate; only recorded ones are accepted. False if already recorded
        (same name and role); a serial recorded for someone else is an error."""
        if not name or not role or not serial:
            raise StoreError("operator certificate needs a name, a role and a serial")
        with self._write() as conn:
            row = conn.execute("SELECT name, role FROM operator_certificates WHERE serial = ?", (serial,)).fetchone()
            if row is not None:
                if (str(row[0]), str(row[1])) != (name, role):
                    raise StoreError(f"certificate serial {serial} is already recorded for {row[0]} ({row[1]})")
                return False
            conn.execute(
                f"INSERT INTO operator_certificates ({_OPERATOR_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, NULL, '')",
                (serial, name, role, format_time(not_after), format_time(datetime.now(UTC)), issued_by),
            )
        return True

    def operator_certificate(self, serial: str) -> OperatorCertificateRecord | None:
        with self._read() as conn:
            row = conn.execute(
                f"SELECT {_OPERATOR_COLUMNS} FROM operator_certificates WHERE serial = ?", (serial,)
            ).fetchone()
        return None if row is None else _operator_from_row(row)

    def operator_certificates(self, name: str | None = None) -> list[OperatorCertificateRecord]:
        """Recorded operator certificates (of ``name``, or all), oldest first."""
        with self._read() as conn:
            if name is None:
                rows = conn.execute(
                    f"SELECT {_OPERATOR_COLUMNS} FROM operator_certificates ORDER BY issued_at, rowid"
                ).fetchall()
            else:
                rows = conn.execute(
                    f"SELECT {_OPERATOR_COLUMNS} FROM operator_certificates WHERE name = ? ORDER BY issued_at, rowid",
                    (name,),
                ).fetchall()
        return [_operator_from_row(r) for r in rows]

    def revoke_operator(self, name: str, reason: str, now: datetime | None = None) -> list[str]:
        """Revoke every certificate recorded for operator ``name`` not already revoked; returns those serials.

        StoreError if no certificate was ever recorded for ``name`` (a typo must not look like a success).
        """
        moment = format_time(_now(now))
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM operator_certificates WHERE name = ?", (name,)).fetchone() is None:
                raise StoreError(f"unknown operator {name!r}: no certificate was recorded for it")
            rows = conn.execute(
                "SELECT serial FROM operator_certificates WHERE name = ? AND revoked_at IS NULL"
                " ORDER BY issued_at, rowid",
                (name,),
            ).fetchall()
            conn.execute(
                "UPDATE operator_certificates SET revoked_at = ?, revoke_reason = ?"
                " WHERE name = ? AND revoked_at IS NULL",
                (moment, reason, name),
            )
        return [str(r[0]) for r in rows]

    # -- attached endpoints ---------------------------------------------------------------------------------

    def set_attached_endpoints(self, node: str, endpoints: Sequence[Mapping[str, Any]]) -> None:
        """Replace the endpoints ``node`` reports as attached; an empty list removes the node's entry."""
        try:
            text = canonical_json([dict(e) for e in endpoints])
        except (TypeError, ValueError) as exc:
            raise StoreError(f"endpoints of {node!r} are not JSON-serialisable: {exc}") from exc
        with self._write() as conn:
            if endpoints:
                conn.execute(
                    "INSERT INTO attached_endpoints (node, endpoints) VALUES (?, ?)"
                    " ON CONFLICT(node) DO UPDATE SET endpoints = excluded.endpoints",
                    (node, text),
                )
            else:
                conn.execute("DELETE FROM attached_endpoints WHERE node = ?", (node,))

    def attached_endpoints(self) -> dict[str, list[dict[str, Any]]]:
        """Every node's attached endpoints, keyed by node name (nodes without any are absent)."""
        with self._read() as conn:
            rows = conn.execute("SELECT node, endpoints FROM attached_endpoints ORDER BY node").fetchall()
        return {str(r[0]): list(json.loads(str(r[1]))) for r in rows}

    # -- audit log ------------------------------------------------------------------------------------------

    def append_audit(
        self,
        actor: str,
        role: str,
        action: str,
        target: str,
        revision: int | None,
        detail: Mapping[str, Any],
        *,
        actor_serial: str = "",
    ) -> AuditRecord:
        """Append one entry, chained to the current head and signed, inside one write transaction.

        ``actor_serial``: the serial of the certificate that acted (empty for the anonymous and for local
        commands). ``detail`` is normalised through canonical JSON first (tuples become lists, keys become
        strings), so the hash is computed over exactly what is stored and re-verifies after a round trip.
        Without a signer the entry is unsigned (format 1, no serial); a signed log refuses that.
        """
        try:
            normalised: dict[str, Any] = json.loads(canonical_json(dict(detail)))
        except (TypeError, ValueError) as exc:
            raise StoreError(f"audit detail is not JSON-serialisable: {exc}") from exc
        detail_text = canonical_json(normalised)
        signer = self._audit
        serial = actor_serial if signer is not None else ""
        with self._write() as conn:
            row = conn.execute(
                "SELECT sequence, hash, signature FROM audit ORDER BY sequence DESC LIMIT 1"
            ).fetchone()
            sequence, previous = (1, GENESIS_HASH) if row is None else (int(row[0]) + 1, str(row[1]))
            if signer is None and row is not None and str(row[2]):
                raise StoreError(f"audit log {self.path} is signed: appending needs the controller's audit key")
            # Taken inside the write lock, so entry times never go backwards across concurrent appenders
            # (modulo wall-clock steps).
            time = datetime.now(UTC)
            digest = entry_hash(previous, sequence, time, actor, role, action, target, revision, normalised,
                                actor_serial=serial if signer is not None else None)
            signature = signer.sign(sequence, digest) if signer is not None else ""
            conn.execute(
                f"INSERT INTO audit ({_AUDIT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (sequence, format_time(time), actor, role, action, target, revision, detail_text, digest, previous,
                 serial, signature),
            )
        record = AuditRecord(sequence, time, actor, role, action, target, revision, MappingProxyType(normalised),
                             digest, previous, serial, signature)
        if signer is not None:
            signer.published(record)
        return record

    def seal_unsigned_entries(self, key_id: str) -> AuditRecord | None:
        """If the newest entry is unsigned (written before signing existed), append a signed entry at once:
        its signature covers every earlier entry through the chain. None if there is nothing to seal."""
        with self._read() as conn:
            row = conn.execute("SELECT sequence, hash, signature FROM audit ORDER BY sequence DESC LIMIT 1").fetchone()
        if row is None or str(row[2]):
            return None
        return self.append_audit("controller", "system", "audit.signing-enabled", "audit-log", None,
                                 {"unsigned_entries": int(row[0]), "unsigned_head": str(row[1]), "key_id": key_id})

    def audit_hash(self, sequence: int) -> str | None:
        with self._read() as conn:
            row = conn.execute("SELECT hash FROM audit WHERE sequence = ?", (sequence,)).fetchone()
        return None if row is None else str(row[0])

    def audit(self, limit: int = 100) -> tuple[list[AuditRecord], int]:
        """The newest ``limit`` entries in ascending sequence order, and the total number of entries."""
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT {_AUDIT_COLUMNS} FROM audit ORDER BY sequence DESC LIMIT ?", (max(limit, 0),)
            ).fetchall()
            total = int(conn.execute("SELECT count(*) FROM audit").fetchone()[0])
        return [_audit_from_row(r) for r in reversed(rows)], total

    def verify_audit(self, public_key: Ed25519PublicKey | None = None, head: SignedHead | None = None,
                     head_source: str = "the signed head") -> tuple[bool, str]:
        """Verify the whole log (``audit.verify_rows``); by default with this store's audit key and the newest
        head it signed. Runs on its own read-only connection, not under the store's lock, so callers may run
        it in a thread while the store keeps serving."""
        from .audit import AuditSigner  # audit imports this module
        from .audit_verify import verify_file

        if public_key is None and isinstance(self._audit, AuditSigner):
            public_key = self._audit.public_key
            head = self._audit.head if head is None else head
        return verify_file(self.path, public_key, head, head_source)

    def close(self) -> None:
        """Close the connection (checkpointing the WAL); later calls raise StoreError. Idempotent."""
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()


if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from .audit import SignedHead

    def _implements_store(store: SQLiteStore) -> Store:
        """Lets mypy check that SQLiteStore satisfies the Store protocol."""
        return store
