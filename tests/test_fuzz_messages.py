"""Fuzz targets over messages after protobuf decoding: the Sync stream both ways and the local API.

* Agent side: sequences of ``ControllerMessage`` (snapshots, deltas with right and wrong base
  sequences, commands, and whatever random bytes decode to) handed to the daemon as its loop does.
  No handler raises; every update is acknowledged once (or the stream is re-dialled when it is out of
  order); a refused update changes nothing in the (fake) kernel; no acknowledgement reports an internal
  error (that would be an unexpected exception the guard caught: a finding).
* Local API: sequences of attach, detach and status requests. Each is answered with a result or a
  LocalApiError of an expected kind (never INTERNAL); a refused call changes nothing.
* Controller side: a whole ``Sync`` stream (hello, then acks, statuses, key updates, endpoint reports,
  and random messages) through the real guarded handler and a real hub and store. It ends OK or with
  INVALID_ARGUMENT, never INTERNAL, and leaves no session behind.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import copy
import shutil
import tempfile
from collections.abc import AsyncIterator
from concurrent.futures import Future
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import yaml
from factories import wg_key
from fuzzing import JSON_VALUES, count, delta_messages, fuzz_settings, mutated, peer_of, valid_state
from grpc import aio
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs
from test_controlled import agent

from veilnet.v1 import admin_pb2 as apb
from veilnet.v1 import agent_pb2 as lpb
from veilnet.v1 import controller_pb2 as cpb
from veilnet.v1 import state_pb2 as spb
from veilnet_agent.control import pki, wire
from veilnet_agent.control.client import StreamEvent
from veilnet_agent.control.local_api import LocalApiError, LocalRequest
from veilnet_agent.testing import FakeKernel
from veilnet_controller.ca import CertificateAuthority
from veilnet_controller.hub import Hub
from veilnet_controller.server import AdminService, ControllerService, ServerSettings, Services
from veilnet_controller.spec import parse_spec
from veilnet_controller.store import SQLiteStore

EXAMPLE_SPEC = yaml.safe_load((Path(__file__).parents[1] / "examples" / "network.yaml").read_text())
TEXT = st.one_of(st.text(max_size=10), st.sampled_from(["blue", "green", "host-a", "peer-1", "02:00:00:0a:00:09",
                                                        "203.0.113.19", "fd00:b1::19", "ns-x", "eth0", "a-new",
                                                        "node.zone", "app", "web", wg_key("x"), ""]))


class Client:
    """The control client's sending side, as the daemon sees it."""

    connected = True
    endpoint = "192.0.2.2:7443"

    def __init__(self) -> None:
        self.sent: list[cpb.AgentMessage] = []
        self.reconnects = 0

    def send(self, message: cpb.AgentMessage) -> bool:
        self.sent.append(message)
        return True

    def reconnect(self, reason: str, *, misbehaved: bool = False) -> None:
        self.reconnects += 1

    def acks(self) -> list[cpb.Ack]:
        return [m.ack for m in self.sent if m.WhichOneof("kind") == "ack"]


def daemon_in(directory: str) -> tuple[Any, Client, FakeKernel]:
    kernel = FakeKernel()
    daemon, _ = agent(Path(directory), kernel)
    client = Client()
    daemon.client = client
    return daemon, client, kernel


# --------------------------------------------------------------------------- agent side of Sync

def _snapshot_mutators() -> st.SearchStrategy[Any]:
    """Changes to a snapshot message at the protobuf level: any field may hold anything its type allows."""
    def set_text(msg: spb.NodeState, value: str) -> None:
        msg.transport_address = value

    def segment_field(msg: spb.NodeState, value: str) -> None:
        if msg.segments:
            msg.segments[0].ipv4_subnet = value

    def vni(msg: spb.NodeState, value: int) -> None:
        if msg.segments:
            msg.segments[0].vni = value

    def peer_field(msg: spb.NodeState, value: str) -> None:
        if msg.peers:
            msg.peers[0].public_key = value

    def peer_port(msg: spb.NodeState, value: int) -> None:
        if msg.peers:
            msg.peers[-1].underlay_port = value

    def label(msg: spb.NodeState, value: str) -> None:
        msg.node_labels[value] = value

    def endpoint(msg: spb.NodeState, value: str) -> None:
        msg.endpoints.add(name=value, segment="blue", mac=value, ipv4=value, netns=value)

    texts = [set_text, segment_field, peer_field, label, endpoint]
    ints = [vni, peer_port]
    return st.one_of(st.tuples(st.sampled_from(texts), TEXT), st.tuples(st.sampled_from(ints),
                                                                         st.integers(0, 2**32 - 1)))


@st.composite
def controller_messages(draw: st.DrawFn) -> list[tuple[cpb.ControllerMessage, bool]]:
    """(message, whether its base sequence is the one the agent holds) for a short stream."""
    out: list[tuple[cpb.ControllerMessage, bool]] = []
    sequence = 0
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["snapshot", "snapshot", "delta", "delta", "command", "bytes"]))
        if kind == "bytes":
            try:
                msg = cpb.ControllerMessage.FromString(draw(st.binary(max_size=150)))
            except Exception:
                continue
            out.append((msg, False))
            continue
        if kind == "command":
            out.append((cpb.ControllerMessage(command=cpb.Command(kind=draw(st.integers(0, 6)))), False))  # type: ignore[arg-type]
            continue
        sequence += 1
        update = cpb.NodeUpdate(sequence=sequence, spec_revision=draw(st.integers(0, 2**63 - 1)))
        if kind == "snapshot":
            snapshot = wire.state_to_proto(draw(valid_state()))
            for mutate, value in draw(st.lists(_snapshot_mutators(), max_size=2)):
                mutate(snapshot, value)
            update.snapshot.CopyFrom(snapshot)
            in_order = True
        else:
            update.delta.CopyFrom(draw(delta_messages()))
            in_order = draw(st.booleans())
            update.base_sequence = sequence - 1 if in_order else draw(st.integers(0, 2**63 - 1))
        out.append((cpb.ControllerMessage(update=update), in_order))
    return out


@fuzz_settings(ci_examples=300, campaign_examples=2000)
@given(controller_messages())
def test_fuzz_sync_to_agent(stream: list[tuple[cpb.ControllerMessage, bool]]) -> None:
    count("sync-to-agent")
    with tempfile.TemporaryDirectory() as directory, capture_logs() as logs:
        daemon, client, kernel = daemon_in(directory)
        daemon._on_stream(StreamEvent("connected"))
        for message, _ in stream:
            before_kernel, before_acks, before_reconnects = kernel.state(), len(client.acks()), client.reconnects
            daemon._on_stream(StreamEvent("message", message))  # what the loop calls (outside its guard)
            daemon._after_pass(retry=False)
            acks = client.acks()[before_acks:]
            if message.WhichOneof("kind") == "update" and message.update.WhichOneof("body") is not None:
                reconnected = client.reconnects > before_reconnects
                assert len(acks) == (0 if reconnected else 1), (acks, reconnected)
                if reconnected:
                    assert kernel.state() == before_kernel
                    daemon._on_stream(StreamEvent("connected"))
                    continue
                (ack,) = acks
                assert ack.sequence == message.update.sequence
                if not ack.ok:
                    assert ack.error_field != "agent", f"an unexpected error: {ack.error_reason}"
                    assert kernel.state() == before_kernel, "a refused update changed the kernel"
            else:
                assert acks == []
        failures = [e for e in logs if e.get("event") in ("update_failed", "event_failed", "local_api_failed")]
        assert failures == [], failures


# --------------------------------------------------------------------------- local API

@st.composite
def local_requests(draw: st.DrawFn) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    names = ["a-new", "a-two", "a-web", ""]
    for _ in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(["attach", "attach", "attach", "detach", "status", "bytes"]))
        if kind == "status":
            out.append(("status", None))
        elif kind == "detach":
            out.append(("detach", draw(st.one_of(st.sampled_from(names), TEXT))))
        elif kind == "bytes":
            try:
                out.append(("attach", spb.LocalEndpoint.FromString(draw(st.binary(max_size=100)))))
            except Exception:
                continue
        else:
            k = draw(st.integers(0, 3))
            raw = {"name": draw(st.sampled_from(names)), "segment": draw(st.sampled_from(["blue", "green", "red"])),
                   "mac": f"02:00:00:0a:10:{k:02x}", "ipv4": f"203.0.113.{40 + k}", "netns": f"ns-{k}",
                   "labels": {"app": "web"}}
            raw = draw(mutated(raw, 2))
            message = spb.LocalEndpoint()
            for key, value in raw.items() if isinstance(raw, dict) else ():
                if key == "labels" and isinstance(value, dict):
                    for lk, lv in value.items():
                        if isinstance(lk, str) and isinstance(lv, str):
                            message.labels[lk.encode("utf-8", "replace").decode()] = \
                                lv.encode("utf-8", "replace").decode()
                elif key in ("name", "segment", "mac", "ipv4", "ipv6", "netns", "ifname") and isinstance(value, str):
                    setattr(message, key, value.encode("utf-8", "replace").decode())
            out.append(("attach", message))
    return out


ANSWERS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAVAILABLE}


@fuzz_settings(ci_examples=400, campaign_examples=2000)
@given(st.booleans(), local_requests())
def test_fuzz_local_api(with_state: bool, requests: list[tuple[str, Any]]) -> None:
    count("local-api")
    with tempfile.TemporaryDirectory() as directory, capture_logs():
        daemon, _, kernel = daemon_in(directory)
        if with_state:
            raw = {**copy.deepcopy(valid_state_example()), "endpoints": []}
            update = cpb.NodeUpdate(sequence=1, spec_revision=1, snapshot=wire.state_to_proto(raw))
            daemon._on_stream(StreamEvent("message", cpb.ControllerMessage(update=update)))
        for kind, payload in requests:
            before_attached, before_links = dict(daemon.attached), dict(kernel.links_by_name)
            request = LocalRequest(kind, payload, Future())
            daemon._on_local(request)
            assert request.reply.done()
            problem = request.reply.exception()
            if problem is None:
                if kind == "status":
                    assert isinstance(request.reply.result(), lpb.StatusResponse)
                continue
            assert isinstance(problem, LocalApiError), repr(problem)
            assert problem.code in ANSWERS, (problem.code, str(problem))
            assert len(str(problem)) <= 2000 and str(problem).isprintable()
            if problem.code != grpc.StatusCode.UNAVAILABLE:  # a detach that waits for the kernel keeps going
                assert daemon.attached == before_attached and kernel.links_by_name == before_links


def valid_state_example() -> dict[str, Any]:
    state = {"node": "host-a", "transport_address": "fd00:7::1/64",
             "segments": [{"name": "blue", "vni": 100, "ipv4_subnet": "203.0.113.0/24",
                           "ipv4_gateway": "203.0.113.1"}],
             "endpoints": [], "peers": [peer_of(1)], "policies": []}
    state["peers"][0]["segments"] = ["blue"]
    return state


# --------------------------------------------------------------------------- controller side of Sync

class _Context:
    """What the Sync handler uses of a grpc.aio context."""

    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None
        self.details = ""

    def peer(self) -> str:
        return "ipv4:127.0.0.1:5555"

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}  # no TLS: no client certificate to relay with epoch keys

    async def send_initial_metadata(self, metadata: Any) -> None:
        return None

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code, self.details = code, details
        raise aio.AbortError()  # what grpc.aio's abort raises (the guard lets it through)


@st.composite
def agent_messages(draw: st.DrawFn) -> list[cpb.AgentMessage]:
    endpoint = st.builds(spb.LocalEndpoint, name=TEXT, segment=TEXT, mac=TEXT, ipv4=TEXT, ipv6=TEXT, netns=TEXT,
                         ifname=TEXT, labels=st.dictionaries(TEXT, TEXT, max_size=2))
    valid_endpoint = st.integers(0, 9).map(lambda k: spb.LocalEndpoint(
        name=f"c-new-{k}", segment="blue", mac=f"02:00:00:0c:10:{k:02x}", ipv4=f"203.0.113.{40 + k}",
        netns=f"n{k}"))
    endpoints = st.lists(st.one_of(endpoint, valid_endpoint), max_size=3)
    key = st.one_of(st.just(wg_key("host-c")), st.just(wg_key("host-a")), TEXT)
    hello = st.builds(cpb.Hello, wireguard_public_key=key, attached_endpoints=endpoints,
                      capabilities=st.lists(TEXT, max_size=2), applied_sequence=st.integers(0, 2**63 - 1))
    first = draw(st.one_of(hello.map(lambda h: cpb.AgentMessage(hello=h)),
                           st.builds(cpb.AgentMessage)))
    later = st.one_of(
        st.builds(cpb.Ack, sequence=st.integers(0, 2**63 - 1), ok=st.booleans(), error_field=TEXT,
                  error_value=TEXT, error_reason=st.text(max_size=50)).map(lambda a: cpb.AgentMessage(ack=a)),
        st.builds(cpb.AgentStatus, last_error=TEXT, drift_repairs=st.integers(0, 2**32 - 1))
        .map(lambda s: cpb.AgentMessage(status=s)),
        key.map(lambda k: cpb.AgentMessage(key_update=cpb.KeyUpdate(wireguard_public_key=k))),
        endpoints.map(lambda e: cpb.AgentMessage(endpoints=cpb.EndpointReport(endpoints=e))),
        st.binary(max_size=80).map(_decoded),
        st.builds(cpb.EpochKey, node=st.one_of(st.just("host-c"), TEXT), epoch=st.integers(0, 2**64 - 1),
                  public_key=st.binary(max_size=40), signature=st.binary(max_size=210),
                  certificate_pem=st.one_of(st.just(b""), st.binary(max_size=20)))
        .map(lambda k: cpb.AgentMessage(epoch_key=k)),
        st.builds(cpb.SaReady, peer=st.one_of(st.just("host-a"), st.just("host-c"), TEXT),
                  sender_epoch=st.integers(0, 2**64 - 1)).map(lambda r: cpb.AgentMessage(sa_ready=r)),
        st.builds(cpb.AgentStatus, encryption=st.lists(st.builds(cpb.PeerEncryption, peer=TEXT, state=TEXT,
                                                                 bytes_in=st.integers(0, 2**64 - 1)), max_size=3))
        .map(lambda s: cpb.AgentMessage(status=s)),
    )
    return [first, *draw(st.lists(later, max_size=4))]


def _decoded(data: bytes) -> cpb.AgentMessage:
    try:
        return cpb.AgentMessage.FromString(data)
    except Exception:
        return cpb.AgentMessage()


@fuzz_settings(ci_examples=250, campaign_examples=2000)
@given(agent_messages(), st.booleans())
def test_fuzz_sync_to_controller(messages: list[cpb.AgentMessage], with_spec: bool) -> None:
    count("sync-to-controller")
    with tempfile.TemporaryDirectory() as directory, capture_logs() as logs:
        store = SQLiteStore(Path(directory) / "c.db")
        try:
            asyncio.run(_controller_stream(store, messages, with_spec))
        finally:
            store.close()
        assert [e for e in logs if e.get("event") == "rpc_failed"] == []


async def _controller_stream(store: SQLiteStore, messages: list[cpb.AgentMessage], with_spec: bool) -> None:
    hub = Hub(store)
    hub.load()
    hub.public_keys["host-a"] = wg_key("host-a")  # another node's key, which host-c may not take
    if with_spec:
        hub.set_spec(parse_spec(EXAMPLE_SPEC), store.add_revision(yaml.safe_dump(EXAMPLE_SPEC), "t", "").number)
    settings = ServerSettings("127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0", timedelta(hours=1))
    services = Services(None, store, hub, settings)  # type: ignore[arg-type]
    now = datetime.now(UTC)
    node = pki.Identity(kind="node", name="host-c", role="node", trust_domain="t",
                        spiffe_id="spiffe://t/node/host-c", serial="s-c", not_before=now - timedelta(minutes=1),
                        not_after=now + timedelta(hours=1))

    async def authenticate(context: Any, method: str) -> pki.Identity:
        return node

    services.authenticate = authenticate  # type: ignore[method-assign]

    async def requests() -> AsyncIterator[cpb.AgentMessage]:
        for m in messages:
            yield m
            await asyncio.sleep(0)

    context = _Context()
    sent: list[cpb.ControllerMessage] = []
    try:
        async for message in ControllerService(services, bootstrap=False).Sync(requests(), context):
            sent.append(message)
    except aio.AbortError:
        pass
    assert context.code in (None, grpc.StatusCode.INVALID_ARGUMENT), (context.code, context.details)
    assert len(context.details) <= 2000
    assert "host-c" not in hub.sessions, "the stream ended: its session is gone"
    keys = list(hub.public_keys.values())
    assert len(keys) == len(set(keys)), "two nodes hold one WireGuard key"
    if hub._recompile_task is not None:
        hub._recompile_task.cancel()
    for e in hub.attached.get("host-c", ()):
        assert JSON_VALUES is not None and e.node == "host-c"


# --------------------------------------------------------------------------- every unary RPC

_CA_DIR = tempfile.mkdtemp(prefix="veilnet-fuzz-ca-")
atexit.register(shutil.rmtree, _CA_DIR, True)
_CA: CertificateAuthority | None = None
_KEY = pki.generate_private_key()
CSRS = {name: pki.make_csr(_KEY, name) for name in ("host-c", "host-a", "x" * 63)}
SPEC_TEXT = yaml.safe_dump(EXAMPLE_SPEC)


def _ca() -> CertificateAuthority:
    global _CA
    if _CA is None:
        _CA = CertificateAuthority.create(Path(_CA_DIR) / "ca", "veilnet.test")
    return _CA


@st.composite
def unary_calls(draw: st.DrawFn) -> list[tuple[str, Any]]:
    """A few calls of the Admin service and Join, with requests an operator (or anyone, for Join) could send."""
    name = st.one_of(TEXT, st.sampled_from(["host-a", "host-c", "alice", "x" * 64]), st.text(max_size=300))
    number = st.one_of(st.integers(0, 3), st.integers(0, 2**63 - 1))
    insert = st.sampled_from(["!!int ", "&a ", "*a", "\n- ", "x: 1\n", "2023-02-30", "0x_", "\t", "{", "9" * 200])
    spec_text = st.one_of(st.just(SPEC_TEXT), st.text(max_size=50), st.builds(
        lambda at, piece: SPEC_TEXT[:at] + piece + SPEC_TEXT[at:], st.integers(0, len(SPEC_TEXT)), insert))
    calls = {
        "ApplySpec": st.builds(apb.ApplySpecRequest, spec_yaml=spec_text, message=TEXT,
                               expected_revision=st.one_of(st.just(0), number)),
        "DiffSpec": st.builds(apb.DiffSpecRequest, spec_yaml=spec_text),
        "GetSpec": st.builds(apb.GetSpecRequest, revision=number),
        "History": st.builds(apb.HistoryRequest, limit=st.integers(0, 2**32 - 1)),
        "Rollback": st.builds(apb.RollbackRequest, revision=number, message=TEXT),
        "ListNodes": st.builds(apb.ListNodesRequest),
        "CreateJoinToken": st.builds(apb.CreateJoinTokenRequest, node_name=name,
                                     ttl_seconds=st.integers(0, 2**32 - 1)),
        "RevokeNode": st.builds(apb.RevokeNodeRequest, node_name=name, reason=TEXT),
        "RevokeOperator": st.builds(apb.RevokeOperatorRequest, name=name, reason=TEXT),
        "SendCommand": st.builds(apb.SendCommandRequest, node_name=name,
                                 command=st.one_of(st.sampled_from(["resync", "rotate-keys", "x"]), TEXT)),
        "ReadAudit": st.builds(apb.ReadAuditRequest, limit=st.integers(0, 2**32 - 1), verify=st.booleans()),
        "Join": st.builds(cpb.JoinRequest, node_name=name, token=st.one_of(st.just("TOKEN"), TEXT),
                          csr_pem=st.one_of(st.sampled_from(list(CSRS.values())), st.binary(max_size=60))),
    }
    return [(method, draw(calls[method])) for method in draw(st.lists(st.sampled_from(sorted(calls)), min_size=1,
                                                                      max_size=4))]


ANSWERED = {None, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ABORTED,
            grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.RESOURCE_EXHAUSTED,
            grpc.StatusCode.FAILED_PRECONDITION}


@fuzz_settings(ci_examples=200, campaign_examples=2000)
@given(unary_calls())
def test_fuzz_unary_rpcs(calls: list[tuple[str, Any]]) -> None:
    """Every unary RPC (the Admin service as an operator; Join as anyone) with fuzzed requests: each answers or
    refuses with an expected code and bounded details, never INTERNAL, and only a call that succeeded
    stores a revision."""
    count("unary-rpcs")
    with tempfile.TemporaryDirectory() as directory, capture_logs() as logs:
        store = SQLiteStore(Path(directory) / "c.db")
        try:
            asyncio.run(_unary(store, calls))
        finally:
            store.close()
        assert [e for e in logs if e.get("event") == "rpc_failed"] == []


async def _unary(store: SQLiteStore, calls: list[tuple[str, Any]]) -> None:
    hub = Hub(store)
    hub.load()
    settings = ServerSettings("127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0", timedelta(hours=1))
    services = Services(_ca(), store, hub, settings)
    now = datetime.now(UTC)
    operator = pki.Identity(kind="operator", name="alice", role="admin", trust_domain="veilnet.test",
                            spiffe_id="spiffe://veilnet.test/operator/alice", serial="s-alice",
                            not_before=now - timedelta(minutes=1), not_after=now + timedelta(hours=1))

    async def authenticate(context: Any, method: str) -> pki.Identity:
        return operator

    services.authenticate = authenticate  # type: ignore[method-assign]
    admin = AdminService(services)
    bootstrap = ControllerService(services, bootstrap=True)
    token, _ = store.create_token("host-c", timedelta(hours=1), "alice")
    for method, request in calls:
        if method == "Join" and request.token == "TOKEN":
            request.token = token
        revisions = len(store.revisions(1000))
        context = _Context()
        handler = getattr(bootstrap if method == "Join" else admin, method)
        with contextlib.suppress(aio.AbortError):
            await handler(request, context)
        assert context.code in ANSWERED, (method, context.code, context.details)
        assert len(context.details) <= 2000 and context.details.isprintable()
        stored = len(store.revisions(1000)) - revisions
        assert stored == (1 if method in ("ApplySpec", "Rollback") and context.code is None and stored else 0)
        if method in ("ApplySpec", "Rollback") and context.code is not None:
            assert stored == 0, "a refused spec was stored"
    if hub._recompile_task is not None:
        hub._recompile_task.cancel()
