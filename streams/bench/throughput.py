"""Throughput phases: the raw decode ceiling and the worker's end-to-end rate over the same records.

Both read records that were produced before the clock starts, so neither measures the producer. The ceiling
is what one process can do with the bytes at all (fetch + ``Codec.decode_batch``, nothing else); the
pipeline is a real ``ctxflow worker`` from ready to caught up, where caught up means its committed offsets
reached the end of every input: every effect (ClickHouse, Redis, decisions, changelogs) is durable by then.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from ctxflow.schemas.codec import Codec
from ctxflow.streams.config import Settings
from ctxflow.streams.runtime import gc_policy
from ctxflow.streams.runtime.inputs import INPUT_MODELS
from ctxflow.streams.stack.worker_process import EXTERNAL_INPUTS, WorkerProcess


async def raw_ceiling(settings: Settings, topics: tuple[str, ...], expected: int) -> tuple[float, float, int]:
    """Fetch and decode ``expected`` records of ``topics`` from offset 0; (events/s, CPU us/event, rejected)."""
    codec = Codec(settings.schema_registry_url, settings.max_content_bytes)
    names = {settings.topic(t): INPUT_MODELS[t] for t in topics}
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.bootstrap, enable_auto_commit=False, fetch_max_wait_ms=settings.fetch_max_wait_ms,
        max_partition_fetch_bytes=8 << 20, fetch_max_bytes=64 << 20,
    )
    await consumer.start()
    try:
        consumer.assign([TopicPartition(t, p) for t in names for p in range(settings.partitions)])
        await consumer.seek_to_beginning()
        seen = rejected = 0
        with gc_policy.held():  # the worker's collector settings: the ratio compares the work, not the collector
            started, cpu_started = time.perf_counter(), time.process_time()
            while seen < expected:
                for tp, records in (await consumer.getmany(timeout_ms=500, max_records=10_000)).items():
                    _, bad = codec.decode_batch([r.value for r in records], names[tp.topic])
                    seen += len(records)
                    rejected += len(bad)
            cpu_us = (time.process_time() - cpu_started) * 1e6 / seen
            return seen / (time.perf_counter() - started), cpu_us, rejected
    finally:
        await consumer.stop()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds ``pid`` has used (all its threads), from ``/proc/<pid>/stat``."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class PipelineRun:
    """How a worker consumed a pre-produced backlog: its rate, CPU, and how long it took to become ready."""

    startup_s: float
    seconds: float
    records: int
    cpu_s: float

    @property
    def eps(self) -> float:
        """Records per second from ready to caught up."""
        return self.records / self.seconds


def run_pipeline(settings: Settings, records: int, say: Callable[[str], None], timeout_s: float = 900.0
                 ) -> PipelineRun:
    """Start a worker on ``settings`` (a fresh app id starts at offset 0), time it through ``records``, stop it."""
    began = time.perf_counter()
    worker = WorkerProcess(settings, name=f"worker-{settings.app_id}").start(ready_timeout_s=120)
    try:
        ready = time.perf_counter()
        cpu_before = cpu_seconds(worker.pid)
        asyncio.run(wait_committed(settings, records, say, timeout_s))
        done = time.perf_counter()
        cpu_s = cpu_seconds(worker.pid) - cpu_before
    finally:
        worker.stop()
    return PipelineRun(ready - began, done - ready, records, cpu_s)


async def wait_committed(settings: Settings, records: int, say: Callable[[str], None], timeout_s: float) -> None:
    """Poll the worker's committed offsets until they cover ``records`` input records in total.

    Counts records rather than comparing with end offsets: Tansu answers ListOffsets(latest) with the last
    *batch's* base offset + 1, so "end offsets" miss up to a batch per partition. The topics are fresh, so
    the sum of committed offsets is the number of records whose effects are durable. Reports progress about
    every two seconds; raises ``TimeoutError`` after ``timeout_s``.
    """
    tps = [TopicPartition(settings.topic(t), p) for t in EXTERNAL_INPUTS for p in range(settings.partitions)]
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap)
    await admin.start()
    try:
        began = next_report = time.perf_counter()
        deadline = began + timeout_s
        while True:
            committed = await admin.list_consumer_group_offsets(settings.app_id, partitions=tps)
            done = sum(max(meta.offset, 0) for meta in committed.values())
            now = time.perf_counter()
            if done >= records:
                return
            if now > deadline:
                raise TimeoutError(f"worker committed {done} of {records} records in {timeout_s:.0f}s")
            if now >= next_report:
                say(f"  ... {done:,} of {records:,} records committed ({done / max(now - began, 1e-9):,.0f}/s)")
                next_report = now + 2.0
            await asyncio.sleep(0.02)
    finally:
        await admin.close()
