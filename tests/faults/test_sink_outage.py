"""An analytics outage mid-run: decisions keep flowing, the sink holds back its commits, and catches up exactly.

The sink runs as its own ``ctxflow sink`` process on the embedded chDB, beside a worker that writes no ClickHouse
(``CTXFLOW_SINK=off``), while agents publish through the SDK. The fault is real: the chDB directory is made
read-only mid-run (chDB then fails every insert with ``filesystem error: Permission denied``), then writable again.
Root ignores file permissions, so when the test runs as root the sink runs without ``CAP_DAC_OVERRIDE`` (``setpriv``);
it stays root, so it can still read the interpreter under a private home.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from ctxflow.schemas.models import RunEvent, TurnEvent, UsageReport
from ctxflow.streams.config import Settings
from ctxflow.streams.demo.workload import Workload
from ctxflow.streams.sink.catalogue import sink_group
from ctxflow.streams.sink.ownership import chdb_directory
from ctxflow.streams.stack.processes import free_port
from ctxflow.streams.stack.query import run_query
from ctxflow.streams.stack.sink_process import SinkProcess
from ctxflow.streams.stack.worker_process import WorkerProcess

from tests.support_kafka import (
    committed_records,
    dead_letters_on_topic,
    decisions_on_topic,
    group_offsets,
    wait_committed,
    wait_processed,
    wait_until,
)
from tests.support_traffic import BackgroundTraffic, publish

SEED = 20261206
#: Root obeys file permissions only without these capabilities.
AS_FILE_OWNER = ("setpriv", "--bounding-set", "-dac_override,-dac_read_search") if os.geteuid() == 0 else ()
#: Table -> (identity column, how the ground truth is found).
IDENTITY = {"turns": "event_id", "usage": "event_id", "runs": "event_id", "decisions": "decision_id",
            "dead_letters": "dead_letter_id"}


def _writable(directory: Path, writable: bool) -> None:
    """Add or remove every write permission bit on ``directory`` and everything beneath it."""
    bits = stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH
    for path in [directory, *directory.rglob("*")]:
        if path.is_symlink():
            continue
        mode = path.stat().st_mode
        path.chmod((mode | stat.S_IWUSR) if writable else (mode & ~bits))


@pytest.fixture
def read_only_once(settings: Settings) -> Iterator[Path]:
    """The chDB directory, made writable again however the test ends."""
    directory = chdb_directory(settings)
    assert directory is not None
    yield directory
    if directory.exists():
        _writable(directory, True)


def _physical_counts(settings: Settings) -> dict[str, tuple[int, int, int]]:
    """Per table, after ``OPTIMIZE ... FINAL``: count() without FINAL, with FINAL, and distinct identities.

    In a child process: it opens the chDB directory itself (the sink has stopped), and this test process may
    already host another chDB engine (one per process).
    """
    script = (
        "import json, sys, clickhouse_connect\n"
        "c = clickhouse_connect.get_client(dsn=sys.argv[1], database='ctxflow')\n"
        "out = {}\n"
        "for table, key in json.loads(sys.argv[2]).items():\n"
        "    c.command(f'OPTIMIZE TABLE {table} FINAL')\n"
        "    plain = c.query(f'SELECT count(), uniqExact({key}) FROM {table}').result_rows[0]\n"
        "    final = c.query(f'SELECT count() FROM {table} FINAL').result_rows[0][0]\n"
        "    out[table] = [plain[0], final, plain[1]]\n"
        "print(json.dumps(out))\n"
    )
    done = subprocess.run([sys.executable, "-c", script, settings.chdb_dsn, json.dumps(IDENTITY)],
                          capture_output=True, text=True, timeout=120, check=True)
    return {table: tuple(counts) for table, counts in json.loads(done.stdout.splitlines()[-1]).items()}


def test_a_chdb_directory_that_cannot_be_written_holds_back_nothing_but_the_sink(
    settings: Settings, read_only_once: Path
) -> None:
    settings = settings.model_copy(update={"sink": "off", "sink_web_port": free_port()})
    workload = Workload(SEED, tenants=4, sessions_per_tenant=3, eviction=True)
    publish(settings, workload.manifests())
    worker = WorkerProcess(settings).start()
    sink = SinkProcess(settings, wrap=AS_FILE_OWNER)
    traffic = BackgroundTraffic(settings, workload, rate_eps=300, duplicate_share=0.05, seed=SEED)
    try:
        sink.start()
        traffic.start()
        wait_until(sink.health, lambda h: h["rows_written"] > 500, timeout_s=60, what="the sink writing rows")

        _writable(read_only_once, False)
        failing = wait_until(sink.health, lambda h: h["state"] == "retrying", timeout_s=60,
                             what="the sink noticing it cannot write")
        assert failing["healthy"] is False and "Permission denied" in failing["last_error"], failing
        held = group_offsets(settings, sink_group(settings))
        decided = len(decisions_on_topic(settings))
        # Decisions go on: the worker commits more input and publishes more decisions while no row can be written.
        wait_committed(settings, committed_records(settings) + 1_000)
        wait_until(lambda: len(decisions_on_topic(settings)), lambda n: n > decided, timeout_s=60,
                   what="more decisions during the outage")
        during = sink.health()
        assert during["state"] == "retrying" and during["retries"] >= 2, during
        assert group_offsets(settings, sink_group(settings)) == held, "the sink committed offsets it did not write"

        _writable(read_only_once, True)
        sent = traffic.stop()
        wait_processed(settings, timeout_s=120)  # the worker, then the sink group, commit every record
        after = sink.health()
        assert after["state"] == "writing" and after["healthy"] and after["skipped"] == 0, after

        truth = {
            "turns": {e.event_id for e in sent if isinstance(e, TurnEvent)},
            "usage": {e.event_id for e in sent if isinstance(e, UsageReport)},
            "runs": {e.event_id for e in sent if isinstance(e, RunEvent)},
            "decisions": {d.decision_id for d in decisions_on_topic(settings)},
            "dead_letters": {d.dead_letter_id for d in dead_letters_on_topic(settings)},
        }
        for table, key in IDENTITY.items():
            stored = [row[0] for row in run_query(settings, f"SELECT {key} FROM {table}", direct_fallback=False).rows]
            assert len(stored) == len(set(stored)), f"{table}: an identity shows twice"
            assert set(stored) == truth[table], f"{table}: {len(truth[table] - set(stored))} missing, " \
                                                f"{len(set(stored) - truth[table])} not published"
    finally:
        traffic.cancel()
        sink.stop()
        worker.stop()
    # Nothing doubled even in storage: once merged, every row is one identity of the ground truth.
    physical = _physical_counts(settings)
    assert physical == {table: (len(ids), len(ids), len(ids)) for table, ids in truth.items()}, physical

