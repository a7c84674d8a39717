"""Sink phase (b'): the ClickHouse sink alone, draining topics that already hold records, into a fresh chDB.

A ``ctxflow sink`` process (what a deployment runs apart from its workers) in a fresh consumer group reads the
projected topics from their first offsets: after phase (b), the corpus's turns and the decisions the worker made
of them, as that worker decided them (:mod:`streams.sink.verdict`). Nothing else runs meanwhile. Its rows per
second run from its first fetched record to its last commit (both stamped by the sink itself, ``/health``); its
CPU is the process's own (every thread, chDB's included) from the moment it owned its partitions to the moment
its group had committed every record.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from ctxflow.streams.bench.throughput import cpu_seconds
from ctxflow.streams.config import Settings
from ctxflow.streams.stack.processes import free_port
from ctxflow.streams.stack.progress import wait_sink_caught_up
from ctxflow.streams.stack.sink_process import SinkProcess

#: The issue's goal, on chDB.
GOAL_ROWS_PER_S = 200_000


@dataclass(frozen=True, slots=True)
class SinkRun:
    """What one sink wrote from ready to caught up: rows (those its backend acknowledged), flushes, seconds, CPU."""

    rows: int
    flushes: int
    seconds: float
    cpu_s: float
    skipped: int

    @property
    def rows_per_s(self) -> float:
        """Rows per wall second from its first fetched record to its last commit."""
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    @property
    def rows_per_cpu_s(self) -> float:
        """Rows per CPU second of the sink process."""
        return self.rows / self.cpu_s if self.cpu_s > 0 else 0.0


def measure_sink(settings: Settings, say: Callable[[str], None], timeout_s: float = 900.0) -> SinkRun:
    """Run a sink on the topics of ``settings`` (their records are already there) with a fresh group and chDB under
    ``settings.home / 'sink-<tag>'``, until it committed everything; stop it and return its figures."""
    tag = uuid.uuid4().hex[:8]
    fresh = settings.model_copy(update={
        "sink_group": f"{settings.app_id}-sink-{tag}", "home": settings.home / f"sink-{tag}", "clickhouse_dsn": None,
        "sink_web_port": free_port(),
    })
    sink = SinkProcess(fresh, name=f"sink-{tag}").start(ready_timeout_s=120)
    try:
        cpu_before = cpu_seconds(sink.pid)
        wait_sink_caught_up(fresh, timeout_s)
        cpu_s = cpu_seconds(sink.pid) - cpu_before
        health = sink.health()
    finally:
        sink.stop()
    seconds = (health["last_commit_at"] or time.time()) - (health["first_record_at"] or time.time())
    run = SinkRun(health["rows_written"], health["flushes"], seconds, cpu_s, health["skipped"])
    say(f"  {run.rows:,} rows in {run.flushes} flushes over {run.seconds:.1f}s: {run.rows_per_s:,.0f} rows/s "
        f"(goal >= {GOAL_ROWS_PER_S:,}), {run.rows_per_cpu_s:,.0f} rows per CPU second of the sink")
    return run
