"""End-to-end proxy tests: a real sidecar and the real mock upstream on loopback, official SDKs.

Routes and formats, explicit routes, the `models` array, response headers,
credential handling, stream metering, breaks and disconnects, passthrough,
custom providers, and secrets staying out of logs and metrics. Failover,
cooldowns and the sidecar's own error codes are in `test_proxy_errors_e2e.py`,
which shares the helpers here.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest
from aiohttp.test_utils import TestServer

from sidecar.vault import edit_vault
from tests.harness import Env, Sidecar, metric_value

REPLY = "Hello from the mock provider."
MSG: Any = [{"role": "user", "content": "say hi to me"}]  # 4 words for the mock
OPENAI_MODEL = "gpt-4o-mini"
CLAUDE_MODEL = "claude-haiku-4-5"

Key = tuple[str | None, str]  # (configured id or None, value)


# --------------------------------------------------------------------------- helpers


def keys_yaml(env: Env, provider: str, keys: Sequence[Key]) -> str:
    """A flow-style `api_keys:` list; each value is sealed in the vault first."""
    items = []
    for i, (kid, value) in enumerate(keys):
        ref = env.secret(provider, f"k{i}", value)
        items.append(f'{{id: {kid}, value: "{ref}"}}' if kid else f'{{value: "{ref}"}}')
    return "[" + ", ".join(items) + "]"


def providers_yaml(
    env: Env, openai: Sequence[Key] = (), anthropic: Sequence[Key] = (), extra: str = ""
) -> str:
    """Built-in openai and anthropic pointed at the mock, with these policy keys."""
    return (
        "providers:\n"
        f"  - id: openai\n    base_url: UPSTREAM\n    api_keys: {keys_yaml(env, 'openai', openai)}\n"
        f"  - id: anthropic\n    base_url: UPSTREAM\n"
        f"    api_keys: {keys_yaml(env, 'anthropic', anthropic)}\n" + extra
    )


async def boot(env: Env, sidecars: list[Sidecar], config: str) -> Sidecar:
    env.write_config(config)
    sc = await env.start()
    sidecars.append(sc)
    return sc


async def send(
    http: aiohttp.ClientSession,
    url: str,
    *,
    token: str | None = None,
    method: str = "POST",
    json: Any = None,
    data: Any = None,
    headers: dict[str, str] | None = None,
    anthropic: bool = False,
) -> tuple[int, dict[str, str], bytes]:
    """One raw request; returns status, lower-cased headers and the whole body."""
    h = dict(headers or {})
    if token is not None:
        if anthropic:
            h["x-api-key"] = token
        else:
            h["Authorization"] = f"Bearer {token}"
    if anthropic:
        h.setdefault("anthropic-version", "2023-06-01")
    async with http.request(method, url, json=json, data=data, headers=h) as resp:
        body = await resp.read()
        return resp.status, {k.lower(): v for k, v in resp.headers.items()}, body


async def mock_log(http: aiohttp.ClientSession, mock: TestServer) -> list[dict[str, Any]]:
    async with http.get(mock.make_url("/_mock/requests")) as resp:
        return list((await resp.json())["requests"])


async def clear_mock(http: aiohttp.ClientSession, mock: TestServer) -> None:
    async with http.delete(mock.make_url("/_mock/requests")) as resp:
        assert resp.status == 200


async def metrics_text(http: aiohttp.ClientSession, sc: Sidecar) -> str:
    async with http.get(sc.admin_url + "/metrics") as resp:
        return await resp.text()


async def wait_for(check: Callable[[], Awaitable[bool]], what: str, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def chat(model: str = OPENAI_MODEL, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": MSG, **extra}


def claude(model: str = CLAUDE_MODEL, **extra: Any) -> dict[str, Any]:
    return {"model": model, "max_tokens": 64, "messages": MSG, **extra}


def sse_data(body: bytes) -> list[str]:
    return [line[6:] for line in body.decode().splitlines() if line.startswith("data: ")]


def chat_text(body: bytes) -> str:
    out = []
    for data in sse_data(body):
        if data == "[DONE]":
            continue
        for choice in orjson.loads(data)["choices"]:
            out.append(choice["delta"].get("content") or "")
    return "".join(out)


# --------------------------------------------------------------------------- routes and formats


async def test_openai_chat_non_stream_and_stream(
    env: Env, sidecars: list[Sidecar], token: str
) -> None:
    sc = await boot(env, sidecars, providers_yaml(env, openai=[("k1", "good-openai-1")]))
    async with sc.openai(token) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model=OPENAI_MODEL, messages=MSG
        )
        r = raw.parse()
        assert r.choices[0].message.content == REPLY
        assert r.usage is not None
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (4, 5)
        assert raw.headers["x-sidecar-provider"] == "openai"
        assert raw.headers["x-sidecar-key-id"] == "k1"

        raw_stream = await client.chat.completions.with_raw_response.create(
            model=OPENAI_MODEL, messages=MSG, stream=True
        )
        assert raw_stream.headers["x-sidecar-model"] == OPENAI_MODEL
        assert raw_stream.headers["x-sidecar-attempts"] == "1"
        text = [c.choices[0].delta.content or "" async for c in raw_stream.parse() if c.choices]
        assert "".join(text) == REPLY


async def test_anthropic_messages_non_stream_and_stream(
    env: Env, sidecars: list[Sidecar], token: str
) -> None:
    sc = await boot(env, sidecars, providers_yaml(env, anthropic=[("a1", "good-anthropic-1")]))
    async with sc.anthropic(token) as client:
        raw = await client.messages.with_raw_response.create(
            model=CLAUDE_MODEL, max_tokens=64, messages=MSG
        )
        m = await raw.parse()
        assert m.content[0].type == "text"
        assert m.content[0].text == REPLY
        assert (m.usage.input_tokens, m.usage.output_tokens) == (4, 5)
        assert raw.headers["x-sidecar-provider"] == "anthropic"
        assert raw.headers["x-sidecar-key-id"] == "a1"

        async with client.messages.stream(model=CLAUDE_MODEL, max_tokens=64, messages=MSG) as s:
            assert s.response.headers["x-sidecar-key-source"] == "policy"
            text = [t async for t in s.text_stream]
            final = await s.get_final_message()
        assert "".join(text) == REPLY
        assert final.usage.output_tokens == 5


async def test_embeddings_responses_completions_count_tokens(
    env: Env,
    sidecars: list[Sidecar],
    mock_server: TestServer,
    http: aiohttp.ClientSession,
    token: str,
) -> None:
    config = providers_yaml(env, openai=[("k1", "good-openai-1")], anthropic=[("a1", "good-a")])
    sc = await boot(env, sidecars, config)
    async with sc.openai(token) as oai, sc.anthropic(token) as ant:
        emb = await oai.embeddings.create(model="text-embedding-3-small", input="hello world")
        assert len(emb.data) == 1
        assert len(emb.data[0].embedding) == 8
        resp = await oai.responses.create(model=OPENAI_MODEL, input="one two three")
        assert resp.output_text == REPLY
        assert resp.usage is not None
        assert resp.usage.input_tokens == 3
        comp = await oai.completions.create(model=OPENAI_MODEL, prompt="one two")
        assert comp.choices[0].text == REPLY
        count = await ant.messages.count_tokens(
            model=CLAUDE_MODEL, messages=[{"role": "user", "content": "a b c d e f"}]
        )
        assert count.input_tokens == 6
    paths = [(r["path"], r["key"]) for r in await mock_log(http, mock_server)]
    assert paths == [
        ("/v1/embeddings", "good-openai-1"),
        ("/v1/responses", "good-openai-1"),
        ("/v1/completions", "good-openai-1"),
        ("/v1/messages/count_tokens", "good-a"),
    ]


LOCAL_PROVIDER = (
    "  - id: local\n    base_url: UPSTREAM\n    format: openai\n    auth: none\n"
    "    models: [llama3.2]\n"
)


async def models_listing(sc: Sidecar, token: str) -> dict[str, str]:
    async with sc.openai(token) as client:
        page = await client.models.list()
        return {m.id: m.owned_by async for m in page}


async def test_models_list_respects_scope(env: Env, sidecars: list[Sidecar]) -> None:
    config = providers_yaml(
        env, openai=[("k1", "o")], anthropic=[("a1", "a")], extra=LOCAL_PROVIDER
    )
    everything = env.access_key("all")
    anthropic_only = env.access_key("anth", providers=["anthropic"])
    two_models = env.access_key("two", models=[OPENAI_MODEL, "llama3.2"])
    sc = await boot(env, sidecars, config)

    full = await models_listing(sc, everything)
    assert full[OPENAI_MODEL] == "openai"
    assert full[CLAUDE_MODEL] == "anthropic"
    assert full["llama3.2"] == "local"
    anth = await models_listing(sc, anthropic_only)
    assert anth
    assert set(anth.values()) == {"anthropic"}
    assert CLAUDE_MODEL in anth
    two = await models_listing(sc, two_models)
    assert (two[OPENAI_MODEL], two["llama3.2"]) == ("openai", "local")
    assert {name.rsplit(":", 1)[-1] for name in two} == {OPENAI_MODEL, "llama3.2"}


async def test_models_list_allowed_models_only_under_their_provider(
    env: Env, sidecars: list[Sidecar]
) -> None:
    config = providers_yaml(
        env, openai=[("k1", "o")], anthropic=[("a1", "a")], extra=LOCAL_PROVIDER
    )
    two_models = env.access_key("two", models=[OPENAI_MODEL, "llama3.2"])
    sc = await boot(env, sidecars, config)
    assert await models_listing(sc, two_models) == {OPENAI_MODEL: "openai", "llama3.2": "local"}


async def test_models_list_needs_an_access_key(
    env: Env, sidecars: list[Sidecar], http: aiohttp.ClientSession
) -> None:
    sc = await boot(env, sidecars, providers_yaml(env, openai=[("k1", "o")]))
    status, headers, body = await send(http, sc.url + "/v1/models", method="GET")
    assert status == 401
    assert orjson.loads(body)["error"]["code"] == "access_key_invalid"
    assert headers["x-should-retry"] == "false"


# --------------------------------------------------------------------------- explicit routes


async def test_explicit_route_with_sdk_and_prefix_removed(
    env: Env,
    sidecars: list[Sidecar],
    mock_server: TestServer,
    http: aiohttp.ClientSession,
    token: str,
) -> None:
    sc = await boot(env, sidecars, providers_yaml(env, openai=[("k1", "good-openai-1")]))
    explicit = openai.AsyncOpenAI(base_url=sc.url + "/openai", api_key=token, max_retries=0)
    async with explicit as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="openai:gpt-4o-mini", messages=MSG
        )
        assert raw.parse().choices[0].message.content == REPLY
        assert raw.headers["x-sidecar-provider"] == "openai"
        assert raw.headers["x-sidecar-model"] == OPENAI_MODEL
        models = await client.models.list()  # forwarded verbatim: the mock's own list
        assert {m.owned_by async for m in models} == {"mock"}
    async with sc.openai(token) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="openai:gpt-4o", messages=MSG
        )
        assert raw.headers["x-sidecar-model"] == "gpt-4o"
    log = await mock_log(http, mock_server)
    assert [(r["method"], r["path"]) for r in log] == [
        ("POST", "/v1/chat/completions"),
        ("GET", "/v1/models"),
        ("POST", "/v1/chat/completions"),
    ]
    assert log[0]["body"]["model"] == OPENAI_MODEL
    assert log[2]["body"]["model"] == "gpt-4o"
    assert all(r["key"] == "good-openai-1" for r in log)


async def test_explicit_route_anthropic_raw(
    env: Env, sidecars: list[Sidecar], http: aiohttp.ClientSession, token: str
) -> None:
    sc = await boot(env, sidecars, providers_yaml(env, anthropic=[("a1", "good-a")]))
    status, headers, body = await send(
        http, sc.url + "/anthropic/messages", token=token, json=claude(), anthropic=True
    )
    assert status == 200, body
    assert orjson.loads(body)["content"][0]["text"] == REPLY
    assert headers["x-sidecar-provider"] == "anthropic"


async def test_explicit_route_anthropic_sdk(
    env: Env,
    sidecars: list[Sidecar],
    mock_server: TestServer,
    http: aiohttp.ClientSession,
    token: str,
) -> None:
    """The Anthropic SDK adds /v1 itself: base_url .../anthropic must not become .../v1/v1."""
    sc = await boot(env, sidecars, providers_yaml(env, anthropic=[("a1", "good-a")]))
    async with anthropic.AsyncAnthropic(
        base_url=sc.url + "/anthropic", api_key=token, max_retries=0
    ) as client:
        raw = await client.messages.with_raw_response.create(
            model=CLAUDE_MODEL, max_tokens=32, messages=[{"role": "user", "content": "hi"}]
        )
    assert (await raw.parse()).content[0].text == REPLY  # type: ignore[union-attr]
    assert raw.headers["x-sidecar-key-id"] == "a1"
    log = await mock_log(http, mock_server)
    assert [r["path"] for r in log] == ["/v1/messages"]


# --------------------------------------------------------------------------- `models` array


async def test_models_array_failover_openai(
    env: Env,
    sidecars: list[Sidecar],
    mock_server: TestServer,
    http: aiohttp.ClientSession,
    token: str,
) -> None:
    sc = await boot(env, sidecars, providers_yaml(env, openai=[("k1", "sk-good")]))
    async with sc.openai(token) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-fail-500-x", messages=MSG, extra_body={"models": [OPENAI_MODEL]}
        )
    assert raw.parse().choices[0].message.content == REPLY
    assert raw.headers["x-sidecar-model"] == OPENAI_MODEL
    assert (
        raw.headers["x-sidecar-attempts"] == "3"
    )  # the 500 is tried once more, then the next model
    assert "x-sidecar-rejected-models" not in raw.headers
    bodies = [r["body"] for r in await mock_log(http, mock_server)]
    assert [b["model"] for b in bodies] == ["gpt-fail-500-x", "gpt-fail-500-x", OPENAI_MODEL]
    assert all("models" not in b for b in bodies)


async def test_a_passing_5xx_is_rescued_on_the_same_key_by_one_more_try(
    env: Env,
    sidecars: list[Sidecar],
    mock_server: TestServer,
    http: aiohttp.ClientSession,
    token: str,
) -> None:
    """One key, one model, a 503 once: the answer, not an error (the retry is the only chance)."""
    sc = await boot(env, sidecars, providers_yaml(env, openai=[("k1", "sk-good")]))
    async with sc.openai(token) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini-flaky-1", messages=MSG
        )
    assert raw.parse().choices[0].message.content == REPLY
    assert (raw.headers["x-sidecar-key-id"], raw.headers["x-sidecar-attempts"]) == ("k1", "2")
    text = await metrics_text(http, sc)
    assert metric_value(text, "sidecar_upstream_attempts_total", outcome="server_error") == 1
    assert metric_value(text, "sidecar_upstream_attempts_total", outcome="ok") == 1


async def test_a_rate_limited_model_never_blocks_another_model_on_the_same_key(
    env: Env,
    sidecars: list[Sidecar],
    mock_server: TestServer,
    http: aiohttp.ClientSession,
    token: str,
) -> None:
    """Providers limit rate per model: a 429 cools (key, model), not the key."""
    sc = await boot(env, sidecars, providers_yaml(env, openai=[("k1", "sk-good")]))
    limited = "gpt-4o-mini-fail-429-retry-60"
    async with sc.openai(token) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model=limited, messages=MSG, extra_body={"models": [OPENAI_MODEL]}
        )
        assert raw.parse().choices[0].message.content == REPLY
        assert (raw.headers["x-sidecar-key-id"], raw.headers["x-sidecar-attempts"]) == ("k1", "2")
        for _ in range(3):  # the same key keeps serving the other model, first try
            raw = await client.chat.completions.with_raw_response.create(
                model=OPENAI_MODEL, messages=MSG
            )
            assert raw.headers["x-sidecar-attempts"] == "1"
        with pytest.raises(openai.RateLimitError) as err:  # that model on that key still cools
            await client.chat.completions.create(model=limited, messages=MSG)
    assert int(err.value.response.headers["retry-after"]) > 30  # the pair's own 60 s cooldown
    assert err.value.body["code"] == "all_keys_cooling_down"  # type: ignore[index]
    models = [r["body"]["model"] for r in await mock_log(http, mock_server)]
    assert models == [limited] + [OPENAI_MODEL] * 4


async def test_config_fallbacks_serve_apps_that_cannot_send_models(
    env: Env,
    sidecars: list[Sidecar],
    mock_server: TestServer,
    http: aiohttp.ClientSession,
    token: str,
) -> None:
    fallbacks = f"fallbacks:\n  'gpt-down-*': [{OPENAI_MODEL}]\n"
    sc = await boot(env, sidecars, fallbacks + providers_yaml(env, openai=[("k1", "sk-good")]))
    async with sc.openai(token) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-down-fail-503-x", messages=MSG
        )
        assert raw.parse().choices[0].message.content == REPLY
        assert (raw.headers["x-sidecar-model"], raw.headers["x-sidecar-attempts"]) == (
            OPENAI_MODEL, "3",
        )  # fmt: skip
        # A request's own `models` wins: the config's fallbacks are not added to it.
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(
                model="gpt-down-fail-503-x", messages=MSG,
                extra_body={"models": ["gpt-down-fail-503-y"]},
            )  # fmt: skip
    models = [r["body"]["model"] for r in await mock_log(http, mock_server)]
    down_x, down_y = "gpt-down-fail-503-x", "gpt-down-fail-503-y"  # a 503 is tried twice...
    # ...except the third 503 of (k1, down_x): the server-error threshold cools that pair.
    assert models == [down_x, down_x, OPENAI_MODEL, down_x, down_y, down_y]


@pytest.mark.parametrize("error", ["fail-context", "fail-nomodel"])
async def test_a_model_level_error_moves_to_the_next_model_without_cooling_the_key(
    env: Env,
    sidecars: list[Sidecar],
    mock_server: TestServer,
    http: aiohttp.ClientSession,
    token: str,
    error: str,
) -> None:
    sc = await boot(env, sidecars, providers_yaml(
        env, openai=[("k1", "sk-good"), ("k2", "sk-good-2")], anthropic=[("a1", "sk-ant-1")]))  # fmt: skip
    small = f"gpt-small-{error}"
    async with sc.openai(token) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model=small, messages=MSG, extra_body={"models": [OPENAI_MODEL]}
        )
        assert raw.parse().choices[0].message.content == REPLY
        # one attempt on the first model (k2 would answer the same), then the next model on k1
        assert (raw.headers["x-sidecar-attempts"], raw.headers["x-sidecar-key-id"]) == ("2", "k1")
        # nothing cooled: the same key still serves the first model's name right away
        assert (await client.chat.completions.with_raw_response.create(
            model=OPENAI_MODEL, messages=MSG)).headers["x-sidecar-key-id"] == "k1"  # fmt: skip
        # with no other model to try, the caller gets the real error, as the SDK raises it
        expected = openai.BadRequestError if error == "fail-context" else openai.NotFoundError
        with pytest.raises(expected):
            await client.chat.completions.create(model=small, messages=MSG)
    async with sc.anthropic(token) as aclient:
        message = await aclient.messages.create(
            model=f"claude-big-{error}", max_tokens=16, messages=MSG,
            extra_body={"models": [CLAUDE_MODEL]},
        )  # fmt: skip
        assert message.content[0].text == REPLY  # type: ignore[union-attr]
    models = [r["body"]["model"] for r in await mock_log(http, mock_server)]
    assert models == [small, OPENAI_MODEL, OPENAI_MODEL, small, f"claude-big-{error}", CLAUDE_MODEL]


async def test_models_array_failover_anthropic_without_model(
    env: Env,
    sidecars: list[Sidecar],
    mock_server: TestServer,
    http: aiohttp.ClientSession,
    token: str,
) -> None:
    sc = await boot(env, sidecars, providers_yaml(env, anthropic=[("a1", "sk-good")]))
    payload: dict[str, Any] = {
        "models": ["claude-x-fail-529", CLAUDE_MODEL],
        "max_tokens": 64,
        "messages": MSG,
    }
    status, headers, body = await send(
        http, sc.url + "/v1/messages", token=token, json=payload, anthropic=True
    )
    assert status == 200, body
    assert headers["x-sidecar-model"] == CLAUDE_MODEL
    bodies = [r["body"] for r in await mock_log(http, mock_server)]
    assert [b["model"] for b in bodies] == ["claude-x-fail-529", "claude-x-fail-529", CLAUDE_MODEL]
    assert all("models" not in b for b in bodies)


async def test_models_array_scope_rejections(
    env: Env, sidecars: list[Sidecar], mock_server: TestServer, http: aiohttp.ClientSession
) -> None:
    token = env.access_key("narrow", models=[OPENAI_MODEL])
    sc = await boot(env, sidecars, providers_yaml(env, openai=[("k1", "sk-good")]))
    url = sc.url + "/v1/chat/completions"
    status, headers, _ = await send(
        http, url, token=token, json=chat("gpt-4o", models=[OPENAI_MODEL])
    )
    assert status == 200
    assert headers["x-sidecar-rejected-models"] == "gpt-4o"
    assert headers["x-sidecar-model"] == OPENAI_MODEL
    assert [r["body"]["model"] for r in await mock_log(http, mock_server)] == [OPENAI_MODEL]

    await clear_mock(http, mock_server)
    status, headers, body = await send(
        http, url, token=token, json=chat("gpt-4o", models=["gpt-4.1"])
    )
    assert status == 403
    assert orjson.loads(body)["error"]["code"] == "model_not_allowed"
    assert headers["x-should-retry"] == "false"
    assert await mock_log(http, mock_server) == []


# --------------------------------------------------------------------------- response headers


async def test_sidecar_headers_on_success_and_relayed_error(
    env: Env, sidecars: list[Sidecar], http: aiohttp.ClientSession, token: str
) -> None:
    local = (
        "  - id: bad400\n    base_url: UPSTREAM\n    format: openai\n    models: [m-400]\n"
        f"    api_keys: {keys_yaml(env, 'bad400', [('b', 'sk-fail-400')])}\n"
    )
    sc = await boot(env, sidecars, providers_yaml(env, openai=[("k1", "sk-good")], extra=local))
    url = sc.url + "/v1/chat/completions"
    expected = {
        200: ("openai", OPENAI_MODEL, "k1"),
        400: ("bad400", "m-400", "b"),
    }
    for status, (provider, model, key_id) in expected.items():
        code, headers, _ = await send(
            http, url, token=token, json=chat(model), headers={"x-request-id": f"rid-{status}"}
        )
        assert code == status
        assert headers["x-sidecar-provider"] == provider
        assert headers["x-sidecar-model"] == model
        assert headers["x-sidecar-key-source"] == "policy"
        assert headers["x-sidecar-key-id"] == key_id
        assert headers["x-sidecar-attempts"] == "1"
        assert headers["x-sidecar-request-id"] == f"rid-{status}"
        assert float(headers["x-sidecar-overhead-ms"]) >= 0
    await sc.stop()
    sidecars.remove(sc)
    records = {r["request_id"]: r for r in env.access.records()}
    assert records["rid-200"]["status"] == 200
    assert records["rid-200"]["key_id"] == "k1"
    assert records["rid-400"]["status"] == 400
    assert records["rid-400"]["provider"] == "bad400"


async def test_key_id_derived_from_hash_without_configured_id(
    env: Env, sidecars: list[Sidecar], http: aiohttp.ClientSession, token: str
) -> None:
    value = "sk-proj-Quiet7Private9ValueXyz"
    sc = await boot(env, sidecars, providers_yaml(env, openai=[(None, value)]))
    url = sc.url + "/v1/chat/completions"
    ids = []
    for _ in range(2):
        status, headers, _ = await send(http, url, token=token, json=chat())
        assert status == 200
        ids.append(headers["x-sidecar-key-id"])
    key_id = ids[0]
    assert key_id
    assert ids[1] == key_id
    assert key_id not in value
    assert not any(value[i : i + 5] in key_id for i in range(len(value) - 4))
    text = await metrics_text(http, sc)
    assert metric_value(text, "sidecar_key_selections_total", key_id=key_id) == 2


# --------------------------------------------------------------------------- credentials


async def test_caller_credentials_never_reach_upstream(
    env: Env,
    sidecars: list[Sidecar],
    mock_server: TestServer,
    http: aiohttp.ClientSession,
    token: str,
) -> None:
    config = providers_yaml(
        env, openai=[("k1", "sk-openai-good")], anthropic=[("a1", "sk-ant-good")]
    )
    sc = await boot(env, sidecars, config)
    async with sc.openai(token, organization="org-e2e", project="proj-e2e") as oai:
        await oai.chat.completions.create(model=OPENAI_MODEL, messages=MSG)
    async with sc.anthropic(token) as ant:
        await ant.messages.create(
            model=CLAUDE_MODEL, max_tokens=64, messages=MSG,
            extra_headers={"anthropic-beta": "prompt-caching-2024-07-31"},
        )  # fmt: skip
    async with sc.anthropic(None, auth_token=token) as ant_bearer:  # type: ignore[arg-type]
        await ant_bearer.messages.create(model=CLAUDE_MODEL, max_tokens=64, messages=MSG)

    log = await mock_log(http, mock_server)
    assert len(log) == 3
    for rec in log:
        assert all(token not in v for v in rec["headers"].values())
        assert token not in orjson.dumps(rec["body"]).decode()
    oai_req, ant_req, ant_bearer_req = log
    assert oai_req["headers"]["authorization"] == "Bearer sk-openai-good"
    assert "x-api-key" not in oai_req["headers"]
    assert oai_req["headers"]["openai-organization"] == "org-e2e"
    assert oai_req["headers"]["openai-project"] == "proj-e2e"
    for req in (ant_req, ant_bearer_req):
        assert req["headers"]["x-api-key"] == "sk-ant-good"
        assert "authorization" not in req["headers"]
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", req["headers"]["anthropic-version"])
    assert ant_req["headers"]["anthropic-beta"] == "prompt-caching-2024-07-31"


async def test_hop_by_hop_headers_not_forwarded(
    env: Env,
    sidecars: list[Sidecar],
    mock_server: TestServer,
    http: aiohttp.ClientSession,
    token: str,
) -> None:
    sc = await boot(env, sidecars, providers_yaml(env, openai=[("k1", "sk-good")]))
    hop = {
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "Proxy-Authorization": "Basic cHJveHk6c2VjcmV0",
        "Cookie": "session=abc",
        "X-Team": "payments",
    }
    status, _, _ = await send(
        http, sc.url + "/v1/chat/completions", token=token, json=chat(), headers=hop
    )
    assert status == 200
    (rec,) = await mock_log(http, mock_server)
    sent = rec["headers"]
    for name in ("keep-alive", "te", "proxy-authorization", "cookie"):
        assert name not in sent
    assert sent["x-team"] == "payments"


async def test_headers_named_in_connection_are_hop_by_hop(
    env: Env,
    sidecars: list[Sidecar],
    mock_server: TestServer,
    http: aiohttp.ClientSession,
    token: str,
) -> None:
    sc = await boot(env, sidecars, providers_yaml(env, openai=[("k1", "sk-good")]))
    status, _, _ = await send(
        http, sc.url + "/v1/chat/completions", token=token, json=chat(),
        headers={"Connection": "keep-alive, X-Hop-Secret", "X-Hop-Secret": "local-only"},
    )  # fmt: skip
    assert status == 200
    (rec,) = await mock_log(http, mock_server)
    assert "x-hop-secret" not in rec["headers"]


# --------------------------------------------------------------------------- streams


@pytest.mark.parametrize(
    ("path", "payload", "prompt_tokens"),
    [
        ("/v1/chat/completions", chat(stream=True), 4),
        ("/v1/completions", {"model": OPENAI_MODEL, "prompt": "say hi", "stream": True}, 2),
    ],
)
async def test_stream_usage_added_upstream_and_hidden_from_caller(
    env: Env,
    sidecars: list[Sidecar],
    mock_server: TestServer,
    http: aiohttp.ClientSession,
    path: str,
    payload: dict[str, Any],
    prompt_tokens: int,
    token: str,
) -> None:
    sc = await boot(env, sidecars, providers_yaml(env, openai=[("k1", "sk-good")]))
    status, _, body = await send(http, sc.url + path, token=token, json=payload)
    assert status == 200
    assert b'"usage":{' not in body
    assert body.endswith(b"data: [DONE]\n\n")
    if path.endswith("chat/completions"):
        assert chat_text(body) == REPLY
    (rec,) = await mock_log(http, mock_server)
    assert rec["body"]["stream_options"] == {"include_usage": True}

    asked = {**payload, "stream_options": {"include_usage": True}}
    status, _, body = await send(http, sc.url + path, token=token, json=asked)
    assert status == 200
    usage = [orjson.loads(d)["usage"] for d in sse_data(body) if d != "[DONE]"]
    assert {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 5,
        "total_tokens": prompt_tokens + 5,
    } in usage
    await sc.stop()
    sidecars.remove(sc)
    tokens = [(r["input_tokens"], r["output_tokens"]) for r in env.access.records()]
    assert tokens == [(prompt_tokens, 5)] * 2  # metered either way


async def test_stream_break_no_candidate_takes_a_prefill_ends_with_an_inband_error(
    env: Env,
    sidecars: list[Sidecar],
    mock_server: TestServer,
    http: aiohttp.ClientSession,
    token: str,
) -> None:
    # OpenAI-format models take no prefill unless the config says so: nothing can continue
    # the broken answer, so it ends with an error event, never as a truncated "complete" one.
    keys = [("brk", "sk-break"), ("good", "sk-good")]
    sc = await boot(env, sidecars, providers_yaml(env, openai=keys))
    headers = {"Authorization": f"Bearer {token}"}
    async with http.post(
        sc.url + "/v1/chat/completions", json=chat(stream=True), headers=headers
    ) as resp:
        assert resp.status == 200
        assert resp.headers["x-sidecar-attempts"] == "1"
        assert resp.headers["x-sidecar-key-id"] == "brk"
        got = await resp.read()  # the HTTP response itself ends cleanly
    assert got.startswith(b"data: ")
    assert b"[DONE]" not in got
    events = [e for e in got.split(b"\n\n") if e]
    last = orjson.loads(events[-1].removeprefix(b"data: "))
    assert last["error"]["code"] == "stream_interrupted"
    assert "upstream_closed" in last["error"]["message"]
    assert chat_text(b"\n\n".join(events[:-1]) + b"\n\n") == "Hello from"

    async with sc.openai(token) as client:  # the official SDK raises it
        stream = await client.chat.completions.create(model=OPENAI_MODEL, messages=MSG, stream=True)
        with pytest.raises(openai.APIError, match="upstream_closed"):
            async for _ in stream:
                pass

    assert [r["key"] for r in await mock_log(http, mock_server)] == ["sk-break", "sk-break"]
    text = await metrics_text(http, sc)
    assert metric_value(text, "sidecar_stream_interruptions_total", provider="openai") == 2
    assert metric_value(text, "sidecar_stream_resumptions_total", provider="openai",
                        result="failed") == 2  # fmt: skip
    assert metric_value(text, "sidecar_failovers_total") == 0


async def test_caller_disconnect_mid_stream_cancels_upstream(
    env: Env,
    sidecars: list[Sidecar],
    mock_server: TestServer,
    http: aiohttp.ClientSession,
    token: str,
) -> None:
    sc = await boot(env, sidecars, providers_yaml(env, openai=[("k1", "sk-stall-500")]))
    headers = {"Authorization": f"Bearer {token}"}
    resp = await http.post(sc.url + "/v1/chat/completions", json=chat(stream=True), headers=headers)
    assert resp.status == 200
    first = await resp.content.readany()
    assert first.startswith(b"data: ")
    resp.close()  # drop the connection mid-stream

    server = mock_server.runner.server  # type: ignore[union-attr]
    assert server is not None

    async def upstream_closed() -> bool:
        return not server.connections

    # A stream left running would finish and park its connection in the pool;
    # a cancelled one is closed by the sidecar.
    await wait_for(upstream_closed, "the upstream connection to close")

    async def recorded() -> bool:
        text = await metrics_text(http, sc)
        return metric_value(text, "sidecar_requests_total", format="openai", provider="openai") >= 1

    await wait_for(recorded, "sidecar_requests_total for the abandoned stream")
    status, _, body = await send(http, sc.url + "/v1/chat/completions", token=token, json=chat())
    assert status == 200
    assert orjson.loads(body)["choices"][0]["message"]["content"] == REPLY
    assert not [r for r in env.oplog.records() if r.get("level") == "error"]


# --------------------------------------------------------------------------- passthrough


async def test_passthrough_forwards_unknown_credential(
    env: Env, sidecars: list[Sidecar], mock_server: TestServer, http: aiohttp.ClientSession
) -> None:
    config = providers_yaml(env, openai=[("k1", "sk-policy")], anthropic=[("a1", "sk-ant")])
    sc = await boot(env, sidecars, config + "passthrough: true\n")
    async with sc.openai("sk-caller-own-key") as oai:
        raw = await oai.chat.completions.with_raw_response.create(model=OPENAI_MODEL, messages=MSG)
    assert raw.headers["x-sidecar-key-source"] == "passthrough"
    assert raw.headers["x-sidecar-key-id"] == "caller"
    async with sc.anthropic("sk-ant-caller-key") as ant:
        araw = await ant.messages.with_raw_response.create(
            model=CLAUDE_MODEL, max_tokens=64, messages=MSG
        )
    assert araw.headers["x-sidecar-key-source"] == "passthrough"
    log = await mock_log(http, mock_server)
    assert log[0]["headers"]["authorization"] == "Bearer sk-caller-own-key"
    assert log[1]["headers"]["x-api-key"] == "sk-ant-caller-key"
    assert [r["key"] for r in log] == ["sk-caller-own-key", "sk-ant-caller-key"]


async def test_passthrough_off_by_default_and_never_for_revoked_keys(
    env: Env,
    sidecars: list[Sidecar],
    mock_server: TestServer,
    http: aiohttp.ClientSession,
    token: str,
) -> None:
    revoked = env.access_key("gone")
    with edit_vault(env.vault) as doc:
        doc.access_keys["gone"].revoked = True
    sc = await boot(env, sidecars, providers_yaml(env, openai=[("k1", "sk-policy")]))
    url = sc.url + "/v1/chat/completions"
    status, headers, body = await send(http, url, token="sk-caller-own-key", json=chat())
    assert status == 401
    assert orjson.loads(body)["error"]["code"] == "access_key_invalid"

    env.write_config(providers_yaml(env, openai=[("k1", "sk-policy")]) + "passthrough: true\n")

    async def passthrough_on() -> bool:
        return sc.running.state.runtime.config.passthrough

    await wait_for(passthrough_on, "the config reload")
    status, headers, body = await send(http, url, token=revoked, json=chat())
    assert status == 401
    assert orjson.loads(body)["error"]["code"] == "access_key_invalid"
    assert headers["x-should-retry"] == "false"
    assert await mock_log(http, mock_server) == []


# --------------------------------------------------------------------------- custom providers


async def test_auth_none_custom_provider_sends_no_key(
    env: Env,
    sidecars: list[Sidecar],
    mock_server: TestServer,
    http: aiohttp.ClientSession,
    token: str,
) -> None:
    local = (
        "  - id: ollama\n    base_url: UPSTREAM\n    format: openai\n    auth: none\n"
        "    models: [{id: llama3.2}]\n"
    )
    sc = await boot(env, sidecars, providers_yaml(env, openai=[("k1", "sk-policy")], extra=local))
    status, headers, body = await send(
        http, sc.url + "/v1/chat/completions", token=token, json=chat("llama3.2")
    )
    assert headers["x-sidecar-provider"] == "ollama"
    assert headers["x-sidecar-key-source"] == "policy"
    assert headers["x-sidecar-key-id"] == "none"
    (rec,) = await mock_log(http, mock_server)
    assert rec["body"]["model"] == "llama3.2"
    assert "authorization" not in rec["headers"]
    assert "x-api-key" not in rec["headers"]
    # The mock insists on a key, so its own 401 comes back: proof nothing was injected.
    assert status == 401
    assert "didn't provide an API key" in orjson.loads(body)["error"]["message"]


async def test_custom_provider_headers_and_query_params(
    env: Env,
    sidecars: list[Sidecar],
    mock_server: TestServer,
    http: aiohttp.ClientSession,
    token: str,
) -> None:
    bearer = env.secret("azure", "key", "azure-secret-key")
    tenant = env.secret("azure", "tenant", "tenant-42")
    custom = (
        "providers:\n  - id: azure\n    base_url: UPSTREAM\n    format: openai\n    auth: none\n"
        "    models: [my-deployment]\n"
        f'    headers: {{Authorization: "Bearer {bearer}", x-tenant: "{tenant}"}}\n'
        '    query_params: {api-version: "2024-10-21"}\n'
    )
    sc = await boot(env, sidecars, custom)
    async with sc.openai(token) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="my-deployment", messages=MSG, extra_query={"trace": "on"}
        )
    assert raw.parse().choices[0].message.content == REPLY
    assert raw.headers["x-sidecar-provider"] == "azure"
    (rec,) = await mock_log(http, mock_server)
    assert rec["headers"]["authorization"] == "Bearer azure-secret-key"
    assert rec["headers"]["x-tenant"] == "tenant-42"
    assert rec["query"] == {"trace": "on", "api-version": "2024-10-21"}


# --------------------------------------------------------------------------- secrets


async def test_no_secret_in_logs_metrics_or_error_bodies(
    env: Env, sidecars: list[Sidecar], http: aiohttp.ClientSession, token: str
) -> None:
    provider_keys = ["sk-live-Secret1-fail-429-retry-60", "sk-live-Secret2", "sk-ant-Secret3"]
    keys: list[Key] = [(None, provider_keys[0]), ("second", provider_keys[1])]
    config = providers_yaml(env, openai=keys, anthropic=[(None, provider_keys[2])])
    narrow = env.access_key("narrow", providers=["anthropic"])
    sc = await boot(env, sidecars, config)
    sidecars.remove(sc)
    stranger = "sk-stranger-NotAnAccessKey"
    bodies: list[bytes] = []
    try:
        chat_url, msg_url = sc.url + "/v1/chat/completions", sc.url + "/v1/messages"
        for url, tok, payload, ant in [
            (chat_url, token, chat(), False),  # fails over from the 429 key
            (chat_url, token, chat(stream=True), False),
            (msg_url, token, claude(), True),
            (msg_url, token, claude(stream=True), True),
            (chat_url, narrow, chat(), False),  # 403
            (chat_url, stranger, chat(), False),  # 401
            (msg_url, stranger, claude(), True),  # 401
            (chat_url, token, chat("mystery-model"), False),  # 400
            (chat_url, token, chat("gpt-4o-fail-400"), False),  # upstream 400, relayed
        ]:
            _, _, body = await send(http, url, token=tok, json=payload, anthropic=ant)
            bodies.append(body)
        metrics = await metrics_text(http, sc)
    finally:
        await sc.stop()
    secrets = [*provider_keys, token, narrow, stranger, env.private_key.reveal()]
    oplog, access = env.oplog.getvalue(), env.access.getvalue()
    assert len(env.access.records()) == 9
    assert "second" in metrics
    assert "key_cooling" in oplog
    for secret in secrets:
        assert secret not in oplog
        assert secret not in access
        assert secret not in metrics
        for body in bodies:
            assert secret.encode() not in body
