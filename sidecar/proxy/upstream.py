"""One upstream attempt: build it for its candidate, send it, and read it up to the point
where its answer could go to the caller.

A failover-status answer is read (bounded) and returned as `failed`; a JSON answer is
read whole inside the attempt, so a body that breaks before any byte reached the caller
still fails over; an SSE stream is read until its first content event (the first-token
hold, docs/reference.md#failover-and-key-health), so a stream that stalls or errors
before that still fails over too.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from sidecar import inbound
from sidecar.deadlines import deadline
from sidecar.health import (
    OUTCOME_OK,
    Outcome,
    answer_status,
    classify_status,
    is_quota_exhausted,
    retry_after_of,
)
from sidecar.keys import SOURCE_PASSTHROUGH
from sidecar.plan import Candidate
from sidecar.proxy.client import UpstreamResponse
from sidecar.proxy.exchange import Exchange
from sidecar.proxy.outbound import Outbound, translated_headers
from sidecar.quota import parse_quota_headers
from sidecar.secret import SENSITIVE_HEADERS
from sidecar.state import State
from sidecar.streams import StreamTracker
from sidecar.upstream_url import upstream_url
from sidecar.upstreams import auth_header

HOP_BY_HOP: Final = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
     "trailers", "transfer-encoding", "upgrade", "host", "content-length"}
)  # fmt: skip
#: Request headers never forwarded: hop-by-hop, credentials, and encodings aiohttp negotiates
#: itself; the body goes out decoded (`inbound.decode_body`), so never under its old encoding.
_DROP_REQUEST: Final = (
    HOP_BY_HOP | SENSITIVE_HEADERS | {"accept-encoding", "expect", "content-encoding"}
)
_FAILED_BODY_LIMIT: Final = 1 << 20
#: Answers whose body is masked before it is relayed (an auth error may quote the key), so
#: read whole (up to `_FAILED_BODY_LIMIT`, the rest dropped) whatever their media type.
MASKED: Final = frozenset({401, 403})
#: A successful JSON answer is read whole (for metering, and so a body that breaks can
#: still fail over) up to this size; a larger one is relayed as it arrives.
_READ_WHOLE_LIMIT: Final = 8 << 20
#: A stream's events before its first content are held at most this long (bytes); past it
#: the stream is relayed as it is.
_HOLD_LIMIT: Final = 1 << 20
_JSON_HEADERS: Final = CIMultiDictProxy(CIMultiDict({"content-type": "application/json"}))

#: A failover-status answer kept in case it is the last one: (status, headers, body).
Failed = tuple[int, "CIMultiDictProxy[str]", bytes]


@dataclass(slots=True)
class Result:
    """What one attempt produced."""

    outcome: Outcome
    status: int | None = None
    upstream: UpstreamResponse | None = None  # an answer for the caller
    body: bytes | None = None  # its body, when read whole (JSON)
    failed: Failed | None = None  # a failover-status answer
    retry_after: float | None = None
    quota: bool = False
    timed_out: bool = False  # the attempt ran into timeouts.total
    #: what was already read of an answer relayed as it arrives (a stream's held events,
    #: or the start of a body too large to hold): relayed first
    prefix: bytes = b""
    tracker: StreamTracker | None = None  # an SSE stream's tracker, its first content seen
    complete: bool = False  # the whole stream is in `prefix` (it ended without content)
    inband: bool = False  # `failed` is an in-band error event, not an HTTP status


@dataclass(slots=True)
class Prepared:
    """What every attempt of one request shares."""

    query: str  # raw, the caller's credentials stripped
    headers: CIMultiDict[str]  # end-to-end request headers, no credentials


def prepare(ex: Exchange) -> Prepared:
    token = ex.token.reveal() if ex.token else ""
    base_headers = _forward_headers(ex.request.headers, token)
    query = inbound.strip_credentials(ex.request.rel_url.raw_query_string, (token,))
    return Prepared(query, base_headers)


def target(cand: Candidate, prep: Prepared, out: Outbound) -> tuple[URL, CIMultiDict[str]]:
    """URL and headers for one attempt."""
    p = cand.provider
    query = prep.query if out.caller_query else ""
    own = f"{out.query}&{p.query}" if out.query and p.query else (out.query or p.query)
    if query and own:  # the attempt's own parameters cannot be overridden by the caller
        query = inbound.strip_credentials(query, drop=[q.partition("=")[0] for q in own.split("&")])
    params = f"{query}&{own}" if query and own else (query or own)
    url = upstream_url(p.base_url, out.path, params)
    if out.translation is None:
        headers = prep.headers.copy()
    else:
        headers = translated_headers(prep.headers, out.chat_headers)
    operators = cand.key.source is not SOURCE_PASSTHROUGH  # else the caller's own key
    for name, secret in p.headers if operators else p.open_headers:  # never the vault's to a caller
        headers[name] = secret.reveal()
    auth = auth_header(p.auth if operators else _caller_auth(p.auth), cand.key.secret)
    if auth is not None:
        headers[auth[0]] = auth[1]
    return url, headers


async def attempt(
    state: State,
    ex: Exchange,
    cand: Candidate,
    url: URL,
    headers: CIMultiDict[str],
    body: bytes,
    budget: float,
    tracker: StreamTracker | None,
) -> Result:
    """Send one attempt and read it up to where its answer could go to the caller.

    `tracker` is given for a streaming request: a 2xx SSE answer is then held until its
    first content event, within `timeouts.first_token` (which also bounds the wait for
    the headers); otherwise `timeouts.per_request` bounds the attempt until its answer
    (a JSON answer: read whole; then `stream_idle` bounds each read of its body).
    """
    cfg = ex.runtime.config
    timeouts = cfg.timeouts
    key = cand.key
    sent = time.perf_counter()
    ends = sent + budget  # perf_counter clock
    upstream: UpstreamResponse | None = None
    failover = False
    loop = ex.loop
    idle = timeouts.stream_idle
    limit = timeouts.first_token if tracker is not None else timeouts.per_request
    try:
        with deadline(loop.time() + min(limit, budget), loop) as timer:
            upstream = await state.client.request(ex.request.method, url, headers, body)
            ttfb = time.perf_counter() - sent
            state.metrics.upstream_ttfb.observe((key.provider,), ttfb)
            status = upstream.status
            if key.source is not SOURCE_PASSTHROUGH:  # a caller's own key keeps no state
                _note_quota(state, cand, upstream.headers, status)
            failover = status in cfg.failover.on_status
            # An auth error may quote the key: read (bounded), to be masked (`relay.masked`),
            # whatever its media type; never relayed as it arrives.
            held = failover or status in MASKED
            ctype = upstream.headers.get("content-type", "")
            if not held and "json" not in ctype:
                if tracker is not None and status < 300 and "text/event-stream" in ctype:

                    def answering() -> None:  # content held back from the caller: per gap now
                        left = max(0.001, ends - time.perf_counter())
                        timer.reschedule(loop.time() + min(idle, left))

                    res = await _hold(upstream, tracker, answering)
                    ex.upstream_wait += time.perf_counter() - sent
                    return res
                ex.upstream_wait += ttfb  # other media: relayed as it arrives
                return Result(classify_status(status), status, upstream=upstream)
            # The body is still before the caller's first byte: timeouts.total bounds it too.
            timer.reschedule(loop.time() + min(idle, max(0.001, ends - time.perf_counter())))
            answer, whole = await _read_body_of(
                upstream, _FAILED_BODY_LIMIT if held else _READ_WHOLE_LIMIT
            )
            if not whole and not held:  # too large to hold: relay it as it arrives
                ex.upstream_wait += time.perf_counter() - sent
                return Result(classify_status(status), status, upstream=upstream, prefix=answer)
    except asyncio.CancelledError:  # the caller left: stop the upstream's generation too
        if upstream is not None:
            upstream.close()
        raise
    except (TimeoutError, aiohttp.ClientError) as exc:
        if upstream is None or not failover:  # no answer, or its body broke: next candidate
            if upstream is not None:
                upstream.release()
            waited = time.perf_counter() - sent
            ex.upstream_wait += waited
            if isinstance(exc, TimeoutError):
                state.oplog.warning("upstream_timeout", request_id=ex.request_id,
                                    provider=key.provider, key_id=key.key_id,
                                    waited_s=round(waited, 3))  # fmt: skip
                return Result(Outcome.TIMEOUT, timed_out=time.perf_counter() >= ends)
            state.oplog.warning("upstream_error", request_id=ex.request_id, provider=key.provider,
                                key_id=key.key_id, error=type(exc).__name__)  # fmt: skip
            return Result(Outcome.CONNECT_ERROR)
        answer = b""  # a failover-status answer whose body did not arrive: still that status
    ex.upstream_wait += time.perf_counter() - sent
    upstream.release()
    status = upstream.status
    if status == 400:  # what some upstreams mean by it depends on the body
        status = answer_status(status, answer)
    failover = failover or status in cfg.failover.on_status
    outcome = classify_status(status)
    if not failover:
        return Result(outcome, status, upstream=upstream, body=answer)
    state.oplog.warning("upstream_failed", request_id=ex.request_id, provider=key.provider,
                        key_id=key.key_id, status=status, outcome=outcome.value)  # fmt: skip
    res = failed_result(status, upstream.headers, answer)
    res.failed = (upstream.status, upstream.headers, answer)  # relayed as the upstream said it
    return res


def _note_quota(
    state: State, cand: Candidate, headers: CIMultiDictProxy[str], status: int
) -> None:
    """Keep what the provider says is left for this key and model; a key with nothing left
    is held back until the provider's reset time (docs/reference.md#quota-aware-key-order)."""
    readings = parse_quota_headers(headers, time.monotonic(), time.time())
    if not readings:
        return
    hid = cand.key.health_id
    model = cand.upstream_model or ""
    until = state.quota.record(hid, model, readings)
    if until is None:
        return
    was_cooling = state.health.cooling_until(hid, model) is not None
    state.health.hold(hid, model, until, Outcome.RATE_LIMITED, status)
    if not was_cooling:  # once, not on every answer that says so again
        key = cand.key
        state.oplog.info("key_quota_used_up", provider=key.provider, source=key.source.value,
                         key_id=key.key_id, model=model,
                         reset_in_s=round(until - time.monotonic(), 3))  # fmt: skip


def failed_result(status: int, headers: CIMultiDictProxy[str], body: bytes) -> Result:
    res = Result(classify_status(status), status, failed=(status, headers, body))
    if status == 429:
        res.retry_after = retry_after_of(headers, body)
        res.quota = is_quota_exhausted(body)
    return res


async def _hold(
    upstream: UpstreamResponse, tracker: StreamTracker, answering: Callable[[], None]
) -> Result:
    """Read a 2xx stream until its first content event (within the caller's timer).

    Before it, an in-band error fails over like the same HTTP error, and a stream that
    breaks, or sends what is not SSE, fails over like a dropped connection. A stream
    that ends complete without content (an empty answer) is an answer. Content that the
    caller's format holds back (a Gemini caller's function calls, sent whole at the end)
    keeps the hold, so that the attempt can still fail over, but the upstream is answering:
    `answering()` is called after each of its chunks (the timer then bounds each gap).
    """
    # What to relay once content comes: the first chunk's output as it is (usually all there
    # is), anything more copied after it.
    first = b""
    more: bytearray | None = None
    content = upstream.content
    status = upstream.status
    while not tracker.content_seen:
        chunk = await content.readany()
        if not chunk:
            tail = tracker.finish()
            if tracker.error is None and not tracker.malformed:
                done = tracker.complete_on_eof()
                if done is not None:  # complete and empty: that is the answer
                    upstream.release()
                    return Result(OUTCOME_OK, status, upstream=upstream,
                                  prefix=b"".join((more or first, tail, done)), tracker=tracker,
                                  complete=True)  # fmt: skip
            upstream.release()
            return _broken_before_content(tracker)
        out = tracker.feed(chunk)
        if not out and tracker.content_held:  # (only a translation holds content back)
            answering()
        if more is not None:
            more += out
        elif not first:
            first = out
        elif out:
            more = bytearray(first)
            more += out
        if (tracker.error is not None or tracker.malformed) and not tracker.content_seen:
            upstream.release()
            return _broken_before_content(tracker)
        if len(more or first) > _HOLD_LIMIT:
            break  # a preamble this long: relay it as it is
    prefix = first if more is None else bytes(more)
    return Result(OUTCOME_OK, status, upstream=upstream, prefix=prefix, tracker=tracker)


def _broken_before_content(tracker: StreamTracker) -> Result:
    err = tracker.error
    if err is not None:  # an in-band error: as if the upstream had answered with it
        res = failed_result(err.status, _JSON_HEADERS, err.body)
        res.inband = True
        return res
    return Result(Outcome.CONNECT_ERROR)


def _forward_headers(incoming: CIMultiDictProxy[str], token: str) -> CIMultiDict[str]:
    """End-to-end request headers; never a credential, nor any header carrying the caller's token."""
    out: CIMultiDict[str] = CIMultiDict()
    add = out.add
    connection = incoming.get("connection")
    # Headers named in `Connection` are hop-by-hop too (RFC 9110 §7.6.1).
    drop = (
        _DROP_REQUEST | {t.strip().lower() for t in connection.split(",")}
        if connection
        else _DROP_REQUEST
    )
    for name, value in incoming.items():
        lname = name.lower()
        if lname in drop or lname.startswith("x-sidecar-") or (token and token in value):
            continue
        add(name, value)
    return out


def _caller_auth(auth: str) -> str:
    return "bearer" if auth == "none" else auth


async def _read_body_of(upstream: UpstreamResponse, limit: int) -> tuple[bytes, bool]:
    """An upstream body up to about `limit` decoded bytes, and whether that was all of it.

    aiohttp decompresses in bounded chunks, so a compressed answer never unpacks past
    the limit here. The caller's timer bounds the wait.
    """
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = await upstream.content.readany()
        if not chunk:
            return b"".join(chunks), True
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks), upstream.content.at_eof()
