"""bench/instructions.py's pure helpers: reading a callgrind dump's total, finding a process's
newest dump, the report's ratios, and the arguments; no valgrind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench import instructions
from bench.instructions import Count

# The head and tail of a real callgrind dump (valgrind 3.19, `--tool=callgrind`).
_DUMP = """\
# callgrind format
version: 1
creator: callgrind-3.19.0
pid: 4242
cmd:  /usr/bin/python3 -m bench.passthrough
part: 1

desc: I1 cache:
positions: line
events: Ir
summary: 1154358000

ob=(1) /usr/lib/x86_64-linux-gnu/libc.so.6
fl=(1) ???
fn=(1) 0x0000000000027200
0 3
totals: 1154359000
"""


def test_the_total_is_the_totals_line_and_else_the_summary() -> None:
    assert instructions.total_instructions(_DUMP) == 1154359000
    without_totals = "\n".join(line for line in _DUMP.splitlines() if not line.startswith("totals"))
    assert instructions.total_instructions(without_totals) == 1154358000


@pytest.mark.parametrize("text", ["", "events: Ir\n", "summary:\n", "totals: many\n"])
def test_a_dump_without_a_count_has_no_total(text: str) -> None:
    assert instructions.total_instructions(text) is None


def test_the_newest_dump_of_the_process_is_read(tmp_path: Path) -> None:
    assert instructions.latest_dump(tmp_path, 4242) is None
    first, second = tmp_path / "callgrind.4242", tmp_path / "callgrind.4242.1"
    other, longer = tmp_path / "callgrind.999", tmp_path / "callgrind.42421"
    for n, path in enumerate((first, second, other, longer)):
        path.write_text(_DUMP)
        os.utime(path, ns=(n * 10**9, n * 10**9))
    assert instructions.latest_dump(tmp_path, 4242) == second
    os.utime(first, ns=(5 * 10**9, 5 * 10**9))
    assert instructions.latest_dump(tmp_path, 4242) == first


def test_the_report_gives_each_sidecar_its_ratio_to_the_pass_through_of_its_mode() -> None:
    counts = [
        Count("json", "pass-through", 1000, 500_000_000),
        Count("json", "sidecar", 800, 480_000_000),
        Count("stream", "pass-through", 500, 350_000_000),
        Count("stream", "sidecar", 400, 392_000_000),
    ]
    lines = instructions.report(counts, seconds=20, connections=8, warmup=5)
    assert "wrk -c8 for 20 s after 5 s warm-up" in lines[0]
    rows = {tuple(line.split()[:2]): line.split()[2:] for line in lines[2:]}
    assert rows[("json", "pass-through")] == ["1000", "500,000"]
    assert rows[("json", "sidecar")] == ["800", "600,000", "1.20x"]
    assert rows[("stream", "pass-through")] == ["500", "700,000"]
    assert rows[("stream", "sidecar")] == ["400", "980,000", "1.40x"]


def test_a_sidecar_without_a_pass_through_count_gets_no_ratio() -> None:
    lines = instructions.report([Count("json", "sidecar", 10, 1000)], 1, 1, 0)
    assert lines[2].split() == ["json", "sidecar", "10", "100"]


@pytest.mark.parametrize("argv", [["--seconds", "0"], ["--warmup", "-1"], ["--connections", "0"]])
def test_arguments_out_of_range_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        instructions.parse_args(argv)


def test_the_defaults_count_both_modes() -> None:
    args = instructions.parse_args([])
    assert (args.mode, args.seconds, args.warmup, args.connections) == (
        ("json", "stream"),
        20,
        5,
        8,
    )


@pytest.mark.parametrize(
    ("output", "worked"),
    [
        ("PID 4242: python3 -m bench.passthrough\nsending command zero to pid 4242\n  OK.\n", True),
        ("Error: Callgrind task with PID/Name 4242 not detected.\n", False),
        ("No active callgrind runs detected.\n", False),
    ],
)
def test_callgrind_control_is_believed_only_when_it_reached_the_process(
    output: str, worked: bool
) -> None:
    assert instructions.control_worked(output) is worked
