"""Instructions per request of each proxy under wrk, counted by valgrind (callgrind).

CPU time per request (`python -m bench.run`) is what a request costs, but on a shared
virtual machine it moves with the host: the same CPU-bound loop can take 270 ms in one
second and 410 ms in the next, so two 5 s runs of the same code differ by 20% or more.
An instruction count does not move with the machine's speed. This part runs the
pass-through and the sidecar as `bench.run` does (same processes, config, mock, wrk
script; wrk -t1), each inside `valgrind --tool=callgrind`, and counts the instructions each
proxy process executes per completed request:

1. both proxies start under callgrind (tens of seconds: valgrind runs them ~50x slower);
2. per mode, each proxy gets `--warmup` s of wrk, then its counters are zeroed
   (`callgrind_control --zero`), wrk runs `--seconds` s, the counters are dumped
   (`callgrind_control --dump`) and the dump's total is divided by wrk's completed requests.

Kernel time (system calls, the TCP stack) is not counted, only what the process itself
executes. Requests wrk cut off at the end are counted in instructions but not in requests
(a few of a thousand or more, alike for both proxies).

    python -m bench.instructions [--mode json,stream] [--seconds 20] [--tree PATH]

Needs `valgrind` (Debian/Ubuntu: `sudo apt-get install -y valgrind`) and wrk. See
bench/README.md.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from bench import run

TARGETS: Final = ("pass-through", "sidecar")
_START_TIMEOUT: Final = 300.0  # under valgrind a proxy takes tens of seconds to start
_DUMP_TIMEOUT: Final = 60.0
#: At most this many instructions between zeroing the counters and a dump taken at once: a
#: zero that did not happen shows the start and the warm-up (billions).
_ZEROED_MAX: Final = 200_000_000


@dataclass(frozen=True, slots=True)
class Count:
    """One proxy's count in one mode."""

    mode: str
    target: str
    requests: int
    instructions: int

    @property
    def per_request(self) -> float:
        return self.instructions / self.requests if self.requests else float("nan")


def total_instructions(dump: str) -> int | None:
    """The instructions (`Ir`, the first event) of a callgrind dump: its `totals:` line, or
    its `summary:` line; None when it has neither."""
    found: int | None = None
    for line in dump.splitlines():
        if line.startswith(("totals:", "summary:")):
            fields = line.split()
            if len(fields) >= 2 and fields[1].isdigit():
                found = int(fields[1])
                if line.startswith("totals:"):
                    return found
    return found


def latest_dump(workdir: Path, pid: int) -> Path | None:
    """The newest dump callgrind wrote for `pid` (`callgrind.<pid>`, `callgrind.<pid>.N`)."""
    name = f"callgrind.{pid}"
    dumps = [p for p in workdir.glob(f"{name}*") if p.name == name or p.name.startswith(name + ".")]
    return max(dumps, key=lambda p: p.stat().st_mtime_ns) if dumps else None


def report(counts: list[Count], seconds: int, connections: int, warmup: int) -> list[str]:
    """The table: instructions per request of each proxy per mode, and sidecar ÷ pass-through."""
    title = (f"INSTRUCTIONS per request, counted by callgrind in each proxy process (wrk "
             f"-c{connections} for {seconds} s after {warmup} s warm-up, per target and mode; "
             "the process's own work, not the kernel's):")  # fmt: skip
    lines = [
        title,
        f"{'mode':<8}{'target':<15}{'requests':>9}{'instr/req':>12}  sidecar ÷ pass-through",
    ]
    base = {c.mode: c.per_request for c in counts if c.target == "pass-through"}
    for c in counts:
        ratio = ""
        if c.target != "pass-through" and c.mode in base and base[c.mode] > 0:
            ratio = f"{c.per_request / base[c.mode]:.2f}x"
        lines.append(f"{c.mode:<8}{c.target:<15}{c.requests:>9}{c.per_request:>12,.0f}  {ratio}")
    return lines


def _control(tool: str, flag: str, pid: int) -> None:
    """`callgrind_control --zero|--dump PID`. It exits 0 even when it found no such callgrind
    run, so what it printed is checked too."""
    try:
        done = subprocess.run([tool, flag, str(pid)], capture_output=True, timeout=_DUMP_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise run.BenchError(
            f"{tool} {flag} {pid} did not finish in {_DUMP_TIMEOUT:.0f} s"
        ) from None
    said = (done.stdout + done.stderr).decode(errors="replace")
    if done.returncode != 0 or not control_worked(said):
        raise run.BenchError(f"{tool} {flag} {pid} failed: {said.strip()}")


def control_worked(output: str) -> bool:
    """Whether `callgrind_control` reached the process: it says so only in words."""
    return "not detected" not in output and "No active callgrind runs" not in output


def measure(args: argparse.Namespace, tree: run.Tree, fleet: run.Fleet) -> list[Count]:
    valgrind, control = shutil.which("valgrind"), shutil.which("callgrind_control")
    if valgrind is None or control is None:
        raise run.BenchError("valgrind is missing: install it (Debian/Ubuntu: `sudo apt-get "
                             "install -y valgrind`) and run again")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="sidecar-instr-") as tmp:
        try:
            return _count(args, tree, fleet, Path(tmp), valgrind, control)
        finally:
            fleet.stop()  # while its directory is still there: callgrind dumps once more on exit


def _count(args: argparse.Namespace, tree: run.Tree, fleet: run.Fleet, workdir: Path,
           valgrind: str, control: str) -> list[Count]:  # fmt: skip
    wrk = run.find_wrk()
    cores = run.Cores.choose(pin=True)
    settings = run.Settings(args.seconds, args.warmup, args.connections, 1, 1, TARGETS, args.mode)
    counts: list[Count] = []
    wrap = [valgrind, "--tool=callgrind", f"--callgrind-out-file={workdir}/callgrind.%p"]
    targets = run.start_fleet(fleet, TARGETS, tree, cores, workdir, args.mode, wrap=wrap,
                              start_timeout=_START_TIMEOUT)  # fmt: skip
    for mode in args.mode:
        for name in TARGETS:
            target = targets[name]
            assert target.proxy is not None
            pid = target.proxy.proc.pid
            print(f"  {mode:<8}{name:<15}warm-up {args.warmup} s, then {args.seconds} s",
                  file=sys.stderr, flush=True)  # fmt: skip
            if args.warmup:
                run.run_wrk(wrk, fleet, target, mode, args.warmup, settings, cores)
            _control(control, "--zero", pid)
            # callgrind_control says OK whatever happened: a dump at once shows the zero
            if _dumped(control, workdir, pid, name) > _ZEROED_MAX:
                raise run.BenchError(f"{name}: callgrind did not zero its counters")
            sample = run.run_wrk(wrk, fleet, target, mode, args.seconds, settings, cores)
            total = _dumped(control, workdir, pid, name)
            if sample.error_rate > run.MAX_ERROR_RATE:
                raise run.BenchError(f"{name} {mode}: wrk saw errors {sample.errors}")
            counts.append(Count(mode, name, sample.requests, total))
    return counts


def _dumped(control: str, workdir: Path, pid: int, name: str) -> int:
    """Dump `pid`'s counters and read the instructions since the last zero or dump."""
    _control(control, "--dump", pid)
    dump = latest_dump(workdir, pid)
    total = None
    if dump is not None:
        total = total_instructions(dump.read_text())
        dump.unlink()  # the next count is read from the next dump
    if total is None:
        raise run.BenchError(f"{name}: callgrind wrote no count for process {pid}")
    return total


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--seconds", type=int, default=20,
                   help="counted seconds of wrk per target and mode (20)")  # fmt: skip
    p.add_argument("--warmup", type=int, default=5,
                   help="uncounted seconds of wrk before each count (5)")  # fmt: skip
    p.add_argument("--connections", type=int, default=8, help="wrk -c (8)")
    p.add_argument(
        "--mode",
        default="both",
        type=run.parse_modes,
        help="comma-separated, from json, stream, xjson, xstream, both, all (both)",
    )
    p.add_argument(
        "--tree",
        type=Path,
        metavar="PATH",
        help="count the sidecar of another checkout (its .venv if it has one)",
    )
    a = p.parse_args(argv)
    if a.seconds < 1 or a.warmup < 0 or a.connections < 1:
        p.error("--seconds and --connections at least 1, --warmup not negative")
    return a


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run.guarded_report(lambda fleet: report(measure(args, run.Tree.at(args.tree), fleet),
                                                   args.seconds, args.connections, args.warmup))  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
