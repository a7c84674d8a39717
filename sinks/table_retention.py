"""How long ClickHouse keeps rows: TTLs from the deployment's retention settings.

Event tables (turns, usage, runs, decisions, dead letters, invalidations: every spec with ``expires_by``) keep a
row ``event_days`` after its event time; the hourly rollups keep an hour ``rollup_days``. Where a table records
when a row arrived (``ingested_at``; a rollup's ``computed_at``), the later of the two counts: live rows arrive
within seconds of their event, so for them that is the event time, while a replay or backfill of old events is
kept for the retention period from when it was loaded. Counting from the event time alone would drop such rows
as they are written (ClickHouse applies an expired TTL when it writes a part), before anyone saw them.

Memory records are not here: each expires at its own ``expires_at`` (a migration sets that TTL). A TTL deletes
rows when ClickHouse merges parts, so expired rows may be readable for a while after their time; copies of one
identity are merged within minutes of arriving, long before either expires, so expiry does not bring a
superseded copy back.

The days come from ``CTXFLOW_CLICKHOUSE_RETENTION_DAYS`` and ``CTXFLOW_CLICKHOUSE_ROLLUP_RETENTION_DAYS``
(``streams.config``, where the defaults are argued). The worker applies them when it starts: a changed setting
becomes ``ALTER TABLE ... MODIFY TTL`` (which also applies the new TTL to the rows already stored); an unchanged
one issues no statement.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from clickhouse_connect.driver.client import Client
from ctxflow.sinks.clickhouse_ddl import INGESTED_AT, TABLES
from ctxflow.sinks.schema_versions import ROLLUPS


@dataclass(frozen=True, slots=True)
class TableRetention:
    """Days rows stay in ClickHouse (0: forever): ``event_days`` for event tables, ``rollup_days`` for rollups."""

    event_days: int
    rollup_days: int


def ttl_of(column: str, days: int, arrived: str | None = None) -> str | None:
    """The TTL expression keeping rows ``days`` after ``column`` (or after ``arrived``, when later), as ClickHouse
    prints it (None: no TTL)."""
    if days <= 0:
        return None
    since = f"greatest({column}, {arrived})" if arrived else column
    return f"toDateTime({since}) + toIntervalDay({days})"


def retention_statements(client: Client, database: str, retention: TableRetention) -> list[str]:
    """The ``ALTER TABLE`` statements that bring the TTL of every table present in ``database`` to ``retention``
    (empty when they already match)."""
    wanted = {
        spec.name: ttl_of(spec.expires_by, retention.event_days,
                          INGESTED_AT[0] if INGESTED_AT in spec.server_columns else None)
        for spec in TABLES if spec.expires_by
    }
    wanted |= {name: ttl_of(column, retention.rollup_days, "computed_at") for name, column in ROLLUPS.items()}
    rows = client.query(
        "SELECT name, engine_full FROM system.tables WHERE database = {db:String}", parameters={"db": database}
    ).result_rows
    statements = []
    for name, engine_full in rows:
        if name not in wanted:
            continue
        current = _ttl(engine_full)
        if current == wanted[name]:
            continue
        change = f"MODIFY TTL {wanted[name]}" if wanted[name] is not None else "REMOVE TTL"
        statements.append(f"ALTER TABLE `{database}`.`{name}` {change}")
    return statements


def _ttl(engine_full: str) -> str | None:
    found = re.search(r" TTL (.+?)(?: SETTINGS |$)", engine_full)
    return found.group(1) if found else None
