"""Rate limits counted on a real redis-server (sidecar/shared/ratelimit.py).

One `redis-server` for the module (`tests/redis_server.py`: skipped without one
unless SIDECAR_TEST_REQUIRE_REDIS=1), a fresh access-key name per test.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from sidecar.ratelimits import WINDOW_S, Decision, LimitKind, LocalLimiter, RateLimits
from sidecar.shared.base import PREFIX, SharedStateUnavailable, open_redis
from sidecar.shared.ratelimit import RedisLimiter
from tests.redis_server import free_port, module_redis_url  # noqa: F401  (fixture)

pytestmark = pytest.mark.asyncio(loop_scope="module")

TIMEOUT = 0.5
#: The working clients' bound: generous, so 60 concurrent admits on a loaded 2-core machine
#: wait for a pooled connection instead of failing (the product's own bound is tested e2e).
WORKING_TIMEOUT = 5.0
_names = itertools.count()


def fresh_name() -> str:
    return f"app-{next(_names)}"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def clients(module_redis_url: str) -> AsyncIterator[list[aioredis.Redis]]:  # noqa: F811
    """Three clients, as three replicas would hold."""
    opened = [open_redis(module_redis_url, timeout=WORKING_TIMEOUT) for _ in range(3)]
    yield opened
    for client in opened:
        await client.aclose()


@pytest.fixture
def limiters(
    clients: list[aioredis.Redis],
    module_redis_url: str,  # noqa: F811
) -> list[RedisLimiter]:
    return [RedisLimiter(client, module_redis_url) for client in clients]


async def redis_second(client: aioredis.Redis) -> float:
    seconds, micros = await client.time()
    return seconds + micros / 1e6


async def wait_for_fresh_second(client: aioredis.Redis) -> None:
    """Start a sequence early in a Redis second, so it does not straddle two."""
    now = await redis_second(client)
    if now % 1 > 0.7:
        await asyncio.sleep(1.02 - now % 1)


# --------------------------------------------------------------------------- decisions


async def test_same_decisions_as_the_local_limiter(
    limiters: list[RedisLimiter], clients: list[aioredis.Redis]
) -> None:
    name = fresh_name()
    await wait_for_fresh_second(clients[0])
    now = await redis_second(clients[0])
    local = LocalLimiter(lambda: now)
    limits = RateLimits(rpm=3, tpm=100)
    sequence = [40, 40, 30, 10, 10, 101]
    for tokens in sequence:
        remote = await limiters[0].admit(name, limits, tokens)
        expected = local.admit(name, limits, tokens)
        assert (remote.allowed, remote.limit) == (expected.allowed, expected.limit), tokens
        assert remote.second == math.floor(now)
        if not remote.allowed and expected.retry_after != math.inf:
            assert 0 < remote.retry_after <= WINDOW_S + 1
            assert remote.retry_after == pytest.approx(expected.retry_after, abs=0.5)
        else:
            assert remote.retry_after == expected.retry_after
    assert (await limiters[1].admit(name, limits, 1)).limit is LimitKind.RPM  # another replica


async def test_rpm_refusal_and_retry_after(limiters: list[RedisLimiter]) -> None:
    name = fresh_name()
    limits = RateLimits(rpm=2)
    assert (await limiters[0].admit(name, limits, 1)).allowed
    assert (await limiters[1].admit(name, limits, 1)).allowed
    refused = await limiters[2].admit(name, limits, 1)
    assert (refused.allowed, refused.limit) == (False, LimitKind.RPM)
    assert WINDOW_S - 1 < refused.retry_after <= WINDOW_S + 1


async def test_over_tpm_alone_never_passes(limiters: list[RedisLimiter]) -> None:
    refused = await limiters[0].admit(fresh_name(), RateLimits(tpm=10), 11)
    assert refused == Decision(False, refused.second, LimitKind.TPM, math.inf)


async def test_unlimited_makes_no_call_and_counts_nothing(
    limiters: list[RedisLimiter], clients: list[aioredis.Redis]
) -> None:
    name = fresh_name()
    for _ in range(5):
        assert (await limiters[0].admit(name, RateLimits(), 1_000)).allowed
    assert await clients[0].exists(limiters[0].key(name)) == 0


async def test_three_replicas_admit_exactly_rpm(limiters: list[RedisLimiter]) -> None:
    n = 20
    name = fresh_name()
    limits = RateLimits(rpm=n)
    decisions = await asyncio.gather(
        *(limiter.admit(name, limits, 1) for limiter in limiters for _ in range(n))
    )
    assert sum(d.allowed for d in decisions) == n
    assert {d.limit for d in decisions if not d.allowed} == {LimitKind.RPM}


async def test_the_hash_holds_one_bucket_and_expires(
    limiters: list[RedisLimiter], clients: list[aioredis.Redis]
) -> None:
    name = fresh_name()
    decision = await limiters[0].admit(name, RateLimits(rpm=5), 7)
    key = limiters[0].key(name)
    assert key == f"{PREFIX}rl:{name}"
    fields = await clients[0].hgetall(key)
    assert fields == {f"r:{decision.second}".encode(): b"1", f"t:{decision.second}".encode(): b"7"}
    assert WINDOW_S * 1000 < await clients[0].pttl(key) <= (WINDOW_S + 2) * 1000


async def test_stale_buckets_are_deleted(
    limiters: list[RedisLimiter], clients: list[aioredis.Redis]
) -> None:
    name = fresh_name()
    key = limiters[0].key(name)
    old = math.floor(await redis_second(clients[0])) - WINDOW_S - 1
    await clients[0].hset(key, mapping={f"r:{old}": 5, f"t:{old}": 500})
    decision = await limiters[0].admit(name, RateLimits(rpm=1, tpm=10), 10)
    assert decision.allowed  # the old bucket no longer counts ...
    assert await clients[0].hexists(key, f"r:{old}") == 0  # ... and is gone


# --------------------------------------------------------------------------- settle


async def test_settle_corrects_tokens_and_clamps_at_zero(
    limiters: list[RedisLimiter], clients: list[aioredis.Redis]
) -> None:
    name = fresh_name()
    key = limiters[0].key(name)
    limits = RateLimits(tpm=100)
    first = await limiters[0].admit(name, limits, 50)
    await limiters[1].settle(name, first.second, 45)
    assert await clients[0].hget(key, f"t:{first.second}") == b"95"
    refused = await limiters[2].admit(name, limits, 10)
    assert (refused.allowed, refused.limit) == (False, LimitKind.TPM)
    await limiters[1].settle(name, first.second, -1_000)
    assert await clients[0].hget(key, f"t:{first.second}") == b"0"
    assert await clients[0].hget(key, f"r:{first.second}") == b"1"  # requests never settled


async def test_settle_outside_the_window_counts_what_is_owed_now_and_drops_refunds(
    limiters: list[RedisLimiter], clients: list[aioredis.Redis]
) -> None:
    name = fresh_name()
    key = limiters[0].key(name)
    old = math.floor(await redis_second(clients[0])) - WINDOW_S - 1
    await clients[0].hset(key, mapping={f"r:{old}": 1, f"t:{old}": 10})
    await limiters[0].settle(name, old, -5)  # a refund for a bucket that is gone: dropped
    fields = await clients[0].hgetall(key)
    assert fields == {f"r:{old}".encode(): b"1", f"t:{old}".encode(): b"10"}
    await limiters[0].settle(name, old, 5)  # owed: counted in Redis's current second
    now_s = math.floor(await redis_second(clients[0]))
    counted = await clients[0].hgetall(key)
    assert counted[f"t:{old}".encode()] == b"10"
    assert sum(int(v) for f, v in counted.items() if f.decode() in (f"t:{now_s}", f"t:{now_s - 1}")) == 5
    assert 0 < await clients[0].pttl(key) <= (WINDOW_S + 2) * 1000


# --------------------------------------------------------------------------- trouble


async def test_unreachable_redis_raises_without_the_password() -> None:
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    client = open_redis(url, timeout=TIMEOUT)
    limiter = RedisLimiter(client, url)
    try:
        started = time.monotonic()
        with pytest.raises(SharedStateUnavailable) as admit_error:
            await limiter.admit("app", RateLimits(rpm=1), 1)
        with pytest.raises(SharedStateUnavailable) as settle_error:
            await limiter.settle("app", 1, 1)
        assert time.monotonic() - started < 4 * TIMEOUT + 1
    finally:
        await client.aclose()
    for error in (admit_error.value, settle_error.value):
        assert "hunter2" not in str(error)
        assert "shared state" in str(error)
        assert error.__cause__ is None
    assert "hunter2" not in repr(limiter)


async def test_a_batch_is_decided_in_order_as_if_each_came_alone(
    limiters: list[RedisLimiter], clients: list[aioredis.Redis]
) -> None:
    name = fresh_name()
    decisions = await limiters[0].admit_many(name, RateLimits(rpm=3, tpm=100), [40, 70, 50, 10, 0])
    assert [d.allowed for d in decisions] == [True, False, True, True, False]
    assert [d.limit for d in decisions] == [None, LimitKind.TPM, None, None, LimitKind.RPM]
    assert all(0 < d.retry_after <= 61 for d in decisions if not d.allowed)
    second = decisions[0].second
    fields = await clients[0].hgetall(limiters[0].key(name))
    assert fields == {f"r:{second}".encode(): b"3", f"t:{second}".encode(): b"100"}
    await limiters[1].settle_many([(name, second, -60), (fresh_name(), second, 5), (name, second, 0)])
    assert await clients[0].hget(limiters[0].key(name), f"t:{second}") == b"40"
