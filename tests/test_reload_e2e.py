"""Hot reload of config and vault while serving (docs/reference.md#hot-reload), driven by the real CLI.

A change is picked up within a few seconds (polling, or SIGHUP); a version
that does not parse, validate or decrypt is refused while the last good one
keeps serving; requests in flight finish on the version they started with;
key health survives a reload for keys that still exist.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import openai
import orjson
import pytest

import sidecar.reload
from sidecar.vault import edit_vault, now_iso
from tests.harness import Env, Sidecar, metric_value, sidecar_cmd, spawn_sidecar, subprocess_env

POLICY = "sk-policy-key"
MESSAGES: list[Any] = [{"role": "user", "content": "hello there"}]
REPLY = "Hello from the mock provider."
CONFIG = """\
providers:
  - id: openai
    base_url: UPSTREAM
    api_keys: [{id: KEY_ID, value: "${secrets.get('openai', 'policy')}"}]
"""
T = TypeVar("T")


# --------------------------------------------------------------------------- helpers


def policy_config(key_id: str = "pol") -> str:
    return CONFIG.replace("KEY_ID", key_id)


@pytest.fixture
def app_env(env: Env) -> tuple[Env, str]:
    """A vault with one policy key and one access key, `app`; returns the env and its token."""
    env.secret("openai", "policy", POLICY)
    token = env.access_key("app")
    env.write_config(policy_config())
    return env, token


async def start(env: Env, sidecars: list[Sidecar]) -> Sidecar:
    sc = await env.start()
    sidecars.append(sc)
    return sc


async def run_cli(*args: str, stdin: str = "") -> str:
    """Run a `sidecar` command as a real process; assert it succeeded; return its stdout."""
    proc = await asyncio.create_subprocess_exec(
        *sidecar_cmd(*args),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=subprocess_env(),
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin.encode()), 30)
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def chat(url: str, token: str, model: str = "gpt-4o-mini") -> dict[str, str]:
    """One completion through the sidecar at `url`; the x-sidecar-* headers of its response."""
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=token, max_retries=0) as client:
        raw = await client.chat.completions.with_raw_response.create(model=model, messages=MESSAGES)
    assert raw.parse().choices[0].message.content == REPLY
    return {k: v for k, v in raw.headers.items() if k.startswith("x-sidecar-")}


def key_of(headers: dict[str, str]) -> tuple[str, str]:
    return headers["x-sidecar-key-source"], headers["x-sidecar-key-id"]


async def until(
    probe: Callable[[], Awaitable[T]], ok: Callable[[T], bool], within: float = 5.0
) -> T:
    """Call `probe` until `ok(result)`; fail after `within` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        result = await probe()
        if ok(result):
            return result
        if loop.time() > deadline:
            raise AssertionError(f"still {result!r} after {within}s")
        await asyncio.sleep(0.05)


async def admin_get(admin_url: str, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, http.get(admin_url + path) as resp:
        return resp.status, await resp.text()


async def reloads(admin_url: str, result: str) -> float:
    _, text = await admin_get(admin_url, "/metrics")
    return metric_value(text, "sidecar_vault_reloads_total", result=result)


async def access_key_status(url: str, token: str) -> str:
    """`ok`, or the sidecar's error code for this token."""
    try:
        await chat(url, token)
    except openai.APIStatusError as exc:
        return str(exc.response.json()["error"]["code"])
    return "ok"


@dataclass
class Traffic:
    """Requests in a loop from a few workers, recording every outcome."""

    url: str
    token: str
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    key_ids: list[str] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def _worker(self) -> None:
        async with openai.AsyncOpenAI(
            base_url=self.url + "/v1", api_key=self.token, max_retries=0
        ) as client:
            while not self._stop.is_set():
                try:
                    raw = await client.chat.completions.with_raw_response.create(
                        model="gpt-4o-mini", messages=MESSAGES
                    )
                except openai.APIError as exc:
                    self.failures.append(type(exc).__name__)
                else:
                    self.ok += 1
                    self.key_ids.append(raw.headers["x-sidecar-key-id"])
                await asyncio.sleep(0.01)

    async def __aenter__(self) -> Traffic:
        self._tasks = [asyncio.create_task(self._worker()) for _ in range(2)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def served(self, key_id: str) -> None:
        """Wait until a request after this call was served with `key_id`."""
        start = len(self.key_ids)
        await until(lambda: asyncio.sleep(0, self.key_ids[start:]), lambda ids: key_id in ids)


# --------------------------------------------------------------------------- CLI edits


async def test_cli_attach_detach_and_revoke_take_effect(
    app_env: tuple[Env, str], sidecars: list[Sidecar]
) -> None:
    env, token = app_env
    sc = await start(env, sidecars)
    vault = str(env.vault)
    assert key_of(await chat(sc.url, token)) == ("policy", "pol")

    out = await run_cli("provider-key", "attach", "--vault", vault, "--access-key", "app",
                        "--provider", "openai", "--id", "team", stdin="sk-team-key\n")  # fmt: skip
    assert out == "team\n"
    await until(lambda: chat(sc.url, token), lambda h: key_of(h) == ("attached", "team"))

    await run_cli("provider-key", "detach", "--vault", vault, "--access-key", "app", "--id", "team")
    await until(lambda: chat(sc.url, token), lambda h: key_of(h) == ("policy", "pol"))

    await run_cli("access-key", "revoke", "--vault", vault, "app")
    await until(lambda: access_key_status(sc.url, token), lambda s: s == "access_key_invalid")
    assert await reloads(sc.admin_url, "error") == 0


# --------------------------------------------------------------------------- refused versions


def _truncate(env: Env) -> None:
    data = env.vault.read_bytes()
    env.vault.write_bytes(data[: len(data) // 2])


def _invalid_json(env: Env) -> None:
    env.vault.write_bytes(b'{"version": 1, "recipient": ')


def _moved_sealed_value(env: Env) -> None:
    """The policy key's ciphertext copied into an attached slot: opening it there must fail."""
    raw = orjson.loads(env.vault.read_bytes())
    raw["access_keys"]["app"]["attached"].append(
        {"id": "stolen", "provider": "openai", "attached_at": now_iso(),
         "sealed": raw["secrets"]["openai"]["policy"]}
    )  # fmt: skip
    env.vault.write_bytes(orjson.dumps(raw))


def _invalid_yaml(env: Env) -> None:
    env.config.write_text(env.config.read_text() + "providers: [\n")


def _unknown_key(env: Env) -> None:
    env.config.write_text(env.config.read_text() + "retries: 3\n")


def _bad_value(env: Env) -> None:
    env.config.write_text(env.config.read_text() + "failover: {max_attempts: 0}\n")


def _unresolved_reference(env: Env) -> None:
    env.write_config(policy_config().replace("'policy'", "'missing'"))


@pytest.mark.parametrize(
    "corrupt",
    [_truncate, _invalid_json, _moved_sealed_value, _invalid_yaml, _unknown_key, _bad_value,
     _unresolved_reference],
    ids=lambda f: f.__name__.strip("_"),
)  # fmt: skip
async def test_bad_version_is_refused_while_traffic_flows(
    app_env: tuple[Env, str], sidecars: list[Sidecar], corrupt: Callable[[Env], None]
) -> None:
    env, token = app_env
    sc = await start(env, sidecars)
    good_vault = env.vault.read_bytes()
    assert await reloads(sc.admin_url, "ok") == 1

    async with Traffic(sc.url, token) as traffic:
        await traffic.served("pol")
        corrupt(env)
        await until(lambda: reloads(sc.admin_url, "error"), lambda n: n == 1)
        assert (await admin_get(sc.admin_url, "/readyz"))[0] == 200
        await traffic.served("pol")
        refused = [r for r in env.oplog.records() if r.get("event") == "reload_refused"]
        assert len(refused) == 1
        assert POLICY not in env.oplog.getvalue()

        # Fixed later (and changed: a new policy key id), the fix is picked up.
        env.vault.write_bytes(good_vault)
        env.write_config(policy_config("pol-2"))
        await traffic.served("pol-2")

    assert traffic.failures == []
    assert traffic.ok > 0
    assert await reloads(sc.admin_url, "error") == 1
    assert await reloads(sc.admin_url, "ok") >= 2
    assert (await admin_get(sc.admin_url, "/readyz"))[0] == 200


# --------------------------------------------------------------------------- how changes are seen


async def test_kubernetes_symlink_swap(app_env: tuple[Env, str], sidecars: list[Sidecar]) -> None:
    """A projected volume: `vault.json -> ..data/vault.json`, `..data -> ..<timestamp>`."""
    env, token = app_env
    mount = env.dir / "mount"
    (mount / "..2026_a").mkdir(parents=True)
    shutil.copy(env.vault, mount / "..2026_a" / "vault.json")
    os.symlink("..2026_a", mount / "..data")
    os.symlink("..data/vault.json", mount / "vault.json")
    env.config.write_text(
        env.config.read_text().replace("path: vault.json", f"path: {mount / 'vault.json'}")
    )
    sc = await start(env, sidecars)
    assert key_of(await chat(sc.url, token)) == ("policy", "pol")

    # The kubelet's update: write the new version beside, swap `..data` atomically, clean up.
    env.attach("app", "openai", "mounted", "sk-mounted-key")  # edits the source copy
    (mount / "..2026_b").mkdir()
    shutil.copy(env.vault, mount / "..2026_b" / "vault.json")
    os.symlink("..2026_b", mount / "..data_tmp")
    os.replace(mount / "..data_tmp", mount / "..data")
    shutil.rmtree(mount / "..2026_a")

    await until(lambda: chat(sc.url, token), lambda h: key_of(h) == ("attached", "mounted"))
    assert await reloads(sc.admin_url, "error") == 0


async def test_sighup_forces_a_reload(app_env: tuple[Env, str], tmp_path: Path) -> None:
    env, token = app_env
    env.config.write_text(
        env.config.read_text().replace("reload_interval: 200ms", "reload_interval: 1h")
    )
    proc = await asyncio.to_thread(spawn_sidecar, env.config, tmp_path / "access.log")
    try:
        url = f"http://127.0.0.1:{proc.proxy_port}"
        admin = f"http://127.0.0.1:{proc.admin_port}"
        assert key_of(await chat(url, token)) == ("policy", "pol")

        proc.proc.send_signal(signal.SIGHUP)  # nothing changed: nothing to reload
        await asyncio.sleep(0.3)
        await run_cli("provider-key", "attach", "--vault", str(env.vault), "--access-key", "app",
                      "--provider", "openai", "--id", "hup", stdin="sk-hup-key\n")  # fmt: skip
        # The poller sleeps for an hour: the edit is not seen...
        assert key_of(await chat(url, token)) == ("policy", "pol")
        # ...until SIGHUP.
        proc.proc.send_signal(signal.SIGHUP)
        await until(lambda: chat(url, token), lambda h: key_of(h) == ("attached", "hup"))
        assert await reloads(admin, "ok") == 2
        reloaded = [r for r in proc.lines() if r.get("event") == "reloaded"]
        assert [r.get("reason") for r in reloaded] == ["sighup"]
    finally:
        proc.stop()


async def test_unchanged_files_are_not_reloaded(
    app_env: tuple[Env, str], sidecars: list[Sidecar]
) -> None:
    env, token = app_env
    sc = await start(env, sidecars)
    assert await reloads(sc.admin_url, "ok") == 1

    # Touched and rewritten with the same bytes: new mtime, same content.
    os.utime(env.vault)
    env.config.write_bytes(env.config.read_bytes())
    await asyncio.sleep(1.0)  # five poll intervals
    env.access_key("another")  # a real change, to know the poller has run since
    await until(lambda: reloads(sc.admin_url, "ok"), lambda n: n >= 2)
    await asyncio.sleep(0.5)
    assert await reloads(sc.admin_url, "ok") == 2
    assert await reloads(sc.admin_url, "error") == 0
    assert key_of(await chat(sc.url, token)) == ("policy", "pol")


# --------------------------------------------------------------------------- requests and state across reloads


async def test_in_flight_requests_finish_on_their_version(
    app_env: tuple[Env, str], sidecars: list[Sidecar]
) -> None:
    env, token = app_env
    env.attach("app", "openai", "att", "sk-attached-key")
    sc = await start(env, sidecars)

    async def finished_ok() -> float:
        _, text = await admin_get(sc.admin_url, "/metrics")
        return metric_value(text, "sidecar_requests_total", provider="openai", status="200")

    async with openai.AsyncOpenAI(base_url=sc.url + "/v1", api_key=token, max_retries=0) as client:
        stream = await client.chat.completions.create(
            model="gpt-4o-mini-stall-600", messages=MESSAGES, stream=True
        )
        it = stream.__aiter__()
        chunks = [await it.__anext__()]
        slow = asyncio.create_task(chat(sc.url, token, "gpt-4o-mini-slow-3000"))
        await until(lambda: upstream_requests(env), lambda n: n >= 2)

        # The key both requests use is detached and their access key revoked, in one edit.
        with edit_vault(env.vault) as doc:
            doc.access_keys["app"].attached.clear()
            doc.access_keys["app"].revoked = True
        probes: list[str] = []

        async def probe() -> str:
            probes.append(await access_key_status(sc.url, token))
            return probes[-1]

        await until(probe, lambda s: s == "access_key_invalid")
        # Both were still in flight when the revoke took effect (only probes finished with 200).
        assert await finished_ok() == probes.count("ok")

        chunks += [c async for c in it]
        headers = await slow
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == REPLY
    assert key_of(headers) == ("attached", "att")
    assert await finished_ok() == probes.count("ok") + 2


async def upstream_requests(env: Env) -> int:
    base = env.upstream.removesuffix("/v1")
    async with aiohttp.ClientSession() as http, http.get(base + "/_mock/requests") as resp:
        return len((await resp.json())["requests"])


async def test_cooldown_survives_a_reload(env: Env, sidecars: list[Sidecar]) -> None:
    env.secret("openai", "first", "sk-first-fail-429-retry-60")
    env.secret("openai", "second", "sk-second")
    token = env.access_key("app")
    env.write_config(
        "providers:\n  - id: openai\n    base_url: UPSTREAM\n    api_keys:\n"
        "      - {id: first, value: \"${secrets.get('openai', 'first')}\"}\n"
        "      - {id: second, value: \"${secrets.get('openai', 'second')}\"}\n"
    )
    sc = await start(env, sidecars)
    headers = await chat(sc.url, token)
    assert (headers["x-sidecar-key-id"], headers["x-sidecar-attempts"]) == ("second", "2")

    env.access_key("another")
    await until(lambda: reloads(sc.admin_url, "ok"), lambda n: n == 2)

    headers = await chat(sc.url, token)
    assert (headers["x-sidecar-key-id"], headers["x-sidecar-attempts"]) == ("second", "1")
    _, text = await admin_get(sc.admin_url, "/metrics")
    assert metric_value(text, "sidecar_key_cooling_down", key_id="first") == 1
    assert metric_value(text, "sidecar_upstream_attempts_total", key_id="first") == 1


async def test_key_rotation_without_downtime(
    app_env: tuple[Env, str], sidecars: list[Sidecar]
) -> None:
    env, token = app_env
    vault = str(env.vault)
    env.attach("app", "openai", "old", "sk-old-key")
    sc = await start(env, sidecars)

    async with Traffic(sc.url, token) as traffic:
        await traffic.served("old")
        await run_cli("provider-key", "attach", "--vault", vault, "--access-key", "app",
                      "--provider", "openai", "--id", "new", stdin="sk-new-key\n")  # fmt: skip
        await traffic.served("new")
        reloaded = await reloads(sc.admin_url, "ok")
        await run_cli(
            "provider-key", "detach", "--vault", vault, "--access-key", "app", "--id", "old"
        )
        await until(lambda: reloads(sc.admin_url, "ok"), lambda n: n > reloaded)
        after_detach = len(traffic.key_ids)
        await traffic.served("new")

    assert traffic.failures == []
    assert set(traffic.key_ids[after_detach:]) == {"new"}
    assert {"old", "new"} <= set(traffic.key_ids)


async def test_config_that_is_not_utf8_is_refused_and_reloading_goes_on(
    app_env: tuple[Env, str],
) -> None:
    env, token = app_env
    sc = await env.start()  # stopped below: with the bug, the dead watcher's error surfaces there
    try:
        good = env.config.read_text()
        env.config.write_bytes(good.encode() + b"# caf\xe9\n")
        await until(lambda: reloads(sc.admin_url, "error"), lambda n: n == 1, within=3)
        assert key_of(await chat(sc.url, token)) == ("policy", "pol")
        env.write_config(policy_config("pol-2"))
        await until(lambda: chat(sc.url, token), lambda h: key_of(h) == ("policy", "pol-2"))
    finally:
        try:
            await sc.stop()
        except UnicodeDecodeError:
            await sc.running.admin_runner.cleanup()
            raise


async def test_an_edit_during_startup_is_not_lost(
    app_env: tuple[Env, str], sidecars: list[Sidecar], monkeypatch: pytest.MonkeyPatch
) -> None:
    env, token = app_env
    load = sidecar.reload.load_runtime
    edited: list[bool] = []

    def load_then_edit(path: Path) -> Any:
        runtime = load(path)
        if not edited:  # a concurrent CLI edit, landing right after the first load
            edited.append(True)
            env.attach("app", "openai", "during-start", "sk-during-start")
        return runtime

    monkeypatch.setattr(sidecar.reload, "load_runtime", load_then_edit)
    sc = await start(env, sidecars)
    await until(
        lambda: chat(sc.url, token), lambda h: key_of(h) == ("attached", "during-start"), within=3
    )


# --------------------------------------------------------------------------- files that are not files


def _fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path, 0o600)


def _directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


@pytest.mark.parametrize(
    ("replace", "name"),
    [(_fifo, "sidecar.yaml"), (_fifo, "vault.json"), (_fifo, "sidecar.key"),
     (_directory, "vault.json")],
    ids=["fifo-config", "fifo-vault", "fifo-key", "directory-vault"],
)  # fmt: skip
async def test_a_non_regular_file_is_refused_on_reload_and_sigterm_still_exits(
    app_env: tuple[Env, str], tmp_path: Path, name: str, replace: Callable[[Path], None]
) -> None:
    """With the bug, the reload thread blocks opening the FIFO for ever, and so does exit."""
    env, token = app_env
    env.config.write_text(env.config.read_text() + "shutdown_grace: 1s\n")
    proc = await asyncio.to_thread(spawn_sidecar, env.config, tmp_path / "access.log")
    try:
        url = f"http://127.0.0.1:{proc.proxy_port}"
        admin = f"http://127.0.0.1:{proc.admin_port}"
        assert key_of(await chat(url, token)) == ("policy", "pol")
        bad = env.dir / name
        good, mode = bad.read_bytes(), bad.stat().st_mode
        replace(bad)
        await until(lambda: reloads(admin, "error"), lambda n: n == 1)
        refused = [r for r in proc.lines() if r.get("event") == "reload_refused"]
        assert len(refused) == 1
        assert str(bad) in str(refused[0]["problems"])
        assert "not a regular file" in str(refused[0]["problems"])
        assert key_of(await chat(url, token)) == ("policy", "pol")  # the last good version
        assert (await admin_get(admin, "/readyz"))[0] == 200

        # Put back, the file is read again: reloading still works.
        os.rmdir(bad) if bad.is_dir() else bad.unlink()
        bad.write_bytes(good)
        bad.chmod(mode)
        await until(lambda: reloads(admin, "ok"), lambda n: n == 2)
        assert key_of(await chat(url, token)) == ("policy", "pol")

        replace(bad)
        await until(lambda: reloads(admin, "error"), lambda n: n == 2)
        proc.proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.proc.wait, 15)
        assert code == 0
    finally:
        if proc.proc.poll() is None:
            proc.proc.kill()
            proc.proc.wait()


# --------------------------------------------------------------------------- a refused key file mode


async def _attach(env: Env, key_id: str) -> None:
    await run_cli("provider-key", "attach", "--vault", str(env.vault), "--access-key", "app",
                  "--provider", "openai", "--id", key_id, stdin=f"sk-{key_id}-key\n")  # fmt: skip


async def test_a_version_refused_for_the_key_file_mode_is_loaded_after_chmod(
    app_env: tuple[Env, str], sidecars: list[Sidecar]
) -> None:
    env, token = app_env
    sc = await start(env, sidecars)
    key = env.dir / "sidecar.key"
    key.chmod(0o644)
    await until(lambda: reloads(sc.admin_url, "error"), lambda n: n == 1)
    await _attach(env, "after-chmod")
    await until(lambda: reloads(sc.admin_url, "error"), lambda n: n == 2)
    refused = [r for r in env.oplog.records() if r.get("event") == "reload_refused"]
    assert all("0644" in str(r["problems"]) for r in refused)
    assert key_of(await chat(sc.url, token)) == ("policy", "pol")

    key.chmod(0o600)  # nothing else changes: polling must still see it
    await until(lambda: chat(sc.url, token), lambda h: key_of(h) == ("attached", "after-chmod"))
    assert await reloads(sc.admin_url, "error") == 2


async def test_sighup_retries_a_refused_version(app_env: tuple[Env, str], tmp_path: Path) -> None:
    env, token = app_env
    env.config.write_text(
        env.config.read_text().replace("reload_interval: 200ms", "reload_interval: 1h")
    )
    proc = await asyncio.to_thread(spawn_sidecar, env.config, tmp_path / "access.log")
    try:
        url = f"http://127.0.0.1:{proc.proxy_port}"
        admin = f"http://127.0.0.1:{proc.admin_port}"
        key = env.dir / "sidecar.key"
        key.chmod(0o644)
        await _attach(env, "hup")
        proc.proc.send_signal(signal.SIGHUP)
        await until(lambda: reloads(admin, "error"), lambda n: n == 1)
        # Asked again with nothing changed, it tries again (and refuses again).
        proc.proc.send_signal(signal.SIGHUP)
        await until(lambda: reloads(admin, "error"), lambda n: n == 2)
        assert key_of(await chat(url, token)) == ("policy", "pol")

        key.chmod(0o600)
        proc.proc.send_signal(signal.SIGHUP)
        await until(lambda: chat(url, token), lambda h: key_of(h) == ("attached", "hup"))
        assert await reloads(admin, "ok") == 2
        assert await reloads(admin, "error") == 2
        # Loaded, a SIGHUP with nothing changed is again a no-op.
        proc.proc.send_signal(signal.SIGHUP)
        await asyncio.sleep(0.5)
        assert await reloads(admin, "ok") == 2
    finally:
        proc.stop()


async def test_a_version_refused_for_a_vault_not_there_yet_is_loaded_once_it_is(
    app_env: tuple[Env, str], sidecars: list[Sidecar]
) -> None:
    """The config moves to a vault file that does not exist yet: refused. Polling watches
    the files the refused version names too, so the vault arriving is noticed."""
    env, token = app_env
    sc = await start(env, sidecars)
    env.config.write_text(env.config.read_text().replace("path: vault.json", "path: vault2.json"))
    await until(lambda: reloads(sc.admin_url, "error"), lambda n: n == 1)
    assert key_of(await chat(sc.url, token)) == ("policy", "pol")  # the last good version
    moved = env.dir / "vault2.json.tmp"
    shutil.copyfile(env.dir / "vault.json", moved)
    edit_config = env.config.read_text().replace("id: pol,", "id: moved,")
    env.config.write_text(edit_config)  # (a second, also refused, version: still no vault)
    await until(lambda: reloads(sc.admin_url, "error"), lambda n: n == 2)
    os.replace(moved, env.dir / "vault2.json")  # only the vault changes now
    await until(lambda: chat(sc.url, token), lambda h: key_of(h) == ("policy", "moved"))
