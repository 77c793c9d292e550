"""The real-kernel harness itself (integration/vm/harness.py), on this host: a guest's exit status is the
command's, and every way a run can go wrong is a failure with a reason, never a pass or a skip.

Each boot takes ~10 s (three boots here); the checks that need no boot fail before qemu starts.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "vm"))
from harness import VmError, pick_kernel, run

pytestmark = pytest.mark.root

MINIMAL = ("vxlan",)  # one module: the boot stays short


def test_the_commands_exit_status_and_output_come_back(tmp_path: Path) -> None:
    """Exit status 3 from the guest is 3 here (a wrong status would turn a failed suite into a pass), the
    output is on the share, and the guest really is the stock kernel with the module loaded."""
    result = run(["sh", "-c", "uname -r; grep -c '^vxlan ' /proc/modules; exit 3"], modules=MINIMAL,
                 timeout=300, results=tmp_path / "vm", stream=False)
    assert result.status == 3
    output = result.output.read_text()
    assert pick_kernel().release in output, output
    assert "\n1\n" in output, output  # vxlan is loaded (a module there, not built in)
    assert result.boot_seconds is not None and result.boot_seconds < result.seconds


def test_a_hung_guest_is_a_failure_with_the_console_tail(tmp_path: Path) -> None:
    with pytest.raises(VmError, match=r"did not finish within 70 s \(hung\?\); console tail") as err:
        run(["sleep", "600"], modules=MINIMAL, timeout=70, results=tmp_path / "vm", stream=False)
    # and the guest's last snapshot (written every 30 s from boot) shows the process that never ended
    snapshot = str(err.value).split("heartbeat.log):", 1)[1]
    assert "sleep 600" in snapshot, snapshot


def test_a_guest_kernel_panic_is_a_failure(tmp_path: Path) -> None:
    with pytest.raises(VmError, match="ended without an exit status"):
        run(["sh", "-c", "echo c > /proc/sysrq-trigger; sleep 60"], modules=MINIMAL, timeout=300,
            results=tmp_path / "vm", stream=False)


def test_a_missing_module_fails_before_booting(tmp_path: Path) -> None:
    with pytest.raises(VmError, match="has no module no_such_module"):
        run(["true"], modules=("no_such_module",), timeout=60, results=tmp_path / "vm", stream=False)
    assert not (tmp_path / "vm" / "console.log").exists()  # qemu never started


def test_a_missing_kernel_is_named(tmp_path: Path) -> None:
    with pytest.raises(VmError, match="does not exist"):
        pick_kernel(str(tmp_path / "vmlinuz-none"))
