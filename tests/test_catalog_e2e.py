"""The built-in catalog: every OpenAI-compatible host answers through the mock with its
auth style (base URL overridden), model-name patterns route to it, and model lists show
only providers the caller has a key for."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from sidecar.catalog import BUILTIN_PROVIDERS, CATALOG_LISTED
from sidecar.config import parse_config_text
from sidecar.errors import ConfigError
from tests.harness import Env, Sidecar
from tests.test_proxy_e2e import MSG, REPLY, boot, keys_yaml, mock_log

HOSTS = [p for p, row in BUILTIN_PROVIDERS.items() if row.format == "openai" and p not in ("openai", "azure")]


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
