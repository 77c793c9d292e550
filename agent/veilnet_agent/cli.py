"""``veilnet-agent``: run the agent, check a state file, show identity, tear down."""

from __future__ import annotations

import argparse
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__, logs, naming
from .config import DEFAULT_CONFIG_PATH, AgentConfig, load_config
from .errors import ValidationError, VeilnetError

if TYPE_CHECKING:  # the drivers import pyroute2: load them only for commands that touch the kernel
    from .drivers.links import LinksDriver
    from .drivers.wireguard import WireGuardDriver

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_INVALID = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="veilnet-agent", description="Veilnet per-host data-plane agent")
    parser.add_argument("--version", action="version", version=f"veilnet-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help_text: str, state: bool = False) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH, help="agent TOML (default %(default)s)")
        if state:
            p.add_argument("--state-file", type=Path, required=True, help="desired node state, JSON or YAML")
        return p

    add("run", "build and keep this node's data plane (foreground)", state=True)
    add("check", "validate the config and a state file, change nothing", state=True)
    add("identity", "create the WireGuard key if missing and print the public key")
    add("teardown", "remove every kernel object this agent owns")
    return parser


def _drivers(config: AgentConfig) -> tuple[LinksDriver, WireGuardDriver]:
    from .drivers.links import LinksDriver
    from .drivers.wireguard import WireGuardDriver

    return LinksDriver(), WireGuardDriver(naming.WG_IFNAME, config.state_dir, config.wireguard.backend)


def cmd_run(config: AgentConfig, state_file: Path) -> int:
    import threading

    from .daemon import Daemon
    from .drivers.firewall import FirewallDriver
    from .drivers.nflog import NflogReader
    from .firewall_manager import FirewallManager
    from .reconciler import Reconciler
    from .security_events import SecurityEventSink, run_reader_thread

    log = logs.get_logger(node=config.node_name)
    links, wireguard = _drivers(config)
    firewall_driver = FirewallDriver()
    shadowing = firewall_driver.legacy_iptables_rule_count()
    if shadowing:
        log.warning("iptables_legacy_rules_present", rules=shadowing,
                    note="iptables-legacy rules run in their own hooks and can drop overlay traffic the policy allows")
    stop = threading.Event()
    with ExitStack() as stack:
        stack.enter_context(links)
        try:
            nflog = stack.enter_context(NflogReader(config.firewall.nflog_group))
        except OSError as exc:  # enforcement does not depend on it: run without security events
            log.error("security_events_unavailable", nflog_group=config.firewall.nflog_group, error=str(exc))
        else:
            reader = run_reader_thread(nflog, SecurityEventSink(logs.get_logger(node=config.node_name)), stop)
            stack.callback(reader.join, 2)
            stack.callback(stop.set)
        firewall = FirewallManager(firewall_driver, config.firewall, config.node_name)
        reconciler = Reconciler(config, links, wireguard, firewall)
        return Daemon(config, state_file, reconciler).run()


def cmd_check(config: AgentConfig, state_file: Path) -> int:
    from .statefile import load_state_file

    state = load_state_file(state_file)
    if state.node != config.node_name:
        raise ValidationError("node", state.node, f"does not match this agent's node_name {config.node_name!r}")
    print(f"ok: {len(state.segments)} segments, {len(state.endpoints)} endpoints, {len(state.peers)} peers")
    return EXIT_OK


def cmd_identity(config: AgentConfig) -> int:
    from .drivers.wireguard import WireGuardDriver

    print(WireGuardDriver(naming.WG_IFNAME, config.state_dir, config.wireguard.backend).ensure_private_key())
    return EXIT_OK


def cmd_teardown(config: AgentConfig) -> int:
    from .objects import KernelState
    from .ops import EnsureWgInterface, SyncWgPeers
    from .planner import plan

    links, wireguard = _drivers(config)
    with links:
        observed = links.observe()
        ops = plan(KernelState(), KernelState(links=observed.links, fdb=observed.fdb, neigh=observed.neigh))
        result = links.apply([op for op in ops if not isinstance(op, (SyncWgPeers, EnsureWgInterface))])
    wireguard.remove_interface()
    from .drivers.firewall import FirewallDriver

    FirewallDriver().remove()
    log = logs.get_logger(node=config.node_name)
    for op, reason in result.failed:
        log.error("teardown_failed", op=str(op), reason=reason)
    log.info("teardown", links_deleted=sum(1 for op in result.applied if type(op).__name__ == "DeleteLink"))
    return EXIT_FAILURE if result.failed else EXIT_OK


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
