"""Recall and stale-context notices end to end: SDK recall through the worker's query path, retrieval events on
``turns``, a superseding fact, and the notice reaching the runs that held the old one through the SDK's decision
subscription, never a run of another tenant.

Two tenants whose ids differ only in case hold the same fact and share user, session and run ids. Two concurrent
runs of the first recall it; a newer contradicting fact supersedes it; both runs are told, naming the
replacement; the other tenant's run, which recalled its own copy, is told nothing; a recall now returns the new
fact and not the old. The session's shared worker serves the module: its tenants are its own.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest
from ctxflow.schemas.models import (
    Decision,
    DecisionKind,
    MemoryGovernance,
    MemoryScope,
    MemoryType,
    SlotCaps,
    StaleMemory,
    TenantManifest,
    Verification,
)
from ctxflow.streams.config import Settings
from ctxflow.streams.sdk import ContextWindow, CtxflowClient, RunContext, SyncCtxflowClient
from ctxflow.streams.sdk.context_window import MEMORY_PREFIX
from ctxflow.streams.sdk.recall import RecallHit
from ctxflow.streams.stack.worker_process import WorkerProcess

from tests.support_deploy import SharedDeployment
from tests.support_kafka import decisions_on_topic, wait_processed
from tests.support_traffic import publish

TENANT, OTHER = "recall-e2e", "RECALL-E2E"
FACT = {"scope": MemoryScope.TENANT, "type_": MemoryType.FACT, "confidence": 0.9, "subject": "acme",
        "attribute": "seats", "verification": Verification.SYSTEM_OF_RECORD, "verified_by": "billing"}


def run(tenant: str, run_id: str) -> RunContext:
    return RunContext(tenant_id=tenant, user_id="ada", session_id="s-1", agent_id="assistant", model="gpt-4o",
                      run_id=run_id)


def manifest(tenant: str) -> TenantManifest:
    return TenantManifest(tenant_id=tenant, version=1, tier="pro", slot_caps=SlotCaps(), total_cap=1_000_000,
                          updated_at=datetime.now(UTC), memory=MemoryGovernance(trusted_systems=["billing"]))


@dataclass
class World:
    settings: Settings
    worker: WorkerProcess
    held: dict[str, list[RecallHit]]
    after: list[RecallHit]


def recall(settings: Settings, ctx: RunContext, query: str, publish: bool = True) -> list[RecallHit]:
    async def go() -> list[RecallHit]:
        async with CtxflowClient.from_settings(settings) as client:
            return await client.recall(ctx, query, publish=publish)

    return asyncio.run(go())


async def _concurrent_recalls(settings: Settings, runs: dict[str, RunContext]) -> dict[str, list[RecallHit]]:
    async with CtxflowClient.from_settings(settings) as client:
        found = await asyncio.gather(*(client.recall(ctx, "How many seats does Acme have?") for ctx in runs.values()))
    return dict(zip(runs, found, strict=True))


@pytest.fixture(scope="module")
def world(shared_deployment: SharedDeployment) -> World:
    settings, worker = shared_deployment.settings, shared_deployment.worker
    runs = {"a": run(TENANT, "run-a"), "b": run(TENANT, "run-b"), "other": run(OTHER, "run-a")}
    publish(settings, [manifest(TENANT), manifest(OTHER)])
    wait_processed(settings)
    writer = run(TENANT, "run-writer")
    publish(settings, [ctx.started() for ctx in runs.values()] + [
        writer.memory_candidate(content="Acme's plan has 50 seats", value="50", **FACT),
        run(OTHER, "run-writer").memory_candidate(content="Acme's plan has 50 seats", value="50", **FACT),
    ])
    wait_processed(settings)
    held = asyncio.run(_concurrent_recalls(settings, runs))
    wait_processed(settings)  # the worker knows who holds what
    publish(settings, [writer.memory_candidate(content="Acme upgraded to 75 seats", value="75", **FACT)])
    wait_processed(settings)
    return World(settings, worker, held, recall(settings, runs["a"], "seats", publish=False))


def _stale_notice(settings: Settings, tenant: str, run_id: str) -> Decision:
    async def first() -> Decision:
        async with CtxflowClient.from_settings(settings) as client, asyncio.timeout(30):
            stream = client.decisions(tenant, run_id=run_id, from_beginning=True)
            async with contextlib.aclosing(aiter(stream)) as items:  # type: ignore[type-var]
                async for decision in items:
                    if decision.kind is DecisionKind.STALE_CONTEXT:
                        return decision
        raise AssertionError("the decision stream ended")

    return asyncio.run(first())


def test_a_recall_reaches_only_its_own_tenants_record(world: World) -> None:
    (a,), (b,), (other,) = world.held["a"], world.held["b"], world.held["other"]
    assert a.memory_id == b.memory_id and a.text == "Acme's plan has 50 seats" and a.scope is MemoryScope.TENANT
    assert other.memory_id != a.memory_id  # the same fact, the other tenant's own record


def test_the_runs_holding_a_superseded_fact_are_told_its_replacement(world: World) -> None:
    (new,) = world.after
    old = world.held["a"][0]
    assert new.text == "Acme upgraded to 75 seats" and new.memory_id != old.memory_id
    for run_id in ("run-a", "run-b"):
        notice = _stale_notice(world.settings, TENANT, run_id)
        assert notice.stale == [StaleMemory(memory_id=old.memory_id, status="superseded", replaced_by=new.memory_id)]
        window = ContextWindow(run_id=run_id)
        window.add({"role": "tool", "content": old.text}, item_id=old.memory_id)
        assert window.apply(notice) and window.item_ids() == []
        assert window.stale[old.memory_id].replaced_by == new.memory_id
    told = [d for d in decisions_on_topic(world.settings)
            if d.kind is DecisionKind.STALE_CONTEXT and d.tenant_id in (TENANT, OTHER)]  # the deployment is shared
    assert sorted((d.tenant_id, d.run_id) for d in told) == [(TENANT, "run-a"), (TENANT, "run-b")]


def test_recall_returns_the_new_fact_and_not_the_old(world: World) -> None:
    assert [h.text for h in world.after] == ["Acme upgraded to 75 seats"]
    with SyncCtxflowClient.from_settings(world.settings) as client:  # the blocking twin, same path
        (other,) = client.recall(run(OTHER, "run-a"), "seats", publish=False)
    assert other.text == "Acme's plan has 50 seats"  # the other tenant's fact stands


def test_retrieval_events_reach_the_turns_table(world: World) -> None:
    rows = world.worker.query(
        f"SELECT run_id, item_id, kind, slot, layer FROM turns WHERE tenant_id = '{TENANT}' AND kind = 'memory' "
        "ORDER BY run_id").rows
    old = world.held["a"][0].memory_id
    assert rows == [("run-a", old, "memory", "retrieved", "tenant"), ("run-b", old, "memory", "retrieved", "tenant")]


def test_a_memory_recalled_twice_into_a_window_is_read_and_counted_once(world: World) -> None:
    tenant, settings = "recall-e2e-window", world.settings  # a tenant of its own: the deployment is shared
    publish(settings, [manifest(tenant)])
    wait_processed(settings)
    publish(settings, [run(tenant, "run-writer").memory_candidate(content="Acme's plan has 50 seats", value="50",
                                                                   **FACT)])
    wait_processed(settings)
    reader = run(tenant, "run-reader")
    window = ContextWindow(run_id=reader.run_id)

    async def twice() -> tuple[list[RecallHit], list[RecallHit]]:
        async with CtxflowClient.from_settings(settings) as client:
            return (await client.recall(reader, "How many seats does Acme have?", window=window),
                    await client.recall(reader, "Acme seats", window=window))

    first, again = asyncio.run(twice())
    assert [h.memory_id for h in first] == [h.memory_id for h in again] and len(first) == 1
    # The model reads it (not as an orphan tool message, which the window would drop), once.
    assert window.messages() == [{"role": "assistant", "content": MEMORY_PREFIX + "Acme's plan has 50 seats"}]
    wait_processed(settings)
    rows = world.worker.query(f"SELECT item_id FROM turns WHERE tenant_id = '{tenant}' AND kind = 'memory'").rows
    assert rows == [(first[0].memory_id,)]  # one retrieval event: the budget counts it once
