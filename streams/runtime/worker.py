"""The Faust worker: one agent reads every tenant-keyed input topic in batches and runs the budget pipeline.

One agent with concurrency 1 owns a set of partitions, hence a set of tenants, hence their counters: no two
writers ever update one tenant's tables. The agent acknowledges a batch's messages only after
:meth:`streams.runtime.pipeline.BudgetPipeline.commit` returned for it, so offsets are committed only once the batch's
effects are durable; it decides later batches meanwhile, and commits strictly one group after another.
If a batch fails, neither it nor any later batch is acknowledged and the worker stops (a restart replays from
the last commit, and every effect is idempotent under replay).

Input records reach the agent in bulk through :mod:`streams.runtime.intake`, not through Faust streams.

The worker never writes ClickHouse itself: the ClickHouse sink is a consumer group of its own (:mod:`streams.sink`),
so an analytics outage never holds a decision back. By default (``CTXFLOW_SINK=auto``) the worker process hosts
one, in a thread with its own event loop, when it can hold the backend; an embedded chDB admits one process per
directory, so a second worker on the embedded stack decides without a sink (and takes it over when the first
exits). The process holding the sink serves analyst queries at ``POST /query`` on ``127.0.0.1:<web_port>``
(``ctxflow query`` finds it); ``/health`` reports the sink beside the worker's own partitions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime
from typing import Any

import faust
from aiokafka import AIOKafkaProducer
from ctxflow.processors.budget import BudgetProcessor
from ctxflow.processors.chain import default_chain
from ctxflow.processors.eviction.planner import TABLE as WORKSETS
from ctxflow.processors.eviction.planner import pending_jobs
from ctxflow.processors.memory import expiry
from ctxflow.processors.memory.store import EXPIRY
from ctxflow.processors.retention import Retention
from ctxflow.processors.tokens import TokenCounter
from ctxflow.schemas.codec import Codec
from ctxflow.sinks.redis import RedisProjection
from ctxflow.streams.config import Settings
from ctxflow.streams.logs import log_handler
from ctxflow.streams.runtime import gc_policy
from ctxflow.streams.runtime.inputs import INPUT_MODELS
from ctxflow.streams.runtime.intake import BatchIntake, BudgetApp, BulkConsumer
from ctxflow.streams.runtime.metrics import SinkStatus as SinkProgress
from ctxflow.streams.runtime.metrics import WorkerMetrics
from ctxflow.streams.runtime.outlet import DecisionOutlet
from ctxflow.streams.runtime.payloads import open_payload_store
from ctxflow.streams.runtime.pipeline import BudgetPipeline, InputRecord, PreparedBatch
from ctxflow.streams.runtime.recovery import PreloadedTable, PreloadingTableManager
from ctxflow.streams.runtime.snapshots import Deployment, SnapshotFiles, TableSnapshots
from ctxflow.streams.runtime.stop_deadline import StopDeadline
from ctxflow.streams.runtime.tables import BatchProducer, TableBudgetStore, declare_tables
from ctxflow.streams.sink.host import SinkHost
from ctxflow.streams.sink.web import answer_query, local_query_url
from ctxflow.streams.topics import MEMORY_COMMANDS
from faust.types import Message
from faust.web import Request, Response, View
from mode import Service

log = logging.getLogger(__name__)


def build_app(settings: Settings) -> faust.App:
    """The worker's Faust app: tables, the budget agent, the ClickHouse sink it hosts (per ``settings.sink``) and
    the web endpoints, wired to ``settings``. Raises :class:`streams.sink.ownership.BackendHeld` when
    ``settings.sink`` is ``on`` and another process holds the chDB directory."""
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
        # Tables are read from their changelogs in bulk before Faust's recovery (streams.runtime.recovery). The preload
        # reads to the true log end, which Tansu's ListOffsets can under-report, so a preloaded offset may be
        # past what Faust takes for the highwater: nothing is left to recover then, not an inconsistency.
        Table=PreloadedTable,
        TableManager=PreloadingTableManager,
        recovery_consistency_check=False,
    )
    app.fetch_max_wait_ms = settings.fetch_max_wait_ms
    snapshots = None
    if settings.table_snapshots:
        deployment = Deployment(settings.app_id, settings.topic_prefix, settings.partitions)
        snapshots = TableSnapshots(SnapshotFiles(settings.home / "state" / settings.app_id, deployment))
    app.snapshots = snapshots  # read by the preload (streams.runtime.recovery)
    app.stall_after_s = settings.stall_after_s
    chain_tables = default_chain(BudgetProcessor(TokenCounter())).tables
    tables = declare_tables(app, settings.partitions, chain_tables)
    logical = {settings.topic(name): name for name in INPUT_MODELS}
    inputs = app.topic(
        *logical, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw",
        partitions=settings.partitions,
    )
    app.intake = BatchIntake(app, set(logical), max_buffered=4 * settings.batch_max)
    metrics = WorkerMetrics(
        logical,
        partitions=lambda: app.consumer.health().partitions,  # type: ignore[attr-defined]  (BulkConsumer)
        pending_jobs=lambda: pending_jobs(tables[WORKSETS].values()),
    )
    sink = None
    if settings.sink != "off":
        sink = SinkHost(settings, role="worker", query_url=local_query_url(settings.web_port),
                        take_over=settings.sink == "auto")
        sink.claim()  # at once: with `on`, a worker that cannot hold the backend does not start

        @app.service
        class ClickHouseSinkThread(Service):
            """Runs the worker's sink in its own thread while the app runs."""

            async def on_start(self) -> None:
                sink.start_thread()

            async def on_stop(self) -> None:
                await asyncio.to_thread(sink.stop, 5.0)  # within the worker's stop deadline

        metrics.watch_sinks(lambda: _sink_metrics(sink))
    app.sink = sink  # type: ignore[attr-defined]  (read by /health)

    @app.agent(inputs, concurrency=1, name="budget")
    async def budget(stream: faust.StreamT) -> None:
        # Subscribes the inputs (acks enabled); their messages arrive through app.intake, not this stream.
        redis = RedisProjection(settings.redis_url, settings.redis_ttl_s)
        # Decisions and dead letters, and changelogs, go through two producers of the agent's own, with the
        # batch API (see streams.runtime.tables.BatchProducer); every send is awaited before the batch is acknowledged.
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
        store = TableBudgetStore(tables, BatchProducer(
            producers[1], last_record_alone=True, on_acked=snapshots.positions.acked if snapshots else None))
        app.table_store = store  # type: ignore[attr-defined]  (read by /health)
        codec = Codec(settings.schema_registry_url, settings.max_content_bytes)
        pipeline = BudgetPipeline(
            codec=codec,
            chain=default_chain(
                BudgetProcessor(counter, retention=Retention.of_seconds(settings.run_retention_s)),
                idle_timeout_s=settings.run_idle_timeout_s, storage_days=settings.content_storage_days,
            ),
            store=store,
            redis=redis,
            producer=DecisionOutlet(BatchProducer(producers[0]), settings.decision_linger_ms / 1000),
            full_topic=settings.topic,
            payloads=open_payload_store(settings),
        )

        async def fail(exc: BaseException, records: int) -> None:
            # Nothing of the failed batch, or of any later one, is acknowledged; stop the worker so a restart
            # replays from the last commit (acknowledging a later batch would commit past the failed one).
            log.error("batch failed; stopping the worker", exc_info=exc, extra={"records": records})
            await app.crash(exc)

        # Batches are decided as fast as they come (their decisions and Redis projections go out at once) and
        # committed by one task, in order, as groups: steps 3-6 of streams.runtime.pipeline for the group at a time. A
        # group starts commit_interval_s after the previous one, or as soon as 2 x batch_max records wait,
        # whichever comes first; deciding runs ahead of committing by at most ~4 x batch_max records (memory).
        pending: asyncio.Queue[tuple[PreparedBatch, list[Message]]] = asyncio.Queue()
        room, enough = asyncio.Event(), asyncio.Event()
        in_queue = [0]  # records decided and not yet committed
        group_records = 2 * settings.batch_max
        # Held while a batch is decided: a table snapshot holds it to keep the tables still (see take_snapshots).
        deciding = asyncio.Lock()
        committed = asyncio.Event()

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
                metrics.record([prepared for prepared, _ in group])
                consumer: BulkConsumer = app.consumer  # type: ignore[assignment]
                for _, messages in group:
                    consumer.ack_all(messages)
                    in_queue[0] -= len(messages)
                room.set()
                committed.set()
                log.debug(
                    "batch", extra={"records": report.records, "batches": len(group),
                                    "decisions": len(report.decisions), "dead_letters": len(report.dead_letters),
                                    "seconds": round(report.seconds, 4), "changelog_records": report.changelog_records,
                                    **report.steps},
                )

        async def take_snapshots(snapshots: TableSnapshots) -> None:
            # Only when nothing decided is uncommitted: every table value is then one its changelog holds, at
            # the offsets this worker's acknowledged writes reached. Deciding waits meanwhile (the values are
            # encoded on the snapshot thread); the event loop does not.
            while True:
                await committed.wait()
                committed.clear()
                if not snapshots.due(store.live_keys(), idle=in_queue[0] == 0):
                    continue
                async with deciding:
                    while in_queue[0] and not committing.done():
                        room.clear()
                        await room.wait()
                    if committing.done() or not app.flow_control.is_active():
                        continue
                    await snapshots.take(store.held_values)

        async def send_expiry_commands() -> None:
            # A tenant that went quiet no longer moves its own event-time clock, so nothing would expire its
            # records; these commands go through the log like an operator's, so their effect replays exactly.
            topic = settings.topic(MEMORY_COMMANDS.name)
            while True:
                await asyncio.sleep(settings.expiry_sweep_s)
                for command in expiry.due(store.items(EXPIRY), datetime.now(UTC)):
                    await producers[0].send_and_wait(topic, key=command.tenant_id.encode(), value=codec.encode(command))
                    log.info("retention sweep sent", extra={"tenant": command.tenant_id, "as_of": command.issued_at})

        committing = asyncio.create_task(commit_groups())
        snapshotting = asyncio.create_task(take_snapshots(snapshots)) if snapshots else None
        sweeping = asyncio.create_task(send_expiry_commands()) if settings.expiry_sweep_s else None
        try:
            while True:
                messages = []
                try:
                    messages = await app.intake.take(settings.batch_max)
                    records = [InputRecord(logical[m.topic], m.partition, m.offset, m.key, m.value) for m in messages]
                    async with deciding:
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
            if snapshotting is not None:
                snapshotting.cancel()
            if sweeping is not None:
                sweeping.cancel()
            await redis.close()
            for kafka in producers:
                await kafka.stop()

    @app.page("/query")
    class QueryView(View):
        """``POST {"sql": "...", "parameters": {...}}`` -> ``{"columns": [...], "rows": [[...]]}`` when this worker
        holds the ClickHouse sink (see :func:`streams.sink.web.answer_query`)."""

        async def post(self, request: Request) -> Response:
            status, answer = await asyncio.to_thread(answer_query, sink, await request.read())
            return self.json(answer, status=status)

    @app.page("/metrics")
    class MetricsView(View):
        """Prometheus metrics (:mod:`streams.runtime.metrics`), in the exposition format the scraper asks for."""

        async def get(self, request: Request) -> Response:
            body, content_type = metrics.exposition(request.headers.get("Accept"))
            return self.bytes(body, headers={"Content-Type": content_type})

    @app.page("/health")
    class HealthView(View):
        """``status`` (``starting``, ``ready`` or ``degraded``: see :class:`streams.runtime.health.WorkerHealth`),
        the partition numbers this worker owns and processes (empty while it rebalances or recovers its tables),
        per input topic-partition its ``lag``, ``last_commit_age_s``, ``last_fetch_age_s`` and ``state``
        (``progress``), the stall threshold, how many changelog records it has read into its tables in bulk
        since it started, the values each of its tables holds now (``table_keys``), its table ``snapshots``
        (how many it has written, and whether one is due once it is idle), and its ClickHouse ``sink``
        (:meth:`streams.sink.host.SinkHost.health`; ``{"state": "off"}`` with ``CTXFLOW_SINK=off``). Answered
        from memory: asking never sends a broker request."""

        async def get(self, request: Request) -> Response:
            health = app.consumer.health()  # type: ignore[attr-defined]  (BulkConsumer)
            inputs = app.intake.topics
            assigned = sorted({p.partition for p in health.partitions if p.topic in inputs})
            preloaded = app.tables.preloaded_records  # type: ignore[attr-defined]  (PreloadingTableManager)
            table_store = getattr(app, "table_store", None)  # set once the agent has started
            return self.json({
                "status": health.status if assigned else "starting", "partitions": assigned,
                "progress": [p.as_json() for p in health.partitions if p.topic in inputs],
                "stall_after_s": settings.stall_after_s, "tables_preloaded": preloaded,
                "table_keys": table_store.keys_by_table() if table_store is not None else {},
                "snapshots": {"taken": snapshots.taken, "due": table_store is not None and snapshots.due(
                    table_store.live_keys(), idle=True)} if snapshots else {"state": "off"},
                "sink": sink.health() if sink is not None else {"state": "off", "healthy": True},
            })

    return app


def _sink_metrics(host: SinkHost) -> list[SinkProgress]:
    """The ``ctxflow_sink_*`` series of the ClickHouse sink this worker hosts; none while it holds no backend."""
    status = host.status()
    if status is None:
        return []
    # Not yet durable in ClickHouse: what waits for a flush and what waits for the workers' verdict.
    return [SinkProgress("clickhouse", status.rows_written, status.retries, status.buffered + status.held,
                         status.healthy)]


class _BoundedStopWorker(faust.Worker):
    """Faust's worker, whose graceful stop on SIGTERM/SIGINT is abandoned after a deadline.

    Faust's stop awaits the consumer's last commit and its group leave, which never return while the broker
    does not answer: the worker ignored SIGTERM for over a minute. Abandoning is safe (nothing uncommitted is
    lost: it is replayed after a restart, and every effect is idempotent).
    """

    stop_deadline = StopDeadline(
        "the worker", "batches it decided but had not committed are replayed when a worker starts again"
    )

    def _schedule_shutdown(self, signal: Any) -> None:
        self.stop_deadline.arm(getattr(signal, "name", str(signal)))
        super()._schedule_shutdown(signal)


def run_worker(settings: Settings, loglevel: str = "info") -> None:
    """Run the worker in the foreground until SIGINT/SIGTERM; it stops gracefully (committing what it decided)
    or, when that takes longer than :data:`streams.runtime.stop_deadline.STOP_DEADLINE_S`, exits anyway."""
    settings.home.mkdir(parents=True, exist_ok=True)
    app = build_app(settings)
    handler = log_handler()
    handler.setLevel(loglevel.upper())  # mode's logging setup leaves the root at DEBUG for extra handlers
    app.conf.loghandlers = [handler]
    # Only our structured handler: by default mode also installs a console handler of its own on the root
    # logger, and every line came out twice, once unstructured.
    only_ours = {"version": 1, "disable_existing_loggers": False, "root": {"level": loglevel.upper(), "handlers": []}}
    worker = _BoundedStopWorker(app, loglevel=loglevel, quiet=True, redirect_stdouts=False, logging_config=only_ours)
    # Faust's terminal spinner sets the root logger to DEBUG so that it spins on every record: every debug
    # call in aiokafka and Faust then builds a LogRecord (measured ~4% of the worker's CPU). No spinner here.
    worker.spinner = None
    gc_policy.apply()
    worker.execute_from_commandline()
