"""Run envelopes and cost lines from the processor chain: what a user reads about a run, computed without Kafka.

Expectations are computed in each test from the events it sends, never read back from the processor.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from ctxflow.processors.budget import BudgetProcessor
from ctxflow.processors.chain import default_chain
from ctxflow.processors.envelopes.integrity import integrity_hash, verify
from ctxflow.processors.envelopes.processor import TABLE
from ctxflow.processors.envelopes.state import RunState
from ctxflow.processors.pricing import DEFAULT_PRICES, usage_tokens
from ctxflow.processors.tokens import TokenCounter
from ctxflow.processors.types import DictBudgetState, Position, run_key
from ctxflow.schemas.models import (
    ContextLayer,
    CostLine,
    ItemKind,
    MemoryCandidate,
    MemoryScope,
    MemoryType,
    Role,
    RunEnvelope,
    RunEvent,
    RunStatus,
    Slot,
    SlotCaps,
    TenantManifest,
    TurnEvent,
    UsageReport,
)
from ctxflow.streams.sdk import RunContext

T0 = datetime(2025, 5, 1, 9, 0, tzinfo=UTC)
IDLE_S = 600
TOPIC = {TurnEvent: "turns", UsageReport: "usage", RunEvent: "runs", MemoryCandidate: "memory.candidates"}
COUNTER = TokenCounter()


class Chain:
    """The worker's chain over in-memory state; numbers offsets per topic; keeps the last of every output."""

    def __init__(self, *manifests: TenantManifest) -> None:
        self.state = DictBudgetState(manifests={m.tenant_id: m for m in manifests})
        self.chain = default_chain(BudgetProcessor(COUNTER), idle_timeout_s=IDLE_S, storage_days=30)
        self.offsets: dict[str, int] = defaultdict(int)
        self.envelopes: dict[tuple[str, str], RunEnvelope] = {}
        self.emitted: list[RunEnvelope] = []
        self.costs: dict[str, CostLine] = {}
        self.log: list[tuple[Any, Position]] = []

    def __call__(self, *events: Any) -> list[Any]:
        out: list[Any] = []
        for event in events:
            topic = TOPIC[type(event)]
            pos = Position(topic, 0, self.offsets[topic])
            self.offsets[topic] += 1
            self.log.append((event, pos))
            out += self.chain.process(event, pos, self.state, T0)
        for o in out:
            # Published records are built without a second validation (processors.envelopes.records): each must
            # still be exactly what validating its values gives.
            assert type(o).model_validate(o.model_dump()) == o
            if isinstance(o, RunEnvelope):
                held = self.envelopes.get((o.tenant_id, o.run_id))
                assert held is None or o.envelope_version > held.envelope_version
                self.envelopes[(o.tenant_id, o.run_id)] = o
                self.emitted.append(o)
            elif isinstance(o, CostLine):
                self.costs[o.cost_id] = o
        return out

    def lines(self, run_id: str) -> list[CostLine]:
        return [c for c in self.costs.values() if c.run_id == run_id]


def ctx(run_id: str, agent: str = "planner", tenant: str = "acme", **kw: Any) -> RunContext:
    clock = iter(T0 + timedelta(seconds=i) for i in range(10_000))
    return RunContext(tenant_id=tenant, user_id="u1", session_id="s1", agent_id=agent, model="gpt-4o",
                      run_id=run_id, clock=lambda: next(clock), id_factory=_ids(run_id), **kw)


def _ids(prefix: str) -> Any:
    counter = iter(range(1_000_000))
    return lambda: f"{prefix}-{next(counter)}"


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_a_workflow_of_a_parent_and_two_sub_agents_materializes_three_envelopes_and_its_cost_split() -> None:
    feed = Chain()
    parent = ctx("root")
    child_a, child_b = parent.child("researcher", run_id="kid-a"), parent.child("coder", run_id="kid-b")
    events: list[Any] = [parent.started(at=at(0))]
    events += [
        parent.turn(Role.SYSTEM, ItemKind.MESSAGE, Slot.SYSTEM, "policy", token_count=300, at=at(1)),
        parent.turn(Role.SYSTEM, ItemKind.MESSAGE, Slot.TOOLS, "tools", token_count=200, at=at(1)),
        parent.turn(Role.USER, ItemKind.MESSAGE, Slot.HISTORY, "find the bug", token_count=50, at=at(2)),
        parent.turn(Role.SYSTEM, ItemKind.MEMORY, Slot.RETRIEVED, "likes terse", token_count=20, at=at(2),
                    item_id="mem-7"),
    ]
    call = parent.tool_call("delegate", token_count=30, at=at(3), tool_call_ids=["c1", "c2"])
    events += [call, parent.tool_result(call, "done", token_count=40, at=at(60))]
    events += [parent.usage(provider="openai", input_tokens=640, output_tokens=70, latency_ms=9, at=at(61))]
    for child, base in ((child_a, 10), (child_b, 20)):
        events += [
            child.started(at=at(base)),
            child.turn(Role.USER, ItemKind.MESSAGE, Slot.HISTORY, "sub task", token_count=100, at=at(base + 1)),
            child.turn(Role.TOOL, ItemKind.RETRIEVED_CHUNK, Slot.RETRIEVED, "chunk", token_count=400,
                       at=at(base + 2)),
            child.turn(Role.TOOL, ItemKind.RETRIEVED_CHUNK, Slot.RETRIEVED, "chunk 2", token_count=250,
                       at=at(base + 2), layer=ContextLayer.TENANT),
        ]
    # The researcher's stream broke: it reported nothing before it was cut (a gateway logged it at $0).
    events += [child_a.usage(provider="openai", input_tokens=0, output_tokens=0, latency_ms=5, streamed=True,
                             complete=False, at=at(14))]
    events += [child_b.usage(provider="openai", input_tokens=700, output_tokens=30, cached_read_tokens=100,
                             latency_ms=5, at=at(24))]
    events += [child_a.finalized(at=at(15)), child_b.finalized(RunStatus.FAILED, at=at(25)),
               parent.finalized(at=at(62))]
    feed(*events)

    root, a, b = (feed.envelopes[("acme", r)] for r in ("root", "kid-a", "kid-b"))
    assert (root.status, root.closed_by, root.depth, root.root_run_id, root.parent_run_id) == (
        "succeeded", "agent", 0, "root", None)
    assert (a.depth, a.root_run_id, a.parent_run_id, a.workflow_id, a.agent_id) == (1, "root", "root", "root",
                                                                                     "researcher")
    assert b.status == "failed"
    # Layers: system and tools derive as tenant, a memory as user, the rest of the parent as session.
    assert (root.tenant_tokens, root.user_tokens, root.session_tokens, root.retrieved_tokens) == (500, 20, 120, 0)
    assert (root.static_prefix_tokens, root.dynamic_tokens) == (500, 140)
    assert (root.tool_calls, root.tool_results, root.retrievals, root.memory_ids) == (2, 1, 1, ["mem-7"])
    # A stated layer wins over the derived one.
    assert (a.retrieved_tokens, a.tenant_tokens, a.session_tokens, a.retrievals) == (400, 250, 100, 2)
    assert root.started_at == at(0) and root.finalized_at == at(62) and root.duration_ms == 62_000
    assert root.event_count == 9 and a.event_count == 6

    # The broken stream is estimated from the counted context and flagged, never zero.
    assert a.usage_estimated and a.estimated_tokens == 750 and a.input_tokens == 0
    estimate = DEFAULT_PRICES.estimate_cost("gpt-4o", 750).micros
    assert a.inference_micros == estimate > 0 and a.cost_estimated
    assert not b.usage_estimated and b.estimated_tokens == 0
    assert root.inference_micros == DEFAULT_PRICES.usage_cost(events[7]).micros

    # Cost lines: one per priced event, each naming its tree; they add up to the envelopes.
    for env in (root, a, b):
        lines = feed.lines(env.run_id)
        assert sum(c.micros for c in lines) == env.cost_micros
        assert {c.root_run_id for c in lines} == {"root"} and {c.workflow_id for c in lines} == {"root"}
        assert all(c.price_version == DEFAULT_PRICES.version for c in lines)
    tooling = [c for c in feed.lines("root") if c.surface == "tooling"]
    assert [(c.quantity, c.unit, c.micros, c.estimated) for c in tooling] == [(2, "calls", 200, False)]
    retrieval = [c for c in feed.lines("kid-a") if c.surface == "retrieval"]
    assert len(retrieval) == 2 and {c.estimated for c in retrieval} == {False}
    broken = [c for c in feed.lines("kid-a") if c.surface == "inference"]
    assert sorted((c.quantity, c.estimated) for c in broken) == [(0, True), (750, True)]
    by_agent: dict[str, int] = defaultdict(int)
    for c in feed.costs.values():
        by_agent[c.agent_id] += c.micros
    assert by_agent == {"planner": root.cost_micros, "researcher": a.cost_micros, "coder": b.cost_micros}

    # The integrity hash is the events' own.
    for env in (root, a, b):
        assert verify(env, events)  # the run's own events among the workflow's


def test_a_run_that_never_finalizes_is_closed_as_abandoned_once_its_tenant_moves_past_the_idle_timeout() -> None:
    feed = Chain()
    killed = ctx("killed")
    feed(killed.started(at=at(0)),
         killed.turn(Role.USER, ItemKind.MESSAGE, Slot.HISTORY, "go", token_count=1_000, at=at(5)))
    later = ctx("later")

    def traffic(seconds: float) -> None:
        feed(later.started(at=at(seconds)),
             later.turn(Role.USER, ItemKind.MESSAGE, Slot.HISTORY, "hi", token_count=1, at=at(seconds)),
             later.usage(provider="openai", input_tokens=1, output_tokens=1, latency_ms=1, at=at(seconds)))

    traffic(5 + IDLE_S - 1)
    assert ("acme", "killed") not in feed.envelopes  # not idle long enough yet
    traffic(5 + IDLE_S + IDLE_S / 16 + 1)  # every stream past the deadline's bucket
    env = feed.envelopes[("acme", "killed")]
    assert (env.status, env.closed_by, env.finalized_at) == ("abandoned", "idle_timeout", at(5 + IDLE_S))
    assert env.usage_estimated and env.estimated_tokens == 1_000
    assert env.inference_micros == DEFAULT_PRICES.estimate_cost("gpt-4o", 1_000).micros > 0
    closure = [c for c in feed.lines("killed") if c.surface == "inference"]
    assert [(c.quantity, c.estimated, c.source_event_id) for c in closure] == [(1_000, True, "close:killed")]


def test_a_tenant_whose_streams_lag_does_not_close_runs_and_other_tenants_never_do() -> None:
    feed = Chain()
    killed = ctx("killed")
    feed(killed.started(at=at(0)),
         killed.turn(Role.USER, ItemKind.MESSAGE, Slot.HISTORY, "go", token_count=10, at=at(0)),
         killed.usage(provider="o", input_tokens=1, output_tokens=0, latency_ms=1, at=at(0)))
    far = at(10 * IDLE_S)
    other = ctx("busy", tenant="globex")
    feed(other.started(at=far), other.turn(Role.USER, ItemKind.MESSAGE, Slot.HISTORY, "x", token_count=1, at=far),
         other.usage(provider="o", input_tokens=1, output_tokens=0, latency_ms=1, at=far))
    same = ctx("chatty")
    feed(same.turn(Role.USER, ItemKind.MESSAGE, Slot.HISTORY, "x", token_count=1, at=far))  # turns only
    assert not feed.envelopes  # usage and runs of acme never moved: they may still bring the killed run's records
    feed(same.usage(provider="o", input_tokens=1, output_tokens=0, latency_ms=1, at=far), same.started(at=far))
    assert set(feed.envelopes) == {("acme", "killed")}


def test_a_late_usage_report_updates_a_closed_run_and_an_abandoned_run_that_resumes_reopens() -> None:
    feed = Chain()
    run = ctx("r")
    feed(run.started(at=at(0)), run.turn(Role.USER, ItemKind.MESSAGE, Slot.HISTORY, "q", token_count=900, at=at(1)),
         run.finalized(at=at(2)))
    first = feed.envelopes[("acme", "r")]
    assert first.estimated_tokens == 900
    feed(run.usage(provider="openai", input_tokens=950, output_tokens=40, latency_ms=3, at=at(2)))
    second = feed.envelopes[("acme", "r")]
    assert second.envelope_version > first.envelope_version and second.estimated_tokens == 0
    assert second.status == "succeeded" and second.input_tokens == 950
    estimate = [c for c in feed.lines("r") if c.source_event_id == "close:r" and c.surface == "inference"]
    assert [(c.quantity, c.micros) for c in estimate] == [(0, 0)]  # the estimate was replaced, not left standing

    idle = ctx("idle")
    feed(idle.turn(Role.USER, ItemKind.MESSAGE, Slot.HISTORY, "q", token_count=5, at=at(10)))
    feed(*_tick(at(10 + 2 * IDLE_S)))
    assert feed.envelopes[("acme", "idle")].status == "abandoned"
    feed(idle.turn(Role.USER, ItemKind.MESSAGE, Slot.HISTORY, "back", token_count=5, at=at(10 + 2 * IDLE_S)),
         idle.finalized(at=at(10 + 2 * IDLE_S + 1)))
    resumed = feed.envelopes[("acme", "idle")]
    assert (resumed.status, resumed.closed_by, resumed.session_tokens) == ("succeeded", "agent", 10)


def _tick(moment: datetime) -> list[Any]:
    """One record per stream of another run of the tenant at ``moment``: moves its watermark there."""
    other = ctx(f"tick-{moment.timestamp():.0f}")
    return [other.started(at=moment),
            other.turn(Role.USER, ItemKind.MESSAGE, Slot.HISTORY, "t", token_count=1, at=moment),
            other.usage(provider="o", input_tokens=1, output_tokens=0, latency_ms=1, at=moment)]


def test_a_call_logged_at_zero_is_estimated_even_when_the_report_says_complete() -> None:
    feed = Chain()
    run = ctx("z")
    zero = run.usage(provider="litellm", input_tokens=0, output_tokens=0, latency_ms=3, streamed=True, at=at(2))
    feed(run.turn(Role.USER, ItemKind.MESSAGE, Slot.HISTORY, "q", token_count=321, at=at(1)), zero,
         run.finalized(at=at(3)))
    env = feed.envelopes[("acme", "z")]
    assert env.usage_estimated and env.estimated_tokens == 321 and env.inference_micros > 0
    assert usage_tokens(zero) == 0


def test_duplicates_and_replays_change_nothing_and_reordered_turns_hash_as_in_order() -> None:
    run = ctx("d")
    turns = [run.turn(Role.USER, ItemKind.MESSAGE, Slot.HISTORY, f"m{i}", token_count=10 + i, at=at(i))
             for i in range(6)]
    report = run.usage(provider="openai", input_tokens=80, output_tokens=5, latency_ms=1, at=at(7))
    done = run.finalized(at=at(8))
    clean = Chain()
    clean(*turns, report, done)
    noisy = Chain()
    shuffled = [turns[1], turns[0], turns[3], turns[2], turns[2], turns[5], turns[4]]  # a resend, swaps
    noisy(*shuffled, report, report, done, done)
    assert noisy.envelopes[("acme", "d")].model_dump(exclude={"envelope_version"}) == clean.envelopes[
        ("acme", "d")].model_dump(exclude={"envelope_version"})
    env = clean.envelopes[("acme", "d")]
    assert env.integrity_hash == integrity_hash("acme", "d", turns, [report], [done])
    # A crash replay: the same records again at their offsets change nothing and publish nothing new.
    before = dict(noisy.state.tables[TABLE])
    for event, pos in noisy.log:
        noisy.chain.process(event, pos, noisy.state, T0)
    assert {k: v.to_bytes() for k, v in noisy.state.tables[TABLE].items()} == {
        k: v.to_bytes() for k, v in before.items()}


def test_the_integrity_hash_detects_a_dropped_and_a_tampered_event() -> None:
    feed = Chain()
    run = ctx("h")
    events: list[Any] = [run.started(at=at(0))]
    events += [run.turn(Role.USER, ItemKind.MESSAGE, Slot.HISTORY, f"m{i}", token_count=5, at=at(i)) for i in range(4)]
    events += [run.usage(provider="openai", input_tokens=20, output_tokens=2, latency_ms=1, at=at(5)),
               run.finalized(at=at(6))]
    feed(*events)
    expected = feed.envelopes[("acme", "h")]
    assert verify(expected, events)
    assert verify(expected, list(reversed(events)))  # order within a stream is canonical, not the caller's
    for dropped in range(len(events)):
        assert not verify(expected, events[:dropped] + events[dropped + 1:]), dropped
    tampered = events[2].model_copy(update={"token_count": 6})
    assert not verify(expected, [*events[:2], tampered, *events[3:]])
    inflated = events[5].model_copy(update={"input_tokens": 2})
    assert not verify(expected, [*events[:5], inflated, events[6]])


def test_usage_read_before_a_sub_agent_s_run_event_waits_for_its_lineage() -> None:
    feed = Chain()
    parent = ctx("p")
    child = parent.child("helper", run_id="c")
    started = child.started(at=at(1))
    feed(child.usage(provider="openai", input_tokens=10, output_tokens=1, latency_ms=1, at=at(2)))
    assert not feed.costs  # a usage report does not say which tree its run belongs to
    out = feed(started)
    (line,) = [o for o in out if isinstance(o, CostLine)]
    assert (line.root_run_id, line.parent_run_id, line.agent_id) == ("p", "p", "helper")


def test_the_planner_s_evictions_and_promotions_by_scope_are_counted() -> None:
    tight = TenantManifest(tenant_id="acme", version=1, tier="free", slot_caps=SlotCaps(history=400), total_cap=10_000,
                           updated_at=T0)
    feed = Chain(tight)
    run = ctx("e")
    out: list[Any] = []
    for i in range(12):
        out += feed(run.turn(Role.USER if i % 2 else Role.ASSISTANT, ItemKind.MESSAGE, Slot.HISTORY,
                             f"step {i} about order {1000 + i}", token_count=60, at=at(i)))
    feed(run.memory_candidate(MemoryScope.USER, MemoryType.PREFERENCE, "likes short answers", confidence=0.9,
                              at=at(13)),
         run.memory_candidate(MemoryScope.SESSION, MemoryType.FACT, "order 1003", confidence=0.5, at=at(13)))
    feed(run.finalized(at=at(14)))
    env = feed.envelopes[("acme", "e")]
    evicting = [d for d in out if getattr(d, "kind", None) in ("evict", "mask", "offload")]
    assert evicting and env.evictions == sum(len(d.actions) for d in evicting)
    assert env.tokens_freed == sum(d.tokens_freed for d in evicting) > 0
    assert env.promotions == {"user": 1, "session": 1}


@pytest.mark.parametrize("early", [False, True])
def test_run_state_round_trips_through_its_changelog_form(early: bool) -> None:
    feed = Chain()
    run = ctx("s")
    turns = [run.turn(Role.USER, ItemKind.MEMORY, Slot.RETRIEVED, f"m{i}", token_count=3, at=at(i)) for i in range(4)]
    feed(*(turns[::-1] if early else turns), run.usage(provider="o", input_tokens=1, output_tokens=1, latency_ms=1))
    state: RunState = feed.state.tables[TABLE][run_key("acme", "s")]
    again = RunState.from_bytes(state.to_bytes())
    assert again.to_bytes() == state.to_bytes() and again.turn_chain() == state.turn_chain()
