"""Failed joins per source address: a sliding window, so a token cannot be guessed at line rate.

Tokens carry 256 random bits, so guessing is hopeless anyway; the throttle
keeps the bootstrap listener (the one endpoint without client
authentication) cheap to run and its audit log readable under a flood.
Only failures count: a host that joins correctly is never slowed down.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

MAX_TRACKED = 100_000  # addresses remembered at most (oldest forgotten first)


def peer_address(peer: str) -> str:
    """The address part of a gRPC peer string (``ipv4:192.0.2.7:53422``, ``ipv6:[2001:db8::7]:53422``)."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    if kind == "ipv6":
        return rest.rpartition(":")[0].strip("[]")
    return peer


class FailureThrottle:
    def __init__(self, limit: int, window: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window = window
        self.clock = clock
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, address: str) -> deque[float]:
        stamps = self._failures.get(address)
        if stamps is None:
            return deque()
        cutoff = self.clock() - self.window
        while stamps and stamps[0] <= cutoff:
            stamps.popleft()
        if not stamps:
            del self._failures[address]
        return stamps

    def retry_after(self, address: str) -> float:
        """0 if ``address`` may try now, else the seconds until its oldest counted failure expires."""
        if self.limit <= 0:
            return 0.0  # throttling disabled
        stamps = self._recent(address)
        if len(stamps) < self.limit:
            return 0.0
        return max(0.0, stamps[0] + self.window - self.clock())

    def failed(self, address: str) -> None:
        if address not in self._failures and len(self._failures) >= MAX_TRACKED:
            del self._failures[next(iter(self._failures))]
        self._failures.setdefault(address, deque()).append(self.clock())
