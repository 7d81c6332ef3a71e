"""Stage two (STYLE §2): config + opened vault → runtime, references resolved, ids derived."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from sidecar.config import Config, parse_config_text
from sidecar.keys import NO_KEY_ID, KeySource
from sidecar.ratelimits import RateLimits
from sidecar.runtime import Runtime, build_runtime
from sidecar.secret import Secret, fingerprint
from sidecar.vault import AccessKeyRecord, AttachedKey, OpenedVault, hash_access_key

SECRETS = {
    ("openai", "primary"): Secret("sk-RUNTIME-openai-primary-1111aaaa"),
    ("openai", "backup"): Secret("sk-RUNTIME-openai-backup-2222bbbb"),
    ("openai", "third"): Secret("sk-RUNTIME-openai-third-3333cccc"),
    ("azure", "key"): Secret("az-RUNTIME-header-4444dddd"),
    ("managed", "openai-1"): Secret("sk-RUNTIME-managed-oai-5555eeee"),
    ("managed", "anthropic-1"): Secret("sk-ant-RUNTIME-managed-6666ffff"),
}
ATTACHED_OLD = Secret("sk-RUNTIME-attached-old-7777")
ATTACHED_NEW = Secret("sk-RUNTIME-attached-new-8888")
ATTACHED_ANT = Secret("sk-ant-RUNTIME-attached-9999")
TOKENS = {"checkout": "sk-sc-checkout-token-abc", "retired": "sk-sc-retired-token-def"}

CONFIG = """
providers:
  - id: openai
    api_keys:
      - id: org-primary
        value: ${secrets.get('openai', 'primary')}
      - value: ${secrets.get('openai', 'backup')}
      - id: org-third
        value: ${secrets.get('openai', 'third')}
  - id: ollama
    base_url: http://127.0.0.1:11434/v1
    format: openai
    auth: none
    models: [llama3.2]
  - id: azure
    base_url: https://example.openai.azure.com/openai/deployments/gpt-4o
    format: openai
    auth: none
    headers: {api-key: "${secrets.get('azure', 'key')}"}
    query_params: {api-version: "2024-10-21"}
  - id: old
    base_url: http://old.example/v1
    format: openai
    disabled: true
managed:
  openai:    [{id: pool-1, value: "${secrets.get('managed', 'openai-1')}"}]
  anthropic: [{value: "${secrets.get('managed', 'anthropic-1')}"}]
"""


def config(text: str = CONFIG) -> Config:
    return parse_config_text(textwrap.dedent(text), Path("/etc/sidecar/sidecar.yaml"))


def opened_vault(secrets: dict[tuple[str, str], Secret] | None = None) -> OpenedVault:
    return OpenedVault(
        recipient="unused",
        secrets=SECRETS if secrets is None else secrets,
        access_keys=(
            AccessKeyRecord(
                name="checkout",
                hash=hash_access_key(TOKENS["checkout"]),
                revoked=False,
                credits_usd=2.5,
                allowed_providers=frozenset({"openai", "anthropic"}),
                allowed_models=frozenset(),
                attached=(  # newest first, as open_vault returns them
                    AttachedKey("team-new", "openai", 200.0, ATTACHED_NEW),
                    AttachedKey("ant-1", "anthropic", 150.0, ATTACHED_ANT),
                    AttachedKey("team-old", "openai", 100.0, ATTACHED_OLD),
                ),
                rpm=600,
                tpm=90_000,
            ),
            AccessKeyRecord(
                name="retired",
                hash=hash_access_key(TOKENS["retired"]),
                revoked=True,
                credits_usd=0.0,
                allowed_providers=frozenset(),
                allowed_models=frozenset(),
                attached=(),
            ),
        ),
    )


@pytest.fixture
def runtime() -> Runtime:
    rt, problems = build_runtime(config(), opened_vault())
    assert problems == []
    return rt


def token_key(token: str) -> str:
    return hash_access_key(token)


def test_policy_keys_in_list_order_with_configured_ids(runtime: Runtime) -> None:
    keys = runtime.providers["openai"].policy_keys
    assert [k.secret for k in keys] == [
        SECRETS[("openai", "primary")], SECRETS[("openai", "backup")], SECRETS[("openai", "third")]
    ]  # fmt: skip
    assert keys[0].key_id == "org-primary"
    assert keys[2].key_id == "org-third"
    assert all(k.source is KeySource.POLICY for k in keys)
    assert all(k.provider == "openai" for k in keys)


def test_key_without_id_gets_a_hash_derived_id(runtime: Runtime) -> None:
    derived = runtime.providers["openai"].policy_keys[1].key_id
    value = SECRETS[("openai", "backup")].reveal()
    assert derived == fingerprint(value)
    assert derived not in value
    # Stable across builds: dashboards and cooldowns survive a reload.
    again, _ = build_runtime(config(), opened_vault())
    assert again.providers["openai"].policy_keys[1].key_id == derived
    # No substring of the id of length >= 4 is a piece of the value.
    assert not any(derived[i : i + 4] in value for i in range(len(derived) - 3))


def test_managed_keys_for_builtins(runtime: Runtime) -> None:
    (oai,) = runtime.providers["openai"].managed_keys
    assert (oai.key_id, oai.source, oai.secret) == (
        "pool-1", KeySource.MANAGED, SECRETS[("managed", "openai-1")]
    )  # fmt: skip
    anthropic = runtime.providers["anthropic"]
    assert anthropic.builtin
    assert anthropic.configured  # listed under `managed:`
    (ant,) = anthropic.managed_keys
    assert ant.key_id == fingerprint(SECRETS[("managed", "anthropic-1")].reveal())
    assert anthropic.policy_keys == ()
    assert anthropic.base_url == "https://api.anthropic.com/v1"
    assert anthropic.auth == "x-api-key"


def test_unconfigured_builtin_is_present_but_not_configured() -> None:
    rt, problems = build_runtime(config("providers: [{id: anthropic}]"), opened_vault())
    assert problems == []
    assert rt.providers["anthropic"].configured
    assert not rt.providers["openai"].configured
    assert rt.providers["openai"].base_url == "https://api.openai.com/v1"


def test_auth_none_provider_gets_a_keyless_selection(runtime: Runtime) -> None:
    ollama = runtime.providers["ollama"]
    assert ollama.keyless is not None
    assert ollama.keyless.source is KeySource.POLICY
    (k,) = ollama.keyless.keys
    assert k.key_id == NO_KEY_ID == "none"
    assert k.secret is None
    assert ollama.policy_keys == ()
    assert ollama.models == frozenset({"llama3.2"})
    assert runtime.providers["openai"].keyless is None


def test_headers_are_resolved_and_query_kept(runtime: Runtime) -> None:
    azure = runtime.providers["azure"]
    assert dict(azure.headers) == {"api-key": SECRETS[("azure", "key")]}
    assert azure.query == "api-version=2024-10-21"


def test_disabled_provider_is_left_out(runtime: Runtime) -> None:
    assert "old" not in runtime.providers


def test_builtin_base_url_override_reaches_the_runtime() -> None:
    rt, _ = build_runtime(
        config("providers: [{id: openai, base_url: 'http://127.0.0.1:8089/v1'}]"), opened_vault()
    )
    assert rt.providers["openai"].base_url == "http://127.0.0.1:8089/v1"


def test_access_keys_indexed_by_token_hash(runtime: Runtime) -> None:
    ak = runtime.access_keys[token_key(TOKENS["checkout"])]
    assert ak.name == "checkout"
    assert not ak.revoked
    assert ak.credits_micro_usd == 2_500_000
    assert ak.allowed_providers == frozenset({"openai", "anthropic"})
    assert runtime.access_key_named("checkout") is ak
    assert runtime.access_key_named("nobody") is None


def test_revoked_access_key_stays_indexed(runtime: Runtime) -> None:
    ak = runtime.access_keys[token_key(TOKENS["retired"])]
    assert ak.name == "retired"
    assert ak.revoked is True


def test_rate_limits_come_from_the_vault_record(runtime: Runtime) -> None:
    checkout = runtime.access_key_named("checkout")
    retired = runtime.access_key_named("retired")
    assert checkout is not None
    assert retired is not None
    assert checkout.limits == RateLimits(rpm=600, tpm=90_000)
    assert retired.limits == RateLimits()
    assert not retired.limits


def test_attached_keys_grouped_by_provider_newest_first(runtime: Runtime) -> None:
    ak = runtime.access_key_named("checkout")
    assert ak is not None
    assert [k.key_id for k in ak.attached["openai"]] == ["team-new", "team-old"]
    assert [k.secret for k in ak.attached["openai"]] == [ATTACHED_NEW, ATTACHED_OLD]
    assert [k.key_id for k in ak.attached["anthropic"]] == ["ant-1"]
    assert all(k.source is KeySource.ATTACHED for ks in ak.attached.values() for k in ks)


def test_key_labels_cover_every_key(runtime: Runtime) -> None:
    labels = {ls for group in runtime.key_labels.values() for ls in group}
    assert ("openai", "policy", "org-primary", "") in labels
    assert ("openai", "managed", "pool-1", "") in labels
    assert ("openai", "attached", "team-new", "checkout") in labels
    assert ("anthropic", "attached", "ant-1", "checkout") in labels


def test_health_ids_never_contain_the_value(runtime: Runtime) -> None:
    values = [s.reveal() for s in (*SECRETS.values(), ATTACHED_NEW, ATTACHED_OLD, ATTACHED_ANT)]
    for health_id, group in runtime.key_labels.items():
        for _, _, key_id, _ in group:
            for v in values:
                assert v not in health_id
                assert v not in key_id


def test_unresolved_references_are_problems_naming_the_config_path() -> None:
    missing = {k: v for k, v in SECRETS.items() if k not in {("openai", "backup"), ("azure", "key"), ("managed", "anthropic-1")}}  # fmt: skip
    rt, problems = build_runtime(config(), opened_vault(missing))
    assert sorted(problems) == sorted(
        [
            "providers[0].api_keys[1].value: secrets.get('openai', 'backup') is not in the vault",
            "providers[2].headers.api-key: secrets.get('azure', 'key') is not in the vault",
            "managed.anthropic[0].value: secrets.get('managed', 'anthropic-1') is not in the vault",
        ]
    )
    # What did resolve is still there, in order.
    assert [k.key_id for k in rt.providers["openai"].policy_keys] == ["org-primary", "org-third"]


def test_no_secret_in_any_repr(runtime: Runtime) -> None:
    values = [s.reveal() for s in (*SECRETS.values(), ATTACHED_NEW, ATTACHED_OLD, ATTACHED_ANT)]
    values += list(TOKENS.values())
    objects: list[object] = [
        runtime,
        runtime.config,
        *runtime.providers.values(),
        *runtime.access_keys.values(),
        *runtime.providers["openai"].policy_keys,
        runtime.providers["ollama"].keyless,
        opened_vault(),
    ]
    for obj in objects:
        for text in (repr(obj), str(obj), f"{obj}", f"{obj!r}"):
            for v in values:
                assert v not in text, f"{type(obj).__name__} shows a secret"


def test_a_line_break_in_a_key_or_header_value_is_a_problem_not_a_500_per_request() -> None:
    """Such a value would split every request's head: the client refuses to send it, so
    every request to that provider would fail. Refused with the version instead, by path,
    without the value."""
    broken = dict(SECRETS)
    broken[("openai", "backup")] = Secret("sk-backup\r\nX-Injected: 1")
    broken[("azure", "key")] = Secret("azure-key\nmore")
    _, problems = build_runtime(config(), opened_vault(broken))
    assert sorted(problems) == sorted(
        [
            "providers[0].api_keys[1].value: the value has a line break",
            "providers[2].headers.api-key: the value has a line break",
        ]
    )
