"""Netlink framing shared by the drivers that speak netlink themselves.

``rtnl.py`` (rtnetlink: FDB, neighbours, link and address dumps), ``nflog.py``
(nfnetlink_log: the packets the firewall logs) and the nfnetlink counter socket
of ``firewall.py`` each framed messages and attributes by hand, three times.
This module holds the one framing (linux/netlink.h): message headers, the
attribute TLVs, the error reply's errno, and entering a network namespace to
open a socket there. The protocols' own messages, sockets and reply handling
stay in their drivers.
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager

SOL_NETLINK = 270
NETLINK_ROUTE = 0
NETLINK_NETFILTER = 12
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33

NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3

NLM_F_REQUEST = 0x01
NLM_F_MULTI = 0x02
NLM_F_ACK = 0x04
NLM_F_DUMP_INTR = 0x10
NLM_F_DUMP = 0x300
NLM_F_ACK_TLVS = 0x200  # on NLMSG_ERROR replies

NLA_TYPE_MASK = 0x3FFF  # the attribute type without NLA_F_NESTED / NLA_F_NET_BYTEORDER

NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
NLATTR = struct.Struct("=HH")  # len, type
NFGENMSG = struct.Struct("!BBH")  # nfnetlink: family, version, res_id (big-endian)
ERRNO = struct.Struct("=i")  # the first field of an NLMSG_ERROR payload (negative errno, 0 = ack)
HDR_LEN = NLMSGHDR.size


class FramingError(ValueError):
    """A message header too short to be one: the rest of the datagram cannot be framed."""


# --- encoding -----------------------------------------------------------------


def attr(kind: int, payload: bytes) -> bytes:
    """One attribute, padded to 4 bytes."""
    length = NLATTR.size + len(payload)
    return NLATTR.pack(length, kind) + payload + b"\0" * (-length % 4)


def message(msg_type: int, flags: int, seq: int, body: bytes) -> bytes:
    """One message: header (port id 0, the kernel) and body."""
    return NLMSGHDR.pack(HDR_LEN + len(body), msg_type, flags, seq, 0) + body


# --- decoding -----------------------------------------------------------------


def iter_messages(buf: bytes | bytearray | memoryview, size: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(type, flags, seq, payload start, payload end) of each message in ``buf[:size]``.

    Raises :class:`FramingError` at a header whose length is shorter than a
    header; what the caller does then (stop, or fail) is the caller's. The end
    of a message is as its header says: a caller that must not read past the
    datagram checks ``end <= size``.
    """
    unpack = NLMSGHDR.unpack_from
    offset = 0
    while offset + HDR_LEN <= size:
        length, msg_type, flags, seq, _pid = unpack(buf, offset)
        if length < HDR_LEN:
            raise FramingError(f"netlink message length {length} at offset {offset}")
        yield msg_type, flags, seq, offset + HDR_LEN, offset + length
        offset += (length + 3) & ~3


def iter_attrs(buf: bytes | bytearray | memoryview, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(type, payload start, payload end) of each attribute in ``buf[start:end]``.

    Stops at an attribute shorter than its header. The payload end is as the
    attribute says: a caller that must not read past ``end`` checks it.
    """
    unpack = NLATTR.unpack_from
    while start + 4 <= end:
        length, kind = unpack(buf, start)
        if length < 4:
            break
        yield kind & NLA_TYPE_MASK, start + 4, start + length
        start += (length + 3) & ~3


def error_code(buf: bytes | bytearray | memoryview, start: int) -> int:
    """The positive errno of an NLMSG_ERROR (or NLMSG_DONE) payload at ``start``; 0 is an ack."""
    code: int = ERRNO.unpack_from(buf, start)[0]
    return -code


# --- namespaces ---------------------------------------------------------------

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def netns_path(name: str) -> str:
    return f"/run/netns/{name}"


@contextmanager
def netns_entered(name: str | None) -> Iterator[None]:
    """Run the body with this thread in network namespace ``name`` (None: stay)."""
    if name is None:
        yield
        return
    target = os.open(netns_path(name), os.O_RDONLY | os.O_CLOEXEC)
    try:
        original = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
            try:
                yield
            finally:
                _setns(original)
        finally:
            os.close(original)
    finally:
        os.close(target)
