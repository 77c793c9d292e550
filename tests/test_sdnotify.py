"""systemd notifications over a real datagram socket: READY only once the data plane is in place, never on failure."""

from __future__ import annotations

import copy
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from factories import state
from test_controlled import agent, send_update

from veilnet_agent.app.daemon import Daemon
from veilnet_agent.core.config import parse_config
from veilnet_agent.dataplane.firewall_manager import FirewallManager
from veilnet_agent.dataplane.reconciler import Reconciler
from veilnet_agent.sdnotify import Notifier, Readiness
from veilnet_agent.testing import FakeKernel


class Listener:
    """What systemd's end of $NOTIFY_SOCKET receives, one dict per datagram."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def received(self) -> list[dict[str, str]]:
        out = []
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return out
            out.append(dict(line.split("=", 1) for line in data.decode().split("\n")))


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Listener]:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.setblocking(False)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        monkeypatch.delenv("WATCHDOG_USEC", raising=False)
        yield Listener(sock)


def test_fields_reach_a_path_socket_and_newlines_cannot_forge_a_field(notify_socket: Listener) -> None:
    n = Notifier()
    assert n.enabled
    n.ready("up\nREADY=0")
    assert notify_socket.received() == [{"READY": "1", "STATUS": "up READY=0"}]


def test_an_abstract_socket_is_written_with_a_leading_at() -> None:
    name = f"veilnet-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        Notifier({"NOTIFY_SOCKET": "@" + name}).status("hello")
        assert sock.recv(100) == b"STATUS=hello"


def test_without_a_socket_nothing_is_sent_and_nothing_fails() -> None:
    n = Notifier({})
    assert not n.enabled and not n.send(READY="1")
    n.ready("x")
    assert not n.sent_ready


def test_watchdog_pings_follow_watchdog_usec_and_only_for_our_pid(notify_socket: Listener) -> None:
    env = {"NOTIFY_SOCKET": os.environ["NOTIFY_SOCKET"], "WATCHDOG_USEC": "20000000"}
    n = Notifier(env)
    assert n.watchdog_seconds == 20.0
    n.watchdog(now=100.0)
    n.watchdog(now=101.0)  # within a quarter of the interval: not again
    n.watchdog(now=105.0)
    assert notify_socket.received() == [{"WATCHDOG": "1"}, {"WATCHDOG": "1"}]
    other = Notifier({**env, "WATCHDOG_PID": str(os.getpid() + 1)})
    assert other.watchdog_seconds is None  # meant for another process


def test_readiness_is_sent_once_and_status_on_change(notify_socket: Listener) -> None:
    r = Readiness()
    r.report(False, "waiting")
    r.report(False, "waiting")
    r.report(True, "revision 1 applied")
    r.report(True, "revision 1 applied")
    r.report(False, "revision 2 not applied, retrying")
    r.report(True, "revision 2 applied")
    assert notify_socket.received() == [{"STATUS": "waiting"}, {"READY": "1", "STATUS": "revision 1 applied"},
                                        {"STATUS": "revision 2 not applied, retrying"},
                                        {"STATUS": "revision 2 applied"}]


def _file_daemon(tmp_path: Path, kernel: FakeKernel) -> Daemon:
    state_file = tmp_path / "state.json"
    state_file.write_text(json.dumps(state(peers=2)))
    cfg = parse_config({"node_name": "host-a", "state_dir": str(tmp_path / "state"), "resync_interval": 30.0,
                        "underlay": {"interface": "ul0", "address": "192.0.2.11"}})
    r = Reconciler(cfg, kernel.links, kernel.wireguard, FirewallManager(kernel.firewall, cfg.firewall, "host-a"))
    return Daemon(cfg, state_file, r)


def test_state_file_agent_is_not_ready_while_its_first_pass_fails(tmp_path: Path, notify_socket: Listener) -> None:
    kernel = FakeKernel(namespaces={"ep-a-web"})  # a-db's namespace is missing: the first pass fails
    d = _file_daemon(tmp_path, kernel)
    d._attempt("start", d.start)
    got = notify_socket.received()
    assert got and all("READY" not in m for m in got), got
    assert "retrying" in got[-1]["STATUS"] and "ep-a-db" in got[-1]["STATUS"]
    kernel.namespaces = None
    assert d.retry.due_at is not None
    d.step(d.retry.due_at)
    assert notify_socket.received() == [{"READY": "1", "STATUS": "state file applied: 2 segments, 2 peers"}]


def test_controlled_agent_is_ready_only_once_the_kernel_holds_a_controller_state(
        tmp_path: Path, notify_socket: Listener) -> None:
    kernel = FakeKernel(namespaces={"ep-a-web"})
    daemon, _client = agent(tmp_path, kernel)
    daemon._after_pass(retry=False)  # the start pass with nothing from the controller yet
    assert notify_socket.received() == [{"STATUS": "waiting for the first state from the controller"}]
    send_update(daemon, state(peers=1), 1, 5)  # fails: a namespace is missing
    got = notify_socket.received()
    assert got and all("READY" not in m for m in got) and "revision 5 not applied" in got[-1]["STATUS"]
    kernel.namespaces = None
    send_update(daemon, copy.deepcopy(state(peers=3)), 2, 6)
    assert notify_socket.received() == [{"READY": "1", "STATUS": "revision 6 applied, 3 peers"}]
