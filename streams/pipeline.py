"""One batch of input records, end to end: decode, decide, project, persist.

This is the imperative shell around :mod:`processors`; it knows nothing of Faust. The Faust agent in
:mod:`streams.worker` hands it a batch and acknowledges the batch only after :meth:`BudgetPipeline.handle`
returns, so Faust never commits an offset whose effects are not durable.

Commit order (each step starts after the previous one is durable):

1. decode every record; refusals become dead letters (never a log line);
2. apply the records to the budget processor in offset order, collecting decisions;
3. produce decisions and dead letters to Kafka, and flush the ClickHouse sink (ingested events, decisions,
   dead letters) — concurrently; wait for both;
4. persist the token tables: aggregate changelogs, await acks; then run-ledger changelogs, await acks
   (the order the crash argument in :mod:`processors.ledger` relies on);
5. project run headroom and decisions into Redis (absolute values: a replay rewrites the same fields);
6. return, so the agent acknowledges the batch and Faust may commit its offsets.

A crash anywhere before 6 replays the batch from the last commit. Every effect is idempotent under replay:
ClickHouse rows collapse by event identity, decisions and dead letters carry deterministic ids, table values
skip records they already hold.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from pydantic import BaseModel

from processors.admission import TOTAL, RunHeadroom
from processors.budget import BudgetProcessor
from processors.manifest import SLOTS, ManifestError
from processors.types import InvalidTenantError, Position
from schemas.codec import Codec
from schemas.contract import ContractViolation, ProcessingFailed, RejectedRecord
from schemas.models import (
    AdmissionRequest,
    DeadLetter,
    Decision,
    RunEvent,
    TenantManifest,
    TurnEvent,
    UsageReport,
)
from sinks.clickhouse import ClickHouseSink
from sinks.redis import RedisProjection
from streams.deadletter import dead_letter
from streams.tables import TableBudgetStore
from streams.topics import DEAD_LETTERS, DECISIONS

log = logging.getLogger(__name__)

#: Logical input topic -> the record type it carries.
INPUT_MODELS: dict[str, type[BaseModel]] = {
    "turns": TurnEvent,
    "usage": UsageReport,
    "runs": RunEvent,
    "admissions": AdmissionRequest,
    "manifests": TenantManifest,
}
#: Records that are also analytics rows in ClickHouse.
_SUNK = (TurnEvent, UsageReport, RunEvent)

#: ``send(topic_spec_name, key, value)`` produces a record and returns an awaitable acknowledgement.
Send = Callable[[str, str, bytes], Awaitable[Awaitable[object]]]


@dataclass(frozen=True, slots=True)
class InputRecord:
    """One consumed record: logical topic, position, key and raw value bytes."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


@dataclass(slots=True)
class BatchReport:
    """What one batch did (for logs, progress and benchmarks)."""

    records: int = 0
    decisions: list[Decision] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    changelog_records: int = 0
    seconds: float = 0.0


class BudgetPipeline:
    """Runs batches through the budget processor and every projection, in the commit order above."""

    def __init__(
        self,
        *,
        codec: Codec,
        processor: BudgetProcessor,
        store: TableBudgetStore,
        sink: ClickHouseSink,
        redis: RedisProjection,
        send: Send,
        full_topic: Callable[[str], str],
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._codec = codec
        self._processor = processor
        self._store = store
        self._sink = sink
        self._redis = redis
        self._send = send
        self._full_topic = full_topic
        self._clock = clock

    async def handle(self, records: Sequence[InputRecord]) -> BatchReport:
        """Process ``records`` (in consumption order); returns once every effect is durable."""
        started = time.perf_counter()
        now = self._clock()
        report = BatchReport(records=len(records))
        for record in records:
            self._apply(record, now, report)
        acks = [
            await self._send(DECISIONS.name, f"{d.tenant_id}:{d.run_id or '-'}", self._codec.encode(d))
            for d in report.decisions
        ]
        acks += [
            await self._send(DEAD_LETTERS.name, dl.source_topic, self._codec.encode(dl))
            for dl in report.dead_letters
        ]
        for row in (*report.decisions, *report.dead_letters):
            self._sink.add(row)
        await asyncio.gather(asyncio.to_thread(self._sink.flush), *acks)
        headrooms = self._headrooms()  # before persist(), which forgets which runs were written
        report.changelog_records = await self._store.persist()
        await self._redis.write(headrooms, report.decisions)
        report.seconds = time.perf_counter() - started
        if report.dead_letters:
            log.warning(
                "dead-lettered records", extra={"count": len(report.dead_letters), "batch": report.records}
            )
        return report

    def _apply(self, record: InputRecord, now: datetime, report: BatchReport) -> None:
        try:
            event = self._decode(record)
            self._store.partition = record.partition
            position = Position(record.topic, record.partition, record.offset)
            report.decisions.extend(self._processor.process(event, position, self._store, now))
        except RejectedRecord as error:
            report.dead_letters.append(self._dead_letter(record, error, now))
            return
        except (ManifestError, InvalidTenantError) as error:
            report.dead_letters.append(self._dead_letter(record, ContractViolation(str(error)), now))
            return
        except Exception as error:  # a processor bug must not stop the tenant's stream: dead-letter it
            log.exception("processor failed", extra={"topic": record.topic, "offset": record.offset})
            failure = ProcessingFailed(f"{type(error).__name__}: {error}")
            report.dead_letters.append(self._dead_letter(record, failure, now))
            return
        if isinstance(event, _SUNK):
            self._sink.add(event)

    def _decode(self, record: InputRecord) -> BaseModel:
        if record.value is None:
            raise ContractViolation("record has no value (a null value is not a ctxflow record)")
        event = self._codec.decode(record.value, INPUT_MODELS[record.topic])
        tenant_id: str = event.tenant_id  # type: ignore[attr-defined]
        if record.key is not None and record.key.decode(errors="replace") != tenant_id:
            raise ContractViolation(
                f"record key {record.key!r} is not its tenant_id {tenant_id!r}: key tenant records by tenant_id "
                "so one partition owns each tenant",
                tenant_id=tenant_id,
            )
        return event

    def _dead_letter(self, record: InputRecord, error: RejectedRecord, now: datetime) -> DeadLetter:
        return dead_letter(
            error,
            topic=self._full_topic(record.topic),
            partition=record.partition,
            offset=record.offset,
            original=record.value or b"",
            failed_at=now,
        )

    def _headrooms(self) -> list[tuple[str, str, RunHeadroom]]:
        out = []
        for key, ledger in self._store.dirty_runs():
            tenant_id, run_id = key.split(":", 1)
            budget = self._processor.budget(self._store, tenant_id, None)
            used = {slot.value: ledger.tokens[i] for i, slot in enumerate(SLOTS)}
            used[TOTAL] = ledger.working_set()
            hard = {slot.value: limit.hard_at for slot, limit in zip(SLOTS, budget.slot_limits, strict=True) if limit}
            hard[TOTAL] = budget.total.hard_at
            out.append((tenant_id, run_id, RunHeadroom(used, hard, budget.manifest_version)))
        return out
