"""The wire formats a caller speaks, behind one small interface: the sidecar's own error
bodies, metering hooks (docs/reference.md#routes).

`adapter_for(format)` returns the module-level adapter of that wire format. Where a
request goes and how its key is sent is the upstream's business (`sidecar.upstreams`);
translating between formats is `sidecar.translate`'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from sidecar.formats.anthropic import ANTHROPIC
from sidecar.formats.base import Adapter
from sidecar.formats.gemini import GEMINI
from sidecar.formats.openai import OPENAI

ADAPTERS: Final[Mapping[str, Adapter]] = {
    "openai": OPENAI,
    "anthropic": ANTHROPIC,
    "gemini": GEMINI,
}


def adapter_for(fmt: str) -> Adapter:
    return ADAPTERS[fmt]


__all__ = ["ADAPTERS", "Adapter", "adapter_for"]
