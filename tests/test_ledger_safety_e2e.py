"""The SQLite ledger never loses spend silently (issue #10), on real `sidecar serve` processes.

A ledger file deleted, replaced or made unwritable while the sidecar runs must
not swallow spend: under `fail_closed` nothing more is served whose spend cannot
be recorded; under `fail_open` requests are served, the spend is kept in memory,
and whatever is still unwritten at exit is logged per access-key name. Every
case is surfaced on /readyz, on /metrics and once in the operational log.

Making a file unwritable as root needs the immutable attribute (`chattr +i`),
which only some filesystems support; that test is skipped elsewhere.
"""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from tests.harness import Env, Process, metric_value, spawn_sidecar
from tests.test_credits_e2e import (
    CHAT_IN,
    CHAT_OUT,
    MANAGED_OPENAI,
    MOCK_OUTPUT_TOKENS,
    PRICES,
    eventually,
    mock_log,
    providers_yaml,
    sqlite_spent,
)

PER_REQUEST = 3 * CHAT_IN + MOCK_OUTPUT_TOKENS * CHAT_OUT  # "one two three" on gpt-4o-mini
PROMPT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "one two three"}]}
NAME = "spender"


def _config(env: Env, on_unavailable: str) -> Path:
    env.write_config(
        "shutdown_grace: 2s\n"
        + providers_yaml(env)
        + f'ledger: {{url: "sqlite:///ledger.db", on_unavailable: {on_unavailable}}}\n'
        + PRICES
    )
    return env.config


def _ledger_files(env: Env) -> list[Path]:
    db = env.dir / "ledger.db"
    return [db, db.with_name("ledger.db-wal"), db.with_name("ledger.db-shm")]


class Running:
    """One sidecar process and a client session on it."""

    def __init__(self, p: Process, http: aiohttp.ClientSession, token: str) -> None:
        self.p, self.http, self.token = p, http, token
        self.base = f"http://127.0.0.1:{p.proxy_port}"
        self.admin = f"http://127.0.0.1:{p.admin_port}"

    async def chat(self) -> tuple[int, str | None]:
        headers = {"authorization": f"Bearer {self.token}"}
        async with self.http.post(
            self.base + "/v1/chat/completions", json=PROMPT, headers=headers
        ) as r:
            body = await r.json()
            return r.status, (body.get("error") or {}).get("code")

    async def readyz(self) -> tuple[int, dict[str, Any]]:
        async with self.http.get(self.admin + "/readyz") as r:
            return r.status, await r.json()

    async def metric(self, name: str, **labels: str) -> float:
        async with self.http.get(self.admin + "/metrics") as r:
            return metric_value(await r.text(), name, **labels)

    async def stop(self) -> int:
        return await asyncio.to_thread(self.p.stop, 30.0)

    def events(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.p.lines() if r.get("event") == name]


async def _spawn(env: Env, config: Path, token: str, http: aiohttp.ClientSession) -> Running:
    p = await asyncio.to_thread(spawn_sidecar, config, env.dir / "access.log")
    return Running(p, http, token)


@pytest.fixture
def processes() -> Iterator[list[Running]]:
    started: list[Running] = []
    yield started
    for r in started:
        if r.p.proc.poll() is None:
            r.p.proc.kill()
            r.p.proc.wait(10)


async def _start(env: Env, config: Path, token: str, http: aiohttp.ClientSession,
                 processes: list[Running]) -> Running:  # fmt: skip
    sc = await _spawn(env, config, token, http)
    processes.append(sc)
    return sc


async def _ledger_shows(env: Env, micro_usd: int) -> None:
    async def probe() -> int:
        return sqlite_spent(env.dir / "ledger.db", NAME)

    await eventually(probe, micro_usd)


async def _assert_ledger_failing(sc: Running, *, pending: int) -> None:
    status, body = await sc.readyz()
    assert status == 200  # still useful for traffic that needs no ledger
    assert body["status"] == "ready"
    assert body["ledger"]["status"] == "failing"
    assert body["ledger"]["pending_usd"] == pending / 1e6
    assert body["ledger"]["error"]
    assert await sc.metric("sidecar_ledger_up") == 0
    assert await sc.metric("sidecar_ledger_errors_total") >= 1
    assert await sc.metric("sidecar_ledger_pending_spend_usd") == pending / 1e6


async def _assert_ledger_ok(sc: Running) -> None:
    status, body = await sc.readyz()
    assert (status, body["status"], body["ledger"]["status"]) == (200, "ready", "ok")
    assert body["ledger"]["pending_usd"] == 0
    assert await sc.metric("sidecar_ledger_up") == 1


def _no_secret_in(sc: Running, *secrets: str) -> None:
    text = sc.p.stderr_path.read_text()
    for value in secrets:
        assert value not in text


# --------------------------------------------------------------------------- deleted


async def test_deleted_ledger_fail_closed_serves_nothing_more_and_is_not_written_behind(
    env: Env, mock_server: TestServer, http: aiohttp.ClientSession, processes: list[Running]
) -> None:
    token = env.access_key(NAME, credits=1000)
    config = _config(env, "fail_closed")
    sc = await _start(env, config, token, http, processes)
    assert await sc.chat() == (200, None)
    await _ledger_shows(env, PER_REQUEST)
    await _assert_ledger_ok(sc)

    for f in _ledger_files(env):
        f.unlink()
    for _ in range(3):
        assert await sc.chat() == (503, "ledger_unavailable")
    assert len(await mock_log(mock_server)) == 1  # nothing unrecorded reached the provider
    await _assert_ledger_failing(sc, pending=0)
    assert not (env.dir / "ledger.db").exists()  # not silently started afresh
    down = sc.events("ledger_unavailable")
    assert len(down) == 1  # once per transition, not per request
    assert down[0]["level"] == "error"
    assert "deleted or replaced" in down[0]["error"]

    assert await sc.stop() == 0
    assert sc.events("ledger_spend_lost_at_exit") == []  # nothing was served unrecorded
    _no_secret_in(sc, token, MANAGED_OPENAI)

    # A restart starts an empty ledger: exactly what is served from then on is charged.
    sc = await _start(env, config, token, http, processes)
    await _assert_ledger_ok(sc)
    assert await sc.chat() == (200, None)
    await _ledger_shows(env, PER_REQUEST)
    assert await sc.stop() == 0
    assert sqlite_spent(env.dir / "ledger.db", NAME) == PER_REQUEST
    assert len(await mock_log(mock_server)) == 2


async def test_deleted_ledger_fail_open_serves_and_reports_unwritten_spend_at_exit(
    env: Env, mock_server: TestServer, http: aiohttp.ClientSession, processes: list[Running]
) -> None:
    token = env.access_key(NAME, credits=1000)
    sc = await _start(env, _config(env, "fail_open"), token, http, processes)
    assert await sc.chat() == (200, None)
    await _ledger_shows(env, PER_REQUEST)

    for f in _ledger_files(env):
        f.unlink()
    for _ in range(2):
        assert await sc.chat() == (200, None)

    async def pending() -> float:
        return await sc.metric("sidecar_ledger_pending_spend_usd")

    await eventually(pending, 2 * PER_REQUEST / 1e6)
    await _assert_ledger_failing(sc, pending=2 * PER_REQUEST)
    assert not (env.dir / "ledger.db").exists()
    assert len(sc.events("ledger_unavailable")) == 1

    assert await sc.stop() == 0
    lost = sc.events("ledger_spend_lost_at_exit")
    assert len(lost) == 1
    assert lost[0]["level"] == "error"
    assert lost[0]["micro_usd"] == 2 * PER_REQUEST
    assert lost[0]["by_access_key"] == {NAME: 2 * PER_REQUEST}
    _no_secret_in(sc, token, MANAGED_OPENAI)


# --------------------------------------------------------------------------- replaced


def _backup(db: Path, to: Path) -> None:
    """A consistent copy of a live WAL-mode database (what an operator's restore puts back)."""
    src, dst = sqlite3.connect(db), sqlite3.connect(to)
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()


async def test_replaced_ledger_is_not_written_behind_and_restart_totals_are_exact(
    env: Env, mock_server: TestServer, http: aiohttp.ClientSession, processes: list[Running]
) -> None:
    token = env.access_key(NAME, credits=1000)
    config = _config(env, "fail_closed")
    sc = await _start(env, config, token, http, processes)
    assert await sc.chat() == (200, None)
    await _ledger_shows(env, PER_REQUEST)

    db = env.dir / "ledger.db"
    _backup(db, env.dir / "restored.db")
    (env.dir / "restored.db").replace(db)  # a new inode at the ledger's path
    assert await sc.chat() == (503, "ledger_unavailable")
    await _assert_ledger_failing(sc, pending=0)
    assert await sc.stop() == 0

    sc = await _start(env, config, token, http, processes)
    assert await sc.chat() == (200, None)
    await _ledger_shows(env, 2 * PER_REQUEST)  # every served request, each once
    assert await sc.stop() == 0
    assert sqlite_spent(db, NAME) == 2 * PER_REQUEST
    assert len(await mock_log(mock_server)) == 2


# --------------------------------------------------------------------------- unwritable


def _chattr(flag: str, *paths: Path) -> bool:
    if shutil.which("chattr") is None:
        return False
    done = subprocess.run(["chattr", flag, *map(str, paths)], capture_output=True, check=False)
    return done.returncode == 0


async def test_unwritable_ledger_fail_closed_stops_serving_until_spend_is_written(
    env: Env, mock_server: TestServer, http: aiohttp.ClientSession, processes: list[Running]
) -> None:
    token = env.access_key(NAME, credits=1000)
    config = _config(env, "fail_closed")
    sc = await _start(env, config, token, http, processes)
    assert await sc.chat() == (200, None)
    await _ledger_shows(env, PER_REQUEST)

    # Tests run as root, which ignores modes: the immutable attribute stops root too.
    # Not on -shm: SQLite maps it, and a write to an immutable mapping kills the process.
    files = _ledger_files(env)[:2]
    if not _chattr("+i", *files):
        pytest.skip("this filesystem does not support chattr +i")
    try:
        # Reads still work, so the first request is served; its spend cannot be written.
        assert await sc.chat() == (200, None)

        async def pending() -> float:
            return await sc.metric("sidecar_ledger_pending_spend_usd")

        await eventually(pending, PER_REQUEST / 1e6)
        # Spread past the recorder's 1 s back-off: refused because spend is unwritten,
        # not merely because a failure was recent.
        for _ in range(3):
            assert await sc.chat() == (503, "ledger_unavailable")
            await asyncio.sleep(0.6)
        assert len(await mock_log(mock_server)) == 2
        await _assert_ledger_failing(sc, pending=PER_REQUEST)
        assert len(sc.events("ledger_unavailable")) == 1
    finally:
        assert _chattr("-i", *files)

    # Writable again: the next request (once the 1 s back-off is over) first writes the
    # pending spend, then is served; refused attempts before that reach no provider.
    await eventually(sc.chat, (200, None))
    assert await pending() == 0
    await _ledger_shows(env, 3 * PER_REQUEST)
    await _assert_ledger_ok(sc)
    assert len(sc.events("ledger_recovered")) == 1
    assert await sc.stop() == 0
    assert sc.events("ledger_spend_lost_at_exit") == []

    sc = await _start(env, config, token, http, processes)
    assert await sc.stop() == 0
    assert sqlite_spent(env.dir / "ledger.db", NAME) == 3 * PER_REQUEST
    assert len(await mock_log(mock_server)) == 3


# --------------------------------------------------------------------------- file modes


async def test_ledger_files_are_private(
    env: Env, mock_server: TestServer, http: aiohttp.ClientSession, processes: list[Running]
) -> None:
    token = env.access_key(NAME, credits=1000)
    sc = await _start(env, _config(env, "fail_closed"), token, http, processes)
    assert await sc.chat() == (200, None)
    await _ledger_shows(env, PER_REQUEST)
    for f in _ledger_files(env):
        assert f.stat().st_mode & 0o777 == 0o600, f.name
    assert await sc.stop() == 0
