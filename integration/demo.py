"""Veilnet demo: a controller, three simulated hosts joined with tokens, two segments, real traffic.

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

import yaml

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

EXAMPLE_SPEC = Path(__file__).resolve().parents[1] / "examples" / "network.yaml"

# Listens on the given TCP ports and accepts every connection (the API "server" in c-web).
LISTEN = r"""
import selectors, socket, sys
sel = selectors.DefaultSelector()
for port in sys.argv[1:]:
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(port))); s.listen(64); sel.register(s, selectors.EVENT_READ)
while True:
    for key, _ in sel.select():
        conn, _ = key.fileobj.accept(); conn.close()
"""


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


def spec_from_example(lab: Lab) -> Path:
    """examples/network.yaml, with each endpoint's namespace named as the lab names it (``<prefix>-<endpoint>``)."""
    spec = yaml.safe_load(EXAMPLE_SPEC.read_text())
    for endpoint in spec["endpoints"]:
        endpoint["netns"] = lab.netns_of(endpoint["name"])
    path = lab.run_dir / "network.json"
    path.write_text(json.dumps(spec, indent=2) + "\n")
    return path


def show(text: str, indent: str = "  ") -> None:
    for line in text.rstrip().splitlines():
        print(indent + line)


def tcp(lab: Lab, src: str, dst_ip: str, port: int) -> str:
    """ok | timeout | refused: one TCP connection from ``src`` (timeout = dropped by the firewall)."""
    code = ("import socket,sys\n"
            "try:\n"
            f"  socket.create_connection(('{dst_ip}', {port}), timeout=1).close(); print('ok')\n"
            "except socket.timeout: print('timeout')\n"
            "except ConnectionRefusedError: print('refused')\n")
    return lab.endpoint(src).run([sys.executable, "-c", code], check=False).stdout.strip()


def run_demo(demo: Demo, iperf_seconds: int) -> None:
    lab = demo.lab
    topo = standard_topology()  # the same hosts, segments and endpoints as examples/network.yaml

    heading("Controller (SQLite, its own CA) in the underlay namespace at 192.0.2.2")
    t0 = time.monotonic()
    lab.run_dir.mkdir(parents=True, exist_ok=True)
    ctl = lab.start_controller()
    demo.check("veilnet-controller serving", True,
               f"mutual TLS {ctl.control_endpoint}, join {ctl.bootstrap_endpoint}, CA {ctl.ca_hash[:23]}...")

    heading("Joining three hosts with single-use tokens (on standard input, CA pinned by hash)")
    for h in topo.hosts:
        host = lab.configure_host(h, resync_interval=2.0)
        token = ctl.token(h.name)
        res = host.join(ctl, token=token, check=False)
        demo.check(f"{h.name} joined", res.returncode == 0, (res.stdout or res.stderr).strip().splitlines()[0])
        reuse = host.join(ctl, token=token, check=False)
        demo.check("  the same token again is refused", reuse.returncode != 0,
                   reuse.stderr.strip().removeprefix("error: "))
    for e in topo.endpoints:
        lab.add_endpoint(e.name)
    for host in lab.hosts.values():
        host.start_agent(wait_ready=False)
    for host in lab.hosts.values():
        host.wait_for_log("control_connected", timeout=30)
    demo.check("agents connected to the controller (outbound; hosts listen on no control port)", True)

    heading("veilctl apply -f examples/network.yaml")
    spec_path = spec_from_example(lab)
    res = ctl.veilctl("apply", "-f", str(spec_path), "-m", "demo: initial network", "--wait", "60")
    show(res.stderr)
    demo.check("revision 1 applied on every host", res.returncode == 0, f"{time.monotonic() - t0:.1f}s since start")
    lab.topology = topo
    print()
    show(ctl.veilctl("nodes").stdout)

    heading("Waiting for WireGuard handshakes")
    try:
        for src, dst in [("a-web", "b-web"), ("a-web", "c-web"), ("b-web", "c-web"), ("a-db", "b-db")]:
            if not lab.endpoint(src).wait_ping(topo.endpoint(dst).ipv4, 30):
                raise LabError(f"{src} cannot reach {dst}")
        wait_until(lambda: all_handshakes(lab), 20, 0.5, "handshakes")
        demo.check("every host has a handshake with every peer it shares a segment with", True)
    except (LabError, TimeoutError) as e:
        demo.check("every host has a handshake with every peer it shares a segment with", False, str(e))

    heading("WireGuard (wg show, public keys only)")
    for host in lab.hosts.values():
        print(f"--- {host.name}")
        print(public_wg_show(host.wg_show()))

    heading("Cross-host pings (same segment; blue is default-deny with ICMP allowed by policy)")
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
    applied = json.loads((lab.host("host-c").state_dir / "controller" / "applied.json").read_text())["state"]
    demo.check("host-c (blue only) was told nothing about green",
               "green" not in json.dumps(applied) and "203.0.113.64" not in json.dumps(applied),
               f"its state: segments {[s['name'] for s in applied['segments']]}, "
               f"peers {[p['name'] for p in applied['peers']]}")

    heading("Policy through the controller: web -> api tcp 8080, then 9090, then rollback")
    api_ip = topo.endpoint("c-web").ipv4
    server = lab.endpoint("c-web").popen([sys.executable, "-c", LISTEN, "8080", "9090"],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: tcp(lab, "c-web", api_ip, 8080) == "ok", 10, 0.2, "api server listening")
        demo.check("a-web -> c-web:8080 allowed (web-to-api)", tcp(lab, "a-web", api_ip, 8080) == "ok")
        demo.check("a-web -> c-web:9090 dropped (no policy)", tcp(lab, "a-web", api_ip, 9090) == "timeout")
        spec = json.loads(spec_path.read_text())
        next(p for p in spec["policies"] if p["name"] == "web-to-api")["ports"] = [9090]
        changed = lab.run_dir / "network-9090.json"
        changed.write_text(json.dumps(spec, indent=2))
        print("  veilctl diff:")
        show(ctl.veilctl("diff", "-f", str(changed)).stdout, "    ")
        t1 = time.monotonic()
        res = ctl.veilctl("apply", "-f", str(changed), "-m", "demo: api moves to 9090", "--wait", "30")
        demo.check("revision 2 applied on every host", res.returncode == 0, f"{(time.monotonic() - t1) * 1000:.0f} ms")
        demo.check("a-web -> c-web:9090 now allowed", tcp(lab, "a-web", api_ip, 9090) == "ok")
        demo.check("a-web -> c-web:8080 now dropped", tcp(lab, "a-web", api_ip, 8080) == "timeout")
        res = ctl.veilctl("rollback", "1", "--wait", "30")
        demo.check("veilctl rollback 1 (as revision 3)", res.returncode == 0)
        demo.check("a-web -> c-web:8080 allowed again", tcp(lab, "a-web", api_ip, 8080) == "ok")
        print()
        show(ctl.veilctl("history").stdout)
    finally:
        server.kill()
        server.wait()

    heading(f"iperf3 a-db -> b-db over the overlay ({iperf_seconds}s)")
    # web -> web TCP is not allowed in blue (default-deny); green is isolated: free inside.
    server_ip = topo.endpoint("b-db").ipv4
    server = lab.endpoint("b-db").popen(
        ["iperf3", "-s", "-1", "-B", server_ip],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        res = None
        for _ in range(20):  # until the server listens
            res = lab.endpoint("a-db").run(
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
            print(f"  a-db -> b-db (green)  sender {sent:8.1f} Mbit/s  (retransmits {retr})")
            print(f"                        receiver {recv:6.1f} Mbit/s")
            demo.check("iperf3 TCP throughput", recv > 0, f"{recv:.0f} Mbit/s")
        except (ValueError, KeyError) as e:
            demo.check("iperf3 TCP throughput", False, f"{e}: {tail(res.stdout + res.stderr, 5)}")
    finally:
        if server.poll() is None:
            server.kill()
        server.wait()

    heading("Revoking host-c: disconnected at once, removed from every peer")
    key_c = lab.host("host-c").identity()
    res = ctl.veilctl("revoke", "host-c", "--reason", "demo")
    show(res.stdout)
    try:
        for name in ("host-a", "host-b"):
            wait_until(lambda n=name: key_c not in lab.host(n).wg_peers(), 10, 0.1, f"{name} drops host-c")
        demo.check("host-a and host-b removed host-c's WireGuard key", True)
    except TimeoutError as e:
        demo.check("host-a and host-b removed host-c's WireGuard key", False, str(e))
    demo.check("a-web -> c-web now unreachable",
               lab.endpoint("a-web").ping(api_ip, count=2, args=("-i", "0.3")).returncode != 0)
    print()
    show(ctl.veilctl("nodes").stdout)

    heading("Audit log (hash chain verified)")
    res = ctl.veilctl("audit", "--verify")
    show(res.stdout)
    demo.check("audit hash chain verified", res.returncode == 0)

    heading("Agent logs (event counts)")
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
