"""Prometheus metrics (docs/reference.md#metrics), on a registry the app owns (no global state).

Labels are secret-free and bounded: key ids (never key material), provider
ids, access key names, status codes, and model names folded into `other` beyond a cap.
`sidecar_key_cooling_down` is computed at scrape time from key health, so it
is exact without timers.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from itertools import accumulate
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
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
MODEL_LABEL_CAP: Final = 200
OTHER: Final = "other"
#: Values of `sidecar_ledger_errors_total{operation}`.
LEDGER_OPERATIONS: Final = ("read", "write")

#: Yields (provider, source, key_id, access_key) of every key cooling right now.
CoolingSource = Callable[[], Iterator[tuple[str, str, str, str]]]
#: Yields (provider, source, key_id, access_key) of every key that exists now.
KeysSource = Callable[[], Iterator[tuple[str, str, str, str]]]
#: Yields ((provider, source, key_id, kind), remaining) of every key with a current quota reading.
QuotaSource = Callable[[], Iterator[tuple[tuple[str, str, str, str], int]]]


class _CoolingCollector(Collector):
    def __init__(self, keys: KeysSource, cooling: CoolingSource) -> None:
        self._keys = keys
        self._cooling = cooling

    def collect(self) -> Iterator[GaugeMetricFamily]:
        g = GaugeMetricFamily(
            "sidecar_key_cooling_down",
            "1 while a provider key is cooling down after failures, else 0",
            labels=["provider", "source", "key_id", "access_key"],
        )
        cooling = set(self._cooling())
        for labels in sorted(set(self._keys()) | cooling):
            g.add_metric(list(labels), 1.0 if labels in cooling else 0.0)
        yield g


class _QuotaCollector(Collector):
    def __init__(self, quota: QuotaSource) -> None:
        self._quota = quota

    def collect(self) -> Iterator[GaugeMetricFamily]:
        g = GaugeMetricFamily(
            "sidecar_key_quota_remaining",
            "What the provider's rate-limit headers last said is left for a key (the lowest "
            "across its models), while that reading is current",
            labels=["provider", "source", "key_id", "kind"],
        )
        for labels, remaining in sorted(self._quota()):
            g.add_metric(list(labels), float(remaining))
        yield g


class _FastCounter(Collector):
    """A labelled counter for the request path: `family.inc(labels)` is one dict update.

    prometheus-client's own children take a lock and check state on every update; the
    sidecar updates a dozen series per request on one event loop, so these keep plain
    numbers and are rendered into a `CounterMetricFamily` at scrape time. One call per
    update, no child object: a Python call is a thousand instructions on the request path.
    """

    def __init__(self, name: str, doc: str, labels: list[str], registry: CollectorRegistry) -> None:
        self._name, self._doc, self._labels = name, doc, labels
        self._values: dict[tuple[str, ...], float] = {}
        registry.register(self)

    def inc(self, labels: tuple[str, ...], amount: float = 1.0) -> None:
        """Add `amount` to the series `labels` (one value per label name, in order)."""
        try:
            self._values[labels] += amount
        except KeyError:
            self._values[labels] = amount

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(self._name, self._doc, labels=self._labels)
        for labels, value in self._values.items():
            family.add_metric(list(labels), value)
        yield family

    def describe(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self._name, self._doc, labels=self._labels)


class _FastHistogram(Collector):
    """A labelled histogram for the request path: `observe` is a bisect and two adds."""

    def __init__(
        self,
        name: str,
        doc: str,
        labels: list[str],
        buckets: tuple[float, ...],
        registry: CollectorRegistry,
    ) -> None:
        self._name, self._doc, self._labels, self._bounds = name, doc, labels, buckets
        self._edges = [repr(float(b)) for b in buckets] + ["+Inf"]
        self._series: dict[tuple[str, ...], tuple[list[int], list[float]]] = {}
        registry.register(self)

    def observe(self, labels: tuple[str, ...], value: float) -> None:
        """Count `value` in the series `labels`: a bisect and two adds."""
        series = self._series.get(labels)
        if series is None:
            series = self._series[labels] = ([0] * (len(self._bounds) + 1), [0.0])
        series[0][bisect_left(self._bounds, value)] += 1  # per bucket; the last is +Inf
        series[1][0] += value

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self._name, self._doc, labels=self._labels)
        for labels, (counts, total) in self._series.items():
            cumulative = list(accumulate(counts))
            family.add_metric(
                list(labels), list(zip(self._edges, cumulative, strict=True)), total[0]
            )
        yield family

    def describe(self) -> Iterator[HistogramMetricFamily]:
        yield HistogramMetricFamily(self._name, self._doc, labels=self._labels)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry(auto_describe=True)
        # Updated per request or per attempt: plain numbers, rendered at scrape time.
        self.requests = _FastCounter("sidecar_requests", "Requests answered, by route format, provider and status",
                                     ["format", "provider", "status"], r)  # fmt: skip
        self.request_duration = _FastHistogram("sidecar_request_duration_seconds", "Whole-request time, streams included",
                                               ["format", "provider"], DURATION_BUCKETS, r)  # fmt: skip
        self.key_selections = _FastCounter("sidecar_key_selections", "Provider keys chosen for an upstream attempt",
                                           ["provider", "source", "key_id"], r)  # fmt: skip
        self.upstream_attempts = _FastCounter("sidecar_upstream_attempts", "Upstream attempts by outcome",
                                              ["provider", "source", "key_id", "outcome"], r)  # fmt: skip
        self.failovers = _FastCounter("sidecar_failovers", "Moves to the next candidate, by the failed attempt's outcome",
                                      ["provider", "reason"], r)  # fmt: skip
        self.upstream_ttfb = _FastHistogram("sidecar_upstream_ttfb_seconds", "Upstream time to response headers",
                                            ["provider"], TTFB_BUCKETS, r)  # fmt: skip
        self.overhead = _FastHistogram("sidecar_overhead_seconds", "Time spent in the sidecar itself, upstream waits excluded",
                                       ["format"], OVERHEAD_BUCKETS, r)  # fmt: skip
        self.tokens = _FastCounter(
            "sidecar_tokens", "Tokens metered", ["provider", "model", "kind"], r
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
        self.stream_resumptions = Counter("sidecar_stream_resumptions",
                                          "Broken streams continued from another candidate (ok), or ended "
                                          "with an in-band error (failed, not_resumable)",
                                          ["provider", "result"], registry=r)  # fmt: skip
        self.ledger_pending = Gauge("sidecar_ledger_pending_spend_usd",
                                    "Spend recorded locally while the ledger was unreachable", registry=r)  # fmt: skip
        self.ledger_up = Gauge("sidecar_ledger_up",
                               "0 while the credits ledger fails or spend waits to be written; 1 otherwise "
                               "(also when no ledger is in use)", registry=r)  # fmt: skip
        self.ledger_errors = Counter("sidecar_ledger_errors", "Credits-ledger operations that failed",
                                     ["operation"], registry=r)  # fmt: skip
        self.rate_limited = Counter("sidecar_rate_limited", "Requests refused (429 rate_limit_exceeded) "
                                    "by their access key's own rpm or tpm", ["access_key", "limit"],
                                    registry=r)  # fmt: skip
        # Exported once `shared_state` is configured (`enable_shared_state`).
        self.shared_state_up = Gauge("sidecar_shared_state_up",
                                     "1 while the shared-state Redis is reachable; 0 while this "
                                     "replica runs on its own local state", registry=None)  # fmt: skip
        self._shared_enabled = False
        self._models: set[str] = set()
        for result in ("ok", "error"):
            self.vault_reloads.labels(result)
        self.ledger_up.set(1)
        for operation in LEDGER_OPERATIONS:
            self.ledger_errors.labels(operation)

    def prime(
        self,
        providers: Iterable[tuple[str, bool]],
        access_keys: Iterable[str],
        rate_limits: Iterable[tuple[str, str]] = (),
    ) -> None:
        """Create the series alerts rely on at 0, so `increase()` sees their first event.

        `providers`: (provider id, has managed keys); `access_keys`: names of usable access
        keys; `rate_limits`: (access key name, `rpm`|`tpm`) of each limit set.
        """
        for name, limit in rate_limits:
            self.rate_limited.labels(name, limit)
        for pid, managed in providers:
            for reason in ("no_key", "all_cooling", *(("credits_exhausted",) if managed else ())):
                self.no_key_available.labels(pid, reason)
        for name in access_keys:
            self.credits_spent.labels(name)

    def watch_cooling(self, keys: KeysSource, cooling: CoolingSource) -> None:
        self.registry.register(_CoolingCollector(keys, cooling))

    def watch_quota(self, quota: QuotaSource) -> None:
        self.registry.register(_QuotaCollector(quota))

    def enable_shared_state(self) -> None:
        if not self._shared_enabled:
            self._shared_enabled = True
            self.registry.register(self.shared_state_up)

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
