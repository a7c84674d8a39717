"""The long-term store's quota: eviction to the archive, pinning, rehydration (processors.memory.quota and
store_commands), through the memory processor on plain-dict state."""

from __future__ import annotations

from datetime import datetime, timedelta
from itertools import count
from typing import Any

from ctxflow.processors.memory.commands import CommandRefused
from ctxflow.processors.memory.policy import MemoryPolicy
from ctxflow.processors.memory.processor import MemoryGateProcessor, PayloadWrite
from ctxflow.processors.memory.quota import Access, StoreQuota, score, victims
from ctxflow.processors.memory.store import MemoryTables
from ctxflow.processors.types import DictBudgetState, Position, tenant_key
from ctxflow.schemas.models import (
    Decision,
    DecisionKind,
    Invalidation,
    ItemKind,
    MemoryCommand,
    MemoryCommandKind,
    MemoryRecord,
    MemoryStatus,
    MemoryStore,
    MemoryVerdict,
    Role,
    Slot,
    SlotCaps,
    TenantManifest,
    TurnEvent,
    VerdictOutcome,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support_memory import NOW, candidate, shared_gate

POS = Position("memory.candidates", 0, 0)
WORDS = ("amber", "birch", "cobalt", "dune", "ember", "fjord", "garnet", "harbor", "indigo", "juniper")


def processor() -> MemoryGateProcessor:
    return MemoryGateProcessor(shared_gate(), lambda _tenant: MemoryPolicy())


def with_quota(state: DictBudgetState, tenant: str, quota: int) -> DictBudgetState:
    state.put_manifest(tenant_key(tenant), TenantManifest(
        tenant_id=tenant, version=1, tier="pro", slot_caps=SlotCaps(), total_cap=1_000_000, updated_at=NOW,
        memory_store=MemoryStore(record_quota=quota)))
    return state


def note(i: int, tenant: str = "acme") -> Any:
    """A distinct user preference (distinct numbers and words: never a near-duplicate of another)."""
    text = f"Project {i} is code-named {WORDS[i % len(WORDS)]} {i * 7}"
    return candidate(text, tenant_id=tenant, candidate_id=f"c-{i}", event_id=f"e-{i}",
                     occurred_at=NOW + timedelta(minutes=i))


_issued = count()


def command(kind: MemoryCommandKind, memory_id: str, at: datetime, tenant: str = "acme", **kw: Any) -> MemoryCommand:
    """A new operator command (its own id: a command applies once, however often it is delivered)."""
    return MemoryCommand(command_id=f"cmd-{kind.value}-{memory_id}-{next(_issued)}", tenant_id=tenant, kind=kind,
                         memory_id=memory_id, issued_by="ops", issued_at=at, **kw)


def live(state: DictBudgetState, tenant: str = "acme") -> dict[str, MemoryRecord]:
    records = state.tables.get("memory_records", {})
    return {r.memory_id: r for k, r in records.items()
            if k.startswith(f"{tenant}:") and r.status is MemoryStatus.ACTIVE}


def of(kind: type, outputs: list[Any]) -> list[Any]:
    return [o for o in outputs if isinstance(o, kind)]


def test_thresholds_follow_the_manifest_shares() -> None:
    assert (StoreQuota(10).threshold, StoreQuota(10).target) == (9, 7)
    assert (StoreQuota(100).threshold, StoreQuota(100).target) == (85, 70)
    assert (StoreQuota(1).threshold, StoreQuota(1).target) == (1, 0)


def test_twelve_notes_under_a_quota_of_ten_evict_to_seven_archived_as_they_were() -> None:
    p, state = processor(), with_quota(DictBudgetState(), "acme", 10)
    outputs = [o for i in range(12) for o in p.process(note(i), POS, state, NOW)]
    writes, invalidations = of(PayloadWrite, outputs), of(Invalidation, outputs)
    # 9 live -> 7 (two evicted), then 8, 9 -> 7 (two more), then 8 after the twelfth.
    # One invalidation per layer an archived record stops feeding: its record and the retrieval index.
    assert len(live(state)) == 8 and len(writes) == 4 and len(invalidations) == 4 * 2
    assert {i.target_type for i in invalidations} == {"memory_record", "retrieval_index"}
    assert all(i.reason.startswith("store_quota: evicted 2 of 9 live records (quota 10") for i in invalidations)
    archived = {r.memory_id: r for r in of(MemoryRecord, outputs) if r.status is MemoryStatus.ARCHIVED}
    for write in writes:
        was = MemoryRecord.model_validate_json(write.content)
        assert was.status is MemoryStatus.ACTIVE and was.content is not None  # content kept in the archive
        gone = archived[was.memory_id]
        assert (gone.archive_ref, gone.content, gone.version) == (write.ref, None, was.version + 1)
    # The oldest notes go first (equal importance and size: recency decides).
    assert sorted(archived) == sorted(r.memory_id for r in archived.values())
    assert MemoryTables(state).live_count("acme") == 8


def test_rehydrate_brings_an_archived_record_back_as_it_was_and_checks_its_content() -> None:
    p, state = processor(), with_quota(DictBudgetState(), "acme", 10)
    outputs = [o for i in range(9) for o in p.process(note(i), POS, state, NOW)]
    write = of(PayloadWrite, outputs)[0]
    was = MemoryRecord.model_validate_json(write.content)
    at = NOW + timedelta(days=1)
    forged = command(MemoryCommandKind.REHYDRATE, was.memory_id, at, corrected_content="something else")
    (refused,) = p.process(forged, POS, state, at)
    assert isinstance(refused, CommandRefused) and "content_digest" in refused.reason
    real = command(MemoryCommandKind.REHYDRATE, was.memory_id, at, corrected_content=was.content)
    (back,) = of(MemoryRecord, p.process(real, POS, state, at))
    assert back.status is MemoryStatus.ACTIVE and back.archive_ref is None
    assert back.version == was.version + 2  # archived (+1), rehydrated (+1): one more than the archived record
    same = {"status", "version", "updated_at", "reason", "archive_ref"}
    assert back.model_dump(exclude=same) == was.model_dump(exclude=same)
    assert p.process(real, POS, state, at) == []  # a redelivered command changes nothing
    assert len(live(state)) == 8


def test_a_pinned_record_is_never_evicted_and_unpinning_makes_it_evictable() -> None:
    p, state = processor(), with_quota(DictBudgetState(), "acme", 4)  # evict at 4, down to 2
    first = of(MemoryVerdict, p.process(note(0), POS, state, NOW))[0].memory_id
    (pinned,) = of(MemoryRecord, p.process(command(MemoryCommandKind.PIN, first, NOW), POS, state, NOW))
    assert pinned.pinned and p.process(command(MemoryCommandKind.PIN, first, NOW), POS, state, NOW) == []
    for i in range(1, 12):
        p.process(note(i), POS, state, NOW)
        assert first in live(state)
    unpin = command(MemoryCommandKind.UNPIN, first, NOW)  # its last update stays the oldest
    p.process(unpin, POS, state, NOW)
    for i in range(12, 16):
        p.process(note(i), POS, state, NOW)
    assert first not in live(state)


def test_commands_on_unknown_or_wrong_state_records_are_refused() -> None:
    p, state = processor(), DictBudgetState()
    (refused,) = p.process(command(MemoryCommandKind.PIN, "mem-nope", NOW), POS, state, NOW)
    assert isinstance(refused, CommandRefused) and "has no memory mem-nope" in refused.reason
    mid = of(MemoryVerdict, p.process(note(0), POS, state, NOW))[0].memory_id
    assert p.process(command(MemoryCommandKind.REHYDRATE, mid, NOW), POS, state, NOW) == []  # already active
    state.tables["memory_records"][f"acme:{mid}"] = state.tables["memory_records"][f"acme:{mid}"].model_copy(
        update={"status": MemoryStatus.SUPERSEDED})
    (refused,) = p.process(command(MemoryCommandKind.REHYDRATE, mid, NOW), POS, state, NOW)
    assert isinstance(refused, CommandRefused) and "only an archived record is rehydrated" in refused.reason


def test_victims_rank_by_score_then_memory_id_and_skip_pinned() -> None:
    p, state = processor(), DictBudgetState()
    for i in range(5):
        p.process(note(i), POS, state, NOW)
    records = sorted(live(state).values(), key=lambda r: r.memory_id)
    same_time = [r.model_copy(update={"updated_at": NOW}) for r in records]
    equal = {round(score(r, NOW), 12) for r in same_time}
    chosen = victims(same_time, 2, NOW, lambda r: Access())
    if len(equal) == 1:
        assert [r.memory_id for r in chosen] == [r.memory_id for r in same_time[:2]]
    often = victims(same_time, 4, NOW, lambda r: Access(50 if r is same_time[0] else 0))
    assert same_time[0] not in often  # retrieved often: kept
    pinned = [same_time[0].model_copy(update={"pinned": True}), *same_time[1:]]
    assert same_time[0].memory_id not in {r.memory_id for r in victims(pinned, 5, NOW, lambda r: Access())}


@st.composite
def traffic(draw: st.DrawFn) -> tuple[int, list[tuple[str, int, bool]]]:
    quota = draw(st.integers(min_value=2, max_value=12))
    steps = draw(st.lists(st.tuples(st.sampled_from(("acme", "ACME", "Acme")), st.integers(0, 39), st.booleans()),
                          min_size=1, max_size=40))
    return quota, steps


def _run(quota: int, steps: list[tuple[str, int, bool]], tenants: set[str]) -> tuple[DictBudgetState, dict[str, list]]:
    p, state = processor(), DictBudgetState()
    for tenant in tenants:
        with_quota(state, tenant, quota)
    out: dict[str, list] = {t: [] for t in tenants}
    for tenant, i, pin in steps:
        if tenant not in tenants:
            continue
        produced = list(p.process(note(i, tenant), POS, state, NOW))
        verdict = of(MemoryVerdict, produced)[0]
        if pin and verdict.outcome is VerdictOutcome.ACCEPTED:
            at = NOW + timedelta(minutes=i)
            produced += p.process(command(MemoryCommandKind.PIN, verdict.memory_id, at, tenant), POS, state, at)
        out[tenant] += produced
        tables, limits = MemoryTables(state), StoreQuota(quota)
        held = live(state, tenant)
        assert tables.live_count(tenant) == len(held)  # the O(1) count is exact
        unpinned = [r for r in held.values() if not r.pinned]
        assert len(held) < limits.threshold or not unpinned  # full only of pinned records
    return state, out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(traffic())
def test_eviction_keeps_every_tenant_under_its_threshold_pins_stay_and_replays_agree(
    drawn: tuple[int, list[tuple[str, int, bool]]],
) -> None:
    quota, steps = drawn
    _, out = _run(quota, steps, {"acme", "ACME", "Acme"})
    for tenant, produced in out.items():
        evicted = [MemoryRecord.model_validate_json(w.content) for w in of(PayloadWrite, produced)]
        assert not any(was.pinned for was in evicted)  # the record as it was when evicted: never pinned
        assert all(r.tenant_id == tenant for r in produced if hasattr(r, "tenant_id"))
        # Tenant ids differing only in case: each tenant's outputs are exactly those it gets alone.
        alone = _run(quota, steps, {tenant})[1][tenant]
        assert produced == alone
    again = _run(quota, steps, {"acme", "ACME", "Acme"})[1]
    assert again == out  # deterministic under replay


def test_a_round_brings_the_count_to_the_target() -> None:
    p, state = processor(), with_quota(DictBudgetState(), "acme", 20)  # evict at 17, down to 14
    counts = []
    for i in range(17):
        p.process(note(i), POS, state, NOW)
        counts.append(len(live(state)))
    assert counts[-1] == 14 and max(counts) == 16


def _read(memory_id: str, run_id: str, seq: int, at: datetime) -> TurnEvent:
    """A turn of kind memory: run ``run_id`` read ``memory_id`` into its context (the SDK's recall)."""
    return TurnEvent(event_id=f"t-{run_id}-{seq}", tenant_id="acme", user_id="u-1", session_id="s-1", run_id=run_id,
                     agent_id="a", seq=seq, model="gpt-4o", role=Role.TOOL, kind=ItemKind.MEMORY,
                     slot=Slot.RETRIEVED, item_id=memory_id, content_digest="0" * 64, token_count=5, occurred_at=at)


def test_reads_keep_a_record_and_a_run_holding_an_evicted_one_is_told() -> None:
    p, state = processor(), with_quota(DictBudgetState(), "acme", 10)
    long_ago = NOW - timedelta(days=200)
    old = of(MemoryVerdict, p.process(note(99).model_copy(update={"occurred_at": long_ago}), POS, state, NOW))
    p.process(_read(old[0].memory_id, "r-holder", 0, long_ago), POS, state, NOW)  # read once, long ago
    ids = [of(MemoryVerdict, p.process(note(i), POS, state, NOW))[0].memory_id for i in range(7)]
    for seq in range(3):  # the oldest note, read three times since
        p.process(_read(ids[0], "r-reader", seq, NOW + timedelta(minutes=5)), POS, state, NOW)
    out = p.process(note(7), POS, state, NOW)
    evicted = [r.memory_id for r in of(MemoryRecord, out) if r.status is MemoryStatus.ARCHIVED]
    # The old one despite its read, and an unread note (which one: size weighs more than minutes of age).
    assert evicted[0] == old[0].memory_id and evicted[1] in ids[1:] and len(evicted) == 2
    (notice,) = [d for d in of(Decision, out) if d.kind is DecisionKind.STALE_CONTEXT]
    assert (notice.run_id, [(s.memory_id, s.status) for s in notice.stale]) == (
        "r-holder", [(old[0].memory_id, "archived")])
