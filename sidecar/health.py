"""Key health (docs/reference.md#key-health): what an attempt's outcome means, and cooldowns.

Pure and clock-injected. Health is kept per (provider, key value) — the
`ProviderKey.health_id` — and model, so it survives reloads for keys that
still exist.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import orjson

from sidecar.config import Cooldown, Retry


class Outcome(enum.StrEnum):
    OK = "ok"
    RATE_LIMITED = "rate_limited"
    AUTH_FAILED = "auth_failed"
    SERVER_ERROR = "server_error"
    TIMEOUT = "timeout"
    CONNECT_ERROR = "connect_error"
    CLIENT_ERROR = "client_error"


# As a module constant: on Python 3.11 `Outcome.OK` goes through the enum metaclass's
# `__getattr__` hook, about twenty times a global's cost, and every request reads it.
OUTCOME_OK: Final = Outcome.OK

_SERVER_SIDE = frozenset({Outcome.SERVER_ERROR, Outcome.TIMEOUT, Outcome.CONNECT_ERROR})


def classify_status(status: int) -> Outcome:
    if status < 400:
        return OUTCOME_OK
    if status == 429:
        return Outcome.RATE_LIMITED
    if status in (401, 403):
        return Outcome.AUTH_FAILED
    if status == 408:
        return Outcome.TIMEOUT
    if status >= 500:
        return Outcome.SERVER_ERROR
    return Outcome.CLIENT_ERROR


# In an OpenAI or Azure OpenAI 429: the account is out of credit, not going too fast.
_QUOTA_MARKERS: Final = (
    b"insufficient_quota",
    b"billing_hard_limit",
    b"exceeded your current quota",
)
_RPC_TYPE: Final = "type.googleapis.com/google.rpc."


def answer_status(status: int, body: bytes) -> int:
    """The HTTP status an upstream answer stands for, for key health. The Gemini API answers
    an invalid API key with 400 `INVALID_ARGUMENT` and a google.rpc.ErrorInfo of reason
    `API_KEY_INVALID` from `googleapis.com`: that is the key's fault, a 401. Only that exact
    structure counts: a 400's message may quote the caller's own request."""
    if status != 400 or b"API_KEY_INVALID" not in body:
        return status
    err = _error_of(body)
    if err is None or err.get("status") != "INVALID_ARGUMENT":
        return status
    for info in _rpc_details(err, "ErrorInfo"):
        if info.get("reason") == "API_KEY_INVALID" and info.get("domain") == "googleapis.com":
            return 401
    return status


def is_quota_exhausted(body: bytes) -> bool:
    """A 429 that means "out of money" (or out of today's quota), not "slow down": cool down
    like a bad key.

    OpenAI and Azure OpenAI: `insufficient_quota`, `billing_hard_limit`, or "You exceeded
    your current quota". Gemini (`RESOURCE_EXHAUSTED`): a google.rpc.QuotaFailure naming
    a per-day quota; without a QuotaFailure, a message about the quota or the billing
    ("You exceeded your current quota, please check your plan and billing details").
    A Gemini per-minute quota is a plain rate limit whatever its message says.
    """
    if b"RESOURCE_EXHAUSTED" in body:
        return _gemini_quota_exhausted(body)
    return any(marker in body for marker in _QUOTA_MARKERS)


def _error_of(body: bytes) -> dict[str, Any] | None:
    """The `error` object of a JSON error body, or None."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if isinstance(doc, list) and len(doc) == 1:  # Google's non-SSE stream: a JSON array
        doc = doc[0]
    err = doc.get("error") if isinstance(doc, dict) else None
    return err if isinstance(err, dict) else None


def _rpc_details(err: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    """The google.rpc details of type `kind` (`QuotaFailure`, `RetryInfo`) in a Gemini error."""
    details = err.get("details")
    if not isinstance(details, list):
        return []
    name = _RPC_TYPE + kind
    return [d for d in details if isinstance(d, dict) and d.get("@type") == name]


def _gemini_quota_exhausted(body: bytes) -> bool:
    err = _error_of(body)
    if err is None:
        return False
    violations = [
        v
        for failure in _rpc_details(err, "QuotaFailure")
        if isinstance(failure.get("violations"), list)
        for v in failure["violations"]
        if isinstance(v, dict)
    ]
    if violations:
        return any(_per_day(v) for v in violations)
    message = err.get("message")
    if not isinstance(message, str):
        return False
    lowered = message.lower()
    return "exceeded your current quota" in lowered or "billing" in lowered


def _per_day(violation: dict[str, Any]) -> bool:
    quota_id, metric = violation.get("quotaId"), violation.get("quotaMetric")
    return (isinstance(quota_id, str) and "PerDay" in quota_id) or (
        isinstance(metric, str) and "per_day" in metric
    )


def retry_after_of(headers: Mapping[str, str], body: bytes) -> float | None:
    """Seconds to wait before the same key may be asked again, from a failed answer: the
    `retry-after` header, else Azure's `retry-after-ms`, else the google.rpc.RetryInfo
    `retryDelay` of a Gemini error body ("34s"). None when none says (or it is out of
    [0, 1 day]). `headers` must look names up case-insensitively, as aiohttp's do."""
    seconds = parse_retry_after(headers.get("retry-after"))
    if seconds is not None:
        return seconds
    millis = _number(headers.get("retry-after-ms"))
    if millis is not None:
        return _in_range(millis / 1000)
    if b"RetryInfo" not in body:
        return None
    err = _error_of(body)
    if err is None:
        return None
    for info in _rpc_details(err, "RetryInfo"):
        delay = info.get("retryDelay")
        if isinstance(delay, str) and delay.endswith("s"):
            return _in_range(_number(delay[:-1]))
    return None


def _number(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        return None


def _in_range(seconds: float | None) -> float | None:
    return seconds if seconds is not None and 0 <= seconds <= 86400 else None


#: Upstream error codes that say another *model* could answer (the key is fine).
#: `DeploymentNotFound`: Azure OpenAI, where a deployment is the model.
MODEL_LEVEL_CODES: Final = frozenset(
    {"context_length_exceeded", "model_not_found", "DeploymentNotFound"}
)
_MODEL_LEVEL_STATUS: Final = frozenset({400, 404, 413, 422})


def is_model_level_error(status: int, body: bytes, extra_codes: frozenset[str]) -> bool:
    """A 400/404/413/422 that another model could answer: the prompt is too long for this
    model, or this model does not exist here. Content-policy refusals are not (another model
    must not be asked to say what one refused).

    OpenAI-style bodies carry `error.code`; Anthropic's carry `error.type` and a message
    (`prompt is too long`, or a `not_found_error` naming the model); Gemini's an RPC
    `error.status` and a message (INVALID_ARGUMENT "The input token count (…) exceeds the
    maximum number of tokens allowed (…)", NOT_FOUND "models/… is not found for API version …").
    """
    if status not in _MODEL_LEVEL_STATUS or not body:
        return False
    err = _error_of(body)
    if err is None:
        return False
    code = err.get("code")
    if isinstance(code, str) and (code in MODEL_LEVEL_CODES or code in extra_codes):
        return True
    kind, message = err.get("type"), err.get("message")
    if not isinstance(message, str):
        return False
    lowered = message.lower()
    if kind is None:
        return _gemini_model_level(err.get("status"), lowered)
    if kind == "invalid_request_error" and lowered.startswith("prompt is too long"):
        return True
    return kind == "not_found_error" and lowered.startswith("model:")


def _gemini_model_level(rpc: object, message: str) -> bool:
    if rpc == "INVALID_ARGUMENT":
        return "input token count" in message and "exceeds the maximum" in message
    if rpc == "NOT_FOUND":
        return message.startswith("models/") and " is not found" in message
    return False


def same_candidate_wait(
    outcome: Outcome, retry_after: float | None, quota: bool, retry: Retry, jitter: float
) -> float | None:
    """Seconds to wait before trying the *same* candidate again, or None to move on.

    A 5xx or a connection error (reset, refused) is often passing: one more try after
    a short jittered backoff (`jitter` in [0, 1): between 1 and 1.5 backoffs, so never
    sooner than the backoff). A 429 whose `retry-after` is at most `retry.max_wait`
    is waited out. A timeout is not retried: a silent route tends to stay silent.
    """
    if outcome in (Outcome.SERVER_ERROR, Outcome.CONNECT_ERROR):
        return retry.backoff * (1.0 + 0.5 * jitter)
    if outcome is Outcome.RATE_LIMITED and not quota and retry_after is not None:
        return retry_after if retry_after <= retry.max_wait else None
    return None


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a `retry-after` header (delta-seconds form; dates are ignored)."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if 0 <= seconds <= 86400 else None


#: (health_id, model or None for the whole key, until on the health clock, reason, last status)
CooldownListener = Callable[[str, "str | None", float, "Outcome", "int | None"], None]


@dataclass(slots=True)
class _State:
    until: float = 0.0
    failures: int = 0
    reason: Outcome | None = None  # the outcome that set `until`
    last_status: int | None = None  # the last upstream status seen for this scope


class KeyState(enum.StrEnum):
    OK = "ok"
    COOLING = "cooling"  # a (key, model) pair: 429, or 5xx/timeouts/connect errors at the threshold
    DEAD = "dead"  # the whole key: 401, 403, quota exhausted


@dataclass(frozen=True, slots=True)
class ScopeHealth:
    """One line of key health: a key usable for every model, or one cooling scope of it."""

    health_id: str
    model: str | None  # the cooling pair's model; None for a key-wide state or an `ok` key
    state: KeyState
    until: float | None  # on the health clock (monotonic); None when ok
    reason: Outcome | None  # the outcome that started the cooldown; None when ok
    last_status: int | None  # the last upstream status for the key (pair: for that model)


@dataclass(frozen=True, slots=True)
class HealthSnapshot:
    now: float  # the health clock when taken: `until - now` is the time left
    scopes: tuple[ScopeHealth, ...]


#: The scope of a key-wide state: a dead key (401, 403, quota exhausted) is dead for every model.
_KEY = None


class KeyHealth:
    """Cooldown deadlines and consecutive server-side failures per key and model.

    Providers limit rate per model, so `rate_limited` and `server_error` cool the
    (key, model) pair and the key stays usable for other models; `auth_failed`
    (401, 403, a quota-exhausted 429) cools the key for every model. `model` is
    the name sent upstream ("" when a request names none).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._states: dict[tuple[str, str | None], _State] = {}
        self._last_status: dict[str, int] = {}  # per key, any model
        #: told of every cooldown that starts or reaches further here (not of `apply`'s):
        #: the shared state publishes them to the other replicas
        self.on_cooldown: CooldownListener | None = None

    def cooling_until(self, health_id: str, model: str = "") -> float | None:
        """The deadline if the key (for this model) is cooling now, else None."""
        now = self._clock()
        until = 0.0
        for scope in (_KEY, model):
            st = self._states.get((health_id, scope))
            if st is not None and st.until > until:
                until = st.until
        return until if until > now else None

    def record(
        self,
        health_id: str,
        outcome: Outcome,
        cooldown: Cooldown,
        *,
        model: str = "",
        retry_after: float | None = None,
        quota_exhausted: bool = False,
        status: int | None = None,
    ) -> float | None:
        """Account for one attempt. Returns the new deadline when a cooldown starts.

        `status` is the upstream HTTP status, when there was one (for `snapshot`).
        """
        pair = self._states.get((health_id, model))
        if status is not None:
            self._last_status[health_id] = status
            if pair is not None:
                pair.last_status = status
        if outcome is OUTCOME_OK:
            if pair is not None:
                pair.failures = 0
            return None
        if outcome is Outcome.CLIENT_ERROR:
            return None
        if outcome is Outcome.AUTH_FAILED or (outcome is Outcome.RATE_LIMITED and quota_exhausted):
            st = self._states.setdefault((health_id, _KEY), _State())
            duration = cooldown.auth_failed
        elif outcome is Outcome.RATE_LIMITED:
            st = self._states.setdefault((health_id, model), _State())
            duration = retry_after or cooldown.rate_limited
        elif outcome in _SERVER_SIDE:
            st = self._states.setdefault((health_id, model), _State())
            st.failures += 1
            if st.failures < cooldown.server_error_threshold:
                return None
            st.failures = 0
            duration = cooldown.server_error
        else:  # pragma: no cover - every Outcome is handled above
            return None
        if status is not None:
            st.last_status = status
        scope = _KEY if st is self._states.get((health_id, _KEY)) else model
        self._extend(health_id, scope, st, self._clock() + duration, outcome, share=True)
        return self.cooling_until(health_id, model)  # a key-wide cooldown may reach further

    def hold(
        self,
        health_id: str,
        model: str | None,
        until: float,
        reason: Outcome,
        status: int | None = None,
        *,
        share: bool = True,
    ) -> None:
        """Cool a scope until `until` (health clock): the pair (key, `model`), or the whole key
        when `model` is None. A later deadline already in force is kept.

        For what is learnt outside an attempt's outcome: a provider saying no quota is left
        until a reset time, or (`share=False`) a cooldown another replica saw.
        """
        st = self._states.setdefault((health_id, model), _State())
        if status is not None:
            st.last_status = status
            self._last_status.setdefault(health_id, status)
        self._extend(health_id, model, st, until, reason, share=share)

    def _extend(
        self, health_id: str, scope: str | None, st: _State, until: float, reason: Outcome,
        *, share: bool,
    ) -> None:  # fmt: skip
        if until <= st.until:  # a key failing again while cooling keeps the later deadline
            return
        st.until = until
        st.reason = reason
        if share and self.on_cooldown is not None:
            self.on_cooldown(health_id, scope, until, reason, st.last_status)

    def active(self) -> list[tuple[str, str | None, float, Outcome, int | None]]:
        """Every cooldown in force: (health_id, model or None for the key, until, reason,
        last status), for a replica that reconnects to the shared state."""
        now = self._clock()
        return [
            (hid, scope, st.until, st.reason, st.last_status)
            for (hid, scope), st in self._states.items()
            if st.until > now and st.reason is not None
        ]

    def soonest_recovery(self, health_ids: Iterable[str], model: str = "") -> float | None:
        """Seconds until the first of these keys recovers for `model` (None if one is usable now)."""
        now = self._clock()
        waits = []
        for hid in health_ids:
            until = self.cooling_until(hid, model)
            if until is None:
                return None
            waits.append(until - now)
        return min(waits) if waits else None

    def cooling(self) -> dict[str, float]:
        """health_id → latest deadline, for every key cooling now for the key or any model
        (the `sidecar_key_cooling_down` gauge)."""
        now = self._clock()
        out: dict[str, float] = {}
        for (hid, _), st in self._states.items():
            if st.until > now and st.until > out.get(hid, 0.0):
                out[hid] = st.until
        return out

    def snapshot(self, health_ids: Iterable[str]) -> HealthSnapshot:
        """The health of these keys now (`GET /keys`): one `ok` scope per usable key,
        else one scope per cooldown in force (key-wide first, then models by name).

        A key that is dead and also cooling for a model lists both.
        """
        now = self._clock()
        scopes: list[ScopeHealth] = []
        cooling: dict[str, list[tuple[str | None, _State]]] = {}
        for (hid, model), st in self._states.items():
            if st.until > now:
                cooling.setdefault(hid, []).append((model, st))
        for hid in health_ids:
            last = self._last_status.get(hid)
            active = cooling.get(hid)
            if not active:
                scopes.append(ScopeHealth(hid, None, KeyState.OK, None, None, last))
                continue
            for model, st in sorted(active, key=lambda ms: (ms[0] is not None, ms[0] or "")):
                if model is _KEY:
                    scopes.append(ScopeHealth(hid, None, KeyState.DEAD, st.until, st.reason, last))
                else:
                    scopes.append(ScopeHealth(hid, model, KeyState.COOLING, st.until, st.reason,
                                              st.last_status))  # fmt: skip
        return HealthSnapshot(now, tuple(scopes))

    def sweep(self) -> None:
        """Drop scopes whose cooldown has passed and that count no failures (they say nothing
        any more), so what other replicas announce does not pile up."""
        now = self._clock()
        for scoped in [k for k, st in self._states.items() if st.until <= now and not st.failures]:
            del self._states[scoped]

    def forget_except(self, keep: Iterable[str]) -> None:
        """Drop state of keys that no longer exist (after a reload)."""
        alive = set(keep)
        for scoped in [k for k in self._states if k[0] not in alive]:
            del self._states[scoped]
        for hid in [h for h in self._last_status if h not in alive]:
            del self._last_status[hid]
