"""Operator files (config, vault, private key): atomic replacement for every writer, and a
bounded read of regular files only for every reader."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from pathlib import Path
from typing import Final


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


#: Size bounds for the operator files the sidecar reads whole. Far above any real file
#: (a config is a few KiB; a vault holds ~1 KiB per access key or secret), low enough
#: that a wrong path cannot make the sidecar read gigabytes.
MAX_CONFIG_BYTES: Final = 4 << 20
MAX_VAULT_BYTES: Final = 32 << 20
MAX_KEY_BYTES: Final = 4 << 10

_KINDS: Final = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "another kind of file")


def not_regular_error(path: Path, mode: int) -> OSError:
    """The error for a path that is something other than a regular file (it names both)."""
    return OSError(errno.EINVAL, f"not a regular file: it is {_kind(mode)}", str(path))


def read_regular_file(path: Path, *, limit: int) -> bytes:
    """The whole content of the regular file at `path` (symlinks followed), at most `limit` bytes.

    Never blocks on a FIFO or device and never reads an endless one: anything but a
    regular file is refused before it is read (`O_NONBLOCK` on open, then `fstat` of the
    opened file, so a swap between the check and the open cannot slip through), and so
    is a file larger than `limit`. Raises `OSError` with `filename` set and a
    `strerror` fit for a user ("not a regular file: it is a FIFO", "larger than N bytes").
    """
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):  # do not even open a device
        raise not_regular_error(path, st.st_mode)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        exc.filename = str(path)
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise not_regular_error(path, st.st_mode)
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, min(limit + 1 - size, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise OSError(errno.EFBIG, f"larger than {limit} bytes", str(path))
        return b"".join(chunks)
    finally:
        os.close(fd)
