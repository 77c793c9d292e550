"""Every log line is one structlog JSON event, including the standard library's (pyroute2, grpc)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from veilnet_agent import logs
from veilnet_agent.drivers import wireguard


@pytest.fixture
def json_logs(capsys: pytest.CaptureFixture[str]) -> Iterator[pytest.CaptureFixture[str]]:
    """The agent's logging, configured by the test itself (capsys's stream is only in place during the call)."""
    try:
        yield capsys
    finally:
        logging.getLogger().handlers[:] = []
        structlog.reset_defaults()


def events(capsys: pytest.CaptureFixture[str]) -> list[dict[str, object]]:
    lines = capsys.readouterr().err.splitlines()
    assert all(line.startswith("{") for line in lines), lines
    return [json.loads(line) for line in lines]


def test_standard_library_records_become_json_events(json_logs: pytest.CaptureFixture[str]) -> None:
    logs.configure("json", "info")
    logging.getLogger("pyroute2.netlink").warning("socket %s closed", 7)
    logging.getLogger("pyroute2.netlink").info("chatty")  # below warning: dropped
    (event,) = events(json_logs)
    assert event["event"] == "socket 7 closed" and event["logger"] == "pyroute2.netlink"
    assert event["level"] == "warning" and "timestamp" in event


def test_a_library_exception_is_one_line(json_logs: pytest.CaptureFixture[str]) -> None:
    logs.configure("json", "info")
    try:
        raise ValueError("wire format was corrupt")
    except ValueError:
        logging.getLogger("grpc._common").exception("Exception deserializing message!")
    (event,) = events(json_logs)
    assert event["error"] == "ValueError: wire format was corrupt" and event["level"] == "error"
    assert "Traceback" not in json.dumps(event)


def test_the_wireguard_driver_logs_structured_events(json_logs: pytest.CaptureFixture[str]) -> None:
    logs.configure("json", "info")
    driver = wireguard.WireGuardDriver("vnwg0", wireguard.Path("/nonexistent"), node="host-a")
    driver.log.info("wireguard_backend_chosen", backend="userspace")
    (event,) = events(json_logs)
    assert event == {**event, "event": "wireguard_backend_chosen", "backend": "userspace", "component": "wireguard",
                     "node": "host-a", "ifname": "vnwg0", "level": "info"}
