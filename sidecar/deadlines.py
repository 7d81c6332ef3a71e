"""Deadlines for the request path, on one loop timer (docs/reference.md#timeouts).

`asyncio.timeout` arms a loop timer when entered, cancels it when left and re-arms it on
every `reschedule`; on uvloop each of those allocates or closes a libuv timer. A request
needs two or three deadlines, and a stream moves one on every chunk. Here all of them are
entries in one heap (`Schedule`, pure: it is told the time), and each event loop keeps a
single timer armed for the earliest. Moving a deadline later, the usual move (a stream's
idle deadline after each chunk), only changes a number: the entry is filed again when its
old time comes. Leaving a deadline marks its entry dead; dead entries are dropped when they
come up, or all at once when they outnumber the live ones, so the heap stays bounded by
the deadlines in use.

`deadline(when)` is used like `asyncio.timeout_at(when)`, as a plain `with`: when `when`
passes, the task is cancelled and the block raises `TimeoutError`; a cancellation that
came from elsewhere stays a `CancelledError`.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import weakref
from collections.abc import Callable
from types import TracebackType
from typing import Final

#: Dead entries tolerated beyond the live ones before the heap is rebuilt without them.
_SLACK: Final = 64


class Entry:
    """One deadline in a `Schedule`: `when` may move later in place; `action` None = dead."""

    __slots__ = ("action", "when")

    def __init__(self, when: float, action: Callable[[], None]) -> None:
        self.when = when
        self.action: Callable[[], None] | None = action


class Schedule:
    """Deadlines in a heap, with lazy moves and lazy removal. Pure: the caller says `now`."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Entry]] = []
        self._seq = itertools.count()
        self.live = 0

    def __len__(self) -> int:
        """Entries held, dead ones included (at most twice the live ones, plus a slack)."""
        return len(self._heap)

    def add(self, when: float, action: Callable[[], None]) -> Entry:
        entry = Entry(when, action)
        heapq.heappush(self._heap, (when, next(self._seq), entry))
        self.live += 1
        return entry

    def cancel(self, entry: Entry) -> None:
        if entry.action is None:
            return
        entry.action = None
        self.live -= 1
        if len(self._heap) > 2 * self.live + _SLACK:
            self._heap = [(e.when, seq, e) for _, seq, e in self._heap if e.action is not None]
            heapq.heapify(self._heap)

    def due(self, now: float) -> list[Callable[[], None]]:
        """Remove and return the actions of the live entries whose time has come, in order."""
        heap = self._heap
        fired: list[Callable[[], None]] = []
        while heap and heap[0][0] <= now:
            _, seq, entry = heapq.heappop(heap)
            action = entry.action
            if action is None:
                continue
            if entry.when > now:  # moved later since it was filed
                heapq.heappush(heap, (entry.when, seq, entry))
                continue
            entry.action = None
            self.live -= 1
            fired.append(action)
        return fired

    def earliest(self) -> float | None:
        """When the next entry comes up (it may turn out dead or moved: a wake-up too many)."""
        heap = self._heap
        while heap and heap[0][2].action is None:
            heapq.heappop(heap)
        return heap[0][0] if heap else None


class _LoopDeadlines:
    """A `Schedule` driven by one timer of its event loop.

    It keeps no handle of that timer: a timer superseded by an earlier one is left to fire
    and is ignored then, so nothing here refers to the loop but weakly (the loop's timer
    refers to this), and a closed loop is not kept alive."""

    __slots__ = ("__weakref__", "_armed", "_loop", "schedule")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = weakref.ref(loop)
        self.schedule = Schedule()
        self._armed: float | None = None

    def add(self, when: float, action: Callable[[], None]) -> Entry:
        entry = self.schedule.add(when, action)
        if self._armed is None or when < self._armed:
            self._arm(when)
        return entry

    def _arm(self, when: float) -> None:
        loop = self._loop()
        if loop is not None:
            self._armed = when
            loop.call_at(when, self._fire, when)

    def _fire(self, when: float) -> None:
        if when != self._armed:
            return  # superseded by an earlier timer, which has run or will
        self._armed = None
        loop = self._loop()
        if loop is None:
            return
        # A loop may run a timer a hair before its time: the armed time counts as reached.
        for action in self.schedule.due(max(loop.time(), when)):
            action()
        nxt = self.schedule.earliest()
        if nxt is not None:
            self._arm(nxt)


_LOOPS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopDeadlines] = (
    weakref.WeakKeyDictionary()
)
#: The last loop asked for and its schedule: a server runs on one loop, so this is the answer
#: nearly every time, without a weak-dictionary lookup. Held weakly, like `_LOOPS`.
_last: tuple[weakref.ref[asyncio.AbstractEventLoop], _LoopDeadlines] | None = None


def _for_loop(loop: asyncio.AbstractEventLoop) -> _LoopDeadlines:
    global _last
    last = _last
    if last is not None and last[0]() is loop:
        return last[1]
    owner = _LOOPS.get(loop)
    if owner is None:
        owner = _LOOPS[loop] = _LoopDeadlines(loop)
    _last = (weakref.ref(loop), owner)
    return owner


class Deadline:
    """`with deadline(when) as d:` — `asyncio.timeout_at(when)` on the shared schedule.

    `when` is in the loop's clock (`loop.time()`); None: no deadline until `reschedule`.
    `loop`: the running loop, when the caller has it at hand. Asking asyncio for it costs a
    system call on Python 3.11 (`getpid()`, a check against a fork), twice per deadline.
    """

    __slots__ = ("_cancelling", "_entry", "_expired", "_loop", "_owner", "_task", "_when")

    def __init__(self, when: float | None, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._when = when
        self._loop = loop
        self._entry: Entry | None = None
        self._expired = False

    def __enter__(self) -> Deadline:
        loop = self._loop if self._loop is not None else asyncio.get_running_loop()
        task = asyncio.current_task(loop)
        if task is None:
            raise RuntimeError("a deadline needs a running task")
        self._task = task
        self._cancelling = task.cancelling()
        last = _last  # `_for_loop`'s own first test, without the call
        self._owner = last[1] if last is not None and last[0]() is loop else _for_loop(loop)
        if self._when is not None:
            self._entry = self._owner.add(self._when, self._expire)
        return self

    def reschedule(self, when: float | None) -> None:
        """Move the deadline (None: none). Later is a number changed; earlier re-files it.
        Once it has expired, or its block has ended, nothing."""
        if self._expired:
            return
        entry = self._entry
        if entry is not None and entry.action is not None:
            if when is not None and when >= entry.when:
                entry.when = when
                return
            self._owner.schedule.cancel(entry)
        self._entry = None if when is None else self._owner.add(when, self._expire)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._entry is not None:
            self._owner.schedule.cancel(self._entry)
            self._entry = None
        # Over: a `reschedule` after the block must not arm it again (it would cancel the task
        # later, in whatever it runs by then: on a caller's connection, its next request).
        expired, self._expired = self._expired, True
        if (
            expired
            and self._task.uncancel() <= self._cancelling
            and exc_type is asyncio.CancelledError
        ):
            raise TimeoutError from exc  # our cancellation, and no other since: a timeout

    def _expire(self) -> None:
        self._expired = True
        self._entry = None
        self._task.cancel()


#: `deadline(when, loop=None)`: the class itself, not a function returning one (a call fewer).
deadline: Final = Deadline
