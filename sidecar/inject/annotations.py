"""The pod annotations the injector reads, validated where they enter.

Every value is checked before anything is built from it: names against
DNS-1123, resources against the Kubernetes quantity syntax, the image against a
bounded reference pattern. A bad value never reaches the pod: the caller
refuses to inject and says which annotation was wrong (docs/kubernetes.md#annotations).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Final

from sidecar import __version__

PREFIX: Final = "ai-gateway-sidecar/"
INJECT: Final = PREFIX + "inject"
STATUS: Final = PREFIX + "status"
CONFIG: Final = PREFIX + "config"
VAULT: Final = PREFIX + "vault"
KEY_SECRET: Final = PREFIX + "key-secret"
IMAGE: Final = PREFIX + "image"
CPU_REQUEST: Final = PREFIX + "cpu-request"
CPU_LIMIT: Final = PREFIX + "cpu-limit"
MEMORY_REQUEST: Final = PREFIX + "memory-request"
MEMORY_LIMIT: Final = PREFIX + "memory-limit"
NATIVE: Final = PREFIX + "native"
#: The value of `STATUS` on an injected pod.
INJECTED: Final = "injected"

DEFAULT_IMAGE: Final = f"ghcr.io/example/ai-gateway-sidecar:{__version__}"

# DNS-1123 subdomain: what Kubernetes accepts as a ConfigMap or Secret name.
_LABEL = r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?"
_DNS1123_SUBDOMAIN: Final = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_DNS1123_MAX: Final = 253

# An image reference (registry[:port]/path[:tag][@digest]), after the distribution grammar.
_DOMAIN_PART = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"{_DOMAIN_PART}(?:\.{_DOMAIN_PART})*(?::[0-9]{{1,5}})?"
_PATH_PART = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,128}"
_IMAGE: Final = re.compile(
    rf"(?:{_DOMAIN}/)?{_PATH_PART}(?:/{_PATH_PART})*(?::{_TAG})?(?:@{_DIGEST})?"
)
IMAGE_MAX: Final = 512

# A Kubernetes quantity without sign: digits, a fraction, then a binary or
# decimal suffix or a short decimal exponent (bounded, so parsing stays cheap).
_QUANTITY: Final = re.compile(
    r"(?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
    r"(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|[eE][+-]?[0-9]{1,2})?"
)
_QUANTITY_MAX: Final = 32
_BINARY: Final = {"Ki": 1, "Mi": 2, "Gi": 3, "Ti": 4, "Pi": 5, "Ei": 6}
_DECIMAL: Final = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15,
                   "E": 18}  # fmt: skip


@dataclass(frozen=True, slots=True)
class SidecarSettings:
    """What varies between injected sidecars: the injector's defaults, then each pod's annotations."""

    image: str = DEFAULT_IMAGE
    config_map: str = "sidecar-config"
    vault_map: str = "sidecar-vault"
    key_secret: str = "sidecar-private-key"
    cpu_request: str = "50m"
    cpu_limit: str = "500m"
    memory_request: str = "64Mi"
    memory_limit: str = "256Mi"
    native: bool = True


class AnnotationError(ValueError):
    """Annotations the injector refuses; `problems` name each one, never echo its value."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def is_dns1123_subdomain(value: str) -> bool:
    return len(value) <= _DNS1123_MAX and _DNS1123_SUBDOMAIN.fullmatch(value) is not None


def is_image(value: str) -> bool:
    return len(value) <= IMAGE_MAX and _IMAGE.fullmatch(value) is not None


def parse_quantity(value: str) -> Fraction | None:
    """The quantity's value (`500m` is 1/2, `64Mi` is 67108864), or None when it is not one."""
    match = _QUANTITY.fullmatch(value) if len(value) <= _QUANTITY_MAX else None
    if match is None:
        return None
    number = Fraction(match["number"])
    suffix = match["suffix"] or ""
    if suffix in _BINARY:
        return number * Fraction(1024) ** _BINARY[suffix]
    if suffix in _DECIMAL:
        return number * Fraction(10) ** _DECIMAL[suffix]
    return number * Fraction(10) ** int(suffix[1:])


# annotation -> (settings field, what a valid value is)
_NAMES: Final = {CONFIG: "config_map", VAULT: "vault_map", KEY_SECRET: "key_secret"}
_QUANTITIES: Final = {CPU_REQUEST: "cpu_request", CPU_LIMIT: "cpu_limit",
                      MEMORY_REQUEST: "memory_request", MEMORY_LIMIT: "memory_limit"}  # fmt: skip
#: Every annotation the injector reads or writes; another under PREFIX is a typo.
KNOWN: Final = frozenset({INJECT, STATUS, IMAGE, NATIVE, *_NAMES, *_QUANTITIES})


def settings_for(annotations: Mapping[str, str], defaults: SidecarSettings) -> SidecarSettings:
    """`defaults` overridden by the pod's annotations; AnnotationError lists every bad one."""
    problems: list[str] = []
    changes: dict[str, object] = {}
    for key in sorted(k for k in annotations if k.startswith(PREFIX) and k not in KNOWN):
        problems.append(f"annotation {_shown(key)} is not one the injector knows")
    for key, field in _NAMES.items():
        if key in annotations:
            if is_dns1123_subdomain(annotations[key]):
                changes[field] = annotations[key]
            else:
                problems.append(f"annotation {key} is not a DNS-1123 name (lowercase "
                                "letters, digits, '-' and '.', at most 253)")  # fmt: skip
    for key, field in _QUANTITIES.items():
        if key in annotations:
            amount = parse_quantity(annotations[key])
            if amount is not None and amount > 0:
                changes[field] = annotations[key]
            else:
                problems.append(f"annotation {key} is not a positive Kubernetes quantity "
                                "(e.g. 500m, 1, 256Mi)")  # fmt: skip
    if IMAGE in annotations:
        if is_image(annotations[IMAGE]):
            changes["image"] = annotations[IMAGE]
        else:
            problems.append(f"annotation {IMAGE} is not an image reference "
                            f"(registry/name:tag or @sha256:..., at most {IMAGE_MAX})")  # fmt: skip
    if NATIVE in annotations:
        if annotations[NATIVE] in ("true", "false"):
            changes["native"] = annotations[NATIVE] == "true"
        else:
            problems.append(f'annotation {NATIVE} is neither "true" nor "false"')
    if problems:
        raise AnnotationError(problems)
    settings = dataclasses.replace(defaults, **changes)  # type: ignore[arg-type]
    problems = _request_above_limit(settings)
    if problems:
        raise AnnotationError(problems)
    return settings


def _request_above_limit(s: SidecarSettings) -> list[str]:
    """The API server would refuse the pod (request > limit): refuse it here instead."""
    problems = []
    for what, request, limit in (("cpu", s.cpu_request, s.cpu_limit),
                                 ("memory", s.memory_request, s.memory_limit)):  # fmt: skip
        if (parse_quantity(request) or 0) > (parse_quantity(limit) or 0):
            problems.append(f"annotations {PREFIX}{what}-request ({request}) is above "
                            f"{PREFIX}{what}-limit ({limit})")  # fmt: skip
    return problems


def _shown(key: str) -> str:
    """An annotation key for a warning: bounded and printable (keys are not secret)."""
    text = key if key.isascii() and key.isprintable() else key.encode("ascii", "replace").decode()
    return text if len(text) <= 80 else text[:80] + "..."
