"""Hourly rollups on real chDB: after duplicates of every shape the hourly figures equal an aggregate of the
de-duplicated tables, and those count each record identity once, as the budget does (its first copy).

The ``sink`` and ``admin`` fixtures are in ``tests/integration/conftest.py``.
"""

from __future__ import annotations

import datetime as dt

from clickhouse_connect.driver.client import Client
from ctxflow.schemas.models import TurnEvent, UsageReport
from ctxflow.sinks.base import Batch
from ctxflow.sinks.clickhouse import ClickHouseSink
from ctxflow.sinks.clickhouse_ddl import Logged
from ctxflow.sinks.migrations import migrate
from ctxflow.sinks.schema_versions import MIGRATIONS, Migration

H0 = dt.datetime(2025, 3, 1, 12, 0, tzinfo=dt.UTC)
HOUR = dt.timedelta(hours=1)
#: The costs table as the envelopes contract defines it (another sink table; the cost rollup waits for it).
COSTS = """CREATE TABLE `{db}`.costs (cost_id String, tenant_id String, user_id String, session_id String,
  run_id String, root_run_id String, parent_run_id Nullable(String), workflow_id String, agent_id String,
  surface LowCardinality(String), model LowCardinality(Nullable(String)), quantity UInt64,
  unit LowCardinality(String), micros UInt64, price_version LowCardinality(String), estimated Bool,
  source_event_id String, occurred_at DateTime64(3, 'UTC'))
ENGINE = ReplacingMergeTree ORDER BY (tenant_id, run_id, cost_id)"""


def turn(tenant: str, seq: int, tokens: int, at: dt.datetime, event_id: str | None = None) -> TurnEvent:
    return TurnEvent(
        event_id=event_id or f"{tenant}-turn-{seq}", tenant_id=tenant, user_id="u1", session_id="s1", run_id="r1",
        agent_id="agent", seq=seq, role="user", kind="message", slot="history", item_id=f"item-{seq}",
        content=f"turn {seq}", token_count=tokens, model="gpt-4o", occurred_at=at,
    )


def usage(tenant: str, call: str, tokens: int, at: dt.datetime, event_id: str | None = None) -> UsageReport:
    return UsageReport(
        event_id=event_id or f"{tenant}-{call}", tenant_id=tenant, user_id="u1", session_id="s1", run_id="r1",
        agent_id="agent", call_id=call, provider="openai", model="gpt-4o", input_tokens=tokens, output_tokens=10,
        cached_read_tokens=3, latency_ms=5, occurred_at=at,
    )


def refresh(admin: Client, *views: str) -> None:
    for view in views:
        admin.command(f"SYSTEM REFRESH VIEW {view}")
        admin.command(f"SYSTEM WAIT VIEW {view}")


def write(sink: ClickHouseSink, table: str, *records: Logged) -> None:
    sink.write(Batch(table, records))


def hourly_tokens(sink: ClickHouseSink) -> list[tuple]:
    return sink.query("SELECT tenant_id, hour, source, records, tokens FROM hourly_tokens WHERE records > 0 "
                      "ORDER BY tenant_id, hour, source").rows


def aggregated(sink: ClickHouseSink) -> list[tuple]:
    """The same figures straight from the de-duplicated tables."""
    return sink.query(
        "SELECT * FROM (SELECT tenant_id, toStartOfHour(occurred_at) AS hour, 'turns' AS source, count(), "
        "sum(token_count) FROM turns GROUP BY tenant_id, hour UNION ALL "
        "SELECT tenant_id, toStartOfHour(occurred_at) AS hour, 'usage' AS source, count(), "
        "sum(input_tokens + output_tokens + cached_read_tokens + cache_write_tokens + reasoning_tokens) "
        "FROM usage GROUP BY tenant_id, hour) ORDER BY tenant_id, hour, source"
    ).rows


def test_hourly_tokens_count_each_identity_once_whatever_the_duplicates(sink: ClickHouseSink, admin: Client) -> None:
    admin.command("SYSTEM STOP MERGES turns")
    admin.command("SYSTEM STOP MERGES usage")
    turns = [Logged(turn("acme", seq, 100 + seq, H0 + seq * 20 * dt.timedelta(minutes=1)), seq) for seq in range(6)]
    calls = [Logged(usage("acme", f"call-{n}", 1_000 * (n + 1), H0 + n * HOUR), n) for n in range(3)]
    write(sink, "turns", *turns, Logged(turn("globex", 0, 9, H0), 6))
    write(sink, "usage", *calls)
    refresh(admin, "hourly_tokens_from_turns", "hourly_tokens_from_usage")

    # A replay after a crash re-cut into other batches; a turn resent an hour later under a new event id with
    # another token count; a provider call logged twice under new event ids, the copy in the next hour.
    write(sink, "turns", *turns[2:5])
    write(sink, "turns", Logged(turn("acme", 4, 999, H0 + 3 * HOUR, event_id="acme-turn-4-resent"), 40))
    write(sink, "usage", *calls[1:], Logged(usage("acme", "call-0", 1_000, H0 + HOUR, event_id="double-log"), 41))
    refresh(admin, "hourly_tokens_from_turns", "hourly_tokens_from_usage")

    # What the budget counts: each turn seq and call id once, the first copy read.
    assert hourly_tokens(sink) == [
        ("acme", H0, "turns", 3, 100 + 101 + 102), ("acme", H0, "usage", 1, 1_013),
        ("acme", H0 + HOUR, "turns", 3, 103 + 104 + 105), ("acme", H0 + HOUR, "usage", 1, 2_013),
        ("acme", H0 + 2 * HOUR, "usage", 1, 3_013), ("globex", H0, "turns", 1, 9),
    ]
    assert hourly_tokens(sink) == aggregated(sink)


def test_a_later_copy_seen_first_leaves_its_hour_when_the_first_copy_arrives(
    sink: ClickHouseSink, admin: Client
) -> None:
    """Within a flush the sink may write a later copy before the first one (another writer schema, say): the
    later copy's hour held it for a refresh and must give it back."""
    write(sink, "turns", Logged(turn("acme", 0, 500, H0 + 2 * HOUR, event_id="resent"), 9))
    refresh(admin, "hourly_tokens_from_turns")
    assert hourly_tokens(sink) == [("acme", H0 + 2 * HOUR, "turns", 1, 500)]
    write(sink, "turns", Logged(turn("acme", 0, 50, H0), 3))
    refresh(admin, "hourly_tokens_from_turns")
    assert hourly_tokens(sink) == [("acme", H0, "turns", 1, 50)] == aggregated(sink)


def test_hourly_cost_waits_for_the_costs_table_then_counts_each_cost_line_once(
    sink: ClickHouseSink, admin: Client
) -> None:
    assert admin.command("SELECT count() FROM system.tables WHERE database = currentDatabase() "
                         "AND name = 'hourly_cost'") == 0
    admin.command(COSTS.format(db=sink.database))
    line = ("acme", "u1", "s1", "r1", "r1", None, "r1", "agent")
    rows = [(f"cost-{n}", *line, surface, "gpt-4o", 10, "token", micros, "list-2025-06", estimated, f"e{n}", at)
            for n, (surface, micros, estimated, at) in enumerate([
                ("inference", 2_000, False, H0), ("inference", 500, True, H0 + dt.timedelta(minutes=30)),
                ("retrieval", 40, False, H0), ("tooling", 7, False, H0 + HOUR)])]
    columns = ["cost_id", "tenant_id", "user_id", "session_id", "run_id", "root_run_id", "parent_run_id",
               "workflow_id", "agent_id", "surface", "model", "quantity", "unit", "micros", "price_version",
               "estimated", "source_event_id", "occurred_at"]
    admin.insert("costs", rows[:2], column_names=columns)  # written before the rollup existed: backfilled

    sink.ensure_schema()  # migration 6 applies now that costs exists
    admin.insert("costs", rows[2:], column_names=columns)
    admin.insert("costs", rows[1:3], column_names=columns)  # redelivered, re-cut
    refresh(admin, "hourly_cost_from_costs")
    hourly = sink.query("SELECT hour, surface, records, micros, estimated_micros FROM hourly_cost "
                        "WHERE records > 0 ORDER BY hour, surface").rows
    assert hourly == [(H0, "inference", 2, 2_500, 500), (H0, "retrieval", 1, 40, 0), (H0 + HOUR, "tooling", 1, 7, 0)]
    assert hourly == sink.query(
        "SELECT toStartOfHour(occurred_at) AS hour, surface, count(), sum(micros), sumIf(micros, estimated) "
        "FROM costs GROUP BY hour, surface ORDER BY hour, surface").rows


def test_a_rollup_waiting_for_a_table_follows_the_migration_that_creates_it_in_the_same_run(
    sink: ClickHouseSink, admin: Client
) -> None:
    """When the costs table arrives as a migration after the cost rollup's, one run applies both."""
    costs = Migration(len(MIGRATIONS) + 1, "costs table", lambda db: (COSTS.format(db=db),))
    applied = migrate(admin, sink.database, history=(*MIGRATIONS, costs))
    assert [m.name for m in applied] == ["costs table", "hourly cost per tenant"]
    assert admin.command("SELECT count() FROM system.tables WHERE database = currentDatabase() "
                         "AND name = 'hourly_cost'") == 1
