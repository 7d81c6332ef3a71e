"""The failover plan (docs/reference.md#failover-and-key-health): which (model, key) pairs a request may try, in order.

Pure: given the runtime snapshot, the caller, the requested model names and
key health, it returns the candidates or raises the `ProxyError` the caller
should get (scope, no key, all cooling). No I/O; the handler runs the plan.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from sidecar.catalog import CATALOG_LISTED
from sidecar.errors import ErrorCode, ProxyError
from sidecar.health import KeyHealth
from sidecar.keys import (
    CALLER_KEY_ID,
    SOURCE_MANAGED,
    SOURCE_PASSTHROUGH,
    KeySelection,
    ProviderKey,
    select_keys,
)
from sidecar.models import ResolvedModel, model_allowed
from sidecar.quota import QuotaBook
from sidecar.runtime import AccessKey, Provider, Runtime
from sidecar.secret import Secret


@dataclass(frozen=True, slots=True, init=False)
class Candidate:
    provider: Provider
    model: ResolvedModel | None  # None: explicit route without a model in the body
    key: ProviderKey
    #: The model name sent upstream (None: the body names none); a field, not a property:
    #: it is read eight times per request.
    upstream_model: str | None = field(init=False)  # (`dataclasses.replace` recomputes it)

    def __init__(self, provider: Provider, model: ResolvedModel | None, key: ProviderKey) -> None:
        set_field = object.__setattr__  # (frozen)
        set_field(self, "provider", provider)
        set_field(self, "model", model)
        set_field(self, "key", key)
        set_field(self, "upstream_model", model.upstream if model else None)


@dataclass(slots=True)
class Plan:
    candidates: list[Candidate]
    rejected_models: list[str] = field(default_factory=list)
    #: providers whose candidates draw on managed keys (need credits)
    managed_providers: set[str] = field(default_factory=set)


@dataclass(frozen=True, slots=True)
class Target:
    provider: Provider
    model: ResolvedModel | None


def resolve_targets(
    runtime: Runtime,
    fmt: str,
    names: list[str],
    fallbacks: tuple[str, ...] = (),
    *,
    any_format: bool = False,
) -> list[Target]:
    """Model names → providers, checking each provider speaks the route's format, unless
    `any_format` (a chat request, which is translated for a provider of another format).

    `fallbacks` (from the config's `fallbacks:`) follow the names; one that does not
    resolve, or whose provider speaks another format, is left out rather than failing
    the request (the caller did not ask for it).
    """
    targets = []
    for name in names:
        resolved = runtime.resolver.resolve(name)
        if resolved.provider.format != fmt and not any_format:
            raise ProxyError(
                ErrorCode.MODEL_UNKNOWN,
                f"model {name!r} is served by provider {resolved.provider.id!r}, which speaks the "
                f"{resolved.provider.format} format, not this route's {fmt} format",
            )
        targets.append(Target(resolved.provider, resolved))
    for name in fallbacks:
        if name in names:
            continue
        try:
            resolved = runtime.resolver.resolve(name)
        except ProxyError:
            continue
        if resolved.provider.format == fmt or any_format:
            targets.append(Target(resolved.provider, resolved))
    return targets


def _scope_error(runtime: Runtime, access: AccessKey | None, t: Target) -> ProxyError | None:
    cfg = runtime.config
    p = t.provider
    if cfg.only_allow_configured_providers and not p.configured:
        return ProxyError(
            ErrorCode.PROVIDER_NOT_ALLOWED, f"provider {p.id!r} is not configured here"
        )
    if access is not None and access.allowed_providers and p.id not in access.allowed_providers:
        return ProxyError(
            ErrorCode.PROVIDER_NOT_ALLOWED, f"this access key may not use provider {p.id!r}"
        )
    if t.model is None:
        # An explicit-route request that names no model cannot pass a model restriction.
        if (access is not None and access.allowed_models) or cfg.only_allow_configured_models:
            return ProxyError(ErrorCode.MODEL_NOT_ALLOWED,
                              "this access key may only use listed models, and the request names none")  # fmt: skip
        return None
    if access is not None and not model_allowed(access.allowed_models, t.model):
        return ProxyError(
            ErrorCode.MODEL_NOT_ALLOWED, f"this access key may not use model {t.model.requested!r}"
        )
    if cfg.only_allow_configured_models and t.model.upstream not in p.models:
        return ProxyError(
            ErrorCode.MODEL_NOT_ALLOWED, f"model {t.model.requested!r} is not configured here"
        )
    return None


def build_plan(
    runtime: Runtime,
    access: AccessKey | None,
    targets: list[Target],
    health: KeyHealth,
    *,
    passthrough_key: Secret | None = None,
    quota: QuotaBook | None = None,
) -> Plan:
    """Scope-check the targets, pick each provider's key source, drop cooling keys, and (with
    `quota`) put a source's nearly exhausted keys behind those with headroom."""
    plan = Plan(candidates=[])
    allowed: list[Target] = []
    first_error: ProxyError | None = None
    for t in targets:
        err = _scope_error(runtime, access, t)
        if err is None:
            allowed.append(t)
            continue
        first_error = first_error or err
        if t.model is not None:
            plan.rejected_models.append(t.model.requested)
    if not allowed:
        assert first_error is not None
        raise first_error
    selections: dict[str, KeySelection | None] = {}
    missing: str | None = None
    soonest: tuple[str, float] | None = None
    for t in allowed:
        pid = t.provider.id
        if pid not in selections:
            if passthrough_key is not None:
                pk = ProviderKey(
                    pid, SOURCE_PASSTHROUGH, CALLER_KEY_ID, passthrough_key, f"{pid}:caller"
                )
                selections[pid] = KeySelection(SOURCE_PASSTHROUGH, (pk,))
            else:
                assert access is not None
                selections[pid] = select_keys(access, t.provider)
        sel = selections[pid]
        if sel is None:
            missing = missing or pid
            continue
        model = t.model.upstream if t.model is not None else ""
        if sel.source is SOURCE_PASSTHROUGH:
            usable: Sequence[ProviderKey] = sel.keys  # the caller's own key: its failures are not shared state
        else:  # cooling is per key and model: a key rate-limited on one model serves the others
            usable = [k for k in sel.keys if health.cooling_until(k.health_id, model) is None]
        if not usable:
            wait = health.soonest_recovery((k.health_id for k in sel.keys), model) or 0.0
            if soonest is None or wait < soonest[1]:
                soonest = (pid, wait)
            continue
        if quota is not None and len(usable) > 1:
            usable = quota.order(usable, model, _health_id)
        if sel.source is SOURCE_MANAGED:
            plan.managed_providers.add(pid)
        plan.candidates.extend(Candidate(t.provider, t.model, k) for k in usable)

    if not plan.candidates:
        if soonest is not None:
            raise ProxyError(
                ErrorCode.ALL_KEYS_COOLING_DOWN,
                f"every key for provider {soonest[0]!r} is cooling down; retry later",
                retry_after=max(1, math.ceil(soonest[1])),
                provider=soonest[0],
            )
        raise ProxyError(
            ErrorCode.NO_PROVIDER_KEY, f"no provider key for provider {missing!r}", provider=missing
        )
    return plan


def _health_id(key: ProviderKey) -> str:
    return key.health_id


def _name_at(runtime: Runtime, provider: Provider, name: str) -> ResolvedModel:
    """`name` as a caller must send it to reach `provider` (prefixed when it resolves elsewhere)."""
    try:
        resolved = runtime.resolver.resolve(name)
    except ProxyError:
        resolved = None
    if resolved is None or resolved.provider.id != provider.id:
        return ResolvedModel(f"{provider.id}:{name}", provider, name)
    return resolved


def listable_models(runtime: Runtime, access: AccessKey | None) -> list[tuple[str, str]]:
    """`GET /v1/models`: (name a caller can send, provider) for every model this key may use.

    The candidates are each provider's `models:` (else the catalog's well-known names)
    plus the key's own exact `allowed_models` that belong to that provider, for every
    provider this key could get a provider key for; the same scope rules as a request
    decide what is listed.
    """
    out: list[tuple[str, str]] = []
    for p in runtime.providers.values():
        if access is not None and select_keys(access, p) is None:
            continue  # no key this caller could use there: nothing of it is callable
        names = set(p.models) or set(CATALOG_LISTED.get(p.id, ()))
        for m in access.allowed_models if access is not None else ():
            prefix, sep, rest = m.partition(":")
            if m.endswith("*"):
                continue
            if sep and prefix == p.id:
                names.add(rest)
            elif _name_at(runtime, p, m).requested == m:
                names.add(m)
        for name in sorted(names):
            resolved = _name_at(runtime, p, name)
            if _scope_error(runtime, access, Target(p, resolved)) is None:
                out.append((resolved.requested, p.id))
    return out
