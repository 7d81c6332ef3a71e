"""What one attempt sends: its path, query and body, for its candidate's upstream.

A request goes out as the caller sent it when the candidate's provider speaks the
caller's format; a chat request to a provider of another format is translated
(`sidecar.translate`), per attempt, because each attempt may go elsewhere. Some
upstreams take the model in the path: Gemini (`/models/{model}:generateContent`) and
an Azure resource URL (`/openai/deployments/{model}/chat/completions?api-version=`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Final

from multidict import CIMultiDict
from yarl import URL

from sidecar import inbound
from sidecar.catalog import AZURE_API_VERSION
from sidecar.errors import ErrorCode, ProxyError
from sidecar.plan import Candidate
from sidecar.providers import Adapter
from sidecar.runtime import Provider
from sidecar.translate import Translation, Unsupported, translation

#: The path a translated chat request takes on each upstream format.
_CHAT_PATH: Final = {"openai": "/chat/completions", "anthropic": "/messages"}
#: Request headers that belong to the caller's format: not sent to another format's upstream.
_FORMAT_HEADER_PREFIXES: Final = ("anthropic-", "openai-", "x-goog-", "x-stainless-")
ANTHROPIC_VERSION: Final = "2023-06-01"


@dataclass(frozen=True, slots=True)
class Route:
    """The caller's side of a request, the same for every attempt."""

    fmt: str  # the caller's wire format
    path: str  # under the format's root: /chat/completions, /messages, /models/M:generateContent
    stream: bool
    chat: bool = False  # a chat request: a provider of another format may serve it, translated
    action: str = ""  # Gemini routes: generateContent, streamGenerateContent, countTokens, …
    explicit: bool = False  # `/{provider}/…`: the path is forwarded as it is


@dataclass(frozen=True, slots=True)
class Outbound:
    body: bytes
    strip_usage: bool  # the stream's usage chunk was asked for by the sidecar, not the caller
    path: str
    query: str = ""  # this attempt's own query parameters (`alt=sse`, `api-version=`)
    caller_query: bool = True  # the caller's query is forwarded (not to another format)
    translation: Translation | None = None


def build(
    route: Route,
    cand: Candidate,
    body: bytes,
    data: dict[str, Any] | None,
    adapter: Adapter,
) -> Outbound:
    """The attempt for `cand`; `ProxyError(TRANSLATION_UNSUPPORTED)` when the request cannot be
    carried to its format."""
    provider = cand.provider
    model = cand.upstream_model
    if route.explicit:
        sent, strip = payload(body, data, model, adapter, route.path, route.stream)
        return Outbound(sent, strip, route.path)
    if provider.format == route.fmt:
        if route.fmt == "gemini":
            sent, _ = payload(body, data, None, adapter, route.path, False)
            return Outbound(sent, False, _gemini_path(model, route.action))
        sent, strip = payload(body, data, model, adapter, route.path, route.stream)
        path, query = _openai_path(provider, model, route.path)
        return Outbound(sent, strip, path, query)
    tr = translation(route.fmt, provider.format)
    assert tr is not None
    assert data is not None
    assert model is not None
    request = {k: v for k, v in data.items() if k != "models"}
    try:
        translated = tr.request(request, model, route.stream)
    except Unsupported as exc:
        raise ProxyError(
            ErrorCode.TRANSLATION_UNSUPPORTED,
            f"{exc.field} cannot be carried from the {route.fmt} format to provider "
            f"{provider.id!r} ({provider.format})" + (f": {exc.why}" if exc.why else ""),
            provider=provider.id,
        ) from None
    strip = route.stream and route.fmt == "openai" and not _asked_usage(data)
    sent = inbound.dump_json(translated)
    if provider.format == "gemini":
        action = "streamGenerateContent" if route.stream else "generateContent"
        return Outbound(sent, strip, _gemini_path(model, action),
                        "alt=sse" if route.stream else "", False, tr)  # fmt: skip
    path, query = _openai_path(provider, model, _CHAT_PATH[provider.format])
    return Outbound(sent, strip, path, query, False, tr)


def translated_headers(headers: CIMultiDict[str], upstream_format: str) -> CIMultiDict[str]:
    """A translated attempt's request headers: none that belong to the caller's format, and
    what the upstream's format needs (Anthropic's version)."""
    out = headers.copy()
    for name in list(out.keys()):
        if name.lower().startswith(_FORMAT_HEADER_PREFIXES):
            del out[name]
    out["content-type"] = "application/json"
    if upstream_format == "anthropic":
        out["anthropic-version"] = ANTHROPIC_VERSION
    return out


def payload(
    body: bytes,
    data: dict[str, Any] | None,
    model: str | None,
    adapter: Adapter,
    path: str,
    stream: bool,
) -> tuple[bytes, bool]:
    """The body for one model candidate, and whether the stream's added usage chunk must be
    stripped. The caller's bytes go out untouched when nothing changes."""
    if data is None:
        return body, False
    changes: dict[str, Any] = {}
    if "models" in data:
        changes["models"] = None
    if model is not None and data.get("model") != model:
        changes["model"] = model
    strip = False
    if stream:
        probe = dict(data)
        if isinstance(probe.get("stream_options"), dict):  # never mutate the caller's own dict
            probe["stream_options"] = dict(probe["stream_options"])
        strip = adapter.prepare_stream(path, probe)
        if strip:
            changes["stream_options"] = probe["stream_options"]
    if not changes:
        return body, False
    out = dict(data)
    for k, v in changes.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = v
    return inbound.dump_json(out), strip


def _asked_usage(data: dict[str, Any]) -> bool:
    opts = data.get("stream_options")
    return isinstance(opts, dict) and opts.get("include_usage") is True


def _gemini_path(model: str | None, action: str) -> str:
    return f"/models/{_segment(model)}:{action}"


def _openai_path(provider: Provider, model: str | None, path: str) -> tuple[str, str]:
    """An Azure resource URL takes the deployment (the model) in the path, and `api-version`."""
    under = _azure_deployments(provider.id, provider.base_url)
    if under is None:
        return path, ""
    query = "" if "api-version=" in provider.query else f"api-version={AZURE_API_VERSION}"
    return f"{under}/{_segment(model)}{path}", query


@functools.lru_cache(maxsize=64)
def _azure_deployments(provider_id: str, base_url: str) -> str | None:
    """The built-in `azure` at a resource URL (not Azure's v1 API, not a deployment URL): the
    path of its deployments under the base URL; else None."""
    if provider_id != "azure":
        return None
    path = URL(base_url).path.rstrip("/")
    return {"": "/openai/deployments", "/openai": "/deployments"}.get(path)


def _segment(model: str | None) -> str:
    """A model name that goes in the URL path: one segment, or 400 (nothing is sent)."""
    if not model or "/" in model or "\\" in model or model in (".", "..") or "?" in model \
            or "#" in model:  # fmt: skip
        raise ProxyError(ErrorCode.INVALID_REQUEST,
                         "a model name sent in the URL path must be a single path segment")  # fmt: skip
    return model
