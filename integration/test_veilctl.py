"""veilctl against a real controller on loopback: every exit code a script may rely on, and its messages.

No namespaces or root needed: one controller process, real mutual TLS.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from ctl import ControllerProcess, free_port

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "network.yaml"


@pytest.fixture(scope="module")
def ctl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControllerProcess]:
    with ControllerProcess(tmp_path_factory.mktemp("veilctl")).init() as c:
        c.start()
        assert c.veilctl("apply", "-f", str(EXAMPLE), "-m", "base").returncode == 0
        yield c


@pytest.fixture(autouse=True)
def base_spec(ctl: ControllerProcess) -> None:
    """Every test starts with the example spec current (a test that applied a change does not leak it)."""
    res = ctl.veilctl("apply", "-f", str(EXAMPLE), "-m", "base")
    assert res.returncode == 0, res.stderr


def changed_spec(tmp_path: Path, port: int) -> Path:
    spec = yaml.safe_load(EXAMPLE.read_text())
    next(p for p in spec["policies"] if p["name"] == "web-to-api")["ports"] = [port]
    path = tmp_path / f"spec-{port}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_unchanged_apply_and_diff_exit_zero(ctl: ControllerProcess, tmp_path: Path) -> None:
    # The same data in another form (JSON, other key order, no comments) is no change.
    as_json = tmp_path / "same.json"
    as_json.write_text(json.dumps(yaml.safe_load(EXAMPLE.read_text()), sort_keys=True))
    res = ctl.veilctl("apply", "-f", str(as_json))
    assert res.returncode == 0 and "unchanged" in res.stdout, res.stdout + res.stderr
    res = ctl.veilctl("diff", "-f", str(as_json))
    assert res.returncode == 0 and res.stdout == "", res.stdout
    assert "no difference" in res.stderr


def test_diff_exits_one_and_shows_the_change(ctl: ControllerProcess, tmp_path: Path) -> None:
    res = ctl.veilctl("diff", "-f", str(changed_spec(tmp_path, 8443)))
    assert res.returncode == 1
    assert "-  - 8080" in res.stdout and "+  - 8443" in res.stdout


def test_stale_expected_revision_is_a_conflict(ctl: ControllerProcess, tmp_path: Path) -> None:
    current = json.loads(ctl.veilctl("-o", "json", "get", check=True).stdout)["revision"]
    res = ctl.veilctl("apply", "-f", str(changed_spec(tmp_path, 8444)), "--expected-revision", str(current - 1 or 99))
    assert res.returncode == 5, res.stderr
    assert "aborted" in res.stderr and f"current revision is {current}" in res.stderr
    assert json.loads(ctl.veilctl("-o", "json", "get", check=True).stdout)["revision"] == current
    res = ctl.veilctl("-o", "json", "apply", "-f", str(changed_spec(tmp_path, 8444)),
                      "--expected-revision", str(current))
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["revision"] == current + 1


def test_not_found(ctl: ControllerProcess) -> None:
    for args in (("get", "--revision", "999"), ("rollback", "999"), ("revoke", "no-such-node"),
                 ("revoke", "--operator", "no-such-operator"), ("command", "no-such-node", "resync")):
        res = ctl.veilctl(*args)
        assert res.returncode == 4, (args, res.returncode, res.stderr)
        assert "not_found" in res.stderr or "never joined" in res.stderr or "there is no" in res.stderr, res.stderr


def test_invalid_input_exits_two_naming_the_problem(ctl: ControllerProcess, tmp_path: Path) -> None:
    res = ctl.veilctl("apply", "-f", str(tmp_path / "missing.yaml"))
    assert res.returncode == 2 and "cannot read" in res.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("segments: [\n")
    res = ctl.veilctl("apply", "-f", str(bad))
    assert res.returncode == 2 and "not valid" in res.stderr, res.stderr
    res = ctl.veilctl("token", "create", "Not_A_Name")
    assert res.returncode == 2 and "node_name" in res.stderr, res.stderr
    res = ctl.veilctl("token", "create", "host-z", "--ttl", str(30 * 86400))
    assert res.returncode == 2 and "ttl_seconds" in res.stderr, res.stderr
    for args in (("revoke",), ("revoke", "host-a", "--operator", "alice")):
        res = ctl.veilctl(*args)
        assert res.returncode == 2 and "name a node (revoke NODE) or an operator" in res.stderr, (args, res.stderr)
    res = ctl.veilctl("revoke", "--operator", "Not_A_Name")
    assert res.returncode == 2 and "name:" in res.stderr, res.stderr
    env = {k: v for k, v in os.environ.items() if not k.startswith("VEILCTL_")}
    res = subprocess.run([sys.executable, "-m", "veilnet_controller.veilctl", "nodes"], capture_output=True,
                         text=True, env=env)
    assert res.returncode == 2 and "no controller" in res.stderr


def test_unreachable_controller_exits_six(ctl: ControllerProcess) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "veilnet_controller.veilctl", "--controller", f"127.0.0.1:{free_port()}",
         "--credentials", str(ctl.operator("admin", "admin")), "--timeout", "3", "nodes"],
        capture_output=True, text=True)
    assert res.returncode == 6, res.stderr
    assert "unavailable" in res.stderr or "deadline" in res.stderr


def test_json_output_is_machine_readable(ctl: ControllerProcess) -> None:
    history = json.loads(ctl.veilctl("-o", "json", "history", check=True).stdout)
    assert history[-1]["revision"] == 1 and history[-1]["message"] == "base"
    nodes = json.loads(ctl.veilctl("-o", "json", "nodes", check=True).stdout)
    assert {n["name"]: n["state"] for n in nodes["nodes"]} == {
        "host-a": "not-joined", "host-b": "not-joined", "host-c": "not-joined"}
    token = json.loads(ctl.veilctl("-o", "json", "token", "create", "host-a", check=True).stdout)
    assert token["token"].startswith("vnjoin_") and token["ca_hash"] == ctl.ca_hash
    audit = json.loads(ctl.veilctl("-o", "json", "audit", "--verify", check=True).stdout)
    assert audit["verified"] is True
    assert [e["action"] for e in audit["entries"]][:2] == ["operator.issue", "spec.apply"]  # init's admin first
    assert all(token["token"] not in json.dumps(e) for e in audit["entries"])  # never in the audit log
