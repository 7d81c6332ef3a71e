"""CPU time per request of two proxies loaded at the same moment: a ratio without the host's drift.

`make bench` loads one proxy, then the other, taking turns second by second. On a shared
virtual machine the host's speed moves from one second to the next, so the two proxies'
seconds still see different machines and a round's ratio moves by several percent. Here two proxies are
loaded at once, by one wrk each, for `--seconds`, both on the same core (the mocks and the
wrks on the other), so whatever the host does in that moment it does to both. Each round
gives each one's CPU ms per completed request (user + system time from /proc/<pid>/stat, as
`make bench` reads it) and their ratio; the report gives the median over `--rounds` and the
range. Its rounds agree to within a few percent.

- By default: the pass-through and the sidecar. Sharing a core, each process evicts the
  other's data from the core's caches, which costs the one with more code and data in play
  (the sidecar) more: this ratio comes out above `make bench`'s and well above the
  instruction count's (`bench.instructions`).
- `--against PATH`: the sidecar of another checkout and this one's, each with a mock of its
  own. Two processes of the same kind suffer alike, so this is the fair way to tell whether
  a change made the sidecar cheaper in CPU time, to within a few percent.

    python -m bench.paired [--mode json,stream] [--rounds 8] [--seconds 3] [--tree PATH]
    python -m bench.paired --against ../before-the-change

Needs wrk. See bench/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench import run


@dataclass(frozen=True, slots=True)
class Round:
    """One round of one mode: each proxy's CPU ms per request, both loaded at once."""

    mode: str
    base_ms: float  # the pass-through, or the sidecar `--against` names
    sidecar_ms: float  # this tree's sidecar

    @property
    def ratio(self) -> float:
        return self.sidecar_ms / self.base_ms if self.base_ms > 0 else float("nan")


def report(rounds: list[Round], seconds: int, connections: int, base: str) -> list[str]:
    """Per mode: the medians of both proxies' CPU ms per request, and of the ratio, with its
    range. `base`: what the sidecar is divided by."""
    lines = [
        f"SIDE BY SIDE: two proxies loaded at once (wrk -t1 -c{connections} each, {seconds} s a "
        "round, both on one core); proxy CPU ms per request, median over rounds:",
        f"{'mode':<8}{'rounds':>7}{base:>14}{'sidecar':>9}  sidecar ÷ {base} (range)",
    ]
    for mode in dict.fromkeys(r.mode for r in rounds):
        mine = [r for r in rounds if r.mode == mode]
        ratios = [r.ratio for r in mine]
        b = statistics.median(r.base_ms for r in mine)
        sc = statistics.median(r.sidecar_ms for r in mine)
        lines.append(f"{mode:<8}{len(mine):>7}{b:>14.3f}{sc:>9.3f}  "
                     f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})")  # fmt: skip
    return lines


def _load_both(wrk: str, pair: tuple[run.Target, run.Target], mode: str, seconds: int,
               connections: int, cores: run.Cores) -> tuple[float, float]:  # fmt: skip
    """Both proxies under one wrk each for `seconds`: each one's CPU ms per completed request."""
    before = [_cpu(target) for target in pair]
    procs: list[subprocess.Popen[bytes]] = []
    for target in pair:
        argv, env = run.wrk_command(wrk, target, mode, seconds, 1, connections, cores)
        procs.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, env=env))  # fmt: skip
    done: list[int] = []
    try:
        for target, proc in zip(pair, procs, strict=True):
            try:
                out, err = proc.communicate(timeout=seconds + 60)
            except subprocess.TimeoutExpired:
                raise run.BenchError(f"wrk did not finish within {seconds + 60} s") from None
            result = run.parse_wrk(out.decode(errors="replace"), err.decode(errors="replace"))
            errors = sum(run.wrk_errors(result).values())
            done.append(int(result["requests"]))
            if done[-1] == 0 or errors > run.MAX_ERROR_RATE * done[-1]:
                raise run.BenchError(f"{target.name} {mode}: {done[-1]} requests, {errors} errors")
    finally:  # neither wrk outlives a failed round
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    time.sleep(0.2)  # the last answers' CPU
    base, sidecar = ((_cpu(t) - b) * 1000 / n for t, b, n in zip(pair, before, done, strict=True))
    return base, sidecar


def _cpu(target: run.Target) -> float:
    assert target.proxy is not None
    seconds = target.proxy.cpu_seconds()
    if seconds is None:
        raise run.BenchError("CPU time is read from /proc: Linux only")
    return seconds


def measure(args: argparse.Namespace, tree: run.Tree, fleet: run.Fleet) -> list[Round]:
    wrk = run.find_wrk()
    cores = run.Cores.choose(pin=True)
    if cores.server is None:
        raise run.BenchError("two proxies on one core, the load on the other: this needs two "
                             "cores and taskset (util-linux)")  # fmt: skip
    rounds: list[Round] = []
    with tempfile.TemporaryDirectory(prefix="sidecar-paired-") as tmp:
        try:
            pair = _start(args, tree, fleet, cores, Path(tmp))
            for target in pair:
                run.smoke(target, run.smoke_modes(args.mode))
                assert target.proxy is not None
                run.pin(target.proxy.proc.pid, cores.server)  # both on the one core
            for mode in args.mode:
                _load_both(wrk, pair, mode, args.warmup, args.connections, cores)
                for i in range(args.rounds):
                    r = Round(mode, *_load_both(wrk, pair, mode, args.seconds, args.connections, cores))
                    rounds.append(r)
                    print(f"  {mode:<8}round {i + 1}/{args.rounds}: {pair[0].name} {r.base_ms:.3f}"
                          f"  sidecar {r.sidecar_ms:.3f} ms/req  {r.ratio:.2f}x",
                          file=sys.stderr, flush=True)  # fmt: skip
        finally:
            fleet.stop()
    return rounds


def _start(args: argparse.Namespace, tree: run.Tree, fleet: run.Fleet, cores: run.Cores,
           workdir: Path) -> tuple[run.Target, run.Target]:  # fmt: skip
    """The base (the pass-through, or the sidecar `--against` names) and the sidecar."""
    if args.against is None:
        both = run.start_fleet(fleet, ("pass-through", "sidecar"), tree, cores, workdir, args.mode)
        return both["pass-through"], both["sidecar"]
    (workdir / "base").mkdir()
    (workdir / "this").mkdir()
    base = run.start_fleet(fleet, ("sidecar",), run.Tree.at(args.against), cores,
                           workdir / "base", args.mode)["sidecar"]  # fmt: skip
    this = run.start_fleet(fleet, ("sidecar",), tree, cores, workdir / "this", args.mode)["sidecar"]
    return dataclasses.replace(base, name=f"sidecar of {args.against}"), this


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.paired", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--rounds", type=int, default=8, help="rounds per mode (8)")
    p.add_argument("--seconds", type=int, default=3, help="seconds per round (3)")
    p.add_argument("--warmup", type=int, default=2, help="uncounted seconds first, per mode (2)")
    p.add_argument("--connections", type=int, default=16, help="wrk -c, for each proxy (16)")
    p.add_argument("--mode", default="both", type=run.parse_modes,
                   help="comma-separated, from json, stream, xjson, xstream, both, all (both)")  # fmt: skip
    p.add_argument("--tree", type=Path, metavar="PATH",
                   help="the sidecar of another checkout (its .venv if it has one)")  # fmt: skip
    p.add_argument("--against", type=Path, metavar="PATH",
                   help="divide by that checkout's sidecar, not by the pass-through")  # fmt: skip
    a = p.parse_args(argv)
    if a.rounds < 1 or a.seconds < 1 or a.warmup < 1 or a.connections < 1:
        p.error("--rounds, --seconds, --warmup and --connections at least 1")
    return a


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    base = "pass-through" if args.against is None else "before"
    return run.guarded_report(lambda fleet: report(measure(args, run.Tree.at(args.tree), fleet),
                                                   args.seconds, args.connections, base))  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
