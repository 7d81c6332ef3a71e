"""bench/run.py's pure helpers: --mode parsing, what each target is sent, and the sidecar's
files with --shared-state and --limits (no wrk, no servers)."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
from pathlib import Path
from typing import Any

import pytest

from bench import run
from sidecar.cli import main as cli_main
from sidecar.config import parse_config_text


@pytest.mark.parametrize(
    ("text", "modes"),
    [
        ("both", ("json", "stream")),
        ("all", ("json", "stream", "xjson", "xstream")),
        ("xjson", ("xjson",)),
        ("xstream, json", ("xstream", "json")),
        ("json,both,xjson", ("json", "stream", "xjson")),
    ],
)
def test_mode_lists_expand_both_and_all_without_repeats(text: str, modes: tuple[str, ...]) -> None:
    assert run.parse_modes(text) == modes


@pytest.mark.parametrize("text", ["", ",", "xml", "json,xtream"])
def test_unknown_modes_are_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="--mode"):
        run.parse_modes(text)


def test_the_default_mode_is_json_and_stream() -> None:
    assert run.parse_args([])[0].modes == ("json", "stream")
    assert run.parse_args(["--mode", "all"])[0].modes == run.MODES


def test_only_a_sidecar_is_sent_the_model_to_translate() -> None:
    sidecar = run.Target("sidecar", "u", "t", mock=None, translates=True)  # type: ignore[arg-type]
    relay = run.Target("pass-through", "u", "t", mock=None)  # type: ignore[arg-type]
    assert b'"model":"claude-haiku-4-5"' in run.request_body("xjson", sidecar)
    assert b'"model":"gpt-4o-mini"' in run.request_body("xjson", relay)
    assert run.request_body("xstream", relay) == run.request_body("stream", sidecar)
    assert run.request_body("json", sidecar).endswith(b"}]}")


def test_the_anthropic_provider_is_configured_only_for_translated_modes() -> None:
    assert run._sidecar_providers(("json", "stream")) == ("openai",)
    assert run._sidecar_providers(("json", "xstream")) == ("openai", "anthropic")


# --------------------------------------------------------------------------- shared_state and limits


def _cli(*argv: str) -> str:
    """`sidecar ARGV` in-process (what the bench runs as a process); its stdout."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert cli_main(list(argv)) in (0, None)
    return out.getvalue().strip()


def _bench_vault(tmp_path: Path, limits: bool) -> dict[str, Any]:
    """The bench's access key, created with its own arguments; the vault's entry for it."""
    public = _cli("keygen", "--private-key", str(tmp_path / "sidecar.key"))
    vault = str(tmp_path / "vault.json")
    _cli("vault", "init", "--vault", vault, "--public-key", public)
    args = [vault if a == "vault.json" else a for a in run.access_key_args(limits)]
    created = _cli(*args).startswith("sk-sc-")  # the token itself is never shown
    assert created
    entry: dict[str, Any] = json.loads(Path(vault).read_text())["access_keys"]["bench"]
    return entry


def test_with_limits_the_bench_access_key_gets_rpm_and_tpm_it_never_reaches(tmp_path: Path) -> None:
    entry = _bench_vault(tmp_path, limits=True)
    assert (entry["rpm"], entry["tpm"]) == (run.BENCH_RATE_LIMIT, run.BENCH_RATE_LIMIT)
    assert run.BENCH_RATE_LIMIT >= 10**9  # far above any wrk run: nothing refused


def test_without_limits_the_bench_access_key_has_none(tmp_path: Path) -> None:
    entry = _bench_vault(tmp_path, limits=False)
    assert "rpm" not in entry
    assert "tpm" not in entry
    assert not any(a.startswith("--") and a != "--vault" for a in run.access_key_args(False))


def test_the_sidecar_config_sets_shared_state_only_when_asked(tmp_path: Path) -> None:
    url = "redis://127.0.0.1:6399/0"
    text = run._sidecar_config(18080, 19090, 18081, access_log=True, shared_state=url)
    cfg = parse_config_text(text, tmp_path / "sidecar.yaml")
    assert cfg.shared_state is not None
    assert (cfg.shared_state.url, cfg.shared_state.timeout) == (url, 0.5)
    plain = run._sidecar_config(18080, 19090, 18081, access_log=True)
    assert "shared_state" not in plain
    assert parse_config_text(plain, tmp_path / "sidecar.yaml").shared_state is None


def _tree(root: Path, *files: str) -> run.Tree:
    for name in ("sidecar/__init__.py", "sidecar/translate/__init__.py", *files):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).touch()
    return run.Tree(root, "python")


@pytest.mark.parametrize(
    ("flags", "refused"),
    [
        ({"shared_state": True}, "--shared-state:"),
        ({"limits": True}, "--limits:"),
        ({"shared_state": True, "limits": True}, "--shared-state and --limits:"),
    ],
)
def test_a_tree_from_before_shared_state_is_refused_these_flags(
    tmp_path: Path, flags: dict[str, bool], refused: str
) -> None:
    old = _tree(tmp_path)
    with pytest.raises(run.BenchError, match=refused) as caught:
        run.check_tree(old, ("json", "stream"), **flags)
    assert str(old.path) in str(caught.value)
    run.check_tree(old, ("json", "stream"))  # measured as before without them


def test_a_tree_with_the_feature_files_is_measured_with_them(tmp_path: Path) -> None:
    new = _tree(tmp_path, "sidecar/shared/replicas.py", "sidecar/ratelimits.py")
    run.check_tree(new, ("json", "xstream"), shared_state=True, limits=True)
    run.check_tree(run.Tree(run.REPO, "python"), ("json",), shared_state=True, limits=True)


def test_the_flags_reach_the_settings_and_the_report_names_them() -> None:
    plain = run.parse_args([])[0]
    both = run.parse_args(["--shared-state", "--limits"])[0]
    assert (plain.shared_state, plain.limits, both.shared_state, both.limits) == (
        False, False, True, True
    )  # fmt: skip
    assert "shared_state off" in plain.features()
    assert "without rate limits" in plain.features()
    assert "shared_state on" in both.features()
    assert "counted on Redis" in both.features()
    assert "counted in the sidecar" in run.parse_args(["--limits"])[0].features()
    assert run.processes(plain) == ("proxy", "mock", "wrk")
    assert run.processes(both) == ("proxy", "mock", "wrk", "redis")


def test_redis_info_replies_are_read_into_calls_per_command() -> None:
    body = (
        b"# Commandstats\r\ncmdstat_evalsha:calls=12,usec=80,usec_per_call=6.67\r\n"
        b"cmdstat_ping:calls=3,usec=1\r\n\r\n"
    )
    reply = b"$%d\r\n%s\r\n" % (len(body), body)
    assert run._resp_complete(reply)
    assert not run._resp_complete(reply[:-5])
    calls = run.command_calls(run.parse_redis_info(reply))
    assert calls == {"evalsha": 12, "ping": 3}
    assert run._redis_address("redis://127.0.0.1:6399/0") == ("127.0.0.1", 6399)
