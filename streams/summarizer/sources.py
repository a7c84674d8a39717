"""A compression job's sources, read from the log by position in bulk, decoded and checked.

A job carries no payload: each :class:`~schemas.models.CompressionSource` names where its content is (logical
topic ``turns`` for an original item, ``summaries`` for an earlier summary; partition; offset). For a batch of
jobs, :class:`SourceReader` reads every named position at once with one group-less consumer: the offsets wanted
in each partition are sorted and cut into ranges (a gap wider than ``max_gap`` offsets starts a new range, so
one far-away item does not make it read everything in between), the first range of every partition is read
concurrently, then the next, and so on. Records below a wanted offset are skipped: the embedded broker (Tansu)
answers a fetch at an offset with the whole stored batch that holds it, starting before it.

A position that is not on the log (a wrong offset, or one deleted by retention) must not make a read wait for
ever. The partition's end is asked once per read; Tansu reports it short (the base offset of the last batch
plus one, see :mod:`streams.runtime.log_end`), so a range at or past the reported end is read from the last
batch's base instead, whose fetch moves the position to the true end. A range is done when the position
passes its last offset or reaches the reported end (then everything after it did not exist when asked: a job
only names records produced before it). Whatever was not seen by then is missing.

:func:`resolve_sources` turns what was read into the summarizer's :class:`SourceItem` values, refusing the whole
job (:class:`JobRefused`, a dead letter's reason) when any source cannot be used as the job describes it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, TopicPartition
from ctxflow.processors.eviction.summarizer import MAX_DEPTH, SourceItem
from ctxflow.schemas.codec import Codec
from ctxflow.schemas.contract import ProcessingFailed, RejectedRecord
from ctxflow.schemas.models import CompressionJob, CompressionSource, Summary, TurnEvent, content_digest
from ctxflow.streams.config import Settings
from ctxflow.streams.topics import SUMMARIES, TURNS

#: Logical topics a source may name, and the record each holds.
SOURCE_MODELS: dict[str, type[TurnEvent] | type[Summary]] = {TURNS.name: TurnEvent, SUMMARIES.name: Summary}

#: (full topic, partition, offset)
Position = tuple[str, int, int]


class JobRefused(ProcessingFailed):
    """A valid job that cannot be summarized as described (a source unreadable, altered, private or too deep).

    Never retried: the worker dead-letters the job with this reason and goes on.
    """


class SourcesUnavailable(RuntimeError):
    """The broker did not serve the sources' partitions in time: transient, so the batch is tried again."""


@dataclass(frozen=True, slots=True)
class ReadStats:
    """What one :meth:`SourceReader.read` did: positions asked and found, ranges read, seconds taken."""

    wanted: int
    found: int
    ranges: int
    seconds: float


class SourceReader:
    """Reads records by position with one group-less consumer (it joins no group and commits nothing).

    Guarantees: :meth:`read` returns the value of every wanted position that is on the log and leaves out those
    that are not; it raises :class:`SourcesUnavailable` when the reads take longer than ``timeout_s``.
    """

    def __init__(self, settings: Settings, *, client_id: str, max_gap: int = 256, timeout_s: float = 30.0) -> None:
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.bootstrap, client_id=client_id, group_id=None, enable_auto_commit=False,
            # A position before the log's first offset (deleted by retention) reads on from the first one, so the
            # range ends and its record counts as missing.
            auto_offset_reset="earliest",
            fetch_max_wait_ms=settings.fetch_max_wait_ms,
        )
        self._max_gap = max_gap
        self._timeout_s = timeout_s
        self.last = ReadStats(0, 0, 0, 0.0)

    async def start(self) -> None:
        await self._consumer.start()

    async def stop(self) -> None:
        await self._consumer.stop()

    async def read(self, positions: Iterable[Position]) -> dict[Position, bytes | None]:
        """The value at each position found on the log (``None`` for a record without a value)."""
        began = time.perf_counter()
        wanted: dict[TopicPartition, list[int]] = {}
        for topic, partition, offset in set(positions):
            wanted.setdefault(TopicPartition(topic, partition), []).append(offset)
        ranges = {tp: _ranges(sorted(offsets), self._max_gap) for tp, offsets in wanted.items()}
        found: dict[Position, bytes | None] = {}
        if wanted:
            try:
                async with asyncio.timeout(self._timeout_s):
                    await self._read_ranges(ranges, found)
            except TimeoutError as error:
                raise SourcesUnavailable(
                    f"reading {sum(map(len, wanted.values()))} source records from {len(wanted)} partitions took "
                    f"longer than {self._timeout_s:.0f}s"
                ) from error
        self.last = ReadStats(
            sum(map(len, wanted.values())), len(found), sum(map(len, ranges.values())), time.perf_counter() - began
        )
        return found

    async def _read_ranges(self, ranges: dict[TopicPartition, list[tuple[int, int]]],
                           found: dict[Position, bytes | None]) -> None:
        consumer = self._consumer
        tps = list(ranges)
        reported = await consumer.end_offsets(tps)
        consumer.assign(tps)
        wanted = {tp: {o for start, end in spans for o in range(start, end + 1)} for tp, spans in ranges.items()}
        todo = {tp: list(spans) for tp, spans in ranges.items()}

        def begin(tp: TopicPartition) -> None:
            start = todo[tp][0][0]
            # At or past the reported end, start at the last batch's base so that its fetch reaches the true end.
            consumer.seek(tp, max(0, min(start, reported[tp] - 1)))

        for tp in tps:
            begin(tp)
        active = set(tps)
        while active:
            # Done ranges first: a seek or an empty partition may leave nothing to fetch.
            for tp in list(active):
                position = await consumer.position(tp)
                while todo[tp] and (position > todo[tp][0][1] or position >= reported[tp]):
                    todo[tp].pop(0)
                    if todo[tp]:
                        begin(tp)
                        position = await consumer.position(tp)
                if not todo[tp]:
                    active.discard(tp)
                    consumer.pause(tp)
            if not active:
                break
            fetched = await consumer.getmany(*active, timeout_ms=500)
            for tp, records in fetched.items():
                want = wanted[tp]
                for record in records:
                    if record.offset in want:  # a batch may start before the wanted offset
                        found[(tp.topic, tp.partition, record.offset)] = record.value


def _ranges(offsets: list[int], max_gap: int) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    for offset in offsets:
        if spans and offset - spans[-1][1] <= max_gap:
            spans[-1] = (spans[-1][0], offset)
        else:
            spans.append((offset, offset))
    return spans


class SourceTopics:
    """The deployment's source topics: full names and partition counts (``streams.topics``, ``Settings``)."""

    def __init__(self, settings: Settings) -> None:
        self._topics = {spec.name: (spec.full_name(settings), spec.partition_count(settings))
                        for spec in (TURNS, SUMMARIES)}

    def position(self, source: CompressionSource) -> Position | None:
        """Where ``source`` lives as a full topic position; None when no such topic or partition can hold it
        (never read: asking a broker for a partition that does not exist waits for ever)."""
        topic, partitions = self._topics.get(source.topic, ("", 0))
        return (topic, source.partition, source.offset) if source.partition < partitions else None


def resolve_sources(job: CompressionJob, values: Mapping[Position, bytes | None], codec: Codec,
                    topics: SourceTopics) -> list[SourceItem]:
    """The job's sources as summarizer inputs, in the job's order; raises :class:`JobRefused` naming the first
    source that cannot be used and why. Content never appears in a reason."""
    if not job.sources:
        raise JobRefused("the job names no sources", tenant_id=job.tenant_id)
    items = [_resolve(job, source, values, codec, topics) for source in job.sources]
    depth = max(item.depth for item in items) + 1
    if depth > MAX_DEPTH:
        raise JobRefused(
            f"the summary would be {depth} deep: summaries nest at most {MAX_DEPTH} deep (a source is already a "
            f"depth-{depth - 1} summary); evict or offload those sources instead",
            tenant_id=job.tenant_id,
        )
    return items


def _resolve(job: CompressionJob, source: CompressionSource, values: Mapping[Position, bytes | None],
             codec: Codec, topics: SourceTopics) -> SourceItem:
    where = f"source {source.item_id} at {source.topic}[{source.partition}]@{source.offset}"

    def refuse(why: str) -> JobRefused:
        return JobRefused(f"{where}: {why}", tenant_id=job.tenant_id)

    model = SOURCE_MODELS.get(source.topic)
    if model is None:
        raise refuse(f"sources are read from {' or '.join(SOURCE_MODELS)}, not {source.topic!r}")
    position = topics.position(source)
    if position is None:
        raise refuse("the topic has no such partition")
    if position not in values:
        raise refuse("no record at that position (a wrong position, or deleted by retention)")
    value = values[position]
    if value is None:
        raise refuse("the record has no value")
    try:
        record = codec.decode(value, model)
    except RejectedRecord as error:
        raise refuse(f"the record is not a valid {model.__name__} ({error.reason_code}: {error.reason})") from error
    if record.tenant_id != job.tenant_id:
        # The other tenant is not named: this dead letter belongs to the job's tenant.
        raise refuse("the record belongs to another tenant")
    if isinstance(record, TurnEvent):
        if record.item_id != source.item_id:
            raise refuse(f"the record is item {record.item_id}, not the job's item")
        if record.content is None:
            raise refuse(f"the turn carries no content (privacy {record.privacy.value}): only retained content can "
                         "be summarized")
        text, depth, role = record.content, 0, record.role.value
    else:
        text, depth, role = record.text, record.depth, ""
    if depth != source.depth:
        raise refuse(f"the record is {depth} deep, the job says {source.depth}")
    if content_digest(text) != source.content_digest:
        raise refuse("its content's sha256 differs from the job's content_digest: the log holds other content than "
                     "the planner saw")
    return SourceItem(item_id=source.item_id, text=text, depth=depth, role=role, label=source.label or "")
