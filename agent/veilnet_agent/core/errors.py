"""Errors the agent raises for bad input and for kernel failures."""

from __future__ import annotations

import reprlib
from itertools import islice
from typing import Any

# The rejected value an error quotes, and its field path, are cut to about this many characters: the
# value comes from untrusted input (a 1 MiB string, an integer of a million digits) and the message
# goes to logs, acknowledgements and operators' terminals.
MAX_SHOWN = 200
MAX_FIELD = 300
# The reason is the project's own words, but it may quote a parser's description of the problem.
MAX_REASON = 600
CUT = "..."
# Integers above this many bits (~4,200 digits) are described by their size, not written: Python
# refuses to write more than sys.get_int_max_str_digits() digits (4,300 by default), and the
# conversion is quadratic.
_MAX_WRITTEN_BITS = 14_000


class VeilnetError(Exception):
    """Base class of every error the agent reports on purpose."""


class ShownValue:
    """Stands in for a rejected value that cannot be quoted whole: ``str`` and ``repr`` give its cut text."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ShownValue) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)


def integer_text(value: int, limit: int = MAX_SHOWN) -> tuple[str, bool]:
    """``(text, exact)``: the decimal text of ``value``, or past ``limit`` characters its first digits and
    its number of digits (``exact`` False). Never raises, however large ``value`` is."""
    if value.bit_length() <= _MAX_WRITTEN_BITS:
        try:
            text = int.__repr__(value)
        except ValueError:  # sys.set_int_max_str_digits() set lower than our bound
            pass
        else:
            if len(text) <= limit:
                return text, True
            return f"{text[:20]}{CUT} ({len(text.lstrip('-'))} digits)", False  # at most 49 characters
    digits = int(value.bit_length() * 0.30103) + 1
    return f"<{'a negative' if value < 0 else 'an'} integer of about {digits} digits>", False


class _Repr(reprlib.Repr):
    """reprlib with integers written safely and mappings in their own order, for containers in errors."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel = 3
        self.maxdict = self.maxlist = self.maxtuple = self.maxset = self.maxfrozenset = 8
        self.maxstring = 60
        self.maxother = 60

    def repr_int(self, x: int, level: int) -> str:
        return integer_text(x, 40)[0]

    def repr_dict(self, x: dict[Any, Any], level: int) -> str:
        if not x:
            return "{}"
        if level <= 0:
            return "{...}"
        pieces = [f"{self.repr1(k, level - 1)}: {self.repr1(val, level - 1)}" for k, val in islice(x.items(), 8)]
        if len(x) > self.maxdict:
            pieces.append(CUT)
        return "{" + ", ".join(pieces) + "}"


_REPR = _Repr()


def shown(value: object, limit: int = MAX_SHOWN) -> tuple[str, bool]:
    """``(text, exact)``: ``repr(value)`` if ``value`` is a plain scalar (None, bool, int, float, str) of
    at most ``limit`` characters; else a bounded rendering, cut with a ``...`` marker, and ``exact`` False.
    Never raises, whatever ``value`` is."""
    try:
        if value is None or type(value) is bool or type(value) is float:
            return repr(value), True
        if type(value) is int:
            return integer_text(value, limit)
        if type(value) is str:
            if len(value) <= limit:
                text = repr(value)
                if len(text) <= limit:
                    return text, True
            size = f" ({len(value)} characters)"
            return repr(value[:limit])[: limit - len(CUT) - len(size)] + CUT + size, False
        text = _REPR.repr(value)
    except Exception:  # a foreign object whose repr fails: the error must still be shown
        text = f"<{type(value).__name__}>"
    if len(text) > limit:
        text = text[: limit - len(CUT)] + CUT
    return text, False


class ValidationError(VeilnetError):
    """A configuration or desired-state value is invalid.

    ``field`` is a dotted path to the offending value (``segments[1].vni``),
    ``value`` the value that was rejected: the value itself when it is a scalar
    short enough to quote whole, else a ``ShownValue`` holding its cut
    rendering. So ``str``/``repr`` of ``value`` and of the error are always
    safe and bounded (about MAX_FIELD + MAX_REASON + MAX_SHOWN characters).
    """

    field: str
    value: Any
    reason: str

    def __init__(self, field: str, value: object, reason: str) -> None:
        text, exact = shown(value)
        # Paths hold keys of the input and reasons may quote a parser: no control character, no lone
        # surrogate (which cannot be encoded for a log line or a gRPC status) gets through.
        if not field.isprintable():
            field = repr(field)[1:-1]
        if not reason.isprintable():
            reason = repr(reason)[1:-1]
        if len(field) > MAX_FIELD:
            field = field[: MAX_FIELD - len(CUT)] + CUT
        if len(reason) > MAX_REASON:
            reason = reason[: MAX_REASON - len(CUT)] + CUT
        self.field = field
        self.value = value if exact else ShownValue(text)
        self.reason = reason
        super().__init__(f"{field}: {reason} (got {text})")


class UnsupportedError(VeilnetError):
    """The kernel lacks a feature the desired state asks for (e.g. Geneve)."""


class DriverError(VeilnetError):
    """A driver failed to apply an operation to the kernel."""
