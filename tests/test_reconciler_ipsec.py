"""The reconciler in IPsec mode against the fake kernel: refusals name the field, order protects, no fail-open."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from factories import state

from veilnet_agent.core.config import AgentConfig, parse_config
from veilnet_agent.core.errors import ValidationError
from veilnet_agent.core.model import parse_node_state
from veilnet_agent.core.ops import AddFdb, CreateLink, SyncXfrm
from veilnet_agent.dataplane.firewall_manager import FirewallManager
from veilnet_agent.dataplane.ipsec_manager import IpsecManager
from veilnet_agent.dataplane.reconciler import Reconciler
from veilnet_agent.testing import FakeKernel


class Log:
    def info(self, *a: Any, **kw: Any) -> None: ...
    warning = info


def config(tmp_path: Path) -> AgentConfig:
    return parse_config({"node_name": "host-a", "state_dir": str(tmp_path / "state"),
                         "underlay": {"interface": "ul0", "address": "192.0.2.250"}})


def ipsec_raw(peers: int = 2) -> dict[str, Any]:
    raw = state(peers)
    raw["encryption"] = "ipsec"
    return raw


def reconciler(kernel: FakeKernel, tmp_path: Path, *, with_ipsec: bool = True) -> Reconciler:
    cfg = config(tmp_path)
    r = Reconciler(cfg, kernel.links, kernel.wireguard, FirewallManager(kernel.firewall, cfg.firewall, "host-a"),
                   xfrm=kernel.xfrm)
    if with_ipsec:
        r.ipsec = IpsecManager("host-a", ec.generate_private_key(ec.SECP256R1()),
                               lambda pem: ("x", ec.generate_private_key(ec.SECP256R1()).public_key()), Log())
    return r


def test_an_ipsec_state_without_the_controller_or_esp_is_refused_whole(tmp_path: Path) -> None:
    kernel = FakeKernel()
    r = reconciler(kernel, tmp_path, with_ipsec=False)
    with pytest.raises(ValidationError, match="needs the controller") as err:
        r.accept(parse_node_state(ipsec_raw()))
    assert err.value.field == "encryption" and r.desired is None
    kernel.xfrm.unsupported_reason = "the kernel cannot make ESP SAs (esp4 missing?)"
    r = reconciler(kernel, tmp_path)
    with pytest.raises(ValidationError, match="esp4 missing") as err:
        r.accept(parse_node_state(ipsec_raw()))
    assert err.value.field == "encryption" and r.desired is None and not kernel.applied


def test_a_peer_on_the_other_underlay_family_is_refused(tmp_path: Path) -> None:
    raw = ipsec_raw(1)
    raw["peers"][0]["underlay_address"] = "2001:db8::7"
    r = reconciler(FakeKernel(), tmp_path)
    with pytest.raises(ValidationError, match="IPsec runs over one family") as err:
        r.accept(parse_node_state(raw))
    assert err.value.field == "peers[0].underlay_address"


def test_policies_exist_before_any_tunnel_entry_and_nothing_is_left_unprotected(tmp_path: Path) -> None:
    kernel = FakeKernel()
    r = reconciler(kernel, tmp_path)
    r.accept(parse_node_state(ipsec_raw(2)))
    outcome = r.reconcile(full=True)
    assert outcome.failure is None, outcome.failure
    first_xfrm = next(i for i, op in enumerate(kernel.applied) if isinstance(op, SyncXfrm))
    first_tunnel = next(i for i, op in enumerate(kernel.applied) if isinstance(op, (CreateLink, AddFdb))
                        and getattr(getattr(op, "entry", None), "dst", None) is not None)
    assert first_xfrm < first_tunnel
    # every peer the FDB sends to has both out policies
    dsts = {e.dst for e in kernel.fdb if e.dst is not None}
    out = {(p.dst, p.dport) for p in kernel.xfrm.policies.values() if p.direction == "out"}
    assert all((d, 4789) in out and (d, 6081) in out for d in dsts)
    assert r.desired is not None and not kernel.wg_peers


def test_a_refused_policy_holds_back_every_tunnel(tmp_path: Path) -> None:
    kernel = FakeKernel()
    kernel.xfrm.refuse_adds = "add policy: Operation not permitted"
    r = reconciler(kernel, tmp_path)
    r.accept(parse_node_state(ipsec_raw(2)))
    outcome = r.reconcile(full=True)
    assert outcome.failure is not None and "Operation not permitted" in str(outcome.failure)
    assert not [e for e in kernel.fdb if e.dst is not None], "a tunnel entry without its policy"


def test_the_key_manager_gets_the_peers_and_publishes_a_first_epoch(tmp_path: Path) -> None:
    kernel = FakeKernel()
    r = reconciler(kernel, tmp_path)
    r.accept(parse_node_state(ipsec_raw(3)))
    changes = r.take_ipsec_changes()
    assert changes.publish is not None and changes.publish.node == "host-a"
    assert r.ipsec is not None and set(r.ipsec.peers) == {"peer-0", "peer-1", "peer-2"}


def test_a_full_resync_keeps_the_sas_the_key_manager_holds(tmp_path: Path) -> None:
    from veilnet_agent.core.objects import XfrmSa

    kernel = FakeKernel()
    r = reconciler(kernel, tmp_path)
    r.accept(parse_node_state(ipsec_raw(1)))
    assert r.ipsec is not None
    peer = next(iter(r.ipsec.peers))
    sa = XfrmSa("192.0.2.250", r.ipsec.addresses[peer], 0x4242, bytes(36))
    r.ipsec.peers[peer].adopted = (sa,)  # as if the manager held it
    r.ipsec_changed([peer])
    assert r.reconcile(full=False).failure is None and sa.ident in kernel.xfrm.sas
    for _ in range(2):
        assert r.reconcile(full=True).failure is None
        assert sa.ident in kernel.xfrm.sas, "a resync must not drop an SA the key manager holds"
