"""The signed audit log against someone who can write the database but does not hold the audit key.

Real SQLite files, real Ed25519 keys; the attacks are done behind the store's back with raw sqlite3, the way
anyone with the file could: drop the triggers, delete or edit rows, re-chain the hashes with the (public,
unkeyed) chaining scheme, strip signatures, sign with a key of their own, cut off the newest entries.
"""

from __future__ import annotations

import base64
import json
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from structlog.testing import capture_logs

from veilnet_controller.audit import (
    HEAD_FILE,
    KEY_FILE,
    PUBLIC_KEY_FILE,
    AuditError,
    AuditSigner,
    SignedHead,
    load_public_key,
    open_signed_store,
    read_head,
    signed_message,
    verify_signature,
    write_head,
)
from veilnet_controller.audit_verify import verify_file
from veilnet_controller.store import SQLiteStore, StoreError, entry_hash, parse_time


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "controller"
    d.mkdir(mode=0o700)
    return d


@pytest.fixture
def signed(data_dir: Path) -> Iterator[tuple[SQLiteStore, AuditSigner]]:
    store, signer = open_signed_store(data_dir)
    yield store, signer
    store.close()


def fill(store: SQLiteStore, n: int = 5) -> None:
    for i in range(1, n + 1):
        store.append_audit(f"user{i}", "admin", "spec.apply", "network-spec", i, {"i": i}, actor_serial=f"5e{i}")


def raw(db: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("DROP TRIGGER IF EXISTS audit_no_update")
    conn.execute("DROP TRIGGER IF EXISTS audit_no_delete")
    return conn


def rows(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    cursor = conn.execute("SELECT * FROM audit ORDER BY sequence")
    names = [c[0] for c in cursor.description]
    return [dict(zip(names, r, strict=True)) for r in cursor.fetchall()]


def rechain(conn: sqlite3.Connection, *, unsigned: bool = False, sign_with: Ed25519PrivateKey | None = None) -> None:
    """What an attacker with the file does after editing or deleting rows: renumber, recompute every hash
    with the chaining scheme (it is no secret), keep or strip or forge the signatures."""
    previous = "0" * 64
    for number, row in enumerate(rows(conn), start=1):
        signature = "" if unsigned else row["signature"]
        fmt2 = sign_with is not None or (bool(row["signature"]) and not unsigned)  # each row keeps its format
        digest = entry_hash(previous, number, parse_time(row["time"]), row["actor"], row["role"], row["action"],
                            row["target"], row["revision"], json.loads(row["detail"]),
                            actor_serial=row["actor_serial"] if fmt2 else None)
        if sign_with is not None:
            signature = base64.b64encode(sign_with.sign(signed_message(number, digest))).decode()
        conn.execute("UPDATE audit SET sequence = ?, hash = ?, previous_hash = ?, signature = ?, actor_serial = ?"
                     " WHERE sequence = ?",
                     (number, digest, previous, signature, row["actor_serial"] if fmt2 else "", row["sequence"]))
        previous = digest


def test_every_entry_is_signed_and_its_head_published(signed: tuple[SQLiteStore, AuditSigner],
                                                      data_dir: Path) -> None:
    store, signer = signed
    with capture_logs() as logs:
        fill(store)
    entries, _ = store.audit()
    assert [e.actor_serial for e in entries] == ["5e1", "5e2", "5e3", "5e4", "5e5"]
    assert all(verify_signature(signer.public_key, e.sequence, e.hash, e.signature) for e in entries)
    # Each append goes to the journal with its signed head...
    journal = [e for e in logs if e["event"] == "audit_appended"]
    assert [(e["sequence"], e["hash"], e["signature"]) for e in journal] == [
        (e.sequence, e.hash, e.signature) for e in entries]
    # ...and to the head file (written at once outside an event loop).
    head = read_head(data_dir / HEAD_FILE)
    assert head is not None and (head.sequence, head.hash, head.key_id) == (5, entries[-1].hash, signer.key_id)
    head.check(load_public_key(data_dir / PUBLIC_KEY_FILE), "head")
    ok, message = store.verify_audit()
    assert ok and message == f"5 entries, head {entries[-1].hash}, signed by audit key {signer.key_id}; " \
                             "reaches the signed head (entry 5)"
    # The key lives apart from the database, 0600, and is not in it.
    assert (data_dir / KEY_FILE).stat().st_mode & 0o777 == 0o600
    key_der = serialization.load_pem_private_key((data_dir / KEY_FILE).read_bytes(), None).private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    assert key_der not in (data_dir / "controller.db").read_bytes()


def test_a_dropped_row_rechained_with_the_unkeyed_scheme_is_detected(signed: tuple[SQLiteStore, AuditSigner],
                                                                   data_dir: Path) -> None:
    store, signer = signed
    fill(store)
    conn = raw(store.path)
    conn.execute("DELETE FROM audit WHERE sequence = 3")
    rechain(conn)  # a consistent chain 1..4: the old verifier accepted exactly this
    conn.close()
    ok, message = verify_file(store.path, signer.public_key)
    assert (ok, message) == (False, f"entry 3: signature does not verify with audit key {signer.key_id} "
                                    "(the entry or its chain was rewritten)")


def test_the_whole_log_rewritten_unsigned_is_detected(signed: tuple[SQLiteStore, AuditSigner]) -> None:
    """Strip every signature and re-chain in the old, unsigned format: nothing signed is left to trust."""
    store, signer = signed
    fill(store)
    conn = raw(store.path)
    conn.execute("DELETE FROM audit WHERE sequence = 2")
    rechain(conn, unsigned=True)
    conn.close()
    ok, message = verify_file(store.path, signer.public_key)
    assert (ok, message) == (False, "entry 4: not signed (no entry of this log is signed)")


def test_an_edited_row_with_every_hash_recomputed_is_detected(signed: tuple[SQLiteStore, AuditSigner]) -> None:
    store, signer = signed
    fill(store)
    conn = raw(store.path)
    conn.execute("UPDATE audit SET actor = 'mallory', detail = '{\"i\":99}' WHERE sequence = 2")
    rechain(conn)
    conn.close()
    ok, message = verify_file(store.path, signer.public_key)
    assert not ok and message.startswith("entry 2: signature does not verify"), message


def test_a_log_signed_again_with_another_key_is_detected(signed: tuple[SQLiteStore, AuditSigner]) -> None:
    store, signer = signed
    fill(store)
    conn = raw(store.path)
    conn.execute("DELETE FROM audit WHERE sequence = 5")
    rechain(conn, sign_with=Ed25519PrivateKey.generate())
    conn.close()
    ok, message = verify_file(store.path, signer.public_key)
    assert not ok and message.startswith(f"entry 1: signature does not verify with audit key {signer.key_id}")


def test_a_stripped_signature_is_detected(signed: tuple[SQLiteStore, AuditSigner]) -> None:
    store, signer = signed
    fill(store)
    conn = raw(store.path)
    conn.execute("UPDATE audit SET signature = '' WHERE sequence = 4")
    conn.close()
    ok, message = verify_file(store.path, signer.public_key)
    assert not ok and message.startswith("entry 4: not signed, but entry 1 before it is"), message


def test_truncation_is_detected_against_a_shipped_head(signed: tuple[SQLiteStore, AuditSigner], data_dir: Path,
                                                       tmp_path: Path) -> None:
    store, _ = signed
    fill(store)
    shipped = tmp_path / "elsewhere" / "head.json"  # what an operator copied off the controller
    shipped.parent.mkdir()
    shutil.copy(data_dir / HEAD_FILE, shipped)
    store.close()
    conn = raw(data_dir / "controller.db")
    conn.execute("DELETE FROM audit WHERE sequence >= 4")  # the newest two: the rest stays chained and signed
    conn.close()
    public_key = load_public_key(data_dir / PUBLIC_KEY_FILE)
    # From the database alone, this cannot be seen (that is what the head is for)...
    assert verify_file(data_dir / "controller.db", public_key)[0]
    # ...against the shipped head it can, naming the first missing entry.
    ok, message = verify_file(data_dir / "controller.db", public_key, read_head(shipped), f"the head in {shipped}")
    head = read_head(shipped)
    assert head is not None
    assert (ok, message) == (False, f"entry 5: missing: the log ends at entry 3, but the head in {shipped} records "
                                    f"entry 5 (hash {head.hash}): entries were removed from the end")
    # And the controller will not open it for appending: new entries would take the missing numbers.
    with pytest.raises(AuditError, match="does not reach its signed head: entry 5 is missing"):
        open_signed_store(data_dir)


def test_a_forked_log_is_detected_against_an_older_shipped_head(signed: tuple[SQLiteStore, AuditSigner],
                                                                data_dir: Path, tmp_path: Path) -> None:
    """Entry 3 removed, the local head moved aside, and a different, validly signed entry 3 appended: only a
    head kept elsewhere tells the two histories apart."""
    store, signer = signed
    fill(store, 3)
    shipped = read_head(data_dir / HEAD_FILE)
    assert shipped is not None and shipped.sequence == 3
    store.close()
    conn = raw(data_dir / "controller.db")
    conn.execute("DELETE FROM audit WHERE sequence = 3")
    conn.close()
    (data_dir / HEAD_FILE).rename(tmp_path / "moved-aside.json")
    store, signer = open_signed_store(data_dir)
    try:
        forged = store.append_audit("mallory", "admin", "spec.apply", "network-spec", 3, {"i": 3})
    finally:
        store.close()
    assert verify_file(data_dir / "controller.db", signer.public_key)[0]  # every signature is genuine
    ok, message = verify_file(data_dir / "controller.db", signer.public_key, shipped, "the shipped head")
    assert (ok, message) == (False, f"entry 3: differs from the shipped head (log hash {forged.hash}, "
                                    f"head hash {shipped.hash})")
    other_store, other = open_signed_store(tmp_path / "another-controller")
    other_store.close()
    ok, message = verify_file(data_dir / "controller.db", other.public_key, shipped)
    assert not ok and message.startswith(f"entry 1: signature does not verify with audit key {other.key_id}")


def test_entries_from_before_signing_are_sealed_and_covered(data_dir: Path) -> None:
    """An upgraded controller: its unsigned log gets the key's signature over its head at once."""
    legacy = SQLiteStore(data_dir / "controller.db")
    fill(legacy, 3)
    legacy.close()
    store, signer = open_signed_store(data_dir)  # no key yet, unsigned log: the key is made and the log sealed
    try:
        entries, _ = store.audit()
        assert [e.action for e in entries][-1] == "audit.signing-enabled"
        assert entries[-1].detail == {"unsigned_entries": 3, "unsigned_head": entries[2].hash,
                                      "key_id": signer.key_id}
        ok, message = store.verify_audit()
        assert ok and "(entries 1-3 predate signing; entry 4's signature covers them)" in message, message
    finally:
        store.close()
    conn = raw(data_dir / "controller.db")
    conn.execute("UPDATE audit SET actor = 'mallory' WHERE sequence = 2")
    rechain(conn)  # consistent again, up to the signed entry 4, whose recomputed hash no longer matches its signature
    conn.close()
    ok, message = verify_file(data_dir / "controller.db", signer.public_key)
    assert not ok and message.startswith("entry 4: signature does not verify"), message


def test_a_signed_log_cannot_be_appended_to_without_the_key(signed: tuple[SQLiteStore, AuditSigner],
                                                            data_dir: Path) -> None:
    store, _ = signed
    fill(store, 2)
    keyless = SQLiteStore(data_dir / "controller.db")
    try:
        with pytest.raises(StoreError, match="is signed: appending needs the controller's audit key"):
            keyless.append_audit("mallory", "admin", "spec.apply", "network-spec", None, {})
    finally:
        keyless.close()
    store.close()
    (data_dir / KEY_FILE).unlink()
    with pytest.raises(AuditError, match=r"audit\.key is missing, but the audit log .* is signed"):
        open_signed_store(data_dir)  # and a new key is not quietly made for it


def test_a_replaced_public_key_is_refused(signed: tuple[SQLiteStore, AuditSigner], data_dir: Path) -> None:
    other = Ed25519PrivateKey.generate().public_key()
    (data_dir / PUBLIC_KEY_FILE).write_bytes(other.public_bytes(serialization.Encoding.PEM,
                                                                serialization.PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(AuditError, match="does not belong to"):
        AuditSigner.load(data_dir)


def test_the_head_file_never_goes_backwards(data_dir: Path) -> None:
    """The controller and an offline operator-cert both append; the later head wins whoever writes last."""
    path = data_dir / HEAD_FILE
    newer = SignedHead(7, "b" * 64, "sig7", "k", "t")
    assert write_head(path, newer)
    assert not write_head(path, SignedHead(6, "a" * 64, "sig6", "k", "t"))
    assert read_head(path) == newer


def test_verification_reads_only_and_agrees_with_the_store(signed: tuple[SQLiteStore, AuditSigner]) -> None:
    store, signer = signed
    fill(store, 4)
    before = store.path.read_bytes()
    assert verify_file(store.path, signer.public_key, signer.head) == store.verify_audit()
    assert store.path.read_bytes() == before
    store.append_audit("alice", "admin", "x", "t", None, {})  # the store keeps working meanwhile
    assert verify_file(store.path, signer.public_key)[1].startswith("5 entries")
    assert verify_file(store.path, None) == (
        False, "no audit public key: signatures cannot be checked (pass the controller's audit.pub)")
