"""Atomic file replacement, shared by every writer of operator files (vault, config)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def atomic_write(path: Path, data: bytes, *, default_mode: int = 0o644) -> None:
    """Replace `path` so readers see the old file or the new one, never half of either.

    Temp file in the same directory, fsync, rename, fsync of the directory. A symlink
    is followed (the real file is replaced, the link kept) and an existing file keeps
    its mode. Raises `OSError`; callers translate it for their users.
    """
    real = Path(os.path.realpath(path))
    try:
        mode = os.stat(real).st_mode & 0o7777
    except FileNotFoundError:
        mode = default_mode
    fd, tmp = tempfile.mkstemp(prefix=f".{real.name}.", suffix=".tmp", dir=real.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, real)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(real.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
