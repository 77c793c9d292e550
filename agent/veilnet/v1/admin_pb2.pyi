from veilnet.v1 import controller_pb2 as _controller_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ApplySpecRequest(_message.Message):
    __slots__ = ("spec_yaml", "message", "expected_revision")
    SPEC_YAML_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_REVISION_FIELD_NUMBER: _ClassVar[int]
    spec_yaml: str
    message: str
    expected_revision: int
    def __init__(self, spec_yaml: _Optional[str] = ..., message: _Optional[str] = ..., expected_revision: _Optional[int] = ...) -> None: ...

class ApplySpecResponse(_message.Message):
    __slots__ = ("revision", "changed", "diff")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    DIFF_FIELD_NUMBER: _ClassVar[int]
    revision: int
    changed: bool
    diff: str
    def __init__(self, revision: _Optional[int] = ..., changed: _Optional[bool] = ..., diff: _Optional[str] = ...) -> None: ...

class DiffSpecRequest(_message.Message):
    __slots__ = ("spec_yaml",)
    SPEC_YAML_FIELD_NUMBER: _ClassVar[int]
    spec_yaml: str
    def __init__(self, spec_yaml: _Optional[str] = ...) -> None: ...

class DiffSpecResponse(_message.Message):
    __slots__ = ("current_revision", "diff")
    CURRENT_REVISION_FIELD_NUMBER: _ClassVar[int]
    DIFF_FIELD_NUMBER: _ClassVar[int]
    current_revision: int
    diff: str
    def __init__(self, current_revision: _Optional[int] = ..., diff: _Optional[str] = ...) -> None: ...

class GetSpecRequest(_message.Message):
    __slots__ = ("revision",)
    REVISION_FIELD_NUMBER: _ClassVar[int]
    revision: int
    def __init__(self, revision: _Optional[int] = ...) -> None: ...

class GetSpecResponse(_message.Message):
    __slots__ = ("revision", "spec_yaml", "author", "created_at", "message")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    SPEC_YAML_FIELD_NUMBER: _ClassVar[int]
    AUTHOR_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    revision: int
    spec_yaml: str
    author: str
    created_at: str
    message: str
    def __init__(self, revision: _Optional[int] = ..., spec_yaml: _Optional[str] = ..., author: _Optional[str] = ..., created_at: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class HistoryRequest(_message.Message):
    __slots__ = ("limit",)
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    limit: int
    def __init__(self, limit: _Optional[int] = ...) -> None: ...

class Revision(_message.Message):
    __slots__ = ("revision", "author", "created_at", "message", "rolled_back_from")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    AUTHOR_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ROLLED_BACK_FROM_FIELD_NUMBER: _ClassVar[int]
    revision: int
    author: str
    created_at: str
    message: str
    rolled_back_from: int
    def __init__(self, revision: _Optional[int] = ..., author: _Optional[str] = ..., created_at: _Optional[str] = ..., message: _Optional[str] = ..., rolled_back_from: _Optional[int] = ...) -> None: ...

class HistoryResponse(_message.Message):
    __slots__ = ("revisions",)
    REVISIONS_FIELD_NUMBER: _ClassVar[int]
    revisions: _containers.RepeatedCompositeFieldContainer[Revision]
    def __init__(self, revisions: _Optional[_Iterable[_Union[Revision, _Mapping]]] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("revision", "message")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    revision: int
    message: str
    def __init__(self, revision: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class ListNodesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeStatus(_message.Message):
    __slots__ = ("name", "in_spec", "joined", "connected", "revoked", "wireguard_public_key", "applied_spec_revision", "last_error", "last_seen", "certificate_expires", "peers", "capabilities", "rejected_spec_revision", "peers_with_recent_handshake", "drift_repairs", "encryption", "peer_encryption")
    NAME_FIELD_NUMBER: _ClassVar[int]
    IN_SPEC_FIELD_NUMBER: _ClassVar[int]
    JOINED_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    WIREGUARD_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    APPLIED_SPEC_REVISION_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_EXPIRES_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    REJECTED_SPEC_REVISION_FIELD_NUMBER: _ClassVar[int]
    PEERS_WITH_RECENT_HANDSHAKE_FIELD_NUMBER: _ClassVar[int]
    DRIFT_REPAIRS_FIELD_NUMBER: _ClassVar[int]
    ENCRYPTION_FIELD_NUMBER: _ClassVar[int]
    PEER_ENCRYPTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    in_spec: bool
    joined: bool
    connected: bool
    revoked: bool
    wireguard_public_key: str
    applied_spec_revision: int
    last_error: str
    last_seen: str
    certificate_expires: str
    peers: int
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    rejected_spec_revision: int
    peers_with_recent_handshake: int
    drift_repairs: int
    encryption: str
    peer_encryption: _containers.RepeatedCompositeFieldContainer[_controller_pb2.PeerEncryption]
    def __init__(self, name: _Optional[str] = ..., in_spec: _Optional[bool] = ..., joined: _Optional[bool] = ..., connected: _Optional[bool] = ..., revoked: _Optional[bool] = ..., wireguard_public_key: _Optional[str] = ..., applied_spec_revision: _Optional[int] = ..., last_error: _Optional[str] = ..., last_seen: _Optional[str] = ..., certificate_expires: _Optional[str] = ..., peers: _Optional[int] = ..., capabilities: _Optional[_Iterable[str]] = ..., rejected_spec_revision: _Optional[int] = ..., peers_with_recent_handshake: _Optional[int] = ..., drift_repairs: _Optional[int] = ..., encryption: _Optional[str] = ..., peer_encryption: _Optional[_Iterable[_Union[_controller_pb2.PeerEncryption, _Mapping]]] = ...) -> None: ...

class ListNodesResponse(_message.Message):
    __slots__ = ("current_revision", "nodes")
    CURRENT_REVISION_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    current_revision: int
    nodes: _containers.RepeatedCompositeFieldContainer[NodeStatus]
    def __init__(self, current_revision: _Optional[int] = ..., nodes: _Optional[_Iterable[_Union[NodeStatus, _Mapping]]] = ...) -> None: ...

class CreateJoinTokenRequest(_message.Message):
    __slots__ = ("node_name", "ttl_seconds")
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    node_name: str
    ttl_seconds: int
    def __init__(self, node_name: _Optional[str] = ..., ttl_seconds: _Optional[int] = ...) -> None: ...

class CreateJoinTokenResponse(_message.Message):
    __slots__ = ("token", "expires_at", "ca_hash")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    CA_HASH_FIELD_NUMBER: _ClassVar[int]
    token: str
    expires_at: str
    ca_hash: str
    def __init__(self, token: _Optional[str] = ..., expires_at: _Optional[str] = ..., ca_hash: _Optional[str] = ...) -> None: ...

class RevokeNodeRequest(_message.Message):
    __slots__ = ("node_name", "reason")
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    node_name: str
    reason: str
    def __init__(self, node_name: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class RevokeNodeResponse(_message.Message):
    __slots__ = ("certificates_revoked", "was_connected")
    CERTIFICATES_REVOKED_FIELD_NUMBER: _ClassVar[int]
    WAS_CONNECTED_FIELD_NUMBER: _ClassVar[int]
    certificates_revoked: int
    was_connected: bool
    def __init__(self, certificates_revoked: _Optional[int] = ..., was_connected: _Optional[bool] = ...) -> None: ...

class RevokeOperatorRequest(_message.Message):
    __slots__ = ("name", "reason")
    NAME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    reason: str
    def __init__(self, name: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class RevokeOperatorResponse(_message.Message):
    __slots__ = ("certificates_revoked",)
    CERTIFICATES_REVOKED_FIELD_NUMBER: _ClassVar[int]
    certificates_revoked: int
    def __init__(self, certificates_revoked: _Optional[int] = ...) -> None: ...

class ReadAuditRequest(_message.Message):
    __slots__ = ("limit", "verify")
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    VERIFY_FIELD_NUMBER: _ClassVar[int]
    limit: int
    verify: bool
    def __init__(self, limit: _Optional[int] = ..., verify: _Optional[bool] = ...) -> None: ...

class AuditEntry(_message.Message):
    __slots__ = ("sequence", "time", "actor", "role", "action", "target", "revision", "detail", "hash", "previous_hash", "actor_serial", "signature")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_HASH_FIELD_NUMBER: _ClassVar[int]
    ACTOR_SERIAL_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    time: str
    actor: str
    role: str
    action: str
    target: str
    revision: int
    detail: str
    hash: str
    previous_hash: str
    actor_serial: str
    signature: str
    def __init__(self, sequence: _Optional[int] = ..., time: _Optional[str] = ..., actor: _Optional[str] = ..., role: _Optional[str] = ..., action: _Optional[str] = ..., target: _Optional[str] = ..., revision: _Optional[int] = ..., detail: _Optional[str] = ..., hash: _Optional[str] = ..., previous_hash: _Optional[str] = ..., actor_serial: _Optional[str] = ..., signature: _Optional[str] = ...) -> None: ...

class ReadAuditResponse(_message.Message):
    __slots__ = ("entries", "verified", "verify_error", "total", "verify_summary")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    VERIFIED_FIELD_NUMBER: _ClassVar[int]
    VERIFY_ERROR_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    VERIFY_SUMMARY_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[AuditEntry]
    verified: bool
    verify_error: str
    total: int
    verify_summary: str
    def __init__(self, entries: _Optional[_Iterable[_Union[AuditEntry, _Mapping]]] = ..., verified: _Optional[bool] = ..., verify_error: _Optional[str] = ..., total: _Optional[int] = ..., verify_summary: _Optional[str] = ...) -> None: ...

class SendCommandRequest(_message.Message):
    __slots__ = ("node_name", "command")
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    node_name: str
    command: str
    def __init__(self, node_name: _Optional[str] = ..., command: _Optional[str] = ...) -> None: ...

class SendCommandResponse(_message.Message):
    __slots__ = ("delivered",)
    DELIVERED_FIELD_NUMBER: _ClassVar[int]
    delivered: bool
    def __init__(self, delivered: _Optional[bool] = ...) -> None: ...
