"""The one pattern for operator-chosen names: provider and key ids, access-key, namespace and
secret names. It keeps vault slots (`secrets/NS/NAME`, `access_keys/NAME/attached/ID`)
unambiguous, so slot binding holds."""

from __future__ import annotations

import re
from typing import Final

NAME: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
NAME_RULE: Final = "letters, digits, '.', '_' or '-' (max 64, starting with a letter or digit)"


def is_name(value: object) -> bool:
    return isinstance(value, str) and NAME.match(value) is not None
