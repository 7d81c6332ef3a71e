"""Direct dispatch (sidecar/dispatch.py) on a real aiohttp server, with raw HTTP: the static
POST routes reach their handler with the match info and app aiohttp's router would give,
and everything else (other methods, a query, a percent-escape, `Expect: 100-continue`,
other paths) is the router's, answered exactly as before."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from sidecar.dispatch import direct
from sidecar.server import DIRECT_ROUTES
from tests.harness import Env

SEEN: list[str] = []
ROUTED: list[str] = []  # paths aiohttp's router resolved
MARK: web.AppKey[str] = web.AppKey("mark", str)


async def _chat(request: web.Request) -> web.Response:
    # What handlers may read: the route that matched and the app, as the router sets them.
    assert request.match_info.route.resource is not None
    SEEN.append(request.match_info.route.resource.canonical)
    body = await request.read()
    return web.Response(text=f"chat {request.app[MARK]} {len(body)}")


async def _other(request: web.Request) -> web.Response:
    return web.Response(text=f"other {request.match_info['tail']}")


@pytest.fixture
async def port() -> AsyncIterator[int]:
    SEEN.clear()
    ROUTED.clear()
    app = web.Application()
    app[MARK] = "app-1"
    routes = [app.router.add_post("/v1/chat/completions", _chat)]
    app.router.add_route("*", "/{tail:.*}", _other)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    server = runner.server
    assert server is not None
    server.request_handler = direct(app, routes, server.request_handler)
    resolve = app.router.resolve

    async def counted(request: web.Request) -> Any:
        ROUTED.append(request.path)
        return await resolve(request)

    app.router.resolve = counted  # type: ignore[method-assign]
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield runner.addresses[0][1]
    await runner.cleanup()


async def _send(port: int, raw: bytes, until: bytes = b"\r\n\r\n") -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    head = await asyncio.wait_for(reader.readuntil(until), 5)
    rest = b""
    if b"Content-Length: " in head:
        length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        rest = await asyncio.wait_for(reader.readexactly(length), 5)
    writer.close()
    return head + rest


def _post(path: str, extra: str = "") -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n{extra}\r\n{{}}".encode()


async def test_a_direct_route_gets_its_match_info_and_app(port: int) -> None:
    out = await _send(port, _post("/v1/chat/completions"))
    assert out.startswith(b"HTTP/1.1 200 OK")
    assert out.endswith(b"chat app-1 2")
    assert SEEN == ["/v1/chat/completions"]
    assert ROUTED == []  # no router walk


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"GET /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n", b"other v1/chat/completions"),
        (_post("/v1/chat/completions?x=1"), b"chat app-1 2"),
        (_post("/v1/chat%2Fcompletions"), b"other v1/chat/completions"),
        (_post("/v1/chat/completions/"), b"other v1/chat/completions/"),
        (_post("/v2/chat/completions"), b"other v2/chat/completions"),
    ],
)
async def test_everything_else_is_the_routers(port: int, raw: bytes, expected: bytes) -> None:
    out = await _send(port, raw)
    assert out.endswith(expected)
    assert len(ROUTED) == 1


async def test_expect_100_continue_is_still_answered_first(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                 b"Expect: 100-continue\r\n\r\n")  # fmt: skip
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim.startswith(b"HTTP/1.1 100 Continue")
    writer.write(b"{}")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200 OK")
    writer.close()


def test_an_app_with_middlewares_is_refused() -> None:
    @web.middleware
    async def mw(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        return await handler(request)

    app = web.Application(middlewares=[mw])
    route = app.router.add_post("/x", _chat)
    with pytest.raises(ValueError, match="middlewares"):
        direct(app, [route], _chat)  # type: ignore[arg-type]


def test_only_static_post_routes_can_be_direct() -> None:
    app = web.Application()
    with pytest.raises(ValueError, match="POST"):
        direct(app, [app.router.add_get("/x", _chat)], _chat)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="static path"):
        direct(app, [app.router.add_post("/y/{id}", _chat)], _chat)  # type: ignore[arg-type]
    other = web.Application()
    twice = [app.router.add_post("/z", _chat), other.router.add_post("/z", _other)]
    with pytest.raises(ValueError, match="two direct routes"):
        direct(app, twice, _chat)  # type: ignore[arg-type]


async def test_the_sidecar_serves_its_static_post_routes_directly(env: Env, token: str) -> None:
    # The production wiring: build_proxy_app lists the routes, start() hands them to the
    # runner, and a chat completion reaches its handler without the router.
    env.write_config("providers:\n  - id: openai\n    base_url: UPSTREAM\n"
                     f"    api_keys: [{{id: k, value: \"{env.secret('openai', 'k', 'sk-k')}\"}}]\n")  # fmt: skip
    sidecar = await env.start()
    try:
        app = sidecar.running.proxy_runner.app
        direct_paths = {r.resource.canonical for r in app[DIRECT_ROUTES] if r.resource is not None}
        assert {"/v1/chat/completions", "/v1/messages", "/v1/responses"} <= direct_paths
        walked: list[str] = []
        resolve = app.router.resolve

        async def counted(request: web.Request) -> Any:
            walked.append(request.path)
            return await resolve(request)

        app.router.resolve = counted  # type: ignore[method-assign]
        async with sidecar.openai(token) as client:
            chat = await client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
            )
            assert chat.choices[0].message.content
            assert walked == []
            models = await client.models.list()  # a GET: the router's
            assert models.data
            assert walked == ["/v1/models"]
    finally:
        await sidecar.stop()
