"""Which live runs hold which memory, how often each memory is read, and the stale-context notices that follow.

A run *holds* a memory once a :class:`TurnEvent` of kind ``memory`` names it (``item_id`` = the memory id: the
SDK's ``recall`` publishes one per hit). The memory processor learns holdings from those turns and, after every
step, looks at its own outputs: a memory that stops being served (an :class:`Invalidation` of a memory, or a
:class:`MemoryRecord` whose status is one a run can no longer be served: revoked, superseded, quarantined,
archived) gets every live run holding it a ``stale_context`` :class:`Decision` naming it, its new status and its
replacement; a summary that quoted a deleted record gets the run it was made for one naming the summary
(``revoked``, or ``withdrawn`` when other sources fed it too), so no live prompt keeps the deleted text. One
post-step over the outputs, so whatever retires a record (supersession, review, deletion, retention expiry,
store eviction) is covered without knowing about notices. The run's holding of it is then
dropped: the run was told, and a later transition of the same record (superseded, then revoked) tells it nothing
new.

Tables (each key starting with the tenant id and ``:``):

* ``memory_holders``: ``tenant:memory_id`` -> the run ids holding it;
* ``memory_held``: ``tenant:run_id`` -> :class:`HeldRun` (the run's user and session, and per memory the highest
  ``seq`` of a turn that named it), forgotten when the run retires;
* ``memory_access``: ``tenant:memory_id`` -> :class:`MemoryAccess` (reads, last read's event time), for the
  long-term store's eviction score. A turn counts once: a redelivered or reordered turn whose ``seq`` is not above
  the run's highest for that memory is not counted again.

Nothing crosses tenants: every lookup is under the tenant of the record or turn at hand (property-tested with
tenant ids differing only in case and shared user, session and run ids).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from hashlib import blake2b
from typing import Any

from ctxflow.processors.chain import TableSpec
from ctxflow.processors.memory.cascade import MEMORY_RECORD, SUMMARY
from ctxflow.processors.memory.store import RECORDS
from ctxflow.processors.types import BudgetStore, check_tenant
from ctxflow.schemas.models import (
    Decision,
    DecisionKind,
    Invalidation,
    InvalidationKind,
    ItemKind,
    MemoryRecord,
    MemoryStatus,
    StaleMemory,
    TurnEvent,
)

HOLDERS, HELD, ACCESS = "memory_holders", "memory_held", "memory_access"

#: Statuses a run can no longer be served (provisional never was: a run cannot hold it).
NOT_SERVED = frozenset({MemoryStatus.REVOKED, MemoryStatus.SUPERSEDED, MemoryStatus.QUARANTINED,
                        MemoryStatus.ARCHIVED})


@dataclass(slots=True)
class HeldRun:
    """What a live run holds: its user and session (for the notice) and, per memory, the highest turn seq."""

    user_id: str
    session_id: str
    seqs: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class MemoryAccess:
    """How often a memory was read into a run's context, and when last (event time)."""

    count: int
    last_access_at: datetime


def _dump_held(run: HeldRun) -> bytes:
    return json.dumps([run.user_id, run.session_id, run.seqs]).encode()


def _load_held(data: bytes) -> HeldRun:
    user, session, seqs = json.loads(data)
    return HeldRun(user, session, seqs)


def _dump_access(access: MemoryAccess) -> bytes:
    return json.dumps([access.count, access.last_access_at.isoformat()]).encode()


def _load_access(data: bytes) -> MemoryAccess:
    count, last = json.loads(data)
    return MemoryAccess(count, datetime.fromisoformat(last))


TABLES: tuple[TableSpec, ...] = (
    TableSpec(HELD, _dump_held, _load_held),
    TableSpec(HOLDERS, lambda v: json.dumps(list(v)).encode(), lambda b: tuple(json.loads(b))),
    TableSpec(ACCESS, _dump_access, _load_access),
)
"""The changelog forms of the holdings tables (:class:`processors.chain.TableSpec`). Persisted last listed first:
``memory_held`` is what makes a redelivered turn change nothing, so it is durable after the holders and reads it
recorded (a crash in between replays the turn, which records them again)."""


def access_of(state: BudgetStore, tenant_id: str, memory_id: str) -> MemoryAccess | None:
    """The tenant's reads of ``memory_id`` (None: never read), for the long-term store's eviction score."""
    return state.get_state(ACCESS, f"{tenant_id}:{memory_id}")


def observe(turn: TurnEvent, state: BudgetStore) -> bool:
    """Learn from a turn of kind ``memory`` that its run holds the memory ``item_id``; count the read. True when
    the turn was a new read (not a redelivery)."""
    if turn.kind is not ItemKind.MEMORY:
        return False
    tenant = check_tenant(turn.tenant_id)
    run_key, memory_id = f"{tenant}:{turn.run_id}", turn.item_id
    held = state.get_state(HELD, run_key) or HeldRun(turn.user_id, turn.session_id)
    seen = held.seqs.get(memory_id)
    if seen is not None and turn.seq <= seen:
        return False  # a redelivered (or reordered) turn: counted already
    held = HeldRun(held.user_id, held.session_id, {**held.seqs, memory_id: turn.seq})
    state.put_state(HELD, run_key, held)
    holder_key = f"{tenant}:{memory_id}"
    holders = tuple(state.get_state(HOLDERS, holder_key) or ())
    if turn.run_id not in holders:
        state.put_state(HOLDERS, holder_key, (*holders, turn.run_id))
    known = access_of(state, tenant, memory_id)
    count = known.count + 1 if known else 1
    last = max(known.last_access_at, turn.occurred_at) if known else turn.occurred_at
    state.put_state(ACCESS, holder_key, MemoryAccess(count, last))
    return True


def forget_runs(keys: Iterable[str], state: BudgetStore) -> None:
    """The runs ``keys`` (``tenant:run_id``) retired: their holdings go (a tombstone on each changelog)."""
    for key in keys:
        held = state.get_state(HELD, key)
        if held is None:
            continue
        tenant, run_id = key.split(":", 1)
        for memory_id in held.seqs:
            _drop_holder(state, f"{tenant}:{memory_id}", run_id)
        state.delete_state(HELD, key)


def _drop_holder(state: BudgetStore, holder_key: str, run_id: str) -> None:
    holders = tuple(state.get_state(HOLDERS, holder_key) or ())
    if run_id not in holders:
        return
    rest = tuple(r for r in holders if r != run_id)
    if rest:
        state.put_state(HOLDERS, holder_key, rest)
    else:
        state.delete_state(HOLDERS, holder_key)


@dataclass(frozen=True, slots=True)
class _Stale:
    tenant_id: str
    memory: StaleMemory
    version: str  # what makes this transition unique (record version or invalidation id)
    at: datetime


def _stale_in(outputs: Sequence[Any], state: BudgetStore) -> list[_Stale]:
    """The memories ``outputs`` stop serving, one entry each (a record's own status wins over an invalidation's
    guess), in output order."""
    found: dict[tuple[str, str], _Stale] = {}
    for output in outputs:
        if isinstance(output, MemoryRecord):
            if output.status in NOT_SERVED:
                stale = StaleMemory(memory_id=output.memory_id, status=output.status.value,
                                    replaced_by=output.superseded_by)
                found[(output.tenant_id, output.memory_id)] = _Stale(
                    output.tenant_id, stale, str(output.version), output.updated_at)
            elif output.status is MemoryStatus.ACTIVE:
                found.pop((output.tenant_id, output.memory_id), None)  # served again in the same step
        elif isinstance(output, Invalidation) and output.target_type == MEMORY_RECORD:
            key = (output.tenant_id, output.target_id)
            if key in found:
                continue
            current = state.get_state(RECORDS, f"{output.tenant_id}:{output.target_id}")
            if current is not None and current.status is MemoryStatus.ACTIVE:
                continue  # nothing stale: the record is served (an invalidation of a derived artifact)
            status = current.status.value if current is not None else MemoryStatus.REVOKED.value
            replaced = output.source_memory_id or (current.superseded_by if current is not None else None)
            found[key] = _Stale(output.tenant_id, StaleMemory(memory_id=output.target_id, status=status,
                                                              replaced_by=replaced),
                                output.invalidation_id, output.occurred_at)
    return list(found.values())


#: The ``status`` a stale-context notice gives a summary whose sources included a deleted record: ``revoked``
#: when that record was its only source, ``withdrawn`` when others fed it too (their facts stand, its text goes).
SUMMARY_STATUS = {InvalidationKind.TOMBSTONE: MemoryStatus.REVOKED.value, InvalidationKind.INVALIDATION: "withdrawn"}


def _stale_summaries(outputs: Sequence[Any]) -> list[tuple[str, _Stale]]:
    """``(run id, stale)`` for each summary ``outputs`` invalidate: its text quoted a deleted record, so the run it
    was made for must stop reading it (the summary's id is the item id its swap put in the run's context)."""
    return [
        # The time is part of what makes the notice unique: a summary withdrawn again when the planner swaps it in
        # later (:meth:`MemoryGateProcessor`'s withdrawn swaps) must not share the first notice's id.
        (o.run_id, _Stale(o.tenant_id, StaleMemory(memory_id=o.target_id, status=SUMMARY_STATUS[o.kind]),
                          f"{o.invalidation_id}@{o.occurred_at.isoformat()}", o.occurred_at))
        for o in outputs
        if isinstance(o, Invalidation) and o.target_type == SUMMARY and o.run_id and o.kind in SUMMARY_STATUS
    ]


def notices(outputs: Sequence[Any], state: BudgetStore, source_event_id: str | None) -> list[Decision]:
    """One ``stale_context`` decision per live run holding a memory ``outputs`` stop serving (see the module
    docstring), or holding a summary that quoted a deleted one, in run order; the holdings it names are dropped.
    An invalidation's status and replacement are read from the memory's current record."""
    per_run: dict[tuple[str, str], list[_Stale]] = {}
    for stale in _stale_in(outputs, state):
        holder_key = f"{stale.tenant_id}:{stale.memory.memory_id}"
        for run_id in state.get_state(HOLDERS, holder_key) or ():
            per_run.setdefault((stale.tenant_id, run_id), []).append(stale)
    for run_id, stale in _stale_summaries(outputs):
        per_run.setdefault((stale.tenant_id, run_id), []).append(stale)
    decisions = []
    for (tenant, run_id), items in sorted(per_run.items()):
        run_key = f"{tenant}:{run_id}"
        held = state.get_state(HELD, run_key)
        for item in items:
            _drop_holder(state, f"{tenant}:{item.memory.memory_id}", run_id)
        if held is not None:
            seqs = {m: s for m, s in held.seqs.items() if m not in {i.memory.memory_id for i in items}}
            if seqs:
                state.put_state(HELD, run_key, HeldRun(held.user_id, held.session_id, seqs))
            else:
                state.delete_state(HELD, run_key)
        decisions.append(_notice(tenant, run_id, held, items, source_event_id))
    return decisions


def _notice(tenant: str, run_id: str, held: HeldRun | None, items: list[_Stale], source: str | None) -> Decision:
    items = sorted(items, key=lambda i: i.memory.memory_id)
    raw = "\x1f".join((tenant, run_id, *(f"{i.memory.memory_id}@{i.version}" for i in items))).encode("utf-8")
    named = "; ".join(
        f"{i.memory.memory_id} {i.memory.status}" + (f", replaced by {i.memory.replaced_by}" if i.memory.replaced_by
                                                    else "")
        for i in items)
    return Decision(
        decision_id="stale-" + blake2b(raw, digest_size=16).hexdigest(),
        tenant_id=tenant,
        user_id=held.user_id if held else None,
        session_id=held.session_id if held else None,
        run_id=run_id,
        kind=DecisionKind.STALE_CONTEXT,
        reason=f"no longer served: {named}",
        source_event_id=source,
        decided_at=max(i.at for i in items),
        stale=[i.memory for i in items],
    )
