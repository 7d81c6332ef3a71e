"""The mock provider, driven by the official SDKs and a raw aiohttp client."""

from __future__ import annotations

import asyncio
import gzip
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from yarl import URL

from sidecar.mock_provider import Directives, create_app, parse_directives, run

REPLY = "Hello from the mock provider."
USER: Any = [{"role": "user", "content": "say hi to me"}]  # 4 words

ServerFactory = Callable[..., Awaitable[TestServer]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
async def server(aiohttp_server: ServerFactory) -> TestServer:
    return await aiohttp_server(create_app())


@pytest.fixture
async def oai(server: TestServer) -> AsyncIterator[openai.AsyncOpenAI]:
    url = str(server.make_url("/v1"))
    async with openai.AsyncOpenAI(base_url=url, api_key="k", max_retries=0) as client:
        yield client


@pytest.fixture
async def ant(server: TestServer) -> AsyncIterator[anthropic.AsyncAnthropic]:
    url = str(server.make_url(""))
    async with anthropic.AsyncAnthropic(base_url=url, api_key="k", max_retries=0) as client:
        yield client


async def post(
    http: aiohttp.ClientSession, server: TestServer, path: str, body: Any, **headers: str
) -> tuple[int, Mapping[str, str], Any]:
    async with http.post(server.make_url(path), json=body, headers=headers) as resp:
        return resp.status, resp.headers, await resp.json()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("sk-fail-429", Directives(fail=429)),
        ("k:gpt-4o-fail-429-retry-7", Directives(fail=429, retry_after=7)),
        ("fail-quota", Directives(fail=429, quota=True)),
        ("gpt-small-fail-context", Directives(fail=400, model_error="context")),
        ("k:fail-nomodel", Directives(fail=404, model_error="nomodel")),
        ("k_drop", Directives(drop=True)),
        ("slow-250:stall-10-break", Directives(brk=True, slow_ms=250, stall_ms=10)),
        ("gpt-4o-mini-dropout", Directives()),
        ("fail-200", Directives()),
        ("k:gpt-4o-mini", Directives()),
    ],
)
def test_parse_directives(text: str, expected: Directives) -> None:
    assert parse_directives(text) == expected


async def test_chat(oai: openai.AsyncOpenAI) -> None:
    r = await oai.chat.completions.create(model="gpt-4o-mini", messages=USER)
    assert r.model == "gpt-4o-mini"
    assert r.id.startswith("chatcmpl-mock-")
    assert r.choices[0].message.content == REPLY
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (4, 5, 9)
    cut = await oai.chat.completions.create(model="m", messages=USER, max_tokens=2)
    assert cut.choices[0].message.content == "Hello from"
    assert cut.usage is not None
    assert cut.usage.completion_tokens == 2


@pytest.mark.parametrize("include_usage", [True, False])
async def test_chat_stream(oai: openai.AsyncOpenAI, include_usage: bool) -> None:
    extra: dict[str, Any] = {"stream_options": {"include_usage": True}} if include_usage else {}
    stream = await oai.chat.completions.create(
        model="gpt-4o-mini", messages=USER, stream=True, **extra
    )
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == REPLY
    assert len(chunks) == 1 + 5 + 1 + include_usage
    if include_usage:
        assert all(c.usage is None for c in chunks[:-1])
        assert chunks[-1].choices == []
        assert chunks[-1].usage is not None
        assert chunks[-1].usage.total_tokens == 9
    else:
        assert all(c.usage is None for c in chunks)


async def test_anthropic_messages(ant: anthropic.AsyncAnthropic) -> None:
    kwargs: dict[str, Any] = {
        "model": "claude-3-5-haiku-latest",
        "max_tokens": 100,
        "system": "be brief",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "say hi to me"}]}],
    }
    msg = await ant.messages.create(**kwargs)
    assert msg.model == kwargs["model"]
    assert msg.content[0].type == "text"
    assert msg.content[0].text == REPLY
    assert (msg.usage.input_tokens, msg.usage.output_tokens) == (6, 5)
    async with ant.messages.stream(**kwargs) as stream:
        final = await stream.get_final_message()
        assert await stream.get_final_text() == REPLY
    assert (final.usage.input_tokens, final.usage.output_tokens) == (6, 5)
    assert final.stop_reason == "end_turn"
    counted = await ant.messages.count_tokens(
        model="m", system="be brief", messages=kwargs["messages"]
    )
    assert counted.input_tokens == 6
    cut = await ant.messages.create(**{**kwargs, "max_tokens": 3})
    assert cut.stop_reason == "max_tokens"
    assert cut.usage.output_tokens == 3


async def test_other_openai_routes(oai: openai.AsyncOpenAI) -> None:
    emb = await oai.embeddings.create(model="text-embedding-3-small", input=["a b", "c"])
    floats = await oai.embeddings.create(
        model="text-embedding-3-small", input="a b", encoding_format="float"
    )
    assert [len(e.embedding) for e in emb.data] == [8, 8]
    assert emb.data[0].embedding == floats.data[0].embedding != emb.data[1].embedding
    assert emb.usage.prompt_tokens == 3
    comp = await oai.completions.create(model="gpt-3.5-turbo-instruct", prompt="one two")
    assert comp.choices[0].text == REPLY
    assert comp.usage is not None
    assert comp.usage.prompt_tokens == 2
    stream = await oai.completions.create(model="m", prompt="x", stream=True)
    assert "".join([c.choices[0].text async for c in stream]) == REPLY
    resp = await oai.responses.create(model="gpt-4o-mini", input="hello there")
    assert resp.output_text == REPLY
    assert resp.usage is not None
    assert (resp.usage.input_tokens, resp.usage.output_tokens) == (2, 5)
    events = [e async for e in await oai.responses.create(model="m", input="x", stream=True)]
    assert events[-1].type == "response.completed"
    models = await oai.models.list()
    assert "gpt-4o-mini" in [m.id for m in models.data]


@pytest.mark.parametrize("status", [400, 401, 403, 404, 429, 500, 502, 503, 529])
async def test_failures(http: aiohttp.ClientSession, server: TestServer, status: int) -> None:
    body = {"model": "gpt-4o-mini", "messages": USER, "max_tokens": 10}
    auth = f"Bearer sk-fail-{status}"
    code, headers, err = await post(http, server, "/v1/chat/completions", body, authorization=auth)
    assert code == status
    assert set(err["error"]) == {"message", "type", "code", "param"}
    assert headers.get("retry-after") == ("1" if status == 429 else None)
    # Via the model name, in the Anthropic shape.
    body["model"] = f"claude-x-fail-{status}"
    code, _, err = await post(http, server, "/v1/messages", body, **{"x-api-key": "k"})
    assert code == status
    assert err["type"] == "error"
    assert set(err["error"]) == {"type", "message"}


async def test_rate_limit_and_quota_via_sdk(oai: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as info:
        await oai.chat.completions.create(model="gpt-4o-fail-429-retry-7", messages=USER)
    assert info.value.response.headers["retry-after"] == "7"
    assert info.value.code == "rate_limit_exceeded"
    with pytest.raises(openai.RateLimitError) as info:
        await oai.chat.completions.create(model="gpt-4o-fail-quota", messages=USER)
    assert info.value.code == info.value.type == "insufficient_quota"
    assert "retry-after" not in info.value.response.headers


async def test_drop(
    oai: openai.AsyncOpenAI, http: aiohttp.ClientSession, server: TestServer
) -> None:
    with pytest.raises(aiohttp.ClientConnectionError):
        await post(
            http, server, "/v1/chat/completions", {"model": "m-drop"}, authorization="Bearer k"
        )
    with pytest.raises(openai.APIConnectionError):
        await oai.chat.completions.create(model="gpt-4o-drop", messages=USER)
    # The server survives and still answers.
    assert (await oai.chat.completions.create(model="m", messages=USER)).choices


async def test_break(oai: openai.AsyncOpenAI, ant: anthropic.AsyncAnthropic) -> None:
    stream = await oai.chat.completions.create(model="m-break", messages=USER, stream=True)
    seen: list[str] = []

    async def drain() -> None:
        async for chunk in stream:
            seen.append(chunk.choices[0].delta.content or "")

    with pytest.raises(openai.APIConnectionError):
        await drain()
    assert "".join(seen) == "Hello from"
    # The SDK lets its transport's error through (httpx's RemoteProtocolError).
    with pytest.raises(Exception, match=r"incomplete|Connection error"):
        async with ant.messages.stream(
            model="claude-break", max_tokens=10, messages=USER
        ) as astream:
            await astream.get_final_message()


async def test_slow_and_stall(oai: openai.AsyncOpenAI) -> None:
    start = time.monotonic()
    await oai.chat.completions.create(model="m-slow-150", messages=USER)
    assert time.monotonic() - start >= 0.15
    start = time.monotonic()
    stream = await oai.chat.completions.create(model="m-stall-40", messages=USER, stream=True)
    assert len([c async for c in stream]) == 7
    assert time.monotonic() - start >= 6 * 0.04


async def test_auth_and_bad_json(http: aiohttp.ClientSession, server: TestServer) -> None:
    code, _, err = await post(http, server, "/v1/chat/completions", {"model": "m"})
    assert (code, err["error"]["code"]) == (401, "invalid_api_key")
    code, _, err = await post(http, server, "/v1/messages", {"model": "m"})
    assert (code, err["error"]["type"]) == (401, "authentication_error")
    # Anthropic routes take a bearer too; OpenAI routes do not take x-api-key.
    code, _, _ = await post(
        http, server, "/v1/messages/count_tokens", {"model": "m"}, authorization="Bearer k"
    )
    assert code == 200
    code, _, _ = await post(
        http, server, "/v1/chat/completions", {"model": "m"}, **{"x-api-key": "k"}
    )
    assert code == 401
    for path, shape in [("/v1/chat/completions", "error"), ("/v1/messages", "type")]:
        async with http.post(
            server.make_url(path),
            data=b"{nope",
            headers={"x-api-key": "k", "authorization": "Bearer k"},
        ) as resp:
            assert resp.status == 400
            assert shape in await resp.json()


async def test_request_log(
    oai: openai.AsyncOpenAI, http: aiohttp.ClientSession, server: TestServer
) -> None:
    async with http.get(server.make_url("/_mock/health")) as resp:
        assert resp.status == 200
    await oai.chat.completions.create(model="m", messages=USER, extra_query={"a": "1"})
    await post(http, server, "/v1/messages", {"model": "m-fail-500"}, **{"x-api-key": "ant-k"})
    async with http.get(server.make_url("/_mock/requests")) as resp:
        log = (await resp.json())["requests"]
    assert [(r["method"], r["path"], r["key"]) for r in log] == [
        ("POST", "/v1/chat/completions", "k"),
        ("POST", "/v1/messages", "ant-k"),
    ]
    assert log[0]["query"] == {"a": "1"}
    assert log[0]["headers"]["authorization"] == "Bearer k"
    assert log[0]["body"]["messages"] == USER
    async with http.delete(server.make_url("/_mock/requests")) as resp:
        assert await resp.json() == {"cleared": 2}
    async with http.get(server.make_url("/_mock/requests")) as resp:
        assert (await resp.json())["requests"] == []


async def test_run_serves_until_cancelled(unused_tcp_port: int) -> None:
    port = unused_tcp_port
    task = asyncio.create_task(run("127.0.0.1", port))
    async with aiohttp.ClientSession() as http:
        for _ in range(100):
            try:
                async with http.get(f"http://127.0.0.1:{port}/_mock/health") as resp:
                    assert resp.status == 200
                    break
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.01)
        else:
            pytest.fail("mock provider did not start")
        async with http.get(f"http://127.0.0.1:{port}/v1/nope") as resp:
            assert (resp.status, (await resp.json())["error"]["code"]) == (404, "unknown_url")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# --------------------------------------------------------------------------- hardening directives


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("k:gpt-4o-mini-hold-1500", Directives(hold_ms=1500)),
        ("sk-huge-64", Directives(huge_mib=64)),
        ("k:m-bomb-256", Directives(bomb_mib=256)),
        ("sk-proj-leaky-fail-401-ab12", Directives(fail=401, leaky=True)),
        ("gpt-4o-mini-huge", Directives()),
        ("leakyness-holder", Directives()),
    ],
)
def test_parse_hardening_directives(text: str, expected: Directives) -> None:
    assert parse_directives(text) == expected


async def _json_counted(resp: aiohttp.ClientResponse, keep: int = 4096) -> tuple[int, bytes]:
    """Bytes of a body read in chunks (never held whole) and its last `keep` bytes."""
    size, tail = 0, b""
    async for chunk in resp.content.iter_chunked(1 << 20):
        size += len(chunk)
        tail = (tail + chunk)[-keep:]
    return size, tail


async def test_hold_sends_headers_then_the_body_later(
    http: aiohttp.ClientSession, server: TestServer
) -> None:
    body = {"model": "gpt-4o-mini-hold-400", "messages": USER}
    start = time.monotonic()
    async with http.post(server.make_url("/v1/chat/completions"), json=body,
                         headers={"authorization": "Bearer k"}) as resp:  # fmt: skip
        assert resp.status == 200
        assert time.monotonic() - start < 0.3  # headers at once
        doc = await resp.json()
    assert time.monotonic() - start >= 0.4
    assert doc["choices"][0]["message"]["content"] == REPLY


async def test_huge_answer_is_the_same_json_padded(
    http: aiohttp.ClientSession, server: TestServer
) -> None:
    body = {"model": "gpt-4o-mini", "messages": USER}
    async with http.post(server.make_url("/v1/chat/completions"), json=body,
                         headers={"authorization": "Bearer sk-huge-8"}) as resp:  # fmt: skip
        assert resp.status == 200
        assert resp.content_length is not None
        size, tail = await _json_counted(resp)
    assert size == resp.content_length
    assert size > 8 << 20
    doc = orjson.loads(tail.lstrip())
    assert doc["usage"]["completion_tokens"] == 5
    assert doc["choices"][0]["message"]["content"] == REPLY


async def test_bomb_answer_is_gzip_decoding_to_the_padded_json(
    http: aiohttp.ClientSession, server: TestServer
) -> None:
    body = {"model": "claude-x-bomb-16", "max_tokens": 10, "messages": USER}
    async with http.post(server.make_url("/v1/messages"), json=body,
                         headers={"x-api-key": "k"}, auto_decompress=False) as resp:  # fmt: skip
        assert resp.status == 200
        assert resp.headers["content-encoding"] == "gzip"
        raw = await resp.read()
    assert len(raw) == resp.content_length
    assert len(raw) < 64 << 10  # ~1 KiB per MiB
    decoded = gzip.decompress(raw)
    assert len(decoded) > 16 << 20
    assert decoded[: 16 << 20].strip() == b""
    assert orjson.loads(decoded)["content"][0]["text"] == REPLY
    # aiohttp's own decoding agrees (and checks the CRC)
    async with http.post(server.make_url("/v1/messages"), json=body,
                         headers={"x-api-key": "k"}) as resp:  # fmt: skip
        size, tail = await _json_counted(resp)
    assert size == len(decoded)
    assert orjson.loads(tail.lstrip())["usage"] == orjson.loads(decoded)["usage"]


@pytest.mark.parametrize("status", [401, 403])
async def test_leaky_auth_errors_name_a_masked_key_fragment(
    http: aiohttp.ClientSession, server: TestServer, status: int
) -> None:
    key = f"sk-proj-leaky-fail-{status}-ab12"
    body = {"model": "gpt-4o-mini", "messages": USER}
    code, _, err = await post(http, server, "/v1/chat/completions", body,
                              authorization=f"Bearer {key}")  # fmt: skip
    assert code == status
    assert err["error"]["message"] == (
        "Incorrect API key provided: sk-proj-********************ab12. You can find your API "
        "key at https://platform.openai.com/account/api-keys."
    )
    assert (err["error"]["type"], err["error"]["code"]) == (
        "invalid_request_error",
        "invalid_api_key",
    )
    code, _, err = await post(http, server, "/v1/messages", {**body, "max_tokens": 5},
                              **{"x-api-key": "sk-ant-api03-leaky-fail-401-cd34"})  # fmt: skip
    assert code == 401
    assert err["error"] == {"type": "authentication_error",
                            "message": "invalid x-api-key: sk-********************cd34"}  # fmt: skip


async def test_every_path_is_logged_with_its_raw_form(
    http: aiohttp.ClientSession, server: TestServer
) -> None:
    base = f"http://{server.host}:{server.port}"
    for raw in ("/v1ama/v1/models?a=%2F", "/x/%2E%2E/y", "/"):
        async with http.get(URL(base + raw, encoded=True)) as resp:
            assert resp.status == 404
            assert (await resp.json())["error"]["code"] == "unknown_url"
    async with http.get(server.make_url("/_mock/requests")) as resp:
        log = (await resp.json())["requests"]
    assert [(r["path"], r["raw_path"]) for r in log] == [
        ("/v1ama/v1/models", "/v1ama/v1/models?a=%2F"),
        ("/x/../y", "/x/%2E%2E/y"),
        ("/", "/"),
    ]


async def test_valid_json_that_orjson_refuses_is_accepted_and_logged(
    http: aiohttp.ClientSession, server: TestServer
) -> None:
    raw = b'{"model": "gpt-4o-mini", "seed": 123456789012345678901234567890, "messages": [{"role": "user", "content": "a \\ud800 b"}]}'
    async with http.post(server.make_url("/v1/chat/completions"), data=raw,
                         headers={"authorization": "Bearer k", "content-type": "application/json"}) as resp:  # fmt: skip
        assert resp.status == 200
    async with http.get(server.make_url("/_mock/requests")) as resp:
        log = json.loads(await resp.read())["requests"]
    assert log[0]["body"] == json.loads(raw)
    assert log[0]["body"]["seed"] == 123456789012345678901234567890
    assert log[0]["body"]["messages"][0]["content"] == "a \ud800 b"


async def test_openai_routes_take_azures_api_key_header(
    http: aiohttp.ClientSession, server: TestServer
) -> None:
    code, _, doc = await post(http, server, "/v1/chat/completions",
                              {"model": "m", "messages": USER}, **{"api-key": "az-k"})  # fmt: skip
    assert code == 200
    assert doc["choices"][0]["message"]["content"] == REPLY
    async with http.get(server.make_url("/_mock/requests")) as resp:
        assert [r["key"] for r in (await resp.json())["requests"]] == ["az-k"]


async def test_a_body_that_is_not_what_its_encoding_says_is_a_logged_400(
    http: aiohttp.ClientSession, server: TestServer
) -> None:
    async with http.post(server.make_url("/v1/chat/completions"), data=b'{"model": "m"}',
                         headers={"authorization": "Bearer k", "content-encoding": "gzip"}) as resp:  # fmt: skip
        assert resp.status == 400
        assert "error" in await resp.json()
    async with http.get(server.make_url("/_mock/requests")) as resp:
        (rec,) = (await resp.json())["requests"]
    assert (rec["body"], rec["headers"]["content-encoding"]) == (None, "gzip")


async def test_model_level_errors_in_each_providers_shape(
    oai: openai.AsyncOpenAI, ant: anthropic.AsyncAnthropic
) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        await oai.chat.completions.create(model="gpt-fail-context", messages=USER)
    assert bad.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError) as gone:
        await oai.chat.completions.create(model="gpt-fail-nomodel", messages=USER)
    assert gone.value.code == "model_not_found"
    with pytest.raises(anthropic.BadRequestError) as long:
        await ant.messages.create(model="claude-fail-context", max_tokens=8, messages=USER)
    assert "prompt is too long" in str(long.value)
    with pytest.raises(anthropic.NotFoundError) as missing:
        await ant.messages.create(model="claude-fail-nomodel", max_tokens=8, messages=USER)
    assert "model:" in str(missing.value)


async def test_flaky_fails_the_first_n_requests_of_a_key_and_model(oai: openai.AsyncOpenAI) -> None:
    for _ in range(2):
        with pytest.raises(openai.InternalServerError):
            await oai.chat.completions.create(model="gpt-4o-mini-flaky-2", messages=USER)
    r = await oai.chat.completions.create(model="gpt-4o-mini-flaky-2", messages=USER)
    assert r.choices[0].message.content == REPLY
    with pytest.raises(openai.InternalServerError):  # another model has its own count
        await oai.chat.completions.create(model="gpt-4o-flaky-1", messages=USER)


# --------------------------------------------------------------------------- fault lab (issue #11)

OAI = {"authorization": "Bearer k"}
ANT = {"x-api-key": "k"}
ROUTES: dict[str, tuple[str, dict[str, str], dict[str, Any]]] = {  # path, auth, body fields
    "chat": ("/v1/chat/completions", OAI, {"stream_options": {"include_usage": True}}),
    "completions": ("/v1/completions", OAI, {"prompt": "say hi"}),
    "responses": ("/v1/responses", OAI, {"input": "say hi"}),
    "messages": ("/v1/messages", ANT, {"max_tokens": 50}),
}
OVERLOADED = "Mock provider: overloaded (early-error)."
OAI_ERROR = (
    b'data: {"error": {"message": "Mock provider: overloaded (early-error).", '
    b'"type": "server_error", "code": "server_error", "param": null}}\n\n'
)
ANT_ERROR = (
    b'event: error\ndata: {"type": "error", "error": {"type": "overloaded_error", '
    b'"message": "Mock provider: overloaded (early-error)."}}\n\n'
)
GARBLED = b'data: {"choices": [{"delta": {"content": "oops\n\n'


def _body(route: str, model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": USER, "stream": True, **ROUTES[route][2], **extra}


def _frames(raw: bytes) -> list[bytes]:
    """The SSE events of a body, each with its blank line."""
    return [f + b"\n\n" for f in raw.split(b"\n\n") if f]


def _data(frame: bytes) -> Any:
    line = frame.split(b"data: ", 1)[1].rstrip(b"\n")
    return line if line == b"[DONE]" else orjson.loads(line)


def _text(frames: list[bytes]) -> str:
    """The streamed reply text, across formats."""
    out = []
    for f in frames:
        d = _data(f)
        if isinstance(d, dict) and d.get("type") == "content_block_delta":
            out.append(d["delta"]["text"])
        elif isinstance(d, dict) and d.get("type") == "response.output_text.delta":
            out.append(d["delta"])
        elif isinstance(d, dict) and d.get("choices"):
            choice = d["choices"][0]
            out.append(choice.get("text") or choice.get("delta", {}).get("content") or "")
    return "".join(out)


async def _stream_raw(
    http: aiohttp.ClientSession, server: TestServer, route: str, model: str, **extra: Any
) -> tuple[int, bytes]:
    path, headers, _ = ROUTES[route]
    async with http.post(server.make_url(path), json=_body(route, model, **extra),
                         headers=headers) as resp:  # fmt: skip
        return resp.status, await resp.read()


async def _next_frame(resp: aiohttp.ClientResponse, wait: float = 2.0) -> bytes:
    return await asyncio.wait_for(resp.content.readuntil(b"\n\n"), wait)


PREAMBLE = {"chat": 1, "completions": 0, "responses": 3, "messages": 3}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("k:m-first-300", Directives(first_ms=300)),
        ("silent", Directives(silent=True)),
        ("sk-stuck:m", Directives(stuck=True)),
        ("m-garble-nodone", Directives(garble=True, nodone=True)),
        ("k:m-early-error", Directives(early_error=True)),
        ("k_late-error", Directives(late_error=True)),
        ("gpt-fail-filter", Directives(fail=400, model_error="filter")),
        ("claude-noprefill", Directives(noprefill=True)),
        ("k:m-flap", Directives(flap=True)),
        ("firstly-silently-flapjack-nodoner-error", Directives()),
    ],
)
def test_parse_fault_lab_directives(text: str, expected: Directives) -> None:
    assert parse_directives(text) == expected


@pytest.mark.parametrize("route", list(ROUTES))
async def test_first_token_waits_after_the_preamble(
    http: aiohttp.ClientSession, server: TestServer, route: str
) -> None:
    path, headers, _ = ROUTES[route]
    async with http.post(server.make_url(path), json=_body(route, "m-first-400"),
                         headers=headers) as resp:  # fmt: skip
        preamble = [await _next_frame(resp) for _ in range(PREAMBLE[route])]
        with pytest.raises(asyncio.TimeoutError):  # the first content event is held back
            await _next_frame(resp, 0.1)
        rest = _frames(await resp.read())
    assert _text(preamble) == ""
    assert _text(rest) == REPLY
    if route == "chat":
        assert _data(preamble[0])["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    if route == "messages":
        assert [_data(f)["type"] for f in preamble] == [
            "message_start",
            "content_block_start",
            "ping",
        ]
    start = time.monotonic()  # a JSON answer: the wait comes before the headers, like slow-N
    code, _, doc = await post(http, server, "/v1/chat/completions",
                              {"model": "m-first-150", "messages": USER}, **OAI)  # fmt: skip
    assert time.monotonic() - start >= 0.15
    assert (code, doc["choices"][0]["message"]["content"]) == (200, REPLY)


async def test_silent_sends_nothing_until_the_caller_leaves(
    http: aiohttp.ClientSession, server: TestServer
) -> None:
    for path, headers in [("/v1/chat/completions", OAI), ("/v1/messages", ANT)]:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(
                post(http, server, path, {"model": "m-silent", "messages": USER, "stream": True},
                     **headers),
                0.3,
            )  # fmt: skip
    code, _, _ = await post(http, server, "/v1/chat/completions",
                            {"model": "m", "messages": USER}, **OAI)  # fmt: skip
    assert code == 200
    async with http.get(server.make_url("/_mock/requests")) as resp:
        assert len((await resp.json())["requests"]) == 3


async def test_silent_stuck_and_first_stop_waiting_when_the_caller_leaves(
    http: aiohttp.ClientSession, aiohttp_server: ServerFactory
) -> None:
    finished: list[str] = []
    all_finished = asyncio.Event()

    @web.middleware
    async def note(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        finally:
            finished.append(request.path)
            if len(finished) == 3:
                all_finished.set()

    app = create_app()
    app.middlewares.append(note)
    server = await aiohttp_server(app)
    for model, stream in [("m-silent", False), ("m-stuck", True), ("m-first-60000", True)]:
        with pytest.raises(asyncio.TimeoutError):
            async with asyncio.timeout(0.2):
                await _stream_raw(http, server, "chat", model, stream=stream)
    async with asyncio.timeout(5):  # not the ten minutes they would wait for a caller
        await all_finished.wait()


@pytest.mark.parametrize("route", list(ROUTES))
async def test_stuck_stalls_mid_stream_with_the_connection_open(
    http: aiohttp.ClientSession, server: TestServer, route: str
) -> None:
    path, headers, _ = ROUTES[route]
    async with http.post(server.make_url(path), json=_body(route, "m-stuck"),
                         headers=headers) as resp:  # fmt: skip
        seen = [await _next_frame(resp) for _ in range(PREAMBLE[route] + 2)]
        with pytest.raises(asyncio.TimeoutError):
            await _next_frame(resp, 0.3)
        assert not resp.content.at_eof()
        assert resp.connection is not None
    assert _text(seen) == "Hello from"


@pytest.mark.parametrize("route", list(ROUTES))
async def test_garble_sends_one_event_that_is_not_json(
    http: aiohttp.ClientSession, server: TestServer, route: str
) -> None:
    code, raw = await _stream_raw(http, server, route, "m-garble")
    assert code == 200
    frames = _frames(raw)
    bad = []
    for i, f in enumerate(frames):
        try:
            _data(f)
        except orjson.JSONDecodeError:
            bad.append(i)
    assert bad == [PREAMBLE[route] + 2]
    if route == "chat":
        assert frames[bad[0]] == GARBLED
    del frames[bad[0]]
    assert _text(frames) == REPLY
    last = _data(frames[-1])
    assert last == b"[DONE]" or last["type"] in ("message_stop", "response.completed")


@pytest.mark.parametrize("route", list(ROUTES))
async def test_nodone_is_complete_but_has_no_terminator(
    http: aiohttp.ClientSession, server: TestServer, route: str
) -> None:
    code, raw = await _stream_raw(http, server, route, "m-nodone")
    assert code == 200
    frames = _frames(raw)
    assert _text(frames) == REPLY
    docs = [_data(f) for f in frames]
    assert b"[DONE]" not in docs
    types = [d.get("type") for d in docs]
    assert "message_stop" not in types
    assert "response.completed" not in types
    if route == "chat":
        assert docs[-2]["choices"][0]["finish_reason"] == "stop"
        assert docs[-1]["usage"]["completion_tokens"] == 5
    if route == "messages":
        assert docs[-1]["type"] == "message_delta"
        assert docs[-1]["delta"]["stop_reason"] == "end_turn"
    if route == "responses":
        assert docs[-1]["type"] == "response.output_item.done"
    if route == "completions":
        assert docs[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("route", ["chat", "completions", "messages"])
async def test_early_and_late_errors_are_in_band(
    http: aiohttp.ClientSession, server: TestServer, route: str
) -> None:
    error = ANT_ERROR if route == "messages" else OAI_ERROR
    code, raw = await _stream_raw(http, server, route, "m-early-error")
    frames = _frames(raw)
    assert code == 200
    assert frames[-1] == error
    assert len(frames) == PREAMBLE[route] + 1
    code, raw = await _stream_raw(http, server, route, "m-late-error")
    frames = _frames(raw)
    assert code == 200
    assert frames[-1] == error
    assert len(frames) == PREAMBLE[route] + 3
    assert _text(frames[:-1]) == "Hello from"


async def test_early_error_in_the_responses_stream(
    http: aiohttp.ClientSession, server: TestServer
) -> None:
    code, raw = await _stream_raw(http, server, "responses", "m-early-error")
    frames = _frames(raw)
    assert (code, len(frames)) == (200, 4)
    assert frames[-1].startswith(b"event: error\n")
    err = _data(frames[-1])
    assert (err["type"], err["code"], err["message"]) == ("error", "server_error", OVERLOADED)


async def test_fail_filter_is_a_content_policy_400(
    http: aiohttp.ClientSession, server: TestServer
) -> None:
    code, _, err = await post(http, server, "/v1/chat/completions",
                              {"model": "gpt-fail-filter", "messages": USER}, **OAI)  # fmt: skip
    assert code == 400
    assert "content management policy" in err["error"]["message"]
    assert (err["error"]["type"], err["error"]["code"], err["error"]["param"]) == (
        "invalid_request_error", "content_filter", "prompt")  # fmt: skip
    code, _, err = await post(http, server, "/v1/messages",
                              {"model": "claude-fail-filter", "messages": USER}, **ANT)  # fmt: skip
    assert code == 400
    assert err == {"type": "error", "error": {
        "type": "invalid_request_error", "message": "Output blocked by content filtering policy"}}  # fmt: skip


PREFILLED: Any = [*USER, {"role": "assistant", "content": "Hello from"}]
NO_PREFILL = (
    "This model does not support assistant message prefill. "
    "The conversation must end with a user message."
)


async def test_noprefill_rejects_only_a_trailing_assistant_message(
    http: aiohttp.ClientSession, server: TestServer
) -> None:
    for path, headers in [("/v1/chat/completions", OAI), ("/v1/messages", ANT)]:
        body = {"model": "m-noprefill", "messages": PREFILLED, "max_tokens": 50}
        code, _, err = await post(http, server, path, body, **headers)
        assert code == 400
        if path == "/v1/messages":
            assert err["error"] == {"type": "invalid_request_error", "message": NO_PREFILL}
        else:
            assert err["error"]["message"] == NO_PREFILL
            assert (err["error"]["type"], err["error"]["code"]) == (
                "invalid_request_error", "prefill_unsupported")  # fmt: skip
        code, _, _ = await post(http, server, path, {**body, "messages": [*PREFILLED, *USER]},
                                **headers)  # fmt: skip
        assert code == 200


async def test_flap_alternates_per_key_and_model(
    http: aiohttp.ClientSession, server: TestServer
) -> None:
    async def status(model: str) -> int:
        return (await post(http, server, "/v1/chat/completions",
                           {"model": model, "messages": USER}, **OAI))[0]  # fmt: skip

    assert [await status("m-flap") for _ in range(5)] == [503, 200, 503, 200, 503]
    assert await status("other-flap") == 503
    async with http.delete(server.make_url("/_mock/requests")):
        pass
    assert [await status("m-flap") for _ in range(2)] == [503, 200]


@pytest.mark.parametrize(
    ("prefill", "expected"),
    [
        ("Hello from", " the mock provider."),
        ("Hello from ", "the mock provider."),
        ("Hello fr", "om the mock provider."),
        ("Bonjour", REPLY),
        (REPLY, ""),
    ],
)
async def test_prefill_continuation(
    http: aiohttp.ClientSession, server: TestServer, prefill: str, expected: str
) -> None:
    messages = [*USER, {"role": "assistant", "content": prefill}]
    words = len(expected.split())
    inputs = 4 + len(prefill.split())
    body = {"model": "m", "messages": messages, "max_tokens": 50}
    _, _, doc = await post(http, server, "/v1/chat/completions", body, **OAI)
    assert doc["choices"][0]["message"]["content"] == expected
    assert (doc["usage"]["prompt_tokens"], doc["usage"]["completion_tokens"]) == (inputs, words)
    blocks = [{"type": "text", "text": prefill[:3]}, {"type": "text", "text": prefill[3:]}]
    ant_body = {**body, "messages": [*USER, {"role": "assistant", "content": blocks}]}
    _, _, msg = await post(http, server, "/v1/messages", ant_body, **ANT)
    assert msg["content"][0]["text"] == expected
    assert msg["usage"]["output_tokens"] == words
    for route, sent in [("chat", body), ("messages", ant_body)]:
        _, raw = await _stream_raw(http, server, route, "m", messages=sent["messages"])
        frames = _frames(raw)
        assert _text(frames) == expected
        pieces = [t for t in (_text([f]) for f in frames) if t]
        assert len(pieces) == words
        if expected == " the mock provider.":
            assert pieces == [" the", " mock", " provider."]


async def test_stream_faults_fire_after_a_short_continuation(
    http: aiohttp.ClientSession, server: TestServer
) -> None:
    messages = [*USER, {"role": "assistant", "content": "Hello from the mock"}]
    _, raw = await _stream_raw(http, server, "chat", "m-late-error", messages=messages)
    frames = _frames(raw)
    assert frames[-1] == OAI_ERROR
    assert _text(frames[:-1]) == " provider."
    async with http.post(server.make_url("/v1/messages"), headers=ANT,
                         json=_body("messages", "m-stuck", messages=messages)) as resp:  # fmt: skip
        seen = [await _next_frame(resp) for _ in range(4)]
        with pytest.raises(asyncio.TimeoutError):
            await _next_frame(resp, 0.2)
    assert _text(seen) == " provider."


async def test_the_sdks_raise_the_in_band_errors(
    oai: openai.AsyncOpenAI, ant: anthropic.AsyncAnthropic
) -> None:
    stream = await oai.chat.completions.create(model="m-late-error", messages=USER, stream=True)
    seen: list[str] = []

    async def drain() -> None:
        async for chunk in stream:
            seen.append(chunk.choices[0].delta.content or "")

    with pytest.raises(openai.APIError, match="overloaded"):
        await drain()
    assert "".join(seen) == "Hello from"
    with pytest.raises(anthropic.APIError, match="overloaded"):
        async with ant.messages.stream(
            model="claude-early-error", max_tokens=10, messages=USER
        ) as astream:
            await astream.get_final_message()


def test_a_429_without_retry_after() -> None:
    assert parse_directives("gpt-4o-fail-429-retry-none").no_retry_after
    assert parse_directives("gpt-4o-fail-429-retry-none").fail == 429
    assert not parse_directives("gpt-4o-fail-429").no_retry_after
