"""The adapter interface every wire format implements."""

from __future__ import annotations

from typing import Any, Protocol

from sidecar.errors import ErrorCode
from sidecar.usage import Usage


class Adapter(Protocol):
    format: str

    def error_body(self, code: ErrorCode, message: str) -> bytes:
        """The sidecar's own error, in this format's body shape."""

    def prepare_stream(self, path: str, body: dict[str, Any]) -> bool:
        """Adjust a streaming request so usage can be metered. True: strip the added usage chunk."""

    def usage_from_body(self, body: bytes) -> Usage | None: ...
