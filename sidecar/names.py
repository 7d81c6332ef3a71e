"""The one pattern for operator-chosen names: provider and key ids, access-key, namespace and
secret names. It keeps vault slots (`secrets/NS/NAME`, `access_keys/NAME/attached/ID`)
unambiguous, so slot binding holds. And the one rule for model names, from callers and config."""

from __future__ import annotations

import re
from typing import Final

NAME: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
NAME_RULE: Final = "letters, digits, '.', '_' or '-' (max 64, starting with a letter or digit)"


def is_name(value: object) -> bool:
    return isinstance(value, str) and NAME.match(value) is not None


#: Model names are short identifiers; anything longer is not a model name.
MODEL_NAME_MAX: Final = 256


def is_model_name_text(value: str) -> bool:
    """Printable ASCII, not blank: a model name is echoed in `x-sidecar-model` and logged."""
    return value.isascii() and value.isprintable() and bool(value.strip())
