"""The memory lifecycle as pure transitions of :class:`MemoryRecord` values.

::

    candidate --gate--> provisional --harden--> active ------------> superseded --> revoked
                                   \\                \\--quarantine-^   (contradicted)   (tombstone)
                                    \\--harden--> quarantined --review: reinstate--> active
                                                              --review: correct----> revoked (+ corrected record)
                                                              --review: revoke-----> revoked (tombstone)

Every transition returns a new record with ``version + 1`` and ``updated_at = now``; an illegal one raises
:class:`IllegalTransition` (a processor bug, never silently ignored). Only ``active`` is retrievable. Nothing
is ever deleted: revocation keeps a tombstone (digest, subject, attribute, provenance, reason) and drops the
content and value, and its identity digest is blocked from coming back without review.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from hashlib import blake2b

from ctxflow.schemas.models import (
    Invalidation,
    InvalidationKind,
    MemoryRecord,
    MemoryStatus,
    ReviewState,
    content_digest,
)

ALLOWED: dict[MemoryStatus, frozenset[MemoryStatus]] = {
    MemoryStatus.PROVISIONAL: frozenset({MemoryStatus.ACTIVE, MemoryStatus.QUARANTINED, MemoryStatus.REVOKED}),
    MemoryStatus.ACTIVE: frozenset(
        {MemoryStatus.SUPERSEDED, MemoryStatus.QUARANTINED, MemoryStatus.REVOKED, MemoryStatus.ARCHIVED}
    ),
    MemoryStatus.QUARANTINED: frozenset({MemoryStatus.ACTIVE, MemoryStatus.REVOKED}),
    MemoryStatus.SUPERSEDED: frozenset({MemoryStatus.REVOKED}),
    MemoryStatus.ARCHIVED: frozenset({MemoryStatus.ACTIVE, MemoryStatus.REVOKED}),
    MemoryStatus.REVOKED: frozenset(),
}
"""Which status may follow which. Revoked is final; superseded can only be revoked; only an active record is
archived (evicted from the long-term store), and an archived one comes back active (rehydrated) or is revoked."""


class IllegalTransition(ValueError):
    """A lifecycle move the state machine does not allow (e.g. reinstating a revoked record)."""


@dataclass(frozen=True, slots=True)
class ReviewItem:
    """An open question about a quarantined record: who must look at what, and why."""

    review_id: str
    tenant_id: str
    memory_id: str
    reason: str
    opened_at: datetime
    conflicting_ids: tuple[str, ...] = ()


def review_id(tenant_id: str, memory_id: str, version: int) -> str:
    """Deterministic id of the review opened on a record's version: a replay reopens the same item."""
    raw = "\x1f".join((tenant_id, memory_id, str(version))).encode("utf-8")
    return "rev-" + blake2b(raw, digest_size=16).hexdigest()


def is_retrievable(record: MemoryRecord) -> bool:
    """Only active records may be served to a run."""
    return record.status is MemoryStatus.ACTIVE


def transition(record: MemoryRecord, to: MemoryStatus, now: datetime, reason: str, **changes: object) -> MemoryRecord:
    """``record`` moved to ``to``; raises :class:`IllegalTransition` when :data:`ALLOWED` forbids it."""
    if to not in ALLOWED[record.status]:
        raise IllegalTransition(f"{record.memory_id}: {record.status.value} -> {to.value} is not allowed")
    fields = {"status": to, "version": record.version + 1, "updated_at": max(now, record.updated_at)}
    return record.model_copy(update={**fields, "reason": reason, **changes})


def activate(record: MemoryRecord, now: datetime, reason: str = "hardened") -> MemoryRecord:
    """provisional -> active."""
    return transition(record, MemoryStatus.ACTIVE, now, reason)


def quarantine(record: MemoryRecord, now: datetime, reason: str, conflicting: tuple[str, ...] = ()) -> tuple[
    MemoryRecord, ReviewItem
]:
    """The record quarantined (not retrievable) and the review item that must resolve it."""
    moved = transition(record, MemoryStatus.QUARANTINED, now, reason, review_state=ReviewState.OPEN)
    item = ReviewItem(
        review_id(record.tenant_id, record.memory_id, moved.version),
        record.tenant_id,
        record.memory_id,
        reason,
        now,
        conflicting,
    )
    return moved, item


def supersede(old: MemoryRecord, by: MemoryRecord, now: datetime) -> MemoryRecord:
    """``old`` retired because ``by`` states a different value for the same subject and attribute."""
    return transition(old, MemoryStatus.SUPERSEDED, now, f"superseded by {by.memory_id}", superseded_by=by.memory_id)


def revoke(record: MemoryRecord, now: datetime, reason: str, review: ReviewState | None = None) -> MemoryRecord:
    """The record as a tombstone: revoked, content and value dropped, digest and provenance kept. A tombstone
    is kept for good: it carries no ``expires_at`` (ClickHouse's TTL on it would drop the row)."""
    state = review if review is not None else record.review_state
    return transition(
        record, MemoryStatus.REVOKED, now, reason, content=None, value=None, review_state=state, expires_at=None
    )


def archive(record: MemoryRecord, now: datetime, reason: str, archive_ref: str) -> MemoryRecord:
    """An active record evicted from the long-term store: ``archived``, its content only in the archive at
    ``archive_ref`` (the record as it was, stored before this one is published)."""
    return transition(record, MemoryStatus.ARCHIVED, now, reason, content=None, archive_ref=archive_ref)


def rehydrate(record: MemoryRecord, now: datetime, by: str, content: str | None) -> MemoryRecord:
    """An archived record back as it was: ``active``, its content restored (``content`` must hash to the
    record's ``content_digest``; None for a record whose content lives at its ``payload_ref``). Anything else is an
    :class:`IllegalTransition`: a wrong or forged archive cannot come back."""
    if record.status is not MemoryStatus.ARCHIVED:
        raise IllegalTransition(f"{record.memory_id}: only an archived record is rehydrated")
    if (content is None) != (record.payload_ref is not None):
        raise IllegalTransition(f"{record.memory_id}: rehydration needs the archived content (and only inline content)")
    if content is not None and content_digest(content) != record.content_digest:
        raise IllegalTransition(f"{record.memory_id}: the content does not hash to the record's content_digest")
    return transition(record, MemoryStatus.ACTIVE, now, f"rehydrated by {by}", content=content, archive_ref=None)


def reinstate(record: MemoryRecord, now: datetime, reviewer: str) -> MemoryRecord:
    """A reviewer's decision that a quarantined record is right: it becomes active."""
    if record.status is not MemoryStatus.QUARANTINED:
        raise IllegalTransition(f"{record.memory_id}: only a quarantined record is reinstated")
    reason = f"reinstated by {reviewer}"
    return transition(record, MemoryStatus.ACTIVE, now, reason, review_state=ReviewState.REINSTATED)


def correct(record: MemoryRecord, corrected: MemoryRecord, now: datetime, reviewer: str) -> tuple[
    MemoryRecord, MemoryRecord
]:
    """A reviewer's correction: the quarantined record becomes a tombstone pointing at the corrected one,
    which is active and names what it replaces."""
    if record.status is not MemoryStatus.QUARANTINED:
        raise IllegalTransition(f"{record.memory_id}: only a quarantined record is corrected")
    if corrected.tenant_id != record.tenant_id:
        raise IllegalTransition("a correction stays in the record's tenant")
    old = revoke(record, now, f"corrected by {reviewer}", ReviewState.CORRECTED)
    old = old.model_copy(update={"superseded_by": corrected.memory_id})
    new = corrected.model_copy(
        update={
            "status": MemoryStatus.ACTIVE,
            "supersedes": record.memory_id,
            "review_state": ReviewState.CORRECTED,
            "reason": f"correction by {reviewer}",
            "updated_at": now,
        }
    )
    return old, new


def invalidation(
    record: MemoryRecord,
    kind: InvalidationKind,
    now: datetime,
    by: str | None,
    target_type: str = "memory_record",
    target_id: str | None = None,
    *,
    run_id: str | None = None,
    reason: str | None = None,
) -> Invalidation:
    """The event telling the projections of one derived layer (``target_type``, see
    :mod:`processors.memory.cascade`) to stop serving ``record`` or what it fed (``target_id``, the record's id
    by default). Its id is derived from the record's version and the target: replays overwrite."""
    target = target_id or record.memory_id
    raw = "\x1f".join((record.tenant_id, record.memory_id, str(record.version), target_type, target)).encode("utf-8")
    return Invalidation(
        invalidation_id="inv-" + blake2b(raw, digest_size=16).hexdigest(),
        tenant_id=record.tenant_id,
        kind=kind,
        target_type=target_type,
        target_id=target,
        source_memory_id=by,
        user_id=record.user_id,
        session_id=record.session_id,
        run_id=run_id,
        reason=reason or record.reason or record.status.value,
        occurred_at=now,
    )
