"""The Gemini API routes and the stored-response routes, end to end.

One sidecar and one mock upstream for the whole module. The official `google-genai`
SDK, unchanged, calls `/v1beta/models/{model}:{action}` on the sidecar, which relays it
natively to the built-in `google` provider (its base URL overridden to the mock's
`/v1beta`); what the SDK parsed is compared with what the same SDK gets from the mock
directly, and the mock's request log shows what went upstream (the provider key in
`x-goog-api-key`, never the access key). Key failover on Google's own signals uses keys
attached to dedicated access keys (the newest attached key is tried first), so each
test's cooling keys touch no other test.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
import openai
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestServer
from google import genai
from google.genai import errors as genai_errors
from google.genai import types as gtypes

from sidecar.mock_provider import create_app
from tests.harness import Env, Sidecar, make_env, raw_request
from tests.test_proxy_e2e import REPLY, keys_yaml

pytestmark = pytest.mark.asyncio(loop_scope="module")

MODEL = "gemini-2.5-flash"
PROMPT = "say hi to me"  # 4 words: the mock counts words as tokens
GOOGLE_KEY = "gk-policy-one"
OPENAI_KEY = "sk-oa-one"
DEEPSEEK_KEY = "sk-ds-one"

#: access key name -> its attached google keys, oldest first (the last one is tried first)
ATTACHED = {
    "fo429": [("g-good-429", "gk-second-a"), ("g-bad-429", "gk-first-fail-429-retry-30")],
    "foquota": [("g-good-quota", "gk-second-b"), ("g-bad-quota", "gk-first-fail-quota")],
    "fobadkey": [("g-good-badkey", "gk-second-c"), ("g-bad-badkey", "gk-first-fail-badkey")],
}


@dataclass
class World:
    env: Env
    sc: Sidecar
    mock: TestServer
    token: str
    tokens: dict[str, str]  # the failover access keys, by name
    http: aiohttp.ClientSession
    clients: dict[tuple[str, str], genai.Client] = field(default_factory=dict)

    def gemini(self, token: str | None = None, base_url: str | None = None) -> genai.Client:
        """The Google GenAI SDK pointed at the sidecar (or, with `base_url`, elsewhere)."""
        key = (token or self.token, base_url or self.sc.url)
        if key not in self.clients:  # one client per (key, URL): building one is slow
            options = gtypes.HttpOptions(base_url=key[1], api_version="v1beta")
            self.clients[key] = genai.Client(api_key=key[0], http_options=options)
        return self.clients[key]

    def direct(self) -> genai.Client:
        """The same SDK talking to the mock itself with the provider key: the reference."""
        return self.gemini(GOOGLE_KEY, str(self.mock.make_url("")))

    async def close(self) -> None:
        for client in self.clients.values():
            await client.aio.aclose()
            client.close()

    async def mock_log(self) -> list[dict[str, Any]]:
        async with self.http.get(self.mock.make_url("/_mock/requests")) as r:
            return list((await r.json())["requests"])

    async def since(self, before: int) -> list[dict[str, Any]]:
        return (await self.mock_log())[before:]

    async def keys(self) -> list[dict[str, Any]]:
        async with self.http.get(self.sc.admin_url + "/keys") as r:
            assert r.status == 200
            return list((await r.json())["keys"])


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    mock = TestServer(create_app())
    await mock.start_server()
    env = make_env(tmp_path_factory.mktemp("gemini"), str(mock.make_url("/v1")))
    token = env.access_key("app")
    tokens = {}
    for name, attached in ATTACHED.items():
        tokens[name] = env.access_key(name)
        for key_id, value in attached:
            env.attach(name, "google", key_id, value)
    config = (
        "providers:\n"
        f"  - id: openai\n    base_url: UPSTREAM\n"
        f"    api_keys: {keys_yaml(env, 'openai', [('oa-1', OPENAI_KEY)])}\n"
        f"  - id: deepseek\n    base_url: UPSTREAM\n"
        f"    api_keys: {keys_yaml(env, 'deepseek', [('ds-1', DEEPSEEK_KEY)])}\n"
        f"  - id: google\n    base_url: {mock.make_url('/v1beta')}\n"
        f"    api_keys: {keys_yaml(env, 'google', [('g-1', GOOGLE_KEY)])}\n"
    )
    env.write_config(config)
    sc = await env.start()
    async with aiohttp.ClientSession() as http:
        w = World(env, sc, mock, token, tokens, http)
        yield w
        await w.close()
    await sc.stop()
    await mock.close()


def headers_of(resp: Any) -> dict[str, str]:
    """The lower-cased HTTP headers the SDK kept of a response."""
    raw = resp.sdk_http_response.headers if resp.sdk_http_response else None
    return {k.lower(): v for k, v in (raw or {}).items()}


def assert_native_google(headers: dict[str, str], key_id: str = "g-1") -> None:
    assert headers["x-sidecar-provider"] == "google"
    assert headers["x-sidecar-key-id"] == key_id
    assert "x-sidecar-translated" not in headers


def assert_sent_with_the_provider_key(
    w: World, sent: dict[str, Any], key: str = GOOGLE_KEY
) -> None:
    assert sent["format"] == "gemini"
    assert (sent["auth"], sent["key"]) == ("x-goog-api-key", key)
    assert "key" not in sent["query"]
    assert "authorization" not in sent["headers"]
    assert w.token not in str(sent)  # the access key never goes upstream, anywhere


# --------------------------------------------------------------------------- the SDK, natively


async def test_generate_content_is_relayed_natively_with_the_provider_key(world: World) -> None:
    before = len(await world.mock_log())
    resp = await world.gemini().aio.models.generate_content(model=MODEL, contents=PROMPT)
    (sent,) = await world.since(before)
    ref = await world.direct().aio.models.generate_content(model=MODEL, contents=PROMPT)
    assert resp.text == ref.text == REPLY
    assert resp.usage_metadata == ref.usage_metadata
    assert resp.usage_metadata is not None
    assert resp.usage_metadata.prompt_token_count == 4
    assert resp.model_version == MODEL
    assert_native_google(headers_of(resp))
    assert (sent["method"], sent["path"]) == ("POST", f"/v1beta/models/{MODEL}:generateContent")
    assert_sent_with_the_provider_key(world, sent)
    assert sent["body"]["contents"][0]["parts"][0]["text"] == PROMPT


async def test_generate_content_stream_is_relayed_natively(world: World) -> None:
    before = len(await world.mock_log())
    stream = await world.gemini().aio.models.generate_content_stream(model=MODEL, contents=PROMPT)
    chunks = [c async for c in stream]
    (sent,) = await world.since(before)
    ref_stream = await world.direct().aio.models.generate_content_stream(
        model=MODEL, contents=PROMPT
    )
    ref = [c async for c in ref_stream]
    assert "".join(c.text or "" for c in chunks) == REPLY
    assert [c.text for c in chunks] == [c.text for c in ref]
    assert chunks[-1].usage_metadata == ref[-1].usage_metadata
    assert_native_google(headers_of(chunks[-1]))
    assert sent["path"] == f"/v1beta/models/{MODEL}:streamGenerateContent"
    assert sent["query"] == {"alt": "sse"}
    assert_sent_with_the_provider_key(world, sent)


async def test_count_tokens_is_relayed(world: World) -> None:
    before = len(await world.mock_log())
    got = await world.gemini().aio.models.count_tokens(model=MODEL, contents=PROMPT)
    (sent,) = await world.since(before)
    ref = await world.direct().aio.models.count_tokens(model=MODEL, contents=PROMPT)
    assert got.total_tokens == ref.total_tokens == 4
    assert sent["path"] == f"/v1beta/models/{MODEL}:countTokens"
    assert_sent_with_the_provider_key(world, sent)


async def test_embed_content_is_relayed_as_batch_embed_contents(world: World) -> None:
    model = "gemini-embedding-001"
    texts = ["first text", "second text"]
    before = len(await world.mock_log())
    got = await world.gemini().aio.models.embed_content(model=model, contents=texts)
    (sent,) = await world.since(before)
    ref = await world.direct().aio.models.embed_content(model=model, contents=texts)
    assert got.embeddings is not None
    assert ref.embeddings is not None
    assert [e.values for e in got.embeddings] == [e.values for e in ref.embeddings]
    assert len(got.embeddings) == 2
    assert got.embeddings[0].values
    assert got.embeddings[0].values != got.embeddings[1].values
    assert sent["path"] == f"/v1beta/models/{model}:batchEmbedContents"
    assert_sent_with_the_provider_key(world, sent)


async def test_embed_content_single_is_relayed(world: World) -> None:
    path = "/v1beta/models/gemini-embedding-001:embedContent"
    body = {"content": {"parts": [{"text": "first text"}]}}
    before = len(await world.mock_log())
    async with world.http.post(
        world.sc.url + path, json=body, headers={"x-goog-api-key": world.token}
    ) as r:
        assert r.status == 200
        got = await r.json()
    (sent,) = await world.since(before)
    async with world.http.post(
        world.mock.make_url(path), json=body, headers={"x-goog-api-key": GOOGLE_KEY}
    ) as r:
        ref = await r.json()
    assert got == ref
    assert got["embedding"]["values"]
    assert sent["path"] == path
    assert_sent_with_the_provider_key(world, sent)


async def test_google_errors_reach_the_sdk_natively_then_the_key_cools(world: World) -> None:
    """Google's own 429 (RetryInfo 30 s) is relayed as is; the (key, model) pair then cools
    and the next request gets the sidecar's 429 in Google's shape, with `retry-after`."""
    model = MODEL + "-fail-429-retry-30"  # a model of its own: no other test's key cools
    client = world.gemini()
    with pytest.raises(genai_errors.ClientError) as first:
        await client.aio.models.generate_content(model=model, contents=PROMPT)
    assert (first.value.code, first.value.status) == (429, "RESOURCE_EXHAUSTED")
    details = first.value.details["error"]["details"]
    assert {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "30s"} in details
    before = len(await world.mock_log())
    with pytest.raises(genai_errors.ClientError) as second:
        await client.aio.models.generate_content(model=model, contents=PROMPT)
    assert (second.value.code, second.value.status) == (429, "RESOURCE_EXHAUSTED")
    err = second.value.details["error"]
    assert err["details"][0]["reason"] == "all_keys_cooling_down"
    assert 25 <= int(second.value.response.headers["retry-after"]) <= 30
    assert await world.since(before) == []
    with pytest.raises(genai_errors.ClientError) as missing:
        await client.aio.models.generate_content(model=MODEL + "-fail-nomodel", contents=PROMPT)
    assert (missing.value.code, missing.value.status) == (404, "NOT_FOUND")


async def test_models_list_and_get_are_answered_by_the_sidecar_in_gemini_shape(
    world: World,
) -> None:
    before = len(await world.mock_log())
    client = world.gemini()
    listed = [m async for m in await client.aio.models.list()]
    one = await client.aio.models.get(model=MODEL)
    assert await world.since(before) == []  # nothing asked upstream
    async with world.sc.openai(world.token) as oa:
        expected = {m.id async for m in oa.models.list()}
    names = [m.name for m in listed]
    assert all(n is not None and n.startswith("models/") for n in names)
    assert {n.removeprefix("models/") for n in names if n} == expected
    assert f"models/{MODEL}" in names
    assert "models/deepseek-chat" in names
    assert one.name == f"models/{MODEL}"
    assert one.supported_actions
    assert "generateContent" in one.supported_actions
    with pytest.raises(genai_errors.ClientError) as info:
        await client.aio.models.get(model="gemini-no-such-model")
    assert info.value.code == 404


# --------------------------------------------------------------------------- auth and the path


async def test_the_access_key_in_the_query_works_and_is_not_forwarded(world: World) -> None:
    before = len(await world.mock_log())
    url = f"{world.sc.url}/v1beta/models/{MODEL}:generateContent"
    body = {"contents": [{"role": "user", "parts": [{"text": PROMPT}]}]}
    async with world.http.post(url, params={"key": world.token}, json=body) as r:
        assert r.status == 200
        doc = await r.json()
    assert doc["candidates"][0]["content"]["parts"][0]["text"] == REPLY
    (sent,) = await world.since(before)
    assert sent["query"] == {}
    assert "key=" not in sent["raw_path"]
    assert_sent_with_the_provider_key(world, sent)


async def test_a_key_in_the_query_is_dropped_even_when_the_header_authenticates(
    world: World,
) -> None:
    before = len(await world.mock_log())
    url = f"{world.sc.url}/v1beta/models/{MODEL}:streamGenerateContent"
    body = {"contents": [{"role": "user", "parts": [{"text": PROMPT}]}]}
    params = {"key": "gk-smuggled", "alt": "sse"}
    async with world.http.post(
        url, params=params, json=body, headers={"x-goog-api-key": world.token}
    ) as r:
        assert r.status == 200
        assert REPLY.split()[0] in (await r.text())
    (sent,) = await world.since(before)
    assert sent["query"] == {"alt": "sse"}
    assert "gk-smuggled" not in str(sent)
    assert_sent_with_the_provider_key(world, sent)


async def test_a_bad_access_key_is_the_sdks_401(world: World) -> None:
    before = len(await world.mock_log())
    with pytest.raises(genai_errors.ClientError) as info:
        await world.gemini("sk-sidecar-not-a-key").aio.models.generate_content(
            model=MODEL, contents=PROMPT
        )
    assert info.value.code == 401
    assert info.value.status == "UNAUTHENTICATED"
    url = f"{world.sc.url}/v1beta/models/{MODEL}:generateContent"
    async with world.http.post(url, json={"contents": []}) as r:
        assert r.status == 401
        doc = await r.json()
    err = doc["error"]
    assert (err["code"], err["status"]) == (401, "UNAUTHENTICATED")
    assert err["message"]
    assert err["details"][0]["@type"] == "type.googleapis.com/google.rpc.ErrorInfo"
    assert await world.since(before) == []


async def test_an_unknown_action_is_a_404(world: World) -> None:
    before = len(await world.mock_log())
    url = f"{world.sc.url}/v1beta/models/{MODEL}:frobnicate"
    async with world.http.post(url, json={}, headers={"x-goog-api-key": world.token}) as r:
        assert r.status == 404
        doc = await r.json()
    assert (doc["error"]["code"], doc["error"]["status"]) == (404, "NOT_FOUND")
    assert await world.since(before) == []


@pytest.mark.parametrize(
    "target",
    ["..%2F..%2Fx", "a%2Fb", "..", "a%5Cb", "%2E%2E",  # no provider would take these anyway
     # names routed to google, so only the one-path-segment rule can stop them
     "gemini-x%2F..%2F..%2Fevil", "gemini-a%2Fb", "gemini-a%5Cb", "gemini-a%3Fb",
     "gemini-a%23b", "google:..", "google:.", "google:%2E%2E", "google:..%2Fx"],
)  # fmt: skip
@pytest.mark.parametrize("action", ["generateContent", "streamGenerateContent"])
async def test_a_model_that_is_not_one_path_segment_never_reaches_upstream(
    world: World, target: str, action: str
) -> None:
    before = len(await world.mock_log())
    head = (
        f"POST /v1beta/models/{target}:{action} HTTP/1.1\r\nhost: 127.0.0.1\r\n"
        f"x-goog-api-key: {world.token}\r\ncontent-type: application/json\r\n"
    ).encode()
    resp = await raw_request(world.sc.running.proxy_port, head, b'{"contents": []}')
    assert resp.status == 400
    err = resp.json()["error"]
    assert (err["code"], err["status"]) == (400, "INVALID_ARGUMENT")
    if target.startswith(("gemini-", "google:")):
        assert err["details"][0]["reason"] == "invalid_request"
        assert "single path segment" in err["message"]
    assert await world.since(before) == []


async def test_a_fallback_model_that_is_not_one_path_segment_is_refused_before_any_call(
    world: World,
) -> None:
    before = len(await world.mock_log())
    url = f"{world.sc.url}/v1beta/models/{MODEL}-fail-503:generateContent"
    body = {"contents": [{"parts": [{"text": PROMPT}]}], "models": ["gemini-../../evil"]}
    async with world.http.post(url, json=body, headers={"x-goog-api-key": world.token}) as r:
        status = r.status
        doc = await r.json()
    assert status == 400
    assert doc["error"]["details"][0]["reason"] == "invalid_request"
    assert await world.since(before) == []


# --------------------------------------------------------------------------- key failover


async def test_a_rate_limited_key_fails_over_to_the_next_key(world: World) -> None:
    """A 429 RESOURCE_EXHAUSTED whose RetryInfo asks for longer than `failover.retry.max_wait`
    cools that (key, model) pair for the delay and the next key answers at once."""
    before = len(await world.mock_log())
    resp = await world.gemini(world.tokens["fo429"]).aio.models.generate_content(
        model=MODEL, contents=PROMPT
    )
    assert resp.text == REPLY
    assert_native_google(headers_of(resp), key_id="g-good-429")
    sent = await world.since(before)
    assert [r["key"] for r in sent] == ["gk-first-fail-429-retry-30", "gk-second-a"]
    (bad,) = [k for k in await world.keys() if k["key_id"] == "g-bad-429"]
    assert (bad["state"], bad["model"], bad["reason"], bad["last_status"]) == (
        "cooling", MODEL, "rate_limited", 429,
    )  # fmt: skip
    # the RetryInfo's `retryDelay` ("30s") is the cooldown
    until = datetime.fromisoformat(bad["until"].replace("Z", "+00:00"))
    assert 20 < (until - datetime.now(UTC)).total_seconds() <= 31


async def test_a_daily_quota_cools_the_key_for_every_model(world: World) -> None:
    resp = await world.gemini(world.tokens["foquota"]).aio.models.generate_content(
        model=MODEL, contents=PROMPT
    )
    assert resp.text == REPLY
    assert_native_google(headers_of(resp), key_id="g-good-quota")
    entries = [k for k in await world.keys() if k["key_id"] == "g-bad-quota"]
    assert [(k["state"], k["model"], k["reason"]) for k in entries] == [
        ("dead", None, "rate_limited")
    ]
    (good,) = [k for k in await world.keys() if k["key_id"] == "g-good-quota"]
    assert good["state"] == "ok"


async def test_an_invalid_google_key_is_an_auth_failure(world: World) -> None:
    """Google answers an invalid key with 400 INVALID_ARGUMENT (ErrorInfo API_KEY_INVALID),
    not a 401: it is still the key's fault, so the next key answers and the bad one cools
    for every model like after a 401 (which is the status it is recorded as)."""
    before = len(await world.mock_log())
    resp = await world.gemini(world.tokens["fobadkey"]).aio.models.generate_content(
        model=MODEL, contents=PROMPT
    )
    assert resp.text == REPLY
    assert_native_google(headers_of(resp), key_id="g-good-badkey")
    sent = await world.since(before)
    assert [r["key"] for r in sent] == ["gk-first-fail-badkey", "gk-second-c"]
    entries = [k for k in await world.keys() if k["key_id"] == "g-bad-badkey"]
    assert [(k["state"], k["reason"], k["last_status"]) for k in entries] == [
        ("dead", "auth_failed", 401)
    ]


# --------------------------------------------------------------------------- stored responses


async def test_a_stored_response_is_asked_of_openai_with_its_key(world: World) -> None:
    before = len(await world.mock_log())
    async with world.sc.openai(world.token) as client:
        with pytest.raises(openai.NotFoundError) as info:
            await client.responses.retrieve("resp_123")
    assert info.value.response.headers["x-sidecar-provider"] == "openai"
    (sent,) = await world.since(before)
    assert (sent["method"], sent["path"]) == ("GET", "/v1/responses/resp_123")
    assert (sent["auth"], sent["key"]) == ("authorization", OPENAI_KEY)
    assert world.token not in str(sent)


@pytest.mark.parametrize(
    ("method", "tail"),
    [("GET", "resp_123/input_items"), ("POST", "resp_123/cancel"), ("DELETE", "resp_123")],
)
async def test_the_other_stored_response_routes_reach_openai(
    world: World, method: str, tail: str
) -> None:
    before = len(await world.mock_log())
    url = f"{world.sc.url}/v1/responses/{tail}"
    headers = {"authorization": f"Bearer {world.token}"}
    async with world.http.request(method, url, headers=headers) as r:
        assert r.headers["x-sidecar-provider"] == "openai"
    (sent,) = await world.since(before)
    assert (sent["method"], sent["path"]) == (method, f"/v1/responses/{tail}")
    assert sent["key"] == OPENAI_KEY


@pytest.mark.parametrize(
    "raw", ["resp%2E123", "resp%2F123", "..", "resp_1/evil", "resp_1%3Fx=1", "resp_1/input_items/x"]
)
async def test_a_stored_response_id_with_bad_characters_is_a_404_from_the_sidecar(
    world: World, raw: str
) -> None:
    before = len(await world.mock_log())
    head = (
        f"GET /v1/responses/{raw} HTTP/1.1\r\nhost: 127.0.0.1\r\n"
        f"authorization: Bearer {world.token}\r\n"
    ).encode()
    resp = await raw_request(world.sc.running.proxy_port, head)
    assert resp.status == 404
    assert resp.json()["error"]["code"] == "route_not_found"
    assert await world.since(before) == []


@pytest.mark.parametrize(
    ("model", "provider", "key"),
    [("gpt-4o-mini", "openai", OPENAI_KEY), ("deepseek-chat", "deepseek", DEEPSEEK_KEY)],
)
async def test_input_tokens_is_routed_by_its_model(
    world: World, model: str, provider: str, key: str
) -> None:
    before = len(await world.mock_log())
    async with world.sc.openai(world.token) as client:
        with pytest.raises(openai.NotFoundError) as info:  # the mock has no such route
            await client.responses.input_tokens.count(model=model, input=PROMPT)
    assert info.value.response.headers["x-sidecar-provider"] == provider
    (sent,) = await world.since(before)
    assert (sent["method"], sent["path"]) == ("POST", "/v1/responses/input_tokens")
    assert (sent["key"], sent["body"]["model"]) == (key, model)
