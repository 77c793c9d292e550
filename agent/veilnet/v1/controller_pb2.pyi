from veilnet.v1 import state_pb2 as _state_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JoinRequest(_message.Message):
    __slots__ = ("node_name", "token", "csr_pem")
    NODE_NAME_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    node_name: str
    token: str
    csr_pem: bytes
    def __init__(self, node_name: _Optional[str] = ..., token: _Optional[str] = ..., csr_pem: _Optional[bytes] = ...) -> None: ...

class JoinResponse(_message.Message):
    __slots__ = ("certificate_pem", "ca_bundle_pem", "spiffe_id", "control_endpoint")
    CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    CA_BUNDLE_PEM_FIELD_NUMBER: _ClassVar[int]
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    CONTROL_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    certificate_pem: bytes
    ca_bundle_pem: bytes
    spiffe_id: str
    control_endpoint: str
    def __init__(self, certificate_pem: _Optional[bytes] = ..., ca_bundle_pem: _Optional[bytes] = ..., spiffe_id: _Optional[str] = ..., control_endpoint: _Optional[str] = ...) -> None: ...

class RenewRequest(_message.Message):
    __slots__ = ("csr_pem",)
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    csr_pem: bytes
    def __init__(self, csr_pem: _Optional[bytes] = ...) -> None: ...

class RenewResponse(_message.Message):
    __slots__ = ("certificate_pem", "ca_bundle_pem")
    CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    CA_BUNDLE_PEM_FIELD_NUMBER: _ClassVar[int]
    certificate_pem: bytes
    ca_bundle_pem: bytes
    def __init__(self, certificate_pem: _Optional[bytes] = ..., ca_bundle_pem: _Optional[bytes] = ...) -> None: ...

class AgentMessage(_message.Message):
    __slots__ = ("hello", "ack", "endpoints", "key_update", "status", "epoch_key", "sa_ready")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    KEY_UPDATE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_KEY_FIELD_NUMBER: _ClassVar[int]
    SA_READY_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    ack: Ack
    endpoints: EndpointReport
    key_update: KeyUpdate
    status: AgentStatus
    epoch_key: EpochKey
    sa_ready: SaReady
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., ack: _Optional[_Union[Ack, _Mapping]] = ..., endpoints: _Optional[_Union[EndpointReport, _Mapping]] = ..., key_update: _Optional[_Union[KeyUpdate, _Mapping]] = ..., status: _Optional[_Union[AgentStatus, _Mapping]] = ..., epoch_key: _Optional[_Union[EpochKey, _Mapping]] = ..., sa_ready: _Optional[_Union[SaReady, _Mapping]] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("agent_version", "capabilities", "wireguard_public_key", "applied_sequence", "applied_spec_revision", "attached_endpoints")
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    WIREGUARD_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    APPLIED_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    APPLIED_SPEC_REVISION_FIELD_NUMBER: _ClassVar[int]
    ATTACHED_ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    agent_version: str
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    wireguard_public_key: str
    applied_sequence: int
    applied_spec_revision: int
    attached_endpoints: _containers.RepeatedCompositeFieldContainer[_state_pb2.LocalEndpoint]
    def __init__(self, agent_version: _Optional[str] = ..., capabilities: _Optional[_Iterable[str]] = ..., wireguard_public_key: _Optional[str] = ..., applied_sequence: _Optional[int] = ..., applied_spec_revision: _Optional[int] = ..., attached_endpoints: _Optional[_Iterable[_Union[_state_pb2.LocalEndpoint, _Mapping]]] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("sequence", "spec_revision", "ok", "error_field", "error_value", "error_reason", "kernel_operations")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    SPEC_REVISION_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_FIELD_NUMBER: _ClassVar[int]
    ERROR_VALUE_FIELD_NUMBER: _ClassVar[int]
    ERROR_REASON_FIELD_NUMBER: _ClassVar[int]
    KERNEL_OPERATIONS_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    spec_revision: int
    ok: bool
    error_field: str
    error_value: str
    error_reason: str
    kernel_operations: int
    def __init__(self, sequence: _Optional[int] = ..., spec_revision: _Optional[int] = ..., ok: _Optional[bool] = ..., error_field: _Optional[str] = ..., error_value: _Optional[str] = ..., error_reason: _Optional[str] = ..., kernel_operations: _Optional[int] = ...) -> None: ...

class EndpointReport(_message.Message):
    __slots__ = ("endpoints",)
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    endpoints: _containers.RepeatedCompositeFieldContainer[_state_pb2.LocalEndpoint]
    def __init__(self, endpoints: _Optional[_Iterable[_Union[_state_pb2.LocalEndpoint, _Mapping]]] = ...) -> None: ...

class AgentStatus(_message.Message):
    __slots__ = ("applied_spec_revision", "segments", "endpoints", "peers", "policies", "peers_with_recent_handshake", "drift_repairs", "last_error", "certificate_expires", "encryption")
    APPLIED_SPEC_REVISION_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    POLICIES_FIELD_NUMBER: _ClassVar[int]
    PEERS_WITH_RECENT_HANDSHAKE_FIELD_NUMBER: _ClassVar[int]
    DRIFT_REPAIRS_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_EXPIRES_FIELD_NUMBER: _ClassVar[int]
    ENCRYPTION_FIELD_NUMBER: _ClassVar[int]
    applied_spec_revision: int
    segments: int
    endpoints: int
    peers: int
    policies: int
    peers_with_recent_handshake: int
    drift_repairs: int
    last_error: str
    certificate_expires: str
    encryption: _containers.RepeatedCompositeFieldContainer[PeerEncryption]
    def __init__(self, applied_spec_revision: _Optional[int] = ..., segments: _Optional[int] = ..., endpoints: _Optional[int] = ..., peers: _Optional[int] = ..., policies: _Optional[int] = ..., peers_with_recent_handshake: _Optional[int] = ..., drift_repairs: _Optional[int] = ..., last_error: _Optional[str] = ..., certificate_expires: _Optional[str] = ..., encryption: _Optional[_Iterable[_Union[PeerEncryption, _Mapping]]] = ...) -> None: ...

class PeerEncryption(_message.Message):
    __slots__ = ("peer", "mode", "state", "epoch", "peer_epoch", "epoch_age_seconds", "bytes_out", "packets_out", "bytes_in", "packets_in", "replay_failures", "integrity_failures")
    PEER_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    PEER_EPOCH_FIELD_NUMBER: _ClassVar[int]
    EPOCH_AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BYTES_OUT_FIELD_NUMBER: _ClassVar[int]
    PACKETS_OUT_FIELD_NUMBER: _ClassVar[int]
    BYTES_IN_FIELD_NUMBER: _ClassVar[int]
    PACKETS_IN_FIELD_NUMBER: _ClassVar[int]
    REPLAY_FAILURES_FIELD_NUMBER: _ClassVar[int]
    INTEGRITY_FAILURES_FIELD_NUMBER: _ClassVar[int]
    peer: str
    mode: str
    state: str
    epoch: int
    peer_epoch: int
    epoch_age_seconds: int
    bytes_out: int
    packets_out: int
    bytes_in: int
    packets_in: int
    replay_failures: int
    integrity_failures: int
    def __init__(self, peer: _Optional[str] = ..., mode: _Optional[str] = ..., state: _Optional[str] = ..., epoch: _Optional[int] = ..., peer_epoch: _Optional[int] = ..., epoch_age_seconds: _Optional[int] = ..., bytes_out: _Optional[int] = ..., packets_out: _Optional[int] = ..., bytes_in: _Optional[int] = ..., packets_in: _Optional[int] = ..., replay_failures: _Optional[int] = ..., integrity_failures: _Optional[int] = ...) -> None: ...

class KeyUpdate(_message.Message):
    __slots__ = ("wireguard_public_key",)
    WIREGUARD_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    wireguard_public_key: str
    def __init__(self, wireguard_public_key: _Optional[str] = ...) -> None: ...

class ControllerMessage(_message.Message):
    __slots__ = ("update", "command", "epoch_key", "sa_ready")
    UPDATE_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    EPOCH_KEY_FIELD_NUMBER: _ClassVar[int]
    SA_READY_FIELD_NUMBER: _ClassVar[int]
    update: NodeUpdate
    command: Command
    epoch_key: EpochKey
    sa_ready: SaReady
    def __init__(self, update: _Optional[_Union[NodeUpdate, _Mapping]] = ..., command: _Optional[_Union[Command, _Mapping]] = ..., epoch_key: _Optional[_Union[EpochKey, _Mapping]] = ..., sa_ready: _Optional[_Union[SaReady, _Mapping]] = ...) -> None: ...

class EpochKey(_message.Message):
    __slots__ = ("node", "epoch", "created", "expires", "public_key", "signature", "certificate_pem")
    NODE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    node: str
    epoch: int
    created: int
    expires: int
    public_key: bytes
    signature: bytes
    certificate_pem: bytes
    def __init__(self, node: _Optional[str] = ..., epoch: _Optional[int] = ..., created: _Optional[int] = ..., expires: _Optional[int] = ..., public_key: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., certificate_pem: _Optional[bytes] = ...) -> None: ...

class SaReady(_message.Message):
    __slots__ = ("peer", "sender_epoch", "receiver_epoch")
    PEER_FIELD_NUMBER: _ClassVar[int]
    SENDER_EPOCH_FIELD_NUMBER: _ClassVar[int]
    RECEIVER_EPOCH_FIELD_NUMBER: _ClassVar[int]
    peer: str
    sender_epoch: int
    receiver_epoch: int
    def __init__(self, peer: _Optional[str] = ..., sender_epoch: _Optional[int] = ..., receiver_epoch: _Optional[int] = ...) -> None: ...

class NodeUpdate(_message.Message):
    __slots__ = ("sequence", "spec_revision", "base_sequence", "snapshot", "delta")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    SPEC_REVISION_FIELD_NUMBER: _ClassVar[int]
    BASE_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    spec_revision: int
    base_sequence: int
    snapshot: _state_pb2.NodeState
    delta: _state_pb2.StateDelta
    def __init__(self, sequence: _Optional[int] = ..., spec_revision: _Optional[int] = ..., base_sequence: _Optional[int] = ..., snapshot: _Optional[_Union[_state_pb2.NodeState, _Mapping]] = ..., delta: _Optional[_Union[_state_pb2.StateDelta, _Mapping]] = ...) -> None: ...

class Command(_message.Message):
    __slots__ = ("kind",)
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[Command.Kind]
        RESYNC: _ClassVar[Command.Kind]
        ROTATE_KEYS: _ClassVar[Command.Kind]
        RENEW_CERTIFICATE: _ClassVar[Command.Kind]
    KIND_UNSPECIFIED: Command.Kind
    RESYNC: Command.Kind
    ROTATE_KEYS: Command.Kind
    RENEW_CERTIFICATE: Command.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    kind: Command.Kind
    def __init__(self, kind: _Optional[_Union[Command.Kind, str]] = ...) -> None: ...
