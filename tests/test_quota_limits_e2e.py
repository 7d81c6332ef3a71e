"""One sidecar, no Redis: quota-aware key order from the providers' own headers, and an
access key's own rpm/tpm counted on the replica (docs/reference.md#quota-aware-key-order,
docs/reference.md#rate-limits).

The mock's `quota-N` directive sends OpenAI's or Anthropic's rate-limit headers with N
requests per minute for that key and model, counting down.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
from aiohttp.test_utils import TestServer

from tests.harness import Env, Sidecar, metric_value
from tests.test_proxy_e2e import boot, clear_mock, metrics_text, mock_log, providers_yaml, send

MODEL = "gpt-4o-mini"
PROMPT = [{"role": "user", "content": "hi"}]


def keys_of(log: list[dict[str, Any]]) -> list[str]:
    return [e["key"] for e in log]


async def keys_report(http: aiohttp.ClientSession, sc: Sidecar) -> list[dict[str, Any]]:
    async with http.get(sc.admin_url + "/keys") as r:
        return list((await r.json())["keys"])


async def test_a_nearly_exhausted_key_goes_behind_one_with_headroom(
    env: Env,
    sidecars: list[Sidecar],
    token: str,
    mock_server: TestServer,
    http: aiohttp.ClientSession,
) -> None:
    low, roomy = "sk-low-quota-20", "sk-roomy"
    sc = await boot(env, sidecars, providers_yaml(env, openai=[("low", low), ("roomy", roomy)]))
    async with sc.openai(token) as c:
        for _ in range(19):  # the source's order: the first key, while it has headroom
            await c.chat.completions.create(model=MODEL, messages=PROMPT)
        assert keys_of(await mock_log(http, mock_server)) == [low] * 19
        # 1 of 20 requests left (5 %): nearly exhausted, so the second key comes first now.
        r = await c.chat.completions.with_raw_response.create(model=MODEL, messages=PROMPT)
    assert r.headers["x-sidecar-key-id"] == "roomy"
    (line,) = [k for k in await keys_report(http, sc) if k["key_id"] == "low"]
    assert line["state"] == "ok"
    by_kind = {q["kind"]: q for q in line["quota"]}
    assert {k: (q["model"], q["remaining"], q["limit"]) for k, q in by_kind.items()} == {
        "requests": (MODEL, 1, 20),
        "tokens": (MODEL, 1000, 20000),
    }
    assert by_kind["requests"]["reset"].endswith("Z")
    m = await metrics_text(http, sc)
    assert metric_value(m, "sidecar_key_quota_remaining", key_id="low", kind="requests") == 1
    assert metric_value(m, "sidecar_key_quota_remaining", key_id="low", kind="tokens") == 1000
    assert 'key_id="roomy"' not in "".join(
        line for line in m.splitlines() if line.startswith("sidecar_key_quota_remaining")
    )  # no reading from a key that sent no header


async def test_a_key_with_nothing_left_is_skipped_until_its_reset(
    env: Env,
    sidecars: list[Sidecar],
    token: str,
    mock_server: TestServer,
    http: aiohttp.ClientSession,
) -> None:
    first, second = "sk-ant-first-quota-2", "sk-ant-second"
    sc = await boot(env, sidecars, providers_yaml(env, anthropic=[("a1", first), ("a2", second)]))
    async with sc.anthropic(token) as c:
        for _ in range(2):  # the second answer says 0 requests are left
            await c.messages.create(model="claude-haiku-4-5", max_tokens=16, messages=PROMPT)
        await clear_mock(http, mock_server)
        r = await c.messages.with_raw_response.create(
            model="claude-haiku-4-5", max_tokens=16, messages=PROMPT
        )
    assert r.headers["x-sidecar-key-id"] == "a2"
    assert keys_of(await mock_log(http, mock_server)) == [second]  # no attempt on the empty key
    (line,) = [k for k in await keys_report(http, sc) if k["key_id"] == "a1"]
    assert (line["state"], line["model"], line["reason"], line["last_status"]) == (
        "cooling", "claude-haiku-4-5", "rate_limited", 200
    )  # fmt: skip
    assert {q["kind"]: q["remaining"] for q in line["quota"]} == {"requests": 0, "tokens": 0}
    (logged,) = [r for r in env.oplog.records() if r.get("event") == "key_quota_used_up"]
    assert (logged["key_id"], logged["model"]) == ("a1", "claude-haiku-4-5")
    assert 0 < logged["reset_in_s"] <= 61  # the mock says: a minute from its (whole) second


async def test_an_access_key_over_its_rpm_is_refused_before_any_upstream_call(
    env: Env,
    sidecars: list[Sidecar],
    mock_server: TestServer,
    http: aiohttp.ClientSession,
) -> None:
    token = env.access_key("paced", rpm=3)
    sc = await boot(env, sidecars, providers_yaml(env, openai=[("k", "sk-k")]))
    async with sc.openai(token) as c:
        for _ in range(3):
            await c.chat.completions.create(model=MODEL, messages=PROMPT)
    url = sc.url + "/v1/chat/completions"
    status, headers, body = await send(
        http, url, token=token, json={"model": MODEL, "messages": PROMPT}
    )
    assert status == 429
    assert orjson.loads(body)["error"]["code"] == "rate_limit_exceeded"
    assert 59 <= int(headers["retry-after"]) <= 61
    assert "x-should-retry" not in headers  # a minute's wait: an SDK's retry may help
    # An Anthropic caller gets the same refusal in its own shape.
    status, _, body = await send(http, sc.url + "/v1/messages", token=token, anthropic=True,
                                 json={"model": MODEL, "max_tokens": 8,
                                       "messages": PROMPT})  # fmt: skip
    assert status == 429
    assert orjson.loads(body)["error"]["type"] == "rate_limit_error"
    assert len(await mock_log(http, mock_server)) == 3
    m = await metrics_text(http, sc)
    assert metric_value(m, "sidecar_rate_limited_total", access_key="paced", limit="rpm") == 2
    assert metric_value(m, "sidecar_rate_limited_total", access_key="paced", limit="tpm") == 0


async def test_tokens_are_estimated_up_front_and_settled_with_metered_usage(
    env: Env,
    sidecars: list[Sidecar],
    mock_server: TestServer,
    http: aiohttp.ClientSession,
) -> None:
    tpm = 120
    token = env.access_key("budgeted", tpm=tpm)
    sc = await boot(env, sidecars, providers_yaml(env, openai=[("k", "sk-k")]))
    url = sc.url + "/v1/chat/completions"
    body = orjson.dumps({"model": MODEL, "messages": PROMPT})
    estimate = len(body) // 4  # what is counted before the answer
    used, admitted = 0, 0
    while True:
        status, headers, answer = await send(
            http, url, token=token, data=body, headers={"content-type": "application/json"}
        )
        if status == 429:
            break
        assert status == 200
        # Admitted only while what was metered so far plus this estimate fits.
        assert used + estimate <= tpm
        usage = orjson.loads(answer)["usage"]
        used += usage["prompt_tokens"] + usage["completion_tokens"]
        admitted += 1
        assert admitted < 50
    assert used + estimate > tpm  # refused exactly when the settled count says so
    assert orjson.loads(answer)["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(headers["retry-after"]) <= 61
    assert len(await mock_log(http, mock_server)) == admitted

    # A request larger than the whole limit (images, say) is counted as the whole limit up
    # front, then settled with what it used: it waits for an empty window, never forever.
    big = orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * 4 * tpm}]})
    status, headers, answer = await send(
        http, url, token=token, data=big, headers={"content-type": "application/json"}
    )
    assert status == 429
    assert "x-should-retry" not in headers
    assert 1 <= int(headers["retry-after"]) <= 61
    fresh = env.access_key("fresh", tpm=tpm)
    await asyncio.sleep(0.5)  # the reload picks the new access key up (reload_interval 200ms)
    status, _, answer = await send(
        http, url, token=fresh, data=big, headers={"content-type": "application/json"}
    )
    assert status == 200, answer
    # Settled to its real (small) usage, so a small request fits after it.
    status, _, answer = await send(
        http, url, token=fresh, data=body, headers={"content-type": "application/json"}
    )
    assert status == 200, answer
    m = await metrics_text(http, sc)
    assert metric_value(m, "sidecar_rate_limited_total", access_key="budgeted", limit="tpm") == 2


async def test_unlimited_access_keys_are_not_counted(
    env: Env,
    sidecars: list[Sidecar],
    token: str,
    mock_server: TestServer,
    http: aiohttp.ClientSession,
) -> None:
    sc = await boot(env, sidecars, providers_yaml(env, openai=[("k", "sk-k")]))
    async with sc.openai(token) as c:
        for _ in range(5):
            await c.chat.completions.create(model=MODEL, messages=PROMPT)
    assert sc.running.state.admission.local.bucket_count() == 0
    m = await metrics_text(http, sc)
    assert "sidecar_rate_limited_total{" not in m  # no series for a key without limits
    assert "sidecar_shared_state_up" not in m  # no shared_state configured
