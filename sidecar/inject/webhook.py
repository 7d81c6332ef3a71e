"""The mutating admission webhook: aiohttp over TLS (docs/kubernetes.md#the-injector).

POST /mutate answers AdmissionReviews (`review`), GET /healthz says the
process is up. One JSON line per review on stderr, with names only — never
the pod's contents. The serving certificate is re-read when its files change
(cert-manager renews it in place): new connections get the new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Final

from aiohttp import web

from sidecar.config import HostPort
from sidecar.errors import UserError
from sidecar.inject.annotations import SidecarSettings
from sidecar.inject.review import MAX_REVIEW_BYTES, BadReview, review
from sidecar.logs import OpLog, route_library_logs

#: How often the certificate files are checked for a renewal.
CERT_POLL_S: Final = 10.0
_DEFAULTS: Final = web.AppKey("defaults", SidecarSettings)
_LOG: Final = web.AppKey("log", OpLog)


class ServingCert:
    """The TLS certificate and key, swapped for new connections when the files change.

    The listening context hands each handshake to the newest context (its
    `sni_callback` runs for every ClientHello, SNI or not). A pair that does not
    load — say, caught between two writes — is skipped; the last good one stays.
    """

    def __init__(self, cert: Path, key: Path) -> None:
        self.cert, self.key = cert, key
        self._signature = self._stat()
        self._current = self._load()  # the first load must succeed: errors reach the caller
        self.listening = self._new_context()
        self.listening.sni_callback = self._select

    def _new_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx

    def _load(self) -> ssl.SSLContext:
        ctx = self._new_context()
        ctx.load_cert_chain(self.cert, self.key)
        return ctx

    def _select(self, conn: ssl.SSLObject | ssl.SSLSocket, _name: str | None,
                _ctx: ssl.SSLContext) -> None:  # fmt: skip
        conn.context = self._current

    def _stat(self) -> tuple[object, ...]:
        sig: list[object] = []
        for path in (self.cert, self.key):
            try:
                st = os.stat(os.path.realpath(path))
                sig.append((st.st_ino, st.st_size, st.st_mtime_ns))
            except OSError as exc:
                sig.append(exc.errno)
        return tuple(sig)

    def reload_if_changed(self) -> bool | None:
        """True when a new pair was loaded, False when it did not load, None when unchanged."""
        signature = self._stat()
        if signature == self._signature:
            return None
        try:
            self._current = self._load()
        except (OSError, ssl.SSLError):
            return False  # retried at the next poll: the signature is not taken
        self._signature = signature
        return True


_CERTS: Final = web.AppKey("certs", ServingCert)


async def _mutate(request: web.Request) -> web.Response:
    started = time.monotonic()
    log = request.app[_LOG]
    body = await request.read()  # over client_max_size: 413 from aiohttp
    try:
        reviewed = review(body, request.app[_DEFAULTS])
    except BadReview as exc:
        log.warning("admission_refused", status=400, reason=str(exc))
        raise web.HTTPBadRequest(text=f"{exc}\n") from None
    level = "warning" if reviewed.warnings else "info"
    log.log(level, "admission", uid=reviewed.uid, namespace=reviewed.namespace,
            pod=reviewed.pod, outcome=reviewed.outcome, warnings=list(reviewed.warnings),
            ms=round((time.monotonic() - started) * 1000, 2))  # fmt: skip
    return web.json_response(reviewed.answer)


async def _healthz(_request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def _watch_certs(app: web.Application) -> AsyncIterator[None]:
    certs = app.get(_CERTS)
    task = None if certs is None else asyncio.create_task(_poll(certs, app[_LOG]))
    yield
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _poll(certs: ServingCert, log: OpLog) -> None:
    while True:
        await asyncio.sleep(CERT_POLL_S)
        reloaded = certs.reload_if_changed()
        if reloaded is True:
            log.info("certificate_reloaded", cert=str(certs.cert))
        elif reloaded is False:
            log.error("certificate_reload_failed", cert=str(certs.cert),
                      note="still serving the previous certificate")  # fmt: skip


def make_app(
    defaults: SidecarSettings, log: OpLog, certs: ServingCert | None = None
) -> web.Application:
    app = web.Application(client_max_size=MAX_REVIEW_BYTES)
    app[_DEFAULTS] = defaults
    app[_LOG] = log
    if certs is not None:
        app[_CERTS] = certs
    app.cleanup_ctx.append(_watch_certs)
    app.router.add_post("/mutate", _mutate)
    app.router.add_get("/healthz", _healthz)
    return app


async def serve(listen: HostPort, certs: ServingCert, defaults: SidecarSettings,
                log: OpLog) -> None:  # fmt: skip
    """Serve until SIGTERM or SIGINT; the `listening` line names the bound address."""
    runner = web.AppRunner(make_app(defaults, log, certs), access_log=None,
                           shutdown_timeout=5.0)  # fmt: skip
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    route_library_logs(log)  # aiohttp's own lines: JSON, never raw request bytes
    try:
        site = web.TCPSite(runner, listen.host, listen.port, ssl_context=certs.listening)
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise UserError(f"cannot listen on {listen}: {exc.strerror}") from None
    try:
        port = int(runner.addresses[0][1])
        log.log("info", "listening", always=True, address=f"https://{listen.host}:{port}",
                image=defaults.image)  # fmt: skip
        await stop.wait()
        log.info("stopping")
    finally:
        await runner.cleanup()
