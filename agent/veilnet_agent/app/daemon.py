"""The ``run`` loop: watch the state file, reconcile on change, resync on a timer, retry what failed.

Nothing that goes wrong after start-up ends the loop: a state-file change, a
resync or a retry that raises is logged and tried again (the data plane and
its firewall stay as they are meanwhile). A pass that leaves the kernel short
of the target (``Reconciler.failure``) is retried after 0.5 s, doubling
(jittered) up to the resync interval, instead of waiting for the next resync.
"""

from __future__ import annotations

import gc
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from ..core.config import AgentConfig
from ..core.errors import ValidationError
from ..dataplane.reconciler import Failure, Outcome, Reconciler
from ..logs import get_logger
from ..sdnotify import Readiness
from .retry import RetrySchedule
from .statefile import StateFileTracker, read_state_file

POLL_SECONDS = 0.5


@contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic collections while a state is parsed and rendered: everything it allocates is kept."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def settle_heap() -> None:
    """Move the long-lived objects of a freshly loaded state out of the collector's way.

    A large desired state is a million small objects; without this every full
    collection rescans them (~100 ms at 5,000 peers), landing on whatever
    change happens next. They hold no reference cycles, so reference counting
    still frees them when the state is replaced. Freezing is O(1); only the
    young generation is collected first, so this costs no full collection.
    """
    gc.collect(0)
    gc.freeze()


@dataclass(frozen=True)
class FileStamp:
    inode: int
    size: int
    mtime_ns: int


def stamp(path: Path) -> FileStamp | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return FileStamp(st.st_ino, st.st_size, st.st_mtime_ns)


class Daemon:
    def __init__(self, config: AgentConfig, state_file: Path, reconciler: Reconciler) -> None:
        self.config = config
        self.state_file = state_file
        self.reconciler = reconciler
        self.log = get_logger(node=config.node_name)
        self._wake = threading.Event()
        self._stop = False
        self._reload = False
        self._stamp: FileStamp | None = None
        self._last_load_was_full = False
        self.tracker = StateFileTracker()
        self.retry = RetrySchedule(maximum=config.resync_interval)
        self.load_failure: Failure | None = None  # a valid state file that could not be taken on (not a rejection)
        self.pass_failure: Failure | None = None  # the last pass raised (it should not; it must not end the loop)
        self._next_resync = 0.0
        self.readiness = Readiness()

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self._reload = True
        else:
            self._stop = True
        self._wake.set()

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)

    @property
    def failure(self) -> Failure | None:
        """Why the kernel is not at the state file's state (None: it is)."""
        return self.pass_failure or self.load_failure or self.reconciler.failure

    def handle_state_file(self) -> Outcome | None:
        """The state file may have changed: accept and apply it. None if there was nothing new to apply."""
        if not self.load_desired():
            return None
        if self._last_load_was_full:
            settle_heap()  # before applying: a full collection over the new state would land mid-apply
        return self.reconciler.reconcile(full=False)

    def load_desired(self) -> bool:
        """Read and accept the state file; on any error keep the running state. True if a new state was accepted."""
        self._stamp = stamp(self.state_file)
        try:
            with gc_paused():
                pending = self.tracker.prepare(read_state_file(self.state_file))
                if pending is None:
                    self.load_failure = None
                    return False
                self.reconciler.accept(pending.state, pending.changed_peers)
        except ValidationError as exc:
            self.load_failure = None  # rejected whole: the running state stays, and is what the kernel should hold
            self.log.error("state_rejected", field=exc.field, value=str(exc.value), reason=exc.reason,
                           file=str(self.state_file))
            return False
        except Exception as exc:  # valid, but it cannot be rendered now (the underlay was never readable): retry
            self.load_failure = Failure("agent", f"state file {self.state_file}", f"{type(exc).__name__}: {exc}")
            self.log.error("state_not_applied", file=str(self.state_file), reason=str(self.load_failure))
            return False
        self.load_failure = None
        self.tracker.commit(pending)
        self._last_load_was_full = pending.changed_peers is None
        state = pending.state
        changed = "all" if pending.changed_peers is None else sorted(pending.changed_peers)[:20]
        self.log.info("state_accepted", file=str(self.state_file), segments=len(state.segments),
                      endpoints=len(state.endpoints), peers=len(state.peers), changed_peers=changed)
        return True

    def retry_failed(self) -> None:
        """Another attempt at what failed: the state file if it could not be taken on, else the kernel."""
        if self.load_failure is not None:
            self.handle_state_file()
        else:
            self.reconciler.retry()

    def _attempt(self, what: str, work: Callable[[], object], *, retry: bool = False) -> None:
        """Run one pass; whatever it raises is logged, never ends the loop; a failure schedules a retry."""
        self.pass_failure = None
        try:
            work()
        except Exception as exc:
            self.pass_failure = Failure("agent", what, f"{type(exc).__name__}: {exc}")
            self.log.exception("pass_failed", what=what)
        failure = self.failure
        now = time.monotonic()
        if failure is None:
            self.retry.succeeded()
        elif retry or self.retry.due_at is None:
            attempt = self.retry.failures + 1
            delay = self.retry.failed(now)
            emit = self.log.warning if retry else self.log.info
            emit("retry_failed" if retry else "retry_scheduled", failure=str(failure), attempt=attempt,
                 retry_in_seconds=round(delay, 2))
        self.report()

    def report(self) -> None:
        """Tell systemd: READY once the kernel first holds the state file's state; the status line always."""
        failure = self.failure
        desired = self.reconciler.desired
        if failure is not None:
            self.readiness.report(False, f"not applied, retrying: {failure}"[:200])
        elif desired is None:
            self.readiness.report(False, f"waiting for a valid state file {self.state_file}")
        else:
            self.readiness.report(True, f"state file applied: {len(desired.segments)} segments, "
                                        f"{len(desired.peers)} peers")

    def start(self) -> None:
        """The first pass: take on the state file and bring the kernel to it, reading everything back."""
        self.load_desired()
        settle_heap()
        self.reconciler.reconcile(full=True)
        if self.reconciler.failure is None:
            leftover = self.reconciler.converged()
            if leftover:
                self.log.warning("not_converged", ops=len(leftover), first=str(leftover[0]))

    def step(self, now: float) -> None:
        """One turn of the loop at monotonic time ``now``: a changed file, a due retry, a due resync."""
        if self._reload or stamp(self.state_file) != self._stamp:
            self._reload = False
            self._attempt("state file change", self.handle_state_file)
        if self.retry.due(now):
            self._attempt("retry", self.retry_failed, retry=True)
        if now >= self._next_resync:
            self._attempt("resync", lambda: self.reconciler.reconcile(full=True))
            self._next_resync = time.monotonic() + self.config.resync_interval

    def run(self) -> int:
        self.install_signal_handlers()
        self.log.info("starting", pid=os.getpid(), state_file=str(self.state_file),
                      resync_interval=self.config.resync_interval)
        self._attempt("start", self.start)
        self.log.info("ready", public_key=self.reconciler.public_key)
        self._next_resync = time.monotonic() + self.config.resync_interval
        while not self._stop:
            now = time.monotonic()
            waits = [POLL_SECONDS, self._next_resync - now]
            retry_in = self.retry.seconds_until_due(now)
            if retry_in is not None:
                waits.append(retry_in)
            self.readiness.alive()
            self._wake.wait(timeout=max(0.0, min(waits)))
            self._wake.clear()
            if self._stop:
                break
            self.step(time.monotonic())
        self.readiness.stopping("stopping; the data plane stays in place")
        self.log.info("stopping", note="data plane left in place; a restart adopts it")
        self.reconciler.close()
        return 0
