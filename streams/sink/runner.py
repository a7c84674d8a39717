"""The ClickHouse sink's consumer loop: projected topics in, idempotent batches out, offsets committed once written.

An asyncio loop over aiokafka in the group ``<app_id>-sink`` (:func:`~.catalogue.sink_group`), subscribed to every
topic of :data:`~.catalogue.PROJECTED`. Each cycle:

1. fetch what the assigned partitions hold, up to a batch;
2. decode every record under the worker's contract (:func:`streams.runtime.decode.decode_record`). A record that
   does not decode is counted and skipped with one log line per batch (the worker dead-letters it); it never
   stops the loop. The rest are buffered, turns, usage reports and run events keeping their Avro bytes
   (:meth:`~sinks.clickhouse.ClickHouseSink.add_encoded`);
3. once ``batch_rows`` records wait, or ``flush_every_s`` after the last flush with anything uncommitted and
   nothing more waiting on the broker (:data:`BEHIND_FLUSH_EVERY_S` while records wait), flush in a thread and,
   when it returned, commit exactly the offsets of what was buffered when it began. One flush runs at a time;
   fetching goes on meanwhile until ``max_buffered`` records wait, then the partitions pause.

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
from collections import Counter
from collections.abc import Iterable, Sequence

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError
from ctxflow.schemas.codec import Codec
from ctxflow.schemas.contract import RejectedRecord
from ctxflow.sinks.clickhouse import ENCODED_TYPES, ClickHouseSink
from ctxflow.streams.config import Settings
from ctxflow.streams.runtime.decode import decode_record
from ctxflow.streams.sink.backoff import Backoff
from ctxflow.streams.sink.catalogue import PROJECTED, keyed_by_tenant, sink_group
from ctxflow.streams.sink.ownership import redacted
from ctxflow.streams.sink.status import PartitionLag, SinkState, SinkStatus
from pydantic import BaseModel

log = logging.getLogger(__name__)

#: Records per flush. An insert costs chDB ~15 ms whatever its size, so large batches; a full buffer holds two.
BATCH_ROWS = 50_000
#: Longest a record waits for its flush once the sink has caught up (analytics lag when traffic is light).
FLUSH_EVERY_S = 0.5
#: Longest between two flushes while the sink is behind (its batches fill up meanwhile).
BEHIND_FLUSH_EVERY_S = 5.0
#: How long one fetch may wait for records; also how soon the loop notices a finished flush while idle.
POLL_MS = 100
#: How long a stopping sink tries its last flush before it leaves the rest to the next sink of its group.
FINAL_FLUSH_S = 5.0


class _Assignment(ConsumerRebalanceListener):
    """The partitions the group gave this sink; a revoked partition's offsets are never committed by it again."""

    def __init__(self, runner: SinkRunner) -> None:
        self._runner = runner

    async def on_partitions_revoked(self, revoked: Sequence[TopicPartition]) -> None:
        self._runner._forget(revoked)

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
        self._codec = Codec(settings.schema_registry_url, settings.max_content_bytes)
        self._routes: dict[str, tuple[type[BaseModel], bool]] = {
            spec.full_name(settings): (model, keyed_by_tenant(spec)) for spec, model in PROJECTED.items()
        }
        self._encoded = frozenset(ENCODED_TYPES)
        self._pending: dict[TopicPartition, int] = {}  # next offset after the last record buffered or skipped
        self._committed: dict[TopicPartition, int] = {}
        self._state: SinkState = "starting"
        self._rows_written = self._flushes = self._retries = self._skipped = 0
        self._last_error: str | None = None
        self._failing_since: float | None = None
        self._retry_after = 0.0  # the backend's own hint (SinkBackpressure.retry_after): a floor for the backoff
        self._first_record_at: float | None = None
        self._last_commit_at: float | None = None
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
            rows_written=self._rows_written, flushes=self._flushes, retries=self._retries, skipped=self._skipped,
            buffered=self.sink.buffered, last_error=self._last_error,
            failing_for_s=None if failing is None else time.monotonic() - failing,
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
        self._consumer.subscribe(list(self._routes), listener=_Assignment(self))
        try:
            await self._consumer.start()
            log.info("clickhouse sink started", extra={"group": self.group, "backend": redacted(self.sink.dsn),
                                                       "topics": len(self._routes)})
            await self._consume()
        finally:
            with contextlib.suppress(Exception):
                await self._consumer.stop()
            self._state = "stopped"
            log.info("clickhouse sink stopped", extra={"group": self.group, "rows_written": self._rows_written,
                                                       "retries": self._retries, "skipped": self._skipped,
                                                       "buffered": self.sink.buffered})

    async def _consume(self) -> None:
        assert self._stopping is not None
        flushing: asyncio.Task[bool] | None = None
        last_flush = retry_at = time.monotonic()
        while not self._stopping.is_set():
            self._hold(self.sink.buffered >= self._max_buffered)
            fetched = await self._consumer.getmany(timeout_ms=POLL_MS, max_records=self._batch_rows)
            self._buffer(record for records in fetched.values() for record in records)
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
                flushing = asyncio.create_task(self._flush_and_commit(dict(self._pending)))
                last_flush = now
        if flushing is not None:
            await flushing
        if self._state == "writing" and self._uncommitted():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(FINAL_FLUSH_S):
                    await self._flush_and_commit(dict(self._pending))

    def _buffer(self, records: Iterable[ConsumerRecord]) -> None:
        """Step 2 for fetched records: decode, buffer, and note every position as handled (skipped ones too)."""
        routes, encoded, codec, sink, pending = self._routes, self._encoded, self._codec, self.sink, self._pending
        refused: Counter[str] = Counter()
        example = ""
        for record in records:
            model, keyed = routes[record.topic]
            pending[TopicPartition(record.topic, record.partition)] = record.offset + 1
            try:
                event = decode_record(codec, record.value, record.key, model, keyed=keyed)
            except RejectedRecord as error:
                refused[error.reason_code] += 1
                example = example or f"{record.topic}[{record.partition}]@{record.offset}: {error.reason}"
                continue
            if type(event) in encoded:
                sink.add_encoded(event, record.value)  # type: ignore[arg-type]  (decoded, so not None)
            else:
                sink.add(event)
        if pending and self._first_record_at is None:
            self._first_record_at = time.time()
        if refused:
            self._skipped += sum(refused.values())
            log.warning("sink skipped records that do not decode (the worker dead-letters them)", extra={
                "count": sum(refused.values()), "reasons": dict(refused), "example": example})

    async def _flush_and_commit(self, covered: dict[TopicPartition, int]) -> bool:
        """Step 3: flush, then commit ``covered`` (what was buffered when the flush began); False if the flush
        failed (nothing committed, the records stay buffered)."""
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
        return any(offset > self._committed.get(tp, -1) for tp, offset in self._pending.items())

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

    def _forget(self, revoked: Sequence[TopicPartition]) -> None:
        # Buffered records of a revoked partition are still written (harmless: idempotent), never committed here.
        for tp in revoked:
            self._pending.pop(tp, None)
            self._committed.pop(tp, None)

