"""The embedded default (docs/reference.md#commands): `sidecar demo`, which `make run` calls.

On first run it creates, in its state folder (`--dir`, default `.demo/`,
git-ignored): a key pair, a sealed vault with mock provider keys and an
access key. On every run it (re)writes the config for the chosen addresses,
serves the mock provider (as the upstream) and the sidecar, prints a working
`curl` line, and runs until Ctrl-C, which stops both.

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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final

from sidecar.config import HostPort
from sidecar.crypto import Opener, generate_private_key, write_private_key
from sidecar.errors import UserError
from sidecar.secret import Secret
from sidecar.vault import (
    add_access_key,
    create_vault,
    edit_vault,
    read_vault,
    set_secret,
)


@dataclass(frozen=True, slots=True)
class DemoAddresses:
    """Where the demo listens; port 0 picks a free port."""

    listen: HostPort
    admin_listen: HostPort
    mock_listen: HostPort


DEFAULTS: Final = DemoAddresses(
    listen=HostPort("127.0.0.1", 8080),
    admin_listen=HostPort("127.0.0.1", 9090),
    mock_listen=HostPort("127.0.0.1", 8089),
)

_CONFIG: Final = """\
# Demo config, rewritten by `sidecar demo` on every run (edits here are lost).
# Every key is a mock key for the local mock provider.
listen: {listen}
admin_listen: {admin_listen}
vault: {{path: vault.json, private_key_file: sidecar.key}}
shutdown_grace: 2s
providers:
  - id: openai
    base_url: {mock}/v1
    api_keys:
      # The mock answers 429 to this key: the first request fails over to `backup`.
      - {{id: primary, value: "${{secrets.get('openai', 'primary')}}"}}
      - {{id: backup, value: "${{secrets.get('openai', 'backup')}}"}}
  - id: anthropic
    base_url: {mock}/v1
  - id: google
    base_url: {mock}/v1beta
    api_keys: [{{id: primary, value: "${{secrets.get('google', 'primary')}}"}}]
managed:
  anthropic: [{{id: pool-1, value: "${{secrets.get('managed', 'anthropic-1')}}"}}]
ledger: {{url: "sqlite:///ledger.db"}}
"""

_DEMO_SECRETS: Final = {
    ("openai", "primary"): "demo-openai-fail-429-retry-30",
    ("openai", "backup"): "demo-openai-good",
    ("managed", "anthropic-1"): "demo-anthropic-pool",
    ("google", "primary"): "demo-google-good",
}


def demo_config(addresses: DemoAddresses) -> str:
    """The demo's config text for these addresses."""
    return _CONFIG.format(
        listen=addresses.listen,
        admin_listen=addresses.admin_listen,
        mock=http_url(addresses.mock_listen),
    )


def http_url(address: HostPort) -> str:
    """A URL a local client can use for `address` (a wildcard host means this machine)."""
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(address.host, address.host)
    return f"http://[{host}]:{address.port}" if ":" in host else f"http://{host}:{address.port}"


def prepare(state_dir: Path, addresses: DemoAddresses = DEFAULTS) -> tuple[Path, Secret]:
    """Create the demo's keys, vault and access key once; write the config for `addresses`.

    Returns the config path and the demo access key.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    config = state_dir / "sidecar.yaml"
    token_file = state_dir / "access-key"
    key_file = state_dir / "sidecar.key"
    vault = state_dir / "vault.json"
    # The access key is written last: with it, the rest is complete.
    if not (token_file.exists() and vault.exists() and key_file.exists()):
        _create(state_dir, key_file, vault, token_file)
    _add_missing_secrets(vault)  # a demo folder from an older version lacks newer ones
    text = demo_config(addresses)
    if not config.exists() or config.read_text() != text:
        config.write_text(text)
    return config, Secret(token_file.read_text().strip())


def _add_missing_secrets(vault: Path) -> None:
    have = read_vault(vault).secrets
    if all(name in have.get(ns, {}) for ns, name in _DEMO_SECRETS):
        return
    with edit_vault(vault) as doc:
        for (ns, name), value in _DEMO_SECRETS.items():
            if name not in doc.secrets.get(ns, {}):
                set_secret(doc, ns, name, Secret(value))


def _create(state_dir: Path, key_file: Path, vault: Path, token_file: Path) -> None:
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


def _banner(token: Secret, token_file: Path, bound: DemoAddresses) -> str:
    t = token.reveal()
    proxy, admin, mock = map(http_url, (bound.listen, bound.admin_listen, bound.mock_listen))
    return f"""
  AI gateway sidecar demo is up.
    proxy   {proxy}   (OpenAI base_url {proxy}/v1, Anthropic {proxy})
    admin   {admin}/metrics  /healthz  /readyz
    mock    {mock}   (the upstream: a local OpenAI + Anthropic + Gemini look-alike)
  Demo access key (also in {token_file}): {t}

  Try it (policy keys, the first one rate-limited, so watch x-sidecar-attempts):
    curl -s -i {proxy}/v1/chat/completions -H "Authorization: Bearer {t}" \\
      -H 'content-type: application/json' -d '{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"hello"}}]}}'
  Managed keys, charged to the demo credits:
    curl -s -i {proxy}/v1/messages -H "x-api-key: {t}" -H 'anthropic-version: 2023-06-01' \\
      -H 'content-type: application/json' -d '{{"model":"claude-haiku-4-5","max_tokens":64,"messages":[{{"role":"user","content":"hello"}}]}}'
  Any SDK, any model: the OpenAI route asking for Claude, translated (x-sidecar-translated):
    curl -s -i {proxy}/v1/chat/completions -H "Authorization: Bearer {t}" \
      -H 'content-type: application/json' -d '{{"model":"claude-haiku-4-5","messages":[{{"role":"user","content":"hello"}}]}}'
  The Gemini API (the Google GenAI SDK's base_url {proxy}):
    curl -s -i {proxy}/v1beta/models/gemini-2.5-flash:generateContent -H "x-goog-api-key: {t}" \
      -H 'content-type: application/json' -d '{{"contents":[{{"parts":[{{"text":"hello"}}]}}]}}'
  Then: curl -s {admin}/metrics | grep ^sidecar_
  Ctrl-C stops everything.
"""


async def _run(state_dir: Path, addresses: DemoAddresses) -> None:
    from aiohttp import web

    from sidecar.logs import OpLog, route_library_logs
    from sidecar.mock_provider import create_app
    from sidecar.server import start

    mock = web.AppRunner(create_app(), access_log=None, shutdown_timeout=1.0, handle_signals=False)
    await mock.setup()
    where = addresses.mock_listen
    try:
        await web.TCPSite(mock, where.host, where.port, reuse_address=True).start()
    except OSError as exc:
        await mock.cleanup()
        raise UserError(f"cannot start the mock provider on {where} (--mock-listen): "
                        f"{exc.strerror}") from None  # fmt: skip
    try:
        # The config names the mock's real port (it may have been 0).
        bound = replace(addresses, mock_listen=HostPort(where.host, int(mock.addresses[0][1])))
        config, token = await asyncio.to_thread(prepare, state_dir, bound)
        oplog = OpLog()
        route_library_logs(oplog)  # as `serve` does: no raw request bytes (keys) on stderr
        try:
            running = await start(config, oplog=oplog)
        except UserError as exc:
            raise UserError(f"{exc} (the demo's proxy: {bound.listen}, --listen; its admin "
                            f"port: {bound.admin_listen}, --admin-listen)") from None  # fmt: skip
    except BaseException:
        await mock.cleanup()
        raise
    bound = replace(
        bound,
        listen=HostPort(bound.listen.host, running.proxy_port),
        admin_listen=HostPort(bound.admin_listen.host, running.admin_port),
    )
    print(_banner(token, state_dir / "access-key", bound), file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await running.stop()
        await mock.cleanup()


def run_demo(state_dir: Path, addresses: DemoAddresses = DEFAULTS) -> None:
    """`sidecar demo`: prepare `state_dir`, serve until SIGINT/SIGTERM, stop everything."""
    import uvloop

    uvloop.run(_run(state_dir.absolute(), addresses))
