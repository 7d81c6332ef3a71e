"""One request's state across its attempts; it becomes the access-log line."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from aiohttp import web

from sidecar import inbound
from sidecar.admission import Ticket
from sidecar.plan import Candidate
from sidecar.runtime import AccessKey, Runtime
from sidecar.secret import Secret
from sidecar.usage import Usage

if TYPE_CHECKING:
    from sidecar.tracing import RequestTrace

#: Status recorded (metrics, access log) when the caller disconnects first, as nginx does.
CLIENT_CLOSED: Final = 499


class Exchange:
    """Not a dataclass: every field but the five set at the start is a class-level default
    until the request sets it, so making one costs five assignments, not twenty-three."""

    access: AccessKey | None = None
    candidate: Candidate | None = None
    attempts: int = 0
    upstream_wait: float = 0.0
    status: int = 0
    usage: Usage | None = None
    #: usage of earlier attempts that also produced tokens (a stream resumed elsewhere)
    charges: tuple[tuple[Candidate, Usage], ...] = ()
    rejected: Sequence[str] = ()
    overhead: float | None = None
    token: Secret | None = None  # the caller's credential as sent: stripped from the query
    #: the provider the request was resolved to, for refusals made before any key was chosen
    resolved_provider: str = ""
    body_size: int = 0
    streaming: bool = False  # response headers sent: a cut breaks a stream
    resumed: bool = False  # a broken stream was continued from another candidate
    translated: str | None = None  # `caller->upstream` when the attempt was translated
    ticket: Ticket | None = None  # the access key's rate-limit count, settled when done
    trace: RequestTrace | None = None  # `tracing:` on: this request's server span

    def __init__(
        self,
        request: web.Request,
        fmt: str,
        runtime: Runtime,
        started: float,
        request_id: str,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.request = request
        self.loop = loop  # the running loop, known without asking asyncio (a system call)
        self.fmt = fmt
        self.runtime = runtime
        self.started = started
        self.request_id = request_id

    @property
    def transport(self) -> asyncio.Transport | None:
        return self.request.transport

    @property
    def caller_gone(self) -> bool:
        transport = self.request.transport
        return transport is None or transport.is_closing()

    @property
    def provider(self) -> str:
        return self.candidate.provider.id if self.candidate else self.resolved_provider

    def sidecar_headers(self) -> dict[str, str]:
        h = {"x-sidecar-request-id": self.request_id}
        c = self.candidate
        if c is not None:
            h["x-sidecar-provider"] = c.provider.id
            h["x-sidecar-model"] = c.upstream_model or ""
            h["x-sidecar-key-source"] = c.key.labels[1]  # the source's value, precomputed
            h["x-sidecar-key-id"] = c.key.key_id
            h["x-sidecar-attempts"] = str(self.attempts)
            if self.translated:
                h["x-sidecar-translated"] = self.translated
            if self.rejected:
                h["x-sidecar-rejected-models"] = inbound.rejected_header(self.rejected)
            self.overhead = time.perf_counter() - self.started - self.upstream_wait
            h["x-sidecar-overhead-ms"] = f"{self.overhead * 1000:.3f}"
        return h
