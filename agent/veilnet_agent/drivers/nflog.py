"""A small reader of one NFLOG group (nfnetlink_log), with struct and socket only.

The firewall's ``log group G prefix "..."`` statements hand packets to
nfnetlink_log; this module binds a NETLINK_NETFILTER socket to group G and
decodes each NFULNL_MSG_PACKET into a :class:`LoggedPacket` (prefix,
addresses, protocol, ports or ICMP type/code, in/out ifindex, the source MAC
when the kernel gives one). Packets logged by the bridge family (anti-spoofing)
may be ARP or any other ethertype; those carry the ethertype, and ARP its
sender and target addresses.

Details that matter:

- Binding is ``NFULNL_CFG_CMD_BIND`` with the group in the nfgenmsg
  ``res_id`` (big endian). Only one socket per network namespace may bind a
  group: another socket's bind fails with ``EPERM`` (raised as OSError). The
  kernel destroys the instance when the socket closes.
- No ``PF_UNBIND``/``PF_BIND``: nftables' ``log group`` names the ULOG
  logger type explicitly, so it reaches nfnetlink_log whatever the per-netns
  default logger is. PF_(UN)BIND would replace that default for the whole
  namespace (e.g. the syslog logger other tools rely on).
- The kernel batches packets per instance until ``qthresh`` messages, the
  buffer (``nlbufsiz``) is full, or ``timeout`` (1/100 s) passes; its
  defaults are 100 packets / 1 s. A batch is one datagram of several
  messages (``NLM_F_MULTI``, closed by ``NLMSG_DONE``).
- When the socket's receive buffer overflows the next ``recv`` fails with
  ``ENOBUFS``: the batches in between are lost. :attr:`NflogReader.dropped`
  counts these overflow reports (at least one message lost each).
- All numeric attributes are big endian; attribute types may carry the
  NLA_F_NESTED / NLA_F_NET_BYTEORDER bits, masked off here.
"""

from __future__ import annotations

import errno
import select
import socket
import struct
from collections.abc import Iterator
from types import TracebackType

from ..core.objects import ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, LoggedPacket
from .netlink import (
    NETLINK_NETFILTER,
    NFGENMSG,
    NLM_F_ACK,
    NLM_F_REQUEST,
    NLMSG_ERROR,
    SO_RCVBUFFORCE,
    FramingError,
    attr,
    error_code,
    iter_attrs,
    message,
    netns_entered,
)
from .netlink import iter_messages as netlink_messages

NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET = 0
NFULNL_MSG_CONFIG = 1
NFNETLINK_V0 = 0

# enum nfulnl_msg_config_cmds
NFULNL_CFG_CMD_BIND = 1
NFULNL_CFG_CMD_UNBIND = 2

# enum nfulnl_attr_config
NFULA_CFG_CMD = 1
NFULA_CFG_MODE = 2
NFULA_CFG_NLBUFSIZ = 3
NFULA_CFG_TIMEOUT = 4
NFULA_CFG_QTHRESH = 5

NFULNL_COPY_PACKET = 2

# enum nfulnl_attr_type
NFULA_PACKET_HDR = 1
NFULA_IFINDEX_INDEV = 4
NFULA_IFINDEX_OUTDEV = 5
NFULA_IFINDEX_PHYSINDEV = 6  # bridge family: the port the frame came in on (INDEV is then the bridge)
NFULA_HWADDR = 8
NFULA_PAYLOAD = 9
NFULA_PREFIX = 10
NFULA_VLAN = 20  # nested: the frame's VLAN tag, when the kernel carries it outside the packet
NFULA_VLAN_PROTO = 1

NFPROTO_BRIDGE = 7

IPPROTO_ICMP = 1
IPPROTO_ICMPV6 = 58
PORT_PROTOCOLS = frozenset({6, 17, 33, 132, 136})  # tcp, udp, dccp, sctp, udplite: ports in the first 4 bytes
IPV6_EXT_HEADERS = frozenset({0, 43, 60})  # hop-by-hop, routing, destination options
IPV6_FRAGMENT = 44
IPV6_AH = 51

_BE16 = struct.Struct("!H")
_BE32 = struct.Struct("!I")
_CFG_MODE = struct.Struct("!IBx")  # struct nfulnl_msg_config_mode (packed): copy_range, copy_mode, pad
_PORTS = struct.Struct("!HH")
_RECV_SIZE = 1 << 18
_ACK_TIMEOUT = 5.0  # seconds
_MAX_DATAGRAMS_PER_READ = 256  # so a flood cannot keep read() from returning


def _mac(raw: bytes) -> str:
    return raw.hex(":")


def _hwaddr(value: bytes | None) -> str | None:
    """struct nfulnl_msg_packet_hw: be16 length, 2 bytes pad, 8 bytes address."""
    if value is None or len(value) < 4:
        return None
    length = _BE16.unpack_from(value)[0]
    return _mac(value[4 : 4 + length]) if length == 6 and len(value) >= 10 else None


# --- encoding -------------------------------------------------------------------


def config_message(group: int, attrs: bytes, seq: int) -> bytes:
    """An NFULNL_MSG_CONFIG request for ``group`` asking for an ack."""
    body = NFGENMSG.pack(socket.AF_UNSPEC, NFNETLINK_V0, group) + attrs
    return message((NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG, NLM_F_REQUEST | NLM_F_ACK, seq, body)


def bind_attrs(copy_range: int, nlbufsiz: int | None, qthresh: int | None, timeout_cs: int | None) -> bytes:
    attrs = attr(NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_BIND]))
    attrs += attr(NFULA_CFG_MODE, _CFG_MODE.pack(copy_range, NFULNL_COPY_PACKET))
    for kind, value in ((NFULA_CFG_NLBUFSIZ, nlbufsiz), (NFULA_CFG_QTHRESH, qthresh), (NFULA_CFG_TIMEOUT, timeout_cs)):
        if value is not None:
            attrs += attr(kind, _BE32.pack(value))
    return attrs


# --- decoding -------------------------------------------------------------------


def iter_messages(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(type, seq, payload) of every netlink message in one datagram."""
    try:
        for msg_type, _flags, seq, start, end in netlink_messages(data, len(data)):
            if end > len(data):
                return  # truncated: the datagram ends inside it
            yield msg_type, seq, data[start:end]
    except FramingError:
        return


def parse_attrs(data: bytes, offset: int = 0) -> dict[int, bytes]:
    attrs: dict[int, bytes] = {}
    for kind, start, end in iter_attrs(data, offset, len(data)):
        if end > len(data):
            break  # truncated
        attrs[kind] = data[start:end]
    return attrs


def _ports(l4: bytes, protocol: int) -> tuple[int | None, int | None]:
    if protocol in PORT_PROTOCOLS and len(l4) >= _PORTS.size:
        sport, dport = _PORTS.unpack_from(l4)
        return sport, dport
    return None, None


def _icmp(l4: bytes, protocol: int, icmp_protocol: int) -> tuple[int | None, int | None]:
    if protocol == icmp_protocol and len(l4) >= 2:
        return l4[0], l4[1]
    return None, None


def _ipv6_upper_layer(payload: bytes) -> tuple[int, bytes | None]:
    """(upper-layer protocol, its bytes or None if absent/not first fragment) after extension headers."""
    nexthdr, offset = payload[6], 40
    while nexthdr in IPV6_EXT_HEADERS or nexthdr in (IPV6_FRAGMENT, IPV6_AH):
        if offset + 8 > len(payload):
            return nexthdr, None
        following = payload[offset]
        if nexthdr == IPV6_FRAGMENT:
            if _BE16.unpack_from(payload, offset + 2)[0] & 0xFFF8:
                return following, None
            size = 8
        elif nexthdr == IPV6_AH:
            size = (payload[offset + 1] + 2) * 4
        else:
            size = (payload[offset + 1] + 1) * 8
        nexthdr, offset = following, offset + size
    return nexthdr, payload[offset:]


def _parse_ip(payload: bytes) -> tuple[int, str, str, int, bytes | None] | None:
    """(family, src, dst, protocol, l4 bytes or None) of an IP packet, None if not one."""
    if not payload:
        return None
    version = payload[0] >> 4
    if version == 4 and len(payload) >= 20:
        header_len = (payload[0] & 0x0F) * 4
        fragment_offset = _BE16.unpack_from(payload, 6)[0] & 0x1FFF
        l4 = payload[header_len:] if fragment_offset == 0 and header_len >= 20 else None
        src, dst = socket.inet_ntop(socket.AF_INET, payload[12:16]), socket.inet_ntop(socket.AF_INET, payload[16:20])
        return 4, src, dst, payload[9], l4
    if version == 6 and len(payload) >= 40:
        protocol, l4 = _ipv6_upper_layer(payload)
        src, dst = socket.inet_ntop(socket.AF_INET6, payload[8:24]), socket.inet_ntop(socket.AF_INET6, payload[24:40])
        return 6, src, dst, protocol, l4
    return None


def _ifindex(attrs: dict[int, bytes], kind: int) -> int | None:
    value = attrs.get(kind)
    return _BE32.unpack(value[:4])[0] if value is not None and len(value) >= 4 else None


def _arp(payload: bytes) -> tuple[str, str, str] | None:
    """(sender MAC, sender IP, target IP) of an Ethernet/IPv4 ARP packet."""
    if len(payload) < 28 or payload[:6] != b"\x00\x01\x08\x00\x06\x04":
        return None
    return _mac(payload[8:14]), socket.inet_ntop(socket.AF_INET, payload[14:18]), \
        socket.inet_ntop(socket.AF_INET, payload[24:28])


def parse_packet(body: bytes) -> LoggedPacket | None:
    """Decode one NFULNL_MSG_PACKET body (nfgenmsg + attributes); None if there is nothing to report."""
    bridged = bool(body) and body[0] == NFPROTO_BRIDGE
    attrs = parse_attrs(body, NFGENMSG.size)
    hdr = attrs.get(NFULA_PACKET_HDR)
    hw_protocol = _BE16.unpack_from(hdr)[0] if hdr is not None and len(hdr) >= 2 else 0
    prefix = attrs.get(NFULA_PREFIX, b"").split(b"\0", 1)[0].decode("utf-8", "replace")
    indev, outdev = _ifindex(attrs, NFULA_IFINDEX_INDEV), _ifindex(attrs, NFULA_IFINDEX_OUTDEV)
    physindev = _ifindex(attrs, NFULA_IFINDEX_PHYSINDEV)
    src_mac = _hwaddr(attrs.get(NFULA_HWADDR))
    ethertype = hw_protocol if bridged else None
    vlan = attrs.get(NFULA_VLAN)
    if bridged and vlan is not None:  # a tagged frame: the kernel keeps the tag aside, hw_protocol is the inner one
        vlan_proto = parse_attrs(vlan).get(NFULA_VLAN_PROTO)
        if vlan_proto is not None and len(vlan_proto) >= 2:
            ethertype = _BE16.unpack_from(vlan_proto)[0]

    def packet(family: int, src: str, dst: str, protocol: int, sport: int | None = None, dport: int | None = None,
               icmp_type: int | None = None, icmp_code: int | None = None, arp_sha: str | None = None,
               transport: bytes = b"") -> LoggedPacket:
        return LoggedPacket(prefix, family, src, dst, protocol, sport, dport, icmp_type, indev, outdev, icmp_code,
                            ethertype, src_mac, arp_sha, physindev, transport)

    payload = attrs.get(NFULA_PAYLOAD, b"")
    if hw_protocol not in (ETH_P_IP, ETH_P_IPV6, 0):
        if not bridged:
            return None
        arp = _arp(payload) if hw_protocol == ETH_P_ARP else None
        if arp is None:  # another ethertype (a VLAN tag, ...) or a malformed ARP packet
            return packet(0, "", "", 0)
        sha, spa, tpa = arp
        return packet(4, spa, tpa, 0, arp_sha=sha)
    ip = _parse_ip(payload)
    if ip is None:
        return None
    family, src, dst, protocol, l4 = ip
    sport, dport = _ports(l4 or b"", protocol)
    icmp_type, icmp_code = _icmp(l4 or b"", protocol, IPPROTO_ICMP if family == 4 else IPPROTO_ICMPV6)
    return packet(family, src, dst, protocol, sport, dport, icmp_type, icmp_code, transport=l4 or b"")


def _ack_error(body: bytes) -> int:
    return error_code(body, 0) if len(body) >= 4 else errno.EPROTO


# --- the reader -------------------------------------------------------------------


class NflogReader:
    """Receives the packets logged to one nflog group (in ``netns``, if given).

    ``copy_range``: bytes of each packet copied (headers suffice);
    ``qthresh``/``timeout_cs``: the kernel's batching (packets, 1/100 s);
    ``nlbufsiz``: the kernel's batch buffer; ``rcvbuf``: the socket's receive
    buffer (set with SO_RCVBUFFORCE when allowed).
    """

    def __init__(
        self,
        group: int,
        netns: str | None = None,
        *,
        copy_range: int = 256,  # an IPv6 outer header, UDP, VXLAN and the inner frame's headers fit
        qthresh: int | None = 16,
        timeout_cs: int | None = 10,
        nlbufsiz: int | None = None,
        rcvbuf: int = 1 << 20,
    ) -> None:
        if not 0 <= group <= 0xFFFF:
            raise ValueError(f"nflog group out of range: {group}")
        self.group = group
        self.dropped = 0  # ENOBUFS reports: receive-buffer overflows, each losing at least one message
        self.unparsed = 0  # logged packets without a decodable IP header
        self._seq = 0
        self._buf = bytearray(_RECV_SIZE)
        with netns_entered(netns):
            self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            self._setup(rcvbuf, bind_attrs(copy_range, nlbufsiz, qthresh, timeout_cs))
        except BaseException:
            self._sock.close()
            raise

    def _setup(self, rcvbuf: int, attrs: bytes) -> None:
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
        except PermissionError:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self._sock.bind((0, 0))
        self._request(attrs)

    def _request(self, attrs: bytes) -> None:
        """Send one config request and wait for its ack (packets arriving meanwhile are discarded)."""
        self._seq += 1
        self._sock.send(config_message(self.group, attrs, self._seq))
        poller = select.poll()
        poller.register(self._sock, select.POLLIN)
        while True:
            if not poller.poll(int(_ACK_TIMEOUT * 1000)):
                raise OSError(errno.ETIMEDOUT, f"nflog group {self.group}: no answer to the config request")
            for msg_type, seq, body in iter_messages(self._sock.recv(_RECV_SIZE)):
                if msg_type == NLMSG_ERROR and seq == self._seq:
                    err = _ack_error(body)
                    if err:
                        raise OSError(err, f"nflog group {self.group}: {errno.errorcode.get(err, err)}")
                    return

    def fileno(self) -> int:
        return self._sock.fileno()

    def read(self, timeout: float | None = None) -> list[LoggedPacket]:
        """The packets available now, waiting up to ``timeout`` seconds (None: forever) for the first."""
        poller = select.poll()
        poller.register(self._sock, select.POLLIN)
        if not poller.poll(None if timeout is None else max(0, int(timeout * 1000))):
            return []
        packets: list[LoggedPacket] = []
        for _ in range(_MAX_DATAGRAMS_PER_READ):
            size = self._recv()
            if size is None:
                break
            packets.extend(self._decode(bytes(memoryview(self._buf)[:size])))
        return packets

    def _recv(self) -> int | None:
        """Bytes of the next datagram in ``_buf``; None when nothing is queued. Counts overflows."""
        while True:
            try:
                return self._sock.recv_into(self._buf, 0, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return None
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                self.dropped += 1

    def _decode(self, data: bytes) -> Iterator[LoggedPacket]:
        packet_type = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET
        for msg_type, _seq, body in iter_messages(data):
            if msg_type != packet_type:
                continue  # NLMSG_DONE closing a batch, late acks
            packet = parse_packet(body)
            if packet is None:
                self.unparsed += 1
            else:
                yield packet

    def close(self) -> None:
        """Unbind the group (best effort; closing alone also frees it) and close the socket."""
        if self._sock.fileno() < 0:
            return
        try:
            self._seq += 1
            self._sock.send(config_message(self.group, attr(NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_UNBIND])), self._seq))
        except OSError:
            pass
        finally:
            self._sock.close()

    def __enter__(self) -> NflogReader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
