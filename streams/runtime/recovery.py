"""Table recovery in bulk: changelog partitions read straight into the tables before Faust's recovery runs.

Faust recovers a table by passing every changelog record through its consumer, conductor, changelog queue
and events, one at a time, and the memory store forgets on every restart how far it had read,
so it starts again at offset 0. Tansu never compacts, so a worker holding 100,000 runs re-read every write
of every run ledger that way: a minute to restart.

:class:`PreloadingTableManager` reads the changelog partitions this worker is assigned with a plain aiokafka
consumer first and applies it to the memory store as Faust's store does (a later record of a key replaces it;
a null value, the tombstone of a retired value, deletes it). Only the last value of each key is decoded, with
the table's own value codec (the same bytes Faust would decode): the log holds every write of every run ever
seen and the tombstones of the retired ones, and decoding a value that a later record replaces or deletes is
wasted work. It reads to the true end of each partition (:mod:`streams.runtime.log_end`) and records the last
offset it applied; :class:`PreloadedTable` reports that offset as the table's persisted offset, so Faust's own
recovery then reads only what was written after the preload, usually nothing.

A preloaded offset is forgotten when its partition leaves this worker (the memory store drops the keys of
partitions it no longer owns after every recovery), so a partition that comes back is read from offset 0.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import time
from collections.abc import Iterable
from concurrent.futures import Future
from typing import Any, cast

import faust
from aiokafka import AIOKafkaConsumer, TopicPartition
from ctxflow.streams.runtime.log_end import log_end_offsets
from ctxflow.streams.runtime.snapshots import (
    MIN_RECORDS,
    RECORDS_PER_LIVE_KEY,
    Snapshot,
    SnapshotFiles,
    TableSnapshots,
)
from ctxflow.streams.runtime.transport import ShortFetchApp
from faust.tables import TableManager
from faust.types import TP

log = logging.getLogger(__name__)

#: Records per fetch while preloading (bounded memory; large enough to amortise each round trip).
_MAX_RECORDS = 20_000


class PreloadedTable(faust.Table):
    """A Faust table whose changelog partitions may already be applied up to an offset by the preload."""

    _preloaded: dict[TP, int] | None = None
    #: Recoveries completed: a store reading the table (the retirement index) rebuilds what it derived from it.
    recoveries = 0

    @property
    def preloaded(self) -> dict[TP, int]:
        """Changelog partition -> last offset applied by the preload (read by Faust's recovery)."""
        if self._preloaded is None:
            self._preloaded = {}
        return self._preloaded

    def persisted_offset(self, tp: TP) -> int | None:
        return self.preloaded.get(tp)

    async def on_recovery_completed(self, active_tps: set[TP], standby_tps: set[TP]) -> None:
        await super().on_recovery_completed(active_tps, standby_tps)
        self.recoveries += 1
        # The memory store has just dropped the keys of partitions that are no longer active here.
        active = {tp.partition for tp in active_tps}
        for tp in [tp for tp in self.preloaded if tp.partition not in active]:
            del self.preloaded[tp]


class PreloadingTableManager(TableManager):
    """Faust's table manager, preloading the assigned changelog partitions before each recovery."""

    #: Changelog records applied by preloads since the worker started (reported by ``/health``).
    preloaded_records = 0

    async def on_rebalance(
        self, assigned: set[TP], revoked: set[TP], newly_assigned: set[TP], generation_id: int = 0
    ) -> None:
        snapshots: TableSnapshots | None = getattr(self.app, "snapshots", None)
        if snapshots is not None:
            # Partitions may be leaving (their keys are dropped after the recovery): no periodic snapshot until a
            # preload of the current generation says again which partitions the tables hold, and up to where.
            snapshots.positions.seed({})
        if generation_id == self.app.consumer_generation_id:
            changelogs = self._changelogs
            actives = {tp for tp in self.app.assignor.assigned_actives() if tp.topic in changelogs}
            app = cast(ShortFetchApp, self.app)  # the worker's app (streams.runtime.worker) is one
            self.preloaded_records += await preload(app, {tp: changelogs[tp.topic] for tp in actives})
        await super().on_rebalance(assigned, revoked, newly_assigned, generation_id)


async def preload(app: ShortFetchApp, tables: dict[TP, Any]) -> int:
    """Apply the changelog records of ``tables``' partitions after their preloaded offsets; returns how many."""
    partitions = {tp: table for tp, table in tables.items() if isinstance(table, PreloadedTable)}
    if not partitions:
        return 0
    began = time.perf_counter()
    consumer = AIOKafkaConsumer(
        bootstrap_servers=[f"{url.host}:{url.port or 9092}" for url in app.conf.broker_consumer],
        client_id=f"{app.conf.id}-preload", enable_auto_commit=False,
        # The worker's own fetch wait (see streams.runtime.transport): short for Tansu, long on Apache Kafka.
        fetch_max_wait_ms=app.fetch_max_wait_ms,
        max_partition_fetch_bytes=8 << 20, fetch_max_bytes=64 << 20,
        # A start before the log's first offset (records deleted by retention) reads from the first one.
        auto_offset_reset="earliest",
    )
    await consumer.start()
    applied = 0
    snapshots: TableSnapshots | None = getattr(app, "snapshots", None)
    try:
        wanted = {TopicPartition(tp.topic, tp.partition): tp for tp in partitions}
        ends = await log_end_offsets(consumer, list(wanted))
        pending = {kafka_tp: _Latest(partitions[tp], tp) for kafka_tp, tp in wanted.items()}
        if snapshots is not None:
            await _start_from_snapshots(consumer, snapshots.files, pending, ends)
        starts = {kafka_tp: latest.start() for kafka_tp, latest in pending.items()}
        remaining = {kafka_tp for kafka_tp in wanted if starts[kafka_tp] < ends[kafka_tp]}
        for kafka_tp in remaining:
            consumer.seek(kafka_tp, starts[kafka_tp])
        while remaining:
            fetched = await consumer.getmany(*remaining, timeout_ms=500, max_records=_MAX_RECORDS)
            for kafka_tp, records in fetched.items():
                applied += pending[kafka_tp].collect(records, ends[kafka_tp])
            # By position, not by the last record's offset: a compacted log or transaction markers can end
            # in offsets that are never returned as records.
            for kafka_tp in list(remaining):
                if await consumer.position(kafka_tp) >= ends[kafka_tp]:
                    remaining.discard(kafka_tp)
    finally:
        await consumer.stop()
    for latest in pending.values():
        latest.apply()
    if snapshots is not None:
        # The tables now hold exactly each partition's log up to its end: this worker's writes continue from there.
        snapshots.positions.seed({(kafka_tp.topic, kafka_tp.partition): end for kafka_tp, end in ends.items()})
        _snapshot_what_was_read(snapshots.files, pending.values())
    del pending
    _release_freed_memory()
    log.info(
        "tables preloaded from their changelogs",
        extra={"records": applied, "partitions": len(partitions), "seconds": round(time.perf_counter() - began, 2)},
    )
    return applied


async def _start_from_snapshots(consumer: AIOKafkaConsumer, files: SnapshotFiles,
                                pending: dict[TopicPartition, _Latest], ends: dict[TopicPartition, int]) -> None:
    """Seed each partition read from scratch with its snapshot, when it has one that still fits its log."""
    fresh = [kafka_tp for kafka_tp, latest in pending.items() if latest.fresh]
    if not fresh:
        return
    firsts = await consumer.beginning_offsets(fresh)
    for kafka_tp in fresh:
        # Off the event loop: a large file takes a while to check and parse, and the group heartbeats meanwhile.
        snapshot = await asyncio.to_thread(files.load, kafka_tp.topic, kafka_tp.partition)
        if snapshot is None:
            continue
        after = snapshot.offset + 1
        if firsts[kafka_tp] > after or ends[kafka_tp] < after:
            files.discard(kafka_tp.topic, kafka_tp.partition,
                          f"its log now spans offsets {firsts[kafka_tp]}-{ends[kafka_tp]}, the snapshot ends at "
                          f"{snapshot.offset}: recreated or reset")
            continue
        pending[kafka_tp].seed(snapshot)


def _snapshot_what_was_read(files: SnapshotFiles, read: Iterable[_Latest]) -> None:
    """Save, on the snapshot thread, the live set of each partition that was read from scratch through many
    records: the next restart reads from where this one stopped."""
    for latest in read:
        if latest.fresh and latest.last is not None and latest.read >= max(
                RECORDS_PER_LIVE_KEY * len(latest.values), MIN_RECORDS):
            topic, partition, offset, values = latest.tp.topic, latest.tp.partition, latest.last, latest.values
            future = files.submit(lambda t=topic, p=partition, o=offset, v=values: files.save(t, p, o, v.items()))
            future.add_done_callback(_log_failure)


def _log_failure(future: Future[Any]) -> None:
    if (error := future.exception()) is not None:
        log.error("table snapshot after the preload failed; the next restart reads the changelogs as before",
                  exc_info=error)


class _Latest:
    """The last raw value of each key read from one changelog partition, applied to its table at the end.

    A tombstone forgets the key's pending value, and deletes the key from the table only if the table held it
    before this preload (a partition preloaded again after a rebalance): a key written and retired within
    the read costs nothing to keep.
    """

    def __init__(self, table: PreloadedTable, tp: TP) -> None:
        self.table, self.tp = table, tp
        self.values: dict[bytes, bytes] = {}
        self.deleted: set[bytes] = set()
        self.last: int | None = table.preloaded.get(tp)
        #: Read from scratch: the table holds nothing of this partition (never preloaded, or since revoked).
        self.fresh = self.last is None
        #: Records read from the log (not from a snapshot).
        self.read = 0

    def seed(self, snapshot: Snapshot) -> None:
        """Start from ``snapshot`` (this partition's live values as of its offset) instead of offset 0."""
        self.values, self.last = snapshot.values, snapshot.offset

    def start(self) -> int:
        """The first offset to read."""
        return 0 if self.last is None else self.last + 1

    def collect(self, records: list[Any], end: int) -> int:
        """Take ``records`` (one fetch, in offset order) up to ``end``; returns how many."""
        values, held = self.values, self.table.data.data
        key_of = self.table.changelog_topic.schema.key_serializer.loads
        taken = 0
        for record in records:
            if record.offset >= end:
                continue
            taken += 1
            self.last = record.offset
            if record.value is None:
                values.pop(record.key, None)
                if held and key_of(record.key) in held:
                    self.deleted.add(record.key)
            else:
                values[record.key] = record.value
        self.read += taken
        return taken

    def apply(self) -> None:
        """Decode the surviving values into the memory store and record the offset read up to."""
        store, schema, partition = self.table.data, self.table.changelog_topic.schema, self.tp.partition
        data, key_partition = store.data, store._key_partition
        key_of, value_of = schema.key_serializer.loads, schema.value_serializer.loads
        for raw in self.deleted:
            key = key_of(raw)
            data.pop(key, None)
            key_partition.pop(key, None)
        for raw, value in self.values.items():
            key = key_of(raw)
            data[key] = value_of(value)
            key_partition[key] = partition
        if self.last is not None:
            self.table.preloaded[self.tp] = self.last


def _release_freed_memory() -> None:
    """Hand the heap freed by a preload back to the operating system (glibc keeps it otherwise).

    A preload reads every changelog record ever written (Tansu never compacts) through fetch buffers and
    record objects that are garbage once it ends; glibc returns only the top of its heap by itself, so the
    worker's RSS stayed at its high-water mark for the rest of its life.
    """
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    trim = getattr(libc, "malloc_trim", None)
    if trim is not None:
        trim(0)
