"""Bounded state through a real worker: finished runs retire a window after their last event (tombstones on
the run ledgers' changelog), a restarted worker recovers only the live runs and goes on retiring them, and a
duplicate later than the window lands on the dead-letter topic with its reason instead of being counted. The
memory gate's verdicts retire over the same window, and a late duplicate candidate is refused the same way."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from ctxflow.processors.retention import Retention
from ctxflow.schemas.codec import Codec
from ctxflow.schemas.models import MemoryRecord, RunEvent, TurnEvent, UsageReport
from ctxflow.streams.config import Settings
from ctxflow.streams.stack.worker_process import WorkerProcess

from tests.replay import read_input_log, replay
from tests.support_kafka import dead_letters_on_topic, read_full_topics, wait_processed
from tests.support_memory import candidate
from tests.support_tables import aggregate_snapshots, run_ledgers
from tests.support_traffic import publish
from tests.unit.test_budget_factories import manifest, run_event, turn, usage

TENANT = "acme"
WINDOW_S = 60
BASE = datetime(2025, 3, 3, 9, 0, tzinfo=UTC)


def finished_run(r: int, start_s: float) -> list[TurnEvent | UsageReport | RunEvent]:
    """Started, one turn, one usage report, finalized: a run's whole state, over three seconds."""
    run, at = f"run{r:03d}", (lambda s: BASE + timedelta(seconds=start_s + s))
    return [
        run_event("started", run=run, tenant=TENANT, workflow=run, occurred_at=at(0)),
        turn(0, 40, run=run, tenant=TENANT, occurred_at=at(1)),
        usage("c1", 100, 10, run=run, tenant=TENANT, occurred_at=at(2)),
        run_event("finalized", run=run, tenant=TENANT, workflow=run, occurred_at=at(3)),
    ]


def tombstoned(settings: Settings) -> set[str]:
    """Run keys with a null value on the run ledgers' changelog."""
    topic = f"{settings.app_id}-budget-runs-changelog"
    return {r.key.decode() for r in asyncio.run(read_full_topics(settings, [topic])) if r.value is None}


def test_finished_runs_retire_after_the_window_and_a_late_duplicate_is_dead_lettered(settings: Settings) -> None:
    settings = settings.model_copy(update={"run_retention_s": WINDOW_S})
    retention = Retention.of_seconds(WINDOW_S)
    publish(settings, [manifest(TENANT)])
    worker = WorkerProcess(settings).start()
    try:
        wait_processed(settings)
        # 40 runs, one every 10 s of event time: 400 s, more than six windows.
        runs = [finished_run(r, 10 * r) for r in range(40)]
        publish(settings, [e for run in runs[:20] for e in run])
        wait_processed(settings)
        live = {(TENANT, f"run{r:03d}") for r in range(20) if 10 * r + 3 >= 190 - WINDOW_S - 4}
        assert set(run_ledgers(settings)) <= {(TENANT, f"run{r:03d}") for r in range(20)}
        assert live <= set(run_ledgers(settings)) and len(run_ledgers(settings)) < 10
        assert f"{TENANT}:run000" in tombstoned(settings)

        # A restarted worker reads the tombstones as deletions, and retires what it recovered as time moves on.
        worker.kill()
        worker = WorkerProcess(settings).start()
        before_restart = set(run_ledgers(settings))
        publish(settings, [e for run in runs[20:] for e in run])
        wait_processed(settings)
        after = set(run_ledgers(settings))
        assert not before_restart & after, "runs recovered after the restart never retired"
        assert len(after) < 10 and (TENANT, "run039") in after

        # run000's usage report again, six windows late: refused with the reason, not counted.
        spent = aggregate_snapshots(settings, "tenants")[TENANT]
        publish(settings, [runs[0][2]])
        wait_processed(settings)
        late = [d for d in dead_letters_on_topic(settings) if "older than the dedup window" in d.reason]
        assert len(late) == 1 and late[0].reason_code == "contract_violation"
        assert "CTXFLOW_RUN_RETENTION_S" in late[0].reason
        assert aggregate_snapshots(settings, "tenants")[TENANT] == spent
        assert (TENANT, "run000") not in run_ledgers(settings)
    finally:
        worker.stop()

    # A crash-free replay of the same log through the processors retires and refuses exactly the same.
    oracle = replay(read_input_log(settings), retention=retention)
    assert {tuple(k.split(":", 1)) for k in oracle.state.runs} == set(run_ledgers(settings))
    assert [r.offset for r in oracle.refused if r.topic == "usage"] == [late[0].source_offset]


def test_memory_verdicts_retire_after_the_window_and_a_late_duplicate_candidate_is_dead_lettered(
    settings: Settings,
) -> None:
    settings = settings.model_copy(update={"run_retention_s": WINDOW_S})
    first = candidate("Prefers answers in French", tenant_id=TENANT, candidate_id="c-1", occurred_at=BASE)
    publish(settings, [manifest(TENANT), first,
                       candidate("prefers answers in french.", tenant_id=TENANT, candidate_id="c-2",
                                 occurred_at=BASE + timedelta(seconds=1))])
    worker = WorkerProcess(settings).start()
    try:
        wait_processed(settings)
        publish(settings, [first])  # a redelivery inside the window: its verdict again, nothing counted
        wait_processed(settings)
        # Five windows of candidate event time later: c-1's and c-2's verdicts retire (tombstones on the changelog).
        publish(settings, [candidate("Likes short replies", tenant_id=TENANT, candidate_id="c-3",
                                     occurred_at=BASE + timedelta(seconds=5 * WINDOW_S))])
        wait_processed(settings)
        topic = f"{settings.app_id}-budget-memory_verdicts-changelog"
        changelog = asyncio.run(read_full_topics(settings, [topic]))
        assert {r.key.decode() for r in changelog if r.value is None} == {f"{TENANT}:c-1", f"{TENANT}:c-2"}
        publish(settings, [first])  # the same redelivery, now later than the window
        wait_processed(settings)
        late = [d for d in dead_letters_on_topic(settings) if "older than the dedup window" in d.reason]
        assert len(late) == 1 and late[0].reason_code == "contract_violation" and late[0].original is None
        codec = Codec(settings.schema_registry_url)
        records = [codec.decode(r.value, MemoryRecord)
                   for r in asyncio.run(read_full_topics(settings, [settings.topic("memory.records")]))]
        french = [r for r in records if r.content == "Prefers answers in French"]
        assert max(r.merge_count for r in french) == 1  # c-2's merge; neither c-1 again counted
    finally:
        worker.stop()
