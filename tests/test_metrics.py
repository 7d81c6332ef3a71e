"""The request-path metric families render valid, exact Prometheus text."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from sidecar.metrics import OVERHEAD_BUCKETS, Metrics


def _samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_counters_and_histograms_render_exact_values() -> None:
    m = Metrics()
    m.requests.inc(("openai", "openai", "200"))
    m.requests.inc(("openai", "openai", "200"))
    m.requests.inc(("anthropic", "anthropic", "429"))
    m.tokens.inc(("openai", "gpt-4o-mini", "input"), 7)
    for v in (0.00005, 0.0003, 0.0003, 5.0):  # below the first bucket, a middle one twice, past the last
        m.overhead.observe(("openai",), v)
    text = m.render().decode()

    assert _samples(text, "sidecar_requests_total") == {
        (("format", "openai"), ("provider", "openai"), ("status", "200")): 2.0,
        (("format", "anthropic"), ("provider", "anthropic"), ("status", "429")): 1.0,
    }
    assert _samples(text, "sidecar_tokens_total") == {
        (("kind", "input"), ("model", "gpt-4o-mini"), ("provider", "openai")): 7.0
    }
    buckets = {dict(k)["le"]: v for k, v in _samples(text, "sidecar_overhead_seconds_bucket").items()}
    assert buckets[repr(OVERHEAD_BUCKETS[0])] == 1  # 0.0001: only the smallest value
    assert buckets["0.0005"] == 3  # cumulative
    assert buckets[repr(OVERHEAD_BUCKETS[-1])] == 3
    assert buckets["+Inf"] == 4
    assert _samples(text, "sidecar_overhead_seconds_count") == {(("format", "openai"),): 4.0}
    assert abs(_samples(text, "sidecar_overhead_seconds_sum")[(("format", "openai"),)] - 5.00065) < 1e-9
    assert "sidecar_requests_created" not in text


def test_ledger_health_series_exist_before_any_failure() -> None:
    """Alerts and dashboards need the ledger series at 1 / 0 before the first failure."""
    text = Metrics().render().decode()
    assert _samples(text, "sidecar_ledger_up") == {(): 1.0}
    assert _samples(text, "sidecar_ledger_errors_total") == {
        (("operation", "read"),): 0.0,
        (("operation", "write"),): 0.0,
    }
    assert _samples(text, "sidecar_ledger_pending_spend_usd") == {(): 0.0}
