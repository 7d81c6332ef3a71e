"""Quota-aware key order (SPEC §11): the providers' remaining-quota headers, per key and model.

Pure and clock-injected. `parse_quota_headers` reads what an upstream answer says is left
of its key's quota; a `QuotaBook` keeps the current readings per (key, model) — the
`ProviderKey.health_id` and the model — and puts keys that are nearly exhausted behind
those with headroom.

Formats read:

- OpenAI (and Azure OpenAI, Groq and others that copy it): `x-ratelimit-limit-requests`,
  `x-ratelimit-remaining-requests`, `x-ratelimit-reset-requests` and the same three for
  `-tokens`; a reset is a Go duration (`1s`, `6m0s`, `59.541s`, `20ms`, `1h2m3s`) or a
  bare number of seconds, the time until the limit is whole again.
- Anthropic: `anthropic-ratelimit-requests-limit|remaining|reset`, and the same for
  `tokens`, `input-tokens` and `output-tokens`; a reset is an RFC 3339 timestamp. All token
  kinds make one `tokens` reading: the one with the least headroom.

Values that do not parse, are negative or absurd (Azure's `-1`) are ignored, never raised.
"""

from __future__ import annotations

import enum
import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Final, TypeVar

__all__ = [
    "NEARLY_EXHAUSTED",
    "QuotaBook",
    "QuotaKind",
    "Reading",
    "parse_quota_headers",
]

#: below this fraction of its limit left, a key is "nearly exhausted"
NEARLY_EXHAUSTED: Final = 0.1
#: how long a reading without a reset time stays current
_NO_RESET_TTL_S: Final = 60.0
#: resets further away than this are absurd (a daily limit resets within a day)
_MAX_RESET_S: Final = 7 * 24 * 3600.0
_MAX_COUNT: Final = 10**15

_K = TypeVar("_K")


class QuotaKind(enum.StrEnum):
    REQUESTS = "requests"
    TOKENS = "tokens"


@dataclass(frozen=True, slots=True)
class Reading:
    """What one answer said is left of one kind of a key's quota."""

    kind: QuotaKind
    remaining: int
    limit: int | None
    reset_at: float | None  # on the book's clock (monotonic), None when the provider gave no reset


# --- parsing ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Family:
    """One limit's three headers, and how its reset is written."""

    kind: QuotaKind
    remaining: str
    limit: str
    reset: str
    duration: bool  # the reset is a duration (OpenAI), else an RFC 3339 timestamp (Anthropic)


def _family(pattern: str, kind: QuotaKind, duration: bool) -> _Family:
    remaining, limit, reset = (pattern.format(part) for part in ("remaining", "limit", "reset"))
    return _Family(kind, remaining, limit, reset, duration)


_OPENAI: Final[tuple[_Family, ...]] = (
    _family("x-ratelimit-{}-requests", QuotaKind.REQUESTS, True),
    _family("x-ratelimit-{}-tokens", QuotaKind.TOKENS, True),
)
_ANTHROPIC: Final[tuple[_Family, ...]] = (
    _family("anthropic-ratelimit-requests-{}", QuotaKind.REQUESTS, False),
    _family("anthropic-ratelimit-tokens-{}", QuotaKind.TOKENS, False),
    _family("anthropic-ratelimit-input-tokens-{}", QuotaKind.TOKENS, False),
    _family("anthropic-ratelimit-output-tokens-{}", QuotaKind.TOKENS, False),
)
_DURATION_PART: Final = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(h|ms|m|s|us|µs|ns)")
_DURATION: Final = re.compile(rf"(?:{_DURATION_PART.pattern})+")
_UNIT_S: Final = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_SECONDS: Final = re.compile(r"\d+(?:\.\d+)?")


def parse_quota_headers(
    headers: Mapping[str, str], now: float, wall_now: float
) -> tuple[Reading, ...]:
    """The quota readings in an upstream answer's headers (none when it has no such header).

    `headers` looks names up case-insensitively (aiohttp's CIMultiDictProxy). `now` is the
    book's clock, `wall_now` the wall clock (`time.time()`): Anthropic's RFC 3339 reset
    times become `now + (ts - wall_now)`. At most one reading per kind: where several
    headers speak of one kind (Anthropic's token kinds), the one with the least headroom.
    """
    # Every upstream answer comes here: a few lookups, then out when there is nothing.
    if "x-ratelimit-remaining-requests" in headers or "x-ratelimit-remaining-tokens" in headers:
        families = _OPENAI
    elif (
        "anthropic-ratelimit-requests-remaining" in headers
        or "anthropic-ratelimit-tokens-remaining" in headers
        or "anthropic-ratelimit-input-tokens-remaining" in headers
        or "anthropic-ratelimit-output-tokens-remaining" in headers
    ):
        families = _ANTHROPIC
    else:
        return ()
    found: dict[QuotaKind, Reading] = {}
    for family in families:
        reading = _reading(headers, family, now, wall_now)
        if reading is None:
            continue
        held = found.get(family.kind)
        if held is None or _tighter(reading, held):
            found[family.kind] = reading
    return tuple(found.values())


def _reading(
    headers: Mapping[str, str], family: _Family, now: float, wall_now: float
) -> Reading | None:
    remaining = _count(headers.get(family.remaining))
    if remaining is None:
        return None
    limit = _count(headers.get(family.limit))
    if limit == 0:
        limit = None  # a limit of nothing is no limit to measure headroom against
    if limit is not None and remaining > limit:
        remaining = limit  # Anthropic rounds token counts to the nearest thousand
    raw = headers.get(family.reset)
    wait = _duration_s(raw) if family.duration else _until_s(raw, wall_now)
    return Reading(family.kind, remaining, limit, None if wait is None else now + wait)


def _tighter(a: Reading, b: Reading) -> bool:
    """Whether `a` leaves less headroom than `b` (by fraction when both limits are known)."""
    if a.limit is not None and b.limit is not None:
        return a.remaining * b.limit < b.remaining * a.limit
    return a.remaining < b.remaining


def _count(raw: str | None) -> int | None:
    """A non-negative integer header value, None when missing, bad or absurd."""
    if raw is None:
        return None
    raw = raw.strip()
    if len(raw) > 16 or not raw.isascii() or not raw.isdigit():
        return None
    value = int(raw)
    return value if value <= _MAX_COUNT else None


def _duration_s(raw: str | None) -> float | None:
    """Seconds in a Go duration (`6m0s`, `59.541s`, `20ms`) or a bare number of seconds."""
    if raw is None:
        return None
    raw = raw.strip()
    if len(raw) > 64:
        return None
    if _SECONDS.fullmatch(raw):
        seconds = float(raw)
    elif _DURATION.fullmatch(raw):
        seconds = sum(float(n) * _UNIT_S[u] for n, u in _DURATION_PART.findall(raw))
    else:
        return None
    return seconds if math.isfinite(seconds) and seconds <= _MAX_RESET_S else None


def _until_s(raw: str | None, wall_now: float) -> float | None:
    """Seconds from `wall_now` to an RFC 3339 timestamp (negative when it has passed)."""
    if raw is None:
        return None
    try:
        ts = datetime.fromisoformat(raw.strip().upper())  # RFC 3339 allows a lower-case t and z
        if ts.tzinfo is None:
            return None  # no offset (or no time of day): not RFC 3339
        seconds = ts.timestamp() - wall_now
    except (ValueError, OverflowError):
        return None
    return seconds if abs(seconds) <= _MAX_RESET_S else None


# --- the book ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Held:
    reading: Reading
    recorded_at: float

    def current(self, now: float) -> bool:
        reset_at = self.reading.reset_at
        if reset_at is not None:
            return reset_at > now
        return now - self.recorded_at < _NO_RESET_TTL_S

    def low(self) -> bool:
        r = self.reading
        return r.remaining == 0 or (
            r.limit is not None and r.remaining < NEARLY_EXHAUSTED * r.limit
        )


_Entry = dict[QuotaKind, _Held]


class QuotaBook:
    """The current quota readings per (key, model), bounded, oldest recorded dropped first.

    A reading is current while its reset time is in the future; one without a reset time
    is current for 60 s after it was recorded. Readings no longer current are ignored.
    """

    __slots__ = ("_by_key", "_clock", "_entries", "_low_keys", "_max")

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, max_entries: int = 4096
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._clock = clock
        self._max = max_entries
        # Insertion order is record order (an entry moves to the end when recorded again).
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self._by_key: dict[str, set[str]] = {}  # health_id → models with an entry
        # model → keys whose entry held a low reading when recorded (maybe no longer current):
        # lets `order` return at once for a model where no key is short.
        self._low_keys: dict[str, set[str]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def record(self, health_id: str, model: str, readings: Sequence[Reading]) -> float | None:
        """Keep these readings for (key, model) (replacing that kind's earlier one). Returns the
        reset time when a reading says nothing is left (remaining == 0) and gives a reset in the
        future — the caller holds the key back until then — else None."""
        if not readings:
            return None
        now = self._clock()
        where = (health_id, model)
        entry = self._entries.get(where)
        if entry is None:
            self._drop_stale(now)
            while len(self._entries) >= self._max:
                self._drop(next(iter(self._entries)))
            entry = self._entries[where] = {}
            self._by_key.setdefault(health_id, set()).add(model)
        else:
            self._entries.move_to_end(where)
        hold: float | None = None
        for r in readings:
            entry[r.kind] = _Held(r, now)
            if r.remaining == 0 and r.reset_at is not None and r.reset_at > now:
                hold = r.reset_at if hold is None else max(hold, r.reset_at)
        if any(held.low() for held in entry.values()):
            self._low_keys.setdefault(model, set()).add(health_id)
        else:
            self._discard_low(health_id, model)
        return hold

    def nearly_exhausted(self, health_id: str, model: str) -> bool:
        """Whether a current reading of (key, model) has less than `NEARLY_EXHAUSTED` of its
        limit left, or nothing at all."""
        entry = self._entries.get((health_id, model))
        return entry is not None and self._low(entry, self._clock())

    def order(self, keys: Sequence[_K], model: str, health_id: Callable[[_K], str]) -> Sequence[_K]:
        """Stable partition: keys not nearly exhausted first, in their given order, then the
        nearly exhausted ones, in their given order. Returns `keys` itself (no copy) when the
        book is empty or nothing moves — this is on every request's path."""
        low_ids = self._low_keys.get(model)
        if not low_ids or len(keys) < 2:
            return keys
        now, entries = self._clock(), self._entries
        low = [(h := health_id(k)) in low_ids and self._low(entries[(h, model)], now) for k in keys]
        first_low = next((i for i, is_low in enumerate(low) if is_low), len(low))
        if all(low[first_low:]):
            return keys
        return [k for k, is_low in zip(keys, low, strict=True) if not is_low] + [
            k for k, is_low in zip(keys, low, strict=True) if is_low
        ]

    def remaining(self) -> dict[tuple[str, QuotaKind], int]:
        """(health_id, kind) → the lowest current remaining across that key's models (for a gauge)."""
        now = self._clock()
        out: dict[tuple[str, QuotaKind], int] = {}
        for (health_id, _model), entry in self._entries.items():
            for kind, held in entry.items():
                if held.current(now):
                    where = (health_id, kind)
                    seen = out.get(where)
                    if seen is None or held.reading.remaining < seen:
                        out[where] = held.reading.remaining
        return out

    def readings(self, health_id: str) -> list[tuple[str, Reading]]:
        """Current (model, reading) pairs of one key, sorted by model then kind (for `GET /keys`)."""
        now = self._clock()
        out = [
            (model, held.reading)
            for model in self._by_key.get(health_id, ())
            for held in self._entries[(health_id, model)].values()
            if held.current(now)
        ]
        out.sort(key=lambda pair: (pair[0], pair[1].kind))
        return out

    def forget_except(self, keep: Iterable[str]) -> None:
        """Drop the readings of keys not in `keep` (keys no longer in the runtime)."""
        kept = set(keep)
        for health_id in [h for h in self._by_key if h not in kept]:
            for model in list(self._by_key[health_id]):
                self._drop((health_id, model))

    @staticmethod
    def _low(entry: _Entry, now: float) -> bool:
        return any(held.low() and held.current(now) for held in entry.values())

    def _drop(self, where: tuple[str, str]) -> None:
        del self._entries[where]
        health_id, model = where
        models = self._by_key[health_id]
        models.discard(model)
        if not models:
            del self._by_key[health_id]
        self._discard_low(health_id, model)

    def _discard_low(self, health_id: str, model: str) -> None:
        low_ids = self._low_keys.get(model)
        if low_ids is not None:
            low_ids.discard(health_id)
            if not low_ids:
                del self._low_keys[model]

    def _drop_stale(self, now: float) -> None:
        """Drop the oldest-recorded entries while nothing in them is current."""
        while self._entries:
            where, entry = next(iter(self._entries.items()))
            if any(held.current(now) for held in entry.values()):
                return
            self._drop(where)
