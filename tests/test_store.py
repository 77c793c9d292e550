"""The controller store on real SQLite files: revisions, single-use join tokens, node lifecycle, and the
tamper-evident audit log (including tampering done behind the store's back with raw sqlite3)."""

from __future__ import annotations

import itertools
import sqlite3
import stat
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from veilnet_controller.audit_verify import verify_file
from veilnet_controller.store import (
    GENESIS_HASH,
    SCHEMA_VERSION,
    ConflictError,
    SQLiteStore,
    Store,
    StoreError,
    TokenResult,
    entry_hash,
    token_hash,
)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "controller.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[SQLiteStore]:
    s = SQLiteStore(db_path)
    yield s
    s.close()


def raw(db_path: Path) -> sqlite3.Connection:
    """A second, unguarded connection: what someone with write access to the file could do."""
    return sqlite3.connect(db_path, isolation_level=None)


def test_implements_protocol(store: SQLiteStore) -> None:
    assert isinstance(store, Store)


def test_schema_and_pragmas(store: SQLiteStore, db_path: Path) -> None:
    conn = raw(db_path)
    assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_db_file_mode_0600(store: SQLiteStore, db_path: Path) -> None:
    store.create_token("n1", timedelta(minutes=5), "admin")
    assert stat.S_IMODE(db_path.stat().st_mode) == 0o600
    for suffix in ("-wal", "-shm"):
        side = db_path.with_name(db_path.name + suffix)
        if side.exists():
            assert stat.S_IMODE(side.stat().st_mode) == 0o600


def test_existing_file_mode_is_tightened(tmp_path: Path) -> None:
    path = tmp_path / "loose.db"
    path.touch(mode=0o644)
    path.chmod(0o644)
    SQLiteStore(path).close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_reopen_keeps_data(db_path: Path) -> None:
    s = SQLiteStore(db_path)
    s.add_revision("a: 1\n", "alice", "first")
    s.append_audit("alice", "admin", "spec.apply", "network-spec", 1, {})
    s.close()
    s = SQLiteStore(db_path)
    rev = s.revision()
    assert rev is not None and rev.number == 1
    assert [e.actor for e in s.audit()[0]] == ["alice"]
    s.close()


def test_closed_store_refuses(db_path: Path) -> None:
    s = SQLiteStore(db_path)
    s.close()
    s.close()  # idempotent
    with pytest.raises(StoreError, match="closed"):
        s.nodes()


def test_newer_schema_version_refused(db_path: Path) -> None:
    SQLiteStore(db_path).close()
    conn = raw(db_path)
    conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    conn.close()
    with pytest.raises(StoreError, match=f"schema version {SCHEMA_VERSION + 1}"):
        SQLiteStore(db_path)


def make_version_1(db_path: Path) -> None:
    """Turn a new database into what schema version 1 was: no retire_at column, no operator records, an
    unsigned audit log without actor serials."""
    conn = raw(db_path)
    conn.execute("ALTER TABLE certificates DROP COLUMN retire_at")
    conn.execute("ALTER TABLE audit DROP COLUMN actor_serial")
    conn.execute("ALTER TABLE audit DROP COLUMN signature")
    conn.execute("DROP TABLE operator_certificates")
    conn.execute("UPDATE schema_version SET version = 1")
    conn.close()


def test_version_1_database_is_migrated_keeping_its_data(db_path: Path) -> None:
    s = SQLiteStore(db_path)
    s.record_certificate("n1", "serial-1", datetime(2031, 1, 1, tzinfo=UTC))
    s.add_revision("a: 1\n", "alice", "first")
    s.close()
    make_version_1(db_path)

    s = SQLiteStore(db_path)
    try:
        conn = raw(db_path)
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
        conn.close()
        assert s.node("n1").certificate_serial == "serial-1"  # type: ignore[union-attr]
        assert s.revision() is not None
        assert s.retire_certificates("n1", keep="serial-2", at=datetime(2030, 1, 1, tzinfo=UTC)) == {
            "serial-1": datetime(2030, 1, 1, tzinfo=UTC)}
        assert s.record_operator_certificate("alice", "admin", "op-1", datetime(2031, 1, 1, tzinfo=UTC), "test")
    finally:
        s.close()


# -- revisions ------------------------------------------------------------------------------------------------


def test_revisions_numbering_latest_and_history(store: SQLiteStore) -> None:
    assert store.revision() is None
    assert store.revisions() == []
    r1 = store.add_revision("v: 1\n", "alice", "one")
    r2 = store.add_revision("v: 2\n", "bob", "two", expected_current=1)
    r3 = store.add_revision("v: 1\n", "alice", "rollback", rolled_back_from=1)
    assert [r1.number, r2.number, r3.number] == [1, 2, 3]
    assert r3.rolled_back_from == 1 and r1.rolled_back_from is None
    assert store.revision() == r3
    assert store.revision(2) == r2
    assert store.revision(9) is None
    assert [r.number for r in store.revisions()] == [3, 2, 1]
    assert [r.number for r in store.revisions(limit=2)] == [3, 2]
    got = store.revision(1)
    assert got is not None
    assert (got.spec_text, got.author, got.message) == ("v: 1\n", "alice", "one")
    assert got.created_at.tzinfo is not None


def test_revision_expected_current_conflict(store: SQLiteStore) -> None:
    store.add_revision("x", "a", "m", expected_current=0)
    with pytest.raises(ConflictError) as info:
        store.add_revision("y", "a", "m", expected_current=0)
    assert "0" in str(info.value) and "1" in str(info.value)
    with pytest.raises(ConflictError, match=r"revision 5.*revision is 1"):
        store.add_revision("y", "a", "m", expected_current=5)
    latest = store.revision()
    assert latest is not None and latest.number == 1


def test_rollback_to_unknown_revision_refused(store: SQLiteStore) -> None:
    with pytest.raises(StoreError):
        store.add_revision("x", "a", "m", rolled_back_from=4)
    assert store.revision() is None


# -- join tokens ----------------------------------------------------------------------------------------------


def test_token_single_use(store: SQLiteStore) -> None:
    token, expires = store.create_token("n1", timedelta(minutes=10), "admin")
    assert expires > datetime.now(UTC)
    assert len(token) >= 43
    assert store.consume_token(token, "n1") is TokenResult.OK
    assert store.consume_token(token, "n1") is TokenResult.USED


def test_token_unknown_wrong_node_expired(store: SQLiteStore) -> None:
    token, expires = store.create_token("n1", timedelta(minutes=10), "admin")
    assert store.consume_token("not-a-token", "n1") is TokenResult.UNKNOWN
    assert store.consume_token(token, "n2") is TokenResult.WRONG_NODE
    assert store.consume_token(token, "n1", now=expires) is TokenResult.EXPIRED
    assert store.consume_token(token, "n1", now=expires + timedelta(days=1)) is TokenResult.EXPIRED
    # None of the failures used it up.
    assert store.consume_token(token, "n1", now=expires - timedelta(seconds=1)) is TokenResult.OK


def test_token_check_order(store: SQLiteStore) -> None:
    """WRONG_NODE before USED before EXPIRED: the state of someone else's token is not disclosed."""
    token, expires = store.create_token("n1", timedelta(minutes=10), "admin")
    assert store.consume_token(token, "n1") is TokenResult.OK
    later = expires + timedelta(hours=1)
    assert store.consume_token(token, "n2", now=later) is TokenResult.WRONG_NODE
    assert store.consume_token(token, "n1", now=later) is TokenResult.USED


def test_token_ttl_must_be_positive(store: SQLiteStore) -> None:
    with pytest.raises(StoreError):
        store.create_token("n1", timedelta(0), "admin")


def test_naive_now_rejected(store: SQLiteStore) -> None:
    token, _ = store.create_token("n1", timedelta(minutes=10), "admin")
    with pytest.raises(ValueError, match="naive"):
        store.consume_token(token, "n1", now=datetime(2030, 1, 1))


def _race(consume: list[SQLiteStore], token: str) -> list[TokenResult]:
    barrier = threading.Barrier(len(consume))
    results: list[TokenResult] = []
    lock = threading.Lock()

    def worker(s: SQLiteStore) -> None:
        barrier.wait()
        r = s.consume_token(token, "n1")
        with lock:
            results.append(r)

    threads = [threading.Thread(target=worker, args=(s,)) for s in consume]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_token_concurrent_consume_same_store(store: SQLiteStore) -> None:
    for _ in range(20):
        token, _ = store.create_token("n1", timedelta(minutes=10), "admin")
        results = _race([store, store], token)
        assert sorted(r.value for r in results) == ["ok", "used"]


def test_token_concurrent_consume_two_connections(store: SQLiteStore, db_path: Path) -> None:
    """Two stores on one file (two processes' worth of connections): still exactly one OK."""
    other = SQLiteStore(db_path)
    try:
        for _ in range(20):
            token, _ = store.create_token("n1", timedelta(minutes=10), "admin")
            results = _race([store, other, store, other], token)
            assert [r for r in results if r is TokenResult.OK] == [TokenResult.OK]
            assert results.count(TokenResult.USED) == 3
    finally:
        other.close()


def test_plain_token_never_stored(store: SQLiteStore, db_path: Path) -> None:
    tokens = [store.create_token(f"n{i}", timedelta(minutes=10), "admin")[0] for i in range(5)]
    assert store.consume_token(tokens[0], "n0") is TokenResult.OK
    conn = raw(db_path)
    conn.execute("PRAGMA wal_checkpoint(FULL)")
    conn.close()
    blob = db_path.read_bytes()
    wal = db_path.with_name(db_path.name + "-wal")
    if wal.exists():
        blob += wal.read_bytes()
    # Sanity: the hashes are there, so we are looking at the right bytes.
    assert token_hash(tokens[1]).encode() in blob
    for token in tokens:
        assert token.encode() not in blob


# -- nodes ----------------------------------------------------------------------------------------------------


def test_node_lifecycle(store: SQLiteStore) -> None:
    assert store.node("n1") is None
    nat1 = datetime(2031, 1, 1, tzinfo=UTC)
    store.record_certificate("n1", "serial-1", nat1)
    n = store.node("n1")
    assert n is not None
    assert n.joined_at is not None and n.certificate_serial == "serial-1" and n.certificate_not_after == nat1
    assert n.revoked_at is None and n.revoke_reason == "" and n.wireguard_public_key is None
    assert n.capabilities == ()
    joined = n.joined_at

    store.set_wireguard_key("n1", "pubkey=", ["wireguard", "vxlan"])
    store.record_certificate("n1", "serial-2", nat1 + timedelta(days=1))  # renewal
    n = store.node("n1")
    assert n is not None
    assert n.wireguard_public_key == "pubkey=" and n.capabilities == ("wireguard", "vxlan")
    assert n.certificate_serial == "serial-2" and n.joined_at == joined

    store.record_certificate("n0", "serial-0", nat1)
    assert [x.name for x in store.nodes()] == ["n0", "n1"]

    when = datetime(2030, 6, 1, 12, tzinfo=UTC)
    assert store.revoke_node("n1", "compromised", now=when) == ["serial-1", "serial-2"]
    n = store.node("n1")
    assert n is not None and n.revoked_at == when and n.revoke_reason == "compromised"
    assert store.is_serial_revoked("serial-1") and store.is_serial_revoked("serial-2")
    assert not store.is_serial_revoked("serial-0") and not store.is_serial_revoked("nope")
    assert store.revoked_serials() == frozenset({"serial-1", "serial-2"})
    assert store.revoke_node("n1", "again") == []  # nothing new to revoke

    # Rejoin with a new token: node readmitted, old serials stay revoked.
    store.record_certificate("n1", "serial-3", nat1)
    n = store.node("n1")
    assert n is not None and n.revoked_at is None and n.revoke_reason == "" and n.joined_at == joined
    assert store.revoked_serials() == frozenset({"serial-1", "serial-2"})
    assert not store.is_serial_revoked("serial-3")


def test_renewal_retires_every_other_certificate_and_never_extends_a_grace(store: SQLiteStore) -> None:
    nat = datetime(2031, 1, 1, tzinfo=UTC)
    t1, t2 = datetime(2030, 1, 1, 12, tzinfo=UTC), datetime(2030, 1, 1, 13, tzinfo=UTC)
    store.record_certificate("n1", "s1", nat)
    store.record_certificate("n2", "other", nat)
    store.record_certificate("n1", "s2", nat)  # first renewal
    assert store.retire_certificates("n1", keep="s2", at=t1) == {"s1": t1}
    store.record_certificate("n1", "s3", nat)  # renewed again (say the answer to the first was lost)
    assert store.retire_certificates("n1", keep="s3", at=t2) == {"s1": t1, "s2": t2}  # s1 keeps its time
    assert store.retiring_certificates() == {"s1": t1, "s2": t2}
    assert store.is_serial_revoked("s1", now=t1) and not store.is_serial_revoked("s1", now=t1 - timedelta(seconds=1))
    assert not store.is_serial_revoked("s3", now=t2) and not store.is_serial_revoked("other", now=t2)
    assert store.revoked_serials() == frozenset()  # retiring is not revoked (yet)
    assert store.revoke_node("n1", "gone") == ["s1", "s2", "s3"]
    assert store.retiring_certificates() == {}  # revoked outright now


def test_operator_certificates_are_recorded_and_revoked_by_name(store: SQLiteStore) -> None:
    nat = datetime(2031, 1, 1, tzinfo=UTC)
    assert store.operator_certificate("op-1") is None
    assert store.record_operator_certificate("alice", "admin", "op-1", nat, "root (operator-cert)")
    assert not store.record_operator_certificate("alice", "admin", "op-1", nat, "again")  # already known
    with pytest.raises(StoreError, match="already recorded for alice"):
        store.record_operator_certificate("mallory", "admin", "op-1", nat, "x")
    store.record_operator_certificate("alice", "viewer", "op-2", nat, "x")
    store.record_operator_certificate("bob", "viewer", "op-3", nat, "x")
    rec = store.operator_certificate("op-1")
    assert rec is not None and (rec.name, rec.role, rec.not_after, rec.revoked_at) == ("alice", "admin", nat, None)
    assert [r.serial for r in store.operator_certificates("alice")] == ["op-1", "op-2"]

    when = datetime(2030, 6, 1, tzinfo=UTC)
    assert store.revoke_operator("alice", "left", now=when) == ["op-1", "op-2"]
    assert store.operator_certificate("op-2").revoked_at == when  # type: ignore[union-attr]
    assert store.operator_certificate("op-3").revoked_at is None  # type: ignore[union-attr]
    assert store.revoked_serials() == frozenset({"op-1", "op-2"})
    assert store.is_serial_revoked("op-1") and not store.is_serial_revoked("op-3")
    assert store.revoke_operator("alice", "again") == []
    with pytest.raises(StoreError, match="unknown operator 'alcie'"):
        store.revoke_operator("alcie", "typo")
    # Issued again after the revocation: the new certificate is good.
    store.record_operator_certificate("alice", "admin", "op-4", nat, "x")
    assert store.operator_certificate("op-4").revoked_at is None  # type: ignore[union-attr]


def test_revoke_unknown_node(store: SQLiteStore) -> None:
    with pytest.raises(StoreError, match="unknown node"):
        store.revoke_node("ghost", "x")


def test_duplicate_serial_refused(store: SQLiteStore) -> None:
    store.record_certificate("n1", "s", datetime(2031, 1, 1, tzinfo=UTC))
    with pytest.raises(StoreError, match="already recorded"):
        store.record_certificate("n2", "s", datetime(2031, 1, 1, tzinfo=UTC))
    assert store.node("n2") is None  # rolled back


def test_attached_endpoints_roundtrip(store: SQLiteStore) -> None:
    assert store.attached_endpoints() == {}
    eps: list[dict[str, Any]] = [
        {"name": "web", "address": "10.0.0.2", "labels": {"app": "web"}},
        {"name": "db", "ports": [1, 2]},
    ]
    store.set_attached_endpoints("n1", eps)
    store.set_attached_endpoints("n2", [{"name": "x"}])
    assert store.attached_endpoints() == {"n1": eps, "n2": [{"name": "x"}]}
    store.set_attached_endpoints("n1", [{"name": "only"}])
    assert store.attached_endpoints()["n1"] == [{"name": "only"}]
    store.set_attached_endpoints("n2", [])
    assert store.attached_endpoints() == {"n1": [{"name": "only"}]}


# -- audit log (mechanics; signing and verification: test_audit.py) --------------------------------------------


def _fill_audit(store: SQLiteStore, n: int = 5) -> None:
    for i in range(1, n + 1):
        store.append_audit(f"user{i}", "admin", "spec.apply", "network-spec", i, {"i": i, "tags": ("a", "b")})


def test_unsigned_entries_chain_in_the_legacy_format(store: SQLiteStore) -> None:
    """Without an audit key (tests, benchmarks) entries are format 1: chained, unsigned, no actor serial."""
    first = store.append_audit("alice", "admin", "token.create", "n1", None, {"ttl": 600}, actor_serial="ab12")
    assert first.sequence == 1 and first.previous_hash == GENESIS_HASH
    assert first.hash == entry_hash(GENESIS_HASH, 1, first.time, "alice", "admin", "token.create", "n1", None,
                                    {"ttl": 600})
    assert (first.signature, first.actor_serial) == ("", "")
    _fill_audit(store)
    entries, total = store.audit()
    assert total == 6 and [e.sequence for e in entries] == [1, 2, 3, 4, 5, 6]
    for prev, cur in itertools.pairwise(entries):
        assert cur.previous_hash == prev.hash
    assert entries[2].detail == {"i": 2, "tags": ["a", "b"]}
    assert entries[2].revision == 2 and entries[0].revision is None
    latest, total = store.audit(limit=2)
    assert total == 6 and [e.sequence for e in latest] == [5, 6]
    # An unsigned log proves nothing: verification says so instead of passing.
    ok, message = store.verify_audit()
    assert not ok and message.startswith("no audit public key")


def test_audit_detail_must_be_json(store: SQLiteStore) -> None:
    with pytest.raises(StoreError):
        store.append_audit("a", "admin", "x", "t", None, {"bad": object()})
    assert store.audit() == ([], 0)


def test_audit_update_and_delete_refused_by_triggers(store: SQLiteStore, db_path: Path) -> None:
    _fill_audit(store, 3)
    conn = raw(db_path)
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("UPDATE audit SET actor = 'mallory' WHERE sequence = 2")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("DELETE FROM audit WHERE sequence = 2")
    conn.close()
    assert [e.actor for e in store.audit()[0]] == ["user1", "user2", "user3"]


def test_dropped_triggers_come_back_on_reopen(store: SQLiteStore, db_path: Path) -> None:
    conn = raw(db_path)
    conn.execute("DROP TRIGGER audit_no_update")
    conn.execute("DROP TRIGGER audit_no_delete")
    SQLiteStore(db_path).close()
    names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")}
    conn.close()
    assert names == {"audit_no_update", "audit_no_delete"}


def test_verify_file_cannot_write(store: SQLiteStore, db_path: Path) -> None:
    """The URI the verifier uses really is read-only: the same open mode refuses writes."""
    _fill_audit(store, 1)
    conn = sqlite3.connect(f"{db_path.resolve().as_uri()}?mode=ro", uri=True)
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        conn.execute("INSERT INTO schema_version (version) VALUES (7)")
    conn.close()


def test_verify_file_missing(tmp_path: Path) -> None:
    with pytest.raises(StoreError):
        verify_file(tmp_path / "nope.db", None)
