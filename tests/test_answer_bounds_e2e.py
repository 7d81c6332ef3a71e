"""A whole answer's way to the caller, found by review of the request path.

- A JSON answer read whole (up to 8 MiB) goes to the caller in one write; a caller that
  takes nothing of it is let go after `timeouts.stream_idle` (one that keeps taking it,
  however slowly, is waited for: tests/test_relay_taking.py).
- An upstream 401/403 in any media type (plain text, HTML, bytes), not only JSON, has the
  provider key's fragments masked before it is relayed.

A real sidecar on loopback, the real mock (its `huge-N` answers) or a scripted upstream,
and a raw socket for a caller that reads nothing.
"""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.harness import Env, Sidecar, make_env, metric_value
from tests.test_proxy_e2e import OPENAI_MODEL, boot, chat, metrics_text, providers_yaml, send

CHAT = "/v1/chat/completions"


def _request(token: str, doc: dict[str, Any]) -> bytes:
    body = orjson.dumps(doc)
    head = (f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")  # fmt: skip
    return head.encode() + body


async def _caller(port: int, rcvbuf: int) -> socket.socket:
    """A connected caller socket whose receive buffer is small, so the sidecar's fills."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.setblocking(False)
    await asyncio.get_running_loop().sock_connect(s, ("127.0.0.1", port))
    return s


async def _boot_huge(env: Env, sidecars: list[Sidecar]) -> Sidecar:
    return await boot(env, sidecars, "timeouts: {stream_idle: 1s}\n"
                      + providers_yaml(env, openai=[("k1", "sk-openai-1")]))  # fmt: skip


async def test_a_caller_that_takes_nothing_of_a_whole_answer_is_let_go_after_stream_idle(
    env: Env, sidecars: list[Sidecar], http: aiohttp.ClientSession, token: str
) -> None:
    sc = await _boot_huge(env, sidecars)
    loop = asyncio.get_running_loop()
    s = await _caller(sc.running.proxy_port, 4096)
    try:
        await loop.sock_sendall(s, _request(token, chat(f"{OPENAI_MODEL}-huge-6")))
        for _ in range(100):  # within a few stream_idle, the caller reading nothing
            await asyncio.sleep(0.1)
            m = await metrics_text(http, sc)
            if metric_value(m, "sidecar_requests_total", status="499") == 1:
                break
        else:
            raise AssertionError("a caller that took nothing of a whole answer held it")
    finally:
        s.close()
    m = await metrics_text(http, sc)
    assert metric_value(m, "sidecar_requests_total", status="200") == 0


# --------------------------------------------------------------------------- auth errors in any media


@pytest.fixture
async def refusing(aiohttp_server: Callable[..., Any]) -> dict[str, Any]:
    """An upstream that answers every request with `spec`'s status and media type, its body
    quoting the key it was sent, as OpenAI's 401 does."""
    spec: dict[str, Any] = {}

    async def refuse(request: web.Request) -> web.Response:
        key = request.headers.get("authorization", "").removeprefix("Bearer ")
        pad = " " * spec.get("pad", 0)  # where in the body the key comes
        body = f"Incorrect API key provided:{pad} {key}. Find your key in the dashboard.\n"
        return web.Response(status=spec["status"], body=body.encode(),
                            headers={"content-type": spec["ctype"]})  # fmt: skip

    app = web.Application()
    app.router.add_post("/v1/{tail:.*}", refuse)
    server: TestServer = await aiohttp_server(app)
    spec["url"] = str(server.make_url("/v1"))
    return spec


KEY = "sk-proj-plainrefusal-SECRETVALUE1234"


@pytest.mark.parametrize(
    ("status", "ctype", "stream"),
    [(401, "text/plain", False), (403, "text/html; charset=utf-8", False),
     (401, "application/octet-stream", False), (401, "text/plain", True)],
)  # fmt: skip
async def test_an_auth_error_that_is_not_json_is_relayed_masked(
    tmp_path: Any,
    sidecars: list[Sidecar],
    http: aiohttp.ClientSession,
    refusing: dict[str, Any],
    status: int,
    ctype: str,
    stream: bool,
) -> None:
    """With 401/403 left out of `failover.on_status`, the upstream's refusal goes to the
    caller as it came, whatever its media type, but never with the key in it."""
    refusing.update(status=status, ctype=ctype)
    env = make_env(tmp_path, refusing["url"])
    token = env.access_key("app")
    sc = await boot(env, sidecars, "failover: {on_status: [429, 503]}\n"
                    + providers_yaml(env, openai=[("k1", KEY)]))  # fmt: skip
    doc = chat(stream=True) if stream else chat()
    got, headers, body = await send(http, sc.url + CHAT, token=token, json=doc)
    assert got == status
    assert headers["content-type"] == ctype  # relayed as it came
    text = body.decode()  # never printed: it may hold what must not be there
    assert text.startswith("Incorrect API key provided: ")  # the upstream's own wording
    leaked = "SECRETVALUE" in text or re.search(r"\bsk-", text) is not None
    assert not leaked, "a key fragment is relayed"
    assert text.endswith(". Find your key in the dashboard.\n")


# --------------------------------------------------------------------------- a body relayed as it arrives


@pytest.fixture
async def plain(aiohttp_server: Callable[..., Any]) -> str:
    """An upstream whose chat answer is 64 MiB of text/plain, sent as the reader takes it:
    neither JSON nor SSE, so the sidecar relays it as it arrives."""

    async def answer(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"content-type": "text/plain"})
        await resp.prepare(request)
        piece = b"x" * (1 << 20)
        try:
            for _ in range(64):
                await resp.write(piece)
            await resp.write_eof()
        except ConnectionError:
            pass
        return resp

    app = web.Application()
    app.router.add_post("/v1/{tail:.*}", answer)
    server: TestServer = await aiohttp_server(app)
    return str(server.make_url("/v1"))


async def test_a_caller_that_stops_taking_a_relayed_body_is_a_caller_gone_not_a_break(
    tmp_path: Any, sidecars: list[Sidecar], http: aiohttp.ClientSession, plain: str
) -> None:
    """Not the upstream's fault: no `idle_timeout` interruption is counted against it, and
    the access log and metrics say 499."""
    env = make_env(tmp_path, plain)
    token = env.access_key("app")
    sc = await boot(env, sidecars, "timeouts: {stream_idle: 1s}\n"
                    + providers_yaml(env, openai=[("k1", "sk-openai-1")]))  # fmt: skip
    loop = asyncio.get_running_loop()
    s = await _caller(sc.running.proxy_port, 4096)
    try:
        await loop.sock_sendall(s, _request(token, chat()))
        for _ in range(100):
            await asyncio.sleep(0.1)
            m = await metrics_text(http, sc)
            if metric_value(m, "sidecar_requests_total") >= 1:
                break
        else:
            raise AssertionError("a caller that took nothing held the relayed body")
    finally:
        s.close()
    assert metric_value(m, "sidecar_requests_total", status="499") == 1
    assert metric_value(m, "sidecar_stream_interruptions_total") == 0


async def test_a_translated_auth_error_is_masked_before_it_is_cut_short(
    tmp_path: Any, sidecars: list[Sidecar], http: aiohttp.ClientSession, refusing: dict[str, Any]
) -> None:
    """Translation keeps only the start of an error that is not JSON (about 500 bytes). A key
    without a known prefix that straddles that cut must not come out in part."""
    key = "Zq81mNw0Lr5Tx2YpK7vB3cD9eF4gH6jQ"  # no `sk-`-like prefix: masked as the key itself
    refusing.update(status=401, ctype="text/plain", pad=470)
    env = make_env(tmp_path, refusing["url"])
    token = env.access_key("app")
    sc = await boot(env, sidecars, "failover: {on_status: [429, 503]}\n"
                    + providers_yaml(env, openai=[("k1", key)]))  # fmt: skip
    doc = {"model": "gpt-4o-mini", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
    got, headers, body = await send(http, sc.url + "/v1/messages", token=token, json=doc,
                                    anthropic=True)  # fmt: skip
    assert got == 401
    assert headers.get("x-sidecar-translated") == "anthropic->openai"
    text = body.decode()  # never printed: it may hold what must not be there
    assert "Incorrect API key provided" in text
    pieces = [key[i : i + 6] for i in range(len(key) - 5)]
    leaked = any(piece in text for piece in pieces)
    assert not leaked, "a piece of the key is relayed"
