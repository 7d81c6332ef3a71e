"""Relaying an upstream answer to the caller: a JSON body read whole, a body relayed as it
arrives, or an SSE stream pumped event by event until it ends or breaks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
from aiohttp import web

from sidecar.deadlines import Deadline, deadline
from sidecar.formats import Adapter, adapter_for
from sidecar.plan import Candidate
from sidecar.proxy import answer
from sidecar.proxy.client import UpstreamResponse
from sidecar.proxy.exchange import CLIENT_CLOSED, Exchange
from sidecar.proxy.upstream import MASKED, Failed
from sidecar.secret import mask_key_fragments
from sidecar.state import State
from sidecar.streams import StreamTracker
from sidecar.translate import Translation
from sidecar.usage import Usage, usage_from_tail

#: How much of an answer that cannot be translated is read for its error message.
_UNREADABLE_HEAD: Final = 4096
#: How much of the end of an answer relayed unread is kept to find its `usage`.
_USAGE_TAIL: Final = 64 << 10


@dataclass(frozen=True, slots=True)
class Break:
    """Why a stream that had started did not end complete."""

    cause: str  # upstream_closed | idle_timeout | inband_error | malformed | caller_gone
    message: str = ""  # the upstream's own words, for an in-band error

    @property
    def caller_gone(self) -> bool:
        return self.cause == "caller_gone"


CALLER_GONE: Final = Break("caller_gone")


def _must_wait(ex: Exchange, size: int) -> bool:
    """Whether writing `size` more bytes may wait for the caller to read: its connection is
    paused (above the transport's high-water mark, until it drains to the low one), or these
    bytes push it there. Otherwise the write goes straight to the socket buffer."""
    request = ex.request
    transport = request.transport
    if transport is None:
        return False
    protocol = request.protocol
    if protocol is not None and protocol.writing_paused:
        return True
    return transport.get_write_buffer_size() + size > transport.get_write_buffer_limits()[1]


#: aiohttp's `StreamWriter.write` drains (and so may wait) once this many bytes were written
#: since its last drain (its `LIMIT`; aiohttp is pinned in constraints.txt).
_DRAIN_AT: Final = answer.DRAIN_AT


class CallerStalled(Exception):
    """The caller took nothing for `stream_idle`: it is treated as gone (its connection is
    closed, nothing more is written to it)."""


def _size(resp: web.StreamResponse, data: bytes) -> int:
    """What writing `data` adds to the caller's buffer: with chunk framing and a held head."""
    head = getattr(resp._payload_writer, "_headers_buf", None)  # it goes out with this write
    return len(data) + 16 + (len(head) if head else 0)


async def send(ex: Exchange, resp: web.StreamResponse, data: bytes) -> None:
    """Write to the caller; a write that must wait for it to read waits at most `stream_idle`."""
    size = _size(resp, data)
    writer = resp._payload_writer  # aiohttp's writer waits only past _DRAIN_AT since its last drain
    if (writer is not None and writer.buffer_size + size <= _DRAIN_AT) or not _must_wait(ex, size):
        await resp.write(data)
        return
    await _bounded(ex, resp.write(data))


async def end(ex: Exchange, resp: web.StreamResponse, data: bytes = b"") -> None:
    """End the caller's response, `data` its last bytes, in one write with the end (it waits
    for what is buffered to drain). A whole answer's body goes out in that write too: up to
    8 MiB, which a caller may take slowly, but not take nothing of for `stream_idle`."""
    body = resp._body  # a whole answer's (`answer.Answer`, `web.Response`); else None
    size = _size(resp, data) + (len(body) if isinstance(body, (bytes, bytearray)) else 0)
    if not _must_wait(ex, size):
        await resp.write_eof(data)
        return
    await _bounded(ex, resp.write_eof(data))


async def _bounded(ex: Exchange, write: Coroutine[Any, Any, None]) -> None:
    """Await `write`, which waits for the caller to read; a caller that takes nothing for
    `stream_idle` is let go (`CallerStalled`, its connection closed)."""
    idle = ex.runtime.config.timeouts.stream_idle
    try:
        await while_taking(ex.loop, ex.request.transport, idle, write)
    except TimeoutError:
        close_caller(ex)
        raise CallerStalled from None


async def while_taking(
    loop: asyncio.AbstractEventLoop,
    transport: asyncio.WriteTransport | None,
    idle: float,
    write: Coroutine[Any, Any, None],
) -> None:
    """Await `write`, which waits for the peer to read what `transport` holds. TimeoutError
    once the peer took nothing for `idle`; a peer that keeps taking bytes, however slowly,
    is waited for (a whole answer of several MiB may take longer than `idle`)."""
    with deadline(loop.time() + idle, loop) as timer:
        watch = None if transport is None else _Taking(loop, transport, timer, idle)
        try:
            await write
        finally:
            if watch is not None:
                watch.stop()


class _Taking:
    """Moves a write's deadline `idle` on from each look (every quarter of `idle`) that finds
    the caller took bytes since the last one: the transport's buffer got smaller (nothing
    else writes to it meanwhile). So a caller is let go between `idle` and 1.25 times `idle`
    after it stopped reading."""

    __slots__ = ("_every", "_handle", "_idle", "_last", "_loop", "_timer", "_transport")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        transport: asyncio.WriteTransport,
        timer: Deadline,
        idle: float,
    ) -> None:
        self._loop = loop
        self._transport = transport
        self._timer = timer
        self._idle = idle
        self._every = idle / 4
        self._last: int | None = None  # the buffer's size at the last look
        # The first look once the write is under way (it fills the buffer first).
        self._handle: asyncio.Handle = loop.call_soon(self._look)

    def _look(self) -> None:
        transport = self._transport
        if transport.is_closing():
            return
        size = transport.get_write_buffer_size()
        if self._last is not None and size < self._last:
            self._timer.reschedule(self._loop.time() + self._idle)
        self._last = size
        self._handle = self._loop.call_later(self._every, self._look)

    def stop(self) -> None:
        self._handle.cancel()


def respond(
    ex: Exchange,
    upstream: UpstreamResponse,
    body: bytes,
    adapter: Adapter,
    translation: Translation | None = None,
) -> web.StreamResponse:
    """A JSON answer read whole (its usage is metered from the body, in the caller's format)."""
    status = upstream.status
    ex.status = status
    if status < 300:
        # Metered from what the upstream said, in its own format: an answer that cannot be
        # translated was still paid for.
        meter = adapter if translation is None else adapter_for(translation.upstream)
        ex.usage = meter.usage_from_body(body)
    # Masked as the upstream sent it: a translation keeps only the start of an error.
    body = masked(status, body, ex.candidate)
    if translation is not None:
        body = _translated(ex, translation, status, body)
        status = ex.status
    content_type = None if translation is None else "application/json"
    return answer.answer(ex.request, status, upstream.headers.items(), ex.sidecar_headers(),
                         body, content_type)  # fmt: skip


def respond_failed(
    ex: Exchange, cand: Candidate, failed: Failed, translation: Translation | None = None
) -> web.StreamResponse:
    """The last failover-status answer, when every candidate failed."""
    status, failed_headers, failed_body = failed
    ex.candidate = cand
    ex.status = status
    body = masked(status, failed_body, cand)  # before a translation keeps only its start
    if translation is not None:
        body = translation.error(status, body)
    # Translated, the upstream's page, whatever it was, is now a JSON error.
    content_type = None if translation is None else "application/json"
    return answer.answer(ex.request, status, failed_headers.items(), ex.sidecar_headers(),
                         body, content_type)  # fmt: skip


async def respond_unreadable(
    ex: Exchange, upstream: UpstreamResponse, translation: Translation
) -> web.Response:
    """A translated attempt's answer that is neither JSON nor SSE, or too large to hold: it
    cannot be translated. An error keeps its status, its start read as the error's message;
    anything else is the caller's 502. Never the upstream's own bytes in the wrong format."""
    head = b""
    try:
        async with asyncio.timeout(ex.runtime.config.timeouts.stream_idle):
            head = await upstream.content.read(_UNREADABLE_HEAD)
    except (TimeoutError, aiohttp.ClientError):
        pass
    finally:
        upstream.close()  # the rest is not wanted
    status = upstream.status
    if status < 300:
        status, head = 502, b"the upstream's answer could not be translated"
    ex.status = status
    head = masked(status, head, ex.candidate)  # before a translation keeps only its start
    body = translation.error(status, head)
    return web.Response(status=status, body=body, content_type="application/json",
                        headers=ex.sidecar_headers())  # fmt: skip


def _translated(ex: Exchange, translation: Translation, status: int, body: bytes) -> bytes:
    """An upstream's answer or error in the caller's format; an answer that cannot be read
    as one becomes the caller's 502."""
    if status >= 300:
        return translation.error(status, body)
    model = ex.candidate.upstream_model if ex.candidate else None
    out = translation.response(body, model or "")
    if out is None:
        ex.status = 502
        return translation.error(502, b"the upstream's answer could not be translated")
    return out


async def open_stream(ex: Exchange, upstream: UpstreamResponse) -> web.StreamResponse:
    """Prepare the caller's response: its head is held, to go out with the first `send`
    (the events held so far, in one write), or alone at `send_head`."""
    ex.status = upstream.status
    resp = answer.stream(ex.request, upstream.status, upstream.headers.items(),
                         ex.sidecar_headers())  # fmt: skip
    await resp.prepare(ex.request)
    ex.streaming = True
    return resp


def send_head(resp: web.StreamResponse) -> None:
    """Send a prepared response's head now, if it is still held."""
    if isinstance(resp, answer.Stream):
        resp.send_head()


async def pump(
    ex: Exchange,
    resp: web.StreamResponse,
    upstream: UpstreamResponse,
    tracker: StreamTracker,
    out: bytes = b"",
) -> Break | bytes:
    """Relay a started SSE stream, `out` what was read of it and not yet written, until it
    ends or breaks (why). At its end, what came with the upstream's end is returned unwritten:
    the caller's end goes out with it, in one write (`end`).

    `stream_idle` bounds every gap, a deadline moved on per chunk, which also covers a
    caller taking nothing. A clean end without the format's terminator is a break unless
    the answer had finished (then the terminator is added).
    """
    # Per chunk, so what it calls is looked up once.
    content = upstream.content
    readany = content.readany
    at_eof = content.at_eof
    feed = tracker.feed
    clock = ex.loop.time
    perf = time.perf_counter
    idle = ex.runtime.config.timeouts.stream_idle
    wrote = False
    try:
        with deadline(None, ex.loop) as timer:
            reschedule = timer.reschedule
            # (also stopped by the chunk that carried the first content)
            while not tracker.stopped:
                if at_eof():
                    # The upstream's end: what a translation still held comes out now.
                    out += tracker.finish()
                    break
                if out:
                    writer = resp._payload_writer  # `send`'s own first test, inlined, but
                    if (  # for the first write: a head still held goes with it (`send`)
                        wrote
                        and writer is not None
                        and writer.buffer_size + len(out) + 16 <= _DRAIN_AT
                    ):
                        await resp.write(out)
                    else:
                        await send(ex, resp, out)
                    wrote = True
                t = perf()
                reschedule(clock() + idle)
                chunk = await readany()
                ex.upstream_wait += perf() - t
                out = feed(chunk) if chunk else b""
            # Stopped (an in-band error, a malformed event), truncated, or finished and then
            # its tail lost (the handler ends that one): what was read goes out, then why.
            done = None if tracker.stopped else tracker.complete_on_eof()
            if done is None or done or tracker.cut:
                if out:
                    await send(ex, resp, out)
                if tracker.stopped:
                    return _stopped(tracker)
                return Break("upstream_closed" if done is None else "tail_lost")
            return out
    except (ConnectionResetError, CallerStalled):  # a caller that went away, or took nothing
        return CALLER_GONE
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError) as exc:
        if ex.caller_gone:
            return CALLER_GONE
        if isinstance(exc, TimeoutError) and _must_wait(ex, 0):
            close_caller(ex)  # the timer ran out while the caller took nothing
            return CALLER_GONE
        return Break("idle_timeout" if isinstance(exc, TimeoutError) else "upstream_closed")
    finally:
        upstream.release()


def _stopped(tracker: StreamTracker) -> Break:
    """Why a stream the tracker stopped forwarding broke: an in-band error or a malformed event."""
    if tracker.error is not None:
        return Break("inband_error", tracker.error.message)
    return Break("malformed")


async def relay_body(
    state: State,
    ex: Exchange,
    upstream: UpstreamResponse,
    adapter: Adapter,
    prefix: bytes = b"",
) -> web.StreamResponse:
    """Relay an answer that is not SSE chunk by chunk as it arrives (media, or a JSON body
    too large to hold: `prefix` is what was already read of it, its usage read from its tail).
    A break ends the caller's connection without the body's end, so the client sees it."""
    usage_tail = bytearray(prefix[-_USAGE_TAIL:])
    content = upstream.content
    loop = ex.loop
    idle = ex.runtime.config.timeouts.stream_idle
    try:
        resp = await open_stream(ex, upstream)
    except BaseException:  # the caller's side failed first: the upstream's answer is not wanted
        upstream.close()
        raise
    try:
        if prefix:
            await send(ex, resp, prefix)
        else:
            send_head(resp)
        with deadline(None, loop) as timer:
            while True:
                t = time.perf_counter()
                timer.reschedule(loop.time() + idle)
                chunk = await content.readany()
                ex.upstream_wait += time.perf_counter() - t
                if not chunk:
                    break
                usage_tail += chunk
                del usage_tail[:-_USAGE_TAIL]
                await send(ex, resp, chunk)
        await end(ex, resp)
    except (ConnectionResetError, CallerStalled):
        ex.status = CLIENT_CLOSED
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError) as exc:
        if ex.caller_gone:
            ex.status = CLIENT_CLOSED
        elif isinstance(exc, TimeoutError) and _must_wait(ex, 0):
            close_caller(ex)  # the timer ran out while the caller took nothing (as in `pump`)
            ex.status = CLIENT_CLOSED
        else:
            interrupted(
                state, ex, "idle_timeout" if isinstance(exc, TimeoutError) else "upstream_closed"
            )
            close_caller(ex)
    finally:
        upstream.release()
        if upstream.status < 300:
            ex.usage = usage_from_tail(adapter.format, bytes(usage_tail)) or Usage(
                max(1, ex.body_size // 4), 0
            )
    return resp


def interrupted(state: State, ex: Exchange, cause: str) -> None:
    state.metrics.stream_interruptions.labels(ex.provider, cause).inc()
    key_id = ex.candidate.key.key_id if ex.candidate else ""
    state.oplog.warning("stream_interrupted", request_id=ex.request_id, provider=ex.provider,
                        key_id=key_id, cause=cause)  # fmt: skip


def close_caller(ex: Exchange) -> None:
    """End the caller's response without its terminator: the client sees the break."""
    transport = ex.request.transport
    if transport is not None:
        transport.close()


def masked(status: int, body: bytes, cand: Candidate | None) -> bytes:
    """Auth-error wording may quote part of the provider key: mask it before relaying."""
    if status not in MASKED or not body:
        return body
    secrets = [cand.key.secret] if cand is not None and cand.key.secret is not None else []
    return mask_key_fragments(body, secrets)
