"""systemd's service notification protocol (sd_notify(3)), in the few lines it takes.

A ``Type=notify`` unit gets ``$NOTIFY_SOCKET``: a datagram socket (a path, or an
abstract name written with a leading ``@``) to which the service sends
newline-separated ``KEY=VALUE`` assignments: ``READY=1`` once it is really up,
``STATUS=...`` for ``systemctl status``, ``WATCHDOG=1`` at least every half of
``$WATCHDOG_USEC`` (when ``WatchdogSec=`` is set; ``$WATCHDOG_PID`` names the
process meant), ``STOPPING=1`` on the way out. Without ``$NOTIFY_SOCKET``
(not under systemd, or a test) every call is a no-op.

``Readiness`` is the agents' and the controller's use of it: READY is sent
once, the first time the caller says the job is done (never on a failure), and
the status line follows what the caller reports.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

__all__ = ["Notifier", "Readiness"]


class Notifier:
    """Sends notifications to ``$NOTIFY_SOCKET`` (read once, at construction)."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        self.address: str | bytes | None = None
        if path.startswith("@"):
            self.address = b"\0" + path[1:].encode()
        elif path.startswith("/"):
            self.address = path
        self.watchdog_seconds: float | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_seconds = int(usec) / 1e6
        self._last_watchdog = 0.0
        self.sent_ready = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: str) -> bool:
        """One datagram with ``fields`` (``READY="1"``, ``STATUS="..."``). False if not sent (no socket, error)."""
        if self.address is None or not fields:
            return False
        payload = "\n".join(f"{key}={value.replace(chr(10), ' ')}" for key, value in fields.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(payload, self.address)
        except OSError:
            return False  # systemd went away or the socket is gone: nothing to tell it, nothing to fail
        return True

    def ready(self, status: str) -> None:
        self.sent_ready = self.send(READY="1", STATUS=status) or self.sent_ready

    def status(self, status: str) -> None:
        self.send(STATUS=status)

    def stopping(self, status: str) -> None:
        self.send(STOPPING="1", STATUS=status)

    def watchdog(self, now: float | None = None) -> None:
        """Keep-alive, at most every quarter of the interval (call it from the loop that must not hang)."""
        if self.watchdog_seconds is None:
            return
        now = time.monotonic() if now is None else now
        if now - self._last_watchdog >= self.watchdog_seconds / 4:
            self._last_watchdog = now
            self.send(WATCHDOG="1")


class Readiness:
    """READY once, on the first report that the job is done; the status line on every change."""

    def __init__(self, notifier: Notifier | None = None) -> None:
        self.notifier = notifier or Notifier()
        self.ready = False
        self._status = ""

    def report(self, done: bool, status: str) -> None:
        """``done``: the data plane (or server) is in place now; ``status``: one line for ``systemctl status``."""
        if done and not self.ready:
            self.ready = True
            self._status = status
            self.notifier.ready(status)
        elif status != self._status:
            self._status = status
            self.notifier.status(status)

    def alive(self) -> None:
        self.notifier.watchdog()

    def stopping(self, status: str) -> None:
        self.notifier.stopping(status)
