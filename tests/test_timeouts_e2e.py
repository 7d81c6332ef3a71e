"""`timeouts.per_request` bounds the wait for response headers; `stream_idle` the gaps after."""

from __future__ import annotations

import aiohttp
import pytest

from tests.harness import Env, Sidecar, metric_value, start_with_timeouts


async def test_slow_headers_within_per_request_succeed_even_if_longer_than_stream_idle(
    env: Env, sidecars: list[Sidecar]
) -> None:
    # headers after 600 ms: past stream_idle (200 ms) but within per_request (5 s)
    sc, token = await start_with_timeouts(env, sidecars, "{per_request: 5s, stream_idle: 200ms}",
                                       key="sk-slow-600")
    async with sc.openai(token) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
    assert raw.http_response.status_code == 200


async def test_slow_headers_past_per_request_time_out(env: Env, sidecars: list[Sidecar]) -> None:
    sc, token = await start_with_timeouts(env, sidecars, "{per_request: 200ms, total: 5s}",
                                       key="sk-slow-2000")
    async with aiohttp.ClientSession() as http:
        async with http.post(sc.url + "/v1/chat/completions", headers={"authorization": f"Bearer {token}"},
                             json={"model": "gpt-4o-mini", "messages": []}) as r:  # fmt: skip
            assert r.status == 502  # the one key timed out: no upstream answered
        async with http.get(sc.admin_url + "/metrics") as m:
            text = await m.text()
    assert metric_value(text, "sidecar_upstream_attempts_total", outcome="timeout") == 1


@pytest.mark.parametrize(
    "timeouts",
    [
        "{per_request: 300ms, stream_idle: 300ms}",  # aiohttp's per-read timer bounds the gaps
        "{per_request: 5s, stream_idle: 300ms}",  # per_request is longer: the relay's own timer
    ],
)
async def test_a_stream_idle_past_stream_idle_is_cut(
    env: Env, sidecars: list[Sidecar], timeouts: str
) -> None:
    sc, token = await start_with_timeouts(env, sidecars, timeouts, key="sk-stall-1500")
    async with aiohttp.ClientSession() as http:
        async with http.post(sc.url + "/v1/chat/completions", headers={"authorization": f"Bearer {token}"},
                             json={"model": "gpt-4o-mini", "stream": True, "messages": []}) as r:  # fmt: skip
            assert r.status == 200
            try:
                body = await r.content.read()
            except aiohttp.ClientPayloadError:
                body = b""
        assert b"[DONE]" not in body
        async with http.get(sc.admin_url + "/metrics") as m:
            text = await m.text()
    assert metric_value(text, "sidecar_stream_interruptions_total", cause="idle_timeout") == 1
