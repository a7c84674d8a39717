"""``streams.runtime.log_end`` against the embedded broker, which reports a partition's end short (see that module)."""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaConsumer, TopicPartition
from ctxflow.streams.config import Settings
from ctxflow.streams.runtime.log_end import log_end_offsets

from tests.support_kafka import send_one_batch


def test_the_end_counts_every_record_of_the_last_batch_and_the_consumer_waits_there(settings: Settings) -> None:
    topic = settings.topic("turns")
    tps = [TopicPartition(topic, p) for p in range(settings.partitions)]

    async def scenario() -> tuple[int, dict[TopicPartition, int], dict[TopicPartition, int], list[bytes]]:
        await send_one_batch(settings, topic, b"acme", [b"alone"])
        partition = await send_one_batch(settings, topic, b"acme", [f"batched {n}".encode() for n in range(5)])
        consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap, group_id=None, enable_auto_commit=False)
        await consumer.start()
        try:
            async with asyncio.timeout(30):
                reported = await consumer.end_offsets(tps)
                ends = await log_end_offsets(consumer, tps)
                await send_one_batch(settings, topic, b"acme", [b"after"])
                after: list[bytes] = []
                while not after:
                    after = [r.value for r in (await consumer.getmany(timeout_ms=200)).get(tps[partition], [])]
            return partition, reported, ends, after
        finally:
            await consumer.stop()

    partition, reported, ends, after = asyncio.run(scenario())
    assert reported[tps[partition]] == 2  # the quirk: base offset 1 of the 5-record batch, plus one
    assert ends == {tp: 6 if tp.partition == partition else 0 for tp in tps}
    assert after == [b"after"]  # left at the true end: no record of the last batch comes again
