"""Retention expiry through the budget and the memory processor: lifetimes from the manifest, expiry driven by the
tenant's event-time watermark (never the worker's clock), the same records expired by every replay."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from ctxflow.processors.budget import BudgetProcessor
from ctxflow.processors.chain import ProcessorChain
from ctxflow.processors.memory import cascade, expiry
from ctxflow.processors.memory.cascade import PayloadDelete
from ctxflow.processors.memory.expiry import EXPIRED
from ctxflow.processors.memory.processor import MemoryGateProcessor, PayloadWrite
from ctxflow.processors.memory.store import MemoryTables
from ctxflow.processors.tokens import TokenCounter
from ctxflow.processors.types import DictBudgetState, Position
from ctxflow.schemas.contract import RejectedRecord
from ctxflow.schemas.models import (
    Invalidation,
    MemoryCommandKind,
    MemoryGovernance,
    MemoryRecord,
    MemoryStatus,
    MemoryStore,
    MemoryVerdict,
    VerdictOutcome,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support_memory import NOW, candidate, shared_gate
from tests.unit.test_budget_factories import manifest, turn

DAY = timedelta(days=1)
FAR_FUTURE = NOW + timedelta(days=3650)  # the worker's wall clock: it must not matter


def chain() -> ProcessorChain:
    return ProcessorChain(BudgetProcessor(TokenCounter()), [MemoryGateProcessor(shared_gate())])


class World:
    """A chain over one state, fed records at increasing offsets per topic (as the worker reads them)."""

    def __init__(self, tenant: str = "acme") -> None:
        self.chain, self.state, self.offsets = chain(), DictBudgetState(), {}
        self.feed(manifest(tenant, memory=MemoryGovernance(retention_rules=["pii-7d"]), memory_store=MemoryStore(
            retention_days={"preference": 30, "episode": 90}, rule_retention_days={"pii-7d": 7})))

    def feed(self, event: Any) -> list[Any]:
        topic = type(event).__name__
        offset = self.offsets[topic] = self.offsets.get(topic, -1) + 1
        try:
            return self.chain.process(event, Position(topic, 0, offset), self.state, FAR_FUTURE)
        except RejectedRecord as error:  # too late for the dedup window: the worker dead-letters it
            return [error.reason_code]

    def clock(self, at: datetime, seq: int, tenant: str = "acme") -> list[Any]:
        """A turn stamped ``at``: moves the tenant's event-time watermark."""
        return self.feed(turn(seq, 1, tenant=tenant, occurred_at=at))


def expired(out: list[Any]) -> list[str]:
    return [o.memory_id for o in out if isinstance(o, MemoryRecord) and o.reason == EXPIRED]


def test_a_record_lives_the_shorter_of_its_type_and_rule_lifetimes_from_its_last_write() -> None:
    w = World()
    pref = [o for o in w.feed(candidate("Prefers answers in French")) if isinstance(o, MemoryRecord)][-1]
    assert pref.expires_at == NOW + 30 * DAY
    pii = [o for o in w.feed(candidate("Call me on alice@example.com", retention_rule="pii-7d", candidate_id="c-p"))
           if isinstance(o, MemoryRecord)][-1]
    assert pii.expires_at == NOW + 7 * DAY  # the rule's 7 days cut the preference's 30 short
    merged = [o for o in w.feed(candidate("prefers answers in french.", candidate_id="c-m",
                                          occurred_at=NOW + 10 * DAY)) if isinstance(o, MemoryRecord)][-1]
    assert merged.expires_at == NOW + 40 * DAY  # learnt again: its lifetime restarts


def test_expiry_follows_the_tenants_event_time_not_the_workers_clock() -> None:
    w = World()
    pref = [o for o in w.feed(candidate("Prefers answers in French")) if isinstance(o, MemoryRecord)][-1]
    assert expired(w.clock(NOW + 29 * DAY, 0)) == []  # the worker's clock is ten years on: no matter
    assert expired(w.clock(NOW + 30 * DAY + timedelta(minutes=30), 1)) == []  # the expiry hour is not over yet
    out = w.clock(NOW + 30 * DAY + timedelta(hours=1), 2)
    assert expired(out) == [pref.memory_id]
    (tomb,) = [o for o in out if isinstance(o, MemoryRecord)]
    assert (tomb.status, tomb.content, tomb.updated_at, tomb.expires_at) == (
        MemoryStatus.REVOKED, None, NOW + 30 * DAY, None)
    assert {i.target_type for i in out if isinstance(i, Invalidation)} == {
        "memory_record", "retrieval_index", "turn_content"}
    assert expired(w.clock(NOW + 60 * DAY, 3)) == []  # expired once
    # Not blocked: the same preference stated again is a new collection with a new lifetime.
    (verdict,) = [o for o in w.feed(candidate("Prefers answers in French", candidate_id="c-2",
                                              occurred_at=NOW + 61 * DAY)) if isinstance(o, MemoryVerdict)]
    assert verdict.outcome is VerdictOutcome.ACCEPTED


def test_another_tenants_clock_never_expires_this_tenants_records() -> None:
    w = World()
    w.feed(manifest("other"))
    w.feed(candidate("Prefers answers in French"))
    assert expired(w.clock(NOW + 400 * DAY, 0, tenant="other")) == []
    assert len(expired(w.clock(NOW + 31 * DAY, 0))) == 1


def test_a_quiet_tenants_records_expire_through_the_workers_expire_command_once() -> None:
    w, other = World(), World("beta")
    pref = [o for o in w.feed(candidate("Prefers answers in French")) if isinstance(o, MemoryRecord)][-1]
    [o for o in other.feed(candidate("Prefers dark mode", tenant_id="beta")) if isinstance(o, MemoryRecord)]
    # acme sends nothing more: its clock stands at NOW. The worker's wall clock says which tenants are due.
    entries = [*w.state.tables["memory_expiry"].items(), *other.state.tables["memory_expiry"].items()]
    assert expiry.due(entries, NOW + 30 * DAY) == []  # the expiry hour has not ended yet
    (sweep,) = [c for c in expiry.due(entries, NOW + 31 * DAY) if c.tenant_id == "acme"]
    assert sweep.kind is MemoryCommandKind.EXPIRE and sweep.issued_at == NOW + 31 * DAY
    assert expired(w.feed(sweep)) == [pref.memory_id]
    # Through the log like an operator's command: a redelivery, or another worker's for the same hour, does
    # nothing more; and the tenant is no longer due.
    assert expired(w.feed(sweep)) == []
    assert expired(w.feed(sweep.model_copy(update={"command_id": "expire-again"}))) == []
    assert [c.tenant_id for c in expiry.due(w.state.tables["memory_expiry"].items(), NOW + 31 * DAY)] == []


BIG = "Runbook for the billing export: " + " ".join(f"step {i} checks shard {i:04d}." for i in range(40))


def payload_ops(out: list[Any]) -> list[tuple[str, str]]:
    """The payload writes and deletions of ``out`` in order, and the ``payload`` invalidations."""
    ops = {PayloadWrite: "write", PayloadDelete: "delete"}
    return [(ops[type(o)], o.ref) for o in out if type(o) in ops] + [
        ("invalidate", o.target_id) for o in out if isinstance(o, Invalidation) and o.target_type == "payload"]


def big_world() -> World:
    w = World()
    w.feed(manifest("acme", memory=MemoryGovernance(inline_max_bytes=200),
                    memory_store=MemoryStore(retention_days={"preference": 30}), version=2))
    return w


def test_content_learnt_again_in_the_step_its_record_expires_keeps_its_payload() -> None:
    # A candidate stamped long before the tenant's clock: its record is born past its expiry hour and expires at
    # the tenant's next record, here a candidate of the same content (the same content-addressed payload).
    w = big_world()
    w.clock(NOW + 40 * DAY, 1)
    first = w.feed(candidate(BIG, candidate_id="c-1"))
    (ref,) = {r for op, r in payload_ops(first) if op == "write"}
    again = w.feed(candidate(BIG, candidate_id="c-2", user_id="u-2"))
    assert len(expired(again)) == 1  # the first record expired in this step, releasing the payload...
    assert payload_ops(again) == [("write", ref)]  # ...which the new record names: not deleted, not invalidated
    assert MemoryTables(w.state).names_payload("acme", ref)


def test_a_payload_released_earlier_in_the_batch_is_not_deleted_when_a_later_record_names_it_again() -> None:
    # Two steps of one batch: the expiry's deletion is already out when the same content is learnt again. The
    # shell carries out deletions after the batch (and after any batch prepared since), through ``unnamed``.
    w = big_world()
    record = [o for o in w.feed(candidate(BIG, candidate_id="c-1")) if isinstance(o, MemoryRecord)][-1]
    swept = w.clock(NOW + 40 * DAY, 1)
    deletes = [o for o in swept if isinstance(o, PayloadDelete)]
    assert expired(swept) == [record.memory_id] and deletes == [PayloadDelete("acme", record.payload_ref)]
    assert cascade.unnamed(deletes, w.state) == deletes  # nothing names it: deleted
    learnt = w.feed(candidate(BIG, candidate_id="c-2", occurred_at=NOW + 40 * DAY))
    assert payload_ops(learnt) == [("write", record.payload_ref)]
    assert cascade.unnamed(deletes, w.state) == []  # named again before the deletion was carried out: kept


_TEXTS = ["Prefers answers in French", "Prefers dark mode", "Likes short replies", "Call me on bob@example.com",
          "Works late on Fridays"]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["candidate", "clock"]), st.integers(0, 4), st.integers(0, 90)),
                min_size=1, max_size=14),
       st.integers(0, 13))
def test_replaying_the_same_records_in_the_same_order_expires_the_same_records(
    steps: list[tuple[str, int, int]], restart_at: int
) -> None:
    records: list[Any] = []
    for n, (kind, which, days) in enumerate(steps):
        at = NOW + days * DAY
        if kind == "candidate":
            rule = {"retention_rule": "pii-7d"} if "@" in _TEXTS[which] else {}
            records.append(candidate(_TEXTS[which], candidate_id=f"c-{n}", occurred_at=at, **rule))
        else:
            records.append(turn(n, 1, occurred_at=at))
    live = World()
    first = [live.feed(r) for r in records]
    # The replay: a new worker over fresh state, restarted part-way (a new processor over the same state).
    replay = World()
    second = []
    for n, r in enumerate(records):
        if n == restart_at:
            replay.chain = chain()
        second.append(replay.feed(r))
    assert [expired(o) for o in first] == [expired(o) for o in second]
    assert first == second
