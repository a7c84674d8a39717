"""The batching sink contract (buffer per table, flush, keep on backpressure) and the ClickHouse row mapping.

``KeyedStore`` is a real, tiny implementation of the contract: an idempotent in-memory store keyed by record
identity, which fails on request the way a loaded database does.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from dataclasses import dataclass, field
from typing import Any

import pytest
from ctxflow.schemas.models import DeadLetter, MemoryRecord, TurnEvent, content_digest
from ctxflow.sinks.base import Batch, BatchingSink, SinkBackpressure
from ctxflow.sinks.clickhouse_ddl import TABLE_BY_NAME, TABLES, Logged, TableSpec, spec_of
from hypothesis import given
from hypothesis import strategies as st

T0 = dt.datetime(2025, 3, 1, tzinfo=dt.UTC)


@dataclass(frozen=True)
class Rec:
    table: str
    key: int


@dataclass
class KeyedStore(BatchingSink[Rec]):
    failures: list[bool] = field(default_factory=list)  # one entry per write call: True fails it
    rows: dict[str, dict[int, Rec]] = field(default_factory=dict)
    batches: list[Batch[Rec]] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__()

    def table_for(self, record: Rec) -> str:
        return record.table

    def write(self, batch: Batch[Rec]) -> None:
        if self.failures and self.failures.pop(0):
            raise SinkBackpressure(retry_after=0.25, reason="overloaded")
        self.batches.append(batch)
        self.rows.setdefault(batch.table, {}).update((r.key, r) for r in batch.records)


def test_add_buffers_per_table_and_flush_writes_one_batch_per_table() -> None:
    sink = KeyedStore()
    for key in range(5):
        sink.add(Rec("turns" if key % 2 else "usage", key))
    assert sink.batches == [] and sink.buffered == 5
    assert sink.flush() == 5
    written = [(b.table, [r.key for r in b.records]) for b in sink.batches]
    assert written == [("usage", [0, 2, 4]), ("turns", [1, 3])]
    assert sink.buffered == 0 and sink.flush() == 0


def test_backpressure_keeps_unwritten_tables_and_skips_written_ones() -> None:
    sink = KeyedStore(failures=[False, True])
    sink.add(Rec("usage", 1))
    sink.add(Rec("turns", 2))
    with pytest.raises(SinkBackpressure) as raised:
        sink.flush()
    assert raised.value.retry_after == 0.25
    assert sink.buffered == 1
    assert sink.flush() == 1
    assert [b.table for b in sink.batches] == ["usage", "turns"]


def test_records_added_during_a_failed_flush_queue_behind_the_unwritten_ones() -> None:
    class AddsWhileWriting(KeyedStore):
        def write(self, batch: Batch[Rec]) -> None:
            if not self.batches and self.failures:
                self.add(Rec("turns", 2))  # another thread adding while the I/O is in flight
            super().write(batch)

    sink = AddsWhileWriting(failures=[True])
    sink.add(Rec("turns", 1))
    with pytest.raises(SinkBackpressure):
        sink.flush()
    sink.flush()
    assert [r.key for r in sink.batches[-1].records] == [1, 2]
    assert sink.buffered == 0


@given(
    steps=st.lists(
        st.tuples(st.integers(0, 30), st.sampled_from(["turns", "usage"]), st.booleans()),
        max_size=60,
    ),
    failures=st.lists(st.booleans(), max_size=40),
)
def test_every_added_record_is_written_once_whatever_fails(
    steps: list[tuple[int, str, bool]], failures: list[bool]
) -> None:
    sink = KeyedStore(failures=list(failures))
    added: dict[str, set[int]] = {}
    for key, table, flush_now in steps:
        sink.add(Rec(table, key))
        added.setdefault(table, set()).add(key)
        if flush_now:
            with contextlib.suppress(SinkBackpressure):
                sink.flush()
    while sink.buffered:
        try:
            sink.flush()
        except SinkBackpressure:
            continue
    assert {table: set(rows) for table, rows in sink.rows.items()} == added
    assert sum(len(batch) for batch in sink.batches) == len(steps)  # no successful write is repeated


def _turn(privacy: str, content: str | None = "hello", digest: str | None = None) -> TurnEvent:
    return TurnEvent(
        event_id="e1", tenant_id="acme", user_id="u", session_id="s", run_id="r", agent_id="a", seq=0,
        role="user", kind="message", slot="history", item_id="i", content=content, content_digest=digest,
        token_count=2, model="gpt-4o", embedding=[0.5, 0.25, 0.125], privacy=privacy, occurred_at=T0,
    )


def _row(table: str, record: Any) -> dict[str, object]:
    spec = TABLE_BY_NAME[table]
    return dict(zip(spec.column_names, spec.row(Logged(record, 7) if spec.logged else record), strict=True))


def test_no_retention_turn_row_keeps_digest_and_counts_but_no_content() -> None:
    row = _row("turns", _turn("no_retention"))
    assert row["content"] is None
    assert row["content_digest"] == content_digest("hello")  # computed: the producer sent content only
    assert (row["token_count"], row["embedding_dims"], row["event_id"], row["source_offset"]) == (2, 3, "e1", 7)
    assert "embedding" not in row
    assert _row("turns", _turn("retained"))["content"] == "hello"


def test_revoked_memory_row_has_no_content_and_unknown_dead_letter_tenant_is_empty() -> None:
    revoked = MemoryRecord(
        memory_id="m", tenant_id="acme", scope="user", type="fact", status="revoked", version=3, content="x",
        content_digest=content_digest("x"), created_at=T0, updated_at=T0,
    )
    assert _row("memory_records", revoked)["content"] is None
    letter = DeadLetter(
        dead_letter_id="d", source_topic="t", source_partition=0, source_offset=1, reason_code="undecodable",
        reason="bad", failed_at=T0,
    )
    assert _row("dead_letters", letter)["tenant_id"] == ""


#: What the budget dedups each event on (processors.ledger): ClickHouse must collapse exactly the same copies.
BUDGET_IDENTITIES = {
    "turns": ("tenant_id", "run_id", "seq"),
    "usage": ("tenant_id", "run_id", "call_id"),
    "runs": ("tenant_id", "run_id", "phase"),
}


@pytest.mark.parametrize("spec", TABLES, ids=lambda s: s.name)
def test_every_table_sorts_by_tenant_first_then_its_records_identity(spec: TableSpec) -> None:
    assert spec.order_by[0] == "tenant_id"
    assert set(spec.order_by) <= set(spec.column_names)
    if spec.logged:
        assert spec.order_by == BUDGET_IDENTITIES[spec.name]
        assert spec.column_names[-1] == "source_offset" and spec.version == "precedence"
    else:
        assert spec.order_by[-1].endswith("_id") and spec.order_by[-1] != "tenant_id"
    assert set(BUDGET_IDENTITIES) <= {s.name for s in TABLES if s.logged}


def test_a_logged_tables_record_needs_its_offset() -> None:
    turn = _turn("retained")
    with pytest.raises(TypeError, match="Logged"):
        spec_of(turn)
    with pytest.raises(TypeError, match="Logged"):
        TABLE_BY_NAME["turns"].row(turn)
    assert spec_of(Logged(turn, 3)).name == "turns"
    letter = DeadLetter(dead_letter_id="d", source_topic="t", source_partition=0, source_offset=1,
                        reason_code="undecodable", reason="bad", failed_at=T0)
    with pytest.raises(TypeError, match="bare records"):
        spec_of(Logged(letter, 3))
