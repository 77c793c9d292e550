"""A rogue controller for tests: the real controller's CA and server certificate, but it sends bad things.

Mutual TLS succeeds exactly as with ``veilnet-controller serve`` (same key, same
chain, client certificates required and checked against the same CA), so the
agent accepts the stream; what follows depends on ``--mode``:

    garbage            bytes that are no ControllerMessage
    invalid-state      a snapshot the agent must refuse (an endpoint's IPv4 outside its segment's subnet),
                       built from the node's real last applied state (``--applied NODE=PATH``)
    out-of-order       a delta on a base sequence the agent never saw (one removing every peer)
    silent-then-close  accepts the stream, says nothing, ends it with UNAVAILABLE after 1 s

``Sync`` is registered as a generic stream-stream method with identity
(de)serializers, so any bytes can be sent. Every stream (the node, from its
client certificate, and its hello) and every message the agent sends back are
recorded in ``--record`` (a JSON object rewritten atomically). Prints ``ready``
on stdout once serving; exits on SIGTERM/SIGINT.

Run inside the lab's underlay namespace::

    nsenter --net=/run/netns/P-ul -- python integration/fake_controller.py \\
        --data-dir /run/P/controller/controller --listen 192.0.2.2:7443 --mode garbage --record out.json
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import ipaddress
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from grpc import aio

from veilnet.v1 import controller_pb2 as cpb
from veilnet.v1 import state_pb2 as spb
from veilnet_agent.control import pki, wire

MODES = ("garbage", "invalid-state", "out-of-order", "silent-then-close")
GARBAGE = b"\xff\xff\xff\xff garbage"
BAD_SPEC_REVISION = 99  # the revision the rogue snapshot claims (shows up in the agent's ack)
OUT_OF_ORDER_BASE = 41
SILENT_SECONDS = 1.0
# Like the real controller's listener (server.py): agents ping every 15 s.
OPTIONS = [
    ("grpc.so_reuseport", 0),  # never share 7443 with a real controller still running: fail instead
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


def log(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), file=sys.stderr, flush=True)


class Recorder:
    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.data: dict[str, list[dict[str, Any]]] = {"streams": [], "messages": []}
        self.flush()

    def add(self, kind: str, item: dict[str, Any]) -> None:
        self.data[kind].append(item)
        self.flush()

    def flush(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)


def invalid_state(applied_path: Path) -> tuple[dict[str, Any], str]:
    """The node's last applied state with its first endpoint's IPv4 moved outside its segment's subnet."""
    state = copy.deepcopy(json.loads(applied_path.read_text())["state"])
    endpoint = state["endpoints"][0]
    segment = next(s for s in state["segments"] if s["name"] == endpoint["segment"])
    subnet = ipaddress.ip_network(segment["ipv4_subnet"])
    endpoint["ipv4"] = str(subnet.broadcast_address + 1)  # the first address past the subnet
    return state, endpoint["ipv4"]


class Rogue:
    def __init__(self, mode: str, recorder: Recorder, applied: dict[str, Path]) -> None:
        self.mode = mode
        self.recorder = recorder
        self.applied = applied

    async def sync(self, requests: AsyncIterator[bytes], context: aio.ServicerContext[Any, Any]
                   ) -> AsyncIterator[bytes]:
        pems = context.auth_context().get("x509_pem_cert") or []
        node = pki.identity_from_certificate(pems[0]).name if pems else "?"
        incoming = requests.__aiter__()
        try:
            first = cpb.AgentMessage.FromString(await incoming.__anext__())
        except (StopAsyncIteration, DecodeError) as exc:
            log("bad_hello", node=node, error=repr(exc))
            return
        hello = json_format.MessageToDict(first.hello, preserving_proto_field_name=True)
        self.recorder.add("streams", {"node": node, "peer": context.peer(), "kind": first.WhichOneof("kind"),
                                      "hello": hello})
        log("stream", node=node, mode=self.mode)
        await context.send_initial_metadata((("veilnet-node", node),))  # the agent now counts itself connected
        if self.mode == "garbage":
            yield GARBAGE
        elif self.mode == "invalid-state":
            state, bad_ip = invalid_state(self.applied[node])
            log("sending_invalid_state", node=node, ipv4=bad_ip)
            update = cpb.NodeUpdate(sequence=1, spec_revision=BAD_SPEC_REVISION, snapshot=wire.state_to_proto(state))
            yield cpb.ControllerMessage(update=update).SerializeToString()
        elif self.mode == "out-of-order":
            # Were it applied, this delta would remove every peer: the data plane would show it.
            peers = [p["name"] for p in json.loads(self.applied[node].read_text())["state"]["peers"]]
            update = cpb.NodeUpdate(sequence=OUT_OF_ORDER_BASE + 1, spec_revision=BAD_SPEC_REVISION,
                                    base_sequence=OUT_OF_ORDER_BASE, delta=spb.StateDelta(peer_removes=peers))
            yield cpb.ControllerMessage(update=update).SerializeToString()
        elif self.mode == "silent-then-close":
            await asyncio.sleep(SILENT_SECONDS)
            log("closing", node=node)
            await context.abort(grpc.StatusCode.UNAVAILABLE, "fake controller: going away")
        # Hold the stream open and record whatever the agent says until it hangs up.
        async for raw in incoming:
            try:
                message = cpb.AgentMessage.FromString(raw)
                item = {"node": node, "kind": message.WhichOneof("kind"),
                        **json_format.MessageToDict(message, preserving_proto_field_name=True)}
            except DecodeError as exc:
                item = {"node": node, "kind": "undecodable", "error": str(exc)}
            self.recorder.add("messages", item)
            log("received", **item)


async def serve(args: argparse.Namespace) -> None:
    data = Path(args.data_dir)
    ca = (data / "ca" / "ca.crt").read_bytes()
    key = (data / "server.key").read_bytes()
    cert = (data / "server.crt").read_bytes()
    chain = cert if cert.endswith(b"\n") else cert + b"\n"
    credentials = grpc.ssl_server_credentials([(key, chain + ca)], root_certificates=ca, require_client_auth=True)
    applied = {}
    for item in args.applied:
        node, _, path = item.partition("=")
        applied[node] = Path(path)
    rogue = Rogue(args.mode, Recorder(Path(args.record) if args.record else None), applied)
    server = aio.server(options=OPTIONS)
    handler = grpc.stream_stream_rpc_method_handler(rogue.sync)  # no (de)serializers: raw bytes both ways
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("veilnet.v1.Controller",
                                                                          {"Sync": handler}),))
    if not server.add_secure_port(args.listen, credentials):
        raise SystemExit(f"cannot listen on {args.listen}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log("serving", listen=args.listen, mode=args.mode)
    print("ready", flush=True)
    await stop.wait()
    await server.stop(grace=0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--data-dir", required=True, help="the real controller's data directory")
    parser.add_argument("--listen", required=True, help="host:port, e.g. 192.0.2.2:7443")
    parser.add_argument("--mode", required=True, choices=MODES)
    parser.add_argument("--record", help="JSON file: every stream and every message received")
    parser.add_argument("--applied", action="append", default=[], metavar="NODE=PATH",
                        help="a node's applied.json (for invalid-state)")
    args = parser.parse_args(argv)
    try:
        cpb.ControllerMessage.FromString(GARBAGE)
    except DecodeError:
        pass
    else:
        raise SystemExit("GARBAGE parses as a ControllerMessage: pick other bytes")
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
