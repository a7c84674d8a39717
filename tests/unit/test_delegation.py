"""Delegation rules (processors.delegation) and no-retention learnt late (processors.memory.late_privacy): a child
run is held to its parent's user, policy and privacy and to a session of its own, and what a run's candidates put
in memory before its privacy was known is revoked."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from ctxflow.processors.delegation import LINEAGE, DelegationProcessor, Lineage
from ctxflow.processors.memory.policy import MemoryPolicy
from ctxflow.processors.memory.processor import MemoryGateProcessor
from ctxflow.processors.types import DictBudgetState, Position
from ctxflow.schemas.models import (
    Decision,
    DecisionKind,
    Invalidation,
    InvalidationKind,
    ItemKind,
    MemoryRecord,
    MemoryScope,
    MemoryStatus,
    MemoryType,
    MemoryVerdict,
    PrivacyMode,
    Role,
    RunEvent,
    RunPhase,
    Slot,
    TurnEvent,
    VerdictOutcome,
)
from ctxflow.streams.sdk import RunContext

from tests.support_memory import NOW, candidate, shared_gate

POS = Position("runs", 0, 0)


def chain() -> tuple[DelegationProcessor, MemoryGateProcessor]:
    return DelegationProcessor(), MemoryGateProcessor(shared_gate(), lambda _tenant: MemoryPolicy())


def feed(processors: tuple[Any, ...], state: DictBudgetState, event: Any) -> list[Any]:
    out: list[Any] = []
    for p in processors:
        out += p.process(event, POS, state, NOW, out)
    return out


def started(run_id: str, parent: str | None = None, *, tenant: str = "acme", user: str = "u-1",
            policy: str | None = "p-1", privacy: PrivacyMode = PrivacyMode.RETAINED,
            session: str | None = None) -> RunEvent:
    return RunEvent(event_id=f"ev-{run_id}", tenant_id=tenant, user_id=user, session_id=session or f"s-{run_id}",
                    run_id=run_id, parent_run_id=parent, workflow_id="r-root" if parent else run_id, agent_id="a",
                    phase=RunPhase.STARTED, policy_version=policy, privacy=privacy, occurred_at=NOW)


def rejections(out: list[Any]) -> list[Decision]:
    return [o for o in out if isinstance(o, Decision) and o.kind is DecisionKind.REJECTION]


def test_a_child_that_inherits_everything_is_not_rejected() -> None:
    procs, state = chain(), DictBudgetState()
    feed(procs, state, started("r-root"))
    assert feed(procs, state, started("r-child", "r-root", policy=None)) == []
    assert feed(procs, state, started("r-grandchild", "r-child", policy="p-1")) == []  # inherited p-1


def test_each_violation_is_a_rejection_naming_its_rule_for_the_child_run() -> None:
    procs, state = chain(), DictBudgetState()
    feed(procs, state, started("r-root"))
    cases = {
        "r-other-user": ({"user": "u-2"}, "delegation_other_user"),
        "r-other-policy": ({"policy": "p-2"}, "delegation_other_policy"),
    }
    for run, (fields, rule) in cases.items():
        (decision,) = rejections(feed(procs, state, started(run, "r-root", **fields)))
        assert decision.run_id == run and decision.reason.startswith(rule), decision.reason
        again = rejections(feed(procs, state, started(run, "r-root", **fields)))
        assert again == [decision]  # a replayed start: the same decision id
    # Held to its parent's facts: its own child, naming the parent's user, breaks nothing.
    assert feed(procs, state, started("r-gc", "r-other-user")) == []


def test_a_run_never_writes_another_users_memory_not_even_a_child_refused_for_naming_one() -> None:
    procs, state = chain(), DictBudgetState()
    feed(procs, state, started("r-root"))
    feed(procs, state, started("r-other-user", "r-root", user="u-2"))  # refused, held to u-1
    stolen = candidate("Prefers answers in French", run_id="r-other-user", user_id="u-2", parent_run_id="r-root")
    (verdict,) = [o for o in feed(procs, state, stolen) if isinstance(o, MemoryVerdict)]
    assert (verdict.outcome, verdict.rule) == (VerdictOutcome.REJECTED, "not_the_runs_user")
    assert not [o for o in feed(procs, state, stolen) if isinstance(o, MemoryRecord)]
    # A root run's candidate naming a user other than its run's is refused the same way.
    forged = candidate("Prefers dark mode", run_id="r-root", user_id="u-3", candidate_id="c-forged")
    (verdict,) = [o for o in feed(procs, state, forged) if isinstance(o, MemoryVerdict)]
    assert verdict.rule == "not_the_runs_user"
    own = candidate("Prefers dark mode", run_id="r-root", user_id="u-1", candidate_id="c-own")
    (verdict,) = [o for o in feed(procs, state, own) if isinstance(o, MemoryVerdict)]
    assert verdict.outcome is VerdictOutcome.ACCEPTED


def test_a_retained_child_of_a_no_retention_parent_is_rejected_and_its_candidates_refused() -> None:
    procs, state = chain(), DictBudgetState()
    feed(procs, state, started("r-root", privacy=PrivacyMode.NO_RETENTION))
    (decision,) = rejections(feed(procs, state, started("r-child", "r-root")))
    assert decision.reason.startswith("delegation_privacy_downgrade") and "no-retention" in decision.reason
    child = candidate("Prefers answers in French", run_id="r-child", parent_run_id="r-root")
    (verdict,) = [o for o in feed(procs, state, child) if isinstance(o, MemoryVerdict)]
    assert (verdict.outcome, verdict.rule) == (VerdictOutcome.REJECTED, "no_retention_run")
    # And its children are no-retention too (the privacy it was held to), even when they claim retained.
    (decision,) = rejections(feed(procs, state, started("r-grandchild", "r-child")))
    assert decision.reason.startswith("delegation_privacy_downgrade")


def _verdict(out: list[Any]) -> MemoryVerdict:
    (verdict,) = [o for o in out if isinstance(o, MemoryVerdict)]
    return verdict


def _session_note(run_id: str, session: str, content: str = "Order 4411 is the one that failed") -> Any:
    return candidate(content, run_id=run_id, session_id=session, parent_run_id="r-root", scope=MemoryScope.SESSION,
                     type=MemoryType.FACT, candidate_id=f"c-{run_id}-{session}-{content[:5]}")


def test_a_child_in_its_parents_session_is_rejected_and_refused_that_sessions_memory() -> None:
    procs, state = chain(), DictBudgetState()
    feed(procs, state, started("r-root"))
    (decision,) = rejections(feed(procs, state, started("r-squatter", "r-root", session="s-r-root")))
    assert decision.run_id == "r-squatter" and decision.reason.startswith("delegation_shared_session"), decision.reason
    assert "s-r-root" in decision.reason
    assert rejections(feed(procs, state, started("r-squatter", "r-root", session="s-r-root"))) == [decision]
    verdict = _verdict(feed(procs, state, _session_note("r-squatter", "s-r-root")))
    assert (verdict.outcome, verdict.rule) == (VerdictOutcome.REJECTED, "delegation_shared_session")
    assert "r-squatter" in verdict.reason
    # Only its parent's session is closed to it: user scope, and a session of its own, are not.
    assert _verdict(feed(procs, state, candidate("Likes tables", run_id="r-squatter", parent_run_id="r-root"))
                    ).outcome is VerdictOutcome.ACCEPTED
    own = _verdict(feed(procs, state, _session_note("r-squatter", "s-r-root/r-squatter")))
    assert (own.outcome, own.rule) == (VerdictOutcome.ACCEPTED, "session_memory")
    # Its own children are checked against the session it named.
    (grand,) = rejections(feed(procs, state, started("r-gc", "r-squatter", session="s-r-root")))
    assert grand.reason.startswith("delegation_shared_session")
    assert feed(procs, state, started("r-gc2", "r-squatter", session="s-r-root/r-gc2")) == []
    # The parent's own session memory is untouched by all this.
    parents = _verdict(feed(procs, state, candidate("Order 4411 is the one that failed", run_id="r-root",
                                                    session_id="s-r-root", scope=MemoryScope.SESSION,
                                                    type=MemoryType.FACT, candidate_id="c-parent")))
    assert (parents.outcome, parents.rule) == (VerdictOutcome.ACCEPTED, "session_memory")


def test_a_childs_session_candidate_read_before_its_start_is_refused_by_its_parents_session() -> None:
    procs, state = chain(), DictBudgetState()
    feed(procs, state, started("r-root"))
    early = _verdict(feed(procs, state, _session_note("r-kid", "s-r-root")))
    assert (early.outcome, early.rule) == (VerdictOutcome.REJECTED, "delegation_shared_session")


def test_sdk_children_in_sessions_of_their_own_break_no_rule_and_keep_session_memory() -> None:
    procs, state = chain(), DictBudgetState()
    root = RunContext(tenant_id="acme", user_id="u-1", session_id="s-1", agent_id="planner", model="gpt-4o",
                      run_id="r-root", policy_version="p-1")
    child = root.child("researcher")
    remote = RunContext.delegated(child.handoff().model_dump_json(), "critic")
    for run in (root, child, remote):
        assert feed(procs, state, run.started(at=NOW)) == []
    for run in (child, remote):
        note = run.memory_candidate(MemoryScope.SESSION, MemoryType.FACT, "Order 4411 failed at line 88",
                                    confidence=0.9, at=NOW)
        out = feed(procs, state, note)
        assert (_verdict(out).outcome, _verdict(out).rule) == (VerdictOutcome.ACCEPTED, "session_memory")
        record = [o for o in out if isinstance(o, MemoryRecord)][-1]
        assert record.owner_id == run.session_id != root.session_id


def test_lineage_values_written_before_sessions_were_kept_still_load_and_check_the_rest() -> None:
    (spec,) = DelegationProcessor.tables
    assert spec.name == LINEAGE
    old = spec.load(json.dumps(["u-1", "p-1", "no_retention"]).encode())
    assert old == Lineage("u-1", "p-1", PrivacyMode.NO_RETENTION, None, None)
    new = Lineage("u-1", None, PrivacyMode.RETAINED, "s-1/r-2", "s-1")
    assert spec.load(spec.dump(new)) == new
    # A worker restarting on an old changelog: the parent's session is unknown, so a child naming it is not
    # refused for it (nothing to compare), but the rules the old value can answer still hold.
    procs, state = chain(), DictBudgetState()
    state.put_state(LINEAGE, "acme:r-root", old)
    (decision,) = rejections(feed(procs, state, started("r-kid", "r-root", session="s-r-root")))
    assert decision.reason.startswith("delegation_privacy_downgrade") and "shared_session" not in decision.reason
    note = _session_note("r-kid", "s-r-root")
    assert _verdict(feed(procs, state, note)).rule == "no_retention_run"
    procs, state = chain(), DictBudgetState()
    state.put_state(LINEAGE, "acme:r-root", Lineage("u-1", "p-1", PrivacyMode.RETAINED))
    assert feed(procs, state, started("r-kid", "r-root", session="s-r-root")) == []
    assert _verdict(feed(procs, state, note)).outcome is VerdictOutcome.ACCEPTED


def test_a_child_whose_parent_is_unknown_stands_on_its_own_facts() -> None:
    procs, state = chain(), DictBudgetState()
    assert feed(procs, state, started("r-orphan", "r-never-seen", user="u-9")) == []
    assert rejections(feed(procs, state, started("r-next", "r-orphan", user="u-1")))  # checked against it


def test_tenants_differing_in_case_never_see_each_others_runs() -> None:
    procs, state = chain(), DictBudgetState()
    feed(procs, state, started("r-root", tenant="acme", privacy=PrivacyMode.NO_RETENTION))
    assert feed(procs, state, started("r-child", "r-root", tenant="ACME")) == []  # ACME's r-root is unknown


def _accepted(out: list[Any]) -> MemoryRecord:
    (verdict,) = [o for o in out if isinstance(o, MemoryVerdict)]
    assert verdict.outcome is VerdictOutcome.ACCEPTED
    return [o for o in out if isinstance(o, MemoryRecord)][-1]


@pytest.mark.parametrize("revealed_by", ["turn", "run", "candidate", "delegation"])
def test_no_retention_learnt_late_revokes_what_the_run_already_put_in_memory(revealed_by: str) -> None:
    procs, state = chain(), DictBudgetState()
    if revealed_by == "delegation":
        feed(procs, state, started("r-root", privacy=PrivacyMode.NO_RETENTION))
    first = _accepted(feed(procs, state, candidate("Prefers answers in French", run_id="r-9")))
    second = _accepted(feed(procs, state, candidate("Likes short summaries", run_id="r-9", candidate_id="c-2")))
    other = _accepted(feed(procs, state, candidate("Works in CET", run_id="r-10", candidate_id="c-3")))
    later = NOW + timedelta(minutes=1)
    reveal: Any = {
        "turn": TurnEvent(event_id="t-1", tenant_id="acme", user_id="u-1", session_id="s-1", run_id="r-9",
                          agent_id="a", seq=0, model="gpt-4o", role=Role.USER, kind=ItemKind.MESSAGE,
                          slot=Slot.HISTORY, item_id="i-1", content_digest="0" * 64, token_count=3,
                          privacy=PrivacyMode.NO_RETENTION, occurred_at=later),
        "run": started("r-9", privacy=PrivacyMode.NO_RETENTION).model_copy(update={"occurred_at": later}),
        "candidate": candidate("Uses vim", run_id="r-9", candidate_id="c-4", privacy=PrivacyMode.NO_RETENTION,
                               occurred_at=later),
        "delegation": started("r-9", "r-root").model_copy(update={"occurred_at": later}),
    }[revealed_by]
    out = feed(procs, state, reveal)
    tombs = [o for o in out if isinstance(o, MemoryRecord)]
    assert {t.memory_id for t in tombs} == {first.memory_id, second.memory_id}
    assert all(t.status is MemoryStatus.REVOKED and t.content is None for t in tombs)
    assert all(t.reason.startswith("no_retention_run: run r-9") for t in tombs)
    invalidations = [o for o in out if isinstance(o, Invalidation)]
    assert {(i.target_id, i.kind) for i in invalidations} == {(t.memory_id, InvalidationKind.TOMBSTONE) for t in tombs}
    assert state.tables["memory_records"][f"acme:{other.memory_id}"].status is MemoryStatus.ACTIVE  # another run
    assert feed(procs, state, reveal) == [o for o in out if not isinstance(o, MemoryRecord | Invalidation)]
    (verdict,) = [o for o in feed(procs, state, candidate("Enjoys jazz", run_id="r-9", candidate_id="c-5"))
                  if isinstance(o, MemoryVerdict)]
    assert verdict.rule == "no_retention_run"
