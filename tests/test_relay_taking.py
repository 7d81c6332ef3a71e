"""`relay.while_taking`: a write that waits for its peer to read is given up only when the
peer takes nothing for `idle`, not when it takes long (a whole answer of several MiB to a
slow reader). Real TCP sockets on loopback with small kernel buffers, so what the peer has
not read waits in the writer's transport, as a large answer does in the sidecar."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import pytest

from sidecar.proxy.relay import while_taking

IDLE = 0.5
#: How long a test waits at most for what it expects; past it, the test fails (an
#: AssertionError: not the TimeoutError `while_taking` raises, which some tests expect).
WITHIN = 20.0


async def _within(write: Coroutine[Any, Any, None]) -> None:
    task = asyncio.ensure_future(write)
    done, _ = await asyncio.wait({task}, timeout=WITHIN)
    if not done:
        task.cancel()
        raise AssertionError(f"still waiting after {WITHIN} s: the peer was never given up")
    task.result()


class Pair:
    def __init__(self, writer: asyncio.StreamWriter, peer: socket.socket) -> None:
        self.writer = writer
        self.peer = peer
        self.taken = 0

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def take(self, pause: float, until: float | None = None) -> None:
        """Read what has come every `pause` seconds (until `until`, monotonic)."""
        while until is None or time.monotonic() < until:
            try:
                piece = self.peer.recv(65536)
            except BlockingIOError:
                piece = None
            except OSError:  # closed at teardown
                return
            if piece == b"":
                return
            self.taken += len(piece or b"")
            await asyncio.sleep(pause)


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    """A writer whose socket's send buffer, and a peer whose receive buffer, are small."""
    listener = socket.create_server(("127.0.0.1", 0))
    peer = socket.socket()
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    peer.connect(listener.getsockname())
    peer.setblocking(False)
    conn, _ = listener.accept()
    listener.close()
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    _, writer = await asyncio.open_connection(sock=conn)
    p = Pair(writer, peer)
    yield p
    writer.transport.abort()
    peer.close()


async def test_a_peer_that_reads_nothing_is_given_up_after_idle(pair: Pair) -> None:
    loop = asyncio.get_running_loop()
    with pytest.raises(TimeoutError):
        await _within(while_taking(loop, pair.writer.transport, IDLE, pair.send(b"x" * (1 << 20))))


async def test_a_peer_that_keeps_reading_slowly_is_waited_for(pair: Pair) -> None:
    loop = asyncio.get_running_loop()
    size = 1 << 20
    reader = asyncio.create_task(pair.take(0.01))
    started = time.monotonic()
    try:
        await _within(while_taking(loop, pair.writer.transport, IDLE, pair.send(b"x" * size)))
    finally:
        reader.cancel()
    took = time.monotonic() - started
    assert took > 2 * IDLE, f"the peer read it in {took:.2f} s: not slowly enough to test"


async def test_a_peer_that_stops_reading_is_given_up_after_it_stopped(pair: Pair) -> None:
    loop = asyncio.get_running_loop()
    stops = time.monotonic() + 3 * IDLE
    reader = asyncio.create_task(pair.take(0.01, until=stops))
    with pytest.raises(TimeoutError):
        await _within(while_taking(loop, pair.writer.transport, IDLE, pair.send(b"x" * (4 << 20))))
    assert time.monotonic() >= stops  # not before: it was reading until then
    assert pair.taken > 0
    await reader


async def test_without_a_transport_the_write_is_bounded_by_idle_alone() -> None:
    loop = asyncio.get_running_loop()
    with pytest.raises(TimeoutError):
        await _within(while_taking(loop, None, IDLE, asyncio.sleep(WITHIN * 2)))
