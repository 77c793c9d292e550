#!/usr/bin/env python3
"""Data-plane programming benchmark: the agent against the iproute2/wg floor.

For N peers (each: one WireGuard peer, one endpoint behind it in one VXLAN
segment -> 1 head-end FDB entry, 2 MAC FDB entries, 1 neighbour entry), in a
fresh network namespace (plus a private mount namespace for wireguard-go):

  agent  : validate the desired state, render, plan against the kernel read
           back, apply (the agent's own code path, real drivers), from empty.
  floor  : the same kernel objects by hand: wireguard-go + `wg setconf`,
           `ip -batch` (links, addresses, neighbours), `bridge -batch` (FDB), and
           `nft -f` of the agent's two firewall tables (policy, anti-spoofing sets:
           every peer's VNI, MACs and addresses).
  1-peer : the agent adding one more peer to the programmed N (cached model,
           as after a desired-state change), time and kernel requests.

Run as root:  .venv/bin/python integration/bench/bench_dataplane.py [--sizes 100,1000,5000]
Prints a table; never asserts. Namespaces are removed even on failure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "integration"))
from lab import delete_netns  # noqa: E402

PREFIX = "vnbench"
MNT_DIR = Path(f"/run/{PREFIX}-mnt")


def sh(cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, shell=True, check=check, text=True, capture_output=True)


# --- namespace sandbox ---------------------------------------------------------------------------------
class Sandbox:
    """A network namespace with a veth underlay (no dummy module here) and a private /run/wireguard."""

    def __init__(self, name: str) -> None:
        self.name = f"{PREFIX}-{name}"
        self.mnt = MNT_DIR / name

    def __enter__(self) -> Sandbox:
        self.destroy()
        if not MNT_DIR.is_dir() or sh(f"findmnt -n {MNT_DIR}", check=False).returncode != 0:
            MNT_DIR.mkdir(parents=True, exist_ok=True)
            sh(f"mount --bind {MNT_DIR} {MNT_DIR} && mount --make-private {MNT_DIR}")
        sh(f"ip netns add {self.name}")
        self.mnt.touch()
        private_wg = "mkdir -p /run/wireguard && mount -t tmpfs none /run/wireguard"
        sh(f"unshare --mount={self.mnt} --propagation slave sh -c '{private_wg}'")
        self.run("ip link add ul0 type veth peer name ul1 && ip link set ul1 up && "
                 "ip addr add 192.0.2.1/24 dev ul0 && ip link set ul0 up && ip link set lo up")
        return self

    def prefix(self) -> str:
        return f"nsenter --mount={self.mnt} --net=/run/netns/{self.name}"

    def run(self, cmd: str) -> subprocess.CompletedProcess[str]:
        return sh(f"{self.prefix()} sh -c {json.dumps(cmd)}")

    def destroy(self) -> None:
        delete_netns(self.name)
        if self.mnt.exists():
            sh(f"umount {self.mnt}", check=False)
            self.mnt.unlink(missing_ok=True)

    def __exit__(self, *exc: object) -> None:
        self.destroy()


# --- the desired state ---------------------------------------------------------------------------------
def peer_raw(i: int) -> dict[str, Any]:
    from factories import wg_key

    return {
        "name": f"peer-{i}",
        "underlay_address": f"192.0.2.{(i % 250) + 2}",
        "underlay_port": 20000 + i // 250,
        "public_key": wg_key(f"bench-{i}"),
        "transport_address": f"fd00:7::{i + 2:x}",
        "endpoints": [{"segment": "blue", "mac": f"02:01:00:{(i >> 16) & 255:02x}:{(i >> 8) & 255:02x}:{i & 255:02x}",
                       "ips": [f"fd00:b1::{i + 2:x}:1"]}],
    }


def state_raw(n: int) -> dict[str, Any]:
    return {
        "node": "bench",
        "transport_address": "fd00:7::1/64",
        "segments": [{"name": "blue", "vni": 100, "ipv6_subnet": "fd00:b1::/64", "ipv6_gateway": "fd00:b1::1"}],
        "endpoints": [],
        "peers": [peer_raw(i) for i in range(n)],
    }


# --- inside the sandbox: the agent's path --------------------------------------------------------------
def inner_agent(n: int, state_dir: str) -> dict[str, Any]:
    import resource

    from veilnet_agent import logs
    from veilnet_agent.app.daemon import Daemon
    from veilnet_agent.core import naming
    from veilnet_agent.core.config import parse_config
    from veilnet_agent.dataplane.firewall_manager import FirewallManager
    from veilnet_agent.dataplane.reconciler import Outcome, Reconciler
    from veilnet_agent.drivers.firewall import FirewallDriver
    from veilnet_agent.drivers.links import LinksDriver
    from veilnet_agent.drivers.wireguard import WireGuardDriver

    logs.configure("json", "warning")
    config = parse_config({
        "node_name": "bench", "state_dir": state_dir,
        "underlay": {"interface": "ul0", "address": "192.0.2.1", "mtu": 1500},
        "wireguard": {"backend": "auto", "listen_port": 51820},
    })
    raw = state_raw(n)
    bigger = state_raw(n)
    bigger["peers"].append(peer_raw(n))
    state_file = Path(state_dir) / "state.json"
    with LinksDriver() as links:
        wireguard = WireGuardDriver(naming.WG_IFNAME, config.state_dir, config.wireguard.backend)
        firewall = FirewallManager(FirewallDriver(), config.firewall, config.node_name)
        reconciler = Reconciler(config, links, wireguard, firewall)  # as `veilnet-agent run` builds it
        daemon = Daemon(config, state_file, reconciler)  # not run(): its state-file handler is called directly
        state_file.write_text(json.dumps(raw))

        def file_changed() -> Outcome:
            """Exactly what the daemon does when the state file changes."""
            return daemon.handle_state_file() or Outcome()

        t0 = time.perf_counter()
        full = file_changed()
        full_s = time.perf_counter() - t0
        left = reconciler.converged()

        state_file.write_text(json.dumps(bigger))
        t1 = time.perf_counter()
        one = file_changed()
        one_s = time.perf_counter() - t1
        t2 = time.perf_counter()
        noop = file_changed()
        noop_s = time.perf_counter() - t2
        left_after = reconciler.converged()
        reconciler.close()
    return {
        "full_s": full_s, "full_ops": len(full.ops), "full_failed": len(full.failed),
        "one_s": one_s, "one_ops": len(one.ops), "one_requests": one.requests, "one_failed": len(one.failed),
        "one_apply_s": one.seconds, "noop_s": noop_s, "noop_ops": len(noop.ops),
        "converged": not left and not left_after,
        "not_converged": [str(op)[:200] for op in (left + left_after)[:3]],
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


# --- the floor: iproute2 + wg by hand ------------------------------------------------------------------
def floor_files(n: int, work: Path) -> tuple[Path, Path, Path, Path]:
    from factories import wg_key  # noqa: F401  (same keys as the agent's run)

    from veilnet_agent.core import nft_text
    from veilnet_agent.core.firewall_compiler import compile_firewall, set_tables
    from veilnet_agent.core.model import parse_node_state

    peers = [peer_raw(i) for i in range(n)]
    key = sh("wg genkey").stdout.strip()
    wg_conf = work / "wg.conf"
    lines = ["[Interface]", f"PrivateKey = {key}", "ListenPort = 51820", ""]
    for p in peers:
        lines += ["[Peer]", f"PublicKey = {p['public_key']}",
                  f"Endpoint = {p['underlay_address']}:{p['underlay_port']}",
                  f"AllowedIPs = {p['transport_address']}/128", ""]
    wg_conf.write_text("\n".join(lines))
    wg_conf.chmod(0o600)
    ip_batch = work / "ip.batch"
    ip_lines = [
        "link set vnwg0 mtu 1440", "address add fd00:7::1/64 dev vnwg0 nodad", "link set vnwg0 up",
        "link add vnbr100 type bridge stp_state 0", "link set vnbr100 address 02:56:4e:00:00:64 mtu 1370",
        "address add fd00:b1::1/64 dev vnbr100 nodad", "link set vnbr100 up",
        "link add vnvx100 type vxlan id 100 local fd00:7::1 dstport 4789 nolearning",
        "link set vnvx100 mtu 1370 master vnbr100 up",
    ]
    ip_lines += [
        f"neigh replace {p['endpoints'][0]['ips'][0]} lladdr {p['endpoints'][0]['mac']} dev vnbr100 nud permanent"
        for p in peers
    ]
    ip_batch.write_text("\n".join(ip_lines) + "\n")
    br_batch = work / "bridge.batch"
    br_lines = ["link set dev vnvx100 learning off neigh_suppress on"]
    for p in peers:
        mac, dst = p["endpoints"][0]["mac"], p["transport_address"]
        br_lines += [f"fdb append 00:00:00:00:00:00 dev vnvx100 dst {dst} self permanent",
                     f"fdb add {mac} dev vnvx100 dst {dst} self permanent",
                     f"fdb add {mac} dev vnvx100 master static"]
    br_batch.write_text("\n".join(br_lines) + "\n")
    tables = compile_firewall(parse_node_state(state_raw(n)))
    nft_file = work / "tables.nft"
    nft_file.write_text(nft_text.batch(tables.structure, tables.elements, set_tables(tables.structure)))
    return wg_conf, ip_batch, br_batch, nft_file


def run_floor(box: Sandbox, n: int, work: Path) -> float:
    wg_conf, ip_batch, br_batch, nft_file = floor_files(n, work)
    script = (
        "WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1 wireguard-go vnwg0 >/dev/null 2>&1; "
        "while [ ! -S /run/wireguard/vnwg0.sock ]; do sleep 0.005; done; "
        f"wg setconf vnwg0 {wg_conf} && ip -batch {ip_batch} && bridge -batch {br_batch} && nft -f {nft_file}"
    )
    t0 = time.perf_counter()
    result = subprocess.run(f"{box.prefix()} sh -c {json.dumps(script)}", shell=True, text=True, capture_output=True)
    elapsed = time.perf_counter() - t0
    if result.returncode != 0:
        raise RuntimeError(f"floor failed: {result.stderr.strip()[:500]}")
    counts = box.run("wg show vnwg0 peers | wc -l").stdout.split()
    if int(counts[0]) != n:
        raise RuntimeError(f"floor programmed {counts[0]} peers, expected {n}")
    return elapsed


def run_agent(box: Sandbox, n: int) -> dict[str, Any]:
    state_dir = Path(tempfile.mkdtemp(prefix="vnbench-state-"))
    cmd = f"{box.prefix()} {sys.executable} {Path(__file__).resolve()} --inner {n} --state-dir {state_dir}"
    result = subprocess.run(cmd, shell=True, text=True, capture_output=True)
    if result.returncode != 0:
        raise RuntimeError(f"agent run failed:\n{result.stderr[-3000:]}")
    data: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    observed = box.run("wg show vnwg0 peers | wc -l; ip -6 neigh show dev vnbr100 nud permanent | wc -l").stdout.split()
    data["kernel_peers"], data["kernel_neigh"] = int(observed[0]), int(observed[1])
    return data


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100,1000,5000")
    parser.add_argument("--repeat", type=int, default=3, help="runs per size; the median is reported")
    parser.add_argument("--inner", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--state-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner is not None:
        print(json.dumps(inner_agent(args.inner, args.state_dir)))
        return 0
    if os.geteuid() != 0:
        print("run as root", file=sys.stderr)
        return 1
    rows = []
    try:
        for n in (int(s) for s in args.sizes.split(",")):
            agents, floors = [], []
            for _ in range(args.repeat):
                with tempfile.TemporaryDirectory(prefix="vnbench-") as work, Sandbox("floor") as box:
                    floors.append(run_floor(box, n, Path(work)))
                with Sandbox("agent") as box:
                    agents.append(run_agent(box, n))
            agents.sort(key=lambda r: r["full_s"])
            floors.sort()
            a, f = agents[len(agents) // 2], floors[len(floors) // 2]
            one = sorted(r["one_s"] for r in agents)[len(agents) // 2]
            rows.append((n, a, f, one))
            print(f"  N={n}: agent {a['full_s']:.3f}s floor {f:.3f}s", file=sys.stderr)
            for r in agents:
                if r["not_converged"]:
                    print(f"  N={n}: NOT CONVERGED: {r['not_converged']}", file=sys.stderr)
    finally:
        Sandbox("floor").destroy()
        Sandbox("agent").destroy()
        sh(f"umount {MNT_DIR}", check=False)
        shutil.rmtree(MNT_DIR, ignore_errors=True)
    header = (f"{'N peers':>8} {'agent full s':>13} {'floor s':>9} {'ratio':>6} {'1-peer ms':>10} "
              f"{'1-peer ops':>10} {'1-peer reqs':>11} {'no-op ms':>9} {'converged':>9} "
              f"{'peers/neigh in kernel':>22} {'RSS MB':>7}")
    print("\nData plane programming: agent vs floor (wg setconf + ip -batch + bridge -batch + nft -f), "
          "median of runs")
    print(header)
    print("-" * len(header))
    for n, a, f, one in rows:
        print(f"{n:>8} {a['full_s']:>13.3f} {f:>9.3f} {a['full_s'] / f:>6.2f} {one * 1000:>10.1f} {a['one_ops']:>10} "
              f"{a['one_requests']:>11} {a['noop_s'] * 1000:>9.1f} {a['converged']!s:>9} "
              f"{a['kernel_peers']:>10}/{a['kernel_neigh']:<11} {a['max_rss_mb']:>7.0f}")
    print("\nagent full: read the JSON state file, validate, render, read the kernel back, plan, apply; from empty.")
    print("1-peer: the state file gains one peer: read + diff + validate that peer + patch target + plan against")
    print("        the cached kernel model + apply (1 wg process, 1 netlink batch). 1-peer reqs = kernel requests.")
    print("no-op: the same file again: nothing to do.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
