"""Config file (docs/reference.md#config-keys): defaults, durations, providers, and every problem at once with its path."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from sidecar.config import (
    BUILTIN_PROVIDERS,
    DEFAULT_ON_STATUS,
    Config,
    HostPort,
    SecretRef,
    Template,
    load_config,
    parse_config_text,
    parse_duration,
    parse_host_port,
)
from sidecar.errors import ConfigError
from sidecar.secret import Secret

CFG = Path("/etc/sidecar/sidecar.yaml")
REF = "${secrets.get('openai', 'primary')}"


def parse(text: str, path: Path = CFG) -> Config:
    return parse_config_text(textwrap.dedent(text), path)


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(text)
    return list(info.value.problems)


# --------------------------------------------------------------------------- defaults


def test_empty_file_gives_spec_defaults() -> None:
    c = parse("")
    assert c.listen == HostPort("127.0.0.1", 8080)
    assert c.admin_listen == HostPort("127.0.0.1", 9090)
    assert c.vault.path == CFG.parent / "vault.json"
    assert c.vault.private_key_file == CFG.parent / "sidecar.key"
    assert c.shutdown_grace == 25.0
    assert c.passthrough is False
    assert c.only_allow_configured_providers is False
    assert c.only_allow_configured_models is False
    assert c.limits.max_body_bytes == 33554432
    t = c.timeouts
    assert (t.per_request, t.first_token, t.stream_idle, t.total) == (600, 30, 60, 900)
    assert c.failover.max_attempts == 6
    assert c.failover.resume is True
    assert c.failover.on_status == frozenset(DEFAULT_ON_STATUS)
    assert set(DEFAULT_ON_STATUS) == {401, 403, 408, 409, 429, 500, 502, 503, 504, 529}
    cd = c.failover.cooldown
    assert (cd.rate_limited, cd.auth_failed, cd.server_error) == (30, 300, 15)
    assert cd.server_error_threshold == 3
    assert c.providers == ()
    assert dict(c.managed) == {}
    assert dict(c.prices) == {}


def test_empty_sections_keep_defaults() -> None:
    c = parse(
        """
        timeouts: {per_request: 5s}
        failover: {cooldown: {}}
        limits: {}
        """
    )
    assert c.timeouts.per_request == 5.0
    assert c.timeouts.stream_idle == 60.0
    assert c.timeouts.total == 900.0
    assert c.failover.cooldown.rate_limited == 30.0
    assert c.limits.max_body_bytes == 33554432


def test_spec_example_config_parses() -> None:
    c = parse(
        """
        listen: 127.0.0.1:8080
        admin_listen: 127.0.0.1:9090
        vault:
          path: vault.json
          private_key_file: sidecar.key
        shutdown_grace: 25s
        passthrough: false
        only_allow_configured_providers: false
        only_allow_configured_models: false
        limits: {max_body_bytes: 33554432}
        timeouts: {per_request: 60s, stream_idle: 60s, total: 300s}
        failover:
          max_attempts: 6
          on_status: [401, 403, 408, 409, 429, 500, 502, 503, 504, 529]
          cooldown: {rate_limited: 30s, auth_failed: 300s, server_error: 15s, server_error_threshold: 3}
        providers:
          - id: openai
            api_keys:
              - id: org-primary
                value: ${secrets.get('openai', 'primary')}
          - id: ollama
            base_url: http://127.0.0.1:11434/v1
            format: openai
            auth: none
            models: [{id: llama3.2}]
          - id: azure
            base_url: https://example.openai.azure.com/openai/deployments/gpt-4o
            format: openai
            auth: none
            headers: {api-key: "${secrets.get('azure', 'key')}"}
            query_params: {api-version: "2024-10-21"}
            disabled: false
        managed:
          openai:    [{id: pool-1, value: "${secrets.get('managed', 'openai-1')}"}]
          anthropic: [{id: pool-1, value: "${secrets.get('managed', 'anthropic-1')}"}]
        ledger: {url: "sqlite:////var/lib/sidecar/ledger.db"}
        prices:
          gpt-4o-mini: {input: 0.15, output: 0.60}
        """
    )
    openai, ollama, azure = c.providers
    assert openai.builtin
    assert openai.base_url == "https://api.openai.com/v1"
    assert openai.api_keys[0].id == "org-primary"
    assert openai.api_keys[0].value.refs == (SecretRef("openai", "primary"),)
    assert (ollama.base_url, ollama.format, ollama.auth, ollama.models) == (
        "http://127.0.0.1:11434/v1", "openai", "none", ("llama3.2",)
    )  # fmt: skip
    assert not ollama.builtin
    assert dict(azure.query_params) == {"api-version": "2024-10-21"}
    assert dict(azure.headers)["api-key"].refs == (SecretRef("azure", "key"),)
    assert [k.id for k in c.managed["openai"]] == ["pool-1"]
    assert c.prices["gpt-4o-mini"].input == 0.15
    assert c.vault.private_key_file == CFG.parent / "sidecar.key"
    assert [str(r) for _, r in c.secret_refs()] == [
        "secrets.get('openai', 'primary')",
        "secrets.get('azure', 'key')",
        "secrets.get('managed', 'openai-1')",
        "secrets.get('managed', 'anthropic-1')",
    ]
    assert [p for p, _ in c.secret_refs()] == [
        "providers[0].api_keys[0].value",
        "providers[2].headers.api-key",
        "managed.openai[0].value",
        "managed.anthropic[0].value",
    ]


# --------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [
        ("250ms", 0.25),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        (" 30s ", 30.0),
        ("30", 30.0),
        (30, 30.0),
        (0.5, 0.5),
        (0, 0.0),
    ],
)
def test_durations(raw: object, seconds: float) -> None:
    assert parse_duration(raw) == pytest.approx(seconds)


@pytest.mark.parametrize("raw", ["5 minutes", "30sec", "-1s", "s", "", "1e3", True, -1, None, [1]])
def test_bad_durations(raw: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(raw)


@pytest.mark.parametrize("raw", [float("nan"), float("inf"), 1e308 * 10, "9" * 400 + "s",
                                 366 * 86400 + 1, "8785h"])  # fmt: skip
def test_durations_that_are_not_finite_or_over_a_year_are_refused(raw: object) -> None:
    """NaN passes every `<` check and would disable the timers it set; infinity or a
    century overflows the clocks the sidecar shows (`/keys`)."""
    with pytest.raises(ValueError, match="duration"):
        parse_duration(raw)


@pytest.mark.parametrize("doc", ["timeouts: {per_request: .nan}", "reload_interval: .nan",
                                 "failover: {cooldown: {auth_failed: .inf}}",
                                 "shutdown_grace: .nan", "timeouts: {stream_idle: .inf}"])  # fmt: skip
def test_yaml_nan_and_infinity_are_refused_as_durations(doc: str) -> None:
    with pytest.raises(ConfigError):
        parse(doc)


def test_durations_in_yaml() -> None:
    c = parse(
        """
        shutdown_grace: 250ms
        timeouts: {per_request: 30s, stream_idle: 5m, total: 600}
        failover: {cooldown: {rate_limited: 1.5, auth_failed: "45"}}
        """
    )
    assert c.shutdown_grace == pytest.approx(0.25)
    assert (c.timeouts.per_request, c.timeouts.stream_idle, c.timeouts.total) == (30, 300, 600)
    assert c.failover.cooldown.rate_limited == 1.5
    assert c.failover.cooldown.auth_failed == 45.0


# --------------------------------------------------------------------------- host:port


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("127.0.0.1:8080", HostPort("127.0.0.1", 8080)),
        ("0.0.0.0:80", HostPort("0.0.0.0", 80)),
        ("localhost:0", HostPort("localhost", 0)),
        ("[::1]:9090", HostPort("::1", 9090)),
    ],
)
def test_host_port(raw: str, expected: HostPort) -> None:
    assert parse_host_port(raw) == expected


@pytest.mark.parametrize(
    "raw", ["localhost", "8080", 8080, ":8080", "host:", "host:http", "h:70000"]
)
def test_bad_host_port(raw: object) -> None:
    with pytest.raises(ValueError, match="host:port"):
        parse_host_port(raw)


def test_admin_port_must_differ_from_proxy_port() -> None:
    found = problems("listen: 127.0.0.1:8080\nadmin_listen: 127.0.0.1:8080\n")
    assert len(found) == 1
    assert found[0].startswith("admin_listen: ")


# --------------------------------------------------------------------------- many mistakes


def test_every_mistake_is_reported_at_once_with_its_path() -> None:
    found = problems(
        """
        listen: localhost
        timeout: {total: 5s}
        timeouts: {total: 5 minutes}
        failover: {on_status: [429, "teapot"]}
        providers:
          - id: openai
            api_keys: [{value: sk-LITERAL-do-not-echo-4242}]
          - id: ollama
            base_url: ftp://127.0.0.1:11434
            format: openai
          - id: openai
        managed:
          ollama: [{value: "${secrets.get('m', 'o')}"}]
        """
    )
    expected = {
        "listen": "listen: expected host:port",
        "typo": "timeout: unknown key",
        "duration": "timeouts.total: expected a duration",
        "on_status": "failover.on_status: expected a list of HTTP status codes",
        "literal": "providers[0].api_keys[0].value: expected a vault reference",
        "base_url": "providers[1].base_url: expected an http(s) URL",
        "duplicate": "providers[2].id: duplicate provider 'openai'",
        "managed": "managed.ollama: managed keys exist only for built-in providers",
    }
    for what, prefix in expected.items():
        hits = [p for p in found if p.startswith(prefix)]
        assert len(hits) == 1, f"{what}: {prefix!r} not reported exactly once in {found}"
    assert len(found) == len(expected), found


def test_config_error_message_lists_every_problem_and_the_file() -> None:
    with pytest.raises(ConfigError) as info:
        parse("listen: nope\ntimeouts: {total: forever}\n")
    err = info.value
    assert err.source == str(CFG)
    assert str(CFG) in str(err)
    assert "listen: expected host:port" in str(err)
    assert "timeouts.total: expected a duration" in str(err)


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("failover: {on_status: 429}", "failover.on_status: expected a list of HTTP status codes"),
        ("failover: {on_status: [42]}", "failover.on_status: expected a list of HTTP status codes"),
        (
            "failover: {on_status: [true]}",
            "failover.on_status: expected a list of HTTP status codes",
        ),
        ("failover: {max_attempts: 0}", "failover.max_attempts: expected a positive integer"),
        ("failover: {cooldown: {rate_limted: 3s}}", "failover.cooldown.rate_limted: unknown key"),
        (
            "failover: {cooldown: {server_error: soon}}",
            "failover.cooldown.server_error: expected a duration",
        ),
        ("timeouts: {per_requst: 3s}", "timeouts.per_requst: unknown key"),
        ("timeouts: [1, 2]", "timeouts: expected a mapping"),
        ("vault: {pth: v.json}", "vault.pth: unknown key"),
        ("admin_listen: 9090", "admin_listen: expected host:port"),
        ("passthrough: yes please", "passthrough: expected true or false"),
        ("limits: {max_body_bytes: -1}", "limits.max_body_bytes: expected a positive integer"),
        ("providers: {id: openai}", "providers: expected a list of providers"),
        ("providers: [openai]", "providers[0]: expected a mapping"),
        ("providers: [{id: 'bad id!'}]", "providers[0].id: expected a provider id"),
        ("providers: [{id: openai, base_ur: 'http://x'}]", "providers[0].base_ur: unknown key"),
        (
            "providers: [{id: openai, format: grpc}]",
            "providers[0].format: expected one of: openai, anthropic",
        ),
        (
            "providers: [{id: openai, auth: basic}]",
            "providers[0].auth: expected one of: bearer, x-api-key, api-key, x-goog-api-key, none",
        ),
        (
            "providers: [{id: openai, api_keys: {value: x}}]",
            "providers[0].api_keys: expected a list",
        ),
        (
            "providers: [{id: openai, api_keys: [{value: ''}]}]",
            "providers[0].api_keys[0].value: expected a vault reference",
        ),
        (
            "providers: [{id: openai, api_keys: [{valu: x}]}]",
            "providers[0].api_keys[0].valu: unknown key",
        ),
        (
            "managed: {openai: [{value: sk-literal-0000}]}",
            "managed.openai[0].value: expected a vault reference",
        ),
        ("managed: [openai]", "managed: expected a mapping"),
        ("ledger: {url: 'postgres://x'}", "ledger.url: expected sqlite"),
        (
            "prices: {gpt-x: {input: -1, output: 1}}",
            "prices.gpt-x.input: expected a non-negative number",
        ),
        ("prices: {gpt-x: {input: .nan, output: 1}}", "prices.gpt-x.input: expected a"),
        ("prices: {gpt-x: {input: " + "9" * 400 + ", output: 1}}", "prices.gpt-x.input: expected a"),
        ("prices: {gpt-x: {input: 1, output: 1000000001}}", "prices.gpt-x.output: expected a"),
        ("timeouts: {total: " + "9" * 400 + "}", "timeouts.total: expected a"),
        ("prices: {gpt-x: {input: 1, output: .inf}}", "prices.gpt-x.output: expected a"),
        ("[1, 2]", "(top level): expected a mapping"),
    ],
)
def test_single_mistakes_name_their_path(yaml_text: str, expected: str) -> None:
    found = problems(yaml_text)
    assert any(p.startswith(expected) for p in found), found


def test_duplicate_key_ids_in_one_list() -> None:
    found = problems(
        f"""
        providers:
          - id: openai
            api_keys:
              - {{id: a, value: "{REF}"}}
              - {{id: a, value: "{REF}"}}
        """
    )
    assert found == ["providers[0].api_keys[1].id: duplicate key id 'a'"]


def test_unknown_key_message_lists_what_is_allowed() -> None:
    (found,) = problems("timeouts: {totl: 5s}")
    for allowed in ("total", "per_request", "stream_idle"):
        assert allowed in found


# --------------------------------------------------------------------------- providers


def test_builtin_providers_are_known() -> None:
    assert BUILTIN_PROVIDERS["openai"].base_url == "https://api.openai.com/v1"
    assert BUILTIN_PROVIDERS["openai"].auth == "bearer"
    assert BUILTIN_PROVIDERS["openai"].format == "openai"
    assert BUILTIN_PROVIDERS["anthropic"].base_url == "https://api.anthropic.com/v1"
    assert BUILTIN_PROVIDERS["anthropic"].auth == "x-api-key"
    assert BUILTIN_PROVIDERS["anthropic"].format == "anthropic"


def test_builtin_provider_gets_its_defaults() -> None:
    c = parse("providers: [{id: anthropic}]")
    (p,) = c.providers
    assert (p.base_url, p.format, p.auth, p.builtin) == (
        "https://api.anthropic.com/v1", "anthropic", "x-api-key", True
    )  # fmt: skip


@pytest.mark.parametrize("pid", ["openai", "anthropic"])
def test_builtin_base_url_can_be_overridden(pid: str) -> None:
    c = parse(f"providers: [{{id: {pid}, base_url: 'http://127.0.0.1:8089/mirror/'}}]")
    p = c.provider(pid)
    assert p is not None
    assert p.base_url == "http://127.0.0.1:8089/mirror"
    assert p.builtin
    assert p.format == BUILTIN_PROVIDERS[pid].format
    assert p.auth == BUILTIN_PROVIDERS[pid].auth


def test_custom_provider_needs_base_url_and_format() -> None:
    found = problems("providers: [{id: ollama}]")
    assert len(found) == 2
    assert any(p.startswith("providers[0].base_url: expected an http(s) URL") for p in found)
    assert any(
        p.startswith("providers[0].format: expected one of: openai, anthropic") for p in found
    )


def test_custom_provider_with_base_url_and_format() -> None:
    c = parse(
        """
        providers:
          - id: vllm
            base_url: https://vllm.internal/v1
            format: openai
            models: [llama3.2, {id: qwen2.5}]
            api_keys: [{value: "${secrets.get('vllm', 'k')}"}]
        """
    )
    (p,) = c.providers
    assert (p.id, p.base_url, p.format, p.auth, p.builtin) == (
        "vllm", "https://vllm.internal/v1", "openai", "bearer", False
    )  # fmt: skip
    assert p.models == ("llama3.2", "qwen2.5")
    assert p.api_keys[0].id is None


def test_managed_keys_only_for_builtin_providers() -> None:
    found = problems(
        """
        providers: [{id: ollama, base_url: 'http://127.0.0.1:11434/v1', format: openai}]
        managed: {ollama: [{value: "${secrets.get('m', 'x')}"}]}
        """
    )
    assert found == [
        "managed.ollama: managed keys exist only for built-in providers (openai, anthropic, google)"
    ]


def test_provider_lookup_by_id() -> None:
    c = parse("providers: [{id: openai}, {id: anthropic}]")
    assert c.provider("anthropic") is c.providers[1]
    assert c.provider("nope") is None


# --------------------------------------------------------------------------- templates


def test_template_parses_references_with_either_quote_and_spaces() -> None:
    t = Template.parse("""Bearer ${ secrets.get( "a" , 'b' ) }-${secrets.get('c', "d")}""")
    assert t.refs == (SecretRef("a", "b"), SecretRef("c", "d"))
    assert not t.is_literal
    assert Template.parse("plain").is_literal
    assert Template.parse("${secrets.get('only-one')}").is_literal


def test_template_renders_and_never_shows_literal_parts() -> None:
    t = Template.parse("Bearer sk-INLINE-9999 ${secrets.get('a', 'b')}")
    rendered = t.render(lambda ref: Secret(f"<{ref.namespace}/{ref.name}>"))
    assert rendered.reveal() == "Bearer sk-INLINE-9999 <a/b>"
    for text in (repr(t), str(t), f"{t}"):
        assert "sk-INLINE-9999" not in text
        assert "secrets.get('a', 'b')" in text


def test_config_repr_hides_inline_header_values() -> None:
    c = parse(
        """
        providers:
          - id: azure
            base_url: https://x.example/v1
            format: openai
            headers: {api-key: "sk-INLINE-HEADER-31337 ${secrets.get('a', 'b')}"}
        """
    )
    assert "sk-INLINE-HEADER-31337" not in repr(c)
    assert "sk-INLINE-HEADER-31337" not in str(c)


def test_literal_key_is_not_echoed_in_the_error() -> None:
    literal = "sk-proj-LITERAL-Zx81Qm0000"
    with pytest.raises(ConfigError) as info:
        parse(f"providers: [{{id: openai, api_keys: [{{value: {literal}}}]}}]")
    err = info.value
    assert literal not in str(err)
    assert literal not in repr(err)
    assert all(literal not in p for p in err.problems)


# --------------------------------------------------------------------------- files


def test_relative_paths_resolve_against_the_config_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf_dir = tmp_path / "etc" / "sidecar"
    conf_dir.mkdir(parents=True)
    (conf_dir / "sidecar.yaml").write_text(
        "vault: {path: secrets/vault.json, private_key_file: keys/sidecar.key}\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    c = load_config(Path("../etc/sidecar/sidecar.yaml"))
    assert c.vault.path.resolve() == conf_dir / "secrets" / "vault.json"
    assert c.vault.private_key_file is not None
    assert c.vault.private_key_file.resolve() == conf_dir / "keys" / "sidecar.key"
    assert c.vault.path.is_absolute()
    assert c.base_dir.resolve() == conf_dir


def test_absolute_vault_path_is_kept(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("vault: {path: /var/lib/sidecar/vault.json}\n")
    assert load_config(cfg).vault.path == Path("/var/lib/sidecar/vault.json")


def test_default_vault_path_is_next_to_the_config(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    assert load_config(cfg).vault.path == tmp_path / "vault.json"


@pytest.mark.parametrize(
    ("text", "line", "column"),
    [
        ("listen: 127.0.0.1:8080\nproviders: [1, 2\nfoo: bar\n", 3, 4),
        ("a: b: c\n", 1, 5),
        ("providers:\n\t- id: openai\n", 2, 1),
        ("passthrough: 'unterminated\n", 2, 1),
    ],
)
def test_invalid_yaml_gives_line_and_column(
    tmp_path: Path, text: str, line: int, column: int
) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    (problem,) = info.value.problems
    assert problem.startswith(f"line {line}, column {column}: not valid YAML"), problem
    assert "Traceback" not in problem
    assert info.value.__suppress_context__


def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "absent.yaml")
    assert "cannot read file" in info.value.problems[0]
    assert info.value.source == str(tmp_path / "absent.yaml")


def test_config_objects_are_frozen() -> None:
    c = parse("providers: [{id: openai}]")
    with pytest.raises(AttributeError):
        c.listen = HostPort("x", 1)  # type: ignore[misc]
    with pytest.raises(AttributeError):
        c.providers[0].base_url = "http://x"  # type: ignore[misc]


def test_malformed_references_and_zero_timeouts_are_config_errors() -> None:
    text = """
timeouts: {per_request: 0, total: 0s}
providers:
  - id: az
    base_url: http://127.0.0.1:9/v1
    format: openai
    auth: none
    headers: {api-key: "${secrets.get(azure, key)}", x-team: payments}
  - id: openai
    api_keys: [{value: "${secret.get('a','b')}"}]
"""
    with pytest.raises(ConfigError) as exc:
        parse_config_text(text, CFG)
    problems = exc.value.problems
    assert any(
        p.startswith("providers[0].headers.api-key: malformed vault reference") for p in problems
    )
    assert any(
        p.startswith("providers[1].api_keys[0].value: malformed vault reference") for p in problems
    )
    assert any(p.startswith("timeouts.per_request: expected a duration above 0") for p in problems)
    assert any(p.startswith("timeouts.total: expected a duration above 0") for p in problems)
    assert not any("x-team" in p for p in problems)  # a plain header value is fine


# --------------------------------------------------------------------------- server hardening (#10)


def test_connection_limits_and_client_timeouts_have_defaults() -> None:
    c = parse("")
    assert c.limits.max_connections == 1024
    assert (c.timeouts.client_header, c.timeouts.client_body, c.timeouts.keepalive) == (
        10.0,
        60.0,
        60.0,
    )


def test_connection_limits_and_client_timeouts_parse() -> None:
    c = parse(
        """
        limits: {max_connections: 100}
        timeouts: {client_header: 500ms, client_body: 2s, keepalive: 1m}
        """
    )
    assert c.limits.max_connections == 100
    assert c.limits.max_body_bytes == 33554432
    assert (c.timeouts.client_header, c.timeouts.client_body, c.timeouts.keepalive) == (
        0.5,
        2.0,
        60.0,
    )


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("limits: {max_connections: 0}", "limits.max_connections: expected a positive integer"),
        ("limits: {max_connections: true}", "limits.max_connections: expected a positive integer"),
        ("timeouts: {client_header: 0}", "timeouts.client_header: expected a duration above 0"),
        ("timeouts: {client_body: soon}", "timeouts.client_body: expected a duration"),
        ("timeouts: {keepalive: -1}", "timeouts.keepalive: expected a non-negative duration"),
    ],
)
def test_connection_limits_and_client_timeouts_are_validated(yaml_text: str, expected: str) -> None:
    found = problems(yaml_text)
    assert any(p.startswith(expected) for p in found), found


@pytest.mark.parametrize(
    "url",
    [
        "sqlite://ledger.db",  # two slashes: neither relative (3) nor absolute (4)
        "sqlite://",
        "sqlite:///",
        "redis://:hunter2@127.0.0.1:port/0",
        "redis://127.0.0.1:6379/zero",
        "postgres://user:hunter2@db/x",
    ],
)
def test_ledger_url_is_checked_by_the_parser_that_opens_it(url: str, tmp_path: Path) -> None:
    """What passes config validation (and so `sidecar check`) must also open at `serve`."""
    from sidecar.ledger import open_ledger

    found = problems(f'ledger: {{url: "{url}"}}')
    (problem,) = [p for p in found if p.startswith("ledger.url: ")]
    with pytest.raises(ValueError, match=r"^ledger\.url: ") as opened:
        open_ledger(url, base_dir=tmp_path)
    assert problem == str(opened.value)  # one validation, one message
    assert "hunter2" not in problem


@pytest.mark.parametrize(
    "url",
    ["sqlite:///ledger.db", "sqlite:////var/lib/x.db", "sqlite://:memory:", "redis://h:6379/0"],
)
def test_ledger_urls_that_open_pass_validation(url: str) -> None:
    assert parse(f'ledger: {{url: "{url}"}}').ledger.url == url


def test_check_refuses_a_two_slash_sqlite_ledger_url(tmp_path: Path) -> None:
    """`sidecar check` reports the URL that would crash `serve`, with its key path."""
    import subprocess
    import sys

    config = tmp_path / "sidecar.yaml"
    config.write_text('ledger: {url: "sqlite://ledger.db"}\n')
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "sidecar", "check", "--config", str(config)],
                          capture_output=True, text=True, cwd=root, timeout=30, check=False)  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    assert "ledger.url" in done.stderr
    assert "Traceback" not in done.stderr


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    """`sidecar check --config nosuch.yaml` says which file is missing, not just that one is."""
    import subprocess
    import sys

    missing = tmp_path / "nosuch.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert str(missing) in str(info.value)
    assert "no such file" in str(info.value).lower()
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "sidecar", "check", "--config", "nosuch.yaml"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=30, check=False,
                          env={**os.environ, "PYTHONPATH": str(root)})  # fmt: skip
    assert done.returncode == 1
    assert "nosuch.yaml" in done.stderr
    assert "no such file" in done.stderr.lower()


@pytest.mark.parametrize(
    "url",
    [
        "http://user:pw@127.0.0.1:8089/v1",  # userinfo: where keys go must be host and port only
        "http://127.0.0.1:8089/v1?api-version=1",  # a query would be dropped: query_params
        "http://127.0.0.1:8089/v1#frag",
        "http://127.0.0.1:port/v1",
        "http:///v1",
    ],
)
def test_base_url_parts_that_would_be_dropped_or_ambiguous_are_refused(url: str) -> None:
    found = problems(f"providers: [{{id: openai, base_url: '{url}'}}]")
    assert any(p.startswith("providers[0].base_url: expected an http(s) URL") for p in found), found


def test_fallbacks_keep_their_order_and_names() -> None:
    c = parse(
        "fallbacks:\n  gpt-4o: [gpt-4o-mini, 'anthropic:claude-haiku-4-5']\n  'claude-*': [gpt-4.1]\n"
    )
    assert c.fallbacks == (
        ("gpt-4o", ("gpt-4o-mini", "anthropic:claude-haiku-4-5")),
        ("claude-*", ("gpt-4.1",)),
    )
    assert parse("").fallbacks == ()


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("fallbacks: [a, b]", "fallbacks: expected a mapping"),
        ("fallbacks: {gpt-4o: gpt-4o-mini}", "fallbacks.gpt-4o: expected a list of 1 to 16"),
        ("fallbacks: {gpt-4o: []}", "fallbacks.gpt-4o: expected a list of 1 to 16"),
        (
            "fallbacks: {gpt-4o: [" + ", ".join(f"m{i}" for i in range(17)) + "]}",
            "fallbacks.gpt-4o",
        ),
        ('fallbacks: {gpt-4o: ["ok", "bad\\nname"]}', "fallbacks.gpt-4o[1]: expected a model name"),
        ('fallbacks: {"é": [gpt-4o]}', "fallbacks.é: expected a model name or glob"),
    ],
)
def test_bad_fallbacks_are_config_errors(text: str, where: str) -> None:
    assert any(p.startswith(where) for p in problems(text)), problems(text)


def test_next_model_on_codes() -> None:
    assert parse("").failover.next_model_on_codes == frozenset()
    c = parse("failover: {next_model_on_codes: [model_gone, too_big]}")
    assert c.failover.next_model_on_codes == {"model_gone", "too_big"}
    assert any(
        p.startswith("failover.next_model_on_codes: expected a list of error codes")
        for p in problems("failover: {next_model_on_codes: [1]}")
    )


def test_failover_retry_defaults_and_overrides() -> None:
    from sidecar.config import Retry

    assert parse("").failover.retry == Retry(attempts=1, backoff=0.25, max_wait=3.0)
    c = parse("failover: {retry: {attempts: 0, backoff: 100ms, max_wait: 1s}}")
    assert c.failover.retry == Retry(attempts=0, backoff=0.1, max_wait=1.0)
    assert any(
        p.startswith("failover.retry.attempts: expected a whole number")
        for p in problems("failover: {retry: {attempts: -1}}")
    )
    assert any(
        p.startswith("failover.retry.tries: unknown key")
        for p in problems("failover: {retry: {tries: 2}}")
    )


def test_prefill_per_provider_and_per_model() -> None:
    c = parse(
        """
        providers:
          - id: deepseek
            base_url: https://api.deepseek.com/v1
            format: openai
            prefill: true
            models: [deepseek-chat, {id: deepseek-reasoner, prefill: false}]
          - id: anthropic
        """
    )
    deepseek, anthropic = c.providers
    assert deepseek.prefill is True
    assert deepseek.models == ("deepseek-chat", "deepseek-reasoner")
    assert deepseek.model_prefill == (("deepseek-reasoner", False),)
    assert anthropic.prefill is None  # the format's default, decided by the runtime


def test_bad_prefill_and_resume_values_are_reported_with_their_paths() -> None:
    with pytest.raises(ConfigError) as exc:
        parse(
            """
            failover: {resume: maybe}
            timeouts: {first_token: -1}
            providers:
              - id: openai
                prefill: "yes"
                models: [{id: gpt-4o, prefill: 1, extra: x}]
            """
        )
    text = str(exc.value)
    for path in ("failover.resume", "timeouts.first_token", "providers[0].prefill",
                 "providers[0].models[0].prefill", "providers[0].models[0].extra"):  # fmt: skip
        assert path in text


def test_shared_state_is_optional_and_takes_a_redis_url_and_a_bounded_timeout() -> None:
    assert parse("log: {level: info}").shared_state is None
    cfg = parse('shared_state: {url: "redis://:hunter2@redis.infra:6379/2", timeout: 250ms}')
    assert cfg.shared_state is not None
    assert (cfg.shared_state.url, cfg.shared_state.timeout) == (
        "redis://:hunter2@redis.infra:6379/2",
        0.25,
    )
    assert "hunter2" not in repr(cfg.shared_state)
    assert parse('shared_state: {url: "redis://h:6379/0"}').shared_state.timeout == 0.5  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ("shared_state: {}", "shared_state.url: required"),
        ("shared_state: redis://h", "shared_state: expected a mapping"),
        ('shared_state: {url: "sqlite:///x.db"}', "shared_state.url: expected redis://"),
        ('shared_state: {url: "redis://:hunter2@h:port/0"}', "shared_state.url: invalid redis URL"),
        ('shared_state: {url: "redis://h:6379/0", timeout: 6s}', "shared_state.timeout: expected"),
        ('shared_state: {url: "redis://h:6379/0", timeout: 1ms}', "shared_state.timeout: expected"),
        ('shared_state: {url: "redis://h:6379/0", pool: 3}', "shared_state.pool: unknown key"),
    ],
)
def test_shared_state_problems_name_their_key_and_never_a_password(body: str, problem: str) -> None:
    found = problems(body)
    assert any(p.startswith(problem) for p in found), found
    assert not any("hunter2" in p for p in found)


# --------------------------------------------------------------------------- tracing


def test_tracing_is_off_unless_configured() -> None:
    assert parse("log: {level: info}").tracing is None
    assert parse("tracing:").tracing is None


def test_tracing_takes_endpoint_service_ratio_headers_and_timeout() -> None:
    cfg = parse(
        """
        tracing:
          endpoint: http://otel-collector:4318/v1/traces
          service_name: checkout-sidecar
          sample_ratio: 0.25
          timeout: 2s
          headers: {Authorization: "Bearer hunter2", X-Scope-OrgID: team-a}
        """
    )
    t = cfg.tracing
    assert t is not None
    assert (t.endpoint, t.service_name, t.sample_ratio, t.timeout) == (
        "http://otel-collector:4318/v1/traces", "checkout-sidecar", 0.25, 2.0)  # fmt: skip
    assert t.headers == (
        ("authorization", Secret("Bearer hunter2")),
        ("x-scope-orgid", Secret("team-a")),
    )
    assert "hunter2" not in repr(t)
    assert "hunter2" not in repr(cfg)


def test_a_tracing_endpoint_is_not_in_the_config_repr() -> None:
    # Some collectors take their token in the URL's query.
    cfg = parse("tracing: {endpoint: 'https://otel.example/v1/traces?token=hunter2'}")
    assert cfg.tracing is not None
    assert cfg.tracing.endpoint.endswith("?token=hunter2")
    assert "hunter2" not in repr(cfg.tracing)
    assert "hunter2" not in repr(cfg)


def test_tracing_defaults_and_the_standard_path_for_a_bare_collector_url() -> None:
    t = parse("tracing: {endpoint: 'https://collector.infra:4318'}").tracing
    assert t is not None
    assert t.endpoint == "https://collector.infra:4318/v1/traces"
    assert (t.service_name, t.sample_ratio, t.headers, t.timeout) == (
        "ai-gateway-sidecar", 1.0, (), 10.0)  # fmt: skip
    slash = parse("tracing: {endpoint: 'http://c:4318/'}").tracing
    assert slash is not None
    assert slash.endpoint == "http://c:4318/v1/traces"
    custom = parse("tracing: {endpoint: 'http://c:4318/otlp/v1/traces', sample_ratio: 0}").tracing
    assert custom is not None
    assert (custom.endpoint, custom.sample_ratio) == ("http://c:4318/otlp/v1/traces", 0.0)


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ("tracing: {}", "tracing.endpoint: required"),
        ("tracing: http://c:4318", "tracing: expected a mapping"),
        ("tracing: {endpoint: 'grpc://c:4317'}", "tracing.endpoint: expected an http(s) URL"),
        (
            "tracing: {endpoint: 'http://u:hunter2@c:4318'}",
            "tracing.endpoint: expected an http(s) URL",
        ),
        (
            "tracing: {endpoint: 'http://c:port/v1/traces'}",
            "tracing.endpoint: expected an http(s) URL",
        ),
        ("tracing: {endpoint: 4318}", "tracing.endpoint: expected an http(s) URL"),
        (
            "tracing: {endpoint: 'http://c:4318', sample_ratio: 1.5}",
            "tracing.sample_ratio: expected a number from 0 to 1",
        ),
        (
            "tracing: {endpoint: 'http://c:4318', sample_ratio: true}",
            "tracing.sample_ratio: expected",
        ),
        (
            "tracing: {endpoint: 'http://c:4318', service_name: ''}",
            "tracing.service_name: expected",
        ),
        (
            "tracing: {endpoint: 'http://c:4318', timeout: 0s}",
            "tracing.timeout: expected a duration from 100ms to 60s",
        ),
        ("tracing: {endpoint: 'http://c:4318', timeout: 2m}", "tracing.timeout: expected"),
        (
            "tracing: {endpoint: 'http://c:4318', headers: [a]}",
            "tracing.headers: expected a mapping",
        ),
        (
            "tracing: {endpoint: 'http://c:4318', headers: {'bad name': x}}",
            "tracing.headers: expected header names",
        ),
        (
            "tracing: {endpoint: 'http://c:4318', headers: {a: 3}}",
            "tracing.headers.a: expected a non-empty string",
        ),
        (
            "tracing: {endpoint: 'http://c:4318', headers: {a: \"x\\nhunter2\"}}",
            "tracing.headers.a: expected printable ASCII",
        ),
        (
            "tracing: {endpoint: 'http://c:4318', headers: {a: \"${secrets.get('o', 'hunter2')}\"}}",
            "tracing.headers.a: vault references are not read here",
        ),
        ("tracing: {endpoint: 'http://c:4318', exporter: grpc}", "tracing.exporter: unknown key"),
    ],
)
def test_tracing_problems_name_their_key_and_never_a_header_value(body: str, problem: str) -> None:
    found = problems(body)
    assert any(p.startswith(problem) for p in found), found
    assert not any("hunter2" in p for p in found)


@pytest.mark.parametrize(
    "name",
    ["Transfer-Encoding", "content-length", "Connection", "Upgrade", "Expect", "TE", "Trailer",
     "Keep-Alive", "proxy-connection", "bad name", "x:y", "x\u00e9"],
)  # fmt: skip
def test_a_provider_header_that_would_change_how_a_request_is_framed_is_refused(name: str) -> None:
    text = f"""
providers:
  - id: openai
    api_keys: [{{id: a, value: "${{secrets.get('a', 'b')}}"}}]
    headers: {{"{name}": "x"}}
"""
    with pytest.raises(ConfigError) as exc:
        parse_config_text(text, CFG)
    assert any(p.startswith(f"providers[0].headers.{name}: ") for p in exc.value.problems)


def test_ordinary_provider_headers_and_a_host_override_are_accepted() -> None:
    text = """
providers:
  - id: openai
    api_keys: [{id: a, value: "${secrets.get('a', 'b')}"}]
    headers: {OpenAI-Organization: org-1, anthropic-beta: x, Host: api.example, x_y.z~1: v}
"""
    cfg = parse_config_text(text, CFG)
    assert [k for k, _ in cfg.providers[0].headers] == [
        "OpenAI-Organization", "anthropic-beta", "Host", "x_y.z~1"
    ]


def test_a_tracing_header_name_with_a_line_break_is_refused() -> None:
    text = """
tracing:
  endpoint: http://127.0.0.1:4318/v1/traces
  headers: {"x-a\\n": v}
"""
    with pytest.raises(ConfigError) as exc:
        parse_config_text(text, CFG)
    assert any(p.startswith("tracing.headers") for p in exc.value.problems)


def test_a_redis_ledger_url_with_a_password_is_not_in_any_repr() -> None:
    cfg = parse('ledger: {url: "redis://:hunter2@redis.infra:6379/3"}')
    assert cfg.ledger.url == "redis://:hunter2@redis.infra:6379/3"
    shown = "hunter2" in repr(cfg.ledger) or "hunter2" in repr(cfg)
    assert not shown
