"""Per-access-key rate limits: requests per minute (`rpm`) and tokens per minute (`tpm`).

The window is made of one-second buckets, keyed by the whole wall-clock second
`s = floor(now)`. At time `now` the window is the buckets with
`floor(now) - 60 <= s <= floor(now)` (61 buckets), so a request admitted in
second `s` counts until second `s + 61` starts: between 60 and 61 seconds.
Consequence: never more than `rpm` requests (nor `tpm` tokens, as admitted) are
let through in any 60-second span — the cost is that a slot comes back up to
one second later than a strict 60 s sliding window would give it.

`admit` checks and counts in one step: it refuses when one more request would
exceed `rpm`, or when the request's tokens would exceed `tpm` (rpm is checked
first and named first). Tokens are charged up front from an estimate
(`estimate_tokens`) and corrected by `settle` once the metered usage is known,
so concurrent requests in flight can overshoot `tpm` by the difference between
their estimates and what they really used; `rpm` is never overshot. Tokens
owed by an answer that outlived its bucket (over a minute) are counted in the
current second instead.

A refusal carries `retry_after`: when the same request would first pass,
computed from the buckets (each bucket stops counting at `s + 61`).
A request whose tokens alone exceed `tpm` can never pass: `math.inf`.

With no limit set nothing is counted. Buckets from a clock that stepped back
(`s > floor(now)`) still count, until they age out; stale buckets are dropped
on every access, so memory is bounded by 61 buckets per key.

This module is the algorithm on one replica (`LocalLimiter`);
`sidecar.shared.ratelimit.RedisLimiter` is the same algorithm on Redis,
counted across replicas.
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Final

WINDOW_S: Final = 60
#: A bucket admitted in second s stops counting at s + _LIFETIME_S.
_LIFETIME_S: Final = WINDOW_S + 1
#: Request bytes per token, for requests whose input is not metered up front.
_BYTES_PER_TOKEN: Final = 4


class LimitKind(enum.StrEnum):
    RPM = "rpm"
    TPM = "tpm"


@dataclass(frozen=True, slots=True)
class RateLimits:
    """An access key's limits; None is unlimited."""

    rpm: int | None = None
    tpm: int | None = None

    def __post_init__(self) -> None:
        for kind, value in ((LimitKind.RPM, self.rpm), (LimitKind.TPM, self.tpm)):
            if value is not None and (type(value) is not int or value <= 0):
                raise ValueError(f"{kind}: must be a whole number > 0, got {value!r}")

    def __bool__(self) -> bool:
        return self.rpm is not None or self.tpm is not None


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer of `admit`.

    `second` is the bucket the request was counted in (pass it to `settle`); the
    current second when refused or when nothing was counted (no limits).
    `limit` names the limit that refused; `retry_after` is in seconds, `math.inf`
    when the request can never pass.
    """

    allowed: bool
    second: int
    limit: LimitKind | None = None
    retry_after: float = 0.0


def estimate_tokens(body_size: int) -> int:
    """The up-front token charge of a request body: ~4 bytes per token, at least 1.

    The same estimate the rest of the sidecar uses for unmetered input
    (an interrupted stream's input, a non-stream answer without usage).
    """
    return max(1, body_size // _BYTES_PER_TOKEN)


# ----------------------------------------------------------------- the algorithm


def _refusal(
    limits: RateLimits, tokens: int, used_requests: int, used_tokens: int
) -> LimitKind | None:
    """The first limit that one more request of `tokens` tokens would exceed, or None."""
    if limits.rpm is not None and used_requests + 1 > limits.rpm:
        return LimitKind.RPM
    if limits.tpm is not None and used_tokens + tokens > limits.tpm:
        return LimitKind.TPM
    return None


def _retry_after(
    limits: RateLimits,
    tokens: int,
    now: float,
    buckets: Iterable[tuple[int, int, int]],
) -> float:
    """Seconds from `now` until a request of `tokens` tokens would pass both limits.

    `buckets` are the window's (second, requests, tokens), in any order. Walking
    them oldest first, bucket s stops counting at s + 61; the wait is until
    enough has left for each limit. `math.inf` if the tokens alone exceed tpm.
    """
    if limits.tpm is not None and tokens > limits.tpm:
        return math.inf
    ordered = sorted(buckets)
    used_requests = sum(b[1] for b in ordered)
    used_tokens = sum(b[2] for b in ordered)
    wait = 0.0
    if limits.rpm is not None:
        excess = used_requests + 1 - limits.rpm
        wait = max(wait, _until_freed(ordered, 1, excess, now))
    if limits.tpm is not None:
        excess = used_tokens + tokens - limits.tpm
        wait = max(wait, _until_freed(ordered, 2, excess, now))
    return wait


def _until_freed(ordered: list[tuple[int, int, int]], field: int, excess: int, now: float) -> float:
    if excess <= 0:
        return 0.0
    freed = 0
    for bucket in ordered:
        freed += bucket[field]
        if freed >= excess:
            return max(0.0, bucket[0] + _LIFETIME_S - now)
    return math.inf  # unreachable while the limits are > 0: every bucket leaves


# ----------------------------------------------------------------- one replica


class _Bucket:
    __slots__ = ("requests", "tokens")

    def __init__(self) -> None:
        self.requests = 0
        self.tokens = 0


class LocalLimiter:
    """The window per access-key name, in this process. Not thread-safe: one event loop."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._keys: dict[str, dict[int, _Bucket]] = {}

    def admit(self, name: str, limits: RateLimits, tokens: int) -> Decision:
        """Count one request of `tokens` estimated tokens for `name`, unless a limit refuses."""
        if tokens < 0:
            raise ValueError("tokens must be >= 0")
        now = self._clock()
        second = math.floor(now)
        if not limits:
            return Decision(True, second)
        buckets = self._live(name, second)
        used_requests = used_tokens = 0
        for counted in buckets.values():
            used_requests += counted.requests
            used_tokens += counted.tokens
        refused = _refusal(limits, tokens, used_requests, used_tokens)
        if refused is not None:
            wait = _retry_after(limits, tokens, now, _triples(buckets))
            if not buckets:
                del self._keys[name]
            return Decision(False, second, refused, wait)
        bucket = buckets.get(second)
        if bucket is None:
            bucket = buckets[second] = _Bucket()
        bucket.requests += 1
        bucket.tokens += tokens
        return Decision(True, second)

    def settle(self, name: str, second: int, delta: int) -> None:
        """Add `delta` tokens to the bucket `second` of `name`.

        A bucket never goes below 0. When that bucket has left the window (an answer
        that took over a minute), tokens still owed are counted now, in the current
        second; a refund for a bucket that is gone is dropped.
        """
        now_s = math.floor(self._clock())
        if name not in self._keys and delta <= 0:
            return
        buckets = self._live(name, now_s)
        bucket = buckets.get(second)
        if bucket is None and delta > 0:
            bucket = buckets[now_s] = buckets.get(now_s) or _Bucket()
        if bucket is not None:
            bucket.tokens = max(0, bucket.tokens + delta)
        elif not buckets:
            del self._keys[name]

    def forget_except(self, names: Iterable[str]) -> None:
        """Keep only the windows of `names` (the access keys that still exist).

        Stale buckets of the kept names go too, so a key idle for a minute holds nothing.
        """
        keep = set(names)
        now_s = math.floor(self._clock())
        for name in list(self._keys):
            if name not in keep or not self._live(name, now_s):
                del self._keys[name]

    def _live(self, name: str, now_s: int) -> dict[int, _Bucket]:
        """The buckets of `name` with the stale ones dropped (created empty if absent)."""
        buckets = self._keys.get(name)
        if buckets is None:
            buckets = self._keys[name] = {}
            return buckets
        oldest = now_s - WINDOW_S
        for stale in [s for s in buckets if s < oldest]:
            del buckets[stale]
        return buckets

    def bucket_count(self) -> int:
        """How many buckets are held, over all names (memory is bounded by 61 per name)."""
        return sum(len(b) for b in self._keys.values())


def _triples(buckets: dict[int, _Bucket]) -> Iterator[tuple[int, int, int]]:
    for second, bucket in buckets.items():
        yield second, bucket.requests, bucket.tokens
