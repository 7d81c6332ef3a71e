"""Loading and hot-reloading the config + vault (docs/reference.md#hot-reload).

`load_runtime` is the whole blocking load (parse, read, decrypt, build); the
reloader runs it in a thread. Files are polled by the stat of their resolved
path (a Kubernetes volume swaps the `..data` symlink, so the real file
changes identity) and re-read on SIGHUP; a new version replaces the old one
whole, or is refused with a log line and a metric while the old one serves.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

from sidecar.config import Config, load_config
from sidecar.crypto import load_private_key
from sidecar.errors import ConfigError, VaultError
from sidecar.files import MAX_VAULT_BYTES, read_regular_file
from sidecar.runtime import Runtime, build_runtime
from sidecar.state import State
from sidecar.vault import open_vault, read_vault


def load_runtime(config_path: Path) -> Runtime:
    """Everything serving needs, or ConfigError/VaultError listing why not."""
    config = load_config(config_path)
    doc = read_vault(config.vault.path)
    opener = load_private_key(config.vault.private_key_file)
    opened, problems = open_vault(doc, opener)
    runtime, more = build_runtime(config, opened)
    problems += more
    if problems:
        raise VaultError("; ".join(problems))
    return runtime


def watched_paths(config_path: Path, config: Config) -> list[Path]:
    paths = [config_path, config.vault.path]
    if config.vault.private_key_file is not None:
        paths.append(config.vault.private_key_file)
    return paths


#: (stat signature, content signature) of the files a loaded version came from.
FileSignature = tuple[tuple[object, ...], str]


def load_with_signature(config_path: Path) -> tuple[Runtime, FileSignature]:
    """Load, with the files' signature taken *before* loading: an edit racing the load
    then shows up as a change at the next poll instead of being taken as loaded."""
    paths = watched_paths(config_path, load_config(config_path))
    signature = (_stat_signature(paths), _content_signature(paths))
    return load_runtime(config_path), signature


def _stat_signature(paths: list[Path]) -> tuple[object, ...]:
    """Cheap, polled: changes with a file's identity, size, mtime, type, mode or owner."""
    sig: list[object] = []
    for p in paths:
        try:
            real = os.path.realpath(p)
            st = os.stat(real)
            sig.append((real, st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode, st.st_uid,
                        st.st_gid))  # fmt: skip
        except OSError:
            sig.append((str(p), None))
    return tuple(sig)


def _content_signature(paths: list[Path]) -> str:
    """What a load depends on: each file's bytes, and its type and mode (a key file refused
    for mode 0644 must be retried once it is 0600). Never blocks: a FIFO or device is
    not read (`read_regular_file`), it only changes the signature."""
    h = hashlib.sha256()
    for p in paths:
        try:
            mode = os.stat(p).st_mode
            data = read_regular_file(p, limit=MAX_VAULT_BYTES)
        except OSError as exc:
            h.update(f"\x00error:{exc.strerror}".encode())
        else:
            h.update(f"\x00mode:{mode:o}\x00".encode())
            h.update(data)
        h.update(b"\x00")
    return h.hexdigest()


class Reloader:
    def __init__(self, config_path: Path, state: State) -> None:
        self.config_path = config_path
        self.state = state
        self._stat: tuple[object, ...] = ()
        self._content = ""
        self._refused = False  # the last version tried was refused: SIGHUP retries it
        #: Files a refused version names that the running one does not (its config moved
        #: to a vault not there yet): watched too, so that their arrival is noticed.
        self._pending: list[Path] = []
        self._lock = asyncio.Lock()
        self._woken = asyncio.Event()

    def wake(self) -> None:
        """SIGHUP: check the files now instead of at the next poll."""
        self._woken.set()

    def _paths(self, config: Config) -> list[Path]:
        paths = watched_paths(self.config_path, config)
        return paths + [p for p in self._pending if p not in paths]

    def _refused_paths(self) -> list[Path]:
        """The files the config on disk names, when it can be read (else none)."""
        try:
            return watched_paths(self.config_path, load_config(self.config_path))
        except (ConfigError, OSError, ValueError):
            return []

    def mark_loaded(self, signature: FileSignature) -> None:
        self._stat, self._content = signature
        self._refused = False

    async def check(self, *, reason: str = "poll") -> bool:
        """Reload if any file changed. True when a new version was swapped in."""
        async with self._lock:
            paths = self._paths(self.state.runtime.config)
            stat = await asyncio.to_thread(_stat_signature, paths)
            if stat == self._stat and reason == "poll":
                return False
            content = await asyncio.to_thread(_content_signature, paths)
            self._stat = stat
            if content == self._content and not (reason == "sighup" and self._refused):
                return False
            try:
                runtime = await asyncio.to_thread(load_runtime, self.config_path)
                self.state.billing.configure(runtime.config)
            except (ConfigError, VaultError, ValueError) as exc:
                self._refused = True
                self._pending = await asyncio.to_thread(self._refused_paths)
                paths = self._paths(self.state.runtime.config)
                if len(paths) != len(stat):  # it names other files: their state now
                    self._stat = await asyncio.to_thread(_stat_signature, paths)
                    content = await asyncio.to_thread(_content_signature, paths)
                self._content = content  # do not retry the same bad version every poll
                self.state.metrics.reload_error()
                problems = list(exc.problems) if isinstance(exc, ConfigError) else [str(exc)]
                self.state.oplog.error("reload_refused", reason=reason, problems=problems,
                                       keeping="last good version")  # fmt: skip
                return False
            self._content = content
            self._refused = False
            self._pending = []
            self.state.runtime = runtime
            self.state.health.forget_except(list(runtime.key_labels))
            self.state.quota.forget_except(list(runtime.key_labels))
            self.state.admission.local.forget_except(a.name for a in runtime.access_keys.values())
            shared = self.state.shared
            if runtime.config.shared_state != (shared.config if shared else None):
                self.state.oplog.warning("shared_state_change_needs_restart",
                                         keeping="on" if shared else "off")  # fmt: skip
            tracing = self.state.tracing
            if runtime.config.tracing != (tracing.config if tracing else None):
                self.state.oplog.warning("tracing_change_needs_restart",
                                         keeping="on" if tracing else "off")  # fmt: skip
            self.state.oplog.set_level(runtime.config.log.level)
            self.state.access_log.enabled = runtime.config.log.access_log
            self.state.metrics.reload_ok()
            self.state.metrics.prime(*runtime.metric_seeds())
            self.state.oplog.info("reloaded", reason=reason, access_keys=len(runtime.access_keys),
                                  providers=len(runtime.providers))  # fmt: skip
            return True

    async def watch(self) -> None:
        """Poll every `reload_interval`, or at once when woken (SIGHUP); never die."""
        while True:
            reason = "poll"
            try:
                await asyncio.wait_for(
                    self._woken.wait(), self.state.runtime.config.reload_interval
                )
                reason = "sighup"
            except TimeoutError:
                pass
            self._woken.clear()
            try:
                await self.check(reason=reason)
            except Exception as exc:
                self.state.metrics.reload_error()
                self.state.oplog.error(
                    "reload_check_failed", error=type(exc).__name__, detail=str(exc)[:200]
                )
