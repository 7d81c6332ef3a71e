"""`ledger.url`: parsed and shown without opening anything (no Redis client imported)."""

from __future__ import annotations

from typing import Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from sidecar.ledger.sqlite import MEMORY

_SQLITE = "sqlite://"
_SQLITE_FORMS = "expected sqlite:////abs/path.db, sqlite:///relative.db or sqlite://:memory:"

LedgerKind = Literal["sqlite", "redis"]


def parse_ledger_url(url: str) -> tuple[LedgerKind, str]:
    """Check a `ledger.url` without opening anything: `(kind, target)`.

    `("sqlite", ":memory:" | "/abs/path.db" | "relative.db")` or `("redis", url)`.
    Config validation (`sidecar check`) and `open_ledger` share this one parser,
    so a URL that passes the check also opens. Raises ValueError with a message
    (no key-path prefix) that never contains a password from the URL.
    """
    if url.startswith(_SQLITE):
        rest = url[len(_SQLITE) :]
        if rest == MEMORY:
            return "sqlite", MEMORY
        if not rest.startswith("/") or rest == "/":
            raise ValueError(_SQLITE_FORMS)
        # Four slashes leave an absolute path; three, a path relative to base_dir.
        return "sqlite", rest[1:]
    scheme = url.partition("://")[0].lower()
    if scheme in ("redis", "rediss"):
        _check_redis_url(url)
        return "redis", url
    shown = redact_url(url) if "://" in url else "<no scheme>"
    raise ValueError(
        f"expected sqlite:///relative.db, sqlite:////absolute.db or redis://host:6379/0, got {shown}"
    )


def _check_redis_url(url: str) -> None:
    problem = f"invalid redis URL {redact_url(url)} (expected redis://[:password@]host:port/db)"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError for a port that is no number
    except ValueError:
        raise ValueError(problem) from None
    db = parts.path.lstrip("/")
    if not parts.hostname or (db and not db.isdigit()):
        raise ValueError(problem)


def url_password(url: str) -> str | None:
    """The password a Redis URL carries (userinfo or `password=` query), to mask it in messages."""
    try:
        parts = urlsplit(url)
        found = parts.password
        for key, value in parse_qsl(parts.query):
            if key.lower() == "password":
                found = value
        return found or None
    except ValueError:
        return None


def redact_url(url: str) -> str:
    """The URL with any password (userinfo or `password=` query) masked."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, host = netloc.rsplit("@", 1)
            user = userinfo.split(":", 1)[0]
            netloc = f"{user}:***@{host}" if ":" in userinfo else f"{userinfo}@{host}"
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            query = urlencode(
                [(k, "***" if k.lower() == "password" else v) for k, v in pairs], safe="*"
            )
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:
        return "<unparsable redis url>"
