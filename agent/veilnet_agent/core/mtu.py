"""MTU arithmetic: underlay MTU minus every layer of overhead.

A segment's frames travel: endpoint frame -> VXLAN/Geneve (outer IP+UDP+
header+inner Ethernet) over the WireGuard transport addresses -> WireGuard
(outer IP+UDP+32 bytes of WireGuard data header and tag) over the underlay.
WireGuard pads to 16 bytes but never beyond its own interface MTU, so the
padding costs nothing at the MTU computed here.
"""

from __future__ import annotations

from typing import Literal

Family = Literal[4, 6]
Encapsulation = Literal["vxlan", "geneve"]

IP_HEADER: dict[int, int] = {4: 20, 6: 40}
UDP_HEADER = 8
WIREGUARD_DATA_OVERHEAD = 32  # type+reserved (4), receiver (4), counter (8), poly1305 tag (16)
ETHERNET_HEADER = 14
ENCAP_HEADER: dict[str, int] = {"vxlan": 8, "geneve": 8}  # Geneve without options
MIN_SEGMENT_MTU = 1280  # IPv6 minimum link MTU; IPv4 would allow 576, we refuse to go below IPv6's


def wireguard_overhead(underlay_family: Family) -> int:
    return IP_HEADER[underlay_family] + UDP_HEADER + WIREGUARD_DATA_OVERHEAD


def encapsulation_overhead(encapsulation: Encapsulation, transport_family: Family) -> int:
    return IP_HEADER[transport_family] + UDP_HEADER + ENCAP_HEADER[encapsulation] + ETHERNET_HEADER


def wireguard_mtu(underlay_mtu: int, underlay_family: Family) -> int:
    return underlay_mtu - wireguard_overhead(underlay_family)


def segment_mtu(
    underlay_mtu: int,
    underlay_family: Family,
    encapsulation: Encapsulation,
    transport_family: Family,
) -> int:
    """MTU of a segment's bridge, tunnel ports and endpoint interfaces."""
    return wireguard_mtu(underlay_mtu, underlay_family) - encapsulation_overhead(
        encapsulation, transport_family
    )
