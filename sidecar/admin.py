"""The admin port (docs/reference.md#admin-port): /healthz, /readyz, /metrics, /keys. Never on the proxy port."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from sidecar.health import HealthSnapshot
from sidecar.quota import QuotaBook
from sidecar.runtime import KeyRef
from sidecar.state import STATE, State

#: The wall clock `GET /keys` converts deadlines with (injectable for tests).
WALL_CLOCK: web.AppKey[Callable[[], float]] = web.AppKey("sidecar_wall_clock")


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
    if state.shared is not None:  # traffic goes on without it: never a reason to be unready
        body["shared_state"] = {"status": "ok" if state.shared.up else "local"}
    return web.json_response(body, status=status)


async def metrics(request: web.Request) -> web.Response:
    body = request.app[STATE].metrics.render()
    return web.Response(body=body, headers={"content-type": CONTENT_TYPE_LATEST})


def _wall_iso(seconds: float) -> str:
    """Milliseconds: the monotonic → wall conversion moves by microseconds between calls."""
    text = datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


def keys_report(
    key_labels: Mapping[str, tuple[KeyRef, ...]],
    snapshot: HealthSnapshot,
    wall_now: float,
    quota: QuotaBook | None = None,
) -> list[dict[str, Any]]:
    """The `GET /keys` body: one entry per way a key appears and per scope of its health.

    Deadlines on the health (monotonic) clock become wall-clock UTC here, from
    `wall_now` taken with the snapshot; so do the quota readings' reset times (the
    quota book keeps the same clock). Never a key value or a health id.
    """
    out: list[dict[str, Any]] = []
    headroom: dict[str, list[dict[str, Any]]] = {}
    for scope in snapshot.scopes:
        until = None
        if scope.until is not None:
            until = _wall_iso(wall_now + (scope.until - snapshot.now))
        hid = scope.health_id
        if hid not in headroom:
            headroom[hid] = _quota_of(quota, hid, snapshot.now, wall_now) if quota else []
        for ref in key_labels.get(hid, ()):
            out.append({
                "provider": ref.provider,
                "source": ref.source,
                "key_id": ref.key_id,
                "access_key": ref.access_key or None,
                "model": scope.model,
                "state": scope.state.value,
                "until": until,
                "reason": scope.reason.value if scope.reason else None,
                "last_status": scope.last_status,
                "quota": headroom[hid],
            })  # fmt: skip
    out.sort(key=lambda e: (e["provider"], e["source"], e["key_id"], e["access_key"] or "",
                            e["model"] is not None, e["model"] or ""))  # fmt: skip
    return out


def _quota_of(quota: QuotaBook, hid: str, now: float, wall_now: float) -> list[dict[str, Any]]:
    """What the provider's headers last said is left for one key, per model and kind."""
    return [
        {
            "model": model,
            "kind": r.kind.value,
            "remaining": r.remaining,
            "limit": r.limit,
            "reset": _wall_iso(wall_now + (r.reset_at - now)) if r.reset_at is not None else None,
        }
        for model, r in quota.readings(hid)
    ]


async def keys(request: web.Request) -> web.Response:
    """Every key of the current runtime and its health; see `keys_report`."""
    state = request.app[STATE]
    key_labels = state.runtime.key_labels
    snapshot = state.health.snapshot(key_labels)
    body = keys_report(key_labels, snapshot, request.app[WALL_CLOCK](), state.quota)
    return web.json_response({"keys": body})


def build_admin_app(
    state: State, *, wall_clock: Callable[[], float] = time.time
) -> web.Application:
    app = web.Application()
    app[STATE] = state
    app[WALL_CLOCK] = wall_clock
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/keys", keys)
    return app
