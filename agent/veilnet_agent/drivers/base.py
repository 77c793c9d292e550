"""What every driver returns from ``apply``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, TypeVar

OpT = TypeVar("OpT")


@dataclass
class ApplyResult(Generic[OpT]):
    """Ops that took effect and ops that failed with the kernel's reason.

    A driver keeps going after a failed op when later ops do not depend on it;
    the reconciler re-reads the kernel after any failure.
    """

    applied: list[OpT] = field(default_factory=list)
    failed: list[tuple[OpT, str]] = field(default_factory=list)
    requests: int = 0  # kernel requests made (netlink messages, wg peer changes)

    def merge(self, other: ApplyResult[OpT]) -> None:
        self.applied.extend(other.applied)
        self.failed.extend(other.failed)
        self.requests += other.requests
