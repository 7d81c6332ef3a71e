"""Stream faults the mock cannot script: an upstream that sends exactly the given bytes.

Each test queues what the upstream sends for each request it gets (bytes to write, a
float to sleep, "close" to cut the connection) and drives the sidecar with the official
SDKs or raw sockets. Regressions found by review of the failover engine and the stream
tracker (docs/reference.md#resuming-a-broken-stream).
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web

from tests.harness import Env, Sidecar, make_env, metric_value
from tests.test_proxy_e2e import boot, keys_yaml, metrics_text

MSG: Any = [{"role": "user", "content": "hi"}]
DONE = b"data: [DONE]\n\n"
Step = bytes | float | str


class Script:
    """Each upstream request takes the next list of steps."""

    def __init__(self) -> None:
        self.queue: list[list[Step]] = []
        self.requests: list[dict[str, Any]] = []
        self.done = 0  # handlers that have returned

    async def handle(self, request: web.Request) -> web.StreamResponse:
        try:
            self.requests.append(await request.json())
        except RecursionError:  # a body nested deeper than the json module reads
            self.requests.append({"model": "(too deep to read)"})
        steps = self.queue.pop(0) if self.queue else []
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        try:
            await resp.prepare(request)
            for step in steps:
                if isinstance(step, float):
                    await asyncio.sleep(step)
                elif step == "close":
                    assert request.transport is not None
                    request.transport.close()
                    return resp
                else:
                    assert isinstance(step, bytes)
                    await resp.write(step)
            await resp.write_eof()
            return resp
        finally:
            self.done += 1


@pytest.fixture
async def script(aiohttp_server: Any) -> Script:
    s = Script()
    app = web.Application()
    app.router.add_post("/v1/{tail:.*}", s.handle)
    s.server = await aiohttp_server(app)  # type: ignore[attr-defined]
    return s


@pytest.fixture
def senv(tmp_path: Any, script: Script) -> Env:
    return make_env(tmp_path, str(script.server.make_url("/v1")))  # type: ignore[attr-defined]


def config(env: Env, *, first_token: str = "1s", stream_idle: str = "1s", retries: int = 1) -> str:
    return (
        f"timeouts: {{first_token: {first_token}, stream_idle: {stream_idle}, per_request: 5s}}\n"
        f"failover: {{retry: {{backoff: 20ms, attempts: {retries}}}}}\n"
        "providers:\n"
        "  - id: openai\n    base_url: UPSTREAM\n    prefill: true\n"
        f"    api_keys: {keys_yaml(env, 'openai', [('one', 'sk-one-SECRETVALUE1234')])}\n"
        "  - id: anthropic\n    base_url: UPSTREAM\n"
        f"    api_keys: {keys_yaml(env, 'anthropic', [('one', 'sk-ant-one')])}\n"
    )


async def start(env: Env, sidecars: list[Sidecar], **kw: Any) -> tuple[Sidecar, str]:
    token = env.access_key("app")
    return await boot(env, sidecars, config(env, **kw)), token


def chunk(content: str | None = None, finish: str | None = None, *, role: bool = False) -> bytes:
    delta: dict[str, str] = {"role": "assistant"} if role else {}
    if content is not None:
        delta["content"] = content
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return b"data: " + orjson.dumps({"id": "x", "object": "chat.completion.chunk", "model": "m",
                                     "choices": [choice]}) + b"\n\n"  # fmt: skip


def error(code: str, message: str, kind: str = "invalid_request_error") -> bytes:
    err = {"message": message, "type": kind, "code": code, "param": None}
    return b"data: " + orjson.dumps({"error": err}) + b"\n\n"


def anthropic_event(obj: dict[str, Any]) -> bytes:
    return b"event: " + obj["type"].encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


ROLE = chunk("", role=True)


def post_bytes(token: str, body: bytes) -> bytes:
    """A raw `POST /v1/chat/completions`, for a caller that then reads nothing or leaves."""
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")  # fmt: skip
    return head.encode() + body


async def chat_text(sc: Sidecar, token: str, models: list[str], **kw: Any) -> str:
    async with sc.openai(token) as client:
        s = await client.chat.completions.create(
            model=models[0], messages=MSG, stream=True, extra_body={"models": models}, **kw
        )
        return "".join([c.choices[0].delta.content or "" async for c in s if c.choices])


# -- a finished answer is never resumed ----------------------------------------------------


@pytest.mark.parametrize("tail", ["cut", "garbled", "silent"])
async def test_a_break_after_the_finish_reason_completes_the_answer(
    senv: Env, sidecars: list[Sidecar], script: Script, tail: str
) -> None:
    sc, token = await start(senv, sidecars)
    usage = b'data: {"id":"x","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\n'
    broken: list[Step] = {"cut": [usage[:40], 0.05, "close"], "garbled": [usage[:40] + b"\n\n"],
                          "silent": [3.0]}[tail]  # fmt: skip
    script.queue.append([ROLE + chunk("The answer is 42."), chunk(None, "stop"), 0.05, *broken])
    script.queue.append([ROLE + chunk(" And more."), chunk(None, "stop"), DONE])
    text = await chat_text(
        sc, token, ["gpt-4o-mini", "gpt-4o"], stream_options={"include_usage": True}
    )
    assert text == "The answer is 42."
    assert len(script.requests) == 1


async def test_an_anthropic_stream_cut_after_its_stop_reason_is_complete(
    senv: Env, sidecars: list[Sidecar], script: Script
) -> None:
    sc, token = await start(senv, sidecars)
    message = {"id": "m", "type": "message", "role": "assistant", "model": "c", "content": [],
               "stop_reason": None, "usage": {"input_tokens": 5, "output_tokens": 1}}  # fmt: skip
    script.queue.append([
        anthropic_event({"type": "message_start", "message": message})
        + anthropic_event({"type": "content_block_start", "index": 0,
                           "content_block": {"type": "text", "text": ""}})
        + anthropic_event({"type": "content_block_delta", "index": 0,
                           "delta": {"type": "text_delta", "text": "The answer is 42."}})
        + anthropic_event({"type": "content_block_stop", "index": 0})
        + anthropic_event({"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                           "usage": {"output_tokens": 3}}),
        0.05, b'event: message_stop\ndata: {"ty', 0.05, "close",
    ])  # fmt: skip
    async with sc.anthropic(token) as client, client.messages.stream(
        model="claude-haiku-4-5", max_tokens=50, messages=MSG,
        extra_body={"models": ["claude-haiku-4-5", "claude-sonnet-4-5"]},
    ) as s:  # fmt: skip
        final = await s.get_final_message()
    assert [(b.type, b.text) for b in final.content] == [("text", "The answer is 42.")]  # type: ignore[union-attr]
    assert len(script.requests) == 1


# -- what an in-band error mid-stream means --------------------------------------------------


async def test_a_content_filter_mid_stream_is_not_sent_to_another_model(
    senv: Env, sidecars: list[Sidecar], script: Script
) -> None:
    sc, token = await start(senv, sidecars)
    script.queue.append([ROLE + chunk("Step one: take the"), 0.05,
                         error("content_filter", "filtered by the content management policy")])  # fmt: skip
    script.queue.append([ROLE + chunk(" forbidden thing"), chunk(None, "stop"), DONE])
    with pytest.raises(openai.APIError) as info:
        await chat_text(sc, token, ["gpt-4o-mini", "gpt-4o"])
    assert "content management policy" in str(info.value)
    assert len(script.requests) == 1


async def test_an_inband_error_never_shows_a_key_fragment(
    senv: Env, sidecars: list[Sidecar], script: Script
) -> None:
    sc, token = await start(senv, sidecars)
    leak = error("invalid_api_key", "Incorrect API key provided: sk-one-SE**********1234.")
    script.queue.append([ROLE + chunk("Hello"), 0.05, leak])
    with pytest.raises(openai.APIError) as info:
        await chat_text(sc, token, ["gpt-4o-mini"])
    assert "Incorrect API key provided" in str(info.value)
    assert "SE**" not in str(info.value)
    assert "1234" not in str(info.value)


async def test_an_inband_prefill_refusal_passes_that_candidate_over(
    senv: Env, sidecars: list[Sidecar], script: Script
) -> None:
    sc, token = await start(senv, sidecars, retries=0)
    refuse = error("invalid_request_error", "assistant prefill is not supported")
    script.queue.append([ROLE + chunk("Hello"), 0.05, "close"])
    script.queue.append([ROLE, refuse])
    script.queue.append([ROLE + chunk(" world"), chunk(None, "stop"), DONE])
    text = await chat_text(sc, token, ["gpt-4o-mini", "gpt-4o", "gpt-4.1"])
    assert text == "Hello world"
    assert [r["model"] for r in script.requests] == ["gpt-4o-mini", "gpt-4o", "gpt-4.1"]


# -- the fast lane validates every event ------------------------------------------------------


@pytest.mark.parametrize("bad", [b"data: [1\n\ndata: 2]\n\ndata: 3,4\n\n",
                                 b'data: {"a":[{"b":1}\n\ndata: {"c":2}]}\n\ndata: {"d":1},{"e":2}\n\n',
                                 b'data: {"error" : {"message": "boom", "type": "server_error"}}\n\n'])  # fmt: skip
async def test_events_that_are_not_one_json_value_each_break_the_stream(
    senv: Env, sidecars: list[Sidecar], script: Script, bad: bytes
) -> None:
    sc, token = await start(senv, sidecars, retries=0)
    script.queue.append([ROLE + chunk("Hello"), 0.05, bad, 0.05, chunk(" world"), DONE])
    script.queue.append([ROLE + chunk(" world"), chunk(None, "stop"), DONE])
    assert await chat_text(sc, token, ["gpt-4o-mini", "gpt-4o"]) == "Hello world"
    assert len(script.requests) == 2  # resumed: the bad events never reached the caller


# -- bounds --------------------------------------------------------------------------------------


def _big_stream_for_a_small_reader(sc: Sidecar, token: str, script: Script) -> socket.socket:
    """A stream of about 24 MB asked for by a caller whose receive buffer is small: the
    sidecar's buffer for it fills once the caller reads nothing."""
    big = chunk("x" * 60000)
    script.queue.append([ROLE + chunk("Hello"), *([big] * 400), chunk(None, "stop"), DONE])
    body = orjson.dumps({"model": "gpt-4o-mini", "messages": MSG, "stream": True})
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", sc.running.proxy_port))
    s.sendall(post_bytes(token, body))
    return s


@pytest.mark.parametrize("first_token", ["1s", "3s"])  # aiohttp's read timer, or the relay's own
async def test_a_caller_that_reads_nothing_is_let_go_after_stream_idle(
    senv: Env, sidecars: list[Sidecar], script: Script, http: Any, first_token: str
) -> None:
    sc, token = await start(senv, sidecars, first_token=first_token, stream_idle="2s")
    s = _big_stream_for_a_small_reader(sc, token, script)
    try:
        for _ in range(100):  # the request must end within a few stream_idle, reading nothing
            await asyncio.sleep(0.1)
            m = await metrics_text(http, sc)
            if metric_value(m, "sidecar_requests_total", status="499") == 1:
                break
        else:
            raise AssertionError("a caller that reads nothing held the stream past stream_idle")
    finally:
        s.close()


async def test_a_caller_that_resets_while_its_stream_waits_for_it_is_a_499_not_a_500(
    senv: Env, sidecars: list[Sidecar], script: Script, http: Any
) -> None:
    """A reset from the caller while the sidecar's write waits for it to read (aiohttp wakes
    that wait with a plain ConnectionError) is a caller that left, not a sidecar failure."""
    sc, token = await start(senv, sidecars, stream_idle="20s")
    s = _big_stream_for_a_small_reader(sc, token, script)
    await asyncio.sleep(1.0)  # the sidecar's buffer for this caller fills: its write waits
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()  # with linger 0: a reset
    for _ in range(50):
        await asyncio.sleep(0.1)
        m = await metrics_text(http, sc)
        if metric_value(m, "sidecar_requests_total") >= 1:
            break
    assert metric_value(m, "sidecar_requests_total", status="499") == 1
    assert metric_value(m, "sidecar_requests_total", status="500") == 0


async def test_a_caller_leaving_during_the_first_token_hold_stops_the_upstream(
    senv: Env, sidecars: list[Sidecar], script: Script
) -> None:
    sc, token = await start(senv, sidecars, first_token="8s", stream_idle="9s")
    script.queue.append([ROLE, 6.0, chunk("late"), chunk(None, "stop"), DONE])
    body = orjson.dumps({"model": "gpt-4o-mini", "messages": MSG, "stream": True})
    _, writer = await asyncio.open_connection("127.0.0.1", sc.running.proxy_port)
    writer.write(post_bytes(token, body))
    await writer.drain()
    await asyncio.sleep(0.5)
    writer.close()
    for _ in range(40):  # the upstream's handler ends (its connection was closed) long before 6 s
        await asyncio.sleep(0.1)
        if script.done:
            break
    assert script.done == 1
    line = await access_line(senv)
    assert line["status"] == 499
    assert line["input_tokens"]  # the prompt was sent: it is paid for


# -- metrics -------------------------------------------------------------------------------


async def test_a_retry_of_the_same_candidate_is_not_a_failover(
    senv: Env, sidecars: list[Sidecar], script: Script, http: Any
) -> None:
    sc, token = await start(senv, sidecars)
    script.queue.append([ROLE, "close"])  # before the first token: retried on the same candidate
    script.queue.append([ROLE + chunk("fine"), chunk(None, "stop"), DONE])
    assert await chat_text(sc, token, ["gpt-4o-mini"]) == "fine"
    m = await metrics_text(http, sc)
    assert metric_value(m, "sidecar_failovers_total") == 0
    assert metric_value(m, "sidecar_upstream_attempts_total", outcome="connect_error") == 1


# -- a second review: more ways a stream can end, and who pays for it -----------------------


def choices_event(choices: list[dict[str, Any]]) -> bytes:
    obj = {"id": "x", "object": "chat.completion.chunk", "model": "m", "choices": choices}
    return b"data: " + orjson.dumps(obj) + b"\n\n"


async def raw_stream(sc: Sidecar, token: str, body: dict[str, Any]) -> bytes:
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            sc.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {token}"}
        ) as r,
    ):
        return await r.read()


@pytest.mark.parametrize("gap", [0.0, 0.05])  # one chunk, or each piece alone
async def test_a_preamble_in_pieces_is_relayed_whole_once_content_comes(
    senv: Env, sidecars: list[Sidecar], script: Script, gap: float
) -> None:
    """What came before the first content (comments, the role) is held, then relayed in
    order with it, every piece of it."""
    sc, token = await start(senv, sidecars)
    pieces = [b": warming up\n\n", ROLE, b": still\n\n", chunk("Hi")]
    tail = [chunk(None, "stop"), DONE]
    script.queue.append([step for piece in pieces for step in (piece, gap)] + tail)
    body = {"model": "gpt-4o-mini", "messages": MSG, "stream": True}
    assert await raw_stream(sc, token, body) == b"".join(pieces + tail)


async def access_line(env: Env) -> dict[str, Any]:
    for _ in range(40):  # the access log is written in batches
        lines = [r for r in env.access.records() if r["path"] == "/v1/chat/completions"]
        if lines:
            return lines[-1]
        await asyncio.sleep(0.1)
    raise AssertionError("no access-log line")


async def test_a_break_while_another_choice_is_unfinished_is_not_completed(
    senv: Env, sidecars: list[Sidecar], script: Script
) -> None:
    sc, token = await start(senv, sidecars)
    script.queue.append([
        choices_event([{"index": 0, "delta": {"role": "assistant", "content": "Short."}, "finish_reason": None},
                       {"index": 1, "delta": {"role": "assistant", "content": "A much longer"},
                        "finish_reason": None}]),
        choices_event([{"index": 0, "delta": {}, "finish_reason": "stop"}]),
        choices_event([{"index": 1, "delta": {"content": " answer that is"}, "finish_reason": None}]),
        0.05, "close",
    ])  # fmt: skip
    out = await raw_stream(
        sc, token, {"model": "gpt-4o-mini", "messages": MSG, "stream": True, "n": 2}
    )
    assert b"[DONE]" not in out
    assert b'"stream_interrupted"' in out  # choice 1 was cut: an error, not a clean end


async def test_a_failed_resume_leaves_the_usage_with_the_candidate_that_produced_it(
    senv: Env, sidecars: list[Sidecar], script: Script
) -> None:
    sc, token = await start(senv, sidecars, retries=0)
    script.queue.append([ROLE + chunk("Hello " * 50), 0.05, "close"])
    script.queue.append(
        [ROLE, error("invalid_request_error", "assistant prefill is not supported")]
    )
    out = await raw_stream(sc, token, {"model": "gpt-4o-mini", "messages": MSG, "stream": True,
                                       "models": ["gpt-4o-mini", "gpt-4o"]})  # fmt: skip
    assert b'"stream_interrupted"' in out
    line = await access_line(senv)
    assert line["model"] == "gpt-4o-mini"
    assert line["output_tokens"] >= 2


async def test_a_body_too_deep_to_write_again_ends_a_broken_stream_with_an_error_event(
    senv: Env, sidecars: list[Sidecar], script: Script
) -> None:
    """Nested about 1,000 deep, the request body is read and forwarded as it came, but a
    continuation (the body with the prefill) cannot be written: the broken stream ends
    with the in-band error, in a well-formed response."""
    sc, token = await start(senv, sidecars, retries=0)
    script.queue.append([ROLE + chunk("Hello"), 0.05, "close"])
    script.queue.append([ROLE + chunk(" world"), chunk(None, "stop"), DONE])
    deep = b"[" * 1000 + b"]" * 1000
    # Nothing for the sidecar to rewrite (no `models`, usage asked for): it goes as it came.
    body = orjson.dumps({"model": "gpt-4o-mini", "messages": MSG, "stream": True,
                         "stream_options": {"include_usage": True}})[:-1] + b',"metadata":' + deep + b"}"  # fmt: skip
    async with aiohttp.ClientSession() as s, s.post(
        sc.url + "/v1/chat/completions", data=body,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    ) as r:  # fmt: skip
        assert r.status == 200
        out = await r.read()  # a malformed chunked body would raise here
    assert out.startswith(ROLE + chunk("Hello"))
    assert b'"stream_interrupted"' in out
    assert b"cannot be continued elsewhere" in out
    assert len(script.requests) == 1  # no continuation was sent
    line = await access_line(senv)
    assert line["status"] == 200


async def test_a_caller_leaving_during_a_held_continuation_pays_for_both_attempts(
    senv: Env, sidecars: list[Sidecar], script: Script
) -> None:
    sc, token = await start(senv, sidecars, retries=0, first_token="8s", stream_idle="9s")
    script.queue.append([ROLE + chunk("Hello " * 50), 0.05, "close"])
    script.queue.append([ROLE, 6.0, chunk("late"), chunk(None, "stop"), DONE])
    body = orjson.dumps({"model": "gpt-4o-mini", "messages": MSG, "stream": True,
                         "models": ["gpt-4o-mini", "gpt-4o"]})  # fmt: skip
    reader, writer = await asyncio.open_connection("127.0.0.1", sc.running.proxy_port)
    writer.write(post_bytes(token, body))
    await writer.drain()
    await reader.readuntil(b"Hello")
    await asyncio.sleep(0.5)  # the continuation is being held for its first content
    writer.close()
    line = await access_line(senv)
    assert (line["model"], line["status"]) == ("gpt-4o-mini", 499)
    # The broken attempt's estimate, plus the held continuation's (its prompt carried the prefill).
    assert line["input_tokens"] > 2 * len(body) // 4


async def test_a_usage_chunk_cut_at_the_end_is_estimated_not_zero(
    senv: Env, sidecars: list[Sidecar], script: Script
) -> None:
    sc, token = await start(senv, sidecars)
    usage = (
        b'data: {"id":"x","choices":[],"usage":{"prompt_tokens":3000,"completion_tokens":2000}}\n\n'
    )
    script.queue.append(
        [ROLE + chunk("The answer is 42. " * 100), chunk(None, "stop"), 0.05, usage[:40]]
    )
    out = await raw_stream(sc, token, {"model": "gpt-4o-mini", "messages": MSG, "stream": True})
    assert out.endswith(b"data: [DONE]\n\n")
    line = await access_line(senv)
    assert line["output_tokens"] > 0
    assert line["input_tokens"] > 0


@pytest.mark.parametrize("first_token", ["1s", "3s"])
async def test_a_caller_that_takes_nothing_is_let_go_even_when_the_upstream_finishes(
    senv: Env, sidecars: list[Sidecar], script: Script, http: Any, first_token: str
) -> None:
    sc, token = await start(senv, sidecars, first_token=first_token, stream_idle="1s")
    script.queue.append(
        [ROLE + chunk("Hello"), *([chunk("x" * 1000)] * 600), chunk(None, "stop"), DONE]
    )
    body = orjson.dumps({"model": "gpt-4o-mini", "messages": MSG, "stream": True})
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", sc.running.proxy_port))
    s.sendall(post_bytes(token, body))
    try:
        for _ in range(80):
            await asyncio.sleep(0.1)
            if metric_value(await metrics_text(http, sc), "sidecar_requests_total") >= 1:
                break
        else:
            raise AssertionError("a caller that took nothing held the request past stream_idle")
    finally:
        s.close()


# -- a Gemini caller's function calls, held back until complete --------------------------------


def tool_delta(arguments: str, name: str | None = None) -> bytes:
    function: dict[str, str] = {"arguments": arguments}
    call: dict[str, Any] = {"index": 0, "function": function}
    if name is not None:
        function["name"] = name
        call.update(id="call_1", type="function")
    choice = {"index": 0, "delta": {"tool_calls": [call]}, "finish_reason": None}
    return b"data: " + orjson.dumps({"id": "x", "object": "chat.completion.chunk", "model": "m",
                                     "choices": [choice]}) + b"\n\n"  # fmt: skip


async def gemini_stream(sc: Sidecar, token: str, models: list[str]) -> tuple[int, bytes]:
    body = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}], "models": models}
    async with aiohttp.ClientSession() as s, s.post(
        sc.url + f"/v1beta/models/{models[0]}:streamGenerateContent?alt=sse", json=body,
        headers={"x-goog-api-key": token},
    ) as r:  # fmt: skip
        return r.status, await r.read()


async def test_a_gemini_callers_function_call_slower_than_first_token_is_an_answer(
    senv: Env, sidecars: list[Sidecar], script: Script
) -> None:
    """Gemini callers get a function call whole, at the end: an upstream that takes longer
    than `first_token` to stream one is answering, not timing out."""
    sc, token = await start(senv, sidecars, first_token="1s", stream_idle="3s", retries=0)
    script.queue.append([ROLE, tool_delta("", "write_file"), 0.6, tool_delta('{"path": '), 0.6,
                         tool_delta('"a.txt"}'), chunk(None, "tool_calls"), DONE])  # fmt: skip
    status, raw = await gemini_stream(sc, token, ["gpt-4o-mini"])
    assert status == 200, raw[:300]
    assert b'"functionCall":{"name":"write_file","args":{"path":"a.txt"}' in raw
    assert len(script.requests) == 1


async def test_a_gemini_callers_function_call_cut_short_still_fails_over(
    senv: Env, sidecars: list[Sidecar], script: Script
) -> None:
    """Nothing of a held function call reached the caller: a break fails over."""
    sc, token = await start(senv, sidecars, first_token="2s", stream_idle="2s", retries=0)
    script.queue.append([ROLE, tool_delta("", "write_file"), 0.1, tool_delta('{"pa'), "close"])
    script.queue.append([ROLE + chunk("Hello"), chunk(None, "stop"), DONE])
    status, raw = await gemini_stream(sc, token, ["gpt-4o-mini", "gpt-4o"])
    assert status == 200
    assert b'"text":"Hello"' in raw
    assert b"error" not in raw
    assert [r["model"] for r in script.requests] == ["gpt-4o-mini", "gpt-4o"]
