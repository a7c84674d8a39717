"""Run envelopes and cost lines end to end: SDK records through the real worker into ClickHouse and Kafka.

One worker serves the module. A workflow (a planner delegating to two sub-agents: usage reports, one of them a
streamed call cut off with nothing counted, tool calls and results, retrieved chunks and a memory) finalizes; a
run of the same tenant is killed mid-way and never finalizes, and is closed as abandoned once later traffic of
the tenant moves its watermark past the idle timeout. Every expectation is computed here from the records sent.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest
from ctxflow.processors.envelopes.integrity import verify
from ctxflow.processors.envelopes.processor import DEFAULT_IDLE_TIMEOUT_S, DEFAULT_STORAGE_DAYS
from ctxflow.processors.pricing import DEFAULT_PRICES, usage_tokens
from ctxflow.schemas.codec import Codec
from ctxflow.schemas.models import (
    ItemKind,
    MemoryScope,
    MemoryType,
    Role,
    RunEnvelope,
    RunEvent,
    RunStatus,
    Slot,
    TurnEvent,
    UsageReport,
)
from ctxflow.streams.config import Settings
from ctxflow.streams.sdk import RunContext
from ctxflow.streams.stack.embedded import EmbeddedStack
from ctxflow.streams.stack.worker_process import WorkerProcess

from tests.support_deploy import fresh_settings
from tests.support_kafka import read_topics, wait_processed
from tests.support_traffic import publish

T0 = datetime(2025, 6, 2, 8, 0, tzinfo=UTC)
TENANT = "envelopes-e2e"
MODEL = "gpt-4o"


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


@dataclass
class World:
    settings: Settings
    worker: WorkerProcess
    sent: list[Any]
    runs: dict[str, RunContext]


def _ctx(run_id: str, agent: str) -> RunContext:
    counter = iter(range(1_000_000))
    return RunContext(tenant_id=TENANT, user_id="ada", session_id="s-1", agent_id=agent, model=MODEL, run_id=run_id,
                      policy_version="policy-7", prefix_hash="prefix-ab12",
                      id_factory=lambda: f"{run_id}-{next(counter)}")


def _traffic() -> tuple[list[Any], dict[str, RunContext]]:
    root = _ctx("wf-root", "planner")
    research, code = root.child("researcher", run_id="wf-research"), root.child("coder", run_id="wf-code")
    killed = _ctx("killed", "scraper")
    later = _ctx("later", "planner")
    text = "You are the planner. Follow the tenant's policy on refunds."
    sent: list[Any] = [
        root.started(at=at(0)),
        root.turn(Role.SYSTEM, ItemKind.MESSAGE, Slot.SYSTEM, text, token_count=400, at=at(0)),
        root.turn(Role.USER, ItemKind.MESSAGE, Slot.HISTORY, "Why did order 4411 fail?", token_count=12, at=at(1)),
        root.turn(Role.SYSTEM, ItemKind.MEMORY, Slot.RETRIEVED, "prefers short answers", token_count=8, at=at(1),
                  item_id="mem-42"),
    ]
    delegate = root.tool_call("delegate to researcher and coder", token_count=20, at=at(2),
                              tool_call_ids=["call-r", "call-c"])
    sent += [delegate, root.usage(provider="openai", input_tokens=460, output_tokens=25, cached_read_tokens=300,
                                  latency_ms=700, at=at(2))]
    sent += [research.started(at=at(3)),
             research.turn(Role.USER, ItemKind.MESSAGE, Slot.HISTORY, "find the logs", token_count=30, at=at(3))]
    for i in range(3):
        sent.append(research.turn(Role.TOOL, ItemKind.RETRIEVED_CHUNK, Slot.RETRIEVED, f"log chunk {i}",
                                  token_count=500, at=at(4 + i)))
    # A streamed call cut off before the provider counted anything: a gateway would log it at $0.
    sent += [research.usage(provider="openai", input_tokens=0, output_tokens=0, latency_ms=900, streamed=True,
                            complete=False, at=at(8)),
             research.memory_candidate(MemoryScope.USER, MemoryType.PREFERENCE, "wants logs in UTC", confidence=0.8,
                                       at=at(8)),
             research.finalized(RunStatus.INTERRUPTED, at=at(9))]
    grep = code.tool_call("grep -n refund src/", token_count=15, at=at(4))
    sent += [code.started(at=at(3)), grep, code.tool_result(grep, "src/refund.py:88: raise", token_count=90, at=at(5)),
             code.usage(provider="anthropic", model="claude-sonnet-4", input_tokens=600, output_tokens=80,
                        cache_write_tokens=200, latency_ms=1200, at=at(6)),
             code.finalized(at=at(7))]
    sent += [root.tool_result(delegate, "researcher: timeout; coder: line 88", token_count=40, at=at(10)),
             root.usage(provider="openai", input_tokens=300, output_tokens=60, latency_ms=500, at=at(11)),
             root.finalized(at=at(12))]
    # Killed mid-way: no usage report for its last call and no finalization.
    sent += [killed.started(at=at(20)),
             killed.turn(Role.USER, ItemKind.MESSAGE, Slot.HISTORY, "scrape the status page", token_count=700,
                         at=at(21)),
             killed.turn(Role.TOOL, ItemKind.RETRIEVED_CHUNK, Slot.RETRIEVED, "status: degraded", token_count=300,
                         at=at(22))]
    # The tenant's later traffic, past the idle timeout on every stream.
    moment = 22 + DEFAULT_IDLE_TIMEOUT_S * 1.2
    sent += [later.started(at=at(moment)),
             later.turn(Role.USER, ItemKind.MESSAGE, Slot.HISTORY, "hello again", token_count=5, at=at(moment)),
             later.usage(provider="openai", input_tokens=5, output_tokens=5, latency_ms=100, at=at(moment + 1)),
             later.finalized(at=at(moment + 2))]
    return sent, {c.run_id: c for c in (root, research, code, killed, later)}


@pytest.fixture(scope="module")
def world(stack: EmbeddedStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    settings = fresh_settings(stack, tmp_path_factory.mktemp("envelopes-e2e") / "home")
    sent, runs = _traffic()
    with WorkerProcess(settings) as worker:
        publish(settings, sent)
        wait_processed(settings)
        yield World(settings, worker, sent, runs)


def _rows(world: World, sql: str) -> list[dict[str, Any]]:
    result = world.worker.query(sql)
    return [dict(zip(result.columns, row, strict=True)) for row in result.rows]


def _of(world: World, run_id: str, kind: type) -> list[Any]:
    return [e for e in world.sent if isinstance(e, kind) and e.run_id == run_id]


def test_finalized_and_abandoned_envelopes_hold_what_their_runs_did(world: World) -> None:
    envelopes = {r["run_id"]: r for r in _rows(world, f"SELECT * FROM envelopes WHERE tenant_id = '{TENANT}'")}
    assert set(envelopes) == {"wf-root", "wf-research", "wf-code", "killed", "later"}
    for run_id, env in envelopes.items():
        turns, usage = _of(world, run_id, TurnEvent), _of(world, run_id, UsageReport)
        context = sum(t.token_count for t in turns)
        layers = ("global_tokens", "tenant_tokens", "user_tokens", "retrieved_tokens", "session_tokens")
        assert sum(env[c] for c in layers) == context == env["static_prefix_tokens"] + env["dynamic_tokens"]
        assert env["input_tokens"] == sum(u.input_tokens for u in usage), run_id
        assert env["event_count"] == len(turns) + len(usage) + len(_of(world, run_id, RunEvent)), run_id
        assert (env["policy_version"], env["prefix_hash"], env["price_version"]) == (
            "policy-7", "prefix-ab12", DEFAULT_PRICES.version)
    root, research, code, killed = (envelopes[r] for r in ("wf-root", "wf-research", "wf-code", "killed"))
    assert (root["status"], root["closed_by"], root["depth"], root["parent_run_id"]) == ("succeeded", "agent", 0, None)
    assert (root["tenant_tokens"], root["user_tokens"], root["static_prefix_tokens"]) == (400, 8, 400)
    assert (root["tool_calls"], root["tool_results"], root["retrievals"], root["memory_ids"]) == (2, 1, 1, ["mem-42"])
    assert root["duration_ms"] == 12_000
    for child in (research, code):
        assert (child["depth"], child["parent_run_id"], child["root_run_id"], child["workflow_id"]) == (
            1, "wf-root", "wf-root", "wf-root")
    assert (research["status"], research["retrievals"], research["retrieved_tokens"]) == ("interrupted", 3, 1_500)
    assert research["promotions"] == {"user": 1}

    # The cut-off stream: estimated from the context it was sent, flagged, not zero.
    assert research["usage_estimated"] and research["estimated_tokens"] == 1_530
    assert research["inference_micros"] == DEFAULT_PRICES.estimate_cost(MODEL, 1_530).micros > 0
    assert not code["usage_estimated"] and code["estimated_tokens"] == 0
    assert code["inference_micros"] == DEFAULT_PRICES.usage_cost(_of(world, "wf-code", UsageReport)[0]).micros

    # Killed: closed by the idle timeout in event time, its consumption estimated.
    assert (killed["status"], killed["closed_by"]) == ("abandoned", "idle_timeout")
    assert _utc(killed, "finalized_at") == at(22 + DEFAULT_IDLE_TIMEOUT_S)
    assert _utc(killed, "last_event_at") == at(22)
    assert killed["usage_estimated"] and killed["estimated_tokens"] == 1_000 and killed["cost_micros"] > 0
    assert killed["cost_estimated"]


def test_cost_lines_split_the_workflow_by_sub_agent_and_roll_up_to_the_root(world: World) -> None:
    lines = _rows(world, f"SELECT * FROM costs WHERE tenant_id = '{TENANT}'")
    expected: dict[str, int] = defaultdict(int)
    estimated_by_run: dict[str, int] = {"wf-research": DEFAULT_PRICES.estimate_cost(MODEL, 1_530).micros}
    workflow = {"wf-root", "wf-research", "wf-code"}
    for e in world.sent:
        if getattr(e, "run_id", None) not in workflow:
            continue
        if isinstance(e, UsageReport):
            expected[e.agent_id] += DEFAULT_PRICES.usage_cost(e).micros
        elif isinstance(e, TurnEvent) and e.kind is ItemKind.TOOL_CALL:
            expected[e.agent_id] += DEFAULT_PRICES.tool_cost(len(e.tool_call_ids)).micros
        elif isinstance(e, TurnEvent) and e.kind in (ItemKind.RETRIEVED_CHUNK, ItemKind.MEMORY):
            expected[e.agent_id] += DEFAULT_PRICES.retrieval_cost(1).micros
    for run_id, micros in estimated_by_run.items():
        expected[world.runs[run_id].agent_id] += micros
    for run_id in workflow:  # retained content, stored for the configured days
        content = sum(len((t.content or "").encode()) for t in _of(world, run_id, TurnEvent))
        expected[world.runs[run_id].agent_id] += DEFAULT_PRICES.storage_cost(content * DEFAULT_STORAGE_DAYS).micros
    split = {r["agent_id"]: r["micros"] for r in _rows(
        world, "SELECT agent_id, sum(micros) AS micros FROM costs WHERE workflow_id = 'wf-root' GROUP BY agent_id")}
    assert split == dict(expected)
    roll_up = {r["root_run_id"]: r["micros"] for r in _rows(
        world, f"SELECT root_run_id, sum(micros) AS micros FROM costs WHERE tenant_id = '{TENANT}' "
        "GROUP BY root_run_id")}
    envelopes = {r["run_id"]: r for r in _rows(world, "SELECT run_id, cost_micros, root_run_id FROM envelopes")}
    assert roll_up["wf-root"] == sum(e["cost_micros"] for e in envelopes.values() if e["root_run_id"] == "wf-root")
    assert roll_up["killed"] == envelopes["killed"]["cost_micros"]
    # Every line names its surface, unit, price version and whether it is an estimate.
    surfaces = {(r["surface"], r["unit"], r["estimated"]) for r in lines}
    assert {("inference", "tokens", False), ("inference", "tokens", True), ("tooling", "calls", False),
            ("retrieval", "calls", False), ("persistence", "byte_days", True)} <= surfaces
    assert {r["price_version"] for r in lines} == {DEFAULT_PRICES.version}
    cut = [r for r in lines if r["run_id"] == "wf-research" and r["surface"] == "inference"]
    assert sorted((r["quantity"], r["estimated"]) for r in cut) == [(0, True), (1_530, True)]
    (report,) = _of(world, "wf-code", UsageReport)
    line = next(r for r in lines if r["source_event_id"] == report.event_id)
    assert (line["quantity"], line["model"], line["estimated"]) == (usage_tokens(report), "claude-sonnet-4", False)


def test_the_integrity_hash_checks_out_against_the_stored_events_and_fails_without_one(world: World) -> None:
    turns = [_event(TurnEvent, row) for row in _rows(
        world, "SELECT * FROM turns WHERE run_id = 'wf-root' ORDER BY seq")]
    usage = [_event(UsageReport, row) for row in _rows(
        world, "SELECT * FROM usage WHERE run_id = 'wf-root' ORDER BY occurred_at, event_id")]
    runs = [_event(RunEvent, row) for row in _rows(
        world, "SELECT * FROM runs WHERE run_id = 'wf-root' ORDER BY occurred_at")]
    (row,) = _rows(world, "SELECT tenant_id, run_id, integrity_hash FROM envelopes WHERE run_id = 'wf-root'")
    stored = SimpleNamespace(**row)  # what verify reads of an envelope: its tenant, run and hash
    events = [*turns, *usage, *runs]
    assert verify(stored, events)  # type: ignore[arg-type]
    assert not verify(stored, events[:2] + events[3:])  # type: ignore[arg-type]
    assert not verify(stored, [turns[0].model_copy(update={"token_count": 401}), *events[1:]])  # type: ignore[arg-type]


def test_envelopes_and_costs_are_on_their_topics(world: World) -> None:
    codec = Codec()
    records = asyncio.run(read_topics(world.settings, ["envelopes"]))
    keys = {r.key.decode() for r in records}
    assert {f"{TENANT}:wf-root", f"{TENANT}:killed"} <= keys
    last = {}
    for r in records:
        env = codec.decode(r.value, RunEnvelope)
        last[env.run_id] = env
    assert last["killed"].status == "abandoned"
    assert len(asyncio.run(read_topics(world.settings, ["costs"]))) >= len(
        [e for e in world.sent if isinstance(e, UsageReport)])


def _event(model: type, row: dict[str, Any]) -> Any:
    """The event a stored row holds (the columns the projection adds, such as ingest times, left out)."""
    return model(**{k: v for k, v in row.items() if k in model.model_fields} | {"occurred_at": _utc(row)})


def _utc(row: dict[str, Any], column: str = "occurred_at") -> datetime:
    """A timestamp column as the query endpoint returns it (ISO text in JSON), as an aware datetime."""
    value = row[column]
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
