"""The controller hub with a real SQLite store: what each session is sent, and when (no network)."""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from factories import wg_key
from structlog.testing import capture_logs

from veilnet.v1 import controller_pb2 as cpb
from veilnet_agent.control import wire
from veilnet_controller.hub import Hub, InvalidKey, KeyConflict
from veilnet_controller.spec import AttachedClaims, parse_spec
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



async def recompiled(hub: Hub) -> None:
    """Wait for the hub's pending coalesced recompile to have run (its own task), not for a guessed delay."""
    task = hub._recompile_task
    if task is not None:
        await asyncio.wait_for(asyncio.shield(task), timeout=10)

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
        await recompiled(hub)
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


@pytest.mark.parametrize("spelling", ["{key}\n", "{key}\r\n", " {key}", "{key}=", "{body}\n="],
                         ids=["trailing-lf", "trailing-crlf", "leading-space", "extra-padding", "inner-lf"])
def test_another_spelling_of_a_key_is_refused_and_never_stored(hub: Hub, spelling: str) -> None:
    """The uniqueness check compares strings: only the canonical spelling may ever be registered."""
    async def scenario() -> None:
        apply(hub, EXAMPLE)
        key = wg_key("host-a")
        hub.connect("host-a", "s", hello("host-a"))
        other = spelling.format(key=key, body=key[:-1])
        with pytest.raises(InvalidKey, match=r"canonical|base64"):
            hub.connect("host-b", "s", cpb.Hello(), public_key=other)
        with pytest.raises(InvalidKey):
            hub.connect("host-b", "s", cpb.Hello(wireguard_public_key=other))
        assert "host-b" not in hub.sessions and "host-b" not in hub.public_keys
        b = hub.connect("host-b", "s", hello("host-b"))
        with pytest.raises(InvalidKey):
            hub.key_update(b, other)
        assert hub.public_keys == {"host-a": key, "host-b": wg_key("host-b")}
        assert {n.name: n.wireguard_public_key for n in hub.store.nodes()} == hub.public_keys
    run(scenario())


def audited(hub: Hub, *actions: str) -> list[tuple[str, str, str, dict[str, Any]]]:
    entries, _ = hub.store.audit(10_000)
    return [(e.action, e.actor, e.target, dict(e.detail)) for e in entries if e.action in actions]


def test_key_registrations_and_changes_are_audited_with_the_certificate(tmp_path: Path) -> None:
    from veilnet_controller.audit import open_signed_store

    store, _signer = open_signed_store(tmp_path)  # signed: entries carry the actor's serial
    hub = Hub(store)
    hub.load()

    async def scenario() -> None:
        apply(hub, EXAMPLE)
        a = hub.connect("host-a", "serial-a1", hello("host-a"))
        hub.connect("host-a", "serial-a2", hello("host-a"))  # same key again: nothing new to record
        hub.key_update(a, wg_key("host-a-rotated"))
        hub.connect("host-a", "serial-a3", cpb.Hello(wireguard_public_key=wg_key("host-a-new-host")))
    try:
        run(scenario())
        entries = [e for e in store.audit(100)[0] if e.action.startswith("node.key-")]
        assert [(e.action, e.actor, e.actor_serial, e.detail["public_key"], e.detail["previous"], e.detail["via"])
                for e in entries] == [
            ("node.key-register", "host-a", "serial-a1", wg_key("host-a"), "", "hello"),
            ("node.key-change", "host-a", "serial-a1", wg_key("host-a-rotated"), wg_key("host-a"), "key_update"),
            ("node.key-change", "host-a", "serial-a3", wg_key("host-a-new-host"), wg_key("host-a-rotated"), "hello"),
        ]
        assert store.verify_audit()[0]
    finally:
        store.close()


def test_attachment_reports_are_audited_when_they_change(hub: Hub) -> None:
    async def scenario() -> None:
        apply(hub, EXAMPLE)
        raws = [att("a-x", "02:00:00:0a:00:31", "203.0.113.40", labels={"app": "web"}, ifname="eth0")]
        b = hub.connect("host-a", "s", attached_hello("host-a", raws))
        hub.endpoints_reported(b, raws)  # the same list again: no entry
        hub.endpoints_reported(b, [])
    run(scenario())
    assert audited(hub, "node.attach") == [
        ("node.attach", "host-a", "host-a", {"count": 1, "endpoints": [
            {"name": "a-x", "segment": "blue", "mac": "02:00:00:0a:00:31", "ipv4": "203.0.113.40",
             "labels": {"app": "web"}}]}),
        ("node.attach", "host-a", "host-a", {"count": 0, "endpoints": []}),
    ]


def test_revocation_closes_the_session_and_removes_the_peer_everywhere(hub: Hub) -> None:
    async def scenario() -> None:
        apply(hub, EXAMPLE)
        sessions = {n: hub.connect(n, "serial-" + n, hello(n)) for n in ("host-a", "host-b", "host-c")}
        await recompiled(hub)
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
        assert hub.sessions["host-c"].target == {"node": "host-c", "transport_address": "", "segments": [],
                                                 "endpoints": [], "peers": [], "policies": []}
        next(p for p in raw["policies"] if p["name"] == "web-to-api")["ports"] = [9090]
        apply(hub, raw)
        assert drain(c) == []  # emptied once; nothing more until it is in the spec again
    run(scenario())


def test_reconnect_gets_a_snapshot_equal_to_the_current_state(hub: Hub) -> None:
    async def scenario() -> None:
        apply(hub, EXAMPLE)
        first = hub.connect("host-a", "s", hello("host-a"))
        before = wire.state_from_proto(drain(first)[0].update.snapshot)
        second = hub.connect("host-a", "s2", hello("host-a"))
        assert first.closed_reason == "replaced by a newer stream from the same node"
        after = wire.state_from_proto(drain(second)[0].update.snapshot)
        assert after == before
    run(scenario())


def test_a_node_removed_while_disconnected_is_emptied_when_it_reconnects(hub: Hub) -> None:
    async def scenario() -> None:
        apply(hub, EXAMPLE)
        c = hub.connect("host-c", "s", hello("host-c"))
        drain(c)
        hub.disconnect(c)
        without_c = copy.deepcopy(EXAMPLE)
        without_c["nodes"] = [n for n in without_c["nodes"] if n["name"] != "host-c"]
        without_c["endpoints"] = [e for e in without_c["endpoints"] if e["node"] != "host-c"]
        apply(hub, without_c)
        again = hub.connect("host-c", "s", hello("host-c"))
        (msg,) = drain(again)
        assert wire.state_from_proto(msg.update.snapshot) == {
            "node": "host-c", "transport_address": "", "segments": [], "endpoints": [], "peers": [], "policies": []}
        next(p for p in without_c["policies"] if p["name"] == "web-to-api")["ports"] = [9090]
        apply(hub, without_c)
        assert drain(again) == []
        apply(hub, EXAMPLE)  # back in the spec: its state again, as a delta from the empty one
        (msg,) = drain(again)
        delta = wire.delta_from_proto(msg.update.delta)
        assert delta.transport_address == "198.51.100.13/24"
        assert [s["name"] for s in delta.segments or []] == ["blue"]
    run(scenario())


def test_no_spec_yet_sends_nothing_not_even_an_empty_state(hub: Hub) -> None:
    async def scenario() -> None:
        assert drain(hub.connect("host-a", "s", hello("host-a"))) == []
    run(scenario())


def test_a_rejoined_node_loses_its_old_stream_and_certificates_but_stays_in_the_network(hub: Hub) -> None:
    async def scenario() -> None:
        apply(hub, EXAMPLE)
        sessions = {n: hub.connect(n, "serial-" + n, hello(n)) for n in ("host-a", "host-b")}
        await recompiled(hub)
        drain(sessions["host-b"])
        hub.node_rejoined("host-a", ["serial-host-a", "older"])
        assert sessions["host-a"].closed_reason == "replaced by a newer join"
        assert {"serial-host-a", "older"} <= hub.revoked_serials
        assert "host-a" not in hub.revoked_nodes and "host-a" in hub.states
        assert drain(sessions["host-b"]) == []  # host-b keeps host-a as its peer
        hub.node_rejoined("host-c", ["serial-host-c"])  # not connected: only the serials
        assert "serial-host-c" in hub.revoked_serials
    run(scenario())


# --------------------------------------------------------------------------- attached endpoints


def att(name: str, mac: str, ipv4: str, **fields: Any) -> dict[str, Any]:
    """An attachment in blue (203.0.113.0/26; the example uses .1 as gateway and .10, .20, .30)."""
    return {"name": name, "segment": "blue", "mac": mac, "ipv4": ipv4, "netns": name, **fields}


def attached_hello(node: str, raws: list[dict[str, Any]]) -> cpb.Hello:
    return hello(node, attached_endpoints=wire.endpoints_to_proto(raws))


def names(hub: Hub, node: str) -> list[str]:
    return [e.name for e in hub.attached.get(node, ())]


def rejections(logs: list[dict[str, Any]]) -> list[tuple[str, str, str, str]]:
    return [(e["node"], e["endpoint"], e["field"], e["reason"]) for e in logs
            if e["event"] == "attached_endpoint_rejected"]


def peer_macs(hub: Hub, node: str, peer: str) -> set[str]:
    view = next(p for p in hub.states[node]["peers"] if p["name"] == peer)
    return {e["mac"] for e in view["endpoints"]}


def test_one_bad_attachment_is_dropped_alone_and_logged(hub: Hub) -> None:
    async def scenario() -> None:
        apply(hub, EXAMPLE)
        hub.connect("host-a", "s", hello("host-a"))
        raws = [
            att("c-ok", "02:00:00:cc:00:01", "203.0.113.40"),
            att("c-zone", "02:00:00:cc:00:02", "203.0.113.41", labels={"node.zone": "x"}),
            att("c-mac", "02:00:00:0a:00:01", "203.0.113.42"),  # a-web's MAC
            att("c-ok2", "02:00:00:cc:00:04", "203.0.113.43"),
            att("c-ok", "02:00:00:cc:00:05", "203.0.113.44", netns="other"),  # its own name again
            att("c-green", "02:00:00:cc:00:06", "203.0.113.70", segment="green"),
        ]
        with capture_logs() as logs:
            hub.connect("host-c", "s", attached_hello("host-c", raws))
        assert names(hub, "host-c") == ["c-ok", "c-ok2"]
        assert rejections(logs) == [
            ("host-c", "c-zone", "endpoints[1].labels.node.zone",
             "the label prefix 'node.' is reserved for the labels of the endpoint's node"),
            ("host-c", "c-mac", "endpoints[2].mac", "is already used by the spec's endpoints[0].mac"),
            ("host-c", "c-ok", "endpoints[4].name",
             "duplicate endpoint name, also at endpoint c-ok attached on host-c"),
            ("host-c", "c-green", "endpoints[5].segment", "node host-c does not carry this segment"),
        ]
        assert hub.store.attached_endpoints() == {"host-c": raws}  # the report is kept as it came
        await recompiled(hub)
        assert {"02:00:00:cc:00:01", "02:00:00:cc:00:04"} <= peer_macs(hub, "host-a", "host-c")
    run(scenario())


def test_an_accepted_attachment_keeps_its_claim_against_a_newcomer_across_spec_changes(hub: Hub) -> None:
    async def scenario() -> None:
        apply(hub, EXAMPLE)
        b = hub.connect("host-b", "s", attached_hello("host-b", [att("shared", "02:00:00:bb:00:01", "203.0.113.40"),
                                                                 att("b-own", "02:00:00:bb:00:02", "203.0.113.41")]))
        with capture_logs() as logs:
            # host-a sorts first by name, yet host-b's endpoint was accepted first
            hub.connect("host-a", "s", attached_hello("host-a", [att("shared", "02:00:00:aa:00:01", "203.0.113.50"),
                                                                 att("a-own", "02:00:00:aa:00:02", "203.0.113.40")]))
        assert rejections(logs) == [
            ("host-a", "shared", "endpoints[0].name",
             "duplicate endpoint name, also at endpoint shared attached on host-b"),
            ("host-a", "a-own", "endpoints[1].ipv4", "is already used by endpoint shared attached on host-b"),
        ]
        changed = copy.deepcopy(EXAMPLE)
        next(p for p in changed["policies"] if p["name"] == "web-to-api")["ports"] = [9090]
        with capture_logs() as logs:
            apply(hub, changed)
        assert names(hub, "host-b") == ["shared", "b-own"] and names(hub, "host-a") == []
        assert rejections(logs) == []  # the same refusals are not logged again

        # host-b detaches "shared": host-a's waiting endpoints get their turn at once
        hub.endpoints_reported(b, [att("b-own", "02:00:00:bb:00:02", "203.0.113.41")])
        assert names(hub, "host-a") == ["shared", "a-own"] and names(hub, "host-b") == ["b-own"]
        # ...and now host-a holds them: host-b attaching "shared" again is refused
        hub.endpoints_reported(b, [att("b-own", "02:00:00:bb:00:02", "203.0.113.41"),
                                   att("shared", "02:00:00:bb:00:01", "203.0.113.42")])
        assert names(hub, "host-b") == ["b-own"]
        apply(hub, EXAMPLE)
        assert names(hub, "host-a") == ["shared", "a-own"] and names(hub, "host-b") == ["b-own"]
    run(scenario())


def test_after_a_restart_attachment_conflicts_go_to_the_earlier_node_name(tmp_path: Path) -> None:
    async def scenario() -> None:
        first = Hub(SQLiteStore(tmp_path / "c.db"))
        first.load()
        apply(first, EXAMPLE)
        first.connect("host-b", "s", attached_hello("host-b", [att("x", "02:00:00:bb:00:01", "203.0.113.40")]))
        first.connect("host-a", "s", attached_hello("host-a", [att("x", "02:00:00:aa:00:01", "203.0.113.50"),
                                                               att("y", "02:00:00:aa:00:02", "203.0.113.51")]))
        assert names(first, "host-b") == ["x"] and names(first, "host-a") == ["y"]
        again = Hub(SQLiteStore(tmp_path / "c.db"))
        with capture_logs() as logs:
            again.load()
        assert names(again, "host-a") == ["x", "y"] and names(again, "host-b") == []
        assert rejections(logs) == [("host-b", "x", "endpoints[0].name",
                                     "duplicate endpoint name, also at endpoint x attached on host-a")]
    run(scenario())


def test_a_spec_change_drops_only_the_attachments_it_conflicts_with(hub: Hub) -> None:
    async def scenario() -> None:
        apply(hub, EXAMPLE)
        hub.connect("host-c", "s", attached_hello("host-c", [att("c-1", "02:00:00:cc:00:01", "203.0.113.40"),
                                                             att("c-2", "02:00:00:cc:00:02", "203.0.113.41")]))
        raw = copy.deepcopy(EXAMPLE)
        raw["endpoints"].append({"name": "a-new", "node": "host-a", "segment": "blue", "mac": "02:00:00:0a:00:09",
                                 "ipv4": "203.0.113.41", "netns": "a-new"})
        with capture_logs() as logs:
            apply(hub, raw)
        assert names(hub, "host-c") == ["c-1"]
        assert rejections(logs) == [("host-c", "c-2", "endpoints[1].ipv4",
                                     "is already used by the spec's endpoints[5].ipv4")]
        apply(hub, EXAMPLE)  # the spec's endpoint is gone again: c-2 is back
        assert names(hub, "host-c") == ["c-1", "c-2"]
    run(scenario())


def test_an_empty_hello_clears_what_the_node_attached_before(hub: Hub) -> None:
    async def scenario() -> None:
        apply(hub, EXAMPLE)
        hub.connect("host-a", "s", hello("host-a"))
        hub.connect("host-c", "s", attached_hello("host-c", [att("c-1", "02:00:00:cc:00:01", "203.0.113.40")]))
        await recompiled(hub)
        assert "02:00:00:cc:00:01" in peer_macs(hub, "host-a", "host-c")
        compiles = hub.compiles
        hub.connect("host-c", "s2", hello("host-c"))  # restarted agent, nothing attached any more
        assert hub.store.attached_endpoints() == {} and "host-c" not in hub.attached
        await recompiled(hub)
        assert hub.compiles == compiles + 1
        assert "02:00:00:cc:00:01" not in peer_macs(hub, "host-a", "host-c")
    run(scenario())


def test_attachments_reported_before_any_spec_are_kept_for_it(hub: Hub) -> None:
    async def scenario() -> None:
        raws = [att("c-1", "02:00:00:cc:00:01", "203.0.113.40")]
        hub.connect("host-c", "s", attached_hello("host-c", raws))
        assert hub.store.attached_endpoints() == {"host-c": raws} and hub.attached == {}
        apply(hub, EXAMPLE)
        assert names(hub, "host-c") == ["c-1"]
    run(scenario())


def test_attachments_of_a_node_outside_the_spec_wait_for_it(hub: Hub) -> None:
    async def scenario() -> None:
        without_c = copy.deepcopy(EXAMPLE)
        without_c["nodes"] = [n for n in without_c["nodes"] if n["name"] != "host-c"]
        without_c["endpoints"] = [e for e in without_c["endpoints"] if e["node"] != "host-c"]
        apply(hub, without_c)
        with capture_logs() as logs:
            hub.connect("host-c", "s", attached_hello("host-c", [att("c-1", "02:00:00:cc:00:01", "203.0.113.40")]))
        assert hub.attached == {} and rejections(logs) == []
        apply(hub, EXAMPLE)
        assert names(hub, "host-c") == ["c-1"]
    run(scenario())


def test_incremental_claims_match_a_full_revalidation(hub: Hub) -> None:
    """After any sequence of reports, the incrementally kept table is what one fresh pass builds."""
    async def scenario() -> None:
        apply(hub, EXAMPLE)
        sessions = {n: hub.connect(n, "s", hello(n)) for n in ("host-a", "host-b", "host-c")}
        pool = [att(f"e{i}", f"02:00:00:dd:00:{i:02x}", f"203.0.113.{40 + i % 6}", netns=f"ns{i % 3}")
                for i in range(12)]
        steps = [("host-a", pool[0:4]), ("host-b", pool[2:7]), ("host-c", pool[5:12]), ("host-a", pool[8:10]),
                 ("host-b", []), ("host-c", pool[0:3]), ("host-a", pool[3:9]), ("host-b", pool[::2])]
        for node, raws in steps:
            hub.endpoints_reported(sessions[node], raws)
            table = hub._claims
            assert table is not None
            held = (dict(table.names), dict(table.claims), dict(table.slots), table.count)
            attached = dict(hub.attached)
            accepted = {n: [e.name for e in eps] for n, eps in attached.items()}
            everything = [e.name for eps in attached.values() for e in eps]
            assert len(everything) == len(set(everything)), accepted
            hub.revalidate_attached()  # earliest accepted first: the same outcome
            assert hub.attached == attached, (node, accepted)
            fresh = hub._claims
            assert isinstance(fresh, AttachedClaims) and fresh is not table
            assert (fresh.names, fresh.claims, fresh.slots, fresh.count) == held
    run(scenario())


def test_a_stored_spec_or_key_the_validators_now_refuse_does_not_stop_the_controller(tmp_path: Path) -> None:
    """Revisions and keys stored by an older, laxer version: the controller starts with nothing to say (agents
    keep their last state), says why, and the next valid apply works."""
    store = SQLiteStore(tmp_path / "c.db")
    bad = copy.deepcopy(EXAMPLE)
    bad["segments"][0]["name"] = "blue\n"  # accepted once by `re.match(...$)`
    store.add_revision(yaml.safe_dump(bad), "old-version", "")
    store.set_wireguard_key("host-a", wg_key("host-a") + "\n", [])
    store.set_wireguard_key("host-b", wg_key("host-b"), [])
    hub = Hub(store)
    with capture_logs() as logs:
        hub.load()
    assert hub.spec is None and hub.spec_revision == 1
    assert set(hub.public_keys) == {"host-b"}
    assert {e["event"] for e in logs} >= {"stored_spec_refused", "stored_key_refused"}

    async def scenario() -> None:
        session = hub.connect("host-c", "serial-c", hello("host-c"))
        assert drain(session) == []  # nothing to say: the agent keeps what it has
        assert apply(hub, EXAMPLE) == 2
        assert [m.update.WhichOneof("body") for m in drain(session)] == ["snapshot"]

    run(scenario())
