"""What the proxy app holds (STYLE §4): one typed object under one `web.AppKey`."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

from sidecar.health import KeyHealth
from sidecar.logs import AccessLog, OpLog
from sidecar.metrics import Metrics
from sidecar.runtime import Runtime

if TYPE_CHECKING:
    from sidecar.admission import Admission
    from sidecar.billing import Billing
    from sidecar.proxy.client import UpstreamClient
    from sidecar.quota import QuotaBook
    from sidecar.shared.replicas import SharedState
    from sidecar.tracing import Tracing


@dataclass(slots=True)
class State:
    runtime: Runtime  # swapped whole by the reloader; each request keeps the one it started with
    health: KeyHealth
    metrics: Metrics
    oplog: OpLog
    access_log: AccessLog
    billing: Billing
    #: (stat, content) signature of the files the first version was loaded from
    files: tuple[tuple[object, ...], str]
    quota: QuotaBook  # the providers' remaining-quota headers, per key and model
    admission: Admission  # per-access-key rate limits
    shared: SharedState | None = None  # `shared_state:` configured
    tracing: Tracing | None = None  # `tracing:` configured
    client: UpstreamClient = field(init=False)  # the request path's upstream connections
    #: the event loop it serves on (set with `client`): asyncio's own lookup is a system call
    loop: asyncio.AbstractEventLoop = field(init=False)
    draining: bool = False
    ready: bool = False


STATE: web.AppKey[State] = web.AppKey("sidecar_state", State)
