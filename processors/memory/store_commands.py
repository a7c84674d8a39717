"""Operators' commands on the long-term store: ``rehydrate``, ``pin``, ``unpin`` (:class:`MemoryCommand` kinds).

* ``rehydrate`` brings an archived record back as it was: ``active``, the same id, ``version + 1``, every field
  the archive holds. The processor stays pure and replayable: it never reads the payload store. The shell
  (``ctxflow memory rehydrate``) reads the archive, checks it is this tenant's record, and publishes the command
  with the archived content in ``corrected_content``; the processor checks that content against the digest of
  the record it holds (every other field it already has: archiving only dropped the content), so a wrong or
  forged archive cannot come back, and a replay of the log needs no object store. A record whose content lives
  at its ``payload_ref`` (above the inline limit) comes back without content, as it was.
* ``pin`` / ``unpin`` set ``pinned``: a pinned record is never evicted (:mod:`processors.memory.quota`).

Idempotent: a command whose effect already holds (rehydrating an active record, pinning a pinned one) changes
nothing and returns nothing, so a redelivered command changes nothing. A command on a record the tenant does not
have raises ``KeyError``; on a record in the wrong state, or a rehydration whose content does not match the record,
``IllegalTransition``: the command dispatch (:mod:`processors.memory.commands`, which applies each command once)
refuses it, a dead letter naming the reason.
"""

from __future__ import annotations

from typing import Any

from ctxflow.processors.memory import lifecycle
from ctxflow.processors.memory.identity import bucket_key
from ctxflow.processors.memory.store import MemoryTables
from ctxflow.processors.types import check_tenant
from ctxflow.schemas.models import MemoryCommand, MemoryCommandKind, MemoryStatus

KINDS = frozenset({MemoryCommandKind.REHYDRATE, MemoryCommandKind.PIN, MemoryCommandKind.UNPIN})
"""The command kinds this module applies."""


def apply(tables: MemoryTables, command: MemoryCommand) -> list[Any]:
    """Apply a ``rehydrate``, ``pin`` or ``unpin`` command; returns the changed record, or nothing."""
    tenant = check_tenant(command.tenant_id)
    memory_id = command.memory_id or ""
    record = tables.record(tenant, memory_id)
    if record is None:
        raise KeyError(f"{tenant} has no memory {memory_id}")
    now = command.issued_at
    if command.kind is MemoryCommandKind.REHYDRATE:
        if record.status is MemoryStatus.ACTIVE:
            return []  # already back
        restored = lifecycle.rehydrate(record, now, command.issued_by, command.corrected_content)
        tables.put_record(restored)
        tables.add_to_bucket(bucket_key(tenant, restored.scope, restored.owner_id), memory_id)
        return [restored]
    pinned = command.kind is MemoryCommandKind.PIN
    if record.pinned is pinned or record.status is MemoryStatus.REVOKED:
        return []  # nothing to change (a tombstone stays as it is)
    verb = "pinned" if pinned else "unpinned"
    changed = record.model_copy(update={
        "pinned": pinned, "version": record.version + 1, "updated_at": max(now, record.updated_at),
        "reason": f"{verb} by {command.issued_by}",
    })
    tables.put_record(changed)
    return [changed]
