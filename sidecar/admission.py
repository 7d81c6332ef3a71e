"""Per-access-key rate limits (docs/reference.md#rate-limits): admit a request or refuse it.

Before any upstream call, a request of an access key with `rpm` or `tpm` is counted
against them: across replicas on the shared Redis while it is reachable, on this
replica's own counters otherwise (`sidecar.ratelimits` has the window rules). Tokens
are estimated from the request's size up front and settled with the metered usage
once the answer is done, in the background.

How far the counts can go over: requests never (a request is admitted and counted in
one atomic step); tokens by what the up-front estimates missed of the requests in
flight when the window fills (their output tokens, mostly), since those are only
known at the end. While Redis is unreachable each replica counts on its own, so up
to one limit per replica passes.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from sidecar.errors import ErrorCode, ProxyError
from sidecar.metrics import Metrics
from sidecar.ratelimits import WINDOW_S, Decision, LocalLimiter, RateLimits
from sidecar.runtime import AccessKey
from sidecar.shared import SharedStateUnavailable

if TYPE_CHECKING:  # the Redis client is imported only where `shared_state` is configured
    from sidecar.shared.replicas import SharedState

#: The `retry-after` of a request that can never pass: a whole window, as counted (a
#: request counts for up to 61 s: `sidecar.ratelimits`).
_SDK_RETRY_S: Final = WINDOW_S + 1
#: Settlements in flight at most; past it the estimate stands (errs on counting more).
_MAX_SETTLING: Final = 1024
#: Rate-limit calls to Redis in flight at once (admissions and settlements): fewer than the
#: shared client's connections, which the link's ping and cooldown announcements also use.
#: A request that finds no slot within `shared_state.timeout` is counted on this replica.
REDIS_SLOTS: Final = 24


@dataclass(frozen=True, slots=True)
class Ticket:
    """An admitted request's place in its window, to settle its tokens later."""

    name: str
    second: int
    estimate: int  # tokens counted up front (0 without a `tpm`)
    shared: bool  # counted on the shared Redis (else on this replica)
    tokens: bool  # the key has a `tpm`: its tokens are settled


class Admission:
    def __init__(self, metrics: Metrics, shared: SharedState | None = None) -> None:
        self._metrics = metrics
        self._shared = shared
        self.local = LocalLimiter()
        self._settling: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(REDIS_SLOTS)

    async def admit(self, access: AccessKey, estimate: int) -> Ticket | None:
        """Count one request of `access` (and `estimate` tokens); None when it has no limits.
        Raises ProxyError(RATE_LIMIT_EXCEEDED) when a limit is reached."""
        limits = access.limits
        if not limits:
            return None
        # A request is counted at most a whole `tpm` up front: bytes overstate what images and
        # other media cost, and the metered usage settles the difference.
        tokens = min(estimate, limits.tpm) if limits.tpm else 0
        shared = self._shared
        decision: Decision | None = None
        if shared is not None and shared.up:
            decision = await self._admit_shared(shared, access.name, limits, tokens)
        on_redis = decision is not None
        if decision is None:
            decision = self.local.admit(access.name, limits, tokens)
        if not decision.allowed:
            raise self._refusal(access.name, limits, decision)
        return Ticket(access.name, decision.second, tokens, on_redis, bool(limits.tpm))

    def settle(self, ticket: Ticket, used: int | None) -> None:
        """The request is done: `used` tokens were metered (None: unknown, the estimate stands)."""
        if used is None or not ticket.tokens:
            return
        delta = used - ticket.estimate
        if delta == 0:
            return
        if not ticket.shared:
            self.local.settle(ticket.name, ticket.second, delta)
            return
        if len(self._settling) >= _MAX_SETTLING:
            return
        task = asyncio.get_running_loop().create_task(self._settle_shared(ticket, delta))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def _admit_shared(
        self, shared: SharedState, name: str, limits: RateLimits, tokens: int
    ) -> Decision | None:
        """The decision of the shared Redis, or None to count on this replica: Redis failed or
        is too slow (then the replica leaves the link), or every slot stayed busy for the
        whole timeout (a burst: this request alone is counted here)."""
        if not await self._slot(shared.config.timeout):
            return None
        try:  # one bound over the whole call: a connection, its one retry, the answer
            async with asyncio.timeout(shared.config.timeout):
                return await shared.limiter.admit(name, limits, tokens)
        except TimeoutError:
            shared.failed(SharedStateUnavailable("shared state: a rate-limit call timed out"))
        except SharedStateUnavailable as exc:
            shared.failed(exc)
        finally:
            self._slots.release()
        return None

    async def _slot(self, wait: float) -> bool:
        try:
            async with asyncio.timeout(wait):
                await self._slots.acquire()
        except TimeoutError:
            return False
        return True

    async def _settle_shared(self, ticket: Ticket, delta: int) -> None:
        shared = self._shared
        assert shared is not None
        if not shared.up or not await self._slot(shared.config.timeout):
            return  # Redis gone for now, or busy: the estimate stands there
        try:
            async with asyncio.timeout(shared.config.timeout):
                await shared.limiter.settle(ticket.name, ticket.second, delta)
        except TimeoutError:
            shared.failed(SharedStateUnavailable("shared state: a rate-limit call timed out"))
        except SharedStateUnavailable as exc:
            shared.failed(exc)
        finally:
            self._slots.release()

    def _refusal(self, name: str, limits: RateLimits, d: Decision) -> ProxyError:
        assert d.limit is not None
        kind = d.limit.value
        self._metrics.rate_limited.labels(name, kind).inc()
        limit = limits.rpm if kind == "rpm" else limits.tpm
        unit = "requests" if kind == "rpm" else "tokens"
        # Every count leaves the window within 61 s; only a request that can never pass (its
        # tokens alone over `tpm`, which the capped estimate avoids) is told not to retry.
        never = math.isinf(d.retry_after)
        wait = _SDK_RETRY_S if never else max(1, math.ceil(d.retry_after))
        return ProxyError(
            ErrorCode.RATE_LIMIT_EXCEEDED,
            f"access key {name!r} is over its limit of {limit} {unit} per minute; "
            f"retry in {wait} s",
            retry_after=wait,
            should_retry=not never,
        )

    async def close(self) -> None:
        if self._settling:
            await asyncio.gather(*self._settling, return_exceptions=True)
