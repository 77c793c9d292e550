"""LinksDriver against the real kernel, in throw-away network namespaces.

Every namespace is named ``vnt-lk-<pid>-<n>`` and deleted by a fixture
finaliser, pass or fail. The ``ip``/``bridge`` commands are used here only to
build foreign objects and to cross-check what the driver reads and writes.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from lab import wait_until

from veilnet_agent.core import naming
from veilnet_agent.core.firewall_guard import link_local
from veilnet_agent.core.objects import FdbEntry, GeneveSpec, KernelState, Link, NeighEntry, VethSpec, VxlanSpec
from veilnet_agent.core.ops import AddFdb, CreateLink, DeleteLink, DelFdb, DelNeigh, SetNeigh, UpdateLink
from veilnet_agent.core.planner import plan
from veilnet_agent.drivers import netlink, rtnl
from veilnet_agent.drivers.links import GENEVE_UNSUPPORTED, LinksDriver

pytestmark = pytest.mark.root

VNI = 100
MTU = 1450
BRIDGE = naming.bridge_name(VNI)
VXLAN = naming.vxlan_name(VNI)
ZERO_MAC = "00:00:00:00:00:00"


# --- namespaces and commands ---------------------------------------------------


def sh(*cmd: str, stdin: str | None = None) -> str:
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, input=stdin)
    if done.returncode:
        raise AssertionError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr}")
    return done.stdout


def ip_json(ns: str, *args: str) -> Any:
    return json.loads(sh("ip", "-n", ns, "-j", *args) or "[]")


@pytest.fixture
def host(make_ns: Callable[[], str]) -> str:
    return make_ns()


@pytest.fixture
def driver(host: str) -> Iterator[LinksDriver]:
    with LinksDriver(netns=host) as drv:
        yield drv


# --- desired objects -------------------------------------------------------------


def bridge_link(vni: int = VNI, addresses: tuple[str, ...] = ()) -> Link:
    return Link(
        name=naming.bridge_name(vni),
        kind="bridge",
        alias=naming.alias("bridge", str(vni), naming.fingerprint(vni)),
        mtu=MTU,
        mac=naming.gateway_mac(vni),
        addresses=frozenset(addresses),
    )


def vxlan_link(local: str, vni: int = VNI) -> Link:
    return Link(
        name=naming.vxlan_name(vni),
        kind="vxlan",
        alias=naming.alias("vxlan", str(vni), naming.fingerprint(vni, local)),
        mtu=MTU,
        master=naming.bridge_name(vni),
        learning=False,
        neigh_suppress=True,
        ipv6=False,
        spec=VxlanSpec(vni=vni, local=local),
    )


def endpoint_link(key: str, netns: str, mac: str, addresses: tuple[str, ...]) -> Link:
    gateways = tuple(
        str(next(ipaddress.ip_interface(a).network.hosts())) for a in addresses
    )  # the bridge holds the first address of each subnet
    return Link(
        name=naming.endpoint_host_name(key),
        kind="veth",
        alias=naming.alias("endpoint", key, naming.fingerprint(netns)),
        mtu=MTU,
        master=BRIDGE,
        learning=False,
        ipv6=False,
        spec=VethSpec(netns=netns, ifname="eth0", mac=mac, addresses=addresses, gateways=gateways),
    )


def segment_ops(local: str, addresses: tuple[str, ...] = ()) -> list[CreateLink]:
    return [
        CreateLink(bridge_link(addresses=addresses), "segment"),
        CreateLink(vxlan_link(local), "segment"),
    ]


def expected_observed(link: Link) -> Link:
    """What observe() can read back of a desired link."""
    if link.kind == "bridge":
        return link
    return Link(link.name, link.kind, link.alias, link.mtu, master=link.master, learning=link.learning,
                neigh_suppress=link.neigh_suppress, ipv6=True if link.ipv6 is None else link.ipv6)


def mac_of(i: int) -> str:
    return "02:00:{:02x}:{:02x}:{:02x}:{:02x}".format(*i.to_bytes(4, "big"))


def assert_all_applied(result: Any) -> None:
    assert result.failed == [], result.failed


# --- kernel cross-checks ---------------------------------------------------------


def kernel_fdb(ns: str) -> list[dict[str, Any]]:
    return list(json.loads(sh("bridge", "-n", ns, "-j", "fdb", "show") or "[]"))


def kernel_self_fdb(ns: str, dev: str) -> set[FdbEntry]:
    return {
        FdbEntry(e["ifname"], e["mac"], e["dst"])
        for e in kernel_fdb(ns)
        if e["ifname"] == dev and "self" in e.get("flags", []) and "dst" in e
    }


def kernel_static_master_fdb(ns: str, bridge: str) -> set[FdbEntry]:
    return {
        FdbEntry(e["ifname"], e["mac"])
        for e in kernel_fdb(ns)
        if e.get("master") == bridge and e.get("state") == "static"
    }


def kernel_permanent_neigh(ns: str, dev: str) -> set[NeighEntry]:
    return {
        NeighEntry(dev, str(ipaddress.ip_address(e["dst"])), e["lladdr"])
        for e in ip_json(ns, "neigh", "show", "dev", dev)
        if "PERMANENT" in e.get("state", [])
    }


def link_names(ns: str) -> set[str]:
    return {link["ifname"] for link in ip_json(ns, "link", "show")}


# --- tests -------------------------------------------------------------------------


def test_segment_and_endpoint_round_trip(driver: LinksDriver, host: str, make_ns: Any) -> None:
    ep_ns = make_ns()
    sh("ip", "netns", "exec", ep_ns, "sysctl", "-qw", "net.ipv6.conf.default.addr_gen_mode=3")  # random by default
    addresses = ("192.0.2.1/24", "2001:db8:100::1/64")
    endpoint = endpoint_link("ep-a", ep_ns, "02:00:00:00:0a:01", ("192.0.2.10/24", "2001:db8:100::a/64"))
    ops = [*segment_ops("198.51.100.1", addresses), CreateLink(endpoint, "endpoint")]

    result = driver.apply(ops)

    assert_all_applied(result)
    assert result.applied == ops
    assert result.requests >= len(ops)
    observed = driver.observe()
    expected = {op.link.name: expected_observed(op.link) for op in ops}
    assert observed.links == expected
    assert observed.links[BRIDGE].mac == naming.gateway_mac(VNI)
    assert observed.links[BRIDGE].addresses == frozenset({"192.0.2.1/24", "2001:db8:100::1/64"})

    details = {d["ifname"]: d for d in ip_json(host, "-d", "link", "show")}
    assert details[BRIDGE]["linkinfo"]["info_data"]["stp_state"] == 0
    # The gateway (the same on every host) does no duplicate address detection and solicits no router:
    # its DAD would flood the overlay and fail against the other hosts' gateways.
    conf = {k: sh("ip", "netns", "exec", host, "cat", f"/proc/sys/net/ipv6/conf/{BRIDGE}/{k}").strip()
            for k in ("accept_dad", "dad_transmits", "router_solicitations", "accept_ra")}
    assert conf == {"accept_dad": "0", "dad_transmits": "0", "router_solicitations": "0", "accept_ra": "0"}
    vx = details[VXLAN]
    assert vx["linkinfo"]["info_data"]["id"] == VNI
    assert vx["linkinfo"]["info_data"]["local"] == "198.51.100.1"
    assert vx["linkinfo"]["info_data"]["port"] == 4789
    assert vx["linkinfo"]["info_data"]["learning"] is False
    assert all("UP" in details[n]["flags"] for n in (BRIDGE, VXLAN, endpoint.name))
    ports = {p["ifname"]: p for p in json.loads(sh("bridge", "-n", host, "-j", "-d", "link"))}
    assert ports[VXLAN]["learning"] is False
    assert ports[VXLAN]["neigh_suppress"] is True
    assert ports[endpoint.name]["learning"] is False  # endpoint ports do not learn either: their FDB is static
    assert ports[endpoint.name]["neigh_suppress"] is False

    (eth0,) = [link for link in ip_json(ep_ns, "addr", "show") if link["ifname"] == "eth0"]
    assert eth0["address"] == "02:00:00:00:0a:01"
    assert eth0["mtu"] == MTU
    assert eth0["operstate"] == "UP"
    addrs = {f"{a['local']}/{a['prefixlen']}" for a in eth0["addr_info"] if a["scope"] == "global"}
    assert addrs == {"192.0.2.10/24", "2001:db8:100::a/64"}
    v6 = [a for a in eth0["addr_info"] if a["local"] == "2001:db8:100::a"]
    assert v6[0].get("nodad") is True
    # The link-local address is the EUI-64 one anti-spoofing admits, even where the namespace defaults otherwise.
    wait_until(lambda: [a["local"] for a in ip_json(ep_ns, "addr", "show", "dev", "eth0")[0]["addr_info"]
                        if a["scope"] == "link"] == [str(link_local("02:00:00:00:0a:01"))], 5,
               what="EUI-64 link-local address")
    routes4 = ip_json(ep_ns, "route", "show", "default")
    routes6 = ip_json(ep_ns, "-6", "route", "show", "default")
    assert [(r["gateway"], r["dev"]) for r in routes4] == [("192.0.2.1", "eth0")]
    assert [(r["gateway"], r["dev"]) for r in routes6] == [("2001:db8:100::1", "eth0")]
    (lo,) = [link for link in ip_json(ep_ns, "link", "show") if link["ifname"] == "lo"]
    assert "UP" in lo["flags"]

    # Deleting the host end removes the endpoint end as well.
    delete = DeleteLink(endpoint.name, "veth", "gone")
    assert_all_applied(driver.apply([delete]))
    assert endpoint.name not in driver.observe().links
    assert "eth0" not in link_names(ep_ns)


def test_update_link_changes_mtu_master_mac_and_addresses(driver: LinksDriver, host: str) -> None:
    other = bridge_link(vni=200)
    assert_all_applied(driver.apply([*segment_ops("198.51.100.1", ("192.0.2.1/24",)), CreateLink(other, "second")]))
    update_bridge = UpdateLink(
        BRIDGE,
        mtu=1400,
        master=None,
        mac="02:56:4e:00:00:99",
        add_addresses=frozenset({"2001:db8:100::1/64"}),
        remove_addresses=frozenset({"192.0.2.1/24"}),
        reason="update",
    )
    move_vxlan = UpdateLink(VXLAN, 1400, other.name, None, frozenset(), frozenset(), "move")

    result = driver.apply([update_bridge, move_vxlan])

    assert_all_applied(result)
    assert result.requests == 6
    links = driver.observe().links
    assert links[BRIDGE].mtu == 1400
    assert links[BRIDGE].mac == "02:56:4e:00:00:99"
    assert links[BRIDGE].addresses == frozenset({"2001:db8:100::1/64"})
    assert links[VXLAN].master == other.name
    assert links[VXLAN].mtu == 1400


def test_port_flags_read_back_and_a_relearning_port_is_repaired(driver: LinksDriver, host: str, make_ns: Any) -> None:
    """Someone turns learning back on (or suppression off): the planner sees it and one request repairs it."""
    ep_ns = make_ns()
    endpoint = endpoint_link("ep-a", ep_ns, "02:00:00:00:0a:01", ("192.0.2.10/24",))
    target = KernelState(links={op.link.name: op.link for op in [*segment_ops("198.51.100.1"),
                                                                   CreateLink(endpoint, "e")]})
    def observe() -> KernelState:
        seen = driver.observe()
        return KernelState(links=seen.links, fdb=seen.fdb, neigh=seen.neigh)

    assert_all_applied(driver.apply(plan(target, observe())))
    sh("bridge", "-n", host, "link", "set", "dev", endpoint.name, "learning", "on")
    sh("bridge", "-n", host, "link", "set", "dev", VXLAN, "neigh_suppress", "off", "learning", "on")
    sh("ip", "netns", "exec", host, "sysctl", "-qw", f"net.ipv6.conf.{VXLAN}.disable_ipv6=0")
    observed = observe()
    assert (observed.links[endpoint.name].learning, observed.links[VXLAN].learning) == (True, True)
    assert observed.links[VXLAN].neigh_suppress is False
    assert (observed.links[VXLAN].ipv6, observed.links[endpoint.name].ipv6) == (True, False)

    ops = plan(target, observed)
    assert sorted((op.name, op.learning, op.neigh_suppress, op.ipv6) for op in ops
                  if isinstance(op, UpdateLink)) == [(endpoint.name, False, None, None), (VXLAN, False, True, False)]
    result = driver.apply(ops)
    assert_all_applied(result)
    assert result.requests == 3  # one brport request per port, one sysctl
    ports = {p["ifname"]: p for p in json.loads(sh("bridge", "-n", host, "-j", "-d", "link"))}
    assert (ports[endpoint.name]["learning"], ports[VXLAN]["learning"], ports[VXLAN]["neigh_suppress"]) == (
        False, False, True)
    assert plan(target, observe()) == []


def test_unowned_links_are_never_returned_or_touched(driver: LinksDriver, host: str) -> None:
    # Foreign objects made by hand: a bridge without alias with a veth port,
    # a bridge with someone else's alias, a vxlan without alias, plus entries.
    sh("ip", "-n", host, "link", "add", "vnforeignbr", "type", "bridge")
    sh("ip", "-n", host, "link", "add", "vnforeigndm", "type", "veth", "peer", "vnforeignpe")
    sh("ip", "-n", host, "link", "set", "vnforeigndm", "master", "vnforeignbr")
    sh("ip", "-n", host, "link", "add", "vnotherbr", "type", "bridge")
    sh("ip", "-n", host, "link", "set", "vnotherbr", "alias", "someone-else:bridge")
    sh("ip", "-n", host, "link", "add", "vnforeignvx", "type", "vxlan", "id", "7", "dstport", "4789")
    for dev in ("vnforeignbr", "vnforeigndm", "vnotherbr", "vnforeignvx"):
        sh("ip", "-n", host, "link", "set", dev, "up")
    sh("bridge", "-n", host, "fdb", "add", "02:00:00:00:ff:01", "dev", "vnforeigndm", "master", "static")
    sh(
        "bridge",
        "-n",
        host,
        "fdb",
        "append",
        ZERO_MAC,
        "dev",
        "vnforeignvx",
        "dst",
        "198.51.100.9",
        "self",
        "permanent",
    )
    sh(
        "ip",
        "-n",
        host,
        "neigh",
        "add",
        "192.0.2.99",
        "lladdr",
        "02:00:00:00:ff:02",
        "dev",
        "vnforeignbr",
        "nud",
        "permanent",
    )
    foreign_before = [e for e in kernel_fdb(host) if e["ifname"].startswith("vnforeign")]
    assert_all_applied(driver.apply(segment_ops("198.51.100.1")))

    observed = driver.observe()

    assert set(observed.links) == {BRIDGE, VXLAN}
    assert observed.fdb == frozenset()
    assert observed.neigh == frozenset()
    # Deleting a foreign link is refused; it and its entries stay.
    refused = driver.apply([DeleteLink("vnforeignbr", "bridge", "x"), DeleteLink("vnotherbr", "bridge", "x")])
    assert [op for op, _ in refused.failed] == [
        DeleteLink("vnforeignbr", "bridge", "x"),
        DeleteLink("vnotherbr", "bridge", "x"),
    ]
    assert all("not owned" in reason for _, reason in refused.failed)
    assert {"vnforeignbr", "vnforeigndm", "vnotherbr", "vnforeignvx"} <= link_names(host)
    assert [e for e in kernel_fdb(host) if e["ifname"].startswith("vnforeign")] == foreign_before
    assert kernel_permanent_neigh(host, "vnforeignbr") == {NeighEntry("vnforeignbr", "192.0.2.99", "02:00:00:00:ff:02")}


def test_fdb_and_neigh_entries_round_trip(driver: LinksDriver, host: str, make_ns: Any) -> None:
    ep_ns = make_ns()
    endpoint = endpoint_link("ep-a", ep_ns, "02:00:00:00:0a:01", ("192.0.2.10/24",))
    assert_all_applied(driver.apply([*segment_ops("198.51.100.1"), CreateLink(endpoint, "endpoint")]))
    bum = {FdbEntry(VXLAN, ZERO_MAC, "198.51.100.2"), FdbEntry(VXLAN, ZERO_MAC, "198.51.100.3")}
    unicast_self = {
        FdbEntry(VXLAN, "02:00:00:00:0b:01", "198.51.100.2"),
        FdbEntry(VXLAN, "02:00:00:00:0c:01", "198.51.100.3"),
    }
    master = {
        FdbEntry(VXLAN, "02:00:00:00:0b:01"),
        FdbEntry(VXLAN, "02:00:00:00:0c:01"),
        FdbEntry(endpoint.name, "02:00:00:00:0a:01"),
    }
    neigh = {
        NeighEntry(BRIDGE, "192.0.2.11", "02:00:00:00:0b:01"),
        NeighEntry(BRIDGE, "2001:db8:100::b", "02:00:00:00:0b:01"),
        NeighEntry(BRIDGE, "192.0.2.12", "02:00:00:00:0c:01"),
    }
    ops: list[Any] = [AddFdb(e, "add") for e in sorted(bum | unicast_self | master, key=str)]
    ops += [SetNeigh(n, "add") for n in sorted(neigh)]

    result = driver.apply(ops)

    assert_all_applied(result)
    assert result.requests == len(ops)
    observed = driver.observe()
    assert observed.fdb == bum | unicast_self | master
    assert observed.neigh == neigh
    assert kernel_self_fdb(host, VXLAN) == bum | unicast_self
    assert kernel_static_master_fdb(host, BRIDGE) == master
    assert kernel_permanent_neigh(host, BRIDGE) == neigh
    # The kernel's own entries (port MACs: permanent; learned: dynamic) are ignored.
    own = [e for e in kernel_fdb(host) if e.get("master") == BRIDGE and e.get("state") != "static"]
    assert own, "expected the bridge's local entries for its ports"

    # DelFdb of one BUM destination removes only that destination.
    gone = FdbEntry(VXLAN, ZERO_MAC, "198.51.100.2")
    neigh_gone = NeighEntry(BRIDGE, "192.0.2.12", "02:00:00:00:0c:01")
    master_gone = FdbEntry(VXLAN, "02:00:00:00:0c:01")
    result = driver.apply([DelFdb(gone, "x"), DelFdb(master_gone, "x"), DelNeigh(neigh_gone, "x")])
    assert_all_applied(result)
    observed = driver.observe()
    assert observed.fdb == (bum | unicast_self | master) - {gone, master_gone}
    assert observed.neigh == neigh - {neigh_gone}
    assert kernel_self_fdb(host, VXLAN) == (bum | unicast_self) - {gone}

    # Re-setting a neighbour replaces its MAC; re-adding a unicast self entry moves its dst.
    moved = FdbEntry(VXLAN, "02:00:00:00:0b:01", "198.51.100.4")
    renamed = NeighEntry(BRIDGE, "192.0.2.11", "02:00:00:00:0d:01")
    assert_all_applied(driver.apply([AddFdb(moved, "x"), SetNeigh(renamed, "x")]))
    observed = driver.observe()
    assert moved in observed.fdb
    assert FdbEntry(VXLAN, "02:00:00:00:0b:01", "198.51.100.2") not in observed.fdb
    assert renamed in observed.neigh
    assert NeighEntry(BRIDGE, "192.0.2.11", "02:00:00:00:0b:01") not in observed.neigh


def test_failures_are_reported_and_other_ops_still_apply(driver: LinksDriver, host: str, make_ns: Any) -> None:
    ep_ns = make_ns()
    missing_ns = f"vnt-lk-missing-{os.getpid()}"
    bridge, vxlan = segment_ops("198.51.100.1")
    lost_endpoint = endpoint_link("ep-lost", missing_ns, "02:00:00:00:0a:09", ("192.0.2.19/24",))
    endpoint = endpoint_link("ep-ok", ep_ns, "02:00:00:00:0a:01", ("192.0.2.10/24",))
    geneve = Link(
        name=naming.geneve_name(VNI, "198.51.100.2"),
        kind="geneve",
        alias=naming.alias("geneve", str(VNI), "fp"),
        mtu=MTU,
        master=BRIDGE,
        spec=GeneveSpec(vni=VNI, remote="198.51.100.2"),
    )
    good_fdb = AddFdb(FdbEntry(VXLAN, ZERO_MAC, "198.51.100.2"), "bum")
    orphan_fdb = AddFdb(FdbEntry(lost_endpoint.name, "02:00:00:00:0a:09"), "pin")
    neigh_ok = SetNeigh(NeighEntry(BRIDGE, "192.0.2.50", "02:00:00:00:0a:05"), "ok")
    ops: list[Any] = [
        bridge,
        CreateLink(lost_endpoint, "missing namespace"),
        CreateLink(geneve, "geneve"),
        vxlan,
        CreateLink(bridge_link(), "duplicate"),
        CreateLink(endpoint, "endpoint"),
        good_fdb,
        orphan_fdb,
        neigh_ok,
    ]

    result = driver.apply(ops)

    reasons = {id(op): reason for op, reason in result.failed}
    assert set(reasons) == {id(ops[1]), id(ops[2]), id(ops[4]), id(orphan_fdb)}
    assert f"endpoint namespace {missing_ns} does not exist" in reasons[id(ops[1])]
    assert lost_endpoint.name in reasons[id(ops[1])]
    assert reasons[id(ops[2])].endswith(GENEVE_UNSUPPORTED)
    assert "Traceback" not in reasons[id(ops[2])]
    assert BRIDGE in reasons[id(ops[4])] and "EEXIST" in reasons[id(ops[4])]
    assert lost_endpoint.name in reasons[id(orphan_fdb)]
    assert result.applied == [bridge, vxlan, ops[5], good_fdb, neigh_ok]
    # Nothing left behind by the failed creations; the duplicate did not harm the original.
    names = link_names(host)
    assert lost_endpoint.name not in names
    assert geneve.name not in names
    assert not [n for n in names if n.startswith(("vnp", "vnprobe"))]
    observed = driver.observe()
    assert set(observed.links) == {BRIDGE, VXLAN, endpoint.name}
    assert good_fdb.entry in observed.fdb
    assert neigh_ok.entry in observed.neigh
    assert driver.geneve_supported() is False
    # Deleting a link that is already gone is done; updating a missing link is not.
    gone = DeleteLink("vnmissing0", "bridge", "x")
    update = UpdateLink("vnmissing1", 1400, None, None, frozenset(), frozenset(), "x")
    result = driver.apply([gone, update])
    assert result.applied == [gone]
    assert result.failed == [(update, "update link vnmissing1: link vnmissing1 does not exist")]


def test_geneve_probe_and_missing_underlay_interface(driver: LinksDriver) -> None:
    assert driver.geneve_supported() is False
    assert driver.interface_mtu("lo") == 65536
    with pytest.raises(Exception, match="vnt-nope0"):
        driver.interface_mtu("vnt-nope0")


def test_5000_entries_apply_and_observe(driver: LinksDriver, host: str, make_ns: Any) -> None:
    ep_ns = make_ns()
    endpoint = endpoint_link("ep-a", ep_ns, "02:00:00:00:0a:01", ("192.0.2.10/24",))
    assert_all_applied(driver.apply([*segment_ops("198.51.100.1"), CreateLink(endpoint, "endpoint")]))
    self_fdb = {FdbEntry(VXLAN, mac_of(i), f"198.51.100.{2 + i % 40}") for i in range(2000)}
    self_fdb |= {FdbEntry(VXLAN, ZERO_MAC, f"198.51.100.{2 + i}") for i in range(40)}
    master_fdb = {FdbEntry(VXLAN, mac_of(i)) for i in range(1000)}
    master_fdb |= {FdbEntry(endpoint.name, mac_of(0x10000 + i)) for i in range(10)}
    neigh = {NeighEntry(BRIDGE, f"192.0.{2 + i // 250}.{1 + i % 250}", mac_of(i)) for i in range(1000)}
    neigh |= {NeighEntry(BRIDGE, f"2001:db8:100::{i:x}", mac_of(i)) for i in range(1, 951)}
    ops: list[Any] = [AddFdb(e, "bulk") for e in sorted(self_fdb | master_fdb, key=str)]
    ops += [SetNeigh(n, "bulk") for n in sorted(neigh)]
    assert len(ops) == 5000

    started = time.perf_counter()
    result = driver.apply(ops)
    elapsed = time.perf_counter() - started

    assert_all_applied(result)
    assert len(result.applied) == 5000
    assert result.requests == 5000
    print(f"\n5000 entries applied in {elapsed:.2f} s")  # timing: integration/bench/bench_dataplane.py
    observed = driver.observe()
    assert observed.fdb == self_fdb | master_fdb
    assert observed.neigh == neigh
    assert kernel_self_fdb(host, VXLAN) == self_fdb
    assert kernel_static_master_fdb(host, BRIDGE) == master_fdb
    assert kernel_permanent_neigh(host, BRIDGE) == neigh

    deletes: list[Any] = [DelFdb(e, "bulk") for e in sorted(self_fdb | master_fdb, key=str)]
    deletes += [DelNeigh(n, "bulk") for n in sorted(neigh)]
    assert_all_applied(driver.apply(deletes))
    observed = driver.observe()
    assert observed.fdb == frozenset()
    assert observed.neigh == frozenset()
    assert kernel_self_fdb(host, VXLAN) == set()


def test_rtnl_dump_matches_bridge_fdb_show(driver: LinksDriver, host: str) -> None:
    """The raw codec reads every entry `bridge fdb show` prints, with the same fields."""
    assert_all_applied(driver.apply(segment_ops("2001:db8:ff::1")))
    entries = [AddFdb(FdbEntry(VXLAN, mac_of(i), f"2001:db8:ff::{2 + i % 7:x}"), "x") for i in range(300)]
    assert_all_applied(driver.apply(entries))
    with rtnl.RtnlSocket(host) as sock:
        names = {ln.ifindex: ln.name for ln in sock.dump_link_names()}
        records = sock.dump_neighbours(rtnl.AF_BRIDGE)
    ours = {(names[r.ifindex], r.lladdr, r.dst) for r in records}
    theirs = {(e["ifname"], e["mac"], e.get("dst")) for e in kernel_fdb(host)}
    assert ours == theirs
    assert driver.observe().fdb == {op.entry for op in entries}


def test_rtnl_batch_survives_receive_buffer_overrun(host: str) -> None:
    """With a tiny receive buffer error replies are dropped: outcomes become unknown, no hang."""
    sh("ip", "-n", host, "link", "add", "vnbr1", "type", "bridge")
    with rtnl.RtnlSocket(host, rcvbuf=8192) as sock:
        index = {ln.name: ln.ifindex for ln in sock.dump_link_names()}["vnbr1"]
        adds = [
            rtnl.neigh_request(delete=False, ifindex=index, ip=f"192.0.2.{i}", mac=mac_of(i)) for i in range(1, 201)
        ]
        adds += [
            rtnl.neigh_request(delete=False, ifindex=index, ip=f"2001:db8::{i:x}", mac=mac_of(i))
            for i in range(1, 5000)
        ]
        assert sock.batch(adds) == [None] * len(adds)
        duplicates = [rtnl.NeighRequest(r.msg_type, rtnl.NLM_F_CREATE | rtnl.NLM_F_EXCL, r.body) for r in adds]

        outcomes = sock.batch(duplicates)

        assert all(o is not None and o.errno in (errno.EEXIST, errno.ENOBUFS) for o in outcomes)
        assert any(o is not None and o.errno == errno.ENOBUFS for o in outcomes)
        # The socket is usable afterwards: a fresh batch gets exact answers again.
        assert sock.batch(duplicates[:3]) == [rtnl.NlError(errno.EEXIST, "")] * 3
        assert len(sock.dump_neighbours(rtnl.AF_INET6)) >= 4999


# --- real traffic --------------------------------------------------------------------


class TunnelSniffer:
    """Counts ARP/NS for given targets inside VXLAN packets on an underlay interface."""

    def __init__(self, netns: str, ifname: str, arp_targets: set[str], ns_targets: set[str]):
        with netlink.netns_entered(netns):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        self.sock.bind((ifname, 0))
        self.sock.settimeout(0.2)
        self.arp_targets = {ipaddress.ip_address(a).packed for a in arp_targets}
        self.ns_targets = {ipaddress.ip_address(a).packed for a in ns_targets}
        self.resolutions = 0
        self.vxlan_frames = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TunnelSniffer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                frame = self.sock.recv(65535)
            except TimeoutError:
                continue
            inner = self._vxlan_payload(frame)
            if inner is not None:
                self.vxlan_frames += 1
                self.resolutions += self._is_resolution(inner)

    @staticmethod
    def _vxlan_payload(frame: bytes) -> bytes | None:
        if len(frame) < 14 + 20 + 8 + 8 + 14 or frame[12:14] != b"\x08\x00":
            return None
        ihl = (frame[14] & 0x0F) * 4
        if frame[14 + 9] != 17:  # UDP
            return None
        udp = 14 + ihl
        if struct.unpack_from("!H", frame, udp + 2)[0] != 4789:
            return None
        return frame[udp + 8 + 8 :]

    def _is_resolution(self, inner: bytes) -> bool:
        ethertype = inner[12:14]
        if ethertype == b"\x08\x06":  # ARP: target protocol address at 14+24
            return inner[14 + 24 : 14 + 28] in self.arp_targets
        if ethertype == b"\x86\xdd" and inner[14 + 6] == 58 and inner[14 + 40] == 135:
            return inner[14 + 40 + 8 : 14 + 40 + 24] in self.ns_targets
        return False


def _host_side(drv: LinksDriver, local: str, remote: str, ep_ns: str, me: int, peer: int) -> None:
    gateway_addrs = ("192.0.2.1/24", "2001:db8:100::1/64")
    endpoint = endpoint_link(f"ep-{me}", ep_ns, mac_of(me), (f"192.0.2.{me}/24", f"2001:db8:100::{me:x}/64"))
    ops: list[Any] = [*segment_ops(local, gateway_addrs), CreateLink(endpoint, "endpoint")]
    ops += [
        AddFdb(FdbEntry(VXLAN, ZERO_MAC, remote), "bum"),
        AddFdb(FdbEntry(VXLAN, mac_of(peer), remote), "remote endpoint"),
        AddFdb(FdbEntry(VXLAN, mac_of(peer)), "pin remote endpoint to the tunnel port"),
        AddFdb(FdbEntry(endpoint.name, mac_of(me)), "pin local endpoint"),
        SetNeigh(NeighEntry(BRIDGE, f"192.0.2.{peer}", mac_of(peer)), "arp"),
        SetNeigh(NeighEntry(BRIDGE, f"2001:db8:100::{peer:x}", mac_of(peer)), "nd"),
    ]
    assert_all_applied(drv.apply(ops))


def test_real_traffic_between_two_hosts(make_ns: Callable[[], str]) -> None:
    host_a, host_b, ep_a, ep_b = make_ns(), make_ns(), make_ns(), make_ns()
    sh("ip", "-n", host_a, "link", "add", "vntu0", "type", "veth", "peer", "name", "vntu1", "netns", host_b)
    for ns, dev, addr in ((host_a, "vntu0", "198.51.100.1/24"), (host_b, "vntu1", "198.51.100.2/24")):
        sh("ip", "-n", ns, "addr", "add", addr, "dev", dev)
        sh("ip", "-n", ns, "link", "set", dev, "up")
    with LinksDriver(host_a) as drv_a, LinksDriver(host_b) as drv_b:
        assert drv_a.interface_mtu("vntu0") == 1500
        _host_side(drv_a, "198.51.100.1", "198.51.100.2", ep_a, 10, 11)
        _host_side(drv_b, "198.51.100.2", "198.51.100.1", ep_b, 11, 10)
        assert len(drv_a.observe().fdb) == 4

    targets4 = {"192.0.2.10", "192.0.2.11"}
    targets6 = {"2001:db8:100::a", "2001:db8:100::b"}
    with TunnelSniffer(host_a, "vntu0", targets4, targets6) as sniffer:
        sh("ip", "netns", "exec", ep_a, "ping", "-c", "3", "-i", "0.2", "-W", "2", "192.0.2.11")
        sh("ip", "netns", "exec", ep_a, "ping", "-6", "-c", "3", "-i", "0.2", "-W", "2", "2001:db8:100::b")
        sh("ip", "netns", "exec", ep_b, "ping", "-c", "2", "-i", "0.2", "-W", "2", "192.0.2.10")
        time.sleep(0.3)

    # Echo requests and replies crossed the tunnel; no ARP/NS for the endpoints did:
    # each bridge answered from its permanent neighbour (neigh_suppress on the vxlan port).
    assert sniffer.vxlan_frames >= 16
    assert sniffer.resolutions == 0
    neigh_a = ip_json(ep_a, "neigh", "show", "dev", "eth0")
    resolved = {e["dst"]: e.get("lladdr") for e in neigh_a}
    assert resolved.get("192.0.2.11") == mac_of(11)
    assert resolved.get("2001:db8:100::b") == mac_of(11)


def test_link_dump_retries_while_links_change(host: str, tmp_path: Any) -> None:
    """Multi-part dumps flagged NLM_F_DUMP_INTR are retried and never lose stable links."""
    stable = [f"vnst{i}" for i in range(300)]
    sh("ip", "-n", host, "-batch", "-", stdin="".join(f"link add {n} type veth peer name {n}p\n" for n in stable))
    expected = set(stable) | {f"{n}p" for n in stable}
    churn_file = tmp_path / "churn.batch"
    churn_file.write_text("link add vnchurn type veth peer name vnchurnp\nlink del vnchurn\n" * 2000)
    churn = subprocess.Popen(["ip", "-n", host, "-batch", str(churn_file)])
    try:
        with rtnl.RtnlSocket(host) as sock:
            dumps = 0
            deadline = time.monotonic() + 20
            while sock.interrupted_dumps < 3 and time.monotonic() < deadline:
                names = {rec.name for rec in sock.dump_links()}
                assert expected <= names
                dumps += 1
            assert sock.interrupted_dumps >= 3, f"only {sock.interrupted_dumps} interrupted passes in {dumps} dumps"
    finally:
        churn.kill()
        churn.wait()


def test_crash_leftover_staging_link_is_ours_and_never_blocks_the_real_name(driver: LinksDriver, host: str) -> None:
    """Links are born under a staging name; a crash mid-create leaves only that, which is cleaned up."""
    # What a crash between 'link add' and marking it would leave: an unmarked staging-named bridge.
    sh("ip", "-n", host, "link", "add", "vnnew0badf00d", "type", "bridge")
    observed = driver.observe()
    assert "vnnew0badf00d" in observed.links, "a staging leftover is recognised as the agent's"
    result = driver.apply([DeleteLink("vnnew0badf00d", "bridge", "leftover"), *segment_ops("198.51.100.1")])
    assert_all_applied(result)
    names = link_names(host)
    assert "vnnew0badf00d" not in names
    assert {"vnbr100", "vnvx100"} <= names
    assert not any(n.startswith("vnnew") for n in names), "no staging name survives a completed create"
    assert driver.observe().links["vnvx100"].master == "vnbr100"
