"""Requests in flight on the proxy port, for the shutdown drain (docs/reference.md#shutdown).

The proxy handler enters and leaves each request here (a dict insert and delete:
no middleware or signal on the hot path); the drain waits until none is left and,
at its deadline, cuts the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Final, Protocol

from sidecar.logs import OpLog
from sidecar.metrics import Metrics


class _Transport(Protocol):
    def is_closing(self) -> bool: ...
    def abort(self) -> None: ...


class Tracked(Protocol):
    """What the drain needs of a request (the proxy's `Exchange`)."""

    @property
    def transport(self) -> _Transport | None: ...
    @property
    def provider(self) -> str: ...

    request_id: str
    streaming: bool  # its response headers were sent: cutting it breaks a stream


#: Requests in flight at once that make a burst, after which memory is given back.
BURST: Final = 256
#: In flight at most this many again: the burst is over.
_CALM: Final = BURST // 8
#: How long after a burst ends memory is given back.
_AFTER_BURST_S: Final = 1.0


class InFlight:
    def __init__(self, after_burst: Callable[[], object] | None = None) -> None:
        self._requests: dict[int, Tracked] = {}  # by id(): one entry per request being handled
        self._idle = asyncio.Event()
        self._idle.set()
        self._peak = 0
        self._after_burst = after_burst

    def enter(self, tracked: Tracked) -> None:
        requests = self._requests
        requests[id(tracked)] = tracked
        if len(requests) > self._peak:
            self._peak = len(requests)
        self._idle.clear()

    def leave(self, tracked: Tracked) -> None:
        requests = self._requests
        requests.pop(id(tracked), None)
        if not requests:
            self._idle.set()
        if self._peak >= BURST and len(requests) <= _CALM:  # a burst is over
            self._peak = len(requests)
            if self._after_burst is not None:
                asyncio.get_running_loop().call_later(_AFTER_BURST_S, self._after_burst)

    def __len__(self) -> int:
        return len(self._requests)

    async def wait_idle(self, within: float) -> bool:
        if not self._requests:
            return True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(within, 0.0)):
                await self._idle.wait()
        return not self._requests

    def cut(self, metrics: Metrics, oplog: OpLog) -> int:
        """End every request still running as a broken stream is ended: the connection
        closes without a terminator, so the caller's SDK sees the break."""
        cut = 0
        for tracked in list(self._requests.values()):
            transport = tracked.transport
            if transport is None or transport.is_closing():
                continue
            if tracked.streaming:
                metrics.stream_interruptions.labels(tracked.provider, "shutdown").inc()
                oplog.warning("stream_interrupted", request_id=tracked.request_id,
                              provider=tracked.provider, cause="shutdown")  # fmt: skip
            transport.abort()  # at once, even toward a caller that reads nothing
            cut += 1
        return cut
