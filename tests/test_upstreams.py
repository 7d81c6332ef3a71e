"""Where an attempt goes under a provider's base URL, and how its key is sent (pure)."""

from __future__ import annotations

import pytest

from sidecar.errors import ErrorCode, ProxyError
from sidecar.secret import Secret
from sidecar.upstreams import auth_header, upstream_for

AZURE = "https://res.openai.azure.com"


def test_openai_compatible_hosts_and_anthropic_take_the_route_as_it_is() -> None:
    oa = upstream_for("deepseek", "openai", "https://api.deepseek.com/v1", "")
    assert oa.native("/embeddings", "m", "") == ("/embeddings", "")
    assert oa.chat("m", True) == ("/chat/completions", "")
    assert oa.chat_headers == ()
    an = upstream_for("anthropic", "anthropic", "https://api.anthropic.com/v1", "")
    assert an.native("/messages/count_tokens", "m", "") == ("/messages/count_tokens", "")
    assert an.chat("m", False) == ("/messages", "")
    assert an.chat_headers == (("anthropic-version", "2023-06-01"),)


def test_gemini_takes_the_model_and_the_action_in_the_path() -> None:
    g = upstream_for("google", "gemini", "https://generativelanguage.googleapis.com/v1beta", "")
    assert g.native("/models/x:countTokens", "gemini-2.5-flash", "countTokens") == (
        "/models/gemini-2.5-flash:countTokens", "")  # fmt: skip
    assert g.chat("gemini-2.5-flash", False) == ("/models/gemini-2.5-flash:generateContent", "")
    assert g.chat("gemini-2.5-flash", True) == (
        "/models/gemini-2.5-flash:streamGenerateContent", "alt=sse")  # fmt: skip


@pytest.mark.parametrize(("base", "under"), [(AZURE, "/openai/deployments"),
                                             (AZURE + "/", "/openai/deployments"),
                                             (AZURE + "/openai", "/deployments")])  # fmt: skip
def test_azure_at_a_resource_url_takes_the_deployment_and_an_api_version(
    base: str, under: str
) -> None:
    az = upstream_for("azure", "openai", base, "")
    assert az.native("/embeddings", "emb", "") == (f"{under}/emb/embeddings",
                                                   "api-version=2024-10-21")  # fmt: skip
    assert az.chat("gpt-4o-prod", True) == (f"{under}/gpt-4o-prod/chat/completions",
                                            "api-version=2024-10-21")  # fmt: skip
    # The provider's own `query_params` version wins: no second one is added.
    own = upstream_for("azure", "openai", base, "api-version=2025-01-01")
    assert own.chat("d", False)[1] == ""


@pytest.mark.parametrize(("pid", "base"), [("azure", AZURE + "/openai/v1"),
                                           ("azure", AZURE + "/openai/deployments/gpt-4o"),
                                           ("my-azure", AZURE)])  # fmt: skip
def test_azure_v1_a_deployment_url_or_another_id_is_routed_as_openai(pid: str, base: str) -> None:
    up = upstream_for(pid, "openai", base, "")
    assert up.chat("d", False) == ("/chat/completions", "")


@pytest.mark.parametrize("model", ["a/b", "..", ".", "a\\b", "a?b", "a#b", ""])
def test_a_model_that_is_not_one_path_segment_is_refused(model: str) -> None:
    for up in (upstream_for("google", "gemini", "https://g.example/v1beta", ""),
               upstream_for("azure", "openai", AZURE, "")):  # fmt: skip
        with pytest.raises(ProxyError) as info:
            up.chat(model, False)
        assert info.value.code is ErrorCode.INVALID_REQUEST


def test_each_auth_style_puts_the_key_in_its_header() -> None:
    key = Secret("sk-1")
    assert auth_header("bearer", key) == ("Authorization", "Bearer sk-1")
    for name in ("x-api-key", "api-key", "x-goog-api-key"):
        assert auth_header(name, key) == (name, "sk-1")
    assert auth_header("none", key) is None
    assert auth_header("bearer", None) is None


def test_only_upstreams_with_the_model_in_the_path_say_so() -> None:
    assert upstream_for("google", "gemini", "https://g.example/v1beta", "").model_in_path
    assert upstream_for("azure", "openai", AZURE, "").model_in_path
    assert not upstream_for("openai", "openai", "https://api.openai.com/v1", "").model_in_path
    assert not upstream_for("anthropic", "anthropic", "https://api.anthropic.com/v1",
                            "").model_in_path  # fmt: skip
