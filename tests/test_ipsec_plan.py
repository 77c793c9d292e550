"""IPsec mode in the pure core: validation, rendering, MTU, the guard match, and the planner's two phases."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from factories import state

from veilnet_agent.core import mtu, naming
from veilnet_agent.core.encryption import IPSEC, IpsecHost
from veilnet_agent.core.encryption.ipsec import ESP_OVERHEAD
from veilnet_agent.core.errors import ValidationError
from veilnet_agent.core.firewall_compiler import FirewallSettings, compile_table
from veilnet_agent.core.model import parse_node_state
from veilnet_agent.core.objects import KernelState, XfrmSa
from veilnet_agent.core.ops import CreateLink, DeleteLink, DelFdb, SyncXfrm
from veilnet_agent.core.planner import plan
from veilnet_agent.core.render import NodeContext, render

LOCAL = ipaddress.ip_address("192.0.2.250")
CTX = NodeContext(encryption=IpsecHost(LOCAL), underlay_mtu=1500, underlay_family=4)


def ipsec_state(peers: int = 2, **extra: Any) -> dict[str, Any]:
    raw = state(peers)
    raw["encryption"] = "ipsec"
    raw.update(extra)
    return raw


def sa(src: str, dst: str, spi: int) -> XfrmSa:
    return XfrmSa(src, dst, spi, bytes(range(36)))


def test_ipsec_settings_are_validated_with_the_field_named() -> None:
    s = parse_node_state(ipsec_state(ipsec={"replay_window": 1024, "rotation_seconds": 600}))
    assert s.encryption == "ipsec" and s.ipsec.replay_window == 1024 and s.ipsec.rotation_seconds == 600
    assert parse_node_state(ipsec_state()).ipsec.replay_window == 4096
    for bad, field in (({"replay_window": 0}, "ipsec.replay_window"), ({"replay_window": 8192}, "ipsec.replay_window"),
                       ({"rotation_seconds": 1}, "ipsec.rotation_seconds"), ({"lifetime": 5}, "ipsec.lifetime")):
        with pytest.raises(ValidationError) as err:
            parse_node_state(ipsec_state(ipsec=bad))
        assert err.value.field == field
    with pytest.raises(ValidationError) as err:
        parse_node_state(ipsec_state(encryption="rot13"))
    assert err.value.field == "encryption"
    with pytest.raises(ValidationError, match="encryption is not ipsec"):
        parse_node_state({**state(), "ipsec": {"replay_window": 64}})


def test_mixed_underlay_families_are_refused_in_ipsec_mode() -> None:
    raw = ipsec_state(2)
    raw["peers"][1]["underlay_address"] = "2001:db8::9"
    with pytest.raises(ValidationError) as err:
        parse_node_state(raw)
    assert err.value.field == "peers[1].underlay_address"


def test_tunnels_run_between_underlay_addresses_with_policies_per_peer_and_no_wireguard() -> None:
    s = parse_node_state(ipsec_state(2))
    target = render(s, CTX)
    assert target.wg is None and not target.wg_peers
    vxlan = target.links[naming.vxlan_name(100)]
    assert vxlan.spec is not None and vxlan.spec.local == "192.0.2.250"
    dsts = {e.dst for e in target.fdb if e.dst is not None}
    assert dsts == {str(p.underlay_address) for p in s.peers}
    # four policies a peer (out and in, VXLAN and Geneve ports), no SA before keys exist
    assert len(target.xfrm_policies) == 4 * len(s.peers) and not target.xfrm_sas
    directions = {(p.direction, p.dport) for p in target.xfrm_policies.values()}
    assert directions == {("out", 4789), ("out", 6081), ("in", 4789), ("in", 6081)}


def test_segment_mtu_counts_esp_in_transport_mode() -> None:
    s = parse_node_state(ipsec_state(1))
    target = render(s, CTX)
    # 1500 - ESP worst case (8 header + 8 IV + 16 ICV + 2 trailer + 3 padding) - VXLAN over IPv4 (20+8+8+14)
    assert ESP_OVERHEAD == 37
    assert target.links[naming.bridge_name(100)].mtu == 1500 - 37 - 50 == 1413
    assert mtu.segment_mtu(1500, 6, "vxlan", 6, IPSEC) == 1500 - 37 - 70


def test_the_guard_drops_our_vnis_without_a_secpath() -> None:
    s = parse_node_state(ipsec_state(1))
    structure, _ = compile_table(s, FirewallSettings())
    text = str(structure)
    assert "'key': 'ipsec'" in text and "come through IPsec" in text
    assert "'key': 'iifname'}}, 'right': 'vnwg0'" not in text
    from veilnet_agent.core import nft_text

    rendered = nft_text.batch(list(structure), {}, "test")
    assert "meta ipsec missing" in rendered


def test_sas_go_in_before_tunnels_and_policies_out_only_after_them() -> None:
    s = parse_node_state(ipsec_state(2))
    peer = s.peers[0]
    sas = {peer.name: (sa("192.0.2.250", str(peer.underlay_address), 0x1001),
                       sa(str(peer.underlay_address), "192.0.2.250", 0x1002))}
    full = render(s, CTX, sas)
    ops = plan(full, KernelState())
    kinds = [type(op).__name__ for op in ops]
    assert kinds[0] == "SyncXfrm" and "SyncXfrm" not in kinds[1:]
    first = ops[0]
    assert isinstance(first, SyncXfrm) and len(first.add_sas) == 2 and len(first.set_policies) == 8
    # the peer is removed: its FDB entries first, its policies and SAs last
    fewer = parse_node_state(ipsec_state(1))
    ops = plan(render(fewer, CTX, {}), full)
    assert isinstance(ops[-1], SyncXfrm) and not ops[-1].add_sas
    assert len(ops[-1].delete_policies) == 4 and len(ops[-1].delete_sas) == 2
    assert any(isinstance(op, (DelFdb, DeleteLink)) for op in ops[:-1])
    assert not any(isinstance(op, CreateLink) for op in ops)


def test_a_rotation_is_one_small_batch_at_any_scale() -> None:
    s = parse_node_state(ipsec_state(200))
    sas = {p.name: (sa("192.0.2.250", str(p.underlay_address), 0x2000 + 2 * i),
                    sa(str(p.underlay_address), "192.0.2.250", 0x2001 + 2 * i)) for i, p in enumerate(s.peers)}
    before = render(s, CTX, sas)
    name = s.peers[7].name
    rotated = dict(sas)
    rotated[name] = (*sas[name], sa("192.0.2.250", str(s.peers[7].underlay_address), 0x9000))
    ops = plan(render(s, CTX, rotated), before)
    assert len(ops) == 1 and isinstance(ops[0], SyncXfrm) and len(ops[0].add_sas) == 1
    retired = dict(rotated)
    retired[name] = rotated[name][1:]
    ops = plan(render(s, CTX, retired), render(s, CTX, rotated))
    assert len(ops) == 1 and isinstance(ops[0], SyncXfrm) and ops[0].delete_sas == (sas[name][0].ident,)


def test_an_sa_with_the_same_spi_and_another_key_is_replaced() -> None:
    s = parse_node_state(ipsec_state(1))
    peer = s.peers[0]
    mine = sa("192.0.2.250", str(peer.underlay_address), 0x1001)
    other_key = XfrmSa(mine.src, mine.dst, mine.spi, bytes(36))
    ops = plan(render(s, CTX, {peer.name: (mine,)}), render(s, CTX, {peer.name: (other_key,)}))
    assert len(ops) == 1 and isinstance(ops[0], SyncXfrm)
    assert ops[0].add_sas == (mine,) and ops[0].delete_sas == (mine.ident,)
