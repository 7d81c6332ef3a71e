"""The failover engine (docs/reference.md#failover-and-key-health): one request's attempts.

Pure: no sockets, no timers, an injected clock and jitter. The handler drives it:

    engine = Engine(plan.candidates, cfg.failover, health, deadline)
    while isinstance(step := engine.next(), Attempt):
        ... wait step.wait, send to step.candidate, classify ...
        verdict = engine.report(Report(outcome, ...))
        if verdict.final: ... relay this answer ...

Rules: a passing fault (5xx, connection error) is tried once more on the same
candidate after a jittered backoff, a short `retry-after` is waited out, a
timeout moves on at once; a model-level error skips every candidate of that
model without cooling the key; cooled keys and pairs are skipped; never more
than `max_attempts` attempts, nothing once `timeouts.total` has passed.
"""

from __future__ import annotations

import enum
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from sidecar.config import Failover
from sidecar.health import KeyHealth, Outcome, same_candidate_wait
from sidecar.keys import SOURCE_PASSTHROUGH
from sidecar.plan import Candidate


class StopReason(enum.StrEnum):
    ANSWERED = "answered"  # an answer went to the caller
    EXHAUSTED = "exhausted"  # no candidate left to try
    MAX_ATTEMPTS = "max_attempts"  # `failover.max_attempts` reached
    TIMED_OUT = "timed_out"  # `timeouts.total` passed


_ANSWERED: Final = StopReason.ANSWERED  # (read per request: see `sidecar.keys.SOURCE_POLICY`)


@dataclass(slots=True)  # not frozen: built per attempt, and frozen init is slower
class Attempt:
    candidate: Candidate
    number: int  # this request's attempt count, from 1
    wait: float  # seconds to wait before sending (a retry of the same candidate)
    budget: float  # seconds left within `timeouts.total`, counted from when the wait ends
    #: (provider, outcome) of the failed attempt of another candidate this one follows:
    #: a failover to count (a retry of the same candidate is not one)
    failover_from: tuple[str, str] | None = None
    retry: bool = False  # the same candidate again


@dataclass(frozen=True, slots=True)
class Stop:
    reason: StopReason


@dataclass(slots=True)  # not frozen: built per attempt, and frozen init is slower
class Report:
    """What one attempt came to."""

    outcome: Outcome
    status: int | None = None  # the upstream status, when there was one
    retry_after: float | None = None
    quota: bool = False  # a 429 that means the key is out of money
    #: a 4xx another model could answer (prompt too long, no such model)
    model_level: bool = False
    #: the caller gets this answer: a success, or a status that does not fail over
    final: bool = False
    #: the attempt ran into `timeouts.total`
    timed_out: bool = False
    #: this candidate's model cannot serve what is asked (it rejects a prefill): move on to
    #: another model, leaving the key's health alone
    unsuitable: bool = False


@dataclass(slots=True)  # not frozen: built per attempt, and frozen init is slower
class Verdict:
    final: bool  # relay this attempt's answer to the caller
    cooled_until: float | None = None  # a cooldown this attempt started (health clock)


class Engine:
    """The attempt state machine of one request, over the plan's candidates in order."""

    __slots__ = (
        "_candidates",
        "_clock",
        "_current",
        "_deadline",
        "_failed",
        "_gone_models",
        "_health",
        "_jitter",
        "_policy",
        "_pos",
        "_refused",
        "_retries_left",
        "_retry_wait",
        "_stop",
        "attempts",
    )

    def __init__(
        self,
        candidates: Sequence[Candidate],
        policy: Failover,
        health: KeyHealth,
        deadline: float,
        *,
        clock: Callable[[], float] = time.perf_counter,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self._candidates = candidates
        self._policy = policy
        self._health = health
        self._deadline = deadline  # on `clock`
        self._clock = clock
        self._jitter = jitter
        self._pos = 0
        self._current: Candidate | None = None
        self._retries_left = policy.retry.attempts
        self._retry_wait: float | None = None
        self._failed: tuple[str, str] | None = None
        self._gone_models: set[str] = set()
        self._refused: set[tuple[str, str]] = set()  # (provider, model) that refused a prefill
        self._stop: Stop | None = None
        self.attempts = 0

    def next(self, accept: Callable[[Candidate], bool] | None = None) -> Attempt | Stop:
        """The next attempt, or why there is none. `accept` narrows the candidates
        (a resumed stream needs one that takes a prefill)."""
        if self._stop is not None:
            return self._stop
        if self.attempts >= self._policy.max_attempts:
            return self._stopped(StopReason.MAX_ATTEMPTS)
        now = self._clock()
        if now >= self._deadline:
            return self._stopped(StopReason.TIMED_OUT)
        wait, self._retry_wait = self._retry_wait, None
        if wait is not None:
            cand = self._candidates[self._pos]
            if accept is None or accept(cand):
                return self._attempt(cand, wait, retry=True)
            self._advance()
        while self._pos < len(self._candidates):
            cand = self._candidates[self._pos]
            model = cand.upstream_model
            if (
                (model is not None and model in self._gone_models)
                or (cand.provider.id, model or "") in self._refused
                or (accept is not None and not accept(cand))
                or (self.attempts and self._cooling(cand))
            ):
                self._pos += 1
                continue
            return self._attempt(cand, 0.0, retry=False)
        return self._stopped(StopReason.EXHAUSTED)

    def restart(self, deadline: float) -> None:
        """A new `timeouts.total` for what follows: a broken stream's continuation has until
        `deadline` (on the engine's clock) to send its first content."""
        self._deadline = deadline
        if self._stop is not None and self._stop.reason is StopReason.TIMED_OUT:
            self._stop = None

    def report(self, report: Report) -> Verdict:
        """Account for the latest attempt and decide what follows it."""
        cand = self._current
        assert cand is not None, "report() without an attempt"
        model = cand.upstream_model or ""
        # A caller's own (passthrough) key keeps no shared health.
        tracked = cand.key.source is not SOURCE_PASSTHROUGH
        cooldown = self._policy.cooldown
        if report.model_level and not report.final and self._another_model_follows(model):
            self._gone_models.add(model)  # every key would get the same answer for this model
            return self._moving_on(cand, report)
        if report.final or report.model_level:
            if tracked:
                self._health.record(cand.key.health_id, report.outcome, cooldown, model=model,
                                    status=report.status)  # fmt: skip
            self._stop = Stop(_ANSWERED)
            return Verdict(final=True)
        if report.unsuitable:
            # This provider's model refuses; its other keys would too (another provider's
            # model of the same name may not).
            self._refused.add((cand.provider.id, model))
            return self._moving_on(cand, report)
        wait = None
        if (
            self._retries_left
            and not report.timed_out
            and self.attempts < self._policy.max_attempts
        ):
            wait = same_candidate_wait(report.outcome, report.retry_after, report.quota,
                                       self._policy.retry, self._jitter())  # fmt: skip
            if wait is not None and self._clock() + wait >= self._deadline:
                wait = None  # no time to wait: the next candidate gets what remains
        cooled = None
        waited_out = wait is not None and report.outcome is Outcome.RATE_LIMITED
        if tracked and not waited_out:
            cooled = self._health.record(
                cand.key.health_id, report.outcome, cooldown, model=model,
                retry_after=report.retry_after, quota_exhausted=report.quota, status=report.status,
            )  # fmt: skip
        self._failed = (cand.key.provider, report.outcome.value)
        if report.timed_out:
            self._stop = Stop(StopReason.TIMED_OUT)
        elif wait is not None and cooled is None:  # a pair this fault just cooled is left alone
            self._retries_left -= 1
            self._retry_wait = wait
        else:
            self._advance()
        return Verdict(final=False, cooled_until=cooled)

    # -- internals -------------------------------------------------------------

    def _attempt(self, cand: Candidate, wait: float, *, retry: bool) -> Attempt:
        self.attempts += 1
        self._current = cand
        # Only a move to another candidate is a failover; a retry of this one is not.
        failed = None if retry else self._failed
        self._failed = None
        budget = self._deadline - self._clock() - wait
        return Attempt(cand, self.attempts, wait, budget, failed, retry)

    def _advance(self) -> None:
        self._pos += 1
        self._retries_left = self._policy.retry.attempts

    def _moving_on(self, cand: Candidate, report: Report) -> Verdict:
        self._failed = (cand.key.provider, report.outcome.value)
        self._advance()
        return Verdict(final=False)

    def _stopped(self, reason: StopReason) -> Stop:
        self._stop = Stop(reason)
        return self._stop

    def _cooling(self, cand: Candidate) -> bool:
        if cand.key.source is SOURCE_PASSTHROUGH:
            return False
        model = cand.upstream_model or ""
        return self._health.cooling_until(cand.key.health_id, model) is not None

    def _another_model_follows(self, model: str) -> bool:
        return any(
            c.model is not None and c.model.upstream != model
            for c in self._candidates[self._pos + 1 :]
        )
