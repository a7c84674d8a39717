"""Retired-runs phase: after many finished runs, a worker holds and restarts like an empty one.

One worker on fresh topics, with a short retention window (``WINDOW_S`` of event time). It is SIGKILLed and
restarted once while still empty: ``empty_restart_s`` (spawn to ``/health`` ready, including the broker's wait
for the dead member's session) and ``empty_rss_bytes`` (RSS at ready) are the baseline. It then ingests
``runs`` finished runs (a turn, a complete usage report and a finalization each: every kind of per-run state),
one every ``RUN_SPACING_S`` of event time, so the runs span hundreds of windows and all but the last window's
retire (their ``_USERS`` users' spend ledgers stay: state per user, not per run). Once it has caught up and
written the table snapshot then due, it is SIGKILLed and restarted again: ``retired_restart_s`` and
``retired_rss_bytes`` are taken the same way. The ratios against the baseline are the issue's goal (within 10%).

RSS is bounded by retirement: the restarted worker holds only the last window's runs (and the users' ledgers).
Restart time is bounded by the table snapshots (``streams.runtime.snapshots``): the restart loads the live set
as of the snapshot and reads only the changelog written after it. Without them it reads every value and
tombstone ever written, since the embedded broker (Tansu) never compacts: ``preloaded_records`` says how many
records the restart read from the changelogs (on Apache Kafka, log compaction removes superseded values and,
after ``delete.retention.ms``, the tombstones).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from ctxflow.schemas.codec import Codec
from ctxflow.schemas.models import ItemKind, Role, RunEvent, RunPhase, RunStatus, Slot, TurnEvent, UsageReport
from ctxflow.streams.bench.corpus import NOW, Encoded, encode, publish
from ctxflow.streams.bench.sessions import settled_rss
from ctxflow.streams.bench.throughput import wait_committed
from ctxflow.streams.config import Settings
from ctxflow.streams.stack.worker_process import WorkerProcess

#: Retention window of the phase's worker, in seconds of event time.
WINDOW_S = 600
#: Event time between the starts of consecutive runs: the runs span ``runs * RUN_SPACING_S`` seconds.
RUN_SPACING_S = 1.0
#: Runs encoded and produced per slice (bounds the benchmark process's memory).
_SLICE = 50_000
#: Users of the phase's runs, each in one tenant: their spend ledgers are state a worker keeps (bounded by the
#: users, not the runs), so the retired worker holds this many more values than the empty one.
_USERS = 997


@dataclass(frozen=True, slots=True)
class RetentionResult:
    """Worker RSS and restart-to-ready time after ``runs`` finished runs, against the same worker empty."""

    runs: int
    window_s: float
    records: int
    empty_rss_bytes: int
    retired_rss_bytes: int
    empty_restart_s: float
    retired_restart_s: float
    preloaded_records: int

    @property
    def rss_ratio(self) -> float:
        """Retired-runs RSS over empty RSS (goal: at most 1.1)."""
        return self.retired_rss_bytes / self.empty_rss_bytes

    @property
    def restart_ratio(self) -> float:
        """Retired-runs restart time over empty restart time (goal: at most 1.1)."""
        return self.retired_restart_s / self.empty_restart_s


def finished_runs(runs: int, first: int = 0, tenants: int = 50) -> list[Encoded]:
    """Encoded turns, usage reports and finalizations (in that topic order) of runs ``first..first+runs``."""
    codec = Codec()
    ids = {"tenant_id": "t", "user_id": "u", "session_id": "s", "run_id": "r", "agent_id": "planner"}
    turn = TurnEvent(**ids, event_id="e", seq=0, role=Role.USER, kind=ItemKind.MESSAGE, slot=Slot.HISTORY,
                     item_id="i", model="gpt-4o", content_digest="0" * 64, token_count=400, occurred_at=NOW)
    usage = UsageReport(**ids, event_id="u", call_id="c1", provider="openai", model="gpt-4o", input_tokens=450,
                        output_tokens=50, latency_ms=100, occurred_at=NOW)
    final = RunEvent(**ids, event_id="f", workflow_id="r", phase=RunPhase.FINALIZED, status=RunStatus.SUCCEEDED,
                     occurred_at=NOW)
    out: list[Encoded] = []
    for template, offset_s, suffix in ((turn, 0.0, "t"), (usage, 0.3, "u"), (final, 0.6, "f")):
        for r in range(first, first + runs):
            run_id = f"run-{r:07d}"
            user = r % _USERS
            update = {"tenant_id": f"tenant-{user % tenants}", "user_id": f"user-{user}", "run_id": run_id,
                      "event_id": f"{run_id}-{suffix}", "occurred_at": NOW + timedelta(seconds=r * RUN_SPACING_S
                                                                                       + offset_s)}
            if template is final:
                update["workflow_id"] = run_id
            out.append(encode(codec, template.model_copy(update=update)))
    return out


def _restart(settings: Settings, worker: WorkerProcess, name: str) -> tuple[WorkerProcess, float]:
    worker.kill()
    began = time.perf_counter()
    restarted = WorkerProcess(settings, name=name).start(ready_timeout_s=1800)
    return restarted, time.perf_counter() - began


def _settle(worker: WorkerProcess, say: Callable[[str], None], timeout_s: float = 120.0) -> None:
    """Wait until the caught-up worker has no table snapshot due: it takes one once idle after enough changelog
    writes (``streams.runtime.snapshots``), and the phase measures a worker killed after its runs retired, not
    one killed while writing that snapshot."""
    deadline = time.monotonic() + timeout_s
    while True:
        health = worker.health()
        snapshots = health.get("snapshots", {})
        if not snapshots.get("due") or time.monotonic() > deadline:
            say(f"  settled: {sum(health.get('table_keys', {}).values()):,} table values held, "
                f"{snapshots.get('taken', 0)} table snapshots written")
            return
        time.sleep(0.2)


def measure_retention(settings: Settings, runs: int, say: Callable[[str], None]) -> RetentionResult:
    """Run the phase on ``settings`` (fresh topics and app id); stops every worker it started."""
    settings = settings.model_copy(update={"run_retention_s": WINDOW_S})
    worker = WorkerProcess(settings, name="worker-retention").start(ready_timeout_s=120)
    produced = 0
    try:
        worker, empty_restart_s = _restart(settings, worker, "worker-retention-empty")
        empty_rss = settled_rss(worker.pid)
        say(f"  empty worker: restart {empty_restart_s:.1f}s, RSS {empty_rss / 2**20:,.0f} MiB; "
            f"{runs:,} finished runs over {runs * RUN_SPACING_S / WINDOW_S:,.0f} windows of {WINDOW_S}s")
        for first in range(0, runs, _SLICE):
            records = finished_runs(min(_SLICE, runs - first), first)
            asyncio.run(publish(settings, records))
            produced += len(records)
            say(f"  ... {first + min(_SLICE, runs - first):,} runs produced")
        asyncio.run(wait_committed(settings, produced, say, 3600))
        _settle(worker, say)
        worker, retired_restart_s = _restart(settings, worker, "worker-retention-retired")
        retired_rss = settled_rss(worker.pid)
        preloaded = int(worker.health().get("tables_preloaded", 0))
    finally:
        worker.stop()
    return RetentionResult(
        runs=runs, window_s=WINDOW_S, records=produced, empty_rss_bytes=empty_rss, retired_rss_bytes=retired_rss,
        empty_restart_s=empty_restart_s, retired_restart_s=retired_restart_s, preloaded_records=preloaded,
    )
