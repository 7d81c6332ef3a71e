"""Secret values that cannot be printed by accident.

A `Secret` holds a decrypted provider key, access key or private key. Its
`repr`/`str` are masked; only `reveal()` hands out the value, and only the
code that puts it on the wire (or seals it) should call that.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from typing import Final

#: Request/response headers whose values are credentials. Never logged, never forwarded.
SENSITIVE_HEADERS: Final = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "x-api-key",
        "api-key",
        "x-goog-api-key",
        "cookie",
        "set-cookie",
    }
)

_MASK: Final = "**********"


def fingerprint(value: str | bytes) -> str:
    """A stable, non-reversible id for a secret (12 hex chars of SHA-256).

    Used where logs, metrics or headers must correlate a key without showing
    any part of it.
    """
    data = value.encode() if isinstance(value, str) else value
    return hashlib.sha256(b"sidecar-key-id\x00" + data).hexdigest()[:12]


class Secret:
    """A string that only shows itself through `reveal()`."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def fingerprint(self) -> str:
        return fingerprint(self._value)

    def __repr__(self) -> str:
        return f"Secret('{_MASK}')"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("Secret values are not picklable")


#: Key-shaped text in a provider's error wording: OpenAI/Anthropic `sk-…` (masked or not),
#: Google `AIza…`, Groq `gsk_…`, xAI `xai-…`, and any run around `***` masking.
_KEY_SHAPED: Final = re.compile(
    rb"(?:sk|pk|rk)-[A-Za-z0-9_\-*]{3,}|AIza[0-9A-Za-z_\-]{8,}|gsk_[A-Za-z0-9]{8,}"
    # The lookbehind starts a masked run only at a run's start: without it, a long run with
    # no `***` is retried at every position (quadratic time on an upstream's body).
    rb"|xai-[A-Za-z0-9]{8,}|(?<![A-Za-z0-9_\-])[A-Za-z0-9_\-]*\*{3,}[A-Za-z0-9_\-]*"
)


def mask_key_fragments(body: bytes, secrets: Iterable[Secret] = ()) -> bytes:
    """An upstream auth-error body with every key-shaped fragment replaced by `***`.

    OpenAI's 401 wording quotes a masked fragment of the key it was sent; relayed
    as is, that fragment would reach the application the key is kept from.
    """
    for secret in secrets:
        value = secret.reveal().encode()
        if value:
            body = body.replace(value, b"***")
    return _KEY_SHAPED.sub(b"***", body)
