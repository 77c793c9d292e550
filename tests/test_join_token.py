"""Reading the join token from a file or standard input (``veilnet-agent join --token-file``)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from veilnet_agent.control.enrollment import read_join_token
from veilnet_agent.core.errors import ValidationError

TOKEN = "vnjoin_" + "A" * 43


def write(path: Path, data: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


def test_a_token_file_with_a_trailing_newline(tmp_path: Path) -> None:
    warnings: list[str] = []
    assert read_join_token(str(write(tmp_path / "t", TOKEN.encode() + b"\n")), warnings.append) == TOKEN
    assert warnings == []


def test_standard_input(tmp_path: Path) -> None:
    assert read_join_token("-", print, stdin=io.StringIO(TOKEN + "\r\n")) == TOKEN


def test_a_pipe_is_read_without_a_mode_warning(tmp_path: Path) -> None:
    read_fd, write_fd = os.pipe()  # like --token-file <(pass show veilnet/host-a)
    os.write(write_fd, TOKEN.encode())
    os.close(write_fd)
    warnings: list[str] = []
    try:
        assert read_join_token(f"/proc/self/fd/{read_fd}", warnings.append) == TOKEN
    finally:
        os.close(read_fd)
    assert warnings == []


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o666])
def test_group_or_world_access_is_warned_about(tmp_path: Path, mode: int) -> None:
    warnings: list[str] = []
    path = write(tmp_path / "t", TOKEN.encode(), mode)
    assert read_join_token(str(path), warnings.append) == TOKEN
    assert len(warnings) == 1 and f"(mode {mode:04o})" in warnings[0] and f"chmod 600 {path}" in warnings[0]
    assert TOKEN not in warnings[0]


@pytest.mark.parametrize("data", [b"", b"\n", TOKEN.encode() + b"\n" + TOKEN.encode(), b"vnjoin_ a", b"\xff\xfe",
                                  b"x" * 5000], ids=["empty", "blank", "two-lines", "space", "binary", "huge"])
def test_anything_but_one_token_is_refused_without_echoing_it(tmp_path: Path, data: bytes) -> None:
    path = write(tmp_path / "t", data)
    with pytest.raises(ValidationError) as info:
        read_join_token(str(path), print)
    assert info.value.field == "--token-file" and info.value.value == str(path)
    assert TOKEN not in str(info.value)


def test_a_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match=r"--token-file: cannot be read: No such file or directory"):
        read_join_token(str(tmp_path / "missing"), print)
