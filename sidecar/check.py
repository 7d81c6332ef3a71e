"""`sidecar check`: everything serving would need, verified up front, every problem listed."""

from __future__ import annotations

import os
from pathlib import Path

from sidecar.catalog import BUILTIN_PROVIDERS
from sidecar.config import load_config
from sidecar.crypto import PRIVATE_KEY_ENV, key_file_problems, load_private_key
from sidecar.errors import ConfigError, VaultError
from sidecar.runtime import build_runtime
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
    if pk is not None and not os.environ.get(PRIVATE_KEY_ENV):
        problems += key_file_problems(pk)  # listed; the rest is still checked
    try:
        opener = load_private_key(pk, check_mode=False)
    except VaultError as exc:
        return problems if str(exc) in problems else [*problems, str(exc)]
    opened, vault_problems = open_vault(doc, opener)
    problems += vault_problems
    _, runtime_problems = build_runtime(config, opened)
    problems += runtime_problems
    # Disabled providers are not built, but their references must still resolve.
    disabled = tuple(f"providers[{i}]." for i, p in enumerate(config.providers) if p.disabled)
    for path, ref in config.secret_refs():
        if path.startswith(disabled) and (ref.namespace, ref.name) not in opened.secrets:
            problems.append(f"{path}: {ref} is not in the vault")
    known = {p.id for p in config.providers} | set(BUILTIN_PROVIDERS)
    for rec in opened.access_keys:
        for a in rec.attached:
            if a.provider not in known:
                problems.append(
                    f"access_keys.{rec.name}.attached.{a.id}: provider {a.provider!r} is not configured"
                )
    return problems
