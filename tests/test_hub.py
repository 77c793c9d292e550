"""The controller hub with a real SQLite store: what each session is sent, and when (no network)."""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from factories import wg_key

from veilnet.v1 import controller_pb2 as cpb
from veilnet_agent import wire
from veilnet_controller.hub import RECOMPILE_DELAY, Hub, KeyConflict
from veilnet_controller.spec import parse_spec
from veilnet_controller.store import SQLiteStore

EXAMPLE = yaml.safe_load((Path(__file__).parents[1] / "examples" / "network.yaml").read_text())


def hello(node: str, **kw: Any) -> cpb.Hello:
    return cpb.Hello(wireguard_public_key=wg_key(node), **kw)


@pytest.fixture
def hub(tmp_path: Path) -> Hub:
    h = Hub(SQLiteStore(tmp_path / "c.db"))
    h.load()
    return h


def apply(hub: Hub, raw: dict[str, Any]) -> int:
    record = hub.store.add_revision(yaml.safe_dump(raw), "test", "")
    hub.set_spec(parse_spec(raw), record.number)
    return record.number


def drain(session: Any) -> list[cpb.ControllerMessage]:
    out = []
    while (m := session.next_message()) is not None:
        out.append(m)
    return out


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_sessions_get_a_snapshot_then_only_what_changed(hub: Hub) -> None:
    async def scenario() -> None:
        sessions = {n: hub.connect(n, "serial-" + n, hello(n)) for n in ("host-a", "host-b", "host-c")}
        assert all(drain(s) == [] for s in sessions.values())  # no spec yet: nothing to send
        apply(hub, EXAMPLE)
        first = {n: drain(s) for n, s in sessions.items()}
        assert all(len(m) == 1 and m[0].update.WhichOneof("body") == "snapshot" for m in first.values())
        snap_c = wire.state_from_proto(first["host-c"][0].update.snapshot)
        assert [s["name"] for s in snap_c["segments"]] == ["blue"]
        assert {p["name"] for p in snap_c["peers"]} == {"host-a", "host-b"}

        changed = copy.deepcopy(EXAMPLE)
        next(p for p in changed["policies"] if p["name"] == "web-to-api")["ports"] = [9090]
        revision = apply(hub, changed)
        for name, session in sessions.items():
            (msg,) = drain(session)
            assert msg.update.spec_revision == revision
            assert msg.update.base_sequence == 1 and msg.update.sequence == 2
            delta = wire.delta_from_proto(msg.update.delta)
            assert delta.policies is not None and delta.segments is None and delta.endpoints is None, name
            assert not delta.peer_upserts and not delta.peer_removes
    run(scenario())


def test_a_slow_session_gets_one_coalesced_delta(hub: Hub) -> None:
    async def scenario() -> None:
        apply(hub, EXAMPLE)
        session = hub.connect("host-a", "s", hello("host-a"))
        drain(session)
        for port in (9001, 9002, 9003):
            raw = copy.deepcopy(EXAMPLE)
            next(p for p in raw["policies"] if p["name"] == "web-to-api")["ports"] = [port]
            last = apply(hub, raw)
        (msg,) = drain(session)
        assert msg.update.spec_revision == last
        policies = wire.delta_from_proto(msg.update.delta).policies
        assert policies is not None
        assert next(p for p in policies if p["name"] == "web-to-api")["ports"] == [9003]
    run(scenario())


def test_a_new_key_becomes_one_peer_upsert_elsewhere_after_one_coalesced_compile(hub: Hub) -> None:
    async def scenario() -> None:
        apply(hub, EXAMPLE)
        a = hub.connect("host-a", "s", hello("host-a"))
        drain(a)
        compiles = hub.compiles
        b = hub.connect("host-b", "s", hello("host-b"))
        c = hub.connect("host-c", "s", hello("host-c"))
        await asyncio.sleep(RECOMPILE_DELAY * 4)
        assert hub.compiles == compiles + 1  # two new keys, one coalesced compile
        (msg,) = drain(a)
        delta = wire.delta_from_proto(msg.update.delta)
        assert delta.peers_only
        assert sorted(p["name"] for p in delta.peer_upserts) == ["host-b", "host-c"]
        assert drain(b)[0].update.WhichOneof("body") == "snapshot"
        assert drain(c)[0].update.WhichOneof("body") == "snapshot"
    run(scenario())


def test_another_nodes_key_is_refused(hub: Hub) -> None:
    async def scenario() -> None:
        apply(hub, EXAMPLE)
        hub.connect("host-a", "s", hello("host-a"))
        with pytest.raises(KeyConflict, match="host-a"):
            hub.connect("host-b", "s", cpb.Hello(wireguard_public_key=wg_key("host-a")))
        b = hub.connect("host-b", "s", hello("host-b"))
        with pytest.raises(KeyConflict):
            hub.key_update(b, wg_key("host-a"))
        assert hub.public_keys["host-b"] == wg_key("host-b")
    run(scenario())


def test_revocation_closes_the_session_and_removes_the_peer_everywhere(hub: Hub) -> None:
    async def scenario() -> None:
        apply(hub, EXAMPLE)
        sessions = {n: hub.connect(n, "serial-" + n, hello(n)) for n in ("host-a", "host-b", "host-c")}
        await asyncio.sleep(RECOMPILE_DELAY * 4)
        for s in sessions.values():
            drain(s)
        assert hub.revoke("host-c", ["serial-host-c"]) is True
        assert sessions["host-c"].closed_reason == "certificate revoked"
        assert "serial-host-c" in hub.revoked_serials
        for name in ("host-a", "host-b"):
            (msg,) = drain(sessions[name])
            assert wire.delta_from_proto(msg.update.delta).peer_removes == ["host-c"]
    run(scenario())


def test_a_node_removed_from_the_spec_is_emptied_not_left_stale(hub: Hub) -> None:
    async def scenario() -> None:
        apply(hub, EXAMPLE)
        c = hub.connect("host-c", "s", hello("host-c"))
        drain(c)
        raw = copy.deepcopy(EXAMPLE)
        raw["nodes"] = [n for n in raw["nodes"] if n["name"] != "host-c"]
        raw["endpoints"] = [e for e in raw["endpoints"] if e["node"] != "host-c"]
        apply(hub, raw)
        (msg,) = drain(c)
        delta = wire.delta_from_proto(msg.update.delta)
        assert delta.segments == [] and delta.endpoints == [] and delta.policies == []
    run(scenario())


def test_reconnect_gets_a_snapshot_equal_to_the_current_state(hub: Hub) -> None:
    async def scenario() -> None:
        apply(hub, EXAMPLE)
        first = hub.connect("host-a", "s", hello("host-a"))
        before = wire.state_from_proto(drain(first)[0].update.snapshot)
        second = hub.connect("host-a", "s2", hello("host-a"))
        assert first.closed_reason is not None  # replaced
        after = wire.state_from_proto(drain(second)[0].update.snapshot)
        assert after == before
    run(scenario())
