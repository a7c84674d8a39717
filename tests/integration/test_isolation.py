"""Tenant isolation through the real worker: interleaved traffic of several tenants never crosses over.

Hypothesis generates small multi-tenant traffic (runs of turns, usage, admissions, finalizations, SDK-style
re-sends) and interleaves the tenants' runs at random. Each example uses fresh tenant ids on one worker shared
by the module. In some examples every tenant's runs, users and sessions carry their own ids, and no Redis key,
ClickHouse row or decision of one tenant may mention another tenant's ids; in the others all tenants use the
*same* run, user and session ids, so any state keyed without its tenant would merge them. Either way each
tenant's Redis projection (run headroom, limits for new runs) must equal a replay of that tenant's events alone
through ``processors``, and so must its decisions.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest
import redis.asyncio as aioredis
from ctxflow.processors.admission import BudgetLimits
from ctxflow.schemas.codec import Codec
from ctxflow.schemas.models import (
    HardLimitBehaviour,
    ItemKind,
    OverflowBehaviour,
    Role,
    RunStatus,
    Slot,
    SlotCaps,
    SpendWindow,
    SpendWindowKind,
    TenantManifest,
)
from ctxflow.sinks.redis import limits_key
from ctxflow.streams.config import Settings
from ctxflow.streams.sdk import RunContext
from ctxflow.streams.stack.embedded import EmbeddedStack
from ctxflow.streams.stack.worker_process import WorkerProcess
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from tests.replay import read_input_log, replay
from tests.support_decisions import lost_decisions
from tests.support_deploy import fresh_settings, redis_headroom
from tests.support_kafka import dead_letters_on_topic, decisions_on_topic, read_topics, wait_processed
from tests.support_traffic import publish, send_raw

START = datetime(2025, 3, 31, 23, 50, tzinfo=UTC)  # traffic crosses an hour, a day and a month
SLOTS = (Slot.SYSTEM, Slot.TOOLS, Slot.RETRIEVED, Slot.HISTORY, Slot.SCRATCHPAD, Slot.OUTPUT)

op = st.one_of(
    st.tuples(st.just("turn"), st.sampled_from(SLOTS), st.integers(1, 600)),
    st.tuples(st.just("usage"), st.integers(1, 900), st.booleans()),
    st.tuples(st.just("admission"), st.sampled_from(SLOTS), st.integers(1, 2_000)),
    st.tuples(st.just("resend"),),
)
run_script = st.tuples(st.lists(op, min_size=1, max_size=10), st.booleans())
tenant_script = st.tuples(st.integers(400, 3_000), st.sampled_from(("free", "standard", "enterprise")),
                          st.lists(run_script, min_size=1, max_size=3))
traffic = st.tuples(st.lists(tenant_script, min_size=2, max_size=4), st.randoms(use_true_random=False),
                    st.booleans())


@dataclass
class Tenant:
    """One generated tenant: its fresh ids and the records it publishes, per run in order."""

    tenant_id: str
    manifest: TenantManifest
    shared_ids: bool
    runs: dict[str, list[BaseModel]] = field(default_factory=dict)
    users: set[str] = field(default_factory=set)
    sessions: set[str] = field(default_factory=set)

    def names(self) -> set[str]:
        """Every identifier that belongs to this tenant and must not appear in another tenant's output."""
        return {self.tenant_id} if self.shared_ids else {self.tenant_id, *self.runs, *self.users, *self.sessions}


def _build(scripts: list, rng: random.Random, shared_ids: bool) -> tuple[list[Tenant], list[BaseModel]]:
    tenants, queues = [], []
    for i, (cap, tier, runs) in enumerate(scripts):
        tid = f"iso{uuid.uuid4().hex[:10]}"
        manifest = TenantManifest(
            tenant_id=tid, version=1, tier=tier, slot_caps=SlotCaps(history=cap // 2, retrieved=cap // 3),
            total_cap=cap, overflow=OverflowBehaviour.REJECT if i % 2 else OverflowBehaviour.EVICT_AND_COMPRESS,
            hard_limit=HardLimitBehaviour.REJECT, run_cap_tokens=cap,
            spend_windows=[SpendWindow(window=SpendWindowKind.HOUR, max_tokens=3 * cap)], updated_at=START,
        )
        tenant = Tenant(tid, manifest, shared_ids)
        for r, (ops, finalize) in enumerate(runs):
            clock = iter(START + timedelta(seconds=s) for s in range(0, 10**6, 7))
            prefix = "" if shared_ids else f"{tid}-"
            ctx = RunContext(tenant_id=tid, user_id=f"{prefix}user{r % 2}", session_id=f"{prefix}session{r}",
                             agent_id="agent", model="gpt-4o", clock=lambda c=clock: next(c),
                             **({"run_id": f"run-{r}"} if shared_ids else {}))
            tenant.users.add(ctx.user_id)
            tenant.sessions.add(ctx.session_id)
            records: list[BaseModel] = [ctx.started()]
            for step in ops:
                if step[0] == "turn":
                    records.append(ctx.turn(Role.USER, ItemKind.MESSAGE, step[1], f"{step[1].value} item",
                                            token_count=step[2]))
                elif step[0] == "usage":
                    records.append(ctx.usage(provider="openai", input_tokens=step[1], output_tokens=step[1] // 4,
                                             latency_ms=100, streamed=not step[2], complete=step[2]))
                elif step[0] == "admission":
                    records.append(ctx.admission({step[1]: step[2]}))
                else:
                    records.append(rng.choice(records))  # an SDK re-send of something already published
            if finalize:
                records.append(ctx.finalized(RunStatus.SUCCEEDED))
            tenant.runs[ctx.run_id] = records
            queues.append(list(records))
        tenants.append(tenant)
    interleaved = []
    while queues:
        queue = rng.choice(queues)
        interleaved.append(queue.pop(0))
        if not queue:
            queues.remove(queue)
    return tenants, interleaved


@dataclass
class Deployment:
    """The module's worker and settings."""

    settings: Settings
    worker: WorkerProcess


@pytest.fixture(scope="module")
def deployment(stack: EmbeddedStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    settings = fresh_settings(stack, tmp_path_factory.mktemp("isolation") / "home")
    with WorkerProcess(settings) as worker:
        yield Deployment(settings, worker)


async def _redis_dump(settings: Settings, tenant_id: str) -> dict[str, tuple[str, int]]:
    """Every Redis key of ``tenant_id`` with its full content, as text, and its remaining time to live (s)."""
    client = aioredis.from_url(settings.redis_url, decode_responses=True)
    try:
        dump: dict[str, tuple[str, int]] = {}
        async for key in client.scan_iter(match=f"ctxflow:{tenant_id}:*"):
            kind = await client.type(key)
            value = await client.get(key) if kind == "string" else repr(sorted((await client.hgetall(key)).items()))
            dump[key] = (value, await client.ttl(key))
        return dump
    finally:
        await client.aclose()


def _crossings(text: str, owner: Tenant, tenants: list[Tenant]) -> list[str]:
    return [name for other in tenants if other is not owner for name in other.names() if name in text]


@settings(max_examples=6, deadline=None)
@given(generated=traffic)
def test_interleaved_tenants_never_see_each_other(deployment: Deployment, generated: tuple) -> None:
    scripts, rng, shared_ids = generated
    tenants, interleaved = _build(scripts, rng, shared_ids)
    s = deployment.settings
    publish(s, [t.manifest for t in tenants])
    wait_processed(s)
    publish(s, interleaved)
    wait_processed(s)

    for tenant in tenants:
        # Redis: only the tenant's own runs, and nothing in them names another tenant.
        dump = asyncio.run(_redis_dump(s, tenant.tenant_id))
        assert limits_key(tenant.tenant_id) in dump  # what a new run's fast admission check reads
        runs = {key.rsplit(":", 1)[1] for key in dump if key != limits_key(tenant.tenant_id)}
        assert runs == set(tenant.runs)  # every run is projected
        assert not _crossings(repr(dump), tenant, tenants)
        assert all(0 < ttl <= s.redis_ttl_s for _, ttl in dump.values())  # every key expires
        # ClickHouse: every row filed under the tenant is about the tenant's runs, users and sessions.
        for table, extra in (("turns", ""), ("usage", ""), ("runs", ""), ("decisions", ", reason")):
            rows = deployment.worker.query(
                f"SELECT run_id, user_id, session_id{extra} FROM {table} WHERE tenant_id = '{tenant.tenant_id}'").rows
            assert {r[0] for r in rows} <= set(tenant.runs) and {r[1] for r in rows} <= tenant.users
            assert not _crossings(repr(rows), tenant, tenants)
    by_id = {t.tenant_id: t for t in tenants}
    owner = {run: t for t in tenants for run in t.runs if not shared_ids}
    for d in decisions_on_topic(s):
        mine = by_id.get(d.tenant_id)
        if mine is not None and d.run_id is not None:
            assert d.run_id in mine.runs and d.user_id in mine.users
            assert not _crossings(d.model_dump_json(), mine, tenants)
        assert d.run_id not in owner or d.tenant_id == owner[d.run_id].tenant_id
    raw = asyncio.run(read_topics(s, ["decisions"]))
    assert all(r.key.decode().split(":", 1)[0] == owner[r.key.decode().split(":", 1)[1]].tenant_id
               for r in raw if r.key.decode().split(":", 1)[1] in owner)

    # Each tenant's projection is what its own events alone produce.
    log = read_input_log(s)
    live = decisions_on_topic(s)
    for tenant in tenants:
        alone = replay(log, tenants={tenant.tenant_id})
        for run in tenant.runs:
            headroom = redis_headroom(s, tenant.tenant_id, run)
            assert headroom is not None and headroom == alone.headroom(tenant.tenant_id, run)
        limits = asyncio.run(_redis_dump(s, tenant.tenant_id))[limits_key(tenant.tenant_id)][0]
        assert BudgetLimits.from_json(limits) == alone.limits(tenant.tenant_id)
        mine = [d for d in live if d.tenant_id == tenant.tenant_id]
        assert not lost_decisions(mine, alone.decisions, alone.workflows)


def test_record_keyed_by_another_tenant_is_dead_lettered_and_affects_no_one(deployment: Deployment) -> None:
    s = deployment.settings
    owner, keyed_as = f"iso{uuid.uuid4().hex[:10]}", f"iso{uuid.uuid4().hex[:10]}"
    ctx = RunContext(tenant_id=owner, user_id=f"{owner}-user", session_id=f"{owner}-session", agent_id="agent",
                     model="gpt-4o", clock=lambda: START)
    value = Codec().encode(ctx.turn(Role.USER, ItemKind.MESSAGE, Slot.HISTORY, "misrouted", token_count=50))
    send_raw(s, [("turns", keyed_as.encode(), value)])
    wait_processed(s)

    letters = [dl for dl in dead_letters_on_topic(s) if dl.original == value]
    assert [dl.reason_code for dl in letters] == ["contract_violation"]
    assert keyed_as in letters[0].reason and owner in letters[0].reason
    for tenant_id in (owner, keyed_as):
        assert asyncio.run(_redis_dump(s, tenant_id)) == {}
        for table in ("turns", "decisions"):
            assert deployment.worker.scalar(f"SELECT count() FROM {table} WHERE tenant_id = '{tenant_id}'") == 0
    assert not [d for d in decisions_on_topic(s) if d.tenant_id in (owner, keyed_as)]
    assert deployment.worker.scalar(
        f"SELECT count() FROM dead_letters WHERE tenant_id = '{owner}' AND reason_code = 'contract_violation'") == 1
