"""How a relayed stream is written to the caller: the upstream's end goes out in the same
write as the bytes that came with it.

The upstream here is a raw socket server that writes the HTTP answer in exactly the pieces
given (one `write` each), so what the sidecar reads at once is known; before its next piece
it waits until the sidecar has written what the last one carried. Each write the sidecar
makes to the caller's socket is recorded (aiohttp's `StreamWriter._write` and
`_writelines`, still doing their work); what the caller receives is read with raw HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Iterable
from typing import Any

import orjson
import pytest
from aiohttp.http_writer import StreamWriter

from tests.harness import Sidecar, make_env, raw_request
from tests.test_stream_faults_e2e import DONE, ROLE, chunk, start

_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
_END = b"0\r\n\r\n"
#: A step: wait until the sidecar has written to the caller once more.
WRITTEN = "written"


def framed(*events: bytes) -> bytes:
    """Events as HTTP chunks, one chunk each (as providers send them)."""
    return b"".join(b"%x\r\n%b\r\n" % (len(e), e) for e in events)


class Writes(list[bytes]):
    """What the sidecar wrote to callers, one item per write; `more` is set at each."""

    def __init__(self) -> None:
        super().__init__()
        self.more = asyncio.Event()

    def body(self, i: int) -> bytes:
        """Write `i` without the response head, if it carried it."""
        data = self[i]
        return data.partition(b"\r\n\r\n")[2] if data.startswith(b"HTTP/1.1 200 OK\r\n") else data


class RawUpstream:
    """Answers each request with the next list of steps: bytes written in one `write`, or
    `WRITTEN`: wait until the sidecar wrote to its caller."""

    def __init__(self, writes: Writes) -> None:
        self.queue: list[list[bytes | str]] = []
        self.writes = writes
        self.server: asyncio.Server | None = None
        self.port = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                await reader.readexactly(int(length[1]) if length else 0)
                for step in self.queue.pop(0):
                    if step == WRITTEN:
                        self.writes.more.clear()
                        await asyncio.wait_for(self.writes.more.wait(), 5)
                    else:
                        assert isinstance(step, bytes)
                        writer.write(step)
        writer.close()


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> Writes:
    seen = Writes()
    write, writelines = StreamWriter._write, StreamWriter._writelines

    def spy_write(self: StreamWriter, data: Any) -> None:
        seen.append(bytes(data))
        seen.more.set()
        write(self, data)

    def spy_writelines(self: StreamWriter, chunks: Iterable[Any]) -> None:
        chunks = [bytes(c) for c in chunks]
        seen.append(b"".join(chunks))
        seen.more.set()
        writelines(self, chunks)

    monkeypatch.setattr(StreamWriter, "_write", spy_write)
    monkeypatch.setattr(StreamWriter, "_writelines", spy_writelines)
    return seen


@pytest.fixture
async def upstream(writes: Writes) -> AsyncIterator[RawUpstream]:
    up = RawUpstream(writes)
    up.server = await asyncio.start_server(up.serve, "127.0.0.1", 0)
    up.port = up.server.sockets[0].getsockname()[1]
    yield up
    up.server.close()


async def _sidecar(tmp_path: Any, upstream: RawUpstream, sidecars: list[Sidecar]) -> tuple[Sidecar, str]:
    return await start(make_env(tmp_path, f"http://127.0.0.1:{upstream.port}/v1"), sidecars)


async def _stream(sc: Sidecar, token: str) -> bytes:
    body = orjson.dumps({"model": "gpt-4o-mini", "stream": True,
                         "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            "Content-Type: application/json\r\n").encode()  # fmt: skip
    got = await raw_request(sc.running.proxy_port, head, body)
    assert got.status == 200, got.body
    return got.body


EVENTS = [ROLE, chunk("Hel"), chunk("lo"), chunk(finish="stop"), DONE]


async def test_a_stream_that_came_whole_is_written_in_one_piece_with_its_head_and_end(
    tmp_path: Any, upstream: RawUpstream, sidecars: list[Sidecar], writes: Writes
) -> None:
    sc, token = await _sidecar(tmp_path, upstream, sidecars)
    upstream.queue.append([_HEAD + framed(*EVENTS) + _END])
    assert await _stream(sc, token) == b"".join(EVENTS)
    assert len(writes) == 1
    assert writes[0].startswith(b"HTTP/1.1 200 OK\r\n")
    assert writes.body(0) == framed(b"".join(EVENTS)) + _END


async def test_the_last_events_of_a_live_stream_go_out_with_its_end(
    tmp_path: Any, upstream: RawUpstream, sidecars: list[Sidecar], writes: Writes
) -> None:
    sc, token = await _sidecar(tmp_path, upstream, sidecars)
    upstream.queue.append([_HEAD + framed(ROLE, chunk("Hel")), WRITTEN, framed(chunk("lo")),
                           WRITTEN, framed(chunk(finish="stop"), DONE) + _END])  # fmt: skip
    assert await _stream(sc, token) == b"".join(EVENTS)
    assert len(writes) == 3
    assert writes[0].startswith(b"HTTP/1.1 200 OK\r\n")  # the head with the first content
    assert [writes.body(i) for i in range(3)] == [
        framed(ROLE + chunk("Hel")),
        framed(chunk("lo")),
        framed(chunk(finish="stop") + DONE) + _END,
    ]


async def test_an_end_that_comes_alone_ends_the_stream_alone(
    tmp_path: Any, upstream: RawUpstream, sidecars: list[Sidecar], writes: Writes
) -> None:
    sc, token = await _sidecar(tmp_path, upstream, sidecars)
    upstream.queue.append([_HEAD + framed(*EVENTS), WRITTEN, _END])
    assert await _stream(sc, token) == b"".join(EVENTS)
    assert [writes.body(i) for i in range(len(writes))] == [framed(b"".join(EVENTS)), _END]


async def test_a_finished_stream_without_its_terminator_gets_it_before_the_end(
    tmp_path: Any, upstream: RawUpstream, sidecars: list[Sidecar], writes: Writes
) -> None:
    # Its tail was lost (no `[DONE]`): relayed as it came, then the terminator, then the end.
    sc, token = await _sidecar(tmp_path, upstream, sidecars)
    upstream.queue.append([_HEAD + framed(*EVENTS[:-1]) + _END])
    assert await _stream(sc, token) == b"".join(EVENTS)
    assert [writes.body(i) for i in range(len(writes))] == [
        framed(b"".join(EVENTS[:-1])), framed(DONE), _END,
    ]
