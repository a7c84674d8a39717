"""``ctxflow simulate`` as a user runs it: a JSONL of OpenAI-format sessions in, one context per model call out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ctxflow.streams.cli.main import app
from typer.testing import CliRunner

from tests.support_project import ROOT


def _session(session_id: str, rounds: int) -> dict:
    """A tool-heavy session whose tool-call ids repeat (``call_0`` every round), as real logs do."""
    messages: list[dict] = [
        {"role": "system", "content": "You are a support agent. Never refund twice."},
        {"role": "user", "content": "My order ORD-55012 arrived broken; refund it to card ending 4421."},
    ]
    for i in range(rounds):
        messages.append({"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_0", "type": "function", "function": {"name": "lookup_order", "arguments": json.dumps(
                {"order": f"ORD-{55012 + i}"})}},
            {"id": "call_1", "type": "function", "function": {"name": "get_customer", "arguments": "{}"}},
        ]})
        order = f"order ORD-{55012 + i}: {i + 2} items, total ${120 + i}.50, shipped 2026-01-{i % 27 + 1:02d} "
        messages.append({"role": "tool", "tool_call_id": "call_0", "content": order * 8})
        customer = f"customer CUST-{900 + i} tier gold "
        messages.append({"role": "tool", "tool_call_id": "call_1", "content": customer * 6})
        messages.append({"role": "assistant", "content": f"Order ORD-{55012 + i} checked."})
    messages.append({"role": "user", "content": "What was the total of ORD-55012?"})
    messages.append({"role": "assistant", "content": "It was $120.50."})
    return {"session_id": session_id, "messages": messages}


def _simulate(tmp_path: Path, sessions: list[dict], *args: str) -> tuple[int, list[dict], str]:
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("\n".join(json.dumps(s) for s in sessions) + "\n")
    result = CliRunner().invoke(app, ["simulate", "--transcripts", str(source), "--output", str(output), *args])
    lines = [json.loads(x) for x in output.read_text().splitlines()] if output.exists() else []
    return result.exit_code, lines, result.output


@pytest.mark.parametrize("strategy", ["hybrid", "sliding_window", "observation_masking", "summarization"])
def test_every_model_call_gets_a_valid_context_under_the_budget(tmp_path: Path, strategy: str) -> None:
    sessions = [_session("s1", 12), _session("s2", 6)]
    code, lines, said = _simulate(tmp_path, sessions, "--budget", "0.25", "--strategy", strategy)
    assert code == 0, said
    for session in sessions:
        steps = [i for i, m in enumerate(session["messages"]) if m["role"] == "assistant"]
        mine = [x for x in lines if x["session_id"] == session["session_id"]]
        assert [x["step"] for x in mine] == steps  # one line per model call, in order
        for line in mine:
            indices = [e.get("index", e.get("recalled")) for e in line["context"] if "summary" not in e]
            assert all(0 <= i < line["step"] for i in indices)
            assert line["context"][0] == {"index": 0}  # the system prompt
            assert {"index": 1} in line["context"] or {"recalled": 1} in line["context"]  # the goal: tier 0
    assert "2 sessions" in said


def test_the_late_question_finds_what_it_names(tmp_path: Path) -> None:
    session = _session("s1", 12)
    code, lines, said = _simulate(tmp_path, [session], "--budget", "0.25", "--strategy", "hybrid")
    assert code == 0, said
    last = lines[-1]["context"]
    held = {e.get("index", e.get("recalled")) for e in last}
    assert 3 in held or any(3 in e.get("sources", []) for e in last)  # the tool result holding ORD-55012's total


def test_a_manifest_file_sets_the_policy(tmp_path: Path) -> None:
    manifest = json.loads((ROOT / "examples" / "manifests" / "enterprise.json").read_text())
    manifest["eviction"] = {"strategy": "lru", "keep_recent": 1}
    path = tmp_path / "m.json"
    path.write_text(json.dumps(manifest))
    code, lines, said = _simulate(tmp_path, [_session("s1", 8)], "--budget", "0.3", "--manifest", str(path))
    assert code == 0, said
    assert lines and "(lru at 30%" in said  # the manifest's strategy, not the default


def test_a_malformed_line_is_refused_with_where_and_what(tmp_path: Path) -> None:
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text(json.dumps(_session("s1", 2)) + "\n{not json\n")
    result = CliRunner().invoke(app, ["simulate", "--transcripts", str(source), "--output", str(output)])
    assert result.exit_code == 2 and "in.jsonl:2" in result.output and "JSON" in result.output


def test_an_unknown_strategy_is_refused_with_the_choices(tmp_path: Path) -> None:
    code, _, said = _simulate(tmp_path, [_session("s1", 2)], "--strategy", "fifo")
    assert code == 2 and "hybrid" in said
