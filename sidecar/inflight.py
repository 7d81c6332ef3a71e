"""Requests in flight on the proxy port, for the shutdown drain (docs/reference.md#shutdown)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web

from sidecar.state import State

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(slots=True)
class _Tracked:
    request: web.Request
    started: tuple[str, str] | None = None  # (provider, request id) once its response started


@dataclass
class InFlight:
    """Requests being handled, and the provider of those already streaming a response.

    The drain waits for these; at its deadline, the rest are cut.
    """

    requests: dict[int, _Tracked] = field(default_factory=dict)  # by id(): requests are unhashable
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    @web.middleware
    async def middleware(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        self.requests[id(request)] = _Tracked(request)
        self.idle.clear()
        try:
            return await handler(request)
        finally:
            del self.requests[id(request)]
            if not self.requests:
                self.idle.set()

    async def on_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        tracked = self.requests.get(id(request))
        if tracked is not None:
            headers = response.headers
            tracked.started = (headers.get("x-sidecar-provider", ""),
                               headers.get("x-sidecar-request-id", ""))  # fmt: skip

    async def wait_idle(self, within: float) -> bool:
        if not self.requests:
            return True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(within, 0.0)):
                await self.idle.wait()
        return not self.requests

    def cut(self, state: State) -> int:
        """End every request still running as a broken stream is ended: the connection
        closes without a terminator, so the caller's SDK sees the break."""
        cut = 0
        for tracked in list(self.requests.values()):
            transport = tracked.request.transport
            if transport is None or transport.is_closing():
                continue
            if tracked.started is not None:  # its response was streaming
                provider, request_id = tracked.started
                state.metrics.stream_interruptions.labels(provider, "shutdown").inc()
                state.oplog.warning("stream_interrupted", request_id=request_id, provider=provider,
                                    cause="shutdown")  # fmt: skip
            transport.close()
            cut += 1
        return cut


INFLIGHT: web.AppKey[InFlight] = web.AppKey("sidecar_inflight", InFlight)
