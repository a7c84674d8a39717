"""The worker's collector settings, as benchmarks borrow them for a block."""

from __future__ import annotations

import gc

from ctxflow.streams.runtime import gc_policy


def test_a_block_runs_under_the_workers_thresholds_and_gives_the_previous_ones_back() -> None:
    gc.unfreeze()  # nothing frozen before the block (another test may have left a freeze behind)
    before = gc.get_threshold()
    with gc_policy.held():
        assert gc.get_threshold() == gc_policy.THRESHOLDS
        assert gc.get_freeze_count() > 0  # what existed when the block began is never scanned in it
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


def test_a_callers_own_freeze_stands_after_the_block() -> None:
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        with gc_policy.held():
            pass
        assert gc.get_freeze_count() >= frozen
    finally:
        gc.unfreeze()
