"""``veilctl``: the operators' CLI for the controller's Admin service (mutual TLS).

Credentials: ``--credentials DIR`` (client.key, client.crt, ca.crt, as written
by ``veilnet-controller operator-cert``) or $VEILCTL_CREDENTIALS; the
controller: ``--controller HOST:PORT`` or $VEILCTL_CONTROLLER.

Exit codes scripts can rely on::

    0  success (diff: no difference)     4  not found (command: node not connected)
    1  diff: differences found;          5  conflict (the spec changed meanwhile)
       apply --wait: not every node      6  controller unreachable / TLS failure
       applied in time; audit --verify:  7  other server error
       log broken (chain, signature or head)
    2  invalid input (the error names the field)
    3  not authenticated or not permitted
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from veilnet.v1 import admin_pb2 as apb
from veilnet.v1 import admin_pb2_grpc

EXIT_OK = 0
EXIT_DIFFERENT = 1
EXIT_INVALID = 2
EXIT_DENIED = 3
EXIT_NOT_FOUND = 4
EXIT_CONFLICT = 5
EXIT_UNAVAILABLE = 6
EXIT_SERVER = 7

_STATUS_EXIT = {
    grpc.StatusCode.INVALID_ARGUMENT: EXIT_INVALID,
    grpc.StatusCode.UNAUTHENTICATED: EXIT_DENIED,
    grpc.StatusCode.PERMISSION_DENIED: EXIT_DENIED,
    grpc.StatusCode.NOT_FOUND: EXIT_NOT_FOUND,
    grpc.StatusCode.ABORTED: EXIT_CONFLICT,
    grpc.StatusCode.UNAVAILABLE: EXIT_UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: EXIT_UNAVAILABLE,
}
MAX_SPEC_FILE = 8 * 1024 * 1024


class UsageError(Exception):
    pass


def _stub(args: argparse.Namespace) -> admin_pb2_grpc.AdminStub:
    controller = args.controller or os.environ.get("VEILCTL_CONTROLLER")
    creds_dir = args.credentials or os.environ.get("VEILCTL_CREDENTIALS")
    if not controller:
        raise UsageError("no controller: pass --controller HOST:PORT or set VEILCTL_CONTROLLER")
    if not creds_dir:
        raise UsageError("no credentials: pass --credentials DIR or set VEILCTL_CREDENTIALS")
    d = Path(creds_dir)
    try:
        creds = grpc.ssl_channel_credentials(
            root_certificates=(d / "ca.crt").read_bytes(),
            private_key=(d / "client.key").read_bytes(),
            certificate_chain=(d / "client.crt").read_bytes(),
        )
    except OSError as exc:
        raise UsageError(f"cannot read credentials in {d}: {exc.strerror} ({exc.filename})") from None
    options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    if args.server_name:
        options.append(("grpc.ssl_target_name_override", args.server_name))
    channel = grpc.secure_channel(controller, creds, options=options)
    return admin_pb2_grpc.AdminStub(channel)


def _read_spec(path: str) -> str:
    try:
        if path == "-":
            text = sys.stdin.read(MAX_SPEC_FILE + 1)
        else:
            p = Path(path)
            if p.stat().st_size > MAX_SPEC_FILE:
                raise UsageError(f"{path}: larger than {MAX_SPEC_FILE} bytes")
            text = p.read_text()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not UTF-8 text") from None
    if len(text) > MAX_SPEC_FILE:
        raise UsageError(f"{path}: larger than {MAX_SPEC_FILE} bytes")
    return text


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    if args.output == "json":
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print(text)


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- commands


def cmd_apply(args: argparse.Namespace, stub: admin_pb2_grpc.AdminStub) -> int:
    text = _read_spec(args.file)
    resp = stub.ApplySpec(apb.ApplySpecRequest(spec_yaml=text, message=args.message or "",
                                               expected_revision=args.expected_revision or 0), timeout=args.timeout)
    if not resp.changed:
        _emit(args, {"revision": resp.revision, "changed": False}, f"unchanged: revision {resp.revision} is current")
    else:
        _emit(args, {"revision": resp.revision, "changed": True, "diff": resp.diff},
              f"{resp.diff.rstrip()}\napplied: revision {resp.revision}" if resp.diff else f"applied: {resp.revision}")
    if args.wait:
        return _wait_applied(args, stub, resp.revision)
    return EXIT_OK


def _wait_applied(args: argparse.Namespace, stub: admin_pb2_grpc.AdminStub, revision: int) -> int:
    """Wait until every connected node in the spec acknowledged ``revision`` (or reported an error)."""
    deadline = time.monotonic() + args.wait
    while True:
        nodes = stub.ListNodes(apb.ListNodesRequest(), timeout=args.timeout).nodes
        pending = [n for n in nodes if n.in_spec and n.connected and n.applied_spec_revision < revision]
        failed = [n for n in nodes if n.in_spec and n.last_error and n.rejected_spec_revision >= revision]
        if failed:
            for n in failed:
                print(f"error: {n.name} rejected the state: {n.last_error}", file=sys.stderr)
            return EXIT_DIFFERENT
        if not pending:
            offline = [n.name for n in nodes if n.in_spec and not n.connected and not n.revoked]
            print(f"every connected node applied revision {revision}"
                  + (f"; not connected (will apply when they connect): {', '.join(offline)}" if offline else ""),
                  file=sys.stderr)
            return EXIT_OK
        if time.monotonic() >= deadline:
            print(f"timeout: not yet applied on {', '.join(n.name for n in pending)}", file=sys.stderr)
            return EXIT_DIFFERENT
        time.sleep(0.2)


def cmd_diff(args: argparse.Namespace, stub: admin_pb2_grpc.AdminStub) -> int:
    resp = stub.DiffSpec(apb.DiffSpecRequest(spec_yaml=_read_spec(args.file)), timeout=args.timeout)
    if resp.diff:
        print(resp.diff.rstrip())
        return EXIT_DIFFERENT
    print(f"no difference from revision {resp.current_revision}", file=sys.stderr)
    return EXIT_OK


def cmd_get(args: argparse.Namespace, stub: admin_pb2_grpc.AdminStub) -> int:
    resp = stub.GetSpec(apb.GetSpecRequest(revision=args.revision or 0), timeout=args.timeout)
    if args.output == "json":
        _emit(args, {"revision": resp.revision, "author": resp.author, "created_at": resp.created_at,
                     "message": resp.message, "spec_yaml": resp.spec_yaml}, "")
    else:
        print(f"# revision {resp.revision} by {resp.author} at {resp.created_at}: {resp.message}")
        print(resp.spec_yaml.rstrip())
    return EXIT_OK


def cmd_history(args: argparse.Namespace, stub: admin_pb2_grpc.AdminStub) -> int:
    revs = stub.History(apb.HistoryRequest(limit=args.limit), timeout=args.timeout).revisions
    rows = [[str(r.revision), r.created_at, r.author,
             (f"(rollback to {r.rolled_back_from}) " if r.rolled_back_from else "") + r.message] for r in revs]
    _emit(args, [{"revision": r.revision, "created_at": r.created_at, "author": r.author, "message": r.message,
                  "rolled_back_from": r.rolled_back_from} for r in revs],
          _table(["REVISION", "CREATED", "AUTHOR", "MESSAGE"], rows))
    return EXIT_OK


def cmd_rollback(args: argparse.Namespace, stub: admin_pb2_grpc.AdminStub) -> int:
    resp = stub.Rollback(apb.RollbackRequest(revision=args.revision, message=args.message or ""),
                         timeout=args.timeout)
    _emit(args, {"revision": resp.revision, "changed": resp.changed, "diff": resp.diff},
          (resp.diff.rstrip() + "\n" if resp.diff else "")
          + (f"rolled back: revision {resp.revision} restores {args.revision}" if resp.changed
             else f"unchanged: revision {resp.revision} already equals {args.revision}"))
    if args.wait:
        return _wait_applied(args, stub, resp.revision)
    return EXIT_OK


def _node_state(n: apb.NodeStatus) -> str:
    if n.revoked:
        return "revoked"
    if not n.joined:
        return "not-joined"
    if n.connected:
        return "connected"
    return "disconnected"


def cmd_nodes(args: argparse.Namespace, stub: admin_pb2_grpc.AdminStub) -> int:
    resp = stub.ListNodes(apb.ListNodesRequest(), timeout=args.timeout)
    rows = []
    for n in resp.nodes:
        rev = str(n.applied_spec_revision) if n.applied_spec_revision else "-"
        if n.applied_spec_revision and n.applied_spec_revision < resp.current_revision and n.in_spec:
            rev += " (behind)"
        handshakes = f"{n.peers_with_recent_handshake}/{n.peers}" if n.connected else "-"
        if n.encryption == "ipsec":  # no WireGuard handshakes: the peers whose IPsec is established
            established = sum(1 for p in n.peer_encryption if p.state == "established")
            handshakes = f"ipsec {established}/{n.peers}" if n.connected else "ipsec"
        rows.append([n.name, _node_state(n), "yes" if n.in_spec else "no", rev, str(n.peers), handshakes,
                     n.last_seen or "-", n.certificate_expires or "-", n.last_error or ""])
        for p in n.peer_encryption:
            rows.append([f"  -> {p.peer}", p.state, "", f"epoch {p.epoch}/{p.peer_epoch}",
                         f"age {p.epoch_age_seconds}s", f"out {p.packets_out} in {p.packets_in}",
                         f"replay {p.replay_failures}", f"integrity {p.integrity_failures}", ""])
    data = {"current_revision": resp.current_revision, "nodes": [
        {"name": n.name, "state": _node_state(n), "in_spec": n.in_spec, "applied_spec_revision":
         n.applied_spec_revision, "peers": n.peers, "peers_with_recent_handshake": n.peers_with_recent_handshake,
         "drift_repairs": n.drift_repairs, "last_seen": n.last_seen, "certificate_expires":
         n.certificate_expires, "last_error": n.last_error, "wireguard_public_key": n.wireguard_public_key,
         "capabilities": list(n.capabilities), "encryption": n.encryption,
         "peer_encryption": [json_format.MessageToDict(p, preserving_proto_field_name=True)
                             for p in n.peer_encryption]} for n in resp.nodes]}
    _emit(args, data, f"current revision: {resp.current_revision}\n" + _table(
        ["NAME", "STATE", "IN-SPEC", "APPLIED", "PEERS", "HANDSHAKES", "LAST-SEEN", "CERT-EXPIRES", "ERROR"], rows))
    return EXIT_OK


def cmd_token_create(args: argparse.Namespace, stub: admin_pb2_grpc.AdminStub) -> int:
    resp = stub.CreateJoinToken(apb.CreateJoinTokenRequest(node_name=args.node, ttl_seconds=args.ttl),
                                timeout=args.timeout)
    _emit(args, {"token": resp.token, "expires_at": resp.expires_at, "ca_hash": resp.ca_hash},
          f"token: {resp.token}\nexpires: {resp.expires_at}\nca hash: {resp.ca_hash}\n"
          f"on {args.node}: veilnet-agent join --controller <HOST:BOOTSTRAP-PORT> --ca-hash {resp.ca_hash} "
          "--token-file -   (paste the token when asked; or --token-file FILE, mode 0600)")
    return EXIT_OK


def cmd_revoke(args: argparse.Namespace, stub: admin_pb2_grpc.AdminStub) -> int:
    if (args.node is None) == (args.operator is None):
        raise UsageError("revoke: name a node (revoke NODE) or an operator (revoke --operator NAME), not both")
    if args.operator is not None:
        op = stub.RevokeOperator(apb.RevokeOperatorRequest(name=args.operator, reason=args.reason or ""),
                                 timeout=args.timeout)
        _emit(args, {"operator": args.operator, "certificates_revoked": op.certificates_revoked},
              f"revoked operator {args.operator}: {op.certificates_revoked} certificate(s)")
        return EXIT_OK
    resp = stub.RevokeNode(apb.RevokeNodeRequest(node_name=args.node, reason=args.reason or ""),
                           timeout=args.timeout)
    _emit(args, {"certificates_revoked": resp.certificates_revoked, "was_connected": resp.was_connected},
          f"revoked {args.node}: {resp.certificates_revoked} certificate(s)"
          + (", disconnected" if resp.was_connected else ""))
    return EXIT_OK


def cmd_audit(args: argparse.Namespace, stub: admin_pb2_grpc.AdminStub) -> int:
    resp = stub.ReadAudit(apb.ReadAuditRequest(limit=args.limit, verify=args.verify), timeout=args.timeout)
    rows = [[str(e.sequence), e.time, f"{e.actor} ({e.role})", e.action, e.target,
             str(e.revision) if e.revision else "-", e.detail if len(e.detail) < 80 else e.detail[:77] + "..."]
            for e in resp.entries]
    data: dict[str, Any] = {"total": resp.total, "entries": [
        {"sequence": e.sequence, "time": e.time, "actor": e.actor, "role": e.role, "action": e.action,
         "target": e.target, "revision": e.revision, "detail": json.loads(e.detail or "{}"), "hash": e.hash,
         "previous_hash": e.previous_hash, "actor_serial": e.actor_serial, "signature": e.signature}
        for e in resp.entries]}
    text = _table(["SEQ", "TIME", "WHO", "ACTION", "TARGET", "REV", "DETAIL"], rows)
    if args.verify:
        data["verified"] = resp.verified
        data["verify_error"] = resp.verify_error
        data["verify_summary"] = resp.verify_summary
        text += "\n" + (f"audit log verified (hash chain and signatures): {resp.verify_summary}" if resp.verified
                        else f"AUDIT LOG BROKEN: {resp.verify_error}")
    _emit(args, data, text)
    return EXIT_DIFFERENT if args.verify and not resp.verified else EXIT_OK


def cmd_command(args: argparse.Namespace, stub: admin_pb2_grpc.AdminStub) -> int:
    resp = stub.SendCommand(apb.SendCommandRequest(node_name=args.node, command=args.what),
                            timeout=args.timeout)
    _emit(args, {"delivered": resp.delivered},
          f"{args.what} sent to {args.node}" if resp.delivered else f"{args.node} is not connected: not sent")
    return EXIT_OK if resp.delivered else EXIT_NOT_FOUND


Command = Callable[[argparse.Namespace, admin_pb2_grpc.AdminStub], int]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="veilctl", description="Operate a Veilnet controller",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--controller", help="HOST:PORT of the controller (env VEILCTL_CONTROLLER)")
    p.add_argument("--credentials", help="directory with client.key, client.crt, ca.crt (env VEILCTL_CREDENTIALS)")
    p.add_argument("--server-name", help="expected name in the controller's certificate, if not HOST")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per call")
    p.add_argument("-o", "--output", choices=("text", "json"), default="text")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, func: Command, help_text: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_text)
        sp.set_defaults(func=func)
        return sp

    sp = add("apply", cmd_apply, "validate and apply a network spec as a new revision")
    sp.add_argument("-f", "--file", required=True, help="spec YAML ('-' for stdin)")
    sp.add_argument("-m", "--message", help="why (kept in history and the audit log)")
    sp.add_argument("--expected-revision", type=int, help="refuse unless this is the current revision")
    sp.add_argument("--wait", type=float, default=0, metavar="SECONDS",
                    help="wait until every connected node acknowledged the revision")
    sp = add("diff", cmd_diff, "show what applying a spec would change (exit 1 if anything)")
    sp.add_argument("-f", "--file", required=True)
    sp = add("get", cmd_get, "print the current (or a given) revision's spec")
    sp.add_argument("--revision", type=int)
    sp = add("history", cmd_history, "list revisions, newest first")
    sp.add_argument("--limit", type=int, default=50)
    sp = add("rollback", cmd_rollback, "make an earlier revision's spec current again (as a new revision)")
    sp.add_argument("revision", type=int)
    sp.add_argument("-m", "--message")
    sp.add_argument("--wait", type=float, default=0, metavar="SECONDS")
    add("nodes", cmd_nodes, "list nodes with their status")
    sp = add("token", cmd_token_create, "create a single-use join token for a node")
    sp.add_argument("action", choices=("create",))
    sp.add_argument("node")
    sp.add_argument("--ttl", type=int, default=3600, help="seconds (default 3600)")
    sp = add("revoke", cmd_revoke, "revoke a node (disconnect it, remove it from every peer) or an operator")
    sp.add_argument("node", nargs="?", help="the node to revoke")
    sp.add_argument("--operator", metavar="NAME", help="revoke every certificate of this operator instead")
    sp.add_argument("--reason")
    sp = add("command", cmd_command, "ask a connected node to resync, rotate-keys or renew-certificate")
    sp.add_argument("node")
    sp.add_argument("what", metavar="COMMAND", choices=("resync", "rotate-keys", "renew-certificate"))
    sp = add("audit", cmd_audit, "read the audit log")
    sp.add_argument("--limit", type=int, default=100)
    sp.add_argument("--verify", action="store_true", help="verify the hash chain (exit 1 if broken)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        stub = _stub(args)
        return int(args.func(args, stub))
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except grpc.RpcError as exc:
        code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
        detail = exc.details() if hasattr(exc, "details") else str(exc)
        print(f"error: {code.name.lower()}: {detail}", file=sys.stderr)
        return _STATUS_EXIT.get(code, EXIT_SERVER)
    except KeyboardInterrupt:
        return EXIT_SERVER


if __name__ == "__main__":
    sys.exit(main())
