"""bench/run.py's pure helpers: --mode parsing, what each target is sent, the sidecar's files
with --shared-state, --limits and --tracing, slices and their latency histograms
(bench/latency.py), the fixed-rate run's pacing and report (bench/pace.py) and the memory
report (bench/memory.py); no wrk. One in-process mock holds a few streams open
through bench/memory.py's raw client."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import io
import itertools
import json
import os
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from bench import latency, live, memory, run
from bench.pace import Pace, added_p99_line
from sidecar.cli import main as cli_main
from sidecar.config import parse_config_text
from sidecar.mock_provider import create_app

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MINUS = "\N{MINUS SIGN}"  # as the report prints it: `sidecar − pass-through`  # noqa: RUF003


@pytest.mark.parametrize(
    ("text", "modes"),
    [
        ("both", ("json", "stream")),
        ("all", ("json", "stream", "xjson", "xstream")),
        ("xjson", ("xjson",)),
        ("xstream, json", ("xstream", "json")),
        ("json,both,xjson", ("json", "stream", "xjson")),
    ],
)
def test_mode_lists_expand_both_and_all_without_repeats(text: str, modes: tuple[str, ...]) -> None:
    assert run.parse_modes(text) == modes


@pytest.mark.parametrize("text", ["", ",", "xml", "json,xtream"])
def test_unknown_modes_are_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="--mode"):
        run.parse_modes(text)


def test_the_default_mode_is_json_and_stream() -> None:
    assert run.parse_args([])[0].modes == ("json", "stream")
    assert run.parse_args(["--mode", "all"])[0].modes == run.MODES


def test_only_a_sidecar_is_sent_the_model_to_translate() -> None:
    sidecar = run.Target("sidecar", "u", "t", mock=None, translates=True)  # type: ignore[arg-type]
    relay = run.Target("pass-through", "u", "t", mock=None)  # type: ignore[arg-type]
    assert b'"model":"claude-haiku-4-5"' in run.request_body("xjson", sidecar)
    assert b'"model":"gpt-4o-mini"' in run.request_body("xjson", relay)
    assert run.request_body("xstream", relay) == run.request_body("stream", sidecar)
    assert run.request_body("json", sidecar).endswith(b"}]}")


def test_the_anthropic_provider_is_configured_only_for_translated_modes() -> None:
    assert run._sidecar_providers(("json", "stream")) == ("openai",)
    assert run._sidecar_providers(("json", "xstream")) == ("openai", "anthropic")


# --------------------------------------------------------------------------- shared_state and limits


def _cli(*argv: str) -> str:
    """`sidecar ARGV` in-process (what the bench runs as a process); its stdout."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert cli_main(list(argv)) in (0, None)
    return out.getvalue().strip()


def _bench_vault(tmp_path: Path, limits: bool) -> dict[str, Any]:
    """The bench's access key, created with its own arguments; the vault's entry for it."""
    public = _cli("keygen", "--private-key", str(tmp_path / "sidecar.key"))
    vault = str(tmp_path / "vault.json")
    _cli("vault", "init", "--vault", vault, "--public-key", public)
    args = [vault if a == "vault.json" else a for a in run.access_key_args(limits)]
    created = _cli(*args).startswith("sk-sc-")  # the token itself is never shown
    assert created
    entry: dict[str, Any] = json.loads(Path(vault).read_text())["access_keys"]["bench"]
    return entry


def test_with_limits_the_bench_access_key_gets_rpm_and_tpm_it_never_reaches(tmp_path: Path) -> None:
    entry = _bench_vault(tmp_path, limits=True)
    assert (entry["rpm"], entry["tpm"]) == (run.BENCH_RATE_LIMIT, run.BENCH_RATE_LIMIT)
    assert run.BENCH_RATE_LIMIT >= 10**9  # far above any wrk run: nothing refused


def test_without_limits_the_bench_access_key_has_none(tmp_path: Path) -> None:
    entry = _bench_vault(tmp_path, limits=False)
    assert "rpm" not in entry
    assert "tpm" not in entry
    assert not any(a.startswith("--") and a != "--vault" for a in run.access_key_args(False))


def test_the_sidecar_config_sets_shared_state_only_when_asked(tmp_path: Path) -> None:
    url = "redis://127.0.0.1:6399/0"
    text = run._sidecar_config(18080, 19090, 18081, access_log=True, shared_state=url)
    cfg = parse_config_text(text, tmp_path / "sidecar.yaml")
    assert cfg.shared_state is not None
    assert (cfg.shared_state.url, cfg.shared_state.timeout) == (url, 0.5)
    plain = run._sidecar_config(18080, 19090, 18081, access_log=True)
    assert "shared_state" not in plain
    assert parse_config_text(plain, tmp_path / "sidecar.yaml").shared_state is None


def test_the_sidecar_config_exports_traces_to_the_sink_only_when_asked(tmp_path: Path) -> None:
    sink = "http://127.0.0.1:18081/v1/traces?source=sidecar-nolog"
    text = run._sidecar_config(18080, 19090, 18081, access_log=False, tracing=sink)
    cfg = parse_config_text(text, tmp_path / "sidecar.yaml")
    assert cfg.tracing is not None
    assert (cfg.tracing.endpoint, cfg.tracing.sample_ratio) == (sink, 1.0)
    assert cfg.shared_state is None
    plain = run._sidecar_config(18080, 19090, 18081, access_log=False)
    assert "tracing" not in plain
    assert parse_config_text(plain, tmp_path / "sidecar.yaml").tracing is None


def _tree(root: Path, *files: str) -> run.Tree:
    for name in ("sidecar/__init__.py", "sidecar/translate/__init__.py", *files):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).touch()
    return run.Tree(root, "python")


@pytest.mark.parametrize(
    ("flags", "refused"),
    [
        ({"shared_state": True}, "--shared-state:"),
        ({"limits": True}, "--limits:"),
        ({"shared_state": True, "limits": True}, "--shared-state and --limits:"),
        ({"tracing": True}, "--tracing: .* predates tracing \\(no sidecar/tracing.py\\)"),
    ],
)
def test_a_tree_from_before_shared_state_is_refused_these_flags(
    tmp_path: Path, flags: dict[str, bool], refused: str
) -> None:
    old = _tree(tmp_path)
    with pytest.raises(run.BenchError, match=refused) as caught:
        run.check_tree(old, ("json", "stream"), **flags)
    assert str(old.path) in str(caught.value)
    run.check_tree(old, ("json", "stream"))  # measured as before without them


def test_a_tree_with_the_feature_files_is_measured_with_them(tmp_path: Path) -> None:
    new = _tree(tmp_path, "sidecar/shared/replicas.py", "sidecar/ratelimits.py",
                "sidecar/tracing.py")  # fmt: skip
    run.check_tree(new, ("json", "xstream"), shared_state=True, limits=True, tracing=True)
    run.check_tree(run.Tree(run.REPO, "python"), ("json",), shared_state=True, limits=True,
                   tracing=True)  # fmt: skip


def test_a_tree_without_tracing_is_refused_only_tracing(tmp_path: Path) -> None:
    old = _tree(tmp_path, "sidecar/shared/replicas.py", "sidecar/ratelimits.py")
    run.check_tree(old, ("json",), shared_state=True, limits=True)
    with pytest.raises(run.BenchError, match=r"^--tracing: ") as caught:
        run.check_tree(old, ("json",), shared_state=True, limits=True, tracing=True)
    assert "measure it without --tracing" in str(caught.value)


def test_tracing_reaches_the_settings_and_the_first_line_and_headline_name_it() -> None:
    plain, traced = run.parse_args([])[0], run.parse_args(["--tracing"])[0]
    assert (plain.tracing, traced.tracing) == (False, True)
    assert plain.features().endswith("; tracing off")
    assert "; tracing on (" in traced.features()
    assert "shared_state off; access key without rate limits" in traced.features()
    assert run.processes(traced) == run.processes(plain)  # the sink's CPU is the mock's


@pytest.mark.parametrize(
    ("counts", "failed", "expected"),
    [
        ({"requests": 12, "bytes": 34567, "too_large": 0}, 0,
         ", trace sink got 12 OTLP exports (34567 bytes), trace_export_failed logged 0 time(s)"),
        ({"requests": 0, "bytes": 0, "too_large": 0}, 1,
         ", trace sink got NO OTLP export, trace_export_failed logged 1 time(s)"),
        ({"requests": 3, "bytes": 9, "too_large": 2}, 0,
         ", trace sink got 3 OTLP exports (9 bytes), 2 refused as too large, "
         "trace_export_failed logged 0 time(s)"),
        (None, 0, ", trace sink: no answer, trace_export_failed logged 0 time(s)"),
    ],
)  # fmt: skip
def test_the_sanity_line_shows_what_the_sink_got_and_export_failures(
    counts: dict[str, int] | None, failed: int, expected: str
) -> None:
    assert run.trace_line(counts, failed) == expected


async def test_trace_counts_are_read_per_sidecar_from_the_mock(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
) -> None:
    server = await aiohttp_server(create_app())
    url = str(server.make_url("/v1/traces"))
    urls = (url + "?source=sidecar", url + "?source=sidecar", url + "?source=sidecar-nolog")
    for sink in urls:
        status, _ = await asyncio.to_thread(run._http, sink, b"\n\x01x")
        assert status == 200
    mock = _dummy_server()
    traced = [run.Target(name, "", "", mock, traces_url=str(server.make_url("/_mock/traces")))
              for name in ("sidecar", "sidecar-nolog", "sidecar-other")]  # fmt: skip
    counts = [await asyncio.to_thread(run.trace_counts, t) for t in traced]
    assert counts == [{"requests": 2, "bytes": 6, "too_large": 0},
                      {"requests": 1, "bytes": 3, "too_large": 0},
                      {"requests": 0, "bytes": 0, "too_large": 0}]  # fmt: skip
    assert run.trace_counts(run.Target("sidecar", "", "", mock)) is None  # not traced


def _dummy_server() -> run.Server:
    return run.Server("mock", None, Path(os.devnull), "")  # type: ignore[arg-type]


def test_the_flags_reach_the_settings_and_the_report_names_them() -> None:
    plain = run.parse_args([])[0]
    both = run.parse_args(["--shared-state", "--limits"])[0]
    assert (plain.shared_state, plain.limits, both.shared_state, both.limits) == (
        False, False, True, True
    )  # fmt: skip
    assert "shared_state off" in plain.features()
    assert "without rate limits" in plain.features()
    assert "shared_state on" in both.features()
    assert "counted on Redis" in both.features()
    assert "counted in the sidecar" in run.parse_args(["--limits"])[0].features()
    assert run.processes(plain) == ("proxy", "mock", "wrk")
    assert run.processes(both) == ("proxy", "mock", "wrk", "redis")


def test_redis_info_replies_are_read_into_calls_per_command() -> None:
    body = (
        b"# Commandstats\r\ncmdstat_evalsha:calls=12,usec=80,usec_per_call=6.67\r\n"
        b"cmdstat_ping:calls=3,usec=1\r\n\r\n"
    )
    reply = b"$%d\r\n%s\r\n" % (len(body), body)
    assert run._resp_complete(reply)
    assert not run._resp_complete(reply[:-5])
    calls = run.command_calls(run.parse_redis_info(reply))
    assert calls == {"evalsha": 12, "ping": 3}
    assert run._redis_address("redis://127.0.0.1:6399/0") == ("127.0.0.1", 6399)


# --------------------------------------------------------------------------- slices and latency


def test_wrk_latency_lines_are_read_and_garbage_is_refused() -> None:
    assert latency.parse("BENCH-LATENCY 812:3 815:1 812:2") == {812: 5, 815: 1}
    assert latency.parse("BENCH-LATENCY ") == {}
    for bad in ("BENCH-LATENCY 812", "BENCH-LATENCY a:1", "BENCH-LATENCY 1:-2", "1:2:3"):
        with pytest.raises(ValueError, match="pair"):
            latency.parse(bad)
    stdout = 'Running 1s test\nBENCH-RESULT {"requests": 3}\nBENCH-LATENCY 900:2 1200:1\n'
    assert run.parse_latency(stdout) == {900: 2, 1200: 1}
    assert run.parse_latency("BENCH-RESULT {}\nBENCH-LATENCY \n") == {}  # completed nothing
    assert run.parse_latency("BENCH-RESULT {}\n") is None  # none: the parts' own percentiles count
    with pytest.raises(run.BenchError, match="malformed latency"):
        run.parse_latency("BENCH-LATENCY 900:x\n")


def test_percentiles_follow_wrks_own_rule() -> None:
    # wrk: the smallest latency whose requests, with all faster ones, reach round(p% of n + 0.5)
    hundred = {v: 1 for v in range(1, 101)}
    assert latency.percentile(hundred, 50) == 51.0
    assert latency.percentile(hundred, 99) == 100.0
    assert latency.percentile(hundred, 100) == 100.0  # (wrk: 0) the largest
    tail = {1000: 98, 5000: 1, 9000: 1}
    assert latency.percentile(tail, 50) == 1000.0
    assert latency.percentile(tail, 97) == 1000.0  # rank round(97.5) = 98
    assert latency.percentile(tail, 98) == 5000.0  # rank round(98.5) = 99 (C rounds halves up)
    assert latency.percentile(tail, 99) == 9000.0  # rank round(99.5) = 100: the slowest one
    assert latency.maximum(tail) == 9000.0
    assert latency.percentile({}, 99) != latency.percentile({}, 99)  # NaN
    assert latency.added([{1: 2, 3: 1}, {3: 4}, {}]) == {1: 2, 3: 5}


def _part(requests: int, histogram: dict[int, int], **cpu: float) -> run.Sample:
    p99 = latency.percentile(histogram, 99) / 1000 if histogram else 1.0
    return run.Sample(requests=requests, seconds=1.0, errors={}, p50_ms=0.5, p99_ms=p99,
                      cpu=cpu, max_ms=p99, histogram=histogram)  # fmt: skip


def test_slices_add_up_to_one_run_with_the_percentiles_of_all_its_requests() -> None:
    slow = _part(100, {1000: 99, 20000: 1}, proxy=0.05, wrk=0.01, other=0.02)
    fast = _part(100, {1000: 100}, proxy=0.03, wrk=0.01)
    assert (slow.p99_ms, fast.p99_ms) == (20.0, 1.0)
    both = run.combined([slow, dataclasses.replace(fast, errors={"status": 2})])
    assert (both.requests, both.seconds, both.errors) == (200, 2.0, {"status": 2})
    assert both.cpu == pytest.approx({"proxy": 0.08, "wrk": 0.02})  # `other`: not in every slice
    assert both.ms_per_request("proxy") == pytest.approx(0.4)
    # 200 requests, one of them slow: the p99 is 1 ms, not the median of 20 and 1 (10.5)
    assert (both.p50_ms, both.p99_ms, both.max_ms) == (1.0, 1.0, 20.0)
    assert run.combined([slow]) is slow
    # A slice that completed nothing (wrk says p99 0 for it) adds nothing, not a low p99.
    stalled = run.Sample(requests=0, seconds=1.0, errors={"timeout": 3}, p50_ms=0.0, p99_ms=0.0,
                         cpu={"proxy": 0.01}, max_ms=0.0, histogram={})  # fmt: skip
    with_stall = run.combined([slow, stalled])
    assert (with_stall.requests, with_stall.p99_ms, with_stall.max_ms) == (100, 20.0, 20.0)
    assert with_stall.errors == {"timeout": 3}
    # A part that printed no histogram: the median of the parts' own percentiles, the largest max.
    bare = run.combined([slow, dataclasses.replace(fast, histogram=None)])
    assert (bare.p99_ms, bare.max_ms, bare.histogram) == (10.5, 20.0, None)


def test_a_runs_cpu_is_split_into_the_targets_the_rest_and_the_hosts_steal() -> None:
    mock = run.Server("mock", None, Path("m"), "")  # type: ignore[arg-type]
    proxy = run.Server("sidecar", None, Path("s"), "")  # type: ignore[arg-type]
    target = run.Target("sidecar", "u", "t", mock=mock, proxy=proxy)
    before = {"mock": 1.0, "sidecar": 2.0, "wrk": 0.5, "machine": 10.0, "steal": 3.0}
    after = {"mock": 1.4, "sidecar": 2.9, "wrk": 0.6, "machine": 11.8, "steal": 3.25}
    cpu = run._cpu_deltas(before, after, target)  # type: ignore[arg-type]
    # other: the machine's busy time less the host's steal (inside it) and ours: 1.8 - 0.25 - 1.4
    assert cpu == pytest.approx({"wrk": 0.1, "mock": 0.4, "proxy": 0.9, "other": 0.15, "steal": 0.25})
    assert run._stolen_seconds([1, 2, 3, 4, 5, 6, 7, 250]) == 250 / run._CLK_TCK
    assert run._stolen_seconds([1, 2, 3, 4]) is None  # a kernel without the column
    assert run._machine_busy_seconds(None) is None


def test_the_targets_alternate_from_slice_to_slice() -> None:
    orders = run.slice_orders(["direct", "pass-through", "sidecar"], 4, start=1)
    assert orders == [["pass-through", "sidecar", "direct"], ["direct", "sidecar", "pass-through"],
                      ["pass-through", "sidecar", "direct"], ["direct", "sidecar", "pass-through"]]  # fmt: skip
    assert run.slice_orders(["a", "b"], 1) == [["a", "b"]]


def test_a_sliced_run_loads_each_target_in_turn_and_adds_its_slices(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = run.parse_args(["--duration", "6", "--slices", "3"])[0]
    assert (settings.slice_count, settings.slice_seconds) == (3, 2)
    calls: list[tuple[str, int]] = []

    def fake_wrk(wrk: str, fleet: object, target: run.Target, mode: str, seconds: int,
                 settings: object, cores: object, pace: object = None) -> run.Sample:  # fmt: skip
        calls.append((target.name, seconds))
        return _part(10 * len(calls), {len(calls) * 100: 10 * len(calls)}, proxy=0.001 * len(calls))

    monkeypatch.setattr(run, "run_wrk", fake_wrk)
    targets = {n: run.Target(n, "u", "t", mock=None) for n in ("pass-through", "sidecar")}  # type: ignore[arg-type]
    out = run.run_sliced("wrk", None, targets, ["pass-through", "sidecar"], "json", settings,  # type: ignore[arg-type]
                         None, 0)  # type: ignore[arg-type]  # fmt: skip
    assert calls == [("pass-through", 2), ("sidecar", 2), ("sidecar", 2), ("pass-through", 2),
                     ("pass-through", 2), ("sidecar", 2)]  # fmt: skip
    pt, sc = out["pass-through"], out["sidecar"]
    assert (pt.requests, sc.requests) == (10 + 40 + 50, 20 + 30 + 60)
    assert pt.cpu["proxy"] == pytest.approx(0.001 * (1 + 4 + 5))
    assert pt.histogram == {100: 10, 400: 40, 500: 50}
    assert pt.seconds == 3.0


def test_rounds_slice_the_cpu_runs_but_not_the_fixed_rate_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = run.parse_args(["--duration", "2", "--rounds", "2", "--rate-rounds", "2",
                               "--mode", "json", "--targets", "pass-through,sidecar"])[0]  # fmt: skip
    calls: list[tuple[str, int, bool]] = []

    def fake_wrk(wrk: str, fleet: object, target: run.Target, mode: str, seconds: int,
                 settings: object, cores: object, pace: object = None) -> run.Sample:  # fmt: skip
        calls.append((target.name, seconds, pace is not None))
        return _part(100, {1000: 100}, proxy=0.02)

    monkeypatch.setattr(run, "run_wrk", fake_wrk)
    targets = {n: run.Target(n, "u", "t", mock=None, proxy=object())  # type: ignore[arg-type]
               for n in ("pass-through", "sidecar")}  # fmt: skip
    with contextlib.redirect_stderr(io.StringIO()):
        results = run.measure("wrk", None, targets, settings, None)  # type: ignore[arg-type]
    warm = [("pass-through", 1, False), ("sidecar", 1, False)]
    pt, sc = ("pass-through", 1, False), ("sidecar", 1, False)
    assert calls == [*warm, pt, sc, sc, pt, sc, pt, pt, sc]  # round 2 starts from the sidecar
    assert [s.requests for s in results.of("json", "sidecar")] == [200, 200]  # 2 slices a round
    assert results.completed == {"pass-through": 500, "sidecar": 500}
    calls.clear()
    with contextlib.redirect_stderr(io.StringIO()):
        run.measure_fixed_rate("wrk", None, targets, settings, None, results)  # type: ignore[arg-type]
    # One whole run per target and round (a new run's first requests are not in its p99).
    assert calls == [("pass-through", 2, True), ("sidecar", 2, True),
                     ("sidecar", 2, True), ("pass-through", 2, True)]  # fmt: skip
    assert [s.requests for _, s in results.fixed[("json", "sidecar")]] == [100, 100]
    assert results.completed == {"pass-through": 700, "sidecar": 700}


@pytest.mark.parametrize("argv", [["--duration", "5", "--slices", "2"], ["--slices", "-1"]])
def test_slices_must_cut_the_duration_into_whole_seconds(argv: list[str]) -> None:
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        run.parse_args(argv)


def test_by_default_a_run_is_cut_into_slices_of_one_second() -> None:
    default = run.parse_args([])[0]
    assert (default.duration, default.slice_count, default.slice_seconds) == (5, 5, 1)
    whole = run.parse_args(["--slices", "1"])[0]
    assert (whole.slice_count, whole.slice_seconds) == (1, 5)


# --------------------------------------------------------------------------- the fixed-rate run


def test_a_fixed_rate_has_connections_for_one_request_per_50_ms_each() -> None:
    p = Pace.start(1000, 2)
    assert (p.connections, p.threads) == (50, 2)
    assert p.every_ms == 2.0  # each wrk thread sends one request every 2 ms: 1,000 req/s
    odd = Pace.start(700, 4)
    assert odd.connections % 4 == 0  # wrk gives each thread connections ÷ threads
    assert odd.every_ms == pytest.approx(4000 / 700)
    assert Pace.start(10, 2).connections == 2  # never fewer than one per thread
    with pytest.raises(ValueError, match="rate > 0"):
        Pace.start(0, 2)
    assert p.off_by(980) == pytest.approx(-0.02)
    assert p.on_target(1049)
    assert not p.on_target(1051)
    assert not p.on_target(949)


def test_the_pace_reaches_chat_lua_in_its_environment() -> None:
    env = Pace(1000, 50, 2).env()
    assert env == {"BENCH_RATE": "1000", "BENCH_THREADS": "2"}
    assert Pace(250.5, 12, 3).env()["BENCH_RATE"] == "250.5"
    lua = run.LUA.read_text()
    assert all(f'os.getenv("{name}")' in lua for name in env)
    assert "function delay()" in lua
    assert "BENCH_DELAY_MS" not in lua  # no calibrated delay any more: a timetable
    assert 'io.write("BENCH-LATENCY "' in lua
    assert latency.MARK == "BENCH-LATENCY "


def test_the_added_p99_line_names_the_rate_and_never_judges() -> None:
    line = added_p99_line("json", "sidecar", 1000, 0.70)
    assert f"added p99 at 1000 req/s: sidecar {MINUS} pass-through = 0.70 ms" in line
    assert "goal ≤ 2 ms" in line
    worse = added_p99_line("stream", "sidecar", 1000, 8.0, reached=False)
    assert "= 8.00 ms" in worse
    assert "NOT at 1000 req/s" in worse
    assert "NOT" not in line
    rounds = added_p99_line("json", "sidecar", 1000, 0.5, rounds=[0.5, -1.0, 4.25])
    assert "= 0.50 ms (median of 0.50, -1.00, 4.25)" in rounds


def _sample(rps: float, p99_ms: float, errors: dict[str, int] | None = None) -> run.Sample:
    return run.Sample(requests=int(rps * 5), seconds=5.0, errors=errors or {}, p50_ms=p99_ms / 2,
                      p99_ms=p99_ms, cpu={"proxy": rps * 5 * 0.0002}, max_ms=p99_ms * 2)  # fmt: skip

PACE = Pace(1000, 50, 2)


def test_the_fixed_rate_section_reports_each_run_and_the_added_p99_per_mode() -> None:
    settings = run.parse_args(["--duration", "5"])[0]
    results = run.Results()
    pace = PACE
    results.fixed = {("json", "pass-through"): [(pace, _sample(998, 1.5))],
                     ("json", "sidecar"): [(pace, _sample(1004, 2.0))],
                     ("stream", "pass-through"): [(pace, _sample(1000, 3.0))],
                     ("stream", "sidecar"): [(pace, _sample(900, 9.0))]}  # fmt: skip
    text = "\n".join(run.fixed_rate_lines(results, settings))
    assert text.startswith("FIXED RATE 1000 req/s offered to each target, one run of 5 s")
    assert "50 connections on 2 wrk threads, each thread sending one request every 2 ms" in text
    assert "% of a core  stolen" in text  # the host's steal during each run, beside the proxy's CPU
    assert "slices" not in text.splitlines()[0]  # fixed-rate runs are whole
    assert "delay" not in text
    assert f"json    added p99 at 1000 req/s: sidecar {MINUS} pass-through = 0.50 ms" in text
    assert f"stream  added p99 at 1000 req/s: sidecar {MINUS} pass-through = 6.00 ms" in text
    assert "-10.0%" in text  # the stream sidecar's achieved rate, off by
    assert text.count("NOT at 1000 req/s") == 1  # only the stream pair missed the rate
    assert "by round" not in text
    assert run.fixed_rate_lines(run.Results(), settings) == []


def test_fixed_rate_rounds_report_the_median_run_and_the_median_difference() -> None:
    settings = run.parse_args(["--duration", "5"])[0]
    assert settings.rate_rounds == 5
    results = run.Results()
    pace = PACE
    results.fixed = {
        ("json", "pass-through"): [(pace, _sample(1000, p)) for p in (2.0, 9.0, 3.0)],
        ("json", "sidecar"): [(pace, _sample(1000, p)) for p in (2.5, 4.0, 13.0)],
    }
    text = "\n".join(run.fixed_rate_lines(results, settings))
    assert "3 rounds of one 5 s run per target (the order alternating)" in text
    # Each row is the run with the median p99, every round's p99 beside it.
    rows = {line.split()[1]: line for line in text.splitlines() if line.startswith("json ")}
    assert rows["pass-through"].split()[5] == "3.00"
    assert rows["pass-through"].endswith("│ 2.00 9.00 3.00")
    assert rows["sidecar"].split()[5] == "4.00"
    # Added p99: the median of each round's difference (0.50, -5.00, 10.00), not of the medians.
    assert f"sidecar {MINUS} pass-through = 0.50 ms (median of 0.50, -5.00, 10.00)" in text
    assert run.parse_args(["--quick"])[0].rate_rounds == 1
    assert run.parse_args(["--rate-rounds", "5"])[0].rate_rounds == 5


def test_the_fixed_rate_run_covers_json_and_stream_of_the_proxies_asked_for() -> None:
    plan = run.fixed_rate_plan
    assert plan(run.parse_args([])[0]) == (("json", "stream"), ("pass-through", "sidecar"))
    assert plan(run.parse_args(["--mode", "all", "--targets", "direct,sidecar"])[0]) == (
        ("json", "stream"), ("sidecar",))  # fmt: skip
    assert plan(run.parse_args(["--rate", "0"])[0]) == ((), ())
    assert run.parse_args(["--rate", "250"])[0].rate == 250


def test_errors_at_the_fixed_rate_fail_the_run_like_any_other() -> None:
    results = run.Results()
    results.fixed[("json", "sidecar")] = [(PACE, _sample(1000, 2.0, {"status": 400}))]
    assert run.failures(results) == [
        "sidecar json at a fixed rate: 8.0% of requests failed: {'status': 400}"
    ]


@pytest.mark.parametrize("argv", [["--rate", "-1"], ["--streams", "-5"]])
def test_negative_rates_and_stream_counts_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        run.parse_args(argv)


def test_quick_keeps_the_new_parts_short() -> None:
    quick, full = run.parse_args(["--quick"])[0], run.parse_args([])[0]
    assert (quick.rate_rounds, quick.hold_seconds, quick.slice_count) == (1, 1.0, 2)
    assert (full.rate_rounds, full.hold_seconds, full.slice_count) == (5, 2.0, 5)
    assert (full.rate, full.streams) == (1000, 1000)
    assert run.parse_args(["--streams", "0"])[0].streams == 0


# --------------------------------------------------------------------------- memory

STATUS = "Name:\tpython\nVmPeak:\t  300000 kB\nVmRSS:\t   51234 kB\nRssAnon:\t   40000 kB\n"


def test_vmrss_is_read_from_proc_status_in_kib() -> None:
    assert memory.parse_vmrss_kib(STATUS) == 51234
    assert memory.parse_vmrss_kib("Name:\tkthreadd\nVmPeak:\t0 kB\n") is None  # a kernel thread
    assert memory.parse_vmrss_kib("VmRSS:\n") is None
    own = memory.rss_kib(os.getpid())
    assert own is not None
    assert own > 1024  # this very process: over 1 MiB
    assert memory.mib(51234) == pytest.approx(50.03, abs=0.01)


def test_streams_are_capped_by_the_open_files_limit() -> None:
    assert memory.stream_cap(1000, 20000) == 1000
    assert memory.stream_cap(1000, 1024) == 384  # (1024 - 256) // 2: two descriptors a stream
    assert memory.stream_cap(1000, 100) == 0


def test_the_stream_request_is_one_well_formed_http_post() -> None:
    raw = memory.stream_request("127.0.0.1", 8080, "/v1/chat/completions", "sk-t", "m-drip-1000")
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /v1/chat/completions HTTP/1.1"
    assert f"Content-Length: {len(body)}" in lines
    assert "Authorization: Bearer sk-t" in lines
    sent = json.loads(body)
    assert (sent["model"], sent["stream"]) == ("m-drip-1000", True)
    assert memory.STREAM_MODEL.startswith("gpt-")  # the sidecar routes it to openai: the mock
    assert memory.STREAM_MODEL.endswith("-drip-2000")
    assert memory.status_of(b"HTTP/1.1 503 Service Unavailable\r\nx: y\r\n\r\n") == 503
    assert memory.status_of(b"garbage") == 0


def test_the_memory_section_shows_each_proxy_and_the_sidecar_goals() -> None:
    hold = memory.Hold(1000, opened=998, open_seconds=2.04, peak_kib=140 * 1024)
    hold.errors["timeout"] = 2
    rows = [memory.MemoryRow("pass-through", 30 * 1024, 32 * 1024, hold, 35 * 1024),
            memory.MemoryRow("sidecar", 52 * 1024, 55 * 1024, hold, 60 * 1024)]  # fmt: skip
    lines = memory.memory_lines(rows, 1000, 3.0)
    assert lines[0].startswith("MEMORY resident set")
    assert "1000 streams" in lines[1]
    assert "3 s after" in lines[1]
    assert lines[3].split()[:5] == ["sidecar", "52.0", "55.0", "140.0", "60.0"]
    assert "998 of 1000 open in 2.0 s (failed: timeout 2)" in lines[3]
    assert lines[4] == ("  sidecar: idle 52.0 MiB (goal ≤ 60), 998 open streams 140.0 MiB "
                        "(goal ≤ 150 with 1000), 3 s after they closed 60.0 MiB "
                        "(+8.0 over idle)")  # fmt: skip
    assert len(lines) == 5  # no goal line for the pass-through
    idle_only = memory.memory_lines([memory.MemoryRow("sidecar", 52 * 1024, None)], 0, 3.0)
    assert "streams" not in idle_only[1]
    assert "no streams held (--streams 0)" in idle_only[0]
    assert idle_only[-1] == "  sidecar: idle 52.0 MiB (goal ≤ 60)"


async def test_streams_are_held_open_through_a_server_and_hung_up_on(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
) -> None:
    finished = 0
    all_finished = asyncio.Event()

    @web.middleware
    async def count(request: web.Request, handler: Handler) -> web.StreamResponse:
        nonlocal finished
        try:
            return await handler(request)
        finally:
            finished += 1
            if finished == 20:
                all_finished.set()

    app = create_app()
    app.middlewares.append(count)
    server = await aiohttp_server(app)
    host, port = str(server.host), int(server.port or 0)
    request = memory.stream_request(host, port, "/v1/chat/completions", "k", "m-drip-20")
    samples: list[int] = []

    def sample() -> int:
        samples.append(finished)  # while held: no stream has ended
        return 1000 + len(samples)

    held = await memory.hold_streams(host, port, request, 20, sample, hold_seconds=0.3,
                                     concurrency=8)  # fmt: skip
    assert (held.opened, held.errors) == (20, {})
    assert samples
    assert set(samples) == {0}
    assert held.peak_kib == 1000 + len(samples)
    async with asyncio.timeout(3):  # hung up on: each stream's next gap ends it
        await all_finished.wait()
    refused = memory.stream_request(host, port, "/v1/chat/completions", "k", "m-fail-503")
    bad = await memory.hold_streams(host, port, refused, 3, lambda: None, hold_seconds=0)
    assert (bad.opened, bad.errors) == (0, {"HTTP 503": 3})
    assert bad.summary() == f"0 of 3 open in {bad.open_seconds:.1f} s (failed: HTTP 503 3)"


# --------------------------------------------------------------------------- live streams


def test_event_ends_are_counted_across_reads_and_never_in_the_chunked_framing() -> None:
    events = [b'data: {"a":1}\n\n', b'data: {"b":2}\n\n']
    body = b"".join(b"%x\r\n%b\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n"
    counter = live.EventCounter()
    for i in range(len(body)):  # every split point, the `\n\n` of an event split too
        counter = live.EventCounter()
        assert not counter.feed(body[:i])
        assert not counter.feed(b"")
        assert counter.feed(body[i:])  # the body's end (its last chunk, `0`), split or not
        assert counter.count == 2, i
    assert not live.EventCounter().feed(body[:-1])  # not yet the end
    one_by_one = live.EventCounter()
    for byte in body:
        one_by_one.feed(bytes([byte]))
    assert one_by_one.count == 2
    three = live.EventCounter()
    three.feed(b"data: x\n\n\n\ndata: y\n")  # an empty event's end counts too: what SSE says
    three.feed(b"\n")
    assert three.count == 3


async def test_live_streams_are_read_event_by_event_and_the_proxys_cpu_counted(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
) -> None:
    server = await aiohttp_server(create_app())
    host, port = str(server.host), int(server.port or 0)
    request = memory.stream_request(host, port, "/v1/chat/completions", "k", live.model(10))
    readings = iter([7.0, 7.25])  # the proxy's CPU seconds before and after the window

    relayed = await live.relay_streams(host, port, request, 5, lambda: next(readings),
                                       seconds=0.3, warm=0.05)  # fmt: skip
    assert (relayed.requested, relayed.opened, relayed.errors) == (5, 5, {})
    # Five streams, an event every 10 ms each: never more than were sent in the window
    # (counting reads, or an event twice, would be), and some.
    assert 0 < relayed.events <= 5 * (relayed.seconds / 0.010 + 2)
    ours = [t for t in asyncio.all_tasks() if t.get_coro().__qualname__.startswith(  # type: ignore[union-attr]
        ("_read_all", "relay_streams", "open_streams"))]  # fmt: skip
    assert ours == []  # every reader and opener gone (the test server's own tasks may linger)
    assert relayed.cpu_seconds == 0.25
    assert relayed.us_per_event == pytest.approx(0.25 / relayed.events * 1e6)
    assert relayed.seconds >= 0.3
    refused = memory.stream_request(host, port, "/v1/chat/completions", "k", "m-fail-503")
    bad = await live.relay_streams(host, port, refused, 3, lambda: None, seconds=0, warm=0)
    assert (bad.opened, bad.events, bad.errors) == (0, 0, {"HTTP 503": 3})
    assert bad.cpu_seconds is None
    assert bad.us_per_event != bad.us_per_event  # NaN: nothing to divide
    assert (await live.relay_streams(host, port, request, 0, lambda: 1.0, seconds=9)).opened == 0


async def test_streams_opened_before_an_interruption_are_hung_up_on(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
) -> None:
    answered = 0
    ended: list[int] = []
    all_asked, streaming, both_ended = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def some(request: web.Request) -> web.StreamResponse:
        nonlocal answered
        answered += 1
        if answered == 4:
            all_asked.set()
        if answered > 2:
            await asyncio.sleep(30)  # never answers: its opener is still waiting
        mine = answered
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            for sent in itertools.count():
                await resp.write(b'data: {"a":1}\n\n')
                if sent == 3 and mine == 2:
                    streaming.set()
                await asyncio.sleep(0.02)
        finally:  # a write that failed, or the handler cancelled: the caller has gone
            ended.append(mine)
            if len(ended) == 2:
                both_ended.set()
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", some)
    server = await aiohttp_server(app)
    host, port = str(server.host), int(server.port or 0)
    request = memory.stream_request(host, port, "/v1/chat/completions", "k", live.model())
    holding = asyncio.create_task(memory.hold_streams(host, port, request, 4, lambda: None,
                                                      hold_seconds=30))  # fmt: skip
    async with asyncio.timeout(5):  # two streams open and streaming, two still opening
        await all_asked.wait()
        await streaming.wait()
    holding.cancel()
    with pytest.raises(asyncio.CancelledError):
        await holding
    async with asyncio.timeout(5):  # both hung up on: their next write fails
        await both_ended.wait()
    assert sorted(ended) == [1, 2]
    leftover = [t for t in asyncio.all_tasks() if t.get_coro().__qualname__.startswith(  # type: ignore[union-attr]
        "open_streams")]  # fmt: skip
    assert leftover == []


async def test_a_live_stream_the_proxy_ends_is_reported_not_hidden(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
) -> None:
    async def short(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"a":1}\n\n')
        if request.headers.get("Authorization") == "Bearer cut":
            assert request.transport is not None
            request.transport.abort()  # broken mid-stream, no end
            return resp
        await resp.write(b'data: {"b":2}\n\n')
        return resp  # ended cleanly, but before the bench hung up

    app = web.Application()
    app.router.add_post("/v1/chat/completions", short)
    server = await aiohttp_server(app)
    host, port = str(server.host), int(server.port or 0)
    ended = memory.stream_request(host, port, "/v1/chat/completions", "k", live.model())
    relayed = await live.relay_streams(host, port, ended, 3, lambda: 1.0, seconds=0.1, warm=0.1)
    assert (relayed.opened, dict(relayed.errors)) == (3, {"ended early": 3})
    cut = memory.stream_request(host, port, "/v1/chat/completions", "cut", live.model())
    broken = await live.relay_streams(host, port, cut, 2, lambda: 1.0, seconds=0.1, warm=0.1)
    assert broken.opened == 2
    assert sum(broken.errors.values()) == 2  # whether seen as an end or a reset
    lines = live.live_lines([("sidecar", relayed)], 3, 40, 0.1, 1)
    assert lines[2].endswith("3 of 3 open (failed: ended early 3)")


def test_the_live_section_puts_each_sidecar_beside_the_pass_through() -> None:
    pt = live.added([live.Relayed(100, 100, 7500, 3.0, 0.6), live.Relayed(100, 100, 7400, 3.0, 0.6)])
    assert (pt.requested, pt.events, pt.seconds, pt.cpu_seconds) == (200, 14900, 6.0, 1.2)
    sc = live.Relayed(200, 199, 14800, 6.0, 1.48, Counter({"timeout": 1}))
    lines = live.live_lines([("pass-through", pt), ("sidecar", sc)], 100, 40, 3.0, 2)
    assert lines[0].startswith("LIVE STREAMS 100 streams held open through each proxy, each sent "
                               "one event every 40 ms by the mock (2,500 events/s)")  # fmt: skip
    assert "over 2 window(s) of 3 s" in lines[0]
    rows = {line.split()[0]: line.split() for line in lines[2:4]}
    assert rows["pass-through"][1:4] == ["2483", "80.5", "20"]
    assert rows["sidecar"][1:4] == ["2467", "100.0", "25"]
    assert lines[3].endswith("199 of 200 open (failed: timeout 1)")
    assert lines[4] == "  sidecar ÷ pass-through: 1.24x per event relayed (+19.5 µs)"
    assert live.live_lines([], 100, 40, 3.0, 2) == []
    unknown = live.added([live.Relayed(1, 1, 10, 1.0, None)])
    assert unknown.cpu_seconds is None


def test_live_streams_are_asked_for_by_count_and_can_be_skipped() -> None:
    default, none = run.parse_args([])[0], run.parse_args(["--live", "0"])[0]
    assert (default.live_streams, default.live_rounds, default.live_seconds) == (100, 2, 3.0)
    assert run.parse_args(["--quick"])[0].live_rounds == 1
    targets = {n: run.Target(n, f"http://127.0.0.1:{i + 1}/v1", "t", mock=None,  # type: ignore[arg-type]
                             proxy=run.Server(n, None, Path(n), ""))  # type: ignore[arg-type]
               for i, n in enumerate(("pass-through", "sidecar"))}  # fmt: skip
    assert run.measure_live(None, targets, none, run.Cores()) == []  # type: ignore[arg-type]


def test_live_windows_take_turns_and_read_each_proxys_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = run.parse_args([])[0]
    calls: list[tuple[int, Any]] = []

    async def fake(host: str, port: int, request: bytes, count: int, cpu: Any, *,
                   seconds: float) -> live.Relayed:  # fmt: skip
        calls.append((port, cpu))
        return live.Relayed(count, count, 100 * port, seconds, 0.01 * port)

    class Fleet:
        def check_alive(self) -> None:
            pass

    monkeypatch.setattr(live, "relay_streams", fake)
    servers = {n: run.Server(n, None, Path(n), "") for n in ("pass-through", "sidecar")}  # type: ignore[arg-type]
    targets = {n: run.Target(n, f"http://127.0.0.1:{i + 1}/v1", "t", mock=None, proxy=servers[n])  # type: ignore[arg-type]
               for i, n in enumerate(servers)}  # fmt: skip
    with contextlib.redirect_stderr(io.StringIO()):
        rows = run.measure_live(Fleet(), targets, settings, run.Cores())  # type: ignore[arg-type]
    assert [port for port, _ in calls] == [1, 2, 2, 1]  # the proxies take turns, ABBA
    assert [cpu.__self__ for _, cpu in calls] == [servers["pass-through"], servers["sidecar"],
                                                  servers["sidecar"], servers["pass-through"]]  # fmt: skip
    assert dict(rows)["sidecar"].events == 400
    assert dict(rows)["sidecar"].requested == 200
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        run.parse_args(["--live", "-1"])
