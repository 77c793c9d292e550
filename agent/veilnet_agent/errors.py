"""Errors the agent raises for bad input and for kernel failures."""

from __future__ import annotations


class VeilnetError(Exception):
    """Base class of every error the agent reports on purpose."""


class ValidationError(VeilnetError):
    """A configuration or desired-state value is invalid.

    ``field`` is a dotted path to the offending value (``segments[1].vni``),
    ``value`` the value that was rejected.
    """

    def __init__(self, field: str, value: object, reason: str) -> None:
        self.field = field
        self.value = value
        self.reason = reason
        super().__init__(f"{field}: {reason} (got {value!r})")


class UnsupportedError(VeilnetError):
    """The kernel lacks a feature the desired state asks for (e.g. Geneve)."""


class DriverError(VeilnetError):
    """A driver failed to apply an operation to the kernel."""
