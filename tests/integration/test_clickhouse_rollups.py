"""Hourly rollups on real chDB: after duplicates of every shape the hourly figures equal an aggregate of the
de-duplicated tables, and those count each record identity once, as the budget does (its first copy; for cost
lines, the last line of an id).

The ``sink`` and ``admin`` fixtures are in ``tests/integration/conftest.py``.
"""

from __future__ import annotations

import datetime as dt

from clickhouse_connect.driver.client import Client
from ctxflow.schemas.models import CostLine, TurnEvent, UsageReport
from ctxflow.sinks.base import Batch
from ctxflow.sinks.clickhouse import ClickHouseSink
from ctxflow.sinks.clickhouse_ddl import Logged

H0 = dt.datetime(2025, 3, 1, 12, 0, tzinfo=dt.UTC)
HOUR = dt.timedelta(hours=1)
MINUTE = dt.timedelta(minutes=1)


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


def forget_marks(admin: Client) -> None:
    """What a refresh read ages past its overlap: the next copy must mark the old copy's hour by itself."""
    admin.command("TRUNCATE TABLE rollup_marks")


def write(sink: ClickHouseSink, table: str, *records: Logged | CostLine) -> None:
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
    later copy's hour held it for a refresh and must give it back, even once a merge removed that copy."""
    write(sink, "turns", Logged(turn("acme", 0, 500, H0 + 2 * HOUR, event_id="resent"), 9))
    refresh(admin, "hourly_tokens_from_turns")
    assert hourly_tokens(sink) == [("acme", H0 + 2 * HOUR, "turns", 1, 500)]
    forget_marks(admin)
    write(sink, "turns", Logged(turn("acme", 0, 50, H0), 3))
    admin.command("OPTIMIZE TABLE turns FINAL")  # the later copy is gone before the refresh looks
    refresh(admin, "hourly_tokens_from_turns")
    assert hourly_tokens(sink) == [("acme", H0, "turns", 1, 50)] == aggregated(sink)


def line(n: int, surface: str, micros: int, at: dt.datetime, estimated: bool = False) -> CostLine:
    return CostLine(
        cost_id=f"cost-{n}", tenant_id="acme", user_id="u1", session_id="s1", run_id="r1", root_run_id="r1",
        workflow_id="r1", agent_id="agent", surface=surface, model="gpt-4o", quantity=10, unit="tokens",
        micros=micros, price_version="v1", estimated=estimated, source_event_id=f"e-{n}", occurred_at=at,
    )


def test_hourly_cost_follows_redelivered_and_updated_lines_even_across_hours(
    sink: ClickHouseSink, admin: Client
) -> None:
    lines = [line(0, "inference", 2_000, H0), line(1, "inference", 500, H0 + 30 * MINUTE, estimated=True),
             line(2, "retrieval", 40, H0), line(3, "tooling", 7, H0 + HOUR)]
    write(sink, "costs", *lines)
    refresh(admin, "hourly_cost_from_costs")
    forget_marks(admin)
    # Redelivered lines, and a run's closure estimate written again later under its id, now in another hour; the
    # merge that drops the old line runs before the refresh sees it.
    write(sink, "costs", *lines[2:])
    write(sink, "costs", lines[1].model_copy(update={"micros": 800, "occurred_at": H0 + 2 * HOUR}))
    admin.command("OPTIMIZE TABLE costs FINAL")
    refresh(admin, "hourly_cost_from_costs")
    hourly = sink.query("SELECT hour, surface, records, micros, estimated_micros FROM hourly_cost "
                        "WHERE records > 0 ORDER BY hour, surface").rows
    assert hourly == [(H0, "inference", 1, 2_000, 0), (H0, "retrieval", 1, 40, 0), (H0 + HOUR, "tooling", 1, 7, 0),
                      (H0 + 2 * HOUR, "inference", 1, 800, 800)]
    assert hourly == sink.query(
        "SELECT toStartOfHour(occurred_at) AS hour, surface, count(), sum(micros), sumIf(micros, estimated) "
        "FROM costs GROUP BY hour, surface ORDER BY hour, surface").rows
