"""Unit-test session hooks: the fuzz targets' input counts are printed at the end of every run."""

from __future__ import annotations

import json
import os
from typing import Any


def pytest_terminal_summary(terminalreporter: Any) -> None:
    import sys

    fuzzing = sys.modules.get("fuzzing")
    if fuzzing is None or not fuzzing.COUNTS:
        return
    counts = dict(sorted(fuzzing.COUNTS.items()))
    terminalreporter.section(f"fuzz inputs per target (profile {fuzzing.PROFILE})")
    for target, n in counts.items():
        terminalreporter.write_line(f"{target:32} {n:>9,}")
    terminalreporter.write_line(f"{'total':32} {sum(counts.values()):>9,}")
    report = os.environ.get("VEILNET_FUZZ_REPORT")
    if report:
        with open(report, "w") as f:
            json.dump(counts, f)
