"""Assembling and running the sidecar: two apps, their resources, and shutdown.

Every resource has one `cleanup_ctx` entry (session, ledger, reload watcher,
access-log flush). Shutdown follows a fixed order with a deadline (STYLE §6):
not ready → stop accepting → drain in-flight requests and streams within
`shutdown_grace` → cancel the rest → flush and close.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web

from sidecar.admin import build_admin_app
from sidecar.billing import Billing
from sidecar.errors import UserError
from sidecar.health import KeyHealth
from sidecar.logs import AccessLog, OpLog
from sidecar.metrics import Metrics
from sidecar.proxy import Proxy
from sidecar.reload import Reloader, load_with_signature
from sidecar.state import STATE, State

_RELOADER: web.AppKey[Reloader] = web.AppKey("sidecar_reloader", Reloader)


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
    state = State(
        runtime=runtime,
        health=KeyHealth(),
        metrics=metrics,
        oplog=oplog,
        access_log=access_log or AccessLog(cfg.log.access_log),
        billing=billing,
        files=signature,
    )
    metrics.watch_cooling(
        lambda: (ls for group in state.runtime.key_labels.values() for ls in group),
        lambda: _cooling_labels(state),
    )
    return state


def _cooling_labels(state: State) -> Iterator[tuple[str, str, str]]:
    labels = state.runtime.key_labels
    for hid in state.health.cooling():
        if hid in labels:
            yield from labels[hid]


async def _session_ctx(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    connector = aiohttp.TCPConnector(
        limit=0, limit_per_host=0, ttl_dns_cache=300, keepalive_timeout=30
    )
    state.session = aiohttp.ClientSession(
        connector=connector, auto_decompress=True, cookie_jar=aiohttp.DummyCookieJar()
    )
    yield
    await state.session.close()


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
    r = app.router
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"):
        r.add_post(path, proxy.openai)
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        r.add_post(path, proxy.anthropic)
    r.add_get("/v1/models", proxy.models)
    r.add_route("*", "/v1/{tail:.*}", proxy.not_found)
    r.add_route("*", "/{provider}/{tail:.*}", proxy.explicit)
    r.add_route("*", "/{tail:.*}", proxy.not_found)
    app.cleanup_ctx.extend([_session_ctx, _billing_ctx, _access_log_ctx, _reload_ctx])
    return app


@dataclass
class Running:
    state: State
    proxy_runner: web.AppRunner
    admin_runner: web.AppRunner
    proxy_port: int
    admin_port: int

    async def stop(self) -> None:
        """Drain and stop: readyz 503 at once, proxy closes, in-flight work gets the grace period."""
        self.state.draining = True
        self.state.oplog.info("draining", grace_s=self.state.runtime.config.shutdown_grace)
        await self.proxy_runner.cleanup()
        await self.admin_runner.cleanup()
        self.state.oplog.info("stopped")


def _bound_port(runner: web.AppRunner) -> int:
    return int(runner.addresses[0][1])


async def start(
    config_path: Path, *, oplog: OpLog | None = None, access_log: AccessLog | None = None
) -> Running:
    """Load, bind both ports (port 0 picks a free one) and serve; `Running.stop()` drains."""
    state = build_state(config_path, oplog=oplog, access_log=access_log)
    cfg = state.runtime.config
    proxy_runner = web.AppRunner(build_proxy_app(state, config_path), handler_cancellation=True,
                                 shutdown_timeout=cfg.shutdown_grace, access_log=None, handle_signals=False)  # fmt: skip
    admin_runner = web.AppRunner(
        build_admin_app(state), access_log=None, shutdown_timeout=1.0, handle_signals=False
    )
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
                     admin=f"{cfg.admin_listen.host}:{running.admin_port}")  # fmt: skip
    return running


async def run(config_path: Path) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (
        signal.SIGTERM,
        signal.SIGINT,
    ):  # before the first load: a SIGTERM then still exits 0
        loop.add_signal_handler(sig, stop.set)
    running = await start(config_path)
    await stop.wait()
    await running.stop()


def serve_forever(config_path: Path) -> None:
    """`sidecar serve --config PATH`: run on uvloop until SIGTERM/SIGINT, then drain and exit 0."""
    import uvloop

    uvloop.run(run(config_path.absolute()))
