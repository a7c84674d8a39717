"""The Faust worker: one agent reads every tenant-keyed input topic in batches and runs the budget pipeline.

One agent with concurrency 1 owns a set of partitions, hence a set of tenants, hence their counters: no two
writers ever update one tenant's tables. The agent acknowledges a batch's messages only after
:meth:`streams.pipeline.BudgetPipeline.commit` returned for it, so offsets are committed only once the batch's
effects are durable; it decides later batches meanwhile, and commits strictly one group after another.
If a batch fails, neither it nor any later batch is acknowledged and the worker stops (a restart replays from
the last commit, and every effect is idempotent under replay).

Input records do not travel through Faust streams. Faust hands each message to its conductor, channel queue
and stream (two tasks and three queue hops per message), which costs ~100 us of CPU per message and caps a
worker at a few thousand events/s; a no-op bulk path measured ~17 us. The worker's consumer therefore drains
input-topic messages into a :class:`BatchIntake` a fetch at a time; the budget agent takes everything buffered
(up to ``batch_max``) as soon as it is free, so batches grow under load and stay small (low latency) when
idle. Changelog records that Faust's recovery reads (those written after the bulk preload of
:mod:`streams.recovery`) still go through Faust's own path. The intake keeps Faust's rebalance contract:
messages handed to the agent are tracked as in flight (a rebalance waits for their acknowledgement, as for
stream events), a rebalance clears what is buffered (it is fetched again from the committed offsets), and
messages of an older consumer generation are dropped.

The worker process also owns the process's only chDB engine (chDB hosts one per process), so it serves
analyst queries over HTTP at ``POST /query`` on ``127.0.0.1:<web_port>``; ``ctxflow query`` uses it when a
worker runs and opens chDB itself otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
from collections.abc import Iterable

import faust
from aiokafka import AIOKafkaProducer
from faust.types import TP, Message
from faust.types.tuples import ack_lock
from faust.web import Request, Response, View
from mode import ServiceT
from mode.utils.futures import notify

from processors.budget import BudgetProcessor
from processors.tokens import TokenCounter
from schemas.codec import Codec
from sinks.clickhouse import ClickHouseSink, ReadOnlyViolation
from sinks.redis import RedisProjection
from streams.config import Settings
from streams.logs import log_handler
from streams.pipeline import INPUT_MODELS, BudgetPipeline, InputRecord, PreparedBatch
from streams.recovery import PreloadedTable, PreloadingTableManager
from streams.tables import BatchProducer, TableBudgetStore, declare_tables
from streams.transport import ShortFetchApp, _Consumer, _Transport

log = logging.getLogger(__name__)


class IntakeGap(RuntimeError):
    """A partition's input offsets jumped: processing on would skip records (see :class:`OffsetContinuity`)."""


class OffsetContinuity:
    """The offset each input partition's next message must have, so no record is ever applied over a hole.

    Input offsets are contiguous (no compaction, no transaction markers), so a partition's next message
    follows on from the last one handed out, or repeats an earlier one (a seek back to the committed offset);
    the first one in a consumer generation (every rebalance seeks each partition to its committed offset) is
    the committed offset. Anything later would apply records over unprocessed ones, which no commit can pass
    and a restart would skip for good.
    """

    def __init__(self) -> None:
        self._next: dict[TP, int] = {}
        self._generation: int | None = None

    def admit(self, generation: int, tp: TP, offset: int, committed: int | None) -> None:
        """Record ``offset`` as handed out, or raise :class:`IntakeGap` if it skips any record."""
        if generation != self._generation:
            self._generation = generation
            self._next.clear()
        expected = self._next.get(tp, committed)
        if expected is not None and 0 <= expected < offset:
            raise IntakeGap(
                f"{tp.topic}[{tp.partition}]: offset {offset} follows {expected - 1}; offsets {expected}..{offset - 1} "
                "were never handed to the pipeline. Input topics must be written without transactions or "
                "compaction; otherwise this is a bug: restart the worker (it resumes from the last commit) and "
                "report it"
            )
        self._next[tp] = offset + 1


class BatchIntake:
    """Input-topic messages on their way from the consumer's drain loop to the budget agent, in bulk.

    ``put`` appends a fetch's messages (waiting while ``max_buffered`` are pending, and while a rebalance
    suspends flow); ``take`` returns up to ``limit`` of them as soon as any are buffered, marked in flight.
    ``take`` drops messages fetched before the latest rebalance (older consumer generation, or taken while
    flow is suspended): the rebalance ends by seeking to the committed offsets, so they are fetched again.
    The intake is deliberately not one of the flow-control managed queues: Faust clears those on *every*
    ``flow_control.resume()``, including the one right after that seek, which would drop messages already
    fetched from the new positions and leave a gap no later commit can pass.
    """

    def __init__(self, app: faust.App, topics: set[str], max_buffered: int) -> None:
        self.app = app
        self.topics = topics
        self._max = max_buffered
        self._buffer: list[Message] = []
        self._ready = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._continuity = OffsetContinuity()

    async def put(self, messages: list[Message]) -> None:
        """Buffer ``messages`` (a fetch, in offset order per partition); waits while flow is suspended."""
        await self.app.flow_control.acquire()
        while len(self._buffer) >= self._max:
            self._room.clear()
            await self._room.wait()
        self._buffer.extend(messages)
        self._ready.set()

    def _fresh(self, taken: list[Message]) -> list[Message]:
        """``taken`` without messages fetched under an older consumer generation; refuses a gap."""
        generation = self.app.consumer_generation_id
        committed = self.app.consumer._committed_offset  # type: ignore[attr-defined]
        fresh = []
        for message in taken:
            if message.generation_id == generation:
                self._continuity.admit(generation, message.tp, message.offset, committed.get(message.tp))
                fresh.append(message)
        if len(fresh) < len(taken):
            log.info("intake dropped messages of an older generation", extra={"count": len(taken) - len(fresh)})
        return fresh

    async def take(self, limit: int) -> list[Message]:
        """The next ``limit`` or fewer messages, oldest first, tracked as in flight until acknowledged."""
        while True:
            while not self._buffer:
                self._ready.clear()
                await self._ready.wait()
            taken = self._buffer[:limit]
            del self._buffer[:limit]
            self._room.set()
            if not self.app.flow_control.is_active():
                log.info("intake dropped messages taken during a rebalance", extra={"count": len(taken)})
                continue
            fresh = self._fresh(taken)
            # Consumer.track_message without its per-message sensor calls, as Faust's own Stream inlines it.
            in_flight = self.app.consumer._unacked_messages.add  # type: ignore[attr-defined]
            for message in fresh:
                message.tracked = True
                in_flight(message)
            if fresh:
                return fresh


class _BulkConsumer(_Consumer):
    """Faust's consumer, except that input-topic messages go to the app's :class:`BatchIntake` in bulk."""

    async def _drain_messages(self, fetcher: ServiceT) -> None:  # pragma: no cover (runs in every worker)
        # Faust's loop (faust.transport.consumer.Consumer._drain_messages) with one change: messages of the
        # intake's topics are collected and handed over per fetch instead of one callback (two tasks) each.
        intake: BatchIntake = self.app.intake  # type: ignore[attr-defined]
        callback, getmany = self.callback, self.getmany
        consumer_stopped, fetcher_stopped = self._stopped.is_set, fetcher._stopped.is_set  # type: ignore[attr-defined]
        get_read_offset, set_read_offset = self._read_offset.__getitem__, self._read_offset.__setitem__
        acks_enabled_for = self.app.topics.acks_enabled_for
        try:
            while not (consumer_stopped() or fetcher_stopped()):
                fetched: list[Message] = []
                await asyncio.sleep(0)
                since_yield = 0
                async for tp, message in getmany(timeout=1.0):
                    # No await from here until the read offset is set: a rebalance completing in between would
                    # seek the partition back, and setting the read offset of this older message afterwards
                    # would make the consumer skip the re-fetched records (getmany checks the generation only
                    # before it yields).
                    offset, read = message.offset, get_read_offset(tp)
                    if read is not None and offset < read:
                        continue  # already delivered (fetched again after a seek)
                    if message.topic in intake.topics:
                        # No gap bookkeeping: input offsets are contiguous (no compaction, no transaction
                        # markers), so a jump only means a fetch from before a seek; marking the skipped
                        # offsets acknowledged would commit records nobody processed.
                        fetched.append(message)
                        set_read_offset(tp, offset)
                        since_yield += 1
                        if since_yield >= 128:  # a fetch may hold thousands: let decisions and commits through
                            since_yield = 0
                            await asyncio.sleep(0)
                        continue
                    if read and offset - read > 1 and acks_enabled_for(message.topic):
                        await self._add_gap(tp, read + 1, offset)
                    # Changelog records Faust's recovery reads after the bulk preload, and anything else:
                    # Faust's conductor path, unchanged.
                    await self.wait_first(callback(message), self.suspend_flow.wait())
                    set_read_offset(tp, offset)
                if fetched:
                    await intake.put(fetched)
                if self._commit_every is not None and self._n_acked >= self._commit_every:
                    self._n_acked = 0
                    await self.commit()
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                return
            raise
        except Exception as exc:
            self.log.exception("Drain messages raised: %r", exc)
            raise


    def ack_all(self, messages: Iterable[Message]) -> None:
        """``Consumer.ack`` for many messages: one lock and one notification, not one each (~2 us a message).

        Unlike ``ack`` it also forgets a message that was already committed (a replay after a seek), which
        ``ack`` leaves in the in-flight set until it is garbage collected.
        """
        enabled = self.app.topics.acks_enabled_for
        committed, index, acked = self._committed_offset, self._acked_index, self._acked
        in_flight = self._unacked_messages
        added = 0
        with ack_lock:
            for message in messages:
                if message.acked:
                    continue
                message.acked = True
                in_flight.discard(message)
                if not enabled(message.topic):
                    continue
                tp, offset = message.tp, message.offset
                floor, seen = committed[tp], index[tp]
                if (floor is None or offset >= floor) and offset not in seen:
                    seen.add(offset)
                    acked[tp].append(offset)
                    added += 1
            self._n_acked += added
        notify(self._waiting_for_ack)


class _BulkTransport(_Transport):
    Consumer = _BulkConsumer


class BudgetApp(ShortFetchApp):
    """The worker's Faust app: short fetch waits and bulk intake of input topics (see module docstring)."""

    intake: BatchIntake

    def _new_transport(self) -> _Transport:
        return _BulkTransport(self.conf.broker_consumer, self)


def build_app(settings: Settings) -> faust.App:
    """The worker's Faust app: tables, the budget agent and the query endpoint, wired to ``settings``."""
    app = BudgetApp(
        settings.app_id,
        broker=f"kafka://{settings.bootstrap}",
        store="memory://",
        datadir=str(settings.home / "faust"),
        topic_partitions=settings.partitions,
        topic_replication_factor=1,
        web_enabled=True,
        web_bind="127.0.0.1",
        web_port=settings.web_port,
        web_in_thread=False,
        producer_linger_ms=2,
        producer_max_batch_size=1 << 20,
        consumer_max_fetch_size=8 << 20,
        stream_buffer_maxsize=max(4 * settings.batch_max, 4096),
        broker_commit_interval=0.5,
        # A restart after a crash waits for the dead member's session to expire, and the embedded broker then
        # delays the join by half the session timeout: short sessions keep a crash's gap short.
        broker_session_timeout=4.0,
        broker_heartbeat_interval=0.5,
        table_standby_replicas=0,
        # Tables are read from their changelogs in bulk before Faust's recovery (streams.recovery). The preload
        # reads to the true log end, which Tansu's ListOffsets can under-report, so a preloaded offset may be
        # past what Faust takes for the highwater: nothing is left to recover then, not an inconsistency.
        Table=PreloadedTable,
        TableManager=PreloadingTableManager,
        recovery_consistency_check=False,
    )
    tables = declare_tables(app, settings.partitions)
    logical = {settings.topic(name): name for name in INPUT_MODELS}
    inputs = app.topic(
        *logical, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw",
        partitions=settings.partitions,
    )
    app.intake = BatchIntake(app, set(logical), max_buffered=4 * settings.batch_max)
    sink = ClickHouseSink(settings.chdb_dsn)
    sink.ensure_schema()

    @app.agent(inputs, concurrency=1, name="budget")
    async def budget(stream: faust.StreamT) -> None:
        # Subscribes the inputs (acks enabled); their messages arrive through app.intake, not this stream.
        redis = RedisProjection(settings.redis_url, settings.redis_ttl_s)
        # Decisions and dead letters, and changelogs, go through two producers of the agent's own, with the
        # batch API (see streams.tables.BatchProducer); every send is awaited before the batch is acknowledged.
        # Two, because aiokafka keeps one request in flight per broker connection: a decision must not wait
        # behind a large changelog write.
        producers = [
            AIOKafkaProducer(
                bootstrap_servers=settings.bootstrap, client_id=f"{settings.app_id}-{role}", acks="all",
                linger_ms=1, max_batch_size=1 << 20, max_request_size=8 << 20,
            )
            for role in ("decisions", "changelogs")
        ]
        for kafka in producers:
            await kafka.start()
        counter = TokenCounter()
        counter.preload()
        pipeline = BudgetPipeline(
            codec=Codec(settings.schema_registry_url, settings.max_content_bytes),
            processor=BudgetProcessor(counter),
            store=TableBudgetStore(tables, BatchProducer(producers[1], last_record_alone=True)),
            sink=sink,
            redis=redis,
            producer=BatchProducer(producers[0]),
            full_topic=settings.topic,
        )

        async def fail(exc: BaseException, records: int) -> None:
            # Nothing of the failed batch, or of any later one, is acknowledged; stop the worker so a restart
            # replays from the last commit (acknowledging a later batch would commit past the failed one).
            log.error("batch failed; stopping the worker", exc_info=exc, extra={"records": records})
            await app.crash(exc)

        # Batches are decided as fast as they come (their decisions and Redis projections go out at once) and
        # committed by one task, in order, as groups: steps 3-6 of streams.pipeline for the group at a time. A
        # group starts commit_interval_s after the previous one, or as soon as 2 x batch_max records wait,
        # whichever comes first; deciding runs ahead of committing by at most ~4 x batch_max records (memory).
        pending: asyncio.Queue[tuple[PreparedBatch, list[Message]]] = asyncio.Queue()
        room, enough = asyncio.Event(), asyncio.Event()
        in_queue = [0]  # records decided and not yet committed
        group_records = 2 * settings.batch_max

        async def commit_groups() -> None:
            loop, due = asyncio.get_running_loop(), 0.0
            while True:
                group = [await pending.get()]
                if (wait := due - loop.time()) > 0 and in_queue[0] < group_records:
                    enough.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(wait):
                            await enough.wait()
                due = loop.time() + settings.commit_interval_s
                while not pending.empty():
                    group.append(pending.get_nowait())
                try:
                    report = await pipeline.commit([prepared for prepared, _ in group])
                except Exception as exc:
                    await fail(exc, sum(len(messages) for _, messages in group))
                    raise
                consumer: _BulkConsumer = app.consumer  # type: ignore[assignment]
                for _, messages in group:
                    consumer.ack_all(messages)
                    in_queue[0] -= len(messages)
                room.set()
                log.debug(
                    "batch", extra={"records": report.records, "batches": len(group),
                                    "decisions": len(report.decisions), "dead_letters": len(report.dead_letters),
                                    "seconds": round(report.seconds, 4), "changelog_records": report.changelog_records,
                                    **report.steps},
                )

        committing = asyncio.create_task(commit_groups())
        try:
            while True:
                messages = []
                try:
                    messages = await app.intake.take(settings.batch_max)
                    records = [InputRecord(logical[m.topic], m.partition, m.offset, m.key, m.value) for m in messages]
                    prepared = await pipeline.prepare(records)
                except Exception as exc:
                    await fail(exc, len(messages))
                    raise
                if committing.done():
                    committing.result()  # the committer only ends by failing: raise its error here too
                pending.put_nowait((prepared, messages))
                in_queue[0] += len(messages)
                if in_queue[0] >= group_records:
                    enough.set()
                while in_queue[0] >= 4 * settings.batch_max and not committing.done():
                    room.clear()
                    await room.wait()
        finally:
            committing.cancel()  # batches not acknowledged yet are replayed after a restart
            await redis.close()
            for kafka in producers:
                await kafka.stop()

    @app.page("/query")
    class QueryView(View):
        """``POST {"sql": "...", "parameters": {...}}`` -> ``{"columns": [...], "rows": [[...]]}``."""

        async def post(self, request: Request) -> Response:
            body = await request.json()
            try:
                result = await asyncio.to_thread(sink.query, body["sql"], body.get("parameters"))
            except ReadOnlyViolation as error:
                return self.json({"error": str(error)}, status=403)
            except Exception as error:
                return self.json({"error": f"{type(error).__name__}: {error}"}, status=400)
            rows = json.loads(json.dumps(result.rows, default=str))
            return self.json({"columns": list(result.columns), "rows": rows})

    @app.page("/health")
    class HealthView(View):
        """The partitions this worker owns and processes (empty while it rebalances or recovers its tables), and
        how many changelog records it has read into its tables in bulk since it started."""

        async def get(self, request: Request) -> Response:
            ready = app.consumer is not None and not app.rebalancing and not getattr(app, "in_recovery", False)
            inputs = app.intake.topics
            assigned = sorted({tp.partition for tp in app.consumer.assignment() if tp.topic in inputs}) if ready else []
            preloaded = app.tables.preloaded_records  # type: ignore[attr-defined]  (PreloadingTableManager)
            return self.json({
                "status": "ready" if assigned else "starting", "partitions": assigned, "tables_preloaded": preloaded,
            })

    return app


def run_worker(settings: Settings, loglevel: str = "info") -> None:
    """Run the worker in the foreground until SIGINT/SIGTERM (Faust handles both gracefully)."""
    settings.home.mkdir(parents=True, exist_ok=True)
    app = build_app(settings)
    handler = log_handler()
    handler.setLevel(loglevel.upper())  # mode's logging setup leaves the root at DEBUG for extra handlers
    app.conf.loghandlers = [handler]
    worker = faust.Worker(app, loglevel=loglevel, quiet=True, redirect_stdouts=False)
    # Faust's terminal spinner sets the root logger to DEBUG so that it spins on every record: every debug
    # call in aiokafka and Faust then builds a LogRecord (measured ~4% of the worker's CPU). No spinner here.
    worker.spinner = None
    # The worker holds hundreds of thousands of long-lived objects (table values, cached counts); CPython's
    # default thresholds (700, 10, 10) re-scan them in full collections over and over: measured ~25% of the
    # worker's CPU at 100k events. Our values hold no reference cycles, so young collections find the
    # garbage there is; full collections become rare (after 100 x 50 x 50,000 allocations).
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)
    worker.execute_from_commandline()
