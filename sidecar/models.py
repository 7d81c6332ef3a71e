"""Model resolution (docs/reference.md#model-names): which provider serves a model name, and under what name.

Order: an explicit `provider:model` prefix (only when the prefix is a known
provider, so `llama3.2:1b` stays a model name); then the `models:` lists of
configured providers; then the built-in catalog of name patterns.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Final

from sidecar.catalog import CATALOG_PREFIXES
from sidecar.errors import ErrorCode, ProxyError

if TYPE_CHECKING:
    from sidecar.runtime import Provider

_MISS: Final = object()


@dataclass(frozen=True, slots=True)
class ResolvedModel:
    requested: str  # as the caller wrote it
    provider: Provider
    upstream: str  # as sent upstream: prefix removed


class ModelResolver:
    """Precomputed lookups; `resolve` is a couple of dict hits on the hot path."""

    def __init__(self, providers: Mapping[str, Provider]) -> None:
        self._providers = providers
        self._configured: dict[str, Provider] = {}
        for p in providers.values():
            for m in p.models:
                self._configured.setdefault(m, p)
        self._cache: dict[str, object] = {}

    def resolve(self, name: str) -> ResolvedModel:
        hit = self._cache.get(name, _MISS)
        if hit is _MISS:
            hit = self._resolve(name)
            if len(self._cache) < 4096:  # names come from callers: stay bounded
                self._cache[name] = hit
        if not isinstance(hit, ResolvedModel):
            raise ProxyError(ErrorCode.MODEL_UNKNOWN, f"unknown model {name!r}: prefix it with a "
                             "provider (e.g. openai:MODEL) or list it under a provider's models")  # fmt: skip
        return hit

    def _resolve(self, name: str) -> ResolvedModel | None:
        prefix, sep, rest = name.partition(":")
        if sep and rest and prefix in self._providers:
            return ResolvedModel(name, self._providers[prefix], rest)
        if name in self._configured:
            return ResolvedModel(name, self._configured[name], name)
        for pattern, pid in CATALOG_PREFIXES:
            if name.startswith(pattern) and pid in self._providers:
                return ResolvedModel(name, self._providers[pid], name)
        return None


def model_allowed(patterns: frozenset[str], resolved: ResolvedModel) -> bool:
    """An access key's `allowed_models`: exact names or `prefix*`; empty means all."""
    if not patterns:
        return True
    for name in (resolved.requested, resolved.upstream):
        if name in patterns:
            return True
        if any(p.endswith("*") and name.startswith(p[:-1]) for p in patterns):
            return True
    return False


def fallbacks_for(fallbacks: Sequence[tuple[str, tuple[str, ...]]], model: str) -> tuple[str, ...]:
    """The `fallbacks:` entry for `model` (as the caller sent it): an exact name first,
    then the first glob (`claude-*`) that matches, in config order; () for none."""
    for pattern, names in fallbacks:
        if pattern == model:
            return names
    for pattern, names in fallbacks:
        if fnmatchcase(model, pattern):
            return names
    return ()
