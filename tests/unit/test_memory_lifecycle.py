"""The memory lifecycle state machine: legal moves only, revoked is final, only active is served."""

from __future__ import annotations

import pytest
from ctxflow.processors.memory import lifecycle
from ctxflow.processors.memory.lifecycle import ALLOWED, IllegalTransition, is_retrievable
from ctxflow.schemas import content_digest
from ctxflow.schemas.models import MemoryRecord, MemoryScope, MemoryStatus, MemoryType, ReviewState
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support_memory import NOW


def record(status: MemoryStatus = MemoryStatus.PROVISIONAL) -> MemoryRecord:
    return MemoryRecord(
        memory_id="mem-1", tenant_id="acme", scope=MemoryScope.USER, type=MemoryType.PREFERENCE, status=status,
        version=1, content="Prefers dark mode", content_digest=content_digest("Prefers dark mode"),
        created_at=NOW, updated_at=NOW, owner_id="u-1", subject="editor", attribute="theme", value="dark",
        source_run_id="r-1",
    )


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(list(MemoryStatus)), max_size=8))
def test_any_sequence_of_moves_follows_the_table(moves: list[MemoryStatus]) -> None:
    current = record()
    for to in moves:
        if to in ALLOWED[current.status]:
            moved = lifecycle.transition(current, to, NOW, "test")
            assert (moved.status, moved.version) == (to, current.version + 1)
            current = moved
        else:
            with pytest.raises(IllegalTransition):
                lifecycle.transition(current, to, NOW, "test")
        assert is_retrievable(current) is (current.status is MemoryStatus.ACTIVE)


def test_revoked_is_final_and_a_tombstone_keeps_provenance_not_content() -> None:
    tomb = lifecycle.revoke(lifecycle.activate(record(), NOW), NOW, "user deleted it")
    assert (tomb.content, tomb.value, tomb.content_digest, tomb.source_run_id, tomb.subject) == (
        None, None, content_digest("Prefers dark mode"), "r-1", "editor")
    for to in MemoryStatus:
        with pytest.raises(IllegalTransition):
            lifecycle.transition(tomb, to, NOW, "again")


def test_quarantine_opens_a_deterministic_review_item() -> None:
    moved, item = lifecycle.quarantine(record(), NOW, "contradicts mem-0", ("mem-0",))
    _, same = lifecycle.quarantine(record(), NOW, "contradicts mem-0", ("mem-0",))
    assert (moved.status, moved.review_state) == (MemoryStatus.QUARANTINED, ReviewState.OPEN)
    assert item == same and item.conflicting_ids == ("mem-0",) and not is_retrievable(moved)


def test_only_quarantined_records_are_reinstated_or_corrected() -> None:
    active = lifecycle.activate(record(), NOW)
    with pytest.raises(IllegalTransition):
        lifecycle.reinstate(active, NOW, "ops")
    with pytest.raises(IllegalTransition):
        lifecycle.correct(active, active, NOW, "ops")
