"""The quality bench's scorer on hand-built simulate output, and the runner's results file."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
from ctxflow.streams.bench.quality_run import check_targets, run_quality
from ctxflow.streams.bench.quality_score import prepare, score_run, tool_pairs
from ctxflow.streams.bench.quality_sessions import generate_sessions


def _call(cid: str, name: str = "lookup_order") -> dict:
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": "{}"}}


#: 0 system, 1 goal, 2 call call_0, 3 its result (the fact), 4 answer, 5 user, 6 call call_0 again (reused id),
#: 7 its result, 8 answer, 9 question naming ORD-100200, 10 the step that needs message 3.
MESSAGES = [
    {"role": "system", "content": "You are a support agent."},
    {"role": "user", "content": "Refund the late order. Refund cap: $250.00"},
    {"role": "assistant", "content": None, "tool_calls": [_call("call_0")]},
    {"role": "tool", "tool_call_id": "call_0", "content": '{"id": "ORD-100200", "amount": "$1,284.50"}'},
    {"role": "assistant", "content": "Found it."},
    {"role": "user", "content": "Continue."},
    {"role": "assistant", "content": None, "tool_calls": [_call("call_0", "track_shipment")]},
    {"role": "tool", "tool_call_id": "call_0", "content": '{"id": "1ZABC", "eta": "2024-05-01"}'},
    {"role": "assistant", "content": "Tracked."},
    {"role": "user", "content": "What was the amount for ORD-100200?"},
    {"role": "assistant", "content": "ORD-100200: amount $1,284.50."},
]
STEPS = (2, 4, 6, 8, 10)
FACTS = ["ORD-100200", "$1,284.50"]
SESSION = {"session_id": "s1", "messages": MESSAGES}
TRUTH = {"session_id": "s1", "shape": "support",
         "references": [{"item": 3, "step": 10, "facts": FACTS, "item_kind": "tool_result:lookup_order",
                         "fact_kind": "order"}]}


def _score(contexts: dict[int, list[dict]]):
    facts = prepare([SESSION], [TRUTH], tokens_of=lambda m: 10)
    lines = [{"session_id": "s1", "step": step, "tokens": 10 * (len(ctx) - 1), "context": ctx}
             for step, ctx in contexts.items()]
    return score_run(facts, lines, strategy="test", budget=0.25)


def _everything(step: int) -> list[dict]:
    return [{"index": i} for i in range(step)]


def test_a_result_pairs_with_the_nearest_earlier_call_that_issued_its_id() -> None:
    assert tool_pairs(MESSAGES) == {3: 2, 7: 6}


def test_keeping_everything_retains_every_reference_without_violations() -> None:
    row = _score({s: _everything(s) for s in STEPS}).row()
    assert row["retention"] == 1.0 and row["references"] == 1
    assert row["tool_pairing_violations"] == row["tier0_evictions"] == row["malformed_entries"] == 0
    assert row["append_only_share"] == 1.0 and row["compressions_per_10_turns"] == 0
    assert row["tokens_used"] == sum(10 * (s - 1) for s in STEPS) / len(STEPS)
    assert row["tokens_share"] == pytest.approx(sum((s - 1) / 10 for s in STEPS) / len(STEPS))


def test_keeping_everything_on_generated_sessions_scores_perfectly() -> None:
    sessions, truth = generate_sessions(4, seed=5)
    lines = [{"session_id": s["session_id"], "step": i, "tokens": 1, "context": _everything(i)}
             for s in sessions for i, m in enumerate(s["messages"]) if m["role"] == "assistant"]
    row = score_run(prepare(sessions, truth), lines, strategy="keep", budget=1.0).row()
    assert row["retention"] == 1.0 and row["references"] == sum(len(t["references"]) for t in truth)
    assert row["tool_pairing_violations"] == row["tier0_evictions"] == row["missing_steps"] == 0


def test_dropping_a_tool_call_but_keeping_its_result_is_one_violation_per_step() -> None:
    without_call = {s: [e for e in _everything(s) if e != {"index": 2}] for s in STEPS}
    row = _score(without_call).row()
    assert row["tool_pairing_violations"] == 4  # steps 4, 6, 8 and 10 hold result 3 without call 2
    assert row["violating_pairs"] == 4
    assert row["retention"] == 1.0


def test_dropping_a_result_but_keeping_its_call_is_a_violation_too() -> None:
    row = _score({10: [e for e in _everything(10) if e != {"index": 7}]}).row()
    assert row["tool_pairing_violations"] == 1


def test_a_summary_covering_one_side_counts_that_side_absent_unless_it_covers_both() -> None:
    one_side = [{"index": 0}, {"index": 1}, {"summary": "called lookup_order", "sources": [2]}, {"index": 3},
                *({"index": i} for i in range(4, 10))]
    assert _score({10: one_side}).row()["tool_pairing_violations"] == 1
    both = [{"index": 0}, {"index": 1}, {"summary": "ORD-100200 costs $1,284.50", "sources": [2, 3]}, {"index": 3},
            *({"index": i} for i in range(4, 10))]
    assert _score({10: both}).row()["tool_pairing_violations"] == 0


def test_a_summary_with_every_fact_is_present_and_one_missing_a_fact_is_not() -> None:
    rest = [{"index": i} for i in range(4, 10)]
    kept = _score({10: [{"index": 0}, {"index": 1}, {"summary": "Order ORD-100200 came to $1,284.50.",
                                                         "sources": [2, 3]}, *rest]})
    assert kept.retention == 1.0
    lost = _score({10: [{"index": 0}, {"index": 1}, {"summary": "Order ORD-100200 was found.",
                                                         "sources": [2, 3]}, *rest]})
    assert lost.retention == 0.0
    (miss,) = lost.missed
    assert miss["why"] == "summary_lost_facts" and miss["missing_facts"] == ["$1,284.50"]
    other_source = _score({10: [{"index": 0}, {"index": 1}, {"summary": "ORD-100200 $1,284.50", "sources": [7]},
                                *rest]})
    assert other_source.retention == 0.0 and other_source.missed[0]["why"] == "evicted"


def test_a_recalled_item_is_present() -> None:
    ctx = [{"index": 0}, {"recalled": 3}, {"index": 2}, *({"index": i} for i in range(4, 10))]
    row = _score({10: ctx}).row()
    assert row["retention"] == 1.0 and row["tool_pairing_violations"] == 0


def test_append_only_and_new_summaries_are_counted_between_consecutive_steps() -> None:
    s = {"summary": "ORD-100200 $1,284.50", "sources": [2, 3]}
    row = _score({
        4: [{"index": 0}, {"index": 1}, s],
        6: [{"index": 0}, {"index": 1}, s, {"index": 4}, {"index": 5}],          # appended
        8: [{"index": 0}, {"index": 1}, s, {"index": 4}, {"index": 5}, {"index": 6}, {"index": 7}],  # appended
        10: [{"index": 0}, {"summary": "all so far", "sources": [1, 2, 3, 4, 5, 6, 7, 8]}, {"index": 9}],  # rewritten
    }).row()
    assert row["append_only_share"] == pytest.approx(2 / 3, abs=1e-3)
    assert row["compressions_per_10_turns"] == pytest.approx(10 * 2 / 4)  # s at step 4, the new one at step 10
    assert row["tier0_evictions"] == 0
    assert row["missing_steps"] == 1  # step 2 has no line


def test_tier0_evictions_count_a_missing_system_prompt_or_latest_user_turn() -> None:
    no_system = {s: _everything(s)[1:] for s in (4, 6)}
    assert _score(no_system).row()["tier0_evictions"] == 2
    no_user = {10: [e for e in _everything(10) if e != {"index": 9}]}
    assert _score(no_user).row()["tier0_evictions"] == 1


def test_missing_steps_and_malformed_entries_are_counted_not_raised() -> None:
    score = _score({8: [*_everything(8), {"index": 8}, {"bogus": 1}]})
    row = score.row()
    assert row["malformed_entries"] == 2
    assert row["retention"] == 0.0 and score.missed[0]["why"] == "no_step"
    assert row["by_shape"] == {"support": {"references": 1, "retained": 0, "retention": 0.0}}
    assert row["losses"][0]["item_kind"] == "tool_result:lookup_order" and row["losses"][0]["count"] == 1


def test_targets_read_not_measured_when_their_runs_were_not_requested() -> None:
    rows = [{"strategy": "hybrid", "budget": 0.25, "retention": 0.97, "tool_pairing_violations": 0},
            {"strategy": "lru", "budget": 0.25, "retention": 0.97, "tool_pairing_violations": 3}]
    targets = {t["target"]: t["holds"] for t in check_targets(rows, (0.25,))}
    assert list(targets.values()) == [True, None, True, False]  # 95% at 25%, 85% at 10%, zero, beats baselines
    rows.append({"strategy": "sliding_window", "budget": 0.25, "retention": 0.5, "tool_pairing_violations": 0})
    rows[1]["retention"] = 0.9
    beats = check_targets(rows, (0.25,))[3]
    assert beats["holds"] is None and beats["detail"] == "not measured: observation_masking at 25%"


def _fake_simulate(sessions, *, budget, strategy, manifest=None):
    """Keeps the system prompt and a sliding window of budget * messages (a stand-in for the real one)."""
    for s in sessions:
        for step, m in enumerate(s["messages"]):
            if m["role"] == "assistant":
                keep = max(1, int(budget * step)) if strategy == "sliding_window" else step
                yield {"session_id": s["session_id"], "step": step, "tokens": keep,
                       "context": [{"index": 0}, *({"index": i} for i in range(max(1, step - keep), step))]}


def _check_results_file(path: Path, strategies: tuple[str, ...]) -> None:
    data = json.loads(path.read_text())
    assert {"results", "by_shape", "losses", "targets", "hybrid_losses", "corpus"} <= set(data)
    assert [r["strategy"] for r in data["results"]] == list(strategies)
    for row in data["results"]:
        assert row["budget"] == 0.25 and row["sessions"] == 2
        for name in ("retention", "tool_pairing_violations", "tokens_used", "tier0_evictions",
                     "compressions_per_10_turns", "append_only_share"):
            assert isinstance(row[name], int | float), name
    assert {s["shape"] for s in data["by_shape"]} <= {"coding", "support"}
    assert all({"strategy", "budget", "item_kind", "why"} <= set(loss) for loss in data["losses"])


def test_run_quality_writes_the_results_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = types.ModuleType("ctxflow.streams.simulate")
    module.simulate_sessions = _fake_simulate
    monkeypatch.setitem(sys.modules, "ctxflow.streams.simulate", module)
    out = tmp_path / "quality-results.json"
    results = run_quality((0.25,), ("sliding_window", "hybrid"), sessions=2, output=out, console=None)
    _check_results_file(out, ("sliding_window", "hybrid"))
    by = {r["strategy"]: r for r in results["results"]}
    assert by["hybrid"]["retention"] == 1.0 and by["sliding_window"]["retention"] < 1.0
    assert results["targets"][0]["holds"] is True
    beats = results["targets"][3]
    assert beats["holds"] is None and beats["detail"] == "not measured: lru at 25%, observation_masking at 25%"


def test_run_quality_through_the_real_simulate(tmp_path: Path) -> None:
    pytest.importorskip("ctxflow.streams.simulate")
    out = tmp_path / "quality-results.json"
    run_quality((0.25,), ("sliding_window", "hybrid"), sessions=2, output=out, console=None)
    _check_results_file(out, ("sliding_window", "hybrid"))
