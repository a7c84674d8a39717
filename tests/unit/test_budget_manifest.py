"""Manifest resolution: precedence, built-in defaults, tier QoS and validation beyond the schema."""

from __future__ import annotations

import pytest
from ctxflow.processors.manifest import (
    DEFAULT_TOTAL_CAP,
    SLOT_INDEX,
    TIER_QOS,
    Limit,
    ManifestError,
    check_manifest,
    effective_budget,
    manifest_problems,
    tier_qos,
)
from ctxflow.schemas.models import (
    BudgetState,
    DecisionKind,
    HardLimitBehaviour,
    Slot,
    SlotCaps,
    TierQoS,
    UserOverride,
)
from pydantic import ValidationError

from tests.unit.test_budget_factories import Feed, kinds, manifest, turn, window


def test_tenant_without_manifest_gets_the_observe_only_default() -> None:
    b = effective_budget("acme", None, "u1")
    assert b.manifest_version is None
    assert b.total.cap == DEFAULT_TOTAL_CAP
    assert b.hard_limit is HardLimitBehaviour.FLAG
    assert (b.tenant_windows, b.run_cap, b.workflow_cap) == ((), None, None)
    # Observing only: a runaway run is told it is over budget, never rejected.
    feed = Feed()
    out = feed.all(*(turn(i, 20_000, slot="retrieved") for i in range(8)))
    assert DecisionKind.REJECTION not in {d.kind for d in out}
    assert (DecisionKind.BUDGET_STATE, "retrieved", "hard") in kinds(out)


def test_user_override_beats_tenant_which_beats_defaults() -> None:
    m = manifest(
        total_cap=10_000,
        soft_watermark=0.8,
        run_cap_tokens=5_000,
        spend_windows=[window("day", 100)],
        user_overrides={
            "vip": UserOverride(total_cap=20_000, run_cap_tokens=None, spend_windows=[window("hour", 7)]),
            "cautious": UserOverride(soft_watermark=0.5),
        },
    )
    vip, cautious, other = (effective_budget("acme", m, u) for u in ("vip", "cautious", "other"))
    assert (vip.total.cap, vip.watermark, vip.run_cap.cap) == (20_000, 0.8, 5_000)  # null field: tenant value
    assert [w.max_tokens for w in vip.user_windows] == [7]
    assert [w.max_tokens for w in vip.tenant_windows] == [100]  # the tenant's own limit still binds
    assert (cautious.total.cap, cautious.watermark, cautious.user_windows) == (10_000, 0.5, ())
    assert cautious.total.soft_at == 5_000 and other.total.soft_at == 8_000
    assert (other.total.cap, other.watermark) == (10_000, 0.8)
    # Workflow-wide gauges keep the tenant's watermark whoever triggers them.
    assert cautious.tenant_watermark == 0.8


def test_a_manifest_cannot_govern_another_tenant() -> None:
    with pytest.raises(ValueError, match="cannot govern"):
        effective_budget("globex", manifest("acme"), "u1")


def test_tier_qos_table() -> None:
    assert TIER_QOS["free"].grace < TIER_QOS["standard"].grace < TIER_QOS["enterprise"].grace
    assert TIER_QOS["free"].evict_to < TIER_QOS["standard"].evict_to < TIER_QOS["enterprise"].evict_to
    assert tier_qos("Enterprise") == TIER_QOS["enterprise"]
    assert tier_qos("platinum-custom") == TIER_QOS["standard"]
    assert Limit.of(1000, 0.85, 1.15) == Limit(1000, 850, 1150)


def test_a_manifests_qos_sets_a_user_defined_tier_and_retunes_a_built_in_one() -> None:
    gold = effective_budget("acme", manifest(tier="gold", qos=TierQoS(grace=1.5, evict_to=0.75)), "u1")
    assert (gold.qos.grace, gold.qos.evict_to, gold.total.hard_at) == (1.5, 0.75, 15_000)
    assert effective_budget("acme", manifest(tier="enterprize"), "u1").qos == TIER_QOS["standard"]  # no qos: standard
    retuned = effective_budget("acme", manifest(tier="free", qos=TierQoS(grace=1.2, evict_to=0.5)), "u1")
    assert retuned.slot_limits[SLOT_INDEX[Slot.HISTORY]] == Limit(1000, 850, 1200)
    # The same traffic that a built-in free tier rejects stays soft under the retuned one.
    feed = Feed(manifest(tier="free", qos=TierQoS(grace=1.2, evict_to=0.5)))
    out = feed.all(*(turn(i, 210) for i in range(5)))
    assert DecisionKind.REJECTION not in {d.kind for d in out}
    assert "to reach 500 (50% of cap 1000, tier free)" in next(
        d.reason for d in out if d.kind is DecisionKind.EVICTION_REQUEST)


def test_qos_out_of_range_is_a_contract_violation_and_a_watermark_below_the_eviction_target_is_refused() -> None:
    with pytest.raises(ValidationError):
        TierQoS(grace=0.9, evict_to=0.5)  # a hard limit below the cap
    with pytest.raises(ValidationError):
        TierQoS(grace=1.1, evict_to=1.0)
    problems = manifest_problems(manifest(
        tier="gold", qos=TierQoS(grace=1.1, evict_to=0.9), user_overrides={"low": UserOverride(soft_watermark=0.5)}))
    assert problems == [
        "soft_watermark (0.85) is below the tier's evict_to (0.9): an eviction request at the watermark would ask "
        "to come down to more tokens than the context holds",
        "user_overrides['low'].soft_watermark (0.5) is below the tier's evict_to (0.9): an eviction request at the "
        "watermark would ask to come down to more tokens than the context holds",
    ]


def test_enterprise_is_softer_than_free_under_the_same_pressure() -> None:
    """Same caps, same traffic: free is rejected at the cap, enterprise bursts past it and evicts gently."""
    free = Feed(manifest("free-co", tier="free"))
    ent = Feed(manifest("big-co", tier="enterprise"))
    out_free = free.all(*(turn(i, 210, tenant="free-co") for i in range(5)))  # 1050 tokens of a 1000 cap
    out_ent = ent.all(*(turn(i, 210, tenant="big-co") for i in range(5)))
    assert (DecisionKind.REJECTION, "history", "hard") in kinds(out_free)
    assert DecisionKind.REJECTION not in {d.kind for d in out_ent}
    assert ent.state.runs["big-co:r1"].level(SLOT_INDEX[Slot.HISTORY]) == 1  # still soft
    evict_free = next(d for d in out_free if d.kind is DecisionKind.EVICTION_REQUEST)
    evict_ent = next(d for d in out_ent if d.kind is DecisionKind.EVICTION_REQUEST)
    assert "reach 600" in evict_free.reason and "reach 800" in evict_ent.reason


def test_valid_manifest_passes_and_problems_are_all_listed() -> None:
    assert check_manifest(manifest()) == manifest()
    bad = manifest(
        total_cap=1000,
        slot_caps=SlotCaps(history=5000),
        run_cap_tokens=900,
        workflow_cap_tokens=500,
        spend_windows=[window("day", 1), window("day", 2), window("hour")],
        tokenizers={"acme-": "r50k_base"},
        user_overrides={"u9": UserOverride(total_cap=0, spend_windows=[window("month")])},
    )
    problems = manifest_problems(bad)
    for expected in (
        "slot_caps.history (5000) exceeds total_cap (1000)",
        "workflow_cap_tokens (500) is below run_cap_tokens (900)",
        "more than one day window",
        "the hour window sets neither max_tokens nor max_cost_micros",
        "encoding 'r50k_base' is not available offline",
        "user_overrides['u9'].total_cap must be positive",
        "user_overrides['u9'].spend_windows: the month window",
    ):
        assert any(expected in p for p in problems), (expected, problems)
    assert any("subagent_share needs" in p for p in manifest_problems(manifest(subagent_share=0.5)))
    with pytest.raises(ManifestError) as err:
        check_manifest(bad)
    assert err.value.problems == problems


def test_processor_keeps_the_newest_valid_manifest_version() -> None:
    feed = Feed()
    feed(manifest(version=2, total_cap=5000))
    feed(manifest(version=1, total_cap=9000))  # older: ignored
    assert feed.state.manifests["acme"].total_cap == 5000
    with pytest.raises(ManifestError):
        feed(manifest(version=3, total_cap=100, slot_caps=SlotCaps(history=1000)))
    assert feed.state.manifests["acme"].version == 2


def test_a_new_manifest_takes_effect_on_the_next_record() -> None:
    feed = Feed(manifest())
    assert kinds(feed(turn(0, 900)))[0] == (DecisionKind.BUDGET_STATE, "history", "soft")
    feed(manifest(version=2, slot_caps=SlotCaps(history=5000)))
    back = feed(turn(1, 1))
    assert [(d.state, d.previous_state, d.manifest_version) for d in back] == [(BudgetState.OK, BudgetState.SOFT, 2)]
