"""A local OpenAI, Anthropic, Gemini and Azure OpenAI look-alike (`sidecar mock-provider`).

For demos, the sidecar's own tests and users' CI. It answers the OpenAI
routes (`/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`,
`/v1/responses`, `GET /v1/models`; `Authorization: Bearer K` or Azure's
`api-key: K`), the Anthropic routes (`/v1/messages`,
`/v1/messages/count_tokens`; `x-api-key: K` or Bearer), the Gemini API
(`POST /v1beta/models/{model}:generateContent`, `:streamGenerateContent`,
`:countTokens`, `:embedContent`, `:batchEmbedContents`, also under `/v1/`;
`x-goog-api-key: K` or `?key=K`) and Azure OpenAI
(`/openai/deployments/{deployment}/chat/completions`, `/completions`,
`/embeddings`, with `?api-version=` required, the deployment as the answer's
`model`; `/openai/v1/chat/completions`, `/completions`, `/embeddings`,
`/responses` with the model in the body; `api-key: K` or Bearer) with
deterministic bodies in the real wire shapes, streams included.

Gemini answers are GenerateContentResponses (`modelVersion` is the model of
the path, `responseId` `mock-N`); `:streamGenerateContent?alt=sse` sends one
`data: {...}\r\n\r\n` event per reply piece, then a last one with an empty
text part, `finishReason` and `usageMetadata` (the only event with usage), and
no terminator; without `alt=sse` it answers the same chunks as one JSON array.
`:countTokens` answers `{"totalTokens": n}`, `:embedContent`
`{"embedding": {"values": [...]}}` and `:batchEmbedContents` (what the SDK
calls) `{"embeddings": [...]}`, each vector the one OpenAI's route gives the
same text. Errors are `{"error": {"code", "message", "status"[, "details"]}}`;
a request without a key gets Google's 403 `PERMISSION_DENIED`.

Tools, in the three formats: a request that offers tools (OpenAI `tools[].function`,
Anthropic `tools[]`, Gemini `tools[].functionDeclarations[]`), unless its tool
choice is none (`"none"`, `{"type": "none"}`, mode `NONE`) or its last message
is a prefill, gets a call to the first tool (or the one the tool choice names:
`{"type": "function", "function": {"name"}}`, `{"type": "tool", "name"}`,
`allowedFunctionNames[0]`), with arguments `{"location": "Paris"}` when the
schema has a `location` property, else each required property filled (its
first `enum` value, else "x", 1, true, [] or {} by type). OpenAI answers
`tool_calls` (id `call_mock_N`, arguments as compact JSON) with finish reason
`tool_calls`; Anthropic a `tool_use` block (id `toolu_mock_N`), stop reason
`tool_use`; Gemini a whole `functionCall` part, finish reason `STOP` (streamed:
one event). Streams deliver the arguments in 8-character pieces, at least two
(OpenAI `tool_calls` deltas after a first delta with the id and name;
Anthropic `input_json_delta`); the output token count is the number of pieces.
A request whose last turn holds tool results (OpenAI trailing `tool`
messages, Anthropic `tool_result` blocks in the last user message, Gemini
`functionResponse` parts in the last content) gets the text answer
"The tool said: R" (several results joined by "; "), R being the result's text
(a Gemini `response` object with one string value: that value; else the object
as compact JSON).

Images: a request with images (OpenAI `image_url` parts, Anthropic `image`
blocks, Gemini `inlineData`/`fileData` parts) and no tool business gets the
text answer "I see N image(s) (D; D...)." with D `base64 <media type>, <n> bytes`
(a data URL or inline data, its decoded size), `url <url>` (an image URL or a
Gemini `fileUri`) or `file <file_id>`, e.g. "I see 1 image (base64 image/png,
68 bytes)."

Misbehaviour is provoked by directives inside the provider key or the
request's `model`, each bounded by start/end or one of `-_:`
(`sk-test-fail-429`, `gpt-4o-mini-slow-200`):

- `fail-NNN` (400..599): that status with the format's error body;
  `fail-429` adds `retry-after: 1`, `fail-429-retry-N` makes it N seconds,
  `fail-429-retry-none` sends no `retry-after`.
- `quota-N`, `quota-N-reset-S` (S defaults to 60): a quota of N requests per S seconds,
  counted per key and model (the count starts again S seconds after a window's first
  request). Every answer for that key and model carries the format's quota headers, the
  count including this request: OpenAI and Azure `x-ratelimit-limit-requests: N`,
  `x-ratelimit-remaining-requests: max(0, N - count)`, `x-ratelimit-reset-requests: Ss`
  and `x-ratelimit-limit-tokens: 1000*N`, `x-ratelimit-remaining-tokens`
  (1000 times the requests left), `x-ratelimit-reset-tokens: Ss`; Anthropic
  `anthropic-ratelimit-requests-limit|remaining|reset` and `anthropic-ratelimit-tokens-*`
  with the same numbers, the reset an RFC 3339 UTC time S seconds ahead (rounded up to
  the second). Past N (nothing left), the answer is a 429 in the format's shape with
  `retry-after: S` (Azure's with `retry-after-ms` too; Gemini's a RESOURCE_EXHAUSTED with
  RetryInfo `Ss`). Gemini answers carry no quota headers, as Google's do not.
- `fail-quota`: 429 `insufficient_quota`, no `retry-after`.
- `fail-context`: 400, the prompt is too long for this model (OpenAI
  `context_length_exceeded`; Anthropic `prompt is too long: …`).
- `fail-nomodel`: 404, no such model (OpenAI `model_not_found`; Anthropic a
  `not_found_error` naming the model).
- `flaky-N`: the first N requests with this key and model answer 503, later
  ones succeed (a passing upstream fault; counted per key and model).
- `drop`: the connection is closed without any response.
- `slow-N`: N ms pass before the response headers are sent.
- `stall-N`: N ms between stream chunks.
- `break`: a stream sends two content chunks, then the connection is closed
  with no terminator.
- `first-N`: a stream sends its preamble at once (the chat role chunk; the
  Anthropic `message_start`, `content_block_start` and `ping`; the responses
  `created`/`added` events; nothing for completions), then waits N ms before
  the first content event (a slow first token). A JSON answer waits N ms
  before its headers, like `slow-N`.
- `silent`: the request is read and nothing is ever sent, headers included,
  until the caller hangs up (after 10 minutes the connection is closed).
- `stuck`: a stream sends its preamble and two content events, then nothing,
  holding the connection open until the caller hangs up (10 minutes at most).
- `drip-N`: a stream that never ends: its preamble and first content event at
  once, then one content event every N ms — the reply's pieces over and over —
  until the caller hangs up (after 10 minutes the connection is closed).
  Long-lived streams that keep flowing, as `make bench` holds open to measure
  memory; it replaces `stall-N`.
- `garble`: a stream sends its preamble and two content events, then one event
  whose data is truncated JSON (`data: {"choices": [{"delta": {"content": "oops`
  in the OpenAI formats; a cut content event in the others), then the rest.
- `nodone`: a stream is complete (all content, finish reason or stop reason,
  usage if asked) but lacks its terminator: no `data: [DONE]`, no
  `message_stop`, no `response.completed`; the response then ends cleanly.
- `early-error`: a 200 stream sends its preamble, then an in-band error event
  (OpenAI chat/completions `data: {"error": {... "type": "server_error"}}`;
  responses `event: error`; Anthropic `event: error` with `overloaded_error`),
  then ends cleanly.
- `late-error`: the same error event after the preamble and two content events.
- `fail-filter`: 400, the prompt was rejected by a content policy (OpenAI
  `content_filter`, param `prompt`; Anthropic `Output blocked by content
  filtering policy`).
- `noprefill`: a request whose `messages` ends with an assistant message gets a
  400 (`This model does not support assistant message prefill. ...`; OpenAI
  code `prefill_unsupported`); other requests are answered as usual.
- `flap`: the 1st, 3rd, 5th... requests with this key and model answer 503,
  the others succeed (counted like `flaky-N`).
- `hold-N`: a JSON answer sends its headers at once and its body N ms later
  (a stalled body; the wait ends early if the caller hangs up).
- `huge-N`: a JSON answer carries N MiB of leading whitespace before the
  usual object (so it still parses to the same answer); it is generated in
  1 MiB chunks as it is sent, never held whole.
- `bomb-N`: the same answer, `Content-Encoding: gzip`, decoding to N MiB of
  whitespace plus the object (a decompression bomb: ~1 KiB per MiB sent).
- `leaky`: a 401/403 from `fail-401`/`fail-403` uses the provider's own wording,
  which names a masked fragment of the key sent, as OpenAI's does
  (`Incorrect API key provided: sk-proj-********************ab12. ...`; Gemini:
  `API key not valid: AIz********************ab12. Please pass a valid API key.`).
- `fail-badkey`: each provider's real answer to an unknown or revoked key:
  OpenAI's 401 `invalid_api_key` (as `leaky`), Anthropic's 401 `invalid
  x-api-key`, Azure's 401, and Google's 400 `INVALID_ARGUMENT` `API key not
  valid. Please pass a valid API key.` with an ErrorInfo `API_KEY_INVALID`.

In Gemini's shapes: `fail-429` is a 429 `RESOURCE_EXHAUSTED` ("Resource has
been exhausted (e.g. check quota).") with a google.rpc.QuotaFailure violation
`GenerateRequestsPerMinutePerProjectPerModel-FreeTier` and a google.rpc.RetryInfo
`retryDelay` of `Ns` where the others send `retry-after: N` (Google sends no
such header); `fail-quota` names `GenerateRequestsPerDayPerProjectPerModel-FreeTier`
("You exceeded your current quota, ..."), no RetryInfo unless `-retry-N`;
`fail-context` is a 400, `fail-nomodel` a 404 `NOT_FOUND`, and `fail-filter`
Google's 200 `{"promptFeedback": {"blockReason": "SAFETY"}}` without candidates
(one such event in a stream). The in-band error of `early-error`/`late-error`
is `data: {"error": {"code": 503, "message": ..., "status": "UNAVAILABLE"}}`;
`garble` truncates a chunk; `nodone` changes nothing (no terminator to omit);
`first-N` waits before the first event (there is no preamble).

In Azure's shapes: a 429 is `{"error": {"code": "429", "message": "Requests to
the ChatCompletions_Create Operation under Azure OpenAI API version V have
exceeded token rate limit of your current OpenAI S0 pricing tier. Please retry
after N seconds. Please go here: ..."}}` (`Completions_Create`,
`Embeddings_Create`, `Responses_Create`; V is `v1` on `/openai/v1/`) with
`retry-after: N` and `retry-after-ms: N000` (no sentence and no headers for
`-retry-none`); a 401 or a missing key is Azure's `{"error": {"code": "401",
"message": "Access denied due to invalid subscription key or wrong API
endpoint. ..."}}`; `fail-nomodel` is a 404 `DeploymentNotFound`; a deployment
route without `api-version` is a 404 `{"error": {"code": "404", "message":
"Resource not found"}}`. Other errors, `fail-quota` included, are OpenAI's.

`huge`, `bomb` and `hold` apply to successful JSON answers (not to streams);
`break`, `stuck`, `drip`, `garble`, `nodone`, `early-error` and `late-error` to
streams only. "Two content events" means fewer when the reply is shorter (a short
`max_tokens` or a prefill): the fault then comes after the last of them.

Prefill: on `/v1/chat/completions` and `/v1/messages`, a trailing assistant
message (a string, or its text blocks joined) is a prefill T. When the reply
starts with T (or with T stripped of trailing whitespace) the answer is only
the rest of the reply, so `Hello from` is continued with ` the mock provider.`;
otherwise it is the whole reply. Streamed pieces join to exactly that text.

Token counts are whitespace-separated words: input is every word of the
prompt (message contents, text parts, `system`, `instructions`; at least 1),
output the words of the reply, "Hello from the mock provider." (or its
continuation after a prefill) truncated to `max_tokens`.

Request bodies are any valid JSON (lone surrogate escapes and integers wider
than 64 bits included), plain or gzip/deflate-encoded; a body that is not what
its `Content-Encoding` says gets a 400.

An OTLP/HTTP trace sink, for the benchmark's `--tracing`: `POST /v1/traces`
reads the body and discards it (spans are not decoded), counts the request and
its bytes (as sent, compressed or not) under its `?source=` (empty when none;
at most 1000 sources, later ones are counted under the empty one), and answers
200 with an empty `application/x-protobuf` body (an empty
ExportTraceServiceResponse: all accepted); a body over 16 MiB gets a 413,
counted as `too_large`. `GET /_mock/traces` returns
`{"sources": {"<source>": {"requests", "bytes", "too_large"}}}`.

Test hooks: every request outside `/_mock/` and `/v1/traces` is kept in a
bounded log (the last 1000), unknown paths included (they answer 404
`unknown_url`):
`GET /_mock/requests` returns `{"requests": [{method, path, raw_path, query,
headers, body, key, format, auth, model}]}` with header names lower-cased
(`path` decoded, `raw_path` as sent, query string included; `body` the request
body as received, null when not JSON; `key` the credential the route reads,
else any other one sent; `auth` where `key` came from: `authorization`,
`x-api-key`, `api-key`, `x-goog-api-key` or `?key`, null without one; `format`
the route's wire format, `openai` (Azure's routes too), `anthropic` or
`gemini`, null on an unknown path; `model` the body's `model`, or the model or
deployment of the path on Gemini and Azure deployment routes, else null),
`DELETE /_mock/requests` clears it (and the `flaky-N`, `flap` and `quota-N` counts and the
trace sink's),
`GET /_mock/health` answers 200.
"""

from __future__ import annotations

import asyncio
import base64
import enum
import functools
import hashlib
import itertools
import json
import math
import re
import struct
import time
import zlib
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from sidecar.connections import raise_fd_limit

__all__ = [
    "DEFAULT_LISTEN",
    "Directives",
    "TraceCounts",
    "create_app",
    "gzip_padded",
    "masked_key",
    "parse_directives",
    "run",
]

DEFAULT_LISTEN = "127.0.0.1:8089"

_LOG_SIZE = 1000
_TRACES_MAX = 16 << 20  # `POST /v1/traces`: a larger body gets a 413
_TRACES_CHUNK = 1 << 16
_REPLY = "Hello from the mock provider."
# Stream pieces concatenate back to _REPLY, as real token deltas do.
_PIECE_RE = re.compile(r"\s*\S+")
_PIECES: tuple[str, ...] = tuple(_PIECE_RE.findall(_REPLY))
_MODELS = (
    ("gpt-4o-mini", "mock"),
    ("gpt-4o", "mock"),
    ("text-embedding-3-small", "mock"),
    ("claude-3-5-haiku-latest", "mock"),
    ("claude-sonnet-4-5", "mock"),
)
_MODELS_BODY = orjson.dumps(
    {
        "object": "list",
        "data": [
            {"id": m, "object": "model", "created": 1700000000, "owned_by": owner}
            for m, owner in _MODELS
        ],
    }
)
_DIRECTIVE_RE = re.compile(
    r"(?:^|[-_:])(fail-(\d{3}|quota|context|nomodel|filter|badkey)(?:-retry-(\d+|none))?"
    r"|drop|break|leaky|silent|stuck|garble|nodone|early-error|late-error|noprefill|flap"
    r"|(slow|stall|hold|huge|bomb|flaky|first|drip)-(\d+)|quota-(\d+)(?:-reset-(\d+))?)(?=$|[-_:])"
)
# Directive words and `word-N` amounts, by the Directives field they set.
_FLAGS = {"break": "brk", "early-error": "early_error", "late-error": "late_error"}
_AMOUNTS = {"slow": "slow_ms", "stall": "stall_ms", "hold": "hold_ms", "huge": "huge_mib",
            "bomb": "bomb_mib", "flaky": "flaky", "first": "first_ms", "drip": "drip_ms"}  # fmt: skip
_HANG_S = 600.0  # `silent`, `stuck` and `drip` give up on a caller that never leaves
_QUOTA_RESET_S = 60  # `quota-N` without `-reset-S`
_MIB = 1 << 20
_SPACES = b" " * _MIB  # one padding chunk, shared by every padded answer
_SSE_HEADERS = {"content-type": "text/event-stream", "cache-control": "no-cache"}
_DONE = b"data: [DONE]\n\n"
# `early-error`/`late-error` events and `garble`'s truncated ones, spelled as documented.
_OPENAI_ERROR = (b'data: {"error": {"message": "Mock provider: overloaded (early-error).", '
                 b'"type": "server_error", "code": "server_error", "param": null}}\n\n')  # fmt: skip
_RESPONSES_ERROR = (b'event: error\ndata: {"type": "error", "code": "server_error", '
                    b'"message": "Mock provider: overloaded (early-error).", "param": null}\n\n')  # fmt: skip
_ANTHROPIC_ERROR = (b'event: error\ndata: {"type": "error", "error": {"type": "overloaded_error", '
                    b'"message": "Mock provider: overloaded (early-error)."}}\n\n')  # fmt: skip
_OPENAI_GARBLED = b'data: {"choices": [{"delta": {"content": "oops\n\n'
_RESPONSES_GARBLED = (b'event: response.output_text.delta\ndata: {"type": '
                      b'"response.output_text.delta", "delta": "oops\n\n')  # fmt: skip
_ANTHROPIC_GARBLED = (b'event: content_block_delta\ndata: {"type": "content_block_delta", '
                      b'"index": 0, "delta": {"type": "text_delta", "text": "oops\n\n')  # fmt: skip
_NO_PREFILL = ("This model does not support assistant message prefill. "
               "The conversation must end with a user message.")  # fmt: skip
# Gemini's streams end each event with CRLF CRLF, as Google sends them.
_GEMINI_ERROR = (b'data: {"error": {"code": 503, "message": "Mock provider: overloaded '
                 b'(early-error).", "status": "UNAVAILABLE"}}\r\n\r\n')  # fmt: skip
_GEMINI_GARBLED = b'data: {"candidates": [{"content": {"parts": [{"text": "oops\r\n\r\n'
_INVALID = object()


class _Format(enum.Enum):
    OPENAI = "openai"
    ANTHROPIC = "anthropic"
    GEMINI = "gemini"
    AZURE = "azure"  # OpenAI's wire format at Azure's URLs, with Azure's key header and errors

    @property
    def wire(self) -> str:
        """The wire format's name, as the request log records it."""
        return "openai" if self is _Format.AZURE else self.value


@dataclass(frozen=True, slots=True)
class Directives:
    """What a key or model asks the mock to do instead of a plain success."""

    fail: int | None = None
    quota: bool = False
    retry_after: int | None = None
    no_retry_after: bool = False  # `fail-429-retry-none`: a 429 with no `retry-after` at all
    drop: bool = False
    brk: bool = False
    slow_ms: int = 0
    stall_ms: int = 0
    hold_ms: int = 0
    huge_mib: int = 0
    bomb_mib: int = 0
    leaky: bool = False
    model_error: str = ""  # "context", "nomodel" or "filter": a model-level 400/404
    flaky: int = 0  # the first N requests of this key and model answer 503
    first_ms: int = 0
    silent: bool = False
    stuck: bool = False
    drip_ms: int = 0  # `drip-N`: a stream of content events N ms apart, until the caller leaves
    garble: bool = False
    nodone: bool = False
    early_error: bool = False
    late_error: bool = False
    noprefill: bool = False
    flap: bool = False  # odd-numbered requests of this key and model answer 503
    bad_key: bool = False  # `fail-badkey`: the provider's own answer to a key it does not know
    quota_limit: int | None = None  # `quota-N`: N requests per window, with quota headers
    quota_reset_s: int = _QUOTA_RESET_S  # `quota-N-reset-S`: the window, in seconds

    @property
    def shapes_body(self) -> bool:
        """Whether a successful JSON answer is sent other than in one piece."""
        return bool(self.hold_ms or self.huge_mib or self.bomb_mib)


_NONE = Directives()


@functools.lru_cache(maxsize=4096)
def parse_directives(text: str) -> Directives:
    """Directives found in `text` (a key, a model, or both joined by `:`).

    The first `fail-*` wins; an out-of-range `fail-NNN` is ignored.
    """
    fields: dict[str, Any] = {}
    for m in _DIRECTIVE_RE.finditer(text):
        word, code, retry_s, name, amount, quota_n, quota_s = m.groups()
        if code is not None:
            if "fail" in fields:
                continue
            if code == "quota":
                fields.update(fail=429, quota=True)
            elif code == "badkey":
                fields.update(fail=401, bad_key=True)
            elif code in ("context", "nomodel", "filter"):
                fields.update(fail=404 if code == "nomodel" else 400, model_error=code)
            elif 400 <= int(code) <= 599:
                fields["fail"] = int(code)
            else:
                continue
            if retry_s == "none":
                fields["no_retry_after"] = True
            else:
                fields["retry_after"] = int(retry_s) if retry_s is not None else None
        elif name is not None:
            fields[_AMOUNTS[name]] = int(amount)
        elif quota_n is not None:
            fields["quota_limit"] = int(quota_n)
            fields["quota_reset_s"] = _QUOTA_RESET_S if quota_s is None else int(quota_s)
        else:
            fields[_FLAGS.get(word, word)] = True
    found = Directives(**fields)
    return _NONE if found == _NONE else found


@dataclass(slots=True)
class TraceCounts:
    """What the trace sink received from one `?source=`: exports answered 200, their bytes,
    and exports refused as too large."""

    requests: int = 0
    bytes: int = 0
    too_large: int = 0


class _State:
    """The app's request log and id counter."""

    __slots__ = ("_n", "flaky_seen", "log", "quota_seen", "traces")

    def __init__(self) -> None:
        self.log: deque[dict[str, Any]] = deque(maxlen=_LOG_SIZE)
        self._n = 0
        self.flaky_seen: dict[str, int] = {}  # `flaky-N`, `flap`: requests seen per key and model
        # `quota-N`: per key and model, when its window started and the requests in it
        self.quota_seen: dict[str, tuple[float, int]] = {}
        self.traces: dict[str, TraceCounts] = {}  # `POST /v1/traces`, per `?source=`

    def next_id(self) -> int:
        self._n += 1
        return self._n

    def trace_counts(self, source: str) -> TraceCounts:
        """The counts of `source`; a source past the first `_LOG_SIZE` counts under ""."""
        if source not in self.traces and len(self.traces) >= _LOG_SIZE:
            source = ""
        return self.traces.setdefault(source, TraceCounts())


_STATE = web.AppKey("mock_provider_state", _State)
# The quota headers of this request's answer, whatever sends it (see `_add_quota_headers`).
_QUOTA_HEADERS: web.RequestKey[dict[str, str]] = web.RequestKey("mock_quota_headers")


@dataclass(frozen=True, slots=True)
class _Call:
    """One accepted request, handed to a route's responder."""

    request: web.Request
    body: dict[str, Any]
    model: str
    directives: Directives
    n: int


_Responder = Callable[[_Call], Awaitable[web.StreamResponse]]


# --- wire helpers ---------------------------------------------------------


def _json(obj: object, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=_dumps(obj), status=status, headers=headers, content_type="application/json"
    )


_OPENAI_ERRORS = {
    400: ("invalid_request_error", "invalid_request"),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("request_forbidden", "forbidden"),
    404: ("invalid_request_error", "model_not_found"),
    429: ("requests", "rate_limit_exceeded"),
    500: ("server_error", "server_error"),
    502: ("server_error", "bad_gateway"),
    503: ("server_error", "service_unavailable"),
    529: ("server_error", "overloaded"),
}
_ANTHROPIC_ERRORS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def _error(
    fmt: _Format,
    status: int,
    message: str,
    *,
    quota: bool = False,
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
    details: list[dict[str, Any]] | None = None,
) -> web.Response:
    if fmt is _Format.GEMINI:
        err: dict[str, Any] = {"code": status, "message": message, "status": _rpc_status(status)}
        if details:
            err["details"] = details
        return _json({"error": err}, status, headers)
    if fmt is _Format.ANTHROPIC:
        kind = _ANTHROPIC_ERRORS.get(
            status, "api_error" if status >= 500 else "invalid_request_error"
        )
        err = {"type": kind, "message": message}
        if quota:
            err["code"] = "insufficient_quota"
        return _json({"type": "error", "error": err}, status, headers)
    if quota:
        kind, code = "insufficient_quota", "insufficient_quota"
    else:
        default = ("server_error" if status >= 500 else "invalid_request_error", f"http_{status}")
        kind, default_code = _OPENAI_ERRORS.get(status, default)
        code = code or default_code
    body = {"error": {"message": message, "type": kind, "code": code, "param": param}}
    return _json(body, status, headers)


_RPC_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ABORTED",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "UNIMPLEMENTED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def _rpc_status(status: int) -> str:
    """The google.rpc status name Google pairs with an HTTP status."""
    return _RPC_STATUS.get(status, "INTERNAL" if status >= 500 else "FAILED_PRECONDITION")


def masked_key(key: str) -> str:
    """A key as OpenAI's 401 names it: its prefix, stars, its last four characters."""
    prefix = "sk-proj-" if key.startswith("sk-proj-") else key[:3]
    return f"{prefix}{'*' * 20}{key[-4:]}"


def _leaky_auth_error(fmt: _Format, status: int, key: str) -> web.Response:
    """A 401/403 in the provider's own wording, naming a masked fragment of the key."""
    if fmt is _Format.ANTHROPIC:
        message = f"invalid x-api-key: {masked_key(key)}"
        return _error(fmt, status, message)
    if fmt is _Format.GEMINI:
        message = f"API key not valid: {masked_key(key)}. Please pass a valid API key."
        return _error(fmt, status, message, details=[_GOOGLE_KEY_INVALID])
    message = (f"Incorrect API key provided: {masked_key(key)}. You can find your API key "
               "at https://platform.openai.com/account/api-keys.")  # fmt: skip
    body = {"error": {"message": message, "type": "invalid_request_error",
                      "code": "invalid_api_key", "param": None}}  # fmt: skip
    return _json(body, status)


_GOOGLE_KEY_INVALID = {
    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
    "reason": "API_KEY_INVALID",
    "domain": "googleapis.com",
    "metadata": {"service": "generativelanguage.googleapis.com"},
}
_GOOGLE_NO_KEY = ("Method doesn't allow unregistered callers (callers without established "
                  "identity). Please use API Key or other form of API consumer identity to "
                  "call this API.")  # fmt: skip
_AZURE_401 = {"error": {"code": "401", "message": (
    "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide "
    "a valid key for an active subscription and use a correct regional API endpoint for your "
    "resource.")}}  # fmt: skip
_AZURE_NO_DEPLOYMENT = {"error": {"code": "DeploymentNotFound", "message": (
    "The API deployment for this resource does not exist. If you created the deployment within "
    "the last 5 minutes, please wait a moment and try again.")}}  # fmt: skip
_AZURE_NOT_FOUND = {"error": {"code": "404", "message": "Resource not found"}}


def _missing_key(fmt: _Format) -> web.Response:
    """Each provider's answer to a request that carries no key it reads."""
    if fmt is _Format.ANTHROPIC:
        return _error(fmt, 401, "x-api-key header is required")
    if fmt is _Format.GEMINI:
        return _error(fmt, 403, _GOOGLE_NO_KEY)
    if fmt is _Format.AZURE:
        return _json(_AZURE_401, 401)
    return _error(fmt, 401, "You didn't provide an API key (Authorization: Bearer).")


def _bad_key(fmt: _Format, key: str) -> web.Response:
    """`fail-badkey`: each provider's real answer to an unknown or revoked key (Google's is a 400)."""
    if fmt is _Format.GEMINI:
        message = "API key not valid. Please pass a valid API key."
        return _error(fmt, 400, message, details=[_GOOGLE_KEY_INVALID])
    if fmt is _Format.ANTHROPIC:
        return _error(fmt, 401, "invalid x-api-key")
    if fmt is _Format.AZURE:
        return _json(_AZURE_401, 401)
    return _leaky_auth_error(fmt, 401, key)


def _model_error(fmt: _Format, kind: str, *, model: str, streaming: bool) -> web.Response:
    """A model-level error in the provider's own shape: another model could answer."""
    if fmt is _Format.GEMINI:
        return _gemini_model_error(kind, model, streaming)
    if fmt is _Format.AZURE and kind == "nomodel":
        return _json(_AZURE_NO_DEPLOYMENT, 404)
    if kind == "context":
        if fmt is _Format.ANTHROPIC:
            return _error(fmt, 400, "prompt is too long: 210000 tokens > 200000 maximum")
        message = ("This model's maximum context length is 128000 tokens. However, your "
                   "messages resulted in 210000 tokens. Please reduce the length of the messages.")  # fmt: skip
        return _error(fmt, 400, message, code="context_length_exceeded")
    if kind == "filter":
        if fmt is _Format.ANTHROPIC:
            return _error(fmt, 400, "Output blocked by content filtering policy")
        message = ("The response was filtered due to the prompt triggering the content "
                   "management policy. Please modify your prompt and retry.")  # fmt: skip
        return _error(fmt, 400, message, code="content_filter", param="prompt")
    if fmt is _Format.ANTHROPIC:
        return _error(fmt, 404, "model: mock-model-that-is-not-here")
    return _error(fmt, 404, "The model does not exist or you do not have access to it.",
                  code="model_not_found")  # fmt: skip


def _gemini_model_error(kind: str, model: str, streaming: bool) -> web.Response:
    """Gemini's model-level errors; a content-policy block is a 200 with `promptFeedback`."""
    fmt = _Format.GEMINI
    if kind == "context":
        message = ("The input token count (2100000) exceeds the maximum number of tokens "
                   "allowed (1048576).")  # fmt: skip
        return _error(fmt, 400, message)
    if kind == "nomodel":
        message = ("models/mock-model-that-is-not-here is not found for API version v1beta, or "
                   "is not supported for generateContent. Call ListModels to see the list of "
                   "available models and their supported methods.")  # fmt: skip
        return _error(fmt, 404, message)
    blocked = {"promptFeedback": {"blockReason": "SAFETY"}, "modelVersion": model}
    if streaming:
        return web.Response(body=_gemini_sse(blocked), headers=_SSE_HEADERS)
    return _json(blocked)


def _retry_after(d: Directives, status: int) -> int | None:
    """The seconds a failure tells the caller to wait, if it tells any."""
    if d.retry_after is not None:
        return d.retry_after
    if status == 429 and not d.quota and not d.no_retry_after:
        return 1
    return None


def _gemini_failure(d: Directives, status: int, model: str) -> web.Response:
    """A `fail-*` answer as Google sends it: the wait is a RetryInfo detail, not a header."""
    details: list[dict[str, Any]] = []
    if d.quota:
        message = ("You exceeded your current quota, please check your plan and billing "
                   "details. For more information on this error, head to: "
                   "https://ai.google.dev/gemini-api/docs/rate-limits.")  # fmt: skip
        details.append(_quota_failure("GenerateRequestsPerDayPerProjectPerModel-FreeTier",
                                      "50", model))  # fmt: skip
    elif status == 429:
        message = "Resource has been exhausted (e.g. check quota)."
        details.append(_quota_failure("GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
                                      "15", model))  # fmt: skip
    else:
        message = f"Mock provider: simulated HTTP {status} (fail-{status})."
    wait = _retry_after(d, status)
    if wait is not None:
        details.append(
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{wait}s"}
        )
    return _error(_Format.GEMINI, status, message, details=details)


def _quota_failure(quota_id: str, value: str, model: str) -> dict[str, Any]:
    violation = {
        "quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests",
        "quotaId": quota_id,
        "quotaDimensions": {"location": "global", "model": model},
        "quotaValue": value,
    }
    return {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [violation]}


def _azure_429(d: Directives, where: str) -> web.Response:
    """Azure OpenAI's rate-limit answer: its own body, `retry-after` and `retry-after-ms`."""
    message = (f"Requests to the {where} have exceeded token rate limit of your current "
               "OpenAI S0 pricing tier.")  # fmt: skip
    headers = None
    wait = _retry_after(d, 429)
    if wait is not None:
        message += f" Please retry after {wait} second{'' if wait == 1 else 's'}."
        headers = {"retry-after": str(wait), "retry-after-ms": str(wait * 1000)}
    message += (" Please go here: https://aka.ms/oai/quotaincrease if you would like to "
                "further increase the default rate limit.")  # fmt: skip
    return _json({"error": {"code": "429", "message": message}}, 429, headers)


@dataclass(frozen=True, slots=True)
class _Where:
    """What a failure's wording names: the model, and Azure's operation and API version."""

    model: str = ""
    azure: str = ""  # "ChatCompletions_Create Operation under Azure OpenAI API version V"
    streaming: bool = False


def _failure(
    fmt: _Format, d: Directives, status: int, key: str, where: _Where = _Where()
) -> web.Response:
    if d.model_error:
        return _model_error(fmt, d.model_error, model=where.model, streaming=where.streaming)
    if d.bad_key:
        return _bad_key(fmt, key)
    if d.leaky and status in (401, 403):
        return _leaky_auth_error(fmt, status, key)
    if fmt is _Format.GEMINI:
        return _gemini_failure(d, status, where.model)
    wait = _retry_after(d, status)
    headers = None if wait is None else {"retry-after": str(wait)}
    if fmt is _Format.AZURE and not d.quota:
        if status == 429:
            return _azure_429(d, where.azure)
        if status == 401:
            return _json(_AZURE_401, 401, headers)
    if d.quota:
        message = "Mock provider: you exceeded your current quota (fail-quota)."
    else:
        message = f"Mock provider: simulated HTTP {status} (fail-{status})."
    return _error(fmt, status, message, quota=d.quota, headers=headers)


def _drop(request: web.Request) -> web.Response:
    """Close the connection; aiohttp then fails to write this reply and lets it go."""
    transport = request.transport
    if transport is not None:
        transport.close()
    return web.Response(status=204)


def _sse(event: str | None, data: object) -> bytes:
    if event is None:
        return b"data: " + orjson.dumps(data) + b"\n\n"
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def _gemini_sse(data: object) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\r\n\r\n"


def _gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def _pause(request: web.Request, seconds: float) -> None:
    """Sleep, ending early when the peer hangs up (handlers are not cancelled then)."""
    end = time.monotonic() + seconds
    while not _gone(request):
        left = end - time.monotonic()
        if left <= 0:
            return
        await asyncio.sleep(min(left, 0.05))


@functools.lru_cache(maxsize=1)
def _deflated_spaces() -> bytes:
    """1 MiB of spaces as raw deflate ending in a full flush, so copies concatenate."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    return c.compress(_SPACES) + c.flush(zlib.Z_FULL_FLUSH)


@functools.lru_cache(maxsize=16)
def _spaces_crc(mib: int) -> int:
    crc = 0
    for _ in range(mib):
        crc = zlib.crc32(_SPACES, crc)
    return crc


def gzip_padded(mib: int, tail: bytes) -> Iterator[bytes]:
    """A gzip member decoding to `mib` MiB of spaces then `tail`, made lazily (~1 KiB per MiB).

    Leading whitespace keeps a JSON `tail` valid JSON: the same document, padded.
    """
    yield b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"  # magic, deflate, no flags, mtime 0, OS unknown
    unit = _deflated_spaces()
    for _ in range(mib):
        yield unit
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    yield c.compress(tail) + c.flush()
    crc = zlib.crc32(tail, _spaces_crc(mib))
    yield struct.pack("<II", crc, (mib * _MIB + len(tail)) & 0xFFFFFFFF)


def _gzip_size(mib: int, tail: bytes) -> int:
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    return 10 + mib * len(_deflated_spaces()) + len(c.compress(tail) + c.flush()) + 8


async def _shaped(request: web.Request, d: Directives, answer: web.Response) -> web.StreamResponse:
    """A JSON answer sent as `hold`, `huge` and `bomb` say, generated while it is written."""
    body = answer.body
    if not isinstance(body, bytes):  # every JSON answer here is built from bytes
        return answer
    resp = web.StreamResponse(status=answer.status, headers=answer.headers)
    if d.bomb_mib:
        resp.headers["content-encoding"] = "gzip"
        resp.content_length = _gzip_size(d.bomb_mib, body)
    else:
        resp.content_length = d.huge_mib * _MIB + len(body)
    await resp.prepare(request)
    if d.hold_ms:
        await _pause(request, d.hold_ms / 1000)
    if d.bomb_mib:
        pieces: Iterable[bytes] = gzip_padded(d.bomb_mib, body)
    else:
        pieces = itertools.chain(itertools.repeat(_SPACES, d.huge_mib), (body,))
    for piece in pieces:
        if _gone(request):
            return resp
        await resp.write(piece)
    await resp.write_eof()
    return resp


@dataclass(frozen=True, slots=True)
class _Sse:
    """A stream's frames by part, so that a fault strikes between the right ones."""

    head: Sequence[bytes]  # the preamble, before any content
    content: Sequence[bytes]  # one event per reply piece
    tail: Sequence[bytes]  # finish or stop reason, usage
    end: bytes  # the terminator (empty for Gemini's streams, which have none)
    garbled: bytes = _OPENAI_GARBLED
    error: bytes = _OPENAI_ERROR


_Step = bytes | float | None  # a frame; seconds to wait (less if the caller leaves); None: close


def _script(sse: _Sse, d: Directives) -> list[_Step]:
    """The stream as the directives shape it; faults strike after two content events."""
    early, late = sse.content[:2], sse.content[2:]
    steps: list[_Step] = [*sse.head]
    if d.first_ms:
        steps.append(d.first_ms / 1000)
    if d.early_error:
        return [*steps, sse.error]
    steps += early
    if d.brk:
        return [*steps, None]
    if d.stuck:
        return [*steps, _HANG_S, None]
    if d.late_error:
        return [*steps, sse.error]
    if d.garble:
        steps.append(sse.garbled)
    steps += [*late, *sse.tail]
    return steps if d.nodone or not sse.end else [*steps, sse.end]


def _drip(sse: _Sse, d: Directives) -> Iterator[_Step]:
    """`drip-N`: the preamble, then the content events over and over, for `_HANG_S` at most
    (the gaps come from `_stream`), then the connection is closed."""
    yield from sse.head
    frames = max(1, int(_HANG_S * 1000 // d.drip_ms) - len(sse.head))
    yield from itertools.islice(itertools.cycle(sse.content), frames)
    yield None


async def _stream(call: _Call, sse: _Sse) -> web.StreamResponse:
    """Send a stream one write per frame, as `_script` and `stall-N` (or `_drip`) say."""
    request, d = call.request, call.directives
    stall = (d.drip_ms or d.stall_ms) / 1000
    at_once = len(sse.head) + 1 if d.drip_ms else 1  # frames sent before the first gap
    resp = web.StreamResponse(headers=_SSE_HEADERS)
    await resp.prepare(request)
    sent = 0
    for step in _drip(sse, d) if d.drip_ms else _script(sse, d):
        if step is None:
            _drop(request)
            return resp
        if isinstance(step, bytes):
            if stall and sent >= at_once:
                await asyncio.sleep(stall)
                if _gone(request):  # the caller left during the gap: nobody to write to
                    return resp
            await resp.write(step)
            sent += 1
        else:
            await _pause(request, step)
            if _gone(request):
                return resp
    await resp.write_eof()
    return resp


# --- request accounting ---------------------------------------------------


def _words(value: object) -> int:
    """Whitespace-separated words of a prompt-like value, in any nesting."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(_words(v) for v in value)
    if isinstance(value, dict):
        if "content" in value:
            return _words(value["content"])
        return _words(value.get("text"))
    if isinstance(value, int) and not isinstance(value, bool):
        return 1  # a token id
    return 0


def _prefill(body: dict[str, Any]) -> str | None:
    """The text of a trailing assistant message (a prefill), or None without one."""
    messages = body.get("messages")
    last = messages[-1] if isinstance(messages, list) and messages else None
    if not isinstance(last, dict) or last.get("role") != "assistant":
        return None
    content = last.get("content")
    if isinstance(content, str):
        return content
    blocks = content if isinstance(content, list) else []
    return "".join(
        b["text"]
        for b in blocks
        if isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str)
    )


def _gemini_prefill(body: dict[str, Any]) -> str | None:
    """The text of a trailing `model` turn in Gemini's `contents`, or None without one."""
    contents = body.get("contents")
    last = contents[-1] if isinstance(contents, list) and contents else None
    if not isinstance(last, dict) or last.get("role") != "model":
        return None
    return "".join(p["text"] for p in _list(last.get("parts")) if isinstance(p.get("text"), str))


def _prefill_of(fmt: _Format, body: dict[str, Any]) -> str | None:
    return _gemini_prefill(body) if fmt is _Format.GEMINI else _prefill(body)


def _continuation(prefill: str, reply: str = _REPLY) -> str:
    """What is left of the reply after `prefill`: the whole reply if it does not start so."""
    for head in (prefill, prefill.rstrip()):
        if reply.startswith(head):
            return reply[len(head) :]
    return reply


def _reply(
    body: dict[str, Any], *limit_fields: str, prefill: str | None = None, text: str = _REPLY
) -> tuple[tuple[str, ...], bool]:
    """The reply pieces (after a prefill) under the body's token limit, and whether it cut them."""
    if prefill is None:
        pieces = _PIECES if text is _REPLY else tuple(_PIECE_RE.findall(text))
    else:
        pieces = tuple(_PIECE_RE.findall(_continuation(prefill, text)))
    for name in limit_fields:
        limit = body.get(name)
        if isinstance(limit, int) and not isinstance(limit, bool):
            if limit < len(pieces):
                return pieces[: max(limit, 1)], True
            break
    return pieces, False


# --- what a request asks for: a tool call, a tool result, images ----------


def _list(value: object) -> list[dict[str, Any]]:
    """The objects in a JSON list (anything else: none)."""
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


@dataclass(frozen=True, slots=True)
class _ToolCall:
    """The call the mock makes: to the chosen tool, with arguments made from its schema."""

    name: str
    arguments: dict[str, Any]

    @property
    def json(self) -> str:
        return orjson.dumps(self.arguments).decode()

    def pieces(self) -> tuple[str, ...]:
        """The arguments' JSON in pieces of 8 characters, at least two (streams split it)."""
        text = self.json
        cut = [text[i : i + 8] for i in range(0, len(text), 8)]
        if len(cut) < 2:
            half = max(len(text) // 2, 1)
            cut = [text[:half], text[half:]]
        return tuple(cut)


@dataclass(frozen=True, slots=True)
class _Plan:
    """What the reply is: a tool call, or text (before any prefill and token limit)."""

    text: str = _REPLY
    call: _ToolCall | None = None


_FILLERS: dict[str, object] = {"string": "x", "integer": 1, "number": 1, "boolean": True}


def _arguments(schema: object) -> dict[str, Any]:
    """`{"location": "Paris"}` if the schema has `location`, else each required property filled."""
    props = _dict(_dict(schema).get("properties"))
    if "location" in props:
        return {"location": "Paris"}
    required = _dict(schema).get("required")
    out: dict[str, Any] = {}
    for name in required if isinstance(required, list) else []:
        if isinstance(name, str):
            out[name] = _filler(_dict(props.get(name)))
    return out


def _filler(prop: dict[str, Any]) -> object:
    enum_values = prop.get("enum")
    if isinstance(enum_values, list) and enum_values:
        return enum_values[0]
    kind = prop.get("type")
    if isinstance(kind, list):  # ["string", "null"]
        kind = next((k for k in kind if k != "null"), None)
    kind = kind.lower() if isinstance(kind, str) else "string"  # Gemini spells them "STRING"
    if kind == "array":
        return []
    if kind == "object":
        return {}
    return _FILLERS.get(kind, "x")


def _choose(tools: list[tuple[str, object]], choice: str | bool) -> _ToolCall | None:
    """The call to make: to the tool `choice` names, else the first; none if `choice` is False."""
    if not tools or choice is False:
        return None
    named = [t for t in tools if t[0] == choice] if isinstance(choice, str) else []
    name, schema = (named or tools)[0]
    return _ToolCall(name, _arguments(schema))


def _decide(
    results: list[str], call: _ToolCall | None, images: list[str], prefill: str | None
) -> _Plan:
    """A tool result gets quoted; else tools get called (unless prefilled); else images told."""
    if results:
        return _Plan(text="The tool said: " + "; ".join(results))
    if call is not None and prefill is None:
        return _Plan(call=call)
    if images:
        n = len(images)
        return _Plan(text=f"I see {n} image{'' if n == 1 else 's'} ({'; '.join(images)}).")
    return _Plan()


def _text_of(content: object) -> str:
    """A message's or tool result's text: a string, or its text parts joined."""
    if isinstance(content, str):
        return content
    return "".join(b["text"] for b in _list(content) if isinstance(b.get("text"), str))


def _decoded_size(data: str) -> int | None:
    """Bytes that base64 (standard, else URL-safe) decodes to; None if it does not decode."""
    try:
        return len(base64.b64decode(data, validate=True))
    except ValueError:
        pass
    try:
        return len(base64.urlsafe_b64decode(data))
    except ValueError:
        return None


def _inline_image(mime: object, data: object) -> str:
    size = _decoded_size(data) if isinstance(data, str) else None
    what = "undecodable" if size is None else f"{size} bytes"
    return f"base64 {mime if isinstance(mime, str) else 'unknown'}, {what}"


def _url_image(url: str) -> str:
    """An image URL as the reply names it: a data URL by its type and size, else the URL."""
    if url.startswith("data:"):
        head, _, data = url.partition(",")
        if head.endswith(";base64"):
            return _inline_image(head[5:].split(";")[0], data)
    return f"url {url}"


def _openai_plan(body: dict[str, Any]) -> _Plan:
    messages = _list(body.get("messages"))
    results: list[str] = []
    for m in reversed(messages):  # the trailing run of tool results
        if m.get("role") != "tool":
            break
        results.insert(0, _text_of(m.get("content")))
    tools = [
        (f["name"], f.get("parameters"))
        for t in _list(body.get("tools"))
        if isinstance((f := _dict(t.get("function"))).get("name"), str)
    ]
    images = []
    for m in messages:
        for part in _list(m.get("content")):
            if part.get("type") == "image_url":
                ref = part.get("image_url")
                url = ref if isinstance(ref, str) else _dict(ref).get("url")
                images.append(_url_image(url) if isinstance(url, str) else "url unknown")
    tc = body.get("tool_choice")
    choice: str | bool = tc != "none"
    if isinstance(tc, dict) and isinstance(name := _dict(tc.get("function")).get("name"), str):
        choice = name
    return _decide(results, _choose(tools, choice), images, _prefill(body))


def _anthropic_plan(body: dict[str, Any]) -> _Plan:
    messages = _list(body.get("messages"))
    last = messages[-1] if messages else {}
    results = []
    if last.get("role") == "user":
        results = [
            _text_of(b.get("content"))
            for b in _list(last.get("content"))
            if b.get("type") == "tool_result"
        ]
    tools = [(t["name"], t.get("input_schema")) for t in _list(body.get("tools"))
             if isinstance(t.get("name"), str)]  # fmt: skip
    images = [
        _anthropic_image(_dict(b.get("source")))
        for m in messages
        for b in _list(m.get("content"))
        if b.get("type") == "image"
    ]
    tc = _dict(body.get("tool_choice"))
    choice: str | bool = tc.get("type") != "none"
    if tc.get("type") == "tool" and isinstance(tc.get("name"), str):
        choice = tc["name"]
    return _decide(results, _choose(tools, choice), images, _prefill(body))


def _anthropic_image(source: dict[str, Any]) -> str:
    kind = source.get("type")
    if kind == "base64":
        return _inline_image(source.get("media_type"), source.get("data"))
    if kind == "url":
        return f"url {source.get('url')}"
    return f"file {source.get('file_id')}" if kind == "file" else f"{kind} unknown"


def _camel(obj: dict[str, Any], name: str) -> Any:
    """A field of a Gemini object by its JSON name or its proto name (`mimeType`, `mime_type`)."""
    if name in obj:
        return obj[name]
    return obj.get(re.sub(r"[A-Z]", lambda m: "_" + m.group().lower(), name))


def _gemini_plan(body: dict[str, Any]) -> _Plan:
    contents = _list(body.get("contents"))
    last = contents[-1] if contents else {}
    results = [
        _gemini_result(_dict(_camel(p, "functionResponse")))
        for p in _list(last.get("parts"))
        if _camel(p, "functionResponse") is not None
    ]
    tools = [
        (d["name"], _camel(d, "parameters") or _camel(d, "parametersJsonSchema"))
        for t in _list(body.get("tools"))
        for d in _list(_camel(t, "functionDeclarations"))
        if isinstance(d.get("name"), str)
    ]
    images = []
    for c in contents:
        for p in _list(c.get("parts")):
            if (inline := _camel(p, "inlineData")) is not None:
                images.append(_inline_image(_camel(_dict(inline), "mimeType"),
                                            _dict(inline).get("data")))  # fmt: skip
            elif (ref := _camel(p, "fileData")) is not None:
                images.append(f"url {_camel(_dict(ref), 'fileUri')}")
    config = _dict(_camel(_dict(_camel(body, "toolConfig")), "functionCallingConfig"))
    choice: str | bool = config.get("mode") != "NONE"
    allowed = _camel(config, "allowedFunctionNames")
    if choice and isinstance(allowed, list) and allowed and isinstance(allowed[0], str):
        choice = allowed[0]
    return _decide(results, _choose(tools, choice), images, _gemini_prefill(body))


def _gemini_result(response: dict[str, Any]) -> str:
    """A functionResponse's result: its one string value, else its `response` as JSON."""
    value = _dict(response.get("response"))
    if len(value) == 1 and isinstance(only := next(iter(value.values())), str):
        return only
    return _dumps(value).decode()


@dataclass(frozen=True, slots=True)
class _Credential:
    """The key a route accepts, and which key was sent where (for the log)."""

    key: str | None  # what the route reads, None if it was not sent
    sent: str | None  # the key the log records: the accepted one, else any other sent
    auth: str | None  # where `sent` came from: a header name, or `?key` for the query


_ACCEPTS = {
    _Format.OPENAI: ("authorization", "api-key"),
    _Format.ANTHROPIC: ("x-api-key", "authorization"),
    _Format.GEMINI: ("x-goog-api-key", "?key"),
    _Format.AZURE: ("api-key", "authorization"),
}
_KEY_PLACES = ("authorization", "api-key", "x-api-key", "x-goog-api-key", "?key")


def _credential(request: web.Request, fmt: _Format) -> _Credential:
    """The credential this route accepts, and whichever one was sent (for the log)."""
    found: dict[str, str] = {}
    auth = request.headers.get("authorization")
    if auth is not None and auth[:7].lower() == "bearer " and auth[7:].strip():
        found["authorization"] = auth[7:].strip()
    for name in ("x-api-key", "api-key", "x-goog-api-key"):
        if value := request.headers.get(name):
            found[name] = value
    if value := request.query.get("key"):
        found["?key"] = value
    accepted = next((p for p in _ACCEPTS[fmt] if p in found), None)
    where = accepted or next((p for p in _KEY_PLACES if p in found), None)
    return _Credential(
        found[accepted] if accepted else None, found[where] if where else None, where
    )


def _parse_body(raw: bytes) -> object:
    """JSON, with the standard parser for what orjson refuses (lone surrogates, big integers)."""
    if not raw:
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return _INVALID


def _dumps(obj: object) -> bytes:
    try:
        return orjson.dumps(obj)
    except TypeError:  # a lone surrogate or an integer wider than 64 bits: still valid JSON
        return json.dumps(obj).encode()


def _record(
    request: web.Request,
    body: object,
    cred: _Credential,
    fmt: _Format | None = None,
    model: str | None = None,
) -> None:
    request.app[_STATE].log.append(
        {
            "method": request.method,
            "path": request.path,
            "raw_path": request.raw_path,
            "query": dict(request.query),
            "headers": {k.lower(): v for k, v in request.headers.items()},
            "body": None if body is _INVALID else body,
            "key": cred.sent,
            "format": None if fmt is None else fmt.wire,
            "auth": cred.auth,
            "model": model,
        }
    )


def _quota_count(seen: dict[str, tuple[float, int]], which: str, window_s: int) -> int | None:
    """This request's number in the current `quota-N` window of key and model `which`."""
    if len(seen) >= _LOG_SIZE and which not in seen:  # bounded, like the request log
        return None
    now = time.monotonic()
    start, count = seen.get(which, (now, 0))
    if now - start >= window_s:
        start, count = now, 0
    seen[which] = (start, count + 1)
    return count + 1


def _quota_headers(fmt: _Format, limit: int, count: int, reset_s: int) -> dict[str, str]:
    """The format's remaining-quota headers for request number `count` of `limit`."""
    left = max(0, limit - count)
    numbers = {"requests": (limit, left), "tokens": (1000 * limit, 1000 * left)}
    if fmt is _Format.ANTHROPIC:
        reset = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(math.ceil(time.time() + reset_s)))
        names = "anthropic-ratelimit-{kind}-{part}"
    else:
        reset = f"{reset_s}s"
        names = "x-ratelimit-{part}-{kind}"
    headers = {}
    for kind, (most, now_left) in numbers.items():
        headers[names.format(kind=kind, part="limit")] = str(most)
        headers[names.format(kind=kind, part="remaining")] = str(now_left)
        headers[names.format(kind=kind, part="reset")] = reset
    return headers


def _quota_429(fmt: _Format, d: Directives, where: _Where) -> web.Response:
    """The answer past a `quota-N`: each provider's rate-limit 429, `retry-after` the window."""
    limit, wait = d.quota_limit, d.quota_reset_s
    if fmt is _Format.GEMINI:
        return _gemini_failure(Directives(fail=429, retry_after=wait), 429, where.model)
    if fmt is _Format.AZURE:
        return _azure_429(Directives(fail=429, retry_after=wait), where.azure)
    headers = {"retry-after": str(wait)}
    if fmt is _Format.ANTHROPIC:
        message = (f"This request would exceed your organization's rate limit of {limit} "
                   f"requests per {wait} seconds (mock provider, quota-{limit}).")  # fmt: skip
        return _error(fmt, 429, message, headers=headers)
    message = (f"Rate limit reached for {where.model} on requests: Limit {limit}, Used "
               f"{limit}, Requested 1. Please try again in {wait}s (mock provider, "
               f"quota-{limit}).")  # fmt: skip
    return _error(fmt, 429, message, headers=headers)


def _over_quota(request: web.Request, fmt: _Format, limit: int, reset_s: int, which: str) -> bool:
    """Count a `quota-N` request of key and model `which`, set its answer's quota headers;
    whether nothing was left for it."""
    count = _quota_count(request.app[_STATE].quota_seen, which, reset_s)
    if count is None:
        return False
    if fmt is not _Format.GEMINI:  # Google sends no such headers
        request[_QUOTA_HEADERS] = _quota_headers(fmt, limit, count, reset_s)
    return count > limit


async def _add_quota_headers(request: web.Request, response: web.StreamResponse) -> None:
    """`on_response_prepare`: a `quota-N` answer's headers, on JSON answers and streams alike."""
    headers = request.get(_QUOTA_HEADERS)
    if headers:
        response.headers.update(headers)


def _counted_failure(seen: dict[str, int], which: str, d: Directives) -> bool:
    """Whether `flaky-N` or `flap` fails this request of key and model `which`."""
    if len(seen) >= _LOG_SIZE and which not in seen:  # bounded, like the request log
        return False
    count = seen[which] = seen.get(which, 0) + 1
    return count <= d.flaky or (d.flap and count % 2 == 1)


async def _instead(
    request: web.Request, fmt: _Format, d: Directives, key: str, body: dict[str, Any],
    where: _Where,
) -> web.StreamResponse | None:  # fmt: skip
    """What the directives answer in place of the route (after any wait), if anything."""
    if d.slow_ms:
        await asyncio.sleep(d.slow_ms / 1000)
    if d.first_ms and not where.streaming:
        await _pause(request, d.first_ms / 1000)
    if d.silent:
        await _pause(request, _HANG_S)
        return _drop(request)
    if d.drop:
        return _drop(request)
    if d.quota_limit is not None and _over_quota(
        request, fmt, d.quota_limit, d.quota_reset_s, f"{key}:{where.model}"
    ):
        return _quota_429(fmt, d, where)
    if d.fail is not None:
        return _failure(fmt, d, d.fail, key, where)
    if d.noprefill and _prefill_of(fmt, body) is not None:
        return _error(fmt, 400, _NO_PREFILL, code="prefill_unsupported")
    if (d.flaky or d.flap) and _counted_failure(
        request.app[_STATE].flaky_seen, f"{key}:{where.model}", d
    ):
        return _failure(fmt, d, 503, key, where)
    return None


def _endpoint(
    fmt: _Format,
    responder: _Responder,
    *,
    needs_body: bool = True,
    model_in: str | None = None,
    streams: bool | None = None,
    operation: str = "",
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """Wrap a responder with what every route does: log, auth, body, directives.

    `model_in` names the path part that holds the model (Gemini's model, Azure's deployment)
    instead of the body's `model`; `streams` is whether the route streams (else the body's
    `stream` says); `operation` is Azure's name for the call, in its 429 wording.
    """

    async def handler(request: web.Request) -> web.StreamResponse:
        path_model = request.match_info[model_in] if model_in else None
        try:
            body = _parse_body(await request.read()) if request.body_exists else None
        except RequestPayloadError:  # not what its Content-Encoding says
            _record(request, _INVALID, _credential(request, fmt), fmt, path_model)
            return _error(fmt, 400, "The request body could not be decoded.")
        cred = _credential(request, fmt)
        fields: dict[str, Any] = body if isinstance(body, dict) else {}
        named = fields.get("model")
        model = path_model if model_in else named if isinstance(named, str) else None
        _record(request, body, cred, fmt, model)
        if fmt is _Format.AZURE and model_in and "api-version" not in request.query:
            return _json(_AZURE_NOT_FOUND, 404)
        if cred.key is None:
            return _missing_key(fmt)
        if needs_body and not isinstance(body, dict):
            return _error(fmt, 400, "The request body is not a valid JSON object.")
        if needs_body and not model:
            return _error(fmt, 400, "You must provide a model parameter.")
        model = model or ""
        d = parse_directives(f"{cred.key}:{model}")
        if d is not _NONE:
            version = request.query.get("api-version", "v1")
            where = _Where(
                model,
                f"{operation} Operation under Azure OpenAI API version {version}",
                fields.get("stream") is True if streams is None else streams,
            )
            instead = await _instead(request, fmt, d, cred.key, fields, where)
            if instead is not None:
                return instead
        n = request.app[_STATE].next_id()
        answer = await responder(_Call(request, fields, model, d, n))
        if d.shapes_body and type(answer) is web.Response and answer.status < 300:
            return await _shaped(request, d, answer)
        return answer

    return handler


# --- OpenAI ---------------------------------------------------------------


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _include_usage(body: dict[str, Any]) -> bool:
    opts = body.get("stream_options")
    return isinstance(opts, dict) and opts.get("include_usage") is True


async def _chat(call: _Call) -> web.StreamResponse:
    body = call.body
    prompt = max(_words(body.get("messages")), 1)
    plan = _openai_plan(body)
    ident, created = f"chatcmpl-mock-{call.n}", int(time.time())
    if plan.call is not None:
        tool = plan.call
        pieces = tool.pieces()
        finish = "tool_calls"
        function = {"name": tool.name, "arguments": tool.json}
        message: dict[str, Any] = {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": f"call_mock_{call.n}", "type": "function", "function": function}],
        }
    else:
        pieces, cut = _reply(body, "max_completion_tokens", "max_tokens", prefill=_prefill(body),
                             text=plan.text)  # fmt: skip
        finish = "length" if cut else "stop"
        message = {"role": "assistant", "content": "".join(pieces)}
    if body.get("stream") is not True:
        return _json(
            {
                "id": ident,
                "object": "chat.completion",
                "created": created,
                "model": call.model,
                "choices": [
                    {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
                ],
                "usage": _usage(prompt, len(pieces)),
            }
        )
    with_usage = _include_usage(body)

    def chunk(delta: dict[str, Any], finish_reason: str | None) -> bytes:
        obj: dict[str, Any] = {
            "id": ident,
            "object": "chat.completion.chunk",
            "created": created,
            "model": call.model,
            "choices": [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            ],
        }
        if with_usage:
            obj["usage"] = None
        return _sse(None, obj)

    if plan.call is not None:  # the name at once, the arguments in pieces, as OpenAI streams them
        opening = {**message["tool_calls"][0], "index": 0,
                   "function": {"name": plan.call.name, "arguments": ""}}  # fmt: skip
        head = [chunk({"role": "assistant", "content": None, "tool_calls": [opening]}, None)]
        content = [
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": p}}]}, None)
            for p in pieces
        ]
    else:
        head = [chunk({"role": "assistant", "content": ""}, None)]
        content = [chunk({"content": p}, None) for p in pieces]
    tail = [chunk({}, finish)]
    if with_usage:
        usage_chunk = {
            "id": ident,
            "object": "chat.completion.chunk",
            "created": created,
            "model": call.model,
            "choices": [],
            "usage": _usage(prompt, len(pieces)),
        }
        tail.append(_sse(None, usage_chunk))
    return await _stream(call, _Sse(head, content, tail, _DONE))


async def _completions(call: _Call) -> web.StreamResponse:
    body = call.body
    prompt = max(_words(body.get("prompt")), 1)
    pieces, cut = _reply(body, "max_tokens")
    finish = "length" if cut else "stop"
    ident, created = f"cmpl-mock-{call.n}", int(time.time())

    with_usage = _include_usage(body)

    def obj(text: str, finish_reason: str | None) -> dict[str, Any]:
        choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}
        return {
            "id": ident,
            "object": "text_completion",
            "created": created,
            "model": call.model,
            "choices": [choice],
        }

    if body.get("stream") is not True:
        return _json({**obj("".join(pieces), finish), "usage": _usage(prompt, len(pieces))})
    chunks = [obj(p, None) for p in pieces]
    chunks.append(obj("", finish))
    if with_usage:
        for c in chunks:
            c["usage"] = None
        chunks.append({**obj("", None), "choices": [], "usage": _usage(prompt, len(pieces))})
    frames = [_sse(None, c) for c in chunks]
    return await _stream(call, _Sse((), frames[: len(pieces)], frames[len(pieces) :], _DONE))


def _vector(item: object) -> list[float]:
    raw = item.encode() if isinstance(item, str) else orjson.dumps(item)
    # k/128 - 1 is exact in float32, so float and base64 encodings agree.
    return [b / 128 - 1 for b in hashlib.blake2b(raw, digest_size=8).digest()]


async def _embeddings(call: _Call) -> web.StreamResponse:
    value = call.body.get("input")
    if isinstance(value, list) and value and all(isinstance(v, str | list) for v in value):
        inputs: list[object] = list(value)
    else:
        inputs = [value]
    as_base64 = call.body.get("encoding_format") == "base64"
    data = []
    for i, item in enumerate(inputs):
        vec = _vector(item)
        emb: object = base64.b64encode(struct.pack("<8f", *vec)).decode() if as_base64 else vec
        data.append({"object": "embedding", "index": i, "embedding": emb})
    prompt = max(_words(value), 1)
    return _json(
        {
            "object": "list",
            "data": data,
            "model": call.model,
            "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
        }
    )


async def _responses(call: _Call) -> web.StreamResponse:
    body = call.body
    prompt = max(_words(body.get("input")) + _words(body.get("instructions")), 1)
    pieces, cut = _reply(body, "max_output_tokens")
    text = "".join(pieces)
    ident, item_id = f"resp_mock_{call.n}", f"msg_mock_{call.n}"
    part = {"type": "output_text", "text": text, "annotations": []}
    item = {
        "id": item_id,
        "type": "message",
        "role": "assistant",
        "status": "completed",
        "content": [part],
    }
    usage = {
        "input_tokens": prompt,
        "output_tokens": len(pieces),
        "total_tokens": prompt + len(pieces),
    }
    full: dict[str, Any] = {
        "id": ident,
        "object": "response",
        "created_at": int(time.time()),
        "model": call.model,
        "status": "incomplete" if cut else "completed",
        "output": [item],
        "usage": usage,
    }
    if body.get("stream") is not True:
        return _json(full)
    start = {**full, "status": "in_progress", "output": [], "usage": None}
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    events: list[tuple[str, dict[str, Any]]] = [
        ("response.created", {"response": start}),
        (
            "response.output_item.added",
            {"output_index": 0, "item": {**item, "status": "in_progress", "content": []}},
        ),
        ("response.content_part.added", {**where, "part": {**part, "text": ""}}),
    ]
    events += [
        ("response.output_text.delta", {**where, "delta": p, "logprobs": []}) for p in pieces
    ]
    events += [
        ("response.output_text.done", {**where, "text": text, "logprobs": []}),
        ("response.content_part.done", {**where, "part": part}),
        ("response.output_item.done", {"output_index": 0, "item": item}),
        ("response.completed", {"response": full}),
    ]
    frames = [
        _sse(name, {"type": name, "sequence_number": seq, **data})
        for seq, (name, data) in enumerate(events)
    ]
    sse = _Sse(frames[:3], frames[3 : 3 + len(pieces)], frames[3 + len(pieces) : -1], frames[-1],
               _RESPONSES_GARBLED, _RESPONSES_ERROR)  # fmt: skip
    return await _stream(call, sse)


async def _models(call: _Call) -> web.StreamResponse:
    return web.Response(body=_MODELS_BODY, content_type="application/json")


# --- Anthropic ------------------------------------------------------------


def _anthropic_prompt(body: dict[str, Any]) -> int:
    return max(_words(body.get("system")) + _words(body.get("messages")), 1)


async def _messages(call: _Call) -> web.StreamResponse:
    body = call.body
    prompt = _anthropic_prompt(body)
    plan = _anthropic_plan(body)
    if plan.call is not None:
        pieces = plan.call.pieces()
        stop = "tool_use"
        block: dict[str, Any] = {"type": "tool_use", "id": f"toolu_mock_{call.n}",
                                 "name": plan.call.name, "input": plan.call.arguments}  # fmt: skip
        opening = {**block, "input": {}}
        delta = [{"type": "input_json_delta", "partial_json": p} for p in pieces]
    else:
        pieces, cut = _reply(body, "max_tokens", prefill=_prefill(body), text=plan.text)
        stop = "max_tokens" if cut else "end_turn"
        block = {"type": "text", "text": "".join(pieces)}
        opening = {"type": "text", "text": ""}
        delta = [{"type": "text_delta", "text": p} for p in pieces]
    message: dict[str, Any] = {
        "id": f"msg_mock_{call.n}",
        "type": "message",
        "role": "assistant",
        "model": call.model,
        "content": [block],
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": {"input_tokens": prompt, "output_tokens": len(pieces)},
    }
    if body.get("stream") is not True:
        return _json(message)
    start = {
        **message,
        "content": [],
        "stop_reason": None,
        "usage": {"input_tokens": prompt, "output_tokens": 1},
    }
    head = [
        _sse("message_start", {"type": "message_start", "message": start}),
        _sse(
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": opening},
        ),
        _sse("ping", {"type": "ping"}),
    ]
    content = [
        _sse("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": d})
        for d in delta
    ]
    tail = [
        _sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
        _sse(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop, "stop_sequence": None},
                "usage": {"output_tokens": len(pieces)},
            },
        ),
    ]
    end = _sse("message_stop", {"type": "message_stop"})
    sse = _Sse(head, content, tail, end, _ANTHROPIC_GARBLED, _ANTHROPIC_ERROR)
    return await _stream(call, sse)


async def _count_tokens(call: _Call) -> web.StreamResponse:
    return _json({"input_tokens": _anthropic_prompt(call.body)})


# --- Gemini -----------------------------------------------------------------


def _gemini_words(value: object) -> int:
    """Words of the text parts in Gemini `contents` or a `systemInstruction`."""
    if isinstance(value, list):
        return sum(_gemini_words(v) for v in value)
    if isinstance(value, dict):
        if "parts" in value:
            return _gemini_words(value["parts"])
        return _words(value.get("text"))
    return _words(value)  # a bare string


def _gemini_prompt(body: dict[str, Any]) -> int:
    system = _camel(body, "systemInstruction")
    return max(_gemini_words(body.get("contents")) + _gemini_words(system), 1)


def _gemini_usage(prompt: int, output: int) -> dict[str, int]:
    return {
        "promptTokenCount": prompt,
        "candidatesTokenCount": output,
        "totalTokenCount": prompt + output,
    }


def _gemini_answer(
    call: _Call,
    parts: list[dict[str, Any]],
    finish: str | None = None,
    usage: dict[str, int] | None = None,
) -> dict[str, Any]:
    """A GenerateContentResponse (or a stream chunk of one) with one candidate."""
    candidate: dict[str, Any] = {"content": {"parts": parts, "role": "model"}}
    if finish is not None:
        candidate["finishReason"] = finish
    candidate["index"] = 0
    answer: dict[str, Any] = {"candidates": [candidate]}
    if usage is not None:
        answer["usageMetadata"] = usage
    answer["modelVersion"] = call.model
    answer["responseId"] = f"mock-{call.n}"
    return answer


@dataclass(frozen=True, slots=True)
class _GeminiReply:
    """A Gemini answer's parts: text pieces (one per stream chunk), or one whole functionCall."""

    parts: list[dict[str, Any]]
    finish: str
    usage: dict[str, int]
    call: bool


def _gemini_reply(body: dict[str, Any]) -> _GeminiReply:
    prompt = _gemini_prompt(body)
    plan = _gemini_plan(body)
    if plan.call is not None:
        part = {"functionCall": {"name": plan.call.name, "args": plan.call.arguments}}
        return _GeminiReply([part], "STOP", _gemini_usage(prompt, len(plan.call.pieces())), True)
    config = _dict(_camel(body, "generationConfig"))
    limit = {"maxOutputTokens": _camel(config, "maxOutputTokens")}
    pieces, cut = _reply(limit, "maxOutputTokens", prefill=_gemini_prefill(body), text=plan.text)
    usage = _gemini_usage(prompt, len(pieces))
    return _GeminiReply(
        [{"text": p} for p in pieces], "MAX_TOKENS" if cut else "STOP", usage, False
    )


async def _generate_content(call: _Call) -> web.StreamResponse:
    reply = _gemini_reply(call.body)
    parts = reply.parts if reply.call else [{"text": "".join(p["text"] for p in reply.parts)}]
    return _json(_gemini_answer(call, parts, reply.finish, reply.usage))


async def _stream_generate_content(call: _Call) -> web.StreamResponse:
    """Text in one chunk per piece, then a last chunk with finishReason and usageMetadata."""
    reply = _gemini_reply(call.body)
    if reply.call:
        content = [_gemini_answer(call, reply.parts, reply.finish, reply.usage)]
        tail: list[dict[str, Any]] = []
    else:
        content = [_gemini_answer(call, [p]) for p in reply.parts]
        tail = [_gemini_answer(call, [{"text": ""}], reply.finish, reply.usage)]
    if call.request.query.get("alt") != "sse":  # without SSE, Google sends one JSON array
        return _json([*content, *tail])
    frames = [_gemini_sse(c) for c in content], [_gemini_sse(c) for c in tail]
    sse = _Sse((), *frames, b"", _GEMINI_GARBLED, _GEMINI_ERROR)
    return await _stream(call, sse)


async def _gemini_count_tokens(call: _Call) -> web.StreamResponse:
    inner = _dict(_camel(call.body, "generateContentRequest"))
    return _json({"totalTokens": _gemini_prompt(inner or call.body)})


def _gemini_vector(content: object) -> dict[str, list[float]]:
    """An embedding of a Content's text, equal to OpenAI's embedding of the same string."""
    return {"values": _vector(_text_of(_dict(content).get("parts")))}


async def _embed_content(call: _Call) -> web.StreamResponse:
    return _json({"embedding": _gemini_vector(call.body.get("content"))})


async def _batch_embed_contents(call: _Call) -> web.StreamResponse:
    requests = _list(call.body.get("requests"))
    return _json({"embeddings": [_gemini_vector(r.get("content")) for r in requests]})


# --- app --------------------------------------------------------------------


async def _unknown_route(request: web.Request) -> web.StreamResponse:
    try:
        body = _parse_body(await request.read()) if request.body_exists else None
    except RequestPayloadError:
        body = _INVALID
    _record(request, body, _credential(request, _Format.OPENAI))
    message = f"Invalid URL ({request.method} {request.path})"
    return _error(_Format.OPENAI, 404, message, code="unknown_url")


async def _body_size(request: web.Request, limit: int) -> int | None:
    """Read the request's body and discard it: its size, or None once it exceeds `limit`."""
    if (request.content_length or 0) > limit:
        return None
    size = 0
    async for chunk in request.content.iter_chunked(_TRACES_CHUNK):
        size += len(chunk)
        if size > limit:
            return None
    return size


async def _traces(request: web.Request) -> web.StreamResponse:
    """`POST /v1/traces`, an OTLP/HTTP sink: counted, discarded, answered with an empty
    (all-accepted) export response."""
    counts = request.app[_STATE].trace_counts(request.query.get("source", ""))
    try:
        size = await _body_size(request, _TRACES_MAX)
    except RequestPayloadError:
        return web.Response(status=400, text="bad body\n")
    if size is None:
        counts.too_large += 1
        return web.Response(status=413, text=f"over {_TRACES_MAX} bytes\n")
    counts.requests += 1
    counts.bytes += size
    return web.Response(body=b"", content_type="application/x-protobuf")


async def _traces_get(request: web.Request) -> web.StreamResponse:
    traces = request.app[_STATE].traces
    return _json({"sources": {k: asdict(v) for k, v in traces.items()}})


async def _log_get(request: web.Request) -> web.StreamResponse:
    return _json({"requests": list(request.app[_STATE].log)})


async def _log_clear(request: web.Request) -> web.StreamResponse:
    state = request.app[_STATE]
    cleared = len(state.log)
    state.log.clear()
    state.flaky_seen.clear()  # `flaky-N` and `flap` counts start again too
    state.quota_seen.clear()  # and `quota-N` windows
    state.traces.clear()  # and what the trace sink received
    return _json({"cleared": cleared})


async def _health(request: web.Request) -> web.StreamResponse:
    return _json({"status": "ok"})


def create_app() -> web.Application:
    """The mock provider app; its request log lives in the app's state."""
    app = web.Application()
    app[_STATE] = _State()
    app.on_response_prepare.append(_add_quota_headers)
    openai, anthropic = _Format.OPENAI, _Format.ANTHROPIC
    app.router.add_post("/v1/chat/completions", _endpoint(openai, _chat))
    app.router.add_post("/v1/completions", _endpoint(openai, _completions))
    app.router.add_post("/v1/embeddings", _endpoint(openai, _embeddings))
    app.router.add_post("/v1/responses", _endpoint(openai, _responses))
    app.router.add_get("/v1/models", _endpoint(openai, _models, needs_body=False), allow_head=False)
    app.router.add_post("/v1/messages", _endpoint(anthropic, _messages))
    app.router.add_post("/v1/messages/count_tokens", _endpoint(anthropic, _count_tokens))
    gemini = _Format.GEMINI
    for version in ("v1beta", "v1"):
        for action, responder, streams in (
            ("generateContent", _generate_content, False),
            ("streamGenerateContent", _stream_generate_content, True),
            ("countTokens", _gemini_count_tokens, False),
            ("embedContent", _embed_content, False),
            ("batchEmbedContents", _batch_embed_contents, False),
        ):
            app.router.add_post(
                f"/{version}/models/{{model}}:{action}",
                _endpoint(gemini, responder, model_in="model", streams=streams),
            )
    azure = _Format.AZURE
    for route, responder, operation in (
        ("chat/completions", _chat, "ChatCompletions_Create"),
        ("completions", _completions, "Completions_Create"),
        ("embeddings", _embeddings, "Embeddings_Create"),
    ):
        app.router.add_post(
            f"/openai/deployments/{{deployment}}/{route}",
            _endpoint(azure, responder, model_in="deployment", operation=operation),
        )
        app.router.add_post(f"/openai/v1/{route}", _endpoint(azure, responder, operation=operation))
    app.router.add_post(
        "/openai/v1/responses", _endpoint(azure, _responses, operation="Responses_Create")
    )
    app.router.add_post("/v1/traces", _traces)
    app.router.add_route("*", "/v1/{tail:.*}", _unknown_route)
    app.router.add_get("/_mock/requests", _log_get, allow_head=False)
    app.router.add_get("/_mock/traces", _traces_get, allow_head=False)
    app.router.add_delete("/_mock/requests", _log_clear)
    app.router.add_get("/_mock/health", _health)
    app.router.add_route("*", "/{tail:.*}", _unknown_route)  # logged too: where requests went
    return app


async def run(host: str, port: int) -> None:
    """Serve the mock provider on host:port until cancelled. Its open-files limit is raised
    to the hard one and its listen backlog is 1024, so it holds thousands of callers (the
    benchmark opens 1,000 streams through a proxy at once)."""
    raise_fd_limit()
    runner = web.AppRunner(create_app(), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, backlog=1024).start()
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
