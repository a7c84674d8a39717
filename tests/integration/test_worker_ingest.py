"""The worker ingests Avro events from the broker into ClickHouse, once each, and dead-letters bad records.

One worker serves the module (starting one costs several seconds): each test publishes a workload of its own seed,
whose sessions no other test uses, and counts only its own sessions' rows.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator

import pytest
from aiokafka import AIOKafkaConsumer
from ctxflow.schemas.codec import Codec
from ctxflow.schemas.models import DeadLetter, PrivacyMode, TurnEvent
from ctxflow.streams.config import Settings
from ctxflow.streams.demo.workload import Workload
from ctxflow.streams.sdk import CtxflowClient
from ctxflow.streams.stack.embedded import EmbeddedStack
from ctxflow.streams.stack.worker_process import WorkerProcess, settings_env
from pydantic import BaseModel

from tests.support_deploy import fresh_settings


@pytest.fixture(scope="module")
def deployment(
    stack: EmbeddedStack, tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Settings, WorkerProcess]]:
    """The module's topics and its one worker."""
    settings = fresh_settings(stack, tmp_path_factory.mktemp("worker-ingest") / "home")
    with WorkerProcess(settings) as worker:
        yield settings, worker


@pytest.fixture
def settings(deployment: tuple[Settings, WorkerProcess]) -> Settings:
    return deployment[0]


@pytest.fixture
def worker(deployment: tuple[Settings, WorkerProcess]) -> WorkerProcess:
    return deployment[1]


def sessions_of(events: Iterable[BaseModel]) -> str:
    """A SQL condition selecting the rows of these events' sessions (a seed's sessions are its own)."""
    ids = sorted({e.session_id for e in events if isinstance(e, TurnEvent)})
    return "session_id IN (" + ", ".join(f"'{i}'" for i in ids) + ")"


def wait_for(probe: Callable[[], object], expected: object, timeout_s: float = 60.0) -> object:
    """Poll ``probe`` until it returns ``expected``; fail with the last value seen."""
    deadline = time.monotonic() + timeout_s
    seen = probe()
    while seen != expected and time.monotonic() < deadline:
        time.sleep(0.2)
        seen = probe()
    assert seen == expected, f"waited {timeout_s}s for {expected!r}, last saw {seen!r}"
    return seen


async def _publish(settings: Settings, workload: Workload, events: list) -> None:
    async with CtxflowClient.from_settings(settings) as client:
        for manifest in workload.manifests():
            await client.set_manifest(manifest)
        for event in events:
            await client.publish(event)
        await client.flush()


def test_events_reach_clickhouse_exactly_once_per_tenant(settings: Settings, worker: WorkerProcess) -> None:
    workload = Workload(11, tenants=4, sessions_per_tenant=2, max_events=1500)
    events = list(workload.events())
    asyncio.run(_publish(settings, workload, events))
    truth = workload.ground_truth(events)

    expected_turns = sum(1 for e in events if type(e).__name__ == "TurnEvent")
    ours = sessions_of(events)
    worker.wait_caught_up()
    assert worker.scalar(f"SELECT count() FROM turns WHERE {ours}") == expected_turns
    per_tenant = f"SELECT tenant_id, sum(token_count) FROM turns WHERE {ours} GROUP BY tenant_id ORDER BY tenant_id"
    assert {tenant: tokens for tenant, tokens in worker.query(per_tenant).rows} == truth.tenant_tokens

    # Redelivery: the same events again (an SDK retry storm) change nothing visible to analysts.
    asyncio.run(_publish(settings, workload, events))
    worker.wait_caught_up()
    assert worker.scalar(f"SELECT count() FROM turns WHERE {ours}") == expected_turns
    assert {tenant: tokens for tenant, tokens in worker.query(per_tenant).rows} == truth.tenant_tokens


def test_bad_records_go_to_the_dead_letter_topic_with_reasons(settings: Settings, worker: WorkerProcess) -> None:
    workload = Workload(3, tenants=2, sessions_per_tenant=1, max_events=50)
    poison = workload.poison_records()
    letters_before = worker.scalar("SELECT count() FROM dead_letters")

    async def publish_and_read() -> list[DeadLetter]:
        async with CtxflowClient.from_settings(settings) as client:
            for record in poison:
                await client.send_raw(settings.topic(record.topic.name), record.key, record.value)
            for event in workload.events():
                await client.publish(event)
            await client.flush()
        consumer = AIOKafkaConsumer(
            settings.topic("deadletters"), bootstrap_servers=settings.bootstrap, auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await consumer.start()
        letters: list[DeadLetter] = []
        try:
            deadline = time.monotonic() + 60
            while len(letters) < len(poison) and time.monotonic() < deadline:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    letters += [Codec().decode(r.value, DeadLetter) for r in records]
        finally:
            await consumer.stop()
        return letters

    letters = asyncio.run(publish_and_read())
    assert len(letters) == len(poison), "the module's other tests send no bad records"
    assert sorted(dl.reason_code for dl in letters) == sorted(p.expected_reason for p in poison)
    assert all(dl.reason and dl.source_topic.startswith(settings.topic_prefix) for dl in letters)
    # The worker kept going: the good events after the poison were ingested.
    worker.wait_caught_up()
    assert worker.scalar(f"SELECT count() FROM turns WHERE {sessions_of(workload.events())}") > 0
    assert worker.scalar("SELECT count() FROM dead_letters") - letters_before == len(poison)


def test_ctxflow_query_goes_through_the_running_worker(settings: Settings, worker: WorkerProcess) -> None:
    workload = Workload(5, tenants=2, sessions_per_tenant=1, max_events=300)
    events = list(workload.events())
    asyncio.run(_publish(settings, workload, events))
    worker.wait_caught_up()
    # The CLI process cannot open the worker's chDB directory (chDB locks it): the answer must come from the worker.
    done = subprocess.run(
        [sys.executable, "-m", "ctxflow.streams.cli", "query", "--json",
         f"SELECT tenant_id, count() AS turns FROM turns WHERE {sessions_of(events)} GROUP BY tenant_id "
         "ORDER BY tenant_id"],
        env=settings_env(settings), capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)["rows"]
    expected = Counter(e.tenant_id for e in events if isinstance(e, TurnEvent))
    assert {tenant: turns for tenant, turns in rows} == dict(expected)

    refused = subprocess.run(
        [sys.executable, "-m", "ctxflow.streams.cli", "query", "DROP TABLE turns"],
        env=settings_env(settings), capture_output=True, text=True, timeout=60, check=False,
    )
    assert refused.returncode == 1
    assert "read-only" in refused.stdout + refused.stderr


def test_no_retention_payloads_never_reach_clickhouse(settings: Settings, worker: WorkerProcess) -> None:
    workload = Workload(9, tenants=3, sessions_per_tenant=3, max_events=1500, no_retention_run_share=0.5)
    events = list(workload.events())
    private = [e for e in events if isinstance(e, TurnEvent) and e.privacy == PrivacyMode.NO_RETENTION]
    assert private, "the workload must contain no-retention turns for this test to mean anything"
    asyncio.run(_publish(settings, workload, events))
    worker.wait_caught_up()
    ours = sessions_of(events)
    assert worker.scalar(f"SELECT count() FROM turns WHERE {ours} AND privacy = 'no_retention'") == len(private)
    assert worker.scalar(f"SELECT count() FROM turns WHERE {ours} AND privacy = 'no_retention' "
                         "AND content IS NOT NULL") == 0
    assert worker.scalar(f"SELECT count() FROM turns WHERE {ours} AND privacy = 'retained' AND content IS NOT NULL") > 0
