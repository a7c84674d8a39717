"""The memory gate processor: verdicts, merges, payload offload, hardening, review and tenant isolation."""

from __future__ import annotations

from dataclasses import asdict
from datetime import timedelta
from typing import Any

import pytest
from ctxflow.processors.memory.lifecycle import IllegalTransition, ReviewItem, is_retrievable
from ctxflow.processors.memory.policy import MemoryPolicy
from ctxflow.processors.memory.processor import RECORDS, MemoryGateProcessor, PayloadWrite
from ctxflow.processors.types import DictBudgetState, Position
from ctxflow.schemas import Codec
from ctxflow.schemas.models import (
    Invalidation,
    InvalidationKind,
    MemoryRecord,
    MemoryScope,
    MemoryStatus,
    MemoryType,
    MemoryVerdict,
    ReviewAction,
    ReviewState,
    Sensitivity,
    VerdictOutcome,
    Verification,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support_memory import NOW, candidate, shared_gate

POLICY = MemoryPolicy(retention_rules=frozenset({"pii-30d"}), inline_max_bytes=200)
POS = Position("memory.candidates", 0, 0)


def processor() -> MemoryGateProcessor:
    return MemoryGateProcessor(shared_gate(), lambda _tenant: POLICY)


def of(kind: type, outputs: list[Any]) -> list[Any]:
    return [o for o in outputs if isinstance(o, kind)]


def fact(content: str, value: str, evidence: Verification = Verification.HUMAN_APPROVED, **kw: Any) -> Any:
    return candidate(content, scope=MemoryScope.TENANT, type=MemoryType.FACT, subject="alice",
                     attribute="timezone", value=value, verification=evidence, verified_by="ops",
                     corroborating_run_ids=["r-7", "r-8"], **kw)


def test_an_accepted_candidate_is_written_provisional_then_hardened_active() -> None:
    p, state = processor(), DictBudgetState()
    out = p.process(candidate("Prefers answers in French"), POS, state, NOW)
    first, hardened = of(MemoryRecord, out)
    assert (first.status, first.version, hardened.status, hardened.version) == (
        MemoryStatus.PROVISIONAL, 1, MemoryStatus.ACTIVE, 2)
    (verdict,) = of(MemoryVerdict, out)
    assert (verdict.outcome, verdict.status, verdict.rule, verdict.memory_id) == (
        VerdictOutcome.ACCEPTED, MemoryStatus.ACTIVE, "user_memory", hardened.memory_id)
    assert (hardened.owner_id, hardened.policy_version, hardened.source_run_id) == ("u-1", POLICY.version, "r-1")
    assert is_retrievable(hardened)


def test_a_redelivered_candidate_changes_nothing_and_repeats_its_verdict() -> None:
    p, state = processor(), DictBudgetState()
    c = candidate("Prefers answers in French")
    first = of(MemoryVerdict, p.process(c, POS, state, NOW))
    snapshot = {k: dict(v) for k, v in state.tables.items()}
    again = p.process(c, POS, state, NOW + timedelta(minutes=5))
    assert again == first
    assert {k: dict(v) for k, v in state.tables.items()} == snapshot


def test_a_candidate_replayed_after_a_crash_that_lost_only_its_verdict_is_accepted_again_not_merged() -> None:
    # The worker persists the verdict table last: a crash in between leaves the record without its verdict.
    p, state = processor(), DictBudgetState()
    c = candidate("Prefers answers in French")
    first = of(MemoryVerdict, p.process(c, POS, state, NOW))[0]
    state.delete_state("memory_verdicts", f"{c.tenant_id}:{c.candidate_id}")
    (again,) = of(MemoryVerdict, p.process(c, POS, state, NOW))
    assert again == first
    assert state.get_state(RECORDS, f"{c.tenant_id}:{first.memory_id}").merge_count == 0


def test_a_supersession_replayed_after_a_crash_between_records_and_buckets_leaves_the_bucket_right() -> None:
    # Records are durable before buckets, buckets before verdicts: a crash after the records leaves the bucket as
    # it was before the candidate. The replay must bring it up to date, or the next contradiction would miss the
    # record it has to supersede.
    p, state = processor(), DictBudgetState()
    first = of(MemoryVerdict, p.process(fact("Alice works in CET", "CET", candidate_id="c-1"), POS, state, NOW))[0]
    buckets_before = dict(state.tables.get("memory_buckets", {}))
    second_candidate = fact("Alice works in PST", "PST", candidate_id="c-2")
    second = of(MemoryVerdict, p.process(second_candidate, POS, state, NOW))[0]
    state.tables["memory_buckets"] = dict(buckets_before)
    state.delete_state("memory_verdicts", f"acme:{second_candidate.candidate_id}")
    assert of(MemoryVerdict, p.process(second_candidate, POS, state, NOW)) == [second]
    third = of(MemoryVerdict, p.process(fact("Alice works in UTC", "UTC", candidate_id="c-3"), POS, state, NOW))[0]
    records = state.tables[RECORDS]
    assert records[f"acme:{first.memory_id}"].status is MemoryStatus.SUPERSEDED
    assert records[f"acme:{second.memory_id}"].superseded_by == third.memory_id
    assert [r.memory_id for r in records.values() if r.status is MemoryStatus.ACTIVE] == [third.memory_id]


def test_promoting_the_same_thing_twice_is_a_recorded_merge() -> None:
    p, state = processor(), DictBudgetState()
    written = of(MemoryVerdict, p.process(candidate("Prefers answers in French"), POS, state, NOW))[0]
    out = p.process(candidate("prefers answers in french.", candidate_id="c-2"), POS, state, NOW)
    (verdict,) = of(MemoryVerdict, out)
    assert (verdict.outcome, verdict.memory_id) == (VerdictOutcome.MERGED, written.memory_id)
    assert state.get_state(RECORDS, f"acme:{written.memory_id}").merge_count == 1


def test_a_near_duplicate_merges_into_the_existing_record() -> None:
    p, state = processor(), DictBudgetState()
    written = of(MemoryVerdict, p.process(candidate("Prefers dark mode in the editor"), POS, state, NOW))[0]
    out = p.process(candidate("Prefers dark mdoe in the editor", candidate_id="c-2"), POS, state, NOW)
    assert [(v.outcome, v.memory_id) for v in of(MemoryVerdict, out)] == [(VerdictOutcome.MERGED, written.memory_id)]
    assert of(MemoryRecord, out)[0].merge_count == 1


def test_large_content_goes_to_the_object_store_not_the_record() -> None:
    p, state = processor(), DictBudgetState()
    text = "Working style: " + "prefers small reviewable pull requests with tests first; " * 8
    out = p.process(candidate(text), POS, state, NOW)
    (write,) = of(PayloadWrite, out)
    records = of(MemoryRecord, out)
    assert write.content == text and write.ref.startswith("acme/sha256/")
    assert all(r.content is None and r.payload_ref == write.ref for r in records)


def test_a_rejected_secret_appears_in_no_output() -> None:
    p, state = processor(), DictBudgetState()
    key = "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"
    out = p.process(candidate(f"CI token is {key}"), POS, state, NOW)
    (verdict,) = out
    assert (verdict.outcome, verdict.rule, verdict.status, verdict.memory_id) == (
        VerdictOutcome.REJECTED, "secret_detected", None, None)
    assert key not in Codec().encode(verdict).decode("latin-1")
    assert state.tables.get(RECORDS, {}) == {}


def test_pii_under_a_retention_rule_is_kept_flagged() -> None:
    p, state = processor(), DictBudgetState()
    out = p.process(candidate("Send invoices to jane.doe@example.com", retention_rule="pii-30d"), POS, state, NOW)
    record = of(MemoryRecord, out)[-1]
    assert (record.sensitivity, record.pii_kinds, record.retention_policy) == (
        Sensitivity.PII, ["EMAIL_ADDRESS"], "pii-30d")


def test_a_contradiction_supersedes_the_old_value_and_invalidates_it() -> None:
    p, state = processor(), DictBudgetState()
    old = of(MemoryVerdict, p.process(fact("Alice works in CET", "CET"), POS, state, NOW))[0]
    out = p.process(fact("Alice moved to PST", "PST", candidate_id="c-2"), POS, state, NOW)
    # It keeps its content: its record and any retrieval index stop serving it, nothing is purged.
    assert [(i.target_type, i.target_id, i.kind) for i in of(Invalidation, out)] == [
        (layer, old.memory_id, InvalidationKind.INVALIDATION) for layer in ("memory_record", "retrieval_index")]
    assert state.get_state(RECORDS, f"acme:{old.memory_id}").status is MemoryStatus.SUPERSEDED


def test_a_weaker_contradiction_is_quarantined_for_review_and_reinstated() -> None:
    p, state = processor(), DictBudgetState()
    approved = of(MemoryVerdict, p.process(fact("Alice works in CET", "CET"), POS, state, NOW))[0]
    out = p.process(fact("Alice works in PST", "PST", Verification.CORROBORATED, candidate_id="c-2"), POS, state, NOW)
    (item,) = of(ReviewItem, out)
    (verdict,) = of(MemoryVerdict, out)
    assert (verdict.outcome, verdict.status) == (VerdictOutcome.ACCEPTED, MemoryStatus.QUARANTINED)
    assert item.conflicting_ids == (approved.memory_id,)
    # The approved record is untouched and still served; the newcomer is not, until a reviewer decides.
    assert state.get_state(RECORDS, f"acme:{approved.memory_id}").status is MemoryStatus.ACTIVE
    (reinstated,) = p.review("acme", verdict.memory_id, ReviewAction.REINSTATE, "ops-lead", state, NOW)
    assert (reinstated.status, reinstated.review_state) == (MemoryStatus.ACTIVE, ReviewState.REINSTATED)


def test_a_claimed_verification_that_does_not_hold_up_is_not_recorded_and_outranks_nothing() -> None:
    # A user preference needs no verification, so a claim of one passes the gate; but the tenant lists its
    # approvers and "mallory" is not one: the record keeps none, and a later contradiction supersedes it instead
    # of being held for review behind an approval nobody gave.
    p, state = MemoryGateProcessor(shared_gate(), lambda _t: MemoryPolicy(approvers=frozenset({"ops-lead"}))), \
        DictBudgetState()
    seat = {"type": MemoryType.PREFERENCE, "subject": "alice", "attribute": "seat"}
    claimed = of(MemoryRecord, p.process(candidate("Alice wants an aisle seat", value="aisle", **seat,
                                                   verification=Verification.HUMAN_APPROVED, verified_by="mallory"),
                                         POS, state, NOW))[-1]
    assert (claimed.status, claimed.verification) == (MemoryStatus.ACTIVE, Verification.NONE)
    out = p.process(candidate("Alice wants a window seat", value="window", candidate_id="c-2", **seat),
                    POS, state, NOW)
    assert not of(ReviewItem, out)
    assert state.get_state(RECORDS, f"acme:{claimed.memory_id}").status is MemoryStatus.SUPERSEDED
    # The same claim by a listed approver holds up, and is what the record keeps.
    out = p.process(candidate("Alice wants an aisle seat", value="aisle", **seat,
                              verification=Verification.HUMAN_APPROVED, verified_by="ops-lead", candidate_id="c-3"),
                    POS, state, NOW)
    (approved,) = [r for r in of(MemoryRecord, out) if r.status is MemoryStatus.ACTIVE]
    assert approved.verification is Verification.HUMAN_APPROVED


def test_revocation_leaves_a_tombstone_and_blocks_the_same_content() -> None:
    p, state = processor(), DictBudgetState()
    written = of(MemoryVerdict, p.process(candidate("Prefers answers in French"), POS, state, NOW))[0]
    tomb, *invalidations = p.review("acme", written.memory_id, ReviewAction.REVOKE, "u-1", state, NOW)
    assert (tomb.status, tomb.content, tomb.content_digest) == (
        MemoryStatus.REVOKED, None, candidate("Prefers answers in French").content_digest)
    assert [(i.kind, i.target_type, i.target_id) for i in invalidations] == [
        (InvalidationKind.TOMBSTONE, layer, written.memory_id)
        for layer in ("memory_record", "retrieval_index", "turn_content")]
    again = p.process(candidate("prefers answers in French", candidate_id="c-2"), POS, state, NOW)
    assert [(v.outcome, v.rule) for v in of(MemoryVerdict, again)] == [(VerdictOutcome.REJECTED, "revoked_digest")]
    reviewed = candidate("Prefers answers in French", candidate_id="c-3",
                         verification=Verification.HUMAN_APPROVED, verified_by="u-1")
    back = of(MemoryVerdict, p.process(reviewed, POS, state, NOW))
    assert back[0].outcome is VerdictOutcome.ACCEPTED
    with pytest.raises(IllegalTransition):
        p.review("acme", written.memory_id, ReviewAction.REINSTATE, "u-1", state, NOW)


def test_a_correction_replaces_a_quarantined_record_with_provenance() -> None:
    p, state = processor(), DictBudgetState()
    p.process(fact("Alice works in CET", "CET"), POS, state, NOW)
    out = p.process(fact("Alice works in PST", "PST", Verification.CORROBORATED, candidate_id="c-2"), POS, state, NOW)
    quarantined = of(MemoryVerdict, out)[0].memory_id
    old, new, *_ = p.review("acme", quarantined, ReviewAction.CORRECT, "ops-lead", state, NOW,
                           corrected_content="Alice works in MST", corrected_value="MST")
    assert (old.status, old.review_state, old.superseded_by) == (
        MemoryStatus.REVOKED, ReviewState.CORRECTED, new.memory_id)
    assert (new.status, new.supersedes, new.value) == (MemoryStatus.ACTIVE, quarantined, "MST")


def test_review_cannot_reach_another_tenants_record() -> None:
    p, state = processor(), DictBudgetState()
    written = of(MemoryVerdict, p.process(candidate("Prefers answers in French"), POS, state, NOW))[0]
    with pytest.raises(KeyError):
        p.review("ACME", written.memory_id, ReviewAction.REVOKE, "intruder", state, NOW)


# -- isolation ------------------------------------------------------------------------------------------------

TENANTS = ["acme", "ACME", "Acme"]
CONTENTS = ["Prefers answers in French", "Alice works in CET", "Alice works in PST", "Standups last 10 min",
            "Mail jane.doe@example.com", "Token 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"]

traffic = st.lists(
    st.tuples(
        st.sampled_from(TENANTS),
        st.sampled_from(CONTENTS),
        st.sampled_from([MemoryScope.USER, MemoryScope.TENANT, MemoryScope.SESSION]),
        st.sampled_from([MemoryType.PREFERENCE, MemoryType.FACT]),
        st.sampled_from([None, "CET", "PST"]),
        st.sampled_from([Verification.NONE, Verification.HUMAN_APPROVED, Verification.CORROBORATED]),
    ),
    min_size=1,
    max_size=25,
)


def _candidates(items: list[tuple[Any, ...]]) -> list[Any]:
    out = []
    for n, (tenant, content, scope, type_, value, evidence) in enumerate(items):
        # Shared user, session and run ids (and candidate ids) across tenants on purpose.
        out.append(candidate(content, tenant_id=tenant, candidate_id=f"c-{n}", event_id=f"e-{n}", scope=scope,
                             type=type_, subject="alice" if value else None, attribute="timezone" if value else None,
                             value=value, verification=evidence, verified_by="ops",
                             corroborating_run_ids=["r-7", "r-8"], retention_rule="pii-30d"))
    return out


def _run(cands: list[Any]) -> tuple[list[Any], DictBudgetState]:
    p, state, out = processor(), DictBudgetState(), []
    for n, c in enumerate(cands):
        out += p.process(c, Position("memory.candidates", 0, n), state, NOW + timedelta(seconds=n))
    return out, state


def _dump(output: Any) -> dict[str, Any]:
    return output.model_dump() if hasattr(output, "model_dump") else asdict(output)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(traffic)
def test_interleaved_tenants_never_affect_each_other(items: list[tuple[Any, ...]]) -> None:
    cands = _candidates(items)
    together, shared_state = _run(cands)
    for tenant in TENANTS:
        alone, _ = _run([c for c in cands if c.tenant_id == tenant])
        mine = [o for o in together if o.tenant_id == tenant]
        # Times differ (offsets differ), so compare everything but timestamps.
        strip = {"occurred_at", "updated_at", "created_at", "opened_at"}

        def view(outputs: list[Any], strip: set[str] = strip) -> list[Any]:
            return [{k: v for k, v in _dump(o).items() if k not in strip} for o in outputs]

        assert view(mine) == view(alone)
    # Every state key of every memory table starts with the tenant of the value stored under it.
    for table, values in shared_state.tables.items():
        for key, value in values.items():
            tenant = key.split(":", 1)[0]
            assert tenant in TENANTS, (table, key)
            if hasattr(value, "tenant_id"):
                assert value.tenant_id == tenant, (table, key)


def test_a_no_retention_candidate_leaves_only_a_metadata_verdict() -> None:
    from ctxflow.schemas.models import PrivacyMode

    p, state = processor(), DictBudgetState()
    text = "Prefers answers in French"
    (verdict,) = p.process(candidate(text, privacy=PrivacyMode.NO_RETENTION), POS, state, NOW)
    assert (verdict.outcome, verdict.rule, verdict.memory_id) == (VerdictOutcome.REJECTED, "no_retention_run", None)
    assert text not in Codec().encode(verdict).decode("latin-1")
    # Metadata only: the verdict, that the run is no-retention (so its earlier records are revoked), and the
    # candidate's id and event time in the dedup window.
    assert set(state.tables) == {"memory_verdicts", "memory_runs", "memory_dedup"}
    assert text not in repr(state.tables["memory_runs"])


def test_a_bootstrap_loosened_fact_is_flagged_on_record_and_verdict() -> None:
    policy = MemoryPolicy(bootstrap_until=NOW + timedelta(days=7))
    p, state = MemoryGateProcessor(shared_gate(), lambda _t: policy), DictBudgetState()
    c = candidate("The Berlin office closes at 18:00", scope=MemoryScope.TENANT, type=MemoryType.FACT)
    out = p.process(c, POS, state, NOW)
    (verdict,) = of(MemoryVerdict, out)
    assert (verdict.rule, verdict.bootstrap_loosened) == ("bootstrap_loosened", True)
    assert all(r.bootstrap_loosened for r in of(MemoryRecord, out))


def test_other_records_pass_through_untouched() -> None:
    from ctxflow.schemas.models import ItemKind, Role, Slot, TurnEvent

    turn = TurnEvent(event_id="e", tenant_id="acme", user_id="u", session_id="s", run_id="r", agent_id="a", seq=0,
                     role=Role.USER, kind=ItemKind.MESSAGE, slot=Slot.HISTORY, item_id="i", content="hi",
                     model="gpt-4o", occurred_at=NOW)
    state = DictBudgetState()
    assert processor().process(turn, POS, state, NOW) == []
    assert state.tables == {}
