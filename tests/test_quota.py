"""Quota headers and the quota-aware key order, with an injected clock."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.quota import NEARLY_EXHAUSTED, QuotaBook, QuotaKind, Reading, parse_quota_headers

REQ, TOK = QuotaKind.REQUESTS, QuotaKind.TOKENS
NOW = 1000.0  # the book's (monotonic) clock
WALL = datetime(2026, 11, 27, 12, 0, 0, tzinfo=UTC).timestamp()


def parse(**headers: str) -> tuple[Reading, ...]:
    named = CIMultiDict((k.replace("_", "-"), v) for k, v in headers.items())
    return parse_quota_headers(CIMultiDictProxy(named), NOW, WALL)


def openai(
    remaining: str, limit: str = "100", reset: str = "1s", kind: str = "requests"
) -> dict[str, str]:
    return {
        f"x-ratelimit-remaining-{kind}": remaining,
        f"x-ratelimit-limit-{kind}": limit,
        f"x-ratelimit-reset-{kind}": reset,
    }


# --- parsing --------------------------------------------------------------


def test_no_quota_headers_no_readings() -> None:
    assert parse_quota_headers(CIMultiDict({"content-type": "application/json"}), NOW, WALL) == ()
    assert parse_quota_headers({}, NOW, WALL) == ()


def test_openai_headers_give_a_reading_per_kind() -> None:
    headers = CIMultiDict(
        {
            "X-RateLimit-Limit-Requests": "5000",
            "X-RateLimit-Remaining-Requests": "4999",
            "X-RateLimit-Reset-Requests": "12ms",
            "x-ratelimit-limit-tokens": "160000",
            "x-ratelimit-remaining-tokens": "159976",
            "x-ratelimit-reset-tokens": "6m0s",
            "x-ratelimit-remaining-tokens_usage_based": "1",
        }
    )
    assert parse_quota_headers(CIMultiDictProxy(headers), NOW, WALL) == (
        Reading(REQ, 4999, 5000, pytest.approx(NOW + 0.012)),
        Reading(TOK, 159976, 160000, NOW + 360),
    )


@pytest.mark.parametrize(
    ("reset", "seconds"),
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("59.541s", 59.541),
        ("20ms", 0.02),
        ("1h2m3s", 3723.0),
        ("2m59.56s", 179.56),
        ("1.5h", 5400.0),
        ("250us", 0.00025),
        ("0s", 0.0),
        ("7", 7.0),  # Azure: a bare number of seconds
        ("0.5", 0.5),
    ],
)
def test_openai_reset_durations(reset: str, seconds: float) -> None:
    (reading,) = parse(**openai("5", reset=reset))
    assert reading.reset_at == pytest.approx(NOW + seconds)


@pytest.mark.parametrize(
    "reset", ["", "soon", "-1s", "1d", "1s2", "s", "1 s", "9999h", "nan", "1e3s"]
)
def test_a_bad_reset_is_no_reset(reset: str) -> None:
    assert parse(**openai("5", reset=reset)) == (Reading(REQ, 5, 100, None),)


def test_openai_tokens_alone_and_missing_limit() -> None:
    assert parse(x_ratelimit_remaining_tokens="300") == (Reading(TOK, 300, None, None),)


@pytest.mark.parametrize("remaining", ["-1", "", "lots", "1.5", "1e3", "١٢", "9" * 17, "0x10"])
def test_a_bad_remaining_gives_no_reading(remaining: str) -> None:
    assert parse(**openai(remaining), **openai("7", kind="tokens")) == (
        Reading(TOK, 7, 100, NOW + 1),
    )


@pytest.mark.parametrize(
    ("limit", "expected"), [("-1", None), ("0", None), ("x", None), ("50", 50)]
)
def test_a_bad_limit_is_no_limit(limit: str, expected: int | None) -> None:
    (reading,) = parse(**openai("5", limit=limit))
    assert reading.limit == expected


def test_remaining_above_the_limit_is_capped() -> None:
    assert parse(**openai("120", limit="100"))[0].remaining == 100


def test_azure_minus_one_everywhere_is_nothing() -> None:
    assert parse(**openai("-1", limit="-1", reset="0", kind="tokens")) == ()


def anthropic(
    kind: str, remaining: str, limit: str | None, reset: str | None = None
) -> dict[str, str]:
    out = {f"anthropic-ratelimit-{kind}-remaining": remaining}
    if limit is not None:
        out[f"anthropic-ratelimit-{kind}-limit"] = limit
    if reset is not None:
        out[f"anthropic-ratelimit-{kind}-reset"] = reset
    return out


@pytest.mark.parametrize(
    ("stamp", "seconds"),
    [
        ("2026-11-27T12:00:30Z", 30.0),
        ("2026-11-27T12:00:30.250Z", 30.25),
        ("2026-11-27T13:01:00+01:00", 60.0),
        ("2026-11-27T11:00:05.5-01:00", 5.5),
        ("2026-11-27t12:00:30z", 30.0),
        ("2026-11-27T12:00:30.123456789Z", 30.123456),
        ("2026-11-27T11:59:50Z", -10.0),  # passed already
    ],
)
def test_anthropic_rfc3339_resets(stamp: str, seconds: float) -> None:
    (reading,) = parse(**anthropic("requests", "10", "50", stamp))
    assert reading == Reading(REQ, 10, 50, pytest.approx(NOW + seconds))


@pytest.mark.parametrize(
    "stamp", ["2026-11-27T12:00:30", "2026-11-27", "tomorrow", "1764244830", "2040-01-01T00:00:00Z"]
)
def test_anthropic_bad_resets_are_no_reset(stamp: str) -> None:
    assert parse(**anthropic("requests", "10", "50", stamp))[0].reset_at is None


def test_anthropic_token_kinds_make_one_reading_with_the_least_headroom() -> None:
    headers = {
        **anthropic("requests", "999", "1000", "2026-11-27T12:00:01Z"),
        **anthropic("tokens", "90000", "96000", "2026-11-27T12:00:02Z"),
        **anthropic("input-tokens", "70000", "80000", "2026-11-27T12:00:03Z"),
        **anthropic("output-tokens", "2000", "16000", "2026-11-27T12:00:04Z"),
    }
    assert parse(**headers) == (
        Reading(REQ, 999, 1000, NOW + 1),
        Reading(TOK, 2000, 16000, NOW + 4),  # 12.5 % left: less than 70000 of 80000
    )


def test_anthropic_without_limits_the_smallest_remaining_wins() -> None:
    headers = {
        **anthropic("input-tokens", "5000", None),
        **anthropic("output-tokens", "3000", "100000"),
        **anthropic("tokens", "4000", None),
    }
    assert parse(**headers) == (Reading(TOK, 3000, 100000, None),)


def test_anthropic_bad_token_headers_are_skipped() -> None:
    headers = {**anthropic("tokens", "-5", "100"), **anthropic("output-tokens", "40", "100")}
    assert parse(**headers) == (Reading(TOK, 40, 100, None),)


# --- the book -------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = NOW

    def __call__(self) -> float:
        return self.t


def reading(remaining: int, limit: int | None = 100, reset_in: float | None = 30.0,
            kind: QuotaKind = REQ) -> Reading:  # fmt: skip
    return Reading(kind, remaining, limit, None if reset_in is None else NOW + reset_in)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def book(clock: Clock) -> QuotaBook:
    return QuotaBook(clock)


def test_record_returns_the_reset_when_nothing_is_left(book: QuotaBook) -> None:
    assert book.record("k", "m", [reading(0, reset_in=20)]) == NOW + 20
    assert book.record("k", "m", [reading(1, reset_in=20)]) is None
    assert book.record("k", "m", [reading(0, reset_in=None)]) is None  # no reset: no hold
    assert book.record("k", "m", [reading(0, reset_in=-1)]) is None  # reset passed
    both = [reading(0, reset_in=5), reading(0, reset_in=9, kind=TOK)]
    assert book.record("k", "m", both) == NOW + 9  # usable when both kinds are back
    assert book.record("k", "m", []) is None


def test_nearly_exhausted_rule(book: QuotaBook) -> None:
    cases = {
        "a": reading(9),
        "b": reading(10),
        "c": reading(0, limit=None),
        "d": reading(5, limit=None),
    }
    for key, r in cases.items():
        book.record(key, "m", [r])
    assert NEARLY_EXHAUSTED == 0.1
    assert [k for k in cases if book.nearly_exhausted(k, "m")] == ["a", "c"]
    assert not book.nearly_exhausted("a", "other-model")
    assert not book.nearly_exhausted("unknown", "m")


def test_a_kind_is_replaced_and_the_other_kept(book: QuotaBook) -> None:
    book.record("k", "m", [reading(1), reading(500, limit=1000, kind=TOK)])
    book.record("k", "m", [reading(50)])
    assert book.readings("k") == [("m", reading(50)), ("m", reading(500, limit=1000, kind=TOK))]
    book.record("k", "m", [reading(10, limit=1000, kind=TOK)])
    assert book.nearly_exhausted("k", "m")  # 1 % of the tokens left


def test_readings_expire_at_their_reset(book: QuotaBook, clock: Clock) -> None:
    book.record("k", "m", [reading(0, reset_in=10)])
    clock.t = NOW + 9.9
    assert book.nearly_exhausted("k", "m")
    clock.t = NOW + 10
    assert not book.nearly_exhausted("k", "m")
    assert book.readings("k") == []
    assert book.remaining() == {}


def test_readings_without_reset_last_sixty_seconds(book: QuotaBook, clock: Clock) -> None:
    book.record("k", "m", [reading(0, reset_in=None)])
    clock.t = NOW + 59.9
    assert book.nearly_exhausted("k", "m")
    clock.t = NOW + 60
    assert not book.nearly_exhausted("k", "m")


def hid(key: str) -> str:
    return key.upper()


def test_order_puts_nearly_exhausted_keys_last_keeping_order(book: QuotaBook) -> None:
    for key in ("A", "C"):
        book.record(key, "m", [reading(1)])
    book.record("B", "m", [reading(90)])
    keys = ["a", "b", "c", "d", "e"]
    assert book.order(keys, "m", hid) == ["b", "d", "e", "a", "c"]
    assert book.order(keys, "other", hid) is keys


def test_order_returns_the_same_sequence_when_nothing_moves(book: QuotaBook, clock: Clock) -> None:
    keys: Sequence[str] = ("a", "b", "c")
    assert book.order(keys, "m", hid) is keys  # empty book
    book.record("C", "m", [reading(0)])
    assert book.order(keys, "m", hid) is keys  # the short one is last already
    book.record("B", "m", [reading(0)])
    assert book.order(keys, "m", hid) is keys
    book.record("A", "m", [reading(5, reset_in=50)])
    assert book.order(keys, "m", hid) is keys  # all short: ties keep their order
    assert book.order(["c", "a"], "m", hid) == ["c", "a"]
    book.record("A", "m", [reading(50)])
    assert book.order(["c", "a"], "m", hid) == ["a", "c"]
    clock.t = NOW + 30  # every reading's reset has come
    assert book.order(["c", "a"], "m", hid) == ["c", "a"]


def test_a_key_that_recovers_is_no_longer_moved(book: QuotaBook) -> None:
    book.record("A", "m", [reading(0)])
    assert book.order(["a", "b"], "m", hid) == ["b", "a"]
    book.record("A", "m", [reading(80)])
    keys = ["a", "b"]
    assert book.order(keys, "m", hid) is keys


def test_remaining_is_the_lowest_across_models(book: QuotaBook, clock: Clock) -> None:
    book.record("k", "m1", [reading(40), reading(9000, limit=10000, kind=TOK)])
    book.record("k", "m2", [reading(30), reading(9500, limit=10000, kind=TOK)])
    book.record("j", "m1", [reading(7, reset_in=5)])
    assert book.remaining() == {("k", REQ): 30, ("k", TOK): 9000, ("j", REQ): 7}
    clock.t = NOW + 6
    assert book.remaining() == {("k", REQ): 30, ("k", TOK): 9000}


def test_readings_are_sorted_by_model_then_kind(book: QuotaBook) -> None:
    book.record("k", "zeta", [reading(1)])
    book.record("k", "alpha", [reading(2, kind=TOK), reading(3)])
    book.record("other", "alpha", [reading(4)])
    assert book.readings("k") == [
        ("alpha", reading(3)),
        ("alpha", reading(2, kind=TOK)),
        ("zeta", reading(1)),
    ]
    assert book.readings("nobody") == []


def test_forget_except(book: QuotaBook) -> None:
    for key in ("A", "B", "C"):
        book.record(key, "m", [reading(0)])
    book.forget_except(["B", "Z"])
    assert [k for k in "ABC" if book.nearly_exhausted(k, "m")] == ["B"]
    assert book.readings("A") == []
    assert len(book) == 1
    assert book.order(["b", "a"], "m", hid) == ["a", "b"]


def test_the_book_is_bounded_dropping_the_oldest_recorded(clock: Clock) -> None:
    book = QuotaBook(clock, max_entries=3)
    for i, key in enumerate(("a", "b", "c")):
        clock.t = NOW + i
        book.record(key, "m", [reading(0, reset_in=100)])
    book.record("a", "m", [reading(0, reset_in=100)])  # recorded again: now the newest
    book.record("d", "m", [reading(0, reset_in=100)])
    assert len(book) == 3
    assert [k for k in "abcd" if book.nearly_exhausted(k, "m")] == ["a", "c", "d"]
    with pytest.raises(ValueError, match="max_entries"):
        QuotaBook(clock, max_entries=0)


def test_stale_entries_are_dropped_before_fresh_ones(clock: Clock) -> None:
    book = QuotaBook(clock, max_entries=3)
    book.record("old", "m", [reading(0, reset_in=1)])
    book.record("b", "m", [reading(0, reset_in=100)])
    book.record("c", "m", [reading(0, reset_in=100)])
    clock.t = NOW + 2
    book.record("d", "m", [reading(0, reset_in=100)])
    assert len(book) == 3
    assert [k for k in ("b", "c", "d") if book.nearly_exhausted(k, "m")] == ["b", "c", "d"]
