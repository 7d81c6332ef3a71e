"""Many replicas, one view (docs/reference.md#shared-state): three sidecar processes on one
vault and one real `redis-server`.

A 429 seen by one replica stops the others from trying that key and model; an access key
limited to N requests per minute gets exactly N across the three; Redis going away loses no
request, and the replicas share again once it is back. Propagation is checked against the
one-second promise with a deadline; everything else polls with a generous one.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import openai
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer
from redis.exceptions import RedisError

from tests.harness import Env, Process, metric_value, spawn_sidecar
from tests.redis_server import RedisServer, redis_server, redis_url  # noqa: F401  (fixtures)
from tests.test_proxy_e2e import clear_mock, mock_log, providers_yaml

MODEL = "gpt-4o-mini"
OTHER_MODEL = "gpt-4o"
PROMPT = [{"role": "user", "content": "hi"}]
#: How long the tests wait for what is not on the one-second promise (process start, recovery).
WAIT = 15.0


def shared_yaml(url: str) -> str:
    return f'shared_state: {{url: "{url}", timeout: 500ms}}\n'


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    """Sidecar processes appended here get SIGTERM at teardown and must exit 0."""
    started: list[Process] = []
    yield started
    codes = [p.stop() for p in started]
    assert codes == [0] * len(started)


async def spawn(env: Env, config_body: str, processes: list[Process], n: int = 3) -> list[Process]:
    config = env.write_config(config_body)
    spawned = await asyncio.gather(
        *(asyncio.to_thread(spawn_sidecar, config, env.dir / f"access-{i}.log") for i in range(n))
    )
    processes.extend(spawned)
    return list(spawned)


def client(p: Process, token: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{p.proxy_port}/v1", api_key=token, max_retries=0
    )


async def admin(http: aiohttp.ClientSession, p: Process, path: str) -> Any:
    async with http.get(f"http://127.0.0.1:{p.admin_port}{path}") as r:
        assert r.status == 200
        return await (r.text() if path == "/metrics" else r.json())


async def eventually(
    probe: Callable[[], Awaitable[Any]], expected: Any, *, within: float = WAIT
) -> float:
    """Poll until `probe()` == `expected`; the seconds it took. Asserts with the last value."""
    start = time.monotonic()
    while True:
        value = await probe()
        if value == expected:
            return time.monotonic() - start
        if time.monotonic() - start >= within:
            assert value == expected
        await asyncio.sleep(0.02)


async def shared_up(http: aiohttp.ClientSession, p: Process) -> float:
    return metric_value(await admin(http, p, "/metrics"), "sidecar_shared_state_up")


async def pair_state(
    http: aiohttp.ClientSession, p: Process, key_id: str, model: str | None = None
) -> tuple[str, str | None]:
    """How `GET /keys` on `p` shows `key_id` for `model`: (state, model) of the line for that
    model, else of the key's own line (`ok` or `dead`)."""
    lines = [k for k in (await admin(http, p, "/keys"))["keys"] if k["key_id"] == key_id]
    for line in lines:
        if model is not None and line["model"] == model:
            return line["state"], line["model"]
    own = [line for line in lines if line["model"] is None]
    return (own[0]["state"], None) if own else ("ok", None)


def attempts_with(log: list[dict[str, Any]], key: str) -> list[str | None]:
    """The models of the mock's requests made with provider key `key`."""
    return [e["body"]["model"] for e in log if e["key"] == key]


# --------------------------------------------------------------------------- shared key health


async def test_a_429_on_one_replica_stops_the_others_within_a_second(
    env: Env,
    mock_server: TestServer,
    processes: list[Process],
    http: aiohttp.ClientSession,
    redis_url: str,  # noqa: F811
) -> None:
    token = env.access_key("app")
    limited, spare = "sk-first-fail-429-retry-30", "sk-second"
    body = providers_yaml(env, openai=[("first", limited), ("second", spare)]) + shared_yaml(
        redis_url
    )
    replicas = await spawn(env, body, processes)
    for p in replicas:
        await eventually(lambda p=p: shared_up(http, p), 1.0)

    async with client(replicas[0], token) as c:  # the first key's 429 cools it for MODEL
        reply = await c.chat.completions.with_raw_response.create(model=MODEL, messages=PROMPT)
    assert reply.headers["x-sidecar-key-id"] == "second"
    assert attempts_with(await mock_log(http, mock_server), limited) == [MODEL]

    # The other two learn of it within a second, scoped to that model, until about 30 s on.
    for p in replicas[1:]:
        took = await eventually(lambda p=p: pair_state(http, p, "first", MODEL), ("cooling", MODEL))
        assert took < 1.0, f"replica {p.admin_port} learnt of the cooldown after {took:.2f} s"
        (line,) = [k for k in (await admin(http, p, "/keys"))["keys"] if k["key_id"] == "first"]
        assert (line["reason"], line["last_status"]) == ("rate_limited", 429)
        m = await admin(http, p, "/metrics")
        assert metric_value(m, "sidecar_key_cooling_down", key_id="first") == 1

    await clear_mock(http, mock_server)
    for p in replicas[1:]:
        async with client(p, token) as c:
            for _ in range(3):
                r = await c.chat.completions.with_raw_response.create(model=MODEL, messages=PROMPT)
                assert r.headers["x-sidecar-key-id"] == "second"
    log = await mock_log(http, mock_server)
    assert attempts_with(log, limited) == []  # no upstream attempt on the cooling pair
    assert attempts_with(log, spare) == [MODEL] * 6

    # Only that model: the first key is still asked for another one (and fails again there).
    async with client(replicas[2], token) as c:
        r = await c.chat.completions.with_raw_response.create(model=OTHER_MODEL, messages=PROMPT)
    assert attempts_with(await mock_log(http, mock_server), limited) == [OTHER_MODEL]


async def test_a_replica_started_later_reads_the_cooldowns_in_force(
    env: Env,
    mock_server: TestServer,
    processes: list[Process],
    http: aiohttp.ClientSession,
    redis_url: str,  # noqa: F811
) -> None:
    token = env.access_key("app")
    dead = "sk-gone-fail-401"
    body = providers_yaml(env, openai=[("gone", dead), ("ok", "sk-ok")]) + shared_yaml(redis_url)
    (first,) = await spawn(env, body, processes, n=1)
    await eventually(lambda: shared_up(http, first), 1.0)
    async with client(first, token) as c:
        await c.chat.completions.create(model=MODEL, messages=PROMPT)  # 401: the key is dead

    (late,) = await spawn(env, body, processes, n=1)
    await eventually(lambda: shared_up(http, late), 1.0)
    assert await pair_state(http, late, "gone") == ("dead", None)
    await clear_mock(http, mock_server)
    async with client(late, token) as c:
        r = await c.chat.completions.with_raw_response.create(model=OTHER_MODEL, messages=PROMPT)
    assert r.headers["x-sidecar-key-id"] == "ok"
    assert attempts_with(await mock_log(http, mock_server), dead) == []


# --------------------------------------------------------------------------- rate limits


async def test_n_requests_per_minute_across_three_replicas(
    env: Env,
    mock_server: TestServer,
    processes: list[Process],
    http: aiohttp.ClientSession,
    redis_url: str,  # noqa: F811
) -> None:
    n = 7
    token = env.access_key("metered", rpm=n)
    body = providers_yaml(env, openai=[("only", "sk-only")]) + shared_yaml(redis_url)
    replicas = await spawn(env, body, processes)
    for p in replicas:
        await eventually(lambda p=p: shared_up(http, p), 1.0)

    clients = [client(p, token) for p in replicas]

    async def one(i: int) -> tuple[int, str | None, int, str | None]:
        """(status, error code, retry-after, x-should-retry) of one request."""
        r = await clients[i % 3].chat.completions.with_raw_response.create(
            model=MODEL, messages=PROMPT
        )
        return r.status_code, None, 0, None

    async def guarded(i: int) -> tuple[int, str | None, int, str | None]:
        try:
            return await one(i)
        except openai.RateLimitError as exc:
            h = exc.response.headers
            return (429, exc.response.json()["error"]["code"], int(h["retry-after"]),
                    h.get("x-should-retry"))  # fmt: skip

    try:
        outcomes = await asyncio.gather(*(guarded(i) for i in range(3 * n)))
    finally:
        for c in clients:
            await c.close()
    assert [o[0] for o in outcomes].count(200) == n
    refusals = [o for o in outcomes if o[0] == 429]
    assert len(refusals) == 2 * n
    for _, code, retry_after, should_retry in refusals:  # an honest wait, within the window
        assert code == "rate_limit_exceeded"
        assert 1 <= retry_after <= 61
        assert should_retry is None or (should_retry == "false" and retry_after > 60)
    assert len(await mock_log(http, mock_server)) == n  # nothing refused went upstream
    refused = 0.0
    for p in replicas:
        m = await admin(http, p, "/metrics")
        refused += metric_value(m, "sidecar_rate_limited_total", access_key="metered", limit="rpm")
        assert metric_value(m, "sidecar_rate_limited_total", access_key="metered", limit="tpm") == 0
    assert refused == 2 * n


# --------------------------------------------------------------------------- Redis goes away


async def test_redis_going_away_loses_no_request_and_the_view_is_shared_again_after(
    env: Env,
    mock_server: TestServer,
    processes: list[Process],
    http: aiohttp.ClientSession,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    token = env.access_key("app")
    metered = env.access_key("metered", rpm=1000)
    body = providers_yaml(
        env, openai=[("flaky", "sk-flaky-fail-429-retry-30"), ("steady", "sk-steady")]
    ) + shared_yaml(redis_server.url)
    replicas = await spawn(env, body, processes)
    for p in replicas:
        await eventually(lambda p=p: shared_up(http, p), 1.0)

    failures: list[str] = []
    sent = [0]
    stop = asyncio.Event()

    async def traffic(p: Process, key: str) -> None:
        async with client(p, key) as c:
            while not stop.is_set():
                try:  # a model no key is cooling for, so every request is answered
                    await c.chat.completions.create(model="gpt-4.1-nano", messages=PROMPT)
                    sent[0] += 1
                except openai.APIError as exc:
                    failures.append(f"{p.proxy_port}: {exc!r}")
                await asyncio.sleep(0.01)

    workers = [asyncio.create_task(traffic(p, k)) for p in replicas for k in (token, metered)]
    try:
        await asyncio.sleep(0.3)
        redis_server.stop()
        for p in replicas:  # each falls back within a second or so of its next beat
            await eventually(lambda p=p: shared_up(http, p), 0.0)
        before = sent[0]
        # Alone, a replica still cools a key for itself.
        async with client(replicas[0], token) as c:
            await c.chat.completions.create(model=MODEL, messages=PROMPT)
        assert await pair_state(http, replicas[0], "flaky", MODEL) == ("cooling", MODEL)
        await asyncio.sleep(0.5)
        assert sent[0] > before  # traffic went on
        redis_server.start()
        for p in replicas:
            await eventually(lambda p=p: shared_up(http, p), 1.0)
        # The cooldown learnt while alone reached the others once Redis was back.
        for p in replicas[1:]:
            await eventually(lambda p=p: pair_state(http, p, "flaky", MODEL), ("cooling", MODEL))
        await asyncio.sleep(0.3)
    finally:
        stop.set()
        await asyncio.gather(*workers)
    assert failures == []
    assert sent[0] > 0
    for p in replicas:
        log = p.stderr_path.read_text()
        assert log.count('"shared_state_unavailable"') == 1, log
        assert log.count('"shared_state_recovered"') == 1, log


async def test_a_redis_that_stops_answering_does_not_stop_rate_limited_requests(
    env: Env,
    mock_server: TestServer,
    processes: list[Process],
    http: aiohttp.ClientSession,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    """Frozen, not gone (SIGSTOP: connections stay open, nothing answers): a rate-limited
    key's requests still pass, counted locally, and the replica says it is on its own."""
    metered = env.access_key("metered", rpm=1000)
    body = providers_yaml(env, openai=[("k", "sk-k")]) + shared_yaml(redis_server.url)
    (p,) = await spawn(env, body, processes, n=1)
    await eventually(lambda: shared_up(http, p), 1.0)
    pid = redis_server.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        async with client(p, metered) as c:
            for _ in range(5):
                await c.chat.completions.create(model=MODEL, messages=PROMPT)
        assert await shared_up(http, p) == 0.0
        ready = await admin(http, p, "/readyz")
        assert ready["shared_state"] == {"status": "local"}
    finally:
        os.kill(pid, signal.SIGCONT)
    await eventually(lambda: shared_up(http, p), 1.0)
    assert (await admin(http, p, "/readyz"))["shared_state"] == {"status": "ok"}
    assert len(await mock_log(http, mock_server)) == 5


async def test_a_quick_redis_restart_gets_the_cooldowns_in_force_written_back(
    env: Env,
    mock_server: TestServer,
    processes: list[Process],
    http: aiohttp.ClientSession,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    """Restarted between two beats, Redis comes back empty while every connection seems
    fine: the replica notices the new server and writes what is in force again."""
    token = env.access_key("app")
    body = providers_yaml(
        env, openai=[("limited", "sk-l-fail-429-retry-30"), ("spare", "sk-s")]
    ) + shared_yaml(redis_server.url)
    (p,) = await spawn(env, body, processes, n=1)
    await eventually(lambda: shared_up(http, p), 1.0)
    async with client(p, token) as c:
        await c.chat.completions.create(model=MODEL, messages=PROMPT)
    redis = aioredis.Redis.from_url(redis_server.url)
    try:

        async def cooling_in_redis() -> int:
            try:
                return int(await redis.zcard("sidecar:cool-index"))
            except (RedisError, OSError):
                return -1

        await eventually(cooling_in_redis, 1)
        redis_server.stop()
        redis_server.start()
        assert await cooling_in_redis() in (-1, 0)  # an empty Redis
        await eventually(cooling_in_redis, 1)  # written back by the replica
    finally:
        await redis.aclose()
    assert await pair_state(http, p, "limited", MODEL) == ("cooling", MODEL)


async def test_a_redis_user_without_dangerous_commands_runs_the_link(
    env: Env,
    mock_server: TestServer,
    processes: list[Process],
    http: aiohttp.ClientSession,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    """The usual application account (`+@all -@dangerous`: no INFO, no KEYS) is enough, and
    its password appears nowhere the sidecar writes."""
    admin_client = aioredis.Redis.from_url(redis_server.url)
    try:
        await admin_client.acl_setuser("app", enabled=True, passwords=["+s3cret-LEAKPROBE"],
                                       keys=["*"], channels=["*"],
                                       commands=["+@all", "-@dangerous"])  # fmt: skip
    finally:
        await admin_client.aclose()
    url = f"redis://app:s3cret-LEAKPROBE@127.0.0.1:{redis_server.port}/0"
    metered = env.access_key("metered", rpm=2)
    (p,) = await spawn(env, providers_yaml(env, openai=[("k", "sk-k")]) + shared_yaml(url),
                       processes, n=1)  # fmt: skip
    await eventually(lambda: shared_up(http, p), 1.0)
    async with client(p, metered) as c:
        for _ in range(2):
            await c.chat.completions.create(model=MODEL, messages=PROMPT)
        with pytest.raises(openai.RateLimitError):
            await c.chat.completions.create(model=MODEL, messages=PROMPT)
    assert await shared_up(http, p) == 1.0  # counted on Redis, never fell back
    assert "LEAKPROBE" not in p.stderr_path.read_text()
    assert "LEAKPROBE" not in await admin(http, p, "/metrics")
