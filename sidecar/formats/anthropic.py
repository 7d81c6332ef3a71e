"""Anthropic wire format: usage arrives in `message_start` / `message_delta`."""

from __future__ import annotations

from typing import Any, Final

import orjson

from sidecar.errors import ErrorCode
from sidecar.usage import Usage, usage_from_body


class AnthropicAdapter:
    format = "anthropic"

    def error_body(self, code: ErrorCode, message: str) -> bytes:
        return orjson.dumps(
            {"type": "error", "error": {"type": code.kind, "message": message, "code": code.wire}}
        )

    def prepare_stream(self, path: str, body: dict[str, Any]) -> bool:
        return False  # Anthropic streams always carry usage

    def usage_from_body(self, body: bytes) -> Usage | None:
        return usage_from_body("anthropic", body)


ANTHROPIC: Final = AnthropicAdapter()
