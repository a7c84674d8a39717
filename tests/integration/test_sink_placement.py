"""Where the ClickHouse sink runs: one process holds the embedded chDB, every worker decides.

A second worker on the default stack (same home, so the same chDB directory) starts, takes half the partitions and
decides for them while the first one holds the sink; queries reach the holder whichever process is asked; when the
holder exits, the other worker takes the sink over. A standalone ``ctxflow sink`` skips records that do not decode
and keeps going, and a second one on the same directory refuses to start, naming the holder.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections import Counter

import pytest
from ctxflow.processors.admission import TOTAL
from ctxflow.schemas.models import ItemKind, Role, Slot, TurnEvent
from ctxflow.streams.config import Settings
from ctxflow.streams.demo.workload import Workload
from ctxflow.streams.sdk import RunContext
from ctxflow.streams.sink.ownership import current_owner
from ctxflow.streams.stack.processes import free_port
from ctxflow.streams.stack.query import run_query
from ctxflow.streams.stack.sink_process import SinkNotReady, SinkProcess
from ctxflow.streams.stack.worker_process import WorkerNotReady, WorkerProcess, settings_env

from tests.support_deploy import redis_headroom
from tests.support_kafka import decisions_on_topic, tenants_on_every_partition, wait_processed, wait_until
from tests.support_traffic import publish, send_raw


def _turns(runs: list[RunContext], tokens: int) -> list[TurnEvent]:
    return [r.turn(Role.USER, ItemKind.MESSAGE, Slot.HISTORY, f"{tokens} tokens", token_count=tokens) for r in runs]


def sink_query(settings: Settings, sql: str) -> object:
    """The single value of a one-row, one-column analyst query, from the process holding the chDB directory."""
    return run_query(settings, sql, direct_fallback=False).rows[0][0]


def _cli_query(settings: Settings, sql: str) -> list[list[object]]:
    done = subprocess.run([sys.executable, "-m", "ctxflow.streams.cli", "query", "--json", sql],
                          env=settings_env(settings), capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)["rows"]


def test_a_second_worker_on_the_embedded_stack_decides_while_the_first_holds_the_sink(settings: Settings) -> None:
    runs = [RunContext(tenant_id=t, user_id="user", session_id="session", agent_id="agent", model="gpt-4o")
            for t in tenants_on_every_partition(settings.partitions, 2)]
    first = WorkerProcess(settings, name="first").start()
    # The same home, hence the same chDB directory; only the web port differs.
    second = WorkerProcess(settings.model_copy(update={"web_port": free_port()}), name="second")
    try:
        second.start(ready_timeout_s=120, sole=False)
        assert first.health()["sink"]["state"] == "writing"
        elsewhere = second.health()["sink"]
        assert elsewhere["state"] == "elsewhere" and elsewhere["owner_pid"] == first.pid, elsewhere
        wait_until(lambda: (first.partitions(), second.partitions()),
                   lambda owned: all(owned) and sorted(owned[0] + owned[1]) == list(range(settings.partitions)),
                   timeout_s=120, what="the partitions split between the two workers")

        publish(settings, _turns(runs, 100))
        wait_processed(settings)
        # Both decided: every run's headroom is projected, by whichever worker owns its tenant's partition.
        assert {r.tenant_id: redis_headroom(settings, r.tenant_id, r.run_id).used[TOTAL] for r in runs} == {
            r.tenant_id: 100 for r in runs}
        # Queries reach the holder, whoever is asked.
        assert _cli_query(settings, "SELECT count() FROM turns") == [[len(runs)]]
        assert second.scalar("SELECT count() FROM turns") == len(runs)
        request = urllib.request.Request(f"http://127.0.0.1:{second.settings.web_port}/query",
                                         data=b'{"sql": "SELECT 1"}', headers={"content-type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 409 and str(first.pid) in json.loads(refused.value.read())["error"]
        # A worker that must hold the sink (CTXFLOW_SINK=on) refuses to start, naming the holder.
        insisting = WorkerProcess(settings.model_copy(update={"web_port": free_port(), "sink": "on"}), name="on")
        with pytest.raises(WorkerNotReady) as exited:
            insisting.start(ready_timeout_s=60, sole=False)
        assert "exited with 1" in str(exited.value) and f"worker pid {first.pid}" in str(exited.value)

        # The holder exits: the other worker takes the sink over and writes what came meanwhile.
        first.stop()
        wait_until(lambda: second.health()["sink"]["state"], lambda state: state == "writing", timeout_s=60,
                   what="the second worker taking the sink over")
        assert current_owner(settings).pid == second.pid
        publish(settings, _turns(runs, 10))
        second.wait_ready(120)
        second.wait_caught_up()
        assert second.query("SELECT count(), sum(token_count) FROM turns").rows == [(2 * len(runs), 110 * len(runs))]
    finally:
        first.stop()
        second.stop()


def test_a_standalone_sink_skips_what_does_not_decode_and_holds_the_directory(settings: Settings) -> None:
    settings = settings.model_copy(update={"sink": "off", "sink_web_port": free_port()})
    workload = Workload(5, tenants=2, sessions_per_tenant=1, max_events=300)
    events, poison = list(workload.events()), workload.poison_records()
    worker = WorkerProcess(settings).start()
    sink = SinkProcess(settings)
    try:
        sink.start()
        publish(settings, workload.manifests())
        send_raw(settings, [(p.topic.name, p.key, p.value) for p in poison])
        publish(settings, events)
        wait_processed(settings)
        health = sink.health()
        assert health["healthy"] and health["skipped"] == len(poison), health  # all four are turns or usage
        expected = Counter(e.tenant_id for e in events if isinstance(e, TurnEvent))
        assert dict(_cli_query(settings, "SELECT tenant_id, count() FROM turns GROUP BY tenant_id")) == expected
        assert sink_query(settings, "SELECT count() FROM dead_letters") == len(poison)
        assert sink_query(settings, "SELECT count() FROM decisions") == len(
            {d.decision_id for d in decisions_on_topic(settings)})
        assert worker.health()["sink"] == {"state": "off", "healthy": True}

        again = SinkProcess(settings.model_copy(update={"sink_web_port": free_port()}), name="sink-2")
        with pytest.raises(SinkNotReady) as refused:
            again.start(ready_timeout_s=60)
        assert f"sink pid {sink.pid}" in str(refused.value) and "exited with 1" in str(refused.value)
    finally:
        sink.stop()
        worker.stop()

