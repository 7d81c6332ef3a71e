"""Requests in flight on the proxy port, for the shutdown drain (docs/reference.md#shutdown).

The proxy handler enters and leaves each request here (a dict insert and delete:
no middleware or signal on the hot path); the drain waits until none is left and,
at its deadline, cuts the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol

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


class InFlight:
    def __init__(self) -> None:
        self._requests: dict[int, Tracked] = {}  # by id(): one entry per request being handled
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self, tracked: Tracked) -> None:
        self._requests[id(tracked)] = tracked
        self._idle.clear()

    def leave(self, tracked: Tracked) -> None:
        self._requests.pop(id(tracked), None)
        if not self._requests:
            self._idle.set()

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
