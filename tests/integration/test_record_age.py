"""The soak's lag in seconds is the age of the oldest record the worker has not committed, read from the record."""

from __future__ import annotations

import asyncio
import time

from aiokafka import AIOKafkaProducer, TopicPartition
from ctxflow.streams.bench.record_age import OldestRecordAge
from ctxflow.streams.config import Settings
from ctxflow.streams.demo.harness import CommittedLag


async def _measure(settings: Settings) -> tuple[float, TopicPartition | None, int]:
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap)
    await producer.start()
    try:
        now_ms = int(time.time() * 1000)
        # Queued 12 s and 3 s ago on two topics; no worker runs, so nothing is committed.
        await producer.send_and_wait(settings.topic("usage"), b"x", key=b"a", partition=0, timestamp_ms=now_ms - 3_000)
        for _ in range(3):
            await producer.send_and_wait(settings.topic("turns"), b"x", key=b"a", partition=0,
                                         timestamp_ms=now_ms - 12_000)
    finally:
        await producer.stop()
    async with CommittedLag(settings) as lag, OldestRecordAge(settings) as ages:
        sample = await lag.sample()
        return await ages.measure(sample), ages.oldest_in, sample.records


def test_lag_age_is_the_age_of_the_oldest_uncommitted_record(settings: Settings) -> None:
    age, where, records = asyncio.run(_measure(settings))
    assert records == 4
    assert 12.0 <= age < 14.0
    assert where == TopicPartition(settings.topic("turns"), 0)
