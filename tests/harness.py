"""Shared test harness: a real vault, config, mock upstream and sidecar on loopback.

Servers bind port 0 and report the port they got; SDK clients are the
official ones. Nothing here fakes a component users run.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anthropic
import openai
import orjson

from sidecar.crypto import Opener, generate_private_key, write_private_key
from sidecar.logs import AccessLog, OpLog
from sidecar.secret import Secret
from sidecar.server import Running, start
from sidecar.vault import (
    add_access_key,
    attach_key,
    create_vault,
    edit_vault,
    set_secret,
)

REPO = Path(__file__).resolve().parents[1]


class LogSink(io.StringIO):
    """Captures JSON log lines (text or bytes) for assertions."""

    def write_bytes(self, data: bytes) -> int:
        return self.write(data.decode())

    def records(self) -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in self.getvalue().splitlines() if line.strip()]


class _BytesAdapter(io.RawIOBase):
    def __init__(self, sink: LogSink) -> None:
        self.sink = sink

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.sink.write(bytes(data).decode())
        return len(data)


@dataclass
class Env:
    """A directory with a key pair, a vault and a config for one sidecar."""

    dir: Path
    public_key: str
    private_key: Secret
    upstream: str = ""  # mock base URL, e.g. http://127.0.0.1:PORT/v1
    oplog: LogSink = field(default_factory=LogSink)
    access: LogSink = field(default_factory=LogSink)

    @property
    def vault(self) -> Path:
        return self.dir / "vault.json"

    @property
    def config(self) -> Path:
        return self.dir / "sidecar.yaml"

    def secret(self, ns: str, name: str, value: str) -> str:
        """Seal a secret; returns its config reference."""
        with edit_vault(self.vault) as doc:
            set_secret(doc, ns, name, Secret(value))
        return f"${{secrets.get('{ns}', '{name}')}}"

    def access_key(self, name: str, *, credits: float = 0.0, providers: list[str] | None = None,
                   models: list[str] | None = None, rpm: int | None = None,
                   tpm: int | None = None) -> str:  # fmt: skip
        with edit_vault(self.vault) as doc:
            token = add_access_key(doc, name, credits_usd=credits, providers=providers or [],
                                   models=models or [], rpm=rpm, tpm=tpm)  # fmt: skip
        return token.reveal()

    def attach(self, access_key: str, provider: str, key_id: str, value: str) -> None:
        with edit_vault(self.vault) as doc:
            attach_key(doc, access_key, provider, key_id, Secret(value))

    def write_config(
        self, body: str, *, listen: str = "127.0.0.1:0", admin: str = "127.0.0.1:0"
    ) -> Path:
        """Write a config: `body` is YAML appended after listen/admin/vault lines."""
        head = (f"listen: {listen}\nadmin_listen: {admin}\n"
                "vault: {path: vault.json, private_key_file: sidecar.key}\nreload_interval: 200ms\n")  # fmt: skip
        self.config.write_text(head + body.replace("UPSTREAM", self.upstream))
        return self.config

    async def start(self) -> Sidecar:
        running = await start(self.config, oplog=OpLog("debug", self.oplog),
                              access_log=AccessLog(True, io.BufferedWriter(_BytesAdapter(self.access))))  # fmt: skip
        return Sidecar(self, running)


def make_env(directory: Path, upstream: str = "") -> Env:
    key = generate_private_key()
    write_private_key(directory / "sidecar.key", key)
    public = Opener(key).public_key
    create_vault(directory / "vault.json", public)
    return Env(directory, public, key, upstream)


@dataclass
class Sidecar:
    env: Env
    running: Running

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.running.proxy_port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.running.admin_port}"

    def openai(self, key: str, **kw: Any) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, **kw)

    def anthropic(self, key: str, **kw: Any) -> anthropic.AsyncAnthropic:
        return anthropic.AsyncAnthropic(base_url=self.url, api_key=key, max_retries=0, **kw)

    async def stop(self) -> None:
        await self.running.stop()
        self.running.state.access_log.flush()


async def start_with_timeouts(env: Env, sidecars: list[Sidecar], timeouts: str, *,
                              key: str = "sk-upstream-1", app: str = "app") -> tuple[Sidecar, str]:  # fmt: skip
    """A sidecar with one OpenAI key (`key`, whose name the mock reads) and `timeouts:` as
    given, appended to `sidecars`; with a new access key named `app`, returned."""
    ref = env.secret("openai", "k1", key)
    token = env.access_key(app)
    env.write_config(
        f"timeouts: {timeouts}\nproviders:\n  - id: openai\n    base_url: UPSTREAM\n"
        f'    api_keys: [{{id: k1, value: "{ref}"}}]\n'
    )
    sc = await env.start()
    sidecars.append(sc)
    return sc, token


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sidecar_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "sidecar", *args]


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


@dataclass
class Process:
    """A sidecar (or mock) in its own process; stderr is read for the `listening` line."""

    proc: subprocess.Popen[bytes]
    stderr_path: Path
    proxy_port: int = 0
    admin_port: int = 0

    def lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.stderr_path.read_text().splitlines():
            if line.startswith("{"):
                out.append(orjson.loads(line))
        return out

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(timeout)


def spawn_sidecar(config: Path, stdout: Path, *, timeout: float = 20.0) -> Process:
    stderr = config.parent / f"sidecar-{time.monotonic_ns()}.err"
    with stdout.open("wb") as out, stderr.open("wb") as err:  # the child keeps its own copies
        proc = subprocess.Popen(sidecar_cmd("serve", "--config", str(config)), stdout=out, stderr=err,
                                env=subprocess_env(), stdin=subprocess.DEVNULL)  # fmt: skip
    p = Process(proc, stderr)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for rec in p.lines():
            if rec.get("event") == "listening":
                p.proxy_port = int(rec["proxy"].rsplit(":", 1)[1])
                p.admin_port = int(rec["admin"].rsplit(":", 1)[1])
                return p
        if proc.poll() is not None:
            raise RuntimeError(f"sidecar exited: {stderr.read_text()[-2000:]}")
        time.sleep(0.05)
    proc.kill()
    raise TimeoutError("sidecar did not start")


def iter_metric(text: str, name: str) -> Iterator[tuple[dict[str, str], float]]:
    """Samples of one metric from Prometheus text format."""
    from prometheus_client.parser import text_string_to_metric_families

    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name:
                yield dict(s.labels), float(s.value)


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` (0 if none)."""
    return sum(
        v for ls, v in iter_metric(text, name) if all(ls.get(k) == val for k, val in labels.items())
    )


# --------------------------------------------------------------------------- raw HTTP, listeners, memory


@dataclass
class RawResponse:
    """A response read off a raw socket: status, lower-cased headers, the whole body."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


async def raw_request(port: int, head: bytes, body: bytes = b"", *, within: float = 10.0) -> RawResponse:  # fmt: skip
    """Send `head` (request line and headers, CRLF-terminated, no blank line) and `body` as is.

    Adds `content-length` when there is a body and `connection: close`; the answer is read
    whole (content-length, chunked or to EOF). A write the server refused to take is ignored:
    servers may answer before reading everything.
    """

    async def exchange() -> RawResponse:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            extra = b"content-length: %d\r\n" % len(body) if body else b""
            writer.write(head + extra + b"connection: close\r\n\r\n")
            sender = asyncio.ensure_future(_send_all(writer, body))
            try:
                return await _read_response(reader)
            finally:
                sender.cancel()
        finally:
            writer.close()

    return await asyncio.wait_for(exchange(), within)


async def _send_all(writer: Any, body: bytes) -> None:
    try:
        for i in range(0, len(body), 1 << 16):
            writer.write(body[i : i + (1 << 16)])
            await writer.drain()
    except (ConnectionError, OSError):
        pass


async def _read_response(reader: Any) -> RawResponse:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                break
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
        body = b"".join(parts)
    else:
        body = await reader.read()
    return RawResponse(status, headers, body)


@dataclass
class Listener:
    """A TCP listener that must stay untouched: counts connections and bytes, answers nothing."""

    port: int = 0
    connections: int = 0
    received: bytearray = field(default_factory=bytearray, repr=False)  # may hold a leaked key
    server: Any = field(default=None, repr=False)

    async def __aenter__(self) -> Listener:
        async def accept(reader: Any, writer: Any) -> None:
            self.connections += 1
            with contextlib.suppress(TimeoutError, ConnectionError):
                self.received += await asyncio.wait_for(reader.read(1 << 16), 0.5)
            writer.close()  # closing at once: a sidecar that connected fails fast

        self.server = await asyncio.start_server(accept, "127.0.0.1", 0)
        self.port = int(self.server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        await self.server.wait_closed()


def rss_kib(pid: int, field_name: str = "VmRSS") -> int:
    """A process's resident memory from /proc/<pid>/status (`VmRSS`, or `VmHWM` for its peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise LookupError(field_name)


def reset_peak_rss(pid: int) -> bool:
    """Reset a process's `VmHWM` to its current RSS (Linux ≥ 4.0); False when not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def spawn_mock(directory: Path, *, timeout: float = 20.0) -> tuple[subprocess.Popen[bytes], int]:
    """`sidecar mock-provider` in its own process on a free port; returns it and the port."""
    port = free_port()
    err = directory / f"mock-{time.monotonic_ns()}.err"
    with err.open("wb") as f:
        proc = subprocess.Popen(sidecar_cmd("mock-provider", "--listen", f"127.0.0.1:{port}"),
                                stdout=subprocess.DEVNULL, stderr=f, env=subprocess_env(),
                                stdin=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mock exited: {err.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_mock/health", timeout=1):
                return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise TimeoutError("mock provider did not start")
