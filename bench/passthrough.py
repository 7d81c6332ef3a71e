"""The ceiling for any proxy on our stack: a bare aiohttp pass-through.

It does only what no proxy can skip: read the body, copy the headers minus
hop-by-hop ones and the caller's credential, put the upstream key in
`Authorization`, and relay the answer (streams chunk by chunk with
`iter_any`). One shared `ClientSession`, uvloop, no access log. No auth
check, no model lookup, no failover, no metrics, no metering: whatever the
sidecar costs beyond this is the price of its features.

    BENCH_UPSTREAM_KEY=sk-... python -m bench.passthrough \
        --listen 127.0.0.1:8091 --upstream http://127.0.0.1:8089

The upstream key comes from the environment, never from an argument.
`GET /_bench/health` answers 200 once the port is bound.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from typing import Final

import aiohttp
import uvloop
from aiohttp import web
from multidict import CIMultiDict

_HOP_BY_HOP: Final = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
     "trailers", "transfer-encoding", "upgrade", "host", "content-length"}
)  # fmt: skip
_DROP_REQUEST: Final = _HOP_BY_HOP | {"authorization", "x-api-key", "accept-encoding", "expect"}
_DROP_RESPONSE: Final = _HOP_BY_HOP | {"content-encoding", "set-cookie"}

_SESSION: Final = web.AppKey("passthrough_session", aiohttp.ClientSession)


class _PassThrough:
    __slots__ = ("_auth", "_upstream")

    def __init__(self, upstream: str, key: str) -> None:
        self._upstream = upstream.rstrip("/")
        self._auth = f"Bearer {key}"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers: CIMultiDict[str] = CIMultiDict()
        for name, value in request.headers.items():
            if name.lower() not in _DROP_REQUEST:
                headers.add(name, value)
        headers["Authorization"] = self._auth
        session = request.app[_SESSION]
        async with session.request(request.method, self._upstream + request.path_qs, data=body,
                                   headers=headers, allow_redirects=False) as upstream:  # fmt: skip
            out: CIMultiDict[str] = CIMultiDict()
            for name, value in upstream.headers.items():
                if name.lower() not in _DROP_RESPONSE:
                    out.add(name, value)
            if "text/event-stream" not in upstream.headers.get("content-type", ""):
                return web.Response(status=upstream.status, body=await upstream.read(), headers=out)
            resp = web.StreamResponse(status=upstream.status, headers=out)
            await resp.prepare(request)
            async for chunk in upstream.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp


async def _health(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def _session_ctx(app: web.Application) -> AsyncIterator[None]:
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=30)
    app[_SESSION] = aiohttp.ClientSession(
        connector=connector, cookie_jar=aiohttp.DummyCookieJar(), timeout=aiohttp.ClientTimeout()
    )
    yield
    await app[_SESSION].close()


def create_app(upstream: str, key: str) -> web.Application:
    """The pass-through app: `/_bench/health`, and everything else relayed to `upstream`."""
    app = web.Application(client_max_size=1 << 30)
    app.cleanup_ctx.append(_session_ctx)
    app.router.add_get("/_bench/health", _health)
    app.router.add_route("*", "/{tail:.*}", _PassThrough(upstream, key).handle)
    return app


async def serve(host: str, port: int, upstream: str, key: str) -> None:
    """Serve until SIGTERM/SIGINT."""
    runner = web.AppRunner(create_app(upstream, key), access_log=None, handle_signals=False)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await web.TCPSite(runner, host, port, backlog=1024).start()
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.passthrough", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--listen", required=True, metavar="HOST:PORT")
    p.add_argument("--upstream", required=True, metavar="URL", help="e.g. http://127.0.0.1:8089")
    args = p.parse_args(argv)
    key = os.environ.get("BENCH_UPSTREAM_KEY", "")
    if not key:
        print("error: BENCH_UPSTREAM_KEY is not set", file=sys.stderr)
        return 1
    host, _, port = args.listen.rpartition(":")
    uvloop.run(serve(host, int(port), args.upstream, key))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
