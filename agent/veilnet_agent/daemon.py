"""The ``run`` loop: watch the state file, reconcile on change, resync on a timer."""

from __future__ import annotations

import gc
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from .config import AgentConfig
from .errors import ValidationError
from .logs import get_logger
from .reconciler import Outcome, Reconciler
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

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self._reload = True
        else:
            self._stop = True
        self._wake.set()

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)

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
                    return False
                self.reconciler.accept(pending.state, pending.changed_peers)
        except ValidationError as exc:
            self.log.error("state_rejected", field=exc.field, value=str(exc.value), reason=exc.reason,
                           file=str(self.state_file))
            return False
        self.tracker.commit(pending)
        self._last_load_was_full = pending.changed_peers is None
        state = pending.state
        changed = "all" if pending.changed_peers is None else sorted(pending.changed_peers)[:20]
        self.log.info("state_accepted", file=str(self.state_file), segments=len(state.segments),
                      endpoints=len(state.endpoints), peers=len(state.peers), changed_peers=changed)
        return True

    def run(self) -> int:
        self.install_signal_handlers()
        self.log.info("starting", pid=os.getpid(), state_file=str(self.state_file),
                      resync_interval=self.config.resync_interval)
        self.load_desired()
        settle_heap()
        self.reconciler.reconcile(full=True)
        leftover = self.reconciler.converged()
        if leftover:
            self.log.warning("not_converged", ops=len(leftover), first=str(leftover[0]))
        self.log.info("ready", public_key=self.reconciler.public_key)
        next_resync = time.monotonic() + self.config.resync_interval
        while not self._stop:
            self._wake.wait(timeout=min(POLL_SECONDS, max(0.0, next_resync - time.monotonic())))
            self._wake.clear()
            if self._stop:
                break
            if self._reload or stamp(self.state_file) != self._stamp:
                self._reload = False
                self.handle_state_file()
            if time.monotonic() >= next_resync:
                self.reconciler.reconcile(full=True)
                next_resync = time.monotonic() + self.config.resync_interval
        self.log.info("stopping", note="data plane left in place; a restart adopts it")
        self.reconciler.close()
        return 0
