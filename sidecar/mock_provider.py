"""A local OpenAI + Anthropic look-alike upstream (`sidecar mock-provider`).

For demos, the sidecar's own tests and users' CI. It answers the OpenAI
routes (`/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`,
`/v1/responses`, `GET /v1/models`; `Authorization: Bearer K` or Azure's
`api-key: K`) and the Anthropic routes (`/v1/messages`,
`/v1/messages/count_tokens`; `x-api-key: K` or Bearer) with deterministic
bodies in the real wire shapes, streams included.

Misbehaviour is provoked by directives inside the provider key or the
request's `model`, each bounded by start/end or one of `-_:`
(`sk-test-fail-429`, `gpt-4o-mini-slow-200`):

- `fail-NNN` (400..599): that status with the format's error body;
  `fail-429` adds `retry-after: 1`, `fail-429-retry-N` makes it N seconds,
  `fail-429-retry-none` sends no `retry-after`.
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
  (`Incorrect API key provided: sk-proj-********************ab12. ...`).

`huge`, `bomb` and `hold` apply to successful JSON answers (not to streams);
`break`, `stuck`, `garble`, `nodone`, `early-error` and `late-error` to streams
only. "Two content events" means fewer when the reply is shorter (a short
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

Test hooks: every request outside `/_mock/` is kept in a bounded log (the last
1000), unknown paths included (they answer 404 `unknown_url`):
`GET /_mock/requests` returns `{"requests": [{method, path, raw_path, query,
headers, body, key}]}` with header names lower-cased (`path` decoded,
`raw_path` as sent, query string included; `body` null when not JSON),
`DELETE /_mock/requests` clears it (and the `flaky-N` and `flap` counts),
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
import re
import struct
import time
import zlib
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

__all__ = [
    "DEFAULT_LISTEN",
    "Directives",
    "create_app",
    "gzip_padded",
    "masked_key",
    "parse_directives",
    "run",
]

DEFAULT_LISTEN = "127.0.0.1:8089"

_LOG_SIZE = 1000
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
    r"(?:^|[-_:])(fail-(\d{3}|quota|context|nomodel|filter)(?:-retry-(\d+|none))?"
    r"|drop|break|leaky|silent|stuck|garble|nodone|early-error|late-error|noprefill|flap"
    r"|(slow|stall|hold|huge|bomb|flaky|first)-(\d+))(?=$|[-_:])"
)
# Directive words and `word-N` amounts, by the Directives field they set.
_FLAGS = {"break": "brk", "early-error": "early_error", "late-error": "late_error"}
_AMOUNTS = {"slow": "slow_ms", "stall": "stall_ms", "hold": "hold_ms", "huge": "huge_mib",
            "bomb": "bomb_mib", "flaky": "flaky", "first": "first_ms"}  # fmt: skip
_HANG_S = 600.0  # `silent` and `stuck` give up on a caller that never leaves
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
_INVALID = object()


class _Format(enum.Enum):
    OPENAI = "openai"
    ANTHROPIC = "anthropic"


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
    garble: bool = False
    nodone: bool = False
    early_error: bool = False
    late_error: bool = False
    noprefill: bool = False
    flap: bool = False  # odd-numbered requests of this key and model answer 503

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
        word, code, retry_s, name, amount = m.groups()
        if code is not None:
            if "fail" in fields:
                continue
            if code == "quota":
                fields.update(fail=429, quota=True)
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
        else:
            fields[_FLAGS.get(word, word)] = True
    found = Directives(**fields)
    return _NONE if found == _NONE else found


class _State:
    """The app's request log and id counter."""

    __slots__ = ("_n", "flaky_seen", "log")

    def __init__(self) -> None:
        self.log: deque[dict[str, Any]] = deque(maxlen=_LOG_SIZE)
        self._n = 0
        self.flaky_seen: dict[str, int] = {}  # `flaky-N`, `flap`: requests seen per key and model

    def next_id(self) -> int:
        self._n += 1
        return self._n


_STATE = web.AppKey("mock_provider_state", _State)


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
) -> web.Response:
    if fmt is _Format.ANTHROPIC:
        kind = _ANTHROPIC_ERRORS.get(
            status, "api_error" if status >= 500 else "invalid_request_error"
        )
        err: dict[str, Any] = {"type": kind, "message": message}
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


def masked_key(key: str) -> str:
    """A key as OpenAI's 401 names it: its prefix, stars, its last four characters."""
    prefix = "sk-proj-" if key.startswith("sk-proj-") else key[:3]
    return f"{prefix}{'*' * 20}{key[-4:]}"


def _leaky_auth_error(fmt: _Format, status: int, key: str) -> web.Response:
    """A 401/403 in the provider's own wording, naming a masked fragment of the key."""
    if fmt is _Format.ANTHROPIC:
        message = f"invalid x-api-key: {masked_key(key)}"
        return _error(fmt, status, message)
    message = (f"Incorrect API key provided: {masked_key(key)}. You can find your API key "
               "at https://platform.openai.com/account/api-keys.")  # fmt: skip
    body = {"error": {"message": message, "type": "invalid_request_error",
                      "code": "invalid_api_key", "param": None}}  # fmt: skip
    return _json(body, status)


def _model_error(fmt: _Format, kind: str) -> web.Response:
    """A model-level error in the provider's own shape: another model could answer."""
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


def _failure(fmt: _Format, d: Directives, status: int, key: str) -> web.Response:
    if d.model_error:
        return _model_error(fmt, d.model_error)
    if d.leaky and status in (401, 403):
        return _leaky_auth_error(fmt, status, key)
    headers = None
    if d.retry_after is not None or (status == 429 and not d.quota and not d.no_retry_after):
        headers = {"retry-after": str(d.retry_after if d.retry_after is not None else 1)}
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
    end: bytes  # the terminator
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
    return steps if d.nodone else [*steps, sse.end]


async def _stream(call: _Call, sse: _Sse) -> web.StreamResponse:
    """Send a stream one write per frame, as `_script` and `stall-N` say."""
    request, stall = call.request, call.directives.stall_ms / 1000
    resp = web.StreamResponse(headers=_SSE_HEADERS)
    await resp.prepare(request)
    sent = 0
    for step in _script(sse, call.directives):
        if step is None:
            _drop(request)
            return resp
        if isinstance(step, bytes):
            if stall and sent:
                await asyncio.sleep(stall)
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


def _continuation(prefill: str) -> str:
    """What is left of the reply after `prefill`: the whole reply if it does not start so."""
    for head in (prefill, prefill.rstrip()):
        if _REPLY.startswith(head):
            return _REPLY[len(head) :]
    return _REPLY


def _reply(
    body: dict[str, Any], *limit_fields: str, prefill: str | None = None
) -> tuple[tuple[str, ...], bool]:
    """The reply pieces (after a prefill) under the body's token limit, and whether it cut them."""
    pieces = _PIECES if prefill is None else tuple(_PIECE_RE.findall(_continuation(prefill)))
    for name in limit_fields:
        limit = body.get(name)
        if isinstance(limit, int) and not isinstance(limit, bool):
            if limit < len(pieces):
                return pieces[: max(limit, 1)], True
            break
    return pieces, False


def _credential(request: web.Request, fmt: _Format) -> tuple[str | None, str | None]:
    """The credential this route accepts, and whichever one was sent (for the log)."""
    bearer = None
    auth = request.headers.get("authorization")
    if auth is not None and auth[:7].lower() == "bearer ":
        bearer = auth[7:].strip() or None
    api_key = request.headers.get("x-api-key") or None
    if fmt is _Format.ANTHROPIC:
        return api_key or bearer, api_key or bearer
    azure = request.headers.get("api-key") or None  # Azure OpenAI's header
    return bearer or azure, bearer or azure or api_key


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


def _record(request: web.Request, body: object, key: str | None) -> None:
    request.app[_STATE].log.append(
        {
            "method": request.method,
            "path": request.path,
            "raw_path": request.raw_path,
            "query": dict(request.query),
            "headers": {k.lower(): v for k, v in request.headers.items()},
            "body": None if body is _INVALID else body,
            "key": key,
        }
    )


def _counted_failure(seen: dict[str, int], which: str, d: Directives) -> bool:
    """Whether `flaky-N` or `flap` fails this request of key and model `which`."""
    if len(seen) >= _LOG_SIZE and which not in seen:  # bounded, like the request log
        return False
    count = seen[which] = seen.get(which, 0) + 1
    return count <= d.flaky or (d.flap and count % 2 == 1)


async def _instead(
    request: web.Request, fmt: _Format, d: Directives, key: str, model: str, body: dict[str, Any]
) -> web.StreamResponse | None:
    """What the directives answer in place of the route (after any wait), if anything."""
    if d.slow_ms:
        await asyncio.sleep(d.slow_ms / 1000)
    if d.first_ms and body.get("stream") is not True:
        await _pause(request, d.first_ms / 1000)
    if d.silent:
        await _pause(request, _HANG_S)
        return _drop(request)
    if d.drop:
        return _drop(request)
    if d.fail is not None:
        return _failure(fmt, d, d.fail, key)
    if d.noprefill and _prefill(body) is not None:
        return _error(fmt, 400, _NO_PREFILL, code="prefill_unsupported")
    if (d.flaky or d.flap) and _counted_failure(
        request.app[_STATE].flaky_seen, f"{key}:{model}", d
    ):
        return _failure(fmt, d, 503, key)
    return None


def _endpoint(
    fmt: _Format, responder: _Responder, *, needs_body: bool = True
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """Wrap a responder with what every route does: log, auth, body, directives."""

    async def handler(request: web.Request) -> web.StreamResponse:
        try:
            body = _parse_body(await request.read()) if request.body_exists else None
        except RequestPayloadError:  # not what its Content-Encoding says
            _record(request, _INVALID, _credential(request, fmt)[1])
            return _error(fmt, 400, "The request body could not be decoded.")
        key, sent = _credential(request, fmt)
        _record(request, body, sent)
        if key is None:
            if fmt is _Format.ANTHROPIC:
                return _error(fmt, 401, "x-api-key header is required")
            return _error(fmt, 401, "You didn't provide an API key (Authorization: Bearer).")
        if needs_body and not isinstance(body, dict):
            return _error(fmt, 400, "The request body is not a valid JSON object.")
        fields: dict[str, Any] = body if isinstance(body, dict) else {}
        model = fields.get("model")
        if needs_body and (not isinstance(model, str) or not model):
            return _error(fmt, 400, "You must provide a model parameter.")
        model = model if isinstance(model, str) else ""
        d = parse_directives(f"{key}:{model}")
        if d is not _NONE:
            instead = await _instead(request, fmt, d, key, model, fields)
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
    pieces, cut = _reply(body, "max_completion_tokens", "max_tokens", prefill=_prefill(body))
    finish = "length" if cut else "stop"
    ident, created = f"chatcmpl-mock-{call.n}", int(time.time())
    if body.get("stream") is not True:
        return _json(
            {
                "id": ident,
                "object": "chat.completion",
                "created": created,
                "model": call.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "".join(pieces)},
                        "logprobs": None,
                        "finish_reason": finish,
                    }
                ],
                "usage": _usage(prompt, len(pieces)),
            }
        )
    with_usage = _include_usage(body)

    def chunk(delta: dict[str, str], finish_reason: str | None) -> bytes:
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
    pieces, cut = _reply(body, "max_tokens", prefill=_prefill(body))
    stop = "max_tokens" if cut else "end_turn"
    message: dict[str, Any] = {
        "id": f"msg_mock_{call.n}",
        "type": "message",
        "role": "assistant",
        "model": call.model,
        "content": [{"type": "text", "text": "".join(pieces)}],
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
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        ),
        _sse("ping", {"type": "ping"}),
    ]
    content = [
        _sse(
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": p}},
        )
        for p in pieces
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


# --- app --------------------------------------------------------------------


async def _unknown_route(request: web.Request) -> web.StreamResponse:
    try:
        body = _parse_body(await request.read()) if request.body_exists else None
    except RequestPayloadError:
        body = _INVALID
    _record(request, body, _credential(request, _Format.OPENAI)[1])
    message = f"Invalid URL ({request.method} {request.path})"
    return _error(_Format.OPENAI, 404, message, code="unknown_url")


async def _log_get(request: web.Request) -> web.StreamResponse:
    return _json({"requests": list(request.app[_STATE].log)})


async def _log_clear(request: web.Request) -> web.StreamResponse:
    state = request.app[_STATE]
    cleared = len(state.log)
    state.log.clear()
    state.flaky_seen.clear()  # `flaky-N` and `flap` counts start again too
    return _json({"cleared": cleared})


async def _health(request: web.Request) -> web.StreamResponse:
    return _json({"status": "ok"})


def create_app() -> web.Application:
    """The mock provider app; its request log lives in the app's state."""
    app = web.Application()
    app[_STATE] = _State()
    openai, anthropic = _Format.OPENAI, _Format.ANTHROPIC
    app.router.add_post("/v1/chat/completions", _endpoint(openai, _chat))
    app.router.add_post("/v1/completions", _endpoint(openai, _completions))
    app.router.add_post("/v1/embeddings", _endpoint(openai, _embeddings))
    app.router.add_post("/v1/responses", _endpoint(openai, _responses))
    app.router.add_get("/v1/models", _endpoint(openai, _models, needs_body=False), allow_head=False)
    app.router.add_post("/v1/messages", _endpoint(anthropic, _messages))
    app.router.add_post("/v1/messages/count_tokens", _endpoint(anthropic, _count_tokens))
    app.router.add_route("*", "/v1/{tail:.*}", _unknown_route)
    app.router.add_get("/_mock/requests", _log_get, allow_head=False)
    app.router.add_delete("/_mock/requests", _log_clear)
    app.router.add_get("/_mock/health", _health)
    app.router.add_route("*", "/{tail:.*}", _unknown_route)  # logged too: where requests went
    return app


async def run(host: str, port: int) -> None:
    """Serve the mock provider on host:port until cancelled."""
    runner = web.AppRunner(create_app(), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
