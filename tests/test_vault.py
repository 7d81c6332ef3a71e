"""The sealed vault file (docs/reference.md#vault-file): format, slot binding, locked atomic edits, opening."""

from __future__ import annotations

import os
import re
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from sidecar.crypto import Opener, Sealer, generate_private_key
from sidecar.errors import VaultError
from sidecar.secret import Secret
from sidecar.vault import (
    ACCESS_KEY_PREFIX,
    MAX_RATE_LIMIT,
    AccessKeyEntry,
    AttachedEntry,
    VaultDoc,
    add_access_key,
    attached_slot,
    create_vault,
    edit_vault,
    hash_access_key,
    new_access_key,
    now_iso,
    open_vault,
    parse_iso,
    parse_vault,
    read_vault,
    secret_slot,
    write_vault,
)
from tests.harness import sidecar_cmd, subprocess_env

PRIMARY = Secret("sk-VAULT-PRIMARY-a1b2c3d4e5")
TEAM = Secret("sk-VAULT-TEAM-f6e5d4c3b2")


@pytest.fixture
def opener() -> Opener:
    return Opener(generate_private_key())


@pytest.fixture
def sealer(opener: Opener) -> Sealer:
    return Sealer(opener.public_key)


@pytest.fixture
def vault(tmp_path: Path, opener: Opener) -> Path:
    path = tmp_path / "vault.json"
    create_vault(path, opener.public_key)
    return path


def leftovers(directory: Path, vault: Path) -> list[str]:
    """Files other than the vault and its (deliberately persistent) lock file."""
    keep = {vault.name, vault.name + ".lock"}
    return sorted(p.name for p in directory.iterdir() if p.name not in keep)


def doc_with_secret(sealer: Sealer, recipient: str) -> VaultDoc:
    doc = VaultDoc(recipient=recipient)
    doc.secrets["openai"] = {"primary": sealer.seal(secret_slot("openai", "primary"), PRIMARY)}
    return doc


# --------------------------------------------------------------------------- slots and hashes


def test_slot_names() -> None:
    assert secret_slot("openai", "primary") == "secrets/openai/primary"
    assert attached_slot("checkout", "team-1") == "access_keys/checkout/attached/team-1"


def test_access_keys_are_random_prefixed_and_hashed() -> None:
    a, b = new_access_key(), new_access_key()
    assert a != b
    assert a.reveal().startswith(ACCESS_KEY_PREFIX)
    assert len(a.reveal()) >= len(ACCESS_KEY_PREFIX) + 40
    h = hash_access_key(a.reveal())
    assert h.startswith("sha256:")
    assert len(h) == len("sha256:") + 64
    assert a.reveal() not in h
    assert hash_access_key(a.reveal()) == h


def test_timestamps_have_sub_second_resolution() -> None:
    ts = now_iso()
    assert ts.endswith("Z")
    assert "." in ts
    assert parse_iso(ts) % 1 != 0 or parse_iso(now_iso()) % 1 != 0


# --------------------------------------------------------------------------- document


def test_create_and_read_empty_vault(vault: Path, opener: Opener) -> None:
    doc = read_vault(vault)
    assert doc.recipient == opener.public_key
    assert doc.secrets == {}
    assert doc.access_keys == {}
    raw = orjson.loads(vault.read_bytes())
    assert raw["version"] == 1
    assert raw["recipient"] == opener.public_key


def test_create_refuses_an_existing_vault(vault: Path, opener: Opener) -> None:
    before = vault.read_bytes()
    with pytest.raises(VaultError, match="already exists"):
        create_vault(vault, Opener(generate_private_key()).public_key)
    assert vault.read_bytes() == before


def test_create_rejects_a_bad_public_key(tmp_path: Path) -> None:
    with pytest.raises(VaultError, match="public key"):
        create_vault(tmp_path / "v.json", "not-a-key")
    assert not (tmp_path / "v.json").exists()


def test_missing_vault_is_a_vault_error(tmp_path: Path) -> None:
    with pytest.raises(VaultError, match="vault init"):
        read_vault(tmp_path / "absent.json")
    with pytest.raises(VaultError, match="vault init"), edit_vault(tmp_path / "absent.json"):
        pass


def test_document_round_trips(vault: Path, sealer: Sealer, opener: Opener) -> None:
    with edit_vault(vault) as doc:
        doc.secrets["openai"] = {"primary": sealer.seal(secret_slot("openai", "primary"), PRIMARY)}
        doc.access_keys["checkout"] = AccessKeyEntry(
            hash=hash_access_key("sk-sc-x"),
            created_at=now_iso(),
            credits_usd=12.5,
            allowed_providers=["openai"],
            allowed_models=["gpt-4o*"],
            attached=[
                AttachedEntry(
                    "team-1",
                    "openai",
                    now_iso(),
                    sealer.seal(attached_slot("checkout", "team-1"), TEAM),
                )
            ],
        )
    doc = read_vault(vault)
    assert parse_vault(doc.to_json()) == doc
    e = doc.access_keys["checkout"]
    assert (e.credits_usd, e.allowed_providers, e.allowed_models) == (12.5, ["openai"], ["gpt-4o*"])
    assert e.attached[0].id == "team-1"
    text = vault.read_bytes()
    assert PRIMARY.reveal().encode() not in text
    assert TEAM.reveal().encode() not in text


@pytest.mark.parametrize(
    ("mutate", "where"),
    [
        (lambda d: d.update(recipient=5), "recipient"),
        (lambda d: d.update(recipient="AAAA"), "recipient"),
        (lambda d: d.update(version=2), "version"),
        (lambda d: d.update(secrets=[]), "secrets"),
        (lambda d: d.update(secrets={"ns": {"n": 1}}), "secrets.ns.n"),
        (lambda d: d.update(access_keys={"k": {"hash": "md5:x"}}), "access_keys.k.hash"),
        (
            lambda d: d.update(access_keys={"k": {"hash": "sha256:0", "credits_usd": "lots"}}),
            "access_keys.k.credits_usd",
        ),
        (  # would overflow when counted in micro-USD, and take the vault down with it
            lambda d: d.update(access_keys={"k": {"hash": "sha256:0", "credits_usd": 1e308}}),
            "access_keys.k.credits_usd",
        ),
        (
            lambda d: d.update(access_keys={"k": {"hash": "sha256:0", "credits_usd": -1}}),
            "access_keys.k.credits_usd",
        ),
        (
            lambda d: d.update(
                access_keys={
                    "k": {
                        "hash": "sha256:0",
                        "attached": [
                            {
                                "id": "a",
                                "provider": "openai",
                                "attached_at": "yesterday",
                                "sealed": "x",
                            }
                        ],
                    }
                }
            ),
            "access_keys.k.attached[0].attached_at",
        ),
    ],
)
def test_malformed_vault_names_the_bad_path(vault: Path, mutate: object, where: str) -> None:
    raw = orjson.loads(vault.read_bytes())
    mutate(raw)  # type: ignore[operator]
    with pytest.raises(VaultError, match=r"^v\.json: ") as info:
        parse_vault(orjson.dumps(raw), "v.json")
    assert where in str(info.value)


def test_not_json_is_a_vault_error() -> None:
    with pytest.raises(VaultError, match="not valid JSON"):
        parse_vault(b"{nope", "v.json")


# --------------------------------------------------------------------------- rate limits


def test_rate_limits_round_trip_and_reach_the_opened_record(vault: Path, opener: Opener) -> None:
    with edit_vault(vault) as doc:
        add_access_key(doc, "both", rpm=600, tpm=90_000)
        add_access_key(doc, "rpm-only", rpm=MAX_RATE_LIMIT)
        add_access_key(doc, "tokens-only", tpm=1)
    doc = read_vault(vault)
    assert parse_vault(doc.to_json()) == doc
    raw = orjson.loads(vault.read_bytes())["access_keys"]
    assert (raw["both"]["rpm"], raw["both"]["tpm"]) == (600, 90_000)
    assert (raw["rpm-only"]["rpm"], "tpm" in raw["rpm-only"]) == (MAX_RATE_LIMIT, False)
    assert ("rpm" in raw["tokens-only"], raw["tokens-only"]["tpm"]) == (False, 1)
    opened, problems = open_vault(doc, opener)
    assert problems == []
    limits = {r.name: (r.rpm, r.tpm) for r in opened.access_keys}
    assert limits == {
        "both": (600, 90_000),
        "rpm-only": (MAX_RATE_LIMIT, None),
        "tokens-only": (None, 1),
    }


def test_a_key_without_limits_is_written_as_before(vault: Path) -> None:
    """Older sidecars read the vault unchanged: no `rpm` / `tpm` fields unless set."""
    with edit_vault(vault) as doc:
        add_access_key(doc, "checkout", credits_usd=5.0)
    entry = orjson.loads(vault.read_bytes())["access_keys"]["checkout"]
    assert sorted(entry) == [
        "allowed_models", "allowed_providers", "attached", "created_at", "credits_usd", "hash",
        "revoked", "revoked_at",
    ]  # fmt: skip
    e = read_vault(vault).access_keys["checkout"]
    assert (e.rpm, e.tpm) == (None, None)


def test_null_rate_limits_mean_unlimited(vault: Path) -> None:
    raw = orjson.loads(vault.read_bytes())
    raw["access_keys"] = {"k": {"hash": "sha256:00", "rpm": None, "tpm": None}}
    e = parse_vault(orjson.dumps(raw)).access_keys["k"]
    assert (e.rpm, e.tpm) == (None, None)
    assert b"rpm" not in parse_vault(orjson.dumps(raw)).to_json()


@pytest.mark.parametrize("field", ["rpm", "tpm"])
@pytest.mark.parametrize(
    "bad", [0, -1, True, False, 1.0, 60.5, "600", [600], {"n": 1}, MAX_RATE_LIMIT + 1]
)
def test_a_bad_rate_limit_is_a_vault_error_naming_its_path(
    vault: Path, field: str, bad: object
) -> None:
    raw = orjson.loads(vault.read_bytes())
    raw["access_keys"] = {"k": {"hash": "sha256:00", field: bad}}
    with pytest.raises(VaultError, match=r"^v\.json: ") as info:
        parse_vault(orjson.dumps(raw), "v.json")
    assert f"access_keys.k.{field}: expected an integer from 1 to" in str(info.value)


@pytest.mark.parametrize(
    ("limits", "what"), [({"rpm": 0}, "rpm"), ({"tpm": True}, "tpm"), ({"rpm": 2.0}, "rpm")]
)
def test_add_access_key_refuses_a_bad_rate_limit(limits: dict[str, Any], what: str) -> None:
    doc = VaultDoc(recipient=Opener(generate_private_key()).public_key)
    with pytest.raises(VaultError, match=f"^{what}: expected an integer"):
        add_access_key(doc, "k", **limits)
    assert doc.access_keys == {}


# --------------------------------------------------------------------------- atomic, locked edits


def test_edit_leaves_no_temp_files(vault: Path, sealer: Sealer) -> None:
    for i in range(5):
        with edit_vault(vault) as doc:
            doc.secrets.setdefault("ns", {})[f"n{i}"] = sealer.seal(
                secret_slot("ns", f"n{i}"), PRIMARY
            )
    assert leftovers(vault.parent, vault) == []
    assert len(read_vault(vault).secrets["ns"]) == 5


def test_failing_edit_leaves_the_file_unchanged(vault: Path, sealer: Sealer) -> None:
    with edit_vault(vault) as doc:
        doc.secrets["keep"] = {"me": sealer.seal(secret_slot("keep", "me"), PRIMARY)}
    before = vault.read_bytes()
    stat_before = vault.stat()

    def half_edit() -> None:
        with edit_vault(vault) as doc:
            doc.secrets.clear()
            doc.access_keys["half"] = AccessKeyEntry(hash="sha256:00", created_at=now_iso())
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        half_edit()
    assert vault.read_bytes() == before
    assert vault.stat().st_ino == stat_before.st_ino  # not even rewritten
    assert leftovers(vault.parent, vault) == []


def test_failed_rename_cleans_up_the_temp_file(
    vault: Path, sealer: Sealer, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = vault.read_bytes()

    def broken_replace(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(VaultError, match="No space"), edit_vault(vault) as doc:
        doc.secrets["x"] = {"y": sealer.seal(secret_slot("x", "y"), PRIMARY)}
    monkeypatch.undo()
    assert vault.read_bytes() == before
    assert leftovers(vault.parent, vault) == []


def test_write_replaces_the_file_not_its_contents(vault: Path, opener: Opener) -> None:
    # A reader holding the old file keeps seeing a whole old document.
    with vault.open("rb") as old:
        write_vault(vault, VaultDoc(recipient=opener.public_key, secrets={"a": {"b": "c"}}))
        assert orjson.loads(old.read())["secrets"] == {}
    assert read_vault(vault).secrets == {"a": {"b": "c"}}


def test_concurrent_edits_in_threads_do_not_lose_updates(vault: Path, sealer: Sealer) -> None:
    sealed = {f"n{i}": sealer.seal(secret_slot("ns", f"n{i}"), PRIMARY) for i in range(16)}
    barrier = threading.Barrier(len(sealed))
    errors: list[BaseException] = []

    def edit(name: str) -> None:
        try:
            barrier.wait(timeout=5)
            with edit_vault(vault) as doc:
                doc.secrets.setdefault("ns", {})[name] = sealed[name]
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=edit, args=(n,)) for n in sealed]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert errors == []
    assert read_vault(vault).secrets["ns"] == sealed
    assert leftovers(vault.parent, vault) == []


def linked_vault(vault: Path) -> Path:
    """A symlink to `vault` from another directory (a config dir pointing at the real vault)."""
    other = vault.parent / "elsewhere"
    other.mkdir()
    link = other / "vault-link.json"
    os.symlink(vault, link)
    return link


def test_edit_through_a_symlink_locks_and_replaces_the_real_file(
    vault: Path, sealer: Sealer
) -> None:
    link = linked_vault(vault)
    with edit_vault(link) as doc:
        doc.secrets["ns"] = {"n": sealer.seal(secret_slot("ns", "n"), PRIMARY)}
    assert link.is_symlink()
    assert os.readlink(link) == str(vault)
    assert read_vault(vault).secrets["ns"]["n"] == doc.secrets["ns"]["n"]
    # One lock per vault, beside the real file, whichever name the edit came through.
    assert (vault.parent / "vault.json.lock").exists()
    assert sorted(p.name for p in link.parent.iterdir()) == ["vault-link.json"]
    assert leftovers(vault.parent, vault) == ["elsewhere"]


def test_an_edit_through_a_symlink_waits_for_one_through_the_real_path(
    vault: Path, sealer: Sealer
) -> None:
    link = linked_vault(vault)
    sealed = {n: sealer.seal(secret_slot("ns", n), PRIMARY) for n in ("real", "link")}
    started = threading.Event()
    errors: list[BaseException] = []

    def edit_through_link() -> None:
        try:
            started.set()
            with edit_vault(link) as doc:
                doc.secrets.setdefault("ns", {})["link"] = sealed["link"]
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    thread = threading.Thread(target=edit_through_link)
    with edit_vault(vault) as doc:
        thread.start()
        started.wait(5)
        thread.join(0.3)  # with separate locks it reads, writes and finishes here
        doc.secrets.setdefault("ns", {})["real"] = sealed["real"]
    thread.join(10)
    assert errors == []
    assert read_vault(vault).secrets["ns"] == sealed


def test_parallel_cli_edits_through_a_symlink_and_the_real_path_all_persist(
    vault: Path, opener: Opener, tmp_path: Path
) -> None:
    """20 `sidecar` processes at once, half through a symlink: every edit lands."""
    link = linked_vault(vault)
    values = {f"s{i}": f"sk-parallel-{i:02d}-{os.urandom(4).hex()}" for i in range(10)}
    argvs: list[list[str]] = []
    stdins: list[bytes] = []
    for i, (name, value) in enumerate(values.items()):
        path = link if i % 2 else vault
        argvs.append(["secret", "set", "--vault", str(path), "ns", name])
        stdins.append(value.encode() + b"\n")
    keys = [f"app-{i}" for i in range(10)]
    for i, name in enumerate(keys):
        path = link if i % 2 else vault
        argvs.append(["access-key", "create", "--vault", str(path), name])
        stdins.append(b"")
    env = subprocess_env()
    env.pop("SIDECAR_PRIVATE_KEY", None)
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    procs = [subprocess.Popen(sidecar_cmd(*argv), env=env, **pipes) for argv in argvs]
    try:
        results = [p.communicate(stdin, timeout=60) for p, stdin in zip(procs, stdins, strict=True)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0] * 20, [err for _, err in results]
    tokens = {name: out.decode().strip() for name, (out, _) in zip(keys, results[10:], strict=True)}

    doc = read_vault(vault)
    assert {n: doc.access_keys[n].hash for n in keys} == {
        n: hash_access_key(t) for n, t in tokens.items()
    }
    opened, problems = open_vault(doc, opener)
    assert problems == []
    assert {n: opened.secrets[("ns", n)].reveal() for n in values} == values
    assert link.is_symlink()
    assert leftovers(vault.parent, vault) == ["elsewhere"]
    assert sorted(p.name for p in link.parent.iterdir()) == ["vault-link.json"]


def test_a_fifo_at_the_vault_path_is_refused_without_blocking(tmp_path: Path) -> None:
    path = tmp_path / "vault.json"
    os.mkfifo(path)
    result: list[BaseException | None] = []

    def read() -> None:
        try:
            read_vault(path)
            result.append(None)
        except BaseException as exc:
            result.append(exc)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    thread.join(5)
    if not result:  # release the blocked reader before failing
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    assert result, "reading a FIFO vault blocked"
    assert isinstance(result[0], VaultError)
    assert str(path) in str(result[0])
    assert "not a regular file" in str(result[0])


# --------------------------------------------------------------------------- opening


def test_open_vault_decrypts_everything(sealer: Sealer, opener: Opener) -> None:
    doc = doc_with_secret(sealer, opener.public_key)
    doc.access_keys["checkout"] = AccessKeyEntry(
        hash=hash_access_key("sk-sc-tok"),
        created_at=now_iso(),
        credits_usd=3.0,
        allowed_providers=["openai"],
        attached=[
            AttachedEntry(
                "team-1",
                "openai",
                now_iso(),
                sealer.seal(attached_slot("checkout", "team-1"), TEAM),
            )
        ],
    )
    opened, problems = open_vault(doc, opener)
    assert problems == []
    assert opened.secrets[("openai", "primary")] == PRIMARY
    (rec,) = opened.access_keys
    assert rec.name == "checkout"
    assert rec.hash == hash_access_key("sk-sc-tok")
    assert rec.allowed_providers == frozenset({"openai"})
    assert rec.attached[0].secret == TEAM
    for text in (repr(opened), str(opened), f"{opened}"):
        assert PRIMARY.reveal() not in text
        assert TEAM.reveal() not in text


def test_secret_moved_to_another_name_is_rejected(sealer: Sealer, opener: Opener) -> None:
    doc = doc_with_secret(sealer, opener.public_key)
    doc.secrets["openai"]["other"] = doc.secrets["openai"]["primary"]
    doc.secrets["anthropic"] = {"primary": doc.secrets["openai"]["primary"]}
    opened, problems = open_vault(doc, opener)
    assert ("openai", "primary") in opened.secrets
    assert ("openai", "other") not in opened.secrets
    assert ("anthropic", "primary") not in opened.secrets
    assert len(problems) == 2
    assert any(p.startswith("secrets/openai/other: sealed for another slot") for p in problems)
    assert any(p.startswith("secrets/anthropic/primary: sealed for another slot") for p in problems)
    assert all(PRIMARY.reveal() not in p for p in problems)


def test_secret_moved_into_an_attached_slot_is_rejected(sealer: Sealer, opener: Opener) -> None:
    doc = doc_with_secret(sealer, opener.public_key)
    stolen = doc.secrets["openai"]["primary"]
    doc.access_keys["checkout"] = AccessKeyEntry(
        hash="sha256:00",
        created_at=now_iso(),
        attached=[AttachedEntry("team-1", "openai", now_iso(), stolen)],
    )
    opened, problems = open_vault(doc, opener)
    assert problems == [
        "access_keys/checkout/attached/team-1: sealed for another slot (copied or moved value)"
    ]
    assert opened.access_keys[0].attached == ()


def test_attached_key_moved_to_another_access_key_is_rejected(
    sealer: Sealer, opener: Opener
) -> None:
    sealed = sealer.seal(attached_slot("alice", "k"), TEAM)
    doc = VaultDoc(recipient=opener.public_key)
    for name in ("alice", "mallory"):
        doc.access_keys[name] = AccessKeyEntry(
            hash=f"sha256:{name}", created_at=now_iso(),
            attached=[AttachedEntry("k", "openai", now_iso(), sealed)],
        )  # fmt: skip
    opened, problems = open_vault(doc, opener)
    assert problems == [
        "access_keys/mallory/attached/k: sealed for another slot (copied or moved value)"
    ]
    by_name = {r.name: r for r in opened.access_keys}
    assert [a.secret for a in by_name["alice"].attached] == [TEAM]
    assert by_name["mallory"].attached == ()


def test_vault_sealed_to_another_key_reports_every_value(sealer: Sealer, opener: Opener) -> None:
    doc = doc_with_secret(sealer, opener.public_key)
    doc.secrets["anthropic"] = {"k": sealer.seal(secret_slot("anthropic", "k"), TEAM)}
    stranger = Opener(generate_private_key())
    opened, problems = open_vault(doc, stranger)
    assert opened.secrets == {}
    assert problems[0].startswith("recipient: ")
    assert "secrets/openai/primary: cannot be opened with this private key" in problems
    assert "secrets/anthropic/k: cannot be opened with this private key" in problems


def test_attached_newest_first(sealer: Sealer, opener: Opener) -> None:
    doc = VaultDoc(recipient=opener.public_key)
    times = [
        "2025-01-01T10:00:00.000001Z",
        "2025-01-01T10:00:00.000003Z",
        "2025-01-01T10:00:00.000002Z",
    ]
    doc.access_keys["a"] = AccessKeyEntry(
        hash="sha256:00", created_at=times[0],
        attached=[AttachedEntry(f"k{i}", "openai", t, sealer.seal(attached_slot("a", f"k{i}"), TEAM))
                  for i, t in enumerate(times)],
    )  # fmt: skip
    opened, problems = open_vault(doc, opener)
    assert problems == []
    assert [a.id for a in opened.access_keys[0].attached] == ["k1", "k2", "k0"]
    assert (
        opened.access_keys[0].attached[0].attached_at
        > opened.access_keys[0].attached[1].attached_at
    )


def test_attached_same_timestamp_later_entry_is_newer(sealer: Sealer, opener: Opener) -> None:
    doc = VaultDoc(recipient=opener.public_key)
    same = "2025-01-01T10:00:00.123456Z"
    doc.access_keys["a"] = AccessKeyEntry(
        hash="sha256:00", created_at=same,
        attached=[AttachedEntry(f"k{i}", "openai", same, sealer.seal(attached_slot("a", f"k{i}"), TEAM))
                  for i in range(3)],
    )  # fmt: skip
    opened, _ = open_vault(doc, opener)
    assert [a.id for a in opened.access_keys[0].attached] == ["k2", "k1", "k0"]


@pytest.mark.parametrize(
    ("mutate", "where"),
    [
        (lambda d: d["secrets"].update({"a/b": {"c": "x"}}), "secrets.a/b"),
        (lambda d: d["secrets"].update({"ok": {"b/c": "x"}}), "secrets.ok.b/c"),
        (
            lambda d: d["access_keys"].update({"k": {"hash": "sha256:00", "revoked": "false"}}),
            "access_keys.k.revoked",
        ),
    ],
)
def test_names_that_would_blur_slots_and_mistyped_flags_are_refused(
    vault: Path, mutate: Callable[[dict[str, Any]], None], where: str
) -> None:
    doc = orjson.loads(vault.read_bytes())
    mutate(doc)
    with pytest.raises(VaultError, match=re.escape(where)):
        parse_vault(orjson.dumps(doc), "vault.json")
