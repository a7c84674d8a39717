"""How far a consumer group has committed: the waits behind ``wait_caught_up`` of workers and sinks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ctxflow.streams.config import Settings
from ctxflow.streams.runtime.log_end import log_end_offsets
from ctxflow.streams.sink.catalogue import PROJECTED, sink_group

if TYPE_CHECKING:  # annotations only: callers load aiokafka only when they wait
    from aiokafka import TopicPartition


class GroupBehind(RuntimeError):
    """The group had not committed up to the end of every partition before the deadline."""


async def wait_group_committed(settings: Settings, group: str, partitions: Sequence[TopicPartition],
                               timeout_s: float) -> dict[TopicPartition, int]:
    """Wait until ``group`` committed, on every partition, the true log end as of this call
    (:func:`streams.runtime.log_end.log_end_offsets`); returns those ends. Raises :class:`GroupBehind` after
    ``timeout_s``, naming the partitions behind with (committed, end)."""
    from aiokafka import AIOKafkaConsumer
    from aiokafka.admin import AIOKafkaAdminClient

    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap, enable_auto_commit=False)
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap)
    await consumer.start()
    await admin.start()
    try:
        ends = await log_end_offsets(consumer, partitions)
        deadline = time.monotonic() + timeout_s
        while True:
            committed = await admin.list_consumer_group_offsets(group, partitions=list(partitions))
            behind = {f"{tp.topic}:{tp.partition}": (_offset(committed.get(tp)), end)
                      for tp, end in ends.items() if _offset(committed.get(tp)) < end}
            if not behind:
                return ends
            if time.monotonic() > deadline:
                raise GroupBehind(f"group {group} still behind after {timeout_s:.0f}s (committed, end): {behind}")
            await asyncio.sleep(0.1)
    finally:
        await admin.close()
        await consumer.stop()


def wait_sink_caught_up(settings: Settings, timeout_s: float = 60.0) -> dict[str, int]:
    """Wait until the sink group (``<app_id>-sink``) committed every record on the projected topics as of this call.

    A sink commits only what it wrote, so afterwards ClickHouse holds every one of those records (that decodes).
    Returns the end offsets waited for, ``{"topic:partition": end}``; raises :class:`GroupBehind` after ``timeout_s``.
    """
    from aiokafka import TopicPartition

    tps = [TopicPartition(spec.full_name(settings), p) for spec in PROJECTED
           for p in range(spec.partition_count(settings))]
    ends = asyncio.run(wait_group_committed(settings, sink_group(settings), tps, timeout_s))
    return {f"{tp.topic}:{tp.partition}": end for tp, end in ends.items()}


def _offset(meta: Any) -> int:
    return 0 if meta is None or meta.offset < 0 else int(meta.offset)
