"""The documented example config is valid, and every config key is documented in the README."""

from __future__ import annotations

import re
from pathlib import Path

from sidecar.config import _PROVIDER_KEYS, _TOP_KEYS, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_example_config_parses_with_documented_values() -> None:
    cfg = load_config(ROOT / "config" / "sidecar.yaml")
    assert str(cfg.listen) == "127.0.0.1:8080"
    assert [p.id for p in cfg.providers] == ["openai", "anthropic", "ollama", "azure", "legacy-deployment"]
    assert cfg.providers[3].disabled
    assert cfg.failover.cooldown.server_error_threshold == 3
    assert set(cfg.managed) == {"openai", "anthropic"}


def test_every_config_key_is_in_the_readme_and_the_example() -> None:
    readme = (ROOT / "README.md").read_text()
    example = (ROOT / "config" / "sidecar.yaml").read_text()
    for key in sorted(_TOP_KEYS | _PROVIDER_KEYS):
        assert re.search(rf"`[^`]*\b{key}\b", readme), f"{key} missing from the README"
        assert re.search(rf"\b{key}:", example), f"{key} missing from config/sidecar.yaml"


def test_example_config_documents_connection_limits_and_client_timeouts() -> None:
    """The example shows each hardening key (#10) with its default value."""
    from sidecar.config import Limits, Timeouts

    cfg = load_config(ROOT / "config" / "sidecar.yaml")
    example = (ROOT / "config" / "sidecar.yaml").read_text()
    assert cfg.limits == Limits()
    assert cfg.timeouts == Timeouts()
    for key in ("max_connections", "client_header", "client_body", "keepalive"):
        assert re.search(rf"^\s+{key}: \S+\s+# \w", example, re.M), f"{key} undocumented"
