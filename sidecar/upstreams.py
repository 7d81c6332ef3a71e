"""Where and how an attempt reaches a provider (docs/reference.md#built-in-providers).

A provider is two things: the wire format it speaks (`sidecar.formats`,
`sidecar.translate`) and the upstream it is: the path a request takes under its
base URL, the query parameters that path needs, what a translated request must
carry, and how its key is sent. This module is the second. Pure: no aiohttp.

- OpenAI-compatible hosts and Anthropic take the caller's route as it is
  (`/chat/completions`, `/messages`); a translated chat goes to theirs.
- The Gemini API takes the model in the path: `/models/{model}:{action}`, a
  stream as `:streamGenerateContent?alt=sse`.
- Azure OpenAI at a resource URL takes the deployment (the model) in the path,
  and an `api-version`: `/openai/deployments/{model}/chat/completions?api-version=`.

A model name that goes into a path must be one path segment, or nothing is sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Protocol

from yarl import URL

from sidecar.catalog import AZURE_API_VERSION
from sidecar.errors import ErrorCode, ProxyError
from sidecar.secret import Secret

ANTHROPIC_VERSION: Final = "2023-06-01"


class Upstream(Protocol):
    def native(self, path: str, model: str | None, action: str) -> tuple[str, str]:
        """(path, query) of a request in this upstream's own format, to the caller's `path`
        (Gemini: the `action` of `/models/{model}:{action}`)."""

    def chat(self, model: str | None, stream: bool) -> tuple[str, str]:
        """(path, query) of a chat request translated into this upstream's format."""

    @property
    def chat_headers(self) -> tuple[tuple[str, str], ...]:
        """Headers a translated chat request needs (the caller's format had its own)."""

    @property
    def model_in_path(self) -> bool:
        """Whether the model goes in the URL path (so its name must be one path segment)."""


@dataclass(frozen=True, slots=True)
class _Routed:
    """OpenAI-compatible hosts and Anthropic: the route is the path."""

    chat_path: str
    chat_headers: tuple[tuple[str, str], ...] = ()
    model_in_path: bool = False

    def native(self, path: str, model: str | None, action: str) -> tuple[str, str]:
        return path, ""

    def chat(self, model: str | None, stream: bool) -> tuple[str, str]:
        return self.chat_path, ""


@dataclass(frozen=True, slots=True)
class _Gemini:
    """The Gemini API: the model and the action in the path."""

    chat_headers: tuple[tuple[str, str], ...] = ()
    model_in_path: bool = True

    def native(self, path: str, model: str | None, action: str) -> tuple[str, str]:
        return f"/models/{_segment(model)}:{action}", ""

    def chat(self, model: str | None, stream: bool) -> tuple[str, str]:
        if stream:
            return f"/models/{_segment(model)}:streamGenerateContent", "alt=sse"
        return f"/models/{_segment(model)}:generateContent", ""


@dataclass(frozen=True, slots=True)
class _AzureDeployments:
    """Azure OpenAI at a resource URL: the deployment in the path, and an `api-version`."""

    under: str  # the deployments' path under the base URL
    query: str  # `api-version=…` unless the provider's `query_params` set one
    chat_headers: tuple[tuple[str, str], ...] = ()
    model_in_path: bool = True

    def native(self, path: str, model: str | None, action: str) -> tuple[str, str]:
        return f"{self.under}/{_segment(model)}{path}", self.query

    def chat(self, model: str | None, stream: bool) -> tuple[str, str]:
        return self.native("/chat/completions", model, "")


_OPENAI: Final = _Routed("/chat/completions")
_ANTHROPIC: Final = _Routed("/messages", (("anthropic-version", ANTHROPIC_VERSION),))
_GEMINI: Final = _Gemini()


def upstream_for(provider_id: str, fmt: str, base_url: str, query: str) -> Upstream:
    """The upstream of a provider (its id, format, `base_url` and `query_params`)."""
    if fmt == "gemini":
        return _GEMINI
    if fmt == "anthropic":
        return _ANTHROPIC
    under = _azure_deployments(provider_id, base_url)
    if under is not None:
        version = "" if "api-version=" in query else f"api-version={AZURE_API_VERSION}"
        return _AzureDeployments(under, version)
    return _OPENAI


def _azure_deployments(provider_id: str, base_url: str) -> str | None:
    """The built-in `azure` at a resource URL (not Azure's v1 API, not a deployment URL): the
    path of its deployments under the base URL; else None."""
    if provider_id != "azure":
        return None
    path = URL(base_url).path.rstrip("/")
    return {"": "/openai/deployments", "/openai": "/deployments"}.get(path)


def _segment(model: str | None) -> str:
    """A model name that goes in the URL path: one segment, or 400 (nothing is sent)."""
    if not model or model in (".", "..") or any(c in model for c in "/\\?#"):
        raise ProxyError(ErrorCode.INVALID_REQUEST,
                         "a model name sent in the URL path must be a single path segment")  # fmt: skip
    return model


def auth_header(auth: str, secret: Secret | None) -> tuple[str, str] | None:
    """How a provider key goes on the wire: `Authorization: Bearer`, or the header the
    provider's `auth:` names (`x-api-key`, `api-key`, `x-goog-api-key`)."""
    if secret is None or auth == "none":
        return None
    if auth in ("x-api-key", "api-key", "x-goog-api-key"):  # Anthropic, Azure, Google
        return (auth, secret.reveal())
    return ("Authorization", "Bearer " + secret.reveal())
