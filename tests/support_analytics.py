"""A small analytics dataset with known answers, written into a chDB home the way the worker writes it.

Two tenants: acme (history and retrieved turns, every eviction kind, a swap at fidelity 0.8, six memory
records and six gate verdicts) and globex (a little history, one faithful swap, one active memory). Every
timestamp sits a fixed distance before ``now``, so the report's default range (the last days) covers all of
it. Written by a subprocess (``python -m tests.support_analytics HOME NOW``): chDB holds one engine per process, and the
tests then read the home from other processes as a user would.
"""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from pathlib import Path

from ctxflow.schemas.models import (
    CostLine,
    DeadLetter,
    Decision,
    ItemDecision,
    MemoryRecord,
    MemoryVerdict,
    RunEnvelope,
    RunEvent,
    SummaryProvenance,
    TurnEvent,
    UsageReport,
    content_digest,
)
from pydantic import BaseModel

from tests.support_project import ROOT

#: Turns occur this long before ``now`` and are inserted at about ``now``: the ingest lag the report must show.
TURN_LAG = dt.timedelta(minutes=1)
#: Runs with envelopes and cost lines: (tenant, run, parent, agent, weeks before now's, [(surface, micros,
#: estimated)]). acme's cost per run goes from $1.00 a week ago to $1.50 (+50%); globex's is all estimated.
RUNS = (
    ("acme", "acme-run-0", None, "planner", 1, [("inference", 1_000_000, False)]),
    ("acme", "acme-run-1", None, "planner", 0, [("inference", 1_800_000, False), ("retrieval", 200_000, False)]),
    ("acme", "acme-run-2", "acme-run-1", "researcher", 0, [("inference", 900_000, False), ("tooling", 100_000, True)]),
    ("globex", "globex-run-1", None, "assistant", 0, [("inference", 250_000, True)]),
)
#: Memory candidates of acme by status (its promotion rate is 3 of 6, its quarantine rate 1 of 6).
ACME_MEMORY = {"active": 3, "quarantined": 1, "provisional": 1, "revoked": 1}


def _turns(now: dt.datetime) -> list[TurnEvent]:
    spec = [("acme", "history", 10, 100), ("acme", "retrieved", 5, 200), ("globex", "history", 4, 50)]
    turns = []
    for tenant, slot, count, tokens in spec:
        for i in range(count):
            content = f"{tenant} {slot} turn {i}"
            turns.append(TurnEvent(
                event_id=f"turn-{tenant}-{slot}-{i}", tenant_id=tenant, user_id="u1", session_id="s1",
                run_id=f"{tenant}-run-1", agent_id="planner", seq=len(turns), role="assistant", kind="message",
                slot=slot, item_id=f"{tenant}-{slot}-{i}", content=content, content_digest=content_digest(content),
                token_count=tokens, model="gpt-4o", privacy="retained", occurred_at=now - TURN_LAG,
            ))
    return turns


def _decision(n: int, tenant: str, kind: str, at: dt.datetime, *, slot: str | None = "history",
              used: int | None = None, cap: int | None = None, sources: int = 0, tokens: int = 0,
              freed: int | None = None, summary: tuple[int, float] | None = None, **extra: object) -> Decision:
    action = {"evict": "evict", "mask": "mask", "offload": "offload", "swap": "swap", "compress": "compress",
              "recall": "recall"}.get(kind)
    actions = [ItemDecision(item_id=f"{tenant}-item-{n}-{i}", action=action, tokens=tokens)
               for i in range(sources)] if action else []
    provenance = None
    if summary is not None:
        summary_tokens, fidelity = summary
        ids = [a.item_id for a in actions]
        provenance = SummaryProvenance(summary_id=f"summary:{tenant}-{n}", token_count=summary_tokens,
                                       source_ids=ids, source_digests=[content_digest(i) for i in ids],
                                       summarizer="extractive", summarizer_version="1", depth=1, fidelity=fidelity)
    return Decision(decision_id=f"decision-{tenant}-{n}", tenant_id=tenant, user_id="u1", session_id="s1",
                    run_id=f"{tenant}-run-1", kind=kind, slot=slot, used_tokens=used, cap_tokens=cap,
                    reason=f"{kind} for the report's test", actions=actions, decided_at=at, tokens_freed=freed,
                    summary=provenance, **extra)


def _decisions(now: dt.datetime) -> list[Decision]:
    at = now - dt.timedelta(minutes=30)
    return [
        _decision(1, "acme", "evict", at, used=700, cap=1000, sources=2, tokens=100, freed=200),
        _decision(2, "acme", "mask", at, used=610, cap=1000, sources=1, tokens=100, freed=90),
        _decision(3, "acme", "compress", at, used=900, cap=1000, sources=4, tokens=100),
        _decision(4, "acme", "swap", at, used=310, cap=1000, sources=4, tokens=100, freed=300, summary=(100, 0.8)),
        _decision(5, "acme", "offload", at, slot="retrieved", used=800, cap=1000, sources=1, tokens=200, freed=200),
        _decision(6, "acme", "budget_state", at, used=900, cap=1000, state="soft", previous_state="ok"),
        _decision(7, "acme", "admission", at, slot=None, used=500, cap=10_000, admitted=True),
        _decision(8, "acme", "recall", at, slot=None, sources=1, tokens=100, freed=0),
        _decision(9, "globex", "swap", at, used=30, cap=100, sources=2, tokens=50, freed=80, summary=(20, 1.0)),
    ]


def _memories(now: dt.datetime) -> list[MemoryRecord]:
    statuses = [("acme", s) for s, n in ACME_MEMORY.items() for _ in range(n)] + [("globex", "active")]
    at = now - dt.timedelta(hours=2)
    return [MemoryRecord(memory_id=f"memory-{i}", tenant_id=tenant, user_id="u1", scope="user", type="preference",
                         status=status, version=1, content=f"fact {i}", content_digest=content_digest(f"fact {i}"),
                         created_at=at, updated_at=at, reason=None if status != "revoked" else "user asked")
            for i, (tenant, status) in enumerate(statuses)]


#: acme's candidates by what the gate decided (verdict outcome, or the accepted record's status).
ACME_VERDICTS = {"active": 3, "quarantined": 1, "merged": 1, "rejected": 1}


def _verdicts(now: dt.datetime) -> list[MemoryVerdict]:
    outcomes = [("acme", o) for o, n in ACME_VERDICTS.items() for _ in range(n)] + [("globex", "active")]
    at = now - dt.timedelta(hours=2)
    made = []
    for i, (tenant, outcome) in enumerate(outcomes):
        accepted = outcome in ("active", "quarantined")
        made.append(MemoryVerdict(
            verdict_id=f"verdict-{i}", tenant_id=tenant, user_id="u1", session_id="s1", run_id="r1",
            candidate_id=f"candidate-{i}", source_event_id=f"e-{i}",
            outcome="accepted" if accepted else outcome, status=outcome if accepted else None,
            rule="user_memory" if outcome != "rejected" else "secret_detected", reason="seeded",
            memory_id=None if outcome == "rejected" else f"memory-{i}", scope="user", type="preference",
            occurred_at=at))
    return made


def _runs_and_usage(now: dt.datetime) -> list[BaseModel]:
    at = now - dt.timedelta(hours=1)
    root, child = "acme-run-1", "acme-run-2"
    common = {"tenant_id": "acme", "user_id": "u1", "session_id": "s1", "workflow_id": root}
    return [
        RunEvent(event_id="run-1-start", run_id=root, agent_id="planner", phase="started", occurred_at=at, **common),
        RunEvent(event_id="run-2-start", run_id=child, parent_run_id=root, agent_id="researcher", phase="started",
                 occurred_at=at, **common),
        RunEvent(event_id="run-2-end", run_id=child, parent_run_id=root, agent_id="researcher", phase="finalized",
                 status="succeeded", occurred_at=at + dt.timedelta(minutes=5), **common),
        RunEvent(event_id="run-1-end", run_id=root, agent_id="planner", phase="finalized", status="succeeded",
                 occurred_at=at + dt.timedelta(minutes=6), **common),
        *(UsageReport(event_id=f"usage-{i}", tenant_id="acme", user_id="u1", session_id="s1", run_id=run,
                      agent_id=agent, call_id=f"call-{i}", provider="openai", model="gpt-4o", input_tokens=1000,
                      output_tokens=100, latency_ms=400, occurred_at=at + dt.timedelta(minutes=1))
          for i, (run, agent) in enumerate([(root, "planner"), (child, "researcher")])),
    ]


def _envelopes_and_costs(now: dt.datetime) -> list[BaseModel]:
    out: list[BaseModel] = []
    for tenant, run, parent, agent, weeks_ago, lines in RUNS:
        started = now - dt.timedelta(hours=1, weeks=weeks_ago)
        root = parent or run
        ids = {"tenant_id": tenant, "user_id": "u1", "session_id": "s1", "run_id": run, "parent_run_id": parent,
               "root_run_id": root, "workflow_id": root, "agent_id": agent}
        micros = {surface: m for surface, m, _ in lines}
        out.append(RunEnvelope(
            **ids, depth=1 if parent else 0, status="succeeded", closed_by="agent", started_at=started,
            finalized_at=started + dt.timedelta(minutes=5), last_event_at=started + dt.timedelta(minutes=5),
            duration_ms=300_000, global_tokens=100, tenant_tokens=100, user_tokens=0, retrieved_tokens=0,
            session_tokens=800, static_prefix_tokens=200, dynamic_tokens=800, input_tokens=1000, output_tokens=100,
            cached_read_tokens=0, cache_write_tokens=0, reasoning_tokens=0, usage_estimated=False, retrievals=0,
            memory_ids=[], tool_calls=0, tool_results=0, promotions={}, evictions=0, compressions=0,
            tokens_freed=0, cost_micros=sum(micros.values()), inference_micros=micros.get("inference", 0),
            retrieval_micros=micros.get("retrieval", 0), tooling_micros=micros.get("tooling", 0),
            persistence_micros=0, cost_estimated=any(e for _, _, e in lines), price_version="list-2025-06",
            event_count=10, integrity_hash=content_digest(run), envelope_version=3, updated_at=started,
        ))
        out.extend(CostLine(cost_id=f"{run}-{surface}", **ids, surface=surface, model="gpt-4o", quantity=1000,
                            unit="tokens", micros=m, price_version="list-2025-06", estimated=estimated,
                            source_event_id=f"{run}-event", occurred_at=started)
                   for surface, m, estimated in lines)
    return out


def records(now: dt.datetime) -> list[BaseModel]:
    """Every record of the dataset anchored at ``now``."""
    letter = DeadLetter(dead_letter_id="letter-1", source_topic="turns", source_partition=0, source_offset=7,
                        tenant_id="acme", reason_code="undecodable", reason="not Avro",
                        failed_at=now - dt.timedelta(minutes=10))
    return [*_turns(now), *_decisions(now), *_memories(now), *_verdicts(now), *_runs_and_usage(now),
            *_envelopes_and_costs(now), letter]


def seed(home: Path, now: dt.datetime) -> None:
    """Write :func:`records` into the chDB under ``home`` (``<home>/clickhouse``), from a subprocess."""
    done = subprocess.run([sys.executable, "-m", "tests.support_analytics", str(home), now.isoformat()], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]


def _write(home: Path, now: dt.datetime) -> None:
    from ctxflow.sinks.clickhouse import ClickHouseSink
    from ctxflow.sinks.clickhouse_ddl import TABLE_BY_MODEL, Logged

    sink = ClickHouseSink(f"chdb://{(home / 'clickhouse').resolve()}")
    try:
        sink.ensure_schema()
        for offset, record in enumerate(records(now)):  # positions stand in for the log's offsets
            sink.add(Logged(record, offset) if TABLE_BY_MODEL[type(record)].logged else record)
        sink.flush()
    finally:
        sink.close()


if __name__ == "__main__":
    _write(Path(sys.argv[1]), dt.datetime.fromisoformat(sys.argv[2]))
