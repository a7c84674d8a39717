"""The Faust worker: one agent reads every tenant-keyed input topic in batches and runs the budget pipeline.

One agent with concurrency 1 owns a set of partitions, hence a set of tenants, hence their counters: no two
writers ever update one tenant's tables. The agent acknowledges a batch only after
:meth:`streams.pipeline.BudgetPipeline.handle` returned (Faust's ``take_events`` acks a batch after the loop
body), so offsets are committed only once the batch's effects are durable.

The worker process also owns the process's only chDB engine (chDB hosts one per process), so it serves
analyst queries over HTTP at ``POST /query`` on ``127.0.0.1:<web_port>``; ``ctxflow query`` uses it when a
worker runs and opens chDB itself otherwise.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import faust
from faust.web import Request, Response, View

from processors.budget import BudgetProcessor
from processors.tokens import TokenCounter
from schemas.codec import Codec
from sinks.clickhouse import ClickHouseSink, ReadOnlyViolation
from sinks.redis import RedisProjection
from streams.config import Settings
from streams.logs import log_handler
from streams.pipeline import INPUT_MODELS, BudgetPipeline, InputRecord
from streams.tables import TableBudgetStore, declare_tables
from streams.topics import DEAD_LETTERS, DECISIONS
from streams.transport import ShortFetchApp

log = logging.getLogger(__name__)


def build_app(settings: Settings) -> faust.App:
    """The worker's Faust app: tables, the budget agent and the query endpoint, wired to ``settings``."""
    app = ShortFetchApp(
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
        broker_session_timeout=10.0,
        broker_heartbeat_interval=1.0,
        table_standby_replicas=0,
    )
    tables = declare_tables(app, settings.partitions)
    logical = {settings.topic(name): name for name in INPUT_MODELS}
    inputs = app.topic(
        *logical, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw",
        partitions=settings.partitions,
    )
    outputs = {
        spec.name: app.topic(settings.topic(spec.name), key_serializer="raw", value_serializer="raw")
        for spec in (DECISIONS, DEAD_LETTERS)
    }
    sink = ClickHouseSink(settings.chdb_dsn)
    sink.ensure_schema()

    async def send(topic: str, key: str, value: bytes) -> Any:
        return await outputs[topic].send(key=key.encode(), value=value)

    @app.agent(inputs, concurrency=1, name="budget")
    async def budget(stream: faust.StreamT) -> None:
        redis = RedisProjection(settings.redis_url, settings.redis_ttl_s)
        pipeline = BudgetPipeline(
            codec=Codec(settings.schema_registry_url, settings.max_content_bytes),
            processor=BudgetProcessor(TokenCounter()),
            store=TableBudgetStore(tables),
            sink=sink,
            redis=redis,
            send=send,
            full_topic=settings.topic,
        )
        try:
            async for events in stream.take_events(settings.batch_max, within=settings.batch_wait_s):
                records = [
                    InputRecord(logical[e.message.topic], e.message.partition, e.message.offset, e.message.key,
                                e.message.value)
                    for e in events
                ]
                report = await pipeline.handle(records)
                log.info(
                    "batch", extra={"records": report.records, "decisions": len(report.decisions),
                                    "dead_letters": len(report.dead_letters), "seconds": round(report.seconds, 4)},
                )
        finally:
            await redis.close()

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
        """The partitions this worker owns and processes; empty while it rebalances or recovers its tables."""

        async def get(self, request: Request) -> Response:
            ready = app.consumer is not None and not app.rebalancing and not getattr(app, "in_recovery", False)
            assigned = sorted({tp.partition for tp in app.consumer.assignment()}) if ready else []
            return self.json({"status": "ready" if assigned else "starting", "partitions": assigned})

    return app


def run_worker(settings: Settings, loglevel: str = "info") -> None:
    """Run the worker in the foreground until SIGINT/SIGTERM (Faust handles both gracefully)."""
    settings.home.mkdir(parents=True, exist_ok=True)
    app = build_app(settings)
    app.conf.loghandlers = [log_handler()]
    worker = faust.Worker(app, loglevel=loglevel, quiet=True, redirect_stdouts=False)
    worker.execute_from_commandline()
