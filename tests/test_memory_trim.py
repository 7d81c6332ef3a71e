"""Memory given back after a burst (sidecar/inflight.py, sidecar/memory.py)."""

from __future__ import annotations

import asyncio
import platform
from dataclasses import dataclass

from sidecar import memory
from sidecar.inflight import BURST, InFlight


@dataclass
class _Req:
    request_id: str
    streaming: bool = False
    transport: None = None
    provider: str = "openai"


async def test_a_burst_that_calms_down_gives_memory_back_once() -> None:
    calls: list[int] = []
    inflight = InFlight(after_burst=lambda: calls.append(len(inflight)))
    reqs = [_Req(str(i)) for i in range(BURST)]
    for r in reqs:
        inflight.enter(r)
    for r in reqs:
        inflight.leave(r)
    await asyncio.sleep(1.2)
    assert len(calls) == 1  # once, when it calmed down; not once per request after that
    inflight.enter(reqs[0])
    inflight.leave(reqs[0])
    await asyncio.sleep(1.2)
    assert len(calls) == 1  # ordinary traffic after it: no more


async def test_ordinary_traffic_never_gives_back() -> None:
    calls: list[int] = []
    inflight = InFlight(after_burst=lambda: calls.append(1))
    reqs = [_Req(str(i)) for i in range(BURST - 1)]
    for _ in range(3):
        for r in reqs:
            inflight.enter(r)
        for r in reqs:
            inflight.leave(r)
    await asyncio.sleep(1.2)
    assert calls == []


def test_give_back_trims_on_glibc() -> None:
    on_glibc = platform.libc_ver()[0] == "glibc"
    assert memory.give_back() is on_glibc  # elsewhere it does nothing, and never raises
