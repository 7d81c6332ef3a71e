"""sidecar.request_loop: a connection's requests are handled in the connection's own task, and
the loop doing so is aiohttp's own, copied from the pinned aiohttp."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import difflib
import inspect
import io
import textwrap
from collections.abc import AsyncIterator, Callable

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from sidecar import request_loop
from sidecar.connections import ConnectionLimits, GuardedRunner
from sidecar.logs import OpLog
from tests.harness import Env, Sidecar, _read_response, metric_value, start_with_timeouts

WAIT = 10.0


def test_the_installed_aiohttp_loop_is_the_one_copied() -> None:
    # Fails when aiohttp's request loop, or what runs or cancels its task, changes (an
    # upgrade): take the copy again from the new version, then update COPIED_FROM.
    assert request_loop.source_digest() == request_loop.COPIED_FROM
    assert request_loop.inline


def _unparsed(function: Callable[..., object]) -> list[str]:
    return ast.unparse(ast.parse(textwrap.dedent(inspect.getsource(function)))).splitlines()


#: The copy against aiohttp's loop, as code (comments and formatting aside): every change.
_CHANGES = """\
@@ -2,8 +2,3 @@
-    \"\"\"Process incoming request.
-
-    It reads request line, request headers and request payload, then
-    calls handle_request() method. Subclass has to override
-    handle_request(). start() handles various exceptions in request
-    or response handling. Connection is being closed always unless
-    keep_alive(True) specified.
-    \"\"\"
+    if not inline:
+        await super().start()
+        return
@@ -16,0 +12,2 @@
+    task = asyncio.current_task(loop)
+    assert task is not None
@@ -39,10 +36 @@
-            coro = self._handle_request(request, start, request_handler)
-            if sys.version_info >= (3, 14):
-                if isinstance(loop, BaseEventLoop):
-                    task = asyncio.create_task(coro, eager_start=True)
-                else:
-                    task = asyncio.Task(coro, loop=loop, eager_start=True)
-            elif sys.version_info >= (3, 12):
-                task = asyncio.Task(coro, loop=loop, eager_start=True)
-            else:
-                task = loop.create_task(coro)
+            cancels = task.cancelling()
@@ -50 +38 @@
-                resp, reset = await task
+                resp, reset = await self._handle_request(request, start, request_handler)
@@ -54 +42,3 @@
-            del task
+            if task.cancelling() != cancels:
+                self.force_close()
+                break
@@ -70,2 +60,2 @@
-                    except (asyncio.CancelledError, asyncio.TimeoutError):
-                        if sys.version_info >= (3, 11) and (t := asyncio.current_task()) and t.cancelling():
+                    except (asyncio.CancelledError, TimeoutError):
+                        if (t := asyncio.current_task()) and t.cancelling():
"""


def test_the_copy_differs_from_aiohttps_loop_only_where_it_says() -> None:
    diff = difflib.unified_diff(_unparsed(RequestHandler.start),
                                _unparsed(request_loop.InlineRequests.start), lineterm="", n=0)  # fmt: skip
    assert "\n".join(list(diff)[2:]) + "\n" == _CHANGES


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

    async def pending(request: web.Request) -> web.Response:  # a cancel it never awaits
        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        return web.Response(text="ok")

    async def swallowed(request: web.Request) -> web.Response:  # caught, not `uncancel`ed
        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(1)
        return web.Response(text="ok")

    app = web.Application()
    route = app.router.add_post("/v1/chat/completions", handler)
    app.router.add_get("/other", handler)
    app.router.add_get("/pending", pending)
    app.router.add_get("/swallowed", swallowed)
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


@pytest.mark.parametrize("path", [b"/pending", b"/swallowed"])
async def test_a_cancellation_left_by_a_handler_closes_its_connection(
    tasks_server: tuple[int, list[asyncio.Task[object] | None]], path: bytes
) -> None:
    # Under aiohttp's loop it died with the request's own task; here it would reach the next
    # request on the connection (a hang, or a count that deadlines read), so the loop closes it.
    port, _ = tasks_server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        assert await _exchange(reader, writer, b"GET " + path + b" HTTP/1.1\r\nhost: x\r\n") == (200, b"ok")
        writer.write(b"GET /other HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n")
        try:
            rest = await asyncio.wait_for(reader.read(), WAIT)
        except ConnectionResetError:
            rest = b""
        assert rest == b""  # closed after the answer: the next request is not served on it
    finally:
        writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)  # the server answers on
    try:
        assert await _exchange(reader, writer, b"GET /other HTTP/1.1\r\nhost: x\r\n") == (200, b"ok")
    finally:
        writer.close()


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
    counts = _cancel_counts(monkeypatch)
    sc, token = await start_with_timeouts(
        env, sidecars, "{per_request: 300ms, total: 5s, stream_idle: 300ms}", app="a")
    reader, writer = await asyncio.open_connection("127.0.0.1", sc.running.proxy_port)
    try:
        for _ in range(2):  # (a cancellation left counted on the task would show the second time)
            status, body = await _exchange(reader, writer, *_chat(token, "gpt-4o-mini-slow-2000"))
            assert status == 502, body  # the one attempt timed out (per_request)
        status, body = await _exchange(reader, writer, *_chat(token, "gpt-4o-mini"))
        assert (status, bool(orjson.loads(body)["choices"])) == (200, True), body
        status, body = await _exchange(reader, writer, *_chat(token, "gpt-4o-mini", stream=True))
        assert (status, body.endswith(b"data: [DONE]\n\n")) == (200, True), body
        for _ in range(2):  # a stream cut for going idle: the relay's deadline, the body ended
            status, body = await _exchange(reader, writer, *_chat(token, "gpt-4o-mini-stall-1500", True))
            assert (status, body[:6], b"[DONE]" in body) == (200, b"data: ", False), body
        status, body = await _exchange(reader, writer, *_chat(token, "gpt-4o-mini"))
        assert (status, bool(orjson.loads(body)["choices"])) == (200, True), body
    finally:
        writer.close()
    async with aiohttp.ClientSession() as http, http.get(sc.admin_url + "/metrics") as m:
        text = await m.text()
    assert metric_value(text, "sidecar_upstream_attempts_total", outcome="timeout") == 2
    assert metric_value(text, "sidecar_stream_interruptions_total", cause="idle_timeout") == 2
    sc2, token2 = await start_with_timeouts(env, sidecars, "{per_request: 5s, total: 400ms}", app="b")
    reader, writer = await asyncio.open_connection("127.0.0.1", sc2.running.proxy_port)
    try:
        for _ in range(2):
            status, body = await _exchange(reader, writer, *_chat(token2, "gpt-4o-mini-slow-2000"))
            assert status == 504, body  # the request's whole budget (total) ran out
        status, body = await _exchange(reader, writer, *_chat(token2, "gpt-4o-mini"))
        assert (status, bool(orjson.loads(body)["choices"])) == (200, True), body
    finally:
        writer.close()
    assert len(counts) >= 10  # the ten above, and the admin port's
    assert set(counts) == {0}  # each request started on a task with no cancellation left


def _cancel_counts(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The connection task's `cancelling()` as each request's handler starts."""
    counts: list[int] = []
    handle = request_loop.InlineRequests._handle_request

    async def counting(self: RequestHandler, *args: object) -> tuple[web.StreamResponse, bool]:
        task = asyncio.current_task()
        assert task is not None
        counts.append(task.cancelling())
        return await handle(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(request_loop.InlineRequests, "_handle_request", counting)
    return counts


async def test_the_listening_line_says_which_loop_runs(env: Env, sidecars: list[Sidecar]) -> None:
    await start_with_timeouts(env, sidecars, "{per_request: 5s}", app="c")
    (line,) = [r for r in env.oplog.records() if r.get("event") == "listening"]
    assert line["request_loop"] == "inline"
