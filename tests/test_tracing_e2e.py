"""Traces end to end (docs/reference.md#traces): a real `sidecar serve` exports OTLP/HTTP to
a receiver in this process, for a request that fails over once.

The caller (the official OpenAI SDK) sends a `traceparent`; the first policy key gets a
429 from the mock provider, the second answers. The spans must say so: a server span in
the caller's trace, two client spans under it (429, then 200), a `failover` event, the
GenAI attributes, the key's source and id and never its value; and the mock must have
received each attempt's own `traceparent` in the caller's trace.
"""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from tests.harness import Env, spawn_sidecar

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
CALLER_PARENT = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
FAILING_KEY = "sk-e2e-trace-fail-429-retry-none-7f3a"  # the mock answers 429 to this key
GOOD_KEY = "sk-e2e-trace-good-91c4"
MODEL = "gpt-4o-mini"
WAIT_S = 15.0


@dataclass
class Receiver:
    """An OTLP/HTTP traces endpoint: every export's raw bytes, and its decoded spans."""

    raw: list[bytes] = field(default_factory=list)
    resources: list[dict[str, Any]] = field(default_factory=list)
    spans: list[Span] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("content-encoding") == "gzip":
            body = gzip.decompress(body)
        self.raw.append(body)
        message = ExportTraceServiceRequest()
        message.ParseFromString(body)
        for resource_spans in message.resource_spans:
            self.resources.append(attributes(resource_spans.resource.attributes))
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend(scope_spans.spans)
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")  # fmt: skip


def attributes(kvs: Any) -> dict[str, Any]:
    out = {}
    for kv in kvs:
        which = kv.value.WhichOneof("value")
        out[kv.key] = getattr(kv.value, which) if which else None
    return out


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/v1/traces", rec.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield rec, str(server.make_url("/v1/traces"))
    await server.close()


def _config(env: Env, endpoint: str) -> Path:
    bad, good = env.secret("openai", "bad", FAILING_KEY), env.secret("openai", "good", GOOD_KEY)
    env.write_config(
        "log: {level: info}\n"
        "failover: {retry: {attempts: 0}}\n"
        f"tracing: {{endpoint: '{endpoint}', service_name: e2e-sidecar, sample_ratio: 0}}\n"
        "providers:\n  - id: openai\n    base_url: UPSTREAM\n"
        f'    api_keys: [{{id: first, value: "{bad}"}}, {{id: second, value: "{good}"}}]\n'
    )
    return env.config


async def _spans(rec: Receiver, count: int) -> list[Span]:
    """The exported spans once at least `count` arrived (the batch goes out within ~1 s)."""
    for _ in range(int(WAIT_S / 0.1)):
        if len(rec.spans) >= count:
            return rec.spans
        await asyncio.sleep(0.1)
    pytest.fail(f"{len(rec.spans)} spans exported within {WAIT_S} s, expected {count} "
                "(is tracing wired into the request path?)")  # fmt: skip


def _by_kind(spans: list[Span], kind: int) -> Iterator[Span]:
    return (s for s in spans if s.kind == kind)


async def test_a_request_that_fails_over_once_is_one_trace_in_the_callers_trace(
    env: Env, tmp_path: Path, receiver: tuple[Receiver, str]
) -> None:
    rec, endpoint = receiver
    # sample_ratio 0: only the caller's sampled traceparent makes this trace recorded.
    config = _config(env, endpoint)
    token = env.access_key("app")
    p = await asyncio.to_thread(spawn_sidecar, config, tmp_path / "out.log")
    try:
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{p.proxy_port}/v1", api_key=token,
                                    max_retries=0)  # fmt: skip
        async with client:
            answer = await client.chat.completions.with_raw_response.create(
                model=MODEL, messages=[{"role": "user", "content": "trace these four words"}],
                extra_headers={"traceparent": CALLER_PARENT, "tracestate": "vendor=e2e"},
            )  # fmt: skip
        completion = answer.parse()
        assert answer.headers["x-sidecar-attempts"] == "2"
        assert completion.usage is not None
        spans = await _spans(rec, 3)
    finally:
        p.stop(10)
    upstream_url = env.upstream.removesuffix("/v1")
    async with aiohttp.ClientSession() as http, http.get(upstream_url + "/_mock/requests") as r:
        upstream = (await r.json())["requests"]

    servers = list(_by_kind(spans, Span.SPAN_KIND_SERVER))
    assert len(servers) == 1, [s.name for s in spans]
    (server,) = servers
    assert server.trace_id.hex() == CALLER_TRACE
    assert server.parent_span_id.hex() == CALLER_SPAN
    assert server.name == "POST /v1/chat/completions"
    attrs = attributes(server.attributes)
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.provider.name"] == "openai"
    assert attrs["gen_ai.request.model"] == MODEL
    assert attrs["gen_ai.response.model"] == completion.model
    assert attrs["gen_ai.usage.input_tokens"] == completion.usage.prompt_tokens
    assert attrs["gen_ai.usage.output_tokens"] == completion.usage.completion_tokens
    assert (attrs["sidecar.key.source"], attrs["sidecar.key.id"]) == ("policy", "second")
    assert attrs["sidecar.access_key"] == "app"
    assert attrs["http.response.status_code"] == 200
    assert attrs["sidecar.attempts"] == 2

    attempts = sorted(
        (s for s in _by_kind(spans, Span.SPAN_KIND_CLIENT) if s.trace_id == server.trace_id),
        key=lambda s: attributes(s.attributes)["sidecar.attempt"],
    )
    assert len(attempts) == 2
    first, second = (attributes(a.attributes) for a in attempts)
    for a in attempts:
        assert a.parent_span_id == server.span_id
        assert a.name == f"chat {MODEL}"
    assert (first["sidecar.key.id"], first["http.response.status_code"]) == ("first", 429)
    assert (first["sidecar.outcome"], first["error.type"]) == ("rate_limited", "429")
    assert attempts[0].status.code == attempts[0].status.STATUS_CODE_ERROR
    assert (second["sidecar.key.id"], second["http.response.status_code"]) == ("second", 200)
    assert second["sidecar.outcome"] == "ok"
    for a in (first, second):
        assert (a["gen_ai.provider.name"], a["gen_ai.request.model"]) == ("openai", MODEL)
        assert a["sidecar.key.source"] == "policy"

    failovers = [e for e in server.events if e.name == "failover"]
    assert len(failovers) == 1
    event = attributes(failovers[0].attributes)
    assert (event["http.response.status_code"], event["sidecar.outcome"]) == (429, "rate_limited")
    assert (event["sidecar.key.id"], event["sidecar.next.key_id"]) == ("first", "second")

    assert {r["service.name"] for r in rec.resources} == {"e2e-sidecar"}
    exported = b"".join(rec.raw)
    for secret in (FAILING_KEY, GOOD_KEY, token):
        assert secret.encode() not in exported

    # Each attempt went upstream with its own span as the parent, in the caller's trace.
    chats = [u for u in upstream if u["path"] == "/v1/chat/completions"]
    assert [u["key"] for u in chats] == [FAILING_KEY, GOOD_KEY]
    for sent, span in zip(chats, attempts, strict=True):
        assert sent["headers"]["traceparent"] == f"00-{CALLER_TRACE}-{span.span_id.hex()}-01"
        assert sent["headers"]["tracestate"] == "vendor=e2e"
