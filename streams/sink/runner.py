"""The ClickHouse sink's consumer loop: projected topics in, idempotent batches out, offsets committed once written.

An asyncio loop over aiokafka in the group ``<app_id>-sink`` (:func:`~.catalogue.sink_group`), subscribed to every
topic of :data:`~.catalogue.PROJECTED`. Each cycle:

1. fetch what the assigned partitions hold, up to a batch;
2. hand the records to the :class:`~.intake.SinkIntake`: records of the topics the deciding workers consume are
   written as the workers decided (accepted ones by their Avro bodies, refused ones skipped, undecided ones held
   until :class:`~.verdict.VerdictReader` learns more, every :data:`VERDICT_EVERY_S` while any wait), the workers'
   own records are decoded and written. A record that is refused or does not decode is counted and skipped; it
   never stops the loop;
3. once ``batch_rows`` records wait, or ``flush_every_s`` after the last flush with anything uncommitted and
   nothing more waiting on the broker (:data:`BEHIND_FLUSH_EVERY_S` while records wait), flush in a thread and,
   when it returned, commit exactly the offsets of what was buffered or skipped when it began. One flush runs at a
   time; fetching goes on meanwhile until ``max_buffered`` records are buffered or held, then the partitions pause.

A flush that fails (any exception: :class:`~sinks.base.SinkBackpressure`, an HTTP ClickHouse that stopped
answering, a chDB directory that cannot be written) keeps its records buffered (:class:`~sinks.base.BatchingSink`)
and commits nothing; the sink tries again after an exponential, capped, jittered delay (:class:`~.backoff.Backoff`)
with everything buffered by then, and logs the outage once when it begins and once when it ends. Fetching pauses
when the buffer is full, but the loop keeps polling, so the group does not evict the sink however long the
outage. So a row is committed only once written, and a crash or a rebalance replays at most what was not
committed: the tables collapse replays by record identity (``sinks.clickhouse_ddl``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from ctxflow.schemas.codec import Codec
from ctxflow.sinks.clickhouse import ClickHouseSink
from ctxflow.streams.config import Settings
from ctxflow.streams.sink.backoff import Backoff
from ctxflow.streams.sink.catalogue import PROJECTED, decided_by_workers, keyed_by_tenant, sink_group
from ctxflow.streams.sink.intake import Route, SinkIntake
from ctxflow.streams.sink.ownership import redacted
from ctxflow.streams.sink.status import PartitionLag, SinkState, SinkStatus
from ctxflow.streams.sink.verdict import VerdictReader, Verdicts

log = logging.getLogger(__name__)

#: Records per flush. An insert costs chDB ~15 ms whatever its size, so large batches; a full buffer holds two.
BATCH_ROWS = 50_000
#: Longest a record waits for its flush once the sink has caught up (analytics lag when traffic is light).
FLUSH_EVERY_S = 0.5
#: Longest between two flushes while the sink is behind (its batches fill up meanwhile).
BEHIND_FLUSH_EVERY_S = 5.0
#: How often the workers' verdicts are read while records wait for them (the workers commit every 0.5 s).
VERDICT_EVERY_S = 0.2
#: How long one fetch may wait for records; also how soon the loop notices a finished flush while idle.
POLL_MS = 100
#: How long a stopping sink tries its last flush before it leaves the rest to the next sink of its group.
FINAL_FLUSH_S = 5.0


class _Assignment(ConsumerRebalanceListener):
    """The partitions the group gave this sink; a revoked partition's offsets are never committed by it again."""

    def __init__(self, runner: SinkRunner) -> None:
        self._runner = runner

    async def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        # Buffered records of a revoked partition are still written (harmless: idempotent), never committed here.
        self._runner._intake.forget(revoked)
        for tp in revoked:
            self._runner._committed.pop(tp, None)

    async def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        log.info("partitions assigned", extra={
            "group": self._runner.group, "partitions": len(assigned),
            "topics": " ".join(sorted({tp.topic for tp in assigned}))})


class SinkRunner:
    """Writes the projected topics into ``sink`` until :meth:`stop` (see the module docstring for the order).

    Not thread-safe except :meth:`stop` and :meth:`status`, which any thread may call.
    """

    def __init__(self, settings: Settings, sink: ClickHouseSink, *, batch_rows: int = BATCH_ROWS,
                 flush_every_s: float = FLUSH_EVERY_S, backoff: Backoff | None = None) -> None:
        self.settings = settings
        self.sink = sink
        self.group = sink_group(settings)
        self._batch_rows = batch_rows
        self._max_buffered = 2 * batch_rows
        self._flush_every_s = flush_every_s
        self._backoff = backoff or Backoff()
        routes = {spec.full_name(settings): Route(model, keyed_by_tenant(spec), decided_by_workers(spec))
                  for spec, model in PROJECTED.items()}
        verdicts = Verdicts()
        self._intake = SinkIntake(sink, Codec(settings.schema_registry_url, settings.max_content_bytes), routes,
                                  verdicts)
        self._verdicts = VerdictReader(settings, [t for t, r in routes.items() if r.decided_by_workers], verdicts)
        self._topics = list(routes)
        self._committed: dict[TopicPartition, int] = {}
        self._state: SinkState = "starting"
        self._rows_written = self._flushes = self._retries = 0
        self._last_error: str | None = None
        self._failing_since: float | None = None
        self._retry_after = 0.0  # the backend's own hint (SinkBackpressure.retry_after): a floor for the backoff
        self._first_record_at: float | None = None
        self._last_commit_at: float | None = None
        self._waiting_since: float | None = None  # records held, no verdict since
        self._waiting_logged = False
        self._partitions: tuple[PartitionLag, ...] = ()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._stop_asked = False
        self._consumer: AIOKafkaConsumer

    def stop(self) -> None:
        """Ask :meth:`run` to return after one last flush (from any thread)."""
        self._stop_asked = True
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)

    def status(self) -> SinkStatus:
        """A snapshot of the sink's state and counters (from any thread)."""
        failing = self._failing_since
        return SinkStatus(
            group=self.group, backend=redacted(self.sink.dsn), state=self._state,
            rows_written=self._rows_written, flushes=self._flushes, retries=self._retries,
            skipped=self._intake.skipped, buffered=self.sink.buffered, held=self._intake.held,
            last_error=self._last_error, failing_for_s=None if failing is None else time.monotonic() - failing,
            first_record_at=self._first_record_at, last_commit_at=self._last_commit_at, partitions=self._partitions,
        )

    async def run(self) -> None:
        """Consume, write and commit until :meth:`stop`; joins the group first and leaves it on the way out."""
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        if self._stop_asked:
            return
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.bootstrap, group_id=self.group, client_id=self.group,
            enable_auto_commit=False, auto_offset_reset="earliest",
            fetch_max_wait_ms=self.settings.fetch_max_wait_ms, max_partition_fetch_bytes=8 << 20,
            fetch_max_bytes=64 << 20,
            # As the deciding worker: a crashed member's partitions move on after a short session.
            session_timeout_ms=6_000, heartbeat_interval_ms=500,
        )
        self._consumer.subscribe(self._topics, listener=_Assignment(self))
        try:
            await self._verdicts.start()
            await self._consumer.start()
            log.info("clickhouse sink started", extra={"group": self.group, "backend": redacted(self.sink.dsn),
                                                       "topics": len(self._topics)})
            await self._consume()
        finally:
            for close in (self._consumer.stop, self._verdicts.stop):
                with contextlib.suppress(Exception):  # including a client that never started
                    await close()
            self._state = "stopped"
            log.info("clickhouse sink stopped", extra={"group": self.group, "rows_written": self._rows_written,
                                                       "retries": self._retries, "skipped": self._intake.skipped,
                                                       "buffered": self.sink.buffered, "held": self._intake.held})

    async def _consume(self) -> None:
        assert self._stopping is not None
        flushing: asyncio.Task[bool] | None = None
        last_flush = retry_at = last_verdicts = time.monotonic()
        while not self._stopping.is_set():
            self._hold(self.sink.buffered + self._intake.held >= self._max_buffered)
            fetched = await self._consumer.getmany(timeout_ms=POLL_MS, max_records=self._batch_rows)
            if fetched and self._first_record_at is None:
                self._first_record_at = time.time()
            self._intake.take(record for records in fetched.values() for record in records)
            now = time.monotonic()
            if self._intake.held and now - last_verdicts >= VERDICT_EVERY_S:
                await self._learn_verdicts()
                last_verdicts = now
            self._observe()
            if flushing is not None and flushing.done():
                if not flushing.result():
                    retry_at = time.monotonic() + self._backoff.next(self._retry_after)
                flushing = None
            now = time.monotonic()
            waited = now - last_flush
            # Behind (records wait on the broker), batches fill up: fewer, larger inserts; caught up, the
            # interval bounds how long analytics trail the topics.
            due = self.sink.buffered >= self._batch_rows or waited >= BEHIND_FLUSH_EVERY_S or (
                waited >= self._flush_every_s and not await self._behind())
            if flushing is None and due and now >= retry_at and self._uncommitted():
                flushing = asyncio.create_task(self._flush_and_commit(dict(self._intake.pending)))
                last_flush = now
        if flushing is not None:
            await flushing
        if self._state == "writing" and self._uncommitted():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(FINAL_FLUSH_S):
                    await self._flush_and_commit(dict(self._intake.pending))

    async def _learn_verdicts(self) -> None:
        """Read the workers' verdicts and place what they decided; say once when none come for long."""
        held = self._intake.held
        try:
            async with asyncio.timeout(5.0):
                await self._verdicts.refresh()
        except (KafkaError, TimeoutError) as error:  # the broker is away: the records stay held
            log.debug("sink could not read the workers' verdicts", extra={"error": repr(error)})
        self._intake.release()
        now = time.monotonic()
        if self._intake.held < held or not self._intake.held:  # progress
            if self._waiting_logged:
                log.warning("the deciding workers commit again; the sink writes what they decided")
            self._waiting_since, self._waiting_logged = None, False
        elif self._waiting_since is None:
            self._waiting_since = now
        elif now - self._waiting_since > self.settings.stall_after_s and not self._waiting_logged:
            self._waiting_logged = True  # once per wait
            log.warning("the sink holds records the deciding workers have not committed yet (is a worker of this "
                        "app running?); it writes them once they are decided",
                        extra={"workers": self.settings.app_id, "held": self._intake.held})

    async def _flush_and_commit(self, covered: dict[TopicPartition, int]) -> bool:
        """Step 3: flush, then commit ``covered`` (what was buffered or skipped when the flush began); False if
        the flush failed (nothing committed, the records stay buffered)."""
        try:
            written = await asyncio.to_thread(self.sink.flush)
        except Exception as error:
            self._failed(error)
            return False
        self._flushes += 1
        self._rows_written += written
        self._recovered()
        assigned = self._consumer.assignment()
        offsets = {tp: offset for tp, offset in covered.items()
                   if tp in assigned and offset > self._committed.get(tp, -1)}
        if not offsets:
            return True
        try:
            await self._consumer.commit(offsets)
        except KafkaError as error:  # rebalanced or the broker is away: the next commit covers these offsets too
            log.warning("sink commit failed; the next one covers these offsets", extra={"error": repr(error)})
            return True
        self._committed.update(offsets)
        self._intake.committed(offsets)
        self._last_commit_at = time.time()
        return True

    def _failed(self, error: Exception) -> None:
        self._retries += 1
        self._last_error = f"{type(error).__name__}: {error}"[:2000]
        self._retry_after = float(getattr(error, "retry_after", 0.0))
        if self._state != "retrying":  # once per outage, not once per retry
            self._state = "retrying"
            self._failing_since = time.monotonic()
            log.error("clickhouse sink cannot write; keeping its records buffered, committing nothing and retrying "
                      "with backoff (decisions are not affected)",
                      extra={"backend": redacted(self.sink.dsn), "buffered": self.sink.buffered,
                             "error": self._last_error})
        else:
            log.debug("clickhouse sink retry failed", extra={"retries": self._retries, "error": self._last_error})

    def _recovered(self) -> None:
        self._retry_after = 0.0
        self._backoff.reset()
        if self._state == "retrying":
            assert self._failing_since is not None
            log.warning("clickhouse sink writes again", extra={
                "backend": redacted(self.sink.dsn), "outage_s": round(time.monotonic() - self._failing_since, 1),
                "retries": self._retries})
        self._state = "writing"
        self._failing_since = None

    async def _behind(self) -> bool:
        """True while an assigned partition's log end (from the last fetch response) lies past the position."""
        consumer = self._consumer
        for tp in consumer.assignment():
            end = consumer.highwater(tp)
            if end is not None and end > await consumer.position(tp):
                return True
        return False

    def _uncommitted(self) -> bool:
        return any(offset > self._committed.get(tp, -1) for tp, offset in self._intake.pending.items())

    def _hold(self, full: bool) -> None:
        """Pause every assigned partition while the buffer is full, resume them once it drained."""
        assigned, paused = self._consumer.assignment(), self._consumer.paused()
        if full and assigned - paused:
            self._consumer.pause(*(assigned - paused))
        elif not full and paused:
            self._consumer.resume(*paused)

    def _observe(self) -> None:
        """Refresh the per-partition lag snapshot and the state once the group assigned partitions."""
        assigned = self._consumer.assignment()
        if assigned and self._state == "starting":
            self._state = "writing"
        self._partitions = tuple(
            PartitionLag(tp.topic, tp.partition, self._committed.get(tp), self._consumer.highwater(tp))
            for tp in sorted(assigned, key=lambda tp: (tp.topic, tp.partition))
        )
