"""Serving a chat request in one wire format from a provider of another
(docs/reference.md#translation).

`Translation(caller, upstream)` is one attempt's translation: the request body
into the upstream's format, its answer, error or stream back into the caller's.
Every pair goes through the pivot (`sidecar.translate.base`): the caller's module
turns its side into the pivot and back, the upstream's module likewise. Pure code:
no aiohttp; the proxy decides when to translate and where to send it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final, Protocol

import orjson

from sidecar.translate import anthropic, gemini, openai
from sidecar.translate.base import Event, Pivot, StreamFromPivot, StreamToPivot, Unsupported

__all__ = ["FORMATS", "SseTranslator", "Translation", "Unsupported", "translation"]


class _Module(Protocol):
    def request_to_pivot(self, body: dict[str, Any]) -> Pivot: ...
    def request_from_pivot(self, pivot: Pivot, model: str, stream: bool) -> dict[str, Any]: ...
    def response_to_pivot(self, body: dict[str, Any]) -> Pivot: ...
    def response_from_pivot(self, pivot: Pivot, model: str) -> dict[str, Any]: ...
    def error_to_pivot(self, status: int, body: bytes) -> Pivot: ...
    def error_from_pivot(self, pivot: Pivot) -> dict[str, Any]: ...


_MODULES: Final[dict[str, Any]] = {"openai": openai, "anthropic": anthropic, "gemini": gemini}
FORMATS: Final = tuple(_MODULES)
#: An event held longer than this without its end is malformed (as in `sidecar.streams`).
_MAX_EVENT: Final = 16 * 1024 * 1024
#: What a malformed upstream event becomes: a data line no parser accepts, so the caller's
#: stream tracker sees it as malformed and fails over or resumes.
_MALFORMED: Final = b"data: {malformed\n\n"
#: What reading an upstream's event (or the end it makes) can raise when the event is not
#: what its format says: the event is malformed.
_UNREADABLE: Final = (Unsupported, KeyError, TypeError, ValueError, AttributeError, RecursionError)
_DONE: Final = b"data: [DONE]\n\n"


@dataclass(frozen=True, slots=True)
class Translation:
    caller: str
    upstream: str

    @property
    def label(self) -> str:
        """The `x-sidecar-translated` value."""
        return f"{self.caller}->{self.upstream}"

    def request(self, data: dict[str, Any], model: str, stream: bool) -> dict[str, Any]:
        """The caller's request body as the upstream's, for `model`; `Unsupported` names what
        cannot be carried."""
        try:
            pivot = _MODULES[self.caller].request_to_pivot(data)
            pivot.pop("model", None)
        except RecursionError:
            raise Unsupported("request", "nested too deeply") from None
        try:
            return dict(_MODULES[self.upstream].request_from_pivot(pivot, model, stream))
        except RecursionError:
            raise Unsupported("request", "nested too deeply") from None
        except Unsupported as exc:
            if self.caller == "openai":
                raise
            raise Unsupported(caller_field(self.caller, exc.field, pivot, data), exc.why) from None

    def response(self, body: bytes, model: str) -> bytes | None:
        """The upstream's JSON answer in the caller's format; None if it is not an answer."""
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(doc, dict) or not _is_answer(self.upstream, doc):
            return None
        try:
            pivot = _MODULES[self.upstream].response_to_pivot(doc)
            return orjson.dumps(_MODULES[self.caller].response_from_pivot(pivot, model))
        except _UNREADABLE:
            return None  # not an answer this translation can read

    def error(self, status: int, body: bytes) -> bytes:
        """An upstream error body in the caller's error shape (the status is kept by the caller)."""
        try:
            pivot = _MODULES[self.upstream].error_to_pivot(status, body)
            return orjson.dumps(_MODULES[self.caller].error_from_pivot(pivot))
        except (KeyError, TypeError, ValueError, AttributeError, RecursionError):
            fallback = openai.error_to_pivot(status, b"the upstream's error could not be read")
            return orjson.dumps(_MODULES[self.caller].error_from_pivot(fallback))

    def stream(self, model: str) -> SseTranslator:
        to_pivot = _MODULES[self.upstream].ToPivot(model)
        from_pivot = _MODULES[self.caller].FromPivot(model)
        return SseTranslator(to_pivot, from_pivot, self.caller)


#: Where the pivot's top-level fields live in each caller format's own request.
_CALLER_FIELDS: Final[dict[str, dict[str, str]]] = {
    "anthropic": {"stop": "stop_sequences", "user": "metadata.user_id",
                  "parallel_tool_calls": "tool_choice.disable_parallel_tool_use"},
    "gemini": {"stop": "generationConfig.stopSequences", "max_tokens":
               "generationConfig.maxOutputTokens", "temperature": "generationConfig.temperature",
               "top_p": "generationConfig.topP", "top_k": "generationConfig.topK",
               "seed": "generationConfig.seed", "presence_penalty":
               "generationConfig.presencePenalty", "frequency_penalty":
               "generationConfig.frequencyPenalty", "response_format":
               "generationConfig.responseMimeType", "tool_choice": "toolConfig",
               "n": "generationConfig.candidateCount", "messages": "contents"},
}  # fmt: skip
_PATH_PART: Final = re.compile(r"[^.\[\]]+|\[\d+\]")


def caller_field(caller: str, field: str, pivot: dict[str, Any], body: dict[str, Any]) -> str:
    """An upstream-side refusal's field (a path in the pivot), named as the caller's own
    request names it: a top-level field by its place in the caller's format; a field inside
    the conversation by where its value stands in the caller's body; else in OpenAI terms."""
    parts = _PATH_PART.findall(field)
    if not parts:
        return field
    top = _CALLER_FIELDS.get(caller, {})
    if len(parts) == 1 or parts[0] != "messages":
        name = top.get(parts[0])
        return name + field[len(parts[0]) :] if name else field
    value = _at(pivot, parts)
    if isinstance(value, str) and len(value) >= 4:
        found = _path_of(body, value, "")
        if found:
            return found
    return f"{field} (in OpenAI chat terms)"


def _at(doc: Any, parts: list[str]) -> Any:
    for part in parts:
        if part.startswith("["):
            i = int(part[1:-1])
            if not isinstance(doc, list) or i >= len(doc):
                return None
            doc = doc[i]
        elif isinstance(doc, dict):
            doc = doc.get(part)
        else:
            return None
    return doc


def _path_of(doc: Any, value: str, path: str, depth: int = 0) -> str | None:
    """The path of the first string in `doc` that is `value` (or holds it: a data URL)."""
    if depth > 12:
        return None
    if isinstance(doc, str):
        return path if doc == value or (len(value) > 16 and value in doc) else None
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for key, item in items:
        sub = f"{path}.{key}" if isinstance(key, str) else f"{path}[{key}]"
        found = _path_of(item, value, sub.lstrip("."), depth + 1)
        if found:
            return found
    return None


def _is_answer(fmt: str, doc: dict[str, Any]) -> bool:
    """Whether a 2xx JSON body is an answer in `fmt` (not, say, an error sent with a 200)."""
    if doc.get("error") is not None:
        return False
    if fmt == "openai":
        return isinstance(doc.get("choices"), list)
    if fmt == "anthropic":
        return doc.get("type") == "message"
    return isinstance(doc.get("candidates"), list) or isinstance(doc.get("promptFeedback"), dict)


def _gives_finish(chunk: Pivot) -> bool:
    choices = chunk.get("choices")
    return isinstance(choices, list) and any(
        isinstance(c, dict) and c.get("finish_reason") for c in choices
    )


def _gives_content(chunk: Pivot) -> bool:
    """Whether a pivot chunk carries content: text, a refusal or a tool call."""
    choices = chunk.get("choices")
    if not isinstance(choices, list):
        return False
    for choice in choices:
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if not isinstance(delta, dict):
            continue
        calls = delta.get("tool_calls")
        if (
            delta.get("content")
            or delta.get("refusal")
            or (isinstance(calls, list) and any(isinstance(c, dict) for c in calls))
        ):
            return True
    return False


def translation(caller: str, upstream: str) -> Translation | None:
    """The translation an attempt needs, or None when both speak the same format."""
    return None if caller == upstream else Translation(caller, upstream)


class SseTranslator:
    """An upstream SSE stream rewritten event by event into the caller's format.

    `feed` takes upstream bytes split anywhere (`\\n` or `\\r\\n` line ends) and returns the
    caller's events for every upstream event completed by them; `finish` at EOF drops an
    incomplete event (the caller's tracker sees a stream that ended early). The caller's
    `StreamTracker` reads what comes out, so the failover rules apply to it unchanged.
    """

    __slots__ = ("_ended", "_finished", "_from", "_held", "_named", "_scan", "_stopped", "_to",
                 "content_held")  # fmt: skip

    def __init__(self, to_pivot: StreamToPivot, from_pivot: StreamFromPivot, caller: str) -> None:
        self._to = to_pivot
        self._from = from_pivot
        self._named = caller == "anthropic"
        self._held = bytearray()
        self._scan = 0  # where in `_held` the search for the next event's end resumes
        self._stopped = False
        self._finished = False  # the upstream's answer gave its finish reason
        self._ended = False  # the caller's end of the answer was written
        #: The upstream sent content that the caller's format holds back for now: a Gemini
        #: caller gets function calls whole, in the last chunk. (Its first-token hold then
        #: waits per gap: `proxy.upstream._hold`.)
        self.content_held = False

    def feed(self, chunk: bytes) -> bytes:
        if self._stopped:
            return b""
        held = self._held
        if chunk.find(b"\r") >= 0 or held.endswith(b"\r"):  # (`find`: `in` raises and drops)
            # One line-end style. Only the new bytes are rewritten; a `\r` last may be the
            # first half of a `\r\n`, so it waits for the next chunk.
            if held.endswith(b"\r"):
                del held[-1]
                chunk = b"\r" + chunk
            cr = chunk.endswith(b"\r")
            held += (chunk[:-1] if cr else chunk).replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            if cr:
                held += b"\r"
        else:
            held += chunk
        out = bytearray()
        start = 0
        # Each byte is searched about once: a held event's end can only be in the new bytes,
        # or straddle the old end (whose last byte may have been a `\r` that was moved).
        scan = max(0, min(self._scan, len(held)) - 2)
        while (end := held.find(b"\n\n", scan)) >= 0:
            out += self._event(bytes(held[start:end]))
            start = scan = end + 2
            if self._stopped:
                break
        del held[:start]
        self._scan = len(held)
        if not self._stopped and len(held) > _MAX_EVENT:
            self._stopped = True
            out += _MALFORMED
        return bytes(out)

    def finish(self) -> bytes:
        """At the upstream's EOF: an incomplete event is dropped; an answer that had given its
        finish reason but lost its terminator (OpenAI's `[DONE]`) is ended for the caller."""
        self._held.clear()
        if self._finished and not self._ended and not self._stopped:
            return self._end()
        return b""

    def _event(self, raw: bytes) -> bytes:
        name: str | None = None
        datas: list[bytes] = []
        for line in raw.split(b"\n"):
            if line.startswith(b"data:"):
                value = line[5:]
                datas.append(value[1:] if value.startswith(b" ") else value)
            elif line.startswith(b"event:"):
                name = line[6:].strip().decode("utf-8", "replace")
        if not datas:
            return b""  # a comment or a keep-alive
        data = b"\n".join(datas)
        if data.strip() == b"[DONE]":
            return self._end()
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            obj = None
        if not isinstance(obj, dict):
            self._stopped = True
            return _MALFORMED
        try:
            return self._emit(self._to.event(name, obj))
        except _UNREADABLE:
            self._stopped = True  # an event this translation cannot read: malformed
            return _MALFORMED

    def _end(self) -> bytes:
        """The caller's end of the answer; what it says (the usage kept from earlier events)
        is read only now, so what cannot be read makes the stream malformed here."""
        try:
            return self._emit([None])
        except _UNREADABLE:
            self._stopped = True
            return _MALFORMED

    def _emit(self, pivots: list[Pivot | None]) -> bytes:
        out = bytearray()
        for pivot in pivots:
            if pivot is None:
                if self._ended:
                    continue
                self._ended = True
            elif not self._finished and _gives_finish(pivot):
                self._finished = True
            events = self._from.chunk(pivot)
            for event in events:
                out += self._frame(event)
            if not events and not self.content_held and pivot is not None:
                self.content_held = _gives_content(pivot)
            if pivot is None and not self._named and isinstance(self._from, openai.FromPivot):
                out += _DONE
        return bytes(out)

    def _frame(self, event: Event) -> bytes:
        name, data = event
        body = orjson.dumps(data)
        if name is not None:
            return b"event: " + name.encode() + b"\ndata: " + body + b"\n\n"
        return b"data: " + body + b"\n\n"
