"""Cooldown rules (docs/reference.md#key-health), with an injected clock."""

from __future__ import annotations

import pytest

from sidecar.config import Cooldown
from sidecar.health import (
    KeyHealth,
    KeyState,
    Outcome,
    ScopeHealth,
    answer_status,
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


# --------------------------------------------------------------------------- model-level errors

from sidecar.health import is_model_level_error  # noqa: E402


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (400, b'{"error":{"message":"max context","type":"invalid_request_error","code":"context_length_exceeded"}}'),
        (404, b'{"error":{"message":"no","type":"invalid_request_error","code":"model_not_found"}}'),
        (400, b'{"type":"error","error":{"type":"invalid_request_error","message":"prompt is too long: 210000 tokens > 200000 maximum"}}'),
        (404, b'{"type":"error","error":{"type":"not_found_error","message":"model: claude-x"}}'),
        (422, b'{"error":{"code":"my_gateway_model_gone"}}'),
    ],
)  # fmt: skip
def test_errors_another_model_could_answer(status: int, body: bytes) -> None:
    assert is_model_level_error(status, body, frozenset({"my_gateway_model_gone"}))


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (400, b'{"error":{"message":"bad","type":"invalid_request_error","code":"content_policy_violation"}}'),
        (400, b'{"type":"error","error":{"type":"invalid_request_error","message":"Output blocked by content filtering policy"}}'),
        (429, b'{"error":{"code":"context_length_exceeded"}}'),
        (500, b'{"error":{"code":"model_not_found"}}'),
        (400, b"not json"),
        (400, b"[1]"),
        (404, b'{"type":"error","error":{"type":"not_found_error","message":"route /x"}}'),
        (422, b'{"error":{"code":"my_gateway_model_gone"}}'),
    ],
)  # fmt: skip
def test_content_policy_and_other_errors_go_back_to_the_caller(status: int, body: bytes) -> None:
    assert not is_model_level_error(status, body, frozenset())


# --------------------------------------------------------------------------- snapshot (GET /keys)


def test_snapshot_lists_an_ok_key_once_with_its_last_status(clock: Clock) -> None:
    h = KeyHealth(clock)
    h.record("a", Outcome.OK, CD, model="m1", status=200)
    h.record("a", Outcome.CLIENT_ERROR, CD, model="m2", status=404)  # no cooldown, still seen
    snap = h.snapshot(["a", "never-used"])
    assert snap.now == 1000
    assert snap.scopes == (
        ScopeHealth("a", None, KeyState.OK, None, None, 404),
        ScopeHealth("never-used", None, KeyState.OK, None, None, None),
    )


def test_snapshot_a_rate_limited_pair_cools_and_other_models_are_not_listed(clock: Clock) -> None:
    h = KeyHealth(clock)
    h.record("a", Outcome.OK, CD, model="m2", status=200)
    h.record("a", Outcome.RATE_LIMITED, CD, model="m1", retry_after=7, status=429)
    h.record("a", Outcome.OK, CD, model="m2", status=201)  # the key's last status, not the pair's
    (scope,) = h.snapshot(["a"]).scopes
    assert scope == ScopeHealth("a", "m1", KeyState.COOLING, 1007, Outcome.RATE_LIMITED, 429)
    clock.now = 1007  # expired: the key is ok again, with the key's last status
    assert h.snapshot(["a"]).scopes == (ScopeHealth("a", None, KeyState.OK, None, None, 201),)


def test_snapshot_a_dead_key_first_then_its_cooling_pairs(clock: Clock) -> None:
    h = KeyHealth(clock)
    h.record("a", Outcome.RATE_LIMITED, CD, model="m2", status=429)
    h.record("a", Outcome.SERVER_ERROR, CD, model="", status=500)  # below the threshold
    h.record("a", Outcome.AUTH_FAILED, CD, model="m1", status=401)
    assert h.snapshot(["a"]).scopes == (
        ScopeHealth("a", None, KeyState.DEAD, 1300, Outcome.AUTH_FAILED, 401),
        ScopeHealth("a", "m2", KeyState.COOLING, 1030, Outcome.RATE_LIMITED, 429),
    )


def test_snapshot_quota_exhausted_is_dead_with_reason_rate_limited(clock: Clock) -> None:
    h = KeyHealth(clock)
    h.record("a", Outcome.RATE_LIMITED, CD, model="m1", quota_exhausted=True, status=429)
    assert h.snapshot(["a"]).scopes == (
        ScopeHealth("a", None, KeyState.DEAD, 1300, Outcome.RATE_LIMITED, 429),
    )


def test_snapshot_reason_follows_the_deadline_in_force(clock: Clock) -> None:
    h = KeyHealth(clock)
    for _ in range(3):
        h.record("a", Outcome.TIMEOUT, CD, model="m")  # no status: a timeout has none
    clock.now = 1001
    h.record("a", Outcome.RATE_LIMITED, CD, model="m", retry_after=60, status=429)  # until 1061
    h.record("a", Outcome.CONNECT_ERROR, CD, model="m")  # 1/3 of a new threshold: nothing changes
    (scope,) = h.snapshot(["a"]).scopes
    assert (scope.until, scope.reason, scope.last_status) == (1061, Outcome.RATE_LIMITED, 429)


def test_snapshot_a_server_side_cooldown_without_status(clock: Clock) -> None:
    h = KeyHealth(clock)
    for _ in range(3):
        h.record("a", Outcome.CONNECT_ERROR, CD, model="m")
    assert h.snapshot(["a"]).scopes == (
        ScopeHealth("a", "m", KeyState.COOLING, 1015, Outcome.CONNECT_ERROR, None),
    )


def test_snapshot_forgets_removed_keys(clock: Clock) -> None:
    h = KeyHealth(clock)
    h.record("a", Outcome.OK, CD, status=200)
    h.forget_except([])
    assert h.snapshot(["a"]).scopes == (ScopeHealth("a", None, KeyState.OK, None, None, None),)


# --------------------------------------------------------------------------- trying the same candidate again

from sidecar.config import Retry  # noqa: E402
from sidecar.health import same_candidate_wait  # noqa: E402

RETRY = Retry(attempts=1, backoff=0.25, max_wait=3.0)


@pytest.mark.parametrize("outcome", [Outcome.SERVER_ERROR, Outcome.CONNECT_ERROR])
@pytest.mark.parametrize("jitter", [0.0, 0.5, 0.999])
def test_a_passing_failure_is_tried_again_after_a_jittered_backoff(
    outcome: Outcome, jitter: float
) -> None:
    wait = same_candidate_wait(outcome, None, False, RETRY, jitter)
    assert wait is not None
    assert 0.25 <= wait < 0.375  # never sooner than the backoff: no hammering


def test_a_short_retry_after_is_waited_out_and_a_long_one_is_not() -> None:
    assert same_candidate_wait(Outcome.RATE_LIMITED, 2.0, False, RETRY, 0.3) == 2.0
    assert same_candidate_wait(Outcome.RATE_LIMITED, 3.0, False, RETRY, 0.3) == 3.0
    assert same_candidate_wait(Outcome.RATE_LIMITED, 3.5, False, RETRY, 0.3) is None
    assert same_candidate_wait(Outcome.RATE_LIMITED, None, False, RETRY, 0.3) is None
    assert same_candidate_wait(Outcome.RATE_LIMITED, 1.0, True, RETRY, 0.3) is None  # quota


@pytest.mark.parametrize(
    "outcome", [Outcome.TIMEOUT, Outcome.AUTH_FAILED, Outcome.CLIENT_ERROR, Outcome.OK]
)
def test_silence_and_dead_keys_are_not_tried_again(outcome: Outcome) -> None:
    assert same_candidate_wait(outcome, 1.0, False, RETRY, 0.3) is None


# --------------------------------------------------------------------------- Gemini and Azure signals

import orjson  # noqa: E402
from multidict import CIMultiDict  # noqa: E402

from sidecar.health import retry_after_of  # noqa: E402


def gemini_429(message: str, *quota_ids: str, retry: str | None = None) -> bytes:
    """A 429 as the Gemini API sends it (pretty-printed google.rpc.Status)."""
    details: list[dict[str, object]] = []
    if quota_ids:
        violations = [{"quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests",
                       "quotaId": q, "quotaDimensions": {"location": "global", "model": "gemini-2.5-pro"}}
                      for q in quota_ids]  # fmt: skip
        details.append({"@type": "type.googleapis.com/google.rpc.QuotaFailure",
                        "violations": violations})  # fmt: skip
    details.append({"@type": "type.googleapis.com/google.rpc.Help",
                    "links": [{"description": "Learn more", "url": "https://ai.google.dev/"}]})  # fmt: skip
    if retry is not None:
        details.append({"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": retry})
    err = {"code": 429, "message": message, "status": "RESOURCE_EXHAUSTED", "details": details}
    return orjson.dumps({"error": err}, option=orjson.OPT_INDENT_2)


EXCEEDED = ("You exceeded your current quota, please check your plan and billing details. For more "
            "information on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits.")  # fmt: skip
PER_MINUTE = "GenerateRequestsPerMinutePerProjectPerModel-FreeTier"
PER_DAY = "GenerateRequestsPerDayPerProjectPerModel-FreeTier"


@pytest.mark.parametrize(
    ("body", "exhausted"),
    [
        (gemini_429(EXCEEDED, PER_DAY), True),
        (gemini_429(EXCEEDED, PER_MINUTE, PER_DAY), True),  # the day's quota is gone too
        (gemini_429("Quota exceeded.", "GenerateContentInputTokensPerModelPerDay"), True),
        (gemini_429(EXCEEDED, PER_MINUTE), False),  # per minute: a plain rate limit
        (gemini_429(EXCEEDED, PER_MINUTE, "GenerateContentInputTokensPerModelPerMinute-FreeTier"), False),
        (gemini_429(EXCEEDED), True),  # no QuotaFailure: the message says billing
        (gemini_429("Resource has been exhausted (e.g. check quota)."), False),
        (b'{"error": {"code": 429, "status": "RESOURCE_EXHAUSTED"}}', False),
        (b"RESOURCE_EXHAUSTED", False),
        # Azure OpenAI / OpenAI
        (b'{"error":{"code":"insufficient_quota","message":"You exceeded your current quota, please check your plan and billing details."}}', True),
        (b'{"error":{"code":"429","message":"You exceeded your current quota, please check your plan."}}', True),
        (b'{"error":{"code":"429","message":"Requests to the ChatCompletions_Create Operation under Azure OpenAI API version 2024-10-21 have exceeded token rate limit of your current OpenAI S0 pricing tier. Please retry after 6 seconds."}}', False),
        (b'{"error":{"code":"billing_hard_limit_reached"}}', True),
    ],
)  # fmt: skip
def test_quota_exhausted_by_provider(body: bytes, exhausted: bool) -> None:
    assert is_quota_exhausted(body) is exhausted


@pytest.mark.parametrize(
    ("headers", "body", "seconds"),
    [
        ({"retry-after": "7"}, b"", 7.0),
        ({"Retry-After": "7", "retry-after-ms": "250"}, b"", 7.0),  # the header wins
        ({"retry-after-ms": "250"}, b"", 0.25),  # Azure
        ({"retry-after-ms": "1500.5"}, b"", 1.5005),
        ({"retry-after-ms": "soon"}, b"", None),
        ({"retry-after-ms": "-5"}, b"", None),
        ({}, gemini_429(EXCEEDED, PER_MINUTE, retry="34s"), 34.0),
        ({}, gemini_429(EXCEEDED, PER_MINUTE, retry="1.5s"), 1.5),
        ({"retry-after": "3"}, gemini_429(EXCEEDED, retry="34s"), 3.0),
        ({"retry-after": "a date"}, gemini_429(EXCEEDED, retry="34s"), 34.0),
        ({}, gemini_429(EXCEEDED, retry="34"), None),  # not a Duration
        ({}, gemini_429(EXCEEDED, retry="xs"), None),
        ({}, gemini_429(EXCEEDED, retry="100000s"), None),  # beyond a day
        ({}, gemini_429(EXCEEDED), None),
        ({}, b'{"error": "RetryInfo"}', None),
        ({}, b"RetryInfo but not json", None),
        ({}, b"", None),
    ],
)
def test_retry_after_of(headers: dict[str, str], body: bytes, seconds: float | None) -> None:
    assert retry_after_of(CIMultiDict(headers), body) == seconds


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (400, orjson.dumps({"error": {"code": 400, "status": "INVALID_ARGUMENT",
                                      "message": "The input token count (1234567) exceeds the maximum number of tokens allowed (1048576)."}})),
        (404, orjson.dumps({"error": {"code": 404, "status": "NOT_FOUND",
                                      "message": "models/gemini-9-ultra is not found for API version v1beta, or is not supported for generateContent. Call ListModels to see the list of available models and their supported methods."}})),
        (404, b'[{"error": {"code": 404, "status": "NOT_FOUND", "message": "models/gemini-x is not found for API version v1"}}]'),
        (404, b'{"error":{"code":"DeploymentNotFound","message":"The API deployment for this resource does not exist."}}'),
    ],
)  # fmt: skip
def test_gemini_and_azure_errors_another_model_could_answer(status: int, body: bytes) -> None:
    assert is_model_level_error(status, body, frozenset())


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (400, orjson.dumps({"error": {"code": 400, "status": "INVALID_ARGUMENT",
                                      "message": "Request contains an invalid argument."}})),
        (400, orjson.dumps({"error": {"code": 400, "status": "FAILED_PRECONDITION",
                                      "message": "User location is not supported for the API use."}})),
        (404, orjson.dumps({"error": {"code": 404, "status": "NOT_FOUND",
                                      "message": "Requested entity was not found."}})),
        (429, orjson.dumps({"error": {"code": 429, "status": "RESOURCE_EXHAUSTED",
                                      "message": "The input token count exceeds the maximum"}})),
    ],
)  # fmt: skip
def test_other_gemini_errors_go_back_to_the_caller(status: int, body: bytes) -> None:
    assert not is_model_level_error(status, body, frozenset())


_BAD_KEY_INFO = {"@type": "type.googleapis.com/google.rpc.ErrorInfo",
                 "reason": "API_KEY_INVALID", "domain": "googleapis.com"}  # fmt: skip


def _google_400(message: str, details: list[object]) -> bytes:
    return orjson.dumps({"error": {"code": 400, "message": message, "status": "INVALID_ARGUMENT",
                                   "details": details}})  # fmt: skip


def test_googles_invalid_key_answer_stands_for_a_401() -> None:
    assert answer_status(400, _google_400("API key not valid.", [_BAD_KEY_INFO])) == 401


@pytest.mark.parametrize(
    "body",
    [
        # Google's 400 quotes unknown request fields back: a caller cannot make it a bad key.
        _google_400(
            'Invalid JSON payload received. Unknown name "API_KEY_INVALID": Cannot find field.',
            [],
        ),
        _google_400("x", [{**_BAD_KEY_INFO, "domain": "evil.example"}]),
        _google_400("x", [{**_BAD_KEY_INFO, "@type": "type.googleapis.com/other"}]),
        b'{"error": {"message": "API_KEY_INVALID"}}',
        b"API_KEY_INVALID",
    ],
)
def test_anything_else_that_mentions_api_key_invalid_stays_a_400(body: bytes) -> None:
    assert answer_status(400, body) == 400


def test_only_a_400_is_reread() -> None:
    assert answer_status(403, _google_400("API key not valid.", [_BAD_KEY_INFO])) == 403


def test_hold_keeps_the_later_deadline_and_tells_the_listener_unless_told_not_to(
    clock: Clock,
) -> None:
    h = KeyHealth(clock)
    told: list[tuple[str, str | None, float, Outcome, int | None]] = []
    h.on_cooldown = lambda *a: told.append(a)
    h.hold("k", "m", 1030.0, Outcome.RATE_LIMITED, 200)
    assert h.cooling_until("k", "m") == 1030.0
    assert h.cooling_until("k", "other") is None
    h.hold("k", "m", 1010.0, Outcome.RATE_LIMITED)  # shorter: kept as it was, nobody told
    h.hold("k", None, 1100.0, Outcome.AUTH_FAILED, 401, share=False)  # another replica's
    assert h.cooling_until("k", "other") == 1100.0
    assert told == [("k", "m", 1030.0, Outcome.RATE_LIMITED, 200)]
    assert sorted(h.active(), key=str) == sorted(
        [("k", "m", 1030.0, Outcome.RATE_LIMITED, 200), ("k", None, 1100.0, Outcome.AUTH_FAILED, 401)],
        key=str,
    )
    clock.now = 1050.0
    assert h.active() == [("k", None, 1100.0, Outcome.AUTH_FAILED, 401)]


def test_record_tells_the_listener_of_each_cooldown_with_its_scope(clock: Clock) -> None:
    h = KeyHealth(clock)
    told: list[tuple[str, str | None, float, Outcome, int | None]] = []
    h.on_cooldown = lambda *a: told.append(a)
    h.record("k", Outcome.RATE_LIMITED, CD, model="m", retry_after=5, status=429)
    h.record("k", Outcome.RATE_LIMITED, CD, model="m", retry_after=1, status=429)  # not further
    h.record("k", Outcome.AUTH_FAILED, CD, model="m", status=401)  # the whole key
    for _ in range(CD.server_error_threshold - 1):
        h.record("j", Outcome.SERVER_ERROR, CD, model="m", status=500)
    assert len(told) == 2  # below the threshold nothing cools
    h.record("j", Outcome.SERVER_ERROR, CD, model="m", status=500)
    assert told == [
        ("k", "m", 1005.0, Outcome.RATE_LIMITED, 429),
        ("k", None, 1300.0, Outcome.AUTH_FAILED, 401),
        ("j", "m", 1015.0, Outcome.SERVER_ERROR, 500),
    ]
