"""The netlink framing the drivers share (no sockets, no root)."""

from __future__ import annotations

import struct

import pytest

from veilnet_agent.drivers import netlink


def test_attr_is_padded_to_four_bytes() -> None:
    encoded = netlink.attr(3, b"abcde")
    assert encoded == struct.pack("=HH", 9, 3) + b"abcde" + b"\0\0\0"
    assert list(netlink.iter_attrs(encoded, 0, len(encoded))) == [(3, 4, 9)]


def test_attr_type_flags_are_masked() -> None:
    encoded = struct.pack("=HH", 8, 0x8000 | 2) + b"\1\2\3\4"
    assert list(netlink.iter_attrs(encoded, 0, len(encoded))) == [(2, 4, 8)]


def test_attrs_stop_at_a_short_attribute() -> None:
    data = netlink.attr(1, b"x") + struct.pack("=HH", 2, 9) + netlink.attr(2, b"y")
    assert [kind for kind, _s, _e in netlink.iter_attrs(data, 0, len(data))] == [1]


def test_messages_are_framed_and_aligned() -> None:
    data = netlink.message(16, netlink.NLM_F_REQUEST, 7, b"abc\0") + netlink.message(netlink.NLMSG_DONE, 2, 8, bytes(4))
    framed = list(netlink.iter_messages(data, len(data)))
    assert framed == [(16, netlink.NLM_F_REQUEST, 7, 16, 20), (netlink.NLMSG_DONE, 2, 8, 36, 40)]


def test_a_header_shorter_than_a_header_cannot_be_framed() -> None:
    data = netlink.message(16, 0, 1, b"") + struct.pack("=IHHII", 4, 16, 0, 2, 0)
    messages = netlink.iter_messages(data, len(data))
    assert next(messages)[2] == 1
    with pytest.raises(netlink.FramingError):
        next(messages)


def test_error_code_is_the_positive_errno() -> None:
    assert netlink.error_code(struct.pack("=i", -17), 0) == 17
    assert netlink.error_code(struct.pack("=i", 0), 0) == 0
