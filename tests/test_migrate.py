"""`sidecar migrate` (sidecar/migrate.py): policy keys of built-in providers become attached keys.

The contract checked end to end: after a migration `sidecar check` accepts
the files, and a sidecar routes every request to the same provider key (same
`x-sidecar-key-id`, same value upstream, same failover order) — only the key
source changes from `policy` to `attached`.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass

import aiohttp
import pytest
import yaml

from sidecar.check import run_check
from sidecar.config import load_config
from sidecar.crypto import PRIVATE_KEY_ENV
from sidecar.errors import UserError
from sidecar.migrate import migrate
from sidecar.secret import fingerprint
from sidecar.vault import read_vault
from tests.harness import Env, Sidecar, sidecar_cmd, subprocess_env

# Distinctive values: any of them in any output is a leak.
OPENAI_PRIMARY = "sk-proj-MIGRATEPROBE-primary-Qw12"
OPENAI_BACKUP = "sk-proj-MIGRATEPROBE-backup-Er34"
ANTHROPIC_ONE = "sk-ant-MIGRATEPROBE-one-Ty56"
LOCAL_ONE = "sk-local-MIGRATEPROBE-Ui78"
SECRETS = (OPENAI_PRIMARY, OPENAI_BACKUP, ANTHROPIC_ONE, LOCAL_ONE)

CONFIG = """\
# Team gateway: this comment must survive the migration.
providers:
  - id: openai            # built-in: its keys move to access keys
    base_url: UPSTREAM
    api_keys:
      - id: org-primary   # the main org
        value: "${secrets.get('openai', 'primary')}"
      # the backup has no id: its id is derived from the value
      - value: "${secrets.get('openai', 'backup')}"
    models: [{id: gpt-4o-mini}]
  - id: anthropic
    base_url: UPSTREAM
    api_keys: [{id: ant-1, value: "${secrets.get('anthropic', 'one')}"}]
  # A self-hosted server keeps its policy keys: custom providers are not migrated.
  - id: local
    base_url: UPSTREAM
    format: openai
    models: [{id: local-llm}]
    api_keys:
      - id: local-1
        value: "${secrets.get('local', 'one')}"
"""


@dataclass(frozen=True)
class Route:
    source: str
    key_id: str
    attempts: str
    upstream_key: str | None


@pytest.fixture(autouse=True)
def _no_env_private_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PRIVATE_KEY_ENV, raising=False)


def _subprocess_env() -> dict[str, str]:
    env = subprocess_env()
    env.pop(PRIVATE_KEY_ENV, None)
    return env


async def run_cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *sidecar_cmd(*args),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=_subprocess_env(),
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def assert_no_secret(text: str) -> None:
    for value in SECRETS:
        assert value not in text


async def last_upstream_key(env: Env) -> str | None:
    base = env.upstream.removesuffix("/v1")
    async with aiohttp.ClientSession() as http, http.get(base + "/_mock/requests") as resp:
        requests = (await resp.json())["requests"]
    return requests[-1]["key"] if requests else None


async def openai_route(sc: Sidecar, token: str, model: str = "gpt-4o-mini") -> Route:
    async with sc.openai(token) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": "hi"}]
        )
    h = raw.headers
    return Route(
        h["x-sidecar-key-source"],
        h["x-sidecar-key-id"],
        h["x-sidecar-attempts"],
        await last_upstream_key(sc.env),
    )


async def anthropic_route(sc: Sidecar, token: str) -> Route:
    async with sc.anthropic(token) as client:
        raw = await client.messages.with_raw_response.create(
            model="claude-3-5-haiku-latest",
            max_tokens=16,
            messages=[{"role": "user", "content": "hi"}],
        )
    h = raw.headers
    return Route(
        h["x-sidecar-key-source"],
        h["x-sidecar-key-id"],
        h["x-sidecar-attempts"],
        await last_upstream_key(sc.env),
    )


async def routes(env: Env, token: str) -> dict[str, Route]:
    sc = await env.start()
    try:
        return {
            "openai": await openai_route(sc, token),
            "anthropic": await anthropic_route(sc, token),
            "local": await openai_route(sc, token, "local-llm"),
        }
    finally:
        await sc.stop()


def seed(env: Env) -> dict[str, str]:
    env.secret("openai", "primary", OPENAI_PRIMARY)
    env.secret("openai", "backup", OPENAI_BACKUP)
    env.secret("anthropic", "one", ANTHROPIC_ONE)
    env.secret("local", "one", LOCAL_ONE)
    tokens = {name: env.access_key(name) for name in ("checkout", "search")}
    env.write_config(CONFIG)
    return tokens


def attached(env: Env, access_key: str) -> list[tuple[str, str]]:
    """(provider, id) of an access key's attachments, newest first."""
    entries = read_vault(env.vault).access_keys[access_key].attached
    return [(a.provider, a.id) for a in sorted(entries, key=lambda a: a.attached_at, reverse=True)]


# --------------------------------------------------------------------------- end to end


async def test_migrate_keeps_routing_and_passes_check(env: Env) -> None:
    tokens = seed(env)
    original = env.config.read_text()
    before = {name: await routes(env, token) for name, token in tokens.items()}
    assert before["checkout"]["openai"] == Route("policy", "org-primary", "1", OPENAI_PRIMARY)
    assert before["checkout"]["anthropic"] == Route("policy", "ant-1", "1", ANTHROPIC_ONE)
    assert before["checkout"]["local"] == Route("policy", "local-1", "1", LOCAL_ONE)

    code, out, err = await run_cli("migrate", "--config", str(env.config))
    assert code == 0, err
    assert_no_secret(out + err)
    for name in tokens:
        assert f"attached openai/org-primary to {name}" in err
        assert f"attached anthropic/ant-1 to {name}" in err
    assert "local" not in err.replace(str(env.dir), "")

    assert run_check(env.config) == []
    code, out, err = await run_cli("check", "--config", str(env.config))
    assert (code, out) == (0, ""), err

    after = {name: await routes(env, token) for name, token in tokens.items()}
    for name in tokens:
        for provider in ("openai", "anthropic"):
            old, new = before[name][provider], after[name][provider]
            assert new.source == "attached"
            assert (new.key_id, new.upstream_key) == (old.key_id, old.upstream_key)
        assert after[name]["local"] == before[name]["local"]

    # The text was edited in place: comments and the custom provider's keys are untouched.
    text = env.config.read_text()
    for line in original.splitlines():
        if line.strip().startswith("#") and "backup has no id" not in line:
            assert line in text
    assert "# built-in: its keys move to access keys" in text
    assert "secrets.get('local', 'one')" in text
    assert "secrets.get('openai'" not in text
    assert "secrets.get('anthropic'" not in text
    data = yaml.safe_load(text)
    assert [sorted(p) for p in data["providers"]] == [
        ["base_url", "id", "models"],
        ["base_url", "id"],
        ["api_keys", "base_url", "format", "id", "models"],
    ]
    assert env.config.with_name("sidecar.yaml.bak").read_text() == original
    assert [p.id for p in load_config(env.config).providers] == ["openai", "anthropic", "local"]


async def test_derived_ids_and_failover_order_survive(env: Env) -> None:
    """First policy key rate-limited: before and after, the request fails over to the second."""
    env.secret("openai", "first", "sk-first-fail-429-retry-60")
    env.secret("openai", "second", OPENAI_BACKUP)
    env.secret("openai", "third", OPENAI_PRIMARY)
    token = env.access_key("checkout")
    env.write_config(
        "providers:\n  - id: openai\n    base_url: UPSTREAM\n    api_keys:\n"
        "      - {id: first, value: \"${secrets.get('openai', 'first')}\"}\n"
        "      - value: \"${secrets.get('openai', 'second')}\"\n"
        "      - {id: third, value: \"${secrets.get('openai', 'third')}\"}\n"
    )
    sc = await env.start()
    try:
        before = await openai_route(sc, token)
    finally:
        await sc.stop()
    assert before == Route("policy", fingerprint(OPENAI_BACKUP), "2", OPENAI_BACKUP)

    lines = migrate(env.config, [])
    assert_no_secret("\n".join(lines))
    assert attached(env, "checkout") == [
        ("openai", "first"),
        ("openai", fingerprint(OPENAI_BACKUP)),
        ("openai", "third"),
    ]
    sc = await env.start()
    try:
        after = await openai_route(sc, token)
    finally:
        await sc.stop()
    assert after == Route("attached", fingerprint(OPENAI_BACKUP), "2", OPENAI_BACKUP)


async def test_migrate_while_serving_is_picked_up_without_a_failed_request(env: Env) -> None:
    """Vault first, config last: every intermediate state routes to the same key."""
    tokens = seed(env)
    sc = await env.start()
    try:
        assert (await openai_route(sc, tokens["checkout"])).source == "policy"
        task = asyncio.create_task(asyncio.to_thread(migrate, env.config, []))
        seen: set[str] = set()
        deadline = asyncio.get_running_loop().time() + 5
        while asyncio.get_running_loop().time() < deadline:
            route = await openai_route(sc, tokens["checkout"])
            assert (route.key_id, route.upstream_key) == ("org-primary", OPENAI_PRIMARY)
            seen.add(route.source)
            if task.done() and route.source == "attached":
                break
        await task
        assert seen >= {"attached"}
    finally:
        await sc.stop()


# --------------------------------------------------------------------------- re-runs and subsets


async def test_rerun_is_a_no_op(env: Env) -> None:
    seed(env)
    first = migrate(env.config, [])
    assert any(line.startswith("attached ") for line in first)
    config, vault = env.config.read_bytes(), env.vault.read_bytes()
    stamps = env.config.stat().st_mtime_ns, env.vault.stat().st_mtime_ns
    backup = env.config.with_name("sidecar.yaml.bak").read_bytes()

    second = migrate(env.config, [])
    assert len(second) == 1
    assert second[0].startswith("nothing to migrate")
    assert (env.config.read_bytes(), env.vault.read_bytes()) == (config, vault)
    assert (env.config.stat().st_mtime_ns, env.vault.stat().st_mtime_ns) == stamps
    assert env.config.with_name("sidecar.yaml.bak").read_bytes() == backup
    assert len(attached(env, "checkout")) == 3


async def test_access_key_subset_then_the_rest(env: Env) -> None:
    tokens = seed(env)
    tokens["batch"] = env.access_key("batch")
    original = env.config.read_text()

    lines = migrate(env.config, ["checkout"])
    assert "attached openai/org-primary to checkout" in lines
    assert attached(env, "search") == []
    assert attached(env, "batch") == []
    # Dropping the policy keys now would take them away from `search` and `batch`.
    assert env.config.read_text() == original
    assert any("kept the policy keys" in line and "batch, search" in line for line in lines)
    assert run_check(env.config) == []

    sc = await env.start()
    try:
        assert (await openai_route(sc, tokens["checkout"])).source == "attached"
        assert (await openai_route(sc, tokens["search"])).source == "policy"
    finally:
        await sc.stop()

    lines = migrate(env.config, [])
    assert "skipped openai for checkout: it already has attached openai keys" in lines
    assert "attached openai/org-primary to search" in lines
    assert [a for a in attached(env, "checkout") if a[0] == "openai"] == [
        ("openai", "org-primary"),
        ("openai", fingerprint(OPENAI_BACKUP)),
    ]
    assert "secrets.get('openai'" not in env.config.read_text()
    assert run_check(env.config) == []


async def test_revoked_access_keys_are_left_out(env: Env) -> None:
    seed(env)
    env.access_key("old")
    code, _, err = await run_cli("access-key", "revoke", "--vault", str(env.vault), "old")
    assert code == 0, err
    migrate(env.config, [])
    assert attached(env, "old") == []
    assert "secrets.get('openai'" not in env.config.read_text()


async def test_existing_attachments_win_and_are_not_duplicated(env: Env) -> None:
    """An access key that already had its own openai key never used the policy keys."""
    seed(env)
    env.attach("checkout", "openai", "own", "sk-own-key")
    lines = migrate(env.config, [])
    assert "skipped openai for checkout: it already has attached openai keys" in lines
    assert attached(env, "checkout") == [("anthropic", "ant-1"), ("openai", "own")]


@pytest.mark.parametrize(
    ("body", "kept"),
    [
        pytest.param(
            "providers:\n"
            "  - api_keys: [{id: k1, value: \"${secrets.get('openai', 'primary')}\"}]  # inline\n"
            "    id: openai\n"
            "    base_url: UPSTREAM\n",
            "    base_url: UPSTREAM\n",
            id="api_keys-on-the-dash-line",
        ),
        pytest.param(
            "providers: [{api_keys: [{id: k1, value: \"${secrets.get('openai', 'primary')}\"}],"
            " id: openai, base_url: UPSTREAM}]\n",
            "[{id: openai, base_url: ",
            id="flow-style",
        ),
        pytest.param(
            "providers:\n- id: openai\n  api_keys:\n  - id: k1\n"
            "    value: |-\n      ${secrets.get('openai', 'primary')}\n"
            "# trailing comment\n",
            "# trailing comment\n",
            id="unindented-sequence-and-block-scalar",
        ),
    ],
)
async def test_layouts(env: Env, body: str, kept: str) -> None:
    env.secret("openai", "primary", OPENAI_PRIMARY)
    env.access_key("checkout")
    env.write_config(body)
    migrate(env.config, [])
    text = env.config.read_text()
    assert "api_keys" not in text
    assert kept.replace("UPSTREAM", env.upstream) in text
    assert run_check(env.config) == []
    assert attached(env, "checkout") == [("openai", "k1")]


# --------------------------------------------------------------------------- errors


async def test_unknown_access_key_changes_nothing(env: Env) -> None:
    seed(env)
    config, vault = env.config.read_bytes(), env.vault.read_bytes()
    with pytest.raises(UserError, match="no access key named 'nope'"):
        migrate(env.config, ["checkout", "nope"])
    code, out, err = await run_cli("migrate", "--config", str(env.config), "--access-key", "nope")
    assert (code, out) == (1, "")
    assert err.startswith("error: ")
    assert err.count("\n") == 1
    assert (env.config.read_bytes(), env.vault.read_bytes()) == (config, vault)


async def test_missing_private_key_is_one_clear_error(env: Env) -> None:
    seed(env)
    key_file = env.dir / "sidecar.key"
    private = key_file.read_text().strip()
    os.unlink(key_file)
    config, vault = env.config.read_bytes(), env.vault.read_bytes()
    code, out, err = await run_cli("migrate", "--config", str(env.config))
    assert (code, out) == (1, "")
    assert "migrate needs the private key" in err
    assert err.count("\n") == 1
    assert private not in err
    assert (env.config.read_bytes(), env.vault.read_bytes()) == (config, vault)


async def test_private_key_from_the_environment(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    seed(env)
    key_file = env.dir / "sidecar.key"
    monkeypatch.setenv(PRIVATE_KEY_ENV, key_file.read_text().strip())
    os.unlink(key_file)
    lines = migrate(env.config, ["checkout", "search"])
    assert "attached openai/org-primary to search" in lines


async def test_unresolvable_reference(env: Env) -> None:
    seed(env)
    env.write_config(CONFIG.replace("'openai', 'backup'", "'openai', 'missing'"))
    config, vault = env.config.read_bytes(), env.vault.read_bytes()
    with pytest.raises(UserError) as info:
        migrate(env.config, [])
    assert "providers[0].api_keys[1].value" in str(info.value)
    assert "secrets.get('openai', 'missing') is not in the vault" in str(info.value)
    assert (env.config.read_bytes(), env.vault.read_bytes()) == (config, vault)


async def test_no_builtin_policy_keys_needs_no_private_key(env: Env) -> None:
    env.secret("local", "one", LOCAL_ONE)
    env.access_key("checkout")
    env.write_config(
        "providers:\n  - id: local\n    base_url: UPSTREAM\n    format: openai\n"
        "    api_keys: [{id: local-1, value: \"${secrets.get('local', 'one')}\"}]\n"
    )
    os.unlink(env.dir / "sidecar.key")
    config = env.config.read_bytes()
    assert migrate(env.config, [])[0].startswith("nothing to migrate")
    assert env.config.read_bytes() == config


async def test_same_id_for_two_providers_is_refused_before_any_change(env: Env) -> None:
    """Attached ids are unique per access key; the config allows `primary` for both providers."""
    env.secret("openai", "primary", OPENAI_PRIMARY)
    env.secret("anthropic", "one", ANTHROPIC_ONE)
    env.access_key("checkout")
    env.write_config(
        "providers:\n"
        "  - {id: openai, api_keys: [{id: primary, value: \"${secrets.get('openai', 'primary')}\"}]}\n"
        "  - {id: anthropic, api_keys: [{id: primary, value: \"${secrets.get('anthropic', 'one')}\"}]}\n"
    )
    config, vault = env.config.read_bytes(), env.vault.read_bytes()
    with pytest.raises(UserError, match="key id 'primary' of providers\\[1\\] \\(anthropic\\)"):
        migrate(env.config, [])
    assert (env.config.read_bytes(), env.vault.read_bytes()) == (config, vault)


async def test_anchors_are_refused_before_any_change(env: Env) -> None:
    env.secret("openai", "primary", OPENAI_PRIMARY)
    env.access_key("checkout")
    env.write_config(
        "providers:\n"
        "  - id: openai\n"
        "    api_keys: &keys [{id: k1, value: \"${secrets.get('openai', 'primary')}\"}]\n"
        "  - id: anthropic\n"
        "    api_keys: *keys\n"
    )
    config, vault = env.config.read_bytes(), env.vault.read_bytes()
    with pytest.raises(UserError, match="nothing was changed"):
        migrate(env.config, [])
    assert (env.config.read_bytes(), env.vault.read_bytes()) == (config, vault)


async def test_a_value_listed_twice_is_attached_once(env: Env) -> None:
    env.secret("openai", "primary", OPENAI_PRIMARY)
    env.access_key("checkout")
    ref = "\"${secrets.get('openai', 'primary')}\""
    env.write_config(
        f"providers:\n  - id: openai\n    api_keys: [{{value: {ref}}}, {{value: {ref}}}]\n"
    )
    migrate(env.config, [])
    assert attached(env, "checkout") == [("openai", fingerprint(OPENAI_PRIMARY))]
    assert run_check(env.config) == []
