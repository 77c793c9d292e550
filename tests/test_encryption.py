"""The encryption interface and WireGuard, its first implementation."""

from __future__ import annotations

from veilnet_agent.core import firewall_compiler, mtu, naming
from veilnet_agent.core.encryption import ENCRYPTIONS, WIREGUARD, Encryption
from veilnet_agent.core.firewall_compiler import FirewallSettings


def test_wireguard_is_the_default_and_only_encryption_today() -> None:
    assert ENCRYPTIONS == (WIREGUARD,)
    assert FirewallSettings().encryption is WIREGUARD
    encryption: Encryption = WIREGUARD  # mypy checks WireGuard against the Protocol
    assert encryption.name == "wireguard"


def test_wireguard_guard_match_is_the_old_iifname_rule() -> None:
    """The cleartext guard's rule (and so the table's fingerprint) is what it was before the interface."""
    match = firewall_compiler._match(firewall_compiler._meta("iifname"), naming.WG_IFNAME, "!=")
    assert WIREGUARD.not_decrypted() == match


def test_segment_mtu_takes_the_encryption_overhead() -> None:
    assert mtu.segment_mtu(1500, 4, "vxlan", 4, WIREGUARD) == 1500 - WIREGUARD.overhead(4) - 50
