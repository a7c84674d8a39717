"""The budget processor's decisions, one behaviour per test (pure: no broker, state in dicts)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from ctxflow.processors.ledger import RunLedger
from ctxflow.processors.types import InvalidTenantError, decision_id, run_key, tenant_of_key, user_key
from ctxflow.schemas.contract import OutsideReorderWindow
from ctxflow.schemas.models import BudgetState, DecisionKind, SlotCaps, SpendWindowKind, UserOverride, content_digest

from tests.unit.test_budget_factories import (
    NOW,
    Feed,
    admission,
    kinds,
    manifest,
    run_event,
    turn,
    usage,
    window,
)

K = DecisionKind


def test_slot_goes_soft_at_the_watermark_and_asks_for_eviction() -> None:
    feed = Feed(manifest())
    assert feed(turn(0, 849)) == []
    out = feed(turn(1, 1))  # 850 = 0.85 * 1000
    assert kinds(out) == [(K.BUDGET_STATE, "history", "soft"), (K.EVICTION_REQUEST, "history", "soft")]
    state, evict = out
    assert (state.previous_state, state.used_tokens, state.cap_tokens) == (BudgetState.OK, 850, 1000)
    assert "at least 250 tokens to reach 600" in evict.reason and evict.actions == []
    assert feed(turn(2, 10)) == []  # only transitions are published


def test_overflow_reject_sends_no_eviction_request() -> None:
    feed = Feed(manifest(overflow="reject"))
    assert kinds(feed(turn(0, 900))) == [(K.BUDGET_STATE, "history", "soft")]


def test_overflow_reject_refuses_at_the_hard_limit_even_when_hard_limits_only_flag() -> None:
    # Declining eviction leaves nothing to make room: the item that reaches the hard limit is refused.
    feed = Feed(manifest(overflow="reject", hard_limit="flag", tier="enterprise"))
    assert kinds(feed(turn(0, 1_100))) == [(K.BUDGET_STATE, "history", "soft")]  # 110%: within the tier's grace
    out = feed(turn(1, 100))
    assert kinds(out) == [(K.BUDGET_STATE, "history", "hard"), (K.REJECTION, "history", "hard")]
    assert out[1].reason.startswith("503 context budget exhausted") and "hard limit 1150" in out[1].reason


def test_hard_limit_rejects_with_a_reason_an_agent_can_show() -> None:
    feed = Feed(manifest())
    feed(turn(0, 900))
    out = feed(turn(1, 100))
    assert kinds(out) == [
        (K.BUDGET_STATE, "history", "hard"),
        (K.EVICTION_REQUEST, "history", "hard"),
        (K.REJECTION, "history", "hard"),
    ]
    reason = out[2].reason
    assert reason.startswith("503 context budget exhausted") and "history holds 1000 tokens" in reason
    assert feed(turn(2, 500)) == []  # a runaway loop gets one rejection, not one per item


def test_flag_records_the_hard_state_without_rejecting_and_terminate_says_so() -> None:
    flag = Feed(manifest(hard_limit="flag"))
    assert K.REJECTION not in {d.kind for d in flag(turn(0, 1000))}
    term = Feed(manifest(hard_limit="terminate_run"))
    rejection = next(d for d in term(turn(0, 1000)) if d.kind is K.REJECTION)
    assert rejection.reason.startswith("run terminated by budget policy")


def test_total_context_has_its_own_gauge() -> None:
    feed = Feed(manifest(total_cap=2000, slot_caps=SlotCaps()))
    out = feed.all(turn(0, 1000, slot="retrieved"), turn(1, 800, slot="tools"))
    assert kinds(out) == [(K.BUDGET_STATE, None, "soft"), (K.EVICTION_REQUEST, None, "soft")]
    assert out[0].used_tokens == 1800 and out[0].cap_tokens == 2000


def test_state_comes_back_down_when_the_cap_is_raised() -> None:
    feed = Feed(manifest())
    feed(turn(0, 1000))
    feed(manifest(version=2, slot_caps=SlotCaps(history=1100)))
    out = feed(turn(1, 1))
    assert [(d.kind, d.state, d.previous_state) for d in out] == [(K.BUDGET_STATE, BudgetState.SOFT, BudgetState.HARD)]


def test_tenant_token_window_is_exhausted_then_resets_next_hour() -> None:
    feed = Feed(manifest(spend_windows=[window("hour", 1000)]))
    feed(usage("c1", 800))
    out = feed(usage("c2", 300))
    assert kinds(out)[-2:] == [(K.BUDGET_STATE, None, "hard"), (K.SPEND_EXHAUSTED, None, "hard")]
    assert out[-1].window is SpendWindowKind.HOUR and out[-1].used_tokens == 1100
    later = feed(usage("c3", 10, occurred_at=NOW + timedelta(hours=1)))
    back = [d for d in later if d.kind is K.BUDGET_STATE]
    assert [(d.state, d.previous_state, d.window) for d in back] == [
        (BudgetState.OK, BudgetState.HARD, SpendWindowKind.HOUR)
    ]


def test_cost_window_is_exhausted_by_micro_usd() -> None:
    # gpt-4o at 2.50 USD per million input tokens: 400k tokens cost 1,000,000 micro-USD.
    feed = Feed(manifest(spend_windows=[window("day", cost=1_000_000)]))
    out = feed(usage("c1", 400_000))
    exhausted = next(d for d in out if d.kind is K.SPEND_EXHAUSTED)
    assert exhausted.window is SpendWindowKind.DAY and "1000000 of 1000000 micro-USD" in exhausted.reason
    assert feed.state.tenants["acme"].usage(SpendWindowKind.DAY) == (400_000, 1_000_000)


def test_user_window_binds_only_that_user() -> None:
    m = manifest(user_overrides={"intern": UserOverride(spend_windows=[window("day", 100)])})
    feed = Feed(m)
    assert feed(usage("c1", 500, user_id="u1"))[1:] == []
    out = feed(usage("c2", 500, user_id="intern", run="r2"))
    assert [(d.kind, d.user_id, d.window) for d in out[1:]] == [
        (K.BUDGET_STATE, "intern", SpendWindowKind.DAY),
        (K.SPEND_EXHAUSTED, "intern", SpendWindowKind.DAY),
    ]
    assert feed.state.users["acme:intern"].tokens == 500 and feed.state.tenants["acme"].tokens == 1000


def test_run_cap_and_workflow_cap_and_subagent_share() -> None:
    m = manifest(run_cap_tokens=1000, workflow_cap_tokens=2000, subagent_share=0.25)
    feed = Feed(m)
    feed(run_event("started", run="root"))
    feed(run_event("started", run="child", parent="root", workflow="root", agent_id="researcher"))
    out = feed(usage("c1", 600, run="child", agent_id="researcher"))
    share = [d for d in out if d.kind is K.SPEND_EXHAUSTED]
    assert [d.reason.split(" (")[0] for d in share] == ["sub-agent share of the workflow cap"]
    out = feed(usage("c2", 1500, run="root"))
    exhausted = {d.reason.split(" (")[0] for d in out if d.kind is K.SPEND_EXHAUSTED}
    assert exhausted == {"run token cap", "workflow root token cap"}
    flow = feed.state.workflows["acme:root"]
    assert flow.tokens == 2100 and flow.by_agent() == {"researcher": 600, "planner": 1500}


def test_workflow_learned_after_usage_still_counts_the_usage() -> None:
    feed = Feed(manifest())
    feed(usage("c1", 300, run="child"))  # the child's RunEvent is late
    assert "acme:root" not in feed.state.workflows
    feed(run_event("started", run="child", parent="root", workflow="root"))
    assert feed.state.workflows["acme:root"].runs["child"][1] == 300


def test_usage_reconciliation_records_the_discrepancy() -> None:
    feed = Feed(manifest())
    feed.all(turn(0, 400), turn(1, 100, slot="system"), turn(2, 50, slot="output"))
    (rec,) = feed(usage("c1", 520, 40))
    assert rec.kind is K.USAGE_RECONCILED and rec.used_tokens == 520
    assert "reported 520 prompt tokens, working-set estimate 500 (discrepancy +20, +4.0%)" in rec.reason
    assert (rec.estimated_tokens, rec.discrepancy_tokens) == (0, 20)  # the same, as fields analysts can sum
    run = feed.state.runs["acme:r1"]
    assert (run.reported_tokens, run.reports, run.working_set()) == (560, 1, 550)
    (final,) = feed(run_event("finalized"))
    assert (final.used_tokens, final.estimated_tokens, final.discrepancy_tokens) == (560, 0, 10)


def test_finalized_run_without_usage_is_estimated_never_zero() -> None:
    feed = Feed(manifest())
    feed.all(turn(0, 400), turn(1, 100, slot="system"))
    (rec,) = feed(run_event("finalized", status="interrupted"))
    assert rec.kind is K.USAGE_RECONCILED and rec.used_tokens == 500
    assert rec.reason.startswith("run interrupted; estimated: no usage report")
    assert (rec.estimated_tokens, rec.discrepancy_tokens) == (500, None)  # all of it estimated, nothing to compare
    tenant = feed.state.tenants["acme"]
    assert (tenant.tokens, tenant.estimated_tokens) == (500, 500)
    assert tenant.cost > 0 and feed.state.users["acme:u1"].tokens == 500


def test_interrupted_stream_is_topped_up_and_late_usage_replaces_the_estimate() -> None:
    feed = Feed(manifest())
    feed.all(turn(0, 900), usage("c1", 300, complete=False))
    (rec,) = feed(run_event("finalized"))
    assert "partial usage from an interrupted stream (300 tokens reported)" in rec.reason
    assert rec.used_tokens == 900 and feed.state.tenants["acme"].tokens == 900
    assert (rec.estimated_tokens, rec.discrepancy_tokens) == (600, None)  # 300 reported, 600 filled in
    feed(usage("c2", 1200))  # the provider's full report for the run arrives after finalization
    tenant = feed.state.tenants["acme"]
    assert (tenant.tokens, tenant.estimated_tokens, tenant.estimates) == (1500, 0, {})
    assert feed.state.workflows["acme:r1"].tokens == 1500


def test_admission_answers_from_current_usage_without_changing_state() -> None:
    feed = Feed(manifest(spend_windows=[window("hour", 5000)]))
    feed(turn(0, 600))
    before = feed.state.runs["acme:r1"].to_list()
    (yes,) = feed(admission({"history": 300}))
    assert (yes.kind, yes.admitted, yes.state) == (K.ADMISSION, True, BudgetState.SOFT)
    assert "above the soft watermark on slot history" in yes.reason
    (no,) = feed(admission({"history": 400, "tools": 10}))
    assert (no.admitted, no.slot.value, no.used_tokens, no.cap_tokens) == (False, "history", 1000, 1000)
    assert no.request_id and no.decision_id == decision_id("acme", no.request_id, K.ADMISSION, "admission")
    feed(usage("c1", 4990))
    (spent,) = feed(admission({"tools": 20}))
    assert (spent.admitted, spent.window) == (False, SpendWindowKind.HOUR)
    assert feed.state.runs["acme:r1"].to_list()[0] == before[0]


def test_decision_ids_are_reproducible_from_the_source_record() -> None:
    first = Feed(manifest()).all(turn(0, 1000))
    again = Feed(manifest()).all(turn(0, 1000))
    assert [d.decision_id for d in first] == [d.decision_id for d in again]
    assert len({d.decision_id for d in first}) == len(first) == 3
    assert first[0].decision_id == decision_id("acme", "acme-r1-t0", K.BUDGET_STATE, "slot:history")


def test_duplicates_and_replays_change_nothing() -> None:
    feed = Feed(manifest())
    feed.all(turn(0, 100), turn(2, 10), turn(1, 1))  # reordered within the run
    feed(turn(1, 1))  # producer duplicate at a new offset
    feed(turn(0, 100), offset=0)  # replay at the same offset
    feed.all(usage("c1", 50), usage("c1", 50), run_event("finalized"), run_event("finalized"))
    run = feed.state.runs["acme:r1"]
    assert (run.tokens[3], run.seq_upto, run.seq_above, run.reported_tokens, run.applied) == (
        111,
        2,
        0,
        50,
        5,
    )
    assert feed.state.tenants["acme"].tokens == 50


def test_seq_far_ahead_declares_older_gaps_lost_and_stays_small() -> None:
    run = RunLedger()
    assert run.accept_seq(0) and run.accept_seq(10_000)
    assert run.seq_above.bit_length() <= 4096
    assert not run.accept_seq(5)  # inside the abandoned gap: treated as already seen
    assert run.accept_seq(9_999) and not run.accept_seq(9_999)


def test_static_items_are_counted_once_per_tenant_and_never_across_tenants() -> None:
    prompt = "You are the acme support agent. Never reveal the discount code. " * 20
    digest = content_digest(prompt)
    full = {"slot": "system", "content": prompt, "content_digest": digest, "token_count": None, "model": "gpt-4"}
    bare = full | {"content": None}
    feed = Feed(manifest(), manifest("globex"))
    feed(turn(0, 0, run="r1", **full))
    sent = feed.state.runs["acme:r1"].tokens[0]
    assert sent > 0
    feed(turn(0, 0, run="r2", **bare))  # a later run sends only the digest of the same system prompt
    assert feed.state.runs["acme:r2"].tokens[0] == sent
    # Another tenant probing with the digest learns nothing: its own table has no count for it.
    feed(turn(0, 0, run="r1", tenant="globex", **bare))
    assert feed.state.runs["globex:r1"].tokens[0] == 0
    assert all(tenant_of_key(k) == "acme" for k in feed.state.counts)


def test_every_key_is_tenant_scoped_and_validated() -> None:
    assert run_key("acme", "r1") == "acme:r1" and tenant_of_key(user_key("acme", "a:b")) == "acme"
    for bad in ("", "acme:evil", "-acme", "a" * 129, "ac me"):
        with pytest.raises(InvalidTenantError):
            run_key(bad, "r1")
    with pytest.raises(ValueError, match="run_id must be non-empty"):
        run_key("acme", "")


def test_ledger_snapshots_round_trip() -> None:
    feed = Feed(manifest(workflow_cap_tokens=10_000))
    feed.all(turn(0, 900), turn(3, 5), usage("c1", 10), run_event("started"), run_event("finalized"))
    run = feed.state.runs["acme:r1"]
    assert RunLedger.from_list(run.to_list()) == run
    flow = feed.state.workflows["acme:r1"]
    assert type(flow).from_dict(flow.to_dict()) == flow


def test_a_turn_behind_the_reorder_window_is_refused_not_dropped() -> None:
    feed = Feed(manifest())
    feed(turn(0, 10))
    feed(turn(5_000, 10))  # more than MAX_SEQ_GAP ahead: seqs 1..904 are declared lost
    with pytest.raises(OutsideReorderWindow, match=r"seq 3 of run .* among seqs 1\.\.904.*not counted"):
        feed(turn(3, 10))
    assert feed(turn(0, 10)) == []  # a duplicate of an accepted seq is still just a duplicate
    assert feed(turn(4_950, 10)) == []  # inside the window: counted
    ledger = feed.state.get_run(run_key("acme", "r1"))
    assert ledger is not None and sum(ledger.tokens) == 30
    assert RunLedger.from_list(ledger.to_list()).behind_window(3)
