"""Edges found in review: passthrough isolation, explicit-route paths and scope, model failover streams."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
from aiohttp.test_utils import TestServer

from tests.harness import Env, Sidecar


async def _boot(env: Env, sidecars: list[Sidecar], body: str) -> Sidecar:
    env.write_config(body)
    sc = await env.start()
    sidecars.append(sc)
    return sc


async def _mock_log(mock: TestServer) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as s, s.get(mock.make_url("/_mock/requests")) as r:
        return list((await r.json())["requests"])


OPENAI_POLICY = 'providers:\n  - id: openai\n    base_url: UPSTREAM\n    api_keys: [{{id: k1, value: "{ref}"}}]\n'


async def test_one_passthrough_callers_failures_do_not_lock_out_another(
    env: Env, sidecars: list[Sidecar]
) -> None:
    sc = await _boot(
        env, sidecars, "passthrough: true\nproviders:\n  - id: openai\n    base_url: UPSTREAM\n"
    )
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession() as http:
        for caller, expected in (("sk-caller-fail-401", 401), ("sk-caller-good", 200)):
            async with http.post(sc.url + "/v1/chat/completions", json=chat,
                                 headers={"authorization": f"Bearer {caller}"}) as r:  # fmt: skip
                assert r.status == expected, await r.text()
                assert r.headers["x-sidecar-key-source"] == "passthrough"


async def test_a_passthrough_caller_never_gets_the_providers_vault_headers(
    env: Env, sidecars: list[Sidecar], mock_server: TestServer
) -> None:
    """A provider's `headers:` may carry the operator's key (Azure's `api-key` with `auth:
    none`). A passthrough caller sends its own key: the vault's header values are not
    added to its request (else any caller would use the operator's key); literal ones are."""
    ref = env.secret("azure", "key", "AZURE-OPERATOR-SECRET")
    sc = await _boot(env, sidecars, "passthrough: true\nproviders:\n  - id: openai\n"
                     f"    base_url: UPSTREAM\n    headers: {{x-operator-key: \"{ref}\", "
                     "x-plain: hello}\n")  # fmt: skip
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession() as http, http.post(
        sc.url + "/v1/chat/completions", json=chat,
        headers={"authorization": "Bearer sk-caller-good"},
    ) as r:  # fmt: skip
        assert r.status == 200
        assert r.headers["x-sidecar-key-source"] == "passthrough"
    [seen] = await _mock_log(mock_server)
    sent = seen["headers"]  # never printed: it may hold what must not be there
    leaked = "x-operator-key" in sent
    assert not leaked, "the operator's vault header went with a caller's key"
    assert sent["x-plain"] == "hello"
    assert sent["authorization"] == "Bearer sk-caller-good"


async def test_model_failover_in_a_stream_never_shows_the_added_usage_chunk(
    env: Env, sidecars: list[Sidecar]
) -> None:
    token = env.access_key("app")
    sc = await _boot(env, sidecars, OPENAI_POLICY.format(ref=env.secret("openai", "k1", "sk-good")))
    body = {"model": "gpt-4o-fail-500", "models": ["gpt-4o-mini"], "stream": True,
            "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip
    headers = {"authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession() as http, http.post(
        sc.url + "/v1/chat/completions", json=body, headers=headers
    ) as r:
        assert r.status == 200
        assert r.headers["x-sidecar-model"] == "gpt-4o-mini"
        raw = await r.read()
    chunks = [orjson.loads(line[6:]) for line in raw.split(b"\n") if line.startswith(b"data: {")]
    assert chunks
    assert [c for c in chunks if c.get("usage")] == []


async def test_explicit_route_refuses_dot_segments(
    env: Env, sidecars: list[Sidecar], mock_server: TestServer
) -> None:
    token = env.access_key("app")
    sc = await _boot(env, sidecars, OPENAI_POLICY.format(ref=env.secret("openai", "k1", "sk-good")))
    async with aiohttp.ClientSession() as http:
        for path in ("/openai/..%2F..%2Fadmin%2Fsecret", "/openai/%2e%2e/x", "/openai/a/../../x"):
            url = aiohttp.client.URL(sc.url + path, encoded=True)
            async with http.get(url, headers={"authorization": f"Bearer {token}"}) as r:
                assert r.status == 404, path
                assert (await r.json())["error"]["code"] == "route_not_found"
    assert await _mock_log(mock_server) == []


async def test_explicit_route_scope_holds_whatever_the_content_type(
    env: Env, sidecars: list[Sidecar], mock_server: TestServer
) -> None:
    token = env.access_key("app", models=["gpt-4o-mini"])
    sc = await _boot(env, sidecars, OPENAI_POLICY.format(ref=env.secret("openai", "k1", "sk-good")))
    async with aiohttp.ClientSession() as http:
        for ctype in ("text/plain", "application/octet-stream"):
            async with http.post(sc.url + "/openai/chat/completions",
                                 data=orjson.dumps({"model": "gpt-5-pro", "messages": []}),
                                 headers={"authorization": f"Bearer {token}", "content-type": ctype}) as r:  # fmt: skip
                assert r.status == 403, ctype
                assert (await r.json())["error"]["code"] == "model_not_allowed"
        # no model at all cannot pass a model restriction either
        async with http.get(
            sc.url + "/openai/models", headers={"authorization": f"Bearer {token}"}
        ) as r:
            assert r.status == 403
    assert await _mock_log(mock_server) == []
