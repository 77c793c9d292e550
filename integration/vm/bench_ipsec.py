#!/usr/bin/env python3
"""IPsec (ESP transport, objects made by ``drivers.xfrm.XfrmDriver``) on a real kernel: set-up time and throughput.

Run (it boots the VM itself, like bench_throughput.py):

    .venv/bin/python integration/vm/bench_ipsec.py [--seconds 5] [--results DIR]

or inside a VM you boot yourself:

    integration/vm/run --results /tmp/ipsec-bench -- .venv/bin/python integration/vm/bench_ipsec.py --inner

Prints one table:
  * establish N = 10, 100, 500 peers (per peer 2 SAs + 4 policies: out and in for UDP 4789 and 6081) with ONE
    ``XfrmDriver.apply`` of one ``SyncXfrm``, against the floor: the same objects in one ``ip -batch`` file
    (``xfrm state add`` / ``xfrm policy update``), in the same namespace and boot, ours flushed between runs
    (only our reqid); best of 3 each, and the ratio driver / floor;
  * one peer's rotation at N = 500: add its 2 new SAs, later delete its 2 old ones (time, netlink requests);
  * iperf3 TCP (``--seconds``, default 5 s) between two endpoints over VXLAN on a veth underlay: plain VXLAN,
    VXLAN + ESP transport on the VXLAN UDP (SAs and policies applied by the driver on both hosts; endpoint
    MTU 1400 so that VXLAN + ESP fits a 1500 underlay without fragments), VXLAN + kernel WireGuard (the agent,
    as bench_throughput.py runs it); ratios against plain VXLAN.
Under TCG every number is far below real hardware; the ratios are what the table is for. Never asserts.
The ``ip -batch`` file holds keys: it lives in a private temporary directory and is deleted at once.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "agent"))

from veilnet_agent.core.naming import XFRM_REQID  # noqa: E402
from veilnet_agent.core.objects import XfrmPolicy, XfrmSa  # noqa: E402
from veilnet_agent.core.ops import SyncXfrm  # noqa: E402
from veilnet_agent.drivers.xfrm import XfrmDriver  # noqa: E402

NS = f"vnxb-{os.getpid()}"
LOCAL = "192.0.2.1"
PORTS = (4789, 6081)
SIZES = (10, 100, 500)
REPEATS = 3


def sh(cmd: str) -> None:
    subprocess.run(cmd, shell=True, check=True, capture_output=True)


def peer_addr(i: int) -> str:
    return f"198.18.{i // 250}.{i % 250 + 1}"  # RFC 2544 benchmarking range


def objects(n: int, generation: int = 0) -> SyncXfrm:
    sas: list[XfrmSa] = []
    policies: list[XfrmPolicy] = []
    for i in range(n):
        peer = peer_addr(i)
        sas += [XfrmSa(LOCAL, peer, 0x100000 * (generation + 1) + 2 * i, os.urandom(36)),
                XfrmSa(peer, LOCAL, 0x100000 * (generation + 1) + 2 * i + 1, os.urandom(36))]
        for port in PORTS:
            policies += [XfrmPolicy("out", LOCAL, peer, port), XfrmPolicy("in", peer, LOCAL, port)]
    return SyncXfrm(add_sas=tuple(sas), set_policies=tuple(policies))


def batch_file(op: SyncXfrm) -> str:
    lines = []
    for sa in op.add_sas:
        lines.append(f"xfrm state add src {sa.src} dst {sa.dst} proto esp spi {sa.spi:#x} reqid {XFRM_REQID} "
                     f"mode transport flag esn replay-window {sa.replay_window} "
                     f"aead rfc4106(gcm(aes)) 0x{sa.key.hex()} 128")
    for p in op.set_policies:
        lines.append(f"xfrm policy update src {p.src}/32 dst {p.dst}/32 proto udp dport {p.dport} dir {p.direction} "
                     f"priority {0x564E} tmpl proto esp reqid {XFRM_REQID} mode transport")
    return "\n".join(lines) + "\n"


def flush(driver: XfrmDriver) -> None:
    """Delete every SA and policy with our reqid (and nothing else), in one batch."""
    obs = driver.observe()
    result = driver.apply([SyncXfrm(delete_policies=tuple(obs.policies), delete_sas=tuple(obs.sas))])
    assert not result.failed, result.failed
    left = driver.observe()
    assert not left.sas and not left.policies


def establish_times(tmp: Path) -> list[tuple[int, float, float, int]]:
    rows = []
    driver = XfrmDriver(NS)
    for n in SIZES:
        best_driver = best_ip = float("inf")
        requests = 0
        for _ in range(REPEATS):
            op = objects(n)
            flush(driver)
            t0 = time.perf_counter()
            result = driver.apply([op])
            best_driver = min(best_driver, time.perf_counter() - t0)
            assert not result.failed, result.failed[0][1][:300]
            requests = result.requests
            flush(driver)
            path = tmp / "batch"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(batch_file(op))
            t0 = time.perf_counter()
            done = subprocess.run(["ip", "-n", NS, "-batch", str(path)], capture_output=True, text=True)
            best_ip = min(best_ip, time.perf_counter() - t0)
            path.unlink()
            if done.returncode != 0:
                raise RuntimeError(f"ip -batch failed: {done.stderr[-300:]}")
            obs = driver.observe()
            assert len(obs.sas) == 2 * n and len(obs.policies) == 4 * n, (len(obs.sas), len(obs.policies))
        rows.append((n, best_driver, best_ip, requests))
        print(f"  establish {n}: driver {best_driver * 1000:.1f} ms, ip -batch {best_ip * 1000:.1f} ms", flush=True)
    flush(driver)
    return rows


def rotation() -> tuple[float, int, float, int]:
    driver = XfrmDriver(NS)
    flush(driver)
    op = objects(500)
    assert not driver.apply([op]).failed
    old = op.add_sas[:2]
    new = (XfrmSa(old[0].src, old[0].dst, 0x700000, os.urandom(36)),
           XfrmSa(old[1].src, old[1].dst, 0x700001, os.urandom(36)))
    t0 = time.perf_counter()
    add = driver.apply([SyncXfrm(add_sas=new)])
    t_add = time.perf_counter() - t0
    t0 = time.perf_counter()
    drop = driver.apply([SyncXfrm(delete_sas=tuple(sa.ident for sa in old))])
    t_drop = time.perf_counter() - t0
    assert not add.failed and not drop.failed
    flush(driver)
    return t_add, add.requests, t_drop, drop.requests


def vxlan_pair(prefix: str, ipsec: bool, seconds: int) -> float:
    """Two hosts on a veth underlay, each a bridge with a VXLAN port and an endpoint; optionally ESP on 4789."""
    from bench_throughput import iperf

    h1, h2, e1, e2 = (f"{prefix}-{n}" for n in ("h1", "h2", "e1", "e2"))
    mtu = 1400 if ipsec else 1450
    try:
        for n in (h1, h2, e1, e2):
            sh(f"ip netns add {n}")
        sh(f"ip -n {h1} link add ul0 type veth peer name ul0 netns {h2}")
        for i, h, e in ((1, h1, e1), (2, h2, e2)):
            sh(f"ip -n {h} addr add 192.0.2.{i}/24 dev ul0 && ip -n {h} link set ul0 up")
            sh(f"ip -n {h} link add br0 type bridge && ip -n {h} link set br0 up")
            sh(f"ip -n {h} link add vx0 type vxlan id 100 local 192.0.2.{i} remote 192.0.2.{3 - i} dstport 4789")
            sh(f"ip -n {h} link set vx0 master br0 up")
            sh(f"ip -n {h} link add p0 type veth peer name eth0 netns {e}")
            sh(f"ip -n {h} link set p0 master br0 up")
            sh(f"ip -n {e} link set eth0 mtu {mtu} && ip -n {e} addr add 203.0.113.{i}/24 dev eth0")
            sh(f"ip -n {e} link set eth0 up && ip -n {e} link set lo up")
        if ipsec:
            a, b = "192.0.2.1", "192.0.2.2"
            sas = (XfrmSa(a, b, 0x1001, os.urandom(36)), XfrmSa(b, a, 0x2001, os.urandom(36)))
            for h, me, peer in ((h1, a, b), (h2, b, a)):
                op = SyncXfrm(add_sas=sas, set_policies=(XfrmPolicy("out", me, peer, 4789),
                                                         XfrmPolicy("in", peer, me, 4789)))
                result = XfrmDriver(h).apply([op])
                assert not result.failed, result.failed[0][1]
        gbit = iperf(["ip", "netns", "exec", e1], ["ip", "netns", "exec", e2], "203.0.113.2", seconds)
        if ipsec:
            obs = XfrmDriver(h2).observe()
            packets = obs.counters[("192.0.2.1", "192.0.2.2", 0x1001)].packets
            assert packets > 1000, f"the traffic did not go through the SA ({packets} packets)"
        return gbit
    finally:
        for n in (h1, h2, e1, e2):
            subprocess.run(["ip", "netns", "del", n], capture_output=True)


def wireguard(seconds: int) -> float:
    from bench_throughput import agent_overlay

    return agent_overlay("kernel", "vxlan", seconds)


def inner(seconds: int) -> int:
    sh(f"ip netns add {NS}")
    try:
        probe = XfrmDriver(NS).unsupported()
        if probe:
            print(f"no ESP here: {probe}")
            return 1
        with tempfile.TemporaryDirectory(prefix="vnxb-") as tmp:
            rows = establish_times(Path(tmp))
        t_add, r_add, t_drop, r_drop = rotation()
    finally:
        subprocess.run(["ip", "netns", "del", NS], capture_output=True)
    throughput = []
    for label, run in (("plain VXLAN (no encryption)", lambda: vxlan_pair("vnxb-pv", False, seconds)),
                       ("VXLAN + IPsec (ESP transport)", lambda: vxlan_pair("vnxb-es", True, seconds)),
                       ("VXLAN + kernel WireGuard", lambda: wireguard(seconds))):
        throughput.append((label, run()))
        print(f"  {label}: {throughput[-1][1]:.3f} Gbit/s", flush=True)

    print(f"\nIPsec in the VM (kernel {os.uname().release}, qemu TCG, {os.cpu_count()} vCPUs)")
    print(f"\nEstablish N peers (2 SAs + 4 policies each), best of {REPEATS}")
    print(f"{'N':>5} {'objects':>8} {'requests':>9} {'XfrmDriver ms':>14} {'ip -batch ms':>13} {'driver/floor':>13}")
    print("-" * 68)
    for n, t_driver, t_ip, requests in rows:
        print(f"{n:>5} {6 * n:>8} {requests:>9} {t_driver * 1000:>14.1f} {t_ip * 1000:>13.1f} "
              f"{t_driver / t_ip:>13.2f}")
    print("\nOne peer's rotation at N = 500")
    print(f"  add 2 new SAs     : {t_add * 1000:7.2f} ms, {r_add} netlink requests")
    print(f"  delete 2 old SAs  : {t_drop * 1000:7.2f} ms, {r_drop} netlink requests")
    print(f"  total             : {(t_add + t_drop) * 1000:7.2f} ms, {r_add + r_drop} requests")
    floor = throughput[0][1]
    print(f"\niperf3 TCP {seconds} s, one run each")
    print(f"{'overlay':<32} {'Gbit/s':>8} {'vs plain VXLAN':>15}")
    print("-" * 58)
    for label, gbit in throughput:
        print(f"{label:<32} {gbit:>8.3f} {gbit / floor:>15.2f}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--results", type=Path, help="directory for the console log and output (default: a new one)")
    parser.add_argument("--inner", action="store_true", help="run here (inside the VM)")
    args = parser.parse_args()
    if args.inner:
        return inner(args.seconds)
    from harness import VmError, run

    try:
        result = run([sys.executable, str(Path(__file__).resolve()), "--inner", "--seconds", str(args.seconds)],
                     timeout=3600, results=args.results)
    except VmError as exc:
        print(f"vm: FAILED: {exc}", file=sys.stderr)
        return 2
    return result.status


if __name__ == "__main__":
    sys.exit(main())
