"""The local API's own checks: who may call, and which socket directories are safe (root-free)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from veilnet_agent.control.local_api import Caller, directory_problem, refusal


def caller(uid: int, gid: int, groups: tuple[int, ...] | None = ()) -> Caller:
    return Caller(pid=4242, uid=uid, gid=gid, groups=groups, process="cni-plugin")


def test_only_root_and_the_socket_group_may_call() -> None:
    assert refusal(caller(0, 0), None, None) is None
    assert refusal(caller(0, 100), "runtime", 990) is None
    assert refusal(caller(1000, 990), "runtime", 990) is None  # primary group
    assert refusal(caller(1000, 100, (27, 990)), "runtime", 990) is None  # supplementary group
    why = refusal(caller(1000, 100, (27,)), "runtime", 990)
    assert why == "uid 1000 gid 100 is not root or a member of group runtime (controller.socket_group)"
    assert refusal(caller(1000, 0), None, None) is not None  # root's group is not root
    assert refusal(caller(1000, 100, None), "runtime", 990) is not None  # groups unreadable: judged on gid


def fake_stat(mode: int, uid: int = 0) -> os.stat_result:
    return os.stat_result((stat.S_IFDIR | mode, 1, 1, 2, uid, 0, 4096, 0, 0, 0))


@pytest.mark.parametrize(("mode", "uid", "problem"), [
    (0o755, 0, None),
    (0o700, 0, None),
    (0o1777, 0, None),  # like /tmp: root's socket cannot be removed or renamed by others
    (0o777, 0, "writable by others (mode 0777) without the sticky bit"),
    (0o775, 0, "writable by others (mode 0775) without the sticky bit"),
    (0o755, 1000, "owned by uid 1000, not root"),
    (0o1777, 1000, "owned by uid 1000, not root"),
])
def test_socket_directory_safety(mode: int, uid: int, problem: str | None) -> None:
    found = directory_problem(Path("/run/x"), fake_stat(mode, uid))
    assert found == (None if problem is None else f"/run/x is {problem}")
