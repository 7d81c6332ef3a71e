"""Provider-key lookup (docs/reference.md#provider-keys): which source's keys serve a provider for an access key.

The order is fixed: keys **attached** to the access key, else the config's
**policy** keys, else the operator's **managed** keys. The first source that
has any key for the provider is the only one used — a cooling attached key
never falls through to policy keys.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from sidecar.secret import Secret

if TYPE_CHECKING:
    from sidecar.runtime import AccessKey, Provider


class KeySource(enum.StrEnum):
    ATTACHED = "attached"
    POLICY = "policy"
    MANAGED = "managed"
    PASSTHROUGH = "passthrough"


# The members the request path reads, as module constants: on Python 3.11 `KeySource.POLICY`
# goes through the enum metaclass's `__getattr__` hook, about twenty times a global's cost.
SOURCE_ATTACHED: Final = KeySource.ATTACHED
SOURCE_POLICY: Final = KeySource.POLICY
SOURCE_MANAGED: Final = KeySource.MANAGED
SOURCE_PASSTHROUGH: Final = KeySource.PASSTHROUGH


@dataclass(frozen=True, slots=True)
class ProviderKey:
    """One usable provider key, with everything the hot path needs precomputed."""

    provider: str
    source: KeySource
    key_id: str  # non-secret: configured id, or a hash-derived one
    secret: Secret | None  # None: the provider needs no key (`auth: none`)
    health_id: str  # identity for cooldowns: survives reloads while the value is unchanged
    #: (provider, source, key_id): the metric labels, precomputed for the hot path
    labels: tuple[str, str, str] = ("", "", "")

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", (self.provider, self.source.value, self.key_id))

    def __repr__(self) -> str:
        return f"ProviderKey({self.provider}/{self.source}/{self.key_id})"


NO_KEY_ID: Final = "none"
CALLER_KEY_ID: Final = "caller"


@dataclass(frozen=True, slots=True)
class KeySelection:
    source: KeySource
    keys: tuple[ProviderKey, ...]


def select_keys(access: AccessKey, provider: Provider) -> KeySelection | None:
    """The keys to try for `provider`, in order, or None when no source has any."""
    if provider.auth == "none":
        return provider.keyless
    attached = access.attached.get(provider.id)
    if attached:
        return KeySelection(SOURCE_ATTACHED, attached)
    if provider.policy_keys:
        return KeySelection(SOURCE_POLICY, provider.policy_keys)
    if provider.managed_keys:
        return KeySelection(SOURCE_MANAGED, provider.managed_keys)
    return None
