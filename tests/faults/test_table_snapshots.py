"""Local table snapshots never change what a worker recovers (:mod:`streams.runtime.snapshots`).

A worker runs finished runs that retire (values and tombstones on every changelog) and snapshots its tables
once it has caught up; it stops, a worker with snapshots disabled runs more of them and is SIGKILLed, so the
snapshot is a stale base with a long changelog tail after it. Recovering with the snapshot (base plus tail)
must give the same tables, value for value, as recovering from offset 0; so must a corrupt snapshot and one of
another deployment (another topic prefix), both of which are ignored, and one past its log's end, which is
discarded. A worker restarted on the snapshots
reads fewer changelog records and goes on deciding.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from ctxflow.schemas.models import RunEvent, TurnEvent, UsageReport
from ctxflow.streams.config import Settings
from ctxflow.streams.runtime.recovery import PreloadedTable, preload
from ctxflow.streams.runtime.snapshots import Deployment, SnapshotFiles
from ctxflow.streams.runtime.worker import build_app
from ctxflow.streams.stack.worker_process import WorkerProcess
from faust.types import TP

from tests.support_kafka import wait_processed, wait_until
from tests.support_traffic import publish
from tests.unit.test_budget_factories import manifest, run_event, turn, usage

TENANTS = ("acme", "globex", "initech")
WINDOW_S = 60
BASE = datetime(2025, 3, 3, 9, 0, tzinfo=UTC)


def finished_runs(first: int, count: int) -> list[TurnEvent | UsageReport | RunEvent]:
    """Runs ``first..first+count``, one every 2 s of event time: started, a turn, a usage report, finalized."""
    events: list[TurnEvent | UsageReport | RunEvent] = []
    for r in range(first, first + count):
        run, tenant = f"run{r:04d}", TENANTS[r % len(TENANTS)]
        at = [BASE + timedelta(seconds=2 * r + s) for s in (0, 0.5, 1, 1.5)]
        events += [
            run_event("started", run=run, tenant=tenant, workflow=run, occurred_at=at[0]),
            turn(0, 40, run=run, tenant=tenant, occurred_at=at[1]),
            usage("c1", 100, 10, run=run, tenant=tenant, occurred_at=at[2]),
            run_event("finalized", run=run, tenant=tenant, workflow=run, occurred_at=at[3]),
        ]
    return events


def recovered(settings: Settings) -> tuple[dict[str, dict[str, bytes]], int]:
    """Every table as a worker on ``settings`` recovers it (each value re-encoded by its table's codec), and how
    many changelog records the recovery read: the worker's own preload, in this process."""
    app = build_app(settings.model_copy(update={"sink": "off"}))
    tables = {name: table for name, table in app.tables.items() if isinstance(table, PreloadedTable)}
    partitions = {TP(table.changelog_topic.get_topic_name(), p): table
                  for table in tables.values() for p in range(settings.partitions)}

    async def run() -> int:
        try:
            return await preload(app, partitions)  # type: ignore[arg-type]  (build_app's app is a ShortFetchApp)
        finally:
            if app.snapshots is not None:  # type: ignore[attr-defined]
                app.snapshots.files.close()  # type: ignore[attr-defined]  (waits for the snapshots it saves)

    read = asyncio.run(run())
    contents = {}
    for name, table in tables.items():
        dumps = table.changelog_topic.schema.value_serializer.dumps
        contents[name] = {key: dumps(value) for key, value in table.data.data.items()}
    return contents, read


def snapshot_files(settings: Settings) -> list[Path]:
    return sorted((settings.home / "state" / settings.app_id).glob("*.snap"))


def test_recovery_from_snapshots_equals_recovery_from_offset_zero(
        settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    settings = settings.model_copy(update={"run_retention_s": WINDOW_S})
    publish(settings, [manifest(tenant) for tenant in TENANTS])
    first = WorkerProcess(settings).start()
    try:
        publish(settings, finished_runs(0, 300))
        wait_processed(settings, sink=False)
        # Caught up: it snapshots its tables (every changelog partition, retired runs' tombstones applied).
        wait_until(lambda: snapshot_files(settings), lambda files: len(files) >= 1, what="snapshots written")
        # /health says so, and what the tables hold: most of the 300 runs retired.
        health = first.health()
        assert health["snapshots"]["taken"] >= 1 and health["snapshots"]["due"] is False
        assert 0 < health["table_keys"]["runs"] < 100
    finally:
        first.stop()
    stale = {path.name: path.read_bytes() for path in snapshot_files(settings)}

    # More runs through a worker that takes no snapshot, killed: the snapshots are now a stale base.
    no_snapshots = settings.model_copy(update={"table_snapshots": False})
    second = WorkerProcess(no_snapshots, name="worker-no-snapshots").start()
    try:
        publish(settings, finished_runs(300, 300))
        wait_processed(settings, sink=False)
    finally:
        second.kill()
    assert {path.name: path.read_bytes() for path in snapshot_files(settings)} == stale

    from_zero, read_from_zero = recovered(no_snapshots)
    assert from_zero["budget-runs"] and len(from_zero["budget-runs"]) < 100  # most runs retired
    with_snapshots, read_with_snapshots = recovered(settings)
    assert with_snapshots == from_zero
    assert read_with_snapshots < read_from_zero

    # A corrupt snapshot is ignored (a log line), and recovery still exact.
    victim = snapshot_files(settings)[0]
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    victim.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="ctxflow.streams.runtime.snapshots"):
        assert recovered(settings)[0] == from_zero
    assert any("checksum mismatch" in str(getattr(r, "reason", "")) for r in caplog.records)

    # Another deployment's snapshots (same app id and directory, another topic prefix) are ignored.
    caplog.clear()
    foreign = settings.model_copy(update={"topic_prefix": f"{settings.topic_prefix}x"})
    with caplog.at_level(logging.WARNING, logger="ctxflow.streams.runtime.snapshots"):
        assert recovered(foreign)[0] == from_zero
    assert any("another deployment" in str(getattr(r, "reason", "")) for r in caplog.records)

    # A snapshot past its log's end (the topic recreated, the state reset) is discarded.
    files = SnapshotFiles(settings.home / "state" / settings.app_id,
                          Deployment(settings.app_id, settings.topic_prefix, settings.partitions))
    topic, partition = f"{settings.app_id}-budget-runs-changelog", 0
    files.save(topic, partition, 10**9, [(b"acme:run9999", b"[]")])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ctxflow.streams.runtime.snapshots"):
        assert recovered(settings)[0] == from_zero
    assert [r for r in caplog.records if r.getMessage() == "table snapshot discarded"]

    # A worker restarted on the snapshots reads fewer records than from offset 0, and goes on.
    restarted = WorkerProcess(settings, name="worker-restarted").start()
    try:
        assert 0 <= int(restarted.health()["tables_preloaded"]) < read_from_zero
        publish(settings, finished_runs(600, 30))
        wait_processed(settings, sink=False)
    finally:
        restarted.kill()
    assert recovered(no_snapshots)[0] == recovered(settings)[0]
