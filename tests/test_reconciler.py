"""The reconciler and the state-file daemon against a fake kernel: failures, fail-closed gating, retries."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import structlog
from factories import peer, state

from veilnet_agent.app.daemon import Daemon
from veilnet_agent.app.retry import RetrySchedule
from veilnet_agent.core.config import AgentConfig, parse_config
from veilnet_agent.core.errors import DriverError
from veilnet_agent.core.model import parse_node_state
from veilnet_agent.core.naming import endpoint_host_name
from veilnet_agent.core.ops import CreateLink, DeleteLink, DelFdb, DelNeigh, EnsureWgInterface, SyncWgPeers
from veilnet_agent.core.planner import plan
from veilnet_agent.dataplane.firewall_manager import FirewallManager
from veilnet_agent.dataplane.reconciler import Reconciler, split_by_exposure
from veilnet_agent.testing import FakeKernel

REFUSED = "Error: Could not process rule: Operation not permitted"


def config(tmp_path: Path, resync: float = 30.0) -> AgentConfig:
    return parse_config({"node_name": "host-a", "state_dir": str(tmp_path / "state"), "resync_interval": resync,
                         "underlay": {"interface": "ul0", "address": "192.0.2.11"}})


def reconciler(kernel: FakeKernel, tmp_path: Path) -> Reconciler:
    cfg = config(tmp_path)
    return Reconciler(cfg, kernel.links, kernel.wireguard, FirewallManager(kernel.firewall, cfg.firewall, "host-a"))


def with_policy(raw: dict[str, Any]) -> dict[str, Any]:
    raw["segments"][0]["mode"] = "default-deny"
    raw["policies"] = [{"name": "blue-any", "source": {"segment": "blue"}, "destination": {"segment": "blue"}}]
    return raw


def converged(r: Reconciler, kernel: FakeKernel) -> bool:
    assert r.target is not None
    return plan(r.target, kernel.state()) == [] and r.failure is None


def test_a_good_pass_converges_and_reports_no_failure(tmp_path: Path) -> None:
    kernel = FakeKernel()
    r = reconciler(kernel, tmp_path)
    r.accept(parse_node_state(with_policy(state(peers=2))))
    outcome = r.reconcile(full=True)
    assert outcome.failure is None and r.failure is None and not outcome.held
    assert converged(r, kernel) and kernel.firewall.table.present


def test_a_refused_firewall_brings_nothing_up(tmp_path: Path) -> None:
    kernel = FakeKernel(firewall_refuses=REFUSED)
    r = reconciler(kernel, tmp_path)
    r.accept(parse_node_state(with_policy(state(peers=2))))
    outcome = r.reconcile(full=True)
    assert kernel.applied == [] and kernel.links_by_name == {} and kernel.wg is None and kernel.wg_peers == {}
    assert outcome.failure is not None and r.failure == outcome.failure
    assert outcome.failure.subsystem == "firewall" and REFUSED in outcome.failure.reason
    assert outcome.failure.held_ops == len(outcome.held) > 0
    assert "held back until the firewall applies" in str(outcome.failure)
    # the cause goes away: the retry loads the table, then brings everything up
    kernel.firewall_refuses = None
    retried = r.retry()
    assert retried.failure is None and converged(r, kernel)
    assert retried.observed and not retried.drift


def test_a_refused_firewall_still_takes_away_what_is_no_longer_wanted(tmp_path: Path) -> None:
    kernel = FakeKernel()
    r = reconciler(kernel, tmp_path)
    raw = with_policy(state(peers=3))
    r.accept(parse_node_state(raw))
    r.reconcile(full=True)
    assert converged(r, kernel)
    revoked = raw["peers"].pop(1)["public_key"]  # a revoked peer
    gone = raw["endpoints"].pop(1)["name"]  # a removed endpoint
    raw["endpoints"].append({"name": "a-new", "segment": "blue", "mac": "02:00:00:0a:00:09", "ipv4": "203.0.113.19",
                             "netns": "ep-a-new"})
    raw["peers"].append(peer(7))  # a new peer
    kernel.firewall_refuses = REFUSED
    kernel.applied.clear()
    r.accept(parse_node_state(raw))
    outcome = r.reconcile(full=False)
    assert outcome.failure is not None and outcome.failure.subsystem == "firewall"
    assert revoked not in kernel.wg_peers and peer(7)["public_key"] not in kernel.wg_peers
    assert endpoint_host_name(gone) not in kernel.links_by_name
    assert endpoint_host_name("a-new") not in kernel.links_by_name
    assert all(isinstance(op, (DeleteLink, DelFdb, DelNeigh, SyncWgPeers)) for op in kernel.applied), kernel.applied
    assert all(not op.upserts for op in kernel.applied if isinstance(op, SyncWgPeers))
    assert any(isinstance(op, CreateLink) and op.link.name == endpoint_host_name("a-new") for op in outcome.held)


def test_split_by_exposure_keeps_removals_and_holds_the_rest() -> None:
    upserts = (next(iter(_peers_of(state(peers=1)))),)
    sync = SyncWgPeers(upserts=upserts, removes=("gone=",), reason="test")
    ensure = EnsureWgInterface(target=None, create=True, reason="test")  # type: ignore[arg-type]
    delete = DeleteLink("vnep1", "veth", "test")
    reducing, held = split_by_exposure([ensure, sync, delete])
    assert reducing == [SyncWgPeers(upserts=(), removes=("gone=",), reason="test"), delete]
    assert held == [ensure, SyncWgPeers(upserts=upserts, removes=(), reason="test")]


def _peers_of(raw: dict[str, Any]) -> Any:
    kernel = FakeKernel()
    r = Reconciler(config(Path("/nonexistent")), kernel.links, kernel.wireguard)
    r.accept(parse_node_state(raw))
    assert r.target is not None
    return r.target.wg_peers.values()


def test_a_failed_operation_is_named_and_a_retry_applies_it(tmp_path: Path) -> None:
    kernel = FakeKernel(namespaces={"ep-a-web"})  # a-db's namespace does not exist yet
    r = reconciler(kernel, tmp_path)
    r.accept(parse_node_state(state(peers=1)))
    outcome = r.reconcile(full=True)
    failure = outcome.failure
    assert failure is not None and failure.subsystem == "kernel"
    assert failure.subject == f"create link/{endpoint_host_name('a-db')} (endpoint a-db)"
    assert "endpoint namespace ep-a-db does not exist" in failure.reason
    assert endpoint_host_name("a-web") in kernel.links_by_name  # everything else went ahead
    assert r.retry().failure is not None  # still missing
    kernel.namespaces = {"ep-a-web", "ep-a-db"}
    with structlog.testing.capture_logs() as logs:
        assert r.retry().failure is None
    assert converged(r, kernel)
    assert next(e for e in logs if e["event"] == "recovered")["was"] == str(failure)


def test_a_failed_read_back_is_a_failure_not_an_exception(tmp_path: Path) -> None:
    kernel = FakeKernel()
    r = reconciler(kernel, tmp_path)
    r.accept(parse_node_state(state(peers=1)))
    r.reconcile(full=True)
    kernel.observe_error = DriverError("wg show vnwg0 dump failed: Unable to access interface")
    outcome = r.reconcile(full=True)
    assert outcome.failure is not None and outcome.failure.subsystem == "kernel"
    assert "Unable to access interface" in outcome.failure.reason
    kernel.observe_error = None
    assert r.retry().failure is None and converged(r, kernel)


def test_an_unreadable_underlay_keeps_the_last_mtu_repairs_drift_and_is_reported(tmp_path: Path) -> None:
    kernel = FakeKernel()
    r = reconciler(kernel, tmp_path)
    r.accept(parse_node_state(state(peers=1)))
    r.reconcile(full=True)
    del kernel.interfaces["ul0"]
    del kernel.links_by_name[endpoint_host_name("a-web")]  # drift meanwhile
    outcome = r.reconcile(full=True)
    assert endpoint_host_name("a-web") in kernel.links_by_name  # repaired with the last known MTU
    assert outcome.failure is not None and outcome.failure.subsystem == "underlay"
    assert "using the last MTU read, 1500" in outcome.failure.reason
    kernel.interfaces["ul0"] = 1500
    assert r.retry().failure is None


def test_an_underlay_never_read_refuses_the_state(tmp_path: Path) -> None:
    kernel = FakeKernel(interfaces={})
    r = reconciler(kernel, tmp_path)
    with pytest.raises(DriverError, match="ul0"):
        r.accept(parse_node_state(state(peers=1)))
    assert r.desired is None


def test_retry_schedule_doubles_with_jitter_up_to_the_maximum() -> None:
    schedule = RetrySchedule(maximum=5.0, rng=random.Random(7))
    delays = [schedule.failed(100.0) for _ in range(6)]
    ceilings = [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    assert all(c / 2 <= d <= c for d, c in zip(delays, ceilings, strict=True)), delays
    assert schedule.due_at == 100.0 + delays[-1] and not schedule.due(100.0) and schedule.due(106.0)
    schedule.succeeded()
    assert schedule.due_at is None and schedule.failures == 0
    assert 0.25 <= schedule.failed(0.0) <= 0.5


# --------------------------------------------------------------------------- the state-file daemon


def daemon(tmp_path: Path, kernel: FakeKernel, raw: dict[str, Any]) -> Daemon:
    state_file = tmp_path / "state.json"
    state_file.write_text(json.dumps(raw))
    cfg = config(tmp_path, resync=30.0)
    r = Reconciler(cfg, kernel.links, kernel.wireguard, FirewallManager(kernel.firewall, cfg.firewall, "host-a"))
    return Daemon(cfg, state_file, r)


def test_daemon_schedules_a_retry_well_before_the_resync_and_it_applies(tmp_path: Path) -> None:
    kernel = FakeKernel(namespaces={"ep-a-web"})
    d = daemon(tmp_path, kernel, state(peers=1))
    d._attempt("start", d.start)
    assert d.failure is not None and d.retry.due_at is not None
    first = d.retry.due_at
    d._next_resync = first + 1000  # the resync is far away: only the retry may apply it
    d.step(first)
    assert d.failure is not None and d.retry.failures == 2  # still failing: the next one is later
    kernel.namespaces = None
    assert d.retry.due_at is not None
    d.step(d.retry.due_at)
    assert d.failure is None and d.retry.due_at is None and converged(d.reconciler, kernel)


def test_daemon_survives_a_pass_that_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = FakeKernel()
    d = daemon(tmp_path, kernel, state(peers=1))
    d._attempt("start", d.start)
    assert d.failure is None

    def broken(*, full: bool) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(d.reconciler, "reconcile", broken)
    with structlog.testing.capture_logs() as logs:
        d.step(d._next_resync)
    assert d.failure is not None and "boom" in d.failure.reason and d.retry.due_at is not None
    assert any(e["event"] == "pass_failed" and e["what"] == "resync" for e in logs)
    monkeypatch.undo()
    d.step(d.retry.due_at)
    assert d.failure is None


def test_daemon_retries_a_state_it_could_not_take_on(tmp_path: Path) -> None:
    kernel = FakeKernel(interfaces={})  # the underlay is not there at boot
    d = daemon(tmp_path, kernel, state(peers=1))
    d._attempt("start", d.start)
    assert d.load_failure is not None and "ul0" in d.load_failure.reason and d.reconciler.desired is None
    kernel.interfaces["ul0"] = 1500
    assert d.retry.due_at is not None
    d.step(d.retry.due_at)
    assert d.failure is None and d.reconciler.desired is not None and converged(d.reconciler, kernel)
