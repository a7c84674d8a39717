"""What ``ctxflow demo`` and ``ctxflow soak`` share to drive traffic through a private stack.

A home directory claimed for one run, settings for a stack of its own on free loopback ports, a publisher that
keeps the event loop responsive, and the worker's lag as its committed consumer-group offsets show it: what is
durable, not what was fetched.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from ctxflow.streams.config import Settings
from ctxflow.streams.runtime.log_end import log_end_offsets
from ctxflow.streams.sdk import CtxflowClient
from ctxflow.streams.stack.processes import free_port, pid_alive, start_time_of
from ctxflow.streams.stack.worker_process import EXTERNAL_INPUTS
from pydantic import BaseModel

__all__ = ["CommittedLag", "FairClient", "HomeInUse", "LagSample", "claim_home", "private_settings"]


class HomeInUse(Exception):
    """Another live run of the same kind owns the directory, or it holds something else."""


def claim_home(home: Path, kind: str) -> None:
    """Empty ``home`` for a new ``kind`` run (``demo``, ``soak``) and mark it as this process's.

    Refuses (:class:`HomeInUse`) while another ``kind`` run is alive there, and when ``home`` holds anything
    that is not a ``kind`` directory; a directory left by a finished or dead run is emptied.
    """
    marker = home / f"{kind}.pid"
    if marker.exists():
        pid, _, start = marker.read_text().partition(" ")
        if pid_alive(int(pid), int(start) if start.strip() else None):
            raise HomeInUse(f"another {kind} (pid {pid}) is running under {home}")
        shutil.rmtree(home)
    elif home.exists() and any(home.iterdir()):
        raise HomeInUse(f"{home} exists and is not a {kind} directory; remove it or pick another --home")
    home.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"{os.getpid()} {start_time_of(os.getpid()) or ''}")


def private_settings(settings: Settings, subdir: str) -> Settings:
    """``settings`` moved to ``<home>/<subdir>`` with broker, Redis and worker web port on three free ports,
    and the chDB under that home (no external ClickHouse or registry): a run whose numbers are its own."""
    ports: set[int] = set()
    while len(ports) < 3:
        ports.add(free_port())
    kafka, redis, web = sorted(ports)
    return settings.model_copy(update={
        "home": settings.home / subdir, "bootstrap": f"127.0.0.1:{kafka}",
        "redis_url": f"redis://127.0.0.1:{redis}/0", "web_port": web,
        "clickhouse_dsn": None, "schema_registry_url": None,
    })


class FairClient(CtxflowClient):
    """A client that yields to the event loop every 200 records: aiokafka's send rarely suspends, so a
    publisher running behind its schedule would otherwise freeze a live display and the lag watcher."""

    _published = 0

    async def publish(self, record: BaseModel) -> None:
        await super().publish(record)
        self._published += 1
        if self._published % 200 == 0:
            await asyncio.sleep(0)


@dataclass(frozen=True)
class LagSample:
    """Every input partition's log end and the worker's committed offset there, measured at ``measured_at``
    (``time.monotonic()``); a partition the group never committed counts as committed at 0."""

    measured_at: float
    ends: dict[TopicPartition, int]
    committed: dict[TopicPartition, int]

    @property
    def records(self) -> int:
        """Records published but not yet committed, over every input partition."""
        return sum(max(0, end - self.committed.get(tp, 0)) for tp, end in self.ends.items())

    @property
    def committed_total(self) -> int:
        """Records committed over every input partition (what the worker has made durable)."""
        return sum(self.committed.values())

    @property
    def end_total(self) -> int:
        """Records in every input partition."""
        return sum(self.ends.values())


class CommittedLag:
    """Measures a consumer group's lag from its committed offsets (``async with``; one consumer, one admin client):
    by default the worker's (``app_id``) over the input topics others write (what a producer's records count
    against); ``group`` and ``topics`` (logical names) measure another, such as the summarizers' over
    ``compression.jobs``."""

    def __init__(self, settings: Settings, group: str | None = None, topics: tuple[str, ...] = EXTERNAL_INPUTS
                 ) -> None:
        self.settings, self.group = settings, group or settings.app_id
        self.partitions = [TopicPartition(settings.topic(t), p)
                           for t in topics for p in range(settings.partitions)]
        self._consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap, enable_auto_commit=False)
        self._admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap)

    async def __aenter__(self) -> CommittedLag:
        await self._consumer.start()
        try:
            await self._admin.start()
        except BaseException:
            await self._consumer.stop()
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        try:
            await self._admin.close()
        finally:
            await self._consumer.stop()

    async def sample(self) -> LagSample:
        """Log ends first, then committed offsets, so a sample never shows more committed than published."""
        measured_at = time.monotonic()
        ends = await log_end_offsets(self._consumer, self.partitions)  # end_offsets alone under-reports the lag
        committed = await self._admin.list_consumer_group_offsets(self.group, partitions=self.partitions)
        done = {tp: max(0, m.offset) for tp, m in committed.items() if m is not None}
        return LagSample(measured_at, ends, done)
