"""The collector settings `sidecar serve` applies once it serves (sidecar.server.tune_gc)."""

from __future__ import annotations

import gc

from sidecar.server import tune_gc


def test_tune_gc_sets_startup_aside_and_collects_the_young_less_often() -> None:
    before = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_freeze_count() > 0  # what startup built is never walked again
        assert gc.get_threshold() == (10_000, before[1], before[2])
        junk: list[object] = []
        junk.append(junk)  # a reference cycle: still collected when asked
        del junk
        assert gc.collect() >= 1
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
