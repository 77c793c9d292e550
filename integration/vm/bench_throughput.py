#!/usr/bin/env python3
"""Throughput on a real kernel, side by side in one boot: plain VXLAN against the agent's encrypted overlays.

Run (it boots the VM itself):   integration/vm/bench_throughput.py [--seconds 5] [--rounds 3]

Two hosts, one endpoint each, iperf3 TCP from one endpoint to the other:
  plain VXLAN              : two namespaces joined by VXLAN over a veth, no encryption, built by hand (floor)
  VXLAN + kernel WireGuard : the agent, wireguard.backend = kernel
  VXLAN + wireguard-go     : the agent, wireguard.backend = userspace
  Geneve + kernel WireGuard: the agent, a Geneve segment, kernel WireGuard
Prints Gbit/s (median of the rounds) and the ratio of each to plain VXLAN. Under TCG every number is far
below real hardware; the ratios are what the table is for. Never asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def iperf(client_cmd: list[str], server_cmd: list[str], server_ip: str, seconds: int) -> float:
    server = subprocess.Popen([*server_cmd, "iperf3", "-s", "-1", "-B", server_ip], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            probe = subprocess.run([*server_cmd, "ss", "-Hltn", "sport = :5201"], capture_output=True, text=True)
            if probe.stdout.strip():
                break
            time.sleep(0.1)
        done = subprocess.run([*client_cmd, "iperf3", "-c", server_ip, "-t", str(seconds), "-J"],
                              capture_output=True, text=True, timeout=seconds + 60)
        if done.returncode != 0:
            raise RuntimeError(f"iperf3 failed: {done.stdout[-500:]}{done.stderr[-500:]}")
        return float(json.loads(done.stdout)["end"]["sum_received"]["bits_per_second"]) / 1e9
    finally:
        server.kill()
        server.wait()


def sh(cmd: str) -> None:
    subprocess.run(cmd, shell=True, check=True, capture_output=True)


def plain_vxlan(seconds: int) -> float:
    """h1/h2 on a veth underlay, each a bridge with a VXLAN port and an endpoint veth; no encryption."""
    names = ["pv-h1", "pv-h2", "pv-e1", "pv-e2"]
    try:
        for n in names:
            sh(f"ip netns add {n}")
        sh("ip -n pv-h1 link add ul0 type veth peer name ul0 netns pv-h2")
        for i, h in ((1, "pv-h1"), (2, "pv-h2")):
            sh(f"ip -n {h} addr add 192.0.2.{i}/24 dev ul0 && ip -n {h} link set ul0 up")
            sh(f"ip -n {h} link add br0 type bridge && ip -n {h} link set br0 up")
            sh(f"ip -n {h} link add vx0 type vxlan id 100 local 192.0.2.{i} remote 192.0.2.{3 - i} dstport 4789")
            sh(f"ip -n {h} link set vx0 master br0 up")
            sh(f"ip -n {h} link add p0 type veth peer name eth0 netns pv-e{i}")
            sh(f"ip -n {h} link set p0 master br0 up")
            sh(f"ip -n pv-e{i} link set eth0 mtu 1450 && ip -n pv-e{i} addr add 203.0.113.{i}/24 dev eth0")
            sh(f"ip -n pv-e{i} link set eth0 up && ip -n pv-e{i} link set lo up")
        return iperf(["ip", "netns", "exec", "pv-e1"], ["ip", "netns", "exec", "pv-e2"], "203.0.113.2", seconds)
    finally:
        for n in names:
            subprocess.run(["ip", "netns", "del", n], capture_output=True)


def agent_overlay(backend: str, encapsulation: str, seconds: int) -> float:
    from lab import EndpointSpec, HostSpec, Lab, SegmentSpec, Topology

    hosts = tuple(HostSpec(f"host-{c}", f"192.0.2.{11 + i}", f"198.51.100.{11 + i}/24") for i, c in enumerate("ab"))
    seg = SegmentSpec("blue", 100, "203.0.113.0/26", "203.0.113.1", encapsulation=encapsulation)
    eps = (EndpointSpec("a-web", "host-a", "blue", "02:00:00:0a:00:01", "203.0.113.10"),
           EndpointSpec("b-web", "host-b", "blue", "02:00:00:0b:00:01", "203.0.113.20"))
    with Lab("vnbtp") as lab:
        lab.build(Topology(hosts, (seg,), eps), backend=backend, ready_timeout=120)
        lab.wait_connectivity(timeout=120)
        return iperf(lab.endpoint("a-web").cmd([]), lab.endpoint("b-web").cmd([]), "203.0.113.20", seconds)


CONFIGS = [
    ("plain VXLAN (no encryption)", lambda s: plain_vxlan(s)),
    ("VXLAN + kernel WireGuard", lambda s: agent_overlay("kernel", "vxlan", s)),
    ("VXLAN + wireguard-go", lambda s: agent_overlay("userspace", "vxlan", s)),
    ("Geneve + kernel WireGuard", lambda s: agent_overlay("kernel", "geneve", s)),
]


def inner(seconds: int, rounds: int) -> int:
    results: dict[str, list[float]] = {label: [] for label, _ in CONFIGS}
    for _ in range(rounds):
        for label, run in CONFIGS:
            results[label].append(run(seconds))
            print(f"  {label}: {results[label][-1]:.3f} Gbit/s", flush=True)
    floor = statistics.median(results[CONFIGS[0][0]])
    print(f"\nThroughput in the VM (kernel {os.uname().release}, qemu TCG, {os.cpu_count()} vCPUs), iperf3 TCP "
          f"{seconds} s, median of {rounds} round(s)")
    print(f"{'overlay':<30} {'Gbit/s':>8} {'vs plain VXLAN':>15}  runs")
    print("-" * 72)
    for label, values in results.items():
        median = statistics.median(values)
        print(f"{label:<30} {median:>8.3f} {median / floor:>15.2f}  {' '.join(f'{v:.3f}' for v in values)}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--results", type=Path, help="directory for the console log and output (default: a new one)")
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        return inner(args.seconds, args.rounds)
    from harness import VmError, run

    try:
        result = run([sys.executable, str(Path(__file__).resolve()), "--inner", "--seconds", str(args.seconds),
                      "--rounds", str(args.rounds)], timeout=3600, results=args.results)
    except VmError as exc:
        print(f"vm: FAILED: {exc}", file=sys.stderr)
        return 2
    return result.status


if __name__ == "__main__":
    sys.exit(main())
