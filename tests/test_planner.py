from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

from factories import peer, state, v4_state
from hypothesis import given, settings
from hypothesis import strategies as st

from veilnet_agent.core import naming
from veilnet_agent.core.encryption import WireGuardHost
from veilnet_agent.core.model import parse_node_state
from veilnet_agent.core.objects import FdbEntry, KernelState, NeighEntry
from veilnet_agent.core.ops import (
    AddFdb,
    CreateLink,
    DeleteLink,
    DelFdb,
    DelNeigh,
    EnsureWgInterface,
    Op,
    SetNeigh,
    SyncWgPeers,
    UpdateLink,
    cost,
)
from veilnet_agent.core.planner import plan
from veilnet_agent.core.render import NodeContext, render

CTX = NodeContext(encryption=WireGuardHost(public_key="A" * 43 + "=", listen_port=51820), underlay_mtu=1500,
                  underlay_family=4)


def target(raw: dict[str, Any], ctx: NodeContext = CTX) -> KernelState:
    return render(parse_node_state(raw), ctx)


def simulate(observed: KernelState, ops: list[Op]) -> KernelState:
    """Apply ops to a model of the kernel, with the kernel's side effects (entries die with their link)."""
    links = dict(observed.links)
    fdb = set(observed.fdb)
    neigh = {(n.ifname, n.ip): n for n in observed.neigh}
    wg, peers = observed.wg, dict(observed.wg_peers)
    for op in ops:
        if isinstance(op, EnsureWgInterface):
            wg = op.target
        elif isinstance(op, SyncWgPeers):
            for key in op.removes:
                del peers[key]
            peers.update({p.public_key: p for p in op.upserts})
        elif isinstance(op, CreateLink):
            assert op.link.name not in links, f"create over existing {op.link.name}"
            assert op.link.master is None or op.link.master in links, "port created before its bridge"
            links[op.link.name] = op.link
        elif isinstance(op, DeleteLink):
            # The kernel detaches the ports of a deleted bridge; their bridge FDB entries go with it.
            ports = {n for n, link in links.items() if link.master == op.name}
            links.update({n: replace(links[n], master=None) for n in ports})
            del links[op.name]
            fdb = {e for e in fdb if e.ifname != op.name and not (e.dst is None and e.ifname in ports)}
            neigh = {k: n for k, n in neigh.items() if n.ifname != op.name}
        elif isinstance(op, UpdateLink):
            link = links[op.name]
            links[op.name] = replace(
                link,
                mtu=op.mtu if op.mtu is not None else link.mtu,
                master=op.master if op.master is not None else link.master,
                mac=op.mac if op.mac is not None else link.mac,
                addresses=(link.addresses | op.add_addresses) - op.remove_addresses,
                learning=op.learning if op.learning is not None else link.learning,
                neigh_suppress=op.neigh_suppress if op.neigh_suppress is not None else link.neigh_suppress,
                isolated=op.isolated if op.isolated is not None else link.isolated,
            )
        elif isinstance(op, AddFdb):
            assert op.entry.ifname in links
            fdb.add(op.entry)
        elif isinstance(op, DelFdb):
            fdb.remove(op.entry)
        elif isinstance(op, SetNeigh):
            assert op.entry.ifname in links
            neigh[(op.entry.ifname, op.entry.ip)] = op.entry
        elif isinstance(op, DelNeigh):
            del neigh[(op.entry.ifname, op.entry.ip)]
    return KernelState(links, frozenset(fdb), frozenset(neigh.values()), wg, peers)


def test_empty_to_full() -> None:
    want = target(state(peers=3))
    ops = plan(want, KernelState())
    kinds = [type(op).__name__ for op in ops]
    assert kinds[0] == "EnsureWgInterface" and kinds[1] == "SyncWgPeers"
    creates = [op.link.name for op in ops if isinstance(op, CreateLink)]
    assert creates[:2] == ["vnbr100", "vnbr200"], "bridges before their ports"
    assert set(creates) == set(want.links)
    assert simulate(KernelState(), ops) == want


def test_full_to_same_is_zero_ops() -> None:
    want = target(state(peers=50))
    assert plan(want, want) == []
    assert plan(want, simulate(KernelState(), plan(want, KernelState()))) == []


def _one_peer_added_ops(n: int) -> list[Op]:
    raw = state(peers=n)
    before = target(raw)
    raw["peers"].append(peer(n))
    return plan(target(raw), before)


def test_one_peer_added_touches_only_that_peer() -> None:
    ops = _one_peer_added_ops(20)
    new = peer(20)
    assert len(ops) == 5
    sync = ops[0]
    assert isinstance(sync, SyncWgPeers)
    assert [p.public_key for p in sync.upserts] == [new["public_key"]] and sync.removes == ()
    fdb = {op.entry for op in ops if isinstance(op, AddFdb)}
    mac = new["endpoints"][0]["mac"]
    assert fdb == {
        FdbEntry("vnvx100", "00:00:00:00:00:00", "fd00:7::16"),
        FdbEntry("vnvx100", mac, "fd00:7::16"),
        FdbEntry("vnvx100", mac, None),
    }
    assert [op.entry for op in ops if isinstance(op, SetNeigh)] == [
        NeighEntry("vnbr100", new["endpoints"][0]["ips"][0], mac)
    ]


def test_one_peer_change_cost_does_not_grow_with_scale() -> None:
    small = sum(cost(op) for op in _one_peer_added_ops(10))
    large = sum(cost(op) for op in _one_peer_added_ops(2000))
    assert small == large == 5


def test_peer_removed() -> None:
    raw = state(peers=5)
    before = target(raw)
    gone = raw["peers"].pop(2)
    ops = plan(target(raw), before)
    assert isinstance(ops[0], SyncWgPeers) and ops[0].removes == (gone["public_key"],)
    assert sum(isinstance(op, DelFdb) for op in ops) == 3
    assert sum(isinstance(op, DelNeigh) for op in ops) == 1
    assert len(ops) == 5


def test_endpoint_removed_deletes_only_its_veth() -> None:
    raw = state(peers=3)
    before = target(raw)
    raw["endpoints"].pop(1)
    ops = plan(target(raw), before)
    assert ops == [DeleteLink(naming.endpoint_host_name("a-db"), "veth", "not desired")]


def test_endpoint_address_change_recreates_it() -> None:
    raw = state(peers=1)
    before = target(raw)
    raw["endpoints"][0]["ipv4"] = "203.0.113.11"
    ops = plan(target(raw), before)
    name = naming.endpoint_host_name("a-web")
    assert [(type(op).__name__, getattr(op, "name", None) or getattr(op, "link", op).name  # type: ignore[union-attr]
             if not isinstance(op, AddFdb) else op.entry.ifname) for op in ops] == [
        ("DeleteLink", name),
        ("CreateLink", name),
        ("AddFdb", name),  # the endpoint's static MAC entry goes with its port
    ]


def test_vni_change_rebuilds_segment_and_its_entries() -> None:
    raw = state(peers=2)
    before = target(raw)
    raw["segments"][0]["vni"] = 101
    after = target(raw)
    ops = plan(after, before)
    deleted = [op.name for op in ops if isinstance(op, DeleteLink)]
    assert deleted == ["vnvx100", "vnbr100"], "ports before bridges"
    created = [op.link.name for op in ops if isinstance(op, CreateLink)]
    assert created[0] == "vnbr101"
    assert not any(isinstance(op, (DelFdb, DelNeigh)) for op in ops), "entries go with their links"
    assert simulate(before, ops) == after


def test_underlay_mtu_change_updates_links_in_place() -> None:
    raw = v4_state()
    before = target(raw)
    after = target(raw, replace(CTX, underlay_mtu=9000))
    ops = plan(after, before)
    updates = {op.name: op.mtu for op in ops if isinstance(op, UpdateLink)}
    assert updates["vnbr100"] == 8890 and updates["vnvx100"] == 8890
    ensure = [op for op in ops if isinstance(op, EnsureWgInterface)]
    assert ensure and ensure[0].target.mtu == 8940
    assert simulate(before, ops) == after


def test_drifted_kernel_is_repaired_minimally() -> None:
    want = target(state(peers=10))
    lost_fdb = sorted(want.fdb, key=lambda e: (e.ifname, e.mac, e.dst or ""))[3]
    lost_neigh = sorted(want.neigh)[2]
    key = sorted(want.wg_peers)[4]
    drifted = KernelState(
        links=want.links,
        fdb=want.fdb - {lost_fdb},
        neigh=want.neigh - {lost_neigh},
        wg=want.wg,
        wg_peers={k: p for k, p in want.wg_peers.items() if k != key},
    )
    ops = plan(want, drifted)
    assert len(ops) == 3
    assert AddFdb(lost_fdb, "missing") in ops
    assert SetNeigh(lost_neigh, "missing") in ops


def test_bridge_recreated_reattaches_ports_and_entries() -> None:
    want = target(v4_state())
    observed = KernelState(
        links={n: link for n, link in want.links.items() if n != "vnbr100"},
        fdb=want.fdb,
        neigh=frozenset(n for n in want.neigh if n.ifname != "vnbr100"),
        wg=want.wg,
        wg_peers=want.wg_peers,
    )
    # Ports of a missing bridge are detached: the kernel shows them without master.
    observed = replace(
        observed,
        links={
            n: (replace(link, master=None) if link.master == "vnbr100" else link) for n, link in observed.links.items()
        },
        fdb=frozenset(e for e in observed.fdb if not (e.dst is None and e.ifname == "vnvx100")),
    )
    ops = plan(want, observed)
    assert simulate(observed, ops) == want


def test_geneve_segment_has_a_device_per_peer() -> None:
    raw = state(peers=3)
    raw["segments"][0]["encapsulation"] = "geneve"
    want = target(raw)
    geneve = [link for link in want.links.values() if link.kind == "geneve"]
    assert len(geneve) == 3
    assert {link.master for link in geneve} == {"vnbr100"}
    assert all(len(link.name) <= naming.IFNAMSIZ for link in want.links.values())
    assert all(e.dst is None for e in want.fdb if e.ifname.startswith("vngn"))
    # split horizon: per-peer ports never flood to each other (a full mesh would loop broadcasts forever)
    assert all(link.isolated is True for link in geneve)
    assert all(link.isolated is None for link in want.links.values() if link.kind != "geneve")


def test_a_geneve_port_that_lost_its_isolation_gets_it_back_and_nothing_else_changes() -> None:
    raw = state(peers=3)
    raw["segments"][0]["encapsulation"] = "geneve"
    want = target(raw)
    name = next(n for n, link in want.links.items() if link.kind == "geneve")
    observed = replace(want, links={**want.links, name: replace(want.links[name], isolated=False)})
    ops = list(plan(want, observed))
    assert len(ops) == 1 and isinstance(ops[0], UpdateLink), ops
    assert (ops[0].name, ops[0].isolated, ops[0].learning, ops[0].neigh_suppress) == (name, True, None, None)
    assert simulate(observed, ops) == want


def test_render_gateway_and_mtu() -> None:
    want = target(v4_state())
    bridge = want.links["vnbr100"]
    assert bridge.addresses == {"203.0.113.1/26", "fd00:b1::1/64"}
    assert bridge.mac == "02:56:4e:00:00:64"
    assert bridge.mtu == 1390
    assert want.wg is not None and want.wg.mtu == 1440 and want.wg.addresses == {"198.51.100.11/24"}
    peer_state = next(iter(want.wg_peers.values()))
    assert peer_state.endpoint == "192.0.2.12:51820"
    assert peer_state.allowed_ips == {"198.51.100.12/32"}
    assert NeighEntry("vnbr100", "fd00:b1::14", "02:00:00:0b:00:01") in want.neigh


def test_ipv6_underlay_peer_raises_overhead_for_every_segment() -> None:
    raw = v4_state()
    raw["peers"][0]["underlay_address"] = "2001:db8::12"
    want = target(raw)
    assert want.links["vnbr100"].mtu == 1370
    assert next(iter(want.wg_peers.values())).endpoint == "[2001:db8::12]:51820"


@st.composite
def peer_subsets(draw: st.DrawFn) -> tuple[list[int], list[int]]:
    universe = list(range(12))
    a = draw(st.lists(st.sampled_from(universe), unique=True, max_size=12))
    b = draw(st.lists(st.sampled_from(universe), unique=True, max_size=12))
    return a, b


@settings(max_examples=60, deadline=None)
@given(peer_subsets(), st.booleans(), st.sampled_from([1500, 1400, 9000]))
def test_plan_always_converges(subsets: tuple[list[int], list[int]], drop_green: bool, mtu: int) -> None:
    a, b = subsets
    raw_a = state(peers=0)
    raw_a["peers"] = [peer(i) for i in a]
    raw_b = copy.deepcopy(raw_a)
    raw_b["peers"] = [peer(i) for i in b]
    if drop_green:
        raw_b["segments"].pop(1)
        raw_b["endpoints"].pop(1)
    before = target(raw_a)
    after = target(raw_b, replace(CTX, underlay_mtu=mtu))
    ops = plan(after, before)
    assert simulate(before, ops) == after
    assert plan(after, simulate(before, ops)) == []
