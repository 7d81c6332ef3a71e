"""The built-in catalog: every OpenAI-compatible host answers through the mock with its
auth style (base URL overridden), model-name patterns route to it, and model lists show
only providers the caller has a key for."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from sidecar.catalog import BUILTIN_PROVIDERS, CATALOG_LISTED
from sidecar.config import parse_config_text
from sidecar.errors import ConfigError
from tests.harness import Env, Sidecar
from tests.test_proxy_e2e import MSG, REPLY, boot, keys_yaml, mock_log

HOSTS = [
    p
    for p, row in BUILTIN_PROVIDERS.items()
    if row.format == "openai" and p not in ("openai", "azure")
]


def host_yaml(env: Env, pid: str, key: str, extra: str = "") -> str:
    return (
        f"providers:\n  - id: {pid}\n    base_url: UPSTREAM\n"
        f"    api_keys: {keys_yaml(env, pid, [('k1', key)])}\n" + extra
    )


@pytest.mark.parametrize("pid", HOSTS)
async def test_each_openai_compatible_host_answers_with_its_key_as_a_bearer(
    env: Env, sidecars: list[Sidecar], token: str, http: aiohttp.ClientSession,
    mock_server: TestServer, pid: str,
) -> None:  # fmt: skip
    assert BUILTIN_PROVIDERS[pid].format == "openai"
    sc = await boot(env, sidecars, host_yaml(env, pid, f"sk-{pid}-one"))
    async with sc.openai(token) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model=f"{pid}:some-model", messages=MSG
        )
    assert raw.parse().choices[0].message.content == REPLY
    assert raw.headers["x-sidecar-provider"] == pid
    (sent,) = await mock_log(http, mock_server)
    assert sent["headers"]["authorization"] == f"Bearer sk-{pid}-one"
    assert (sent["path"], sent["body"]["model"]) == ("/v1/chat/completions", "some-model")


@pytest.mark.parametrize(
    ("model", "pid"),
    [("deepseek-chat", "deepseek"), ("mistral-large-latest", "mistral"),
     ("codestral-latest", "mistral"), ("grok-4", "xai")],
)  # fmt: skip
async def test_model_name_patterns_route_to_their_host(
    env: Env, sidecars: list[Sidecar], token: str, model: str, pid: str
) -> None:
    sc = await boot(env, sidecars, host_yaml(env, pid, f"sk-{pid}-one"))
    async with sc.openai(token) as client:
        raw = await client.chat.completions.with_raw_response.create(model=model, messages=MSG)
    assert raw.headers["x-sidecar-provider"] == pid
    assert raw.headers["x-sidecar-model"] == model


async def test_an_api_key_header_provider_sends_the_key_there(
    env: Env, sidecars: list[Sidecar], token: str, http: aiohttp.ClientSession,
    mock_server: TestServer,
) -> None:  # fmt: skip
    sc = await boot(env, sidecars, (
        "providers:\n  - id: azure-east\n    base_url: UPSTREAM\n    format: openai\n"
        "    auth: api-key\n    models: [my-deployment]\n"
        f"    api_keys: {keys_yaml(env, 'azure-east', [('a', 'az-one'), ('b', 'az-two')])}\n"
    ))  # fmt: skip
    async with sc.openai(token) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="my-deployment", messages=MSG
        )
    assert raw.parse().choices[0].message.content == REPLY
    (sent,) = await mock_log(http, mock_server)
    assert sent["headers"]["api-key"] == "az-one"
    assert "authorization" not in sent["headers"]


async def test_model_lists_show_only_providers_the_caller_has_a_key_for(
    env: Env, sidecars: list[Sidecar]
) -> None:
    token = env.access_key("app")
    env.attach("app", "deepseek", "mine", "sk-deepseek-attached")
    sc = await boot(env, sidecars, host_yaml(env, "openai", "sk-openai-one"))
    async with sc.openai(token) as client:
        owners = {m.owned_by async for m in client.models.list()}
        ids = {m.id async for m in client.models.list()}
    assert owners == {"openai", "deepseek"}  # not anthropic, groq, … (no key for those)
    assert set(CATALOG_LISTED["deepseek"]) <= ids


async def test_azure_deployments_fail_over_between_two_keys_and_are_listed(
    env: Env, sidecars: list[Sidecar], token: str, http: aiohttp.ClientSession,
    mock_server: TestServer,
) -> None:  # fmt: skip
    keys = keys_yaml(env, "azure", [("east-1", "az-fail-429"), ("east-2", "az-good")])
    sc = await boot(env, sidecars, (
        "providers:\n  - id: azure\n    base_url: UPSTREAM\n"
        f"    models: [my-gpt-4o]\n    api_keys: {keys}\n"
    ))  # fmt: skip
    async with sc.openai(token) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="my-gpt-4o", messages=MSG
        )
        assert raw.parse().choices[0].message.content == REPLY
        assert (raw.headers["x-sidecar-provider"], raw.headers["x-sidecar-key-id"]) == (
            "azure", "east-2",
        )  # fmt: skip
        assert ("my-gpt-4o", "azure") in {(m.id, m.owned_by) async for m in client.models.list()}
    sent = await mock_log(http, mock_server)
    assert [r["headers"]["api-key"] for r in sent][-1] == "az-good"
    assert all("authorization" not in r["headers"] for r in sent)


def test_azure_needs_its_resource_url(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"providers\[0\]\.base_url: .*openai\.azure\.com"):
        parse_config_text("providers:\n  - id: azure\n", tmp_path / "sidecar.yaml")


# --------------------------------------------------------------------------- google and Azure


async def test_google_is_reached_with_its_key_in_x_goog_api_key(
    env: Env, sidecars: list[Sidecar], token: str, http: aiohttp.ClientSession,
    mock_server: TestServer,
) -> None:  # fmt: skip
    keys = keys_yaml(env, "google", [("g1", "gk-google-one")])
    sc = await boot(env, sidecars, (
        f"providers:\n  - id: google\n    base_url: {mock_server.make_url('/v1beta')}\n"
        f"    api_keys: {keys}\n"
    ))  # fmt: skip
    async with sc.openai(token) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="gemini-2.5-flash", messages=MSG
        )
        listed = {(m.id, m.owned_by) async for m in client.models.list()}
    assert raw.parse().choices[0].message.content == REPLY
    assert (raw.headers["x-sidecar-provider"], raw.headers["x-sidecar-key-id"]) == ("google", "g1")
    assert {(m, "google") for m in CATALOG_LISTED["google"]} <= listed
    (sent,) = await mock_log(http, mock_server)
    assert sent["path"] == "/v1beta/models/gemini-2.5-flash:generateContent"
    assert (sent["auth"], sent["headers"]["x-goog-api-key"]) == ("x-goog-api-key", "gk-google-one")
    assert "authorization" not in sent["headers"]
    assert sent["query"] == {}
    assert token not in str(sent)


def azure_yaml(env: Env, base_url: str, keys: list[tuple[str, str]], extra: str = "") -> str:
    return (
        f"providers:\n  - id: azure\n    base_url: {base_url}\n"
        f"    models: [my-gpt-4o, my-embedder]\n"
        f"    api_keys: {keys_yaml(env, 'azure', keys)}\n" + extra
    )


@pytest.mark.parametrize("under", ["", "/openai"], ids=["resource", "resource-openai"])
async def test_azure_at_a_resource_url_uses_deployment_routes_and_fails_over(
    env: Env, sidecars: list[Sidecar], token: str, http: aiohttp.ClientSession,
    mock_server: TestServer, under: str,
) -> None:  # fmt: skip
    """Azure's own 429 (retry-after 30 s, too long to wait out) cools the first key for that
    deployment; the second key answers at once, on the deployment's URL with `api-version`."""
    base = str(mock_server.make_url(under))
    keys = [("east-1", "az-fail-429-retry-30"), ("east-2", "az-good")]
    sc = await boot(env, sidecars, azure_yaml(env, base, keys))
    async with sc.openai(token) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="my-gpt-4o", messages=MSG
        )
        emb = await client.embeddings.with_raw_response.create(model="my-embedder", input="hi")
        listed = {(m.id, m.owned_by) async for m in client.models.list()}
    assert raw.parse().choices[0].message.content == REPLY
    assert (raw.headers["x-sidecar-provider"], raw.headers["x-sidecar-key-id"]) == (
        "azure", "east-2",
    )  # fmt: skip
    assert emb.parse().data[0].embedding
    assert {("my-gpt-4o", "azure"), ("my-embedder", "azure")} <= listed
    sent = await mock_log(http, mock_server)
    assert [(r["path"], r["query"], r["auth"], r["key"]) for r in sent] == [
        ("/openai/deployments/my-gpt-4o/chat/completions", {"api-version": "2024-10-21"},
         "api-key", "az-fail-429-retry-30"),
        ("/openai/deployments/my-gpt-4o/chat/completions", {"api-version": "2024-10-21"},
         "api-key", "az-good"),
        # the first key cools only for my-gpt-4o: it is still tried for the embedder
        ("/openai/deployments/my-embedder/embeddings", {"api-version": "2024-10-21"},
         "api-key", "az-fail-429-retry-30"),
        ("/openai/deployments/my-embedder/embeddings", {"api-version": "2024-10-21"},
         "api-key", "az-good"),
    ]  # fmt: skip
    assert all("authorization" not in r["headers"] for r in sent)
    assert token not in str(sent)
    async with http.get(sc.admin_url + "/keys") as r:
        cooling = [k for k in (await r.json())["keys"] if k["key_id"] == "east-1"]
    assert sorted((k["state"], k["model"], k["last_status"]) for k in cooling) == [
        ("cooling", "my-embedder", 429), ("cooling", "my-gpt-4o", 429),
    ]  # fmt: skip
    for k in cooling:  # Azure's retry-after (30 s) is the cooldown
        until = datetime.fromisoformat(k["until"].replace("Z", "+00:00"))
        assert 20 < (until - datetime.now(UTC)).total_seconds() <= 31


async def test_azure_query_params_set_the_api_version(
    env: Env, sidecars: list[Sidecar], token: str, http: aiohttp.ClientSession,
    mock_server: TestServer,
) -> None:  # fmt: skip
    extra = "    query_params: {api-version: 2025-04-01-preview}\n"
    sc = await boot(env, sidecars, azure_yaml(env, str(mock_server.make_url("")),
                                              [("a", "az-one")], extra))  # fmt: skip
    async with sc.openai(token) as client:
        await client.chat.completions.create(model="my-gpt-4o", messages=MSG)
    (sent,) = await mock_log(http, mock_server)
    assert sent["path"] == "/openai/deployments/my-gpt-4o/chat/completions"
    assert sent["query"] == {"api-version": "2025-04-01-preview"}


async def test_an_anthropic_caller_reaches_an_azure_deployment_translated(
    env: Env, sidecars: list[Sidecar], token: str, http: aiohttp.ClientSession,
    mock_server: TestServer,
) -> None:  # fmt: skip
    sc = await boot(env, sidecars, azure_yaml(env, str(mock_server.make_url("")),
                                              [("a", "az-one")]))  # fmt: skip
    async with sc.anthropic(token) as client:
        raw = await client.messages.with_raw_response.create(
            model="my-gpt-4o", max_tokens=64, messages=MSG
        )
    msg = await raw.parse()
    assert "".join(b.text for b in msg.content if b.type == "text") == REPLY
    assert (msg.usage.input_tokens, msg.usage.output_tokens) == (4, len(REPLY.split()))
    assert raw.headers["x-sidecar-provider"] == "azure"
    assert raw.headers["x-sidecar-translated"] == "anthropic->openai"
    (sent,) = await mock_log(http, mock_server)
    assert (sent["path"], sent["query"]) == (
        "/openai/deployments/my-gpt-4o/chat/completions", {"api-version": "2024-10-21"},
    )  # fmt: skip
    assert (sent["format"], sent["auth"], sent["key"]) == ("openai", "api-key", "az-one")
    assert sent["body"]["messages"][-1]["content"] == MSG[0]["content"]


async def test_azure_v1_api_takes_the_deployment_in_the_body(
    env: Env, sidecars: list[Sidecar], token: str, http: aiohttp.ClientSession,
    mock_server: TestServer,
) -> None:  # fmt: skip
    sc = await boot(env, sidecars, azure_yaml(env, str(mock_server.make_url("/openai/v1")),
                                              [("a", "az-one")]))  # fmt: skip
    async with sc.openai(token) as client:
        done = await client.chat.completions.create(model="my-gpt-4o", messages=MSG)
    assert done.choices[0].message.content == REPLY
    (sent,) = await mock_log(http, mock_server)
    assert (sent["path"], sent["query"]) == ("/openai/v1/chat/completions", {})
    assert (sent["body"]["model"], sent["auth"], sent["key"]) == ("my-gpt-4o", "api-key", "az-one")
