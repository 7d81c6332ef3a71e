"""The response head the sidecar serialises itself (sidecar/proxy/answer.py), read off a real
aiohttp server's socket with raw HTTP: what is relayed and dropped, the framing, Date and
Server, keep-alive on HTTP/1.1 and 1.0, HEAD, a header that would split the head, and the
chunked stream whose head goes out with its first chunk."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from sidecar.proxy import answer

UPSTREAM = [
    ("Content-Type", "application/json"),
    ("X-Request-Id", "up-1"),
    ("Link", "<a>; rel=next"),
    ("Link", "<b>; rel=prev"),
    ("Transfer-Encoding", "chunked"),
    ("Connection", "keep-alive"),
    ("Content-Length", "999"),
    ("Content-Encoding", "gzip"),
    ("Set-Cookie", "session=upstream"),
    ("X-Sidecar-Provider", "forged"),
    ("Date", "Mon, 01 Jan 2024 00:00:00 GMT"),
]
OWN = {"x-sidecar-request-id": "r-1", "x-sidecar-provider": "openai"}
BODY = b'{"answer": 42}'
#: Opened by a test once it has read a stream's head that `send_head` sent alone.
GATE: dict[str, asyncio.Event] = {}


async def _handle(request: web.Request) -> web.StreamResponse:
    action = request.match_info["action"]
    if action == "json":
        return answer.answer(request, 200, UPSTREAM, OWN, BODY)
    if action == "translated":
        return answer.answer(request, 200, [("Content-Type", "text/plain")], OWN, BODY,
                             "application/json")  # fmt: skip
    if action == "named":  # headers the upstream's Connection names are hop-by-hop too
        named = [("Connection", "keep-alive, X-Hop, x-other"), ("X-Hop", "1"), ("X-Kept", "2"),
                 ("X-Other", "3"), ("Content-Type", "application/json")]  # fmt: skip
        return answer.answer(request, 200, named, OWN, BODY)
    if action == "bare":
        return answer.answer(request, 404, [], {}, b"nope")
    if action == "split":
        return answer.answer(request, 200, [("X-Bad", "a\r\nX-Injected: 1")], {}, BODY)
    if action == "closed":  # force_close() before the answer is prepared is kept
        resp = answer.answer(request, 200, UPSTREAM, OWN, BODY)
        resp.force_close()
        return resp
    typed = [] if action == "untyped" else [("Content-Type", "text/event-stream")]
    resp = answer.stream(request, 200, typed, OWN)
    await resp.prepare(request)
    if action == "head-first":
        assert isinstance(resp, answer.Stream)
        resp.send_head()
        await asyncio.wait_for(GATE["open"].wait(), 5)
    if action != "empty":
        for part in (b"data: 1\n\n", b"data: 2\n\n"):
            await resp.write(part)
    await resp.write_eof()
    return resp


@pytest.fixture
async def port() -> AsyncIterator[int]:
    GATE["open"] = asyncio.Event()
    app = web.Application()
    app.router.add_route("*", "/{action}", _handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield runner.addresses[0][1]
    await runner.cleanup()


async def _exchange(port: int, raw: bytes, *, wait_close: bool = False) -> bytes:
    """Send `raw`; the bytes that came back (until the peer closes, or quiet for 0.3 s)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    out = b""
    try:
        while True:
            piece = await asyncio.wait_for(reader.read(65536), 5 if wait_close else 0.3)
            if not piece:
                break
            out += piece
    except TimeoutError:
        assert not wait_close, f"the connection was not closed: {out!r}"
    writer.close()
    return out


def _head(raw: bytes) -> tuple[str, list[tuple[str, str]], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    line, *rest = head.decode().split("\r\n")
    return line, [(n, v) for n, _, v in (h.partition(": ") for h in rest)], body


def _names(headers: list[tuple[str, str]]) -> list[str]:
    return [n.lower() for n, _ in headers]


async def test_a_whole_answer_relays_end_to_end_headers_and_frames_its_body(port: int) -> None:
    raw = await _exchange(port, b"POST /json HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    line, headers, body = _head(raw)
    assert line == "HTTP/1.1 200 OK"
    assert body == BODY
    names = _names(headers)
    for dropped in ("transfer-encoding", "connection", "content-encoding", "set-cookie"):
        assert dropped not in names
    assert ("Content-Length", str(len(BODY))) in headers
    assert names.count("content-length") == 1
    assert [v for n, v in headers if n == "Link"] == ["<a>; rel=next", "<b>; rel=prev"]
    assert ("X-Request-Id", "up-1") in headers
    # The sidecar's own headers replace an upstream's of the same name, never sit beside it.
    assert [v for n, v in headers if n.lower() == "x-sidecar-provider"] == ["openai"]
    assert ("x-sidecar-request-id", "r-1") in headers
    # The upstream's Date is kept (not a second one); Server is added when it sent none.
    assert [v for n, v in headers if n.lower() == "date"] == ["Mon, 01 Jan 2024 00:00:00 GMT"]
    assert names.count("server") == 1
    assert headers.index(("Content-Type", "application/json")) < names.index("x-sidecar-request-id")


async def test_a_translated_answer_gets_the_content_type_it_now_has(port: int) -> None:
    _, headers, _ = _head(await _exchange(port, b"GET /translated HTTP/1.1\r\nHost: x\r\n\r\n"))
    assert [v for n, v in headers if n.lower() == "content-type"] == ["application/json"]


async def test_a_bare_answer_gets_date_server_and_a_default_content_type(port: int) -> None:
    line, headers, body = _head(await _exchange(port, b"GET /bare HTTP/1.1\r\nHost: x\r\n\r\n"))
    assert line == "HTTP/1.1 404 Not Found"
    assert body == b"nope"
    names = _names(headers)
    assert names.count("date") == 1
    assert names.count("server") == 1
    assert ("Content-Type", "application/octet-stream") in headers


async def test_keep_alive_follows_the_callers_http_version_and_wish(port: int) -> None:
    # HTTP/1.1: two answers on one connection.
    raw = await _exchange(port, b"GET /bare HTTP/1.1\r\nHost: x\r\n\r\n" * 2)
    assert raw.count(b"HTTP/1.1 404 Not Found") == 2
    assert b"Connection" not in raw
    # HTTP/1.1 asking to close: told so, and closed.
    raw = await _exchange(port, b"GET /bare HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                          wait_close=True)  # fmt: skip
    assert ("Connection", "close") in _head(raw)[1]
    # HTTP/1.0 asking to keep it: told so.
    raw = await _exchange(port, b"GET /bare HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    line, headers, _ = _head(raw)
    assert line == "HTTP/1.0 404 Not Found"
    assert ("Connection", "keep-alive") in headers
    # HTTP/1.0 by default: closed after the answer.
    raw = await _exchange(port, b"GET /bare HTTP/1.0\r\n\r\n", wait_close=True)
    assert _head(raw)[0] == "HTTP/1.0 404 Not Found"


async def test_head_gets_the_headers_and_no_body(port: int) -> None:
    raw = await _exchange(port, b"HEAD /json HTTP/1.1\r\nHost: x\r\n\r\n")
    line, headers, body = _head(raw)
    assert line == "HTTP/1.1 200 OK"
    assert body == b""
    assert ("x-sidecar-provider", "openai") in headers


async def test_a_line_break_in_a_header_is_refused_and_never_written(port: int) -> None:
    # As with aiohttp's own responses: the serialiser raises, nothing of the head goes out
    # (the sidecar's handler turns that into its 500; here aiohttp drops the connection).
    raw = await _exchange(port, b"GET /split HTTP/1.1\r\nHost: x\r\n\r\n", wait_close=True)
    assert b"X-Injected" not in raw
    assert b"X-Bad" not in raw


async def test_a_stream_sends_its_head_with_the_first_chunk(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
    first = await asyncio.wait_for(reader.readuntil(b"data: 1\n\n\r\n"), 5)
    rest = await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 5)
    writer.close()
    line, headers, body = _head(first)
    assert line == "HTTP/1.1 200 OK"
    assert ("Transfer-Encoding", "chunked") in headers
    assert "content-length" not in _names(headers)
    assert ("x-sidecar-provider", "openai") in headers
    assert body == b"9\r\ndata: 1\n\n\r\n"
    assert rest == b"9\r\ndata: 2\n\n\r\n0\r\n\r\n"


async def test_send_head_sends_a_streams_head_before_any_chunk(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /head-first HTTP/1.1\r\nHost: x\r\n\r\n")
    # The handler writes no chunk until the head has been read here.
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    GATE["open"].set()
    rest = await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 5)
    writer.close()
    assert rest == b"9\r\ndata: 1\n\n\r\n9\r\ndata: 2\n\n\r\n0\r\n\r\n"


async def test_a_stream_ended_before_any_chunk_still_sends_its_head(port: int) -> None:
    raw = await _exchange(port, b"GET /empty HTTP/1.1\r\nHost: x\r\n\r\n")
    line, headers, body = _head(raw)
    assert line == "HTTP/1.1 200 OK"
    assert ("Transfer-Encoding", "chunked") in headers
    assert body == b"0\r\n\r\n"


async def test_a_stream_without_a_content_type_gets_the_default(port: int) -> None:
    _, headers, _ = _head(await _exchange(port, b"GET /untyped HTTP/1.1\r\nHost: x\r\n\r\n"))
    assert ("Content-Type", "application/octet-stream") in headers


async def test_force_close_before_the_answer_is_kept(port: int) -> None:
    raw = await _exchange(port, b"GET /closed HTTP/1.1\r\nHost: x\r\n\r\n", wait_close=True)
    assert ("Connection", "close") in _head(raw)[1]


async def test_an_http10_stream_is_delimited_by_closing_the_connection(port: int) -> None:
    raw = await _exchange(port, b"GET /stream HTTP/1.0\r\n\r\n", wait_close=True)
    line, headers, body = _head(raw)
    assert line == "HTTP/1.0 200 OK"
    assert "transfer-encoding" not in _names(headers)
    assert body == b"data: 1\n\ndata: 2\n\n"


def test_its_headers_read_as_a_mapping() -> None:
    pairs, seen = answer._pairs(UPSTREAM, OWN, None)
    resp = answer.Answer(200, pairs, seen, BODY)
    assert resp.headers.getall("Link") == ["<a>; rel=next", "<b>; rel=prev"]
    assert resp.headers["X-Sidecar-Provider"] == "openai"
    assert resp.status == 200
    assert not resp.prepared
    with pytest.raises(TypeError):  # built with its headers: a later change would be lost
        resp.headers["X-Late"] = "1"  # type: ignore[index]


async def test_headers_the_upstreams_connection_names_are_not_relayed(port: int) -> None:
    raw = await _exchange(port, b"POST /named HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    _, headers, body = _head(raw)
    assert body == BODY
    names = _names(headers)
    assert "x-hop" not in names
    assert "x-other" not in names
    assert ("X-Kept", "2") in headers
    assert "connection" not in names
