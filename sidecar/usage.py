"""Token usage read from provider responses, on the streaming hot path.

Pure code: no I/O, no clock. Two entry points:

* `usage_from_body` for a complete (non-stream) JSON response body;
* `StreamMeter` for an SSE stream relayed chunk by chunk. It only *reads*
  the stream, except in one case: when the sidecar itself added
  `stream_options.include_usage` to an OpenAI request (`ensure_stream_usage`
  returned True), the caller never asked for the final usage chunk, so the
  meter removes that one event from what is forwarded.

Where the numbers come from:

| response | input | output |
|---|---|---|
| OpenAI chat/completions, embeddings | `usage.prompt_tokens` | `usage.completion_tokens` (0 for embeddings) |
| OpenAI Responses API | `usage.input_tokens` (stream: `response.*` event's `response.usage`) | `usage.output_tokens` |
| Anthropic messages | `usage.input_tokens` + `cache_creation_input_tokens` + `cache_read_input_tokens` (stream: `message_start`) | `usage.output_tokens` (stream: latest `message_delta`, cumulative) |

Nothing here raises on malformed input: a body or event that cannot be
read simply yields no usage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Literal

import orjson

Format = Literal["openai", "anthropic"]

_USAGE: Final = b'"usage"'
# With include_usage, OpenAI sends `"usage":null` in every chunk but the last;
# counting these lets the hot path skip parsing those chunks.
_NULL_USAGE: Final = (b'"usage":null', b'"usage": null')
# A partial line held only for scanning is dropped past this size (metering
# of that one line is lost; the stream itself is never affected).
_MAX_SCAN_LINE: Final = 16 * 1024 * 1024
# In strip mode an event held back longer than this cannot be the small usage
# event: it is forwarded as it arrives instead of being buffered.
_MAX_HELD_EVENT: Final = 1024 * 1024


@dataclass(slots=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0


def _count(value: object) -> int:
    # bool is an int subclass; a `true` token count is garbage, not 1.
    if type(value) is int and value > 0:
        return value
    return 0


def _may_have_usage(data: bytes | bytearray, start: int = 0, end: int | None = None) -> bool:
    """Cheap pre-check: a `"usage"` key that is not `null` occurs in data[start:end]."""
    if end is None:
        end = len(data)
    found = data.count(_USAGE, start, end)
    if not found:
        return False
    nulls = sum(data.count(n, start, end) for n in _NULL_USAGE)
    return found > nulls


def _loads(data: bytes | bytearray | memoryview) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


def _openai_usage(usage: dict[str, Any]) -> Usage:
    if "prompt_tokens" in usage:
        return Usage(_count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens")))
    return Usage(_count(usage.get("input_tokens")), _count(usage.get("output_tokens")))


def _anthropic_usage(usage: dict[str, Any]) -> Usage:
    return Usage(
        _count(usage.get("input_tokens"))
        + _count(usage.get("cache_creation_input_tokens"))
        + _count(usage.get("cache_read_input_tokens")),
        _count(usage.get("output_tokens")),
    )


def usage_from_body(fmt: str, body: bytes) -> Usage | None:
    """Usage of a complete JSON response body, or None if it carries none.

    `fmt` is the response format (`openai` or `anthropic`); any other value
    yields None. Anthropic `count_tokens` answers have no `usage` and yield None.
    """
    if _USAGE not in body:
        return None
    obj = _loads(body)
    if not isinstance(obj, dict):
        return None
    usage = obj.get("usage")
    if not isinstance(usage, dict):
        return None
    if fmt == "openai":
        return _openai_usage(usage)
    if fmt == "anthropic":
        return _anthropic_usage(usage)
    return None


def usage_from_tail(fmt: str, tail: bytes) -> Usage | None:
    """Usage from the last bytes of a JSON body too large to hold whole.

    Providers put `usage` at the end of an answer (embeddings of a big batch run
    to tens of MB); the relay keeps only the tail, and this reads the last
    `"usage": {...}` object in it. None when it is not there.
    """
    at = tail.rfind(_USAGE)
    if at < 0:
        return None
    start = tail.find(b"{", at)
    if start < 0 or tail[at + len(_USAGE) : start].strip(b" \t\r\n:"):
        return None
    depth = 0
    for i in range(start, len(tail)):
        c = tail[i]
        if c == 0x7B:  # {
            depth += 1
        elif c == 0x7D:  # }
            depth -= 1
            if depth == 0:
                return usage_from_body(fmt, b'{"usage":' + tail[start : i + 1] + b"}")
    return None


def request_wants_stream_usage(body: dict[str, Any]) -> bool:
    """Whether an OpenAI request asked for the final usage chunk itself."""
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def ensure_stream_usage(body: dict[str, Any]) -> bool:
    """Make an OpenAI chat/completions stream request report usage.

    Sets `stream_options.include_usage = true` when the caller did not.
    Returns True if it had to, meaning the caller must not see the extra usage
    chunk (meter with `StreamMeter(..., strip_usage_chunk=True)`). Returns
    False for non-stream requests, for requests that already ask for usage,
    and when `stream_options` is not an object (left for upstream to reject).
    Only for `/chat/completions` and `/completions`: the Responses API always
    reports usage and rejects `stream_options`.
    """
    if body.get("stream") is not True:
        return False
    options = body.get("stream_options")
    if options is None:
        body["stream_options"] = {"include_usage": True}
        return True
    if not isinstance(options, dict) or options.get("include_usage") is True:
        return False
    options["include_usage"] = True
    return True


def _event_data(event: bytes | bytearray) -> bytes:
    """The joined `data:` field values of one SSE event."""
    parts = []
    for raw in event.split(b"\n"):
        line = raw[:-1] if raw.endswith(b"\r") else raw
        if line.startswith(b"data:"):
            value = line[5:]
            parts.append(value[1:] if value.startswith(b" ") else value)
    return b"\n".join(parts)


class StreamMeter:
    """Reads token usage out of an SSE stream as it is relayed.

    `feed(chunk)` takes each chunk as it arrives from upstream (split anywhere,
    `\\n` or `\\r\\n` line ends) and returns what to send to the caller now;
    `finish()` returns what is left at the end of the stream. `usage` holds the
    tokens seen so far.

    With `strip_usage_chunk=False` the stream is never altered or delayed:
    `feed` returns the very chunk it was given and `finish` returns `b""`.
    With `strip_usage_chunk=True` (OpenAI only) complete events are forwarded
    at once, except the usage event (`"choices": []` and a non-null `usage`),
    which is dropped with its blank-line terminator; an incomplete trailing
    event is held back until it completes.
    """

    __slots__ = (
        "_anthropic",
        "_cache_create",
        "_cache_read",
        "_carry",
        "_carry_len",
        "_held",
        "_input",
        "_midline",
        "_overflow",
        "_passthrough",
        "_scan",
        "_strip",
        "events",
        "usage",
    )

    def __init__(self, fmt: str, *, strip_usage_chunk: bool) -> None:
        self._anthropic = fmt == "anthropic"
        self._strip = strip_usage_chunk and not self._anthropic
        self.usage = Usage()
        #: SSE `data:` lines seen; the basis of `estimate()` when a stream ends without usage.
        self.events = 0
        # Anthropic input is the sum of three counters, each updated on its own.
        self._input = 0
        self._cache_create = 0
        self._cache_read = 0
        # Scan mode: pieces of the trailing partial line.
        self._carry: list[bytes] = []
        self._carry_len = 0
        self._overflow = False
        # Strip mode: bytes not yet forwarded, where the line scan resumes,
        # and the state of an oversized event being forwarded as it arrives.
        self._held = bytearray()
        self._scan = 0
        self._passthrough = False
        self._midline = False

    def feed(self, chunk: bytes) -> bytes:
        self.events += chunk.count(b"data:")
        if self._strip:
            return self._feed_strip(chunk)
        self._feed_scan(chunk)
        return chunk

    def estimate(self, request_bytes: int) -> Usage:
        """Usage for a stream that ended before its usage was reported (cut off, or the
        caller left). What was reported is kept; what is missing is estimated: about one
        output token per streamed event, four request bytes per input token. Rough, but an
        abandoned stream never goes uncharged."""
        return Usage(
            self.usage.input_tokens or max(1, request_bytes // 4),
            max(self.usage.output_tokens, self.events),
        )

    def finish(self) -> bytes:
        if self._strip:
            rest = bytes(self._held)
            self._held.clear()
            self._scan = 0
            if self._passthrough or not rest:
                return rest
            return b"" if self._meter_event(rest) else rest
        if self._carry and not self._overflow:
            line = b"".join(self._carry)
            if _may_have_usage(line):
                self._scan_lines(line)
        self._carry.clear()
        self._carry_len = 0
        return b""

    # -- scan mode: read-only ------------------------------------------------

    def _feed_scan(self, chunk: bytes) -> None:
        nl = chunk.rfind(b"\n")
        if nl < 0:
            if self._overflow or not chunk:
                return
            self._carry.append(chunk)
            self._carry_len += len(chunk)
            if self._carry_len > _MAX_SCAN_LINE:
                self._carry.clear()
                self._carry_len = 0
                self._overflow = True
            return
        end = nl + 1
        if self._overflow:
            # The first line here is the tail of a line too long to keep.
            start = chunk.find(b"\n") + 1
            self._overflow = False
            if start < end and _may_have_usage(chunk, start, end):
                self._scan_lines(chunk[start:end])
        elif self._carry:
            block = b"".join(self._carry) + chunk[:end]
            if _may_have_usage(block):
                self._scan_lines(block)
        elif _may_have_usage(chunk, 0, end):
            self._scan_lines(chunk[:end])
        self._carry.clear()
        self._carry_len = 0
        if end < len(chunk):
            self._carry.append(chunk[end:])
            self._carry_len = len(chunk) - end

    def _scan_lines(self, block: bytes) -> None:
        for raw in block.split(b"\n"):
            line = raw.strip()
            if line.startswith(b"data:") and _may_have_usage(line):
                self._apply(_loads(line[5:]))

    # -- strip mode: event by event -----------------------------------------

    def _feed_strip(self, chunk: bytes) -> bytes:
        held = self._held
        if not held and not self._passthrough and chunk.endswith(b"\n\n") and b"\r" not in chunk:
            return self._strip_whole(chunk)
        held += chunk
        out = bytearray()
        start = 0  # start of the current event in `held`
        pos = self._scan  # start of the first line not yet scanned
        while True:
            nl = held.find(b"\n", pos)
            if nl < 0:
                break
            line_start, pos = pos, nl + 1
            if self._midline:
                self._midline = False  # the tail of a line begun earlier
                continue
            if nl == line_start or (nl == line_start + 1 and held[line_start] == 0x0D):
                event = held[start:pos]
                if self._passthrough:
                    self._passthrough = False
                    out += event
                elif not self._meter_event(event):
                    out += event
                start = pos
        if not self._passthrough and len(held) - start > _MAX_HELD_EVENT:
            self._passthrough = True
        if self._passthrough:
            # Forward everything but a lone `\r` that may begin the blank line.
            at_line_start = not self._midline
            keep = pos if at_line_start and held[pos:] == b"\r" else len(held)
            out += held[start:keep]
            self._midline = self._midline or keep > pos
            start = keep
            pos = keep
        del held[:start]
        self._scan = pos - start
        return bytes(out)

    def _strip_whole(self, chunk: bytes) -> bytes:
        """A chunk of whole `\\n`-delimited events with nothing held (the common case,
        also when events coalesce under load): find the non-null `"usage"` keys directly
        and cut out only the usage event; everything else goes through untouched."""
        pos = 0
        while (idx := chunk.find(_USAGE, pos)) >= 0:
            pos = idx + len(_USAGE)
            if chunk.startswith(_NULL_USAGE, idx):
                continue
            start = chunk.rfind(b"\n\n", 0, idx)
            start = 0 if start < 0 else start + 2
            end = chunk.find(b"\n\n", idx) + 2
            if self._meter_event(chunk[start:end]):
                return chunk[:start] + chunk[end:]
            pos = end
        return chunk

    def _meter_event(self, event: bytes | bytearray) -> bool:
        """Meter one complete event; True if it is the usage event to drop."""
        if not _may_have_usage(event):
            return False
        obj = _loads(_event_data(event))
        self._apply(obj)
        return (
            isinstance(obj, dict)
            and obj.get("choices") == []
            and isinstance(obj.get("usage"), dict)
        )

    # -- usage from one parsed event ----------------------------------------

    def _apply(self, obj: Any) -> None:
        if not isinstance(obj, dict):
            return
        if self._anthropic:
            self._apply_anthropic(obj)
            return
        usage = obj.get("usage")
        if not isinstance(usage, dict):
            response = obj.get("response")
            usage = response.get("usage") if isinstance(response, dict) else None
        if isinstance(usage, dict):
            self.usage = _openai_usage(usage)

    def _apply_anthropic(self, obj: dict[str, Any]) -> None:
        kind = obj.get("type")
        if kind == "message_start":
            message = obj.get("message")
            usage = message.get("usage") if isinstance(message, dict) else None
        elif kind == "message_delta":
            usage = obj.get("usage")
        else:
            return
        if not isinstance(usage, dict):
            return
        # Counters are cumulative: the latest value of each one wins.
        if usage.get("input_tokens") is not None:
            self._input = _count(usage["input_tokens"])
        if usage.get("cache_creation_input_tokens") is not None:
            self._cache_create = _count(usage["cache_creation_input_tokens"])
        if usage.get("cache_read_input_tokens") is not None:
            self._cache_read = _count(usage["cache_read_input_tokens"])
        output = self.usage.output_tokens
        if usage.get("output_tokens") is not None:
            output = _count(usage["output_tokens"])
        self.usage = Usage(self._input + self._cache_create + self._cache_read, output)
