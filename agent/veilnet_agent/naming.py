"""Names and ownership marks of every kernel object the agent creates.

Every link the agent makes has a name starting with ``vn`` and an ifalias
starting with ``veilnet:``; the alias also carries a fingerprint of the
attributes that cannot be changed in place (VNI, kind, local address, the
endpoint's namespace...). A link whose alias does not start with the marker
is never touched.
"""

from __future__ import annotations

import hashlib

OWNER_MARK = "veilnet:"
NAME_PREFIX = "vn"
IFNAMSIZ = 15
WG_IFNAME = "vnwg0"


def _digest(*parts: str, length: int = 10) -> str:
    h = hashlib.sha256("\x1f".join(parts).encode()).hexdigest()
    return h[:length]


def bridge_name(vni: int) -> str:
    return f"vnbr{vni}"


def vxlan_name(vni: int) -> str:
    return f"vnvx{vni}"


def geneve_name(vni: int, peer: str) -> str:
    """One Geneve device per (segment, peer): Geneve has no FDB of its own."""
    return f"vngn{_digest(str(vni), peer)}"


def endpoint_host_name(endpoint: str) -> str:
    return f"vnep{_digest(endpoint)}"


def alias(kind: str, key: str, fingerprint: str) -> str:
    """``veilnet:<kind>:<key>:<fingerprint>``, at most 255 bytes (IFALIASZ-1)."""
    text = f"{OWNER_MARK}{kind}:{key}:{fingerprint}"
    return text[:255]


def fingerprint(*parts: object) -> str:
    return _digest(*(str(p) for p in parts), length=12)


def is_owned_alias(value: str | None) -> bool:
    return value is not None and value.startswith(OWNER_MARK)


def gateway_mac(vni: int) -> str:
    """Locally administered unicast MAC shared by every host's gateway of a segment."""
    return f"02:56:4e:{(vni >> 16) & 0xFF:02x}:{(vni >> 8) & 0xFF:02x}:{vni & 0xFF:02x}"
