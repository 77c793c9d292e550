"""A small, fast rtnetlink codec for neighbour and FDB entries.

pyroute2 spends tens of microseconds encoding or parsing one message; a host
with tens of thousands of FDB entries needs better. This module packs
``RTM_NEWNEIGH``/``RTM_DELNEIGH`` requests with ``struct``, sends them many
per ``send()`` (``NLM_F_ACK`` only on the last message of each chunk; the
kernel reports every failure anyway, tagged with the failing request's
sequence number) and parses neighbour, FDB, link and address dumps by hand.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple, TypeVar

from .netlink import (
    HDR_LEN,
    NETLINK_CAP_ACK,
    NETLINK_EXT_ACK,
    NETLINK_ROUTE,
    NLM_F_ACK,
    NLM_F_ACK_TLVS,
    NLM_F_DUMP,
    NLM_F_DUMP_INTR,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    NLMSGHDR,
    SO_RCVBUFFORCE,
    SO_SNDBUFFORCE,
    SOL_NETLINK,
    FramingError,
    error_code,
    iter_attrs,
    iter_messages,
    netns_entered,
)
from .netlink import (
    attr as nl_attr,
)

# rtnetlink constants (linux/rtnetlink.h, linux/neighbour.h); the framing is netlink.py's


NLM_F_REPLACE = 0x100
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_APPEND = 0x800
NLMSGERR_ATTR_MSG = 1

RTM_NEWLINK = 16
RTM_GETLINK = 18
RTM_NEWNEIGH = 28
RTM_DELNEIGH = 29
RTM_GETNEIGH = 30

IFLA_ADDRESS = 1
IFLA_IFNAME = 3
IFLA_MTU = 4
IFLA_MASTER = 10
IFLA_LINKINFO = 18
IFLA_IFALIAS = 20
IFLA_EXT_MASK = 29
IFLA_INFO_KIND = 1
IFLA_INFO_SLAVE_DATA = 5
IFLA_BRPORT_LEARNING = 8
IFLA_BRPORT_NEIGH_SUPPRESS = 32
IFLA_BRPORT_ISOLATED = 33
IFLA_AF_SPEC = 26
IFLA_INET6_CONF = 2
DEVCONF_DISABLE_IPV6 = 26  # index in the IFLA_INET6_CONF array of s32
RTEXT_FILTER_SKIP_STATS = 1 << 3

RTM_GETADDR = 22
IFA_ADDRESS = 1
IFA_LOCAL = 2

NDA_DST = 1
NDA_LLADDR = 2
NDA_MASTER = 9

NTF_SELF = 0x02
NTF_MASTER = 0x04

NUD_INCOMPLETE = 0x01
NUD_REACHABLE = 0x02
NUD_STALE = 0x04
NUD_NOARP = 0x40
NUD_PERMANENT = 0x80

AF_UNSPEC = socket.AF_UNSPEC
AF_INET = socket.AF_INET
AF_INET6 = socket.AF_INET6
AF_BRIDGE = 7

CHUNK_BYTES = 64 * 1024
RECV_BYTES = 1 << 20
DUMP_RETRIES = 6  # backoff 2..32 ms between passes
RECV_TIMEOUT = 30.0  # seconds; a kernel reply never takes this long

_NDMSG = struct.Struct("=BxxxiHBB")  # family, pad, pad, ifindex, state, flags, type
_IFINFOMSG = struct.Struct("=BxHiII")  # family, pad, type, index, flags, change
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
_U32 = struct.Struct("=I")
_NDMSG_LEN = _NDMSG.size


T = TypeVar("T")


class RtnlError(OSError):
    """A netlink request or dump failed as a whole."""


class NlError(NamedTuple):
    """The kernel's answer to one failed request of a batch."""

    errno: int
    message: str  # extended ack text, "" when the kernel gave none

    def describe(self) -> str:
        name = errno.errorcode.get(self.errno, str(self.errno))
        text = f"{os.strerror(self.errno)} ({name})"
        return f"{text}: {self.message}" if self.message else text


class NeighRecord(NamedTuple):
    """One parsed RTM_NEWNEIGH message of a dump."""

    family: int
    ifindex: int
    state: int
    flags: int
    lladdr: str | None  # "aa:bb:cc:dd:ee:ff"
    dst: str | None  # compressed IP text
    master: int | None  # NDA_MASTER ifindex


class LinkName(NamedTuple):
    ifindex: int
    name: str


class LinkRecord(NamedTuple):
    """The fields of one RTM_NEWLINK message the agent reads back."""

    ifindex: int
    name: str
    kind: str | None  # IFLA_INFO_KIND
    alias: str | None
    mtu: int
    master: int | None  # ifindex of the master device
    mac: str | None
    learning: bool | None = None  # bridge ports only (IFLA_BRPORT_LEARNING)
    neigh_suppress: bool | None = None  # bridge ports only
    ipv6: bool | None = None  # IPv6 enabled on the device (None: the kernel has no IPv6)
    isolated: bool | None = None  # bridge ports only (IFLA_BRPORT_ISOLATED)


class AddrRecord(NamedTuple):
    ifindex: int
    family: int
    prefixlen: int
    address: str  # compressed IP text (IFA_LOCAL, else IFA_ADDRESS)


# --- encoding -----------------------------------------------------------------


def mac_bytes(mac: str) -> bytes:
    raw = bytes.fromhex(mac.replace(":", ""))
    if len(raw) != 6:
        raise ValueError(f"bad MAC address {mac!r}")
    return raw


def ip_bytes(ip: str) -> tuple[int, bytes]:
    """(address family, packed address) of an IP text (C inet_pton: ipaddress is ~30x slower)."""
    family = AF_INET6 if ":" in ip else AF_INET
    try:
        return family, socket.inet_pton(family, ip)
    except OSError:
        raise ValueError(f"bad IP address {ip!r}") from None


class NeighRequest(NamedTuple):
    msg_type: int
    nl_flags: int
    body: bytes  # ndmsg + attributes


def fdb_request(
    *,
    delete: bool,
    ifindex: int,
    mac: str,
    dst: str | None,
    append: bool = False,
) -> NeighRequest:
    """Add/delete a vxlan ``self`` entry (dst set) or a bridge ``master static`` entry.

    Self entries are added ``permanent`` (NUD_PERMANENT|NUD_NOARP, as
    ``bridge fdb ... self permanent``); ``append`` adds one more remote to an
    existing entry (head-end replication), otherwise the entry is replaced.
    Master entries are added ``static`` (NUD_NOARP).
    """
    lladdr = mac_bytes(mac)
    if dst is not None:
        ntf, state = NTF_SELF, NUD_PERMANENT | NUD_NOARP
        dst_raw: bytes | None = ip_bytes(dst)[1]
    else:
        ntf, state, dst_raw = NTF_MASTER, NUD_NOARP, None
    if delete:
        return NeighRequest(RTM_DELNEIGH, 0, _ndmsg_body(AF_BRIDGE, ifindex, 0, ntf, lladdr, dst_raw))
    flags = NLM_F_CREATE | (NLM_F_APPEND if append else NLM_F_REPLACE)
    return NeighRequest(RTM_NEWNEIGH, flags, _ndmsg_body(AF_BRIDGE, ifindex, state, ntf, lladdr, dst_raw))


def neigh_request(*, delete: bool, ifindex: int, ip: str, mac: str) -> NeighRequest:
    """Add-or-replace / delete a permanent ARP or ND entry."""
    family, dst = ip_bytes(ip)
    if delete:
        return NeighRequest(RTM_DELNEIGH, 0, _ndmsg_body(family, ifindex, 0, 0, None, dst))
    body = _ndmsg_body(family, ifindex, NUD_PERMANENT, 0, mac_bytes(mac), dst)
    return NeighRequest(RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_REPLACE, body)


def _ndmsg_body(family: int, ifindex: int, state: int, ntf: int, lladdr: bytes | None, dst: bytes | None) -> bytes:
    body = _NDMSG.pack(family, ifindex, state, ntf, 0)
    if lladdr is not None:
        body += nl_attr(NDA_LLADDR, lladdr)
    if dst is not None:
        body += nl_attr(NDA_DST, dst)
    return body


# --- decoding -----------------------------------------------------------------


class _Formatter:
    """Raw address -> text, cached: dumps repeat the same few VTEP addresses."""

    def __init__(self) -> None:
        self._ips: dict[bytes, str] = {}

    def ip(self, raw: bytes) -> str:
        text = self._ips.get(raw)
        if text is None:
            text = socket.inet_ntop(AF_INET if len(raw) == 4 else AF_INET6, raw)
            self._ips[raw] = text
        return text


def _parse_neigh(buf: memoryview, offset: int, end: int, fmt: _Formatter) -> NeighRecord:
    family, ifindex, state, flags, _type = _NDMSG.unpack_from(buf, offset)
    lladdr = dst = None
    master = None
    for kind, start, stop in iter_attrs(buf, offset + _NDMSG_LEN, end):
        if kind == NDA_LLADDR:
            lladdr = bytes(buf[start:stop]).hex(":")
        elif kind == NDA_DST:
            dst = fmt.ip(bytes(buf[start:stop]))
        elif kind == NDA_MASTER:
            master = _U32.unpack_from(buf, start)[0]
    return NeighRecord(family, ifindex, state, flags, lladdr, dst, master)


def _parse_link_name(buf: memoryview, offset: int, end: int) -> LinkName | None:
    index = _IFINFOMSG.unpack_from(buf, offset)[2]
    for kind, start, stop in iter_attrs(buf, offset + _IFINFOMSG.size, end):
        if kind == IFLA_IFNAME:
            return LinkName(index, bytes(buf[start:stop]).rstrip(b"\0").decode())
    return None


def _text(buf: memoryview, start: int, stop: int) -> str:
    return bytes(buf[start:stop]).rstrip(b"\0").decode(errors="replace")


def _parse_link(buf: memoryview, offset: int, end: int) -> LinkRecord:
    index = _IFINFOMSG.unpack_from(buf, offset)[2]
    name = ""
    kind = alias = mac = None
    mtu = 0
    master = None
    learning = neigh_suppress = isolated = ipv6 = None
    for attr, start, stop in iter_attrs(buf, offset + _IFINFOMSG.size, end):
        if attr == IFLA_IFNAME:
            name = _text(buf, start, stop)
        elif attr == IFLA_MTU:
            mtu = _U32.unpack_from(buf, start)[0]
        elif attr == IFLA_MASTER:
            master = _U32.unpack_from(buf, start)[0]
        elif attr == IFLA_ADDRESS:
            mac = bytes(buf[start:stop]).hex(":")
        elif attr == IFLA_IFALIAS:
            alias = _text(buf, start, stop)
        elif attr == IFLA_LINKINFO:
            for info, istart, istop in iter_attrs(buf, start, stop):
                if info == IFLA_INFO_KIND:
                    kind = _text(buf, istart, istop)
                elif info == IFLA_INFO_SLAVE_DATA:  # a bridge port's flags
                    for port, pstart, _pstop in iter_attrs(buf, istart, istop):
                        if port == IFLA_BRPORT_LEARNING:
                            learning = bool(buf[pstart])
                        elif port == IFLA_BRPORT_NEIGH_SUPPRESS:
                            neigh_suppress = bool(buf[pstart])
                        elif port == IFLA_BRPORT_ISOLATED:
                            isolated = bool(buf[pstart])
        elif attr == IFLA_AF_SPEC:
            for family, fstart, fstop in iter_attrs(buf, start, stop):
                if family == AF_INET6:
                    for inet6, cstart, cstop in iter_attrs(buf, fstart, fstop):
                        if inet6 == IFLA_INET6_CONF and cstop - cstart >= 4 * (DEVCONF_DISABLE_IPV6 + 1):
                            ipv6 = not struct.unpack_from("=i", buf, cstart + 4 * DEVCONF_DISABLE_IPV6)[0]
    return LinkRecord(index, name, kind, alias, mtu, master, mac, learning, neigh_suppress, ipv6, isolated)


def _parse_addr(buf: memoryview, offset: int, end: int, fmt: _Formatter) -> AddrRecord | None:
    family, prefixlen, _flags, _scope, index = _IFADDRMSG.unpack_from(buf, offset)
    local = address = None
    for attr, start, stop in iter_attrs(buf, offset + _IFADDRMSG.size, end):
        if attr == IFA_LOCAL:
            local = fmt.ip(bytes(buf[start:stop]))
        elif attr == IFA_ADDRESS:
            address = fmt.ip(bytes(buf[start:stop]))
    chosen = local or address
    return AddrRecord(index, family, prefixlen, chosen) if chosen else None


def _error_reply(buf: memoryview, offset: int, end: int, flags: int) -> NlError:
    """Decode an NLMSG_ERROR payload: errno (positive) and the extended ack text."""
    code = error_code(buf, offset)
    message = ""
    if flags & NLM_F_ACK_TLVS:
        # The socket sets NETLINK_CAP_ACK: only the request's header is echoed.
        tlv_start = offset + 4 + HDR_LEN
        for kind, start, stop in iter_attrs(buf, tlv_start, end):
            if kind == NLMSGERR_ATTR_MSG:
                message = bytes(buf[start:stop]).rstrip(b"\0").decode(errors="replace")
    return NlError(code, message)


# --- socket -------------------------------------------------------------------


class RtnlSocket:
    """A raw NETLINK_ROUTE socket for batched neighbour/FDB requests and dumps."""

    def __init__(self, netns: str | None = None, rcvbuf: int = 32 << 20) -> None:
        with netns_entered(netns):
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
        try:
            self._configure(sock, rcvbuf)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._seq = 0
        self.interrupted_dumps = 0  # passes retried because the kernel flagged them inconsistent
        self.inconsistent_dumps = 0  # dumps returned flagged after all retries
        self._buf = bytearray(RECV_BYTES)
        self._view = memoryview(self._buf)

    @staticmethod
    def _configure(sock: socket.socket, rcvbuf: int) -> None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
            sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 4 << 20)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
        sock.bind((0, 0))
        sock.settimeout(RECV_TIMEOUT)

    def close(self) -> None:
        self._view.release()
        self._sock.close()

    def __enter__(self) -> RtnlSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF or 1
        return self._seq

    def _recv(self) -> int:
        return self._sock.recv_into(self._buf)

    # -- batched requests --

    def batch(self, requests: Sequence[NeighRequest]) -> list[NlError | None]:
        """Send ``requests`` in ~64 KiB chunks; return each one's error (None = done).

        Only the last message of a chunk asks for an ACK; the kernel answers
        every failed message with an NLMSG_ERROR carrying its sequence number.
        A request whose outcome could not be read back (receive buffer
        overrun) gets ENOBUFS.
        """
        outcomes: list[NlError | None] = [None] * len(requests)
        first = 0
        while first < len(requests):
            stop, size = first, 0
            while stop < len(requests) and (size < CHUNK_BYTES or stop == first):
                size += HDR_LEN + len(requests[stop].body)
                stop += 1
            self._send_chunk(requests, first, stop, outcomes)
            first = stop
        return outcomes

    def _send_chunk(
        self,
        requests: Sequence[NeighRequest],
        first: int,
        stop: int,
        outcomes: list[NlError | None],
    ) -> None:
        if self._seq + (stop - first) >= 0xFFFFFFFF:
            self._seq = 0
        base = self._seq + 1
        last = base + (stop - first) - 1
        self._seq = last
        pack_hdr = NLMSGHDR.pack
        parts: list[bytes] = []
        for seq, req in zip(range(base, last + 1), requests[first:stop], strict=True):
            flags = NLM_F_REQUEST | req.nl_flags | (NLM_F_ACK if seq == last else 0)
            parts.append(pack_hdr(HDR_LEN + len(req.body), req.msg_type, flags, seq, 0))
            parts.append(req.body)
        self._sock.sendall(b"".join(parts))
        self._collect_acks(_Chunk(base, last, first, outcomes))

    def _collect_acks(self, chunk: _Chunk) -> None:
        """Read replies until the chunk's final ACK (or an overrun loses it)."""
        while True:
            try:
                size = self._recv()
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                # Replies were dropped: errors may be missing, so every request
                # without a recorded error has an unknown outcome.
                self._drain(chunk.record)
                chunk.mark_unknown()
                return
            if chunk.record(self._view, size):
                return

    # -- dumps --

    def _dump(self, msg_type: int, body: bytes) -> Iterator[tuple[memoryview, int, int]]:
        """Yield (buffer, payload start, payload end) of each message of one dump pass.

        Raises ``_DumpInterruptedError`` at the end of a dump the kernel flagged
        as inconsistent (NLM_F_DUMP_INTR) or aborted with EINTR.
        """
        seq = self._next_seq()
        hdr = NLMSGHDR.pack(HDR_LEN + len(body), msg_type, NLM_F_REQUEST | NLM_F_DUMP, seq, 0)
        self._sock.sendall(hdr + body)
        view = self._view
        interrupted = False
        while True:
            size = self._recv()
            try:
                for kind, flags, mseq, start, end in iter_messages(view, size):
                    if mseq != seq:
                        continue  # a stale reply to an earlier request
                    interrupted = interrupted or bool(flags & NLM_F_DUMP_INTR)
                    if kind == NLMSG_DONE:
                        code = error_code(view, start) if end - start >= 4 else 0
                        _check_dump_end(code, "", interrupted)
                        return
                    if kind == NLMSG_ERROR:
                        err = _error_reply(view, start, end, flags)
                        _check_dump_end(err.errno, err.describe(), interrupted)
                        return
                    yield view, start, end
            except FramingError:
                pass  # the rest of this datagram cannot be framed; read the next

    def _dump_retrying(self, msg_type: int, body: bytes, parse: Callable[[memoryview, int, int], T | None]) -> list[T]:
        """Run a dump, again while the kernel flags it inconsistent (NLM_F_DUMP_INTR).

        Under changes that never pause, the last complete pass is returned as
        it is (counted in ``inconsistent_dumps``): it may lack or still show an
        object that changed during the dump, which the next observation fixes.
        """
        for attempt in range(DUMP_RETRIES):
            results: list[T] = []
            try:
                for view, start, end in self._dump(msg_type, body):
                    item = parse(view, start, end)
                    if item is not None:
                        results.append(item)
            except _DumpInterruptedError as exc:
                self.interrupted_dumps += 1
                if exc.complete and attempt == DUMP_RETRIES - 1:
                    self.inconsistent_dumps += 1
                    return results
                time.sleep(0.002 * 2**attempt)  # let a burst of changes pass
                continue
            except BaseException:
                self._drain()  # let a half-read dump finish, or the next one gets EBUSY
                raise
            return results
        raise RtnlError(errno.EINTR, "dump kept being aborted by concurrent changes")

    def _drain(self, handle: Callable[[memoryview, int], object] | None = None) -> None:
        """Read whatever is queued without blocking (an interrupted dump, an overrun)."""
        timeout = self._sock.gettimeout()
        self._sock.settimeout(0)
        try:
            while True:
                try:
                    size = self._recv()
                except BlockingIOError:
                    return
                except OSError as exc:
                    if exc.errno != errno.ENOBUFS:
                        raise
                    continue
                if handle is not None:
                    handle(self._view, size)
        finally:
            self._sock.settimeout(timeout)

    def dump_neighbours(self, family: int) -> list[NeighRecord]:
        """All entries of ``family``: AF_BRIDGE = FDB, AF_INET/AF_INET6/AF_UNSPEC = ARP/ND."""
        fmt = _Formatter()

        def parse(view: memoryview, start: int, end: int) -> NeighRecord:
            return _parse_neigh(view, start, end, fmt)

        body = _NDMSG.pack(family, 0, 0, 0, 0)
        return self._dump_retrying(RTM_GETNEIGH, body, parse)

    def dump_link_names(self) -> list[LinkName]:
        return self._dump_retrying(RTM_GETLINK, _LINK_DUMP, _parse_link_name)

    def dump_links(self) -> list[LinkRecord]:
        return self._dump_retrying(RTM_GETLINK, _LINK_DUMP, _parse_link)

    def dump_addresses(self) -> list[AddrRecord]:
        fmt = _Formatter()

        def parse(view: memoryview, start: int, end: int) -> AddrRecord | None:
            return _parse_addr(view, start, end, fmt)

        return self._dump_retrying(RTM_GETADDR, _IFADDRMSG.pack(AF_UNSPEC, 0, 0, 0, 0), parse)


_LINK_DUMP = _IFINFOMSG.pack(AF_UNSPEC, 0, 0, 0, 0) + nl_attr(IFLA_EXT_MASK, _U32.pack(RTEXT_FILTER_SKIP_STATS))


class _DumpInterruptedError(Exception):
    def __init__(self, complete: bool) -> None:
        super().__init__("dump interrupted")
        self.complete = complete  # every part was read (flagged inconsistent, not aborted)


def _check_dump_end(code: int, detail: str, interrupted: bool) -> None:
    """Raise unless the dump ended cleanly (``code`` is a positive errno or 0)."""
    if code == errno.EINTR:
        raise _DumpInterruptedError(complete=False)
    if interrupted and not code:
        raise _DumpInterruptedError(complete=True)
    if code:
        raise RtnlError(code, f"dump failed: {detail or os.strerror(code)}")


class _Chunk:
    """Outcome bookkeeping for one send() of a batch: sequence numbers base..last."""

    def __init__(self, base: int, last: int, first: int, outcomes: list[NlError | None]) -> None:
        self.base = base
        self.last = last
        self.first = first
        self.outcomes = outcomes

    def record(self, view: memoryview, size: int) -> bool:
        """Record the errors in ``view[:size]``; True once the final ACK is seen."""
        done = False
        try:
            for msg_type, flags, seq, start, end in iter_messages(view, size):
                if msg_type == NLMSG_ERROR and self.base <= seq <= self.last:
                    err = _error_reply(view, start, end, flags)
                    if err.errno:
                        self.outcomes[self.first + seq - self.base] = err
                    done = done or seq == self.last
        except FramingError:
            pass  # the rest of this datagram cannot be framed
        return done

    def mark_unknown(self) -> None:
        lost = NlError(errno.ENOBUFS, "reply lost to a receive buffer overrun; outcome unknown")
        for i in range(self.first, self.first + self.last - self.base + 1):
            if self.outcomes[i] is None:
                self.outcomes[i] = lost
