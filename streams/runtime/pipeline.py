"""One batch of input records, end to end: decode, decide, project, persist.

This is the imperative shell around :mod:`processors`; it knows nothing of Faust, nor of ClickHouse: the ClickHouse
sink reads the topics this pipeline reads and writes in a consumer group of its own (:mod:`streams.sink`), so an
analytics outage never holds a decision back. The Faust agent in
:mod:`streams.runtime.worker` hands it a batch and acknowledges the batch only after :meth:`BudgetPipeline.handle`
returns, so Faust never commits an offset whose effects are not durable.

Commit order (each step starts after the previous one is durable):

1. decode every record; refusals become dead letters (never a log line);
2. apply the records to the processor chain (:mod:`processors.chain`: budget, eviction planner, envelopes) in
   offset order, collecting what they publish (decisions, compression jobs, run envelopes, cost lines). The
   worker's own invalidations are among its inputs (read back from ``invalidations`` for the eviction planner):
   a batch's invalidations reach the planner in a later batch, once produced;
3. store memory payloads above the inline limit in the payload store (before the records naming them go out);
   produce decisions, compression jobs, envelopes, cost lines, memory records, verdicts and invalidations, and
   dead letters to Kafka and project run headroom
   and decisions into Redis (absolute values: a replay rewrites the same fields; the headroom of every run the
   batch touched, so a replay that finds its records already applied still does) — concurrently; wait for both;
   then apply the memory invalidations the worker's own stores hold: delete payloads no live record names any
   more (checked then, against the state every batch prepared so far left: a later record may name the same
   content-addressed payload again, and its prepare already stored it), withdraw deleted sources' summaries from
   the Redis decisions;
4. persist the aggregate tables' changelogs, await acks;
5. persist the run ledgers' changelogs (tombstones of retired runs among them), await acks. Run ledgers come
   after the aggregates because they are what makes a replay skip a record (the crash argument in
   :mod:`processors.ledger`): everything derived from a record must be durable before its run ledger is;
5a. persist the chain processors' tables, one phase each, later processors first (the envelope states, then the
   planner's working sets), awaiting acks. After the run ledgers, so a working set is never ahead of its run
   ledger: on a replay the planner re-applies what it had not persisted, reaching the same decisions, while the
   budget, already holding those records, ignores the relief it reports
   (:meth:`processors.budget.BudgetProcessor.relieve`). Later processors first, because a later processor reads
   what earlier ones decided for a record, which an earlier one that holds the record does not decide again
   (:mod:`processors.chain`): an envelope state may be ahead of its working set, never behind;
5b. persist the tenants' event-time watermarks, await acks. Last, because a watermark makes a replay skip a
   record outright and decides which records are too late (:mod:`processors.retention`): it must never cover
   a record whose run ledger or tombstone is not durable;
6. return, so the agent acknowledges the batch and Faust may commit its offsets.

A crash anywhere before 6 replays the batch from the last commit. Every effect is idempotent under replay:
decisions and dead letters carry deterministic ids, table values skip records they already hold, Redis values
are absolute.

Overlap: :meth:`BudgetPipeline.prepare` runs steps 1-2, starts the decisions' and dead letters' produce and
the Redis projection (the first two parts of step 3, so an agent waiting on a decision or reading its
headroom gets it at once; projections are written one batch after another, in batch order) and *captures*
the rest of the batch's effects (encoded changelog records): later batches cannot change them.
:meth:`BudgetPipeline.commit` runs the rest of steps 3-5 for one or more prepared batches as a group, in
their order: their decisions and Redis projections acknowledged, then all aggregates,
then all run ledgers (each key once, with its last value). The worker keeps deciding batches while earlier
ones commit, and commits groups strictly one after another, acknowledging a group only after its step 5. So
offsets still commit only over durable effects, and within a group aggregates still precede run ledgers (an
aggregate may be ahead of a run ledger, never behind: the crash argument of :mod:`processors.ledger`).
Effects that may land before an earlier group is done are idempotent and precede their own group's
changelogs: decisions, dead letters and Redis values. A group pays a changelog round trip once, however many
batches it covers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ctxflow.processors.chain import ProcessorChain
from ctxflow.processors.manifest import ManifestError
from ctxflow.processors.memory.cascade import SUMMARY, PayloadDelete, unnamed
from ctxflow.processors.memory.commands import CommandRefused
from ctxflow.processors.memory.dedup import LateRecord
from ctxflow.processors.memory.lifecycle import ReviewItem
from ctxflow.processors.memory.processor import PayloadWrite
from ctxflow.processors.types import InvalidTenantError, Position, run_key
from ctxflow.schemas.codec import Codec
from ctxflow.schemas.contract import ContractViolation, OutsideDedupWindow, ProcessingFailed, RejectedRecord
from ctxflow.schemas.models import (
    CompressionJob,
    CostLine,
    DeadLetter,
    Decision,
    DecisionKind,
    Invalidation,
    MemoryRecord,
    MemoryVerdict,
    RunEnvelope,
    RunEvent,
    Summary,
    TurnEvent,
    UsageReport,
)
from ctxflow.sinks.payloads import PayloadStore
from ctxflow.sinks.redis import RedisProjection
from ctxflow.streams.runtime.budget_projection import BudgetProjection
from ctxflow.streams.runtime.deadletter import dead_letter
from ctxflow.streams.runtime.decode import decode_record
from ctxflow.streams.runtime.inputs import INPUT_MODELS
from ctxflow.streams.runtime.outlet import DecisionOutlet
from ctxflow.streams.runtime.tables import OutRecord, TableBudgetStore
from ctxflow.streams.topics import (
    COMPRESSION_JOBS,
    COSTS,
    DEAD_LETTERS,
    DECISIONS,
    ENVELOPES,
    INVALIDATIONS,
    MEMORY_RECORDS,
    MEMORY_VERDICTS,
    TopicSpec,
)
from pydantic import BaseModel

log = logging.getLogger(__name__)

#: Where each record type the chain publishes goes besides decisions: its topic and its key.
ROUTES: dict[type[BaseModel], tuple[TopicSpec, Callable[[Any], str]]] = {
    CompressionJob: (COMPRESSION_JOBS, lambda job: job.tenant_id),
    RunEnvelope: (ENVELOPES, lambda e: f"{e.tenant_id}:{e.run_id}"),
    CostLine: (COSTS, lambda c: c.tenant_id),
    MemoryRecord: (MEMORY_RECORDS, lambda r: f"{r.tenant_id}:{r.memory_id}"),
    MemoryVerdict: (MEMORY_VERDICTS, lambda v: v.tenant_id),
    Invalidation: (INVALIDATIONS, lambda i: i.tenant_id),
}
#: Records of a run whose headroom the batch projects.
_RUN_RECORDS = (TurnEvent, UsageReport, RunEvent, Summary)  # a summary swapped in changes its run's headroom too


@dataclass(frozen=True, slots=True)
class InputRecord:
    """One consumed record: logical topic, position, key and raw value bytes."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


@dataclass(slots=True)
class PreparedBatch:
    """A decided batch's effects, captured when its processing ended (see the module docstring)."""

    report: BatchReport
    started: float
    outputs: asyncio.Task[int]  # decisions and dead letters, already being produced
    projection: asyncio.Task[None]  # run headroom and decisions, already being written to Redis
    #: Changelog records per phase, in the order they are persisted: aggregates, run ledgers, each chain
    #: processor's table (later processors first), watermarks.
    changelogs: tuple[list[OutRecord], ...]


@dataclass(slots=True)
class BatchReport:
    """What one batch did (for logs, progress and benchmarks)."""

    records: int = 0
    #: Records per logical input topic.
    topics: dict[str, int] = field(default_factory=dict)
    #: Run keys of every record applied or skipped as already applied (their headroom is projected), with the
    #: record's user (whose effective budget the headroom's limits are).
    runs: dict[str, str] = field(default_factory=dict)
    #: Tenants of every record decoded (their limits for new runs are projected when they changed).
    tenants: set[str] = field(default_factory=set)
    decisions: list[Decision] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    #: Everything else the chain published, in order (compression jobs, run envelopes, cost lines, memory
    #: records, verdicts, invalidations): routed by type (:data:`ROUTES`).
    published: list[BaseModel] = field(default_factory=list)
    #: Memory payloads to store before the records naming them are produced.
    payloads: list[PayloadWrite] = field(default_factory=list)
    #: Memory payloads to delete once the tombstones that released them are produced.
    payload_deletes: list[PayloadDelete] = field(default_factory=list)
    #: Summary invalidations for the Redis projection (the decisions carrying those summaries).
    summaries_withdrawn: list[Invalidation] = field(default_factory=list)
    changelog_records: int = 0
    seconds: float = 0.0
    #: Seconds from taking the batch to handing its decisions to the decision outlet (its decision latency).
    decided_s: float = 0.0
    #: Wall seconds per step of the commit order: process, sinks (decisions, Redis), aggregates, runs.
    steps: dict[str, float] = field(default_factory=dict)


class BudgetPipeline:
    """Runs batches through the processor chain, the decision outlet and the Redis projection, in the commit order
    above."""

    def __init__(
        self,
        *,
        codec: Codec,
        chain: ProcessorChain,
        store: TableBudgetStore,
        redis: RedisProjection,
        producer: DecisionOutlet,
        full_topic: Callable[[str], str],
        payloads: PayloadStore,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._codec = codec
        self._payloads = payloads
        self._routes = {model: (full_topic(spec.name), key) for model, (spec, key) in ROUTES.items()}
        self._chain = chain
        self._store = store
        self._producer = producer
        self._full_topic = full_topic
        self._decisions_topic, self._dead_letters_topic = full_topic(DECISIONS.name), full_topic(DEAD_LETTERS.name)
        self._clock = clock
        self._redis = redis
        self._projection = BudgetProjection(redis, chain.budget, store)
        self._recoveries = store.recoveries  # the retirement index is rebuilt after every table recovery

    async def handle(self, records: Sequence[InputRecord]) -> BatchReport:
        """Process ``records`` (in consumption order); returns once every effect is durable."""
        return await self.commit([await self.prepare(records)])

    async def prepare(self, records: Sequence[InputRecord], yield_every: int = 16) -> PreparedBatch:
        """Steps 1-2 for ``records``, then capture their effects; nothing is written yet.

        Yields to the event loop every ``yield_every`` records so that other work makes progress meanwhile: a
        batch committing, the previous batch's decisions going out, and the consumer draining the last fetch
        response (aiokafka sends no next fetch until it is drained). Every 16 rather than 64 records: p50 from
        produce to decision 25-37 vs 31-39 ms in three interleaved pairs at 3,800 events/s, worker CPU alike
        (a yield costs ~5 us, 16 records ~2 ms).
        """
        started = time.perf_counter()
        now = self._clock()
        report = BatchReport(records=len(records), topics=Counter(record.topic for record in records))
        if self._store.recoveries != self._recoveries:
            self._recoveries = self._store.recoveries
            self._chain.forget_retirement_index()
        for index, record in enumerate(records, 1):
            self._apply(record, now, report)
            if index % yield_every == 0:
                await asyncio.sleep(0)
        encode = self._codec.encode
        outputs: list[OutRecord] = [
            (self._decisions_topic, None, f"{d.tenant_id}:{d.run_id or '-'}".encode(), encode(d))
            for d in report.decisions
        ]
        routes = self._routes
        for record in report.published:
            topic, key = routes[type(record)]
            outputs.append((topic, None, key(record).encode(), encode(record)))
        for write in report.payloads:
            # Before any produce: a record naming a payload must never be readable before the payload is.
            # Synchronous and small (the inline limit is kilobytes; large payloads are rare); an idempotent put.
            self._payloads.put(write.ref, write.content.encode("utf-8"))
        outputs += [
            (self._dead_letters_topic, None, dl.source_topic.encode(), encode(dl)) for dl in report.dead_letters
        ]
        # Step 3 begins here for decisions and Redis: an agent waiting on one sees it without waiting for the
        # batch before this one to commit. Harmless before that batch is durable: decision ids are
        # deterministic and a replay projects the same values again.
        # An admission answer is awaited by its agent: it leaves at once, with what the outlet gathered so far.
        urgent = any(d.kind is DecisionKind.ADMISSION for d in report.decisions)
        sending = asyncio.create_task(self._producer.send(outputs, urgent=urgent))
        report.decided_s = time.perf_counter() - started
        # Before the changelog capture, which forgets the runs the batch wrote.
        projection = self._projection.start(report.runs, report.tenants, report.decisions)
        prepared = PreparedBatch(report, started, sending, projection, self._store.capture_changelogs())
        self._step(report, "process_s", started)
        return prepared

    async def commit(self, batches: Sequence[PreparedBatch]) -> BatchReport:
        """Steps 3-5 for prepared batches, in their order, as one group; returns once every effect is durable
        (step 6 is the caller's). A group writes each changelog key and Redis run once, with its last value.
        """
        report = BatchReport(records=sum(b.report.records for b in batches), steps={"process_s": 0.0})
        for batch in batches:
            report.decisions += batch.report.decisions
            report.dead_letters += batch.report.dead_letters
            report.steps["process_s"] += batch.report.steps["process_s"]
        mark = time.perf_counter()
        # Decisions and Redis both precede the run ledgers: once a run ledger is durable, a replay skips its
        # records, so whatever is derived from them must already be written.
        await asyncio.gather(*(batch.outputs for batch in batches), batches[-1].projection)
        for batch in batches:
            await self._apply_invalidations(batch.report)
        mark = self._step(report, "sinks_s", mark)
        written = 0
        for phase, records in enumerate(zip(*(batch.changelogs for batch in batches), strict=True)):
            written += await self._store.write_changelogs(_last_per_key(r for group in records for r in group))
            if phase == 0:
                mark = self._step(report, "aggregates_s", mark)
        report.changelog_records = written
        self._step(report, "runs_s", mark)
        report.seconds = time.perf_counter() - batches[0].started
        if report.dead_letters:
            log.warning(
                "dead-lettered records", extra={"count": len(report.dead_letters), "batch": report.records}
            )
        return report

    async def _apply_invalidations(self, report: BatchReport) -> None:
        """The worker's own projections of deleted memory: payloads no live record names any more, and summaries
        in the Redis decisions (after the tombstones and invalidations are produced and the decisions carrying
        those summaries projected; a replay repeats both, idempotently)."""
        # Read now, not when the batch was decided: a later record of this batch, or of a batch prepared since
        # (whose payloads its prepare stored), may name the same content-addressed payload again.
        for delete in unnamed(report.payload_deletes, self._store):
            self._payloads.delete(delete.ref)
        if report.summaries_withdrawn:
            await self._redis.withdraw_summaries(report.summaries_withdrawn)

    @staticmethod
    def _step(report: BatchReport, name: str, since: float) -> float:
        now = time.perf_counter()
        report.steps[name] = round(now - since, 4)
        return now

    def _apply(self, record: InputRecord, now: datetime, report: BatchReport) -> None:
        try:
            event = self._decode(record)
            self._store.partition = record.partition
            position = Position(record.topic, record.partition, record.offset)
            first_decision = len(report.decisions)
            for output in self._chain.process(event, position, self._store, now):
                if isinstance(output, Decision):
                    report.decisions.append(output)
                elif isinstance(output, PayloadWrite):
                    report.payloads.append(output)
                elif isinstance(output, PayloadDelete):
                    report.payload_deletes.append(output)
                elif isinstance(output, CommandRefused):
                    refusal = ContractViolation(output.reason, tenant_id=output.tenant_id)
                    report.dead_letters.append(self._dead_letter(record, refusal, now))
                elif isinstance(output, LateRecord):
                    late = OutsideDedupWindow(output.reason, tenant_id=output.tenant_id,
                                              no_retention=not output.keep_original)
                    report.dead_letters.append(self._dead_letter(record, late, now))
                elif not isinstance(output, ReviewItem):  # a review item is state (its record says quarantined)
                    report.published.append(output)
                    if isinstance(output, Invalidation) and output.target_type == SUMMARY:
                        report.summaries_withdrawn.append(output)
        except RejectedRecord as error:
            report.dead_letters.append(self._dead_letter(record, error, now))
            return
        except (ManifestError, InvalidTenantError) as error:
            report.dead_letters.append(self._dead_letter(record, ContractViolation(str(error)), now))
            return
        except Exception as error:  # a processor bug must not stop the tenant's stream: dead-letter it
            log.exception("processor failed", extra={"topic": record.topic, "offset": record.offset})
            failure = ProcessingFailed(f"{type(error).__name__}: {error}")
            report.dead_letters.append(self._dead_letter(record, failure, now))
            return
        while self._chain.failures:
            name, position, error = self._chain.failures.pop(0)
            log.error("processor failed; it skipped the record, whose budget effects stand",
                      exc_info=error, extra={"processor": name, "topic": position.topic, "offset": position.offset})
        report.tenants.add(event.tenant_id)  # type: ignore[attr-defined]
        if isinstance(event, _RUN_RECORDS):
            report.runs[run_key(event.tenant_id, event.run_id)] = event.user_id  # type: ignore[union-attr]
        elif isinstance(event, Invalidation):
            # A summary the planner took out of a run changes the run's headroom. Whose limits: the run's user, as
            # the planner's decision names it (the invalidation's user is the deleted memory's).
            for d in report.decisions[first_decision:]:
                if d.run_id is not None and d.user_id is not None:
                    report.runs.setdefault(run_key(d.tenant_id, d.run_id), d.user_id)

    def _decode(self, record: InputRecord) -> BaseModel:
        return decode_record(self._codec, record.value, record.key, INPUT_MODELS[record.topic], keyed=True)

    def _dead_letter(self, record: InputRecord, error: RejectedRecord, now: datetime) -> DeadLetter:
        return dead_letter(
            error,
            topic=self._full_topic(record.topic),
            partition=record.partition,
            offset=record.offset,
            original=record.value or b"",
            failed_at=now,
        )


def _last_per_key(records: Iterable[OutRecord]) -> list[OutRecord]:
    """The last record of each (topic, key): a changelog's reader keeps the latest value of a key anyway."""
    return list({(record[0], record[2]): record for record in records}.values())
