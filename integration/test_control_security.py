"""The controller's control plane under attack: a real ``veilnet-controller`` process, real TLS over loopback.

What is proven here, end to end (no mocks, no root needed):

* joining: a good token yields a SPIFFE identity; reused, expired, foreign-node and unknown tokens and a wrong or
  malformed CA pin are refused with a clear message and leave no identity files; a wrong pin is refused before
  the token leaves the host;
* the control listener only admits certificates of our CA that are in their validity period and not revoked,
  and a revocation ends a node's open stream;
* every RPC is authorized by ``authz.MATRIX`` for every role, and denied mutations are audited;
* malformed, oversized and out-of-protocol input gets an error status and never takes the controller down;
* the audit log's hash chain detects a past entry edited behind the controller's back;
* join tokens are stored only as hashes.

One controller serves the whole module; the tests that stop the controller get a fresh one.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import queue
import secrets
import shutil
import socket
import sqlite3
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from ctl import REPO_ROOT, ControllerProcess, _bin, stop_process_group

from veilnet.v1 import admin_pb2, admin_pb2_grpc, controller_pb2, controller_pb2_grpc
from veilnet_agent.control import pki
from veilnet_agent.control.enrollment import IdentityFiles, renew
from veilnet_controller import authz
from veilnet_controller.ca import CertificateAuthority
from veilnet_controller.store import SQLiteStore, entry_hash, parse_time, token_hash

EXAMPLE_SPEC = REPO_ROOT / "examples" / "network.yaml"
TRUST_DOMAIN = "veilnet.test"
CALL_TIMEOUT = 20.0
STREAM_TIMEOUT = 30.0  # a Sync stream that has not ended by then fails its test with DEADLINE_EXCEEDED
JOIN_METHOD = "/veilnet.v1.Controller/Join"
SYNC_METHOD = "/veilnet.v1.Controller/Sync"
# Reads are not audited when denied (the server's choice); every other denied call must be.
READ_ONLY = frozenset(f"/veilnet.v1.Admin/{m}" for m in ("GetSpec", "History", "DiffSpec", "ListNodes", "ReadAudit"))
GARBAGE = b"\xff" * 32  # field 31 with wire type 7: not parseable as any protobuf message
KIB = 1024
_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
MIB = 1024 * KIB

_counter = itertools.count(1)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def controller(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControllerProcess]:
    """One controller for the module, with the example spec applied as revision 1."""
    with ControllerProcess(tmp_path_factory.mktemp("ctlsec"), trust_domain=TRUST_DOMAIN) as c:
        c.init()
        c.start()
        c.veilctl("apply", "-f", str(EXAMPLE_SPEC), "-m", "baseline", check=True)
        yield c


@pytest.fixture
def fresh_controller(tmp_path: Path) -> Iterator[ControllerProcess]:
    """A controller of its own, for tests that stop it and look at (or tamper with) its files."""
    with ControllerProcess(tmp_path / "fresh", trust_domain=TRUST_DOMAIN) as c:
        c.init()
        c.start()
        yield c


class RecordingCA(CertificateAuthority):
    """The controller's own CA, loaded in this process to mint test certificates (any role, any validity).

    The controller accepts only operator certificates its store recorded, so the operator certificates minted
    here are recorded in its database, exactly as ``veilnet-controller operator-cert`` does.
    """

    db: Path

    def issue_operator(self, name: str, role: str, lifetime: timedelta, *, not_before: datetime | None = None,
                       not_after: datetime | None = None) -> tuple[bytes, bytes]:
        key, cert = super().issue_operator(name, role, lifetime, not_before=not_before, not_after=not_after)
        record_operator(self.db, cert)
        return key, cert


def record_operator(db: Path, cert: bytes) -> None:
    who = pki.identity_from_certificate(cert)
    store = SQLiteStore(db)
    try:
        store.record_operator_certificate(who.name, who.role, who.serial, who.not_after, "test")
    finally:
        store.close()


def recording_ca(c: ControllerProcess) -> RecordingCA:
    ca = RecordingCA.load(c.data / "ca")
    assert isinstance(ca, RecordingCA)
    ca.db = c.data / "controller.db"
    return ca


@pytest.fixture(scope="module")
def ca(controller: ControllerProcess) -> RecordingCA:
    return recording_ca(controller)


# --------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class Creds:
    key: bytes | None
    cert: bytes | None
    ca: bytes

    @classmethod
    def of_dir(cls, d: Path, key: str = "client.key", cert: str = "client.crt") -> Creds:
        return cls((d / key).read_bytes(), (d / cert).read_bytes(), (d / "ca.crt").read_bytes())


def node_creds(ca: CertificateAuthority, name: str, **window: datetime) -> Creds:
    key, cert = ca.issue_node(name, timedelta(hours=1), **window)
    return Creds(key, cert, ca.certificate_pem)


def operator_creds(ca: CertificateAuthority, name: str, role: str, **window: datetime) -> Creds:
    key, cert = ca.issue_operator(name, role, timedelta(hours=1), **window)
    return Creds(key, cert, ca.certificate_pem)


def role_creds(ca: CertificateAuthority, role: str, name: str) -> Creds:
    return node_creds(ca, name) if role == "node" else operator_creds(ca, name, role)


@contextlib.contextmanager
def channel(endpoint: str, creds: Creds) -> Iterator[grpc.Channel]:
    credentials = grpc.ssl_channel_credentials(creds.ca, creds.key, creds.cert)
    with grpc.secure_channel(endpoint, credentials) as ch:
        yield ch


def status_of(fn: Callable[..., Any], request: Any) -> tuple[grpc.StatusCode, str]:
    """The status a unary call ends with (OK or the error) and its details."""
    try:
        fn(request, timeout=CALL_TIMEOUT)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


class SyncStream:
    """A client Sync stream fed from a queue, so the test decides when each message goes out."""

    def __init__(self, ch: grpc.Channel) -> None:
        self._requests: queue.Queue[controller_pb2.AgentMessage | None] = queue.Queue()
        self.call = controller_pb2_grpc.ControllerStub(ch).Sync(iter(self._requests.get, None),
                                                                 timeout=STREAM_TIMEOUT)

    def send(self, message: controller_pb2.AgentMessage) -> None:
        self._requests.put(message)

    def hello(self, **fields: Any) -> None:
        self.send(controller_pb2.AgentMessage(hello=controller_pb2.Hello(agent_version="test", **fields)))

    def connected_as(self) -> str | None:
        """The node name the controller acknowledged in the initial metadata (None: the call ended first)."""
        return dict(self.call.initial_metadata() or ()).get("veilnet-node")

    def end_status(self) -> tuple[grpc.StatusCode, str]:
        """Read until the server ends the stream; its status and details."""
        with contextlib.suppress(grpc.RpcError):
            for _ in self.call:
                pass
        return self.call.code(), self.call.details() or ""

    def close(self) -> None:
        self._requests.put(None)
        self.call.cancel()


@contextlib.contextmanager
def sync_stream(ch: grpc.Channel) -> Iterator[SyncStream]:
    stream = SyncStream(ch)
    try:
        yield stream
    finally:
        stream.close()


def agent_config(workdir: Path, node: str) -> tuple[Path, Path]:
    """A minimal agent config for ``join`` in a new directory: (config path, identity directory)."""
    base = workdir / "agents" / f"{node}-{next(_counter)}"
    base.mkdir(parents=True)
    config = base / "agent.toml"
    config.write_text(
        f'node_name = "{node}"\nstate_dir = "{base / "state"}"\n'
        '[underlay]\ninterface = "lo"\naddress = "127.0.0.1"\n'
        f'[controller]\nlocal_socket = "{base / "agent.sock"}"\n'
    )
    return config, base / "state" / "identity"


def agent_join(c: ControllerProcess, node: str, token: str, ca_hash: str | None = None,
               ) -> tuple[subprocess.CompletedProcess[str], Path]:
    """``veilnet-agent join`` with the token on standard input."""
    config, identity = agent_config(c.workdir, node)
    res = subprocess.run(
        [_bin("veilnet-agent"), "join", "--config", str(config), "--controller", c.bootstrap_endpoint,
         "--token-file", "-", "--ca-hash", ca_hash or c.ca_hash],
        capture_output=True, text=True, timeout=60, input=token + "\n")
    return res, identity


def assert_join_refused(res: subprocess.CompletedProcess[str], identity: Path, *needles: str) -> None:
    assert res.returncode != 0, f"join unexpectedly succeeded: {res.stdout}"
    for needle in needles:
        assert needle in res.stderr, f"{needle!r} not in stderr: {res.stderr!r}"
    written = sorted(p.name for p in identity.iterdir()) if identity.exists() else []
    assert written == [], f"a refused join left identity files behind: {written}"


def token_with_expiry(c: ControllerProcess, node: str, ttl: int) -> tuple[str, datetime]:
    out = json.loads(c.veilctl("-o", "json", "token", "create", node, "--ttl", str(ttl), check=True).stdout)
    return str(out["token"]), datetime.fromisoformat(out["expires_at"].replace("Z", "+00:00"))


def current_spec(c: ControllerProcess) -> dict[str, Any]:
    return dict(json.loads(c.veilctl("-o", "json", "get", check=True).stdout))


def audit_entries(c: ControllerProcess) -> list[dict[str, Any]]:
    return list(json.loads(c.veilctl("-o", "json", "audit", "--limit", "10000", check=True).stdout)["entries"])


def admin_creds(c: ControllerProcess) -> Creds:
    return Creds.of_dir(c.operator("admin", "admin"))


def bootstrap_creds(c: ControllerProcess) -> Creds:
    """Server-authenticated TLS only, like a host that has no certificate yet."""
    return Creds(None, None, (c.data / "ca" / "ca.crt").read_bytes())


def wait_until(cond: Callable[[], Any], what: str, timeout: float = CALL_TIMEOUT) -> Any:
    """Poll ``cond`` until it is truthy (a condition, never a fixed sleep); TimeoutError names ``what``."""
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout} s")
        time.sleep(0.05)
    return value


def assert_still_serving(c: ControllerProcess) -> None:
    assert c.proc is not None and c.proc.poll() is None, f"controller died:\n{c.log_text()[-3000:]}"
    with channel(c.control_endpoint, admin_creds(c)) as ch:
        nodes = admin_pb2_grpc.AdminStub(ch).ListNodes(admin_pb2.ListNodesRequest(), timeout=CALL_TIMEOUT)
    assert nodes.current_revision >= 1


# --------------------------------------------------------------------------- 1. join


def test_join_with_valid_token_issues_identity(controller: ControllerProcess) -> None:
    c = controller
    res, identity = agent_join(c, "join-ok", c.token("join-ok"))
    assert res.returncode == 0, res.stderr
    assert f"joined as spiffe://{TRUST_DOMAIN}/node/join-ok" in res.stdout

    files = {name: identity / name for name in ("node.key", "node.crt", "ca.crt", "controller.json")}
    assert all(p.is_file() for p in files.values()), sorted(p.name for p in identity.iterdir())
    assert stat.S_IMODE(files["node.key"].stat().st_mode) == 0o600
    assert stat.S_IMODE(identity.stat().st_mode) == 0o700

    cert = pki.load_certificate(files["node.crt"].read_bytes())
    ca_cert = pki.load_certificate(files["ca.crt"].read_bytes())
    pki.verify_issued_by(cert, ca_cert)
    who = pki.identity_from_certificate(cert, TRUST_DOMAIN)
    assert who.spiffe_id == f"spiffe://{TRUST_DOMAIN}/node/join-ok"
    assert (who.kind, who.role) == ("node", "node")
    assert pki.ca_hash(files["ca.crt"].read_bytes()) == c.ca_hash
    assert json.loads(files["controller.json"].read_text())["control_endpoint"] == c.control_endpoint
    # The key the host generated belongs to the certificate it received.
    key = pki.load_private_key(files["node.key"])
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()

    node = c.nodes()["join-ok"]
    assert node["state"] == "disconnected"  # joined, no agent running
    assert node["certificate_expires"]


def test_join_refuses_reused_token(controller: ControllerProcess) -> None:
    c = controller
    token = c.token("join-reuse")
    first, _ = agent_join(c, "join-reuse", token)
    assert first.returncode == 0, first.stderr
    again, identity = agent_join(c, "join-reuse", token)
    assert_join_refused(again, identity, "PERMISSION_DENIED", "join token already used")
    assert any(e["action"] == "node.join-refused" and e["target"] == "join-reuse"
               and e["detail"]["reason"] == "join token already used" for e in audit_entries(c))


def test_join_refuses_expired_token(controller: ControllerProcess) -> None:
    c = controller
    token, expires = token_with_expiry(c, "join-expired", ttl=1)
    while datetime.now(UTC) <= expires + timedelta(milliseconds=200):
        time.sleep(0.1)
    res, identity = agent_join(c, "join-expired", token)
    assert_join_refused(res, identity, "PERMISSION_DENIED", "join token expired")
    assert "join-expired" not in c.nodes()


def test_join_refuses_token_issued_for_another_node(controller: ControllerProcess) -> None:
    c = controller
    token = c.token("join-victim")
    res, identity = agent_join(c, "join-thief", token)
    assert_join_refused(res, identity, "PERMISSION_DENIED", "join token was not issued for node 'join-thief'")
    assert "join-thief" not in c.nodes()
    # Presenting it for the wrong node did not spend it.
    ok, _ = agent_join(c, "join-victim", token)
    assert ok.returncode == 0, ok.stderr


def test_join_refuses_unknown_token(controller: ControllerProcess) -> None:
    c = controller
    res, identity = agent_join(c, "join-unknown", secrets.token_urlsafe(32))
    assert_join_refused(res, identity, "PERMISSION_DENIED", "unknown join token")
    assert "join-unknown" not in c.nodes()


def test_concurrent_joins_racing_for_one_token_let_exactly_one_win(controller: ControllerProcess) -> None:
    """Eight real Join RPCs with the same token, each with its own key, released at once by a barrier."""
    c = controller
    node, racers = f"join-race-{next(_counter)}", 8
    token = c.token(node)
    csrs = [pki.make_csr(pki.generate_private_key(), node) for _ in range(racers)]
    barrier = threading.Barrier(racers)
    results: list[tuple[grpc.StatusCode, str, bytes]] = [(grpc.StatusCode.UNKNOWN, "not run", b"")] * racers

    def race(i: int) -> None:
        with channel(c.bootstrap_endpoint, bootstrap_creds(c)) as ch:
            stub = controller_pb2_grpc.ControllerStub(ch)
            grpc.channel_ready_future(ch).result(timeout=CALL_TIMEOUT)  # connected before the start signal
            barrier.wait(timeout=CALL_TIMEOUT)
            try:
                resp = stub.Join(controller_pb2.JoinRequest(node_name=node, token=token, csr_pem=csrs[i]),
                                 timeout=CALL_TIMEOUT)
                results[i] = (grpc.StatusCode.OK, "", bytes(resp.certificate_pem))
            except grpc.RpcError as exc:
                results[i] = (exc.code(), exc.details() or "", b"")

    threads = [threading.Thread(target=race, args=(i,)) for i in range(racers)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(CALL_TIMEOUT * 2)
    codes = [code for code, _, _ in results]
    assert codes.count(grpc.StatusCode.OK) == 1, results
    assert all(code == grpc.StatusCode.PERMISSION_DENIED and "already used" in detail
               for code, detail, _ in results if code != grpc.StatusCode.OK), results
    winner = next(i for i, (code, _, _) in enumerate(results) if code == grpc.StatusCode.OK)
    cert = pki.load_certificate(results[winner][2])
    csr = x509.load_pem_x509_csr(csrs[winner])
    assert cert.public_key().public_bytes(*_SPKI) == csr.public_key().public_bytes(*_SPKI)  # the winner's own key
    joins = [e for e in audit_entries(c) if e["target"] == node]
    assert [e["action"] for e in joins].count("node.join") == 1, joins
    assert c.nodes()[node]["state"] == "disconnected"


def test_a_join_with_a_bad_csr_is_refused_and_does_not_spend_the_token(controller: ControllerProcess) -> None:
    c = controller
    node = f"join-badcsr-{next(_counter)}"
    token = c.token(node)
    weak = pki.make_csr(ec.generate_private_key(ec.SECP192R1()), node)  # a curve the CA does not accept
    with channel(c.bootstrap_endpoint, bootstrap_creds(c)) as ch:
        stub = controller_pb2_grpc.ControllerStub(ch)
        for csr in (b"-----BEGIN CERTIFICATE REQUEST-----\nnot a csr\n-----END CERTIFICATE REQUEST-----\n",
                    b"", weak):
            code, detail = status_of(stub.Join, controller_pb2.JoinRequest(node_name=node, token=token, csr_pem=csr))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "csr_pem" in detail, (csr[:40], code, detail)
    assert node not in c.nodes()
    res, identity = agent_join(c, node, token)  # the same token still works
    assert res.returncode == 0, res.stderr
    assert (identity / "node.crt").is_file()
    again, identity = agent_join(c, node, token)  # and is spent now: the refusals above really reached it
    assert_join_refused(again, identity, "PERMISSION_DENIED", "join token already used")


def test_join_with_wrong_ca_hash_is_refused_before_the_token_is_sent(controller: ControllerProcess) -> None:
    c = controller
    token = c.token("join-pin")
    wrong = "sha256:" + ("0" if c.ca_hash[-1] != "0" else "1") * 64
    before = len(audit_entries(c))
    res, identity = agent_join(c, "join-pin", token, ca_hash=wrong)
    assert_join_refused(res, identity, f"does not present a CA with hash {wrong}", "refusing to send the token")
    # The controller never saw a Join: no refusal audited, and the token is still good with the right pin.
    assert [e for e in audit_entries(c)[before:] if e["target"] == "join-pin"] == []
    ok, identity = agent_join(c, "join-pin", token)
    assert ok.returncode == 0, ok.stderr
    assert (identity / "node.crt").is_file()


@pytest.mark.parametrize("bad_hash", ["sha256:xyz", "md5:" + "0" * 32, "0" * 64, "sha256:" + "A" * 64])
def test_join_refuses_malformed_ca_hash(controller: ControllerProcess, bad_hash: str) -> None:
    c = controller
    token = c.token("join-badpin")
    res, identity = agent_join(c, "join-badpin", token, ca_hash=bad_hash)
    assert_join_refused(res, identity, "--ca-hash", "must be sha256: followed by 64 lowercase hex digits")
    assert res.returncode == 2
    assert "join-badpin" not in c.nodes()


@contextlib.contextmanager
def silent_listener() -> Iterator[socket.socket]:
    """A TCP listener that accepts and never answers: a controller that is slow to answer."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(CALL_TIMEOUT)
    try:
        yield listener
    finally:
        listener.close()


def process_texts(pid: int) -> dict[str, bytes]:
    """Everything another local user can read about a process's arguments and environment (every thread)."""
    texts = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        for name in ("cmdline", "environ", "comm"):
            with contextlib.suppress(OSError):
                texts[f"{task.name}/{name}"] = (task / name).read_bytes()
    return texts


@pytest.mark.parametrize("via", ["file", "stdin"])
def test_the_join_token_never_appears_in_the_join_process_command_line(controller: ControllerProcess,
                                                                       tmp_path: Path, via: str) -> None:
    """Watch the real join process while it waits for a controller that does not answer."""
    c = controller
    token = c.token("argv-watch")
    config, identity = agent_config(c.workdir, "argv-watch")
    if via == "file":
        token_file = tmp_path / "token"
        token_file.write_text(token + "\n")
        token_file.chmod(0o600)
        source, stdin = str(token_file), subprocess.DEVNULL
    else:
        source, stdin = "-", subprocess.PIPE
    with silent_listener() as listener:
        endpoint = f"127.0.0.1:{listener.getsockname()[1]}"
        proc = subprocess.Popen([_bin("veilnet-agent"), "join", "--config", str(config), "--controller", endpoint,
                                 "--token-file", source, "--ca-hash", c.ca_hash],
                                stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        try:
            if proc.stdin is not None:
                proc.stdin.write(token.encode() + b"\n")
                proc.stdin.close()
            conn, _ = listener.accept()  # it has read the token and is dialling: the moment it is most exposed
            with conn:
                assert proc.poll() is None
                texts = process_texts(proc.pid)
                assert b"--token-file\0" + source.encode() in texts[f"{proc.pid}/cmdline"]  # the right process
                leaked = [where for where, text in texts.items() if token.encode() in text]
                assert leaked == [], f"the token is readable in /proc/{proc.pid}: {leaked}"
        finally:
            stop_process_group(proc)
            if proc.stdout is not None:
                proc.stdout.close()
            if proc.stderr is not None:
                proc.stderr.close()
    assert not identity.exists() or not any(identity.iterdir())
    ok, _ = agent_join(c, "argv-watch", token)  # it never reached a controller: still unused
    assert ok.returncode == 0, ok.stderr


def test_a_token_on_the_command_line_is_refused_and_not_spent(controller: ControllerProcess) -> None:
    c = controller
    token = c.token("argv-refused")
    config, identity = agent_config(c.workdir, "argv-refused")
    res = subprocess.run([_bin("veilnet-agent"), "join", "--config", str(config), "--controller",
                          c.bootstrap_endpoint, "--token", token, "--ca-hash", c.ca_hash],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, res
    assert "--token: is not accepted" in res.stderr and "--token-file" in res.stderr, res.stderr
    assert token not in res.stderr + res.stdout  # the refusal does not repeat the secret
    assert not identity.exists()
    ok, _ = agent_join(c, "argv-refused", token)
    assert ok.returncode == 0, ok.stderr


def test_a_token_file_others_can_read_is_warned_about(controller: ControllerProcess, tmp_path: Path) -> None:
    c = controller
    results = {}
    for mode in (0o640, 0o600):
        node = f"perm-{mode:o}"
        token_file = tmp_path / node
        token = c.token(node)
        token_file.write_text(token + "\n")
        token_file.chmod(mode)
        config, _ = agent_config(c.workdir, node)
        res = subprocess.run([_bin("veilnet-agent"), "join", "--config", str(config), "--controller",
                              c.bootstrap_endpoint, "--token-file", str(token_file), "--ca-hash", c.ca_hash],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        assert token not in res.stderr + res.stdout
        results[mode] = res.stderr
    assert "warning:" in results[0o640] and "accessible by group or others (mode 0640)" in results[0o640]
    assert "chmod 600" in results[0o640]
    assert "warning" not in results[0o600]


# --------------------------------------------------------------------------- 2. certificates on the control listener


def _list_nodes(c: ControllerProcess, creds: Creds) -> tuple[grpc.StatusCode, str]:
    with channel(c.control_endpoint, creds) as ch:
        return status_of(admin_pb2_grpc.AdminStub(ch).ListNodes, admin_pb2.ListNodesRequest())


def _renew(c: ControllerProcess, creds: Creds) -> tuple[grpc.StatusCode, str]:
    csr = pki.make_csr(pki.generate_private_key(), "x")
    with channel(c.control_endpoint, creds) as ch:
        return status_of(controller_pb2_grpc.ControllerStub(ch).Renew, controller_pb2.RenewRequest(csr_pem=csr))


def test_certificate_from_foreign_ca_is_refused(controller: ControllerProcess, ca: CertificateAuthority,
                                                tmp_path: Path) -> None:
    c = controller
    foreign = CertificateAuthority.create(tmp_path / "foreign-ca", TRUST_DOMAIN)  # same trust domain, other key
    real_root = ca.certificate_pem
    f_key, f_cert = foreign.issue_operator("admin", "admin", timedelta(hours=1))
    n_key, n_cert = foreign.issue_node("host-a", timedelta(hours=1))
    # Control: the same kind of credential from the real CA is accepted.
    assert _list_nodes(c, operator_creds(ca, "admin", "admin"))[0] == grpc.StatusCode.OK
    assert _list_nodes(c, Creds(f_key, f_cert, real_root))[0] == grpc.StatusCode.UNAVAILABLE
    assert _renew(c, Creds(n_key, n_cert, real_root))[0] == grpc.StatusCode.UNAVAILABLE
    assert_still_serving(c)


def test_expired_certificates_are_refused(controller: ControllerProcess, ca: CertificateAuthority) -> None:
    c = controller
    now = datetime.now(UTC)
    past = {"not_before": now - timedelta(hours=2), "not_after": now - timedelta(hours=1)}
    future = {"not_before": now + timedelta(hours=1), "not_after": now + timedelta(hours=2)}
    assert _renew(c, node_creds(ca, "cert-valid"))[0] == grpc.StatusCode.OK  # control
    assert _renew(c, node_creds(ca, "cert-expired", **past))[0] == grpc.StatusCode.UNAVAILABLE
    assert _list_nodes(c, operator_creds(ca, "expired-op", "admin", **past))[0] == grpc.StatusCode.UNAVAILABLE
    assert _list_nodes(c, operator_creds(ca, "future-op", "admin", **future))[0] == grpc.StatusCode.UNAVAILABLE
    assert_still_serving(c)


def short_lived(seconds: float) -> dict[str, datetime]:
    """A validity window that is open now and closes ``seconds`` from now."""
    now = datetime.now(UTC)
    return {"not_before": now - timedelta(minutes=1), "not_after": now + timedelta(seconds=seconds)}


def wait_past(moment: datetime) -> None:
    """Wait (on the clock, not a fixed sleep) until ``moment`` is in the past."""
    while datetime.now(UTC) <= moment + timedelta(milliseconds=50):
        time.sleep(0.05)


def log_offset(c: ControllerProcess) -> int:
    return c.log_path.stat().st_size


def wait_for_event(c: ControllerProcess, since: int, event: str, **fields: Any) -> dict[str, Any]:
    def found() -> dict[str, Any] | None:
        return next((e for e in c.events(since) if e.get("event") == event
                     and all(e.get(k) == v for k, v in fields.items())), None)
    return dict(wait_until(found, f"controller logged {event} {fields}"))


def test_an_expired_certificate_is_refused_on_a_connection_opened_while_it_was_valid(
        controller: ControllerProcess, ca: CertificateAuthority) -> None:
    """TLS checked the dates once, at the handshake; every later call on that connection is checked again."""
    c = controller
    window = short_lived(4)
    admin = operator_creds(ca, "exp-admin", "admin", **window)
    node = node_creds(ca, "exp-node", **window)
    with channel(c.control_endpoint, admin) as admin_ch, channel(c.control_endpoint, node) as node_ch:
        stub = admin_pb2_grpc.AdminStub(admin_ch)
        renew = controller_pb2_grpc.ControllerStub(node_ch).Renew
        token_request = admin_pb2.CreateJoinTokenRequest(node_name="exp-target", ttl_seconds=60)
        renew_request = controller_pb2.RenewRequest(csr_pem=pki.make_csr(pki.generate_private_key(), "exp-node"))
        assert status_of(stub.CreateJoinToken, token_request)[0] == grpc.StatusCode.OK  # control: works while valid
        assert status_of(renew, renew_request)[0] == grpc.StatusCode.OK
        wait_past(window["not_after"])
        # Same channels, same TLS connections (a new handshake would fail as UNAVAILABLE, not UNAUTHENTICATED).
        for call, request in ((stub.CreateJoinToken, token_request), (stub.ListNodes, admin_pb2.ListNodesRequest()),
                              (renew, renew_request)):
            code, details = status_of(call, request)
            assert code == grpc.StatusCode.UNAUTHENTICATED and "expired at" in details, (code, details)
    entries = audit_entries(c)
    made = [e for e in entries if e["action"] == "token.create" and e["actor"] == "exp-admin"]
    assert len(made) == 1  # only the call made while the certificate was valid
    # The refusals are on the record, once per certificate and kind (not once per redial).
    refused = [(e["actor"], e["actor_serial"], e["detail"]["kind"]) for e in entries if e["action"] == "refused"
               and e["actor"] in ("exp-admin", "exp-node")]
    assert sorted(refused) == [("exp-admin", serial_of(admin.cert), "expired"),
                               ("exp-node", serial_of(node.cert), "expired")]
    assert_still_serving(c)


def test_a_sync_stream_ends_when_its_certificate_expires(controller: ControllerProcess,
                                                         ca: CertificateAuthority) -> None:
    """A timer at not_after ends the stream: the agent sends nothing after its hello, and is still cut off."""
    c = controller
    creds = node_creds(ca, "exp-stream", **short_lived(3))
    not_after = pki.identity_from_certificate(creds.cert or b"").not_after  # whole seconds, as X.509 has it
    with channel(c.control_endpoint, creds) as ch, sync_stream(ch) as stream:
        stream.hello(wireguard_public_key=_wg_key("exp-stream"))
        assert stream.connected_as() == "exp-stream"
        code, details = stream.end_status()  # DEADLINE_EXCEEDED (30 s) here: the stream outlived its certificate
        ended = datetime.now(UTC)
    assert code == grpc.StatusCode.UNAUTHENTICATED and "expired at" in details, (code, details)
    assert ended > not_after
    assert c.nodes()["exp-stream"]["state"] != "connected"


def test_a_node_revoked_between_opening_its_stream_and_its_hello_gets_no_session(
        controller: ControllerProcess) -> None:
    """Deterministic: the stream is open and authenticated (the controller says so), then revoked, then hello."""
    c = controller
    res, identity = agent_join(c, "rev-race", c.token("rev-race"))
    assert res.returncode == 0, res.stderr
    creds = Creds.of_dir(identity, key="node.key", cert="node.crt")
    serial = pki.identity_from_certificate(creds.cert or b"").serial
    since = log_offset(c)
    with channel(c.control_endpoint, creds) as ch, sync_stream(ch) as stream:
        wait_for_event(c, since, "sync_opened", node="rev-race", serial=serial)  # past authentication, no hello
        revoke = c.veilctl("revoke", "rev-race", "--reason", "race")
        assert revoke.returncode == 0, revoke.stderr
        stream.hello(wireguard_public_key=_wg_key("rev-race"))
        code, details = stream.end_status()
        assert stream.connected_as() is None  # never accepted: no initial metadata, no snapshot
    assert code == grpc.StatusCode.UNAUTHENTICATED and "revoked" in details, (code, details)
    node = c.nodes()["rev-race"]
    assert node["state"] == "revoked" and node["wireguard_public_key"] == "", node  # its key was never stored


def test_client_without_certificate_is_refused(controller: ControllerProcess) -> None:
    c = controller
    no_cert = bootstrap_creds(c)
    assert _list_nodes(c, no_cert)[0] == grpc.StatusCode.UNAVAILABLE
    assert _renew(c, no_cert)[0] == grpc.StatusCode.UNAVAILABLE
    with channel(c.control_endpoint, no_cert) as ch, sync_stream(ch) as stream:
        stream.hello()
        assert stream.end_status()[0] == grpc.StatusCode.UNAVAILABLE
    assert_still_serving(c)


def test_revocation_ends_open_stream_and_refuses_the_certificate(controller: ControllerProcess) -> None:
    c = controller
    res, identity = agent_join(c, "rev-node", c.token("rev-node"))
    assert res.returncode == 0, res.stderr
    creds = Creds.of_dir(identity, key="node.key", cert="node.crt")
    with channel(c.control_endpoint, creds) as ch, sync_stream(ch) as stream:
        stream.hello()
        assert stream.connected_as() == "rev-node"
        assert c.nodes()["rev-node"]["state"] == "connected"

        revoke = c.veilctl("revoke", "rev-node", "--reason", "test")
        assert revoke.returncode == 0, revoke.stderr
        assert "disconnected" in revoke.stdout  # the controller saw the stream open when it revoked

        code, details = stream.end_status()  # DEADLINE_EXCEEDED here would mean the stream was left open
        assert code == grpc.StatusCode.UNAUTHENTICATED, (code, details)
        assert "revoked" in details

        # The same connection, still open: refused at the next call.
        code, details = status_of(controller_pb2_grpc.ControllerStub(ch).Renew, controller_pb2.RenewRequest(
            csr_pem=pki.make_csr(pki.generate_private_key(), "rev-node")))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "revoked" in details, (code, details)

    code, details = _renew(c, creds)
    assert code == grpc.StatusCode.UNAUTHENTICATED and "revoked" in details, (code, details)
    with channel(c.control_endpoint, creds) as ch, sync_stream(ch) as stream:
        stream.hello()
        code, details = stream.end_status()
    assert code == grpc.StatusCode.UNAUTHENTICATED and "revoked" in details, (code, details)
    assert c.nodes()["rev-node"]["state"] == "revoked"


def serial_of(cert_pem: bytes | None) -> str:
    return pki.identity_from_certificate(cert_pem or b"").serial


def files_under(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*") if p.is_file() and not p.is_symlink()]


def test_renewal_retires_the_replaced_certificate_after_the_grace_and_its_key_leaves_the_disk(
        tmp_path: Path) -> None:
    """The agent's own renew(): the new pair goes live, the old key is deleted, the old certificate keeps an
    open stream only for the grace period (3 s here) and is refused after it, on every connection."""
    with ControllerProcess(tmp_path / "grace", trust_domain=TRUST_DOMAIN,
                           serve_args=("--renewal-grace", "3s")).init() as c:
        c.start()
        res, identity_dir = agent_join(c, "renew-me", c.token("renew-me"))
        assert res.returncode == 0, res.stderr
        files = IdentityFiles(identity_dir)
        old = Creds.of_dir(identity_dir, key="node.key", cert="node.crt")  # in memory: what a thief would keep
        old_serial = serial_of(old.cert)
        old_generation = Path(os.path.realpath(identity_dir / "current"))
        with channel(c.control_endpoint, old) as old_ch, sync_stream(old_ch) as old_stream:
            old_stream.hello()
            assert old_stream.connected_as() == "renew-me"
            with grpc.secure_channel(c.control_endpoint, files.channel_credentials()) as renew_ch:
                new = renew(files, renew_ch)
            assert new.serial != old_serial and files.certificate().serial == new.serial
            assert not old_generation.exists(), sorted(p.name for p in identity_dir.iterdir())
            assert all(old.key not in p.read_bytes() for p in files_under(identity_dir)), "the old key is on disk"

            (entry,) = [e for e in audit_entries(c) if e["action"] == "node.renew"]
            assert (entry["actor"], entry["detail"]["renewed_with"], entry["detail"]["serial"]) == (
                "renew-me", old_serial, new.serial)
            retire_at = datetime.fromisoformat(entry["detail"]["retires"][old_serial].replace("Z", "+00:00"))
            code, details = old_stream.end_status()  # the stream survives the grace, then the timer ends it
            ended = datetime.now(UTC)
        assert code == grpc.StatusCode.UNAUTHENTICATED and "replaced by a renewal" in details, (code, details)
        assert ended >= retire_at
        code, details = _renew(c, old)
        assert code == grpc.StatusCode.UNAUTHENTICATED and f"{old_serial} of" in details and "retired at" in details
        with channel(c.control_endpoint, Creds.of_dir(identity_dir, key="node.key", cert="node.crt")) as ch, \
                sync_stream(ch) as stream:
            stream.hello()
            assert stream.connected_as() == "renew-me"  # the new pair works
        c.stop()
        db = sqlite3.connect(c.data / "controller.db")
        try:
            rows = dict(db.execute("SELECT serial, retire_at FROM certificates WHERE node = 'renew-me'").fetchall())
        finally:
            db.close()
        assert rows[new.serial] is None and rows[old_serial] is not None  # retirement survives a restart


def test_a_revoked_operator_is_refused_on_open_and_new_connections(controller: ControllerProcess) -> None:
    c = controller
    bob_dir = c.operator("ops-bob", "admin")  # offline operator-cert: recorded (and audited) in the store
    bob = Creds.of_dir(bob_dir)
    issued = [e for e in audit_entries(c) if e["action"] == "operator.issue" and e["target"] == "ops-bob"]
    assert issued and issued[-1]["detail"]["serial"] == serial_of(bob.cert) and issued[-1]["role"] == "local"
    netadmin = c.operator("ops-net", "network-admin")
    with channel(c.control_endpoint, bob) as ch:
        stub = admin_pb2_grpc.AdminStub(ch)
        assert status_of(stub.ListNodes, admin_pb2.ListNodesRequest())[0] == grpc.StatusCode.OK

        denied = c.veilctl("revoke", "--operator", "ops-bob", credentials=netadmin)
        assert denied.returncode == 3 and "'network-admin' may not call RevokeOperator" in denied.stderr, denied
        res = c.veilctl("revoke", "--operator", "ops-bob", "--reason", "left the team")
        assert res.returncode == 0 and "revoked operator ops-bob: 1 certificate(s)" in res.stdout, res

        # The connection bob opened before is still open: refused at its next call.
        for call, request in ((stub.ListNodes, admin_pb2.ListNodesRequest()),
                              (stub.CreateJoinToken, admin_pb2.CreateJoinTokenRequest(node_name="x"))):
            code, details = status_of(call, request)
            assert code == grpc.StatusCode.UNAUTHENTICATED and "is revoked" in details, (code, details)
    assert _list_nodes(c, bob) == (grpc.StatusCode.UNAUTHENTICATED,
                                   f"certificate {serial_of(bob.cert)} of spiffe://{TRUST_DOMAIN}/operator/ops-bob "
                                   "is revoked")
    again = c.veilctl("nodes", credentials=bob_dir)
    assert again.returncode == 3 and "is revoked" in again.stderr
    (entry,) = [e for e in audit_entries(c) if e["action"] == "operator.revoke" and e["target"] == "ops-bob"]
    assert (entry["actor"], entry["role"], entry["detail"]) == (
        "admin", "admin", {"reason": "left the team", "serials": [serial_of(bob.cert)]})
    assert c.veilctl("revoke", "--operator", "ops-nobody").returncode == 4
    # Issued again later, the name works again (with the new certificate only).
    fresh = Creds.of_dir(c.operator("ops-bob", "admin"))
    assert _list_nodes(c, fresh)[0] == grpc.StatusCode.OK
    assert _list_nodes(c, bob)[0] == grpc.StatusCode.UNAUTHENTICATED


def test_an_operator_certificate_the_controller_never_recorded_is_refused(controller: ControllerProcess) -> None:
    """Signed by the real CA, in its validity, right role: still refused, because the store did not issue it."""
    c = controller
    unrecorded = CertificateAuthority.load(c.data / "ca")  # plain CA: mints without recording
    key, cert = unrecorded.issue_operator("ghost", "admin", timedelta(hours=1))
    code, details = _list_nodes(c, Creds(key, cert, unrecorded.certificate_pem))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "not one this controller recorded issuing" in details, details
    record_operator(c.data / "controller.db", cert)  # what operator-cert does
    assert _list_nodes(c, Creds(key, cert, unrecorded.certificate_pem))[0] == grpc.StatusCode.OK


# --------------------------------------------------------------------------- 3. authorization matrix


def _call_method(ch: grpc.Channel, method: str, node_name: str) -> tuple[grpc.StatusCode, str]:
    """Call ``method`` with a minimal, valid-ish request; Sync counts as OK once the controller says connected."""
    if method == SYNC_METHOD:
        with sync_stream(ch) as stream:
            stream.hello()
            if stream.connected_as() == node_name:
                return grpc.StatusCode.OK, ""
            return stream.end_status()
    csr = pki.make_csr(pki.generate_private_key(), node_name)
    spec = EXAMPLE_SPEC.read_text()
    admin = admin_pb2_grpc.AdminStub(ch)
    ctl = controller_pb2_grpc.ControllerStub(ch)
    calls: dict[str, tuple[Callable[..., Any], Any]] = {
        JOIN_METHOD: (ctl.Join, controller_pb2.JoinRequest(node_name=node_name, token="x" * 43, csr_pem=csr)),
        "/veilnet.v1.Controller/Renew": (ctl.Renew, controller_pb2.RenewRequest(csr_pem=csr)),
        "/veilnet.v1.Admin/GetSpec": (admin.GetSpec, admin_pb2.GetSpecRequest()),
        "/veilnet.v1.Admin/History": (admin.History, admin_pb2.HistoryRequest(limit=5)),
        "/veilnet.v1.Admin/DiffSpec": (admin.DiffSpec, admin_pb2.DiffSpecRequest(spec_yaml=spec)),
        "/veilnet.v1.Admin/ListNodes": (admin.ListNodes, admin_pb2.ListNodesRequest()),
        "/veilnet.v1.Admin/ReadAudit": (admin.ReadAudit, admin_pb2.ReadAuditRequest(limit=1)),
        # The baseline again: unchanged, so an allowed call leaves the revision alone.
        "/veilnet.v1.Admin/ApplySpec": (admin.ApplySpec, admin_pb2.ApplySpecRequest(spec_yaml=spec, message="mx")),
        "/veilnet.v1.Admin/Rollback": (admin.Rollback, admin_pb2.RollbackRequest(revision=1, message="mx")),
        "/veilnet.v1.Admin/CreateJoinToken": (admin.CreateJoinToken,
                                              admin_pb2.CreateJoinTokenRequest(node_name="mx-target", ttl_seconds=60)),
        "/veilnet.v1.Admin/RevokeNode": (admin.RevokeNode, admin_pb2.RevokeNodeRequest(node_name="mx-never-joined")),
        "/veilnet.v1.Admin/RevokeOperator": (admin.RevokeOperator,
                                             admin_pb2.RevokeOperatorRequest(name="mx-never-issued")),
        "/veilnet.v1.Admin/SendCommand": (admin.SendCommand,
                                          admin_pb2.SendCommandRequest(node_name="mx-never-joined", command="resync")),
    }
    fn, request = calls[method]
    return status_of(fn, request)


def test_authorization_matrix_over_every_rpc(controller: ControllerProcess, ca: CertificateAuthority) -> None:
    c = controller
    methods = [*authz.MATRIX, JOIN_METHOD]
    # Every RPC the services define is covered (a new one must be added to MATRIX, or it is refused for all).
    defined = {f"/veilnet.v1.{svc.name}/{m.name}"
               for svc in (admin_pb2.DESCRIPTOR.services_by_name["Admin"],
                           controller_pb2.DESCRIPTOR.services_by_name["Controller"]) for m in svc.methods}
    assert defined == set(methods)
    revision_before = current_spec(c)["revision"]
    audit_before = len(audit_entries(c))

    results: dict[tuple[str, str], tuple[grpc.StatusCode, str]] = {}
    for role in authz.ALL_ROLES:
        name = f"mx-{role}"
        with channel(c.control_endpoint, role_creds(ca, role, name)) as ch:
            for method in methods:
                results[method, role] = _call_method(ch, method, name)

    wrong = []
    for (method, role), (code, details) in results.items():
        if authz.allowed(method, role):
            if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
                wrong.append(f"{role} -> {method}: {code.name} {details!r}, but the matrix allows it")
        elif code != grpc.StatusCode.PERMISSION_DENIED:
            wrong.append(f"{role} -> {method}: {code.name} {details!r}, want PERMISSION_DENIED")
        elif f"role {role!r}" not in details:
            wrong.append(f"{role} -> {method}: denial does not name the role: {details!r}")
    assert wrong == [], "\n".join(wrong)
    # Something was actually allowed, and it did work (not merely "not denied").
    assert results[SYNC_METHOD, "node"][0] == grpc.StatusCode.OK
    assert results["/veilnet.v1.Admin/CreateJoinToken", "admin"][0] == grpc.StatusCode.OK
    assert results["/veilnet.v1.Admin/RevokeNode", "admin"][0] == grpc.StatusCode.NOT_FOUND
    assert results["/veilnet.v1.Admin/RevokeOperator", "admin"][0] == grpc.StatusCode.NOT_FOUND
    assert results["/veilnet.v1.Admin/SendCommand", "network-admin"][0] == grpc.StatusCode.NOT_FOUND
    assert current_spec(c)["revision"] == revision_before

    # Every denied call outside the read-only ones is in the audit log, attributed to the caller.
    denied = {(e["actor"], e["role"], e["target"]) for e in audit_entries(c)[audit_before:]
              if e["action"] == "denied"}
    want = {(f"mx-{role}", role, method) for (method, role) in results
            if not authz.allowed(method, role) and method not in READ_ONLY}
    assert want - denied == set()
    assert {t for t in denied if t[2] in READ_ONLY} == set()


def test_viewer_cannot_apply(controller: ControllerProcess, tmp_path: Path) -> None:
    c = controller
    before = current_spec(c)
    raw = yaml.safe_load(EXAMPLE_SPEC.read_text())
    raw["segments"][1]["vni"] = 201  # a real change: an allowed apply would make a new revision
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(raw))
    viewer = c.operator("view-op", "viewer")
    audit_before = len(audit_entries(c))

    res = c.veilctl("apply", "-f", str(changed), "-m", "viewer try", credentials=viewer)
    assert res.returncode == 3, (res.returncode, res.stderr)
    assert "permission_denied" in res.stderr and "'viewer'" in res.stderr, res.stderr

    after = current_spec(c)
    assert (after["revision"], after["spec_yaml"]) == (before["revision"], before["spec_yaml"])
    assert [(e["actor"], e["role"], e["action"], e["target"]) for e in audit_entries(c)[audit_before:]] == [
        ("view-op", "viewer", "denied", "/veilnet.v1.Admin/ApplySpec")]
    # The refusal was about the role, not the file: the viewer may read, and the file is a valid change.
    diff = c.veilctl("diff", "-f", str(changed), credentials=viewer)
    assert diff.returncode == 1 and "201" in diff.stdout, (diff.returncode, diff.stdout, diff.stderr)


# --------------------------------------------------------------------------- 4. malformed and oversized input


def test_garbage_bytes_to_every_unary_method(controller: ControllerProcess) -> None:
    c = controller
    admin_methods = [f"/veilnet.v1.Admin/{m.name}" for m in admin_pb2.DESCRIPTOR.services_by_name["Admin"].methods]
    assert all(not m.client_streaming and not m.server_streaming
               for m in admin_pb2.DESCRIPTOR.services_by_name["Admin"].methods)
    codes = {}
    with channel(c.control_endpoint, admin_creds(c)) as ch:
        for method in [*admin_methods, "/veilnet.v1.Controller/Renew"]:
            codes[method] = status_of(ch.unary_unary(method), GARBAGE)[0]
    with channel(c.bootstrap_endpoint, bootstrap_creds(c)) as ch:
        codes["bootstrap " + JOIN_METHOD] = status_of(ch.unary_unary(JOIN_METHOD), GARBAGE)[0]
    # gRPC reports an undecodable request as UNKNOWN ("DecodeError"); what matters is an error, not a crash.
    errors = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT)
    bad = {m: code.name for m, code in codes.items() if code not in errors}
    assert bad == {}, bad
    assert_still_serving(c)


def test_oversized_join_is_refused(controller: ControllerProcess) -> None:
    c = controller
    token = c.token("big-join")
    request = controller_pb2.JoinRequest(node_name="big-join", token=token, csr_pem=b"x" * (65 * KIB))
    with channel(c.bootstrap_endpoint, bootstrap_creds(c)) as ch:
        code, _ = status_of(controller_pb2_grpc.ControllerStub(ch).Join, request)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert_still_serving(c)
    ok, _ = agent_join(c, "big-join", token)  # refused before the handler: the token was not touched
    assert ok.returncode == 0, ok.stderr


def test_oversized_and_too_large_specs(controller: ControllerProcess) -> None:
    c = controller
    before = current_spec(c)
    with channel(c.control_endpoint, admin_creds(c)) as ch:
        apply = admin_pb2_grpc.AdminStub(ch).ApplySpec
        code, _ = status_of(apply, admin_pb2.ApplySpecRequest(spec_yaml="#" + "x" * (17 * MIB)))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        code, details = status_of(apply, admin_pb2.ApplySpecRequest(spec_yaml="# " + "x" * (9 * MIB) + "\n"))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "spec" in details and "larger than" in details, details
    after = current_spec(c)
    assert (after["revision"], after["spec_yaml"]) == (before["revision"], before["spec_yaml"])
    assert_still_serving(c)


def _mutated(mutate: Callable[[dict[str, Any]], None]) -> str:
    raw = yaml.safe_load(EXAMPLE_SPEC.read_text())
    mutate(raw)
    return yaml.safe_dump(raw)


@pytest.mark.parametrize(("mutate", "field", "reason"), [
    (lambda raw: raw["segments"][1].__setitem__("vni", 100), "segments[1].vni", "duplicate VNI"),
    (lambda raw: raw["endpoints"][0].__setitem__("ipv4", "10.9.9.9"), "endpoints[0].ipv4", "outside the subnet"),
], ids=["duplicate-vni", "ip-outside-subnet"])
def test_invalid_spec_names_the_field(controller: ControllerProcess, tmp_path: Path,
                                      mutate: Callable[[dict[str, Any]], None], field: str, reason: str) -> None:
    c = controller
    before = current_spec(c)
    text = _mutated(mutate)
    with channel(c.control_endpoint, admin_creds(c)) as ch:
        code, details = status_of(admin_pb2_grpc.AdminStub(ch).ApplySpec,
                                  admin_pb2.ApplySpecRequest(spec_yaml=text, message="bad"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith(f"{field}: ") and reason in details, details
    # veilctl reports it as invalid input (exit 2) naming the field.
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    res = c.veilctl("apply", "-f", str(path))
    assert res.returncode == 2 and field in res.stderr, (res.returncode, res.stderr)
    after = current_spec(c)
    assert (after["revision"], after["spec_yaml"]) == (before["revision"], before["spec_yaml"])


def test_sync_protocol_violations(controller: ControllerProcess, ca: CertificateAuthority) -> None:
    c = controller
    # First message is not a hello.
    with channel(c.control_endpoint, node_creds(ca, "proto-1")) as ch, sync_stream(ch) as stream:
        stream.send(controller_pb2.AgentMessage(ack=controller_pb2.Ack(sequence=1, ok=True)))
        code, details = stream.end_status()
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "first message on Sync must be hello" in details

    # A hello with a WireGuard key that is not one.
    with channel(c.control_endpoint, node_creds(ca, "proto-2")) as ch, sync_stream(ch) as stream:
        stream.hello(wireguard_public_key="not-a-key")
        code, details = stream.end_status()
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "hello.wireguard_public_key" in details, details
    assert "proto-2" not in c.nodes()  # nothing of it was recorded

    # A second hello after the first: the stream is open, then ends.
    with channel(c.control_endpoint, node_creds(ca, "proto-3")) as ch, sync_stream(ch) as stream:
        stream.hello()
        assert stream.connected_as() == "proto-3"
        stream.hello()
        code, details = stream.end_status()
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "unexpected message 'hello' after hello" in details, details

    # An empty message after hello.
    with channel(c.control_endpoint, node_creds(ca, "proto-4")) as ch, sync_stream(ch) as stream:
        stream.hello()
        assert stream.connected_as() == "proto-4"
        stream.send(controller_pb2.AgentMessage())
        code, details = stream.end_status()
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "unexpected message 'empty'" in details, details
    assert_still_serving(c)


def _wg_key(seed: str) -> str:
    import base64
    import hashlib

    return base64.b64encode(hashlib.sha256(seed.encode()).digest()).decode()


def _stored_key(c: ControllerProcess, node: str) -> str | None:
    return c.nodes().get(node, {}).get("wireguard_public_key")


def test_another_nodes_key_with_a_trailing_newline_is_refused_and_never_stored(
        controller: ControllerProcess, ca: CertificateAuthority) -> None:
    """Uniqueness is checked on the canonical key: "K\n" is K, so it is another node's key (or no key at all)."""
    c = controller
    owner_key = _wg_key("canon-owner")
    with channel(c.control_endpoint, node_creds(ca, "canon-owner")) as ch, sync_stream(ch) as owner:
        owner.hello(wireguard_public_key=owner_key)
        assert owner.connected_as() == "canon-owner"
        wait_until(lambda: _stored_key(c, "canon-owner") == owner_key, "the owner's key is registered")

        # In a hello.
        with channel(c.control_endpoint, node_creds(ca, "canon-thief")) as ch2, sync_stream(ch2) as thief:
            thief.hello(wireguard_public_key=owner_key + "\n")
            code, details = thief.end_status()
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
        assert "hello.wireguard_public_key" in details, details
        assert _stored_key(c, "canon-thief") is None

        # In a key_update after a good hello.
        thief_key = _wg_key("canon-thief-2")
        with channel(c.control_endpoint, node_creds(ca, "canon-thief-2")) as ch3, sync_stream(ch3) as thief:
            thief.hello(wireguard_public_key=thief_key)
            assert thief.connected_as() == "canon-thief-2"
            thief.send(controller_pb2.AgentMessage(
                key_update=controller_pb2.KeyUpdate(wireguard_public_key=owner_key + "\n")))
            code, details = thief.end_status()
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
        assert "key_update.wireguard_public_key" in details, details
        assert _stored_key(c, "canon-thief-2") == thief_key
        assert _stored_key(c, "canon-owner") == owner_key
        assert not owner.call.done()  # the owner's stream was never disturbed
    assert_still_serving(c)


# --------------------------------------------------------------------------- 5. audit log


def _tamper(db_path: Path, *statements: str, rechain: bool = True) -> None:
    """What someone with write access to the database file (not the audit key) can do: drop the triggers, run
    ``statements``, then renumber and recompute every hash with the chaining scheme, which is no secret.
    Signatures cannot be recomputed without the key; they are kept as they were."""
    db = sqlite3.connect(db_path, isolation_level=None)
    try:
        db.execute("DROP TRIGGER IF EXISTS audit_no_update")
        db.execute("DROP TRIGGER IF EXISTS audit_no_delete")
        for statement in statements:
            db.execute(statement)
        if rechain:
            previous = "0" * 64
            cursor = db.execute("SELECT sequence, time, actor, role, action, target, revision, detail, actor_serial,"
                                " signature FROM audit ORDER BY sequence")
            for number, row in enumerate(cursor.fetchall(), start=1):
                digest = entry_hash(previous, number, parse_time(row[1]), row[2], row[3], row[4], row[5], row[6],
                                    json.loads(row[7]), actor_serial=row[8] if row[9] else None)
                db.execute("UPDATE audit SET sequence = ?, hash = ?, previous_hash = ? WHERE sequence = ?",
                           (number, digest, previous, row[0]))
                previous = digest
    finally:
        db.close()


def _audit_verify(c: ControllerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_bin("veilnet-controller"), "audit-verify", "--data-dir", str(c.data), *args],
                          capture_output=True, text=True, timeout=60)


def _filled_controller(c: ControllerProcess, tmp_path: Path) -> list[dict[str, Any]]:
    c.veilctl("apply", "-f", str(EXAMPLE_SPEC), "-m", "first", check=True)
    c.token("host-a")
    second = tmp_path / "second.yaml"
    second.write_text(_mutated(lambda raw: raw["segments"][1].__setitem__("vni", 201)))
    c.veilctl("apply", "-f", str(second), "-m", "second", check=True)
    entries = audit_entries(c)
    assert [e["action"] for e in entries] == ["operator.issue", "spec.apply", "token.create", "spec.apply"]
    assert all(e["signature"] for e in entries)
    assert {e["actor_serial"] for e in entries[1:]} == {serial_of((c.operator("admin", "admin") / "client.crt")
                                                                  .read_bytes())}
    return entries


def test_audit_rows_rewritten_behind_a_running_controller_are_detected(fresh_controller: ControllerProcess,
                                                                       tmp_path: Path) -> None:
    """An edited row with every hash recomputed: the chain is consistent again, the signature is not."""
    c = fresh_controller
    _filled_controller(c, tmp_path)
    ok = c.veilctl("audit", "--verify")
    assert ok.returncode == 0 and "audit log verified (hash chain and signatures): 4 entries" in ok.stdout, ok
    _tamper(c.data / "controller.db", "UPDATE audit SET actor = 'mallory' WHERE sequence = 2")
    broken = c.veilctl("audit", "--verify")
    assert broken.returncode == 1, (broken.returncode, broken.stdout, broken.stderr)
    assert "AUDIT LOG BROKEN: entry 2: signature does not verify with audit key" in broken.stdout, broken.stdout
    as_json = json.loads(c.veilctl("-o", "json", "audit", "--verify").stdout)
    assert as_json["verified"] is False and as_json["verify_error"].startswith("entry 2: signature")


def test_a_dropped_audit_row_rechained_the_old_way_is_detected(fresh_controller: ControllerProcess,
                                                               tmp_path: Path) -> None:
    """Exactly what the unkeyed chain accepted: a row deleted and the rest renumbered and re-hashed."""
    c = fresh_controller
    _filled_controller(c, tmp_path)
    c.stop()
    assert _audit_verify(c).returncode == 0
    _tamper(c.data / "controller.db", "DELETE FROM audit WHERE sequence = 3")  # the token.create
    res = _audit_verify(c)
    assert res.returncode == 1, res
    assert res.stdout.startswith("TAMPERED: entry 3: signature does not verify with audit key"), res.stdout


def test_a_truncated_audit_log_is_detected_against_a_shipped_head(fresh_controller: ControllerProcess,
                                                                  tmp_path: Path) -> None:
    c = fresh_controller
    _filled_controller(c, tmp_path)
    c.stop()  # the controller writes its newest signed head when it stops
    auditor = tmp_path / "auditor"  # copies an operator shipped off the controller host
    auditor.mkdir()
    shutil.copy(c.data / "audit.pub", auditor / "audit.pub")
    shutil.copy(c.data / "audit-head.json", auditor / "head.json")
    journal = [e for e in c.events() if e.get("event") == "audit_appended"]
    assert journal and journal[-1]["sequence"] == 4  # the same head, in the journal

    _tamper(c.data / "controller.db", "DELETE FROM audit WHERE sequence = 4", rechain=False)
    (c.data / "audit-head.json").unlink()  # whoever cut the log removed the local head too
    alone = _audit_verify(c, "--public-key", str(auditor / "audit.pub"))
    assert alone.returncode == 0 and "would go unnoticed" in alone.stdout, alone.stdout  # it says what it can't see
    res = _audit_verify(c, "--public-key", str(auditor / "audit.pub"), "--head", str(auditor / "head.json"))
    assert res.returncode == 1, res
    assert res.stdout.startswith(f"TAMPERED: entry 4: missing: the log ends at entry 3, but the signed head in "
                                 f"{auditor / 'head.json'} records entry 4"), res.stdout


def test_the_controller_will_not_start_on_a_log_cut_short_of_its_signed_head(fresh_controller: ControllerProcess,
                                                                             tmp_path: Path) -> None:
    """Appending to it would give new entries the missing numbers and bury the evidence."""
    c = fresh_controller
    _filled_controller(c, tmp_path)
    c.stop()
    _tamper(c.data / "controller.db", "DELETE FROM audit WHERE sequence = 4", rechain=False)
    with pytest.raises(RuntimeError, match=r"controller exited \(1\)") as info:
        c.start()
    assert "does not reach its signed head: entry 4 is missing" in str(info.value), str(info.value)
    assert "move" in str(info.value) and "aside" in str(info.value)


# --------------------------------------------------------------------------- 6. tokens stored hashed


def test_join_tokens_are_stored_only_as_hashes(fresh_controller: ControllerProcess) -> None:
    c = fresh_controller
    token = c.token("host-a")
    unused = c.token("host-b")
    res, _ = agent_join(c, "host-a", token)
    assert res.returncode == 0, res.stderr
    c.stop()

    stored = b"".join(p.read_bytes() for p in sorted(c.data.glob("controller.db*")))
    for t in (token, unused):
        assert t.encode() not in stored
        assert token_hash(t).encode() in stored  # we are looking where the tokens live
        assert t not in c.log_text()


def test_failed_joins_are_throttled_per_source_address(tmp_path: Path) -> None:
    """After N failed joins from one address within a minute, Join is refused before any token is looked at."""
    with ControllerProcess(tmp_path / "throttled", serve_args=("--join-failures-per-minute", "3")).init() as c:
        c.start()
        for i in range(3):
            res, identity = agent_join(c, f"guess-{i}", "vnjoin_" + secrets.token_urlsafe(32))
            assert_join_refused(res, identity, "unknown join token")
        good = c.token("host-a")
        res, identity = agent_join(c, "host-a", good)
        assert_join_refused(res, identity, "RESOURCE_EXHAUSTED", "too many failed joins from 127.0.0.1")
        entries = audit_entries(c)
        assert [e["action"] for e in entries].count("node.join-refused") == 3  # the throttled try never got that far
        assert "node.join" not in [e["action"] for e in entries]  # and the good token was not spent
        assert c.proc is not None and c.proc.poll() is None
