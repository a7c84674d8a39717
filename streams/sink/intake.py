"""What the ClickHouse sink does with each fetched record: write it, skip it, or hold it until the workers decide.

Records of the topics the deciding workers consume (turns, usage reports, run events) follow the workers'
verdicts (:mod:`.verdict`): accepted ones are buffered by their Avro bodies without a decode
(:meth:`~sinks.clickhouse.ClickHouseSink.add_avro`, else decoded), refused ones are skipped, undecided ones are
held, in offset order, until a verdict comes. Records the workers produce (decisions, dead letters, ...) are
decoded under the workers' contract (:func:`streams.runtime.decode.decode_record`) and buffered. A record that
is refused or does not decode is counted and skipped, with one log line per batch; it never stops the sink.

``pending`` is, per partition, the offset after the last record written to the buffer or skipped: what a commit
may cover once the buffer is flushed. Held records are never covered.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from aiokafka import ConsumerRecord, TopicPartition
from ctxflow.schemas.codec import Codec
from ctxflow.schemas.contract import RejectedRecord
from ctxflow.sinks.clickhouse import ENCODED_TYPES, ClickHouseSink
from ctxflow.streams.runtime.decode import decode_record
from ctxflow.streams.sink.verdict import Verdicts
from pydantic import BaseModel

log = logging.getLogger(__name__)

REFUSED = "refused_by_workers"


@dataclass(frozen=True, slots=True)
class Route:
    """How the sink treats one topic's records: their type, whether their key must be their tenant, and whether
    the deciding workers' verdicts decide them."""

    model: type[BaseModel]
    keyed: bool
    decided_by_workers: bool


class SinkIntake:
    """Routes fetched records into ``sink`` (see the module docstring). No I/O; one thread."""

    def __init__(self, sink: ClickHouseSink, codec: Codec, routes: dict[str, Route], verdicts: Verdicts) -> None:
        self.sink = sink
        self.verdicts = verdicts
        self.pending: dict[TopicPartition, int] = {}
        self.skipped = 0
        self._codec = codec
        self._routes = routes
        self._held: dict[TopicPartition, deque[ConsumerRecord]] = {}
        self._held_count = 0  # kept apart: status() reads it from other threads while _held changes
        self._encoded = frozenset(ENCODED_TYPES)

    @property
    def held(self) -> int:
        """Records waiting for the workers' verdict (any thread may ask)."""
        return self._held_count

    def take(self, records: Iterable[ConsumerRecord]) -> None:
        """Buffer, skip or hold every record, in the order given (offset order per partition)."""
        skipped: Counter[str] = Counter()
        for record in records:
            tp = TopicPartition(record.topic, record.partition)
            route = self._routes[record.topic]
            if route.decided_by_workers and (tp in self._held or self._undecided(record)):
                self._held.setdefault(tp, deque()).append(record)
                self._held_count += 1
            else:
                self._place(record, tp, route, skipped)
        self._report(skipped)

    def release(self) -> None:
        """Place the held records the workers have decided since (each partition's in offset order)."""
        skipped: Counter[str] = Counter()
        for tp, held in list(self._held.items()):
            while held and not self._undecided(held[0]):
                self._place(held.popleft(), tp, self._routes[tp.topic], skipped)
                self._held_count -= 1
            if not held:
                del self._held[tp]
        self._report(skipped)

    def committed(self, offsets: dict[TopicPartition, int]) -> None:
        """These offsets are committed: forget the refusals below them."""
        for tp, offset in offsets.items():
            self.verdicts.forget_below(tp.topic, tp.partition, offset)

    def forget(self, partitions: Sequence[TopicPartition]) -> None:
        """Partitions revoked: their held records and pending offsets go (their new owner reads them again)."""
        for tp in partitions:
            self._held_count -= len(self._held.pop(tp, ()))
            self.pending.pop(tp, None)

    def _undecided(self, record: ConsumerRecord) -> bool:
        return self.verdicts.verdict(record.topic, record.partition, record.offset) == "undecided"

    def _place(self, record: ConsumerRecord, tp: TopicPartition, route: Route, skipped: Counter[str]) -> None:
        self.pending[tp] = record.offset + 1
        if route.decided_by_workers:
            if self.verdicts.verdict(record.topic, record.partition, record.offset) == "refused":
                skipped[REFUSED] += 1
                return
            if record.value is not None and self.sink.add_avro(record.value, record.offset):
                return
        try:
            event = decode_record(self._codec, record.value, record.key, route.model, keyed=route.keyed)
        except RejectedRecord as error:
            skipped[error.reason_code] += 1
            return
        if type(event) in self._encoded:  # their tables keep the offset: the first copy of an identity wins
            self.sink.add_encoded(event, record.value, record.offset)  # type: ignore[arg-type]  (decoded: not None)
        else:
            self.sink.add(event)

    def _report(self, skipped: Counter[str]) -> None:
        if skipped:
            self.skipped += sum(skipped.values())
            # Refusals are the workers' (each has its dead letter); a record that reached here and does not
            # decode is worth a warning.
            level = logging.INFO if set(skipped) == {REFUSED} else logging.WARNING
            log.log(level, "sink skipped records (the workers dead-letter them)", extra={
                "count": sum(skipped.values()), "reasons": dict(skipped)})
