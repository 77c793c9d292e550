"""Run WireGuardDriver calls inside a simulated host (used by test_wireguard_driver.py).

Started with ``nsenter --mount=... --net=... python wg_driver_host.py CMD ...``;
each call is a fresh process, as an agent restart would be. Ops come as JSON on
stdin, results go as JSON to stdout, the driver's logs (structlog JSON, debug) to stderr.

    pubkey  --state-dir D
    apply   --state-dir D --ifname IF [--backend B]   < [{"op": "ensure"|"sync", ...}]
    observe --state-dir D --ifname IF
    remove  --state-dir D --ifname IF
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from veilnet_agent import logs
from veilnet_agent.core.objects import WgInterface, WgObservation, WgPeer
from veilnet_agent.core.ops import EnsureWgInterface, SyncWgPeers, WgOp
from veilnet_agent.drivers.wireguard import WireGuardDriver


def interface_from_json(data: dict[str, Any]) -> WgInterface:
    return WgInterface(
        name=data["name"],
        listen_port=int(data["listen_port"]),
        public_key=data["public_key"],
        mtu=int(data["mtu"]),
        addresses=frozenset(data["addresses"]),
    )


def peer_from_json(data: dict[str, Any]) -> WgPeer:
    return WgPeer(
        public_key=data["public_key"],
        endpoint=data["endpoint"],
        allowed_ips=frozenset(data["allowed_ips"]),
        keepalive=int(data.get("keepalive", 0)),
    )


def op_from_json(data: dict[str, Any]) -> WgOp:
    if data["op"] == "ensure":
        return EnsureWgInterface(
            target=interface_from_json(data["target"]), create=bool(data["create"]), reason="test"
        )
    return SyncWgPeers(
        upserts=tuple(peer_from_json(p) for p in data.get("upserts", [])),
        removes=tuple(data.get("removes", [])),
        reason="test",
    )


def interface_to_json(interface: WgInterface) -> dict[str, Any]:
    return {
        "name": interface.name,
        "listen_port": interface.listen_port,
        "public_key": interface.public_key,
        "mtu": interface.mtu,
        "addresses": sorted(interface.addresses),
    }


def peer_to_json(peer: WgPeer) -> dict[str, Any]:
    return {
        "public_key": peer.public_key,
        "endpoint": peer.endpoint,
        "allowed_ips": sorted(peer.allowed_ips),
        "keepalive": peer.keepalive,
    }


def observation_to_json(obs: WgObservation) -> dict[str, Any]:
    return {
        "interface": interface_to_json(obs.interface) if obs.interface else None,
        "peers": {key: peer_to_json(peer) for key, peer in sorted(obs.peers.items())},
        "backend": obs.backend,
        "handshakes": obs.handshakes,
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["pubkey", "apply", "observe", "remove"])
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--ifname", default="vnwg0")
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args()
    logs.configure("json", "debug")
    driver = WireGuardDriver(args.ifname, args.state_dir, backend=args.backend)
    out: Any
    if args.command == "pubkey":
        out = {"public_key": driver.ensure_private_key()}
    elif args.command == "apply":
        ops = [op_from_json(item) for item in json.load(sys.stdin)]
        result = driver.apply(ops)
        out = {
            "applied": len(result.applied),
            "failed": [message for _, message in result.failed],
            "requests": result.requests,
        }
    elif args.command == "observe":
        out = observation_to_json(driver.observe())
    else:
        driver.remove_interface()
        out = {"removed": True}
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
