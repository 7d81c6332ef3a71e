"""Memory of `make bench`: a proxy's resident set, idle and with many streams held open.

`hold_streams` opens streams through a proxy with a raw asyncio client (plain sockets,
HTTP/1.1 written by hand: no client library's buffers in the way), each a streaming chat
request for a model with the mock's `drip-N` directive — an answer that keeps sending a
content event every N ms and never ends — and keeps them open while it samples the
proxy's RSS, then hangs up on all of them. Resident sets come from /proc/<pid>/status
(Linux; None elsewhere).
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

DEFAULT_STREAMS: Final = 1000
STREAM_MODEL: Final = "gpt-4o-mini-drip-2000"  # the mock: a content event every 2 s, no end
IDLE_GOAL_MIB: Final = 60.0  # issue 14, the sidecar idle
STREAMS_GOAL_MIB: Final = 150.0  # issue 14, the sidecar with 1,000 open streams
AFTER_SECONDS: Final = 3.0  # how long after the hang-up the RSS is read again
_FD_RESERVE: Final = 256  # descriptors a process needs besides the streams
_OPEN_TIMEOUT: Final = 10.0  # one stream: connect, headers (and its first event, if waited for)
_OPEN_DEADLINE: Final = 60.0  # all of them
_CLOSE_TIMEOUT: Final = 5.0
_SAMPLE_EVERY: Final = 0.25


def parse_vmrss_kib(status: str) -> int | None:
    """The `VmRSS:  12345 kB` line of /proc/<pid>/status, in KiB (the kernel's "kB")."""
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            parts = line.split()
            return int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else None
    return None


def rss_kib(pid: int) -> int | None:
    """The resident set of process `pid` now, in KiB; None when it cannot be read."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return parse_vmrss_kib(f.read())
    except OSError:
        return None


def mib(kib: int | None) -> float | None:
    return None if kib is None else kib / 1024


def raise_nofile() -> int:
    """The soft open-files limit raised to the hard one (best effort; processes started after
    this inherit it); returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def stream_cap(requested: int, nofile: int) -> int:
    """How many streams fit under the open-files limit `nofile`: a relaying proxy holds two
    descriptors per stream (the caller's and the upstream's) besides its own."""
    if nofile == resource.RLIM_INFINITY or nofile < 0:
        return requested
    return max(0, min(requested, (nofile - _FD_RESERVE) // 2))


def stream_request(host: str, port: int, path: str, token: str, model: str) -> bytes:
    """One streaming chat completion request, HTTP/1.1, as bytes on the wire."""
    body = (f'{{"model":"{model}","messages":[{{"role":"user","content":"Hold this stream '
            'open, please."}],"stream":true}').encode()  # fmt: skip
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")  # fmt: skip
    return head.encode() + body


class StreamRefused(Exception):
    """The proxy answered a stream with something other than 200."""


def status_of(head: bytes) -> int:
    """The status code of a response head (`HTTP/1.1 200 OK\\r\\n...`); 0 when unreadable."""
    parts = head.split(b"\r\n", 1)[0].split(b" ", 2)
    return int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else 0


def describe_error(exc: BaseException) -> str:
    """A short kind of failure for the counts: never the request (it carries the token)."""
    if isinstance(exc, StreamRefused):
        return str(exc)
    if isinstance(exc, TimeoutError):
        return "timeout"
    return type(exc).__name__


async def open_stream(host: str, port: int, request: bytes, *,
                      first_event: bool = False) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:  # fmt: skip
    """Connect, send `request`, and wait for a 200 head (and with `first_event`, the stream's
    first event); the connection is closed again on any failure (cancellation included)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        status = status_of(head)
        if status != 200:
            raise StreamRefused(f"HTTP {status}")
        if first_event:
            await reader.readuntil(b"\n\n")  # relayed end to end
    except BaseException:
        writer.close()
        raise
    return reader, writer


@dataclass(slots=True)
class Hold:
    """What holding streams through one proxy gave."""

    requested: int
    opened: int = 0
    open_seconds: float = 0.0  # from the first connect until every stream was open (or failed)
    peak_kib: int | None = None  # the proxy's largest RSS while they were all open
    errors: Counter[str] = field(default_factory=Counter)

    def summary(self) -> str:
        """`1000 of 1000 open in 2.1 s`, and the failures by kind if any."""
        text = f"{self.opened} of {self.requested} open in {self.open_seconds:.1f} s"
        if self.errors:
            text += " (failed: " + ", ".join(f"{k} {n}" for k, n in self.errors.most_common()) + ")"
        return text


Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def open_streams(host: str, port: int, request: bytes, count: int, errors: Counter[str], *,
                       first_event: bool, concurrency: int = 100) -> list[Stream]:  # fmt: skip
    """Open `count` streams (`concurrency` at a time, all within `_OPEN_DEADLINE`): those that
    opened; the others are counted in `errors` by kind. Interrupted, it closes what it opened."""
    streams: list[Stream] = []
    gate = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with gate:
            try:
                streams.append(await asyncio.wait_for(
                    open_stream(host, port, request, first_event=first_event), _OPEN_TIMEOUT))  # fmt: skip
            except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                    StreamRefused) as exc:  # fmt: skip
                errors[describe_error(exc)] += 1

    tasks = [asyncio.create_task(one()) for _ in range(count)]
    try:
        _, pending = await asyncio.wait(tasks, timeout=_OPEN_DEADLINE) if tasks else ((), ())
        for task in pending:
            task.cancel()
        # (one that opened just as it was cancelled still counts as open, and is kept)
        await asyncio.gather(*pending, return_exceptions=True)
        late = sum(task.cancelled() for task in pending)
        if late:
            errors[f"not open within {_OPEN_DEADLINE:.0f} s"] += late
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # then none can add a stream
        await close_streams([writer for _, writer in streams])
        raise
    return streams


async def close_streams(writers: list[asyncio.StreamWriter]) -> None:
    """Hang up on every stream, waiting for the closes at most `_CLOSE_TIMEOUT`."""
    for writer in writers:
        writer.close()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*(w.wait_closed() for w in writers),
                                              return_exceptions=True), _CLOSE_TIMEOUT)  # fmt: skip


async def hold_streams(host: str, port: int, request: bytes, count: int,
                       sample: Callable[[], int | None], *, hold_seconds: float,
                       concurrency: int = 100) -> Hold:  # fmt: skip
    """Open `count` streams (`concurrency` at a time), keep them open for `hold_seconds` while
    `sample()` (an RSS in KiB) is read every quarter second, then hang up on all of them."""
    hold = Hold(count)
    writers: list[asyncio.StreamWriter] = []
    started = time.monotonic()
    try:
        streams = await open_streams(host, port, request, count, hold.errors, first_event=True,
                                     concurrency=concurrency)  # fmt: skip
        writers = [writer for _, writer in streams]
        hold.open_seconds = time.monotonic() - started
        hold.opened = len(writers)
        end = time.monotonic() + hold_seconds
        while True:
            hold.peak_kib = _larger(hold.peak_kib, sample())
            if time.monotonic() >= end:
                break
            await asyncio.sleep(_SAMPLE_EVERY)
    finally:
        await close_streams(writers)
    return hold


def _larger(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else max(a, b)


# --------------------------------------------------------------------------- report


@dataclass(frozen=True, slots=True)
class MemoryRow:
    """One proxy's resident sets, in KiB."""

    target: str
    idle: int | None  # after start and the smoke requests
    before: int | None  # after every wrk run and the live streams, just before the streams
    hold: Hold | None = None  # None: no streams (--streams 0)
    after: int | None = None  # AFTER_SECONDS after the hang-up


def _cell(kib: int | None, width: int) -> str:
    value = mib(kib)
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.1f}"


def memory_lines(rows: list[MemoryRow], streams: int, after_seconds: float) -> list[str]:
    """The memory section: a table of RSS in MiB, then one line per sidecar with the issue's
    goals beside its numbers (printed, never judged)."""
    if not rows:
        return []
    held = f"{streams} streams"
    how = ("streams held open with the mock's never-ending `drip` answer" if streams
           else "no streams held (--streams 0)")  # fmt: skip
    lines = [f"MEMORY resident set (VmRSS of the process, MiB = 2^20 bytes); {how}; issue goals "
             f"for the sidecar: idle ≤ {IDLE_GOAL_MIB:g}, with 1000 open streams ≤ "
             f"{STREAMS_GOAL_MIB:g}, back near idle after",
             f"{'target':<15}{'idle':>7}{'after load':>12}"
             + (f"{held:>15}{f'{after_seconds:g} s after':>12}  streams" if streams else "")]  # fmt: skip
    for row in rows:
        line = f"{row.target:<15}{_cell(row.idle, 7)}{_cell(row.before, 12)}"
        if streams and row.hold is not None:
            line += f"{_cell(row.hold.peak_kib, 15)}{_cell(row.after, 12)}  {row.hold.summary()}"
        lines.append(line)
    lines += [goal_line(row, after_seconds) for row in rows if row.target.startswith("sidecar")]
    return lines


def goal_line(row: MemoryRow, after_seconds: float) -> str:
    """`sidecar: idle 52.3 MiB (goal ≤ 60), 1000 open streams 131.0 MiB (goal ≤ 150), ...`."""
    line = f"  {row.target}: idle {_cell(row.idle, 0)} MiB (goal ≤ {IDLE_GOAL_MIB:g})"
    if row.hold is not None:
        line += (f", {row.hold.opened} open streams {_cell(row.hold.peak_kib, 0)} MiB (goal ≤ "
                 f"{STREAMS_GOAL_MIB:g} with 1000), {after_seconds:g} s after they closed "
                 f"{_cell(row.after, 0)} MiB")  # fmt: skip
        if row.after is not None and row.idle is not None:
            line += f" ({(row.after - row.idle) / 1024:+.1f} over idle)"
    return line
