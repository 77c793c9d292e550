"""MTU arithmetic: underlay MTU minus every layer of overhead.

A segment's frames travel: endpoint frame -> VXLAN/Geneve (outer IP+UDP+
header+inner Ethernet) over the encrypted transport addresses -> the
encryption (for WireGuard: outer IP+UDP+32 bytes of data header and tag, see
``core/encryption/wireguard.py``) over the underlay.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from .encryption import Encryption

Family = Literal[4, 6]
Encapsulation = Literal["vxlan", "geneve"]

IP_HEADER: dict[int, int] = {4: 20, 6: 40}
UDP_HEADER = 8
ETHERNET_HEADER = 14
ENCAP_HEADER: dict[str, int] = {"vxlan": 8, "geneve": 8}  # Geneve without options
MIN_SEGMENT_MTU = 1280  # IPv6 minimum link MTU; IPv4 would allow 576, we refuse to go below IPv6's


def encapsulation_overhead(encapsulation: Encapsulation, transport_family: Family) -> int:
    return IP_HEADER[transport_family] + UDP_HEADER + ENCAP_HEADER[encapsulation] + ETHERNET_HEADER


def segment_mtu(
    underlay_mtu: int,
    underlay_family: Family,
    encapsulation: Encapsulation,
    transport_family: Family,
    encryption: Encryption,
) -> int:
    """MTU of a segment's bridge, tunnel ports and endpoint interfaces."""
    return underlay_mtu - encryption.overhead(underlay_family) - encapsulation_overhead(encapsulation, transport_family)
