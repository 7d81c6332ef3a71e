"""`make bench`: the sidecar against the mock directly and against a bare pass-through.

Three targets, each server in its own process, all on uvloop with access logs off:

- **direct**: the mock provider (`sidecar mock-provider`), no proxy at all;
- **pass-through**: `bench.passthrough`, which only swaps the auth header —
  the ceiling for any proxy on aiohttp;
- **sidecar**: `sidecar serve --config` with a policy key pointing at the mock.

One load-generator process (aiohttp client, one `ClientSession`, uvloop)
keeps `--concurrency` requests in flight (closed loop) for `--duration`
seconds after a warm-up, for OpenAI chat completions without and with
`stream: true`. Targets alternate within a round and the start rotates from
round to round; the table shows the median over `--rounds`. After that: one
sidecar round with the access log on, and an unloaded pass (one request in
flight) whose p50 difference is the sidecar's own per-request latency, free
of queueing.

The machine's cores are shared by the load generator, the proxy and the mock,
so absolute numbers are a property of this machine; the ratio sidecar ÷
pass-through (same processes, same load, same moment) is the number to watch.
Exit status is non-zero only when a server does not start or a target
answers more than 1% of its requests with an error — never because of a ratio.
How to read the table: bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import aiohttp
import orjson
import uvloop

from sidecar.crypto import Opener, generate_private_key, write_private_key
from sidecar.secret import Secret
from sidecar.vault import (
    add_access_key,
    create_vault,
    edit_vault,
    set_secret,
)

REPO: Final = Path(__file__).resolve().parents[1]
TARGET_RATIO: Final = 0.85
MAX_ERROR_RATE: Final = 0.01
_START_TIMEOUT: Final = 20.0
# Connections stay open between visits, so later visits to a target only refill the pipeline.
_REWARM: Final = 0.25
_NAN: Final = float("nan")
_UPSTREAM_KEY: Final = "sk-bench-upstream"
_PATH: Final = "/v1/chat/completions"
_PROMPT: Final = [{"role": "user", "content": "Say hello to the benchmark, please."}]
_BODIES: Final = {
    "non-stream": orjson.dumps({"model": "gpt-4o-mini", "messages": _PROMPT}),
    "stream": orjson.dumps({"model": "gpt-4o-mini", "messages": _PROMPT, "stream": True}),
}
_MODES: Final = tuple(_BODIES)
# `sidecar mock-provider` itself, on uvloop: the CLI calls asyncio.run, which follows the policy.
_MOCK_BOOT: Final = "; ".join(
    (
        "import sys, uvloop",
        "uvloop.install()",
        "from sidecar.cli import main",
        "sys.exit(main(sys.argv[1:]))",
    )
)
_CLK_TCK: Final = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


# --------------------------------------------------------------------------- servers


@dataclass(slots=True)
class Server:
    """One server process; its stderr goes to a file so a failed start can be shown."""

    name: str
    proc: subprocess.Popen[bytes]
    stderr: Path
    health_url: str

    def cpu_seconds(self) -> float | None:
        """User + system CPU time of the process so far (Linux), None elsewhere."""
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


class StartError(Exception):
    """A server did not start, or stopped while measuring."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn(name: str, argv: list[str], workdir: Path, health_url: str,
           env: dict[str, str] | None = None, stdout: int | None = subprocess.DEVNULL) -> Server:  # fmt: skip
    stderr = workdir / f"{name}.err"
    with stderr.open("wb") as err:
        proc = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.DEVNULL, stdout=stdout, stderr=err,
                                env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})  # fmt: skip
    return Server(name, proc, stderr, health_url)


async def _poll_ready(session: aiohttp.ClientSession, server: Server) -> None:
    while True:
        if server.proc.poll() is not None:
            raise StartError(f"{server.name} exited with status {server.proc.returncode}:\n"
                             f"{server.tail()}")  # fmt: skip
        try:
            async with session.get(server.health_url) as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.05)


async def _wait_ready(session: aiohttp.ClientSession, server: Server) -> None:
    try:
        async with asyncio.timeout(_START_TIMEOUT):
            await _poll_ready(session, server)
    except TimeoutError:
        raise StartError(f"{server.name} did not become ready within {_START_TIMEOUT:.0f} s:\n"
                         f"{server.tail()}") from None  # fmt: skip


def _write_sidecar_env(workdir: Path) -> str:
    """Key pair, vault with the upstream key and one access key; returns the access key."""
    private = generate_private_key()
    write_private_key(workdir / "sidecar.key", private)
    vault = workdir / "vault.json"
    create_vault(vault, Opener(private).public_key)
    with edit_vault(vault) as doc:
        set_secret(doc, "bench", "openai", Secret(_UPSTREAM_KEY))
        token = add_access_key(doc, "bench")
    return token.reveal()


def _write_sidecar_config(
    path: Path, port: int, admin: int, mock_port: int, access_log: bool
) -> None:
    path.write_text(
        f"listen: 127.0.0.1:{port}\n"
        f"admin_listen: 127.0.0.1:{admin}\n"
        "vault: {path: vault.json, private_key_file: sidecar.key}\n"
        f"log: {{level: warning, access_log: {'true' if access_log else 'false'}}}\n"
        "providers:\n"
        "  - id: openai\n"
        f"    base_url: http://127.0.0.1:{mock_port}/v1\n"
        "    api_keys:\n"
        "      - id: bench\n"
        "        value: \"${secrets.get('bench', 'openai')}\"\n"
    )


@dataclass(frozen=True, slots=True)
class Target:
    """What the load generator hits, and whose CPU time it samples while doing so."""

    name: str
    url: str
    token: str
    servers: tuple[Server, ...]  # the proxy first (if any), then the mock


@dataclass(slots=True)
class Fleet:
    servers: list[Server] = field(default_factory=list)

    def check_alive(self) -> None:
        for server in self.servers:
            if server.proc.poll() is not None:
                raise StartError(f"{server.name} stopped with status {server.proc.returncode} "
                                 f"while measuring:\n{server.tail()}")  # fmt: skip

    def stop(self) -> None:
        for server in reversed(self.servers):  # proxies before the mock they talk to
            server.stop()


async def start_fleet(
    session: aiohttp.ClientSession, fleet: Fleet, workdir: Path
) -> dict[str, Target]:
    mock_port, pass_port = _free_port(), _free_port()
    mock = _spawn("mock", [sys.executable, "-c", _MOCK_BOOT, "mock-provider", "--listen",
                           f"127.0.0.1:{mock_port}"], workdir,
                  f"http://127.0.0.1:{mock_port}/_mock/health")  # fmt: skip
    fleet.servers.append(mock)
    passthrough = _spawn("pass-through", [sys.executable, "-m", "bench.passthrough", "--listen",
                                          f"127.0.0.1:{pass_port}", "--upstream",
                                          f"http://127.0.0.1:{mock_port}"], workdir,
                         f"http://127.0.0.1:{pass_port}/_bench/health",
                         env={"BENCH_UPSTREAM_KEY": _UPSTREAM_KEY})  # fmt: skip
    fleet.servers.append(passthrough)
    access_key = _write_sidecar_env(workdir)
    sidecars: dict[bool, tuple[Server, int]] = {}
    for access_log in (False, True):
        port, admin = _free_port(), _free_port()
        config = workdir / f"sidecar{'-log' if access_log else ''}.yaml"
        _write_sidecar_config(config, port, admin, mock_port, access_log)
        name = "sidecar+access-log" if access_log else "sidecar"
        # The sidecar's access log is on stdout: discarded, but still formatted and written.
        server = _spawn(name, [sys.executable, "-m", "sidecar", "serve", "--config", str(config)],
                        workdir, f"http://127.0.0.1:{admin}/readyz")  # fmt: skip
        fleet.servers.append(server)
        sidecars[access_log] = (server, port)
    for server in fleet.servers:
        await _wait_ready(session, server)
    (plain, plain_port), (logged, logged_port) = sidecars[False], sidecars[True]
    targets = [
        Target("direct", f"http://127.0.0.1:{mock_port}{_PATH}", _UPSTREAM_KEY, (mock,)),
        Target("pass-through", f"http://127.0.0.1:{pass_port}{_PATH}", _UPSTREAM_KEY,
               (passthrough, mock)),
        Target("sidecar", f"http://127.0.0.1:{plain_port}{_PATH}", access_key, (plain, mock)),
        Target("sidecar+log", f"http://127.0.0.1:{logged_port}{_PATH}", access_key, (logged, mock)),
    ]  # fmt: skip
    return {t.name: t for t in targets}


# --------------------------------------------------------------------------- load


@dataclass(slots=True)
class Round:
    """One round of one target and mode: what completed inside the measured window."""

    window: float
    latencies: list[float] = field(default_factory=list)
    ttfb: list[float] = field(default_factory=list)
    overhead_ms: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    cpu: dict[str, float] = field(default_factory=dict)  # process name -> CPU seconds in window

    @property
    def ok(self) -> int:
        return len(self.latencies)

    @property
    def rps(self) -> float:
        return self.ok / self.window

    @property
    def error_rate(self) -> float:
        total = self.ok + sum(self.errors.values())
        return sum(self.errors.values()) / total if total else 1.0


def _pct(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def _machine_busy_seconds() -> float | None:
    """CPU time all processes on the machine spent busy (Linux), summed over cores."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return (sum(ticks[:8]) - idle) / _CLK_TCK  # guest time is already inside user


def _cpu_snapshot(target: Target) -> dict[str, float | None]:
    snap: dict[str, float | None] = {s.name: s.cpu_seconds() for s in target.servers}
    snap["load"] = time.process_time()
    snap["machine"] = _machine_busy_seconds()
    return snap


async def drive(session: aiohttp.ClientSession, target: Target, mode: str, *,
                concurrency: int, warmup: float, duration: float) -> Round:  # fmt: skip
    """Closed-loop load: `concurrency` workers, each sending its next request as soon as one ends."""
    stream = mode == "stream"
    body = _BODIES[mode]
    headers = {"Authorization": f"Bearer {target.token}", "Content-Type": "application/json"}
    clock = time.perf_counter
    t0 = clock() + warmup
    t1 = t0 + duration
    result = Round(duration)
    lat, ttfb, overhead, errors = result.latencies, result.ttfb, result.overhead_ms, result.errors

    async def worker() -> None:
        while (start := clock()) < t1:
            first = start
            status, tail, problem = 0, b"", ""
            try:
                async with session.post(target.url, data=body, headers=headers) as resp:
                    status = resp.status
                    sidecar_overhead = resp.headers.get("x-sidecar-overhead-ms")
                    if stream:
                        first = 0.0
                        async for chunk in resp.content.iter_any():
                            if not first:
                                first = clock()
                            tail = chunk
                    else:
                        await resp.read()
            except (aiohttp.ClientError, TimeoutError) as exc:
                problem = type(exc).__name__
            end = clock()
            if not t0 <= end <= t1:
                continue
            if not problem and status != 200:
                problem = f"HTTP {status}"
            if not problem and stream and not tail.endswith(b"data: [DONE]\n\n"):
                problem = "stream without [DONE]"
            if problem:
                errors[problem] += 1
                continue
            lat.append(end - start)
            if stream:
                ttfb.append(first - start)
            if sidecar_overhead is not None:
                overhead.append(float(sidecar_overhead))

    async def sample_cpu() -> None:
        await asyncio.sleep(max(0.0, t0 - clock()))
        before = _cpu_snapshot(target)
        await asyncio.sleep(max(0.0, t1 - clock()))
        after = _cpu_snapshot(target)
        for name, value in after.items():
            was = before.get(name)
            if value is not None and was is not None:
                result.cpu[name] = value - was
        if "machine" in result.cpu:
            # Everything else on the machine: other tenants compete with all three of ours.
            ours = sum(v for k, v in result.cpu.items() if k != "machine")
            result.cpu["other"] = max(0.0, result.cpu.pop("machine") - ours)

    await asyncio.gather(sample_cpu(), *(worker() for _ in range(concurrency)))
    lat.sort()
    ttfb.sort()
    overhead.sort()
    return result


async def smoke(session: aiohttp.ClientSession, target: Target) -> str | None:
    """One request per mode before the load; a problem here is a setup failure."""
    headers = {"Authorization": f"Bearer {target.token}", "Content-Type": "application/json"}
    for mode, body in _BODIES.items():
        try:
            async with session.post(target.url, data=body, headers=headers) as resp:
                text = await resp.read()
                if resp.status != 200:
                    return f"{target.name} {mode}: HTTP {resp.status}: {text[:300]!r}"
                if mode == "stream" and not text.endswith(b"data: [DONE]\n\n"):
                    return f"{target.name} {mode}: stream without [DONE]: {text[-300:]!r}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            return f"{target.name} {mode}: {type(exc).__name__}: {exc}"
    return None


# --------------------------------------------------------------------------- report


@dataclass(slots=True)
class Summary:
    """Medians over the rounds of one target and mode."""

    rounds: list[Round]

    def _med(self, values: Iterator[float]) -> float:
        vals = [v for v in values if v == v]
        return statistics.median(vals) if vals else float("nan")

    @property
    def rps(self) -> float:
        return self._med(r.rps for r in self.rounds)

    @property
    def spread(self) -> float:
        rates = [r.rps for r in self.rounds]
        return (max(rates) - min(rates)) / self.rps if len(rates) > 1 and self.rps else _NAN

    def p(self, q: float) -> float:
        return self._med(_pct(r.latencies, q) * 1000 for r in self.rounds)

    @property
    def ttfb50(self) -> float:
        return self._med(_pct(r.ttfb, 0.5) * 1000 for r in self.rounds)

    @property
    def overhead50(self) -> float:
        return self._med(_pct(r.overhead_ms, 0.5) for r in self.rounds)

    def cpu_us_per_req(self, name: str) -> float:
        return self._med(r.cpu[name] / r.ok * 1e6 for r in self.rounds if name in r.cpu and r.ok)

    def cpu_pct(self, name: str) -> float:
        return self._med(r.cpu[name] / r.window * 100 for r in self.rounds if name in r.cpu)


def _num(value: float, width: int, spec: str = ".2f") -> str:
    """`value` right-aligned in `width` ("-" for NaN); `spec` is a format type like `.2f` or `+.2f`."""
    if value != value:
        return f"{'-':>{width}}"
    sign, rest = ("+", spec[1:]) if spec.startswith("+") else ("", spec)
    return f"{value:>{sign}{width}{rest}}"


def _cpu_text(s: Summary, names: Sequence[str | None]) -> str:
    parts = []
    for name in names:
        pct = s.cpu_pct(name) if name is not None else float("nan")
        parts.append("-" if pct != pct else f"{pct:.0f}")
    return "/".join(parts)


def print_loaded(results: dict[tuple[str, str], Summary], targets: dict[str, Target]) -> None:
    print(f"{'mode':<11}{'target':<14}{'req/s':>7}{'spread':>7}{'p50 ms':>8}{'p99 ms':>8}"
          f"{'ttfb p50':>9}{'+p50 vs':>9}{'+p50 vs':>9}{'proxy CPU':>11}  CPU % of a core")  # fmt: skip
    print(f"{'':<11}{'':<14}{'':>7}{'':>7}{'':>8}{'':>8}{'':>9}{'direct':>9}{'pass':>9}"
          f"{'µs/req':>11}  gen/proxy/mock/other")  # fmt: skip
    for mode in _MODES:
        direct = results.get((mode, "direct"))
        ceiling = results.get((mode, "pass-through"))
        for name in ("direct", "pass-through", "sidecar", "sidecar+log"):
            s = results.get((mode, name))
            if s is None:
                continue
            servers = targets[name].servers
            proxy = servers[0].name if len(servers) > 1 else None
            p50 = s.p(0.5)
            vs_direct = p50 - direct.p(0.5) if direct and name != "direct" else _NAN
            vs_pass = p50 - ceiling.p(0.5) if ceiling and name.startswith("sidecar") else _NAN
            label = name + ("¹" if name == "sidecar+log" else "")
            spread = f"{s.spread * 100:>6.0f}%" if s.spread == s.spread else f"{'-':>7}"
            print(f"{mode:<11}{label:<14}{_num(s.rps, 7, '.0f')}{spread}"
                  f"{_num(p50, 8)}{_num(s.p(0.99), 8)}"
                  f"{_num(s.ttfb50 if mode == 'stream' else _NAN, 9)}{_num(vs_direct, 9, '+.2f')}"
                  f"{_num(vs_pass, 9, '+.2f')}"
                  f"{_num(s.cpu_us_per_req(proxy) if proxy else _NAN, 11, '.0f')}  "
                  f"{_cpu_text(s, ('load', proxy, 'mock', 'other'))}")  # fmt: skip
    print(
        "spread: (max - min) / median of the rounds' req/s; ¹ one round, access log on; "
        "other: every other process on the machine"
    )


def print_unloaded(results: dict[tuple[str, str], Summary]) -> None:
    print("\nunloaded, one request in flight: p50 ms")
    print(f"{'mode':<11}{'direct':>8}{'pass':>8}{'sidecar':>9}{'sidecar-direct':>16}"
          f"{'sidecar-pass':>14}   x-sidecar-overhead-ms p50")  # fmt: skip
    for mode in _MODES:
        d, p, s = (results.get((mode, n)) for n in ("direct", "pass-through", "sidecar"))
        if d is None or p is None or s is None:
            continue
        print(f"{mode:<11}{_num(d.p(0.5), 8, '.3f')}{_num(p.p(0.5), 8, '.3f')}"
              f"{_num(s.p(0.5), 9, '.3f')}{_num(s.p(0.5) - d.p(0.5), 16, '+.3f')}"
              f"{_num(s.p(0.5) - p.p(0.5), 14, '+.3f')}   {_num(s.overhead50, 7, '.3f')}")  # fmt: skip


# --------------------------------------------------------------------------- main


@dataclass(frozen=True, slots=True)
class Settings:
    duration: float
    warmup: float
    concurrency: int
    rounds: int
    unloaded: float


async def bench(settings: Settings, fleet: Fleet) -> int:
    """Start the servers into `fleet`, measure, print; the caller stops the fleet."""
    task = asyncio.current_task()
    if task is not None:  # SIGTERM ends the run like Ctrl-C: cancelled, servers stopped
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=60)
    async with aiohttp.ClientSession(
        connector=connector, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=30),
    ) as session:  # fmt: skip
        with tempfile.TemporaryDirectory(prefix="sidecar-bench-") as tmp:
            try:
                started = time.monotonic()
                try:
                    targets = await start_fleet(session, fleet, Path(tmp))
                except StartError as exc:
                    print(f"error: {exc}", file=sys.stderr)
                    return 1
                for target in targets.values():
                    problem = await smoke(session, target)
                    if problem is not None:
                        print(f"error: smoke request failed: {problem}", file=sys.stderr)
                        return 1
                return await _measure(session, targets, settings, started, fleet)
            except StartError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
            finally:
                fleet.stop()


def _paired(a: list[Round], b: list[Round]) -> list[float]:
    """rps(a) / rps(b) of the rounds run back to back (same index), so both saw the same machine."""
    return [x.rps / y.rps for x, y in zip(a, b, strict=False) if y.rps]


def _ratio_text(ratios: list[float]) -> str:
    if not ratios:
        return "-"
    med = statistics.median(ratios)
    if len(ratios) == 1:
        return f"{med:.2f}"
    return f"{med:.2f} [{min(ratios):.2f}-{max(ratios):.2f}]"


async def _measure(session: aiohttp.ClientSession, targets: dict[str, Target], settings: Settings,
                   started: float, fleet: Fleet) -> int:  # fmt: skip
    s = settings
    order = ["direct", "pass-through", "sidecar"]
    loaded: dict[tuple[str, str], list[Round]] = {}
    print(f"# {os.cpu_count()} CPUs; concurrency {s.concurrency}; {s.rounds} round(s) of "
          f"{s.duration:g} s per target and mode (after {s.warmup:g} s warm-up, then "
          f"{min(s.warmup, _REWARM):g} s); OpenAI chat completions; access log off unless named",
          flush=True)  # fmt: skip
    warmed: set[tuple[str, str]] = set()

    async def one(name: str, mode: str, concurrency: int, duration: float) -> Round:
        first = (name, mode) not in warmed
        warmed.add((name, mode))
        warmup = s.warmup if first else min(s.warmup, _REWARM)
        r = await drive(session, targets[name], mode, concurrency=concurrency, warmup=warmup,
                        duration=duration)  # fmt: skip
        fleet.check_alive()
        print(f"  c={concurrency:<3} {mode:<10} {name:<13} {r.rps:>7.0f} req/s"
              + (f"  errors: {dict(r.errors)}" if r.errors else ""), file=sys.stderr, flush=True)  # fmt: skip
        return r

    for i in range(s.rounds):
        print(f"round {i + 1}/{s.rounds}", file=sys.stderr, flush=True)
        rotated = order[i % 3 :] + order[: i % 3]
        for mode in _MODES:
            for name in rotated:
                r = await one(name, mode, s.concurrency, s.duration)
                loaded.setdefault((mode, name), []).append(r)
    # The access log's cost: one round with it on, paired with a sidecar round right after.
    logged: dict[str, tuple[Round, Round]] = {}
    for mode in _MODES:
        on = await one("sidecar+log", mode, s.concurrency, s.duration)
        loaded[(mode, "sidecar+log")] = [on]
        logged[mode] = (on, await one("sidecar", mode, s.concurrency, s.duration))
    unloaded: dict[tuple[str, str], list[Round]] = {}
    if s.unloaded > 0:
        for i in range(2):
            for mode in _MODES:
                for name in order if i == 0 else order[::-1]:
                    r = await one(name, mode, 1, s.unloaded / 2)
                    unloaded.setdefault((mode, name), []).append(r)

    loaded_s = {k: Summary(v) for k, v in loaded.items()}
    print()
    print_loaded(loaded_s, targets)
    if unloaded:
        print_unloaded({k: Summary(v) for k, v in unloaded.items()})
    print()
    log_cost = [f"{m} {_ratio_text(_paired([on], [off]))}" for m, (on, off) in logged.items()]
    print(f"access log on ÷ off (sidecar, 1 paired round): {', '.join(log_cost)}")
    cpu_ratios = []
    for mode in _MODES:
        side = loaded_s[(mode, "sidecar")].cpu_us_per_req("sidecar")
        ceiling = loaded_s[(mode, "pass-through")].cpu_us_per_req("pass-through")
        cpu_ratios.append(f"{mode} {ceiling / side:.2f}" if side == side and side else f"{mode} -")
    print(f"proxy CPU per request, pass-through ÷ sidecar: {', '.join(cpu_ratios)}")
    others = [
        r.cpu["other"] / r.window * 100 for rs in loaded.values() for r in rs if "other" in r.cpu
    ]
    if others and statistics.median(others) > 20:
        print(f"# note: other processes on this machine used {statistics.median(others):.0f}% "
              "of a core (median) while measuring: expect noise; the ratios pair rounds "
              "run back to back")  # fmt: skip
    print(f"# {time.monotonic() - started:.0f} s")
    ratios = [
        f"{m} {_ratio_text(_paired(loaded[(m, 'sidecar')], loaded[(m, 'pass-through')]))}"
        for m in _MODES
    ]
    print(f"sidecar/pass-through throughput ratio: {', '.join(ratios)} "
          f"(target >= {TARGET_RATIO:.2f}; median of rounds [min-max])")  # fmt: skip

    failed = 0
    for (mode, name), rounds in sorted({**loaded, **unloaded}.items()):
        for r in rounds:
            if r.error_rate > MAX_ERROR_RATE:
                failed += 1
                print(f"error: {name} {mode}: {r.error_rate:.1%} of requests failed: "
                      f"{dict(r.errors)}", file=sys.stderr)  # fmt: skip
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--duration", type=float, default=1.5,
                   help="measured seconds per target, mode and round (1.5)")  # fmt: skip
    p.add_argument("--warmup", type=float, default=1.0,
                   help=f"unmeasured seconds before a target's first round ({_REWARM:g} later) (1)")  # fmt: skip
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight (32)")
    p.add_argument("--rounds", type=int, default=5,
                   help="rounds of direct, pass-through and sidecar, alternating (5)")  # fmt: skip
    p.add_argument("--unloaded", type=float, default=1.0,
                   help="seconds per target and mode with one request in flight; 0 skips (1)")  # fmt: skip
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 1 round of 1 s per target and mode (about 20 s in all)")  # fmt: skip
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.warmup, args.rounds, args.unloaded = 1.0, 0.3, 1, 0.4
    if args.duration <= 0 or args.warmup < 0 or args.concurrency < 1 or args.rounds < 1:
        p.error("--duration and --rounds must be positive, --concurrency at least 1")
    settings = Settings(args.duration, args.warmup, args.concurrency, args.rounds, args.unloaded)
    fleet = Fleet()
    try:
        return uvloop.run(bench(settings, fleet))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        fleet.stop()


if __name__ == "__main__":
    raise SystemExit(main())
