"""The agent's side of item 3: a controller message or a local call that makes a handler fail unexpectedly is
logged with a correlation id, answered (a failed ack, INTERNAL with the id), and nothing stops: not the
daemon's loop, not the control stream's thread, not the local API."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import grpc
import pytest
from factories import state
from structlog.testing import capture_logs
from test_controlled import agent, send_update

from veilnet.v1 import agent_pb2 as lpb
from veilnet.v1 import controller_pb2 as cpb
from veilnet.v1 import state_pb2 as spb
from veilnet_agent.control import client as control_module
from veilnet_agent.control import local_api
from veilnet_agent.control.client import ControlClient
from veilnet_agent.control.local_api import Caller, LocalApiError, LocalRequest
from veilnet_agent.testing import FakeKernel


def ids(logs: list[dict[str, Any]], event: str) -> list[str]:
    return [e["error_id"] for e in logs if e.get("event") == event]


def test_an_update_that_makes_the_agent_fail_is_acked_failed_with_an_id_and_the_next_one_applies(
        tmp_path: Path) -> None:
    daemon, client = agent(tmp_path, FakeKernel())
    real = daemon.tracker.prepare

    def broken(raw: object) -> Any:
        raise RuntimeError("the renderer tripped over /secret")

    daemon.tracker.prepare = broken  # type: ignore[method-assign]
    with capture_logs() as logs:
        send_update(daemon, state(peers=1), 1, 5)
    (ack,) = client.of("ack")
    assert (ack.sequence, ack.ok, ack.error_field) == (1, False, "agent")
    (error_id,) = ids(logs, "update_failed")
    assert ack.error_reason == f"internal error {error_id}: the agent logged the details under this id"
    assert "secret" not in ack.error_reason + ack.error_value
    assert error_id in daemon.last_error
    daemon.tracker.prepare = real  # type: ignore[method-assign]
    send_update(daemon, state(peers=1), 2, 6)
    assert client.of("ack")[-1].ok and daemon.applied_revision == 6 and daemon.last_error == ""


def test_a_failing_event_handler_is_logged_with_an_id_and_the_loop_goes_on(tmp_path: Path) -> None:
    daemon, _ = agent(tmp_path, FakeKernel())
    calls: list[int] = []

    def broken() -> None:
        calls.append(1)
        raise OSError("disk full")

    with capture_logs() as logs:
        daemon._guarded(broken)
        daemon._guarded(broken)
    assert len(calls) == 2 and len(set(ids(logs, "event_failed"))) == 2


def local(daemon: Any, kind: str, payload: Any) -> Any:
    from concurrent.futures import Future

    request = LocalRequest(kind, payload, Future())
    daemon._on_local(request)
    return request.reply


def test_a_local_call_that_makes_the_agent_fail_is_internal_with_an_id(tmp_path: Path) -> None:
    daemon, _ = agent(tmp_path, FakeKernel())

    def broken() -> Any:
        raise ZeroDivisionError("internals")

    daemon._status = broken  # type: ignore[method-assign]
    with capture_logs() as logs:
        reply = local(daemon, "status", None)
    exc = reply.exception()
    assert isinstance(exc, LocalApiError) and exc.code == grpc.StatusCode.INTERNAL
    (error_id,) = ids(logs, "local_api_failed")
    assert str(exc) == f"internal error {error_id}: the agent logged the details under this id"


@pytest.mark.parametrize("name", ["x" * 1_000_000, "bad\nname", "\ud800"])
def test_attach_and_detach_names_are_validated_before_they_are_quoted(tmp_path: Path, name: str) -> None:
    daemon, _ = agent(tmp_path, FakeKernel())
    send_update(daemon, state(peers=1), 1, 5)
    attach = local(daemon, "attach", spb.LocalEndpoint(name=name.replace("\ud800", "?"), segment="blue",
                                                       mac="02:00:00:0a:00:09", ipv4="203.0.113.19", netns="n"))
    detach = local(daemon, "detach", name)
    for reply in (attach, detach):
        exc = reply.exception()
        assert isinstance(exc, LocalApiError) and exc.code == grpc.StatusCode.INVALID_ARGUMENT, exc
        assert len(str(exc)) < 1000 and str(exc).isprintable()
    assert daemon.attached == {}


def test_a_reserved_label_key_is_quoted_safely(tmp_path: Path) -> None:
    daemon, _ = agent(tmp_path, FakeKernel())
    send_update(daemon, state(peers=1), 1, 5)
    reply = local(daemon, "attach", spb.LocalEndpoint(name="a-new", segment="blue", mac="02:00:00:0a:00:09",
                                                      ipv4="203.0.113.19", netns="n",
                                                      labels={"node." + "k" * 100_000: "v"}))
    exc = reply.exception()
    assert isinstance(exc, LocalApiError) and exc.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "reserved" in str(exc) and len(str(exc)) < 1000


def test_restored_attachments_that_are_no_endpoints_are_left_out(tmp_path: Path) -> None:
    daemon, _ = agent(tmp_path, FakeKernel())
    daemon.dir.mkdir(parents=True)
    good = {"name": "a-x", "segment": "blue", "mac": "02:00:00:0a:00:09", "ipv4": "203.0.113.19", "netns": "n"}
    junk = [good, {"name": "b", "labels": {"k": 1}}, {"name": "c", "mac": 7}, "text", {"name": "d", "colour": "x"}]
    (daemon.dir / "attached.json").write_text(json.dumps(junk))
    (daemon.dir / "applied.json").write_text('{"spec_revision": 1e999, "state": ' + json.dumps(state(peers=1)) + "}")
    with capture_logs() as logs:
        daemon._restore()
    assert list(daemon.attached) == ["a-x"]
    assert any(e["event"] == "attached_endpoints_unreadable" for e in logs)
    assert daemon.target_revision == 0  # not a number this agent wrote: not trusted
    daemon._hello()  # the hello is built from them: it must not raise (it ended the control thread before)


def test_an_unreadable_own_file_is_logged_not_raised(tmp_path: Path) -> None:
    daemon, _ = agent(tmp_path, FakeKernel())
    daemon.dir.mkdir(parents=True)
    (daemon.dir / "applied.json").write_bytes(b'{"state": {"node": "\xff"}}')
    (daemon.dir / "attached.json").write_text("[" * 100_000)
    with capture_logs() as logs:
        daemon._restore()
    assert daemon.received is None and daemon.attached == {}
    assert [e["file"].rsplit("/", 1)[-1] for e in logs if e["event"] == "state_file_unreadable"] == [
        "attached.json", "applied.json"]


class _Files:
    def control_endpoint(self) -> str:
        return "127.0.0.1:9"  # discard: nothing listens, every dial fails fast

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials()


def test_the_control_thread_survives_a_stream_that_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    """A hello that could not be built raised out of the control thread, which then never dialled again."""
    monkeypatch.setattr(control_module, "INITIAL_BACKOFF", 0.01)
    hellos: list[int] = []
    third = threading.Event()

    def hello() -> cpb.Hello:
        hellos.append(1)
        if len(hellos) < 3:
            raise TypeError("bad label value in an attachment")
        third.set()
        return cpb.Hello()

    client = ControlClient(_Files(), hello, lambda event: None, "host-a", 0.05)  # type: ignore[arg-type]
    with capture_logs() as logs:
        client.start()
        assert third.wait(60), "the control thread stopped dialling"
        client.stop()
    assert len(ids(logs, "control_stream_failed")) == 2


class _Context:
    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None
        self.details = ""

    def peer(self) -> str:
        return "unix-abstract:veilnet-local-api/x"

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code, self.details = code, details
        raise Exception()  # what grpc's abort does


class _Door:
    def caller(self, peer: str) -> Caller:
        return Caller(pid=1, uid=0, gid=0, groups=(), process="test")


def servicer(submit: Any) -> Any:
    from veilnet_agent.logs import get_logger

    return local_api._Servicer(submit, lambda: _Door(), get_logger())  # type: ignore[arg-type,return-value]


def test_every_local_api_method_is_guarded() -> None:
    for method in lpb.DESCRIPTOR.services_by_name["AgentLocal"].methods:
        assert getattr(getattr(local_api._Servicer, method.name), "__veilnet_guarded__", False), method.name


def test_a_local_api_handler_that_raises_answers_internal_with_an_id() -> None:
    def submit(request: LocalRequest) -> None:
        raise RuntimeError("queue closed /secret")

    context = _Context()
    with capture_logs() as logs, pytest.raises(Exception):  # noqa: B017 - grpc's abort raises Exception
        servicer(submit).Status(lpb.StatusRequest(), context)
    (error_id,) = ids(logs, "local_api_failed")
    assert context.code == grpc.StatusCode.INTERNAL and error_id in context.details
    assert "secret" not in context.details


def test_local_api_errors_become_their_status_bounded() -> None:
    def submit(request: LocalRequest) -> None:
        request.reply.set_exception(LocalApiError(grpc.StatusCode.NOT_FOUND, "no endpoint " + "x" * 100_000))

    context = _Context()
    with pytest.raises(Exception):  # noqa: B017
        servicer(submit).DetachEndpoint(lpb.DetachEndpointRequest(name="x" * 100_000), context)
    assert context.code == grpc.StatusCode.NOT_FOUND and len(context.details) <= local_api.MAX_DETAILS
