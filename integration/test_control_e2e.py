"""End to end through the controller: real controller, real agents joined with tokens, real traffic.

The lab's controller runs in the underlay namespace (192.0.2.2, mutual TLS on
7443, join on 7444); host-a/b/c join with single-use tokens, run in
controller mode, and every change goes through ``veilctl``. Node certificates
live only 45 s here, so every agent renews its certificate (and reconnects)
several times while the other tests run: renewal is exercised under load.

Topology: the standard one (blue default-deny: a-web, b-web app=web, c-web
app=api; green isolated: a-db, b-db), policies: ICMP inside blue and
ICMPv6 inside blue, web -> api tcp PORT_A. Servers listen in c-web on PORT_A and PORT_B.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
from lab import EndpointSpec, Lab, LabError, Topology, find_agent_bin, standard_topology, wait_until
from test_firewall_e2e import connect, start_server, stop_process

pytestmark = pytest.mark.root

PREFIX = os.environ.get("VEILNET_CTL_PREFIX", "vnce")
PORT_A, PORT_B = 8080, 9090
CERT_LIFETIME = "45s"
PROPAGATE = 10.0  # seconds allowed for a change to reach every host (waits, not timing assertions)


def policies(port: int) -> list[dict[str, Any]]:
    return [
        {"name": "blue-icmp", "source": {"segment": "blue"}, "destination": {"segment": "blue"}, "protocol": "icmp"},
        {"name": "blue-icmpv6", "source": {"segment": "blue"}, "destination": {"segment": "blue"},
         "protocol": "icmpv6"},
        {"name": "web-to-api", "source": {"segment": "blue", "match_labels": {"app": "web"}},
         "destination": {"segment": "blue", "match_labels": {"app": "api"}}, "protocol": "tcp", "ports": [port]},
    ]


def topology(port: int = PORT_A) -> Topology:
    topo = standard_topology().with_segment("blue", mode="default-deny")
    for name, app in (("a-web", "web"), ("b-web", "web"), ("c-web", "api")):
        topo = topo.with_labels(name, {"app": app})
    return topo.with_policies(policies(port))


@pytest.fixture(scope="module")
def ctl_lab() -> Iterator[Lab]:
    try:
        find_agent_bin()
    except LabError as e:
        pytest.fail(str(e))
    with Lab(PREFIX) as lab:
        server = None
        try:
            lab.build_controlled(topology(), resync_interval=2.0, certificate_lifetime=CERT_LIFETIME)
            server = start_server(lab, "c-web", [PORT_A, PORT_B])
            lab.wait_connectivity(30)
        except BaseException:
            print(lab.logs())
            if lab.controller is not None:
                print(lab.controller.log_text()[-5000:])
            raise
        try:
            yield lab
        finally:
            if server is not None:
                stop_process(server)


def c_web(lab: Lab) -> str:
    assert lab.topology is not None
    return lab.topology.endpoint("c-web").ipv4


def verdicts(lab: Lab) -> list[str]:
    return connect(lab, "a-web", [(c_web(lab), PORT_A), (c_web(lab), PORT_B)], timeout=0.5)


def events_since(lab: Lab, host: str, offset: int, event: str) -> list[dict[str, Any]]:
    return [e for e in lab.host(host).log_events(offset) if e.get("event") == event]


def offsets(lab: Lab) -> dict[str, int]:
    return {name: h.log_offset() for name, h in lab.hosts.items()}


def wait_resynced_without_kernel_work(lab: Lab, since: dict[str, int], timeout: float = 30) -> None:
    """Every host reconnected after ``since`` and applied the controller's snapshot with zero kernel operations."""
    for name in lab.hosts:
        wait_until(lambda n=name: events_since(lab, n, since[n], "update_applied"), timeout, 0.2,
                   f"{name}: snapshot applied after reconnect")
        applied = events_since(lab, name, since[name], "update_applied")
        assert [e["kernel_operations"] for e in applied] == [0] * len(applied), (name, applied)
        assert not events_since(lab, name, since[name], "applied"), f"{name} changed kernel objects"


def test_every_host_joined_and_applied_the_spec(ctl_lab: Lab) -> None:
    ctl = ctl_lab.controller
    nodes = ctl.nodes()
    assert {n: (v["state"], v["applied_spec_revision"]) for n, v in nodes.items()} == {
        n: ("connected", 1) for n in ("host-a", "host-b", "host-c")}
    keys = {n: v["wireguard_public_key"] for n, v in nodes.items()}
    for name, host in ctl_lab.hosts.items():
        assert host.identity() == keys[name]  # the key the controller distributes is the host's own
        assert set(host.wg_peers()) == {k for n, k in keys.items() if n != name}
        status = host.agent("status")
        assert status.returncode == 0, status.stderr
        assert "(connected)" in status.stdout and "spec revision 1" in status.stdout
        mode = os.stat(host.local_socket).st_mode & 0o777
        assert mode == 0o660, oct(mode)
        assert (host.state_dir / "identity" / "node.key").stat().st_mode & 0o777 == 0o600
    assert verdicts(ctl_lab) == ["ok", "timeout"]
    # Agents report their health: every peer has a recent WireGuard handshake.
    wait_until(lambda: all(n["peers_with_recent_handshake"] == n["peers"] == 2 for n in ctl.nodes().values()),
               PROPAGATE, 0.5, "every node reports a handshake with both peers")
    table = ctl.veilctl("nodes").stdout
    assert "HANDSHAKES" in table and "2/2" in table, table


def test_policy_change_through_veilctl_changes_traffic(ctl_lab: Lab) -> None:
    ctl = ctl_lab.controller
    revision = ctl_lab.apply_spec(topology(PORT_B), message="api moves to 9090")
    assert revision == 2
    assert all(n["applied_spec_revision"] == 2 for n in ctl.nodes().values())
    wait_until(lambda: verdicts(ctl_lab) == ["timeout", "ok"], PROPAGATE, 0.2, "9090 allowed, 8080 denied")
    diff = ctl.veilctl("diff", "-f", str(ctl_lab.write_spec(topology(PORT_A), "next.json")))
    assert diff.returncode == 1 and "-  - 9090" in diff.stdout and "+  - 8080" in diff.stdout, diff.stdout


def test_rollback_restores_the_previous_data_plane(ctl_lab: Lab) -> None:
    ctl = ctl_lab.controller
    res = ctl.veilctl("rollback", "1", "-m", "back to 8080", "--wait", "30")
    assert res.returncode == 0, res.stderr
    wait_until(lambda: verdicts(ctl_lab) == ["ok", "timeout"], PROPAGATE, 0.2, "8080 allowed again")
    history = json.loads(ctl.veilctl("-o", "json", "history", check=True).stdout)
    assert history[0]["revision"] == 3 and history[0]["rolled_back_from"] == 1
    current = ctl.veilctl("get", check=True).stdout
    assert "8080" in current and "9090" not in current
    audit = json.loads(ctl.veilctl("-o", "json", "audit", "--verify", check=True).stdout)
    assert audit["verified"] is True
    assert [e["action"] for e in audit["entries"] if e["action"].startswith("spec.")] == [
        "spec.apply", "spec.apply", "spec.rollback"]


def test_a_state_an_agent_cannot_apply_is_reported_and_changes_nothing(ctl_lab: Lab) -> None:
    """Geneve passes the controller's validation but this kernel has no geneve: every agent refuses it whole."""
    ctl = ctl_lab.controller
    before = {n: h.ifindexes("vn") for n, h in ctl_lab.hosts.items()}
    bad = ctl_lab.write_spec(topology().with_segment("green", encapsulation="geneve"), "geneve.json")
    res = ctl.veilctl("apply", "-f", str(bad), "--wait", "30")
    assert res.returncode == 1, (res.returncode, res.stderr)
    assert "geneve" in res.stderr
    nodes = ctl.nodes()
    for name in ctl_lab.hosts:
        assert "segments[1].encapsulation" in nodes[name]["last_error"], nodes[name]
        assert nodes[name]["applied_spec_revision"] == 3
    assert {n: h.ifindexes("vn") for n, h in ctl_lab.hosts.items()} == before
    assert verdicts(ctl_lab) == ["ok", "timeout"]
    assert ctl_lab.endpoint("a-db").ping("203.0.113.84", count=1, wait=2).returncode == 0
    # Back to a good spec: errors clear.
    ctl_lab.apply_spec(topology(), message="undo geneve")
    assert all(n["last_error"] == "" for n in ctl.nodes().values())


def test_endpoint_attached_through_the_local_api_reaches_peers(ctl_lab: Lab) -> None:
    lab = ctl_lab
    host_b = lab.host("host-b")
    new = lab.add_endpoint("b-new")
    ns = lab.netns_of("b-new")
    bad = host_b.agent("attach", "--name", "b-bad", "--segment", "blue", "--mac", "02:00:00:0b:00:99",
                       "--ipv4", "203.0.113.200", "--netns", ns)
    assert bad.returncode == 2 and "ipv4" in bad.stderr and "outside the subnet" in bad.stderr, bad.stderr
    res = host_b.agent("attach", "--name", "b-new", "--segment", "blue", "--mac", "02:00:00:0b:00:09",
                       "--ipv4", "203.0.113.25", "--netns", ns, "--label", "app=web")
    assert res.returncode == 0, res.stderr
    dup = host_b.agent("attach", "--name", "b-new", "--segment", "blue", "--mac", "02:00:00:0b:00:0a",
                       "--ipv4", "203.0.113.26", "--netns", ns)
    assert dup.returncode != 0 and "already exists" in dup.stderr
    assert lab.endpoint("a-web").wait_ping("203.0.113.25", PROPAGATE), "a-web cannot reach the attached endpoint"
    # the new app=web endpoint is allowed to the api by the existing policy: labels travelled to host-c
    wait_until(lambda: connect(lab, "b-new", [(c_web(lab), PORT_A)], 0.5) == ["ok"], PROPAGATE, 0.2,
               "b-new (app=web) -> c-web:8080")
    assert "02:00:00:0b:00:09" in lab.host("host-a").run(["bridge", "fdb", "show", "br", "vnbr100"]).stdout
    res = host_b.agent("detach", "--name", "b-new")
    assert res.returncode == 0, res.stderr
    wait_until(lambda: "02:00:00:0b:00:09" not in lab.host("host-a").run(
        ["bridge", "fdb", "show", "br", "vnbr100"]).stdout, PROPAGATE, 0.2, "host-a forgot the detached MAC")
    assert new.ping("203.0.113.10", count=1, wait=1).returncode != 0


def test_a_spec_that_takes_an_attached_address_wins_and_the_update_still_applies(ctl_lab: Lab) -> None:
    """The controller's state wins over a local attachment that no longer fits it (not a refused update)."""
    lab, ctl = ctl_lab, ctl_lab.controller
    host_b = lab.host("host-b")
    lab.add_endpoint("b-late")
    res = host_b.agent("attach", "--name", "b-late", "--segment", "blue", "--mac", "02:00:00:0b:00:0b",
                       "--ipv4", "203.0.113.27", "--netns", lab.netns_of("b-late"))
    assert res.returncode == 0, res.stderr
    assert lab.endpoint("a-web").wait_ping("203.0.113.27", PROPAGATE)
    offset = host_b.log_offset()
    lab.add_endpoint("a-late")
    taken = topology().with_endpoint(EndpointSpec("a-late", "host-a", "blue", "02:00:00:0a:00:0b", "203.0.113.27",
                                                  labels={"app": "web"}))
    revision = lab.apply_spec(taken, message="a-late takes 203.0.113.27")  # waits: every node applied it
    nodes = ctl.nodes()
    assert nodes["host-b"]["applied_spec_revision"] == revision and nodes["host-b"]["last_error"] == ""
    dropped = events_since(lab, "host-b", offset, "attached_endpoint_dropped")
    assert [e["endpoint"] for e in dropped] == ["b-late"], dropped
    assert "b-late" not in json.loads((host_b.state_dir / "controller" / "attached.json").read_text() or "[]")
    # 203.0.113.27 is now a-late on host-a, for everyone
    assert lab.endpoint("b-web").wait_ping("203.0.113.27", PROPAGATE)
    assert "02:00:00:0a:00:0b" in lab.host("host-b").run(["bridge", "fdb", "show", "dev", "vnvx100"]).stdout
    lab.apply_spec(topology(), message="a-late gone again")


@contextlib.contextmanager
def pinging(lab: Lab, src: str, dst: str, seconds: float) -> Iterator[subprocess.Popen[str]]:
    count = int(seconds / 0.02)
    proc = lab.endpoint(src).popen(["ping", "-n", "-i", "0.02", "-c", str(count), "-W", "1", dst],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        yield proc
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(seconds + 30)
        if proc.poll() is None:
            proc.kill()


def loss(proc: subprocess.Popen[str]) -> tuple[int, int, str]:
    out = proc.communicate(timeout=60)[0]
    m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    assert m, out
    return int(m.group(1)), int(m.group(2)), out


def test_controller_restart_loses_no_packet_and_resyncs_with_zero_kernel_work(ctl_lab: Lab) -> None:
    lab, ctl = ctl_lab, ctl_lab.controller
    since = offsets(lab)
    with pinging(lab, "a-web", "203.0.113.20", 8) as ping:
        time.sleep(1)
        ctl.stop(signal.SIGKILL)
        time.sleep(2)  # agents notice, keep enforcing, back off
        ctl.start()
        wait_resynced_without_kernel_work(lab, since)
    sent, received, out = loss(ping)
    assert sent > 100 and received == sent, out
    assert all(n["state"] == "connected" for n in ctl.nodes().values())


def test_agent_restart_without_controller_restores_the_last_state(ctl_lab: Lab) -> None:
    lab, ctl = ctl_lab, ctl_lab.controller
    host = lab.host("host-a")
    before = host.ifindexes("vn")
    ctl.stop()
    try:
        offset = host.log_offset()
        with pinging(lab, "a-web", "203.0.113.20", 6) as ping:
            time.sleep(0.5)
            host.stop_agent(signal.SIGKILL)
            host.start_agent()
            time.sleep(1)
        sent, received, out = loss(ping)
        assert received == sent, out
        assert events_since(lab, "host-a", offset, "restored_last_applied_state")
        assert not events_since(lab, "host-a", offset, "applied"), "the restart changed kernel objects"
        assert host.ifindexes("vn") == before
        assert verdicts(lab) == ["ok", "timeout"]  # the firewall too was adopted as it was
    finally:
        since = offsets(lab)
        ctl.start()
    wait_resynced_without_kernel_work(lab, since)


def test_agent_restart_mid_stream_recreates_nothing(ctl_lab: Lab) -> None:
    lab = ctl_lab
    host = lab.host("host-b")
    before = host.ifindexes("vn")
    offset = host.log_offset()
    with pinging(lab, "a-web", "203.0.113.20", 6) as ping:
        time.sleep(0.5)
        host.stop_agent(signal.SIGKILL)
        host.start_agent()
    sent, received, out = loss(ping)
    assert received == sent, out
    wait_until(lambda: events_since(lab, "host-b", offset, "update_applied"), 30, 0.2, "host-b resynced")
    applied = [e["kernel_operations"] for e in events_since(lab, "host-b", offset, "update_applied")]
    assert applied and set(applied) == {0}, applied  # (a certificate renewal may add another zero-op resync)
    assert not events_since(lab, "host-b", offset, "applied"), "the restart changed kernel objects"
    assert host.ifindexes("vn") == before


def test_drift_is_repaired_and_reported_to_the_controller(ctl_lab: Lab) -> None:
    lab, ctl = ctl_lab, ctl_lab.controller
    before = ctl.nodes()["host-a"]["drift_repairs"]
    lab.host("host-a").run(["bridge", "fdb", "del", "02:00:00:0b:00:01", "dev", "vnvx100", "master"])
    lab.host("host-a").sighup()  # systemctl reload: resync now
    time.sleep(0.5)
    assert lab.host("host-a").agent_running(), "SIGHUP stopped the agent"
    wait_until(lambda: ctl.nodes()["host-a"]["drift_repairs"] > before, PROPAGATE, 0.5,
               "host-a repaired the deleted FDB entry and told the controller")
    assert "02:00:00:0b:00:01" in lab.host("host-a").run(["bridge", "fdb", "show", "dev", "vnvx100"]).stdout
    assert any(e.get("event") == "agent_repaired_drift" and e.get("node") == "host-a" for e in ctl.events())


def test_certificates_renew_at_two_thirds_of_their_life(ctl_lab: Lab) -> None:
    lab = ctl_lab
    for name, host in lab.hosts.items():
        wait_until(lambda h=host: [e for e in h.log_events(0) if e.get("event") == "certificate_renewed"], 30, 0.5,
                   f"{name} renewed its certificate")
    renewals = [e for e in lab.controller.events() if e.get("event") == "certificate_renewed"]
    assert {e["node"] for e in renewals} == set(lab.hosts)
    assert all(e["serial"] != e["previous"] for e in renewals)
    # The replaced key does not stay on disk: one generation (a renewal in flight may briefly show two).
    for name, host in lab.hosts.items():
        wait_until(lambda h=host: len(list((h.state_dir / "identity").glob("gen-*"))) == 1, 10, 0.1,
                   f"{name} keeps only its live key generation")
    renewed = [e for e in json.loads(lab.controller.veilctl("-o", "json", "audit", "--limit", "10000",
                                                             check=True).stdout)["entries"]
               if e["action"] == "node.renew"]
    assert {e["actor"] for e in renewed} == set(lab.hosts)
    assert all(e["detail"]["renewed_with"] in e["detail"]["retires"] for e in renewed)
    assert all(n["state"] == "connected" for n in lab.controller.nodes().values())
    assert verdicts(lab) == ["ok", "timeout"]


def test_rotate_keys_command_reaches_every_peer(ctl_lab: Lab) -> None:
    lab, ctl = ctl_lab, ctl_lab.controller
    old = lab.host("host-a").identity()
    res = ctl.veilctl("command", "host-a", "rotate-keys")
    assert res.returncode == 0, res.stderr
    new = wait_until(lambda: (k := lab.host("host-a").identity()) != old and k, PROPAGATE, 0.2, "host-a's new key")
    for name in ("host-b", "host-c"):
        wait_until(lambda n=name: new in lab.host(n).wg_peers() and old not in lab.host(n).wg_peers(),
                   PROPAGATE, 0.2, f"{name} has host-a's new key")
    assert ctl.nodes()["host-a"]["wireguard_public_key"] == new
    assert lab.endpoint("a-web").wait_ping("203.0.113.20", PROPAGATE)
    assert lab.endpoint("a-db").wait_ping("203.0.113.84", PROPAGATE)
    offset = lab.host("host-b").log_offset()
    assert ctl.veilctl("command", "host-b", "resync").returncode == 0
    wait_until(lambda: any(e.get("kind") == "resync" for e in events_since(lab, "host-b", offset, "command")),
               PROPAGATE, 0.2, "host-b resynced")
    denied = ctl.veilctl("command", "host-b", "resync", credentials=ctl.operator("eve", "viewer"))
    assert denied.returncode == 3 and "viewer" in denied.stderr


def test_revoked_node_is_disconnected_and_removed_from_every_peer(ctl_lab: Lab) -> None:
    lab, ctl = ctl_lab, ctl_lab.controller
    key_c = lab.host("host-c").identity()
    offset = lab.host("host-c").log_offset()
    res = ctl.veilctl("revoke", "host-c", "--reason", "test: host compromised")
    assert res.returncode == 0, res.stderr
    for name in ("host-a", "host-b"):
        wait_until(lambda n=name: key_c not in lab.host(n).wg_peers(), 5, 0.1, f"{name} dropped host-c's key")
    wait_until(lambda: any("UNAUTHENTICATED" in e.get("reason", "")
                           for e in events_since(lab, "host-c", offset, "control_disconnected")),
               5, 0.1, "host-c's stream refused")
    assert lab.endpoint("a-web").ping(c_web(lab), count=2, wait=1).returncode != 0
    assert lab.endpoint("a-web").ping("203.0.113.20", count=1, wait=2).returncode == 0
    nodes = ctl.nodes()
    assert nodes["host-c"]["state"] == "revoked"
    assert all(n["peers"] == 1 for name, n in nodes.items() if name != "host-c")
    audit = json.loads(ctl.veilctl("-o", "json", "audit", check=True).stdout)
    assert any(e["action"] == "node.revoke" and e["target"] == "host-c" for e in audit["entries"])
