"""Test-side views of a deployment's broker: whole topics, decoded decisions, the worker's committed progress,
and :func:`send_one_batch` to lay records down as one record batch.

Everything here talks to the real broker with group-less consumers (nothing joins or disturbs the worker's
consumer group), and every wait polls a condition against a deadline.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterable
from typing import TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.partitioner import DefaultPartitioner
from ctxflow.schemas.codec import Codec
from ctxflow.schemas.models import DeadLetter, Decision
from ctxflow.streams.config import Settings
from ctxflow.streams.runtime.log_end import log_end_offsets
from ctxflow.streams.sink.catalogue import PROJECTED
from ctxflow.streams.stack.admin import TopicFacts, describe_topics
from ctxflow.streams.stack.progress import wait_sink_caught_up
from ctxflow.streams.stack.worker_process import INPUT_TOPICS
from ctxflow.streams.topics import ALL_TOPICS

T = TypeVar("T")


async def read_topics(settings: Settings, names: Iterable[str], timeout_s: float = 60.0) -> list[ConsumerRecord]:
    """Every record of the logical topics ``names``, from the beginning to their end offsets as of this call.

    Records come back grouped by topic and partition, each group in offset order. The end is the true one
    (:func:`streams.runtime.log_end.log_end_offsets`): the embedded broker under-reports it.
    """
    return await read_full_topics(settings, [settings.topic(name) for name in names], timeout_s)


async def read_full_topics(settings: Settings, topics: Iterable[str], timeout_s: float = 60.0
                           ) -> list[ConsumerRecord]:
    """:func:`read_topics` for full topic names (e.g. the worker's changelog topics)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        # Each topic's own partition count: catalogue topics may fix theirs, changelogs follow their table.
        await consumer.topics()
        tps = [TopicPartition(topic, p) for topic in topics
               for p in sorted(consumer.partitions_for_topic(topic) or range(settings.partitions))]
        found: dict[TopicPartition, list[ConsumerRecord]] = {tp: [] for tp in tps}
        async with asyncio.timeout(timeout_s):
            ends = await log_end_offsets(consumer, tps)
            await consumer.seek_to_beginning(*tps)
            while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
                for tp, records in (await consumer.getmany(timeout_ms=200)).items():
                    found[tp].extend(records)
        return [record for tp in tps for record in found[tp]]
    finally:
        await consumer.stop()


async def true_end_offsets(settings: Settings, names: Iterable[str], timeout_s: float = 30.0
                           ) -> dict[TopicPartition, int]:
    """One past the last offset of every partition of ``names`` (:func:`streams.runtime.log_end.log_end_offsets`)."""
    tps = [TopicPartition(settings.topic(name), p) for name in names for p in range(settings.partitions)]
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        async with asyncio.timeout(timeout_s):
            return await log_end_offsets(consumer, tps)
    finally:
        await consumer.stop()


async def send_one_batch(settings: Settings, topic: str, key: bytes, values: list[bytes]) -> int:
    """Produce ``values`` under ``key`` as ONE record batch on the key's partition, which the producer would do
    with whatever it sends within ``linger_ms``, but deterministically; returns the partition.

    The broker then reports the batch's base offset + 1 as the partition's end (see :mod:`streams.runtime.log_end`).
    """
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap)
    await producer.start()
    try:
        partitions = sorted(await producer.partitions_for(topic))
        partition = DefaultPartitioner()(key, partitions, partitions)
        batch = producer.create_batch()
        for value in values:
            assert batch.append(key=key, value=value, timestamp=None) is not None, "batch full: send fewer values"
        batch.close()
        await (await producer.send_batch(batch, topic, partition=partition))
        return partition
    finally:
        await producer.stop()


def broker_topics(settings: Settings) -> set[str]:
    """The topics under ``settings.topic_prefix`` that exist on the broker (read without creating any)."""

    async def names() -> set[str]:
        consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap)
        await consumer.start()
        try:
            return {t for t in await consumer.topics() if t.startswith(f"{settings.topic_prefix}.")}
        finally:
            await consumer.stop()

    return asyncio.run(names())


def catalogue_facts(settings: Settings) -> dict[str, TopicFacts]:
    """Partition count and cleanup policy of every catalogue topic under ``settings.topic_prefix`` that exists."""

    async def facts() -> dict[str, TopicFacts]:
        admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap)
        await admin.start()
        try:
            return await describe_topics(admin, [spec.full_name(settings) for spec in ALL_TOPICS])
        finally:
            await admin.close()

    return asyncio.run(facts())


def wait_processed(settings: Settings, timeout_s: float = 60.0, *, sink: bool = True) -> None:
    """Wait until the worker's committed offsets cover every input record on the broker now, then (``sink``) until
    the ClickHouse sink group committed every projected record (the decisions and dead letters among them).

    Like ``WorkerProcess.wait_caught_up`` (committed offsets imply durable effects; both measure against the
    true end of each partition, see :mod:`streams.runtime.log_end`), without needing the ``WorkerProcess`` at hand.
    """

    async def poll() -> None:
        ends = await true_end_offsets(settings, INPUT_TOPICS)
        admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap)
        await admin.start()
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                committed = await admin.list_consumer_group_offsets(settings.app_id, partitions=list(ends))
                done = {tp: max(meta.offset, 0) for tp, meta in committed.items() if meta is not None}
                behind = {str(tp): (done.get(tp, 0), end) for tp, end in ends.items() if done.get(tp, 0) < end}
                if not behind:
                    # The worker reads back what it writes (its invalidations): caught up once that grew nothing.
                    later = await true_end_offsets(settings, INPUT_TOPICS)
                    if later == ends:
                        return
                    ends = later
                    continue
                if time.monotonic() > deadline:
                    raise AssertionError(f"worker still behind after {timeout_s}s (committed, end): {behind}")
                await asyncio.sleep(0.1)
        finally:
            await admin.close()

    asyncio.run(poll())
    if sink:
        wait_sink_caught_up(settings, timeout_s)


def changelog_keys(settings: Settings, table: str) -> set[str]:
    """The keys the worker has written to the changelog of budget table ``table`` (e.g. ``runs``)."""
    records = asyncio.run(read_full_topics(settings, [f"{settings.app_id}-budget-{table}-changelog"]))
    return {r.key.decode() for r in records if r.key is not None}


def decisions_on_topic(settings: Settings) -> list[Decision]:
    """Every decision the deployment's decisions topic holds, decoded (re-emitted copies included)."""
    codec = Codec(settings.schema_registry_url)
    return [codec.decode(r.value, Decision) for r in asyncio.run(read_topics(settings, ["decisions"]))]


def dead_letters_on_topic(settings: Settings) -> list[DeadLetter]:
    """Every dead letter on the deployment's dead-letter topic, decoded."""
    codec = Codec(settings.schema_registry_url)
    return [codec.decode(r.value, DeadLetter) for r in asyncio.run(read_topics(settings, ["deadletters"]))]


async def _committed_records(settings: Settings, admin: AIOKafkaAdminClient) -> int:
    tps = [TopicPartition(settings.topic(t), p) for t in INPUT_TOPICS for p in range(settings.partitions)]
    committed = await admin.list_consumer_group_offsets(settings.app_id, partitions=tps)
    return sum(max(meta.offset, 0) for meta in committed.values() if meta is not None)


def committed_offsets(settings: Settings) -> dict[tuple[str, int], int]:
    """The worker group's committed offset per ``(full input topic, partition)`` (0 when none)."""

    async def probe() -> dict[tuple[str, int], int]:
        tps = [TopicPartition(settings.topic(t), p) for t in INPUT_TOPICS for p in range(settings.partitions)]
        admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap)
        await admin.start()
        try:
            committed = await admin.list_consumer_group_offsets(settings.app_id, partitions=tps)
        finally:
            await admin.close()
        return {(tp.topic, tp.partition): max(committed[tp].offset, 0) if tp in committed else 0 for tp in tps}

    return asyncio.run(probe())


def group_offsets(settings: Settings, group: str) -> dict[tuple[str, int], int]:
    """``group``'s committed offset per (full topic, partition) of the ClickHouse sink's topics (0 when none)."""

    async def probe() -> dict[tuple[str, int], int]:
        tps = [TopicPartition(spec.full_name(settings), p) for spec in PROJECTED
               for p in range(spec.partition_count(settings))]
        admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap)
        await admin.start()
        try:
            committed = await admin.list_consumer_group_offsets(group, partitions=tps)
        finally:
            await admin.close()
        return {(tp.topic, tp.partition): max(committed[tp].offset, 0) if tp in committed else 0 for tp in tps}

    return asyncio.run(probe())


def committed_records(settings: Settings) -> int:
    """How many input records the worker's consumer group has committed (summed over every input partition)."""

    async def probe() -> int:
        admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap)
        await admin.start()
        try:
            return await _committed_records(settings, admin)
        finally:
            await admin.close()

    return asyncio.run(probe())


def wait_committed(settings: Settings, at_least: int, timeout_s: float = 60.0) -> int:
    """Poll until the worker has committed at least ``at_least`` input records; returns the count seen."""

    async def poll() -> int:
        admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap)
        await admin.start()
        try:
            deadline = time.monotonic() + timeout_s
            while (seen := await _committed_records(settings, admin)) < at_least:
                if time.monotonic() > deadline:
                    raise AssertionError(f"worker committed {seen} input records in {timeout_s}s, wanted {at_least}")
                await asyncio.sleep(0.05)
            return seen
        finally:
            await admin.close()

    return asyncio.run(poll())


def tenants_on_every_partition(partitions: int, per_partition: int) -> list[str]:
    """Fresh tenant ids, ``per_partition`` on each input partition (records are keyed by tenant id)."""
    place, every = DefaultPartitioner(), list(range(partitions))
    tag, chosen, index = uuid.uuid4().hex[:6], {p: [] for p in every}, 0
    while any(len(names) < per_partition for names in chosen.values()):
        name, index = f"reb{tag}{index}", index + 1
        names = chosen[place(name.encode(), every, every)]
        if len(names) < per_partition:
            names.append(name)
    return [name for names in chosen.values() for name in names]


def wait_until(probe: Callable[[], T], done: Callable[[T], bool], timeout_s: float = 60.0, what: str = "") -> T:
    """Poll ``probe`` until ``done(value)``; fail with the last value seen after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout_s}s for {what or 'a condition'}; last saw {value!r}")
        time.sleep(0.1)
