"""IPsec rotation state machine (core/encryption/ipsec_epochs.py): make before break, never cleartext.

Two machines, one per end of a pair, exchange confirmations through a list that stands for the control
channel; "kernel" actions are recorded. The invariant checked after every step: whatever a side sends
with, the other side has installed (no packet is ever sent under keys the receiver cannot decrypt)."""

from __future__ import annotations

import pytest

from veilnet_agent.core.encryption.ipsec_epochs import (
    InstallInbound,
    PeerRotation,
    RemoveGeneration,
    SendConfirmation,
    SwitchOutbound,
    Unconfirmed,
    rotation_due,
)


def swap(g: tuple[int, int]) -> tuple[int, int]:
    return (g[1], g[0])


def test_first_keys_switch_only_after_the_peer_confirms() -> None:
    a = PeerRotation()
    assert a.keys_available((1, 1), 0) == [InstallInbound((1, 1))]
    assert a.keys_available((1, 1), 0) == []  # idempotent
    assert a.inbound_installed((1, 1), 0.1) == [SendConfirmation((1, 1))]
    assert a.outbound is None  # not before the peer can decrypt
    assert a.peer_confirmed((1, 1), 0.2) == [SwitchOutbound((1, 1), None)]
    assert a.outbound == (1, 1)


def test_the_peers_confirmation_may_arrive_before_our_own_inbound_is_installed() -> None:
    a = PeerRotation()
    a.keys_available((1, 1), 0)
    assert a.peer_confirmed((1, 1), 0.1) == []  # our inbound is not there yet: the peer cannot get replies
    assert a.inbound_installed((1, 1), 0.2) == [SendConfirmation((1, 1)), SwitchOutbound((1, 1), None)]


def test_old_generations_are_removed_only_after_the_grace_period() -> None:
    a = PeerRotation(grace_s=30)
    for g, t in (((1, 1), 0.0), ((2, 1), 100.0)):
        a.keys_available(g, t)
        a.inbound_installed(g, t)
        a.peer_confirmed(g, t)
    assert a.outbound == (2, 1)
    assert a.tick(129.9) == []
    assert a.tick(130.0) == [RemoveGeneration((1, 1))]
    assert (1, 1) not in a.inbound and a.tick(1000) == []


def test_a_peer_that_never_confirms_is_reported_once_and_keeps_the_working_generation() -> None:
    a = PeerRotation(confirm_timeout_s=60)
    for action in (a.keys_available((1, 1), 0), a.inbound_installed((1, 1), 0), a.peer_confirmed((1, 1), 0)):
        assert action
    a.keys_available((2, 1), 10)
    a.inbound_installed((2, 1), 10)
    assert a.tick(69) == []
    assert a.tick(70) == [Unconfirmed((2, 1), 60, (1, 1))]
    assert a.tick(200) == []  # reported once
    assert a.outbound == (1, 1)  # never cleartext, never a generation the peer cannot decrypt
    assert RemoveGeneration((1, 1)) not in a.tick(10_000)


def test_stale_events_change_nothing() -> None:
    a = PeerRotation()
    for g in ((1, 1), (2, 2)):
        a.keys_available(g, 0)
        a.inbound_installed(g, 0)
        a.peer_confirmed(g, 0)
    assert a.keys_available((1, 2), 1) == []  # older than what we send with
    assert a.peer_confirmed((1, 1), 1) == []
    assert a.inbound_installed((9, 9), 1) == []  # never asked for


@pytest.mark.parametrize("rotations", [1, 10])
def test_two_ends_rotating_never_send_under_keys_the_other_cannot_decrypt(rotations: int) -> None:
    """Both ends rotate in turn (10 rotations in the issue's test); messages are delivered late and in
    batches. After every step, each side's outbound generation is installed inbound on the other side."""
    ends = {"a": PeerRotation(grace_s=5), "b": PeerRotation(grace_s=5)}
    other = {"a": "b", "b": "a"}
    epochs = {"a": 1, "b": 1}
    wire: list[tuple[str, tuple[int, int]]] = []  # (to, generation from the receiver's side)
    now = 0.0

    def gen(side: str) -> tuple[int, int]:
        return (epochs[side], epochs[other[side]])

    def run(side: str, actions: list[object]) -> None:
        for action in actions:
            if isinstance(action, InstallInbound):
                run(side, ends[side].inbound_installed(action.generation, now))
            elif isinstance(action, SendConfirmation):
                wire.append((other[side], swap(action.generation)))

    def check() -> None:
        for side in "ab":
            out = ends[side].outbound
            if out is not None:
                assert swap(out) in ends[other[side]].inbound, (side, out, ends[other[side]].inbound)

    def deliver() -> None:
        while wire:
            to, g = wire.pop(0)
            ends[to].peer_confirmed(g, now)
            check()

    for side in "ab":
        run(side, ends[side].keys_available(gen(side), now))
    deliver()
    assert ends["a"].outbound == (1, 1) and ends["b"].outbound == (1, 1)
    for i in range(rotations):
        rotating = "ab"[i % 2]
        epochs[rotating] += 1
        now += 1
        for side in "ab":  # the new half reaches both ends (the rotating one first)
            run(side, ends[side].keys_available(gen(side), now))
            check()
        now += 0.5
        deliver()
        for side in "ab":
            for action in ends[side].tick(now + 10):
                assert not isinstance(action, Unconfirmed), action
            check()
    assert ends["a"].outbound == gen("a") and ends["b"].outbound == gen("b")
    assert all(len(end.inbound) == 1 for end in ends.values())  # old generations gone after the grace


def test_rotation_is_due_by_time_volume_or_request() -> None:
    assert rotation_due(0, 10, 0) is None
    assert rotation_due(0, 3600, 0) == "time"
    assert rotation_due(0, 10, 2**31) == "volume"
    assert rotation_due(0, 10, 0, requested=True) == "requested"
    assert rotation_due(0, 10, 0, lifetime_s=5) == "time"
