"""Which input records the deciding workers accepted: the ClickHouse sink projects exactly those.

A worker refuses a record by dead-lettering it (the dead letter names the record's topic, partition and offset),
and commits an input offset only once every effect of the records below it is durable, their dead letters
included (:mod:`streams.runtime.pipeline`). So for an input partition whose workers' committed offset is ``C``: a
record below ``C`` that no dead letter names was accepted, one that a dead letter names was refused, and one at or
above ``C`` is undecided. To know that every dead letter of the records below ``C`` has been read,
:meth:`VerdictReader.refresh` reads ``C`` first, then the dead-letter topic's end offsets, and reads that topic up
to them (fetches return whole record batches, so reaching the end the broker reports reads every record it had
acknowledged when it answered, even where the embedded broker reports a batch's base offset).

That is how the sink writes turns, usage reports and run events without decoding them: the workers' decode and
processors are the contract, applied once, and ClickHouse holds what the budget counted (a record a processor
refuses, one older than the dedup window say, is in ``dead_letters`` only).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Literal

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from ctxflow.schemas.codec import Codec
from ctxflow.schemas.contract import RejectedRecord
from ctxflow.schemas.models import DeadLetter
from ctxflow.streams.config import Settings
from ctxflow.streams.topics import DEAD_LETTERS

log = logging.getLogger(__name__)

Verdict = Literal["accepted", "refused", "undecided"]


class Verdicts:
    """The workers' verdicts as far as they are known: per input partition, the offset below which every record is
    decided, and the decided records that were refused. Pure; :class:`VerdictReader` feeds it."""

    def __init__(self) -> None:
        self._decided: dict[tuple[str, int], int] = {}
        self._refused: dict[tuple[str, int], set[int]] = {}

    def refuse(self, topic: str, partition: int, offset: int) -> None:
        """A dead letter names this record."""
        self._refused.setdefault((topic, partition), set()).add(offset)

    def decide_below(self, topic: str, partition: int, offset: int) -> None:
        """The workers committed ``offset``: every record below it is decided (an older offset changes nothing)."""
        key = (topic, partition)
        self._decided[key] = max(offset, self._decided.get(key, 0))

    def verdict(self, topic: str, partition: int, offset: int) -> Verdict:
        """What the workers made of the record at this position, as far as known."""
        key = (topic, partition)
        if offset >= self._decided.get(key, 0):
            return "undecided"
        return "refused" if offset in self._refused.get(key, ()) else "accepted"

    def forget_below(self, topic: str, partition: int, offset: int) -> None:
        """Drop refusals below ``offset`` (the sink has passed them for good)."""
        refused = self._refused.get((topic, partition))
        if refused:
            refused.difference_update([o for o in refused if o < offset])


class VerdictReader:
    """Reads the deciding workers' committed offsets (group ``settings.app_id``) on ``topics`` and every dead letter,
    into ``verdicts``. Its dead-letter consumer belongs to no group: each sink reads them all."""

    def __init__(self, settings: Settings, topics: Iterable[str], verdicts: Verdicts) -> None:
        self.verdicts = verdicts
        self._group = settings.app_id
        self._topics = frozenset(topics)
        self._inputs = [TopicPartition(t, p) for t in sorted(self._topics) for p in range(settings.partitions)]
        self._letters = [TopicPartition(DEAD_LETTERS.full_name(settings), p)
                         for p in range(DEAD_LETTERS.partition_count(settings))]
        self._codec = Codec(settings.schema_registry_url)
        self._settings = settings
        # Clients are made in start(), on the loop that uses them.
        self._tail: AIOKafkaConsumer
        self._admin: AIOKafkaAdminClient

    async def start(self) -> None:
        """Connect, and read the dead letters from their first offsets."""
        settings = self._settings
        self._tail = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap, group_id=None, enable_auto_commit=False,
                                      fetch_max_wait_ms=settings.fetch_max_wait_ms)
        self._admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap)
        await self._tail.start()
        await self._admin.start()
        self._tail.assign(self._letters)
        await self._tail.seek_to_beginning(*self._letters)

    async def stop(self) -> None:
        """Disconnect."""
        await self._admin.close()
        await self._tail.stop()

    async def refresh(self) -> None:
        """Learn the workers' committed offsets, then every dead letter written before them (module docstring)."""
        committed = await self._admin.list_consumer_group_offsets(self._group, partitions=self._inputs)
        ends = await self._tail.end_offsets(self._letters)
        while [tp for tp in self._letters if await self._tail.position(tp) < ends[tp]]:
            fetched = await self._tail.getmany(*self._letters, timeout_ms=200)
            for record in (r for records in fetched.values() for r in records):
                self._note(record.value)
        for tp, meta in committed.items():
            if meta is not None and meta.offset > 0:
                self.verdicts.decide_below(tp.topic, tp.partition, meta.offset)

    def _note(self, value: bytes | None) -> None:
        try:
            letter = self._codec.decode(value, DeadLetter)  # type: ignore[arg-type]  (None is refused as such)
        except RejectedRecord as error:  # not one of ours: it names no record
            log.warning("a dead letter that does not decode names no record", extra={"reason": error.reason})
            return
        if letter.source_topic in self._topics:
            self.verdicts.refuse(letter.source_topic, letter.source_partition, letter.source_offset)
