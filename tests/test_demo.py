"""The embedded default behind `make run`: files it creates, and the path it demonstrates."""

from __future__ import annotations

import stat
from pathlib import Path

from aiohttp.test_utils import TestServer

from sidecar.check import run_check
from sidecar.demo import MOCK_PORT, prepare
from sidecar.server import start
from tests.harness import Sidecar


def test_prepare_creates_a_valid_setup_once(tmp_path: Path) -> None:
    demo = tmp_path / ".demo"
    config, token = prepare(demo)
    assert run_check(config) == []
    for name in ("sidecar.key", "access-key"):
        assert stat.S_IMODE((demo / name).stat().st_mode) == 0o600
    vault = (demo / "vault.json").read_text()
    assert token.reveal() not in vault
    assert "demo-openai-good" not in vault  # sealed
    again, token2 = prepare(demo)
    assert (again, token2) == (config, token)  # second run reuses everything


async def test_demo_config_shows_failover_and_managed_keys(
    tmp_path: Path, mock_server: TestServer, sidecars: list[Sidecar]
) -> None:
    config, token = prepare(tmp_path / ".demo")
    text = config.read_text()
    mock = f"127.0.0.1:{mock_server.port}"
    config.write_text(text.replace(f"127.0.0.1:{MOCK_PORT}", mock)
                      .replace("127.0.0.1:8080", "127.0.0.1:0").replace("127.0.0.1:9090", "127.0.0.1:0"))  # fmt: skip
    running = await start(config)
    sc = Sidecar(env=None, running=running)  # type: ignore[arg-type]
    sidecars.append(sc)
    async with sc.openai(token.reveal()) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}]
        )
    assert (raw.headers["x-sidecar-key-id"], raw.headers["x-sidecar-attempts"]) == ("backup", "2")
    async with sc.anthropic(token.reveal()) as client:
        raw2 = await client.messages.with_raw_response.create(
            model="claude-haiku-4-5", max_tokens=32, messages=[{"role": "user", "content": "hello"}]
        )
    assert raw2.headers["x-sidecar-key-source"] == "managed"
