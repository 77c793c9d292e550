"""``veilnet-agent``: run the agent, check a state file, show identity, tear down."""

from __future__ import annotations

import argparse
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

from .. import __version__, logs
from ..core import naming
from ..core.config import DEFAULT_CONFIG_PATH, AgentConfig, load_config
from ..core.errors import ValidationError, VeilnetError

if TYPE_CHECKING:  # the drivers import pyroute2: load them only for commands that touch the kernel
    from ..drivers.links import LinksDriver
    from ..drivers.wireguard import WireGuardDriver

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_INVALID = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="veilnet-agent", description="Veilnet per-host data-plane agent")
    parser.add_argument("--version", action="version", version=f"veilnet-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help_text: str, state: str = "") -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH, help="agent TOML (default %(default)s)")
        if state:
            p.add_argument("--state-file", type=Path, required=state == "required",
                           help="desired node state, JSON or YAML" + (
                               "" if state == "required" else " (default: take it from the controller)"))
        return p

    add("run", "build and keep this node's data plane (foreground)", state="optional")
    add("check", "validate the config and a state file, change nothing", state="required")
    add("identity", "create the WireGuard key if missing and print the public key")
    add("teardown", "remove every kernel object this agent owns")
    p = add("join", "join a controller: get this host's certificate with a single-use token")
    p.add_argument("--controller", required=True, help="HOST:PORT of the controller's bootstrap listener")
    secret = p.add_mutually_exclusive_group(required=True)
    secret.add_argument("--token-file", metavar="PATH",
                        help="file holding the token from veilctl token create (mode 0600), or '-' for standard "
                             "input (prompted without echo on a terminal)")
    secret.add_argument("--token", help=argparse.SUPPRESS)  # refused with an explanation: see cmd_join
    p.add_argument("--ca-hash", required=True, help="sha256:... of the controller's CA (pinned; no trust on first use)")
    p = add("status", "show the running agent's status (local API)")
    p.add_argument("--json", action="store_true", help="print the whole status as JSON")
    p = add("attach", "attach a container endpoint (local API)")
    p.add_argument("--name", required=True)
    p.add_argument("--segment", required=True)
    p.add_argument("--mac", required=True)
    p.add_argument("--ipv4")
    p.add_argument("--ipv6")
    p.add_argument("--netns", required=True, help="the container's network namespace name (/run/netns/NAME)")
    p.add_argument("--ifname", default="eth0")
    p.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    p = add("detach", "detach an endpoint attached with attach (local API)")
    p.add_argument("--name", required=True)
    return parser


def _drivers(config: AgentConfig) -> tuple[LinksDriver, WireGuardDriver]:
    from ..drivers.links import LinksDriver
    from ..drivers.wireguard import WireGuardDriver

    return LinksDriver(), WireGuardDriver(naming.WG_IFNAME, config.state_dir, config.wireguard.backend,
                                          node=config.node_name)


def _capabilities(links: LinksDriver) -> list[str]:
    """What this host can do (the WireGuard backend in use is added once the interface is read back)."""
    return ["nftables", "vxlan", *(["geneve"] if links.geneve_supported() else [])]


def cmd_run(config: AgentConfig, state_file: Path | None) -> int:
    import threading

    from ..dataplane.firewall_manager import FirewallManager
    from ..dataplane.reconciler import Reconciler
    from ..dataplane.security_events import SecurityEventSink, run_reader_thread
    from ..dataplane.spoof_events import SpoofExplainer
    from ..drivers.firewall import FirewallDriver
    from ..drivers.nflog import NflogReader
    from .daemon import Daemon

    log = logs.get_logger(node=config.node_name)
    links, wireguard = _drivers(config)
    firewall_driver = FirewallDriver()
    shadowing = firewall_driver.legacy_iptables_rule_count()
    if shadowing:
        log.warning("iptables_legacy_rules_present", rules=shadowing,
                    note="iptables-legacy rules run in their own hooks and can drop overlay traffic the policy allows")
    stop = threading.Event()
    firewall = FirewallManager(firewall_driver, config.firewall, config.node_name)
    with ExitStack() as stack:
        stack.enter_context(links)
        try:
            nflog = stack.enter_context(NflogReader(config.firewall.nflog_group))
        except OSError as exc:  # enforcement does not depend on it: run without security events
            log.error("security_events_unavailable", nflog_group=config.firewall.nflog_group, error=str(exc))
        else:
            explainer = SpoofExplainer(lambda: firewall.desired)
            sink = SecurityEventSink(logs.get_logger(node=config.node_name), explain=explainer.explain)
            reader = run_reader_thread(nflog, sink, stop)
            stack.callback(reader.join, 2)
            stack.callback(stop.set)
        from ..drivers.xfrm import XfrmDriver

        reconciler = Reconciler(config, links, wireguard, firewall, xfrm=XfrmDriver())
        if state_file is None:
            from .controlled import ControlledDaemon

            return ControlledDaemon(config, reconciler, _capabilities(links)).run()
        return Daemon(config, state_file, reconciler).run()


def cmd_check(config: AgentConfig, state_file: Path) -> int:
    from .statefile import load_state_file

    state = load_state_file(state_file)
    if state.node != config.node_name:
        raise ValidationError("node", state.node, f"does not match this agent's node_name {config.node_name!r}")
    print(f"ok: {len(state.segments)} segments, {len(state.endpoints)} endpoints, {len(state.peers)} peers")
    return EXIT_OK


def cmd_identity(config: AgentConfig) -> int:
    from ..drivers.wireguard import WireGuardDriver

    driver = WireGuardDriver(naming.WG_IFNAME, config.state_dir, config.wireguard.backend, node=config.node_name)
    print(driver.ensure_private_key())
    return EXIT_OK


def cmd_teardown(config: AgentConfig) -> int:
    from ..core.objects import KernelState
    from ..core.ops import CreateLink, DeleteLink, DelFdb, DelNeigh, SyncXfrm, UpdateLink
    from ..core.planner import plan
    from ..drivers.xfrm import XfrmDriver

    links, wireguard = _drivers(config)
    with links:
        observed = links.observe()
        ops = plan(KernelState(), KernelState(links=observed.links, fdb=observed.fdb, neigh=observed.neigh))
        result = links.apply([op for op in ops if isinstance(op, (CreateLink, DeleteLink, UpdateLink, DelFdb,
                                                                   DelNeigh))])
    wireguard.remove_interface()
    # IPsec last: the tunnels that used its policies are gone (only SAs and policies with our reqid).
    xfrm = XfrmDriver()
    ours = xfrm.observe()
    gone = SyncXfrm(delete_policies=tuple(sorted(ours.policies)), delete_sas=tuple(sorted(ours.sas)),
                    reason="teardown")
    if gone:
        removed = xfrm.apply([gone])
        result.requests += removed.requests
        result.failed.extend((op, reason) for op, reason in removed.failed)  # type: ignore[misc]
    from ..drivers.firewall import FirewallDriver

    FirewallDriver().remove()
    log = logs.get_logger(node=config.node_name)
    for op, reason in result.failed:
        log.error("teardown_failed", op=str(op), reason=reason)
    log.info("teardown", links_deleted=sum(1 for op in result.applied if type(op).__name__ == "DeleteLink"))
    return EXIT_FAILURE if result.failed else EXIT_OK


def cmd_join(config: AgentConfig, args: argparse.Namespace) -> int:
    from ..control.enrollment import IdentityFiles, join, read_join_token

    if args.token is not None:
        # Never echo it: the point is that it should not be anywhere but the controller's hash table.
        raise ValidationError("--token", "(not shown)",
                              "is not accepted: a token on the command line is readable by every local user in "
                              "/proc/<pid>/cmdline while join runs, and stays in shell history; "
                              "use --token-file PATH (mode 0600) or --token-file - (standard input)")
    token = read_join_token(args.token_file, warn=lambda text: print(f"warning: {text}", file=sys.stderr))
    identity = join(IdentityFiles(config.identity_dir), config.node_name, args.controller, token, args.ca_hash)
    print(f"joined as {identity.spiffe_id}; certificate valid until {identity.not_after.isoformat()}")
    print("start the agent: systemctl start veilnet-agent")
    return EXIT_OK


def _local_call(config: AgentConfig, method: str, request: object) -> object:
    import grpc

    from ..control.local_api import client

    try:
        return getattr(client(config.control.local_socket), method)(request, timeout=30)
    except grpc.RpcError as exc:
        code = exc.code() if hasattr(exc, "code") else None
        detail = exc.details() if hasattr(exc, "details") else str(exc)
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            raise ValidationError("endpoint", "", detail) from None
        if code == grpc.StatusCode.UNAVAILABLE and detail.startswith("failed to connect"):
            raise VeilnetError(
                f"cannot use the agent's local API at {config.control.local_socket}: {detail} (is the agent "
                "running, and is this user root or in controller.socket_group? the agent logs refusals)") from None
        raise VeilnetError(f"{code.name.lower() if code else 'error'}: {detail}") from None


def cmd_status(config: AgentConfig, as_json: bool = False) -> int:
    from google.protobuf import json_format

    from veilnet.v1 import agent_pb2

    s = _local_call(config, "Status", agent_pb2.StatusRequest())
    assert isinstance(s, agent_pb2.StatusResponse)
    if as_json:
        print(json_format.MessageToJson(s, preserving_proto_field_name=True))
        return EXIT_OK
    print(f"node:        {s.node} ({s.mode} mode)")
    print(f"controller:  {s.controller} ({'connected' if s.controller_connected else 'DISCONNECTED'})")
    print(f"applied:     spec revision {s.applied_spec_revision} (update {s.applied_sequence})")
    print(f"state:       {s.segments} segments, {s.endpoints} endpoints, {s.peers} peers, {s.policies} policies")
    print(f"wireguard:   {s.wireguard_public_key}")
    if s.encryption == "ipsec":
        print(f"encryption:  ipsec, {len(s.peer_encryption)} peers")
        for p in s.peer_encryption:
            print(f"  {p.peer}: {p.state}, epoch {p.epoch}/{p.peer_epoch} age {p.epoch_age_seconds}s, "
                  f"out {p.bytes_out} B/{p.packets_out} pkts, in {p.bytes_in} B/{p.packets_in} pkts, "
                  f"replay failures {p.replay_failures}, integrity failures {p.integrity_failures}")
    print(f"certificate: expires {s.certificate_expires}, renews {s.certificate_renews}")
    if s.last_error:
        print(f"last error:  {s.last_error}")
    return EXIT_OK if s.controller_connected and not s.last_error else EXIT_FAILURE


def cmd_attach(config: AgentConfig, args: argparse.Namespace) -> int:
    from veilnet.v1 import agent_pb2, state_pb2

    labels = {}
    for item in args.label:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValidationError("--label", item, "must be KEY=VALUE")
        labels[key] = value
    endpoint = state_pb2.LocalEndpoint(name=args.name, segment=args.segment, mac=args.mac, ipv4=args.ipv4 or "",
                                       ipv6=args.ipv6 or "", netns=args.netns, ifname=args.ifname, labels=labels)
    _local_call(config, "AttachEndpoint", agent_pb2.AttachEndpointRequest(endpoint=endpoint))
    print(f"attached {args.name}")
    return EXIT_OK


def cmd_detach(config: AgentConfig, name: str) -> int:
    from veilnet.v1 import agent_pb2

    _local_call(config, "DetachEndpoint", agent_pb2.DetachEndpointRequest(name=name))
    print(f"detached {name}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load_config(args.config)
        logs.configure(config.log_format, config.log_level)
        if args.command == "run":
            return cmd_run(config, args.state_file)
        if args.command == "check":
            return cmd_check(config, args.state_file)
        if args.command == "identity":
            return cmd_identity(config)
        if args.command == "teardown":
            return cmd_teardown(config)
        if args.command == "join":
            return cmd_join(config, args)
        if args.command == "status":
            return cmd_status(config, args.json)
        if args.command == "attach":
            return cmd_attach(config, args)
        if args.command == "detach":
            return cmd_detach(config, args.name)
    except ValidationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except VeilnetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_FAILURE
    return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
