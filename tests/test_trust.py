"""Certificates are judged again on every call and every stream message, and streams end on a timer.

Real CA, real certificates, a real hub on SQLite, the real Sync reader; no network.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from factories import wg_key

from veilnet.v1 import controller_pb2 as cpb
from veilnet_agent.control import pki
from veilnet_controller.ca import CertificateAuthority
from veilnet_controller.hub import Hub
from veilnet_controller.server import ControllerService, ServerSettings, Services
from veilnet_controller.store import OperatorCertificateRecord, SQLiteStore
from veilnet_controller.trust import CertificateTrust

HOUR = timedelta(hours=1)


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.create(tmp_path_factory.mktemp("ca") / "ca", "veilnet.test")


@pytest.fixture
def services(tmp_path: Path, ca: CertificateAuthority) -> Iterator[Services]:
    store = SQLiteStore(tmp_path / "c.db")
    hub = Hub(store)
    hub.load()
    yield Services(ca, store, hub, ServerSettings("127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0", HOUR))
    store.close()


async def closed(session: Any, timeout: float = 10) -> None:
    """Wait until ``session`` is closed (its wake event also fires for new targets)."""
    async def until_closed() -> None:
        while session.closed_reason is None:
            session.wake.clear()
            await session.wake.wait()
    await asyncio.wait_for(until_closed(), timeout)


def node_identity(ca: CertificateAuthority, name: str, **window: datetime) -> pki.Identity:
    _key, cert = ca.issue_node(name, HOUR, **window)
    return pki.identity_from_certificate(cert)


def no_operators(serial: str) -> OperatorCertificateRecord | None:
    return None


def test_refusal_names_what_is_wrong(ca: CertificateAuthority) -> None:
    now = datetime.now(UTC)
    trust = CertificateTrust()

    def refusal(identity: pki.Identity, at: datetime) -> str | None:
        found = trust.refusal(identity, at, no_operators)
        return None if found is None else found.message

    good = node_identity(ca, "host-a")
    assert refusal(good, now) is None
    assert trust.deadline(good) == good.not_after

    early = node_identity(ca, "host-a", not_before=now + HOUR, not_after=now + 2 * HOUR)
    assert f"certificate {early.serial} of {early.spiffe_id} is not valid before" in (refusal(early, now) or "")
    late = node_identity(ca, "host-a", not_before=now - 2 * HOUR, not_after=now - HOUR)
    assert "expired at" in (refusal(late, now) or "")

    trust.retiring[good.serial] = now + timedelta(seconds=60)
    assert refusal(good, now) is None  # the grace period: still accepted
    assert trust.deadline(good) == now + timedelta(seconds=60)
    assert "replaced by a renewal and retired at" in (refusal(good, now + timedelta(seconds=60)) or "")

    other = node_identity(ca, "host-b")
    trust.revoked_nodes.add("host-b")  # a revoked node: refused whatever the serial
    assert "node host-b is revoked" in (refusal(other, now) or "")
    trust.revoked.add(good.serial)
    assert refusal(good, now) == f"certificate {good.serial} of {good.spiffe_id} is revoked"


def test_only_recorded_unrevoked_operator_certificates_are_accepted(ca: CertificateAuthority,
                                                                   services: Services) -> None:
    trust, store = CertificateTrust(), services.store
    now = datetime.now(UTC)
    _key, cert = ca.issue_operator("alice", "admin", HOUR)
    alice = pki.identity_from_certificate(cert)
    assert "is not one this controller recorded issuing" in str(trust.refusal(alice, now, store.operator_certificate))
    store.record_operator_certificate("alice", "admin", alice.serial, alice.not_after, "test")
    assert trust.refusal(alice, now, store.operator_certificate) is None
    _key, cert = ca.issue_operator("bob", "viewer", HOUR)
    bob = pki.identity_from_certificate(cert)
    store.record_operator_certificate("bob", "admin", bob.serial, bob.not_after, "test")  # recorded as admin
    refused = trust.refusal(bob, now, store.operator_certificate)
    assert refused is not None and refused.kind == "mismatch"
    assert "was recorded for bob (admin), not bob (viewer)" in refused.message
    store.revoke_operator("alice", "left")
    revoked = trust.refusal(alice, now, store.operator_certificate)
    assert revoked is not None and revoked.kind == "revoked"
    assert revoked.message == f"certificate {alice.serial} of {alice.spiffe_id} is revoked"


def test_every_stream_message_is_checked_before_it_changes_anything(services: Services,
                                                                     ca: CertificateAuthority) -> None:
    """A serial revoked behind the session's back (nothing closes it): the next message is refused, not applied."""
    identity = node_identity(ca, "host-a")
    first, second = wg_key("first"), wg_key("second")

    def key_update(key: str) -> cpb.AgentMessage:
        return cpb.AgentMessage(key_update=cpb.KeyUpdate(wireguard_public_key=key))

    async def messages() -> AsyncIterator[cpb.AgentMessage]:
        yield key_update(first)
        services.hub.trust.revoked.add(identity.serial)  # between two messages, without closing the session
        yield key_update(second)

    async def scenario() -> Any:
        session = services.hub.connect("host-a", identity.serial, cpb.Hello())
        await ControllerService(services, bootstrap=False)._read(messages(), session, identity)
        return session

    session = asyncio.run(scenario())
    assert services.hub.public_keys["host-a"] == first  # applied while the certificate was good
    assert session.unauthenticated and session.closed_reason == (
        f"certificate {identity.serial} of {identity.spiffe_id} is revoked")
    assert services.store.node("host-a").wireguard_public_key == first  # type: ignore[union-attr]


def test_a_stream_is_closed_by_a_timer_at_not_after(services: Services, ca: CertificateAuthority) -> None:
    now = datetime.now(UTC)
    identity = node_identity(ca, "host-a", not_before=now - HOUR, not_after=now + timedelta(seconds=1.5))

    async def scenario() -> Any:
        session = services.hub.connect("host-a", identity.serial, cpb.Hello())
        services.watch_certificate(session, identity)
        assert session.expiry is not None
        await closed(session)  # nothing but the timer can close it: no message, no revocation
        return session

    session = asyncio.run(scenario())
    assert datetime.now(UTC) > identity.not_after
    assert session.unauthenticated and "expired at" in (session.closed_reason or "")
    assert session.expiry is None


def test_retiring_a_serial_rearms_the_timer_of_its_open_stream(services: Services, ca: CertificateAuthority) -> None:
    identity = node_identity(ca, "host-a")  # valid for an hour
    other = node_identity(ca, "host-b")

    async def scenario() -> tuple[Any, Any]:
        session = services.hub.connect("host-a", identity.serial, cpb.Hello())
        bystander = services.hub.connect("host-b", other.serial, cpb.Hello())
        services.watch_certificate(session, identity)
        services.watch_certificate(bystander, other)
        services.hub.retire({identity.serial: datetime.now(UTC) + timedelta(milliseconds=200)})
        await closed(session)
        return session, bystander

    session, bystander = asyncio.run(scenario())
    assert session.unauthenticated and "replaced by a renewal" in (session.closed_reason or "")
    assert bystander.closed_reason is None
