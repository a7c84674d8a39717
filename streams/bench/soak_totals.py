"""What the worker holds for the soak's tenants, checked against what the soak published.

Turn and usage counts and tokens per tenant come from ClickHouse through the worker (tables de-duplicate) once its
sink has caught up, each tenant's reported spend from the end of the tenants table's changelog: what a restarted
worker starts from.
"""

from __future__ import annotations

import asyncio
import json

from aiokafka import AIOKafkaConsumer, TopicPartition
from ctxflow.streams.bench import soak_report
from ctxflow.streams.bench.soak_report import GroundTotals
from ctxflow.streams.config import Settings
from ctxflow.streams.runtime.log_end import log_end_offsets
from ctxflow.streams.stack.progress import GroupBehind, wait_sink_caught_up
from ctxflow.streams.stack.worker_process import WorkerProcess

__all__ = ["totals_problems"]

_TURNS = "SELECT tenant_id, count(), sum(token_count) FROM turns GROUP BY tenant_id"
_USAGE = ("SELECT tenant_id, count(), sum(input_tokens + output_tokens + cached_read_tokens + cache_write_tokens + "
          "reasoning_tokens) FROM usage GROUP BY tenant_id")


async def totals_problems(worker: WorkerProcess, truth: GroundTotals, sink_timeout_s: float = 120.0) -> list[str]:
    """Every way the worker's totals differ from ``truth`` (empty when they match); call once it caught up. Waits
    for its ClickHouse sink, which trails the decisions, to write everything first."""
    try:
        await asyncio.to_thread(wait_sink_caught_up, worker.settings, sink_timeout_s)
    except GroupBehind as error:
        return [f"the ClickHouse sink did not catch up: {error}"]
    turns = await asyncio.to_thread(worker.query, _TURNS)
    usage = await asyncio.to_thread(worker.query, _USAGE)
    spend = await _reported_spend(worker.settings)
    return soak_report.totals_problems(truth, {r[0]: (int(r[1]), int(r[2])) for r in turns.rows},
                                       {r[0]: (int(r[1]), int(r[2])) for r in usage.rows}, spend)


async def _reported_spend(settings: Settings, timeout_s: float = 120.0) -> dict[str, int]:
    """Each tenant's reported tokens (lifetime tokens less estimated ones) from the end of the tenants table's
    changelog: what a restarted worker would start from."""
    topic = f"{settings.app_id}-budget-tenants-changelog"
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap, group_id=None, enable_auto_commit=False)
    await consumer.start()
    latest: dict[str, bytes | None] = {}
    try:
        async with asyncio.timeout(timeout_s):
            tps = [TopicPartition(topic, p) for p in range(settings.partitions)]
            ends = await log_end_offsets(consumer, tps)
            await consumer.seek_to_beginning(*tps)
            while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
                for records in (await consumer.getmany(timeout_ms=200, max_records=20_000)).values():
                    latest.update((r.key.decode(), r.value) for r in records)
    finally:
        await consumer.stop()
    spend = {key: json.loads(value) for key, value in latest.items() if value is not None}
    return {key: int(v["tokens"]) - int(v["estimated_tokens"]) for key, v in spend.items()}
