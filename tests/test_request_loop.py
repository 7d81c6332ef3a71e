"""sidecar.request_loop: a connection's requests are handled in the connection's own task, and
the loop doing so is aiohttp's own, copied from the pinned aiohttp."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator

import orjson
import pytest
from aiohttp import web

from sidecar import request_loop
from sidecar.connections import ConnectionLimits, GuardedRunner
from sidecar.logs import OpLog
from tests.harness import Env, Sidecar, _read_response

WAIT = 10.0


def test_the_installed_aiohttp_loop_is_the_one_copied() -> None:
    # Fails when aiohttp's RequestHandler.start changes (an upgrade): take the copy again from
    # the new version, then update COPIED_FROM.
    assert request_loop._source_digest() == request_loop.COPIED_FROM
    assert request_loop.inline


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes, body: bytes = b""
) -> tuple[int, bytes]:
    """One request on a kept-alive connection, its answer read whole."""
    writer.write(head + b"content-length: %d\r\n\r\n" % len(body) + body)
    response = await asyncio.wait_for(_read_response(reader), WAIT)
    if response.headers.get("transfer-encoding") == "chunked":  # the blank line after the last chunk
        assert await asyncio.wait_for(reader.readuntil(b"\r\n"), WAIT) == b"\r\n"
    return response.status, response.body


@pytest.fixture
async def tasks_server() -> AsyncIterator[tuple[int, list[asyncio.Task[object] | None]]]:
    """A GuardedRunner app whose handler records the task it runs in."""
    seen: list[asyncio.Task[object] | None] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(asyncio.current_task())
        return web.Response(text="ok")

    app = web.Application()
    route = app.router.add_post("/v1/chat/completions", handler)
    app.router.add_get("/other", handler)
    limits = ConnectionLimits(client_header=5.0, client_body=5.0, keepalive=5.0, max_connections=10)
    runner = GuardedRunner(app, lambda: limits, OpLog("error", io.StringIO()), direct=[route],
                           access_log=None)  # fmt: skip
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield runner.addresses[0][1], seen
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("inline", [True, False])
async def test_requests_on_one_connection_run_in_its_task(
    tasks_server: tuple[int, list[asyncio.Task[object] | None]],
    inline: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(request_loop, "inline", inline)  # False: aiohttp's own loop
    port, seen = tasks_server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for head in (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n",
                     b"GET /other HTTP/1.1\r\nhost: x\r\n",
                     b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"):  # fmt: skip
            assert await _exchange(reader, writer, head) == (200, b"ok")
    finally:
        writer.close()
    assert len(seen) == 3
    assert None not in seen
    if inline:
        assert len(set(map(id, seen))) == 1  # the connection's task, each time
    else:
        assert len(set(map(id, seen))) == 3  # a new task per request (aiohttp's loop)


async def _boot(env: Env, sidecars: list[Sidecar], timeouts: str, app: str) -> tuple[Sidecar, str]:
    ref = env.secret("openai", "k1", "sk-upstream-1")
    token = env.access_key(app)
    env.write_config(
        f"timeouts: {timeouts}\nproviders:\n  - id: openai\n    base_url: UPSTREAM\n"
        f'    api_keys: [{{id: k1, value: "{ref}"}}]\n'
    )
    sc = await env.start()
    sidecars.append(sc)
    return sc, token


def _chat(token: str, model: str, stream: bool = False) -> tuple[bytes, bytes]:
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"authorization: Bearer " + token.encode() + b"\r\n")  # fmt: skip
    body = orjson.dumps({"model": model, "stream": stream,
                         "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
    return head, body


@pytest.mark.parametrize("inline", [True, False])
async def test_a_connection_answers_on_after_deadlines_cut_its_requests(
    env: Env, sidecars: list[Sidecar], inline: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(request_loop, "inline", inline)
    # Each deadline cancels the task the request runs in: now the connection's own. The next
    # request on the same connection must not inherit that cancellation.
    sc, token = await _boot(env, sidecars, "{per_request: 300ms, total: 5s, stream_idle: 300ms}", "a")
    reader, writer = await asyncio.open_connection("127.0.0.1", sc.running.proxy_port)
    try:
        for _ in range(2):  # (a cancellation left counted on the task would show the second time)
            status, body = await _exchange(reader, writer, *_chat(token, "gpt-4o-mini-slow-2000"))
            assert status == 502, body  # the one attempt timed out (per_request)
        status, body = await _exchange(reader, writer, *_chat(token, "gpt-4o-mini"))
        assert (status, bool(orjson.loads(body)["choices"])) == (200, True), body
        status, body = await _exchange(reader, writer, *_chat(token, "gpt-4o-mini", stream=True))
        assert (status, body.endswith(b"data: [DONE]\n\n")) == (200, True), body
        # A stream cut for going idle: the relay's own deadline, the chunked body ended.
        status, body = await _exchange(reader, writer, *_chat(token, "gpt-4o-mini-stall-1500", True))
        assert (status, body[:6], b"[DONE]" in body) == (200, b"data: ", False), body
        status, body = await _exchange(reader, writer, *_chat(token, "gpt-4o-mini"))
        assert (status, bool(orjson.loads(body)["choices"])) == (200, True), body
    finally:
        writer.close()
    sc2, token2 = await _boot(env, sidecars, "{per_request: 5s, total: 400ms}", "b")
    reader, writer = await asyncio.open_connection("127.0.0.1", sc2.running.proxy_port)
    try:
        for _ in range(2):
            status, body = await _exchange(reader, writer, *_chat(token2, "gpt-4o-mini-slow-2000"))
            assert status == 504, body  # the request's whole budget (total) ran out
        status, body = await _exchange(reader, writer, *_chat(token2, "gpt-4o-mini"))
        assert (status, bool(orjson.loads(body)["choices"])) == (200, True), body
    finally:
        writer.close()
