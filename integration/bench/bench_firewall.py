#!/usr/bin/env python3
"""Firewall benchmark: the agent's nftables path against the `nft -f` floor, one-element changes, throughput.

A desired state with N allowed tuples (one segment `blue`, 203.0.113.0/24, mode default-deny; policy `bulk`:
S sources x D destinations x 10 TCP ports 5201-5210, S*D*10 = N; sources are remote peers' endpoints plus the
local iperf3 client, destinations are local endpoints, the iperf3 server among them; policy `probe`: tcp/9100
from label probe=on to label probe-target=yes, which selects nobody until the one-label change). Every
tuple lands in the one hash map `allow4_ports`, the map the iperf3 flow's packets are looked up in.

  load   : the agent's path into an empty namespace: parse_node_state + compile_firewall +
           FirewallDriver.apply_full; against two floors in fresh namespaces of the same run:
           `nft -f` of the very text batch the driver sent, and `nft -f` of the text that
           `nft list table inet veilnet` and `nft list table bridge veilnet` print for the agent's result.
  change : one element, at each size: (a) the kernel part, FirewallDriver.apply_elements adding then
           removing one element; (b) the agent's path: a state with one label changed -> parse ->
           FirewallManager.accept (incremental recompile) -> reconcile (apply the element delta);
           (c) the same path for one endpoint appearing and leaving (a peer with one endpoint): its
           anti-spoofing elements are the cost of the checks on a one-endpoint change.
  iperf3 : TCP throughput client -> server (two namespaces on a bridge with nf_call_iptables and
           nf_call_ip6tables on, in a host namespace that holds the tables, ports named and MACs set as
           the agent makes them): no table, then the agent's tables of the small and of the big size,
           each with the anti-spoofing checks on and off; interleaved rounds, the median reported.

Run as root:  .venv/bin/python integration/bench/bench_firewall.py [--sizes 10,1000,100000]
Prints tables; never asserts. Namespaces (vnbfw-*) are removed even on failure.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "agent"))
sys.path.insert(0, str(REPO / "integration"))
from factories import wg_key  # noqa: E402
from lab import delete_netns  # noqa: E402

from veilnet_agent.core import naming  # noqa: E402
from veilnet_agent.core.config import FirewallConfig  # noqa: E402
from veilnet_agent.core.firewall_compiler import CompiledFirewall, Element, compile_firewall  # noqa: E402
from veilnet_agent.core.model import parse_node_state  # noqa: E402
from veilnet_agent.dataplane.firewall_manager import FirewallManager  # noqa: E402
from veilnet_agent.drivers.firewall import FirewallDriver  # noqa: E402

PREFIX = "vnbfw"
VNI = 100
BRIDGE = naming.bridge_name(VNI)
PORTS = (5201, 5210)  # 10 ports, expanded into exact tuples (hash map); the iperf3 port is the first
IPERF_PORT = 5201
PROBE_PORT = 9100
CLIENT_IP = "203.0.113.2"
SERVER_IP = "203.0.113.3"
FIRST_EXTRA = 4  # further endpoints: 203.0.113.4 .. 203.0.113.254
MAP = "allow4_ports"
EXTRA_ELEMENT: Element = ((CLIENT_IP, SERVER_IP, 6, 9999), "p_bulk")  # not allowed by any policy


def sh(cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, shell=True, check=check, text=True, capture_output=True)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# --- namespaces -------------------------------------------------------------------------------------------
class Namespaces:
    """Network namespaces named vnbfw-<name>; processes left inside are killed, then the namespaces removed."""

    def __init__(self, *names: str) -> None:
        self.names = [f"{PREFIX}-{n}" for n in names]

    def __enter__(self) -> Namespaces:
        destroy(self.names)
        for name in self.names:
            sh(f"ip netns add {name}")
            sh(f"ip -n {name} link set lo up")
        return self

    def __exit__(self, *exc: object) -> None:
        destroy(self.names)


def destroy(names: list[str]) -> None:
    for name in names:
        delete_netns(name)


ALL_NAMESPACES = ["agent", "json", "text", "host", "cli", "srv"]


# --- the desired state ------------------------------------------------------------------------------------
def grid(n: int) -> tuple[int, int]:
    """(sources, destinations) with sources * destinations * 10 ports == n, as square as possible."""
    width = PORTS[1] - PORTS[0] + 1
    if n % width:
        raise ValueError(f"size {n} is not a multiple of {width} ports")
    pairs = n // width
    sources = max(d for d in range(1, math.isqrt(pairs) + 1) if pairs % d == 0)
    destinations = pairs // sources
    if sources + destinations - 2 > 255 - FIRST_EXTRA:
        raise ValueError(f"size {n} needs {sources + destinations} addresses: more than 203.0.113.0/24 holds")
    return sources, destinations


def state_raw(n: int, probe: bool = False) -> dict[str, Any]:
    """N allowed tuples; ``probe``: the one label changed (client gains probe=on: one tuple more)."""
    sources, destinations = grid(n)
    extra = iter(f"203.0.113.{i}" for i in range(FIRST_EXTRA, 255))
    client_labels = {"tier": "web", **({"probe": "on"} if probe else {})}
    endpoints = [
        {"name": "client", "segment": "blue", "mac": "02:00:00:00:00:02", "ipv4": CLIENT_IP,
         "netns": f"{PREFIX}-cli", "ifname": "eth0", "labels": client_labels},
        {"name": "server", "segment": "blue", "mac": "02:00:00:00:00:03", "ipv4": SERVER_IP,
         "netns": f"{PREFIX}-srv", "ifname": "eth0", "labels": {"tier": "db", "probe-target": "yes"}},
    ]
    peers = []
    for i in range(sources - 1):
        peers.append({
            "name": f"peer-{i}", "underlay_address": f"192.0.2.{i % 250 + 1}", "underlay_port": 51820,
            "public_key": wg_key(f"bench-fw-{i}"), "transport_address": f"fd00:7::{i + 2:x}",
            "endpoints": [{"segment": "blue", "mac": f"02:01:00:00:00:{i:02x}", "ips": [next(extra)],
                           "labels": {"tier": "web"}}],
        })
    for j in range(destinations - 1):
        # Local endpoints need a namespace name; the firewall never touches it (it is never created).
        endpoints.append({"name": f"db-{j}", "segment": "blue", "mac": f"02:02:00:00:00:{j:02x}",
                          "ipv4": next(extra), "netns": f"{PREFIX}-not-created", "ifname": f"eth{j + 1}",
                          "labels": {"tier": "db"}})
    return {
        "node": "bench",
        "transport_address": "fd00:7::1/64",
        "segments": [{"name": "blue", "vni": VNI, "mode": "default-deny",
                      "ipv4_subnet": "203.0.113.0/24", "ipv4_gateway": "203.0.113.1",
                      "ipv6_subnet": "fd00:b1::/64", "ipv6_gateway": "fd00:b1::1"}],
        "endpoints": endpoints,
        "peers": peers,
        "policies": [
            {"name": "bulk", "protocol": "tcp", "ports": [f"{PORTS[0]}-{PORTS[1]}"],
             "source": {"segment": "blue", "match_labels": {"tier": "web"}},
             "destination": {"segment": "blue", "match_labels": {"tier": "db"}}},
            {"name": "probe", "protocol": "tcp", "ports": [PROBE_PORT],
             "source": {"match_labels": {"probe": "on"}},
             "destination": {"match_labels": {"probe-target": "yes"}}},
        ],
    }


def count(elements: Mapping[str, frozenset[Element]]) -> int:
    return sum(len(e) for e in elements.values())


# --- helpers around nft -------------------------------------------------------------------------------------
def nft_in(ns: str, args: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    """Run nft in namespace ``ns``; wall time including nsenter and nft process start."""
    t0 = time.perf_counter()
    done = sh(f"nsenter --net=/run/netns/{ns} nft {args}", check=False)
    return time.perf_counter() - t0, done


@contextmanager
def recording(driver: FirewallDriver) -> Iterator[dict[str, Any]]:
    """Keep a reference to the text batch the driver hands to libnftables (the very commands sent)."""
    seen: dict[str, Any] = {}
    nft = driver._nft
    original = nft.cmd

    def cmd(text: str) -> Any:
        seen["text"] = text
        return original(text)

    nft.cmd = cmd
    try:
        yield seen
    finally:
        del nft.cmd


def matches(driver: FirewallDriver, want: CompiledFirewall) -> bool:
    """The allow-map elements read back equal the compiled ones."""
    observed = driver.observe()
    names = set(want.elements) | set(observed.elements)
    return observed.present and all(
        observed.elements.get(n, frozenset()) == want.elements.get(n, frozenset()) for n in names
    )


# --- 1. full load --------------------------------------------------------------------------------------------
def measure_load(n: int, repeat: int, work: Path, verify: bool) -> dict[str, Any]:
    raw = state_raw(n)
    runs: list[dict[str, Any]] = []
    json_file, text_file = work / f"sent-{n}.nft", work / f"listed-{n}.nft"
    for r in range(repeat):
        with Namespaces("agent", "json", "text"), FirewallDriver(f"{PREFIX}-agent") as driver:
            # (the driver is created once at agent start: not timed)
            gc.collect()
            with recording(driver) as seen:
                t0 = time.perf_counter()
                state = parse_node_state(raw)
                t1 = time.perf_counter()
                compiled = compile_firewall(state)
                t2 = time.perf_counter()
                driver.apply_full(compiled)
                t3 = time.perf_counter()
            run = {"parse": t1 - t0, "compile": t2 - t1, "apply": t3 - t2, "nft": driver.last_duration_s,
                   "total": t3 - t0, "elements": count(compiled.elements)}
            if r == 0:
                json_file.write_text(seen["text"])
                listed = sh(f"nsenter --net=/run/netns/{PREFIX}-agent sh -c "
                            "'nft list table inet veilnet; nft list table bridge veilnet'")
                text_file.write_text(listed.stdout)
            run["floor_json"], done_json = nft_in(f"{PREFIX}-json", f"-f {json_file}")
            run["floor_text"], done_text = nft_in(f"{PREFIX}-text", f"-f {text_file}")
            for what, done in (("json", done_json), ("text", done_text)):
                if done.returncode != 0:
                    raise RuntimeError(f"floor nft {what} failed: {done.stderr.strip()[:500]}")
            if verify and r == 0:
                t4 = time.perf_counter()
                run["ok_agent"] = matches(driver, compiled)
                run["observe"] = time.perf_counter() - t4
                for what in ("json", "text"):
                    with FirewallDriver(f"{PREFIX}-{what}") as other:
                        run[f"ok_{what}"] = matches(other, compiled)
                run["iperf_tuple"] = ((CLIENT_IP, SERVER_IP, 6, IPERF_PORT), "p_bulk") in compiled.elements[MAP]
                run["maps"] = {k: len(v) for k, v in compiled.elements.items() if v}
            runs.append(run)
    runs.sort(key=lambda x: x["total"])
    result = dict(runs[len(runs) // 2])
    for key in ("parse", "compile", "apply", "nft", "floor_json", "floor_text"):
        result[key] = median([x[key] for x in runs])
    result["total"] = median([x["total"] for x in runs])
    first = next(x for x in runs if "maps" in x) if verify else {}
    for key in ("ok_agent", "ok_json", "ok_text", "observe", "iperf_tuple", "maps"):
        result[key] = first.get(key)
    result["json_mb"] = json_file.stat().st_size / 1e6
    result["text_mb"] = text_file.stat().st_size / 1e6
    return result


# --- 2. one-element changes -----------------------------------------------------------------------------------
def measure_changes(n: int, changes: int) -> dict[str, Any]:
    base_raw, probe_raw = state_raw(n), state_raw(n, probe=True)
    out: dict[str, Any] = {}
    with Namespaces("agent"), FirewallDriver(f"{PREFIX}-agent") as driver:
        compiled = compile_firewall(parse_node_state(base_raw))
        driver.apply_full(compiled)
        gc.collect()

        # (a) the kernel part: one element added, then removed.
        one = {MAP: frozenset({EXTRA_ELEMENT})}
        add_s, del_s, add_nft, del_nft = [], [], [], []
        for _ in range(changes):
            t0 = time.perf_counter()
            driver.apply_elements(one, {})
            add_s.append(time.perf_counter() - t0)
            add_nft.append(driver.last_duration_s)
            t0 = time.perf_counter()
            driver.apply_elements({}, one)
            del_s.append(time.perf_counter() - t0)
            del_nft.append(driver.last_duration_s)
        out.update(k_add=median(add_s), k_del=median(del_s), k_add_nft=median(add_nft), k_del_nft=median(del_nft))

        # (b) the agent's path: one label changed -> parse -> FirewallManager.accept (incremental
        # recompile of the changed endpoint's tuples) -> reconcile (apply the element delta).
        manager = FirewallManager(driver, FirewallConfig(nflog_group=7410, log_per_second=10), "bench")
        manager.accept(parse_node_state(base_raw))
        manager.reconcile(full=True)  # adopts the table loaded above (same fingerprint and elements)
        steps: dict[str, list[dict[str, float]]] = {"add": [], "del": []}
        diff_sizes: set[tuple[str, int, int]] = set()
        fingerprints = {compiled.fingerprint}
        for _ in range(changes):
            for kind, raw in (("add", probe_raw), ("del", base_raw)):
                t0 = time.perf_counter()
                state = parse_node_state(raw)
                t1 = time.perf_counter()
                manager.accept(state)
                t2 = time.perf_counter()
                outcome = manager.reconcile(full=False)
                t3 = time.perf_counter()
                steps[kind].append({"parse": t1 - t0, "compile": t2 - t1, "diff": 0.0, "apply": t3 - t2,
                                    "total": t3 - t0})
                diff_sizes.add((kind, outcome.added, outcome.deleted))
                fingerprints.add(manager.fingerprint)
        for kind in ("add", "del"):
            for key in ("parse", "compile", "diff", "apply", "total"):
                out[f"e_{kind}_{key}"] = median([s[key] for s in steps[kind]])
        out["diffs"] = " ".join(f"{k}:+{a}/-{d}" for k, a, d in sorted(diff_sizes))

        # (c) one endpoint appears and leaves (a new peer with one unlabelled endpoint: no policy tuple,
        # so every element it changes is an anti-spoofing one).
        joined_raw = copy.deepcopy(base_raw)
        joined_raw["peers"].append({
            "name": "newcomer", "underlay_address": "192.0.2.253", "public_key": wg_key("bench-fw-newcomer"),
            "transport_address": "fd00:7::fffe",
            "endpoints": [{"segment": "blue", "mac": "02:03:00:00:00:01", "ips": ["fd00:b1::fffe"]}]})
        endpoint_steps: dict[str, list[float]] = {"join": [], "leave": []}
        endpoint_sizes: set[tuple[str, int, int]] = set()
        for _ in range(changes):
            for kind, raw in (("join", joined_raw), ("leave", base_raw)):
                t0 = time.perf_counter()
                manager.accept(parse_node_state(raw))
                outcome = manager.reconcile(full=False)
                endpoint_steps[kind].append(time.perf_counter() - t0)
                endpoint_sizes.add((kind, outcome.added, outcome.deleted))
                fingerprints.add(manager.fingerprint)
        out["ep_join"], out["ep_leave"] = median(endpoint_steps["join"]), median(endpoint_steps["leave"])
        out["ep_diffs"] = " ".join(f"{k}:+{a}/-{d}" for k, a, d in sorted(endpoint_sizes))
        out["same_structure"] = len(fingerprints) == 1
        out["ok"] = matches(driver, compiled)  # after the last revert the kernel holds the base state again
    return out


# --- 3. iperf3 ---------------------------------------------------------------------------------------------------
def iperf_topology() -> None:
    host, cli, srv = (f"{PREFIX}-{n}" for n in ("host", "cli", "srv"))
    sh(f"ip -n {host} link add {BRIDGE} type bridge stp_state 0 nf_call_iptables 1 nf_call_ip6tables 1")
    sh(f"ip -n {host} link set {BRIDGE} up")
    # Named and addressed as the agent makes them, so the anti-spoofing checks see the flow as theirs.
    for ns, name, mac, ip in ((cli, "client", "02:00:00:00:00:02", CLIENT_IP),
                              (srv, "server", "02:00:00:00:00:03", SERVER_IP)):
        port = naming.endpoint_host_name(name)
        sh(f"ip -n {host} link add {port} type veth peer name eth0 netns {ns}")
        sh(f"ip -n {host} link set {port} master {BRIDGE} up")
        sh(f"ip -n {ns} link set eth0 address {mac}")
        sh(f"ip -n {ns} addr add {ip}/24 dev eth0 && ip -n {ns} link set eth0 up")


def iperf_run(seconds: int) -> float:
    """Gbit/s received by the server, client -> server."""
    cmd = f"ip netns exec {PREFIX}-cli iperf3 -c {SERVER_IP} -p {IPERF_PORT} -t {seconds} -J"
    done = sh(cmd, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"iperf3 failed: {(done.stdout + done.stderr).strip()[-500:]}")
    return float(json.loads(done.stdout)["end"]["sum_received"]["bits_per_second"]) / 1e9


def ping_passes() -> bool:
    return sh(f"ip netns exec {PREFIX}-cli ping -c 1 -W 1 {SERVER_IP}", check=False).returncode == 0


def run_configs(driver: FirewallDriver, configs: list[tuple[str, CompiledFirewall | None]],
                results: dict[str, dict[str, Any]], seconds: int, rounds: int) -> None:
    for _ in range(rounds):
        for label, compiled in configs:
            entry = results[label]
            if compiled is None:
                driver.remove()
            else:
                driver.apply_full(compiled)
                entry["elements"] = count(compiled.elements)
            before = driver.counters()
            entry["gbps"].append(iperf_run(seconds))
            after = driver.counters()
            entry["policy_packets"] = after.get("p_bulk", (0, 0))[0] - before.get("p_bulk", (0, 0))[0]
            entry["spoof_drops"] = after.get("spoof_drop", (0, 0))[0] - before.get("spoof_drop", (0, 0))[0]
            entry["ping_passes"] = ping_passes()
    driver.remove()


def without_antispoofing(compiled: CompiledFirewall) -> CompiledFirewall:
    """The same tables with the two jumps into the anti-spoofing chains taken out (checks off)."""
    def is_check(command: Mapping[str, Any]) -> bool:
        rule = command.get("add", {}).get("rule")
        return rule is not None and any(expr.get("jump", {}).get("target") in ("from_endpoint", "from_peer")
                                        for expr in rule["expr"])
    return CompiledFirewall(tuple(c for c in compiled.structure if not is_check(c)), compiled.elements,
                            compiled.fingerprint)


def measure_iperf(sizes: list[int], seconds: int, rounds: int) -> list[dict[str, Any]]:
    configs: list[tuple[str, CompiledFirewall | None]] = [("no table", None)]
    for n in sizes:
        compiled = compile_firewall(parse_node_state(state_raw(n)))
        configs += [(f"{n:,} tuples", compiled), (f"{n:,}, checks off", without_antispoofing(compiled))]
    results: dict[str, dict[str, Any]] = {label: {"gbps": [], "label": label} for label, _ in configs}
    with Namespaces("host", "cli", "srv"):
        iperf_topology()
        server = subprocess.Popen(
            ["ip", "netns", "exec", f"{PREFIX}-srv", "iperf3", "-s", "-B", SERVER_IP, "-p", str(IPERF_PORT)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            for _ in range(100):  # wait until it listens
                if f"{SERVER_IP}:{IPERF_PORT}" in sh(f"ip netns exec {PREFIX}-srv ss -ltnH").stdout:
                    break
                time.sleep(0.05)
            with FirewallDriver(f"{PREFIX}-host") as driver:
                run_configs(driver, configs, results, seconds, rounds)
        finally:
            server.terminate()
            try:
                server.wait(timeout=5)
            except subprocess.TimeoutExpired:
                server.kill()
    return [results[label] for label, _ in configs]


# --- report -----------------------------------------------------------------------------------------------------
def table(title: str, columns: list[tuple[str, int]], rows: list[list[str]]) -> None:
    print(f"\n{title}")
    header = " ".join(f"{name:>{width}}" for name, width in columns)
    print(header)
    print("-" * len(header))
    for row in rows:
        print(" ".join(f"{cell:>{width}}" for cell, (_, width) in zip(row, columns, strict=True)))


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10,1000,100000", help="allowed tuples (multiples of 10)")
    parser.add_argument("--repeat", type=int, default=3, help="full loads per size; medians are reported")
    parser.add_argument("--changes", type=int, default=15, help="one-element changes per size; medians reported")
    parser.add_argument("--iperf-sizes", default="10,100000")
    parser.add_argument("--iperf-seconds", type=int, default=5)
    parser.add_argument("--iperf-rounds", type=int, default=3,
                        help="interleaved rounds of (no table, each size); the median is reported")
    parser.add_argument("--no-iperf", action="store_true")
    parser.add_argument("--no-verify", action="store_true", help="skip reading the tables back")
    args = parser.parse_args()
    from veilnet_agent import logs

    logs.configure("json", "warning")  # the manager logs every element change at info: not this table's business
    if os.geteuid() != 0:
        print("run as root", file=sys.stderr)
        return 1
    sizes = [int(s) for s in args.sizes.split(",")]
    iperf_sizes = [int(s) for s in args.iperf_sizes.split(",")]
    for n in sizes + iperf_sizes:
        grid(n)  # fail early on a size the address plan cannot hold
    loads: list[tuple[int, dict[str, Any]]] = []
    change_rows: list[tuple[int, dict[str, Any]]] = []
    iperf: list[dict[str, Any]] = []
    startup: list[float] = []
    try:
        with tempfile.TemporaryDirectory(prefix=f"{PREFIX}-") as tmp:
            work = Path(tmp)
            empty = work / "empty.nft"
            empty.write_text("")
            with Namespaces("json"):
                startup = [nft_in(f"{PREFIX}-json", f"-f {empty}")[0] for _ in range(5)]
            for n in sizes:
                load = measure_load(n, args.repeat, work, not args.no_verify)
                loads.append((n, load))
                print(f"  N={n}: agent {load['total']:.3f}s (nft call {load['nft']:.3f}s) "
                      f"floor json {load['floor_json']:.3f}s text {load['floor_text']:.3f}s", file=sys.stderr)
                change = measure_changes(n, args.changes)
                change_rows.append((n, change))
                print(f"  N={n}: one element kernel +{ms(change['k_add'])}ms -{ms(change['k_del'])}ms, "
                      f"label e2e +{ms(change['e_add_total'])}ms -{ms(change['e_del_total'])}ms", file=sys.stderr)
        if not args.no_iperf:
            iperf = measure_iperf(iperf_sizes, args.iperf_seconds, args.iperf_rounds)
            for entry in iperf:
                print(f"  iperf3 {entry['label']}: {entry['gbps']}", file=sys.stderr)
    finally:
        destroy([f"{PREFIX}-{n}" for n in ALL_NAMESPACES])

    report(loads, change_rows, iperf, startup, args)
    return 0


def report(loads: list[tuple[int, dict[str, Any]]], change_rows: list[tuple[int, dict[str, Any]]],
           iperf: list[dict[str, Any]], startup: list[float], args: argparse.Namespace) -> None:
    rows = []
    for n, r in loads:
        floor = min(r["floor_json"], r["floor_text"])
        check: Callable[[str], str] = lambda key, r=r: "-" if r[key] is None else ("ok" if r[key] else "DIFF")  # noqa: E731
        rows.append([f"{n:,}", f"{r['elements']:,}", ms(r["parse"]), ms(r["compile"]), ms(r["apply"]),
                     ms(r["nft"]), ms(r["total"]), ms(r["floor_json"]), ms(r["floor_text"]),
                     f"{r['total'] / floor:.2f}", f"{r['json_mb']:.1f}/{r['text_mb']:.1f}",
                     "-" if r["observe"] is None else ms(r["observe"]),
                     f"{check('ok_agent')}/{check('ok_json')}/{check('ok_text')}"])
    table(f"1. Full load into an empty namespace, median of {args.repeat} (times in ms)",
          [("N", 8), ("elements", 8), ("parse", 7), ("compile", 8), ("apply_full", 10), ("nft call", 9),
           ("agent", 9), ("floor sent", 10), ("floor listed", 12), ("ratio", 6), ("sent/listed MB", 14),
           ("observe", 8), ("agent/json/text", 15)], rows)
    for n, r in loads:
        if r["maps"] is not None:
            maps = ", ".join(f"{k} {v:,}" for k, v in sorted(r["maps"].items()))
            flow = "yes" if r["iperf_tuple"] else "NO"
            print(f"  N={n:,}: elements per map: {maps}; iperf3 tuple {CLIENT_IP} . {SERVER_IP} . tcp . "
                  f"{IPERF_PORT} compiled: {flow}")

    rows = []
    for n, c in change_rows:
        rows.append([f"{n:,}", ms(c["k_add"]), ms(c["k_del"]), ms(c["e_add_total"]), ms(c["e_del_total"]),
                     ms(c["e_add_parse"]), ms(c["e_add_compile"]), ms(c["e_add_diff"]), ms(c["e_add_apply"]),
                     c["diffs"], ms(c["ep_join"]), ms(c["ep_leave"]), c["ep_diffs"],
                     "yes" if c["same_structure"] else "NO", "ok" if c["ok"] else "DIFF"])
    table(f"2. One-element change, median of {args.changes} (ms; target < 20 ms at 100,000)",
          [("N", 8), ("kernel +1", 9), ("kernel -1", 9), ("label +1", 9), ("label -1", 9), ("parse", 7),
           ("compile", 8), ("diff", 6), ("apply", 6), ("diff sizes", 18), ("endpoint +", 10),
           ("endpoint -", 10), ("endpoint diff", 21), ("same fp", 7), ("after", 5)], rows)

    if iperf:
        small = next((e for e in iperf if e.get("elements") is not None), None)
        base = iperf[0]
        by_label = {e["label"]: e for e in iperf}
        rows = []
        for e in iperf:
            gbps = median(e["gbps"])
            vs_none = gbps / median(base["gbps"])
            vs_small = "-" if small is None or "elements" not in e else f"{gbps / median(small['gbps']):.3f}"
            off = by_label.get(e["label"].replace(" tuples", ", checks off"))
            vs_off = "-" if off is None or off is e or "elements" not in e else f"{gbps / median(off['gbps']):.3f}"
            rows.append([e["label"], f"{e['elements']:,}" if "elements" in e else "-", f"{gbps:.2f}",
                         f"{vs_none:.3f}", vs_small, vs_off, " ".join(f"{g:.2f}" for g in e["gbps"]),
                         f"{e['policy_packets']:,}" if "elements" in e else "-",
                         f"{e['spoof_drops']:,}" if "elements" in e else "-",
                         "passes" if e["ping_passes"] else "dropped"])
        table(f"3. iperf3 TCP client -> server {CLIENT_IP} -> {SERVER_IP}:{IPERF_PORT}, {args.iperf_seconds} s, "
              f"{args.iperf_rounds} round(s) (targets: big/small >= 0.9; checks on/off >= 0.9)",
              [("table", 20), ("elements", 8), ("Gbit/s", 7), ("vs none", 7), ("vs small", 8), ("on/off", 7),
               ("runs", 15), ("p_bulk pkts", 11), ("spoof drops", 11), ("ping", 7)], rows)

    print(f"""
Legend
  N: allowed tuples asked for; elements: tuples the compiler produced (all in the hash map {MAP}).
  parse: parse_node_state of the state dict; compile: compile_firewall; apply_full: FirewallDriver.apply_full
    (command checks, element encoding, the libnftables call); nft call: that call alone (json.dumps in the
    bindings, nft's JSON parser, netlink, kernel commit). agent = parse + compile + apply_full.
  floor sent: `nft -f` of the very text batch the driver sent; floor listed: `nft -f` of what `nft list table`
    prints of the agent's two tables; each into a fresh namespace, wall time including nsenter and nft start
    (an empty file: {ms(median(startup))} ms). ratio = agent / the faster floor.
  observe: FirewallDriver.observe of the loaded table; agent/json/text: the elements read back from each
    namespace equal the compiled ones.
  kernel +1/-1: FirewallDriver.apply_elements adding / deleting one element of {MAP}.
  endpoint +/-: the agent's path for one endpoint appearing / leaving (a new peer with one unlabelled endpoint:
    no policy tuples, so its elements are all anti-spoofing ones; endpoint diff: elements added/deleted).
  label +1/-1: the agent's path for one label changed (client gains / loses probe=on -> one tuple of policy
    probe): parse + FirewallManager.accept (incremental: only the changed endpoint's tuples are recomputed;
    "compile" column) + reconcile (the element delta applied; "apply" column) (columns: the +1 case).
    diff sizes: elements added/deleted per change; same fp: the structure fingerprint never changed;
    after: the kernel's elements equal the compiled state after the last change.
  iperf3: the table loaded in the host namespace of the bridge (br_netfilter: bridged traffic traverses the inet
    forward hook, also without a table); Gbit/s: median of the runs listed; p_bulk pkts: packets counted on
    policy bulk's counter during the last run (new connections only: the rest matches ct established); spoof
    drops: frames the anti-spoofing checks dropped during the run (0: the flow is the endpoints' own); on/off:
    throughput with the checks on over off, same tables otherwise; ping: ICMP client -> server, which no policy
    allows (dropped = the table is in the path).
""".rstrip())


if __name__ == "__main__":
    sys.exit(main())
