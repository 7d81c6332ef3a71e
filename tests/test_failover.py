"""The failover engine: every rule of docs/reference.md#failover-and-key-health, with an
injected clock and jitter — no sockets, no sleeps."""

from __future__ import annotations

from dataclasses import replace

import pytest

from sidecar.config import Cooldown, Failover, Retry
from sidecar.failover import Attempt, Engine, Report, Stop, StopReason
from sidecar.health import KeyHealth, Outcome
from sidecar.keys import KeySource, ProviderKey
from sidecar.models import ResolvedModel
from sidecar.plan import Candidate
from sidecar.runtime import Provider
from sidecar.secret import Secret

PROVIDER = Provider(
    id="openai", format="openai", auth="bearer", base_url="http://127.0.0.1:9/v1",
    builtin=True, configured=True, models=frozenset(), headers=(), query="",
    policy_keys=(), managed_keys=(), keyless=None,
)  # fmt: skip


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def key(name: str, source: KeySource = KeySource.POLICY) -> ProviderKey:
    return ProviderKey("openai", source, name, Secret(f"sk-{name}"), f"hid-{name}")


def cand(key_name: str, model: str, source: KeySource = KeySource.POLICY) -> Candidate:
    return Candidate(PROVIDER, ResolvedModel(model, PROVIDER, model), key(key_name, source))


def engine(
    candidates: list[Candidate],
    *,
    policy: Failover | None = None,
    total: float = 900.0,
    jitter: float = 0.0,
) -> tuple[Engine, KeyHealth, Clock]:
    clock = Clock()
    health = KeyHealth(clock)
    eng = Engine(candidates, policy or Failover(), health, clock.now + total,
                 clock=clock, jitter=lambda: jitter)  # fmt: skip
    return eng, health, clock


def attempt(eng: Engine) -> Attempt:
    step = eng.next()
    assert isinstance(step, Attempt), step
    return step


def who(step: Attempt) -> tuple[str, str]:
    c = step.candidate
    assert c.model is not None
    return c.key.key_id, c.model.upstream


def stop(eng: Engine) -> StopReason:
    step = eng.next()
    assert isinstance(step, Stop), step
    return step.reason


# -- answers ---------------------------------------------------------------------


def test_a_candidates_upstream_model_follows_its_model() -> None:
    c = cand("k1", "gpt-4o-mini")
    assert c.upstream_model == "gpt-4o-mini"
    other = replace(c, model=ResolvedModel("gpt-4o", PROVIDER, "gpt-4o-2024"))
    assert other.upstream_model == "gpt-4o-2024"
    assert replace(c, model=None).upstream_model is None
    assert replace(c, key=key("k2")) == Candidate(PROVIDER, c.model, key("k2"))


def test_a_success_is_final_and_nothing_follows() -> None:
    eng, health, _ = engine([cand("k1", "a"), cand("k2", "a")])
    first = attempt(eng)
    assert (first.number, first.wait, first.failover_from, first.retry) == (1, 0.0, None, False)
    assert eng.report(Report(Outcome.OK, 200, final=True)).final
    assert stop(eng) is StopReason.ANSWERED
    assert health.cooling() == {}


def test_a_status_that_does_not_fail_over_is_final() -> None:
    eng, _health, _ = engine([cand("k1", "a"), cand("k2", "a")])
    attempt(eng)
    assert eng.report(Report(Outcome.CLIENT_ERROR, 400, final=True)).final
    assert stop(eng) is StopReason.ANSWERED


# -- the same candidate again ------------------------------------------------------


@pytest.mark.parametrize("outcome", [Outcome.SERVER_ERROR, Outcome.CONNECT_ERROR])
def test_a_passing_fault_is_retried_once_on_the_same_candidate_after_a_backoff(
    outcome: Outcome,
) -> None:
    eng, _, _ = engine([cand("k1", "a"), cand("k2", "a")], jitter=1.0)
    attempt(eng)
    assert not eng.report(Report(outcome, 503 if outcome is Outcome.SERVER_ERROR else None)).final
    again = attempt(eng)
    assert who(again) == ("k1", "a")
    assert again.retry
    assert again.wait == pytest.approx(0.375)  # 250 ms, jittered up to 1.5x, never below
    assert again.failover_from is None  # a retry is not a failover
    eng.report(Report(outcome))
    nxt = attempt(eng)
    assert who(nxt) == ("k2", "a")
    assert nxt.failover_from == ("openai", outcome.value)
    assert not nxt.retry
    assert nxt.wait == 0.0
    eng.report(Report(outcome))
    assert attempt(eng).candidate.key.key_id == "k2"  # its own retry: the budget is per candidate


def test_the_backoff_is_never_shorter_than_configured() -> None:
    eng, _, _ = engine([cand("k1", "a")], jitter=0.0)
    attempt(eng)
    eng.report(Report(Outcome.SERVER_ERROR, 500))
    assert attempt(eng).wait == pytest.approx(0.25)


def test_a_timeout_moves_on_at_once() -> None:
    eng, _, _ = engine([cand("k1", "a"), cand("k2", "a")])
    attempt(eng)
    eng.report(Report(Outcome.TIMEOUT))
    nxt = attempt(eng)
    assert who(nxt) == ("k2", "a")
    assert nxt.wait == 0.0


def test_retry_attempts_zero_turns_it_off() -> None:
    policy = Failover(retry=Retry(attempts=0))
    eng, _, _ = engine([cand("k1", "a"), cand("k2", "a")], policy=policy)
    attempt(eng)
    eng.report(Report(Outcome.SERVER_ERROR, 500))
    assert who(attempt(eng)) == ("k2", "a")


def test_a_short_retry_after_is_waited_out_without_cooling() -> None:
    eng, health, _ = engine([cand("k1", "a"), cand("k2", "a")])
    attempt(eng)
    eng.report(Report(Outcome.RATE_LIMITED, 429, retry_after=2.0))
    again = attempt(eng)
    assert who(again) == ("k1", "a")
    assert again.wait == 2.0
    assert health.cooling() == {}


def test_a_long_retry_after_cools_the_pair_and_moves_on() -> None:
    eng, health, clock = engine([cand("k1", "a"), cand("k2", "a")])
    attempt(eng)
    verdict = eng.report(Report(Outcome.RATE_LIMITED, 429, retry_after=10.0))
    assert verdict.cooled_until == clock.now + 10.0
    assert who(attempt(eng)) == ("k2", "a")
    assert health.cooling_until("hid-k1", "a") == clock.now + 10.0


def test_a_429_without_retry_after_cools_and_moves_on() -> None:
    eng, health, clock = engine([cand("k1", "a"), cand("k2", "a")])
    attempt(eng)
    eng.report(Report(Outcome.RATE_LIMITED, 429))
    assert who(attempt(eng)) == ("k2", "a")
    assert health.cooling_until("hid-k1", "a") == clock.now + Cooldown().rate_limited


def test_no_wait_that_would_outlast_the_total() -> None:
    eng, _, clock = engine([cand("k1", "a"), cand("k2", "a")], total=2.0)
    attempt(eng)
    clock.now += 0.5
    eng.report(Report(Outcome.RATE_LIMITED, 429, retry_after=3.0))  # max_wait allows, the total not
    assert who(attempt(eng)) == ("k2", "a")


# -- cooldown scope ------------------------------------------------------------------


def test_a_rate_limited_model_does_not_block_another_model_on_the_same_key() -> None:
    eng, health, _ = engine([cand("k1", "a"), cand("k1", "b")])
    attempt(eng)
    eng.report(Report(Outcome.RATE_LIMITED, 429))
    assert who(attempt(eng)) == ("k1", "b")
    assert health.cooling_until("hid-k1", "b") is None


def test_a_dead_key_is_dead_for_every_model() -> None:
    eng, _, _ = engine([cand("k1", "a"), cand("k1", "b"), cand("k2", "b")])
    attempt(eng)
    eng.report(Report(Outcome.AUTH_FAILED, 401))
    assert who(attempt(eng)) == ("k2", "b")


def test_an_exhausted_quota_kills_the_key_and_is_not_waited_out() -> None:
    eng, health, clock = engine([cand("k1", "a"), cand("k1", "b"), cand("k2", "b")])
    attempt(eng)
    eng.report(Report(Outcome.RATE_LIMITED, 429, retry_after=1.0, quota=True))
    assert who(attempt(eng)) == ("k2", "b")
    assert health.cooling_until("hid-k1", "zzz") == clock.now + Cooldown().auth_failed


def test_server_errors_cool_the_pair_at_the_threshold() -> None:
    policy = Failover(retry=Retry(attempts=0), cooldown=Cooldown(server_error_threshold=2))
    eng, health, _ = engine([cand("k1", "a"), cand("k1", "a"), cand("k1", "b")], policy=policy)
    attempt(eng)
    assert eng.report(Report(Outcome.SERVER_ERROR, 500)).cooled_until is None
    attempt(eng)
    assert eng.report(Report(Outcome.SERVER_ERROR, 500)).cooled_until is not None
    assert health.cooling_until("hid-k1", "a") is not None
    assert health.cooling_until("hid-k1", "b") is None


def test_a_caller_key_has_no_shared_health() -> None:
    eng, health, _ = engine([cand("caller", "a", KeySource.PASSTHROUGH)])
    attempt(eng)
    eng.report(Report(Outcome.AUTH_FAILED, 401))
    assert health.cooling() == {}


# -- model-level errors ------------------------------------------------------------


def test_a_model_level_error_skips_every_key_of_that_model_without_cooling() -> None:
    eng, health, _ = engine([cand("k1", "a"), cand("k2", "a"), cand("k1", "b")])
    attempt(eng)
    assert not eng.report(Report(Outcome.CLIENT_ERROR, 400, model_level=True)).final
    nxt = attempt(eng)
    assert who(nxt) == ("k1", "b")
    assert nxt.failover_from == ("openai", "client_error")
    assert health.cooling() == {}


def test_a_model_level_error_with_no_other_model_goes_back_to_the_caller() -> None:
    eng, _, _ = engine([cand("k1", "a"), cand("k2", "a")])
    attempt(eng)
    assert eng.report(Report(Outcome.CLIENT_ERROR, 400, model_level=True)).final
    assert stop(eng) is StopReason.ANSWERED


# -- bounds --------------------------------------------------------------------------


def test_never_more_than_max_attempts() -> None:
    policy = Failover(max_attempts=3)
    eng, _, _ = engine([cand(f"k{i}", "a") for i in range(6)], policy=policy)
    for _ in range(3):
        attempt(eng)
        eng.report(Report(Outcome.SERVER_ERROR, 500))
    assert stop(eng) is StopReason.MAX_ATTEMPTS
    assert eng.attempts == 3


def test_nothing_after_the_total() -> None:
    eng, _, clock = engine([cand("k1", "a"), cand("k2", "a")], total=5.0)
    first = attempt(eng)
    assert first.budget == pytest.approx(5.0)
    clock.now += 5.0
    eng.report(Report(Outcome.TIMEOUT))
    assert stop(eng) is StopReason.TIMED_OUT


def test_an_attempt_that_ran_into_the_total_stops_the_request() -> None:
    eng, _, _ = engine([cand("k1", "a"), cand("k2", "a")])
    attempt(eng)
    eng.report(Report(Outcome.TIMEOUT, timed_out=True))
    assert stop(eng) is StopReason.TIMED_OUT


def test_every_candidate_failing_exhausts_the_plan() -> None:
    policy = Failover(retry=Retry(attempts=0))
    eng, _, _ = engine([cand("k1", "a"), cand("k2", "a")], policy=policy)
    for _ in range(2):
        attempt(eng)
        eng.report(Report(Outcome.SERVER_ERROR, 502))
    assert stop(eng) is StopReason.EXHAUSTED


def test_the_budget_is_what_remains_after_the_wait() -> None:
    eng, _, clock = engine([cand("k1", "a")], total=10.0, jitter=0.0)
    attempt(eng)
    clock.now += 4.0
    eng.report(Report(Outcome.SERVER_ERROR, 500))
    again = attempt(eng)
    assert again.budget == pytest.approx(10.0 - 4.0 - 0.25)


# -- resuming a stream -----------------------------------------------------------------


def test_accept_narrows_the_candidates() -> None:
    eng, _, _ = engine([cand("k1", "a"), cand("k1", "b"), cand("k1", "c")])
    attempt(eng)
    eng.report(Report(Outcome.TIMEOUT, 200))
    nxt = eng.next(accept=lambda c: c.model is not None and c.model.upstream == "c")
    assert isinstance(nxt, Attempt)
    assert who(nxt) == ("k1", "c")


def test_a_retry_of_an_unacceptable_candidate_is_skipped() -> None:
    eng, _, _ = engine([cand("k1", "a"), cand("k1", "b")])
    attempt(eng)
    eng.report(Report(Outcome.CONNECT_ERROR, 200))  # would retry k1/a
    nxt = eng.next(accept=lambda c: c.model is not None and c.model.upstream == "b")
    assert isinstance(nxt, Attempt)
    assert who(nxt) == ("k1", "b")
    assert not nxt.retry


def test_an_unsuitable_candidate_is_passed_over_without_touching_its_health() -> None:
    policy = Failover(cooldown=Cooldown(server_error_threshold=1))
    eng, health, _ = engine([cand("k1", "a"), cand("k2", "a"), cand("k1", "b")], policy=policy)
    attempt(eng)
    eng.report(Report(Outcome.CLIENT_ERROR, 400, unsuitable=True))
    assert who(attempt(eng)) == ("k1", "b")  # not k2/a: that model refuses on every key
    assert health.cooling() == {}


def test_report_needs_an_attempt() -> None:
    eng, _, _ = engine([cand("k1", "a")])
    with pytest.raises(AssertionError):
        eng.report(Report(Outcome.OK, final=True))


def test_policy_is_the_config_dataclass() -> None:
    # The engine reads the same frozen `Failover` the config loader builds.
    policy = replace(Failover(), max_attempts=1)
    eng, _, _ = engine([cand("k1", "a"), cand("k2", "a")], policy=policy)
    attempt(eng)
    eng.report(Report(Outcome.SERVER_ERROR, 500))
    assert stop(eng) is StopReason.MAX_ATTEMPTS


def test_no_retry_of_a_pair_this_fault_just_cooled() -> None:
    policy = Failover(cooldown=Cooldown(server_error_threshold=1))
    eng, _, _ = engine([cand("k1", "a"), cand("k2", "a")], policy=policy)
    attempt(eng)
    assert eng.report(Report(Outcome.SERVER_ERROR, 503)).cooled_until is not None
    assert who(attempt(eng)) == ("k2", "a")


def test_a_candidate_after_a_refused_retry_still_gets_its_own_retry() -> None:
    eng, _, _ = engine([cand("k1", "a"), cand("k1", "b")])
    attempt(eng)
    eng.report(Report(Outcome.CONNECT_ERROR, 200))  # k1/a would be retried...
    only_b = lambda c: c.model is not None and c.model.upstream == "b"  # noqa: E731
    step = eng.next(accept=only_b)  # ...but it takes no prefill: k1/b instead
    assert isinstance(step, Attempt)
    eng.report(Report(Outcome.SERVER_ERROR, 503))
    again = eng.next(accept=only_b)
    assert isinstance(again, Attempt)
    assert who(again) == ("k1", "b")
    assert again.retry


def test_resuming_gives_the_continuation_a_fresh_total() -> None:
    eng, _, clock = engine([cand("k1", "a"), cand("k1", "b")], total=10.0)
    attempt(eng)
    clock.now += 60.0  # a long stream: far past the total, which bounds the first byte only
    eng.report(Report(Outcome.CONNECT_ERROR, 200))
    eng.restart(clock.now + 10.0)
    step = eng.next()
    assert isinstance(step, Attempt)
    assert step.budget > 9.0


def test_a_refused_prefill_passes_over_that_providers_model_only() -> None:
    other = Provider(
        id="azure", format="openai", auth="api-key", base_url="http://127.0.0.1:9/v1",
        builtin=True, configured=True, models=frozenset(), headers=(), query="",
        policy_keys=(), managed_keys=(), keyless=None,
    )  # fmt: skip
    elsewhere = Candidate(other, ResolvedModel("a", other, "a"), key("z1"))
    eng, _, _ = engine([cand("k1", "a"), cand("k2", "a"), elsewhere])
    attempt(eng)
    eng.report(Report(Outcome.CLIENT_ERROR, 400, unsuitable=True))
    step = attempt(eng)
    assert (step.candidate.provider.id, step.candidate.key.key_id) == ("azure", "z1")
