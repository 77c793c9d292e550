"""Veilnet demo: three simulated hosts, two segments, real agents, real traffic.

Run as root through ``scripts/demo``. Everything lives in network namespaces
named ``<prefix>-*`` and is torn down at the end, also on failure or Ctrl-C.
Exits 0 only if every check passed.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lab import (
    Lab,
    LabError,
    find_agent_bin,
    install_signal_handlers,
    standard_topology,
    tail,
    wait_until,
)


class Demo:
    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.results: list[tuple[str, bool, str]] = []

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.results.append((name, ok, detail))
        mark = "ok  " if ok else "FAIL"
        print(f"  [{mark}] {name}" + (f"  ({detail})" if detail else ""), flush=True)
        return ok

    @property
    def failed(self) -> list[tuple[str, bool, str]]:
        return [r for r in self.results if not r[1]]


def heading(text: str) -> None:
    print(f"\n=== {text} " + "=" * max(3, 70 - len(text)), flush=True)


def rtt(out: str) -> str:
    m = re.search(r"= [\d.]+/([\d.]+)/", out)
    return f"avg {m.group(1)} ms" if m else ""


def public_wg_show(text: str) -> str:
    """``wg show`` without the (hidden) private-key line: public information only."""
    return "\n".join(line for line in text.splitlines() if "private key" not in line)


def all_handshakes(lab: Lab) -> bool:
    for host in lab.hosts.values():
        peers = host.wg_peers()
        if len(peers) != len(lab.hosts) - 1:
            return False
        if any(p.get("latest_handshakes", "0") in ("", "0") for p in peers.values()):
            return False
    return True


def run_demo(demo: Demo, iperf_seconds: int) -> None:
    lab = demo.lab
    topo = standard_topology()

    heading("Topology")
    for h in topo.hosts:
        eps = ", ".join(f"{e.name} ({e.segment})" for e in topo.endpoints_of(h.name))
        print(f"  {h.name:7} underlay {h.underlay_ipv4:12} transport {h.transport_address:16} {eps}")
    for s in topo.segments:
        v6 = f", {s.ipv6_subnet}" if s.ipv6_subnet else ""
        print(f"  segment {s.name:6} VNI {s.vni:<4} {s.ipv4_subnet}{v6}")

    heading("Building the lab and starting one veilnet-agent per host")
    t0 = time.monotonic()
    lab.build(topo, resync_interval=2.0)
    demo.check("agents ready", True, f"{time.monotonic() - t0:.1f}s")

    heading("Waiting for WireGuard handshakes")
    try:
        lab.wait_connectivity(timeout=30)  # traffic starts the handshakes
        wait_until(lambda: all_handshakes(lab), 20, 0.5, "handshakes")
        demo.check("every host has a handshake with every peer", True)
    except (LabError, TimeoutError) as e:
        demo.check("every host has a handshake with every peer", False, str(e))

    heading("WireGuard (wg show, public keys only)")
    for host in lab.hosts.values():
        print(f"--- {host.name}")
        print(public_wg_show(host.wg_show()))

    heading("Cross-host pings (same segment)")
    pairs = [
        ("a-web", "b-web", 4), ("a-web", "c-web", 4), ("b-web", "c-web", 4),
        ("a-db", "b-db", 4),
        ("a-web", "b-web", 6), ("a-web", "c-web", 6), ("c-web", "b-web", 6),
    ]
    for src, dst, fam in pairs:
        ep = topo.endpoint(dst)
        ip = ep.ipv4 if fam == 4 else ep.ipv6
        assert ip is not None
        res = lab.endpoint(src).ping(ip, count=3, args=("-i", "0.2"))
        detail = rtt(res.stdout) or (res.stdout.strip().splitlines() or [""])[-1]
        demo.check(f"{src:6} -> {dst:6} IPv{fam} {ip}", res.returncode == 0, detail)

    heading("Segment isolation (blue and green must not reach each other)")
    for src, dst in [("a-web", "b-db"), ("b-db", "c-web"), ("a-web", "a-db")]:
        ip = topo.endpoint(dst).ipv4
        res = lab.endpoint(src).ping(ip, count=2, args=("-i", "0.3"))
        demo.check(f"{src:6} -> {dst:6} {ip} blocked", res.returncode != 0)

    heading(f"iperf3 a-web -> b-web over the overlay ({iperf_seconds}s)")
    server_ip = topo.endpoint("b-web").ipv4
    server = lab.endpoint("b-web").popen(
        ["iperf3", "-s", "-1", "-B", server_ip],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        res = None
        for _ in range(20):  # until the server listens
            res = lab.endpoint("a-web").run(
                ["iperf3", "-c", server_ip, "-t", str(iperf_seconds), "-J"],
                check=False, timeout=iperf_seconds + 30,
            )
            if res.returncode == 0 or "Connection refused" not in res.stdout + res.stderr:
                break
            time.sleep(0.2)
        assert res is not None
        try:
            end = json.loads(res.stdout)["end"]
            sent = end["sum_sent"]["bits_per_second"] / 1e6
            recv = end["sum_received"]["bits_per_second"] / 1e6
            retr = end["sum_sent"].get("retransmits", 0)
            print(f"  sender   {sent:8.1f} Mbit/s  (retransmits {retr})")
            print(f"  receiver {recv:8.1f} Mbit/s")
            demo.check("iperf3 TCP throughput", recv > 0, f"{recv:.0f} Mbit/s")
        except (ValueError, KeyError) as e:
            demo.check("iperf3 TCP throughput", False, f"{e}: {tail(res.stdout + res.stderr, 5)}")
    finally:
        if server.poll() is None:
            server.kill()
        server.wait()

    heading("Agent logs (last events)")
    for host in lab.hosts.values():
        evs = host.log_events()
        counts: dict[str, int] = {}
        for ev in evs:
            counts[str(ev.get("event"))] = counts.get(str(ev.get("event")), 0) + 1
        summary = ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))
        print(f"  {host.name}: {summary}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--prefix", default="vndemo", help="namespace name prefix (default %(default)s)")
    p.add_argument("--iperf-seconds", type=int, default=3)
    args = p.parse_args(argv)
    try:
        find_agent_bin()
    except LabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    install_signal_handlers()
    started = time.monotonic()
    lab = Lab(args.prefix)
    demo = Demo(lab)
    status = 0
    try:
        with lab:
            try:
                run_demo(demo, args.iperf_seconds)
            except (LabError, TimeoutError, AssertionError) as e:
                demo.check("demo ran to completion", False, str(e).splitlines()[0])
                print(f"\n{e}", file=sys.stderr)
            if demo.failed:
                heading("Agent logs (tail, for the failure above)")
                for host in lab.hosts.values():
                    print(f"--- {host.name} ({host.log_path})")
                    print(tail(host.log_text(), 30))
            heading("Tearing down")
    except KeyboardInterrupt:
        print("\ninterrupted: lab torn down", file=sys.stderr)
        return 130
    left = lab.leftovers()
    demo.check("nothing left behind", not left, ", ".join(left))
    heading("Summary")
    total = len(demo.results)
    if demo.failed:
        status = 1
        print(f"  {len(demo.failed)} of {total} checks FAILED:")
        for name, _, detail in demo.failed:
            print(f"    - {name}" + (f": {detail}" if detail else ""))
    else:
        print(f"  all {total} checks passed")
    print(f"  {time.monotonic() - started:.1f}s")
    return status


if __name__ == "__main__":
    sys.exit(main())
