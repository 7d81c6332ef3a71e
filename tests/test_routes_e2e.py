"""Routes the official SDKs and coding agents use besides the model calls: model lookup in
both SDK shapes, and the Responses API's WebSocket mode refused at once."""

from __future__ import annotations

import aiohttp
import anthropic
import openai
import pytest
from aiohttp.test_utils import TestServer

from tests.harness import Env, Sidecar
from tests.test_proxy_e2e import boot, keys_yaml, mock_log, providers_yaml


async def test_the_openai_sdk_retrieves_a_model_this_key_may_use(
    env: Env, sidecars: list[Sidecar], token: str
) -> None:
    sc = await boot(env, sidecars, providers_yaml(env, openai=[("k1", "sk-one")]))
    async with sc.openai(token) as client:
        model = await client.models.retrieve("gpt-4o-mini")
        assert (model.id, model.owned_by) == ("gpt-4o-mini", "openai")
        with pytest.raises(openai.NotFoundError):
            await client.models.retrieve("no-such-model")


async def test_a_model_outside_the_keys_scope_is_not_found(
    env: Env, sidecars: list[Sidecar]
) -> None:
    token = env.access_key("narrow", models=["gpt-4o-mini"])
    sc = await boot(env, sidecars, providers_yaml(env, openai=[("k1", "sk-one")]))
    async with sc.openai(token) as client:
        assert (await client.models.retrieve("gpt-4o-mini")).id == "gpt-4o-mini"
        with pytest.raises(openai.NotFoundError):
            await client.models.retrieve("gpt-4o")
        assert [m.id async for m in client.models.list()] == ["gpt-4o-mini"]


async def test_the_anthropic_sdk_lists_and_retrieves_models_in_its_own_shape(
    env: Env, sidecars: list[Sidecar], token: str
) -> None:
    sc = await boot(env, sidecars, providers_yaml(env, anthropic=[("a1", "sk-ant-one")]))
    async with sc.anthropic(token) as client:
        listed = [m async for m in client.models.list()]
        assert "claude-haiku-4-5" in [m.id for m in listed]
        assert all(m.type == "model" for m in listed)
        one = await client.models.retrieve("claude-haiku-4-5")
        assert (one.id, one.display_name) == ("claude-haiku-4-5", "claude-haiku-4-5")
        with pytest.raises(anthropic.NotFoundError):
            await client.models.retrieve("claude-no-such-model-at-all")


async def test_the_responses_websocket_mode_is_refused_with_426_at_once(
    env: Env, sidecars: list[Sidecar], token: str, http: aiohttp.ClientSession
) -> None:
    # The Codex CLI tries a WebSocket first and falls back to HTTPS on a 426; a 404 made
    # it retry seven times.
    sc = await boot(env, sidecars, providers_yaml(env, openai=[("k1", "sk-one")]))
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await http.ws_connect(
            sc.url + "/v1/responses", headers={"Authorization": f"Bearer {token}"}
        )
    assert info.value.status == 426
    async with http.get(sc.url + "/v1/responses", headers={
        "Authorization": f"Bearer {token}", "Connection": "Upgrade", "Upgrade": "websocket",
        "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    }) as resp:  # fmt: skip
        assert resp.status == 426
        body = await resp.json()
        assert body["error"]["code"] == "websocket_unsupported"
        assert resp.headers["x-should-retry"] == "false"
    async with http.get(
        sc.url + "/v1/responses", headers={"Authorization": f"Bearer {token}"}
    ) as resp:
        assert resp.status == 404  # a plain GET is still no route


async def test_a_passthrough_key_never_goes_to_a_provider_of_another_format(
    env: Env, sidecars: list[Sidecar], mock_server: TestServer, http: aiohttp.ClientSession
) -> None:
    """The caller's own OpenAI key is for OpenAI-format providers: a cross-format fallback
    (which translation would otherwise allow) is not tried with it."""
    config = (
        "providers:\n  - id: openai\n    base_url: UPSTREAM\n  - id: anthropic\n"
        "    base_url: UPSTREAM\n"
        "fallbacks:\n  gpt-4o-mini-fail-503: [claude-haiku-4-5]\npassthrough: true\n"
    )
    sc = await boot(env, sidecars, config)
    callers_key = "sk-proj-callers-own-openai-key-0123456789"
    async with sc.openai(callers_key) as client:
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(
                model="gpt-4o-mini-fail-503", messages=[{"role": "user", "content": "hi"}]
            )
        with pytest.raises(openai.BadRequestError):  # asked for by name: refused, not sent
            await client.chat.completions.create(
                model="claude-haiku-4-5", messages=[{"role": "user", "content": "hi"}]
            )
    sent = await mock_log(http, mock_server)
    assert sent
    assert {r["path"] for r in sent} == {"/v1/chat/completions"}


async def test_a_passthrough_key_stays_with_the_provider_its_model_names(
    env: Env, sidecars: list[Sidecar], mock_server: TestServer, http: aiohttp.ClientSession
) -> None:
    """Not even an OpenAI-compatible fallback host gets the caller's own OpenAI key."""
    config = (
        "providers:\n  - id: openai\n    base_url: UPSTREAM\n  - id: deepseek\n"
        "    base_url: UPSTREAM\n"
        "fallbacks:\n  gpt-4o-mini-fail-503: ['deepseek:deepseek-chat']\npassthrough: true\n"
    )
    sc = await boot(env, sidecars, config)
    async with sc.openai("sk-proj-callers-own-openai-key-0123456789") as client:
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(
                model="gpt-4o-mini-fail-503", messages=[{"role": "user", "content": "hi"}],
                extra_body={"models": ["deepseek:deepseek-chat"]},
            )  # fmt: skip
    sent = await mock_log(http, mock_server)
    assert sent
    assert {r["model"] for r in sent} == {"gpt-4o-mini-fail-503"}


async def test_a_config_fallback_no_url_can_carry_is_left_out_not_a_400(
    env: Env, sidecars: list[Sidecar], token: str
) -> None:
    config = providers_yaml(env, openai=[("k1", "sk-one")]) + (
        "  - id: google\n    base_url: UPSTREAM\n    api_keys: "
        + keys_yaml(env, "google", [("g1", "g-one")]) + "\n"
        "fallbacks:\n  gpt-4o-mini: ['google:tuned/x']\n"
    )  # fmt: skip
    sc = await boot(env, sidecars, config)
    async with sc.openai(token) as client:
        done = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
        assert done.choices[0].message.content
        with pytest.raises(openai.BadRequestError):  # asked for by the caller: its own 400
            await client.chat.completions.create(
                model="google:tuned/x", messages=[{"role": "user", "content": "hi"}]
            )
