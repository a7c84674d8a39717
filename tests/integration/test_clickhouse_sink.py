"""The ClickHouse sink on real chDB: idempotent writes, privacy, the read-only analyst path, backpressure.

chDB hosts one engine per process, so the module shares one data directory; each test gets its own database
(``tests/integration/conftest.py``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import subprocess
import sys
import uuid
from pathlib import Path

import clickhouse_connect
import pytest
from clickhouse_connect.driver.client import Client
from ctxflow.schemas.codec import Codec
from ctxflow.schemas.models import (
    CostLine,
    DeadLetter,
    Decision,
    ItemDecision,
    MemoryRecord,
    RunEnvelope,
    TenantManifest,
    TurnEvent,
    UsageReport,
    content_digest,
)
from ctxflow.sinks.base import Batch, SinkBackpressure
from ctxflow.sinks.clickhouse import ClickHouseSink, ReadOnlyViolation
from ctxflow.sinks.clickhouse_ddl import TABLES, Logged

T0 = dt.datetime(2025, 3, 1, 12, 0, tzinfo=dt.UTC)
PROCESS_SECRET = {"token": ["must-not-leak"]}


def turn(i: int, tenant: str = "acme", *, privacy: str = "retained", content: str | None = None) -> TurnEvent:
    return TurnEvent(
        event_id=f"turn-{tenant}-{i}", tenant_id=tenant, user_id="u1", session_id="s1",
        run_id=f"run-{i // 10}", agent_id="agent", seq=i % 10, role="assistant", kind="message",
        slot="history", item_id=f"item-{i}",
        content=content if content is not None else f"message {i}", token_count=i % 7 + 1, model="gpt-4o",
        privacy=privacy, occurred_at=T0 + dt.timedelta(seconds=i),
    )


def usage(i: int, tenant: str = "acme") -> UsageReport:
    return UsageReport(
        event_id=f"usage-{tenant}-{i}", tenant_id=tenant, user_id="u1", session_id="s1", run_id="run-0",
        agent_id="agent", call_id=f"call-{i}", provider="openai", model="gpt-4o", input_tokens=100 + i,
        output_tokens=10, latency_ms=5, occurred_at=T0,
    )


def memory(version: int, status: str, content: str = "prefers metric units") -> MemoryRecord:
    return MemoryRecord(
        memory_id="mem-1", tenant_id="acme", user_id="u1", scope="user", type="preference", status=status,
        version=version, content=content, content_digest=content_digest(content), created_at=T0,
        updated_at=T0 + dt.timedelta(minutes=version),
    )


def totals(sink: ClickHouseSink) -> tuple[int, int]:
    return sink.query("SELECT count(), sum(token_count) FROM turns").rows[0]


def test_schema_is_idempotent_and_every_table_orders_by_tenant_first(sink: ClickHouseSink) -> None:
    sink.ensure_schema()
    rows = sink.query(
        "SELECT name, engine, sorting_key FROM system.tables WHERE database = {db:String} AND engine LIKE '%MergeTree'",
        {"db": sink.database},
    ).rows
    assert {spec.name for spec in TABLES} <= {name for name, _, _ in rows}
    # Bookkeeping, not analytics: read by version, and by rollup and time.
    internal = {"schema_migrations", "rollup_marks"}
    for name, engine, sorting_key in rows:
        assert name in internal or engine == "ReplacingMergeTree", name
        assert name in internal or sorting_key.startswith("tenant_id,"), (name, sorting_key)


def test_rewritten_and_recut_batches_leave_no_duplicates(sink: ClickHouseSink, admin: Client) -> None:
    admin.command("SYSTEM STOP MERGES turns")  # duplicates stay on disk: the read path must hide them
    turns = [Logged(turn(i), i) for i in range(1000)]
    expected = (1000, sum(t.record.token_count or 0 for t in turns))
    sink.write(Batch("turns", tuple(turns)))
    sink.write(Batch("turns", tuple(turns)))  # the same batch again (a retried flush)
    for start in range(0, 700, 300):  # replay after a crash, cut at other boundaries, overlapping
        sink.write(Batch("turns", tuple(turns[start : start + 300])))
    assert admin.command("SELECT count() FROM turns") == 1900  # 1000 + 900 re-cut; the re-send dropped
    assert totals(sink) == expected
    grouped = sink.query("SELECT run_id, count() FROM turns GROUP BY run_id HAVING count() != 10").rows
    assert grouped == []


def test_replay_through_add_and_flush_keeps_usage_totals(sink: ClickHouseSink) -> None:
    reports = [Logged(usage(i), i) for i in range(50)]
    for report in reports[:30]:
        sink.add(report)
    assert sink.flush() == 30
    for report in reports:  # the log is replayed from the start after a crash before the offset commit
        sink.add(report)
    sink.flush()
    assert sink.query("SELECT count(), sum(input_tokens) FROM usage").rows == [
        (50, sum(r.record.input_tokens for r in reports))
    ]


def test_of_copies_of_one_identity_the_one_read_first_is_visible(sink: ClickHouseSink) -> None:
    """What the budget counts: a turn resent under a new event id with other content and tokens, buffered before
    the first copy (its offset is higher), and a usage report logged twice, through the Avro fast path and the
    model path alike."""
    codec = Codec()
    first = turn(3, content="first answer")
    resent = first.model_copy(update={"event_id": "resent", "content": "second answer", "token_count": 99})
    sink.add_encoded(resent, codec.encode(resent), 12)
    sink.add_encoded(first, codec.encode(first), 5)
    hidden = turn(4, privacy="no_retention", content="no-retention content takes the model path")
    hidden_resent = hidden.model_copy(update={"event_id": "hidden-resent", "token_count": 77})
    for offset, copy in ((14, hidden_resent), (6, hidden)):
        sink.add_encoded(copy, codec.encode(copy), offset)
    logged_twice = usage(1).model_copy(update={"event_id": "usage-logged-again"})
    for offset, report in ((7, usage(1)), (8, logged_twice)):
        sink.add_encoded(report, codec.encode(report), offset)
    sink.flush()
    assert sink.query("SELECT event_id, token_count, content, source_offset FROM turns ORDER BY seq").rows == [
        (first.event_id, first.token_count, "first answer", 5), (hidden.event_id, hidden.token_count, None, 6)]
    assert sink.query("SELECT event_id, source_offset FROM usage").rows == [("usage-acme-1", 7)]


def test_no_retention_turn_content_never_reaches_storage(sink: ClickHouseSink, chdb_dsn: str) -> None:
    secret = f"secret-{uuid.uuid4().hex}"
    kept = f"kept-{uuid.uuid4().hex}"
    sink.add(Logged(turn(1, privacy="no_retention", content=secret), 1))
    sink.add(Logged(turn(2, content=kept), 2))
    sink.flush()
    rows = sink.query("SELECT content, content_digest, token_count, privacy FROM turns ORDER BY seq").rows
    assert rows[0] == (None, content_digest(secret), turn(1).token_count, "no_retention")
    assert rows[1][0] == kept
    data = b"".join(p.read_bytes() for p in Path(chdb_dsn.removeprefix("chdb://")).rglob("*") if p.is_file())
    assert kept.encode() in data  # the scan can see content: so the secret's absence means something
    assert secret.encode() not in data


def test_memory_projection_keeps_latest_version_and_drops_revoked_content(
    sink: ClickHouseSink, admin: Client
) -> None:
    admin.command("SYSTEM STOP MERGES memory_records")
    sink.write(Batch("memory_records", (memory(1, "active"),)))
    sink.write(Batch("memory_records", (memory(2, "revoked"),)))
    sink.write(Batch("memory_records", (memory(1, "active"),)))  # an old version replayed late
    assert sink.query("SELECT version, status, content FROM memory_records").rows == [(2, "revoked", None)]
    for clause in ("WHERE", "PREWHERE"):  # filters must not see the superseded active version
        assert sink.query(f"SELECT count() FROM memory_records {clause} status = 'active'").rows == [(0,)]


def test_every_projected_record_type_round_trips(sink: ClickHouseSink) -> None:
    decision = Decision(
        decision_id="d-1", tenant_id="acme", run_id="run-0", kind="eviction_request",
        reason="over soft watermark", actions=[ItemDecision(item_id="item-3", action="evict", tokens=40)],
        window="day", decided_at=T0,
    )
    letter = DeadLetter(
        dead_letter_id="dl-1", source_topic="ctxflow.turns", source_partition=2, source_offset=9,
        reason_code="undecodable", reason="not avro", failed_at=T0,
    )
    sink.add(decision)
    sink.add(letter)
    with pytest.raises(TypeError, match="TenantManifest"):
        sink.add(
            TenantManifest(tenant_id="acme", version=1, tier="free", slot_caps={}, total_cap=1, updated_at=T0)
        )
    sink.flush()
    actions = sink.query("SELECT a.item_id, a.tokens FROM decisions ARRAY JOIN actions AS a").rows
    assert actions == [("item-3", 40)]
    assert sink.query("SELECT `window`, decided_at FROM decisions").rows == [("day", T0)]
    assert sink.query("SELECT tenant_id, source_offset, original FROM dead_letters").rows == [("", 9, None)]


def envelope(version: int, status: str, cost: int) -> RunEnvelope:
    zero = dict.fromkeys((
        "global_tokens", "user_tokens", "session_tokens", "input_tokens", "output_tokens", "cached_read_tokens",
        "cache_write_tokens", "reasoning_tokens", "tool_calls", "tool_results", "evictions", "compressions",
        "tokens_freed", "inference_micros", "tooling_micros", "persistence_micros",
    ), 0)
    return RunEnvelope(
        tenant_id="acme", user_id="u1", session_id="s1", run_id="run-1", parent_run_id="run-0",
        root_run_id="run-0", workflow_id="run-0", agent_id="researcher", depth=1, status=status,
        closed_by=None if status == "open" else "idle_timeout", started_at=T0, last_event_at=T0,
        tenant_tokens=10, retrieved_tokens=30, static_prefix_tokens=10, dynamic_tokens=30, usage_estimated=True,
        retrievals=2, memory_ids=["mem-1", "mem-2"], promotions={"user": 2, "session": 1}, cost_micros=cost,
        retrieval_micros=cost, cost_estimated=True, price_version="v1", event_count=version,
        integrity_hash=content_digest(str(version)), envelope_version=version, updated_at=T0, **zero,
    )


def test_envelopes_keep_their_highest_version_and_costs_their_last_line(sink: ClickHouseSink) -> None:
    for record in (envelope(7, "abandoned", 300), envelope(3, "open", 100)):  # an older version arrives late
        sink.add(record)
    line = CostLine(
        cost_id="c-1", tenant_id="acme", user_id="u1", session_id="s1", run_id="run-1", root_run_id="run-0",
        parent_run_id="run-0", workflow_id="run-0", agent_id="researcher", surface="inference", model="gpt-4o",
        quantity=100, unit="tokens", micros=250, price_version="v1", estimated=True, source_event_id="e-1",
        occurred_at=T0,
    )
    sink.add(line)
    sink.flush()
    sink.add(line.model_copy(update={"quantity": 140, "micros": 350}))  # the run's estimate, updated
    sink.flush()
    rows = sink.query("SELECT status, envelope_version, promotions['user'], memory_ids FROM envelopes").rows
    assert rows == [("abandoned", 7, 2, ["mem-1", "mem-2"])]
    assert sink.query("SELECT cost_id, quantity, micros, estimated FROM costs").rows == [("c-1", 140, 350, True)]


def test_a_table_from_an_older_version_gains_the_new_columns(chdb_dsn: str) -> None:
    """A deployment's tables outlive upgrades: decisions written before Decision v2 had no estimate columns."""
    database = f"t_{uuid.uuid4().hex[:12]}"
    spec = next(s for s in TABLES if s.name == "decisions")
    older = dataclasses.replace(spec, columns=tuple(
        c for c in spec.columns if c[0] not in ("estimated_tokens", "discrepancy_tokens")))
    admin = clickhouse_connect.get_client(dsn=chdb_dsn)
    try:
        admin.command(f"CREATE DATABASE `{database}`")
        admin.command(older.create_sql(database))
    finally:
        admin.close()
    sink = ClickHouseSink(chdb_dsn, database=database)
    try:
        sink.ensure_schema()
        sink.add(Decision(decision_id="d-1", tenant_id="acme", run_id="run-0", kind="usage_reconciled",
                          reason="run succeeded", used_tokens=900, estimated_tokens=600, discrepancy_tokens=-12,
                          decided_at=T0))
        sink.flush()
        assert sink.query("SELECT estimated_tokens, discrepancy_tokens FROM decisions").rows == [(600, -12)]
    finally:
        sink.close()


@pytest.mark.parametrize(
    "statement",
    [
        "INSERT INTO turns (event_id, tenant_id) VALUES ('x', 'acme')",
        "DROP TABLE turns",
        "ALTER TABLE turns DELETE WHERE 1",
        "SELECT count() FROM turns SETTINGS final = 0",
        "SELECT count() FROM file('/etc/hostname', 'LineAsString')",
        "INSERT INTO FUNCTION file('leak.csv', 'CSV', 'a String') VALUES ('x')",
        "SELECT * FROM python(PROCESS_SECRET)",  # chDB reads Python objects of the calling process
    ],
)
def test_analyst_path_rejects_writes_settings_and_table_functions(
    sink: ClickHouseSink, statement: str
) -> None:
    sink.write(Batch("turns", (Logged(turn(1), 1), Logged(turn(1), 1))))
    with pytest.raises(ReadOnlyViolation, match="read-only"):
        sink.query(statement)
    assert totals(sink) == (1, turn(1).token_count)


def test_analyst_query_binds_parameters(sink: ClickHouseSink) -> None:
    records = (*[turn(i, "acme") for i in range(5)], *[turn(i, "globex") for i in range(3)])
    sink.write(Batch("turns", tuple(Logged(record, offset) for offset, record in enumerate(records))))
    result = sink.query(
        "SELECT tenant_id, count() AS n FROM turns WHERE tenant_id = {t:String} GROUP BY tenant_id",
        {"t": "globex"},
    )
    assert result.columns == ("tenant_id", "n")
    assert result.rows == [("globex", 3)]


def test_too_many_parts_is_backpressure_and_keeps_the_buffer(sink: ClickHouseSink, admin: Client) -> None:
    admin.command("SYSTEM STOP MERGES turns")
    admin.command("ALTER TABLE turns MODIFY SETTING parts_to_throw_insert = 2")
    for i in range(2):
        sink.add(Logged(turn(i), i))
        sink.flush()
    sink.add(Logged(turn(2), 2))
    with pytest.raises(SinkBackpressure) as raised:
        sink.flush()
    assert raised.value.retry_after > 0
    assert sink.buffered == 1
    admin.command("SYSTEM START MERGES turns")
    admin.command("OPTIMIZE TABLE turns FINAL")  # the merges catch up; the retried flush goes through
    assert sink.flush() == 1
    assert totals(sink)[0] == 3


def test_one_chdb_engine_per_process(sink: ClickHouseSink, chdb_dsn: str, tmp_path: Path) -> None:
    sink.write(Batch("turns", (Logged(turn(1), 1),)))
    same_path = ClickHouseSink(chdb_dsn, database=sink.database)
    try:
        assert totals(same_path)[0] == 1  # clients on the same path share the engine's data
    finally:
        same_path.close()
    with pytest.raises(RuntimeError, match="one engine per process"):
        ClickHouseSink(f"chdb://{tmp_path / 'other'}")
    other_process = subprocess.run(
        [sys.executable, "-c", f"import clickhouse_connect; clickhouse_connect.get_client(dsn={chdb_dsn!r})"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert other_process.returncode != 0
    assert "Another server instance in same directory is already running" in other_process.stderr
