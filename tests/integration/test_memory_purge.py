"""The ClickHouse sink applies memory invalidations on real chDB: a deleted memory's content leaves unmerged rows.

Merges are stopped while the records arrive, so every older version stays where ReplacingMergeTree left it, and
while the tombstone is flushed, so the test sees the purge registered as mutations (a stopped merge pool must not
hold the sink's flush); merges then run, and the content is gone. Each test gets its own database
(``tests/integration/conftest.py``).
"""

from __future__ import annotations

import datetime as dt

from clickhouse_connect.driver.client import Client
from ctxflow.processors.memory.lifecycle import invalidation
from ctxflow.schemas.models import InvalidationKind, MemoryRecord, TurnEvent, content_digest
from ctxflow.sinks.clickhouse import ClickHouseSink
from ctxflow.sinks.clickhouse_ddl import Logged

from tests.support_kafka import wait_until

T0 = dt.datetime(2025, 3, 1, 12, 0, tzinfo=dt.UTC)
SECRET_TEXT = "prefers the heron-7 codename"


def memory(memory_id: str, version: int, status: str, content: str = SECRET_TEXT) -> MemoryRecord:
    return MemoryRecord(
        memory_id=memory_id, tenant_id="acme", user_id="u1", scope="user", type="preference", status=status,
        version=version, content=content if status != "revoked" else None, content_digest=content_digest(content),
        created_at=T0, updated_at=T0 + dt.timedelta(minutes=version),
    )


def retrieval(seq: int, item_id: str, content: str = SECRET_TEXT) -> Logged[TurnEvent]:
    return Logged(TurnEvent(
        event_id=f"t-{seq}", tenant_id="acme", user_id="u1", session_id="s1", run_id="run-1", agent_id="a",
        seq=seq, role="tool", kind="memory", slot="retrieved", item_id=item_id, content=content, token_count=5,
        model="gpt-4o", occurred_at=T0), seq)


def raw(admin: Client, table: str) -> str:
    return str(admin.query(f"SELECT * FROM {table}").result_rows)


def mutations(admin: Client) -> list[tuple[str, str]]:
    """The purges registered: (table, DELETE or UPDATE); the migrations' own mutations (TTLs) left out."""
    rows = admin.query("SELECT table, command FROM system.mutations WHERE database = currentDatabase()").result_rows
    return [(t, kind) for t, c in rows for kind in ("DELETE", "UPDATE") if f"{kind} " in c and "TTL" not in c]


def applied(admin: Client, tables: tuple[str, ...]) -> None:
    """Let merges (and so mutations) run, and wait until every registered mutation is done."""
    for table in tables:
        admin.command(f"SYSTEM START MERGES {table}")
    wait_until(lambda: admin.query("SELECT count() FROM system.mutations WHERE database = currentDatabase() AND "
                                   "NOT is_done").result_rows[0][0], lambda n: n == 0, 60, "mutations applied")


def test_a_tombstone_purges_older_versions_index_rows_and_retrieved_turns(sink: ClickHouseSink, admin: Client) -> None:
    for table in ("memory_records", "memory_index", "turns"):
        admin.command(f"SYSTEM STOP MERGES {table}")
    sink.add(memory("mem-1", 1, "provisional"))
    sink.add(memory("mem-1", 2, "active"))
    sink.add(memory("mem-2", 2, "active", "prefers tea"))  # another memory: untouched
    sink.add(retrieval(0, "mem-1"))
    sink.add(retrieval(1, "other-item"))  # its text retrieved under another id: found by digest
    sink.add(retrieval(2, "mem-2", "prefers tea"))
    sink.flush()
    assert SECRET_TEXT in raw(admin, "memory_records") and SECRET_TEXT in raw(admin, "memory_index")
    tomb = memory("mem-1", 3, "revoked")
    sink.add(tomb)
    for layer in ("memory_record", "retrieval_index", "turn_content"):
        sink.add(invalidation(tomb, InvalidationKind.TOMBSTONE, T0, None, layer))
    sink.flush()
    assert sorted(mutations(admin)) == [("memory_index", "DELETE"), ("memory_records", "DELETE"), ("turns", "UPDATE")]
    applied(admin, ("memory_records", "memory_index", "turns"))
    for table in ("memory_records", "memory_index", "turns"):
        assert SECRET_TEXT not in raw(admin, table), table
    assert admin.query("SELECT memory_id, version, status FROM memory_records ORDER BY memory_id, version"
                       ).result_rows == [("mem-1", 3, "revoked"), ("mem-2", 2, "active")]
    assert admin.query("SELECT item_id, content FROM turns ORDER BY seq").result_rows == [
        ("mem-1", None), ("other-item", None), ("mem-2", "prefers tea")]
    # A sink replaying memory.records brings an older version back: the flush that writes it purges it again.
    sink.add(memory("mem-1", 2, "active"))
    sink.flush()
    applied(admin, ())
    assert SECRET_TEXT not in raw(admin, "memory_records") and SECRET_TEXT not in raw(admin, "memory_index")
    assert sink.query("SELECT status FROM memory_records WHERE memory_id = 'mem-1'").rows == [("revoked",)]


def test_an_invalidation_flushed_before_its_tombstone_still_purges(sink: ClickHouseSink, admin: Client) -> None:
    admin.command("SYSTEM STOP MERGES memory_records")
    sink.add(memory("mem-1", 2, "active"))
    sink.flush()
    tomb = memory("mem-1", 3, "revoked")
    sink.add(invalidation(tomb, InvalidationKind.TOMBSTONE, T0, None, "memory_record"))
    sink.flush()
    applied(admin, ("memory_records",))
    assert SECRET_TEXT not in raw(admin, "memory_records")
    sink.add(tomb)
    sink.flush()
    assert admin.query("SELECT version, status FROM memory_records").result_rows == [(3, "revoked")]


def test_a_flush_of_many_thousand_records_and_tombstones_purges_them_all(sink: ClickHouseSink, admin: Client) -> None:
    # A sink catching up writes a topic's worth in one flush: one statement naming every id was too big to parse.
    many = 5_000
    for i in range(many):
        sink.add(memory(f"mem-bulk-{i:05d}-{'x' * 40}", 1, "active"))
    sink.flush()
    for i in range(many):
        tomb = memory(f"mem-bulk-{i:05d}-{'x' * 40}", 2, "revoked")
        sink.add(tomb)
        sink.add(invalidation(tomb, InvalidationKind.TOMBSTONE, T0, None, "memory_record"))
    sink.flush()
    applied(admin, ())
    assert admin.query("SELECT count() FROM memory_records WHERE status != 'revoked'").result_rows == [(0,)]
    assert SECRET_TEXT not in raw(admin, "memory_records")
