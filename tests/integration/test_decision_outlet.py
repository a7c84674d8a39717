"""``streams.runtime.outlet``: decisions sent within the linger leave as one batch, in order, each sender
released only once the broker acknowledged its records.

The batch count is read through the embedded broker's short end offset (``streams.runtime.log_end``): it
reports the last batch's base offset plus one, so three records in one batch report 1 and in three batches 3.
"""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from ctxflow.streams.config import Settings
from ctxflow.streams.runtime.log_end import log_end_offsets
from ctxflow.streams.runtime.outlet import DecisionOutlet
from ctxflow.streams.runtime.tables import BatchProducer
from ctxflow.streams.topics import DECISIONS


def _sent_and_read(settings: Settings, linger_s: float) -> tuple[list[int], int, list[bytes]]:
    topic = settings.topic(DECISIONS.name)
    tp = TopicPartition(topic, 0)

    async def scenario() -> tuple[list[int], int, list[bytes]]:
        kafka = AIOKafkaProducer(bootstrap_servers=settings.bootstrap, acks="all", linger_ms=1)
        consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap, group_id=None, enable_auto_commit=False)
        await kafka.start()
        await consumer.start()
        try:
            outlet = DecisionOutlet(BatchProducer(kafka), linger_s)
            async with asyncio.timeout(30):
                counts = await asyncio.gather(*(
                    outlet.send([(topic, 0, b"acme:run", f"decision {n}".encode())]) for n in range(3)))
                reported = (await consumer.end_offsets([tp]))[tp]
                await log_end_offsets(consumer, [tp])
                consumer.seek(tp, 0)
                values: list[bytes] = []
                while len(values) < 3:
                    values += [r.value for r in (await consumer.getmany(tp, timeout_ms=200)).get(tp, [])]
            return counts, reported, values
        finally:
            await consumer.stop()
            await kafka.stop()

    return asyncio.run(scenario())


def test_sends_within_the_linger_leave_as_one_batch_in_order(settings: Settings) -> None:
    counts, reported, values = _sent_and_read(settings, linger_s=0.05)
    assert counts == [1, 1, 1]  # every sender returned, after the broker acknowledged
    assert values == [b"decision 0", b"decision 1", b"decision 2"]
    assert reported == 1  # one batch of three


def test_without_a_linger_each_send_is_a_batch_of_its_own(settings: Settings) -> None:
    counts, reported, values = _sent_and_read(settings, linger_s=0.0)
    assert counts == [1, 1, 1]
    assert values == [b"decision 0", b"decision 1", b"decision 2"]
    assert reported == 3  # the last of three batches starts at offset 2


def test_an_urgent_send_leaves_at_once_with_what_was_gathered(settings: Settings) -> None:
    topic = settings.topic(DECISIONS.name)
    tp = TopicPartition(topic, 0)

    async def scenario() -> tuple[float, int]:
        kafka = AIOKafkaProducer(bootstrap_servers=settings.bootstrap, acks="all", linger_ms=1)
        consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap, group_id=None, enable_auto_commit=False)
        await kafka.start()
        await consumer.start()
        try:
            outlet = DecisionOutlet(BatchProducer(kafka), linger_s=30.0)  # a linger no test would wait out
            async with asyncio.timeout(20):
                began = asyncio.get_running_loop().time()
                gathered = asyncio.create_task(outlet.send([(topic, 0, b"acme:run", b"budget state")]))
                await asyncio.sleep(0)
                await outlet.send([(topic, 0, b"acme:run", b"admission")], urgent=True)
                await gathered
                took = asyncio.get_running_loop().time() - began
                return took, (await consumer.end_offsets([tp]))[tp]
        finally:
            await consumer.stop()
            await kafka.stop()

    took, reported = asyncio.run(scenario())
    assert took < 10  # neither waited for the 30 s linger
    assert reported == 1  # the gathered decision went in the admission's batch
