"""The admin port (docs/reference.md#admin-port): /healthz, /readyz, /metrics. Never on the proxy port."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from sidecar.state import STATE, State


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "alive"})


async def readyz(request: web.Request) -> web.Response:
    """200 once serving, 503 while starting or draining.

    A failing credits ledger does not make the pod unready (traffic that needs no
    ledger is still served), but the body says so under `ledger` (absent when no
    ledger is in use): `status` `ok`/`failing`, `on_unavailable`, `pending_usd`
    (spend not yet written), `error`.
    """
    state = request.app[STATE]
    if state.draining:
        body: dict[str, Any] = {"status": "draining"}
        status = 503
    elif not state.ready:
        body, status = {"status": "starting"}, 503
    else:
        body, status = {"status": "ready"}, 200
    ledger = state.billing.ledger_status()
    if ledger is not None:
        body["ledger"] = ledger
    return web.json_response(body, status=status)


async def metrics(request: web.Request) -> web.Response:
    body = request.app[STATE].metrics.render()
    return web.Response(body=body, headers={"content-type": CONTENT_TYPE_LATEST})


def build_admin_app(state: State) -> web.Application:
    app = web.Application()
    app[STATE] = state
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app
