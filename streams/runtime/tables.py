"""The budget token tables as Faust tables, and the store that persists them in the safe order.

Seven changelog-backed tables hold the state of the tenants whose partitions this worker owns: run ledgers
(the authority for dedup), tenant and user spend ledgers, workflow ledgers, remembered static-item token
counts, tenant manifests, and the tenants' event-time watermarks (:mod:`processors.retention`). Values are
domain objects in memory; each table has a codec that writes them to its changelog compactly and reads them
back on recovery.

Why not ``table[key] = value``: Faust would produce one changelog record per assignment, to the partition of
the *current* event. A batch spans partitions, and the crash argument in :mod:`processors.ledger` needs the
aggregates durable before the run ledgers. :class:`TableBudgetStore` therefore writes the in-memory store
directly, remembers each dirty key with the partition of the record that wrote it, and :meth:`persist`
produces one changelog record per dirty key: aggregates first (awaiting their acks), then run ledgers, then the
chain processors' tables (:class:`processors.chain.TableSpec`), each its own phase and later processors first
(envelope states, then the planner's working sets: :mod:`processors.chain` says why), then watermarks. A
retired (deleted) key is written as a tombstone, a null value, which every reader of the changelogs applies as a
deletion (Faust's recovery, the bulk preload in :mod:`streams.runtime.recovery`).

The records go out through :class:`BatchProducer` (aiokafka's batch API), not Faust's ``Topic.send``: a large
batch dirties thousands of keys, and a record costs ~1.3 us of CPU that way against ~12 us through
``AIOKafkaProducer.send`` and ~25 us through a Faust topic (measured here). They are the same records Faust
would write (same topic, key and value codecs), so Faust's table recovery reads them back unchanged.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable
from typing import Any

import faust
from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.producer.message_accumulator import BatchBuilder
from ctxflow.processors.chain import TableSpec
from ctxflow.processors.ledger import RunLedger, WorkflowLedger
from ctxflow.processors.retention import Watermark
from ctxflow.processors.types import StaticCount
from ctxflow.processors.windows import SpendLedger
from ctxflow.schemas.models import TenantManifest
from ctxflow.streams.runtime.snapshots import HeldValues
from faust.serializers.codecs import Codec

_DUMP = json.JSONEncoder(separators=(",", ":")).encode


class _ValueCodec(Codec):
    """JSON through a domain object's own snapshot functions."""

    def __init__(self, dump: Callable[[Any], Any], load: Callable[[Any], Any]) -> None:
        super().__init__()
        self._dump, self._load = dump, load

    def _dumps(self, obj: Any) -> bytes:
        return _DUMP(self._dump(obj)).encode()

    def _loads(self, s: bytes) -> Any:
        return self._load(json.loads(s))


class _Utf8(Codec):
    def _dumps(self, obj: Any) -> bytes:
        return obj.encode() if isinstance(obj, str) else bytes(obj)

    def _loads(self, s: bytes) -> Any:
        return s.decode()


class _BytesCodec(Codec):
    """A chain processor's table: its values' own bytes form (:class:`processors.chain.TableSpec`)."""

    def __init__(self, dump: Callable[[Any], bytes], load: Callable[[bytes], Any]) -> None:
        super().__init__()
        self._dump, self._load = dump, load

    def _dumps(self, obj: Any) -> bytes:
        return self._dump(obj)

    def _loads(self, s: bytes) -> Any:
        return self._load(s)


class _ManifestCodec(Codec):
    def _dumps(self, obj: Any) -> bytes:
        return obj.model_dump_json().encode()

    def _loads(self, s: bytes) -> Any:
        return TenantManifest.model_validate_json(s)


#: Table name -> value codec. Order matters only in AGGREGATES / RUNS below.
VALUE_CODECS: dict[str, Codec] = {
    "runs": _ValueCodec(RunLedger.to_list, RunLedger.from_list),
    "tenants": _ValueCodec(SpendLedger.to_dict, SpendLedger.from_dict),
    "users": _ValueCodec(SpendLedger.to_dict, SpendLedger.from_dict),
    "workflows": _ValueCodec(WorkflowLedger.to_dict, WorkflowLedger.from_dict),
    "counts": _ValueCodec(StaticCount.to_list, StaticCount.from_json),
    "manifests": _ManifestCodec(),
    "watermarks": _ValueCodec(Watermark.to_list, Watermark.from_list),
}
#: Persisted before run ledgers: see the crash argument in processors.ledger.
AGGREGATES = ("manifests", "counts", "tenants", "users", "workflows")
RUNS = ("runs",)
#: Persisted after run ledgers: a watermark never covers a record whose effects are not durable
#: (processors.retention).
MARKS = ("watermarks",)


#: ``(topic, partition or None for the key's default partition, key, value)``
OutRecord = tuple[str, int | None, bytes | None, bytes | None]


class BatchProducer:
    """Produces records through one aiokafka producer, one record batch per topic partition.

    :meth:`send` returns once the broker acknowledged every record (order kept per partition); it raises
    if any record failed, in which case some others may have been written (callers replay idempotently).
    A record without a partition goes where aiokafka's default partitioner puts its key (murmur2, as for
    every other producer of ctxflow topics).
    """

    def __init__(self, producer: AIOKafkaProducer, *, last_record_alone: bool = False,
                 on_acked: Callable[[str, int, int, int], None] | None = None) -> None:
        self._producer = producer
        self._last_alone = last_record_alone
        #: Told ``(topic, partition, base offset, records)`` of every acknowledged batch, in the order shipped
        #: (:class:`streams.runtime.snapshots.ChangelogPositions`).
        self._on_acked = on_acked
        self._partitioner = DefaultPartitioner()
        self._partitions: dict[str, list[int]] = {}

    async def send(self, records: Iterable[OutRecord]) -> int:
        """Produce ``records`` and wait for all acknowledgements; returns how many were sent."""
        groups: dict[tuple[str, int], list[tuple[bytes | None, bytes | None]]] = {}
        for topic, partition, key, value in records:
            if partition is None:
                partition = await self._partition_of(topic, key)
            groups.setdefault((topic, partition), []).append((key, value))
        pending: list[tuple[asyncio.Future[Any], int]] = []
        for (topic, partition), items in groups.items():
            if not self._last_alone:
                pending += await self._ship(topic, partition, items)
                continue
            # Tansu answers ListOffsets(latest) with the last *batch's* base offset + 1, so a reader that stops
            # at the end offsets (Faust's table recovery) would miss the rest of a multi-record last batch. It
            # costs a second produce round trip per partition (aiokafka holds one batch per partition until it
            # is drained), which is why only changelog producers ask for it.
            for chunk in (items[:-1], items[-1:]):
                if chunk:
                    pending += await self._ship(topic, partition, chunk)
        if pending:
            await asyncio.gather(*(future for future, _ in pending))
            if self._on_acked is not None:
                for future, count in pending:
                    meta = future.result()
                    self._on_acked(meta.topic, meta.partition, meta.offset, count)
        return sum(len(items) for items in groups.values())

    async def _ship(self, topic: str, partition: int, items: list[tuple[bytes | None, bytes | None]]
                    ) -> list[tuple[asyncio.Future[Any], int]]:
        """Ship ``items`` as one or more batches; returns each batch's future with its record count."""
        producer, futures = self._producer, []
        batch: BatchBuilder = producer.create_batch()
        count = 0
        for key, value in items:
            if batch.append(key=key, value=value, timestamp=None) is None:  # full: ship it, start another
                futures.append((await producer.send_batch(batch, topic, partition=partition), count))
                batch, count = producer.create_batch(), 0
                if batch.append(key=key, value=value, timestamp=None) is None:
                    raise ValueError(f"a record of {len(value or b'')} bytes exceeds the producer's batch size")
            count += 1
        futures.append((await producer.send_batch(batch, topic, partition=partition), count))
        return futures

    async def _partition_of(self, topic: str, key: bytes | None) -> int:
        partitions = self._partitions.get(topic)
        if partitions is None:
            partitions = self._partitions[topic] = sorted(await self._producer.partitions_for(topic))
        return int(self._partitioner(key, partitions, partitions))


def value_codecs(specs: Iterable[TableSpec] = ()) -> dict[str, Codec]:
    """Every table's value codec: the budget's and those of the chain's processors (``specs``)."""
    return {**VALUE_CODECS, **{spec.name: _BytesCodec(spec.dump, spec.load) for spec in specs}}


def declare_tables(app: faust.App, partitions: int, specs: Iterable[TableSpec] = ()) -> dict[str, faust.Table]:
    """Create the budget tables and the chain processors' (``specs``) on ``app``, co-partitioned with the
    tenant-keyed input topics."""
    tables = {}
    for name, codec in value_codecs(specs).items():
        # Faust derives a changelog's serializers from model types; ours are plain domain objects with their own
        # codecs, so the changelog topic is declared here with them (same name and settings Faust would use).
        changelog = app.topic(
            f"{app.conf.id}-budget-{name}-changelog",
            schema=faust.Schema(key_serializer=_Utf8(), value_serializer=codec),
            partitions=partitions,
            compacting=True,
            deleting=False,
            internal=True,
        )
        tables[name] = app.Table(
            f"budget-{name}", default=None, partitions=partitions, changelog_topic=changelog,
            help=f"ctxflow budget {name}",
        )
    return tables


class TableBudgetStore:
    """:class:`processors.types.BudgetStore` over Faust tables, persisted in the crash-safe order.

    Set :attr:`partition` to the source partition of the record before processing it: every value the
    record writes is persisted to that changelog partition (a tenant's keys live in its input partition).
    """

    def __init__(self, tables: dict[str, faust.Table], producer: BatchProducer) -> None:
        self._tables = tables
        self._producer = producer
        self._changelogs = {name: table.changelog_topic.get_topic_name() for name, table in tables.items()}
        # The memory store's plain dicts: the hot path reads and writes them directly; ``_key_partition`` is
        # how the store drops keys of partitions this worker no longer owns after a rebalance.
        self._data = {name: table.data.data for name, table in tables.items()}
        self._key_partition = {name: table.data._key_partition for name, table in tables.items()}
        self._dirty: dict[str, dict[str, int]] = {name: {} for name in tables}
        self._codecs = {name: table.changelog_topic.schema.value_serializer for name, table in tables.items()}
        self._processors = tuple(name for name in tables if name not in VALUE_CODECS)
        self.partition = 0

    def _get(self, name: str, key: str) -> Any:
        return self._data[name].get(key)

    def _put(self, name: str, key: str, value: Any) -> None:
        self._data[name][key] = value
        self._dirty[name][key] = self._key_partition[name][key] = self.partition

    def _delete(self, name: str, key: str) -> None:
        # Dirty with no value: captured as a tombstone on the partition of the record that retired it.
        self._data[name].pop(key, None)
        self._key_partition[name].pop(key, None)
        self._dirty[name][key] = self.partition

    def get_run(self, key: str) -> RunLedger | None:
        return self._get("runs", key)

    def put_run(self, key: str, value: RunLedger) -> None:
        self._put("runs", key, value)

    def get_tenant(self, key: str) -> SpendLedger | None:
        return self._get("tenants", key)

    def put_tenant(self, key: str, value: SpendLedger) -> None:
        self._put("tenants", key, value)

    def get_user(self, key: str) -> SpendLedger | None:
        return self._get("users", key)

    def put_user(self, key: str, value: SpendLedger) -> None:
        self._put("users", key, value)

    def get_workflow(self, key: str) -> WorkflowLedger | None:
        return self._get("workflows", key)

    def put_workflow(self, key: str, value: WorkflowLedger) -> None:
        self._put("workflows", key, value)

    def get_manifest(self, key: str) -> TenantManifest | None:
        return self._get("manifests", key)

    def put_manifest(self, key: str, value: TenantManifest) -> None:
        self._put("manifests", key, value)

    def get_count(self, key: str) -> StaticCount | None:
        return self._get("counts", key)

    def put_count(self, key: str, value: StaticCount) -> None:
        self._put("counts", key, value)

    def get_watermark(self, key: str) -> Watermark | None:
        return self._get("watermarks", key)

    def put_watermark(self, key: str, value: Watermark) -> None:
        self._put("watermarks", key, value)

    def delete_run(self, key: str) -> None:
        self._delete("runs", key)

    def delete_workflow(self, key: str) -> None:
        self._delete("workflows", key)

    def get_state(self, table: str, key: str) -> Any:
        return self._get(table, key)

    def put_state(self, table: str, key: str, value: Any) -> None:
        self._put(table, key, value)

    def delete_state(self, table: str, key: str) -> None:
        self._delete(table, key)

    def run_items(self) -> Iterable[tuple[str, RunLedger]]:
        return self._data["runs"].items()

    @property
    def recoveries(self) -> int:
        """How many table recoveries have completed (values reloaded from changelogs) since the start."""
        return sum(getattr(table, "recoveries", 0) for table in self._tables.values())

    def dirty_runs(self) -> list[tuple[str, RunLedger]]:
        """The run ledgers written (and not retired) since the last :meth:`capture_changelogs` (for projections)."""
        data = self._data["runs"]
        return [(key, data[key]) for key in self._dirty["runs"] if key in data]

    def live_keys(self) -> int:
        """How many values the tables hold."""
        return sum(len(data) for data in self._data.values())

    def items(self, table: str) -> list[tuple[str, object]]:
        """Every ``(key, value)`` one table holds now (a copy: the caller may await while reading it)."""
        return list(self._data[table].items())

    def keys_by_table(self) -> dict[str, int]:
        """How many values each table holds."""
        return {name: len(data) for name, data in self._data.items()}

    def held_values(self) -> list[HeldValues] | None:
        """Every held value by table and changelog partition (a shallow copy, for a snapshot), or None while
        some value is written and not yet captured: the tables are then ahead of what any changelog can hold."""
        if any(self._dirty.values()):
            return None
        held: dict[tuple[str, int], HeldValues] = {}
        for name, data in self._data.items():
            topic, partitions, dumps = self._changelogs[name], self._key_partition[name], self._codecs[name].dumps
            for key, value in data.items():
                partition = partitions.get(key)
                if partition is None:  # not from any changelog partition this worker knows: no snapshot now
                    return None
                values = held.get((topic, partition))
                if values is None:
                    values = held[(topic, partition)] = HeldValues(topic, partition, [], dumps)
                values.items.append((key, value))
        return list(held.values())

    def capture_changelogs(self) -> tuple[list[OutRecord], ...]:
        """Encode every dirty value now (aggregates, run ledgers, each chain processor's table with later processors
        first, watermarks: the order they are persisted in, one phase each) and forget that they were dirty.

        Later writes to the tables do not change what was captured, so a batch's changelog can be written
        while the next batch is processed.
        """
        return (
            self._changelog_records(AGGREGATES), self._changelog_records(RUNS),
            *(self._changelog_records((name,)) for name in reversed(self._processors)),
            self._changelog_records(MARKS),
        )

    async def write_changelogs(self, records: list[OutRecord]) -> int:
        """Produce captured changelog records and await their acks (the caller keeps the commit order)."""
        return await self._producer.send(records)

    def _changelog_records(self, names: Iterable[str]) -> list[OutRecord]:
        records: list[OutRecord] = []
        for name in names:
            topic, dumps = self._changelogs[name], self._codecs[name].dumps
            data, dirty = self._data[name], self._dirty[name]
            records += [
                (topic, partition, key.encode(), None if (value := data.get(key)) is None else dumps(value))
                for key, partition in dirty.items()
            ]
            dirty.clear()
        return records
