"""A hostile or broken upstream behind a translated request (docs/reference.md#translation).

One sidecar for the module in front of a scripted upstream that sends exactly the bytes
each case needs: answers too large or not JSON, a 200 that is an error, a finished
stream that lost its terminator, a tool call cut by the token limit, a Gemini stream
asked for without `alt=sse`, a schema nested past any sense. Whatever comes back, the
caller gets its own format, and what was paid for is metered.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import anthropic
import orjson
import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.harness import Env, Sidecar, make_env
from tests.test_proxy_e2e import keys_yaml

pytestmark = pytest.mark.asyncio(loop_scope="module")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Upstream:
    handler: Handler | None = None
    seen: int = 0

    async def serve(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        self.seen += 1
        assert self.handler is not None, "no upstream call was expected"
        return await self.handler(request)


@dataclass
class World:
    sc: Sidecar
    env: Env
    token: str
    http: aiohttp.ClientSession
    upstream: Upstream

    async def post(self, path: str, body: Any, **headers: str) -> tuple[int, dict[str, str], bytes]:
        raw = body if isinstance(body, bytes) else orjson.dumps(body)
        headers = {"content-type": "application/json", **headers}
        async with self.http.post(self.sc.url + path, data=raw, headers=headers) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, await r.read()

    async def last_access(self) -> dict[str, Any]:
        for _ in range(50):  # the access log is written in batches
            lines = [ln for ln in self.env.access.getvalue().splitlines() if ln.strip()]
            if lines and orjson.loads(lines[-1]).get("request_id") == self.last_id:
                return dict(orjson.loads(lines[-1]))
            await asyncio.sleep(0.05)
        raise AssertionError("no access-log line for the request")

    last_id: str = ""


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    up = Upstream()
    app = web.Application(client_max_size=1 << 26)
    app.router.add_route("*", "/{tail:.*}", up.serve)
    server = TestServer(app)
    await server.start_server()
    env = make_env(tmp_path_factory.mktemp("translate-faults"), str(server.make_url("/v1")))
    token = env.access_key("app")
    env.write_config(
        "providers:\n"
        f"  - id: openai\n    base_url: UPSTREAM\n"
        f"    api_keys: {keys_yaml(env, 'openai', [('oa-1', 'sk-oa-one')])}\n"
        f"  - id: anthropic\n    base_url: UPSTREAM\n"
        f"    api_keys: {keys_yaml(env, 'anthropic', [('an-1', 'sk-ant-one')])}\n"
        f"  - id: google\n    base_url: {server.make_url('/v1beta')}\n"
        f"    api_keys: {keys_yaml(env, 'google', [('g-1', 'AIza-google-one')])}\n"
        "failover: {on_status: [429, 500, 502, 503]}\n"
    )
    sc = await env.start()
    async with aiohttp.ClientSession() as http:
        yield World(sc, env, token, http, up)
    await sc.stop()
    await server.close()


def chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


def bearer(w: World) -> dict[str, str]:
    return {"authorization": f"Bearer {w.token}"}


def anthropic_headers(w: World) -> dict[str, str]:
    return {"x-api-key": w.token, "anthropic-version": "2023-06-01"}


async def test_an_html_error_page_reaches_the_caller_in_its_own_error_shape(w: World) -> None:
    async def page(request: web.Request) -> web.StreamResponse:
        return web.Response(status=404, text="<html><title>Error 404 (Not Found)!!1</title></html>",
                            content_type="text/html")  # fmt: skip

    w.upstream.handler = page
    status, headers, body = await w.post("/v1/chat/completions", chat("gemini-2.5-flash"),
                                         **bearer(w))  # fmt: skip
    assert status == 404
    assert headers["content-type"].startswith("application/json")
    assert headers["x-sidecar-translated"] == "openai->gemini"
    assert "Not Found" in orjson.loads(body)["error"]["message"]


async def test_an_answer_too_large_to_translate_is_the_callers_502(w: World) -> None:
    async def huge(request: web.Request) -> web.StreamResponse:
        return web.json_response({"id": "msg_1", "type": "message", "role": "assistant",
                                  "model": "m", "content": [{"type": "text", "text": "x" * (9 << 20)}],
                                  "stop_reason": "end_turn",
                                  "usage": {"input_tokens": 1, "output_tokens": 2}})  # fmt: skip

    w.upstream.handler = huge
    status, headers, body = await w.post("/v1/chat/completions", chat("claude-haiku-4-5"),
                                         **bearer(w))  # fmt: skip
    assert status == 502
    assert headers["x-sidecar-translated"] == "openai->anthropic"
    assert set(orjson.loads(body)) == {"error"}  # OpenAI's error shape, not Anthropic's answer


async def test_a_200_that_is_an_error_is_not_an_empty_answer(w: World) -> None:
    async def error_200(request: web.Request) -> web.StreamResponse:
        return web.json_response({"error": {"message": "Provider returned error", "code": 502}})

    w.upstream.handler = error_200
    status, _, body = await w.post("/v1/messages", {**chat("gpt-4o-mini"), "max_tokens": 20},
                                   **anthropic_headers(w))  # fmt: skip
    assert status == 502
    assert orjson.loads(body)["type"] == "error"


async def test_a_tool_call_cut_by_the_token_limit_reaches_the_caller_and_is_metered(
    w: World,
) -> None:
    async def cut(request: web.Request) -> web.StreamResponse:
        return web.json_response({"id": "chatcmpl-1", "object": "chat.completion", "created": 1,
            "model": "gpt-4o-mini", "choices": [{"index": 0, "finish_reason": "length",
            "message": {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1",
            "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Par'}}]}}],
            "usage": {"prompt_tokens": 1000, "completion_tokens": 500, "total_tokens": 1500}})  # fmt: skip

    w.upstream.handler = cut
    body = {"model": "gpt-4o-mini", "max_tokens": 5,
            "messages": [{"role": "user", "content": "weather in Paris?"}],
            "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}]}  # fmt: skip
    status, headers, out = await w.post("/v1/messages", body, **anthropic_headers(w))
    assert status == 200
    msg = orjson.loads(out)
    assert msg["stop_reason"] == "max_tokens"
    assert msg["content"][0]["type"] == "tool_use"
    w.last_id = headers["x-sidecar-request-id"]
    logged = await w.last_access()
    assert (logged["input_tokens"], logged["output_tokens"]) == (1000, 500)


async def test_a_finished_stream_that_lost_its_terminator_is_whole_for_the_sdk(w: World) -> None:
    async def no_done(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        base = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}
        for chunk in (
            {**base, "choices": [{"index": 0, "delta": {"role": "assistant",
                                                        "content": "Hello there"}}]},
            {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
            {**base, "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2,
                                              "total_tokens": 7}},
        ):  # fmt: skip
            await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        return resp  # no `data: [DONE]`

    w.upstream.handler = no_done
    async with (
        anthropic.AsyncAnthropic(base_url=w.sc.url, api_key=w.token, max_retries=0) as client,
        client.messages.stream(model="gpt-4o-mini", max_tokens=50,
                               messages=[{"role": "user", "content": "hi"}]) as s,  # fmt: skip
    ):
        msg = await s.get_final_message()
    assert [b.text for b in msg.content if b.type == "text"] == ["Hello there"]
    assert msg.stop_reason == "end_turn"
    assert (msg.usage.input_tokens, msg.usage.output_tokens) == (5, 2)


async def test_a_gemini_stream_without_alt_sse_is_not_translated(w: World) -> None:
    before = w.upstream.seen
    w.upstream.handler = None
    body = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
    status, _, out = await w.post("/v1beta/models/gpt-4o-mini:streamGenerateContent", body,
                                  **{"x-goog-api-key": w.token})  # fmt: skip
    assert status == 400  # only a Gemini provider can answer without SSE
    assert orjson.loads(out)["error"]["status"] == "INVALID_ARGUMENT"
    assert w.upstream.seen == before


async def test_a_schema_nested_past_sense_is_refused_by_name_not_a_500(w: World) -> None:
    before = w.upstream.seen
    depth = 505
    schema = '{"type":"OBJECT","properties":{"a":' * depth + '{"type":"STRING"}' + "}}" * depth
    raw = ('{"contents":[{"role":"user","parts":[{"text":"hi"}]}],"tools":[{"functionDeclarations"'
           ':[{"name":"f","parameters":' + schema + "}]}]}").encode()  # fmt: skip
    status, _, out = await w.post("/v1beta/models/gpt-4o-mini:generateContent", raw,
                                  **{"x-goog-api-key": w.token})  # fmt: skip
    assert status == 400
    err = orjson.loads(out)["error"]
    assert err["details"][0]["reason"] == "translation_unsupported"
    assert "nested too deeply" in err["message"]
    assert w.upstream.seen == before


@pytest.fixture
def w(world: World) -> World:
    return world


async def test_a_failover_status_page_is_relayed_as_the_callers_json_error(w: World) -> None:
    async def page(request: web.Request) -> web.StreamResponse:
        return web.Response(status=503, text="<html>Service Unavailable</html>",
                            content_type="text/html")  # fmt: skip

    w.upstream.handler = page
    status, headers, body = await w.post("/v1/messages", {**chat("gpt-4o-mini-x"),
                                         "max_tokens": 5}, **anthropic_headers(w))  # fmt: skip
    assert status == 503
    assert headers["content-type"].startswith("application/json")
    assert orjson.loads(body)["type"] == "error"


@pytest.mark.parametrize("action", ["generateContent", "streamGenerateContent?alt=sse"])
async def test_a_gemini_chat_without_a_body_is_a_400_not_a_crash(w: World, action: str) -> None:
    before = w.upstream.seen
    async with w.http.post(w.sc.url + f"/v1beta/models/gpt-4o-mini:{action}",
                           headers={"x-goog-api-key": w.token}) as r:  # fmt: skip
        assert r.status == 400
        assert (await r.json())["error"]["status"] == "INVALID_ARGUMENT"
    assert w.upstream.seen == before


async def test_an_answer_that_names_no_model_gets_the_one_that_was_asked(w: World) -> None:
    async def nameless(request: web.Request) -> web.StreamResponse:
        return web.json_response({"candidates": [{"content": {"role": "model", "parts": [
            {"text": "hi"}]}, "finishReason": "STOP"}],
            "usageMetadata": {"promptTokenCount": 1, "candidatesTokenCount": 1}})  # fmt: skip

    w.upstream.handler = nameless
    status, _, body = await w.post("/v1/chat/completions", chat("gemini-2.5-flash"), **bearer(w))
    assert status == 200
    assert orjson.loads(body)["model"] == "gemini-2.5-flash"
