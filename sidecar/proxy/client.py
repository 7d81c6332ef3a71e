"""The upstream HTTP/1.1 client of the request path (docs/reference.md#upstream-connections).

aiohttp's `ClientSession` builds a request object per call, merges default headers twice,
runs cookie, tracing, redirect and proxy machinery and a generic connector: about half of
what a bare aiohttp pass-through spends on a request. An attempt needs none of it: its URL,
headers and whole body are in hand, it never follows a redirect and keeps no cookie.

This client keeps idle keep-alive connections per origin (scheme, host, port), writes each
request in one piece, and reads the answer with aiohttp's own protocol and C parser
(`ResponseHandler`): the answer's `content` is the same `StreamReader`, its failures the
same `aiohttp.ClientError`s (`ClientPayloadError`, `ServerDisconnectedError`, ...), and
bodies are decompressed the same way, in bounded chunks.

A connection goes back to its origin's pool only when its answer was read to the end and
neither side asked to close; an answer released early, cancelled or broken closes its
connection. A connection is only ever reused for the origin it was opened to.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections import deque
from typing import Final

import aiohappyeyeballs
import aiohttp
from aiohttp.client_proto import ResponseHandler
from aiohttp.client_reqrep import ClientRequest
from aiohttp.http import SERVER_SOFTWARE, RawResponseMessage
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.streams import StreamReader
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

#: Headers the request always carries unless given (what aiohttp's client adds).
_DEFAULTS: Final = tuple(
    (str(name), value, name.lower())
    for name, value in (*ClientRequest.DEFAULT_HEADERS.items(), ("User-Agent", SERVER_SOFTWARE))
)
#: Idle connections kept per origin; more are closed when released (a burst of streams
#: must not leave a thousand sockets and their buffers behind).
IDLE_PER_ORIGIN: Final = 128
#: How many bytes of an answer are read from the socket before the reader waits.
_READ_BUFSIZE: Final = 1 << 16
_MAX_LINE: Final = 8190
#: Methods sent once more on a new connection when a kept-alive one was closed under them.
_IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
_HAPPY_EYEBALLS_S: Final = 0.25
#: Upstream host addresses are kept this long (the hosts are the config's providers).
_DNS_TTL_S: Final = 300.0
_DNS_ENTRIES: Final = 256

Origin = tuple[str, str, int]  # scheme, host, port


class UpstreamResponse:
    """An upstream's answer: `status`, `headers`, and `content` to read its body from."""

    __slots__ = ("_client", "_done", "_origin", "_protocol", "content", "headers", "status")

    def __init__(
        self,
        client: UpstreamClient,
        origin: Origin,
        protocol: ResponseHandler,
        status: int,
        headers: CIMultiDictProxy[str],
        content: StreamReader,
    ) -> None:
        self._client = client
        self._origin = origin
        self._protocol: ResponseHandler | None = protocol
        self.status = status
        self.headers = headers
        self.content = content
        self._done = False

    def _at_eof(self) -> None:
        """The whole body arrived: the connection can serve the next request."""
        self.release()

    def release(self) -> None:
        """Done with the answer: its connection is kept if the body was read to the end and
        the connection may stay open, else closed."""
        protocol = self._protocol
        if protocol is None:
            return
        self._protocol = None
        if self.content.is_eof() and not protocol.should_close:
            self._client._keep(self._origin, protocol)
        else:
            protocol.close()

    def close(self) -> None:
        """Close the connection now, whatever is left of the answer (it is not wanted)."""
        protocol = self._protocol
        self._protocol = None
        if protocol is not None:
            protocol.close()


class UpstreamClient:
    """Keep-alive connections per origin; `request` sends one request and returns its answer
    once the status line and headers are in."""

    def __init__(
        self, *, keepalive: float = 30.0, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        self._keepalive = keepalive
        # Made now, at start: loading the system's CAs takes a tenth of a second, which the
        # first https attempt would otherwise stall the event loop for.
        self._tls = ssl_context if ssl_context is not None else _default_tls()
        self._dns: dict[tuple[str, int], tuple[float, list[aiohappyeyeballs.AddrInfoType]]] = {}
        self._idle: dict[Origin, deque[tuple[ResponseHandler, float]]] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    async def request(
        self, method: str, url: URL, headers: CIMultiDict[str], body: bytes
    ) -> UpstreamResponse:
        """Send `method url` with `headers` and `body`; the answer, its body still to read.

        Raises `aiohttp.ClientError` (the connection failed or broke, or the answer is not
        HTTP) or `ValueError` (a header carries a line break: nothing is sent). A request
        that may be repeated (not POST nor PATCH) whose kept-alive connection turns out
        closed by the upstream is sent once more, on a new connection, as aiohttp does."""
        if self._closed:
            raise aiohttp.ClientConnectionError("the upstream client is closed")
        head = _request_head(method, url, headers, body)
        scheme = url.scheme
        host = url.raw_host or ""
        origin = (scheme, host, url.port or (443 if scheme == "https" else 80))
        protocol = self._take(origin)
        reused = protocol is not None
        if protocol is None:  # (not `or`: a protocol with nothing queued is falsy)
            protocol = await self._connect(origin)
        try:
            message, payload = await _exchange(protocol, method, head, body)
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
            if not (reused and method in _IDEMPOTENT):
                raise
            protocol = await self._connect(origin)
            message, payload = await _exchange(protocol, method, head, body)
        answer = UpstreamResponse(self, origin, protocol, message.code, message.headers, payload)
        if payload.is_eof():  # no body (204, HEAD, Content-Length: 0)
            answer.release()
        else:
            payload.on_eof(answer._at_eof)
        return answer

    def _take(self, origin: Origin) -> ResponseHandler | None:
        idle = self._idle.get(origin)
        if not idle:
            return None
        oldest_allowed = time.monotonic() - self._keepalive
        while idle:
            protocol, since = idle.pop()  # the most recent: least likely closed by the peer
            if since >= oldest_allowed and protocol.is_connected() and not protocol.should_close:
                return protocol
            protocol.close()
        return None

    async def _connect(self, origin: Origin) -> ResponseHandler:
        scheme, host, port = origin
        loop = asyncio.get_running_loop()
        tls = self._tls if scheme == "https" else None
        try:
            infos = await self._addresses(loop, host.strip("[]"), port)
            # IPv6 and IPv4 raced as aiohttp does, so a family that silently drops packets
            # costs a quarter second, not the attempt's whole timeout.
            sock = await aiohappyeyeballs.start_connection(
                infos, happy_eyeballs_delay=_HAPPY_EYEBALLS_S, interleave=1
            )
            transport, protocol = await loop.create_connection(
                lambda: ResponseHandler(loop), sock=sock, ssl=tls,
                server_hostname=host.strip("[]") if tls is not None else None,
            )  # fmt: skip
        except OSError as exc:  # refused, unreachable, no such host, TLS failure
            why = exc.strerror or type(exc).__name__
            raise aiohttp.ClientOSError(exc.errno, f"cannot connect to the upstream: {why}") from None
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return protocol

    async def _addresses(
        self, loop: asyncio.AbstractEventLoop, host: str, port: int
    ) -> list[aiohappyeyeballs.AddrInfoType]:
        """`host`'s addresses, kept for a while: a burst of new connections resolves once."""
        now = time.monotonic()
        cached = self._dns.get((host, port))
        if cached is not None and cached[0] > now:
            return cached[1]
        infos: list[aiohappyeyeballs.AddrInfoType] = list(
            await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        )
        if not infos:
            raise OSError(f"no address for {host}")
        if len(self._dns) >= _DNS_ENTRIES:
            self._dns.clear()
        self._dns[(host, port)] = (now + _DNS_TTL_S, infos)
        return infos

    def _keep(self, origin: Origin, protocol: ResponseHandler) -> None:
        idle = self._idle.get(origin)
        if idle is None:
            idle = self._idle[origin] = deque()
        if self._closed or len(idle) >= IDLE_PER_ORIGIN or not protocol.is_connected():
            protocol.close()
            return
        idle.append((protocol, time.monotonic()))
        if self._sweeper is None:
            loop = asyncio.get_running_loop()
            self._sweeper = loop.call_later(self._keepalive, self._sweep)

    def _sweep(self) -> None:
        """Close connections idle longer than the keep-alive time."""
        self._sweeper = None
        oldest_allowed = time.monotonic() - self._keepalive
        for origin, idle in list(self._idle.items()):
            while idle and (idle[0][1] < oldest_allowed or not idle[0][0].is_connected()):
                idle.popleft()[0].close()
            if not idle:
                del self._idle[origin]
        if self._idle:
            self._sweeper = asyncio.get_running_loop().call_later(self._keepalive, self._sweep)

    def idle_connections(self) -> int:
        return sum(len(idle) for idle in self._idle.values())

    async def close(self) -> None:
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for idle in self._idle.values():
            for protocol, _ in idle:
                protocol.close()
        self._idle.clear()


async def _exchange(
    protocol: ResponseHandler, method: str, head: bytes, body: bytes
) -> tuple[RawResponseMessage, StreamReader]:
    """Write one request on `protocol` and read its answer's status line and headers."""
    try:
        protocol.set_response_params(
            skip_payload=method == "HEAD", read_until_eof=True, read_bufsize=_READ_BUFSIZE,
            max_line_size=_MAX_LINE, max_field_size=_MAX_LINE,
        )  # fmt: skip
        transport = protocol.transport
        if transport is None:
            raise aiohttp.ServerDisconnectedError()
        transport.writelines((head, body)) if body else transport.write(head)
        while True:
            try:
                message, payload = await protocol.read()
            except HttpProcessingError as exc:
                raise aiohttp.ClientPayloadError(
                    f"the upstream's answer is not HTTP: {exc.message}"
                ) from None
            if message.code == 101:  # never asked for (no `Upgrade` is sent): not HTTP now
                raise aiohttp.ClientPayloadError("the upstream switched protocols unasked")
            if not 100 <= message.code <= 199:
                return message, payload  # an interim answer (100 Continue) is skipped
    except BaseException:
        protocol.close()  # half a request or an unread answer: never reused
        raise


def _request_head(method: str, url: URL, headers: CIMultiDict[str], body: bytes) -> bytes:
    """The request line and headers. A line break in any of them would split the request
    (a header smuggled to the upstream): refused before anything is sent."""
    host = headers.get("Host")  # a provider's own (config), as aiohttp lets it override
    # Joined from pieces, not formatted line by line: a header name is an `istr`, which an
    # f-string formats the slow way (a str subclass).
    authority = host or url.host_port_subcomponent or ""  # (an upstream URL always has a host)
    parts = [method, " ", url.raw_path_qs, " HTTP/1.1\r\nHost: ", authority]
    for name, value in headers.items():
        if host is None or name.lower() != "host":
            parts += ("\r\n", name, ": ", value)
    for name, value, lname in _DEFAULTS:
        if lname not in headers:
            parts += ("\r\n", name, ": ", value)
    if body or method in ("POST", "PUT", "PATCH"):
        parts += ("\r\n", "Content-Length", ": ", str(len(body)))
    parts.append("\r\n\r\n")
    text = "".join(parts)
    # CRLFs: the request line's, one before each header line after Host (four parts each),
    # and the two that end the head.
    breaks = 1 + (len(parts) - 6) // 4 + 2
    if text.count("\n") != breaks or text.count("\r") != breaks:
        raise ValueError("a request header carries a line break")
    return text.encode("utf-8", "surrogateescape")  # bytes a caller sent go on as they came


_TLS: list[ssl.SSLContext] = []


def _default_tls() -> ssl.SSLContext:
    """The system's trusted CAs, certificate and host name checked (made once)."""
    if not _TLS:
        ctx = ssl.create_default_context()
        ctx.set_alpn_protocols(["http/1.1"])
        _TLS.append(ctx)
    return _TLS[0]
