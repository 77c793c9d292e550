"""On a stock distribution kernel (integration/vm/run): kernel WireGuard, Geneve, mixed backends, MTUs.

Topology (``rk``): host-a runs wireguard-go (backend userspace), host-b the kernel module (backend
kernel), host-c whatever ``auto`` picks (the kernel module: it is there). Segments blue (VNI 100, VXLAN)
and green (VNI 200, Geneve), both dual-stack and ``isolated``, on every host, with an endpoint of each
on every host. The MTU matrix uses labs of its own (``mtu4``/``mtu6``: an IPv4 and an IPv6 underlay),
each with one kernel pair and one wireguard-go pair.

Every test here needs modules the CI kernel lacks; conftest refuses to run them outside the VM.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lab import (
    EndpointSpec,
    Host,
    HostSpec,
    Lab,
    LabError,
    SegmentSpec,
    Topology,
    capture,
    find_agent_bin,
    read_pcap,
    sh,
    wait_until,
)

from veilnet_agent.core import mtu as mtu_math
from veilnet_agent.core import naming
from veilnet_agent.core.encryption import WIREGUARD

pytestmark = [pytest.mark.root, pytest.mark.realkernel]

PY = sys.executable
FRAMES = str(Path(__file__).resolve().parent / "frames.py")
BACKENDS = {"host-a": "userspace", "host-b": "kernel", "host-c": "auto"}
RESYNC = 2.0
ATTACKER_IP = "192.0.2.99"


def rk_topology() -> Topology:
    hosts = tuple(HostSpec(f"host-{c}", f"192.0.2.{11 + i}", f"198.51.100.{11 + i}/24") for i, c in enumerate("abc"))
    blue = SegmentSpec("blue", 100, "203.0.113.0/26", "203.0.113.1", "fd00:b1::/64", "fd00:b1::1")
    green = SegmentSpec("green", 200, "203.0.113.64/26", "203.0.113.65", "fd00:b2::/64", "fd00:b2::1",
                        encapsulation="geneve")
    e = EndpointSpec
    endpoints = tuple(
        e(f"{c}-{seg}", f"host-{c}", seg, f"02:00:00:0{'abc'.index(c) + 1}:{n:02x}:01",
          f"203.0.113.{base + 10 * ('abc'.index(c) + 1)}", f"fd00:b{n}::{10 * ('abc'.index(c) + 1):x}")
        for c in "abc" for seg, n, base in (("blue", 1, 0), ("green", 2, 64))
    )
    return Topology(hosts, (blue, green), endpoints)


def build(lab: Lab, topo: Topology, backends: dict[str, str]) -> None:
    """Build with a backend per host (``auto`` unless named), then wait until every pair answers."""
    lab.build(topo, resync_interval=RESYNC, start_agents=False)
    for spec in topo.hosts:
        lab.host(spec.name).write_config(resync_interval=RESYNC, backend=backends.get(spec.name, "auto"),
                                         listen_port=spec.listen_port, underlay_address=spec.underlay_address)
    lab.start_agents(ready_timeout=120)
    lab.wait_connectivity(timeout=120)


@pytest.fixture(scope="module")
def rk() -> Iterator[Lab]:
    try:
        find_agent_bin()
    except LabError as e:
        pytest.fail(str(e))
    with Lab(os.environ.get("VEILNET_RK_PREFIX", "vnrk")) as lab:
        try:
            build(lab, rk_topology(), BACKENDS)
        except BaseException:
            print(lab.logs())
            raise
        yield lab


def ep(lab: Lab, name: str) -> EndpointSpec:
    assert lab.topology is not None
    return lab.topology.endpoint(name)


def link_kind(host: Host, name: str) -> str | None:
    return host.links()[name].get("linkinfo", {}).get("info_kind")


def port_flags(host: Host) -> dict[str, dict[str, Any]]:
    return {p["ifname"]: p for p in json.loads(host.run(["bridge", "-j", "-d", "link"]).stdout or "[]")}


# --------------------------------------------------------------------------- backends


def test_auto_picks_the_kernel_module_and_says_which_backend_it_uses(rk: Lab) -> None:
    kinds = {name: link_kind(rk.host(name), naming.WG_IFNAME) for name in BACKENDS}
    assert kinds == {"host-a": "tun", "host-b": "wireguard", "host-c": "wireguard"}, kinds
    for name, backend in (("host-a", "userspace"), ("host-b", "kernel"), ("host-c", "kernel")):
        event = rk.host(name).wait_for_log("wireguard_interface_created", since=0, timeout=5)
        assert event["backend"] == backend, (name, event)


def test_mixed_backends_interoperate_in_both_families_and_encapsulations(rk: Lab) -> None:
    """wireguard-go on host-a and the kernel module on host-b and host-c: every pair, v4 and v6, both segments."""
    for seg in ("blue", "green"):
        for src in "abc":
            for dst in "abc":
                if src != dst:
                    target = ep(rk, f"{dst}-{seg}")
                    for ip in target.ips:
                        assert rk.endpoint(f"{src}-{seg}").wait_ping(ip, 20), f"{src}-{seg} -> {ip}"
    for name in BACKENDS:  # each host completed a handshake with both others
        handshakes = [int(p.get("latest_handshakes", "0")) for p in rk.host(name).wg_peers().values()]
        assert len(handshakes) == 2 and all(h > 0 for h in handshakes), (name, handshakes)


# --------------------------------------------------------------------------- Geneve


def test_geneve_ports_are_programmed_like_vxlan_ports(rk: Lab) -> None:
    """One Geneve device per peer (Geneve has no FDB of its own), each a port of the green bridge with
    learning off, ARP/ND suppression on and no IPv6 of its own; every remote endpoint's MAC is a static FDB
    entry on its peer's port and a permanent neighbour on the bridge."""
    assert rk.topology is not None
    b = rk.host("host-b")
    links = b.links()
    geneve = {name: link for name, link in links.items() if link.get("linkinfo", {}).get("info_kind") == "geneve"}
    remotes = {link["linkinfo"]["info_data"].get("remote") for link in geneve.values()}
    assert remotes == {"198.51.100.11", "198.51.100.13"}, geneve
    assert all(link.get("master") == "vnbr200" for link in geneve.values())
    assert all(link["linkinfo"]["info_data"]["id"] == 200 for link in geneve.values())
    flags = port_flags(b)
    for name in geneve:
        assert (flags[name]["learning"], flags[name]["neigh_suppress"]) == (False, True), flags[name]
        assert flags[name]["isolated"] is True, flags[name]  # split horizon between peers
        assert b.run(["cat", f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6"]).stdout.strip() == "1"
    fdb = json.loads(b.run(["bridge", "-j", "fdb", "show", "br", "vnbr200"]).stdout)
    for peer, port in ((c, naming.geneve_name(200, f"host-{c}")) for c in "ac"):
        remote_mac = ep(rk, f"{peer}-green").mac
        assert any(e["mac"] == remote_mac and e["ifname"] == port and e.get("state") == "static" for e in fdb), fdb
    neigh = json.loads(b.run(["ip", "-j", "neigh", "show", "dev", "vnbr200", "nud", "permanent"]).stdout)
    assert {n["dst"] for n in neigh} >= {"203.0.113.74", "203.0.113.94", "fd00:b2::a", "fd00:b2::1e"}, neigh


def test_a_broadcast_reaches_every_other_host_once_and_is_never_relayed(rk: Lab, tmp_path: Path) -> None:
    """Three hosts in a full mesh of Geneve ports: a broadcast from c-green reaches a-green and b-green exactly
    once each, and host-a never relays it on to host-b (isolated ports: the split horizon). Without it the
    first broadcast circled the mesh for ever and livelocked every host's softirq."""
    count = 3
    a, b = rk.host("host-a"), rk.host("host-b")
    relay = naming.geneve_name(200, "host-b")
    with capture(rk.endpoint("a-green").cmd, "eth0", tmp_path / "a.pcap", "icmp") as at_a, \
            capture(rk.endpoint("b-green").cmd, "eth0", tmp_path / "b.pcap", "icmp") as at_b, \
            capture(a.cmd, relay, tmp_path / "relay.pcap") as relayed:
        rk.endpoint("c-green").run(["ping", "-n", "-b", "-c", str(count), "-i", "0.3", "-W", "1", "203.0.113.127"],
                                   check=False, timeout=30)
    for pcap, host in ((at_a, "a-green"), (at_b, "b-green")):
        requests = [line for line in read_pcap(pcap) if "203.0.113.127: ICMP echo request" in line]
        assert len(requests) == count, f"{host} saw {len(requests)} of {count} broadcasts:\n" + "\n".join(requests)
    relayed_requests = [line for line in read_pcap(relayed) if "203.0.113.127" in line]
    assert not relayed_requests, relayed_requests
    assert b.agent_running() and a.agent_running()


def test_neighbour_discovery_for_remote_endpoints_stays_on_the_host(rk: Lab, tmp_path: Path) -> None:
    """With suppression on the Geneve ports, ARP and neighbour solicitations for b-green are answered by
    host-a's bridge: none goes out of a Geneve device, while the echo requests themselves do."""
    a = rk.host("host-a")
    port = naming.geneve_name(200, "host-b")
    target = ep(rk, "b-green")
    assert target.ipv6
    rk.endpoint("a-green").run(["ip", "neigh", "flush", "dev", "eth0"])
    with capture(a.cmd, port, tmp_path / "geneve.pcap") as pcap:
        assert rk.endpoint("a-green").wait_ping(target.ipv4, 10)
        assert rk.endpoint("a-green").wait_ping(target.ipv6, 10)
    seen = read_pcap(pcap)
    assert any("echo request" in line for line in seen), f"control: the echo requests went out:\n{seen}"
    asked = [line for line in seen if f"who-has {target.ipv4}" in line or f"who has {target.ipv6}" in line]
    assert not asked, asked


def test_a_segment_changing_encapsulation_replaces_only_its_devices(rk: Lab) -> None:
    """blue goes from VXLAN to Geneve: its VXLAN device is replaced by one Geneve device per peer, traffic
    is back after the first reconcile, and nothing else (green's devices, every veth, the bridges, the
    WireGuard interface) is recreated. Then back again."""
    assert rk.topology is not None
    orig = rk.topology
    hosts = {name: rk.host(name) for name in BACKENDS}
    before = {name: h.ifindexes("vn") for name, h in hosts.items()}
    blue = orig.segment("blue")
    try:
        for target_encap, gone_prefix in (("geneve", "vnvx100"), ("vxlan", None)):
            marks = {name: h.log_offset() for name, h in hosts.items()}
            topo = orig.with_segment("blue", encapsulation=target_encap)
            rk.apply_topology(topo)
            for name, h in hosts.items():
                h.wait_for_log("reconciled", since=marks[name], timeout=60,
                               predicate=lambda ev: ev.get("failed") == 0 and ev.get("ops", 0) > 0)
            for src, dst in (("a-blue", "b-blue"), ("b-blue", "c-blue"), ("c-blue", "a-blue")):
                for ip in ep(rk, dst).ips:
                    assert rk.endpoint(src).wait_ping(ip, 20), f"{src} -> {ip} after blue became {target_encap}"
            for name, h in hosts.items():
                now = h.ifindexes("vn")
                peers = [p for p in BACKENDS if p != name]
                blue_geneve = {naming.geneve_name(blue.vni, p) for p in peers}
                if gone_prefix:
                    assert gone_prefix not in now and blue_geneve <= set(now), (name, sorted(now))
                else:
                    assert "vnvx100" in now and not blue_geneve & set(now), (name, sorted(now))
                kept = {k: v for k, v in before[name].items() if k != "vnvx100" and k not in blue_geneve}
                assert {k: now.get(k) for k in kept} == kept, f"{name}: other devices were recreated"
    finally:
        rk.apply_topology(orig)
    rk.wait_connectivity(timeout=60)


# --------------------------------------------------------------------------- the cleartext guard on Geneve


def _attacker(lab: Lab, v6: bool = False) -> tuple[str, str]:
    return lab.add_attacker(ATTACKER_IP, v6)


def _drop_attacker(lab: Lab, ns: str) -> None:
    lab.drop_attacker(ns)


def _input_rule_handles(host: Host, target: str) -> list[int]:
    out = host.run(["nft", "-j", "-a", "list", "chain", "inet", "veilnet", "input"]).stdout
    return [o["rule"]["handle"] for o in json.loads(out)["nftables"]
            if "rule" in o and f'"target": "{target}"' in json.dumps(o["rule"]["expr"])]


def _counter(host: Host, name: str) -> int:
    return host.nft_counter(name)


def cleartext_probe(lab: Lab, ns: str, src_mac: str, victim: Host, victim_ul_mac: str, outer_src: str,
                    outer_dst: str, encap: str, vni: int, inner: dict[str, Any]) -> None:
    """An encapsulated frame in the clear, with a peer's transport address forged as its outer source."""
    kind = "udp6" if ":" in outer_dst else "udp4"
    spec = {"kind": kind, "src_mac": src_mac, "dst_mac": victim_ul_mac, "src": outer_src, "dst": outer_dst,
            "sport": 40000, "dport": 6081 if encap == "geneve" else 4789,
            "encap": {"type": encap, "vni": vni, "inner": inner}}
    sh(["nsenter", f"--net=/run/netns/{ns}", "--", PY, FRAMES, "raw", "--ifname", "ul0", json.dumps(spec)])


def assert_guarded(lab: Lab, victim: Host, endpoint: str, encap: str, vni: int, outer_src: str, outer_dst: str,
                   tmp_path: Path, v6: bool = False) -> None:
    """The forged cleartext packet is dropped by the guard; with the guard and the peer check removed by
    hand (agent stopped), the very same packet reaches the endpoint: the probe is valid and the guard is
    what stops it. The agent puts both rules back when it starts."""
    ns, mac = _attacker(lab, v6)
    try:
        ul_mac = json.loads(victim.run(["ip", "-j", "link", "show", "ul0"]).stdout)[0]["address"]
        tmp_path.mkdir(parents=True, exist_ok=True)
        target = ep(lab, endpoint)
        inner = {"kind": "udp4", "src_mac": "02:66:00:00:00:01", "dst_mac": target.mac, "src": "203.0.113.99",
                 "dst": target.ipv4, "dport": 9999, "data": f"cleartext-{encap}-{vni}"}
        before = _counter(victim, "cleartext_guard")
        with capture(lab.endpoint(endpoint).cmd, "eth0", tmp_path / "guarded.pcap", "udp port 9999") as pcap:
            cleartext_probe(lab, ns, mac, victim, ul_mac, outer_src, outer_dst, encap, vni, inner)
            wait_until(lambda: _counter(victim, "cleartext_guard") > before, 10, 0.1, "cleartext_guard counted it")
        assert not read_pcap(pcap), "a cleartext packet reached the endpoint through the guard"
        victim.stop_agent(signal.SIGTERM)
        try:
            for rule in ("guard_drop", "from_peer"):
                for handle in _input_rule_handles(victim, rule):
                    victim.run(["nft", "delete", "rule", "inet", "veilnet", "input", "handle", str(handle)])
            with capture(lab.endpoint(endpoint).cmd, "eth0", tmp_path / "bypass.pcap", "udp port 9999") as pcap:
                cleartext_probe(lab, ns, mac, victim, ul_mac, outer_src, outer_dst, encap, vni, inner)
                wait_until(lambda: read_pcap(pcap), 10, 0.2, "positive control: the probe reaches the endpoint")
        finally:
            victim.start_agent(timeout=120)
        wait_until(lambda: _input_rule_handles(victim, "guard_drop") and _input_rule_handles(victim, "from_peer"),
                   30, 0.2, "guard rules restored")
    finally:
        _drop_attacker(lab, ns)


def test_cleartext_geneve_with_a_forged_peer_source_is_dropped(rk: Lab, tmp_path: Path) -> None:
    """Geneve devices accept packets whose outer source is their remote: an attacker on the underlay forges
    host-a's transport address as the source of cleartext Geneve sent to host-b's underlay address."""
    b = rk.host("host-b")
    assert_guarded(rk, b, "b-green", "geneve", 200, "198.51.100.11", "198.51.100.12", tmp_path)


# --------------------------------------------------------------------------- MTU, per combination


def mtu_topology(v6_underlay: bool) -> Topology:
    """Two pairs of hosts (a,b: kernel module; c,d: wireguard-go), a VXLAN and a Geneve segment."""
    if v6_underlay:
        hosts = tuple(HostSpec(f"host-{c}", f"192.0.2.{21 + i}", f"fd00:7::{21 + i}/64", f"2001:db8::{21 + i}",
                               ipv6_underlay=True) for i, c in enumerate("abcd"))
    else:
        hosts = tuple(HostSpec(f"host-{c}", f"192.0.2.{21 + i}", f"198.51.100.{21 + i}/24")
                      for i, c in enumerate("abcd"))
    vx = SegmentSpec("vx", 100, "203.0.113.0/26", "203.0.113.1", "fd00:b1::/64", "fd00:b1::1")
    gn = SegmentSpec("gn", 200, "203.0.113.64/26", "203.0.113.65", "fd00:b2::/64", "fd00:b2::1",
                     encapsulation="geneve")
    e = EndpointSpec
    endpoints = tuple(
        e(f"{c}-{seg}", f"host-{c}", seg, f"02:00:00:1{'abcd'.index(c)}:{n:02x}:01",
          f"203.0.113.{base + 10 + 'abcd'.index(c)}", f"fd00:b{n}::{10 + 'abcd'.index(c):x}")
        for c in "abcd" for seg, n, base in (("vx", 1, 0), ("gn", 2, 64))
    )
    return Topology(hosts, (vx, gn), endpoints)


MTU_BACKENDS = {"host-a": "kernel", "host-b": "kernel", "host-c": "userspace", "host-d": "userspace"}


@pytest.fixture(scope="module", params=["ipv4", "ipv6"], ids=["ipv4-underlay", "ipv6-underlay"])
def mtu_lab(request: pytest.FixtureRequest) -> Iterator[tuple[Lab, bool]]:
    v6 = request.param == "ipv6"
    with Lab(f"vnmtu{6 if v6 else 4}") as lab:
        try:
            build(lab, mtu_topology(v6), MTU_BACKENDS)
        except BaseException:
            print(lab.logs())
            raise
        yield lab, v6


def _ping(lab: Lab, src: str, dst: str, size: int) -> Any:
    return lab.endpoint(src).run(["ping", "-n", "-c", "2", "-W", "3", "-M", "do", "-s", str(size), dst],
                                 check=False, timeout=30)


MTU_RESULTS: dict[tuple[str, str, str], int] = {}


@pytest.mark.parametrize("backend", ["kernel", "wireguard-go"])
@pytest.mark.parametrize("encap", ["vxlan", "geneve"])
def test_df_ping_at_the_computed_mtu_passes_and_one_byte_more_is_refused(
    mtu_lab: tuple[Lab, bool], encap: str, backend: str
) -> None:
    """For each encapsulation, underlay family and backend: the endpoint's MTU is what the arithmetic says;
    a don't-fragment ping that fills it crosses, in both inner families; one byte more is refused at the
    sender, which is told the MTU (nothing leaves to be dropped silently on the path); and no host
    fragments anything on the way."""
    lab, v6 = mtu_lab
    family = 6 if v6 else 4
    expected = mtu_math.segment_mtu(1500, family, encap, family, WIREGUARD)  # type: ignore[arg-type]
    seg = "vx" if encap == "vxlan" else "gn"
    src, dst = ("a", "b") if backend == "kernel" else ("c", "d")
    eth0 = json.loads(lab.endpoint(f"{src}-{seg}").run(["ip", "-j", "link", "show", "eth0"]).stdout)[0]
    assert eth0["mtu"] == expected
    target = ep(lab, f"{dst}-{seg}")
    assert target.ipv6
    counters = [("Ip", "FragCreates"), ("Ip6", "Ip6FragCreates")]
    before = [lab.host(h).snmp_counter(t, n) for h in (f"host-{src}", f"host-{dst}") for t, n in counters]
    assert lab.endpoint(f"{src}-{seg}").wait_ping(target.ipv4, 20)
    for ip, headers in ((target.ipv4, 28), (target.ipv6, 48)):
        fits = _ping(lab, f"{src}-{seg}", ip, expected - headers)
        assert fits.returncode == 0, f"{encap}/{backend}: DF ping of {expected} bytes to {ip}:\n{fits.stdout}"
        over = _ping(lab, f"{src}-{seg}", ip, expected - headers + 1)
        assert over.returncode != 0, over.stdout
        said = over.stdout + over.stderr
        assert re.search(rf"mtu[=:]\s*{expected}\b", said), f"the sender was not told the MTU:\n{said}"
    after = [lab.host(h).snmp_counter(t, n) for h in (f"host-{src}", f"host-{dst}") for t, n in counters]
    assert after == before, "a host fragmented packets"
    MTU_RESULTS[("IPv6" if v6 else "IPv4", encap, backend)] = expected


@pytest.mark.parametrize("mtu_lab", ["ipv6"], indirect=True, ids=["ipv6-underlay"])
def test_cleartext_guard_over_an_ipv6_underlay(mtu_lab: tuple[Lab, bool], tmp_path: Path) -> None:
    """The same forgery over an IPv6 underlay, for VXLAN and Geneve: the outer source is host-a's IPv6
    transport address, the destination host-b's (the weak host model accepts it on the underlay)."""
    lab, v6 = mtu_lab
    assert v6
    b = lab.host("host-b")
    for encap, vni, endpoint in (("vxlan", 100, "b-vx"), ("geneve", 200, "b-gn")):
        assert_guarded(lab, b, endpoint, encap, vni, "fd00:7::21", "fd00:7::22", tmp_path / encap, v6=True)
