"""Per-access-key rate limits counted on Redis, across every replica.

The same algorithm as `sidecar.ratelimits.LocalLimiter` (see its module
docstring for the window and what a refusal's `retry_after` means), run as one
Lua script per operation, so checking and counting are atomic however many
replicas admit at once. The script reads Redis's own clock (`TIME`): replicas
with skewed clocks still agree, and `Decision.second` is Redis's second.

One hash per access key, `{prefix}rl:{name}`, with fields `r:<second>`
(requests) and `t:<second>` (tokens). `admit` deletes the fields that have left
the window and sets the hash to expire 62 s after the last admitted request, so
an idle key vanishes. Every Redis or socket error becomes
`SharedStateUnavailable` (no retry, nothing swallowed, no password in the
message): the caller picks the fallback.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any, Final

import redis.asyncio as aioredis

from sidecar.ratelimits import WINDOW_S, Decision, LimitKind, RateLimits
from sidecar.shared.base import PREFIX, REDIS_ERRORS, unavailable

#: The hash expires this long after the last admitted request: its newest
#: bucket stops counting 61 s after it started.
_EXPIRE_MS: Final = (WINDOW_S + 2) * 1000

# KEYS[1] the hash; ARGV rpm (0 = unlimited), tpm (0 = unlimited), window, expire ms, then the
# tokens of each request to admit, in order (each sees the ones admitted before it).
# Returns {second, then per request: allowed 0|1, limit ('' | 'rpm' | 'tpm'), retry_after ms
# (-1 = never)}.
_ADMIT: Final = """
local t = redis.call('TIME')
local now_s = tonumber(t[1])
local now_ms = now_s * 1000 + math.floor(tonumber(t[2]) / 1000)
local rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])
local window, expire_ms = tonumber(ARGV[3]), tonumber(ARGV[4])
local oldest = now_s - window

local fields = redis.call('HGETALL', KEYS[1])
local reqs, toks, stale = {}, {}, {}
local used_r, used_t = 0, 0
for i = 1, #fields, 2 do
  local field = fields[i]
  local s = tonumber(string.sub(field, 3))
  local v = tonumber(fields[i + 1])
  if s == nil or s < oldest then
    stale[#stale + 1] = field
  elseif string.sub(field, 1, 1) == 'r' then
    reqs[s] = (reqs[s] or 0) + v
    used_r = used_r + v
  else
    toks[s] = (toks[s] or 0) + v
    used_t = used_t + v
  end
end
if #stale > 0 then redis.call('HDEL', KEYS[1], unpack(stale)) end

local function seconds()
  local out, seen = {}, {}
  for s in pairs(reqs) do if not seen[s] then seen[s] = true; out[#out + 1] = s end end
  for s in pairs(toks) do if not seen[s] then seen[s] = true; out[#out + 1] = s end end
  table.sort(out)
  return out
end
local function until_freed(ordered, counts, excess)
  if excess <= 0 then return 0 end
  local freed = 0
  for _, s in ipairs(ordered) do
    freed = freed + (counts[s] or 0)
    if freed >= excess then return math.max(0, (s + window + 1) * 1000 - now_ms) end
  end
  return -1
end

local out = {now_s}
local added_r, added_t = 0, 0
local ordered = nil  -- the seconds in order, made at the first refusal, again after a new one
for i = 5, #ARGV do
  local tokens = tonumber(ARGV[i])
  local limit = ''
  if rpm > 0 and used_r + 1 > rpm then
    limit = 'rpm'
  elseif tpm > 0 and used_t + tokens > tpm then
    limit = 'tpm'
  end
  if limit == '' then
    used_r, used_t = used_r + 1, used_t + tokens
    added_r, added_t = added_r + 1, added_t + tokens
    if reqs[now_s] == nil and toks[now_s] == nil then ordered = nil end
    reqs[now_s] = (reqs[now_s] or 0) + 1
    toks[now_s] = (toks[now_s] or 0) + tokens
    out[#out + 1] = 1; out[#out + 1] = ''; out[#out + 1] = 0
  elseif tpm > 0 and tokens > tpm then
    out[#out + 1] = 0; out[#out + 1] = limit; out[#out + 1] = -1
  else
    if ordered == nil then ordered = seconds() end
    local wait = 0
    if rpm > 0 then wait = until_freed(ordered, reqs, used_r + 1 - rpm) end
    if tpm > 0 and wait >= 0 then
      local wait_t = until_freed(ordered, toks, used_t + tokens - tpm)
      if wait_t < 0 then wait = -1 elseif wait_t > wait then wait = wait_t end
    end
    out[#out + 1] = 0; out[#out + 1] = limit; out[#out + 1] = wait
  end
end
if added_r > 0 then
  redis.call('HINCRBY', KEYS[1], 'r:' .. now_s, added_r)
  redis.call('HINCRBY', KEYS[1], 't:' .. now_s, added_t)
  redis.call('PEXPIRE', KEYS[1], expire_ms)
end
return out
"""

# KEYS[1] the hash; ARGV second, delta, window, expire ms. Returns the bucket's tokens, or -1
# if untouched. Tokens owed for a bucket that has left the window go to the current second.
_SETTLE: Final = """
local t = redis.call('TIME')
local now_s = tonumber(t[1])
local second, delta, window = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if second < now_s - window or redis.call('HEXISTS', KEYS[1], 'r:' .. second) == 0 then
  if delta <= 0 then return -1 end
  second = now_s
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
end
local field = 't:' .. second
local tokens = redis.call('HINCRBY', KEYS[1], field, ARGV[2])
if tokens < 0 then
  redis.call('HSET', KEYS[1], field, 0)
  return 0
end
return tokens
"""


class RedisLimiter:
    """`admit` and `settle` of `LocalLimiter`, on a Redis shared by every replica."""

    def __init__(self, client: aioredis.Redis, url: str, *, prefix: str = PREFIX) -> None:
        self._client = client
        self._url = url  # only to name Redis (password masked) in errors
        self._prefix = prefix
        self._admit = client.register_script(_ADMIT)
        self._settle = client.register_script(_SETTLE)

    def __repr__(self) -> str:
        return "RedisLimiter()"

    def key(self, name: str) -> str:
        """The Redis hash holding the window of access key `name`."""
        return f"{self._prefix}rl:{name}"

    async def admit(self, name: str, limits: RateLimits, tokens: int) -> Decision:
        """Count one request of `tokens` estimated tokens for `name` unless a limit refuses.

        With no limit set nothing is counted and Redis is not called (`second`
        is then the local clock's).
        """
        return (await self.admit_many(name, limits, (tokens,)))[0]

    async def admit_many(
        self, name: str, limits: RateLimits, tokens: Sequence[int]
    ) -> list[Decision]:
        """`admit` for several requests of one access key at once, in order, in one call:
        each is decided as if it came alone after the ones before it."""
        if any(t < 0 for t in tokens):
            raise ValueError("tokens must be >= 0")
        if not limits:
            return [Decision(True, math.floor(time.time()))] * len(tokens)
        args = (limits.rpm or 0, limits.tpm or 0, WINDOW_S, _EXPIRE_MS, *tokens)
        try:
            reply = await self._admit(keys=[self.key(name)], args=args)
        except REDIS_ERRORS as exc:
            raise unavailable("shared state", self._url, exc) from None
        return _decisions(reply)

    async def settle(self, name: str, second: int, delta: int) -> None:
        """Add `delta` tokens to the bucket `second` (a Redis second), as `LocalLimiter.settle`
        does: never below 0; tokens owed for a bucket that has left the window are counted
        in Redis's current second, a refund for it is dropped."""
        if delta == 0:
            return
        try:
            await self._settle(keys=[self.key(name)], args=(second, delta, WINDOW_S, _EXPIRE_MS))
        except REDIS_ERRORS as exc:
            raise unavailable("shared state", self._url, exc) from None


    async def settle_many(self, owed: Sequence[tuple[str, int, int]]) -> None:
        """`settle` for several (name, second, delta) at once, in one round trip."""
        pipe = self._client.pipeline(transaction=False)
        for name, second, delta in owed:
            if delta:
                await self._settle(keys=[self.key(name)], args=(second, delta, WINDOW_S, _EXPIRE_MS),
                                   client=pipe)  # fmt: skip
        try:
            await pipe.execute()
        except REDIS_ERRORS as exc:
            raise unavailable("shared state", self._url, exc) from None


def _decisions(reply: list[Any]) -> list[Decision]:
    second = int(reply[0])
    out = []
    for i in range(1, len(reply), 3):
        allowed, limit, wait_ms = reply[i : i + 3]
        if allowed == 1:
            out.append(Decision(True, second))
            continue
        kind = LimitKind(limit.decode() if isinstance(limit, bytes) else limit)
        out.append(Decision(False, second, kind, math.inf if wait_ms < 0 else wait_ms / 1000))
    return out
