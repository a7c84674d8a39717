"""The invalidation cascade: what a record stopping to be served, or becoming a tombstone, tells each layer.

A record feeds derived layers; each gets its own :class:`Invalidation` (``target_type``), so every sink applies
the ones it holds and ignores the rest:

- ``memory_record``: the record's projections (``memory_records`` rows, older versions included); on a status
  change and a tombstone;
- ``retrieval_index``: the record in a retrieval index (``memory_index``, recall); status change and tombstone;
- ``turn_content``: the content of turns that retrieved it (``item_id`` = the memory id); tombstone;
- ``payload``: its payload or archive in the object store (``target_id`` = the ref), only when no other live
  record of the tenant names the same content-addressed payload (the worker then deletes it:
  :class:`PayloadDelete`), neither at the tombstone nor when the deletion is carried out (:func:`unnamed`: the
  same content learnt again names the same payload); tombstone;
- ``summary``: a summary with the record among its sources (``target_id`` = the summary id, ``run_id`` its run):
  kind ``tombstone`` when the record was its only source (remove it), ``invalidation`` when other sources fed it
  too (withdraw its text: it must be derived again from the others); tombstone.

A status change (superseded, quarantined) stops serving a record that keeps its content; a tombstone (revoked:
a review, a deletion, an expiry) drops the content everywhere. Derived artifacts count their sources, so deleting
one record never removes another record's facts along with a shared summary: the summary is withdrawn, not
deleted.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ctxflow.processors.memory import lifecycle
from ctxflow.processors.memory.identity import bucket_key
from ctxflow.processors.memory.store import MemoryTables
from ctxflow.processors.types import BudgetStore
from ctxflow.schemas.models import Invalidation, InvalidationKind, MemoryRecord, ReviewState

MEMORY_RECORD, RETRIEVAL_INDEX, TURN_CONTENT, PAYLOAD, SUMMARY = (
    "memory_record",
    "retrieval_index",
    "turn_content",
    "payload",
    "summary",
)


@dataclass(frozen=True, slots=True)
class PayloadDelete:
    """A payload the shell must delete from the object store: its last record became a tombstone."""

    tenant_id: str
    ref: str


def stop_serving(record: MemoryRecord, kind: InvalidationKind, now: datetime, by: str | None) -> list[Invalidation]:
    """A record that keeps its content but may no longer be retrieved (superseded, quarantined)."""
    return [lifecycle.invalidation(record, kind, now, by, layer) for layer in (MEMORY_RECORD, RETRIEVAL_INDEX)]


def tombstone(
    tables: MemoryTables,
    record: MemoryRecord,
    now: datetime,
    reason: str,
    *,
    block: bool = True,
    review: ReviewState | None = None,
    by: str | None = None,
) -> list[Any]:
    """``record`` as a tombstone (content and value dropped, digest and provenance kept), stored, followed by
    the cascade of :func:`bury`."""
    tomb = lifecycle.revoke(record, now, reason, review)
    return [tomb, *bury(tables, record, tomb, now, block=block, by=by)]


def bury(
    tables: MemoryTables, before: MemoryRecord, tomb: MemoryRecord, now: datetime, *, block: bool = True,
    by: str | None = None,
) -> list[Any]:
    """Store tombstone ``tomb`` of ``before`` and return the invalidations of every layer ``before`` fed, and the
    payload to delete when no other live record names it.

    ``block`` refuses the same memory (its identity: tenant, scope, owner, type, content) from now on until a
    human approves it again (a deletion, a revocation); an expiry does not block: the same fact learnt again
    later is a new collection with a new lifetime.
    """
    tenant = tomb.tenant_id
    tables.put_record(tomb)
    tables.drop_from_bucket(bucket_key(tenant, tomb.scope, tomb.owner_id), tomb.memory_id)
    if block:
        tables.block(tenant, tomb.memory_id)
    kind = InvalidationKind.TOMBSTONE
    out: list[Any] = [*stop_serving(tomb, kind, now, by), lifecycle.invalidation(tomb, kind, now, by, TURN_CONTENT)]
    named = (before.payload_ref, before.archive_ref, *tables.take_refs(tenant, tomb.memory_id))
    for ref in dict.fromkeys(r for r in named if r is not None):
        if tables.release_payload(tenant, ref, tomb.memory_id):
            out += [lifecycle.invalidation(tomb, kind, now, by, PAYLOAD, ref), PayloadDelete(tenant, ref)]
    for summary_id, run_id, sources in tables.take_derived(tenant, tomb.memory_id):
        tables.note_withdrawn(tenant, summary_id, tomb.memory_id, sources)
        out.append(summary_invalidation(tomb, summary_id, run_id, sources, now))
    return out


def unnamed(deletes: Iterable[PayloadDelete], state: BudgetStore) -> list[PayloadDelete]:
    """The payload deletions to carry out now: those of payloads no live record names in ``state``.

    Payloads are content-addressed, so the same content learnt again after its record expired or was deleted
    (by another user, or the same one after review) names the same payload again: a deletion released before
    that, in the same step, batch or an earlier batch not yet committed, must not remove the file the new record
    names. The links are read when the deletion is due (the shell reads them after every batch prepared so far
    was applied), and a record released later sends a deletion of its own."""
    tables = MemoryTables(state)
    return [d for d in deletes if not tables.names_payload(d.tenant_id, d.ref)]


def keep_named_payloads(outputs: list[Any], state: BudgetStore) -> list[Any]:
    """``outputs`` of one step without the deletions (and their ``payload`` invalidations) of payloads that a live
    record names again by the step's end (an expiry before a candidate learning the same content again)."""
    deletes = [o for o in outputs if isinstance(o, PayloadDelete)]
    named = {(d.tenant_id, d.ref) for d in deletes} - {(d.tenant_id, d.ref) for d in unnamed(deletes, state)}
    if not named:
        return outputs

    def dropped(o: Any) -> bool:
        if isinstance(o, PayloadDelete):
            return (o.tenant_id, o.ref) in named
        return isinstance(o, Invalidation) and o.target_type == PAYLOAD and (o.tenant_id, o.target_id) in named

    return [o for o in outputs if not dropped(o)]


def summary_invalidation(tomb: MemoryRecord, summary_id: str, run_id: str, sources: int, now: datetime
                         ) -> Invalidation:
    """Remove a summary whose only source was ``tomb``; withdraw one that other sources fed too."""
    if sources <= 1:
        kind, reason = InvalidationKind.TOMBSTONE, f"its only source {tomb.memory_id} was deleted: removed"
    else:
        kind = InvalidationKind.INVALIDATION
        reason = (f"one of its {sources} sources ({tomb.memory_id}) was deleted: text withdrawn, the other "
                  "sources stand (summarise them again)")
    return lifecycle.invalidation(tomb, kind, now, None, SUMMARY, summary_id, run_id=run_id, reason=reason)
