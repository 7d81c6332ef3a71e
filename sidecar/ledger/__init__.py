"""Spend storage for managed-key credits, behind one small interface.

`open_ledger(url)` picks the backend from the config's `ledger.url`:

| url | backend |
|---|---|
| `sqlite:////var/lib/sidecar/ledger.db` | SQLite file, absolute path (4 slashes) |
| `sqlite:///ledger.db` | SQLite file relative to `base_dir` (the config file's folder) |
| `sqlite://:memory:` | SQLite in memory (tests; lost on exit) |
| `redis://[:password@]host:port/db`, `rediss://...` | a Redis hash shared by every replica |

Opening does no I/O; the first call connects.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from sidecar.ledger.base import Ledger, LedgerUnavailable, SpendRecorder
from sidecar.ledger.sqlite import MEMORY, SqliteLedger
from sidecar.ledger.urls import parse_ledger_url, redact_url

if TYPE_CHECKING:
    from sidecar.ledger.redis import RedisLedger

__all__ = [
    "Ledger",
    "LedgerUnavailable",
    "RedisLedger",
    "SpendRecorder",
    "SqliteLedger",
    "open_ledger",
    "parse_ledger_url",
    "redact_url",
]


def __getattr__(name: str) -> Any:
    # The Redis client is imported only when a Redis ledger is used: every config load
    # (check, CLI edits) would otherwise pay for it.
    if name == "RedisLedger":
        from sidecar.ledger.redis import RedisLedger

        return RedisLedger
    raise AttributeError(name)


def open_ledger(url: str, *, base_dir: Path, create: bool = True) -> Ledger:
    """The ledger a `ledger.url` names. Raises ValueError for an unusable URL.

    `create=False` (readers such as `access-key list`) never creates a SQLite file.
    Error messages never contain a password from the URL.
    """
    try:
        kind, target = parse_ledger_url(url)
    except ValueError as exc:
        raise ValueError(f"ledger.url: {exc}") from None
    if kind == "redis":
        from sidecar.ledger.redis import RedisLedger

        return RedisLedger(target)
    if target == MEMORY:
        return SqliteLedger(MEMORY)
    path = Path(target) if target.startswith("/") else base_dir / target
    return SqliteLedger(path, create=create)
