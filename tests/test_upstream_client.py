"""The request path's upstream client (sidecar/proxy/client.py) against real servers on
127.0.0.1: keep-alive per origin, what is reused and what is closed, the request it writes,
and its failures as aiohttp's own errors."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from sidecar.proxy import client as client_module
from sidecar.proxy.client import UpstreamClient, UpstreamResponse

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Upstream:
    """An aiohttp server that records each request with the connection it came on."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, str, str, CIMultiDict[str], bytes]] = []
        self.connections: list[int] = []
        self.url = URL()

    def record(self, request: web.Request, body: bytes) -> None:
        conn = id(request.protocol)
        if conn not in self.connections:
            self.connections.append(conn)
        self.seen.append((conn, request.method, request.path_qs, CIMultiDict(request.headers), body))


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    up = Upstream()

    async def echo(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        up.record(request, body)
        action = request.match_info["action"]
        if action == "close":
            return web.Response(text="bye", headers={"Connection": "close"})
        if action == "empty":
            return web.Response(status=204)
        if action == "gzip":
            return web.Response(body=gzip.compress(b"x" * 5000),
                                headers={"Content-Encoding": "gzip"})  # fmt: skip
        if action == "chunked":
            resp = web.StreamResponse()
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            for part in (b"one ", b"two ", b"three"):
                await resp.write(part)
            await resp.write_eof()
            return resp
        if action == "big":
            return web.Response(body=b"y" * (1 << 20))
        return web.Response(body=b"ok:" + body)

    app = web.Application()
    app.router.add_route("*", "/{action}", echo)
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=30)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    up.url = URL(f"http://127.0.0.1:{runner.addresses[0][1]}")
    yield up
    await runner.cleanup()


@pytest.fixture
async def client() -> AsyncIterator[UpstreamClient]:
    c = UpstreamClient(keepalive=30)
    yield c
    await c.close()


async def _read(resp: UpstreamResponse) -> bytes:
    out = bytearray()
    while chunk := await resp.content.readany():
        out += chunk
    return bytes(out)


async def test_a_connection_is_reused_once_its_answer_was_read(
    upstream: Upstream, client: UpstreamClient
) -> None:
    for i in range(3):
        resp = await client.request("POST", upstream.url / "echo", CIMultiDict(), b"n%d" % i)
        assert resp.status == 200
        assert await _read(resp) == b"ok:n%d" % i
    assert len(upstream.connections) == 1
    assert client.idle_connections() == 1


async def test_the_request_carries_host_length_and_the_given_headers(
    upstream: Upstream, client: UpstreamClient
) -> None:
    headers = CIMultiDict({"Authorization": "Bearer sk-x", "X-Two": "a"})
    headers.add("X-Two", "b")
    resp = await client.request("POST", URL(f"{upstream.url}/echo?q=1"), headers, b"{}")
    await _read(resp)
    _, method, path, seen, body = upstream.seen[0]
    assert (method, path, body) == ("POST", "/echo?q=1", b"{}")
    assert seen["Host"] == f"127.0.0.1:{upstream.url.port}"
    assert seen["Content-Length"] == "2"
    assert seen["Authorization"] == "Bearer sk-x"
    assert seen.getall("X-Two") == ["a", "b"]
    assert "gzip" in seen["Accept-Encoding"]  # the answer is decompressed here, so it may be
    assert seen["User-Agent"].startswith("Python/")


async def test_a_configured_host_header_replaces_the_url_s(
    upstream: Upstream, client: UpstreamClient
) -> None:
    resp = await client.request("GET", upstream.url / "echo", CIMultiDict({"Host": "api.example"}), b"")
    await _read(resp)
    seen = upstream.seen[0][3]
    assert seen.getall("Host") == ["api.example"]
    assert "Content-Length" not in seen  # a GET without a body says nothing of one


def test_the_head_has_the_given_headers_in_order_and_a_default_only_where_none_was_given() -> None:
    headers = CIMultiDict([("user-agent", "me/1"), ("ACCEPT-ENCODING", "br"), ("X-Two", "a"),
                           ("X-Two", "b"), ("X-Uni", "h\u00e9")])  # fmt: skip
    head = client_module._request_head("POST", URL("http://h.example:81/p?q=1"), headers, b"abc")
    assert head == (
        b"POST /p?q=1 HTTP/1.1\r\nHost: h.example:81\r\nuser-agent: me/1\r\nACCEPT-ENCODING: br\r\n"
        b"X-Two: a\r\nX-Two: b\r\nX-Uni: h\xc3\xa9\r\nAccept: */*\r\nContent-Length: 3\r\n\r\n"
    )


@pytest.mark.parametrize(("name", "value"), [("X-Evil", "a\r\nX-Injected: 1"), ("X-Evil", "a\nb"),
                                        ("X-Evil\r\nX-Injected", "1"), ("X-Evil", "a\rb")])  # fmt: skip
async def test_a_line_break_in_a_header_is_refused_before_anything_is_sent(
    upstream: Upstream, client: UpstreamClient, name: str, value: str
) -> None:
    with pytest.raises(ValueError, match="line break"):
        await client.request("POST", upstream.url / "echo", CIMultiDict({name: value}), b"{}")
    await asyncio.sleep(0.05)
    assert upstream.seen == []
    assert upstream.connections == []


async def test_an_answer_released_unread_closes_its_connection(
    upstream: Upstream, client: UpstreamClient
) -> None:
    resp = await client.request("GET", upstream.url / "big", CIMultiDict(), b"")
    assert (await resp.content.read(10)) == b"y" * 10
    resp.release()
    assert client.idle_connections() == 0
    resp = await client.request("GET", upstream.url / "echo", CIMultiDict(), b"")
    await _read(resp)
    assert len(upstream.connections) == 2


async def test_connection_close_from_the_upstream_is_honoured(
    upstream: Upstream, client: UpstreamClient
) -> None:
    resp = await client.request("GET", upstream.url / "close", CIMultiDict(), b"")
    assert await _read(resp) == b"bye"
    assert client.idle_connections() == 0
    resp = await client.request("GET", upstream.url / "echo", CIMultiDict(), b"")
    await _read(resp)
    assert len(upstream.connections) == 2


async def test_bodyless_chunked_and_compressed_answers(
    upstream: Upstream, client: UpstreamClient
) -> None:
    resp = await client.request("DELETE", upstream.url / "empty", CIMultiDict(), b"")
    assert resp.status == 204
    assert await _read(resp) == b""
    resp = await client.request("GET", upstream.url / "chunked", CIMultiDict(), b"")
    assert await _read(resp) == b"one two three"
    resp = await client.request("GET", upstream.url / "gzip", CIMultiDict(), b"")
    assert await _read(resp) == b"x" * 5000
    resp = await client.request("HEAD", upstream.url / "echo", CIMultiDict(), b"")
    assert resp.status == 200
    assert await _read(resp) == b""
    assert len(upstream.connections) == 1  # every one of them left the connection reusable


async def test_a_connection_the_upstream_closed_while_idle_is_not_used(
    client: UpstreamClient,
) -> None:
    connections: list[int] = []

    async def hello(request: web.Request) -> web.Response:
        connections.append(id(request.transport))
        return web.Response(text="hi")

    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=0.05)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = URL(f"http://127.0.0.1:{runner.addresses[0][1]}/")
    try:
        for _ in range(2):
            resp = await client.request("GET", url, CIMultiDict(), b"")
            assert await _read(resp) == b"hi"
            await asyncio.sleep(0.3)  # the upstream closes the kept-alive connection
        assert len(set(connections)) == 2
    finally:
        await runner.cleanup()


async def test_connections_are_kept_per_origin_never_shared(client: UpstreamClient) -> None:
    hosts: list[str] = []

    async def who(request: web.Request) -> web.Response:
        hosts.append(request.host)
        return web.Response(text=request.host)

    runners = []
    urls = []
    for _ in range(2):
        app = web.Application()
        app.router.add_get("/", who)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        urls.append(URL(f"http://127.0.0.1:{runner.addresses[0][1]}/"))
    try:
        for url in [*urls, *urls, *urls]:
            resp = await client.request("GET", url, CIMultiDict(), b"")
            assert await _read(resp) == f"127.0.0.1:{url.port}".encode()
        assert client.idle_connections() == 2
    finally:
        for runner in runners:
            await runner.cleanup()


async def test_idle_connections_are_capped_and_expire(
    upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_module, "IDLE_PER_ORIGIN", 2)
    c = UpstreamClient(keepalive=0.1)
    try:
        async def one() -> None:
            resp = await c.request("GET", upstream.url / "echo", CIMultiDict(), b"")
            await _read(resp)

        await asyncio.gather(*(one() for _ in range(6)))
        assert c.idle_connections() == 2
        await asyncio.sleep(0.35)
        assert c.idle_connections() == 0
    finally:
        await c.close()


async def test_failures_are_aiohttp_client_errors(client: UpstreamClient) -> None:
    with pytest.raises(aiohttp.ClientOSError):  # nothing listens there
        await client.request("GET", URL("http://127.0.0.1:9/"), CIMultiDict(), b"")

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"this is not HTTP\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(garbage, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(aiohttp.ClientError):
            await client.request("GET", URL(f"http://127.0.0.1:{port}/"), CIMultiDict(), b"")
        assert client.idle_connections() == 0
    finally:
        server.close()
        await server.wait_closed()


async def test_a_body_cut_short_is_a_payload_error(client: UpstreamClient) -> None:
    async def short(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(short, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        resp = await client.request("GET", URL(f"http://127.0.0.1:{port}/"), CIMultiDict(), b"")
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await _read(resp)
        resp.release()
        assert client.idle_connections() == 0
    finally:
        server.close()
        await server.wait_closed()


async def test_a_cancelled_request_never_leaves_its_connection_for_the_next(
    client: UpstreamClient,
) -> None:
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="late")

    async def fast(request: web.Request) -> web.Response:
        return web.Response(text="fast")

    app = web.Application()
    app.router.add_get("/slow", slow)
    app.router.add_get("/fast", fast)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    base = URL(f"http://127.0.0.1:{runner.addresses[0][1]}")
    try:
        task = asyncio.ensure_future(client.request("GET", base / "slow", CIMultiDict(), b""))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()
        resp = await client.request("GET", base / "fast", CIMultiDict(), b"")
        assert await _read(resp) == b"fast"  # not the late answer meant for the cancelled one
    finally:
        await runner.cleanup()


async def test_tls_upstream_with_a_trusted_ca(tmp_path: Path) -> None:
    ssl_mod = pytest.importorskip("ssl")
    certs = pytest.importorskip("sidecar.inject.certs")
    pytest.importorskip("cryptography")
    made = certs.make_certs(tmp_path / "certs", "upstream", "test")
    server_ctx = ssl_mod.create_default_context(ssl_mod.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(made.cert, made.key)

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="secure")

    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ctx).start()
    port = runner.addresses[0][1]
    name = made.dns_names[0]
    trusting = UpstreamClient(ssl_context=ssl_mod.create_default_context(cafile=str(made.ca)))
    untrusting = UpstreamClient()
    loop = asyncio.get_running_loop()
    real = loop.getaddrinfo

    async def to_localhost(host, port, **kwargs):  # type: ignore[no-untyped-def]
        # the certificate names the Service: connect to 127.0.0.1, check the name
        return await real("127.0.0.1", port, **kwargs)

    try:
        loop.getaddrinfo = to_localhost  # type: ignore[method-assign]
        resp = await trusting.request("GET", URL(f"https://{name}:{port}/"), CIMultiDict(), b"")
        assert await _read(resp) == b"secure"
        with pytest.raises(aiohttp.ClientOSError):
            await untrusting.request("GET", URL(f"https://{name}:{port}/"), CIMultiDict(), b"")
    finally:
        loop.getaddrinfo = real  # type: ignore[method-assign]
        await trusting.close()
        await untrusting.close()
        await runner.cleanup()


async def _raw_upstream(answer: Callable[[int], bytes]) -> tuple[asyncio.Server, URL, list[int]]:
    """A socket server answering the n-th request of each connection with `answer(n)`,
    recording the connection number of each request."""
    seen: list[int] = []
    count = [0]

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        count[0] += 1
        conn = count[0]
        n = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
                seen.append(conn)
                n += 1
                out = answer(n)
                writer.write(out)
                await writer.drain()
                if out.endswith(b"CLOSE"):
                    writer.close()
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, URL(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/"), seen


async def test_a_body_delimited_by_the_connection_closing_is_read_to_the_end(
    client: UpstreamClient,
) -> None:
    # No Content-Length, not chunked: HTTP says the body runs until the connection closes.
    server, url, _ = await _raw_upstream(
        lambda n: b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\ndata: hello\n\nCLOSE"
    )
    try:
        resp = await client.request("GET", url, CIMultiDict(), b"")
        assert await _read(resp) == b"data: hello\n\nCLOSE"
        assert client.idle_connections() == 0  # such a connection is never reused
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize(("method", "retried"), [("GET", True), ("POST", False)])
async def test_a_stale_kept_alive_connection_is_retried_for_a_get_but_never_for_a_post(
    method: str, retried: bool
) -> None:
    # The first answer keeps the connection, then the upstream drops it without a word as
    # the next request arrives: a GET is sent again on a new connection, a POST is not.
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    connections: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        first = len(connections) == 1  # the first connection: answer once, drop the next
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).lower()
            if b"content-length: " in head:
                await reader.readexactly(int(head.split(b"content-length: ")[1].split(b"\r\n")[0]))
            writer.write(ok)
            await writer.drain()
            if first:
                await reader.readuntil(b"\r\n\r\n")  # the next request: dropped unanswered
                writer.transport.abort()
                return
            await reader.read()  # until the client closes
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    url = URL(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/")
    body = b"x" if method == "POST" else b""
    client = UpstreamClient()
    try:
        resp = await client.request(method, url, CIMultiDict(), body)
        assert await _read(resp) == b"ok"
        if retried:
            resp = await client.request(method, url, CIMultiDict(), body)
            assert await _read(resp) == b"ok"
            assert len(connections) == 2
        else:
            with pytest.raises(aiohttp.ClientError):
                await client.request(method, url, CIMultiDict(), body)
            assert len(connections) == 1
    finally:
        await client.close()
        server.close()
        await server.wait_closed()


async def test_a_switch_of_protocols_nobody_asked_for_is_a_broken_answer(
    client: UpstreamClient,
) -> None:
    # The client never asks for an upgrade: a 101 is not an answer to relay to the caller
    # (its status line would reach them as a relayed answer), and the connection is not kept.
    server, url, _ = await _raw_upstream(
        lambda n: b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\n\r\nCLOSE"
    )
    try:
        with pytest.raises(aiohttp.ClientPayloadError):
            await client.request("POST", url, CIMultiDict(), b"{}")
        assert client.idle_connections() == 0
    finally:
        server.close()
        await server.wait_closed()
