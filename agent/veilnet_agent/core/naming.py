"""Names and ownership marks of every kernel object the agent creates.

Every link the agent makes has a name starting with ``vn`` and an ifalias
starting with ``veilnet:``; the alias also carries a fingerprint of the
attributes that cannot be changed in place (VNI, kind, local address, the
endpoint's namespace...). A link whose alias does not start with the marker
is never touched.
"""

from __future__ import annotations

import hashlib
import secrets

OWNER_MARK = "veilnet:"
NAME_PREFIX = "vn"
IFNAMSIZ = 15
WG_IFNAME = "vnwg0"
# XFRM objects carry no name or comment: the agent's SAs and policy templates carry this reqid ("VNET"),
# and the agent reads back, changes and deletes only SAs and policies with it.
XFRM_REQID = 0x564E4554
XFRM_PRIORITY = 0x564E  # of the agent's policies (any other policy with a lower number is consulted first)
# Links are created under a staging name, marked, configured, then renamed into
# place: the kernel ignores IFLA_IFALIAS on create, so a crash between create and
# mark would otherwise leave an unmarked link squatting on the real name. A
# leftover staging link is the agent's by its name alone and is deleted.
STAGING_PREFIX = "vnnew"


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


def staging_name() -> str:
    return f"{STAGING_PREFIX}{secrets.token_hex(4)}"


def is_owned_link(name: str, alias: str | None) -> bool:
    return is_owned_alias(alias) or name.startswith(STAGING_PREFIX)


def gateway_mac(vni: int) -> str:
    """Locally administered unicast MAC shared by every host's gateway of a segment."""
    return f"02:56:4e:{(vni >> 16) & 0xFF:02x}:{(vni >> 8) & 0xFF:02x}:{vni & 0xFF:02x}"
