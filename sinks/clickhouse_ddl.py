"""The ClickHouse projection: one table per projected record type, its DDL and its row mapping.

Each :class:`TableSpec` is the single source of a table's column order, so the DDL and the rows cannot drift.
Tables are created and changed by the versioned migrations of :mod:`sinks.schema_versions`; a test checks that
the migrated tables are exactly what these specs describe.

Idempotency: every table is a ``ReplacingMergeTree`` whose sorting key is the record's identity, and every
copy of a record collapses to one row. Readers see one row per identity before background merges run because
the analyst path sets ``final=1`` (see ``sinks.clickhouse``). Exact re-sends of a batch are also dropped at
insert time (``non_replicated_deduplication_window``), which keeps FINAL's work small.

The event tables (turns, usage, runs) are keyed by the identity the budget dedups on: a turn by
``(tenant, run, seq)``, a usage report by ``(tenant, run, call_id)``, a run boundary by ``(tenant, run, phase)``
(:mod:`processors.ledger`). A duplicate under a new event id is a second copy of that identity, and the budget
counts the first copy it read, which may differ from later ones (a resent turn with other content). So these
tables are *logged*: a record is added with its offset (:class:`Logged`), stored as ``source_offset``, and the
copy with the lowest offset wins (``ReplacingMergeTree(precedence)``, ``precedence = -source_offset``). Every copy
of one identity lies in one partition of its topic (records are keyed by tenant; a changed partition count needs
a state reset, as for the budget), so offsets order them exactly as the budget read them, whichever process
writes them and however batches are cut. They are not partitioned:
ReplacingMergeTree collapses only within a partition, and a copy re-stamped with another ``occurred_at`` must
meet the first.

``ingested_at`` is filled by ClickHouse at insert (outside the row mapping): when the row reached the projection.

Privacy: a turn with ``privacy=no_retention`` is stored without content (NULL); its digest, counts and ids
stay. A turn's embedding is never stored (an embedding of content is content); only its dimension count is.
A revoked memory record loses its content in the projection.

Memory records feed two tables: ``memory_records`` (every version, for analysts) and ``memory_index`` (what
agents recall from: ``ReplacingMergeTree(version, is_deleted)``, where a record that left ``active`` is a deleted
row, so a ``FINAL`` read serves active records only). Embeddings are stored there, and only there: an active
record's embedding is what recall ranks by, and it leaves with the record.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, Generic, TypeVar

from ctxflow.schemas.models import (
    CostLine,
    DeadLetter,
    Decision,
    Invalidation,
    MemoryRecord,
    MemoryStatus,
    MemoryVerdict,
    PrivacyMode,
    RunEnvelope,
    RunEvent,
    TurnEvent,
    UsageReport,
    content_digest,
)
from pydantic import BaseModel

Row = tuple[Any, ...]
M = TypeVar("M", bound=BaseModel)

_ID = "String"
_OPT = "Nullable(String)"
_ENUM = "LowCardinality(String)"  # not Enum8: a new Avro symbol must not break inserts
_OPT_ENUM = "LowCardinality(Nullable(String))"
_TS = "DateTime64(3, 'UTC')"
_WORD = re.compile(r"\w+")
#: Filled by ClickHouse when the row is inserted; never part of a row.
INGESTED_AT = ("ingested_at", f"{_TS} DEFAULT now64(3)")
#: A logged table's version column: the copy read first (lowest offset) is the greatest.
PRECEDENCE = ("precedence", "Int64 MATERIALIZED -source_offset")


@dataclass(frozen=True, slots=True)
class Logged(Generic[M]):
    """A record and its offset in the topic partition it was read from (all copies of one record identity share
    that partition, so offsets order them as the budget read them)."""

    record: M
    offset: int


@dataclass(frozen=True, slots=True)
class TableSpec:
    """A projected table: its columns (in row order), engine, keys and the record -> row mapping.

    ``server_columns`` are ``(name, type and expression)`` pairs ClickHouse fills itself. A ``logged`` table
    takes :class:`Logged` records: its last column is ``source_offset`` and the lowest offset of an identity
    wins. ``expires_by`` names the timestamp column a retention TTL counts from (None: rows never expire by
    age).
    """

    name: str
    model: type[BaseModel]
    columns: tuple[tuple[str, str], ...]
    order_by: tuple[str, ...]
    to_row: Callable[[Any], Row]
    version: str | None = None
    logged: bool = False
    server_columns: tuple[tuple[str, str], ...] = ()
    expires_by: str | None = None
    #: ``ReplacingMergeTree(version, is_deleted)``: the column (UInt8) marking a row whose key must no longer be
    #: read; ``FINAL`` hides a key whose newest row is marked (the row stays until a cleanup merge).
    is_deleted: str | None = None
    #: The table whose records also feed this one (written in the same ``write``): a second projection of one
    #: record type, never the table ``spec_of`` names for it.
    fed_by: str | None = None

    @property
    def engine(self) -> str:
        """The table engine with its parameters."""
        if self.version is None:
            return "ReplacingMergeTree"
        return f"ReplacingMergeTree({self.version}{f', {self.is_deleted}' if self.is_deleted else ''})"

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.columns)

    def row(self, item: BaseModel | Logged[Any]) -> Row:
        """The row of ``item``: a :class:`Logged` record for a logged table, a bare record otherwise."""
        if not self.logged:
            return self.to_row(item)
        if not isinstance(item, Logged):
            raise TypeError(f"{self.name} rows need the record's offset: add Logged(record, offset)")
        return (*self.to_row(item.record), item.offset)

    def add_columns_sql(self, database: str) -> str:
        """Idempotent ``ALTER TABLE ... ADD COLUMN IF NOT EXISTS`` for every column: brings a table created by
        an older ctxflow up to this one's columns (a new schema version's fields), a no-op otherwise."""
        adds = ", ".join(
            f"ADD COLUMN IF NOT EXISTS `{name}` {ch_type}" for name, ch_type in (*self.columns, *self.server_columns)
        )
        return f"ALTER TABLE `{database}`.`{self.name}` {adds}"

    def create_sql(self, database: str) -> str:
        """Idempotent ``CREATE TABLE`` in ``database``; the sorting key starts with tenant_id."""
        cols = ",\n  ".join(f"`{name}` {ch_type}" for name, ch_type in (*self.columns, *self.server_columns))
        return (
            f"CREATE TABLE IF NOT EXISTS `{database}`.`{self.name}` (\n  {cols}\n)\n"
            f"ENGINE = {self.engine}\nORDER BY ({', '.join(self.order_by)})\n"
            "SETTINGS non_replicated_deduplication_window = 1000"
        )


def spec_of(item: BaseModel | Logged[Any]) -> TableSpec:
    """The table projecting ``item``; ``TypeError`` for a type with no table, or a bare record of a logged table
    (its offset is part of its row)."""
    record = item.record if isinstance(item, Logged) else item
    spec = TABLE_BY_MODEL.get(type(record))
    if spec is None:
        raise TypeError(f"no ClickHouse table projects {type(record).__name__}")
    if spec.logged != isinstance(item, Logged):
        raise TypeError(f"{spec.name} takes {'Logged(record, offset)' if spec.logged else 'bare records'}")
    return spec


def _names(columns: tuple[tuple[str, str], ...]) -> tuple[str, ...]:
    return tuple(name for name, _ in columns)


def _fields(model: type[BaseModel], types: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """Columns in the model's field order; a name the model lacks is a typo and fails at import."""
    unknown = set(types) - set(model.model_fields)
    if unknown:
        raise TypeError(f"{model.__name__} has no fields {sorted(unknown)}")
    return tuple((name, types[name]) for name in model.model_fields if name in types)


_TURN_COLUMNS = (
    *_fields(TurnEvent, {
        "event_id": _ID, "tenant_id": _ID, "user_id": _ID, "session_id": _ID, "run_id": _ID,
        "parent_run_id": _OPT, "agent_id": _ID, "seq": "UInt64", "role": _ENUM, "kind": _ENUM, "slot": _ENUM,
        "item_id": _ID, "content": _OPT, "content_digest": "String", "token_count": "Nullable(UInt32)",
        "model": _ENUM, "importance": "Nullable(Float32)", "tier_hint": "Nullable(UInt8)", "privacy": _ENUM,
        "occurred_at": _TS, "tool_call_id": _OPT, "relevance": "Nullable(Float32)", "layer": _OPT_ENUM,
    }),
    ("embedding_dims", "UInt32"),
)
_TURN_FIELDS = _names(_TURN_COLUMNS)[:-1]
_CONTENT, _DIGEST = _TURN_FIELDS.index("content"), _TURN_FIELDS.index("content_digest")


def _turn_row(turn: TurnEvent) -> Row:
    row = [*_values(turn, _TURN_FIELDS), len(turn.embedding or ())]
    if turn.privacy is not PrivacyMode.RETAINED:
        row[_CONTENT] = None
    if turn.content is not None and turn.content_digest is None:
        row[_DIGEST] = content_digest(turn.content)  # the digest outlives no-retention content
    return tuple(row)


def _values(record: BaseModel, names: tuple[str, ...]) -> Row:
    # Enum members go as they are: they are StrEnums, which the driver encodes as their string value.
    return attrgetter(*names)(record)


def _plain_row(names: tuple[str, ...]) -> Callable[[BaseModel], Row]:
    return lambda record: _values(record, names)


def _memory_row(record: MemoryRecord) -> Row:
    row = _values(record, MEMORY_COLUMN_NAMES)
    if record.status is MemoryStatus.REVOKED:
        return tuple(None if col == "content" else v for col, v in zip(MEMORY_COLUMN_NAMES, row, strict=True))
    return row


def _decision_row(decision: Decision) -> Row:
    actions = [(a.item_id, a.action.value, a.tokens) for a in decision.actions]
    summary = decision.summary
    provenance = (summary.summary_id, summary.depth, summary.fidelity) if summary is not None else (None, None, None)
    return (*_values(decision, DECISION_COLUMN_NAMES[:-4]), actions, *provenance)


def _dead_letter_row(letter: DeadLetter) -> Row:
    # tenant_id leads the sorting key, which cannot be Nullable: an unreadable tenant is stored as ''.
    return (letter.tenant_id or "", *_values(letter, DEAD_LETTER_COLUMN_NAMES[1:]))


_USAGE_COLUMNS = _fields(UsageReport, {
    "event_id": _ID, "tenant_id": _ID, "user_id": _ID, "session_id": _ID, "run_id": _ID, "agent_id": _ID,
    "call_id": _ID, "provider": _ENUM, "model": _ENUM, "input_tokens": "UInt64", "output_tokens": "UInt64",
    "cached_read_tokens": "UInt64", "cache_write_tokens": "UInt64", "reasoning_tokens": "UInt64",
    "latency_ms": "UInt32", "streamed": "Bool", "complete": "Bool", "occurred_at": _TS,
})
_RUN_COLUMNS = _fields(RunEvent, {
    "event_id": _ID, "tenant_id": _ID, "user_id": _ID, "session_id": _ID, "run_id": _ID,
    "parent_run_id": _OPT, "workflow_id": _ID, "agent_id": _ID, "phase": _ENUM, "status": _OPT_ENUM,
    "policy_version": _OPT, "prefix_hash": _OPT, "model": _OPT_ENUM, "privacy": _ENUM, "occurred_at": _TS,
})
_DECISION_COLUMNS = (
    *_fields(Decision, {
        "decision_id": _ID, "tenant_id": _ID, "user_id": _OPT, "session_id": _OPT, "run_id": _OPT,
        "kind": _ENUM, "slot": _OPT_ENUM, "state": _OPT_ENUM, "previous_state": _OPT_ENUM,
        "used_tokens": "Nullable(UInt64)", "cap_tokens": "Nullable(UInt64)", "window": _OPT_ENUM,
        "admitted": "Nullable(Bool)", "request_id": _OPT, "reason": "String", "source_event_id": _OPT,
        "manifest_version": "Nullable(UInt64)", "decided_at": _TS, "estimated_tokens": "Nullable(UInt64)",
        "discrepancy_tokens": "Nullable(Int64)", "strategy": _OPT_ENUM, "policy_version": _OPT,
        "tokens_freed": "Nullable(UInt64)", "cost_effect_micros": "Nullable(Int64)", "job_id": _OPT,
    }),
    ("actions", "Array(Tuple(item_id String, action LowCardinality(String), tokens UInt64))"),
    # A summary's provenance, not its text (a payload): which summary, how deep, how faithful.
    ("summary_id", _OPT),
    ("summary_depth", "Nullable(UInt8)"),
    ("summary_fidelity", "Nullable(Float32)"),
)
DECISION_COLUMN_NAMES = _names(_DECISION_COLUMNS)
_DEAD_LETTER_COLUMNS = (("tenant_id", _ID), *_fields(DeadLetter, {
    "dead_letter_id": _ID, "source_topic": _ENUM, "source_partition": "UInt32", "source_offset": "UInt64",
    "reason_code": _ENUM, "reason": "String", "original": _OPT, "failed_at": _TS,
}))
DEAD_LETTER_COLUMN_NAMES = _names(_DEAD_LETTER_COLUMNS)
_MEMORY_COLUMNS = _fields(MemoryRecord, {
    "memory_id": _ID, "tenant_id": _ID, "user_id": _OPT, "session_id": _OPT, "scope": _ENUM, "type": _ENUM,
    "status": _ENUM, "version": "UInt64", "content": _OPT, "content_digest": "String", "source_run_id": _OPT,
    "source_candidate_id": _OPT, "created_at": _TS, "updated_at": _TS, "expires_at": f"Nullable({_TS})",
    "reason": _OPT, "owner_id": _OPT, "subject": _OPT, "attribute": _OPT, "value": _OPT, "verification": _ENUM,
    "sensitivity": _ENUM, "pii_kinds": "Array(LowCardinality(String))", "retention_policy": _OPT,
    "policy_version": _OPT, "parent_run_id": _OPT, "produced_by_agent": _OPT, "payload_ref": _OPT,
    "supersedes": _OPT, "superseded_by": _OPT, "review_state": _ENUM, "merge_count": "UInt64",
    "bootstrap_loosened": "Bool", "pinned": "Bool", "archive_ref": _OPT,
})
MEMORY_COLUMN_NAMES = _names(_MEMORY_COLUMNS)
_INDEX_COLUMNS = (
    ("tenant_id", _ID), ("memory_id", _ID), ("version", "UInt64"), ("is_deleted", "UInt8"), ("scope", _ENUM),
    ("type", _ENUM), ("owner_id", _ID), ("text", _OPT), ("subject", _OPT), ("attribute", _OPT), ("value", _OPT),
    ("payload_ref", _OPT), ("content_digest", "String"), ("terms", "Array(String)"),
    ("embedding", "Array(Float32)"), ("updated_at", _TS), ("expires_at", f"Nullable({_TS})"),
)
INDEX_COLUMN_NAMES = _names(_INDEX_COLUMNS)


def index_terms(*texts: str | None) -> list[str]:
    """The distinct lower-cased word tokens of ``texts``: what a record is indexed under and a query looks for
    (one tokenizer for both, Unicode-aware)."""
    return list(dict.fromkeys(_WORD.findall(" ".join(t for t in texts if t).casefold())))


def _index_row(record: MemoryRecord) -> Row:
    """A record as the retrieval index holds it: an active record's text (inline content; a record whose content
    is in the payload store is indexed by its subject, attribute, value and embedding), terms and embedding; any
    other status a deleted row without them, which hides every earlier version of the key."""
    live = record.status is MemoryStatus.ACTIVE
    text = record.content if live else None
    terms = index_terms(text, record.subject, record.attribute, record.value) if live else []
    return (record.tenant_id, record.memory_id, record.version, 0 if live else 1, record.scope, record.type,
            record.owner_id or "", text, record.subject, record.attribute, record.value, record.payload_ref,
            record.content_digest, terms, (record.embedding or []) if live else [], record.updated_at,
            record.expires_at)
_INVALIDATION_COLUMNS = _fields(Invalidation, {
    "invalidation_id": _ID, "tenant_id": _ID, "kind": _ENUM, "target_type": _ENUM, "target_id": _ID,
    "source_memory_id": _OPT, "user_id": _OPT, "session_id": _OPT, "run_id": _OPT, "reason": "String",
    "occurred_at": _TS,
})
_VERDICT_COLUMNS = _fields(MemoryVerdict, {
    "verdict_id": _ID, "tenant_id": _ID, "user_id": _ID, "session_id": _ID, "run_id": _ID, "candidate_id": _ID,
    "source_event_id": _ID, "outcome": _ENUM, "status": _OPT_ENUM, "rule": _ENUM, "reason": "String",
    "bootstrap_loosened": "Bool", "memory_id": _OPT, "scope": _ENUM, "type": _ENUM,
    "pii_kinds": "Array(LowCardinality(String))", "policy_version": _OPT, "parent_run_id": _OPT,
    "occurred_at": _TS,
})
_U64 = "UInt64"
_ENVELOPE_COLUMNS = _fields(RunEnvelope, {
    "tenant_id": _ID, "user_id": _ID, "session_id": _ID, "run_id": _ID, "parent_run_id": _OPT,
    "root_run_id": _ID, "workflow_id": _ID, "agent_id": _ID, "depth": "UInt32", "policy_version": _OPT,
    "prefix_hash": _OPT, "model": _OPT_ENUM, "privacy": _ENUM, "status": _ENUM, "closed_by": _OPT_ENUM,
    "started_at": f"Nullable({_TS})", "finalized_at": f"Nullable({_TS})", "last_event_at": _TS,
    "duration_ms": "Nullable(UInt64)", "global_tokens": _U64, "tenant_tokens": _U64, "user_tokens": _U64,
    "retrieved_tokens": _U64, "session_tokens": _U64, "static_prefix_tokens": _U64, "dynamic_tokens": _U64,
    "input_tokens": _U64, "output_tokens": _U64, "cached_read_tokens": _U64, "cache_write_tokens": _U64,
    "reasoning_tokens": _U64, "usage_estimated": "Bool", "retrievals": _U64, "memory_ids": "Array(String)",
    "tool_calls": _U64, "tool_results": _U64, "promotions": "Map(String, UInt64)", "evictions": _U64,
    "compressions": _U64, "tokens_freed": _U64, "cost_micros": _U64, "inference_micros": _U64,
    "retrieval_micros": _U64, "tooling_micros": _U64, "persistence_micros": _U64, "cost_estimated": "Bool",
    "price_version": _ENUM, "event_count": _U64, "integrity_hash": "String", "envelope_version": _U64,
    "updated_at": _TS, "estimated_tokens": _U64, "usage_reports": _U64,
})
_COST_COLUMNS = _fields(CostLine, {
    "cost_id": _ID, "tenant_id": _ID, "user_id": _ID, "session_id": _ID, "run_id": _ID, "root_run_id": _ID,
    "parent_run_id": _OPT, "workflow_id": _ID, "agent_id": _ID, "surface": _ENUM, "model": _OPT_ENUM,
    "quantity": _U64, "unit": _ENUM, "micros": _U64, "price_version": _ENUM, "estimated": "Bool",
    "source_event_id": _ID, "occurred_at": _TS,
})
#: A Kafka offset; -1 in rows kept from before offsets were stored (migration 2), which precede every offset.
_SOURCE_OFFSET = ("source_offset", "Int64")


def _logged(name: str, model: type[BaseModel], columns: tuple[tuple[str, str], ...], identity: tuple[str, ...],
            to_row: Callable[[Any], Row]) -> TableSpec:
    """An event table keyed by ``identity`` whose first copy (lowest offset) of an identity is the visible one."""
    return TableSpec(name, model, (*columns, _SOURCE_OFFSET), ("tenant_id", "run_id", *identity), to_row,
                     version="precedence", logged=True, server_columns=(PRECEDENCE, INGESTED_AT),
                     expires_by="occurred_at")


TABLES: tuple[TableSpec, ...] = (
    _logged("turns", TurnEvent, _TURN_COLUMNS, ("seq",), _turn_row),
    _logged("usage", UsageReport, _USAGE_COLUMNS, ("call_id",), _plain_row(_names(_USAGE_COLUMNS))),
    _logged("runs", RunEvent, _RUN_COLUMNS, ("phase",), _plain_row(_names(_RUN_COLUMNS))),
    TableSpec("decisions", Decision, _DECISION_COLUMNS, ("tenant_id", "decision_id"), _decision_row,
              server_columns=(INGESTED_AT,), expires_by="decided_at"),
    TableSpec("dead_letters", DeadLetter, _DEAD_LETTER_COLUMNS, ("tenant_id", "dead_letter_id"),
              _dead_letter_row, expires_by="failed_at"),
    TableSpec("memory_records", MemoryRecord, _MEMORY_COLUMNS, ("tenant_id", "memory_id"), _memory_row,
              version="version"),
    # What agents recall from: active records only (a record that leaves active is a deleted row).
    TableSpec("memory_index", MemoryRecord, _INDEX_COLUMNS, ("tenant_id", "memory_id"), _index_row,
              version="version", is_deleted="is_deleted", fed_by="memory_records"),
    # One row per candidate: the verdict id is the tenant's and candidate's hash, so a redelivery overwrites.
    TableSpec("memory_verdicts", MemoryVerdict, _VERDICT_COLUMNS, ("tenant_id", "verdict_id"),
              _plain_row(_names(_VERDICT_COLUMNS)), server_columns=(INGESTED_AT,), expires_by="occurred_at"),
    # ingested_at: an invalidation carries its record's event time, which a replay of old events puts far in the
    # past; kept from its arrival, it is not dropped by the TTL as it is written (sinks.table_retention).
    TableSpec("invalidations", Invalidation, _INVALIDATION_COLUMNS, ("tenant_id", "invalidation_id"),
              _plain_row(_names(_INVALIDATION_COLUMNS)), server_columns=(INGESTED_AT,), expires_by="occurred_at"),
    # A run's envelope is re-emitted as it closes and as late events update it: the highest version holds.
    TableSpec("envelopes", RunEnvelope, _ENVELOPE_COLUMNS, ("tenant_id", "run_id"),
              _plain_row(_names(_ENVELOPE_COLUMNS)), version="envelope_version", server_columns=(INGESTED_AT,),
              expires_by="last_event_at"),
    # A cost line re-emitted under its id (a run's estimate updated by a late event): the last one holds.
    TableSpec("costs", CostLine, _COST_COLUMNS, ("tenant_id", "run_id", "cost_id"), _plain_row(_names(_COST_COLUMNS)),
              server_columns=(INGESTED_AT,), expires_by="occurred_at"),
)
"""Every projected table (migrations create them; ``ensure_schema`` adds the spec columns a table lacks)."""

TABLE_BY_MODEL: dict[type[BaseModel], TableSpec] = {spec.model: spec for spec in TABLES if spec.fed_by is None}
TABLE_BY_NAME: dict[str, TableSpec] = {spec.name: spec for spec in TABLES}
#: Table -> the tables its records also feed (:attr:`TableSpec.fed_by`).
FEEDS: dict[str, tuple[TableSpec, ...]] = {
    name: tuple(spec for spec in TABLES if spec.fed_by == name) for name in TABLE_BY_NAME
}
