"""The ClickHouse side of the invalidation cascade: a deleted memory's content leaves every table that holds it.

The ClickHouse sink hands this module what each flush wrote: the tombstone invalidations (``memory_record`` and
``turn_content`` targets, :mod:`processors.memory.cascade`) and the ids of the memory records it inserted. After
the flush, :func:`purge` registers mutations that remove (parts are rewritten, so the bytes are gone, not only
hidden; ClickHouse applies them in the background, durably, usually within a second):

- from ``memory_records``, every row of a revoked memory older than its newest tombstone (ReplacingMergeTree
  keeps the older versions, content included, until a merge that may never come). Checked for the ids of every
  inserted record too, so an older version that arrives after its tombstone (a sink replaying its topic) is
  purged by the flush that brings it back;
- from ``memory_index`` (the retrieval index), the rows of a revoked memory older than its tombstone: text,
  terms and embedding (a ``FINAL`` read hides them already; the bytes stay until a cleanup merge otherwise);
- from ``turns``, the content of the turns that retrieved the memory: ``item_id`` is the memory id, or a turn
  of kind ``memory`` whose content has the memory's digest (its text retrieved under another item id). The rows
  stay, with their digests, tokens and ids (analytics keep counting them).

Nothing else of ctxflow's ClickHouse tables holds a memory's content: ``decisions`` keep a summary's id, depth
and fidelity, not its text; verdicts and invalidations carry reasons that never quote content; envelopes list
memory ids. Idempotent: a repeated purge finds nothing left to change.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from clickhouse_connect.driver.client import Client

_ASYNC = {"mutations_sync": 0}
"""Mutations are registered, not awaited: ClickHouse persists a registered mutation in the table's mutation log
and applies it in the background, after a crash or restart too. Awaiting it would hold the sink's flush (and its
offsets) for as long as the table's merges are busy or stopped (``SYSTEM STOP MERGES`` stops mutations too)."""


@dataclass(slots=True)
class PurgeWork:
    """What a flush asks to purge: ``(tenant, memory id)`` pairs."""

    #: Tombstoned memories whose older rows and retrieved turns must lose their content.
    tombstoned: set[tuple[str, str]] = field(default_factory=set)
    #: Memories whose rows were inserted: an older version arriving after its tombstone is purged too.
    inserted: set[tuple[str, str]] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.tombstoned or self.inserted)

    def merge(self, other: PurgeWork) -> None:
        """Add ``other``'s work to this one."""
        self.tombstoned |= other.tombstoned
        self.inserted |= other.inserted


def _lit(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _pairs(pairs: Iterable[tuple[str, ...]]) -> str:
    return ", ".join("(" + ", ".join(_lit(v) for v in pair) + ")" for pair in sorted(pairs))


_CHUNK = 1_000
"""Tuples per statement. A flush may write tens of thousands of records (a sink catching up, a bulk import); their
literal list in one statement exceeded ClickHouse's ``max_query_size`` (256 KiB) and failed the flush. A thousand
ids of up to 128 characters stay well under it."""


def _chunks(pairs: Iterable[tuple[str, ...]]) -> list[list[tuple[str, ...]]]:
    ordered = sorted(pairs)
    return [ordered[i:i + _CHUNK] for i in range(0, len(ordered), _CHUNK)]


def purge(client: Client, database: str, work: PurgeWork, registered: set[tuple[str, ...]] | None = None) -> int:
    """Apply ``work`` (see the module docstring); returns the mutations registered (0 when nothing held content).

    ``registered`` (kept by the caller across flushes) holds the rows whose removal this process asked for while
    their table still has mutations pending: until ClickHouse applied them the rows are still read, and are not
    asked for twice."""
    registered = set() if registered is None else registered
    ids = work.tombstoned | work.inserted
    if not ids:
        return 0
    if registered:
        pending = {t for (t,) in client.query(
            f"SELECT DISTINCT table FROM system.mutations WHERE database = {_lit(database)} AND NOT is_done"
        ).result_rows}
        # Applied mutations removed their rows: a row read again was written again (a replay) and goes again.
        registered.difference_update({r for r in registered if r[0] not in pending})
    rows = [row for chunk in _chunks(ids) for row in client.query(
        f"SELECT tenant_id, memory_id, version, status, content_digest FROM `{database}`.memory_records "
        f"WHERE (tenant_id, memory_id) IN ({_pairs(chunk)})"
    ).result_rows]
    newest_tomb: dict[tuple[str, str], int] = {}
    digests: dict[tuple[str, str], str] = {}
    for tenant, memory, version, status, digest in rows:
        digests[(tenant, memory)] = digest
        if status == "revoked":
            newest_tomb[(tenant, memory)] = max(version, newest_tomb.get((tenant, memory), 0))
    # A tombstone invalidation may be flushed before its record's row: every live row of it goes then (a later
    # life of the same memory, approved again by a human, only comes after its tombstone).
    for pair in work.tombstoned:
        newest_tomb.setdefault(pair, 2**63 - 1)
    stale = [(t, m, str(v)) for t, m, v, status, _ in rows if status != "revoked"
             and v < newest_tomb.get((t, m), 0) and ("memory_records", t, m, str(v)) not in registered]
    registered.update(("memory_records", *row) for row in stale)
    mutations = 0
    for chunk in _chunks(stale):
        client.command(
            f"ALTER TABLE `{database}`.memory_records DELETE WHERE status != 'revoked' AND "
            f"(tenant_id, memory_id, toString(version)) IN ({_pairs(chunk)})", settings=_ASYNC)
        mutations += 1
    tombs = {pair: v for pair, v in newest_tomb.items() if pair in ids}
    indexed = [row for chunk in _chunks(tombs) for row in client.query(
        f"SELECT tenant_id, memory_id, version FROM `{database}`.memory_index "
        f"WHERE (tenant_id, memory_id) IN ({_pairs(chunk)})").result_rows]
    # The index's own tombstone row (is_deleted, no text) stays: it hides the key from a FINAL read.
    older = [(t, m, str(v)) for t, m, v in indexed
             if v < tombs[(t, m)] and ("memory_index", t, m, str(v)) not in registered]
    registered.update(("memory_index", *row) for row in older)
    for chunk in _chunks(older):
        client.command(f"ALTER TABLE `{database}`.memory_index DELETE WHERE "
                       f"(tenant_id, memory_id, toString(version)) IN ({_pairs(chunk)})", settings=_ASYNC)
        mutations += 1
    for chunk in _chunks(work.tombstoned):
        by_digest = [(t, digests[(t, m)]) for t, m in chunk if (t, m) in digests]
        where = f"(tenant_id, item_id) IN ({_pairs(chunk)})"
        if by_digest:
            where = f"({where} OR (kind = 'memory' AND (tenant_id, content_digest) IN ({_pairs(by_digest)})))"
        where += " AND content IS NOT NULL"
        held = client.query(f"SELECT count() FROM `{database}`.turns WHERE {where}").result_rows[0][0]
        if held:
            client.command(f"ALTER TABLE `{database}`.turns UPDATE content = NULL WHERE {where}", settings=_ASYNC)
            mutations += 1
    return mutations
