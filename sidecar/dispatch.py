"""The proxy's busiest routes found by one dictionary lookup, ahead of aiohttp's router.

`web.Application` dispatches every request by walking its router (a regex per resource
until one matches), building a match-info object, wrapping middlewares, and asking
asyncio for the event loop, which on Python 3.11 is a `getpid()` system call. The
routes a proxy serves all day are a few fixed paths taking POST: `direct()` serves
those from a dictionary of their exact raw paths, with each route's match info built
once (frozen, its app set), so `request.match_info` and `request.app` read as they
would. Anything else (another method, a query string, a percent-escape, an
`Expect: 100-continue` aiohttp must answer first) goes to the application's own
dispatch, unchanged. The sidecar's app has no middlewares, so nothing is skipped.

A route's match info is one object shared by all its requests: handlers only read it
(`match_info.route`, `request.app`), as the sidecar's do; none may write to it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable

from aiohttp import hdrs, web

__all__ = ["Handler", "direct"]

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
RouteHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def direct(app: web.Application, routes: Iterable[web.AbstractRoute], fallback: Handler) -> Handler:
    """A request handler: POST to one of `routes` (static paths of `app`) straight to its
    handler, everything else to `fallback` (the application's dispatch)."""
    if app.middlewares:
        raise ValueError("direct dispatch would skip the application's middlewares")
    table: dict[str, tuple[web.UrlMappingMatchInfo, RouteHandler]] = {}
    for route in routes:
        if route.method != hdrs.METH_POST or not isinstance(route.resource, web.PlainResource):
            raise ValueError(f"not a POST route of a static path: {route!r}")
        path = route.resource.canonical
        if path in table:
            raise ValueError(f"two direct routes for {path}")
        match = web.UrlMappingMatchInfo({}, route)
        match.add_app(app)
        match.freeze()
        table[path] = (match, route.handler)

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        found = table.get(request.raw_path)
        if found is None or request.method != hdrs.METH_POST or hdrs.EXPECT in request.headers:
            return await fallback(request)
        match, handler = found
        request._match_info = match  # type: ignore[attr-defined]
        return await handler(request)  # type: ignore[arg-type]  # the app's factory: a web.Request

    return handle
