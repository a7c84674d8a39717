"""Operators' commands on a tenant's memory (``ctxflow memory review|delete``), applied in log order.

A :class:`MemoryCommand` is applied once: its outcome is stored under ``tenant:command_id``
(``memory_commands``), and a redelivered command changes nothing and publishes nothing (what it published the
first time went out before the outcome was made durable: :mod:`processors.memory.store`). Outcomes retire after
the dedup window, and a command later than it is refused (:mod:`processors.memory.dedup`). Its time is its own
``issued_at``, never the worker's clock, so a replay reproduces every record and invalidation it produced.

- ``review``: a reviewer's decision on one record (:func:`processors.memory.review.review`): reinstate, correct,
  revoke.
- ``delete``: one record (``memory_id``); every record of a user (``user_id``: produced in their runs, or owned by
  them in user scope); or, naming neither, every record of the tenant. Each becomes a tombstone (content and
  value dropped, digest and provenance kept, the memory blocked until a human approves its content again) with
  its invalidation cascade (:mod:`processors.memory.cascade`). Deleting a record that is already a tombstone
  sends its invalidations again: harmless (sinks apply them idempotently), and it purges a projection that
  re-acquired the content since.
- ``rehydrate``, ``pin``, ``unpin``: the long-term store's (:mod:`processors.memory.store_commands`).
- ``expire``: retention applied as of ``issued_at`` (:func:`processors.memory.expiry.sweep`), for a tenant whose
  own records no longer move its event-time clock; the worker sends it (:func:`processors.memory.expiry.due`).

A command that cannot be applied (an unknown record, a transition the lifecycle forbids, a correction without
content, a rehydration whose content does not match the record) is never dropped silently: it yields a
:class:`CommandRefused`, which the worker turns into a dead letter of the command naming the reason. Commands that
do not decode (an unknown kind, a review without an action) are dead-lettered by the codec before they get here.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ctxflow.processors.memory import cascade, expiry, store_commands
from ctxflow.processors.memory.lifecycle import IllegalTransition
from ctxflow.processors.memory.review import review
from ctxflow.processors.memory.store import MemoryTables
from ctxflow.processors.types import check_tenant
from ctxflow.processors.windows import to_ms
from ctxflow.schemas.models import MemoryCommand, MemoryCommandKind, MemoryRecord, MemoryStatus, ReviewAction

APPLIED = "applied"
"""The stored outcome of a command that was applied."""


@dataclass(frozen=True, slots=True)
class CommandRefused:
    """A command the processor could not apply; the shell dead-letters the command with ``reason``."""

    tenant_id: str
    command_id: str
    reason: str


class Refusal(ValueError):
    """Why a command cannot be applied (becomes a :class:`CommandRefused`)."""


def apply(command: MemoryCommand, tables: MemoryTables) -> list[Any]:
    """Apply ``command`` once; returns the records and invalidations to publish, or a :class:`CommandRefused`.

    A command on one record remembers the version it left each record it wrote at (``memory_applied``, durable
    before the records): replayed after a crash that lost its outcome but not its records, it finds them held
    and is not applied again (a review is not refused for the transition it made itself). A refusal is
    remembered there too, so a replay refuses it again whatever later records of the batch made durable."""
    tenant = check_tenant(command.tenant_id)
    if tables.command(tenant, command.command_id) is not None:
        return []
    written = tables.applied(tenant, "command", command.command_id)
    if isinstance(written, str):
        # Refused by the first run, whose outcome a crash lost: refused again, though later records of the batch
        # may be durable by now (a deletion refused for a memory that a candidate after it then wrote).
        tables.put_command(tenant, command.command_id, written)
        return [CommandRefused(tenant, command.command_id, written)]
    if written is not None and tables.holds(tenant, written):
        for memory_id, _version in written:
            record = tables.record(tenant, memory_id)
            assert record is not None
            tables.repair(record)
        tables.put_command(tenant, command.command_id, APPLIED)
        return []
    try:
        out = _dispatch(command, tables)
    except (Refusal, IllegalTransition, KeyError) as error:
        reason = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
        refusal = CommandRefused(tenant, command.command_id, f"{command.kind.value} command refused: {reason}")
        tables.put_applied(tenant, "command", command.command_id, refusal.reason)
        tables.put_command(tenant, command.command_id, refusal.reason)
        return [refusal]
    if command.memory_id is not None:
        versions = {o.memory_id: o.version for o in out if isinstance(o, MemoryRecord)}
        if versions:
            tables.put_applied(tenant, "command", command.command_id, [[m, v] for m, v in versions.items()])
    tables.put_command(tenant, command.command_id, APPLIED)
    return out


def _dispatch(command: MemoryCommand, tables: MemoryTables) -> list[Any]:
    kind = command.kind
    if kind is MemoryCommandKind.REVIEW:
        return _review(command, tables)
    if kind is MemoryCommandKind.DELETE:
        return _delete(command, tables)
    if kind in store_commands.KINDS:
        return store_commands.apply(tables, command)
    if kind is MemoryCommandKind.EXPIRE:
        return expiry.sweep(tables, command.tenant_id, to_ms(command.issued_at))
    raise Refusal(f"{kind.value} is not applied by this worker; nothing changed")


def _review(command: MemoryCommand, tables: MemoryTables) -> list[Any]:
    action = command.action
    assert action is not None and command.memory_id is not None  # the contract: a review carries both
    if action is ReviewAction.CORRECT and not command.corrected_content:
        raise Refusal("a correction needs the corrected content")
    return review(tables, command.tenant_id, command.memory_id, action, command.issued_by, command.issued_at,
                  corrected_content=command.corrected_content, corrected_value=command.corrected_value)


def _delete(command: MemoryCommand, tables: MemoryTables) -> list[Any]:
    tenant, now = command.tenant_id, command.issued_at
    note = f": {command.reason}" if command.reason else ""
    if command.memory_id is not None:
        record = tables.record(tenant, command.memory_id)
        if record is None:
            raise Refusal(f"tenant {tenant} has no memory {command.memory_id}")
        return _tombstone(tables, tenant, command.memory_id, now, f"deleted by {command.issued_by}{note}")
    if command.user_id is not None:
        ids = tables.records_of_user(tenant, command.user_id)
        reason = f"deleted by {command.issued_by} (user {command.user_id}){note}"
    else:
        ids = [m for user in tables.users(tenant) for m in tables.records_of_user(tenant, user)]
        reason = f"deleted by {command.issued_by} (the tenant's memory){note}"
    out: list[Any] = []
    for memory_id in dict.fromkeys(ids):
        record = tables.record(tenant, memory_id)
        if record is not None and record.status is not MemoryStatus.REVOKED:
            out += _tombstone(tables, tenant, memory_id, now, reason)
    return out


def _tombstone(tables: MemoryTables, tenant: str, memory_id: str, now: datetime, reason: str) -> list[Any]:
    record = tables.record(tenant, memory_id)
    assert record is not None
    if record.status is MemoryStatus.REVOKED:
        # Already a tombstone: its cascade again (the same invalidation ids), nothing new on the record; it was
        # blocked when it was buried (if a deletion or revocation buried it).
        return cascade.bury(tables, record, record, now, block=False)
    return cascade.tombstone(tables, record, now, reason)
