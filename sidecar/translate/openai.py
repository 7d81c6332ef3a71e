"""OpenAI chat completions: the pivot itself (docs/reference.md#translation).

A request, answer or stream chunk in this format already is the pivot, so the
conversions here only check what OpenAI cannot carry (the pivot's `top_k`) and
give errors and in-band error events their OpenAI shape.
"""

from __future__ import annotations

from typing import Any, Final

import orjson

from sidecar.translate.base import Event, Pivot, Unsupported

#: OpenAI models that take only `max_completion_tokens` (its reasoning models).
_COMPLETION_TOKENS_ONLY: Final = ("o1", "o3", "o4", "gpt-5")
#: Pivot fields OpenAI chat completions has no place for.
_NOT_OPENAI: Final = ("top_k",)
_TYPES: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
}


def error_type(status: int) -> str:
    """The pivot's error `type` for an HTTP status."""
    if status == 529:
        return "overloaded_error"
    return _TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


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
                "type": kind if isinstance(kind, str) and kind else error_type(status),
                "code": code if isinstance(code, str) else None,
            },
            "status": status,
        }
    text = body[:512].decode("utf-8", "replace").strip()
    return {
        "error": {"message": text or f"upstream status {status}", "type": error_type(status),
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
            status = _status_of(err)
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


def _status_of(err: dict[str, Any]) -> int:
    code = err.get("code")
    if type(code) is int and 400 <= code <= 599:
        return code
    text = f"{code} {err.get('type')}".lower()
    if "rate_limit" in text or "insufficient_quota" in text:
        return 429
    if "auth" in text or "invalid_api_key" in text:
        return 401
    if "invalid_request" in text or "context_length" in text:
        return 400
    return 500
