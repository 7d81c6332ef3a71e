"""What one attempt sends: its path, query and body, for its candidate's upstream.

A request goes out as the caller sent it when the candidate's provider speaks the
caller's format; a chat request to a provider of another format is translated
(`sidecar.translate`), per attempt, because each attempt may go elsewhere. Where it
goes under the provider's base URL is the upstream's to say (`sidecar.upstreams`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from multidict import CIMultiDict

from sidecar import inbound
from sidecar.errors import ErrorCode, ProxyError
from sidecar.formats import Adapter
from sidecar.plan import Candidate
from sidecar.translate import Translation, Unsupported, translation

#: Request headers that belong to the caller's format: not sent to another format's upstream.
_FORMAT_HEADER_PREFIXES: Final = ("anthropic-", "openai-", "x-goog-", "x-stainless-")


@dataclass(frozen=True, slots=True)
class Route:
    """The caller's side of a request, the same for every attempt."""

    fmt: str  # the caller's wire format
    path: str  # under the format's root: /chat/completions, /messages, /models/M:generateContent
    stream: bool
    chat: bool = False  # a chat request: a provider of another format may serve it, translated
    action: str = ""  # Gemini routes: generateContent, streamGenerateContent, countTokens, …
    explicit: bool = False  # `/{provider}/…`: the path is forwarded as it is


@dataclass(slots=True)
class Outbound:
    body: bytes
    strip_usage: bool  # the stream's usage chunk was asked for by the sidecar, not the caller
    path: str
    query: str = ""  # this attempt's own query parameters (`alt=sse`, `api-version=`)
    caller_query: bool = True  # the caller's query is forwarded (not to another format)
    translation: Translation | None = None
    chat_headers: tuple[tuple[str, str], ...] = ()  # what a translated request must carry


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
    up = provider.upstream
    if provider.format == route.fmt:
        # Gemini's model is in the path, never in the body.
        named = None if route.fmt == "gemini" else model
        sent, strip = payload(body, data, named, adapter, route.path, route.stream)
        path, query = up.native(route.path, model, route.action)
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
    path, query = up.chat(model, route.stream)
    return Outbound(inbound.dump_json(translated), strip, path, query, False, tr,
                    up.chat_headers)  # fmt: skip


def check(route: Route, cand: Candidate) -> None:
    """What `build` would refuse of a request in the candidate's own format, without building
    it: a model name its upstream's URL path cannot carry (400, nothing is sent)."""
    if route.explicit:
        return
    up = cand.provider.upstream
    if up.model_in_path:
        up.native(route.path, cand.upstream_model, route.action)


def translated_headers(
    headers: CIMultiDict[str], needed: tuple[tuple[str, str], ...]
) -> CIMultiDict[str]:
    """A translated attempt's request headers: none that belong to the caller's format, and
    what the upstream's format needs (Anthropic's version)."""
    out = headers.copy()
    for name in list(out.keys()):
        if name.lower().startswith(_FORMAT_HEADER_PREFIXES):
            del out[name]
    out["content-type"] = "application/json"
    for name, value in needed:
        out[name] = value
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
