"""Prometheus metrics of SPEC §7, on a registry the app owns (no global state).

Labels are secret-free and bounded: key ids (never key material), provider
ids, status codes, and model names folded into `other` beyond a cap.
`sidecar_key_cooling_down` is computed at scrape time from key health, so it
is exact without timers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Final, Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

OVERHEAD_BUCKETS: Final = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
)
TTFB_BUCKETS: Final = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0)
DURATION_BUCKETS: Final = (
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    300.0,
)
M = TypeVar("M", Counter, Gauge, Histogram)
MODEL_LABEL_CAP: Final = 200
OTHER: Final = "other"

#: Yields (provider, source, key_id) of every key cooling right now.
CoolingSource = Callable[[], Iterator[tuple[str, str, str]]]
#: Yields (provider, source, key_id) of every key that exists now.
KeysSource = Callable[[], Iterator[tuple[str, str, str]]]


class _CoolingCollector(Collector):
    def __init__(self, keys: KeysSource, cooling: CoolingSource) -> None:
        self._keys = keys
        self._cooling = cooling

    def collect(self) -> Iterator[GaugeMetricFamily]:
        g = GaugeMetricFamily(
            "sidecar_key_cooling_down",
            "1 while a provider key is cooling down after failures, else 0",
            labels=["provider", "source", "key_id"],
        )
        cooling = set(self._cooling())
        for labels in sorted(set(self._keys()) | cooling):
            g.add_metric(list(labels), 1.0 if labels in cooling else 0.0)
        yield g


class _Children(Generic[M]):
    """`metric.labels(*values)` memoised: the hot path does one dict lookup per update.

    Label values are bounded by design (providers, key ids, status codes,
    capped model names), so the cache is too.
    """

    __slots__ = ("_cache", "_metric")

    def __init__(self, metric: M) -> None:
        self._metric: M = metric
        self._cache: dict[tuple[str, ...], M] = {}

    def __call__(self, *labels: str) -> M:
        child = self._cache.get(labels)
        if child is None:
            child = self._cache[labels] = self._metric.labels(*labels)
        return child


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry(auto_describe=True)
        self.requests = Counter("sidecar_requests", "Requests answered, by route format, provider and status",
                                ["format", "provider", "status"], registry=r)  # fmt: skip
        self.request_duration = Histogram("sidecar_request_duration_seconds", "Whole-request time, streams included",
                                          ["format", "provider"], buckets=DURATION_BUCKETS, registry=r)  # fmt: skip
        self.key_selections = Counter("sidecar_key_selections", "Provider keys chosen for an upstream attempt",
                                      ["provider", "source", "key_id"], registry=r)  # fmt: skip
        self.upstream_attempts = Counter("sidecar_upstream_attempts", "Upstream attempts by outcome",
                                         ["provider", "source", "key_id", "outcome"], registry=r)  # fmt: skip
        self.failovers = Counter("sidecar_failovers", "Moves to the next candidate, by the failed attempt's outcome",
                                 ["provider", "reason"], registry=r)  # fmt: skip
        self.upstream_ttfb = Histogram("sidecar_upstream_ttfb_seconds", "Upstream time to response headers",
                                       ["provider"], buckets=TTFB_BUCKETS, registry=r)  # fmt: skip
        self.overhead = Histogram("sidecar_overhead_seconds", "Time spent in the sidecar itself, upstream waits excluded",
                                  ["format"], buckets=OVERHEAD_BUCKETS, registry=r)  # fmt: skip
        self.tokens = Counter(
            "sidecar_tokens", "Tokens metered", ["provider", "model", "kind"], registry=r
        )
        self.credits_spent = Counter("sidecar_credits_spent_usd", "Managed-key spend charged to access keys",
                                     ["access_key"], registry=r)  # fmt: skip
        self.credits_remaining = Gauge("sidecar_credits_remaining_usd", "Credit grant minus spend",
                                       ["access_key"], registry=r)  # fmt: skip
        self.no_key_available = Counter("sidecar_no_key_available", "Requests refused for want of a usable key",
                                        ["provider", "reason"], registry=r)  # fmt: skip
        self.vault_reloads = Counter(
            "sidecar_vault_reloads", "Config/vault loads by result", ["result"], registry=r
        )
        self.vault_last_success = Gauge("sidecar_vault_last_success_timestamp_seconds",
                                        "Unix time of the last successful config/vault load", registry=r)  # fmt: skip
        self.stream_interruptions = Counter("sidecar_stream_interruptions", "Streams that broke after the first byte",
                                            ["provider", "cause"], registry=r)  # fmt: skip
        self.ledger_pending = Gauge("sidecar_ledger_pending_spend_usd",
                                    "Spend recorded locally while the ledger was unreachable", registry=r)  # fmt: skip
        # Memoised children for everything updated per request or per attempt.
        self.c_requests = _Children(self.requests)
        self.c_duration = _Children(self.request_duration)
        self.c_selections = _Children(self.key_selections)
        self.c_attempts = _Children(self.upstream_attempts)
        self.c_failovers = _Children(self.failovers)
        self.c_ttfb = _Children(self.upstream_ttfb)
        self.c_overhead = _Children(self.overhead)
        self.c_tokens = _Children(self.tokens)
        self._models: set[str] = set()
        for result in ("ok", "error"):
            self.vault_reloads.labels(result)

    def prime(self, providers: Iterable[tuple[str, bool]], access_keys: Iterable[str]) -> None:
        """Create the series alerts rely on at 0, so `increase()` sees their first event.

        `providers`: (provider id, has managed keys); `access_keys`: names of usable access keys.
        """
        for pid, managed in providers:
            for reason in ("no_key", "all_cooling", *(("credits_exhausted",) if managed else ())):
                self.no_key_available.labels(pid, reason)
        for name in access_keys:
            self.credits_spent.labels(name)

    def watch_cooling(self, keys: KeysSource, cooling: CoolingSource) -> None:
        self.registry.register(_CoolingCollector(keys, cooling))

    def model_label(self, model: str) -> str:
        if model in self._models:
            return model
        if len(self._models) < MODEL_LABEL_CAP:
            self._models.add(model)
            return model
        return OTHER

    def reload_ok(self) -> None:
        self.vault_reloads.labels("ok").inc()
        self.vault_last_success.set(time.time())

    def reload_error(self) -> None:
        self.vault_reloads.labels("error").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
