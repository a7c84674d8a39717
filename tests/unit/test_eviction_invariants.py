"""The eviction planner's invariants, over generated sessions and every strategy (property tests, no broker).

For each session the worker's chain (budget, then planner) runs turn by turn; compression jobs are answered
at once by the default summarizer, as the summarizer workers would, and now and then a summary made so far loses a
source memory (an invalidation, as the memory processor sends on a deletion: whether the summary is prepared,
swapped in, offloaded or gone already). After every record:

- tier 0 (system and tools slots, the run's first user message, ``tier_hint=0``) and the current user turn are
  never named by an evict, offload, mask, swap or compress decision;
- a tool call and its results leave or stay together (a masked result still stands; a swap takes both);
- decisions never dangle: each names only items the agent holds in the state the decision needs (live for
  evict/offload/mask/swap/compress, offloaded for recall), and a summary's sources are known items;
- replaying the decisions onto the items reproduces the planner's own context exactly (decisions close the
  loop: an agent that applies them holds what ctxflow accounts for);
- summaries of summaries stop at depth 2;
- the budget's live tokens per slot equal the planner's.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest
from ctxflow.processors.budget import BudgetProcessor
from ctxflow.processors.chain import ProcessorChain
from ctxflow.processors.eviction.planner import TABLE, EvictionPlanner
from ctxflow.processors.eviction.summarizer import ExtractiveSummarizer, SourceItem, SummaryRefused
from ctxflow.processors.eviction.workset import OFFLOADED
from ctxflow.processors.tokens import TokenCounter
from ctxflow.processors.types import DictBudgetState, Position, run_key
from ctxflow.schemas.codec import Codec
from ctxflow.schemas.models import (
    CompressionJob,
    Decision,
    DecisionKind,
    EvictionPolicy,
    EvictionStrategy,
    Invalidation,
    InvalidationKind,
    ItemKind,
    Role,
    Slot,
    SlotCaps,
    Summary,
    TenantManifest,
    TurnEvent,
)
from ctxflow.streams.sdk import outgoing
from hypothesis import given, settings
from hypothesis import strategies as st

T0 = datetime(2026, 3, 1, tzinfo=UTC)
COUNTER = TokenCounter()
WORDS = (
    "the", "build", "failed", "again", "after", "we", "changed", "the", "retry", "policy", "and", "the", "parser",
    "timed", "out", "twice",
)
K = DecisionKind


def _text(rng: random.Random, facts: list[str], words: int) -> str:
    body = " ".join(rng.choice(WORDS) for _ in range(words))
    return f"{body} {' '.join(rng.sample(facts, k=min(len(facts), rng.randint(0, 3))))}."


def session(seed: int, tenant: str = "acme", run: str = "r1") -> list[TurnEvent]:
    """A generated run: system prompt, a goal, then user turns, assistant turns, tool calls whose ids repeat
    (``call_0``..``call_2``), their results, retrieved chunks, and now and then a pinned item."""
    rng = random.Random(seed)
    facts = [f"ORD-{rng.randint(1000, 9999)}" for _ in range(8)] + [f"src/mod_{i}.py" for i in range(6)]
    items: list[tuple[Role, ItemKind, Slot, str, dict]] = [
        (Role.SYSTEM, ItemKind.MESSAGE, Slot.SYSTEM, "You are a careful agent. " * 8, {}),
        (Role.USER, ItemKind.MESSAGE, Slot.HISTORY, f"My goal is to reconcile {facts[0]}; never refund twice.", {}),
    ]
    while len(items) < rng.randint(15, 60):
        roll = rng.random()
        if roll < 0.2:
            items.append((Role.USER, ItemKind.MESSAGE, Slot.HISTORY, _text(rng, facts, 10), {}))
        elif roll < 0.35:
            items.append((Role.ASSISTANT, ItemKind.MESSAGE, Slot.HISTORY, _text(rng, facts, 20), {}))
        elif roll < 0.75:
            ids = rng.sample(["call_0", "call_1", "call_2"], k=rng.randint(1, 2))
            items.append((Role.ASSISTANT, ItemKind.TOOL_CALL, Slot.HISTORY, f"lookup {' '.join(ids)}",
                          {"tool_call_id": ids[0], "tool_call_ids": ids}))
            for call in ids:
                items.append((Role.TOOL, ItemKind.TOOL_RESULT, Slot.HISTORY, _text(rng, facts, rng.randint(20, 120)),
                              {"tool_call_id": call}))
        elif roll < 0.9:
            items.append((Role.TOOL, ItemKind.RETRIEVED_CHUNK, Slot.RETRIEVED, _text(rng, facts, 60), {}))
        else:
            items.append((Role.USER, ItemKind.MESSAGE, Slot.HISTORY, "Pinned: " + _text(rng, facts, 15),
                          {"tier_hint": 0}))
    return [
        TurnEvent(event_id=f"{run}-e{seq}", tenant_id=tenant, user_id="u", session_id="s", run_id=run,
                  agent_id="a", seq=seq, role=role, kind=kind, slot=slot, item_id=f"i{seq}", content=content,
                  model="gpt-4o", occurred_at=T0 + timedelta(seconds=seq), **extra)
        for seq, (role, kind, slot, content, extra) in enumerate(items)
    ]


def manifest(tenant: str, strategy: EvictionStrategy, history: int, keep_recent: int) -> TenantManifest:
    return TenantManifest(
        tenant_id=tenant, version=1, tier="standard", slot_caps=SlotCaps(history=history, retrieved=history // 2),
        total_cap=history * 3, updated_at=T0, eviction=EvictionPolicy(strategy=strategy, keep_recent=keep_recent),
    )


class Agent:
    """What an agent holds when it applies every decision: live items in order, offloaded ones aside."""

    def __init__(self) -> None:
        self.live: list[str] = []
        self.offloaded: set[str] = set()
        self.summaries: dict[str, list[str]] = {}

    def apply(self, d: Decision, protected: set[str]) -> None:
        named = [a.item_id for a in d.actions]
        if d.kind in (K.EVICT, K.OFFLOAD, K.MASK, K.SWAP, K.COMPRESS):
            assert not set(named) & protected, f"{d.kind.value} names protected items {set(named) & protected}"
            # Only an eviction may name offloaded items (session memory bounded): everything else acts on live ones.
            held = set(self.live) | (self.offloaded if d.kind is K.EVICT else set())
            missing = set(named) - held
            assert not missing, f"{d.kind.value} names items the agent does not hold: {missing}"
        if d.kind is K.RECALL:
            assert set(named) <= self.offloaded, f"recall of items never offloaded: {set(named) - self.offloaded}"
            self.offloaded -= set(named)
            self.live += named
        elif d.kind in (K.EVICT, K.OFFLOAD):
            self.live = [i for i in self.live if i not in named]
            if d.kind is K.OFFLOAD:
                self.offloaded |= set(named)
            else:
                self.offloaded -= set(named)
        elif d.kind is K.SWAP:
            assert d.summary is not None and sorted(d.summary.source_ids) == sorted(named)
            assert d.summary.depth <= 2
            at = min(self.live.index(i) for i in named)
            rest = [i for i in self.live if i not in named]
            rest.insert(at, d.summary.summary_id)
            self.live = rest
            self.summaries[d.summary.summary_id] = named


def run_session(turns: list[TurnEvent], strategy: EvictionStrategy, history: int, keep_recent: int,
                withdraw: float = 0.0) -> None:
    """Run ``turns`` through the chain, checking the invariants after every record; after a turn, with probability
    ``withdraw``, one of the summaries made so far is invalidated."""
    tenant = turns[0].tenant_id
    state = DictBudgetState(manifests={tenant: manifest(tenant, strategy, history, keep_recent)})
    budget = BudgetProcessor(COUNTER)
    chain = ProcessorChain(budget, [EvictionPlanner(budget)])
    agent = Agent()
    texts = {t.item_id: t.content or "" for t in turns}
    tier0 = {t.item_id for t in turns if t.slot is Slot.SYSTEM or t.tier_hint == 0}
    tier0.add(next(t.item_id for t in turns if t.role is Role.USER))
    calls: dict[str, str] = {}  # result id -> the call it answers
    issued: dict[str, str] = {}  # tool-call id -> latest item that issued it
    summaries = invalidations = 0
    withdrawn_ids: set[str] = set()  # summaries invalidated so far: neither prepared nor held afterwards
    current_user = ""
    rng = random.Random(len(turns) * 7919 + history + keep_recent)
    for t in turns:
        if t.kind is ItemKind.TOOL_CALL:
            issued.update(dict.fromkeys(t.tool_call_ids, t.item_id))
        elif t.kind is ItemKind.TOOL_RESULT:
            calls[t.item_id] = issued[t.tool_call_id or ""]
        if t.role is Role.USER and t.kind is ItemKind.MESSAGE:
            current_user = t.item_id
        agent.live.append(t.item_id)
        pending: list[object] = list(chain.process(t, Position("turns", 0, t.seq), state, T0))
        withdrawn = None
        if summaries and rng.random() < withdraw:
            withdrawn = f"sum{rng.randrange(summaries)}"
        while pending or withdrawn is not None:
            if not pending:  # after the turn's own outputs: a deletion reaches one of the run's summaries
                kind = rng.choice((InvalidationKind.TOMBSTONE, InvalidationKind.INVALIDATION))
                invalidation = Invalidation(
                    invalidation_id=f"inv-{withdrawn}", tenant_id=tenant, kind=kind, target_type="summary",
                    target_id=withdrawn, run_id=t.run_id, reason="a source memory was deleted", occurred_at=T0)
                pending = list(chain.process(invalidation, Position("invalidations", 0, invalidations), state, T0))
                invalidations += 1
                # What it decides is only that summary's eviction (and the budget's gauges coming back down).
                assert all([a.item_id for a in d.actions] == [withdrawn] for d in pending
                           if isinstance(d, Decision) and d.kind is not K.BUDGET_STATE), pending
                withdrawn_ids.add(withdrawn)
                withdrawn = None
                continue
            out = pending.pop(0)
            if isinstance(out, Decision):
                assert out.tenant_id == tenant
                agent.apply(out, tier0 | {current_user})
            elif isinstance(out, CompressionJob):
                assert not {s.item_id for s in out.sources} & (tier0 | {current_user})
                sources = [SourceItem(s.item_id, texts[s.item_id], s.depth) for s in out.sources]
                try:
                    made = ExtractiveSummarizer().summarize(sources, out.max_tokens,
                                                            lambda x: COUNTER.count(x, "gpt-4o").tokens)
                except SummaryRefused:
                    continue
                summary = Summary(
                    summary_id=f"sum{summaries}", job_id=out.job_id, tenant_id=tenant, user_id="u", session_id="s",
                    run_id=out.run_id, slot=out.slot, text=made.text,
                    token_count=COUNTER.count(made.text, "gpt-4o").tokens, source_ids=list(made.source_ids),
                    source_digests=list(made.source_digests), summarizer=made.summarizer,
                    summarizer_version=made.version, depth=made.depth, fidelity=made.fidelity, produced_at=T0,
                )
                texts[summary.summary_id] = made.text
                pending += chain.process(summary, Position("summaries", 0, summaries), state, T0)
                summaries += 1
        ws = state.get_state(TABLE, run_key(tenant, t.run_id))
        # A summary whose source memory was deleted is neither waiting to be swapped in nor held.
        assert (ws.prepared.summary_id if ws.prepared else None) not in withdrawn_ids
        assert not set(ws.item_ids()) & withdrawn_ids
        # Decisions close the loop: the agent's list is the planner's context, item for item.
        assert agent.live == [item for item, *_ in ws.context()], (agent.live, [item for item, *_ in ws.context()])
        held = set(agent.live)
        for result, call in calls.items():
            if result in held or call in held:
                assert result in held and call in held, f"tool pair split: call {call}, result {result}"
        assert int(ws.view()["depth"].max()) <= 2
        run = state.get_run(run_key(tenant, t.run_id))
        assert [run.live(i) for i in range(6)] == [ws.live_tokens(i) for i in range(6)]
        assert all(i in texts for i in agent.live)
    view = ws.view()
    assert set(ws.item_ids()) - held == {i for i, f in zip(ws.item_ids(), view["flags"].tolist(), strict=True)
                                         if f & OFFLOADED}


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    strategy=st.sampled_from(list(EvictionStrategy)),
    history=st.sampled_from([400, 900, 2000]),
    keep_recent=st.integers(0, 4),
    withdraw=st.sampled_from([0.0, 0.3]),
)
def test_every_strategy_keeps_the_invariants(seed: int, strategy: EvictionStrategy, history: int,
                                            keep_recent: int, withdraw: float) -> None:
    run_session(session(seed), strategy, history, keep_recent, withdraw)


@pytest.mark.parametrize("strategy", list(EvictionStrategy))
def test_a_tight_budget_still_keeps_the_invariants(strategy: EvictionStrategy) -> None:
    for seed in range(3):
        run_session(session(seed), strategy, 300, 2, withdraw=0.5 if seed else 0.0)


def _decide(turns: list[TurnEvent], strategy: EvictionStrategy) -> tuple[list[object], bytes]:
    """Every output of the chain over ``turns``, and the run's working set as the worker persists it."""
    tenant = turns[0].tenant_id
    state = DictBudgetState(manifests={tenant: manifest(tenant, strategy, 600, 2)})
    budget = BudgetProcessor(COUNTER)
    chain = ProcessorChain(budget, [EvictionPlanner(budget)])
    outputs = [out for t in turns for out in chain.process(t, Position("turns", 0, t.seq), state, T0)]
    return outputs, state.get_state(TABLE, run_key(tenant, turns[0].run_id)).to_bytes()


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), strategy=st.sampled_from(list(EvictionStrategy)))
def test_features_the_sdk_carries_decide_exactly_as_the_text_would(seed: int, strategy: EvictionStrategy) -> None:
    """The SDK sends a turn's content features (``outgoing``); the worker then skips reading the text, and every
    decision, job and byte of the working set is what it would have been had it extracted them itself."""
    turns = session(seed)
    codec = Codec()
    sent = [codec.decode(codec.encode(outgoing(t)), TurnEvent) for t in turns]
    assert all(t.features is not None for t in sent)
    assert _decide(sent, strategy) == _decide(turns, strategy)
