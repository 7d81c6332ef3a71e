"""End-to-end failure paths: failover, cooldowns, and every error the sidecar answers itself.

A real sidecar and the real mock upstream on loopback; failures are provoked
with the mock's directives in the provider key or model (`fail-429`, `drop`,
`slow-N`, ...). Happy paths are in `test_proxy_e2e.py`, whose helpers this
module shares.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer

from sidecar.vault import edit_vault
from tests.harness import Env, Sidecar, metric_value
from tests.test_proxy_e2e import (
    CLAUDE_MODEL,
    MSG,
    OPENAI_MODEL,
    REPLY,
    Key,
    boot,
    chat,
    claude,
    keys_yaml,
    metrics_text,
    mock_log,
    providers_yaml,
    send,
    wait_for,
)

ROUTE = {"openai": "/v1/chat/completions", "anthropic": "/v1/messages"}
MODEL = {"openai": OPENAI_MODEL, "anthropic": CLAUDE_MODEL}
NOT_RETRYABLE = {400, 401, 402, 403, 413}


def payload(fmt: str, **fields: Any) -> dict[str, Any]:
    return claude(**fields) if fmt == "anthropic" else chat(**fields)


def sidecar_error(
    fmt: str, status: int, headers: dict[str, str], body: bytes, code: str, expected: int
) -> dict[str, Any]:
    """Check one sidecar-made error: status, the format's wire shape, the common headers."""
    assert status == expected, body
    doc = orjson.loads(body)
    if fmt == "anthropic":
        assert set(doc) == {"type", "error"}
        assert doc["type"] == "error"
        err = doc["error"]
    else:
        assert set(doc) == {"error"}
        err = doc["error"]
        assert err["param"] is None
    assert err["code"] == code
    assert isinstance(err["type"], str)
    assert err["type"]
    assert isinstance(err["message"], str)
    assert err["message"]
    assert headers["x-sidecar-request-id"]
    if expected in NOT_RETRYABLE:
        assert headers["x-should-retry"] == "false"
    elif expected >= 429:
        assert "x-should-retry" not in headers
    assert headers["content-type"].startswith("application/json")
    return dict(err)


# --------------------------------------------------------------------------- failover


@pytest.mark.parametrize(
    ("bad", "reason", "tries"),
    [
        ("sk-bad-fail-429", "rate_limited", 2),  # retry-after 1 s: waited out, tried once more
        ("sk-bad-fail-401", "auth_failed", 1),  # a bad key is not tried again
        ("sk-bad-fail-500", "server_error", 2),  # a 5xx is often passing: once more after a backoff
        ("sk-bad-drop", "connect_error", 2),
    ],
)
async def test_failover_to_good_key(
    env: Env,
    sidecars: list[Sidecar],
    mock_server: TestServer,
    http: aiohttp.ClientSession,
    bad: str,
    reason: str,
    tries: int,
    token: str,
) -> None:
    sc = await boot(env, sidecars, providers_yaml(env, openai=[("bad", bad), ("good", "sk-good")]))
    async with sc.openai(token) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model=OPENAI_MODEL, messages=MSG
        )
    assert raw.parse().choices[0].message.content == REPLY
    assert raw.headers["x-sidecar-attempts"] == str(tries + 1)
    assert raw.headers["x-sidecar-key-id"] == "good"
    assert [r["key"] for r in await mock_log(http, mock_server)] == [bad] * tries + ["sk-good"]
    text = await metrics_text(http, sc)
    # The retry of the bad key is not a failover; the move to the good key is.
    assert metric_value(text, "sidecar_failovers_total", provider="openai", reason=reason) == 1
    assert (
        metric_value(text, "sidecar_upstream_attempts_total", key_id="bad", outcome=reason) == tries
    )


@pytest.mark.parametrize("status", [400, 404, 422])
async def test_no_failover_on_caller_errors(
    env: Env,
    sidecars: list[Sidecar],
    mock_server: TestServer,
    http: aiohttp.ClientSession,
    status: int,
    token: str,
) -> None:
    bad = f"sk-bad-fail-{status}"
    sc = await boot(env, sidecars, providers_yaml(env, openai=[("bad", bad), ("good", "sk-good")]))
    code, headers, body = await send(
        http, sc.url + "/v1/chat/completions", token=token, json=chat()
    )
    assert code == status
    assert f"simulated HTTP {status}" in orjson.loads(body)["error"]["message"]
    assert headers["x-sidecar-attempts"] == "1"
    assert headers["x-sidecar-key-id"] == "bad"
    assert [r["key"] for r in await mock_log(http, mock_server)] == [bad]


async def test_cooldown_skips_failed_key_next_time(
    env: Env,
    sidecars: list[Sidecar],
    mock_server: TestServer,
    http: aiohttp.ClientSession,
    token: str,
) -> None:
    bad = "sk-bad-fail-429-retry-120"
    sc = await boot(env, sidecars, providers_yaml(env, openai=[("bad", bad), ("good", "sk-good")]))
    url = sc.url + "/v1/chat/completions"
    _, first, _ = await send(http, url, token=token, json=chat())
    assert first["x-sidecar-attempts"] == "2"
    status, second, _ = await send(http, url, token=token, json=chat())
    assert status == 200
    assert (second["x-sidecar-attempts"], second["x-sidecar-key-id"]) == ("1", "good")
    assert [r["key"] for r in await mock_log(http, mock_server)] == [bad, "sk-good", "sk-good"]
    text = await metrics_text(http, sc)
    assert metric_value(text, "sidecar_key_cooling_down", key_id="bad") == 1
    assert metric_value(text, "sidecar_key_cooling_down", key_id="good") == 0


@pytest.mark.parametrize(
    ("value", "low", "high"),
    [
        ("sk-fail-429-retry-7", 1, 7),  # the upstream's retry-after, not rate_limited (300 s)
        ("sk-fail-quota", 8, 60),  # quota exhausted: auth_failed (60 s), not rate_limited (5 s)
    ],
)
async def test_cooldown_duration_from_retry_after_and_quota(
    env: Env,
    sidecars: list[Sidecar],
    http: aiohttp.ClientSession,
    value: str,
    low: int,
    high: int,
    token: str,
) -> None:
    cooldown = "failover:\n  cooldown: {rate_limited: 300s, auth_failed: 60s}\n"
    if "quota" in value:
        cooldown = "failover:\n  cooldown: {rate_limited: 5s, auth_failed: 60s}\n"
    sc = await boot(env, sidecars, providers_yaml(env, openai=[("only", value)]) + cooldown)
    url = sc.url + "/v1/chat/completions"
    status, _, _ = await send(http, url, token=token, json=chat())
    assert status == 429  # the upstream's own 429, relayed
    status, headers, body = await send(http, url, token=token, json=chat())
    assert status == 429
    assert orjson.loads(body)["error"]["code"] == "all_keys_cooling_down"
    assert low <= int(headers["retry-after"]) <= high


async def test_server_error_threshold(
    env: Env,
    sidecars: list[Sidecar],
    mock_server: TestServer,
    http: aiohttp.ClientSession,
    token: str,
) -> None:
    config = providers_yaml(env, openai=[("bad", "sk-bad-fail-500"), ("good", "sk-good")])
    sc = await boot(env, sidecars, config + "failover:\n  cooldown: {server_error_threshold: 2}\n")
    url = sc.url + "/v1/chat/completions"
    attempts = []
    for _ in range(3):
        status, headers, _ = await send(http, url, token=token, json=chat())
        assert status == 200
        attempts.append(headers["x-sidecar-attempts"])
    # 1st 500: not cooling yet, the same key is tried once more; that 2nd 500 starts the
    # cooldown, so the next requests skip the key.
    assert attempts == ["3", "1", "1"]
    keys = [r["key"] for r in await mock_log(http, mock_server)]
    assert keys.count("sk-bad-fail-500") == 2


async def test_all_keys_cooling_does_not_fall_to_managed(
    env: Env, sidecars: list[Sidecar], mock_server: TestServer, http: aiohttp.ClientSession
) -> None:
    managed_ref = env.secret("managed", "openai-1", "sk-managed-good")
    config = providers_yaml(env, openai=[("bad", "sk-bad-fail-429-retry-90")]) + (
        f'managed:\n  openai: [{{id: pool-1, value: "{managed_ref}"}}]\n'
        "ledger: {url: 'sqlite:///ledger.db'}\n"
    )
    token = env.access_key("app", credits=100.0)
    sc = await boot(env, sidecars, config)
    url = sc.url + "/v1/chat/completions"
    status, headers, body = await send(http, url, token=token, json=chat())
    assert status == 429
    assert "simulated HTTP 429" in orjson.loads(body)["error"]["message"]
    assert headers["x-sidecar-key-id"] == "bad"
    status, headers, body = await send(http, url, token=token, json=chat())
    assert status == 429
    assert orjson.loads(body)["error"]["code"] == "all_keys_cooling_down"
    assert headers["retry-after"].isdigit()
    assert 1 <= int(headers["retry-after"]) <= 90
    assert "x-should-retry" not in headers
    assert [r["key"] for r in await mock_log(http, mock_server)] == ["sk-bad-fail-429-retry-90"]
    text = await metrics_text(http, sc)
    assert metric_value(text, "sidecar_no_key_available_total", provider="openai") == 1


@pytest.mark.parametrize("fmt", ["openai", "anthropic"])
async def test_all_candidates_fail_relays_last_upstream_response(
    env: Env, sidecars: list[Sidecar], http: aiohttp.ClientSession, fmt: str, token: str
) -> None:
    keys = [("first", "sk-1-fail-500"), ("last", "sk-2-fail-503")]
    if fmt == "openai":
        sc = await boot(env, sidecars, providers_yaml(env, openai=keys))
        url, payload = sc.url + "/v1/chat/completions", chat()
    else:
        sc = await boot(env, sidecars, providers_yaml(env, anthropic=keys))
        url, payload = sc.url + "/v1/messages", claude()
    status, headers, body = await send(
        http, url, token=token, json=payload, anthropic=fmt == "anthropic"
    )
    assert status == 503
    doc = orjson.loads(body)
    err = doc["error"]
    assert "simulated HTTP 503" in err["message"]
    if fmt == "anthropic":
        assert doc["type"] == "error"
        assert err["type"] == "overloaded_error"
    assert headers["x-sidecar-attempts"] == "4"  # each key: once, and once more after a backoff
    assert headers["x-sidecar-key-id"] == "last"
    assert headers["x-sidecar-provider"] == fmt
    assert headers["x-sidecar-key-source"] == "policy"
    assert "x-sidecar-request-id" in headers
    assert "x-sidecar-overhead-ms" in headers


async def test_max_attempts_caps_attempts(
    env: Env,
    sidecars: list[Sidecar],
    mock_server: TestServer,
    http: aiohttp.ClientSession,
    token: str,
) -> None:
    keys: list[Key] = [(f"k{i}", f"sk-{i}-fail-500") for i in range(4)]
    sc = await boot(
        env, sidecars, providers_yaml(env, openai=keys) + "failover: {max_attempts: 2}\n"
    )
    status, headers, _ = await send(http, sc.url + "/v1/chat/completions", token=token, json=chat())
    assert status == 500
    # k0 once, then once more after a backoff: that is the cap, k1.. are never tried
    assert (headers["x-sidecar-attempts"], headers["x-sidecar-key-id"]) == ("2", "k0")
    assert [r["key"] for r in await mock_log(http, mock_server)] == [
        "sk-0-fail-500",
        "sk-0-fail-500",
    ]


# --------------------------------------------------------------------------- the sidecar's own errors

ORPHAN = {"openai": "orphan-gpt", "anthropic": "orphan-claude"}
OTHER_FORMAT_MODEL = {"openai": CLAUDE_MODEL, "anthropic": OPENAI_MODEL}
#: A field the other format has no place for (served translated, it would be lost).
UNCARRIED: dict[str, dict[str, Any]] = {
    "openai": {"logprobs": True},
    "anthropic": {"thinking": {"type": "enabled", "budget_tokens": 1024}},
}
Body = Callable[[str], Any]  # fmt -> JSON document, or raw bytes

ERROR_CASES = [
    pytest.param("invalid_json", 400, "app", lambda f: b'{"model": ', id="invalid_json"),
    pytest.param("invalid_json", 400, "app", lambda f: b'["a", "list"]', id="json_not_object"),
    pytest.param("model_missing", 400, "app", lambda f: {"messages": MSG}, id="model_missing"),
    pytest.param("model_missing", 400, "app", lambda f: payload(f, model=""), id="model_empty"),
    pytest.param(
        "model_unknown", 400, "app", lambda f: payload(f, model="mystery-1"), id="model_unknown"
    ),
    pytest.param(
        "translation_unsupported",
        400,
        "app",
        lambda f: payload(f, model=OTHER_FORMAT_MODEL[f], **UNCARRIED[f]),
        id="field_not_translatable",
    ),
    pytest.param(
        "no_provider_key", 400, "app", lambda f: payload(f, model=ORPHAN[f]), id="no_provider_key"
    ),
    pytest.param("access_key_invalid", 401, None, payload, id="key_missing"),
    pytest.param("access_key_invalid", 401, "stranger", payload, id="key_unknown"),
    pytest.param("access_key_invalid", 401, "gone", payload, id="key_revoked"),
    pytest.param("access_key_invalid", 401, None, lambda f: b"{bad", id="401_before_bad_json"),
    pytest.param(
        "access_key_invalid", 401, "gone", lambda f: {"x": 1}, id="401_before_model_missing"
    ),
    pytest.param("provider_not_allowed", 403, "wrong-provider", payload, id="provider_scope"),
    pytest.param("model_not_allowed", 403, "wrong-model", payload, id="model_scope"),
    pytest.param(
        "request_too_large",
        413,
        "app",
        lambda f: payload(f, metadata={"pad": "x" * 2000}),
        id="request_too_large",
    ),
]


@pytest.mark.parametrize("fmt", ["openai", "anthropic"])
@pytest.mark.parametrize(("code", "status", "who", "body"), ERROR_CASES)
async def test_sidecar_error(
    env: Env,
    sidecars: list[Sidecar],
    mock_server: TestServer,
    http: aiohttp.ClientSession,
    fmt: str,
    code: str,
    status: int,
    who: str | None,
    body: Body,
) -> None:
    orphans = (
        "  - id: nokey-o\n    base_url: UPSTREAM\n    format: openai\n    models: [orphan-gpt]\n"
        "  - id: nokey-a\n    base_url: UPSTREAM\n    format: anthropic\n    auth: x-api-key\n"
        "    models: [orphan-claude]\n"
        "limits: {max_body_bytes: 1000}\n"
    )
    config = providers_yaml(env, openai=[("o1", "sk-o")], anthropic=[("a1", "sk-a")], extra=orphans)
    tokens = {
        "app": env.access_key("app"),
        "gone": env.access_key("gone"),
        "wrong-provider": env.access_key("wp", providers=["nokey-o", "nokey-a"]),
        "wrong-model": env.access_key("wm", models=["gpt-4o", "claude-opus-4-1"]),
        "stranger": "sk-not-an-access-key",
    }
    with edit_vault(env.vault) as doc:
        doc.access_keys["gone"].revoked = True
    sc = await boot(env, sidecars, config)

    doc = body(fmt)
    raw = doc if isinstance(doc, bytes) else orjson.dumps(doc)
    status_, headers, out = await send(
        http, sc.url + ROUTE[fmt], token=tokens[who] if who else None, data=raw,
        headers={"content-type": "application/json", "x-request-id": f"e2e-{code}"},
        anthropic=fmt == "anthropic",
    )  # fmt: skip
    err = sidecar_error(fmt, status_, headers, out, code, status)
    assert headers["x-sidecar-request-id"] == f"e2e-{code}"
    if code == "no_provider_key":
        assert ("nokey-o" if fmt == "openai" else "nokey-a") in err["message"]
    assert await mock_log(http, mock_server) == []


async def test_route_not_found(
    env: Env, sidecars: list[Sidecar], http: aiohttp.ClientSession, token: str
) -> None:
    sc = await boot(env, sidecars, providers_yaml(env, openai=[("o1", "sk-o")]))
    for method, path, tok in [
        ("POST", "/nope/chat/completions", token),  # unknown provider, explicit route
        ("POST", "/nope/chat/completions", None),  # route comes before the access key
        ("GET", "/v1/nothing-here", token),
        ("POST", "/", token),  # GET/HEAD / are answered locally (agents probe it)
    ]:
        status, headers, body = await send(http, sc.url + path, method=method, token=tok,
                                           json=chat())  # fmt: skip
        err = sidecar_error("openai", status, headers, body, "route_not_found", 404)
        assert "x-sidecar-provider" not in headers, path
        assert err["type"]


@pytest.mark.parametrize("fmt", ["openai", "anthropic"])
async def test_only_allow_configured_providers(
    env: Env, sidecars: list[Sidecar], http: aiohttp.ClientSession, token: str, fmt: str
) -> None:
    other = "anthropic" if fmt == "openai" else "openai"
    config = (
        f"providers:\n  - id: {other}\n    base_url: UPSTREAM\n"
        f"    api_keys: {keys_yaml(env, other, [('k1', 'sk-k')])}\n"
        "only_allow_configured_providers: true\n"
    )
    sc = await boot(env, sidecars, config)
    status, headers, body = await send(http, sc.url + ROUTE[fmt], token=token, json=payload(fmt),
                                       anthropic=fmt == "anthropic")  # fmt: skip
    err = sidecar_error(fmt, status, headers, body, "provider_not_allowed", 403)
    assert fmt in err["message"]
    status, _, _ = await send(http, sc.url + ROUTE[other], token=token, json=payload(other),
                              anthropic=other == "anthropic")  # fmt: skip
    assert status == 200


@pytest.mark.parametrize("fmt", ["openai", "anthropic"])
async def test_only_allow_configured_models(
    env: Env, sidecars: list[Sidecar], http: aiohttp.ClientSession, token: str, fmt: str
) -> None:
    config = (
        "only_allow_configured_models: true\nproviders:\n"
        "  - id: openai\n    base_url: UPSTREAM\n    models: [gpt-4o]\n"
        f"    api_keys: {keys_yaml(env, 'openai', [('o1', 'sk-o')])}\n"
        "  - id: anthropic\n    base_url: UPSTREAM\n    models: [claude-opus-4-1]\n"
        f"    api_keys: {keys_yaml(env, 'anthropic', [('a1', 'sk-a')])}\n"
    )
    sc = await boot(env, sidecars, config)
    url, ant = sc.url + ROUTE[fmt], fmt == "anthropic"
    status, headers, body = await send(http, url, token=token, json=payload(fmt), anthropic=ant)
    sidecar_error(fmt, status, headers, body, "model_not_allowed", 403)
    allowed = "claude-opus-4-1" if ant else "gpt-4o"
    status, _, _ = await send(
        http, url, token=token, json=payload(fmt, model=allowed), anthropic=ant
    )
    assert status == 200


async def test_request_too_large_chunked_refused_before_body_ends(
    env: Env, sidecars: list[Sidecar], mock_server: TestServer, http: aiohttp.ClientSession,
    token: str,
) -> None:  # fmt: skip
    config = providers_yaml(env, openai=[("o1", "sk-o")], extra="limits: {max_body_bytes: 1000}\n")
    sc = await boot(env, sidecars, config)
    answered = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield b'{"model": "gpt-4o-mini", "pad": "'
        for _ in range(11):
            yield b"x" * 100
        # Hold the rest back until the sidecar has answered: the 413 must not wait for it.
        await asyncio.wait_for(answered.wait(), 10)
        yield b'"}'

    headers = {"Authorization": f"Bearer {token}", "content-type": "application/json"}
    async with asyncio.timeout(10):
        async with http.post(sc.url + ROUTE["openai"], data=body(), headers=headers) as resp:
            answered.set()
            assert "content-length" not in {k.lower() for k in resp.request_info.headers}
            out = await resp.read()
            status, got = resp.status, {k.lower(): v for k, v in resp.headers.items()}
    sidecar_error("openai", status, got, out, "request_too_large", 413)
    assert await mock_log(http, mock_server) == []


async def test_access_key_revoked_while_running(
    env: Env, sidecars: list[Sidecar], http: aiohttp.ClientSession, token: str
) -> None:
    sc = await boot(env, sidecars, providers_yaml(env, openai=[("o1", "sk-o")]))
    url = sc.url + ROUTE["openai"]
    status, _, _ = await send(http, url, token=token, json=chat())
    assert status == 200
    with edit_vault(env.vault) as doc:
        doc.access_keys["app"].revoked = True

    async def refused() -> bool:
        return (await send(http, url, token=token, json=chat()))[0] == 401

    await wait_for(refused, "the revocation to be reloaded")
    status, headers, body = await send(http, url, token=token, json=chat())
    sidecar_error("openai", status, headers, body, "access_key_invalid", 401)


@pytest.mark.parametrize("fmt", ["openai", "anthropic"])
async def test_credits_exhausted(
    env: Env, sidecars: list[Sidecar], mock_server: TestServer, http: aiohttp.ClientSession,
    fmt: str,
) -> None:  # fmt: skip
    ref = env.secret("managed", "pool", "sk-managed")
    broke = env.access_key("broke", credits=0.0)
    config = (
        f"providers:\n  - id: {fmt}\n    base_url: UPSTREAM\n"
        f'managed:\n  {fmt}: [{{id: pool-1, value: "{ref}"}}]\n'
        "ledger: {url: 'sqlite:///ledger.db'}\n"
    )
    sc = await boot(env, sidecars, config)
    status, headers, body = await send(http, sc.url + ROUTE[fmt], token=broke, json=payload(fmt),
                                       anthropic=fmt == "anthropic")  # fmt: skip
    sidecar_error(fmt, status, headers, body, "credits_exhausted", 402)
    assert await mock_log(http, mock_server) == []


@pytest.mark.parametrize("fmt", ["openai", "anthropic"])
async def test_all_keys_cooling_down(
    env: Env, sidecars: list[Sidecar], http: aiohttp.ClientSession, token: str, fmt: str
) -> None:
    keys: list[Key] = [("k1", "sk-1-fail-429-retry-60"), ("k2", "sk-2-fail-401")]
    config = providers_yaml(env, **{fmt: keys})  # type: ignore[arg-type]
    sc = await boot(env, sidecars, config)
    url, ant = sc.url + ROUTE[fmt], fmt == "anthropic"
    status, _, _ = await send(http, url, token=token, json=payload(fmt), anthropic=ant)
    assert status == 401  # the last upstream answer
    status, headers, body = await send(http, url, token=token, json=payload(fmt), anthropic=ant)
    sidecar_error(fmt, status, headers, body, "all_keys_cooling_down", 429)
    assert headers["retry-after"].isdigit()
    assert 1 <= int(headers["retry-after"]) <= 60  # the soonest recovery: k1


@pytest.mark.parametrize("fmt", ["openai", "anthropic"])
async def test_upstream_unavailable(
    env: Env, sidecars: list[Sidecar], mock_server: TestServer, http: aiohttp.ClientSession,
    token: str, fmt: str,
) -> None:  # fmt: skip
    keys: list[Key] = [("d1", "sk-1-drop"), ("d2", "sk-2-drop")]
    sc = await boot(env, sidecars, providers_yaml(env, **{fmt: keys}))  # type: ignore[arg-type]
    status, headers, body = await send(http, sc.url + ROUTE[fmt], token=token, json=payload(fmt),
                                       anthropic=fmt == "anthropic")  # fmt: skip
    sidecar_error(fmt, status, headers, body, "upstream_unavailable", 502)
    assert headers["x-sidecar-attempts"] == "4"  # each key once, and once more after a backoff
    assert headers["x-sidecar-key-id"] == "d2"
    assert [r["key"] for r in await mock_log(http, mock_server)] == [
        "sk-1-drop", "sk-1-drop", "sk-2-drop", "sk-2-drop",
    ]  # fmt: skip
    text = await metrics_text(http, sc)
    assert metric_value(text, "sidecar_upstream_attempts_total", outcome="connect_error") == 4


@pytest.mark.parametrize("fmt", ["openai", "anthropic"])
async def test_gateway_timeout(
    env: Env, sidecars: list[Sidecar], http: aiohttp.ClientSession, token: str, fmt: str
) -> None:
    keys: list[Key] = [(f"s{i}", f"sk-{i}-slow-1500") for i in range(3)]
    limits = "timeouts: {per_request: 300ms, total: 500ms}\n"
    sc = await boot(env, sidecars, providers_yaml(env, **{fmt: keys}) + limits)  # type: ignore[arg-type]
    status, headers, body = await send(http, sc.url + ROUTE[fmt], token=token, json=payload(fmt),
                                       anthropic=fmt == "anthropic")  # fmt: skip
    sidecar_error(fmt, status, headers, body, "gateway_timeout", 504)
    attempts = int(headers["x-sidecar-attempts"])
    assert attempts in (1, 2)  # 300 ms, then what is left of the 500 ms: never the third key
    text = await metrics_text(http, sc)
    assert metric_value(text, "sidecar_upstream_attempts_total", outcome="timeout") == attempts
