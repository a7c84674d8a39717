"""The fast admission check and the Redis key scheme agents rely on."""

from __future__ import annotations

import pytest
from ctxflow.processors.admission import BudgetLimits, RunHeadroom, check_admission, run_headroom
from ctxflow.processors.types import InvalidTenantError
from ctxflow.processors.types import run_key as ledger_key
from ctxflow.schemas.models import Slot, UserOverride
from ctxflow.sinks.redis import decisions_key, limits_key, run_key
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.test_budget_factories import Feed, admission, manifest, run_event, turn, usage

HEADROOM = RunHeadroom(
    used={"retrieved": 20_000, "history": 10_000, "total": 35_000},
    hard_limits={"retrieved": 32_000, "history": 64_000, "total": 128_000},
    manifest_version=3,
)


def test_a_plan_within_every_limit_is_admitted() -> None:
    answer = check_admission(HEADROOM, {Slot.RETRIEVED: 5_000, Slot.HISTORY: 2_000})
    assert answer.admitted and answer.known_run
    assert "42000" in answer.reason


def test_a_slot_that_would_reach_its_hard_limit_is_refused_with_the_numbers() -> None:
    answer = check_admission(HEADROOM, {"retrieved": 12_000})
    assert not answer.admitted
    assert answer.reason == "not admitted: slot retrieved would reach 32000 tokens, hard limit 32000"


def test_the_total_is_checked_even_when_every_slot_fits() -> None:
    answer = check_admission(HEADROOM, {Slot.HISTORY: 50_000, Slot.SCRATCHPAD: 45_000})
    assert not answer.admitted
    assert "total context would reach 130000" in answer.reason


def test_an_unknown_run_is_admitted_and_says_so_when_no_limits_are_projected() -> None:
    answer = check_admission(None, {Slot.SYSTEM: 1_000})
    assert answer.admitted and not answer.known_run
    assert "no budget is projected" in answer.reason


#: The manifest of the agreement tests: caps a plan can reach, a run cap, a sub-agent share of 4,000 tokens (of a
#: workflow cap no plan reaches: the projection cannot hold a workflow's consumption), and one user whose
#: override raises the total and the run cap.
MANIFEST = manifest(
    total_cap=3_000, run_cap_tokens=5_000, subagent_share=0.004, workflow_cap_tokens=1_000_000,
    user_overrides={"vip": UserOverride(total_cap=6_000, run_cap_tokens=9_000)},
)


def test_a_new_runs_oversized_plan_is_refused_from_its_tenants_projected_limits() -> None:
    feed = Feed(MANIFEST)
    limits = feed.processor.limits(feed.state, "acme")
    assert not check_admission(None, {Slot.HISTORY: 50_000}, limits).admitted
    answer = check_admission(None, {Slot.OUTPUT: 2_000, Slot.SCRATCHPAD: 1_500}, limits)
    assert (answer.admitted, answer.known_run) == (False, False)
    assert answer.reason == "not admitted: total context would reach 3500 tokens, hard limit 3000"
    assert check_admission(None, {Slot.OUTPUT: 2_000, Slot.SCRATCHPAD: 1_500}, limits, user_id="vip").admitted
    assert BudgetLimits.from_json(limits.to_json()) == limits


def test_the_run_cap_refuses_a_plan_the_context_would_still_hold() -> None:
    feed = Feed(MANIFEST)
    feed.all(run_event("started"), turn(0, 500), usage("c1", 4_000, 600))
    budget = feed.processor.budget(feed.state, "acme", "u1")
    headroom = run_headroom(feed.state.get_run(ledger_key("acme", "r1")), budget)
    answer = check_admission(headroom, {Slot.OUTPUT: 400})
    assert not answer.admitted
    assert answer.reason == "not admitted: run token cap would reach 5000 tokens, hard limit 5000"
    assert check_admission(headroom, {Slot.OUTPUT: 300}).admitted


_PLAN = st.dictionaries(st.sampled_from(["system", "history", "retrieved", "scratchpad", "output"]),
                        st.integers(0, 4_000), min_size=1, max_size=4)


@settings(max_examples=150, deadline=None)
@given(
    history=st.lists(st.integers(1, 700), max_size=5),
    reported=st.integers(0, 9_000),
    user=st.sampled_from(["u1", "vip"]),
    child=st.booleans(),
    known=st.booleans(),
    plan=_PLAN,
)
def test_the_fast_check_agrees_with_the_authoritative_decision(
    history: list[int], reported: int, user: str, child: bool, known: bool, plan: dict[str, int]
) -> None:
    """Whatever a run holds and has consumed, and whoever runs it: the answer from the projection (the run's
    headroom, or its tenant's limits when the run is new) admits exactly when the worker's decision does."""
    feed = Feed(MANIFEST)
    if known:
        parent = "root" if child else None
        feed.all(run_event("started", user_id=user, parent=parent, workflow="w" if child else None),
                 *(turn(i, n, user_id=user, parent_run_id=parent) for i, n in enumerate(history)))
        if reported:
            feed(usage("c1", reported, user_id=user))
        headroom = run_headroom(feed.state.get_run(ledger_key("acme", "r1")),
                                feed.processor.budget(feed.state, "acme", user))
        fast = check_admission(headroom, plan)
    else:
        fast = check_admission(None, plan, feed.processor.limits(feed.state, "acme"), user_id=user)
    [decided] = feed(admission(plan, user_id=user))
    assert fast.admitted == decided.admitted, (fast.reason, decided.reason)
    assert fast.known_run == known


def test_negative_plans_and_unknown_slots_are_errors() -> None:
    with pytest.raises(ValueError):
        check_admission(HEADROOM, {Slot.SYSTEM: -1})
    with pytest.raises(ValueError):
        check_admission(HEADROOM, {"prompt": 10})


def test_headroom_round_trips_through_its_redis_value() -> None:
    assert RunHeadroom.from_json(HEADROOM.to_json().encode()) == HEADROOM
    assert RunHeadroom.from_json(RunHeadroom({"total": 3}, {}).to_json()) == RunHeadroom({"total": 3}, {})


@pytest.mark.parametrize("tenant", ["", "a:b", "acme:run:x", " acme", "a" * 200])
def test_redis_keys_refuse_tenant_ids_that_could_reach_another_tenant(tenant: str) -> None:
    with pytest.raises(InvalidTenantError):
        run_key(tenant, "r1")
    with pytest.raises(InvalidTenantError):
        decisions_key(tenant, "r1")
    with pytest.raises(InvalidTenantError):
        limits_key(tenant)


def test_redis_keys_are_tenant_prefixed() -> None:
    assert run_key("acme", "r1") == "ctxflow:acme:run:r1"
    assert decisions_key("acme-eu", "r1").startswith("ctxflow:acme-eu:")
    assert limits_key("acme-eu") == "ctxflow:acme-eu:budget"
