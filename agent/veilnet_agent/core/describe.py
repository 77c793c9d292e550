"""One-line, log-friendly descriptions of ops (never any key material)."""

from __future__ import annotations

from .naming import OWNER_MARK
from .ops import (
    AddFdb,
    CreateLink,
    DeleteLink,
    DelFdb,
    DelNeigh,
    EnsureWgInterface,
    Op,
    SetNeigh,
    SyncWgPeers,
    SyncXfrm,
    UpdateLink,
)


def op_fields(op: Op) -> dict[str, object]:
    """Structured fields naming the op's object: action, object, and details."""
    if isinstance(op, EnsureWgInterface):
        return {"action": "create" if op.create else "update", "object": f"wireguard/{op.target.name}"}
    if isinstance(op, SyncWgPeers):
        return {
            "action": "sync-peers",
            "object": "wireguard/peers",
            "upserts": [p.public_key for p in op.upserts[:20]],
            "removes": list(op.removes[:20]),
            "count": len(op.upserts) + len(op.removes),
        }
    if isinstance(op, SyncXfrm):  # SPIs and addresses only: never a key
        return {
            "action": "sync-xfrm",
            "object": "xfrm/sas+policies",
            "add_sas": [f"{sa.src}->{sa.dst} spi 0x{sa.spi:08x}" for sa in op.add_sas[:20]],
            "delete_sas": [f"{src}->{dst} spi 0x{spi:08x}" for src, dst, spi in op.delete_sas[:20]],
            "policies_set": len(op.set_policies),
            "policies_deleted": len(op.delete_policies),
            "count": len(op.add_sas) + len(op.set_policies) + len(op.delete_policies) + len(op.delete_sas),
        }
    if isinstance(op, CreateLink):
        return {"action": "create", "object": f"link/{op.link.name}", "kind": op.link.kind}
    if isinstance(op, DeleteLink):
        return {"action": "delete", "object": f"link/{op.name}", "kind": op.kind}
    if isinstance(op, UpdateLink):
        return {"action": "update", "object": f"link/{op.name}"}
    if isinstance(op, (AddFdb, DelFdb)):
        e = op.entry
        where = f"dst {e.dst}" if e.dst else "master"
        return {"action": "add" if isinstance(op, AddFdb) else "delete", "object": f"fdb/{e.ifname}/{e.mac} {where}"}
    if isinstance(op, (SetNeigh, DelNeigh)):
        n = op.entry
        return {"action": "set" if isinstance(op, SetNeigh) else "delete", "object": f"neigh/{n.ifname}/{n.ip}",
                "lladdr": n.mac}
    raise TypeError(op)


def op_subject(op: Op) -> str:
    """The op in words an operator can act on: ``create link/vnep1a2b3c4d5e (endpoint b-late)``."""
    fields = op_fields(op)
    text = f"{fields['action']} {fields['object']}"
    owner = _owner(op.link.alias) if isinstance(op, CreateLink) else ""
    return f"{text} ({owner})" if owner else text


def _owner(alias: str) -> str:
    """``veilnet:endpoint:b-late:<fingerprint>`` -> ``endpoint b-late``."""
    if not alias.startswith(OWNER_MARK):
        return ""
    kind, _, rest = alias[len(OWNER_MARK):].partition(":")
    key = rest.rpartition(":")[0]
    return f"{kind} {key}" if kind and key else ""
