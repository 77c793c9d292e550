"""``veilnet-controller`` subcommands in-process: their checks, error messages and exit codes (no network)."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from veilnet_agent.control import pki
from veilnet_controller import cli
from veilnet_controller.audit import open_signed_store


@pytest.fixture(autouse=True)
def _keep_logging_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """cli.main configures structlog process-wide onto the captured stderr; other tests must not inherit that."""
    monkeypatch.setattr(cli.logs, "configure", lambda *args, **kwargs: None)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    data = tmp_path / "controller"
    assert cli.main(["init", "--data-dir", str(data), "--trust-domain", "veilnet.test"]) == 0
    return data


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(("lifetime", "message"), [
    ("99999999999d", "--lifetime: must be at most 90d"),
    ("36500d", "--lifetime: must be at most 90d"),
    ("91d", "--lifetime: must be at most 90d"),
    ("0s", "--lifetime: must be at least 1s"),
    ("30 days", "--lifetime: must be a duration like 90s, 30m, 24h or 7d"),
])
def test_operator_cert_refuses_absurd_lifetimes(data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                lifetime: str, message: str) -> None:
    out = tmp_path / "alice"
    code, _, err = run(capsys, "operator-cert", "--data-dir", str(data_dir), "--name", "alice", "--role", "viewer",
                       "--out", str(out), "--lifetime", lifetime)
    assert code == cli.EXIT_INVALID, err
    assert message in err and "Traceback" not in err, err
    assert not out.exists()  # nothing issued


def test_operator_cert_issues_up_to_the_bound(data_dir: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "operator-cert", "--data-dir", str(data_dir), "--name", "alice", "--role", "viewer",
                       "--out", str(tmp_path / "alice"), "--lifetime", "90d")
    assert code == 0, err
    who = pki.identity_from_certificate((tmp_path / "alice" / "client.crt").read_bytes())
    assert (who.name, who.role) == ("alice", "viewer")
    assert 89 < (who.not_after - who.not_before).days <= 90


def test_init_checks_the_admin_lifetime_before_creating_anything(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "controller"
    code, _, err = run(capsys, "init", "--data-dir", str(data), "--trust-domain", "veilnet.test",
                       "--admin-lifetime", "3650d")
    assert code == cli.EXIT_INVALID and "--admin-lifetime: must be at most 90d" in err, err
    assert not data.exists()  # not half-initialised: a corrected init can still run


@pytest.mark.parametrize(("lifetime", "message"), [
    ("365d", "--certificate-lifetime: must be at most 30d"),
    ("5s", "--certificate-lifetime: must be at least 10s"),
])
def test_serve_refuses_node_lifetimes_out_of_bounds(data_dir: Path, lifetime: str, message: str) -> None:
    # A subprocess with a timeout: if the flag were accepted, serve would run instead of returning.
    res = subprocess.run([sys.executable, "-m", "veilnet_controller.cli", "serve", "--data-dir", str(data_dir),
                          "--listen", "127.0.0.1:0", "--bootstrap-listen", "127.0.0.1:0",
                          "--certificate-lifetime", lifetime], capture_output=True, text=True, timeout=30)
    assert res.returncode == cli.EXIT_INVALID and message in res.stderr, res.stderr


def test_server_cert_lifetime_is_bounded(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = (data_dir / "server.crt").read_bytes()
    code, _, err = run(capsys, "server-cert", "--data-dir", str(data_dir), "--lifetime", "3650d")
    assert code == cli.EXIT_INVALID and "--lifetime: must be at most 825d" in err, err
    assert (data_dir / "server.crt").read_bytes() == before


def test_init_signs_the_log_from_its_first_entry(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "audit-verify", "--data-dir", str(data_dir))
    assert code == 0, err
    assert out.startswith("ok: 1 entries, head ") and "signed by audit key" in out, out
    assert f"reaches the signed head in {data_dir / 'audit-head.json'} (entry 1)" in out
    assert (data_dir / "audit.key").stat().st_mode & 0o777 == 0o600
    assert (data_dir / "audit.pub").stat().st_mode & 0o777 == 0o644


def test_audit_verify_with_copies_kept_elsewhere(data_dir: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    safe = tmp_path / "auditor"
    safe.mkdir()
    shutil.copy(data_dir / "audit.pub", safe / "audit.pub")
    run(capsys, "operator-cert", "--data-dir", str(data_dir), "--name", "alice", "--role", "viewer",
        "--out", str(tmp_path / "alice"))
    shutil.copy(data_dir / "audit-head.json", safe / "head.json")
    args = ("audit-verify", "--data-dir", str(data_dir), "--public-key", str(safe / "audit.pub"),
            "--head", str(safe / "head.json"))
    code, out, err = run(capsys, *args)
    assert code == 0 and out.startswith("ok: 2 entries"), (out, err)

    db = sqlite3.connect(data_dir / "controller.db")
    db.execute("DROP TRIGGER audit_no_delete")
    db.execute("DELETE FROM audit WHERE sequence = 2")
    db.commit()
    db.close()
    (data_dir / "audit-head.json").unlink()  # whoever cut the log also removed the local head
    code, out, _ = run(capsys, *args)
    assert code == cli.EXIT_FAILURE
    assert out.startswith(f"TAMPERED: entry 2: missing: the log ends at entry 1, but the signed head in "
                          f"{safe / 'head.json'} records entry 2"), out
    code, out, _ = run(capsys, "audit-verify", "--data-dir", str(data_dir))
    assert code == 0 and "no signed head" in out and "would go unnoticed" in out, out  # says what it cannot see
    code, _, err = run(capsys, "audit-verify", "--data-dir", str(data_dir), "--head", str(tmp_path / "nope.json"))
    assert code == cli.EXIT_FAILURE and "--head" in err and "no such file" in err
    code, _, err = run(capsys, "audit-verify", "--data-dir", str(data_dir), "--public-key", str(tmp_path / "none"))
    assert code == cli.EXIT_FAILURE and "cannot read the audit public key" in err


def test_offline_operator_cert_is_recorded_and_audited(data_dir: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "operator-cert", "--data-dir", str(data_dir), "--name", "alice", "--role", "viewer",
                       "--out", str(tmp_path / "alice"))
    assert code == 0, err
    serial = pki.identity_from_certificate((tmp_path / "alice" / "client.crt").read_bytes()).serial
    store, _ = open_signed_store(data_dir)
    try:
        record = store.operator_certificate(serial)
        assert record is not None and (record.name, record.role, record.revoked_at) == ("alice", "viewer", None)
        entry = store.audit(1)[0][-1]
        assert (entry.action, entry.role, entry.target, entry.detail["serial"], entry.detail["role"]) == (
            "operator.issue", "local", "alice", serial, "viewer")
        assert entry.signature
    finally:
        store.close()


def test_operator_cert_needs_an_initialised_data_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    cli.main(["init", "--data-dir", str(empty), "--trust-domain", "veilnet.test"])
    (empty / "controller.db").unlink()
    code, _, err = run(capsys, "operator-cert", "--data-dir", str(empty), "--name", "alice", "--role", "viewer",
                       "--out", str(tmp_path / "alice"))
    assert code == cli.EXIT_FAILURE and "controller.db does not exist" in err, err
    assert not (empty / "controller.db").exists() and not (tmp_path / "alice").exists()
