"""Gemini API wire format (generateContent): errors are google.rpc statuses, and every
stream reports `usageMetadata`."""

from __future__ import annotations

from typing import Any, Final

import orjson

from sidecar.errors import ErrorCode
from sidecar.usage import Usage, usage_from_body

#: The `domain` of the google.rpc.ErrorInfo in the sidecar's own Gemini errors.
ERROR_DOMAIN: Final = "ai-gateway-sidecar"

#: HTTP status -> the google.rpc status name Google's APIs pair with it.
RPC_STATUS: Final = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    402: "FAILED_PRECONDITION",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    405: "INVALID_ARGUMENT",
    408: "DEADLINE_EXCEEDED",
    409: "ABORTED",
    413: "INVALID_ARGUMENT",
    415: "INVALID_ARGUMENT",
    426: "FAILED_PRECONDITION",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "UNIMPLEMENTED",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
    529: "UNAVAILABLE",  # Anthropic's "overloaded", translated
}


# A google.rpc status name -> its HTTP status (google.rpc code mapping).
_HTTP_OF_RPC: Final = {
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "OUT_OF_RANGE": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "ABORTED": 409,
    "ALREADY_EXISTS": 409,
    "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499,
    "UNKNOWN": 500,
    "INTERNAL": 500,
    "DATA_LOSS": 500,
    "UNIMPLEMENTED": 501,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}


#: Every google.rpc status name.
RPC_NAMES: Final = frozenset(_HTTP_OF_RPC) | {"OK"}


def http_status(rpc: str) -> int:
    """The HTTP status of a google.rpc status name (500 when unknown)."""
    return _HTTP_OF_RPC.get(rpc, 500)


def rpc_status(status: int) -> str:
    """The google.rpc status name for an HTTP status (INTERNAL for an unknown 5xx,
    INVALID_ARGUMENT for an unknown 4xx)."""
    return RPC_STATUS.get(status) or ("INTERNAL" if status >= 500 else "INVALID_ARGUMENT")


def error_object(status: int, message: str, reason: str) -> dict[str, Any]:
    """A Gemini error body as a dict: google.rpc.Status with one ErrorInfo naming `reason`
    (the sidecar's wire code). The google-genai SDK raises `ClientError`/`ServerError` with
    `code`, `status` and `message` from it, as an HTTP body or as an in-band stream chunk."""
    info = {
        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
        "reason": reason,
        "domain": ERROR_DOMAIN,
    }
    return {
        "error": {
            "code": status,
            "message": message,
            "status": rpc_status(status),
            "details": [info],
        }
    }


class GeminiAdapter:
    format = "gemini"

    def error_body(self, code: ErrorCode, message: str) -> bytes:
        return orjson.dumps(error_object(code.status, message, code.wire))

    def prepare_stream(self, path: str, body: dict[str, Any]) -> bool:
        return False  # Gemini streams always carry usageMetadata

    def usage_from_body(self, body: bytes) -> Usage | None:
        return usage_from_body("gemini", body)


GEMINI: Final = GeminiAdapter()
