"""What every user of the shared Redis needs: one error type and one way to connect."""

from __future__ import annotations

from typing import Final

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from sidecar.ledger.urls import redact_url, url_password
from sidecar.shared import SharedStateUnavailable

__all__ = [
    "PREFIX", "REDIS_ERRORS", "SharedStateUnavailable", "describe_error", "open_redis", "unavailable",
]  # fmt: skip

#: Every key the sidecar writes starts with this.
PREFIX: Final = "sidecar:"
#: What a Redis call can raise: the driver's errors, and sockets' (a timeout is an OSError).
REDIS_ERRORS: Final = (RedisError, OSError)


def open_redis(
    url: str, *, timeout: float, max_connections: int = 16, setting: str = "shared_state.url"
) -> aioredis.Redis:
    """A client whose every call is bounded by `timeout` seconds (connect and each read).

    A blocking pool: a burst waits at most `timeout` for a free connection rather
    than failing at once. One immediate retry on a broken pooled connection (one
    the server closed); none on a timeout, whose write may have landed.
    """
    try:
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            socket_keepalive=True,  # an idle pooled connection a NAT dropped shows up as closed
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            health_check_interval=0,
        )
    except ValueError:
        raise ValueError(f"{setting}: invalid redis URL {redact_url(url)}") from None
    return aioredis.Redis.from_pool(pool)


def unavailable(where: str, url: str, exc: BaseException) -> SharedStateUnavailable:
    """`exc` as a SharedStateUnavailable naming `where`, with any password of `url` masked."""
    return SharedStateUnavailable(describe_error(where, url, exc))


def describe_error(where: str, url: str, exc: BaseException) -> str:
    """`where`, the Redis (password masked) and what went wrong, with the password masked in
    the driver's message too (some quote the URL)."""
    detail = str(exc)
    password = url_password(url)
    if password:
        detail = detail.replace(password, "***")
    return f"{where} {redact_url(url)}: {type(exc).__name__}: {detail}"
