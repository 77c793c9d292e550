"""The XFRM driver's messages, ack mapping and ownership filter, against a fake socket (no root, no kernel)."""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Callable

import pytest

from veilnet_agent.core.naming import XFRM_PRIORITY, XFRM_REQID
from veilnet_agent.core.objects import XfrmPolicy, XfrmSa
from veilnet_agent.core.ops import SyncXfrm
from veilnet_agent.drivers import netlink
from veilnet_agent.drivers import xfrm as X

KEY = bytes(range(36))
KEY2 = bytes(range(100, 136))
SA_OUT = XfrmSa("192.0.2.1", "192.0.2.2", 0x1234, KEY)
SA_IN = XfrmSa("192.0.2.2", "192.0.2.1", 0x4321, KEY2, 64)
SA6 = XfrmSa("2001:db8::1", "2001:db8::2", 0x99, KEY, 4096)
POL_OUT = XfrmPolicy("out", "192.0.2.1", "192.0.2.2", 4789)
POL_IN = XfrmPolicy("in", "192.0.2.2", "192.0.2.1", 4789)
POL6 = XfrmPolicy("out", "2001:db8::1", "2001:db8::2", 6081)


def frame(msg_type: int, body: bytes, seq: int = 1, flags: int = netlink.NLM_F_MULTI) -> bytes:
    return netlink.NLMSGHDR.pack(netlink.HDR_LEN + len(body), msg_type, flags, seq, 0) + body


def kernel_form(body: bytes, family: int) -> bytes:
    """An SA body as the kernel dumps it: the selector carries the SA's family."""
    return body[:40] + struct.pack("=H", family) + body[42:]


# --- encoding and decoding --------------------------------------------------------------------------------


def test_struct_sizes_match_the_kernel_uapi() -> None:
    assert len(X.encode_newsa(SA_OUT)) >= 224
    assert len(X.encode_delsa(SA_OUT.ident)) == 24 + 20
    assert len(X.encode_policy(POL_OUT)) == 168 + 4 + 64
    assert len(X.encode_delpolicy(POL_OUT.ident)) == 64


@pytest.mark.parametrize("sa", [SA_OUT, SA_IN, SA6], ids=["v4", "v4-window64", "v6"])
def test_newsa_round_trips_through_the_dump_parser(sa: XfrmSa) -> None:
    body = X.encode_newsa(sa)
    family = socket.AF_INET6 if ":" in sa.src else socket.AF_INET
    for form in (body, kernel_form(body, family)):
        record = X.parse_sa(form, 0, len(form))
        assert record is not None
        assert (record.src, record.dst, record.spi, record.proto, record.mode) == (sa.src, sa.dst, sa.spi, 50, 0)
        assert record.reqid == XFRM_REQID and record.flags == X.XFRM_STATE_ESN and record.family == family
        assert record.key == sa.key and record.replay_window == sa.replay_window


def test_newsa_carries_the_aead_and_esn_state_the_kernel_wants() -> None:
    body = X.encode_newsa(SA_IN)
    attrs = {kind: body[a:b] for kind, a, b in netlink.iter_attrs(body, 224, len(body))}
    name, key_bits, icv_bits = struct.unpack_from("=64sII", attrs[X.XFRMA_ALG_AEAD])
    assert (name.rstrip(b"\0"), key_bits, icv_bits) == (b"rfc4106(gcm(aes))", 288, 128)
    assert attrs[X.XFRMA_ALG_AEAD][72:] == KEY2
    bmp_len, *_seqs, window = struct.unpack_from("=6I", attrs[X.XFRMA_REPLAY_ESN_VAL])
    assert (bmp_len, window, len(attrs[X.XFRMA_REPLAY_ESN_VAL])) == (2, 64, 24 + 8)
    assert body[215] == 0  # the legacy u8 window: the kernel refuses it with ESN
    assert body[:56] == bytes(56)  # selector: any traffic
    # no byte or packet limit, and no time limit (0: XFRM_INF seconds would expire it at once)
    assert struct.unpack_from("=8Q", body, 96) == (X.XFRM_INF,) * 4 + (0,) * 4
    assert struct.unpack_from("=8Q", X.encode_policy(POL_OUT), 56) == (X.XFRM_INF,) * 4 + (0,) * 4


def test_delsa_names_daddr_spi_esp_and_the_source() -> None:
    body = X.encode_delsa(SA_OUT.ident)
    daddr, spi, family, proto = struct.unpack_from("=16sIHBx", body)
    assert (daddr[:4], socket.ntohl(spi), family, proto) == (bytes([192, 0, 2, 2]), 0x1234, socket.AF_INET, 50)
    assert list(netlink.iter_attrs(body, 24, len(body))) == [(X.XFRMA_SRCADDR, 28, 44)]
    assert body[28:32] == bytes([192, 0, 2, 1])


def test_bad_objects_are_refused_before_encoding() -> None:
    with pytest.raises(ValueError, match="36 bytes"):
        X.encode_newsa(XfrmSa("192.0.2.1", "192.0.2.2", 1, b"short"))
    with pytest.raises(ValueError, match="replay window"):
        X.encode_newsa(XfrmSa("192.0.2.1", "192.0.2.2", 1, KEY, 0))
    with pytest.raises(ValueError, match="family"):
        X.encode_newsa(XfrmSa("192.0.2.1", "2001:db8::2", 1, KEY))


def test_an_sa_of_another_shape_reads_with_a_key_that_never_matches() -> None:
    body = X.encode_newsa(SA_OUT)
    odd = body.replace(b"rfc4106(gcm(aes))", b"rfc4543(gcm(aes))")
    record = X.parse_sa(odd, 0, len(odd))
    assert record is not None and record.key == X.ODD_KEY
    no_esn = body[:216] + b"\0" + body[217:]
    record = X.parse_sa(no_esn, 0, len(no_esn))
    assert record is not None and record.key == X.ODD_KEY
    assert XfrmSa(SA_OUT.src, SA_OUT.dst, SA_OUT.spi, record.key, record.replay_window) != SA_OUT


@pytest.mark.parametrize("policy", [POL_OUT, POL_IN, POL6], ids=["out", "in", "v6"])
def test_policy_round_trips_through_the_dump_parser(policy: XfrmPolicy) -> None:
    body = X.encode_policy(policy)
    record = X.parse_policy(body, 0, len(body))
    assert record is not None and record.ours_shape and record.reqid == XFRM_REQID
    assert record.key == policy.ident
    sel = X._SELECTOR.unpack(body[:56])
    host = 128 if ":" in policy.src else 32
    assert (socket.ntohs(sel[2]), sel[3], sel[7], sel[8], sel[9]) == (policy.dport, 0xFFFF, host, host, 17)
    priority, _index, direction, action = struct.unpack_from("=IIBB", body, 152)
    assert (priority, direction, action) == (XFRM_PRIORITY, {"in": 0, "out": 1}[policy.direction], 0)
    tmpl = X._TMPL.unpack_from(body, 172)
    assert tmpl[2] == 50 and tmpl[5] == XFRM_REQID and tmpl[6] == 0 and tmpl[8] == 0 and tmpl[9:] == (
        0xFFFFFFFF,) * 3


def test_a_policy_of_ours_of_another_shape_reads_under_a_key_no_target_has() -> None:
    body = bytearray(X.encode_policy(POL_OUT))
    struct.pack_into("=II", body, 152, XFRM_PRIORITY + 1, 0x1231)  # another priority, kernel index 0x1231
    record = X.parse_policy(bytes(body), 0, len(body))
    assert record is not None and not record.ours_shape and record.reqid == XFRM_REQID
    assert record.key == ("out", "192.0.2.1", "192.0.2.2", -1 - 0x1231)


# --- a fake kernel ----------------------------------------------------------------------------------------

Answer = Callable[[int, bytes], int]  # (message type, body) -> errno (0: ack)


class FakeSocket:
    """Answers each request with an ack (errno from ``answer``) and each dump with ``dumps[type]``."""

    def __init__(self, answer: Answer | None = None, dumps: dict[int, list[tuple[int, bytes]]] | None = None):
        self.answer = answer or (lambda _t, _b: 0)
        self.dumps = dumps or {}
        self.sends: list[list[tuple[int, int, int, bytes]]] = []  # per sendmsg: (type, flags, seq, body)
        self.queue: list[bytes] = []

    def sendall(self, data: bytes) -> None:
        sent = []
        for kind, flags, seq, a, b in netlink.iter_messages(data, len(data)):
            body = data[a:b]
            sent.append((kind, flags, seq, body))
            if flags & netlink.NLM_F_DUMP:
                reply = b"".join(frame(t, m, seq) for t, m in self.dumps.get(kind, []))
                self.queue.append(reply + frame(netlink.NLMSG_DONE, struct.pack("=i", 0), seq))
            else:
                code = self.answer(kind, body)
                echoed = netlink.NLMSGHDR.pack(len(body) + 16, kind, flags, seq, 0)
                self.queue.append(frame(netlink.NLMSG_ERROR, struct.pack("=i", -code) + echoed, seq, 0))
        self.sends.append(sent)

    def recv_into(self, buf: bytearray) -> int:
        data = b"".join(self.queue)  # everything queued, in one datagram read (as a real socket might not)
        self.queue.clear()
        assert data, "the driver waited for a reply that never comes"
        buf[: len(data)] = data
        return len(data)

    def settimeout(self, _t: float) -> None:
        pass

    def close(self) -> None:
        pass


def driver_with(sock: FakeSocket) -> X.XfrmDriver:
    driver = X.XfrmDriver()
    driver._sock = sock  # type: ignore[assignment]
    return driver


# --- batches and acks -------------------------------------------------------------------------------------


def test_one_batch_in_one_sendmsg_each_message_acked_with_its_own_seq() -> None:
    sock = FakeSocket()
    ops = [SyncXfrm(add_sas=(SA_OUT, SA_IN), set_policies=(POL_OUT, POL_IN)),
           SyncXfrm(delete_policies=(POL6.ident,), delete_sas=(SA6.ident,))]
    result = driver_with(sock).apply(ops)
    assert result.applied == ops and result.failed == [] and result.requests == 6
    assert len(sock.sends) == 1
    sent = sock.sends[0]
    assert [k for k, *_ in sent] == [X.XFRM_MSG_NEWSA, X.XFRM_MSG_NEWSA, X.XFRM_MSG_UPDPOLICY,
                                     X.XFRM_MSG_UPDPOLICY, X.XFRM_MSG_DELPOLICY, X.XFRM_MSG_DELSA]
    assert all(flags & netlink.NLM_F_ACK for _k, flags, _s, _b in sent)
    assert len({seq for _k, _f, seq, _b in sent}) == 6


def test_a_replaced_sa_is_deleted_before_it_is_added() -> None:
    sock = FakeSocket()
    new = XfrmSa(SA_OUT.src, SA_OUT.dst, SA_OUT.spi, KEY2)
    op = SyncXfrm(add_sas=(new, SA_IN), set_policies=(POL_OUT,), delete_sas=(SA_OUT.ident, SA6.ident))
    result = driver_with(sock).apply([op])
    assert result.applied == [op] and result.requests == 5
    kinds = [(k, X.parse_sa(b, 0, len(b)) if k == X.XFRM_MSG_NEWSA else None) for k, _f, _s, b in sock.sends[0]]
    assert [k for k, _ in kinds] == [X.XFRM_MSG_DELSA, X.XFRM_MSG_NEWSA, X.XFRM_MSG_NEWSA, X.XFRM_MSG_UPDPOLICY,
                                     X.XFRM_MSG_DELSA]
    first_add = kinds[1][1]
    assert first_add is not None and first_add.key == KEY2


def test_each_refusal_fails_its_own_op_with_the_object_and_the_errno_text() -> None:
    def answer(kind: int, body: bytes) -> int:
        if kind == X.XFRM_MSG_NEWSA and X.parse_sa(body, 0, len(body)).spi == 0x4321:  # type: ignore[union-attr]
            return errno.EEXIST
        if kind == X.XFRM_MSG_DELSA or kind == X.XFRM_MSG_DELPOLICY:
            return errno.ESRCH if kind == X.XFRM_MSG_DELSA else errno.ENOENT
        return 0

    ok = SyncXfrm(add_sas=(SA_OUT,), delete_sas=(SA6.ident,), delete_policies=(POL6.ident,))
    bad = SyncXfrm(add_sas=(SA_IN,), set_policies=(POL_IN,))
    result = driver_with(FakeSocket(answer)).apply([ok, bad])
    assert result.applied == [ok]  # deleting what is already gone counts as done
    assert result.failed == [(bad, "add SA 192.0.2.2->192.0.2.1 spi 0x4321: File exists")]
    assert result.requests == 5


def test_acks_map_by_sequence_number_and_ignore_strangers() -> None:
    outcomes: list[tuple[int, str] | None] = [None, None, None]
    pending = {10, 11, 12}
    data = (frame(netlink.NLMSG_ERROR, struct.pack("=i", -errno.EINVAL) + bytes(16), 11, 0)
            + frame(netlink.NLMSG_ERROR, struct.pack("=i", 0) + bytes(16), 99, 0)
            + frame(netlink.NLMSG_ERROR, struct.pack("=i", 0) + bytes(16), 10, 0))
    X.record_acks(data, len(data), 10, outcomes, pending)
    assert outcomes == [(0, ""), (errno.EINVAL, ""), None] and pending == {12}
    requests = [X.Request(X.XFRM_MSG_NEWSA, b"", 0, "add SA a", False),
                X.Request(X.XFRM_MSG_NEWSA, b"", 1, "add SA b", False),
                X.Request(X.XFRM_MSG_DELSA, b"", 1, "delete SA c", True)]
    reasons = X.outcome_reasons(requests, outcomes)
    assert reasons == {1: ["add SA b: Invalid argument", "delete SA c: no reply from the kernel; outcome unknown"]}


def test_the_extended_ack_text_is_part_of_the_reason() -> None:
    echoed = bytes(16)
    tlv = netlink.attr(X.NLMSGERR_ATTR_MSG, b"Requested type not found\0")
    data = frame(netlink.NLMSG_ERROR, struct.pack("=i", -errno.EPROTONOSUPPORT) + echoed + tlv, 5,
                 netlink.NLM_F_ACK_TLVS)
    code, message = X.error_reply(data, 16, len(data), netlink.NLM_F_ACK_TLVS)
    assert (code, message) == (errno.EPROTONOSUPPORT, "Requested type not found")
    assert X.describe_error(code, message) == "Protocol not supported (Requested type not found)"


def test_the_probe_names_esp_when_the_esp_type_is_missing() -> None:
    def answer(kind: int, _body: bytes) -> int:
        return errno.EPROTONOSUPPORT if kind == X.XFRM_MSG_NEWSA else errno.ESRCH

    driver = driver_with(FakeSocket(answer))
    reason = driver.unsupported()
    assert reason is not None and "ESP" in reason and "esp4" in reason
    assert driver.unsupported() is reason  # cached


def test_the_probe_names_gcm_when_only_the_algorithm_is_missing() -> None:
    def answer(kind: int, body: bytes) -> int:
        if kind == X.XFRM_MSG_NEWSA and b"rfc4106" in body:
            return errno.ENOSYS
        return 0

    reason = driver_with(FakeSocket(answer)).unsupported()
    assert reason is not None and "rfc4106(gcm(aes))" in reason
    assert driver_with(FakeSocket()).unsupported() is None


def test_probe_sas_use_a_reqid_that_is_not_ours() -> None:
    sock = FakeSocket()
    driver_with(sock).unsupported()
    adds = [X.parse_sa(b, 0, len(b)) for k, _f, _s, b in sock.sends[0] if k == X.XFRM_MSG_NEWSA]
    assert adds and all(r is not None and r.reqid != XFRM_REQID and r.spi < 256 for r in adds)


# --- observing: ownership ---------------------------------------------------------------------------------


def foreign_sa(sa: XfrmSa, *, reqid: int = 7, mode: int = 0, proto: int = 50) -> bytes:
    body = bytearray(kernel_form(X.encode_newsa(sa), socket.AF_INET))
    struct.pack_into("=I", body, 208, reqid)
    body[214] = mode
    body[76] = proto  # xfrm_id.proto
    return bytes(body)


def foreign_policy(policy: XfrmPolicy, reqid: int = 7) -> bytes:
    body = bytearray(X.encode_policy(policy))
    struct.pack_into("=I", body, 172 + 44, reqid)  # the template's reqid
    return bytes(body)


def observing_driver(sas: list[bytes], policies: list[bytes], answer: Answer | None = None
                     ) -> tuple[X.XfrmDriver, FakeSocket]:
    sock = FakeSocket(answer, {
        X.XFRM_MSG_GETSA: [(X.XFRM_MSG_NEWSA, b) for b in sas],
        X.XFRM_MSG_GETPOLICY: [(X.XFRM_MSG_NEWPOLICY, b) for b in policies],
    })
    return driver_with(sock), sock


def test_observe_keeps_only_esp_transport_sas_and_policies_with_our_reqid() -> None:
    other = XfrmSa("192.0.2.9", "192.0.2.1", 0x777, KEY)
    sas = [kernel_form(X.encode_newsa(SA_OUT), socket.AF_INET), kernel_form(X.encode_newsa(SA_IN), socket.AF_INET),
           foreign_sa(other), foreign_sa(other, mode=1, reqid=XFRM_REQID), foreign_sa(other, proto=51)]
    foreign = XfrmPolicy("out", "192.0.2.1", "192.0.2.9", 4789)
    policies = [X.encode_policy(POL_OUT), X.encode_policy(POL_IN), foreign_policy(foreign)]
    driver, _sock = observing_driver(sas, policies)
    obs = driver.observe()
    assert obs.sas == {SA_OUT.ident: SA_OUT, SA_IN.ident: SA_IN}
    assert obs.sas[SA_OUT.ident].key == KEY
    assert obs.policies == {POL_OUT.ident: POL_OUT, POL_IN.ident: POL_IN}
    assert set(obs.counters) == set(obs.added) == {SA_OUT.ident, SA_IN.ident}


def test_counters_come_from_curlft_and_stats() -> None:
    body = bytearray(kernel_form(X.encode_newsa(SA_OUT), socket.AF_INET))
    struct.pack_into("=4Q", body, 160, 1000, 10, 1_800_000_000, 0)
    struct.pack_into("=III", body, 192, 3, 2, 1)  # replay_window (too old), replay, integrity_failed
    driver, _sock = observing_driver([bytes(body)], [])
    obs = driver.observe()
    c = obs.counters[SA_OUT.ident]
    assert (c.bytes, c.packets, c.replay_window, c.replay, c.integrity_failed) == (1000, 10, 3, 2, 1)
    assert obs.added[SA_OUT.ident] == 1_800_000_000


def test_apply_refuses_to_touch_a_foreign_object_with_our_identity() -> None:
    foreign_sa_same = foreign_sa(SA_OUT)
    driver, sock = observing_driver([foreign_sa_same], [foreign_policy(POL_OUT)])
    assert driver.observe().sas == {} and driver.observe().policies == {}
    op = SyncXfrm(set_policies=(POL_OUT, POL_IN), delete_policies=(POL_OUT.ident,), delete_sas=(SA_OUT.ident,))
    result = driver.apply([op])
    assert result.applied == [] and result.requests == 1  # only POL_IN was sent
    ((_op, reason),) = result.failed
    assert "set policy out 192.0.2.1->192.0.2.2 udp dport 4789" in reason
    assert "delete SA 192.0.2.1->192.0.2.2 spi 0x1234" in reason and "not ours" in reason
    assert [k for k, *_ in sock.sends[-1]] == [X.XFRM_MSG_UPDPOLICY]


def test_an_odd_policy_of_ours_is_deleted_by_index_or_left_to_its_in_place_replacement() -> None:
    odd = bytearray(X.encode_policy(POL_OUT))
    struct.pack_into("=II", odd, 152, 1, 0x101)  # priority 1, index 0x101
    odd_dir_in = bytearray(X.encode_policy(POL_IN))
    struct.pack_into("=II", odd_dir_in, 152, 1, 0x208)
    driver, sock = observing_driver([], [bytes(odd), bytes(odd_dir_in)])
    obs = driver.observe()
    odd_key = ("out", "192.0.2.1", "192.0.2.2", -1 - 0x101)
    odd_in_key = ("in", "192.0.2.2", "192.0.2.1", -1 - 0x208)
    assert set(obs.policies) == {odd_key, odd_in_key}
    op = SyncXfrm(set_policies=(POL_OUT,), delete_policies=(odd_key, odd_in_key))
    result = driver.apply([op])
    assert result.applied == [op] and result.requests == 2
    (k1, _f1, _s1, _b1), (k2, _f2, _s2, body) = sock.sends[-1]
    assert (k1, k2) == (X.XFRM_MSG_UPDPOLICY, X.XFRM_MSG_DELPOLICY)
    _sel, index, direction = X._USERPOLICY_ID.unpack(body[:64])
    assert (index, direction) == (0x208, 0)


def test_nothing_shows_a_key() -> None:
    body = X.encode_newsa(SA_OUT)
    record = X.parse_sa(body, 0, len(body))
    request = X.Request(X.XFRM_MSG_NEWSA, body, 0, "add SA", False)
    for text in (repr(SA_OUT), repr(record), repr(request), repr(X.XfrmDriver())):
        assert KEY.hex() not in text and repr(KEY) not in text and "key=" not in text
