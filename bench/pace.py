"""Fixed-rate runs of `make bench`: wrk paced by a timetable in its Lua `delay()` hook.

wrk is closed-loop: a connection sends its next request when the previous
answer is complete. With `delay()` defined, it first waits that many
milliseconds. bench/chat.lua's `delay()` books each request a time on a
timetable of its wrk thread (one request every `threads * 1000 / rate` ms, on
the monotonic clock) and waits until then, so the requests go out at the rate
asked for, evenly spread, whatever the answers take: no calibration, and the
same offered load for every target. `connections` are enough that one is
nearly always free when a request is due (50 at 1,000 req/s: at a few ms an
answer, a handful are busy at once).

This is not wrk2's open loop: a request due while every connection of its
thread is busy waits for one, and its latency is counted from when it was
sent, not from when it was due (coordinated omission). A request that falls
behind the timetable goes out as soon as a connection is free, so the rate
over the run stays the one asked for unless the server cannot keep up, which
the achieved rate then shows. No I/O here: bench/run.py runs wrk.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

DEFAULT_RATE: Final = 1000  # req/s offered to each target in the fixed-rate run
DEFAULT_RATE_ROUNDS: Final = 5  # fixed-rate rounds per target and mode (the median p99 counts)
PER_CONNECTION_MS: Final = 50.0  # connections: enough for one request per 50 ms each
OFF_TARGET: Final = 0.05  # a run further than 5% from the target rate did not run at that rate
ADDED_P99_GOAL_MS: Final = 2.0  # issue 14: sidecar p99 minus pass-through p99 at 1,000 req/s
_MINUS: Final = "\u2212"  # the report's minus sign, as in `sidecar − pass-through`  # noqa: RUF003


@dataclass(frozen=True, slots=True)
class Pace:
    """What wrk is told for a fixed rate: `rate` req/s over `connections` and `threads`."""

    rate: float  # req/s offered, all connections together
    connections: int  # a multiple of `threads`: wrk gives each thread connections ÷ threads
    threads: int

    @classmethod
    def start(cls, rate: float, threads: int) -> Pace:
        """Connections for about one request per `PER_CONNECTION_MS` each."""
        if rate <= 0 or threads < 1:
            raise ValueError("a fixed rate needs rate > 0 and at least one thread")
        per_thread = max(1, round(rate * PER_CONNECTION_MS / 1000 / threads))
        return cls(rate, per_thread * threads, threads)

    @property
    def every_ms(self) -> float:
        """The time between two requests of one wrk thread (its timetable's step)."""
        return self.threads * 1000 / self.rate

    def off_by(self, achieved: float) -> float:
        """`achieved` req/s relative to the target: -0.03 is 3% short."""
        return achieved / self.rate - 1

    def on_target(self, achieved: float, tolerance: float = OFF_TARGET) -> bool:
        return abs(self.off_by(achieved)) <= tolerance

    def env(self) -> dict[str, str]:
        """What bench/chat.lua reads to pace its requests."""
        return {"BENCH_RATE": f"{self.rate:g}", "BENCH_THREADS": str(self.threads)}


def describe(pace: Pace, seconds: int, rounds: int = 1) -> str:
    """The fixed-rate section's title."""
    each = (f"one run of {seconds} s" if rounds == 1 else
            f"{rounds} rounds of one {seconds} s run per target (the order alternating), the "
            "run with the median p99 shown")  # fmt: skip
    return (f"FIXED RATE {pace.rate:g} req/s offered to each target, {each} (a timetable, "
            f"not wrk2's open loop: {pace.connections} connections on {pace.threads} wrk "
            f"threads, each thread sending one request every {pace.every_ms:g} ms)")  # fmt: skip


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
