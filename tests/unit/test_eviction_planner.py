"""The eviction planner's decisions on concrete runs: relief, compression and swap, backoff, recall, masking, and
summaries whose source memory was deleted (invalidations)."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta

import pytest
from ctxflow.processors.budget import BudgetProcessor
from ctxflow.processors.chain import ProcessorChain
from ctxflow.processors.eviction import planner as planner_module
from ctxflow.processors.eviction.planner import TABLE, EvictionPlanner, pending_jobs
from ctxflow.processors.eviction.workset import ITEM_STRUCT, OFFLOADED, WorkingSet, short_terms
from ctxflow.processors.tokens import TokenCounter
from ctxflow.processors.types import DictBudgetState, Position, run_key
from ctxflow.schemas.models import (
    BudgetState,
    CompressionJob,
    Decision,
    DecisionKind,
    EvictionPolicy,
    EvictionStrategy,
    Invalidation,
    InvalidationKind,
    ItemKind,
    OverflowBehaviour,
    PrivacyMode,
    Role,
    Slot,
    SlotCaps,
    Summary,
    TenantManifest,
    TurnEvent,
)
from hypothesis import given, settings
from hypothesis import strategies as st

T0 = datetime(2026, 3, 1, tzinfo=UTC)
K = DecisionKind


class Run:
    """One run of tenant ``acme`` through the worker's chain, over in-memory tables."""

    def __init__(self, history: int = 1000, **policy: object) -> None:
        overflow = policy.pop("overflow", OverflowBehaviour.EVICT_AND_COMPRESS)
        self.manifest = TenantManifest(
            tenant_id="acme", version=3, tier="standard", slot_caps=SlotCaps(history=history),
            total_cap=100_000, updated_at=T0, overflow=overflow, eviction=EvictionPolicy(**policy),  # type: ignore[arg-type]
        )
        self.state = DictBudgetState(manifests={"acme": self.manifest})
        budget = BudgetProcessor(TokenCounter())
        self.chain = ProcessorChain(budget, [EvictionPlanner(budget)])
        self.seq = 0
        self.summaries = 0
        self.invalidations = 0
        self.out: list[object] = []
        self.turns: list[TurnEvent] = []

    def turn(self, tokens: int, role: Role = Role.ASSISTANT, kind: ItemKind = ItemKind.MESSAGE,
             content: str = "", at: datetime | None = None, **extra: object) -> list[object]:
        seq, self.seq = self.seq, self.seq + 1
        event = TurnEvent(
            event_id=f"e{seq}", tenant_id="acme", user_id="u", session_id="s", run_id="r", agent_id="a", seq=seq,
            role=role, kind=kind, slot=Slot.HISTORY, item_id=f"i{seq}", content=content or f"turn {seq}",
            token_count=tokens, model="gpt-4o", occurred_at=at or T0 + timedelta(seconds=seq),
            **extra,  # type: ignore[arg-type]
        )
        self.turns.append(event)
        out = self.chain.process(event, Position("turns", 0, seq), self.state, T0)
        self.out += out
        return out

    def answer(self, job: CompressionJob, tokens: int, text: str = "summary keeps ORD-1042") -> list[object]:
        summary = Summary(
            summary_id=f"sum{self.summaries}", job_id=job.job_id, tenant_id="acme", user_id="u", session_id="s",
            run_id="r", slot=job.slot, text=text, token_count=tokens, source_ids=[s.item_id for s in job.sources],
            source_digests=[s.content_digest for s in job.sources], summarizer="extractive",
            summarizer_version="1", depth=1, fidelity=1.0, produced_at=T0,
        )
        out = self.chain.process(summary, Position("summaries", 0, self.summaries), self.state, T0)
        self.summaries += 1
        self.out += out
        return out

    def invalidate(self, summary_id: str, kind: InvalidationKind = InvalidationKind.TOMBSTONE,
                   target_type: str = "summary", run_id: str = "r", offset: int | None = None) -> list[object]:
        """The memory processor's invalidation of ``summary_id`` (one of its sources deleted), read back from
        ``invalidations``; it names the deleted memory's owner, not the run's user."""
        if offset is None:
            offset, self.invalidations = self.invalidations, self.invalidations + 1
        event = Invalidation(
            invalidation_id=f"inv-{summary_id}", tenant_id="acme", kind=kind, target_type=target_type,
            target_id=summary_id, user_id="memory-owner", session_id="elsewhere", run_id=run_id,
            reason="its only source mem-9 was deleted: removed", occurred_at=T0,
        )
        out = self.chain.process(event, Position("invalidations", 0, offset), self.state, T0)
        self.out += out
        return out

    @property
    def ws(self) -> WorkingSet:
        return self.state.get_state(TABLE, run_key("acme", "r"))

    def decisions(self, kind: DecisionKind) -> list[Decision]:
        return [d for d in self.out if isinstance(d, Decision) and d.kind is kind]


def test_relief_brings_the_slot_back_down_and_the_budget_state_back_to_ok() -> None:
    run = Run(history=1000, strategy=EvictionStrategy.SLIDING_WINDOW, keep_recent=2)
    run.turn(50, Role.USER, content="My goal is to close ORD-1042.")
    for _ in range(8):
        run.turn(100)
    states = [(d.previous_state, d.state) for d in run.decisions(K.BUDGET_STATE)]
    assert (BudgetState.OK, BudgetState.SOFT) in states and (BudgetState.SOFT, BudgetState.OK) in states
    (evict,) = run.decisions(K.EVICT)
    assert evict.tokens_freed == sum(a.tokens for a in evict.actions) >= 850 - 700
    assert evict.strategy == "sliding_window" and evict.policy_version == "m3/p1/list-2025-06.2"
    assert "i0" not in [a.item_id for a in evict.actions]  # the goal is tier 0
    assert run.state.get_run(run_key("acme", "r")).live(3) == run.ws.live_tokens(3) <= 700


def test_compression_is_requested_at_80_percent_and_swapped_in_at_95_with_its_provenance() -> None:
    run = Run(history=1000, keep_recent=2)
    run.turn(20, Role.USER, content="Refund ORD-1042, never twice.")
    for _ in range(7):
        run.turn(100)
    assert not [o for o in run.out if isinstance(o, CompressionJob)]  # 720 of 1000
    run.turn(100)
    (job,) = [o for o in run.out if isinstance(o, CompressionJob)]  # 820: past 80%
    assert run.decisions(K.COMPRESS)[0].job_id == job.job_id
    sources = [s.item_id for s in job.sources]
    assert sources[0] == "i1" and "i0" not in sources
    assert job.max_tokens < sum(s.tokens for s in job.sources)
    run.answer(job, tokens=40)
    assert not run.decisions(K.SWAP)  # prepared, not yet needed
    run.turn(100)
    (swap,) = run.decisions(K.SWAP)
    assert swap.summary is not None and swap.summary.text == "summary keeps ORD-1042"
    assert swap.summary.source_ids == [s.item_id for s in job.sources] and swap.job_id == job.job_id
    assert swap.tokens_freed == sum(s.tokens for s in job.sources) - 40
    assert run.ws.item_ids()[1] == "sum0"  # the summary stands where its first source stood


def test_a_compression_that_would_free_too_little_backs_off_instead_of_repeating() -> None:
    run = Run(history=1000, keep_recent=2, min_gain=0.5)
    run.turn(20, Role.USER, content="Refund ORD-1042.")
    for _ in range(12):
        run.turn(70)
    assert not [o for o in run.out if isinstance(o, CompressionJob)]
    assert run.ws.backoff_of(3) > 0


def test_a_summary_that_frees_too_little_is_not_swapped_and_not_asked_again_at_once() -> None:
    run = Run(history=1000, keep_recent=2)
    run.turn(20, Role.USER, content="Refund ORD-1042.")
    for _ in range(8):
        run.turn(100)
    (job,) = [o for o in run.out if isinstance(o, CompressionJob)]
    run.answer(job, tokens=sum(s.tokens for s in job.sources) - 10)
    run.turn(10)
    assert not run.decisions(K.SWAP)
    assert len([o for o in run.out if isinstance(o, CompressionJob)]) == 1


def test_an_offloaded_item_is_recalled_when_a_later_turn_names_it() -> None:
    run = Run(history=1000, strategy=EvictionStrategy.RETRIEVAL_AUGMENTED, keep_recent=1)
    run.turn(20, Role.USER, content="Start.")
    run.turn(300, Role.TOOL, ItemKind.TOOL_RESULT, content="order ORD-77731 shipped to Lyon on 2026-02-11")
    for _ in range(6):
        run.turn(100)
    assert "i1" in [a.item_id for d in run.decisions(K.OFFLOAD) for a in d.actions]
    run.turn(10, Role.USER, content="When did ORD-77731 ship?")
    (recall,) = run.decisions(K.RECALL)
    assert [a.item_id for a in recall.actions] == ["i1"]
    assert run.ws.item_ids()[-2:] == ["i8", "i1"] or run.ws.item_ids()[-1] == "i1"


def test_observation_masking_leaves_a_placeholder_naming_the_result() -> None:
    run = Run(history=1000, strategy=EvictionStrategy.OBSERVATION_MASKING, keep_recent=1)
    run.turn(20, Role.USER, content="Start.")
    run.turn(10, Role.ASSISTANT, ItemKind.TOOL_CALL, content="read_file()", tool_call_id="call_0",
             tool_call_ids=["call_0"])
    run.turn(400, Role.TOOL, ItemKind.TOOL_RESULT, content="a long listing", tool_call_id="call_0")
    for _ in range(5):
        run.turn(100)
    (mask,) = run.decisions(K.MASK)[:1]
    assert [a.item_id for a in mask.actions] == ["i2"] and mask.summary is not None
    assert "i2" in (mask.summary.text or "") and "400 tokens" in (mask.summary.text or "")
    assert "i1" in run.ws.item_ids() and "i2" in run.ws.item_ids()  # the pair still stands


def test_a_no_retention_run_is_relieved_but_never_sent_to_a_summarizer() -> None:
    run = Run(history=1000, keep_recent=2)
    for _ in range(10):
        run.turn(100, privacy=PrivacyMode.NO_RETENTION)
    assert not [o for o in run.out if isinstance(o, CompressionJob)]
    assert run.decisions(K.OFFLOAD) or run.decisions(K.EVICT)


def test_a_tenant_that_declined_eviction_gets_no_eviction_decisions() -> None:
    run = Run(history=500, overflow=OverflowBehaviour.REJECT)
    for _ in range(10):
        run.turn(100)
    assert not [d for d in run.out if isinstance(d, Decision) and d.kind in (K.EVICT, K.OFFLOAD, K.MASK, K.SWAP)]
    assert run.state.get_run(run_key("acme", "r")).live(3) == 1000


def test_the_working_set_round_trips_through_its_changelog_form() -> None:
    run = Run(history=1000, strategy=EvictionStrategy.RETRIEVAL_AUGMENTED, keep_recent=1)
    run.turn(20, Role.USER, content="Start with ORD-1.")
    for _ in range(9):
        run.turn(100, content="ORD-2 and src/app.py at 2026-01-02")
    copy = WorkingSet.from_bytes(run.ws.to_bytes())
    assert copy.to_bytes() == run.ws.to_bytes() and copy.context() == run.ws.context()


def test_session_memory_is_bounded_by_forgetting_the_least_recently_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(planner_module, "MAX_OFFLOADED", 3)
    run = Run(history=1000, strategy=EvictionStrategy.RETRIEVAL_AUGMENTED, keep_recent=1)
    run.turn(20, Role.USER, content="Start.")
    offloaded: set[str] = set()
    for _ in range(20):
        for d in run.turn(150):
            if isinstance(d, Decision) and d.kind is K.OFFLOAD:
                offloaded |= {a.item_id for a in d.actions}
            if isinstance(d, Decision) and d.kind is K.EVICT:
                assert {a.item_id for a in d.actions} <= offloaded  # only what was in session memory
                assert d.tokens_freed == 0  # it held no live tokens any more
                offloaded -= {a.item_id for a in d.actions}
        assert int((run.ws.view()["flags"] & OFFLOADED != 0).sum()) <= 3
    assert run.decisions(K.EVICT)


def test_relevance_keeps_what_resembles_the_current_question_by_embedding() -> None:
    run = Run(history=1000, strategy=EvictionStrategy.RELEVANCE, keep_recent=1)
    near, far = [1.0] * 8 + [0.0] * 8, [0.0] * 8 + [1.0] * 8
    run.turn(10, Role.USER, content="Start.")
    for i in range(6):  # alternate: items like the question to come, and items unlike it
        run.turn(120, content=f"note {i}", embedding=near if i % 2 else far)
    run.turn(30, Role.USER, content="And now?", embedding=[0.9] * 8 + [0.1] * 8)
    run.turn(200)
    gone = {a.item_id for d in run.decisions(K.EVICT) for a in d.actions}
    assert gone and gone <= {"i1", "i3", "i5"}  # the far ones (i % 2 == 0 -> seq 1, 3, 5)


def test_relevance_falls_back_to_the_identifiers_a_question_names() -> None:
    run = Run(history=1000, strategy=EvictionStrategy.RELEVANCE, keep_recent=1)
    run.turn(10, Role.USER, content="Start.")
    for i in range(6):
        run.turn(120, content=f"order ORD-{1000 + i} shipped from depot DEPOT-{50 + i}")
    run.turn(30, Role.USER, content="Where did ORD-1001, ORD-1003 and ORD-1005 ship from?")
    run.turn(200)
    gone = {a.item_id for d in run.decisions(K.EVICT) for a in d.actions}
    assert gone and not gone & {"i2", "i4", "i6"}  # the named orders stay


def test_each_decision_prices_its_effect_on_the_prompt_cache() -> None:
    run = Run(history=1000, strategy=EvictionStrategy.RETRIEVAL_AUGMENTED, keep_recent=1)
    run.turn(20, Role.USER, content="Start.")
    run.turn(300, Role.TOOL, ItemKind.TOOL_RESULT, content="order ORD-77731 shipped to Lyon on 2026-02-11")
    for _ in range(6):
        run.turn(100)
    (offload, *_) = run.decisions(K.OFFLOAD)
    # gpt-4o: cache write 2.50, cached read 1.25 USD per million tokens. Taking items out early in the context
    # re-writes what follows them; the freed tokens are no longer read.
    assert offload.cost_effect_micros is not None and offload.cost_effect_micros > 0
    run.turn(10, Role.USER, content="When did ORD-77731 ship?")
    (recall,) = run.decisions(K.RECALL)
    assert recall.cost_effect_micros == round(sum(a.tokens for a in recall.actions) * 2.5)


def test_an_unanswered_compression_is_given_up_and_its_items_no_longer_held() -> None:
    run = Run(history=1000, strategy=EvictionStrategy.SUMMARIZATION, keep_recent=2)
    run.turn(20, Role.USER, content="Refund ORD-1042.")
    for i in range(60):  # the summarizer never answers (it refused the job, or lags far behind): 10 minutes
        run.turn(100, at=T0 + timedelta(seconds=10 * (i + 1)))
    (job,) = [o for o in run.out if isinstance(o, CompressionJob)]  # given up, and not asked again
    first = {s.item_id for s in job.sources}
    assert first & {a.item_id for d in run.decisions(K.EVICT) for a in d.actions}  # no longer held for the job
    assert run.ws.live_tokens(3) < 1000


def test_a_compression_job_is_pending_from_its_request_until_a_summary_answers_it_or_it_is_given_up() -> None:
    answered, ignored = Run(history=1000, keep_recent=2), Run(history=1000, keep_recent=2)
    for run in (answered, ignored):
        run.turn(20, Role.USER, content="Refund ORD-1042.")
        for _ in range(7):
            run.turn(100)
        assert pending_jobs([run.ws]) == 0  # 720 of 1000: nothing asked yet
        run.turn(100)
        assert pending_jobs([run.ws]) == 1
    assert pending_jobs([answered.ws, ignored.ws]) == 2
    (job,) = [o for o in answered.out if isinstance(o, CompressionJob)]
    answered.answer(job, tokens=40)
    assert pending_jobs([answered.ws]) == 0
    ignored.turn(10, at=T0 + timedelta(minutes=10))  # past the patience for an answer
    assert pending_jobs([ignored.ws]) == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.text(min_size=1, max_size=12), st.lists(st.integers(0, 2**32 - 1), max_size=45)),
                max_size=30),
       st.sets(st.integers(0, 2**24 - 1), max_size=20), st.data())
def test_the_terms_an_item_holds_are_found_without_decoding_every_item(
        items: list[tuple[str, list[int]]], wanted: set[int], data: st.DataObject) -> None:
    ws = WorkingSet()
    for uid, (item_id, hashes) in enumerate(items):
        record = ITEM_STRUCT.pack(uid << 16, uid, 1, uid, 0, 3, 0, 0, 0, 0, 0, -1, 0, 0, 0, 0, b"\0" * 32, uid)
        ws.insert(record, item_id, short_terms(hashes))
        # Some wanted hashes are ones items hold, so matches are common.
        wanted |= {h & 0xFFFFFF for h in data.draw(st.lists(st.sampled_from(hashes), max_size=2) if hashes
                                                   else st.just([]))}
    index = list(range(len(items)))
    assert ws.terms_held(index, wanted) == [wanted & held for held in ws.recall_terms(index)]


# ---- summaries whose source memory was deleted ------------------------------------------------------------------

def _compressed(swapped: bool) -> Run:
    """A run whose summary ``sum0`` (40 tokens, text "summary keeps ORD-1042") is prepared, or swapped in."""
    run = Run(history=1000, keep_recent=2)
    run.turn(20, Role.USER, content="Refund ORD-1042, never twice.")
    for _ in range(8):
        run.turn(100)
    (job,) = [o for o in run.out if isinstance(o, CompressionJob)]
    run.answer(job, tokens=40)
    if swapped:
        run.turn(100)
        assert run.decisions(K.SWAP) and "sum0" in run.ws.item_ids()
    else:
        assert run.ws.prepared is not None and not run.decisions(K.SWAP)
    return run


def test_a_prepared_summary_whose_source_memory_was_deleted_leaves_the_table_and_may_be_asked_for_again() -> None:
    run = _compressed(swapped=False)
    assert b"summary keeps ORD-1042" in run.ws.to_bytes()  # the text waits in the table (and its changelog)
    freed = run.state.get_run(run_key("acme", "r")).freed.tolist()
    assert run.invalidate("sum0") == []  # nothing to tell the agent: its window never held the summary
    assert run.ws.prepared is None and b"summary keeps" not in run.ws.to_bytes()
    assert run.state.get_run(run_key("acme", "r")).freed.tolist() == freed
    run.turn(100)  # the slot is still past compress_at: a new summary is asked for, and nothing swapped in
    assert len([o for o in run.out if isinstance(o, CompressionJob)]) == 2 and not run.decisions(K.SWAP)


@pytest.mark.parametrize("kind", list(InvalidationKind)[:2])
def test_a_swapped_in_summary_whose_source_memory_was_deleted_is_evicted_and_its_tokens_freed(
        kind: InvalidationKind) -> None:
    run = _compressed(swapped=True)
    key = run_key("acme", "r")
    live = run.state.get_run(key).live(3)
    out = run.invalidate("sum0", kind)
    (evict,) = [d for d in out if isinstance(d, Decision)]
    assert evict.kind is K.EVICT and [(a.item_id, a.tokens) for a in evict.actions] == [("sum0", 40)]
    assert evict.tokens_freed == 40 and evict.source_event_id == "inv-sum0"
    gone = "removed" if kind is InvalidationKind.TOMBSTONE else "withdrawn"
    assert f"summary sum0 {gone}, its source memory deleted" in evict.reason
    assert (evict.user_id, evict.session_id, evict.run_id) == ("u", "s", "r")  # the run's, not the memory owner's
    assert "sum0" not in run.ws.item_ids()
    # The budget takes the relief: the run's usage falls by the summary's tokens, as the planner's does.
    assert run.state.get_run(key).live(3) == run.ws.live_tokens(3) == live - 40


def test_a_withdrawn_summary_brings_the_budget_state_back_down() -> None:
    # No relief of its own (the tenant rejects instead of evicting), so the slot stays past its soft watermark
    # until the summary the planner took in earlier leaves it.
    run = _compressed(swapped=True)
    run.state.manifests["acme"] = run.manifest.model_copy(update={"overflow": OverflowBehaviour.REJECT, "version": 4})
    for _ in range(50):
        if run.state.get_run(run_key("acme", "r")).level(3):
            break
        run.turn(30)
    assert run.state.get_run(run_key("acme", "r")).live(3) - 40 < 850  # the summary's tokens are what tips it
    states = [(d.previous_state, d.state) for d in run.invalidate("sum0") if d.kind is K.BUDGET_STATE]
    assert states == [(BudgetState.SOFT, BudgetState.OK)]


@pytest.mark.parametrize(("target_type", "summary_id", "run_id"), [
    ("turn_content", "sum0", "r"),  # another layer's, even naming the same id
    ("memory_record", "sum0", "r"),
    ("summary", "sum-of-another-job", "r"),
    ("summary", "sum0", "another-run"),  # a run whose working set the planner does not hold
])
@pytest.mark.parametrize("swapped", [False, True])
def test_an_invalidation_of_anything_else_changes_and_writes_nothing(
        target_type: str, summary_id: str, run_id: str, swapped: bool) -> None:
    run = _compressed(swapped)
    held, runs = run.ws.to_bytes(), copy.deepcopy(run.state.runs)
    run.state.dirty.clear()
    assert run.invalidate(summary_id, target_type=target_type, run_id=run_id) == []
    assert run.ws.to_bytes() == held and run.state.runs == runs and not run.state.dirty


def test_an_invalidation_applies_once_and_the_same_log_decides_the_same() -> None:
    run = _compressed(swapped=True)
    first = run.invalidate("sum0")
    assert first
    assert run.invalidate("sum0", offset=0) == []  # redelivered at its offset
    # Sent again at a new offset (the memory processor withdraws a late swap again): nothing left to take out.
    assert run.invalidate("sum0") == []
    again = _compressed(swapped=True)
    assert again.invalidate("sum0") == first  # ids and content are the record's, not the moment's


#: The worker's persist order for this chain (``streams.runtime.pipeline``): aggregates, run ledgers, the planner's
#: working sets, watermarks.
_PHASES = ("tenants", "users", "workflows", "counts", "runs", TABLE, "watermarks")


def _persist(durable: DictBudgetState, state: DictBudgetState, phases: tuple[str, ...]) -> None:
    """Write what ``state`` changed in ``phases`` to ``durable``, through the changelog codecs."""
    for phase in phases:
        table = state._table(phase)
        for key in sorted(state.dirty.get(phase, ())):
            value = table.get(key)
            if value is None:
                durable._table(phase).pop(key, None)
            elif phase == "runs":
                durable.runs[key] = type(value).from_list(value.to_list())
            elif phase == TABLE:
                durable._table(TABLE)[key] = WorkingSet.from_bytes(value.to_bytes())
            else:
                durable._table(phase)[key] = copy.deepcopy(value)


@pytest.mark.parametrize("turn_first", [False, True])
def test_an_invalidation_is_exact_after_a_crash_after_any_table(turn_first: bool) -> None:
    base = _compressed(swapped=True)
    base.state.dirty.clear()

    def batch(run: Run) -> list[object]:
        # The turn takes the slot past its soft watermark again: relief before or after the summary left.
        steps = [lambda: run.turn(260), lambda: run.invalidate("sum0", offset=0)]
        return [o for step in (steps if turn_first else steps[::-1]) for o in step()]

    reference = copy.deepcopy(base)
    published = batch(reference)
    assert any(isinstance(d, Decision) and d.kind is K.EVICT and d.source_event_id == "inv-sum0" for d in published)
    for cut in range(len(_PHASES) + 1):
        crashed = copy.deepcopy(base)
        durable = copy.deepcopy(base.state)
        out = batch(crashed)  # it went out before any table was written
        _persist(durable, crashed.state, _PHASES[:cut])
        restarted = copy.deepcopy(base)  # a fresh chain over what was durable, the batch again from its offsets
        restarted.state = durable
        restarted.out = []
        out += batch(restarted)
        where = f"crash after {_PHASES[cut - 1] if cut else 'nothing'}"
        assert restarted.ws.to_bytes() == reference.ws.to_bytes(), where
        assert restarted.state.runs == reference.state.runs, where
        # Every decision the crash-free run made went out (a replay repeats some, under the same ids).
        assert {d.decision_id: d for d in out if isinstance(d, Decision)} == {
            d.decision_id: d for d in published if isinstance(d, Decision)}, where


def test_a_turn_replayed_after_a_crash_never_takes_the_relief_of_another_partitions_turn_at_its_offset() -> None:
    # Regression: the budget takes the planner's relief for the turn it has just applied, even though its run
    # ledger holds that offset by then. It recognised that turn by (stream, offset) alone, kept from record to
    # record: a turn it skipped as held (a replay after a crash, the working set behind the run ledger) at the
    # offset of another partition's turn applied just before took the behind planner's relief, and the run's
    # freed tokens went back (the SIGKILL test's runaway run, now and then).
    run = Run(history=1000, strategy=EvictionStrategy.SLIDING_WINDOW, keep_recent=2)
    run.turn(50, Role.USER, content="My goal is to close ORD-1042.")
    for _ in range(3):
        run.turn(100)
    # The working set and the watermark as the crash left them (both are persisted after the run ledgers).
    behind, mark = WorkingSet.from_bytes(run.ws.to_bytes()), copy.deepcopy(run.state.watermarks)
    for _ in range(6):
        run.turn(100)
    key = run_key("acme", "r")
    ledger = run.state.get_run(key)
    assert ledger is not None and any(ledger.freed) and behind.freed.tolist() != ledger.freed.tolist()
    held = copy.deepcopy(ledger)
    # Restarted: the run ledger durable after every turn, the working set behind; a fresh chain.
    run.state.tables[TABLE][key], run.state.watermarks = behind, mark
    budget = BudgetProcessor(TokenCounter())
    run.chain = ProcessorChain(budget, [EvictionPlanner(budget)])
    replayed = run.turns[6]
    other = replayed.model_copy(update={"tenant_id": "globex", "event_id": "g6"})
    run.chain.process(other, Position("turns", 1, 6), run.state, T0)  # another tenant's partition, same offset
    out = run.chain.process(replayed, Position("turns", 0, 6), run.state, T0)
    assert run.state.get_run(key) == held
    assert not [d for d in out if isinstance(d, Decision) and d.kind not in planner_module.EVICTION_KINDS]
