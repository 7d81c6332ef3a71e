"""Config file (docs/reference.md#config-keys): YAML → frozen, validated dataclasses.

Stage one of two: this module only parses and validates. Every problem is
collected with its key path (`providers[2].base_url: expected an http(s)
URL`) and reported together in one `ConfigError`. Vault references stay
unresolved `Template`s here; `runtime.build_runtime` resolves them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, TypeVar, cast
from urllib.parse import urlsplit

import yaml

from sidecar.catalog import AUTHS, BUILTIN_PROVIDERS, FORMATS, MANAGED_PROVIDERS, Auth, Format
from sidecar.errors import ConfigError
from sidecar.files import MAX_CONFIG_BYTES, read_regular_file
from sidecar.ledger import parse_ledger_url
from sidecar.names import MODEL_NAME_MAX, NAME, is_model_name_text
from sidecar.secret import Secret

DEFAULT_ON_STATUS: Final = (401, 403, 408, 409, 429, 500, 502, 503, 504, 529)

_MALFORMED: Final = "malformed vault reference: expected ${secrets.get('NS', 'NAME')}"
#: An HTTP field name (RFC 9110 token), and how an error message says it.
_HEADER_NAME: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,128}")
_HEADER_NAME_RULE: Final = "letters, digits and !#$%&'*+-.^_`|~"
#: `tracing.service_name` when unset, and the instrumentation scope of the sidecar's spans.
DEFAULT_SERVICE_NAME: Final = "ai-gateway-sidecar"
#: Headers that say how a request is framed or how its connection is used: the sidecar sets
#: these itself, and a provider's `headers:` must not contradict them.
_FRAMING_HEADERS: Final = frozenset(
    {"connection", "content-length", "expect", "keep-alive", "proxy-connection", "te", "trailer",
     "transfer-encoding", "upgrade"}
)  # fmt: skip
_REF = re.compile(r"""\$\{\s*secrets\.get\(\s*(['"])([^'"]+)\1\s*,\s*(['"])([^'"]+)\3\s*\)\s*\}""")
_ID = NAME
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
#: The longest duration a setting may have: a year (366 days). Longer, or infinite, would
#: overflow the clock times the sidecar shows (a cooldown's end in `/keys`).
_MAX_DURATION_S: Final = 366 * 86400.0
#: The highest price (USD per million tokens) a model may have.
_MAX_PRICE: Final = 1_000_000_000.0


# --------------------------------------------------------------------------- values


@dataclass(frozen=True, slots=True)
class SecretRef:
    """`${secrets.get('NS', 'NAME')}`: a pointer into the vault's `secrets`."""

    namespace: str
    name: str

    def __str__(self) -> str:
        return f"secrets.get('{self.namespace}', '{self.name}')"


@dataclass(frozen=True, slots=True)
class Template:
    """A config string that may embed vault references; resolved at build time."""

    parts: tuple[str | SecretRef, ...]

    @classmethod
    def parse(cls, raw: str) -> Template:
        parts: list[str | SecretRef] = []
        pos = 0
        for m in _REF.finditer(raw):
            if m.start() > pos:
                parts.append(raw[pos : m.start()])
            parts.append(SecretRef(m.group(2), m.group(4)))
            pos = m.end()
        if pos < len(raw):
            parts.append(raw[pos:])
        return cls(tuple(parts))

    @property
    def refs(self) -> tuple[SecretRef, ...]:
        return tuple(p for p in self.parts if isinstance(p, SecretRef))

    @property
    def is_literal(self) -> bool:
        return not self.refs

    @property
    def malformed(self) -> bool:
        """A `${` left in the literal text: a reference with a typo, which must not go out as is."""
        return any(isinstance(p, str) and "${" in p for p in self.parts)

    def render(self, resolve: Callable[[SecretRef], Secret]) -> Secret:
        return Secret("".join(p if isinstance(p, str) else resolve(p).reveal() for p in self.parts))

    def __repr__(self) -> str:
        # Literal parts may be inline secrets in a careless config; never show them.
        return f"Template(refs={[str(r) for r in self.refs]})"


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class KeyConfig:
    """One provider key in `providers[].api_keys` or `managed.<provider>`."""

    id: str | None
    value: Template


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    id: str
    base_url: str
    format: Format
    auth: Auth
    builtin: bool
    models: tuple[str, ...] = ()
    api_keys: tuple[KeyConfig, ...] = ()
    headers: tuple[tuple[str, Template], ...] = ()
    query_params: tuple[tuple[str, str], ...] = ()
    disabled: bool = False
    #: whether its models continue a partial assistant message (stream resumption);
    #: None: the format's default (Anthropic messages do, OpenAI-format models do not)
    prefill: bool | None = None
    #: per-model overrides of `prefill` (`models: [{id: ..., prefill: true}]`)
    model_prefill: tuple[tuple[str, bool], ...] = ()


@dataclass(frozen=True, slots=True)
class VaultSettings:
    path: Path
    private_key_file: Path | None


@dataclass(frozen=True, slots=True)
class Limits:
    max_body_bytes: int = 32 * 1024 * 1024
    max_connections: int = 1024


@dataclass(frozen=True, slots=True)
class Timeouts:
    """docs/reference.md#timeouts. A non-streaming answer sends nothing until the whole
    generation is done, so `per_request` matches what the official SDKs allow (10 min);
    streams are bounded by `first_token` and then `stream_idle` instead."""

    per_request: float = 600.0
    first_token: float = 30.0
    stream_idle: float = 60.0
    total: float = 900.0
    client_header: float = 10.0
    client_body: float = 60.0
    keepalive: float = 60.0


@dataclass(frozen=True, slots=True)
class Cooldown:
    rate_limited: float = 30.0
    auth_failed: float = 300.0
    server_error: float = 15.0
    server_error_threshold: int = 3


@dataclass(frozen=True, slots=True)
class Retry:
    """Trying the same candidate again before moving on (docs/reference.md#failover-and-key-health)."""

    attempts: int = 1  # 0 turns it off
    backoff: float = 0.25
    max_wait: float = 3.0


@dataclass(frozen=True, slots=True)
class Failover:
    max_attempts: int = 6
    on_status: frozenset[int] = frozenset(DEFAULT_ON_STATUS)
    cooldown: Cooldown = field(default_factory=Cooldown)
    #: upstream error codes (beyond the built-in ones) that mean "another model could answer"
    next_model_on_codes: frozenset[str] = frozenset()
    retry: Retry = field(default_factory=Retry)
    #: continue a stream that broke after its first byte from a candidate that accepts prefill
    resume: bool = True


@dataclass(frozen=True, slots=True)
class LedgerConfig:
    url: str = field(repr=False)  # a Redis URL may hold a password
    on_unavailable: Literal["fail_closed", "fail_open"] = "fail_closed"


@dataclass(frozen=True, slots=True)
class SharedStateConfig:
    """`shared_state:`: the Redis the replicas share key health and rate-limit counters on."""

    url: str = field(repr=False)  # may hold a password
    #: bounds every Redis call (connect, each read); past it the replica runs on local state
    timeout: float = 0.5


@dataclass(frozen=True, slots=True)
class TracingConfig:
    """`tracing:`: OTLP/HTTP trace export (docs/reference.md#traces); absent, nothing is traced."""

    #: the collector's OTLP/HTTP traces URL; one given without a path gets `/v1/traces`. Not
    #: in the repr: its query may carry a token (logs show only its host and port)
    endpoint: str = field(repr=False)
    service_name: str = DEFAULT_SERVICE_NAME
    #: share of new traces kept; a caller's `traceparent` decides for its own trace
    sample_ratio: float = 1.0
    #: sent with every export (a collector's token may be one): never shown
    headers: tuple[tuple[str, Secret], ...] = field(default=(), repr=False)
    #: bounds each export request (the SDK retries within it)
    timeout: float = 10.0


@dataclass(frozen=True, slots=True)
class PriceConfig:
    input: float
    output: float


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = "info"
    access_log: bool = True


@dataclass(frozen=True, slots=True)
class Config:
    path: Path
    listen: HostPort
    admin_listen: HostPort
    vault: VaultSettings
    shutdown_grace: float
    passthrough: bool
    only_allow_configured_providers: bool
    only_allow_configured_models: bool
    limits: Limits
    timeouts: Timeouts
    failover: Failover
    providers: tuple[ProviderConfig, ...]
    managed: Mapping[str, tuple[KeyConfig, ...]]
    ledger: LedgerConfig
    prices: Mapping[str, PriceConfig]
    log: LogConfig
    reload_interval: float
    #: `fallbacks:` (model name or glob → fallback models), in config order
    fallbacks: tuple[tuple[str, tuple[str, ...]], ...] = ()
    shared_state: SharedStateConfig | None = None
    tracing: TracingConfig | None = None

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    def provider(self, provider_id: str) -> ProviderConfig | None:
        return next((p for p in self.providers if p.id == provider_id), None)

    def secret_refs(self) -> list[tuple[str, SecretRef]]:
        """Every vault reference with the key path it appears at."""
        out: list[tuple[str, SecretRef]] = []
        for i, p in enumerate(self.providers):
            for j, k in enumerate(p.api_keys):
                out += [(f"providers[{i}].api_keys[{j}].value", r) for r in k.value.refs]
            for name, tmpl in p.headers:
                out += [(f"providers[{i}].headers.{name}", r) for r in tmpl.refs]
        for prov, keys in self.managed.items():
            for j, k in enumerate(keys):
                out += [(f"managed.{prov}[{j}].value", r) for r in k.value.refs]
        return out


# --------------------------------------------------------------------------- parsing


def parse_duration(value: object) -> float:
    """`250ms`, `30s`, `5m`, `1h` or a bare number of seconds → seconds; at most a year
    (`_MAX_DURATION_S`). Not NaN: it passes every comparison, and a NaN deadline never fires."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like 250ms, 30s or 5m")
    seconds: int | float
    if isinstance(value, int | float):
        seconds = value  # (compared before `float()`: an integer may be too large for one)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise ValueError("expected a duration like 250ms, 30s or 5m")
    if not 0 <= seconds <= _MAX_DURATION_S:  # (also NaN)
        raise ValueError("expected a non-negative duration of at most a year (8784h)")
    return float(seconds)


def parse_host_port(value: object) -> HostPort:
    if not isinstance(value, str) or ":" not in value:
        raise ValueError("expected host:port, e.g. 127.0.0.1:8080")
    host, _, port_s = value.rpartition(":")
    host = host.strip("[]")
    if not host or not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise ValueError("expected host:port, e.g. 127.0.0.1:8080")
    return HostPort(host, int(port_s))


T = TypeVar("T")


class _Reader:
    """Walks the YAML tree, collecting every problem with its key path."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def fail(self, path: str, msg: str) -> None:
        self.problems.append(f"{path}: {msg}")

    def section(
        self, data: Mapping[str, Any], key: str, path: str, allowed: set[str]
    ) -> Mapping[str, Any]:
        value = data.get(key)
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.fail(path, "expected a mapping")
            return {}
        self.unknown(value, path, allowed)
        return value

    def unknown(self, data: Mapping[str, Any], path: str, allowed: set[str]) -> None:
        for key in data:
            if key not in allowed:
                where = f"{path}.{key}" if path else str(key)
                self.fail(where, f"unknown key (expected one of: {', '.join(sorted(allowed))})")

    def get(
        self, data: Mapping[str, Any], key: str, path: str, conv: Callable[[Any], T], default: T
    ) -> T:
        if key not in data or data[key] is None:
            return default
        try:
            return conv(data[key])
        except (ValueError, TypeError) as exc:
            self.fail(path, str(exc))
            return default


def _bool(v: object) -> bool:
    if not isinstance(v, bool):
        raise ValueError("expected true or false")
    return v


def _pos_int(v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError("expected a positive integer")
    return v


def _non_neg_int(v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError("expected a whole number, 0 or more")
    return v


def _str(v: object) -> str:
    if not isinstance(v, str) or not v:
        raise ValueError("expected a non-empty string")
    return v


def _http_url(v: object) -> str:
    if not isinstance(v, str):
        raise ValueError("expected an http(s) URL")
    parts = urlsplit(v)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("expected an http(s) URL")
    # Every part of base_url decides where keys go: nothing in it may be dropped or ambiguous.
    if "@" in parts.netloc or parts.query or parts.fragment or "?" in v or "#" in v:
        raise ValueError(
            "expected an http(s) URL without user info, query or fragment (use query_params)"
        )
    try:
        parts.port  # noqa: B018 -- raises ValueError for a port that is no number
    except ValueError:
        raise ValueError("expected an http(s) URL with a numeric port") from None
    return v.rstrip("/")


def _positive_duration(v: object) -> float:
    seconds = parse_duration(v)
    if seconds <= 0:
        raise ValueError("expected a duration above 0, like 250ms, 30s or 5m")
    return seconds


def _reload_interval(v: object) -> float:
    seconds = parse_duration(v)
    if seconds < 0.1:
        raise ValueError("expected a duration of at least 100ms")
    return seconds


def _price(v: object) -> float:
    """USD per million tokens: a number from 0 to `_MAX_PRICE` (not NaN, not infinite: a
    request's cost, in micro-USD, must fit the ledger's 64-bit integers)."""
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= _MAX_PRICE:
        raise ValueError(f"expected a non-negative number of at most {_MAX_PRICE:.0f}")
    return float(v)


def _choice(options: tuple[str, ...]) -> Callable[[object], str]:
    def conv(v: object) -> str:
        if v not in options:
            raise ValueError(f"expected one of: {', '.join(options)}")
        return str(v)

    return conv


def _status_list(v: object) -> frozenset[int]:
    if not isinstance(v, list) or not all(
        isinstance(s, int) and not isinstance(s, bool) and 100 <= s <= 599 for s in v
    ):
        raise ValueError("expected a list of HTTP status codes")
    return frozenset(v)


_TOP_KEYS: Final = {
    "listen", "admin_listen", "vault", "shutdown_grace", "passthrough",
    "only_allow_configured_providers", "only_allow_configured_models", "limits",
    "timeouts", "failover", "providers", "managed", "ledger", "prices", "log",
    "reload_interval", "fallbacks", "shared_state", "tracing",
}  # fmt: skip
#: Fallback models per entry of `fallbacks:` (a request's `models` array has its own cap).
MAX_FALLBACKS: Final = 16
_PROVIDER_KEYS: Final = {
    "id", "base_url", "format", "auth", "models", "api_keys", "headers", "query_params", "disabled",
    "prefill",
}  # fmt: skip


def _keys(r: _Reader, raw: object, path: str) -> tuple[KeyConfig, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        r.fail(path, "expected a list of {id, value}")
        return ()
    keys: list[KeyConfig] = []
    seen: set[str] = set()
    for j, item in enumerate(raw):
        kp = f"{path}[{j}]"
        if not isinstance(item, Mapping):
            r.fail(kp, "expected a mapping with `value` (and optional `id`)")
            continue
        r.unknown(item, kp, {"id", "value"})
        key_id = item.get("id")
        if key_id is not None and (not isinstance(key_id, str) or not _ID.match(key_id)):
            r.fail(f"{kp}.id", "expected an id of letters, digits, '.', '_' or '-'")
            key_id = None
        elif key_id is not None:
            if key_id in seen:
                r.fail(f"{kp}.id", f"duplicate key id {key_id!r}")
            seen.add(key_id)
        value = item.get("value")
        if not isinstance(value, str) or not value:
            r.fail(f"{kp}.value", "expected a vault reference like ${secrets.get('NS', 'NAME')}")
            continue
        tmpl = Template.parse(value)
        if tmpl.malformed:
            r.fail(f"{kp}.value", _MALFORMED)
            continue
        if tmpl.is_literal:
            r.fail(f"{kp}.value", "expected a vault reference like ${secrets.get('NS', 'NAME')}; "
                   "provider keys are never written in the config in clear")  # fmt: skip
            continue
        keys.append(KeyConfig(key_id, tmpl))
    return tuple(keys)


def _models(
    r: _Reader, raw: object, path: str
) -> tuple[tuple[str, ...], tuple[tuple[str, bool], ...]]:
    """Model ids, and the per-model `prefill` settings given as `{id: ..., prefill: ...}`."""
    if raw is None:
        return (), ()
    if not isinstance(raw, list):
        r.fail(path, "expected a list of model ids")
        return (), ()
    out: list[str] = []
    prefill: list[tuple[str, bool]] = []
    for j, m in enumerate(raw):
        name = m.get("id") if isinstance(m, Mapping) else m
        if not isinstance(name, str) or not name:
            r.fail(f"{path}[{j}]", "expected a model id (a string or {id: ...})")
            continue
        out.append(name)
        if isinstance(m, Mapping):
            r.unknown(m, f"{path}[{j}]", {"id", "prefill"})
            if "prefill" in m:
                prefill.append((name, r.get(m, "prefill", f"{path}[{j}].prefill", _bool, False)))
    return tuple(out), tuple(prefill)


def _code_list(v: object) -> frozenset[str]:
    if not isinstance(v, list) or not all(
        isinstance(c, str) and c and c.isascii() and c.isprintable() for c in v
    ):
        raise ValueError("expected a list of error codes (strings)")
    return frozenset(v)


def _fallbacks(r: _Reader, raw: object) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """`fallbacks: {model-or-glob: [model, ...]}`: names are printable ASCII, lists bounded."""
    if raw is None:
        return ()
    if not isinstance(raw, Mapping):
        r.fail("fallbacks", "expected a mapping of model name (or glob) to a list of models")
        return ()
    out: list[tuple[str, tuple[str, ...]]] = []
    for pattern, models in raw.items():
        path = f"fallbacks.{pattern}"
        if not _model_name_ok(pattern):
            r.fail(path, "expected a model name or glob of printable ASCII")
            continue
        if not isinstance(models, list) or not models or len(models) > MAX_FALLBACKS:
            r.fail(path, f"expected a list of 1 to {MAX_FALLBACKS} model names")
            continue
        bad = [j for j, m in enumerate(models) if not _model_name_ok(m)]
        for j in bad:
            r.fail(f"{path}[{j}]", "expected a model name of printable ASCII")
        if not bad:
            out.append((pattern, tuple(models)))
    return tuple(out)


def _model_name_ok(name: object) -> bool:
    return isinstance(name, str) and len(name) <= MODEL_NAME_MAX and is_model_name_text(name)


def _str_map(r: _Reader, raw: object, path: str) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        r.fail(path, "expected a mapping of names to strings")
        return {}
    out: dict[str, str] = {}
    for k, v in raw.items():
        if not isinstance(v, str | int | float) or isinstance(v, bool):
            r.fail(f"{path}.{k}", "expected a string")
            continue
        out[str(k)] = str(v)
    return out


def _provider(r: _Reader, raw: object, i: int) -> ProviderConfig | None:
    path = f"providers[{i}]"
    if not isinstance(raw, Mapping):
        r.fail(path, "expected a mapping with at least `id`")
        return None
    r.unknown(raw, path, _PROVIDER_KEYS)
    pid = raw.get("id")
    if not isinstance(pid, str) or not _ID.match(pid):
        r.fail(f"{path}.id", "expected a provider id of letters, digits, '.', '_' or '-'")
        return None
    builtin = BUILTIN_PROVIDERS.get(pid)
    base_url = r.get(
        raw, "base_url", f"{path}.base_url", _http_url, builtin.base_url if builtin else ""
    )
    if not base_url and "base_url" not in raw:
        need = (
            "for azure: https://RESOURCE.openai.azure.com"
            if builtin
            else "required for a custom provider"
        )
        r.fail(f"{path}.base_url", f"expected an http(s) URL ({need})")
    fmt = r.get(
        raw, "format", f"{path}.format", _choice(FORMATS), builtin.format if builtin else ""
    )
    if not fmt and "format" not in raw:
        r.fail(
            f"{path}.format",
            "expected one of: openai, anthropic, gemini (required for a custom provider)",
        )
    auth: str = r.get(
        raw, "auth", f"{path}.auth", _choice(AUTHS), str(builtin.auth if builtin else "bearer")
    )
    headers = {
        k: Template.parse(v) for k, v in _str_map(r, raw.get("headers"), f"{path}.headers").items()
    }
    for k, tmpl in headers.items():
        if not _HEADER_NAME.fullmatch(k):
            r.fail(f"{path}.headers.{k}", f"expected a header name ({_HEADER_NAME_RULE})")
        elif k.lower() in _FRAMING_HEADERS:
            r.fail(f"{path}.headers.{k}", "the sidecar frames each request itself: this header "
                   "would contradict it on a kept-alive connection")  # fmt: skip
        if tmpl.malformed:
            r.fail(f"{path}.headers.{k}", _MALFORMED)
    models, model_prefill = _models(r, raw.get("models"), f"{path}.models")
    return ProviderConfig(
        id=pid,
        base_url=base_url,
        format=cast(Format, fmt or "openai"),
        auth=cast(Auth, auth),
        builtin=builtin is not None,
        models=models,
        model_prefill=model_prefill,
        prefill=r.get(raw, "prefill", f"{path}.prefill", _bool, None),
        api_keys=_keys(r, raw.get("api_keys"), f"{path}.api_keys"),
        headers=tuple(headers.items()),
        query_params=tuple(_str_map(r, raw.get("query_params"), f"{path}.query_params").items()),
        disabled=r.get(raw, "disabled", f"{path}.disabled", _bool, False),
    )


def _ledger_url(v: object) -> str:
    if not isinstance(v, str):
        raise ValueError(
            "expected sqlite:///relative.db, sqlite:////absolute.db or redis://host:6379/0"
        )
    parse_ledger_url(v)  # the parser `open_ledger` uses: what passes here also opens
    return v


def _redis_url(v: object) -> str:
    if not isinstance(v, str) or parse_ledger_url(v)[0] != "redis":
        shown = (
            f"a {v.partition('://')[0]}:// URL" if isinstance(v, str) and "://" in v else "no URL"
        )
        raise ValueError(f"expected redis://[:password@]host:port/db, got {shown}")
    return v


def _redis_timeout(v: object) -> float:
    seconds = parse_duration(v)
    if not 0.01 <= seconds <= 5:
        raise ValueError("expected a duration from 10ms to 5s")
    return seconds


def _shared_state(r: _Reader, data: Mapping[str, Any]) -> SharedStateConfig | None:
    if data.get("shared_state") is None:
        return None
    raw = r.section(data, "shared_state", "shared_state", {"url", "timeout"})
    if not isinstance(data["shared_state"], Mapping):
        return None
    url = r.get(raw, "url", "shared_state.url", _redis_url, "")
    if not url:
        if "url" not in raw:
            r.fail("shared_state.url", "required (redis://host:6379/0)")
        return None
    return SharedStateConfig(
        url=url, timeout=r.get(raw, "timeout", "shared_state.timeout", _redis_timeout, 0.5)
    )


_TRACING_MAX_HEADERS: Final = 32
_SERVICE_NAME_MAX: Final = 128


def _otlp_url(v: object) -> str:
    """An OTLP/HTTP traces URL; without a path, the standard `/v1/traces` is added."""
    expected = "expected an http(s) URL like http://otel-collector:4318/v1/traces"
    if not isinstance(v, str) or not v.isascii() or not v.isprintable():
        raise ValueError(expected)
    parts = urlsplit(v)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(expected)
    if "@" in parts.netloc or parts.fragment or "#" in v:
        raise ValueError(f"{expected}, without user info or fragment (credentials go in headers)")
    try:
        parts.port  # noqa: B018 -- raises ValueError for a port that is no number
    except ValueError:
        raise ValueError(f"{expected}, with a numeric port") from None
    if parts.path in ("", "/") and not parts.query:
        return v.rstrip("/") + "/v1/traces"
    return v


def _service_name(v: object) -> str:
    if not isinstance(v, str) or not v or len(v) > _SERVICE_NAME_MAX or not v.isprintable():
        raise ValueError(f"expected a printable name of 1 to {_SERVICE_NAME_MAX} characters")
    return v


def _ratio(v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= 1:
        raise ValueError("expected a number from 0 to 1")
    return float(v)


def _export_timeout(v: object) -> float:
    seconds = parse_duration(v)
    if not 0.1 <= seconds <= 60:
        raise ValueError("expected a duration from 100ms to 60s")
    return seconds


def _tracing_headers(r: _Reader, raw: object) -> tuple[tuple[str, Secret], ...]:
    """Literal header values only: their text is never echoed in a problem."""
    if raw is None:
        return ()
    if not isinstance(raw, Mapping) or len(raw) > _TRACING_MAX_HEADERS:
        r.fail("tracing.headers", f"expected a mapping of at most {_TRACING_MAX_HEADERS} "
               "header names to strings")  # fmt: skip
        return ()
    out: list[tuple[str, Secret]] = []
    for name, value in raw.items():
        if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
            r.fail("tracing.headers", f"expected header names of {_HEADER_NAME_RULE}")
            continue
        path = f"tracing.headers.{name}"
        if not isinstance(value, str) or not value:
            r.fail(path, "expected a non-empty string")
        elif "${" in value:
            r.fail(path, "vault references are not read here: put the header in the "
                   "OTEL_EXPORTER_OTLP_TRACES_HEADERS environment variable (from a Secret)")  # fmt: skip
        elif not value.isascii() or not value.isprintable():
            r.fail(path, "expected printable ASCII (no line breaks)")
        else:
            out.append((name.lower(), Secret(value)))
    return tuple(out)


def _tracing(r: _Reader, data: Mapping[str, Any]) -> TracingConfig | None:
    if data.get("tracing") is None:
        return None
    raw = r.section(data, "tracing", "tracing",
                    {"endpoint", "service_name", "sample_ratio", "headers", "timeout"})  # fmt: skip
    if not isinstance(data["tracing"], Mapping):
        return None
    endpoint = r.get(raw, "endpoint", "tracing.endpoint", _otlp_url, "")
    headers = _tracing_headers(r, raw.get("headers"))
    service = r.get(raw, "service_name", "tracing.service_name", _service_name,
                    DEFAULT_SERVICE_NAME)  # fmt: skip
    ratio = r.get(raw, "sample_ratio", "tracing.sample_ratio", _ratio, 1.0)
    timeout = r.get(raw, "timeout", "tracing.timeout", _export_timeout, 10.0)
    if not endpoint:
        if "endpoint" not in raw:
            r.fail("tracing.endpoint", "required (http://otel-collector:4318/v1/traces)")
        return None
    return TracingConfig(endpoint, service, ratio, headers, timeout)


def parse_config(data: object, path: Path) -> Config:
    """Validate a parsed YAML document. Raises `ConfigError` listing every problem."""
    r = _Reader()
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(["(top level): expected a mapping of config keys"], str(path))
    r.unknown(data, "", _TOP_KEYS)
    base = path.parent

    listen = r.get(data, "listen", "listen", parse_host_port, HostPort("127.0.0.1", 8080))
    admin = r.get(
        data, "admin_listen", "admin_listen", parse_host_port, HostPort("127.0.0.1", 9090)
    )
    if listen == admin and listen.port != 0:
        r.fail("admin_listen", "must differ from `listen` (the admin port is never the proxy port)")

    v = r.section(data, "vault", "vault", {"path", "private_key_file"})
    vault_path = r.get(v, "path", "vault.path", _str, "vault.json")
    pk = r.get(v, "private_key_file", "vault.private_key_file", _str, "sidecar.key")
    vault = VaultSettings(base / vault_path, base / pk)

    lim = r.section(data, "limits", "limits", {"max_body_bytes", "max_connections"})
    limits = Limits(
        max_body_bytes=r.get(
            lim, "max_body_bytes", "limits.max_body_bytes", _pos_int, 32 * 1024 * 1024
        ),
        max_connections=r.get(lim, "max_connections", "limits.max_connections", _pos_int, 1024),
    )

    t = r.section(data, "timeouts", "timeouts", {"per_request", "first_token", "stream_idle",
                  "total", "client_header", "client_body", "keepalive"})  # fmt: skip
    timeouts = Timeouts(
        per_request=r.get(t, "per_request", "timeouts.per_request", _positive_duration, 600.0),
        first_token=r.get(t, "first_token", "timeouts.first_token", _positive_duration, 30.0),
        stream_idle=r.get(t, "stream_idle", "timeouts.stream_idle", _positive_duration, 60.0),
        total=r.get(t, "total", "timeouts.total", _positive_duration, 900.0),
        client_header=r.get(t, "client_header", "timeouts.client_header", _positive_duration, 10.0),
        client_body=r.get(t, "client_body", "timeouts.client_body", _positive_duration, 60.0),
        keepalive=r.get(t, "keepalive", "timeouts.keepalive", _positive_duration, 60.0),
    )

    f = r.section(data, "failover", "failover",
                  {"max_attempts", "on_status", "cooldown", "next_model_on_codes", "retry",
                   "resume"})  # fmt: skip
    rt = r.section(f, "retry", "failover.retry", {"attempts", "backoff", "max_wait"})
    c = r.section(f, "cooldown", "failover.cooldown",
                  {"rate_limited", "auth_failed", "server_error", "server_error_threshold"})  # fmt: skip
    failover = Failover(
        retry=Retry(
            attempts=r.get(rt, "attempts", "failover.retry.attempts", _non_neg_int, 1),
            backoff=r.get(rt, "backoff", "failover.retry.backoff", parse_duration, 0.25),
            max_wait=r.get(rt, "max_wait", "failover.retry.max_wait", parse_duration, 3.0),
        ),
        next_model_on_codes=r.get(
            f, "next_model_on_codes", "failover.next_model_on_codes", _code_list, frozenset()
        ),
        max_attempts=r.get(f, "max_attempts", "failover.max_attempts", _pos_int, 6),
        resume=r.get(f, "resume", "failover.resume", _bool, True),
        on_status=r.get(
            f, "on_status", "failover.on_status", _status_list, frozenset(DEFAULT_ON_STATUS)
        ),
        cooldown=Cooldown(
            rate_limited=r.get(
                c, "rate_limited", "failover.cooldown.rate_limited", parse_duration, 30.0
            ),
            auth_failed=r.get(
                c, "auth_failed", "failover.cooldown.auth_failed", parse_duration, 300.0
            ),
            server_error=r.get(
                c, "server_error", "failover.cooldown.server_error", parse_duration, 15.0
            ),
            server_error_threshold=r.get(
                c, "server_error_threshold", "failover.cooldown.server_error_threshold", _pos_int, 3
            ),
        ),
    )

    providers: list[ProviderConfig] = []
    raw_providers = data.get("providers") or []
    if not isinstance(raw_providers, list):
        r.fail("providers", "expected a list of providers")
        raw_providers = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(raw_providers):
        p = _provider(r, raw, i)
        if p is None:
            continue
        if p.id in seen:
            r.fail(
                f"providers[{i}].id",
                f"duplicate provider {p.id!r} (first at providers[{seen[p.id]}])",
            )
            continue
        seen[p.id] = i
        providers.append(p)

    managed: dict[str, tuple[KeyConfig, ...]] = {}
    m = data.get("managed") or {}
    if not isinstance(m, Mapping):
        r.fail("managed", "expected a mapping of provider to keys")
        m = {}
    for prov, keys in m.items():
        if prov not in MANAGED_PROVIDERS:
            r.fail(
                f"managed.{prov}",
                f"managed keys exist only for built-in providers ({', '.join(MANAGED_PROVIDERS)})",
            )
            continue
        managed[prov] = _keys(r, keys, f"managed.{prov}")

    lg = r.section(data, "ledger", "ledger", {"url", "on_unavailable"})
    ledger = LedgerConfig(
        url=r.get(lg, "url", "ledger.url", _ledger_url, "sqlite:///ledger.db"),
        on_unavailable=cast(
            Any,
            r.get(
                lg,
                "on_unavailable",
                "ledger.on_unavailable",
                _choice(("fail_closed", "fail_open")),
                "fail_closed",
            ),
        ),
    )

    prices: dict[str, PriceConfig] = {}
    pr = data.get("prices") or {}
    if not isinstance(pr, Mapping):
        r.fail("prices", "expected a mapping of model to {input, output}")
        pr = {}
    for model, price in pr.items():
        pp = f"prices.{model}"
        if not isinstance(price, Mapping):
            r.fail(pp, "expected {input: USD per 1M tokens, output: USD per 1M tokens}")
            continue
        r.unknown(price, pp, {"input", "output"})
        prices[str(model)] = PriceConfig(
            input=r.get(price, "input", f"{pp}.input", _price, 0.0),
            output=r.get(price, "output", f"{pp}.output", _price, 0.0),
        )

    lc = r.section(data, "log", "log", {"level", "access_log"})
    log = LogConfig(
        level=r.get(
            lc, "level", "log.level", _choice(("debug", "info", "warning", "error")), "info"
        ),
        access_log=r.get(lc, "access_log", "log.access_log", _bool, True),
    )

    config = Config(
        path=path,
        listen=listen,
        admin_listen=admin,
        vault=vault,
        shutdown_grace=r.get(data, "shutdown_grace", "shutdown_grace", parse_duration, 25.0),
        passthrough=r.get(data, "passthrough", "passthrough", _bool, False),
        only_allow_configured_providers=r.get(
            data, "only_allow_configured_providers", "only_allow_configured_providers", _bool, False
        ),
        only_allow_configured_models=r.get(
            data, "only_allow_configured_models", "only_allow_configured_models", _bool, False
        ),
        limits=limits,
        timeouts=timeouts,
        failover=failover,
        providers=tuple(providers),
        managed=managed,
        ledger=ledger,
        prices=prices,
        log=log,
        reload_interval=r.get(data, "reload_interval", "reload_interval", _reload_interval, 2.0),
        fallbacks=_fallbacks(r, data.get("fallbacks")),
        shared_state=_shared_state(r, data),
        tracing=_tracing(r, data),
    )
    if r.problems:
        raise ConfigError(r.problems, str(path))
    return config


def load_config(path: Path) -> Config:
    """Read and validate a config file. Raises `ConfigError` (never a YAML/OS exception)."""
    path = Path(path).absolute()
    return parse_config_text(read_config_text(path), path)


def read_config_text(path: Path) -> str:
    """A config file's text. Only a regular file of at most `MAX_CONFIG_BYTES` is read (a
    FIFO or device at the path is refused at once instead of blocking); a problem reading
    it is a `ConfigError` that names the path."""
    try:
        return read_regular_file(path, limit=MAX_CONFIG_BYTES).decode("utf-8")
    except FileNotFoundError:
        raise ConfigError([f"cannot read file {path}: no such file"], str(path)) from None
    except OSError as exc:
        raise ConfigError([f"cannot read file {path}: {exc.strerror}"], str(path)) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"byte {exc.start}: not UTF-8 text"], str(path)) from None


def parse_config_text(text: str, path: Path) -> Config:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(document)"
        raise ConfigError(
            [f"{where}: not valid YAML ({getattr(exc, 'problem', 'parse error')})"], str(path)
        ) from None
    return parse_config(data, path)
