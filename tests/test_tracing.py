"""sidecar.tracing (docs/reference.md#traces): spans, attributes, events and propagation,
driven through the RequestTrace / AttemptTrace API into the SDK's in-memory exporter."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExportResult,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from sidecar.config import TracingConfig, parse_config_text
from sidecar.logs import OpLog
from sidecar.secret import Secret
from sidecar.tracing import (
    LoggedExporter,
    RequestTrace,
    Tracing,
    bounded,
    make_provider,
    operation_of,
    printable,
    provider_name,
    route_of,
    traceparent,
)
from tests.harness import REPO, LogSink, subprocess_env

CALLER_TRACE = 0x4BF92F3577B34DA6A3CE929D0E0E4736
CALLER_SPAN = 0x00F067AA0BA902B7
CALLER_PARENT = f"00-{CALLER_TRACE:032x}-{CALLER_SPAN:016x}-01"
CFG = TracingConfig("http://127.0.0.1:1/v1/traces", "test-sidecar")


@pytest.fixture
def log() -> LogSink:
    return LogSink()


@pytest.fixture
def exported() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def tracing(exported: InMemorySpanExporter, log: LogSink) -> Iterator[Tracing]:
    t = Tracing(CFG, make_provider(CFG, SimpleSpanProcessor(exported)), OpLog("debug", log))
    yield t
    t._provider.shutdown()


def start(tracing: Tracing, headers: dict[str, str] | None = None, path: str = "/v1/chat/completions") -> RequestTrace:  # fmt: skip
    trace = tracing.start_request("openai", "POST", path, headers or {}, request_id="req-1")
    assert trace is not None
    return trace


def by_name(spans: Sequence[ReadableSpan]) -> dict[str, ReadableSpan]:
    return {s.name: s for s in spans}


# --------------------------------------------------------------------------- pure helpers


@pytest.mark.parametrize(
    ("path", "route", "operation"),
    [
        ("/v1/chat/completions", "/v1/chat/completions", "chat"),
        ("/v1/completions", "/v1/completions", "text_completion"),
        ("/v1/embeddings", "/v1/embeddings", "embeddings"),
        ("/v1/responses", "/v1/responses", "chat"),
        ("/v1/messages", "/v1/messages", "chat"),
        ("/v1/messages/count_tokens", "/v1/messages/count_tokens", "count_tokens"),
        (
            "/v1beta/models/gemini-2.0-flash:generateContent",
            "/v1beta/models/{target}",
            "generate_content",
        ),
        (
            "/v1beta/models/gemini-2.0-flash:streamGenerateContent",
            "/v1beta/models/{target}",
            "generate_content",
        ),
        (
            "/v1beta/models/text-embedding-004:batchEmbedContents",
            "/v1beta/models/{target}",
            "embeddings",
        ),
        ("/v1beta/models/gemini-2.0-flash:countTokens", "/v1beta/models/{target}", "count_tokens"),
        ("/v1/responses/resp_abc123", "/v1/responses/{id}", None),
        ("/v1/models/gpt-4o", "/v1/models/{model}", None),
        ("/v1/files", "/v1/{tail}", None),
        ("/openai/v1/chat/completions", "/{provider}/{tail}", "chat"),
        ("/groq/openai/v1/embeddings", "/{provider}/{tail}", "embeddings"),
    ],
)
def test_route_and_operation_of_a_path(path: str, route: str, operation: str | None) -> None:
    assert route_of(path) == route
    assert operation_of(path) == operation


def test_provider_names_follow_the_genai_registry_and_custom_ones_keep_their_id() -> None:
    assert [provider_name(p) for p in ("openai", "anthropic", "google", "azure", "mistral", "xai")] == [
        "openai", "anthropic", "gcp.gemini", "azure.ai.openai", "mistral_ai", "x_ai"]  # fmt: skip
    assert provider_name("local-vllm") == "local-vllm"


def test_traceparent_and_bounded_values() -> None:
    assert traceparent(CALLER_TRACE, CALLER_SPAN, 1) == CALLER_PARENT
    assert traceparent(1, 2, 0) == "00-00000000000000000000000000000001-0000000000000002-00"
    assert bounded(3) == 3
    assert bounded(True) is True
    assert bounded(0.5) == 0.5
    assert bounded("x" * 1000) == "x" * 256
    assert bounded(None) == "None"
    assert printable("/v1/chat/completions") == "/v1/chat/completions"
    assert printable("/x/\udc80caf\u00e9\x00") == "/x/?caf??"
    assert printable("y" * 300) == "y" * 256


# --------------------------------------------------------------------------- off


def test_off_means_none_and_nothing_of_opentelemetry_imported() -> None:
    code = (
        "import sys\n"
        "import sidecar.server, sidecar.tracing\n"
        "from pathlib import Path\n"
        "from sidecar.config import parse_config_text\n"
        "from sidecar.logs import OpLog\n"
        "cfg = parse_config_text('log: {level: info}', Path('/x/sidecar.yaml'))\n"
        "assert sidecar.tracing.Tracing.from_config(cfg, OpLog()) is None\n"
        "assert sidecar.tracing.Tracing.from_config(None, OpLog()) is None\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                         env=subprocess_env(), cwd=REPO, check=True)  # fmt: skip
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# --------------------------------------------------------------------------- spans


def test_request_span_is_a_server_span_under_the_callers_traceparent(
    tracing: Tracing, exported: InMemorySpanExporter
) -> None:
    trace = start(tracing, {"traceparent": CALLER_PARENT, "tracestate": "vendor=abc"})
    trace.end(200)
    (span,) = exported.get_finished_spans()
    assert span.name == "POST /v1/chat/completions"
    assert span.kind is SpanKind.SERVER
    assert span.context.trace_id == CALLER_TRACE
    assert span.parent is not None
    assert span.parent.span_id == CALLER_SPAN
    assert span.parent.is_remote
    assert dict(span.attributes or {}) == {
        "http.request.method": "POST", "url.path": "/v1/chat/completions",
        "http.route": "/v1/chat/completions", "sidecar.format": "openai",
        "gen_ai.operation.name": "chat", "sidecar.request_id": "req-1",
        "http.response.status_code": 200, "sidecar.attempts": 0,
    }  # fmt: skip
    assert span.status.status_code is StatusCode.UNSET
    assert span.resource.attributes["service.name"] == "test-sidecar"


@pytest.mark.parametrize(
    "header",
    [
        "",
        "garbage",
        f"00-{0:032x}-{CALLER_SPAN:016x}-01",
        f"ff-{CALLER_TRACE:032x}-{CALLER_SPAN:016x}-01",
    ],
)
def test_a_missing_or_invalid_traceparent_starts_a_new_trace(
    tracing: Tracing, exported: InMemorySpanExporter, header: str
) -> None:
    start(tracing, {"traceparent": header} if header else {}).end(200)
    (span,) = exported.get_finished_spans()
    assert span.parent is None
    assert span.context.trace_id not in (0, CALLER_TRACE)


def test_failover_two_attempt_spans_and_the_event_between_them(
    tracing: Tracing, exported: InMemorySpanExporter
) -> None:
    trace = start(tracing, {"traceparent": CALLER_PARENT})
    first = trace.attempt(1, "openai", "gpt-4o-mini", "policy", "k1")
    assert first is not None
    first.end(429, "rate_limited")
    second = trace.attempt(2, "openai", "gpt-4o-mini", "policy", "k2")
    assert second is not None
    headers: dict[str, str] = {"traceparent": CALLER_PARENT, "tracestate": "stale=1"}
    second.inject(headers)
    second.end(200, "ok")
    trace.end(200, request_model="gpt-4o-mini", response_model="gpt-4o-mini-2024-07-18",
              usage=_Usage(12, 5), access_key="app")  # fmt: skip

    spans = exported.get_finished_spans()
    assert len(spans) == 3
    server = next(s for s in spans if s.kind is SpanKind.SERVER)
    a1, a2 = sorted((s for s in spans if s.kind is SpanKind.CLIENT),
                    key=lambda s: s.attributes["sidecar.attempt"])  # type: ignore[index]  # fmt: skip
    for attempt in (a1, a2):
        assert attempt.name == "chat gpt-4o-mini"
        assert attempt.parent is not None
        assert attempt.parent.span_id == server.context.span_id
        assert attempt.context.trace_id == CALLER_TRACE
    assert dict(a1.attributes or {}) == {
        "gen_ai.provider.name": "openai", "sidecar.provider": "openai",
        "sidecar.key.source": "policy", "sidecar.key.id": "k1", "sidecar.attempt": 1,
        "gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o-mini",
        "sidecar.outcome": "rate_limited", "http.response.status_code": 429, "error.type": "429",
    }  # fmt: skip
    assert a1.status.status_code is StatusCode.ERROR
    assert a2.attributes["http.response.status_code"] == 200  # type: ignore[index]
    assert a2.attributes["sidecar.key.id"] == "k2"  # type: ignore[index]
    assert a2.status.status_code is StatusCode.UNSET
    assert "error.type" not in (a2.attributes or {})

    (event,) = server.events
    assert event.name == "failover"
    assert dict(event.attributes or {}) == {
        "sidecar.attempt": 1, "sidecar.outcome": "rate_limited", "sidecar.provider": "openai",
        "sidecar.key.id": "k1", "http.response.status_code": 429,
        "gen_ai.request.model": "gpt-4o-mini", "sidecar.next.provider": "openai",
        "sidecar.next.key_id": "k2", "sidecar.next.model": "gpt-4o-mini",
    }  # fmt: skip
    attrs = server.attributes or {}
    assert {k: attrs[k] for k in attrs if k.startswith(("gen_ai.", "sidecar.key", "sidecar.acc"))} == {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-4o-mini", "gen_ai.response.model": "gpt-4o-mini-2024-07-18",
        "gen_ai.usage.input_tokens": 12, "gen_ai.usage.output_tokens": 5,
        "sidecar.key.source": "policy", "sidecar.key.id": "k2", "sidecar.access_key": "app",
    }  # fmt: skip
    assert attrs["sidecar.attempts"] == 2
    # Upstream gets the attempt's own context; the caller's tracestate is not replayed stale.
    assert headers == {"traceparent": traceparent(CALLER_TRACE, a2.context.span_id, 1)}


def test_tracestate_from_the_caller_goes_upstream(tracing: Tracing) -> None:
    trace = start(tracing, {"traceparent": CALLER_PARENT, "tracestate": "vendor=abc,other=1"})
    attempt = trace.attempt(1, "anthropic", "claude-3-5-haiku", "attached", "mine")
    assert attempt is not None
    headers: dict[str, str] = {}
    attempt.inject(headers)
    assert headers["tracestate"] == "vendor=abc,other=1"
    assert headers["traceparent"].startswith(f"00-{CALLER_TRACE:032x}-")
    attempt.end(200, "ok")
    trace.end(200)


def test_a_retry_of_the_same_key_is_a_retry_event_and_a_translation_is_told(
    tracing: Tracing, exported: InMemorySpanExporter
) -> None:
    trace = start(tracing)
    a = trace.attempt(
        1, "anthropic", "claude-3-5-haiku", "policy", "k1", translated="openai->anthropic"
    )
    assert a is not None
    a.end(None, "timeout")
    b = trace.attempt(
        2, "anthropic", "claude-3-5-haiku", "policy", "k1", translated="openai->anthropic"
    )
    assert b is not None
    b.end(200, "ok")
    trace.end(200)
    spans = by_name(exported.get_finished_spans())
    server = spans["POST /v1/chat/completions"]
    assert [e.name for e in server.events] == ["translated", "retry", "translated"]
    assert server.events[0].attributes == {
        "sidecar.translation": "openai->anthropic",
        "sidecar.attempt": 1,
    }
    retry = server.events[1].attributes or {}
    assert (retry["sidecar.outcome"], retry["sidecar.attempt"]) == ("timeout", 1)
    assert "http.response.status_code" not in retry
    timed_out = next(
        dict(s.attributes or {}) for s in exported.get_finished_spans() if s.kind is SpanKind.CLIENT
    )
    assert (timed_out["sidecar.attempt"], timed_out["error.type"]) == (1, "timeout")
    assert timed_out["sidecar.translation"] == "openai->anthropic"


def test_events_map_known_keywords_and_bound_the_rest(
    tracing: Tracing, exported: InMemorySpanExporter
) -> None:
    trace = start(tracing)
    trace.event("stream_resumed", provider="anthropic", key_id="k2", model="claude", attempt=3)
    trace.event("key_cooling", provider="openai", key_source="policy", key_id="k1",
                outcome="rate_limited", until_s=30.0, note="x" * 500, skipped=None)  # fmt: skip
    trace.end(200)
    (span,) = exported.get_finished_spans()
    resumed, cooling = span.events
    assert dict(resumed.attributes or {}) == {
        "sidecar.provider": "anthropic", "sidecar.key.id": "k2",
        "gen_ai.request.model": "claude", "sidecar.attempt": 3,
    }  # fmt: skip
    attrs = dict(cooling.attributes or {})
    assert attrs["sidecar.key.source"] == "policy"
    assert attrs["sidecar.until_s"] == 30.0
    assert attrs["sidecar.outcome"] == "rate_limited"
    assert attrs["sidecar.note"] == "x" * 256
    assert "sidecar.skipped" not in attrs


def test_server_errors_mark_the_request_failed_and_caller_errors_do_not(
    tracing: Tracing, exported: InMemorySpanExporter
) -> None:
    start(tracing).end(502)
    start(tracing).end(401)
    start(tracing).end(499, error="client_closed")
    failed, refused, gone = exported.get_finished_spans()
    assert failed.status.status_code is StatusCode.ERROR
    assert (failed.attributes or {})["error.type"] == "502"
    assert refused.status.status_code is StatusCode.UNSET
    assert "error.type" not in (refused.attributes or {})
    assert gone.status.status_code is StatusCode.ERROR
    assert (gone.attributes or {})["error.type"] == "client_closed"


def test_an_attempt_left_open_is_ended_by_the_next_one_or_by_the_request(
    tracing: Tracing, exported: InMemorySpanExporter
) -> None:
    trace = start(tracing)
    trace.attempt(1, "openai", "gpt-4o", "policy", "k1")  # never ended by the handler
    trace.attempt(2, "openai", "gpt-4o", "policy", "k2")  # cancelled with the request
    trace.end(499, error="cancelled")
    trace.end(200)  # a second end changes nothing
    spans = exported.get_finished_spans()
    assert len(spans) == 3
    outcomes = sorted((s.attributes or {}).get("sidecar.outcome", "") for s in spans)
    assert outcomes == ["", "abandoned", "abandoned"]
    server = next(s for s in spans if s.kind is SpanKind.SERVER)
    assert [e.name for e in server.events] == ["failover"]
    assert server.attributes["http.response.status_code"] == 499  # type: ignore[index]


def test_a_model_less_attempt_is_named_by_its_operation(
    tracing: Tracing, exported: InMemorySpanExporter
) -> None:
    trace = start(tracing, path="/v1/responses/resp_1")
    attempt = trace.attempt(1, "openai", None, "policy", "k1")
    assert attempt is not None
    attempt.end(200, "ok")
    trace.end(200)
    assert {s.name for s in exported.get_finished_spans()} == {"attempt", "POST /v1/responses/{id}"}


# --------------------------------------------------------------------------- sampling


def test_sample_ratio_zero_records_nothing_yet_still_propagates(
    exported: InMemorySpanExporter,
) -> None:
    cfg = TracingConfig("http://127.0.0.1:1/v1/traces", sample_ratio=0.0)
    tracing = Tracing(cfg, make_provider(cfg, SimpleSpanProcessor(exported)), OpLog())
    trace = tracing.start_request("openai", "POST", "/v1/chat/completions", {})
    assert trace is not None
    attempt = trace.attempt(1, "openai", "gpt-4o", "policy", "k1")
    assert attempt is not None
    headers: dict[str, str] = {}
    attempt.inject(headers)
    attempt.end(200, "ok")
    trace.event("stream_resumed", provider="openai")
    trace.end(200)
    assert exported.get_finished_spans() == ()
    assert int(headers["traceparent"][-2:], 16) & 1 == 0  # not sampled, and said so upstream
    # A caller that sampled its trace decides for it.
    followed = tracing.start_request(
        "openai", "POST", "/v1/chat/completions", {"traceparent": CALLER_PARENT}
    )
    assert followed is not None
    followed.end(200)
    (span,) = exported.get_finished_spans()
    assert span.context.trace_id == CALLER_TRACE


def test_an_sdk_turned_off_by_its_environment_leaves_the_callers_headers(
    monkeypatch: pytest.MonkeyPatch, exported: InMemorySpanExporter
) -> None:
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    tracing = Tracing(CFG, make_provider(CFG, SimpleSpanProcessor(exported)), OpLog())
    trace = start(tracing, {"traceparent": CALLER_PARENT})
    attempt = trace.attempt(1, "openai", "gpt-4o", "policy", "k1")
    assert attempt is not None
    headers = {"traceparent": CALLER_PARENT}
    attempt.inject(headers)
    attempt.end(200, "ok")
    trace.end(200)
    assert headers == {"traceparent": CALLER_PARENT}
    assert exported.get_finished_spans() == ()


# --------------------------------------------------------------------------- failures


class _Exploding(dict[str, str]):
    def __contains__(self, key: object) -> bool:
        raise RuntimeError("boom")


def test_tracing_never_raises_into_the_request_and_says_so_once(tracing: Tracing, log: LogSink) -> None:
    assert tracing.start_request("openai", "POST", "/v1/chat/completions", _Exploding()) is None
    assert tracing.start_request("openai", "POST", "/v1/chat/completions", _Exploding()) is None
    trace = start(tracing)
    attempt = trace.attempt(1, "openai", "gpt-4o", "policy", "k1")
    assert attempt is not None
    attempt.inject(None)  # type: ignore[arg-type]
    trace.end(200, usage=object())  # type: ignore[arg-type]
    failures = [e for e in log.records() if e["event"] == "tracing_failed"]
    assert failures == [{**failures[0], "level": "error", "error": "RuntimeError"}]


class _Collector:
    """An exporter that fails, then works again; or blocks on shutdown."""

    def __init__(
        self, results: list[SpanExportResult], block: threading.Event | None = None
    ) -> None:
        self.results = results
        self.block = block
        self.exported = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.exported += len(spans)
        result = self.results.pop(0) if self.results else SpanExportResult.SUCCESS
        if result is None:
            raise ConnectionError("collector down")
        return result

    def shutdown(self) -> None:
        if self.block is not None:
            self.block.wait(5)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def test_a_failing_collector_is_logged_once_and_its_recovery_too(log: LogSink) -> None:
    failing = SpanExportResult.FAILURE
    inner = _Collector([failing, None, failing, SpanExportResult.SUCCESS, SpanExportResult.SUCCESS])  # type: ignore[list-item]
    exporter = LoggedExporter(inner, OpLog("debug", log), "collector:4318")  # type: ignore[arg-type]
    results = [exporter.export([]) for _ in range(5)]
    assert results == [
        failing,
        failing,
        failing,
        SpanExportResult.SUCCESS,
        SpanExportResult.SUCCESS,
    ]
    events = [(e["event"], e.get("error")) for e in log.records()]
    assert events == [("trace_export_failed", None), ("trace_export_recovered", None)]
    assert '"endpoint":"collector:4318"' in log.getvalue()


async def test_close_flushes_the_batch_and_is_bounded_by_its_deadline(log: LogSink) -> None:
    inner = _Collector([])
    processor = BatchSpanProcessor(inner, schedule_delay_millis=60_000)  # type: ignore[arg-type]
    tracing = Tracing(CFG, make_provider(CFG, processor), OpLog("debug", log))
    start(tracing).end(200)
    await tracing.close(5.0)
    assert inner.exported == 1  # queued, then flushed at close

    stuck = threading.Event()
    processor = BatchSpanProcessor(_Collector([], stuck))  # type: ignore[arg-type]
    blocking = Tracing(CFG, make_provider(CFG, processor), OpLog("debug", log))
    began = time.monotonic()
    await blocking.close(0.2)
    assert time.monotonic() - began < 1.0
    stuck.set()
    assert [e["event"] for e in log.records()] == ["trace_flush_incomplete"]


async def test_from_config_builds_a_batch_exporter_to_the_endpoint(
    tmp_path: Path, log: LogSink
) -> None:
    cfg = parse_config_text(
        "tracing: {endpoint: 'http://127.0.0.1:9/v1/traces', sample_ratio: 0.5, "
        "headers: {authorization: 'Bearer hunter2'}, timeout: 500ms}",
        tmp_path / "sidecar.yaml",
    )
    tracing = Tracing.from_config(cfg, OpLog("debug", log))
    assert tracing is not None
    assert tracing.config == cfg.tracing
    processors = tracing._provider._active_span_processor._span_processors
    (processor,) = processors
    assert isinstance(processor, BatchSpanProcessor)
    assert isinstance(processor.span_exporter, LoggedExporter)
    await tracing.close(2.0)
    (on,) = log.records()
    assert (on["event"], on["endpoint"], on["sample_ratio"]) == ("tracing_on", "127.0.0.1:9", 0.5)
    assert "hunter2" not in log.getvalue()
    assert tracing.config.headers == (("authorization", Secret("Bearer hunter2")),)  # type: ignore[union-attr]


class _Usage:
    def __init__(self, input_tokens: int, output_tokens: int) -> None:
        self.input_tokens = input_tokens
        self.output_tokens = output_tokens
