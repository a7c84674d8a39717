"""The worker's intake never hands the pipeline a record that skips over unprocessed ones."""

from __future__ import annotations

import pytest
from ctxflow.streams.runtime.intake import IntakeGap, OffsetContinuity
from faust.types import TP

TURNS0, TURNS1 = TP("ctxflow.turns", 0), TP("ctxflow.turns", 1)


def test_contiguous_offsets_and_seeks_back_are_admitted() -> None:
    continuity = OffsetContinuity()
    for offset in (10, 11, 12):
        continuity.admit(1, TURNS0, offset, committed=10)
    for offset in (10, 11, 12, 13):  # a seek back to the committed offset replays what was handed out
        continuity.admit(1, TURNS0, offset, committed=10)
    continuity.admit(1, TURNS1, 0, committed=None)  # a partition never committed starts where it starts


def test_a_jump_past_the_next_offset_is_refused_with_the_missing_range() -> None:
    continuity = OffsetContinuity()
    continuity.admit(1, TURNS0, 10, committed=10)
    with pytest.raises(IntakeGap, match=r"ctxflow\.turns\[0\]: offset 14 follows 10; offsets 11\.\.13"):
        continuity.admit(1, TURNS0, 14, committed=10)


def test_the_first_message_of_a_generation_must_be_the_committed_offset() -> None:
    continuity = OffsetContinuity()
    continuity.admit(1, TURNS0, 10, committed=10)
    continuity.admit(1, TURNS0, 11, committed=10)
    # A rebalance sought the partition back to its commit (12): a message from before the seek (offset 20,
    # read ahead under the old generation) must not be taken as the new start.
    with pytest.raises(IntakeGap):
        continuity.admit(2, TURNS0, 20, committed=12)
    fresh = OffsetContinuity()
    fresh.admit(2, TURNS0, 12, committed=12)
    fresh.admit(2, TURNS0, 13, committed=12)


def test_a_partition_without_a_committed_offset_accepts_its_first_record() -> None:
    continuity = OffsetContinuity()
    continuity.admit(1, TURNS0, 7, committed=-1)  # "no commit yet" as some clients report it
    with pytest.raises(IntakeGap):
        continuity.admit(1, TURNS0, 9, committed=-1)
