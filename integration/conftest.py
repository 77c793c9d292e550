"""Fixtures and hooks for the namespace-based end-to-end tests.

Tests marked ``root`` need root and the tools the lab uses. Without them the
run FAILS (a skipped data-plane test must never look like a pass); a developer
without root can deselect them explicitly with ``-m "not root"``.

When a test that uses a lab fails, every agent's log (from where the test
started) is attached to the failure report.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lab import Lab

REQUIRED_TOOLS = ("ip", "bridge", "nsenter", "unshare", "wg", "wireguard-go", "tcpdump", "ping")
LOG_TAIL_LINES = 400

_log_marks = pytest.StashKey[dict[str, int]]()


def _missing_requirements() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
    if missing:
        return "missing tools: " + ", ".join(missing)
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
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


def _labs_of(item: pytest.Item) -> list[Lab]:
    funcargs: dict[str, Any] = getattr(item, "funcargs", {}) or {}
    return [v for v in funcargs.values() if isinstance(v, Lab)]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    rep = outcome.get_result()
    labs = _labs_of(item)
    if rep.when == "setup" and rep.passed:
        item.stash[_log_marks] = {
            f"{lab.prefix}/{name}": host.log_offset()
            for lab in labs
            for name, host in lab.hosts.items()
        }
    if rep.failed and labs:
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
