"""When to try failed kernel work again: jittered exponential backoff, bounded by the resync interval.

Like Felix's ``dataplaneNeedsSync``: a failure marks the data plane as needing
another pass, and the pass comes after 0.5 s, then about twice as long after
each further failure, never later than the periodic resync would come anyway.
Jitter (each delay uniform in [d/2, d]) keeps many hosts that failed on the
same controller update from retrying in lockstep.
"""

from __future__ import annotations

import random

INITIAL_RETRY_SECONDS = 0.5


class RetrySchedule:
    def __init__(self, maximum: float, initial: float = INITIAL_RETRY_SECONDS,
                 rng: random.Random | None = None) -> None:
        self.initial = min(initial, maximum)
        self.maximum = maximum
        self._rng = rng or random.Random()
        self.failures = 0  # consecutive failed attempts since the last success
        self.due_at: float | None = None  # monotonic time of the next attempt; None: nothing to retry

    def failed(self, now: float) -> float:
        """An attempt failed at ``now``: schedule the next one; returns its delay."""
        ceiling = min(self.maximum, self.initial * 2.0 ** self.failures)
        self.failures += 1
        delay = self._rng.uniform(ceiling / 2, ceiling)
        self.due_at = now + delay
        return delay

    def succeeded(self) -> None:
        self.failures = 0
        self.due_at = None

    def due(self, now: float) -> bool:
        return self.due_at is not None and now >= self.due_at

    def seconds_until_due(self, now: float) -> float | None:
        return None if self.due_at is None else max(0.0, self.due_at - now)
