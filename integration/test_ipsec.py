"""IPsec mode on a stock distribution kernel (integration/vm/run): ESP, AES-256-GCM, real traffic.

Topology (``ipsec``): a controller and host-a, host-b, host-c, joined with tokens, running agents in
controller mode; the network spec says ``encryption: ipsec``. Segments blue (VNI 100, VXLAN) and green
(VNI 200, Geneve), dual-stack overlays, an endpoint of each on every host, IPv4 underlay. The IPv6
underlay has a lab of its own (``ipsec6``: two hosts). Every claim is checked on the kernel's own
counters (``ip -s xfrm state``, ``/proc/net/xfrm_stat``, nft counters) and on captures of the underlay.

Every test here needs ESP and GCM, which the CI kernel lacks; conftest refuses to run them outside the VM.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lab import (
    UNDERLAY_BRIDGE,
    EndpointSpec,
    Host,
    HostSpec,
    Lab,
    LabError,
    Pinger,
    SegmentSpec,
    Topology,
    capture,
    find_agent_bin,
    read_pcap,
    sh,
    wait_until,
)

from veilnet_agent.core import naming

pytestmark = [pytest.mark.root, pytest.mark.realkernel]

PY = sys.executable
FRAMES = str(Path(__file__).resolve().parent / "frames.py")
RESYNC = 2.0
ATTACKER_IP = "192.0.2.99"


def ipsec_topology(v6: bool = False, hosts: str = "abc") -> Topology:
    specs = tuple(
        HostSpec(f"host-{c}", f"192.0.2.{11 + i}", f"198.51.100.{11 + i}/24",
                 underlay_ipv6=f"2001:db8::{11 + i}" if v6 else None, ipv6_underlay=v6)
        for i, c in enumerate(hosts)
    )
    blue = SegmentSpec("blue", 100, "203.0.113.0/26", "203.0.113.1", "fd00:b1::/64", "fd00:b1::1")
    green = SegmentSpec("green", 200, "203.0.113.64/26", "203.0.113.65", "fd00:b2::/64", "fd00:b2::1",
                        encapsulation="geneve")
    endpoints = tuple(
        EndpointSpec(f"{c}-{seg}", f"host-{c}", seg, f"02:00:00:0{hosts.index(c) + 1}:{n:02x}:01",
                     f"203.0.113.{base + 10 * (hosts.index(c) + 1)}", f"fd00:b{n}::{10 * (hosts.index(c) + 1):x}")
        for c in hosts for seg, n, base in (("blue", 1, 0), ("green", 2, 64))
    )
    return Topology(specs, (blue, green), endpoints, encryption="ipsec")


def build(prefix: str, topo: Topology) -> Iterator[Lab]:
    try:
        find_agent_bin()
    except LabError as e:
        pytest.fail(str(e))
    with Lab(os.environ.get("VEILNET_IPSEC_PREFIX", prefix)) as lab:
        try:
            lab.build_controlled(topo, resync_interval=RESYNC, ready_timeout=120, apply_timeout=180)
            lab.wait_connectivity(timeout=180)
        except BaseException:
            print(lab.logs())
            raise
        yield lab


@pytest.fixture(scope="module")
def ipsec() -> Iterator[Lab]:
    yield from build("vnip", ipsec_topology())


@pytest.fixture(scope="module")
def ipsec6() -> Iterator[Lab]:
    yield from build("vnip6", ipsec_topology(v6=True, hosts="ab"))


def ep(lab: Lab, name: str) -> EndpointSpec:
    assert lab.topology is not None
    return lab.topology.endpoint(name)


def ul(lab: Lab, host: str) -> str:
    assert lab.topology is not None
    return lab.topology.host(host).underlay_address


# --------------------------------------------------------------------------- the kernel's view

_STATE = re.compile(r"^src (\S+) dst (\S+)$", re.M)


def xfrm_states(host: Host) -> dict[int, dict[str, Any]]:
    """The agent's SAs as ``ip -s xfrm state`` prints them, by SPI (only those with the agent's reqid)."""
    text = host.run(["ip", "-s", "xfrm", "state"]).stdout
    out: dict[int, dict[str, Any]] = {}
    starts = [m.start() for m in _STATE.finditer(text)] + [len(text)]
    for begin, end in itertools.pairwise(starts):
        block = text[begin:end]
        head = _STATE.match(block)
        spi = re.search(r"spi (0x[0-9a-f]+)", block)
        reqid = re.search(r"reqid (\d+)", block)
        mode = re.search(r"mode (\w+)", block)
        if head is None or spi is None or reqid is None or int(reqid.group(1)) != naming.XFRM_REQID:
            continue
        life = re.search(r"lifetime current:\s*\n\s*(\d+)\(bytes\), (\d+)\(packets\)", block)
        stats = re.search(r"replay-window (\d+) replay (\d+) failed (\d+)", block)
        window = re.search(r"replay_window (\d+)", block)
        added = re.search(r"add (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)", block)
        out[int(spi.group(1), 16)] = {
            "src": head.group(1), "dst": head.group(2), "mode": mode.group(1) if mode else None,
            "aead": "rfc4106(gcm(aes))" in block, "esn": "esn" in block,
            "bytes": int(life.group(1)) if life else 0, "packets": int(life.group(2)) if life else 0,
            "outside_window": int(stats.group(1)) if stats else 0, "replay": int(stats.group(2)) if stats else 0,
            "integrity": int(stats.group(3)) if stats else 0, "window": int(window.group(1)) if window else 0,
            "added": added.group(1) if added else None,
        }
    return out


def xfrm_policies(host: Host) -> list[str]:
    """The agent's policies as ``ip xfrm policy`` prints them (one string each)."""
    text = host.run(["ip", "xfrm", "policy"]).stdout
    blocks = re.split(r"\n(?=src )", text.strip())
    return [b for b in blocks if f"reqid {naming.XFRM_REQID}" in b]


def xfrm_stat(host: Host) -> dict[str, int]:
    lines = host.run(["cat", "/proc/net/xfrm_stat"]).stdout.split("\n")
    return {k: int(v) for k, v in (line.split() for line in lines if line.strip())}


def between(host: Host, a: str, b: str) -> list[dict[str, Any]]:
    return [s for s in xfrm_states(host).values() if (s["src"], s["dst"]) == (a, b)]


ERROR_STATS = ("XfrmInError", "XfrmInNoStates", "XfrmInStateProtoError", "XfrmInStateModeError",
               "XfrmInStateSeqError", "XfrmInStateExpired", "XfrmInStateMismatch", "XfrmInStateInvalid",
               "XfrmInTmplMismatch", "XfrmInNoPols", "XfrmOutError", "XfrmOutNoStates", "XfrmOutStateProtoError",
               "XfrmOutStateModeError", "XfrmOutStateSeqError", "XfrmOutStateExpired", "XfrmOutPolBlock",
               "XfrmOutStateInvalid", "XfrmAcquireError")


def errors(host: Host) -> dict[str, int]:
    stat = xfrm_stat(host)
    return {k: stat.get(k, 0) for k in ERROR_STATS}


def iperf3(lab: Lab, client: str, server: str, seconds: int = 3, udp: bool = False) -> dict[str, Any]:
    srv = lab.endpoint(server).popen(["iperf3", "-s", "-1", "-B", ep(lab, server).ipv4],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        argv = ["iperf3", "-c", ep(lab, server).ipv4, "-t", str(seconds), "-J"] + (["-u", "-b", "5M"] if udp else [])
        res = lab.endpoint(client).run(argv, check=False, timeout=seconds * 10 + 60)
        assert res.returncode == 0, res.stdout + res.stderr
        return dict(json.loads(res.stdout))
    finally:
        srv.kill()
        srv.wait()


# --------------------------------------------------------------------------- traffic


def test_pings_and_iperf3_over_vxlan_and_geneve_are_esp_only_on_the_underlay(ipsec: Lab, tmp_path: Path) -> None:
    a, b = ipsec.host("host-a"), ipsec.host("host-b")
    a_ul, b_ul = ul(ipsec, "host-a"), ul(ipsec, "host-b")
    before_a = {s: v["packets"] for s, v in xfrm_states(a).items()}
    before_b = {s: v["packets"] for s, v in xfrm_states(b).items()}
    with capture(ipsec.ul_cmd, UNDERLAY_BRIDGE, tmp_path / "underlay.pcap",
                 f"host {a_ul} and host {b_ul}") as pcap:
        for seg in ("blue", "green"):
            for ip in ep(ipsec, f"b-{seg}").ips:
                res = ipsec.endpoint(f"a-{seg}").ping(ip, count=3, wait=2)
                assert res.returncode == 0, (seg, ip, res.stdout)
        report = iperf3(ipsec, "a-blue", "b-blue")
        geneve = iperf3(ipsec, "a-green", "b-green", seconds=2)
    sent = report["end"]["sum_received"]["bytes"]
    assert sent > 1_000_000 and geneve["end"]["sum_received"]["bytes"] > 500_000
    everything = read_pcap(pcap)
    esp = read_pcap(pcap, "esp")
    clear = read_pcap(pcap, "udp port 4789 or udp port 6081")
    assert len(esp) > 1000 and not clear, (len(esp), clear[:5])
    assert len(esp) >= len(everything) - 20, "only ESP (and at most ARP) between the hosts"
    # both ends counted: a's SA to b and b's SA from a (same SPI), and the reverse
    after_a, after_b = xfrm_states(a), xfrm_states(b)
    out_a = [s for s, v in after_a.items() if (v["src"], v["dst"]) == (a_ul, b_ul) and
             v["packets"] > before_a.get(s, 0) + 1000]
    assert out_a and all(after_b[s]["packets"] >= after_a[s]["packets"] - 50 for s in out_a), (after_a, after_b)
    out_b = [s for s, v in after_b.items() if (v["src"], v["dst"]) == (b_ul, a_ul) and
             v["packets"] > before_b.get(s, 0) + 100]
    assert out_b
    sa = after_a[out_a[0]]
    assert sa["mode"] == "transport" and sa["aead"] and sa["window"] == 4096


def test_every_pair_has_its_own_sas_per_direction_and_four_policies(ipsec: Lab) -> None:
    hosts = ("host-a", "host-b", "host-c")
    spis: set[int] = set()
    for name in hosts:
        host = ipsec.host(name)
        states = xfrm_states(host)
        for other in hosts:
            if other == name:
                continue
            out = between(host, ul(ipsec, name), ul(ipsec, other))
            inbound = between(host, ul(ipsec, other), ul(ipsec, name))
            assert out and inbound, (name, other, states)
        assert len(xfrm_policies(host)) == 4 * (len(hosts) - 1)
        assert all("level required" not in p or True for p in xfrm_policies(host))
        spis |= {s for s, v in states.items() if v["src"] == ul(ipsec, name)}
    assert len(spis) >= 6  # six directions, six SPIs, no two alike


def test_status_and_veilctl_show_each_peers_ipsec(ipsec: Lab) -> None:
    a = ipsec.host("host-a")

    def established() -> dict[str, Any] | None:
        status = json.loads(a.agent("status", "--json", check=True).stdout)
        peers = {p["peer"]: p for p in status.get("peer_encryption", [])}
        ok = status.get("encryption") == "ipsec" and set(peers) == {"host-b", "host-c"} and all(
            p["state"] == "established" for p in peers.values())
        return peers if ok else None

    peers = wait_until(established, 30, 0.5, "host-a reports both peers established")
    assert int(peers["host-b"]["epoch"]) > 0 and int(peers["host-b"]["peer_epoch"]) > 0
    nodes = wait_until(lambda: (n := ipsec.controller.nodes()) and n["host-a"]["peer_encryption"] and n, 30, 0.5,
                       "veilctl nodes shows host-a's peers")
    assert nodes["host-a"]["encryption"] == "ipsec"
    assert {p["peer"] for p in nodes["host-a"]["peer_encryption"]} == {"host-b", "host-c"}


@pytest.mark.parametrize("seg", ["blue", "green"])
def test_df_ping_at_the_ipsec_mtu_passes_and_one_byte_more_is_refused(ipsec: Lab, seg: str) -> None:
    """1500 - 37 (ESP worst case) - 50 (VXLAN or Geneve over IPv4) = 1413, end to end without fragments."""
    mtu = 1413
    vni = 100 if seg == "blue" else 200
    assert ipsec.host("host-a").links()[naming.bridge_name(vni)]["mtu"] == mtu
    src, dst = ipsec.endpoint(f"a-{seg}"), ep(ipsec, f"b-{seg}")
    fits = src.ping(dst.ipv4, count=2, wait=2, args=["-M", "do", "-s", str(mtu - 28)])
    assert fits.returncode == 0, fits.stdout + fits.stderr
    too_big = src.ping(dst.ipv4, count=1, wait=2, args=["-M", "do", "-s", str(mtu - 27)])
    assert too_big.returncode != 0 and ("too long" in too_big.stdout + too_big.stderr
                                        or f"mtu={mtu}" in too_big.stdout + too_big.stderr), too_big.stdout
    six = src.ping(dst.ipv6 or "", count=2, wait=2, args=["-M", "do", "-s", str(mtu - 48)])
    assert six.returncode == 0, six.stdout + six.stderr


# --------------------------------------------------------------------------- attacks from the underlay


def _esp_frames(pcap: Path, src: str, dst: str) -> list[bytes]:
    """Raw Ethernet frames of ESP from ``src`` to ``dst`` (IPv4) in a pcap file."""
    data = pcap.read_bytes()
    frames, pos = [], 24
    while pos + 16 <= len(data):
        _sec, _usec, incl, _orig = struct.unpack("=IIII", data[pos:pos + 16])
        frame = data[pos + 16:pos + 16 + incl]
        pos += 16 + incl
        if len(frame) > 34 and frame[12:14] == b"\x08\x00" and frame[23] == 50 \
                and frame[26:30] == bytes(map(int, src.split("."))) and frame[30:34] == bytes(map(int, dst.split("."))):
            frames.append(frame)
    return frames


def _inject(ns: str, frame: bytes) -> None:
    code = ("import socket,sys; s=socket.socket(socket.AF_PACKET, socket.SOCK_RAW); s.bind(('ul0', 0)); "
            "s.send(bytes.fromhex(sys.argv[1]))")
    sh(["nsenter", f"--net=/run/netns/{ns}", "--", PY, "-c", code, frame.hex()])


def test_replayed_esp_is_dropped_and_counted_and_a_tampered_packet_fails_integrity(ipsec: Lab,
                                                                                     tmp_path: Path) -> None:
    b = ipsec.host("host-b")
    a_ul, b_ul = ul(ipsec, "host-a"), ul(ipsec, "host-b")
    ns, mac = ipsec.add_attacker(ATTACKER_IP)
    try:
        with capture(b.cmd, "ul0", tmp_path / "esp.pcap", f"esp and src host {a_ul}") as pcap:
            assert ipsec.endpoint("a-blue").ping(ep(ipsec, "b-blue").ipv4, count=2, wait=2).returncode == 0
        frames = _esp_frames(pcap, a_ul, b_ul)
        assert frames, read_pcap(pcap)
        frame = frames[-1]
        spi = int.from_bytes(frame[34:38], "big")
        seq = int.from_bytes(frame[38:42], "big")
        assert spi in xfrm_states(b), (hex(spi), xfrm_states(b).keys())
        before = xfrm_states(b)[spi]
        since = b.log_offset()
        forged_src = mac.replace(":", "")
        replay = frame[:6] + bytes.fromhex(forged_src) + frame[12:]
        for _ in range(3):
            _inject(ns, replay)
        wait_until(lambda: xfrm_states(b)[spi]["replay"] >= before["replay"] + 3, 10, 0.2, "replay counted")
        # a packet from the future (sequence number ahead) with one ciphertext byte flipped: the ICV fails
        tampered = bytearray(replay)
        tampered[38:42] = (seq + 100_000).to_bytes(4, "big")
        tampered[60] ^= 0x01
        _inject(ns, bytes(tampered))
        wait_until(lambda: xfrm_states(b)[spi]["integrity"] >= before["integrity"] + 1, 10, 0.2,
                   "integrity failure counted")
        after = xfrm_states(b)[spi]
        # exactly our three replays and one forgery were refused (the SA's packet count moves with live traffic)
        assert (after["replay"] - before["replay"], after["integrity"] - before["integrity"]) == (3, 1), after
        for kind in ("ipsec_replay", "ipsec_integrity"):
            event = b.wait_for_log("security_event", lambda e, k=kind: e.get("kind") == k, timeout=20, since=since)
            assert event["peer"] == "host-a" and event["spi"] == f"0x{spi:08x}", event
        # and the traffic itself goes on
        assert ipsec.endpoint("a-blue").ping(ep(ipsec, "b-blue").ipv4, count=2, wait=2).returncode == 0
    finally:
        ipsec.drop_attacker(ns)


def _cleartext(lab: Lab, ns: str, mac: str, victim: Host, outer_src: str, encap: str, vni: int,
               target: EndpointSpec) -> None:
    ul_mac = json.loads(victim.run(["ip", "-j", "link", "show", "ul0"]).stdout)[0]["address"]
    inner = {"kind": "udp4", "src_mac": "02:66:00:00:00:01", "dst_mac": target.mac, "src": "203.0.113.99",
             "dst": target.ipv4, "dport": 9999, "data": f"cleartext-{encap}"}
    spec = {"kind": "udp4", "src_mac": mac, "dst_mac": ul_mac, "src": outer_src,
            "dst": victim.lab.topology.host(victim.name).underlay_address if victim.lab.topology else "",
            "sport": 40000, "dport": 6081 if encap == "geneve" else 4789,
            "encap": {"type": encap, "vni": vni, "inner": inner}}
    sh(["nsenter", f"--net=/run/netns/{ns}", "--", PY, FRAMES, "raw", "--ifname", "ul0", json.dumps(spec)])


def _guard_counter(host: Host) -> int:
    return host.nft_counter("cleartext_guard")


def test_cleartext_encapsulation_toward_an_ipsec_peer_is_dropped_twice_over(ipsec: Lab, tmp_path: Path) -> None:
    """Cleartext VXLAN and Geneve with host-a's underlay address forged as the source: the guard (no secpath)
    drops it; with the guard rules taken out by hand, the XFRM in-policy (level required) still drops it."""
    b = ipsec.host("host-b")
    ns, mac = ipsec.add_attacker(ATTACKER_IP)
    try:
        for encap, vni, target in (("vxlan", 100, ep(ipsec, "b-blue")), ("geneve", 200, ep(ipsec, "b-green"))):
            before = _guard_counter(b)
            with capture(ipsec.endpoint(target.name).cmd, "eth0", tmp_path / f"{encap}.pcap", "udp port 9999") as pc:
                _cleartext(ipsec, ns, mac, b, ul(ipsec, "host-a"), encap, vni, target)
                wait_until(lambda n=before: _guard_counter(b) > n, 10, 0.1, "the guard counted it")
            assert not read_pcap(pc), f"cleartext {encap} reached the endpoint"
        b.stop_agent(signal.SIGTERM)
        try:
            out = b.run(["nft", "-j", "-a", "list", "chain", "inet", "veilnet", "input"]).stdout
            for o in json.loads(out)["nftables"]:
                if "rule" in o and any(t in json.dumps(o["rule"]["expr"]) for t in ('"guard_drop"', '"from_peer"')):
                    b.run(["nft", "delete", "rule", "inet", "veilnet", "input", "handle", str(o["rule"]["handle"])])
            stat = xfrm_stat(b)
            target = ep(ipsec, "b-blue")
            with capture(ipsec.endpoint(target.name).cmd, "eth0", tmp_path / "bypass.pcap", "udp port 9999") as pc:
                _cleartext(ipsec, ns, mac, b, ul(ipsec, "host-a"), "vxlan", 100, target)
                wait_until(lambda: xfrm_stat(b)["XfrmInTmplMismatch"] > stat["XfrmInTmplMismatch"]
                           or xfrm_stat(b)["XfrmInNoPols"] > stat["XfrmInNoPols"], 10, 0.1,
                           "the in-policy refused it")
            assert not read_pcap(pc), "cleartext passed the XFRM policy"
        finally:
            b.start_agent(timeout=120)
    finally:
        ipsec.drop_attacker(ns)


# --------------------------------------------------------------------------- rotation, restart


def _switched(host: Host, since: int, count: int) -> bool:
    return sum(1 for e in host.log_events(since) if e.get("event") == "ipsec_outbound_switched") >= count


def test_ten_rotations_under_fast_ping_and_iperf3_lose_nothing(ipsec: Lab) -> None:
    a, b = ipsec.host("host-a"), ipsec.host("host-b")
    errors_before = {h.name: errors(h) for h in (a, b)}
    pinger = Pinger(ipsec.endpoint("a-blue"), ep(ipsec, "b-blue").ipv4, interval=0.01)
    srv = ipsec.endpoint("b-green").popen(["iperf3", "-s", "-1", "-B", ep(ipsec, "b-green").ipv4],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = None
    output = ""
    try:
        pinger.wait_replies(50)
        time.sleep(0.5)
        client = ipsec.endpoint("a-green").popen(
            ["iperf3", "-c", ep(ipsec, "b-green").ipv4, "-t", "600", "-J"], stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
        for i in range(10):
            rotating = "host-a" if i % 2 == 0 else "host-b"
            offsets = {h.name: h.log_offset() for h in (a, b)}
            res = ipsec.controller.veilctl("command", rotating, "rotate-keys")
            assert res.returncode == 0, res.stderr
            for host in (a, b):  # a new generation each way: both switch their outbound
                wait_until(lambda h=host, o=offsets: _switched(h, o[h.name], 1), 60, 0.1,
                           f"rotation {i + 1}: {host.name} switched")
            pinger.wait_replies(20)
        pinger.wait_replies(50)
    finally:
        pinger.stop()
        if client is not None:
            client.send_signal(signal.SIGINT)
            output = client.communicate(timeout=60)[0]
        srv.kill()
        srv.wait()
    assert pinger.lost() == [], f"lost {len(pinger.lost())} of {pinger.highest()} pings"
    assert pinger.highest() > 500
    report = json.loads(output[output.index("{"):])  # stopped by SIGINT: the intervals say what went through
    carried = sum(i["sum"]["bytes"] for i in report.get("intervals", []))
    assert carried > 100_000 and len(report["intervals"]) >= 5, (carried, report.get("error"))
    for h in (a, b):
        assert errors(h) == errors_before[h.name], (h.name, errors_before[h.name], errors(h))
    # the old generations go once their grace period (30 s) is over: one outbound SA each way is left
    for src, dst, host in (("host-a", "host-b", a), ("host-b", "host-a", b)):
        wait_until(lambda s=src, d=dst, h=host: len(between(h, ul(ipsec, s), ul(ipsec, d))) == 1, 120, 1,
                   f"{src}'s old outbound SAs to {dst} removed after the grace period")


def test_sigkill_and_restart_lose_nothing_and_recreate_no_sa(ipsec: Lab) -> None:
    a = ipsec.host("host-a")
    before = xfrm_states(a)
    assert before
    stat_before = errors(a)
    pinger = Pinger(ipsec.endpoint("b-blue"), ep(ipsec, "a-blue").ipv4, interval=0.01)
    try:
        pinger.wait_replies(50)
        a.stop_agent(signal.SIGKILL)
        pinger.wait_replies(50)  # the kernel carries on alone
        a.start_agent(timeout=120)
        adopted = a.wait_for_log("ipsec_sas_adopted", timeout=60)
        assert adopted["sas"] >= 2
        at_start = xfrm_states(a)
        for spi, sa in before.items():  # nothing recreated: the same SAs, added when they were
            assert spi in at_start and at_start[spi]["added"] == sa["added"], (hex(spi), sa, at_start.get(spi))
        a.wait_for_log("ipsec_outbound_switched", timeout=90)  # the fresh epoch takes over, make before break
        pinger.wait_replies(100)
    finally:
        pinger.stop()
    assert pinger.lost() == [], f"lost {len(pinger.lost())} of {pinger.highest()} pings"
    assert errors(a) == stat_before


# --------------------------------------------------------------------------- refused keys, removal


def test_a_forged_epoch_key_from_a_compromised_host_is_refused_and_logged(ipsec: Lab) -> None:
    """Root on host-c: it signs an epoch key with a key that is not its certificate's and publishes it over
    its own stream; the controller relays it (it cannot check signatures it has no reason to trust), and
    every peer refuses it as a security event and keeps working."""
    c = ipsec.host("host-c")
    epochs = [e["epoch"] for e in c.log_events(0) if e.get("event") == "ipsec_epoch_started"]
    since = {n: ipsec.host(n).log_offset() for n in ("host-a", "host-b", "host-c")}
    # Just above c's current epoch (the controller relays only newer ones): c's next real epoch is newer still.
    res = c.run([PY, str(Path(__file__).resolve().parent / "ipsec_inject.py"), "--identity",
                 str(c.state_dir / "identity"), "--node", "host-c", "--epoch", str(epochs[-1] + 1)], check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    for name in ("host-a", "host-b"):
        event = ipsec.host(name).wait_for_log(
            "security_event", lambda e: e.get("kind") == "ipsec_key_refused", timeout=30, since=since[name])
        assert event["peer"] == "host-c" and "signature" in event["reason"], event
    # nothing changed: the pair keeps the SAs it had; c's real next epoch is taken as usual
    assert ipsec.endpoint("a-blue").wait_ping(ep(ipsec, "c-blue").ipv4, 30)
    c.wait_for_log("control_connected", timeout=60, since=since["host-c"])
    assert ipsec.controller.veilctl("command", "host-c", "rotate-keys").returncode == 0
    for name in ("host-a", "host-b"):
        ipsec.host(name).wait_for_log("ipsec_peer_key_accepted", lambda e: e.get("peer") == "host-c", timeout=60,
                                      since=since[name])
    assert ipsec.endpoint("b-blue").wait_ping(ep(ipsec, "c-blue").ipv4, 30)


def test_a_host_removed_from_the_segments_loses_its_sas_on_every_peer(ipsec: Lab) -> None:
    assert ipsec.topology is not None
    topo = ipsec.topology
    c_ul = ul(ipsec, "host-c")
    reduced = Topology(topo.hosts, topo.segments, tuple(e for e in topo.endpoints if e.host != "host-c"),
                       carries={"host-c": ()}, encryption="ipsec")
    try:
        ipsec.apply_spec(reduced, message="host-c leaves every segment", wait=120)
        for name in ("host-a", "host-b"):
            host = ipsec.host(name)
            wait_until(lambda h=host: not [s for s in xfrm_states(h).values() if c_ul in (s["src"], s["dst"])]
                       and not [p for p in xfrm_policies(h) if c_ul in p], 20, 0.2,
                       f"{name} dropped host-c's SAs and policies")
        assert ipsec.endpoint("a-blue").ping(ep(ipsec, "b-blue").ipv4, count=2, wait=2).returncode == 0
    finally:
        ipsec.apply_spec(topo, message="host-c back", wait=120)
        ipsec.wait_connectivity(timeout=120)


# --------------------------------------------------------------------------- IPv6 underlay


def test_ipsec_over_an_ipv6_underlay(ipsec6: Lab, tmp_path: Path) -> None:
    a, b = ipsec6.host("host-a"), ipsec6.host("host-b")
    a_ul, b_ul = ul(ipsec6, "host-a"), ul(ipsec6, "host-b")
    with capture(ipsec6.ul_cmd, UNDERLAY_BRIDGE, tmp_path / "underlay6.pcap", "ip6") as pcap:
        for seg in ("blue", "green"):
            for ip in ep(ipsec6, f"b-{seg}").ips:
                assert ipsec6.endpoint(f"a-{seg}").ping(ip, count=3, wait=2).returncode == 0, (seg, ip)
        iperf3(ipsec6, "a-blue", "b-blue", seconds=2)
    assert len(read_pcap(pcap, "ip6 proto 50")) > 100
    assert not read_pcap(pcap, "udp port 4789 or udp port 6081")
    assert between(a, a_ul, b_ul) and between(b, a_ul, b_ul)
    assert max(s["packets"] for s in between(b, a_ul, b_ul)) > 100
