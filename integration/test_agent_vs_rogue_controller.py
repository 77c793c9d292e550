"""Agents against a rogue controller: malformed and wrong messages are refused, nothing crashes, nothing changes.

The fake controller (``fake_controller.py``) holds the real controller's CA and
server certificate, so mutual TLS succeeds and the agent accepts the stream as
its controller's; then it sends what a broken or hostile controller might. For
each kind of bad message the real controller is stopped, the fake takes its
address (192.0.2.2:7443 in the underlay namespace), and while a-web pings b-web
every agent must: keep running, log the problem as a structured event (no
traceback), leave every kernel object as it was, and, once the real controller
is back, resync with zero kernel operations.

Oversized messages are not sent here: the agent's receive limit is 256 MiB
(``control.MAX_RECEIVE``) and a message over it costs more memory and time than
this suite should spend; the limit itself is a channel option.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from ctl import stop_process_group
from lab import (
    CONTROLLER_IP,
    NETNS_DIR,
    Lab,
    LabError,
    Pinger,
    Topology,
    find_agent_bin,
    standard_topology,
    tail,
    wait_until,
)
from test_control_e2e import events_since, offsets, wait_resynced_without_kernel_work

pytestmark = pytest.mark.root

PREFIX = os.environ.get("VEILNET_ROGUE_PREFIX", "vnrg")
FAKE = Path(__file__).resolve().parent / "fake_controller.py"
B_WEB = "203.0.113.20"
CONNECT_TIMEOUT = 15.0  # agents back off up to reconnect_max_seconds (2 s in the lab) between attempts
REJECT_TIMEOUT = 10.0
BACKOFF_WINDOW = 5.0
# Over BACKOFF_WINDOW with reconnect_max_seconds = 2 a backing-off agent dials a handful of times;
# one that re-dials at once (50 ms) after every broken stream would log dozens of disconnects.
MAX_DISCONNECTS_IN_WINDOW = 15


def topology() -> Topology:
    return standard_topology().without_host("host-c")


@pytest.fixture(scope="module")
def rogue_lab() -> Iterator[Lab]:
    try:
        find_agent_bin()
    except LabError as e:
        pytest.fail(str(e))
    with Lab(PREFIX) as lab:
        try:
            lab.build_controlled(topology(), resync_interval=2.0)
            lab.wait_connectivity(30)
        except BaseException:
            print(lab.logs())
            if lab.controller is not None:
                print(lab.controller.log_text()[-5000:])
            raise
        yield lab


class FakeController:
    """One ``fake_controller.py`` process in the underlay namespace, on the real controller's address."""

    def __init__(self, lab: Lab, mode: str) -> None:
        self.lab = lab
        self.mode = mode
        self.record_path = lab.run_dir / f"fake-{mode}.json"
        self.log_path = lab.run_dir / f"fake-{mode}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20) -> None:
        ctl = self.lab.controller
        argv = ["nsenter", f"--net={NETNS_DIR / self.lab.underlay_ns}", "--", sys.executable, str(FAKE),
                "--data-dir", str(ctl.data), "--listen", f"{CONTROLLER_IP}:{ctl.control_port}",
                "--mode", self.mode, "--record", str(self.record_path)]
        for name, host in self.lab.hosts.items():
            argv += ["--applied", f"{name}={host.state_dir / 'controller' / 'applied.json'}"]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                                         start_new_session=True)
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        out = b""
        while b"ready\n" not in out:
            left = deadline - time.monotonic()
            if self.proc.poll() is not None or left <= 0:
                raise LabError(f"fake controller ({self.mode}) not ready (exit {self.proc.poll()}):\n"
                               f"{tail(self.log_text(), 30)}")
            if select.select([self.proc.stdout], [], [], min(left, 0.2))[0]:
                out += os.read(self.proc.stdout.fileno(), 4096)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        stop_process_group(proc, timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def record(self) -> dict[str, list[dict[str, Any]]]:
        try:
            return dict(json.loads(self.record_path.read_text()))
        except (FileNotFoundError, json.JSONDecodeError):
            return {"streams": [], "messages": []}

    def streams(self, node: str) -> list[dict[str, Any]]:
        return [s for s in self.record()["streams"] if s["node"] == node]

    def acks(self, node: str) -> list[dict[str, Any]]:
        return [m for m in self.record()["messages"] if m["node"] == node and m["kind"] == "ack"]


@pytest.fixture
def fake(rogue_lab: Lab, request: pytest.FixtureRequest) -> Iterator[FakeController]:
    """The real controller stopped, a fake one in its place; afterwards the real one runs again, whatever happened."""
    lab = rogue_lab
    rogue = FakeController(lab, request.param)
    before = offsets(lab)
    lab.controller.stop()
    try:
        for name in lab.hosts:  # so that the test's log offsets start after the real controller's goodbye
            wait_until(lambda n=name: events_since(lab, n, before[n], "control_disconnected"), CONNECT_TIMEOUT,
                       0.1, f"{name} noticed the real controller stopped")
        rogue.start()
        yield rogue
    finally:
        rogue.stop()
        print(f"fake controller log ({rogue.mode}):\n{tail(rogue.log_text(), 80)}")  # shown if the test failed
        if lab.controller.proc is None:
            lab.controller.start()


def restore_real_controller(lab: Lab, rogue: FakeController) -> None:
    """Stop the fake, start the real controller: every agent reconnects and resyncs without touching the kernel."""
    rogue.stop()
    since = offsets(lab)
    lab.controller.start()
    wait_resynced_without_kernel_work(lab, since)
    for name in lab.hosts:
        connected = events_since(lab, name, since[name], "control_connected")
        assert connected and all(e["controller"] == lab.controller.control_endpoint for e in connected), connected


# ---------------------------------------------------------------------------- what each bad message must cause


def assert_backs_off(lab: Lab) -> None:
    """Over BACKOFF_WINDOW every agent still dials the (misbehaving) controller, but a few times, not in a loop."""
    window = offsets(lab)
    time.sleep(BACKOFF_WINDOW)
    for name in lab.hosts:
        count = len(events_since(lab, name, window[name], "control_disconnected"))
        assert 1 <= count < MAX_DISCONNECTS_IN_WINDOW, f"{name}: {count} reconnects in {BACKOFF_WINDOW}s"


def expect_garbage(lab: Lab, rogue: FakeController, since: dict[str, int]) -> None:
    """Undecodable bytes: the stream is dropped as INTERNAL, and the agent backs off rather than spinning."""
    for name in lab.hosts:
        wait_until(lambda n=name: len(events_since(lab, n, since[n], "control_disconnected")) >= 2,
                   CONNECT_TIMEOUT, 0.2, f"{name}: dropped the garbage stream twice")
        dropped = events_since(lab, name, since[name], "control_disconnected")
        assert all(e["reason"].startswith("INTERNAL") and "deserializ" in e["reason"].lower() for e in dropped), \
            (name, dropped)
        assert len(rogue.streams(name)) >= 2, f"{name} did not come back to the controller"
    assert_backs_off(lab)


def expect_invalid_state(lab: Lab, rogue: FakeController, since: dict[str, int]) -> None:
    """A snapshot the agent cannot apply: Ack(ok=False) naming the field, logged, the stream kept."""
    for name in lab.hosts:
        acks = wait_until(lambda n=name: rogue.acks(n), REJECT_TIMEOUT, 0.2, f"{name} answered the snapshot")
        assert len(acks) == 1, acks
        ack = acks[0]["ack"]
        assert not ack.get("ok", False), ack
        assert ack["sequence"] == "1" and ack["spec_revision"] == "99", ack
        assert ack["error_field"] == "endpoints[0].ipv4", ack
        assert "subnet" in ack["error_reason"], ack
        assert "kernel_operations" not in ack, ack
        rejected = events_since(lab, name, since[name], "state_rejected")
        assert [(e["field"], e["spec_revision"]) for e in rejected] == [("endpoints[0].ipv4", 99)], rejected
        assert rejected[0]["level"] == "error"
        status = lab.host(name).agent("status")  # unhealthy (1), and it says why
        assert status.returncode == 1 and "last error:  endpoints[0].ipv4" in status.stdout, status.stdout
    time.sleep(1)  # the agent keeps the stream: rejecting a state is an answer, not a protocol error
    for name in lab.hosts:
        assert len(rogue.streams(name)) == 1, rogue.streams(name)
        assert not events_since(lab, name, since[name], "control_disconnected")


def expect_out_of_order(lab: Lab, rogue: FakeController, since: dict[str, int]) -> None:
    """A delta on a base the agent never saw: not applied, logged, and the agent reconnects for a snapshot."""
    for name in lab.hosts:
        event = wait_until(lambda n=name: events_since(lab, n, since[n], "update_out_of_order"), REJECT_TIMEOUT,
                           0.2, f"{name}: update_out_of_order")[0]
        assert (event["base"], event["sequence"], event["have"]) == (41, 42, 0), event
        wait_until(lambda n=name: len(rogue.streams(n)) >= 2, CONNECT_TIMEOUT, 0.2, f"{name} reconnected")
        assert any(e["reason"] == "update out of order" for e in events_since(lab, name, since[name],
                                                                              "control_reconnect"))
        assert not rogue.acks(name), "an out-of-order update must not be acknowledged"
    assert_backs_off(lab)


def expect_silent_then_close(lab: Lab, rogue: FakeController, since: dict[str, int]) -> None:
    """Accepted, silent, then UNAVAILABLE: the agent reconnects and keeps what it has."""
    for name in lab.hosts:
        wait_until(lambda n=name: any("UNAVAILABLE" in e["reason"] and "going away" in e["reason"]
                                      for e in events_since(lab, n, since[n], "control_disconnected")),
                   CONNECT_TIMEOUT, 0.2, f"{name}: stream closed by the controller")
        wait_until(lambda n=name: len(rogue.streams(n)) >= 2, CONNECT_TIMEOUT, 0.2, f"{name} reconnected")


EXPECT: dict[str, Callable[[Lab, FakeController, dict[str, int]], None]] = {
    "garbage": expect_garbage,
    "invalid-state": expect_invalid_state,
    "out-of-order": expect_out_of_order,
    "silent-then-close": expect_silent_then_close,
}


@pytest.mark.parametrize("fake", list(EXPECT), indirect=True)
def test_a_rogue_controller_changes_nothing_and_crashes_nothing(rogue_lab: Lab, fake: FakeController) -> None:
    lab = rogue_lab
    since = offsets(lab)  # the real controller is already gone: from here on only the fake talks to the agents
    before = {name: (h.ifindexes("vn"), h.snapshot()) for name, h in lab.hosts.items()}
    with Pinger(lab.endpoint("a-web"), B_WEB) as ping:
        ping.wait_replies(25, what="ping flowing before the fake speaks")
        for name in lab.hosts:
            wait_until(lambda n=name: fake.streams(n), CONNECT_TIMEOUT, 0.2, f"{name} connected to the fake")
            hello = fake.streams(name)[0]
            assert hello["kind"] == "hello" and hello["hello"]["applied_spec_revision"] == "1", hello
        EXPECT[fake.mode](lab, fake, since)
        ping.wait_replies(25, what="ping flowing after everything the fake caused")
        assert ping.running(), "the ping ended before the scenario did: test inconclusive"
        ping.stop()
    lost = ping.lost()
    assert ping.highest() > 50 and not lost, f"lost {lost[:20]} of {ping.highest()}:\n{ping.output()}"
    for name, host in lab.hosts.items():
        assert host.agent_running(), f"{name}'s agent exited"
        text = host.log_text(since[name])
        assert "Traceback" not in text, tail(text, 60)
        assert not events_since(lab, name, since[name], "update_applied"), "a rogue update was applied"
        assert not events_since(lab, name, since[name], "applied"), f"{name} changed kernel objects"
        assert (host.ifindexes("vn"), host.snapshot()) == before[name]
    assert lab.endpoint("a-web").ping(B_WEB, count=1, wait=2).returncode == 0
    restore_real_controller(lab, fake)
    assert {name: h.ifindexes("vn") for name, h in lab.hosts.items()} == {n: b[0] for n, b in before.items()}
    assert lab.endpoint("a-web").ping(B_WEB, count=1, wait=2).returncode == 0
    assert lab.endpoint("a-db").ping("203.0.113.84", count=1, wait=2).returncode == 0
