"""Cooldowns on the shared Redis: one key per cooling scope, an index, and a channel.

A cooldown is stored as `sidecar:cool:<health id>` (the whole key: dead) or
`sidecar:cool:<health id>|<model>` (one model; a health id never holds `|`), its
value the JSON of `SharedCooldown`, expiring at its deadline (`PXAT`). The sorted
set `sidecar:cool-index` names them by deadline, so a replica that starts later
(or comes back) reads what is in force with one range query, however many other
keys that Redis holds. Every new or longer cooldown is also published on
`sidecar:cooldowns`, which every replica listens to: the others learn of it
within milliseconds. Deadlines travel as wall-clock times (Unix seconds); each
replica turns them into its own clock.

A key's health id is its provider and a fingerprint of it (`sidecar.secret.fingerprint`),
never its value. Needs Redis 6.2 or later (`PXAT`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Final

import orjson
import redis.asyncio as aioredis

from sidecar.health import Outcome
from sidecar.shared.base import PREFIX, REDIS_ERRORS, unavailable

CHANNEL: Final = PREFIX + "cooldowns"
INDEX: Final = PREFIX + "cool-index"
_KEY_PREFIX: Final = PREFIX + "cool:"
#: Bounds on what is read back: a value this long, this many cooldowns in one resync.
_MAX_VALUE: Final = 2048
MAX_READ: Final = 10_000
_REASONS: Final = frozenset(o.value for o in Outcome)

# KEYS[1] the cooldown's key, KEYS[2] the index; ARGV value, until (s), until (ms), channel.
# Keep the later deadline: a shorter cooldown never shortens one in force. PXAT: wall clock.
# Index entries past their deadline are dropped on the way.
_PUBLISH: Final = """
local t = redis.call('TIME')
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', tonumber(t[1]) * 1000)
local old = redis.call('GET', KEYS[1])
if old then
  local ok, doc = pcall(cjson.decode, old)
  if ok and type(doc) == 'table' and tonumber(doc['until']) and tonumber(doc['until']) >= tonumber(ARGV[2]) then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PXAT', ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[3], KEYS[1])
redis.call('PUBLISH', ARGV[4], ARGV[1])
return 1
"""


@dataclass(frozen=True, slots=True)
class SharedCooldown:
    health_id: str
    model: str | None  # None: the whole key (dead)
    until: float  # Unix seconds
    reason: Outcome
    status: int | None


def encode(c: SharedCooldown) -> bytes:
    return orjson.dumps({"health_id": c.health_id, "model": c.model, "until": c.until,
                         "reason": c.reason.value, "status": c.status})  # fmt: skip


def decode(raw: bytes | str) -> SharedCooldown | None:
    """A cooldown from Redis, or None when it is not one (anything can be written there)."""
    if len(raw) > _MAX_VALUE:
        return None
    try:
        doc: Any = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(doc, dict):
        return None
    hid, model, until = doc.get("health_id"), doc.get("model"), doc.get("until")
    reason, status = doc.get("reason"), doc.get("status")
    if (
        not isinstance(hid, str)
        or not hid
        or not (model is None or isinstance(model, str))
        or isinstance(until, bool)
        or not isinstance(until, int | float)
        or reason not in _REASONS
        or not (status is None or (isinstance(status, int) and not isinstance(status, bool)))
    ):
        return None
    return SharedCooldown(hid, model, float(until), Outcome(reason), status)


def redis_key(health_id: str, model: str | None) -> str:
    return f"{_KEY_PREFIX}{health_id}" if model is None else f"{_KEY_PREFIX}{health_id}|{model}"


class CooldownStore:
    """Reads and writes cooldowns on one Redis; every failure is `SharedStateUnavailable`."""

    def __init__(self, client: aioredis.Redis, url: str) -> None:
        self._client = client
        self._url = url
        self._publish = client.register_script(_PUBLISH)

    async def publish(self, c: SharedCooldown) -> bool:
        """Store `c` and announce it, unless a later deadline for its scope is there already.
        True when it was announced."""
        try:
            done = await self._publish(
                keys=[redis_key(c.health_id, c.model), INDEX],
                args=[encode(c), repr(c.until), int(c.until * 1000), CHANNEL],
            )
        except REDIS_ERRORS as exc:
            raise unavailable("shared state", self._url, exc) from None
        return bool(done)

    async def current(self, wall_now: float) -> list[SharedCooldown]:
        """Every cooldown in force (at most `MAX_READ`, the latest deadlines first)."""
        out: list[SharedCooldown] = []
        try:
            found = await self._client.zrevrangebyscore(
                INDEX, "+inf", f"({int(wall_now * 1000)}", start=0, num=MAX_READ
            )
            keys = [k for k in found if isinstance(k, bytes | str)]
            for i in range(0, len(keys), 500):
                for raw in await self._client.mget(keys[i : i + 500]):
                    c = decode(raw) if raw is not None else None
                    if c is not None:
                        out.append(c)
        except REDIS_ERRORS as exc:
            raise unavailable("shared state", self._url, exc) from None
        return out


async def announcements(
    pubsub: aioredis.client.PubSub, url: str, *, poll: float = 1.0
) -> AsyncIterator[SharedCooldown | None]:
    """Cooldowns announced by any replica on `pubsub` (subscribed to `CHANNEL`), as they
    come; None for a `poll` without one, or for what is not a cooldown. Raises
    `SharedStateUnavailable` when the subscription breaks."""
    try:
        while True:
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=poll)
            if msg is None or msg.get("type") != "message":
                yield None
                continue
            data = msg.get("data")
            yield decode(data) if isinstance(data, bytes | str) else None
    except REDIS_ERRORS as exc:
        raise unavailable("shared state", url, exc) from None
