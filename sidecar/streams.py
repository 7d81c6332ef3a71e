"""What a relayed SSE stream is doing, event by event (SPEC §9).

Pure code: no I/O, no clock. The proxy feeds each upstream chunk to a
`StreamTracker` and forwards what `feed()` returns; the tracker tells it

* when the first *content* event has arrived (`started`: the response headers
  may go to the caller; before that, the attempt can still fail over),
* when the stream broke in band (`error`, `malformed`),
* whether a clean EOF completed the answer (`complete_on_eof()`),
* the usage so far (`usage`), and what is needed to resume the answer on
  another candidate (`text`, `resumable`; see `sidecar.resume`).

Shapes: OpenAI chat completions, completions and Responses, Anthropic
messages, and Gemini `streamGenerateContent?alt=sse` (GEMINI: `data:` events
separated by `\r\n\r\n` or `\n\n`, one `GenerateContentResponse` each, no
terminator; not resumable). On a translated attempt a `Translator` (`pre=`)
turns the upstream's bytes into the caller's events first, and the tracker
reads those.

Everything forwarded is byte-for-byte what upstream sent, except the usage
chunk the sidecar asked for itself (`strip_usage`), an in-band error or
malformed event and everything after it, and — on a continuation stream
(`splice=`) — the events a `Splice` rewrites so the caller sees one answer.

Hot path: one parse per data event. (Bytes are searched with `find`, not `in`: on Python
3.11 `x in some_bytes` first tries `x` as an integer, and builds and drops a TypeError.)
A chunk that is one whole event (a live stream's) is read as it is; a chunk of whole
events (`\\n\\n`-terminated without `\\r`, or with Gemini's `\\r\\n\\r\\n`) is cut up
in C; only an event split across chunks is held and copied. A chunk relayed unchanged is returned as
the very same object. A chat stream's whole events are only validated (the fast lane), and
before its first content also read for whether they are content: what they mean for
`text`, `resumable` and `finished` is read (parsed a second time) only when needed: when
a stream breaks or ends without `[DONE]`; before an event the careful path reads (one
split across chunks, a comment, another field), to keep the order; and once the lane
has kept about 1 MiB over the stream (`_MAX_RAW`), after which the stream goes the
careful way, each later event parsed once. A stream of whole single-line events that
ends well within that is parsed once. Nothing refers back to the tracker,
so it is freed as soon as the proxy lets go of it.

The fast lane's parse (`_lane_event`, msgspec) builds no Python objects but the two fields
it reads, for about half of what orjson's full parse costs (before the first content,
`_read_opening` also builds each choice's `finish_reason` and the delta's content
fields); it passes one JSON object in valid UTF-8, else the event goes the careful way
(see `_lane_event` for the one kind of number the two parsers judge differently). Every
other event is parsed with orjson.

A data value with a bare CR in it is malformed: an SSE parser ends the line there.
"""

from __future__ import annotations

import enum
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol, TypeVar

import msgspec
import orjson

from sidecar.errors import ProxyError
from sidecar.formats.gemini import error_object as gemini_error_object
from sidecar.formats.gemini import http_status as gemini_http_status
from sidecar.inbound import dump_json
from sidecar.translate.openai import openai_error_status
from sidecar.usage import Usage, gemini_usage, loads_or_none, openai_usage, token_count

__all__ = [
    "MAX_EVENT",
    "InbandError",
    "Shape",
    "StreamTracker",
    "Translator",
    "error_event",
    "shape_for",
]

# An incomplete event held longer than this is treated as malformed. Not 1 MiB: a Responses
# stream's `response.completed` repeats the whole output, and image generation sends
# base64 images of several MiB in one event.
MAX_EVENT: Final = 16 * 1024 * 1024
# Beyond this much relayed text a stream is no longer resumed (the prefill would be huge).
_MAX_TEXT: Final = 1024 * 1024
# What the fast lane keeps unread over a whole stream, counted with what each kept event
# costs besides its bytes (an object and a list slot): past it, what it still holds is read
# and the stream leaves the lane (`_leave_lane`). Not reset when kept events are read
# earlier (a careful read first reads them, in order): so at most this much of a stream is
# ever parsed twice, and at most this much is held unread at a time.
_MAX_RAW: Final = 1024 * 1024
_RAW_ENTRY: Final = 64
_LINE_ENDS: Final = b"\r\n"
_DONE: Final = b"[DONE]"
_DONE_EVENT: Final = b"data: [DONE]\n\n"
_DONE_TAIL: Final = b"\n\ndata: [DONE]"
_MESSAGE_STOP_EVENT: Final = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
# What `_on_data` returns besides replacement bytes: keep the event as received.
_KEEP: Final = None
_DROP: Final = b""

# CHAT delta fields that are content but not text: no prefill can continue them.
NOT_TEXT: Final = ("tool_calls", "function_call", "refusal", "reasoning_content")
_RESPONSES_PREAMBLE: Final = frozenset(
    {
        "response.created",
        "response.in_progress",
        "response.queued",
        "response.output_item.added",
        "response.content_part.added",
    }
)
_RESPONSES_END: Final = frozenset({"response.completed", "response.incomplete"})

_ANTHROPIC_STATUS: Final = {
    "overloaded_error": 529,
    "rate_limit_error": 429,
    "api_error": 500,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "invalid_request_error": 400,
    "timeout_error": 504,
}
# An error kind (`ErrorCode.kind`, Anthropic's types) -> the HTTP status of a Gemini error event.
_GEMINI_KIND_STATUS: Final = {
    "api_error": 500,
    "overloaded_error": 503,
    "rate_limit_error": 429,
    "timeout_error": 504,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "invalid_request_error": 400,
    "request_too_large": 413,
    "billing_error": 402,
}
# Part fields that are content besides non-empty `text`.
_GEMINI_CONTENT: Final = (
    "functionCall",
    "inlineData",
    "fileData",
    "executableCode",
    "codeExecutionResult",
)


class _Event(msgspec.Struct):
    """What the fast lane reads of a chat event: whether it has an `error` (any value: the
    careful path then reads it) and its `usage`."""

    error: Any = msgspec.UNSET
    usage: Any = None


_read_event: Final = msgspec.json.Decoder(_Event).decode
#: What `_read_event` raises for bytes that are not one JSON object: msgspec.DecodeError, a
#: UnicodeDecodeError (a key or a field it reads), both ValueErrors; RecursionError: nesting
#: deeper than msgspec goes, which orjson may still read (the careful path decides).
_NOT_AN_EVENT: Final = (ValueError, RecursionError)
_ERROR_OF: Final = operator.attrgetter("error")
_USAGE_OF: Final = operator.attrgetter("usage")
_UNSET: Final = msgspec.UNSET
_T = TypeVar("_T")


def _utf8(data: bytes) -> bool:
    """Whether `data` is valid UTF-8 throughout. msgspec does not check the strings it skips
    (orjson does): a fast-lane event must pass this too."""
    if data.isascii():
        return True
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


class _Delta(msgspec.Struct):
    """What of a chat choice's `delta` makes it content (`StreamTracker._chat`): its text, or
    content of another kind (`NOT_TEXT`)."""

    content: Any = None
    tool_calls: Any = None
    function_call: Any = None
    refusal: Any = None
    reasoning_content: Any = None


class _Choice(msgspec.Struct):
    delta: _Delta | None = None
    finish_reason: Any = None


class _Opening(msgspec.Struct):
    """A chat event before the stream's first content, as the fast lane reads it: `_Event`'s
    fields, and what of its `choices` tells whether it is content. A `choices`, choice or
    `delta` of another type than `_chat` reads is a decode error: the careful path decides."""

    error: Any = msgspec.UNSET
    usage: Any = None
    choices: list[_Choice] | None = None


_read_opening: Final = msgspec.json.Decoder(_Opening).decode


def _lane_event(decode: Callable[[bytes], _T], data: bytes) -> _T | None:
    """One chat event read for the fast lane with `decode` (`_read_event`; before the first
    content `_read_opening`, which also tells content); None unless it is one JSON object in
    valid UTF-8 without a bare CR (then the careful path decides).

    What this accepts orjson accepts too, but for one kind of number: one that rounds to
    infinity as a double (`1e999`, or an integer of more than 308 digits) is valid JSON, which
    msgspec skips unread and orjson refuses. No JSON encoder writes one; finding it would cost
    every event a scan of its bytes. Such an event is relayed here, and malformed to the
    careful path (which also reads every event of a stream past `_MAX_RAW`)."""
    try:
        event = decode(data)
    except _NOT_AN_EVENT:
        return None
    if not (data.isascii() or _utf8(data)) or data.find(b"\r") >= 0:
        return None  # (`isascii` first: no call; a bare CR is malformed, `_on_data`)
    return event


def _is_content(event: _Opening) -> bool:
    """Whether `_chat` would find content in the event: a choice with a `finish_reason`, with
    text, or with content of another kind."""
    for choice in event.choices or ():
        if choice.finish_reason is not None:
            return True
        delta = choice.delta
        if delta is not None and (
            delta.content
            or delta.tool_calls
            or delta.function_call
            or delta.refusal
            or delta.reasoning_content
        ):
            return True
    return False


def _read_openings(pieces: list[bytes]) -> tuple[list[Any], bool]:
    """`_feed_fast`'s events before the first content: read as `_Opening`s up to the first
    content event, and the rest as `_Event`s; and whether there was content. Raises what the
    decoders raise."""
    events: list[Any] = []
    for i, piece in enumerate(pieces):
        event = _read_opening(piece)
        events.append(event)
        if event.error is _UNSET and _is_content(event):
            events += map(_read_event, pieces[i + 1 :])
            return events, True
    return events, False


class _Choices(msgspec.Struct):
    """An event's `choices`, unread (the last of repeated keys, as orjson keeps)."""

    choices: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET


_read_choices: Final = msgspec.json.Decoder(_Choices).decode


def _only_usage(data: bytes) -> bool:
    """A usage chunk with `choices: []`: the one the sidecar asked for, to strip. Its bytes
    are exactly `[]` as OpenAI writes them; any other spelling is parsed in full. (An event
    the lane accepted with a number out of a double's range elsewhere, see `_lane_event`, is
    then stripped, where orjson alone would have kept it.)"""
    try:
        choices = _read_choices(data).choices
    except _NOT_AN_EVENT:
        choices = _UNSET
    if choices is not _UNSET and bytes(choices) == b"[]":
        return True
    obj = loads_or_none(data)
    return type(obj) is dict and obj.get("choices") == []


class Shape(enum.Enum):
    """The kind of stream, which decides what its events mean."""

    CHAT = "chat"
    COMPLETIONS = "completions"
    RESPONSES = "responses"
    MESSAGES = "messages"
    GEMINI = "gemini"
    OTHER = "other"


# The members as module constants: on Python 3.11 `Shape.CHAT` is a slow attribute lookup (the
# enum metaclass's hook, ~10x a global's), and the tracker reads them per event.
_CHAT: Final = Shape.CHAT
_COMPLETIONS: Final = Shape.COMPLETIONS
_RESPONSES: Final = Shape.RESPONSES
_MESSAGES: Final = Shape.MESSAGES
_GEMINI: Final = Shape.GEMINI
_OTHER: Final = Shape.OTHER


def shape_for(fmt: str, path: str) -> Shape:
    """The stream shape of a request in format `fmt` (`openai`/`anthropic`/`gemini`) to `path`.

    GEMINI is the SSE form only (`?alt=sse`): without it Google streams one JSON array, which
    is not SSE — the caller of this function must not track such a stream as GEMINI."""
    if fmt == "openai":
        if path.endswith("/chat/completions"):
            return _CHAT
        if path.endswith("/completions"):
            return _COMPLETIONS
        if path.endswith("/responses"):
            return _RESPONSES
    elif fmt == "anthropic" and path.endswith("/messages"):
        return _MESSAGES
    elif fmt == "gemini" and ":streamGenerateContent" in path:
        return _GEMINI
    return _OTHER


@dataclass(frozen=True, slots=True)
class InbandError:
    """An error event inside a 200 stream."""

    status: int  # the HTTP status this error would have had (for failover classification)
    body: bytes  # an error body in the caller's format
    message: str  # the upstream's message


def error_event(
    shape: Shape, message: str, *, kind: str = "api_error", code: str = "stream_interrupted"
) -> bytes:
    """The in-band error event that ends a caller's broken stream; the official SDKs raise it.

    OpenAI shapes (and OTHER): `data: {"error": {...}}` — the `openai` SDK's
    `Stream` raises `APIError` on a data object with an `error` (chat,
    completions and responses streams alike). RESPONSES also carries the
    Responses API's own `type: "error"` fields, under `event: error`.
    MESSAGES: `event: error` with `{"type": "error", "error": {...}}` — the
    `anthropic` SDK raises an `APIStatusError` on it. The OpenAI `type` is
    `server_error` for the default `kind` (`api_error`), else `kind`.
    GEMINI: `data: {"error": {"code", "message", "status", "details"}}` — the
    `google-genai` SDK raises `ServerError`/`ClientError` (by `code`) on a chunk
    whose first key is `error`; `code` is the HTTP status `kind` implies (500 for
    `api_error`), `details` one google.rpc.ErrorInfo whose `reason` is `code`.
    """
    if shape is Shape.GEMINI:
        status = _GEMINI_KIND_STATUS.get(kind, 500)
        return b"data: " + orjson.dumps(gemini_error_object(status, message, code)) + b"\r\n\r\n"
    if shape is Shape.MESSAGES:
        err = {"type": kind, "message": message, "code": code}
        return b"event: error\ndata: " + orjson.dumps({"type": "error", "error": err}) + b"\n\n"
    kind = "server_error" if kind == "api_error" else kind
    error = {"message": message, "type": kind, "code": code, "param": None}
    if shape is Shape.RESPONSES:
        obj = {"type": "error", "code": code, "message": message, "param": None, "error": error}
        return b"event: error\ndata: " + orjson.dumps(obj) + b"\n\n"
    return b"data: " + orjson.dumps({"error": error}) + b"\n\n"


def _dumps(obj: object, fallback: object) -> bytes:
    """An upstream's object written back (`dump_json`: orjson reads 1,024 levels of nesting
    but writes 254, the standard library the rest); nested deeper than either writes,
    `fallback` is written instead."""
    try:
        return dump_json(obj)
    except ProxyError:
        return orjson.dumps(fallback)


def _error_body(error: dict[str, Any], message: object, anthropic: bool = False) -> bytes:
    """`{"error": error}` (Anthropic: with `"type": "error"`), or one with its message only."""
    text = message if isinstance(message, str) else ""
    if anthropic:
        return _dumps({"type": "error", "error": error},
                      {"type": "error", "error": {"type": "api_error", "message": text}})  # fmt: skip
    return _dumps({"error": error}, {"error": {"message": text}})


def _gemini_error(error: dict[str, Any]) -> InbandError:
    code = error.get("code")
    if type(code) is int and 400 <= code <= 599:
        status = code
    else:
        rpc = error.get("status")
        status = gemini_http_status(rpc) if isinstance(rpc, str) else 500
    message = error.get("message")
    return InbandError(
        status, _error_body(error, message), message if isinstance(message, str) else ""
    )


def _openai_error(error: dict[str, Any]) -> InbandError:
    message = error.get("message")
    return InbandError(
        openai_error_status(error),
        _error_body(error, message),
        message if isinstance(message, str) else "",
    )


def _responses_error(obj: dict[str, Any]) -> InbandError:
    """A Responses API `error` event (fields at top level) or `response.failed`."""
    source: Any = obj
    if obj.get("type") == "response.failed":
        response = obj.get("response")
        source = response.get("error") if isinstance(response, dict) else None
        if not isinstance(source, dict):
            source = {}
    code = source.get("code")
    error = {
        "message": source.get("message") if isinstance(source.get("message"), str) else "",
        "type": code if isinstance(code, str) and code else "server_error",
        "code": code,
        "param": source.get("param"),
    }
    return _openai_error(error)


def _anthropic_error(obj: dict[str, Any]) -> InbandError:
    error = obj.get("error")
    if not isinstance(error, dict):
        error = {"type": "api_error", "message": ""}
    kind = error.get("type")
    message = error.get("message")
    return InbandError(
        _ANTHROPIC_STATUS.get(kind, 500) if isinstance(kind, str) else 500,
        _error_body(error, message, anthropic=True),
        message if isinstance(message, str) else "",
    )


def _event_data(event: bytes) -> bytes | None:
    """The joined `data:` values of one SSE event (terminator included or not); None without any."""
    if event[:6] == b"data: ":
        # One `data:` line, alone or followed by nothing but its event's blank line.
        end = event.find(b"\n", 6)
        if end < 0:
            return event[6:]
        if end == len(event) - 2 and event[-1] == 0x0A:
            value = event[6:end]
            return value[:-1] if value[-1:] == b"\r" else value  # (a CRLF line, then LF)
        if end == len(event) - 3 and event.endswith(b"\r\n\r\n"):
            return event[6 : end - 1]
    n = event.count(b"data:")
    if n == 0:
        return None
    if n == 1:
        at = event.find(b"data:")
        if at == 0 or event[at - 1] == 0x0A:
            end = event.find(b"\n", at)
            value = event[at + 5 :] if end < 0 else event[at + 5 : end]
            if value[-1:] == b"\r":
                value = value[:-1]
            return value[1:] if value[:1] == b" " else value
    parts = []
    for raw in event.split(b"\n"):
        line = raw[:-1] if raw.endswith(b"\r") else raw
        if line.startswith(b"data:"):
            value = line[5:]
            parts.append(value[1:] if value.startswith(b" ") else value)
    return b"\n".join(parts) if parts else None


def _key(value: object) -> object:
    """A choice's index or an event's type, as a set or dict key: a list or an object sent
    there (unhashable) is no index or type at all."""
    return None if type(value) in (list, dict) else value


def _serialise(obj: dict[str, Any], named: bool) -> bytes:
    data = _dumps(obj, {"type": obj.get("type")} if named else {})
    if named:
        return b"event: " + str(obj.get("type")).encode() + b"\ndata: " + data + b"\n\n"
    return b"data: " + data + b"\n\n"


class Rewriter(Protocol):
    """What a continuation stream's tracker asks of its splice (`sidecar.resume.Splice`)."""

    original: StreamTracker  # the tracker of the stream that broke

    def chat(
        self, obj: dict[str, Any], first: dict[str, Any] | None, content: bool
    ) -> bytes | None: ...

    def messages(self, obj: dict[str, Any]) -> bytes | None: ...


class Translator(Protocol):
    """An upstream stream of another format turned into the caller's SSE events
    (`StreamTracker(..., pre=)`; built by `sidecar.translate`).

    `feed` takes upstream bytes split anywhere and returns the caller-format events they
    complete (b"" for none); `finish` at upstream EOF returns what is still owed (say, the
    caller format's terminator). Neither raises: a malformed upstream event comes out as
    an event the tracker reads as malformed or as an in-band error.
    """

    #: The upstream sent content that the caller's format holds back for now (a Gemini
    #: caller gets function calls whole, at the end): the upstream is answering.
    content_held: bool

    def feed(self, chunk: bytes) -> bytes: ...

    def finish(self) -> bytes: ...


class StreamTracker:
    """Follows one upstream SSE stream as it is relayed to the caller.

    `feed(chunk)` takes upstream chunks split anywhere (`\n` or `\r\n` line
    ends) and returns the bytes to forward now: every complete event as
    received, minus what is removed (see the module docstring). An incomplete
    trailing event is held until it completes; one over `max_event` bytes
    (16 MiB by default) counts as malformed. After `error` or `malformed` is
    set (`stopped`: either), nothing more is forwarded. After the shape's terminator everything is
    forwarded unread. `finish()` at EOF drops an incomplete trailing event (a
    cut) and returns the bytes still to forward (b"" unless translated).

    With `pre=` (a translated attempt) every upstream chunk goes through
    `pre.feed` first and the tracker reads what it returns, in the caller's shape;
    `finish()` feeds what `pre.finish()` returns before its own end of stream.

    `started` turns True at the first content event (on a continuation stream
    it starts True); `content_seen` is True once this upstream stream itself
    sent one (on a continuation: its first content after the dropped
    preamble). `text` is the assistant text relayed so far (CHAT/MESSAGES with
    `keep_text`, while `resumable`); on a continuation it starts as the
    original's.
    """

    __slots__ = (
        "_cache_create",
        "_cache_read",
        "_cut",
        "_done_choices",
        "_finished",
        "_handle",
        "_held",
        "_input",
        "_keep_text",
        "_kept",
        "_laned",
        "_max_event",
        "_next_index",
        "_open_choices",
        "_open_index",
        "_open_text",
        "_pre",
        "_raw",
        "_resumable",
        "_scan",
        "_splice",
        "_strip",
        "_text",
        "_text_len",
        "_through",
        "content_seen",
        "error",
        "events",
        "malformed",
        "shape",
        "stopped",
        "terminated",
        "usage",
    )

    def __init__(
        self,
        shape: Shape,
        *,
        strip_usage: bool = False,
        keep_text: bool = True,
        splice: Rewriter | None = None,
        max_event: int = MAX_EVENT,
        pre: Translator | None = None,
    ) -> None:
        self.shape = shape
        self._pre = pre
        self._strip = strip_usage and shape in (_CHAT, _COMPLETIONS)
        self._keep_text = keep_text and shape in (_CHAT, _MESSAGES)
        self._splice = splice
        # CHAT events may take the fast lane (before the first content too), when nothing
        # is rewritten; a long stream leaves it (`_leave_lane`).
        self._laned = shape is _CHAT and splice is None
        self._max_event = max_event
        self.content_seen = False
        self.error: InbandError | None = None
        self.malformed = False
        self.terminated = False
        self._finished = False
        # CHAT/COMPLETIONS choices (by index) seen with and without their finish_reason.
        self._open_choices: set[object] = set()
        self._done_choices: set[object] = set()
        self.usage = Usage()
        self.events = 0
        self._resumable = self._keep_text
        # The data of the CHAT events the fast lane relayed, not yet read (`_catch_up`).
        self._raw: list[bytes] = []
        self._kept = 0  # what the lane has kept over the whole stream (`_MAX_RAW`)
        self._text: list[str] = []
        self._text_len = 0
        # MESSAGES: the block open now (started, not stopped), whether it is text, the next index.
        self._open_index: int | None = None
        self._open_text = False
        self._next_index = 0
        # Anthropic input is the sum of three counters, each updated on its own.
        self._input = 0
        self._cache_create = 0
        self._cache_read = 0
        self._held = bytearray()
        self._scan = 0
        self.stopped = False  # error or malformed: nothing more is forwarded
        self._through = False  # terminated (or OTHER started): forward unread
        self._cut = False
        # An if-chain, not a dict: hashing an enum member is a Python-level call. The plain
        # function, not a bound method: that would be a reference cycle, and every tracker
        # would then wait for the cyclic garbage collector to be freed.
        cls = StreamTracker
        if shape is _CHAT:
            self._handle: Callable[[StreamTracker, dict[str, Any]], bytes | None] = cls._chat
        elif shape is _MESSAGES:
            self._handle = cls._messages
        elif shape is _COMPLETIONS:
            self._handle = cls._completions
        elif shape is _RESPONSES:
            self._handle = cls._responses
        elif shape is _GEMINI:
            self._handle = cls._gemini
        else:
            self._handle = cls._other
        if splice is not None:
            original = splice.original
            self._resumable = self._keep_text and original.resumable
            if self._keep_text and original.text:
                self._add_text(original.text)
            self._open_index = original.open_index
            self._open_text = original.open_is_text
            self._next_index = original.next_index

    # -- public state --------------------------------------------------------

    @property
    def content_held(self) -> bool:
        """The upstream sent content that a translation holds back from the caller for now
        (a Gemini caller's function calls, sent whole at the end): not `content_seen`, as
        nothing reached the caller yet, but the upstream is answering (`proxy.upstream._hold`
        then waits for it per `stream_idle`, not `first_token`)."""
        return self._pre is not None and self._pre.content_held

    @property
    def started(self) -> bool:
        """A content event has been relayed to the caller: always, on a continuation."""
        return self.content_seen or self._splice is not None

    @property
    def text(self) -> str:
        self._catch_up()
        if len(self._text) > 1:
            self._text = ["".join(self._text)]
        return self._text[0] if self._text else ""

    @property
    def resumable(self) -> bool:
        """Whether a prefill can continue what was relayed (see the class docstring)."""
        self._catch_up()
        return self._resumable

    @property
    def finished(self) -> bool:
        """The answer finished: every choice seen has its `finish_reason` (OpenAI), the
        `stop_reason` came (Anthropic), or every candidate seen has its `finishReason` or
        the prompt was blocked (Gemini)."""
        self._catch_up()
        return self._finished and not self._open_choices

    @property
    def cut(self) -> bool:
        """The stream ended inside an event (at `finish()`)."""
        return self._cut

    @property
    def open_index(self) -> int | None:
        """MESSAGES: the index of the content block started and not yet stopped, if any."""
        return self._open_index

    @property
    def open_is_text(self) -> bool:
        """MESSAGES: whether the open block (`open_index`) is a text block."""
        return self._open_index is not None and self._open_text

    @property
    def next_index(self) -> int:
        """MESSAGES: one past the highest content block index the caller has seen."""
        return self._next_index

    def estimate(self, request_bytes: int) -> Usage:
        """Usage for a stream that ended before its usage was reported :
        what was reported is kept; missing input is ~4 request bytes per token, missing output
        ~1 token per data event."""
        return Usage(
            self.usage.input_tokens or max(1, request_bytes // 4),
            max(self.usage.output_tokens, self.events),
        )

    def complete_on_eof(self) -> bytes | None:
        """At a clean upstream EOF: b"" if the stream is complete, the terminator to send if the
        answer finished without it, None if the stream is truncated (a break)."""
        if self.terminated or self.shape is _OTHER:
            return b""
        return self.terminator()

    def terminator(self) -> bytes | None:
        """What completes a stream whose answer has finished (its finish or stop reason was
        relayed) whatever broke after that: the format's terminator, or b"" when it was
        relayed too. None when the answer has not finished: a break."""
        if self.terminated:
            return b""
        if not self.finished:
            return None
        if self.shape is _MESSAGES:
            return _MESSAGE_STOP_EVENT
        if self.shape in (_CHAT, _COMPLETIONS):
            return _DONE_EVENT
        if self.shape is _GEMINI:
            return b""  # a Gemini stream has no terminator
        return None

    # -- relay -----------------------------------------------------------------

    def feed(self, chunk: bytes) -> bytes:
        if self.stopped:
            return b""
        if self._pre is not None:
            chunk = self._pre.feed(chunk)
            if not chunk:
                return b""
        if self._through:
            if self._held:
                chunk = bytes(self._held) + chunk
                self._held.clear()
            return chunk
        if not self._held and chunk[:6] == b"data: ":
            # One whole single-line event, as a live stream sends them: `data: X\n\n`, or
            # `data: X\r\n\r\n` (its first line end is the event's own). `partition` takes no
            # argument parsing, unlike `find`.
            line, _, rest = chunk.partition(b"\n")
            if rest == b"\n":
                data = line[6:]
                return self._feed_one(chunk, data[:-1] if data[-1:] == b"\r" else data)
            if rest == b"\r\n" and line[-1:] == b"\r":
                return self._feed_one(chunk, line[6:-1])
        if not self._held:
            if chunk[-2:] == b"\n\n" and chunk.find(b"\r") < 0:
                if self.content_seen and self._laned:
                    out = self._feed_fast(chunk)
                    if out is not None:
                        return out
                return self._feed_whole(chunk, False)
            if chunk[-4:] == b"\r\n\r\n" and chunk.count(b"\n") == chunk.count(b"\r\n"):
                return self._feed_whole(chunk, True)  # Gemini's line ends
        return self._feed_split(chunk)

    def _feed_one(self, chunk: bytes, data: bytes) -> bytes:
        """A chunk that is one whole single-line `data:` event; `data` its value.

        On a chat stream (the fast lane) an event without an error is validated, metered,
        counted and kept unread for `_catch_up`, as `_feed_fast` does; before the first content
        it is also read for whether it is content (`_Opening`)."""
        if self._laned:
            if data == _DONE:  # nothing to read before it: what the lane kept stays unread
                self.events += 1
                self.terminated = self._through = True
                return chunk
            # None: the careful path below reads it (malformed?)
            if self.content_seen:
                opening = None
                event: _Event | _Opening | None = _lane_event(_read_event, data)
            else:
                event = opening = _lane_event(_read_opening, data)
            if event is not None and event.error is _UNSET:
                self.events += 1
                usage = event.usage
                if type(usage) is dict:  # metered now; its choices are read in turn
                    self.usage = openai_usage(usage)
                    if self._strip and _only_usage(data):
                        return b""  # nothing in it to read later (no content: `choices: []`)
                if opening is not None and _is_content(opening):
                    self.content_seen = True
                self._raw.append(data)
                self._kept += len(data) + _RAW_ENTRY
                if self._kept > _MAX_RAW:
                    self._leave_lane()
                return chunk
        if self._raw:
            self._catch_up()
        result = self._on_data(data)
        if self.stopped:
            return b""
        return chunk if result is _KEEP else result

    def _feed_fast(self, chunk: bytes, start: int = 0) -> bytes | None:
        """A run of whole, single-line `data:` events of a chat stream (`chunk` from `start`
        on), validated with one parse each (`_read_event`; before the first content
        `_read_opening`, which also tells content; UTF-8 and line ends checked once for the
        whole run) and relayed as is (less the usage chunks
        the sidecar asked for); what they mean for `text`, `resumable` and `finished`
        is read later, only if asked (`_catch_up`). The very `chunk` when that part of it is
        relayed unchanged; None: take the event-by-event path (an in-band error, a comment or
        another field, a malformed event), nothing read yet."""
        first = start + 6  # the first event's data
        if chunk[start:first] != b"data: ":
            return None
        end = len(chunk) - 2  # the last event's data ends there (`\n\n`)
        done = chunk.endswith(_DONE, first, end)
        if done:
            if end - first == len(_DONE):
                end = first  # `data: [DONE]` alone
            elif chunk.endswith(_DONE_TAIL, first, end) and end - len(_DONE_TAIL) > first:
                end -= len(_DONE_TAIL)
            else:
                return None  # (an empty data event before it: the careful path's to judge)
        elif end <= first:
            return None  # an empty data event: malformed, the careful path says
        count = 0
        cuts: list[int] | None = None
        if end > first:
            body = chunk[first:end]
            pieces = body.split(b"\n\ndata: ")
            if b"".join(pieces).find(b"\n") >= 0:  # (memchr: `count` loops byte by byte)
                return None  # comments, other fields, multi-line data
            if not (body.isascii() or _utf8(body)):  # (separators are ASCII: once for all)
                return None
            opened = self.content_seen
            try:
                if opened:
                    events: list[Any] = list(map(_read_event, pieces))  # each one JSON object
                else:
                    events, opened = _read_openings(pieces)
            except _NOT_AN_EVENT:
                return None
            cuts = self._fast_usage(events, pieces)
            if cuts is None:
                return None
            self.content_seen = opened
            count = len(events)
            self._raw += pieces
            self._kept += len(body) + _RAW_ENTRY * count
            if self._kept > _MAX_RAW:
                self._leave_lane()
        self.events += count + done
        if done:
            self.terminated = self._through = True
        if not cuts:
            return chunk
        for i in reversed(cuts):  # (ascending)
            del pieces[i]
        out = b"data: " + b"\n\ndata: ".join(pieces) + b"\n\n" if pieces else b""
        return out + _DONE_EVENT if done else out

    def _fast_usage(self, events: list[Any], pieces: list[bytes]) -> list[int] | None:
        """Meter the usage in a fast-lane chunk: the indexes of the usage-only chunks to cut
        (usually none), or None if an event is an in-band error. Each question is asked of
        all events at once, in C."""
        n = len(events)
        if list(map(_ERROR_OF, events)).count(_UNSET) != n:
            return None
        usages = list(map(_USAGE_OF, events))
        cuts: list[int] = []
        if usages.count(None) == n:
            return cuts
        for i, usage in enumerate(usages):
            if type(usage) is dict:
                self.usage = openai_usage(usage)
                if self._strip and _only_usage(pieces[i]):
                    cuts.append(i)
        return cuts

    def _leave_lane(self) -> None:
        """A long stream: what the lane kept has passed `_MAX_RAW`. What it still holds is
        read now, and the rest of the stream goes the careful way, each event parsed once:
        kept by the lane and read again later, it would be parsed twice (about 30k
        instructions an event against 25k)."""
        self._catch_up()
        self._laned = False

    def _catch_up(self) -> None:
        """Read the events the fast lane relayed unread, in order, for their text and finish."""
        if not self._raw:
            return
        raw, self._raw = self._raw, []
        usage = self.usage  # metered in order when relayed: reading again must not rewind it
        for data in raw:
            obj = loads_or_none(data)  # validated when it was relayed (`_lane_event`)
            if type(obj) is dict:
                self._chat(obj)
            else:  # (cannot happen: whatever the lane relays is a JSON object)
                self._resumable = False
        self.usage = usage

    def finish(self) -> bytes:
        """At upstream EOF: the bytes still to forward (what the translator owed), after which
        an incomplete trailing event is dropped (`cut`)."""
        out = b""
        pre = self._pre
        if pre is not None:
            self._pre = None  # what it owes is already in the caller's format
            tail = pre.finish()
            if tail:
                out = self.feed(tail)
        if self._held.strip():
            self._cut = True
        self._held.clear()
        self._scan = 0
        return out

    def _feed_whole(self, chunk: bytes, crlf: bool) -> bytes:
        """A run of whole events, returned as is unless changed: `\\n\\n`-terminated without
        any `\\r`, or (`crlf`) `\\r\\n\\r\\n`-terminated with every line ended by `\\r\\n`.
        Events are found one at a time. On a chat stream before its content, the fast lane
        is tried on the whole chunk first; if it cannot take it, the events are read one at a
        time and the lane takes the rest from the first content event on. From an empty line
        on (an event without a line), the rest goes the careful way."""
        lane = self._laned and not self.content_seen and not crlf
        tried = False  # the lane, on the chunk from its start
        out: list[bytes] | None = None
        kept = 0  # start of the part of `chunk` not yet copied to `out`
        sep = b"\r\n\r\n" if crlf else b"\n\n"
        step = len(sep)
        size = len(chunk)
        pos = 0
        while pos < size:
            if self._through:
                break
            start = pos
            if lane and (self.content_seen or not tried):
                tried = True
                rest = self._feed_fast(chunk, start)
                if rest is chunk:  # the rest as it came
                    return chunk if out is None else b"".join(out) + chunk[kept:]
                if rest is not None:
                    head = chunk[:start] if out is None else b"".join(out) + chunk[kept:start]
                    return head + rest
                if self.content_seen:
                    return self._careful_rest(chunk, start, out, kept)
            if chunk[start] in _LINE_ENDS:
                return self._careful_rest(chunk, start, out, kept)
            end = chunk.find(sep, start)
            pos = end + step
            if self._raw:
                self._catch_up()  # in order: what the fast lane relayed comes first
            # A CRLF event keeps its last line's end: a CR before it is then the data's own.
            data = _event_data(chunk[start : end + 2] if crlf else chunk[start:end])
            result = _KEEP if data is None else self._on_data(data)
            if result is _KEEP and not self.stopped:
                continue
            if out is None:
                out = []
            out.append(chunk[kept:start])
            kept = pos
            if self.stopped:
                return b"".join(out)
            if result:
                out.append(result)
        if out is None:
            return chunk
        out.append(chunk[kept:])
        return b"".join(out)

    def _careful_rest(self, chunk: bytes, start: int, out: list[bytes] | None, kept: int) -> bytes:
        """What `_feed_whole` returns when the careful way takes `chunk[start:]`: the part
        already read (`out`, then `chunk[kept:start]`) and what the rest gives."""
        rest = self._feed_split(chunk[start:])
        if out is None:
            return chunk[:start] + rest
        return b"".join(out) + chunk[kept:start] + rest

    def _feed_split(self, chunk: bytes) -> bytes:
        """The general case: events found line by line in what is held."""
        if self._raw:
            self._catch_up()
        held = self._held
        held += chunk
        out: list[bytes] = []
        start = 0  # start of the current event in `held`
        pos = self._scan  # start of the first line not yet scanned
        while not self._through:
            nl = held.find(b"\n", pos)
            if nl < 0:
                break
            line_start, pos = pos, nl + 1
            if nl == line_start or (nl == line_start + 1 and held[line_start] == 0x0D):
                event = bytes(held[start:pos])
                start = pos
                data = _event_data(event)
                result = _KEEP if data is None else self._on_data(data)
                if self.stopped:
                    held.clear()
                    return b"".join(out)
                out.append(event if result is _KEEP else result)
        if self._through:
            out.append(bytes(held[start:]))
            held.clear()
            self._scan = 0
            return b"".join(out)
        del held[:start]
        self._scan = pos - start
        if len(held) > self._max_event:
            self.malformed = self.stopped = True
            held.clear()
        return b"".join(out)

    # -- one event ---------------------------------------------------------------

    def _on_data(self, data: bytes) -> bytes | None:
        """Read one complete event's (joined) data; None to forward the event as is, b"" to
        drop it, else its replacement. Sets `stopped` for an error or malformed event (then
        the result is ignored)."""
        self.events += 1
        if self.shape is _OTHER:
            return self._other()
        if data == _DONE:
            if self.shape in (_CHAT, _COMPLETIONS):
                self.terminated = self._through = True
            return _KEEP
        if data.find(b"\r") >= 0:  # a line end to a caller's SSE parser: it would get a cut value
            self.malformed = self.stopped = True
            return _DROP
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            self.malformed = self.stopped = True
            return _DROP
        if not isinstance(obj, dict):
            return _KEEP
        return self._handle(self, obj)

    def _stop(self, error: InbandError) -> bytes:
        self.error = error
        self.stopped = True
        return _DROP

    def _add_text(self, piece: str) -> None:
        self._text.append(piece)
        self._text_len += len(piece)
        if self._text_len > _MAX_TEXT:
            self._resumable = False
            self._keep_text = False
            self._text.clear()
            self._text_len = 0

    def _other(self, obj: object = None) -> bytes | None:
        self.content_seen = self._through = True
        return _KEEP

    def _meter_openai(self, obj: dict[str, Any]) -> bool:
        """Meter an OpenAI event; True if it is the usage-only chunk to strip."""
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self.usage = openai_usage(usage)
            return self._strip and obj.get("choices") == []
        return False

    def _chat(self, obj: dict[str, Any]) -> bytes | None:
        if "error" in obj and isinstance(obj["error"], dict):
            return self._stop(_openai_error(obj["error"]))
        usage = obj.get("usage")
        if usage is not None and self._meter_openai(obj):
            return _DROP
        choices = obj.get("choices")
        if type(choices) is not list:
            return _KEEP
        content = False
        first: dict[str, Any] | None = None
        text: object = None  # choice 0's delta.content
        other = False  # choice 0's delta has content that is not text
        for choice in choices:
            if type(choice) is not dict:
                continue
            delta = choice.get("delta")
            piece: object = None
            not_text = False
            if type(delta) is dict:
                piece = delta.get("content")
                # Anything but a bare text delta: look for the other kinds of content.
                if len(delta) > 1 or not piece:
                    not_text = bool(
                        delta.get("tool_calls")
                        or delta.get("function_call")
                        or delta.get("refusal")
                        or delta.get("reasoning_content")
                    )
            index = _key(choice.get("index", 0))
            if choice.get("finish_reason") is not None:
                content = True
                self._choice_finished(index)
            else:
                if piece or not_text:
                    content = True
                if index not in self._done_choices:
                    self._open_choices.add(index)
            if index == 0:
                first, text, other = choice, piece, not_text
            else:
                self._resumable = False
        result: bytes | None = _KEEP
        if self._splice is not None:
            result = self._splice.chat(obj, first, content)
            if first is not None and type(first.get("delta")) is dict:
                text = first["delta"].get("content")  # the splice may have cut it
        if content:
            self.content_seen = True
        if first is not None:
            if other:
                self._resumable = False
            elif text and self._keep_text and self._resumable and type(text) is str:
                self._add_text(text)
        return result

    def _completions(self, obj: dict[str, Any]) -> bytes | None:
        error = obj.get("error")
        if isinstance(error, dict):
            return self._stop(_openai_error(error))
        if self._meter_openai(obj):
            return _DROP
        choices = obj.get("choices")
        if not isinstance(choices, list):
            return _KEEP
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            index = _key(choice.get("index", 0))
            if choice.get("finish_reason") is not None:
                self.content_seen = True
                self._choice_finished(index)
            else:
                if choice.get("text"):
                    self.content_seen = True
                self._choice_open(index)
        return _KEEP

    def _choice_finished(self, index: object) -> None:
        self._finished = True
        self._done_choices.add(index)
        self._open_choices.discard(index)

    def _choice_open(self, index: object) -> None:
        if index not in self._done_choices:
            self._open_choices.add(index)

    def _responses(self, obj: dict[str, Any]) -> bytes | None:
        kind = _key(obj.get("type"))
        error = obj.get("error")
        if kind in ("error", "response.failed"):
            return self._stop(_responses_error(obj))
        if isinstance(error, dict) and kind is None:
            return self._stop(_openai_error(error))
        if kind in _RESPONSES_END:
            self.terminated = self._finished = self._through = True
            self.content_seen = True
        elif kind not in _RESPONSES_PREAMBLE:
            self.content_seen = True
        response = obj.get("response")
        if isinstance(response, dict):
            usage = response.get("usage")
            if isinstance(usage, dict):
                self.usage = openai_usage(usage)
        return _KEEP

    def _messages(self, obj: dict[str, Any]) -> bytes | None:
        kind = _key(obj.get("type"))
        if kind == "error":
            return self._stop(_anthropic_error(obj))
        result: bytes | None = _KEEP
        if self._splice is not None:
            result = self._splice.messages(obj)
        if kind == "content_block_delta":
            self.content_seen = True
            delta = obj.get("delta")
            if isinstance(delta, dict) and self._resumable:
                if delta.get("type") == "text_delta":
                    text = delta.get("text")
                    if isinstance(text, str) and text:
                        self._add_text(text)
                else:
                    self._resumable = False
        elif kind == "content_block_start":
            block = obj.get("content_block")
            block_type = block.get("type") if isinstance(block, dict) else None
            index = obj.get("index")
            if type(index) is int:
                self._open_index = index
                self._open_text = block_type == "text"
                self._next_index = max(self._next_index, index + 1)
            if block_type == "text" and isinstance(block, dict):
                text = block.get("text")
                if isinstance(text, str) and text:
                    self.content_seen = True
                    if self._resumable:
                        self._add_text(text)
            else:
                self.content_seen = True
                self._resumable = False
        elif kind == "content_block_stop":
            self.content_seen = True
            if obj.get("index") == self._open_index:
                self._open_index = None
        elif kind == "message_start":
            message = obj.get("message")
            self._anthropic_usage(message.get("usage") if isinstance(message, dict) else None)
        elif kind == "message_delta":
            self.content_seen = True
            delta = obj.get("delta")
            if isinstance(delta, dict) and delta.get("stop_reason") is not None:
                self._finished = True
            self._anthropic_usage(obj.get("usage"))
        elif kind == "message_stop":
            self.content_seen = self.terminated = self._through = True
        elif kind != "ping":
            self.content_seen = True
        return result

    def _gemini(self, obj: dict[str, Any]) -> bytes | None:
        error = obj.get("error")
        if type(error) is dict:
            return self._stop(_gemini_error(error))
        usage = obj.get("usageMetadata")
        if type(usage) is dict:
            self.usage = gemini_usage(usage)
        candidates = obj.get("candidates")
        if type(candidates) is list:
            for candidate in candidates:
                if type(candidate) is dict:
                    self._gemini_candidate(candidate)
        else:
            feedback = obj.get("promptFeedback")
            if type(feedback) is dict and feedback.get("blockReason"):
                self._finished = True  # the prompt was blocked: a complete (empty) answer
        return _KEEP

    def _gemini_candidate(self, candidate: dict[str, Any]) -> None:
        index = _key(candidate.get("index", 0))
        content = candidate.get("content")
        parts = content.get("parts") if type(content) is dict else None
        if type(parts) is list and not self.content_seen:
            for part in parts:
                if type(part) is dict and (
                    part.get("text") or any(key in part for key in _GEMINI_CONTENT)
                ):
                    self.content_seen = True
                    break
        if candidate.get("finishReason"):
            self._choice_finished(index)
        else:
            self._choice_open(index)

    def _anthropic_usage(self, usage: object) -> None:
        """Each counter is cumulative: the latest value of each one wins."""
        if not isinstance(usage, dict):
            return
        if usage.get("input_tokens") is not None:
            self._input = token_count(usage["input_tokens"])
        if usage.get("cache_creation_input_tokens") is not None:
            self._cache_create = token_count(usage["cache_creation_input_tokens"])
        if usage.get("cache_read_input_tokens") is not None:
            self._cache_read = token_count(usage["cache_read_input_tokens"])
        output = self.usage.output_tokens
        if usage.get("output_tokens") is not None:
            output = token_count(usage["output_tokens"])
        self.usage = Usage(self._input + self._cache_create + self._cache_read, output)
