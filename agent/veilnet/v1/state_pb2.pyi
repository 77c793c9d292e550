from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RateLimit(_message.Message):
    __slots__ = ("new_connections_per_second", "burst", "icmp_per_second")
    NEW_CONNECTIONS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    BURST_FIELD_NUMBER: _ClassVar[int]
    ICMP_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    new_connections_per_second: int
    burst: int
    icmp_per_second: int
    def __init__(self, new_connections_per_second: _Optional[int] = ..., burst: _Optional[int] = ..., icmp_per_second: _Optional[int] = ...) -> None: ...

class Segment(_message.Message):
    __slots__ = ("name", "vni", "encapsulation", "ipv4_subnet", "ipv4_gateway", "ipv6_subnet", "ipv6_gateway", "gateway_mac", "mode", "rate_limit")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VNI_FIELD_NUMBER: _ClassVar[int]
    ENCAPSULATION_FIELD_NUMBER: _ClassVar[int]
    IPV4_SUBNET_FIELD_NUMBER: _ClassVar[int]
    IPV4_GATEWAY_FIELD_NUMBER: _ClassVar[int]
    IPV6_SUBNET_FIELD_NUMBER: _ClassVar[int]
    IPV6_GATEWAY_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_MAC_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    RATE_LIMIT_FIELD_NUMBER: _ClassVar[int]
    name: str
    vni: int
    encapsulation: str
    ipv4_subnet: str
    ipv4_gateway: str
    ipv6_subnet: str
    ipv6_gateway: str
    gateway_mac: str
    mode: str
    rate_limit: RateLimit
    def __init__(self, name: _Optional[str] = ..., vni: _Optional[int] = ..., encapsulation: _Optional[str] = ..., ipv4_subnet: _Optional[str] = ..., ipv4_gateway: _Optional[str] = ..., ipv6_subnet: _Optional[str] = ..., ipv6_gateway: _Optional[str] = ..., gateway_mac: _Optional[str] = ..., mode: _Optional[str] = ..., rate_limit: _Optional[_Union[RateLimit, _Mapping]] = ...) -> None: ...

class LocalEndpoint(_message.Message):
    __slots__ = ("name", "segment", "mac", "ipv4", "ipv6", "netns", "ifname", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    MAC_FIELD_NUMBER: _ClassVar[int]
    IPV4_FIELD_NUMBER: _ClassVar[int]
    IPV6_FIELD_NUMBER: _ClassVar[int]
    NETNS_FIELD_NUMBER: _ClassVar[int]
    IFNAME_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    name: str
    segment: str
    mac: str
    ipv4: str
    ipv6: str
    netns: str
    ifname: str
    labels: _containers.ScalarMap[str, str]
    def __init__(self, name: _Optional[str] = ..., segment: _Optional[str] = ..., mac: _Optional[str] = ..., ipv4: _Optional[str] = ..., ipv6: _Optional[str] = ..., netns: _Optional[str] = ..., ifname: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class RemoteEndpoint(_message.Message):
    __slots__ = ("segment", "mac", "ips", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    MAC_FIELD_NUMBER: _ClassVar[int]
    IPS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    segment: str
    mac: str
    ips: _containers.RepeatedScalarFieldContainer[str]
    labels: _containers.ScalarMap[str, str]
    def __init__(self, segment: _Optional[str] = ..., mac: _Optional[str] = ..., ips: _Optional[_Iterable[str]] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Peer(_message.Message):
    __slots__ = ("name", "underlay_address", "underlay_port", "public_key", "transport_address", "keepalive", "endpoints", "segments")
    NAME_FIELD_NUMBER: _ClassVar[int]
    UNDERLAY_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    UNDERLAY_PORT_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    KEEPALIVE_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    underlay_address: str
    underlay_port: int
    public_key: str
    transport_address: str
    keepalive: int
    endpoints: _containers.RepeatedCompositeFieldContainer[RemoteEndpoint]
    segments: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., underlay_address: _Optional[str] = ..., underlay_port: _Optional[int] = ..., public_key: _Optional[str] = ..., transport_address: _Optional[str] = ..., keepalive: _Optional[int] = ..., endpoints: _Optional[_Iterable[_Union[RemoteEndpoint, _Mapping]]] = ..., segments: _Optional[_Iterable[str]] = ...) -> None: ...

class Expression(_message.Message):
    __slots__ = ("key", "operator", "values")
    KEY_FIELD_NUMBER: _ClassVar[int]
    OPERATOR_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    key: str
    operator: str
    values: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, key: _Optional[str] = ..., operator: _Optional[str] = ..., values: _Optional[_Iterable[str]] = ...) -> None: ...

class Selector(_message.Message):
    __slots__ = ("segment", "match_labels", "match_expressions", "cidr")
    class MatchLabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    MATCH_LABELS_FIELD_NUMBER: _ClassVar[int]
    MATCH_EXPRESSIONS_FIELD_NUMBER: _ClassVar[int]
    CIDR_FIELD_NUMBER: _ClassVar[int]
    segment: str
    match_labels: _containers.ScalarMap[str, str]
    match_expressions: _containers.RepeatedCompositeFieldContainer[Expression]
    cidr: str
    def __init__(self, segment: _Optional[str] = ..., match_labels: _Optional[_Mapping[str, str]] = ..., match_expressions: _Optional[_Iterable[_Union[Expression, _Mapping]]] = ..., cidr: _Optional[str] = ...) -> None: ...

class PortRange(_message.Message):
    __slots__ = ("first", "last")
    FIRST_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    first: int
    last: int
    def __init__(self, first: _Optional[int] = ..., last: _Optional[int] = ...) -> None: ...

class Policy(_message.Message):
    __slots__ = ("name", "source", "destination", "protocol", "ports")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    PORTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    source: Selector
    destination: Selector
    protocol: str
    ports: _containers.RepeatedCompositeFieldContainer[PortRange]
    def __init__(self, name: _Optional[str] = ..., source: _Optional[_Union[Selector, _Mapping]] = ..., destination: _Optional[_Union[Selector, _Mapping]] = ..., protocol: _Optional[str] = ..., ports: _Optional[_Iterable[_Union[PortRange, _Mapping]]] = ...) -> None: ...

class NodeState(_message.Message):
    __slots__ = ("node", "transport_address", "segments", "endpoints", "peers", "policies", "node_labels", "encryption")
    class NodeLabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NODE_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    POLICIES_FIELD_NUMBER: _ClassVar[int]
    NODE_LABELS_FIELD_NUMBER: _ClassVar[int]
    ENCRYPTION_FIELD_NUMBER: _ClassVar[int]
    node: str
    transport_address: str
    segments: _containers.RepeatedCompositeFieldContainer[Segment]
    endpoints: _containers.RepeatedCompositeFieldContainer[LocalEndpoint]
    peers: _containers.RepeatedCompositeFieldContainer[Peer]
    policies: _containers.RepeatedCompositeFieldContainer[Policy]
    node_labels: _containers.ScalarMap[str, str]
    encryption: EncryptionSettings
    def __init__(self, node: _Optional[str] = ..., transport_address: _Optional[str] = ..., segments: _Optional[_Iterable[_Union[Segment, _Mapping]]] = ..., endpoints: _Optional[_Iterable[_Union[LocalEndpoint, _Mapping]]] = ..., peers: _Optional[_Iterable[_Union[Peer, _Mapping]]] = ..., policies: _Optional[_Iterable[_Union[Policy, _Mapping]]] = ..., node_labels: _Optional[_Mapping[str, str]] = ..., encryption: _Optional[_Union[EncryptionSettings, _Mapping]] = ...) -> None: ...

class EncryptionSettings(_message.Message):
    __slots__ = ("mode", "ipsec")
    MODE_FIELD_NUMBER: _ClassVar[int]
    IPSEC_FIELD_NUMBER: _ClassVar[int]
    mode: str
    ipsec: IpsecSettings
    def __init__(self, mode: _Optional[str] = ..., ipsec: _Optional[_Union[IpsecSettings, _Mapping]] = ...) -> None: ...

class IpsecSettings(_message.Message):
    __slots__ = ("replay_window", "rotation_seconds")
    REPLAY_WINDOW_FIELD_NUMBER: _ClassVar[int]
    ROTATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    replay_window: int
    rotation_seconds: int
    def __init__(self, replay_window: _Optional[int] = ..., rotation_seconds: _Optional[int] = ...) -> None: ...

class SegmentList(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[Segment]
    def __init__(self, items: _Optional[_Iterable[_Union[Segment, _Mapping]]] = ...) -> None: ...

class LocalEndpointList(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[LocalEndpoint]
    def __init__(self, items: _Optional[_Iterable[_Union[LocalEndpoint, _Mapping]]] = ...) -> None: ...

class PolicyList(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[Policy]
    def __init__(self, items: _Optional[_Iterable[_Union[Policy, _Mapping]]] = ...) -> None: ...

class LabelMap(_message.Message):
    __slots__ = ("items",)
    class ItemsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.ScalarMap[str, str]
    def __init__(self, items: _Optional[_Mapping[str, str]] = ...) -> None: ...

class StateDelta(_message.Message):
    __slots__ = ("transport_address", "segments", "endpoints", "policies", "peer_upserts", "peer_removes", "node_labels", "encryption")
    TRANSPORT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    POLICIES_FIELD_NUMBER: _ClassVar[int]
    PEER_UPSERTS_FIELD_NUMBER: _ClassVar[int]
    PEER_REMOVES_FIELD_NUMBER: _ClassVar[int]
    NODE_LABELS_FIELD_NUMBER: _ClassVar[int]
    ENCRYPTION_FIELD_NUMBER: _ClassVar[int]
    transport_address: str
    segments: SegmentList
    endpoints: LocalEndpointList
    policies: PolicyList
    peer_upserts: _containers.RepeatedCompositeFieldContainer[Peer]
    peer_removes: _containers.RepeatedScalarFieldContainer[str]
    node_labels: LabelMap
    encryption: EncryptionSettings
    def __init__(self, transport_address: _Optional[str] = ..., segments: _Optional[_Union[SegmentList, _Mapping]] = ..., endpoints: _Optional[_Union[LocalEndpointList, _Mapping]] = ..., policies: _Optional[_Union[PolicyList, _Mapping]] = ..., peer_upserts: _Optional[_Iterable[_Union[Peer, _Mapping]]] = ..., peer_removes: _Optional[_Iterable[str]] = ..., node_labels: _Optional[_Union[LabelMap, _Mapping]] = ..., encryption: _Optional[_Union[EncryptionSettings, _Mapping]] = ...) -> None: ...
