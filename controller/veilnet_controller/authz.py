"""Who may call what: the controller's authorization matrix, checked on the server for every RPC.

Roles come from the client certificate (``pki.identity_from_certificate``):
agents are ``node``; operators carry ``admin``, ``network-admin`` or
``viewer``. ``Join`` is the only call without a certificate and is served
only on the bootstrap listener, where a single-use token stands in for one.
"""

from __future__ import annotations

from typing import Final

READ: Final = frozenset({"admin", "network-admin", "viewer"})
WRITE: Final = frozenset({"admin", "network-admin"})
ADMIN: Final = frozenset({"admin"})
NODE: Final = frozenset({"node"})

# Full method name -> roles allowed. A method missing here is refused for everyone.
MATRIX: Final[dict[str, frozenset[str]]] = {
    "/veilnet.v1.Controller/Renew": NODE,
    "/veilnet.v1.Controller/Sync": NODE,
    "/veilnet.v1.Admin/GetSpec": READ,
    "/veilnet.v1.Admin/History": READ,
    "/veilnet.v1.Admin/DiffSpec": READ,
    "/veilnet.v1.Admin/ListNodes": READ,
    "/veilnet.v1.Admin/ReadAudit": READ,
    "/veilnet.v1.Admin/ApplySpec": WRITE,
    "/veilnet.v1.Admin/Rollback": WRITE,
    "/veilnet.v1.Admin/SendCommand": WRITE,
    "/veilnet.v1.Admin/CreateJoinToken": ADMIN,
    "/veilnet.v1.Admin/RevokeNode": ADMIN,
    "/veilnet.v1.Admin/RevokeOperator": ADMIN,
}

ALL_ROLES: Final = ("admin", "network-admin", "viewer", "node")


def allowed(method: str, role: str) -> bool:
    return role in MATRIX.get(method, frozenset())
