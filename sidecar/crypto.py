"""Sealed boxes bound to their vault slot (docs/reference.md#vault-file). The only module that touches PyNaCl.

A sealed value's plaintext is `slot + NUL + value`, so a ciphertext copied
into another slot of the vault fails to open there.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
from pathlib import Path
from typing import Final

from nacl.exceptions import CryptoError
from nacl.public import PrivateKey, PublicKey, SealedBox

from sidecar.errors import VaultError
from sidecar.files import MAX_KEY_BYTES, not_regular_error, read_regular_file
from sidecar.secret import Secret

PRIVATE_KEY_ENV: Final = "SIDECAR_PRIVATE_KEY"
_SEP: Final = b"\x00"


def _b64decode(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise VaultError(f"{what} is not valid base64") from None


def generate_private_key() -> Secret:
    """A new X25519 private key, base64."""
    return Secret(base64.b64encode(bytes(PrivateKey.generate())).decode())


def parse_public_key(text: str) -> PublicKey:
    raw = _b64decode(text, "public key")
    if len(raw) != 32:
        raise VaultError("public key must be 32 bytes, base64-encoded")
    return PublicKey(raw)


def encode_public_key(key: PublicKey) -> str:
    return base64.b64encode(bytes(key)).decode()


class Sealer:
    """Seals values to a vault's recipient. Needs only the public key."""

    __slots__ = ("_box", "public_key")

    def __init__(self, public_key: str) -> None:
        self._box = SealedBox(parse_public_key(public_key))
        self.public_key = public_key

    def seal(self, slot: str, value: Secret) -> str:
        plaintext = slot.encode() + _SEP + value.reveal().encode()
        return base64.b64encode(self._box.encrypt(plaintext)).decode()


class Opener:
    """Opens sealed values. Holds the private key; its repr shows only the public key."""

    __slots__ = ("_box", "public_key")

    def __init__(self, private_key: Secret) -> None:
        raw = _b64decode(private_key.reveal(), "private key")
        if len(raw) != 32:
            raise VaultError("private key must be 32 bytes, base64-encoded")
        key = PrivateKey(raw)
        self._box = SealedBox(key)
        self.public_key = encode_public_key(key.public_key)

    def open(self, slot: str, sealed: str) -> Secret:
        try:
            plaintext = self._box.decrypt(base64.b64decode(sealed, validate=True))
        except (CryptoError, binascii.Error, ValueError, TypeError):
            raise VaultError(f"{slot}: cannot be opened with this private key") from None
        bound, sep, value = plaintext.partition(_SEP)
        if not sep or bound != slot.encode():
            raise VaultError(f"{slot}: sealed for another slot (copied or moved value)")
        try:
            return Secret(value.decode())
        except UnicodeDecodeError:
            raise VaultError(f"{slot}: sealed value is not UTF-8 text") from None

    def __repr__(self) -> str:
        return f"Opener(public_key={self.public_key!r})"


def key_file_problems(path: Path) -> list[str]:
    """Why a private key file is unsafe: group-writable or readable by others."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        return [f"{path}: cannot read private key file ({exc.strerror})"]
    if not stat.S_ISREG(mode):  # the same words `load_private_key` refuses it with
        return [f"{path}: cannot read private key file ({not_regular_error(path, mode).strerror})"]
    if mode & (stat.S_IWGRP | stat.S_IRWXO):
        return [f"{path}: private key file mode is {stat.S_IMODE(mode):04o}; expected 0600 or 0400 "
                "(0440 is accepted for Kubernetes fsGroup mounts)"]  # fmt: skip
    return []


def load_private_key(path: Path | None, *, check_mode: bool = True) -> Opener:
    """The pod's private key from `SIDECAR_PRIVATE_KEY` (base64) or the key file.

    `check_mode=False` reads a file whose mode is too open (for `check`, which lists
    that problem itself and goes on checking the rest).
    """
    env = os.environ.get(PRIVATE_KEY_ENV)
    if env:
        return Opener(Secret(env.strip()))
    if path is None:
        raise VaultError(f"no private key: set vault.private_key_file or {PRIVATE_KEY_ENV}")
    problems = key_file_problems(path) if check_mode else []
    if problems:
        raise VaultError(problems[0])
    try:
        text = read_regular_file(path, limit=MAX_KEY_BYTES).decode("ascii")
    except OSError as exc:
        raise VaultError(f"{path}: cannot read private key file ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise VaultError(f"{path}: cannot read private key file (not ASCII text)") from None
    return Opener(Secret(text.strip()))


def write_private_key(path: Path, key: Secret) -> None:
    """Create the key file with mode 0600; refuse to overwrite an existing one."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise VaultError(f"{path}: already exists; refusing to overwrite a private key") from None
    except OSError as exc:
        raise VaultError(f"{path}: cannot create private key file ({exc.strerror})") from None
    try:
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(key.reveal() + "\n")
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        path.unlink(missing_ok=True)  # never leave a half-written key that keygen then refuses
        raise VaultError(f"{path}: cannot write private key file ({exc.strerror})") from None
