"""The quality bench's session generator: deterministic, well-formed, and its ground truth honest."""

from __future__ import annotations

import json
from collections import Counter, defaultdict

import pytest
from ctxflow.streams.bench.quality_sessions import SHAPES, corpus_stats, generate_sessions

COUNT = 24


@pytest.fixture(scope="module")
def corpus() -> tuple[list[dict], list[dict]]:
    return generate_sessions(COUNT, seed=11)


def test_same_seed_same_sessions_and_a_smaller_run_is_a_prefix() -> None:
    first = generate_sessions(6, seed=3)
    assert json.dumps(first) == json.dumps(generate_sessions(6, seed=3))
    assert json.dumps(generate_sessions(3, seed=3)) == json.dumps((first[0][:3], first[1][:3]))
    assert json.dumps(first) != json.dumps(generate_sessions(6, seed=4))


def test_sessions_are_openai_chat_with_a_system_prompt_first_and_no_truth(corpus) -> None:
    sessions, truth = corpus
    assert [t["shape"] for t in truth] == [SHAPES[i % len(SHAPES)] for i in range(COUNT)]
    for session, t in zip(sessions, truth, strict=True):
        assert set(session) == {"session_id", "messages"} and session["session_id"] == t["session_id"]
        msgs = session["messages"]
        assert 60 <= len(msgs) <= 200
        assert msgs[0]["role"] == "system" and all(m["role"] != "system" for m in msgs[1:])
        for m in msgs:
            assert set(m) <= {"role", "content", "tool_calls", "tool_call_id"}
            assert m["role"] in {"system", "user", "assistant", "tool"}
            for call in m.get("tool_calls", ()):
                assert call["type"] == "function" and json.loads(call["function"]["arguments"])


def test_every_tool_result_pairs_with_an_earlier_call_and_every_call_gets_its_result(corpus) -> None:
    sessions, _ = corpus
    reused = 0
    for session in sessions:
        msgs, issuer, answered, seen = session["messages"], {}, set(), Counter()
        for i, m in enumerate(msgs):
            if m["role"] == "assistant":
                ids = [c["id"] for c in m.get("tool_calls", ())]
                assert len(ids) == len(set(ids)), "ids are unique within one assistant message"
                issuer.update({cid: i for cid in ids})
                seen.update(ids)
            elif m["role"] == "tool":
                call = issuer[m["tool_call_id"]]  # the nearest earlier issuer
                assert all(msgs[k]["role"] == "tool" for k in range(call + 1, i))
                answered.add((call, m["tool_call_id"]))
        assert answered == {(i, c["id"]) for i, m in enumerate(msgs) for c in m.get("tool_calls", ())}
        reused += any(n > 1 for n in seen.values())
    assert 0 < reused < len(sessions), "some sessions reuse tool-call ids, not all"


def test_references_point_back_at_items_holding_their_facts_verbatim(corpus) -> None:
    sessions, truth = corpus
    for session, t in zip(sessions, truth, strict=True):
        msgs = session["messages"]
        assert t["references"], t["session_id"]
        fact_items = {f["item"] for f in t["fact_items"]}
        for ref in t["references"]:
            item, turn, step = ref["item"], ref["turn"], ref["step"]
            assert item in fact_items and item < turn < step
            assert msgs[step]["role"] == "assistant"
            assert all(msgs[k]["role"] != "assistant" for k in range(turn + 1, step)), "the first assistant after"
            assert ref["facts"] and all(f in msgs[item]["content"] for f in ref["facts"])
            if ref["fact_kind"] != "constraint":
                key = ref["facts"][0]
                assert key in json.dumps(msgs[turn]), "the referencing turn names the key"
                holders = [k for k in range(turn) if key in json.dumps(msgs[k])]
                assert holders == [item], "the key names exactly one earlier item"


def test_referenced_items_are_a_minority_of_every_kind_of_fact_bearing_item(corpus) -> None:
    sessions, truth = corpus
    stats = corpus_stats(sessions, truth)
    assert set(stats) == set(SHAPES)
    for shape in stats.values():
        assert shape["references"] >= shape["sessions"] * 3
        assert shape["distractor_share"] >= 0.6
    referenced, total = Counter(), Counter()
    for t in truth:
        refs = {r["item"] for r in t["references"]}
        for f in t["fact_items"]:
            kind = f["kind"].split(":")[0]
            total[kind] += 1
            referenced[kind] += f["item"] in refs
    for kind in ("tool_result", "subagent_report", "assistant_note", "user_followup"):
        assert 0 < referenced[kind] < total[kind] / 2, kind


def test_sessions_are_tool_heavy_with_sub_agents_and_long_gaps(corpus) -> None:
    sessions, truth = corpus
    gaps, subagents = [], defaultdict(int)
    for session, t in zip(sessions, truth, strict=True):
        msgs = session["messages"]
        assert sum(m["role"] == "tool" for m in msgs) >= len(msgs) / 4
        gaps += [r["step"] - r["item"] for r in t["references"]]
        subagents[t["shape"]] += sum(f["kind"] == "subagent_report" for f in t["fact_items"])
        assert any(len(m["content"] or "") > 2_000 for m in msgs if m["role"] == "tool")
    assert min(gaps) >= 12 and sorted(gaps)[len(gaps) // 2] >= 30
    assert subagents["research"] > 0 and subagents["audit"] > 0
