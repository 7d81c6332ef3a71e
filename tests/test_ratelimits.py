"""The rate-limit window (sidecar/ratelimits.py) on one replica, with an injected clock."""

from __future__ import annotations

import math

import pytest

from sidecar.ratelimits import (
    WINDOW_S,
    Decision,
    LimitKind,
    LocalLimiter,
    RateLimits,
    estimate_tokens,
)

T0 = 1_000_000.25  # second 1_000_000, a quarter in


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def limiter(clock: Clock) -> LocalLimiter:
    return LocalLimiter(clock)


# --------------------------------------------------------------------------- limits


def test_limits_are_falsy_only_when_unlimited() -> None:
    assert not RateLimits()
    assert RateLimits(rpm=1)
    assert RateLimits(tpm=1)


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "10"])
def test_limits_reject_non_positive_or_non_int(value: object) -> None:
    with pytest.raises(ValueError, match="rpm"):
        RateLimits(rpm=value)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tpm"):
        RateLimits(tpm=value)  # type: ignore[arg-type]


def test_estimate_is_a_quarter_of_the_body_and_at_least_one() -> None:
    assert estimate_tokens(0) == 1
    assert estimate_tokens(3) == 1
    assert estimate_tokens(400) == 100
    assert estimate_tokens(403) == 100


# --------------------------------------------------------------------------- rpm


def test_exactly_rpm_requests_then_refused_until_the_first_leaves(
    limiter: LocalLimiter, clock: Clock
) -> None:
    limits = RateLimits(rpm=3)
    for _ in range(3):
        assert limiter.admit("app", limits, 1) == Decision(True, 1_000_000)
    refused = limiter.admit("app", limits, 1)
    assert not refused.allowed
    assert refused.limit is LimitKind.RPM
    assert refused.second == 1_000_000
    # all three sit in second 1_000_000, which stops counting at 1_000_061
    assert refused.retry_after == pytest.approx(1_000_061 - T0)
    assert limiter.admit("app", limits, 1).allowed is False  # a refusal is not counted


def test_retry_after_waits_for_the_oldest_bucket_that_frees_enough(
    limiter: LocalLimiter, clock: Clock
) -> None:
    limits = RateLimits(rpm=3)
    for offset in (0, 10, 20):
        clock.now = T0 + offset
        assert limiter.admit("app", limits, 1).allowed
    clock.now = T0 + 30
    assert limiter.admit("app", limits, 1).retry_after == pytest.approx(1_000_061 - clock.now)
    clock.now = 1_000_061.0  # the first bucket has left: one slot
    assert limiter.admit("app", limits, 1).allowed
    refused = limiter.admit("app", limits, 1)
    assert refused.retry_after == pytest.approx(1_000_071 - clock.now)


def test_a_request_counts_for_between_60_and_61_seconds(
    limiter: LocalLimiter, clock: Clock
) -> None:
    limits = RateLimits(rpm=1)
    clock.now = 1_000_000.99
    assert limiter.admit("app", limits, 1).allowed
    clock.now = 1_000_060.99  # 60 s later: bucket 1_000_000 is still in the window
    refused = limiter.admit("app", limits, 1)
    assert not refused.allowed
    assert refused.retry_after == pytest.approx(0.01)
    clock.now = 1_000_061.0  # 60.01 s after the request: out
    assert limiter.admit("app", limits, 1).allowed

    clock.now = 1_000_100.0  # admitted at the very start of its second ...
    limiter2 = LocalLimiter(clock)
    assert limiter2.admit("app", limits, 1).allowed
    clock.now = 1_000_160.999  # ... it still counts 60.999 s later
    assert not limiter2.admit("app", limits, 1).allowed
    clock.now = 1_000_161.0
    assert limiter2.admit("app", limits, 1).allowed


def test_never_more_than_rpm_in_any_60_second_span(clock: Clock) -> None:
    limiter = LocalLimiter(clock)
    limits = RateLimits(rpm=5)
    admitted: list[float] = []
    for step in range(0, 3000):  # a request every 0.1 s for 300 s
        clock.now = T0 + step / 10
        if limiter.admit("app", limits, 1).allowed:
            admitted.append(clock.now)
    assert len(admitted) >= 5 * 4  # the limit does let traffic through, every ~61 s
    for i, start in enumerate(admitted):
        in_span = [t for t in admitted[i:] if t < start + WINDOW_S]
        assert len(in_span) <= 5


# --------------------------------------------------------------------------- tpm


def test_tpm_counts_the_estimate_and_names_tpm(limiter: LocalLimiter, clock: Clock) -> None:
    limits = RateLimits(tpm=100)
    assert limiter.admit("app", limits, 60).allowed
    assert limiter.admit("app", limits, 40).allowed
    refused = limiter.admit("app", limits, 1)
    assert (refused.allowed, refused.limit) == (False, LimitKind.TPM)
    assert refused.retry_after == pytest.approx(1_000_061 - T0)


def test_tpm_retry_after_waits_only_until_enough_tokens_left(
    limiter: LocalLimiter, clock: Clock
) -> None:
    limits = RateLimits(tpm=100)
    assert limiter.admit("app", limits, 30).allowed
    clock.now = T0 + 5
    assert limiter.admit("app", limits, 70).allowed
    clock.now = T0 + 10
    assert limiter.admit("app", limits, 30).retry_after == pytest.approx(1_000_061 - clock.now)
    assert limiter.admit("app", limits, 31).retry_after == pytest.approx(1_000_066 - clock.now)


def test_more_tokens_than_tpm_can_never_pass(limiter: LocalLimiter) -> None:
    refused = limiter.admit("app", RateLimits(tpm=100), 101)
    assert (refused.allowed, refused.limit, refused.retry_after) == (False, LimitKind.TPM, math.inf)
    assert limiter.admit("app", RateLimits(tpm=100), 100).allowed
    assert limiter.bucket_count() == 1


def test_settle_corrects_the_estimate_both_ways_and_never_below_zero(
    limiter: LocalLimiter, clock: Clock
) -> None:
    limits = RateLimits(tpm=100)
    first = limiter.admit("app", limits, 50)
    limiter.settle("app", first.second, 45)  # used 95, not 50
    refused = limiter.admit("app", limits, 10)
    assert (refused.allowed, refused.limit) == (False, LimitKind.TPM)
    limiter.settle("app", first.second, -90)  # used 5 after all
    assert limiter.admit("app", limits, 95).allowed
    limiter.settle("app", first.second, -1_000)  # clamped at 0: room for exactly 100
    assert limiter.admit("app", limits, 100).allowed
    assert not limiter.admit("app", limits, 1).allowed


def test_tokens_owed_for_a_bucket_out_of_the_window_count_now_and_refunds_are_dropped(
    limiter: LocalLimiter, clock: Clock
) -> None:
    """An answer that took over a minute: its bucket is gone, what it still owes is not."""
    limits = RateLimits(tpm=100)
    old = limiter.admit("app", limits, 10)
    clock.now = T0 + 61
    fresh = limiter.admit("app", limits, 40)
    assert fresh.allowed
    limiter.settle("app", old.second, -50)  # a refund for a bucket that is gone: dropped
    assert limiter.admit("app", limits, 60).allowed  # 40 + 60: full
    assert not limiter.admit("app", limits, 1).allowed
    clock.now = T0 + 61.5
    limiter.settle("app", old.second, 30)  # owed: counted in the current second
    assert not limiter.admit("app", RateLimits(tpm=130), 1).allowed
    assert limiter.admit("app", RateLimits(tpm=131), 1).allowed
    assert limiter.bucket_count() == 1
    limiter.settle("other", fresh.second, -5)  # a refund to a name never counted: nothing
    assert limiter.bucket_count() == 1


def test_requests_are_never_settled(limiter: LocalLimiter) -> None:
    limits = RateLimits(rpm=1, tpm=1_000)
    decision = limiter.admit("app", limits, 10)
    limiter.settle("app", decision.second, -10)
    assert limiter.admit("app", limits, 1).limit is LimitKind.RPM


# --------------------------------------------------------------------------- together


def test_rpm_is_named_first_when_both_refuse(limiter: LocalLimiter, clock: Clock) -> None:
    limits = RateLimits(rpm=2, tpm=100)
    assert limiter.admit("app", limits, 90).allowed
    tpm_only = limiter.admit("app", limits, 20)
    assert (tpm_only.allowed, tpm_only.limit) == (False, LimitKind.TPM)
    assert limiter.admit("app", limits, 10).allowed
    both = limiter.admit("app", limits, 20)
    assert (both.allowed, both.limit) == (False, LimitKind.RPM)


def test_retry_after_is_when_both_limits_pass(limiter: LocalLimiter, clock: Clock) -> None:
    limits = RateLimits(rpm=2, tpm=100)
    assert limiter.admit("app", limits, 90).allowed  # bucket 1_000_000
    clock.now = T0 + 20
    assert limiter.admit("app", limits, 5).allowed  # bucket 1_000_020
    clock.now = T0 + 30
    # rpm frees at 1_000_061; but 95 + 10 tokens need the 5 of bucket 1_000_020 gone too
    refused = limiter.admit("app", limits, 10)
    assert refused.limit is LimitKind.RPM
    assert refused.retry_after == pytest.approx(1_000_061 - clock.now)
    clock.now = T0 + 61
    refused = limiter.admit("app", limits, 96)
    assert refused.limit is LimitKind.TPM
    assert refused.retry_after == pytest.approx(1_000_081 - clock.now)


def test_over_tpm_alone_is_inf_even_when_rpm_refuses(limiter: LocalLimiter) -> None:
    limits = RateLimits(rpm=1, tpm=10)
    assert limiter.admit("app", limits, 1).allowed
    refused = limiter.admit("app", limits, 11)
    assert (refused.limit, refused.retry_after) == (LimitKind.RPM, math.inf)


def test_unlimited_always_passes_and_holds_nothing(limiter: LocalLimiter) -> None:
    for _ in range(1_000):
        assert limiter.admit("app", RateLimits(), 1_000_000) == Decision(True, 1_000_000)
    assert limiter.bucket_count() == 0


def test_negative_tokens_are_a_bug(limiter: LocalLimiter) -> None:
    with pytest.raises(ValueError, match="tokens"):
        limiter.admit("app", RateLimits(rpm=1), -1)


def test_names_are_counted_apart(limiter: LocalLimiter) -> None:
    limits = RateLimits(rpm=1)
    assert limiter.admit("a", limits, 1).allowed
    assert limiter.admit("b", limits, 1).allowed
    assert not limiter.admit("a", limits, 1).allowed
    assert not limiter.admit("b", limits, 1).allowed


def test_a_stricter_limit_applies_to_what_was_already_counted(limiter: LocalLimiter) -> None:
    for _ in range(3):
        assert limiter.admit("app", RateLimits(rpm=10), 1).allowed
    assert not limiter.admit("app", RateLimits(rpm=3), 1).allowed


# --------------------------------------------------------------------------- memory


def test_forget_except_drops_other_names(limiter: LocalLimiter) -> None:
    limits = RateLimits(rpm=1)
    for name in ("a", "b", "c"):
        limiter.admit(name, limits, 1)
    limiter.forget_except(["b", "gone-already"])
    assert limiter.bucket_count() == 1
    assert limiter.admit("a", limits, 1).allowed  # forgotten: counts afresh
    assert not limiter.admit("b", limits, 1).allowed


def test_forget_except_drops_stale_buckets_of_kept_names(
    limiter: LocalLimiter, clock: Clock
) -> None:
    limiter.admit("idle", RateLimits(rpm=5), 1)
    clock.now = T0 + 61
    limiter.forget_except(["idle"])
    assert limiter.bucket_count() == 0


def test_memory_does_not_grow_with_time(limiter: LocalLimiter, clock: Clock) -> None:
    limits = RateLimits(rpm=1_000_000, tpm=1_000_000_000)
    for step in range(1_000):  # ~17 minutes, 2 requests every second
        clock.now = T0 + step
        limiter.admit("app", limits, 5)
        limiter.admit("app", limits, 5)
        assert limiter.bucket_count() <= WINDOW_S + 1
    assert limiter.bucket_count() == WINDOW_S + 1


def test_a_clock_stepping_back_still_counts_the_newer_buckets(
    limiter: LocalLimiter, clock: Clock
) -> None:
    limits = RateLimits(rpm=1)
    assert limiter.admit("app", limits, 1).allowed
    clock.now = T0 - 5
    refused = limiter.admit("app", limits, 1)
    assert not refused.allowed
    assert refused.retry_after == pytest.approx(1_000_061 - clock.now)
