"""Managed-key credits on the shared Redis ledger, and when the ledger is unreachable.

A real `redis-server` (`tests/redis_server.py`: skipped without one unless
SIDECAR_TEST_REQUIRE_REDIS=1). The many-replica case runs two sidecar
*processes* on one vault and one Redis: their combined spend must be exact and
both must report the same balance. Spend lands in the background, so checks
poll with a deadline.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import aiohttp
import openai
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer

from sidecar.ledger.redis import SPEND_KEY
from tests.harness import Env, Process, Sidecar, metric_value, spawn_sidecar
from tests.redis_server import RedisServer, redis_server, redis_url  # noqa: F401  (fixtures)
from tests.test_credits_e2e import (
    CHAT_IN,
    CHAT_OUT,
    CLAUDE_IN,
    CLAUDE_OUT,
    MOCK_OUTPUT_TOKENS,
    PRICES,
    eventually,
    metrics,
    mock_log,
    providers_yaml,
    remaining_metric,
    spent_metric,
)


def redis_ledger(url: str, *, on_unavailable: str = "fail_closed") -> str:
    return f'ledger: {{url: "{url}", on_unavailable: {on_unavailable}}}\n'


@pytest.fixture
async def spend(redis_url: str) -> AsyncIterator[aioredis.Redis]:  # noqa: F811
    """A client on the test Redis, to read the ledger the way an operator would."""
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def redis_spent(client: aioredis.Redis, name: str) -> int:
    value = await client.hget(SPEND_KEY, name)
    return int(value) if value is not None else 0


async def start(env: Env, sidecars: list[Sidecar], ledger: str) -> Sidecar:
    env.write_config(providers_yaml(env) + ledger + PRICES)
    sc = await env.start()
    sidecars.append(sc)
    return sc


# --------------------------------------------------------------------------- one sidecar


async def test_spend_is_exact_and_exhaustion_refuses_on_redis(
    env: Env,
    sidecars: list[Sidecar],
    mock_server: TestServer,
    redis_url: str,  # noqa: F811
    spend: aioredis.Redis,
) -> None:
    token = env.access_key("shared", credits=30)
    sc = await start(env, sidecars, redis_ledger(redis_url))

    async with sc.openai(token) as client:
        chat = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "one two"}]
        )
    assert chat.usage is not None
    expected = chat.usage.prompt_tokens * CHAT_IN + chat.usage.completion_tokens * CHAT_OUT
    await eventually(lambda: redis_spent(spend, "shared"), expected)  # $12 of $30

    async with (
        sc.anthropic(token) as client,
        client.messages.stream(
            model="claude-haiku-4-5", max_tokens=64, messages=[{"role": "user", "content": "hi"}]
        ) as stream,
    ):
        final = await stream.get_final_message()
    expected += final.usage.input_tokens * CLAUDE_IN + final.usage.output_tokens * CLAUDE_OUT
    await eventually(lambda: redis_spent(spend, "shared"), expected)  # $35 of $30
    await eventually(lambda: spent_metric(sc, "shared"), expected / 1e6)
    await eventually(lambda: remaining_metric(sc, "shared"), 30 - expected / 1e6)

    async with sc.openai(token) as client:
        with pytest.raises(openai.APIStatusError) as exc:
            await client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "one two"}]
            )
    assert exc.value.status_code == 402
    assert exc.value.response.headers["x-should-retry"] == "false"
    assert exc.value.response.json()["error"]["code"] == "credits_exhausted"
    assert len(await mock_log(mock_server)) == 2
    assert await redis_spent(spend, "shared") == expected


# --------------------------------------------------------------------------- two processes


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    """Sidecar processes appended here get SIGTERM at teardown and must exit 0."""
    started: list[Process] = []
    yield started
    codes = [p.stop() for p in started]
    assert codes == [0] * len(started)


async def _admin_metrics(session: aiohttp.ClientSession, p: Process) -> str:
    async with session.get(f"http://127.0.0.1:{p.admin_port}/metrics") as r:
        assert r.status == 200
        return await r.text()


async def test_two_sidecar_processes_share_one_balance(
    env: Env,
    mock_server: TestServer,
    processes: list[Process],
    redis_url: str,  # noqa: F811
    spend: aioredis.Redis,
) -> None:
    grant, n = 1000, 40
    token = env.access_key("fleet", credits=grant)
    config = env.write_config(providers_yaml(env) + redis_ledger(redis_url) + PRICES)
    spawned = await asyncio.gather(
        *(asyncio.to_thread(spawn_sidecar, config, env.dir / f"access-{i}.log") for i in range(2))
    )
    processes.extend(spawned)
    clients = [
        openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{p.proxy_port}/v1", api_key=token, max_retries=0
        )
        for p in spawned
    ]
    prompt = [{"role": "user", "content": "hi"}]
    per_request = 1 * CHAT_IN + MOCK_OUTPUT_TOKENS * CHAT_OUT
    try:
        replies = await asyncio.gather(
            *(
                clients[i % 2].chat.completions.create(model="gpt-4o-mini", messages=prompt)
                for i in range(n)
            )
        )
        assert all(r.usage is not None and r.usage.prompt_tokens == 1 for r in replies)
        await eventually(lambda: redis_spent(spend, "fleet"), n * per_request)

        async with aiohttp.ClientSession() as session:
            # Each process counted its own half.
            for p in spawned:

                async def counted(p: Process = p) -> float:
                    text = await _admin_metrics(session, p)
                    return metric_value(text, "sidecar_credits_spent_usd_total", access_key="fleet")

                await eventually(counted, n // 2 * per_request / 1e6)

            # One more request each, refused upstream (the mock's `fail-400`): the credits
            # check reads the shared ledger, nothing is charged, and both report one balance.
            for client in clients:
                with pytest.raises(openai.BadRequestError):
                    await client.chat.completions.create(
                        model="gpt-4o-mini-fail-400", messages=prompt
                    )
            balances = [
                metric_value(
                    await _admin_metrics(session, p),
                    "sidecar_credits_remaining_usd",
                    access_key="fleet",
                )
                for p in spawned
            ]
        assert balances == [grant - n * per_request / 1e6] * 2
        assert await redis_spent(spend, "fleet") == n * per_request
    finally:
        for client in clients:
            await client.close()


# --------------------------------------------------------------------------- ledger down


async def test_unreachable_ledger_fail_closed_refuses_managed_requests(
    env: Env,
    sidecars: list[Sidecar],
    mock_server: TestServer,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    redis_server.stop()  # its port is now closed
    token = env.access_key("careful", credits=100)
    sc = await start(env, sidecars, redis_ledger(redis_server.url, on_unavailable="fail_closed"))

    async with sc.openai(token) as client:
        for _ in range(2):  # the second lands inside the recorder's back-off window
            with pytest.raises(openai.APIStatusError) as exc:
                await client.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
                )
            assert exc.value.status_code == 503
            assert exc.value.response.json()["error"]["code"] == "ledger_unavailable"
        assert await mock_log(mock_server) == []
        # No crash: still healthy, and a policy-keyed provider needs no ledger.
        local = await client.chat.completions.create(
            model="llama3.2", messages=[{"role": "user", "content": "hi"}]
        )
    assert local.choices[0].message.content
    async with aiohttp.ClientSession() as s, s.get(sc.admin_url + "/healthz") as r:
        assert r.status == 200
    assert any(r.get("event") == "ledger_unavailable" for r in env.oplog.records())


async def test_unreachable_ledger_fail_open_keeps_spend_pending_then_flushes(
    env: Env,
    sidecars: list[Sidecar],
    mock_server: TestServer,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    redis_server.stop()
    token = env.access_key("optimist", credits=100)
    sc = await start(env, sidecars, redis_ledger(redis_server.url, on_unavailable="fail_open"))
    prompt = [{"role": "user", "content": "one two three"}]
    per_request = 3 * CHAT_IN + MOCK_OUTPUT_TOKENS * CHAT_OUT

    async with sc.openai(token) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=prompt
        )
        assert raw.headers["x-sidecar-key-source"] == "managed"

        async def pending() -> float:
            return metric_value(await metrics(sc), "sidecar_ledger_pending_spend_usd")

        await eventually(pending, per_request / 1e6)

        redis_server.start()  # same port
        await sc.running.state.billing.flush()  # what the 5 s flush loop does
        assert await pending() == 0

        async with aioredis.Redis.from_url(redis_server.url) as r:
            assert await redis_spent(r, "optimist") == per_request
            # With the ledger back, the next request is charged straight into it.
            await client.chat.completions.create(model="gpt-4o-mini", messages=prompt)
            await eventually(lambda: redis_spent(r, "optimist"), 2 * per_request)
    await eventually(lambda: remaining_metric(sc, "optimist"), 100 - 2 * per_request / 1e6)
