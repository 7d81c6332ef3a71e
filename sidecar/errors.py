"""The sidecar's error family.

`ErrorCode` maps each wire code (docs/reference.md#errors) to its HTTP status. `ProxyError`
is what the request path raises; the handler turns it into a response in the
route's format. Configuration, vault and CLI problems have their own types.
Messages never contain secret values: callers pass names, ids and paths only.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable


class ErrorCode(enum.Enum):
    INVALID_JSON = (400, "invalid_json", "invalid_request_error")
    MODEL_MISSING = (400, "model_missing", "invalid_request_error")
    MODEL_UNKNOWN = (400, "model_unknown", "invalid_request_error")
    NO_PROVIDER_KEY = (400, "no_provider_key", "invalid_request_error")
    INVALID_REQUEST = (400, "invalid_request", "invalid_request_error")
    TRANSLATION_UNSUPPORTED = (400, "translation_unsupported", "invalid_request_error")
    ACCESS_KEY_INVALID = (401, "access_key_invalid", "authentication_error")
    CREDITS_EXHAUSTED = (402, "credits_exhausted", "billing_error")
    PROVIDER_NOT_ALLOWED = (403, "provider_not_allowed", "permission_error")
    MODEL_NOT_ALLOWED = (403, "model_not_allowed", "permission_error")
    ROUTE_NOT_FOUND = (404, "route_not_found", "not_found_error")
    METHOD_NOT_ALLOWED = (405, "method_not_allowed", "invalid_request_error")
    REQUEST_TIMEOUT = (408, "request_timeout", "timeout_error")
    REQUEST_TOO_LARGE = (413, "request_too_large", "request_too_large")
    UNSUPPORTED_MEDIA = (415, "unsupported_media", "invalid_request_error")
    WEBSOCKET_UNSUPPORTED = (426, "websocket_unsupported", "invalid_request_error")
    ALL_KEYS_COOLING_DOWN = (429, "all_keys_cooling_down", "rate_limit_error")
    RATE_LIMIT_EXCEEDED = (429, "rate_limit_exceeded", "rate_limit_error")
    UPSTREAM_UNAVAILABLE = (502, "upstream_unavailable", "api_error")
    LEDGER_UNAVAILABLE = (503, "ledger_unavailable", "api_error")
    GATEWAY_TIMEOUT = (504, "gateway_timeout", "timeout_error")

    def __init__(self, status: int, wire: str, kind: str) -> None:
        self.status = status
        self.wire = wire
        self.kind = kind

    @property
    def retryable(self) -> bool:
        """Whether an SDK retry could help; `x-should-retry: false` otherwise."""
        return self.status not in (400, 401, 402, 403, 404, 405, 413, 415, 426)


class ProxyError(Exception):
    """An error the sidecar answers itself, in the route's body format."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        retry_after: int | None = None,
        provider: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after = retry_after
        self.provider = provider


class ConfigError(Exception):
    """One or more problems in a config file, each naming its key path."""

    def __init__(self, problems: Iterable[str], source: str = "config") -> None:
        self.problems = tuple(problems)
        self.source = source
        super().__init__(f"{source}: " + "; ".join(self.problems))


class VaultError(Exception):
    """A vault that cannot be read, written, or opened. Never carries values."""


class UserError(Exception):
    """A CLI user error: exit status 1 with this message on stderr."""


def problems_text(problems: Iterable[str]) -> str:
    """Problems as an indented bullet list, for one message on stderr."""
    return "\n".join(f"  - {p}" for p in problems)
