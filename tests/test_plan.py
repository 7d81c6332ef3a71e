"""Key lookup order, scope, model resolution and the failover plan — pure, no sockets."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.config import Cooldown, parse_config_text
from sidecar.errors import ErrorCode, ProxyError
from sidecar.health import KeyHealth, Outcome
from sidecar.keys import KeySource, select_keys
from sidecar.plan import build_plan, resolve_targets
from sidecar.quota import QuotaBook, QuotaKind, Reading
from sidecar.runtime import Runtime, build_runtime
from sidecar.secret import Secret
from sidecar.vault import AccessKeyRecord, AttachedKey, OpenedVault

CONFIG = """
only_allow_configured_providers: false
providers:
  - id: openai
    api_keys:
      - {id: p1, value: "${secrets.get('openai', 'p1')}"}
      - {value: "${secrets.get('openai', 'p2')}"}
  - id: ollama
    base_url: http://127.0.0.1:11434/v1
    format: openai
    auth: none
    models: [{id: "llama3.2:1b"}, llama3.2]
  - id: groq
    base_url: http://127.0.0.1:9/v1
    format: openai
    models: [mixtral]
managed:
  anthropic: [{id: pool-1, value: "${secrets.get('managed', 'a1')}"}]
"""

SECRETS = {
    ("openai", "p1"): Secret("sk-policy-one"),
    ("openai", "p2"): Secret("sk-policy-two"),
    ("managed", "a1"): Secret("sk-ant-managed"),
}


def _access(name: str, *, attached: tuple[AttachedKey, ...] = (), providers: frozenset[str] = frozenset(),
            models: frozenset[str] = frozenset(), credits: float = 1.0) -> AccessKeyRecord:  # fmt: skip
    return AccessKeyRecord(name, f"sha256:{name}", False, credits, providers, models, attached)


def runtime(config: str = CONFIG, *records: AccessKeyRecord) -> Runtime:
    cfg = parse_config_text(config, Path("/etc/sidecar/sidecar.yaml"))
    rt, problems = build_runtime(cfg, OpenedVault("x", SECRETS, records))
    assert problems == []
    return rt


def access(rt: Runtime, name: str):  # type: ignore[no-untyped-def]
    ak = rt.access_key_named(name)
    assert ak is not None
    return ak


def test_lookup_order_attached_then_policy_then_managed() -> None:
    newer = AttachedKey("new", "openai", 200.0, Secret("sk-att-new"))
    older = AttachedKey("old", "openai", 100.0, Secret("sk-att-old"))
    rt = runtime(CONFIG, _access("with", attached=(newer, older)), _access("without"))
    openai = rt.providers["openai"]
    sel = select_keys(access(rt, "with"), openai)
    assert sel is not None
    assert sel.source is KeySource.ATTACHED
    assert [k.key_id for k in sel.keys] == ["new", "old"]
    sel = select_keys(access(rt, "without"), openai)
    assert sel is not None
    assert sel.source is KeySource.POLICY
    assert sel.keys[0].key_id == "p1"
    # mixed mode: the same access key resolves anthropic to managed keys
    sel = select_keys(access(rt, "with"), rt.providers["anthropic"])
    assert sel is not None
    assert sel.source is KeySource.MANAGED
    assert select_keys(access(rt, "with"), rt.providers["groq"]) is None


def test_derived_key_id_is_a_hash_not_a_substring() -> None:
    rt = runtime(CONFIG, _access("a"))
    kid = rt.providers["openai"].policy_keys[1].key_id
    assert kid
    assert kid not in "sk-policy-two"
    assert all(kid[i : i + 4] not in "sk-policy-two" for i in range(len(kid) - 3))
    assert "sk-policy" not in repr(rt.providers["openai"].policy_keys)


def test_auth_none_provider_is_keyless_policy() -> None:
    rt = runtime(CONFIG, _access("a"))
    sel = select_keys(access(rt, "a"), rt.providers["ollama"])
    assert sel is not None
    assert sel.source is KeySource.POLICY
    assert [(k.key_id, k.secret) for k in sel.keys] == [("none", None)]


@pytest.mark.parametrize(
    ("name", "provider", "upstream"),
    [("gpt-4o-mini", "openai", "gpt-4o-mini"), ("o3-mini", "openai", "o3-mini"),
     ("text-embedding-3-small", "openai", "text-embedding-3-small"), ("claude-haiku-4-5", "anthropic", "claude-haiku-4-5"),
     ("openai:my-finetune", "openai", "my-finetune"), ("llama3.2:1b", "ollama", "llama3.2:1b"),
     ("ollama:llama3.2", "ollama", "llama3.2"), ("mixtral", "groq", "mixtral")],
)  # fmt: skip
def test_model_resolution(name: str, provider: str, upstream: str) -> None:
    rt = runtime()
    r = rt.resolver.resolve(name)
    assert (r.provider.id, r.upstream, r.requested) == (provider, upstream, name)


def test_unknown_model_and_wrong_format() -> None:
    rt = runtime()
    with pytest.raises(ProxyError) as e:
        rt.resolver.resolve("no-such-model")
    assert e.value.code is ErrorCode.MODEL_UNKNOWN
    with pytest.raises(ProxyError) as e:
        resolve_targets(rt, "openai", ["claude-haiku-4-5"])
    assert e.value.code is ErrorCode.MODEL_UNKNOWN
    assert "anthropic" in e.value.message


def test_candidates_are_models_times_keys_in_order() -> None:
    rt = runtime(CONFIG, _access("a"))
    targets = resolve_targets(rt, "openai", ["gpt-4o", "gpt-4o-mini"])
    plan = build_plan(rt, access(rt, "a"), targets, KeyHealth())
    assert [(c.model.upstream if c.model else None, c.key.key_id) for c in plan.candidates] == [
        ("gpt-4o", "p1"), ("gpt-4o", plan.candidates[1].key.key_id),
        ("gpt-4o-mini", "p1"), ("gpt-4o-mini", plan.candidates[1].key.key_id),
    ]  # fmt: skip


def test_cooling_keys_are_skipped_and_all_cooling_is_429_without_fallthrough() -> None:
    clock_now = [0.0]
    health = KeyHealth(lambda: clock_now[0])
    rt = runtime(CONFIG, _access("a"))
    ak = access(rt, "a")
    p1, p2 = rt.providers["openai"].policy_keys
    health.record(p1.health_id, Outcome.RATE_LIMITED, Cooldown(), model="gpt-4o", retry_after=10)
    plan = build_plan(rt, ak, resolve_targets(rt, "openai", ["gpt-4o"]), health)
    assert [c.key.key_id for c in plan.candidates] == [p2.key_id]
    # a rate limit is per model: the same key still serves another model
    plan = build_plan(rt, ak, resolve_targets(rt, "openai", ["gpt-4o-mini"]), health)
    assert [c.key.key_id for c in plan.candidates] == [p1.key_id, p2.key_id]
    health.record(p2.health_id, Outcome.RATE_LIMITED, Cooldown(), model="gpt-4o", retry_after=3.2)
    with pytest.raises(ProxyError) as e:
        build_plan(rt, ak, resolve_targets(rt, "openai", ["gpt-4o"]), health)
    assert e.value.code is ErrorCode.ALL_KEYS_COOLING_DOWN
    assert e.value.retry_after == 4  # whole seconds, rounded up
    assert e.value.provider == "openai"


def test_scope_rejections() -> None:
    rt = runtime(
        CONFIG,
        _access("only-anthropic", providers=frozenset({"anthropic"})),
        _access("mini", models=frozenset({"gpt-4o-mini*"})),
    )
    with pytest.raises(ProxyError) as e:
        build_plan(
            rt, access(rt, "only-anthropic"), resolve_targets(rt, "openai", ["gpt-4o"]), KeyHealth()
        )
    assert e.value.code is ErrorCode.PROVIDER_NOT_ALLOWED
    plan = build_plan(
        rt,
        access(rt, "mini"),
        resolve_targets(rt, "openai", ["gpt-4o", "gpt-4o-mini-2024"]),
        KeyHealth(),
    )
    assert plan.rejected_models == ["gpt-4o"]
    assert {c.model.upstream for c in plan.candidates if c.model} == {"gpt-4o-mini-2024"}
    with pytest.raises(ProxyError) as e:
        build_plan(rt, access(rt, "mini"), resolve_targets(rt, "openai", ["gpt-4o"]), KeyHealth())
    assert e.value.code is ErrorCode.MODEL_NOT_ALLOWED


def test_only_allow_configured_switches() -> None:
    cfg = CONFIG.replace("only_allow_configured_providers: false",
                         "only_allow_configured_providers: true\nonly_allow_configured_models: true")  # fmt: skip
    rt = runtime(cfg, _access("a"))
    ak = access(rt, "a")
    with pytest.raises(ProxyError) as e:  # gpt-4o is not in openai's models list
        build_plan(rt, ak, resolve_targets(rt, "openai", ["gpt-4o"]), KeyHealth())
    assert e.value.code is ErrorCode.MODEL_NOT_ALLOWED
    plan = build_plan(rt, ak, resolve_targets(rt, "openai", ["llama3.2"]), KeyHealth())
    assert plan.candidates[0].provider.id == "ollama"
    assert rt.providers["anthropic"].configured  # via managed:


def test_no_key_names_the_provider_and_managed_is_flagged() -> None:
    rt = runtime(CONFIG, _access("a"))
    with pytest.raises(ProxyError) as e:
        build_plan(rt, access(rt, "a"), resolve_targets(rt, "openai", ["mixtral"]), KeyHealth())
    assert e.value.code is ErrorCode.NO_PROVIDER_KEY
    assert "groq" in e.value.message
    plan = build_plan(
        rt, access(rt, "a"), resolve_targets(rt, "anthropic", ["claude-haiku-4-5"]), KeyHealth()
    )
    assert plan.managed_providers == {"anthropic"}
    assert plan.candidates[0].key.source is KeySource.MANAGED


def test_fallbacks_for_exact_names_first_then_globs_in_order() -> None:
    from sidecar.models import fallbacks_for

    fb = (("claude-*", ("a",)), ("claude-haiku-4-5", ("b",)), ("claude-h*", ("c",)))
    assert fallbacks_for(fb, "claude-haiku-4-5") == ("b",)
    assert fallbacks_for(fb, "claude-haiku-9") == ("a",)
    assert fallbacks_for(fb, "gpt-4o") == ()


def test_config_fallbacks_that_cannot_serve_the_route_are_left_out() -> None:
    rt = runtime(CONFIG, _access("a"))
    targets = resolve_targets(
        rt, "openai", ["gpt-4o"], ("gpt-4o", "claude-haiku-4-5", "no-such-model", "llama3.2")
    )
    assert [(t.provider.id, t.model.upstream if t.model else None) for t in targets] == [
        ("openai", "gpt-4o"), ("ollama", "llama3.2"),
    ]  # fmt: skip


def test_quota_puts_a_nearly_exhausted_key_behind_within_its_source_only() -> None:
    now = [0.0]
    book = QuotaBook(lambda: now[0])
    rt = runtime(CONFIG, _access("a"))
    ak = access(rt, "a")
    p1, p2 = rt.providers["openai"].policy_keys
    targets = resolve_targets(rt, "openai", ["gpt-4o", "gpt-4o-mini"])
    # 1 of 100 requests left on the first key for gpt-4o: it goes behind the second there.
    book.record(p1.health_id, "gpt-4o", [Reading(QuotaKind.REQUESTS, 1, 100, 30.0)])
    plan = build_plan(rt, ak, targets, KeyHealth(lambda: now[0]), quota=book)
    order = [(c.upstream_model, c.key.key_id) for c in plan.candidates]
    assert order == [("gpt-4o", p2.key_id), ("gpt-4o", p1.key_id),
                     ("gpt-4o-mini", p1.key_id), ("gpt-4o-mini", p2.key_id)]  # fmt: skip
    now[0] = 31.0  # past its reset the reading says nothing: the source's order again
    plan = build_plan(rt, ak, targets, KeyHealth(lambda: now[0]), quota=book)
    assert [c.key.key_id for c in plan.candidates][:2] == [p1.key_id, p2.key_id]
