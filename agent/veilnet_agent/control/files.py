"""Files that must never be seen half-written or with looser permissions than intended."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from ..core.errors import VeilnetError


def atomic_write(path: Path, data: bytes, mode: int) -> None:
    """Write via a temp file in the same directory, fsync, then rename over ``path``.

    The temp file is created with ``mode`` (and fchmod'ed past the umask) so the
    content is never visible with looser permissions than the final file.
    """
    parent = path.parent
    if not parent.exists():
        parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    for _ in range(100):
        tmp = parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), mode)
        except FileExistsError:
            continue
        break
    else:  # pragma: no cover - 100 collisions of random names
        raise VeilnetError(f"cannot create a temporary file next to {path}")
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
