"""What a finished request leaves behind: metrics, spend, the access-log line."""

from __future__ import annotations

import time
from typing import Final

from sidecar import inbound
from sidecar.proxy.exchange import CLIENT_CLOSED, Exchange
from sidecar.state import State
from sidecar.usage import Usage

#: Precomputed status label strings.
_STATUS: Final = {code: str(code) for code in range(100, 600)}


def account(state: State, ex: Exchange) -> None:
    """Metrics, metering and the access-log line of one finished request."""
    duration = time.perf_counter() - ex.started
    overhead = ex.overhead if ex.overhead is not None else duration - ex.upstream_wait
    provider = ex.provider
    m = state.metrics
    m.requests.inc((ex.fmt, provider, _STATUS.get(ex.status) or str(ex.status)))
    m.request_duration.observe((ex.fmt, provider), duration)
    m.overhead.observe((ex.fmt,), overhead)
    c = ex.candidate
    usage = ex.usage
    for earlier, spent in ex.charges:  # every attempt that produced tokens is paid for
        state.billing.record(ex.runtime.prices, ex.access, earlier, spent)
    if usage is not None and c is not None:
        state.billing.record(ex.runtime.prices, ex.access, c, usage)
    # What the whole request metered: the last attempt's usage and every earlier one's.
    total = usage
    if ex.charges and usage is not None:
        total = Usage(
            usage.input_tokens + sum(u.input_tokens for _, u in ex.charges),
            usage.output_tokens + sum(u.output_tokens for _, u in ex.charges),
        )
    if ex.ticket is not None:  # the rate-limit estimate, settled with what was metered
        used = None
        if total is not None:
            used = total.input_tokens + total.output_tokens
        elif c is None or (ex.status >= 400 and ex.status != CLIENT_CLOSED):
            # Nothing went upstream, or it answered with an error: no tokens spent. A caller
            # that left mid-answer may have been paid for upstream: its estimate stands.
            used = 0
        state.admission.settle(ex.ticket, used)
    if ex.trace is not None:
        _end_trace(ex, total)
    if state.access_log.enabled:
        state.access_log.write(
            {
                "ts": time.time(),
                "request_id": ex.request_id,
                "access_key": ex.access.name if ex.access else None,
                "method": ex.request.method,
                "path": _logged_path(ex),
                "format": ex.fmt,
                "provider": provider or None,
                "model": c.upstream_model if c else None,
                "key_source": c.key.labels[1] if c else None,  # the source's value, precomputed
                "key_id": c.key.key_id if c else None,
                "attempts": ex.attempts,
                "status": ex.status,
                "resumed": ex.resumed,
                "translated": ex.translated,
                # Milliseconds to 3 places: round() to an integer is a third of round(x, 3).
                "duration_ms": round(duration * 1e6) / 1000,
                "overhead_ms": round(overhead * 1e6) / 1000,
                "input_tokens": total.input_tokens if total else None,
                "output_tokens": total.output_tokens if total else None,
            }
        )


def _logged_path(ex: Exchange) -> str:
    request = ex.request
    query = request.rel_url.raw_query_string
    if not query:
        return request.path
    tokens = (ex.token.reveal(),) if ex.token else ()
    return f"{request.path}?{inbound.redact_query(query, tokens)}"


def _end_trace(ex: Exchange, usage: Usage | None) -> None:
    """The request's server span: what it came to, `usage` all its attempts' tokens."""
    assert ex.trace is not None
    c = ex.candidate
    ex.trace.end(ex.status, request_model=c.model.requested if c and c.model else None,
                 response_model=c.upstream_model if c else None, usage=usage,
                 access_key=ex.access.name if ex.access else None,
                 error="client_closed" if ex.status == CLIENT_CLOSED else None)  # fmt: skip
