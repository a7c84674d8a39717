"""Eviction end to end through the real worker and summarizer: a run under pressure is relieved, not rejected.

One worker and one summarizer process serve the module. A run of a tenant with a small history cap publishes
turns through the SDK while the agent's own subscription follows its decisions into a ``ContextWindow``, as an
agent would. What the tests check is what that agent and an operator would see: decisions on the topic and in
Redis, the run's headroom in Redis, its budget state coming back down, a summary prepared off the hot path and
swapped in, and the agent's message list staying valid and shorter.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest
from ctxflow.schemas.models import (
    BudgetState,
    Decision,
    DecisionKind,
    EvictionPolicy,
    ItemKind,
    Role,
    Slot,
    SlotCaps,
    TenantManifest,
)
from ctxflow.streams.config import Settings
from ctxflow.streams.sdk import BudgetReader, CtxflowClient, RunContext
from ctxflow.streams.stack.embedded import EmbeddedStack
from ctxflow.streams.stack.summarizer_process import SummarizerProcess
from ctxflow.streams.stack.worker_process import WorkerProcess

from ctxflow import ContextWindow
from tests.support_deploy import fresh_settings, redis_decisions
from tests.support_kafka import decisions_on_topic, wait_processed
from tests.support_traffic import publish

TENANT = "evict-co"
CAP = 1_200
K = DecisionKind


@dataclass
class World:
    settings: Settings
    run: RunContext
    streamed: list[Decision]
    window: ContextWindow
    added: int
    texts: dict[str, str]


def _manifest() -> TenantManifest:
    return TenantManifest(
        tenant_id=TENANT, version=1, tier="standard", slot_caps=SlotCaps(history=CAP), total_cap=50_000,
        updated_at=datetime.now(UTC), eviction=EvictionPolicy(keep_recent=2),
    )


def _note(i: int) -> str:
    return (f"Step {i}: checked order ORD-{7000 + i} for customer CUST-{300 + i}; the invoice total was "
            f"${100 + i}.25 and the shipment left on 2026-02-{10 + i % 18:02d}. We decided to keep the retry "
            f"budget at {i + 3} attempts. " * 4)


async def _drive(settings: Settings, run: RunContext, window: ContextWindow, texts: dict[str, str]
                 ) -> tuple[list[Decision], int]:
    """Publish the run turn by turn, applying decisions as they come, until a summary was swapped in and the
    history slot is back to ok; returns the decisions seen and how many messages were added."""
    seen: list[Decision] = []
    added = 0
    async with CtxflowClient.from_settings(settings) as client, client.decisions(TENANT, run_id=run.run_id) as stream:
        queue: asyncio.Queue[Decision] = asyncio.Queue()

        async def follow() -> None:
            async for d in stream:
                queue.put_nowait(d)

        following = asyncio.create_task(follow())

        async def drain(until: float) -> None:
            loop = asyncio.get_running_loop()
            while (left := until - loop.time()) > 0:
                try:
                    d = await asyncio.wait_for(queue.get(), left)
                except TimeoutError:
                    return
                seen.append(d)
                window.apply(d)

        async def publish_turn(role: Role, text: str) -> None:
            nonlocal added
            turn = run.turn(role, ItemKind.MESSAGE, Slot.HISTORY, text)
            await client.publish_turn(turn)
            await client.flush()
            window.add({"role": role.value, "content": text}, item_id=turn.item_id)
            texts[turn.item_id] = text
            added += 1

        async with client.run(run):
            await publish_turn(Role.USER, "My goal: reconcile every order below; never refund twice.")
            loop = asyncio.get_running_loop()
            for i in range(60):
                await publish_turn(Role.ASSISTANT if i % 2 else Role.USER, _note(i))
                # Give the summarizer time to answer the first compression before the slot fills further.
                await drain(loop.time() + (1.0 if any(d.kind is K.COMPRESS for d in seen) else 0.05))
                swapped = any(d.kind is K.SWAP for d in seen)
                relieved = any(d.kind is K.BUDGET_STATE and d.slot is Slot.HISTORY and d.state is BudgetState.OK
                               for d in seen)
                if swapped and relieved:
                    break
            await drain(loop.time() + 2.0)
        following.cancel()
    return seen, added


@pytest.fixture(scope="module")
def world(stack: EmbeddedStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    settings = fresh_settings(stack, tmp_path_factory.mktemp("eviction-e2e") / "home")
    run = RunContext(tenant_id=TENANT, user_id="u1", session_id="s1", agent_id="planner", model="gpt-4o")
    window = ContextWindow(run_id=run.run_id)
    with WorkerProcess(settings), SummarizerProcess(settings):
        publish(settings, [_manifest()])
        wait_processed(settings)
        texts: dict[str, str] = {}
        streamed, added = asyncio.run(_drive(settings, run, window, texts))
        wait_processed(settings)
        yield World(settings, run, streamed, window, added, texts)


def test_the_run_is_relieved_and_its_budget_state_comes_back_down(world: World) -> None:
    history = [d for d in world.streamed if d.kind is K.BUDGET_STATE and d.slot is Slot.HISTORY]
    moves = [(d.previous_state, d.state) for d in history]
    assert (BudgetState.OK, BudgetState.SOFT) in moves and (BudgetState.SOFT, BudgetState.OK) in moves
    assert not [d for d in world.streamed if d.kind is K.REJECTION]
    relief = [d for d in world.streamed if d.kind in (K.EVICT, K.OFFLOAD, K.SWAP)]
    assert relief and all(d.strategy == "hybrid" and d.policy_version == "m1/p1/list-2025-06.2" for d in relief)
    headroom = asyncio.run(_headroom(world.settings, world.run.run_id))
    assert headroom is not None and headroom.used["history"] < 0.85 * CAP


def test_a_summary_prepared_off_the_hot_path_is_swapped_in_with_its_provenance(world: World) -> None:
    swap = next(d for d in world.streamed if d.kind is K.SWAP)
    compress = next(d for d in world.streamed if d.kind is K.COMPRESS and d.job_id == swap.job_id)
    assert world.streamed.index(compress) < world.streamed.index(swap) and swap.summary is not None
    assert swap.summary.summarizer == "extractive" and swap.summary.depth == 1
    assert sorted(swap.summary.source_ids) == sorted(a.item_id for a in compress.actions)
    assert swap.summary.fidelity > 0.9
    orders = {w for i in swap.summary.source_ids for w in world.texts[i].split() if w.startswith("ORD-")}
    assert orders and all(order in (swap.summary.text or "") for order in orders)  # identifiers kept verbatim
    assert swap.tokens_freed and swap.tokens_freed > 0.1 * CAP


def test_the_agents_list_follows_the_decisions_and_stays_valid(world: World) -> None:
    messages = world.window.messages()
    assert 0 < len(messages) < world.added
    assert messages[0]["content"].startswith("My goal")  # tier 0: the original goal never leaves
    assert any(m["content"].startswith("[summary of earlier context]") for m in messages)


def test_decisions_reach_redis_and_the_topic(world: World) -> None:
    wanted = {d.decision_id for d in world.streamed}
    assert wanted <= {d.decision_id for d in decisions_on_topic(world.settings) if d.run_id == world.run.run_id}
    assert wanted <= {d.decision_id for d in redis_decisions(world.settings, TENANT, world.run.run_id)}


async def _headroom(settings: Settings, run_id: str):  # type: ignore[no-untyped-def]
    async with BudgetReader(settings.redis_url) as reader:
        return await reader.headroom(TENANT, run_id)
