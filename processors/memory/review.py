"""A reviewer's decisions on memory records (``ctxflow memory review``): reinstate, correct, revoke.

Never a silent deletion: a revoked or corrected record stays as a tombstone (digest, subject, attribute,
provenance, reason; no content or value), the memory is blocked (its identity, not the content tenant-wide), and an
:class:`Invalidation` tells every projection to stop serving it. Records are looked up under the reviewer's
tenant only, so a review can never reach another tenant's record.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from ctxflow.processors.memory import cascade, lifecycle
from ctxflow.processors.memory.identity import bucket_key, identity_digest, memory_id
from ctxflow.processors.memory.store import MemoryTables
from ctxflow.processors.types import check_tenant
from ctxflow.schemas.models import ReviewAction, ReviewState, content_digest


def review(
    tables: MemoryTables,
    tenant_id: str,
    memory_id_: str,
    action: ReviewAction,
    reviewer: str,
    now: datetime,
    *,
    corrected_content: str | None = None,
    corrected_value: str | None = None,
) -> list[Any]:
    """Apply a reviewer's decision to one record of ``tenant_id``; returns the records and invalidations.

    ``revoke`` applies to any record not yet revoked (a user's deletion too); ``reinstate`` and ``correct``
    only to a quarantined one. Raises :class:`~processors.memory.lifecycle.IllegalTransition` otherwise,
    ``KeyError`` for a record the tenant does not have, ``ValueError`` for a correction without content.
    """
    tenant = check_tenant(tenant_id)
    record = tables.record(tenant, memory_id_)
    if record is None:
        raise KeyError(f"{tenant} has no memory {memory_id_}")
    if action is ReviewAction.REINSTATE:
        moved = lifecycle.reinstate(record, now, reviewer)
        tables.put_record(moved)
        return [moved]
    if action is ReviewAction.REVOKE:
        state = ReviewState.REVOKED if record.review_state is ReviewState.OPEN else None
        return cascade.tombstone(tables, record, now, f"revoked by {reviewer}", review=state)
    if corrected_content is None:
        raise ValueError("a correction needs the corrected content")
    digest = content_digest(corrected_content)
    new_id = memory_id(tenant, record.scope, record.owner_id, record.type, identity_digest(corrected_content, digest))
    corrected = record.model_copy(
        update={
            "memory_id": new_id,
            "content": corrected_content,
            "content_digest": digest,
            "value": corrected_value if corrected_value is not None else record.value,
            "version": 1,
            "created_at": now,
            "supersedes": None,
            "superseded_by": None,
        }
    )
    old, new = lifecycle.correct(record, corrected, now, reviewer)
    buried = cascade.bury(tables, record, old, now, by=new.memory_id)
    tables.put_record(new)
    tables.add_to_bucket(bucket_key(tenant, new.scope, new.owner_id), new.memory_id)
    return [old, new, *buried]
