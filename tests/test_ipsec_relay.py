"""The controller's IPsec relay (hub): epoch keys and SA confirmations go only to nodes sharing a segment with
their sender, unchanged but for the sender's certificate, after the state update that made the sender a peer."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from factories import wg_key
from structlog.testing import capture_logs
from test_rpc_guard import Harness

from veilnet.v1 import controller_pb2 as cpb
from veilnet_agent.control import wire
from veilnet_controller.hub import Hub
from veilnet_controller.spec import parse_spec
from veilnet_controller.store import SQLiteStore

EXAMPLE = yaml.safe_load((Path(__file__).parents[1] / "examples" / "network.yaml").read_text())
NODES = ("host-a", "host-b", "host-c", "host-d")


def spec(d_segments: tuple[str, ...] = ("green",), **top: Any) -> dict[str, Any]:
    """The example in IPsec mode plus host-d: by default in green only, so it shares no segment with host-c
    (blue only); host-a and host-b carry both."""
    raw = copy.deepcopy(EXAMPLE)
    raw["encryption"] = "ipsec"
    raw["nodes"].append({"name": "host-d", "underlay_address": "192.0.2.14", "transport_address": "198.51.100.14/24",
                         "segments": list(d_segments)})
    raw.update(top)
    return raw


def cert(node: str, version: int = 1) -> bytes:
    return f"-----BEGIN CERTIFICATE-----\n{node} v{version}\n-----END CERTIFICATE-----\n".encode()


def key(node: str, epoch: int = 1, **fields: Any) -> cpb.EpochKey:
    values: dict[str, Any] = {"node": node, "epoch": epoch, "created": 1_700_000_000 + epoch,
                              "expires": 1_700_007_200 + epoch, "public_key": bytes([epoch % 256]) * 32,
                              "signature": b"\x30\x44" + b"\x02" * 68}
    values.update(fields)
    return cpb.EpochKey(**values)


def drain(session: Any) -> list[cpb.ControllerMessage]:
    out = []
    while (m := session.next_message()) is not None:
        out.append(m)
    return out


def kinds(messages: list[cpb.ControllerMessage]) -> list[str]:
    return [str(m.WhichOneof("kind")) for m in messages]


def keys_in(messages: list[cpb.ControllerMessage]) -> list[tuple[str, int]]:
    return [(m.epoch_key.node, m.epoch_key.epoch) for m in messages if m.WhichOneof("kind") == "epoch_key"]


class Net:
    """A hub with a real store, a spec applied and (optionally) every node connected and drained."""

    def __init__(self, tmp_path: Path) -> None:
        self.hub = Hub(SQLiteStore(tmp_path / "c.db"))
        self.hub.load()
        self.sessions: dict[str, Any] = {}

    def apply(self, raw: dict[str, Any]) -> int:
        record = self.hub.store.add_revision(yaml.safe_dump(raw), "test", "")
        self.hub.set_spec(parse_spec(raw), record.number)
        return record.number

    def connect(self, node: str, version: int = 1) -> Any:
        session = self.hub.connect(node, f"serial-{node}-{version}", cpb.Hello(wireguard_public_key=wg_key(node)),
                                   certificate_pem=cert(node, version))
        self.sessions[node] = session
        return session

    async def start(self, raw: dict[str, Any], nodes: tuple[str, ...] = NODES) -> None:
        self.apply(raw)
        for n in nodes:
            self.connect(n)
        await settle(self.hub)
        for s in self.sessions.values():
            drain(s)

    def audited(self, action: str) -> list[dict[str, Any]]:
        entries, _ = self.hub.store.audit(10_000)
        return [dict(e.detail) | {"actor": e.actor, "serial": e.actor_serial} for e in entries if e.action == action]


async def settle(hub: Hub) -> None:
    task = hub._recompile_task
    if task is not None:
        await asyncio.wait_for(asyncio.shield(task), timeout=10)


@pytest.fixture
def net(tmp_path: Path) -> Net:
    return Net(tmp_path)


# --------------------------------------------------------------------------- who gets a key


def test_a_key_is_relayed_only_to_nodes_sharing_a_segment_with_the_certificate_attached(net: Net) -> None:
    async def scenario() -> None:
        await net.start(spec())
        sent = key("host-c", 1)
        assert net.hub.epoch_key_reported(net.sessions["host-c"], sent)
        got = {n: drain(s) for n, s in net.sessions.items()}
        assert got["host-d"] == [], "host-d shares no segment with host-c"
        assert got["host-c"] == [], "not back to its sender"
        for n in ("host-a", "host-b"):
            (msg,) = got[n]
            relayed = msg.epoch_key
            assert relayed.certificate_pem == cert("host-c")
            expected = cpb.EpochKey()
            expected.CopyFrom(sent)
            expected.certificate_pem = cert("host-c")
            assert relayed == expected, "unchanged but for the certificate"
        # host-d's key goes to host-a and host-b only
        assert net.hub.epoch_key_reported(net.sessions["host-d"], key("host-d", 7))
        got = {n: keys_in(drain(s)) for n, s in net.sessions.items()}
        assert got == {"host-a": [("host-d", 7)], "host-b": [("host-d", 7)], "host-c": [], "host-d": []}
    asyncio.run(scenario())


def test_the_controller_keeps_the_newest_key_in_memory_only(net: Net, tmp_path: Path) -> None:
    async def scenario() -> None:
        await net.start(spec())
        net.hub.epoch_key_reported(net.sessions["host-a"], key("host-a", 1))
        net.hub.epoch_key_reported(net.sessions["host-a"], key("host-a", 2))
        assert net.hub.epoch_keys["host-a"].epoch == 2
        assert not net.hub.epoch_keys["host-a"].certificate_pem
        restarted = Hub(SQLiteStore(tmp_path / "c.db"))
        restarted.load()
        assert restarted.epoch_keys == {}
    asyncio.run(scenario())


# --------------------------------------------------------------------------- refusals

REFUSED = [
    ("wrong-node", lambda: key("host-b", 5), "names node 'host-b', not the stream's node 'host-a'"),
    ("public-key-length", lambda: key("host-a", 5, public_key=b"\x01" * 31), "public_key is 31 bytes, not 32"),
    ("public-key-length", lambda: key("host-a", 5, public_key=b"\x01" * 33), "public_key is 33 bytes, not 32"),
    ("signature-length", lambda: key("host-a", 5, signature=b""), "signature is 0 bytes (1..200)"),
    ("signature-length", lambda: key("host-a", 5, signature=b"\x30" * 201), "signature is 201 bytes (1..200)"),
    ("certificate-set", lambda: key("host-a", 5, certificate_pem=cert("host-a")),
     "certificate_pem is the controller's to fill in"),
    ("stale-epoch", lambda: key("host-a", 3, public_key=b"\x07" * 32), "epoch 3 is not newer than epoch 3"),
    ("stale-epoch", lambda: key("host-a", 2), "epoch 2 is not newer than epoch 3"),
]


@pytest.mark.parametrize(("kind", "make", "reason"), REFUSED, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(REFUSED)])
def test_a_refused_key_is_not_relayed_but_logged_and_audited_and_the_stream_stays(
        net: Net, kind: str, make: Any, reason: str) -> None:
    async def scenario() -> None:
        await net.start(spec())
        a = net.sessions["host-a"]
        assert net.hub.epoch_key_reported(a, key("host-a", 3))
        for s in net.sessions.values():
            drain(s)
        with capture_logs() as logs:
            assert net.hub.epoch_key_reported(a, make()) is False
        assert all(drain(s) == [] for s in net.sessions.values()), "nothing relayed"
        assert net.hub.epoch_keys["host-a"] == key("host-a", 3), "the stored key is unchanged"
        assert a.closed_reason is None and net.hub.sessions["host-a"] is a
        (entry,) = [e for e in logs if e["event"] == "epoch_key_refused"]
        assert entry["log_level"] == "warning" and entry["node"] == "host-a" and entry["kind"] == kind
        assert reason in entry["reason"], entry
        (audit,) = net.audited("node.epoch-key-refused")
        assert (audit["actor"], audit["kind"]) == ("host-a", kind)
        assert reason in audit["reason"]
    asyncio.run(scenario())


def test_the_stored_key_published_again_after_a_reconnect_is_taken_quietly(net: Net) -> None:
    async def scenario() -> None:
        await net.start(spec())
        a = net.sessions["host-a"]
        assert net.hub.epoch_key_reported(a, key("host-a", 3))
        for s in net.sessions.values():
            drain(s)
        with capture_logs() as logs:
            assert net.hub.epoch_key_reported(a, key("host-a", 3)) is True
        assert not [e for e in logs if e["event"] == "epoch_key_refused"] and not net.audited("node.epoch-key-refused")
        assert all(drain(s) == [] for s in net.sessions.values()), "nothing relayed again"
    asyncio.run(scenario())


def test_a_refused_key_of_a_node_not_the_streams_is_never_stored_under_either_name(net: Net) -> None:
    async def scenario() -> None:
        await net.start(spec())
        assert not net.hub.epoch_key_reported(net.sessions["host-a"], key("host-b", 1))
        assert net.hub.epoch_keys == {}
        net.connect("host-c")
        assert keys_in(drain(net.sessions["host-c"])) == []
    asyncio.run(scenario())


def test_repeated_refusals_are_logged_each_time_and_audited_once_per_kind_per_stream(net: Net) -> None:
    async def scenario() -> None:
        await net.start(spec())
        a = net.sessions["host-a"]
        with capture_logs() as logs:
            for _ in range(5):
                net.hub.epoch_key_reported(a, key("host-a", 1, signature=b""))
            net.hub.epoch_key_reported(a, key("host-z", 1))
        assert sum(e["event"] == "epoch_key_refused" for e in logs) == 6
        assert [e["kind"] for e in net.audited("node.epoch-key-refused")] == ["signature-length", "wrong-node"]
        again = net.connect("host-a", 2)  # a new stream audits again
        net.hub.epoch_key_reported(again, key("host-a", 1, signature=b""))
        assert len(net.audited("node.epoch-key-refused")) == 3
    asyncio.run(scenario())


# --------------------------------------------------------------------------- when a key is sent


def test_a_relayed_key_comes_after_the_state_update_that_made_its_signer_a_peer(net: Net) -> None:
    async def scenario() -> None:
        await net.start(spec())
        d = net.sessions["host-d"]
        net.hub.epoch_key_reported(net.sessions["host-c"], key("host-c", 4))
        assert drain(d) == [], "not yet a peer"
        net.apply(spec(d_segments=("blue", "green")))  # host-d now carries blue: host-c becomes its peer
        first = d.next_message()
        assert first is not None and first.WhichOneof("kind") == "update"
        delta = wire.delta_from_proto(first.update.delta)
        assert "host-c" in {p["name"] for p in delta.peer_upserts}
        second = d.next_message()
        assert second is not None and keys_in([second]) == [("host-c", 4)]
        assert second.epoch_key.certificate_pem == cert("host-c")
        assert d.next_message() is None
        # and host-c gets host-d's stored key?  host-d has none yet: nothing but the state
        assert kinds(drain(net.sessions["host-c"])) == ["update"]
    asyncio.run(scenario())


def test_a_key_queued_before_a_pending_state_update_still_waits_for_it(net: Net) -> None:
    """Commands first, then the state update, then relays: also when the relay was queued first."""
    async def scenario() -> None:
        await net.start(spec())
        a = net.sessions["host-a"]
        net.hub.epoch_key_reported(net.sessions["host-b"], key("host-b", 1))  # queued to host-a
        raw = spec()
        next(p for p in raw["policies"] if p["name"] == "web-to-api")["ports"] = [9090]
        net.apply(raw)  # a new state update for host-a, after the key was queued
        net.hub.command("host-a", cpb.Command.RESYNC)
        assert kinds(drain(a)) == ["command", "update", "epoch_key"]
    asyncio.run(scenario())


def test_a_key_whose_signer_stopped_being_a_peer_before_it_was_sent_is_not_sent(net: Net) -> None:
    async def scenario() -> None:
        await net.start(spec())
        a = net.sessions["host-a"]
        net.hub.epoch_key_reported(net.sessions["host-c"], key("host-c", 1))  # queued to host-a
        raw = spec()
        raw["nodes"][0]["segments"] = ["green"]  # host-a leaves blue: host-c is no longer its peer
        raw["endpoints"] = [e for e in raw["endpoints"] if not (e["node"] == "host-a" and e["segment"] == "blue")]
        net.apply(raw)
        assert kinds(drain(a)) == ["update"]
        net.apply(spec())  # and back: the key is queued again, after the state
        messages = drain(a)
        assert kinds(messages) == ["update", "epoch_key"] and keys_in(messages) == [("host-c", 1)]
    asyncio.run(scenario())


def test_a_connecting_node_gets_the_stored_keys_of_its_peers_after_its_snapshot(net: Net) -> None:
    async def scenario() -> None:
        await net.start(spec(), nodes=("host-a", "host-b", "host-d"))
        for n in ("host-a", "host-b", "host-d"):
            net.hub.epoch_key_reported(net.sessions[n], key(n, 2))
        for s in net.sessions.values():
            drain(s)
        c = net.connect("host-c")
        messages = drain(c)
        assert kinds(messages) == ["update", "epoch_key", "epoch_key"]
        assert messages[0].update.WhichOneof("body") == "snapshot"
        assert keys_in(messages) == [("host-a", 2), ("host-b", 2)], "not host-d's: no shared segment"
        await settle(net.hub)  # host-c's new key makes it a peer elsewhere: a recompile
        assert keys_in(drain(c)) == [], "each (node, epoch) once per stream"
        again = net.connect("host-c")  # a new stream gets them again
        assert keys_in(drain(again)) == [("host-a", 2), ("host-b", 2)]
    asyncio.run(scenario())


def test_a_new_peer_after_a_recompile_gets_the_stored_key_once(net: Net) -> None:
    async def scenario() -> None:
        await net.start(spec())
        net.hub.epoch_key_reported(net.sessions["host-c"], key("host-c", 9))
        d = net.sessions["host-d"]
        net.apply(spec(d_segments=("blue", "green")))
        assert keys_in(drain(d)) == [("host-c", 9)]
        raw = spec(d_segments=("blue", "green"))
        next(p for p in raw["policies"] if p["name"] == "web-to-api")["ports"] = [9191]
        net.apply(raw)  # another recompile, host-c still a peer: not again
        assert kinds(drain(d)) == ["update"]
        net.hub.recompile_now()
        assert drain(d) == []
        net.hub.epoch_key_reported(net.sessions["host-c"], key("host-c", 10))  # a new epoch: yes
        assert keys_in(drain(d)) == [("host-c", 10)]
    asyncio.run(scenario())


def test_a_newer_key_replaces_an_older_one_still_waiting(net: Net) -> None:
    async def scenario() -> None:
        await net.start(spec())
        c = net.sessions["host-c"]
        for epoch in (1, 2, 3):
            net.hub.epoch_key_reported(c, key("host-c", epoch))
        assert keys_in(drain(net.sessions["host-a"])) == [("host-c", 3)]
    asyncio.run(scenario())


def test_a_reconnect_with_a_renewed_certificate_relays_the_new_one(net: Net) -> None:
    async def scenario() -> None:
        await net.start(spec())
        net.hub.epoch_key_reported(net.sessions["host-c"], key("host-c", 1))
        assert drain(net.sessions["host-a"])[0].epoch_key.certificate_pem == cert("host-c", 1)
        renewed = net.connect("host-c", 2)
        net.hub.epoch_key_reported(renewed, key("host-c", 2))
        assert drain(net.sessions["host-a"])[0].epoch_key.certificate_pem == cert("host-c", 2)
        late = net.connect("host-b", 2)  # the stored key goes out with the newest certificate
        (relayed,) = [m.epoch_key for m in drain(late) if m.WhichOneof("kind") == "epoch_key" and
                      m.epoch_key.node == "host-c"]
        assert (relayed.epoch, relayed.certificate_pem) == (2, cert("host-c", 2))
    asyncio.run(scenario())


def test_revoking_or_rejoining_a_node_forgets_its_key(net: Net) -> None:
    async def scenario() -> None:
        await net.start(spec())
        net.hub.epoch_key_reported(net.sessions["host-c"], key("host-c", 5))
        net.hub.epoch_key_reported(net.sessions["host-b"], key("host-b", 5))
        net.hub.node_rejoined("host-b", ["serial-host-b-1"])
        net.hub.revoke("host-c", ["serial-host-c-1"])
        assert net.hub.epoch_keys.keys() == set() and "host-c" not in net.hub.certificates
        b = net.connect("host-b", 2)
        assert net.hub.epoch_key_reported(b, key("host-b", 1)), "the new host starts its own epochs"
    asyncio.run(scenario())


def test_wireguard_networks_see_no_relay_traffic(net: Net) -> None:
    async def scenario() -> None:
        raw = spec()
        raw["encryption"] = "wireguard"
        await net.start(raw)
        c = net.connect("host-c")
        assert kinds(drain(c)) == ["update"]
    asyncio.run(scenario())


# --------------------------------------------------------------------------- SA confirmations


def test_sa_ready_goes_only_to_the_named_peer_as_coming_from_the_sender(net: Net) -> None:
    async def scenario() -> None:
        await net.start(spec())
        assert net.hub.sa_ready_reported(net.sessions["host-a"],
                                         cpb.SaReady(peer="host-c", sender_epoch=3, receiver_epoch=8))
        got = {n: drain(s) for n, s in net.sessions.items()}
        assert got["host-a"] == got["host-b"] == got["host-d"] == []
        (msg,) = got["host-c"]
        assert msg.sa_ready == cpb.SaReady(peer="host-a", sender_epoch=3, receiver_epoch=8)
    asyncio.run(scenario())


def test_sa_ready_for_a_node_not_sharing_a_segment_or_not_connected_is_dropped(net: Net) -> None:
    async def scenario() -> None:
        await net.start(spec(), nodes=("host-a", "host-c", "host-d"))
        with capture_logs() as logs:
            assert not net.hub.sa_ready_reported(net.sessions["host-d"], cpb.SaReady(peer="host-c", sender_epoch=1))
            assert not net.hub.sa_ready_reported(net.sessions["host-a"], cpb.SaReady(peer="host-b", sender_epoch=1))
            assert not net.hub.sa_ready_reported(net.sessions["host-a"], cpb.SaReady(peer="nobody"))
        assert all(drain(s) == [] for s in net.sessions.values())
        assert [e["log_level"] for e in logs if e["event"] == "sa_ready_dropped"] == ["debug"] * 3
        assert net.audited("node.sa-ready-refused") == []
    asyncio.run(scenario())


def test_sa_ready_naming_the_sender_itself_is_refused_and_audited(net: Net) -> None:
    async def scenario() -> None:
        await net.start(spec())
        a = net.sessions["host-a"]
        with capture_logs() as logs:
            assert not net.hub.sa_ready_reported(a, cpb.SaReady(peer="host-a", sender_epoch=1))
        assert all(drain(s) == [] for s in net.sessions.values())
        assert [e["log_level"] for e in logs if e["event"] == "sa_ready_refused"] == ["warning"]
        assert [e["kind"] for e in net.audited("node.sa-ready-refused")] == ["own-name"]
        assert a.closed_reason is None
    asyncio.run(scenario())


def test_sa_ready_waits_behind_a_pending_state_update_and_the_key_before_it(net: Net) -> None:
    async def scenario() -> None:
        await net.start(spec())
        c = net.sessions["host-c"]
        net.hub.epoch_key_reported(net.sessions["host-a"], key("host-a", 1))
        net.hub.sa_ready_reported(net.sessions["host-a"], cpb.SaReady(peer="host-c", sender_epoch=1))
        raw = spec()
        next(p for p in raw["policies"] if p["name"] == "web-to-api")["ports"] = [9090]
        net.apply(raw)
        assert kinds(drain(c)) == ["update", "epoch_key", "sa_ready"]
    asyncio.run(scenario())


# --------------------------------------------------------------------------- status


def test_per_peer_encryption_status_is_kept_with_the_node(net: Net) -> None:
    async def scenario() -> None:
        await net.start(spec())
        status = cpb.AgentStatus(peers_with_recent_handshake=2, encryption=[
            cpb.PeerEncryption(peer="host-b", mode="ipsec", state="established", epoch=4, peer_epoch=7,
                               epoch_age_seconds=120, bytes_out=1000, packets_out=10, bytes_in=2000,
                               packets_in=20, replay_failures=1, integrity_failures=2),
            cpb.PeerEncryption(peer="host-c", mode="ipsec", state="waiting for keys" + "x" * 500),
        ])
        net.hub.status_reported(net.sessions["host-a"], status)
        first, second = net.hub.runtime["host-a"].encryption
        assert first == {"peer": "host-b", "mode": "ipsec", "state": "established", "epoch": 4, "peer_epoch": 7,
                         "epoch_age_seconds": 120, "bytes_out": 1000, "packets_out": 10, "bytes_in": 2000,
                         "packets_in": 20, "replay_failures": 1, "integrity_failures": 2}
        assert second["state"].startswith("waiting for keys") and len(second["state"]) < 140
        net.hub.status_reported(net.sessions["host-a"], cpb.AgentStatus())  # the next report replaces it
        assert net.hub.runtime["host-a"].encryption == ()
    asyncio.run(scenario())


# --------------------------------------------------------------------------- over the Sync stream


def test_epoch_keys_and_confirmations_on_the_sync_stream_are_relayed_and_a_refusal_keeps_the_stream(
        tmp_path: Path) -> None:
    """Through the real servicer (no TLS here, so no certificate to attach: the field stays empty)."""
    async def scenario(h: Harness) -> None:
        raw = spec()
        record = h.hub.store.add_revision(yaml.safe_dump(raw), "test", "")
        h.hub.set_spec(parse_spec(raw), record.number)
        b = h.hub.connect("host-b", "serial-b", cpb.Hello(wireguard_public_key=wg_key("host-b")),
                          certificate_pem=cert("host-b"))
        c = h.hub.connect("host-c", "serial-c", cpb.Hello(wireguard_public_key=wg_key("host-c")))
        go, done = asyncio.Event(), asyncio.Event()

        async def requests() -> AsyncIterator[cpb.AgentMessage]:
            yield cpb.AgentMessage(hello=cpb.Hello(wireguard_public_key=wg_key("host-a")))
            await go.wait()  # host-a is everyone's peer by then (its key's recompile ran)
            yield cpb.AgentMessage(epoch_key=key("host-a", 1, signature=b""))  # refused
            yield cpb.AgentMessage(epoch_key=key("host-a", 2))
            yield cpb.AgentMessage(sa_ready=cpb.SaReady(peer="host-b", sender_epoch=2, receiver_epoch=1))
            await done.wait()

        call = h.controller.Sync(requests())
        got: list[cpb.ControllerMessage] = []

        async def read() -> None:
            async for m in call:
                got.append(m)

        async def until(condition: Any) -> None:
            for _ in range(500):
                if condition():
                    return
                await asyncio.sleep(0.01)
            raise AssertionError("timed out")

        reader = asyncio.ensure_future(read())
        await until(lambda: "host-a" in h.hub.sessions)
        await settle(h.hub)
        go.set()
        await until(lambda: len(b.relays) >= 2)
        assert h.hub.epoch_keys["host-a"].epoch == 2
        relayed = drain(b)
        assert keys_in(relayed) == [("host-a", 2)] and relayed[-1].sa_ready.peer == "host-a"
        assert keys_in(drain(c)) == [("host-a", 2)]
        assert "host-a" in h.hub.sessions, "the refused key did not end the stream"
        assert got and got[0].update.WhichOneof("body") == "snapshot"
        done.set()
        await asyncio.wait_for(reader, 5)  # raises if the stream ended with an error
        assert await call.code() == grpc.StatusCode.OK

    async def main() -> None:
        async with Harness(tmp_path) as h:
            await scenario(h)

    asyncio.run(main())
