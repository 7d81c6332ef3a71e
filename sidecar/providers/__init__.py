"""Per-format behaviour behind one small interface: error bodies, metering hooks.

`adapter_for(format)` returns the module-level adapter of that wire format.
Auth injection depends on each provider's `auth:` setting, not its format,
and lives in `auth_header`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from sidecar.providers.anthropic import ANTHROPIC
from sidecar.providers.base import Adapter, auth_header
from sidecar.providers.gemini import GEMINI
from sidecar.providers.openai import OPENAI

ADAPTERS: Final[Mapping[str, Adapter]] = {
    "openai": OPENAI,
    "anthropic": ANTHROPIC,
    "gemini": GEMINI,
}


def adapter_for(fmt: str) -> Adapter:
    return ADAPTERS[fmt]


__all__ = ["ADAPTERS", "Adapter", "adapter_for", "auth_header"]
