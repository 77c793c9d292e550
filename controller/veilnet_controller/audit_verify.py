"""Verify a controller's audit log from its database file, without the controller and without writing.

Meant for an auditor or an offline check (``veilnet-controller audit-verify --data-dir D``): the database is
opened read-only, so verifying cannot itself alter the evidence, and it works while the controller is running
(SQLite WAL readers do not block the writer). The checks are ``audit.verify_rows``, the same code the
controller runs for ``veilctl audit --verify``, so both always agree. The public key and the signed head
should come from copies kept away from the controller (``--public-key``, ``--head``): the ones in its data
directory prove only as much as that directory is trusted.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .audit import SignedHead, verify_connection
from .store import StoreError


def verify_file(db_path: Path, public_key: Ed25519PublicKey | None, head: SignedHead | None = None,
                head_source: str = "the signed head") -> tuple[bool, str]:
    """``(True, summary)`` or ``(False, "entry S: ...")``; see ``audit.verify_rows``.

    Raises StoreError when the check cannot run at all (missing file, not a Veilnet database), which is
    a different answer from "the log was tampered with".
    """
    if not db_path.is_file():
        raise StoreError(f"cannot verify {db_path}: no such file")
    uri = f"{db_path.resolve().as_uri()}?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, isolation_level=None)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open {db_path} read-only: {exc}") from exc
    try:
        return verify_connection(conn, public_key, head, head_source)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot verify {db_path}: {exc}") from exc
    finally:
        conn.close()
