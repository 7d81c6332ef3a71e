"""The link to the shared Redis, and key health kept in step with the other replicas.

One background task owns the link (`run`). Connected, it subscribes to the cooldown
channel, reads every cooldown in force, writes its own (those it learnt while
alone), then applies what the others announce as it comes and checks Redis every
second. Any failure — a call past its `shared_state.timeout`, a refused
connection, a broken subscription, or a failed rate-limit call reported through
`failed` — takes the replica off the link at once: `up` is False, the
`sidecar_shared_state_up` gauge 0, one `shared_state_unavailable` log line, and
every part falls back to local state. It tries again every second and, once
back, resyncs as above and logs `shared_state_recovered`.

Traffic never waits for this: cooldowns are published in the background, and
only a rate-limited access key's admission asks Redis on the request's path
(bounded by the timeout; see `sidecar.admission`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

from redis.asyncio.client import PubSub

from sidecar.config import SharedStateConfig
from sidecar.health import KeyHealth, Outcome
from sidecar.logs import OpLog
from sidecar.metrics import Metrics
from sidecar.shared.base import (
    PREFIX,
    REDIS_ERRORS,
    SharedStateUnavailable,
    open_redis,
    unavailable,
)
from sidecar.shared.cooldowns import CHANNEL, CooldownStore, SharedCooldown, announcements
from sidecar.shared.ratelimit import RedisLimiter

#: Set once per life of the Redis; its value changing or vanishing means a restart.
EPOCH: Final = PREFIX + "epoch"
#: Seconds between pings while up, and between reconnection attempts while down.
_BEAT: Final = 1.0
#: Publications in flight at most; past it a cooldown stays local (the others then learn
#: of it only by getting the provider's answer themselves).
_MAX_PUBLISHING: Final = 256
#: The furthest deadline taken from Redis: a week, far past the longest `retry-after`
#: honoured (a day) and any sensible `failover.cooldown`; a later one is not ours.
_LONGEST_S: Final = 7 * 86400.0
T = TypeVar("T")


class _Restarted(Exception):
    """Redis answers, but it lost what this link synced with it (a restart, a flush)."""


class SharedState:
    def __init__(
        self,
        config: SharedStateConfig,
        health: KeyHealth,
        metrics: Metrics,
        oplog: OpLog,
        known: Callable[[str], bool],
        *,
        wall: Callable[[], float] = time.time,
        mono: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._health = health
        self._metrics = metrics
        self._oplog = oplog
        self._known = known  # whether a health id is a key of the current runtime
        self._wall = wall
        self._mono = mono
        self._client = open_redis(config.url, timeout=config.timeout, max_connections=32)
        self._store = CooldownStore(self._client, config.url)
        self.limiter = RedisLimiter(self._client, config.url)
        self.up = False
        self._syncing = False  # subscribed, resyncing: new cooldowns are announced already
        self._ever_up = False
        self._logged_down = False
        self._trouble = asyncio.Event()
        self._publishing: set[asyncio.Task[None]] = set()
        metrics.enable_shared_state()
        metrics.shared_state_up.set(0)
        health.on_cooldown = self._cooldown_started

    def __repr__(self) -> str:
        return "SharedState(...)"  # the URL may hold a password

    # -- what the rest of the sidecar calls ------------------------------------------

    def failed(self, exc: SharedStateUnavailable) -> None:
        """A call on the request path failed: off the link now; the task reconnects."""
        self._down(exc)
        self._trouble.set()

    async def run(self) -> None:
        """Keep the link: connect, resync, follow; on trouble, fall back and retry."""
        while True:
            pubsub = self._client.pubsub()
            try:
                await self._follow(pubsub)
            except _Restarted:  # the same Redis, emptied: write what is in force again, now
                self._oplog.info("shared_state_resync", reason="redis restarted")
                continue
            except SharedStateUnavailable as exc:
                self._down(exc)
            except Exception as exc:  # the link's boundary: it must never end for good
                self._down(unavailable("shared state", self.config.url, exc))
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(pubsub.aclose(), self.config.timeout)  # type: ignore[no-untyped-call]
            await asyncio.sleep(_BEAT)

    async def close(self) -> None:
        self._health.on_cooldown = None
        for task in list(self._publishing):
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._client.aclose(), self.config.timeout)

    # -- the link ------------------------------------------------------------------------

    async def _follow(self, pubsub: PubSub) -> None:
        timeout = self.config.timeout
        try:
            async with asyncio.timeout(timeout):
                epoch = await self._epoch()
                await pubsub.subscribe(CHANNEL)
                confirmed = await pubsub.get_message(timeout=timeout)
        except (TimeoutError, *REDIS_ERRORS) as exc:
            raise unavailable("shared state", self.config.url, exc) from None
        if not confirmed or confirmed.get("type") != "subscribe":
            raise SharedStateUnavailable("shared state: the subscription was not confirmed")
        # Subscribed before reading: nothing announced from here on is missed, and what this
        # replica cools from here on is announced at once. A failure from here on counts.
        self._trouble.clear()
        self._syncing = True
        for c in await self.bounded(self._store.current(self._wall())):
            self._apply(c)
        for hid, model, until, reason, status in self._health.active():
            await self.bounded(self._store.publish(self._shared(hid, model, until, reason, status)))
        if self._trouble.is_set():
            raise SharedStateUnavailable("shared state: a call failed while resyncing")
        self._up()
        listening = asyncio.create_task(self._listen(pubsub))
        try:
            while not listening.done():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._trouble.wait(), _BEAT)
                if self._trouble.is_set():
                    raise SharedStateUnavailable("shared state: a call failed")
                if await self.bounded(self._epoch_now()) != epoch:
                    raise _Restarted  # reconnected by itself to an emptied Redis: resync
                self._health.sweep()
            listening.result()  # its failure, if that is why it ended
        finally:
            listening.cancel()
            with contextlib.suppress(asyncio.CancelledError, SharedStateUnavailable):
                await listening

    async def _epoch(self) -> bytes | None:
        """The mark of this Redis's current life: set once by whichever replica comes first,
        gone when Redis restarts empty (or is flushed). GET and SET only, so a Redis user
        without the `@dangerous` commands (INFO) can run the link."""
        await self._client.set(EPOCH, uuid.uuid4().hex, nx=True)
        found = await self._client.get(EPOCH)
        return found if isinstance(found, bytes) else None

    async def _epoch_now(self) -> bytes | None:
        found = await self._client.get(EPOCH)
        return found if isinstance(found, bytes) else None

    async def _listen(self, pubsub: PubSub) -> None:
        async for c in announcements(pubsub, self.config.url, poll=min(0.25, self.config.timeout)):
            if c is not None:
                self._apply(c)

    async def bounded(self, call: Awaitable[T]) -> T:
        """`call` within `shared_state.timeout`; any failure is SharedStateUnavailable."""
        try:
            async with asyncio.timeout(self.config.timeout):
                return await call
        except SharedStateUnavailable:
            raise
        except (TimeoutError, *REDIS_ERRORS) as exc:
            raise unavailable("shared state", self.config.url, exc) from None

    def _up(self) -> None:
        if self.up:
            return
        self.up = True
        self._metrics.shared_state_up.set(1)
        if self._logged_down:
            self._oplog.info("shared_state_recovered")
        elif not self._ever_up:
            self._oplog.info("shared_state_connected")
        self._ever_up = True
        self._logged_down = False

    def _down(self, exc: SharedStateUnavailable) -> None:
        was_up = self.up
        self.up = False
        self._syncing = False
        self._metrics.shared_state_up.set(0)
        if was_up or not self._logged_down:  # once per outage (and once if never reached)
            self._logged_down = True
            self._oplog.error("shared_state_unavailable", error=str(exc),
                              fallback="local key health and rate limits")  # fmt: skip

    # -- cooldowns -----------------------------------------------------------------------

    def _shared(
        self, hid: str, model: str | None, until: float, reason: Outcome, status: int | None
    ) -> SharedCooldown:
        return SharedCooldown(hid, model, self._wall() + (until - self._mono()), reason, status)

    def _cooldown_started(
        self, hid: str, model: str | None, until: float, reason: Outcome, status: int | None
    ) -> None:
        """KeyHealth's hook: announce a cooldown this replica started (in the background)."""
        if not (self.up or self._syncing) or len(self._publishing) >= _MAX_PUBLISHING:
            return  # while down it stays local; a reconnection writes what is still in force
        task = asyncio.get_running_loop().create_task(
            self._publish(self._shared(hid, model, until, reason, status))
        )
        self._publishing.add(task)
        task.add_done_callback(self._publishing.discard)

    async def _publish(self, c: SharedCooldown) -> None:
        try:
            await self.bounded(self._store.publish(c))
        except SharedStateUnavailable as exc:
            self.failed(exc)

    def _apply(self, c: SharedCooldown) -> None:
        """A cooldown another replica announced (or this one, echoed): hold it here too."""
        if not self._known(c.health_id):
            return
        wall = self._wall()
        if c.until > wall + _LONGEST_S:  # not one this sidecar would set: refused
            return
        until = self._mono() + (c.until - wall)
        if until <= self._mono():
            return
        self._health.hold(c.health_id, c.model, until, c.reason, c.status, share=False)

