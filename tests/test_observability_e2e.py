"""Observability end to end (docs/reference.md#metrics and #logs) against a live sidecar.

One mixed workload — success, failover, cooldown, every refusal reason, a
managed request with credits, streams in both formats, a client error, an
explicit route and more distinct models than the model-label cap — then
`/metrics`, the access log and the operational log are checked with exact
counts, exact label sets and no secret anywhere. Last, every metric the
Grafana dashboard, the alert rules and the on-call page query must be a
series the live exporter really has.
"""

from __future__ import annotations

import asyncio
import math
import re
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

import sidecar.metrics
from tests.harness import Env, Sidecar, iter_metric, metric_value
from tests.test_grafana import (
    ALERTS_FILE,
    CONDITIONAL_METRICS,
    DASHBOARD_FILE,
    QUERYABLE_SERIES,
    RUNBOOK_FILE,
    SPEC_METRICS,
    _alert_queries,
    _dashboard_queries,
    _runbook_queries,
    _variable_queries,
    analyze,
    grafana_to_promql,
)

PROMPT = "count these four words"  # the mock counts input tokens as words
IN, OUT = 4, 5  # tokens per request: prompt words, and the mock's five-word reply
CLAUDE = "claude-3-5-haiku-latest"
# USD per 1M tokens == micro-USD per token: one managed request costs 4*1000 + 5*2000 micro-USD.
MANAGED_COST_USD = (IN * 1000 + OUT * 2000) / 1e6
BUYER_CREDITS = 1.0
MODEL_CAP = (
    4  # gpt-4o-mini, gpt-4o, claude-3-5-haiku-latest, gpt-extra-1; the rest fold into "other"
)

SPEC_ACCESS_LOG_FIELDS = frozenset(
    {"ts", "request_id", "access_key", "method", "path", "format", "provider", "model",
     "key_source", "key_id", "attempts", "status", "resumed", "translated", "duration_ms",
     "overhead_ms", "input_tokens", "output_tokens"}
)  # fmt: skip

CONFIG = """\
failover:
  cooldown: {{rate_limited: 60s}}
providers:
  - id: openai
    base_url: UPSTREAM
    api_keys:
      - {{id: bad, value: "{openai_bad}"}}
      - {{id: good, value: "{openai_good}"}}
  - id: anthropic
    base_url: UPSTREAM
  - id: cooled
    base_url: UPSTREAM
    format: openai
    models: [cool-model]
    api_keys:
      - {{id: only, value: "{cooled}"}}
  - id: nokeys
    base_url: UPSTREAM
    format: openai
    models: [orphan-model]
managed:
  anthropic: [{{id: pool-1, value: "{managed}"}}]
ledger: {{url: "sqlite:///ledger.db"}}
prices:
  {claude}: {{input: 1000, output: 2000}}
"""


@dataclass(frozen=True)
class Reply:
    name: str
    status: int
    headers: Mapping[str, str]  # lower-cased names
    body: bytes

    @property
    def request_id(self) -> str:
        return self.headers["x-sidecar-request-id"]

    def error_code(self) -> str | None:
        err = orjson.loads(self.body).get("error")
        return err.get("code") if isinstance(err, dict) else None


@dataclass
class Run:
    sc: Sidecar
    replies: dict[str, Reply]
    metrics: str
    access: list[dict[str, Any]]
    access_raw: str
    oplog: list[dict[str, Any]]
    oplog_raw: str
    secrets: dict[str, str]  # what may never be printed, by a non-secret description
    started: float


# --------------------------------------------------------------------------- the workload


def _secret_value(prefix: str) -> str:
    # Hex cannot spell a mock directive (fail-, drop, break, slow-, stall-).
    return f"{prefix}-{secrets.token_hex(12)}"


def _setup(env: Env) -> tuple[dict[str, str], dict[str, str]]:
    """Vault and config; returns (access tokens by name, every secret by description)."""
    values = {
        "openai_bad": _secret_value("sk-obs-fail-quota"),  # out of quota: cools the key for every model
        "openai_good": _secret_value("sk-obs-good"),
        "cooled": _secret_value("sk-obs-cool-fail-429-retry-60"),
        "managed": _secret_value("sk-ant-obs-managed"),
    }
    refs = {name: env.secret("obs", name, value) for name, value in values.items()}
    tokens = {
        "app": env.access_key("app"),
        "broke": env.access_key("broke", credits=0.0),
        "buyer": env.access_key("buyer", credits=BUYER_CREDITS),
        "team": env.access_key("team"),
    }
    values["team_attached"] = _secret_value("sk-ant-obs-team")
    env.attach("team", "anthropic", "team-ant", values["team_attached"])
    env.write_config(CONFIG.format(claude=CLAUDE, **refs))
    found = {f"provider key {k}": v for k, v in values.items()}
    found |= {f"access token {k}": v for k, v in tokens.items()}
    found["private key"] = env.private_key.reveal()
    found["private key file"] = (env.dir / "sidecar.key").read_text().strip()
    return tokens, found


def _chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": PROMPT}], **extra}


def _message(model: str = CLAUDE) -> dict[str, Any]:
    return {"model": model, "max_tokens": 16, "messages": [{"role": "user", "content": PROMPT}]}


async def _post(http: aiohttp.ClientSession, sc: Sidecar, name: str, path: str, token: str,
                body: dict[str, Any]) -> Reply:  # fmt: skip
    if path.startswith("/v1/messages"):
        headers = {"x-api-key": token, "anthropic-version": "2023-06-01"}
    else:
        headers = {"authorization": f"Bearer {token}"}
    async with http.post(sc.url + path, json=body, headers=headers) as resp:
        data = await resp.read()
        return Reply(name, resp.status, {k.lower(): v for k, v in resp.headers.items()}, data)


def _httpx_reply(name: str, status: int, headers: Any, body: bytes) -> Reply:
    return Reply(name, status, {k.lower(): v for k, v in headers.items()}, body)


async def _openai_stream(sc: Sidecar, token: str) -> Reply:
    client = sc.openai(token)
    try:
        stream = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": PROMPT}], stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        return _httpx_reply("stream_openai", stream.response.status_code, stream.response.headers,
                            text.encode())  # fmt: skip
    finally:
        await client.close()


async def _anthropic_stream(sc: Sidecar, token: str) -> Reply:
    client = sc.anthropic(token)
    try:
        stream = await client.messages.create(**_message(), stream=True)
        text = "".join(
            [e.delta.text async for e in stream if e.type == "content_block_delta" and e.delta.type == "text_delta"]
        )  # fmt: skip
        return _httpx_reply("stream_anthropic", stream.response.status_code, stream.response.headers,
                            text.encode())  # fmt: skip
    finally:
        await client.close()


async def _explicit(sc: Sidecar, token: str) -> Reply:
    client = openai.AsyncOpenAI(base_url=sc.url + "/openai", api_key=token, max_retries=0)
    try:
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-4o", messages=[{"role": "user", "content": PROMPT}]
        )
        return _httpx_reply("explicit", raw.status_code, raw.headers, raw.content)
    finally:
        await client.close()


async def _scrape(sc: Sidecar) -> str:
    async with aiohttp.ClientSession() as http, http.get(sc.admin_url + "/metrics") as resp:
        assert resp.status == 200
        return await resp.text()


async def _until(probe: Callable[[], Awaitable[bool]], what: str, within: float = 5.0) -> None:
    try:
        async with asyncio.timeout(within):
            while True:
                if await probe():
                    return
                await asyncio.sleep(0.02)
    except TimeoutError:
        pytest.fail(f"timed out waiting for {what}")


async def _workload(env: Env, sidecars: list[Sidecar], monkeypatch: pytest.MonkeyPatch) -> Run:
    monkeypatch.setattr(sidecar.metrics, "MODEL_LABEL_CAP", MODEL_CAP)
    tokens, found = _setup(env)
    started = time.time()
    sc = await env.start()
    sidecars.append(sc)
    app, broke, buyer, team = tokens["app"], tokens["broke"], tokens["buyer"], tokens["team"]
    chat = "/v1/chat/completions"
    r: dict[str, Reply] = {}
    async with aiohttp.ClientSession() as http:
        # `bad` is out of quota (429 insufficient_quota): fail over to `good`; `bad` cools for every model.
        r["failover"] = await _post(http, sc, "failover", chat, app, _chat("gpt-4o-mini"))
        r["success"] = await _post(http, sc, "success", chat, app, _chat("gpt-4o-mini"))
        r["client_error"] = await _post(
            http, sc, "client_error", chat, app, _chat("gpt-4o-mini-fail-400")
        )
        r["model_unknown"] = await _post(
            http, sc, "model_unknown", chat, app, _chat("mystery-model")
        )
        r["stream_openai"] = await _openai_stream(sc, app)
        r["explicit"] = await _explicit(sc, app)
        # `cooled` has one key: its 429 is relayed, then every key of the provider cools.
        r["cool_first"] = await _post(http, sc, "cool_first", chat, app, _chat("cool-model"))
        r["cool_all"] = await _post(http, sc, "cool_all", chat, app, _chat("cool-model"))
        r["no_key"] = await _post(http, sc, "no_key", chat, app, _chat("orphan-model"))
        r["broke"] = await _post(http, sc, "broke", "/v1/messages", broke, _message())
        r["managed"] = await _post(http, sc, "managed", "/v1/messages", buyer, _message())
        r["stream_anthropic"] = await _anthropic_stream(sc, team)
        for i in (1, 2, 3):  # the model-label cap is reached by gpt-extra-1
            r[f"extra_{i}"] = await _post(http, sc, f"extra_{i}", chat, app, _chat(f"gpt-extra-{i}"))  # fmt: skip

    async def charged() -> bool:  # the managed spend is charged in the background
        text = await _scrape(sc)
        left = metric_value(text, "sidecar_credits_remaining_usd", access_key="buyer")
        return math.isclose(left, BUYER_CREDITS - MANAGED_COST_USD, abs_tol=1e-9)

    await _until(charged, "the managed spend to reach sidecar_credits_remaining_usd")
    metrics = await _scrape(sc)

    async def logged() -> bool:
        return len(env.access.records()) >= len(r)

    await _until(logged, "the access log to be flushed")
    return Run(sc, r, metrics, env.access.records(), env.access.getvalue(), env.oplog.records(),
               env.oplog.getvalue(), found, started)  # fmt: skip


@pytest.fixture
async def run(env: Env, sidecars: list[Sidecar], monkeypatch: pytest.MonkeyPatch) -> Run:
    return await _workload(env, sidecars, monkeypatch)


# --------------------------------------------------------------------------- helpers


def _samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Samples of `name` keyed by their sorted label items (bucket `le` included)."""
    return {tuple(sorted(ls.items())): v for ls, v in iter_metric(text, name)}


def _nonzero(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {k: v for k, v in _samples(text, name).items() if v}


def _key(**labels: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(labels.items()))


def _sum_by(text: str, name: str, *by: str) -> dict[tuple[str, ...], float]:
    out: Counter[tuple[str, ...]] = Counter()
    for ls, v in iter_metric(text, name):
        out[tuple(ls[b] for b in by)] += v
    return {k: v for k, v in out.items() if v}


def _live_series(text: str) -> set[str]:
    return {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}


# Expected outcome of each request: (status, provider, key_source, key_id, attempts, model, tokens)
EXPECTED: dict[str, tuple[int, str | None, str | None, str | None, int, str | None, bool]] = {
    "failover": (200, "openai", "policy", "good", 2, "gpt-4o-mini", True),
    "success": (200, "openai", "policy", "good", 1, "gpt-4o-mini", True),
    "client_error": (400, "openai", "policy", "good", 1, "gpt-4o-mini-fail-400", False),
    "model_unknown": (400, None, None, None, 0, None, False),
    "stream_openai": (200, "openai", "policy", "good", 1, "gpt-4o-mini", True),
    "explicit": (200, "openai", "policy", "good", 1, "gpt-4o", True),
    "cool_first": (429, "cooled", "policy", "only", 1, "cool-model", False),
    "cool_all": (429, None, None, None, 0, None, False),
    "no_key": (400, None, None, None, 0, None, False),
    "broke": (402, None, None, None, 0, None, False),
    "managed": (200, "anthropic", "managed", "pool-1", 1, CLAUDE, True),
    "stream_anthropic": (200, "anthropic", "attached", "team-ant", 1, CLAUDE, True),
    "extra_1": (200, "openai", "policy", "good", 1, "gpt-extra-1", True),
    "extra_2": (200, "openai", "policy", "good", 1, "gpt-extra-2", True),
    "extra_3": (200, "openai", "policy", "good", 1, "gpt-extra-3", True),
}
ACCESS_KEY = {"broke": "broke", "managed": "buyer", "stream_anthropic": "team"}
FORMAT = {"broke": "anthropic", "managed": "anthropic", "stream_anthropic": "anthropic"}
PATH = {"broke": "/v1/messages", "managed": "/v1/messages", "stream_anthropic": "/v1/messages",
        "explicit": "/openai/chat/completions"}  # fmt: skip
ERROR_CODE = {"model_unknown": "model_unknown", "cool_all": "all_keys_cooling_down",
              "no_key": "no_provider_key", "broke": "credits_exhausted"}  # fmt: skip
# The provider a refused request was resolved to (the refusal names it).
REFUSED_PROVIDER = {"cool_all": "cooled", "no_key": "nokeys", "broke": "anthropic"}


# --------------------------------------------------------------------------- responses


async def test_responses_of_the_workload(run: Run) -> None:
    assert set(run.replies) == set(EXPECTED)
    for name, (status, provider, source, key_id, attempts, model, _) in EXPECTED.items():
        rep = run.replies[name]
        assert rep.status == status, (name, rep.body[:300])
        assert re.fullmatch(r"[0-9A-Za-z._-]{1,128}", rep.request_id), name
        if name in ERROR_CODE:
            assert rep.error_code() == ERROR_CODE[name], name
            continue
        h = rep.headers
        assert h["x-sidecar-provider"] == provider, name
        assert h["x-sidecar-key-source"] == source, name
        assert h["x-sidecar-key-id"] == key_id, name
        assert h["x-sidecar-attempts"] == str(attempts), name
        assert h["x-sidecar-model"] == model, name
        overhead = float(h["x-sidecar-overhead-ms"])
        assert math.isfinite(overhead), name
        assert overhead >= 0, name
    assert run.replies["cool_all"].headers["retry-after"].isdigit()
    assert int(run.replies["cool_all"].headers["retry-after"]) >= 1
    assert run.replies["stream_openai"].body == b"Hello from the mock provider."
    assert run.replies["stream_anthropic"].body == b"Hello from the mock provider."
    assert len({rep.request_id for rep in run.replies.values()}) == len(run.replies)


# --------------------------------------------------------------------------- /metrics


async def test_metric_label_sets_are_exactly_the_spec(run: Run) -> None:
    live = {fam.name: fam for fam in text_string_to_metric_families(run.metrics)}
    for name, spec in SPEC_METRICS.items():
        base = name.removesuffix("_total") if spec.type == "counter" else name
        fam = live.get(base)
        assert fam is not None, f"{name} is not exported"
        assert fam.type == spec.type, name
        want = set(spec.labels)
        seen = 0
        for s in fam.samples:
            if s.name.endswith("_created"):
                continue
            seen += 1
            extra = {"le"} if s.name.endswith("_bucket") else set()
            assert set(s.labels) == want | extra, f"{s.name}: {sorted(s.labels)}"
            for label, allowed in spec.labels.items():
                if allowed is not None:
                    assert s.labels[label] in allowed, f"{s.name}: {label}={s.labels[label]!r}"
        assert seen, f"{name} has no sample after the workload"


async def test_request_counters_and_histograms(run: Run) -> None:
    m = run.metrics
    # Requests that reached a provider, by their exact labels.
    assert (
        metric_value(m, "sidecar_requests_total", format="openai", provider="openai", status="200")
        == 7
    )
    assert (
        metric_value(m, "sidecar_requests_total", format="openai", provider="openai", status="400")
        == 1
    )
    assert (
        metric_value(m, "sidecar_requests_total", format="openai", provider="cooled", status="429")
        >= 1
    )
    assert (
        metric_value(
            m, "sidecar_requests_total", format="anthropic", provider="anthropic", status="200"
        )
        == 2
    )
    # Every request, whatever provider label a refusal got (see the provider test below).
    assert _sum_by(m, "sidecar_requests_total", "format", "status") == {
        ("openai", "200"): 7, ("openai", "400"): 3, ("openai", "429"): 2,
        ("anthropic", "200"): 2, ("anthropic", "402"): 1,
    }  # fmt: skip
    assert all(
        re.fullmatch(r"[1-5]\d\d", ls["status"])
        for ls, _ in iter_metric(m, "sidecar_requests_total")
    )

    # One duration observation per request, under the same (format, provider).
    assert _sum_by(m, "sidecar_request_duration_seconds_count", "format", "provider") == _sum_by(
        m, "sidecar_requests_total", "format", "provider"
    )
    assert _sum_by(m, "sidecar_overhead_seconds_count", "format") == {
        ("openai",): 12,
        ("anthropic",): 3,
    }
    # One TTFB observation per upstream attempt that got response headers (all of them here).
    assert _sum_by(m, "sidecar_upstream_ttfb_seconds_count", "provider") == {
        ("openai",): 9, ("cooled",): 1, ("anthropic",): 2,
    }  # fmt: skip
    for hist in (
        "sidecar_request_duration_seconds",
        "sidecar_upstream_ttfb_seconds",
        "sidecar_overhead_seconds",
    ):
        counts = _sum_by(m, f"{hist}_count", *_hist_labels(hist))
        infs = {
            k: v
            for k, v in _sum_by(m, f"{hist}_bucket", *_hist_labels(hist), "le").items()
            if k[-1] == "+Inf"
        }
        assert {k[:-1]: v for k, v in infs.items()} == counts, hist
        assert all(v >= 0 for _, v in iter_metric(m, f"{hist}_sum")), hist
    # The 10 ms overhead alert threshold is a real bucket boundary (deploy/grafana/README.md).
    assert any(
        ls.get("le") == "0.01" for ls, _ in iter_metric(m, "sidecar_overhead_seconds_bucket")
    )


def _hist_labels(name: str) -> tuple[str, ...]:
    return tuple(SPEC_METRICS[name].labels)


async def test_key_path_counters(run: Run) -> None:
    m = run.metrics
    assert _nonzero(m, "sidecar_key_selections_total") == {
        _key(provider="openai", source="policy", key_id="bad"): 1,
        _key(provider="openai", source="policy", key_id="good"): 8,
        _key(provider="cooled", source="policy", key_id="only"): 1,
        _key(provider="anthropic", source="managed", key_id="pool-1"): 1,
        _key(provider="anthropic", source="attached", key_id="team-ant"): 1,
    }
    assert _nonzero(m, "sidecar_upstream_attempts_total") == {
        _key(provider="openai", source="policy", key_id="bad", outcome="rate_limited"): 1,
        _key(provider="openai", source="policy", key_id="good", outcome="ok"): 7,
        _key(provider="openai", source="policy", key_id="good", outcome="client_error"): 1,
        _key(provider="cooled", source="policy", key_id="only", outcome="rate_limited"): 1,
        _key(provider="anthropic", source="managed", key_id="pool-1", outcome="ok"): 1,
        _key(provider="anthropic", source="attached", key_id="team-ant", outcome="ok"): 1,
    }
    total_attempts = sum(EXPECTED[n][4] for n in EXPECTED)
    assert sum(v for _, v in iter_metric(m, "sidecar_upstream_attempts_total")) == total_attempts
    assert _nonzero(m, "sidecar_failovers_total") == {
        _key(provider="openai", reason="rate_limited"): 1
    }
    # Every key that exists has a series; exactly the two rate-limited keys cool.
    assert _samples(m, "sidecar_key_cooling_down") == {
        _key(provider="openai", source="policy", key_id="bad", access_key=""): 1,
        _key(provider="openai", source="policy", key_id="good", access_key=""): 0,
        _key(provider="cooled", source="policy", key_id="only", access_key=""): 1,
        _key(provider="anthropic", source="managed", key_id="pool-1", access_key=""): 0,
        _key(provider="anthropic", source="attached", key_id="team-ant", access_key="team"): 0,
    }
    assert _nonzero(m, "sidecar_no_key_available_total") == {
        _key(provider="cooled", reason="all_cooling"): 1,
        _key(provider="nokeys", reason="no_key"): 1,
        _key(provider="anthropic", reason="credits_exhausted"): 1,
    }


async def test_tokens_credits_and_reloads(run: Run) -> None:
    m = run.metrics
    per_model = {"gpt-4o-mini": ("openai", 3), "gpt-4o": ("openai", 1), CLAUDE: ("anthropic", 2),
                 "gpt-extra-1": ("openai", 1), "other": ("openai", 2)}  # fmt: skip
    want = {}
    for model, (provider, n) in per_model.items():
        want[_key(provider=provider, model=model, kind="input")] = n * IN
        want[_key(provider=provider, model=model, kind="output")] = n * OUT
    assert _nonzero(m, "sidecar_tokens_total") == want
    # Cardinality stays bounded: the cap, plus the one `other` value.
    models = {ls["model"] for ls, _ in iter_metric(m, "sidecar_tokens_total")}
    assert len(models) <= MODEL_CAP + 1
    assert "gpt-extra-2" not in models
    assert "gpt-extra-3" not in models

    spent = _nonzero(m, "sidecar_credits_spent_usd_total")
    assert set(spent) == {_key(access_key="buyer")}
    assert math.isclose(spent[_key(access_key="buyer")], MANAGED_COST_USD, abs_tol=1e-9)
    remaining = _samples(m, "sidecar_credits_remaining_usd")
    assert math.isclose(
        remaining[_key(access_key="buyer")], BUYER_CREDITS - MANAGED_COST_USD, abs_tol=1e-9
    )
    assert remaining[_key(access_key="broke")] == 0
    assert _key(access_key="team") not in remaining  # attached keys never touch credits

    assert _samples(m, "sidecar_vault_reloads_total") == {
        _key(result="ok"): 1,
        _key(result="error"): 0,
    }
    (last,) = _samples(m, "sidecar_vault_last_success_timestamp_seconds").values()
    assert run.started - 1 <= last <= time.time()


async def test_refusals_are_counted_and_logged_under_their_provider(run: Run) -> None:
    m = run.metrics
    assert (
        metric_value(m, "sidecar_requests_total", format="openai", provider="cooled", status="429")
        == 2
    )
    assert (
        metric_value(m, "sidecar_requests_total", format="openai", provider="nokeys", status="400")
        == 1
    )
    assert (
        metric_value(
            m, "sidecar_requests_total", format="anthropic", provider="anthropic", status="402"
        )
        == 1
    )
    by_id = {rec["request_id"]: rec for rec in run.access}
    for name, provider in REFUSED_PROVIDER.items():
        assert by_id[run.replies[name].request_id]["provider"] == provider, name
    # Only a request whose provider is truly unknown has none.
    assert (
        _sum_by(m, "sidecar_requests_total", "format", "provider", "status").get(
            ("openai", "", "400")
        )
        == 1
    )


# --------------------------------------------------------------------------- logs


async def test_access_log_has_one_spec_line_per_request(run: Run) -> None:
    assert len(run.access) == len(run.replies)
    by_id = {rec["request_id"]: rec for rec in run.access}
    assert len(by_id) == len(run.access)
    for name, (status, provider, source, key_id, attempts, model, metered) in EXPECTED.items():
        rec = by_id[run.replies[name].request_id]
        assert set(rec) == SPEC_ACCESS_LOG_FIELDS, (name, sorted(rec))
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", rec["ts"]), rec["ts"]
        assert rec["access_key"] == ACCESS_KEY.get(name, "app"), name
        assert rec["method"] == "POST"
        assert rec["path"] == PATH.get(name, "/v1/chat/completions"), name
        assert rec["format"] == FORMAT.get(name, "openai"), name
        assert rec["status"] == status, name
        assert rec["attempts"] == attempts, name
        if name not in REFUSED_PROVIDER:  # refusals: checked in the test above
            assert rec["provider"] == provider, name
        assert rec["key_source"] == source, name
        assert rec["key_id"] == key_id, name
        assert rec["model"] == model, name
        assert (rec["input_tokens"], rec["output_tokens"]) == (
            (IN, OUT) if metered else (None, None)
        ), name
        for f in ("duration_ms", "overhead_ms"):
            assert isinstance(rec[f], int | float), (name, f)
            assert rec[f] >= 0, (name, f)
        if "x-sidecar-overhead-ms" in run.replies[name].headers:
            assert rec["overhead_ms"] <= rec["duration_ms"], name


async def test_failovers_are_logged_once_with_their_cause(run: Run) -> None:
    failed = [r for r in run.oplog if r["event"] == "upstream_failed"]
    by_request = Counter(r["request_id"] for r in failed)
    failover_id = run.replies["failover"].request_id
    assert by_request == {failover_id: 1, run.replies["cool_first"].request_id: 1}
    (line,) = [r for r in failed if r["request_id"] == failover_id]
    assert (line["provider"], line["key_id"], line["status"], line["outcome"]) == (
        "openai", "bad", 429, "rate_limited"
    )  # fmt: skip
    cooling = sorted(
        (r["provider"], r["key_id"], r["outcome"]) for r in run.oplog if r["event"] == "key_cooling"
    )
    assert cooling == [("cooled", "only", "rate_limited"), ("openai", "bad", "rate_limited")]
    assert all(r["level"] in ("debug", "info", "warning", "error") for r in run.oplog)


async def test_no_secret_in_metrics_logs_or_responses(run: Run) -> None:
    assert len(run.secrets) == 11
    for rep in run.replies.values():
        for what, value in run.secrets.items():
            assert value not in rep.body.decode(errors="replace"), f"{what} in the {rep.name} body"
            assert value not in repr(dict(rep.headers)), f"{what} in the {rep.name} headers"
    for where, text in (
        ("/metrics", run.metrics),
        ("access log", run.access_raw),
        ("op log", run.oplog_raw),
    ):
        assert text.strip(), where
        for what, value in run.secrets.items():
            assert value not in text, f"{what} in the {where}"
            # The random part alone, too: a prefix-stripped or truncated value is still a leak.
            tail = value.rsplit("-", 1)[-1]
            if len(tail) >= 16:
                assert tail not in text, f"part of {what} in the {where}"


# --------------------------------------------------------------------------- dashboards and alerts


def _queries() -> list[tuple[str, str]]:
    variables = [(f"variable ${v}", sel) for v, sel, _ in _variable_queries()]
    return _dashboard_queries() + _alert_queries() + _runbook_queries() + variables


async def test_every_dashboard_and_alert_metric_is_live(run: Run) -> None:
    live = _live_series(run.metrics)
    queries = _queries()
    assert len(queries) > 10
    missing = []
    for where, expr in queries:
        result = analyze(grafana_to_promql(expr))
        for name, matchers in result.selectors:
            if _conditional(name):  # live only with shared_state, limits or quota headers
                continue
            if name not in live:
                missing.append(f"{where}: {name}")
                continue
            # A fixed `label="value"` must match a live sample (`$var` matchers are Grafana's).
            fixed = {k: v for k, (op, v) in matchers.items() if op == "=" and "$" not in v}
            if fixed and not any(all(ls.get(k) == v for k, v in fixed.items()) for ls, _ in iter_metric(run.metrics, name)):  # fmt: skip
                missing.append(f"{where}: {name}{fixed}")
    assert missing == []
    # Belt and braces: every sidecar_* name written anywhere in these files
    # (annotation templates embed queries too) is a live series.
    for path in (DASHBOARD_FILE, ALERTS_FILE, RUNBOOK_FILE):
        if path.exists():
            for name in set(re.findall(r"\bsidecar_[a-z0-9_]+", path.read_text())):
                if not _conditional(name):  # tests/test_shared_state_e2e.py sees those live
                    assert name in live, f"{path.name}: {name}"


def _conditional(name: str) -> bool:
    series = QUERYABLE_SERIES.get(name)
    return series is not None and series.family in CONDITIONAL_METRICS


async def test_counters_known_at_load_start_at_zero(env: Env, sidecars: list[Sidecar]) -> None:
    _setup(env)
    sc = await env.start()
    sidecars.append(sc)
    m = await _scrape(sc)
    assert _samples(m, "sidecar_vault_reloads_total") == {
        _key(result="ok"): 1,
        _key(result="error"): 0,
    }
    no_key = _samples(m, "sidecar_no_key_available_total")
    for provider in ("openai", "anthropic", "cooled", "nokeys"):
        for reason in ("no_key", "all_cooling"):
            assert no_key.get(_key(provider=provider, reason=reason)) == 0, (provider, reason)
    assert no_key.get(_key(provider="anthropic", reason="credits_exhausted")) == 0
    spent = _samples(m, "sidecar_credits_spent_usd_total")
    for name in ("app", "broke", "buyer", "team"):
        assert spent.get(_key(access_key=name)) == 0, name


async def test_a_caller_that_hangs_up_is_still_logged_and_counted(
    env: Env, sidecars: list[Sidecar]
) -> None:
    ref = env.secret("obs", "good", _secret_value("sk-obs-good"))
    token = env.access_key("app")
    env.write_config(f'providers:\n  - id: openai\n    base_url: UPSTREAM\n    api_keys:\n      - {{id: good, value: "{ref}"}}\n')  # fmt: skip
    sc = await env.start()
    sidecars.append(sc)
    chat = sc.url + "/v1/chat/completions"
    async with aiohttp.ClientSession() as http:
        # Mid-stream: the first chunk arrives, then the caller closes the connection.
        body = _chat("gpt-4o-mini-stall-300", stream=True)
        headers = {"authorization": f"Bearer {token}", "x-request-id": "hangup-mid-stream"}
        resp = await http.post(chat, json=body, headers=headers)
        assert resp.status == 200
        assert await resp.content.readany()
        resp.close()
        # Before the headers: the caller gives up while the upstream is slow.
        headers = {"authorization": f"Bearer {token}", "x-request-id": "hangup-waiting"}
        with pytest.raises(TimeoutError):
            await http.post(chat, json=_chat("gpt-4o-mini-slow-1500"), headers=headers,
                            timeout=aiohttp.ClientTimeout(total=0.3))  # fmt: skip

    async def logged() -> bool:
        ids = {rec["request_id"] for rec in env.access.records()}
        return {"hangup-mid-stream", "hangup-waiting"} <= ids

    await _until(logged, "access-log lines for the two abandoned requests", within=3.0)
    m = await _scrape(sc)
    assert sum(v for _, v in iter_metric(m, "sidecar_requests_total")) == 2
    assert sum(v for _, v in iter_metric(m, "sidecar_request_duration_seconds_count")) == 2
    by_id = {rec["request_id"]: rec for rec in env.access.records()}
    for rid in ("hangup-mid-stream", "hangup-waiting"):
        rec = by_id[rid]
        assert set(rec) == SPEC_ACCESS_LOG_FIELDS, rid
        assert rec["status"] == 499, rid  # "client closed request", as nginx logs it
        assert (rec["provider"], rec["key_id"], rec["attempts"]) == ("openai", "good", 1), rid
    assert (
        metric_value(m, "sidecar_requests_total", format="openai", provider="openai", status="499")
        == 2
    )


async def test_failover_is_counted_only_when_another_attempt_follows(
    env: Env, sidecars: list[Sidecar]
) -> None:
    ref = env.secret("obs", "only", _secret_value("sk-obs-fail-quota"))
    token = env.access_key("app")
    env.write_config(f'providers:\n  - id: openai\n    base_url: UPSTREAM\n    api_keys:\n      - {{id: only, value: "{ref}"}}\n')  # fmt: skip
    sc = await env.start()
    sidecars.append(sc)
    async with aiohttp.ClientSession() as http:
        # Two model candidates on one key: the first answer (out of quota) cools the key for
        # every model, so the second is skipped and no failover is counted.
        rep = await _post(http, sc, "models", "/v1/chat/completions", token, _chat("gpt-4o-mini", models=["gpt-4o"]))  # fmt: skip
    assert rep.status == 429
    assert rep.headers["x-sidecar-attempts"] == "1"
    m = await _scrape(sc)
    assert sum(v for _, v in iter_metric(m, "sidecar_upstream_attempts_total")) == 1
    assert sum(v for _, v in iter_metric(m, "sidecar_failovers_total")) == 0
