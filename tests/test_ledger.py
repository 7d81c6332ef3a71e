from __future__ import annotations

import asyncio
import os
import socket
import sqlite3
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from sidecar.ledger import (
    Ledger,
    LedgerUnavailable,
    RedisLedger,
    SpendRecorder,
    SqliteLedger,
    open_ledger,
)
from tests.redis_server import RedisServer, redis_server, redis_url  # noqa: F401

OpenLedger = Callable[[], Ledger]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(params=["sqlite", "redis"])
async def make_ledger(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[OpenLedger]:
    """Opens ledgers on one shared store, like replicas of one deployment."""
    if request.param == "sqlite":
        url = "sqlite:///state/ledger.db"
    else:
        url = request.getfixturevalue("redis_url")
    opened: list[Ledger] = []

    def make() -> Ledger:
        ledger = open_ledger(url, base_dir=tmp_path)
        opened.append(ledger)
        return ledger

    yield make
    for ledger in opened:
        await ledger.close()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# -- behaviour shared by every backend ----------------------------------------


async def test_spent_is_zero_initially(make_ledger: OpenLedger) -> None:
    assert await make_ledger().spent("nobody") == 0


async def test_add_spend_returns_running_totals(make_ledger: OpenLedger) -> None:
    ledger = make_ledger()
    assert await ledger.add_spend("checkout", 5) == 5
    assert await ledger.add_spend("checkout", 7) == 12
    assert await ledger.add_spend("search", 1) == 1
    assert await ledger.spent("checkout") == 12
    assert await ledger.spent("search") == 1


async def test_large_amounts_stay_exact(make_ledger: OpenLedger) -> None:
    ledger = make_ledger()
    big = 10**15  # a billion dollars, in micro-USD
    await ledger.add_spend("k", big)
    assert await ledger.add_spend("k", 1) == big + 1


async def test_two_replicas_adding_concurrently_lose_nothing(make_ledger: OpenLedger) -> None:
    pod_a, pod_b = make_ledger(), make_ledger()
    n = 200
    totals = await asyncio.gather(
        *(pod_a.add_spend("shared", 3) for _ in range(n)),
        *(pod_b.add_spend("shared", 5) for _ in range(n)),
    )
    expected = n * 3 + n * 5
    assert max(totals) == expected
    assert len(set(totals)) == len(totals)  # every addition saw its own total
    assert await make_ledger().spent("shared") == expected


# -- SQLite -------------------------------------------------------------------


async def test_sqlite_file_shared_by_two_connections(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "dir" / "ledger.db"
    first, second = SqliteLedger(path), SqliteLedger(path)
    try:
        await first.add_spend("k", 10)
        assert await second.add_spend("k", 1) == 11
        assert await first.spent("k") == 11
    finally:
        await first.close()
        await second.close()
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("SELECT micro_usd FROM spend WHERE access_key='k'").fetchone() == (11,)
    raw.close()


_CHILD = """
import asyncio, sys
from sidecar.ledger import SqliteLedger

async def main() -> None:
    ledger = SqliteLedger(sys.argv[1])
    await asyncio.gather(*(ledger.add_spend("shared", 7) for _ in range(100)))
    await ledger.close()

asyncio.run(main())
"""


async def test_sqlite_file_shared_by_two_processes(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    ledger = SqliteLedger(path)
    try:
        await ledger.spent("shared")  # create the file first
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _CHILD, str(path),
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        await asyncio.gather(*(ledger.add_spend("shared", 1) for _ in range(100)))
        assert await child.wait() == 0
        assert await ledger.spent("shared") == 100 * 7 + 100
    finally:
        await ledger.close()


async def test_sqlite_waits_for_a_lock_off_the_event_loop(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    ledger = SqliteLedger(path)
    await ledger.add_spend("k", 1)
    # Another process holds the write lock: the ledger must wait in its thread.
    blocker = sqlite3.connect(path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        adding = asyncio.create_task(ledger.add_spend("k", 2))
        ticks = 0
        for _ in range(20):
            await asyncio.sleep(0.005)
            ticks += 1
        assert ticks == 20
        assert not adding.done()  # still waiting on the lock, loop kept running
        blocker.execute("COMMIT")
        assert await adding == 3
    finally:
        blocker.close()
        await ledger.close()


async def test_sqlite_ticker_runs_while_ledger_works(tmp_path: Path) -> None:
    ledger = SqliteLedger(tmp_path / "ledger.db")
    ticks = 0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    try:
        for _ in range(50):
            await ledger.add_spend("k", 1)
    finally:
        stop.set()
        await task
        await ledger.close()
    assert ticks >= 50


async def test_sqlite_in_memory() -> None:
    ledger = open_ledger("sqlite://:memory:", base_dir=Path("/nonexistent"))
    try:
        assert await ledger.add_spend("k", 4) == 4
        assert await ledger.spent("k") == 4
    finally:
        await ledger.close()


async def test_sqlite_errors_become_ledger_unavailable(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    ledger = SqliteLedger(tmp_path / "file" / "ledger.db")  # parent is a file
    with pytest.raises(LedgerUnavailable, match="sqlite ledger"):
        await ledger.spent("k")
    await ledger.close()
    with pytest.raises(LedgerUnavailable, match="closed"):
        await ledger.spent("k")


# -- the SQLite file: modes, and a file deleted or replaced while in use ---------


def _files(db: Path) -> list[Path]:
    return [db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")]


def _stdlib_spent(db: Path, name: str) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT micro_usd FROM spend WHERE access_key = ?", (name,)).fetchone()
    finally:
        conn.close()
    return int(row[0]) if row else 0


async def test_sqlite_files_are_owner_only(tmp_path: Path) -> None:
    ledger = SqliteLedger(tmp_path / "new" / "ledger.db")
    try:
        await ledger.add_spend("k", 1)
        for f in _files(tmp_path / "new" / "ledger.db"):
            assert f.stat().st_mode & 0o777 == 0o600, f.name
    finally:
        await ledger.close()

    # A file an older version left 0644 is tightened when opened.
    old = tmp_path / "old.db"
    sqlite3.connect(old).close()
    old.chmod(0o644)
    ledger = SqliteLedger(old)
    try:
        assert await ledger.spent("k") == 0
        for f in _files(old):
            assert f.stat().st_mode & 0o777 == 0o600, f.name
    finally:
        await ledger.close()


async def test_sqlite_deleted_file_is_refused_not_written_behind(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    ledger = SqliteLedger(db)
    try:
        assert await ledger.add_spend("k", 5) == 5
        for f in _files(db):
            f.unlink()
        with pytest.raises(LedgerUnavailable, match="deleted or replaced"):
            await ledger.add_spend("k", 7)
        with pytest.raises(LedgerUnavailable, match="deleted or replaced"):
            await ledger.spent("k")
        assert not db.exists()  # not started afresh behind the operator's back
    finally:
        await ledger.close()


async def test_sqlite_file_deleted_after_start_but_before_first_use_is_refused(
    tmp_path: Path,
) -> None:
    """The ledger opens lazily: a file that was there at startup and is gone (or replaced)
    at the first use must not be made anew, as if the spend in it had never been."""
    db = tmp_path / "ledger.db"
    first = SqliteLedger(db)
    try:
        assert await first.add_spend("k", 52) == 52
    finally:
        await first.close()
    restarted = SqliteLedger(db)  # made at startup, not used yet
    try:
        for f in _files(db):
            f.unlink(missing_ok=True)
        with pytest.raises(LedgerUnavailable, match="deleted or replaced"):
            await restarted.add_spend("k", 52)
        assert not db.exists()
    finally:
        await restarted.close()
    fresh = SqliteLedger(db)  # a restart with no file at all starts an empty ledger
    try:
        assert await fresh.add_spend("k", 1) == 1
    finally:
        await fresh.close()


async def test_sqlite_file_moved_away_and_back_is_used_again(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    ledger = SqliteLedger(db)
    try:
        assert await ledger.add_spend("k", 5) == 5
        db.rename(tmp_path / "aside.db")
        with pytest.raises(LedgerUnavailable):
            await ledger.add_spend("k", 1)
        (tmp_path / "aside.db").rename(db)  # the same file (inode) again
        assert await ledger.add_spend("k", 2) == 7
    finally:
        await ledger.close()
    assert _stdlib_spent(db, "k") == 7


async def test_sqlite_replaced_file_is_refused_and_left_alone(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    ledger = SqliteLedger(db)
    try:
        await ledger.add_spend("k", 5)
        src, dst = sqlite3.connect(db), sqlite3.connect(tmp_path / "copy.db")
        src.backup(dst)
        src.close()
        dst.close()
        (tmp_path / "copy.db").replace(db)
        with pytest.raises(LedgerUnavailable, match="deleted or replaced"):
            await ledger.add_spend("k", 7)
    finally:
        await ledger.close()
    assert _stdlib_spent(db, "k") == 5


async def test_sqlite_lost_wal_is_checkpointed_and_reopened(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    ledger = SqliteLedger(db)
    other = SqliteLedger(db)  # another replica, opened after the -wal is gone
    try:
        assert await ledger.add_spend("k", 5) == 5
        for f in _files(db)[1:]:
            f.unlink()
        assert await ledger.add_spend("k", 7) == 12
        assert await other.spent("k") == 12
        assert await other.add_spend("k", 1) == 13
        assert await ledger.spent("k") == 13
    finally:
        await ledger.close()
        await other.close()
    assert _stdlib_spent(db, "k") == 13


async def test_sqlite_reader_never_creates_the_file(tmp_path: Path) -> None:
    """What `access-key list` uses: spend by name, without creating a ledger."""
    db = tmp_path / "state" / "ledger.db"
    reader = SqliteLedger(db, create=False)
    try:
        assert await reader.spent("k") == 0
        with pytest.raises(LedgerUnavailable, match="no ledger file"):
            await reader.add_spend("k", 1)
        assert not db.parent.exists()
        writer = SqliteLedger(db)
        try:
            await writer.add_spend("k", 9)
            assert await reader.spent("k") == 9  # shares the file once it exists
            assert await reader.spent("other") == 0
        finally:
            await writer.close()
    finally:
        await reader.close()


# -- open_ledger ----------------------------------------------------------------


def test_open_sqlite_paths(tmp_path: Path) -> None:
    absolute = open_ledger("sqlite:////var/lib/sidecar/ledger.db", base_dir=tmp_path)
    assert isinstance(absolute, SqliteLedger)
    assert absolute._path == Path("/var/lib/sidecar/ledger.db")
    relative = open_ledger("sqlite:///data/ledger.db", base_dir=tmp_path)
    assert isinstance(relative, SqliteLedger)
    assert relative._path == tmp_path / "data" / "ledger.db"


@pytest.mark.parametrize(
    "url",
    [
        "sqlite://",
        "sqlite:///",
        "sqlite://host/x.db",
        "postgres://user:hunter2@db/x",
        "hunter2",
        "memcached://:hunter2@h:1",
    ],
)
def test_open_rejects_bad_urls_without_leaking(url: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"ledger\.url") as info:
        open_ledger(url, base_dir=tmp_path)
    assert "hunter2" not in str(info.value)


async def test_open_redis_hides_password() -> None:
    for url in (
        "redis://:hunter2@127.0.0.1:6379/0",
        "redis://user:hunter2@127.0.0.1:6379/0",
        "rediss://127.0.0.1:6380/1?password=hunter2",
    ):
        ledger = open_ledger(url, base_dir=Path("."))
        assert isinstance(ledger, RedisLedger)
        assert "hunter2" not in repr(ledger)
        assert "***" in repr(ledger)
        await ledger.close()


# -- Redis ----------------------------------------------------------------------


async def test_unreachable_redis_fails_fast_without_leaking() -> None:
    ledger = open_ledger(f"redis://:hunter2@127.0.0.1:{closed_port()}/0", base_dir=Path("."))
    try:
        async with asyncio.timeout(5):
            with pytest.raises(LedgerUnavailable) as info:
                await ledger.add_spend("k", 1)
            with pytest.raises(LedgerUnavailable):
                await ledger.spent("k")
        assert "hunter2" not in str(info.value)
        assert "redis ledger" in str(info.value)
    finally:
        await ledger.close()


async def test_redis_survives_a_server_restart(redis_server: RedisServer) -> None:  # noqa: F811
    ledger = RedisLedger(redis_server.url)
    try:
        assert await ledger.add_spend("k", 1) == 1
        redis_server.stop()
        with pytest.raises(LedgerUnavailable):
            await ledger.add_spend("k", 1)
        redis_server.start()
        assert await ledger.add_spend("k", 2) == 2  # the server kept no data
    finally:
        await ledger.close()


# -- SpendRecorder ----------------------------------------------------------------


async def test_recorder_fail_open_keeps_spend_across_an_outage(
    redis_server: RedisServer,  # noqa: F811
) -> None:
    errors: list[Exception] = []
    ledger = RedisLedger(redis_server.url)
    operations: list[str] = []

    def on_error(operation: str, exc: LedgerUnavailable) -> None:
        operations.append(operation)
        errors.append(exc)

    recorder = SpendRecorder(ledger, fail_open=True, on_error=on_error, retry_interval=0)
    try:
        await recorder.record("k", 100)
        assert await recorder.spent("k") == 100
        assert recorder.pending == {}

        redis_server.stop()
        await recorder.record("k", 20)
        await recorder.record("k", 3)
        await recorder.record("other", 7)
        assert recorder.pending == {"k": 23, "other": 7}
        assert await recorder.spent("k") == 123  # last known + pending
        assert await recorder.flush() == 2
        assert errors
        assert all(isinstance(e, LedgerUnavailable) for e in errors)
        assert set(operations) == {"read", "write"}

        redis_server.start()  # same port, empty: only the outage's spend is new
        assert await recorder.flush() == 0
        assert recorder.pending == {}
        assert await ledger.spent("k") == 23
        assert await ledger.spent("other") == 7
        assert await recorder.spent("k") == 23
    finally:
        await ledger.close()


async def test_recorder_fail_closed_refuses_to_guess(redis_server: RedisServer) -> None:  # noqa: F811
    ledger = RedisLedger(redis_server.url)
    recorder = SpendRecorder(ledger, fail_open=False, retry_interval=0)
    try:
        await recorder.record("k", 5)
        assert await recorder.spent("k") == 5
        redis_server.stop()
        with pytest.raises(LedgerUnavailable):
            await recorder.spent("k")
        await recorder.record("k", 1)  # never raises
        assert recorder.pending == {"k": 1}
        redis_server.start()
        assert await recorder.spent("k") == 1  # empty server + pending
        assert await recorder.flush() == 0
        assert await recorder.spent("k") == 1
    finally:
        await ledger.close()


class FlakyLedger:
    """An in-memory ledger whose availability the test switches."""

    def __init__(self) -> None:
        self.totals: dict[str, int] = {}
        self.up = True
        self.calls = 0

    async def spent(self, name: str) -> int:
        self.calls += 1
        if not self.up:
            raise LedgerUnavailable("down")
        return self.totals.get(name, 0)

    async def add_spend(self, name: str, micro_usd: int) -> int:
        self.calls += 1
        if not self.up:
            raise LedgerUnavailable("down")
        self.totals[name] = self.totals.get(name, 0) + micro_usd
        return self.totals[name]

    async def close(self) -> None:
        pass


async def test_recorder_backs_off_after_a_failure() -> None:
    now = [0.0]
    flaky = FlakyLedger()
    recorder = SpendRecorder(flaky, fail_open=True, retry_interval=5, clock=lambda: now[0])
    await recorder.record("k", 10)
    flaky.up = False
    await recorder.record("k", 1)
    calls = flaky.calls
    assert await recorder.spent("k") == 11
    await recorder.record("k", 1)
    assert flaky.calls == calls  # backing off: no new backend calls
    flaky.up = True
    now[0] = 6.0
    await recorder.record("k", 1)  # pending travels with the new amount
    assert recorder.pending == {}
    assert flaky.totals == {"k": 13}


async def test_recorder_fail_closed_while_backing_off() -> None:
    flaky = FlakyLedger()
    recorder = SpendRecorder(flaky, fail_open=False, retry_interval=60)
    flaky.up = False
    await recorder.record("k", 1)
    flaky.up = True
    with pytest.raises(LedgerUnavailable):
        await recorder.spent("k")
    assert await recorder.flush() == 0  # flush always tries
    assert await recorder.spent("k") == 1


async def test_recorder_keeps_spend_when_cancelled() -> None:
    class Slow(FlakyLedger):
        async def add_spend(self, name: str, micro_usd: int) -> int:
            await asyncio.sleep(10)
            raise AssertionError("unreachable")

    recorder = SpendRecorder(Slow(), fail_open=True)
    task = asyncio.create_task(recorder.record("k", 9))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert recorder.pending == {"k": 9}


async def test_recorder_pending_is_read_only() -> None:
    recorder = SpendRecorder(FlakyLedger(), fail_open=True)
    with pytest.raises(TypeError):
        recorder.pending["k"] = 1  # type: ignore[index]


class ReadOnlyLedger(FlakyLedger):
    """Reads work; writes fail while `writable` is False (a read-only or immutable file)."""

    writable = False

    async def add_spend(self, name: str, micro_usd: int) -> int:
        if not self.writable:
            raise LedgerUnavailable("attempt to write a readonly database")
        return await super().add_spend(name, micro_usd)


async def test_recorder_fail_closed_refuses_while_spend_cannot_be_written() -> None:
    ledger = ReadOnlyLedger()
    health: list[bool] = []
    recorder = SpendRecorder(ledger, fail_open=False, retry_interval=0, on_health=health.append)
    assert await recorder.spent("k") == 0
    await recorder.record("k", 4)
    assert recorder.pending == {"k": 4}
    assert not recorder.healthy
    for _ in range(2):  # reads work, yet nothing more is served while spend is unwritten
        with pytest.raises(LedgerUnavailable, match="readonly"):
            await recorder.spent("k")
    assert recorder.pending == {"k": 4}
    ledger.writable = True
    assert await recorder.spent("k") == 4  # the pending spend is written first
    assert recorder.pending == {}
    assert recorder.healthy
    assert recorder.error is None
    assert health == [False, True]  # once per change, not per failure


async def test_recorder_fail_open_serves_from_memory_while_writes_fail() -> None:
    ledger = ReadOnlyLedger()
    health: list[bool] = []
    recorder = SpendRecorder(ledger, fail_open=True, retry_interval=0, on_health=health.append)
    await recorder.record("k", 4)
    await recorder.record("k", 1)
    assert await recorder.spent("k") == 5  # read works: ledger 0 + pending 5
    assert not recorder.healthy  # a good read does not hide unwritten spend
    assert recorder.error is None
    ledger.writable = True
    assert await recorder.flush() == 0
    assert recorder.healthy
    assert ledger.totals == {"k": 5}
    assert health == [False, True]
