"""The proxy handler (docs/reference.md#failover-and-key-health): one request, start to end.

Per request (STYLE §7): authenticate, read the body once, build the plan, check
credits, then drive the failover engine (`sidecar.failover`) over the attempts:
`upstream` sends and classifies each one, `relay` writes the answer, `accounting`
leaves the metrics, spend and access-log line. A stream that breaks after its first
byte is continued from a candidate that accepts a prefill (`sidecar.resume`), or
ended with an in-band error the SDKs raise.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Callable
from typing import Any, Final

import orjson
from aiohttp import web

from sidecar import inbound, memory
from sidecar.errors import ErrorCode, ProxyError
from sidecar.failover import Attempt, Engine, Report, Stop, StopReason
from sidecar.formats import Adapter, adapter_for
from sidecar.health import (
    OUTCOME_OK,
    Outcome,
    classify_status,
    is_model_level_error,
    is_quota_exhausted,
)
from sidecar.inflight import InFlight
from sidecar.models import ResolvedModel, fallbacks_for
from sidecar.plan import Candidate, Plan, Target, build_plan, listable_models, resolve_targets
from sidecar.proxy import outbound, relay, upstream
from sidecar.proxy.accounting import account
from sidecar.proxy.exchange import CLIENT_CLOSED, Exchange
from sidecar.proxy.outbound import Outbound, Route
from sidecar.proxy.upstream import Failed, Prepared, Result
from sidecar.ratelimits import estimate_tokens
from sidecar.resume import Splice, prefill_body
from sidecar.runtime import AccessKey, Runtime
from sidecar.secret import Secret, mask_key_fragments
from sidecar.state import State
from sidecar.streams import Shape, StreamTracker, error_event, shape_for
from sidecar.translate import Translation
from sidecar.upstream_url import explicit_tail
from sidecar.vault import hash_access_key

#: The sidecar's own answer to `GET`/`HEAD /` (coding agents probe it on start).
_ROOT_BODY: Final = b'{"status":"ok","service":"ai-gateway-sidecar"}'
#: How a break after the first byte counts against the candidate's health.
_BREAK_OUTCOME: Final = {
    "upstream_closed": Outcome.CONNECT_ERROR,
    "idle_timeout": Outcome.TIMEOUT,
    "malformed": Outcome.SERVER_ERROR,
}


class Proxy:
    def __init__(self, state: State) -> None:
        self.state = state
        # what the shutdown drain waits for; after a burst, memory is given back
        self.inflight = InFlight(after_burst=memory.give_back)

    # ----------------------------------------------------------------- routes

    async def openai(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "openai", None)

    async def anthropic(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "anthropic", None)

    async def gemini(self, request: web.Request) -> web.StreamResponse:
        """`POST /v1beta/models/{model}:{action}`: the Gemini API's own routes."""
        return await self._handle(request, "gemini", None)

    async def openai_stored(self, request: web.Request) -> web.StreamResponse:
        """`/v1/responses/{id}` (and its `cancel`, `input_items`): a stored response, at OpenAI."""
        return await self._handle(request, "openai", None)

    async def explicit(self, request: web.Request) -> web.StreamResponse:
        runtime = self.state.runtime
        provider = runtime.providers.get(request.match_info["provider"])
        if provider is None:
            return await self.not_found(request)
        return await self._handle(request, provider.format, provider.id)

    async def models(self, request: web.Request) -> web.StreamResponse:
        """`GET /v1/models` and `GET /v1/models/{id}`: what this access key may use, in the
        Anthropic shape when an Anthropic client asks (`anthropic-version`), else OpenAI's;
        `GET /v1beta/models[/{id}]` in the Gemini API's."""
        runtime = self.state.runtime
        anthropic = "anthropic-version" in request.headers
        gemini = request.path.startswith("/v1beta/")
        fmt = "gemini" if gemini else "anthropic" if anthropic else "openai"
        ex = self._exchange(request, fmt, runtime)
        wanted = request.match_info.get("model")
        if gemini and wanted is not None:
            wanted = wanted.removeprefix("models/")
        try:
            inbound.check_target(request.raw_path)
            access, _ = self._authenticate(ex)
            if wanted is not None:
                inbound.check_model_name(wanted)
        except ProxyError as err:
            return await self._finish(ex, self._error(ex, err))
        listed = [(m, owner) for m, owner in listable_models(runtime, access)
                  if wanted is None or m == wanted]  # fmt: skip
        if wanted is not None and not listed:
            missing = ProxyError(
                ErrorCode.ROUTE_NOT_FOUND, f"no model {wanted!r} for this access key"
            )
            return await self._finish(ex, self._error(ex, missing))
        data = [_model_entry(m, owner, fmt) for m, owner in listed]
        if wanted is not None:
            doc: dict[str, Any] = data[0]
        elif gemini:
            doc = {"models": data}
        elif anthropic:
            doc = {"data": data, "has_more": False, "first_id": data[0]["id"] if data else None,
                   "last_id": data[-1]["id"] if data else None}  # fmt: skip
        else:
            doc = {"object": "list", "data": data}
        ex.status = 200
        resp = web.Response(body=orjson.dumps(doc), content_type="application/json",
                            headers=ex.sidecar_headers())  # fmt: skip
        return await self._finish(ex, resp)

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        """`GET /v1/responses` asking for a WebSocket (the Codex CLI tries that first):
        refused with 426 at once, so the client falls back to HTTPS without retrying."""
        if request.headers.get("upgrade", "").lower() != "websocket":
            return await self.not_found(request)
        ex = self._exchange(request, "openai", self.state.runtime)
        with contextlib.suppress(ProxyError):  # who asked, for the access log only
            self._authenticate(ex)
        err = ProxyError(ErrorCode.WEBSOCKET_UNSUPPORTED,
                         "the Responses API WebSocket mode is not supported here: use HTTPS")  # fmt: skip
        resp = self._error(ex, err)
        resp.force_close()
        return await self._finish(ex, resp)

    async def not_found(self, request: web.Request) -> web.StreamResponse:
        fmt = "anthropic" if "anthropic-version" in request.headers else "openai"
        if request.path.startswith("/v1beta/"):
            fmt = "gemini"
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
        return Exchange(request, fmt, runtime, time.perf_counter(), rid, self.state.loop)

    async def _handle(
        self, request: web.Request, fmt: str, explicit: str | None
    ) -> web.StreamResponse:
        ex = self._exchange(request, fmt, self.state.runtime)
        tracing = self.state.tracing
        if tracing is not None:
            ex.trace = tracing.start_request(fmt, request.method, request.path, request.headers,
                                             ex.request_id)  # fmt: skip
        self.inflight.enter(ex)
        try:
            try:
                inbound.check_target(request.raw_path)
                resp = await self._proxy(ex, explicit)
            except ProxyError as err:
                resp = self._error(ex, err)
            except (asyncio.CancelledError, ConnectionResetError):
                ex.status = CLIENT_CLOSED  # the caller went away: account, then let it unwind
                account(self.state, ex)
                raise
            except Exception as exc:  # the outermost boundary: a bug must still be accounted
                ex.status = 500
                self.state.oplog.error("request_failed", request_id=ex.request_id,
                                       error=type(exc).__name__)  # fmt: skip
                account(self.state, ex)
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
            token = (headers.get("x-api-key") or headers.get("x-goog-api-key") or "").strip()
        if not token and ex.fmt == "gemini":  # the Gemini API also takes its key as `?key=`
            token = ex.request.rel_url.query.get("key", "").strip()
        if not token:
            raise ProxyError(
                ErrorCode.ACCESS_KEY_INVALID,
                "missing access key (Authorization: Bearer, x-api-key or x-goog-api-key)",
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
            # Already all here (the usual case): taken as it is, with no timer and no copy.
            # (request.read() would now give b"": this is the body's only reader.)
            return self._decoded(request, request.content.read_nowait(), limit)
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

        if explicit is None:
            route, names = _caller_route(ex.fmt, request, data)
            if names:
                # The config's `fallbacks:` apply when the caller sent no `models` of its own.
                fallbacks = (
                    () if data is not None and "models" in data
                    else fallbacks_for(cfg.fallbacks, names[0])
                )  # fmt: skip
                # A caller's own key (passthrough) goes only to the provider its first model
                # names: never translated, never to another host through a fallback.
                translate = route.chat and passthrough_key is None
                targets = resolve_targets(runtime, ex.fmt, names, fallbacks, any_format=translate)
                if passthrough_key is not None:
                    targets = [t for t in targets if t.provider.id == targets[0].provider.id]
            else:  # a stored response: no model names it
                targets = [Target(runtime.providers["openai"], None)]
        else:
            names = inbound.model_names(data, required=False)
            provider = runtime.providers[explicit]
            targets = [
                Target(provider, _explicit_model(runtime, provider.id, n)) for n in names
            ] or [Target(provider, None)]
            path = explicit_tail(request.raw_path.partition("?")[0], provider.id)
            for version in ("/v1", "/v1beta"):  # SDKs that add it themselves must not get it twice
                if path.startswith(version + "/") and provider.base_url.endswith(version):
                    path = path[len(version) :]
            stream = bool(data and data.get("stream") is True) or (
                ex.fmt == "gemini" and ":streamGenerateContent" in path
            )
            route = Route(ex.fmt, path, stream, explicit=True)
        ex.resolved_provider = targets[0].provider.id
        try:
            plan = build_plan(runtime, access, targets, self.state.health,
                              passthrough_key=passthrough_key, quota=self.state.quota)  # fmt: skip
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
        if access is not None and access.limits:  # the last check before anything goes upstream
            ex.ticket = await self.state.admission.admit(access, estimate_tokens(ex.body_size))
        return await self._run(ex, plan, body, data, route, frozenset(names))

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
        self,
        ex: Exchange,
        plan: Plan,
        body: bytes,
        data: dict[str, Any] | None,
        route: Route,
        asked: frozenset[str] = frozenset(),
    ) -> web.StreamResponse:
        cfg = ex.runtime.config
        adapter = adapter_for(ex.fmt)
        prep = upstream.prepare(ex)
        shape = shape_for(ex.fmt, route.path) if route.stream else None
        outs = self._outbounds(ex, plan, route, body, data, adapter, asked)
        engine = Engine(plan.candidates, cfg.failover, self.state.health,
                        ex.started + cfg.timeouts.total)  # fmt: skip
        # The last failover-status answer, and the translation its body still needs (an in-band
        # error was read from the translated stream: it is in the caller's format already).
        last: tuple[Candidate, Failed, Translation | None] | None = None
        last_label: str | None = None
        while isinstance(step := engine.next(), Attempt):
            cand = step.candidate
            k = (cand.provider.id, cand.upstream_model)
            out = outs.get(k) or outs.setdefault(k, outbound.build(route, cand, body, data, adapter))
            tracker = _tracker(shape, out, cand) if shape is not None else None
            try:
                res = await self._send(ex, step, prep, out, tracker)
            except asyncio.CancelledError:
                if tracker is not None and tracker.events:  # the upstream had begun: paid for
                    ex.usage = tracker.estimate(ex.body_size)
                raise
            if res.tracker is not None:  # a stream with its first content: the caller's now
                return await self._stream(ex, engine, res, adapter, prep, data, shape, route)
            report = self._classify(ex, res)
            verdict = self._report(ex, engine, cand, report)
            if verdict:
                tr = out.translation
                if res.upstream is None:  # an in-band error that goes back as its status
                    assert res.failed is not None
                    return relay.respond_failed(ex, cand, res.failed, None if res.inband else tr)
                if res.body is not None:
                    return relay.respond(ex, res.upstream, res.body, adapter, tr)
                if tr is not None:  # not JSON, or too large to hold: it cannot be translated
                    return await relay.respond_unreadable(ex, res.upstream, tr)
                return await relay.relay_body(self.state, ex, res.upstream, adapter, res.prefix)
            if res.failed is not None:
                last = (cand, res.failed, None if res.inband else out.translation)
                last_label = ex.translated
        assert isinstance(step, Stop)
        if last is not None:  # every candidate failed: the caller gets the last upstream answer
            ex.translated = last_label
            return relay.respond_failed(ex, *last)
        if step.reason is StopReason.TIMED_OUT:
            raise ProxyError(
                ErrorCode.GATEWAY_TIMEOUT, "no upstream answered within timeouts.total"
            )
        raise ProxyError(ErrorCode.UPSTREAM_UNAVAILABLE, "no upstream answered")

    def _outbounds(
        self,
        ex: Exchange,
        plan: Plan,
        route: Route,
        body: bytes,
        data: dict[str, Any] | None,
        adapter: Adapter,
        asked: frozenset[str],
    ) -> dict[tuple[str, str | None], Outbound]:
        """Check every candidate before anything is sent: a model name the caller sent that
        its upstream's URL cannot carry is the caller's 400 (a config fallback's is left out);
        a candidate the request cannot be translated for is left out, and when that leaves
        none the caller learns what could not be carried. Translated bodies are made here;
        the others when their attempt comes."""
        outs: dict[tuple[str, str | None], Outbound] = {}
        refused: dict[tuple[str, str | None], ProxyError] = {}
        seen: set[tuple[str, str | None]] = set()  # a provider's other keys need no new check
        for cand in plan.candidates:
            k = (cand.provider.id, cand.upstream_model)
            if k in seen:
                continue
            seen.add(k)
            try:
                if route.explicit or cand.provider.format == route.fmt:
                    if cand.provider.upstream.model_in_path:
                        outbound.check(route, cand)
                    continue
                outs[k] = outbound.build(route, cand, body, data, adapter)
            except ProxyError as err:
                own = err.code is ErrorCode.INVALID_REQUEST and (
                    cand.model is None or cand.model.requested in asked
                )
                if own or err.code not in (ErrorCode.TRANSLATION_UNSUPPORTED,
                                           ErrorCode.INVALID_REQUEST):  # fmt: skip
                    raise
                refused[k] = err
                event = ("translation_unsupported" if err.code is ErrorCode.TRANSLATION_UNSUPPORTED
                         else "fallback_unusable")  # fmt: skip
                self.state.oplog.info(event, request_id=ex.request_id, provider=cand.provider.id,
                                      model=k[1], reason=err.message)  # fmt: skip
        if refused:
            kept = [c for c in plan.candidates if (c.provider.id, c.upstream_model) not in refused]
            if not kept:
                first = next(iter(refused.values()))
                ex.resolved_provider = first.provider or ex.resolved_provider
                raise first
            plan.candidates = kept
        return outs

    async def _send(
        self,
        ex: Exchange,
        step: Attempt,
        prep: Prepared,
        out: Outbound,
        tracker: StreamTracker | None,
    ) -> Result:
        """One attempt: count it, wait its backoff, send it."""
        metrics = self.state.metrics
        cand = step.candidate
        key = cand.key
        if step.failover_from is not None:  # counted only when another attempt really follows
            metrics.failovers.inc(step.failover_from)
        if step.wait:
            await asyncio.sleep(step.wait)
        ex.attempts = step.number
        ex.candidate = cand
        ex.translated = out.translation.label if out.translation else None
        metrics.key_selections.inc(key.labels)
        url, headers = upstream.target(cand, prep, out)
        span = None
        if ex.trace is not None:
            span = ex.trace.attempt(step.number, cand.provider.id, cand.upstream_model,
                                    key.source.value, key.key_id, translated=ex.translated)  # fmt: skip
            if span is not None:
                span.inject(headers)
        res = await upstream.attempt(self.state, ex, cand, url, headers, out.body,
                                     max(0.001, step.budget), tracker)  # fmt: skip
        if span is not None:
            span.end(res.status, res.outcome.value)
        # str(): the value, in C (an enum's `.value` is a Python-level property on 3.11)
        metrics.upstream_attempts.inc((*key.labels, str(res.outcome)))
        return res

    @staticmethod
    def _classify(ex: Exchange, res: Result) -> Report:
        """What an attempt that did not start a stream came to, for the engine."""
        failover = ex.runtime.config.failover
        if res.upstream is not None:  # an answer for the caller, unless another model may answer
            status, body = res.upstream.status, res.body
        elif res.inband and res.failed is not None and res.failed[0] not in failover.on_status:
            # An in-band error before the first token, as if it were that HTTP status.
            status, body = res.failed[0], res.failed[2]
        else:
            return Report(res.outcome, res.status, res.retry_after, res.quota,
                          timed_out=res.timed_out)  # fmt: skip
        model_level = body is not None and is_model_level_error(
            status, body, failover.next_model_on_codes
        )
        return Report(res.outcome, status, model_level=model_level, final=not model_level)

    def _report(self, ex: Exchange, engine: Engine, cand: Candidate, report: Report) -> bool:
        """Tell the engine; log what it decided. True: relay this attempt's answer."""
        verdict = engine.report(report)
        key = cand.key
        model = cand.upstream_model
        if report.model_level and not verdict.final:
            self.state.oplog.info("next_model", request_id=ex.request_id, provider=key.provider,
                                  model=model, status=report.status)  # fmt: skip
        if verdict.cooled_until is not None and ex.trace is not None:
            ex.trace.event("key_cooling", provider=key.provider, key_source=key.source.value,
                           key_id=key.key_id, model=model, outcome=report.outcome.value)  # fmt: skip
        if verdict.cooled_until is not None:
            self.state.oplog.info("key_cooling", provider=key.provider, source=key.source.value,
                                  key_id=key.key_id, model=model,
                                  outcome=report.outcome.value)  # fmt: skip
        return verdict.final

    # ----------------------------------------------------------------- streams

    async def _stream(
        self,
        ex: Exchange,
        engine: Engine,
        res: Result,
        adapter: Adapter,
        prep: Prepared,
        data: dict[str, Any] | None,
        shape: Shape | None,
        route: Route,
    ) -> web.StreamResponse:
        """Relay a stream that has its first content; continue it elsewhere if it breaks."""
        assert res.upstream is not None
        assert res.tracker is not None
        assert shape is not None
        state = self.state
        tracker = res.tracker
        cand = ex.candidate
        assert cand is not None
        current = res
        whole = False  # the answer arrived complete: its usage is what it reported
        resp: web.StreamResponse | None = None
        try:
            resp = await relay.open_stream(ex, res.upstream)
            if not current.prefix:
                relay.send_head(resp)
            while True:
                # What was held goes out with the held head in one write, and with the
                # caller's end too when the upstream's end came with it.
                if current.complete:
                    got: bytes | relay.Break = current.prefix
                else:
                    assert current.upstream is not None
                    got = await relay.pump(ex, resp, current.upstream, tracker, current.prefix)
                if not isinstance(got, relay.Break):  # the whole answer; `got` its last bytes
                    # As when they went apart from the end: the answer counts as whole once
                    # the caller took its last events, whatever becomes of the end alone.
                    if got:
                        await relay.end(ex, resp, got)
                    whole = True
                    engine.report(Report(OUTCOME_OK, 200, final=True))
                    if not got:
                        await relay.end(ex, resp)
                    return resp
                brk = got
                if brk.caller_gone:
                    ex.status = CLIENT_CLOSED
                    return resp
                end = tracker.terminator()
                if end is not None:  # the answer had finished: only what followed it broke
                    state.oplog.info("stream_tail_lost", request_id=ex.request_id,
                                     provider=ex.provider, cause=brk.cause)  # fmt: skip
                    engine.report(Report(OUTCOME_OK, 200, final=True))
                    if end:
                        await relay.send(ex, resp, end)
                    await relay.end(ex, resp)
                    return resp  # metered as broken: its usage report may be what was lost
                relay.interrupted(state, ex, brk.cause)
                if ex.trace is not None:
                    ex.trace.event("stream_broken", provider=ex.provider, cause=brk.cause)
                outcome = _BREAK_OUTCOME.get(brk.cause, Outcome.SERVER_ERROR)
                err = tracker.error
                if err is not None and err.status not in ex.runtime.config.failover.on_status:
                    # A refusal (a content policy, a bad request): final, like its HTTP status.
                    engine.report(Report(classify_status(err.status), err.status, final=True))
                    state.metrics.stream_resumptions.labels(ex.provider, "not_resumable").inc()
                    await _end_with_error(ex, resp, shape, brk, "the error is final",
                                          code=_error_code(err.body))  # fmt: skip
                    return resp
                quota = False
                err_status = 200
                if err is not None:
                    err_status = err.status
                    outcome = classify_status(err_status)
                    quota = err_status == 429 and is_quota_exhausted(err.body)
                self._report(ex, engine, cand, Report(outcome, err_status, quota=quota))
                # `timeouts.total` bounds the wait for a first byte: the continuation's too.
                engine.restart(time.perf_counter() + ex.runtime.config.timeouts.total)
                spent = tracker.estimate(ex.body_size)
                nxt = await self._resume(ex, resp, engine, adapter, prep, data, shape,
                                         route, tracker, brk)  # fmt: skip
                if nxt is None:
                    return resp
                assert nxt.tracker is not None
                assert ex.candidate is not None
                state.oplog.info("usage_estimated", request_id=ex.request_id,
                                 input_tokens=spent.input_tokens,
                                 output_tokens=spent.output_tokens)  # fmt: skip
                ex.charges = (*ex.charges, (cand, spent))  # each attempt is paid for
                ex.resumed = True
                current, tracker, cand = nxt, nxt.tracker, ex.candidate
        except (ConnectionResetError, relay.CallerStalled):  # the caller left, or took nothing
            ex.status = CLIENT_CLOSED
            if resp is None:
                raise
            return resp
        finally:
            if current.upstream is not None:
                current.upstream.release()
            # A stream that did not end whole (broken, abandoned, cancelled), or reported no
            # usage, is still metered: what it reported, the rest estimated.
            reported = tracker.usage.input_tokens or tracker.usage.output_tokens
            whole = whole and bool(reported)
            ex.usage = tracker.usage if whole else tracker.estimate(ex.body_size)
            if not whole:
                state.oplog.info("usage_estimated", request_id=ex.request_id,
                                 input_tokens=ex.usage.input_tokens,
                                 output_tokens=ex.usage.output_tokens)  # fmt: skip

    async def _resume(
        self,
        ex: Exchange,
        resp: web.StreamResponse,
        engine: Engine,
        adapter: Adapter,
        prep: Prepared,
        data: dict[str, Any] | None,
        shape: Shape,
        route: Route,
        broken: StreamTracker,
        brk: relay.Break,
    ) -> Result | None:
        """A continuation of a broken stream, its first content in hand; or None after the
        caller's stream was ended with an in-band error."""
        state = self.state
        cfg = ex.runtime.config
        provider = ex.provider
        broken_cand = ex.candidate
        body = None
        accept: Callable[[Candidate], bool] | None = _takes_prefill
        raw = b""
        if cfg.failover.resume and broken.resumable and data is not None:
            text = broken.text
            body = prefill_body(shape, data, text)
            if body is None and not text.strip() and isinstance(data.get("messages"), list):
                body, accept = (data, text), None  # nothing to continue: the whole answer again
            if body is not None:
                try:
                    raw = inbound.dump_json(body[0])
                except ProxyError:  # nested deeper than can be written again (it went as it came)
                    body = None
        if body is None:
            state.metrics.stream_resumptions.labels(provider, "not_resumable").inc()
            await _end_with_error(ex, resp, shape, brk, "it cannot be continued elsewhere")
            return None
        continued, trimmed = body
        outs: dict[tuple[str, str | None], Outbound] = {}
        while isinstance(step := engine.next(accept=accept), Attempt):
            cand = step.candidate
            model = cand.upstream_model
            k = (cand.provider.id, model)
            if k not in outs:
                try:
                    outs[k] = outbound.build(route, cand, raw, continued, adapter)
                except ProxyError:  # the continuation cannot be carried to its format
                    self._report(ex, engine, cand, Report(OUTCOME_OK, 400, unsuitable=True))
                    continue
            out = outs[k]
            tracker = _tracker(shape, out, cand, Splice(shape, broken, trimmed))
            try:
                res = await self._send(ex, step, prep, out, tracker)
            except asyncio.CancelledError:  # the caller left while a continuation was held
                if tracker.events:  # that upstream had begun: it is paid for too
                    ex.charges = (*ex.charges, (cand, tracker.estimate(len(raw))))
                ex.candidate = broken_cand  # the broken stream's own usage is its candidate's
                raise
            if res.tracker is not None:
                ex.body_size = len(raw)  # what a broken continuation's input is estimated from
                state.metrics.stream_resumptions.labels(provider, "ok").inc()
                if ex.trace is not None:
                    ex.trace.event("stream_resumed", provider=cand.provider.id,
                                   key_id=cand.key.key_id, model=model)  # fmt: skip
                state.oplog.info("stream_resumed", request_id=ex.request_id, provider=cand.provider.id,
                                 key_id=cand.key.key_id, model=model)  # fmt: skip
                return res
            if res.upstream is not None:  # an answer, but not a continuation (a rejected prefill)
                res.upstream.release()
                self._report(ex, engine, cand, Report(res.outcome, res.upstream.status,
                                                      unsuitable=True))  # fmt: skip
                continue
            report = self._classify(ex, res)
            if report.final or report.model_level:  # an in-band refusal of the prefill
                report = Report(report.outcome, report.status, unsuitable=True)
            self._report(ex, engine, cand, report)
        state.metrics.stream_resumptions.labels(provider, "failed").inc()
        tried = ex.candidate
        ex.candidate = broken_cand  # what the caller got, and its usage, came from there
        await _end_with_error(ex, resp, shape, brk, "no candidate could continue it",
                              tried=(tried,))  # fmt: skip
        return None

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
                await relay.end(ex, resp)  # a caller that takes nothing is let go
            except relay.CallerStalled:  # its connection is closed already
                ex.status = CLIENT_CLOSED
                account(self.state, ex)
                return resp
            except (asyncio.CancelledError, ConnectionResetError):
                ex.status = CLIENT_CLOSED
                account(self.state, ex)
                raise
            except Exception as exc:  # the outermost boundary of this request
                ex.status = 500
                self.state.oplog.error("response_failed", request_id=ex.request_id,
                                       error=type(exc).__name__)  # fmt: skip
                account(self.state, ex)
                raise
        account(self.state, ex)
        return resp


# --------------------------------------------------------------------------- helpers


async def _end_with_error(
    ex: Exchange,
    resp: web.StreamResponse,
    shape: Shape,
    brk: relay.Break,
    why: str,
    *,
    code: str = "stream_interrupted",
    tried: tuple[Candidate | None, ...] = (),
) -> None:
    """End the caller's stream with an in-band error event the official SDKs raise: never a
    truncated answer that looks complete. It carries the upstream's own error, if any, with
    anything key-shaped masked (an auth error may quote the key it was sent)."""
    message = f"the upstream stream broke ({brk.cause}) and {why}"
    if brk.message:
        secrets = [c.key.secret for c in (*tried, ex.candidate) if c and c.key.secret]
        upstream_words = mask_key_fragments(brk.message.encode(), secrets).decode()
        message = f"{message}: {upstream_words}"
    await relay.send(ex, resp, error_event(shape, message, code=code))
    await relay.end(ex, resp)


def _error_code(body: bytes) -> str:
    """The `code` of an upstream error body, for the in-band error that relays it."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return "stream_interrupted"
    err = doc.get("error") if isinstance(doc, dict) else None
    # OpenAI errors carry a `code`; Anthropic's only a `type`.
    code = (err.get("code") or err.get("type")) if isinstance(err, dict) else None
    return (
        code
        if isinstance(code, str) and code.isprintable() and len(code) <= 64
        else "stream_interrupted"
    )


def _model_entry(model: str, owner: str, fmt: str) -> dict[str, Any]:
    if fmt == "gemini":
        return {"name": f"models/{model}", "displayName": model,
                "supportedGenerationMethods": ["generateContent", "countTokens"]}  # fmt: skip
    if fmt == "anthropic":
        return {"type": "model", "id": model, "display_name": model,
                "created_at": "1970-01-01T00:00:00Z"}  # fmt: skip
    return {"id": model, "object": "model", "created": 0, "owned_by": owner}


def _tracker(
    shape: Shape, out: Outbound, cand: Candidate, splice: Splice | None = None
) -> StreamTracker:
    """A stream's tracker: it reads the caller's format, after the translation if any."""
    pre = out.translation.stream(cand.upstream_model or "") if out.translation else None
    return StreamTracker(shape, strip_usage=out.strip_usage, splice=splice, pre=pre)


#: Gemini API actions served on `/v1beta/models/{model}:{action}`.
_GEMINI_ACTIONS: Final = frozenset(
    {"generateContent", "streamGenerateContent", "countTokens", "embedContent",
     "batchEmbedContents"}
)  # fmt: skip
_OPENAI_CHAT: Final = "/chat/completions"
_ANTHROPIC_CHAT: Final = "/messages"


def _caller_route(
    fmt: str, request: web.Request, data: dict[str, Any] | None
) -> tuple[Route, list[str]]:
    """The caller's route and the model names it asks for, in order."""
    if fmt == "gemini":
        model, _, action = request.match_info["target"].rpartition(":")
        if action not in _GEMINI_ACTIONS or not model:
            raise ProxyError(ErrorCode.ROUTE_NOT_FOUND, f"no such Gemini API action {action!r}")
        inbound.check_model_name(model)
        if data is None and action != "countTokens":
            raise ProxyError(ErrorCode.INVALID_JSON, "request body must be a JSON object")
        listed = {"model": model, "models": data.get("models") if data else None}
        names = inbound.model_names(listed, required=True)
        stream = action == "streamGenerateContent"
        # Without `alt=sse` Google answers a stream as one JSON array, which only the google
        # provider itself writes: such a request is not translated.
        sse = request.rel_url.query.get("alt") == "sse"
        route = Route("gemini", f"/models/{model}:{action}", stream,
                      chat=action == "generateContent" or (stream and sse), action=action)  # fmt: skip
        return route, names
    path = "/" + request.path.removeprefix("/v1/")
    stream = bool(data and data.get("stream") is True)
    stored = request.match_info.get("id")
    if stored is not None:  # a stored response: its id goes in the path
        inbound.check_method(request.method)
        if not _RESPONSE_ID.fullmatch(stored) or request.match_info.get("action", "x") not in (
            "x", "cancel", "input_items"
        ):
            raise ProxyError(ErrorCode.ROUTE_NOT_FOUND, "no such response route")
        return Route("openai", path, stream), inbound.model_names(data, required=False)
    # The OpenAI and Anthropic routes are a handful of fixed paths: their Routes are made once.
    fixed = _ROUTES.get((fmt, path, stream))
    if fixed is None:
        chat = path == (_OPENAI_CHAT if fmt == "openai" else _ANTHROPIC_CHAT)
        fixed = _ROUTES.setdefault((fmt, path, stream), Route(fmt, path, stream, chat=chat))
    return fixed, inbound.model_names(data, required=True)


_ROUTES: dict[tuple[str, str, bool], Route] = {}


#: A stored response's id (`resp_…`): one safe path segment.
_RESPONSE_ID: Final = re.compile(r"[A-Za-z0-9_-]{1,256}")


def _takes_prefill(cand: Candidate) -> bool:
    return cand.provider.accepts_prefill(cand.upstream_model)


def _explicit_model(runtime: Runtime, provider_id: str, name: str) -> ResolvedModel:
    """On `/{provider}/…` the provider is given; a `provider:` prefix on the model is dropped."""
    prefix = provider_id + ":"
    upstream = name[len(prefix) :] if name.startswith(prefix) else name
    return ResolvedModel(name, runtime.providers[provider_id], upstream)
