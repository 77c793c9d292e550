"""What a spoofing drop means: who sent it, what it claimed, what is really theirs.

The kernel decides (``firewall_guard``); this module only explains a logged
packet for its ``security_event``: for a local endpoint, which endpoint's port
it came in on, the MAC/addresses it claimed and the ones it owns; for the
overlay, which peer sent it (its transport address, proven by WireGuard), for
which VNI, what the inner frame claimed, and who really owns that claim.
``check`` names the first rule the packet broke, in the order the firewall
applies them.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from typing import Any

from ..core import addr, naming
from ..core.firewall_guard import (
    GENEVE_ETHERNET,
    ICMPV6_NA,
    ICMPV6_NS,
    ICMPV6_RA,
    ICMPV6_REDIRECT,
    ND_NO_OPTIONS_LENGTH,
    OVERLAY_IP6_NEXT_HEADERS,
    link_local,
)
from ..core.model import LocalEndpoint, NodeState, Peer, Segment
from ..core.objects import ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, LoggedPacket

SPOOF = "spoof"
PEER_SPOOF = "peer_spoof"
PEER_UNKNOWN = "peer_unknown"
_ICMPV6 = 58
_ND_LLADDR_OPTIONS = (b"\x01\x01", b"\x02\x01")


def _ifname(index: int) -> str | None:
    try:
        return socket.if_indextoname(index)
    except OSError:
        return None


def _ip(raw: bytes) -> str:
    return addr.text(ipaddress.ip_address(raw))


def _mac(raw: bytes) -> str:
    return raw.hex(":")


class _Index:
    """Lookups over one desired state, built when the first event needs them."""

    def __init__(self, state: NodeState) -> None:
        self.by_port = {naming.endpoint_host_name(e.name): e for e in state.endpoints}
        self.by_transport = {addr.text(state.tunnel_address(p)): p for p in state.peers}
        self.segment_of_vni = {s.vni: s for s in state.segments}
        self.owner_of_ip: dict[str, str] = {}
        self.owner_of_mac: dict[tuple[str, str], str] = {}
        for e in state.endpoints:
            for ip in (*e.ips, link_local(e.mac)):
                self.owner_of_ip[addr.text(ip)] = f"endpoint {e.name}"
            self.owner_of_mac[(e.segment, e.mac)] = f"endpoint {e.name}"
        for p in state.peers:
            for r in p.endpoints:
                for ip in (*r.ips, link_local(r.mac)):
                    self.owner_of_ip[addr.text(ip)] = f"peer {p.name}"
                self.owner_of_mac[(r.segment, r.mac)] = f"peer {p.name}"


def _own_ips(mac: str, ips: Any) -> set[str]:
    return {addr.text(ip) for ip in ips} | {addr.text(link_local(mac))}


class SpoofExplainer:
    """``explain(kind, packet)`` -> extra fields for the security event of a spoofing drop."""

    def __init__(self, state_of: Callable[[], NodeState | None],
                 ifname_of: Callable[[int], str | None] = _ifname) -> None:
        self._state_of = state_of
        self._ifname_of = ifname_of
        self._index: tuple[NodeState, _Index] | None = None

    def _lookups(self) -> _Index | None:
        state = self._state_of()
        if state is None:
            return None
        if self._index is None or self._index[0] is not state:
            self._index = (state, _Index(state))
        return self._index[1]

    def explain(self, kind: str, packet: LoggedPacket) -> dict[str, object]:
        index = self._lookups()
        if index is None:
            return {}
        if kind == SPOOF:
            return self._local(index, packet)
        if kind in (PEER_SPOOF, PEER_UNKNOWN):
            return self._peer(index, packet)
        return {}

    # -- a local endpoint's port

    def _local(self, index: _Index, packet: LoggedPacket) -> dict[str, object]:
        index_in = packet.physindev if packet.physindev is not None else packet.indev
        port = self._ifname_of(index_in) if index_in is not None else None
        endpoint = index.by_port.get(port or "")
        claimed_ip = packet.src or None
        fields: dict[str, object] = {"port": port, "claimed_mac": packet.arp_sha or packet.src_mac,
                                     "claimed_ip": claimed_ip}
        if endpoint is None:
            return {**fields, "check": "unknown port"}
        own = _own_ips(endpoint.mac, endpoint.ips)
        fields.update(endpoint=endpoint.name, segment=endpoint.segment, real_mac=endpoint.mac, real_ips=sorted(own))
        if claimed_ip is not None and claimed_ip in index.owner_of_ip and claimed_ip not in own:
            fields["owner"] = index.owner_of_ip[claimed_ip]
        fields["check"] = self._local_check(endpoint, own, packet)
        return fields

    @staticmethod
    def _local_check(endpoint: LocalEndpoint, own: set[str], packet: LoggedPacket) -> str:
        if packet.src_mac is not None and packet.src_mac != endpoint.mac:
            return "source mac"
        if packet.ethertype == ETH_P_ARP:
            if packet.arp_sha != endpoint.mac:
                return "arp sender mac"
            return "arp sender address" if packet.src not in own else "arp header"
        if packet.ethertype not in (None, ETH_P_IP, ETH_P_IPV6):
            return f"ethertype 0x{packet.ethertype:04x}"
        if packet.family == 6 and packet.protocol == _ICMPV6:
            if packet.icmp_type == ICMPV6_RA:
                return "router advertisement"
            if packet.icmp_type == ICMPV6_REDIRECT:
                return "redirect"
        if packet.src not in own:
            return "source address"
        if packet.family == 6 and packet.protocol == _ICMPV6 and packet.icmp_type in (ICMPV6_NS, ICMPV6_NA):
            target = packet.transport[8:24]
            if packet.icmp_type == ICMPV6_NA and len(target) == 16 and _ip(target) not in own:
                return "neighbour advertisement for another address"
            return "neighbour discovery option"
        return "source address"

    # -- the overlay: a peer's encapsulated frame, before decapsulation

    def _peer(self, index: _Index, packet: LoggedPacket) -> dict[str, object]:
        peer = index.by_transport.get(packet.src)
        data = packet.transport
        fields: dict[str, object] = {"peer": peer.name if peer else None, "transport_source": packet.src}
        if len(data) < 16 + 14:
            return {**fields, "check": "truncated"}
        vni = int.from_bytes(data[12:15], "big")
        segment = index.segment_of_vni.get(vni)
        inner = data[16:]
        claimed_mac, ethertype = _mac(inner[6:12]), int.from_bytes(inner[12:14], "big")
        fields.update(vni=vni, segment=segment.name if segment else None, claimed_mac=claimed_mac)
        claimed_ip = self._inner_source(ethertype, inner)
        if claimed_ip is not None:
            fields["claimed_ip"] = claimed_ip
            if claimed_ip in index.owner_of_ip:
                fields["owner"] = index.owner_of_ip[claimed_ip]
        if segment is not None and (segment.name, claimed_mac) in index.owner_of_mac:
            fields["mac_owner"] = index.owner_of_mac[(segment.name, claimed_mac)]
        if peer is None:
            return {**fields, "check": "unknown peer"}
        fields["real_endpoints"] = [{"segment": e.segment, "mac": e.mac, "ips": [addr.text(ip) for ip in e.ips]}
                                    for e in peer.endpoints][:16]
        fields["check"] = self._peer_check(peer, segment, packet.dport, data, claimed_mac, ethertype, inner,
                                           claimed_ip)
        return fields

    @staticmethod
    def _inner_source(ethertype: int, inner: bytes) -> str | None:
        if ethertype == ETH_P_IP and len(inner) >= 30:
            return _ip(inner[26:30])
        if ethertype == ETH_P_ARP and len(inner) >= 32:
            return _ip(inner[28:32])
        if ethertype == ETH_P_IPV6 and len(inner) >= 38:
            return _ip(inner[22:38])
        return None

    @staticmethod
    def _peer_check(peer: Peer, segment: Segment | None, dport: int | None, data: bytes, claimed_mac: str,
                    ethertype: int, inner: bytes, claimed_ip: str | None) -> str:
        if segment is None or segment.name not in peer.segments:
            return "segment not shared with the peer"
        if dport == 6081 and (data[8:10] != b"\0\0" or int.from_bytes(data[10:12], "big") != GENEVE_ETHERNET):
            return "geneve header"
        macs = {e.mac for e in peer.endpoints if e.segment == segment.name}
        own_ips: set[str] = set()
        for e in peer.endpoints:
            own_ips |= _own_ips(e.mac, e.ips)
        if claimed_mac not in macs and claimed_mac != segment.gateway_mac:  # the gateway's: frames the peer routed
            return "source mac"
        if ethertype == ETH_P_ARP:
            sha = _mac(inner[22:28]) if len(inner) >= 28 else ""
            return "arp sender mac" if sha not in macs else "arp sender address"
        if ethertype not in (ETH_P_IP, ETH_P_IPV6):
            return f"ethertype 0x{ethertype:04x}"
        if ethertype == ETH_P_IPV6 and len(inner) >= 55:
            next_header, icmp_type = inner[20], inner[54]
            if next_header not in OVERLAY_IP6_NEXT_HEADERS:
                return f"ipv6 next header {next_header}"
            if claimed_ip is not None and claimed_ip not in own_ips:
                return "source address"
            if next_header == _ICMPV6 and icmp_type == ICMPV6_RA:
                return "router advertisement"
            if next_header == _ICMPV6 and icmp_type == ICMPV6_REDIRECT:
                return "redirect"
            if next_header == _ICMPV6 and icmp_type == ICMPV6_NA and len(inner) >= 78 \
                    and _ip(inner[62:78]) not in own_ips:
                return "neighbour advertisement for another address"
            if next_header == _ICMPV6 and icmp_type in (ICMPV6_NS, ICMPV6_NA):
                length = int.from_bytes(inner[18:20], "big")
                if length != ND_NO_OPTIONS_LENGTH and inner[78:80] not in _ND_LLADDR_OPTIONS:
                    return "neighbour discovery option"
                return "neighbour discovery option mac"
        return "source address"
