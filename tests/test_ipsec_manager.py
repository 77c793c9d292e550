"""The IPsec key manager between two (or three) nodes, messages passed by hand: keys, make before break.

The invariant checked at every step: whatever one node would send with (its newest outbound SA to a
peer) the peer can already decrypt (it holds the same SA inbound), and nothing is ever without an SA
once established. The kernel and the controller are simulated: "installed" is what the manager asked for.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from veilnet_agent.core.encryption import ipsec_keys as keys
from veilnet_agent.core.model import NodeState, Peer, empty_state
from veilnet_agent.core.objects import XfrmSa
from veilnet_agent.dataplane.ipsec_manager import ADOPTED, Changes, IpsecManager

ADDRESSES = {"a": "192.0.2.1", "b": "192.0.2.2", "c": "192.0.2.3"}


class Log:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def info(self, event: str, **kw: Any) -> None:
        self.events.append((event, kw))

    warning = info


@dataclass
class Node:
    name: str
    key: ec.EllipticCurvePrivateKey
    manager: IpsecManager
    log: Log
    outbox: list[tuple[str, Any]] = field(default_factory=list)  # (kind, payload)


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def state_for(name: str, peers: list[str]) -> NodeState:
    state = empty_state(name, ipaddress.ip_interface("10.99.0.1/24"))
    peer_objs = tuple(
        Peer(p, ipaddress.ip_address(ADDRESSES[p]), 51820, "x" * 43 + "=", ipaddress.ip_address(f"10.99.0.{i + 2}"),
             0, ())
        for i, p in enumerate(peers)
    )
    return replace(state, peers=peer_objs, encryption="ipsec")


@pytest.fixture
def net() -> tuple[dict[str, Node], Clock]:
    clock = Clock()
    signers = {n: ec.generate_private_key(ec.SECP256R1()) for n in ADDRESSES}

    def check(pem: bytes) -> tuple[str, ec.EllipticCurvePublicKey]:
        name = pem.decode()  # the test's "certificate" is the node name; the real check is in the daemon
        if name not in signers:
            raise ValueError("not issued by this network's CA")
        return name, signers[name].public_key()

    nodes = {}
    for n in ADDRESSES:
        log = Log()
        nodes[n] = Node(n, signers[n], IpsecManager(n, signers[n], check, log, clock=clock, grace_s=30,
                                                    confirm_timeout_s=60), log)
    return nodes, clock


def installed(node: Node) -> set[tuple[str, str, int]]:
    return {sa.ident for sas in node.manager.sas().values() for sa in sas}


def handle(nodes: dict[str, Node], name: str, changes: Changes) -> None:
    """Apply one node's changes as the daemon would: install (the kernel always accepts), send messages."""
    node = nodes[name]
    for _ in range(8):
        if changes.publish is not None:
            for other in nodes.values():  # the controller relays to peers (those that know the sender)
                if other.name != name and name in other.manager.peers:
                    other.outbox.append(("key", changes.publish))
        for peer, (ours, theirs) in changes.confirmations:
            nodes[peer].outbox.append(("ready", (name, ours, theirs)))
        if not changes.peers:
            return
        changes = node.manager.installed(installed(node))


def deliver(nodes: dict[str, Node]) -> None:
    for _ in range(20):
        busy = False
        for node in nodes.values():
            while node.outbox:
                busy = True
                kind, payload = node.outbox.pop(0)
                if kind == "key":
                    changes = node.manager.receive_key(payload, payload.node.encode())
                else:
                    changes = node.manager.peer_ready(*payload)
                handle(nodes, node.name, changes)
                check_invariant(nodes)
        if not busy:
            return


def outbound(node: Node, peer: str) -> XfrmSa | None:
    """The SA the kernel sends with: the newest added outbound (the manager lists them oldest first)."""
    sas = [sa for sa in node.manager.sas_of(peer) if sa.src == ADDRESSES[node.name]]
    return sas[-1] if sas else None


def check_invariant(nodes: dict[str, Node]) -> None:
    for node in nodes.values():
        for peer in node.manager.peers:
            sending = outbound(node, peer)
            if sending is not None:
                assert sending in nodes[peer].manager.sas_of(node.name), (node.name, peer, sending)


def start(nodes: dict[str, Node], pairs: dict[str, list[str]]) -> None:
    for name, peers in pairs.items():
        handle(nodes, name, nodes[name].manager.configure(state_for(name, peers), ADDRESSES[name]))
    for name, peers in pairs.items():  # the controller sends every stored key on connect
        for peer in peers:
            published = nodes[peer].manager.published
            assert published is not None
            nodes[name].outbox.append(("key", published))
    deliver(nodes)


def test_two_nodes_agree_on_a_pair_of_sas_and_each_sends_what_the_other_decrypts(net: Any) -> None:
    nodes, _ = net
    start(nodes, {"a": ["b"], "b": ["a"]})
    a_out, b_out = outbound(nodes["a"], "b"), outbound(nodes["b"], "a")
    assert a_out is not None and b_out is not None
    assert a_out in nodes["b"].manager.sas_of("a") and b_out in nodes["a"].manager.sas_of("b")
    assert a_out.spi != b_out.spi and a_out.key != b_out.key  # one key and SPI per direction
    assert len(a_out.key) == 36 and a_out.replay_window == 4096
    assert nodes["a"].manager.peer_status("b")["state"] == "established"


def test_ten_rotations_never_leave_a_sender_without_the_receivers_sa_and_old_sas_go_after_grace(net: Any) -> None:
    nodes, clock = net
    start(nodes, {"a": ["b"], "b": ["a"]})
    for i in range(10):
        rotating = nodes["a" if i % 2 == 0 else "b"]
        before = outbound(rotating, "b" if rotating.name == "a" else "a")
        handle(nodes, rotating.name, rotating.manager.new_epoch("requested"))
        check_invariant(nodes)
        deliver(nodes)
        after = outbound(rotating, "b" if rotating.name == "a" else "a")
        assert after is not None and before is not None and after.spi != before.spi, i
        clock.now += 31
        for node in nodes.values():
            handle(nodes, node.name, node.manager.tick())
        check_invariant(nodes)
    # after the grace period only the current generation's two SAs are left on each side
    assert len(nodes["a"].manager.sas_of("b")) == 2 and len(nodes["b"].manager.sas_of("a")) == 2
    assert nodes["a"].manager.rotations == 5


def test_an_old_epochs_private_key_is_gone_once_a_new_epoch_exists(net: Any) -> None:
    nodes, _ = net
    start(nodes, {"a": ["b"], "b": ["a"]})
    old = nodes["a"].manager.epoch
    handle(nodes, "a", nodes["a"].manager.new_epoch("requested"))
    assert old is not None and old.retired
    with pytest.raises(ValueError, match="retired"):
        old.exchange(b"\x09" + b"\x00" * 31)


def test_outbound_waits_for_the_peers_confirmation(net: Any) -> None:
    nodes, _ = net
    start(nodes, {"a": ["b"], "b": ["a"]})
    current = outbound(nodes["a"], "b")
    handle(nodes, "a", nodes["a"].manager.new_epoch("requested"))
    # b has a's new key in its outbox but has not processed it: a still sends with the old SA
    assert outbound(nodes["a"], "b") == current
    deliver(nodes)
    assert outbound(nodes["a"], "b") != current


def test_a_peer_that_never_confirms_keeps_the_working_generation_and_is_reported(net: Any) -> None:
    nodes, clock = net
    start(nodes, {"a": ["b"], "b": ["a"]})
    current = outbound(nodes["a"], "b")
    handle(nodes, "a", nodes["a"].manager.new_epoch("requested"))
    nodes["b"].outbox.clear()  # b never hears of it
    clock.now += 61
    handle(nodes, "a", nodes["a"].manager.tick())
    assert outbound(nodes["a"], "b") == current  # never without an SA, never cleartext
    assert any(e == "ipsec_peer_unconfirmed" for e, _ in nodes["a"].log.events)
    assert nodes["a"].manager.peer_status("b")["state"] in ("rotating", "unconfirmed")


def test_forged_stale_and_foreign_keys_are_refused(net: Any) -> None:
    nodes, _ = net
    start(nodes, {"a": ["b"], "b": ["a"]})
    b_key = nodes["b"].manager.published
    assert b_key is not None
    forged = replace(b_key, epoch=b_key.epoch + 1)  # signature no longer covers it
    with pytest.raises(keys.KeyRefused, match="signature"):
        nodes["a"].manager.receive_key(forged, b"b")
    assert not nodes["a"].manager.receive_key(b_key, b"b")  # the accepted one again (a reconnect): nothing new
    stale = keys.EpochKey.generate("b", b_key.epoch - 1, b_key.created, 3600).publish(nodes["b"].key)
    with pytest.raises(keys.KeyRefused, match="stale or replayed"):  # validly signed, but older
        nodes["a"].manager.receive_key(stale, b"b")
    c_key = nodes["c"].manager.new_epoch("start").publish
    assert c_key is not None
    with pytest.raises(keys.KeyRefused, match="not a peer"):
        nodes["a"].manager.receive_key(c_key, b"c")
    with pytest.raises(keys.KeyRefused, match="certificate is not accepted"):
        nodes["a"].manager.receive_key(replace(b_key, epoch=b_key.epoch + 5), b"mallory")
    signed_by_c = keys.EpochKey.generate("b", b_key.epoch + 9, b_key.created, 3600).publish(nodes["c"].key)
    with pytest.raises(keys.KeyRefused, match="not its own"):
        nodes["a"].manager.receive_key(signed_by_c, b"c")


def test_a_restart_adopts_the_kernels_sas_and_replaces_them_make_before_break(net: Any) -> None:
    nodes, clock = net
    start(nodes, {"a": ["b"], "b": ["a"]})
    kernel = {sa.ident: sa for sa in nodes["a"].manager.sas_of("b")}
    old_nodes = dict(nodes)
    restarted = IpsecManager("a", nodes["a"].key, nodes["a"].manager.check_certificate, Log(), clock=clock,
                             grace_s=30)
    restarted.adopt(kernel)
    nodes["a"] = replace(old_nodes["a"], manager=restarted, outbox=[])
    handle(nodes, "a", restarted.configure(state_for("a", ["b"]), ADDRESSES["a"]))
    assert set(restarted.sas_of("b")) == set(kernel.values())  # nothing recreated, nothing removed
    assert restarted.peer_status("b")["generation"] == ADOPTED
    nodes["a"].outbox.append(("key", nodes["b"].manager.published))  # the controller's stored key
    nodes["b"].outbox.append(("key", restarted.published))
    deliver(nodes)
    assert restarted.peer_status("b")["generation"] != ADOPTED
    assert set(kernel.values()) <= set(restarted.sas_of("b"))  # the adopted ones stay through the grace
    clock.now += 31
    handle(nodes, "a", restarted.tick())
    assert not set(kernel.values()) & set(restarted.sas_of("b"))


def test_a_removed_peer_loses_its_sas_at_once(net: Any) -> None:
    nodes, _ = net
    start(nodes, {"a": ["b", "c"], "b": ["a"], "c": ["a"]})
    assert nodes["a"].manager.sas_of("c")
    changes = nodes["a"].manager.configure(state_for("a", ["b"]), ADDRESSES["a"])
    assert "c" in changes.peers and nodes["a"].manager.sas_of("c") == ()
    assert nodes["a"].manager.sas_of("b")


def test_rotation_is_due_by_time_by_volume_and_on_request(net: Any) -> None:
    from veilnet_agent.core.objects import SaCounters

    nodes, clock = net
    start(nodes, {"a": ["b"], "b": ["a"]})
    manager = nodes["a"].manager
    assert manager.rotation_due({}) is None
    sa = outbound(nodes["a"], "b")
    assert sa is not None
    assert manager.rotation_due({sa.ident: SaCounters(packets=2**31)}) == "volume"
    clock.now += 3600
    assert manager.rotation_due({}) == "time"
