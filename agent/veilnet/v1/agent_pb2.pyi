from veilnet.v1 import controller_pb2 as _controller_pb2
from veilnet.v1 import state_pb2 as _state_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("node", "mode", "controller_connected", "controller", "applied_sequence", "applied_spec_revision", "last_error", "wireguard_public_key", "segments", "endpoints", "peers", "policies", "certificate_expires", "certificate_renews", "encryption", "peer_encryption")
    NODE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    CONTROLLER_CONNECTED_FIELD_NUMBER: _ClassVar[int]
    CONTROLLER_FIELD_NUMBER: _ClassVar[int]
    APPLIED_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    APPLIED_SPEC_REVISION_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    WIREGUARD_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    POLICIES_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_EXPIRES_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_RENEWS_FIELD_NUMBER: _ClassVar[int]
    ENCRYPTION_FIELD_NUMBER: _ClassVar[int]
    PEER_ENCRYPTION_FIELD_NUMBER: _ClassVar[int]
    node: str
    mode: str
    controller_connected: bool
    controller: str
    applied_sequence: int
    applied_spec_revision: int
    last_error: str
    wireguard_public_key: str
    segments: int
    endpoints: int
    peers: int
    policies: int
    certificate_expires: str
    certificate_renews: str
    encryption: str
    peer_encryption: _containers.RepeatedCompositeFieldContainer[_controller_pb2.PeerEncryption]
    def __init__(self, node: _Optional[str] = ..., mode: _Optional[str] = ..., controller_connected: _Optional[bool] = ..., controller: _Optional[str] = ..., applied_sequence: _Optional[int] = ..., applied_spec_revision: _Optional[int] = ..., last_error: _Optional[str] = ..., wireguard_public_key: _Optional[str] = ..., segments: _Optional[int] = ..., endpoints: _Optional[int] = ..., peers: _Optional[int] = ..., policies: _Optional[int] = ..., certificate_expires: _Optional[str] = ..., certificate_renews: _Optional[str] = ..., encryption: _Optional[str] = ..., peer_encryption: _Optional[_Iterable[_Union[_controller_pb2.PeerEncryption, _Mapping]]] = ...) -> None: ...

class AttachEndpointRequest(_message.Message):
    __slots__ = ("endpoint",)
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    endpoint: _state_pb2.LocalEndpoint
    def __init__(self, endpoint: _Optional[_Union[_state_pb2.LocalEndpoint, _Mapping]] = ...) -> None: ...

class AttachEndpointResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DetachEndpointRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DetachEndpointResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
