"""No-retention learnt late: revoke what a run's candidates put in memory before its privacy was known.

The processor learns that a run is no-retention from the run's own records (its turns, its run events, a
no-retention candidate, or a delegation that makes it inherit its parent's privacy). Topics are consumed in no set
order, so a candidate of such a run may be judged, and accepted, before the record that reveals it. The processor
keeps per run the memory ids its candidates created (``memory_run_records``, retired with the run); when it
learns the run is no-retention it revokes each of them that is still there: a tombstone (content and value
dropped) with the reason naming the rule, and the invalidation cascade (:mod:`processors.memory.cascade`), so
every projection stops serving it and drops its content.

Only records the run *created* are revoked: a candidate merged into a record another run created added a count
to it, not its content. The content's identity is not blocked (a retained run may state the same thing later).
An archived record is revoked too, and its archive deleted with it (the cascade's ``payload`` layer).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from ctxflow.processors.memory import cascade
from ctxflow.processors.memory.gate import Rule
from ctxflow.processors.memory.store import MemoryTables
from ctxflow.schemas.models import MemoryStatus


def revoke_run_records(tables: MemoryTables, tenant_id: str, run_key: str, run_id: str, now: datetime) -> list[Any]:
    """Tombstones and invalidations for every live record run ``run_key`` created (nothing if none)."""
    out: list[Any] = []
    rule = Rule.NO_RETENTION_RUN.value
    reason = f"{rule}: run {run_id} turned out to be no-retention after its candidates were accepted"
    for memory_id in tables.run_records(run_key):
        record = tables.record(tenant_id, memory_id)
        if record is not None and record.status is MemoryStatus.REVOKED:
            tables.repair(record)  # a replay: the tombstone is durable, its bucket may not be
            continue
        if record is None:
            continue
        out += cascade.tombstone(tables, record, now, reason, block=False)
    return out
