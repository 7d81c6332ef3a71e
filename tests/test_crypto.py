"""Sealed boxes bound to their slot, key parsing, and private key file handling."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest

from sidecar.crypto import (
    PRIVATE_KEY_ENV,
    Opener,
    Sealer,
    encode_public_key,
    generate_private_key,
    key_file_problems,
    load_private_key,
    parse_public_key,
    write_private_key,
)
from sidecar.errors import VaultError
from sidecar.secret import Secret

VALUE = Secret("sk-CRYPTO-SECRET-9b8a7c6d5e")
SLOT = "secrets/openai/primary"


@pytest.fixture(autouse=True)
def _no_env_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PRIVATE_KEY_ENV, raising=False)


@pytest.fixture
def private_key() -> Secret:
    return generate_private_key()


@pytest.fixture
def opener(private_key: Secret) -> Opener:
    return Opener(private_key)


@pytest.fixture
def sealer(opener: Opener) -> Sealer:
    return Sealer(opener.public_key)


def test_generated_keys_are_32_bytes_and_distinct() -> None:
    a, b = generate_private_key(), generate_private_key()
    assert len(base64.b64decode(a.reveal())) == 32
    assert a != b


def test_public_key_round_trips(opener: Opener) -> None:
    assert encode_public_key(parse_public_key(opener.public_key)) == opener.public_key
    assert len(base64.b64decode(opener.public_key)) == 32


@pytest.mark.parametrize("text", ["", "not base64!", base64.b64encode(b"short").decode()])
def test_bad_public_key_is_a_vault_error(text: str) -> None:
    with pytest.raises(VaultError, match="public key"):
        parse_public_key(text)


def test_seal_then_open_in_the_same_slot(sealer: Sealer, opener: Opener) -> None:
    sealed = sealer.seal(SLOT, VALUE)
    assert opener.open(SLOT, sealed) == VALUE
    assert VALUE.reveal() not in sealed
    base64.b64decode(sealed, validate=True)


def test_sealing_is_randomised(sealer: Sealer) -> None:
    assert sealer.seal(SLOT, VALUE) != sealer.seal(SLOT, VALUE)


def test_sealer_needs_only_the_public_key(opener: Opener) -> None:
    sealed = Sealer(opener.public_key).seal(SLOT, VALUE)
    assert opener.open(SLOT, sealed) == VALUE


@pytest.mark.parametrize(
    "other_slot",
    [
        "secrets/openai/other",
        "secrets/anthropic/primary",
        "access_keys/checkout/attached/team-1",
        "secrets/openai/primary/",
        "secrets/openai/primar",
    ],
)
def test_value_moved_to_another_slot_is_rejected(
    sealer: Sealer, opener: Opener, other_slot: str
) -> None:
    sealed = sealer.seal(SLOT, VALUE)
    with pytest.raises(VaultError) as info:
        opener.open(other_slot, sealed)
    message = str(info.value)
    assert other_slot in message
    assert "another slot" in message
    assert VALUE.reveal() not in message


def test_value_sealed_to_another_key_cannot_be_opened(sealer: Sealer) -> None:
    sealed = sealer.seal(SLOT, VALUE)
    stranger = Opener(generate_private_key())
    with pytest.raises(VaultError, match=r"secrets/openai/primary: cannot be opened") as info:
        stranger.open(SLOT, sealed)
    assert VALUE.reveal() not in str(info.value)


@pytest.mark.parametrize("garbage", ["", "%%%not-base64%%%", base64.b64encode(b"x" * 80).decode()])
def test_garbage_sealed_text_is_a_vault_error(opener: Opener, garbage: str) -> None:
    with pytest.raises(VaultError, match="cannot be opened"):
        opener.open(SLOT, garbage)


def test_opener_repr_shows_only_the_public_key(private_key: Secret, opener: Opener) -> None:
    for text in (repr(opener), str(opener), f"{opener}", f"{opener!r}"):
        assert private_key.reveal() not in text
        assert opener.public_key in text
    assert not hasattr(opener, "__dict__")


@pytest.mark.parametrize("bad", ["!!!", base64.b64encode(b"too short").decode()])
def test_bad_private_key_error_does_not_echo_it(bad: str) -> None:
    with pytest.raises(VaultError, match="private key") as info:
        Opener(Secret(bad))
    assert bad not in str(info.value)


# --------------------------------------------------------------------------- key files


def test_write_private_key_mode_0600_and_loads(tmp_path: Path, private_key: Secret) -> None:
    path = tmp_path / "sidecar.key"
    write_private_key(path, private_key)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_private_key(path).public_key == Opener(private_key).public_key


def test_write_private_key_refuses_to_overwrite(tmp_path: Path, private_key: Secret) -> None:
    path = tmp_path / "sidecar.key"
    path.write_text("precious\n")
    with pytest.raises(VaultError, match="refusing to overwrite"):
        write_private_key(path, private_key)
    assert path.read_text() == "precious\n"


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o440])
def test_safe_key_file_modes(tmp_path: Path, private_key: Secret, mode: int) -> None:
    path = tmp_path / "k"
    path.write_text(private_key.reveal())
    os.chmod(path, mode)
    assert key_file_problems(path) == []
    assert load_private_key(path).public_key == Opener(private_key).public_key


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o660, 0o666, 0o601])
def test_unsafe_key_file_modes(tmp_path: Path, private_key: Secret, mode: int) -> None:
    path = tmp_path / "k"
    path.write_text(private_key.reveal())
    os.chmod(path, mode)
    problems = key_file_problems(path)
    assert len(problems) == 1
    assert f"{mode:04o}" in problems[0]
    assert str(path) in problems[0]
    assert private_key.reveal() not in problems[0]
    with pytest.raises(VaultError, match="mode"):
        load_private_key(path)


def test_missing_key_file_is_a_problem(tmp_path: Path) -> None:
    problems = key_file_problems(tmp_path / "absent.key")
    assert len(problems) == 1
    assert "absent.key" in problems[0]
    with pytest.raises(VaultError):
        load_private_key(tmp_path / "absent.key")


def test_no_key_file_and_no_env_is_a_vault_error() -> None:
    with pytest.raises(VaultError, match=PRIVATE_KEY_ENV):
        load_private_key(None)


def test_env_private_key_wins_over_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env_key = generate_private_key()
    monkeypatch.setenv(PRIVATE_KEY_ENV, env_key.reveal() + "\n")
    assert load_private_key(None).public_key == Opener(env_key).public_key
    # Even a file that would be refused for its mode is not consulted.
    path = tmp_path / "k"
    path.write_text(generate_private_key().reveal())
    os.chmod(path, 0o644)
    assert load_private_key(path).public_key == Opener(env_key).public_key


def test_key_file_with_surrounding_whitespace_loads(tmp_path: Path, private_key: Secret) -> None:
    path = tmp_path / "k"
    path.write_text(f"\n  {private_key.reveal()}  \n")
    os.chmod(path, 0o600)
    assert load_private_key(path).public_key == Opener(private_key).public_key


@pytest.mark.parametrize("check_mode", [True, False])
def test_a_fifo_at_the_key_path_is_refused_without_blocking(
    tmp_path: Path, check_mode: bool
) -> None:
    """With the bug, opening the FIFO waits for a writer for ever (the test times out)."""
    path = tmp_path / "k"
    os.mkfifo(path, 0o600)
    problem = f"{path}: cannot read private key file (not a regular file: it is a FIFO)"
    assert key_file_problems(path) == [problem]
    with pytest.raises(VaultError) as info:
        load_private_key(path, check_mode=check_mode)
    assert str(info.value) == problem  # the same words: `check` lists it once


def test_an_oversized_key_file_is_refused(tmp_path: Path, private_key: Secret) -> None:
    path = tmp_path / "k"
    path.write_text(private_key.reveal() + "\n" + " " * (8 << 10))
    os.chmod(path, 0o600)
    with pytest.raises(VaultError, match="larger than") as info:
        load_private_key(path)
    assert private_key.reveal() not in str(info.value)


def test_a_key_file_that_is_not_ascii_is_refused_without_echoing_it(tmp_path: Path) -> None:
    path = tmp_path / "k"
    path.write_bytes("sk-caf\u00e9-secret".encode())
    os.chmod(path, 0o600)
    with pytest.raises(VaultError, match="not ASCII") as info:
        load_private_key(path)
    assert "caf" not in str(info.value)
