"""`sidecar demo`, the embedded default behind `make run`: files it creates, and the path it demonstrates."""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import anthropic
import openai
import pytest

from sidecar.check import run_check
from sidecar.cli import build_parser, main
from sidecar.config import HostPort, load_config
from sidecar.demo import DEFAULTS, DemoAddresses, prepare
from sidecar.vault import edit_vault
from tests.harness import free_port, raw_request, sidecar_cmd, subprocess_env

CHOSEN = DemoAddresses(
    listen=HostPort("127.0.0.1", 18080),
    admin_listen=HostPort("127.0.0.1", 19090),
    mock_listen=HostPort("127.0.0.1", 18089),
)


def test_prepare_creates_a_valid_setup_once(tmp_path: Path) -> None:
    demo = tmp_path / ".demo"
    config, token = prepare(demo)
    assert run_check(config) == []
    for name in ("sidecar.key", "access-key"):
        assert stat.S_IMODE((demo / name).stat().st_mode) == 0o600
    vault = (demo / "vault.json").read_text()
    assert token.reveal() not in vault
    assert "demo-openai-good" not in vault  # sealed
    before = {p.name: p.read_bytes() for p in demo.iterdir()}
    again, token2 = prepare(demo)
    assert (again, token2) == (config, token)  # second run reuses everything
    assert {p.name: p.read_bytes() for p in demo.iterdir()} == before


def test_prepare_adds_the_secrets_a_newer_demo_needs_to_an_older_folder(tmp_path: Path) -> None:
    demo = tmp_path / ".demo"
    config, token = prepare(demo)
    with edit_vault(demo / "vault.json") as doc:  # as an older version left it
        del doc.secrets["google"]
    assert run_check(config) != []
    again, token2 = prepare(demo)
    assert token2 == token
    assert run_check(again) == []


def test_prepare_writes_the_chosen_addresses_and_keeps_the_keys(tmp_path: Path) -> None:
    demo = tmp_path / ".demo"
    config, token = prepare(demo)
    loaded = load_config(config)
    assert (loaded.listen, loaded.admin_listen) == (DEFAULTS.listen, DEFAULTS.admin_listen)
    assert {p.base_url for p in loaded.providers} == {"http://127.0.0.1:8089/v1",
                                                      "http://127.0.0.1:8089/v1beta"}  # fmt: skip
    vault = (demo / "vault.json").read_bytes()

    again, token2 = prepare(demo, CHOSEN)
    loaded = load_config(again)
    assert (loaded.listen, loaded.admin_listen) == (CHOSEN.listen, CHOSEN.admin_listen)
    assert {p.base_url for p in loaded.providers} == {"http://127.0.0.1:18089/v1",
                                                      "http://127.0.0.1:18089/v1beta"}  # fmt: skip
    assert token2 == token
    assert (demo / "vault.json").read_bytes() == vault
    assert run_check(again) == []


def test_demo_options_and_defaults() -> None:
    args = build_parser().parse_args(["demo"])
    assert (args.dir, args.listen, args.admin_listen, args.mock_listen) == (
        ".demo", DEFAULTS.listen, DEFAULTS.admin_listen, DEFAULTS.mock_listen
    )  # fmt: skip
    args = build_parser().parse_args(
        ["demo", "--dir", "x", "--listen", "127.0.0.1:18080", "--admin-listen", "127.0.0.1:19090",
         "--mock-listen", "127.0.0.1:18089"]
    )  # fmt: skip
    assert args.dir == "x"
    assert DemoAddresses(args.listen, args.admin_listen, args.mock_listen) == CHOSEN


@pytest.mark.parametrize("option", ["--listen", "--admin-listen", "--mock-listen"])
def test_demo_on_a_busy_port_says_which_option_moves_it(tmp_path: Path, option: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = f"127.0.0.1:{busy.getsockname()[1]}"
        ports = {o: "127.0.0.1:0" for o in ("--listen", "--admin-listen", "--mock-listen")}
        ports[option] = taken
        argv = ["demo", "--dir", str(tmp_path / "state")]
        argv += [arg for pair in ports.items() for arg in pair]
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            assert main(argv) == 1
    assert err.getvalue().startswith("error: "), err.getvalue()
    assert taken in err.getvalue()
    assert option in err.getvalue()


@dataclass
class Demo:
    proc: subprocess.Popen[bytes]
    port: int
    banner: str
    token: str
    cwd_entries: list[str]
    err: Path


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[Demo]:
    """`sidecar demo` on a chosen proxy port, free admin and mock ports, state in ./state."""
    port = free_port()
    err = tmp_path / "demo.err"
    argv = sidecar_cmd("demo", "--dir", "state", "--listen", f"127.0.0.1:{port}",
                       "--admin-listen", "127.0.0.1:0", "--mock-listen", "127.0.0.1:0")  # fmt: skip
    with err.open("wb") as fh:
        proc = subprocess.Popen(argv, cwd=tmp_path, env=subprocess_env(), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=fh)  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while "Ctrl-C stops everything" not in err.read_text():
            assert proc.poll() is None, err.read_text()
            assert time.monotonic() < deadline, err.read_text()
            time.sleep(0.05)
        token = (tmp_path / "state" / "access-key").read_text().strip()
        entries = sorted(p.name for p in tmp_path.iterdir())
        yield Demo(proc, port, err.read_text().partition("demo is up")[2], token, entries, err)
        assert proc.poll() is not None, "the test stops the demo"
        assert proc.returncode == 0, err.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


async def test_demo_runs_on_the_chosen_ports(demo: Demo) -> None:
    proxy = f"http://127.0.0.1:{demo.port}"
    curls = re.findall(r"curl -s -i (\S+)", demo.banner)
    assert curls == [f"{proxy}/v1/chat/completions", f"{proxy}/v1/messages",
                     f"{proxy}/v1/chat/completions",
                     f"{proxy}/v1beta/models/gemini-2.5-flash:generateContent"], demo.banner  # fmt: skip
    for default_port in (":8080", ":9090", ":8089"):
        assert default_port not in demo.banner
    assert demo.cwd_entries == ["demo.err", "state"]

    async with openai.AsyncOpenAI(base_url=proxy + "/v1", api_key=demo.token, max_retries=0) as oa:
        raw = await oa.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}]
        )
    assert (raw.headers["x-sidecar-key-id"], raw.headers["x-sidecar-attempts"]) == ("backup", "2")
    async with anthropic.AsyncAnthropic(base_url=proxy, api_key=demo.token, max_retries=0) as an:
        raw2 = await an.messages.with_raw_response.create(
            model="claude-haiku-4-5", max_tokens=32, messages=[{"role": "user", "content": "hello"}]
        )
    assert raw2.headers["x-sidecar-key-source"] == "managed"
    # The banner's third line: the OpenAI SDK asking for Claude, translated; the fourth: Gemini.
    async with openai.AsyncOpenAI(base_url=proxy + "/v1", api_key=demo.token, max_retries=0) as oa:
        raw3 = await oa.chat.completions.with_raw_response.create(
            model="claude-haiku-4-5", messages=[{"role": "user", "content": "hello"}]
        )
    assert raw3.headers["x-sidecar-translated"] == "openai->anthropic"
    async with aiohttp.ClientSession() as http, http.post(
        curls[3], headers={"x-goog-api-key": demo.token},
        json={"contents": [{"parts": [{"text": "hello"}]}]},
    ) as r:  # fmt: skip
        assert r.status == 200
        assert (await r.json())["candidates"][0]["content"]["parts"][0]["text"]

    # As with `serve`, a malformed request's raw bytes (a key, say) never reach stderr.
    marker = "sk-sc-demo-malformed-marker"
    resp = await raw_request(demo.port, f"GET / HTTP/1.1\r\nx-api-key: {marker}\x00\r\n".encode())
    assert resp.status == 400
    await asyncio.sleep(0.2)
    assert marker not in demo.err.read_text(), "raw request bytes reached the demo's stderr"

    demo.proc.send_signal(signal.SIGINT)
    for _ in range(600):
        if demo.proc.poll() is not None:
            break
        await asyncio.sleep(0.05)
