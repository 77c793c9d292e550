"""Time WireGuardDriver peer batches against `wg setconf` (run inside a simulated host).

    nsenter --mount=M --net=N python integration/bench/wg_peers.py --state-dir D [--keepalive S]

For each size: a fresh interface, the driver's SyncWgPeers upsert from empty,
then a fresh interface and one `wg setconf` of the same peers. At the largest
size: one-peer changes through the driver and a full observe().
Fake peers: random keys, endpoints in 192.0.2.0/24, one /128 each from fd00:18::/64 (no traffic is sent).
"""

from __future__ import annotations

import argparse
import base64
import ipaddress
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from veilnet_agent.core.naming import WG_IFNAME
from veilnet_agent.core.objects import WgInterface, WgPeer
from veilnet_agent.core.ops import EnsureWgInterface, SyncWgPeers
from veilnet_agent.drivers.wireguard import WireGuardDriver, peer_config


def fake_peers(count: int, keepalive: int, offset: int = 0) -> list[WgPeer]:
    base = int(ipaddress.ip_address("fd00:18::")) + offset
    return [
        WgPeer(
            public_key=base64.b64encode(os.urandom(32)).decode(),
            endpoint=f"192.0.2.{i % 250 + 3}:{20000 + i % 40000}",
            allowed_ips=frozenset({f"{ipaddress.ip_address(base + i)}/128"}),
            keepalive=keepalive,
        )
        for i in range(count)
    ]


def fresh_interface(driver: WireGuardDriver) -> None:
    driver.remove_interface()
    target = WgInterface(WG_IFNAME, 51820, driver.ensure_private_key(), 1420,
                         frozenset({"198.51.100.1/24"}))
    result = driver.apply([EnsureWgInterface(target, create=True, reason="bench")])
    assert not result.failed, result.failed


def timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def sync(driver: WireGuardDriver, upserts: list[WgPeer], removes: list[str]) -> None:
    result = driver.apply([SyncWgPeers(tuple(upserts), tuple(removes), reason="bench")])
    assert not result.failed, result.failed


def setconf(peers: list[WgPeer]) -> None:
    config = "[Interface]\nListenPort = 51820\n" + "".join(peer_config(p) for p in peers)
    subprocess.run(["wg", "setconf", WG_IFNAME, "/dev/stdin"], input=config, text=True,
                   check=True)


def peer_count() -> int:
    out = subprocess.run(["wg", "show", WG_IFNAME, "peers"], capture_output=True, text=True,
                         check=True).stdout
    return len(out.split())


def median_ms(samples: list[float]) -> str:
    return f"median {statistics.median(samples) * 1000:.1f} ms, max {max(samples) * 1000:.1f} ms"


def bulk(driver: WireGuardDriver, sizes: list[int], keepalive: int, repeats: int) -> None:
    """Median of ``repeats`` interleaved runs of each method, each from a fresh interface."""
    print(f"{'peers':>6} {'driver (addconf)':>17} {'wg setconf':>11}   (median of {repeats})")
    for size in sizes:
        ours, theirs = [], []
        for _ in range(repeats):
            peers = fake_peers(size, keepalive)
            fresh_interface(driver)
            ours.append(timed(lambda peers=peers: sync(driver, peers, [])))  # type: ignore[misc]
            assert peer_count() == size
            fresh_interface(driver)
            theirs.append(timed(lambda peers=peers: setconf(peers)))  # type: ignore[misc]
            assert peer_count() == size
        print(
            f"{size:>6} {statistics.median(ours) * 1000:>14.0f} ms"
            f" {statistics.median(theirs) * 1000:>8.0f} ms",
            flush=True,
        )


def single_changes(driver: WireGuardDriver, size: int, keepalive: int, rounds: int) -> None:
    fresh_interface(driver)
    peers = fake_peers(size, keepalive)
    sync(driver, peers, [])
    updates, adds, removes, observes = [], [], [], []
    extra = fake_peers(rounds, keepalive, offset=size)
    for i in range(rounds):
        moved = WgPeer(peers[i].public_key, "192.0.2.254:1",
                       frozenset({f"198.51.100.{i + 1}/128"}), 0)
        updates.append(timed(lambda moved=moved: sync(driver, [moved], [])))  # type: ignore[misc]
        adds.append(timed(lambda i=i: sync(driver, [extra[i]], [])))  # type: ignore[misc]
        key = peers[size - 1 - i].public_key
        removes.append(timed(lambda key=key: sync(driver, [], [key])))  # type: ignore[misc]
    for _ in range(5):
        observes.append(timed(driver.observe))  # the first one fills the parse caches
    assert len(driver.observe().peers) == size
    print(f"at {size} peers: one-peer update {median_ms(updates)}")
    print(f"at {size} peers: one-peer add    {median_ms(adds)}")
    print(f"at {size} peers: one-peer remove {median_ms(removes)}")
    print(f"at {size} peers: observe()       {median_ms(observes)}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--keepalive", type=int, default=0)
    parser.add_argument("--sizes", default="100,1000,5000")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    driver = WireGuardDriver(WG_IFNAME, args.state_dir, backend="userspace")
    print(f"keepalive={args.keepalive}")
    bulk(driver, sizes, args.keepalive, args.repeats)
    single_changes(driver, max(sizes), args.keepalive, args.rounds)
    driver.remove_interface()


if __name__ == "__main__":
    main()
