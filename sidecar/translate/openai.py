"""OpenAI chat completions: the pivot itself (docs/reference.md#translation).

A request, answer or stream chunk in this format already is the pivot, so the
conversions here only check what OpenAI cannot carry (the pivot's `top_k`) and
give errors and in-band error events their OpenAI shape.
"""

from __future__ import annotations

from typing import Any, Final

import orjson

from sidecar.translate.base import Event, Pivot, Unsupported, pivot_error_type

#: OpenAI models that take only `max_completion_tokens` (its reasoning models).
_COMPLETION_TOKENS_ONLY: Final = ("o1", "o3", "o4", "gpt-5")
# Checked in order against an OpenAI error's `code`, then its `type`.
_OPENAI_STATUS: Final = (
    ("rate_limit", 429),
    ("insufficient_quota", 429),
    ("invalid_api_key", 401),
    ("authentication", 401),
    ("context_length_exceeded", 400),
    ("model_not_found", 404),
    ("invalid_request_error", 400),
)
#: Pivot fields OpenAI chat completions has no place for.
_NOT_OPENAI: Final = ("top_k",)

def request_to_pivot(body: dict[str, Any]) -> Pivot:
    return dict(body)


def request_from_pivot(pivot: Pivot, model: str, stream: bool) -> dict[str, Any]:
    for name in _NOT_OPENAI:
        if name in pivot:
            raise Unsupported(name, "OpenAI chat completions has no such parameter")
    out = dict(pivot)
    out["model"] = model
    out.pop("stream_options", None)
    if model.startswith(_COMPLETION_TOKENS_ONLY) and "max_tokens" in out:
        # OpenAI's reasoning models refuse `max_tokens` (Anthropic callers always send one).
        out["max_completion_tokens"] = out.pop("max_tokens")
    if stream:
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}  # metered: the usage chunk is always asked
    else:
        out.pop("stream", None)
    return out


def response_to_pivot(body: dict[str, Any]) -> Pivot:
    return body


def response_from_pivot(pivot: Pivot, model: str) -> dict[str, Any]:
    if not pivot.get("model") and model:
        return {**pivot, "model": model}  # the upstream did not say (Gemini may not)
    return pivot


def error_to_pivot(status: int, body: bytes) -> Pivot:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        doc = None
    err = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(err, dict):
        message = err.get("message")
        kind = err.get("type")
        code = err.get("code")
        return {
            "error": {
                "message": message if isinstance(message, str) else "",
                "type": kind if isinstance(kind, str) and kind else pivot_error_type(status),
                "code": code if isinstance(code, str) else None,
            },
            "status": status,
        }
    text = body[:512].decode("utf-8", "replace").strip()
    return {
        "error": {"message": text or f"upstream status {status}", "type": pivot_error_type(status),
                  "code": None},
        "status": status,
    }  # fmt: skip


def error_from_pivot(pivot: Pivot) -> dict[str, Any]:
    err = pivot.get("error")
    err = dict(err) if isinstance(err, dict) else {"message": "", "type": "api_error"}
    err.setdefault("code", None)
    err["param"] = None
    return {"error": err}


class ToPivot:
    """OpenAI chat chunks are pivot chunks; an in-band error gets its status."""

    def __init__(self, model: str) -> None:
        self.model = model

    def event(self, name: str | None, data: dict[str, Any]) -> list[Pivot | None]:
        err = data.get("error")
        if isinstance(err, dict):
            status = openai_error_status(err)
            return [error_to_pivot(status, orjson.dumps(data))]
        return [data]


class FromPivot:
    """Pivot chunks as OpenAI chat chunks; the end (`None`) is written by the framing."""

    def __init__(self, model: str) -> None:
        self.model = model

    def chunk(self, chunk: Pivot | None) -> list[Event]:
        if chunk is None:
            return []
        if "error" in chunk:
            body = error_from_pivot(chunk)
            status = chunk.get("status")
            if body["error"].get("code") is None and isinstance(status, int):
                body["error"]["code"] = status  # the status the error stands for, for the SDKs
            return [(None, body)]
        return [(None, chunk)]


def openai_error_status(error: dict[str, Any]) -> int:
    """The HTTP status an OpenAI error object stands for: an integer `code`, else what its
    `code` or `type` says (rate limit, quota, auth, bad request, no such model), else 500."""
    code = error.get("code")
    if type(code) is int and 400 <= code <= 599:
        return code
    for field in (code, error.get("type")):
        if isinstance(field, str):
            lowered = field.lower()
            for needle, status in _OPENAI_STATUS:
                if needle in lowered:
                    return status
    return 500
