"""XFRM driver: the agent's ESP security associations and policies, over hand-built XFRM netlink.

In the style of ``rtnl.py``: ``struct``-packed messages (linux/xfrm.h), no pyroute2, no subprocess.
The framing (headers, attributes, errno, namespaces) is ``netlink.py``'s.

What the agent makes (and only that is "ours"):

* SAs: ESP, transport mode, family of the addresses, ``reqid`` = ``naming.XFRM_REQID``, flags
  ``XFRM_STATE_ESN``, ``rfc4106(gcm(aes))`` with the 36-byte key (288 bits) and a 128-bit ICV, the replay
  window in the ESN replay state (``XFRMA_REPLAY_ESN_VAL``; the legacy u8 field stays 0, and kernel 6.1
  refuses an ESN SA with window 0, so both directions carry it), lifetimes ``XFRM_INF`` (byte and packet
  limits; the time limits are 0 = none, as ``ip xfrm`` leaves them: ``XFRM_INF`` seconds would overflow the
  kernel's expiry arithmetic and expire the SA at once).
  The SA's selector is left zero (``AF_UNSPEC``, as ``ip xfrm state add`` without ``sel``; the kernel
  stores and dumps it with the SA's family, and both read as ours): the policies
  select the traffic, and one SA per direction then serves every policy of the peer pair (the VXLAN
  policy for 4789 and the Geneve one for 6081). A selector naming one port would make the kernel refuse
  that SA to the other port's policy (``xfrm_state_look_at`` matches the flow against it).
* Policies: UDP from a host address to a host address and one destination port, ``dir`` in or out,
  priority ``naming.XFRM_PRIORITY``, action allow, lifetimes as the SAs', one template: ESP, transport,
  reqid ``XFRM_REQID``, ``level required``, any algorithm.

Batches: ``apply()`` turns every ``SyncXfrm`` into one message per object (add SAs, set policies, delete
policies, delete SAs; an SA both added and deleted is a replacement: deleted first, then added) and sends
all of them concatenated, as few ``sendmsg`` calls as the socket buffer takes, each with ``NLM_F_ACK`` and
its own sequence number; every ack is then read and mapped back to its object. A kernel refusal fails the
op with a reason naming the object and the errno text; deleting what is already gone counts as done.

Ownership: ``observe()`` keeps ONLY ESP transport SAs with our reqid and policies whose first template has
our reqid. The kernel identifies a policy by (selector, direction, mark, if_id, type), not by reqid, and an
SA by (daddr, spi, proto): a foreign object with exactly the identity of one of ours would be replaced or
deleted by our message. ``observe()`` therefore remembers the identities (nothing else) of the foreign
objects that could collide, and ``apply()`` refuses to send a message that would touch one of them (the op
fails, naming it). This guards the observe-then-apply cycle of the reconciler; a foreign object added
between the two is not seen.

Objects of ours of a shape we do not make (another algorithm, no ESN, a selector, another priority, a
second template, ...) are still observed, so that the planner replaces or deletes them:

* such an SA is observed under its identity with ``key = b""`` (``ODD_KEY``), which never equals a real
  36-byte key: the planner sees it differ and replaces it (delete, then add: a replacement);
* such a policy is observed under a key no target has: its direction (``fwd`` shown as ``in``), selector
  addresses (with ``/len`` when not a host prefix) and ``dport = -1 - <kernel index>``. Deleting that key
  deletes it by its index (with its mark and if_id). When the same batch sets a policy with the same
  selector, the kernel's UPDPOLICY has already replaced the odd one in place (keeping its index), so its
  delete is not sent and counts as done.

Secrets: keys are in ``XfrmSa.key`` (``repr=False``) and in the messages; nothing here logs a message or a
key, and the reasons of failed ops name addresses and SPIs only. The kernel returns keys in SA dumps unless
it is locked down (``xfrm_redact``): there, every SA reads as a different key and would be replaced.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import os
import socket
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from ..core.naming import XFRM_PRIORITY, XFRM_REQID
from ..core.objects import (
    ApplyResult,
    PolicyKey,
    SaCounters,
    SaKey,
    XfrmDirection,
    XfrmObservation,
    XfrmPolicy,
    XfrmSa,
)
from ..core.ops import SyncXfrm
from .netlink import (
    HDR_LEN,
    NETLINK_CAP_ACK,
    NETLINK_EXT_ACK,
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
from .netlink import attr as nl_attr

NETLINK_XFRM = 6
NLMSGERR_ATTR_MSG = 1

# linux/xfrm.h
XFRM_MSG_NEWSA = 0x10
XFRM_MSG_DELSA = 0x11
XFRM_MSG_GETSA = 0x12
XFRM_MSG_NEWPOLICY = 0x13
XFRM_MSG_DELPOLICY = 0x14
XFRM_MSG_GETPOLICY = 0x15
XFRM_MSG_UPDPOLICY = 0x19

XFRMA_ALG_AUTH = 1
XFRMA_ALG_CRYPT = 2
XFRMA_ALG_COMP = 3
XFRMA_ENCAP = 4
XFRMA_TMPL = 5
XFRMA_SEC_CTX = 8
XFRMA_SRCADDR = 13
XFRMA_POLICY_TYPE = 16
XFRMA_ALG_AEAD = 18
XFRMA_ALG_AUTH_TRUNC = 20
XFRMA_MARK = 21
XFRMA_TFCPAD = 22
XFRMA_REPLAY_ESN_VAL = 23
XFRMA_PROTO = 25
XFRMA_OFFLOAD_DEV = 28
XFRMA_SET_MARK = 29
XFRMA_IF_ID = 31

XFRM_STATE_ESN = 128
XFRM_MODE_TRANSPORT = 0
XFRM_POLICY_IN = 0
XFRM_POLICY_OUT = 1
XFRM_POLICY_FWD = 2
XFRM_POLICY_ALLOW = 0
XFRM_POLICY_TYPE_MAIN = 0
XFRM_INF = 0xFFFFFFFFFFFFFFFF
IPPROTO_ESP = 50
IPPROTO_UDP = 17
AF_INET = socket.AF_INET
AF_INET6 = socket.AF_INET6

AEAD_NAME = "rfc4106(gcm(aes))"
AEAD_KEY_BYTES = 36  # 256-bit AES key + 32-bit salt
AEAD_ICV_BITS = 128
REPLAY_ESN_MAX = 4096  # packets: the kernel's XFRMA_REPLAY_ESN_MAX (bytes of bitmap) / 4 / 8 words * 32
ODD_KEY = b""  # the key an SA of ours of a shape we do not make is observed with: never equals a real one
ALL_ALGOS = 0xFFFFFFFF

# the throwaway SAs unsupported() adds and deletes at once: loopback, a reserved SPI, a reqid not ours
PROBE_SPI = 0x000000FF  # SPIs 1..255 are reserved (RFC 4303): no peer ever uses one
PROBE_REQID = 0x564E5052  # "VNPR": not XFRM_REQID, so observe() never sees a leftover probe
PROBE_ADDRS = (("127.0.0.1", "127.0.0.1"), ("::1", "::1"))

SNDBUF = 32 << 20
RCVBUF = 64 << 20
SEND_BYTES = 8 << 20  # per sendmsg: far below the forced send buffer
SEND_MESSAGES = 16384  # per sendmsg: their acks (one skb each) must fit the receive buffer
RECV_BYTES = 1 << 20
RECV_TIMEOUT = 30.0
DUMP_RETRIES = 6

# --- structs (linux/xfrm.h; x86-64 layout, '=' and explicit padding) -------------------------------------

_SELECTOR = struct.Struct("=16s16sHHHHHBBBxxxiI")  # daddr saddr dport dmask sport smask family pd ps proto ifi user
_ID = struct.Struct("=16sIBxxx")  # daddr, spi (network order), proto
_LFT_CFG = struct.Struct("=8Q")
_LFT_CUR = struct.Struct("=4Q")  # bytes, packets, add_time, use_time
_STATS = struct.Struct("=III")  # replay_window, replay, integrity_failed
_SA_TAIL = struct.Struct("=IIHBBBxxxxxxx")  # seq, reqid, family, mode, replay_window, flags, pad to 224
_USERSA_INFO_LEN = _SELECTOR.size + _ID.size + 16 + _LFT_CFG.size + _LFT_CUR.size + _STATS.size + _SA_TAIL.size
_USERSA_ID = struct.Struct("=16sIHBx")  # daddr, spi, family, proto
_POLICY_TAIL = struct.Struct("=IIBBBBxxxx")  # priority, index, dir, action, flags, share, pad to 168
_USERPOLICY_INFO_LEN = _SELECTOR.size + _LFT_CFG.size + _LFT_CUR.size + _POLICY_TAIL.size
_USERPOLICY_ID = struct.Struct("=56sIBxxx")  # selector, index, dir
_TMPL = struct.Struct("=16sIBxxxHxx16sIBBBxIII")  # id(daddr spi proto) family saddr reqid mode share opt a e c
_REPLAY_ESN = struct.Struct("=IIIIII")  # bmp_len, oseq, seq, oseq_hi, seq_hi, replay_window
_AEAD = struct.Struct("=64sII")  # alg_name, alg_key_len (bits), alg_icv_len (bits)
_MARK = struct.Struct("=II")
_U32 = struct.Struct("=I")

assert _SELECTOR.size == 56 and _USERSA_INFO_LEN == 224 and _USERPOLICY_INFO_LEN == 168
assert _USERPOLICY_ID.size == 64 and _TMPL.size == 64 and _USERSA_ID.size == 24

# Byte and packet limits XFRM_INF, time limits 0 (none), as iproute2 sets them: XFRM_INF in a time limit
# overflows the kernel's signed seconds arithmetic (xfrm_timer_handler) and expires the object within a second.
_LFT_VALUES = (XFRM_INF, XFRM_INF, XFRM_INF, XFRM_INF, 0, 0, 0, 0)
_INF_LFT = _LFT_CFG.pack(*_LFT_VALUES)
_ZERO_CUR = _LFT_CUR.pack(0, 0, 0, 0)
_ZERO_ADDR = bytes(16)
_ZERO_SELECTOR = bytes(_SELECTOR.size)

_DIRS: dict[str, int] = {"in": XFRM_POLICY_IN, "out": XFRM_POLICY_OUT}
_DIR_NAMES: dict[int, XfrmDirection] = {XFRM_POLICY_IN: "in", XFRM_POLICY_OUT: "out"}


class XfrmError(OSError):
    """The XFRM socket or a dump failed as a whole (not a refused request: those fail their op)."""


# --- addresses ----------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1 << 14)
def _addr(text: str) -> tuple[int, bytes]:
    """(family, xfrm_address_t) of an IP text."""
    ip = ipaddress.ip_address(text)
    if ip.version == 4:
        return AF_INET, ip.packed + bytes(12)
    return AF_INET6, ip.packed


@functools.lru_cache(maxsize=1 << 14)
def _text(family: int, raw: bytes) -> str:
    """Normalised text of an xfrm_address_t."""
    return str(ipaddress.ip_address(raw[:4] if family == AF_INET else raw[:16]))


def _pair(src: str, dst: str) -> tuple[int, bytes, bytes]:
    fs, s = _addr(src)
    fd, d = _addr(dst)
    if fs != fd:
        raise ValueError(f"{src} and {dst} are not of one address family")
    return fs, s, d


def _host_len(family: int) -> int:
    return 32 if family == AF_INET else 128


# --- encoding -----------------------------------------------------------------------------------------


def sa_selector_bytes() -> bytes:
    """The SA's selector: zero (AF_UNSPEC, any traffic), see the module docstring."""
    return _ZERO_SELECTOR


def policy_selector(src: str, dst: str, dport: int) -> bytes:
    """UDP from host ``src`` to host ``dst`` port ``dport`` (network order, mask 0xffff), any source port."""
    family, s, d = _pair(src, dst)
    if not 0 <= dport <= 0xFFFF:
        raise ValueError(f"bad port {dport}")
    hl = _host_len(family)
    return _SELECTOR.pack(d, s, socket.htons(dport), 0xFFFF, 0, 0, family, hl, hl, IPPROTO_UDP, 0, 0)


def encode_newsa(sa: XfrmSa, reqid: int = XFRM_REQID) -> bytes:
    """The body of an XFRM_MSG_NEWSA for ``sa`` (carries the key: never log it)."""
    if len(sa.key) != AEAD_KEY_BYTES:
        raise ValueError(f"SA {sa.src}->{sa.dst} spi {sa.spi:#x}: key must be {AEAD_KEY_BYTES} bytes")
    if not 0 < sa.replay_window <= REPLAY_ESN_MAX:
        raise ValueError(f"SA {sa.src}->{sa.dst} spi {sa.spi:#x}: replay window must be 1..{REPLAY_ESN_MAX}")
    if not 0 < sa.spi <= 0xFFFFFFFF:
        raise ValueError(f"bad SPI {sa.spi}")
    family, s, d = _pair(sa.src, sa.dst)
    info = b"".join((
        sa_selector_bytes(),
        _ID.pack(d, socket.htonl(sa.spi), IPPROTO_ESP),
        s,
        _INF_LFT,
        _ZERO_CUR,
        _STATS.pack(0, 0, 0),
        _SA_TAIL.pack(0, reqid, family, XFRM_MODE_TRANSPORT, 0, XFRM_STATE_ESN),
    ))
    aead = _AEAD.pack(AEAD_NAME.encode(), AEAD_KEY_BYTES * 8, AEAD_ICV_BITS) + sa.key
    words = (sa.replay_window + 31) // 32
    esn = _REPLAY_ESN.pack(words, 0, 0, 0, 0, sa.replay_window) + bytes(4 * words)
    return info + nl_attr(XFRMA_ALG_AEAD, aead) + nl_attr(XFRMA_REPLAY_ESN_VAL, esn)


def encode_delsa(ident: SaKey, extra: bytes = b"") -> bytes:
    """The body of an XFRM_MSG_DELSA: (daddr, spi, ESP) and the source address (and a mark, if ``extra``)."""
    src, dst, spi = ident
    family, s, d = _pair(src, dst)
    return _USERSA_ID.pack(d, socket.htonl(spi), family, IPPROTO_ESP) + nl_attr(XFRMA_SRCADDR, s) + extra


def encode_policy(policy: XfrmPolicy) -> bytes:
    """The body of an XFRM_MSG_UPDPOLICY for ``policy`` (create or replace)."""
    family = _addr(policy.src)[0]
    info = b"".join((
        policy_selector(policy.src, policy.dst, policy.dport),
        _INF_LFT,
        _ZERO_CUR,
        _POLICY_TAIL.pack(XFRM_PRIORITY, 0, _DIRS[policy.direction], XFRM_POLICY_ALLOW, 0, 0),
    ))
    tmpl = _TMPL.pack(_ZERO_ADDR, 0, IPPROTO_ESP, family, _ZERO_ADDR, XFRM_REQID, XFRM_MODE_TRANSPORT, 0, 0,
                      ALL_ALGOS, ALL_ALGOS, ALL_ALGOS)
    return info + nl_attr(XFRMA_TMPL, tmpl)


def encode_delpolicy(key: PolicyKey) -> bytes:
    """The body of an XFRM_MSG_DELPOLICY by selector and direction."""
    direction, src, dst, dport = key
    return _USERPOLICY_ID.pack(policy_selector(src, dst, dport), 0, _DIRS[direction])


@dataclass(frozen=True, slots=True)
class Request:
    """One message of a batch and what it is for."""

    msg_type: int
    body: bytes = field(repr=False)  # may carry a key
    op: int  # index of its op in the batch
    what: str  # "add SA 192.0.2.1->192.0.2.2 spi 0x1234": names the object, never the key
    absent_ok: bool  # a delete: ESRCH/ENOENT means done


def _sa_label(verb: str, src: str, dst: str, spi: int) -> str:
    return f"{verb} SA {src}->{dst} spi {spi:#x}"


def _policy_label(verb: str, key: PolicyKey) -> str:
    direction, src, dst, dport = key
    return f"{verb} policy {direction} {src}->{dst} udp dport {dport}"


# --- decoding -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SaRecord:
    """One SA of a dump, as far as the driver reads it."""

    family: int
    src: str
    dst: str
    spi: int
    proto: int
    mode: int
    reqid: int
    flags: int
    key: bytes = field(repr=False)  # ODD_KEY unless the SA is of the shape we make
    replay_window: int
    counters: SaCounters
    added: int
    mark: bytes | None  # the raw XFRMA_MARK attribute (needed to address it), None without one

    @property
    def ident(self) -> SaKey:
        return (self.src, self.dst, self.spi)


@dataclass(frozen=True)
class PolicyRecord:
    """One policy of a dump, as far as the driver reads it."""

    dir: int
    index: int
    selector: bytes  # raw xfrm_selector
    reqid: int | None  # of the first template, None without one
    ours_shape: bool  # exactly what encode_policy makes (with our reqid)
    key: PolicyKey  # the key it is observed under (only meaningful for ours)
    identity_attrs: bytes  # mark / if_id / policy type attributes: needed to address it


def parse_sa(buf: bytes | bytearray | memoryview, start: int, end: int) -> SaRecord | None:
    """An XFRM_MSG_NEWSA payload (a dump entry); None if too short."""
    if end - start < _USERSA_INFO_LEN:
        return None
    sel = bytes(buf[start:start + _SELECTOR.size])
    off = start + _SELECTOR.size
    daddr, spi_be, proto = _ID.unpack_from(buf, off)
    off += _ID.size
    saddr = bytes(buf[off:off + 16])
    off += 16
    lft = _LFT_CFG.unpack_from(buf, off)
    off += _LFT_CFG.size
    cur_bytes, cur_packets, add_time, _use = _LFT_CUR.unpack_from(buf, off)
    off += _LFT_CUR.size
    st_window, st_replay, st_integrity = _STATS.unpack_from(buf, off)
    off += _STATS.size
    _seq, reqid, family, mode, legacy_window, flags = _SA_TAIL.unpack_from(buf, off)
    aead: tuple[str, int, int, bytes] | None = None
    esn_window: int | None = None
    mark: bytes | None = None
    other = False  # an attribute we never set (another algorithm, encapsulation, offload, ...)
    for kind, a, b in iter_attrs(buf, start + _USERSA_INFO_LEN, end):
        if kind == XFRMA_ALG_AEAD and b - a >= _AEAD.size:
            name, key_bits, icv_bits = _AEAD.unpack_from(buf, a)
            key = bytes(buf[a + _AEAD.size:b])[: (key_bits + 7) // 8]
            aead = (name.rstrip(b"\0").decode(errors="replace"), key_bits, icv_bits, key)
        elif kind == XFRMA_REPLAY_ESN_VAL and b - a >= _REPLAY_ESN.size:
            esn_window = _REPLAY_ESN.unpack_from(buf, a)[5]
        elif kind == XFRMA_MARK:
            mark = nl_attr(XFRMA_MARK, bytes(buf[a:b]))
        elif kind in (XFRMA_ALG_AUTH, XFRMA_ALG_CRYPT, XFRMA_ALG_COMP, XFRMA_ENCAP, XFRMA_ALG_AUTH_TRUNC,
                      XFRMA_SEC_CTX, XFRMA_TFCPAD, XFRMA_OFFLOAD_DEV, XFRMA_SET_MARK, XFRMA_IF_ID):
            other = True
    if family not in (AF_INET, AF_INET6):
        return None
    ours = (
        aead is not None
        and aead[0] == AEAD_NAME
        and aead[1] == AEAD_KEY_BYTES * 8
        and aead[2] == AEAD_ICV_BITS
        and len(aead[3]) == AEAD_KEY_BYTES
        and esn_window is not None
        and esn_window > 0
        and flags == XFRM_STATE_ESN
        and legacy_window == 0
        and _any_selector(sel, family)
        and lft == _LFT_VALUES
        and mark is None
        and not other
    )
    return SaRecord(
        family=family,
        src=_text(family, saddr),
        dst=_text(family, daddr),
        spi=socket.ntohl(spi_be),
        proto=proto,
        mode=mode,
        reqid=reqid,
        flags=flags,
        key=aead[3] if ours and aead is not None else ODD_KEY,
        replay_window=esn_window if esn_window is not None else legacy_window,
        counters=SaCounters(bytes=cur_bytes, packets=cur_packets, replay=st_replay, replay_window=st_window,
                            integrity_failed=st_integrity),
        added=add_time,
        mark=mark,
    )


def _any_selector(sel: bytes, family: int) -> bool:
    """A selector of any traffic: zero, as we send it, or with the SA's family (how the kernel stores it)."""
    return sel == _ZERO_SELECTOR or sel == _ZERO_SELECTOR[:40] + struct.pack("=H", family) + _ZERO_SELECTOR[42:]


def _selector_key(sel: bytes) -> tuple[str, str, int, bool]:
    """(src, dst, dport, is one of our shape) of a raw selector."""
    daddr, saddr, dport, dmask, sport, smask, family, plen_d, plen_s, proto, ifindex, user = _SELECTOR.unpack(sel)
    if family not in (AF_INET, AF_INET6):
        return ("?", "?", 0, False)
    src, dst = _text(family, saddr), _text(family, daddr)
    hl = _host_len(family)
    shape = (plen_d == hl and plen_s == hl and proto == IPPROTO_UDP and dmask == 0xFFFF and sport == 0
             and smask == 0 and ifindex == 0 and user == 0)
    if plen_s != hl:
        src = f"{src}/{plen_s}"
    if plen_d != hl:
        dst = f"{dst}/{plen_d}"
    return src, dst, socket.ntohs(dport), shape


def parse_policy(buf: bytes | bytearray | memoryview, start: int, end: int) -> PolicyRecord | None:
    """An XFRM_MSG_NEWPOLICY payload (a dump entry); None if too short."""
    if end - start < _USERPOLICY_INFO_LEN:
        return None
    sel = bytes(buf[start:start + _SELECTOR.size])
    lft = _LFT_CFG.unpack_from(buf, start + _SELECTOR.size)
    priority, index, direction, action, flags, _share = _POLICY_TAIL.unpack_from(
        buf, start + _SELECTOR.size + _LFT_CFG.size + _LFT_CUR.size)
    tmpls: list[tuple[Any, ...]] = []
    identity = b""
    other = False
    for kind, a, b in iter_attrs(buf, start + _USERPOLICY_INFO_LEN, end):
        if kind == XFRMA_TMPL:
            for off in range(a, b - _TMPL.size + 1, _TMPL.size):
                tmpls.append(_TMPL.unpack_from(buf, off))
        elif kind == XFRMA_MARK:
            identity += nl_attr(XFRMA_MARK, bytes(buf[a:b]))
            other = True
        elif kind == XFRMA_IF_ID:
            identity += nl_attr(XFRMA_IF_ID, bytes(buf[a:b]))
            other = other or bytes(buf[a:b]) != bytes(4)
        elif kind == XFRMA_POLICY_TYPE:
            ptype = bytes(buf[a:b])
            if ptype[:1] != bytes([XFRM_POLICY_TYPE_MAIN]):
                identity += nl_attr(XFRMA_POLICY_TYPE, ptype)
                other = True
        elif kind == XFRMA_SEC_CTX:
            other = True
    reqid = tmpls[0][5] if tmpls else None
    src, dst, dport, sel_shape = _selector_key(sel)
    family = _SELECTOR.unpack(sel)[6]
    ours_shape = False
    if len(tmpls) == 1 and sel_shape and not other:
        t_daddr, t_spi, t_proto, t_family, t_saddr, t_reqid, t_mode, _t_share, t_opt, aa, ea, ca = tmpls[0]
        ours_shape = (
            direction in _DIR_NAMES and priority == XFRM_PRIORITY and action == XFRM_POLICY_ALLOW
            and flags == 0 and lft == _LFT_VALUES
            and t_proto == IPPROTO_ESP and t_family == family and t_daddr == _ZERO_ADDR and t_saddr == _ZERO_ADDR
            and t_spi == 0 and t_reqid == XFRM_REQID and t_mode == XFRM_MODE_TRANSPORT and t_opt == 0
            and aa == ALL_ALGOS and ea == ALL_ALGOS and ca == ALL_ALGOS
        )
    if ours_shape:
        key: PolicyKey = (_DIR_NAMES[direction], src, dst, dport)
    else:  # a key no target has (see the module docstring)
        key = (_DIR_NAMES.get(direction, "in"), src, dst, -1 - index)
    return PolicyRecord(direction, index, sel, reqid, ours_shape, key, identity)


def error_reply(buf: bytes | bytearray | memoryview, start: int, end: int, flags: int) -> tuple[int, str]:
    """(positive errno, extended ack text or "") of an NLMSG_ERROR payload (NETLINK_CAP_ACK set)."""
    code = error_code(buf, start)
    message = ""
    if flags & NLM_F_ACK_TLVS:
        for kind, a, b in iter_attrs(buf, start + 4 + HDR_LEN, end):
            if kind == NLMSGERR_ATTR_MSG:
                message = bytes(buf[a:b]).rstrip(b"\0").decode(errors="replace")
    return code, message


def describe_error(code: int, message: str) -> str:
    text = os.strerror(code)
    return f"{text} ({message})" if message and message != text else text


def record_acks(buf: bytes | bytearray | memoryview, size: int, base: int,
                outcomes: list[tuple[int, str] | None], pending: set[int]) -> None:
    """Record the acks in ``buf[:size]`` for requests ``base..base+len(outcomes)-1``.

    ``outcomes[i]`` becomes (errno, text) of request i (errno 0: done); ``pending`` loses each sequence
    number answered. Replies to other sequence numbers are ignored.
    """
    last = base + len(outcomes) - 1
    try:
        for msg_type, flags, seq, a, b in iter_messages(buf, size):
            if msg_type == NLMSG_ERROR and base <= seq <= last and b - a >= 4:
                outcomes[seq - base] = error_reply(buf, a, b, flags)
                pending.discard(seq)
    except FramingError:
        pass  # the rest of this datagram cannot be framed


# --- planning one batch into messages ------------------------------------------------------------------


@dataclass
class _Known:
    """What the last observe() learnt that apply() needs: odd policies of ours, foreign identities."""

    odd_policies: dict[PolicyKey, PolicyRecord] = field(default_factory=dict)
    sa_marks: dict[SaKey, bytes] = field(default_factory=dict)  # our odd SAs that carry a mark
    foreign_policies: set[tuple[int, bytes]] = field(default_factory=set)  # (dir, selector) without mark/if_id
    foreign_sas: set[SaKey] = field(default_factory=set)  # ESP SAs not ours, without a mark


def build_requests(ops: Sequence[SyncXfrm], known: _Known | None = None
                   ) -> tuple[list[Request], dict[int, list[str]]]:
    """The messages of ``ops`` in order, and the reasons of ops that fail before anything is sent.

    Per op: SAs replaced (in both ``add_sas`` and ``delete_sas``) are deleted first, then SAs added,
    policies set, policies deleted, SAs deleted. A message that would touch a foreign object of the last
    observation is not made; its op fails with the reason. A delete of an odd policy whose selector a
    policy set in the same op replaces is not made either (UPDPOLICY replaced it in place).
    """
    known = known or _Known()
    requests: list[Request] = []
    refused: dict[int, list[str]] = {}
    for i, op in enumerate(ops):
        added = {sa.ident for sa in op.add_sas}
        deleted = set(op.delete_sas)
        replaced = added & deleted

        def refuse(what: str, i: int = i) -> None:
            refused.setdefault(i, []).append(f"{what}: an object that is not ours has this identity; not touched")

        def delsa(ident: SaKey, i: int = i) -> None:
            what = _sa_label("delete", *ident)
            if ident in known.foreign_sas:
                refuse(what)
                return
            requests.append(Request(XFRM_MSG_DELSA, encode_delsa(ident, known.sa_marks.get(ident, b"")), i,
                                    what, True))

        for ident in op.delete_sas:
            if ident in replaced:
                delsa(ident)
        for sa in op.add_sas:
            requests.append(Request(XFRM_MSG_NEWSA, encode_newsa(sa), i, _sa_label("add", sa.src, sa.dst, sa.spi),
                                    False))
        set_selectors: set[tuple[int, bytes]] = set()
        for pol in op.set_policies:
            what = _policy_label("set", pol.ident)
            body = encode_policy(pol)
            identity = (_DIRS[pol.direction], body[:_SELECTOR.size])
            if identity in known.foreign_policies:
                refuse(what)
                continue
            set_selectors.add(identity)
            requests.append(Request(XFRM_MSG_UPDPOLICY, body, i, what, False))
        for key in op.delete_policies:
            what = _policy_label("delete", key)
            odd = known.odd_policies.get(key)
            if odd is not None:
                if (odd.dir, odd.selector) in set_selectors:
                    continue  # replaced in place by this op's UPDPOLICY
                body = _USERPOLICY_ID.pack(odd.selector, odd.index, odd.dir) + odd.identity_attrs
            else:
                body = encode_delpolicy(key)
                if (_DIRS[key[0]], body[:_SELECTOR.size]) in known.foreign_policies:
                    refuse(what)
                    continue
            requests.append(Request(XFRM_MSG_DELPOLICY, body, i, what, True))
        for ident in op.delete_sas:
            if ident not in replaced:
                delsa(ident)
    return requests, refused


def outcome_reasons(requests: Sequence[Request], outcomes: Sequence[tuple[int, str] | None]
                    ) -> dict[int, list[str]]:
    """Reasons by op index of the requests that failed (an absent object deleted is done)."""
    reasons: dict[int, list[str]] = {}
    for req, outcome in zip(requests, outcomes, strict=True):
        if outcome is None:
            reasons.setdefault(req.op, []).append(f"{req.what}: no reply from the kernel; outcome unknown")
            continue
        code, message = outcome
        if code == 0 or (req.absent_ok and code in (errno.ESRCH, errno.ENOENT)):
            continue
        reasons.setdefault(req.op, []).append(f"{req.what}: {describe_error(code, message)}")
    return reasons


# --- the driver ---------------------------------------------------------------------------------------


class XfrmDriver:
    """The agent's SAs and policies in one network namespace (``netns``: a name under /run/netns)."""

    def __init__(self, netns: str | None = None) -> None:
        self._netns = netns
        self._sock: socket.socket | None = None
        self._seq = 0
        self._buf = bytearray(RECV_BYTES)
        self._unsupported: tuple[str | None] | None = None
        self._known = _Known()
        self.interrupted_dumps = 0

    def __repr__(self) -> str:
        return f"XfrmDriver(netns={self._netns!r})"

    # -- socket --

    def _socket(self) -> socket.socket:
        if self._sock is None:
            with netns_entered(self._netns):
                sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_XFRM)
            try:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, SNDBUF)
                    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
                except PermissionError:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
                sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
                sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
                sock.bind((0, 0))
                sock.settimeout(RECV_TIMEOUT)
            except BaseException:
                sock.close()
                raise
            self._sock = sock
        return self._sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> XfrmDriver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _reserve(self, count: int) -> int:
        """The first of ``count`` fresh sequence numbers."""
        if self._seq + count >= 0xFFFFFFFF:
            self._seq = 0
        base = self._seq + 1
        self._seq += count
        return base

    # -- batches --

    def _send(self, requests: Sequence[Request]) -> list[tuple[int, str] | None]:
        """Send ``requests`` (each with NLM_F_ACK) in as few sendmsg calls as fit; every outcome."""
        sock = self._socket()
        outcomes: list[tuple[int, str] | None] = [None] * len(requests)
        first = 0
        while first < len(requests):
            stop, size = first, 0
            while stop < len(requests) and stop - first < SEND_MESSAGES and (
                    stop == first or size + HDR_LEN + len(requests[stop].body) <= SEND_BYTES):
                size += HDR_LEN + len(requests[stop].body)
                stop += 1
            base = self._reserve(stop - first)
            pack = NLMSGHDR.pack
            parts: list[bytes] = []
            for seq, req in enumerate(requests[first:stop], base):
                parts.append(pack(HDR_LEN + len(req.body), req.msg_type, NLM_F_REQUEST | NLM_F_ACK, seq, 0))
                parts.append(req.body)
            chunk = outcomes[first:stop]
            sock.sendall(b"".join(parts))
            self._collect(base, chunk)
            outcomes[first:stop] = chunk
            first = stop
        return outcomes

    def _collect(self, base: int, outcomes: list[tuple[int, str] | None]) -> None:
        sock = self._sock
        assert sock is not None
        pending = set(range(base, base + len(outcomes)))
        while pending:
            try:
                size = sock.recv_into(self._buf)
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                # acks were dropped: what was not answered stays None (outcome unknown); read what is queued
                self._drain(base, outcomes, pending)
                return
            record_acks(self._buf, size, base, outcomes, pending)

    def _drain(self, base: int, outcomes: list[tuple[int, str] | None], pending: set[int]) -> None:
        sock = self._sock
        assert sock is not None
        sock.settimeout(0.2)
        try:
            while pending:
                try:
                    size = sock.recv_into(self._buf)
                except (BlockingIOError, TimeoutError):
                    return
                except OSError as exc:
                    if exc.errno != errno.ENOBUFS:
                        raise
                    continue
                record_acks(self._buf, size, base, outcomes, pending)
        finally:
            sock.settimeout(RECV_TIMEOUT)

    def apply(self, ops: Sequence[SyncXfrm]) -> ApplyResult[SyncXfrm]:
        """Apply ``ops`` as one netlink batch; see the module docstring. Raises only for a broken socket."""
        result: ApplyResult[SyncXfrm] = ApplyResult()
        requests, reasons = build_requests(ops, self._known)
        if requests:
            outcomes = self._send(requests)
            for i, texts in outcome_reasons(requests, outcomes).items():
                reasons.setdefault(i, []).extend(texts)
        result.requests = len(requests)
        for i, op in enumerate(ops):
            if i in reasons:
                result.failed.append((op, "; ".join(reasons[i])))
            else:
                result.applied.append(op)
        return result

    # -- dumps --

    def _dump(self, msg_type: int, body: bytes) -> Iterator[tuple[bytearray, int, int, int]]:
        """(buffer, type, payload start, payload end) of each message of one dump pass."""
        sock = self._socket()
        seq = self._reserve(1)
        sock.sendall(NLMSGHDR.pack(HDR_LEN + len(body), msg_type, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body)
        interrupted = False
        while True:
            size = sock.recv_into(self._buf)
            try:
                for kind, flags, mseq, a, b in iter_messages(self._buf, size):
                    if mseq != seq:
                        continue
                    interrupted = interrupted or bool(flags & NLM_F_DUMP_INTR)
                    if kind == NLMSG_DONE:
                        code = error_code(self._buf, a) if b - a >= 4 else 0
                        if code == errno.EINTR or (interrupted and not code):
                            raise _Interrupted
                        if code:
                            raise XfrmError(code, f"XFRM dump failed: {os.strerror(code)}")
                        return
                    if kind == NLMSG_ERROR:
                        code, message = error_reply(self._buf, a, b, flags)
                        if code == errno.EINTR:
                            raise _Interrupted
                        raise XfrmError(code, f"XFRM dump failed: {describe_error(code, message)}")
                    yield self._buf, kind, a, b
            except FramingError:
                pass

    def _dump_all(self, msg_type: int, body: bytes, want: int, parse: Any) -> list[Any]:
        for _attempt in range(DUMP_RETRIES):
            items: list[Any] = []
            try:
                for buf, kind, a, b in self._dump(msg_type, body):
                    if kind == want:
                        item = parse(buf, a, b)
                        if item is not None:
                            items.append(item)
            except _Interrupted:
                self.interrupted_dumps += 1
                continue
            except BaseException:
                self.close()  # a half-read dump: the next request must not read its tail
                raise
            return items
        raise XfrmError(errno.EINTR, "XFRM dump kept being interrupted by concurrent changes")

    def observe(self) -> XfrmObservation:
        """Our SAs and policies (see the module docstring for what is ours and how odd ones read)."""
        sas = self._dump_all(XFRM_MSG_GETSA, nl_attr(XFRMA_PROTO, bytes([IPPROTO_ESP])), XFRM_MSG_NEWSA, parse_sa)
        policies = self._dump_all(XFRM_MSG_GETPOLICY, b"", XFRM_MSG_NEWPOLICY, parse_policy)
        obs = XfrmObservation()
        known = _Known()
        for sa in cast(list[SaRecord], sas):
            if sa.proto != IPPROTO_ESP:
                continue
            if sa.reqid != XFRM_REQID or sa.mode != XFRM_MODE_TRANSPORT:
                if sa.mark is None:
                    known.foreign_sas.add(sa.ident)
                continue
            obs.sas[sa.ident] = XfrmSa(sa.src, sa.dst, sa.spi, sa.key, sa.replay_window)
            obs.counters[sa.ident] = sa.counters
            obs.added[sa.ident] = sa.added
            if sa.mark is not None:
                known.sa_marks[sa.ident] = sa.mark
        for pol in cast(list[PolicyRecord], policies):
            if pol.reqid != XFRM_REQID:
                if not pol.identity_attrs:
                    known.foreign_policies.add((pol.dir, pol.selector))
                continue
            direction, src, dst, dport = pol.key
            obs.policies[pol.key] = XfrmPolicy(cast(XfrmDirection, direction), src, dst, dport)
            if not pol.ours_shape:
                known.odd_policies[pol.key] = pol
        self._known = known
        return obs

    # -- capability --

    def unsupported(self) -> str | None:
        """Why this kernel cannot do ESP + rfc4106(gcm(aes)) + ESN (IPv4 and IPv6), or None. Cached."""
        if self._unsupported is None:
            self._unsupported = (self._probe(),)
        return self._unsupported[0]

    def _probe(self) -> str | None:
        try:
            self._socket()
        except OSError as exc:
            return f"the kernel has no XFRM netlink (xfrm_user missing?): {exc.strerror or exc}"
        key = bytes(AEAD_KEY_BYTES)  # never used for traffic: the SA lives for one round trip, on loopback
        # Per family: a leftover deleted, an ESP SA with the null cipher (the kernel looks algorithms up
        # before the ESP type, so this one tells "no ESP" from "no GCM"), then ours; each deleted at once.
        requests: list[Request] = []
        for src, dst in PROBE_ADDRS:
            for spi, body in ((PROBE_SPI - 1, _null_esp_sa(src, dst, PROBE_SPI - 1)),
                              (PROBE_SPI, encode_newsa(XfrmSa(src, dst, PROBE_SPI, key, 32), reqid=PROBE_REQID))):
                removal = encode_delsa((src, dst, spi))
                requests.append(Request(XFRM_MSG_DELSA, removal, 0, "probe", True))
                requests.append(Request(XFRM_MSG_NEWSA, body, 0, "probe", False))
                requests.append(Request(XFRM_MSG_DELSA, removal, 0, "probe", True))
        outcomes = self._send(requests)
        for n, family in enumerate(("IPv4", "IPv6")):
            null_add, null_del, add, delete = (outcomes[6 * n + k] for k in (1, 2, 4, 5))
            if null_add is not None and null_add[0] == errno.EPROTONOSUPPORT:
                module = "esp4" if family == "IPv4" else "esp6"
                return f"the kernel cannot make {family} ESP SAs ({module} missing?): {null_add[1] or 'no ESP'}"
            if add is None:
                return f"the kernel did not answer an {family} ESP SA probe"
            if add[0]:
                return _probe_reason(family, *add)
            for gone in (null_del, delete):
                if gone is not None and gone[0] not in (0, errno.ESRCH, errno.ENOENT):
                    return f"the kernel made a probe {family} ESP SA but could not delete it: {describe_error(*gone)}"
        return None


def _null_esp_sa(src: str, dst: str, spi: int) -> bytes:
    """An ESP SA with the null cipher and no ESN (the probe's: it tells whether ESP itself is there)."""
    family, s, d = _pair(src, dst)
    info = b"".join((_ZERO_SELECTOR, _ID.pack(d, socket.htonl(spi), IPPROTO_ESP), s, _INF_LFT, _ZERO_CUR,
                     _STATS.pack(0, 0, 0), _SA_TAIL.pack(0, PROBE_REQID, family, XFRM_MODE_TRANSPORT, 0, 0)))
    return info + nl_attr(XFRMA_ALG_CRYPT, struct.pack("=64sI", b"ecb(cipher_null)", 0))


def _probe_reason(family: str, code: int, message: str) -> str:
    detail = describe_error(code, message)
    if code == errno.EPROTONOSUPPORT or "type not found" in message.lower():
        module = "esp4" if family == "IPv4" else "esp6"
        return f"the kernel cannot make {family} ESP SAs ({module} missing?): {message or detail}"
    if code in (errno.ENOSYS, errno.ENOENT) or "algorithm" in message.lower():
        return f"the kernel has no {AEAD_NAME} for ESP (gcm/aes modules missing?): {detail}"
    if code == errno.EINVAL:
        return f"the kernel refused an ESP {AEAD_NAME} SA with extended sequence numbers ({family}): {detail}"
    return f"the kernel refused a probe {family} ESP {AEAD_NAME} ESN SA: {detail}"


class _Interrupted(Exception):
    """A dump the kernel flagged inconsistent or aborted: run it again."""
