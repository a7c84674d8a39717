"""Operators' memory commands in the memory processor: review, delete (record, user, tenant), refusals, dedup,
and the invalidation cascade a tombstone sends to every derived layer."""

from __future__ import annotations

from datetime import timedelta
from itertools import count
from typing import Any

from ctxflow.processors.memory.cascade import PayloadDelete
from ctxflow.processors.memory.commands import CommandRefused
from ctxflow.processors.memory.identity import identity_digest
from ctxflow.processors.memory.policy import MemoryPolicy
from ctxflow.processors.memory.processor import MemoryGateProcessor, PayloadWrite
from ctxflow.processors.types import DictBudgetState, Position
from ctxflow.schemas.models import (
    Decision,
    DecisionKind,
    Invalidation,
    InvalidationKind,
    MemoryCommand,
    MemoryCommandKind,
    MemoryRecord,
    MemoryScope,
    MemoryStatus,
    MemoryType,
    MemoryVerdict,
    ReviewAction,
    Summary,
    SummaryProvenance,
    VerdictOutcome,
    Verification,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support_memory import NOW, candidate, shared_gate

POLICY = MemoryPolicy(inline_max_bytes=200)
POS = Position("memory.commands", 0, 0)
_ids = count()


def processor() -> MemoryGateProcessor:
    return MemoryGateProcessor(shared_gate(), lambda _tenant: POLICY)


def of(kind: type, outputs: Any) -> list[Any]:
    return [o for o in outputs if isinstance(o, kind)]


def command(kind: MemoryCommandKind = MemoryCommandKind.DELETE, **fields: Any) -> MemoryCommand:
    base: dict[str, Any] = {"command_id": f"cmd-{next(_ids)}", "tenant_id": "acme", "kind": kind,
                            "issued_by": "ops", "issued_at": NOW + timedelta(hours=1)}
    return MemoryCommand(**(base | fields))


def promote(p: MemoryGateProcessor, state: DictBudgetState, content: str, **kw: Any) -> MemoryRecord:
    kw.setdefault("candidate_id", f"c-{next(_ids)}")
    out = p.process(candidate(content, **kw), POS, state, NOW)
    return of(MemoryRecord, out)[-1]


def layers(out: list[Any]) -> list[tuple[str, str, InvalidationKind]]:
    return [(i.target_type, i.target_id, i.kind) for i in of(Invalidation, out)]


def test_deleting_a_record_leaves_a_tombstone_invalidates_every_layer_and_blocks_its_content() -> None:
    p, state = processor(), DictBudgetState()
    record = promote(p, state, "Prefers answers in French")
    out = p.process(command(memory_id=record.memory_id, reason="user asked"), POS, state, NOW)
    (tomb,) = of(MemoryRecord, out)
    assert (tomb.status, tomb.content, tomb.value, tomb.content_digest, tomb.source_run_id) == (
        MemoryStatus.REVOKED, None, None, record.content_digest, record.source_run_id)
    assert tomb.reason == "deleted by ops: user asked" and tomb.version == record.version + 1
    assert layers(out) == [(layer, record.memory_id, InvalidationKind.TOMBSTONE)
                           for layer in ("memory_record", "retrieval_index", "turn_content")]
    again = p.process(candidate("prefers answers in french", candidate_id="c-again"), POS, state, NOW)
    assert [(v.outcome, v.rule) for v in of(MemoryVerdict, again)] == [(VerdictOutcome.REJECTED, "revoked_digest")]


def verdicts(out: list[Any]) -> list[tuple[VerdictOutcome, str]]:
    return [(v.outcome, v.rule) for v in of(MemoryVerdict, out)]


def test_one_users_deletion_blocks_their_memory_and_nobody_elses_identical_content() -> None:
    p, state = processor(), DictBudgetState()
    alice = promote(p, state, "Prefers answers in French", user_id="alice")
    p.process(command(memory_id=alice.memory_id, reason="erasure request"), POS, state, NOW)
    # Bob's identical preference is another memory (another owner): Alice's erasure does not touch it.
    bob = p.process(candidate("Prefers answers in French", user_id="bob", candidate_id="c-bob"), POS, state, NOW)
    assert verdicts(bob) == [(VerdictOutcome.ACCEPTED, "user_memory")]
    # So is the same words as Alice's working memory of a session (another scope).
    session = candidate("Prefers answers in French", user_id="alice", scope=MemoryScope.SESSION, candidate_id="c-s")
    assert verdicts(p.process(session, POS, state, NOW)) == [(VerdictOutcome.ACCEPTED, "session_memory")]
    # Alice's own memory stays blocked, whoever's run proposes it again.
    again = candidate("prefers answers in french.", user_id="alice", run_id="r-2", candidate_id="c-alice")
    assert verdicts(p.process(again, POS, state, NOW)) == [(VerdictOutcome.REJECTED, "revoked_digest")]


def test_a_tenant_wide_deletion_blocks_every_memory_it_deleted() -> None:
    p, state = processor(), DictBudgetState()
    for user in ("alice", "bob"):
        promote(p, state, "Prefers answers in French", user_id=user)
    assert len(of(MemoryRecord, p.process(command(), POS, state, NOW))) == 2
    for user in ("alice", "bob"):
        again = p.process(candidate("Prefers answers in French", user_id=user, candidate_id=f"c-{user}-2"),
                          POS, state, NOW)
        assert verdicts(again) == [(VerdictOutcome.REJECTED, "revoked_digest")]
    carol = p.process(candidate("Prefers answers in French", user_id="carol", candidate_id="c-carol"),
                      POS, state, NOW)
    assert verdicts(carol) == [(VerdictOutcome.ACCEPTED, "user_memory")]


def test_a_block_written_before_blocks_were_per_memory_still_refuses_the_content_until_review() -> None:
    # Changelogs written by an older worker key a block by the content's digest, naming the tombstone: it keeps
    # refusing that content for everyone in the tenant, as it did (an upgrade never undoes an erasure).
    p, state = processor(), DictBudgetState()
    alice = promote(p, state, "Prefers answers in French", user_id="alice")
    p.process(command(memory_id=alice.memory_id), POS, state, NOW)
    revoked = state.tables["memory_revoked"]
    revoked.pop(f"acme:{alice.memory_id}")
    digest = identity_digest("Prefers answers in French", alice.content_digest)
    revoked[f"acme:{digest}"] = alice.memory_id
    bob = p.process(candidate("Prefers answers in French", user_id="bob", candidate_id="c-bob"), POS, state, NOW)
    assert verdicts(bob) == [(VerdictOutcome.REJECTED, "revoked_digest")]
    approved = candidate("Prefers answers in French", user_id="alice", candidate_id="c-ok",
                         verification=Verification.HUMAN_APPROVED, verified_by="dpo")
    assert verdicts(p.process(approved, POS, state, NOW))[0][0] is VerdictOutcome.ACCEPTED
    bob = p.process(candidate("Prefers answers in French", user_id="bob", candidate_id="c-bob-2"), POS, state, NOW)
    assert verdicts(bob) == [(VerdictOutcome.ACCEPTED, "user_memory")]


def test_a_redelivered_command_changes_nothing() -> None:
    p, state = processor(), DictBudgetState()
    record = promote(p, state, "Prefers answers in French")
    delete = command(memory_id=record.memory_id)
    assert of(MemoryRecord, p.process(delete, POS, state, NOW))
    before = {name: dict(table) for name, table in state.tables.items()}
    assert p.process(delete, POS, state, NOW) == []
    assert {name: dict(table) for name, table in state.tables.items()} == before


def test_deleting_a_user_reaches_their_records_in_every_scope_and_nobody_elses() -> None:
    p, state = processor(), DictBudgetState()
    mine = [promote(p, state, "Prefers answers in French"),
            promote(p, state, "Acme's plan has 50 seats", scope=MemoryScope.TENANT, type=MemoryType.FACT,
                    verification=Verification.HUMAN_APPROVED, verified_by="ops")]
    theirs = promote(p, state, "Prefers dark mode", user_id="u-2")
    out = p.process(command(user_id="u-1"), POS, state, NOW)
    assert sorted(r.memory_id for r in of(MemoryRecord, out)) == sorted(r.memory_id for r in mine)
    assert all(r.status is MemoryStatus.REVOKED and r.reason == "deleted by ops (user u-1)"
               for r in of(MemoryRecord, out))
    assert p.process(command(), POS, state, NOW)[0].memory_id == theirs.memory_id  # the tenant's: what is left


def test_a_shared_payload_is_deleted_only_with_its_last_record() -> None:
    p, state = processor(), DictBudgetState()
    big = "Runbook: " + " ".join(f"step {i}" for i in range(80))
    first, second = promote(p, state, big), promote(p, state, big, user_id="u-2")
    assert first.payload_ref == second.payload_ref is not None and first.memory_id != second.memory_id
    out = p.process(command(memory_id=first.memory_id), POS, state, NOW)
    assert of(PayloadDelete, out) == [] and "payload" not in [t for t, _, _ in layers(out)]
    out = p.process(command(memory_id=second.memory_id), POS, state, NOW)
    assert of(PayloadDelete, out) == [PayloadDelete("acme", second.payload_ref)]
    assert ("payload", second.payload_ref, InvalidationKind.TOMBSTONE) in layers(out)


def test_a_summary_of_only_the_deleted_record_is_removed_one_of_several_sources_withdrawn() -> None:
    p, state = processor(), DictBudgetState()
    gone, kept = promote(p, state, "Prefers answers in French"), promote(p, state, "Prefers dark mode")

    def summary(summary_id: str, sources: list[str]) -> Summary:
        return Summary(summary_id=summary_id, job_id="j", tenant_id="acme", user_id="u-1", session_id="s-1",
                       run_id="r-9", slot="retrieved", text="...", token_count=5, source_ids=sources,
                       source_digests=["0" * 64] * len(sources), summarizer="s", summarizer_version="1", depth=1,
                       fidelity=1.0, produced_at=NOW)

    p.process(summary("sum-alone", [gone.memory_id]), POS, state, NOW)
    p.process(summary("sum-shared", [gone.memory_id, kept.memory_id, "turn-7"]), POS, state, NOW)
    out = p.process(command(memory_id=gone.memory_id), POS, state, NOW)
    summaries = {i.target_id: (i.kind, i.run_id) for i in of(Invalidation, out) if i.target_type == "summary"}
    assert summaries == {"sum-alone": (InvalidationKind.TOMBSTONE, "r-9"),
                         "sum-shared": (InvalidationKind.INVALIDATION, "r-9")}
    # The run they were made for is told to stop reading both: their text quoted the deleted record.
    (notice,) = [d for d in of(Decision, out) if d.kind is DecisionKind.STALE_CONTEXT]
    assert notice.run_id == "r-9"
    assert {(m.memory_id, m.status) for m in notice.stale} == {("sum-alone", "revoked"), ("sum-shared", "withdrawn")}
    # A summary of it produced after the deletion (the summarizer lagged) is invalidated on arrival.
    late = p.process(summary("sum-late", [gone.memory_id]), POS, state, NOW)
    assert [(i.target_type, i.target_id) for i in of(Invalidation, late)] == [("summary", "sum-late")]
    # The invalidations come back to the worker as input (for the planner): the memory processor ignores its own.
    state.dirty.clear()
    assert all(p.process(i, Position("invalidations", 0, n), state, NOW) == []
               for n, i in enumerate(of(Invalidation, [*out, *late])))
    assert not state.dirty
    # The planner, earlier in the chain, learns of a deletion only when its invalidation comes back: when it swaps
    # that summary in before then, the swap's text is withdrawn again and the run told to drop it, under a notice
    # id of its own.
    swap = Decision(decision_id="swap-1", tenant_id="acme", run_id="r-9", kind=DecisionKind.SWAP,
                    reason="95% of the slot", decided_at=NOW + timedelta(minutes=5), summary=SummaryProvenance(
                        summary_id="sum-late", text="...", token_count=5, source_ids=[gone.memory_id],
                        source_digests=["0" * 64], summarizer="s", summarizer_version="1", depth=1, fidelity=1.0))
    after = p.process(summary("sum-other", ["turn-1"]), POS, state, NOW, [swap])
    assert [(i.target_type, i.target_id) for i in of(Invalidation, after)] == [("summary", "sum-late")]
    notices = [d for d in of(Decision, after) if d.kind is DecisionKind.STALE_CONTEXT]
    assert {(d.run_id, d.stale[0].memory_id) for d in notices} == {("r-9", "sum-late")}
    first = [d for d in of(Decision, late) if d.kind is DecisionKind.STALE_CONTEXT]
    assert {d.decision_id for d in notices} - {d.decision_id for d in first}  # not deduplicated away by a window
    assert p.process(summary("sum-other", ["turn-1"]), POS, state, NOW, [swap.model_copy(
        update={"summary": swap.summary.model_copy(update={"summary_id": "sum-fine"})})]) == []
    assert state.get_state("memory_records", f"acme:{kept.memory_id}").status is MemoryStatus.ACTIVE


def test_review_commands_reinstate_correct_and_revoke() -> None:
    p, state = processor(), DictBudgetState()
    fact = {"scope": MemoryScope.TENANT, "type": MemoryType.FACT, "subject": "alice", "attribute": "timezone",
            "verified_by": "ops", "corroborating_run_ids": ["r-7", "r-8"]}
    promote(p, state, "Alice works in CET", value="CET", verification=Verification.HUMAN_APPROVED, **fact)
    doubted = promote(p, state, "Alice works in PST", value="PST", verification=Verification.CORROBORATED, **fact)
    assert doubted.status is MemoryStatus.QUARANTINED
    review = MemoryCommandKind.REVIEW
    (back,) = p.process(command(review, memory_id=doubted.memory_id, action=ReviewAction.REINSTATE), POS, state, NOW)
    assert (back.status, back.reason) == (MemoryStatus.ACTIVE, "reinstated by ops")
    out = p.process(command(review, memory_id=doubted.memory_id, action=ReviewAction.REVOKE), POS, state, NOW)
    assert of(MemoryRecord, out)[0].status is MemoryStatus.REVOKED


def test_commands_that_cannot_be_applied_are_refused_with_a_reason_once() -> None:
    p, state = processor(), DictBudgetState()
    record = promote(p, state, "Prefers answers in French")
    cases = {
        command(MemoryCommandKind.PIN, memory_id="mem-unknown"): "acme has no memory mem-unknown",
        command(MemoryCommandKind.REHYDRATE, memory_id="mem-gone"): "acme has no memory mem-gone",
        command(memory_id="mem-unknown"): "tenant acme has no memory mem-unknown",
        command(MemoryCommandKind.REVIEW, memory_id=record.memory_id, action=ReviewAction.REINSTATE):
            "only a quarantined record is reinstated",
        command(memory_id=record.memory_id, tenant_id="other"): "tenant other has no memory",
    }
    for cmd, why in cases.items():
        (refused,) = p.process(cmd, POS, state, NOW)
        assert isinstance(refused, CommandRefused) and why in refused.reason, (cmd.kind, refused)
        assert p.process(cmd, POS, state, NOW) == []  # redelivered: refused once, not twice
    assert state.get_state("memory_records", f"acme:{record.memory_id}").status is MemoryStatus.ACTIVE


_CONTENTS = ["Prefers answers in French", "Prefers dark mode", "Likes short replies", "Works late on Fridays"]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["delete_id", "delete_user", "revoke", "pin"]), st.integers(0, 3),
                          st.sampled_from(["u-1", "u-2"])), min_size=1, max_size=8),
       st.lists(st.integers(0, 7), max_size=8))
def test_redelivering_any_command_anywhere_is_a_no_op(steps: list[tuple[str, int, str]], repeats: list[int]) -> None:
    def world() -> tuple[MemoryGateProcessor, DictBudgetState, list[str]]:
        p, state = processor(), DictBudgetState()
        ids = [promote(p, state, c, user_id="u-1" if i % 2 else "u-2", candidate_id=f"c-{i}").memory_id
               for i, c in enumerate(_CONTENTS)]
        return p, state, ids

    p, state, ids = world()
    commands: list[MemoryCommand] = []
    for n, (kind, target, user) in enumerate(steps):
        fields: dict[str, Any] = {"command_id": f"cmd-p{n}"}
        if kind == "delete_id":
            commands.append(command(memory_id=ids[target], **fields))
        elif kind == "delete_user":
            commands.append(command(user_id=user, **fields))
        elif kind == "revoke":
            commands.append(command(MemoryCommandKind.REVIEW, memory_id=ids[target], action=ReviewAction.REVOKE,
                                    **fields))
        else:
            commands.append(command(MemoryCommandKind.PIN, memory_id=ids[target], **fields))
    once = [out for c in commands for out in p.process(c, POS, state, NOW)]
    p2, state2, _ = world()
    with_repeats: list[Any] = []
    for n, c in enumerate(commands):
        with_repeats += p2.process(c, POS, state2, NOW)
        for r in repeats:
            if r <= n:
                with_repeats += p2.process(commands[r], POS, state2, NOW)
    assert with_repeats == once
    assert state2.tables == state.tables


def test_payload_of_a_big_record_is_written_before_and_deleted_after() -> None:
    p, state = processor(), DictBudgetState()
    big = "Runbook: " + " ".join(f"step {i}" for i in range(80))
    written = p.process(candidate(big), POS, state, NOW)
    (write,) = of(PayloadWrite, written)
    record = of(MemoryRecord, written)[-1]
    out = p.process(command(memory_id=record.memory_id), POS, state, NOW)
    assert of(PayloadDelete, out) == [PayloadDelete("acme", write.ref)]


def test_a_tenants_deletion_never_reaches_a_tenant_whose_id_differs_only_in_case() -> None:
    p, state = processor(), DictBudgetState()
    ours = promote(p, state, "Prefers answers in French")
    theirs = [promote(p, state, "Prefers answers in French", tenant_id=t) for t in ("ACME", "Acme")]
    out = p.process(command(user_id="u-1"), POS, state, NOW) + p.process(command(), POS, state, NOW)
    assert {(o.tenant_id, o.memory_id) for o in of(MemoryRecord, out)} == {("acme", ours.memory_id)}
    assert {o.tenant_id for o in of(Invalidation, out)} == {"acme"}
    for record in theirs:
        assert state.get_state("memory_records", f"{record.tenant_id}:{record.memory_id}").status is (
            MemoryStatus.ACTIVE)
    refused = p.process(command(memory_id=theirs[0].memory_id), POS, state, NOW)
    assert isinstance(refused[0], CommandRefused)  # another tenant's id is unknown here
