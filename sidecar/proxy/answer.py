"""The caller's response head, serialised once: a relayed answer's status line and headers
written by the sidecar itself, not by `web.Response`'s general machinery.

aiohttp builds every response's headers in a `CIMultiDict`, then walks them again to add
framing, `Date`, `Server` and `Connection`, through a dozen Python calls. A relayed answer
needs none of that: its headers are the upstream's end-to-end ones, filtered once here,
then the sidecar's own, then the framing. `Answer` (a body read whole) and `Stream` (an
answer relayed as it arrives, chunked) are `web.StreamResponse`s to aiohttp, which sends
nothing more for them; they keep its writer's accounting (`output_size`, `buffer_size`),
its drain and its keep-alive rules. aiohttp is pinned in constraints.txt: this module uses
its writer's fields (`_headers_buf`, `_headers_written`) and its C header serialiser, which
refuses a CR or LF in any name or value as it did before.

Responses that must have no body (aiohttp's own rule: HEAD, 1xx, 204, 304) and HTTP/1.0 streams keep
`web.Response`/`web.StreamResponse` (`answer()`, `stream()` pick).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.helpers import must_be_empty_body, rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE, HttpVersion11
from aiohttp.http_writer import _serialize_headers
from aiohttp.web_response import REASON_PHRASES
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.proxy.upstream import HOP_BY_HOP

__all__ = ["Answer", "Stream", "answer", "stream"]

#: Response headers never relayed: hop-by-hop, and what the upstream client undid (it
#: decompresses and re-frames the body); cookies are the upstream's, not the caller's.
DROP_RESPONSE: Final = HOP_BY_HOP | {"content-encoding", "set-cookie"}
#: aiohttp's writer waits for the caller to read once this many bytes were written since
#: it last did (its `LIMIT`); `Stream.write` keeps the same rule.
DRAIN_AT: Final = 0x10000
#: What a `Connection` header says besides naming hop-by-hop headers.
_CONNECTION_OPTIONS: Final = frozenset({"", "close", "keep-alive"})
#: Headers the sidecar adds when the upstream's answer has none of its own.
_DEFAULTED: Final = frozenset({"date", "server", "content-type"})


class _Pairs(list[tuple[str, str]]):
    """(name, value) pairs, repeats kept, as aiohttp's header serialiser reads a mapping."""

    items = list.__iter__


def _pairs(
    upstream: Iterable[tuple[str, str]], own: dict[str, str], content_type: str | None
) -> tuple[_Pairs, set[str]]:
    """The upstream's end-to-end headers (none the sidecar sets itself), then the sidecar's;
    with the lower-cased names of `_DEFAULTED` present."""
    out = _Pairs()
    seen: set[str] = set()
    named = ""  # the upstream's `Connection`: the headers it names are hop-by-hop too
    for name, value in upstream:
        low = name.lower()
        if low in DROP_RESPONSE or low in own:
            if low == "connection":
                named += "," + value
            continue
        if low in _DEFAULTED:
            if low == "content-type" and content_type is not None:
                continue
            seen.add(low)
        out.append((name, value))
    if named:
        hop = {t.strip().lower() for t in named.split(",")} - _CONNECTION_OPTIONS
        if hop:  # RFC 9110 §7.6.1
            out[:] = [pair for pair in out if pair[0].lower() not in hop]
            seen -= hop
    if content_type is not None:
        out.append(("Content-Type", content_type))
        seen.add("content-type")
    out.extend(own.items())
    return out, seen


def _head(
    request: web.BaseRequest,
    status: int,
    reason: str,
    pairs: _Pairs,
    seen: set[str],
    length: int | None,
    keep_alive: bool,
) -> bytes:
    """The serialised head. `length` None: chunked (HTTP/1.1 only)."""
    if length is None:
        pairs.append(("Transfer-Encoding", "chunked"))
    else:
        pairs.append(("Content-Length", str(length)))
    if length != 0 and "content-type" not in seen:  # as aiohttp does for a body of any length
        pairs.append(("Content-Type", "application/octet-stream"))
    if "date" not in seen:
        pairs.append(("Date", rfc822_formatted_time()))
    if "server" not in seen:
        pairs.append(("Server", SERVER_SOFTWARE))
    version = request.version
    if version == HttpVersion11:
        if not keep_alive:
            pairs.append(("Connection", "close"))
        line = f"HTTP/1.1 {status} {reason}"
    else:
        if keep_alive:
            pairs.append(("Connection", "keep-alive"))
        line = f"HTTP/{version[0]}.{version[1]} {status} {reason}"
    return _serialize_headers(line, pairs)  # type: ignore[arg-type]


class _Lean(web.StreamResponse):
    """What aiohttp reads of a response it did not prepare: `prepare`, `write_eof`,
    `keep_alive`, `prepared`, `status` (the class defaults of `StreamResponse` cover the rest).
    `headers` is a read-only copy: a header is set by building the response, not after.
    No `on_response_prepare` signal is sent for it (the sidecar registers none)."""

    def __init__(self, status: int, pairs: _Pairs, seen: set[str]) -> None:
        # Not StreamResponse.__init__: its headers mapping is what this class does without.
        self._state: dict[Any, Any] = {}
        self._status = status
        self._reason = REASON_PHRASES.get(status, "")
        self._pairs = pairs
        self._seen = seen

    @property  # type: ignore[override]
    def _headers(self) -> CIMultiDictProxy[str]:  # type: ignore[override]
        return CIMultiDictProxy(CIMultiDict(self._pairs))

    async def prepare(self, request: web.BaseRequest) -> Any:
        if self._eof_sent:
            return None
        if self._payload_writer is not None:
            return self._payload_writer
        return self._begin(request)

    def _begin(self, request: web.BaseRequest) -> AbstractStreamWriter:
        raise NotImplementedError

    def _hold_head(self, request: web.BaseRequest, length: int | None) -> AbstractStreamWriter:
        """Take the request's writer and leave the serialised head in it, to go out with the
        body (`length` None: chunked). Keep-alive is the caller's wish unless `force_close()`
        was called."""
        writer = self._payload_writer = request._payload_writer
        self._req = request
        keep_alive = self._keep_alive = request.keep_alive and self._keep_alive is not False
        writer._headers_buf = _head(request, self._status, self._reason, self._pairs,  # type: ignore[attr-defined]
                                    self._seen, length, keep_alive)  # fmt: skip
        writer._headers_written = False  # type: ignore[attr-defined]
        return writer


class Answer(_Lean):
    """A whole body, sent with its head in one write by `write_eof`."""

    def __init__(self, status: int, pairs: _Pairs, seen: set[str], body: bytes) -> None:
        super().__init__(status, pairs, seen)
        self._body = body

    def _begin(self, request: web.BaseRequest) -> AbstractStreamWriter:
        body = self._body
        assert isinstance(body, (bytes, bytearray))
        writer = self._hold_head(request, len(body))
        writer.length = len(body)
        return writer

    async def write_eof(self, data: bytes = b"") -> None:
        if self._eof_sent:
            return
        writer = self._payload_writer
        assert writer is not None, "Response has not been started"
        await writer.write_eof(self._body)  # type: ignore[arg-type]
        self._eof_sent = True
        self._req = None
        self._body_length = writer.output_size
        self._payload_writer = None


class Stream(_Lean):
    """A chunked answer. Its head is held until the first `write`, and goes out in the same
    write as that first chunk (one system call, one packet); `send_head` sends it alone."""

    def _begin(self, request: web.BaseRequest) -> AbstractStreamWriter:
        writer = self._hold_head(request, None)
        writer.enable_chunking()
        return writer

    def send_head(self) -> None:
        """Send the head now, if it has not gone out yet."""
        writer = self._payload_writer
        if writer is not None:
            writer.send_headers()  # type: ignore[attr-defined]

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """One chunk, framed here and written in one piece (with the head, the first time);
        it waits for the caller to read only past aiohttp's drain limit, as aiohttp's does."""
        writer = self._payload_writer
        if writer is None or self._eof_sent:
            raise RuntimeError("write() outside of a prepared, unfinished response")
        if not data:
            return
        head = writer._headers_buf  # type: ignore[attr-defined]
        if head is not None and not writer._headers_written:  # type: ignore[attr-defined]
            writer._headers_written = True  # type: ignore[attr-defined]
            writer._headers_buf = None  # type: ignore[attr-defined]
            frame = b"%b%x\r\n%b\r\n" % (head, len(data), data)  # type: ignore[str-format]
        else:
            frame = b"%x\r\n%b\r\n" % (len(data), data)  # type: ignore[str-format]
        writer._write(frame)  # type: ignore[attr-defined]
        if writer.buffer_size > DRAIN_AT:
            writer.buffer_size = 0
            await writer.drain()


def answer(
    request: web.BaseRequest,
    status: int,
    upstream: Iterable[tuple[str, str]],
    own: dict[str, str],
    body: bytes,
    content_type: str | None = None,
) -> web.StreamResponse:
    """A relayed answer read whole: the upstream's end-to-end headers (`content_type`
    replaces its Content-Type), then the sidecar's own (`own`, lower-case names)."""
    pairs, seen = _pairs(upstream, own, content_type)
    if must_be_empty_body(request.method, status):
        return web.Response(status=status, body=body, headers=CIMultiDict(pairs))
    return Answer(status, pairs, seen, body)


def stream(
    request: web.BaseRequest, status: int, upstream: Iterable[tuple[str, str]], own: dict[str, str]
) -> web.StreamResponse:
    """A relayed answer sent as it arrives (chunked; HTTP/1.0: until the connection closes)."""
    pairs, seen = _pairs(upstream, own, None)
    if must_be_empty_body(request.method, status) or request.version != HttpVersion11:
        return web.StreamResponse(status=status, headers=CIMultiDict(pairs))
    return Stream(status, pairs, seen)
