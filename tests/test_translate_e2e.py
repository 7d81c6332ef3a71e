"""Any SDK to any provider, end to end (docs/reference.md#translation).

One sidecar and one mock upstream for the whole module. The official `openai`,
`anthropic` and `google-genai` SDKs, unchanged, call OpenAI, Anthropic and Gemini
models through the sidecar; every (caller format by upstream format) pair is
checked streamed and not, with what the SDK parsed compared with what the upstream
said (the mock's deterministic answer and its request log), plus tool calls,
images, errors, usage, credits and cross-format failover.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestServer
from google import genai
from google.genai import errors as genai_errors
from google.genai import types as gtypes

from sidecar.mock_provider import create_app
from tests.harness import Env, Sidecar, make_env, metric_value
from tests.test_proxy_e2e import REPLY, keys_yaml

pytestmark = pytest.mark.asyncio(loop_scope="module")

PROMPT = "say hi to me"  # 4 words: the mock counts words as tokens
PROMPT_TOKENS = 4
REPLY_TOKENS = len(REPLY.split())
MODELS = {"openai": "gpt-4o-mini", "anthropic": "claude-haiku-4-5", "gemini": "gemini-2.5-flash"}
CALLERS = ("openai", "anthropic", "gemini")
PROVIDER_OF = {"openai": "openai", "anthropic": "anthropic", "gemini": "google"}
PRICES = "prices:\n  gemini-2.5-flash: {input: 1000, output: 2000}\n"


@dataclass
class World:
    env: Env
    sc: Sidecar
    mock: TestServer
    token: str
    payer: str  # an access key with credits: its Gemini requests run on managed keys
    http: aiohttp.ClientSession
    clients: dict[tuple[str, str], Any] = field(default_factory=dict)

    # -- the three official SDKs, pointed at the sidecar (one client per key) --

    def openai(self, token: str | None = None) -> openai.AsyncOpenAI:
        key = ("openai", token or self.token)
        if key not in self.clients:
            self.clients[key] = self.sc.openai(key[1])
        return self.clients[key]  # type: ignore[no-any-return]

    def anthropic(self, token: str | None = None) -> anthropic.AsyncAnthropic:
        key = ("anthropic", token or self.token)
        if key not in self.clients:
            self.clients[key] = self.sc.anthropic(key[1])
        return self.clients[key]  # type: ignore[no-any-return]

    def gemini(self, token: str | None = None) -> genai.Client:
        key = ("gemini", token or self.token)
        if key not in self.clients:
            options = gtypes.HttpOptions(base_url=self.sc.url, api_version="v1beta")
            self.clients[key] = genai.Client(api_key=key[1], http_options=options)
        return self.clients[key]  # type: ignore[no-any-return]

    async def close(self) -> None:
        for (kind, _), client in self.clients.items():
            if kind == "gemini":
                await client.aio.aclose()
                client.close()
            else:
                await client.close()

    async def mock_log(self) -> list[dict[str, Any]]:
        async with self.http.get(self.mock.make_url("/_mock/requests")) as r:
            return list((await r.json())["requests"])

    async def metrics(self) -> str:
        async with self.http.get(self.sc.admin_url + "/metrics") as r:
            return await r.text()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    mock = TestServer(create_app())
    await mock.start_server()
    env = make_env(tmp_path_factory.mktemp("translate"), str(mock.make_url("/v1")))
    token = env.access_key("app", credits=1000)
    payer = env.access_key("payer", credits=100)
    gemini_base = str(mock.make_url("/v1beta"))
    managed = env.secret("managed", "google-1", "gm-managed-google")
    config = (
        "providers:\n"
        f"  - id: openai\n    base_url: UPSTREAM\n"
        f"    api_keys: {keys_yaml(env, 'openai', [('oa-1', 'sk-oa-one')])}\n"
        f"  - id: anthropic\n    base_url: UPSTREAM\n"
        f"    api_keys: {keys_yaml(env, 'anthropic', [('an-1', 'sk-ant-one')])}\n"
        f"  - id: google\n    base_url: {gemini_base}\n"
        "managed:\n"
        f'  google: [{{id: pool-1, value: "{managed}"}}]\n'
        'ledger: {url: "sqlite:///ledger.db"}\n' + PRICES
    )
    env.write_config(config)
    sc = await env.start()
    async with aiohttp.ClientSession() as http:
        w = World(env, sc, mock, token, payer, http)
        yield w
        await w.close()
    await sc.stop()
    await mock.close()


# --------------------------------------------------------------------------- helpers


@dataclass
class Answer:
    text: str
    headers: dict[str, str]
    input_tokens: int | None
    output_tokens: int | None
    finish: str | None


async def ask(
    w: World, caller: str, model: str, *, stream: bool, token: str | None = None, **extra: Any
) -> Answer:
    """One chat request in the caller's format through its official SDK; what it parsed."""
    if caller == "openai":
        return await _ask_openai(w.openai(token), model, stream, **extra)
    if caller == "anthropic":
        return await _ask_anthropic(w.anthropic(token), model, stream, **extra)
    return await _ask_gemini(w.gemini(token), model, stream, **extra)


async def _ask_openai(client: openai.AsyncOpenAI, model: str, stream: bool, **extra: Any) -> Answer:
    messages = extra.pop("messages", [{"role": "user", "content": PROMPT}])
    if not stream:
        raw = await client.chat.completions.with_raw_response.create(
            model=model, messages=messages, **extra
        )
        done = raw.parse()
        usage = done.usage
        return Answer(done.choices[0].message.content or "", dict(raw.headers),
                      usage.prompt_tokens if usage else None,
                      usage.completion_tokens if usage else None, done.choices[0].finish_reason)  # fmt: skip
    async with client.chat.completions.stream(
        model=model, messages=messages, stream_options={"include_usage": True}, **extra
    ) as s:
        final = await s.get_final_completion()
        headers = dict(s._response.headers)
    usage = final.usage
    return Answer(final.choices[0].message.content or "", headers,
                  usage.prompt_tokens if usage else None,
                  usage.completion_tokens if usage else None, final.choices[0].finish_reason)  # fmt: skip


async def _ask_anthropic(
    client: anthropic.AsyncAnthropic, model: str, stream: bool, **extra: Any
) -> Answer:
    messages = extra.pop("messages", [{"role": "user", "content": PROMPT}])
    kwargs: dict[str, Any] = {"model": model, "max_tokens": 256, "messages": messages, **extra}
    if not stream:
        raw = await client.messages.with_raw_response.create(**kwargs)
        msg = await raw.parse()
        headers = dict(raw.headers)
    else:
        async with client.messages.stream(**kwargs) as s:
            msg = await s.get_final_message()
            headers = dict(s.response.headers)
    text = "".join(b.text for b in msg.content if b.type == "text")
    return Answer(text, headers, msg.usage.input_tokens, msg.usage.output_tokens, msg.stop_reason)


async def _ask_gemini(client: genai.Client, model: str, stream: bool, **extra: Any) -> Answer:
    contents = extra.pop("contents", PROMPT)
    config = gtypes.GenerateContentConfig(**extra) if extra else None
    if not stream:
        resp = await client.aio.models.generate_content(model=model, contents=contents,
                                                        config=config)  # fmt: skip
        chunks = [resp]
    else:
        chunks = [c async for c in await client.aio.models.generate_content_stream(
            model=model, contents=contents, config=config)]  # fmt: skip
    text = "".join(c.text or "" for c in chunks)
    last = chunks[-1]
    meta = last.usage_metadata
    headers = dict(last.sdk_http_response.headers or {}) if last.sdk_http_response else {}
    cand = last.candidates[0] if last.candidates else None
    finish = cand.finish_reason.value if cand and cand.finish_reason else None
    return Answer(text, headers, meta.prompt_token_count if meta else None,
                  meta.candidates_token_count if meta else None, finish)  # fmt: skip


# --------------------------------------------------------------------------- the matrix


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("upstream", CALLERS)
@pytest.mark.parametrize("caller", CALLERS)
async def test_every_sdk_reaches_every_format(
    world: World, caller: str, upstream: str, stream: bool
) -> None:
    answer = await ask(world, caller, MODELS[upstream], stream=stream)
    assert answer.text == REPLY
    assert answer.input_tokens == PROMPT_TOKENS
    assert answer.output_tokens == REPLY_TOKENS
    headers = {k.lower(): v for k, v in answer.headers.items()}
    assert headers["x-sidecar-provider"] == PROVIDER_OF[upstream]
    assert headers["x-sidecar-model"] == MODELS[upstream]
    if caller == upstream:
        assert "x-sidecar-translated" not in headers
    else:
        assert headers["x-sidecar-translated"] == f"{caller}->{upstream}"
    sent = (await world.mock_log())[-1]
    assert sent["format"] == upstream
    assert PROMPT in str(sent["body"])  # the prompt crossed intact


def _png() -> bytes:
    return base64.b64decode(
        "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
    )


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
async def test_a_field_that_cannot_be_carried_is_refused_by_name_and_nothing_is_sent(
    world: World, path: str
) -> None:
    before = len(await world.mock_log())
    if path == "/v1/chat/completions":
        body = {"model": MODELS["anthropic"], "logprobs": True,
                "messages": [{"role": "user", "content": PROMPT}]}  # fmt: skip
        headers = {"authorization": f"Bearer {world.token}"}
    else:
        body = {"model": MODELS["openai"], "max_tokens": 10, "messages": [{"role": "user",
                "content": [{"type": "document", "source": {"type": "text", "media_type":
                "text/plain", "data": "x"}}]}]}  # fmt: skip
        headers = {"x-api-key": world.token, "anthropic-version": "2023-06-01"}
    async with world.http.post(world.sc.url + path, json=body, headers=headers) as r:
        assert r.status == 400
        doc = await r.json()
    code = doc["error"]["code"]
    assert code == "translation_unsupported"
    assert ("logprobs" if path.endswith("completions") else "document") in doc["error"]["message"]
    assert len(await world.mock_log()) == before


async def test_failover_crosses_formats(world: World) -> None:
    client = world.openai()
    raw = await client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini-fail-503", messages=[{"role": "user", "content": PROMPT}],
        extra_body={"models": [MODELS["anthropic"]]},
    )  # fmt: skip
    assert raw.parse().choices[0].message.content == REPLY
    assert raw.headers["x-sidecar-provider"] == "anthropic"
    assert raw.headers["x-sidecar-translated"] == "openai->anthropic"


async def test_translated_requests_are_metered_and_charged(world: World) -> None:
    """The payer's Gemini requests run on the managed Google key: charged at its price,
    whichever SDK asked, streamed or not."""
    for caller, stream in (("openai", False), ("anthropic", True)):
        answer = await ask(world, caller, MODELS["gemini"], stream=stream, token=world.payer)
        assert answer.text == REPLY
        assert {k.lower(): v for k, v in answer.headers.items()}["x-sidecar-key-source"] == "managed"
    per_request = (PROMPT_TOKENS * 1000 + REPLY_TOKENS * 2000) / 1_000_000
    page = await world.metrics()
    spent = metric_value(page, "sidecar_credits_spent_usd_total", access_key="payer")
    assert spent == pytest.approx(2 * per_request)


@pytest.mark.parametrize("caller", CALLERS)
async def test_upstream_errors_reach_each_sdk_as_its_own_exception(
    world: World, caller: str
) -> None:
    for upstream in CALLERS:
        model = MODELS[upstream] + "-fail-400"
        expected: tuple[type[BaseException], ...]
        if caller == "openai":
            expected = (openai.BadRequestError,)
        elif caller == "anthropic":
            expected = (anthropic.BadRequestError,)
        else:
            expected = (genai_errors.ClientError,)
        with pytest.raises(expected) as info:
            await ask(world, caller, model, stream=False)
        if caller == "gemini":
            assert getattr(info.value, "code", None) == 400


async def test_a_translated_stream_that_breaks_is_resumed_in_the_callers_format(
    world: World,
) -> None:
    """An OpenAI caller's stream served by Anthropic breaks after two words; the rest comes
    from the fallback (a prefill, translated too), and the SDK assembles one answer."""
    client = world.openai()
    async with client.chat.completions.stream(
        model="claude-haiku-4-5-break", messages=[{"role": "user", "content": PROMPT}],
        extra_body={"models": [MODELS["anthropic"]]},
    ) as s:  # fmt: skip
        final = await s.get_final_completion()
    assert final.choices[0].message.content == REPLY
    prefill = (await world.mock_log())[-1]["body"]["messages"][-1]
    assert prefill["role"] == "assistant"  # the continuation went out as Anthropic's prefill
    assert REPLY.startswith(str(prefill["content"][0]["text"] if isinstance(
        prefill["content"], list) else prefill["content"]).strip())  # fmt: skip


async def test_a_gemini_callers_broken_stream_ends_with_an_error_the_sdk_raises(
    world: World,
) -> None:
    with pytest.raises(genai_errors.APIError):
        await ask(world, "gemini", "claude-haiku-4-5-break", stream=True)


async def test_no_key_reaches_the_logs_or_metrics_of_translated_requests(world: World) -> None:
    """Runs after the module's other tests: every key they used stays out of what is written."""
    # An upstream 401 that quotes part of the key, translated for another SDK: masked.
    with pytest.raises(genai_errors.ClientError) as info:
        await ask(world, "gemini", MODELS["anthropic"] + "-fail-401-leaky", stream=False)
    assert info.value.code == 401
    assert "sk-ant-one" not in str(info.value)
    assert "invalid x-api-key: ***" in str(info.value)  # the quoted fragment, masked
    world.sc.running.state.access_log.flush()
    written = world.env.oplog.getvalue() + world.env.access.getvalue() + await world.metrics()
    assert written  # the module's requests were logged
    for secret in ("sk-oa-one", "sk-ant-one", "gm-managed-google", world.token, world.payer):
        assert secret not in written
