"""The summarizer worker: compression jobs in, summaries (or dead letters) out, off the deciding hot path.

An asyncio service over aiokafka (no Faust: it keeps no tables). Its consumer is in the group
``<app_id>-summarizer`` (:func:`summarizer_group`) on ``compression.jobs``, so summarizers scale apart from the
deciding workers, up to one per partition. For each batch of jobs, in this order:

1. decode the jobs; a job that does not decode, or whose key is not its tenant, becomes a dead letter;
2. read every source of every job by position in one bulk read (:class:`~.sources.SourceReader`);
3. resolve each job's sources (decode, tenant, item, depth, sha256 against the job's digest); a job with a
   source it cannot use becomes a dead letter naming the source and why (:class:`~.sources.JobRefused`);
4. summarize the rest, in a worker thread so the consumer's heartbeats go on; a summarizer refusal or failure
   dead-letters that job only;
5. produce the summaries (key ``tenant_id``) and dead letters (key: the jobs' topic) and wait for the broker's
   acknowledgements;
6. commit the batch's offsets.

So an offset is committed only once what its job produced is durable: at-least-once. A crash or rebalance
before 6 hands the batch to the next summarizer, which produces the same summary ids (:func:`~.jobs.summary_id_of`)
and the same dead-letter ids (the job's position), so the planner and every projection keep one copy. A job
is never retried for ever: what cannot be summarized goes to the dead letters and the worker goes on. A broker
that fails to serve the sources or to acknowledge (transient) makes the worker seek back and try the batch
again after a pause that doubles up to ``MAX_BACKOFF_S``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from ctxflow.processors.eviction.summarizer import ExtractiveSummarizer, SourceItem
from ctxflow.processors.tokens import TokenCounter
from ctxflow.schemas.codec import Codec
from ctxflow.schemas.contract import ContractViolation, ProcessingFailed, RejectedRecord
from ctxflow.schemas.models import CompressionJob, DeadLetter, Summary
from ctxflow.streams.config import Settings
from ctxflow.streams.runtime.deadletter import dead_letter
from ctxflow.streams.summarizer.jobs import Summarizer, summarize_job, token_count_for
from ctxflow.streams.summarizer.sources import (
    JobRefused,
    SourceReader,
    SourcesUnavailable,
    SourceTopics,
    resolve_sources,
)
from ctxflow.streams.topics import COMPRESSION_JOBS, DEAD_LETTERS, SUMMARIES

log = logging.getLogger(__name__)

#: Longest pause before a batch that failed for a transient reason is tried again.
MAX_BACKOFF_S = 5.0
#: Longest time between two progress lines.
PROGRESS_EVERY_S = 30.0


def summarizer_group(settings: Settings) -> str:
    """The summarizers' consumer group: beside the deciding workers' ``app_id``, never in it."""
    return f"{settings.app_id}-summarizer"


@dataclass(slots=True)
class Progress:
    """Counts since the worker started (``jobs`` = summaries + dead letters)."""

    jobs: int = 0
    summaries: int = 0
    dead_letters: int = 0
    items: int = 0
    batches: int = 0
    retries: int = 0
    #: CPU seconds spent inside ``summarize`` (the summarizer thread's own clock).
    summarize_cpu_s: float = 0.0


class _Assignment(ConsumerRebalanceListener):
    def __init__(self) -> None:
        self.partitions: set[TopicPartition] = set()
        self.assigned = asyncio.Event()

    async def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        self.partitions -= set(revoked)

    async def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        self.partitions |= set(assigned)
        self.assigned.set()
        log.info("partitions assigned",
                 extra={"partitions": " ".join(sorted(f"{tp.topic}[{tp.partition}]" for tp in self.partitions))})


class SummarizerWorker:
    """Consumes ``compression.jobs`` and publishes ``summaries`` (see the module docstring for the order).

    Use :meth:`run` (until :meth:`stop`); ``progress`` counts what it did. ``clock`` stamps summaries and dead
    letters. Not thread-safe: one worker per event loop.
    """

    def __init__(self, settings: Settings, summarizer: Summarizer | None = None, *, batch_max: int = 64,
                 progress_every_s: float = PROGRESS_EVERY_S, clock: Callable[[], datetime] = lambda: datetime.now(UTC)
                 ) -> None:
        self.settings = settings
        self.summarizer: Summarizer = summarizer or ExtractiveSummarizer()
        self.group = summarizer_group(settings)
        self.progress = Progress()
        self._batch_max = batch_max
        self._progress_every_s = progress_every_s
        self._clock = clock
        self._codec = Codec(settings.schema_registry_url, settings.max_content_bytes)
        self._counter = TokenCounter()
        self._topics = SourceTopics(settings)
        self._jobs_topic = COMPRESSION_JOBS.full_name(settings)
        self._summaries_topic = SUMMARIES.full_name(settings)
        self._dead_letters_topic = DEAD_LETTERS.full_name(settings)
        self._assignment = _Assignment()
        self._stopping = asyncio.Event()
        self._started_cpu = time.process_time()
        # Clients are made in run(), on the loop that uses them.
        self._consumer: AIOKafkaConsumer
        self._producer: AIOKafkaProducer
        self._reader: SourceReader
        self._thread: ThreadPoolExecutor

    def _connect(self) -> None:
        settings = self.settings
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.bootstrap, group_id=self.group, client_id=self.group,
            enable_auto_commit=False, auto_offset_reset="earliest", fetch_max_wait_ms=settings.fetch_max_wait_ms,
            # As the deciding worker: a crashed member's partitions move on after a short session.
            session_timeout_ms=6_000, heartbeat_interval_ms=500,
        )
        self._reader = SourceReader(settings, client_id=f"{self.group}-reader")
        self._producer = AIOKafkaProducer(
            bootstrap_servers=settings.bootstrap, client_id=self.group, acks="all", linger_ms=5,
            max_request_size=8 << 20,
        )
        # One thread: summaries are CPU work (or a blocking HTTP call) and must not hold the consumer's loop.
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="summarize")

    @property
    def assigned(self) -> asyncio.Event:
        """Set once the group gave this worker partitions."""
        return self._assignment.assigned

    def stop(self) -> None:
        """Ask :meth:`run` to return; a batch not committed yet is left for the next summarizer."""
        self._stopping.set()

    async def run(self) -> None:
        """Summarize jobs until :meth:`stop`; connects first and closes every client on the way out."""
        self._started_cpu = time.process_time()
        self._connect()
        consuming: asyncio.Task[None] | None = None
        try:
            await self._reader.start()
            await self._producer.start()
            self._consumer.subscribe([self._jobs_topic], listener=self._assignment)
            await self._consumer.start()
            log.info("summarizer started", extra={"group": self.group, "summarizer": self.summarizer.name,
                                                  "topic": self._jobs_topic})
            consuming = asyncio.create_task(self._consume())
            stopping = asyncio.create_task(self._stopping.wait())
            try:
                await asyncio.wait({consuming, stopping}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (consuming, stopping):
                    task.cancel()
                await asyncio.gather(consuming, stopping, return_exceptions=True)
        finally:
            self._thread.shutdown(wait=False, cancel_futures=True)
            for close in (self._consumer.stop, self._producer.stop, self._reader.stop):
                with contextlib.suppress(Exception):
                    await close()
            self._log_progress("summarizer stopped", self._started_cpu, Progress(), None)
        if not consuming.cancelled() and (error := consuming.exception()) is not None:
            raise error  # a bug, not a bad job (those are dead letters): the process exits with it

    async def _consume(self) -> None:
        backoff, since = 0.0, (time.monotonic(), time.process_time())
        last = Progress()
        while True:
            fetched = await self._consumer.getmany(timeout_ms=1_000, max_records=self._batch_max)
            records = sorted((r for batch in fetched.values() for r in batch), key=lambda r: (r.partition, r.offset))
            if records:
                try:
                    await self.handle(records)
                    backoff = 0.0
                except (SourcesUnavailable, KafkaError) as error:
                    backoff = min(MAX_BACKOFF_S, max(0.25, 2 * backoff))
                    self.progress.retries += 1
                    log.error("batch failed; trying it again", exc_info=error,
                              extra={"jobs": len(records), "retry_in_s": backoff})
                    self._rewind(records)
                    await asyncio.sleep(backoff)
            now = time.monotonic()
            if now - since[0] >= self._progress_every_s:
                self._log_progress("summarizer progress", since[1], last, now - since[0])
                since, last = (now, time.process_time()), dataclasses.replace(self.progress)

    async def handle(self, records: Sequence[ConsumerRecord]) -> None:
        """Steps 1-6 of the module docstring for one batch of job records (offset order per partition)."""
        now = self._clock()
        jobs: list[tuple[ConsumerRecord, CompressionJob]] = []
        dead: list[DeadLetter] = []
        for record in records:
            try:
                jobs.append((record, self._decode(record)))
            except RejectedRecord as error:
                dead.append(self._dead_letter(record, error, now))
        positions = {p for _, job in jobs for s in job.sources if (p := self._topics.position(s)) is not None}
        values = await self._reader.read(positions)
        ready: list[tuple[ConsumerRecord, CompressionJob, list[SourceItem]]] = []
        for record, job in jobs:
            try:
                ready.append((record, job, resolve_sources(job, values, self._codec, self._topics)))
            except JobRefused as error:
                dead.append(self._dead_letter(record, error, now))
        outcomes = await asyncio.get_running_loop().run_in_executor(
            self._thread, self._summarize_all, [(job, items) for _, job, items in ready], now
        )
        summaries: list[Summary] = []
        for (record, _, _), outcome in zip(ready, outcomes, strict=True):
            if isinstance(outcome, Summary):
                summaries.append(outcome)
            else:
                dead.append(self._dead_letter(record, outcome, now))
        sends = [await self._producer.send(self._summaries_topic, self._codec.encode(s), key=s.tenant_id.encode())
                 for s in summaries]
        sends += [await self._producer.send(self._dead_letters_topic, self._codec.encode(d),
                                            key=d.source_topic.encode()) for d in dead]
        await asyncio.gather(*sends)  # acknowledged by the broker (acks=all) before anything is committed
        await self._commit(records)
        self.progress.batches += 1
        self.progress.jobs += len(records)
        self.progress.summaries += len(summaries)
        self.progress.dead_letters += len(dead)
        self.progress.items += sum(len(items) for _, _, items in ready)
        if dead:
            log.warning("dead-lettered jobs", extra={
                "count": len(dead), "batch": len(records),
                "reasons": "; ".join(f"{d.dead_letter_id}: {d.reason}" for d in dead[:3])})

    def _decode(self, record: ConsumerRecord) -> CompressionJob:
        if record.value is None:
            raise ContractViolation("record has no value (a null value is not a ctxflow record)")
        job = self._codec.decode(record.value, CompressionJob)
        if record.key is not None and record.key.decode(errors="replace") != job.tenant_id:
            raise ContractViolation(f"record key {record.key!r} is not its tenant_id {job.tenant_id!r}: key jobs by "
                                    "tenant_id", tenant_id=job.tenant_id)
        return job

    def _summarize_all(self, work: list[tuple[CompressionJob, list[SourceItem]]], now: datetime
                       ) -> list[Summary | RejectedRecord]:
        outcomes: list[Summary | RejectedRecord] = []
        began = time.thread_time()
        for job, items in work:
            try:
                count = token_count_for(self._counter, job.model)
                summary = summarize_job(job, items, self.summarizer, count, now)
                if len(summary.text.encode()) > self.settings.max_content_bytes:
                    # Like an oversized turn: refused, never retried (a produce the broker refuses would be).
                    raise ValueError(f"the summary has {len(summary.text.encode())} bytes, over the "
                                     f"{self.settings.max_content_bytes} that CTXFLOW_MAX_CONTENT_BYTES allows")
                outcomes.append(summary)
            except ValueError as error:  # SummaryRefused, or a summary the contract refuses
                outcomes.append(JobRefused(f"the summarizer refused the job: {error}", tenant_id=job.tenant_id))
            except Exception as error:  # a summarizer bug must not stop the other jobs: dead-letter this one
                log.exception("summarizer failed", extra={"job_id": job.job_id})
                outcomes.append(ProcessingFailed(f"{type(error).__name__}: {error}", tenant_id=job.tenant_id))
        self.progress.summarize_cpu_s += time.thread_time() - began
        return outcomes

    def _dead_letter(self, record: ConsumerRecord, error: RejectedRecord, now: datetime) -> DeadLetter:
        return dead_letter(error, topic=self._jobs_topic, partition=record.partition, offset=record.offset,
                           original=record.value or b"", failed_at=now)

    async def _commit(self, records: Sequence[ConsumerRecord]) -> None:
        offsets: dict[TopicPartition, int] = {}
        for record in records:
            tp = TopicPartition(record.topic, record.partition)
            offsets[tp] = max(offsets.get(tp, 0), record.offset + 1)
        try:
            await self._consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError) as error:
            # The group moved the partitions while the batch ran: their new owner summarizes the jobs again,
            # producing the same ids.
            log.warning("partitions moved before the commit; their new owner repeats the batch",
                        extra={"error": repr(error), "jobs": len(records)})

    def _rewind(self, records: Sequence[ConsumerRecord]) -> None:
        firsts: dict[TopicPartition, int] = {}
        for record in records:
            tp = TopicPartition(record.topic, record.partition)
            firsts[tp] = min(firsts.get(tp, record.offset), record.offset)
        for tp, offset in firsts.items():
            if tp in self._consumer.assignment():
                self._consumer.seek(tp, offset)

    def _log_progress(self, message: str, cpu_since: float, last: Progress, seconds: float | None) -> None:
        cpu = time.process_time() - cpu_since
        items = self.progress.items - last.items
        log.info(message, extra={
            "jobs": self.progress.jobs, "summaries": self.progress.summaries,
            "dead_letters": self.progress.dead_letters, "items": self.progress.items,
            "retries": self.progress.retries,
            **({} if seconds is None else {"interval_s": round(seconds, 1),
                                           "interval_jobs": self.progress.jobs - last.jobs, "interval_items": items}),
            "cpu_s": round(cpu, 3), "items_per_cpu_s": round(items / cpu, 1) if cpu > 0 else 0.0,
            "summarize_cpu_s": round(self.progress.summarize_cpu_s, 3),
        })


#: How long a stop may take before it is abandoned (see :mod:`streams.runtime.stop_deadline`).
STOP_DEADLINE_S = 5.0


def run_summarizer(settings: Settings, summarizer: Summarizer | None = None, *, batch_max: int = 64) -> None:
    """Run a summarizer worker in the foreground until SIGTERM or SIGINT.

    It stops within a few seconds: the batch in hand is dropped uncommitted (the next summarizer repeats it,
    with the same ids), the consumer leaves its group, and if closing hangs on a broker that does not answer the
    process exits anyway after :data:`STOP_DEADLINE_S`.
    """
    asyncio.run(_serve(settings, summarizer, batch_max))


async def _serve(settings: Settings, summarizer: Summarizer | None, batch_max: int) -> None:
    from ctxflow.streams.runtime.stop_deadline import StopDeadline, stop_on_signals

    worker = SummarizerWorker(settings, summarizer, batch_max=batch_max)
    stop_on_signals(StopDeadline("the summarizer", "jobs it had not committed are summarized again (same summary "
                                 "ids) by the next summarizer of its group", seconds=STOP_DEADLINE_S), worker.stop)
    await worker.run()
