"""kill -9 mid-stream: totals, projections, decisions, envelopes, cost lines and memory verdicts and records come
out exactly as if the worker never crashed.

Producers keep publishing a realistic workload (five tenants, one of them runaway, SDK-style re-sends) while
the worker is SIGKILLed three times at different moments and restarted on the same settings. The oracle is
the ground truth of the distinct events produced and a crash-free replay of the same input log through
``processors`` (``tests/replay.py``).
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest
from ctxflow.processors.admission import TOTAL
from ctxflow.schemas.codec import Codec
from ctxflow.schemas.models import (
    DecisionKind,
    HardLimitBehaviour,
    ItemKind,
    MemoryVerdict,
    Role,
    Slot,
    SlotCaps,
    TenantManifest,
    TurnEvent,
)
from ctxflow.streams.config import Settings
from ctxflow.streams.demo.workload import Workload
from ctxflow.streams.sdk import RunContext
from ctxflow.streams.stack.embedded import EmbeddedStack
from ctxflow.streams.stack.worker_process import WorkerProcess

from tests.replay import read_input_log, replay
from tests.support_deploy import (
    drop_other_redis_clients,
    fresh_settings,
    redis_decisions,
    redis_headroom,
    redis_writes_paused,
)
from tests.support_kafka import (
    changelog_keys,
    committed_offsets,
    committed_records,
    dead_letters_on_topic,
    decisions_on_topic,
    wait_committed,
    wait_processed,
    wait_until,
)
from tests.support_traffic import BackgroundTraffic, publish, send_raw
from tests.support_verdict import (
    aggregate_problems,
    clickhouse_problems,
    decision_problems,
    distinct,
    envelope_problems,
    memory_problems,
    redis_problems,
    summary,
    table_problems,
)

log = logging.getLogger(__name__)
SEED = 20250106
RATE_EPS = 500
KILLS = 3


def _kill_mid_stream(settings: Settings, worker: WorkerProcess, after: int) -> WorkerProcess:
    """SIGKILL ``worker`` once it has committed ``after`` more records, then start a new one on ``settings``."""
    seen = wait_committed(settings, committed_records(settings) + after)
    worker.kill()
    began = time.monotonic()
    restarted = WorkerProcess(settings).start()  # stops the process itself if it never gets ready
    log.info("killed the worker after %d committed input records; ready again in %.1fs", seen,
             time.monotonic() - began)
    return restarted


def test_sigkill_mid_stream_three_times_loses_and_doubles_nothing(settings: Settings) -> None:
    started = time.monotonic()
    rng = random.Random(SEED)
    # The demo's traffic: the eviction planner masks, offloads, compresses and recalls as the budget counts.
    workload = Workload(SEED, tenants=5, sessions_per_tenant=3, eviction=True)
    tenants = [t.tenant_id for t in workload.tenants]
    publish(settings, workload.manifests())
    worker = WorkerProcess(settings).start()
    traffic = BackgroundTraffic(settings, workload, rate_eps=RATE_EPS, duplicate_share=0.05, seed=SEED)
    try:
        wait_processed(settings)  # manifests before traffic, the order tests/replay.py assumes
        traffic.start()
        # Different moments: well into the stream, at the first commit after recovery (the restarted worker is
        # still catching up on the backlog that built up while it was down), and after a random stretch.
        for after in (rng.randint(800, 2_000), 1, rng.randint(300, 2_500))[:KILLS]:
            worker = _kill_mid_stream(settings, worker, after)
        wait_committed(settings, committed_records(settings) + 500)  # producers still sending after the last crash
        sent = traffic.stop()
        stopped = time.monotonic()
        wait_processed(settings)
        caught_up = time.monotonic()
        log.info("traffic stopped after %.1fs; caught up %.1fs later", stopped - started, caught_up - stopped)

        truth = Workload.ground_truth(sent)
        oracle = replay(read_input_log(settings))
        assert not oracle.refused, f"the replay refused records: {oracle.refused[:3]}"
        decided = {d.kind for d in oracle.decisions}
        # The budget enforced and the eviction planner relieved (its working sets and relief are what the crashes
        # must not disturb; no summarizer runs here, so no swaps).
        assert DecisionKind.SPEND_EXHAUSTED in decided and {DecisionKind.OFFLOAD, DecisionKind.MASK} <= decided
        assert oracle.final_envelopes() and oracle.final_costs()  # runs closed: the envelope check is not vacuous
        assert any(isinstance(m, MemoryVerdict) for m in oracle.memory)  # the memory gate judged candidates
        replay_done = time.monotonic()
        sections = {
            # The token tables (what a restart recovers), exact per tenant, run and slot.
            "token tables": table_problems(settings, truth, oracle),
            # Spend per tenant and user per window, and per workflow and agent: what a crash-free run holds.
            "spend and workflow tables": aggregate_problems(settings, oracle),
            # Their Redis projection, as agents read it.
            "redis": redis_problems(settings, truth, oracle, tenants),
            # ClickHouse: every distinct event once, whatever was re-sent or replayed.
            "clickhouse": clickhouse_problems(worker, sent, truth),
            # Everything a crash-free run decides is on the decisions topic, and in ClickHouse once.
            "decisions": decision_problems(settings, worker, oracle),
            # Run envelopes and cost lines: the crash-free run's, with the same ids, once each.
            "envelopes and costs": envelope_problems(worker, oracle),
            # The memory gate's verdicts and records: the crash-free run's, once each.
            "memory": memory_problems(worker, oracle),
        }
        assert not any(sections.values()), summary(sections)
    finally:
        traffic.cancel()
        worker.stop()
    log.info(
        "crash test: %d events, %d kills, caught up after %.1fs, replay %.1fs, total %.1fs",
        len(sent), KILLS, caught_up - started, replay_done - caught_up, time.monotonic() - started,
    )


def test_a_record_the_worker_cannot_process_does_not_stop_it_across_a_restart(settings: Settings) -> None:
    workload = Workload(SEED + 1, tenants=2, sessions_per_tenant=1, max_events=300)
    events, poison, tenant = list(workload.events()), workload.poison_records(), workload.tenants[0]
    good = [e for e in events if isinstance(e, TurnEvent) and e.tenant_id == tenant.tenant_id][:4]
    codec, key = Codec(), tenant.tenant_id.encode()
    # Bad records between good turns of the same tenant (one partition, one fetch): they share a batch.
    burst = [("turns", key, codec.encode(t)) for t in good[:2]] + [(p.topic.name, p.key, p.value) for p in poison]
    burst += [("turns", key, codec.encode(t)) for t in good[2:]]
    publish(settings, workload.manifests())
    worker = WorkerProcess(settings).start()
    try:
        wait_processed(settings)
        # A Redis stall holds that batch open after its dead letters went out, so its offsets are never
        # committed: the crash below makes the restarted worker meet the bad records again.
        with redis_writes_paused(settings):
            send_raw(settings, burst)
            wait_until(lambda: {d.dead_letter_id for d in dead_letters_on_topic(settings)},
                       lambda ids: len(ids) >= len(poison), what="the bad records' dead letters")
            worker.kill()
        committed = committed_offsets(settings)
        assert all(committed[(d.source_topic, d.source_partition)] <= d.source_offset
                   for d in dead_letters_on_topic(settings))
        worker = WorkerProcess(settings).start()
        publish(settings, events)
        wait_processed(settings)

        letters = dead_letters_on_topic(settings)
        copies = Counter(d.dead_letter_id for d in letters)
        assert len(copies) == len(poison)
        assert set(copies.values()) == {2}, (  # met again after the restart and refused again, under the same id
            f"dead letters per bad record {dict(copies)}: the restarted worker did not process the uncommitted "
            f"records again (committed at the crash: {committed})")
        assert sorted({d.dead_letter_id: d.reason_code for d in letters}.values()) == sorted(
            p.expected_reason for p in poison)
        assert worker.scalar("SELECT count() FROM dead_letters") == len(poison)
        truth = Workload.ground_truth(events)
        rows = worker.query("SELECT tenant_id, count(), sum(token_count) FROM turns GROUP BY tenant_id").rows
        turns = distinct(events, TurnEvent)
        assert {t: (n, tok) for t, n, tok in rows} == {
            t: (sum(1 for e in turns if e.tenant_id == t), truth.tenant_tokens[t])  # type: ignore[attr-defined]
            for t in truth.tenant_tokens
        }
    finally:
        worker.stop()


def _crash_while_redis_stalls(settings: Settings) -> tuple[WorkerProcess, RunContext]:
    """Crash the worker while a deciding batch waits on Redis, then restart it.

    The batch is one turn that takes a fresh tenant's run past its hard limit. A Redis stall holds the batch
    at its projection step, after its decisions are on the topic; the run ledger, which makes a replay skip
    the turn, must not be in its changelog yet (it is written only after the projection).
    """
    tenant = f"crash{uuid.uuid4().hex[:8]}"
    ctx = RunContext(tenant_id=tenant, user_id="user", session_id="session", agent_id="agent", model="gpt-4o")
    manifest = TenantManifest(tenant_id=tenant, version=1, tier="free", slot_caps=SlotCaps(), total_cap=100,
                              hard_limit=HardLimitBehaviour.REJECT, updated_at=datetime(2025, 1, 1, tzinfo=UTC))
    worker = WorkerProcess(settings).start()
    try:
        publish(settings, [manifest])
        wait_processed(settings)
        with redis_writes_paused(settings):
            publish(settings, [ctx.turn(Role.USER, ItemKind.MESSAGE, Slot.HISTORY, "hello", token_count=120)])
            wait_until(lambda: decisions_on_topic(settings),
                       lambda out: DecisionKind.REJECTION in {d.kind for d in out if d.run_id == ctx.run_id},
                       what="the batch's rejection on the decisions topic")
            assert f"{tenant}:{ctx.run_id}" not in changelog_keys(settings, "runs"), (
                "the run ledger was persisted before the batch's Redis projection: after a crash now, the replay "
                "would skip the turn and its headroom and decisions would never reach Redis")
            worker.kill()
            drop_other_redis_clients(settings)  # the dead worker's paused write must not run on unpause
        worker = WorkerProcess(settings).start()
        wait_processed(settings)
    except BaseException:
        worker.stop()
        raise
    return worker, ctx


@dataclass
class Deployment:
    """The module's shared deployment: its settings, the worker running now, and the run the crash caught."""

    settings: Settings
    worker: WorkerProcess
    ctx: RunContext


@pytest.fixture(scope="module")
def restarted(stack: EmbeddedStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """One crash during a Redis stall and its restart, shared by the tests below (a crash and a restart are the
    costly part, ~20 s): each checks its own part of what the restarted worker holds, on runs of its own."""
    settings = fresh_settings(stack, tmp_path_factory.mktemp("crash-redis-stall") / "home")
    worker, ctx = _crash_while_redis_stalls(settings)
    deployment = Deployment(settings, worker, ctx)
    try:
        yield deployment
    finally:
        deployment.worker.stop()  # whichever worker runs last


def test_redis_headroom_survives_a_crash_before_the_projection(restarted: Deployment) -> None:
    headroom = redis_headroom(restarted.settings, restarted.ctx.tenant_id, restarted.ctx.run_id)
    assert headroom is not None and headroom.used[TOTAL] == 120


def test_redis_decisions_survive_a_crash_before_the_projection(restarted: Deployment) -> None:
    settings, ctx = restarted.settings, restarted.ctx
    published = {d.decision_id for d in decisions_on_topic(settings) if d.run_id == ctx.run_id}
    assert {DecisionKind.BUDGET_STATE, DecisionKind.REJECTION} <= {
        d.kind for d in decisions_on_topic(settings) if d.run_id == ctx.run_id}
    projected = {d.decision_id for d in redis_decisions(settings, ctx.tenant_id, ctx.run_id)}
    assert published <= projected


def test_a_restart_recovers_every_token_table_value(restarted: Deployment) -> None:
    """Regression: the embedded broker reports a partition's end as its last record *batch*'s base offset + 1,
    and Faust's table recovery stops there; a changelog whose last batch held several records lost them.

    On the module's deployment (a worker start spared): its runs are the last records of every changelog."""
    settings = restarted.settings
    tenant = f"restart{uuid.uuid4().hex[:8]}"
    runs = [RunContext(tenant_id=tenant, user_id="user", session_id="session", agent_id="agent", model="gpt-4o")
            for _ in range(6)]
    publish(settings, [r.turn(Role.USER, ItemKind.MESSAGE, Slot.HISTORY, "first", token_count=100) for r in runs])
    wait_processed(settings)
    restarted.worker.stop()  # a clean restart, not even a crash
    restarted.worker = WorkerProcess(settings).start()
    # Recovered by the bulk preload (streams.runtime.recovery): at least each run's ledger came back that way.
    assert restarted.worker.health()["tables_preloaded"] >= len(runs)
    publish(settings, [r.turn(Role.USER, ItemKind.MESSAGE, Slot.HISTORY, "second", token_count=1) for r in runs])
    wait_processed(settings)
    totals = [(h.used[TOTAL] if (h := redis_headroom(settings, tenant, r.run_id)) else None) for r in runs]
    assert totals == [101] * len(runs)
