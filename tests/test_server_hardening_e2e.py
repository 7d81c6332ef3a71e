"""Issue #10 on a real `sidecar serve` process: slow and idle callers, a connection flood,
and malformed requests whose raw bytes (access key included) must never reach stderr.

Callers here are raw sockets, since the point is what well-behaved clients never send.
Every wait is bounded; the bounds are generous, only the configured timeouts are short.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import resource
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from tests.harness import Env, Process, sidecar_cmd, spawn_sidecar, subprocess_env

WAIT = 10.0  # seconds: upper bound for anything that should happen "soon"


def _config(env: Env, extra: str) -> Path:
    ref = env.secret("openai", "k1", "sk-upstream-policy-1")
    env.write_config(
        "log: {level: debug}\n"
        "providers:\n  - id: openai\n    base_url: UPSTREAM\n"
        f'    api_keys: [{{id: k1, value: "{ref}"}}]\n' + extra
    )
    return env.config


@contextlib.asynccontextmanager
async def _sidecar(env: Env, tmp_path: Path, extra: str) -> AsyncIterator[Process]:
    config = _config(env, extra)
    p = await asyncio.to_thread(spawn_sidecar, config, tmp_path / "out.log")
    try:
        yield p
    finally:
        if p.proc.poll() is None:
            p.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(p.proc.wait, WAIT)
            except Exception:
                p.proc.kill()
                raise


async def _connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """Everything the server sent until it closed the connection; fails if it stays open."""
    received = b""
    async with asyncio.timeout(seconds):
        while True:
            try:
                chunk = await reader.read(65536)
            except ConnectionError:
                return received
            if not chunk:
                return received
            received += chunk


async def _get_models(port: int, token: str) -> int:
    async with (
        aiohttp.ClientSession() as http,
        http.get(
            f"http://127.0.0.1:{port}/v1/models", headers={"authorization": f"Bearer {token}"}
        ) as r,
    ):
        return r.status


# --------------------------------------------------------------------------- timeouts


async def test_headers_that_never_end_are_cut_by_client_header(env: Env, tmp_path: Path) -> None:
    """keepalive is far longer than WAIT here: only client_header can close these."""
    extra = "timeouts: {client_header: 500ms, keepalive: 120s}\n"
    async with _sidecar(env, tmp_path, extra) as p:
        port = p.proxy_port

        # Headers that never end.
        reader, writer = await _connect(port)
        writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")
        await _closed_within(reader, WAIT)
        writer.close()

        # Headers trickled a byte at a time: the deadline runs from the connect, not per byte.
        reader, writer = await _connect(port)
        request = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 200

        async def trickle() -> None:
            for byte in request:
                writer.write(bytes([byte]))
                await asyncio.sleep(0.05)

        sender = asyncio.create_task(trickle())
        try:
            await _closed_within(reader, WAIT)
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await sender
        assert not sender.done() or sender.cancelled()
        writer.close()


async def test_slow_and_idle_callers_are_closed_within_the_timeouts(
    env: Env, tmp_path: Path
) -> None:
    token = env.access_key("app")
    extra = "timeouts: {client_header: 500ms, client_body: 1s, keepalive: 1s}\n"
    async with _sidecar(env, tmp_path, extra) as p:
        port = p.proxy_port

        # An idle kept-alive connection after a complete exchange.
        reader, writer = await _connect(port)
        writer.write(
            b"GET /v1/models HTTP/1.1\r\nHost: x\r\n"
            + f"Authorization: Bearer {token}\r\n\r\n".encode()
        )
        received = await _closed_within(reader, WAIT)
        assert received.startswith(b"HTTP/1.1 200"), received[:100]
        writer.close()

        # A body trickled at a byte per 200 ms, never finishing (1000 bytes announced).
        reader, writer = await _connect(port)
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {token}\r\nContent-Length: 1000\r\n\r\n".encode()
        )

        async def trickle_body() -> None:
            while True:
                writer.write(b" ")
                await asyncio.sleep(0.2)

        sender = asyncio.create_task(trickle_body())
        try:
            received = await _closed_within(reader, WAIT)
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await sender
        assert received == b"" or received.startswith(b"HTTP/1.1 408"), received[:100]
        writer.close()

        # The server is still fine for a normal caller.
        assert await _get_models(port, token) == 200


async def test_a_connection_flood_is_capped_and_the_admin_port_keeps_answering(
    env: Env, tmp_path: Path
) -> None:
    token = env.access_key("app")
    # A long header timeout: connections closed here were closed by the cap, not the timer.
    extra = "limits: {max_connections: 100}\ntimeouts: {client_header: 60s}\n"
    async with _sidecar(env, tmp_path, extra) as p:
        flood: list[socket.socket] = []
        try:
            for _ in range(300):
                s = socket.create_connection(("127.0.0.1", p.proxy_port), timeout=WAIT)
                s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")  # partial headers
                flood.append(s)

            def count_closed() -> int:
                closed = 0
                for s in flood:
                    s.setblocking(False)
                    try:
                        closed += s.recv(1) == b""
                    except BlockingIOError:
                        pass
                    except ConnectionError:
                        closed += 1
                return closed

            for _ in range(int(WAIT / 0.1)):
                if (closed := count_closed()) >= 200:
                    break
                await asyncio.sleep(0.1)
            assert closed >= 200, f"only {closed} of 300 connections over the cap were closed"

            async with aiohttp.ClientSession() as http:
                async with asyncio.timeout(2.0):
                    async with http.get(f"http://127.0.0.1:{p.admin_port}/readyz") as r:
                        assert r.status == 200
                    async with http.get(f"http://127.0.0.1:{p.admin_port}/healthz") as r:
                        assert r.status == 200
        finally:
            for s in flood:
                s.close()

        # Once the flood is gone, the proxy serves normal callers again.
        deadline = time.monotonic() + WAIT
        status = None
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError):
                status = await _get_models(p.proxy_port, token)
                if status == 200:
                    break
            await asyncio.sleep(0.1)
        assert status == 200
    refused = [r for r in p.lines() if r.get("event") == "connections_refused"]
    assert refused, "refusals over the cap are logged"
    assert sum(int(r["count"]) for r in refused) >= 200
    assert all(r["max_connections"] == 100 for r in refused)


async def test_idle_keepalive_connections_cannot_hold_the_cap(env: Env, tmp_path: Path) -> None:
    """At the cap, an idle kept-alive connection is closed to make room for a new caller."""
    token = env.access_key("app")
    async with _sidecar(env, tmp_path, "limits: {max_connections: 5}\n") as p:
        idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        try:
            for _ in range(5):  # each answers one local request, then sits idle, kept alive
                reader, writer = await _connect(p.proxy_port)
                writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                async with asyncio.timeout(WAIT):
                    head = await reader.readuntil(b"\r\n\r\n")
                    length = int(re.search(rb"(?i)content-length: (\d+)", head)[1])  # type: ignore[index]
                    await reader.readexactly(length)
                assert head.startswith(b"HTTP/1.1 200")
                idle.append((reader, writer))
            for _ in range(3):  # a new caller gets in: an idle connection makes room
                assert await _get_models(p.proxy_port, token) == 200
        finally:
            for _, writer in idle:
                writer.close()


@pytest.mark.skipif(not Path("/proc/self/limits").exists(), reason="reads /proc/PID/limits")
def test_serve_raises_the_open_files_soft_limit_to_the_hard_limit(env: Env) -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip("the hard limit is too low to lower the soft one below it")
    config = _config(env, "")
    stderr = env.dir / "sidecar.err"

    def low_soft_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    with stderr.open("wb") as err:
        proc = subprocess.Popen(sidecar_cmd("serve", "--config", str(config)),
                                stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL,
                                env=subprocess_env(), preexec_fn=low_soft_limit)  # fmt: skip
    p = Process(proc, stderr)
    try:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline and proc.poll() is None:
            if any(r.get("event") == "listening" for r in p.lines()):
                break
            time.sleep(0.05)
        limits = Path(f"/proc/{proc.pid}/limits").read_text()
        (line,) = [ln for ln in limits.splitlines() if ln.startswith("Max open files")]
        now_soft, now_hard = line.split()[3:5]
        assert now_soft == now_hard, line
    finally:
        assert p.stop(WAIT) == 0


# --------------------------------------------------------------------------- malformed requests

LEAK = "sk-sidecar-LEAKCHECK0123456789abcdef"

MALFORMED = {
    "nul_in_header": f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {LEAK}\x00z\r\n\r\n",
    "bare_cr_in_header": f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {LEAK}\rX: y\r\n\r\n",
    "bare_lf_request": f"GET /v1/models HTTP/1.1\nHost: x\nAuthorization: Bearer {LEAK}\n\n",
    "over_long_header": f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {LEAK}"
    + "A" * 110_000
    + "\r\n\r\n",
    "invalid_method": f"G@T /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {LEAK}\r\n\r\n",
    "key_in_target": f"GET /v1/models?key={LEAK} HTTP/1.1\r\nHost: x\r\nBad Header: {LEAK}\r\n\r\n",
    "second_request_bad_method": (
        "GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n"
        f"G\x01T /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {LEAK}\r\n\r\n"
    ),
}  # fmt: skip


async def test_malformed_requests_never_put_the_access_key_on_stderr(
    env: Env, tmp_path: Path
) -> None:
    async with _sidecar(env, tmp_path, "") as p:
        for name, raw in MALFORMED.items():
            reader, writer = await _connect(p.proxy_port)
            writer.write(raw.encode("latin-1"))
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            received = await _closed_within(reader, WAIT)
            statuses = re.findall(rb"HTTP/1\.[01] (\d{3}) ", received)
            assert statuses, (name, received[:200])
            assert statuses[-1] in (b"400", b"431"), (name, received[:200])
            assert LEAK.encode() not in received, f"{name}: the key is echoed to the caller"
            writer.close()
        p.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(p.proc.wait, WAIT) == 0
    err = p.stderr_path.read_bytes()
    assert LEAK.encode() not in err
    assert b"LEAKCHECK" not in err
    lines = err.decode("utf-8", "replace").splitlines()
    assert any('"event":"stopped"' in line for line in lines)
    for line in lines:
        assert len(line) <= 2048, line[:200]
        record = orjson.loads(line)  # every line is JSON
        assert isinstance(record, dict)
        assert "event" in record
    # The bad requests were seen (as sanitized records), not silently dropped.
    assert sum(1 for line in lines if '"event":"http_error"' in line) >= 1
    assert len(err) < 64 * 1024
