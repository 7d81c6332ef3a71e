"""How a relayed stream is written to the caller: the upstream's end goes out in the same
write as the bytes that came with it.

The upstream here is a raw socket server that writes the HTTP answer in exactly the pieces
given (one `write` each), so what the sidecar reads at once is known. The caller's side is
watched by recording each call that writes to it (`answer.Stream.write` and `write_eof`,
still doing their work); what the caller receives is read with raw HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from sidecar.proxy import answer
from tests.harness import Env, Sidecar, make_env, raw_request
from tests.test_proxy_e2e import boot, keys_yaml
from tests.test_stream_faults_e2e import DONE, ROLE, chunk

_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
_END = b"0\r\n\r\n"


def framed(*events: bytes) -> bytes:
    """Events as HTTP chunks, one chunk each (as providers send them)."""
    return b"".join(b"%x\r\n%b\r\n" % (len(e), e) for e in events)


class RawUpstream:
    """Answers each request with the next list of steps: bytes written in one `write`, or a
    float to sleep."""

    def __init__(self) -> None:
        self.queue: list[list[bytes | float]] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                await reader.readexactly(int(length[1]) if length else 0)
                for step in self.queue.pop(0):
                    if isinstance(step, float):
                        await asyncio.sleep(step)
                    else:
                        writer.write(step)
        writer.close()


@pytest.fixture
async def upstream() -> AsyncIterator[RawUpstream]:
    up = RawUpstream()
    up.server = await asyncio.start_server(up.serve, "127.0.0.1", 0)
    up.port = up.server.sockets[0].getsockname()[1]
    yield up
    up.server.close()


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, bytes]]:
    """Each write to a caller's stream, in order: ("write", data) or ("end", data)."""
    seen: list[tuple[str, bytes]] = []
    write, end = answer.Stream.write, answer.Stream.write_eof

    async def spy_write(self: answer.Stream, data: Any) -> None:
        seen.append(("write", bytes(data)))
        await write(self, data)

    async def spy_end(self: answer.Stream, data: bytes = b"") -> None:
        if not self._eof_sent:
            seen.append(("end", bytes(data)))
        await end(self, data)

    monkeypatch.setattr(answer.Stream, "write", spy_write)
    monkeypatch.setattr(answer.Stream, "write_eof", spy_end)
    return seen


async def _sidecar(tmp_path: Any, upstream: RawUpstream, sidecars: list[Sidecar]) -> tuple[Sidecar, str]:
    env: Env = make_env(tmp_path, f"http://127.0.0.1:{upstream.port}/v1")
    token = env.access_key("app")
    sc = await boot(env, sidecars, (
        "timeouts: {first_token: 2s, stream_idle: 2s, per_request: 5s}\n"
        "providers:\n  - id: openai\n    base_url: UPSTREAM\n"
        f"    api_keys: {keys_yaml(env, 'openai', [('one', 'sk-one-SECRETVALUE1234')])}\n"
    ))  # fmt: skip
    return sc, token


async def _stream(sc: Sidecar, token: str) -> bytes:
    body = orjson.dumps({"model": "gpt-4o-mini", "stream": True,
                         "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            "Content-Type: application/json\r\n").encode()  # fmt: skip
    got = await raw_request(sc.running.proxy_port, head, body)
    assert got.status == 200, got.body
    return got.body


EVENTS = [ROLE, chunk("Hel"), chunk("lo"), chunk(finish="stop"), DONE]


async def test_a_stream_that_came_whole_is_written_in_one_piece_with_its_end(
    tmp_path: Any, upstream: RawUpstream, sidecars: list[Sidecar], writes: list[tuple[str, bytes]]
) -> None:
    sc, token = await _sidecar(tmp_path, upstream, sidecars)
    upstream.queue.append([_HEAD + framed(*EVENTS) + _END])
    assert await _stream(sc, token) == b"".join(EVENTS)
    assert writes == [("end", b"".join(EVENTS))]


async def test_the_last_events_of_a_live_stream_go_out_with_its_end(
    tmp_path: Any, upstream: RawUpstream, sidecars: list[Sidecar], writes: list[tuple[str, bytes]]
) -> None:
    sc, token = await _sidecar(tmp_path, upstream, sidecars)
    upstream.queue.append([_HEAD + framed(ROLE, chunk("Hel")), 0.05, framed(chunk("lo")), 0.05,
                           framed(chunk(finish="stop"), DONE) + _END])  # fmt: skip
    assert await _stream(sc, token) == b"".join(EVENTS)
    assert writes == [
        ("write", ROLE + chunk("Hel")),
        ("write", chunk("lo")),
        ("end", chunk(finish="stop") + DONE),
    ]


async def test_an_end_that_comes_alone_ends_the_stream_alone(
    tmp_path: Any, upstream: RawUpstream, sidecars: list[Sidecar], writes: list[tuple[str, bytes]]
) -> None:
    sc, token = await _sidecar(tmp_path, upstream, sidecars)
    upstream.queue.append([_HEAD + framed(*EVENTS), 0.05, _END])
    assert await _stream(sc, token) == b"".join(EVENTS)
    assert writes == [("write", b"".join(EVENTS)), ("end", b"")]


async def test_a_finished_stream_without_its_terminator_gets_it_in_the_end(
    tmp_path: Any, upstream: RawUpstream, sidecars: list[Sidecar], writes: list[tuple[str, bytes]]
) -> None:
    # Its tail was lost (no `[DONE]`): relayed as it came, then the terminator, then the end.
    sc, token = await _sidecar(tmp_path, upstream, sidecars)
    upstream.queue.append([_HEAD + framed(*EVENTS[:-1]) + _END])
    assert await _stream(sc, token) == b"".join(EVENTS)
    assert writes == [("write", b"".join(EVENTS[:-1])), ("write", DONE), ("end", b"")]

