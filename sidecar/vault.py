"""The sealed vault file (docs/reference.md#vault-file): format, locked atomic edits, and opening.

Edits (CLI) need only the public key and go through `edit_vault`, which
takes an exclusive `flock` on `<vault>.lock`, re-reads the file, applies the
change, and replaces the file atomically (temp file, fsync, rename, fsync of
the directory). Serving opens the whole vault with the private key into an
immutable `OpenedVault`; every problem is collected so `check` can list all.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import secrets as _random
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import orjson

from sidecar.crypto import Opener, Sealer, parse_public_key
from sidecar.errors import VaultError
from sidecar.files import MAX_VAULT_BYTES, atomic_write, read_regular_file
from sidecar.names import NAME_RULE, is_name
from sidecar.secret import Secret

VAULT_VERSION: Final = 1
ACCESS_KEY_PREFIX: Final = "sk-sc-"
#: the largest `rpm` / `tpm` an access key may have; absent (None) means unlimited
MAX_RATE_LIMIT: Final = 1_000_000_000

#: The most credits an access key may hold (USD): any amount in practice. A grant is
#: counted in micro-USD; near the largest float that count overflows (an infinite or
#: 1e308 grant used to take the vault down).
MAX_CREDITS_USD: Final = 1e300


# --------------------------------------------------------------------------- slots


def secret_slot(namespace: str, name: str) -> str:
    return f"secrets/{namespace}/{name}"


def attached_slot(access_key: str, key_id: str) -> str:
    return f"access_keys/{access_key}/attached/{key_id}"


def hash_access_key(token: str) -> str:
    """Access keys are 256-bit random tokens, so a plain SHA-256 is a safe, O(1) lookup key."""
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def new_access_key() -> Secret:
    return Secret(ACCESS_KEY_PREFIX + _random.token_urlsafe(32))


def is_rate_limit(value: object) -> bool:
    """Whether `value` is a valid `rpm` / `tpm`: an int from 1 to `MAX_RATE_LIMIT` (not a bool)."""
    return type(value) is int and 1 <= value <= MAX_RATE_LIMIT


def now_iso() -> str:
    """UTC timestamp with microseconds: attachment order must survive same-second edits."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_iso(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


# --------------------------------------------------------------------------- document (editable)


@dataclass(slots=True)
class AttachedEntry:
    id: str
    provider: str
    attached_at: str
    sealed: str


@dataclass(slots=True)
class AccessKeyEntry:
    hash: str
    created_at: str
    revoked: bool = False
    revoked_at: str | None = None
    credits_usd: float = 0.0
    allowed_providers: list[str] = field(default_factory=list)
    allowed_models: list[str] = field(default_factory=list)
    attached: list[AttachedEntry] = field(default_factory=list)
    rpm: int | None = None  # requests per minute; None = unlimited
    tpm: int | None = None  # tokens per minute; None = unlimited

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "hash": self.hash,
            "created_at": self.created_at,
            "revoked": self.revoked,
            "revoked_at": self.revoked_at,
            "credits_usd": self.credits_usd,
            "allowed_providers": self.allowed_providers,
            "allowed_models": self.allowed_models,
            "attached": [
                {
                    "id": a.id,
                    "provider": a.provider,
                    "attached_at": a.attached_at,
                    "sealed": a.sealed,
                }
                for a in self.attached
            ],
        }
        # Written only when set, so a vault without limits reads the same to older sidecars.
        if self.rpm is not None:
            out["rpm"] = self.rpm
        if self.tpm is not None:
            out["tpm"] = self.tpm
        return out


@dataclass(slots=True)
class VaultDoc:
    recipient: str
    secrets: dict[str, dict[str, str]] = field(default_factory=dict)
    access_keys: dict[str, AccessKeyEntry] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "version": VAULT_VERSION,
                "recipient": self.recipient,
                "secrets": self.secrets,
                "access_keys": {name: e.to_dict() for name, e in self.access_keys.items()},
            },
            option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS | orjson.OPT_APPEND_NEWLINE,
        )


def _expect(cond: bool, where: str, what: str) -> None:
    if not cond:
        raise VaultError(f"{where}: expected {what}")


def _str_list(value: Any, where: str) -> list[str]:
    _expect(
        isinstance(value, list) and all(isinstance(x, str) for x in value),
        where,
        "a list of strings",
    )
    return list(value)


def _rate_limit(value: Any, where: str) -> int | None:
    if value is None:
        return None
    _expect(
        is_rate_limit(value), where, f"an integer from 1 to {MAX_RATE_LIMIT}, or null (unlimited)"
    )
    return int(value)


def parse_vault(data: bytes, source: str = "vault") -> VaultDoc:
    """Parse and shape-check a vault document. Raises `VaultError` naming the bad path."""
    try:
        raw = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise VaultError(f"{source}: not valid JSON ({exc})") from None
    _expect(isinstance(raw, dict), source, "a JSON object")
    _expect(
        raw.get("version", VAULT_VERSION) == VAULT_VERSION, f"{source}: version", f"{VAULT_VERSION}"
    )
    recipient = raw.get("recipient")
    _expect(isinstance(recipient, str), f"{source}: recipient", "a base64 public key")
    try:
        parse_public_key(recipient)
    except VaultError:
        raise VaultError(f"{source}: recipient: expected a base64 public key (32 bytes)") from None
    secrets_raw = raw.get("secrets", {})
    _expect(isinstance(secrets_raw, dict), f"{source}: secrets", "an object of namespaces")
    secrets: dict[str, dict[str, str]] = {}
    for ns, names in secrets_raw.items():
        _expect(is_name(ns), f"{source}: secrets.{ns}", f"a namespace of {NAME_RULE}")
        _expect(isinstance(names, dict), f"{source}: secrets.{ns}", "an object of sealed values")
        for name, sealed in names.items():
            _expect(is_name(name), f"{source}: secrets.{ns}.{name}", f"a name of {NAME_RULE}")
            _expect(
                isinstance(sealed, str), f"{source}: secrets.{ns}.{name}", "a sealed value (base64)"
            )
        secrets[ns] = dict(names)
    keys_raw = raw.get("access_keys", {})
    _expect(isinstance(keys_raw, dict), f"{source}: access_keys", "an object of access keys")
    access_keys: dict[str, AccessKeyEntry] = {}
    for name, e in keys_raw.items():
        w = f"{source}: access_keys.{name}"
        _expect(is_name(name), w, f"an access key name of {NAME_RULE}")
        _expect(isinstance(e, dict), w, "an object")
        _expect(isinstance(e.get("revoked", False), bool), f"{w}.revoked", "true or false")
        _expect(
            isinstance(e.get("hash"), str) and e["hash"].startswith("sha256:"),
            f"{w}.hash",
            "sha256:<hex>",
        )
        credits = e.get("credits_usd", 0)
        _expect(
            isinstance(credits, int | float)
            and not isinstance(credits, bool)
            and 0 <= credits <= MAX_CREDITS_USD,
            f"{w}.credits_usd",
            f"a number from 0 to {MAX_CREDITS_USD:g}",
        )
        attached: list[AttachedEntry] = []
        att_raw = e.get("attached", [])
        _expect(isinstance(att_raw, list), f"{w}.attached", "a list")
        for j, a in enumerate(att_raw):
            aw = f"{w}.attached[{j}]"
            _expect(isinstance(a, dict), aw, "an object")
            for k in ("id", "provider", "attached_at", "sealed"):
                _expect(isinstance(a.get(k), str), f"{aw}.{k}", "a string")
            _expect(is_name(a["id"]), f"{aw}.id", f"a key id of {NAME_RULE}")
            try:
                parse_iso(a["attached_at"])
            except ValueError:
                raise VaultError(f"{aw}.attached_at: expected an ISO 8601 timestamp") from None
            attached.append(AttachedEntry(a["id"], a["provider"], a["attached_at"], a["sealed"]))
        access_keys[name] = AccessKeyEntry(
            hash=e["hash"],
            created_at=str(e.get("created_at", "")),
            revoked=e.get("revoked", False),
            revoked_at=e.get("revoked_at"),
            credits_usd=float(credits),
            allowed_providers=_str_list(e.get("allowed_providers", []), f"{w}.allowed_providers"),
            allowed_models=_str_list(e.get("allowed_models", []), f"{w}.allowed_models"),
            attached=attached,
            rpm=_rate_limit(e.get("rpm"), f"{w}.rpm"),
            tpm=_rate_limit(e.get("tpm"), f"{w}.tpm"),
        )
    return VaultDoc(recipient=recipient, secrets=secrets, access_keys=access_keys)


def read_vault(path: Path) -> VaultDoc:
    """Read and parse the vault; a FIFO, directory or oversized file is refused, not read."""
    try:
        data = read_regular_file(path, limit=MAX_VAULT_BYTES)
    except FileNotFoundError:
        raise VaultError(f"{path}: no such vault (create it with `sidecar vault init`)") from None
    except OSError as exc:
        raise VaultError(f"{path}: cannot read vault ({exc.strerror})") from None
    return parse_vault(data, str(path))


def write_vault(path: Path, doc: VaultDoc) -> None:
    """Replace the vault atomically: a reader sees the old file or the new one, never half."""
    try:
        atomic_write(path, doc.to_json())
    except OSError as exc:
        raise VaultError(f"{path}: cannot write the vault ({exc.strerror})") from None


# --------------------------------------------------------------------------- edits
# The operations every writer uses (CLI, demo, tests, benchmark), inside `edit_vault`.


def set_secret(doc: VaultDoc, namespace: str, name: str, value: Secret) -> None:
    """Seal `value` into `secrets/NS/NAME` (replacing any earlier value)."""
    sealed = Sealer(doc.recipient).seal(secret_slot(namespace, name), value)
    doc.secrets.setdefault(namespace, {})[name] = sealed


def add_access_key(
    doc: VaultDoc,
    name: str,
    *,
    credits_usd: float = 0.0,
    providers: Iterable[str] = (),
    models: Iterable[str] = (),
    rpm: int | None = None,
    tpm: int | None = None,
) -> Secret:
    """Create an access key; returns the token, which the vault keeps only as a hash.

    `rpm` / `tpm` are its requests / tokens per minute (None = unlimited).
    """
    if name in doc.access_keys:
        raise VaultError(f"access key {name!r} already exists")
    check_rate_limits(rpm=rpm, tpm=tpm)
    token = new_access_key()
    doc.access_keys[name] = AccessKeyEntry(
        hash=hash_access_key(token.reveal()),
        created_at=now_iso(),
        credits_usd=credits_usd,
        allowed_providers=sorted(set(providers)),
        allowed_models=sorted(set(models)),
        rpm=rpm,
        tpm=tpm,
    )
    return token


def check_rate_limits(*, rpm: int | None, tpm: int | None) -> None:
    """Raise `VaultError` unless each is None (unlimited) or valid (`is_rate_limit`)."""
    for what, value in (("rpm", rpm), ("tpm", tpm)):
        if value is not None and not is_rate_limit(value):
            raise VaultError(f"{what}: expected an integer from 1 to {MAX_RATE_LIMIT}, or none")


def attach_key(doc: VaultDoc, access_key: str, provider: str, key_id: str, value: Secret) -> None:
    """Seal `value` into `access_keys/NAME/attached/ID`, now-timestamped (newest is tried first)."""
    entry = doc.access_keys.get(access_key)
    if entry is None:
        raise VaultError(f"no access key named {access_key!r}")
    if any(a.id == key_id for a in entry.attached):
        raise VaultError(f"{access_key} already has a key with id {key_id!r}")
    sealed = Sealer(doc.recipient).seal(attached_slot(access_key, key_id), value)
    entry.attached.append(AttachedEntry(key_id, provider, now_iso(), sealed))


def _real_path(path: Path) -> Path:
    """The file a vault path names, symlinks resolved: edits through a link and through the
    real path must take the same lock and replace the same file (the link is kept)."""
    return Path(os.path.realpath(path))


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Exclusive `flock` on `<path>.lock`; `path` must already be resolved (`_real_path`)."""
    lock_path = path.with_name(path.name + ".lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise VaultError(f"{lock_path}: cannot create lock file ({exc.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def edit_vault(path: Path) -> Iterator[VaultDoc]:
    """Read-modify-write under an exclusive lock; nothing is written if the body raises.

    Lock, read and write are all on the resolved path, whichever name (a symlink or
    the real path) the caller used, so concurrent edits through either never lose one.
    """
    path = Path(path)
    if not path.exists():
        read_vault(
            path
        )  # raises the clear "no such vault" error without leaving a lock file behind
    real = _real_path(path)
    with _locked(real):
        doc = read_vault(real)
        yield doc
        write_vault(real, doc)


def create_vault(path: Path, recipient: str) -> None:
    parse_public_key(recipient)
    path = Path(path)
    with _locked(_real_path(path)):
        if path.exists():
            raise VaultError(f"{path}: already exists")
        write_vault(path, VaultDoc(recipient=recipient))


# --------------------------------------------------------------------------- opened (serving)


@dataclass(frozen=True, slots=True)
class AttachedKey:
    id: str
    provider: str
    attached_at: float
    secret: Secret


@dataclass(frozen=True, slots=True)
class AccessKeyRecord:
    name: str
    hash: str
    revoked: bool
    credits_usd: float
    allowed_providers: frozenset[str]
    allowed_models: frozenset[str]
    attached: tuple[AttachedKey, ...]  # newest first
    rpm: int | None = None  # requests per minute; None = unlimited
    tpm: int | None = None  # tokens per minute; None = unlimited


@dataclass(frozen=True, slots=True)
class OpenedVault:
    recipient: str
    secrets: Mapping[tuple[str, str], Secret]
    access_keys: tuple[AccessKeyRecord, ...]


def open_vault(doc: VaultDoc, opener: Opener) -> tuple[OpenedVault, list[str]]:
    """Decrypt every value. Returns the vault of what opened plus every problem found."""
    problems: list[str] = []
    if doc.recipient != opener.public_key:
        problems.append(
            "recipient: the vault is sealed to a different public key than this private key's"
        )
    secrets: dict[tuple[str, str], Secret] = {}
    for ns, names in doc.secrets.items():
        for name, sealed in names.items():
            try:
                secrets[(ns, name)] = opener.open(secret_slot(ns, name), sealed)
            except VaultError as exc:
                problems.append(str(exc))
    records: list[AccessKeyRecord] = []
    for name, e in doc.access_keys.items():
        attached: list[tuple[float, int, AttachedKey]] = []
        for pos, a in enumerate(e.attached):
            try:
                secret = opener.open(attached_slot(name, a.id), a.sealed)
            except VaultError as exc:
                problems.append(str(exc))
                continue
            ts = parse_iso(a.attached_at)
            attached.append((ts, pos, AttachedKey(a.id, a.provider, ts, secret)))
        attached.sort(key=lambda t: (t[0], t[1]), reverse=True)
        records.append(
            AccessKeyRecord(
                name=name,
                hash=e.hash,
                revoked=e.revoked,
                credits_usd=e.credits_usd,
                allowed_providers=frozenset(e.allowed_providers),
                allowed_models=frozenset(e.allowed_models),
                attached=tuple(t[2] for t in attached),
                rpm=e.rpm,
                tpm=e.tpm,
            )
        )
    return OpenedVault(doc.recipient, secrets, tuple(records)), problems
