"""The encryption interface and WireGuard, its first implementation."""

from __future__ import annotations

from veilnet_agent.core import firewall_compiler, mtu, naming
from veilnet_agent.core.encryption import ENCRYPTIONS, IPSEC, WIREGUARD, Encryption, encryption_of
from veilnet_agent.core.model import empty_state


def test_wireguard_is_the_default_and_ipsec_the_other_encryption() -> None:
    assert ENCRYPTIONS == (WIREGUARD, IPSEC)
    import ipaddress
    from dataclasses import replace
    state = empty_state("a", ipaddress.ip_interface("10.99.0.1/24"))
    assert encryption_of(state) is WIREGUARD
    assert encryption_of(replace(state, encryption="ipsec")) is IPSEC
    for encryption in (WIREGUARD, IPSEC):  # mypy checks both against the Protocol
        checked: Encryption = encryption
        assert checked.name in ("wireguard", "ipsec")


def test_wireguard_guard_match_is_the_old_iifname_rule() -> None:
    """The cleartext guard's rule (and so the table's fingerprint) is what it was before the interface."""
    match = firewall_compiler._match(firewall_compiler._meta("iifname"), naming.WG_IFNAME, "!=")
    assert WIREGUARD.not_decrypted() == match


def test_segment_mtu_takes_the_encryption_overhead() -> None:
    assert mtu.segment_mtu(1500, 4, "vxlan", 4, WIREGUARD) == 1500 - WIREGUARD.overhead(4) - 50
