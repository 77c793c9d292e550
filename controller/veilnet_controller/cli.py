"""``veilnet-controller``: create the CA and data directory, serve, issue operator certificates, verify the audit log.

Data directory layout (mode 0700)::

    ca/ca.key ca/ca.crt ca/trust_domain   the host CA (the key never leaves this directory)
    server.key server.crt                 the controller's TLS certificate
    controller.db                         SQLite: revisions, nodes, certificates, token hashes, audit log (0600)
    audit.key audit.pub                   the Ed25519 key signing the audit log (0600; never in the database)
                                          and its public key (0644: give auditors a copy)
    audit-head.json                       the newest signed audit head (ship copies elsewhere)
    operators/<name>/{client.key,client.crt,ca.crt}   operator credentials issued here
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import re
import signal
import socket
import sys
from datetime import timedelta
from pathlib import Path

import structlog

from veilnet_agent import logs
from veilnet_agent.control import pki
from veilnet_agent.core.errors import ValidationError, VeilnetError
from veilnet_agent.sdnotify import Readiness

from . import __version__
from .audit import HEAD_FILE, PUBLIC_KEY_FILE, AuditSigner, load_public_key, open_signed_store, read_head
from .ca import MAX_NODE_LIFETIME, MAX_OPERATOR_LIFETIME, MAX_SERVER_LIFETIME, CertificateAuthority
from .store import SQLiteStore, Store

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_INVALID = 2
LOCAL_ROLE = "local"  # audit role of commands run with the data directory rather than through the API

_DURATION = re.compile(r"(\d{1,12})([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MIN_NODE_LIFETIME = timedelta(seconds=10)  # renewal at two thirds must leave time to reconnect
MAX_RENEWAL_GRACE = timedelta(hours=1)


def _describe(value: timedelta) -> str:
    seconds = int(value.total_seconds())
    for unit in ("d", "h", "m"):
        if seconds % _UNITS[unit] == 0:
            return f"{seconds // _UNITS[unit]}{unit}"
    return f"{seconds}s"


def parse_duration(text: str, what: str, *, minimum: timedelta = timedelta(seconds=1),
                   maximum: timedelta | None = None) -> timedelta:
    """``90s``, ``30m``, ``24h``, ``7d``; ValidationError naming ``what`` if malformed or out of bounds."""
    m = _DURATION.fullmatch(text.strip())
    if not m:
        raise ValidationError(what, text, "must be a duration like 90s, 30m, 24h or 7d")
    seconds = int(m.group(1)) * _UNITS[m.group(2)]
    if maximum is not None and seconds > maximum.total_seconds():
        raise ValidationError(what, text, f"must be at most {_describe(maximum)}")
    if seconds < minimum.total_seconds():
        raise ValidationError(what, text, f"must be at least {_describe(minimum)}")
    return timedelta(seconds=seconds)


def local_actor() -> tuple[str, dict[str, str]]:
    """Who runs a command with the data directory (not through the API): the OS user, and sudo's caller."""
    detail = {"host": socket.gethostname()}
    if os.environ.get("SUDO_USER"):
        detail["sudo_user"] = os.environ["SUDO_USER"]
    return getpass.getuser(), detail


def write_operator_credentials(ca: CertificateAuthority, store: Store, out: Path, name: str, role: str,
                               lifetime: timedelta) -> Path:
    """Issue an operator credential into ``out``; recorded (and audited) first: the controller accepts only
    operator certificates it recorded, and revokes them by name."""
    key_pem, cert_pem = ca.issue_operator(name, role, lifetime)
    issued = pki.identity_from_certificate(cert_pem, ca.trust_domain)
    actor, detail = local_actor()
    store.record_operator_certificate(name, role, issued.serial, issued.not_after, f"{actor} (operator-cert)")
    store.append_audit(actor, LOCAL_ROLE, "operator.issue", name, None,
                       {**detail, "role": role, "serial": issued.serial,
                        "not_after": issued.not_after.isoformat(), "out": str(out)})
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    pki.write_private_key(out / "client.key", pki.load_private_key_pem(key_pem))
    pki.write_public_file(out / "client.crt", cert_pem)
    pki.write_public_file(out / "ca.crt", ca.certificate_pem)
    return out


def import_operator_credentials(ca: CertificateAuthority, store: Store, directory: Path) -> list[str]:
    """Record operator certificates under ``directory`` (``init``'s admin, ``operator-cert --out`` there) that
    were issued before the store kept operator serials, so they keep working; returns the names imported."""
    imported = []
    for path in sorted(directory.glob("*/client.crt")):
        try:
            cert = pki.load_certificate(path.read_bytes())
            pki.verify_issued_by(cert, ca.certificate)
            who = pki.identity_from_certificate(cert, ca.trust_domain)
        except (OSError, pki.PkiError):
            continue  # not one of ours: nothing to record
        if who.kind != "operator" or store.operator_certificate(who.serial) is not None:
            continue
        actor, detail = local_actor()
        store.record_operator_certificate(who.name, who.role, who.serial, who.not_after, f"imported from {path}")
        store.append_audit(actor, LOCAL_ROLE, "operator.import", who.name, None,
                           {**detail, "role": who.role, "serial": who.serial,
                            "not_after": who.not_after.isoformat(), "path": str(path)})
        imported.append(who.name)
    return imported


def cmd_init(args: argparse.Namespace) -> int:
    data: Path = args.data_dir
    admin_lifetime = parse_duration(args.admin_lifetime, "--admin-lifetime", maximum=MAX_OPERATOR_LIFETIME)
    if (data / "ca" / "ca.key").exists():
        raise VeilnetError(f"{data} already holds a CA; refusing to overwrite it")
    data.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(data, 0o700)
    ca = CertificateAuthority.create(data / "ca", args.trust_domain)
    names = args.server_name or ["localhost", "127.0.0.1"]
    key_pem, cert_pem = ca.issue_server(names, timedelta(days=365))
    pki.write_private_key(data / "server.key", pki.load_private_key_pem(key_pem))
    pki.write_public_file(data / "server.crt", cert_pem)
    store, signer = open_signed_store(data)  # makes audit.key / audit.pub
    try:
        admin_dir = write_operator_credentials(ca, store, data / "operators" / "admin", "admin", "admin",
                                               admin_lifetime)
    finally:
        store.close()
    print(f"trust domain: {args.trust_domain}")
    print(f"server names: {', '.join(names)}")
    print(f"admin credentials: {admin_dir}")
    print(f"audit key: {signer.key_id} (copy {data / PUBLIC_KEY_FILE} somewhere safe: auditors verify with it)")
    print(f"ca hash: {ca.ca_hash}")
    return EXIT_OK


def _default_advertise(listen: str) -> str:
    """What joining agents are told to dial: the listen address, or only its port for a wildcard listen.

    A bare ":PORT" makes the agent use the host it reached the bootstrap listener at.
    """
    host, _, port = listen.rpartition(":")
    return f":{port}" if host.strip("[]") in ("0.0.0.0", "::", "") else listen


def cmd_serve(args: argparse.Namespace) -> int:
    from .hub import Hub
    from .server import ServerSettings, Services, serve

    data: Path = args.data_dir
    settings = ServerSettings(  # every flag checked before anything is opened
        control_listen=args.listen,
        bootstrap_listen=args.bootstrap_listen,
        control_endpoint=args.advertise or _default_advertise(args.listen),
        certificate_lifetime=parse_duration(args.certificate_lifetime, "--certificate-lifetime",
                                            minimum=MIN_NODE_LIFETIME, maximum=MAX_NODE_LIFETIME),
        join_failures_per_minute=args.join_failures_per_minute,
        renewal_grace=parse_duration(args.renewal_grace, "--renewal-grace", maximum=MAX_RENEWAL_GRACE),
    )
    ca = CertificateAuthority.load(data / "ca")
    store, signer = open_signed_store(data)
    imported = import_operator_credentials(ca, store, data / "operators")
    if imported:
        structlog.get_logger("veilnet.controller").warning(
            "operator_certificates_imported", operators=imported,
            note="issued before operator serials were recorded; other such credentials must be issued again")
    hub = Hub(store)
    hub.load()
    services = Services(ca, store, hub, settings, audit=signer)
    key = (data / "server.key").read_bytes()
    cert = (data / "server.crt").read_bytes()

    async def main() -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        readiness = Readiness()

        def ready(control_port: int, bootstrap_port: int) -> None:
            readiness.report(True, f"serving: control {control_port}, join {bootstrap_port}, "
                                   f"spec revision {hub.spec_revision}")

        async def watchdog() -> None:  # fed by the event loop that serves every stream: a stuck loop stops it
            while True:
                readiness.alive()
                await asyncio.sleep(1.0)

        keepalive = asyncio.ensure_future(watchdog())
        try:
            await serve(data, services, key, cert, ready=ready)
        finally:
            keepalive.cancel()
            readiness.stopping("stopping")

    try:
        asyncio.run(main())
    except asyncio.CancelledError:
        pass
    finally:
        store.close()
    return EXIT_OK


def cmd_server_cert(args: argparse.Namespace) -> int:
    """Reissue the controller's TLS certificate from the existing CA (it lives a year; agents keep trusting the CA)."""
    data: Path = args.data_dir
    ca = CertificateAuthority.load(data / "ca")
    names = args.server_name or ["localhost", "127.0.0.1"]
    key_pem, cert_pem = ca.issue_server(names, parse_duration(args.lifetime, "--lifetime", maximum=MAX_SERVER_LIFETIME))
    pki.write_private_key(data / "server.key", pki.load_private_key_pem(key_pem))
    pki.write_public_file(data / "server.crt", cert_pem)
    print(f"server certificate for {', '.join(names)} written; restart veilnet-controller to use it")
    return EXIT_OK


def cmd_operator_cert(args: argparse.Namespace) -> int:
    if args.role not in pki.ROLES_OPERATOR:
        raise ValidationError("--role", args.role, f"must be one of {', '.join(pki.ROLES_OPERATOR)}")
    lifetime = parse_duration(args.lifetime, "--lifetime", maximum=MAX_OPERATOR_LIFETIME)
    ca = CertificateAuthority.load(args.data_dir / "ca")
    store, _signer = open_existing_store(args.data_dir)
    try:
        out = write_operator_credentials(ca, store, args.out, args.name, args.role, lifetime)
    finally:
        store.close()
    print(f"{args.role} credentials for {args.name}: {out}")
    return EXIT_OK


def open_existing_store(data: Path) -> tuple[SQLiteStore, AuditSigner]:
    """The controller's database, which ``init`` made (never a new, empty one by accident), signing."""
    path = data / "controller.db"
    if not path.is_file():
        raise VeilnetError(f"{path} does not exist: is {data} a controller data directory (veilnet-controller init)?")
    return open_signed_store(data)


def cmd_audit_verify(args: argparse.Namespace) -> int:
    """Read-only. The public key and head default to the data directory's; copies kept elsewhere prove more."""
    from .audit_verify import verify_file

    public_key = load_public_key(args.public_key or args.data_dir / PUBLIC_KEY_FILE)
    head_path: Path = args.head or args.data_dir / HEAD_FILE
    if args.head is not None and not head_path.is_file():
        raise VeilnetError(f"--head {head_path}: no such file")
    head = read_head(head_path)
    ok, message = verify_file(args.data_dir / "controller.db", public_key, head, f"the signed head in {head_path}")
    if ok and head is None:
        message += f"; no signed head ({head_path}): entries removed from the end would go unnoticed"
    print(("ok: " if ok else "TAMPERED: ") + message)
    return EXIT_OK if ok else EXIT_FAILURE


def cmd_ca_hash(args: argparse.Namespace) -> int:
    print(CertificateAuthority.load(args.data_dir / "ca").ca_hash)
    return EXIT_OK


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="veilnet-controller", description="Veilnet reference controller")
    parser.add_argument("--version", action="version", version=f"veilnet-controller {__version__}")
    parser.add_argument("--log-format", choices=("json", "console"), default="json")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--data-dir", type=Path, default=Path("/var/lib/veilnet-controller"))
        return p

    p = add("init", "create the CA, the server certificate, the database and an admin credential")
    p.add_argument("--trust-domain", required=True, help="SPIFFE trust domain, e.g. veilnet.example.org")
    p.add_argument("--server-name", action="append", help="DNS name or IP agents and veilctl dial (repeatable)")
    p.add_argument("--admin-lifetime", default="30d")
    p.set_defaults(func=cmd_init)
    p = add("serve", "serve agents and operators")
    p.add_argument("--listen", default="0.0.0.0:7443", help="mutual-TLS listener (agents' Sync, operators)")
    p.add_argument("--bootstrap-listen", default="0.0.0.0:7444", help="join listener (token + CSR)")
    p.add_argument("--advertise", help="HOST:PORT agents dial after joining (default: --listen; for a wildcard "
                                       "listen, the host the agent joined through with --listen's port)")
    p.add_argument("--certificate-lifetime", default="24h", help="node certificate lifetime")
    p.add_argument("--renewal-grace", default="60s",
                   help="how long a renewed node's previous certificate keeps working (at most 1h)")
    p.add_argument("--join-failures-per-minute", type=int, default=20,
                   help="failed joins allowed per source address and minute before Join is refused for a while "
                        "(0: no limit)")
    p.set_defaults(func=cmd_serve)
    p = add("operator-cert", "issue an operator credential with a role")
    p.add_argument("--name", required=True)
    p.add_argument("--role", required=True, help="admin, network-admin or viewer")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--lifetime", default="30d")
    p.set_defaults(func=cmd_operator_cert)
    p = add("server-cert", "reissue the controller's TLS certificate from the existing CA")
    p.add_argument("--server-name", action="append", help="DNS name or IP agents and veilctl dial (repeatable)")
    p.add_argument("--lifetime", default="365d")
    p.set_defaults(func=cmd_server_cert)
    p = add("audit-verify", "check the audit log's hash chain and signatures (read-only)")
    p.add_argument("--public-key", type=Path, help=f"the audit public key (default DATA_DIR/{PUBLIC_KEY_FILE}); "
                                                   "better a copy kept away from the controller")
    p.add_argument("--head", type=Path, help=f"a signed head to check truncation against (default "
                                             f"DATA_DIR/{HEAD_FILE}), e.g. one shipped elsewhere")
    p.set_defaults(func=cmd_audit_verify)
    p = add("ca-hash", "print the CA hash agents pin with --ca-hash")
    p.set_defaults(func=cmd_ca_hash)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logs.configure(args.log_format, args.log_level)
    try:
        return int(args.func(args))
    except ValidationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except (VeilnetError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
