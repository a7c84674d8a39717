"""The ClickHouse sink runtime's pure parts: what it projects, its backoff, its status, who holds a chDB directory."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import random
import subprocess
import sys
from pathlib import Path

from ctxflow.sinks.clickhouse_ddl import TABLE_BY_MODEL
from ctxflow.streams.config import Settings
from ctxflow.streams.sink.backoff import Backoff
from ctxflow.streams.sink.catalogue import PROJECTED, decided_by_workers, keyed_by_tenant, sink_group
from ctxflow.streams.sink.ownership import (
    BackendHeld,
    announce,
    chdb_directory,
    current_owner,
    open_backend,
    redacted,
    retire,
)
from ctxflow.streams.sink.status import PartitionLag, SinkStatus
from ctxflow.streams.topics import ALL_TOPICS, DECISIONS, INVALIDATIONS, TURNS
from hypothesis import given
from hypothesis import strategies as st


def test_every_projected_topic_is_in_the_catalogue_and_has_a_table() -> None:
    assert set(PROJECTED) <= set(ALL_TOPICS)
    assert all(model in TABLE_BY_MODEL for model in PROJECTED.values())
    assert len({TABLE_BY_MODEL[m].name for m in PROJECTED.values()}) == len(PROJECTED)  # one table per topic
    assert keyed_by_tenant(TURNS) and not keyed_by_tenant(DECISIONS)  # decisions are keyed tenant:run


def test_the_sink_waits_for_the_workers_verdicts_only_on_what_others_send_them() -> None:
    assert decided_by_workers(TURNS) and not decided_by_workers(DECISIONS)
    # The workers read their invalidations back (for the eviction planner); the sink projects them as written.
    assert not decided_by_workers(INVALIDATIONS)


def test_the_sink_group_is_apart_from_the_workers() -> None:
    settings = Settings(app_id="acme-worker")
    assert sink_group(settings) == "acme-worker-sink" != settings.app_id
    assert sink_group(settings.model_copy(update={"sink_group": "replay-into-new-clickhouse"})) == (
        "replay-into-new-clickhouse")


@given(first=st.floats(0.01, 5), cap=st.floats(5, 120), failures=st.integers(1, 80), floor=st.floats(0, 10),
       seed=st.integers(0, 2**32))
def test_backoff_doubles_within_its_cap_and_never_below_half_or_the_floor(
    first: float, cap: float, failures: int, floor: float, seed: int
) -> None:
    backoff = Backoff(first, cap, random.Random(seed))
    for n in range(failures):
        nominal = min(cap, first * 2**n)
        delay = backoff.next(floor)
        assert max(floor, nominal / 2) <= delay <= max(floor, nominal)
    backoff.reset()
    assert backoff.next() <= first


def test_status_is_healthy_only_while_writing_and_reports_lag() -> None:
    lags = (PartitionLag("t.turns", 0, 90, 100), PartitionLag("t.turns", 1, None, 7),
            PartitionLag("t.runs", 0, 3, None))
    status = SinkStatus(group="g", backend="chdb:///x", state="retrying", rows_written=5, flushes=1, retries=3,
                        skipped=0, buffered=12, held=3, last_error="DatabaseError: Permission denied",
                        failing_for_s=4.26, first_record_at=1.0, last_commit_at=2.0, partitions=lags)
    assert [p.lag for p in lags] == [10, 7, None]
    shown = status.as_json()
    assert shown["healthy"] is False and shown["failing_for_s"] == 4.3
    assert [p["lag"] for p in shown["partitions"]] == [10, 7, None]
    json.dumps(shown)  # /health serves it as is
    writing = dataclasses.replace(status, state="writing", failing_for_s=None)
    assert writing.healthy and writing.as_json()["failing_for_s"] is None


def test_passwords_never_reach_logs() -> None:
    assert redacted("http://ctxflow:s3cret@clickhouse:8123/default") == "http://ctxflow:***@clickhouse:8123/default"
    assert redacted("chdb:///data/clickhouse") == "chdb:///data/clickhouse"
    assert redacted("http://clickhouse:8123/") == "http://clickhouse:8123/"


def test_the_owner_file_is_trusted_only_while_its_process_runs(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    directory = chdb_directory(settings)
    assert directory == (tmp_path / "clickhouse").resolve()
    assert current_owner(settings) is None
    announce(settings, "worker", "http://127.0.0.1:6066/query")
    owner = current_owner(settings)
    assert owner is not None and (owner.pid, owner.role, owner.query_url) == (
        os.getpid(), "worker", "http://127.0.0.1:6066/query")
    retire(settings)
    assert current_owner(settings) is None

    exited = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = directory.with_name(f"{directory.name}.owner.json")
    stale.write_text(json.dumps({"pid": int(exited.stdout), "role": "worker", "query_url": None, "start_time": 1}))
    assert current_owner(settings) is None  # a crashed owner's file is ignored
    assert chdb_directory(Settings(clickhouse_dsn="http://ch:8123/")) is None


def test_a_locked_directory_is_held_and_names_its_holder(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    directory = chdb_directory(settings)
    assert directory is not None
    directory.mkdir(parents=True)
    (directory / "status").write_text("PID: 4242\nStarted at: 2026-12-06 11:35:52\nRevision: 54515\n")
    # chDB holds an exclusive flock on its status file; a child process stands in for another chDB here.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time\n"
         f"f = open({str(directory / 'status')!r}); fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True)\n"
         "sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        try:
            open_backend(settings)
        except BackendHeld as held:
            assert held.owner is not None and held.owner.pid == 4242 and "4242" in str(held)
        else:
            raise AssertionError("a locked chDB directory was opened")
    finally:
        holder.communicate("", timeout=10)
    with open(directory / "status") as status:  # released with its holder
        fcntl.flock(status, fcntl.LOCK_EX | fcntl.LOCK_NB)
