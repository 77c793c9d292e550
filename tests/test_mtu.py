from veilnet_agent import mtu


def test_wireguard_overhead_per_outer_family() -> None:
    assert mtu.wireguard_overhead(4) == 60  # 20 IPv4 + 8 UDP + 32 WireGuard
    assert mtu.wireguard_overhead(6) == 80  # 40 IPv6 + 8 UDP + 32 WireGuard
    assert mtu.wireguard_mtu(1500, 4) == 1440
    assert mtu.wireguard_mtu(1500, 6) == 1420  # wg-quick's default


def test_encapsulation_overhead() -> None:
    assert mtu.encapsulation_overhead("vxlan", 4) == 50
    assert mtu.encapsulation_overhead("vxlan", 6) == 70
    assert mtu.encapsulation_overhead("geneve", 4) == 50
    assert mtu.encapsulation_overhead("geneve", 6) == 70


def test_segment_mtu_all_combinations() -> None:
    assert mtu.segment_mtu(1500, 4, "vxlan", 4) == 1390
    assert mtu.segment_mtu(1500, 4, "vxlan", 6) == 1370
    assert mtu.segment_mtu(1500, 6, "vxlan", 4) == 1370
    assert mtu.segment_mtu(1500, 6, "geneve", 6) == 1350
    assert mtu.segment_mtu(9000, 4, "vxlan", 4) == 8890
