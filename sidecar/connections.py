"""Callers' connections, guarded where aiohttp is not (docs/reference.md#timeouts).

A header deadline (`timeouts.client_header`), a body backstop
(`timeouts.client_body`), the idle keep-alive timer (`timeouts.keepalive`) and a
cap on open proxy connections (`limits.max_connections`), so slow or half-open
callers cannot exhaust the process or take the admin port down with the proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from sidecar import dispatch
from sidecar.dispatch import Handler
from sidecar.logs import OpLog
from sidecar.request_loop import InlineRequests

#: A body timer a little later than `timeouts.client_body`, so the handler's own 408 wins.
_BODY_SLACK_S = 1.0


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """What one listening port allows a caller's connection (docs/reference.md#config-keys: `timeouts`, `limits`)."""

    client_header: float
    client_body: float
    keepalive: float
    max_connections: int | None  # None: no cap (the admin port)


class GuardedServer(web.Server):
    """aiohttp's server with a connection cap; its connections are `_GuardedHandler`s.

    A connection over the cap is closed as soon as it is accepted, so a flood of
    half-open connections cannot run the process out of file descriptors (and take
    the admin port down with it). Refusals are logged at most once a second.
    """

    def __init__(
        self,
        plain: web.Server,
        limits: Callable[[], ConnectionLimits],
        oplog: OpLog,
        handler: Handler | None = None,
    ) -> None:
        super().__init__(handler or plain.request_handler, request_factory=plain.request_factory,
                         handler_cancellation=plain.handler_cancellation, loop=plain._loop,
                         **plain._kwargs)  # fmt: skip
        self._limits = limits  # read per connection: a reload applies to new connections
        self._cap: int | None = None
        self.open = 0  # counted from the protocol's creation, so a burst of accepts is capped too
        self._oplog = oplog
        self._refused = 0
        self._report: asyncio.TimerHandle | None = None

    def __call__(self) -> RequestHandler:
        limits = self._limits()
        cap = self._cap = limits.max_connections
        if cap is not None and self.open >= cap and not self._evict_idle():
            self._refused += 1
            if self._report is None:
                self._report = self._loop.call_later(1.0, self.report_refusals)
            return _Refuse()  # type: ignore[return-value]  # any asyncio.Protocol will do
        handler = _GuardedHandler(self, limits, loop=self._loop, **self._kwargs)
        self.open += 1
        return handler

    def _evict_idle(self) -> bool:
        """At the cap, an idle kept-alive connection makes room for a new caller, so
        connections that merely sit open cannot hold the cap against everyone else."""
        for handler in self.connections:
            if isinstance(handler, _GuardedHandler) and handler.idle_between_requests():
                handler.force_close()
                return True
        return False

    def closed(self) -> None:
        self.open -= 1

    def report_refusals(self) -> None:
        if self._report is not None:
            self._report.cancel()
            self._report = None
        if self._refused:
            self._oplog.warning("connections_refused", count=self._refused,
                                max_connections=self._cap)  # fmt: skip
            self._refused = 0


class _Refuse(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class _GuardedHandler(InlineRequests):
    """One caller connection with deadlines aiohttp does not have, whose requests are
    handled in its own task (`sidecar.request_loop`).

    - `client_header`: from the connect (or, on a kept-alive connection, the first
      byte of the next request) until that request's headers are complete;
    - `client_body` (+ slack): from the headers until the body's last byte, a backstop
      for routes that never read it (the proxy's reader answers 408 itself);
    - `keepalive`: aiohttp's own idle timer (`keepalive_timeout`).

    When one passes, the connection is closed. This leans on aiohttp's request-loop
    state (`_waiter`, `_request_count`, `_messages`), pinned in constraints.txt and
    covered end to end by tests/test_server_hardening_e2e.py.
    """

    __slots__ = ("_body_timer", "_header_count", "_header_timer", "_limits")

    def __init__(self, manager: GuardedServer, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(manager, keepalive_timeout=limits.keepalive, **kwargs)
        self._limits = limits
        self._header_timer: asyncio.TimerHandle | None = None
        self._header_count = 0
        self._body_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        manager = self._manager
        self._cancel_timers()
        super().connection_lost(exc)
        if isinstance(manager, GuardedServer):
            manager.closed()

    def data_received(self, data: bytes) -> None:
        before = self._request_count
        super().data_received(data)
        if self._request_count != before:  # a request's headers are complete
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
            self._arm_body_timer()
        elif data and self._header_timer is None and self._idle():
            self._arm_header_timer()  # the first byte of the next request on a kept-alive connection

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        # aiohttp's message for a malformed request quotes the raw bytes (an access key
        # included); answer with the status phrase only.
        return super().handle_error(request, status, exc, HTTPStatus(status).phrase)

    def idle_between_requests(self) -> bool:
        """Kept alive after a response, waiting for the next request (no partial one)."""
        return self._request_count > 0 and self._header_timer is None and self._idle()

    def _idle(self) -> bool:
        """Waiting for the next request (aiohttp's own test for its keep-alive timer)."""
        return self._waiter is not None and not self._waiter.done()

    def _arm_header_timer(self) -> None:
        self._header_count = self._request_count
        self._header_timer = self._loop.call_later(self._limits.client_header, self._header_due)

    def _header_due(self) -> None:
        self._header_timer = None
        if self._request_count == self._header_count and self._idle():
            self.force_close()

    def _arm_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        if not self._messages:
            return
        payload = self._messages[-1][1]
        if not payload.is_eof():
            delay = self._limits.client_body + _BODY_SLACK_S
            self._body_timer = self._loop.call_later(delay, self._body_due, payload)

    def _body_due(self, payload: aiohttp.StreamReader) -> None:
        self._body_timer = None
        if not payload.is_eof():
            self.force_close()

    def _cancel_timers(self) -> None:
        for timer in (self._header_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._body_timer = None


class GuardedRunner(web.AppRunner):
    """An AppRunner whose server is a `GuardedServer`; `direct` routes (static POST paths)
    skip the router (`sidecar.dispatch`)."""

    def __init__(
        self,
        app: web.Application,
        limits: Callable[[], ConnectionLimits],
        oplog: OpLog,
        *,
        direct: Iterable[web.AbstractRoute] = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(app, **kwargs)
        self._limits = limits
        self._oplog = oplog
        self._direct = tuple(direct)

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()
        handler = None
        if self._direct:
            handler = dispatch.direct(self.app, self._direct, plain.request_handler)
        return GuardedServer(plain, self._limits, self._oplog, handler)


def raise_fd_limit() -> int:
    """Best effort: the soft RLIMIT_NOFILE up to the hard one. Returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for target in (hard, 1 << 20, 1 << 16):
        if soft != resource.RLIM_INFINITY and (target == resource.RLIM_INFINITY or target > soft):
            with contextlib.suppress(ValueError, OSError):
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                break
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
