"""Hand-built frames for the anti-spoofing tests: what a root user in a container or on a host can send.

Run inside a namespace with the venv's python::

    frames.py raw  --ifname eth0 FRAME-SPEC...      # write Ethernet frames on an interface (AF_PACKET)
    frames.py vxlan --to 198.51.100.12 --vni 100 FRAME-SPEC...   # the same frames, VXLAN-encapsulated, as UDP

A FRAME-SPEC is one JSON object: ``{"kind": "udp4"|"udp6"|"arp"|"na"|"ra"|"ns", ...fields}``;
each is sent ``count`` times (default 1). Prints ``{"sent": N, "sport": P}``.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import socket
import struct
import sys
from typing import Any

ETH_P_IP, ETH_P_ARP, ETH_P_IPV6 = 0x0800, 0x0806, 0x86DD
VXLAN_PORT = 4789


def mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def ip4(text: str) -> bytes:
    return socket.inet_pton(socket.AF_INET, text)


def ip6(text: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6, text)


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ethernet(dst: str, src: str, ethertype: int, payload: bytes) -> bytes:
    return mac(dst) + mac(src) + struct.pack("!H", ethertype) + payload


def ipv4_udp(src: str, dst: str, sport: int, dport: int, data: bytes) -> bytes:
    udp = struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data  # checksum 0: none (IPv4)
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0x1234, 0x4000, 64, 17, 0, ip4(src), ip4(dst))
    header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    return header + udp


def ipv6_packet(src: str, dst: str, next_header: int, payload: bytes, hop_limit: int = 64) -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, len(payload), next_header, hop_limit, ip6(src), ip6(dst)) + payload


def _pseudo6(src: str, dst: str, next_header: int, payload: bytes) -> bytes:
    return ip6(src) + ip6(dst) + struct.pack("!I3xB", len(payload), next_header) + payload


def ipv6_udp(src: str, dst: str, sport: int, dport: int, data: bytes) -> bytes:
    udp = struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data
    udp = udp[:6] + struct.pack("!H", checksum(_pseudo6(src, dst, 17, udp)) or 0xFFFF) + udp[8:]
    return ipv6_packet(src, dst, 17, udp)


def icmpv6(src: str, dst: str, body: bytes) -> bytes:
    message = body[:2] + b"\0\0" + body[4:]
    message = message[:2] + struct.pack("!H", checksum(_pseudo6(src, dst, 58, message))) + message[4:]
    return ipv6_packet(src, dst, 58, message, hop_limit=255)


def neighbour_advert(src: str, dst: str, target: str, lladdr: str | None) -> bytes:
    flags = 0x20000000  # override (solicited unset: an unsolicited advertisement, which replaces cache entries)
    body = struct.pack("!BBHI", 136, 0, 0, flags) + ip6(target)
    if lladdr is not None:
        body += struct.pack("!BB", 2, 1) + mac(lladdr)
    return icmpv6(src, dst, body)


def neighbour_solicit(src: str, dst: str, target: str, lladdr: str | None) -> bytes:
    body = struct.pack("!BBHI", 135, 0, 0, 0) + ip6(target)
    if lladdr is not None:
        body += struct.pack("!BB", 1, 1) + mac(lladdr)
    return icmpv6(src, dst, body)


def router_advert(src: str, lladdr: str, prefix: str) -> bytes:
    net = ipaddress.IPv6Network(prefix)
    body = struct.pack("!BBHBBHII", 134, 0, 0, 64, 0, 1800, 0, 0)  # cur hop limit, flags, router lifetime
    body += struct.pack("!BB", 1, 1) + mac(lladdr)
    body += struct.pack("!BBBBIII16s", 3, 4, net.prefixlen, 0xC0, 86400, 14400, 0, net.network_address.packed)
    return icmpv6(src, "ff02::1", body)


def arp(op: int, sender_mac: str, sender_ip: str, target_mac: str, target_ip: str) -> bytes:
    return struct.pack("!HHBBH6s4s6s4s", 1, ETH_P_IP, 6, 4, op, mac(sender_mac), ip4(sender_ip),
                       mac(target_mac), ip4(target_ip))


def geneve_header(vni: int) -> bytes:
    """Version 0, no options, not OAM, protocol Transparent Ethernet Bridging."""
    return struct.pack("!BBHI", 0, 0, 0x6558, vni << 8)


def build(spec: dict[str, Any]) -> bytes:
    kind = spec["kind"]
    src_mac, dst_mac = spec["src_mac"], spec.get("dst_mac", "ff:ff:ff:ff:ff:ff")
    data = spec.get("data", "veilnet-probe").encode()
    encap = spec.get("encap")
    if encap is not None:  # the datagram carries a whole inner frame: VXLAN or Geneve, sent in the clear
        header = geneve_header(encap["vni"]) if encap["type"] == "geneve" else vxlan_header(encap["vni"])
        data = header + build(encap["inner"])
    if kind == "udp4":
        return ethernet(dst_mac, src_mac, ETH_P_IP, ipv4_udp(spec["src"], spec["dst"], spec.get("sport", 40000),
                                                               spec["dport"], data))
    if kind == "udp6":
        return ethernet(dst_mac, src_mac, ETH_P_IPV6, ipv6_udp(spec["src"], spec["dst"], spec.get("sport", 40000),
                                                                 spec["dport"], data))
    if kind == "arp":
        return ethernet(dst_mac, src_mac, ETH_P_ARP, arp(spec.get("op", 2), spec.get("sender_mac", src_mac),
                                                          spec["sender_ip"], spec.get("target_mac", dst_mac),
                                                          spec["target_ip"]))
    if kind == "na":
        return ethernet(dst_mac, src_mac, ETH_P_IPV6, neighbour_advert(spec["src"], spec.get("dst", "ff02::1"),
                                                                         spec["target"], spec.get("lladdr", src_mac)))
    if kind == "ns":
        return ethernet(dst_mac, src_mac, ETH_P_IPV6, neighbour_solicit(spec["src"], spec["dst"], spec["target"],
                                                                          spec.get("lladdr", src_mac)))
    if kind == "ra":
        return ethernet("33:33:00:00:00:01", src_mac, ETH_P_IPV6, router_advert(spec["src"], src_mac,
                                                                                 spec["prefix"]))
    if kind == "vlan":  # an 802.1Q-tagged IPv4 frame
        inner = ipv4_udp(spec["src"], spec["dst"], 40000, spec["dport"], data)
        return mac(dst_mac) + mac(src_mac) + struct.pack("!HHH", 0x8100, spec.get("vid", 7), ETH_P_IP) + inner
    raise SystemExit(f"unknown frame kind {kind!r}")


def vxlan_header(vni: int) -> bytes:
    return struct.pack("!II", 0x08000000, vni << 8)


def main() -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="mode", required=True)
    raw = sub.add_parser("raw")
    raw.add_argument("--ifname", required=True)
    raw.add_argument("specs", nargs="+")
    vx = sub.add_parser("vxlan")
    vx.add_argument("--to", required=True)
    vx.add_argument("--vni", type=int, required=True)
    vx.add_argument("--port", type=int, default=VXLAN_PORT)
    vx.add_argument("specs", nargs="+")
    args = parser.parse_args()
    specs = [json.loads(s) for s in args.specs]
    sent, sport = 0, 0
    if args.mode == "raw":
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
            sock.bind((args.ifname, 0))
            for spec in specs:
                for _ in range(spec.get("count", 1)):
                    sock.send(build(spec))
                    sent += 1
    else:
        family = socket.AF_INET6 if ":" in args.to else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.connect((args.to, args.port))
            sport = sock.getsockname()[1]
            for spec in specs:
                for _ in range(spec.get("count", 1)):
                    sock.send(vxlan_header(args.vni) + build(spec))
                    sent += 1
    json.dump({"sent": sent, "sport": sport}, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
