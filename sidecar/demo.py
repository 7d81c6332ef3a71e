"""The embedded default (SPEC §6): `make run` / `sidecar serve` without `--config`.

On first run it creates, under `.demo/` (git-ignored): a key pair, a sealed
vault with mock provider keys, an access key and a config. Then it serves the
mock provider (as the upstream) and the sidecar on the default ports, prints
a working `curl` line, and runs until Ctrl-C, which stops both.

The demo config shows the whole key-selection path: OpenAI requests use
policy keys whose first key is rate-limited (watch the failover and the
cooldown in /metrics); Anthropic requests use managed keys charged to the
access key's demo credits.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Final

from aiohttp import web

from sidecar.crypto import Opener, generate_private_key, write_private_key
from sidecar.errors import UserError
from sidecar.secret import Secret
from sidecar.vault import (
    add_access_key,
    create_vault,
    edit_vault,
    set_secret,
)

MOCK_PORT: Final = 8089

DEMO_CONFIG: Final = f"""\
# Demo config written by `make run`. Every key is a mock key for the local mock provider.
listen: 127.0.0.1:8080
admin_listen: 127.0.0.1:9090
vault: {{path: vault.json, private_key_file: sidecar.key}}
shutdown_grace: 2s
providers:
  - id: openai
    base_url: http://127.0.0.1:{MOCK_PORT}/v1
    api_keys:
      # The mock answers 429 to this key: the first request fails over to `backup`.
      - {{id: primary, value: "${{secrets.get('openai', 'primary')}}"}}
      - {{id: backup, value: "${{secrets.get('openai', 'backup')}}"}}
  - id: anthropic
    base_url: http://127.0.0.1:{MOCK_PORT}/v1
managed:
  anthropic: [{{id: pool-1, value: "${{secrets.get('managed', 'anthropic-1')}}"}}]
ledger: {{url: "sqlite:///ledger.db"}}
"""

_DEMO_SECRETS: Final = {
    ("openai", "primary"): "demo-openai-fail-429-retry-30",
    ("openai", "backup"): "demo-openai-good",
    ("managed", "anthropic-1"): "demo-anthropic-pool",
}


def prepare(state_dir: Path) -> tuple[Path, Secret]:
    """Create the demo files once; return the config path and the demo access key."""
    state_dir.mkdir(parents=True, exist_ok=True)
    config = state_dir / "sidecar.yaml"
    token_file = state_dir / "access-key"
    if config.exists() and token_file.exists():
        return config, Secret(token_file.read_text().strip())
    key_file = state_dir / "sidecar.key"
    vault = state_dir / "vault.json"
    for leftover in (key_file, vault, vault.with_name("vault.json.lock"), token_file):
        leftover.unlink(missing_ok=True)
    private = generate_private_key()
    write_private_key(key_file, private)
    create_vault(vault, Opener(private).public_key)
    with edit_vault(vault) as doc:
        for (ns, name), value in _DEMO_SECRETS.items():
            set_secret(doc, ns, name, Secret(value))
        token = add_access_key(doc, "demo", credits_usd=5.0)
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token.reveal() + "\n")
    config.write_text(DEMO_CONFIG)
    return config, token


def _banner(token: Secret) -> str:
    t = token.reveal()
    return f"""
  AI gateway sidecar demo is up.
    proxy   http://127.0.0.1:8080   (OpenAI base_url http://127.0.0.1:8080/v1, Anthropic http://127.0.0.1:8080)
    admin   http://127.0.0.1:9090/metrics  /healthz  /readyz
    mock    http://127.0.0.1:{MOCK_PORT}   (the upstream: a local OpenAI + Anthropic look-alike)
  Demo access key (also in .demo/access-key): {t}

  Try it (policy keys, the first one rate-limited, so watch x-sidecar-attempts):
    curl -s -i http://127.0.0.1:8080/v1/chat/completions -H "Authorization: Bearer {t}" \\
      -H 'content-type: application/json' -d '{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"hello"}}]}}'
  Managed keys, charged to the demo credits:
    curl -s -i http://127.0.0.1:8080/v1/messages -H "x-api-key: {t}" -H 'anthropic-version: 2023-06-01' \\
      -H 'content-type: application/json' -d '{{"model":"claude-haiku-4-5","max_tokens":64,"messages":[{{"role":"user","content":"hello"}}]}}'
  Then: curl -s http://127.0.0.1:9090/metrics | grep ^sidecar_
  Ctrl-C stops everything.
"""


async def _run(state_dir: Path) -> None:
    from sidecar.mock_provider import create_app
    from sidecar.server import start

    config, token = await asyncio.to_thread(prepare, state_dir)
    mock = web.AppRunner(create_app(), access_log=None, shutdown_timeout=1.0, handle_signals=False)
    await mock.setup()
    try:
        await web.TCPSite(mock, "127.0.0.1", MOCK_PORT, reuse_address=True).start()
    except OSError as exc:
        await mock.cleanup()
        raise UserError(
            f"cannot start the mock provider on 127.0.0.1:{MOCK_PORT}: {exc.strerror}"
        ) from None
    try:
        running = await start(config)
    except BaseException:
        await mock.cleanup()
        raise
    print(_banner(token), file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await running.stop()
    await mock.cleanup()


def run_demo(state_dir: Path) -> None:
    import uvloop

    uvloop.run(_run(state_dir.absolute()))
