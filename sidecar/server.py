"""Assembling and running the sidecar: two apps, their resources, and shutdown.

Every resource has one `cleanup_ctx` entry (session, ledger, reload watcher,
access-log flush). Shutdown follows a fixed order with a deadline
(docs/reference.md#shutdown): not ready → stop accepting → drain in-flight
requests and streams within `shutdown_grace` → cut the rest → flush and close,
all within the grace + 1 s. Callers' connections are guarded by
`sidecar.connections`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import resource
import signal
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from aiohttp import web

from sidecar import request_loop
from sidecar.admin import build_admin_app
from sidecar.admission import Admission
from sidecar.billing import Billing
from sidecar.connections import ConnectionLimits, GuardedRunner, GuardedServer, raise_fd_limit
from sidecar.errors import UserError
from sidecar.health import KeyHealth
from sidecar.inflight import InFlight
from sidecar.logs import AccessLog, OpLog, route_library_logs
from sidecar.metrics import Metrics
from sidecar.proxy import Proxy
from sidecar.proxy.client import UpstreamClient
from sidecar.quota import QuotaBook
from sidecar.reload import Reloader, load_with_signature
from sidecar.runtime import KeyRef
from sidecar.state import STATE, State
from sidecar.tracing import Tracing

_RELOADER: web.AppKey[Reloader] = web.AppKey("sidecar_reloader", Reloader)
INFLIGHT: web.AppKey[InFlight] = web.AppKey("sidecar_inflight", InFlight)
#: The static POST routes served ahead of the router (`sidecar.dispatch`).
DIRECT_ROUTES: web.AppKey[list[web.AbstractRoute]] = web.AppKey("sidecar_direct_routes", list)

#: After the drain deadline: how long cut requests get to unwind (and account), and the
#: shortest budget for flushing spend and closing; the exit stays within grace + 1 s.
_UNWIND_S = 0.3
_CLOSE_BUDGET_S = 0.6
#: File descriptors kept for everything but proxy connections (admin, upstream, files).
_FD_RESERVE = 256
#: How long an idle upstream connection is kept for the next request.
_UPSTREAM_KEEPALIVE_S = 30.0


def build_state(
    config_path: Path, *, oplog: OpLog | None = None, access_log: AccessLog | None = None
) -> State:
    """Load config + vault (first load counts as a reload) and build the app state."""
    oplog = oplog or OpLog()
    runtime, signature = load_with_signature(
        config_path
    )  # a bad first version: the process exits 1
    metrics = Metrics()
    metrics.reload_ok()
    metrics.prime(*runtime.metric_seeds())
    cfg = runtime.config
    oplog.set_level(cfg.log.level)
    billing = Billing(metrics, oplog)
    billing.configure(cfg)
    health = KeyHealth()
    shared = None
    if cfg.shared_state is not None:
        from sidecar.shared.replicas import SharedState  # imports the Redis client

        shared = SharedState(cfg.shared_state, health, metrics, oplog,
                             lambda hid: hid in state.runtime.key_labels)  # fmt: skip
    state = State(
        runtime=runtime,
        health=health,
        metrics=metrics,
        oplog=oplog,
        access_log=access_log or AccessLog(cfg.log.access_log),
        billing=billing,
        files=signature,
        quota=QuotaBook(),
        admission=Admission(metrics, shared),
        shared=shared,
        tracing=Tracing.from_config(cfg, oplog),
    )
    metrics.watch_cooling(
        lambda: (ls for group in state.runtime.key_labels.values() for ls in group),
        lambda: _cooling_labels(state),
    )
    metrics.watch_quota(lambda: _quota_labels(state))
    return state


def _cooling_labels(state: State) -> Iterator[KeyRef]:
    labels = state.runtime.key_labels
    for hid in state.health.cooling():
        if hid in labels:
            yield from labels[hid]


def _quota_labels(state: State) -> Iterator[tuple[tuple[str, str, str, str], int]]:
    """(provider, source, key_id, kind) → remaining, for `sidecar_key_quota_remaining`."""
    labels = state.runtime.key_labels
    seen: set[tuple[str, str, str, str]] = set()
    for (hid, kind), remaining in state.quota.remaining().items():
        for ref in labels.get(hid, ()):
            series = (ref.provider, ref.source, ref.key_id, kind.value)
            if series not in seen:  # one key attached to two access keys is one series
                seen.add(series)
                yield series, remaining


async def _shared_ctx(app: web.Application) -> AsyncIterator[None]:
    """The link to the shared-state Redis, kept in the background (when configured)."""
    state = app[STATE]
    shared = state.shared
    task = asyncio.create_task(shared.run()) if shared is not None else None
    yield
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await state.admission.close()
    if shared is not None:
        await shared.close()


async def _client_ctx(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    state.loop = asyncio.get_running_loop()
    state.client = UpstreamClient(keepalive=_UPSTREAM_KEEPALIVE_S)
    yield
    await state.client.close()


async def _billing_ctx(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]

    async def flush_loop() -> None:
        while True:
            await asyncio.sleep(5.0)
            await state.billing.flush()

    task = asyncio.create_task(flush_loop())  # a reload may open the ledger later
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await state.billing.close()


async def _access_log_ctx(app: web.Application) -> AsyncIterator[None]:
    yield
    app[STATE].access_log.flush()


async def _reload_ctx(app: web.Application) -> AsyncIterator[None]:
    reloader = app[_RELOADER]
    reloader.mark_loaded(app[STATE].files)
    task = asyncio.create_task(reloader.watch())
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGHUP, reloader.wake)
    yield
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.remove_signal_handler(signal.SIGHUP)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def build_proxy_app(state: State, config_path: Path) -> web.Application:
    app = web.Application(client_max_size=1 << 62)  # the handler bounds bodies itself
    app[STATE] = state
    app[_RELOADER] = Reloader(config_path, state)
    proxy = Proxy(state)
    app[INFLIGHT] = proxy.inflight
    r = app.router
    direct = app[DIRECT_ROUTES] = []  # served ahead of the router (sidecar.dispatch)
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"):
        direct.append(r.add_post(path, proxy.openai))
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        direct.append(r.add_post(path, proxy.anthropic))
    direct.append(r.add_post("/v1/responses/input_tokens", proxy.openai))
    r.add_get("/v1/models", proxy.models)
    r.add_get("/v1/models/{model:.+}", proxy.models)
    r.add_get("/v1/responses", proxy.websocket)
    # A stored response, by id (retrieve, delete, cancel, input items): OpenAI's own.
    r.add_route("*", "/v1/responses/{id}", proxy.openai_stored)
    r.add_route("*", "/v1/responses/{id}/{action}", proxy.openai_stored)
    r.add_post("/v1beta/models/{target}", proxy.gemini)
    r.add_get("/v1beta/models", proxy.models)
    r.add_get("/v1beta/models/{model}", proxy.models)
    r.add_route("*", "/v1beta/{tail:.*}", proxy.not_found)
    for root in ("/", "/{provider}"):  # probes of the base URL (GET also answers HEAD)
        r.add_get(root, proxy.root)
    r.add_route("*", "/v1/{tail:.*}", proxy.not_found)
    r.add_route("*", "/{provider}/{tail:.*}", proxy.explicit)
    r.add_route("*", "/{tail:.*}", proxy.not_found)
    app.cleanup_ctx.extend([_client_ctx, _shared_ctx, _billing_ctx, _access_log_ctx, _reload_ctx])
    return app


@dataclass
class Running:
    state: State
    proxy_runner: web.AppRunner
    admin_runner: web.AppRunner
    proxy_port: int
    admin_port: int

    async def stop(self) -> None:
        """Drain and stop within `shutdown_grace` (+ at most a second to flush and close).

        /readyz answers 503 at once and the proxy port stops accepting; in-flight
        requests and streams get the grace period, then whatever still runs is cut
        (streams end without their terminator, as broken streams do), spend is
        flushed and everything closes. aiohttp's own drain is not used for the
        deadline: it waits up to its timeout twice.
        """
        state = self.state
        loop = asyncio.get_running_loop()
        grace = state.runtime.config.shutdown_grace
        deadline = loop.time() + grace
        state.draining = True
        state.oplog.info("draining", grace_s=grace)
        for site in list(self.proxy_runner.sites):
            await site.stop()
        server = self.proxy_runner.server
        if server is not None:
            server.pre_shutdown()  # idle kept-alive connections close now
        inflight = self.proxy_runner.app[INFLIGHT]
        if not await inflight.wait_idle(deadline - loop.time()):
            cut = inflight.cut(state.metrics, state.oplog)
            state.oplog.warning("drain_deadline", grace_s=grace, cut=cut)
            await inflight.wait_idle(_UNWIND_S)  # cancelled handlers account for what they used
        if isinstance(server, GuardedServer):
            server.report_refusals()
        budget = max(_CLOSE_BUDGET_S, deadline + 1.0 - _UNWIND_S - loop.time())
        try:
            async with asyncio.timeout(budget):
                await state.billing.flush()
                await self.proxy_runner.cleanup()  # its cleanup_ctx closes the ledger
        except TimeoutError:  # what could not be written is named, never lost silently
            lost = state.billing.unwritten()
            state.oplog.error("shutdown_incomplete", budget_s=round(budget, 3),
                              unwritten_micro_usd=sum(lost.values()), by_access_key=lost)  # fmt: skip
        if state.tracing is not None:  # queued spans go out within what is left
            await state.tracing.close(max(0.1, deadline + 1.0 - loop.time()))
        await self.admin_runner.cleanup()
        state.oplog.info("stopped")


def _bound_port(runner: web.AppRunner) -> int:
    return int(runner.addresses[0][1])


def _proxy_limits(state: State) -> ConnectionLimits:
    cfg = state.runtime.config
    t = cfg.timeouts
    return ConnectionLimits(t.client_header, t.client_body, t.keepalive, cfg.limits.max_connections)


def _admin_limits(state: State) -> ConnectionLimits:
    t = state.runtime.config.timeouts
    return ConnectionLimits(t.client_header, t.client_body, t.keepalive, None)


async def start(
    config_path: Path, *, oplog: OpLog | None = None, access_log: AccessLog | None = None
) -> Running:
    """Load, bind both ports (port 0 picks a free one) and serve; `Running.stop()` drains."""
    state = build_state(config_path, oplog=oplog, access_log=access_log)
    cfg = state.runtime.config
    # auto_decompress=False: the handler decodes request bodies itself, bounded (inbound.decode_body).
    # shutdown_timeout: `Running.stop` drains with its own deadline first; this only bounds
    # aiohttp's wait for handlers that were already cut.
    proxy_app = build_proxy_app(state, config_path)
    direct: list[web.AbstractRoute] = proxy_app[DIRECT_ROUTES]
    proxy_runner = GuardedRunner(proxy_app, lambda: _proxy_limits(state), state.oplog,
                                  direct=direct,
                                  handler_cancellation=True, shutdown_timeout=_UNWIND_S,
                                  access_log=None, handle_signals=False, auto_decompress=False)  # fmt: skip
    admin_runner = GuardedRunner(build_admin_app(state), lambda: _admin_limits(state), state.oplog,
                                  access_log=None, shutdown_timeout=_UNWIND_S, handle_signals=False)  # fmt: skip
    await admin_runner.setup()
    await proxy_runner.setup()
    try:
        await web.TCPSite(
            admin_runner, cfg.admin_listen.host, cfg.admin_listen.port, reuse_address=True
        ).start()
        await web.TCPSite(
            proxy_runner, cfg.listen.host, cfg.listen.port, reuse_address=True, backlog=1024
        ).start()
    except OSError as exc:
        await proxy_runner.cleanup()
        await admin_runner.cleanup()
        raise UserError(f"cannot listen: {exc.strerror}") from None
    running = Running(
        state, proxy_runner, admin_runner, _bound_port(proxy_runner), _bound_port(admin_runner)
    )
    state.ready = True
    state.oplog.log("info", "listening", always=True, proxy=f"{cfg.listen.host}:{running.proxy_port}",
                     admin=f"{cfg.admin_listen.host}:{running.admin_port}",
                     request_loop="inline" if request_loop.inline else "aiohttp")  # fmt: skip
    _check_fd_limit(state)
    return running


def _check_fd_limit(state: State) -> None:
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    needed = 2 * state.runtime.config.limits.max_connections + _FD_RESERVE  # caller + upstream
    if soft != resource.RLIM_INFINITY and soft < needed:
        state.oplog.warning("fd_limit_low", nofile=soft, needed=needed,
                            hint="raise `ulimit -n` or lower limits.max_connections")  # fmt: skip


async def run(config_path: Path) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (
        signal.SIGTERM,
        signal.SIGINT,
    ):  # before the first load: a SIGTERM then still exits 0
        loop.add_signal_handler(sig, stop.set)
    oplog = OpLog()
    route_library_logs(oplog)  # aiohttp's and asyncio's own log lines: JSON, no raw request bytes
    raise_fd_limit()
    running = await start(config_path, oplog=oplog)
    tune_gc()
    await stop.wait()
    await running.stop()


#: Allocations (net) between young-generation collections. A request allocates a few thousand
#: objects and frees nearly all of them by reference counting; at CPython's default of 700
#: the collector ran several times per request for nothing (about 8% of the CPU under load).
_GC_YOUNG: Final = 10_000


def tune_gc() -> None:
    """Once serving: what startup built (modules, config, runtime) is set aside so that no
    collection walks it again, and collections run when garbage can really pile up.
    Reference cycles are still collected, only less often."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(_GC_YOUNG, older, oldest)


def serve_forever(config_path: Path) -> None:
    """`sidecar serve --config PATH`: run on uvloop until SIGTERM/SIGINT, then drain and exit 0."""
    import uvloop

    uvloop.run(run(config_path.absolute()))
