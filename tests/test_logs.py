"""sidecar/logs.py: the timestamp every log line carries."""

from __future__ import annotations

import datetime
import random

import pytest

from sidecar.logs import _iso


@pytest.mark.parametrize("ts", [0.0, 1.5, 1795815060.0, 1795815060.0005, 1795815060.999,
                                1795815060.9999999, 1795815061.25])  # fmt: skip
def test_a_timestamp_is_utc_to_the_millisecond_truncated(ts: float) -> None:
    dt = datetime.datetime.fromtimestamp(int(ts), datetime.UTC)
    millis = int((ts - int(ts)) * 1000)
    assert _iso(ts) == dt.strftime("%Y-%m-%dT%H:%M:%S") + f".{millis:03d}Z"


def test_many_timestamps_match_the_calendar() -> None:
    rng = random.Random(7)
    for _ in range(20000):
        ts = rng.uniform(0, 4e9)
        dt = datetime.datetime.fromtimestamp(int(ts), datetime.UTC)
        assert _iso(ts) == dt.strftime("%Y-%m-%dT%H:%M:%S") + f".{int((ts - int(ts)) * 1000):03d}Z"
