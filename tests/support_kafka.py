"""Test-side views of a deployment's broker: whole topics, decoded decisions, the worker's committed progress.

Everything here talks to the real broker with group-less consumers (nothing joins or disturbs the worker's
consumer group), and every wait polls a condition against a deadline.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import TypeVar

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from schemas.codec import Codec
from schemas.models import DeadLetter, Decision
from streams.config import Settings
from streams.worker_process import INPUT_TOPICS

T = TypeVar("T")


async def read_topics(settings: Settings, names: Iterable[str], timeout_s: float = 60.0) -> list[ConsumerRecord]:
    """Every record of the logical topics ``names``, from the beginning to their end offsets as of this call.

    Records come back grouped by topic and partition, each group in offset order.

    The embedded broker (Tansu 0.6, memory engine) answers ListOffsets(latest) with the *base* offset of a
    partition's last record batch plus one, so when that batch holds several records the reported end is
    short. A fetch returns whole batches, so reading until the reported end and keeping every record the
    last fetch returned yields the whole partition.
    """
    return await read_full_topics(settings, [settings.topic(name) for name in names], timeout_s)


async def read_full_topics(settings: Settings, topics: Iterable[str], timeout_s: float = 60.0
                           ) -> list[ConsumerRecord]:
    """:func:`read_topics` for full topic names (e.g. the worker's changelog topics)."""
    tps = [TopicPartition(topic, p) for topic in topics for p in range(settings.partitions)]
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        found: dict[TopicPartition, list[ConsumerRecord]] = {tp: [] for tp in tps}
        async with asyncio.timeout(timeout_s):
            while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
                for tp, records in (await consumer.getmany(timeout_ms=200)).items():
                    found[tp].extend(records)
        return [record for tp in tps for record in found[tp]]
    finally:
        await consumer.stop()


async def true_end_offsets(settings: Settings, names: Iterable[str], timeout_s: float = 30.0
                           ) -> dict[TopicPartition, int]:
    """One past the last offset of every partition of ``names``, correcting the broker's short answer (see
    :func:`read_topics`) by fetching the last batch from the reported end minus one."""
    tps = [TopicPartition(settings.topic(name), p) for name in names for p in range(settings.partitions)]
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        for tp in tps:
            consumer.seek(tp, max(ends[tp] - 1, 0))
        async with asyncio.timeout(timeout_s):
            while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
                await consumer.getmany(timeout_ms=200)
            return {tp: max(ends[tp], await consumer.position(tp)) for tp in tps}
    finally:
        await consumer.stop()


def wait_processed(settings: Settings, timeout_s: float = 60.0) -> None:
    """Wait until the worker's committed offsets cover every input record on the broker now.

    Like ``WorkerProcess.wait_caught_up`` (committed offsets imply durable effects), but against the true end
    of each partition: that helper trusts the broker's reported end, which can be short (see read_topics).
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
                    return
                if time.monotonic() > deadline:
                    raise AssertionError(f"worker still behind after {timeout_s}s (committed, end): {behind}")
                await asyncio.sleep(0.1)
        finally:
            await admin.close()

    asyncio.run(poll())


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
