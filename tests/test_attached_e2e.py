"""Attached provider keys end to end (docs/reference.md#provider-keys), with the official SDKs against a running sidecar.

Attached keys belong to one access key and one provider: they replace the
policy keys for that provider only, newest first, and a cooling attached key
never falls through to the policy keys.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import anthropic
import openai
import pytest

from tests.harness import Env, Sidecar, metric_value

POLICY_OPENAI = "sk-policy-openai"
POLICY_ANTHROPIC = "sk-ant-policy"

CONFIG = """\
providers:
  - id: openai
    base_url: UPSTREAM
    api_keys: [{id: pol-openai, value: "${secrets.get('openai', 'policy')}"}]
  - id: anthropic
    base_url: UPSTREAM
    api_keys: [{id: pol-anthropic, value: "${secrets.get('anthropic', 'policy')}"}]
"""
MESSAGES: list[Any] = [{"role": "user", "content": "hello there"}]


@pytest.fixture
def policy_env(env: Env) -> Env:
    env.secret("openai", "policy", POLICY_OPENAI)
    env.secret("anthropic", "policy", POLICY_ANTHROPIC)
    env.write_config(CONFIG)
    return env


async def start(env: Env, sidecars: list[Sidecar]) -> Sidecar:
    sc = await env.start()
    sidecars.append(sc)
    return sc


async def upstream_keys(env: Env) -> list[str | None]:
    """Keys the mock upstream received, in order; the log is cleared after reading."""
    base = env.upstream.removesuffix("/v1")
    async with aiohttp.ClientSession() as http:
        async with http.get(base + "/_mock/requests") as resp:
            keys = [r["key"] for r in (await resp.json())["requests"]]
        async with http.delete(base + "/_mock/requests") as resp:
            assert resp.status < 300
    return keys


async def chat(sc: Sidecar, token: str) -> dict[str, str]:
    async with sc.openai(token) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=MESSAGES
        )
    assert raw.parse().choices[0].message.content == "Hello from the mock provider."
    return {k: v for k, v in raw.headers.items() if k.startswith("x-sidecar-")}


async def message(sc: Sidecar, token: str) -> dict[str, str]:
    async with sc.anthropic(token) as client:
        raw = await client.messages.with_raw_response.create(
            model="claude-3-5-haiku-latest", max_tokens=32, messages=MESSAGES
        )
    assert (await raw.parse()).content[0].text == "Hello from the mock provider."  # type: ignore[union-attr]
    return {k: v for k, v in raw.headers.items() if k.startswith("x-sidecar-")}


def source_and_id(headers: dict[str, str]) -> tuple[str, str]:
    return headers["x-sidecar-key-source"], headers["x-sidecar-key-id"]


async def test_mixed_mode_attached_for_one_provider_only(
    policy_env: Env, sidecars: list[Sidecar]
) -> None:
    env = policy_env
    token = env.access_key("checkout")
    env.attach("checkout", "openai", "team-openai", "sk-attached-openai")
    sc = await start(env, sidecars)

    assert source_and_id(await chat(sc, token)) == ("attached", "team-openai")
    assert source_and_id(await message(sc, token)) == ("policy", "pol-anthropic")
    assert await upstream_keys(env) == ["sk-attached-openai", POLICY_ANTHROPIC]

    metrics = await admin_text(sc)
    assert metric_value(metrics, "sidecar_key_selections_total", provider="openai",
                        source="attached", key_id="team-openai") == 1  # fmt: skip
    assert metric_value(metrics, "sidecar_key_selections_total", provider="openai",
                        source="policy") == 0  # fmt: skip


async def test_newest_attached_first_older_is_the_failover(
    policy_env: Env, sidecars: list[Sidecar]
) -> None:
    env = policy_env
    token = env.access_key("checkout")
    env.attach("checkout", "openai", "older", "sk-older")
    env.attach("checkout", "openai", "newer", "sk-newer-fail-429-retry-60")
    sc = await start(env, sidecars)

    headers = await chat(sc, token)
    assert source_and_id(headers) == ("attached", "older")
    assert headers["x-sidecar-attempts"] == "2"
    assert await upstream_keys(env) == ["sk-newer-fail-429-retry-60", "sk-older"]

    # The newer key cools down: the next request goes straight to the older one.
    headers = await chat(sc, token)
    assert (headers["x-sidecar-key-id"], headers["x-sidecar-attempts"]) == ("older", "1")
    assert await upstream_keys(env) == ["sk-older"]


async def test_cooling_attached_keys_never_fall_through_to_policy(
    policy_env: Env, sidecars: list[Sidecar]
) -> None:
    env = policy_env
    token = env.access_key("checkout")
    env.attach("checkout", "openai", "only", "sk-only-fail-429-retry-60")
    sc = await start(env, sidecars)

    async with sc.openai(token) as client:
        with pytest.raises(openai.RateLimitError) as first:
            await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        # The upstream's own 429 is relayed; the key starts cooling.
        assert first.value.response.headers["x-sidecar-key-id"] == "only"
        with pytest.raises(openai.RateLimitError) as second:
            await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    resp = second.value.response
    assert resp.json()["error"]["code"] == "all_keys_cooling_down"
    assert 1 <= int(resp.headers["retry-after"]) <= 60
    assert await upstream_keys(env) == ["sk-only-fail-429-retry-60"]

    # The same holds for Anthropic; other providers of the access key are unaffected.
    env.attach("checkout", "anthropic", "ant-only", "sk-ant-only-fail-429-retry-60")
    await wait_for_reloads(sc, 2)
    async with sc.anthropic(token) as ant:
        with pytest.raises(anthropic.RateLimitError):
            await ant.messages.create(
                model="claude-3-5-haiku-latest", max_tokens=8, messages=MESSAGES
            )
        with pytest.raises(anthropic.RateLimitError) as cooling:
            await ant.messages.create(
                model="claude-3-5-haiku-latest", max_tokens=8, messages=MESSAGES
            )
    body = cooling.value.response.json()
    assert body["type"] == "error"
    assert body["error"]["code"] == "all_keys_cooling_down"
    assert await upstream_keys(env) == ["sk-ant-only-fail-429-retry-60"]


async def test_attached_keys_belong_to_one_access_key(
    policy_env: Env, sidecars: list[Sidecar]
) -> None:
    env = policy_env
    owner = env.access_key("owner")
    other = env.access_key("other")
    third = env.access_key("third")
    env.attach("owner", "openai", "owner-key", "sk-owner-private")
    env.attach("third", "openai", "third-key", "sk-third-private")
    sc = await start(env, sidecars)

    assert source_and_id(await chat(sc, other)) == ("policy", "pol-openai")
    assert source_and_id(await chat(sc, owner)) == ("attached", "owner-key")
    assert source_and_id(await chat(sc, third)) == ("attached", "third-key")
    assert source_and_id(await chat(sc, other)) == ("policy", "pol-openai")
    assert await upstream_keys(env) == [
        POLICY_OPENAI, "sk-owner-private", "sk-third-private", POLICY_OPENAI
    ]  # fmt: skip


async def test_no_policy_keys_means_no_key_not_someone_elses(
    env: Env, sidecars: list[Sidecar]
) -> None:
    """Without policy or managed keys, an access key without attachments gets no_provider_key."""
    owner = env.access_key("owner")
    other = env.access_key("other")
    env.attach("owner", "openai", "owner-key", "sk-owner-private")
    env.write_config("providers:\n  - id: openai\n    base_url: UPSTREAM\n")
    sc = await start(env, sidecars)

    assert source_and_id(await chat(sc, owner)) == ("attached", "owner-key")
    async with sc.openai(other) as client:
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert info.value.response.json()["error"]["code"] == "no_provider_key"
    assert info.value.response.headers["x-should-retry"] == "false"
    assert await upstream_keys(env) == ["sk-owner-private"]


async def admin_text(sc: Sidecar) -> str:
    async with aiohttp.ClientSession() as http, http.get(sc.admin_url + "/metrics") as resp:
        return await resp.text()


async def wait_for_reloads(sc: Sidecar, count: int, within: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while loop.time() < deadline:
        if metric_value(await admin_text(sc), "sidecar_vault_reloads_total", result="ok") >= count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"no {count} successful reloads within {within}s")


async def test_cooling_gauge_names_every_id_of_a_shared_key(
    env: Env, sidecars: list[Sidecar]
) -> None:
    """The same provider key as policy `pol` and attached `att`: health is per value, so both cool."""
    shared = "sk-shared-fail-429-retry-60"
    env.secret("openai", "policy", shared)
    owner = env.access_key("owner")
    other = env.access_key("other")
    env.attach("owner", "openai", "att", shared)
    env.write_config(
        "providers:\n  - id: openai\n    base_url: UPSTREAM\n"
        "    api_keys: [{id: pol, value: \"${secrets.get('openai', 'policy')}\"}]\n"
    )
    sc = await start(env, sidecars)
    async with sc.openai(owner) as client:
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    async with sc.openai(other) as client:
        with pytest.raises(openai.RateLimitError) as info:
            await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    # `other` is refused because its policy key `pol` cools...
    assert info.value.response.json()["error"]["code"] == "all_keys_cooling_down"
    metrics = await admin_text(sc)
    assert metric_value(metrics, "sidecar_key_cooling_down", source="attached", key_id="att") == 1
    # ...so the gauge must say so.
    assert metric_value(metrics, "sidecar_key_cooling_down", source="policy", key_id="pol") == 1
