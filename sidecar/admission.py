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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, TypeVar

from sidecar.errors import ErrorCode, ProxyError
from sidecar.metrics import Metrics
from sidecar.ratelimits import Decision, LocalLimiter, RateLimits
from sidecar.runtime import AccessKey
from sidecar.shared import SharedStateUnavailable

if TYPE_CHECKING:  # the Redis client is imported only where `shared_state` is configured
    from sidecar.shared.replicas import SharedState

#: Rate-limit calls to Redis in flight at once (batches of admissions, and corrections): fewer
#: than the shared client's connections, which the link's ping and announcements also use.
#: A batch that finds no slot within `shared_state.timeout` is counted on this replica.
REDIS_SLOTS: Final = 24
#: Requests of one access key waiting for their turn on Redis at most; past it a request is
#: counted on this replica alone. And how many one call decides at most.
_MAX_WAITING: Final = 4096
_MAX_BATCH: Final = 512
#: Token corrections are sent to Redis together, this often; for this many (key, second) at
#: most in between (past it the estimate stands: it errs on counting more).
_SETTLE_EVERY_S: Final = 0.1
_MAX_OWED: Final = 4096

T = TypeVar("T")

#: The requests of one access key waiting for the next call: (tokens, where the decision goes).
_Waiting = list[tuple[int, "asyncio.Future[Decision | None]"]]


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
        self._settling: set[asyncio.Task[None]] = set()  # calls to Redis on their way
        self._groups: dict[tuple[str, RateLimits], _Waiting] = {}
        self._owed: dict[tuple[str, int], int] = {}  # (name, Redis second) → tokens to settle
        self._settle_timer: asyncio.TimerHandle | None = None
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
        where = (ticket.name, ticket.second)
        if where not in self._owed and len(self._owed) >= _MAX_OWED:
            return  # the estimate stands (errs on counting more)
        self._owed[where] = self._owed.get(where, 0) + delta
        if self._settle_timer is None:  # corrections go to Redis together, a few times a second
            self._settle_timer = asyncio.get_running_loop().call_later(
                _SETTLE_EVERY_S, self._start_settling
            )

    # -- on the shared Redis -----------------------------------------------------------

    async def _admit_shared(
        self, shared: SharedState, name: str, limits: RateLimits, tokens: int
    ) -> Decision | None:
        """The decision of the shared Redis, or None to count on this replica: Redis failed or
        is too slow (then the replica leaves the link), or too many wait already.

        Requests of one access key that arrive while its last call is on its way go together
        in the next call (one Lua script run decides them in order), so a busy key costs
        one round trip per batch, not per request."""
        group = self._groups.get((name, limits))
        if group is None:
            group = self._groups[(name, limits)] = []
            task = asyncio.get_running_loop().create_task(self._drain(shared, name, limits, group))
            self._settling.add(task)  # held until done, and waited for at close
            task.add_done_callback(self._settling.discard)
        elif len(group) >= _MAX_WAITING:
            return None
        decided: asyncio.Future[Decision | None] = asyncio.get_running_loop().create_future()
        group.append((tokens, decided))
        try:  # the whole wait, its turn included, is bounded
            return await asyncio.wait_for(decided, shared.config.timeout)
        except TimeoutError:  # counted here (and maybe there too, if its call went out: safe)
            return None

    async def _drain(
        self, shared: SharedState, name: str, limits: RateLimits, group: _Waiting
    ) -> None:
        """Send what waits for one access key, batch after batch, until nothing does."""
        batch: _Waiting = []
        try:
            while group:
                # Whoever stopped waiting (left, or timed out) is not counted on Redis.
                batch = [(t, decided) for t, decided in group[:_MAX_BATCH] if not decided.done()]
                del group[:_MAX_BATCH]
                if not batch:
                    continue
                decisions = await self._call_admit(shared, name, limits, [t for t, _ in batch])
                for i, (_, decided) in enumerate(batch):
                    if not decided.done():
                        decided.set_result(decisions[i] if decisions else None)
        finally:
            del self._groups[(name, limits)]
            for _, decided in (*batch, *group):  # only after an error of this task itself
                if not decided.done():
                    decided.set_result(None)

    async def _call_admit(
        self, shared: SharedState, name: str, limits: RateLimits, tokens: list[int]
    ) -> list[Decision] | None:
        return await self._on_redis(shared, lambda: shared.limiter.admit_many(name, limits, tokens))

    async def _on_redis(self, shared: SharedState, call: Callable[[], Awaitable[T]]) -> T | None:
        """`call()` on the shared Redis within its timeout; None when Redis is down, fails
        (then the replica leaves the link), or every slot stayed busy for the whole timeout
        (many keys at once: this one is done here, and Redis is not taken for down)."""
        if not shared.up or not await self._slot(shared.config.timeout):
            return None
        try:
            if not shared.up:  # it went down while this waited for a slot
                return None
            return await shared.bounded(call())
        except SharedStateUnavailable as exc:
            shared.failed(exc)
            return None
        finally:
            self._slots.release()

    async def _slot(self, wait: float) -> bool:
        try:
            async with asyncio.timeout(wait):
                await self._slots.acquire()
        except TimeoutError:
            return False
        return True

    def _start_settling(self) -> None:
        self._settle_timer = None
        owed, self._owed = self._owed, {}
        task = asyncio.get_running_loop().create_task(self._settle_shared(owed))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def _settle_shared(self, owed: dict[tuple[str, int], int]) -> None:
        """Send the corrections; when Redis is gone or busy, the estimates stand there."""
        shared = self._shared
        if shared is not None and owed:
            corrections = [(n, s, d) for (n, s), d in owed.items()]
            await self._on_redis(shared, lambda: shared.limiter.settle_many(corrections))

    def _refusal(self, name: str, limits: RateLimits, d: Decision) -> ProxyError:
        """Every count leaves the window within 61 s, so the wait is finite: the estimate is
        capped at `tpm`, and no request is over the limit alone."""
        assert d.limit is not None
        kind = d.limit.value
        self._metrics.rate_limited.labels(name, kind).inc()
        limit = limits.rpm if kind == "rpm" else limits.tpm
        unit = "requests" if kind == "rpm" else "tokens"
        wait = max(1, math.ceil(d.retry_after))
        return ProxyError(
            ErrorCode.RATE_LIMIT_EXCEEDED,
            f"access key {name!r} is over its limit of {limit} {unit} per minute; "
            f"retry in {wait} s",
            retry_after=wait,
        )

    async def close(self) -> None:
        """Send the corrections still owed, and wait for those on their way."""
        if self._settle_timer is not None:
            self._settle_timer.cancel()
            self._start_settling()
        if self._settling:
            await asyncio.gather(*self._settling, return_exceptions=True)
