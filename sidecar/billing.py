"""Metering and credits: tokens into metrics, managed-key spend into the ledger.

Spend is recorded after the response is sent, off the request's path; the
credits check before a managed request reads the ledger once. Concurrent
requests of one access key can each pass the check before any of them is
charged, so the overdraw is bounded by the cost of the requests in flight
for that key when its balance crosses zero.

Ledger health is surfaced three ways: the `sidecar_ledger_up` gauge and
`sidecar_ledger_errors_total{operation}` counter, a `ledger` object in the
`/readyz` body (`ledger_status`), and one operational log line per change
(`ledger_unavailable`, then `ledger_recovered`). Under `fail_closed` the
credits check refuses (503 `ledger_unavailable`) while spend is pending that
cannot be written, so nothing is served whose spend would be lost.
"""

from __future__ import annotations

import asyncio
from typing import Any

from sidecar.config import Config, LedgerConfig
from sidecar.errors import ErrorCode, ProxyError
from sidecar.keys import SOURCE_MANAGED
from sidecar.ledger import Ledger, LedgerUnavailable, SpendRecorder, open_ledger
from sidecar.ledger.urls import redact_url
from sidecar.logs import OpLog
from sidecar.metrics import Metrics
from sidecar.plan import Candidate
from sidecar.prices import PriceTable
from sidecar.runtime import AccessKey
from sidecar.usage import Usage


class Billing:
    def __init__(self, metrics: Metrics, oplog: OpLog) -> None:
        self._metrics = metrics
        self._oplog = oplog
        self.recorder: SpendRecorder | None = None
        self._ledger: Ledger | None = None
        self._ledger_config: LedgerConfig | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._warned: set[str] = set()

    def configure(self, config: Config) -> None:
        """After each load: open the ledger once managed keys need one (no I/O until first use).

        The ledger, once open, stays for the life of the process; a changed
        `ledger:` section is reported and applies at the next restart.
        """
        if not any(config.managed.values()):
            return
        if self._ledger_config is None:
            self._ledger = open_ledger(config.ledger.url, base_dir=config.base_dir)
            fail_open = config.ledger.on_unavailable == "fail_open"
            self.recorder = SpendRecorder(
                self._ledger,
                fail_open=fail_open,
                on_error=self._ledger_error,
                on_health=self._ledger_health,
            )
            self._ledger_config = config.ledger
        elif config.ledger != self._ledger_config:
            self._oplog.warning(
                "ledger_change_needs_restart", keeping=redact_url(self._ledger_config.url)
            )

    def _ledger_error(self, operation: str, exc: Exception) -> None:
        self._metrics.ledger_errors.labels(operation).inc()

    def _ledger_health(self, healthy: bool) -> None:
        """Once per change: a log line and the gauge (not once per failing request)."""
        assert self.recorder is not None
        self._metrics.ledger_up.set(1 if healthy else 0)
        if healthy:
            self._oplog.info("ledger_recovered")
        else:
            self._oplog.error(
                "ledger_unavailable",
                error=self.recorder.error or "spend is waiting to be written",
                pending_micro_usd=sum(self.recorder.pending.values()),
            )

    def ledger_status(self) -> dict[str, Any] | None:
        """The ledger's health for `/readyz`; None when no ledger is in use."""
        if self.recorder is None or self._ledger_config is None:
            return None
        rec = self.recorder
        error = rec.error
        if error is None and rec.pending:
            error = "spend is waiting to be written"
        return {
            "status": "ok" if rec.healthy else "failing",
            "on_unavailable": self._ledger_config.on_unavailable,
            "pending_usd": sum(rec.pending.values()) / 1e6,
            "error": error,
        }

    def _pending_changed(self) -> None:
        assert self.recorder is not None
        self._metrics.ledger_pending.set(sum(self.recorder.pending.values()) / 1e6)

    async def has_credits(self, access: AccessKey) -> bool:
        """Whether `access` may use a managed key now.

        Raises ProxyError(LEDGER_UNAVAILABLE) under `fail_closed` when the ledger
        cannot be read, or when spend is pending that cannot be written first.
        """
        if self.recorder is None:
            return access.credits_micro_usd > 0
        try:
            spent = await self.recorder.spent(access.name)
        except LedgerUnavailable:
            raise ProxyError(
                ErrorCode.LEDGER_UNAVAILABLE, "the credits ledger is unreachable"
            ) from None
        finally:
            self._pending_changed()
        remaining = access.credits_micro_usd - spent
        self._metrics.credits_remaining.labels(access.name).set(remaining / 1e6)
        return remaining > 0

    def record(
        self, prices: PriceTable, access: AccessKey | None, cand: Candidate, usage: Usage
    ) -> None:
        """Count tokens; charge managed-key usage to the access key (in the background)."""
        provider = cand.provider.id
        model = cand.upstream_model or ""
        label = self._metrics.model_label(model)
        if usage.input_tokens:
            self._metrics.tokens.inc((provider, label, "input"), usage.input_tokens)
        if usage.output_tokens:
            self._metrics.tokens.inc((provider, label, "output"), usage.output_tokens)
        if cand.key.source is not SOURCE_MANAGED or access is None or self.recorder is None:
            return
        _, known = prices.price_for(provider, model)
        if not known and model not in self._warned:
            self._warned.add(model)
            self._oplog.warning("model_unpriced", provider=provider, model=model,
                                rule="charged at the provider's highest known price")  # fmt: skip
        cost = prices.cost_micro_usd(provider, model, usage)
        if cost <= 0:
            return
        self._metrics.credits_spent.labels(access.name).inc(cost / 1e6)
        task = asyncio.get_running_loop().create_task(self._charge(access, cost))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _charge(self, access: AccessKey, cost: int) -> None:
        assert self.recorder is not None
        await self.recorder.record(access.name, cost)
        self._pending_changed()
        try:
            spent = await self.recorder.spent(access.name)
        except LedgerUnavailable:
            return
        self._metrics.credits_remaining.labels(access.name).set(
            (access.credits_micro_usd - spent) / 1e6
        )

    async def flush(self) -> None:
        if self.recorder is not None:
            await self.recorder.flush()
            self._pending_changed()

    def unwritten(self) -> dict[str, int]:
        """Spend (micro-USD by access-key name) not yet in the ledger."""
        if self.recorder is None:
            return {}
        return {name: amount for name, amount in self.recorder.pending.items() if amount}

    async def close(self) -> None:
        """Wait for charges in flight, write pending spend, and log by name what could not be."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.recorder is not None:
            await self.recorder.flush()
            lost = self.unwritten()
            if lost:
                self._oplog.error(
                    "ledger_spend_lost_at_exit",
                    micro_usd=sum(lost.values()),
                    by_access_key=lost,
                    error=self.recorder.error,
                )
        if self._ledger is not None:
            await self._ledger.close()
