"""Every log line is one structlog JSON event, including the standard library's (pyroute2, grpc)."""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

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


def test_stderr_is_the_journal_only_when_journal_stream_names_it(tmp_path: Path) -> None:
    with open(tmp_path / "stream", "w") as stream:
        st = os.fstat(stream.fileno())
        assert logs.stream_is_journal(stream, f"{st.st_dev}:{st.st_ino}")
        assert not logs.stream_is_journal(stream, f"{st.st_dev}:{st.st_ino + 1}")  # another socket: a pipe to it
        assert not logs.stream_is_journal(stream, None)
        assert not logs.stream_is_journal(stream, "")
    assert not logs.stream_is_journal(io.StringIO(), "1:2")  # no file descriptor at all


def test_under_journald_each_line_carries_its_syslog_priority(
    json_logs: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logs, "stream_is_journal", lambda stream, journal_stream: True)
    logs.configure("json", "debug")
    log = logs.get_logger(node="host-a")
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")
    logging.getLogger("pyroute2").error("from a library")
    lines = json_logs.readouterr().err.splitlines()
    assert [line[:4] for line in lines] == ["<7>{", "<6>{", "<4>{", "<3>{", "<3>{"], lines
    # journald strips the prefix: what is left is the same JSON event as without the journal
    assert json.loads(lines[2][3:]) == {**json.loads(lines[2][3:]), "event": "w", "level": "warning", "node": "host-a"}


def test_without_the_journal_lines_are_plain_json(json_logs: pytest.CaptureFixture[str]) -> None:
    logs.configure("json", "info")
    logs.get_logger().warning("w")
    assert json_logs.readouterr().err.startswith('{"event": "w"')
