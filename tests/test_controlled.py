"""Controller mode against a fake kernel: acknowledgements tell the truth, failures are retried and re-acked."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import grpc
import pytest
from factories import state

from veilnet.v1 import controller_pb2 as cpb
from veilnet_agent.app.controlled import ControlledDaemon
from veilnet_agent.control import wire
from veilnet_agent.control.client import StreamEvent
from veilnet_agent.control.local_api import LocalApiError
from veilnet_agent.core.config import parse_config
from veilnet_agent.core.naming import endpoint_host_name
from veilnet_agent.dataplane.firewall_manager import FirewallManager
from veilnet_agent.dataplane.reconciler import Reconciler
from veilnet_agent.testing import FakeKernel


class FakeClient:
    """The control client's sending side: records what the agent tells the controller."""

    connected = True
    endpoint = "192.0.2.2:7443"

    def __init__(self) -> None:
        self.sent: list[cpb.AgentMessage] = []

    def send(self, message: cpb.AgentMessage) -> bool:
        self.sent.append(message)
        return True

    def reconnect(self, reason: str, *, misbehaved: bool = False) -> None:
        raise AssertionError(f"unexpected reconnect: {reason}")

    def of(self, kind: str) -> list[Any]:
        return [getattr(m, kind) for m in self.sent if m.WhichOneof("kind") == kind]


def agent(tmp_path: Path, kernel: FakeKernel) -> tuple[ControlledDaemon, FakeClient]:
    cfg = parse_config({"node_name": "host-a", "state_dir": str(tmp_path / "state"), "resync_interval": 30.0,
                        "underlay": {"interface": "ul0", "address": "192.0.2.11"},
                        "controller": {"local_socket": str(tmp_path / "run" / "agent.sock")}})
    reconciler = Reconciler(cfg, kernel.links, kernel.wireguard,
                            FirewallManager(kernel.firewall, cfg.firewall, cfg.node_name))
    daemon = ControlledDaemon(cfg, reconciler, [])
    client = FakeClient()
    daemon.client = client  # type: ignore[assignment]
    return daemon, client


def send_update(daemon: ControlledDaemon, raw: dict[str, Any], sequence: int, revision: int) -> None:
    """What the loop does with one snapshot from the controller."""
    update = cpb.NodeUpdate(sequence=sequence, spec_revision=revision, snapshot=wire.state_to_proto(raw))
    daemon._on_stream(StreamEvent("message", cpb.ControllerMessage(update=update)))
    daemon._after_pass(retry=False)


def retry(daemon: ControlledDaemon) -> None:
    """What the loop does when the retry is due."""
    assert daemon.retry.due_at is not None, "no retry scheduled"
    daemon._retry()
    daemon._after_pass(retry=True)


def test_an_applied_update_is_acked_ok(tmp_path: Path) -> None:
    daemon, client = agent(tmp_path, FakeKernel())
    send_update(daemon, state(peers=1), 1, 5)
    (ack,) = client.of("ack")
    assert (ack.sequence, ack.spec_revision, ack.ok) == (1, 5, True)
    assert daemon.applied_revision == 5 and client.of("status")[-1].last_error == ""
    assert daemon.retry.due_at is None


def test_a_failed_kernel_operation_is_acked_failed_then_ok_after_the_retry(tmp_path: Path) -> None:
    kernel = FakeKernel(namespaces={"ep-a-web"})  # a-db's namespace does not exist yet
    daemon, client = agent(tmp_path, kernel)
    send_update(daemon, state(peers=1), 1, 5)
    (ack,) = client.of("ack")
    assert (ack.sequence, ack.spec_revision, ack.ok) == (1, 5, False)
    assert ack.error_field == "kernel"
    assert ack.error_value == f"create link/{endpoint_host_name('a-db')} (endpoint a-db)"
    assert "endpoint namespace ep-a-db does not exist" in ack.error_reason
    assert daemon.applied_revision == 0 and "does not exist" in client.of("status")[-1].last_error
    assert daemon._status().last_error == client.of("status")[-1].last_error
    retry(daemon)  # still missing: no new ack, the backoff grows
    assert len(client.of("ack")) == 1 and daemon.retry.failures == 2
    kernel.namespaces = None
    retry(daemon)
    late = client.of("ack")[-1]
    assert (late.sequence, late.spec_revision, late.ok) == (1, 5, True) and len(client.of("ack")) == 2
    assert daemon.applied_revision == 5 and client.of("status")[-1].last_error == ""
    assert daemon.retry.due_at is None


def test_a_refused_firewall_is_acked_failed_and_nothing_comes_up(tmp_path: Path) -> None:
    kernel = FakeKernel(firewall_refuses="Error: Could not process rule: Operation not permitted")
    daemon, client = agent(tmp_path, kernel)
    send_update(daemon, state(peers=1), 1, 5)
    (ack,) = client.of("ack")
    assert not ack.ok and ack.error_field == "firewall" and ack.error_value == "table inet veilnet (replace)"
    assert "Operation not permitted" in ack.error_reason and "held back" in ack.error_reason
    assert kernel.links_by_name == {} and kernel.wg is None
    kernel.firewall_refuses = None
    retry(daemon)
    assert client.of("ack")[-1].ok and endpoint_host_name("a-db") in kernel.links_by_name


def test_a_state_that_cannot_be_taken_on_yet_is_acked_failed_and_retried(tmp_path: Path) -> None:
    kernel = FakeKernel(interfaces={})  # the underlay interface is not there (yet)
    daemon, client = agent(tmp_path, kernel)
    send_update(daemon, state(peers=1), 1, 5)
    (ack,) = client.of("ack")
    assert not ack.ok and ack.error_field == "kernel" and "ul0" in ack.error_reason
    assert (daemon.dir / "applied.json").exists()  # valid: it is the state to restore after a restart
    kernel.interfaces["ul0"] = 1500
    retry(daemon)
    assert client.of("ack")[-1].ok and daemon.applied_revision == 5


def test_a_refusal_after_a_failed_update_is_not_overwritten_by_a_late_ok(tmp_path: Path) -> None:
    kernel = FakeKernel(namespaces={"ep-a-web"})
    daemon, client = agent(tmp_path, kernel)
    good = state(peers=1)
    send_update(daemon, good, 1, 5)
    bad = copy.deepcopy(good)
    bad["endpoints"][0]["ipv4"] = "192.0.2.200"  # outside its subnet
    send_update(daemon, bad, 2, 6)
    assert [a.ok for a in client.of("ack")] == [False, False] and client.of("ack")[1].error_field.startswith("endp")
    kernel.namespaces = None
    retry(daemon)  # the kernel now holds revision 5, but 6 was refused: no late ok for 5
    assert len(client.of("ack")) == 2
    assert daemon.applied_revision == 5 and "outside" in daemon.last_error


def test_an_attach_the_kernel_cannot_apply_fails_and_leaves_nothing(tmp_path: Path) -> None:
    kernel = FakeKernel(namespaces={"ep-a-web", "ep-a-db"})
    daemon, _ = agent(tmp_path, kernel)
    send_update(daemon, state(peers=1), 1, 5)
    endpoint = {"name": "a-new", "segment": "blue", "mac": "02:00:00:0a:00:09", "ipv4": "203.0.113.19",
                "netns": "ep-a-new", "ifname": "eth0"}
    with pytest.raises(LocalApiError) as refused:
        daemon._attach(endpoint)
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE
    assert "not attached" in str(refused.value) and "ep-a-new does not exist" in str(refused.value)
    assert daemon.attached == {} and endpoint_host_name("a-new") not in kernel.links_by_name
    assert daemon.failure is None  # taken back whole: nothing left to retry
    kernel.namespaces = None
    daemon._attach(endpoint)
    assert "a-new" in daemon.attached and endpoint_host_name("a-new") in kernel.links_by_name
