"""Stage two of the config (STYLE §2): config + opened vault → a ready, immutable runtime.

Everything that can fail fails here, at load or reload, never on a request:
vault references are resolved, key ids derived, provider pools and access
keys indexed for O(1) lookups. A request keeps the `Runtime` it started with,
so a reload never changes the ground under a request in flight.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final, NamedTuple
from urllib.parse import urlencode

from sidecar.catalog import BUILTIN_PROVIDERS, Auth, Format
from sidecar.config import Config, KeyConfig, SecretRef
from sidecar.keys import NO_KEY_ID, KeySelection, KeySource, ProviderKey
from sidecar.models import ModelResolver
from sidecar.prices import Price, PriceTable
from sidecar.ratelimits import RateLimits
from sidecar.secret import Secret, fingerprint
from sidecar.upstreams import Upstream, upstream_for
from sidecar.vault import OpenedVault


@dataclass(frozen=True, slots=True)
class Provider:
    id: str
    format: Format
    auth: Auth
    base_url: str
    builtin: bool
    configured: bool  # listed under `providers:` or `managed:`
    models: frozenset[str]
    headers: tuple[tuple[str, Secret], ...]
    query: str  # provider `query_params`, URL-encoded once
    policy_keys: tuple[ProviderKey, ...]
    managed_keys: tuple[ProviderKey, ...]
    keyless: KeySelection | None  # for `auth: none`
    #: whether a model continues a partial assistant message (stream resumption)
    prefill: bool = False
    #: the `headers` whose values come from the config alone, not the vault: all a
    #: passthrough caller's request gets (it sends its own key, never the operator's)
    open_headers: tuple[tuple[str, Secret], ...] = ()
    model_prefill: Mapping[str, bool] = field(default_factory=dict)

    #: where its requests go and how (`sidecar.upstreams`), derived once from the fields above
    upstream: Upstream = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "upstream", upstream_for(self.id, self.format, self.base_url, self.query)
        )

    def accepts_prefill(self, model: str | None) -> bool:
        if model is None:
            return False
        return self.model_prefill.get(model, self.prefill)


@dataclass(frozen=True, slots=True)
class AccessKey:
    name: str
    revoked: bool
    credits_micro_usd: int
    allowed_providers: frozenset[str]
    allowed_models: frozenset[str]
    attached: Mapping[str, tuple[ProviderKey, ...]]  # provider → newest first
    limits: RateLimits = field(default_factory=RateLimits)  # requests / tokens per minute


class KeyRef(NamedTuple):
    """One way a key appears: the `sidecar_key_cooling_down` labels and a `GET /keys` line."""

    provider: str
    source: str
    key_id: str
    access_key: str  # the owning access key's name for attached keys, else ""


@dataclass(frozen=True, slots=True)
class Runtime:
    config: Config
    providers: Mapping[str, Provider]
    access_keys: Mapping[str, AccessKey]  # by `vault.hash_access_key(token)`
    resolver: ModelResolver
    prices: PriceTable = field(default_factory=PriceTable)
    #: health_id → every way that key value appears (one value may be a policy key and
    #: attached to two access keys), for the cooling gauge and `GET /keys`.
    key_labels: Mapping[str, tuple[KeyRef, ...]] = field(default_factory=dict)

    def metric_seeds(
        self,
    ) -> tuple[list[tuple[str, bool]], list[str], list[tuple[str, str]]]:
        """What `Metrics.prime` creates at 0 for this version."""
        providers = [(p.id, bool(p.managed_keys)) for p in self.providers.values()]
        live = [a for a in self.access_keys.values() if not a.revoked]
        limits = [(a.name, kind) for a in live
                  for kind, n in (("rpm", a.limits.rpm), ("tpm", a.limits.tpm)) if n]  # fmt: skip
        return providers, [a.name for a in live], limits

    def access_key_named(self, name: str) -> AccessKey | None:
        return next((a for a in self.access_keys.values() if a.name == name), None)


#: A key or header value with a CR or LF would split every request's head (the upstream
#: client refuses to send it): the version is refused instead, naming where, not the value.
_LINE_BREAK: Final = "the value has a line break"


def _line_break(secret: Secret) -> bool:
    value = secret.reveal()
    return value.find("\r") >= 0 or value.find("\n") >= 0


def _health_id(provider: str, secret: Secret | None) -> str:
    return f"{provider}:{secret.fingerprint() if secret else NO_KEY_ID}"


def make_key(provider: str, source: KeySource, key_id: str | None, secret: Secret) -> ProviderKey:
    return ProviderKey(
        provider=provider,
        source=source,
        key_id=key_id or fingerprint(secret.reveal()),
        secret=secret,
        health_id=_health_id(provider, secret),
    )


def build_runtime(config: Config, vault: OpenedVault) -> tuple[Runtime, list[str]]:
    """Resolve every reference. Returns the runtime and the problems that make it unusable."""
    problems: list[str] = []

    def resolve(ref: SecretRef) -> Secret:
        secret = vault.secrets.get((ref.namespace, ref.name))
        if secret is None:
            raise KeyError(ref)
        return secret

    def keys(
        pid: str, source: KeySource, items: tuple[KeyConfig, ...], path: str
    ) -> tuple[ProviderKey, ...]:
        out: list[ProviderKey] = []
        for j, k in enumerate(items):
            try:
                secret = k.value.render(resolve)
            except KeyError as exc:
                problems.append(f"{path}[{j}].value: {exc.args[0]} is not in the vault")
                continue
            if _line_break(secret):
                problems.append(f"{path}[{j}].value: {_LINE_BREAK}")
                continue
            out.append(make_key(pid, source, k.id, secret))
        return tuple(out)

    providers: dict[str, Provider] = {}
    configured_ids = {p.id for p in config.providers} | set(config.managed)
    for pid, b in BUILTIN_PROVIDERS.items():
        if config.provider(pid) is None and b.base_url:  # azure exists once configured
            providers[pid] = Provider(
                id=pid, format=b.format, auth=b.auth, base_url=b.base_url, builtin=True,
                configured=pid in configured_ids, models=frozenset(), headers=(), query="",
                policy_keys=(), keyless=None, prefill=b.format == "anthropic",
                managed_keys=keys(pid, KeySource.MANAGED, config.managed.get(pid, ()), f"managed.{pid}"),
            )  # fmt: skip
    for i, p in enumerate(config.providers):
        if p.disabled:
            continue
        headers: list[tuple[str, Secret]] = []
        open_headers: list[tuple[str, Secret]] = []
        for name, tmpl in p.headers:
            try:
                value = tmpl.render(resolve)
            except KeyError as exc:
                problems.append(f"providers[{i}].headers.{name}: {exc.args[0]} is not in the vault")
                continue
            if _line_break(value):
                problems.append(f"providers[{i}].headers.{name}: {_LINE_BREAK}")
                continue
            headers.append((name, value))
            if not tmpl.refs:
                open_headers.append((name, value))
        keyless = None
        if p.auth == "none":
            keyless = KeySelection(
                KeySource.POLICY,
                (ProviderKey(p.id, KeySource.POLICY, NO_KEY_ID, None, _health_id(p.id, None)),),
            )
        providers[p.id] = Provider(
            id=p.id,
            format=p.format,
            auth=p.auth,
            base_url=p.base_url,
            builtin=p.builtin,
            configured=True,
            models=frozenset(p.models),
            headers=tuple(headers),
            open_headers=tuple(open_headers),
            query=urlencode(p.query_params),
            policy_keys=keys(p.id, KeySource.POLICY, p.api_keys, f"providers[{i}].api_keys"),
            managed_keys=keys(
                p.id, KeySource.MANAGED, config.managed.get(p.id, ()), f"managed.{p.id}"
            ),
            keyless=keyless,
            prefill=p.format == "anthropic" if p.prefill is None else p.prefill,
            model_prefill=MappingProxyType(dict(p.model_prefill)),
        )

    access_keys: dict[str, AccessKey] = {}
    for rec in vault.access_keys:
        attached: dict[str, list[ProviderKey]] = {}
        for a in rec.attached:  # already newest first
            if _line_break(a.secret):
                problems.append(f"access_keys.{rec.name}.attached.{a.id}: {_LINE_BREAK}")
                continue
            attached.setdefault(a.provider, []).append(
                make_key(a.provider, KeySource.ATTACHED, a.id, a.secret)
            )
        access_keys[rec.hash] = AccessKey(
            name=rec.name,
            revoked=rec.revoked,
            credits_micro_usd=round(rec.credits_usd * 1_000_000),
            allowed_providers=rec.allowed_providers,
            allowed_models=rec.allowed_models,
            attached=MappingProxyType({k: tuple(v) for k, v in attached.items()}),
            limits=RateLimits(rpm=rec.rpm, tpm=rec.tpm),
        )

    labels: dict[str, set[KeyRef]] = {}
    for prov in providers.values():
        free = prov.keyless.keys if prov.keyless else ()
        for k in (*prov.policy_keys, *prov.managed_keys, *free):
            labels.setdefault(k.health_id, set()).add(KeyRef(*k.labels, ""))
    for ak in access_keys.values():
        for ks in ak.attached.values():
            for k in ks:
                labels.setdefault(k.health_id, set()).add(KeyRef(*k.labels, ak.name))

    try:
        prices = PriceTable({m: Price(p.input, p.output) for m, p in config.prices.items()})
    except ValueError as exc:
        problems.append(str(exc))
        prices = PriceTable()
    frozen_providers = MappingProxyType(providers)
    runtime = Runtime(
        config=config,
        providers=frozen_providers,
        access_keys=MappingProxyType(access_keys),
        resolver=ModelResolver(frozen_providers),
        prices=prices,
        key_labels=MappingProxyType({h: tuple(sorted(v)) for h, v in labels.items()}),
    )
    return runtime, problems
