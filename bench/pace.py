"""Fixed-rate runs of `make bench`: wrk paced by its Lua `delay()` hook (bench/chat.lua).

wrk is closed-loop: a connection sends its next request when the previous
answer is complete. With `delay()` defined, it first waits that many
milliseconds. `C` connections that each wait `d` ms after an answer that took
`L` ms send `C * 1000 / (d + L + t)` requests per second, `t` being wrk's own
timer slack. `Pace` starts from a guess of `L + t`, and `adjusted` takes the
rate a short calibration run achieved to find the `d` that makes the rest of
the cycle add up to the target interval (`C * 1000 / rate` ms). The
connections start at evenly spread moments of one interval (bench/chat.lua),
so the requests arrive spread out, not in bursts of `C`.

This is not wrk2's open loop: a request is never sent while the previous one
of its connection is still out, so a stall longer than the interval delays
the requests behind it instead of adding them to the latency histogram
(coordinated omission). At 1,000 req/s on 50 connections the interval is
50 ms against answers of a few ms, so that only matters for stalls of tens
of milliseconds; the achieved rate is reported, so a run where it happened
shows it. No I/O here: bench/run.py runs wrk.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

DEFAULT_RATE: Final = 1000  # req/s offered to each target in the fixed-rate run
DEFAULT_RATE_ROUNDS: Final = 3  # fixed-rate runs per target and mode (the median p99 counts)
INTERVAL_MS: Final = 50.0  # the time between two requests of one connection, at the target rate
TOLERANCE: Final = 0.02  # an achieved rate within 2% of the target needs no more calibration
OFF_TARGET: Final = 0.05  # a run further than 5% from the target rate did not run at that rate
CALIBRATION_SECONDS: Final = 1  # one calibration run
ADDED_P99_GOAL_MS: Final = 2.0  # issue 14: sidecar p99 minus pass-through p99 at 1,000 req/s
_MINUS: Final = "\u2212"  # the report's minus sign, as in `sidecar − pass-through`  # noqa: RUF003
_CYCLE_GUESS_MS: Final = 1.0  # latency + wrk's timer slack, before any calibration


@dataclass(frozen=True, slots=True)
class Pace:
    """What wrk is told for a fixed rate: `connections` over `threads`, each waiting
    `delay_ms` after an answer before its next request."""

    rate: float  # req/s offered, all connections together
    connections: int  # a multiple of `threads`: wrk gives each thread connections ÷ threads
    threads: int
    delay_ms: float

    @classmethod
    def start(cls, rate: float, threads: int) -> Pace:
        """About one request per `INTERVAL_MS` per connection, before any calibration."""
        if rate <= 0 or threads < 1:
            raise ValueError("a fixed rate needs rate > 0 and at least one thread")
        per_thread = max(1, round(rate * INTERVAL_MS / 1000 / threads))
        pace = cls(rate, per_thread * threads, threads, 0.0)
        return dataclasses.replace(pace, delay_ms=max(0.0, pace.interval_ms - _CYCLE_GUESS_MS))

    @property
    def interval_ms(self) -> float:
        """Each connection's time from one request to its next, at the target rate."""
        return self.connections * 1000 / self.rate

    def off_by(self, achieved: float) -> float:
        """`achieved` req/s relative to the target: -0.03 is 3% short."""
        return achieved / self.rate - 1

    def on_target(self, achieved: float, tolerance: float = TOLERANCE) -> bool:
        return abs(self.off_by(achieved)) <= tolerance

    def adjusted(self, achieved: float) -> Pace:
        """The delay under which a run that achieved `achieved` req/s would have hit the target,
        the rest of each cycle (the answer's latency, wrk's timer slack) staying what it was.
        Zero when the rest alone exceeds the interval: the target is out of reach."""
        if achieved <= 0:
            return self
        rest = self.connections * 1000 / achieved - self.delay_ms
        return dataclasses.replace(self, delay_ms=max(0.0, self.interval_ms - rest))

    def env(self) -> dict[str, str]:
        """What bench/chat.lua reads to pace its connections."""
        return {
            "BENCH_DELAY_MS": f"{self.delay_ms:.4f}",
            "BENCH_INTERVAL_MS": f"{self.interval_ms:.4f}",
            "BENCH_CONNECTIONS": str(self.connections),
            "BENCH_THREADS": str(self.threads),
        }


def calibrate(trial: Callable[[Pace], float], pace: Pace, runs: int) -> tuple[Pace, list[float]]:
    """Run `trial` (a short wrk run: achieved req/s) at most `runs` times, adjusting the delay
    after each run that missed the target. Returns the pace to measure with (the last
    adjustment, unverified when every run missed) and the rates the trials achieved."""
    rates: list[float] = []
    for _ in range(runs):
        achieved = trial(pace)
        rates.append(achieved)
        if pace.on_target(achieved):
            break
        pace = pace.adjusted(achieved)
    return pace, rates


def describe(pace: Pace, seconds: int, runs: int, rounds: int = 1) -> str:
    """The fixed-rate section's title."""
    each = (f"one run of {seconds} s" if rounds == 1 else
            f"{rounds} rounds of one {seconds} s run per target (the order alternating), the "
            "run with the median p99 shown")  # fmt: skip
    return (f"FIXED RATE {pace.rate:g} req/s offered to each target, {each} "
            f"(paced closed loop, not wrk2: {pace.connections} connections, each waiting a "
            f"calibrated delay after an answer, ≈ one request per {pace.interval_ms:.0f} ms; "
            f"up to {runs} calibration run(s) of {CALIBRATION_SECONDS} s first)")  # fmt: skip


def added_p99_line(mode: str, sidecar: str, rate: float, added_ms: float, *,
                   rounds: Sequence[float] = (), reached: bool = True, width: int = 8) -> str:  # fmt: skip
    """`added p99 at N req/s: sidecar MINUS pass-through = X ms`, the issue's goal beside it
    (never judged: a benchmark prints, it does not fail). `added_ms`: the median over the
    rounds of each round's difference, `rounds` those differences (shown when more than one).
    `reached`: whether every run achieved the rate (within `OFF_TARGET`, either way); when not,
    the line says the difference is not one at N req/s."""
    line = (f"  {mode:<{width}}added p99 at {rate:g} req/s: {sidecar} {_MINUS} pass-through = "
            f"{added_ms:.2f} ms")  # fmt: skip
    if len(rounds) > 1:
        line += f" (median of {', '.join(f'{r:.2f}' for r in rounds)})"
    line += f" (issue goal ≤ {ADDED_P99_GOAL_MS:g} ms)"
    if not reached:
        line += (f"; NOT at {rate:g} req/s: a run was more than {OFF_TARGET:.0%} off it (see "
                 "`off by`): below it, its p99 includes queueing at saturation; above it, it "
                 "carried more load than asked")  # fmt: skip
    return line
