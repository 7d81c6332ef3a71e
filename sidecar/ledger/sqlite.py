"""The embedded ledger: one SQLite file, safe to share between processes.

All SQLite work runs on one dedicated thread that owns the connection, so
the event loop never waits on disk or on another process's lock. The file
is in WAL mode with a busy timeout; each addition is a single
`INSERT ... ON CONFLICT DO UPDATE ... RETURNING` in an immediate
transaction, so concurrent writers (threads or processes) never lose one
another's spend.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final, TypeVar

from sidecar.ledger.base import LedgerUnavailable

_T = TypeVar("_T")

MEMORY: Final = ":memory:"

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

    def __init__(self, path: str | Path, *, busy_timeout: float = 5.0) -> None:
        self._path = path if path == MEMORY else Path(path)
        self._busy_timeout = busy_timeout
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sidecar-ledger")
        self._conn: sqlite3.Connection | None = None  # touched only on the worker thread
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
        except (sqlite3.Error, OSError) as exc:
            raise LedgerUnavailable(
                f"sqlite ledger {self._path}: {type(exc).__name__}: {exc}"
            ) from exc

    # -- worker thread only --------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            if isinstance(self._path, Path):
                self._path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self._path, timeout=self._busy_timeout, isolation_level=None)
            try:
                conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
                self._setup(conn)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

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
        row = self._connection().execute(_GET, (name,)).fetchone()
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
        return int(row[0])

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
