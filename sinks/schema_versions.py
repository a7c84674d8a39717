"""The history of ctxflow's ClickHouse schema: every change to its tables and views, in order.

:mod:`sinks.migrations` applies the migrations a database lacks, once each, in version order (every sink start
calls it through ``ClickHouseSink.ensure_schema``; ``ctxflow migrate`` shows and applies them by hand).

How to change the schema
------------------------
- **A new table**: give it a :class:`~sinks.clickhouse_ddl.TableSpec` in ``clickhouse_ddl.TABLES``, then append
  one entry to :data:`MIGRATIONS`: ``Migration(8, "memory verdicts table", create_tables("memory_verdicts"))``.
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

Rollups (``hourly_tokens``, ``hourly_cost``) are refreshable materialized views over the de-duplicated tables,
told which groups to recompute by marks an insert-triggered view leaves: see :func:`_rollup` for why an ordinary
(insert-triggered) aggregate would count redelivered rows twice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ctxflow.sinks.clickhouse_ddl import TABLE_BY_NAME

Statements = Callable[[str], tuple[str, ...]]
"""A migration's SQL for one database (its name, unquoted): statements run in order."""


@dataclass(frozen=True, slots=True)
class Migration:
    """One versioned change: ``statements(database)`` run in order, then ``version`` is recorded as applied."""

    version: int
    name: str
    statements: Statements


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
        # A version between the release and migrations added ingested_at defaulting to now64(): rows older than
        # the column would read as ingested at every read, so they read their event time too.
        f"ALTER TABLE `{db}`.`{table}` MODIFY COLUMN ingested_at DEFAULT occurred_at",
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


#: How far before the last refresh a refresh looks for marks: longer than any insert takes from its start (when
#: its marks are stamped) to its commit, so no mark becomes visible only after the refresh that should have seen it.
REFRESH_OVERLAP = "INTERVAL 10 MINUTE"
#: Marks older than this are dropped; a rollup whose refresh fails for longer misses the groups they named.
MARKS_KEPT = "INTERVAL 7 DAY"

Columns = tuple[tuple[str, str], ...]
"""``(expression, name)`` pairs of a SELECT list."""


@dataclass(frozen=True, slots=True)
class Rollup:
    """An hourly rollup of one source table into ``target``: groups ``(tenant_id, hour, <part>)``, where ``part``
    (an expression over the source row, named ``part_name`` in the target) splits an hour, and ``measures``
    computed over the source's de-duplicated rows (name source columns as ``src.column``: an alias equal to a
    column's name would otherwise shadow the column in the other measures)."""

    view: str
    target: str
    source: str
    identity: tuple[str, ...]
    part: str
    part_name: str
    measures: Columns

    @property
    def tagged(self) -> bool:
        """Whether ``part`` is a constant naming the source: a rollup several sources share."""
        return self.part.startswith("'")


def _rollup(db: str, r: Rollup) -> tuple[str, ...]:
    """The statements that keep ``r.target`` equal to an aggregate of ``r.source`` FINAL, whatever the duplicates.

    Why not an ordinary materialized view: it aggregates each *inserted block*, so a redelivered record (a
    replay after a crash, re-cut into other batches; a resend under a new event id) is added again, and insert
    deduplication only drops byte-identical blocks.

    Instead, each group is recomputed whole from the source ``FINAL`` (one row per identity: the copy the budget
    counted, or for costs the last line of an id) by a refreshable view, every minute, and written with
    ``computed_at``: the rollup (``ReplacingMergeTree(computed_at)``) keeps a group's newest value. Which groups:
    those *marked* since the previous refresh (less :data:`REFRESH_OVERLAP`). An insert-triggered view marks, for
    every row inserted into the source, its own group and the groups of the copies of its identity already
    stored: a new copy can take the place of one in another hour (a resent turn in another hour, seen before the
    first; a cost line updated later), and that hour must give the old value back, even if a merge removes the
    old copy before the refresh runs. The stored copies are read through a plain view (``stored_<source>``): in a
    materialized view every reference to the source table itself reads only the inserted block, which also
    scopes the lookup to that block's identities (an index lookup per inserted block: measured at 10-30 ms per
    block of 2,000 turns on chDB). A block leaves one mark per group it touches. A marked group with no row left
    is written as zeros.

    Creating the rollup marks every group the source holds, so its first refresh backfills it.
    """
    ident = ", ".join(r.identity)
    mark_part = r.part if r.tagged else f"n.{r.part}"
    marks = (
        f"CREATE MATERIALIZED VIEW IF NOT EXISTS `{db}`.`{r.view}_marks` TO `{db}`.rollup_marks AS "
        f"SELECT DISTINCT '{r.view}' AS rollup, n.tenant_id AS tenant_id, mark.1 AS hour, mark.2 AS part "
        f"FROM `{db}`.`{r.source}` AS n LEFT JOIN "
        f"(SELECT {ident}, toStartOfHour(occurred_at) AS hour, {r.part} AS part FROM `{db}`.`stored_{r.source}` "
        f"WHERE ({ident}) IN (SELECT {ident} FROM `{db}`.`{r.source}`)) AS stored "
        f"USING ({ident}) ARRAY JOIN arrayFilter(m -> m.2 != '', "
        f"[(toStartOfHour(n.occurred_at), {mark_part}), (stored.hour, stored.part)]) AS mark "
        "SETTINGS join_use_nulls = 0"
    )
    keys = ", ".join(("tenant_id", "hour", r.part_name))
    since = f"{r.part_name} = {r.part}" if r.tagged else "1"
    touched = (
        f"SELECT DISTINCT tenant_id, hour, part AS {r.part_name} FROM `{db}`.rollup_marks WHERE rollup = '{r.view}' "
        f"AND marked_at >= (SELECT max(computed_at) FROM `{db}`.`{r.target}` WHERE {since}) - {REFRESH_OVERLAP}"
    )
    totals = (
        f"SELECT tenant_id, toStartOfHour(occurred_at) AS hour, {r.part} AS {r.part_name}, "
        + ", ".join(f"{expr} AS {name}" for expr, name in r.measures)
        + f" FROM `{db}`.`{r.source}` AS src FINAL WHERE ({keys}) IN (SELECT {keys} FROM touched) GROUP BY {keys}"
    )
    picked = ", ".join([f"touched.{k} AS {k}" for k in ("tenant_id", "hour", r.part_name)]
                       + [f"totals.{name} AS {name}" for _, name in r.measures])
    return (
        f"CREATE VIEW IF NOT EXISTS `{db}`.`stored_{r.source}` AS SELECT {ident}, occurred_at"
        f"{'' if r.tagged else ', ' + r.part} FROM `{db}`.`{r.source}`",
        marks,
        # After the marks view exists, so a row inserted meanwhile is marked by one or the other.
        f"INSERT INTO `{db}`.rollup_marks (rollup, tenant_id, hour, part) SELECT DISTINCT '{r.view}', tenant_id, "
        f"toStartOfHour(occurred_at), {r.part} FROM `{db}`.`{r.source}`",
        f"CREATE MATERIALIZED VIEW IF NOT EXISTS `{db}`.`{r.view}` REFRESH EVERY 1 MINUTE "
        f"APPEND TO `{db}`.`{r.target}` AS WITH touched AS ({touched}) SELECT {picked}, now64(6) AS computed_at "
        f"FROM touched LEFT JOIN ({totals}) AS totals USING ({keys}) SETTINGS final = 0, join_use_nulls = 0",
    )


_TOKEN_KINDS = ("input_tokens", "output_tokens", "cached_read_tokens", "cache_write_tokens", "reasoning_tokens")


def _hourly_tokens(db: str) -> tuple[str, ...]:
    kinds = ", ".join(f"{kind} UInt64" for kind in _TOKEN_KINDS)
    return (
        f"CREATE TABLE IF NOT EXISTS `{db}`.rollup_marks (rollup LowCardinality(String), tenant_id String, "
        "hour DateTime('UTC'), part LowCardinality(String), marked_at DateTime64(6, 'UTC') DEFAULT now64(6)) "
        f"ENGINE = MergeTree ORDER BY (rollup, marked_at) TTL toDateTime(marked_at) + {MARKS_KEPT}",
        f"CREATE TABLE IF NOT EXISTS `{db}`.hourly_tokens (tenant_id String, hour DateTime('UTC'), "
        f"source LowCardinality(String), records UInt64, tokens UInt64, {kinds}, computed_at DateTime64(6, 'UTC')) "
        "ENGINE = ReplacingMergeTree(computed_at) ORDER BY (tenant_id, hour, source)",
        *_rollup(db, Rollup("hourly_tokens_from_turns", "hourly_tokens", "turns", ("tenant_id", "run_id", "seq"),
                            "'turns'", "source",
                            (("count()", "records"), ("sum(ifNull(src.token_count, 0))", "tokens"),
                             *(("toUInt64(0)", kind) for kind in _TOKEN_KINDS)))),
        *_rollup(db, Rollup("hourly_tokens_from_usage", "hourly_tokens", "usage", ("tenant_id", "run_id", "call_id"),
                            "'usage'", "source",
                            (("count()", "records"),
                             (f"sum({' + '.join(f'src.{kind}' for kind in _TOKEN_KINDS)})", "tokens"),
                             *((f"sum(src.{kind})", kind) for kind in _TOKEN_KINDS)))),
    )


def _envelopes_and_costs(db: str) -> tuple[str, ...]:
    # ctxflow created these tables before migrations knew them (without ingested_at): created here if missing,
    # stamped if they came from that version.
    return (
        *create_tables("envelopes", "costs")(db),
        *_stamp_ingestion(db, "envelopes", "updated_at"),
        *_stamp_ingestion(db, "costs", "occurred_at"),
    )


def _hourly_cost(db: str) -> tuple[str, ...]:
    return (
        f"CREATE TABLE IF NOT EXISTS `{db}`.hourly_cost (tenant_id String, hour DateTime('UTC'), "
        "surface LowCardinality(String), records UInt64, micros Int64, estimated_micros Int64, "
        "computed_at DateTime64(6, 'UTC')) ENGINE = ReplacingMergeTree(computed_at) "
        "ORDER BY (tenant_id, hour, surface)",
        *_rollup(db, Rollup("hourly_cost_from_costs", "hourly_cost", "costs", ("tenant_id", "run_id", "cost_id"),
                            "surface", "surface",
                            (("count()", "records"), ("sum(src.micros)", "micros"),
                             ("sumIf(src.micros, src.estimated)", "estimated_micros")))),
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
    Migration(6, "envelopes and costs tables", _envelopes_and_costs),
    Migration(7, "hourly cost per tenant", _hourly_cost),
    Migration(8, "memory verdicts table", create_tables("memory_verdicts")),
    Migration(9, "memory retrieval index", create_tables("memory_index")),
    Migration(10, "invalidations record when they were ingested",
              lambda db: _stamp_ingestion(db, "invalidations", "occurred_at")),
)
"""Every migration, in version order (versions are 1, 2, 3, ... without gaps)."""

#: Rollup tables and the column their retention counts from.
ROLLUPS: dict[str, str] = {"hourly_tokens": "hour", "hourly_cost": "hour"}
