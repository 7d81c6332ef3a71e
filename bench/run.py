"""`make bench`: CPU time per request of the sidecar against a bare pass-through, under wrk.

Load comes from `wrk` (C, `bench/chat.lua`), so the load generator is not
what saturates. Each server runs in its own process:

- **direct**: the mock provider (`sidecar mock-provider`), no proxy at all;
- **pass-through**: `bench.passthrough`, which only swaps the auth header —
  the floor of any proxy's cost on aiohttp;
- **sidecar**: `sidecar serve --config` with one policy key pointing at the
  mock and the default config (metrics, metering, access log on, written to
  a file);
- **sidecar-nolog** (only when asked for with `--targets`): the same with
  `log: {access_log: false}`;
- **redis** (only with `--shared-state`): a `redis-server` of the bench's own,
  the sidecars' `shared_state`; its CPU per sidecar request is reported too.
  With `--limits` the bench's access key has `rpm` and `tpm` limits far above
  what it sends, so every request is counted (on Redis with `--shared-state`,
  in the sidecar otherwise) and none is refused.
- **tracing** (only with `--tracing`): the sidecars export OpenTelemetry traces
  (`tracing:`, `sample_ratio: 1.0`) over OTLP/HTTP to the mock's `POST /v1/traces`,
  a sink that counts and discards them (its CPU is in the `mock` column).

For a non-streaming (`json`) and a streaming (`stream`) OpenAI chat completion
of gpt-4o-mini — and, with `--mode xjson,xstream` or `all`, the same requests
for claude-haiku-4-5, which the sidecar translates to Anthropic messages (its
config then gains an `anthropic` provider on the mock; direct and
pass-through, which cannot translate, get the gpt-4o-mini request, so the
ratio is the cost of translation on top of the sidecar's own) — wrk holds
`--connections` keep-alive connections busy for `--duration` seconds per
target and round, in `--slices` slices (1 s each by default) that alternate
between the targets, so that the machine's changes of speed fall on all of
them alike; the tables show the median over `--rounds`. The headline
is each proxy's CPU time per completed request (user + system time from
/proc/<pid>/stat over the run, divided by wrk's completed requests) and the
ratio sidecar ÷ pass-through of that number.

Then three more parts (bench/pace.py, bench/live.py, bench/memory.py): a fixed-rate run, in which
the pass-through and the sidecars are each offered `--rate` req/s (1,000) in json
and stream by wrk paced with its Lua `delay()` (a timetable on the monotonic clock;
one run per target and round, the order alternating) and the sidecar's added p99 over
the pass-through is printed; live streams, each proxy's CPU per event relayed on `--live` (100) streams
whose events arrive one at a time; and
memory, each proxy's resident set idle, after the load, with `--streams` (1,000)
streams held open through it by a raw asyncio client, and a few seconds after
they were hung up on.

Exit status is non-zero only when wrk is missing, a server does not start or
dies, a smoke request fails, or a run answers more than 1% of its requests
with an error (with `--shared-state`: also when redis-server is missing or a
sidecar does not link to it; with `--tracing`: when a sidecar exports nothing
after the smoke requests) — never because of a ratio, a latency or a memory
size (the issue's goals are printed beside the numbers). How to read the
output: bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Final

from bench import latency, live, memory
from bench.pace import DEFAULT_RATE, DEFAULT_RATE_ROUNDS, OFF_TARGET, Pace, added_p99_line, describe

REPO: Final = Path(__file__).resolve().parents[1]
LUA: Final = Path(__file__).resolve().parent / "chat.lua"
MODES: Final = ("json", "stream", "xjson", "xstream")
MODE_SETS: Final = {"both": ("json", "stream"), "all": MODES}
TRANSLATED: Final = ("xjson", "xstream")  # the sidecar translates openai->anthropic
_UNTRANSLATED: Final = {"xjson": "json", "xstream": "stream"}
TARGETS: Final = ("direct", "pass-through", "sidecar", "sidecar-nolog")
DEFAULT_TARGETS: Final = ("direct", "pass-through", "sidecar")
MAX_ERROR_RATE: Final = 0.01
_START_TIMEOUT: Final = 30.0
_BUSY_PERCENT: Final = 25.0  # other processes' CPU, % of a core, above which to warn
_SETTLE: Final = 0.1  # after wrk exits: let the servers finish the requests it cut off
_UPSTREAM_KEY: Final = "sk-bench-upstream"
_PATH: Final = "/v1/chat/completions"
_RESULT_MARK: Final = "BENCH-RESULT "
_CLK_TCK: Final = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_MODEL: Final = "gpt-4o-mini"
_X_MODEL: Final = "claude-haiku-4-5"  # an Anthropic model: the sidecar translates
_X_LABEL: Final = "openai->anthropic"  # its `x-sidecar-translated` header
_MODE_WIDTH: Final = max(len(m) for m in MODES) + 1
_PROMPT: Final = b'"messages":[{"role":"user","content":"Say hello to the benchmark, please."}]'
_STREAM_END: Final = b"data: [DONE]\n\n"
_NAN: Final = float("nan")
#: `--limits`: the access key's rpm and tpm, never reached (the largest a vault accepts)
BENCH_RATE_LIMIT: Final = 1_000_000_000
_REDIS_TIMEOUT: Final = "500ms"  # shared_state.timeout
_TRACE_RATIO: Final = 1.0  # `--tracing`: tracing.sample_ratio, every request's spans exported
_SHARED_STATE_UP: Final = re.compile(rb"^sidecar_shared_state_up(?:\{[^}]*\})? 1(?:\.0)?$", re.M)


class BenchError(Exception):
    """A setup failure or a server that stopped: printed, exit status 1."""


# --------------------------------------------------------------------------- wrk and cores


def find_wrk() -> str:
    """The wrk binary; installed with apt-get when missing and we are root on Debian/Ubuntu."""
    found = shutil.which("wrk")
    if found:
        return found
    hint = "install it with `sudo apt-get install -y wrk` (Debian/Ubuntu) and run again"
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise BenchError(f"the benchmark needs wrk (a C HTTP load generator): {hint}")
    print("wrk is missing: running `apt-get install -y wrk`", file=sys.stderr, flush=True)
    for argv in (["apt-get", "install", "-y", "-q", "wrk"], ["apt-get", "update", "-q"],
                 ["apt-get", "install", "-y", "-q", "wrk"]):  # fmt: skip
        if subprocess.run(argv, stdout=sys.stderr).returncode == 0 and shutil.which("wrk"):
            break
    found = shutil.which("wrk")
    if not found:
        raise BenchError(f"`apt-get install -y wrk` did not install wrk: {hint}")
    return found


@dataclass(frozen=True, slots=True)
class Cores:
    """Where processes run: `server` for the server under test, `load` for wrk and the mock."""

    load: int | None = None
    server: int | None = None

    @classmethod
    def choose(cls, pin: bool) -> Cores:
        """The first two usable cores, or no pinning (asked for, or fewer than 2 cores)."""
        if not pin or not hasattr(os, "sched_getaffinity") or not shutil.which("taskset"):
            return cls()
        cpus = sorted(os.sched_getaffinity(0))
        return cls(cpus[0], cpus[1]) if len(cpus) >= 2 else cls()

    def prefix(self, cpu: int | None) -> list[str]:
        """`taskset -c CPU` to start a command on `cpu`; nothing when not pinning."""
        return ["taskset", "-c", str(cpu)] if cpu is not None else []

    def describe(self) -> str:
        if self.server is None:
            return "not pinned"
        return (f"server under test on core {self.server}; wrk and the mock on core "
                f"{self.load} (the mock moves to core {self.server} for `direct`)")  # fmt: skip


def pin(pid: int, cpu: int | None) -> None:
    """Move every thread of `pid` to `cpu` (affinity is per thread on Linux)."""
    if cpu is None:
        return
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        tids = [pid]
    for tid in tids:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(tid, {cpu})


def _load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "-"


def _machine_ticks() -> list[int] | None:
    """The whole machine's CPU time by kind (Linux's /proc/stat `cpu` line), summed over cores."""
    try:
        with open("/proc/stat") as f:
            return [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None


def _machine_busy_seconds(ticks: list[int] | None) -> float | None:
    """CPU time the whole machine spent busy, summed over cores (the host's steal included)."""
    if ticks is None:
        return None
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return (sum(ticks[:8]) - idle) / _CLK_TCK  # guest time is already inside user


def _stolen_seconds(ticks: list[int] | None) -> float | None:
    """CPU time the hypervisor gave to others while this machine's vCPUs wanted to run."""
    return ticks[7] / _CLK_TCK if ticks is not None and len(ticks) > 7 else None


def _children_cpu_seconds() -> float:
    """User + system time of reaped children: the wrk runs (the servers are never reaped mid-run)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


# --------------------------------------------------------------------------- servers


@dataclass(slots=True)
class Server:
    """One server process; its stderr goes to a file so a failed start can be shown."""

    name: str
    proc: subprocess.Popen[bytes]
    stderr: Path
    health_url: str

    def cpu_seconds(self) -> float | None:
        """User + system CPU time of the process (all its threads) so far; None off Linux."""
        try:
            stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
        except OSError:
            return None
        fields = stat[stat.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK

    def tail(self) -> str:
        try:
            return self.stderr.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@dataclass(frozen=True, slots=True)
class Tree:
    """The checkout whose sidecar is measured, and the Python that runs it."""

    path: Path
    python: str

    @classmethod
    def at(cls, path: Path | None) -> Tree:
        if path is None:
            return cls(REPO, sys.executable)
        path = path.resolve()
        if not (path / "sidecar" / "__init__.py").is_file():
            raise BenchError(f"--tree {path}: no sidecar package there")
        venv = path / ".venv" / "bin" / "python"
        return cls(path, str(venv) if venv.exists() else sys.executable)


@dataclass(frozen=True, slots=True)
class Target:
    """What wrk hits, and the processes whose CPU time each request costs."""

    name: str
    url: str
    token: str
    mock: Server
    proxy: Server | None = None  # None: the mock is hit directly
    access_log: Path | None = None
    admin_url: str | None = None
    translates: bool = False  # a sidecar: x-modes send it the Anthropic model
    redis: Server | None = None  # a sidecar with shared_state: its Redis, whose CPU it costs
    traces_url: str | None = None  # a sidecar with tracing: the sink's counts (`/_mock/traces`)


def is_stream(mode: str) -> bool:
    return mode in ("stream", "xstream")


def translated(mode: str, target: Target) -> bool:
    """Whether `target` gets the request to translate in `mode` (only sidecars can)."""
    return mode in TRANSLATED and target.translates


def request_model(mode: str, target: Target) -> str:
    """The model bench/chat.lua asks for: the Anthropic one only where it is translated."""
    return _X_MODEL if translated(mode, target) else _MODEL


def request_body(mode: str, target: Target) -> bytes:
    """What bench/chat.lua sends in `mode` to `target`."""
    model = f'{{"model":"{request_model(mode, target)}",'.encode()
    return model + _PROMPT + (b',"stream":true}' if is_stream(mode) else b"}")


@dataclass(slots=True)
class Fleet:
    """Every process started, so that all of them are stopped on any exit."""

    servers: list[Server] = field(default_factory=list)
    wrk: subprocess.Popen[bytes] | None = None

    def check_alive(self) -> None:
        for server in self.servers:
            if server.proc.poll() is not None:
                raise BenchError(f"{server.name} stopped with status {server.proc.returncode}:\n"
                                 f"{server.tail()}")  # fmt: skip

    def stop(self) -> None:
        if self.wrk is not None and self.wrk.poll() is None:
            self.wrk.kill()
            self.wrk.wait(5)
        for server in reversed(self.servers):  # proxies before the mock they talk to
            server.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn(fleet: Fleet, name: str, argv: list[str], *, tree: Tree, workdir: Path,
           health_url: str, prefix: list[str], env: dict[str, str] | None = None,
           stdout: Path | None = None, merge_stdout: bool = False) -> Server:  # fmt: skip
    """Start a server in its own session (Ctrl-C reaches only us; we stop it in order).
    `merge_stdout`: its stdout goes to the stderr file too (a server that logs to stdout)."""
    err_path = workdir / f"{name}.err"
    with err_path.open("wb") as err, (stdout or Path(os.devnull)).open("wb") as out:
        proc = subprocess.Popen(
            [*prefix, *argv], cwd=tree.path, stdin=subprocess.DEVNULL,
            stdout=err if merge_stdout else out, stderr=err, start_new_session=True,
            env={**os.environ, "PYTHONPATH": str(tree.path), **(env or {})},
        )  # fmt: skip
    server = Server(name, proc, err_path, health_url)
    fleet.servers.append(server)
    return server


def _exchange(url: str, body: bytes | None = None,
              token: str | None = None) -> tuple[int, dict[str, str], bytes]:  # fmt: skip
    """Status, headers (lower-case names) and body of one request."""
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=body, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return int(resp.status), {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def _http(url: str, body: bytes | None = None, token: str | None = None) -> tuple[int, bytes]:
    status, _, text = _exchange(url, body, token)
    return status, text


def _redis_address(url: str) -> tuple[str, int]:
    """Host and port of `redis://host:port/db` (the bench's own Redis: no password)."""
    host, _, port = url.removeprefix("redis://").partition("/")[0].rpartition(":")
    return host, int(port)


def _redis_command(url: str, *args: str) -> bytes:
    """One command to the Redis at `url`; its reply, raw (RESP), read until complete."""
    request = b"".join([f"*{len(args)}\r\n".encode(),
                        *(f"${len(a.encode())}\r\n{a}\r\n".encode() for a in args)])  # fmt: skip
    with socket.create_connection(_redis_address(url), timeout=2) as sock:
        sock.sendall(request)
        reply = b""
        while not _resp_complete(reply):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    return reply


def _resp_complete(reply: bytes) -> bool:
    """Whether `reply` holds a whole simple, error, integer or bulk-string RESP reply."""
    head, sep, rest = reply.partition(b"\r\n")
    if not sep:
        return False
    if not head.startswith(b"$"):
        return True
    size = int(head[1:])
    return size < 0 or len(rest) >= size + 2


def parse_redis_info(reply: bytes) -> dict[str, str]:
    """The `field:value` lines of an `INFO` reply (a bulk string); sections and blanks dropped."""
    body = reply.partition(b"\r\n")[2].decode(errors="replace")
    return dict(line.split(":", 1) for line in body.splitlines()
                if ":" in line and not line.startswith("#"))  # fmt: skip


def _answers(url: str) -> bool:
    """Whether the server at `url` is ready: PONG from a redis:// URL, HTTP 200 otherwise."""
    if url.startswith("redis://"):
        return _redis_command(url, "PING").startswith(b"+PONG")
    return _http(url)[0] == 200


def _wait_ready(server: Server, timeout: float = _START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise BenchError(f"{server.name} exited with status {server.proc.returncode}:\n"
                             f"{server.tail()}")  # fmt: skip
        with contextlib.suppress(OSError):
            if _answers(server.health_url):
                return
        time.sleep(0.05)
    raise BenchError(f"{server.name} did not become ready within {timeout:.0f} s:\n"
                     f"{server.tail()}")  # fmt: skip


def _sidecar_cli(tree: Tree, workdir: Path, *args: str, stdin: str = "") -> str:
    """Run `python -m sidecar ARGS` of the measured tree; its stdout."""
    done = subprocess.run([tree.python, "-m", "sidecar", *args], cwd=workdir, input=stdin,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(tree.path)})  # fmt: skip
    if done.returncode != 0:
        raise BenchError(f"`sidecar {args[0]} {args[1] if len(args) > 1 else ''}` failed "
                         f"(status {done.returncode}):\n{done.stderr[-2000:]}")  # fmt: skip
    return done.stdout.strip()


def access_key_args(limits: bool) -> tuple[str, ...]:
    """`sidecar access-key create` arguments of the bench's access key: `--limits` gives it an
    rpm and a tpm no run reaches (every request counted, none refused); otherwise none (an
    older tree's CLI has no --rpm/--tpm)."""
    base = ("access-key", "create", "--vault", "vault.json", "bench")
    if not limits:
        return base
    return (*base, "--rpm", str(BENCH_RATE_LIMIT), "--tpm", str(BENCH_RATE_LIMIT))


def _write_sidecar_files(tree: Tree, workdir: Path, providers: Sequence[str],
                         limits: bool = False) -> str:  # fmt: skip
    """Key pair and vault (through the CLI: works on any tree); returns the access key."""
    public = _sidecar_cli(tree, workdir, "keygen", "--private-key", "sidecar.key")
    _sidecar_cli(tree, workdir, "vault", "init", "--vault", "vault.json", "--public-key", public)
    for provider in providers:
        _sidecar_cli(tree, workdir, "secret", "set", "--vault", "vault.json", "bench", provider,
                     stdin=_UPSTREAM_KEY)  # fmt: skip
    return _sidecar_cli(tree, workdir, *access_key_args(limits))


def _sidecar_providers(modes: Sequence[str]) -> tuple[str, ...]:
    """`openai`, and `anthropic` only for x-modes (so json/stream run an older tree's config)."""
    return ("openai", "anthropic") if any(m in TRANSLATED for m in modes) else ("openai",)


def _sidecar_config(port: int, admin: int, mock_port: int, *, access_log: bool,
                    providers: Sequence[str] = ("openai",),
                    shared_state: str | None = None,
                    tracing: str | None = None) -> str:  # fmt: skip
    """Defaults everywhere (metrics, metering, access log on) but the ports and one key per
    provider, each on the mock; `shared_state` (a redis:// URL): that section, set;
    `tracing` (an OTLP/HTTP traces URL): traces exported there, every request sampled."""
    shared = f'shared_state: {{url: "{shared_state}", timeout: {_REDIS_TIMEOUT}}}\n'
    traced = f'tracing: {{endpoint: "{tracing}", sample_ratio: {_TRACE_RATIO}}}\n'
    return (
        f"listen: 127.0.0.1:{port}\n"
        f"admin_listen: 127.0.0.1:{admin}\n"
        "vault: {path: vault.json, private_key_file: sidecar.key}\n"
        + ("" if access_log else "log: {access_log: false}\n")
        + (shared if shared_state else "")
        + (traced if tracing else "")
        + "providers:\n"
        + "".join(
            f"  - id: {provider}\n"
            f"    base_url: http://127.0.0.1:{mock_port}/v1\n"
            "    api_keys:\n"
            "      - id: bench\n"
            f"        value: \"${{secrets.get('bench', '{provider}')}}\"\n"
            for provider in providers
        )
    )


#: flag -> the file of the tree that shows it has the feature the flag measures
FEATURE_FILES: Final = {
    "--shared-state": Path("sidecar", "shared", "replicas.py"),
    "--limits": Path("sidecar", "ratelimits.py"),
    "--tracing": Path("sidecar", "tracing.py"),
}
#: flag -> what a tree without its feature file predates
FEATURE_NAMES: Final = {
    "--shared-state": "shared_state",
    "--limits": "access-key rate limits",
    "--tracing": "tracing",
}


def check_tree(tree: Tree, modes: Sequence[str], *, shared_state: bool = False,
               limits: bool = False, tracing: bool = False) -> None:  # fmt: skip
    """Refuse what an older tree cannot do: x-modes need a sidecar that translates
    (sidecar/translate/), `--shared-state` one with shared_state (sidecar/shared/replicas.py),
    `--limits` one with access-key rate limits (sidecar/ratelimits.py), `--tracing` one that
    exports traces (sidecar/tracing.py)."""
    asked = [m for m in modes if m in TRANSLATED]
    if asked and not (tree.path / "sidecar" / "translate" / "__init__.py").is_file():
        raise BenchError(f"--mode {','.join(asked)} needs a sidecar that translates formats; "
                         f"{tree.path} has no sidecar/translate/: measure it with "
                         "--mode json,stream (or both)")  # fmt: skip
    asked_flags = (("--shared-state", shared_state), ("--limits", limits), ("--tracing", tracing))
    missing = [f for f, on in asked_flags if on and not (tree.path / FEATURE_FILES[f]).is_file()]
    if missing:
        files = ", ".join(str(FEATURE_FILES[f]) for f in missing)
        flags = " and ".join(missing)
        raise BenchError(f"{flags}: {tree.path} predates "
                         f"{' and '.join(FEATURE_NAMES[f] for f in missing)} (no {files}): "
                         f"measure it without {flags}")  # fmt: skip


def start_redis(fleet: Fleet, cores: Cores, workdir: Path) -> Server:
    """`redis-server` from PATH on a free loopback port, nothing persisted, its files in
    `workdir`; on the load core (with wrk and the mock), so the sidecar keeps its own core.
    Waits until it answers PING."""
    executable = shutil.which("redis-server")
    if executable is None:
        raise BenchError("--shared-state needs redis-server on PATH: install it (Debian/Ubuntu: "
                         "`sudo apt-get install -y redis-server`) and run again")  # fmt: skip
    port = _free_port()
    argv = [executable, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(workdir)]  # fmt: skip
    redis = _spawn(fleet, "redis", argv, tree=Tree(REPO, sys.executable), workdir=workdir,
                   health_url=f"redis://127.0.0.1:{port}/0", prefix=cores.prefix(cores.load),
                   merge_stdout=True)  # fmt: skip
    _wait_ready(redis)
    return redis


def _wait_shared_state_up(target: Target) -> None:
    """A sidecar with shared_state links to Redis in the background after it is ready: wait
    until its `sidecar_shared_state_up` is 1, so that no run measures the local fallback."""
    deadline = time.monotonic() + _START_TIMEOUT
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if _SHARED_STATE_UP.search(_http(f"{target.admin_url}/metrics")[1]):
                return
        time.sleep(0.1)
    raise BenchError(f"{target.name}: sidecar_shared_state_up did not reach 1 within "
                     f"{_START_TIMEOUT:.0f} s:\n{target.proxy.tail() if target.proxy else ''}")  # fmt: skip


def trace_counts(target: Target) -> dict[str, int] | None:
    """What the mock's trace sink received from the sidecar `target` so far (requests, bytes,
    too_large); None when it is not traced or the mock did not answer."""
    if target.traces_url is None:
        return None
    try:
        status, text = _http(target.traces_url)
        counts = json.loads(text)["sources"].get(target.name) if status == 200 else None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    zero = {"requests": 0, "bytes": 0, "too_large": 0}
    return {**zero, **counts} if isinstance(counts, dict) else zero


def wait_traces_exported(targets: dict[str, Target]) -> None:
    """After the smoke requests, each traced sidecar must export to the sink (its batches
    leave every second), so that no run measures a sidecar whose exports fail."""
    for target in targets.values():
        if target.traces_url is None:
            continue
        deadline = time.monotonic() + _START_TIMEOUT
        while (counts := trace_counts(target)) is None or counts["requests"] < 1:
            if time.monotonic() > deadline:
                raise BenchError(f"{target.name}: exported no traces to the mock's /v1/traces "
                                 f"within {_START_TIMEOUT:.0f} s of its smoke requests:\n"
                                 f"{target.proxy.tail() if target.proxy else ''}")  # fmt: skip
            time.sleep(0.1)


def start_fleet(fleet: Fleet, names: Sequence[str], tree: Tree, cores: Cores, workdir: Path,
                modes: Sequence[str] = MODE_SETS["both"], *, shared_state: bool = False,
                limits: bool = False, tracing: bool = False, wrap: Sequence[str] = (),
                start_timeout: float = _START_TIMEOUT) -> dict[str, Target]:  # fmt: skip
    """Start the mock and the proxies `names` need (and, first, Redis for `shared_state`);
    wait until all of them answer. `tracing`: the sidecars export to the mock's trace sink,
    each under its own `?source=` (its name). `wrap`: a command each proxy runs under (say,
    valgrind), given `start_timeout` seconds to answer."""
    here = Tree(REPO, sys.executable)  # the yardsticks (mock, pass-through) come from this checkout
    redis = start_redis(fleet, cores, workdir) if shared_state else None
    mock_port = _free_port()
    mock_url = f"http://127.0.0.1:{mock_port}"
    mock = _spawn(fleet, "mock", [sys.executable, "-m", "sidecar", "mock-provider", "--listen",
                                  f"127.0.0.1:{mock_port}"], tree=here, workdir=workdir,
                  health_url=f"http://127.0.0.1:{mock_port}/_mock/health", prefix=cores.prefix(cores.load))  # fmt: skip
    targets: dict[str, Target] = {}
    if "direct" in names:
        targets["direct"] = Target("direct", f"http://127.0.0.1:{mock_port}{_PATH}",
                                   _UPSTREAM_KEY, mock)  # fmt: skip
    if "pass-through" in names:
        port = _free_port()
        proxy = _spawn(fleet, "pass-through", [*wrap, sys.executable, "-m", "bench.passthrough",
                                               "--listen", f"127.0.0.1:{port}", "--upstream",
                                               f"http://127.0.0.1:{mock_port}"],
                       tree=here, workdir=workdir, prefix=cores.prefix(cores.server),
                       health_url=f"http://127.0.0.1:{port}/_bench/health",
                       env={"BENCH_UPSTREAM_KEY": _UPSTREAM_KEY})  # fmt: skip
        targets["pass-through"] = Target("pass-through", f"http://127.0.0.1:{port}{_PATH}",
                                         _UPSTREAM_KEY, mock, proxy)  # fmt: skip
    sidecars = [n for n in names if n.startswith("sidecar")]
    providers = _sidecar_providers(modes)
    token = _write_sidecar_files(tree, workdir, providers, limits) if sidecars else ""
    for name in sidecars:
        port, admin = _free_port(), _free_port()
        access_log = name == "sidecar"
        config = workdir / f"{name}.yaml"
        sink = f"{mock_url}/v1/traces?source={name}" if tracing else None
        config.write_text(_sidecar_config(port, admin, mock_port, access_log=access_log,
                                          providers=providers,
                                          shared_state=redis.health_url if redis else None,
                                          tracing=sink))  # fmt: skip
        log = workdir / f"{name}.access.log" if access_log else None
        proxy = _spawn(fleet, name, [*wrap, tree.python, "-m", "sidecar", "serve", "--config",
                                     str(config)], tree=tree, workdir=workdir, prefix=cores.prefix(cores.server),
                       health_url=f"http://127.0.0.1:{admin}/readyz", stdout=log)  # fmt: skip
        targets[name] = Target(name, f"http://127.0.0.1:{port}{_PATH}", token, mock, proxy,
                               access_log=log, admin_url=f"http://127.0.0.1:{admin}",
                               translates=True, redis=redis,
                               traces_url=f"{mock_url}/_mock/traces" if tracing else None)  # fmt: skip
    for server in fleet.servers:
        _wait_ready(server, start_timeout)
    for target in targets.values():
        if target.redis is not None:
            _wait_shared_state_up(target)
    return {n: targets[n] for n in names}


def smoke_modes(modes: Sequence[str]) -> tuple[str, ...]:
    """json and stream always (as before x-modes), then the x-modes asked for."""
    return (*MODE_SETS["both"], *(m for m in TRANSLATED if m in modes))


def smoke(target: Target, modes: Sequence[str]) -> None:
    """One request per mode before any load: a wrong answer here is a setup failure."""
    for mode in modes:
        try:
            status, headers, text = _exchange(target.url, request_body(mode, target), target.token)
        except OSError as exc:
            raise BenchError(f"{target.name} {mode}: {type(exc).__name__}: {exc}") from None
        if status != 200:
            raise BenchError(f"{target.name} {mode}: HTTP {status}: {text[:300]!r}")
        if is_stream(mode) and not text.endswith(_STREAM_END):
            raise BenchError(f"{target.name} {mode}: stream without [DONE]: {text[-300:]!r}")
        if not is_stream(mode) and b'"choices"' not in text:
            raise BenchError(f"{target.name} {mode}: no choices in {text[:300]!r}")
        label = headers.get("x-sidecar-translated")
        if translated(mode, target) and label != _X_LABEL:
            raise BenchError(f"{target.name} {mode}: {_X_MODEL} not translated: "
                             f"x-sidecar-translated {label!r}, expected {_X_LABEL!r}")  # fmt: skip


# --------------------------------------------------------------------------- one wrk run


@dataclass(frozen=True, slots=True)
class Settings:
    duration: int
    warmup: int
    connections: int
    threads: int
    rounds: int
    targets: tuple[str, ...]
    modes: tuple[str, ...]
    shared_state: bool = False  # the sidecars' shared_state on a redis-server of the bench's own
    limits: bool = False  # the access key has rpm and tpm (BENCH_RATE_LIMIT, never reached)
    tracing: bool = False  # the sidecars export traces (every request) to the mock's sink
    rate: int = DEFAULT_RATE  # the fixed-rate run's req/s; 0: no fixed-rate run
    rate_rounds: int = DEFAULT_RATE_ROUNDS  # fixed-rate rounds: one run per target and mode
    streams: int = memory.DEFAULT_STREAMS  # streams held open to measure memory; 0: none
    quick: bool = False  # a shorter hold (--quick)
    slices: int = 0  # wrk runs a measured run is cut into (0: one a second of --duration)
    live_streams: int = live.DEFAULT_STREAMS  # live streams held through each proxy; 0: none

    @property
    def live_seconds(self) -> float:
        """Each window in which the live streams' events and a proxy's CPU are counted."""
        return 1.5 if self.quick else 3.0

    @property
    def live_rounds(self) -> int:
        """Windows per proxy, the proxies taking turns."""
        return 1 if self.quick else 2

    @property
    def slice_count(self) -> int:
        """How many wrk runs, alternating between the targets, make one measured run."""
        return self.slices or self.duration

    @property
    def slice_seconds(self) -> int:
        return self.duration // self.slice_count

    @property
    def hold_seconds(self) -> float:
        """How long the streams stay open, all of them, while the RSS is sampled."""
        return 1.0 if self.quick else 2.0

    def features(self) -> str:
        """What the sidecars ran with beyond the defaults: for comparing two runs' numbers."""
        shared = ("shared_state on (a redis-server of the bench's; its CPU is the `redis` "
                  "column)" if self.shared_state else "shared_state off")  # fmt: skip
        if not self.limits:
            limits = "access key without rate limits"
        else:
            where = "on Redis" if self.shared_state else "in the sidecar"
            limits = (f"access key with rpm {BENCH_RATE_LIMIT} and tpm {BENCH_RATE_LIMIT} "
                      f"(never reached: every request counted {where})")  # fmt: skip
        tracing = (f"tracing on (OTLP/HTTP to the mock's /v1/traces, sample_ratio "
                   f"{_TRACE_RATIO}: every request)" if self.tracing else "tracing off")  # fmt: skip
        return f"{shared}; {limits}; {tracing}"


@dataclass(frozen=True, slots=True)
class Sample:
    """One wrk run against one target in one mode."""

    requests: int
    seconds: float
    errors: dict[str, int]
    p50_ms: float
    p99_ms: float
    cpu: dict[str, float]  # "proxy", "mock", "wrk", "redis", "other", "steal" -> CPU s in the run
    max_ms: float = _NAN
    histogram: latency.Histogram | None = None  # µs -> requests, all of them (None: not printed)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def error_rate(self) -> float:
        failed = sum(self.errors.values())
        return failed / max(1, self.requests + failed - self.errors.get("status", 0))

    def ms_per_request(self, who: str) -> float:
        return self.cpu[who] / self.requests * 1000 if who in self.cpu and self.requests else _NAN

    def core_percent(self, who: str) -> float:
        return self.cpu[who] / self.seconds * 100 if who in self.cpu and self.seconds else _NAN


def combined(parts: Sequence[Sample]) -> Sample:
    """One measured run made of several wrk runs (slices): requests, seconds, errors and CPU
    seconds added up, and the latency percentiles of all their requests together (from their
    histograms, a slice that completed nothing adding nothing; the median of the parts' own
    when a part printed none)."""
    if len(parts) == 1:
        return parts[0]
    errors: Counter[str] = Counter()
    cpu: Counter[str] = Counter()
    for part in parts:
        errors.update(part.errors)
        cpu.update(part.cpu)
    shared = set.intersection(*(set(part.cpu) for part in parts))  # measured in every slice
    histograms = [part.histogram for part in parts]
    if all(h is not None for h in histograms):
        histogram: latency.Histogram | None = latency.added(h for h in histograms if h is not None)
        p50 = latency.percentile(histogram, 50) / 1000
        p99 = latency.percentile(histogram, 99) / 1000
        top = latency.maximum(histogram) / 1000
    else:
        histogram = None
        p50, p99 = _median(p.p50_ms for p in parts), _median(p.p99_ms for p in parts)
        top = max(p.max_ms for p in parts)
    return Sample(
        requests=sum(p.requests for p in parts),
        seconds=sum(p.seconds for p in parts),
        errors=dict(errors),
        p50_ms=p50,
        p99_ms=p99,
        cpu={k: v for k, v in cpu.items() if k in shared},
        max_ms=top,
        histogram=histogram,
    )


def _cpu_snapshot(fleet: Fleet) -> dict[str, float | None]:
    snap: dict[str, float | None] = {s.name: s.cpu_seconds() for s in fleet.servers}
    snap["wrk"] = _children_cpu_seconds()
    ticks = _machine_ticks()
    snap["machine"] = _machine_busy_seconds(ticks)
    snap["steal"] = _stolen_seconds(ticks)
    return snap


def _cpu_deltas(before: dict[str, float | None], after: dict[str, float | None],
                target: Target) -> dict[str, float]:  # fmt: skip
    delta = {
        k: v - b for k, v in after.items() if v is not None and (b := before.get(k)) is not None
    }
    out = {"wrk": delta["wrk"]}
    if target.mock.name in delta:
        out["mock"] = delta[target.mock.name]
    if target.proxy is not None and target.proxy.name in delta:
        out["proxy"] = delta[target.proxy.name]
    if target.redis is not None and target.redis.name in delta:
        out["redis"] = delta[target.redis.name]
    if "machine" in delta:
        # Everything not ours (idle servers of other targets count as ours), less the host's
        # steal, which /proc/stat counts as busy time: it has a column of its own.
        ours = sum(v for k, v in delta.items() if k not in ("machine", "steal"))
        out["other"] = max(0.0, delta["machine"] - delta.get("steal", 0.0) - ours)
    if "steal" in delta:
        out["steal"] = delta["steal"]
    return out


def parse_wrk(stdout: str, stderr: str) -> dict[str, float]:
    for line in stdout.splitlines():
        if line.startswith(_RESULT_MARK):
            parsed: dict[str, float] = json.loads(line[len(_RESULT_MARK) :])
            return parsed
    raise BenchError(f"wrk printed no result line:\n{stdout[-1500:]}\n{stderr[-1500:]}")


def parse_latency(stdout: str) -> dict[int, int] | None:
    """The run's latency histogram (bench/chat.lua's `BENCH-LATENCY` line: empty when the run
    completed nothing); None when there is no such line."""
    for line in stdout.splitlines():
        if line.startswith(latency.MARK):
            try:
                return latency.parse(line)
            except ValueError as exc:
                raise BenchError(f"wrk printed a malformed latency line: {exc}") from None
    return None


def wrk_command(wrk: str, target: Target, mode: str, seconds: int, threads: int,
                connections: int, cores: Cores,
                extra_env: dict[str, str] | None = None) -> tuple[list[str], dict[str, str]]:  # fmt: skip
    """wrk's command line (on the load core) and environment to load `target` in `mode`."""
    argv = [*cores.prefix(cores.load), wrk, "-t", str(threads), "-c", str(connections),
            "-d", f"{seconds}s", "--timeout", "10s", "-s", str(LUA), target.url]  # fmt: skip
    env = {
        **os.environ,
        "BENCH_TOKEN": target.token,
        "BENCH_STREAM": "1" if is_stream(mode) else "0",
        "BENCH_MODEL": request_model(mode, target),
        **(extra_env or {}),
    }
    return argv, env


def wrk_errors(result: dict[str, float]) -> dict[str, int]:
    """The kinds of error a wrk run saw (connect, read, write, status, timeout), counted."""
    errors = {k: int(result[k]) for k in ("connect", "read", "write", "status", "timeout")}
    return {k: v for k, v in errors.items() if v}


def run_wrk(wrk: str, fleet: Fleet, target: Target, mode: str, seconds: int,
            settings: Settings, cores: Cores, pace: Pace | None = None) -> Sample:  # fmt: skip
    """Load `target` with wrk for `seconds` (flat out, or at `pace`'s fixed rate); CPU deltas
    of every process over the run."""
    direct = target.proxy is None
    if direct:
        pin(target.mock.proc.pid, cores.server)
    threads, connections = (pace.threads, pace.connections) if pace else (settings.threads,
                                                                         settings.connections)  # fmt: skip
    argv, env = wrk_command(wrk, target, mode, seconds, threads, connections, cores,
                            pace.env() if pace else None)  # fmt: skip
    try:
        before = _cpu_snapshot(fleet)
        fleet.wrk = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=env)  # fmt: skip
        try:
            out, err = fleet.wrk.communicate(timeout=seconds + 60)
        except subprocess.TimeoutExpired:
            raise BenchError(f"wrk did not finish within {seconds + 60} s") from None
        fleet.wrk = None
        time.sleep(_SETTLE)
        after = _cpu_snapshot(fleet)
    finally:
        if direct:
            pin(target.mock.proc.pid, cores.load)
    fleet.check_alive()
    text = out.decode(errors="replace")
    result = parse_wrk(text, err.decode(errors="replace"))
    return Sample(
        requests=int(result["requests"]),
        seconds=result["duration_us"] / 1e6,
        errors=wrk_errors(result),
        p50_ms=result["p50_us"] / 1000,
        p99_ms=result["p99_us"] / 1000,
        cpu=_cpu_deltas(before, after, target),
        max_ms=result.get("max_us", _NAN) / 1000,
        histogram=parse_latency(text),
    )


# --------------------------------------------------------------------------- the runs


@dataclass(slots=True)
class Results:
    samples: dict[tuple[str, str], list[Sample]] = field(default_factory=dict)  # (mode, target)
    loads: list[str] = field(default_factory=list)  # load average before each round
    completed: Counter[str] = field(default_factory=Counter)  # target -> all requests wrk completed
    #: fixed rate: (mode, target) -> each round's run, with the pace it ran at
    fixed: dict[tuple[str, str], list[tuple[Pace, Sample]]] = field(default_factory=dict)

    def of(self, mode: str, target: str) -> list[Sample]:
        return self.samples.get((mode, target), [])


def _rotated(names: Sequence[str], i: int) -> list[str]:
    k = i % len(names)
    return [*names[k:], *names[:k]]


def slice_orders(names: Sequence[str], slices: int, start: int = 0) -> list[list[str]]:
    """The order of the targets in each slice of a round: `names` rotated by `start`, then
    reversed every other slice (A B, B A, A B, ...), so that a drift of the machine's speed
    over the round falls on every target about alike."""
    order = _rotated(names, start)
    return [order if k % 2 == 0 else order[::-1] for k in range(slices)]


def run_sliced(wrk: str, fleet: Fleet, targets: dict[str, Target], names: Sequence[str],
               mode: str, settings: Settings, cores: Cores, start: int) -> dict[str, Sample]:  # fmt: skip
    """One measured run of each of `names`: `settings.slice_count` wrk runs of
    `settings.slice_seconds` each, the targets alternating (`slice_orders`), added up."""
    parts: dict[str, list[Sample]] = {name: [] for name in names}
    for order in slice_orders(names, settings.slice_count, start):
        for name in order:
            part = run_wrk(wrk, fleet, targets[name], mode, settings.slice_seconds, settings,
                           cores)  # fmt: skip
            parts[name].append(part)
    return {name: combined(ss) for name, ss in parts.items()}


def measure(wrk: str, fleet: Fleet, targets: dict[str, Target], settings: Settings,
            cores: Cores) -> Results:  # fmt: skip
    results = Results()
    for mode in settings.modes:  # warm-up: connection pools, caches, lazily built state
        for target in targets.values():
            if settings.warmup > 0:
                w = run_wrk(wrk, fleet, target, mode, settings.warmup, settings, cores)
                results.completed[target.name] += w.requests
    for i in range(settings.rounds):
        load = _load_average()
        results.loads.append(load)
        print(f"round {i + 1}/{settings.rounds} (load average {load})", file=sys.stderr, flush=True)
        for mode in settings.modes:
            runs = run_sliced(wrk, fleet, targets, settings.targets, mode, settings, cores, i)
            for name in _rotated(settings.targets, i):
                s = runs[name]
                results.samples.setdefault((mode, name), []).append(s)
                results.completed[name] += s.requests
                proxy = "proxy" if targets[name].proxy is not None else "mock"
                print(f"  {mode:<{_MODE_WIDTH}}{name:<14}{s.rps:>8.0f} req/s  {s.ms_per_request(proxy):.3f} "
                      f"{proxy} CPU ms/req" + (f"  errors {s.errors}" if s.errors else ""),
                      file=sys.stderr, flush=True)  # fmt: skip
    return results


#: what the fixed-rate run offers its rate to: the floor and the sidecars, untranslated modes
FIXED_TARGETS: Final = ("pass-through", "sidecar", "sidecar-nolog")
FIXED_MODES: Final = ("json", "stream")


def fixed_rate_plan(settings: Settings) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The modes and targets of the fixed-rate run (none with `--rate 0`)."""
    if settings.rate <= 0:
        return (), ()
    return (tuple(m for m in settings.modes if m in FIXED_MODES),
            tuple(n for n in settings.targets if n in FIXED_TARGETS))  # fmt: skip


def measure_fixed_rate(wrk: str, fleet: Fleet, targets: dict[str, Target], settings: Settings,
                       cores: Cores, results: Results) -> None:  # fmt: skip
    """Offer each target `settings.rate` req/s for `settings.duration` seconds, in
    `settings.rate_rounds` rounds whose target order alternates: a p99 is one slow moment away
    from another, so no single run is the answer. Each run is one wrk run, not slices: every
    wrk run opens its connections anew, and at 1,000 req/s the 50 first requests of a 1 s
    slice would be 5% of it, inside the p99 being measured."""
    modes, names = fixed_rate_plan(settings)
    if not names:
        return
    pace = Pace.start(settings.rate, settings.threads)
    for r in range(settings.rate_rounds):
        for mode in modes:
            for name in names if r % 2 == 0 else names[::-1]:
                s = run_wrk(wrk, fleet, targets[name], mode, settings.duration, settings, cores,
                            pace)  # fmt: skip
                results.completed[name] += s.requests
                results.fixed.setdefault((mode, name), []).append((pace, s))
                print(f"  fixed {mode:<{_MODE_WIDTH}}{name:<14}{s.rps:>6.0f} req/s  p99 "
                      f"{s.p99_ms:.2f} ms  round {r + 1}/{settings.rate_rounds}"
                      + (f"  errors {s.errors}" if s.errors else ""), file=sys.stderr,
                      flush=True)  # fmt: skip


def memory_targets(targets: dict[str, Target]) -> list[tuple[Target, Server]]:
    """The targets with a proxy, whose memory is measured (`direct` has none), and the proxy."""
    return [(t, t.proxy) for t in targets.values() if t.proxy is not None]


def proxy_rss(targets: dict[str, Target]) -> dict[str, int | None]:
    """Each proxy's resident set now, in KiB."""
    return {t.name: memory.rss_kib(proxy.proc.pid) for t, proxy in memory_targets(targets)}


def measure_memory(fleet: Fleet, targets: dict[str, Target], settings: Settings,
                   idle: dict[str, int | None]) -> list[memory.MemoryRow]:  # fmt: skip
    """Per proxy: its RSS now (after the load), then with `settings.streams` streams held open
    through it, then `memory.AFTER_SECONDS` after they were hung up on."""
    rows = []
    for target, proxy in memory_targets(targets):
        pid = proxy.proc.pid
        before = memory.rss_kib(pid)
        if settings.streams <= 0:
            rows.append(memory.MemoryRow(target.name, idle.get(target.name), before))
            continue
        host, port = _host_port(target.url)
        request = memory.stream_request(host, port, _PATH, target.token, memory.STREAM_MODEL)
        held = asyncio.run(memory.hold_streams(host, port, request, settings.streams,
                                               functools.partial(memory.rss_kib, pid),
                                               hold_seconds=settings.hold_seconds))  # fmt: skip
        time.sleep(memory.AFTER_SECONDS)
        after = memory.rss_kib(pid)
        fleet.check_alive()
        rows.append(memory.MemoryRow(target.name, idle.get(target.name), before, held, after))
        print(f"  memory {target.name:<14}{held.summary()}", file=sys.stderr, flush=True)
    return rows


def measure_live(fleet: Fleet, targets: dict[str, Target], settings: Settings,
                 cores: Cores) -> list[tuple[str, live.Relayed]]:  # fmt: skip
    """Per proxy: CPU per event relayed on `settings.live_streams` live streams (bench/live.py),
    in `settings.live_rounds` windows, the proxies taking turns (the order alternating). The
    bench's own client runs on the load core meanwhile, as wrk does, off the proxy's."""
    proxies = memory_targets(targets)
    if settings.live_streams <= 0 or not proxies:
        return []
    with _on_core(cores.load):
        return _measure_live(fleet, proxies, settings)


@contextlib.contextmanager
def _on_core(cpu: int | None) -> Iterator[None]:
    """This process on core `cpu` (none: as it was) for the block, its cores restored after."""
    if cpu is None or not hasattr(os, "sched_setaffinity"):
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def _measure_live(fleet: Fleet, proxies: list[tuple[Target, Server]],
                  settings: Settings) -> list[tuple[str, live.Relayed]]:  # fmt: skip
    runs: dict[str, list[live.Relayed]] = {t.name: [] for t, _ in proxies}
    for r in range(settings.live_rounds):
        for target, proxy in proxies if r % 2 == 0 else proxies[::-1]:
            host, port = _host_port(target.url)
            request = memory.stream_request(host, port, _PATH, target.token, live.model())
            relayed = asyncio.run(live.relay_streams(host, port, request, settings.live_streams,
                                                     proxy.cpu_seconds,
                                                     seconds=settings.live_seconds))  # fmt: skip
            fleet.check_alive()
            runs[target.name].append(relayed)
            print(f"  live {target.name:<14}{relayed.events_per_second:.0f} events/s  "
                  f"{relayed.us_per_event:.1f} µs/event  {relayed.opened} of "
                  f"{relayed.requested} open", file=sys.stderr, flush=True)  # fmt: skip
    return [(name, live.added(rs)) for name, rs in runs.items()]


def _host_port(url: str) -> tuple[str, int]:
    """Host and port of `http://host:port/...`."""
    host, _, port = url.removeprefix("http://").partition("/")[0].rpartition(":")
    return host, int(port)


# --------------------------------------------------------------------------- report


def _median(values: Iterator[float] | list[float]) -> float:
    vals = [v for v in values if v == v]
    return statistics.median(vals) if vals else _NAN


def _num(value: float, width: int, spec: str = ".3f") -> str:
    return f"{'-':>{width}}" if value != value else f"{value:>{width}{spec}}"


def _column(samples: list[Sample], get: Callable[[Sample], float]) -> float:
    return _median(get(s) for s in samples)


def _cpu_ms(samples: list[Sample], who: str) -> float:
    return _median(s.ms_per_request(who) for s in samples)


def _cpu_pct(samples: list[Sample], who: str) -> float:
    return _median(s.core_percent(who) for s in samples)


def mode_title(mode: str, rounds: int) -> str:
    """What a mode's table measures (two lines for a translated mode)."""
    label = (
        "streaming (SSE) chat completion" if is_stream(mode) else "non-streaming chat completion"
    )
    if mode not in TRANSLATED:
        return f"{mode}: {label}; median of {rounds} round(s)"
    return (f"{mode}: {label}, {_X_MODEL} translated {_X_LABEL} by the sidecar; median of "
            f"{rounds} round(s)\n  (direct and pass-through cannot translate: they get "
            f"{_MODEL} untranslated, so sidecar ÷ pass-through is the cost of translation on top "
            "of the sidecar's own cost)")  # fmt: skip


def processes(settings: Settings) -> tuple[str, ...]:
    """The processes whose CPU the tables show: `redis` too with `--shared-state`."""
    return ("proxy", "mock", "wrk", *(("redis",) if settings.shared_state else ()))


def print_tables(results: Results, settings: Settings) -> None:
    who = processes(settings)
    for mode in settings.modes:
        print(f"\n{mode_title(mode, settings.rounds)}")
        print(f"{'target':<15}{'req/s':>8}{'p50 ms':>8}{'p99 ms':>8}  │ CPU ms/req "
              + "".join(f"{w:>7}" for w in who) + "  │ % of a core "
              + "".join(f"{w:>6}" for w in (*who, "other")))  # fmt: skip
        for name in settings.targets:
            ss = results.of(mode, name)
            if not ss:
                continue
            print(f"{name:<15}{_num(_column(ss, lambda s: s.rps), 8, '.0f')}"
                  f"{_num(_column(ss, lambda s: s.p50_ms), 8, '.2f')}"
                  f"{_num(_column(ss, lambda s: s.p99_ms), 8, '.2f')}  │ {'':<10}"
                  + "".join(_num(_cpu_ms(ss, w), 7) for w in who) + f"  │ {'':<11}"
                  + "".join(_num(_cpu_pct(ss, w), 6, '.0f') for w in (*who, "other")))  # fmt: skip


def _ratio_line(results: Results, mode: str, name: str) -> str | None:
    side, base = results.of(mode, name), results.of(mode, "pass-through")
    if not side or not base:
        return None
    s_ms, b_ms = _cpu_ms(side, "proxy"), _cpu_ms(base, "proxy")
    paired = [a.ms_per_request("proxy") / b.ms_per_request("proxy") for a, b in zip(side, base, strict=False)]  # fmt: skip
    spread = f" (rounds {min(paired):.2f}-{max(paired):.2f})" if len(paired) > 1 else ""
    rps = _column(side, lambda s: s.rps) / _column(base, lambda s: s.rps)
    line = (f"  {mode:<{_MODE_WIDTH}}{name:<14}{s_ms:.3f} ÷ {b_ms:.3f} ms = {s_ms / b_ms:.2f}x"
            f"{spread}; +{s_ms - b_ms:.3f} ms/req; req/s ratio {rps:.2f}")  # fmt: skip
    plain = results.of(_UNTRANSLATED.get(mode, mode), name)
    if mode in TRANSLATED and plain:  # the same sidecar on the untranslated request
        line += f"; translation {s_ms - _cpu_ms(plain, 'proxy'):+.3f} ms/req"
    return line


def _redis_line(results: Results, mode: str, name: str) -> str | None:
    """Redis's CPU per request of the sidecar `name`, and sidecar + Redis ÷ pass-through."""
    side, base = results.of(mode, name), results.of(mode, "pass-through")
    r_ms = _cpu_ms(side, "redis")
    if r_ms != r_ms:  # no Redis behind this sidecar
        return None
    line = f"  {mode:<{_MODE_WIDTH}}{'+ redis':<14}{r_ms:.3f} ms/req"
    if base:
        both = _median(s.ms_per_request("proxy") + s.ms_per_request("redis") for s in side)
        b_ms = _cpu_ms(base, "proxy")
        line += f"; sidecar + redis {both:.3f} ÷ {b_ms:.3f} ms = {both / b_ms:.2f}x"
    return line


def print_headline(results: Results, settings: Settings) -> None:
    lines = [line for mode in settings.modes for name in settings.targets
             if name.startswith("sidecar")
             for line in (_ratio_line(results, mode, name), _redis_line(results, mode, name))
             if line]  # fmt: skip
    if lines:
        print("\nHEADLINE proxy CPU ms per request, sidecar ÷ pass-through (lower is better, 1.00 "
              "is the floor):")  # fmt: skip
        print(f"  [{settings.features()}]")
        print("\n".join(lines))
        xs = [m for m in settings.modes if m in TRANSLATED]
        if xs:
            print(f"  ({', '.join(xs)}: translated sidecar ÷ untranslated pass-through; "
                  "`translation`: the sidecar's CPU ms/req minus its own in "
                  f"{', '.join(_UNTRANSLATED[m] for m in xs)}, when measured)")  # fmt: skip


def _median_run(runs: list[tuple[Pace, Sample]]) -> tuple[Pace, Sample]:
    """The run with the median p99 (the lower middle one of an even number)."""
    return sorted(runs, key=lambda run: run[1].p99_ms)[(len(runs) - 1) // 2]


def fixed_rate_lines(results: Results, settings: Settings) -> list[str]:
    """The fixed-rate section: per target and mode the run with the median p99 (rate,
    latency, the proxy's CPU) and every round's p99, then `added p99 at N req/s: sidecar
    MINUS pass-through = X ms`: the median of the rounds' differences, per mode and sidecar."""
    modes, names = fixed_rate_plan(settings)
    runs = [(m, n, results.fixed[(m, n)]) for m in modes for n in names if results.fixed.get((m, n))]
    if not runs:
        return []
    rounds = max(len(rs) for _, _, rs in runs)
    lines = [describe(runs[0][2][0][0], settings.duration, rounds),
             f"{'mode':<{_MODE_WIDTH}}{'target':<15}{'req/s':>7}{'off by':>8}{'p50 ms':>8}"
             f"{'p99 ms':>8}{'max ms':>8}  │ proxy CPU ms/req  % of a core  stolen"
             + ("  │ p99 ms by round" if rounds > 1 else "")]  # fmt: skip
    for mode, name, rs in runs:
        paced, s = _median_run(rs)
        line = (f"{mode:<{_MODE_WIDTH}}{name:<15}{s.rps:>7.0f}{paced.off_by(s.rps):>+8.1%}"
                f"{s.p50_ms:>8.2f}{s.p99_ms:>8.2f}{s.max_ms:>8.2f}  │ "
                f"{_num(s.ms_per_request('proxy'), 16)}{_num(s.core_percent('proxy'), 13, '.0f')}"
                f"{_num(s.core_percent('steal'), 8, '.1f')}")
        if rounds > 1:
            line += "  │ " + " ".join(f"{r.p99_ms:.2f}" for _, r in rs)
        lines.append(line)
    for mode in modes:
        base = results.fixed.get((mode, "pass-through"))
        for name in names:
            side = results.fixed.get((mode, name))
            if base and side and name != "pass-through":
                diffs = [b.p99_ms - a.p99_ms for (_, a), (_, b) in zip(base, side, strict=False)]
                reached = all(p.on_target(s.rps, OFF_TARGET) for p, s in (*base, *side))
                lines.append(added_p99_line(mode, name, settings.rate, statistics.median(diffs),
                                            rounds=diffs, reached=reached, width=_MODE_WIDTH))  # fmt: skip
    return lines


def _metric_sum(metrics: bytes, name: str) -> float:
    """The sum of every series of `name` in a Prometheus text page (0 when it has none)."""
    return sum(float(m.group(1)) for m in re.finditer(
        rb"^" + re.escape(name.encode()) + rb"(?:\{[^}]*\})? ([0-9.e+-]+)$", metrics, re.MULTILINE))  # fmt: skip


def print_sanity(targets: dict[str, Target], completed: Counter[str], smoked: int,
                 streams: int = 0, live_streams: int = 0) -> None:  # fmt: skip
    """Evidence that the sidecar's features were on: access log lines, request counter, and
    with shared_state the link to Redis and the commands Redis ran. `streams`: the streams
    each proxy was sent to measure memory, `live_streams` the live streams (all windows);
    the sidecar counts those too."""
    for t in targets.values():
        if t.admin_url is None:
            continue
        lines = _count_lines(t.access_log) if t.access_log else None
        try:
            _, metrics = _http(f"{t.admin_url}/metrics")
            counted = _metric_sum(metrics, "sidecar_requests_total")
            shared = (f", sidecar_shared_state_up {_metric_sum(metrics, 'sidecar_shared_state_up'):.0f}"
                      f", Redis link lost {_link_losses(t)} time(s)" if t.redis is not None else "")  # fmt: skip
            limited = _metric_sum(metrics, "sidecar_rate_limited_total")
        except OSError:
            counted, shared, limited = _NAN, "", _NAN
        traced = ""
        if t.traces_url:  # the proxy's whole log is read only when it traced
            traced = trace_line(trace_counts(t), _log_count(t, b"trace_export_failed"))
        held = (f", + {streams} held streams" if streams else "") + (
            f", + {live_streams} live streams" if live_streams else "")
        print(f"# {t.name}: wrk completed {completed[t.name]} requests (+ {smoked} smoke{held}); "
              f"sidecar_requests_total {counted:.0f}"
              + (f", access log {lines} lines" if lines is not None else ", access log off")
              + shared + (f", sidecar_rate_limited_total {limited:.0f}" if limited else "")
              + traced)  # fmt: skip
    redis = next((t.redis for t in targets.values() if t.redis is not None), None)
    if redis is not None:
        print_redis_sanity(redis, sum(completed[n] for n, t in targets.items() if t.redis))


def _link_losses(target: Target) -> int:
    """How often the sidecar fell back to local state (its `shared_state_unavailable` lines):
    while it was off the link, requests were counted locally and Redis did none of their work."""
    return _log_count(target, b"shared_state_unavailable")


def _log_count(target: Target, event: bytes) -> int:
    """How often `event` occurs in the proxy's log (its stderr file)."""
    if target.proxy is None:
        return 0
    with contextlib.suppress(OSError), target.proxy.stderr.open("rb") as f:
        return sum(line.count(event) for line in f)
    return 0


def trace_line(counts: dict[str, int] | None, failed: int) -> str:
    """The sanity line's part on tracing: what the sink received from the sidecar over the
    whole bench, and its `trace_export_failed` log lines."""
    if counts is None:
        sink = "trace sink: no answer"
    elif counts["requests"] == 0:
        sink = "trace sink got NO OTLP export"
    else:
        sink = f"trace sink got {counts['requests']} OTLP exports ({counts['bytes']} bytes)"
    if counts and counts["too_large"]:
        sink += f", {counts['too_large']} refused as too large"
    return f", {sink}, trace_export_failed logged {failed} time(s)"


def print_redis_sanity(redis: Server, requests: int) -> None:
    """The commands Redis ran over the whole bench, per request the sidecars completed."""
    try:
        stats = parse_redis_info(_redis_command(redis.health_url, "INFO", "stats"))
        calls = parse_redis_info(_redis_command(redis.health_url, "INFO", "commandstats"))
    except (OSError, ValueError):
        print("# redis: INFO failed")
        return
    total = int(stats.get("total_commands_processed", "0"))
    counts = command_calls(calls)
    top = ", ".join(f"{name} {n}" for name, n in counts.most_common(6))
    scripts = counts["evalsha"] + counts["eval"]
    per = f" ({scripts / requests:.2f} per request wrk completed)" if requests else ""
    print(f"# redis: {total} commands processed ({top}); Lua script calls (EVAL/EVALSHA) "
          f"{scripts}{per}")  # fmt: skip


def command_calls(commandstats: dict[str, str]) -> Counter[str]:
    """Calls per command from `INFO commandstats` (`cmdstat_get:calls=3,usec=...`), which counts
    the commands a Lua script runs as well as the script itself."""
    return Counter({k.removeprefix("cmdstat_"): int(v.split(",")[0].removeprefix("calls="))
                    for k, v in commandstats.items() if k.startswith("cmdstat_")})  # fmt: skip


def _count_lines(path: Path) -> int:
    with path.open("rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def failures(results: Results) -> list[str]:
    runs = [(f"{name} {mode}", s) for (mode, name), ss in sorted(results.samples.items())
            for s in ss] + [(f"{name} {mode} at a fixed rate", s)
                            for (mode, name), rs in sorted(results.fixed.items())
                            for _, s in rs]  # fmt: skip
    return [f"{what}: {s.error_rate:.1%} of requests failed: {s.errors}"
            for what, s in runs if s.error_rate > MAX_ERROR_RATE]  # fmt: skip


# --------------------------------------------------------------------------- main


def bench(settings: Settings, tree: Tree, cores: Cores, fleet: Fleet) -> int:
    """Start the servers into `fleet`, measure, print; the caller stops the fleet."""
    wrk = find_wrk()
    started = time.monotonic()
    nofile = memory.raise_nofile()  # before any server starts: they inherit it
    streams = memory.stream_cap(settings.streams, nofile)
    sliced = (f" in {settings.slice_count} slices of {settings.slice_seconds} s alternating "
              "between the targets" if settings.slice_count > 1 else "")  # fmt: skip
    print(f"# {os.cpu_count()} CPUs, load average {_load_average()}; wrk -t{settings.threads} "
          f"-c{settings.connections}, {settings.rounds} round(s) of {settings.duration:g} s per "
          f"target and mode{sliced} after {settings.warmup:g} s warm-up; "
          f"{cores.describe()}")  # fmt: skip
    print(f"# {settings.features()}")
    if streams < settings.streams:
        print(f"# open-files limit {nofile}: {streams} streams held open instead of "
              f"{settings.streams} (raise `ulimit -n`)")  # fmt: skip
        settings = dataclasses.replace(settings, streams=streams)
    if tree.path != REPO:
        print(f"# sidecar from {tree.path} ({tree.python}); mock and pass-through from {REPO}")
    check_tree(tree, settings.modes, shared_state=settings.shared_state, limits=settings.limits,
               tracing=settings.tracing)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="sidecar-bench-") as tmp:
        try:
            targets = start_fleet(fleet, settings.targets, tree, cores, Path(tmp), settings.modes,
                                  shared_state=settings.shared_state, limits=settings.limits,
                                  tracing=settings.tracing)  # fmt: skip
            smoked = smoke_modes(settings.modes)
            for target in targets.values():
                smoke(target, smoked)
            wait_traces_exported(targets)
            idle = proxy_rss(targets)
            results = measure(wrk, fleet, targets, settings, cores)
            parts = [time.monotonic()]
            measure_fixed_rate(wrk, fleet, targets, settings, cores, results)
            parts.append(time.monotonic())
            relayed = measure_live(fleet, targets, settings, cores)
            parts.append(time.monotonic())
            rows = measure_memory(fleet, targets, settings, idle)
            parts.append(time.monotonic())
            print_tables(results, settings)
            print_headline(results, settings)
            for lines in (fixed_rate_lines(results, settings),
                          live.live_lines(relayed, settings.live_streams, live.DRIP_MS,
                                          settings.live_seconds, settings.live_rounds),
                          memory.memory_lines(rows, settings.streams, memory.AFTER_SECONDS)):  # fmt: skip
                if lines:
                    print("\n" + "\n".join(lines))
            print()
            print_sanity(targets, results.completed, len(smoked), settings.streams,
                         settings.live_streams * settings.live_rounds if relayed else 0)  # fmt: skip
        finally:
            fleet.stop()
    busy = _median(s.core_percent("other") for ss in results.samples.values() for s in ss)
    if busy > _BUSY_PERCENT:
        print(f"# WARNING: other processes used {busy:.0f}% of a core (median) while measuring: "
              "CPU ms/req is inflated and noisy under contention; rerun at a quiet moment")  # fmt: skip
    print(f"# load average before each round: {'; '.join(results.loads)}; "
          f"{time.monotonic() - started:.0f} s in all (fixed rate {parts[1] - parts[0]:.0f} s, "
          f"live streams {parts[2] - parts[1]:.0f} s, memory {parts[3] - parts[2]:.0f} s)")  # fmt: skip
    problems = failures(results)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if problems else 0


def _names(text: str, allowed: Sequence[str], what: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{what}: expected a comma-separated subset of "
                                         f"{', '.join(allowed)}")  # fmt: skip
    return names


def parse_modes(text: str) -> tuple[str, ...]:
    """`--mode`: a comma-separated list of modes and of `both` (json,stream) and `all` (the four),
    expanded and without repeats, in the order given."""
    names = _names(text, (*MODES, *MODE_SETS), "--mode")
    expanded = (m for n in names for m in MODE_SETS.get(n, (n,)))
    return tuple(dict.fromkeys(expanded))


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def parse_args(argv: Sequence[str] | None) -> tuple[Settings, Path | None, Cores]:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--duration", type=int, default=5,
                   help="measured seconds per target, mode and round (5)")  # fmt: skip
    p.add_argument("--warmup", type=int, default=1,
                   help="one unmeasured run per target and mode first; 0 skips (1)")  # fmt: skip
    p.add_argument("--connections", type=int, default=32, help="wrk -c (32)")
    p.add_argument("--threads", type=int, default=2, help="wrk -t (2)")
    p.add_argument("--rounds", type=int, default=3, help="rounds; the tables show medians (3)")
    p.add_argument("--targets", default=",".join(DEFAULT_TARGETS),
                   type=lambda t: _names(t, TARGETS, "--targets"),
                   help=f"comma-separated, from {', '.join(TARGETS)} ({','.join(DEFAULT_TARGETS)})")  # fmt: skip
    p.add_argument("--mode", default="both", type=parse_modes,
                   help=f"comma-separated, from {', '.join(MODES)}, both (= json,stream), all "
                        "(= the four); x-modes ask the sidecar for an Anthropic model (both)")  # fmt: skip
    p.add_argument("--tree", type=Path, metavar="PATH",
                   help="measure the sidecar of another checkout (its .venv if it has one)")  # fmt: skip
    p.add_argument("--shared-state", action="store_true",
                   help="start a redis-server and set the sidecars' shared_state to it; its CPU "
                        "per request is reported as `redis`")  # fmt: skip
    p.add_argument("--limits", action="store_true",
                   help=f"give the access key rpm and tpm {BENCH_RATE_LIMIT} (never reached): "
                        "every request is counted, on Redis with --shared-state")  # fmt: skip
    p.add_argument("--tracing", action="store_true",
                   help="the sidecars export traces (sample_ratio 1.0) over OTLP/HTTP to a sink "
                        "in the mock, which counts and discards them")  # fmt: skip
    p.add_argument("--no-pin", dest="pin", action="store_false",
                   help="do not pin processes to cores")  # fmt: skip
    p.add_argument("--rate", type=int, default=DEFAULT_RATE, metavar="N",
                   help="the fixed-rate run: N req/s offered to pass-through and sidecar in json "
                        f"and stream; 0 skips it ({DEFAULT_RATE})")  # fmt: skip
    p.add_argument("--rate-rounds", type=int, default=DEFAULT_RATE_ROUNDS, metavar="N",
                   help="fixed-rate rounds, each one run per target and mode, the order "
                        f"alternating; the median p99 is reported ({DEFAULT_RATE_ROUNDS})")  # fmt: skip
    p.add_argument("--streams", type=int, default=memory.DEFAULT_STREAMS, metavar="N",
                   help="memory: N streams held open through each proxy at once; 0 skips them "
                        f"(the idle RSS is still shown) ({memory.DEFAULT_STREAMS})")  # fmt: skip
    p.add_argument("--slices", type=int, default=0, metavar="N",
                   help="cut each target's --duration into N wrk runs that alternate between "
                        "the targets; N must divide --duration; 1: one run per target, back to "
                        "back (default: one slice a second)")  # fmt: skip
    p.add_argument("--live", type=int, default=live.DEFAULT_STREAMS, metavar="N",
                   help="live streams: N streams held open through each proxy, each sent an event "
                        f"every {live.DRIP_MS} ms; the CPU per event relayed is reported; 0 skips "
                        f"them ({live.DEFAULT_STREAMS})")  # fmt: skip
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 1 round of 2 s after 1 s warm-up, one fixed-rate round, "
                        "one live-streams window of 1.5 s, streams held 1 s (about 50 s)")  # fmt: skip
    a = p.parse_args(argv)
    if a.quick:
        a.duration, a.warmup, a.rounds, a.rate_rounds = 2, 1, 1, 1
    if a.duration < 1 or a.warmup < 0 or a.connections < 1 or a.rounds < 1 or a.threads < 1:
        p.error("--duration at least 1; --rounds, --connections and --threads at least 1")
    if a.slices < 0 or (a.slices and a.duration % a.slices):
        p.error("--slices must divide --duration (wrk runs whole seconds)")
    if a.threads > a.connections:
        p.error("--threads must not exceed --connections")
    if a.rate_rounds < 1:
        p.error("--rate-rounds at least 1")
    if a.rate < 0 or a.streams < 0 or a.live < 0:
        p.error("--rate, --live and --streams must not be negative (0 skips)")
    settings = Settings(a.duration, a.warmup, a.connections, a.threads, a.rounds, a.targets, a.mode,
                        shared_state=a.shared_state, limits=a.limits, tracing=a.tracing,
                        rate=a.rate, rate_rounds=a.rate_rounds,
                        streams=a.streams, quick=a.quick, slices=a.slices,
                        live_streams=a.live)  # fmt: skip
    return settings, a.tree, Cores.choose(a.pin)


def guarded(work: Callable[[Fleet], int]) -> int:
    """Run `work` with a fleet that is stopped on any exit; a BenchError or an interrupt
    (Ctrl-C, SIGTERM) becomes a message and an exit status."""
    fleet = Fleet()
    previous = signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM ends the run like Ctrl-C
    try:
        return work(fleet)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        fleet.stop()
        signal.signal(signal.SIGTERM, previous)


def guarded_report(work: Callable[[Fleet], list[str]]) -> int:
    """`guarded`, for a tool that measures and then prints a report: the lines `work`
    returns, then how long it all took."""
    started = time.monotonic()

    def measured(fleet: Fleet) -> int:
        print("\n".join(work(fleet)))
        print(f"# {time.monotonic() - started:.0f} s in all")
        return 0

    return guarded(measured)


def main(argv: Sequence[str] | None = None) -> int:
    settings, tree_path, cores = parse_args(argv)
    return guarded(lambda fleet: bench(settings, Tree.at(tree_path), cores, fleet))


if __name__ == "__main__":
    raise SystemExit(main())
