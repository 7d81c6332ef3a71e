"""OpenTelemetry traces (docs/reference.md#traces): a server span per request, a client span
per upstream attempt, exported over OTLP/HTTP.

Off unless the config has `tracing:`. Importing this module imports nothing from
OpenTelemetry: `Tracing.from_config` does, and only when tracing is configured, so with
tracing off the request path holds `state.tracing is None` and pays that one check.

What is traced never includes a secret: spans carry names, ids, models, statuses and
token counts (the key's source and id, the access key's name), never a key, a prompt or
an answer. Nothing here raises into a request: a failure to trace is logged once and the
request goes on; a collector that cannot be reached is logged once (and again when it
recovers), and the SDK's batch processor keeps export off the event loop thread with a
bounded queue (spans past it are dropped, not held).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Mapping, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any, Final, Protocol
from urllib.parse import urlsplit

from sidecar import __version__
from sidecar.config import DEFAULT_SERVICE_NAME, Config, TracingConfig
from sidecar.logs import OpLog

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.propagators.textmap import TextMapPropagator
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
    from opentelemetry.trace import Span, Tracer

#: Instrumentation scope of every span.
SCOPE: Final = DEFAULT_SERVICE_NAME
#: Longest string attribute value (the SDK cuts longer ones too).
MAX_VALUE: Final = 256
#: Spans held for export; past it new spans are dropped (the request never waits).
MAX_QUEUE: Final = 2048
MAX_BATCH: Final = 512
SCHEDULE_DELAY_MS: Final = 1000

#: Our provider ids → the GenAI conventions' well-known `gen_ai.provider.name` values;
#: any other provider (a custom one) is named by its id.
PROVIDER_NAMES: Final[Mapping[str, str]] = {
    "openai": "openai",
    "anthropic": "anthropic",
    "google": "gcp.gemini",
    "azure": "azure.ai.openai",
    "deepseek": "deepseek",
    "groq": "groq",
    "mistral": "mistral_ai",
    "xai": "x_ai",
    "perplexity": "perplexity",
}

#: Routes whose path is their own low-cardinality name.
_FIXED_ROUTES: Final = frozenset(
    {"/", "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses",
     "/v1/responses/input_tokens", "/v1/messages", "/v1/messages/count_tokens", "/v1/models",
     "/v1beta/models"}
)  # fmt: skip
#: (path suffix, operation), first match wins; Gemini actions follow the model after `:`.
_OPERATIONS: Final = (
    ("/chat/completions", "chat"),
    ("/completions", "text_completion"),
    ("/embeddings", "embeddings"),
    ("/responses", "chat"),
    ("/messages", "chat"),
    ("/messages/count_tokens", "count_tokens"),
    (":generateContent", "generate_content"),
    (":streamGenerateContent", "generate_content"),
    (":embedContent", "embeddings"),
    (":batchEmbedContents", "embeddings"),
    (":countTokens", "count_tokens"),
)
#: `event()` keyword → attribute name; any other keyword `k` becomes `sidecar.k`.
_EVENT_KEYS: Final[Mapping[str, str]] = {
    "status": "http.response.status_code",
    "model": "gen_ai.request.model",
    "provider": "sidecar.provider",
    "key_source": "sidecar.key.source",
    "key_id": "sidecar.key.id",
    "attempt": "sidecar.attempt",
    "outcome": "sidecar.outcome",
}


class _Usage(Protocol):
    """What `RequestTrace.end` reads of a request's usage (`sidecar.usage.Usage`)."""

    @property
    def input_tokens(self) -> int: ...

    @property
    def output_tokens(self) -> int: ...


# --------------------------------------------------------------------------- pure helpers


def cut(value: str, limit: int = MAX_VALUE) -> str:
    """A string attribute value, bounded."""
    return value if len(value) <= limit else value[:limit]


def printable(value: str, limit: int = MAX_VALUE) -> str:
    """Caller-sent text as printable ASCII (anything else becomes `?`), bounded: one odd
    character must not make a whole batch unexportable."""
    value = cut(value, limit)
    if value.isascii() and value.isprintable():
        return value
    return "".join(c if " " <= c <= "~" else "?" for c in value)


def route_of(path: str) -> str:
    """The request span's low-cardinality route: model names and ids are left out."""
    if path in _FIXED_ROUTES:
        return path
    if path.startswith("/v1beta/models/"):
        return "/v1beta/models/{target}"
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    if path.startswith("/v1/responses/"):
        return "/v1/responses/{id}"
    if path.startswith(("/v1/", "/v1beta/")):
        return f"/{path.split('/', 2)[1]}/{{tail}}"  # an unknown route under /v1 or /v1beta
    return "/{provider}/{tail}"


def operation_of(path: str) -> str | None:
    """`gen_ai.operation.name` for a request path (the tail of an explicit route too)."""
    for suffix, operation in _OPERATIONS:
        if path.endswith(suffix):
            return operation
    return None


def provider_name(provider: str) -> str:
    """`gen_ai.provider.name` for one of our provider ids."""
    return PROVIDER_NAMES.get(provider, provider)


def traceparent(trace_id: int, span_id: int, flags: int) -> str:
    """The W3C `traceparent` header value (version 00)."""
    return f"00-{trace_id:032x}-{span_id:016x}-{flags:02x}"


def bounded(value: object) -> str | int | float | bool:
    """An event attribute value: numbers and booleans as they are, anything else a bounded string."""
    if isinstance(value, bool | int | float):
        return value
    return cut(str(value))


def _endpoint_host(endpoint: str) -> str:
    parts = urlsplit(endpoint)
    return f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)


# --------------------------------------------------------------------------- tracing


class Tracing:
    """The tracer of one sidecar (its own provider: no global OpenTelemetry state)."""

    def __init__(
        self,
        config: TracingConfig,
        provider: TracerProvider,
        oplog: OpLog,
    ) -> None:
        from opentelemetry.context import Context
        from opentelemetry.trace import SpanKind, Status, StatusCode, set_span_in_context
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.config = config
        self._provider = provider
        self._oplog = oplog
        self.tracer: Tracer = provider.get_tracer(SCOPE, __version__)
        self._propagator: TextMapPropagator = TraceContextTextMapPropagator()
        self._root: Context = Context()
        self._set_span = set_span_in_context
        self._server, self._client = SpanKind.SERVER, SpanKind.CLIENT
        self._error = Status(StatusCode.ERROR)
        self._failed = False  # a failure to trace was logged: once

    @classmethod
    def from_config(cls, config: Config | None, oplog: OpLog) -> Tracing | None:
        """None when tracing is off (nothing is imported); else a tracer exporting over
        OTLP/HTTP through a bounded batch processor."""
        tcfg = config.tracing if config is not None else None
        if tcfg is None:
            return None
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        headers = {name: value.reveal() for name, value in tcfg.headers} or None
        otlp = OTLPSpanExporter(endpoint=tcfg.endpoint, headers=headers, timeout=tcfg.timeout)
        host = _endpoint_host(tcfg.endpoint)  # never the path or query: they may carry a token
        exporter = LoggedExporter(otlp, oplog, host)
        processor = BatchSpanProcessor(
            exporter,  # type: ignore[arg-type]  # duck-typed: export, shutdown, force_flush
            max_queue_size=MAX_QUEUE,
            max_export_batch_size=MAX_BATCH,
            schedule_delay_millis=SCHEDULE_DELAY_MS,
            export_timeout_millis=tcfg.timeout * 1000,
        )
        # The SDK's own log lines (one per failed batch) would repeat what LoggedExporter
        # says once; they carry no more than it does.
        logging.getLogger("opentelemetry").setLevel(logging.CRITICAL)
        tracing = cls(tcfg, make_provider(tcfg, processor), oplog)
        oplog.info("tracing_on", endpoint=host,
                   service_name=tcfg.service_name, sample_ratio=tcfg.sample_ratio)  # fmt: skip
        return tracing

    def start_request(
        self,
        fmt: str,
        method: str,
        path: str,
        headers: Mapping[str, str],
        request_id: str | None = None,
    ) -> RequestTrace | None:
        """The request's server span, a child of the caller's `traceparent` when it sent a
        valid one. None only if tracing itself failed (logged once)."""
        try:
            context = self._root
            if "traceparent" in headers:
                context = self._propagator.extract(headers, context)  # type: ignore[arg-type]
            operation = operation_of(path)
            attributes: dict[str, str | int] = {
                "http.request.method": printable(method, 16),
                "url.path": printable(path),
                "http.route": route_of(path),
                "sidecar.format": fmt,
            }
            if operation is not None:
                attributes["gen_ai.operation.name"] = operation
            if request_id is not None:
                attributes["sidecar.request_id"] = cut(request_id, 128)
            span = self.tracer.start_span(
                f"{attributes['http.request.method']} {attributes['http.route']}",
                context,
                self._server,
                attributes,
            )
            return RequestTrace(self, span, operation)
        except Exception as exc:  # tracing never fails a request
            self.failed(exc)
            return None

    def failed(self, exc: BaseException) -> None:
        """A failure inside tracing: logged the first time only."""
        if not self._failed:
            self._failed = True
            self._oplog.error("tracing_failed", error=type(exc).__name__)

    async def close(self, within: float) -> None:
        """Export what is queued and stop, waiting at most `within` seconds (off the event
        loop). What could not be exported by then is dropped, and said so."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def shutdown() -> None:
            try:
                self._provider.shutdown()
            except Exception as exc:  # the exporter's thread: report, never raise
                self.failed(exc)
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
                loop.call_soon_threadsafe(_resolve, done)

        # A daemon thread: a collector that never answers cannot hold the process open.
        threading.Thread(target=shutdown, name="sidecar-trace-flush", daemon=True).start()
        try:
            await asyncio.wait_for(done, max(0.0, within))
        except TimeoutError:
            self._oplog.warning("trace_flush_incomplete", within_s=round(within, 3))


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def make_provider(config: TracingConfig, *processors: Any) -> TracerProvider:
    """A tracer provider of our own (never the global one), sampling new traces at
    `sample_ratio` and following the caller's decision for traces it started."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import SpanLimits, TracerProvider
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    resource = Resource.create(
        {"service.name": config.service_name, "service.version": __version__}
    )
    provider = TracerProvider(
        sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)),
        resource=resource,
        span_limits=SpanLimits(max_attribute_length=MAX_VALUE),
    )
    for processor in processors:
        provider.add_span_processor(processor)
    return provider


class LoggedExporter:
    """Wraps the OTLP exporter: a failing collector is logged once (and its recovery),
    never per batch, and an exporter error never escapes the export thread."""

    def __init__(self, inner: SpanExporter, oplog: OpLog, endpoint: str) -> None:
        self._inner = inner
        self._oplog = oplog
        self._endpoint = endpoint
        self._failing = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        from opentelemetry.sdk.trace.export import SpanExportResult

        error = None
        try:
            result = self._inner.export(spans)
        except Exception as exc:
            result, error = SpanExportResult.FAILURE, type(exc).__name__
        if result is SpanExportResult.SUCCESS:
            if self._failing:
                self._failing = False
                self._oplog.info("trace_export_recovered", endpoint=self._endpoint)
        elif not self._failing:
            self._failing = True
            self._oplog.warning("trace_export_failed", endpoint=self._endpoint,
                                spans=len(spans), error=error)  # fmt: skip
        return result

    def shutdown(self) -> None:
        try:
            self._inner.shutdown()
        except Exception as exc:
            self._oplog.warning("trace_export_failed", endpoint=self._endpoint,
                                error=type(exc).__name__)  # fmt: skip

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


# --------------------------------------------------------------------------- per request


class RequestTrace:
    """One request's server span. Attempts are its children; failovers, retries,
    translations and whatever `event` is told are events on it."""

    __slots__ = ("_context", "_ended", "_last", "_open", "_tracing", "attempts", "operation",
                 "span")  # fmt: skip

    def __init__(self, tracing: Tracing, span: Span, operation: str | None) -> None:
        self._tracing = tracing
        self.span = span
        self.operation = operation
        self._context: Context | None = None  # the span's context, made for the first attempt
        self._open: AttemptTrace | None = None
        self._last: AttemptTrace | None = None  # the last attempt that ended
        self.attempts = 0
        self._ended = False

    def attempt(
        self,
        number: int,
        provider: str,
        model: str | None,
        key_source: str,
        key_id: str,
        *,
        translated: str | None = None,
    ) -> AttemptTrace | None:
        """Start attempt `number`'s client span. After an attempt that failed, a `retry`
        (same provider, key and model) or `failover` event says what it failed with."""
        tracing = self._tracing
        try:
            if self._open is not None:  # never ended (the handler moved on): it went nowhere
                self._open.end(None, "abandoned")
            last = self._last
            if last is not None and last.outcome != "ok" and self.span.is_recording():
                same = (last.provider, last.key_id, last.model) == (provider, key_id, model)
                self.span.add_event("retry" if same else "failover", last.summary(
                    provider=provider, key_id=key_id, model=model))  # fmt: skip
            translation = cut(translated, 64) if translated is not None else None
            if translation is not None and self.span.is_recording():
                self.span.add_event("translated", {"sidecar.translation": translation,
                                                   "sidecar.attempt": number})  # fmt: skip
            if self._context is None:
                self._context = tracing._set_span(self.span)
            attributes: dict[str, str | int] = {
                "gen_ai.provider.name": provider_name(provider),
                "sidecar.provider": provider,
                "sidecar.key.source": key_source,
                "sidecar.key.id": cut(key_id, 128),
                "sidecar.attempt": number,
            }
            if self.operation is not None:
                attributes["gen_ai.operation.name"] = self.operation
            if model is not None:
                attributes["gen_ai.request.model"] = cut(model)
            if translation is not None:
                attributes["sidecar.translation"] = translation
            name = self.operation or "attempt"
            if model:
                name = f"{name} {model}"
            span = tracing.tracer.start_span(cut(name), self._context, tracing._client, attributes)
            self.attempts = max(self.attempts, number)
            attempt = AttemptTrace(self, span, number, provider, key_source, key_id, model)
            self._open = attempt
            return attempt
        except Exception as exc:
            tracing.failed(exc)
            return None

    def event(self, name: str, **attrs: object) -> None:
        """An event on the request span (`stream_resumed`, `key_cooling`, ...). Keywords
        become attributes: `status`, `model`, `provider`, `key_source`, `key_id`,
        `attempt` and `outcome` by their conventional names, any other `k` as `sidecar.k`."""
        try:
            if not self.span.is_recording():
                return
            self.span.add_event(cut(name, 64), {
                _EVENT_KEYS.get(k) or f"sidecar.{k}": bounded(v)
                for k, v in attrs.items() if v is not None
            })  # fmt: skip
        except Exception as exc:
            self._tracing.failed(exc)

    def end(
        self,
        status: int,
        *,
        request_model: str | None = None,
        response_model: str | None = None,
        usage: _Usage | None = None,
        access_key: str | None = None,
        error: str | None = None,
    ) -> None:
        """End the server span with the caller's status and what the request came to.
        A server error (5xx) or a given `error` marks it failed; a 4xx is the caller's."""
        if self._ended:
            return
        self._ended = True
        try:
            if self._open is not None:
                self._open.end(None, "abandoned", error)
            span = self.span
            if span.is_recording():
                span.set_attributes(self._end_attributes(
                    status, request_model, response_model, usage, access_key))  # fmt: skip
                if error is not None or status >= 500:
                    span.set_attribute("error.type", cut(error or str(status), 64))
                    span.set_status(self._tracing._error)
            span.end()
        except Exception as exc:
            self._tracing.failed(exc)

    def _end_attributes(
        self,
        status: int,
        request_model: str | None,
        response_model: str | None,
        usage: _Usage | None,
        access_key: str | None,
    ) -> dict[str, str | int]:
        out: dict[str, str | int] = {"http.response.status_code": status,
                                     "sidecar.attempts": self.attempts}  # fmt: skip
        last = self._last
        if last is not None:  # the attempt the answer (or the last failure) came from
            out["gen_ai.provider.name"] = provider_name(last.provider)
            out["sidecar.provider"] = last.provider
            out["sidecar.key.source"] = last.key_source
            out["sidecar.key.id"] = cut(last.key_id, 128)
        if request_model is not None:
            out["gen_ai.request.model"] = cut(request_model)
        if response_model is not None:
            out["gen_ai.response.model"] = cut(response_model)
        if usage is not None:
            out["gen_ai.usage.input_tokens"] = usage.input_tokens
            out["gen_ai.usage.output_tokens"] = usage.output_tokens
        if access_key is not None:
            out["sidecar.access_key"] = cut(access_key, 128)
        return out


class AttemptTrace:
    """One upstream attempt's client span."""

    __slots__ = ("_ended", "_request", "key_id", "key_source", "model", "number", "outcome",
                 "provider", "span", "status")  # fmt: skip

    def __init__(
        self,
        request: RequestTrace,
        span: Span,
        number: int,
        provider: str,
        key_source: str,
        key_id: str,
        model: str | None,
    ) -> None:
        self._request = request
        self.span = span
        self.number = number
        self.provider = provider
        self.key_source = key_source
        self.key_id = key_id
        self.model = model
        self.outcome = ""
        self.status: int | None = None
        self._ended = False

    def inject(self, headers: MutableMapping[str, str]) -> None:
        """Set `traceparent` (and `tracestate`) on the attempt's upstream request headers to
        this attempt's span, replacing whatever the caller sent."""
        try:
            ctx = self.span.get_span_context()
            if not ctx.is_valid:  # the SDK turned off (OTEL_SDK_DISABLED): nothing to say
                return
            headers["traceparent"] = traceparent(ctx.trace_id, ctx.span_id, ctx.trace_flags)
            state = ctx.trace_state.to_header() if ctx.trace_state else ""
            if state:
                headers["tracestate"] = state
            elif "tracestate" in headers:
                del headers["tracestate"]
        except Exception as exc:
            self._request._tracing.failed(exc)

    def end(self, status: int | None, outcome: str, error: str | None = None) -> None:
        """End the span: the upstream's HTTP status (None without an answer) and the
        outcome (`ok`, `rate_limited`, `timeout`, ...). Any outcome but `ok` is a failure,
        its `error.type` the given `error`, else the status, else the outcome."""
        if self._ended:
            return
        self._ended = True
        request = self._request
        self.outcome, self.status = outcome, status
        if request._open is self:
            request._open = None
        request._last = self
        try:
            span = self.span
            if span.is_recording():
                span.set_attribute("sidecar.outcome", cut(outcome, 64))
                if status is not None:
                    span.set_attribute("http.response.status_code", status)
                if outcome != "ok":
                    reason = error or (str(status) if status is not None else outcome)
                    span.set_attribute("error.type", cut(reason, 64))
                    span.set_status(request._tracing._error)
            span.end()
        except Exception as exc:
            request._tracing.failed(exc)

    def summary(self, **next_attempt: str | None) -> dict[str, str | int]:
        """This failed attempt, for the `failover`/`retry` event that follows it."""
        out: dict[str, str | int] = {
            "sidecar.attempt": self.number,
            "sidecar.outcome": cut(self.outcome, 64),
            "sidecar.provider": self.provider,
            "sidecar.key.id": cut(self.key_id, 128),
        }
        if self.status is not None:
            out["http.response.status_code"] = self.status
        if self.model is not None:
            out["gen_ai.request.model"] = cut(self.model)
        for k, v in next_attempt.items():
            if v is not None:
                out[f"sidecar.next.{k}"] = cut(v)
        return out
