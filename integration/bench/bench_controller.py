#!/usr/bin/env python3
"""Control-plane fan-out benchmark: one real controller, N agent streams, a one-policy change.

One ``veilnet-controller`` process (loopback) serves N simulated agents: light
``grpc.aio`` clients, all on one asyncio loop in this process, each on its own
mutual-TLS channel with its own node certificate. The certificates come
straight from the controller's CA (``CertificateAuthority.issue_node``), not
from N joins: the join path is not what is measured here. Each agent says
hello with a random (valid) WireGuard key, converts every update it receives
(``wire.state_from_proto`` / ``wire.delta_from_proto``, a fair stand-in for the
agent's parse) and acks it.

The spec: N nodes in S segments (each node carries one segment, one endpoint
per node), IPv6-only ULA segment subnets, transport fd00:7::/64, underlay
2001:db8::/64, default-deny segments, one policy per segment plus 10 global
(CIDR-sourced) policies that every node receives.

  connect : from starting the N clients to every snapshot acked, and to every
            agent holding its full peer set (the keys in the hellos make the
            controller recompile while agents are still connecting). A stream
            that fails is dialled again as the agent does (jittered backoff)
            and counted.
  change  : K times, one global policy's port changes and the spec is applied
            (Admin.ApplySpec, JSON text). Latency per agent = the moment its ack
            for the new revision was written - the moment just before ApplySpec.
  reconnect: afterwards every agent disconnects and dials again with the same
            key (--reconnects times): a controller restart or network blip.
  floor   : a minimal grpc.aio mutual-TLS server (this script, --floor-server,
            same certificates) that on a trigger (a unary Admin.ApplySpec)
            sends each stream one pre-built policies-only delta, exactly the one
            the controller sends; same clients, same measurement.
  where   : in-process (controller stopped) timing of each step the controller
            takes for one change, with the same spec and keys.

Run:  .venv/bin/python integration/bench/bench_controller.py [--streams 1000 --changes 5]
Prints markdown tables (controller RSS/HWM from /proc/<pid>/status, compile
times from the controller's "compiled" log events); never asserts. The controller, the floor server and the temp
directory are removed even on Ctrl-C (unless --keep-dir).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import copy
import json
import math
import random
import resource
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from veilnet.v1 import admin_pb2 as apb
from veilnet.v1 import admin_pb2_grpc, controller_pb2_grpc
from veilnet.v1 import controller_pb2 as cpb
from veilnet.v1 import state_pb2 as spb
from veilnet_agent.control import wire

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "integration"))
from ctl import ControllerProcess, free_port, stop_process_group  # noqa: E402

GLOBAL_POLICIES = 10
INITIAL_BACKOFF = 0.5  # as the agent's control loop (veilnet_agent.control.client)
MAX_BACKOFF = 8.0
CHANGED_POLICY = "ops-0"  # global: every node's policies section changes
CLIENT_OPTIONS = [
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 15_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.use_local_subchannel_pool", 1),  # one connection per simulated agent, never shared
]
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


# --- the spec ------------------------------------------------------------------------------------------
def seg_prefix(s: int) -> str:
    return f"fd00:{0x100 + s:x}"  # fd00:100::/64, fd00:101::/64, ... (clear of the transport fd00:7::/64)


def node_name(i: int, n: int) -> str:
    return f"node-{i:0{max(4, len(str(n - 1)))}d}"


def build_spec(n: int, segments: int) -> dict[str, Any]:
    apps = ("web", "api", "db")
    spec: dict[str, Any] = {
        "encryption": "wireguard",
        "segments": [
            {"name": f"seg-{s}", "vni": 1000 + s, "encapsulation": "vxlan", "ipv6_subnet": f"{seg_prefix(s)}::/64",
             "ipv6_gateway": f"{seg_prefix(s)}::1", "mode": "default-deny"}
            for s in range(segments)
        ],
        "nodes": [],
        "endpoints": [],
        "policies": [],
    }
    for i in range(n):
        s, name = i % segments, node_name(i, n)
        spec["nodes"].append({
            "name": name, "underlay_address": f"2001:db8::{i + 1:x}", "underlay_port": 51820,
            "transport_address": f"fd00:7::{i + 1:x}/64", "keepalive": 0, "segments": [f"seg-{s}"],
            "labels": {"zone": f"z{i % 4}"},
        })
        spec["endpoints"].append({
            "name": f"ep-{i:04d}", "node": name, "segment": f"seg-{s}",
            "mac": f"02:00:{(i >> 24) & 255:02x}:{(i >> 16) & 255:02x}:{(i >> 8) & 255:02x}:{i & 255:02x}",
            "ipv6": f"{seg_prefix(s)}::{i + 2:x}", "netns": f"ep-{i:04d}", "ifname": "eth0",
            "labels": {"app": apps[i % 3]},
        })
    for s in range(segments):
        spec["policies"].append({
            "name": f"seg-{s}-web-to-api", "source": {"segment": f"seg-{s}", "match_labels": {"app": "web"}},
            "destination": {"segment": f"seg-{s}", "match_labels": {"app": "api"}}, "protocol": "tcp",
            "ports": [8080],
        })
    for j in range(GLOBAL_POLICIES):
        spec["policies"].append({
            "name": f"ops-{j}", "source": {"cidr": f"2001:db8:ff{j:02x}::/64"},
            "destination": {"match_labels": {"app": apps[j % 3]}}, "protocol": "tcp",
            "ports": [f"{9000 + 10 * j}-{9005 + 10 * j}"],
        })
    return spec


def changed_spec(spec: dict[str, Any], k: int, scope: str) -> dict[str, Any]:
    """``spec`` with one policy's port changed (change number ``k`` >= 1)."""
    out = copy.deepcopy(spec)
    target = CHANGED_POLICY if scope == "all" else "seg-0-web-to-api"
    for p in out["policies"]:
        if p["name"] == target:
            p["ports"] = [10_000 + k]
    return out


def spec_text(spec: dict[str, Any], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(spec)
    import yaml

    return str(yaml.safe_dump(spec, sort_keys=False))


def wg_key() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode()


# --- statistics and the process --------------------------------------------------------------------------
def pct(values: list[float], p: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def proc_memory(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of ``pid`` in MiB."""
    found: dict[str, float] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0]) / 1024
    return found.get("VmRSS", math.nan), found.get("VmHWM", math.nan)


def raise_nofile(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        if target < need:
            print(f"warning: open-file limit {target} < {need}", file=sys.stderr)


# --- simulated agents ----------------------------------------------------------------------------------
class Agent:
    def __init__(self, index: int, name: str, key_pem: bytes, cert_pem: bytes, expected_peers: int) -> None:
        self.index = index
        self.name = name
        self.key_pem = key_pem
        self.cert_pem = cert_pem
        self.wg_key = wg_key()
        self.expected_peers = expected_peers
        self.peers: set[str] = set()
        self.snapshot_at: float | None = None
        self.converged = False
        self.updates = 0
        self.failures: list[tuple[float, str]] = []  # (seconds after the clients started, reason)
        self.channel: aio.Channel | None = None

    def again(self) -> Agent:
        """The same node (certificate, WireGuard key) as a fresh process would dial again."""
        agent = Agent(self.index, self.name, self.key_pem, self.cert_pem, self.expected_peers)
        agent.wg_key = self.wg_key
        return agent


class Fleet:
    """N agents on this loop; tracks snapshot acks, convergence and per-revision ack times."""

    def __init__(self, agents: list[Agent], ca_pem: bytes) -> None:
        self.agents = agents
        self.ca_pem = ca_pem
        self.snapshots = 0
        self.converged = 0
        self.all_snapshots = asyncio.Event()
        self.all_converged = asyncio.Event()
        self.acks: dict[int, dict[int, float]] = {}
        self.done: dict[int, asyncio.Event] = {}
        self.last_message = time.perf_counter()
        self.tasks: list[asyncio.Task[None]] = []
        self.started = time.perf_counter()

    def revision_done(self, revision: int) -> asyncio.Event:
        return self.done.setdefault(revision, asyncio.Event())

    def start(self, endpoint: str) -> None:
        loop = asyncio.get_running_loop()
        self.started = time.perf_counter()
        self.tasks = [loop.create_task(self._run(a, endpoint)) for a in self.agents]

    async def _run(self, agent: Agent, endpoint: str) -> None:
        """Like the agent's control loop: one stream at a time; a failed stream is dialled again after a
        jittered exponential backoff (0.5 s doubling up to 8 s), a stream that worked and ended after 50 ms."""
        creds = grpc.ssl_channel_credentials(root_certificates=self.ca_pem, private_key=agent.key_pem,
                                             certificate_chain=agent.cert_pem)
        agent.channel = aio.secure_channel(endpoint, creds, options=CLIENT_OPTIONS)
        delay = INITIAL_BACKOFF
        while True:
            got_update = False
            try:
                got_update = await self._stream(agent)
                reason = "stream ended"
            except grpc.RpcError as exc:
                reason = f"{exc.code().name}: {exc.details()}"  # type: ignore[attr-defined]
            except Exception as exc:  # a benchmark client must not take the loop down
                reason = repr(exc)
            agent.failures.append((time.perf_counter() - self.started, reason))
            if got_update:
                delay = INITIAL_BACKOFF
                await asyncio.sleep(0.05)
            else:
                await asyncio.sleep(random.uniform(delay / 2, delay))
                delay = min(MAX_BACKOFF, delay * 2)

    async def _stream(self, agent: Agent) -> bool:
        """One Sync stream to its end; True if it delivered at least one update."""
        assert agent.channel is not None
        n = len(self.agents)
        got_update = False
        call = controller_pb2_grpc.ControllerStub(agent.channel).Sync()
        await call.write(cpb.AgentMessage(hello=cpb.Hello(
            agent_version="bench", capabilities=["wireguard-userspace", "nftables"],
            wireguard_public_key=agent.wg_key)))
        while True:
            message = await call.read()
            if message is aio.EOF:
                return got_update
            if message.WhichOneof("kind") != "update":
                continue
            got_update = True
            update = message.update
            self.last_message = time.perf_counter()
            body = update.WhichOneof("body")
            if body == "snapshot":
                state = wire.state_from_proto(update.snapshot)
                agent.peers = {p["name"] for p in state["peers"]}
            else:
                delta = wire.delta_from_proto(update.delta)
                agent.peers.difference_update(delta.peer_removes)
                agent.peers.update(p["name"] for p in delta.peer_upserts)
            await call.write(cpb.AgentMessage(ack=cpb.Ack(
                sequence=update.sequence, spec_revision=update.spec_revision, ok=True)))
            acked = time.perf_counter()
            agent.updates += 1
            if body == "snapshot" and agent.snapshot_at is None:
                agent.snapshot_at = acked
                self.snapshots += 1
                if self.snapshots == n:
                    self.all_snapshots.set()
            if not agent.converged and len(agent.peers) >= agent.expected_peers:
                agent.converged = True
                self.converged += 1
                if self.converged == n:
                    self.all_converged.set()
            per_revision = self.acks.setdefault(update.spec_revision, {})
            if agent.index not in per_revision:
                per_revision[agent.index] = acked
                if len(per_revision) == n:
                    self.revision_done(update.spec_revision).set()

    def failures(self) -> list[tuple[float, str]]:
        return [f for a in self.agents for f in a.failures]

    def errors(self) -> list[str]:
        failed = [f"{a.name}: {a.failures[-1][1]} at {a.failures[-1][0]:.1f}s" for a in self.agents if a.failures]
        return [f"{len(failed)} agents saw a stream fail", *failed[:3]]

    def failure_summary(self) -> str:
        """How many streams failed, why, and when (seconds after the clients started)."""
        items = self.failures()
        if not items:
            return "0"
        reasons = collections.Counter(reason for _, reason in items)
        times = [t for t, _ in items]
        top = "; ".join(f"{count}x {reason}" for reason, count in reasons.most_common(2))
        return f"{len(items)} ({top}; at {min(times):.1f}-{max(times):.1f} s)"

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await asyncio.gather(*(a.channel.close() for a in self.agents if a.channel is not None),
                             return_exceptions=True)


async def wait_for(event: asyncio.Event, timeout: float, what: str, fleet: Fleet) -> None:
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except TimeoutError:
        raise RuntimeError(f"timed out after {timeout}s waiting for {what}; agent errors: {fleet.errors()}") from None


async def quiet(fleet: Fleet, seconds: float, limit: float) -> None:
    """Wait until no agent received anything for ``seconds`` (the controller's recompile bursts are over)."""
    deadline = time.perf_counter() + limit
    while time.perf_counter() - fleet.last_message < seconds and time.perf_counter() < deadline:
        await asyncio.sleep(0.05)


async def run_phase(endpoint: str, agents: list[Agent], ca_pem: bytes, admin_creds: grpc.ChannelCredentials,
                    texts: list[str], timeout: float, converge: bool, reconnects: int = 0,
                    mark: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Connect every agent, apply each text in turn (per-change latencies, seconds), then reconnect every agent."""
    fleet = Fleet(agents, ca_pem)
    admin = aio.secure_channel(endpoint, admin_creds, options=[("grpc.max_receive_message_length", 64 << 20)])
    result: dict[str, Any] = {"changes": []}
    try:
        started = time.perf_counter()
        fleet.start(endpoint)
        await wait_for(fleet.all_snapshots, timeout, "every snapshot ack", fleet)
        result["connect_snapshots_s"] = time.perf_counter() - started
        if converge:
            await wait_for(fleet.all_converged, timeout, "every agent's full peer set", fleet)
            result["connect_converged_s"] = time.perf_counter() - started
        result["connect_updates"] = sum(a.updates for a in agents)
        result["connect_failures"] = fleet.failure_summary()
        await quiet(fleet, 1.0, timeout)
        mark("connect")
        stub = admin_pb2_grpc.AdminStub(admin)
        for k, text in enumerate(texts, 1):
            await quiet(fleet, 0.3, timeout)
            request = apb.ApplySpecRequest(spec_yaml=text, message=f"bench change {k}")
            t0 = time.perf_counter()
            response = await stub.ApplySpec(request, timeout=timeout)
            rpc_s = time.perf_counter() - t0
            await wait_for(fleet.revision_done(response.revision), timeout, f"acks of revision {response.revision}",
                           fleet)
            acks = fleet.acks[response.revision]
            latencies = [t - t0 for t in acks.values()]
            result["changes"].append({"revision": response.revision, "rpc_s": rpc_s, "latencies": latencies,
                                      "last_s": max(latencies)})
            print(f"  change {k}: revision {response.revision}, ApplySpec {rpc_s * 1000:.0f} ms, "
                  f"p50 {pct(latencies, 50) * 1000:.0f} ms, last ack {max(latencies) * 1000:.0f} ms",
                  file=sys.stderr)
        result["change_failures"] = len(fleet.failures()) - int(result["connect_failures"].split(" ")[0])
        mark("changes")
        for key in ("reconnect_snapshots_s", "reconnect_converged_s", "reconnect_updates", "reconnect_failures"):
            result[key] = []
        for round_ in range(1, reconnects + 1 if converge else 1):
            # The same agents, keys already known: what a controller restart or a network blip costs.
            await fleet.close()
            await asyncio.sleep(1.0)  # let the controller see every old stream end
            fleet = Fleet([a.again() for a in agents], ca_pem)
            started = time.perf_counter()
            fleet.start(endpoint)
            await wait_for(fleet.all_snapshots, timeout, "every snapshot ack (reconnect)", fleet)
            result["reconnect_snapshots_s"].append(time.perf_counter() - started)
            await wait_for(fleet.all_converged, timeout, "every agent's full peer set (reconnect)", fleet)
            result["reconnect_converged_s"].append(time.perf_counter() - started)
            result["reconnect_updates"].append(sum(a.updates for a in fleet.agents))
            result["reconnect_failures"].append(fleet.failure_summary())
            await quiet(fleet, 1.0, timeout)
            mark(f"reconnect {round_}")
    finally:
        await fleet.close()
        await admin.close()
    return result


# --- the floor server ------------------------------------------------------------------------------------
class FloorController(controller_pb2_grpc.ControllerServicer):  # type: ignore[misc]
    def __init__(self, delta: spb.StateDelta) -> None:
        self.delta = delta
        self.revision = 1
        self.streams: list[asyncio.Queue[int]] = []

    async def Sync(self, request_iterator: Any, context: Any) -> Any:
        await request_iterator.__anext__()  # the hello
        queue: asyncio.Queue[int] = asyncio.Queue()
        self.streams.append(queue)

        async def drain() -> None:
            async for _ in request_iterator:
                pass

        reader = asyncio.get_running_loop().create_task(drain())
        sequence = 1
        try:
            yield cpb.ControllerMessage(update=cpb.NodeUpdate(sequence=sequence, spec_revision=self.revision,
                                                              snapshot=spb.NodeState(node="floor")))
            while True:
                revision = await queue.get()
                sequence += 1
                yield cpb.ControllerMessage(update=cpb.NodeUpdate(
                    sequence=sequence, spec_revision=revision, base_sequence=sequence - 1, delta=self.delta))
        finally:
            reader.cancel()
            self.streams.remove(queue)


class FloorAdmin(admin_pb2_grpc.AdminServicer):  # type: ignore[misc]
    def __init__(self, controller: FloorController) -> None:
        self.c = controller

    async def ApplySpec(self, request: apb.ApplySpecRequest, context: Any) -> apb.ApplySpecResponse:
        self.c.revision += 1
        for queue in self.c.streams:
            queue.put_nowait(self.c.revision)
        return apb.ApplySpecResponse(revision=self.c.revision, changed=True)


async def floor_serve(port: int, data: Path, delta_file: Path) -> None:
    delta = spb.StateDelta.FromString(delta_file.read_bytes())
    ca = (data / "ca" / "ca.crt").read_bytes()
    cert = (data / "server.crt").read_bytes()
    chain = cert if cert.endswith(b"\n") else cert + b"\n"
    creds = grpc.ssl_server_credentials([((data / "server.key").read_bytes(), chain + ca)],
                                        root_certificates=ca, require_client_auth=True)
    server = aio.server(options=SERVER_OPTIONS)
    controller = FloorController(delta)
    controller_pb2_grpc.add_ControllerServicer_to_server(controller, server)
    admin_pb2_grpc.add_AdminServicer_to_server(FloorAdmin(controller), server)
    if not server.add_secure_port(f"127.0.0.1:{port}", creds):
        raise SystemExit(f"floor: cannot listen on port {port}")
    await server.start()
    task = asyncio.current_task()
    assert task is not None
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, task.cancel)
    print("ready", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await server.stop(grace=0.5)


def start_floor(port: int, data: Path, delta_file: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--floor-server", "--port", str(port), "--data-dir",
         str(data), "--delta-file", str(delta_file)],
        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, start_new_session=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != b"ready":
        proc.kill()
        raise RuntimeError(f"floor server did not start (exit {proc.wait()})")
    return proc


def stop_process(proc: subprocess.Popen[bytes] | None) -> None:
    stop_process_group(proc)


# --- where the time goes (in-process, nothing else running) ---------------------------------------------
def timed(fn: Callable[[], Any], repeat: int = 3) -> tuple[float, Any]:
    best, value = math.inf, None
    for _ in range(repeat):
        t0 = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - t0)
    return best, value


OFF_LOOP = "in a thread, once the fan-out has started"


def breakdown(old_text: str, new_text: str, keys: dict[str, str], work: Path) -> list[tuple[str, float, str]]:
    """Each step the controller takes for one ApplySpec + fan-out, timed alone on this machine (best of 3)."""
    from veilnet_controller.compile import compile_nodes
    from veilnet_controller.hub import Session
    from veilnet_controller.spec import canonical_text, load_spec_text, parse_spec, summarize_changes, unified_diff
    from veilnet_controller.store import SQLiteStore

    rows: list[tuple[str, float, str]] = []
    raw_old = load_spec_text(old_text)
    t_new, raw_new = timed(lambda: load_spec_text(new_text))
    rows.append(("load_spec_text (new text)", t_new, f"{len(new_text) / 1024:.0f} KiB"))
    t, spec_new = timed(lambda: parse_spec(raw_new))
    spec_old = parse_spec(raw_old)
    rows.append(("parse_spec (validate)", t, ""))
    t, canon_old = timed(lambda: canonical_text(load_spec_text(old_text)), 1)
    rows.append(("current revision: load + canonical_text", t, f"{OFF_LOOP}; cached per revision"))
    t, canon_new = timed(lambda: canonical_text(raw_new), 1)
    rows.append(("canonical_text (new)", t, OFF_LOOP))
    t, _diff = timed(lambda: unified_diff(canon_old, canon_new, "old", "new"))
    rows.append(("unified_diff", t, f"{OFF_LOOP}; {len(canon_new.splitlines())} lines"))
    t, _ = timed(lambda: summarize_changes(spec_old, spec_new))
    rows.append(("summarize_changes", t, ""))
    store = SQLiteStore(work / "breakdown.db")
    try:
        store.add_revision(old_text, "bench", "old", rolled_back_from=None, expected_current=0)
        t0 = time.perf_counter()
        record = store.add_revision(new_text, "bench", "new", rolled_back_from=None, expected_current=1)
        store.append_audit("bench", "admin", "spec.apply", "network-spec", record.number, {"changes": {}})
        rows.append(("store: add_revision + append_audit", time.perf_counter() - t0, "SQLite"))
    finally:
        store.close()
    base: dict[str, Any] = {}
    states_old = compile_nodes(spec_old, keys, {}, previous=base)

    def recompile() -> dict[str, dict[str, Any]]:
        previous = dict(base)  # as the hub does: the last compile's shared parts, reused where unchanged
        return compile_nodes(spec_new, keys, {}, previous=previous)

    t, states_new = timed(recompile)
    rows.append(("compile_nodes", t, f"{len(states_new)} nodes, reusing the previous compile's shared parts"))

    def next_messages() -> list[cpb.ControllerMessage]:
        out = []
        memo: dict[int, Any] = {}  # one per compile, shared by every session (as in the hub)
        for name, state in states_new.items():
            session = Session(name, "serial")
            session.sent_state, session.sent_revision, session.sequence = states_old[name], 1, 1
            session.set_target(state, 2, memo)
            message = session.next_message()
            assert message is not None
            out.append(message)
        return out

    t, messages = timed(next_messages)
    rows.append(("Session.next_message x N (diff_states + delta_to_proto)", t,
                 f"{t / len(messages) * 1e6:.0f} us each"))
    t, blobs = timed(lambda: [m.SerializeToString() for m in messages])
    rows.append(("SerializeToString x N", t, f"{len(blobs[0])} B each"))

    def client_side() -> None:
        for blob in blobs:
            wire.delta_from_proto(cpb.ControllerMessage.FromString(blob).update.delta)
            cpb.AgentMessage(ack=cpb.Ack(sequence=2, spec_revision=2, ok=True)).SerializeToString()

    t, _ = timed(client_side)
    rows.append(("client: parse + delta_from_proto + ack x N", t, "in the benchmark process"))
    return rows


def floor_delta(old_spec: dict[str, Any], new_spec: dict[str, Any], keys: dict[str, str], node: str) -> bytes:
    """The StateDelta the controller sends ``node`` for this change (serialized)."""
    from veilnet_controller.compile import compile_nodes
    from veilnet_controller.spec import parse_spec

    old = compile_nodes(parse_spec(old_spec), keys, {})[node]
    new = compile_nodes(parse_spec(new_spec), keys, {})[node]
    return bytes(wire.delta_to_proto(wire.diff_states(old, new)).SerializeToString())


# --- the run -----------------------------------------------------------------------------------------------
def compile_events(ctl: ControllerProcess) -> list[dict[str, Any]]:
    return [e for e in ctl.events(ctl.log_offset) if e.get("event") == "compiled"]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}"


def all_latencies(result: dict[str, Any]) -> list[float]:
    return [x for c in result["changes"] for x in c["latencies"]]


class Run:
    """What the run started (for cleanup) and what it measured."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.ctl: ControllerProcess | None = None
        self.floor: subprocess.Popen[bytes] | None = None
        self.memory: dict[str, tuple[float, float]] = {}
        self.compiles_at: dict[str, int] = {}
        self.events: list[dict[str, Any]] = []
        self.ctrl: dict[str, Any] = {}
        self.floor_result: dict[str, Any] | None = None
        self.floor_memory = (math.nan, math.nan)
        self.rows: list[tuple[str, float, str]] = []


async def bench(args: argparse.Namespace, run: Run) -> None:
    """Everything on one event loop (grpc.aio does not survive a second asyncio.run in one process)."""
    from veilnet_controller.ca import CertificateAuthority

    n, work = args.streams, run.work
    spec = build_spec(n, args.segments)
    specs = [changed_spec(spec, k, args.change_scope) for k in range(1, args.changes + 1)]
    texts = [spec_text(s, args.spec_format) for s in specs]
    ctl = run.ctl = ControllerProcess(work, server_names=["127.0.0.1", "localhost"], certificate_lifetime="24h")
    ctl.init()
    ca = CertificateAuthority.load(ctl.data / "ca")
    t0 = time.perf_counter()
    names = [node_name(i, n) for i in range(n)]
    per_segment = [len(range(s, n, args.segments)) for s in range(args.segments)]
    creds = [ca.issue_node(name, timedelta(hours=24)) for name in names]
    print(f"issued {n} node certificates from the controller's CA in {time.perf_counter() - t0:.1f}s (no joins)",
          file=sys.stderr)
    admin_dir = ctl.data / "operators" / "admin"
    admin_creds = grpc.ssl_channel_credentials(root_certificates=(admin_dir / "ca.crt").read_bytes(),
                                               private_key=(admin_dir / "client.key").read_bytes(),
                                               certificate_chain=(admin_dir / "client.crt").read_bytes())

    def make_agents(expect_peers: bool) -> list[Agent]:
        return [Agent(i, names[i], *creds[i], per_segment[i % args.segments] - 1 if expect_peers else 0)
                for i in range(n)]

    ctl.start()
    base_path = work / f"spec.{args.spec_format}"
    base_path.write_text(spec_text(spec, args.spec_format))
    t0 = time.perf_counter()
    base_revision = ctl.apply(base_path, message="bench base", wait=0)
    print(f"applied the base spec (revision {base_revision}, {base_path.stat().st_size / 1024:.0f} KiB "
          f"{args.spec_format}) with veilctl in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    pid = ctl.proc.pid if ctl.proc else 0
    run.memory["start"] = proc_memory(pid)
    run.compiles_at["start"] = len(compile_events(ctl))

    def mark(what: str) -> None:
        run.memory[what] = proc_memory(pid)
        run.compiles_at[what] = len(compile_events(ctl))

    agents = make_agents(True)
    print(f"controller: connecting {n} agents ...", file=sys.stderr)
    run.ctrl = await run_phase(ctl.control_endpoint, agents, ca.certificate_pem, admin_creds, texts, args.timeout,
                               True, args.reconnects, mark)
    run.memory["end"] = proc_memory(pid)
    run.events = compile_events(ctl)
    ctl.stop()
    keys = {a.name: a.wg_key for a in agents}

    if not args.no_floor:
        delta_file = work / "floor-delta.bin"
        delta_file.write_bytes(floor_delta(spec, specs[0], keys, names[0]))
        floor_port = free_port()
        run.floor = start_floor(floor_port, ctl.data, delta_file)
        print(f"floor: connecting {n} agents ...", file=sys.stderr)
        run.floor_result = await run_phase(f"127.0.0.1:{floor_port}", make_agents(False), ca.certificate_pem,
                                           admin_creds, texts, args.timeout, False)
        run.floor_memory = proc_memory(run.floor.pid)
        stop_process(run.floor)
        run.floor = None
    if not args.no_breakdown:
        base = spec_text(spec, args.spec_format)
        run.rows = breakdown(base, texts[0], keys, work)


def report(args: argparse.Namespace, run: Run) -> None:
    n, ctrl, floor_result, memory, events = args.streams, run.ctrl, run.floor_result, run.memory, run.events
    lat = all_latencies(ctrl)
    last = [c["last_s"] for c in ctrl["changes"]]
    print(f"\nController fan-out: {n} agent streams (mutual TLS, one certificate each), {args.segments} segments, "
          f"{GLOBAL_POLICIES + args.segments} policies, one policy changed per apply "
          f"({args.change_scope} nodes' states change), {args.spec_format} spec\n")
    header = ["streams", "changes", "p50 ms", "p99 ms", "max ms", "floor p50", "floor p99", "ratio p50",
              "ratio p99", "last-ack ms (median)", "RSS MiB", "HWM MiB"]
    fl = all_latencies(floor_result) if floor_result else []
    f50, f99 = pct(fl, 50), pct(fl, 99)
    cells = [str(n), str(args.changes), ms(pct(lat, 50)), ms(pct(lat, 99)), ms(max(lat)),
             ms(f50) if fl else "-", ms(f99) if fl else "-",
             f"{pct(lat, 50) / f50:.1f}" if fl else "-", f"{pct(lat, 99) / f99:.1f}" if fl else "-",
             ms(statistics.median(last)), f"{memory['changes'][0]:.0f}", f"{memory['changes'][1]:.0f}"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    print("| " + " | ".join(cells) + " |")

    print("\n| change | revision | ApplySpec RPC ms | compile ms (log) | p50 ms | p99 ms | last ack ms |"
          + (" floor p50 | floor p99 | floor last |" if floor_result else ""))
    print("|---|---|---|---|---|---|---|" + ("---|---|---|" if floor_result else ""))
    for k, c in enumerate(ctrl["changes"]):
        compiled = [float(e["seconds"]) for e in events if e.get("revision") == c["revision"]]
        row = (f"| {k + 1} | {c['revision']} | {ms(c['rpc_s'])} | {ms(compiled[0]) if compiled else '-'} | "
               f"{ms(pct(c['latencies'], 50))} | {ms(pct(c['latencies'], 99))} | {ms(c['last_s'])} |")
        if floor_result:
            fc = floor_result["changes"][k]
            row += f" {ms(pct(fc['latencies'], 50))} | {ms(pct(fc['latencies'], 99))} | {ms(fc['last_s'])} |"
        print(row)

    at = run.compiles_at
    connect = events[at["start"]:at["connect"]]
    reconnect = events[at["changes"]:]

    def compiles(items: list[dict[str, Any]]) -> str:
        return f"{len(items)} ({ms(sum(float(e['seconds']) for e in items))} ms)"

    print("\n| connect phase (from starting the clients) | controller | floor |")
    print("|---|---|---|")
    print(f"| new keys: all {n} snapshots acked ms | {ms(ctrl['connect_snapshots_s'])} | "
          f"{ms(floor_result['connect_snapshots_s']) if floor_result else '-'} |")
    print(f"| new keys: every agent holds its full peer set ms | {ms(ctrl['connect_converged_s'])} | - |")
    print(f"| new keys: updates received | {ctrl['connect_updates']} | "
          f"{floor_result['connect_updates'] if floor_result else '-'} |")
    print(f"| new keys: controller compiles (total) | {compiles(connect)} | - |")
    print(f"| new keys: streams that failed and were dialled again | {ctrl['connect_failures']} | "
          f"{floor_result['connect_failures'] if floor_result else '-'} |")
    rounds = len(ctrl["reconnect_snapshots_s"])
    if rounds:
        def each(key: str, fmt: Callable[[Any], str] = str) -> str:
            return " / ".join(fmt(x) for x in ctrl[key])

        label = "reconnect, keys known" + (f" (rounds 1..{rounds})" if rounds > 1 else "")
        print(f"| {label}: all snapshots acked ms | {each('reconnect_snapshots_s', ms)} | - |")
        print(f"| {label}: every agent holds its full peer set ms | {each('reconnect_converged_s', ms)} | - |")
        print(f"| {label}: updates received | {each('reconnect_updates')} | - |")
        print(f"| {label}: controller compiles (total) | {compiles(reconnect)} | - |")
        print(f"| {label}: streams that failed and were dialled again | {each('reconnect_failures')} | - |")
    print(f"| streams that failed during the changes | {ctrl['change_failures']} | "
          f"{floor_result['change_failures'] if floor_result else '-'} |")
    print("\n| controller memory | VmRSS MiB | VmHWM MiB |")
    print("|---|---|---|")
    for what, label in (("start", "base spec applied, no agent"), ("connect", f"{n} agents connected"),
                        ("changes", f"after {args.changes} changes"),
                        *((f"reconnect {r}", f"after reconnect {r} of {n} agents")
                          for r in range(1, len(ctrl["reconnect_snapshots_s"]) + 1))):
        print(f"| {label} | {memory[what][0]:.0f} | {memory[what][1]:.0f} |")
    if floor_result:
        print(f"| (floor server, {n} streams) | {run.floor_memory[0]:.0f} | {run.floor_memory[1]:.0f} |")

    if run.rows:
        print("\nWhere the time goes: each step of one apply + fan-out, run alone in this process "
              "(controller stopped; best of 3, YAML dumps once)\n")
        print("| step | ms | note |")
        print("|---|---|---|")
        for label, seconds, note in run.rows:
            print(f"| {label} | {seconds * 1000:.1f} | {note} |")
        on_loop = [r for r in run.rows if OFF_LOOP not in r[2] and not r[0].startswith("client")]
        print(f"| sum on the controller's event loop | {sum(r[1] for r in on_loop) * 1000:.1f} | |")
    print("\nlatency = ack written by the agent - just before ApplySpec, over all agents x changes; floor = a bare "
          "grpc.aio server sending the same pre-built delta to each stream. Target: p99 under 2000 ms.")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=1000, help="simulated agents (default 1000)")
    parser.add_argument("--changes", type=int, default=5, help="one-policy changes applied (default 5)")
    parser.add_argument("--segments", type=int, default=10, help="segments; nodes are spread evenly (default 10)")
    parser.add_argument("--change-scope", choices=("all", "segment"), default="all",
                        help="all: a global policy (every node's policies change); segment: one segment's policy")
    parser.add_argument("--spec-format", choices=("json", "yaml"), default="json", help="ApplySpec text format")
    parser.add_argument("--reconnects", type=int, default=1,
                        help="times every agent disconnects and dials again after the changes (default 1)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for any one phase")
    parser.add_argument("--no-floor", action="store_true", help="skip the floor server run")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the in-process timing of each step")
    parser.add_argument("--keep-dir", action="store_true", help="keep the work directory (controller data, log)")
    parser.add_argument("--floor-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--delta-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.floor_server:
        with contextlib.suppress(asyncio.CancelledError):
            asyncio.run(floor_serve(args.port, args.data_dir, args.delta_file))
        return 0
    if args.streams < 2 or args.segments < 1 or args.segments > args.streams or args.changes < 1:
        parser.error("need --streams >= 2, 1 <= --segments <= --streams and --changes >= 1")

    raise_nofile(4 * args.streams + 1024)  # inherited by the controller and the floor server
    run = Run(Path(tempfile.mkdtemp(prefix="vnbench-ctl-")))
    try:
        asyncio.run(bench(args, run))
    finally:
        stop_process(run.floor)
        if run.ctl is not None:
            run.ctl.stop()
        if args.keep_dir:
            print(f"kept {run.work}", file=sys.stderr)
        else:
            shutil.rmtree(run.work, ignore_errors=True)
    report(args, run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
