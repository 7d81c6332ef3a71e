"""`sidecar check`: everything serving would need, verified up front, every problem listed."""

from __future__ import annotations

import os
from pathlib import Path

from sidecar.config import load_config
from sidecar.crypto import PRIVATE_KEY_ENV, Opener, key_file_problems, load_private_key
from sidecar.errors import ConfigError, VaultError
from sidecar.runtime import build_runtime
from sidecar.secret import Secret
from sidecar.vault import open_vault, read_vault


def run_check(config_path: Path) -> list[str]:
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        return list(exc.problems)
    problems: list[str] = []
    try:
        doc = read_vault(config.vault.path)
    except VaultError as exc:
        return [str(exc)]
    pk = config.vault.private_key_file
    try:
        if pk is not None and not os.environ.get(PRIVATE_KEY_ENV):
            # A loose mode is a problem to list, not a reason to stop checking the rest.
            problems += key_file_problems(pk)
            opener = Opener(Secret(pk.read_text(encoding="ascii").strip()))
        else:
            opener = load_private_key(pk)
    except (OSError, UnicodeDecodeError):
        return [*problems, f"{pk}: cannot read private key file"]
    except VaultError as exc:
        return [*problems, str(exc)]
    opened, vault_problems = open_vault(doc, opener)
    problems += vault_problems
    _, runtime_problems = build_runtime(config, opened)
    problems += runtime_problems
    for p in (
        config.providers
    ):  # disabled providers are not built, but their references must still resolve
        if p.disabled:
            i = config.providers.index(p)
            for path, ref in config.secret_refs():
                if (
                    path.startswith(f"providers[{i}].")
                    and (ref.namespace, ref.name) not in opened.secrets
                ):
                    problems.append(f"{path}: {ref} is not in the vault")
    known = {p.id for p in config.providers} | {"openai", "anthropic"}
    for rec in opened.access_keys:
        for a in rec.attached:
            if a.provider not in known:
                problems.append(
                    f"access_keys.{rec.name}.attached.{a.id}: provider {a.provider!r} is not configured"
                )
    return problems
