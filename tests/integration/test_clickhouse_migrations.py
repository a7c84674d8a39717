"""Versioned ClickHouse migrations on real chDB: upgrading a released database in place, concurrent runners, the
schema lock, retention TTLs, and that the migrated tables are what the table specs describe.

chDB hosts one engine per process, so the module shares one data directory (``tests/integration/conftest.py``)
and each test a database of its own.
"""

from __future__ import annotations

import datetime as dt
import threading
import uuid
from collections.abc import Iterator

import clickhouse_connect
import pytest
from clickhouse_connect.driver.client import Client
from ctxflow.schemas.models import Decision, MemoryRecord, TurnEvent, content_digest
from ctxflow.sinks import migrations
from ctxflow.sinks.clickhouse import ClickHouseSink
from ctxflow.sinks.clickhouse_ddl import TABLES, Logged
from ctxflow.sinks.migrations import SchemaLocked, migrate, schema_state, unlock
from ctxflow.sinks.schema_versions import MIGRATIONS
from ctxflow.sinks.table_retention import TableRetention
from ctxflow.streams.cli.main import app
from typer.testing import CliRunner

T0 = dt.datetime(2025, 3, 31, 23, 0, tzinfo=dt.UTC)
APRIL = dt.datetime(2025, 4, 2, 9, 0, tzinfo=dt.UTC)  # another month: another partition of the released tables

#: ctxflow's ClickHouse schema as released before migrations existed, exactly as that release created it.
RELEASED_V1 = """
CREATE TABLE `DB`.`turns` (`event_id` String, `tenant_id` String, `user_id` String, `session_id` String,
  `run_id` String, `parent_run_id` Nullable(String), `agent_id` String, `seq` UInt64, `role` LowCardinality(String),
  `kind` LowCardinality(String), `slot` LowCardinality(String), `item_id` String, `content` Nullable(String),
  `content_digest` String, `token_count` Nullable(UInt32), `model` LowCardinality(String),
  `importance` Nullable(Float32), `tier_hint` Nullable(UInt8), `privacy` LowCardinality(String),
  `occurred_at` DateTime64(3, 'UTC'), `tool_call_id` Nullable(String), `relevance` Nullable(Float32),
  `embedding_dims` UInt32)
ENGINE = ReplacingMergeTree PARTITION BY toYYYYMM(occurred_at) ORDER BY (tenant_id, run_id, seq, event_id)
SETTINGS non_replicated_deduplication_window = 1000;
CREATE TABLE `DB`.`usage` (`event_id` String, `tenant_id` String, `user_id` String, `session_id` String,
  `run_id` String, `agent_id` String, `call_id` String, `provider` LowCardinality(String),
  `model` LowCardinality(String), `input_tokens` UInt64, `output_tokens` UInt64, `cached_read_tokens` UInt64,
  `cache_write_tokens` UInt64, `reasoning_tokens` UInt64, `latency_ms` UInt32, `streamed` Bool, `complete` Bool,
  `occurred_at` DateTime64(3, 'UTC'))
ENGINE = ReplacingMergeTree PARTITION BY toYYYYMM(occurred_at) ORDER BY (tenant_id, run_id, event_id)
SETTINGS non_replicated_deduplication_window = 1000;
CREATE TABLE `DB`.`runs` (`event_id` String, `tenant_id` String, `user_id` String, `session_id` String,
  `run_id` String, `parent_run_id` Nullable(String), `workflow_id` String, `agent_id` String,
  `phase` LowCardinality(String), `status` LowCardinality(Nullable(String)), `policy_version` Nullable(String),
  `prefix_hash` Nullable(String), `model` LowCardinality(Nullable(String)), `privacy` LowCardinality(String),
  `occurred_at` DateTime64(3, 'UTC'))
ENGINE = ReplacingMergeTree PARTITION BY toYYYYMM(occurred_at) ORDER BY (tenant_id, run_id, event_id)
SETTINGS non_replicated_deduplication_window = 1000;
CREATE TABLE `DB`.`decisions` (`decision_id` String, `tenant_id` String, `user_id` Nullable(String),
  `session_id` Nullable(String), `run_id` Nullable(String), `kind` LowCardinality(String),
  `slot` LowCardinality(Nullable(String)), `state` LowCardinality(Nullable(String)),
  `previous_state` LowCardinality(Nullable(String)), `used_tokens` Nullable(UInt64), `cap_tokens` Nullable(UInt64),
  `window` LowCardinality(Nullable(String)), `admitted` Nullable(Bool), `request_id` Nullable(String),
  `reason` String, `source_event_id` Nullable(String), `manifest_version` Nullable(UInt64),
  `decided_at` DateTime64(3, 'UTC'), `estimated_tokens` Nullable(UInt64), `discrepancy_tokens` Nullable(Int64),
  `strategy` LowCardinality(Nullable(String)), `policy_version` Nullable(String), `tokens_freed` Nullable(UInt64),
  `cost_effect_micros` Nullable(Int64), `job_id` Nullable(String),
  `actions` Array(Tuple(item_id String, action LowCardinality(String), tokens UInt64)),
  `summary_id` Nullable(String), `summary_depth` Nullable(UInt8), `summary_fidelity` Nullable(Float32))
ENGINE = ReplacingMergeTree ORDER BY (tenant_id, decision_id) SETTINGS non_replicated_deduplication_window = 1000;
CREATE TABLE `DB`.`dead_letters` (`tenant_id` String, `dead_letter_id` String, `source_topic` LowCardinality(String),
  `source_partition` UInt32, `source_offset` UInt64, `reason_code` LowCardinality(String), `reason` String,
  `original` Nullable(String), `failed_at` DateTime64(3, 'UTC'))
ENGINE = ReplacingMergeTree ORDER BY (tenant_id, dead_letter_id) SETTINGS non_replicated_deduplication_window = 1000;
CREATE TABLE `DB`.`memory_records` (`memory_id` String, `tenant_id` String, `user_id` Nullable(String),
  `session_id` Nullable(String), `scope` LowCardinality(String), `type` LowCardinality(String),
  `status` LowCardinality(String), `version` UInt64, `content` Nullable(String), `content_digest` String,
  `source_run_id` Nullable(String), `source_candidate_id` Nullable(String), `created_at` DateTime64(3, 'UTC'),
  `updated_at` DateTime64(3, 'UTC'), `expires_at` Nullable(DateTime64(3, 'UTC')), `reason` Nullable(String))
ENGINE = ReplacingMergeTree(version) ORDER BY (tenant_id, memory_id)
SETTINGS non_replicated_deduplication_window = 1000;
CREATE TABLE `DB`.`invalidations` (`invalidation_id` String, `tenant_id` String, `kind` LowCardinality(String),
  `target_type` LowCardinality(String), `target_id` String, `source_memory_id` Nullable(String),
  `user_id` Nullable(String), `session_id` Nullable(String), `run_id` Nullable(String), `reason` String,
  `occurred_at` DateTime64(3, 'UTC'))
ENGINE = ReplacingMergeTree ORDER BY (tenant_id, invalidation_id) SETTINGS non_replicated_deduplication_window = 1000
"""

_TURN = ("event_id", "tenant_id", "user_id", "session_id", "run_id", "agent_id", "seq", "role", "kind", "slot",
         "item_id", "content", "content_digest", "token_count", "model", "privacy", "occurred_at")
_USAGE = ("event_id", "tenant_id", "user_id", "session_id", "run_id", "agent_id", "call_id", "provider", "model",
          "input_tokens", "output_tokens", "latency_ms", "streamed", "complete", "occurred_at")
_RUN = ("event_id", "tenant_id", "user_id", "session_id", "run_id", "workflow_id", "agent_id", "phase", "status",
        "privacy", "occurred_at")


def _turn(event_id: str, seq: int, tokens: int, at: dt.datetime, run: str = "r1") -> tuple:
    return (event_id, "acme", "u1", "s1", run, "agent", seq, "user", "message", "history", f"item-{seq}",
            f"text {event_id}", content_digest(f"text {event_id}"), tokens, "gpt-4o", "retained", at)


def _usage(event_id: str, call_id: str, tokens: int, at: dt.datetime) -> tuple:
    return (event_id, "acme", "u1", "s1", "r1", "agent", call_id, "openai", "gpt-4o", tokens, 10, 5, False, True, at)


def _run(event_id: str, phase: str, at: dt.datetime, status: str | None = None) -> tuple:
    return (event_id, "acme", "u1", "s1", "r1", "r1", "agent", phase, status, "retained", at)


@pytest.fixture
def admin(chdb_dsn: str) -> Iterator[Client]:
    """A writable client on the module's engine, on no database in particular (the tests make their own)."""
    client = clickhouse_connect.get_client(dsn=chdb_dsn)
    yield client
    client.close()


@pytest.fixture
def database() -> str:
    return f"m_{uuid.uuid4().hex[:12]}"


#: What a version between the release and migrations added on top of it (its ensure_schema's statements).
BETWEEN = """
ALTER TABLE `DB`.`turns` ADD COLUMN IF NOT EXISTS `layer` LowCardinality(Nullable(String)),
  ADD COLUMN IF NOT EXISTS `ingested_at` DateTime64(3, 'UTC') DEFAULT now64(3);
ALTER TABLE `DB`.`usage` ADD COLUMN IF NOT EXISTS `ingested_at` DateTime64(3, 'UTC') DEFAULT now64(3);
ALTER TABLE `DB`.`runs` ADD COLUMN IF NOT EXISTS `ingested_at` DateTime64(3, 'UTC') DEFAULT now64(3);
CREATE TABLE IF NOT EXISTS `DB`.`costs` (`cost_id` String, `tenant_id` String, `user_id` String,
  `session_id` String, `run_id` String, `root_run_id` String, `parent_run_id` Nullable(String), `workflow_id` String,
  `agent_id` String, `surface` LowCardinality(String), `model` LowCardinality(Nullable(String)), `quantity` UInt64,
  `unit` LowCardinality(String), `micros` UInt64, `price_version` LowCardinality(String), `estimated` Bool,
  `source_event_id` String, `occurred_at` DateTime64(3, 'UTC'))
ENGINE = ReplacingMergeTree ORDER BY (tenant_id, run_id, cost_id) SETTINGS non_replicated_deduplication_window = 1000
"""


@pytest.fixture(params=["released", "between"])
def released(request: pytest.FixtureRequest, admin: Client, database: str) -> str:
    """A database as the released version left it (or as a later version before migrations, which added
    columns to it, left it), holding duplicates by the budget's identities: a turn resent a month later under a
    new event id with other tokens, a usage report logged twice, a run started twice."""
    admin.command(f"CREATE DATABASE `{database}`")
    for statement in RELEASED_V1.replace("`DB`", f"`{database}`").split(";"):
        admin.command(statement)
    admin.insert(f"`{database}`.turns", [
        _turn("t0", 0, 100, T0), _turn("t1", 1, 40, T0), _turn("t1-resent", 1, 45, APRIL), _turn("t2", 2, 7, APRIL),
        _turn("t0-other-run", 0, 3, T0, run="r2"),
    ], column_names=_TURN)
    admin.insert(f"`{database}`.usage", [
        _usage("u1", "call-1", 500, T0), _usage("u1-logged-again", "call-1", 500, T0 + dt.timedelta(seconds=2)),
        _usage("u2", "call-2", 70, APRIL),
    ], column_names=_USAGE)
    admin.insert(f"`{database}`.runs", [
        _run("s1", "started", T0), _run("s1-again", "started", APRIL), _run("f1", "finalized", APRIL, "succeeded"),
    ], column_names=_RUN)
    decision = Decision(decision_id="d-1", tenant_id="acme", run_id="r1", kind="usage_reconciled", reason="ok",
                        used_tokens=570, decided_at=T0)
    spec = next(s for s in TABLES if s.name == "decisions")
    admin.insert(f"`{database}`.decisions", [spec.row(decision)], column_names=spec.column_names)
    if request.param == "between":  # after the rows: their parts lack what it added
        for statement in BETWEEN.replace("`DB`", f"`{database}`").split(";"):
            admin.command(statement)
        admin.command(f"INSERT INTO `{database}`.costs (cost_id, tenant_id, run_id, surface, micros, occurred_at) "
                      f"VALUES ('c-1', 'acme', 'r1', 'inference', 900, '{T0:%Y-%m-%d %H:%M:%S}')")
    return database


def _rows(admin: Client, sql: str) -> list[tuple]:
    return [tuple(row) for row in admin.query(sql).result_rows]


def test_a_released_database_is_upgraded_in_place_keeping_its_rows(chdb_dsn: str, admin: Client, released: str) -> None:
    db = released
    sink = ClickHouseSink(chdb_dsn, database=db)
    try:
        sink.ensure_schema()
        # One row per budget identity; of a duplicated identity, the earliest copy (what the budget counted).
        assert sink.query("SELECT run_id, seq, event_id, token_count FROM turns ORDER BY run_id, seq").rows == [
            ("r1", 0, "t0", 100), ("r1", 1, "t1", 40), ("r1", 2, "t2", 7), ("r2", 0, "t0-other-run", 3)]
        assert sink.query("SELECT call_id, event_id, input_tokens FROM usage ORDER BY call_id").rows == [
            ("call-1", "u1", 500), ("call-2", "u2", 70)]
        assert sink.query("SELECT phase, event_id FROM runs ORDER BY phase").rows == [
            ("finalized", "f1"), ("started", "s1")]
        # Unmerged parts still hold nothing twice: the rebuild copied one row per identity.
        assert _rows(admin, f"SELECT count() FROM `{db}`.turns") == [(4,)]
        # Rows kept from before record their event time as ingestion time; decisions theirs.
        assert _rows(admin, f"SELECT count() FROM `{db}`.turns WHERE ingested_at != occurred_at") == [(0,)]
        assert _rows(admin, f"SELECT ingested_at = decided_at, used_tokens FROM `{db}`.decisions") == [(True, 570)]
        assert _rows(admin, f"SELECT count() FROM `{db}`.costs WHERE ingested_at != occurred_at") == [(0,)]
        keys = dict(_rows(admin, f"SELECT name, sorting_key FROM system.tables WHERE database = '{db}'"))
        assert (keys["turns"], keys["usage"], keys["runs"]) == (
            "tenant_id, run_id, seq", "tenant_id, run_id, call_id", "tenant_id, run_id, phase")
        assert _rows(admin, f"SELECT version FROM `{db}`.schema_migrations FINAL ORDER BY version") == [
            (m.version,) for m in MIGRATIONS]

        # The rollups created by the upgrade start from the rows it kept.
        for view in ("hourly_tokens_from_turns", "hourly_tokens_from_usage"):
            admin.command(f"SYSTEM REFRESH VIEW `{db}`.{view}")
            admin.command(f"SYSTEM WAIT VIEW `{db}`.{view}")
        assert sink.query("SELECT hour, source, records, tokens FROM hourly_tokens ORDER BY hour, source").rows == [
            (T0, "turns", 3, 143), (T0, "usage", 1, 510), (APRIL.replace(hour=9), "turns", 1, 7),
            (APRIL.replace(hour=9), "usage", 1, 80)]

        # What arrives after the upgrade collapses onto the kept rows, and loses to them (they came first).
        sink.add(Logged(_model_turn(seq=1, tokens=999), 0))  # even the first offset of a new topic
        sink.flush()
        assert sink.query("SELECT sum(token_count) FROM turns").rows == [(150,)]

        before = _rows(admin, "SELECT count() FROM system.mutations")
        assert migrate(sink._writer, db) == []  # a second run applies nothing, changes nothing
        assert _rows(admin, "SELECT count() FROM system.mutations") == before
        assert sink.query("SELECT count(), sum(token_count) FROM turns").rows == [(4, 150)]
    finally:
        sink.close()


def _model_turn(seq: int, tokens: int, at: dt.datetime = APRIL) -> TurnEvent:
    return TurnEvent(event_id=f"new-{seq}", tenant_id="acme", user_id="u1", session_id="s1", run_id="r1",
                     agent_id="agent", seq=seq, role="user", kind="message", slot="history", item_id=f"item-{seq}",
                     content="resent", token_count=tokens, model="gpt-4o", occurred_at=at)


def _schema(admin: Client, db: str) -> set[tuple]:
    """Every table (name, engine, keys) and column (table, name, type, default) of ``db``."""
    tables = _rows(admin, f"SELECT name, engine, sorting_key, partition_key FROM system.tables WHERE database = '{db}' "
                          "AND name != 'schema_lock'")
    columns = _rows(admin, f"SELECT table, name, type, default_kind, default_expression FROM system.columns "
                           f"WHERE database = '{db}'")
    return set(tables) | set(columns)


def test_a_fresh_database_ends_as_an_upgraded_one_and_as_the_specs_describe(
    chdb_dsn: str, admin: Client, released: str
) -> None:
    fresh = f"m_{uuid.uuid4().hex[:12]}"
    for db in (released, fresh):
        sink = ClickHouseSink(chdb_dsn, database=db)
        try:
            sink.ensure_schema()
        finally:
            sink.close()
    assert _schema(admin, fresh) ^ _schema(admin, released) == set()
    columns = _rows(admin, f"SELECT table, name, type, default_kind, default_expression FROM system.columns "
                           f"WHERE database = '{fresh}'")
    engines = dict(_rows(admin, f"SELECT name, engine_full FROM system.tables WHERE database = '{fresh}'"))
    for spec in TABLES:
        described = {(name, kind) for name, kind in spec.columns} | {
            (name, definition) for name, definition in spec.server_columns}
        present = {(name, f"{ch_type} {default_kind} {expression}".replace("  ", "").strip())
                   for table, name, ch_type, default_kind, expression in columns if table == spec.name}
        assert _normal(present) == _normal(described), spec.name
        assert f"ORDER BY ({', '.join(spec.order_by)})" in engines[spec.name]
        assert engines[spec.name].startswith(spec.engine if spec.version else "ReplacingMergeTree ")


def _normal(columns: set[tuple[str, str]]) -> set[tuple[str, str]]:
    # ClickHouse prints -x as negate(x) in system.columns; the specs write what the DDL says.
    return {(name, definition.replace("negate(source_offset)", "-source_offset"))
            for name, definition in columns}


def test_concurrent_runners_apply_every_migration_once(chdb_dsn: str, admin: Client, database: str) -> None:
    start = threading.Barrier(3)
    errors: list[BaseException] = []

    def run() -> None:
        sink = ClickHouseSink(chdb_dsn, database=database)
        try:
            start.wait()
            sink.ensure_schema()
        except BaseException as error:  # reported below: a thread's exception would otherwise vanish
            errors.append(error)
        finally:
            sink.close()

    runners = [threading.Thread(target=run) for _ in range(3)]
    for runner in runners:
        runner.start()
    for runner in runners:
        runner.join(120)
    assert errors == []
    recorded = _rows(admin, f"SELECT version, count() FROM `{database}`.schema_migrations GROUP BY version "
                            "ORDER BY version")
    assert recorded == [(m.version, 1) for m in MIGRATIONS]
    assert _rows(admin, f"SELECT count() FROM system.tables WHERE database = '{database}' AND name = 'schema_lock'") \
        == [(0,)]


def test_a_held_lock_makes_runners_wait_and_fail_naming_its_holder(admin: Client, database: str) -> None:
    admin.command(f"CREATE DATABASE `{database}`")
    holder = f"{migrations._PROCESS}:1234 since 2025-04-01T00:00:00+00:00"  # another thread of this process
    admin.command(f"CREATE TABLE `{database}`.schema_lock (holder String) ENGINE = Memory COMMENT '{holder}'")
    with pytest.raises(SchemaLocked, match="1234 since"):
        migrate(admin, database, exclusive_engine=True, lock_timeout_s=0.5)
    assert [s.applied_at for s in schema_state(admin, database)] == [None] * len(MIGRATIONS)
    assert unlock(admin, database) == holder
    assert len(migrate(admin, database, exclusive_engine=True)) == len(MIGRATIONS)


def test_on_chdb_a_lock_left_by_another_process_is_stale(admin: Client, database: str) -> None:
    admin.command(f"CREATE DATABASE `{database}`")
    admin.command(f"CREATE TABLE `{database}`.schema_lock (holder String) ENGINE = Memory "
                  "COMMENT 'other-host:1:0badc0de:1 since 2025-04-01T00:00:00+00:00'")
    applied = migrate(admin, database, exclusive_engine=True, lock_timeout_s=0.5)
    assert [m.version for m in applied] == [m.version for m in MIGRATIONS]


def test_retention_sets_changes_and_removes_ttls_and_rows_expire(chdb_dsn: str, admin: Client, database: str) -> None:
    sink = ClickHouseSink(chdb_dsn, database=database)
    try:
        sink.ensure_schema(TableRetention(event_days=30, rollup_days=400))
        ttl = dict(_rows(admin, f"SELECT name, engine_full FROM system.tables WHERE database = '{database}'"))
        assert "TTL toDateTime(greatest(occurred_at, ingested_at)) + toIntervalDay(30)" in ttl["turns"]
        assert "TTL toDateTime(greatest(decided_at, ingested_at)) + toIntervalDay(30)" in ttl["decisions"]
        assert "TTL toDateTime(failed_at) + toIntervalDay(30)" in ttl["dead_letters"]
        assert "TTL toDateTime(greatest(hour, computed_at)) + toIntervalDay(400)" in ttl["hourly_tokens"]
        mutations = _rows(admin, "SELECT count() FROM system.mutations")
        sink.ensure_schema(TableRetention(event_days=30, rollup_days=400))  # unchanged: no ALTER at all
        assert _rows(admin, "SELECT count() FROM system.mutations") == mutations

        now = dt.datetime.now(dt.UTC).replace(microsecond=0)
        spec = next(s for s in TABLES if s.name == "turns")
        rows = [(*spec.row(Logged(_model_turn(seq, 10 + seq, at=now - dt.timedelta(days=age)), seq)), ingested)
                for seq, (age, ingested) in enumerate([
                    (40, now - dt.timedelta(days=40)),  # expired
                    (40, now),  # a backfill of old events: kept for the retention period from its loading
                    (20, now - dt.timedelta(days=20)),  # within retention
                ])]
        admin.insert(f"`{database}`.turns", rows, column_names=[*spec.column_names, "ingested_at"])
        sink.add(_memory("expired", now - dt.timedelta(days=1)))
        sink.add(_memory("kept", None))
        sink.flush()
        for table in ("turns", "memory_records"):
            admin.command(f"OPTIMIZE TABLE `{database}`.{table} FINAL")
        assert _rows(admin, f"SELECT token_count FROM `{database}`.turns ORDER BY seq") == [(11,), (12,)]
        assert _rows(admin, f"SELECT memory_id FROM `{database}`.memory_records") == [("kept",)]

        sink.ensure_schema(TableRetention(event_days=0, rollup_days=400))
        engine = _rows(admin, f"SELECT engine_full FROM system.tables WHERE database = '{database}' AND name = 'turns'")
        assert " TTL " not in engine[0][0]
    finally:
        sink.close()


def _memory(memory_id: str, expires_at: dt.datetime | None) -> MemoryRecord:
    return MemoryRecord(memory_id=memory_id, tenant_id="acme", scope="user", type="fact", status="active", version=1,
                        content="x", content_digest=content_digest("x"), created_at=T0, updated_at=T0,
                        expires_at=expires_at)


def test_the_migrate_command_shows_prints_and_applies_the_pending_versions(
    chdb_dsn: str, admin: Client, released: str
) -> None:
    def ctxflow(*args: str) -> str:
        result = CliRunner().invoke(app, ["--clickhouse-dsn", chdb_dsn, "migrate", "--database", released, *args])
        assert result.exit_code == 0, result.output
        return result.output

    planned = ctxflow("--dry-run")
    assert f"EXCHANGE TABLES `{released}`.`turns` AND `{released}`.`turns__rekeyed`;" in planned
    assert _rows(admin, f"SELECT count() FROM system.tables WHERE database = '{released}' "
                        "AND name = 'schema_migrations'") == [(0,)]  # a dry run changes nothing

    applied = ctxflow()
    assert f"applied {', '.join(str(m.version) for m in MIGRATIONS)}" in applied
    assert _rows(admin, f"SELECT sorting_key FROM system.tables WHERE database = '{released}' AND name = 'usage'") \
        == [("tenant_id, run_id, call_id",)]
    assert "nothing to apply" in ctxflow()
    assert "the schema was not locked" in ctxflow("--unlock")
