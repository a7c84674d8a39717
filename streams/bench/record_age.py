"""Lag in seconds: the age of the oldest record the worker has not committed, read from the record itself.

For every input partition whose committed offset is behind its end, the record at the committed offset is the
oldest one not yet durable; its timestamp is when the producer queued it (``CreateTime``, this machine's wall
clock), so its age is exactly how long an agent's event has waited. Reading it costs one fetch per lagging
partition per measurement, a few a second beside the worker's hundreds. An estimate from the times lag samples
first saw each offset read up to two sample periods high on a loaded machine, enough to fail a 5 s target.
"""

from __future__ import annotations

import time
from types import TracebackType

from aiokafka import AIOKafkaConsumer, TopicPartition
from ctxflow.streams.config import Settings
from ctxflow.streams.demo.harness import LagSample

__all__ = ["OldestRecordAge"]


class OldestRecordAge:
    """Measures the age of the oldest uncommitted record of a :class:`~streams.demo.harness.LagSample`
    (``async with``; one consumer that holds at most one partition assigned, paused between measurements)."""

    def __init__(self, settings: Settings, fetch_timeout_ms: int = 2_000) -> None:
        self._consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap, enable_auto_commit=False,
                                          fetch_max_wait_ms=5, max_partition_fetch_bytes=64 * 1024)
        self._timeout_ms = fetch_timeout_ms
        #: The partition holding the oldest uncommitted record at the last measurement (None: nothing waits).
        self.oldest_in: TopicPartition | None = None

    async def __aenter__(self) -> OldestRecordAge:
        await self._consumer.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._consumer.stop()

    async def measure(self, sample: LagSample) -> float:
        """Seconds since the oldest record not committed in ``sample`` was queued by its producer; 0 when
        everything is committed. A record that cannot be fetched within the timeout is skipped."""
        oldest, self.oldest_in = 0.0, None
        for tp, end in sample.ends.items():
            done = sample.committed.get(tp, 0)
            if done >= end:
                continue
            queued_ms = await self._timestamp_ms(tp, done)
            if queued_ms is not None and time.time() - queued_ms / 1000 > oldest:
                oldest, self.oldest_in = time.time() - queued_ms / 1000, tp
        return max(0.0, oldest)

    async def _timestamp_ms(self, tp: TopicPartition, offset: int) -> int | None:
        self._consumer.assign([tp])  # only this partition: an assigned partition is fetched continuously
        self._consumer.seek(tp, offset)
        try:
            batches = await self._consumer.getmany(tp, timeout_ms=self._timeout_ms, max_records=1)
        finally:
            self._consumer.pause(tp)
        return next((r.timestamp for r in batches.get(tp, []) if r.offset >= offset), None)
