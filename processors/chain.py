"""The processor chain: every record through the budget, then each later processor, under one commit protocol.

Order: budget -> eviction planner -> delegation rules -> memory gate -> envelopes and costs.
Each processor is pure, ``(event, position, state, now, earlier) -> outputs`` over its own tables, and
unit-tested without Kafka. The chain owns what they share:

- *Admission of a record* is the budget's: a run record the tenant's watermark already covers is skipped by the
  whole chain (every effect of it is durable), one too late for the dedup window is refused by the whole chain
  (:mod:`processors.retention`).
- *Retirement* too: the runs the budget retires after a record are retired by every processor (each forgets
  its state of them, a tombstone on its table's changelog).
- *Failure*: a later processor that raises on a record skips it (listed in ``failures`` for the shell to log);
  the budget's effects of the record stand (a processor bug must not turn counted tokens into a dead letter).
- *Feedback*: a later processor may return a :class:`~processors.budget.Relief` (the planner's tokens freed per
  slot, absolute); the chain hands it to the budget, whose gauges then move back down. Everything else a
  processor returns is a record to publish (decisions, compression jobs, envelopes, cost lines), routed by type
  by the worker.
- *Sight*: each processor receives ``earlier``, what the budget and the processors before it published for the
  same record (the envelope processor counts the planner's eviction decisions of a run from it).

A processor's tables are declared as :class:`TableSpec` values and persisted by the worker after the run ledgers
and before the watermarks (:mod:`streams.runtime.pipeline`), so each processor's own per-run dedup state follows
the crash argument of :mod:`processors.ledger`; a later processor's tables are persisted before an earlier one's.
Why: a processor whose table already holds a record publishes nothing for it again on a replay (the planner's
decisions went out the first time), so a later processor that reads ``earlier`` must never be behind it, or the
replay would apply the record to it without what the earlier one decided. Ahead is harmless: the earlier
processor re-decides the record identically and the later one skips it. Adding a processor is its module and a
line in :func:`default_chain`; no commit, dedup, recovery or projection code changes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from ctxflow.processors.budget import BudgetProcessor, Event, Relief
from ctxflow.processors.types import BudgetStore, Position
from pydantic import BaseModel


@dataclass(frozen=True, slots=True)
class TableSpec:
    """A processor's state table: name, and its value's changelog form (bytes) both ways."""

    name: str
    dump: Callable[[Any], bytes]
    load: Callable[[bytes], Any]


class Processor(Protocol):
    """A pure processor of the chain, after the budget."""

    name: str
    tables: tuple[TableSpec, ...]

    def process(
        self, event: Any, pos: Position, state: BudgetStore, now: datetime, earlier: Sequence[BaseModel]
    ) -> Sequence[Any]:
        """Apply one record to the processor's tables; return records to publish and :class:`Relief`.

        ``earlier`` is what the budget and the processors before this one published for the record."""
        ...

    def retire(self, keys: Iterable[str], state: BudgetStore) -> None:
        """Forget the processor's state of the runs the budget retired."""
        ...

    def forget_index(self) -> None:
        """The store's values were reloaded (restart, rebalance): drop in-memory indexes built from them."""
        ...


class ProcessorChain:
    """Runs each record through the budget and then ``processors``, in order (see the module docstring)."""

    def __init__(self, budget: BudgetProcessor, processors: Sequence[Processor] = ()) -> None:
        self.budget = budget
        self.processors = tuple(processors)
        self.tables: tuple[TableSpec, ...] = tuple(spec for p in self.processors for spec in p.tables)
        #: ``(processor, position, exception)`` of records a later processor failed on since the caller last
        #: emptied the list (the budget applied them).
        self.failures: list[tuple[str, Position, Exception]] = []

    def process(self, event: Event | BaseModel, pos: Position, state: BudgetStore, now: datetime) -> list[BaseModel]:
        """Apply ``event``; returns what to publish (decisions first from the budget, then each processor's).

        Raises what the budget raises for a record it refuses (nothing changed then).
        """
        budget = self.budget
        if not budget.admit(event, pos, state):  # type: ignore[arg-type]
            return []
        out: list[BaseModel] = list(budget.apply(event, pos, state, now))  # type: ignore[arg-type]
        for processor in self.processors:
            try:
                outputs = processor.process(event, pos, state, now, out)
            except Exception as error:
                # The budget's effects of this record stand (its tokens are counted, its decisions go out); a
                # later processor's bug must not turn them into a dead letter. That processor skips the record;
                # the shell logs the failure (this module does no I/O).
                self.failures.append((processor.name, pos, error))
                continue
            for output in outputs:
                if isinstance(output, Relief):
                    out += budget.relieve(output, state, now)
                else:
                    out.append(output)
        retired = budget.close(event, pos, state)  # type: ignore[arg-type]
        if retired:
            for processor in self.processors:
                processor.retire(retired, state)
        return out

    def forget_retirement_index(self) -> None:
        """After the tables were reloaded (restart, rebalance): see :meth:`BudgetProcessor.forget_retirement_index`."""
        self.budget.forget_retirement_index()
        for processor in self.processors:
            processor.forget_index()


def default_chain(
    budget: BudgetProcessor, *, idle_timeout_s: float | None = None, storage_days: float | None = None
) -> ProcessorChain:
    """The worker's chain: budget, then the eviction planner, the delegation rules, the memory gate, and envelopes
    and costs
    (``idle_timeout_s`` and ``storage_days``: :class:`~processors.envelopes.processor.EnvelopeProcessor`'s, its
    defaults when None)."""
    from ctxflow.processors.delegation import DelegationProcessor
    from ctxflow.processors.envelopes.processor import EnvelopeProcessor
    from ctxflow.processors.eviction.planner import EvictionPlanner
    from ctxflow.processors.memory.processor import MemoryGateProcessor

    envelopes = EnvelopeProcessor(budget, idle_timeout_s=idle_timeout_s, storage_days=storage_days)
    return ProcessorChain(
        budget,
        [EvictionPlanner(budget), DelegationProcessor(), MemoryGateProcessor(retention=budget.retention), envelopes],
    )
