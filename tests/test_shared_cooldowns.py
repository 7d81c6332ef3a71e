"""What a cooldown looks like on the shared Redis, and what is refused when read back."""

from __future__ import annotations

import pytest

from sidecar.health import Outcome
from sidecar.shared.cooldowns import SharedCooldown, decode, encode, redis_key


def test_a_cooldown_round_trips_and_its_key_names_its_scope() -> None:
    pair = SharedCooldown("openai:fp1", "gpt-4o", 1_800_000_000.25, Outcome.RATE_LIMITED, 429)
    whole = SharedCooldown("openai:fp1", None, 1_800_000_300.0, Outcome.AUTH_FAILED, None)
    assert decode(encode(pair)) == pair
    assert decode(encode(whole).decode()) == whole
    assert redis_key("openai:fp1", "gpt-4o") == "sidecar:cool:openai:fp1|gpt-4o"
    assert redis_key("openai:fp1", None) == "sidecar:cool:openai:fp1"
    assert redis_key("openai:fp1", "*") == "sidecar:cool:openai:fp1|*"  # a model named `*`: not the key
    assert redis_key("openai:fp1", "") == "sidecar:cool:openai:fp1|"


@pytest.mark.parametrize(
    "raw",
    [
        b"", b"not json", b"[]", b"{}", b'{"health_id": "", "model": null, "until": 1, "reason": "rate_limited"}',
        b'{"health_id": "k", "model": 3, "until": 1, "reason": "rate_limited"}',
        b'{"health_id": "k", "model": null, "until": true, "reason": "rate_limited"}',
        b'{"health_id": "k", "model": null, "until": "1", "reason": "rate_limited"}',
        b'{"health_id": "k", "model": null, "until": 1, "reason": "bored"}',
        b'{"health_id": "k", "model": null, "until": 1, "reason": "ok", "status": "429"}',
        b'{"health_id": "k", "model": null, "until": 1, "reason": "ok", "status": false}',
        b'{"health_id": "k", "model": "' + b"m" * 3000 + b'", "until": 1, "reason": "ok"}',
    ],
)  # fmt: skip
def test_what_is_not_a_cooldown_is_ignored(raw: bytes) -> None:
    assert decode(raw) is None
