"""The controller's RPC handlers never leak an exception: INTERNAL with a correlation id, logged, still serving.

A real ``grpc.aio`` server on the loopback (no TLS: authentication is replaced by a fixed identity, so
the handlers themselves run) with the real servicers, store and hub; faults are injected where an
unexpected error could come from (the store, the hub).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from factories import wg_key
from grpc import aio
from structlog.testing import capture_logs

from veilnet.v1 import admin_pb2 as apb
from veilnet.v1 import admin_pb2_grpc, controller_pb2_grpc
from veilnet.v1 import controller_pb2 as cpb
from veilnet_agent.control import pki
from veilnet_controller import server as server_module
from veilnet_controller.hub import Hub
from veilnet_controller.server import MAX_DETAILS, AdminService, ControllerService, ServerSettings, Services
from veilnet_controller.store import SQLiteStore

EXAMPLE = (Path(__file__).parents[1] / "examples" / "network.yaml").read_text()


def identity(kind: str, name: str) -> pki.Identity:
    now = datetime.now(UTC)
    return pki.Identity(kind=kind, name=name, role="admin" if kind == "operator" else "node",  # type: ignore[arg-type]
                        trust_domain="veilnet.test", spiffe_id=f"spiffe://veilnet.test/{kind}/{name}",
                        serial=f"serial-{name}", not_before=now - timedelta(minutes=1),
                        not_after=now + timedelta(hours=1))


class Harness:
    def __init__(self, tmp_path: Path) -> None:
        store = SQLiteStore(tmp_path / "c.db")
        self.hub = Hub(store)
        self.hub.load()
        settings = ServerSettings("127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0", timedelta(hours=1))
        self.services = Services(None, store, self.hub, settings)  # type: ignore[arg-type]  # no CA: no Join here
        self.who: dict[str, pki.Identity] = {}

        async def authenticate(context: Any, method: str) -> pki.Identity:
            return self.who.get(method) or (identity("node", "host-a") if ".Controller/" in method
                                            else identity("operator", "alice"))

        self.services.authenticate = authenticate  # type: ignore[method-assign]

    async def __aenter__(self) -> Harness:
        self.server = aio.server()
        controller_pb2_grpc.add_ControllerServicer_to_server(ControllerService(self.services, bootstrap=False),
                                                             self.server)
        admin_pb2_grpc.add_AdminServicer_to_server(AdminService(self.services), self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        self.channel = aio.insecure_channel(f"127.0.0.1:{port}")
        self.admin = admin_pb2_grpc.AdminStub(self.channel)
        self.controller = controller_pb2_grpc.ControllerStub(self.channel)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.channel.close()
        await self.server.stop(grace=None)


def run(scenario: Callable[[Harness], Any], tmp_path: Path) -> Any:
    async def main() -> Any:
        async with Harness(tmp_path) as h:
            return await scenario(h)

    return asyncio.run(main())


async def status_of(call: Any) -> tuple[grpc.StatusCode, str]:
    try:
        await call
    except aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def error_ids(logs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {entry["error_id"]: entry for entry in logs if entry.get("event") == "rpc_failed"}


def test_every_rpc_method_is_guarded() -> None:
    for cls, service in ((AdminService, "Admin"), (ControllerService, "Controller")):
        names = [m.name for m in server_module._SERVICES[f"veilnet.v1.{service}"].methods]
        assert names, service
        unguarded = [n for n in names if not getattr(getattr(cls, n), "__veilnet_guarded__", False)]
        assert unguarded == [], f"{service}: {unguarded}"


def test_an_unexpected_error_in_a_unary_handler_is_internal_with_an_id_and_the_server_goes_on(
        tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        def broken(limit: int) -> Any:
            raise RuntimeError("sqlite file /var/lib/secret.db is on fire")

        h.hub.store.revisions = broken  # type: ignore[method-assign]
        with capture_logs() as logs:
            code, details = await status_of(h.admin.History(apb.HistoryRequest()))
        assert code == grpc.StatusCode.INTERNAL, (code, details)
        assert "secret" not in details and "RuntimeError" not in details and "Traceback" not in details
        error_id = details.split()[2].rstrip(":")
        assert details == f"internal error {error_id}: the controller logged the details under this id"
        entry = error_ids(logs)[error_id]
        assert entry["method"] == "/veilnet.v1.Admin/History" and isinstance(entry["exc_info"], RuntimeError)
        # still serving: the next calls are answered as usual
        assert (await status_of(h.admin.GetSpec(apb.GetSpecRequest())))[0] == grpc.StatusCode.NOT_FOUND
        applied = await h.admin.ApplySpec(apb.ApplySpecRequest(spec_yaml=EXAMPLE, message="first"))
        assert applied.revision == 1 and applied.changed

    run(scenario, tmp_path)


def test_two_failures_get_two_ids(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        h.hub.store.revisions = lambda limit: 1 / 0  # type: ignore[assignment,method-assign]
        with capture_logs() as logs:
            first = await status_of(h.admin.History(apb.HistoryRequest()))
            second = await status_of(h.admin.History(apb.HistoryRequest()))
        assert first[0] == second[0] == grpc.StatusCode.INTERNAL and first[1] != second[1]
        assert len(error_ids(logs)) == 2

    run(scenario, tmp_path)


async def _sync(h: Harness, messages: list[cpb.AgentMessage]) -> tuple[list[cpb.ControllerMessage],
                                                                       grpc.StatusCode, str]:
    async def requests() -> AsyncIterator[cpb.AgentMessage]:
        for m in messages:
            yield m
        await asyncio.sleep(0.5)  # long enough for the controller to read them; then the stream is closed

    call = h.controller.Sync(requests())
    got: list[cpb.ControllerMessage] = []
    try:
        async for m in call:
            got.append(m)
    except aio.AioRpcError as exc:
        return got, exc.code(), exc.details() or ""
    return got, grpc.StatusCode.OK, ""


def test_an_unexpected_error_reading_a_sync_message_is_internal_with_an_id(tmp_path: Path) -> None:
    """Before, the reader task's exception ended the stream with OK and was never logged."""
    async def scenario(h: Harness) -> None:
        def broken(session: Any, ack: Any) -> None:
            raise KeyError("runtime")

        h.hub.acknowledge = broken  # type: ignore[method-assign]
        hello = cpb.AgentMessage(hello=cpb.Hello(wireguard_public_key=wg_key("host-a")))
        with capture_logs() as logs:
            _, code, details = await _sync(h, [hello, cpb.AgentMessage(ack=cpb.Ack(sequence=1, ok=True))])
        assert code == grpc.StatusCode.INTERNAL, (code, details)
        error_id = details.split()[2].rstrip(":")
        assert error_ids(logs)[error_id]["method"] == "/veilnet.v1.Controller/Sync"
        assert "host-a" not in h.hub.sessions, "the session was closed with the stream"
        # the next stream is served
        del h.hub.acknowledge
        _, code, details = await _sync(h, [hello, cpb.AgentMessage(ack=cpb.Ack(sequence=1, ok=True))])
        assert code == grpc.StatusCode.OK, (code, details)

    run(scenario, tmp_path)


def test_an_unexpected_error_opening_a_sync_session_is_internal_with_an_id(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        def broken(*args: Any, **kwargs: Any) -> None:
            raise ValueError("bad state")

        h.hub.connect = broken  # type: ignore[method-assign]
        with capture_logs() as logs:
            _, code, details = await _sync(h, [cpb.AgentMessage(hello=cpb.Hello())])
        assert code == grpc.StatusCode.INTERNAL and "bad state" not in details
        assert len(error_ids(logs)) == 1

    run(scenario, tmp_path)


def test_status_details_are_bounded_and_encodable(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        code, details = await status_of(h.admin.RevokeNode(apb.RevokeNodeRequest(node_name="x" * 200_000)))
        assert code == grpc.StatusCode.NOT_FOUND and len(details) <= MAX_DETAILS, len(details)
        code, details = await status_of(h.admin.SendCommand(apb.SendCommandRequest(command="y" * 200_000)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and len(details) <= MAX_DETAILS
        # a JSON escape makes a lone surrogate; its key lands in the error's field path
        code, details = await status_of(h.admin.ApplySpec(apb.ApplySpecRequest(spec_yaml='{"\\ud800": 1}')))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "unknown key" in details, details

    run(scenario, tmp_path)
    assert server_module.status_details("\ud800" + "z" * 5000).startswith("\\ud800")


def test_a_stored_spec_this_version_no_longer_reads_does_not_block_applies(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        old = yaml.safe_load(EXAMPLE)
        h.hub.store.add_revision(EXAMPLE.replace("vni: 100", "vni: !!int 100"), "old-version", "")
        assert old["segments"][0]["vni"] == 100
        with capture_logs() as logs:
            applied = await h.admin.ApplySpec(apb.ApplySpecRequest(spec_yaml=EXAMPLE, message="fix"))
        assert applied.revision == 2 and applied.changed
        assert any(e["event"] == "stored_spec_unreadable" for e in logs)

    run(scenario, tmp_path)


@pytest.mark.parametrize("text", ["x: !!int foo", "a: 2023-02-30\nb: !!binary aGk=", "{\"a\": 1, \"a\": 2}"])
def test_crashers_through_apply_spec_are_invalid_argument(tmp_path: Path, text: str) -> None:
    async def scenario(h: Harness) -> None:
        code, details = await status_of(h.admin.ApplySpec(apb.ApplySpecRequest(spec_yaml=text)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)

    run(scenario, tmp_path)


def test_an_agents_error_texts_are_bounded_before_they_are_kept_and_logged(tmp_path: Path) -> None:
    hub = Hub(SQLiteStore(tmp_path / "c.db"))
    hub.load()

    async def connect() -> Any:  # a new key asks for a recompile, on the running loop
        return hub.connect("host-a", "serial-a", cpb.Hello(wireguard_public_key=wg_key("host-a")))

    session = asyncio.run(connect())
    with capture_logs() as logs:
        hub.acknowledge(session, cpb.Ack(sequence=1, ok=False, error_field="f" * 1_000_000,
                                         error_value="v" * 1_000_000, error_reason="r" * 1_000_000))
    assert len(hub.runtime["host-a"].last_error) < 2000  # ListNodes shows it; it was a 3 MB string
    (entry,) = [e for e in logs if e["event"] == "agent_rejected_state"]
    assert all(len(entry[k]) < 1100 for k in ("field", "value", "reason"))
