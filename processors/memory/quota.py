"""Long-term store eviction per tenant: a quota of live records, evicted to the archive by a composite score.

A tenant's manifest (v5) may give its long-term store a ``record_quota``. When the tenant's live (``active``)
records reach ``evict_at`` x quota (0.85; a count reaches a share when it is at least that share, so 9 of a
quota of 10), the store evicts down to ``evict_to`` x quota (0.70, rounded down: 7 of 10). The check is O(1) per
write: it reads the tenant's live count (:meth:`~processors.memory.store.MemoryTables.live_count`); only an
eviction round reads the tenant's live records (its pages), about once per ``(evict_at - evict_to)`` x quota
writes, and recounts them exactly while it is there.

Which records go: the lowest :func:`score` first, ties broken by memory id, pinned records never. The score
weighs, each in [0, 1]:

* recency (0.35): ``0.5 ** (days since the last update or access / 30)``, in event time (the write that
  triggered the round), so a replay ranks the same way;
* access frequency (0.25): ``n / (n + 3)`` of the record's reads into runs' contexts (``access_of``; by default
  the counts :mod:`processors.memory.holders` keeps from turns of kind ``memory``; none known: 0);
* importance (0.30): its type (fact 1, preference 0.8, episode 0.5, anything else 0.3) x 0.5 + its
  verification's strength (none 0 .. human approved 1) x 0.3 + ``min(merge_count, 10) / 10`` x 0.2;
* token cost (-0.10): ``bytes / (bytes + 4096)`` of its content: of two otherwise equal records the larger goes.

An evicted record is archived before it is removed: the round returns, per record, a
:class:`~processors.memory.processor.PayloadWrite` of the record as it was (JSON, content included even when it
was inline) under its content address, which the shell stores before publishing anything, then the record
``archived`` with ``archive_ref`` and no content, and an :class:`Invalidation` whose reason starts with
``store_quota`` and names the round (how many of how many, quota, thresholds): the ClickHouse ``invalidations``
table is where an analyst counts evictions per tenant. ``ctxflow memory rehydrate`` brings one back
(:mod:`processors.memory.store_commands`). Pure: no clock, no I/O.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ctxflow.processors.memory import cascade, holders, lifecycle
from ctxflow.processors.memory.identity import bucket_key
from ctxflow.processors.memory.store import MemoryTables
from ctxflow.schemas.models import (
    InvalidationKind,
    MemoryRecord,
    MemoryStatus,
    MemoryType,
    TenantManifest,
    Verification,
)

RULE = "store_quota"
"""How an eviction's invalidation reason starts (``reason LIKE 'store_quota%'`` finds every one)."""

RECENCY_HALF_LIFE_DAYS = 30.0
_TYPE_WEIGHT = {MemoryType.FACT: 1.0, MemoryType.PREFERENCE: 0.8, MemoryType.EPISODE: 0.5}
_VERIFICATION_WEIGHT = {
    Verification.NONE: 0.0,
    Verification.CORROBORATED: 1 / 3,
    Verification.SYSTEM_OF_RECORD: 2 / 3,
    Verification.HUMAN_APPROVED: 1.0,
}


@dataclass(frozen=True, slots=True)
class Access:
    """How often a record was retrieved and when last (from the retrieval side; none known: zero, None)."""

    count: int = 0
    last_at: datetime | None = None


AccessOf = Callable[[MemoryTables, MemoryRecord], Access]


def recorded_access(tables: MemoryTables, record: MemoryRecord) -> Access:
    """The default: the reads the processor counted from runs' ``memory`` turns (:mod:`.holders`); none: zero."""
    known = holders.access_of(tables.state, record.tenant_id, record.memory_id)
    return Access(known.count, known.last_access_at) if known is not None else Access()


@dataclass(frozen=True, slots=True)
class StoreQuota:
    """A tenant's long-term store limits: evict at ``threshold`` live records, down to ``target``."""

    quota: int
    evict_at: float = 0.85
    evict_to: float = 0.70

    @property
    def threshold(self) -> int:
        """The live count that starts a round: the first integer at or above ``evict_at`` x quota."""
        return max(1, math.ceil(self.evict_at * self.quota - 1e-9))

    @property
    def target(self) -> int:
        """The live count a round evicts down to: ``evict_to`` x quota, rounded down."""
        return min(self.threshold - 1, math.floor(self.evict_to * self.quota + 1e-9))


def quota_of(manifest: TenantManifest | None) -> StoreQuota | None:
    """The manifest's store quota, or None (no ``memory_store`` or no ``record_quota``: nothing is evicted)."""
    store = manifest.memory_store if manifest is not None else None
    if store is None or store.record_quota is None:
        return None
    return StoreQuota(store.record_quota, store.evict_at, store.evict_to)


def score(record: MemoryRecord, now: datetime, access: Access = Access()) -> float:
    """How much keeping ``record`` is worth (higher stays longer); see the module docstring for the terms."""
    touched = max(record.updated_at, access.last_at) if access.last_at is not None else record.updated_at
    age_days = max((now - touched).total_seconds(), 0.0) / 86_400
    recency = 0.5 ** (age_days / RECENCY_HALF_LIFE_DAYS)
    frequency = access.count / (access.count + 3)
    importance = (
        _TYPE_WEIGHT.get(record.type, 0.3) * 0.5
        + _VERIFICATION_WEIGHT[record.verification] * 0.3
        + min(record.merge_count, 10) / 10 * 0.2
    )
    size = len((record.content or "").encode("utf-8"))
    cost = size / (size + 4096)
    return 0.35 * recency + 0.25 * frequency + 0.30 * importance - 0.10 * cost


def victims(
    records: list[MemoryRecord], count: int, now: datetime, access_of: Callable[[MemoryRecord], Access]
) -> list[MemoryRecord]:
    """The ``count`` records to evict: unpinned active ones, lowest score first, ties by memory id."""
    evictable = [r for r in records if r.status is MemoryStatus.ACTIVE and not r.pinned]
    ranked = sorted(evictable, key=lambda r: (score(r, now, access_of(r)), r.memory_id))
    return ranked[: max(count, 0)]


def archive_ref(record: MemoryRecord) -> tuple[str, str]:
    """The archive's key and body: the record as it is, as JSON, under its content address."""
    from ctxflow.processors.memory.processor import payload_ref  # the processor imports this module

    body = record.model_dump_json()
    return payload_ref(record.tenant_id, hashlib.sha256(body.encode("utf-8")).hexdigest()), body


def enforce(
    tables: MemoryTables,
    tenant_id: str,
    quota: StoreQuota | None,
    now: datetime,
    access_of: AccessOf = recorded_access,
) -> list[Any]:
    """Evict the tenant's store down to its target if its live count reached the threshold; else nothing.

    Returns, per evicted record in eviction order: its archive (a ``PayloadWrite``, to be stored first), the
    archived record, its invalidation."""
    if quota is None or tables.live_count(tenant_id) < quota.threshold:
        return []
    ids = tables.live_ids(tenant_id)
    tables.set_live_count(tenant_id, len(ids))  # the exact count, whatever a crash left
    if len(ids) < quota.threshold:
        return []
    found = (tables.record(tenant_id, mid) for mid in ids)
    records = [r for r in found if r is not None]
    chosen = victims(records, len(ids) - quota.target, now, lambda r: access_of(tables, r))
    if not chosen:
        return []  # everything left is pinned
    from ctxflow.processors.memory.processor import PayloadWrite  # the processor imports this module

    reason = (
        f"{RULE}: evicted {len(chosen)} of {len(ids)} live records (quota {quota.quota}, evict at "
        f"{quota.threshold}, down to {quota.target})"
    )
    out: list[Any] = []
    for record in chosen:
        ref, body = archive_ref(record)
        archived = lifecycle.archive(record, now, reason, ref)
        tables.put_record(archived)
        tables.drop_from_bucket(bucket_key(tenant_id, record.scope, record.owner_id), record.memory_id)
        out += [PayloadWrite(tenant_id, ref, body), archived,
                *cascade.stop_serving(archived, InvalidationKind.INVALIDATION, now, None)]
    return out
