"""Budgets end to end through the real worker: a runaway tenant hits its watermark and hard limit, others don't.

One worker serves the module. Its traffic is a seeded workload (four tenants, the free-tier one runs away)
published while an SDK subscription listens to the runaway tenant's decisions, plus a few hand-made runs.
What each test checks is what an agent or an operator would see: the decisions topic, Redis, ClickHouse.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest
import redis.asyncio as aioredis
from ctxflow.processors.admission import AdmissionAnswer, check_admission
from ctxflow.schemas.models import (
    BudgetState,
    Decision,
    DecisionKind,
    ItemKind,
    Role,
    RunStatus,
    Slot,
    SlotCaps,
    TenantManifest,
    UserOverride,
)
from ctxflow.sinks.redis import read_admission
from ctxflow.streams.config import Settings
from ctxflow.streams.demo.workload import TenantProfile, Workload
from ctxflow.streams.sdk import CtxflowClient, RunContext
from ctxflow.streams.stack.embedded import EmbeddedStack
from ctxflow.streams.stack.worker_process import WorkerProcess
from pydantic import BaseModel

from tests.support_decisions import subject_of
from tests.support_deploy import fresh_settings, redis_decisions
from tests.support_kafka import decisions_on_topic, wait_processed
from tests.support_traffic import publish

SEED = 303


@dataclass
class World:
    """The module's deployment after the workload went through it."""

    settings: Settings
    worker: WorkerProcess
    workload: Workload
    runaway: TenantProfile
    streamed: list[Decision]


def _total_hard(decisions: list[Decision]) -> bool:
    return any(d.kind is DecisionKind.REJECTION and subject_of(d) == "total" for d in decisions)


async def _decisions_while_publishing(settings: Settings, tenant_id: str, records: list[BaseModel],
                                      done: Callable[[list[Decision]], bool],
                                      keep: Callable[[Decision], bool] = lambda _: True) -> list[Decision]:
    """Publish ``records`` under a live subscription to ``tenant_id``'s decisions; return the ones that ``keep``
    accepts, in order, as soon as they make ``done`` true.

    Matching by the caller's own ids is what an agent does: the subscription starts at the end of the log (the
    true end, see ``streams.runtime.log_end``), but the worker may still be deciding about the tenant's earlier records.
    """
    found: list[Decision] = []
    async with CtxflowClient.from_settings(settings) as client, client.decisions(tenant_id) as stream:
        for record in records:
            await client.publish(record)
        await client.flush()
        decisions = aiter(stream)
        try:
            async with asyncio.timeout(60):
                while not done(found):
                    decision = await anext(decisions)
                    if keep(decision):
                        found.append(decision)
        finally:
            await decisions.aclose()  # type: ignore[attr-defined]
    return found


@pytest.fixture(scope="module")
def world(stack: EmbeddedStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    settings = fresh_settings(stack, tmp_path_factory.mktemp("budget-e2e") / "home")
    workload = Workload(SEED, tenants=4, sessions_per_tenant=2, max_events=2_500)
    runaway = workload.runaway_tenant
    assert runaway is not None and runaway.tier == "free"
    with WorkerProcess(settings) as worker:
        publish(settings, workload.manifests())
        wait_processed(settings)
        streamed = asyncio.run(_decisions_while_publishing(settings, runaway.tenant_id, list(workload.events()),
                                                        done=_total_hard))
        wait_processed(settings)
        yield World(settings, worker, workload, runaway, streamed)


def _context(world: World, tenant: TenantProfile, agent: str) -> RunContext:
    return RunContext(tenant_id=tenant.tenant_id, user_id=tenant.users[0], session_id=f"{agent}-session",
                      agent_id=agent, model=tenant.model, clock=lambda: datetime.now(UTC).replace(microsecond=0))


def test_runaway_tenant_crosses_soft_watermark_then_hard_limit(world: World) -> None:
    total = [d for d in world.streamed if d.kind is DecisionKind.BUDGET_STATE and subject_of(d) == "total"]
    assert [(d.previous_state, d.state) for d in total] == [(BudgetState.OK, BudgetState.SOFT),
                                                           (BudgetState.SOFT, BudgetState.HARD)]
    soft, hard = total
    cap = world.runaway.manifest.total_cap
    assert soft.cap_tokens == hard.cap_tokens == cap
    assert 0.85 * cap <= soft.used_tokens < cap <= hard.used_tokens  # type: ignore[operator]
    run_id = soft.run_id
    assert run_id is not None and hard.run_id == run_id

    # The reject tier answers the hard limit with a rejection an agent can show its user.
    rejection = next(d for d in world.streamed if d.kind is DecisionKind.REJECTION and subject_of(d) == "total")
    assert rejection.state is BudgetState.HARD and rejection.source_event_id == hard.source_event_id
    assert "503" in rejection.reason and f"cap {cap}" in rejection.reason and "retry" in rejection.reason
    assert str(rejection.used_tokens) in rejection.reason

    # The same decisions reach agents that read Redis, and analysts in ClickHouse.
    wanted = {d.decision_id for d in world.streamed if d.run_id == run_id}
    assert wanted <= {d.decision_id for d in redis_decisions(world.settings, world.runaway.tenant_id, run_id)}
    rows = world.worker.query(
        f"SELECT decision_id, kind, state FROM decisions WHERE tenant_id = '{world.runaway.tenant_id}' "
        f"AND run_id = '{run_id}'").rows
    assert wanted <= {r[0] for r in rows}
    assert ("rejection", "hard") in {(r[1], r[2]) for r in rows}


def test_other_tenants_get_no_budget_state_or_rejection(world: World) -> None:
    others = {t.tenant_id for t in world.workload.tenants} - {world.runaway.tenant_id}
    decided = [d for d in decisions_on_topic(world.settings) if d.tenant_id in others]
    assert {d.tenant_id for d in decided} == others  # they were processed (usage reconciled, admissions)
    flagged = [d for d in decided if d.kind in (DecisionKind.BUDGET_STATE, DecisionKind.REJECTION,
                                                DecisionKind.EVICTION_REQUEST, DecisionKind.SPEND_EXHAUSTED)]
    assert flagged == []
    names = ", ".join(f"'{t}'" for t in sorted(others))
    assert world.worker.scalar(
        f"SELECT count() FROM decisions WHERE tenant_id IN ({names}) AND kind IN ('budget_state', 'rejection')") == 0


def _fast_answer(settings: Settings, run: RunContext, planned: dict[Slot, int]) -> tuple[AdmissionAnswer, int]:
    """The fast admission check for ``run``'s user, and how many Redis commands it took."""
    async def check() -> tuple[AdmissionAnswer, int]:
        client = aioredis.from_url(settings.redis_url)
        try:
            await client.ping()  # connect first: the check itself must cost one round trip
            before = await client.info("commandstats")
            headroom, limits = await read_admission(client, run.tenant_id, run.run_id)
            after = await client.info("commandstats")
        finally:
            await client.aclose()
        calls = sum(v["calls"] for k, v in after.items() if k != "cmdstat_info") - sum(
            v["calls"] for k, v in before.items() if k != "cmdstat_info")
        return check_admission(headroom, planned, limits, run.user_id), calls  # type: ignore[arg-type]

    return asyncio.run(check())


def _authoritative(settings: Settings, runs_and_plans: list[tuple[RunContext, dict[Slot, int]]]) -> list[Decision]:
    """The worker's admission decision for each plan, in order."""
    decided = []
    for run, planned in runs_and_plans:
        request = run.admission(planned)
        decided += asyncio.run(_decisions_while_publishing(
            settings, request.tenant_id, [request], done=bool, keep=lambda d, r=request: d.request_id == r.request_id))
    return decided


def test_fast_admission_check_agrees_with_the_authoritative_decision(world: World) -> None:
    tenant = world.workload.tenants[0]
    ctx = _context(world, tenant, "planner")
    publish(world.settings, [
        ctx.started(),
        ctx.turn(Role.SYSTEM, ItemKind.MESSAGE, Slot.SYSTEM, "You plan.", token_count=600),
        ctx.turn(Role.USER, ItemKind.MESSAGE, Slot.HISTORY, "Plan a trip.", token_count=1_400),
    ])
    wait_processed(world.settings)
    runaway_run = next(d.run_id for d in world.streamed if subject_of(d) == "total")
    runaway_ctx = RunContext(tenant_id=world.runaway.tenant_id, user_id=world.runaway.users[0], session_id="s",
                             agent_id="assistant", model=world.runaway.model, run_id=runaway_run or "")

    fresh = _context(world, tenant, "newcomer")  # a run the worker has not seen: checked against its tenant's limits
    cases = [(ctx, {Slot.HISTORY: 100, Slot.OUTPUT: 500}), (ctx, {Slot.HISTORY: 10 * tenant.manifest.total_cap}),
             (runaway_ctx, {Slot.OUTPUT: 10}), (fresh, {Slot.RETRIEVED: 10 * tenant.manifest.total_cap}),
             (fresh, {Slot.HISTORY: 100})]
    answers = []
    for run, planned in cases:
        answer, calls = _fast_answer(world.settings, run, planned)
        assert calls == 1
        answers.append(answer)
    assert [(a.admitted, a.known_run) for a in answers] == [
        (True, True), (False, True), (False, True), (False, False), (True, False)]
    decided = _authoritative(world.settings, cases)
    assert [d.admitted for d in decided] == [a.admitted for a in answers]
    assert all(d.reason.startswith("not admitted") for d in decided if not d.admitted)


def test_fast_admission_check_applies_the_users_override_and_the_run_cap(world: World) -> None:
    """A user whose override raises the total is admitted where the tenant's other users are refused, on a new
    run and on one the worker holds; a run whose consumption reached its cap is refused whatever its context."""
    manifest = TenantManifest(
        tenant_id="overrides", version=1, tier="standard", slot_caps=SlotCaps(), total_cap=4_000,
        run_cap_tokens=6_000, user_overrides={"vip": UserOverride(total_cap=12_000, run_cap_tokens=30_000)},
        updated_at=datetime.now(UTC).replace(microsecond=0))
    publish(world.settings, [manifest])
    wait_processed(world.settings)
    vip, staff, spender = (
        RunContext(tenant_id="overrides", user_id=user, session_id="s", agent_id="planner", model="gpt-4o")
        for user in ("vip", "staff", "staff"))
    publish(world.settings, [
        vip.started(), vip.turn(Role.USER, ItemKind.MESSAGE, Slot.HISTORY, "Go.", token_count=3_000),
        spender.started(), spender.usage(provider="openai", input_tokens=5_500, output_tokens=0, latency_ms=300),
    ])
    wait_processed(world.settings)
    fresh_vip = RunContext(tenant_id="overrides", user_id="vip", session_id="s", agent_id="planner", model="gpt-4o")
    cases = [(fresh_vip, {Slot.HISTORY: 8_000}), (staff, {Slot.HISTORY: 8_000}), (vip, {Slot.HISTORY: 5_000}),
             (vip, {Slot.HISTORY: 10_000}), (spender, {Slot.OUTPUT: 400}), (spender, {Slot.OUTPUT: 600})]
    answers = [_fast_answer(world.settings, run, planned)[0] for run, planned in cases]
    assert [(a.admitted, a.known_run) for a in answers] == [
        (True, False), (False, False), (True, True), (False, True), (True, True), (False, True)]
    assert "run token cap would reach 6100" in answers[-1].reason
    decided = _authoritative(world.settings, cases)
    assert [d.admitted for d in decided] == [a.admitted for a in answers]


def test_interrupted_or_missing_usage_is_estimated_and_flagged_never_zero(world: World) -> None:
    tenant = world.workload.tenants[1]
    cut, silent = _context(world, tenant, "streamer"), _context(world, tenant, "silent")
    # In phases, so the finalizations (runs topic) come after the turns and the usage (other topics) in every
    # interleaving: the estimate a finalization records is the working set it sees then.
    publish(world.settings, [record for ctx in (cut, silent) for record in (
        ctx.started(),
        ctx.turn(Role.USER, ItemKind.MESSAGE, Slot.HISTORY, "Summarize the ledger.", token_count=1_200),
        ctx.turn(Role.ASSISTANT, ItemKind.MESSAGE, Slot.OUTPUT, "The ledger shows", token_count=300))])
    publish(world.settings, [cut.usage(provider=tenant.provider, input_tokens=400, output_tokens=60, latency_ms=900,
                                       streamed=True, complete=False)])
    wait_processed(world.settings)
    runs = {cut.run_id, silent.run_id}
    reconciled = asyncio.run(_decisions_while_publishing(
        world.settings, tenant.tenant_id, [cut.finalized(RunStatus.INTERRUPTED), silent.finalized()],
        done=lambda found: len(found) >= 2,
        keep=lambda d: d.kind is DecisionKind.USAGE_RECONCILED and d.run_id in runs))
    by_run = {d.run_id: d for d in reconciled}
    assert set(by_run) == runs and all(subject_of(d) == "run" for d in reconciled)
    wait_processed(world.settings)  # Redis and ClickHouse follow once the batch is committed
    for ctx in (cut, silent):
        d = by_run[ctx.run_id]
        assert d.used_tokens == 1_500, d.reason  # the working set stands in for what was never reported
        assert "estimated" in d.reason and d.discrepancy_tokens is None
        assert d.decision_id in {x.decision_id for x in redis_decisions(world.settings, tenant.tenant_id, ctx.run_id)}
        assert world.worker.query(
            f"SELECT used_tokens, estimated_tokens FROM decisions WHERE tenant_id = '{tenant.tenant_id}' "
            f"AND decision_id = '{d.decision_id}'").rows == [(1_500, d.estimated_tokens)]
    assert (by_run[cut.run_id].estimated_tokens, by_run[silent.run_id].estimated_tokens) == (1_040, 1_500)
    assert "interrupted stream (460 tokens reported)" in by_run[cut.run_id].reason
    assert "no usage report" in by_run[silent.run_id].reason
