"""bench/paired.py's pure parts: a round's ratio, the report's medians and ranges per mode, and
the arguments; no wrk."""

from __future__ import annotations

import math

import pytest

from bench import paired
from bench.paired import Round


def test_a_rounds_ratio_is_sidecar_over_pass_through() -> None:
    assert Round("json", 0.4, 0.5).ratio == pytest.approx(1.25)
    assert math.isnan(Round("json", 0.0, 0.5).ratio)


def test_the_report_gives_each_mode_its_medians_and_the_range_of_its_ratios() -> None:
    rounds = [Round("json", 0.40, 0.44), Round("json", 0.50, 0.60), Round("json", 0.30, 0.33),
              Round("stream", 0.50, 0.70), Round("stream", 0.60, 0.78)]  # fmt: skip
    lines = paired.report(rounds, 3, 16, "pass-through")
    assert "wrk -t1 -c16 each, 3 s a round" in lines[0]
    assert lines[1].split()[2:4] == ["pass-through", "sidecar"]
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    # json: medians 0.40 and 0.44 of each column; ratios 1.10, 1.20, 1.10
    assert rows["json"][1:] == ["3", "0.400", "0.440", "1.10x", "(1.10-1.20)"]
    # stream: an even count takes the middle two's mean; ratios 1.40 and 1.30
    assert rows["stream"][1:] == ["2", "0.550", "0.740", "1.35x", "(1.30-1.40)"]
    assert list(rows) == ["json", "stream"]  # in the order measured


def test_the_arguments_default_and_refuse_nonsense() -> None:
    a = paired.parse_args([])
    assert (a.rounds, a.seconds, a.warmup, a.connections, a.mode) == (8, 3, 2, 16, ("json", "stream"))
    assert a.against is None
    assert paired.parse_args(["--against", "../x"]).against.name == "x"
    assert paired.parse_args(["--mode", "stream", "--rounds", "2"]).mode == ("stream",)
    with pytest.raises(SystemExit):
        paired.parse_args(["--rounds", "0"])
