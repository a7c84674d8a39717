"""Retention expiry: records whose lifetime ended become tombstones, driven by event time.

Every record the gate writes carries ``expires_at`` when the tenant's manifest gives its type or its PII
retention rule a lifetime (:meth:`~processors.memory.policy.MemoryPolicy.expires_at`, counted from the
record's last write, in event time). Records are filed by the hour of their ``expires_at`` in the
``memory_expiry`` table (:class:`~processors.memory.store.MemoryTables`), which lives in the state store, so a
restart needs no index rebuilt.

The clock is the tenant's event-time watermark as the budget keeps it (:mod:`processors.retention`): the least
event time over the tenant's run streams (turns, usage, runs) that carried any record, with the record being
applied counted in. Before every record of a tenant, the memory processor hands over each expiry bucket whose
hour ended at or before that watermark: each record in it whose ``expires_at`` still falls in that hour and
that is not a tombstone yet becomes one (reason ``expired``), with its invalidation cascade
(:mod:`processors.memory.cascade`). The worker's wall clock plays no part, so a replay of the same records in
the same order expires the same records at the same records; a record rewritten since it was filed (a merge
moved its ``expires_at``) is skipped here and found again under its new hour.

A tenant that goes quiet stops its own clock, and its records would outlive their retention. So the worker, on
its wall clock, sends an ``expire`` :class:`MemoryCommand` for each tenant whose earliest expiry hour has ended
(:func:`due`): it goes through the log like any command, so its effect is replayed exactly. Applied, it sweeps
the tenant as of the command's ``issued_at``; a second one for the same hour (another worker's, after a
rebalance) finds nothing left to expire.

An expiry does not block the digest (a revocation and a deletion do): the same fact learnt again later is a new
collection, with a new lifetime.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from ctxflow.processors.budget import Event
from ctxflow.processors.ledger import RUNS, TURNS, USAGE
from ctxflow.processors.memory import cascade
from ctxflow.processors.memory.store import EXPIRY_BUCKET_MS, MemoryTables, expiry_bucket
from ctxflow.processors.types import BudgetStore, tenant_key
from ctxflow.processors.windows import to_ms
from ctxflow.schemas.models import MemoryCommand, MemoryCommandKind, MemoryStatus, RunEvent, TurnEvent, UsageReport

EXPIRED = "expired"
"""The reason an expired record's tombstone carries."""

_STREAM_OF = {TurnEvent: TURNS, UsageReport: USAGE, RunEvent: RUNS}


def watermark_ms(event: Event | Any, state: BudgetStore) -> int | None:
    """The tenant's low event-time watermark once ``event`` is applied (epoch ms), or None before any run
    record: the budget advances the stored watermark after the chain, so a run record's own time is added here."""
    tenant = event.tenant_id
    mark = state.get_watermark(tenant_key(tenant))
    times = list(mark.times) if mark is not None else [-1, -1, -1]
    stream = _STREAM_OF.get(type(event))
    if stream is not None:
        times[stream] = max(times[stream], to_ms(event.occurred_at))
    seen = [t for t in times if t >= 0]
    return min(seen) if seen else None


def sweep_before(event: Event | Any, state: BudgetStore) -> list[Any]:
    """:func:`sweep` of ``event``'s tenant at the watermark ``event`` makes; the watermark is only computed when
    the tenant has a record filed for expiry (most records of most tenants cost one lookup)."""
    tables = MemoryTables(state)
    if tables.first_expiry_bucket(event.tenant_id) is None:
        return []
    return sweep(tables, event.tenant_id, watermark_ms(event, state))


def sweep(tables: MemoryTables, tenant_id: str, low_ms: int | None) -> list[Any]:
    """Expire the tenant's records whose expiry hour ended by ``low_ms``: their tombstones and cascades, in
    bucket order and, within a bucket, in the order the records were filed."""
    out: list[Any] = []
    if low_ms is None:
        return out
    while (bucket := tables.first_expiry_bucket(tenant_id)) is not None and (bucket + 1) * EXPIRY_BUCKET_MS <= low_ms:
        for memory_id in tables.take_expiry_bucket(tenant_id, bucket):
            record = tables.record(tenant_id, memory_id)
            if record is not None and record.status is MemoryStatus.REVOKED:
                tables.repair(record)  # a replay: the tombstone is durable, its bucket may not be
                continue
            if record is None or record.expires_at is None:
                continue
            if expiry_bucket(record.expires_at) != bucket:
                continue  # rewritten since with a later lifetime: filed under that hour too
            out += cascade.tombstone(tables, record, record.expires_at, EXPIRED, block=False)
    return out


def due(expiry_entries: Iterable[tuple[str, Any]], now: datetime) -> list[MemoryCommand]:
    """The ``expire`` commands to send at wall-clock ``now``: one per tenant whose earliest expiry hour ended by
    then, given the ``memory_expiry`` table's ``(key, value)`` pairs."""
    now_ms = to_ms(now)
    commands = []
    for key, buckets in expiry_entries:
        tenant, _, rest = key.partition(":")
        if rest != "due" or not buckets or (buckets[0] + 1) * EXPIRY_BUCKET_MS > now_ms:
            continue
        commands.append(MemoryCommand(
            command_id=f"expire-{buckets[0]}-{now_ms}", tenant_id=tenant, kind=MemoryCommandKind.EXPIRE,
            issued_by="ctxflow-worker", reason="retention: the tenant's own records no longer move its clock",
            issued_at=now,
        ))
    return commands
