"""The `sidecar` command (docs/reference.md#commands), in-process through `main(argv)` and as real processes."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest

from sidecar.cli import main
from sidecar.crypto import PRIVATE_KEY_ENV, Opener, load_private_key
from sidecar.ledger import open_ledger
from sidecar.vault import hash_access_key, open_vault, read_vault

REPO_ROOT = Path(__file__).resolve().parents[1]

# Distinctive values: any of them showing up in any output is a leak.
OPENAI_PRIMARY = "sk-proj-LEAKPROBE-openai-primary-Zq81Xw"
ANTHROPIC_KEY = "sk-ant-LEAKPROBE-anthropic-Pm27Lk"
ATTACHED_ONE = "sk-proj-LEAKPROBE-attached-one-Hh55Tt"
ATTACHED_TWO = "sk-proj-LEAKPROBE-attached-two-Gg66Rr"
LITERAL_IN_CONFIG = "sk-proj-LEAKPROBE-literal-in-config-Uu99"

CONFIG = """\
listen: 127.0.0.1:18080
admin_listen: 127.0.0.1:19090
vault: {{path: vault.json, private_key_file: sidecar.key}}
providers:
  - id: openai
    api_keys:
      - id: org-primary
        value: ${{secrets.get('openai', 'primary')}}
{extra}"""


@pytest.fixture(autouse=True)
def _no_env_private_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PRIVATE_KEY_ENV, raising=False)
    monkeypatch.delenv("SIDECAR_CONFIG", raising=False)


# --------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str

    @property
    def text(self) -> str:
        return self.out + self.err


def cli(*argv: str, stdin: str = "") -> Run:
    """Run `main(argv)` in-process with `stdin`, capturing stdout, stderr and the exit code."""
    out, err = io.StringIO(), io.StringIO()
    saved_stdin = sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(argv))
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.stdin = saved_stdin
    return Run(code, out.getvalue(), err.getvalue())


def proc_env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop(PRIVATE_KEY_ENV, None)
    env.pop("SIDECAR_CONFIG", None)
    return env


def run_proc(
    *argv: str, stdin: str = "", cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *argv],
        input=stdin,
        capture_output=True,
        text=True,
        env=proc_env(),
        cwd=cwd or REPO_ROOT,
        timeout=30,
        check=False,
    )


@dataclass
class Deployment:
    root: Path
    public_key: str
    outputs: list[Run] = field(default_factory=list)

    @property
    def key(self) -> Path:
        return self.root / "sidecar.key"

    @property
    def vault(self) -> Path:
        return self.root / "vault.json"

    @property
    def config(self) -> Path:
        return self.root / "sidecar.yaml"

    def run(self, *argv: str, stdin: str = "") -> Run:
        result = cli(*argv, stdin=stdin)
        self.outputs.append(result)
        return result

    def ok(self, *argv: str, stdin: str = "") -> Run:
        result = self.run(*argv, stdin=stdin)
        assert result.code == 0, result
        return result

    def raw(self) -> dict[str, Any]:
        return orjson.loads(self.vault.read_bytes())  # type: ignore[no-any-return]

    def write_raw(self, raw: dict[str, Any]) -> None:
        self.vault.write_bytes(orjson.dumps(raw))

    def write_config(self, extra: str = "") -> None:
        self.config.write_text(CONFIG.format(extra=extra))

    def opener(self) -> Opener:
        return load_private_key(self.key)

    def check(self) -> Run:
        return self.run("check", "--config", str(self.config))


@pytest.fixture
def dep(tmp_path: Path) -> Deployment:
    """keygen → vault init → secret set → config: a deployment that passes `check`."""
    root = tmp_path / "deploy"
    root.mkdir()
    keygen = cli("keygen", "--private-key", str(root / "sidecar.key"))
    assert keygen.code == 0, keygen
    d = Deployment(root, keygen.out.strip(), [keygen])
    d.ok("vault", "init", "--vault", str(d.vault), "--public-key", d.public_key)
    d.ok("secret", "set", "--vault", str(d.vault), "openai", "primary", stdin=OPENAI_PRIMARY + "\n")
    d.write_config()
    return d


def assert_one_error_line(result: Run, *fragments: str) -> None:
    assert result.code == 1, result
    assert result.out == ""
    assert result.err.startswith("error: ")
    assert result.err.count("\n") == 1, result.err
    for fragment in fragments:
        assert fragment in result.err


def table(out: str) -> dict[str, dict[str, str]]:
    """A tab-separated listing with a header line, keyed by its first column."""
    header, *lines = out.splitlines()
    columns = header.split("\t")
    rows = [dict(zip(columns, line.split("\t"), strict=True)) for line in lines]
    return {row[columns[0]]: row for row in rows}


def temp_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


# --------------------------------------------------------------------------- keygen


def test_keygen_writes_0600_and_prints_the_public_key_alone(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.key"
    result = cli("keygen", "--private-key", str(path))
    assert result.code == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    public = result.out.strip()
    assert result.out == public + "\n"
    assert len(base64.b64decode(public, validate=True)) == 32
    assert load_private_key(path).public_key == public
    private = path.read_text().strip()
    assert private not in result.text


def test_keygen_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.key"
    assert cli("keygen", "--private-key", str(path)).code == 0
    before = path.read_bytes()
    result = cli("keygen", "--private-key", str(path))
    assert_one_error_line(result, str(path), "refusing to overwrite")
    assert path.read_bytes() == before


def test_keygen_as_a_process(tmp_path: Path) -> None:
    path = tmp_path / "k"
    proc = run_proc("keygen", "--private-key", str(path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("\n") == 1
    assert load_private_key(path).public_key == proc.stdout.strip()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


# --------------------------------------------------------------------------- vault init


def test_vault_init_refuses_an_existing_vault(dep: Deployment) -> None:
    before = dep.vault.read_bytes()
    other = cli("keygen", "--private-key", str(dep.root / "other.key")).out.strip()
    result = cli("vault", "init", "--vault", str(dep.vault), "--public-key", other)
    assert_one_error_line(result, "already exists")
    assert dep.vault.read_bytes() == before


def test_vault_init_rejects_a_bad_public_key(tmp_path: Path) -> None:
    result = cli("vault", "init", "--vault", str(tmp_path / "v.json"), "--public-key", "nope")
    assert_one_error_line(result, "public key")
    assert not (tmp_path / "v.json").exists()


def test_vault_init_creates_an_empty_vault(dep: Deployment) -> None:
    path = dep.root / "fresh.json"
    dep.ok("vault", "init", "--vault", str(path), "--public-key", dep.public_key)
    doc = read_vault(path)
    assert (doc.recipient, doc.secrets, doc.access_keys) == (dep.public_key, {}, {})


# --------------------------------------------------------------------------- secrets


def test_secret_set_strips_whitespace(dep: Deployment) -> None:
    dep.ok(
        "secret",
        "set",
        "--vault",
        str(dep.vault),
        "anthropic",
        "k",
        stdin=f"\n  {ANTHROPIC_KEY} \t\n\n",
    )
    opened, problems = open_vault(read_vault(dep.vault), dep.opener())
    assert problems == []
    assert opened.secrets[("anthropic", "k")].reveal() == ANTHROPIC_KEY
    assert opened.secrets[("openai", "primary")].reveal() == OPENAI_PRIMARY


@pytest.mark.parametrize("stdin", ["", "\n", "   \t\n  "])
def test_secret_set_with_empty_stdin_is_a_user_error(dep: Deployment, stdin: str) -> None:
    before = dep.vault.read_bytes()
    result = cli("secret", "set", "--vault", str(dep.vault), "ns", "name", stdin=stdin)
    assert_one_error_line(result, "standard input")
    assert dep.vault.read_bytes() == before


@pytest.mark.parametrize("stdin", ["sk-a\nsk-b", "sk-a\r\nX-Injected: 1\n", "sk-a\rb"])
def test_a_secret_with_a_line_break_inside_is_a_user_error(dep: Deployment, stdin: str) -> None:
    """It would split every request's head: the sidecar would refuse the vault. Refused
    here, without the value in the message."""
    before = dep.vault.read_bytes()
    result = cli("secret", "set", "--vault", str(dep.vault), "ns", "name", stdin=stdin)
    assert_one_error_line(result, "line break")
    shown = "sk-a" in result.err or "sk-a" in result.out
    assert not shown
    assert dep.vault.read_bytes() == before


def test_secret_set_replaces_a_value(dep: Deployment) -> None:
    dep.ok(
        "secret", "set", "--vault", str(dep.vault), "openai", "primary", stdin="sk-replaced-0001"
    )
    opened, _ = open_vault(read_vault(dep.vault), dep.opener())
    assert opened.secrets[("openai", "primary")].reveal() == "sk-replaced-0001"


def test_secret_set_on_a_missing_vault(tmp_path: Path) -> None:
    result = cli("secret", "set", "--vault", str(tmp_path / "absent.json"), "a", "b", stdin="v")
    assert_one_error_line(result, "absent.json", "vault init")


def test_secret_list_shows_names_only(dep: Deployment) -> None:
    dep.ok("secret", "set", "--vault", str(dep.vault), "anthropic", "k", stdin=ANTHROPIC_KEY)
    result = dep.ok("secret", "list", "--vault", str(dep.vault))
    assert result.out.splitlines() == ["anthropic\tk", "openai\tprimary"]


# --------------------------------------------------------------------------- access keys


def test_access_key_is_printed_once_and_stored_only_as_a_hash(dep: Deployment) -> None:
    result = dep.ok("access-key", "create", "--vault", str(dep.vault), "checkout")
    token = result.out.strip()
    assert result.out == token + "\n"
    assert token.startswith("sk-sc-")
    assert len(token) >= 40
    data = dep.vault.read_bytes().decode()
    assert token not in data
    for n in range(8, len(token) + 1):
        for i in range(len(token) - n + 1):
            assert token[i : i + n] not in data, (
                f"a {n}-char piece of the access key is in the vault"
            )
    entry = dep.raw()["access_keys"]["checkout"]
    assert entry["hash"] == hash_access_key(token)
    assert entry["hash"].startswith("sha256:")
    assert entry["credits_usd"] == 0
    assert entry["revoked"] is False
    listed = dep.ok("access-key", "list", "--vault", str(dep.vault))
    assert "checkout" in listed.out
    assert token not in listed.text
    assert entry["hash"] not in listed.text
    assert entry["hash"].removeprefix("sha256:") not in listed.text
    assert "sha256" not in listed.text


def test_access_key_create_with_scope_and_credits(dep: Deployment) -> None:
    dep.ok(
        "access-key", "create", "--vault", str(dep.vault), "team",
        "--credits", "12.5", "--allow-provider", "openai", "--allow-provider", "anthropic",
        "--allow-model", "gpt-4o*",
    )  # fmt: skip
    entry = dep.raw()["access_keys"]["team"]
    assert entry["credits_usd"] == 12.5
    assert entry["allowed_providers"] == ["anthropic", "openai"]
    assert entry["allowed_models"] == ["gpt-4o*"]
    listed = dep.ok("access-key", "list", "--vault", str(dep.vault)).out
    row = table(listed)["team"]
    columns = ("STATUS", "CREDITS_USD", "PROVIDERS", "MODELS", "ATTACHED")
    assert [row[c] for c in columns] == ["active", "12.50", "anthropic,openai", "gpt-4o*", "0"]


def test_access_key_create_refuses_a_duplicate_name(dep: Deployment) -> None:
    first = dep.ok("access-key", "create", "--vault", str(dep.vault), "checkout").out.strip()
    result = cli("access-key", "create", "--vault", str(dep.vault), "checkout")
    assert_one_error_line(result, "checkout", "already exists")
    assert dep.raw()["access_keys"]["checkout"]["hash"] == hash_access_key(first)


def test_revoke_sets_revoked(dep: Deployment) -> None:
    dep.ok("access-key", "create", "--vault", str(dep.vault), "checkout")
    dep.ok("access-key", "revoke", "--vault", str(dep.vault), "checkout")
    entry = dep.raw()["access_keys"]["checkout"]
    assert entry["revoked"] is True
    assert entry["revoked_at"]
    (rec,) = open_vault(read_vault(dep.vault), dep.opener())[0].access_keys
    assert rec.revoked is True
    listed = dep.ok("access-key", "list", "--vault", str(dep.vault)).out
    assert "checkout\trevoked" in listed
    # Revoking again is harmless and keeps the first revocation time.
    dep.ok("access-key", "revoke", "--vault", str(dep.vault), "checkout")
    assert dep.raw()["access_keys"]["checkout"]["revoked_at"] == entry["revoked_at"]


def test_revoke_unknown_access_key(dep: Deployment) -> None:
    assert_one_error_line(cli("access-key", "revoke", "--vault", str(dep.vault), "ghost"), "ghost")


def test_set_credits(dep: Deployment) -> None:
    dep.ok("access-key", "create", "--vault", str(dep.vault), "checkout")
    dep.ok("access-key", "set-credits", "--vault", str(dep.vault), "checkout", "7.25")
    assert dep.raw()["access_keys"]["checkout"]["credits_usd"] == 7.25
    assert_one_error_line(
        cli("access-key", "set-credits", "--vault", str(dep.vault), "ghost", "1"), "ghost"
    )
    # More than can be counted in micro-USD: refused, the vault unchanged.
    for amount in ("1e308", "1e301", "inf", "nan"):
        result = cli("access-key", "set-credits", "--vault", str(dep.vault), "checkout", amount)
        assert result.code == 2, result.err
    assert dep.raw()["access_keys"]["checkout"]["credits_usd"] == 7.25


# --------------------------------------------------------------------------- rate limits


def test_access_key_create_with_rate_limits(dep: Deployment) -> None:
    v = str(dep.vault)
    dep.ok("access-key", "create", "--vault", v, "checkout", "--rpm", "600", "--tpm", "90000")
    dep.ok("access-key", "create", "--vault", v, "batch", "--tpm", "1000000000")
    dep.ok("access-key", "create", "--vault", v, "free")
    raw = dep.raw()["access_keys"]
    assert (raw["checkout"]["rpm"], raw["checkout"]["tpm"]) == (600, 90_000)
    assert ("rpm" in raw["batch"], raw["batch"]["tpm"]) == (False, 1_000_000_000)
    assert "rpm" not in raw["free"]
    assert "tpm" not in raw["free"]
    opened, _ = open_vault(read_vault(dep.vault), dep.opener())
    assert {r.name: (r.rpm, r.tpm) for r in opened.access_keys} == {
        "checkout": (600, 90_000),
        "batch": (None, 1_000_000_000),
        "free": (None, None),
    }
    listed = dep.ok("access-key", "list", "--vault", v).out
    header = listed.splitlines()[0].split("\t")
    assert header[header.index("REMAINING_USD") + 1 :][:3] == ["RPM", "TPM", "PROVIDERS"]
    rows = table(listed)
    assert {n: (r["RPM"], r["TPM"]) for n, r in rows.items()} == {
        "checkout": ("600", "90000"),
        "batch": ("-", "1000000000"),
        "free": ("-", "-"),
    }


def test_set_limits_sets_what_is_given_keeps_the_rest_and_clears_with_none(
    dep: Deployment,
) -> None:
    v = str(dep.vault)
    dep.ok("access-key", "create", "--vault", v, "checkout", "--credits", "5")
    before = dep.raw()["access_keys"]["checkout"]
    steps = [
        (["--rpm", "600"], "checkout: rpm 600, tpm unlimited", (600, None)),
        (["--tpm", "5000"], "checkout: rpm 600, tpm 5000", (600, 5000)),
        (["--rpm", "none"], "checkout: rpm unlimited, tpm 5000", (None, 5000)),
        (["--tpm", "7", "--rpm", "9"], "checkout: rpm 9, tpm 7", (9, 7)),
        (
            ["--rpm", "None", "--tpm", "NONE"],
            "checkout: rpm unlimited, tpm unlimited",
            (None, None),
        ),
    ]
    for options, said, (rpm, tpm) in steps:
        result = dep.ok("access-key", "set-limits", "--vault", v, "checkout", *options)
        assert (result.out, result.err) == ("", said + "\n")
        entry = dep.raw()["access_keys"]["checkout"]
        assert (entry.get("rpm"), entry.get("tpm")) == (rpm, tpm), options
        row = table(dep.ok("access-key", "list", "--vault", v).out)["checkout"]
        assert (row["RPM"], row["TPM"]) == (str(rpm or "-"), str(tpm or "-"))
    # Cleared limits leave the entry as it was before any were set (other fields untouched).
    assert dep.raw()["access_keys"]["checkout"] == before


def test_set_limits_unknown_access_key_is_a_user_error(dep: Deployment) -> None:
    before = dep.vault.read_bytes()
    result = cli("access-key", "set-limits", "--vault", str(dep.vault), "ghost", "--rpm", "5")
    assert_one_error_line(result, "ghost")
    assert dep.vault.read_bytes() == before


@pytest.mark.parametrize(
    "options", [[], ["--rpm", "0"], ["--tpm", "lots"], ["--rpm", "none", "--tpm", "-1"]]
)
def test_set_limits_usage_errors_leave_the_vault_alone(dep: Deployment, options: list[str]) -> None:
    dep.ok("access-key", "create", "--vault", str(dep.vault), "checkout", "--rpm", "60")
    before = dep.vault.read_bytes()
    result = cli("access-key", "set-limits", "--vault", str(dep.vault), "checkout", *options)
    assert result.code == 2, result
    assert result.out == ""
    assert dep.vault.read_bytes() == before


@pytest.mark.parametrize(
    ("command", "value"),
    [
        ("create", "0"), ("create", "-5"), ("create", "1.5"), ("create", "1e3"), ("create", " 5"),
        ("create", "+5"), ("create", "1_000"), ("create", "1000000001"), ("create", "\u0663"),
        ("create", ""), ("create", "none"), ("create", "9" * 5000),
        ("set-limits", "0"), ("set-limits", "1000000001"), ("set-limits", "0x10"),
        ("set-limits", "nothing"), ("set-limits", ""),
    ],
)  # fmt: skip
@pytest.mark.parametrize("option", ["--rpm", "--tpm"])
def test_a_bad_rate_limit_is_a_usage_error_saying_what_is_expected(
    tmp_path: Path, command: str, value: str, option: str
) -> None:
    result = cli("access-key", command, "--vault", str(tmp_path / "v.json"), "k", option, value)
    assert result.code == 2, result
    assert result.out == ""
    assert f"argument {option}: expected a whole number from 1 to 1000000000" in result.err
    if command == "set-limits":
        assert "or `none`" in result.err
    assert list(tmp_path.iterdir()) == []


def test_set_limits_refuses_a_hostile_name(dep: Deployment) -> None:
    before = dep.vault.read_bytes()
    for name in ("../checkout", "bad\nname", "x\x1b[31m", "-", "a" * 65):
        result = cli(
            "access-key", "set-limits", "--vault", str(dep.vault), "--rpm", "5", "--", name
        )
        assert result.code == 2, result
        assert "invalid access key name" in result.err.splitlines()[-1]
        assert all(c.isprintable() for c in result.err.replace("\n", "")), result.err
    assert dep.vault.read_bytes() == before


# --------------------------------------------------------------------------- provider keys


def test_attach_twice_newest_first_and_detach(dep: Deployment) -> None:
    dep.ok("access-key", "create", "--vault", str(dep.vault), "checkout")
    attach = ("provider-key", "attach", "--vault", str(dep.vault), "--access-key", "checkout")
    assert dep.ok(*attach, "--provider", "openai", "--id", "one", stdin=ATTACHED_ONE).out == "one\n"
    assert dep.ok(*attach, "--provider", "openai", "--id", "two", stdin=ATTACHED_TWO).out == "two\n"
    raw_times = [a["attached_at"] for a in dep.raw()["access_keys"]["checkout"]["attached"]]
    assert all("." in t for t in raw_times)  # sub-second resolution

    opened, problems = open_vault(read_vault(dep.vault), dep.opener())
    assert problems == []
    (rec,) = opened.access_keys
    assert [a.id for a in rec.attached] == ["two", "one"]
    assert [a.secret.reveal() for a in rec.attached] == [ATTACHED_TWO, ATTACHED_ONE]
    assert rec.attached[0].attached_at >= rec.attached[1].attached_at

    listed = dep.ok("provider-key", "list", "--vault", str(dep.vault)).out.splitlines()
    assert listed[0] == "ACCESS_KEY\tID\tPROVIDER\tATTACHED_AT"
    assert [line.split("\t")[1] for line in listed[1:]] == ["two", "one"]

    dep.ok(
        "provider-key",
        "detach",
        "--vault",
        str(dep.vault),
        "--access-key",
        "checkout",
        "--id",
        "two",
    )
    (rec,) = open_vault(read_vault(dep.vault), dep.opener())[0].access_keys
    assert [a.id for a in rec.attached] == ["one"]
    assert_one_error_line(
        cli(
            "provider-key",
            "detach",
            "--vault",
            str(dep.vault),
            "--access-key",
            "checkout",
            "--id",
            "two",
        ),
        "two",
    )


def test_provider_key_list_breaks_timestamp_ties_like_serving(dep: Deployment) -> None:
    dep.ok("access-key", "create", "--vault", str(dep.vault), "checkout")
    attach = ("provider-key", "attach", "--vault", str(dep.vault), "--access-key", "checkout")
    dep.ok(*attach, "--provider", "openai", "--id", "first", stdin=ATTACHED_ONE)
    dep.ok(*attach, "--provider", "openai", "--id", "second", stdin=ATTACHED_TWO)
    raw = dep.raw()
    entries = raw["access_keys"]["checkout"]["attached"]
    entries[1]["attached_at"] = entries[0]["attached_at"]
    dep.write_raw(raw)
    (rec,) = open_vault(read_vault(dep.vault), dep.opener())[0].access_keys
    served = [a.id for a in rec.attached]
    assert served == ["second", "first"]
    listed = dep.ok("provider-key", "list", "--vault", str(dep.vault)).out.splitlines()[1:]
    assert [line.split("\t")[1] for line in listed] == served


def test_attach_generates_an_id_and_refuses_duplicates(dep: Deployment) -> None:
    dep.ok("access-key", "create", "--vault", str(dep.vault), "checkout")
    attach = ("provider-key", "attach", "--vault", str(dep.vault), "--access-key", "checkout")
    key_id = dep.ok(*attach, "--provider", "anthropic", stdin=ANTHROPIC_KEY).out.strip()
    assert key_id.startswith("anthropic-")
    assert key_id not in ANTHROPIC_KEY
    before = dep.vault.read_bytes()
    result = cli(*attach, "--provider", "anthropic", "--id", key_id, stdin=ATTACHED_ONE)
    assert_one_error_line(result, key_id)
    assert dep.vault.read_bytes() == before


def test_attach_to_unknown_access_key(dep: Deployment) -> None:
    result = cli(
        "provider-key", "attach", "--vault", str(dep.vault), "--access-key", "ghost",
        "--provider", "openai", stdin=ATTACHED_ONE,
    )  # fmt: skip
    assert_one_error_line(result, "ghost")
    assert ATTACHED_ONE not in result.text


def test_attach_with_empty_stdin(dep: Deployment) -> None:
    dep.ok("access-key", "create", "--vault", str(dep.vault), "checkout")
    result = cli(
        "provider-key", "attach", "--vault", str(dep.vault), "--access-key", "checkout",
        "--provider", "openai", stdin=" \n",
    )  # fmt: skip
    assert_one_error_line(result, "standard input")


def test_provider_key_list_for_one_access_key(dep: Deployment) -> None:
    for name in ("a", "b"):
        dep.ok("access-key", "create", "--vault", str(dep.vault), name)
        dep.ok(
            "provider-key", "attach", "--vault", str(dep.vault), "--access-key", name,
            "--provider", "openai", "--id", f"{name}-key", stdin=ATTACHED_ONE,
        )  # fmt: skip
    rows = dep.ok("provider-key", "list", "--vault", str(dep.vault), "--access-key", "b").out
    assert "b-key" in rows
    assert "a-key" not in rows
    assert_one_error_line(
        cli("provider-key", "list", "--vault", str(dep.vault), "--access-key", "ghost"), "ghost"
    )


def test_cli_edits_leave_no_temp_files(dep: Deployment) -> None:
    dep.ok("access-key", "create", "--vault", str(dep.vault), "checkout")
    dep.ok(
        "provider-key", "attach", "--vault", str(dep.vault), "--access-key", "checkout",
        "--provider", "openai", "--id", "x", stdin=ATTACHED_ONE,
    )  # fmt: skip
    dep.ok("access-key", "revoke", "--vault", str(dep.vault), "checkout")
    cli("access-key", "create", "--vault", str(dep.vault), "checkout")  # fails: exists
    assert temp_files(dep.root) == []


OLLAMA = "{id: ollama, base_url: 'http://127.0.0.1:11434/v1', format: openai, auth: none}"


def _attach(dep: Deployment, provider: str, *extra: str) -> Run:
    dep.ok("access-key", "create", "--vault", str(dep.vault), "checkout")
    return dep.run(
        "provider-key", "attach", "--vault", str(dep.vault), "--access-key", "checkout",
        "--provider", provider, "--id", "k1", *extra, stdin=ATTACHED_ONE,
    )  # fmt: skip


def test_attach_warns_about_a_misspelt_provider(dep: Deployment) -> None:
    result = _attach(dep, "opnai")
    assert result.code == 0, result
    assert result.out == "k1\n"  # still attached: the config may be written later
    assert result.err.startswith("warning: ")
    assert result.err.count("\n") == 1, result.err
    for fragment in ("'opnai'", "openai, anthropic", str(dep.config)):
        assert fragment in result.err
    assert ATTACHED_ONE not in result.text
    (rec,) = open_vault(read_vault(dep.vault), dep.opener())[0].access_keys
    assert [a.provider for a in rec.attached] == ["opnai"]


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_attach_to_a_builtin_provider_is_silent(dep: Deployment, provider: str) -> None:
    result = _attach(dep, provider)
    assert (result.code, result.err) == (0, ""), result


def test_attach_to_a_provider_declared_beside_the_vault_is_silent(dep: Deployment) -> None:
    dep.write_config(f"  - {OLLAMA}\n")
    result = _attach(dep, "ollama")
    assert (result.code, result.err) == (0, ""), result


def test_attach_ignores_a_config_beside_the_vault_for_another_vault(dep: Deployment) -> None:
    dep.write_config(f"  - {OLLAMA}\n")
    text = dep.config.read_text().replace("path: vault.json", "path: other.json")
    dep.config.write_text(text)
    result = _attach(dep, "ollama")
    assert result.code == 0, result
    assert "warning: " in result.err
    assert "no config beside" in result.err


def test_attach_with_an_explicit_config(dep: Deployment, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.yaml"
    elsewhere.write_text(f"vault: {{path: deploy/vault.json}}\nproviders: [{OLLAMA}]\n")
    result = _attach(dep, "ollama", "--config", str(elsewhere))
    assert (result.code, result.err) == (0, ""), result
    result = dep.run(
        "provider-key", "attach", "--vault", str(dep.vault), "--access-key", "checkout",
        "--provider", "acme-llm", "--config", str(elsewhere), stdin=ATTACHED_TWO,
    )  # fmt: skip
    assert result.code == 0, result
    assert "'acme-llm'" in result.err
    assert str(elsewhere) in result.err


def test_attach_with_an_unreadable_explicit_config_is_a_user_error(dep: Deployment) -> None:
    dep.ok("access-key", "create", "--vault", str(dep.vault), "checkout")
    before = dep.vault.read_bytes()
    result = dep.run(
        "provider-key", "attach", "--vault", str(dep.vault), "--access-key", "checkout",
        "--provider", "ollama", "--config", str(dep.root / "nosuch.yaml"), stdin=ATTACHED_ONE,
    )  # fmt: skip
    assert result.code == 1, result
    assert "nosuch.yaml" in result.err
    assert dep.vault.read_bytes() == before


# --------------------------------------------------------------------------- spend in access-key list


def _spend(dep: Deployment, name: str, micro_usd: int) -> None:
    async def add() -> None:
        ledger = open_ledger("sqlite:///ledger.db", base_dir=dep.root)  # the config's default
        try:
            await ledger.add_spend(name, micro_usd)
        finally:
            await ledger.close()

    asyncio.run(add())


def test_access_key_list_shows_spent_and_remaining_from_the_ledger(dep: Deployment) -> None:
    v = str(dep.vault)
    dep.ok("access-key", "create", "--vault", v, "checkout", "--credits", "5")
    dep.ok("access-key", "create", "--vault", v, "idle", "--credits", "2")
    dep.ok("access-key", "create", "--vault", v, "over", "--credits", "1")
    _spend(dep, "checkout", 1_250_000)
    _spend(dep, "over", 1_500_000)
    result = dep.ok("access-key", "list", "--vault", v, "--config", str(dep.config))
    rows = table(result.out)
    assert {n: (r["CREDITS_USD"], r["SPENT_USD"], r["REMAINING_USD"]) for n, r in rows.items()} == {
        "checkout": ("5.00", "1.25", "3.75"),
        "idle": ("2.00", "0.00", "2.00"),
        "over": ("1.00", "1.50", "-0.50"),
    }
    assert result.err == ""


def test_access_key_list_never_creates_the_ledger(dep: Deployment) -> None:
    # Run as another user (root on the host), a created file would lock the sidecar out.
    dep.ok("access-key", "create", "--vault", str(dep.vault), "checkout", "--credits", "5")
    result = dep.ok("access-key", "list", "--vault", str(dep.vault), "--config", str(dep.config))
    row = table(result.out)["checkout"]
    assert (row["SPENT_USD"], row["REMAINING_USD"]) == ("0.00", "5.00")
    assert sorted(p.name for p in dep.root.iterdir() if "ledger" in p.name) == []


def test_access_key_list_reads_the_ledger_named_by_sidecar_config(
    dep: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    dep.ok("access-key", "create", "--vault", str(dep.vault), "checkout", "--credits", "5")
    _spend(dep, "checkout", 10_000)
    monkeypatch.setenv("SIDECAR_CONFIG", str(dep.config))
    row = table(dep.ok("access-key", "list", "--vault", str(dep.vault)).out)["checkout"]
    assert (row["SPENT_USD"], row["REMAINING_USD"]) == ("0.01", "4.99")


def test_access_key_list_without_a_config_does_not_guess_spend(dep: Deployment) -> None:
    dep.ok("access-key", "create", "--vault", str(dep.vault), "checkout", "--credits", "5")
    _spend(dep, "checkout", 1_250_000)
    result = dep.ok("access-key", "list", "--vault", str(dep.vault))
    row = table(result.out)["checkout"]
    assert row["CREDITS_USD"] == "5.00"
    assert (row["SPENT_USD"], row["REMAINING_USD"]) == ("unknown", "unknown")
    assert result.err.count("\n") == 1, result.err
    assert "--config" in result.err
    assert "SIDECAR_CONFIG" in result.err


def test_access_key_list_with_an_unreachable_ledger_says_unknown(dep: Deployment) -> None:
    dep.ok("access-key", "create", "--vault", str(dep.vault), "checkout", "--credits", "5")
    dep.write_config("ledger: {url: 'redis://:hunter2-LEAKPROBE@127.0.0.1:1/0'}\n")
    result = dep.run("access-key", "list", "--vault", str(dep.vault), "--config", str(dep.config))
    assert result.code == 0, result
    row = table(result.out)["checkout"]
    assert (row["SPENT_USD"], row["REMAINING_USD"]) == ("unknown", "unknown")
    assert "ledger" in result.err
    assert "hunter2-LEAKPROBE" not in result.text


# --------------------------------------------------------------------------- serve needs a config


def test_serve_without_a_config_is_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = cli("serve")
    assert result.code == 2, result
    assert result.out == ""
    assert result.err.startswith("usage: sidecar serve")
    assert "--config" in result.err
    assert "SIDECAR_CONFIG" in result.err
    assert "sidecar demo" in result.err
    assert list(tmp_path.iterdir()) == []  # no .demo/ created


def test_serve_without_a_config_as_a_process(tmp_path: Path) -> None:
    proc = run_proc("serve", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "SIDECAR_CONFIG" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_serve_takes_the_config_from_sidecar_config(dep: Deployment) -> None:
    dep.config.write_text(dep.config.read_text().replace(":18080", ":0").replace(":19090", ":0"))
    err = dep.root / "serve.err"
    with err.open("wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "serve"], stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=fh, cwd=dep.root,
            env={**proc_env(), "SIDECAR_CONFIG": str(dep.config)},
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while b'"listening"' not in err.read_bytes():
            assert proc.poll() is None, err.read_text()
            assert time.monotonic() < deadline, err.read_text()
            time.sleep(0.05)
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0, err.read_text()
    assert not (dep.root / ".demo").exists()


# --------------------------------------------------------------------------- check


def test_check_passes_on_a_good_deployment(dep: Deployment) -> None:
    result = dep.check()
    assert result.code == 0, result.err
    assert result.out == ""
    assert "ok" in result.err


def test_check_rejects_a_secret_moved_to_another_name(dep: Deployment) -> None:
    raw = dep.raw()
    raw["secrets"]["openai"]["other"] = raw["secrets"]["openai"]["primary"]
    dep.write_raw(raw)
    result = dep.check()
    assert result.code == 1
    assert "secrets/openai/other" in result.err
    assert "another slot" in result.err
    proc = run_proc("check", "--config", str(dep.config))
    assert proc.returncode == 1
    assert "secrets/openai/other" in proc.stderr
    assert OPENAI_PRIMARY not in proc.stdout + proc.stderr


def test_check_rejects_a_secret_moved_into_an_attached_slot(dep: Deployment) -> None:
    dep.ok("access-key", "create", "--vault", str(dep.vault), "checkout")
    dep.ok(
        "provider-key", "attach", "--vault", str(dep.vault), "--access-key", "checkout",
        "--provider", "openai", "--id", "team-1", stdin=ATTACHED_ONE,
    )  # fmt: skip
    assert dep.check().code == 0
    raw = dep.raw()
    raw["access_keys"]["checkout"]["attached"][0]["sealed"] = raw["secrets"]["openai"]["primary"]
    dep.write_raw(raw)
    result = dep.check()
    assert result.code == 1
    assert "access_keys/checkout/attached/team-1" in result.err
    proc = run_proc("check", "--config", str(dep.config), cwd=dep.root)
    assert proc.returncode == 1
    assert "access_keys/checkout/attached/team-1" in proc.stderr


def test_check_vault_sealed_to_another_key(dep: Deployment) -> None:
    dep.key.unlink()
    assert cli("keygen", "--private-key", str(dep.key)).code == 0
    result = dep.check()
    assert result.code == 1
    assert "recipient" in result.err
    assert "secrets/openai/primary: cannot be opened" in result.err


def test_check_unresolved_reference_names_the_config_path(dep: Deployment) -> None:
    dep.write_config(
        "  - id: anthropic\n    api_keys: [{value: \"${secrets.get('anthropic', 'missing')}\"}]\n"
    )
    result = dep.check()
    assert result.code == 1
    assert "providers[1].api_keys[0].value" in result.err
    assert "secrets.get('anthropic', 'missing')" in result.err


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_check_accepts_private_key_modes(dep: Deployment, mode: int) -> None:
    os.chmod(dep.key, mode)
    assert dep.check().code == 0


def test_check_rejects_a_world_readable_private_key(dep: Deployment) -> None:
    os.chmod(dep.key, 0o644)
    result = dep.check()
    assert result.code == 1
    assert "sidecar.key" in result.err
    assert "0644" in result.err
    assert dep.key.read_text().strip() not in result.text


def test_check_lists_every_problem_at_once(dep: Deployment) -> None:
    dep.ok("access-key", "create", "--vault", str(dep.vault), "checkout")
    dep.ok(
        "provider-key", "attach", "--vault", str(dep.vault), "--access-key", "checkout",
        "--provider", "mystery", "--id", "m-1", stdin=ATTACHED_ONE,
    )  # fmt: skip
    raw = dep.raw()
    raw["secrets"]["openai"]["moved"] = raw["secrets"]["openai"]["primary"]
    dep.write_raw(raw)
    dep.write_config(
        "  - id: anthropic\n    api_keys: [{value: \"${secrets.get('anthropic', 'missing')}\"}]\n"
    )
    result = dep.check()
    assert result.code == 1
    for fragment in (
        "secrets/openai/moved",
        "providers[1].api_keys[0].value",
        "access_keys.checkout.attached.m-1: provider 'mystery' is not configured",
    ):
        assert fragment in result.err
    assert "3 problem(s)" in result.err


def test_check_lists_every_config_problem(dep: Deployment) -> None:
    dep.config.write_text(
        "listen: nowhere\ntimeouts: {total: forever}\nproviders: [{id: custom}]\n"
        f"managed: {{openai: [{{value: {LITERAL_IN_CONFIG}}}]}}\n"
    )
    result = dep.check()
    assert result.code == 1
    for fragment in (
        "listen:", "timeouts.total:", "providers[0].base_url:", "providers[0].format:",
        "managed.openai[0].value:",
    ):  # fmt: skip
        assert fragment in result.err
    assert LITERAL_IN_CONFIG not in result.text


def test_check_invalid_yaml_gives_line_and_column(dep: Deployment) -> None:
    dep.config.write_text("listen: 127.0.0.1:8080\nproviders: [\n  {id: openai\n")
    proc = run_proc("check", "--config", str(dep.config))
    assert proc.returncode == 1
    assert "line " in proc.stderr
    assert "column " in proc.stderr
    assert "Traceback" not in proc.stderr


def test_check_with_a_loose_key_mode_still_lists_the_other_problems(dep: Deployment) -> None:
    os.chmod(dep.key, 0o644)
    raw = dep.raw()
    raw["secrets"]["openai"]["moved"] = raw["secrets"]["openai"]["primary"]
    dep.write_raw(raw)
    result = dep.check()
    assert result.code == 1
    assert "0644" in result.err
    assert "secrets/openai/moved" in result.err


# --------------------------------------------------------------------------- no secret in any output


def test_no_secret_value_in_any_output(dep: Deployment) -> None:
    v = str(dep.vault)
    dep.ok("secret", "set", "--vault", v, "anthropic", "k", stdin=ANTHROPIC_KEY)
    dep.ok("secret", "list", "--vault", v)
    token = dep.ok("access-key", "create", "--vault", v, "checkout", "--credits", "5").out.strip()
    token2 = dep.ok("access-key", "create", "--vault", v, "retired").out.strip()
    created = len(dep.outputs)
    dep.ok("access-key", "list", "--vault", v)
    dep.ok("access-key", "set-credits", "--vault", v, "checkout", "9")
    dep.ok("access-key", "set-limits", "--vault", v, "checkout", "--rpm", "60", "--tpm", "none")
    dep.ok("access-key", "revoke", "--vault", v, "retired")
    attach = (
        "provider-key",
        "attach",
        "--vault",
        v,
        "--access-key",
        "checkout",
        "--provider",
        "openai",
    )
    dep.ok(*attach, "--id", "one", stdin=ATTACHED_ONE)
    dep.ok(*attach, stdin=ATTACHED_TWO)
    dep.ok("provider-key", "list", "--vault", v)
    dep.ok("provider-key", "list", "--vault", v, "--access-key", "checkout")
    dep.ok("provider-key", "detach", "--vault", v, "--access-key", "checkout", "--id", "one")
    dep.ok("access-key", "list", "--vault", v)
    dep.ok("check", "--config", str(dep.config))
    # Failing commands, with a secret on stdin.
    dep.run(*attach[:5], "ghost", "--provider", "openai", stdin=ATTACHED_ONE)
    dep.run("secret", "set", "--vault", v, "bad/ns", "x", stdin=ANTHROPIC_KEY)
    dep.run("secret", "set", "--vault", str(dep.root / "nope.json"), "a", "b", stdin=ANTHROPIC_KEY)
    # check with problems: moved slots, a literal key in the config, an unresolved reference.
    raw = dep.raw()
    raw["secrets"]["openai"]["moved"] = raw["secrets"]["openai"]["primary"]
    raw["access_keys"]["checkout"]["attached"][0]["sealed"] = raw["secrets"]["anthropic"]["k"]
    dep.write_raw(raw)
    dep.write_config("  - id: anthropic\n    api_keys: [{value: \"${secrets.get('x', 'y')}\"}]\n")
    assert dep.check().code == 1
    dep.write_config(f"managed: {{openai: [{{value: {LITERAL_IN_CONFIG}}}]}}\n")
    assert dep.check().code == 1
    os.chmod(dep.key, 0o644)
    assert dep.check().code == 1

    private_key = dep.key.read_text().strip()
    hashes = [e["hash"] for e in dep.raw()["access_keys"].values()]
    secrets = [
        OPENAI_PRIMARY,
        ANTHROPIC_KEY,
        ATTACHED_ONE,
        ATTACHED_TWO,
        LITERAL_IN_CONFIG,
        private_key,
    ]
    for i, result in enumerate(dep.outputs):
        for s in secrets:
            assert s not in result.text, f"output #{i} shows a secret: {result}"
        for h in hashes:
            assert h.removeprefix("sha256:") not in result.text
        if i < created - 2 or i >= created:  # the two `access-key create` prints are the exception
            assert token not in result.text
            assert token2 not in result.text


# --------------------------------------------------------------------------- exit codes and help


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["vault"],
        ["frobnicate"],
        ["keygen"],
        ["secret", "set", "ns", "name"],
        ["secret", "set", "--vault", "v.json", "bad/ns", "name"],
        ["secret", "set", "--vault", "v.json", "ns"],
        ["access-key", "create", "--vault", "v.json", "checkout", "--credits", "-1"],
        ["access-key", "create", "--vault", "v.json", "checkout", "--credits", "lots"],
        ["access-key", "create", "--vault", "v.json", "bad name"],
        ["provider-key", "attach", "--vault", "v.json", "--access-key", "a"],
        ["provider-key", "detach", "--vault", "v.json", "--access-key", "a"],
        ["check"],
        ["keygen", "--private-key", "k", "--surprise"],
        ["demo", "--listen", "nowhere"],
        ["demo", "--mock-listen", "127.0.0.1:99999"],
        ["access-key", "list"],
    ],
)
def test_usage_errors_exit_2(tmp_path: Path, argv: list[str]) -> None:
    result = cli(*argv, stdin="sk-should-not-matter")
    assert result.code == 2, result
    assert "usage: sidecar" in result.err
    assert result.out == ""
    assert list(tmp_path.iterdir()) == []


def test_usage_error_exit_2_as_a_process() -> None:
    proc = run_proc("access-key", "create")
    assert proc.returncode == 2
    assert "usage:" in proc.stderr
    assert proc.stdout == ""


def test_user_error_exit_1_as_a_process(tmp_path: Path) -> None:
    proc = run_proc("secret", "set", "--vault", str(tmp_path / "absent.json"), "a", "b", stdin="x")
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.startswith("error: ")
    assert proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr


HELP_COMMANDS = [
    pytest.param([], id="sidecar"),
    pytest.param(["serve"], id="serve"),
    pytest.param(["demo"], id="demo"),
    pytest.param(["keygen"], id="keygen"),
    pytest.param(["vault", "init"], id="vault-init"),
    pytest.param(["secret", "set"], id="secret-set"),
    pytest.param(["secret", "list"], id="secret-list"),
    pytest.param(["access-key", "create"], id="access-key-create"),
    pytest.param(["access-key", "revoke"], id="access-key-revoke"),
    pytest.param(["access-key", "set-credits"], id="access-key-set-credits"),
    pytest.param(["access-key", "set-limits"], id="access-key-set-limits"),
    pytest.param(["access-key", "list"], id="access-key-list"),
    pytest.param(["provider-key", "attach"], id="provider-key-attach"),
    pytest.param(["provider-key", "detach"], id="provider-key-detach"),
    pytest.param(["provider-key", "list"], id="provider-key-list"),
    pytest.param(["migrate"], id="migrate"),
    pytest.param(["check"], id="check"),
    pytest.param(["mock-provider"], id="mock-provider"),
    pytest.param(["inject"], id="inject"),
]


def _description(help_text: str) -> str:
    """The paragraph(s) between the usage block and the argument sections."""
    paragraphs = help_text.strip().split("\n\n")
    body = [p for p in paragraphs[1:] if not p.rstrip().endswith(":") and ":\n" not in p]
    return " ".join(body).strip()


@pytest.mark.parametrize("argv", HELP_COMMANDS)
def test_every_command_explains_itself(argv: list[str]) -> None:
    result = cli(*argv, "--help")
    assert result.code == 0
    assert result.out.startswith("usage: sidecar")
    assert result.err == ""
    assert len(_description(result.out)) >= 20, result.out


@pytest.mark.parametrize(
    ("group", "commands"),
    [
        ("vault", ["init"]),
        ("secret", ["set", "list"]),
        ("access-key", ["create", "revoke", "set-credits", "set-limits", "list"]),
        ("provider-key", ["attach", "detach", "list"]),
    ],
)
def test_command_groups_list_their_commands(group: str, commands: list[str]) -> None:
    result = cli(group, "--help")
    assert result.code == 0
    for command in commands:
        assert any(line.split()[:1] == [command] for line in result.out.splitlines()), command


def test_top_level_help_lists_every_command() -> None:
    out = cli("--help").out
    for command in (
        "serve", "demo", "keygen", "vault", "secret", "access-key", "provider-key", "migrate",
        "check", "mock-provider", "inject",
    ):  # fmt: skip
        assert command in out


def test_help_as_a_process() -> None:
    proc = run_proc("--help")
    assert proc.returncode == 0
    assert proc.stdout.startswith("usage: sidecar")
    proc = run_proc("provider-key", "attach", "--help")
    assert proc.returncode == 0
    assert "--access-key" in proc.stdout


# --------------------------------------------------------------------------- concurrency


@contextlib.contextmanager
def launched(
    argvs: list[list[str]], stdins: list[Path | None]
) -> Iterator[list[subprocess.Popen[str]]]:
    """Start every process before waiting for any, so their edits really overlap."""
    procs: list[subprocess.Popen[str]] = []
    try:
        for argv, stdin in zip(argvs, stdins, strict=True):
            with contextlib.ExitStack() as stack:
                fh = stack.enter_context(stdin.open()) if stdin else subprocess.DEVNULL
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "sidecar", *argv],
                        stdin=fh,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        text=True,
                        env=proc_env(),
                        cwd=REPO_ROOT,
                    )
                )
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()


def test_concurrent_secret_set_processes_all_persist(dep: Deployment) -> None:
    n = 10
    values = {f"name_{i}": f"sk-concurrent-{i:02d}-{os.urandom(6).hex()}" for i in range(n)}
    stdins = []
    for name, value in values.items():
        path = dep.root / f"{name}.in"
        path.write_text(value + "\n")
        stdins.append(path)
    argvs = [["secret", "set", "--vault", str(dep.vault), "ns", name] for name in values]
    with launched(argvs, stdins) as procs:
        results = [(p.wait(timeout=30), *p.communicate()) for p in procs]
    for code, out, err in results:
        assert code == 0, err
        assert all(v not in out + err for v in values.values())
    opened, problems = open_vault(read_vault(dep.vault), dep.opener())
    assert problems == []
    for name, value in values.items():
        assert opened.secrets[("ns", name)].reveal() == value
    assert opened.secrets[("openai", "primary")].reveal() == OPENAI_PRIMARY
    assert temp_files(dep.root) == []


def test_concurrent_access_key_create_and_attach_all_persist(dep: Deployment) -> None:
    names = [f"app-{i}" for i in range(8)]
    argvs = [["access-key", "create", "--vault", str(dep.vault), name] for name in names]
    with launched(argvs, [None] * len(names)) as procs:
        results = [(p.wait(timeout=30), *p.communicate()) for p in procs]
    tokens = {}
    for name, (code, out, err) in zip(names, results, strict=True):
        assert code == 0, err
        tokens[name] = out.strip()
    assert len(set(tokens.values())) == len(names)
    doc = read_vault(dep.vault)
    assert {n: doc.access_keys[n].hash for n in names} == {
        n: hash_access_key(t) for n, t in tokens.items()
    }

    values = {f"k{i}": f"sk-attach-{i}-{os.urandom(6).hex()}" for i in range(6)}
    stdins = []
    for key_id, value in values.items():
        path = dep.root / f"{key_id}.in"
        path.write_text(value)
        stdins.append(path)
    argvs = [
        ["provider-key", "attach", "--vault", str(dep.vault), "--access-key", "app-0",
         "--provider", "openai", "--id", key_id]
        for key_id in values
    ]  # fmt: skip
    with launched(argvs, stdins) as procs:
        codes = [p.wait(timeout=30) for p in procs]
    assert codes == [0] * len(values)
    opened, problems = open_vault(read_vault(dep.vault), dep.opener())
    assert problems == []
    rec = next(r for r in opened.access_keys if r.name == "app-0")
    assert {a.id: a.secret.reveal() for a in rec.attached} == values
    times = [a.attached_at for a in rec.attached]
    assert times == sorted(times, reverse=True)


# --------------------------------------------------------------------------- status


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_status_without_a_reachable_admin_port_is_one_clear_error() -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    r = cli("status", "--admin", url)
    assert r.code == 1
    assert r.out == ""
    assert r.err.startswith(f"error: cannot reach the admin port at {url}: ")
    assert r.err.count("\n") == 1


def test_status_default_admin_url_and_a_bad_url() -> None:
    from sidecar.cli import build_parser

    assert build_parser().parse_args(["status"]).admin == "http://127.0.0.1:9090"
    r = cli("status", "--admin", "127.0.0.1:9090")
    assert (r.code, r.err) == (1, "error: --admin: expected an http:// or https:// URL, got '127.0.0.1:9090'\n")  # fmt: skip


def test_status_table_aligns_columns_and_marks_empty_fields() -> None:
    from sidecar.cli import status_table

    lines = status_table([
        {"provider": "openai", "source": "attached", "key_id": "team-key", "access_key": "team",
         "model": "gpt-4o", "state": "cooling", "until": "2026-01-02T03:04:15.500Z",
         "reason": "rate_limited", "last_status": 429},
        {"provider": "openai", "source": "policy", "key_id": "pol", "access_key": None,
         "model": None, "state": "ok", "until": None, "reason": None, "last_status": None},
    ])  # fmt: skip
    assert lines == [
        "PROVIDER  SOURCE    KEY_ID    ACCESS_KEY  MODEL   STATE    UNTIL                     REASON        LAST_STATUS",
        "openai    attached  team-key  team        gpt-4o  cooling  2026-01-02T03:04:15.500Z  rate_limited  429",
        "openai    policy    pol       -           -       ok       -                         -             -",
    ]  # fmt: skip
