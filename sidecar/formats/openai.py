"""OpenAI wire format (also every OpenAI-compatible custom provider)."""

from __future__ import annotations

from typing import Any, Final

import orjson

from sidecar.errors import ErrorCode
from sidecar.usage import Usage, ensure_stream_usage, usage_from_body

#: Paths whose streams carry a usage chunk only when `stream_options.include_usage` is set.
_USAGE_OPT_IN_PATHS: Final = ("/chat/completions", "/completions")


class OpenAIAdapter:
    format = "openai"

    def error_body(self, code: ErrorCode, message: str) -> bytes:
        return orjson.dumps(
            {"error": {"message": message, "type": code.kind, "code": code.wire, "param": None}}
        )

    def prepare_stream(self, path: str, body: dict[str, Any]) -> bool:
        if path.endswith(_USAGE_OPT_IN_PATHS):
            return ensure_stream_usage(body)
        return False

    def usage_from_body(self, body: bytes) -> Usage | None:
        return usage_from_body("openai", body)


OPENAI: Final = OpenAIAdapter()
