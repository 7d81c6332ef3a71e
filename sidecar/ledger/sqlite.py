"""The embedded ledger: one SQLite file, safe to share between processes.

All SQLite work runs on one dedicated thread that owns the connection, so
the event loop never waits on disk or on another process's lock. The file
is in WAL mode with a busy timeout; each addition is a single
`INSERT ... ON CONFLICT DO UPDATE ... RETURNING` in an immediate
transaction, so concurrent writers (threads or processes) never lose one
another's spend.

The file is created once, owner-only (0600; SQLite gives `-wal` and `-shm`
the same mode), and never again: an open connection keeps writing to a file
that was deleted or replaced, where the spend is lost, so every operation
first checks that the path still names the file that was opened, and a
write checks again after it commits. A deleted or replaced file makes the
ledger unavailable until the same file is back at the path (a restart
opens whatever is there then, creating an empty ledger if nothing is).
`-wal`/`-shm` deleted under a live database file are recovered: this
connection's log is checkpointed into the file, then it reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import stat
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final, TypeVar

from sidecar.ledger.base import LedgerUnavailable

_T = TypeVar("_T")

MEMORY: Final = ":memory:"
_MODE: Final = 0o600
_SIDE_FILES: Final = ("-wal", "-shm")
_GONE: Final = (
    "the file was deleted or replaced while in use; spend is kept off it until that "
    "file is back at the path (a restart opens whatever file is there then)"
)

#: (st_dev, st_ino) of a file, or None when nothing is at the path.
FileId = tuple[int, int] | None


class _FileChanged(OSError):
    """The ledger's path no longer names the file this process opened."""


class _NoFile(OSError):
    """A ledger opened with `create=False` has no file yet."""


_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS spend (
    access_key TEXT PRIMARY KEY,
    micro_usd INTEGER NOT NULL
)
"""
_ADD: Final = """
INSERT INTO spend (access_key, micro_usd) VALUES (?, ?)
ON CONFLICT (access_key) DO UPDATE SET micro_usd = micro_usd + excluded.micro_usd
RETURNING micro_usd
"""
_GET: Final = "SELECT micro_usd FROM spend WHERE access_key = ?"


class SqliteLedger:
    """Spend per access key in an SQLite file (or `:memory:`)."""

    def __init__(self, path: str | Path, *, busy_timeout: float = 5.0, create: bool = True) -> None:
        """`create=False` (readers such as the CLI): never create the file or its folder;
        `spent` answers 0 while there is no file, `add_spend` raises LedgerUnavailable."""
        self._path = path if path == MEMORY else Path(path)
        self._busy_timeout = busy_timeout
        self._create = create
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sidecar-ledger")
        # Touched only on the worker thread:
        self._conn: sqlite3.Connection | None = None
        self._db_id: FileId = None  # the database file opened first; never replaced
        # The file there when this ledger was made (at startup): the ledger opens lazily,
        # and one deleted or replaced before the first use must not be silently made anew.
        self._start_id: FileId = None
        if isinstance(self._path, Path):
            with contextlib.suppress(OSError):  # unreadable now: the first use will say why
                self._start_id = _file_id(self._path)
        self._side_ids: tuple[FileId, ...] = ()  # -wal and -shm of the open connection
        self._closed = False

    def __repr__(self) -> str:
        return f"SqliteLedger({str(self._path)!r})"

    async def spent(self, name: str) -> int:
        return await self._run(self._spent, name)

    async def add_spend(self, name: str, micro_usd: int) -> int:
        if type(micro_usd) is not int:
            raise TypeError("micro_usd must be an int")
        return await self._run(self._add, name, micro_usd)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._close)
        finally:
            self._executor.shutdown(wait=False)

    async def _run(self, fn: Callable[..., _T], *args: Any) -> _T:
        if self._closed:
            raise LedgerUnavailable(f"sqlite ledger {self._path}: closed")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        except (_FileChanged, _NoFile) as exc:
            raise LedgerUnavailable(f"sqlite ledger {self._path}: {exc}") from exc
        except (sqlite3.Error, OSError) as exc:
            raise LedgerUnavailable(
                f"sqlite ledger {self._path}: {type(exc).__name__}: {exc}"
            ) from exc

    # -- worker thread only --------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        if isinstance(self._path, Path):
            self._check_files(self._path)
        if self._conn is None:
            self._conn = self._open()
        return self._conn

    def _open(self) -> sqlite3.Connection:
        target: str | Path = self._path
        if isinstance(self._path, Path):
            self._create_private(self._path)
            # mode=rw: SQLite itself never creates the file (a deleted one stays deleted).
            target = f"{self._path.absolute().as_uri()}?mode=rw"
        conn = sqlite3.connect(target, timeout=self._busy_timeout, isolation_level=None, uri=True)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
            self._setup(conn)
            if isinstance(self._path, Path):
                self._remember_files(self._path)
        except BaseException:
            conn.close()
            raise
        return conn

    def _create_private(self, path: Path) -> None:
        """Create the file 0600 the first time; later, only the file first opened will do."""
        if self._db_id is not None:
            if _file_id(path) != self._db_id:
                raise _FileChanged(_GONE)
            return
        if self._start_id is not None and _file_id(path) != self._start_id:
            raise _FileChanged(_GONE)
        if not self._create:
            if _file_id(path) is None:
                raise _NoFile(f"no ledger file at {path}")
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, _MODE)
            os.close(fd)
        for p in (path, *_side_paths(path)):
            _make_private(p)

    def _remember_files(self, path: Path) -> None:
        db_id = _file_id(path)
        if self._db_id is None:
            self._db_id = db_id
        elif db_id != self._db_id:
            raise _FileChanged(_GONE)
        self._side_ids = tuple(_file_id(p) for p in _side_paths(path))

    def _check_files(self, path: Path) -> None:
        """Refuse a deleted or replaced database file; reconnect after lost -wal/-shm."""
        if self._db_id is None:
            return
        if _file_id(path) != self._db_id:
            self._drop()
            raise _FileChanged(_GONE)
        if self._conn is not None and self._side_ids != tuple(
            _file_id(p) for p in _side_paths(path)
        ):
            # Our commits in the unlinked -wal are not in the database file yet: copy them
            # in through this connection's own (still open) log, then reconnect.
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            self._drop()

    def _drop(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.close()

    def _setup(self, conn: sqlite3.Connection) -> None:
        """WAL mode and the table. Switching the journal mode does not wait on the busy
        handler, so replicas opening a fresh file together retry here (worker thread)."""
        deadline = time.monotonic() + self._busy_timeout
        while True:
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute(_SCHEMA)
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def _spent(self, name: str) -> int:
        try:
            conn = self._connection()
        except _NoFile:
            return 0  # a reader before any spend was written
        row = conn.execute(_GET, (name,)).fetchone()
        return int(row[0]) if row else 0

    def _add(self, name: str, micro_usd: int) -> int:
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            cur = conn.execute(_ADD, (name, micro_usd))
            row = cur.fetchone()
            cur.close()
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        if isinstance(self._path, Path) and _file_id(self._path) != self._db_id:
            # Deleted or replaced during the write: it went to a file nobody will read.
            self._drop()
            raise _FileChanged(_GONE)
        return int(row[0])

    def _close(self) -> None:
        self._drop()


def _file_id(path: Path) -> FileId:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino)


def _side_paths(path: Path) -> tuple[Path, ...]:
    return tuple(path.with_name(path.name + suffix) for suffix in _SIDE_FILES)


def _make_private(path: Path) -> None:
    """Drop group/other access from a ledger file this user owns (older versions made 0644)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return
    if st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(path, stat.S_IMODE(st.st_mode) & ~0o077)
