from veilnet_agent.core import mtu
from veilnet_agent.core.encryption import WIREGUARD


def test_wireguard_overhead_per_outer_family() -> None:
    assert WIREGUARD.overhead(4) == 60  # 20 IPv4 + 8 UDP + 32 WireGuard
    assert WIREGUARD.overhead(6) == 80  # 40 IPv6 + 8 UDP + 32 WireGuard
    assert WIREGUARD.interface_mtu(1500, 4) == 1440
    assert WIREGUARD.interface_mtu(1500, 6) == 1420  # wg-quick's default


def test_encapsulation_overhead() -> None:
    assert mtu.encapsulation_overhead("vxlan", 4) == 50
    assert mtu.encapsulation_overhead("vxlan", 6) == 70
    assert mtu.encapsulation_overhead("geneve", 4) == 50
    assert mtu.encapsulation_overhead("geneve", 6) == 70


def test_segment_mtu_all_combinations() -> None:
    assert mtu.segment_mtu(1500, 4, "vxlan", 4, WIREGUARD) == 1390
    assert mtu.segment_mtu(1500, 4, "vxlan", 6, WIREGUARD) == 1370
    assert mtu.segment_mtu(1500, 6, "vxlan", 4, WIREGUARD) == 1370
    assert mtu.segment_mtu(1500, 6, "geneve", 6, WIREGUARD) == 1350
    assert mtu.segment_mtu(9000, 4, "vxlan", 4, WIREGUARD) == 8890


def test_fast_address_text_matches_ipaddress() -> None:
    import ipaddress

    from veilnet_agent.core import addr

    samples = ["192.0.2.1", "0.0.0.0", "2001:db8::1", "fd00:7::2:1", "2001:db8:0:0:1:0:0:1", "2001:0:0:1::",
               "::", "::1", "fe80::1:0:0:0", "2001:db8:1:2:3:4:5:6", "2001:db8::a:0:0:0:1"]
    for text in samples:
        ip = ipaddress.ip_address(text)
        assert addr.text(ip) == str(ip)
        assert addr.parse(str(ip)) == ip
    for bad in ["192.0.2.256", "1.2.3", "2001:db8::g", "fe80::1%eth0", "", "01.2.3.4"]:
        try:
            addr.parse(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad!r} accepted")
