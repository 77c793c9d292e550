"""The controller's gRPC services on two listeners.

* the **control listener** (mutual TLS): ``Controller.Renew``/``Sync`` for
  agents and the ``Admin`` service for operators. Every call is
  authenticated by its client certificate (issued by our CA, not revoked) and
  authorized against ``authz.MATRIX`` before anything else happens.
* the **bootstrap listener** (server-authenticated TLS only): ``Join``, where
  a host with no certificate yet trades a single-use token and a CSR for one.
  Agents pin the CA by hash, so they never trust on first use.

gRPC Python cannot make a client certificate optional on one port, and a
separate port keeps the unauthenticated surface to one small RPC.
"""

from __future__ import annotations

import asyncio
import functools
import json
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import grpc
import structlog
from grpc import aio

from veilnet.v1 import admin_pb2 as apb
from veilnet.v1 import admin_pb2_grpc, controller_pb2_grpc
from veilnet.v1 import controller_pb2 as cpb
from veilnet_agent.control import pki, wire
from veilnet_agent.core.errors import ValidationError, VeilnetError
from veilnet_agent.core.validate import name as validate_name
from veilnet_agent.core.validate import wg_public_key

from . import authz
from .audit import AuditSigner
from .ca import CertificateAuthority, certificate_pem
from .hub import Hub, InvalidKey, KeyConflict, Session
from .spec import canonical_text, load_spec_text, parse_spec, summarize_changes, unified_diff
from .store import ConflictError, Store, StoreError, TokenResult
from .throttle import FailureThrottle, peer_address
from .trust import Refusal

MAX_CONTROL_MESSAGE = 16 * 1024 * 1024
MAX_DETAILS = 2000  # characters of a status message: requests may quote megabytes back (names, node names)
MAX_BOOTSTRAP_MESSAGE = 64 * 1024
HELLO_TIMEOUT = 10.0
MAX_AUDITED_REFUSALS = 10_000  # (serial, reason) pairs remembered so each is audited once, not per redial
EXPIRY_SLACK = 0.01  # seconds past not_after before a stream's timer checks (not_after itself is still valid)
DEFAULT_TOKEN_TTL = 3600
MAX_TOKEN_TTL = 7 * 86400
DEFAULT_RENEWAL_GRACE = timedelta(seconds=60)  # streams opened with the old certificate move over meanwhile

T = TypeVar("T")
_LOG = structlog.get_logger("veilnet.controller")
_SERVICES = {
    "veilnet.v1.Controller": cpb.DESCRIPTOR.services_by_name["Controller"],
    "veilnet.v1.Admin": apb.DESCRIPTOR.services_by_name["Admin"],
}
COMMANDS = {
    "resync": cpb.Command.RESYNC,
    "rotate-keys": cpb.Command.ROTATE_KEYS,
    "renew-certificate": cpb.Command.RENEW_CERTIFICATE,
}


@dataclass(frozen=True)
class ServerSettings:
    control_listen: str
    bootstrap_listen: str
    control_endpoint: str  # what agents are told to dial after joining
    certificate_lifetime: timedelta
    join_failures_per_minute: int = 20  # per source address; beyond, Join is refused for a while
    renewal_grace: timedelta = DEFAULT_RENEWAL_GRACE  # how long a renewed node's previous certificate still works


def rfc3339(value: datetime | None) -> str:
    return "" if value is None else value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def status_details(message: str) -> str:
    """``message`` made fit for a gRPC status: at most MAX_DETAILS characters, and encodable as UTF-8 (a lone
    surrogate from a JSON escape would make the status itself fail)."""
    if len(message) > MAX_DETAILS:
        message = message[: MAX_DETAILS - 3] + "..."
    return message.encode("utf-8", "backslashreplace").decode("utf-8")


async def fail(context: aio.ServicerContext[Any, Any], code: grpc.StatusCode, message: str) -> NoReturn:
    """End the call with ``code``; never returns (``abort`` raises)."""
    await context.abort(code, status_details(message))
    raise AssertionError("unreachable: abort raises")


async def internal_error(context: aio.ServicerContext[Any, Any], method: str, exc: BaseException) -> NoReturn:
    """Answer an unexpected error: logged whole under a new correlation id, the caller gets INTERNAL and the id
    (never the exception or a traceback)."""
    error_id = secrets.token_hex(8)
    _LOG.error("rpc_failed", method=method, error_id=error_id, peer=context.peer(), exc_info=exc)
    await fail(context, grpc.StatusCode.INTERNAL,
               f"internal error {error_id}: the controller logged the details under this id")


_HandlerT = TypeVar("_HandlerT", bound=Callable[..., Any])


def _guard_unary(method: str, handler: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(handler)
    async def guarded(self: Any, request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        try:
            return await handler(self, request, context)
        except aio.AbortError:
            raise
        except Exception as exc:
            await internal_error(context, method, exc)

    guarded.__veilnet_guarded__ = True  # type: ignore[attr-defined]
    return guarded


def _guard_stream(method: str, handler: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(handler)
    async def guarded(self: Any, requests: Any, context: aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        stream = handler(self, requests, context)
        try:
            async for message in stream:
                yield message
        except aio.AbortError:
            raise
        except Exception as exc:
            await internal_error(context, method, exc)
        finally:
            await stream.aclose()  # its own clean-up (the hub's session) runs now, not when collected

    guarded.__veilnet_guarded__ = True  # type: ignore[attr-defined]
    return guarded


def guarded_servicer(service: str) -> Callable[[type[_HandlerT]], type[_HandlerT]]:
    """Wrap every RPC method of ``service`` (``package.Service``) the class defines: an exception a handler
    did not mean to raise is logged with a correlation id and answered INTERNAL with that id, and the
    server goes on serving."""
    descriptor = _SERVICES[service]

    def wrap(cls: type[_HandlerT]) -> type[_HandlerT]:
        for rpc in descriptor.methods:
            handler = cls.__dict__.get(rpc.name)
            if handler is None:
                continue
            full = f"/{service}/{rpc.name}"
            streaming = rpc.client_streaming or rpc.server_streaming
            setattr(cls, rpc.name, (_guard_stream if streaming else _guard_unary)(full, handler))
        return cls

    return wrap


def _validation_details(exc: ValidationError) -> str:
    return f"{exc.field}: {exc.reason} (got {exc.value!r})"


class Services:
    """State shared by both listeners: the CA, the store, the hub."""

    def __init__(self, ca: CertificateAuthority, store: Store, hub: Hub, settings: ServerSettings,
                 audit: AuditSigner | None = None) -> None:
        self.ca = ca
        self.store = store
        self.audit = audit  # the key signing the audit log (None: verification reports it cannot check)
        self.hub = hub
        self.settings = settings
        self.log = structlog.get_logger("veilnet.controller")
        self.join_throttle = FailureThrottle(settings.join_failures_per_minute)
        self._refusals_audited: set[tuple[str, str]] = set()

    async def authenticate(self, context: aio.ServicerContext[Any, Any], method: str) -> pki.Identity:
        """The caller's identity if its certificate is ours, unrevoked, and its role may call ``method``."""
        pems = context.auth_context().get("x509_pem_cert") or []
        if not pems:
            await fail(context, grpc.StatusCode.UNAUTHENTICATED, "a client certificate is required")
        try:
            identity = pki.identity_from_certificate(pems[0], self.ca.trust_domain)
        except pki.PkiError as exc:
            await fail(context, grpc.StatusCode.UNAUTHENTICATED, f"client certificate not accepted: {exc}")
        refusal = self.refusal(identity)
        if refusal is not None:
            self.refused(identity, method, refusal)
            await fail(context, grpc.StatusCode.UNAUTHENTICATED, refusal.message)
        if not authz.allowed(method, identity.role):
            self.log.warning("permission_denied", method=method, caller=identity.spiffe_id, role=identity.role)
            if authz.MATRIX.get(method) != authz.READ:  # denied reads are not worth an audit entry
                self.store.append_audit(identity.name, identity.role, "denied", method, None, {},
                                        actor_serial=identity.serial)
            await fail(context, grpc.StatusCode.PERMISSION_DENIED,
                                f"role {identity.role!r} may not call {method.rsplit('/', 1)[-1]}")
        return identity

    def refusal(self, identity: pki.Identity) -> Refusal | None:
        """Why ``identity`` may not act now (expired, not yet valid, revoked, retired), or None.

        Asked on every RPC and every stream message, not only at the TLS handshake: a connection opened
        while the certificate was good may outlive it.
        """
        return self.hub.trust.refusal(identity, datetime.now(UTC), self.store.operator_certificate)

    def refused(self, identity: pki.Identity, method: str, refusal: Refusal) -> None:
        """Log every refusal; audit the first of each kind per certificate (a revoked agent redialling every
        30 s would otherwise fill the log with the same entry)."""
        self.log.warning("certificate_refused", method=method, caller=identity.spiffe_id, serial=identity.serial,
                         kind=refusal.kind, reason=refusal.message)
        if (identity.serial, refusal.kind) in self._refusals_audited:
            return
        if len(self._refusals_audited) >= MAX_AUDITED_REFUSALS:
            self._refusals_audited.clear()
        self._refusals_audited.add((identity.serial, refusal.kind))
        self.store.append_audit(identity.name, identity.role, "refused", method, None,
                                {"kind": refusal.kind, "reason": refusal.message}, actor_serial=identity.serial)

    def watch_certificate(self, session: Session, identity: pki.Identity) -> None:
        """End ``session`` when its certificate stops being acceptable: a timer at not_after (or at the time a
        renewal retires it), re-armed when that changes, checked again when it fires (the clock may have moved)."""
        loop = asyncio.get_running_loop()

        def check() -> None:
            session.expiry = None
            if session.closed_reason is not None:
                return
            refusal = self.refusal(identity)
            if refusal is None:
                arm()
                return
            self.refused(identity, "/veilnet.v1.Controller/Sync", refusal)
            session.close(refusal.message, unauthenticated=True)

        def arm() -> None:
            session.cancel_expiry()
            delay = (self.hub.trust.deadline(identity) - datetime.now(UTC)).total_seconds()
            session.expiry = loop.call_later(max(delay, 0.0) + EXPIRY_SLACK, check)

        session.rearm = arm
        arm()


# ---------------------------------------------------------------------------- agents


@guarded_servicer("veilnet.v1.Controller")
class ControllerService(controller_pb2_grpc.ControllerServicer):  # type: ignore[misc]
    def __init__(self, services: Services, *, bootstrap: bool) -> None:
        self.s = services
        self.bootstrap = bootstrap

    async def Join(self, request: cpb.JoinRequest, context: aio.ServicerContext[Any, Any]) -> cpb.JoinResponse:
        s = self.s
        if not self.bootstrap:
            await s.authenticate(context, "/veilnet.v1.Controller/Join")  # not in MATRIX: denied (and audited)
            await fail(context, grpc.StatusCode.FAILED_PRECONDITION, "Join is served on the bootstrap listener")
        source = peer_address(context.peer())
        wait = s.join_throttle.retry_after(source)
        if wait:
            await fail(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                       f"too many failed joins from {source}; retry in {wait:.0f} s")
        try:
            node = validate_name(request.node_name, "node_name")
        except ValidationError as exc:
            s.join_throttle.failed(source)
            s.store.append_audit("anonymous", "none", "node.join-refused", request.node_name[:64], None,
                                 {"reason": _validation_details(exc)[:300], "peer": context.peer()})
            await fail(context, grpc.StatusCode.INVALID_ARGUMENT, _validation_details(exc))
        # Sign before spending the token (signing has no side effect): a malformed CSR must not burn it.
        # The certificate is handed out only if the token is good.
        try:
            cert = s.ca.sign_node_csr(request.csr_pem, node, s.settings.certificate_lifetime)
        except pki.PkiError as exc:
            s.join_throttle.failed(source)
            s.store.append_audit("anonymous", "none", "node.join-refused", node, None,
                                 {"reason": f"csr_pem: {exc}"[:300], "peer": context.peer()})
            await fail(context, grpc.StatusCode.INVALID_ARGUMENT, f"csr_pem: {exc}")
        result = s.store.consume_token(request.token, node)
        if result is not TokenResult.OK:
            reason = {
                TokenResult.UNKNOWN: "unknown join token",
                TokenResult.USED: "join token already used",
                TokenResult.EXPIRED: "join token expired",
                TokenResult.WRONG_NODE: f"join token was not issued for node {node!r}",
            }[result]
            s.join_throttle.failed(source)
            s.log.warning("join_refused", node=node, reason=reason, peer=context.peer())
            s.store.append_audit("anonymous", "none", "node.join-refused", node, None,
                                 {"reason": reason, "peer": context.peer()})
            await fail(context, grpc.StatusCode.PERMISSION_DENIED, reason)
        identity = pki.identity_from_certificate(cert, s.ca.trust_domain)
        # A node joins once: certificates from an earlier join (a host that was replaced, or cloned) stop working.
        previous = s.store.revoke_node(node, "joined again") if s.store.node(node) is not None else []
        s.store.record_certificate(node, identity.serial, identity.not_after)
        if previous:
            s.hub.node_rejoined(node, previous)
        s.hub.readmit(node, identity.serial)
        s.store.append_audit(node, "node", "node.join", node, None,
                             {"serial": identity.serial, "not_after": rfc3339(identity.not_after),
                              "revoked_previous": previous, "peer": context.peer()})
        s.log.info("node_joined", node=node, serial=identity.serial)
        return cpb.JoinResponse(certificate_pem=certificate_pem(cert), ca_bundle_pem=s.ca.certificate_pem,
                                spiffe_id=identity.spiffe_id, control_endpoint=s.settings.control_endpoint)

    async def Renew(self, request: cpb.RenewRequest, context: aio.ServicerContext[Any, Any]) -> cpb.RenewResponse:
        s = self.s
        identity = await self._node(context, "/veilnet.v1.Controller/Renew")
        try:
            cert = s.ca.sign_node_csr(request.csr_pem, identity.name, s.settings.certificate_lifetime)
        except pki.PkiError as exc:
            await fail(context, grpc.StatusCode.INVALID_ARGUMENT, f"csr_pem: {exc}")
        new = pki.identity_from_certificate(cert, s.ca.trust_domain)
        s.store.record_certificate(identity.name, new.serial, new.not_after)
        # What it replaces stops working after a grace period (an open stream moves to the new certificate).
        # Renewing again with an older certificate never extends that period.
        retire_at = datetime.now(UTC) + s.settings.renewal_grace
        retiring = s.store.retire_certificates(identity.name, keep=new.serial, at=retire_at)
        retiring.setdefault(identity.serial, retire_at)  # also if the caller's certificate was never recorded
        s.hub.retire(retiring)
        s.store.append_audit(identity.name, "node", "node.renew", identity.name, None,
                             {"serial": new.serial, "not_after": rfc3339(new.not_after),
                              "renewed_with": identity.serial,
                              "retires": {serial: rfc3339(at) for serial, at in sorted(retiring.items())}},
                             actor_serial=identity.serial)
        s.log.info("certificate_renewed", node=identity.name, serial=new.serial, previous=identity.serial,
                   previous_retires_at=rfc3339(retiring[identity.serial]))
        return cpb.RenewResponse(certificate_pem=certificate_pem(cert), ca_bundle_pem=s.ca.certificate_pem)

    async def _node(self, context: aio.ServicerContext[Any, Any], method: str) -> pki.Identity:
        if self.bootstrap:
            await fail(context, grpc.StatusCode.FAILED_PRECONDITION,
                                "this is the bootstrap listener: only Join is served here")
        return await self.s.authenticate(context, method)

    async def Sync(
        self, request_iterator: AsyncIterator[cpb.AgentMessage], context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[cpb.ControllerMessage]:
        s = self.s
        identity = await self._node(context, "/veilnet.v1.Controller/Sync")
        s.log.info("sync_opened", node=identity.name, serial=identity.serial, note="waiting for the hello")
        try:
            first = await asyncio.wait_for(request_iterator.__anext__(), HELLO_TIMEOUT)
        except (TimeoutError, StopAsyncIteration):
            await fail(context, grpc.StatusCode.INVALID_ARGUMENT, "the first message on Sync must be hello")
        if first.WhichOneof("kind") != "hello":
            await fail(context, grpc.StatusCode.INVALID_ARGUMENT, "the first message on Sync must be hello")
        # Again: the node may have been revoked (or its certificate expired) while we waited for the hello.
        # From here to hub.connect there is no await, so nothing can change in between.
        refusal = s.refusal(identity)
        if refusal is not None:
            s.refused(identity, "/veilnet.v1.Controller/Sync", refusal)
            await fail(context, grpc.StatusCode.UNAUTHENTICATED, refusal.message)
        hello = first.hello
        key = ""
        if hello.wireguard_public_key:
            try:
                # The validator's value, not the raw field: it is the canonical spelling the hub compares.
                key = wg_public_key(hello.wireguard_public_key, "hello.wireguard_public_key")
            except ValidationError as exc:
                await fail(context, grpc.StatusCode.INVALID_ARGUMENT, _validation_details(exc))
        # Relayed with the node's IPsec epoch keys: receivers verify them against it (and it against the CA).
        certificate = (context.auth_context().get("x509_pem_cert") or [b""])[0]
        try:
            session = s.hub.connect(identity.name, identity.serial, hello, key, certificate_pem=certificate)
        except InvalidKey as exc:
            await fail(context, grpc.StatusCode.INVALID_ARGUMENT, f"hello.wireguard_public_key: {exc}")
        except KeyConflict as exc:
            s.log.warning("wireguard_key_conflict", node=identity.name, reason=str(exc))
            await fail(context, grpc.StatusCode.INVALID_ARGUMENT, f"hello.wireguard_public_key: {exc}")
        s.watch_certificate(session, identity)
        reader = asyncio.get_running_loop().create_task(self._read(request_iterator, session, identity))
        try:
            await context.send_initial_metadata((("veilnet-node", identity.name),))  # tells the agent it is in
            while True:
                if session.closed_reason is not None:
                    break  # revoked or replaced: not one more message
                message = session.next_message()
                if message is not None:
                    yield message
                    continue
                if reader.done():
                    break
                session.wake.clear()
                waiter = asyncio.ensure_future(session.wake.wait())
                await asyncio.wait({waiter, reader}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
        finally:
            reader.cancel()
            session.cancel_expiry()
            s.hub.disconnect(session)
        if session.unauthenticated and session.closed_reason is not None:
            await fail(context, grpc.StatusCode.UNAUTHENTICATED, session.closed_reason)
        if session.closed_reason is not None and session.closed_reason.startswith("replaced"):
            await fail(context, grpc.StatusCode.ABORTED, session.closed_reason)
        if reader.done() and not reader.cancelled():
            problem = reader.exception()
            if isinstance(problem, _BadMessage):
                await fail(context, grpc.StatusCode.INVALID_ARGUMENT, str(problem))
            if problem is not None:
                raise problem  # the guard logs it with an id and answers INTERNAL (it ended the stream quietly)

    async def _read(self, request_iterator: AsyncIterator[cpb.AgentMessage], session: Session,
                    identity: pki.Identity) -> None:
        hub = self.s.hub
        async for message in request_iterator:
            if session.closed_reason is not None:
                return
            refusal = self.s.refusal(identity)  # before the message can change anything
            if refusal is not None:
                self.s.refused(identity, "/veilnet.v1.Controller/Sync", refusal)
                session.close(refusal.message, unauthenticated=True)
                return
            kind = message.WhichOneof("kind")
            if kind == "ack":
                hub.acknowledge(session, message.ack)
            elif kind == "key_update":
                try:
                    key = wg_public_key(message.key_update.wireguard_public_key, "key_update.wireguard_public_key")
                except ValidationError as exc:
                    raise _BadMessage(_validation_details(exc)) from None
                try:
                    hub.key_update(session, key)
                except (InvalidKey, KeyConflict) as exc:
                    raise _BadMessage(f"key_update.wireguard_public_key: {exc}") from None
            elif kind == "status":
                hub.status_reported(session, message.status)
            elif kind == "endpoints":
                hub.endpoints_reported(session, [wire.endpoint_from_proto(e) for e in message.endpoints.endpoints])
            elif kind == "epoch_key":
                hub.epoch_key_reported(session, message.epoch_key)  # a refused one is logged; the stream stays
            elif kind == "sa_ready":
                hub.sa_ready_reported(session, message.sa_ready)
            else:
                raise _BadMessage(f"unexpected message {kind or 'empty'!r} after hello")


class _BadMessage(Exception):
    pass


# ---------------------------------------------------------------------------- operators


@guarded_servicer("veilnet.v1.Admin")
class AdminService(admin_pb2_grpc.AdminServicer):  # type: ignore[misc]
    def __init__(self, services: Services) -> None:
        self.s = services
        # the current revision: number, parsed spec, canonical text (None until first needed)
        self._current: tuple[int, Any, str | None] = (0, None, "")

    async def _auth(self, context: aio.ServicerContext[Any, Any], method: str) -> pki.Identity:
        return await self.s.authenticate(context, f"/veilnet.v1.Admin/{method}")

    async def _parse(self, context: aio.ServicerContext[Any, Any], text: str) -> Any:
        try:
            raw = load_spec_text(text)
            return raw, parse_spec(raw)
        except ValidationError as exc:
            await fail(context, grpc.StatusCode.INVALID_ARGUMENT, _validation_details(exc))

    def _current_raw(self) -> tuple[int, Any]:
        """The current revision's number and parsed spec (cached: revisions never change)."""
        record = self.s.store.revision()
        if record is None:
            return 0, None
        if self._current[0] != record.number:
            try:
                current = load_spec_text(record.spec_text)
            except ValidationError as exc:
                # Stored by a version that read more than this one does (a YAML tag, say): compared as
                # nothing, so the next apply replaces it rather than failing on it forever.
                self.s.log.error("stored_spec_unreadable", revision=record.number, field=exc.field,
                                 reason=exc.reason, note="the next apply replaces it")
                current = None
            self._current = (record.number, current, None)
        return self._current[0], self._current[1]

    async def _diff_texts(self, current: tuple[int, Any, str | None], raw: Any) -> tuple[str, str]:
        """(canonical text of ``raw``, unified diff from the current revision), computed in a thread.

        Dumping a 1,000-node spec as canonical YAML takes a few hundred ms; off the event loop, the
        Sync streams keep sending meanwhile.
        """
        number, current_raw, current_text = current

        def work() -> tuple[str, str, str]:
            old = current_text if current_text is not None else (
                canonical_text(current_raw) if current_raw is not None else "")
            new = canonical_text(raw)
            return old, new, unified_diff(old, new, f"revision {number}", "new")

        old_text, new_text, diff = await asyncio.to_thread(work)
        if self._current[0] == number and self._current[2] is None:
            self._current = (number, current_raw, old_text)
        return new_text, diff

    async def ApplySpec(self, request: apb.ApplySpecRequest,
                        context: aio.ServicerContext[Any, Any]) -> apb.ApplySpecResponse:
        who = await self._auth(context, "ApplySpec")
        raw, spec = await self._parse(context, request.spec_yaml)
        return await self._store_spec(context, who, request.spec_yaml, raw, spec, request.message,
                                      request.expected_revision or None, None)

    async def _store_spec(self, context: aio.ServicerContext[Any, Any], who: pki.Identity, text: str, raw: Any,
                          spec: Any, message: str, expected: int | None,
                          rolled_back_from: int | None) -> apb.ApplySpecResponse:
        s = self.s
        current_number, current_raw = self._current_raw()
        current = self._current
        if expected is not None and expected != current_number:
            await fail(context, grpc.StatusCode.ABORTED,
                       f"expected revision {expected} but the current revision is {current_number}")
        if current_number and raw == current_raw:  # equal data, whatever the comments, order or format
            if s.hub.spec_revision != current_number:  # an earlier apply stored it but failed before the hub
                s.hub.set_spec(spec, current_number)
            return apb.ApplySpecResponse(revision=current_number, changed=False, diff="")
        old_spec = s.hub.spec
        try:
            record = s.store.add_revision(text, who.name, message, rolled_back_from=rolled_back_from,
                                          expected_current=current_number)
        except ConflictError as exc:
            await fail(context, grpc.StatusCode.ABORTED, str(exc))
        changes = summarize_changes(old_spec, spec)
        action = "spec.rollback" if rolled_back_from else "spec.apply"
        detail: dict[str, Any] = {"changes": changes, "message": message}
        if rolled_back_from:
            detail["restored_revision"] = rolled_back_from
        s.store.append_audit(who.name, who.role, action, "network-spec", record.number, detail,
                             actor_serial=who.serial)
        s.hub.set_spec(spec, record.number)  # the fan-out starts at the next await
        s.log.info("spec_applied", revision=record.number, by=who.spiffe_id, changes=changes)
        new_text, diff = await self._diff_texts(current, raw)
        if self._current[0] <= record.number:
            self._current = (record.number, raw, new_text)
        return apb.ApplySpecResponse(revision=record.number, changed=True, diff=diff)

    async def DiffSpec(self, request: apb.DiffSpecRequest,
                       context: aio.ServicerContext[Any, Any]) -> apb.DiffSpecResponse:
        await self._auth(context, "DiffSpec")
        raw, _spec = await self._parse(context, request.spec_yaml)
        number, _ = self._current_raw()
        _, diff = await self._diff_texts(self._current, raw)
        return apb.DiffSpecResponse(current_revision=number, diff=diff)

    async def GetSpec(self, request: apb.GetSpecRequest, context: aio.ServicerContext[Any, Any]) -> apb.GetSpecResponse:
        await self._auth(context, "GetSpec")
        record = self.s.store.revision(request.revision or None)
        if record is None:
            what = f"revision {request.revision}" if request.revision else "any revision"
            await fail(context, grpc.StatusCode.NOT_FOUND, f"there is no {what}")
        return apb.GetSpecResponse(revision=record.number, spec_yaml=record.spec_text, author=record.author,
                                   created_at=rfc3339(record.created_at), message=record.message)

    async def History(self, request: apb.HistoryRequest, context: aio.ServicerContext[Any, Any]) -> apb.HistoryResponse:
        await self._auth(context, "History")
        records = self.s.store.revisions(min(request.limit or 50, 1000))
        return apb.HistoryResponse(revisions=[
            apb.Revision(revision=r.number, author=r.author, created_at=rfc3339(r.created_at), message=r.message,
                         rolled_back_from=r.rolled_back_from or 0)
            for r in records
        ])

    async def Rollback(self, request: apb.RollbackRequest,
                       context: aio.ServicerContext[Any, Any]) -> apb.ApplySpecResponse:
        who = await self._auth(context, "Rollback")
        record = self.s.store.revision(request.revision) if request.revision else None
        if record is None:
            await fail(context, grpc.StatusCode.NOT_FOUND, f"there is no revision {request.revision}")
        raw, spec = await self._parse(context, record.spec_text)
        message = request.message or f"rollback to revision {record.number}"
        return await self._store_spec(context, who, record.spec_text, raw, spec, message, None, record.number)

    async def ListNodes(self, request: apb.ListNodesRequest,
                        context: aio.ServicerContext[Any, Any]) -> apb.ListNodesResponse:
        await self._auth(context, "ListNodes")
        hub = self.s.hub
        records = {n.name: n for n in self.s.store.nodes()}
        in_spec = {n.name for n in hub.spec.nodes} if hub.spec else set()
        out = []
        for name in sorted(in_spec | set(records)):
            rec = records.get(name)
            rt = hub.runtime.get(name)
            state = hub.states.get(name)
            out.append(apb.NodeStatus(
                name=name,
                in_spec=name in in_spec,
                joined=rec is not None and rec.joined_at is not None,
                connected=name in hub.sessions,
                revoked=name in hub.revoked_nodes,
                wireguard_public_key=hub.public_keys.get(name, ""),
                applied_spec_revision=rt.applied_spec_revision if rt else 0,
                last_error=rt.last_error if rt else "",
                rejected_spec_revision=rt.rejected_spec_revision if rt else 0,
                peers_with_recent_handshake=rt.peers_with_recent_handshake if rt else 0,
                drift_repairs=rt.drift_repairs if rt else 0,
                last_seen=rfc3339(rt.last_seen) if rt else "",
                certificate_expires=rfc3339(rec.certificate_not_after) if rec else "",
                peers=len(state["peers"]) if state else 0,
                capabilities=list(rt.capabilities) if rt else [],
                encryption=(state or {}).get("encryption", "wireguard") if state else "",
                peer_encryption=[cpb.PeerEncryption(**e) for e in rt.encryption] if rt else [],
            ))
        return apb.ListNodesResponse(current_revision=hub.spec_revision, nodes=out)

    async def CreateJoinToken(self, request: apb.CreateJoinTokenRequest,
                              context: aio.ServicerContext[Any, Any]) -> apb.CreateJoinTokenResponse:
        who = await self._auth(context, "CreateJoinToken")
        try:
            node = validate_name(request.node_name, "node_name")
        except ValidationError as exc:
            await fail(context, grpc.StatusCode.INVALID_ARGUMENT, _validation_details(exc))
        ttl = request.ttl_seconds or DEFAULT_TOKEN_TTL
        if ttl > MAX_TOKEN_TTL:
            await fail(context, grpc.StatusCode.INVALID_ARGUMENT,
                                f"ttl_seconds: at most {MAX_TOKEN_TTL} (got {ttl})")
        token, expires = self.s.store.create_token(node, timedelta(seconds=ttl), who.name)
        self.s.store.append_audit(who.name, who.role, "token.create", node, None,
                                  {"expires_at": rfc3339(expires)}, actor_serial=who.serial)
        return apb.CreateJoinTokenResponse(token=token, expires_at=rfc3339(expires), ca_hash=self.s.ca.ca_hash)

    async def RevokeNode(self, request: apb.RevokeNodeRequest,
                         context: aio.ServicerContext[Any, Any]) -> apb.RevokeNodeResponse:
        who = await self._auth(context, "RevokeNode")
        s = self.s
        if s.store.node(request.node_name) is None:
            await fail(context, grpc.StatusCode.NOT_FOUND, f"node {request.node_name!r} never joined")
        serials = s.store.revoke_node(request.node_name, request.reason)
        was_connected = s.hub.revoke(request.node_name, serials)
        s.store.append_audit(who.name, who.role, "node.revoke", request.node_name, None,
                             {"reason": request.reason, "serials": serials}, actor_serial=who.serial)
        s.log.warning("node_revoked", node=request.node_name, by=who.spiffe_id, serials=serials)
        return apb.RevokeNodeResponse(certificates_revoked=len(serials), was_connected=was_connected)

    async def RevokeOperator(self, request: apb.RevokeOperatorRequest,
                             context: aio.ServicerContext[Any, Any]) -> apb.RevokeOperatorResponse:
        who = await self._auth(context, "RevokeOperator")
        s = self.s
        try:
            name = validate_name(request.name, "name")
        except ValidationError as exc:
            await fail(context, grpc.StatusCode.INVALID_ARGUMENT, _validation_details(exc))
        try:
            serials = s.store.revoke_operator(name, request.reason)
        except StoreError as exc:
            await fail(context, grpc.StatusCode.NOT_FOUND, str(exc))
        s.hub.trust.revoked.update(serials)  # the store is asked on every call anyway; this is the fast path
        s.store.append_audit(who.name, who.role, "operator.revoke", name, None,
                             {"reason": request.reason, "serials": serials}, actor_serial=who.serial)
        s.log.warning("operator_revoked", operator=name, by=who.spiffe_id, serials=serials)
        return apb.RevokeOperatorResponse(certificates_revoked=len(serials))

    async def SendCommand(self, request: apb.SendCommandRequest,
                          context: aio.ServicerContext[Any, Any]) -> apb.SendCommandResponse:
        who = await self._auth(context, "SendCommand")
        kind = COMMANDS.get(request.command)
        if kind is None:
            await fail(context, grpc.StatusCode.INVALID_ARGUMENT,
                       f"command: must be one of {', '.join(COMMANDS)} (got {request.command!r})")
        if request.node_name not in self.s.hub.runtime and self.s.store.node(request.node_name) is None:
            await fail(context, grpc.StatusCode.NOT_FOUND, f"node {request.node_name!r} never joined")
        delivered = self.s.hub.command(request.node_name, kind)
        self.s.store.append_audit(who.name, who.role, "node.command", request.node_name, None,
                                  {"command": request.command, "delivered": delivered}, actor_serial=who.serial)
        return apb.SendCommandResponse(delivered=delivered)

    async def ReadAudit(self, request: apb.ReadAuditRequest,
                        context: aio.ServicerContext[Any, Any]) -> apb.ReadAuditResponse:
        await self._auth(context, "ReadAudit")
        entries, total = self.s.store.audit(min(request.limit or 100, 10_000))
        response = apb.ReadAuditResponse(total=total, entries=[
            apb.AuditEntry(sequence=e.sequence, time=rfc3339(e.time), actor=e.actor, role=e.role, action=e.action,
                           target=e.target, revision=e.revision or 0, detail=json.dumps(dict(e.detail)),
                           hash=e.hash, previous_hash=e.previous_hash, actor_serial=e.actor_serial,
                           signature=e.signature)
            for e in entries
        ])
        if request.verify:
            # On its own read-only connection, in a thread: a long log does not stall the streams. Checked
            # against the newest head this controller signed, so rows removed while it runs are found too.
            signer = self.s.audit
            public_key = signer.public_key if signer is not None else None
            head = signer.head if signer is not None else None
            ok, message = await asyncio.to_thread(self.s.store.verify_audit, public_key, head,
                                                  "the newest head this controller signed")
            response.verified = ok
            response.verify_error = "" if ok else message
            response.verify_summary = message if ok else ""
        return response


# ---------------------------------------------------------------------------- serving


def _server_credentials(key_pem: bytes, cert_pem: bytes, ca_pem: bytes, *, client_auth: bool) -> grpc.ServerCredentials:
    # The chain includes the CA: a joining host checks it against the hash it pinned before trusting it.
    chain = cert_pem if cert_pem.endswith(b"\n") else cert_pem + b"\n"
    return grpc.ssl_server_credentials([(key_pem, chain + ca_pem)],
                                       root_certificates=ca_pem if client_auth else None,
                                       require_client_auth=client_auth)


_KEEPALIVE = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


async def serve(data_dir: Path, services: Services, server_key: bytes, server_cert: bytes,
                ready: Callable[[int, int], None] | None = None) -> None:
    """Run both listeners until cancelled."""
    s = services
    control = aio.server(options=[("grpc.max_receive_message_length", MAX_CONTROL_MESSAGE), *_KEEPALIVE])
    controller_pb2_grpc.add_ControllerServicer_to_server(ControllerService(s, bootstrap=False), control)
    admin_pb2_grpc.add_AdminServicer_to_server(AdminService(s), control)
    control_port = control.add_secure_port(
        s.settings.control_listen,
        _server_credentials(server_key, server_cert, s.ca.certificate_pem, client_auth=True))
    bootstrap = aio.server(options=[("grpc.max_receive_message_length", MAX_BOOTSTRAP_MESSAGE)])
    controller_pb2_grpc.add_ControllerServicer_to_server(ControllerService(s, bootstrap=True), bootstrap)
    bootstrap_port = bootstrap.add_secure_port(
        s.settings.bootstrap_listen,
        _server_credentials(server_key, server_cert, s.ca.certificate_pem, client_auth=False))
    if not control_port or not bootstrap_port:
        raise VeilnetError(f"cannot listen on {s.settings.control_listen} / {s.settings.bootstrap_listen}")
    await control.start()
    await bootstrap.start()
    s.log.info("serving", control=s.settings.control_listen, bootstrap=s.settings.bootstrap_listen,
               control_port=control_port, bootstrap_port=bootstrap_port, revision=s.hub.spec_revision,
               ca_hash=s.ca.ca_hash)
    if ready is not None:
        ready(control_port, bootstrap_port)
    try:
        await asyncio.Event().wait()
    finally:
        await s.hub.close_all()
        await control.stop(grace=1.0)
        await bootstrap.stop(grace=1.0)
        if s.audit is not None:
            s.audit.flush()  # the newest signed head to its file before the process ends
