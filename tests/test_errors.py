"""A ValidationError can always be shown: whatever value it quotes, its text is safe to build and bounded."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest

from veilnet_agent.core.errors import MAX_FIELD, MAX_SHOWN, ShownValue, ValidationError, shown

HUGE = 1 << 20_000  # 6,021 digits: str() and repr() raise ValueError beyond sys.get_int_max_str_digits()


class _BrokenRepr:
    def __repr__(self) -> str:
        raise RuntimeError("no repr")


def _server_style(exc: ValidationError) -> str:
    """How the controller renders an error for its callers (server._validation_details)."""
    return f"{exc.field}: {exc.reason} (got {exc.value!r})"


VALUES: list[object] = [
    HUGE,
    -HUGE,
    10**250,  # writable, but longer than an error should quote
    1 << 13_999,  # just under the size we still write
    "x" * 1_000_000,
    "\x00" * 150,  # short, but its repr is four times longer
    {"a": [HUGE, "y" * 10_000], "b": {"c": {"d": {"e": HUGE}}}},
    list(range(100_000)),
    b"\xff" * 100_000,
    _BrokenRepr(),
    [_BrokenRepr()],
]


@pytest.mark.parametrize("value", VALUES, ids=lambda v: type(v).__name__)
def test_any_value_is_shown_bounded_and_safely(value: object) -> None:
    exc = ValidationError("segments[0].vni", value, "must be in 1..16777215")
    text = str(exc)
    assert text.startswith("segments[0].vni: must be in 1..16777215 (got ")
    assert len(text) <= len("segments[0].vni: must be in 1..16777215 (got )") + MAX_SHOWN
    assert _server_style(exc) == text, "every way of rendering the error gives the same bounded text"
    assert len(str(exc.value)) <= MAX_SHOWN


def test_huge_integers_are_described_by_their_size() -> None:
    assert str(ValidationError("f", HUGE, "r")) == "f: r (got <an integer of about 6021 digits>)"
    assert str(ValidationError("f", -HUGE, "r")) == "f: r (got <a negative integer of about 6021 digits>)"
    assert str(ValidationError("f", 10**250, "r")) == "f: r (got 10000000000000000000... (251 digits))"


def test_long_strings_are_cut_with_their_length() -> None:
    exc = ValidationError("f", "ab" * 5000, "r")
    assert str(exc).endswith("... (10000 characters))")
    assert str(exc).startswith("f: r (got 'ababab")
    assert isinstance(exc.value, ShownValue)


def test_short_scalars_are_kept_as_they_are() -> None:
    for value in (100, -5, 1.5, True, None, "203.0.113.70", "x" * 100):
        exc = ValidationError("f", value, "r")
        assert exc.value == value and type(exc.value) is type(value)
        assert str(exc) == f"f: r (got {value!r})"


def test_containers_are_shown_in_their_own_order() -> None:
    exc = ValidationError("policies[0].source", {"segment": None, "cidr": None}, "needs a segment")
    assert str(exc) == "policies[0].source: needs a segment (got {'segment': None, 'cidr': None})"


def test_long_field_paths_are_cut() -> None:
    exc = ValidationError("endpoints[0].labels." + "k" * 100_000, "v", "bad label")
    assert len(exc.field) == MAX_FIELD and exc.field.endswith("...")
    assert str(exc).startswith(exc.field + ": bad label")


@pytest.fixture
def low_digit_limit() -> Iterator[None]:
    before = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(640)  # the lowest Python allows
    try:
        yield
    finally:
        sys.set_int_max_str_digits(before)


@pytest.mark.usefixtures("low_digit_limit")
def test_safe_under_a_lowered_digit_limit() -> None:
    value = 10**1000  # writable by default, not under this limit
    exc = ValidationError("f", value, "r")
    assert str(exc) == "f: r (got <an integer of about 1001 digits>)"
    assert shown({"x": value})[0] == "{'x': <an integer of about 1001 digits>}"
