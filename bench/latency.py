"""wrk's latency histograms: read from its output, added together, and their percentiles.

bench/chat.lua's `done()` prints every latency wrk recorded (whole microseconds, as wrk
stores them) with how many requests took it: `BENCH-LATENCY 812:3 815:1 ...`. A measured
run made of several wrk runs (slices, bench/run.py) adds their histograms, so its p50 and
p99 are those of all its requests, exactly as one wrk run of the same requests would have
reported them, and not a median of the slices' own percentiles. No I/O here.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Final

MARK: Final = "BENCH-LATENCY "

Histogram = Mapping[int, int]  # latency in µs -> requests that took it


def parse(line: str) -> dict[int, int]:
    """One `BENCH-LATENCY` line (with or without its mark) as a histogram. Raises
    ValueError on anything but `value:count` pairs of whole non-negative numbers."""
    text = line.removeprefix(MARK)
    histogram: dict[int, int] = {}
    for pair in text.split():
        value, sep, count = pair.partition(":")
        if not (sep and value.isdigit() and count.isdigit()):
            raise ValueError(f"not a latency:count pair: {pair[:40]!r}")
        histogram[int(value)] = histogram.get(int(value), 0) + int(count)
    return histogram


def added(histograms: Iterable[Histogram]) -> dict[int, int]:
    """The histogram of all the requests of `histograms` together."""
    total: Counter[int] = Counter()
    for histogram in histograms:
        total.update(histogram)
    return dict(total)


def percentile(histogram: Histogram, p: float) -> float:
    """The `p`-th percentile in µs (0 < p < 100), by wrk's own rule (`stats_percentile`): the
    smallest latency whose requests, with all faster ones, reach the rank
    `round(p% of n + 0.5)`. NaN for an empty histogram; the largest latency for p = 100
    (where wrk's rank is out of reach and it answers 0)."""
    n = sum(histogram.values())
    if n <= 0:
        return math.nan
    rank = math.floor(p / 100 * n + 0.5 + 0.5)  # C's round(): halves away from zero
    seen = 0
    for value in sorted(histogram):
        seen += histogram[value]
        if seen >= rank:
            return float(value)
    return float(max(histogram))


def maximum(histogram: Histogram) -> float:
    return float(max(histogram)) if histogram else math.nan
