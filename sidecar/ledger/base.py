"""The spend ledger interface, and the recorder that never loses spend.

Each access key has a credit grant (kept in the vault); a ledger stores only
the cumulative *spend* per access-key name, as integer micro-USD, so totals
stay exact when many replicas add to them at once.

Backends translate every error of their driver into `LedgerUnavailable`, in
one place each, with messages that name the backend but never a secret.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Protocol


class LedgerUnavailable(Exception):
    """The ledger backend cannot be reached or answered with an error."""


class Ledger(Protocol):
    async def spent(self, name: str) -> int:
        """Micro-USD spent so far by access key `name` (0 if none)."""
        ...

    async def add_spend(self, name: str, micro_usd: int) -> int:
        """Atomically add `micro_usd` to `name`'s spend; return the new total."""
        ...

    async def close(self) -> None: ...


class SpendRecorder:
    """Puts spend into a `Ledger` without ever losing it.

    `record` adds spend; if the backend is down the amount is kept in memory
    (`pending`) and sent by a later `record` of the same key or by `flush`,
    which the owner calls periodically and at shutdown. `spent` is the ledger's
    total plus what is still pending here.

    While the backend is down (`LedgerUnavailable`), `spent` answers from the
    last total seen for the key plus pending spend (`fail_open=True`) or raises
    `LedgerUnavailable` (`fail_open=False`). With `fail_open=False`, `spent`
    also raises while any spend is pending that it cannot write first: a
    backend that reads but cannot write (a read-only or deleted file) must not
    keep serving requests whose spend would be lost. After a failure the
    backend is not asked again by `spent`/`record` for `retry_interval`
    seconds, so requests do not each wait for a timeout; `flush` always asks.

    `on_error` is called with each backend failure (`"read"` or `"write"`, the
    error), for metrics. `on_health` is called once per change of `healthy`
    (with the new value), for logs: the ledger is healthy when its last
    operation succeeded and no spend is pending.

    A write that timed out may still have reached the backend; it is kept and
    retried, so an outage can over-count spend but never under-count it.
    """

    def __init__(
        self,
        ledger: Ledger,
        *,
        fail_open: bool,
        on_error: Callable[[str, LedgerUnavailable], None] | None = None,
        on_health: Callable[[bool], None] | None = None,
        retry_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ledger = ledger
        self._fail_open = fail_open
        self._on_error = on_error
        self._on_health = on_health
        self._retry_interval = retry_interval
        self._clock = clock
        self._pending: dict[str, int] = {}
        self._known: dict[str, int] = {}
        self._down_until: float | None = None
        self._error: str | None = None
        self._healthy = True
        self._flush_lock = asyncio.Lock()

    @property
    def pending(self) -> Mapping[str, int]:
        """Spend not yet in the ledger, per access-key name (read-only view)."""
        return MappingProxyType(self._pending)

    @property
    def ledger(self) -> Ledger:
        return self._ledger

    @property
    def healthy(self) -> bool:
        """The last backend operation succeeded and no spend is pending."""
        return self._error is None and not self._pending

    @property
    def error(self) -> str | None:
        """The last backend failure, until an operation succeeds again."""
        return self._error

    async def spent(self, name: str) -> int:
        """Micro-USD spent by `name`, including spend still pending here."""
        if not self._fail_open and self._pending:
            await self._write_pending_first()
        if not self._backing_off():
            try:
                total = await self._ledger.spent(name)
            except LedgerUnavailable as exc:
                self._failed("read", exc)
                if not self._fail_open:
                    raise
            else:
                self._up()
                self._known[name] = total
                return total + self._pending.get(name, 0)
        elif not self._fail_open:
            raise LedgerUnavailable(self._refusal())
        return self._known.get(name, 0) + self._pending.get(name, 0)

    async def _write_pending_first(self) -> None:
        """fail_closed: spend not yet in the ledger must get there before more is served."""
        async with self._flush_lock:
            if not self._backing_off():
                await self._flush_locked()
        if self._pending:
            raise LedgerUnavailable(self._refusal())

    def _refusal(self) -> str:
        why = self._error or "recent failure"
        return f"ledger unavailable ({why}; retrying soon)"

    async def record(self, name: str, micro_usd: int) -> None:
        """Add spend to `name`. Never raises: on failure the amount stays pending."""
        if micro_usd == 0:
            return
        # Spend pending for this key travels with the new amount.
        amount = micro_usd + self._pending.pop(name, 0)
        if self._backing_off():
            self._keep(name, amount)
            self._health_changed()
            return
        try:
            total = await self._ledger.add_spend(name, amount)
        except LedgerUnavailable as exc:
            self._keep(name, amount)
            self._failed("write", exc)
        except BaseException:
            self._keep(name, amount)  # cancelled mid-write: keep it, retry later
            raise
        else:
            self._known[name] = total
            self._up()

    async def flush(self) -> int:
        """Retry pending spend; return how many keys still have spend pending."""
        async with self._flush_lock:
            await self._flush_locked()
        return len(self._pending)

    async def _flush_locked(self) -> None:
        for name in list(self._pending):
            amount = self._pending.pop(name, 0)
            if amount == 0:
                continue
            try:
                total = await self._ledger.add_spend(name, amount)
            except LedgerUnavailable as exc:
                self._keep(name, amount)
                self._failed("write", exc)
                return
            except BaseException:
                self._keep(name, amount)
                raise
            self._known[name] = total
            self._up()

    def _keep(self, name: str, amount: int) -> None:
        self._pending[name] = self._pending.get(name, 0) + amount

    def _backing_off(self) -> bool:
        return self._down_until is not None and self._clock() < self._down_until

    def _failed(self, operation: str, exc: LedgerUnavailable) -> None:
        self._down_until = self._clock() + self._retry_interval
        self._error = str(exc)
        if self._on_error is not None:
            self._on_error(operation, exc)
        self._health_changed()

    def _up(self) -> None:
        self._down_until = None
        self._error = None
        self._health_changed()

    def _health_changed(self) -> None:
        healthy = self.healthy
        if healthy != self._healthy:
            self._healthy = healthy
            if self._on_health is not None:
                self._on_health(healthy)
