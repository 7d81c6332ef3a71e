"""Deadlines on one loop timer (sidecar/deadlines.py): the pure schedule, then the
context manager on a real event loop."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from sidecar.deadlines import Schedule, deadline

# --------------------------------------------------------------------------- the schedule


def _log(fired: list[str], name: str):  # type: ignore[no-untyped-def]
    return lambda: fired.append(name)


def test_due_fires_in_time_order_and_only_what_is_due() -> None:
    s = Schedule()
    fired: list[str] = []
    s.add(3.0, _log(fired, "c"))
    s.add(1.0, _log(fired, "a"))
    s.add(2.0, _log(fired, "b"))
    for action in s.due(2.0):
        action()
    assert fired == ["a", "b"]
    assert s.live == 1
    assert s.earliest() == 3.0


def test_a_cancelled_entry_never_fires() -> None:
    s = Schedule()
    fired: list[str] = []
    e = s.add(1.0, _log(fired, "a"))
    s.cancel(e)
    s.cancel(e)  # twice is harmless
    assert s.due(5.0) == []
    assert s.live == 0
    assert s.earliest() is None


def test_an_entry_moved_later_is_filed_again_at_its_new_time() -> None:
    s = Schedule()
    fired: list[str] = []
    e = s.add(1.0, _log(fired, "a"))
    e.when = 4.0  # what Deadline.reschedule does for a later time
    assert s.due(2.0) == []  # its old time came: filed again, not fired
    assert s.earliest() == 4.0
    for action in s.due(4.0):
        action()
    assert fired == ["a"]


def test_dead_entries_are_dropped_once_they_outnumber_the_live_ones() -> None:
    s = Schedule()
    keep = [s.add(1000.0 + i, lambda: None) for i in range(10)]
    for i in range(10_000):
        s.cancel(s.add(float(i), lambda: None))
    assert s.live == len(keep)
    assert len(s) <= 2 * s.live + 64


# --------------------------------------------------------------------------- on a loop


async def test_a_deadline_that_passes_raises_timeout_error() -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError), deadline(loop.time() + 0.05):
        await asyncio.sleep(5)
    assert loop.time() - started < 2


async def test_a_deadline_given_its_loop_never_asks_asyncio_for_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # On Python 3.11 asking (get_running_loop, current_task()) is a getpid() system call.
    loop = asyncio.get_running_loop()

    def asked() -> None:
        raise AssertionError("the running loop was looked up")

    monkeypatch.setattr(asyncio, "get_running_loop", asked)
    current_task = asyncio.current_task

    def current(loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Task[Any] | None:
        if loop is None:  # without its loop, C looks the loop up (and calls getpid)
            asked()
        return current_task(loop)

    monkeypatch.setattr(asyncio, "current_task", current)
    started = loop.time()
    with pytest.raises(TimeoutError), deadline(loop.time() + 0.05, loop):
        await asyncio.sleep(5)
    assert loop.time() - started < 2
    with deadline(None, loop) as d:
        d.reschedule(loop.time() + 30)
        await asyncio.sleep(0)


async def test_nothing_happens_when_the_block_ends_in_time() -> None:
    loop = asyncio.get_running_loop()
    with deadline(loop.time() + 0.05):
        await asyncio.sleep(0)
    await asyncio.sleep(0.1)  # its time passes after the block: the task is not cancelled


async def test_moving_it_after_the_block_ended_arms_nothing() -> None:
    # A late reschedule must not cancel the task in whatever it runs next (on a caller's
    # connection: its next request).
    loop = asyncio.get_running_loop()
    with deadline(loop.time() + 10, loop) as d:
        pass
    d.reschedule(loop.time() + 0.01)
    await asyncio.sleep(0.1)  # cancelled here if the deadline were armed again


async def test_moving_it_later_keeps_the_block_running() -> None:
    loop = asyncio.get_running_loop()
    with deadline(loop.time() + 0.05) as d:
        for _ in range(4):
            d.reschedule(loop.time() + 0.05)
            await asyncio.sleep(0.03)  # 0.12 s in all: more than the first deadline


async def test_moving_it_earlier_cuts_sooner() -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()

    async def cut() -> None:
        with deadline(loop.time() + 30) as d:
            d.reschedule(loop.time() + 0.05)
            await asyncio.sleep(5)

    with pytest.raises(TimeoutError):
        await cut()
    assert loop.time() - started < 2


async def test_none_means_no_deadline_until_one_is_set() -> None:
    loop = asyncio.get_running_loop()

    async def set_later() -> None:
        with deadline(None) as inner:
            inner.reschedule(loop.time() + 0.02)
            await asyncio.sleep(5)

    with deadline(None) as d:
        await asyncio.sleep(0.02)
        with pytest.raises(TimeoutError):
            await set_later()
        d.reschedule(None)


async def test_a_cancellation_from_elsewhere_stays_a_cancellation() -> None:
    loop = asyncio.get_running_loop()

    async def guarded() -> None:
        with deadline(loop.time() + 30):
            await asyncio.sleep(5)

    task = asyncio.ensure_future(guarded())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_nested_deadlines_each_answer_for_their_own() -> None:
    loop = asyncio.get_running_loop()
    with deadline(loop.time() + 30):
        with pytest.raises(TimeoutError), deadline(loop.time() + 0.02):
            await asyncio.sleep(5)
        await asyncio.sleep(0.01)  # the outer one is still in force, not expired


async def test_many_concurrent_deadlines_each_fire_once_at_their_time() -> None:
    loop = asyncio.get_running_loop()
    outcomes: list[str] = []

    async def one(delay: float, work: float) -> None:
        try:
            with deadline(loop.time() + delay):
                await asyncio.sleep(work)
            outcomes.append("done")
        except TimeoutError:
            outcomes.append("timeout")

    await asyncio.gather(*(one(0.05, 5 if i % 2 else 0.001) for i in range(40)))
    assert outcomes.count("timeout") == 20
    assert outcomes.count("done") == 20


def test_a_deadline_outside_a_task_is_refused() -> None:
    async def outside() -> None:
        with deadline(None):
            pass

    coro = outside()
    with pytest.raises(RuntimeError):
        coro.send(None)
    coro.close()


def test_a_finished_loop_is_not_kept_alive_by_its_schedule() -> None:
    import gc
    import weakref

    loop = asyncio.new_event_loop()

    async def use() -> None:
        with deadline(asyncio.get_running_loop().time() + 30):
            await asyncio.sleep(0)

    loop.run_until_complete(use())
    loop.close()
    gone = weakref.ref(loop)
    del loop
    gc.collect()
    assert gone() is None
