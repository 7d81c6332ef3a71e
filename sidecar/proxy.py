"""The proxy handler: runs one request's plan against the upstreams.

Per request (STYLE §7): authenticate, read the body once, build the plan,
check credits. Per attempt: rebuild headers and body for the candidate, send,
classify; fail over only until the first byte reaches the caller. The pure
parts live in `plan`, `keys`, `health`, `models`; this module does the I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import time
from dataclasses import dataclass, field
from typing import Any, Final

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from sidecar import inbound
from sidecar.errors import ErrorCode, ProxyError
from sidecar.health import (
    Outcome,
    classify_status,
    is_model_level_error,
    is_quota_exhausted,
    parse_retry_after,
    same_candidate_wait,
)
from sidecar.inflight import InFlight
from sidecar.keys import KeySource
from sidecar.models import ResolvedModel, fallbacks_for
from sidecar.plan import Candidate, Plan, Target, build_plan, listable_models, resolve_targets
from sidecar.providers import Adapter, adapter_for, auth_header
from sidecar.runtime import AccessKey, Runtime
from sidecar.secret import SENSITIVE_HEADERS, Secret, mask_key_fragments
from sidecar.state import State
from sidecar.upstream_url import explicit_tail, upstream_url
from sidecar.usage import Usage, usage_from_tail
from sidecar.vault import hash_access_key

HOP_BY_HOP: Final = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
     "trailers", "transfer-encoding", "upgrade", "host", "content-length"}
)  # fmt: skip
#: Request headers never forwarded: hop-by-hop, credentials, and encodings aiohttp negotiates
#: itself; the body goes out decoded (`inbound.decode_body`), so never under its old encoding.
_DROP_REQUEST: Final = (
    HOP_BY_HOP | SENSITIVE_HEADERS | {"accept-encoding", "expect", "content-encoding"}
)
#: Response headers never relayed: aiohttp decompresses and re-frames the body.
_DROP_RESPONSE: Final = HOP_BY_HOP | {"content-encoding", "set-cookie"}
_FAILED_BODY_LIMIT: Final = 1 << 20
#: A successful JSON answer is read whole (for metering, and so a body that breaks can
#: still fail over) up to this size; a larger one is relayed as it arrives.
_READ_WHOLE_LIMIT: Final = 8 << 20
#: How much of the end of an answer relayed unread is kept to find its `usage`.
_USAGE_TAIL: Final = 64 << 10
#: The sidecar's own answer to `GET`/`HEAD /` (coding agents probe it on start).
_ROOT_BODY: Final = b'{"status":"ok","service":"ai-gateway-sidecar"}'
#: Timeouts (docs/reference.md#timeouts): `per_request` is the attempt's own timer (connect, send, headers).
#: `stream_idle` bounds each gap after that: by aiohttp's per-read timer when it cannot
#: fire before the attempt's timer (`per_request <= stream_idle`, the default), else by
#: an idle timer in the relay.
_NO_CLIENT_TIMEOUT: Final = aiohttp.ClientTimeout(
    total=None, connect=None, sock_connect=None, sock_read=None
)


@functools.lru_cache(maxsize=8)
def _read_timeout(stream_idle: float) -> aiohttp.ClientTimeout:
    """aiohttp's own per-read timer, re-armed natively on every chunk the upstream sends."""
    return aiohttp.ClientTimeout(total=None, connect=None, sock_connect=None, sock_read=stream_idle)


#: Precomputed status label strings.
_STATUS: Final = {code: str(code) for code in range(100, 600)}
#: Status recorded (metrics, access log) when the caller disconnects first, as nginx does.
CLIENT_CLOSED: Final = 499


#: A failover-status answer kept in case it is the last one: (status, headers, body).
_Failed = tuple[int, "CIMultiDictProxy[str]", bytes]


@dataclass(slots=True)
class _Result:
    """What one attempt produced."""

    outcome: Outcome
    upstream: aiohttp.ClientResponse | None = None  # an answer for the caller
    body: bytes | None = None  # its body, when read whole (JSON)
    failed: _Failed | None = None  # a failover-status answer
    retry_after: float | None = None
    quota: bool = False
    timed_out: bool = False
    native_idle: bool = False  # stream gaps are bounded by aiohttp's per-read timer
    prefix: bytes = b""  # what was read of an answer too large to hold: relayed first


@dataclass(slots=True)
class Exchange:
    """What one request accumulates across its attempts; becomes the access-log line."""

    request: web.Request
    fmt: str
    runtime: Runtime
    started: float
    request_id: str
    access: AccessKey | None = None
    candidate: Candidate | None = None
    attempts: int = 0
    upstream_wait: float = 0.0
    status: int = 0
    usage: Usage | None = None
    rejected: list[str] = field(default_factory=list)
    overhead: float | None = None
    token: Secret | None = None  # the caller's credential as sent: stripped from the query
    #: the provider the request was resolved to, for refusals made before any key was chosen
    resolved_provider: str = ""
    body_size: int = 0
    streaming: bool = False  # response headers sent: no failover, and a cut breaks a stream

    @property
    def transport(self) -> asyncio.Transport | None:
        return self.request.transport

    @property
    def provider(self) -> str:
        return self.candidate.provider.id if self.candidate else self.resolved_provider

    def sidecar_headers(self) -> dict[str, str]:
        h = {"x-sidecar-request-id": self.request_id}
        c = self.candidate
        if c is not None:
            h["x-sidecar-provider"] = c.provider.id
            h["x-sidecar-model"] = c.model.upstream if c.model else ""
            h["x-sidecar-key-source"] = c.key.source.value
            h["x-sidecar-key-id"] = c.key.key_id
            h["x-sidecar-attempts"] = str(self.attempts)
            if self.rejected:
                h["x-sidecar-rejected-models"] = inbound.rejected_header(self.rejected)
            self.overhead = time.perf_counter() - self.started - self.upstream_wait
            h["x-sidecar-overhead-ms"] = f"{self.overhead * 1000:.3f}"
        return h


class Proxy:
    def __init__(self, state: State) -> None:
        self.state = state
        self.inflight = InFlight()  # what the shutdown drain waits for

    # ----------------------------------------------------------------- routes

    async def openai(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "openai", None)

    async def anthropic(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "anthropic", None)

    async def explicit(self, request: web.Request) -> web.StreamResponse:
        runtime = self.state.runtime
        provider = runtime.providers.get(request.match_info["provider"])
        if provider is None:
            return await self.not_found(request)
        return await self._handle(request, provider.format, provider.id)

    async def models(self, request: web.Request) -> web.StreamResponse:
        runtime = self.state.runtime
        ex = self._exchange(request, "openai", runtime)
        try:
            inbound.check_target(request.raw_path)
            access, _ = self._authenticate(ex)
        except ProxyError as err:
            return await self._finish(ex, self._error(ex, err))
        data = []
        for model, owner in listable_models(runtime, access):
            data.append({"id": model, "object": "model", "created": 0, "owned_by": owner})
        ex.status = 200
        resp = web.Response(body=orjson.dumps({"object": "list", "data": data}),
                            content_type="application/json", headers=ex.sidecar_headers())  # fmt: skip
        return await self._finish(ex, resp)

    async def not_found(self, request: web.Request) -> web.StreamResponse:
        fmt = "anthropic" if "anthropic-version" in request.headers else "openai"
        ex = self._exchange(request, fmt, self.state.runtime)
        with contextlib.suppress(ProxyError):  # who asked, for the access log only
            self._authenticate(ex)
        return await self._finish(
            ex, self._error(ex, ProxyError(ErrorCode.ROUTE_NOT_FOUND, "no such route"))
        )

    async def root(self, request: web.Request) -> web.StreamResponse:
        """`GET`/`HEAD /` and `/{provider}`: answered here, not counted as traffic.

        Coding agents probe the base URL when they start; a 404 there would fill the
        request metrics and the access log with noise.
        """
        provider = request.match_info.get("provider")
        if provider is not None and provider not in self.state.runtime.providers:
            return await self.not_found(request)
        return web.Response(body=_ROOT_BODY, content_type="application/json")

    # ----------------------------------------------------------------- request

    def _exchange(self, request: web.Request, fmt: str, runtime: Runtime) -> Exchange:
        rid = inbound.clean_request_id(request.headers.get("x-request-id"))
        return Exchange(request, fmt, runtime, time.perf_counter(), rid)

    async def _handle(
        self, request: web.Request, fmt: str, explicit: str | None
    ) -> web.StreamResponse:
        ex = self._exchange(request, fmt, self.state.runtime)
        self.inflight.enter(ex)
        try:
            try:
                inbound.check_target(request.raw_path)
                resp = await self._proxy(ex, explicit)
            except ProxyError as err:
                resp = self._error(ex, err)
            except (asyncio.CancelledError, ConnectionResetError):
                ex.status = CLIENT_CLOSED  # the caller went away: account, then let it unwind
                self._account(ex)
                raise
            except Exception as exc:  # the outermost boundary: a bug must still be accounted
                ex.status = 500
                self.state.oplog.error("request_failed", request_id=ex.request_id,
                                       error=type(exc).__name__)  # fmt: skip
                self._account(ex)
                raise
            return await self._finish(ex, resp)
        finally:
            self.inflight.leave(ex)

    def _authenticate(self, ex: Exchange) -> tuple[AccessKey | None, Secret | None]:
        """The access key, or (passthrough) the caller's own credential."""
        headers = ex.request.headers
        token = headers.get("authorization", "")
        if token[:7].lower() == "bearer ":
            token = token[7:].strip()
        else:
            token = headers.get("x-api-key", "").strip()
        if not token:
            raise ProxyError(
                ErrorCode.ACCESS_KEY_INVALID,
                "missing access key (Authorization: Bearer or x-api-key)",
            )
        inbound.check_token(token)
        ex.token = Secret(token)
        access = ex.runtime.access_keys.get(hash_access_key(token))
        if access is not None and not access.revoked:
            ex.access = access
            return access, None
        if access is None and ex.runtime.config.passthrough:
            return None, Secret(token)
        # Unknown and revoked keys get the same answer: it tells nothing about which keys exist.
        raise ProxyError(ErrorCode.ACCESS_KEY_INVALID, "invalid access key")

    async def _read_body(self, request: web.Request, limit: int, wait: float) -> bytes:
        """The whole body, decoded, at most `limit` bytes, within `wait` seconds (else 408)."""
        if request.content_length is not None and request.content_length > limit:
            raise ProxyError(ErrorCode.REQUEST_TOO_LARGE, f"request body over {limit} bytes")
        if request.content_length is not None and request.content.is_eof():
            body = await request.read()  # already all here (the usual case): no timer needed
            return self._decoded(request, body, limit)
        try:
            async with asyncio.timeout(wait):
                if request.content_length is not None:
                    body = await request.read()  # size known and within the limit: one read
                else:
                    chunks: list[bytes] = []
                    size = 0
                    async for chunk in request.content.iter_chunked(1 << 16):
                        size += len(chunk)
                        if size > limit:
                            raise ProxyError(ErrorCode.REQUEST_TOO_LARGE,
                                             f"request body over {limit} bytes")  # fmt: skip
                        chunks.append(chunk)
                    body = b"".join(chunks)
        except TimeoutError:
            raise ProxyError(
                ErrorCode.REQUEST_TIMEOUT, f"request body not received within {wait:g} s"
            ) from None
        return self._decoded(request, body, limit)

    @staticmethod
    def _decoded(request: web.Request, body: bytes, limit: int) -> bytes:
        encodings = request.headers.getall("content-encoding", ())
        return inbound.decode_body(body, ",".join(encodings), limit) if encodings else body

    async def _proxy(self, ex: Exchange, explicit: str | None) -> web.StreamResponse:
        runtime = ex.runtime
        cfg = runtime.config
        request = ex.request
        if explicit is not None:
            inbound.check_method(request.method)
        access, passthrough_key = self._authenticate(ex)
        body = await self._read_body(request, cfg.limits.max_body_bytes, cfg.timeouts.client_body)
        ex.body_size = len(body)

        data: dict[str, Any] | None = None
        if body:
            # Explicit routes may carry other media (uploads); a JSON-looking body is read
            # whatever its content-type, so scope checks on `model` cannot be sidestepped.
            must_be_json = explicit is None or "json" in request.headers.get("content-type", "")
            try:
                parsed = inbound.parse_json(body)
            except ProxyError:
                if must_be_json:
                    raise
                parsed = None
            if isinstance(parsed, dict):
                data = parsed
            elif must_be_json:
                raise ProxyError(ErrorCode.INVALID_JSON, "request body must be a JSON object")
        names = inbound.model_names(data, required=explicit is None)

        if explicit is None:
            # The config's `fallbacks:` apply when the caller sent no `models` of its own.
            fallbacks = (
                () if data is None or "models" in data else fallbacks_for(cfg.fallbacks, names[0])
            )
            targets = resolve_targets(runtime, ex.fmt, names, fallbacks)
            path = "/" + request.path.removeprefix("/v1/")
        else:
            provider = runtime.providers[explicit]
            targets = [
                Target(provider, _explicit_model(runtime, provider.id, n)) for n in names
            ] or [Target(provider, None)]
            path = explicit_tail(request.raw_path.partition("?")[0], provider.id)
            if path.startswith("/v1/") and provider.base_url.endswith("/v1"):
                path = path[3:]  # SDKs that add /v1 themselves (Anthropic's) must not get /v1/v1
        ex.resolved_provider = targets[0].provider.id
        try:
            plan = build_plan(
                runtime, access, targets, self.state.health, passthrough_key=passthrough_key
            )
        except ProxyError as err:
            ex.resolved_provider = err.provider or ex.resolved_provider
            if (
                err.code in (ErrorCode.NO_PROVIDER_KEY, ErrorCode.ALL_KEYS_COOLING_DOWN)
                and err.provider
            ):
                reason = "no_key" if err.code is ErrorCode.NO_PROVIDER_KEY else "all_cooling"
                self.state.metrics.no_key_available.labels(err.provider, reason).inc()
            raise
        ex.rejected = plan.rejected_models
        if plan.managed_providers:
            await self._require_credits(ex, plan)
        return await self._run(ex, plan, body, data, path)

    async def _require_credits(self, ex: Exchange, plan: Plan) -> None:
        """Managed keys are charged to the access key: refuse before any upstream call when broke."""
        assert ex.access is not None
        if await self.state.billing.has_credits(ex.access):
            return
        plan.candidates = [
            c for c in plan.candidates if c.provider.id not in plan.managed_providers
        ]
        for pid in plan.managed_providers:
            self.state.metrics.no_key_available.labels(pid, "credits_exhausted").inc()
            ex.resolved_provider = pid
        if not plan.candidates:
            raise ProxyError(
                ErrorCode.CREDITS_EXHAUSTED, f"access key {ex.access.name!r} has no credits left"
            )

    # ----------------------------------------------------------------- attempts

    async def _run(
        self, ex: Exchange, plan: Plan, body: bytes, data: dict[str, Any] | None, path: str
    ) -> web.StreamResponse:
        cfg = ex.runtime.config
        metrics = self.state.metrics
        health = self.state.health
        adapter = adapter_for(ex.fmt)
        token = ex.token.reveal() if ex.token else ""
        base_headers = _forward_headers(ex.request.headers, token)
        query = inbound.strip_credentials(ex.request.rel_url.raw_query_string, (token,))
        stream = bool(data and data.get("stream") is True)
        deadline = ex.started + cfg.timeouts.total
        payloads: dict[str | None, tuple[bytes, bool]] = {}
        last: tuple[Candidate, _Failed] | None = None  # the last failover-status response
        failed: tuple[str, str] | None = (
            None  # (provider, outcome) of the attempt to fail over from
        )
        timed_out = False

        gone_models: set[str] = set()  # models that answered "not this model" (model-level error)
        retry = cfg.failover.retry
        stop = False
        for i, cand in enumerate(plan.candidates):
            key = cand.key
            tracked = (
                key.source is not KeySource.PASSTHROUGH
            )  # a caller's own key has no shared health
            model_name = cand.model.upstream if cand.model else None
            retries_left = retry.attempts
            while True:  # one candidate, tried again after a short wait when that may help
                if ex.attempts >= cfg.failover.max_attempts:
                    stop = True
                    break
                if model_name in gone_models:
                    break  # every key would get the same answer for this model
                if (
                    ex.attempts
                    and tracked
                    and health.cooling_until(key.health_id, model_name or "")
                ):
                    break  # cooled down by an earlier attempt of this request (key, or key and model)
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    timed_out = stop = True
                    break
                if failed is not None:  # counted only when another attempt really follows
                    metrics.failovers(*failed).inc()
                    failed = None
                ex.attempts += 1
                ex.candidate = cand
                metrics.key_selections(*key.labels).inc()
                if model_name not in payloads:
                    payloads[model_name] = _payload(body, data, model_name, adapter, path, stream)
                payload, strip_usage = payloads[model_name]
                url, headers = _upstream_request(cand, path, query, base_headers)

                res = await self._attempt(ex, url, headers, payload, remaining, deadline)
                metrics.upstream_attempts(*key.labels, res.outcome.value).inc()
                if (
                    res.body is not None
                    and res.upstream is not None
                    and model_name is not None
                    and is_model_level_error(
                        res.upstream.status, res.body, cfg.failover.next_model_on_codes
                    )
                    and _another_model_follows(plan.candidates, i, model_name)
                ):  # the prompt is too long for this model, or it is not here: the next model may answer
                    gone_models.add(model_name)
                    last = (cand, (res.upstream.status, res.upstream.headers, res.body))
                    failed = (key.provider, res.outcome.value)
                    self.state.oplog.info("next_model", request_id=ex.request_id, provider=key.provider,
                                          model=model_name, status=res.upstream.status)  # fmt: skip
                    break
                if res.upstream is not None:  # a response for the caller: no failover from here on
                    if tracked:
                        health.record(key.health_id, res.outcome, cfg.failover.cooldown,
                                      model=model_name or "", status=res.upstream.status)  # fmt: skip
                    if res.body is not None:
                        return self._respond(ex, res.upstream, res.body, adapter)
                    return await self._relay_stream(
                        ex, res.upstream, adapter, strip_usage, res.native_idle, res.prefix
                    )
                wait = None
                if retries_left and ex.attempts < cfg.failover.max_attempts:
                    wait = same_candidate_wait(res.outcome, res.retry_after, res.quota, retry,
                                               random.random())  # fmt: skip
                    if wait is not None and time.perf_counter() + wait >= deadline:
                        wait = None  # no time left to wait: the next candidate gets what remains
                waited_out = wait is not None and res.outcome is Outcome.RATE_LIMITED
                if tracked and not waited_out and health.record(
                    key.health_id, res.outcome, cfg.failover.cooldown, model=model_name or "",
                    retry_after=res.retry_after, quota_exhausted=res.quota,
                    status=res.failed[0] if res.failed else None,
                ):  # fmt: skip
                    self.state.oplog.info("key_cooling", provider=key.provider, source=key.source.value,
                                          key_id=key.key_id, model=model_name,
                                          outcome=res.outcome.value)  # fmt: skip
                if res.failed is not None:
                    last = (cand, res.failed)
                failed = (key.provider, res.outcome.value)
                if res.timed_out:
                    timed_out = stop = True
                    break
                if wait is None:
                    break
                retries_left -= 1
                await asyncio.sleep(wait)
            if stop:
                break

        if last is not None:  # every candidate failed: the caller gets the last upstream answer
            ex.candidate, (status, failed_headers, failed_body) = last
            ex.status = status
            out = _relay_headers(failed_headers)
            out.update(ex.sidecar_headers())
            body = _masked(status, failed_body, ex.candidate)
            return web.Response(status=status, body=body, headers=out)
        if timed_out:
            raise ProxyError(
                ErrorCode.GATEWAY_TIMEOUT, "no upstream answered within timeouts.total"
            )
        raise ProxyError(ErrorCode.UPSTREAM_UNAVAILABLE, "no upstream answered")

    async def _attempt(
        self,
        ex: Exchange,
        url: URL,
        headers: CIMultiDict[str],
        payload: bytes,
        remaining: float,
        deadline: float,
    ) -> _Result:
        """One upstream attempt, up to the point where its answer could go to the caller.

        A failover-status answer is read (bounded) and returned as `failed`; a JSON
        answer is read whole inside the attempt, so a body that breaks before any byte
        reached the caller still fails over; a stream is returned unread.
        """
        state = self.state
        cfg = ex.runtime.config
        key = ex.candidate.key if ex.candidate else None
        assert key is not None
        sent = time.perf_counter()
        upstream: aiohttp.ClientResponse | None = None
        body: bytes | None = None
        failover = False
        loop = asyncio.get_running_loop()
        idle = cfg.timeouts.stream_idle
        native_idle = cfg.timeouts.per_request <= idle
        try:
            # One timer per attempt: per_request bounds connect + send + the wait for the
            # response headers; then, for an answer read whole, stream_idle bounds its body.
            async with asyncio.timeout(min(cfg.timeouts.per_request, remaining)) as timer:
                upstream = await state.session.request(
                    ex.request.method, url, data=payload, headers=headers,
                    timeout=_read_timeout(idle) if native_idle else _NO_CLIENT_TIMEOUT,
                    allow_redirects=False,
                )  # fmt: skip
                ttfb = time.perf_counter() - sent
                state.metrics.upstream_ttfb(key.provider).observe(ttfb)
                failover = upstream.status in cfg.failover.on_status
                if not failover and "json" not in upstream.headers.get("content-type", ""):
                    ex.upstream_wait += ttfb  # SSE or other media: relayed as it arrives
                    outcome = classify_status(upstream.status)
                    return _Result(outcome, upstream=upstream, native_idle=native_idle)
                # The body is still before the caller's first byte: timeouts.total bounds it too.
                timer.reschedule(
                    loop.time() + min(idle, max(0.001, deadline - time.perf_counter()))
                )
                body, whole = await _read_body_of(
                    upstream, _FAILED_BODY_LIMIT if failover else _READ_WHOLE_LIMIT
                )
                if not whole and not failover:  # too large to hold: relay it as it arrives
                    ex.upstream_wait += time.perf_counter() - sent
                    return _Result(classify_status(upstream.status), upstream=upstream,
                                   native_idle=native_idle, prefix=body)  # fmt: skip
        except (TimeoutError, aiohttp.ClientError) as exc:
            if upstream is None or not failover:  # no answer, or its body broke: next candidate
                if upstream is not None:
                    upstream.release()
                ex.upstream_wait += time.perf_counter() - sent
                if isinstance(exc, TimeoutError):
                    state.oplog.warning("upstream_timeout", request_id=ex.request_id,
                                        provider=key.provider, key_id=key.key_id,
                                        waited_s=round(time.perf_counter() - sent, 3))  # fmt: skip
                    return _Result(Outcome.TIMEOUT, timed_out=time.perf_counter() >= deadline)
                state.oplog.warning("upstream_error", request_id=ex.request_id, provider=key.provider,
                                    key_id=key.key_id, error=type(exc).__name__)  # fmt: skip
                return _Result(Outcome.CONNECT_ERROR)
            body = b""  # a failover-status answer whose body did not arrive: still that status
        ex.upstream_wait += time.perf_counter() - sent
        upstream.release()
        status = upstream.status
        outcome = classify_status(status)
        if not failover:
            return _Result(outcome, upstream=upstream, body=body)
        state.oplog.warning("upstream_failed", request_id=ex.request_id, provider=key.provider,
                            key_id=key.key_id, status=status, outcome=outcome.value)  # fmt: skip
        res = _Result(outcome, failed=(status, upstream.headers, body or b""))
        if status == 429:
            res.retry_after = parse_retry_after(upstream.headers.get("retry-after"))
            res.quota = is_quota_exhausted(body or b"")
        return res

    def _respond(
        self, ex: Exchange, upstream: aiohttp.ClientResponse, body: bytes, adapter: Adapter
    ) -> web.Response:
        """Relay a JSON answer read whole (its usage is metered from the body)."""
        ex.status = upstream.status
        if upstream.status < 300:
            ex.usage = adapter.usage_from_body(body)
        headers = _relay_headers(upstream.headers)
        headers.update(ex.sidecar_headers())
        body = _masked(upstream.status, body, ex.candidate)
        return web.Response(status=upstream.status, body=body, headers=headers)

    async def _relay_stream(
        self,
        ex: Exchange,
        upstream: aiohttp.ClientResponse,
        adapter: Adapter,
        strip_usage: bool,
        native_idle: bool,
        prefix: bytes = b"",
    ) -> web.StreamResponse:
        """Relay chunk by chunk as they arrive. From the first byte on there is no failover.

        `prefix` is what was already read of an answer too large to hold whole; such
        an answer is metered from its tail (`usage` comes last)."""
        state = self.state
        ex.status = upstream.status
        headers = _relay_headers(upstream.headers)
        headers.update(ex.sidecar_headers())
        sse = "text/event-stream" in upstream.headers.get("content-type", "")
        meter = adapter.stream_meter(strip_usage) if sse and upstream.status < 300 else None
        usage_tail = bytearray(prefix[-_USAGE_TAIL:]) if prefix else None
        content = upstream.content
        done = False
        try:
            resp = web.StreamResponse(status=upstream.status, headers=headers)
            await resp.prepare(ex.request)
            ex.streaming = True
            if prefix:
                await resp.write(prefix)
            # stream_idle bounds every gap: natively (aiohttp's per-read timer) when it can,
            # else our own timer, re-armed per chunk, which also covers a caller taking nothing.
            loop = asyncio.get_running_loop()
            idle = ex.runtime.config.timeouts.stream_idle
            async with contextlib.nullcontext() if native_idle else asyncio.timeout(None) as timer:
                while True:
                    t = time.perf_counter()
                    if timer is not None:
                        timer.reschedule(loop.time() + idle)
                    chunk = await content.readany()
                    ex.upstream_wait += time.perf_counter() - t
                    if not chunk:
                        break
                    if usage_tail is not None:
                        usage_tail += chunk
                        del usage_tail[:-_USAGE_TAIL]
                    out = meter.feed(chunk) if meter else chunk
                    if out:
                        await resp.write(out)
            if meter:
                tail = meter.finish()
                if tail:
                    await resp.write(tail)
            done = True
            await resp.write_eof()
            return resp
        except ConnectionResetError:  # writing to a caller that went away
            ex.status = CLIENT_CLOSED
            return resp
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError) as exc:
            transport = ex.request.transport
            if transport is None or transport.is_closing():
                ex.status = CLIENT_CLOSED
                return resp
            cause = "idle_timeout" if isinstance(exc, TimeoutError) else "upstream_closed"
            state.metrics.stream_interruptions.labels(ex.provider, cause).inc()
            key_id = ex.candidate.key.key_id if ex.candidate else ""
            state.oplog.warning("stream_interrupted", request_id=ex.request_id, provider=ex.provider,
                                key_id=key_id, cause=cause)  # fmt: skip
            transport.close()  # end the caller's stream without its terminator: the SDK sees the break
            return resp
        finally:
            upstream.release()
            if usage_tail is not None and upstream.status < 300:
                ex.usage = usage_from_tail(adapter.format, bytes(usage_tail)) or Usage(
                    max(1, ex.body_size // 4), 0
                )
            if meter is not None:
                ex.usage = meter.usage
                if not done:  # broken or abandoned: OpenAI reports usage only at the very end
                    ex.usage = meter.estimate(ex.body_size)
                    state.oplog.info("usage_estimated", request_id=ex.request_id,
                                     input_tokens=ex.usage.input_tokens,
                                     output_tokens=ex.usage.output_tokens)  # fmt: skip

    # ----------------------------------------------------------------- finishing

    def _error(self, ex: Exchange, err: ProxyError) -> web.Response:
        ex.status = err.code.status
        adapter = adapter_for(ex.fmt)
        headers = ex.sidecar_headers() if ex.candidate else {"x-sidecar-request-id": ex.request_id}
        if not err.code.retryable:
            headers["x-should-retry"] = "false"
        if err.retry_after is not None:
            headers["retry-after"] = str(err.retry_after)
        return web.Response(status=err.code.status, body=adapter.error_body(err.code, err.message),
                            content_type="application/json", headers=headers)  # fmt: skip

    async def _finish(self, ex: Exchange, resp: web.StreamResponse) -> web.StreamResponse:
        """Send the response here, not after the handler returns, so a failure to send it
        (after an upstream call was paid for) is in the access log, metrics and spend."""
        if not resp.prepared:
            try:
                await resp.prepare(ex.request)
                await resp.write_eof()
            except (asyncio.CancelledError, ConnectionResetError):
                ex.status = CLIENT_CLOSED
                self._account(ex)
                raise
            except Exception as exc:  # the outermost boundary of this request
                ex.status = 500
                self.state.oplog.error("response_failed", request_id=ex.request_id,
                                       error=type(exc).__name__)  # fmt: skip
                self._account(ex)
                raise
        self._account(ex)
        return resp

    def _account(self, ex: Exchange) -> None:
        """Metrics, metering and the access-log line of one finished request."""
        state = self.state
        duration = time.perf_counter() - ex.started
        overhead = ex.overhead if ex.overhead is not None else duration - ex.upstream_wait
        provider = ex.provider
        m = state.metrics
        m.requests(ex.fmt, provider, _STATUS.get(ex.status) or str(ex.status)).inc()
        m.request_duration(ex.fmt, provider).observe(duration)
        m.overhead(ex.fmt).observe(overhead)
        c = ex.candidate
        usage = ex.usage
        if usage is not None and c is not None:
            state.billing.record(ex.runtime.prices, ex.access, c, usage)
        if state.access_log.enabled:
            state.access_log.write(
                {
                    "ts": time.time(),
                    "request_id": ex.request_id,
                    "access_key": ex.access.name if ex.access else None,
                    "method": ex.request.method,
                    "path": _logged_path(ex),
                    "format": ex.fmt,
                    "provider": provider or None,
                    "model": c.model.upstream if c and c.model else None,
                    "key_source": c.key.source.value if c else None,
                    "key_id": c.key.key_id if c else None,
                    "attempts": ex.attempts,
                    "status": ex.status,
                    "duration_ms": round(duration * 1000, 3),
                    "overhead_ms": round(overhead * 1000, 3),
                    "input_tokens": usage.input_tokens if usage else None,
                    "output_tokens": usage.output_tokens if usage else None,
                }
            )


# --------------------------------------------------------------------------- helpers


def _another_model_follows(candidates: list[Candidate], i: int, model: str) -> bool:
    return any(c.model is not None and c.model.upstream != model for c in candidates[i + 1 :])


def _explicit_model(runtime: Runtime, provider_id: str, name: str) -> ResolvedModel:
    """On `/{provider}/…` the provider is given; a `provider:` prefix on the model is dropped."""
    prefix = provider_id + ":"
    upstream = name[len(prefix) :] if name.startswith(prefix) else name
    return ResolvedModel(name, runtime.providers[provider_id], upstream)


def _payload(
    body: bytes,
    data: dict[str, Any] | None,
    model: str | None,
    adapter: Adapter,
    path: str,
    stream: bool,
) -> tuple[bytes, bool]:
    """The body for one model candidate. The caller's bytes go out untouched when nothing changes."""
    if data is None:
        return body, False
    changes: dict[str, Any] = {}
    if "models" in data:
        changes["models"] = None
    if model is not None and data.get("model") != model:
        changes["model"] = model
    strip = False
    if stream:
        probe = dict(data)
        if isinstance(probe.get("stream_options"), dict):  # never mutate the caller's own dict
            probe["stream_options"] = dict(probe["stream_options"])
        strip = adapter.prepare_stream(path, probe)
        if strip:
            changes["stream_options"] = probe["stream_options"]
    if not changes:
        return body, False
    out = dict(data)
    for k, v in changes.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = v
    return inbound.dump_json(out), strip


def _forward_headers(incoming: CIMultiDictProxy[str], token: str) -> CIMultiDict[str]:
    """End-to-end request headers; never a credential, nor any header carrying the caller's token."""
    out: CIMultiDict[str] = CIMultiDict()
    connection = incoming.get("connection")
    # Headers named in `Connection` are hop-by-hop too (RFC 9110 §7.6.1).
    named = {t.strip().lower() for t in connection.split(",")} if connection else ()
    for name, value in incoming.items():
        lname = name.lower()
        if lname in _DROP_REQUEST or lname in named or lname.startswith("x-sidecar-"):
            continue
        if token and token in value:
            continue
        out.add(name, value)
    return out


def _upstream_request(
    cand: Candidate, path: str, query: str, base: CIMultiDict[str]
) -> tuple[URL, CIMultiDict[str]]:
    """URL and headers for one attempt. `path` is decoded and checked; `query` is raw."""
    p = cand.provider
    if query and p.query:  # the provider's own `query_params` cannot be overridden by the caller
        own = [part.partition("=")[0] for part in p.query.split("&")]
        query = inbound.strip_credentials(query, drop=own)
    params = f"{query}&{p.query}" if query and p.query else (query or p.query)
    url = upstream_url(p.base_url, path, params)
    headers = base.copy()
    for name, secret in p.headers:
        headers[name] = secret.reveal()
    auth = auth_header(p.auth if cand.key.source is not KeySource.PASSTHROUGH else _caller_auth(p.auth),
                       cand.key.secret)  # fmt: skip
    if auth is not None:
        headers[auth[0]] = auth[1]
    return url, headers


def _caller_auth(auth: str) -> str:
    return "bearer" if auth == "none" else auth


def _relay_headers(upstream: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream.items():
        if name.lower() not in _DROP_RESPONSE:
            out.add(name, value)
    return out


async def _read_body_of(upstream: aiohttp.ClientResponse, limit: int) -> tuple[bytes, bool]:
    """An upstream body up to about `limit` decoded bytes, and whether that was all of it.

    aiohttp decompresses in bounded chunks, so a compressed answer never unpacks past
    the limit here. The caller's timer bounds the wait.
    """
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = await upstream.content.readany()
        if not chunk:
            return b"".join(chunks), True
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks), upstream.content.at_eof()


def _masked(status: int, body: bytes, cand: Candidate | None) -> bytes:
    """Auth-error wording may quote part of the provider key: mask it before relaying."""
    if status not in (401, 403) or not body:
        return body
    secrets = [cand.key.secret] if cand is not None and cand.key.secret is not None else []
    return mask_key_fragments(body, secrets)


def _logged_path(ex: Exchange) -> str:
    request = ex.request
    query = request.rel_url.raw_query_string
    if not query:
        return request.path
    tokens = (ex.token.reveal(),) if ex.token else ()
    return f"{request.path}?{inbound.redact_query(query, tokens)}"
