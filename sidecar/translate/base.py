"""What every format's translator shares (docs/reference.md#translation).

Translation goes through one pivot: the OpenAI chat-completions shape. A
format module (`anthropic`, `gemini`, `openai`) converts its own requests,
answers, stream events and errors to and from that pivot, so each pair of
formats is two conversions and a new format is one module. Pure code: no I/O,
no aiohttp, no clock.

The pivot carries the OpenAI chat request fields plus `top_k` (Anthropic and
Gemini both have it; OpenAI does not). A field one side cannot carry raises
`Unsupported` naming it; the proxy answers `400 translation_unsupported`.
"""

from __future__ import annotations

from typing import Any, Final, Protocol

#: The pivot request, answer or stream chunk: an OpenAI chat-completions JSON object.
Pivot = dict[str, Any]

#: An SSE event in a format's own framing: (`event:` name or None, JSON data).
Event = tuple[str | None, dict[str, Any]]


#: The pivot error's `type` by HTTP status; Anthropic's types are these plus two of its own.
PIVOT_ERROR_TYPES: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


def pivot_error_type(status: int) -> str:
    """The pivot error's `type` for an HTTP status."""
    return PIVOT_ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


class Unsupported(ValueError):
    """A field of a request that cannot be carried to the other format, named for the caller."""

    def __init__(self, field: str, why: str = "") -> None:
        self.field = field
        self.why = why
        super().__init__(f"{field}: {why}" if why else field)


class StreamToPivot(Protocol):
    """An upstream stream in a native format, event by event, as pivot chunks.

    A pivot chunk is an OpenAI `chat.completion.chunk` object; a final usage chunk has
    `choices: []` and `usage`. `None` stands for the end of the answer (OpenAI's
    `data: [DONE]`). An in-band error is a pivot error: `{"error": {"message", "type",
    "code"}, "status": <the HTTP status it stands for>}`.
    """

    def event(self, name: str | None, data: dict[str, Any]) -> list[Pivot | None]: ...


class StreamFromPivot(Protocol):
    """Pivot chunks (see `StreamToPivot`) as a caller's native events, in order."""

    def chunk(self, chunk: Pivot | None) -> list[Event]: ...
