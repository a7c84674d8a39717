"""What a deployment must show after any crash, checked against the produced events and a crash-free replay.

Each check returns a list of problems (empty when the output is right) so a fault test can report every output
that went wrong at once: the token tables (their changelogs), the Redis projection, ClickHouse, decisions.
"""

from __future__ import annotations

import asyncio
import json

import redis.asyncio as aioredis
from ctxflow.processors.admission import TOTAL, BudgetLimits, RunHeadroom
from ctxflow.processors.manifest import SLOTS
from ctxflow.processors.types import run_key
from ctxflow.schemas.models import MemoryRecord, MemoryVerdict, RunEvent, TurnEvent, UsageReport
from ctxflow.sinks.redis import limits_key, read_headroom
from ctxflow.streams.config import Settings
from ctxflow.streams.demo.workload import GroundTruth
from ctxflow.streams.stack.worker_process import WorkerProcess
from pydantic import BaseModel

from tests.replay import Replay
from tests.support_decisions import is_exact, lost_decisions
from tests.support_deploy import redis_decisions
from tests.support_kafka import decisions_on_topic
from tests.support_tables import aggregate_snapshots, run_ledgers, slot_tokens

USAGE_KINDS = ("input", "output", "cached_read", "cache_write", "reasoning")


def distinct(events: list[BaseModel], kind: type[BaseModel]) -> list[BaseModel]:
    """The first copy of every event of ``kind`` (by event id), in publish order."""
    seen: dict[str, BaseModel] = {}
    for e in events:
        if isinstance(e, kind):
            seen.setdefault(e.event_id, e)  # type: ignore[attr-defined]
    return list(seen.values())


def _want(truth: GroundTruth, tenant: str, run: str, slots: list[str]) -> dict[str, int]:
    return {slot: truth.slot_tokens[(tenant, run, slot)] for slot in slots}


def table_problems(settings: Settings, truth: GroundTruth, oracle: Replay) -> list[str]:
    """Every run ledger in the durable token table holds the ground-truth tokens per slot."""
    ledgers, problems = run_ledgers(settings), []
    for tenant, run in sorted(set(truth.run_tokens) | {k for k in ledgers if k[0] in truth.tenant_tokens}):
        ledger = ledgers.get((tenant, run))
        if ledger is None:
            problems.append(f"{tenant}/{run}: no run ledger in the table")
            continue
        got = slot_tokens(ledger)
        if got != _want(truth, tenant, run, list(got)):
            problems.append(f"{tenant}/{run}: table {got}, truth {_want(truth, tenant, run, list(got))}")
    return problems


def _totals(snapshot: dict) -> dict:
    """What an aggregate must hold whatever the interleaving: a snapshot without the level a gauge was last
    found at, nor the ``applied`` stamp of each run's assigned contribution (both record *when* a record saw
    the value, which differs in another interleaving; processors.ledger, rule 3)."""
    out = {k: v for k, v in snapshot.items() if k not in ("levels", "level")}
    for per_run in ("runs", "estimates"):  # workflow contributions, a spend ledger's estimated top-ups
        if per_run in out:
            out[per_run] = {run: entry[1:] for run, entry in out[per_run].items()}
    return out


def aggregate_problems(settings: Settings, oracle: Replay) -> list[str]:
    """The tenant and user spend ledgers and the workflow ledgers in the durable tables equal the crash-free
    replay's: windows, lifetime totals, estimates, applied offsets, per-run workflow contributions."""
    problems = []
    for table, replayed in (("tenants", oracle.state.tenants), ("users", oracle.state.users),
                            ("workflows", oracle.state.workflows)):
        live = {key: _totals(value) for key, value in aggregate_snapshots(settings, table).items()}
        want = {key: _totals(json.loads(json.dumps(value.to_dict()))) for key, value in replayed.items()}
        problems += [f"{table} {key}: table {live.get(key)} != replay {want.get(key)}"
                     for key in sorted(live.keys() | want.keys()) if live.get(key) != want.get(key)]
    return problems


async def _projected(settings: Settings, runs: list[tuple[str, str]], tenants: list[str]
                     ) -> tuple[dict[tuple[str, str], RunHeadroom | None], dict[str, BudgetLimits | None]]:
    client = aioredis.from_url(settings.redis_url)
    try:
        headrooms = {(t, r): await read_headroom(client, t, r) for t, r in runs}
        limits = {t: await client.get(limits_key(t)) for t in tenants}
        return headrooms, {t: BudgetLimits.from_json(v) if v is not None else None for t, v in limits.items()}
    finally:
        await client.aclose()


def redis_problems(settings: Settings, truth: GroundTruth, oracle: Replay, tenants: list[str]) -> list[str]:
    """Per run, Redis holds the ground-truth tokens per slot less what the replayed eviction planner freed, and
    exactly the replayed headroom; per tenant, the replayed limits for new runs."""
    runs = sorted({(t, r) for t in tenants for r in oracle.runs(t)} | set(truth.run_tokens))
    headrooms, limits = asyncio.run(_projected(settings, runs, tenants))
    problems = [f"{tenant}: Redis limits {got} != replay {oracle.limits(tenant)}"
                for tenant, got in limits.items() if got != oracle.limits(tenant)]
    for (tenant, run), headroom in headrooms.items():
        if headroom is None:
            problems.append(f"{tenant}/{run}: no headroom in Redis")
            continue
        got = {slot.value: headroom.used[slot.value] for slot in SLOTS}
        # Live tokens: what the ground truth counted in, minus what the (replayed) eviction planner took out.
        ledger = oracle.state.get_run(run_key(tenant, run))
        freed = {slot.value: ledger.freed[i] for i, slot in enumerate(SLOTS)} if ledger is not None else {}
        want = {k: v - freed.get(k, 0) for k, v in _want(truth, tenant, run, list(got)).items()}
        if got != want or headroom.used[TOTAL] != truth.run_tokens[(tenant, run)] - sum(freed.values()):
            problems.append(f"{tenant}/{run}: Redis {headroom.used}, truth less what eviction freed {want}")
        elif headroom != oracle.headroom(tenant, run):
            problems.append(f"{tenant}/{run}: Redis {headroom} != replay {oracle.headroom(tenant, run)}")
    return problems


def clickhouse_problems(worker: WorkerProcess, sent: list[BaseModel], truth: GroundTruth) -> list[str]:
    """ClickHouse holds every distinct event once: counts and token sums per tenant equal the truth."""
    problems = []
    turns, usage = distinct(sent, TurnEvent), distinct(sent, UsageReport)
    rows = worker.query("SELECT tenant_id, count(), sum(token_count) FROM turns GROUP BY tenant_id").rows
    want = {t: (sum(1 for e in turns if e.tenant_id == t), truth.tenant_tokens[t])  # type: ignore[attr-defined]
            for t in {e.tenant_id for e in turns}}  # type: ignore[attr-defined]
    if {t: (n, tok) for t, n, tok in rows} != want:
        problems.append(f"turns per tenant (count, tokens): {sorted(rows)} != {sorted(want.items())}")
    rows = worker.query(
        "SELECT tenant_id, sum(input_tokens), sum(output_tokens), sum(cached_read_tokens), "
        "sum(cache_write_tokens), sum(reasoning_tokens), count() FROM usage GROUP BY tenant_id").rows
    want_usage = {t: (*(truth.usage_tokens[(t, k)] for k in USAGE_KINDS), sum(
        1 for e in usage if e.tenant_id == t)) for t in {e.tenant_id for e in usage}}  # type: ignore[attr-defined]
    if {r[0]: tuple(r[1:]) for r in rows} != want_usage:
        problems.append(f"usage per tenant: {sorted(rows)} != {sorted(want_usage.items())}")
    runs = worker.scalar("SELECT count() FROM runs")
    if runs != len(distinct(sent, RunEvent)):
        problems.append(f"{runs} run events in ClickHouse, {len(distinct(sent, RunEvent))} distinct published")
    return problems


def decision_problems(settings: Settings, worker: WorkerProcess, oracle: Replay) -> list[str]:
    """The decisions topic covers the crash-free replay's decisions, and ClickHouse holds each decision once."""
    live = decisions_on_topic(settings)
    problems = lost_decisions(live, oracle.decisions, oracle.workflows)
    on_topic = {d.decision_id for d in live}
    missing = [d for d in oracle.decisions if is_exact(d) and d.decision_id not in on_topic]
    if missing:  # where else did they go? tells a lost publish from a decision never made
        ids = ", ".join(f"'{d.decision_id}'" for d in missing[:200])
        in_ch = {r[0] for r in worker.query(f"SELECT decision_id FROM decisions WHERE decision_id IN ({ids})").rows}
        in_redis = {d.decision_id for d in missing[:200] if d.decision_id in
                    {x.decision_id for x in redis_decisions(settings, d.tenant_id, d.run_id or "-")}}
        problems.append(f"{len(missing)} replayed decisions not on the topic: {len(in_ch)} of the first "
                        f"{min(len(missing), 200)} are in ClickHouse, {len(in_redis)} in Redis")
    stored = worker.query("SELECT decision_id, count() FROM decisions GROUP BY decision_id").rows
    in_ch = {d for d, _ in stored}
    if in_ch - on_topic:
        problems.append(f"{len(in_ch - on_topic)} decisions in ClickHouse are not on the topic")
    # A batch publishes its decisions before it commits; if it never commits, its replay may decide a
    # consumption gauge differently (processors.ledger): such a decision stays on the topic only. Exact
    # decisions are always made again, so they must all reach ClickHouse.
    problems += [f"exact decision {d.decision_id} ({d.kind.value}) on the topic, not in ClickHouse"
                 for d in {d.decision_id: d for d in live}.values() if d.decision_id not in in_ch and is_exact(d)]
    problems += [f"decision {d} stored {n} times" for d, n in stored if n != 1]
    return problems


#: Envelope columns compared with the replay: everything but timestamps (compared as the integrity hash and the
#: version already cover the run's events) and the cost figures, which the cost lines check in detail.
_ENVELOPE_COLUMNS = (
    "tenant_id", "run_id", "status", "closed_by", "root_run_id", "depth", "event_count", "integrity_hash",
    "envelope_version", "global_tokens", "tenant_tokens", "user_tokens", "retrieved_tokens", "session_tokens",
    "input_tokens", "output_tokens", "estimated_tokens", "tool_calls", "retrievals", "evictions", "tokens_freed",
    "cost_micros",
)


def envelope_problems(worker: WorkerProcess, oracle: Replay) -> list[str]:
    """ClickHouse holds exactly the crash-free replay's envelopes (the highest version of each run) and cost lines
    (the last line of each id): same runs, same figures, same ids."""
    rows = worker.query(f"SELECT {', '.join(_ENVELOPE_COLUMNS)} FROM envelopes").rows
    live = {(r[0], r[1]): tuple(r) for r in rows}
    want = {key: tuple(getattr(e, c) for c in _ENVELOPE_COLUMNS) for key, e in oracle.final_envelopes().items()}
    problems = [f"envelope {key}: ClickHouse {live.get(key)} != replay {want.get(key)}"
                for key in sorted(live.keys() | want.keys()) if live.get(key) != want.get(key)]
    columns = ("cost_id", "run_id", "root_run_id", "agent_id", "surface", "quantity", "micros", "estimated")
    lines = {r[0]: tuple(r) for r in worker.query(f"SELECT {', '.join(columns)} FROM costs").rows}
    want_lines = {i: tuple(getattr(c, col) for col in columns) for i, c in oracle.final_costs().items()}
    problems += [f"cost line {i}: ClickHouse {lines.get(i)} != replay {want_lines.get(i)}"
                 for i in sorted(lines.keys() | want_lines.keys()) if lines.get(i) != want_lines.get(i)]
    return problems


def memory_problems(worker: WorkerProcess, oracle: Replay) -> list[str]:
    """ClickHouse holds exactly the crash-free replay's memory verdicts (one per candidate) and records (the newest
    version of each memory id): same outcomes, rules, statuses and merge counts."""
    columns = ("verdict_id", "outcome", "rule", "status", "memory_id")
    live = {r[0]: tuple(r) for r in worker.query(f"SELECT {', '.join(columns)} FROM memory_verdicts FINAL").rows}
    want = {v.verdict_id: (v.verdict_id, v.outcome.value, v.rule, v.status.value if v.status else None, v.memory_id)
            for v in oracle.memory if isinstance(v, MemoryVerdict)}
    problems = [f"verdict {key}: ClickHouse {live.get(key)} != replay {want.get(key)}"
                for key in sorted(live.keys() | want.keys()) if live.get(key) != want.get(key)]
    kept: dict[str, MemoryRecord] = {}
    for record in oracle.memory:
        if isinstance(record, MemoryRecord):
            kept[f"{record.tenant_id}:{record.memory_id}"] = record
    rows = worker.query("SELECT tenant_id, memory_id, status, version, merge_count FROM memory_records FINAL").rows
    live_records = {f"{r[0]}:{r[1]}": tuple(r[2:]) for r in rows}
    want_records = {k: (r.status.value, r.version, r.merge_count) for k, r in kept.items()}
    problems += [f"record {key}: ClickHouse {live_records.get(key)} != replay {want_records.get(key)}"
                 for key in sorted(live_records.keys() | want_records.keys())
                 if live_records.get(key) != want_records.get(key)]
    return problems


def summary(sections: dict[str, list[str]]) -> str:
    """One line per failed output: how many problems and the first few."""
    return "; ".join(f"{name}: {len(p)} problems, first {p[:3]}" for name, p in sections.items() if p)
