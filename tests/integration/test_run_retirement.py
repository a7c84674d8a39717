"""Bounded state through a real worker: finished runs retire a window after their last event (tombstones on
the run ledgers' changelog), a restarted worker recovers only the live runs and goes on retiring them, and a
duplicate later than the window lands on the dead-letter topic with its reason instead of being counted."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from ctxflow.processors.retention import Retention
from ctxflow.schemas.models import RunEvent, TurnEvent, UsageReport
from ctxflow.streams.config import Settings
from ctxflow.streams.stack.worker_process import WorkerProcess

from tests.replay import read_input_log, replay
from tests.support_kafka import dead_letters_on_topic, read_full_topics, wait_processed
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
