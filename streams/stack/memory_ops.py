"""An operator's memory command from the outside: publish it, wait until the worker applied it, say what it did.

The worker applies ``memory.commands`` in log order and commits a command's offset only after everything it
produced is durable (:mod:`streams.runtime.pipeline`): its tombstones and records on ``memory.records``, its
invalidations, or, for a command it refused, a dead letter. So :func:`submit` publishes the command, notes
where it landed, polls the worker group's committed offset of that partition until it passes the command, then
reads what appeared on ``memory.records`` and ``deadletters`` since just before the command was published.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from ctxflow.schemas.codec import Codec, RejectedRecord
from ctxflow.schemas.models import DeadLetter, MemoryCommand, MemoryRecord
from ctxflow.streams.config import Settings
from ctxflow.streams.runtime.log_end import log_end_offsets
from ctxflow.streams.sdk import CtxflowClient, TopicMissing
from ctxflow.streams.topics import DEAD_LETTERS, MEMORY_RECORDS

Offsets = dict[TopicPartition, int]


class WorkerNotApplying(TimeoutError):
    """The worker did not commit past the command in time (not running, or far behind)."""


@dataclass(slots=True)
class Outcome:
    """What the worker did with a command: the records it wrote (latest per memory id), or why it refused it."""

    command: MemoryCommand
    records: list[MemoryRecord] = field(default_factory=list)
    refused: str | None = None


async def _ends(settings: Settings, topics: list[str]) -> Offsets:
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap, group_id=None, enable_auto_commit=False,
                                client_id="ctxflow-memory")
    await consumer.start()
    try:
        known = await consumer.topics()  # all-topics metadata: never makes the broker create one
        missing = [t for t in topics if t not in known]
        if missing:
            raise TopicMissing(missing[0], settings)
        partitions = [TopicPartition(t, p) for t in topics for p in sorted(consumer.partitions_for_topic(t) or ())]
        return await log_end_offsets(consumer, partitions)
    finally:
        await consumer.stop()


async def _read(settings: Settings, since: Offsets) -> list[tuple[str, bytes]]:
    """Every ``(topic, value)`` from ``since`` up to the partitions' ends now, in offset order per partition."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap, group_id=None, enable_auto_commit=False,
                                client_id="ctxflow-memory")
    await consumer.start()
    found: list[tuple[str, bytes]] = []
    try:
        ends = await log_end_offsets(consumer, list(since))
        for tp, start in since.items():
            consumer.seek(tp, start)
        while [tp for tp in since if await consumer.position(tp) < ends[tp]]:
            for records in (await consumer.getmany(*since, timeout_ms=200)).values():
                found += [(r.topic, r.value) for r in records if r.value is not None]
    finally:
        await consumer.stop()
    return found


async def _committed(settings: Settings, tp: TopicPartition) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap, client_id="ctxflow-memory")
    await admin.start()
    try:
        meta = (await admin.list_consumer_group_offsets(settings.app_id, partitions=[tp])).get(tp)
    finally:
        await admin.close()
    return -1 if meta is None else meta.offset


async def submit(settings: Settings, command: MemoryCommand, *, wait_s: float | None = 60.0,
                 progress: Callable[[str], None] = lambda _: None) -> Outcome | None:
    """Publish ``command``; with ``wait_s``, wait that long for the worker to apply it and return what it did
    (raises :class:`WorkerNotApplying` when it did not); None without waiting."""
    records_topic, letters_topic = settings.topic(MEMORY_RECORDS.name), settings.topic(DEAD_LETTERS.name)
    before = await _ends(settings, [records_topic, letters_topic])
    async with CtxflowClient.from_settings(settings, connect_timeout_s=5.0, client_id="ctxflow-memory") as client:
        tp, offset = await client.send_now(command)
    if wait_s is None:
        return None
    deadline = time.monotonic() + wait_s
    while (done := await _committed(settings, tp)) <= offset:
        behind = "nothing yet" if done < 0 else f"{offset - done + 1} record(s) to go"
        progress(f"waiting for the worker to apply command {command.command_id} ({tp.topic}[{tp.partition}]@"
                 f"{offset}: {behind})")
        if time.monotonic() > deadline:
            raise WorkerNotApplying(
                f"the worker has not applied command {command.command_id} within {wait_s:g} s (its group "
                f"{settings.app_id!r} committed {tp.topic}[{tp.partition}] up to {max(done, 0)}, the command is at "
                f"{offset}). Is a worker running? Start one with `ctxflow worker` (or `ctxflow up`); the command "
                "stays queued and is applied when a worker catches up: check later with `ctxflow memory show`.")
        await asyncio.sleep(0.25)
    return _outcome(settings, command, f"{tp.topic}:{tp.partition}:{offset}", await _read(settings, before))


def _outcome(settings: Settings, command: MemoryCommand, letter_id: str, found: list[tuple[str, bytes]]) -> Outcome:
    codec, outcome = Codec(settings.schema_registry_url, settings.max_content_bytes), Outcome(command)
    letters = settings.topic(DEAD_LETTERS.name)
    latest: dict[str, MemoryRecord] = {}
    for topic, value in found:
        try:
            if topic == letters:
                letter = codec.decode(value, DeadLetter)
                if letter.dead_letter_id == letter_id:
                    outcome.refused = letter.reason
            else:
                record = codec.decode(value, MemoryRecord)
                if record.tenant_id == command.tenant_id and _touched_by(record, command):
                    latest[record.memory_id] = record
        except RejectedRecord:
            continue
    outcome.records = list(latest.values())
    return outcome


def _touched_by(record: MemoryRecord, command: MemoryCommand) -> bool:
    """Whether ``record`` is one ``command`` wrote (records of other activity may have landed meanwhile)."""
    if command.memory_id is not None:
        return command.memory_id in (record.memory_id, record.supersedes)
    return record.updated_at >= command.issued_at and (record.reason or "").startswith(
        f"deleted by {command.issued_by}")
