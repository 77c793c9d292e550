"""Which client certificates the controller accepts *now*, beyond what the TLS handshake checked.

The handshake verifies the chain and the validity period once, when a connection is made, and a gRPC
connection can stay open for days. So every RPC, every message on a Sync stream and a timer on every stream
ask ``CertificateTrust.refusal`` again: is the certificate inside not_before..not_after, not revoked, not
retired by a renewal, and is its node or operator not revoked? ``None`` means accepted; anything else is
the reason, worded for the caller (it names the serial, the identity and the time).

Everything here runs on the controller's event loop; the sets are shared with the hub, which updates them
on revocation, rejoin and renewal.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from veilnet_agent.control import pki

from .store import OperatorCertificateRecord

_FAR_FUTURE = datetime.max.replace(tzinfo=UTC)


def _when(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Refusal:
    """Why a certificate is not accepted: ``kind`` for machines (one of KINDS), ``message`` for the caller."""

    kind: str
    message: str

    def __str__(self) -> str:
        return self.message


KINDS = ("not-yet-valid", "expired", "revoked", "retired", "node-revoked", "unrecorded", "mismatch")


@dataclass
class CertificateTrust:
    revoked: set[str] = field(default_factory=set)
    """Serials refused from now on (revoked nodes' and operators' certificates, certificates of a rejoin)."""
    retiring: dict[str, datetime] = field(default_factory=dict)
    """Serial -> when a certificate replaced by a renewal stops being accepted (after a grace period)."""
    revoked_nodes: set[str] = field(default_factory=set)
    """Nodes revoked (until they join again): any certificate naming one is refused, recorded or not."""

    def refusal(self, identity: pki.Identity, now: datetime,
                operator_record: Callable[[str], OperatorCertificateRecord | None]) -> Refusal | None:
        """Why ``identity``'s certificate is not acceptable at ``now``, or None if it is.

        Operators are looked up by serial (``operator_record``, the store): only a certificate the controller
        recorded issuing, for that name and role, and not revoked, is accepted. So ``operator-cert`` run
        offline takes effect at once, and a revocation covers every copy of a credential.
        """
        who = f"certificate {identity.serial} of {identity.spiffe_id}"
        if now < identity.not_before:
            return Refusal("not-yet-valid", f"{who} is not valid before {_when(identity.not_before)}")
        if now > identity.not_after:
            return Refusal("expired", f"{who} expired at {_when(identity.not_after)}")
        if identity.serial in self.revoked:
            return Refusal("revoked", f"{who} is revoked")
        retire_at = self.retiring.get(identity.serial)
        if retire_at is not None and now >= retire_at:
            return Refusal("retired", f"{who} was replaced by a renewal and retired at {_when(retire_at)}")
        if identity.kind == "node" and identity.name in self.revoked_nodes:
            return Refusal("node-revoked", f"{who}: node {identity.name} is revoked")
        if identity.kind == "operator":
            record = operator_record(identity.serial)
            if record is None:
                return Refusal("unrecorded", f"{who} is not one this controller recorded issuing; "
                                             "get credentials from veilnet-controller operator-cert")
            if (record.name, record.role) != (identity.name, identity.role):
                return Refusal("mismatch", f"{who} was recorded for {record.name} ({record.role}), "
                                           f"not {identity.name} ({identity.role})")
            if record.revoked_at is not None:
                return Refusal("revoked", f"{who} is revoked")
        return None

    def deadline(self, identity: pki.Identity) -> datetime:
        """The moment ``identity`` stops being acceptable unless something else happens first (a revocation)."""
        return min(identity.not_after, self.retiring.get(identity.serial, _FAR_FUTURE))
