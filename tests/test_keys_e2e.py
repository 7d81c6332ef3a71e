"""Key health you can see (docs/reference.md#admin-port): `GET /keys` and `sidecar status`
against a running sidecar, with failures provoked through the mock provider."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from typing import Any

import aiohttp
import anthropic
import openai
import pytest

from tests.harness import Env, Sidecar, metric_value, sidecar_cmd, subprocess_env

POLICY_OPENAI = "sk-policy-LEAKPROBE-openai-Qw12"
DEAD_ANTHROPIC = "sk-ant-LEAKPROBE-dead-fail-401"
QUOTA_OPENAI = "sk-LEAKPROBE-broke-fail-quota"
TEAM_OPENAI = "sk-team-LEAKPROBE-private-Er34"
VALUES = (POLICY_OPENAI, DEAD_ANTHROPIC, QUOTA_OPENAI, TEAM_OPENAI)

CONFIG = """\
providers:
  - id: openai
    base_url: UPSTREAM
    api_keys: [{id: pol, value: "${secrets.get('openai', 'policy')}"}]
  - id: anthropic
    base_url: UPSTREAM
    api_keys: [{id: dead, value: "${secrets.get('anthropic', 'dead')}"}]
  - id: broke
    format: openai
    base_url: UPSTREAM
    models: [broke-model]
    api_keys: [{id: broke-key, value: "${secrets.get('broke', 'key')}"}]
"""
LIMITED = "gpt-4o-mini-fail-429-retry-60"  # a model the mock rate-limits for 60 s
MESSAGES: list[Any] = [{"role": "user", "content": "hello there"}]


@pytest.fixture
async def sc(env: Env, sidecars: list[Sidecar], token: str) -> Sidecar:
    """A sidecar whose vault already holds the `token` access key."""
    env.secret("openai", "policy", POLICY_OPENAI)
    env.secret("anthropic", "dead", DEAD_ANTHROPIC)
    env.secret("broke", "key", QUOTA_OPENAI)
    env.write_config(CONFIG)
    started = await env.start()
    sidecars.append(started)
    return started


async def get_keys(sc: Sidecar) -> tuple[list[dict[str, Any]], str]:
    async with aiohttp.ClientSession() as http, http.get(sc.admin_url + "/keys") as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        text = await resp.text()
        return (await resp.json())["keys"], text


async def metrics_text(sc: Sidecar) -> str:
    async with aiohttp.ClientSession() as http, http.get(sc.admin_url + "/metrics") as resp:
        return await resp.text()


def entries(keys: list[dict[str, Any]], **match: Any) -> list[dict[str, Any]]:
    return [k for k in keys if all(k[f] == v for f, v in match.items())]


def assert_until_in(entry: dict[str, Any], seconds: float) -> None:
    """`until` is wall-clock UTC about `seconds` from now."""
    assert entry["until"].endswith("Z")
    until = datetime.fromisoformat(entry["until"].replace("Z", "+00:00")).timestamp()
    assert seconds - 5 <= until - time.time() <= seconds + 1


def assert_no_secret(sc: Sidecar, text: str) -> None:
    for value in VALUES:
        assert value not in text
        assert "LEAKPROBE" not in text
    for health_id in sc.running.state.runtime.key_labels:  # nor a hash of a value
        assert health_id not in text
        assert health_id.split(":", 1)[1] not in text


async def test_every_key_starts_ok_with_every_field(sc: Sidecar, token: str) -> None:
    keys, text = await get_keys(sc)
    assert entries(keys, provider="openai", key_id="pol") == [{
        "provider": "openai", "source": "policy", "key_id": "pol", "access_key": None,
        "model": None, "state": "ok", "until": None, "reason": None, "last_status": None,
        "quota": [],
    }]  # fmt: skip
    assert {(k["provider"], k["key_id"], k["state"]) for k in keys} == {
        ("openai", "pol", "ok"), ("anthropic", "dead", "ok"), ("broke", "broke-key", "ok")
    }  # fmt: skip
    assert_no_secret(sc, text)


async def test_a_429_cools_one_model_and_the_key_serves_the_others(sc: Sidecar, token: str) -> None:
    async with sc.openai(token) as client:
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(model=LIMITED, messages=MESSAGES)
        answer = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert answer.choices[0].message.content == "Hello from the mock provider."
    keys, text = await get_keys(sc)
    (pair,) = entries(keys, provider="openai", key_id="pol")  # no key-wide line: other models ok
    assert pair["model"] == LIMITED
    assert (pair["state"], pair["reason"]) == ("cooling", "rate_limited")
    assert pair["access_key"] is None
    assert_until_in(pair, 60)
    assert [k["state"] for k in entries(keys, provider="anthropic")] == ["ok"]
    assert_no_secret(sc, text)


async def test_a_401_makes_the_key_dead_for_every_model(sc: Sidecar, token: str) -> None:
    async with sc.anthropic(token) as client:
        with pytest.raises(anthropic.AuthenticationError):
            await client.messages.create(
                model="claude-3-5-haiku-latest", max_tokens=16, messages=MESSAGES
            )
    keys, text = await get_keys(sc)
    (dead,) = entries(keys, provider="anthropic", key_id="dead")
    assert dead["model"] is None
    assert (dead["state"], dead["reason"]) == ("dead", "auth_failed")
    assert_until_in(dead, 300)  # `cooldown.auth_failed` default
    assert_no_secret(sc, text)


async def test_a_quota_exhausted_429_makes_the_key_dead(sc: Sidecar, token: str) -> None:
    async with sc.openai(token) as client:
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(model="broke-model", messages=MESSAGES)
    keys, _ = await get_keys(sc)
    (dead,) = entries(keys, provider="broke")
    assert (dead["model"], dead["state"], dead["reason"]) == (None, "dead", "rate_limited")


async def test_an_attached_key_names_its_access_key_in_keys_status_and_the_gauge(
    env: Env, sidecars: list[Sidecar]
) -> None:
    env.secret("openai", "policy", POLICY_OPENAI)
    team = env.access_key("team")
    env.attach("team", "openai", "team-key", TEAM_OPENAI)
    env.write_config(
        "providers:\n  - id: openai\n    base_url: UPSTREAM\n"
        "    api_keys: [{id: pol, value: \"${secrets.get('openai', 'policy')}\"}]\n"
    )
    sc = await env.start()
    sidecars.append(sc)
    async with sc.openai(team) as client:
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(model=LIMITED, messages=MESSAGES)
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)

    keys, text = await get_keys(sc)
    (attached,) = entries(keys, source="attached")
    assert attached == {
        "provider": "openai", "source": "attached", "key_id": "team-key", "access_key": "team",
        "model": LIMITED, "state": "cooling", "until": attached["until"],
        "reason": "rate_limited", "last_status": attached["last_status"], "quota": [],
    }  # fmt: skip
    (policy,) = entries(keys, source="policy")
    assert (policy["access_key"], policy["state"], policy["last_status"]) == (None, "ok", None)
    assert_no_secret(sc, text)

    m = await metrics_text(sc)
    assert metric_value(m, "sidecar_key_cooling_down", key_id="team-key", access_key="team") == 1
    assert metric_value(m, "sidecar_key_cooling_down", key_id="pol", access_key="") == 0

    proc = await asyncio.create_subprocess_exec(
        *sidecar_cmd("status", "--admin", sc.admin_url), env=subprocess_env(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert lines[0].split() == ["PROVIDER", "SOURCE", "KEY_ID", "ACCESS_KEY", "MODEL", "STATE",
                                "UNTIL", "REASON", "LAST_STATUS"]  # fmt: skip
    rows = [line.split() for line in lines[1:]]
    (row,) = (r for r in rows if r[1] == "attached")
    assert row[:6] + row[7:] == ["openai", "attached", "team-key", "team", LIMITED, "cooling",
                                 "rate_limited", str(attached["last_status"] or "-")]  # fmt: skip
    assert_until_in({"until": row[6]}, 60)
    assert ["openai", "policy", "pol", "-", "-", "ok", "-", "-", "-"] in rows
    assert len(rows) == 2
    assert_no_secret(sc, out.decode())


async def test_last_status_is_the_last_upstream_status_of_the_key_or_pair(
    sc: Sidecar, token: str
) -> None:
    async with sc.openai(token) as client:
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        keys, _ = await get_keys(sc)
        assert entries(keys, key_id="pol")[0]["last_status"] == 200
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(model=LIMITED, messages=MESSAGES)
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(model="broke-model", messages=MESSAGES)
    async with sc.anthropic(token) as client:
        with pytest.raises(anthropic.AuthenticationError):
            await client.messages.create(
                model="claude-3-5-haiku-latest", max_tokens=16, messages=MESSAGES
            )
    keys, _ = await get_keys(sc)
    assert {(k["key_id"], k["state"], k["last_status"]) for k in keys} == {
        ("pol", "cooling", 429), ("dead", "dead", 401), ("broke-key", "dead", 429)
    }  # fmt: skip


async def test_status_against_a_port_that_is_not_an_admin_port_is_one_clear_error(
    sc: Sidecar,
) -> None:
    proc = await asyncio.create_subprocess_exec(
        *sidecar_cmd("status", "--admin", sc.url), env=subprocess_env(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert (proc.returncode, out) == (1, b"")
    assert err.decode() == (
        f"error: {sc.url}/keys answered 404; is {sc.url} a sidecar's admin port?\n"
    )
