"""Failures after validation: nothing fails open, acknowledgements tell the truth, failed work is retried.

Real agents, a real controller, real kernel failures, real traffic; no fake drivers.

Controller-mode lab (``fc_lab``): host-a and host-b joined to a controller, segment blue
(VNI 100, default-deny, ICMP allowed inside it), a-web on host-a and b-web on host-b. The
resync interval is 600 s, so anything that recovers within these tests was applied by a
retry, not by the periodic full resync. host-b's local socket belongs to group ``nogroup``.

State-file lab (``ff_lab``): one host with three endpoints in a default-deny segment
(ICMP only between app=web), resync every second: the periodic resync is what is tested.

The kernel failures are real:
- the firewall: a helper process replaces the agent's table with an ``inet veilnet`` table
  carrying the kernel's owner flag (NFT_TABLE_F_OWNER): only that process's netlink socket may
  change it, so every transaction of the agent is refused (EPERM) while it lives, and the kernel
  removes the table when the process exits;
- an endpoint whose network namespace does not exist yet;
- an underlay interface that disappears (renamed away) while the agent runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from lab import (
    TABLE_HOLDER,
    EndpointSpec,
    Host,
    HostSpec,
    Lab,
    LabError,
    SegmentSpec,
    Topology,
    find_agent_bin,
    wait_until,
)

from veilnet.v1 import agent_pb2 as apb
from veilnet.v1 import agent_pb2_grpc
from veilnet.v1 import state_pb2 as spb

pytestmark = pytest.mark.root

PY = sys.executable
LONG_RESYNC = 600.0  # far longer than any wait below: recoveries here come from retries
RECOVER_WITHIN = 60.0  # generous bound for a retry (backoff 0.5 s doubling); a tenth of the resync interval
NOBODY = 65534  # uid and gid (nogroup) of the system's nobody
OTHER_GID = 65533  # a gid no group and no socket_group has
SOCKET_GROUP = "nogroup"

ICMP_IN_BLUE = {"name": "blue-icmp", "source": {"segment": "blue"}, "destination": {"segment": "blue"},
                "protocol": "icmp"}


# --------------------------------------------------------------------------- helpers


def events(host: Host, since: int, name: str) -> list[dict[str, Any]]:
    return [e for e in host.log_events(since) if e.get("event") == name]


def has_eth0(lab: Lab, endpoint: str) -> bool:
    return lab.endpoint(endpoint).run(["ip", "link", "show", "eth0"], check=False).returncode == 0


# Replaces the agent's table with one only this process may change (the kernel's owner flag),
# in one transaction, and holds it until its stdin closes; the kernel drops the table when it exits.


@contextlib.contextmanager
def table_taken(host: Host) -> Iterator[subprocess.Popen[str]]:
    """While the block runs, ``inet veilnet`` in ``host`` belongs to another process: the agent cannot change it."""
    proc = host.popen([PY, "-c", TABLE_HOLDER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line.strip() != "holding":
            raise LabError(f"could not take the table: {line}{proc.stderr.read() if proc.stderr else ''}")
        listing = host.run(["nft", "list", "table", "inet", "veilnet"]).stdout
        assert "flags owner" in listing, listing
        yield proc
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def local_stub(path: Path) -> tuple[grpc.Channel, agent_pb2_grpc.AgentLocalStub]:
    channel = grpc.insecure_channel(f"unix://{path}")
    return channel, agent_pb2_grpc.AgentLocalStub(channel)


# A local API client run as another user: prints "ok" or the gRPC status code.
STATUS_CLIENT = r"""
import sys, grpc
from veilnet.v1 import agent_pb2, agent_pb2_grpc
stub = agent_pb2_grpc.AgentLocalStub(grpc.insecure_channel("unix://" + sys.argv[1]))
try:
    stub.Status(agent_pb2.StatusRequest(), timeout=10)
except grpc.RpcError as exc:
    print(exc.code().name, exc.details(), flush=True)
else:
    print("ok", flush=True)
"""


def status_as(socket_path: Path, uid: int, gid: int, groups: tuple[int, ...] = ()) -> str:
    argv = ["setpriv", f"--reuid={uid}", f"--regid={gid}"]
    argv += [f"--groups={','.join(map(str, groups))}"] if groups else ["--clear-groups"]
    res = subprocess.run([*argv, PY, "-c", STATUS_CLIENT, str(socket_path)], capture_output=True, text=True,
                         timeout=30, cwd="/")
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


# --------------------------------------------------------------------------- controller-mode lab


def fc_topology() -> Topology:
    hosts = (HostSpec("host-a", "192.0.2.11", "198.51.100.11/24"), HostSpec("host-b", "192.0.2.12", "198.51.100.12/24"))
    blue = SegmentSpec("blue", 100, "203.0.113.0/26", "203.0.113.1", mode="default-deny")
    eps = (
        EndpointSpec("a-web", "host-a", "blue", "02:00:00:0a:00:01", "203.0.113.10", labels={"app": "web"}),
        EndpointSpec("b-web", "host-b", "blue", "02:00:00:0b:00:01", "203.0.113.20", labels={"app": "web"}),
    )
    return Topology(hosts, (blue,), eps, (ICMP_IN_BLUE,))


@pytest.fixture(scope="module")
def fc_lab() -> Iterator[Lab]:
    try:
        find_agent_bin()
    except LabError as e:
        pytest.fail(str(e))
    topo = fc_topology()
    with Lab("vnfc") as lab:
        try:
            ctl = lab.start_controller()
            for h in topo.hosts:
                extra = f'socket_group = "{SOCKET_GROUP}"\n' if h.name == "host-b" else ""
                lab.configure_host(h, resync_interval=LONG_RESYNC, extra=extra).join(ctl)
            for e in topo.endpoints:
                lab.add_endpoint(e.name)
            for host in lab.hosts.values():
                host.start_agent(wait_ready=False)
            for host in lab.hosts.values():
                host.wait_for_log("control_connected", timeout=30)
            lab.apply_spec(topo, message="fail-closed lab", wait=60)
            lab.wait_connectivity(30)
        except BaseException:
            print(lab.logs())
            if lab.controller is not None:
                print(lab.controller.log_text()[-5000:])
            raise
        yield lab


def apply_failing(lab: Lab, topo: Topology, message: str) -> tuple[int, str]:
    """``veilctl apply --wait`` of a spec some node cannot apply: returns (new revision, veilctl's stderr)."""
    ctl = lab.controller
    res = ctl.veilctl("-o", "json", "apply", "-f", str(lab.write_spec(topo)), "-m", message, "--wait", "30")
    assert res.returncode == 1, (res.returncode, res.stdout, res.stderr)
    lab.topology = topo
    return int(json.loads(res.stdout)["revision"]), res.stderr


def test_firewall_failure_brings_nothing_up_is_acked_failed_and_a_retry_applies_it(fc_lab: Lab) -> None:
    """While host-b's firewall table cannot be changed, one revision adds b-new and removes b-web there:
    the removal goes ahead (it only takes something away), b-new is not brought up, and the ack says so."""
    lab, ctl = fc_lab, fc_lab.controller
    host_b = lab.host("host-b")
    assert lab.topology is not None
    before = ctl.nodes()["host-b"]["applied_spec_revision"]
    assert lab.endpoint("a-web").wait_ping("203.0.113.20", 20)
    lab.add_endpoint("b-new")
    topo = lab.topology.without_endpoint("b-web").with_endpoint(
        EndpointSpec("b-new", "host-b", "blue", "02:00:00:0b:00:02", "203.0.113.25", labels={"app": "web"}))
    offset = host_b.log_offset()
    with table_taken(host_b):
        revision, stderr = apply_failing(lab, topo, "b-new replaces b-web while host-b's table is taken")
        # the ack told the truth: veilctl and the controller know host-b did not apply it, and why
        assert "host-b" in stderr and "firewall" in stderr, stderr
        node = ctl.nodes()["host-b"]
        assert node["applied_spec_revision"] == before and "firewall" in node["last_error"], node
        wait_until(lambda: ctl.nodes()["host-a"]["applied_spec_revision"] == revision, 30, 0.2,
                   "host-a (its firewall is fine) applied the revision")
        # nothing new came up on host-b: no interface in b-new's namespace, not reachable
        assert not has_eth0(lab, "b-new")
        assert lab.endpoint("a-web").ping("203.0.113.25", count=2, wait=1).returncode != 0
        # what only takes something away went ahead: b-web is gone
        assert not has_eth0(lab, "b-web")
        assert lab.endpoint("a-web").ping("203.0.113.20", count=2, wait=1).returncode != 0
        failed = events(host_b, offset, "update_not_applied")
        assert failed and failed[0]["field"] == "firewall" and failed[0]["spec_revision"] == revision, failed
        assert events(host_b, offset, "firewall_apply_failed")
        held = events(host_b, offset, "apply_held")
        assert any(e.get("object", "").startswith("link/vnep") for e in held), held
        # retries keep failing while the cause lasts, and say so
        wait_until(lambda: len(events(host_b, offset, "retry_failed")) >= 2, RECOVER_WITHIN, 0.2,
                   "two retries failed while the table is taken")
        assert not has_eth0(lab, "b-new")
        released = time.monotonic()
    # The owner went away with its table: the next retry loads our table, then brings b-new up.
    wait_until(lambda: ctl.nodes()["host-b"]["applied_spec_revision"] == revision, RECOVER_WITHIN, 0.2,
               "host-b acknowledged the revision after a retry")
    print(f"applied {time.monotonic() - released:.1f} s after the table was released")
    assert ctl.nodes()["host-b"]["last_error"] == ""
    assert "flags owner" not in host_b.run(["nft", "list", "table", "inet", "veilnet"]).stdout
    assert lab.endpoint("a-web").wait_ping("203.0.113.25", 20)
    late = events(host_b, offset, "update_applied")
    assert late and late[-1]["spec_revision"] == revision and late[-1]["after_retry"] is True, late
    assert events(host_b, offset, "recovered")


def test_a_failed_kernel_operation_is_acked_failed_then_a_retry_applies_it_before_the_resync(fc_lab: Lab) -> None:
    lab, ctl = fc_lab, fc_lab.controller
    host_b = lab.host("host-b")
    assert lab.topology is not None
    before = ctl.nodes()["host-b"]["applied_spec_revision"]
    topo = lab.topology.with_endpoint(EndpointSpec("b-late", "host-b", "blue", "02:00:00:0b:00:03", "203.0.113.26",
                                                   labels={"app": "web"}))
    offset = host_b.log_offset()
    # b-late's namespace does not exist yet: the veth cannot be created
    revision, stderr = apply_failing(lab, topo, "b-late before its namespace exists")
    node = ctl.nodes()["host-b"]
    assert node["applied_spec_revision"] == before, node
    assert "kernel" in node["last_error"] and "does not exist" in node["last_error"], node
    assert "endpoint b-late" in node["last_error"], node  # names the operation that failed
    assert "host-b" in stderr and "does not exist" in stderr, stderr
    status = host_b.agent("status")
    assert status.returncode == 1 and "does not exist" in status.stdout, status.stdout
    wait_until(lambda: events(host_b, offset, "retry_failed"), RECOVER_WITHIN, 0.2, "a retry failed")
    lab.add_endpoint("b-late")  # the namespace appears (a container runtime would create it)
    appeared = time.monotonic()
    wait_until(lambda: ctl.nodes()["host-b"]["applied_spec_revision"] == revision, RECOVER_WITHIN, 0.2,
               "host-b acknowledged the revision after a retry")
    took = time.monotonic() - appeared
    print(f"applied {took:.1f} s after the namespace appeared (resync interval {LONG_RESYNC:.0f} s)")
    assert ctl.nodes()["host-b"]["last_error"] == ""
    status = host_b.agent("status")
    assert status.returncode == 0 and f"spec revision {revision}" in status.stdout, status.stdout
    assert has_eth0(lab, "b-late")
    assert lab.endpoint("a-web").wait_ping("203.0.113.26", 20)
    assert not events(host_b, offset, "drift")  # a retry, not a resync, applied it


def test_local_api_refuses_callers_that_are_neither_root_nor_in_the_socket_group(fc_lab: Lab) -> None:
    host_b = fc_lab.host("host-b")
    socket_path = host_b.local_socket
    st = os.stat(socket_path)
    assert st.st_mode & 0o777 == 0o660 and st.st_gid == NOBODY  # root:nogroup
    os.chmod(socket_path, 0o666)  # loosened by mistake: the agent itself must still refuse strangers
    try:
        offset = host_b.log_offset()
        assert status_as(socket_path, NOBODY, NOBODY) == "ok"  # primary group nogroup
        assert status_as(socket_path, NOBODY, OTHER_GID, groups=(NOBODY,)) == "ok"  # supplementary group
        refused = status_as(socket_path, NOBODY, OTHER_GID)
        assert refused.startswith("UNAVAILABLE"), refused
        logged = events(host_b, offset, "local_api_refused")
        assert logged, host_b.log_text(offset)
        assert logged[-1]["uid"] == NOBODY and logged[-1]["gid"] == OTHER_GID, logged
        assert isinstance(logged[-1]["pid"], int) and logged[-1]["pid"] > 0 and logged[-1]["process"], logged
        assert host_b.agent("status").returncode == 0  # root is still served
    finally:
        os.chmod(socket_path, 0o660)


def test_local_api_logs_who_attached_and_detached_what(fc_lab: Lab) -> None:
    lab = fc_lab
    host_b = lab.host("host-b")
    lab.add_endpoint("b-api")
    offset = host_b.log_offset()
    endpoint = spb.LocalEndpoint(name="b-api", segment="blue", mac="02:00:00:0b:00:04", ipv4="203.0.113.27",
                                 netns=lab.netns_of("b-api"), ifname="eth0", labels={"app": "web"})
    channel, stub = local_stub(host_b.local_socket)
    with channel:
        stub.AttachEndpoint(apb.AttachEndpointRequest(endpoint=endpoint), timeout=30)
        assert lab.endpoint("a-web").wait_ping("203.0.113.27", 20)
        stub.DetachEndpoint(apb.DetachEndpointRequest(name="b-api"), timeout=30)
    me = Path("/proc/self/comm").read_text().strip()
    calls = [e for e in events(host_b, offset, "local_api_call") if e.get("method") != "Status"]
    assert [(e["method"], e["endpoint"], e["result"]) for e in calls] == [
        ("AttachEndpoint", "b-api", "ok"), ("DetachEndpoint", "b-api", "ok")], calls
    for e in calls:
        assert (e["uid"], e["gid"], e["pid"], e["process"]) == (0, 0, os.getpid(), me), e
    assert calls[0]["segment"] == "blue" and calls[0]["netns"] == lab.netns_of("b-api")


def test_local_socket_in_a_world_writable_directory_is_refused_at_start(fc_lab: Lab) -> None:
    host_b = fc_lab.host("host-b")
    unsafe = fc_lab.run_dir / "world-writable"
    unsafe.mkdir()
    os.chmod(unsafe, 0o777)  # no sticky bit: anyone could replace the socket
    config = host_b.config_path.read_text()
    before = host_b.ifindexes("vn")
    host_b.stop_agent()
    try:
        host_b.config_path.write_text(config.replace(str(host_b.local_socket), str(unsafe / "agent.sock")))
        offset = host_b.log_offset()
        host_b.start_agent(wait_ready=False)
        assert host_b.proc is not None
        assert host_b.proc.wait(30) == 1
        text = host_b.log_text(offset)
        assert f"{unsafe}" in text and "writable by others" in text, text
        assert not (unsafe / "agent.sock").exists()
        assert host_b.ifindexes("vn") == before  # refused before touching anything
    finally:
        if host_b.agent_running():
            host_b.stop_agent()
        host_b.proc = None
        host_b.config_path.write_text(config)
        host_b.start_agent(wait_ready=False)
        host_b.wait_for_log("control_connected", timeout=30)


# --------------------------------------------------------------------------- state-file lab


def ff_topology() -> Topology:
    host = HostSpec("host-a", "192.0.2.31", "198.51.100.31/24")
    blue = SegmentSpec("blue", 100, "203.0.113.0/26", "203.0.113.1", mode="default-deny")
    eps = (
        EndpointSpec("a-one", "host-a", "blue", "02:00:00:1a:00:01", "203.0.113.11", labels={"app": "web"}),
        EndpointSpec("a-two", "host-a", "blue", "02:00:00:1a:00:02", "203.0.113.12", labels={"app": "web"}),
        EndpointSpec("a-other", "host-a", "blue", "02:00:00:1a:00:03", "203.0.113.13", labels={"app": "other"}),
    )
    web_icmp = {"name": "web-icmp", "source": {"segment": "blue", "match_labels": {"app": "web"}},
                "destination": {"segment": "blue", "match_labels": {"app": "web"}}, "protocol": "icmp"}
    return Topology((host,), (blue,), eps, (web_icmp,))


@pytest.fixture(scope="module")
def ff_lab() -> Iterator[Lab]:
    try:
        find_agent_bin()
    except LabError as e:
        pytest.fail(str(e))
    with Lab("vnff") as lab:
        try:
            lab.build(ff_topology(), resync_interval=1.0)
            wait_until(lambda: lab.endpoint("a-one").ping("203.0.113.12").returncode == 0, 20, 0.2, "a-one -> a-two")
        except BaseException:
            print(lab.logs())
            raise
        yield lab


def enforcing(lab: Lab) -> bool:
    """Allowed traffic passes and denied traffic is dropped, on the host."""
    return (lab.endpoint("a-one").ping("203.0.113.12", count=1, wait=1).returncode == 0
            and lab.endpoint("a-one").ping("203.0.113.13", count=1, wait=1).returncode != 0)


def test_wireguard_driver_lines_are_json_events_in_the_agent_log(ff_lab: Lab) -> None:
    host = ff_lab.host("host-a")
    created = [e for e in host.log_events(0) if e.get("event") == "wireguard_interface_created"]
    assert created, host.log_text()[-3000:]
    assert created[0]["backend"] == "userspace" and created[0]["node"] == "host-a"
    assert created[0]["component"] == "wireguard" and created[0]["level"] == "info"
    plain = [line for line in host.log_text(0).splitlines() if line.strip() and not line.startswith("{")]
    assert not plain, plain


def test_a_resync_whose_underlay_vanished_leaves_the_agent_running_and_enforcing(ff_lab: Lab) -> None:
    lab = ff_lab
    host = lab.host("host-a")
    assert enforcing(lab)
    offset = host.log_offset()
    host.run(["ip", "link", "set", "ul0", "down"])
    host.run(["ip", "link", "set", "ul0", "name", "ulgone"])
    try:
        wait_until(lambda: len(events(host, offset, "underlay_unreadable")) >= 2, 20, 0.2,
                   "two resyncs without the underlay interface")
        assert host.agent_running(), host.log_text(offset)[-3000:]
        assert enforcing(lab)
        # still repairing drift: a deleted endpoint interface comes back at the next resync
        veth = next(name for name in host.links() if name.startswith("vnep"))
        host.run(["ip", "link", "del", veth])
        wait_until(lambda: veth in host.links() and lab.endpoint("a-one").ping("203.0.113.12").returncode == 0
                   and lab.endpoint("a-two").ping("203.0.113.11").returncode == 0, 20, 0.2,
                   f"{veth} recreated without the underlay")
        assert enforcing(lab)
        assert host.agent_running()
    finally:
        host.run(["ip", "link", "set", "ulgone", "name", "ul0"], check=False)
        host.run(["ip", "link", "set", "ul0", "up"], check=False)
    host.wait_for_log("recovered", since=offset, timeout=20)
    assert host.agent_running()
    assert enforcing(lab)
