"""End to end over an IPv6 underlay with IPv6 WireGuard transport addresses.

Two real agents; every outer header is IPv6, so the segment MTU is the
smallest the agent computes: 1500 - 80 (WireGuard over IPv6) - 70 (VXLAN over
IPv6) = 1350. Real traffic, real kernel objects.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from lab import WG_PORT, Lab, capture, ipv6_topology, read_pcap, wait_until

pytestmark = pytest.mark.root

SEGMENT_MTU = 1500 - 80 - 70


@pytest.fixture(scope="module")
def lab6() -> Iterator[Lab]:
    with Lab("vne6") as lab:
        try:
            lab.build(ipv6_topology(), resync_interval=1.0)
            lab.wait_connectivity(timeout=30)
        except BaseException:
            print(lab.logs())
            raise
        yield lab


def _ping(lab: Lab, src: str, dst: str, *args: str) -> bool:
    return lab.endpoint(src).ping(dst, count=2, wait=1, args=("-i", "0.2", *args)).returncode == 0


@pytest.mark.vm  # also in the real-kernel suite (integration/vm): kernel WireGuard
def test_ipv6_underlay_and_transport_carry_both_families(lab6: Lab, tmp_path: Path) -> None:
    a = lab6.host("host-a")
    peers = a.wg_peers()
    assert [p["endpoints"] for p in peers.values()] == [f"[2001:db8::22]:{WG_PORT}"]
    vxlan = json.loads(a.run(["ip", "-j", "-d", "link", "show", "vnvx100"]).stdout)[0]
    info = vxlan["linkinfo"]["info_data"]
    assert info.get("local6", info.get("local")) == "fd00:7::21", info
    pcap = tmp_path / "ul0.pcap"
    with capture(a.cmd, "ul0", pcap):
        assert _ping(lab6, "a-web", "203.0.113.20")
        assert _ping(lab6, "a-web", "fd00:b1::20")
        assert _ping(lab6, "b-web", "203.0.113.10")
    wireguard = read_pcap(pcap, f"ip6 and udp port {WG_PORT}")
    assert len(wireguard) >= 12, read_pcap(pcap)[:20]
    # The underlay's own IPv6 neighbour discovery and MLD are allowed; nothing of the overlay is.
    underlay_control = ("neighbor solicitation", "neighbor advertisement", "router solicitation",
                        "multicast listener report")
    other = [line for line in read_pcap(pcap, f"(ip or ip6) and not (ip6 and udp port {WG_PORT})")
             if not any(kind in line for kind in underlay_control)]
    assert other == [], other


@pytest.mark.vm  # also in the real-kernel suite (integration/vm): kernel WireGuard
def test_ipv6_overheads_give_mtu_1350_without_fragmentation(lab6: Lab) -> None:
    a, b = lab6.host("host-a"), lab6.host("host-b")
    eth0 = json.loads(lab6.endpoint("a-web").run(["ip", "-j", "link", "show", "eth0"]).stdout)[0]
    assert eth0["mtu"] == SEGMENT_MTU
    wg = json.loads(a.run(["ip", "-j", "link", "show", "vnwg0"]).stdout)[0]
    assert wg["mtu"] == 1500 - 80
    before = [h.snmp_counter(t, n) for h in (a, b) for t, n in (("Ip", "FragCreates"), ("Ip6", "Ip6FragCreates"))]
    assert _ping(lab6, "a-web", "203.0.113.20", "-M", "do", "-s", str(SEGMENT_MTU - 28))
    assert _ping(lab6, "a-web", "fd00:b1::20", "-M", "do", "-s", str(SEGMENT_MTU - 48))
    assert not _ping(lab6, "a-web", "203.0.113.20", "-M", "do", "-s", str(SEGMENT_MTU - 27))
    after = [h.snmp_counter(t, n) for h in (a, b) for t, n in (("Ip", "FragCreates"), ("Ip6", "Ip6FragCreates"))]
    assert after == before, "a host fragmented packets"


def test_yaml_state_file_and_sighup_reload(lab6: Lab) -> None:
    """The agent reads YAML; SIGHUP re-reads even when the file's inode, size and mtime are unchanged."""
    import os

    import yaml

    b = lab6.host("host-b")
    state = json.loads(b.state_path.read_text())
    b.stop_agent()
    yaml_path = b.dir / "state.yaml"
    state["peers"][0]["keepalive"] = 25
    yaml_path.write_text(yaml.safe_dump(state, sort_keys=False))
    json_path, b.state_path = b.state_path, yaml_path
    try:
        b.start_agent()
        peer = next(iter(b.wg_peers()))
        assert f"peer: {peer}" in b.wg_show()
        assert "persistent keepalive: every 25 seconds" in b.wg_show()

        # Same size, same inode, same mtime: only SIGHUP can make the agent notice.
        before = yaml_path.stat()
        state["peers"][0]["keepalive"] = 15
        text = yaml.safe_dump(state, sort_keys=False)
        assert len(text) == before.st_size
        with open(yaml_path, "r+") as f:
            f.write(text)
        os.utime(yaml_path, ns=(before.st_atime_ns, before.st_mtime_ns))
        after = yaml_path.stat()
        assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
        mark = b.log_offset()
        b.sighup()
        b.wait_for_log("state_accepted", timeout=10, since=mark)
        # state_accepted is logged before the apply: wait for the peer to show the new value.
        wait_until(lambda: "persistent keepalive: every 15 seconds" in b.wg_show(), 10,
                   what="keepalive 15 applied after SIGHUP")
        assert lab6.endpoint("b-web").wait_ping("203.0.113.10", 10)
    finally:
        b.stop_agent()
        b.state_path = json_path
        b.start_agent()
