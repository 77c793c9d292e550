"""structlog set-up: JSON lines (default) or a console renderer, to stderr.

Every module logs through ``get_logger`` (structlog). Libraries that use the
standard library's ``logging`` (pyroute2, grpc's Python layer) are routed into
structlog too, at warning and above (debug when the agent logs at debug), so
the agent's log stays one stream of events in one format (a library's
exception as a one-line ``error`` field, not its stack).

When stderr is the journal (systemd's ``$JOURNAL_STREAM`` names it), each line
starts with its syslog priority (``<4>`` for a warning): journald strips it and
files the entry under that priority, so ``journalctl -p warning`` finds the
agent's warnings while the message stays the same JSON line.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, TextIO

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
# syslog priorities (sd-daemon.h's SD_DEBUG .. SD_CRIT), by structlog's level names
_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2, "exception": 3}


def stream_is_journal(stream: TextIO, journal_stream: str | None) -> bool:
    """Whether ``stream`` is the journal's stream socket (``$JOURNAL_STREAM`` is its ``device:inode``)."""
    if not journal_stream:
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError):
        return False
    return journal_stream == f"{st.st_dev}:{st.st_ino}"


def with_priority(renderer: Any) -> Any:
    """``renderer``, its line prefixed with the event's syslog priority (journald's level prefix)."""

    def render(logger: Any, name: str, event_dict: Any) -> Any:
        priority = _PRIORITY.get(str(event_dict.get("level", "info")), 6)
        return f"<{priority}>{renderer(logger, name, event_dict)}"

    return render


class _IntoStructlog(logging.Handler):
    """A standard-library record as a structlog event (same renderer, same stream and lock)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields: dict[str, object] = {"logger": record.name}
            if record.exc_info and record.exc_info[1] is not None:
                # One line, not the library's stack: what went wrong is the agent's to report, in its own events.
                error = record.exc_info[1]
                fields["error"] = f"{type(error).__name__}: {error}"
            structlog.get_logger().log(record.levelno, record.getMessage(), **fields)
        except Exception:
            self.handleError(record)


def configure(log_format: str = "json", level: str = "info") -> None:
    renderer: structlog.typing.Processor
    if log_format == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    else:
        renderer = structlog.processors.JSONRenderer(sort_keys=False)
    if stream_is_journal(sys.stderr, os.environ.get("JOURNAL_STREAM")):
        renderer = with_priority(renderer)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    root = logging.getLogger()
    root.handlers[:] = [_IntoStructlog()]
    root.setLevel(logging.DEBUG if level == "debug" else max(_LEVELS[level], logging.WARNING))


def get_logger(**bound: object) -> structlog.typing.FilteringBoundLogger:
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger(**bound)
    return logger
