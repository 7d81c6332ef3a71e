"""aiohttp's per-connection request loop, with each request's handler run in the connection's
own task instead of a new task per request.

aiohttp's `RequestHandler.start()` is the loop that takes each parsed request off a caller's
connection and answers it. It runs every request's handler in a task of its own, so that each
request gets a fresh copy of the context variables (aiohttp issue #3406). On Python 3.11 that
task costs about 20,000 instructions a request (creating it, scheduling its first step, waking
the connection's task when it ends): 3% of what the sidecar spends on a proxied request. On 3.12
and later aiohttp starts that task eagerly, which costs far less.

`InlineRequests.start` is the loop of aiohttp 3.14.5 (`aiohttp/web_protocol.py`, Copyright
aio-libs contributors, Apache License 2.0) with that one step changed: the handler's coroutine
is awaited in the connection's task. Everything else (the keep-alive timer, pipelined requests,
lingering over an unread body, a malformed request's error answer, premature disconnects) is
aiohttp's code as it was.

What this gives up is a fresh task per request, and with it two things:

- A fresh copy of context variables: one set by a request's handler would still be set for
  the next request on the same connection. The sidecar's handlers set none (tracing builds
  its span contexts without attaching them).
- A clean cancellation state. A deadline now cancels the connection's task, which
  `sidecar.deadlines` undoes with `uncancel()` as `asyncio.timeout` does. A handler that
  left a cancellation behind (one still pending, or one it swallowed without `uncancel()`)
  would hand it to the next request, so the loop checks the task's `cancelling()` count
  after each request and closes the connection if it moved (the second change).

The copy runs only if the installed aiohttp's request loop and the methods it works with
(`_handle_request`, `connection_lost`, `shutdown`) are, byte for byte, the ones it was copied
beside (the SHA-256 of their source, `COPIED_FROM`); under any other aiohttp the connection
keeps aiohttp's own loop. tests/test_request_loop.py fails when the pinned aiohttp changes
them, and compares the copy with aiohttp's loop, so the copy is taken again with an upgrade.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import textwrap
from typing import Final

from aiohttp.web_protocol import RequestHandler

try:  # what the copy uses of aiohttp's internals; another aiohttp may not have them
    from aiohttp.helpers import ceil_timeout
    from aiohttp.http import StreamWriter
    from aiohttp.web_protocol import _PAYLOAD_ACCESS_ERROR, ERROR, _ErrInfo
except ImportError:
    _importable = False
else:
    _importable = True

__all__ = ["COPIED_FROM", "DEPENDS_ON", "InlineRequests", "inline", "source_digest"]

#: What the copy depends on in aiohttp: the loop copied below, and the methods that run or
#: cancel the connection's task around it.
DEPENDS_ON: Final = ("start", "_handle_request", "connection_lost", "shutdown")
#: SHA-256 of those methods' sources (dedented, in that order) in aiohttp 3.14.5.
COPIED_FROM: Final = "c92da0a8a9b34ed5a0709ed00e372851f2d1fd6eb7642e5d16bc5c4f34027bc6"


def source_digest() -> str | None:
    """SHA-256 of the installed aiohttp's `DEPENDS_ON`; None if their source cannot be read."""
    digest = hashlib.sha256()
    try:
        for name in DEPENDS_ON:
            digest.update(textwrap.dedent(inspect.getsource(getattr(RequestHandler, name))).encode())
    except (AttributeError, OSError, TypeError):  # a method gone, or no source to read
        return None
    return digest.hexdigest()


#: Whether `InlineRequests` runs its copy of the loop (else aiohttp's own); the `listening`
#: log line says which (`request_loop`).
inline: Final = _importable and source_digest() == COPIED_FROM


class InlineRequests(RequestHandler):
    """A caller's connection whose requests' handlers run in the connection's task."""

    __slots__ = ()

    async def start(self) -> None:
        if not inline:
            await super().start()
            return
        # aiohttp 3.14.5's RequestHandler.start, its comments included; changed where marked.
        loop = self._loop
        manager = self._manager
        assert manager is not None
        keepalive_timeout = self._keepalive_timeout
        resp = None
        assert self._request_factory is not None
        assert self._request_handler is not None
        task = asyncio.current_task(loop)  # Changed: the task every request's handler runs in
        assert task is not None

        while not self._force_close:
            if not self._messages:
                try:
                    # wait for next request
                    self._waiter = loop.create_future()
                    await self._waiter
                finally:
                    self._waiter = None

            message, payload = self._messages.popleft()

            # Free a parser slot; resume reading once drained to low water so
            # pipelining keeps flowing while this request is handled.
            if self._parser is not None:
                self._parser.message_consumed()
            if self._buffer_paused and len(self._messages) <= self._msg_queue_resume_size:
                self._resume_reading_if_drained()

            # time is only fetched if logging is enabled as otherwise
            # its thrown away and never used.
            start = loop.time() if self._logging_enabled else None

            manager.requests_count += 1
            writer = StreamWriter(self, loop)
            if isinstance(message, _ErrInfo):
                # make request_factory work
                request_handler = self._make_error_handler(message)
                message = ERROR
            else:
                request_handler = self._request_handler

            # Important don't hold a reference to the current task
            # as on traceback it will prevent the task from being
            # collected and will cause a memory leak.
            request = self._request_factory(
                message,
                payload,
                self,
                writer,
                self._task_handler or asyncio.current_task(loop),  # type: ignore[arg-type]
            )
            try:
                # Changed: aiohttp runs this in a new task (a fresh copy of the context
                # variables per request); here it runs in the connection's task.
                cancels = task.cancelling()
                try:
                    resp, reset = await self._handle_request(request, start, request_handler)
                except ConnectionError:
                    self.log_debug("Ignored premature client disconnection")
                    break
                # Changed: a cancellation the handler left on the task (still pending, or
                # swallowed without `uncancel()`) must not reach the next request.
                if task.cancelling() != cancels:
                    self.force_close()
                    break

                if reset:
                    self.log_debug("Ignored premature client disconnection 2")
                    break

                # notify server about keep-alive
                self._keepalive = bool(resp.keep_alive)

                # check payload
                if not payload.is_eof():
                    lingering_time = self._lingering_time
                    if not self._force_close and lingering_time:
                        self.log_debug("Start lingering close timer for %s sec.", lingering_time)

                        now = loop.time()
                        end_t = now + lingering_time

                        try:
                            while not payload.is_eof() and now < end_t:
                                async with ceil_timeout(end_t - now):
                                    # read and ignore
                                    await payload.readany()
                                now = loop.time()
                        except (asyncio.CancelledError, TimeoutError):  # (aliases on 3.11)
                            if (t := asyncio.current_task()) and t.cancelling():
                                raise

                    # if payload still uncompleted
                    if not payload.is_eof() and not self._force_close:
                        self.log_debug("Uncompleted request.")
                        self.close()

                payload.set_exception(_PAYLOAD_ACCESS_ERROR)

            except asyncio.CancelledError:
                self.log_debug("Ignored premature client disconnection")
                self.force_close()
                raise
            except Exception as exc:
                self.log_exception("Unhandled exception", exc_info=exc)
                self.force_close()
            except BaseException:
                self.force_close()
                raise
            finally:
                request._task = None  # type: ignore[assignment] # Break reference cycle in case of exception
                if self.transport is None and resp is not None:
                    self.log_debug("Ignored premature client disconnection.")

            if self._keepalive and not self._close and not self._force_close:
                # start keep-alive timer
                close_time = loop.time() + keepalive_timeout
                self._next_keepalive_close_time = close_time
                if self._keepalive_handle is None:
                    self._keepalive_handle = loop.call_at(close_time, self._process_keepalive)
            else:
                break

        # remove handler, close transport if no handlers left
        if not self._force_close:
            self._task_handler = None
            if self.transport is not None:
                self.transport.close()
