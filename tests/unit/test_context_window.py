"""ContextWindow: an agent's message list follows ctxflow's decisions and always stays sendable.

Built from real ``Decision`` records. The property test draws conversations whose tool-call ids repeat (a small
pool, as in real logs) and decisions over the ids they hold, including groups that split a call from its result
(ctxflow never sends those, the helper must survive them), and checks the chat API's tool-pairing rules,
the length bound and idempotence after every step.
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from typing import Any

import pytest
from ctxflow.processors.types import decision_id
from ctxflow.schemas.models import (
    Decision,
    DecisionKind,
    ItemAction,
    ItemDecision,
    StaleMemory,
    SummaryProvenance,
    content_digest,
)
from ctxflow.streams.sdk.context_window import MEMORY_PREFIX, SUMMARY_PREFIX, ContextWindow, mask_placeholder
from hypothesis import given, settings
from hypothesis import strategies as st

T0 = datetime(2025, 1, 1, tzinfo=UTC)
_SEQ = itertools.count()
_ACTION = {
    DecisionKind.EVICT: ItemAction.EVICT, DecisionKind.OFFLOAD: ItemAction.OFFLOAD,
    DecisionKind.RECALL: ItemAction.RECALL, DecisionKind.MASK: ItemAction.MASK,
    DecisionKind.SWAP: ItemAction.SWAP, DecisionKind.COMPRESS: ItemAction.COMPRESS,
}


def summary(summary_id: str, sources: list[str], text: str | None, depth: int = 1) -> SummaryProvenance:
    return SummaryProvenance(
        summary_id=summary_id, text=text, token_count=12, source_ids=sources,
        source_digests=[content_digest(s) for s in sources], summarizer="extractive", summarizer_version="1",
        depth=depth, fidelity=0.9,
    )


def decide(kind: DecisionKind, ids: list[str], *, provenance: SummaryProvenance | None = None,
           run_id: str = "run-1", tokens: int = 40) -> Decision:
    action = _ACTION.get(kind, ItemAction.EVICT)
    return Decision(
        decision_id=decision_id("acme", f"turn-{next(_SEQ)}", kind, f"{kind.value}:0:0"), tenant_id="acme",
        user_id="u1", session_id="s1", run_id=run_id, kind=kind, reason="test",
        actions=[ItemDecision(item_id=i, action=action, tokens=tokens) for i in ids], decided_at=T0,
        summary=provenance,
    )


def call(call_id: str, name: str = "search") -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": "{}"}}


def conversation() -> ContextWindow:
    """A trip-booking run whose two tool calls share the id ``call_0`` (as many real logs do)."""
    window = ContextWindow(run_id="run-1")
    window.add({"role": "system", "content": "You book travel. Never exceed the budget."}, "sys")
    window.add({"role": "user", "content": "Find flights to Lisbon"}, "u1")
    window.add({"role": "assistant", "content": None, "tool_calls": [call("call_0", "search_flights")]}, "a1")
    window.add({"role": "tool", "tool_call_id": "call_0", "content": "TP123 240 EUR; FR88 90 EUR"}, "t1")
    window.add({"role": "assistant", "content": "FR88 is cheapest at 90 EUR."}, "a2")
    window.add({"role": "user", "content": "Book FR88"}, "u2")
    window.add({"role": "assistant", "content": None, "tool_calls": [call("call_0", "book")]}, "a3")
    window.add({"role": "tool", "tool_call_id": "call_0", "content": "booked FR88, ref QX7"}, "t3")
    return window


def contents(window: ContextWindow) -> list[tuple[str, Any]]:
    return [(m["role"], m.get("content")) for m in window.messages()]


# ---- the chat API's rules, written independently of the implementation ---------------------------------------
def issued(message: dict[str, Any]) -> list[str]:
    return [c["id"] for c in message.get("tool_calls") or []] if message["role"] == "assistant" else []


def assert_sendable(messages: list[dict[str, Any]]) -> None:
    """System messages first; every tool message answers the nearest earlier assistant message that issued its
    id, directly after it; every tool call issued has exactly one answer; no assistant message is left empty."""
    roles = [m["role"] for m in messages]
    n_system = len(list(itertools.takewhile(lambda r: r == "system", roles)))
    assert "system" not in roles[n_system:], roles
    answered: dict[tuple[int, str], int] = {}
    for j, m in enumerate(messages):
        if m["role"] != "tool":
            continue
        issuers = [i for i in range(j) if m["tool_call_id"] in issued(messages[i])]
        assert issuers, f"orphan tool message {m}"
        nearest = issuers[-1]
        assert all(r == "tool" for r in roles[nearest + 1:j]), "a tool result is not adjacent to its call"
        key = (nearest, m["tool_call_id"])
        assert key not in answered, f"two answers to {key}"
        answered[key] = j
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        assert "tool_calls" not in m or m["tool_calls"], "an empty tool_calls list"
        assert m.get("content") or m.get("tool_calls"), "an empty assistant message"
        for call_id in issued(m):
            assert (i, call_id) in answered, f"tool call {call_id} of message {i} has no result"


# ---- each kind --------------------------------------------------------------------------------------------------
def test_a_recalled_memory_reaches_the_model_once_however_often_it_is_recalled() -> None:
    window = ContextWindow()
    window.add({"role": "user", "content": "How many seats does Acme have?"}, item_id="u-1")
    assert window.add_memory("mem-seats", "Acme's plan has 75 seats")
    assert not window.add_memory("mem-seats", "Acme's plan has 75 seats")  # a second recall of it
    assert window.messages() == [
        {"role": "user", "content": "How many seats does Acme have?"},
        # Not a tool message: one without its call would be dropped, and the model would never read it.
        {"role": "assistant", "content": MEMORY_PREFIX + "Acme's plan has 75 seats"},
    ]
    assert window.holds("mem-seats") and not window.holds("mem-other")


def test_evict_removes_items_for_good() -> None:
    window = conversation()
    assert window.apply(decide(DecisionKind.EVICT, ["a1", "t1"]))
    assert window.item_ids() == ["sys", "u1", "a2", "u2", "a3", "t3"]
    assert not window.apply(decide(DecisionKind.RECALL, ["a1", "t1"]))  # evicted is not offloaded
    assert "TP123 240 EUR; FR88 90 EUR" not in str(window.messages())
    assert_sendable(window.messages())


def test_offload_keeps_items_aside_and_recall_brings_them_to_the_tail_in_action_order() -> None:
    window = conversation()
    assert window.apply(decide(DecisionKind.OFFLOAD, ["u1", "a1", "t1"]))
    assert list(window.offloaded) == ["u1", "a1", "t1"]
    assert window.offloaded["t1"]["content"] == "TP123 240 EUR; FR88 90 EUR"
    assert window.item_ids() == ["sys", "a2", "u2", "a3", "t3"]
    window.add({"role": "user", "content": "What did TP123 cost?"}, "u3")

    assert window.apply(decide(DecisionKind.RECALL, ["a1", "t1"]))
    assert window.item_ids() == ["sys", "a2", "u2", "a3", "t3", "u3", "a1", "t1"]
    assert list(window.offloaded) == ["u1"]
    tail = window.messages()[-2:]
    assert tail[0]["tool_calls"][0]["function"]["name"] == "search_flights"
    assert tail[1] == {"role": "tool", "tool_call_id": "call_0", "content": "TP123 240 EUR; FR88 90 EUR"}
    assert_sendable(window.messages())


def test_mask_keeps_place_role_and_tool_call_id() -> None:
    window = conversation()
    text = "[tool result t1 masked: 40 tokens; mentions FR88, TP123]"
    masked = decide(DecisionKind.MASK, ["t1"], provenance=summary("mask:t1", ["t1"], text))
    assert window.apply(masked)
    assert window.item_ids() == ["sys", "u1", "a1", "t1", "a2", "u2", "a3", "t3"]
    assert window.messages()[3] == {"role": "tool", "tool_call_id": "call_0", "content": text}
    assert_sendable(window.messages())


def test_mask_naming_several_results_masks_each_with_the_planner_placeholder() -> None:
    window = conversation()
    masked = decide(DecisionKind.MASK, ["t1", "t3"], provenance=summary("mask:t1", ["t1"], "[t1 masked]"), tokens=55)
    assert window.apply(masked)
    assert window.messages()[3]["content"] == "[t1 masked]"
    assert window.messages()[7] == {"role": "tool", "tool_call_id": "call_0", "content": mask_placeholder("t3", 55)}


def test_swap_puts_one_assistant_summary_where_the_first_source_was() -> None:
    window = conversation()
    swap = decide(DecisionKind.SWAP, ["u1", "a1", "t1", "a2"],
                  provenance=summary("sum-1", ["u1", "a1", "t1", "a2"], "User wants Lisbon; FR88 90 EUR cheapest."))
    assert window.apply(swap)
    assert window.item_ids() == ["sys", "sum-1", "u2", "a3", "t3"]
    assert window.messages()[1] == {
        "role": "assistant", "content": SUMMARY_PREFIX + "User wants Lisbon; FR88 90 EUR cheapest."
    }
    # Later decisions name the summary: a depth-2 swap takes it in, then an eviction removes that one.
    deeper = decide(DecisionKind.SWAP, ["sum-1", "u2"],
                    provenance=summary("sum-2", ["sum-1", "u2"], "Lisbon trip; user chose FR88.", depth=2))
    assert window.apply(deeper)
    assert window.item_ids() == ["sys", "sum-2", "a3", "t3"]
    assert window.apply(decide(DecisionKind.EVICT, ["sum-2"]))
    assert window.item_ids() == ["sys", "a3", "t3"]
    assert_sendable(window.messages())


def test_swap_of_sources_apart_takes_the_earliest_place() -> None:
    window = conversation()
    swap = decide(DecisionKind.SWAP, ["a2", "u1"], provenance=summary("sum-1", ["u1", "a2"], "Lisbon; FR88 cheapest"))
    assert window.apply(swap)
    assert window.item_ids() == ["sys", "sum-1", "a1", "t1", "u2", "a3", "t3"]
    assert_sendable(window.messages())


def test_no_retention_swap_leaves_the_list_until_the_agent_supplies_its_own_summary() -> None:
    window = conversation()
    swap = decide(DecisionKind.SWAP, ["a1", "t1"], provenance=summary("sum-1", ["a1", "t1"], None))
    before = window.messages()
    assert not window.apply(swap)
    assert window.messages() == before
    assert window.apply(swap, summary_text="searched flights: FR88 cheapest")
    assert window.item_ids() == ["sys", "u1", "sum-1", "a2", "u2", "a3", "t3"]
    assert window.messages()[2]["content"] == SUMMARY_PREFIX + "searched flights: FR88 cheapest"


@pytest.mark.parametrize("kind", [k for k in DecisionKind if k not in _ACTION or k is DecisionKind.COMPRESS])
def test_informational_kinds_change_nothing(kind: DecisionKind) -> None:
    window = conversation()
    before = window.messages()
    assert not window.apply(decide(kind, ["u1", "a1", "t1"]))
    assert window.messages() == before


# ---- delivery and robustness -----------------------------------------------------------------------------------
def test_a_redelivered_decision_changes_nothing() -> None:
    window = conversation()
    window.apply(decide(DecisionKind.OFFLOAD, ["a1", "t1"]))
    recall = decide(DecisionKind.RECALL, ["a1", "t1"])
    assert window.apply(recall)
    window.add({"role": "user", "content": "thanks"}, "u3")
    after = window.messages()
    assert not window.apply(recall)  # same decision_id: redelivered after a worker crash
    assert not window.apply(recall.model_copy(update={"decision_id": "another-id"}))  # idempotent by effect too
    assert window.messages() == after
    swap = decide(DecisionKind.SWAP, ["u1", "a2"], provenance=summary("sum-1", ["u1", "a2"], "Lisbon; FR88"))
    assert window.apply(swap)
    assert not window.apply(swap.model_copy(update={"decision_id": "again"}))
    assert window.item_ids().count("sum-1") == 1


def test_decisions_naming_unknown_ids_change_only_what_they_can_name() -> None:
    window = conversation()
    assert window.apply(decide(DecisionKind.EVICT, ["ghost", "u2"]))
    assert not window.apply(decide(DecisionKind.EVICT, ["ghost"]))
    assert not window.apply(decide(DecisionKind.MASK, ["ghost"], provenance=summary("mask:ghost", ["ghost"], "x")))
    assert not window.apply(decide(DecisionKind.SWAP, ["ghost"], provenance=summary("s", ["ghost"], "x")))
    swap = decide(DecisionKind.SWAP, ["ghost", "a2"], provenance=summary("sum-1", ["ghost", "a2"], "FR88 cheapest"))
    assert window.apply(swap)
    assert window.item_ids() == ["sys", "u1", "a1", "t1", "sum-1", "a3", "t3"]


def test_decisions_about_another_run_are_ignored() -> None:
    window = conversation()
    assert not window.apply(decide(DecisionKind.EVICT, ["u1"], run_id="run-2"))
    assert "u1" in window.item_ids()


def test_caller_dicts_are_never_mutated_nor_aliased() -> None:
    window = ContextWindow()
    assistant = {"role": "assistant", "content": None, "tool_calls": [call("c1"), call("c2")]}
    result = {"role": "tool", "tool_call_id": "c1", "content": "ok"}
    snapshot = (repr(assistant), repr(result))
    window.add(assistant, "a")
    window.add(result, "t")
    sent = window.messages()
    assert sent[0]["tool_calls"] == [call("c1")]  # c2 has no result: dropped from a copy
    window.apply(decide(DecisionKind.MASK, ["t"], provenance=summary("mask:t", ["t"], "[masked]")))
    sent[0]["tool_calls"][0]["id"] = "changed"
    window.offloaded.clear()
    assert (repr(assistant), repr(result)) == snapshot
    assert window.messages()[0]["tool_calls"] == [call("c1")]


def test_split_groups_never_leave_orphans_or_unanswered_calls() -> None:
    window = conversation()
    window.apply(decide(DecisionKind.EVICT, ["t3"]))  # a3's only call loses its result: a3 has nothing left
    window.apply(decide(DecisionKind.OFFLOAD, ["a1"]))  # t1 loses its call: an orphan
    assert contents(window) == [
        ("system", "You book travel. Never exceed the budget."), ("user", "Find flights to Lisbon"),
        ("assistant", "FR88 is cheapest at 90 EUR."), ("user", "Book FR88"),
    ]
    assert window.item_ids() == ["sys", "u1", "t1", "a2", "u2", "a3"]  # held, not sent
    window.apply(decide(DecisionKind.RECALL, ["a1"]))  # back at the tail, after its result: still unanswered
    assert_sendable(window.messages())
    assert len(window.messages()) == 4


def test_a_tool_result_answers_the_nearest_earlier_call_with_its_id() -> None:
    window = conversation()
    window.apply(decide(DecisionKind.EVICT, ["t1"]))
    # t3 answers a3 (the nearest call_0), not a1: a1 has nothing left and goes.
    assert [i for i, _ in window.items()] == ["sys", "u1", "a2", "u2", "a3", "t3"]
    window.apply(decide(DecisionKind.EVICT, ["a3"]))
    # Now t3's nearest earlier call_0 is a1's: the pair is whole again.
    assert [i for i, _ in window.items()] == ["sys", "u1", "a1", "t3", "a2", "u2"]
    assert_sendable(window.messages())


def test_a_message_left_between_a_call_and_its_result_moves_after_the_result() -> None:
    window = ContextWindow()
    window.add({"role": "assistant", "content": "checking", "tool_calls": [call("c1"), call("c2")]}, "a")
    window.add({"role": "tool", "tool_call_id": "c1", "content": "one"}, "t1")
    window.add({"role": "tool", "tool_call_id": "c2", "content": "two"}, "t2")
    window.apply(decide(DecisionKind.SWAP, ["t1"], provenance=summary("s", ["t1"], "c1 said one")))
    assert [i for i, _ in window.items()] == ["a", "t2", "s"]
    assert window.messages()[0]["tool_calls"] == [call("c2")]
    assert_sendable(window.messages())


def test_system_messages_come_first_as_given() -> None:
    window = ContextWindow()
    window.add({"role": "system", "content": "constitution"}, "g")
    window.add({"role": "user", "content": "hi"}, "u")
    window.add({"role": "system", "content": "tenant policy v2"}, "p")
    assert [m["content"] for m in window.messages()] == ["constitution", "tenant policy v2", "hi"]


def test_add_refuses_an_id_it_already_holds() -> None:
    window = conversation()
    with pytest.raises(ValueError, match="already"):
        window.add({"role": "user", "content": "again"}, "u1")
    window.apply(decide(DecisionKind.OFFLOAD, ["u1"]))
    with pytest.raises(ValueError, match="already"):
        window.add({"role": "user", "content": "again"}, "u1")
    with pytest.raises(ValueError, match="role"):
        window.add({"content": "no role"}, "x")


# ---- property ------------------------------------------------------------------------------------------------
POOL = ("call_0", "call_1", "call_2")
KINDS = ("user", "turn", "system", "evict", "offload", "recall", "mask", "swap", "compress")


def expected_ids(before: list[str], offloaded: set[str], d: Decision) -> list[str]:
    """The context's item ids after ``d``, from the kinds' definitions."""
    names = [a.item_id for a in d.actions]
    if d.kind in (DecisionKind.EVICT, DecisionKind.OFFLOAD):
        return [i for i in before if i not in names]
    if d.kind is DecisionKind.RECALL:
        return before + [i for i in dict.fromkeys(names) if i in offloaded]
    if d.kind is DecisionKind.SWAP and d.summary is not None and d.summary.text is not None:
        sources = set(names) | set(d.summary.source_ids)
        first = next((k for k, i in enumerate(before) if i in sources), None)
        if first is not None:
            kept = [i for i in before if i not in sources]
            return [*kept[:first], d.summary.summary_id, *kept[first:]]
    return before


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_random_conversations_and_decisions_keep_the_list_sendable_and_idempotent(data: st.DataObject) -> None:
    window = ContextWindow(run_id="run-1")
    steps: list[tuple[str, Any]] = []  # ("add", (message, id)) or ("apply", decision)
    known: list[str] = ["ghost"]  # every id ever held (and one never held)
    evicted: set[str] = set()
    added = 0
    fresh = itertools.count()

    def add(message: dict[str, Any]) -> None:
        nonlocal added
        item_id = f"i{next(fresh)}"
        window.add(message, item_id)
        steps.append(("add", (message, item_id)))
        known.append(item_id)
        added += 1

    add({"role": "system", "content": "policy"})
    for _ in range(data.draw(st.integers(1, 30), label="steps")):
        kind = data.draw(st.sampled_from(KINDS), label="kind")
        if kind == "user":
            add({"role": "user", "content": "question"})
        elif kind == "system":
            add({"role": "system", "content": "late policy"})
        elif kind == "turn":
            ids = data.draw(st.lists(st.sampled_from(POOL), max_size=3), label="calls")
            text = data.draw(st.sampled_from([None, "", "thinking"]), label="text")
            add({"role": "assistant", "content": text, **({"tool_calls": [call(c) for c in ids]} if ids else {})})
            answered = data.draw(st.permutations(ids), label="order")
            answered = answered[: data.draw(st.integers(0, len(answered)), label="answered")]
            strays = data.draw(st.lists(st.sampled_from(POOL), max_size=1), label="stray")
            for call_id in [*answered, *strays]:
                add({"role": "tool", "tool_call_id": call_id, "content": f"result of {call_id}"})
        else:
            names = data.draw(st.lists(st.sampled_from(known), min_size=1, max_size=4, unique=True), label="ids")
            if kind == "recall" and window.offloaded:
                names = data.draw(st.permutations(list(window.offloaded)), label="recalled") + names
                names = list(dict.fromkeys(names))
            dk = DecisionKind(kind)
            provenance = None
            if dk is DecisionKind.MASK:
                provenance = summary(f"mask:{names[0]}", names[:1], f"[masked {names[0]}]")
            elif dk is DecisionKind.SWAP:
                sid = f"sum{next(fresh)}"
                text = data.draw(st.sampled_from(["digest", None]), label="summary text")
                provenance = summary(sid, names, text)
                known.append(sid)
            decision = decide(dk, names, provenance=provenance)
            before, offloaded = window.item_ids(), set(window.offloaded)
            listed = set(before)
            changed = window.apply(decision)
            steps.append(("apply", decision))
            assert window.item_ids() == expected_ids(before, offloaded, decision)
            if dk is DecisionKind.EVICT:
                assert changed == bool(set(names) & (listed | offloaded))
            elif dk is DecisionKind.OFFLOAD:
                assert changed == bool(set(names) & listed)
            elif dk is DecisionKind.RECALL:
                assert changed == bool(set(names) & offloaded)
            if dk is DecisionKind.EVICT:
                evicted |= set(names)
            # Redelivery, and a copy under another id, change nothing.
            after = (window.items(), window.offloaded)
            assert not window.apply(decision)
            assert not window.apply(decision.model_copy(update={"decision_id": f"copy-{decision.decision_id}"}))
            assert (window.items(), window.offloaded) == after
        sent = window.items()
        assert_sendable([m for _, m in sent])
        assert len(sent) <= added
        ids = [i for i, _ in sent]
        assert not evicted & set(ids)
        assert not set(window.offloaded) & set(window.item_ids())
        assert len(set(window.item_ids())) == len(window.item_ids())

    final = (window.items(), window.offloaded)
    for _, step in [s for s in steps if s[0] == "apply"]:  # the whole log redelivered
        assert not window.apply(step)
    assert (window.items(), window.offloaded) == final

    twice = ContextWindow(run_id="run-1")  # every decision delivered twice in a row
    for what, step in steps:
        if what == "add":
            twice.add(*step)
        else:
            twice.apply(step)
            twice.apply(step)
    assert (twice.items(), twice.offloaded) == final


def test_a_stale_memory_leaves_the_window_and_its_replacement_is_named() -> None:
    window = ContextWindow(run_id="run-1")
    window.add({"role": "system", "content": "policy"}, item_id="sys")
    window.add({"role": "user", "content": "How many seats?"}, item_id="q")
    window.add({"role": "tool", "content": "Acme has 50 seats"}, item_id="mem-old")
    window.add({"role": "tool", "content": "Acme is in eu-west-1"}, item_id="mem-region")
    stale = [StaleMemory(memory_id="mem-old", status="superseded", replaced_by="mem-new"),
             StaleMemory(memory_id="mem-gone", status="revoked")]
    notice = Decision(decision_id="stale-1", tenant_id="acme", run_id="run-1", kind=DecisionKind.STALE_CONTEXT,
                      reason="no longer served", decided_at=T0, stale=stale)
    assert window.apply(notice)
    assert window.item_ids() == ["sys", "q", "mem-region"]
    assert window.stale == {"mem-old": stale[0], "mem-gone": stale[1]}
    assert not window.apply(notice)  # redelivered: nothing more
    other = notice.model_copy(update={"decision_id": "stale-2", "run_id": "run-2"})
    window.add({"role": "tool", "content": "Acme has 50 seats"}, item_id="mem-old")  # recalled again
    assert not window.apply(other) and "mem-old" in window.item_ids()  # another run's notice
