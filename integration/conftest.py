"""Fixtures and hooks for the namespace-based end-to-end tests.

Tests marked ``root`` need root and the tools the lab uses. Without them the
run FAILS (a skipped data-plane test must never look like a pass); a developer
without root can deselect them explicitly with ``-m "not root"``.

When a test that uses a lab or a controller fails, every agent's log (from
where the test started) is attached to the failure report, and everything
needed to understand it is kept under one results directory
(``$VEILNET_RESULTS``, default ``out/`` in the repository), in
``failures/<test>/``: the controller's log, each host's agent log, nft
ruleset, ``wg show``, links, addresses, FDB and neighbour entries, and every
pcap the test captured. ``.ci/run`` prints where it is and the tails.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lab as lab_module
from ctl import ControllerProcess
from lab import Lab, results_dir

REQUIRED_TOOLS = ("ip", "bridge", "nsenter", "unshare", "wg", "wireguard-go", "tcpdump", "ping")
LOG_TAIL_LINES = 400

_log_marks = pytest.StashKey[dict[str, int]]()
_capture_mark = pytest.StashKey[int]()
REPO_ROOT = Path(__file__).resolve().parents[1]


def pytest_sessionstart(session: pytest.Session) -> None:
    # Diagnostics of an earlier run must not be mistaken for this one's.
    shutil.rmtree(results_dir() / "failures", ignore_errors=True)


def _missing_requirements() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
    if missing:
        return "missing tools: " + ", ".join(missing)
    return None


@pytest.hookimpl(trylast=True)  # after -m has deselected what was not asked for
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("VEILNET_REALKERNEL") != "1" and any("realkernel" in item.keywords for item in items):
        # A real-kernel test on a kernel without the modules would fail for the wrong reason, or be skipped.
        raise pytest.UsageError(
            "real-kernel tests selected outside the VM; run them with integration/vm/run -- "
            '.venv/bin/python -m pytest -m realkernel integration/, or deselect them with -m "not realkernel"'
        )
    reason = _missing_requirements()
    if reason is None or not any("root" in item.keywords for item in items):
        return
    raise pytest.UsageError(
        f"root integration tests selected but {reason}; run as root after scripts/bootstrap, "
        'or deselect them with -m "not root"'
    )


_ns_counter = itertools.count(1)


@pytest.fixture
def make_ns(request: pytest.FixtureRequest) -> Iterator[Callable[[], str]]:
    """Create throw-away network namespaces (``vnt-<module>-<pid>-<n>``), deleted even when the test fails."""
    tag = request.module.__name__.rsplit("_", 1)[-1][:6]
    created: list[str] = []

    def make() -> str:
        name = f"vnt-{tag}-{os.getpid()}-{next(_ns_counter)}"
        subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
        created.append(name)
        return name

    yield make
    for name in reversed(created):
        subprocess.run(["ip", "netns", "del", name], check=False)


def _found_in(value: Any, depth: int = 2) -> Iterator[Any]:
    """``value`` and what it holds (fixtures return tuples like ``(lab, receivers)``)."""
    yield value
    if depth and isinstance(value, tuple | list):
        for v in value:
            yield from _found_in(v, depth - 1)
    elif depth and isinstance(value, dict):
        for v in value.values():
            yield from _found_in(v, depth - 1)


def _objects_of(item: pytest.Item) -> tuple[list[Lab], list[ControllerProcess]]:
    funcargs: dict[str, Any] = getattr(item, "funcargs", {}) or {}
    labs: list[Lab] = []
    controllers: list[ControllerProcess] = []
    for value in funcargs.values():
        for v in _found_in(value):
            if isinstance(v, Lab) and v not in labs:
                labs.append(v)
            elif isinstance(v, ControllerProcess) and v not in controllers:
                controllers.append(v)
    controllers = [c for c in controllers if all(lab.controller is not c for lab in labs)]
    return labs, controllers


def _keep_diagnostics(item: pytest.Item, rep: pytest.TestReport, labs: list[Lab],
                      controllers: list[ControllerProcess], pcaps: list[Path]) -> Path:
    dest = results_dir() / "failures" / re.sub(r"[^\w.-]+", "_", item.nodeid).strip("_")[:200]
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "failure.txt").write_text(f"{item.nodeid} ({rep.when})\n\n{rep.longreprtext}\n")
    for lab in labs:
        with contextlib.suppress(Exception):
            lab.collect_diagnostics(dest / lab.prefix)
    for i, ctl in enumerate(controllers):
        with contextlib.suppress(OSError):
            if ctl.log_path.exists():
                shutil.copyfile(ctl.log_path, dest / f"controller-{i}.log")
    for pcap in pcaps:
        with contextlib.suppress(OSError):
            if pcap.exists():
                (dest / "pcaps").mkdir(exist_ok=True)
                shutil.copyfile(pcap, dest / "pcaps" / pcap.name)
    return dest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    rep = outcome.get_result()
    labs, controllers = _objects_of(item)
    if rep.when == "setup":
        item.stash[_capture_mark] = len(lab_module.CAPTURES)
    if rep.when == "setup" and rep.passed:
        item.stash[_log_marks] = {
            f"{lab.prefix}/{name}": host.log_offset()
            for lab in labs
            for name, host in lab.hosts.items()
        }
    if not rep.failed:
        return
    pcaps = lab_module.CAPTURES[item.stash.get(_capture_mark, len(lab_module.CAPTURES)):]
    if labs or controllers or pcaps:
        dest = _keep_diagnostics(item, rep, labs, controllers, pcaps)
        rep.sections.append(("diagnostics", f"kept in {dest}"))
    if labs:
        marks = item.stash.get(_log_marks, {})
        for lab in labs:
            for name, host in lab.hosts.items():
                since = marks.get(f"{lab.prefix}/{name}", 0)
                lines = host.log_text(since).splitlines()
                what = "since test start"
                if not lines:  # quiet during the test: show how it got here
                    lines, what = host.log_text().splitlines()[-50:], "nothing since test start; tail"
                if len(lines) > LOG_TAIL_LINES:
                    lines, what = lines[-LOG_TAIL_LINES:], f"{what}, last {LOG_TAIL_LINES} lines"
                running = "running" if host.agent_running() else "NOT running"
                header = f"agent log {lab.prefix}/{name} (agent {running}; {host.log_path}; {what})"
                rep.sections.append((header, "\n".join(lines) or "(empty)"))
