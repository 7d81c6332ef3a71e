"""Cooldown rules (docs/reference.md#key-health), with an injected clock."""

from __future__ import annotations

import pytest

from sidecar.config import Cooldown
from sidecar.health import (
    KeyHealth,
    Outcome,
    classify_status,
    is_quota_exhausted,
    parse_retry_after,
)

CD = Cooldown(rate_limited=30, auth_failed=300, server_error=15, server_error_threshold=3)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.mark.parametrize(
    ("status", "outcome"),
    [(200, Outcome.OK), (429, Outcome.RATE_LIMITED), (401, Outcome.AUTH_FAILED), (403, Outcome.AUTH_FAILED),
     (408, Outcome.TIMEOUT), (500, Outcome.SERVER_ERROR), (529, Outcome.SERVER_ERROR),
     (400, Outcome.CLIENT_ERROR), (404, Outcome.CLIENT_ERROR), (422, Outcome.CLIENT_ERROR)],
)  # fmt: skip
def test_classify_status(status: int, outcome: Outcome) -> None:
    assert classify_status(status) is outcome


def test_rate_limit_uses_retry_after_else_default(clock: Clock) -> None:
    h = KeyHealth(clock)
    assert h.record("a", Outcome.RATE_LIMITED, CD, retry_after=7) == 1007
    assert h.record("b", Outcome.RATE_LIMITED, CD) == 1030
    clock.now = 1006.9
    assert h.cooling_until("a") == 1007
    clock.now = 1007
    assert h.cooling_until("a") is None
    assert h.cooling_until("b") == 1030


def test_quota_exhausted_and_auth_failures_cool_for_auth_failed(clock: Clock) -> None:
    h = KeyHealth(clock)
    assert h.record("q", Outcome.RATE_LIMITED, CD, retry_after=1, quota_exhausted=True) == 1300
    assert h.record("k", Outcome.AUTH_FAILED, CD) == 1300


def test_later_deadline_wins_while_cooling(clock: Clock) -> None:
    h = KeyHealth(clock)
    h.record("a", Outcome.AUTH_FAILED, CD)  # until 1300
    assert h.record("a", Outcome.RATE_LIMITED, CD, retry_after=5) == 1300
    clock.now = 1100
    assert h.record("a", Outcome.AUTH_FAILED, CD) == 1400


@pytest.mark.parametrize("outcome", [Outcome.SERVER_ERROR, Outcome.TIMEOUT, Outcome.CONNECT_ERROR])
def test_server_errors_cool_at_threshold_and_success_resets(clock: Clock, outcome: Outcome) -> None:
    h = KeyHealth(clock)
    assert h.record("a", outcome, CD) is None
    assert h.record("a", outcome, CD) is None
    h.record("a", Outcome.OK, CD)  # resets the count
    assert h.record("a", outcome, CD) is None
    assert h.record("a", outcome, CD) is None
    assert h.record("a", outcome, CD) == 1015
    assert h.cooling_until("a") == 1015


def test_client_errors_never_touch_health(clock: Clock) -> None:
    h = KeyHealth(clock)
    for _ in range(10):
        assert h.record("a", Outcome.CLIENT_ERROR, CD) is None
    assert h.cooling_until("a") is None


def test_soonest_recovery_and_forget(clock: Clock) -> None:
    h = KeyHealth(clock)
    h.record("a", Outcome.RATE_LIMITED, CD, retry_after=20)
    h.record("b", Outcome.RATE_LIMITED, CD, retry_after=5)
    assert h.soonest_recovery(["a", "b"]) == 5
    assert h.soonest_recovery(["a", "b", "c"]) is None  # c is usable now
    assert set(h.cooling()) == {"a", "b"}
    h.forget_except(["a"])
    assert set(h.cooling()) == {"a"}


def test_retry_after_and_quota_parsing() -> None:
    assert parse_retry_after("12") == 12
    assert parse_retry_after("1.5") == 1.5
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") is None
    assert parse_retry_after("-1") is None
    assert parse_retry_after(None) is None
    assert is_quota_exhausted(b'{"error":{"code":"insufficient_quota"}}')
    assert not is_quota_exhausted(b'{"error":{"code":"rate_limit_exceeded"}}')


# --------------------------------------------------------------------------- scope: key and model


def test_a_rate_limit_cools_only_that_model_on_the_key(clock: Clock) -> None:
    """Providers limit rate per model: one rate-limited model must not block the others."""
    h = KeyHealth(clock)
    assert h.record("a", Outcome.RATE_LIMITED, CD, model="gpt-4o", retry_after=5) == 1005
    assert h.cooling_until("a", "gpt-4o") == 1005
    assert h.cooling_until("a", "gpt-4o-mini") is None
    assert h.soonest_recovery(["a"], "gpt-4o-mini") is None
    assert h.soonest_recovery(["a"], "gpt-4o") == 5


def test_server_errors_count_per_model(clock: Clock) -> None:
    h = KeyHealth(clock)
    for _ in range(2):
        assert h.record("a", Outcome.SERVER_ERROR, CD, model="m1") is None
    assert h.record("a", Outcome.SERVER_ERROR, CD, model="m2") is None  # another model's count
    assert h.record("a", Outcome.SERVER_ERROR, CD, model="m1") == 1015
    assert h.cooling_until("a", "m2") is None
    h.record("a", Outcome.OK, CD, model="m2")
    assert h.cooling_until("a", "m1") == 1015


@pytest.mark.parametrize(
    ("outcome", "quota"), [(Outcome.AUTH_FAILED, False), (Outcome.RATE_LIMITED, True)]
)
def test_a_dead_key_is_dead_for_every_model(clock: Clock, outcome: Outcome, quota: bool) -> None:
    h = KeyHealth(clock)
    assert h.record("a", outcome, CD, model="m1", quota_exhausted=quota) == 1300
    for model in ("m1", "m2", ""):
        assert h.cooling_until("a", model) == 1300
    assert h.cooling() == {"a": 1300}


def test_the_gauge_shows_a_key_cooling_for_any_model_and_reloads_keep_pairs(clock: Clock) -> None:
    h = KeyHealth(clock)
    h.record("a", Outcome.RATE_LIMITED, CD, model="m1", retry_after=5)
    h.record("b", Outcome.RATE_LIMITED, CD, model="m1", retry_after=9)
    assert h.cooling() == {"a": 1005, "b": 1009}
    h.forget_except(["a"])
    assert h.cooling() == {"a": 1005}
    assert h.cooling_until("a", "m1") == 1005
