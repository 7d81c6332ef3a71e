"""SIGTERM drain (SPEC §8) on a real `sidecar serve` process."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import aiohttp
import pytest

from tests.harness import Env, Process, spawn_sidecar

CHAT = {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "hi"}]}


def _config(env: Env, key: str, grace: str) -> Path:
    ref = env.secret("openai", "k1", key)
    env.write_config(
        f"shutdown_grace: {grace}\nlog: {{level: info}}\n"
        f"providers:\n  - id: openai\n    base_url: UPSTREAM\n"
        f'    api_keys: [{{id: k1, value: "{ref}"}}]\n'
    )
    return env.config


async def _status(http: aiohttp.ClientSession, url: str) -> int | None:
    try:
        async with http.get(url) as r:
            return r.status
    except aiohttp.ClientError:
        return None


async def _wait_exit(p: Process, within: float = 30.0) -> int:
    return await asyncio.to_thread(p.proc.wait, within)


async def test_sigterm_drains_in_flight_stream_and_exits_0(env: Env, tmp_path: Path) -> None:
    # `stall-400`: 400 ms between events, so the stream is still running when SIGTERM lands.
    config = _config(env, "sk-drain-stall-400", "10s")
    token = env.access_key("app")
    p = await asyncio.to_thread(spawn_sidecar, config, tmp_path / "out.log")
    base, admin = f"http://127.0.0.1:{p.proxy_port}", f"http://127.0.0.1:{p.admin_port}"
    try:
        async with aiohttp.ClientSession() as http:
            assert await _status(http, admin + "/readyz") == 200
            resp = await http.post(base + "/v1/chat/completions", json=CHAT,
                                   headers={"authorization": f"Bearer {token}"})  # fmt: skip
            assert resp.status == 200
            first = await resp.content.readany()
            assert first.startswith(b"data:")

            p.proc.send_signal(signal.SIGTERM)
            # Not ready at once; the admin port keeps answering while draining.
            for _ in range(100):
                if await _status(http, admin + "/readyz") == 503:
                    break
                await asyncio.sleep(0.02)
            else:
                pytest.fail("/readyz did not turn 503 after SIGTERM")
            assert await _status(http, admin + "/healthz") == 200
            # The proxy port takes no new connections.
            async with aiohttp.ClientSession() as fresh:
                with pytest.raises(aiohttp.ClientConnectionError):
                    await fresh.post(base + "/v1/chat/completions", json=CHAT,
                                     headers={"authorization": f"Bearer {token}"})  # fmt: skip
            # The stream in flight finishes whole.
            rest = await resp.content.read()
            resp.release()
        assert (first + rest).rstrip().endswith(b"data: [DONE]")
        assert await _wait_exit(p) == 0
        events = [r.get("event") for r in p.lines()]
        assert events.index("draining") < events.index("stopped")
    finally:
        if p.proc.poll() is None:
            p.proc.kill()


async def test_streams_past_the_grace_period_are_cut_and_exit_is_still_0(
    env: Env, tmp_path: Path
) -> None:
    config = _config(env, "sk-slow-stall-2000", "500ms")
    token = env.access_key("app")
    p = await asyncio.to_thread(spawn_sidecar, config, tmp_path / "out.log")
    base = f"http://127.0.0.1:{p.proxy_port}"
    try:
        async with aiohttp.ClientSession() as http:
            resp = await http.post(base + "/v1/chat/completions", json=CHAT,
                                   headers={"authorization": f"Bearer {token}"})  # fmt: skip
            assert resp.status == 200
            await resp.content.readany()
            p.proc.send_signal(signal.SIGTERM)
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.content.read()  # cut: no terminator
            resp.release()
        assert await _wait_exit(p) == 0
    finally:
        if p.proc.poll() is None:
            p.proc.kill()
