"""The history of ctxflow's ClickHouse schema: every change to its tables and views, in order.

:mod:`sinks.migrations` applies the migrations a database lacks, once each, in version order (every sink start
calls it through ``ClickHouseSink.ensure_schema``; ``ctxflow migrate`` shows and applies them by hand).

How to change the schema
------------------------
- **A new table**: give it a :class:`~sinks.clickhouse_ddl.TableSpec` in ``clickhouse_ddl.TABLES``, then append
  one entry to :data:`MIGRATIONS`: ``Migration(7, "envelopes table", create_tables("envelopes"))``.
- **A new column** of a table (a new field of a record's schema): add it to the table's spec; nothing here.
  After the migrations, ``ensure_schema`` adds every spec column a table lacks (``ADD COLUMN IF NOT EXISTS``).
- **Anything else** (a sorting key, an engine, a type, a view, a backfill): a new migration with its SQL.

Rules every migration keeps:

- Released migrations are never edited: deployments recorded them as applied and will not run them again.
- A migration is re-runnable from any statement. A process can die between two statements, and only a whole
  migration is recorded, so the next runner applies it again from its first statement. Use ``IF [NOT] EXISTS``;
  rebuild a table under a scratch name the migration drops first, and swap it in with ``EXCHANGE TABLES``
  (atomic in an ``Atomic`` database, the default engine of ClickHouse and chDB databases).
- Mutations run synchronously (the runner sets ``mutations_sync``), so a statement sees its predecessors' effect.
- A migration that depends on a table another part of ctxflow may not have created yet names it in
  ``requires``: it waits, pending, until the table exists, while later migrations apply. Use it only for a
  migration nothing else depends on.

Rollups (``hourly_tokens``, ``hourly_cost``) are refreshable materialized views: see :func:`_rollup_view` for
why an ordinary (insert-triggered) view would count redelivered rows twice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ctxflow.sinks.clickhouse_ddl import TABLE_BY_NAME

Statements = Callable[[str], tuple[str, ...]]
"""A migration's SQL for one database (its name, unquoted): statements run in order."""


@dataclass(frozen=True, slots=True)
class Migration:
    """One versioned change: ``statements(database)`` run in order, then ``version`` is recorded as applied.

    ``requires`` names tables that must exist first (see the module docstring).
    """

    version: int
    name: str
    statements: Statements
    requires: tuple[str, ...] = ()


def create_tables(*names: str) -> Statements:
    """Statements creating the tables ``names`` as their specs in ``clickhouse_ddl.TABLES`` describe them."""
    specs = [TABLE_BY_NAME[name] for name in names]
    return lambda db: tuple(spec.create_sql(db) for spec in specs)


_SETTINGS = "SETTINGS non_replicated_deduplication_window = 1000"
_ID, _OPT, _ENUM, _OPT_ENUM, _TS = (
    "String", "Nullable(String)", "LowCardinality(String)", "LowCardinality(Nullable(String))", "DateTime64(3, 'UTC')",
)
#: The schema as released before versioned migrations existed (frozen: never edit).
_V1_TABLES: tuple[tuple[str, str, str, str], ...] = (
    ("turns", f"event_id {_ID}, tenant_id {_ID}, user_id {_ID}, session_id {_ID}, run_id {_ID}, "
              f"parent_run_id {_OPT}, agent_id {_ID}, seq UInt64, role {_ENUM}, kind {_ENUM}, slot {_ENUM}, "
              f"item_id {_ID}, content {_OPT}, content_digest String, token_count Nullable(UInt32), model {_ENUM}, "
              f"importance Nullable(Float32), tier_hint Nullable(UInt8), privacy {_ENUM}, occurred_at {_TS}, "
              f"tool_call_id {_OPT}, relevance Nullable(Float32), embedding_dims UInt32",
     "ReplacingMergeTree PARTITION BY toYYYYMM(occurred_at)", "tenant_id, run_id, seq, event_id"),
    ("usage", f"event_id {_ID}, tenant_id {_ID}, user_id {_ID}, session_id {_ID}, run_id {_ID}, agent_id {_ID}, "
              f"call_id {_ID}, provider {_ENUM}, model {_ENUM}, input_tokens UInt64, output_tokens UInt64, "
              "cached_read_tokens UInt64, cache_write_tokens UInt64, reasoning_tokens UInt64, latency_ms UInt32, "
              f"streamed Bool, complete Bool, occurred_at {_TS}",
     "ReplacingMergeTree PARTITION BY toYYYYMM(occurred_at)", "tenant_id, run_id, event_id"),
    ("runs", f"event_id {_ID}, tenant_id {_ID}, user_id {_ID}, session_id {_ID}, run_id {_ID}, "
             f"parent_run_id {_OPT}, workflow_id {_ID}, agent_id {_ID}, phase {_ENUM}, status {_OPT_ENUM}, "
             f"policy_version {_OPT}, prefix_hash {_OPT}, model {_OPT_ENUM}, privacy {_ENUM}, occurred_at {_TS}",
     "ReplacingMergeTree PARTITION BY toYYYYMM(occurred_at)", "tenant_id, run_id, event_id"),
    ("decisions", f"decision_id {_ID}, tenant_id {_ID}, user_id {_OPT}, session_id {_OPT}, run_id {_OPT}, "
                  f"kind {_ENUM}, slot {_OPT_ENUM}, state {_OPT_ENUM}, previous_state {_OPT_ENUM}, "
                  f"used_tokens Nullable(UInt64), cap_tokens Nullable(UInt64), `window` {_OPT_ENUM}, "
                  f"admitted Nullable(Bool), request_id {_OPT}, reason String, source_event_id {_OPT}, "
                  f"manifest_version Nullable(UInt64), decided_at {_TS}, estimated_tokens Nullable(UInt64), "
                  f"discrepancy_tokens Nullable(Int64), strategy {_OPT_ENUM}, policy_version {_OPT}, "
                  f"tokens_freed Nullable(UInt64), cost_effect_micros Nullable(Int64), job_id {_OPT}, "
                  "actions Array(Tuple(item_id String, action LowCardinality(String), tokens UInt64)), "
                  f"summary_id {_OPT}, summary_depth Nullable(UInt8), summary_fidelity Nullable(Float32)",
     "ReplacingMergeTree", "tenant_id, decision_id"),
    ("dead_letters", f"tenant_id {_ID}, dead_letter_id {_ID}, source_topic {_ENUM}, source_partition UInt32, "
                     f"source_offset UInt64, reason_code {_ENUM}, reason String, original {_OPT}, failed_at {_TS}",
     "ReplacingMergeTree", "tenant_id, dead_letter_id"),
    ("memory_records", f"memory_id {_ID}, tenant_id {_ID}, user_id {_OPT}, session_id {_OPT}, scope {_ENUM}, "
                       f"type {_ENUM}, status {_ENUM}, version UInt64, content {_OPT}, content_digest String, "
                       f"source_run_id {_OPT}, source_candidate_id {_OPT}, created_at {_TS}, updated_at {_TS}, "
                       f"expires_at Nullable({_TS}), reason {_OPT}",
     "ReplacingMergeTree(version)", "tenant_id, memory_id"),
    ("invalidations", f"invalidation_id {_ID}, tenant_id {_ID}, kind {_ENUM}, target_type {_ENUM}, "
                      f"target_id {_ID}, source_memory_id {_OPT}, user_id {_OPT}, session_id {_OPT}, "
                      f"run_id {_OPT}, reason String, occurred_at {_TS}",
     "ReplacingMergeTree", "tenant_id, invalidation_id"),
)


def _initial(db: str) -> tuple[str, ...]:
    # IF NOT EXISTS: a database created before migrations existed already has these tables, and is recognised
    # as version 1 without anything being recreated.
    return tuple(
        f"CREATE TABLE IF NOT EXISTS `{db}`.`{name}` ({columns}) ENGINE = {engine} ORDER BY ({key}) {_SETTINGS}"
        for name, columns, engine, key in _V1_TABLES
    )


def _rekey(db: str, table: str, identity: str) -> tuple[str, ...]:
    """Rebuild ``table`` keyed by ``(tenant_id, run_id, identity)``, unpartitioned, first copy (lowest offset)
    winning, keeping its rows: one row per identity, the copy the budget most likely counted."""
    scratch = f"`{db}`.`{table}__rekeyed`"
    key = f"tenant_id, run_id, {identity}"
    return (
        # Rows from before offsets were stored get offset -1 (they precede every copy that arrives from now on)
        # and their event time as ingestion time (the true one was not kept).
        f"ALTER TABLE `{db}`.`{table}` ADD COLUMN IF NOT EXISTS source_offset Int64 DEFAULT -1, "
        "ADD COLUMN IF NOT EXISTS precedence Int64 MATERIALIZED -source_offset, "
        f"ADD COLUMN IF NOT EXISTS ingested_at {_TS} DEFAULT occurred_at",
        f"DROP TABLE IF EXISTS {scratch} SYNC",
        f"CREATE TABLE {scratch} AS `{db}`.`{table}` ENGINE = ReplacingMergeTree(precedence) PARTITION BY tuple() "
        f"ORDER BY ({key}) {_SETTINGS}",
        # Which copy of an old identity the budget counted is not recorded; the earliest by event time is the
        # likeliest (a resend is stamped when resent). Rows that have offsets (a re-run) keep the lowest.
        f"INSERT INTO {scratch} SELECT * FROM `{db}`.`{table}` FINAL "
        f"ORDER BY {key}, precedence DESC, occurred_at, event_id LIMIT 1 BY {key}",
        f"EXCHANGE TABLES `{db}`.`{table}` AND {scratch}",
        f"DROP TABLE {scratch} SYNC",
        f"ALTER TABLE `{db}`.`{table}` MODIFY COLUMN ingested_at {_TS} DEFAULT now64(3)",
        f"ALTER TABLE `{db}`.`{table}` MODIFY COLUMN source_offset REMOVE DEFAULT",
    )


def _identity(db: str) -> tuple[str, ...]:
    return (*_rekey(db, "turns", "seq"), *_rekey(db, "usage", "call_id"), *_rekey(db, "runs", "phase"))


def _stamp_ingestion(db: str, table: str, before: str) -> tuple[str, ...]:
    """Add ``ingested_at`` to ``table``: ``before`` (a timestamp column) for the rows it holds, the insert time for
    new ones. Materialized in between: a missing DEFAULT column is computed when read, so old rows would read
    as ingested now, at every read."""
    return (
        f"ALTER TABLE `{db}`.`{table}` ADD COLUMN IF NOT EXISTS ingested_at {_TS} DEFAULT {before}",
        f"ALTER TABLE `{db}`.`{table}` MATERIALIZE COLUMN ingested_at",  # fills only parts without the column
        f"ALTER TABLE `{db}`.`{table}` MODIFY COLUMN ingested_at {_TS} DEFAULT now64(3)",
    )


def _ingestion_index(db: str, table: str) -> tuple[str, ...]:
    # Parts are written in ingestion order, so a minmax index lets a refresh read only recently ingested granules.
    return (
        f"ALTER TABLE `{db}`.`{table}` ADD INDEX IF NOT EXISTS ingested_at_minmax ingested_at TYPE minmax "
        "GRANULARITY 1",
        f"ALTER TABLE `{db}`.`{table}` MATERIALIZE INDEX ingested_at_minmax",
    )


#: How far before the last refresh a refresh looks for newly ingested rows: longer than any insert takes from
#: its start (when ``ingested_at`` is stamped) to its commit, so no row is visible only after the refresh that
#: should have seen it looked.
REFRESH_OVERLAP = "INTERVAL 10 MINUTE"


Columns = tuple[tuple[str, str], ...]
"""``(expression, name)`` pairs of a SELECT list."""


def _rollup_view(db: str, view: str, target: str, source: str, keys: Columns, measures: Columns) -> str:
    """A refreshable view recomputing, each minute, every group of ``target`` touched by newly ingested rows.

    Why not an ordinary materialized view: it aggregates each *inserted block*, so a redelivered record (a
    replay after a crash, re-cut into other batches; a resend under a new event id) is added again, and insert
    deduplication only drops byte-identical blocks. A rollup keyed by the source's identity would double count
    too: copies of one identity may carry different event times, hence different hours.

    So each group (``keys``: tenant, hour, ...) is recomputed whole from the source ``FINAL`` (one row per
    identity, the copy the budget counted), and written with ``computed_at``: the rollup
    (``ReplacingMergeTree(computed_at)``) keeps the newest value of each group. A group is recomputed when a row
    ingested since the previous refresh (less :data:`REFRESH_OVERLAP`) falls in it, read *without* FINAL: a row
    superseded by an earlier copy in another hour still marks its own hour, which may have to lose a value it
    held. A touched group with no row left is written as zeros. The first refresh (empty rollup) computes every
    group: creating the view backfills it.
    """
    names = ", ".join(name for _, name in keys)
    constant = [(expr, name) for expr, name in keys if expr.startswith("'")]  # the source's tag in a shared rollup
    since = " AND ".join([f"{name} = {expr}" for expr, name in constant] or ["1"])
    touched = (
        f"SELECT DISTINCT {_select(keys)} FROM `{db}`.`{source}` WHERE ingested_at >= "
        f"(SELECT max(computed_at) FROM `{db}`.`{target}` WHERE {since}) - {REFRESH_OVERLAP}"
    )
    # Measures name source columns as ``src.column``: an alias equal to a column's name would otherwise shadow
    # the column in the other measures.
    totals = (
        f"SELECT {_select(keys)}, {_select(measures)} FROM `{db}`.`{source}` AS src FINAL "
        f"WHERE ({names}) IN (SELECT {names} FROM touched) GROUP BY {names}"
    )
    picked = ", ".join(
        [f"touched.{name} AS {name}" for _, name in keys] + [f"totals.{name} AS {name}" for _, name in measures]
    )
    return (
        f"CREATE MATERIALIZED VIEW IF NOT EXISTS `{db}`.`{view}` REFRESH EVERY 1 MINUTE APPEND TO `{db}`.`{target}` "
        f"AS WITH touched AS ({touched}) SELECT {picked}, now64(6) AS computed_at "
        f"FROM touched LEFT JOIN ({totals}) AS totals USING ({names}) SETTINGS final = 0, join_use_nulls = 0"
    )


def _select(columns: Columns) -> str:
    return ", ".join(expr if expr == name else f"{expr} AS {name}" for expr, name in columns)


_TOKEN_KINDS = ("input_tokens", "output_tokens", "cached_read_tokens", "cache_write_tokens", "reasoning_tokens")
_TENANT_HOUR: Columns = (("tenant_id", "tenant_id"), ("toStartOfHour(occurred_at)", "hour"))


def _hourly_tokens(db: str) -> tuple[str, ...]:
    kinds = ", ".join(f"{kind} UInt64" for kind in _TOKEN_KINDS)
    return (
        *_ingestion_index(db, "turns"),
        *_ingestion_index(db, "usage"),
        f"CREATE TABLE IF NOT EXISTS `{db}`.hourly_tokens (tenant_id String, hour DateTime('UTC'), "
        f"source LowCardinality(String), records UInt64, tokens UInt64, {kinds}, computed_at DateTime64(6, 'UTC')) "
        "ENGINE = ReplacingMergeTree(computed_at) ORDER BY (tenant_id, hour, source)",
        _rollup_view(db, "hourly_tokens_from_turns", "hourly_tokens", "turns", (*_TENANT_HOUR, ("'turns'", "source")),
                     (("count()", "records"), ("sum(ifNull(src.token_count, 0))", "tokens"),
                      *(("toUInt64(0)", kind) for kind in _TOKEN_KINDS))),
        _rollup_view(db, "hourly_tokens_from_usage", "hourly_tokens", "usage", (*_TENANT_HOUR, ("'usage'", "source")),
                     (("count()", "records"), (f"sum({' + '.join(f'src.{kind}' for kind in _TOKEN_KINDS)})", "tokens"),
                      *((f"sum(src.{kind})", kind) for kind in _TOKEN_KINDS))),
    )


def _hourly_cost(db: str) -> tuple[str, ...]:
    return (
        *_stamp_ingestion(db, "costs", "occurred_at"),
        *_ingestion_index(db, "costs"),
        f"CREATE TABLE IF NOT EXISTS `{db}`.hourly_cost (tenant_id String, hour DateTime('UTC'), "
        "surface LowCardinality(String), records UInt64, micros Int64, estimated_micros Int64, "
        "computed_at DateTime64(6, 'UTC')) ENGINE = ReplacingMergeTree(computed_at) "
        "ORDER BY (tenant_id, hour, surface)",
        _rollup_view(db, "hourly_cost_from_costs", "hourly_cost", "costs", (*_TENANT_HOUR, ("surface", "surface")),
                     (("count()", "records"), ("sum(src.micros)", "micros"),
                      ("sumIf(src.micros, src.estimated)", "estimated_micros"))),
    )


def _memory_expiry(db: str) -> tuple[str, ...]:
    return (
        f"ALTER TABLE `{db}`.memory_records MODIFY TTL assumeNotNull(expires_at) DELETE WHERE expires_at IS NOT NULL",
    )


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "initial schema", _initial),
    Migration(2, "event tables keyed by the budget's identities, first copy wins", _identity),
    Migration(3, "decisions record when they were ingested",
              lambda db: _stamp_ingestion(db, "decisions", "decided_at")),
    Migration(4, "memory records expire at expires_at", _memory_expiry),
    Migration(5, "hourly tokens per tenant", _hourly_tokens),
    Migration(6, "hourly cost per tenant", _hourly_cost, requires=("costs",)),
)
"""Every migration, in version order (versions are 1, 2, 3, ... without gaps)."""

#: Rollup tables and the column their retention counts from.
ROLLUPS: dict[str, str] = {"hourly_tokens": "hour", "hourly_cost": "hour"}
