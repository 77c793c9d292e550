"""Verify a controller's audit log from its database file, without the controller and without writing.

Meant for an auditor or an offline check (``veilnet-controller audit-verify --data-dir D``): the database is opened
read-only, so verifying cannot itself alter the evidence, and it works while the controller is running
(SQLite WAL readers do not block the writer). The chain check is ``store.verify_audit_chain``, the same code
the controller runs, so both always agree.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from .store import StoreError, verify_audit_chain


def verify_file(db_path: Path) -> tuple[bool, str]:
    """``(True, "N entries, head <hash>")`` or ``(False, "entry S: ...")``.

    Raises StoreError when the check cannot run at all (missing file, not a Veilnet database), which is
    a different answer from "the chain is broken".
    """
    if not db_path.is_file():
        raise StoreError(f"cannot verify {db_path}: no such file")
    uri = f"{db_path.resolve().as_uri()}?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, isolation_level=None)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open {db_path} read-only: {exc}") from exc
    try:
        return verify_audit_chain(conn)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot verify {db_path}: {exc}") from exc
    finally:
        conn.close()
