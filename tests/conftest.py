from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from sidecar.mock_provider import create_app
from tests.harness import Env, Sidecar, make_env


@pytest.fixture
async def mock_server(aiohttp_server: Callable[..., object]) -> TestServer:
    server = await aiohttp_server(create_app())  # type: ignore[operator]
    return server  # type: ignore[no-any-return]


@pytest.fixture
async def env(tmp_path: Path, mock_server: TestServer) -> Env:
    return make_env(tmp_path, str(mock_server.make_url("/v1")))


@pytest.fixture
def token(env: Env) -> str:
    """An unrestricted access key, in the vault before the sidecar starts."""
    return env.access_key("app")


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def sidecars() -> AsyncIterator[list[Sidecar]]:
    """Sidecars appended here are stopped at teardown."""
    started: list[Sidecar] = []
    yield started
    for s in started:
        await s.stop()
