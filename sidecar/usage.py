"""Token usage read from provider responses, on the streaming hot path.

Pure code: no I/O, no clock. `usage_from_body` reads a complete (non-stream)
JSON response body, `usage_from_tail` the end of one too large to hold; SSE
streams are metered event by event by `sidecar.streams.StreamTracker`, with
`openai_usage` and `token_count` from here. When the sidecar itself added
`stream_options.include_usage` to an OpenAI request (`ensure_stream_usage`
returned True), the caller never asked for the final usage chunk, so the
tracker removes that one event from what is forwarded.

Where the numbers come from:

| response | input | output |
|---|---|---|
| OpenAI chat/completions, embeddings | `usage.prompt_tokens` | `usage.completion_tokens` (0 for embeddings) |
| OpenAI Responses API | `usage.input_tokens` (stream: `response.*` event's `response.usage`) | `usage.output_tokens` |
| Anthropic messages | `usage.input_tokens` + `cache_creation_input_tokens` + `cache_read_input_tokens` (stream: `message_start`) | `usage.output_tokens` (stream: latest `message_delta`, cumulative) |
| Gemini generateContent (also `embedContent` when it reports usage) | `usageMetadata.promptTokenCount` (cached tokens included) + `toolUsePromptTokenCount` | `usageMetadata.candidatesTokenCount` + `thoughtsTokenCount` (stream: latest chunk's `usageMetadata`, cumulative) |

Nothing here raises on malformed input: a body or event that cannot be
read simply yields no usage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Literal

import msgspec
import orjson

Format = Literal["openai", "anthropic", "gemini"]

_USAGE: Final = b'"usage"'
_USAGE_METADATA: Final = b'"usageMetadata"'


@dataclass(slots=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0


#: More tokens than this in one answer is garbage (and would overflow what is billed).
MAX_TOKENS: Final = 10**12


def token_count(value: object) -> int:
    # bool is an int subclass; a `true` token count is garbage, not 1. So is a number beyond
    # any answer (orjson reads an integer wider than 64 bits as a float, msgspec as an int:
    # both count 0).
    if type(value) is int and 0 < value <= MAX_TOKENS:
        return value
    return 0


def loads_or_none(data: bytes | bytearray | memoryview) -> Any:
    """`data` parsed by orjson; None if it is not JSON."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


class _Usage(msgspec.Struct):
    usage: Any = None


class _UsageMetadata(msgspec.Struct):
    usageMetadata: Any = None  # (the field's JSON name)


_read_usage: Final = msgspec.json.Decoder(_Usage).decode
_read_usage_metadata: Final = msgspec.json.Decoder(_UsageMetadata).decode


def _top_level(body: bytes, gemini: bool) -> Any:
    """The body's top-level `usage` (`usageMetadata`), or None. msgspec builds nothing else of
    the body (an answer's text, choices, ids); a body it does not read (not an object, nested
    deeper than it goes, a key it cannot decode) is parsed whole by orjson."""
    try:
        if gemini:
            return _read_usage_metadata(body).usageMetadata
        return _read_usage(body).usage
    except (ValueError, RecursionError):
        obj = loads_or_none(body)
        return obj.get("usageMetadata" if gemini else "usage") if isinstance(obj, dict) else None


def openai_usage(usage: dict[str, Any]) -> Usage:
    if "prompt_tokens" in usage:
        return Usage(
            token_count(usage.get("prompt_tokens")), token_count(usage.get("completion_tokens"))
        )
    return Usage(token_count(usage.get("input_tokens")), token_count(usage.get("output_tokens")))


def _anthropic_usage(usage: dict[str, Any]) -> Usage:
    return Usage(
        token_count(usage.get("input_tokens"))
        + token_count(usage.get("cache_creation_input_tokens"))
        + token_count(usage.get("cache_read_input_tokens")),
        token_count(usage.get("output_tokens")),
    )


def gemini_usage(usage: dict[str, Any]) -> Usage:
    """A Gemini `usageMetadata`: thinking tokens are billed as output, tool-use prompt
    tokens (grounding, code execution) as input."""
    return Usage(
        token_count(usage.get("promptTokenCount"))
        + token_count(usage.get("toolUsePromptTokenCount")),
        token_count(usage.get("candidatesTokenCount"))
        + token_count(usage.get("thoughtsTokenCount")),
    )


def usage_from_body(fmt: str, body: bytes) -> Usage | None:
    """Usage of a complete JSON response body, or None if it carries none.

    `fmt` is the response format (`openai`, `anthropic` or `gemini`); any other
    value yields None. Anthropic `count_tokens` and Gemini `countTokens` answers
    have no usage and yield None.
    """
    if fmt == "gemini":
        return _gemini_from_body(body)
    if body.find(_USAGE) < 0:  # (`find`: `in` first tries `_USAGE` as an int, and raises)
        return None
    usage = _top_level(body, gemini=False)
    if not isinstance(usage, dict):
        return None
    if fmt == "openai":
        return openai_usage(usage)
    if fmt == "anthropic":
        return _anthropic_usage(usage)
    return None


def _gemini_from_body(body: bytes) -> Usage | None:
    if body.find(_USAGE_METADATA) < 0:
        return None
    usage = _top_level(body, gemini=True)
    return gemini_usage(usage) if isinstance(usage, dict) else None


def usage_from_tail(fmt: str, tail: bytes) -> Usage | None:
    """Usage from the last bytes of a JSON body too large to hold whole.

    Providers put `usage` at the end of an answer (embeddings of a big batch run
    to tens of MB); the relay keeps only the tail, and this reads the last
    `"usage": {...}` object in it (Gemini: `"usageMetadata": {...}`). None when it is
    not there.
    """
    key = _USAGE_METADATA if fmt == "gemini" else _USAGE
    at = tail.rfind(key)
    if at < 0:
        return None
    start = tail.find(b"{", at)
    if start < 0 or tail[at + len(key) : start].strip(b" \t\r\n:"):
        return None
    depth = 0
    for i in range(start, len(tail)):
        c = tail[i]
        if c == 0x7B:  # {
            depth += 1
        elif c == 0x7D:  # }
            depth -= 1
            if depth == 0:
                return usage_from_body(fmt, b"{" + key + b":" + tail[start : i + 1] + b"}")
    return None


def request_wants_stream_usage(body: dict[str, Any]) -> bool:
    """Whether an OpenAI request asked for the final usage chunk itself."""
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def ensure_stream_usage(body: dict[str, Any]) -> bool:
    """Make an OpenAI chat/completions stream request report usage.

    Sets `stream_options.include_usage = true` when the caller did not.
    Returns True if it had to, meaning the caller must not see the extra usage
    chunk (track with `StreamTracker(..., strip_usage=True)`). Returns
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
