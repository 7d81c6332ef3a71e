"""`GET /keys` (docs/reference.md#admin-port): the report built from key health, with injected clocks."""

from __future__ import annotations

from datetime import UTC, datetime

from sidecar.admin import keys_report
from sidecar.config import Cooldown
from sidecar.health import KeyHealth, Outcome
from sidecar.runtime import KeyRef

CD = Cooldown(rate_limited=30, auth_failed=300, server_error=15, server_error_threshold=3)
WALL = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC).timestamp()
LABELS = {
    "openai:fp-shared": (
        KeyRef("openai", "attached", "team-key", "team"),
        KeyRef("openai", "policy", "pol", ""),
    ),
    "anthropic:fp-dead": (KeyRef("anthropic", "managed", "pool-1", ""),),
    "openai:fp-idle": (KeyRef("openai", "policy", "spare", ""),),
}


def test_keys_report_converts_deadlines_to_wall_clock_and_lists_every_appearance() -> None:
    now = [500.0]  # the monotonic clock: unrelated to the wall clock
    h = KeyHealth(lambda: now[0])
    h.record("openai:fp-shared", Outcome.RATE_LIMITED, CD, model="gpt-4o", retry_after=12.5,
             status=429)  # fmt: skip
    h.record("anthropic:fp-dead", Outcome.AUTH_FAILED, CD, model="claude", status=401)
    h.record("openai:fp-idle", Outcome.OK, CD, model="gpt-4o", status=200)
    now[0] = 502.0  # two seconds later: 10.5 s left on the pair, 298 s on the dead key
    report = keys_report(LABELS, h.snapshot(LABELS), WALL)
    assert report == [
        {"provider": "anthropic", "source": "managed", "key_id": "pool-1", "access_key": None,
         "model": None, "state": "dead", "until": "2026-01-02T03:09:03.000Z",
         "reason": "auth_failed", "last_status": 401, "quota": []},
        {"provider": "openai", "source": "attached", "key_id": "team-key", "access_key": "team",
         "model": "gpt-4o", "state": "cooling", "until": "2026-01-02T03:04:15.500Z",
         "reason": "rate_limited", "last_status": 429, "quota": []},
        {"provider": "openai", "source": "policy", "key_id": "pol", "access_key": None,
         "model": "gpt-4o", "state": "cooling", "until": "2026-01-02T03:04:15.500Z",
         "reason": "rate_limited", "last_status": 429, "quota": []},
        {"provider": "openai", "source": "policy", "key_id": "spare", "access_key": None,
         "model": None, "state": "ok", "until": None, "reason": None, "last_status": 200, "quota": []},
    ]  # fmt: skip
    assert not any("fp-" in str(v) for entry in report for v in entry.values())


def test_keys_report_skips_health_of_keys_the_runtime_no_longer_has() -> None:
    h = KeyHealth(lambda: 0.0)
    snapshot = h.snapshot(["openai:gone"])
    assert keys_report(LABELS, snapshot, WALL) == []
