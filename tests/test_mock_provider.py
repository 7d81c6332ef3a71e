"""The mock provider, driven by the official SDKs and a raw aiohttp client."""

from __future__ import annotations

import asyncio
import base64
import gzip
import io
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestServer
from google import genai
from google.genai import errors as genai_errors
from google.genai import types as gtypes
from yarl import URL

from sidecar.mock_provider import Directives, create_app, parse_directives, run
from sidecar.quota import QuotaKind, parse_quota_headers

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
        ("gpt-4o-mini-drip-1000", Directives(drip_ms=1000)),
        ("firstly-silently-flapjack-nodoner-error-dripping-10", Directives()),
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
async def test_drip_keeps_sending_the_reply_over_and_over_without_an_end(
    http: aiohttp.ClientSession, server: TestServer, route: str
) -> None:
    path, headers, _ = ROUTES[route]
    async with http.post(server.make_url(path), json=_body(route, "m-drip-5"),
                         headers=headers) as resp:  # fmt: skip
        assert resp.status == 200
        start = time.monotonic()
        first = await _next_frame(resp)
        seen = [first, *[await _next_frame(resp) for _ in range(PREAMBLE[route] + 11)]]
        elapsed = time.monotonic() - start
        assert not resp.content.at_eof()
    assert _text(seen) == REPLY + REPLY + "Hello from"  # 12 content events; a reply is 5
    # the preamble and the first content event at once, then one event every 5 ms
    assert elapsed >= 0.005 * (len(seen) - PREAMBLE[route] - 1) * 0.9
    ends = (b"[DONE]", b"message_stop", b"response.completed", b'"finish_reason":"stop"')
    assert not any(end in f for f in seen for end in ends)


async def test_drip_opens_with_its_first_content_event_at_once(
    http: aiohttp.ClientSession, server: TestServer
) -> None:
    path, headers, _ = ROUTES["messages"]
    async with http.post(server.make_url(path), json=_body("messages", "m-drip-60000"),
                         headers=headers) as resp:  # fmt: skip
        seen = [await _next_frame(resp, 1.0) for _ in range(PREAMBLE["messages"] + 1)]
        with pytest.raises(asyncio.TimeoutError):
            await _next_frame(resp, 0.2)  # the next one is a minute away
    assert _text(seen) == "Hello"


async def test_drip_stops_when_the_caller_leaves(
    http: aiohttp.ClientSession, aiohttp_server: ServerFactory
) -> None:
    finished = asyncio.Event()

    @web.middleware
    async def note(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        finally:
            finished.set()

    app = create_app()
    app.middlewares.append(note)
    server = await aiohttp_server(app)
    path, headers, _ = ROUTES["chat"]
    async with http.post(server.make_url(path), json=_body("chat", "m-drip-20"),
                         headers=headers) as resp:  # fmt: skip
        await _next_frame(resp)
        await _next_frame(resp)
        resp.close()  # hang up mid-stream
    async with asyncio.timeout(2):  # the next gap notices: not the ten minutes of a stream
        await finished.wait()


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


# --------------------------------------------------------------------------- Gemini, Azure, tools, images (issue #12)
# One mock for the whole section, on the module's event loop.

ON_MODULE_LOOP = pytest.mark.asyncio(loop_scope="module")
GEMINI = "gemini-2.0-flash"
GOOG = {"x-goog-api-key": "gk"}
AZ = {"api-key": "az-k"}
AZ_VERSION = "2024-10-21"
WEATHER_OAI: Any = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}}}]  # fmt: skip
WEATHER_ANT: Any = [{"name": "get_weather", "input_schema": {
    "type": "object", "properties": {"location": {"type": "string"}}}}]  # fmt: skip
PNG = b"\x89PNG\r\n\x1a\n" + bytes(60)  # 68 bytes
PNG_B64 = base64.b64encode(PNG).decode()
ONE_PNG = "I see 1 image (base64 image/png, 68 bytes)."


@dataclass
class Mock:
    server: TestServer
    http: aiohttp.ClientSession

    def url(self, path: str) -> str:
        return str(self.server.make_url(path))

    async def post(self, path: str, body: Any, **headers: str) -> tuple[int, Any, Any]:
        async with self.http.post(self.url(path), json=body, headers=headers) as resp:
            return resp.status, resp.headers, await resp.json()

    async def raw(self, path: str, body: Any, **headers: str) -> tuple[int, bytes]:
        async with self.http.post(self.url(path), json=body, headers=headers) as resp:
            return resp.status, await resp.read()

    async def log(self) -> list[dict[str, Any]]:
        async with self.http.get(self.url("/_mock/requests")) as resp:
            return list((await resp.json())["requests"])

    async def last(self) -> dict[str, Any]:
        return (await self.log())[-1]

    def gemini(self, key: str = "gk", version: str = "v1beta") -> genai.Client:
        # The SDK's own aiohttp transport, on our session (its default one subclasses
        # ClientSession, which aiohttp warns about, and warnings are errors here).
        options = gtypes.HttpOptions(base_url=self.url("/"), api_version=version,
                                     aiohttp_client=self.http)  # fmt: skip
        return genai.Client(api_key=key, http_options=options)

    def azure(self) -> openai.AsyncAzureOpenAI:
        return openai.AsyncAzureOpenAI(azure_endpoint=self.url("/"), api_key="az-k",
                                       api_version=AZ_VERSION, max_retries=0)  # fmt: skip

    def openai(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url("/v1"), api_key="k", max_retries=0)

    def anthropic(self) -> anthropic.AsyncAnthropic:
        return anthropic.AsyncAnthropic(base_url=self.url("/"), api_key="k", max_retries=0)


@dataclass
class Clients:
    """The official SDKs pointed at the mock (closed when the module ends)."""

    oai: openai.AsyncOpenAI
    ant: anthropic.AsyncAnthropic
    azure: openai.AsyncAzureOpenAI


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mock() -> AsyncIterator[Mock]:
    server = TestServer(create_app())
    await server.start_server()
    async with aiohttp.ClientSession() as http:
        yield Mock(server, http)
    await server.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def sdks(mock: Mock) -> AsyncIterator[Clients]:
    async with mock.openai() as oai, mock.anthropic() as ant, mock.azure() as azure:
        yield Clients(oai, ant, azure)


def gem_path(model: str, action: str) -> str:
    return f"/v1beta/models/{model}:{action}"


def gem_body(text: str = "say hi to me", **extra: Any) -> dict[str, Any]:
    return {"contents": [{"role": "user", "parts": [{"text": text}]}], **extra}


def gem_frames(raw: bytes) -> list[bytes]:
    """The events of a Gemini stream, each checked to end in CRLF CRLF."""
    assert raw.endswith(b"\r\n\r\n")
    frames = raw.split(b"\r\n\r\n")[:-1]
    assert all(f.startswith(b"data: ") and b"\n" not in f for f in frames)
    return frames


def gem_docs(raw: bytes) -> list[Any]:
    return [orjson.loads(f[6:]) for f in gem_frames(raw)]


def gem_text(docs: list[Any]) -> str:
    return "".join(
        p.get("text", "")
        for d in docs
        for c in d.get("candidates", [])
        for p in c["content"]["parts"]
    )


def test_parse_badkey() -> None:
    assert parse_directives("k:gemini-fail-badkey") == Directives(fail=401, bad_key=True)
    assert parse_directives("fail-badkeys") == Directives()


# --- Gemini through the real google-genai SDK


@ON_MODULE_LOOP
async def test_gemini_generate_content_and_its_log_record(mock: Mock) -> None:
    r = await mock.gemini().aio.models.generate_content(model=GEMINI, contents="say hi to me")
    assert r.text == REPLY
    assert r.candidates is not None
    assert r.candidates[0].finish_reason == gtypes.FinishReason.STOP
    assert r.usage_metadata is not None
    usage = r.usage_metadata
    assert (usage.prompt_token_count, usage.candidates_token_count, usage.total_token_count) == (
        4, 5, 9)  # fmt: skip
    assert r.model_version == GEMINI
    rec = await mock.last()
    assert (rec["path"], rec["format"], rec["auth"], rec["model"], rec["key"]) == (
        gem_path(GEMINI, "generateContent"), "gemini", "x-goog-api-key", GEMINI, "gk")  # fmt: skip
    assert rec["body"] == {"contents": [{"parts": [{"text": "say hi to me"}], "role": "user"}]}


@ON_MODULE_LOOP
async def test_gemini_stream_through_the_sdk(mock: Mock) -> None:
    client = mock.gemini()
    stream = await client.aio.models.generate_content_stream(model=GEMINI, contents="say hi")
    chunks = [c async for c in stream]
    assert "".join(c.text or "" for c in chunks) == REPLY
    assert [c.usage_metadata is not None for c in chunks] == [False] * 5 + [True]
    last = chunks[-1]
    assert last.candidates is not None
    assert last.candidates[0].finish_reason == gtypes.FinishReason.STOP
    assert last.usage_metadata is not None
    assert last.usage_metadata.candidates_token_count == 5
    rec = await mock.last()
    assert (rec["path"], rec["query"]) == (
        gem_path(GEMINI, "streamGenerateContent"),
        {"alt": "sse"},
    )


@ON_MODULE_LOOP
async def test_gemini_stream_on_the_wire(mock: Mock) -> None:
    path = gem_path(GEMINI, "streamGenerateContent") + "?alt=sse"
    code, raw = await mock.raw(path, gem_body(generationConfig={"maxOutputTokens": 2}), **GOOG)
    docs = gem_docs(raw)
    assert code == 200
    assert b"[DONE]" not in raw
    assert gem_text(docs) == "Hello from"
    assert [d["candidates"][0].get("finishReason") for d in docs] == [None, None, "MAX_TOKENS"]
    assert docs[-1]["usageMetadata"] == {
        "promptTokenCount": 4, "candidatesTokenCount": 2, "totalTokenCount": 6}  # fmt: skip
    assert docs[0] == {
        "candidates": [{"content": {"parts": [{"text": "Hello"}], "role": "model"}, "index": 0}],
        "modelVersion": GEMINI, "responseId": docs[0]["responseId"]}  # fmt: skip
    # Without alt=sse, Google answers one JSON array of the same chunks.
    code, _, array = await mock.post(gem_path(GEMINI, "streamGenerateContent"), gem_body(), **GOOG)
    assert (code, gem_text(array), array[-1]["candidates"][0]["finishReason"]) == (
        200,
        REPLY,
        "STOP",
    )


@ON_MODULE_LOOP
async def test_gemini_count_tokens_and_embeddings(mock: Mock, sdks: Clients) -> None:
    client = mock.gemini()
    counted = await client.aio.models.count_tokens(model=GEMINI, contents="one two three")
    assert counted.total_tokens == 3
    code, _, doc = await mock.post(gem_path(GEMINI, "countTokens"),
                                   {"generateContentRequest": gem_body("a b")}, **GOOG)  # fmt: skip
    assert (code, doc) == (200, {"totalTokens": 2})
    emb = await client.aio.models.embed_content(model="text-embedding-004", contents=["a b", "c"])
    assert emb.embeddings is not None
    assert [len(e.values or []) for e in emb.embeddings] == [8, 8]
    assert (await mock.last())["path"] == gem_path("text-embedding-004", "batchEmbedContents")
    code, _, one = await mock.post(gem_path("text-embedding-004", "embedContent"),
                                   {"content": {"parts": [{"text": "a b"}]}}, **GOOG)  # fmt: skip
    assert code == 200
    assert one["embedding"]["values"] == emb.embeddings[0].values
    oai = await sdks.oai.embeddings.create(model="text-embedding-3-small", input="a b")
    assert oai.data[0].embedding == one["embedding"]["values"]  # the same text, the same vector


@ON_MODULE_LOOP
async def test_gemini_routes_take_models_prefix_v1_and_the_key_query_parameter(mock: Mock) -> None:
    r = await mock.gemini(version="v1").aio.models.generate_content(
        model=f"models/{GEMINI}", contents="hi"
    )
    assert r.text == REPLY
    rec = await mock.last()
    assert (rec["path"], rec["model"]) == (f"/v1/models/{GEMINI}:generateContent", GEMINI)
    code, _, doc = await mock.post(gem_path(GEMINI, "generateContent") + "?key=qk", gem_body())
    assert (code, gem_text([doc])) == (200, REPLY)
    rec = await mock.last()
    assert (rec["auth"], rec["key"], rec["format"]) == ("?key", "qk", "gemini")


@ON_MODULE_LOOP
async def test_gemini_auth_errors(mock: Mock) -> None:
    path = gem_path(GEMINI, "generateContent")
    code, _, err = await mock.post(path, gem_body(), authorization="Bearer k")
    assert (code, err["error"]["code"], err["error"]["status"]) == (403, 403, "PERMISSION_DENIED")
    assert "unregistered callers" in err["error"]["message"]
    assert (await mock.last())["auth"] == "authorization"  # sent, not accepted
    code, _, err = await mock.post(path, gem_body(), **{"x-goog-api-key": "gk-fail-401"})
    assert err == {"error": {"code": 401, "status": "UNAUTHENTICATED",
                             "message": "Mock provider: simulated HTTP 401 (fail-401)."}}  # fmt: skip
    code, _, err = await mock.post(path, gem_body(), **{"x-goog-api-key": "gk-fail-badkey"})
    assert (code, err["error"]["status"]) == (400, "INVALID_ARGUMENT")
    assert err["error"]["message"] == "API key not valid. Please pass a valid API key."
    assert err["error"]["details"][0]["reason"] == "API_KEY_INVALID"
    code, _, err = await mock.post(
        path, gem_body(), **{"x-goog-api-key": "AIza-leaky-fail-403-ab12"}
    )
    assert (code, err["error"]["status"]) == (403, "PERMISSION_DENIED")
    assert "AIz********************ab12" in err["error"]["message"]
    with pytest.raises(genai_errors.ClientError) as info:
        await mock.gemini("gk-fail-403").aio.models.generate_content(model=GEMINI, contents="x")
    assert (info.value.code, info.value.status) == (403, "PERMISSION_DENIED")


RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo"
QUOTA_FAILURE = "type.googleapis.com/google.rpc.QuotaFailure"


@pytest.mark.parametrize(
    ("model", "delay", "quota_id"),
    [
        ("gemini-fail-429", "1s", "GenerateRequestsPerMinutePerProjectPerModel-FreeTier"),
        ("gemini-fail-429-retry-7", "7s", "GenerateRequestsPerMinutePerProjectPerModel-FreeTier"),
        (
            "gemini-fail-429-retry-none",
            None,
            "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
        ),
        ("gemini-fail-quota", None, "GenerateRequestsPerDayPerProjectPerModel-FreeTier"),
        ("gemini-fail-quota-retry-30", "30s", "GenerateRequestsPerDayPerProjectPerModel-FreeTier"),
    ],
)
@ON_MODULE_LOOP
async def test_gemini_resource_exhausted(
    mock: Mock, model: str, delay: str | None, quota_id: str
) -> None:
    code, headers, err = await mock.post(gem_path(model, "generateContent"), gem_body(), **GOOG)
    assert (code, err["error"]["code"], err["error"]["status"]) == (429, 429, "RESOURCE_EXHAUSTED")
    assert "retry-after" not in headers  # Google says how long only in the body
    details = {d["@type"]: d for d in err["error"]["details"]}
    assert details.get(RETRY_INFO, {}).get("retryDelay") == delay
    (violation,) = details[QUOTA_FAILURE]["violations"]
    assert violation["quotaId"] == quota_id
    assert violation["quotaDimensions"]["model"] == model
    assert ("exceeded your current quota" in err["error"]["message"]) == ("quota" in model)


@ON_MODULE_LOOP
async def test_gemini_server_errors_and_model_errors(mock: Mock) -> None:
    with pytest.raises(genai_errors.ServerError) as info:
        await mock.gemini().aio.models.generate_content(model="gemini-fail-503", contents="x")
    assert (info.value.code, info.value.status) == (503, "UNAVAILABLE")
    code, _, err = await mock.post(
        gem_path("g-fail-context", "generateContent"), gem_body(), **GOOG
    )
    assert (code, err["error"]["status"]) == (400, "INVALID_ARGUMENT")
    assert "input token count" in err["error"]["message"]
    code, _, err = await mock.post(
        gem_path("g-fail-nomodel", "generateContent"), gem_body(), **GOOG
    )
    assert (code, err["error"]["status"]) == (404, "NOT_FOUND")
    # A content-policy block is Google's 200 with promptFeedback and no candidates.
    blocked = await mock.gemini().aio.models.generate_content(model="g-fail-filter", contents="x")
    assert blocked.candidates is None
    assert blocked.prompt_feedback is not None
    assert blocked.prompt_feedback.block_reason == gtypes.BlockedReason.SAFETY
    path = gem_path("g-fail-filter", "streamGenerateContent") + "?alt=sse"
    code, raw = await mock.raw(path, gem_body(), **GOOG)
    assert (code, gem_docs(raw)) == (200, [{"promptFeedback": {"blockReason": "SAFETY"},
                                            "modelVersion": "g-fail-filter"}])  # fmt: skip


GEM_ERROR = {"error": {"code": 503, "message": OVERLOADED, "status": "UNAVAILABLE"}}


@ON_MODULE_LOOP
async def test_gemini_stream_faults(mock: Mock) -> None:
    def path(model: str) -> str:
        return gem_path(model, "streamGenerateContent") + "?alt=sse"

    _, raw = await mock.raw(path("g-early-error"), gem_body(), **GOOG)
    assert gem_docs(raw) == [GEM_ERROR]
    _, raw = await mock.raw(path("g-late-error"), gem_body(), **GOOG)
    docs = gem_docs(raw)
    assert (gem_text(docs[:-1]), docs[-1]) == ("Hello from", GEM_ERROR)
    _, raw = await mock.raw(path("g-garble"), gem_body(), **GOOG)
    frames = gem_frames(raw)
    assert frames[2] == b'data: {"candidates": [{"content": {"parts": [{"text": "oops'
    assert gem_text([orjson.loads(f[6:]) for i, f in enumerate(frames) if i != 2]) == REPLY
    _, raw = await mock.raw(path("g-nodone"), gem_body(), **GOOG)  # no terminator to leave out
    assert gem_text(gem_docs(raw)) == REPLY
    with pytest.raises(aiohttp.ClientPayloadError):
        await mock.raw(path("g-break"), gem_body(), **GOOG)
    stream = await mock.gemini().aio.models.generate_content_stream(model="g-late-error",
                                                                    contents="x")  # fmt: skip
    seen: list[str] = []

    async def drain() -> None:
        async for chunk in stream:
            seen.append(chunk.text or "")

    with pytest.raises(genai_errors.ServerError, match="overloaded"):
        await drain()
    assert "".join(seen) == "Hello from"


@ON_MODULE_LOOP
async def test_gemini_first_token_wait_and_stuck(mock: Mock) -> None:
    path = gem_path("g-first-300", "streamGenerateContent") + "?alt=sse"
    async with mock.http.post(mock.url(path), json=gem_body(), headers=GOOG) as resp:
        with pytest.raises(asyncio.TimeoutError):  # no preamble: nothing until the first token
            await asyncio.wait_for(resp.content.readuntil(b"\r\n\r\n"), 0.1)
        assert gem_text(gem_docs(await resp.read())) == REPLY
    path = gem_path("g-stuck", "streamGenerateContent") + "?alt=sse"
    async with mock.http.post(mock.url(path), json=gem_body(), headers=GOOG) as resp:
        seen = [await asyncio.wait_for(resp.content.readuntil(b"\r\n\r\n"), 2) for _ in range(2)]
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(resp.content.readuntil(b"\r\n\r\n"), 0.2)
    assert gem_text(gem_docs(b"".join(seen))) == "Hello from"


@ON_MODULE_LOOP
async def test_gemini_prefill_and_noprefill(mock: Mock) -> None:
    body = {
        "contents": [*gem_body()["contents"], {"role": "model", "parts": [{"text": "Hello from"}]}]
    }
    code, _, doc = await mock.post(gem_path(GEMINI, "generateContent"), body, **GOOG)
    assert (code, gem_text([doc])) == (200, " the mock provider.")
    assert doc["usageMetadata"]["candidatesTokenCount"] == 3
    code, _, err = await mock.post(gem_path("g-noprefill", "generateContent"), body, **GOOG)
    assert (code, err["error"]["status"], err["error"]["message"]) == (
        400, "INVALID_ARGUMENT", NO_PREFILL)  # fmt: skip


# --- tool calls, in the three formats


def weather_decl(**schema: Any) -> gtypes.Tool:
    params = gtypes.Schema(type=gtypes.Type.OBJECT,
                           properties={"location": gtypes.Schema(type=gtypes.Type.STRING)}, **schema)  # fmt: skip
    return gtypes.Tool(function_declarations=[gtypes.FunctionDeclaration(name="get_weather",
                                                                         parameters=params)])  # fmt: skip


NO_AFC = gtypes.AutomaticFunctionCallingConfig(disable=True)


@ON_MODULE_LOOP
async def test_openai_tool_call_round_trip(mock: Mock, sdks: Clients) -> None:
    client = sdks.oai
    r = await client.chat.completions.create(model="m", messages=USER, tools=WEATHER_OAI)
    choice = r.choices[0]
    assert (choice.finish_reason, choice.message.content) == ("tool_calls", None)
    assert choice.message.tool_calls is not None
    (tool_call,) = choice.message.tool_calls
    assert tool_call.type == "function"
    assert (tool_call.function.name, tool_call.function.arguments) == (
        "get_weather", '{"location":"Paris"}')  # fmt: skip
    assert r.usage is not None
    assert r.usage.completion_tokens == 3  # one per streamed argument piece
    follow_up: Any = [
        *USER,
        {"role": "assistant", "content": None, "tool_calls": [tool_call.model_dump()]},
        {"role": "tool", "tool_call_id": tool_call.id, "content": "22C and sunny"},
    ]
    r = await client.chat.completions.create(model="m", messages=follow_up, tools=WEATHER_OAI)
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (
        "The tool said: 22C and sunny", "stop")  # fmt: skip


@ON_MODULE_LOOP
async def test_openai_tool_call_stream(mock: Mock, sdks: Clients) -> None:
    stream = await sdks.oai.chat.completions.create(
        model="m", messages=USER, tools=WEATHER_OAI, stream=True
    )
    chunks = [c async for c in stream]
    deltas = [c.choices[0].delta for c in chunks]
    assert deltas[0].tool_calls is not None
    assert deltas[0].tool_calls[0].function is not None
    assert deltas[0].tool_calls[0].function.name == "get_weather"
    pieces = [d.tool_calls[0].function.arguments for d in deltas[1:-1] if d.tool_calls and d.tool_calls[0].function]  # fmt: skip
    assert len(pieces) >= 2
    assert "".join(p or "" for p in pieces) == '{"location":"Paris"}'
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    async with sdks.oai.chat.completions.stream(model="m", messages=USER, tools=WEATHER_OAI) as st:
        final = await st.get_final_completion()
    assert final.choices[0].message.tool_calls is not None
    assert final.choices[0].message.tool_calls[0].function.arguments == '{"location":"Paris"}'


TOOL_SCHEMAS: Any = [
    ({"type": "object", "properties": {"location": {"type": "string"}}}, {"location": "Paris"}),
    ({"type": "object", "properties": {"q": {"type": "string"}, "n": {"type": "integer"},
      "on": {"type": "boolean"}, "unit": {"type": "string", "enum": ["c", "f"]}, "opt": {"type": "string"}},
      "required": ["q", "n", "on", "unit"]}, {"q": "x", "n": 1, "on": True, "unit": "c"}),
    ({"type": "object", "properties": {}}, {}),
    (None, {}),
]  # fmt: skip


@pytest.mark.parametrize(("schema", "arguments"), TOOL_SCHEMAS)
@ON_MODULE_LOOP
async def test_tool_arguments_follow_the_schema(mock: Mock, schema: Any, arguments: Any) -> None:
    fn: dict[str, Any] = {"name": "f"} if schema is None else {"name": "f", "parameters": schema}
    body = {"model": "m", "messages": USER, "tools": [{"type": "function", "function": fn}]}
    _, _, doc = await mock.post("/v1/chat/completions", body, **OAI)
    assert (
        json.loads(doc["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"])
        == arguments
    )
    ant = {"model": "c", "max_tokens": 9, "messages": USER,
           "tools": [{"name": "f", "input_schema": schema or {"type": "object"}}]}  # fmt: skip
    _, _, msg = await mock.post("/v1/messages", ant, **ANT)
    assert msg["content"][0]["input"] == arguments


@ON_MODULE_LOOP
async def test_tool_choice_picks_or_refuses_a_tool(mock: Mock) -> None:
    two = [*WEATHER_OAI, {"type": "function", "function": {"name": "other"}}]
    picked = {"type": "function", "function": {"name": "other"}}
    for choice, expected in [("none", None), ("required", "get_weather"), (picked, "other")]:
        body = {"model": "m", "messages": USER, "tools": two, "tool_choice": choice}
        _, _, doc = await mock.post("/v1/chat/completions", body, **OAI)
        calls = doc["choices"][0]["message"].get("tool_calls")
        assert (calls[0]["function"]["name"] if calls else doc["choices"][0]["message"]["content"]) == (
            expected or REPLY)  # fmt: skip
    ant_two = [*WEATHER_ANT, {"name": "other", "input_schema": {"type": "object"}}]
    for ant_choice, expected in [
        ({"type": "none"}, None),
        ({"type": "tool", "name": "other"}, "other"),
    ]:
        body = {
            "model": "c",
            "max_tokens": 9,
            "messages": USER,
            "tools": ant_two,
            "tool_choice": ant_choice,
        }
        _, _, msg = await mock.post("/v1/messages", body, **ANT)
        assert msg["content"][0].get("name", msg["content"][0].get("text")) == (expected or REPLY)


@ON_MODULE_LOOP
async def test_anthropic_tool_use_round_trip(mock: Mock, sdks: Clients) -> None:
    client = sdks.ant
    msg = await client.messages.create(model="c", max_tokens=50, messages=USER, tools=WEATHER_ANT)
    assert msg.stop_reason == "tool_use"
    (block,) = msg.content
    assert block.type == "tool_use"
    assert (block.name, block.input, block.id) == ("get_weather", {"location": "Paris"}, block.id)
    async with client.messages.stream(
        model="c", max_tokens=50, messages=USER, tools=WEATHER_ANT
    ) as stream:
        final = await stream.get_final_message()
    assert final.content[0].type == "tool_use"
    assert final.content[0].input == {"location": "Paris"}
    assert (final.stop_reason, final.usage.output_tokens) == ("tool_use", 3)
    follow_up: Any = [
        *USER,
        {"role": "assistant", "content": [block.model_dump()]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": block.id,
                                      "content": [{"type": "text", "text": "22C"}]}]},
    ]  # fmt: skip
    msg = await client.messages.create(
        model="c", max_tokens=50, messages=follow_up, tools=WEATHER_ANT
    )
    assert msg.content[0].type == "text"
    assert (msg.content[0].text, msg.stop_reason) == ("The tool said: 22C", "end_turn")


@ON_MODULE_LOOP
async def test_anthropic_tool_use_stream_on_the_wire(mock: Mock) -> None:
    body = {"model": "c", "max_tokens": 50, "messages": USER, "tools": WEATHER_ANT, "stream": True}
    _, raw = await mock.raw("/v1/messages", body, **ANT)
    docs = [_data(f) for f in _frames(raw)]
    n = docs[0]["message"]["id"].removeprefix("msg_mock_")
    assert docs[1]["content_block"] == {
        "type": "tool_use", "id": f"toolu_mock_{n}", "name": "get_weather", "input": {}}  # fmt: skip
    parts = [d["delta"]["partial_json"] for d in docs if d["type"] == "content_block_delta"]
    assert len(parts) >= 2
    assert "".join(parts) == '{"location":"Paris"}'
    assert [d["type"] for d in docs[-3:]] == ["content_block_stop", "message_delta", "message_stop"]
    assert docs[-2]["delta"]["stop_reason"] == "tool_use"


@ON_MODULE_LOOP
async def test_gemini_function_call_round_trip(mock: Mock) -> None:
    client = mock.gemini()
    config = gtypes.GenerateContentConfig(tools=[weather_decl()], automatic_function_calling=NO_AFC)
    r = await client.aio.models.generate_content(model=GEMINI, contents="weather?", config=config)
    assert r.function_calls is not None
    (call,) = r.function_calls
    assert (call.name, call.args) == ("get_weather", {"location": "Paris"})
    assert r.candidates is not None
    assert r.candidates[0].finish_reason == gtypes.FinishReason.STOP
    stream = await client.aio.models.generate_content_stream(model=GEMINI, contents="weather?",
                                                             config=config)  # fmt: skip
    chunks = [c async for c in stream]
    assert len(chunks) == 1  # Gemini sends a function call whole
    assert chunks[0].function_calls is not None
    assert chunks[0].function_calls[0].args == {"location": "Paris"}
    assert chunks[0].usage_metadata is not None
    contents = [
        gtypes.Content(role="user", parts=[gtypes.Part.from_text(text="weather?")]),
        gtypes.Content(role="model", parts=[gtypes.Part(function_call=call)]),
        gtypes.Content(role="user", parts=[gtypes.Part.from_function_response(
            name="get_weather", response={"result": "22C"})]),
    ]  # fmt: skip
    r = await client.aio.models.generate_content(model=GEMINI, contents=contents, config=config)
    assert r.text == "The tool said: 22C"
    body = gem_body(tools=[{"functionDeclarations": [{"name": "get_weather"}, {"name": "b"}]}],
                    toolConfig={"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["b"]}})  # fmt: skip
    _, _, doc = await mock.post(gem_path(GEMINI, "generateContent"), body, **GOOG)
    assert doc["candidates"][0]["content"]["parts"] == [{"functionCall": {"name": "b", "args": {}}}]
    body["toolConfig"] = {"functionCallingConfig": {"mode": "NONE"}}
    _, _, doc = await mock.post(gem_path(GEMINI, "generateContent"), body, **GOOG)
    assert gem_text([doc]) == REPLY
    response = {"functionResponse": {"name": "b", "response": {"temp": 22, "sky": "clear"}}}
    body = {"contents": [{"role": "user", "parts": [response]}]}
    _, _, doc = await mock.post(gem_path(GEMINI, "generateContent"), body, **GOOG)
    assert gem_text([doc]) == 'The tool said: {"temp":22,"sky":"clear"}'


# --- images


@ON_MODULE_LOOP
async def test_images_are_counted_and_named_in_every_format(mock: Mock, sdks: Clients) -> None:
    parts: Any = [
        {"type": "text", "text": "what are these"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_B64}"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
    ]
    r = await sdks.oai.chat.completions.create(
        model="m", messages=[{"role": "user", "content": parts}]
    )
    assert r.choices[0].message.content == (
        "I see 2 images (base64 image/png, 68 bytes; url https://example.com/cat.jpg)."
    )
    source = {"type": "base64", "media_type": "image/png", "data": PNG_B64}
    blocks: Any = [{"type": "image", "source": source}, {"type": "text", "text": "what"}]
    async with sdks.ant.messages.stream(
        model="c", max_tokens=50, messages=[{"role": "user", "content": blocks}]
    ) as stream:
        assert await stream.get_final_text() == ONE_PNG
    client = mock.gemini()
    png = gtypes.Part.from_bytes(data=PNG, mime_type="image/png")
    r2 = await client.aio.models.generate_content(model=GEMINI, contents=[png, "what"])
    assert r2.text == ONE_PNG
    remote = gtypes.Part.from_uri(file_uri="https://example.com/a.png", mime_type="image/png")
    r2 = await client.aio.models.generate_content(model=GEMINI, contents=[png, remote, "what"])
    assert r2.text == "I see 2 images (base64 image/png, 68 bytes; url https://example.com/a.png)."
    rec = await mock.last()
    assert rec["body"]["contents"][0]["parts"][0]["inlineData"]["data"] == PNG_B64


# --- Azure OpenAI


@ON_MODULE_LOOP
async def test_azure_deployments_through_the_sdk(mock: Mock, sdks: Clients) -> None:
    client = sdks.azure
    r = await client.chat.completions.create(model="my-gpt", messages=USER)
    assert (r.model, r.choices[0].message.content) == ("my-gpt", REPLY)
    rec = await mock.last()
    assert (rec["path"], rec["format"], rec["auth"], rec["model"], rec["key"]) == (
        "/openai/deployments/my-gpt/chat/completions", "openai", "api-key", "my-gpt", "az-k")  # fmt: skip
    assert rec["query"] == {"api-version": AZ_VERSION}
    assert rec["body"]["messages"] == USER
    stream = await client.chat.completions.create(model="my-gpt", messages=USER, stream=True)
    assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices]) == REPLY
    emb = await client.embeddings.create(model="my-embedder", input="a b")
    assert (emb.model, len(emb.data[0].embedding)) == ("my-embedder", 8)
    comp = await client.completions.create(model="my-instruct", prompt="x")
    assert (comp.model, comp.choices[0].text) == ("my-instruct", REPLY)


@ON_MODULE_LOOP
async def test_azure_v1_api(mock: Mock) -> None:
    body = {"model": "gpt-4o-mini", "messages": USER}
    code, _, doc = await mock.post("/openai/v1/chat/completions", body, **AZ)
    assert (code, doc["model"], doc["choices"][0]["message"]["content"]) == (
        200,
        "gpt-4o-mini",
        REPLY,
    )
    rec = await mock.last()
    assert (rec["auth"], rec["model"], rec["format"]) == ("api-key", "gpt-4o-mini", "openai")
    code, _, _ = await mock.post("/openai/v1/chat/completions", body, authorization="Bearer t")
    assert code == 200
    code, headers, err = await mock.post("/openai/v1/chat/completions",
                                         {**body, "model": "m-fail-429-retry-3"}, **AZ)  # fmt: skip
    assert (code, headers["retry-after"], headers["retry-after-ms"]) == (429, "3", "3000")
    assert "Operation under Azure OpenAI API version v1 have" in err["error"]["message"]


@ON_MODULE_LOOP
async def test_azure_errors(mock: Mock, sdks: Clients) -> None:
    path = "/openai/deployments/my-gpt/chat/completions"
    body = {"messages": USER}
    code, _, err = await mock.post(path, body, **AZ)  # no api-version
    assert (code, err) == (404, {"error": {"code": "404", "message": "Resource not found"}})
    versioned = f"?api-version={AZ_VERSION}"
    code, _, err = await mock.post(path + versioned, body, authorization="Bearer")
    assert (code, err["error"]["code"]) == (401, "401")
    assert err["error"]["message"].startswith("Access denied due to invalid subscription key")
    code, _, err = await mock.post(path + versioned, body, **{"api-key": "az-fail-401"})
    assert (code, err["error"]["code"]) == (401, "401")
    code, _, err = await mock.post(
        "/openai/deployments/gone-fail-nomodel/chat/completions" + versioned, body, **AZ
    )
    assert (code, err["error"]["code"]) == (404, "DeploymentNotFound")
    with pytest.raises(openai.RateLimitError) as info:
        await sdks.azure.embeddings.create(model="emb-fail-429-retry-7", input="x")
    headers = info.value.response.headers
    assert (headers["retry-after"], headers["retry-after-ms"]) == ("7", "7000")
    assert info.value.body == {"code": "429", "message": (
        f"Requests to the Embeddings_Create Operation under Azure OpenAI API version {AZ_VERSION} "
        "have exceeded token rate limit of your current OpenAI S0 pricing tier. Please retry after "
        "7 seconds. Please go here: https://aka.ms/oai/quotaincrease if you would like to further "
        "increase the default rate limit.")}  # fmt: skip
    code, headers, err = await mock.post(
        "/openai/deployments/d-fail-429-retry-none/chat/completions" + versioned, body, **AZ
    )
    assert code == 429
    assert "retry-after" not in headers
    assert "retry-after-ms" not in headers
    assert "Please retry after" not in err["error"]["message"]
    assert "ChatCompletions_Create Operation" in err["error"]["message"]


# --- the request log


@ON_MODULE_LOOP
async def test_the_log_records_format_auth_and_model_for_every_request(mock: Mock) -> None:
    await mock.post("/v1/chat/completions", {"model": "gpt-4o-mini", "messages": USER}, **OAI)
    await mock.post("/v1/messages", {"model": "claude-x", "max_tokens": 5, "messages": USER},
                    authorization="Bearer b")  # fmt: skip
    await mock.post("/v1/messages", {"model": "claude-x-fail-500", "max_tokens": 5}, **ANT)
    await mock.post("/nowhere", {"model": "m"}, **GOOG)
    await mock.post(gem_path(GEMINI, "countTokens"), {"contents": []}, **{"api-key": "wrong-place"})
    log = (await mock.log())[-5:]
    assert [(r["format"], r["auth"], r["model"], r["key"]) for r in log] == [
        ("openai", "authorization", "gpt-4o-mini", "k"),
        ("anthropic", "authorization", "claude-x", "b"),
        ("anthropic", "x-api-key", "claude-x-fail-500", "k"),
        (None, "x-goog-api-key", None, "gk"),
        ("gemini", "api-key", GEMINI, "wrong-place"),
    ]
    assert log[2]["body"] == {"model": "claude-x-fail-500", "max_tokens": 5}


# --- quota-N: the providers' remaining-quota headers (issue #13)


def test_parse_quota() -> None:
    assert parse_directives("sk-quota-3") == Directives(quota_limit=3)
    assert parse_directives("k:m-quota-2-reset-5") == Directives(quota_limit=2, quota_reset_s=5)
    assert parse_directives("sk-quota-x:fail-quota") == Directives(fail=429, quota=True)


def _quota(headers: Mapping[str, str], prefix: str) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items() if k.lower().startswith(prefix)}


@ON_MODULE_LOOP
async def test_quota_headers_count_down_then_429_openai(mock: Mock) -> None:
    auth = {"authorization": "Bearer sk-quota-2-reset-7"}
    body = {"model": "gpt-4o-mini", "messages": USER}
    code, headers, _ = await mock.post("/v1/chat/completions", body, **auth)
    assert code == 200
    assert _quota(headers, "x-ratelimit-") == {
        "x-ratelimit-limit-requests": "2", "x-ratelimit-remaining-requests": "1",
        "x-ratelimit-reset-requests": "7s", "x-ratelimit-limit-tokens": "2000",
        "x-ratelimit-remaining-tokens": "1000", "x-ratelimit-reset-tokens": "7s",
    }  # fmt: skip
    async with mock.http.post(mock.url("/v1/chat/completions"), headers=auth,
                              json={**body, "stream": True}) as resp:  # fmt: skip
        assert resp.status == 200
        assert resp.headers["x-ratelimit-remaining-requests"] == "0"  # a stream carries them too
        assert (await resp.read()).endswith(b"data: [DONE]\n\n")
    code, headers, err = await mock.post("/v1/chat/completions", body, **auth)
    assert (code, headers["retry-after"], err["error"]["code"]) == (429, "7", "rate_limit_exceeded")
    assert (headers["x-ratelimit-remaining-requests"], headers["x-ratelimit-remaining-tokens"]) == (
        "0", "0")  # fmt: skip
    code, headers, _ = await mock.post("/v1/chat/completions", {**body, "model": "gpt-4o"}, **auth)
    assert (code, headers["x-ratelimit-remaining-requests"]) == (200, "1")  # per model
    code, headers, _ = await mock.post("/v1/chat/completions", body, **OAI)
    assert code == 200
    assert not _quota(headers, "x-ratelimit-")


@ON_MODULE_LOOP
async def test_quota_headers_anthropic_azure_gemini(mock: Mock) -> None:
    body = {"model": "claude-x", "max_tokens": 5, "messages": USER}
    before = time.time()
    code, headers, _ = await mock.post("/v1/messages", body, **{"x-api-key": "ak-quota-1"})
    assert code == 200
    assert set(_quota(headers, "anthropic-ratelimit-")) == {
        f"anthropic-ratelimit-{kind}-{part}"
        for kind in ("requests", "tokens") for part in ("limit", "remaining", "reset")
    }  # fmt: skip
    readings = parse_quota_headers(headers, 0.0, before)
    assert [(r.kind, r.remaining, r.limit) for r in readings] == [
        (QuotaKind.REQUESTS, 0, 1), (QuotaKind.TOKENS, 0, 1000)]  # fmt: skip
    assert all(r.reset_at is not None and 60 <= r.reset_at <= 62 for r in readings)
    code, headers, err = await mock.post("/v1/messages", body, **{"x-api-key": "ak-quota-1"})
    assert (code, headers["retry-after"], err["error"]["type"]) == (429, "60", "rate_limit_error")
    azure = "/openai/deployments/d/chat/completions?api-version=" + AZ_VERSION
    for expected in (200, 429):
        code, headers, _ = await mock.post(azure, {"messages": USER}, **{"api-key": "az-quota-1"})
        assert (code, headers["x-ratelimit-limit-requests"]) == (expected, "1")
    assert (headers["retry-after"], headers["retry-after-ms"]) == ("60", "60000")
    path = gem_path(GEMINI, "generateContent")
    code, headers, _ = await mock.post(path, gem_body(), **{"x-goog-api-key": "gk-quota-1"})
    assert code == 200
    assert not _quota(headers, "x-ratelimit-")
    code, headers, err = await mock.post(path, gem_body(), **{"x-goog-api-key": "gk-quota-1"})
    assert (code, err["error"]["status"]) == (429, "RESOURCE_EXHAUSTED")
    assert {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "60s"} in err[
        "error"]["details"]  # fmt: skip
    assert "retry-after" not in headers


async def test_clearing_the_log_restarts_quota_counts(
    http: aiohttp.ClientSession, server: TestServer
) -> None:
    auth = {"authorization": "Bearer sk-quota-1"}
    body = {"model": "gpt-4o-mini", "messages": USER}
    assert (await post(http, server, "/v1/chat/completions", body, **auth))[0] == 200
    assert (await post(http, server, "/v1/chat/completions", body, **auth))[0] == 429
    async with http.delete(server.make_url("/_mock/requests")):
        pass
    assert (await post(http, server, "/v1/chat/completions", body, **auth))[0] == 200


# --------------------------------------------------------------------------- OTLP trace sink


async def test_the_trace_sink_answers_an_empty_protobuf_and_counts_per_source(
    http: aiohttp.ClientSession, server: TestServer
) -> None:
    proto = {"Content-Type": "application/x-protobuf"}
    for source, body in (("a", b"\x0a\x03abc"), ("a", b"x" * 70_000), ("", b"")):
        url = server.make_url("/v1/traces").with_query({"source": source} if source else {})
        async with http.post(url, data=body, headers=proto) as resp:
            assert resp.status == 200
            assert resp.content_type == "application/x-protobuf"
            assert await resp.read() == b""
    async with http.get(server.make_url("/_mock/traces")) as resp:
        assert await resp.json() == {"sources": {
            "a": {"requests": 2, "bytes": 5 + 70_000, "too_large": 0},
            "": {"requests": 1, "bytes": 0, "too_large": 0},
        }}  # fmt: skip
    async with http.get(server.make_url("/_mock/requests")) as resp:
        assert (await resp.json())["requests"] == []  # exports are not provider requests
    async with http.delete(server.make_url("/_mock/requests")) as resp:
        assert resp.status == 200
    async with http.get(server.make_url("/_mock/traces")) as resp:
        assert await resp.json() == {"sources": {}}


async def _chunks(total: int) -> AsyncIterator[bytes]:
    piece = b"\0" * (1 << 20)
    for start in range(0, total, len(piece)):
        yield piece[: total - start]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_the_trace_sink_refuses_a_body_over_16_mib_with_413(
    http: aiohttp.ClientSession, server: TestServer, chunked: bool
) -> None:
    size = (16 << 20) + 1
    body = _chunks(size) if chunked else io.BytesIO(b"\0" * size)
    headers = {} if chunked else {"Content-Length": str(size)}
    url = server.make_url("/v1/traces").with_query({"source": "big"})
    async with http.post(url, data=body, headers=headers) as resp:
        assert resp.status == 413
    async with http.get(server.make_url("/_mock/traces")) as resp:
        assert (await resp.json())["sources"]["big"] == {"requests": 0, "bytes": 0, "too_large": 1}
