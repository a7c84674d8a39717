"""Session-state phase: the worker's resident memory per active run, and its restart time holding them.

A fresh worker's RSS at ready is the empty baseline. It ingests ``runs`` active runs of three turns each
(every other run with a usage report), is SIGKILLed, and a new worker starts on the same app id:
``recovery_s`` runs from spawn until ``/health`` reports every partition, which Faust only does once the
tables are recovered from their changelogs; it includes process start-up and the broker's wait for the dead
member's session to expire. The headline ``bytes_per_run`` is (RSS of the recovered worker, which holds
exactly the runs and has processed nothing) minus the empty baseline, per run. ``live_bytes_per_run`` is the
growth of the ingesting worker itself after a warm-up, per run: it also counts what ingestion leaves behind
(chDB caches and parts, heap high-water of large batches), so it is an upper bound.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ctxflow.streams.bench.corpus import held_runs, publish
from ctxflow.streams.bench.throughput import wait_committed
from ctxflow.streams.config import Settings
from ctxflow.streams.stack.worker_process import WorkerProcess


@dataclass(frozen=True, slots=True)
class SessionsResult:
    """Memory per active run and restart-to-ready time with them."""

    runs: int
    empty_rss_bytes: int
    baseline_rss_bytes: int
    loaded_rss_bytes: int
    recovered_rss_bytes: int
    bytes_per_run: float
    live_bytes_per_run: float
    recovery_s: float
    records: int


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` (``VmRSS`` in ``/proc/<pid>/status``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def settled_rss(pid: int, timeout_s: float = 5.0) -> int:
    """RSS once two samples 0.2 s apart agree within 0.5% (or the last sample at the deadline)."""
    deadline = time.monotonic() + timeout_s
    last = rss_bytes(pid)
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = rss_bytes(pid)
        if abs(now - last) <= 0.005 * last:
            return now
        last = now
    return last


def measure_sessions(settings: Settings, runs: int, say: Callable[[str], None]) -> SessionsResult:
    """Run the phase on ``settings`` (fresh topics and app id); stops every worker it started."""
    warm = max(500, runs // 100)
    worker = WorkerProcess(settings, name="worker-sessions").start(ready_timeout_s=120)
    produced = 0
    try:
        empty = settled_rss(worker.pid)
        say(f"  warm-up: {warm:,} runs")
        records = held_runs(warm)
        asyncio.run(publish(settings, records))
        produced += len(records)
        asyncio.run(wait_committed(settings, produced, say, 600))
        baseline = settled_rss(worker.pid)
        say(f"  encoding {runs - warm:,} more runs")
        records = held_runs(runs - warm, first=warm)
        say(f"  producing {len(records):,} records")
        asyncio.run(publish(settings, records, lambda n: say(f"  ... {n:,} produced")))
        produced += len(records)
        asyncio.run(wait_committed(settings, produced, say, 1200))
        loaded = settled_rss(worker.pid)
        say(f"  RSS {baseline / 2**20:,.0f} MiB -> {loaded / 2**20:,.0f} MiB with {runs:,} runs; SIGKILL and restart")
        worker.kill()
        began = time.perf_counter()
        worker = WorkerProcess(settings, name="worker-recovered").start(ready_timeout_s=900)
        recovery_s = time.perf_counter() - began
        recovered = settled_rss(worker.pid)
    finally:
        worker.stop()
    return SessionsResult(
        runs=runs, empty_rss_bytes=empty, baseline_rss_bytes=baseline, loaded_rss_bytes=loaded,
        recovered_rss_bytes=recovered, bytes_per_run=(recovered - empty) / runs,
        live_bytes_per_run=(loaded - baseline) / (runs - warm), recovery_s=recovery_s, records=produced,
    )
