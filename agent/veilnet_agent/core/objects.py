"""Kernel objects as plain values: what the planner wants and what drivers read back.

FDB and neighbour entries are NamedTuples: there are tens of thousands of
them and set arithmetic on them must hash at C speed.

The renderer turns the desired node state into a ``KernelState`` (the target);
drivers read the same shape back from the kernel (the observed state); the
planner diffs the two. Observed values carry only what can be read back:
creation-only parameters (``LinkSpec``) are encoded in the link's alias
fingerprint, so a change to them shows up as an alias mismatch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, Literal, NamedTuple, TypeVar

if TYPE_CHECKING:  # only in annotations: the compiler imports the encryptions, which import these objects
    from .firewall_compiler import Element, Shape

LinkKind = Literal["bridge", "vxlan", "geneve", "veth"]


@dataclass(frozen=True)
class VxlanSpec:
    vni: int
    local: str  # our WireGuard transport address
    port: int = 4789


@dataclass(frozen=True)
class GeneveSpec:
    vni: int
    remote: str  # the peer's WireGuard transport address
    port: int = 6081


@dataclass(frozen=True)
class VethSpec:
    """A local endpoint: host end stays here, the other end goes into ``netns``."""

    netns: str
    ifname: str  # name inside the endpoint's namespace
    mac: str
    addresses: tuple[str, ...]  # "ip/prefix"
    gateways: tuple[str, ...]  # default route next hops (one per family)


LinkSpec = VxlanSpec | GeneveSpec | VethSpec | None


@dataclass(frozen=True)
class Link:
    """A link the agent owns. ``alias`` starts with naming.OWNER_MARK."""

    name: str
    kind: LinkKind
    alias: str
    mtu: int
    master: str | None = None
    mac: str | None = None  # enforced for bridges (gateway MAC); None = not managed
    addresses: frozenset[str] = frozenset()  # "ip/prefix" on this link (bridges: gateways)
    # Bridge port flags; None = not managed. Every port the agent makes has learning off: its FDB is static.
    learning: bool | None = None
    neigh_suppress: bool | None = None  # tunnel ports: ARP/ND for remote endpoints answered locally
    # Per-peer tunnel ports (Geneve): isolated from each other, the split horizon of a full mesh. Without it a
    # broadcast from one peer is flooded on to every other peer, and around the mesh forever.
    isolated: bool | None = None
    # IPv6 on the device itself. Ports are layer 2 only: with IPv6 a VXLAN device would send its own
    # neighbour discovery and MLD (from a random MAC) to every peer. None = not managed / no IPv6 here.
    ipv6: bool | None = None
    spec: LinkSpec = field(default=None, compare=False)


class FdbEntry(NamedTuple):
    """A static forwarding entry.

    ``dst`` set: a tunnel device's own entry (``bridge fdb ... self dst``), the
    remote VTEP for ``mac`` (00:00:00:00:00:00 = head-end replication of BUM).
    ``dst`` None: the bridge's entry (``master static``) pinning ``mac`` to port ``ifname``.
    """

    ifname: str
    mac: str
    dst: str | None = None


class NeighEntry(NamedTuple):
    """A permanent ARP/ND entry for a remote endpoint, on its segment's bridge."""

    ifname: str
    ip: str
    mac: str


@dataclass(frozen=True)
class WgInterface:
    name: str
    listen_port: int
    public_key: str
    mtu: int
    addresses: frozenset[str]  # "ip/prefix" transport addresses


@dataclass(frozen=True)
class WgPeer:
    public_key: str
    endpoint: str  # "192.0.2.2:51820" or "[2001:db8::2]:51820"
    allowed_ips: frozenset[str]  # "ip/prefix", normalised
    keepalive: int = 0  # seconds, 0 = off


XfrmDirection = Literal["out", "in"]
SaKey = tuple[str, str, int]  # (src, dst, spi): an SA's identity (the kernel's is (dst, spi, proto))
PolicyKey = tuple[str, str, str, int]  # (direction, src, dst, dport)


@dataclass(frozen=True)
class XfrmSa:
    """One ESP security association the agent owns: transport mode, ``rfc4106(gcm(aes))`` with a 256-bit
    key and 32-bit salt, 128-bit ICV, extended sequence numbers, ``reqid`` = ``naming.XFRM_REQID``.

    ``key`` is the 36 bytes the kernel takes (key, then salt); it is never printed. Drivers read it back
    from the kernel's SA dump, so an adopted SA compares equal to the one that would be installed.
    """

    src: str  # underlay addresses, normalised text
    dst: str
    spi: int
    key: bytes = field(repr=False)
    replay_window: int = 4096  # packets; kept in the ESN replay state (any size above 32 works)

    @property
    def ident(self) -> SaKey:
        return (self.src, self.dst, self.spi)


@dataclass(frozen=True)
class XfrmPolicy:
    """A policy the agent owns: UDP from ``src`` to ``dst`` port ``dport`` (the encapsulation's) must be
    ESP in transport mode (``level required``, template reqid ``naming.XFRM_REQID``). ``out``: what we send
    to the peer; ``in``: what we accept from it (a cleartext packet matching it is dropped).
    """

    direction: XfrmDirection
    src: str  # host addresses, normalised text (selector prefix length: /32 or /128)
    dst: str
    dport: int

    @property
    def ident(self) -> PolicyKey:
        return (self.direction, self.src, self.dst, self.dport)


@dataclass(frozen=True)
class SaCounters:
    """What the kernel counted on one SA (``ip -s xfrm state``)."""

    bytes: int = 0
    packets: int = 0
    replay: int = 0  # packets dropped as replayed (already seen sequence number)
    replay_window: int = 0  # packets dropped as too old for the window
    integrity_failed: int = 0  # packets whose ICV did not verify


@dataclass(frozen=True)
class KernelState:
    links: Mapping[str, Link] = field(default_factory=dict)
    fdb: frozenset[FdbEntry] = frozenset()
    neigh: frozenset[NeighEntry] = frozenset()
    wg: WgInterface | None = None
    wg_peers: Mapping[str, WgPeer] = field(default_factory=dict)  # by public key
    xfrm_sas: Mapping[SaKey, XfrmSa] = field(default_factory=dict)
    xfrm_policies: Mapping[PolicyKey, XfrmPolicy] = field(default_factory=dict)


# --- what the drivers report -------------------------------------------------------
# The drivers' observation and result types live here, with the objects they carry,
# so that the dataplane and the fakes use them without importing a driver (and with
# it pyroute2 or nftables).

OpT = TypeVar("OpT")


@dataclass
class ApplyResult(Generic[OpT]):
    """Ops that took effect and ops that failed with the kernel's reason.

    A driver keeps going after a failed op when later ops do not depend on it;
    the reconciler re-reads the kernel after any failure.
    """

    applied: list[OpT] = field(default_factory=list)
    failed: list[tuple[OpT, str]] = field(default_factory=list)
    requests: int = 0  # kernel requests made (netlink messages, wg peer changes)

    def merge(self, other: ApplyResult[OpT]) -> None:
        self.applied.extend(other.applied)
        self.failed.extend(other.failed)
        self.requests += other.requests


@dataclass(frozen=True)
class LinksObservation:
    links: dict[str, Link]
    fdb: frozenset[FdbEntry]
    neigh: frozenset[NeighEntry]


ObservedBackend = Literal["kernel", "userspace"]


@dataclass
class WgObservation:
    """The interface and peers as the kernel (or wireguard-go) reports them."""

    interface: WgInterface | None
    peers: dict[str, WgPeer] = field(default_factory=dict)  # by public key
    backend: ObservedBackend | None = None
    handshakes: dict[str, int] = field(default_factory=dict)  # epoch seconds, 0 = never


@dataclass
class XfrmObservation:
    """The agent's SAs and policies as the kernel reports them (only those with our reqid)."""

    sas: dict[SaKey, XfrmSa] = field(default_factory=dict)
    policies: dict[PolicyKey, XfrmPolicy] = field(default_factory=dict)
    counters: dict[SaKey, SaCounters] = field(default_factory=dict)
    added: dict[SaKey, int] = field(default_factory=dict)  # when the kernel added each SA (Unix seconds)


@dataclass(frozen=True)
class ObservedFirewall:
    present: bool
    fingerprint: str | None  # the table's comment, else the fingerprint rule comment
    elements: Mapping[str, frozenset[Element]]  # every allow* map/set of our table, normalised
    shape: Shape = frozenset()  # chains with rule counts, sets, maps, counters (see structure_shape)


ABSENT = ObservedFirewall(present=False, fingerprint=None, elements={})


ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
ETH_P_ARP = 0x0806


@dataclass(frozen=True)
class LoggedPacket:
    """One packet logged to the group, as far as its copied bytes tell."""

    prefix: str
    family: int  # 4 or 6
    src: str
    dst: str
    protocol: int  # upper-layer protocol (IPv6: after extension headers)
    sport: int | None
    dport: int | None
    icmp_type: int | None
    indev: int | None
    outdev: int | None
    icmp_code: int | None = None
    ethertype: int | None = None  # bridge-family packets only
    src_mac: str | None = None  # the frame's source MAC, when the kernel reports it
    arp_sha: str | None = None  # ARP: the sender hardware address it claims (src/dst are its sender/target IPs)
    physindev: int | None = None  # bridged packets: the ifindex of the bridge port it came in on
    transport: bytes = field(default=b"", compare=False, repr=False)  # the copied bytes from the L4 header on


def diff_fields(current: object, wanted: object) -> str:
    """What differs between two values of one dataclass, for an op's reason; keys are never shown."""
    fields = getattr(wanted, "__dataclass_fields__", {})
    changes = []
    for field_name, spec in fields.items():
        if not spec.compare:
            continue
        old, new = getattr(current, field_name), getattr(wanted, field_name)
        if old != new:
            if isinstance(old, frozenset) and isinstance(new, frozenset):
                changes.append(f"{field_name} +{sorted(new - old)} -{sorted(old - new)}")
            elif field_name in ("public_key",):
                changes.append(f"{field_name} changed")
            else:
                changes.append(f"{field_name} {old!r} -> {new!r}")
    return ", ".join(changes) or "changed"
