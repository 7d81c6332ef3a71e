"""The shared ledger: one Redis hash that every replica adds to.

Spend lives in the hash `sidecar:spend` (field = access-key name, value =
micro-USD); `HINCRBY` makes each addition atomic across pods. Socket
timeouts are short so an unreachable Redis turns into `LedgerUnavailable`
within seconds rather than stalling requests. The URL may carry a password;
it is kept out of `repr` and of every error message.
"""

from __future__ import annotations

from typing import Final

from sidecar.ledger.base import LedgerUnavailable
from sidecar.ledger.urls import redact_url
from sidecar.secret import Secret
from sidecar.shared.base import REDIS_ERRORS as _ERRORS
from sidecar.shared.base import describe_error, open_redis

SPEND_KEY: Final = "sidecar:spend"


class RedisLedger:
    """Spend per access key in a Redis hash."""

    def __init__(
        self,
        url: str,
        *,
        key: str = SPEND_KEY,
        timeout: float = 2.0,
        max_connections: int = 32,
    ) -> None:
        self._where = redact_url(url)
        self._url = Secret(url)  # may hold a password: only for `describe_error` to mask it
        self._key = key
        self._client = open_redis(url, timeout=timeout, max_connections=max_connections,
                                  setting="ledger.url")  # fmt: skip

    def __repr__(self) -> str:
        return f"RedisLedger({self._where!r})"

    async def spent(self, name: str) -> int:
        try:
            value = await self._client.hget(self._key, name)
        except _ERRORS as exc:
            raise self._unavailable(exc) from None
        return int(value) if value is not None else 0

    async def add_spend(self, name: str, micro_usd: int) -> int:
        if type(micro_usd) is not int:
            raise TypeError("micro_usd must be an int")
        try:
            return int(await self._client.hincrby(self._key, name, micro_usd))
        except _ERRORS as exc:
            raise self._unavailable(exc) from None

    async def close(self) -> None:
        await self._client.aclose()

    def _unavailable(self, exc: BaseException) -> LedgerUnavailable:
        return LedgerUnavailable(describe_error("redis ledger", self._url.reveal(), exc))
