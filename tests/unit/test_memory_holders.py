"""Holdings and stale-context notices: which live runs hold which memory, and who is told when it goes stale."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from ctxflow.processors.memory import holders
from ctxflow.processors.memory.identity import candidate_memory_id
from ctxflow.processors.memory.policy import MemoryPolicy
from ctxflow.processors.memory.processor import MemoryGateProcessor
from ctxflow.processors.types import DictBudgetState, Position
from ctxflow.schemas import content_digest
from ctxflow.schemas.models import (
    Decision,
    DecisionKind,
    ItemKind,
    MemoryRecord,
    MemoryScope,
    MemoryStatus,
    MemoryType,
    ReviewAction,
    Role,
    Slot,
    StaleMemory,
    TurnEvent,
    Verification,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support_memory import NOW, candidate, shared_gate

POLICY = MemoryPolicy()
POS = Position("turns", 0, 0)
ZONES = ("CET", "PST", "UTC")


def processor() -> MemoryGateProcessor:
    return MemoryGateProcessor(shared_gate(), lambda _tenant: POLICY)


def zone(value: str, tenant: str = "acme", n: int = 0, **kw: Any) -> Any:
    return candidate(f"Alice works in the {value} timezone", tenant_id=tenant, scope=MemoryScope.TENANT,
                     type=MemoryType.FACT, subject="alice", attribute="timezone", value=value,
                     verification=Verification.HUMAN_APPROVED, verified_by="ops", candidate_id=f"c-{n}",
                     event_id=f"e-{n}", occurred_at=NOW + timedelta(seconds=n), **kw)


def recall(memory_id: str, run_id: str, seq: int, tenant: str = "acme", user: str = "u-1") -> TurnEvent:
    text = "recalled"
    return TurnEvent(event_id=f"t-{run_id}-{seq}", tenant_id=tenant, user_id=user, session_id="s-1", run_id=run_id,
                     agent_id="a", seq=seq, role=Role.TOOL, kind=ItemKind.MEMORY, slot=Slot.RETRIEVED,
                     item_id=memory_id, content=text, content_digest=content_digest(text), model="gpt-4o",
                     occurred_at=NOW + timedelta(seconds=seq))


def active_id(outputs: list[Any]) -> str:
    return next(o.memory_id for o in outputs if isinstance(o, MemoryRecord) and o.status is MemoryStatus.ACTIVE)


def stale_decisions(outputs: list[Any]) -> list[Decision]:
    return [o for o in outputs if isinstance(o, Decision) and o.kind is DecisionKind.STALE_CONTEXT]


def test_a_run_retrieving_a_memory_read_after_it_went_stale_is_told_at_once() -> None:
    # Turns and candidates are separate topics, read in no set order: the retrieval may come after the
    # supersession. Its run is told when its turn is read; a redelivery of the turn repeats the same decision (same
    # id: a subscriber applies it once), and retrieving the replacement tells nothing.
    p, state = processor(), DictBudgetState()
    old = active_id(list(p.process(zone("CET", n=1), POS, state, NOW)))
    new = active_id(list(p.process(zone("PST", n=2), POS, state, NOW)))
    notices = stale_decisions(list(p.process(recall(old, "r-late", 3), POS, state, NOW)))
    assert [(d.run_id, d.stale) for d in notices] == [
        ("r-late", [StaleMemory(memory_id=old, status="superseded", replaced_by=new)])]
    again = stale_decisions(list(p.process(recall(old, "r-late", 3), POS, state, NOW)))
    assert [d.decision_id for d in again] in ([], [notices[0].decision_id])
    assert stale_decisions(list(p.process(recall(new, "r-late", 4), POS, state, NOW))) == []


def test_a_superseded_memory_notifies_every_live_run_holding_it_with_its_replacement() -> None:
    p, state = processor(), DictBudgetState()
    old = active_id(list(p.process(zone("CET", n=1), POS, state, NOW)))
    for run in ("r-a", "r-b"):
        p.process(recall(old, run, 1), POS, state, NOW)
    p.process(recall(old, "r-c", 1, tenant="ACME"), POS, state, NOW)  # same id string, another tenant
    out = list(p.process(zone("PST", n=2), POS, state, NOW))
    new = active_id(out)
    notices = stale_decisions(out)
    assert [(d.tenant_id, d.run_id) for d in notices] == [("acme", "r-a"), ("acme", "r-b")]
    for d in notices:
        assert d.stale == [StaleMemory(memory_id=old, status="superseded", replaced_by=new)]
        assert old in d.reason and new in d.reason and (d.user_id, d.session_id) == ("u-1", "s-1")
    assert len({d.decision_id for d in notices}) == 2
    # Told once: the holdings are gone, so a later revocation of the superseded record says nothing more.
    assert stale_decisions(p.review("acme", old, ReviewAction.REVOKE, "ops", state, NOW)) == []


def test_a_revoked_memory_notifies_its_holders_and_the_notice_is_deterministic() -> None:
    def play() -> list[Decision]:
        p, state = processor(), DictBudgetState()
        mid = active_id(list(p.process(zone("CET", n=1), POS, state, NOW)))
        p.process(recall(mid, "r-a", 3), POS, state, NOW)
        return stale_decisions(p.review("acme", mid, ReviewAction.REVOKE, "ops", state, NOW + timedelta(hours=1)))

    first, second = play(), play()
    assert first == second and len(first) == 1
    assert (first[0].stale[0].status, first[0].stale[0].replaced_by) == ("revoked", None)
    assert first[0].decided_at == NOW + timedelta(hours=1)  # the record's own time, never the wall clock


def test_a_retired_run_holds_nothing() -> None:
    p, state = processor(), DictBudgetState()
    old = active_id(list(p.process(zone("CET", n=1), POS, state, NOW)))
    p.process(recall(old, "r-a", 1), POS, state, NOW)
    p.retire(["acme:r-a"], state)
    assert stale_decisions(list(p.process(zone("PST", n=2), POS, state, NOW))) == []
    assert not state.tables.get(holders.HELD) and not state.tables.get(holders.HOLDERS)


def test_reads_are_counted_once_per_turn_with_the_last_event_time() -> None:
    p, state = processor(), DictBudgetState()
    mid = active_id(list(p.process(zone("CET", n=1), POS, state, NOW)))
    for run, seq in (("r-a", 1), ("r-a", 1), ("r-a", 4), ("r-a", 2), ("r-b", 9)):  # a duplicate, a reordered one
        p.process(recall(mid, run, seq), POS, state, NOW)
    assert holders.access_of(state, "acme", mid) == holders.MemoryAccess(3, NOW + timedelta(seconds=9))
    assert holders.access_of(state, "ACME", mid) is None


_TENANTS = ("acme", "ACME", "Acme")
_TENANT, _ZONE, _RUN = st.sampled_from(_TENANTS), st.sampled_from(ZONES), st.sampled_from(("r-1", "r-2"))
_FACT = st.tuples(st.just("fact"), _TENANT, _ZONE)
_RECALL = st.tuples(st.just("recall"), _TENANT, _TENANT, _ZONE, _RUN)
_RETIRE = st.tuples(st.just("retire"), _TENANT, _RUN)


@st.composite
def _stale_story(draw: st.DrawFn) -> list[tuple[Any, ...]]:
    """A fact, a recall of it (by a run of any of the tenants), a contradiction: the path to a notice."""
    tenant, old, new = draw(_TENANT), draw(_ZONE), draw(_ZONE)
    return [("fact", tenant, old), ("recall", draw(_TENANT), tenant, old, draw(_RUN)), ("fact", tenant, new)]


_OPS = st.lists(st.one_of(_stale_story(), st.lists(st.one_of(_FACT, _RECALL, _RETIRE), max_size=3)),
                max_size=8).map(lambda blocks: [op for block in blocks for op in block])


def _events(ops: list[tuple[Any, ...]]) -> list[tuple[str, Any]]:
    """(tenant, event or retired run key) per op; a recall may name a memory id of any tenant's fact."""
    events: list[tuple[str, Any]] = []
    for n, op in enumerate(ops):
        if op[0] == "fact":
            events.append((op[1], zone(op[2], op[1], n)))
        elif op[0] == "recall":
            _, tenant, owner, value, run = op
            events.append((tenant, recall(candidate_memory_id(zone(value, owner)), run, n, tenant=tenant)))
        else:
            events.append((op[1], f"{op[1]}:{op[2]}"))
    return events


def _play(events: list[tuple[str, Any]]) -> list[tuple[str, list[Any]]]:
    p, state = processor(), DictBudgetState()
    out = []
    for tenant, event in events:
        if isinstance(event, str):
            p.retire([event], state)
            out.append((tenant, []))
        else:
            out.append((tenant, list(p.process(event, POS, state, NOW))))
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_OPS)
def test_no_holding_or_notice_crosses_tenants(ops: list[tuple[Any, ...]]) -> None:
    events = _events(ops)
    together = _play(events)
    for tenant, outputs in together:
        for decision in stale_decisions(outputs):
            assert decision.tenant_id == tenant
    for tenant in _TENANTS:
        alone = _play([e for e in events if e[0] == tenant])
        assert [o for t, o in together if t == tenant] == [o for _, o in alone]


def test_the_holdings_tables_survive_their_changelog_form() -> None:
    values = {holders.HOLDERS: ("r-1", "r-2"), holders.HELD: holders.HeldRun("u-1", "s-1", {"mem-1": 4}),
              holders.ACCESS: holders.MemoryAccess(3, NOW)}
    for spec in holders.TABLES:
        assert spec.load(spec.dump(values[spec.name])) == values[spec.name]
