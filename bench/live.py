"""Live streams of `make bench`: what relaying one event costs a proxy.

The CPU rounds' streams are short answers that reach the proxy whole, in one read. A model's
real stream comes event by event, each in a read of its own, over seconds: then the proxy's
cost is paid per event (a read, the meter's look at the event, a write to the caller).
`relay_streams` opens streams through a proxy with the raw client of bench/memory.py, each a
streaming chat request for a model with the mock's `drip-N` directive (one content event
every N ms, no end), reads every event as it comes, and after a warm-up counts, over a
window, the events that reached it and the proxy's CPU time (`cpu()`): CPU µs per relayed
event. No wrk: the events' pace is the mock's.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from bench.memory import Stream, close_streams, describe_error, open_streams

DEFAULT_STREAMS: Final = 100  # streams held open through each proxy at once
DRIP_MS: Final = 40  # the mock sends each of them one event every 40 ms
WARM_SECONDS: Final = 1.0  # after every stream is open, before the window
_READ: Final = 1 << 16
_EVENT_END: Final = b"\n\n"  # an SSE event's end, as the mock writes it (`\n` line ends)
_ENDED: Final = "ended early"  # a stream the proxy ended (or broke) before the bench hung up
_LAST_CHUNK: Final = b"\r\n0\r\n\r\n"  # a chunked body's end: the previous chunk's, then `0`


def model(drip_ms: int = DRIP_MS) -> str:
    return f"gpt-4o-mini-drip-{drip_ms}"


@dataclass(slots=True)
class Relayed:
    """What one window of live streams through one proxy gave."""

    requested: int
    opened: int = 0
    events: int = 0  # events that reached the client within the window
    seconds: float = 0.0  # the window
    cpu_seconds: float | None = None  # the proxy's, over the window
    errors: Counter[str] = field(default_factory=Counter)

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0

    @property
    def us_per_event(self) -> float:
        if self.cpu_seconds is None or not self.events:
            return float("nan")
        return self.cpu_seconds / self.events * 1e6

    @property
    def core_percent(self) -> float:
        if self.cpu_seconds is None or not self.seconds:
            return float("nan")
        return self.cpu_seconds / self.seconds * 100


class EventCounter:
    """Counts SSE event ends (`\\n\\n`) in a body read in pieces, an end split across two reads
    too. Good for the mock's events (one line each, whole in their chunk of the chunked
    framing, whose own line ends are `\\r\\n`); not a general SSE parser."""

    __slots__ = ("_tail", "count")

    def __init__(self) -> None:
        self.count = 0
        self._tail = b""  # the last bytes fed: an event's end or the body's, split across reads

    def feed(self, data: bytes) -> bool:
        """Count the events ended in `data`; True when it ends the chunked body (its last chunk,
        `0`): the proxy ended the stream, and the connection stays open for the next request."""
        if not data:
            return False
        self.count += (self._tail[-1:] + data[:1]).count(_EVENT_END) + data.count(_EVENT_END)
        self._tail = (self._tail + data)[-len(_LAST_CHUNK) :]
        return self._tail == _LAST_CHUNK


async def _read_all(reader: asyncio.StreamReader, counter: EventCounter, relayed: Relayed,
                    closing: asyncio.Event) -> None:  # fmt: skip
    """Read a stream to its end, counting its events; one the proxy ended or broke before the
    bench hung up (`closing`) is counted in `relayed.errors`."""
    try:
        while data := await reader.read(_READ):
            if counter.feed(data):
                break
    except OSError as exc:
        if not closing.is_set():
            relayed.errors[describe_error(exc)] += 1
        return
    if not closing.is_set():
        relayed.errors[_ENDED] += 1


async def relay_streams(host: str, port: int, request: bytes, count: int,
                        cpu: Callable[[], float | None], *, seconds: float,
                        warm: float = WARM_SECONDS, concurrency: int = 100) -> Relayed:  # fmt: skip
    """Open `count` streams (`concurrency` at a time), read all they send; after `warm`
    seconds, count the events and the proxy's CPU time (`cpu()`, seconds) over `seconds`;
    then hang up on all of them. Streams that failed to open, or that the proxy ended before
    the hang-up, are counted in `errors` by kind."""
    relayed = Relayed(count)
    if count <= 0:
        return relayed
    closing = asyncio.Event()
    streams: list[Stream] = []
    readers: list[asyncio.Task[None]] = []
    try:
        streams = await open_streams(host, port, request, count, relayed.errors,
                                     first_event=False, concurrency=concurrency)  # fmt: skip
        relayed.opened = len(streams)
        # (a head and its first event may have come in one read: counting starts after `warm`)
        counters = [EventCounter() for _ in streams]  # one a stream: a read is its stream's only
        readers = [asyncio.create_task(_read_all(r, c, relayed, closing))
                   for (r, _), c in zip(streams, counters, strict=True)]  # fmt: skip
        await asyncio.sleep(warm)
        events, before, started = sum(c.count for c in counters), cpu(), time.monotonic()
        await asyncio.sleep(seconds)
        relayed.events, after = sum(c.count for c in counters) - events, cpu()
        relayed.seconds = time.monotonic() - started
        if before is not None and after is not None:
            relayed.cpu_seconds = after - before
    finally:
        closing.set()
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        await close_streams([writer for _, writer in streams])
    return relayed


def added(runs: list[Relayed]) -> Relayed:
    """Several windows of one proxy as one: events, seconds and CPU added up."""
    total = Relayed(sum(r.requested for r in runs), sum(r.opened for r in runs),
                    sum(r.events for r in runs), sum(r.seconds for r in runs))  # fmt: skip
    cpus = [r.cpu_seconds for r in runs]
    total.cpu_seconds = None if any(c is None for c in cpus) else sum(c for c in cpus if c is not None)
    for r in runs:
        total.errors.update(r.errors)
    return total


def live_lines(rows: list[tuple[str, Relayed]], streams: int, drip_ms: int, seconds: float,
               rounds: int) -> list[str]:  # fmt: skip
    """The live-streams section: per proxy, events per second, CPU µs per relayed event and %
    of a core; then each sidecar's µs per event over the pass-through's."""
    if not rows:
        return []
    rate = streams * 1000 / drip_ms
    lines = [f"LIVE STREAMS {streams} streams held open through each proxy, each sent one event "
             f"every {drip_ms} ms by the mock ({rate:,.0f} events/s), each event in a read of its "
             f"own; proxy CPU per event relayed, over {rounds} window(s) of {seconds:g} s (the "
             "proxies taking turns)",
             f"{'target':<15}{'events/s':>9}{'CPU µs/event':>14}{'% of a core':>13}  streams"]  # fmt: skip
    for name, r in rows:
        opened = f"{r.opened} of {r.requested} open"
        if r.errors:
            opened += " (failed: " + ", ".join(f"{k} {n}" for k, n in r.errors.most_common()) + ")"
        lines.append(f"{name:<15}{r.events_per_second:>9.0f}{r.us_per_event:>14.1f}"
                     f"{r.core_percent:>13.0f}  {opened}")  # fmt: skip
    base = dict(rows).get("pass-through")
    for name, r in rows:
        measured = r.us_per_event == r.us_per_event  # (NaN: no CPU reading, or no event)
        if base is not None and name.startswith("sidecar") and base.us_per_event > 0 and measured:
            ratio = r.us_per_event / base.us_per_event
            lines.append(f"  {name} ÷ pass-through: {ratio:.2f}x per event relayed "
                         f"({r.us_per_event - base.us_per_event:+.1f} µs)")  # fmt: skip
    return lines
