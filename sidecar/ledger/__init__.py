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

from sidecar.ledger.base import Ledger, LedgerUnavailable, SpendRecorder
from sidecar.ledger.redis import RedisLedger, redact_url
from sidecar.ledger.sqlite import MEMORY, SqliteLedger

__all__ = [
    "Ledger",
    "LedgerUnavailable",
    "RedisLedger",
    "SpendRecorder",
    "SqliteLedger",
    "open_ledger",
]

_SQLITE = "sqlite://"


def open_ledger(url: str, *, base_dir: Path) -> Ledger:
    """The ledger a `ledger.url` names. Raises ValueError for an unusable URL.

    Error messages never contain a password from the URL.
    """
    if url.startswith(_SQLITE):
        rest = url[len(_SQLITE) :]
        if rest == MEMORY:
            return SqliteLedger(MEMORY)
        if not rest.startswith("/") or rest == "/":
            raise ValueError(
                "ledger.url: expected sqlite:////abs/path.db, sqlite:///relative.db "
                "or sqlite://:memory:"
            )
        path = rest[1:]
        if not path:
            raise ValueError("ledger.url: sqlite URL has no file path")
        # Four slashes leave an absolute path; three, a path relative to base_dir.
        return SqliteLedger(Path(path) if path.startswith("/") else base_dir / path)
    scheme = url.partition("://")[0].lower()
    if scheme in ("redis", "rediss"):
        return RedisLedger(url)
    shown = redact_url(url) if "://" in url else "<no scheme>"
    raise ValueError(f"ledger.url: expected a sqlite:// or redis:// URL, got {shown}")
