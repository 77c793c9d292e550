"""Builders of valid raw desired states for tests (plain dicts, as a file would hold)."""

from __future__ import annotations

import base64
import copy
import hashlib
from typing import Any


def wg_key(seed: str) -> str:
    """A syntactically valid WireGuard public key derived from ``seed``."""
    raw = bytearray(hashlib.sha256(seed.encode()).digest())
    return base64.b64encode(bytes(raw)).decode()


def peer(index: int, segment: str = "blue", endpoints: int = 1) -> dict[str, Any]:
    hi = index // 250
    return {
        "name": f"peer-{index}",
        "underlay_address": f"192.0.2.{(index % 250) + 1}" if index < 250 else f"2001:db8::{index:x}",
        "underlay_port": 51820 + hi,
        "public_key": wg_key(f"peer-{index}"),
        "transport_address": f"fd00:7::{index + 2:x}",
        "endpoints": [
            {
                "segment": segment,
                "mac": f"02:01:{(index >> 16) & 255:02x}:{(index >> 8) & 255:02x}:{index & 255:02x}:{e:02x}",
                "ips": [f"fd00:b1::{index + 2:x}:{e + 1:x}"],
            }
            for e in range(endpoints)
        ],
    }


def state(peers: int = 2) -> dict[str, Any]:
    return copy.deepcopy(
        {
            "node": "host-a",
            "transport_address": "fd00:7::1/64",
            "segments": [
                {
                    "name": "blue",
                    "vni": 100,
                    "encapsulation": "vxlan",
                    "ipv4_subnet": "203.0.113.0/26",
                    "ipv4_gateway": "203.0.113.1",
                    "ipv6_subnet": "fd00:b1::/64",
                    "ipv6_gateway": "fd00:b1::1",
                },
                {
                    "name": "green",
                    "vni": 200,
                    "encapsulation": "vxlan",
                    "ipv4_subnet": "203.0.113.64/26",
                    "ipv4_gateway": "203.0.113.65",
                },
            ],
            "endpoints": [
                {
                    "name": "a-web",
                    "segment": "blue",
                    "mac": "02:00:00:0a:00:01",
                    "ipv4": "203.0.113.10",
                    "ipv6": "fd00:b1::a",
                    "netns": "ep-a-web",
                },
                {
                    "name": "a-db",
                    "segment": "green",
                    "mac": "02:00:00:0a:00:02",
                    "ipv4": "203.0.113.70",
                    "netns": "ep-a-db",
                },
            ],
            "peers": [peer(i) for i in range(peers)],
        }
    )


def v4_state() -> dict[str, Any]:
    """Three-host style state over IPv4 transport, as in the demo."""
    data = state(peers=0)
    data["transport_address"] = "198.51.100.11/24"
    data["peers"] = [
        {
            "name": "host-b",
            "underlay_address": "192.0.2.12",
            "public_key": wg_key("host-b"),
            "transport_address": "198.51.100.12",
            "endpoints": [
                {"segment": "blue", "mac": "02:00:00:0b:00:01", "ips": ["203.0.113.20", "fd00:b1::14"]},
                {"segment": "green", "mac": "02:00:00:0b:00:02", "ips": ["203.0.113.80"]},
            ],
        }
    ]
    return data
