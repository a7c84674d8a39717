"""The retrieval index in chDB: the sink feeds it from memory records, and a recall query reads only what its run
may see (its tenant exactly, tenant scope, its user's, its session's), active records only, ranked as documented."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest
from clickhouse_connect.driver.client import Client
from ctxflow.schemas import content_digest
from ctxflow.schemas.models import MemoryRecord, MemoryScope, MemoryStatus, MemoryType
from ctxflow.sinks.clickhouse import ClickHouseSink
from ctxflow.streams.sdk.recall import recall_query, visible_to
from ctxflow.streams.sdk.run_context import RunContext

T0 = datetime(2026, 3, 1, tzinfo=UTC)
TENANTS = ("acme", "ACME", "Acme")
USERS, SESSIONS = ("u-1", "u-2"), ("s-1", "s-2")


def record(tenant: str, scope: MemoryScope, owner: str | None, status: MemoryStatus, text: str, *, version: int = 2,
           embedding: list[float] | None = None, mid: str | None = None) -> MemoryRecord:
    return MemoryRecord(
        memory_id=mid or f"mem-{tenant}-{scope.value}-{owner}-{status.value}-{abs(hash(text)) % 10_000}",
        tenant_id=tenant, user_id=owner if scope is MemoryScope.USER else "u-x",
        session_id=owner if scope is MemoryScope.SESSION else "s-x", scope=scope, type=MemoryType.FACT,
        status=status, version=version, content=text, content_digest=content_digest(text), created_at=T0,
        updated_at=T0 + timedelta(seconds=version), owner_id=owner, embedding=embedding,
    )


def ctx(tenant: str, user: str, session: str) -> RunContext:
    return RunContext(tenant_id=tenant, user_id=user, session_id=session, agent_id="a", model="gpt-4o", run_id="r-1")


def recall(sink: ClickHouseSink, run: RunContext, query: str, k: int = 1000,
           embedding: list[float] | None = None) -> list[tuple[str, float]]:
    sql, params = recall_query(run, query, (MemoryScope.TENANT, MemoryScope.USER, MemoryScope.SESSION), k, embedding)
    result = sink.query(sql, params)
    return [(row[1], row[-1]) for row in result.rows]


def _owners(scope: MemoryScope) -> tuple[str | None, ...]:
    return {MemoryScope.TENANT: (None,), MemoryScope.USER: USERS, MemoryScope.SESSION: SESSIONS}[scope]


def test_a_recall_reaches_only_its_runs_active_records_whatever_the_tenant_case(
        sink: ClickHouseSink, admin: Client) -> None:
    admin.command("SYSTEM STOP MERGES")  # every version stays a row of its own: FINAL must pick
    everything = [
        record(t, scope, owner, status, "Alice works in the CET timezone", embedding=[1.0, 0.0, 0.5])
        for t in TENANTS
        for scope in (MemoryScope.TENANT, MemoryScope.USER, MemoryScope.SESSION)
        for owner in _owners(scope)
        for status in (MemoryStatus.ACTIVE, MemoryStatus.SUPERSEDED, MemoryStatus.QUARANTINED)
    ]
    # Active first, then (a later insert, a higher version) stale for the non-active ones: an index must forget.
    for r in everything:
        sink.add(r.model_copy(update={"status": MemoryStatus.ACTIVE, "version": 1}))
    sink.flush()
    for r in everything:
        sink.add(r)
    sink.flush()
    for tenant, user, session in itertools.product(TENANTS, USERS, SESSIONS):
        run = ctx(tenant, user, session)
        expected = {r.memory_id for r in everything if r.status is MemoryStatus.ACTIVE
                    and visible_to(run, r.tenant_id, r.scope, r.owner_id or "")}
        assert len(expected) == 3  # tenant, its user's and its session's
        assert {m for m, _ in recall(sink, run, "alice timezone")} == expected
        assert {m for m, _ in recall(sink, run, "", embedding=[1.0, 0.0, 0.5])} == expected


def test_lexical_and_vector_ranking(sink: ClickHouseSink) -> None:
    rows = [
        record("acme", MemoryScope.TENANT, None, MemoryStatus.ACTIVE, "Acme's plan has 75 seats", mid="m-seats",
               embedding=[1.0, 0.0]),
        record("acme", MemoryScope.TENANT, None, MemoryStatus.ACTIVE, "Acme is hosted in eu-west-1", mid="m-region",
               embedding=[0.0, 1.0]),
        record("acme", MemoryScope.TENANT, None, MemoryStatus.ACTIVE, "Seats are billed monthly", mid="m-billing",
               embedding=[0.7, 0.7]),
    ]
    for r in rows:
        sink.add(r)
    sink.flush()
    run = ctx("acme", "u-1", "s-1")
    assert [m for m, _ in recall(sink, run, "How many seats has Acme")] == ["m-seats", "m-billing", "m-region"]
    assert {m for m, _ in recall(sink, run, "seats")} == {"m-seats", "m-billing"}
    assert recall(sink, run, "kubernetes") == []  # no shared term: nothing
    ranked = recall(sink, run, "", k=2, embedding=[0.9, 0.1])
    assert [m for m, _ in ranked] == ["m-seats", "m-billing"] and ranked[0][1] < ranked[1][1]


def test_a_rare_query_word_outranks_words_every_record_holds(sink: ClickHouseSink) -> None:
    texts = {
        "m-plan": "The customer is on the Team plan with support",
        "m-office": "The customer is based in Berlin with a team",
        "m-billing": "The customer is billed yearly with a discount",
        "m-invoices": "The customer prefers invoices in EUR",
    }
    for mid, text in texts.items():
        sink.add(record("rare", MemoryScope.TENANT, None, MemoryStatus.ACTIVE, text, mid=mid))
    sink.flush()
    # Four query words in each of three records, three in the last; but "invoices" is the one that says which.
    ranked = recall(sink, ctx("rare", "u-1", "s-1"), "is the customer with invoices")
    assert ranked[0][0] == "m-invoices" and len(ranked) == 4
    assert ranked[0][1] > ranked[1][1] > 0


@pytest.mark.parametrize("status", [MemoryStatus.REVOKED, MemoryStatus.ARCHIVED, MemoryStatus.SUPERSEDED])
def test_a_record_that_leaves_active_disappears_from_the_index(sink: ClickHouseSink, admin: Client,
                                                              status: MemoryStatus) -> None:
    admin.command("SYSTEM STOP MERGES")
    live = record("acme", MemoryScope.TENANT, None, MemoryStatus.ACTIVE, "Standups last 10 minutes", mid="m-1")
    sink.add(live)
    sink.flush()
    run = ctx("acme", "u-1", "s-1")
    assert [m for m, _ in recall(sink, run, "standups")] == ["m-1"]
    sink.add(live.model_copy(update={"status": status, "version": 3, "content": None}))
    sink.flush()
    assert recall(sink, run, "standups") == []
    assert admin.query("SELECT count() FROM memory_index").result_rows[0][0] == 2  # both versions, unmerged
