"""A real `redis-server` for tests, on a free loopback port in a temp dir.

`redis_url` is a pytest fixture: import it into a test module. Without a
`redis-server` on PATH it skips, unless `SIDECAR_TEST_REQUIRE_REDIS=1`, in
which case it fails (CI must not silently skip the Redis backend).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

START_TIMEOUT = 10.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One `redis-server` process; `stop()` and `start()` keep the same port."""

    def __init__(self, executable: str, directory: Path, port: int | None = None) -> None:
        self.executable = executable
        self.directory = directory
        self.port = port or free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert self._proc is None, "already running"
        self._proc = subprocess.Popen(
            [
                self.executable,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc = None
                raise RuntimeError(f"redis-server exited at start (port {self.port})")
            if _ping(self.port):
                return
            time.sleep(0.01)
        self.stop()
        raise RuntimeError(f"redis-server did not answer PING within {START_TIMEOUT}s")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def redis_executable() -> str | None:
    return shutil.which("redis-server")


def _running_server() -> Iterator[RedisServer]:
    executable = redis_executable()
    if executable is None:
        message = "redis-server is not on PATH"
        if os.environ.get("SIDECAR_TEST_REQUIRE_REDIS") == "1":
            pytest.fail(f"{message} and SIDECAR_TEST_REQUIRE_REDIS=1")
        pytest.skip(message)
    with tempfile.TemporaryDirectory(prefix="sidecar-redis-") as tmp:
        for attempt in range(3):
            server = RedisServer(executable, Path(tmp))
            try:
                server.start()
                break
            except RuntimeError:
                if attempt == 2:
                    raise  # the free port was taken before redis bound it, thrice
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    yield from _running_server()


@pytest.fixture(scope="module")
def module_redis_url() -> Iterator[str]:
    """One redis-server for a whole module (tests that need their own use `redis_server`)."""
    for server in _running_server():
        yield server.url


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url
