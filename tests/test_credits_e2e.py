"""Managed keys and credits end to end (docs/reference.md: provider keys, errors, metrics), with the SQLite ledger.

A real sidecar in front of the mock provider, driven by the official SDKs
(and raw aiohttp where the SSE bytes matter). Spend is charged after the
response in a background task, so every check of spend polls with a deadline.
Expected costs are computed here from the usage the caller saw (or the mock's
deterministic counts) times the configured prices, never from the sidecar.

Prices are huge on purpose: gpt-4o-mini costs $1 per input and $2 per output
token, so each token is a whole number of dollars and float metrics are exact.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Awaitable, Callable
from decimal import ROUND_CEILING, Decimal
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest
from aiohttp.test_utils import TestServer

from sidecar.cli import main as cli_main
from sidecar.prices import BUILTIN_PRICES, Price, PriceTable
from tests.harness import Env, Sidecar, metric_value

WAIT = 10.0  # seconds: upper bound for background charges and reloads
# Known-bug tests wait less for a charge that never comes (charges land in milliseconds).

MANAGED_OPENAI = "sk-managed-openai-pool-1"
MANAGED_ANTHROPIC = "sk-ant-managed-pool-1"
POLICY_LOCAL = "sk-local-policy-1"
POLICY_OPENAI = "sk-openai-policy-1"
ATTACHED_OPENAI = "sk-attached-openai-1"

# Micro-USD per token (a price in USD per 1M tokens is micro-USD per token).
CHAT_IN, CHAT_OUT = 1_000_000, 2_000_000  # gpt-4o-mini
CLAUDE_IN, CLAUDE_OUT = 3_000_000, 4_000_000  # claude-haiku-4-5
EMBED_IN = 5_000_000  # text-embedding-3-small

MOCK_REPLY = "Hello from the mock provider."
MOCK_OUTPUT_TOKENS = len(MOCK_REPLY.split())

PRICES = f"""\
prices:
  gpt-4o-mini: {{input: {CHAT_IN}, output: {CHAT_OUT}}}
  claude-haiku-4-5: {{input: {CLAUDE_IN}, output: {CLAUDE_OUT}}}
  text-embedding-3-small: {{input: {EMBED_IN}, output: 0}}
"""


def providers_yaml(env: Env, *, openai_policy: bool = False) -> str:
    """openai + anthropic on the mock, a custom `local` provider on a policy key, managed pools."""
    openai_keys = ""
    if openai_policy:
        ref = env.secret("openai", "policy-1", POLICY_OPENAI)
        openai_keys = f'    api_keys: [{{id: org-policy, value: "{ref}"}}]\n'
    local = env.secret("local", "policy-1", POLICY_LOCAL)
    m_openai = env.secret("managed", "openai-1", MANAGED_OPENAI)
    m_anthropic = env.secret("managed", "anthropic-1", MANAGED_ANTHROPIC)
    return (
        "providers:\n"
        "  - id: openai\n    base_url: UPSTREAM\n" + openai_keys
        + "  - id: anthropic\n    base_url: UPSTREAM\n"
        "  - id: local\n    base_url: UPSTREAM\n    format: openai\n"
        f'    api_keys: [{{id: local-policy, value: "{local}"}}]\n'
        "    models: [{id: llama3.2}]\n"
        "managed:\n"
        f'  openai: [{{id: pool-1, value: "{m_openai}"}}]\n'
        f'  anthropic: [{{id: pool-1, value: "{m_anthropic}"}}]\n'
    )  # fmt: skip


SQLITE_LEDGER = 'ledger: {url: "sqlite:///ledger.db"}\n'


async def start(
    env: Env, sidecars: list[Sidecar], *, openai_policy: bool = False, prices: str = PRICES
) -> Sidecar:
    """A sidecar on `providers_yaml` with the SQLite ledger next to its config."""
    env.write_config(providers_yaml(env, openai_policy=openai_policy) + SQLITE_LEDGER + prices)
    sc = await env.start()
    sidecars.append(sc)
    return sc


# --------------------------------------------------------------------------- helpers


async def metrics(sc: Sidecar) -> str:
    async with aiohttp.ClientSession() as s, s.get(sc.admin_url + "/metrics") as r:
        assert r.status == 200
        return await r.text()


async def spent_metric(sc: Sidecar, name: str) -> float:
    return metric_value(await metrics(sc), "sidecar_credits_spent_usd_total", access_key=name)


async def remaining_metric(sc: Sidecar, name: str) -> float:
    return metric_value(await metrics(sc), "sidecar_credits_remaining_usd", access_key=name)


def sqlite_spent(path: Path, name: str) -> int:
    """Micro-USD in the SQLite ledger for `name`, read-only with the stdlib."""
    if not path.exists():
        return 0
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT micro_usd FROM spend WHERE access_key = ?", (name,)).fetchone()
    except sqlite3.OperationalError as exc:  # the table appears with the first connection
        if "no such table" in str(exc):
            return 0
        raise
    finally:
        conn.close()
    return int(row[0]) if row else 0


async def eventually(
    probe: Callable[[], Awaitable[Any]], expected: Any, *, within: float = WAIT
) -> Any:
    """Poll `probe` until it returns `expected`; assert with the last value seen."""
    deadline = time.monotonic() + within
    while True:
        value = await probe()
        if value == expected or time.monotonic() >= deadline:
            assert value == expected
            return value
        await asyncio.sleep(0.05)


async def ledger_and_metric_show(
    sc: Sidecar, name: str, micro_usd: int, grant_usd: float, *, within: float = WAIT
) -> None:
    """Spend (ledger and /metrics) and the remaining gauge all agree with the expected spend."""
    ledger = sc.env.dir / "ledger.db"

    async def from_ledger() -> int:
        return sqlite_spent(ledger, name)

    await eventually(from_ledger, micro_usd, within=within)
    await eventually(lambda: spent_metric(sc, name), micro_usd / 1e6, within=within)
    await eventually(lambda: remaining_metric(sc, name), grant_usd - micro_usd / 1e6, within=within)


async def mock_log(mock_server: TestServer) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as s, s.get(mock_server.make_url("/_mock/requests")) as r:
        data = await r.json()
    return list(data["requests"])


def words(text: str) -> int:
    return len(text.split())


def sse_events(raw: bytes) -> list[bytes]:
    """The `data:` payloads of an SSE body, in order."""
    out = []
    for event in raw.replace(b"\r\n", b"\n").split(b"\n\n"):
        for line in event.split(b"\n"):
            if line.startswith(b"data:"):
                out.append(line[5:].strip())
    return out


# --------------------------------------------------------------------------- key tiers


async def test_managed_tier_only_when_attached_and_policy_are_empty(
    env: Env, sidecars: list[Sidecar], mock_server: TestServer
) -> None:
    attached = env.access_key("with-attached")  # no credits: managed keys would be refused
    env.attach("with-attached", "openai", "team-key", ATTACHED_OPENAI)
    managed = env.access_key("managed-only", credits=1000)
    sc = await start(env, sidecars)
    prompt = [{"role": "user", "content": "one two three"}]

    async with sc.openai(attached) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=prompt
        )
    assert raw.headers["x-sidecar-key-source"] == "attached"
    assert raw.headers["x-sidecar-key-id"] == "team-key"

    async with sc.openai(managed) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=prompt
        )
        chat = raw.parse()
        assert raw.headers["x-sidecar-key-source"] == "managed"
        assert raw.headers["x-sidecar-key-id"] == "pool-1"
        # Mixed mode: the same access key reaches a custom provider through its policy key.
        local = await client.chat.completions.with_raw_response.create(
            model="llama3.2", messages=prompt
        )
    assert local.headers["x-sidecar-provider"] == "local"
    assert local.headers["x-sidecar-key-source"] == "policy"
    assert local.headers["x-sidecar-key-id"] == "local-policy"

    assert [r["key"] for r in await mock_log(mock_server)] == [
        ATTACHED_OPENAI,
        MANAGED_OPENAI,
        POLICY_LOCAL,
    ]
    assert chat.usage is not None
    cost = chat.usage.prompt_tokens * CHAT_IN + chat.usage.completion_tokens * CHAT_OUT
    # Only the managed request is charged; the policy one (made later) adds nothing.
    await ledger_and_metric_show(sc, "managed-only", cost, 1000)
    assert sqlite_spent(env.dir / "ledger.db", "with-attached") == 0
    assert await spent_metric(sc, "with-attached") == 0


async def test_policy_keys_win_over_managed(
    env: Env, sidecars: list[Sidecar], mock_server: TestServer
) -> None:
    broke = env.access_key("broke")  # zero credits: a managed key would answer 402
    rich = env.access_key("rich", credits=1000)
    sc = await start(env, sidecars, openai_policy=True)

    for token in (broke, rich):
        async with sc.openai(token) as client:
            raw = await client.chat.completions.with_raw_response.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
            )
        assert raw.headers["x-sidecar-key-source"] == "policy"
        assert raw.headers["x-sidecar-key-id"] == "org-policy"

    # A managed anthropic request of `rich` is the barrier: once it is charged, so would the others be.
    async with sc.anthropic(rich) as client:
        msg = await client.messages.create(
            model="claude-haiku-4-5", max_tokens=64, messages=[{"role": "user", "content": "hi"}]
        )
    assert [r["key"] for r in await mock_log(mock_server)] == [
        POLICY_OPENAI,
        POLICY_OPENAI,
        MANAGED_ANTHROPIC,
    ]
    cost = msg.usage.input_tokens * CLAUDE_IN + msg.usage.output_tokens * CLAUDE_OUT
    await ledger_and_metric_show(sc, "rich", cost, 1000)
    assert await spent_metric(sc, "broke") == 0


# --------------------------------------------------------------------------- exact spend


async def test_spend_matches_usage_times_price_for_every_route(
    env: Env, sidecars: list[Sidecar], mock_server: TestServer
) -> None:
    token = env.access_key("app", credits=10_000)
    sc = await start(env, sidecars)
    expected = 0

    async with sc.openai(token) as client:
        chat = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "alpha beta gamma"}]
        )
        assert chat.usage is not None
        expected += chat.usage.prompt_tokens * CHAT_IN + chat.usage.completion_tokens * CHAT_OUT
        await ledger_and_metric_show(sc, "app", expected, 10_000)

        stream = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "one two three four five"}],
            stream=True, stream_options={"include_usage": True},
        )  # fmt: skip
        usages = [c.usage async for c in stream if c.usage is not None]
        assert len(usages) == 1
        expected += usages[0].prompt_tokens * CHAT_IN + usages[0].completion_tokens * CHAT_OUT
        await ledger_and_metric_show(sc, "app", expected, 10_000)

        resp = await client.responses.create(
            model="gpt-4o-mini", input="six words for the responses api"
        )
        assert resp.usage is not None
        expected += resp.usage.input_tokens * CHAT_IN + resp.usage.output_tokens * CHAT_OUT
        await ledger_and_metric_show(sc, "app", expected, 10_000)

        events = await client.responses.create(model="gpt-4o-mini", input="streamed", stream=True)
        done = [e.response async for e in events if e.type == "response.completed"]
        assert len(done) == 1
        assert done[0].usage is not None
        expected += done[0].usage.input_tokens * CHAT_IN + done[0].usage.output_tokens * CHAT_OUT
        await ledger_and_metric_show(sc, "app", expected, 10_000)

        emb = await client.embeddings.create(model="text-embedding-3-small", input="a b c d e f g")
        expected += emb.usage.prompt_tokens * EMBED_IN
        await ledger_and_metric_show(sc, "app", expected, 10_000)

    async with sc.anthropic(token) as client:
        msg = await client.messages.create(
            model="claude-haiku-4-5", max_tokens=64, system="be brief",
            messages=[{"role": "user", "content": "say hello please"}],
        )  # fmt: skip
        expected += msg.usage.input_tokens * CLAUDE_IN + msg.usage.output_tokens * CLAUDE_OUT
        await ledger_and_metric_show(sc, "app", expected, 10_000)

        async with client.messages.stream(
            model="claude-haiku-4-5",
            max_tokens=64,
            messages=[{"role": "user", "content": "stream it"}],
        ) as s:
            final = await s.get_final_message()
        expected += final.usage.input_tokens * CLAUDE_IN + final.usage.output_tokens * CLAUDE_OUT
        await ledger_and_metric_show(sc, "app", expected, 10_000)

    # Sanity on the arithmetic: the mock's deterministic counts, not just the SDK's echo.
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (3, MOCK_OUTPUT_TOKENS)
    assert (final.usage.input_tokens, final.usage.output_tokens) == (2, MOCK_OUTPUT_TOKENS)
    assert len(await mock_log(mock_server)) == 7


# --------------------------------------------------------------------------- credits


async def test_zero_credits_get_402_before_any_upstream_call(
    env: Env, sidecars: list[Sidecar], mock_server: TestServer
) -> None:
    token = env.access_key("empty")
    sc = await start(env, sidecars)

    async with sc.openai(token) as client:
        with pytest.raises(openai.APIStatusError) as oi:
            await client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
            )
    resp = oi.value.response
    assert resp.status_code == 402
    assert resp.headers["x-should-retry"] == "false"
    body = resp.json()
    assert body["error"]["code"] == "credits_exhausted"
    assert set(body["error"]) == {"message", "type", "code", "param"}
    assert body["error"]["param"] is None

    async with sc.anthropic(token) as client:
        with pytest.raises(anthropic.APIStatusError) as an:
            await client.messages.create(
                model="claude-haiku-4-5",
                max_tokens=16,
                messages=[{"role": "user", "content": "hi"}],
            )
    resp = an.value.response
    assert resp.status_code == 402
    assert resp.headers["x-should-retry"] == "false"
    body = resp.json()
    assert body["type"] == "error"
    assert body["error"]["code"] == "credits_exhausted"
    assert isinstance(body["error"]["type"], str)
    assert isinstance(body["error"]["message"], str)

    assert await mock_log(mock_server) == []
    # Only managed providers need credits: the policy-keyed custom provider still answers.
    async with sc.openai(token) as client:
        local = await client.chat.completions.create(
            model="llama3.2", messages=[{"role": "user", "content": "hi"}]
        )
    assert local.choices[0].message.content == MOCK_REPLY


async def test_crossing_the_grant_then_set_credits_restores_access(
    env: Env, sidecars: list[Sidecar], mock_server: TestServer
) -> None:
    token = env.access_key("small", credits=5)
    sc = await start(env, sidecars)
    prompt = [{"role": "user", "content": "one two three"}]
    per_request = 3 * CHAT_IN + MOCK_OUTPUT_TOKENS * CHAT_OUT  # $13 against a $5 grant

    async with sc.openai(token) as client:
        await client.chat.completions.create(
            model="gpt-4o-mini", messages=prompt
        )  # $5 left: allowed
        await ledger_and_metric_show(sc, "small", per_request, 5)

        with pytest.raises(openai.APIStatusError) as exc:
            await client.chat.completions.create(model="gpt-4o-mini", messages=prompt)
        assert exc.value.status_code == 402
        assert exc.value.response.json()["error"]["code"] == "credits_exhausted"
        assert len(await mock_log(mock_server)) == 1

        reloads = metric_value(await metrics(sc), "sidecar_vault_reloads_total", result="ok")
        assert (
            cli_main(["access-key", "set-credits", "--vault", str(env.vault), "small", "100"]) == 0
        )

        async def reloaded() -> bool:
            return (
                metric_value(await metrics(sc), "sidecar_vault_reloads_total", result="ok")
                > reloads
            )

        await eventually(reloaded, True)
        await client.chat.completions.create(model="gpt-4o-mini", messages=prompt)
    await ledger_and_metric_show(sc, "small", 2 * per_request, 100)


# --------------------------------------------------------------------------- stream usage


async def _raw_stream(sc: Sidecar, token: str, body: dict[str, Any]) -> tuple[int, list[bytes]]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            sc.url + "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {token}"}
        ) as r,
    ):
        return r.status, sse_events(await r.read())


async def test_stream_usage_is_metered_but_stripped_unless_asked(
    env: Env, sidecars: list[Sidecar], mock_server: TestServer
) -> None:
    token = env.access_key("streamer", credits=1000)
    sc = await start(env, sidecars)
    text = "count these seven words right now please"
    request = {
        "model": "gpt-4o-mini",
        "stream": True,
        "messages": [{"role": "user", "content": text}],
    }
    labels = {"provider": "openai", "model": "gpt-4o-mini"}

    status, events = await _raw_stream(sc, token, request)
    assert status == 200
    assert events[-1] == b"[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert [c for c in chunks if c.get("usage") is not None] == []
    assert (
        "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        == MOCK_REPLY
    )
    # Upstream was asked for usage so the sidecar could meter it.
    upstream = (await mock_log(mock_server))[-1]["body"]
    assert upstream["stream_options"] == {"include_usage": True}

    async def tokens() -> tuple[float, float]:
        page = await metrics(sc)
        return (metric_value(page, "sidecar_tokens_total", kind="input", **labels),
                metric_value(page, "sidecar_tokens_total", kind="output", **labels))  # fmt: skip

    await eventually(tokens, (words(text), MOCK_OUTPUT_TOKENS))
    cost = words(text) * CHAT_IN + MOCK_OUTPUT_TOKENS * CHAT_OUT
    await ledger_and_metric_show(sc, "streamer", cost, 1000)

    status, events = await _raw_stream(
        sc, token, {**request, "stream_options": {"include_usage": True}}
    )
    assert status == 200
    usage = [c["usage"] for c in map(orjson.loads, events[:-1]) if c.get("usage") is not None]
    assert usage == [{"prompt_tokens": words(text), "completion_tokens": MOCK_OUTPUT_TOKENS,
                      "total_tokens": words(text) + MOCK_OUTPUT_TOKENS}]  # fmt: skip
    await eventually(tokens, (2 * words(text), 2 * MOCK_OUTPUT_TOKENS))
    await ledger_and_metric_show(sc, "streamer", 2 * cost, 1000)

    # An explicit `include_usage: false` is a caller who did not ask: metered, not shown.
    status, events = await _raw_stream(
        sc, token, {**request, "stream_options": {"include_usage": False}}
    )
    assert status == 200
    assert [c for c in map(orjson.loads, events[:-1]) if c.get("usage") is not None] == []
    await eventually(tokens, (3 * words(text), 3 * MOCK_OUTPUT_TOKENS))
    await ledger_and_metric_show(sc, "streamer", 3 * cost, 1000)


async def test_caller_leaving_mid_stream_is_charged_for_what_was_metered(
    env: Env, sidecars: list[Sidecar], mock_server: TestServer
) -> None:
    token = env.access_key("quitter", credits=1000)
    sc = await start(env, sidecars)
    # `stall-300`: the mock waits 300 ms between events, so the caller leaves mid-stream.
    body = {"model": "claude-haiku-4-5-stall-300", "max_tokens": 64, "stream": True,
            "messages": [{"role": "user", "content": "one two three"}]}  # fmt: skip
    async with aiohttp.ClientSession() as s:
        resp = await s.post(sc.url + "/v1/messages", json=body, headers={"x-api-key": token})
        assert resp.status == 200
        assert b"message_start" in await resp.content.readany()
        resp.close()

    async def logged() -> list[dict[str, Any]]:
        return [r for r in env.access.records() if r.get("access_key") == "quitter"]

    await eventually(lambda: _count(logged), 1)
    line = (await logged())[0]
    assert line["input_tokens"] == 3  # message_start carries the whole prompt
    assert line["output_tokens"] >= 1
    cost = line["input_tokens"] * CLAUDE_IN + line["output_tokens"] * CLAUDE_OUT
    await ledger_and_metric_show(sc, "quitter", cost, 1000)


async def test_openai_stream_abandoned_before_usage_is_charged_an_estimate(
    env: Env, sidecars: list[Sidecar], mock_server: TestServer
) -> None:
    """OpenAI reports stream usage only in the last chunk: a caller leaving earlier must
    not make a managed request free."""
    token = env.access_key("leaver", credits=1000)
    sc = await start(env, sidecars)
    body = {"model": "gpt-4o-mini-stall-300", "stream": True,
            "messages": [{"role": "user", "content": "one two three"}]}  # fmt: skip
    async with aiohttp.ClientSession() as s:
        resp = await s.post(sc.url + "/v1/chat/completions", json=body,
                            headers={"authorization": f"Bearer {token}"})  # fmt: skip
        assert resp.status == 200
        assert b"data:" in await resp.content.readany()
        resp.close()

    async def logged() -> list[dict[str, Any]]:
        return [r for r in env.access.records() if r.get("access_key") == "leaver"]

    await eventually(lambda: _count(logged), 1)
    line = (await logged())[0]
    assert line["input_tokens"] >= 1
    assert line["output_tokens"] >= 1
    assert any(r.get("event") == "usage_estimated" for r in env.oplog.records())
    cost = line["input_tokens"] * CHAT_IN + line["output_tokens"] * CHAT_OUT
    assert cost > 0
    await ledger_and_metric_show(sc, "leaver", cost, 1000)


async def _count(probe: Callable[[], Awaitable[list[Any]]]) -> int:
    return len(await probe())


# --------------------------------------------------------------------------- unpriced models


def _cost_at(price: Price, input_tokens: int, output_tokens: int) -> int:
    """Micro-USD, rounded up: USD per 1M tokens is micro-USD per token."""
    exact = Decimal(repr(price.input)) * input_tokens + Decimal(repr(price.output)) * output_tokens
    return int(exact.to_integral_value(rounding=ROUND_CEILING))


async def test_unpriced_model_is_charged_at_the_providers_highest_price(
    env: Env, sidecars: list[Sidecar], mock_server: TestServer
) -> None:
    token = env.access_key("explorer", credits=100)
    # No `prices:` here: the built-in table alone decides the fallback.
    sc = await start(env, sidecars, prices="")
    price, known = PriceTable().price_for("openai", "gpt-unknown-model")
    assert not known
    openai_prices = BUILTIN_PRICES["openai"].values()
    assert price == Price(max(p.input for p in openai_prices), max(p.output for p in openai_prices))
    expected = 0
    async with sc.openai(token) as client:
        for _ in range(2):
            raw = await client.chat.completions.with_raw_response.create(
                model="gpt-unknown-model",
                messages=[{"role": "user", "content": "what model are you"}],
            )
            assert raw.headers["x-sidecar-provider"] == "openai"
            assert raw.headers["x-sidecar-key-source"] == "managed"
            usage = raw.parse().usage
            assert usage is not None
            expected += _cost_at(price, usage.prompt_tokens, usage.completion_tokens)

            async def from_ledger() -> int:
                return sqlite_spent(env.dir / "ledger.db", "explorer")

            await eventually(from_ledger, expected)

    async def spent_micro() -> int:
        return round(await spent_metric(sc, "explorer") * 1e6)

    await eventually(spent_micro, expected)
    warnings = [r for r in env.oplog.records() if r.get("event") == "model_unpriced"]
    assert len(warnings) == 1
    assert warnings[0]["level"] == "warning"
    assert (warnings[0]["provider"], warnings[0]["model"]) == ("openai", "gpt-unknown-model")


# --------------------------------------------------------------------------- reloads


async def _reload(sc: Sidecar, env: Env, body: str) -> None:
    before = metric_value(await metrics(sc), "sidecar_vault_reloads_total", result="ok")
    env.write_config(body)

    async def reloaded() -> bool:
        return metric_value(await metrics(sc), "sidecar_vault_reloads_total", result="ok") > before

    await eventually(reloaded, True)


async def test_managed_keys_added_by_reload_are_charged(
    env: Env, sidecars: list[Sidecar], mock_server: TestServer
) -> None:
    token = env.access_key("late", credits=5)
    body = providers_yaml(env) + SQLITE_LEDGER + PRICES
    env.write_config(body.split("managed:\n")[0] + SQLITE_LEDGER + PRICES)  # no managed keys yet
    sc = await env.start()
    sidecars.append(sc)
    await _reload(sc, env, body)
    prompt = [{"role": "user", "content": "one two three"}]
    async with sc.openai(token) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=prompt
        )
        assert raw.headers["x-sidecar-key-source"] == "managed"
        cost = 3 * CHAT_IN + MOCK_OUTPUT_TOKENS * CHAT_OUT
        await ledger_and_metric_show(sc, "late", cost, 5, within=10.0)
        with pytest.raises(openai.APIStatusError) as exc:
            await client.chat.completions.create(model="gpt-4o-mini", messages=prompt)
    assert exc.value.status_code == 402


async def test_prices_changed_by_reload_apply_to_the_next_request(
    env: Env, sidecars: list[Sidecar], mock_server: TestServer
) -> None:
    token = env.access_key("repriced", credits=1000)
    base = providers_yaml(env) + SQLITE_LEDGER
    env.write_config(base + PRICES)
    sc = await env.start()
    sidecars.append(sc)
    await _reload(sc, env, base + "prices:\n  gpt-4o-mini: {input: 7000000, output: 0}\n")
    async with sc.openai(token) as client:
        await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "one two three"}]
        )
    await ledger_and_metric_show(sc, "repriced", 3 * 7_000_000, 1000, within=10.0)
