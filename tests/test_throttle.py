"""The join throttle: only failures count, per address, in a sliding window."""

from __future__ import annotations

from veilnet_controller.throttle import FailureThrottle, peer_address


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_addresses_are_taken_from_grpc_peer_strings() -> None:
    assert peer_address("ipv4:192.0.2.7:53422") == "192.0.2.7"
    assert peer_address("ipv6:[2001:db8::7]:53422") == "2001:db8::7"
    assert peer_address("unix:/run/x.sock") == "unix:/run/x.sock"


def test_limit_per_address_and_window() -> None:
    clock = Clock()
    t = FailureThrottle(limit=3, window=60, clock=clock)
    for _ in range(3):
        assert t.retry_after("192.0.2.7") == 0
        t.failed("192.0.2.7")
        clock.now += 1
    assert t.retry_after("192.0.2.7") == 57  # the first failure expires 60 s after it happened
    assert t.retry_after("192.0.2.8") == 0  # another address is not affected
    clock.now += 57
    assert t.retry_after("192.0.2.7") == 0
