"""The eviction phase of ``ctxflow bench`` (e') at a tiny scale: its traffic, its figures' shapes, its results."""

from __future__ import annotations

import math

from ctxflow.processors.eviction.workset import ITEM
from ctxflow.schemas.models import ItemKind, Role
from ctxflow.streams.bench.eviction import EVICTIONS, ITEMS_PER_RUN, AgentRun, measure_eviction
from ctxflow.streams.bench.report import BenchResults, verdicts


def test_the_agent_traffic_pairs_every_tool_result_with_a_call_issued_before_it() -> None:
    turns = AgentRun("test", "tenant-0", "run-0", (50, 300)).turns(ITEMS_PER_RUN)
    assert [t.item_id for t in turns] == [f"i-{seq}" for seq in range(ITEMS_PER_RUN)]
    assert turns[0].role is Role.SYSTEM and turns[1].role is Role.USER
    issued: set[str] = set()
    for turn in turns:
        assert turn.token_count is not None and 50 <= turn.token_count <= 300 and turn.content_digest
        issued |= set(turn.tool_call_ids)
        if turn.kind is ItemKind.TOOL_RESULT:
            assert turn.tool_call_id in issued
    assert sum(t.kind is ItemKind.TOOL_CALL for t in turns) >= 5
    assert any(t.role is Role.USER and t.seq > 1 for t in turns), "later user turns name earlier ids"


def test_the_phase_at_a_tiny_scale_gives_every_figure() -> None:
    said: list[str] = []
    result = measure_eviction(table_runs=200, planner_runs=16, summarizer_jobs=3, say=said.append)

    table = result.table
    assert (table.runs, table.items) == (200, 200 * ITEMS_PER_RUN)
    assert math.isfinite(table.bytes_per_item) and table.bytes_per_item > 0
    assert table.heap_bytes_per_item >= ITEM.itemsize  # a fixed record per item, and its id besides
    assert table.changelog_bytes_per_run > ITEMS_PER_RUN * ITEM.itemsize
    assert set(table.breakdown) == {"records", "ids_and_terms", "calls", "objects", "key_and_slot"}

    planner = result.planner
    assert 0 < planner.decisions < planner.records
    assert set(planner.by_kind) <= {k.value for k in EVICTIONS} and "evict" in planner.by_kind
    assert 0 < planner.p50_us <= planner.p99_us and planner.quiet_p50_us > 0
    assert 0 < planner.chain_eps < planner.budget_only_eps

    summarizer = result.summarizer
    assert (summarizer.jobs, summarizer.items) == (3, 30)
    assert 200 <= summarizer.tokens_per_item <= 400
    assert summarizer.items_per_cpu_s > 0 and 0 <= summarizer.fidelity <= 1
    assert len(said) == 3 and result.seconds > 0


def test_results_written_before_the_phase_still_load_and_the_goal_is_judged() -> None:
    older = {"events": 1, "raw_ceiling_eps": 1.0, "pipeline_eps": 1.0, "ratio": 1.0, "p50_latency_ms": 1.0,
             "p99_latency_ms": 1.0, "sessions_rss_bytes_per_run": 1.0, "recovery_s": 1.0, "processor_eps": 1.0,
             "core_bytes_per_run": 1.0, "git_sha": "x"}
    assert BenchResults(**older).planner_chain_eps == 0.0
    rows = {metric.split(" ")[0]: met for metric, _, _, met in verdicts(BenchResults(**older,
                                                                                  eviction_bytes_per_item=175.0))}
    assert rows["eviction_bytes_per_item"] is False
