"""kill -9 mid-stream: totals, projections and decisions come out exactly as if the worker never crashed.

Producers keep publishing a realistic workload (five tenants, one of them runaway, SDK-style re-sends) while
the worker is SIGKILLed three times at different moments and restarted on the same settings. The oracle is
the ground truth of the distinct events produced and a crash-free replay of the same input log through
``processors`` (``tests/replay.py``).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter

import redis.asyncio as aioredis
from pydantic import BaseModel

from processors.admission import TOTAL, RunHeadroom
from schemas.models import DecisionKind, RunEvent, TurnEvent, UsageReport
from sinks.redis import read_headroom
from streams.config import Settings
from streams.worker_process import WorkerProcess
from streams.workload import GroundTruth, Workload
from tests.replay import Replay, read_input_log, replay
from tests.support_decisions import lost_decisions
from tests.support_kafka import committed_records, decisions_on_topic, wait_committed, wait_processed
from tests.support_traffic import BackgroundTraffic, publish

log = logging.getLogger(__name__)
SEED = 20250106
RATE_EPS = 1500
KILLS = 3


def _distinct(events: list[BaseModel], kind: type[BaseModel]) -> list[BaseModel]:
    seen: dict[str, BaseModel] = {}
    for e in events:
        if isinstance(e, kind):
            seen.setdefault(e.event_id, e)  # type: ignore[attr-defined]
    return list(seen.values())


async def _headrooms(settings: Settings, runs: list[tuple[str, str]]) -> dict[tuple[str, str], RunHeadroom | None]:
    client = aioredis.from_url(settings.redis_url)
    try:
        return {(t, r): await read_headroom(client, t, r) for t, r in runs}
    finally:
        await client.aclose()


def _redis_problems(settings: Settings, truth: GroundTruth, oracle: Replay, tenants: list[str]) -> list[str]:
    """Per run, the Redis projection must hold the ground-truth tokens per slot and the replayed headroom."""
    runs = sorted({(t, r) for t in tenants for r in oracle.runs(t)} | set(truth.run_tokens))
    projected = asyncio.run(_headrooms(settings, runs))
    problems = []
    for (tenant, run), headroom in projected.items():
        if headroom is None:
            problems.append(f"{tenant}/{run}: no headroom in Redis")
            continue
        want = {slot: truth.slot_tokens[(tenant, run, slot)] for slot in headroom.used if slot != TOTAL}
        got = {slot: tokens for slot, tokens in headroom.used.items() if slot != TOTAL}
        if got != want or headroom.used[TOTAL] != truth.run_tokens[(tenant, run)]:
            problems.append(f"{tenant}/{run}: Redis used {headroom.used}, ground truth {want}")
        if headroom != oracle.headroom(tenant, run):
            problems.append(f"{tenant}/{run}: Redis {headroom} != replay {oracle.headroom(tenant, run)}")
    return problems


def _kill_mid_stream(settings: Settings, worker: WorkerProcess, after: int) -> WorkerProcess:
    """SIGKILL ``worker`` once it has committed ``after`` more records, then start a new one on ``settings``."""
    seen = wait_committed(settings, committed_records(settings) + after)
    worker.kill()
    began = time.monotonic()
    restarted = WorkerProcess(settings).start()
    log.info("killed the worker after %d committed input records; ready again in %.1fs", seen,
             time.monotonic() - began)
    return restarted


def test_sigkill_mid_stream_three_times_loses_and_doubles_nothing(settings: Settings) -> None:
    started = time.monotonic()
    rng = random.Random(SEED)
    workload = Workload(SEED, tenants=5, sessions_per_tenant=3)
    tenants = [t.tenant_id for t in workload.tenants]
    publish(settings, workload.manifests())
    worker = WorkerProcess(settings).start()
    traffic = BackgroundTraffic(settings, workload, rate_eps=RATE_EPS, duplicate_share=0.05, seed=SEED)
    try:
        worker.wait_caught_up()  # manifests before traffic, the order tests/replay.py assumes
        traffic.start()
        # Different moments: well into the stream, at the first commit after recovery (the restarted worker is
        # still catching up on the backlog that built up while it was down), and after a random stretch.
        for after in (rng.randint(1_500, 4_000), 1, rng.randint(500, 6_000))[:KILLS]:
            worker = _kill_mid_stream(settings, worker, after)
        wait_committed(settings, committed_records(settings) + 1_000)  # producers still sending after the last crash
        sent = traffic.stop()
        stopped = time.monotonic()
        wait_processed(settings)
        caught_up = time.monotonic()
        log.info("traffic stopped after %.1fs; caught up %.1fs later", stopped - started, caught_up - stopped)

        truth = Workload.ground_truth(sent)
        oracle = replay(read_input_log(settings))
        assert not oracle.refused, f"the replay refused records: {oracle.refused[:3]}"
        replay_done = time.monotonic()

        # Token tables, as projected to Redis: exact per tenant, run and slot.
        problems = _redis_problems(settings, truth, oracle, tenants)
        assert not problems, f"{len(problems)} runs differ, first: {problems[:5]}"
        tenant_totals = Counter({t: sum(tok for (tt, _), tok in truth.run_tokens.items() if tt == t) for t in tenants})
        assert +tenant_totals == truth.tenant_tokens

        # ClickHouse: every distinct event once, whatever was re-sent or replayed.
        turns = _distinct(sent, TurnEvent)
        rows = worker.query("SELECT tenant_id, count(), sum(token_count) FROM turns GROUP BY tenant_id").rows
        assert {t: (n, tok) for t, n, tok in rows} == {
            t: (sum(1 for e in turns if e.tenant_id == t), truth.tenant_tokens[t])  # type: ignore[attr-defined]
            for t in {e.tenant_id for e in turns}  # type: ignore[attr-defined]
        }
        rows = worker.query(
            "SELECT tenant_id, sum(input_tokens), sum(output_tokens), sum(cached_read_tokens), "
            "sum(cache_write_tokens), sum(reasoning_tokens), count() FROM usage GROUP BY tenant_id").rows
        kinds = ("input", "output", "cached_read", "cache_write", "reasoning")
        usage = _distinct(sent, UsageReport)
        assert {r[0]: tuple(r[1:]) for r in rows} == {
            t: (*(truth.usage_tokens[(t, k)] for k in kinds), sum(1 for e in usage if e.tenant_id == t))  # type: ignore[attr-defined]
            for t in {e.tenant_id for e in usage}  # type: ignore[attr-defined]
        }
        assert worker.scalar("SELECT count() FROM runs") == len(_distinct(sent, RunEvent))

        # Decisions: everything a crash-free run decides is on the decisions topic, and in ClickHouse once.
        live = decisions_on_topic(settings)
        assert {DecisionKind.REJECTION, DecisionKind.SPEND_EXHAUSTED} <= {d.kind for d in oracle.decisions}
        lost = lost_decisions(live, oracle.decisions, oracle.workflows)
        assert not lost, f"{len(lost)} decisions lost or altered, first: {lost[:5]}"
        stored = worker.query("SELECT decision_id, count() FROM decisions GROUP BY decision_id").rows
        assert {d for d, _ in stored} == {d.decision_id for d in live}
        assert all(n == 1 for _, n in stored)
    finally:
        traffic.cancel()
        worker.stop()
    log.info(
        "crash test: %d events (%d distinct turns), %d kills, caught up after %.1fs, replay %.1fs, total %.1fs",
        len(sent), len(turns), KILLS, caught_up - started, replay_done - caught_up, time.monotonic() - started,
    )
