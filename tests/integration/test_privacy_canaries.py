"""No-retention runs leave no payload anywhere durable: a canary search over every store ctxflow writes.

Canary strings are planted in no-retention runs of every shape an agent publishes — messages, tool calls and
their results, retrieved chunks, memory candidates, a sub-agent that asks for ``retained``, a sub-agent built
apart from its parent's context that still names it, a sub-agent in another process built from its parent's
handoff asking for ``retained``, and enough history for the eviction planner to want a
summary — beside a retained control run carrying a control canary. The session's shared worker, and a
summarizer of the module's own beside it, serve the module. Then every place a payload could land is searched:
every topic of the deployment (changelogs included, keys and values as raw bytes), every ClickHouse table (every
column, as text), every Redis key and value, and every file under the deployment's home (logs, state, any object
store). The no-retention canary is found nowhere; the control canary is found, so the search itself is known to
see payloads.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from ctxflow.schemas.models import (
    EvictionPolicy,
    ItemKind,
    MemoryScope,
    MemoryType,
    PrivacyMode,
    Role,
    Slot,
    SlotCaps,
    TenantManifest,
)
from ctxflow.streams.config import Settings
from ctxflow.streams.sdk import CtxflowClient, RunContext
from ctxflow.streams.stack.summarizer_process import SummarizerProcess
from ctxflow.streams.stack.worker_process import WorkerProcess

from tests.support_deploy import SharedDeployment
from tests.support_kafka import read_full_topics, wait_processed, wait_until
from tests.support_traffic import publish

TENANT = "canary-co"
CAP = 1_200


@dataclass(frozen=True)
class Canaries:
    """The secret planted in no-retention runs and the control planted in a retained run."""

    secret: str
    control: str


@dataclass
class World:
    settings: Settings
    worker: WorkerProcess
    canaries: Canaries
    control_run: str


def _manifest() -> TenantManifest:
    # A small history cap, so both runs come under pressure and the planner considers compressing them.
    return TenantManifest(
        tenant_id=TENANT, version=1, tier="standard", slot_caps=SlotCaps(history=CAP), total_cap=100_000,
        updated_at=datetime.now(UTC), eviction=EvictionPolicy(keep_recent=2),
    )


def _note(canary: str, i: int) -> str:
    return (f"Step {i}: order ORD-{7000 + i} for {canary} totalled ${100 + i}.25; shipment left on "
            f"2026-02-{10 + i % 18:02d}; retry budget {i + 3} attempts. " * 4)


async def _publish_runs(settings: Settings, canaries: Canaries, control: RunContext) -> None:
    secret = canaries.secret
    private = RunContext(tenant_id=TENANT, user_id="u1", session_id="s-private", agent_id="planner",
                         model="gpt-4o", privacy=PrivacyMode.NO_RETENTION)
    async with CtxflowClient.from_settings(settings) as client:
        async with client.run(private):
            await client.publish_turn(private.turn(Role.USER, ItemKind.MESSAGE, Slot.HISTORY,
                                                   f"My goal: reconcile the ledger of {secret}."))
            call = private.tool_call(f'{{"tool": "lookup", "customer": "{secret}"}}')
            await client.publish_turn(call)
            await client.publish_turn(private.tool_result(call, f"record of {secret}: balance $1,204.50"))
            await client.publish_turn(private.turn(Role.TOOL, ItemKind.RETRIEVED_CHUNK, Slot.RETRIEVED,
                                                   f"retrieved: {secret} opened the account in 2019"))
            await client.publish_memory_candidate(private.memory_candidate(
                MemoryScope.USER, MemoryType.PREFERENCE, f"{secret} prefers email", confidence=0.9))
            # What a candidate states beside its content is payload too.
            await client.publish_memory_candidate(private.memory_candidate(
                MemoryScope.USER, MemoryType.FACT, "The customer's preferred channel", confidence=0.9,
                subject=f"customer {secret}", attribute="channel", value=f"email to {secret}"))
            for i in range(30):  # enough history for the planner to want a summary
                await client.publish_turn(private.turn(Role.ASSISTANT if i % 2 else Role.USER, ItemKind.MESSAGE,
                                                       Slot.HISTORY, _note(secret, i)))
            # A sub-agent that asks for retained under a no-retention parent.
            child = private.child("researcher", privacy=PrivacyMode.RETAINED)
            async with client.run(child):
                await client.publish_turn(child.turn(Role.ASSISTANT, ItemKind.MESSAGE, Slot.HISTORY,
                                                     f"child notes on {secret}"))
            # A sub-agent whose context was built apart from the parent's, naming it and asking for retained.
            careless = RunContext(tenant_id=TENANT, user_id="u1", session_id="s-private", agent_id="helper",
                                  model="gpt-4o", parent_run_id=private.run_id, workflow_id=private.workflow_id)
            async with client.run(careless):
                await client.publish_turn(careless.turn(Role.ASSISTANT, ItemKind.MESSAGE, Slot.HISTORY,
                                                        f"careless notes on {secret}"))
            # A sub-agent in another process (its own client, which never saw the parent) asking for retained:
            # it is built from the parent's handoff, as the SDK tells sub-agent runtimes to.
            handoff = private.handoff().model_dump_json()
            async with CtxflowClient.from_settings(settings) as elsewhere:
                remote = RunContext.delegated(handoff, "remote-researcher", privacy=PrivacyMode.RETAINED)
                async with elsewhere.run(remote):
                    await elsewhere.publish_turn(remote.turn(Role.ASSISTANT, ItemKind.MESSAGE, Slot.HISTORY,
                                                             f"remote notes on {secret}"))
        async with client.run(control):
            await client.publish_turn(control.turn(Role.USER, ItemKind.MESSAGE, Slot.HISTORY,
                                                   f"My goal: reconcile the ledger of {canaries.control}."))
            for i in range(30):
                await client.publish_turn(control.turn(Role.ASSISTANT if i % 2 else Role.USER, ItemKind.MESSAGE,
                                                       Slot.HISTORY, _note(canaries.control, i)))
        await client.flush()


@pytest.fixture(scope="module")
def world(shared_deployment: SharedDeployment) -> Iterator[World]:
    settings, worker = shared_deployment.settings, shared_deployment.worker
    tag = uuid.uuid4().hex[:10]
    canaries = Canaries(secret=f"CANARY-SECRET-{tag}", control=f"CANARY-CONTROL-{tag}")
    control = RunContext(tenant_id=TENANT, user_id="u2", session_id="s-control", agent_id="planner", model="gpt-4o")
    with SummarizerProcess(settings):
        publish(settings, [_manifest()])
        wait_processed(settings)
        asyncio.run(_publish_runs(settings, canaries, control))
        wait_processed(settings)
        # The summarizer answers the planner's compression of the control run: wait for that summary, so the
        # search below also covers what summaries carry.
        summaries = settings.topic("summaries")
        wait_until(lambda: _found_on_topics(settings, canaries.control, [summaries]), bool, timeout_s=90,
                   what="the control run's summary")
        wait_processed(settings)
        yield World(settings, worker, canaries, control.run_id)


def _topics(settings: Settings) -> list[str]:
    async def names() -> list[str]:
        from aiokafka import AIOKafkaConsumer

        consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap)
        await consumer.start()
        try:
            return sorted(t for t in await consumer.topics()
                          if t.startswith((f"{settings.topic_prefix}.", f"{settings.app_id}-")))
        finally:
            await consumer.stop()

    return asyncio.run(names())


def _found_on_topics(settings: Settings, canary: str, topics: list[str] | None = None) -> set[str]:
    needle = canary.encode()
    records = asyncio.run(read_full_topics(settings, topics or _topics(settings)))
    return {r.topic for r in records if needle in (r.key or b"") or needle in (r.value or b"")}


def _found_in_clickhouse(worker: WorkerProcess, canary: str) -> set[str]:
    tables = [row[0] for row in worker.query(
        "SELECT name FROM system.tables WHERE database = currentDatabase() AND engine NOT LIKE '%View%'").rows]
    assert "turns" in tables and "decisions" in tables
    return {t for t in tables if any(canary in repr(row) for row in worker.query(f"SELECT * FROM `{t}`").rows)}


def _found_in_redis(settings: Settings, canary: str) -> set[str]:
    async def search() -> set[str]:
        client = aioredis.from_url(settings.redis_url)
        found: set[str] = set()
        try:
            async for key in client.scan_iter(count=1000):
                kind = (await client.type(key)).decode()
                if kind == "string":
                    values = [await client.get(key)]
                elif kind == "hash":
                    values = [b"%s=%s" % kv for kv in (await client.hgetall(key)).items()]
                elif kind == "list":
                    values = await client.lrange(key, 0, -1)
                elif kind == "set":
                    values = list(await client.smembers(key))
                elif kind == "zset":
                    values = [m for m, _ in await client.zrange(key, 0, -1, withscores=True)]
                elif kind == "stream":
                    values = [repr(entry).encode() for entry in await client.xrange(key)]
                else:
                    values = []
                if canary.encode() in key or any(canary.encode() in (v or b"") for v in values):
                    found.add(key.decode(errors="replace"))
        finally:
            await client.aclose()
        return found

    return asyncio.run(search())


def _found_in_files(home: Path, canary: str) -> set[str]:
    needle = canary.encode()
    return {str(p.relative_to(home)) for p in home.rglob("*") if p.is_file() and needle in p.read_bytes()}


def test_the_no_retention_canary_is_on_no_topic(world: World) -> None:
    assert _found_on_topics(world.settings, world.canaries.secret) == set()


def test_the_no_retention_canary_is_in_no_clickhouse_table(world: World) -> None:
    assert _found_in_clickhouse(world.worker, world.canaries.secret) == set()


def test_the_no_retention_canary_is_in_no_redis_key(world: World) -> None:
    assert _found_in_redis(world.settings, world.canaries.secret) == set()


def test_the_no_retention_canary_is_in_no_file_or_log(world: World) -> None:
    logs = list((world.settings.home / "logs").glob("*.log"))
    assert {p.name for p in logs} >= {"worker.log", "summarizer.log"}  # the logs exist and are searched
    assert _found_in_files(world.settings.home, world.canaries.secret) == set()


def test_the_retained_control_canary_is_found(world: World) -> None:
    """The search sees payloads: the control run's content is on the turns topic, in ClickHouse's turns table,
    and in the summary the summarizer wrote for it."""
    topics = _found_on_topics(world.settings, world.canaries.control)
    assert world.settings.topic("turns") in topics and world.settings.topic("summaries") in topics
    assert "turns" in _found_in_clickhouse(world.worker, world.canaries.control)


def test_the_no_retention_runs_were_still_counted(world: World) -> None:
    """Privacy drops payloads, not accounting: every no-retention turn reached ClickHouse with its digest."""
    rows = world.worker.query(
        "SELECT privacy, count(), countIf(content IS NULL), countIf(content_digest != '') FROM turns "
        f"WHERE tenant_id = '{TENANT}' GROUP BY privacy ORDER BY privacy").rows
    counts = {row[0]: row[1:] for row in rows}
    private = counts["no_retention"]
    assert private[0] == 2 + 1 + 1 + 30 + 1 + 1 + 1 and private[1] == private[0] and private[2] == private[0]
