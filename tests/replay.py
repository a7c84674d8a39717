"""Replay a deployment's input log through ``processors`` only: the crash-free oracle for worker tests.

:func:`read_input_log` reads every input topic of :data:`TOPIC_RANK` (turns, usage, runs, admissions, manifests,
summaries, memory candidates, and the invalidations the worker wrote and read back for its eviction planner) from
the broker, decoding each record as the worker does (a record the worker would dead-letter is kept aside, with
why).
:func:`replay` then feeds the records to the worker's processor chain (budget, eviction planner) over a
``DictBudgetState``, each at its real ``Position``, and collects the decisions, compression jobs, run envelopes and
cost lines: no Kafka,
Redis, ClickHouse or worker in the loop.

Interleaving. Within one topic partition the worker reads records in offset order, and so does the replay.
Across topics and partitions the worker's order depends on fetch timing, so the replay picks one on purpose:
all manifests first (tests publish manifests and wait until the worker consumed them before any traffic, so
that is the live order too), then a merge of the other (topic, partition) queues that always takes the head
with the earliest event time (``occurred_at``/``requested_at``; ties: turns, usage, runs, admissions, summaries,
memory candidates, invalidations, then partition: an invalidation comes after what it invalidates). That is
close to the order producers published in, and it never reorders one queue. Decisions that ``processors.ledger``
calls interleaving-independent must match the live run exactly; the others may differ transiently (see
``tests/support_decisions.py``).
"""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

from ctxflow.processors.admission import BudgetLimits, RunHeadroom, run_headroom
from ctxflow.processors.budget import BudgetProcessor
from ctxflow.processors.chain import default_chain
from ctxflow.processors.retention import DEFAULT_RETENTION, Retention
from ctxflow.processors.tokens import TokenCounter
from ctxflow.processors.types import DictBudgetState, Position, run_key
from ctxflow.schemas.codec import Codec
from ctxflow.schemas.contract import RejectedRecord
from ctxflow.schemas.models import (
    AdmissionRequest,
    CompressionJob,
    CostLine,
    Decision,
    Invalidation,
    MemoryRecord,
    MemoryVerdict,
    RunEnvelope,
    RunEvent,
    Summary,
    TenantManifest,
    TurnEvent,
    UsageReport,
)
from ctxflow.streams.config import Settings
from ctxflow.streams.runtime.inputs import INPUT_MODELS
from pydantic import BaseModel

from tests.support_kafka import read_topics

#: Tie-break rank of the logical input topics when event times are equal.
TOPIC_RANK = {
    "manifests": 0, "turns": 1, "usage": 2, "runs": 3, "admissions": 4, "summaries": 5, "memory.candidates": 6,
    "invalidations": 7,
}


@dataclass(frozen=True, slots=True)
class LoggedRecord:
    """One input record as the worker sees it: position, key, and the decoded event or why it is refused."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    event: BaseModel | None
    refused: str | None = None

    @property
    def tenant_id(self) -> str | None:
        """The decoded record's tenant (None for a refused one)."""
        return None if self.event is None else self.event.tenant_id  # type: ignore[attr-defined]


@dataclass
class InputLog:
    """Every input record per ``(logical topic, partition)``, each list in offset order."""

    queues: dict[tuple[str, int], list[LoggedRecord]] = field(default_factory=dict)

    def records(self) -> Iterator[LoggedRecord]:
        """All records, queue by queue."""
        for queue in self.queues.values():
            yield from queue

    def events(self, tenant_id: str | None = None) -> list[BaseModel]:
        """The accepted events (duplicates included), optionally of one tenant."""
        return [r.event for r in self.records() if r.event is not None and tenant_id in (None, r.tenant_id)]


def _decode(codec: Codec, topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None
            ) -> LoggedRecord:
    """The worker's decode step (``streams.runtime.pipeline``): a null value, a codec refusal or a key that is not the
    record's tenant makes the record a dead letter, never an input of the processor."""
    if value is None:
        return LoggedRecord(topic, partition, offset, key, None, "contract_violation: null value")
    try:
        event = codec.decode(value, INPUT_MODELS[topic])
    except RejectedRecord as error:
        return LoggedRecord(topic, partition, offset, key, None, f"{error.reason_code}: {error.reason}")
    if key is not None and key.decode(errors="replace") != event.tenant_id:  # type: ignore[attr-defined]
        return LoggedRecord(topic, partition, offset, key, None, "contract_violation: key is not the tenant_id")
    return LoggedRecord(topic, partition, offset, key, event)


def read_input_log(settings: Settings) -> InputLog:
    """Read and decode every input topic of ``settings`` up to its current end offsets."""
    codec = Codec(settings.schema_registry_url, settings.max_content_bytes)
    logical = {settings.topic(name): name for name in TOPIC_RANK}
    log = InputLog()
    for r in asyncio.run(read_topics(settings, TOPIC_RANK)):
        topic = logical[r.topic]
        log.queues.setdefault((topic, r.partition), []).append(
            _decode(codec, topic, r.partition, r.offset, r.key, r.value))
    return log


def _event_time(record: LoggedRecord) -> datetime:
    event = record.event
    if isinstance(event, AdmissionRequest):
        return event.requested_at
    if isinstance(event, TenantManifest):
        return event.updated_at
    if isinstance(event, Summary):
        return event.produced_at
    return event.occurred_at  # type: ignore[union-attr]


def interleave(log: InputLog, tenants: Collection[str] | None = None) -> Iterator[LoggedRecord]:
    """The replay order described in the module docstring, keeping only accepted records of ``tenants``."""
    def wanted(record: LoggedRecord) -> bool:
        return record.event is not None and (tenants is None or record.tenant_id in tenants)

    queues = {k: [r for r in q if wanted(r)] for k, q in log.queues.items()}
    for (topic, _), queue in sorted(queues.items()):
        if topic == "manifests":
            yield from queue
    heap = [(_event_time(q[0]), TOPIC_RANK[t], p, 0, (t, p)) for (t, p), q in queues.items() if q and t != "manifests"]
    heapq.heapify(heap)
    while heap:
        _, rank, partition, i, key = heapq.heappop(heap)
        queue = queues[key]
        yield queue[i]
        if i + 1 < len(queue):
            heapq.heappush(heap, (_event_time(queue[i + 1]), rank, partition, i + 1, key))


@dataclass
class Replay:
    """The outcome of a crash-free replay: final token tables, decisions in order, and refused records."""

    processor: BudgetProcessor
    state: DictBudgetState
    decisions: list[Decision]
    refused: list[LoggedRecord]
    workflows: dict[tuple[str, str], str]
    #: (tenant, run) -> the user of the run's last record: whose effective budget its headroom holds.
    users: dict[tuple[str, str], str]
    #: Compression jobs the planner requested, in order.
    jobs: list[CompressionJob] = field(default_factory=list)
    #: Run envelopes and cost lines, in the order they were published.
    envelopes: list[RunEnvelope] = field(default_factory=list)
    costs: list[CostLine] = field(default_factory=list)
    #: Memory records, verdicts and invalidations, in the order they were published.
    memory: list[BaseModel] = field(default_factory=list)

    def final_envelopes(self) -> dict[tuple[str, str], RunEnvelope]:
        """What the ``envelopes`` table keeps: a run's highest version (the last of equals)."""
        kept: dict[tuple[str, str], RunEnvelope] = {}
        for e in self.envelopes:
            held = kept.get((e.tenant_id, e.run_id))
            if held is None or e.envelope_version >= held.envelope_version:
                kept[(e.tenant_id, e.run_id)] = e
        return kept

    def final_costs(self) -> dict[str, CostLine]:
        """What the ``costs`` table keeps: the last line of each id."""
        return {c.cost_id: c for c in self.costs}

    def headroom(self, tenant_id: str, run_id: str) -> RunHeadroom | None:
        """What the worker's Redis projection must hold for the run (``streams.runtime.pipeline`` projects the run
        ledger with the limits of the run's user), or None for a run the replay never saw."""
        ledger = self.state.get_run(run_key(tenant_id, run_id))
        if ledger is None:
            return None
        return run_headroom(ledger, self.processor.budget(self.state, tenant_id, self.users.get((tenant_id, run_id))))

    def limits(self, tenant_id: str) -> BudgetLimits:
        """The limits for new runs the worker's Redis projection must hold for ``tenant_id``."""
        return self.processor.limits(self.state, tenant_id)

    def runs(self, tenant_id: str) -> list[str]:
        """The run ids of ``tenant_id`` that hold a run ledger."""
        prefix = f"{tenant_id}:"
        return [key[len(prefix):] for key in self.state.runs if key.startswith(prefix)]


def replay(log: InputLog, tenants: Collection[str] | None = None,
           now: datetime = datetime(2030, 1, 1, tzinfo=UTC), retention: Retention = DEFAULT_RETENTION,
           idle_timeout_s: float | None = None) -> Replay:
    """Feed ``log`` (only ``tenants`` when given) through a fresh processor in :func:`interleave` order, with
    the worker's ``retention`` (``CTXFLOW_RUN_RETENTION_S``) and idle timeout (``CTXFLOW_RUN_IDLE_TIMEOUT_S``):
    records it refuses as late are in ``refused``."""
    processor, state = BudgetProcessor(TokenCounter(), retention=retention), DictBudgetState()
    chain = default_chain(processor, idle_timeout_s=idle_timeout_s)
    decisions: list[Decision] = []
    jobs: list[CompressionJob] = []
    envelopes: list[RunEnvelope] = []
    costs: list[CostLine] = []
    memory: list[BaseModel] = []
    sorted_out = {Decision: decisions, CompressionJob: jobs, RunEnvelope: envelopes, CostLine: costs,
                  MemoryRecord: memory, MemoryVerdict: memory, Invalidation: memory}
    refused = [r for r in log.records() if r.event is None]
    workflows: dict[tuple[str, str], str] = {}
    users: dict[tuple[str, str], str] = {}
    for record in interleave(log, tenants):
        event = record.event
        if isinstance(event, RunEvent):
            workflows[(event.tenant_id, event.run_id)] = event.workflow_id
        if isinstance(event, TurnEvent | UsageReport | RunEvent):
            users[(event.tenant_id, event.run_id)] = event.user_id
        try:
            for output in chain.process(event, Position(record.topic, record.partition, record.offset), state, now):
                if type(output) in sorted_out:  # payload writes and review items are the worker's, not published
                    sorted_out[type(output)].append(output)  # type: ignore[index]
        except Exception as error:  # the worker dead-letters whatever the processor refuses, and goes on
            refused.append(LoggedRecord(record.topic, record.partition, record.offset, record.key, None,
                                        f"{type(error).__name__}: {error}"))
    return Replay(processor, state, decisions, refused, workflows, users, jobs, envelopes, costs, memory)
