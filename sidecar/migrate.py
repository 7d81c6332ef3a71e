"""`sidecar migrate`: move policy keys of built-in providers onto access keys (docs/migration.md).

A policy key (`providers[].api_keys` of `openai` / `anthropic`) becomes an
attached key of every access key named (all active ones by default), and the
`api_keys` block is cut out of the config text, keeping its comments and
layout. Routing stays the same: an attached key keeps the policy key's id
(or the same value-derived id), and the first policy key becomes the newest
attachment, so failover order is unchanged.

This is the one editing command that needs the private key. A sealed value
is bound to its vault slot (`secrets/NS/NAME`), so it cannot be copied into
`access_keys/NAME/attached/ID`; it has to be opened and sealed again.

Steps are ordered so that a crash in between is harmless and a re-run
finishes the job: the vault is written first (attached keys then replace the
identical policy keys for those access keys), the config last. The config
is changed only when no active access key would lose its keys: after a run
limited with `--access-key`, the policy keys stay until every active access
key carries them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

from sidecar.catalog import BUILTIN_PROVIDERS
from sidecar.config import (
    Config,
    ProviderConfig,
    SecretRef,
    parse_config_text,
    read_config_text,
)
from sidecar.crypto import Opener, Sealer, load_private_key
from sidecar.errors import UserError, VaultError
from sidecar.files import atomic_write
from sidecar.secret import Secret, fingerprint
from sidecar.vault import (
    AttachedEntry,
    VaultDoc,
    attached_slot,
    edit_vault,
    read_vault,
    secret_slot,
)

_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


@dataclass(frozen=True, slots=True)
class _PolicyKeys:
    """The policy keys of one built-in provider, as listed in the config."""

    index: int  # position under `providers:`
    provider: ProviderConfig


def migrate(config_path: Path, access_keys: list[str]) -> list[str]:
    """Attach the built-in providers' policy keys to access keys; drop them from the config.

    `access_keys` names the targets; empty means every active (not revoked)
    access key. Returns human-readable lines describing what was done.
    Raises `UserError` (or `ConfigError` / `VaultError` for unusable files)
    before anything is written when it can tell up front. Safe to re-run:
    keys already attached are skipped, a finished migration changes nothing.
    """
    config_path = Path(config_path)
    text = read_config_text(config_path.absolute())
    config = parse_config_text(text, config_path.absolute())
    lines: list[str] = []
    movable: list[_PolicyKeys] = []
    for i, p in enumerate(config.providers):
        if p.id not in BUILTIN_PROVIDERS or not p.api_keys:
            continue
        if p.disabled:
            lines.append(f"skipped {p.id}: the provider is disabled, its keys stay")
            continue
        movable.append(_PolicyKeys(i, p))
    if not movable:
        return [
            *lines,
            f"nothing to migrate: {config_path} has no policy keys of built-in providers",
        ]

    doc = read_vault(config.vault.path)
    targets = _targets(doc, access_keys)
    # Edit the text now, so a config this cannot edit fails before the vault changes.
    will_drop = not (_uncovered(doc, movable) - set(targets))
    new_text = (
        _cut_api_keys(text, [m.index for m in movable], str(config_path)) if will_drop else None
    )

    if not _pending(doc, targets, movable):
        lines += _report_skips(doc, targets, movable)
    else:
        opener = _opener(config, doc)
        values = _open_values(config, doc, opener, movable)
        with edit_vault(config.vault.path) as locked:
            # Re-plan against the locked document: it may have changed since we read it.
            targets = _targets(locked, access_keys)
            lines += _report_skips(locked, targets, movable)
            lines += _attach(locked, targets, movable, values)
        doc = locked

    uncovered = _uncovered(doc, movable)
    if uncovered or new_text is None:
        names = ", ".join(sorted(uncovered))
        lines.append(
            f"kept the policy keys in {config_path}: access key(s) {names} do not carry them yet "
            "(run again without --access-key, or name them, to finish)"
        )
        return lines
    backup = _replace_config(config_path, text, new_text)
    lines += [
        f"removed providers[{m.index}].api_keys ({m.provider.id}) from {config_path}"
        for m in movable
    ]
    return [*lines, f"saved the original config as {backup}"]


# --------------------------------------------------------------------------- planning


def _targets(doc: VaultDoc, named: list[str]) -> list[str]:
    if not named:
        active = [n for n, e in doc.access_keys.items() if not e.revoked]
        if not active:
            raise UserError(
                "no active access key in the vault to attach the policy keys to; "
                "create one with `sidecar access-key create` first"
            )
        return sorted(active)
    unknown = [n for n in named if n not in doc.access_keys]
    if unknown:
        raise UserError(f"no access key named {unknown[0]!r} in the vault")
    return list(dict.fromkeys(named))


def _has_provider(doc: VaultDoc, access_key: str, provider: str) -> bool:
    return any(a.provider == provider for a in doc.access_keys[access_key].attached)


def _pending(
    doc: VaultDoc, targets: list[str], movable: list[_PolicyKeys]
) -> list[tuple[str, str]]:
    """(access key, provider) pairs that still need the policy keys attached."""
    return [
        (name, m.provider.id)
        for name in targets
        for m in movable
        if not _has_provider(doc, name, m.provider.id)
    ]


def _uncovered(doc: VaultDoc, movable: list[_PolicyKeys]) -> set[str]:
    """Active access keys that would lose a provider's keys if the config dropped them."""
    return {
        name
        for name, entry in doc.access_keys.items()
        if not entry.revoked
        for m in movable
        if not _has_provider(doc, name, m.provider.id)
    }


def _report_skips(doc: VaultDoc, targets: list[str], movable: list[_PolicyKeys]) -> list[str]:
    return [
        f"skipped {m.provider.id} for {name}: it already has attached {m.provider.id} keys"
        for name in targets
        for m in movable
        if _has_provider(doc, name, m.provider.id)
    ]


# --------------------------------------------------------------------------- secrets


def _opener(config: Config, doc: VaultDoc) -> Opener:
    try:
        opener = load_private_key(config.vault.private_key_file)
    except VaultError as exc:
        raise UserError(
            f"migrate needs the private key to re-seal policy keys as attached keys: {exc}"
        ) from None
    if opener.public_key != doc.recipient:
        raise UserError(
            f"{config.vault.path}: the vault is sealed to a different public key than this "
            "private key's"
        )
    return opener


def _open_values(
    config: Config, doc: VaultDoc, opener: Opener, movable: list[_PolicyKeys]
) -> dict[tuple[int, int], tuple[str, Secret]]:
    """(provider index, key index) → (attached id, value) for every movable policy key."""

    def resolver(where: str) -> Callable[[SecretRef], Secret]:
        def resolve(ref: SecretRef) -> Secret:
            sealed = doc.secrets.get(ref.namespace, {}).get(ref.name)
            if sealed is None:
                raise UserError(f"{where}: {ref} is not in the vault {config.vault.path}")
            try:
                return opener.open(secret_slot(ref.namespace, ref.name), sealed)
            except VaultError as exc:
                raise UserError(f"{where}: {exc}") from None

        return resolve

    out: dict[tuple[int, int], tuple[str, Secret]] = {}
    for m in movable:
        for j, key in enumerate(m.provider.api_keys):
            secret = key.value.render(resolver(f"providers[{m.index}].api_keys[{j}].value"))
            # The same id the runtime derives for a policy key without one: x-sidecar-key-id
            # and metrics keep their labels across the migration.
            out[(m.index, j)] = (key.id or fingerprint(secret.reveal()), secret)
    return out


def _attach(
    doc: VaultDoc,
    targets: list[str],
    movable: list[_PolicyKeys],
    values: Mapping[tuple[int, int], tuple[str, Secret]],
) -> list[str]:
    sealer = Sealer(doc.recipient)
    lines: list[str] = []
    start = datetime.now(UTC)
    for name in targets:
        entry = doc.access_keys[name]
        for m in movable:
            pid = m.provider.id
            if _has_provider(doc, name, pid):
                continue
            # A value listed twice without an id derives the same id twice: it is one key.
            unique: dict[str, Secret] = {}
            for j in range(len(m.provider.api_keys)):
                unique.setdefault(*values[(m.index, j)])
            keys = list(unique.items())
            for key_id, _ in keys:
                clash = next((a for a in entry.attached if a.id == key_id), None)
                if clash is not None:
                    raise UserError(
                        f"key id {key_id!r} of providers[{m.index}] ({pid}) is taken on access key "
                        f"{name} by an attached {clash.provider} key, and attached ids are unique "
                        "per access key: rename one of them in the config and run again"
                    )
            # Newest attached is tried first: attach the last policy key first, each later
            # one strictly newer, so the first policy key ends up first again.
            for step, (key_id, secret) in enumerate(reversed(keys)):
                at = (start + timedelta(microseconds=step)).strftime(_TIME_FORMAT)
                sealed = sealer.seal(attached_slot(name, key_id), secret)
                entry.attached.append(AttachedEntry(key_id, pid, at, sealed))
            lines += [f"attached {pid}/{key_id} to {name}" for key_id, _ in keys]
    return lines


# --------------------------------------------------------------------------- config text


def _replace_config(config_path: Path, old: str, new: str) -> Path:
    """Back up the config as `<config>.bak`, then replace it atomically. Returns the backup."""
    if read_config_text(config_path.absolute()) != old:
        raise UserError(
            f"{config_path} changed while migrating; the vault is updated, run migrate again"
        )
    real = Path(os.path.realpath(config_path))  # a symlinked config keeps its link
    backup = config_path.with_name(config_path.name + ".bak")
    _write_atomic(backup, old)
    _write_atomic(real, new)
    return backup


def _cut_api_keys(text: str, indexes: list[int], source: str) -> str:
    """Remove `api_keys` of the given providers from the YAML text, leaving all else as is.

    The result is parsed back and must equal the original document minus those
    keys; anything this editor cannot handle cleanly becomes a `UserError`.
    """
    cant = UserError(
        f"{source}: cannot cut the api_keys of built-in providers out of this file without "
        "disturbing the rest (anchors, merge keys?); nothing was changed. Simplify that part "
        "of the file and run again"
    )
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        raise cant from None
    providers = _mapping_value(root, "providers")
    if not isinstance(providers, yaml.SequenceNode):
        raise cant
    spans: list[tuple[int, int]] = []
    for i in indexes:
        item = providers.value[i]
        if not isinstance(item, yaml.MappingNode):
            raise cant
        for key, value in item.value:
            if isinstance(key, yaml.ScalarNode) and key.value == "api_keys":
                spans.append(_span(text, item, key, value, cant))
    out = text
    for start, end in sorted(spans, reverse=True):
        head = out[:start]
        if head.endswith(("- ", "-\t")):
            # `- api_keys: ...` on the dash line: leave a bare `-`, the entry's keys follow.
            head = head.rstrip(" \t")
        out = head + out[end:]

    expected: Any = yaml.safe_load(text)
    for i in indexes:
        expected["providers"][i].pop("api_keys", None)
    try:
        if yaml.safe_load(out) != expected:
            raise cant
    except yaml.YAMLError:
        raise cant from None
    return out


def _mapping_value(node: yaml.Node | None, name: str) -> yaml.Node | None:
    if not isinstance(node, yaml.MappingNode):
        return None
    for key, value in node.value:
        if isinstance(key, yaml.ScalarNode) and key.value == name:
            found: yaml.Node = value
            return found
    return None


def _content_end(text: str, node: yaml.Node) -> int:
    """Offset just past a node's own text.

    A block collection's end mark runs into whatever follows it, and a block
    scalar's takes its trailing blank lines: walk to the last leaf, back off spaces.
    """
    if isinstance(node, yaml.nodes.CollectionNode) and not node.flow_style and node.value:
        last = node.value[-1]
        return _content_end(text, last[1] if isinstance(node, yaml.MappingNode) else last)
    start, end = int(node.start_mark.index), int(node.end_mark.index)
    while end > start and text[end - 1] in " \t\r\n":
        end -= 1
    return end


def _span(
    text: str, parent: yaml.MappingNode, key: yaml.Node, value: yaml.Node, cant: UserError
) -> tuple[int, int]:
    """The text to delete for `key: value` inside `parent`."""
    start = int(key.start_mark.index)
    end = _content_end(text, value)
    if value.start_mark.index < key.end_mark.index or end < start:
        raise cant  # an alias (`api_keys: *keys`): the value's text lives elsewhere
    if parent.flow_style:
        # `{id: openai, api_keys: [...]}`: take the comma after it, else the one before.
        rest = text[end:]
        stripped = rest.lstrip(" \t\r\n")
        if stripped.startswith(","):
            after = stripped[1:]
            return start, len(text) - len(after.lstrip(" \t"))
        before = text[:start].rstrip(" \t\r\n")
        if before.endswith(","):
            return len(before) - 1, end
        return start, end
    line_start = text.rfind("\n", 0, start) + 1
    line_end = text.find("\n", end)
    line_end = len(text) if line_end == -1 else line_end + 1
    tail = text[end:line_end].strip()
    if tail and not tail.startswith("#"):
        raise cant
    if text[line_start:start].strip() == "":
        return line_start, line_end  # whole lines, trailing comment included
    return start, line_end - 1 if text[line_end - 1 : line_end] == "\n" else line_end


def _write_atomic(path: Path, text: str) -> None:
    try:
        atomic_write(path, text.encode())
    except OSError as exc:
        raise UserError(f"{path}: cannot write ({exc.strerror})") from None
